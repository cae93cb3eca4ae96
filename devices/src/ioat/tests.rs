//! The I/OAT function driven the way `ioatdma` and the VFIO selftests drive it.

use std::sync::Arc;

use iommu::{
    DmaError, DmaRequest, DmaSpace, DmaTranslator, IdentityTranslator, RecordingMsiSink,
    RequesterId, Translation,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::descriptor::{DmaDescriptor, ctl};
use super::registers::{chanerr, channel as ch, device as dev};
use super::*;
use crate::pci::capability::find_capability;
use crate::pci::config::{COMMAND, COMMAND_MASTER, COMMAND_MEMORY};
use crate::pci::msix::CONTROL_ENABLE;
use zerocopy::IntoBytes;

const MEM: u64 = 0x100_0000;
const CH0: u64 = ch::BLOCK;
const RING: u64 = 0x10_0000;
const COMPLETION: u64 = 0x20_0000;
const SRC: u64 = 0x30_0000;
const DST: u64 = 0x40_0000;
/// IOVAs at and above this fault in the blocking translator.
const HOLE: u64 = 0x80_0000;

/// Identity below [`HOLE`], a translation fault above (a stand-in for an IOMMU).
struct HoleTranslator;

impl DmaTranslator for HoleTranslator {
    fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError> {
        if request.address >= HOLE {
            return Err(DmaError::TranslationFault {
                requester_id: request.requester_id,
                iova: request.address,
                access: request.access,
                reason: "not mapped".into(),
            });
        }
        IdentityTranslator.translate(request)
    }
}

struct Rig {
    f: IoatFunction,
    mem: GuestMemoryMmap,
    msi: Arc<RecordingMsiSink>,
}

fn rig_with(cfg: IoatConfig, translator: Arc<dyn DmaTranslator>) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let dma = DmaSpace::with_translator(
        RequesterId::new(0, 4, 0),
        GuestMemoryAtomic::new(mem.clone()),
        translator,
    );
    let msi = Arc::new(RecordingMsiSink::new());
    let f = IoatFunction::new(cfg, dma, msi.clone()).unwrap();
    Rig { f, mem, msi }
}

fn rig() -> Rig {
    rig_with(IoatConfig::default(), Arc::new(HoleTranslator))
}

impl Rig {
    fn w8(&mut self, off: u64, v: u8) {
        self.f.bar_write(0, off, &[v]);
    }
    fn w16(&mut self, off: u64, v: u16) {
        self.f.bar_write(0, off, &v.to_le_bytes());
    }
    fn w32(&mut self, off: u64, v: u32) {
        self.f.bar_write(0, off, &v.to_le_bytes());
    }
    fn w64(&mut self, off: u64, v: u64) {
        self.f.bar_write(0, off, &v.to_le_bytes());
    }
    fn r8(&mut self, off: u64) -> u8 {
        let mut b = [0u8; 1];
        self.f.bar_read(0, off, &mut b);
        b[0]
    }
    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.f.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn r64(&mut self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.f.bar_read(0, off, &mut b);
        u64::from_le_bytes(b)
    }
    fn status(&mut self) -> u64 {
        self.r64(CH0 + ch::CHANSTS) & 7
    }
    /// pci_enable_device + pci_set_master + MSI-X with every vector pointed somewhere.
    fn enable(&mut self) {
        self.f
            .config_write(COMMAND, &(COMMAND_MEMORY | COMMAND_MASTER).to_le_bytes());
        let cap = {
            let c = self.f.config();
            find_capability(&mut |o, d| c.read(o, d), 0x11).unwrap()
        };
        for v in 0..self.f.channel_count() as u64 {
            let e = u64::from(MSIX_TABLE_OFFSET) + 16 * v;
            self.w32(e, 0xfee0_0000);
            self.w32(e + 8, 0x40 + v as u32);
            self.w32(e + 12, 0);
        }
        self.f
            .config_write(u16::from(cap) + 2, &CONTROL_ENABLE.to_le_bytes());
    }
    fn put(&self, at: u64, d: &DmaDescriptor) {
        self.mem
            .write_slice(d.as_bytes(), GuestAddress(at))
            .unwrap();
    }
    fn completion(&self) -> u64 {
        self.mem.read_obj(GuestAddress(COMPLETION)).unwrap()
    }
}

