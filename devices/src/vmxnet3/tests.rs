//! The vmxnet3 function driven the way Linux's `vmxnet3` driver drives it: probe
//! (VRRS/UVRS, MAC, GET_CONF_INTR), activation through the driver-shared area, Tx rings with
//! generation bits and completions, Rx buffers and completions, interrupt masks, link events,
//! and the refusals malformed guest values earn.

use std::sync::{Arc, Mutex};

use iommu::{DmaSpace, RecordingMsiSink, RequesterId};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use zerocopy::IntoBytes;

use super::layout::*;
use super::registers as reg;
use super::*;
use crate::pci::capability::find_capability;
use crate::pci::config::{COMMAND, COMMAND_MASTER, COMMAND_MEMORY};
use crate::pci::msix::CONTROL_ENABLE;

const MEM: u64 = 0x100_0000;
const SHARED: u64 = 0x1000;
const QDESC: u64 = 0x2000;
const TX_RING: u64 = 0x10000;
const TX_DATA: u64 = 0x12000;
const TX_COMP: u64 = 0x14000;
const RX_RING0: u64 = 0x20000;
const RX_RING1: u64 = 0x22000;
const RX_COMP: u64 = 0x24000;
const BUFS: u64 = 0x100000;
const RING: u32 = 32;
const MAC: [u8; 6] = [0x00, 0x0c, 0x29, 0x12, 0x34, 0x56];
const TX_VECTOR: u8 = 0;
const EVENT_VECTOR: u8 = 1;

#[derive(Default)]
struct Wire(Mutex<Vec<Vec<u8>>>);

impl FrameSink for Wire {
    fn send_frame(&self, frame: &[u8]) {
        self.0.lock().unwrap().push(frame.to_vec());
    }
}

struct Rig {
    f: Vmxnet3Function,
    mem: GuestMemoryMmap,
    msi: Arc<RecordingMsiSink>,
    wire: Arc<Wire>,
    tx_next: u32,
    tx_gen: bool,
}

fn rig() -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let dma = DmaSpace::identity(
        RequesterId::new(0, 5, 0),
        GuestMemoryAtomic::new(mem.clone()),
    );
    let msi = Arc::new(RecordingMsiSink::new());
    let wire = Arc::new(Wire::default());
    let f = Vmxnet3Function::new(MAC, dma, msi.clone(), wire.clone()).unwrap();
    Rig {
        f,
        mem,
        msi,
        wire,
        tx_next: 0,
        tx_gen: true,
    }
}

