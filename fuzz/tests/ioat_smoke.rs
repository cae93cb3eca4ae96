//! Stable smoke run of the I/OAT harness: pseudo-random inputs (the same code libFuzzer drives)
//! plus a driver-like sequence, so a panic or a broken invariant fails `cargo test` here.

fn op(data: &mut Vec<u8>, kind: u8, width: usize, offset: u16, value: u64, extra: u8) {
    data.push(kind | (vmm_fuzz::width_byte(width) << 4));
    data.extend_from_slice(&offset.to_le_bytes());
    data.extend_from_slice(&value.to_le_bytes());
    data.push(extra);
}

#[test]
fn ioat_survives_random_accesses() {
    let mut next = vmm_fuzz::xorshift(0x9e37_79b9_7f4a_7c15u64);
    for _ in 0..2000 {
        let len = (next() % 1024) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Steer half of the register accesses into channel 0's block.
        for op in data.get_mut(1..).unwrap_or_default().chunks_mut(12) {
            if op.len() == 12 && op[0] % 2 == 1 {
                op[1] = 0x80 | (op[1] & 0x3c);
                op[2] = 0;
            }
        }
        vmm_fuzz::ioat::run(&data);
    }
}

/// Descriptors planted in memory, a chain started, then one into the faulting half; a reset.
#[test]
fn ioat_driver_like_sequence() {
    let mut data = vec![0b1100]; // 1 channel, faulting translator, BME + MSI-X
    // Descriptor at 0x1000: copy 64 bytes 0x2000 -> 0x3000, next = itself.
    op(&mut data, 3, 8, 0x100, 64, 0); // size, ctl 0
    op(&mut data, 3, 8, 0x100, 0x2000, 8); // src
    op(&mut data, 3, 8, 0x101, 0x3000, 0); // dst
    op(&mut data, 3, 8, 0x101, 0x1000, 8); // next
    op(&mut data, 1, 1, 0x84, 0x20, 0); // reset
    op(&mut data, 1, 8, 0x90, 0x1000, 0); // CHAINADDR
    op(&mut data, 1, 2, 0x86, 100, 0); // DMACOUNT: 100 copies
    op(&mut data, 0, 8, 0x88, 0, 0); // CHANSTS
    op(&mut data, 3, 8, 0x101, 0xc_0000, 0); // dst into the faulting half
    op(&mut data, 1, 8, 0x90, 0x1000, 0);
    op(&mut data, 1, 2, 0x86, 1, 0);
    op(&mut data, 0, 4, 0xa8, 0, 0); // CHANERR
    op(&mut data, 1, 4, 0xa8, 0xffff_ffff, 0); // clear it
    op(&mut data, 1, 1, 0x84, 0x20, 0); // reset
    vmm_fuzz::ioat::run(&data);
}
