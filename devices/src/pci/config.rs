//! A 4 KiB PCI Express configuration space (PCIe Base Spec r6.0, 7.5) with per-byte write and
//! write-1-to-clear masks.
//!
//! Guest writes go through [`ConfigSpace::write`]: for every byte, bits in the write mask take the
//! written value, bits in the RW1C mask are cleared where a 1 is written, everything else is
//! read-only. BAR sizing (write all-ones, read back the size mask) falls out of the BAR write
//! masks. Device code updates read-only state with the raw `set_*` accessors.

use super::capability::{Capability, ExtendedCapability};
use super::{BarInfo, BarKind, PciError, config_access_ok};

/// Size of a PCIe function's configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the PCI-compatible part (reachable through 0xCF8/0xCFC).
pub const LEGACY_CONFIG_SPACE_SIZE: usize = 256;
/// Offset of the first extended capability (PCIe Base Spec r6.0, 7.6.3).
pub const EXT_CAP_START: u16 = 0x100;
/// First offset available to standard capabilities (after the 64-byte header).
pub const STD_CAP_START: u16 = 0x40;

/// Vendor ID (RO).
pub const VENDOR_ID: u16 = 0x00;
/// Device ID (RO).
pub const DEVICE_ID: u16 = 0x02;
/// Command register.
pub const COMMAND: u16 = 0x04;
/// Status register.
pub const STATUS: u16 = 0x06;
/// Revision ID (RO).
pub const REVISION_ID: u16 = 0x08;
/// Class code, 24 bits at 0x09..0x0C (prog-if, sub-class, base class).
pub const CLASS_CODE: u16 = 0x09;
/// Cache line size (RW, no effect on PCIe).
pub const CACHE_LINE_SIZE: u16 = 0x0c;
/// Header type; bit 7 = multi-function.
pub const HEADER_TYPE: u16 = 0x0e;
/// First BAR register.
pub const BAR0: u16 = 0x10;
/// Subsystem vendor ID (type 0).
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
/// Subsystem ID (type 0).
pub const SUBSYSTEM_ID: u16 = 0x2e;
/// Expansion ROM BAR of a type 0 header.
pub const ROM_ADDRESS: u16 = 0x30;
/// Capabilities pointer.
pub const CAPABILITY_LIST: u16 = 0x34;
/// Interrupt line (RW scratch).
pub const INTERRUPT_LINE: u16 = 0x3c;
/// Interrupt pin (RO; 0 = no INTx).
pub const INTERRUPT_PIN: u16 = 0x3d;

/// Type 1: primary bus number.
pub const PRIMARY_BUS: u16 = 0x18;
/// Type 1: secondary bus number.
pub const SECONDARY_BUS: u16 = 0x19;
/// Type 1: subordinate bus number.
pub const SUBORDINATE_BUS: u16 = 0x1a;
/// Type 1: I/O base (RO 0: no I/O window).
pub const IO_BASE: u16 = 0x1c;
/// Type 1: secondary status.
pub const SECONDARY_STATUS: u16 = 0x1e;
/// Type 1: memory base (\[15:4\] = address\[31:20\]).
pub const MEMORY_BASE: u16 = 0x20;
/// Type 1: memory limit.
pub const MEMORY_LIMIT: u16 = 0x22;
/// Type 1: prefetchable memory base (\[15:4\] = address\[31:20\], \[3:0\] = 1: 64-bit).
pub const PREF_MEMORY_BASE: u16 = 0x24;
/// Type 1: prefetchable memory limit.
pub const PREF_MEMORY_LIMIT: u16 = 0x26;
/// Type 1: prefetchable base, upper 32 bits.
pub const PREF_BASE_UPPER32: u16 = 0x28;
/// Type 1: prefetchable limit, upper 32 bits.
pub const PREF_LIMIT_UPPER32: u16 = 0x2c;
/// Type 1: expansion ROM BAR.
pub const ROM_ADDRESS1: u16 = 0x38;
/// Type 1: bridge control.
pub const BRIDGE_CONTROL: u16 = 0x3e;