fn copy(src: u64, dst: u64, size: u32, flags: u32, next: u64) -> DmaDescriptor {
    DmaDescriptor {
        size,
        ctl: flags,
        src_addr: src,
        dst_addr: dst,
        next,
        ..Default::default()
    }
}

fn null(next: u64) -> DmaDescriptor {
    copy(0, 0, 1, ctl::NULL | ctl::INT_EN | ctl::COMPL_WRITE, next)
}

/// `ioat_pci_probe()` + `ioat_enumerate_channels()` + `ioat_alloc_chan_resources()`: a ring of
/// `n` linked descriptors, the null descriptor at slot 0 issued with DMACOUNT = 1.
fn driver_start(r: &mut Rig, n: u64) {
    assert_eq!(r.r8(dev::CBVER), 0x33);
    assert_eq!(r.r8(dev::CHANCNT) & 0x1f, 1);
    assert_eq!(r.r8(dev::XFERCAP) & 0x1f, 12);
    r.enable();
    r.w8(CH0 + ch::CHANCMD, ch::CHANCMD_RESET);
    assert_eq!(r.r8(CH0 + ch::CHANCMD) & ch::CHANCMD_RESET, 0);
    assert_eq!(r.status(), ch::STATUS_HALTED);
    r.w8(
        dev::INTRCTRL,
        dev::INTRCTRL_MSIX_VECTOR_CONTROL | dev::INTRCTRL_MASTER_INT_EN,
    );
    r.w16(
        CH0 + ch::CHANCTRL,
        ch::CHANCTRL_INT_REARM
            | ch::CHANCTRL_ERR_INT_EN
            | ch::CHANCTRL_ERR_COMPLETION_EN
            | ch::CHANCTRL_ANY_ERR_ABORT_EN,
    );
    r.w32(CH0 + ch::CHANCMP, COMPLETION as u32);
    r.w32(CH0 + ch::CHANCMP + 4, 0);
    for i in 0..n {
        r.put(RING + 64 * i, &copy(0, 0, 0, 0, RING + 64 * ((i + 1) % n)));
    }
    r.put(RING, &null(RING + 64));
    r.w32(CH0 + ch::CHAINADDR, RING as u32);
    r.w32(CH0 + ch::CHAINADDR + 4, 0);
    r.w16(CH0 + ch::DMACOUNT, 1);
}

#[test]
fn the_driver_starts_a_channel_and_copies() {
    let mut r = rig();
    driver_start(&mut r, 8);
    assert_eq!(r.status(), ch::STATUS_DONE);
    assert_eq!(r.completion(), RING | ch::STATUS_DONE);
    assert_eq!(r.msi.take().len(), 1, "the null descriptor interrupts");

    // ioat_dma_self_test: 2000 bytes, then the driver re-arms in its tasklet.
    let pattern: Vec<u8> = (0..2000u32).map(|i| i as u8).collect();
    r.mem.write_slice(&pattern, GuestAddress(SRC)).unwrap();
    r.put(
        RING + 64,
        &copy(SRC, DST, 2000, ctl::INT_EN | ctl::COMPL_WRITE, RING + 128),
    );
    r.w16(CH0 + ch::DMACOUNT, 2);
    let mut out = vec![0u8; 2000];
    r.mem.read_slice(&mut out, GuestAddress(DST)).unwrap();
    assert_eq!(out, pattern);
    assert_eq!(r.completion(), (RING + 64) | ch::STATUS_DONE);
    assert!(r.msi.take().is_empty(), "not re-armed: the interrupt waits");
    r.w16(
        CH0 + ch::CHANCTRL,
        ch::CHANCTRL_INT_REARM | ch::CHANCTRL_ERR_INT_EN,
    );
    assert_eq!(
        r.msi.take().len(),
        1,
        "re-arming delivers the held interrupt"
    );

    // A 10 000-byte copy split at XFERCAP the way ioat_dma_prep_memcpy_lock() does; the
    // counter wraps through the ring.
    let big: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    r.mem.write_slice(&big, GuestAddress(SRC)).unwrap();
    let mut slot = 2u64;
    let mut off = 0u64;
    while off < 10_000 {
        let len = (10_000 - off).min(4096);
        let last = off + len == 10_000;
        let flags = if last {
            ctl::COMPL_WRITE | ctl::INT_EN
        } else {
            0
        };
        r.put(
            RING + 64 * (slot % 8),
            &copy(
                SRC + off,
                DST + off,
                len as u32,
                flags,
                RING + 64 * ((slot + 1) % 8),
            ),
        );
        slot += 1;
        off += len;
    }
    r.w16(CH0 + ch::DMACOUNT, slot as u16);
    let mut out = vec![0u8; 10_000];
    r.mem.read_slice(&mut out, GuestAddress(DST)).unwrap();
    assert_eq!(out, big);
    assert_eq!(
        r.completion(),
        (RING + 64 * ((slot - 1) % 8)) | ch::STATUS_DONE
    );
    let c = r.f.counters()[0];
    assert_eq!((c.descriptors, c.errors), (slot, 0));
}

