//! I/OAT harness: arbitrary guest accesses to an emulated I/OAT function (BAR 0 registers of
//! any width and offset, config space writes) interleaved with guest-memory stores that plant
//! descriptors, chains and data, against `devices::ioat::IoatFunction` over 1 MiB of guest
//! memory, with DMA untranslated or through a translator that faults on the upper half (an
//! IOMMU with unmapped IOVAs).
//!
//! Input: byte 0 picks the setup (bits 1:0 channels - 1, bit 2 the faulting translator, bit 3
//! Bus Master Enable and MSI-X on from the start). Then operations of 12 bytes: kind (bits 1:0
//! read / write BAR 0 / write config / store to guest memory; bits 7:4 the width byte, see
//! `crate::width`), offset (2 bytes: modulo 0x4100 for BAR 0, 0x1000 for config; for stores
//! the 8-byte-aligned guest address is `offset * 16` plus the low bits of `extra`), value
//! (8 bytes), extra (1 byte).
//!
//! Invariants after every operation: every channel's CHANERR holds only bits the model
//! defines, a channel with an error is halted, no channel is left active (the engine runs to
//! completion inside the doorbell write), CHANCNT and CBVER never change.

use std::sync::Arc;

use devices::ioat::registers::{chanerr, channel as ch, device as dev};
use devices::ioat::{IoatConfig, IoatFunction};
use devices::pci::PciDevice;
use iommu::{
    DmaError, DmaRequest, DmaSpace, DmaTranslator, IdentityTranslator, NullMsiSink, RequesterId,
    Translation,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use crate::MAX_OPS;

/// Guest memory size.
pub const MEMORY: u64 = 0x10_0000;

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

/// Fuzz target `ioat`.
pub fn run(data: &[u8]) {
    let Some((&setup, mut ops)) = data.split_first() else {
        return;
    };
    let channels = (setup & 3) + 1;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)])
        .expect("harness memory");
    let translator: Arc<dyn DmaTranslator> = if setup & 4 != 0 {
        Arc::new(UpperHalfFaults)
    } else {
        Arc::new(IdentityTranslator)
    };
    let dma = DmaSpace::with_translator(
        RequesterId::new(0, 0x10, 0),
        GuestMemoryAtomic::new(mem.clone()),
        translator,
    );
    let mut f = IoatFunction::new(
        IoatConfig {
            channels,
            ..Default::default()
        },
        dma,
        Arc::new(NullMsiSink),
    )
    .expect("harness function");
    if setup & 8 != 0 {
        f.config_write(0x04, &0x0006u16.to_le_bytes());
    }
    let mut steps = 0;
    while ops.len() >= 12 && steps < MAX_OPS {
        let (op, rest) = ops.split_at(12);
        ops = rest;
        steps += 1;
        let width = crate::width(op[0] >> 4);
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let value = u64::from_le_bytes(op[3..11].try_into().expect("8 bytes"));
        let extra = op[11];
        let mut bytes = value.to_le_bytes()[..width.min(8)].to_vec();
        bytes.resize(width, 0x5a);
        match op[0] & 3 {
            0 => {
                let mut buf = vec![0u8; width];
                f.bar_read(0, offset % 0x4100, &mut buf);
            }
            1 => f.bar_write(0, offset % 0x4100, &bytes),
            2 => f.config_write((offset % 0x1000) as u16, &bytes),
            _ => {
                let at = (offset * 16 + u64::from(extra & 8)) % MEMORY;
                let _ = mem.write_slice(&value.to_le_bytes(), GuestAddress(at));
            }
        }
        check(&mut f, channels);
    }
}

fn read(f: &mut IoatFunction, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    f.bar_read(0, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn check(f: &mut IoatFunction, channels: u8) {
    assert_eq!(
        read(f, dev::CHANCNT, 1),
        u64::from(channels),
        "CHANCNT changed"
    );
    assert_eq!(read(f, dev::CBVER, 1), 0x33, "CBVER changed");
    for c in 0..u64::from(channels) {
        let base = ch::BLOCK * (c + 1);
        let err = read(f, base + ch::CHANERR, 4) as u32;
        let state = read(f, base + ch::CHANSTS, 8) & 7;
        assert_eq!(
            err & !chanerr::IMPLEMENTED,
            0,
            "channel {c}: CHANERR {err:#x}"
        );
        assert_ne!(state, ch::STATUS_ACTIVE, "channel {c} left active");
        assert!(state <= ch::STATUS_HALTED, "channel {c}: state {state}");
        if err != 0 {
            assert_eq!(
                state,
                ch::STATUS_HALTED,
                "channel {c}: error {err:#x} but running"
            );
        }
    }
}
