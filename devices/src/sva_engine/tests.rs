//! The engine driven the way `sva-test` drives it, against a stand-in IOMMU that answers
//! translation requests from a per-PASID page map and serves page requests like the guest's
//! fault handler (map the page, answer Success) — or answers them as a test says.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iommu::{
    AddressType, AtcInvalidation, Completion, DeviceEndpoint, DmaError, DmaRequest, DmaSpace,
    DmaTranslator, FunctionBinding, PageRequest, PageResponse, PageResponseCode, Pasid,
    RecordingMsiSink, RequesterId, Translation,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use zerocopy::{FromBytes, IntoBytes};

use super::descriptor::{CompletionRecord, Descriptor, flags, op, status as cstatus};
use super::registers::{self as reg, pasid_field, status};
use super::*;
use crate::pci::address_translation::{ats, pasid, pri};
use crate::pci::config::{COMMAND, COMMAND_MASTER, COMMAND_MEMORY};
use crate::pci::msix::CONTROL_ENABLE;

const MEM: u64 = 0x100_0000;
const PASID: u32 = 5;
const RING_VA: u64 = 0x7000_0000;
const RING_GPA: u64 = 0x10_0000;
const COMPLETION_VA: u64 = 0x7001_0000;
const COMPLETION_GPA: u64 = 0x11_0000;
/// Pages the fault handler hands out start here.
const FREE_GPA: u64 = 0x80_0000;

/// How the stand-in answers page requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// Map the page (read/write) and answer Success.
    MapAndSucceed,
    /// Answer with this code, map nothing.
    Code(PageResponseCode),
    /// Do not answer.
    Never,
}

/// (PASID, page) → (guest-physical page, writable).
type PageMap = HashMap<(Option<Pasid>, u64), (u64, bool)>;

struct FakeIommu {
    pages: Mutex<PageMap>,
    endpoint: Mutex<Option<Arc<dyn DeviceEndpoint>>>,
    requests: Mutex<Vec<PageRequest>>,
    answer: Mutex<Answer>,
    next_free: Mutex<u64>,
}

impl FakeIommu {
    fn new() -> Arc<Self> {
        Arc::new(FakeIommu {
            pages: Mutex::new(HashMap::new()),
            endpoint: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
            answer: Mutex::new(Answer::MapAndSucceed),
            next_free: Mutex::new(FREE_GPA),
        })
    }

    fn map(&self, pasid: Option<Pasid>, va: u64, gpa: u64, write: bool) {
        self.pages
            .lock()
            .unwrap()
            .insert((pasid, va & !0xfff), (gpa & !0xfff, write));
    }

    fn lookup(&self, pasid: Option<Pasid>, va: u64) -> Option<(u64, bool)> {
        self.pages
            .lock()
            .unwrap()
            .get(&(pasid, va & !0xfff))
            .map(|&(gpa, w)| (gpa + (va & 0xfff), w))
    }

    fn endpoint(&self) -> Arc<dyn DeviceEndpoint> {
        self.endpoint.lock().unwrap().clone().expect("registered")
    }

    fn invalidate(&self, pasid: Option<Pasid>, address: u64, size: u64) -> Completion {
        let completion = Completion::new();
        self.endpoint().invalidate_atc(AtcInvalidation {
            pasid,
            global: false,
            address,
            size,
            completion: completion.clone(),
        });
        completion
    }

    fn respond(&self, request: &PageRequest, code: PageResponseCode) {
        self.endpoint().page_response(PageResponse {
            pasid: request.pasid,
            group_index: request.group_index,
            code,
        });
    }
}

impl DmaTranslator for FakeIommu {
    fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError> {
        let len = (4096 - (request.address & 0xfff)).min(request.len.max(1));
        match request.address_type {
            AddressType::Translated => Ok(Translation::new(request.address, len, true, true)),
            AddressType::TranslationRequest => {
                Ok(match self.lookup(request.pasid, request.address) {
                    Some((gpa, w)) => Translation::new(gpa, len, true, w),
                    None => Translation::new(0, len, false, false),
                })
            }
            AddressType::Untranslated => match self.lookup(request.pasid, request.address) {
                Some((gpa, w)) if w || request.access == iommu::DmaAccess::Read => {
                    Ok(Translation::new(gpa, len, true, w))
                }
                _ => Err(DmaError::TranslationFault {
                    requester_id: request.requester_id,
                    iova: request.address,
                    access: request.access,
                    reason: "not mapped".into(),
                }),
            },
        }
    }

