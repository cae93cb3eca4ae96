//! Stable smoke run of the vmxnet3 harness: pseudo-random inputs (the same code libFuzzer
//! drives), some from an activated device, plus a driver-like sequence, so a panic or a broken
//! invariant fails `cargo test` here.

use devices::vmxnet3::registers as reg;
use vmm_fuzz::vmxnet3::{TX_RING, run, run_counted};

fn op(data: &mut Vec<u8>, kind: u8, width: usize, offset: u16, value: u64, extra: u8) {
    data.push(kind | (vmm_fuzz::width_byte(width) << 4));
    data.extend_from_slice(&offset.to_le_bytes());
    data.extend_from_slice(&value.to_le_bytes());
    data.push(extra);
}

#[test]
fn vmxnet3_survives_random_accesses() {
    let mut next = vmm_fuzz::xorshift(0x2545_f491_4f6c_dd1d);
    for i in 0..3000 {
        let len = (next() % 1024) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if let Some(setup) = data.first_mut() {
            // Two thirds start from an activated device.
            if i % 3 != 0 {
                *setup |= 2;
            }
        }
        // Steer a third of the memory stores into the rings and the shared area.
        for op in data.get_mut(1..).unwrap_or_default().chunks_mut(12) {
            if op.len() == 12 && op[0] & 7 == 4 && op[1] % 3 == 0 {
                op[2] = 0;
                op[1] = (op[1] & 0x7f) | 0x40;
            }
        }
        run(&data);
    }
}

/// An activated device: Tx descriptors with a bad chain, a good packet, doorbells on every
/// queue index, frames for us and for others, a link flap, a reset and a re-activation.
#[test]
fn vmxnet3_driver_like_sequence() {
    let mut data = vec![2u8];
    // Tx descriptor 0: 64 bytes at 0x20000, gen 1, EOP|CQ.
    let at = (TX_RING / 16) as u16;
    op(&mut data, 4, 8, at, 0x20000, 0);
    op(
        &mut data,
        4,
        8,
        at,
        u64::from(64u32 | 1 << 14) | u64::from(3u32 << 12) << 32,
        8,
    );
    op(&mut data, 1, 4, 0x600, 1, 0); // TXPROD
    // Descriptor 1: SOP without EOP, descriptor 2 stale: NOEOP.
    op(&mut data, 4, 8, at + 1, 0x20000, 0);
    op(&mut data, 4, 8, at + 1, u64::from(64u32 | 1 << 14), 8);
    op(&mut data, 7, 4, 0, 0, 0);
    for q in 0..9 {
        op(&mut data, 7, 4, 0, 0, q);
    }
    op(&mut data, 5, 4, 0, 1500, 1); // a frame for us
    op(&mut data, 5, 4, 0, 60, 0); // for someone else
    op(&mut data, 5, 4, 0, 8999, 1); // longer than the 2 KiB head buffer, no ring 1
    op(&mut data, 6, 4, 0, 0, 0); // link down
    op(&mut data, 6, 4, 0, 0, 1); // link up
    op(&mut data, 2, 4, reg::ECR as u16, 0xffff_ffff, 0);
    op(
        &mut data,
        2,
        4,
        reg::CMD as u16,
        u64::from(reg::cmd::GET_QUEUE_STATUS),
        0,
    );
    op(
        &mut data,
        2,
        4,
        reg::CMD as u16,
        u64::from(reg::cmd::GET_STATS),
        0,
    );
    op(
        &mut data,
        2,
        4,
        reg::CMD as u16,
        u64::from(reg::cmd::RESET_DEV),
        0,
    );
    op(
        &mut data,
        2,
        4,
        reg::CMD as u16,
        u64::from(reg::cmd::ACTIVATE_DEV),
        0,
    );
    op(&mut data, 5, 4, 0, 100, 1);
    let (counters, sent) = run_counted(&data);
    assert_eq!(sent, 1, "the one good packet went out");
    assert_eq!(counters.tx_dropped, 1, "the chain without EOP");
    assert_eq!(counters.rx_frames, 2, "{counters:?}");
    assert_eq!(counters.rx_filtered, 1, "{counters:?}");
}