#[test]
fn the_selftest_driver_loop_suspend_and_restart() {
    // lib/drivers/ioat/ioat.c: one descriptor pointing at itself, DMACOUNT = count, poll
    // CHANSTS for done, suspend; no completion address, no interrupt unless asked.
    let mut r = rig();
    r.enable();
    r.w8(CH0 + ch::CHANCMD, ch::CHANCMD_RESET);
    assert_eq!(r.status(), ch::STATUS_HALTED);
    r.w8(dev::INTRCTRL, dev::INTRCTRL_MSIX_VECTOR_CONTROL);
    r.mem.write_slice(&[b'x'; 4096], GuestAddress(SRC)).unwrap();
    for round in 0..3 {
        r.put(RING, &copy(SRC, DST, 4096, 0, RING));
        r.w64(CH0 + ch::CHAINADDR, RING);
        r.w16(
            CH0 + ch::CHANCTRL,
            ch::CHANCTRL_INT_REARM | ch::CHANCTRL_ANY_ERR_ABORT_EN,
        );
        r.w16(CH0 + ch::DMACOUNT, 1000);
        assert_eq!(r.status(), ch::STATUS_DONE, "round {round}");
        r.w8(CH0 + ch::CHANCMD, ch::CHANCMD_SUSPEND);
        assert_eq!(r.status(), ch::STATUS_SUSPENDED);
    }
    assert!(r.msi.take().is_empty());
    assert_eq!(r.f.counters()[0].descriptors, 3000);

    // send_msi: one descriptor with int_en interrupts exactly once.
    r.put(RING, &copy(SRC, DST, 8, ctl::INT_EN, RING));
    r.w64(CH0 + ch::CHAINADDR, RING);
    r.w16(
        CH0 + ch::CHANCTRL,
        ch::CHANCTRL_INT_REARM | ch::CHANCTRL_ANY_ERR_ABORT_EN,
    );
    r.w16(CH0 + ch::DMACOUNT, 1);
    let msgs = r.msi.take();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].data, 0x40);
    assert_eq!(msgs[0].requester_id, RequesterId::new(0, 4, 0));
}