    fn page_request(&self, request: &PageRequest) -> Result<(), DmaError> {
        self.requests.lock().unwrap().push(*request);
        match *self.answer.lock().unwrap() {
            Answer::MapAndSucceed => {
                let gpa = {
                    let mut next = self.next_free.lock().unwrap();
                    let g = *next;
                    *next += 4096;
                    g
                };
                if self.lookup(request.pasid, request.address).is_none() {
                    self.map(request.pasid, request.address, gpa, true);
                } else {
                    // A write to a read-only page: make it writable (a CoW break).
                    let (old, _) = self.lookup(request.pasid, request.address).unwrap();
                    self.map(request.pasid, request.address, old, true);
                }
                self.respond(request, PageResponseCode::Success);
            }
            Answer::Code(code) => self.respond(request, code),
            Answer::Never => {}
        }
        Ok(())
    }

    fn register_endpoint(&self, _binding: FunctionBinding, endpoint: Arc<dyn DeviceEndpoint>) {
        *self.endpoint.lock().unwrap() = Some(endpoint);
    }
}

struct Rig {
    f: SvaEngineFunction,
    mem: GuestMemoryMmap,
    iommu: Arc<FakeIommu>,
    msi: Arc<RecordingMsiSink>,
    tail: u64,
}

fn pasid() -> Option<Pasid> {
    Pasid::new(PASID)
}

fn rig_with(cfg: SvaEngineConfig) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let iommu = FakeIommu::new();
    let dma = DmaSpace::with_translator(
        RequesterId::new(0, 0x12, 0),
        GuestMemoryAtomic::new(mem.clone()),
        iommu.clone(),
    );
    let msi = Arc::new(RecordingMsiSink::new());
    let f = SvaEngineFunction::new(cfg, dma, msi.clone(), "sva-test-rig").unwrap();
    for i in 0..4 {
        iommu.map(pasid(), RING_VA + i * 4096, RING_GPA + i * 4096, true);
    }
    iommu.map(pasid(), COMPLETION_VA, COMPLETION_GPA, true);
    let mut rig = Rig {
        f,
        mem,
        iommu,
        msi,
        tail: 0,
    };
    rig.enable_function();
    rig
}

fn rig() -> Rig {
    rig_with(SvaEngineConfig::default())
}

impl Rig {
    fn w64(&mut self, off: u64, v: u64) {
        self.f.bar_write(0, off, &v.to_le_bytes());
    }
    fn r64(&mut self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.f.bar_read(0, off, &mut b);
        u64::from_le_bytes(b)
    }
    fn cfg16(&mut self, off: u16, v: u16) {
        self.f.config_write(off, &v.to_le_bytes());
    }
    fn cfg_read16(&mut self, off: u16) -> u16 {
        let mut b = [0u8; 2];
        self.f.config_read(off, &mut b);
        u16::from_le_bytes(b)
    }

    /// What Linux does: memory + bus master, MSI-X, then ATS, PASID and PRI enabled.
    fn enable_function(&mut self) {
        self.cfg16(COMMAND, COMMAND_MEMORY | COMMAND_MASTER);
        let e = u64::from(MSIX_TABLE_OFFSET);
        self.f.bar_write(0, e, &0xfee0_0000u32.to_le_bytes());
        self.f.bar_write(0, e + 8, &0x41u32.to_le_bytes());
        self.f.bar_write(0, e + 12, &0u32.to_le_bytes());
        let msix = self.f.interrupts.with(|m| m.cap_offset());
        self.cfg16(msix + 2, CONTROL_ENABLE);
        let (a, p, r) = self.f.capability_offsets();
        if let Some(p) = p {
            self.cfg16(p + pasid::CTRL, pasid::CTRL_ENABLE | pasid::CTRL_PRIV);
        }
        if let Some(a) = a {
            self.cfg16(a + ats::CTRL, ats::CTRL_ENABLE);
        }
        if let Some(r) = r {
            self.f
                .config_write(r + pri::ALLOCATION, &32u32.to_le_bytes());
            self.cfg16(r + pri::CTRL, pri::CTRL_ENABLE);
        }
    }