impl Rig {
    fn w(&mut self, bar: u8, off: u64, v: u32) {
        self.f.bar_write(bar, off, &v.to_le_bytes());
    }
    fn r(&mut self, bar: u8, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.f.bar_read(bar, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn cmd(&mut self, c: u32) -> u32 {
        self.w(1, reg::CMD, c);
        self.r(1, reg::CMD)
    }
    fn put(&self, at: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
    }
    fn get(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }
    /// What `vmxnet3_probe_device()` + `vmxnet3_activate_dev()` do, with one Tx and one Rx
    /// queue, ring 0 full of 1536-byte head buffers and ring 1 of 4 KiB body buffers.
    fn bring_up(&mut self) -> u32 {
        self.f
            .config_write(COMMAND, &(COMMAND_MEMORY | COMMAND_MASTER).to_le_bytes());
        let cap = {
            let c = self.f.config();
            find_capability(&mut |o, d| c.read(o, d), 0x11).unwrap()
        };
        for v in 0..u64::from(NUM_VECTORS) {
            self.f.bar_write(2, 16 * v, &0xfee0_0000u32.to_le_bytes());
            self.f
                .bar_write(2, 16 * v + 8, &(0x40 + v as u32).to_le_bytes());
            self.f.bar_write(2, 16 * v + 12, &0u32.to_le_bytes());
        }
        self.f
            .config_write(u16::from(cap) + 2, &CONTROL_ENABLE.to_le_bytes());
        assert_eq!(self.r(1, reg::VRRS), 1);
        self.w(1, reg::VRRS, 1);
        assert_eq!(self.r(1, reg::UVRS), 1);
        self.w(1, reg::UVRS, 1);
        assert_eq!(self.cmd(reg::cmd::GET_CONF_INTR), 7);
        self.write_shared(1, 1);
        for i in 0..RING {
            let head = RxDesc {
                addr: BUFS + u64::from(i) * 0x800,
                dword2: 1536 | 1 << 31,
                ext1: 0,
            };
            self.put(RX_RING0 + u64::from(i) * 16, head.as_bytes());
            let body = RxDesc {
                addr: BUFS + 0x10_0000 + u64::from(i) * 0x1000,
                dword2: 4096 | 1 << 14 | 1 << 31,
                ext1: 0,
            };
            self.put(RX_RING1 + u64::from(i) * 16, body.as_bytes());
        }
        self.w(1, reg::DSAL, SHARED as u32);
        self.w(1, reg::DSAH, 0);
        let r = self.cmd(reg::cmd::ACTIVATE_DEV);
        // vmxnet3_enable_all_intrs()
        for v in 0..u64::from(NUM_VECTORS) {
            self.w(0, reg::IMR + 8 * v, 0);
        }
        r
    }
    fn write_shared(&mut self, ntx: u8, nrx: u8) {
        self.put(SHARED, &REV1_MAGIC.to_le_bytes());
        let misc = MiscConf {
            queue_desc_pa: QDESC,
            queue_desc_len: (u32::from(ntx) + u32::from(nrx)) * 256,
            mtu: 1500,
            num_tx_queues: ntx,
            num_rx_queues: nrx,
            ..Default::default()
        };
        self.put(SHARED + SHARED_DEV_READ, misc.as_bytes());
        let intr = IntrConf {
            auto_mask: 0,
            num_intrs: 2,
            event_intr_idx: EVENT_VECTOR,
            mod_levels: [0; 25],
            intr_ctrl: 0,
            reserved: [0; 2],
        };
        self.put(SHARED + SHARED_INTR_CONF, intr.as_bytes());
        self.put(
            SHARED + SHARED_RX_FILTER,
            &(reg::rx_mode::UCAST | reg::rx_mode::BCAST).to_le_bytes(),
        );
        let tx = TxQueueConf {
            tx_ring_base_pa: TX_RING,
            data_ring_base_pa: TX_DATA,
            comp_ring_base_pa: TX_COMP,
            tx_ring_size: RING,
            data_ring_size: RING,
            comp_ring_size: RING,
            intr_idx: TX_VECTOR,
            ..Default::default()
        };
        self.put(QDESC + QUEUE_DESC_CONF, tx.as_bytes());
        let rx = RxQueueConf {
            rx_ring_base_pa: [RX_RING0, RX_RING1],
            comp_ring_base_pa: RX_COMP,
            rx_ring_size: [RING, RING],
            comp_ring_size: 2 * RING,
            intr_idx: TX_VECTOR,
            ..Default::default()
        };
        self.put(QDESC + 256 + QUEUE_DESC_CONF, rx.as_bytes());
    }
    /// Posts one packet as `vmxnet3_map_pkt()` does: buffers as descriptors, EOP|CQ on the
    /// last, the SOP's generation flipped last; returns the EOP index.
    fn post(&mut self, buffers: &[(u64, u32)], sop_dword3: u32) -> u32 {
        let sop = self.tx_next;
        let mut eop = sop;
        for (i, (addr, len)) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let generation = if i == 0 { !self.tx_gen } else { self.tx_gen };
            let mut dword3 = if i == 0 { sop_dword3 } else { 0 };
            if last {
                dword3 |= 1 << 12 | 1 << 13;
            }
            let d = TxDesc {
                addr: *addr,
                dword2: (len & 0x3fff) | u32::from(generation) << 14,
                dword3,
            };
            self.put(TX_RING + u64::from(self.tx_next) * 16, d.as_bytes());
            eop = self.tx_next;
            self.tx_next += 1;
            if self.tx_next == RING {
                self.tx_next = 0;
                self.tx_gen = !self.tx_gen;
            }
        }
        // Flip the SOP's generation bit.
        let at = TX_RING + u64::from(sop) * 16 + 8;
        let v = u32::from_le_bytes(self.get(at, 4).try_into().unwrap()) ^ 1 << 14;
        self.put(at, &v.to_le_bytes());
        eop
    }
    fn doorbell(&mut self) {
        let next = self.tx_next;
        self.w(0, reg::TXPROD, next);
    }
}

fn frame(dst: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 9]);
    f[12..14].copy_from_slice(&[0x08, 0x06]);
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    f
}

