//! SVA engine harness: arbitrary guest accesses to the SVA DMA engine (BAR 0 registers of any
//! width and offset, config space writes — ATS, PASID and PRI enables included), guest-memory
//! stores that plant rings, descriptors and data, and IOMMU events (page group responses with
//! any group and code, device-TLB invalidations of any range), against
//! `devices::sva_engine::SvaEngineFunction` over 1 MiB of guest memory. Translation requests
//! are answered identity-mapped, or denied on the upper half of memory (which makes the engine
//! send page requests; the harness's IOMMU refuses them, so nothing parks forever).
//!
//! Input: byte 0 picks the setup (bit 0 ATS and PRI capabilities, bit 1 the denying
//! translator, bit 2 Bus Master Enable and the capabilities enabled from the start). Then
//! operations of 12 bytes: kind (bits 1:0 read / write BAR 0 / write config / store to guest
//! memory or, with `extra` bit 7, an IOMMU event; bits 7:4 the width byte, see `crate::width`),
//! offset (2 bytes: modulo 0x4100 for BAR 0, 0x1000 for config; for stores the 8-byte-aligned
//! guest address is `offset * 16`), value (8 bytes), extra (1 byte).
//!
//! Invariants after every operation: the engine goes idle (it never hangs on guest input: the
//! harness waits at most 10 s for STATUS.BUSY to clear), ID and CAPS never change, ERROR holds
//! a defined code, HEAD stays inside the ring.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::pci::PciDevice;
use devices::sva_engine::registers as reg;
use devices::sva_engine::{SvaEngineConfig, SvaEngineFunction};
use iommu::{
    AddressType, AtcInvalidation, Completion, DeviceEndpoint, DmaError, DmaRequest, DmaSpace,
    DmaTranslator, FunctionBinding, IdentityTranslator, NullMsiSink, PageResponse,
    PageResponseCode, Pasid, RequesterId, Translation,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use crate::MAX_OPS;

/// Guest memory size.
pub const MEMORY: u64 = 0x10_0000;

/// Identity translation; with `deny`, translation requests for the upper half come back with
/// no permission and untranslated requests there fault. Keeps the endpoint it is given.
struct HarnessIommu {
    deny: bool,
    endpoint: Mutex<Option<Arc<dyn DeviceEndpoint>>>,
}

impl DmaTranslator for HarnessIommu {
    fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError> {
        let denied = self.deny && request.address >= MEMORY / 2;
        match request.address_type {
            AddressType::TranslationRequest if denied => {
                Ok(Translation::new(0, 4096, false, false))
            }
            AddressType::Untranslated if denied => Err(DmaError::TranslationFault {
                requester_id: request.requester_id,
                iova: request.address,
                access: request.access,
                reason: "harness: unmapped".into(),
            }),
            _ => IdentityTranslator.translate(request),
        }
    }

    fn register_endpoint(&self, _binding: FunctionBinding, endpoint: Arc<dyn DeviceEndpoint>) {
        *self.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(endpoint);
    }
}

/// Fuzz target `sva_engine`.
pub fn run(data: &[u8]) {
    let Some((&setup, mut ops)) = data.split_first() else {
        return;
    };
    let capabilities = setup & 1 != 0;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)])
        .expect("harness memory");
    let iommu = Arc::new(HarnessIommu {
        deny: setup & 2 != 0,
        endpoint: Mutex::new(None),
    });
    let dma = DmaSpace::with_translator(
        RequesterId::new(0, 0x18, 0),
        GuestMemoryAtomic::new(mem.clone()),
        iommu.clone(),
    );
    let mut f = SvaEngineFunction::new(
        SvaEngineConfig {
            ats: capabilities,
            pri: capabilities,
        },
        dma,
        Arc::new(NullMsiSink),
        "fuzz-sva",
    )
    .expect("harness function");
    if setup & 4 != 0 {
        f.config_write(0x04, &0x0006u16.to_le_bytes());
        let (ats, pasid, pri) = f.capability_offsets();
        if let Some(p) = pasid {
            f.config_write(p + 6, &0x0007u16.to_le_bytes());
        }
        if let Some(a) = ats {
            f.config_write(a + 6, &0x8000u16.to_le_bytes());
        }
        if let Some(r) = pri {
            f.config_write(r + 12, &16u32.to_le_bytes());
            f.config_write(r + 4, &1u16.to_le_bytes());
        }
    }
    let endpoint = iommu
        .endpoint
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .expect("the engine registers its endpoint");
    let id = read(&mut f, reg::ID);
    let caps = read(&mut f, reg::CAPS);
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
            _ if extra & 0x80 != 0 => iommu_event(&*endpoint, offset, value, extra),
            _ => {
                let at = (offset * 16) % MEMORY;
                let _ = mem.write_slice(&value.to_le_bytes(), GuestAddress(at));
            }
        }
        check(&mut f, id, caps);
    }
}

/// A page group response or a device-TLB invalidation, as the IOMMU would send.
fn iommu_event(endpoint: &dyn DeviceEndpoint, offset: u64, value: u64, extra: u8) {
    let pasid = Pasid::new((value >> 32) as u32 & 0xf_ffff).filter(|_| extra & 0x40 != 0);
    if extra & 1 == 0 {
        endpoint.page_response(PageResponse {
            pasid,
            group_index: (offset & 0x1ff) as u16,
            code: match extra >> 1 & 3 {
                0 => PageResponseCode::Success,
                1 => PageResponseCode::InvalidRequest,
                _ => PageResponseCode::ResponseFailure,
            },
        });
    } else {
        let completion = Completion::new();
        let size = if extra & 0x20 != 0 {
            u64::MAX
        } else {
            4096u64 << (value & 0x1f)
        };
        endpoint.invalidate_atc(AtcInvalidation {
            pasid,
            global: extra & 0x10 != 0,
            address: value & !0xfff,
            size,
            completion: completion.clone(),
        });
        assert!(completion.is_complete(), "an invalidation must complete");
    }
}

fn read(f: &mut SvaEngineFunction, off: u64) -> u64 {
    let mut b = [0u8; 8];
    f.bar_read(0, off, &mut b);
    u64::from_le_bytes(b)
}

fn check(f: &mut SvaEngineFunction, id: u64, caps: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while read(f, reg::STATUS) & reg::status::BUSY != 0 {
        assert!(
            Instant::now() < deadline,
            "the engine stayed busy: {:?}",
            f.snapshot()
        );
        std::thread::sleep(Duration::from_micros(50));
    }
    assert_eq!(read(f, reg::ID), id, "ID changed");
    assert_eq!(read(f, reg::CAPS), caps, "CAPS changed");
    let error = read(f, reg::ERROR);
    assert!(error <= reg::error::RESERVED_FIELD, "ERROR {error}");
    let (size, head, _) = f.snapshot().ring;
    assert!(head < size.max(1), "HEAD {head} outside a ring of {size}");
}