    fn start_ring(&mut self) {
        self.w64(reg::RING_BASE, RING_VA);
        self.w64(reg::RING_SIZE, 64);
        self.w64(reg::RING_PASID, u64::from(pasid_field::VALID | PASID));
        self.w64(
            reg::CTRL,
            registers::ctrl::ENABLE | registers::ctrl::INT_ENABLE,
        );
        assert_eq!(self.r64(reg::STATUS) & status::ENABLED, status::ENABLED);
        self.tail = 0;
    }

    /// Puts `d` in the next slot (completion record i at COMPLETION_VA + 32 i) and rings.
    fn submit(&mut self, mut d: Descriptor) -> u64 {
        let slot = self.tail;
        if d.completion == 0 {
            d.completion = COMPLETION_VA + 32 * slot;
        }
        let record_gpa = COMPLETION_GPA + 32 * slot;
        self.mem
            .write_slice(&[0u8; 32], GuestAddress(record_gpa))
            .unwrap();
        self.mem
            .write_slice(d.as_bytes(), GuestAddress(RING_GPA + 64 * slot))
            .unwrap();
        self.tail = (self.tail + 1) % 64;
        let t = self.tail;
        self.w64(reg::RING_TAIL, t);
        record_gpa
    }

    fn run(&mut self, d: Descriptor) -> CompletionRecord {
        let record = self.submit(d);
        self.wait_record(record)
    }