#[test]
fn probe_reads_revision_mac_and_interrupt_configuration() {
    let mut r = rig();
    assert_eq!(r.r(1, reg::VRRS), reg::SUPPORTED_REVISIONS);
    assert_eq!(r.r(1, reg::MACL), 0x1229_0c00);
    assert_eq!(r.r(1, reg::MACH), 0x5634);
    assert_eq!(r.cmd(reg::cmd::GET_PERM_MAC_LO), 0x1229_0c00);
    assert_eq!(r.cmd(reg::cmd::GET_PERM_MAC_HI), 0x5634);
    assert_eq!(r.cmd(reg::cmd::GET_LINK), reg::LINK_UP);
    // The driver changes the station address (ndo_set_mac_address).
    r.w(1, reg::MACL, 0x4433_2202);
    r.w(1, reg::MACH, 0x6655);
    assert_eq!(r.f.mac(), [0x02, 0x22, 0x33, 0x44, 0x55, 0x66]);
    assert_eq!(r.cmd(reg::cmd::GET_PERM_MAC_LO), 0x1229_0c00);
    assert_eq!(r.cmd(0xdead_beef), u32::MAX);
}

#[test]
fn activation_reads_the_shared_area() {
    let mut r = rig();
    assert_eq!(r.bring_up(), 0);
    assert!(r.f.is_active());
}

#[test]
fn activation_refuses_bad_shared_areas() {
    type Corrupt = fn(&mut Rig);
    let cases: [(&str, Corrupt); 6] = [
        ("magic", |r| r.put(SHARED, &0u32.to_le_bytes())),
        ("queue count", |r| r.write_shared(9, 1)),
        ("ring size not a multiple of 32", |r| {
            r.put(QDESC + QUEUE_DESC_CONF + 40, &33u32.to_le_bytes())
        }),
        ("ring too large", |r| {
            r.put(QDESC + QUEUE_DESC_CONF + 40, &8192u32.to_le_bytes())
        }),
        ("vector out of range", |r| {
            r.put(QDESC + QUEUE_DESC_CONF + 56, &[30u8])
        }),
        ("queue table outside memory", |r| {
            r.put(SHARED + SHARED_DEV_READ + 32, &(MEM + 0x1000).to_le_bytes())
        }),
    ];
    for (what, corrupt) in cases {
        let mut r = rig();
        assert_eq!(r.bring_up(), 0, "{what}: baseline");
        r.cmd(reg::cmd::RESET_DEV);
        corrupt(&mut r);
        assert_eq!(r.cmd(reg::cmd::ACTIVATE_DEV), 1, "{what}");
        assert!(!r.f.is_active(), "{what}");
    }
}

#[test]
fn transmitted_packets_reach_the_wire_and_complete() {
    let mut r = rig();
    assert_eq!(r.bring_up(), 0);
    let f = frame([0xff; 6], 200);
    // Headers in the data ring entry, the rest in a second buffer (as with copy_size).
    r.put(TX_DATA, &f[..54]);
    r.put(BUFS + 0x80_0000, &f[54..]);
    r.msi.take();
    let eop = r.post(&[(TX_DATA, 54), (BUFS + 0x80_0000, 146)], 0);
    r.doorbell();
    assert_eq!(*r.wire.0.lock().unwrap(), vec![f.clone()]);
    let comp = r.get(TX_COMP, 16);
    let dword0 = u32::from_le_bytes(comp[..4].try_into().unwrap());
    let dword3 = u32::from_le_bytes(comp[12..].try_into().unwrap());
    assert_eq!(dword0 & 0xfff, eop);
    assert_eq!(dword3 >> 31, 1, "completion generation");
    assert_eq!(r.msi.take().len(), 1, "Tx completion interrupt");
    assert_eq!(r.f.counters().tx_frames, 1);
    // A second doorbell with nothing new sends nothing.
    r.doorbell();
    assert_eq!(r.wire.0.lock().unwrap().len(), 1);
}

