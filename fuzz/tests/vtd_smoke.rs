//! Stable smoke run of the VT-d register harness: pseudo-random inputs (the same code libFuzzer
//! drives) plus a Linux-like bring-up, so a panic or a broken invariant fails `cargo test` here.

#[test]
fn vtd_registers_survive_random_accesses() {
    let mut next = vmm_fuzz::xorshift(0x2545_f491_4f6c_dd1du64);
    for _ in 0..2000 {
        let len = (next() % 1024) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Steer a third of the offsets into the registers Linux uses.
        for op in data.get_mut(1..).unwrap_or_default().chunks_mut(12) {
            if op.len() == 12 && op[0] % 3 == 0 {
                op[1] &= 0xfc;
                op[2] = 0;
            }
        }
        vmm_fuzz::vtd::run_registers(&data);
    }
}

/// A hand-made bring-up: root table, queued invalidation, translation on, a fault, its clearing.
#[test]
fn vtd_registers_linux_bring_up() {
    let mut data = vec![0b0100_0001]; // scalable, 48-bit, 8 fault records
    let mut op = |kind: u8, width: u8, off: u16, value: u64, extra: u8| {
        data.push(kind | (width << 4));
        data.extend_from_slice(&off.to_le_bytes());
        data.extend_from_slice(&value.to_le_bytes());
        data.push(extra);
    };
    let w8 = vmm_fuzz::width_byte(8);
    let w4 = vmm_fuzz::width_byte(4);
    op(1, w8, 0x20, 0x1000_0000 | (1 << 10), 0); // RTADDR, scalable
    op(1, w4, 0x18, 1 << 30, 0); // SRTP
    op(1, w8, 0x90, 0x2000_0000 | (1 << 11), 0); // IQA, 256-bit descriptors
    op(1, w4, 0x18, 1 << 26, 0); // QIE
    op(1, w8, 0x88, 2 << 5, 0); // IQT
    op(2, 0, 0, 2, 3); // the unit processed two descriptors
    op(1, w4, 0x18, (1 << 26) | (1 << 31), 0); // TE
    op(1, w4, 0x38, 0, 0); // unmask fault events
    op(2, 0, 0, 0x0008_dead_b000, 0); // a fault
    op(1, w4, 0x200 + 12, 1 << 31, 0); // clear F
    op(1, w4, 0x34, 0x7f, 0); // clear FSTS
    vmm_fuzz::vtd::run_registers(&data);
}

#[test]
fn vtd_queue_survives_random_descriptor_streams() {
    let mut next = vmm_fuzz::xorshift(0x9e37_79b9_7f4a_7c15u64);
    for _ in 0..500 {
        let len = (next() % 4096) as usize;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        vmm_fuzz::vtd::run_queue(&data);
    }
}

#[test]
fn vtd_page_requests_survive_random_streams() {
    let mut next = vmm_fuzz::xorshift(0x1234_5678_9abc_def1u64);
    for _ in 0..2000 {
        let len = (next() % 2048) as usize;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        vmm_fuzz::vtd::run_page_requests(&data);
    }
    // A stream of well-formed requests from the device, then responses to them.
    let mut data = Vec::new();
    for group in 0..200u8 {
        let mut op = [0u8; 16];
        op[4] = 0x13; // read, write, last in group
        op[5] = 5; // PASID 5
        op[7] = group;
        op[8..16].copy_from_slice(&(0x7000_0000u64 + u64::from(group) * 4096).to_le_bytes());
        data.extend_from_slice(&op);
    }
    for group in 0..200u8 {
        let mut op = [2u8; 16];
        let qw0: u64 = (1 << 4) | (0x10 << 16) | (5 << 32);
        op[1..9].copy_from_slice(&qw0.to_le_bytes());
        op[8..16].copy_from_slice(&(u64::from(group) << 3).to_le_bytes());
        op[0] = 2;
        data.extend_from_slice(&op);
    }
    vmm_fuzz::vtd::run_page_requests(&data);
}