    fn wait_record(&self, record_gpa: u64) -> CompletionRecord {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut b = [0u8; 32];
            self.mem
                .read_slice(&mut b, GuestAddress(record_gpa))
                .unwrap();
            let r = CompletionRecord::read_from_bytes(&b).unwrap();
            if r.status != 0 {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no completion at {record_gpa:#x}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn wait_status(&mut self, bit: u64, set: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while (self.r64(reg::STATUS) & bit != 0) != set {
            assert!(
                Instant::now() < deadline,
                "STATUS bit {bit:#x} never became {set}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn gpa_bytes(&self, va: u64, len: usize) -> Vec<u8> {
        let (gpa, _) = self.iommu.lookup(pasid(), va).expect("mapped");
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }
}

fn copy(src: u64, dst: u64, len: u64) -> Descriptor {
    Descriptor {
        opcode: op::COPY,
        flags: flags::INTERRUPT,
        pasid: pasid_field::VALID | PASID,
        src,
        dst,
        len,
        ..Default::default()
    }
}

/// Maps `pages` source pages at `va` to fresh memory holding a pattern.
fn source(rig: &Rig, va: u64, pages: u64) -> Vec<u8> {
    let data: Vec<u8> = (0..pages * 4096).map(|i| (i * 7 + 3) as u8).collect();
    for p in 0..pages {
        let gpa = 0x20_0000 + p * 4096;
        rig.iommu.map(pasid(), va + p * 4096, gpa, false);
        rig.mem
            .write_slice(&data[(p * 4096) as usize..][..4096], GuestAddress(gpa))
            .unwrap();
    }
    data
}

#[test]
fn the_function_looks_like_the_datasheet() {
    let rig = rig();
    let c = rig.f.config();
    assert_eq!(c.read_u16(0), VENDOR_ID);
    assert_eq!(c.read_u16(2), DEVICE_ID);
    assert_eq!(
        rig.f.capability_offsets(),
        (Some(0x100), Some(0x108), Some(0x110))
    );
    // BAR 0: 32-bit non-prefetchable memory.
    assert_eq!(c.read_u32(0x10) & 0xf, 0);
    let mut r = rig;
    assert_eq!(r.r64(reg::ID), reg::ID_VALUE);
    let caps = r.r64(reg::CAPS);
    assert_eq!(caps & 0x307, 0x307);
    assert_eq!((caps >> 16) & 0x1f, 20);
    assert_eq!(caps >> 32, 4096);
    let no_ats = rig_with(SvaEngineConfig {
        ats: false,
        pri: false,
    });
    assert_eq!(no_ats.f.capability_offsets(), (None, Some(0x100), None));
    assert!(
        SvaEngineFunction::new(
            SvaEngineConfig {
                ats: false,
                pri: true
            },
            no_ats.f.dma.clone(),
            no_ats.msi.clone(),
            "x"
        )
        .is_err()
    );
}

#[test]
fn a_copy_into_never_touched_pages_faults_them_in_through_page_requests() {
    let mut rig = rig();
    rig.start_ring();
    let data = source(&rig, 0x4000_0000, 4);
    let record = rig.submit(copy(0x4000_0000, 0x5000_0000, 4 * 4096));
    let r = rig.wait_record(record);
    assert_eq!(r.status, cstatus::SUCCESS, "{r:?}");
    assert_eq!(r.bytes_completed, 4 * 4096);
    for p in 0..4 {
        assert_eq!(
            rig.gpa_bytes(0x5000_0000 + p * 4096, 4096),
            data[(p * 4096) as usize..][..4096]
        );
    }
    let requests = rig.iommu.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 4, "one page request per destination page");
    assert!(
        requests
            .iter()
            .all(|r| r.write && r.last_in_group && r.pasid == pasid())
    );
    let c = rig.f.counters();
    assert_eq!(c.page_requests, 4);
    assert_eq!(c.responses_success, 4);
    assert!(c.ats_translations >= 8, "{c:?}");
    assert_eq!(rig.r64(reg::PAGE_REQUESTS), 4);
    assert_eq!(rig.r64(reg::COMPLETED), 1);
    assert_eq!(rig.r64(reg::INT_STATUS), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.msi.len() != 1 {
        assert!(Instant::now() < deadline, "no completion interrupt");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Again: the ATC and the now-present pages serve it without page requests.
    let record = rig.submit(copy(0x4000_0000, 0x5000_0000, 4 * 4096));
    assert_eq!(rig.wait_record(record).status, cstatus::SUCCESS);
    assert_eq!(rig.f.counters().page_requests, 4);
    assert!(rig.f.counters().atc_hits > 0);
}

#[test]
fn invalid_and_failure_responses_end_the_descriptor_and_failure_stops_pri() {
    let mut rig = rig();
    rig.start_ring();
    source(&rig, 0x4000_0000, 1);
    *rig.iommu.answer.lock().unwrap() = Answer::Code(PageResponseCode::InvalidRequest);
    let r = rig.run(copy(0x4000_0000, 0x6000_0000, 4096));
    assert_eq!(r.status, cstatus::PAGE_INVALID);
    assert_eq!(r.fault_address, 0x6000_0000);
    assert_eq!(r.fault_flags, descriptor::fault_flags::WRITE);
    // The ring goes on.
    *rig.iommu.answer.lock().unwrap() = Answer::Code(PageResponseCode::ResponseFailure);
    let r = rig.run(copy(0x4000_0000, 0x6100_0000, 4096));
    assert_eq!(r.status, cstatus::PAGE_FAILURE);
    assert_ne!(rig.r64(reg::STATUS) & status::PRI_STOPPED, 0);
    let pri_cap = rig.f.capability_offsets().2.unwrap();
    assert_ne!(rig.cfg_read16(pri_cap + pri::STATUS) & pri::STATUS_RF, 0);
    // Stopped: no page request goes out.
    *rig.iommu.answer.lock().unwrap() = Answer::MapAndSucceed;
    let sent = rig.iommu.requests.lock().unwrap().len();
    let r = rig.run(copy(0x4000_0000, 0x6200_0000, 4096));
    assert_eq!(r.status, cstatus::PAGE_FAILURE);
    assert_eq!(rig.iommu.requests.lock().unwrap().len(), sent);
    // The guest clears RF and re-enables PRI: page requests work again.
    rig.cfg16(pri_cap + pri::STATUS, pri::STATUS_RF);
    rig.cfg16(pri_cap + pri::CTRL, 0);
    rig.cfg16(pri_cap + pri::CTRL, pri::CTRL_ENABLE);
    assert_eq!(rig.r64(reg::STATUS) & status::PRI_STOPPED, 0);
    let r = rig.run(copy(0x4000_0000, 0x6200_0000, 4096));
    assert_eq!(r.status, cstatus::SUCCESS);
    let c = rig.f.counters();
    assert_eq!((c.responses_invalid, c.responses_failure), (1, 1));
}

#[test]
fn a_device_tlb_invalidation_makes_the_next_write_use_the_new_page() {
    let mut rig = rig();
    rig.start_ring();
    source(&rig, 0x4000_0000, 1);
    let (old, new) = (0x60_0000u64, 0x61_0000u64);
    rig.iommu.map(pasid(), 0x5000_0000, old, true);
    assert_eq!(
        rig.run(copy(0x4000_0000, 0x5000_0000, 4096)).status,
        cstatus::SUCCESS
    );
    // Source, destination and completion record pages.
    assert_eq!(rig.f.snapshot().atc_entries, 3);
    // The process remaps the page; the kernel invalidates the device TLB for it.
    rig.iommu.map(pasid(), 0x5000_0000, new, true);
    rig.mem
        .write_slice(&[0u8; 4096], GuestAddress(old))
        .unwrap();
    let done = rig.iommu.invalidate(pasid(), 0x5000_0000, 4096);
    assert!(
        done.is_complete(),
        "the invalidation completes after the flush"
    );
    assert_eq!(rig.f.snapshot().atc_entries, 2);
    assert_eq!(rig.r64(reg::ATC_INVALIDATIONS), 1);
    assert_eq!(
        rig.run(copy(0x4000_0000, 0x5000_0000, 4096)).status,
        cstatus::SUCCESS
    );
    let mut b = [0u8; 4096];
    rig.mem.read_slice(&mut b, GuestAddress(old)).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "no write through the stale translation"
    );
    rig.mem.read_slice(&mut b, GuestAddress(new)).unwrap();
    assert_eq!(b[1], 10);
}

#[test]
fn without_ats_accesses_are_untranslated_and_a_missing_page_is_a_translation_fault() {
    let mut rig = rig_with(SvaEngineConfig {
        ats: false,
        pri: false,
    });
    rig.start_ring();
    source(&rig, 0x4000_0000, 1);
    rig.iommu.map(pasid(), 0x5000_0000, 0x60_0000, true);
    assert_eq!(
        rig.run(copy(0x4000_0000, 0x5000_0000, 4096)).status,
        cstatus::SUCCESS
    );
    let r = rig.run(copy(0x4000_0000, 0x5100_0000, 4096));
    assert_eq!(r.status, cstatus::TRANSLATION_FAULT);
    assert_eq!(r.fault_address, 0x5100_0000);
    let c = rig.f.counters();
    assert_eq!(
        (c.ats_translations, c.page_requests, c.translation_faults),
        (0, 0, 1)
    );
}

#[test]
fn no_page_request_flag_and_fill_and_compare() {
    let mut rig = rig();
    rig.start_ring();
    let mut d = copy(0x4000_0000, 0x5000_0000, 4096);
    source(&rig, 0x4000_0000, 1);
    d.flags |= flags::NO_PAGE_REQUEST;
    assert_eq!(rig.run(d).status, cstatus::TRANSLATION_FAULT);
    assert!(rig.iommu.requests.lock().unwrap().is_empty());
    let fill = Descriptor {
        opcode: op::FILL,
        pasid: pasid_field::VALID | PASID,
        src: 0x0807_0605_0403_0201,
        dst: 0x5000_0ff8,
        len: 16,
        ..Default::default()
    };
    assert_eq!(rig.run(fill).status, cstatus::SUCCESS);
    assert_eq!(rig.gpa_bytes(0x5000_0ff8, 8), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(rig.gpa_bytes(0x5000_1000, 8), [1, 2, 3, 4, 5, 6, 7, 8]);
    let cmp = Descriptor {
        opcode: op::COMPARE,
        pasid: pasid_field::VALID | PASID,
        src: 0x5000_0ff8,
        dst: 0x5000_1000,
        len: 8,
        ..Default::default()
    };
    let r = rig.run(cmp);
    assert_eq!(
        (r.status, r.result, r.bytes_completed),
        (cstatus::SUCCESS, 0, 8)
    );
    let r = rig.run(Descriptor {
        len: 16,
        src: 0x5000_0ff0,
        ..cmp
    });
    assert_eq!((r.status, r.result), (cstatus::SUCCESS, 1));
}

#[test]
fn reset_aborts_a_descriptor_parked_on_a_page_request() {
    let mut rig = rig();
    rig.start_ring();
    source(&rig, 0x4000_0000, 1);
    *rig.iommu.answer.lock().unwrap() = Answer::Never;
    let record = rig.submit(copy(0x4000_0000, 0x5000_0000, 4096));
    rig.wait_status(status::WAITING_PAGE, true);
    assert_eq!(rig.f.snapshot().pri_outstanding, 1);
    rig.w64(reg::CTRL, registers::ctrl::RESET);
    rig.wait_status(status::BUSY, false);
    assert_eq!(rig.wait_record(record).status, cstatus::ABORTED);
    assert_eq!(rig.r64(reg::RING_SIZE), 0);
    // The late response is one nothing waits for any more: counted, no harm.
    let request = rig.iommu.requests.lock().unwrap()[0];
    rig.iommu.respond(&request, PageResponseCode::Success);
    *rig.iommu.answer.lock().unwrap() = Answer::MapAndSucceed;
    rig.start_ring();
    assert_eq!(
        rig.run(copy(0x4000_0000, 0x5000_0000, 4096)).status,
        cstatus::SUCCESS
    );
}

#[test]
fn flr_aborts_and_returns_the_capabilities_to_reset() {
    let mut rig = rig();
    rig.start_ring();
    source(&rig, 0x4000_0000, 1);
    *rig.iommu.answer.lock().unwrap() = Answer::Never;
    let record = rig.submit(copy(0x4000_0000, 0x5000_0000, 4096));
    rig.wait_status(status::WAITING_PAGE, true);
    let pcie = rig.f.pcie_offset;
    rig.cfg16(pcie + crate::pci::pcie::DEVCTL as u16, 0x8000);
    rig.wait_status(status::BUSY, false);
    let s = rig.f.snapshot();
    assert!(!s.ats_enabled && !s.pasid_enabled && !s.pri_enabled);
    assert_eq!(s.status, 0);
    // Bus Master Enable is off: the ABORTED record could not be written.
    let mut b = [0u8; 1];
    rig.mem.read_slice(&mut b, GuestAddress(record)).unwrap();
    assert_eq!(b[0], 0);
}

#[test]
fn bad_descriptors_and_bad_ring_registers_are_architected_errors() {
    let mut rig = rig();
    rig.start_ring();
    let r = rig.run(Descriptor {
        len: (1 << 30) + 1,
        ..copy(0x4000_0000, 0x5000_0000, 0)
    });
    assert_eq!(r.status, cstatus::BAD_DESCRIPTOR);
    let r = rig.run(Descriptor {
        opcode: 0x77,
        ..copy(0, 0, 0)
    });
    assert_eq!(r.status, cstatus::BAD_DESCRIPTOR);
    let mut d = copy(0x4000_0000, 0x5000_0000, 8);
    d.reserved1[0] = 1;
    rig.submit(d);
    rig.wait_status(status::HALTED, true);
    assert_eq!(rig.r64(reg::ERROR), registers::error::RESERVED_FIELD);
    // Halted until reset.
    rig.w64(reg::CTRL, registers::ctrl::RESET);
    assert_eq!(rig.r64(reg::STATUS), 0);
    rig.start_ring();
    rig.w64(reg::RING_TAIL, 64);
    assert_eq!(rig.r64(reg::ERROR), registers::error::TAIL_RANGE);
    rig.w64(reg::CTRL, registers::ctrl::RESET);
    rig.w64(reg::RING_BASE, RING_VA + 8);
    rig.w64(reg::RING_SIZE, 3);
    rig.w64(reg::CTRL, registers::ctrl::ENABLE);
    assert_eq!(rig.r64(reg::ERROR), registers::error::RING_CONFIG);
    // A ring the ring PASID cannot reach halts with the fetch address.
    rig.w64(reg::CTRL, registers::ctrl::RESET);
    rig.w64(reg::RING_BASE, 0x7700_0000);
    rig.w64(reg::RING_SIZE, 4);
    rig.w64(reg::RING_PASID, u64::from(pasid_field::VALID | PASID));
    rig.w64(reg::CTRL, registers::ctrl::ENABLE);
    rig.w64(reg::RING_TAIL, 1);
    rig.wait_status(status::HALTED, true);
    assert_eq!(rig.r64(reg::ERROR), registers::error::RING_FETCH);
    assert_eq!(rig.r64(reg::ERROR_ADDR), 0x7700_0000);
}

#[test]
fn descriptors_with_a_pasid_need_pasid_enable() {
    let mut rig = rig();
    let p = rig.f.capability_offsets().1.unwrap();
    rig.cfg16(p + pasid::CTRL, 0);
    // The ring itself in the device's own (no-PASID) space.
    for i in 0..4 {
        rig.iommu
            .map(None, RING_VA + i * 4096, RING_GPA + i * 4096, true);
    }
    rig.w64(reg::RING_BASE, RING_VA);
    rig.w64(reg::RING_SIZE, 64);
    rig.w64(reg::CTRL, registers::ctrl::ENABLE);
    source(&rig, 0x4000_0000, 1);
    let mut d = copy(0x4000_0000, 0x5000_0000, 8);
    d.completion = 0;
    rig.submit(d);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.r64(reg::COMPLETED) == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(rig.f.counters().translation_faults, 1);
    assert!(rig.iommu.requests.lock().unwrap().is_empty());
}

#[test]
fn a_pri_allocation_of_zero_sends_no_page_request() {
    let mut rig = rig();
    let r = rig.f.capability_offsets().2.unwrap();
    rig.cfg16(r + pri::CTRL, 0);
    rig.f.config_write(r + pri::ALLOCATION, &0u32.to_le_bytes());
    rig.cfg16(r + pri::CTRL, pri::CTRL_ENABLE);
    rig.start_ring();
    source(&rig, 0x4000_0000, 1);
    let r = rig.run(copy(0x4000_0000, 0x5000_0000, 4096));
    assert_eq!(r.status, cstatus::TRANSLATION_FAULT);
    assert!(rig.iommu.requests.lock().unwrap().is_empty());
}

#[test]
fn the_device_measures_its_page_fault_round_trips() {
    let mut rig = rig();
    rig.start_ring();
    source(&rig, 0x4000_0000, 2);
    assert_eq!(
        rig.run(copy(0x4000_0000, 0x5000_0000, 8192)).status,
        cstatus::SUCCESS
    );
    let c = rig.f.counters();
    assert_eq!(c.page_request_round_trips, 2);
    assert!(c.page_request_round_trip_max_ns <= c.page_request_round_trip_ns);
}

#[test]
fn success_for_a_lost_request_is_retried_with_pauses_then_fails() {
    // The stand-in answers Success without mapping anything (a request lost to a full queue).
    let mut rig = rig();
    rig.start_ring();
    source(&rig, 0x4000_0000, 1);
    *rig.iommu.answer.lock().unwrap() = Answer::Code(PageResponseCode::Success);
    let started = Instant::now();
    let r = rig.run(copy(0x4000_0000, 0x5000_0000, 4096));
    assert_eq!(r.status, cstatus::PAGE_FAILURE);
    assert_eq!(
        rig.iommu.requests.lock().unwrap().len(),
        MAX_PAGE_REQUESTS_PER_PAGE as usize
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the retries are spread out: {:?}",
        started.elapsed()
    );
}

#[test]
fn a_ring_past_the_top_of_the_address_space_halts_and_a_long_nop_moves_nothing() {
    let mut rig = rig();
    rig.start_ring();
    // NOP with a huge length and addresses that would wrap: completes at once, nothing moved.
    let r = rig.run(Descriptor {
        opcode: op::NOP,
        pasid: pasid_field::VALID | PASID,
        dst: u64::MAX - 8,
        len: 1 << 30,
        ..Default::default()
    });
    assert_eq!((r.status, r.bytes_completed), (cstatus::SUCCESS, 0));
    rig.w64(reg::CTRL, registers::ctrl::RESET);
    rig.w64(reg::RING_BASE, u64::MAX - 63);
    rig.w64(reg::RING_SIZE, 4);
    rig.w64(reg::CTRL, registers::ctrl::ENABLE);
    rig.w64(reg::RING_TAIL, 2);
    rig.wait_status(status::HALTED, true);
    assert_eq!(rig.r64(reg::ERROR), registers::error::RING_FETCH);
}