#[test]
fn the_ring_wraps_with_the_generation_bit() {
    let mut r = rig();
    assert_eq!(r.bring_up(), 0);
    let f = frame([0xff; 6], 64);
    r.put(BUFS, &f);
    for _ in 0..(RING * 3) {
        r.post(&[(BUFS, 64)], 0);
        r.doorbell();
    }
    assert_eq!(r.wire.0.lock().unwrap().len(), (RING * 3) as usize);
}

#[test]
fn a_chain_without_eop_stops_the_queue_with_noeop() {
    let mut r = rig();
    assert_eq!(r.bring_up(), 0);
    // SOP handed over, next descriptor still the old generation.
    let d = TxDesc {
        addr: BUFS,
        dword2: 64 | 1 << 14,
        dword3: 0,
    };
    r.put(TX_RING, d.as_bytes());
    r.msi.take();
    r.w(0, reg::TXPROD, 1);
    assert!(r.wire.0.lock().unwrap().is_empty());
    // The event vector fired with TQERR, and GET_QUEUE_STATUS reports NOEOP.
    assert_eq!(r.get(SHARED + SHARED_ECR, 4), reg::ecr::TQERR.to_le_bytes());
    assert_eq!(r.msi.take().len(), 1);
    r.cmd(reg::cmd::GET_QUEUE_STATUS);
    assert_eq!(r.get(QDESC + QUEUE_DESC_STATUS, 1), [1]);
    assert_eq!(
        r.get(QDESC + QUEUE_DESC_STATUS + 4, 4),
        reg::queue_error::NOEOP.to_le_bytes()
    );
    // Acknowledging the event clears it; a reset makes the queue usable again.
    r.w(1, reg::ECR, reg::ecr::TQERR);
    assert_eq!(r.get(SHARED + SHARED_ECR, 4), [0; 4]);
}

#[test]
fn transmit_buffers_outside_guest_memory_stop_the_queue() {
    let mut r = rig();
    assert_eq!(r.bring_up(), 0);
    r.post(&[(MEM - 8, 64)], 0);
    r.doorbell();
    assert!(r.wire.0.lock().unwrap().is_empty());
    r.cmd(reg::cmd::GET_QUEUE_STATUS);
    assert_eq!(
        r.get(QDESC + QUEUE_DESC_STATUS + 4, 4),
        reg::queue_error::TXD_INVALID.to_le_bytes()
    );
}

#[test]
fn checksum_offload_is_applied_on_transmit() {
    let mut r = rig();
    assert_eq!(r.bring_up(), 0);
    // A UDP/IPv4 packet: csum start 34, checksum at 34 + 6.
    let mut f = frame([0xff; 6], 80);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[40..42].fill(0);
    r.put(BUFS, &f);
    let om_csum = u32::from(offload_mode::CSUM) << 10 | 34;
    // msscof (bits 31:18 of dword2) = 40: pass it through the descriptor directly.
    let eop = r.post(&[(BUFS, 80)], om_csum);
    let at = TX_RING + u64::from(eop) * 16 + 8;
    let v = u32::from_le_bytes(r.get(at, 4).try_into().unwrap()) | 40 << 18;
    r.put(at, &v.to_le_bytes());
    r.doorbell();
    let sent = r.wire.0.lock().unwrap()[0].clone();
    assert_ne!(sent[40..42], [0, 0], "checksum inserted");
    assert_eq!(sent[..40], f[..40]);
}