#[test]
fn unmapped_iovas_halt_the_channel_with_the_data_error_and_a_reset_recovers() {
    for (src, dst, bit) in [
        (HOLE, DST, chanerr::READ_DATA),
        (SRC, HOLE + 0x1000, chanerr::WRITE_DATA),
    ] {
        let mut r = rig();
        r.enable();
        r.w8(CH0 + ch::CHANCMD, ch::CHANCMD_RESET);
        r.mem.write_slice(&[0x55; 64], GuestAddress(DST)).unwrap();
        r.put(RING, &copy(src, dst, 64, 0, RING));
        r.w64(CH0 + ch::CHAINADDR, RING);
        r.w16(
            CH0 + ch::CHANCTRL,
            ch::CHANCTRL_INT_REARM | ch::CHANCTRL_ANY_ERR_ABORT_EN,
        );
        r.w16(CH0 + ch::DMACOUNT, 1);
        assert_eq!(r.status(), ch::STATUS_HALTED);
        assert_eq!(r.r32(CH0 + ch::CHANERR), bit);
        assert!(r.msi.take().is_empty(), "no ERR_INT_EN, no interrupt");
        let mut out = [0u8; 64];
        r.mem.read_slice(&mut out, GuestAddress(DST)).unwrap();
        assert_eq!(out, [0x55; 64], "nothing written on a failed read");
        // A halted channel with an error ignores the doorbell until reset.
        r.w16(CH0 + ch::DMACOUNT, 2);
        assert_eq!(r.status(), ch::STATUS_HALTED);
        // ioat_clear_errors + reset; then a good copy works.
        r.w32(CH0 + ch::CHANERR, bit);
        r.w8(CH0 + ch::CHANCMD, ch::CHANCMD_RESET);
        assert_eq!(
            (r.status(), r.r32(CH0 + ch::CHANERR)),
            (ch::STATUS_HALTED, 0)
        );
        r.put(RING, &copy(SRC, DST, 64, 0, RING));
        r.w64(CH0 + ch::CHAINADDR, RING);
        r.w16(CH0 + ch::DMACOUNT, 1);
        assert_eq!(r.status(), ch::STATUS_DONE);
    }
}

#[test]
fn driver_errors_write_a_halted_completion_and_interrupt() {
    let mut r = rig();
    driver_start(&mut r, 4);
    r.msi.take();
    r.w16(
        CH0 + ch::CHANCTRL,
        ch::CHANCTRL_INT_REARM | ch::CHANCTRL_ERR_INT_EN | ch::CHANCTRL_ERR_COMPLETION_EN,
    );
    r.put(
        RING + 64,
        &copy(HOLE, DST, 64, ctl::COMPL_WRITE, RING + 128),
    );
    r.w16(CH0 + ch::DMACOUNT, 2);
    // ioat_cleanup(): the completion says halted, at the last good descriptor (the null one).
    assert_eq!(r.completion(), RING | ch::STATUS_HALTED);
    assert_eq!(r.r32(CH0 + ch::CHANERR), chanerr::READ_DATA);
    assert_eq!(r.r64(CH0 + ch::CDAR), RING + 64);
    assert_eq!(r.msi.take().len(), 1);
    // A masked error still halts but does not interrupt.
    r.w32(CH0 + ch::CHANERR, chanerr::READ_DATA);
    r.w8(CH0 + ch::CHANCMD, ch::CHANCMD_RESET);
    r.w32(CH0 + ch::CHANERR_MASK, chanerr::READ_DATA);
    r.w64(CH0 + ch::CHAINADDR, RING + 64);
    r.w16(CH0 + ch::DMACOUNT, 1);
    assert_eq!(r.status(), ch::STATUS_HALTED);
    assert!(r.msi.take().is_empty());
}

#[test]
fn bad_descriptors_and_chain_addresses_set_their_chanerr_bits() {
    let cases = [
        ("zero size", copy(SRC, DST, 0, 0, RING), chanerr::LENGTH),
        (
            "above XFERCAP",
            copy(SRC, DST, 4097, 0, RING),
            chanerr::LENGTH,
        ),
        (
            "XOR op",
            copy(SRC, DST, 64, 0x87 << 24, RING),
            chanerr::CONTROL,
        ),
        (
            "misaligned next",
            copy(SRC, DST, 64, 0, RING + 8),
            chanerr::NEXT_DESC_ALIGN,
        ),
        (
            "next in the hole",
            copy(SRC, DST, 64, 0, HOLE),
            chanerr::NEXT_ADDR,
        ),
        (
            "wrapping source",
            copy(u64::MAX - 8, DST, 64, 0, RING),
            chanerr::SRC_ADDR,
        ),
    ];
    for (what, desc, bit) in cases {
        let mut r = rig();
        r.enable();
        r.w8(CH0 + ch::CHANCMD, ch::CHANCMD_RESET);
        r.put(RING, &desc);
        r.w64(CH0 + ch::CHAINADDR, RING);
        r.w16(CH0 + ch::DMACOUNT, 2);
        assert_eq!(r.status(), ch::STATUS_HALTED, "{what}");
        assert_eq!(r.r32(CH0 + ch::CHANERR), bit, "{what}");
    }
    // CHAINADDR itself misaligned, or pointing into the hole.
    for (chain, bit) in [
        (RING + 0x20, chanerr::CHAIN_ADDR_VALUE),
        (HOLE, chanerr::NEXT_ADDR),
    ] {
        let mut r = rig();
        r.enable();
        r.w64(CH0 + ch::CHAINADDR, chain);
        r.w16(CH0 + ch::DMACOUNT, 1);
        assert_eq!(r.r32(CH0 + ch::CHANERR), bit);
    }
}

