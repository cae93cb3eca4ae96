//! Stable smoke run of the SVA engine harness: pseudo-random inputs (the same code libFuzzer
//! drives) plus a driver-like sequence, so a panic, a hang or a broken invariant fails
//! `cargo test` here.

fn op(data: &mut Vec<u8>, kind: u8, width: usize, offset: u16, value: u64, extra: u8) {
    data.push(kind | (vmm_fuzz::width_byte(width) << 4));
    data.extend_from_slice(&offset.to_le_bytes());
    data.extend_from_slice(&value.to_le_bytes());
    data.push(extra);
}

#[test]
fn sva_engine_survives_random_accesses() {
    let mut next = vmm_fuzz::xorshift(0x5356_4145_1234_9876u64);
    for _ in 0..400 {
        let len = (next() % 1024) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Steer half of the register accesses into the register block, 64-bit wide.
        for op in data.get_mut(1..).unwrap_or_default().chunks_mut(12) {
            if op.len() == 12 && op[0] % 2 == 1 {
                op[0] = (op[0] & 0x0f) | (vmm_fuzz::width_byte(8) << 4);
                op[1] &= 0x78;
                op[2] = 0;
            }
        }
        vmm_fuzz::sva_engine::run(&data);
    }
}

/// A ring in guest memory, descriptors of every opcode (some into the denied half, one with a
/// reserved field), the doorbell, stray page responses and invalidations, a reset.
#[test]
fn sva_engine_driver_like_sequence() {
    for setup in [0b111u8, 0b110, 0b101, 0b100] {
        let mut data = vec![setup];
        let ring = 0x1000u64;
        let desc = |data: &mut Vec<u8>, slot: u64, words: [u64; 8]| {
            for (i, w) in words.iter().enumerate() {
                let at = ring + slot * 64 + 8 * i as u64;
                op(data, 3, 8, (at / 16) as u16, *w, (at & 8) as u8);
            }
        };
        // COPY 0x2000 -> 0x3000, 4 KiB, completion at 0x8000.
        desc(&mut data, 0, [1, 0x2000, 0x3000, 4096, 0x8000, 0, 0, 0]);
        // FILL into the denied half (page requests, refused).
        desc(
            &mut data,
            1,
            [2, 0x1122_3344, 0x9_0000, 8192, 0x8020, 0, 0, 0],
        );
        // COMPARE, then a descriptor with a reserved field (halts).
        desc(&mut data, 2, [3, 0x2000, 0x3000, 4096, 0x8040, 0, 0, 0]);
        desc(&mut data, 3, [1, 0x2000, 0x3000, 64, 0x8060, 7, 0, 0]);
        op(&mut data, 1, 8, 0x020, ring, 0); // RING_BASE
        op(&mut data, 1, 8, 0x028, 8, 0); // RING_SIZE
        op(&mut data, 1, 8, 0x010, 5, 0); // CTRL: ENABLE | INT_ENABLE
        op(&mut data, 1, 8, 0x038, 4, 0); // RING_TAIL
        op(&mut data, 3, 0, 0x1ff, 0, 0x80 | 2); // a response nothing waits for
        op(&mut data, 3, 0, 0, 0x3000, 0x80 | 1); // an invalidation
        op(&mut data, 1, 4, 0x010, 2, 0); // CTRL.RESET
        vmm_fuzz::sva_engine::run(&data);
    }
}