/// Command: memory space enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: bus master enable.
pub const COMMAND_MASTER: u16 = 1 << 2;
/// Command: parity error response.
pub const COMMAND_PARITY: u16 = 1 << 6;
/// Command: SERR# enable.
pub const COMMAND_SERR: u16 = 1 << 8;
/// Command: INTx emulation disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status: capabilities list present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status bits that are RW1C: master data parity error (8), signaled/received target abort
/// (11, 12), received master abort (13), signaled system error (14), detected parity error (15).
pub const STATUS_RW1C: u16 = 0xf900;
/// Bridge control bits we let software write: parity error response, SERR# enable, ISA enable,
/// VGA enable, VGA 16-bit decode, secondary bus reset (PCI-to-PCI Bridge Spec 1.2, 3.2.5.18).
pub const BRIDGE_CONTROL_RW: u16 = 0x005f;

/// Which header layout the function uses (PCIe Base Spec r6.0, 7.5.1.2 / 7.5.1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderType {
    /// Type 0: endpoints and host bridges, six BARs.
    Type0,
    /// Type 1: PCI-to-PCI bridges (root ports, switch ports), two BARs.
    Type1,
}

impl HeaderType {
    /// Number of BAR registers in this header layout.
    pub fn bar_count(self) -> u8 {
        match self {
            HeaderType::Type0 => 6,
            HeaderType::Type1 => 2,
        }
    }
}

/// Identification registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision_id: u8,
    /// 24-bit class code: base class \[23:16\], sub-class \[15:8\], programming interface \[7:0\].
    pub class_code: u32,
    /// Subsystem vendor ID (type 0 only).
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (type 0 only).
    pub subsystem_id: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    Unused,
    Lower {
        size: u64,
        kind: BarKind,
        prefetchable: bool,
    },
    /// Upper half of the 64-bit BAR in the previous slot.
    Upper,
}

