//! vmxnet3 harness: arbitrary guest accesses to an emulated vmxnet3 function (BAR 0 doorbells
//! and interrupt masks, BAR 1 commands and addresses, BAR 2 MSI-X, config space) interleaved
//! with guest-memory stores (driver-shared area, queue descriptors, ring descriptors, buffers)
//! and frames arriving from the wire, against `devices::vmxnet3::Vmxnet3Function` over 1 MiB of
//! guest memory, with DMA untranslated or through a translator that faults on the upper half.
//!
//! Input: byte 0 picks the setup (bit 0 the faulting translator; bit 1 a valid driver-shared
//! area planted and activated first, as `vmxnet3_activate_dev()` leaves it, so the ops start
//! from a running device). Then operations of 12 bytes: kind (bits 2:0: read a BAR, write
//! BAR 0, write BAR 1, write config, store to guest memory, receive a frame, set the link,
//! ring a Tx doorbell; bits 7:4 the width byte, see `crate::width`), offset (2 bytes), value
//! (8 bytes), extra (1 byte).
//!
//! Invariants: no panic; every frame the device puts on the wire is at most
//! `MAX_PACKET` bytes and at least an Ethernet header; the counters never go backwards.

use std::sync::{Arc, Mutex};

use devices::pci::PciDevice;
use devices::vmxnet3::layout::{
    IntrConf, MiscConf, QUEUE_DESC_CONF, REV1_MAGIC, RxDesc, RxQueueConf, SHARED_DEV_READ,
    SHARED_INTR_CONF, SHARED_RX_FILTER, TxQueueConf,
};
use devices::vmxnet3::{FrameSink, MAX_PACKET, NicCounters, Vmxnet3Function, registers as reg};
use iommu::{
    DmaError, DmaRequest, DmaSpace, DmaTranslator, IdentityTranslator, NullMsiSink, RequesterId,
    Translation,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use zerocopy::IntoBytes;

use crate::MAX_OPS;

/// Guest memory size.
pub const MEMORY: u64 = 0x10_0000;
/// Where the planted driver-shared area lives.
pub const SHARED: u64 = 0x1000;
/// Planted queue descriptors (one Tx, one Rx).
pub const QDESC: u64 = 0x2000;
/// Planted Tx ring (32 descriptors).
pub const TX_RING: u64 = 0x4000;
/// Planted Tx completion ring.
pub const TX_COMP: u64 = 0x5000;
/// Planted Rx ring 0 (32 head buffers of 2 KiB from `RX_BUFS`).
pub const RX_RING: u64 = 0x6000;
/// Planted Rx completion ring.
pub const RX_COMP: u64 = 0x7000;
/// Rx buffers.
pub const RX_BUFS: u64 = 0x10000;

/// The station address.
pub const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

/// Faults above half of guest memory.
struct UpperHalfFaults;

impl DmaTranslator for UpperHalfFaults {
    fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError> {
        if request.address >= MEMORY / 2 {
            return Err(DmaError::TranslationFault {
                requester_id: request.requester_id,
                iova: request.address,
                access: request.access,
                reason: "harness: unmapped".into(),
            });
        }
        IdentityTranslator.translate(request)
    }
}

/// Checks every frame the device transmits.
#[derive(Default)]
struct CheckedWire(Mutex<u64>);

impl FrameSink for CheckedWire {
    fn send_frame(&self, frame: &[u8]) {
        assert!(frame.len() <= MAX_PACKET, "frame of {} bytes", frame.len());
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }
}

/// Plants what `vmxnet3_activate_dev()` leaves in guest memory: the driver-shared area, one Tx
/// and one Rx queue with 32-entry rings, ring 0 full of 2 KiB head buffers.
pub fn plant_driver_state(mem: &GuestMemoryMmap) {
    let put = |at: u64, b: &[u8]| mem.write_slice(b, GuestAddress(at)).expect("harness store");
    put(SHARED, &REV1_MAGIC.to_le_bytes());
    let misc = MiscConf {
        queue_desc_pa: QDESC,
        queue_desc_len: 512,
        mtu: 1500,
        num_tx_queues: 1,
        num_rx_queues: 1,
        ..Default::default()
    };
    put(SHARED + SHARED_DEV_READ, misc.as_bytes());
    let intr = IntrConf {
        auto_mask: 0,
        num_intrs: 2,
        event_intr_idx: 1,
        mod_levels: [0; 25],
        intr_ctrl: 0,
        reserved: [0; 2],
    };
    put(SHARED + SHARED_INTR_CONF, intr.as_bytes());
    put(SHARED + SHARED_RX_FILTER, &0x07u32.to_le_bytes());
    let tx = TxQueueConf {
        tx_ring_base_pa: TX_RING,
        comp_ring_base_pa: TX_COMP,
        tx_ring_size: 32,
        data_ring_size: 32,
        comp_ring_size: 32,
        ..Default::default()
    };
    put(QDESC + QUEUE_DESC_CONF, tx.as_bytes());
    let rx = RxQueueConf {
        rx_ring_base_pa: [RX_RING, 0],
        comp_ring_base_pa: RX_COMP,
        rx_ring_size: [32, 0],
        comp_ring_size: 32,
        ..Default::default()
    };
    put(QDESC + 256 + QUEUE_DESC_CONF, rx.as_bytes());
    for i in 0..32u64 {
        let d = RxDesc {
            addr: RX_BUFS + i * 0x800,
            dword2: 2048 | 1 << 31,
            ext1: 0,
        };
        put(RX_RING + i * 16, d.as_bytes());
    }
}

fn monotonic(before: &NicCounters, after: &NicCounters) -> bool {
    let a = [
        before.tx_frames,
        before.tx_bytes,
        before.tx_dropped,
        before.rx_frames,
        before.rx_bytes,
        before.rx_no_buffer,
        before.rx_filtered,
        before.rx_not_ready,
        before.rx_malformed,
    ];
    let b = [
        after.tx_frames,
        after.tx_bytes,
        after.tx_dropped,
        after.rx_frames,
        after.rx_bytes,
        after.rx_no_buffer,
        after.rx_filtered,
        after.rx_not_ready,
        after.rx_malformed,
    ];
    a.iter().zip(b.iter()).all(|(x, y)| x <= y)
}

/// Fuzz target `vmxnet3`.
pub fn run(data: &[u8]) {
    run_counted(data);
}

/// [`run`], returning the function's counters and the frames that reached the wire (for the
/// smoke tests to check a sequence did what it meant to).
pub fn run_counted(data: &[u8]) -> (NicCounters, u64) {
    let Some((&setup, mut ops)) = data.split_first() else {
        return (NicCounters::default(), 0);
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)])
        .expect("harness memory");
    let translator: Arc<dyn DmaTranslator> = if setup & 1 != 0 {
        Arc::new(UpperHalfFaults)
    } else {
        Arc::new(IdentityTranslator)
    };
    let dma = DmaSpace::with_translator(
        RequesterId::new(0, 8, 0),
        GuestMemoryAtomic::new(mem.clone()),
        translator,
    );
    let wire = Arc::new(CheckedWire::default());
    let mut f = Vmxnet3Function::new(MAC, dma, Arc::new(NullMsiSink), wire.clone())
        .expect("harness function");
    if setup & 2 != 0 {
        f.config_write(0x04, &0x0006u16.to_le_bytes());
        plant_driver_state(&mem);
        f.bar_write(1, reg::DSAL, &(SHARED as u32).to_le_bytes());
        f.bar_write(1, reg::CMD, &reg::cmd::ACTIVATE_DEV.to_le_bytes());
    }
    let mut steps = 0;
    let mut frame = Vec::new();
    while ops.len() >= 12 && steps < MAX_OPS {
        let (op, rest) = ops.split_at(12);
        ops = rest;
        steps += 1;
        let width = crate::width(op[0] >> 4);
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let value = u64::from_le_bytes(op[3..11].try_into().expect("8 bytes"));
        let extra = op[11];
        let bytes = crate::data_bytes(value, width);
        let before = f.counters();
        match op[0] & 7 {
            0 => {
                let mut buf = vec![0u8; width];
                f.bar_read(extra % 4, offset % 0x2100, &mut buf);
            }
            1 => f.bar_write(0, offset % 0x1000, &bytes),
            2 => f.bar_write(1, offset % 0x100, &bytes),
            3 => f.config_write((offset % 0x1000) as u16, &bytes),
            4 => {
                let at = (offset * 16 + u64::from(extra & 8)) % MEMORY;
                let _ = mem.write_slice(&value.to_le_bytes(), GuestAddress(at));
            }
            5 => {
                let len = (value % 9000) as usize;
                frame.clear();
                frame.extend((0..len).map(|i| (value >> (i % 8)) as u8 ^ i as u8));
                if extra & 1 != 0 && len >= 6 {
                    frame[..6].copy_from_slice(&MAC);
                }
                f.receive_frame(&frame);
            }
            6 => f.set_link(extra & 1 != 0),
            _ => f.process_tx(usize::from(extra % 9)),
        }
        assert!(
            monotonic(&before, &f.counters()),
            "a counter went backwards"
        );
    }
    let sent = *wire.0.lock().unwrap_or_else(|e| e.into_inner());
    (f.counters(), sent)
}