#[test]
fn no_dma_without_bus_master_enable() {
    let mut r = rig();
    r.enable();
    r.f.config_write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
    r.mem.write_slice(&[1; 64], GuestAddress(SRC)).unwrap();
    r.put(RING, &copy(SRC, DST, 64, 0, RING));
    r.w64(CH0 + ch::CHAINADDR, RING);
    r.w16(CH0 + ch::DMACOUNT, 1);
    assert_eq!(r.r32(CH0 + ch::CHANERR), chanerr::NEXT_ADDR);
    let mut out = [0u8; 64];
    r.mem.read_slice(&mut out, GuestAddress(DST)).unwrap();
    assert_eq!(out, [0; 64]);
}

/// Starts `channels` channels, each on a one-descriptor ring of its own with an interrupting
/// 16-byte copy, and checks each completed.
fn copy_once_on_every_channel(r: &mut Rig, channels: u64) {
    for c in 0..channels {
        let base = ch::BLOCK * (c + 1);
        let ring = RING + 0x1000 * c;
        r.put(ring, &copy(SRC, DST + 0x1000 * c, 16, ctl::INT_EN, ring));
        r.w64(base + ch::CHAINADDR, ring);
        r.w16(base + ch::CHANCTRL, ch::CHANCTRL_INT_REARM);
        r.w16(base + ch::DMACOUNT, 1);
        assert_eq!(r.r64(base + ch::CHANSTS), ring | ch::STATUS_DONE);
    }
}

#[test]
fn channels_have_their_own_registers_and_vectors() {
    let mut r = rig_with(
        IoatConfig {
            channels: 4,
            ..Default::default()
        },
        Arc::new(IdentityTranslator),
    );
    r.enable();
    r.w8(dev::INTRCTRL, dev::INTRCTRL_MSIX_VECTOR_CONTROL);
    assert_eq!(r.r8(dev::CHANCNT), 4);
    copy_once_on_every_channel(&mut r, 4);
    let data: Vec<u32> = r.msi.take().iter().map(|m| m.data).collect();
    assert_eq!(data, [0x40, 0x41, 0x42, 0x43]);
    // Beyond the last channel: reads 0, writes ignored.
    assert_eq!(r.r32(ch::BLOCK * 5 + ch::CHANERR), 0);
    r.w16(ch::BLOCK * 5 + ch::DMACOUNT, 1);
}

