//! Register-level access plumbing for MMIO register blocks: 32-bit registers with byte enables
//! ([`DwordRegs`]), served to guest accesses of 1, 2, 4 and 8 bytes ([`dword_read`],
//! [`dword_write`]; an 8-byte access is two DWORDs, low first, like Linux's `lo_hi_writeq`),
//! and the masked update every writable register needs ([`merge`]). Malformed accesses
//! (misaligned, other sizes) read 0 and are ignored on write, never a panic.

/// A block of 32-bit registers with byte enables, as most MMIO register files are.
pub trait DwordRegs {
    /// Reads the DWORD at `offset` (4-byte aligned).
    fn read_dword(&self, offset: u64) -> u32;
    /// Writes the bits of `value` selected by `enables` to the DWORD at `offset` (4-byte
    /// aligned). Unselected bits are not written (matters for RW1C bits and side effects).
    fn write_dword(&mut self, offset: u64, value: u32, enables: u32);
}

/// True for naturally aligned 1-, 2-, 4- and 8-byte accesses.
pub fn reg_access_ok(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8) && offset.is_multiple_of(len as u64)
}

/// Serves a guest read through [`DwordRegs`]; malformed accesses read 0.
pub fn dword_read(regs: &impl DwordRegs, offset: u64, data: &mut [u8]) {
    if !reg_access_ok(offset, data.len()) {
        data.fill(0);
        return;
    }
    if data.len() == 8 {
        let lo = regs.read_dword(offset);
        let hi = regs.read_dword(offset + 4);
        data[..4].copy_from_slice(&lo.to_le_bytes());
        data[4..].copy_from_slice(&hi.to_le_bytes());
        return;
    }
    let v = regs.read_dword(offset & !3) >> (8 * (offset & 3));
    for (i, b) in data.iter_mut().enumerate() {
        *b = (v >> (8 * i)) as u8;
    }
}

/// Serves a guest write through [`DwordRegs`]; malformed accesses are ignored.
pub fn dword_write(regs: &mut impl DwordRegs, offset: u64, data: &[u8]) {
    if !reg_access_ok(offset, data.len()) {
        log::debug!(
            "ignoring malformed register write at {offset:#x} len {}",
            data.len()
        );
        return;
    }
    if data.len() == 8 {
        let lo = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let hi = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
        regs.write_dword(offset, lo, u32::MAX);
        regs.write_dword(offset + 4, hi, u32::MAX);
        return;
    }
    let shift = 8 * (offset & 3) as u32;
    let mut value = 0u32;
    for (i, b) in data.iter().enumerate() {
        value |= u32::from(*b) << (8 * i);
    }
    let enables = if data.len() == 4 {
        u32::MAX
    } else {
        ((1u32 << (8 * data.len())) - 1) << shift
    };
    regs.write_dword(offset & !3, value << shift, enables);
}

/// `old` with the bits in `writable & enables` replaced from `value`.
pub fn merge(old: u32, value: u32, enables: u32, writable: u32) -> u32 {
    let m = writable & enables;
    (old & !m) | (value & m)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Regs([u32; 4]);
    impl DwordRegs for Regs {
        fn read_dword(&self, offset: u64) -> u32 {
            self.0.get((offset / 4) as usize).copied().unwrap_or(0)
        }
        fn write_dword(&mut self, offset: u64, value: u32, enables: u32) {
            if let Some(r) = self.0.get_mut((offset / 4) as usize) {
                *r = merge(*r, value, enables, u32::MAX);
            }
        }
    }

    #[test]
    fn dword_plumbing_sizes_and_alignment() {
        let mut r = Regs([0x4433_2211, 0x8877_6655, 0, 0]);
        let mut b = [0u8; 8];
        dword_read(&r, 0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x8877_6655_4433_2211);
        let mut w = [0u8; 2];
        dword_read(&r, 2, &mut w);
        assert_eq!(w, [0x33, 0x44]);
        let mut one = [0u8; 1];
        dword_read(&r, 5, &mut one);
        assert_eq!(one, [0x66]);
        // Misaligned / odd sizes read 0 and are dropped on write.
        dword_read(&r, 1, &mut w);
        assert_eq!(w, [0, 0]);
        let mut three = [0xffu8; 3];
        dword_read(&r, 0, &mut three);
        assert_eq!(three, [0; 3]);
        dword_read(&r, 4, &mut b);
        assert_eq!(b, [0; 8]);
        dword_write(&mut r, 1, &[1, 2]);
        dword_write(&mut r, 4, &[0; 8]);
        dword_write(&mut r, 0, &[]);
        assert_eq!(r.0[0], 0x4433_2211);
        // Byte and word writes only touch their bytes.
        dword_write(&mut r, 1, &[0xaa]);
        assert_eq!(r.0[0], 0x4433_aa11);
        dword_write(&mut r, 6, &[0xbb, 0xcc]);
        assert_eq!(r.0[1], 0xccbb_6655);
        dword_write(&mut r, 8, &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!((r.0[2], r.0[3]), (0x0506_0708, 0x0102_0304));
        // Huge offsets do not overflow.
        dword_read(&r, u64::MAX - 7, &mut b);
        dword_write(&mut r, u64::MAX - 3, &[0; 4]);
    }
}