#[test]
fn received_frames_fill_head_then_body_buffers() {
    let mut r = rig();
    assert_eq!(r.bring_up(), 0);
    r.msi.take();
    let small = frame(MAC, 100);
    r.f.receive_frame(&small);
    assert_eq!(r.get(BUFS, 100), small);
    let c = r.get(RX_COMP, 16);
    let dword0 = u32::from_le_bytes(c[..4].try_into().unwrap());
    assert_eq!(dword0 & 0xfff, 0, "rxdIdx");
    assert_eq!(dword0 >> 14 & 3, 3, "sop and eop");
    assert_eq!(dword0 >> 16 & 0x3ff, 0, "ring 0");
    assert_eq!(
        u32::from_le_bytes(c[8..12].try_into().unwrap()) & 0x3fff,
        100
    );
    assert_eq!(u32::from_le_bytes(c[12..].try_into().unwrap()) >> 31, 1);
    assert_eq!(r.msi.take().len(), 1);
    // A jumbo frame: 1536 bytes in the next head buffer, the rest in ring 1.
    let big = frame(MAC, 4000);
    r.f.receive_frame(&big);
    assert_eq!(r.get(BUFS + 0x800, 1536), big[..1536]);
    assert_eq!(r.get(BUFS + 0x10_0000, 4000 - 1536), big[1536..]);
    let head = r.get(RX_COMP + 16, 16);
    let body = r.get(RX_COMP + 32, 16);
    let h0 = u32::from_le_bytes(head[..4].try_into().unwrap());
    let b0 = u32::from_le_bytes(body[..4].try_into().unwrap());
    assert_eq!(h0 >> 14 & 3, 2, "head: sop only");
    assert_eq!(b0 >> 14 & 3, 1, "body: eop only");
    assert_eq!(
        b0 >> 16 & 0x3ff,
        1,
        "body on ring 1 (rqID = qid + num_rx_queues)"
    );
    assert_eq!(r.f.counters().rx_frames, 2);
}

#[test]
fn frames_for_others_or_without_buffers_are_dropped_and_counted() {
    let mut r = rig();
    r.f.receive_frame(&frame(MAC, 60));
    assert_eq!(r.f.counters().rx_not_ready, 1, "before activation");
    assert_eq!(r.bring_up(), 0);
    r.f.receive_frame(&frame([0x02, 1, 2, 3, 4, 5], 60));
    assert_eq!(r.f.counters().rx_filtered, 1);
    r.f.receive_frame(&[0u8; 10]);
    assert_eq!(r.f.counters().rx_malformed, 1);
    // Use up ring 0 (the driver has not refilled): the next frame finds no buffer.
    for _ in 0..RING {
        r.f.receive_frame(&frame(MAC, 60));
    }
    r.f.receive_frame(&frame(MAC, 60));
    assert_eq!(r.f.counters().rx_frames, u64::from(RING));
    assert_eq!(r.f.counters().rx_no_buffer, 1);
}

#[test]
fn masked_vectors_fire_when_unmasked() {
    let mut r = rig();
    assert_eq!(r.bring_up(), 0);
    r.w(0, reg::IMR + 8 * u64::from(TX_VECTOR), 1);
    r.msi.take();
    r.f.receive_frame(&frame(MAC, 60));
    assert!(r.msi.take().is_empty(), "masked");
    r.w(0, reg::IMR + 8 * u64::from(TX_VECTOR), 0);
    assert_eq!(
        r.msi.take().len(),
        1,
        "pending interrupt delivered on unmask"
    );
}

#[test]
fn link_changes_raise_the_event_and_get_link_follows() {
    let mut r = rig();
    assert_eq!(r.bring_up(), 0);
    r.msi.take();
    r.f.set_link(false);
    assert_eq!(r.get(SHARED + SHARED_ECR, 4), reg::ecr::LINK.to_le_bytes());
    let msgs = r.msi.take();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].data, 0x40 + u32::from(EVENT_VECTOR));
    assert_eq!(r.cmd(reg::cmd::GET_LINK), 0);
    r.f.receive_frame(&frame(MAC, 60));
    assert_eq!(r.f.counters().rx_not_ready, 1, "link down drops");
    r.w(1, reg::ECR, reg::ecr::LINK);
    r.f.set_link(true);
    assert_eq!(r.cmd(reg::cmd::GET_LINK), reg::LINK_UP);
}

#[test]
fn queue_statistics_are_written_on_get_stats() {
    let mut r = rig();
    assert_eq!(r.bring_up(), 0);
    r.f.receive_frame(&frame(MAC, 60));
    r.cmd(reg::cmd::GET_STATS);
    // Rx queue 0's ucastPktsRxOK (third counter) is 1.
    let stats = r.get(QDESC + 256 + QUEUE_DESC_STATS + 16, 8);
    assert_eq!(u64::from_le_bytes(stats.try_into().unwrap()), 1);
}