/// `ioat_interrupt_style=msi`: one MSI message for every channel (MASTER_INT_EN without
/// MSIX_VECTOR_CONTROL); ATTNSTATUS names the channels; masking holds the message.
#[test]
fn msi_mode_sends_one_message_for_every_channel() {
    let mut r = rig_with(
        IoatConfig {
            channels: 2,
            ..Default::default()
        },
        Arc::new(IdentityTranslator),
    );
    r.f.config_write(COMMAND, &(COMMAND_MEMORY | COMMAND_MASTER).to_le_bytes());
    let cap = {
        let c = r.f.config();
        u16::from(find_capability(&mut |o, d| c.read(o, d), 0x05).expect("MSI capability"))
    };
    let control = r.f.config().read_u16(cap + 2);
    assert_eq!(control & 0x0e, 0, "one vector requestable");
    r.f.config_write(cap + 4, &0xfee0_2000u32.to_le_bytes());
    r.f.config_write(cap + 8, &0u32.to_le_bytes());
    r.f.config_write(cap + 0xc, &0x0051u16.to_le_bytes());
    r.f.config_write(cap + 2, &1u16.to_le_bytes());
    r.w8(dev::INTRCTRL, dev::INTRCTRL_MASTER_INT_EN);
    copy_once_on_every_channel(&mut r, 2);
    let got: Vec<(u64, u32)> = r.msi.take().iter().map(|m| (m.address, m.data)).collect();
    assert_eq!(got, [(0xfee0_2000, 0x51), (0xfee0_2000, 0x51)]);
    assert_eq!(r.r32(dev::ATTNSTATUS), 0b11);
    // Masked: nothing goes out until the vector is unmasked.
    r.f.config_write(cap + 0x10, &1u32.to_le_bytes());
    let base = ch::BLOCK;
    r.w16(base + ch::CHANCTRL, ch::CHANCTRL_INT_REARM);
    r.w16(base + ch::DMACOUNT, 2);
    assert!(r.msi.is_empty());
    assert_eq!(r.f.config().read_u32(cap + 0x14), 1, "pending");
    r.f.config_write(cap + 0x10, &0u32.to_le_bytes());
    assert_eq!(r.msi.take().len(), 1);
    // FLR disables MSI again.
    r.f.function_level_reset();
    assert_eq!(r.f.config().read_u16(cap + 2) & 1, 0);
}

#[test]
fn bad_configurations_are_refused_and_garbage_accesses_are_harmless() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let dma = DmaSpace::identity(RequesterId(0), GuestMemoryAtomic::new(mem));
    let msi = Arc::new(RecordingMsiSink::new());
    for cfg in [
        IoatConfig {
            channels: 0,
            xfercap_log: 12,
        },
        IoatConfig {
            channels: 5,
            xfercap_log: 12,
        },
        IoatConfig {
            channels: 1,
            xfercap_log: 30,
        },
    ] {
        assert!(
            IoatFunction::new(cfg, dma.clone(), msi.clone()).is_err(),
            "{cfg:?}"
        );
    }
    let mut r = rig();
    for off in (0..BAR0_SIZE + 0x10).step_by(3) {
        for len in [1usize, 2, 3, 4, 8] {
            let mut b = vec![0u8; len];
            r.f.bar_read(0, off, &mut b);
            r.f.bar_write(0, off, &b);
            r.f.bar_write(0, off, &vec![0xff; len]);
        }
    }
    r.f.bar_read(2, 0, &mut [0u8; 4]);
}

#[test]
fn function_level_reset_returns_the_function_to_power_on() {
    let mut r = rig();
    driver_start(&mut r, 4);
    r.msi.take();
    let pcie = {
        let c = r.f.config();
        u16::from(find_capability(&mut |o, d| c.read(o, d), 0x10).unwrap())
    };
    let devcap = r.f.config().read_u32(pcie + 4);
    assert_ne!(devcap & (1 << 28), 0, "FLR capable");
    r.f.config_write(pcie + 8, &(1u16 << 15).to_le_bytes());
    assert_eq!(
        r.f.config().read_u16(pcie + 8) & (1 << 15),
        0,
        "the bit reads 0"
    );
    assert_eq!(
        r.f.config().read_u16(COMMAND) & (COMMAND_MASTER | COMMAND_MEMORY),
        0
    );
    assert!(!r.f.dma().bus_master_enabled());
    assert_eq!(r.status(), ch::STATUS_HALTED);
    assert_eq!(r.r64(CH0 + ch::CHANCMP), 0);
    assert_eq!(r.r8(dev::INTRCTRL), 0);
    assert_eq!(
        r.f.counters()[0].descriptors,
        1,
        "the VMM's counters survive"
    );
    // The channel works again once the driver sets it up anew.
    driver_start(&mut r, 4);
    assert_eq!(r.status(), ch::STATUS_DONE);
    assert_eq!(r.msi.take().len(), 1);
}