/// One function's configuration space.
#[derive(Clone)]
pub struct ConfigSpace {
    regs: Box<[u8; CONFIG_SPACE_SIZE]>,
    wmask: Box<[u8; CONFIG_SPACE_SIZE]>,
    w1cmask: Box<[u8; CONFIG_SPACE_SIZE]>,
    header_type: HeaderType,
    bars: [BarSlot; 6],
    /// Offset of the last standard capability (0 = none).
    last_cap: u16,
    /// Next free offset for a standard capability.
    cap_end: u16,
    /// Offset of the last extended capability (0 = none).
    last_ext_cap: u16,
    /// Next free offset for an extended capability.
    ext_end: u16,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor_id", &self.read_u16(VENDOR_ID))
            .field("device_id", &self.read_u16(DEVICE_ID))
            .field("header_type", &self.header_type)
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    /// A config space with the given header layout and IDs. The command register allows memory
    /// space, bus master, parity, SERR# and INTx-disable; I/O space stays 0 (no I/O BARs or
    /// windows). Interrupt pin is 0 (no INTx). Type 1 headers get writable bus numbers and memory
    /// / 64-bit prefetchable windows, and no I/O window.
    pub fn new(header_type: HeaderType, ids: PciIds) -> Self {
        let mut c = ConfigSpace {
            regs: Box::new([0; CONFIG_SPACE_SIZE]),
            wmask: Box::new([0; CONFIG_SPACE_SIZE]),
            w1cmask: Box::new([0; CONFIG_SPACE_SIZE]),
            header_type,
            bars: [BarSlot::Unused; 6],
            last_cap: 0,
            cap_end: STD_CAP_START,
            last_ext_cap: 0,
            ext_end: EXT_CAP_START,
        };
        c.set_u16(VENDOR_ID, ids.vendor_id);
        c.set_u16(DEVICE_ID, ids.device_id);
        c.set_u8(REVISION_ID, ids.revision_id);
        c.set_u8(CLASS_CODE, ids.class_code as u8);
        c.set_u16(CLASS_CODE + 1, (ids.class_code >> 8) as u16);
        c.set_masks(
            COMMAND,
            2,
            u32::from(
                COMMAND_MEMORY
                    | COMMAND_MASTER
                    | COMMAND_PARITY
                    | COMMAND_SERR
                    | COMMAND_INTX_DISABLE,
            ),
            0,
        );
        c.set_masks(STATUS, 2, 0, u32::from(STATUS_RW1C));
        c.set_masks(CACHE_LINE_SIZE, 1, 0xff, 0);
        c.set_masks(INTERRUPT_LINE, 1, 0xff, 0);
        match header_type {
            HeaderType::Type0 => {
                c.set_u8(HEADER_TYPE, 0x00);
                c.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor_id);
                c.set_u16(SUBSYSTEM_ID, ids.subsystem_id);
            }
            HeaderType::Type1 => {
                c.set_u8(HEADER_TYPE, 0x01);
                c.set_masks(PRIMARY_BUS, 1, 0xff, 0);
                c.set_masks(SECONDARY_BUS, 1, 0xff, 0);
                c.set_masks(SUBORDINATE_BUS, 1, 0xff, 0);
                c.set_masks(SECONDARY_STATUS, 2, 0, u32::from(STATUS_RW1C));
                c.set_masks(MEMORY_BASE, 2, 0xfff0, 0);
                c.set_masks(MEMORY_LIMIT, 2, 0xfff0, 0);
                // 64-bit prefetchable window: low nibble 1 (PCI-to-PCI Bridge Spec 1.2, 3.2.5.9).
                c.set_u16(PREF_MEMORY_BASE, 0x0001);
                c.set_u16(PREF_MEMORY_LIMIT, 0x0001);
                c.set_masks(PREF_MEMORY_BASE, 2, 0xfff0, 0);
                c.set_masks(PREF_MEMORY_LIMIT, 2, 0xfff0, 0);
                c.set_masks(PREF_BASE_UPPER32, 4, 0xffff_ffff, 0);
                c.set_masks(PREF_LIMIT_UPPER32, 4, 0xffff_ffff, 0);
                c.set_masks(BRIDGE_CONTROL, 2, u32::from(BRIDGE_CONTROL_RW), 0);
            }
        }
        c
    }

    /// The header layout.
    pub fn header_type(&self) -> HeaderType {
        self.header_type
    }

    /// Guest read: 1..=4 bytes inside one DWORD below 4096; anything else reads all-ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        if !config_access_ok(u64::from(offset), data.len(), CONFIG_SPACE_SIZE as u64) {
            data.fill(0xff);
            return;
        }
        let o = usize::from(offset);
        data.copy_from_slice(&self.regs[o..o + data.len()]);
    }

    /// Guest write through the write and RW1C masks; malformed accesses are ignored.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        if !config_access_ok(u64::from(offset), data.len(), CONFIG_SPACE_SIZE as u64) {
            log::debug!(
                "ignoring malformed config write at {offset:#x} len {}",
                data.len()
            );
            return;
        }
        let o = usize::from(offset);
        for (i, &v) in data.iter().enumerate() {
            let idx = o + i;
            let w = self.wmask[idx];
            let c = self.w1cmask[idx];
            self.regs[idx] = ((self.regs[idx] & !w) | (v & w)) & !(v & c);
        }
    }

    /// Raw byte (device side); all-ones past the end.
    pub fn read_u8(&self, offset: u16) -> u8 {
        self.regs.get(usize::from(offset)).copied().unwrap_or(0xff)
    }

    /// Raw little-endian word (device side); all-ones if out of range.
    pub fn read_u16(&self, offset: u16) -> u16 {
        self.raw(offset, 2).map_or(0xffff, |v| v as u16)
    }

    /// Raw little-endian dword (device side); all-ones if out of range.
    pub fn read_u32(&self, offset: u16) -> u32 {
        self.raw(offset, 4).unwrap_or(0xffff_ffff)
    }

    /// Sets a byte regardless of masks (device side); ignored if out of range.
    pub fn set_u8(&mut self, offset: u16, value: u8) {
        self.put(offset, 1, u32::from(value));
    }

    /// Sets a word regardless of masks (device side); ignored if out of range.
    pub fn set_u16(&mut self, offset: u16, value: u16) {
        self.put(offset, 2, u32::from(value));
    }

    /// Sets a dword regardless of masks (device side); ignored if out of range.
    pub fn set_u32(&mut self, offset: u16, value: u32) {
        self.put(offset, 4, value);
    }

    /// Sets the write mask and the RW1C mask of `width` (1, 2 or 4) bytes at `offset`. A bit
    /// should be in at most one of the masks.
    pub fn set_masks(&mut self, offset: u16, width: usize, wmask: u32, w1cmask: u32) {
        let o = usize::from(offset);
        if width > 4 || o + width > CONFIG_SPACE_SIZE {
            return;
        }
        for i in 0..width {
            self.wmask[o + i] = (wmask >> (8 * i)) as u8;
            self.w1cmask[o + i] = (w1cmask >> (8 * i)) as u8;
        }
    }

    /// Write mask of the dword at `offset` (4-byte aligned); 0 if out of range.
    pub fn wmask_u32(&self, offset: u16) -> u32 {
        Self::get(&self.wmask, offset, 4).unwrap_or(0)
    }

    /// RW1C mask of the dword at `offset`; 0 if out of range.
    pub fn w1cmask_u32(&self, offset: u16) -> u32 {
        Self::get(&self.w1cmask, offset, 4).unwrap_or(0)
    }

    /// Command register.
    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// Memory Space Enable (command bit 1).
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    /// Bus Master Enable (command bit 2): the function may issue DMA and MSIs.
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & COMMAND_MASTER != 0
    }

    /// Defines a memory BAR (PCI Local Bus Spec 3.0, 6.2.5.1). `size` must be a power of two
    /// ≥ 16 (≤ 2 GiB for a 32-bit BAR); a 64-bit BAR also takes register `index + 1`.
    pub fn add_bar(
        &mut self,
        index: u8,
        size: u64,
        kind: BarKind,
        prefetchable: bool,
    ) -> Result<(), PciError> {
        let count = self.header_type.bar_count();
        let err = |reason| Err(PciError::InvalidBar { index, reason });
        let regs_needed = if kind == BarKind::Memory64 { 2 } else { 1 };
        if index >= count || index + regs_needed > count {
            return err("index out of range for this header type");
        }
        let i = usize::from(index);
        if self.bars[i] != BarSlot::Unused
            || (regs_needed == 2 && self.bars[i + 1] != BarSlot::Unused)
        {
            return err("BAR register already in use");
        }
        if !size.is_power_of_two() || size < 16 {
            return err("size must be a power of two of at least 16 bytes");
        }
        if kind == BarKind::Memory32 && size > 1 << 31 {
            return err("32-bit BAR larger than 2 GiB");
        }
        if size > 1 << 63 {
            return err("BAR larger than 2^63 bytes");
        }
        let mask = !(size - 1);
        let mut flags = 0u32;
        if kind == BarKind::Memory64 {
            flags |= 0b100;
        }
        if prefetchable {
            flags |= 0b1000;
        }
        let off = BAR0 + 4 * u16::from(index);
        self.set_u32(off, flags);
        self.set_masks(off, 4, (mask as u32) & 0xffff_fff0, 0);
        if kind == BarKind::Memory64 {
            self.set_u32(off + 4, 0);
            self.set_masks(off + 4, 4, (mask >> 32) as u32, 0);
            self.bars[i + 1] = BarSlot::Upper;
        }
        self.bars[i] = BarSlot::Lower {
            size,
            kind,
            prefetchable,
        };
        Ok(())
    }

    /// The implemented BAR at `index` (the lower register of a 64-bit BAR) with its current
    /// address.
    pub fn bar(&self, index: u8) -> Option<BarInfo> {
        let BarSlot::Lower {
            size,
            kind,
            prefetchable,
        } = *self.bars.get(usize::from(index))?
        else {
            return None;
        };
        let off = BAR0 + 4 * u16::from(index);
        let mut address = u64::from(self.read_u32(off) & 0xffff_fff0);
        if kind == BarKind::Memory64 {
            address |= u64::from(self.read_u32(off + 4)) << 32;
        }
        Some(BarInfo {
            index,
            address,
            size,
            kind,
            prefetchable,
        })
    }

    /// All implemented BARs.
    pub fn bars(&self) -> Vec<BarInfo> {
        (0..self.header_type.bar_count())
            .filter_map(|i| self.bar(i))
            .collect()
    }

    /// Programs a BAR's address as firmware would (through the BAR's write masks, so the
    /// address is truncated to the BAR's alignment). No-op for unimplemented BARs.
    pub fn set_bar_address(&mut self, index: u8, address: u64) {
        let Some(bar) = self.bar(index) else {
            return;
        };
        let off = BAR0 + 4 * u16::from(index);
        self.write(off, &(address as u32).to_le_bytes());
        if bar.kind == BarKind::Memory64 {
            self.write(off + 4, &((address >> 32) as u32).to_le_bytes());
        }
    }

    /// Appends a standard capability to the list at 0x34 (PCI Local Bus Spec 3.0, 6.7) and sets
    /// Status bit 4. Returns its offset.
    pub fn add_capability(&mut self, cap: &Capability) -> Result<u8, PciError> {
        let len = cap.len().max(2);
        let off = self.cap_end;
        let end = usize::from(off) + len.next_multiple_of(4);
        if end > LEGACY_CONFIG_SPACE_SIZE {
            return Err(PciError::CapabilitySpaceFull { len });
        }
        self.place(off, cap.bytes(), cap.wmask(), cap.w1cmask());
        self.set_u8(off, cap.id());
        self.set_u8(off + 1, 0);
        self.set_masks(off, 2, 0, 0);
        if self.last_cap == 0 {
            self.set_u8(CAPABILITY_LIST, off as u8);
            let status = self.read_u16(STATUS) | STATUS_CAP_LIST;
            self.set_u16(STATUS, status);
        } else {
            self.set_u8(self.last_cap + 1, off as u8);
        }
        self.last_cap = off;
        self.cap_end = end as u16;
        Ok(off as u8)
    }

    /// Appends an extended capability to the list at 0x100 (PCIe Base Spec r6.0, 7.6.3).
    /// Returns its offset.
    pub fn add_ext_capability(&mut self, cap: &ExtendedCapability) -> Result<u16, PciError> {
        let len = cap.len().max(4);
        let off = self.ext_end;
        let end = usize::from(off) + len.next_multiple_of(4);
        if end > CONFIG_SPACE_SIZE {
            return Err(PciError::CapabilitySpaceFull { len });
        }
        self.place(off, cap.bytes(), cap.wmask(), cap.w1cmask());
        self.set_u32(
            off,
            u32::from(cap.id()) | (u32::from(cap.version() & 0xf) << 16),
        );
        self.set_masks(off, 4, 0, 0);
        if self.last_ext_cap != 0 {
            let prev = self.read_u32(self.last_ext_cap);
            self.set_u32(
                self.last_ext_cap,
                (prev & 0x000f_ffff) | (u32::from(off) << 20),
            );
        }
        self.last_ext_cap = off;
        self.ext_end = end as u16;
        Ok(off)
    }

    fn place(&mut self, off: u16, bytes: &[u8], wmask: &[u8], w1c: &[u8]) {
        let o = usize::from(off);
        let n = bytes.len();
        if o + n > CONFIG_SPACE_SIZE {
            return;
        }
        self.regs[o..o + n].copy_from_slice(bytes);
        self.wmask[o..o + n].copy_from_slice(&wmask[..n]);
        self.w1cmask[o..o + n].copy_from_slice(&w1c[..n]);
        // A bit is either RW or RW1C, never both.
        for i in o..o + n {
            self.wmask[i] &= !self.w1cmask[i];
        }
    }

    fn raw(&self, offset: u16, width: usize) -> Option<u32> {
        Self::get(&self.regs, offset, width)
    }

    fn get(arr: &[u8; CONFIG_SPACE_SIZE], offset: u16, width: usize) -> Option<u32> {
        let o = usize::from(offset);
        let bytes = arr.get(o..o.checked_add(width)?)?;
        Some(
            bytes
                .iter()
                .rev()
                .fold(0u32, |acc, b| (acc << 8) | u32::from(*b)),
        )
    }

    fn put(&mut self, offset: u16, width: usize, value: u32) {
        let o = usize::from(offset);
        if o + width > CONFIG_SPACE_SIZE {
            return;
        }
        for i in 0..width {
            self.regs[o + i] = (value >> (8 * i)) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor_id: 0x1234,
            device_id: 0x5678,
            revision_id: 2,
            class_code: 0x05_02_10,
            subsystem_vendor_id: 0xaaaa,
            subsystem_id: 0xbbbb,
        }
    }

    fn rd32(c: &ConfigSpace, off: u16) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr32(c: &mut ConfigSpace, off: u16, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn header_fields_are_read_only() {
        let mut c = ConfigSpace::new(HeaderType::Type0, ids());
        assert_eq!(rd32(&c, 0), 0x5678_1234);
        assert_eq!(rd32(&c, 8), 0x0502_1002);
        assert_eq!(rd32(&c, 0x2c), 0xbbbb_aaaa);
        wr32(&mut c, 0, 0xffff_ffff);
        wr32(&mut c, 8, 0xffff_ffff);
        wr32(&mut c, 0x2c, 0);
        assert_eq!(rd32(&c, 0), 0x5678_1234);
        assert_eq!(rd32(&c, 8), 0x0502_1002);
        assert_eq!(rd32(&c, 0x2c), 0xbbbb_aaaa);
        // Header type, BIST, latency timer read-only; cache line size writable.
        wr32(&mut c, 0x0c, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x0c), 0x0000_00ff);
        // Interrupt pin stays 0 (no INTx), line is scratch.
        wr32(&mut c, 0x3c, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x3c), 0x0000_00ff);
        // Expansion ROM not implemented.
        wr32(&mut c, ROM_ADDRESS, 0xffff_ffff);
        assert_eq!(rd32(&c, ROM_ADDRESS), 0);
    }

    #[test]
    fn command_mask_and_status_rw1c() {
        let mut c = ConfigSpace::new(HeaderType::Type0, ids());
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(
            c.command(),
            COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR | COMMAND_INTX_DISABLE
        );
        assert!(c.memory_enabled() && c.bus_master_enabled());
        // Device sets some error bits plus the (RO) capability bit.
        c.set_u16(STATUS, 0xf910 | 0x0008);
        // Writing zero changes nothing; writing 1 clears only the RW1C bit written.
        c.write(STATUS, &[0, 0]);
        assert_eq!(c.read_u16(STATUS), 0xf918);
        c.write(STATUS, &0x2000u16.to_le_bytes());
        assert_eq!(c.read_u16(STATUS), 0xd918);
        c.write(STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(STATUS), 0x0018);
        // A dword write to COMMAND touches status through RW1C only.
        c.set_u16(STATUS, 0x8010);
        wr32(&mut c, COMMAND, 0x8000_0000);
        assert_eq!(c.command(), 0);
        assert_eq!(c.read_u16(STATUS), 0x0010);
    }

    #[test]
    fn malformed_accesses_are_safe() {
        let mut c = ConfigSpace::new(HeaderType::Type0, ids());
        let mut b = [0u8; 4];
        c.read(4095, &mut b);
        assert_eq!(b, [0xff; 4]);
        let mut b2 = [0u8; 2];
        c.read(3, &mut b2); // crosses a dword
        assert_eq!(b2, [0xff; 2]);
        let mut b8 = [0u8; 8];
        c.read(0, &mut b8);
        assert_eq!(b8, [0xff; 8]);
        c.read(u16::MAX, &mut b);
        assert_eq!(b, [0xff; 4]);
        c.read(0, &mut []);
        // Unaligned-but-inside-a-dword is what byte enables express: allowed.
        let mut w = [0u8; 2];
        c.read(1, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x7812);
        // Malformed writes are dropped.
        c.write(3, &[0xff, 0xff]);
        c.write(4094, &[0xff; 4]);
        c.write(u16::MAX, &[0xff]);
        c.write(COMMAND, &[0xff; 8]);
        assert_eq!(c.command(), 0);
        // Raw accessors never panic either.
        assert_eq!(c.read_u32(4094), 0xffff_ffff);
        c.set_u32(4094, 0);
        c.set_masks(4095, 4, 0xffff_ffff, 0);
    }

    #[test]
    fn bar_sizing_32_and_64_bit() {
        let mut c = ConfigSpace::new(HeaderType::Type0, ids());
        c.add_bar(0, 0x1000, BarKind::Memory32, false).unwrap();
        c.add_bar(2, 0x4_0000_0000, BarKind::Memory64, true)
            .unwrap();
        c.add_bar(4, 0x10, BarKind::Memory64, false).unwrap();

        // 32-bit: all-ones → size mask with flags in the low nibble.
        wr32(&mut c, 0x10, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x10), 0xffff_f000);
        wr32(&mut c, 0x10, 0xc000_1234);
        assert_eq!(rd32(&c, 0x10), 0xc000_1000);

        // 64-bit prefetchable, 16 GiB: low dword has no writable address bits.
        assert_eq!(rd32(&c, 0x18), 0x0000_000c);
        wr32(&mut c, 0x18, 0xffff_ffff);
        wr32(&mut c, 0x1c, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x18), 0x0000_000c);
        assert_eq!(rd32(&c, 0x1c), 0xffff_fffc);
        let size = !((u64::from(rd32(&c, 0x1c)) << 32) | u64::from(rd32(&c, 0x18) & !0xf)) + 1;
        assert_eq!(size, 0x4_0000_0000);
        wr32(&mut c, 0x18, 0);
        wr32(&mut c, 0x1c, 0x100);
        let bar = c.bar(2).unwrap();
        assert_eq!(bar.address, 0x100_0000_0000);
        assert_eq!(bar.kind, BarKind::Memory64);
        assert!(bar.prefetchable);

        // Tiny 64-bit BAR.
        wr32(&mut c, 0x20, 0xffff_ffff);
        wr32(&mut c, 0x24, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x20), 0xffff_fff4);
        assert_eq!(rd32(&c, 0x24), 0xffff_ffff);

        // Unimplemented BAR registers read 0 and stay 0 (BAR 1 here).
        wr32(&mut c, 0x14, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x14), 0);
        assert_eq!(c.bars().len(), 3);
        assert!(c.bar(3).is_none());
        assert!(c.bar(9).is_none());

        c.set_bar_address(0, 0xd000_0fff);
        assert_eq!(c.bar(0).unwrap().address, 0xd000_0000);
    }

    #[test]
    fn bar_definition_validation() {
        let mut c = ConfigSpace::new(HeaderType::Type1, ids());
        assert!(c.add_bar(1, 0x1000, BarKind::Memory64, false).is_err());
        assert!(c.add_bar(2, 0x1000, BarKind::Memory32, false).is_err());
        assert!(c.add_bar(0, 0x1800, BarKind::Memory32, false).is_err());
        assert!(c.add_bar(0, 8, BarKind::Memory32, false).is_err());
        assert!(c.add_bar(0, 1 << 32, BarKind::Memory32, false).is_err());
        c.add_bar(0, 0x1000, BarKind::Memory64, false).unwrap();
        assert!(c.add_bar(1, 0x1000, BarKind::Memory32, false).is_err());
        assert!(c.add_bar(0, 0x1000, BarKind::Memory32, false).is_err());
    }

    #[test]
    fn type1_bridge_registers() {
        let mut c = ConfigSpace::new(HeaderType::Type1, ids());
        assert_eq!(c.read_u8(HEADER_TYPE), 1);
        wr32(&mut c, PRIMARY_BUS, 0xffff_ffff);
        // Primary/secondary/subordinate writable, secondary latency timer RO 0.
        assert_eq!(rd32(&c, PRIMARY_BUS), 0x00ff_ffff);
        // No I/O window: I/O base/limit RO 0; secondary status RW1C.
        c.set_u16(SECONDARY_STATUS, 0x2000);
        wr32(&mut c, IO_BASE, 0xffff_ffff);
        assert_eq!(rd32(&c, IO_BASE), 0);
        // Memory window 1 MiB granular.
        wr32(&mut c, MEMORY_BASE, 0xffff_ffff);
        assert_eq!(rd32(&c, MEMORY_BASE), 0xfff0_fff0);
        // Prefetchable: 64-bit flag in the low nibble stays.
        wr32(&mut c, PREF_MEMORY_BASE, 0);
        assert_eq!(rd32(&c, PREF_MEMORY_BASE), 0x0001_0001);
        wr32(&mut c, PREF_BASE_UPPER32, 0x1234_5678);
        assert_eq!(rd32(&c, PREF_BASE_UPPER32), 0x1234_5678);
        // Bridge control: only the defined RW bits stick.
        c.write(BRIDGE_CONTROL, &[0xff, 0xff]);
        assert_eq!(c.read_u16(BRIDGE_CONTROL), BRIDGE_CONTROL_RW);
        // Type 1 ROM BAR RO 0.
        wr32(&mut c, ROM_ADDRESS1, 0xffff_ffff);
        assert_eq!(rd32(&c, ROM_ADDRESS1), 0);
    }
}
