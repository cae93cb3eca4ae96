//! One VT-d remapping hardware unit (the DRHD's registers and what they drive): the register
//! file, queued invalidation (VT-d 6.5.2) processed synchronously on every tail write — Linux's
//! `qi_submit_sync` spins with interrupts off until the wait descriptor's status write lands —
//! the fault and invalidation event interrupts through the MSI seam, and the way back to
//! functions with an ATC (device-TLB invalidations, [`crate::DeviceEndpoint`]).
//!
//! DMA through the unit ([`RemappingUnit::translate`], and [`VtdTranslator`], the
//! `DmaTranslator` devices' `DmaSpace`s use): with translation off, addresses pass through;
//! with it on, the root table's mode (RTADDR.TTM) picks the legacy walk ([`super::tables`]) or
//! the scalable-mode one ([`super::scalable`]); a failed walk records a primary fault (and
//! raises the fault event) and the device sees a translation fault.
//!
//! Translations go through the unit's caches ([`super::cache`], VT-d chapter 6): the context
//! cache, the PASID cache and the IOTLB, which every invalidation the unit processes
//! (descriptors, the CCMD and IOTLB registers, SRTP, TE) honours. Nothing not-present or
//! faulting is ever cached.
//!
//! Device TLBs and page requests (ECAP.DT, ECAP.PRS; VT-d 4 and 7.5): translation requests of
//! a device whose context enables the device TLB are answered with the translation — a
//! missing or read-only page is a completion without read and write permission, not a fault —
//! and page requests of a device whose context has Page Request Enable go to the page request
//! queue ([`RemappingUnit::page_request`]); the guest's page group responses go back to the
//! device through its [`DeviceEndpoint`].
//!
//! For testing device error paths, the control API can make the next N translations of a
//! requester ID fail as a real translation fault would ([`RemappingUnit::inject_faults`]),
//! force the next page group responses to Failure or Invalid, drop page requests as an
//! overflowing queue would, and slow invalidation waits down ([`SvaInjections`]).

use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::cache::{
    CacheCounters, CacheOccupancy, CachedContext, CachedPasid, FirstStageRights, IotlbEntry,
    NO_PASID, TranslationCaches,
};
use super::page_request::{DESCRIPTOR_SIZE, PageRequestDescriptor, decode_group_response};
use super::registers::{FaultRecord, RegisterAction, RegisterFile, VtdConfig};
use super::scalable::{PasidTranslation, ScalableRequest};
use super::tables::{Leaf, TranslationType, WalkRequest};
use crate::{
    AddressType, AtcInvalidation, Completion, DeviceEndpoint, DmaAccess, DmaError, DmaRequest,
    DmaTranslator, FunctionBinding, MsiMessage, MsiSink, PageRequest, PageResponse,
    PageResponseCode, Pasid, RequesterId, Translation,
};

/// Invalidation descriptor types (VT-d 6.5.2, Type\[3:0\] with Type\[6:4\] at bits 11:9).
pub mod descriptor {
    /// Context-cache invalidate.
    pub const CONTEXT_CACHE: u8 = 1;
    /// IOTLB invalidate.
    pub const IOTLB: u8 = 2;
    /// Device-TLB invalidate.
    pub const DEVICE_TLB: u8 = 3;
    /// Interrupt entry cache invalidate.
    pub const INTERRUPT_ENTRY_CACHE: u8 = 4;
    /// Invalidation wait.
    pub const WAIT: u8 = 5;
    /// PASID-based IOTLB invalidate.
    pub const PASID_IOTLB: u8 = 6;
    /// PASID-cache invalidate.
    pub const PASID_CACHE: u8 = 7;
    /// PASID-based device-TLB invalidate.
    pub const PASID_DEVICE_TLB: u8 = 8;
    /// Page group response.
    pub const PAGE_GROUP_RESPONSE: u8 = 9;
}

/// How long a wait descriptor waits for functions to complete earlier device-TLB
/// invalidations before reporting an invalidation time-out (ITE).
const DEVICE_TLB_TIMEOUT: Duration = Duration::from_secs(1);

/// One invalidation descriptor, 128 or 256 bits (the upper half is reserved in the forms used
/// here).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct Descriptor {
    /// The four quadwords (qw2, qw3 are zero for 128-bit descriptors).
    pub qw: [u64; 4],
}

impl Descriptor {
    /// The descriptor type (Type\[6:4\] from bits 11:9, Type\[3:0\] from bits 3:0).
    pub fn kind(&self) -> u8 {
        (((self.qw[0] >> 9) & 7) << 4) as u8 | (self.qw[0] & 0xf) as u8
    }
}

/// What the unit has done, for the control API and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnitCounters {
    /// Descriptors processed, by type (index = type, 0 unused).
    pub descriptors: [u64; 10],
    /// Invalidation queue errors reported.
    pub queue_errors: u64,
    /// Fault events and invalidation events signalled.
    pub interrupts: u64,
    /// Requests translated (translation on).
    pub translations: u64,
    /// Requests that faulted.
    pub faults: u64,
    /// Faults injected through [`RemappingUnit::inject_faults`] (counted in `faults` too).
    pub injected_faults: u64,
    /// IOTLB lookups answered from the cache.
    pub iotlb_hits: u64,
    /// IOTLB lookups that walked the tables.
    pub iotlb_misses: u64,
    /// Context-cache lookups answered from the cache.
    pub context_cache_hits: u64,
    /// Context-cache lookups that read the root and context tables.
    pub context_cache_misses: u64,
    /// PASID-cache lookups answered from the cache.
    pub pasid_cache_hits: u64,
    /// PASID-cache lookups that read the PASID directory and table.
    pub pasid_cache_misses: u64,
    /// ATS translation requests answered (with or without a translation).
    pub ats_translations: u64,
    /// ATS translation requests answered without read and write permission (the page was
    /// missing or did not allow the access: the device may send a page request).
    pub ats_denied: u64,
    /// Page requests received from devices.
    pub page_requests: u64,
    /// Page requests written to the page request queue.
    pub page_requests_queued: u64,
    /// Page requests lost to a full queue (or to an injected drop): PRS.PRO.
    pub prq_overflows: u64,
    /// Page group responses the unit sent on its own (PRE clear: Invalid Request; a lost last
    /// request of a group: Success, so the device retries).
    pub auto_responses: u64,
    /// Page group responses from software, by the code the device was given: Success.
    pub responses_success: u64,
    /// … Invalid Request.
    pub responses_invalid: u64,
    /// … Response Failure.
    pub responses_failure: u64,
    /// Page group responses whose code an injection replaced.
    pub injected_responses: u64,
    /// Invalidation waits held back by an injected delay.
    pub delayed_waits: u64,
}

/// Fault injection for shared virtual addressing (the control API's `iommu-inject-*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvaInjections {
    /// The next `.1` page group responses from software reach the device with code `.0`.
    pub forced_responses: Option<(PageResponseCode, u32)>,
    /// The next this many page requests are dropped as if the queue were full (PRS.PRO).
    pub dropped_page_requests: u32,
    /// Every invalidation wait descriptor completes this much later.
    pub wait_delay: Duration,
}

/// The longest injectable invalidation-wait delay.
pub const MAX_WAIT_DELAY: Duration = Duration::from_secs(10);

/// What translation needs from CAP/ECAP and the configuration.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    /// CAP.SAGAW.
    sagaw: u8,
    /// CAP.SLLPS.
    large_pages: u8,
    /// Host address width.
    width: u8,
    /// ECAP.SMTS.
    scalable: bool,
}

impl Geometry {
    fn of(config: VtdConfig) -> Self {
        let (cap, ecap) = config.capabilities();
        Geometry {
            sagaw: ((cap >> 8) & 0x1f) as u8,
            large_pages: ((cap >> 34) & 0xf) as u8,
            width: config.address_width,
            scalable: ecap & (1 << 43) != 0,
        }
    }
}

/// Most translation faults that can be pending injection for one requester ID.
pub const MAX_INJECTED_FAULTS: u32 = 65535;

/// One remapping unit.
pub struct RemappingUnit {
    regs: RegisterFile,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    msi: Arc<dyn MsiSink>,
    endpoints: Vec<(FunctionBinding, Arc<dyn DeviceEndpoint>)>,
    pending_device_tlb: Vec<Completion>,
    counters: UnitCounters,
    caches: TranslationCaches,
    /// CAP.SAGAW, CAP.SLLPS, the address width and ECAP.SMTS (fixed by the configuration).
    geometry: Geometry,
    /// Translation faults to inject: requester ID and how many of its next translations fail.
    injected: Vec<(RequesterId, u32)>,
    /// Page-request and invalidation-wait injections.
    sva_injections: SvaInjections,
}

impl std::fmt::Debug for RemappingUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemappingUnit")
            .field("regs", &self.regs)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// Why a descriptor was refused (IQER's "invalidation queue error info", VT-d 11.4.9.?): the
/// low bits of the recorded value.
mod queue_error {
    /// The tail points past the queue or is misaligned for the descriptor width.
    pub const TAIL: u64 = 1;
    /// A descriptor could not be fetched from the queue's memory.
    pub const FETCH: u64 = 2;
    /// An invalid or unsupported descriptor type, or reserved bits set.
    pub const DESCRIPTOR: u64 = 3;
    /// A wait descriptor's status address is not guest memory.
    pub const STATUS_WRITE: u64 = 4;
}

impl RemappingUnit {
    /// A unit after reset.
    pub fn new(
        config: VtdConfig,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        msi: Arc<dyn MsiSink>,
    ) -> Self {
        RemappingUnit {
            regs: RegisterFile::new(config),
            memory,
            msi,
            endpoints: Vec::new(),
            pending_device_tlb: Vec::new(),
            counters: UnitCounters::default(),
            caches: TranslationCaches::new(),
            geometry: Geometry::of(config),
            injected: Vec::new(),
            sva_injections: SvaInjections::default(),
        }
    }

    /// The page-request and invalidation-wait injections still pending.
    pub fn sva_injections(&self) -> SvaInjections {
        self.sva_injections
    }

    /// Makes the next `count` page group responses software sends reach their device as `code`
    /// (replacing what is pending). `count` 0 cancels.
    pub fn inject_page_responses(&mut self, code: PageResponseCode, count: u32) {
        self.sva_injections.forced_responses = (count > 0).then_some((code, count));
    }

    /// Drops the next `count` page requests as a full queue would (PRS.PRO; the last request
    /// of a group is answered Success so the device retries). Adds to what is pending.
    pub fn drop_page_requests(&mut self, count: u32) {
        let pending = &mut self.sva_injections.dropped_page_requests;
        *pending = pending.saturating_add(count);
    }

    /// Holds every later invalidation wait descriptor back by `delay` (at most
    /// [`MAX_WAIT_DELAY`]; zero turns it off), as a slow device-TLB flush would.
    pub fn set_wait_delay(&mut self, delay: Duration) {
        self.sva_injections.wait_delay = delay.min(MAX_WAIT_DELAY);
    }

    /// The register file.
    pub fn registers(&self) -> &RegisterFile {
        &self.regs
    }

    /// What the unit has done so far.
    pub fn counters(&self) -> UnitCounters {
        let CacheCounters {
            iotlb_hits,
            iotlb_misses,
            context_hits,
            context_misses,
            pasid_hits,
            pasid_misses,
        } = self.caches.counters();
        UnitCounters {
            iotlb_hits,
            iotlb_misses,
            context_cache_hits: context_hits,
            context_cache_misses: context_misses,
            pasid_cache_hits: pasid_hits,
            pasid_cache_misses: pasid_misses,
            ..self.counters
        }
    }

    /// How many entries the IOTLB, context cache and PASID cache hold.
    pub fn cache_occupancy(&self) -> CacheOccupancy {
        self.caches.occupancy()
    }

    /// Makes the next `count` translations requested by `requester_id` (while translation is
    /// enabled) fail as a not-present leaf would: a primary fault record with the source ID,
    /// PASID and address (reason 0x05/0x06 — write/read of a not-present second-stage page —
    /// for a legacy-mode root table; 0x71, first-stage entry not present, in scalable mode),
    /// the fault event, and [`DmaError::TranslationFault`] to the device. Adds to what is
    /// already pending for the requester, up to [`MAX_INJECTED_FAULTS`]; returns the number
    /// now pending.
    pub fn inject_faults(&mut self, requester_id: RequesterId, count: u32) -> u32 {
        if let Some((_, pending)) = self.injected.iter_mut().find(|(r, _)| *r == requester_id) {
            *pending = pending.saturating_add(count).min(MAX_INJECTED_FAULTS);
            *pending
        } else if count > 0 {
            let pending = count.min(MAX_INJECTED_FAULTS);
            // At most one slot per requester ID: bounded by 65536.
            self.injected.push((requester_id, pending));
            pending
        } else {
            0
        }
    }

    /// The devices the guest gave a present context entry (VT-d 9.1–9.6), in requester-ID
    /// order, read from the root and context tables in guest memory with the checked table
    /// readers (buses with no present root entry are skipped; garbage reads as errors, never a
    /// panic); at most `limit` of them, and whether there were more.
    pub fn device_contexts(&self, limit: usize) -> (Vec<DeviceContext>, bool) {
        let mut found = Vec::new();
        let rtaddr = self.regs.root_table();
        if self.regs.gsts() & super::registers::global::SRTP == 0 {
            return (found, false);
        }
        let root = rtaddr & !0xfff;
        let scalable = (rtaddr >> 10) & 3 == 1;
        let Geometry { sagaw, width, .. } = self.geometry;
        let memory = self.memory.memory();
        for bus in 0..=255u16 {
            let Ok(entry) = super::tables::read_entry::<super::tables::RootEntry, _>(
                &*memory,
                root,
                u64::from(bus) * 16,
                0,
            ) else {
                break; // the root table ends outside guest memory
            };
            let present = if scalable {
                entry.lo & 1 != 0 || entry.hi & 1 != 0
            } else {
                entry.present()
            };
            if !present {
                continue;
            }
            for devfn in 0..=255u16 {
                let sid = (bus << 8) | devfn;
                let context = if scalable {
                    self.scalable_device_context(&memory, root, sid)
                } else {
                    legacy_device_context(&memory, root, sid, sagaw, width)
                };
                if let Some(context) = context {
                    if found.len() == limit {
                        return (found, true);
                    }
                    found.push(context);
                }
            }
        }
        (found, false)
    }

    fn scalable_device_context(
        &self,
        memory: &GuestMemoryMmap,
        root: u64,
        sid: u16,
    ) -> Option<DeviceContext> {
        use super::scalable::reason;
        let Geometry { sagaw, width, .. } = self.geometry;
        let mut out = DeviceContext::new(RequesterId(sid));
        let context = match super::scalable::lookup_context(memory, root, sid, width) {
            Ok(context) => context,
            Err(reason::ROOT_NOT_PRESENT | reason::CONTEXT_NOT_PRESENT) => return None,
            Err(fault) => return Some(out.failed(fault)),
        };
        out.pasid_enabled = Some(context.pasid_enabled());
        out.device_tlb = context.device_tlb_enabled();
        let rid_pasid = context.rid_pasid();
        out.rid_pasid = Some(rid_pasid);
        let entry =
            match super::scalable::lookup_pasid_in_context(memory, &context, rid_pasid, width) {
                Ok(entry) => entry,
                Err(fault) => return Some(out.failed(fault)),
            };
        out.domain = Some((entry.qw[1] & 0xffff) as u16);
        let pgtt = (entry.qw[0] >> 6) & 7;
        out.translation = match pgtt {
            1 => "first-stage",
            2 => "second-stage",
            3 => "nested",
            4 => "pass-through",
            _ => "reserved",
        };
        out.address_width = match pgtt {
            1 => Some(48), // FLPM 0: 4-level paging
            2 | 3 => match (entry.qw[0] >> 2) & 7 {
                1 => Some(39),
                2 => Some(48),
                _ => None,
            },
            _ => None,
        };
        if let Err(fault) = entry.decode(sagaw, width) {
            return Some(out.failed(fault));
        }
        Some(out)
    }

    /// Translation faults still to inject, by requester ID.
    pub fn pending_injected_faults(&self) -> Vec<(RequesterId, u32)> {
        self.injected.clone()
    }

    /// Registers the way back to a function with an ATC or page requests.
    pub fn register_endpoint(
        &mut self,
        binding: FunctionBinding,
        endpoint: Arc<dyn DeviceEndpoint>,
    ) {
        self.endpoints.push((binding, endpoint));
    }

    /// A guest read of the register window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        self.regs.read(offset, data);
    }

    /// A guest write of the register window; everything it asks for is done before it returns.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for action in self.regs.write(offset, data) {
            match action {
                RegisterAction::SendFaultEvent => self.send_fault_event(),
                RegisterAction::SendInvalidationEvent => self.send_invalidation_event(),
                RegisterAction::SendPageRequestEvent => self.send_page_request_event(),
                RegisterAction::SetRootTable(rtaddr) => {
                    log::debug!("vt-d: root table {rtaddr:#x}");
                    self.caches.flush_all();
                }
                RegisterAction::Translation(on) => {
                    log::info!(
                        "vt-d: DMA remapping {}",
                        if on { "enabled" } else { "disabled" }
                    );
                    self.caches.flush_all();
                }
                RegisterAction::QueuedInvalidation(on) => {
                    log::debug!(
                        "vt-d: queued invalidation {}",
                        if on { "on" } else { "off" }
                    );
                }
                RegisterAction::InvalidateContextCache {
                    granularity,
                    domain,
                    source,
                    function_mask,
                } => self
                    .caches
                    .invalidate_context(granularity, domain, source, function_mask),
                RegisterAction::InvalidateIotlb {
                    granularity,
                    domain,
                    address,
                    address_mask,
                } => self
                    .caches
                    .invalidate_iotlb(granularity, domain, address, address_mask),
                RegisterAction::QueueTail(_) => {}
            }
        }
        // A tail write, or software clearing IQE after a bad descriptor: go on from the head.
        self.process_queue();
    }

    /// Translates one DMA request (VT-d chapter 3): pass-through while translation is off;
    /// otherwise the caches (VT-d chapter 6) and, on a miss, the walk for the root table's
    /// mode. A fault is recorded (fault event MSI if unmasked) and returned as
    /// [`DmaError::TranslationFault`].
    pub fn translate(&mut self, request: &DmaRequest) -> Result<Translation, DmaError> {
        if !self.regs.translation_enabled() {
            return Ok(Translation {
                execute: true,
                privileged: true,
                ..Translation::new(request.address, request.len.max(1), true, true)
            });
        }
        self.counters.translations += 1;
        let write = request.access == DmaAccess::Write;
        let scalable = (self.regs.root_table() >> 10) & 3 == 1;
        if !self.injected.is_empty() && self.take_injected(request.requester_id) {
            self.counters.injected_faults += 1;
            let reason = if scalable {
                super::scalable::reason::FIRST_STAGE_NOT_PRESENT
            } else if write {
                super::tables::reason::NO_WRITE
            } else {
                super::tables::reason::NO_READ
            };
            return Err(self.fault(request, reason));
        }
        match request.address_type {
            AddressType::Untranslated => {}
            AddressType::TranslationRequest => return self.translation_request(request, scalable),
            AddressType::Translated => {
                // ATS-translated requests pass untranslated when the device's context enables
                // its device TLB (VT-d 4.2.3); otherwise they are blocked.
                return if self.device_tlb_enabled(request.requester_id.0, scalable) {
                    Ok(Translation {
                        execute: true,
                        privileged: true,
                        ..Translation::new(request.address, request.len.max(1), true, true)
                    })
                } else {
                    Err(self.fault(request, blocked_reason(scalable)))
                };
            }
        }
        let result = if scalable {
            self.translate_scalable(request)
        } else if request.pasid.is_some() {
            Err(0x31) // SM: TTM 0 for a request with PASID
        } else {
            self.translate_legacy(request)
        };
        match result {
            Ok(leaf) => {
                let offset = request.address & (leaf.page_size - 1);
                Ok(Translation {
                    page_size: leaf.page_size,
                    ..Translation::new(
                        leaf.page + offset,
                        leaf.page_size - offset,
                        leaf.read,
                        leaf.write,
                    )
                })
            }
            Err(reason) => Err(self.fault(request, reason)),
        }
    }

    /// An ATS translation request (PCIe Base Spec r6.0 §10.2.2; VT-d 4.2): refused with a fault
    /// unless the unit has device TLBs and the device's context enables its device TLB;
    /// otherwise the translation — a page-level failure (not present, not writable for a
    /// write, user to supervisor) is a completion with neither read nor write permission, no
    /// fault recorded, so the device may send a page request. A read request is never granted
    /// write permission: the device asks again to write, which sets the Dirty bit.
    fn translation_request(
        &mut self,
        request: &DmaRequest,
        scalable: bool,
    ) -> Result<Translation, DmaError> {
        self.counters.ats_translations += 1;
        if !self.regs.device_tlb_supported()
            || !self.device_tlb_enabled(request.requester_id.0, scalable)
        {
            return Err(self.fault(request, blocked_reason(scalable)));
        }
        let result = if scalable {
            self.translate_scalable(request)
        } else if request.pasid.is_some() {
            Err(0x31)
        } else {
            self.translate_legacy(request)
        };
        let write = request.access == DmaAccess::Write;
        match result {
            Ok(leaf) => {
                let offset = request.address & (leaf.page_size - 1);
                Ok(Translation {
                    page_size: leaf.page_size,
                    privileged: request.privileged,
                    ..Translation::new(
                        leaf.page + offset,
                        leaf.page_size - offset,
                        leaf.read,
                        leaf.write && write,
                    )
                })
            }
            Err(reason) if page_level_reason(reason) => {
                self.counters.ats_denied += 1;
                let offset = request.address & 0xfff;
                Ok(Translation {
                    page_size: 4096,
                    ..Translation::new(0, 4096 - offset, false, false)
                })
            }
            Err(reason) => Err(self.fault(request, reason)),
        }
    }

    /// Whether `sid`'s context enables its device TLB (scalable: DTE; legacy: TT = 01b).
    fn device_tlb_enabled(&mut self, sid: u16, scalable: bool) -> bool {
        let Geometry { sagaw, width, .. } = self.geometry;
        match self.caches.context(sid) {
            Some(CachedContext::Scalable(c)) if scalable => return c.device_tlb_enabled(),
            Some(CachedContext::Legacy(c)) if !scalable => {
                return c.translation_type == TranslationType::WithDeviceTlb;
            }
            _ => {}
        }
        let root = self.regs.root_table() & !0xfff;
        let memory = self.memory.memory();
        if scalable {
            super::scalable::lookup_context(&*memory, root, sid, width)
                .is_ok_and(|c| c.device_tlb_enabled())
        } else {
            super::tables::lookup_context(&*memory, root, sid, width)
                .and_then(|e| e.decode(sagaw, width))
                .is_ok_and(|c| c.translation_type == TranslationType::WithDeviceTlb)
        }
    }

    /// A PRI page request from a device (VT-d 7.5.1): written to the page request queue with
    /// PRS.PPR and the page request event, when the unit supports page requests and the
    /// device's scalable-mode context has Page Request Enable. Otherwise the unit answers the
    /// group itself: Invalid Request when the context does not take page requests; Success
    /// when the request was lost to a full queue (PRS.PRO), so the device asks again. Errors
    /// only when the unit has no page request support at all.
    pub fn page_request(&mut self, request: &PageRequest) -> Result<(), DmaError> {
        if !self.regs.page_requests_supported() {
            return Err(DmaError::PageRequestUnsupported);
        }
        self.counters.page_requests += 1;
        let sid = request.requester_id.0;
        if !self.page_requests_enabled(sid) {
            log::debug!(
                "vt-d: page request from {} without PRE",
                request.requester_id
            );
            self.auto_respond(request, PageResponseCode::InvalidRequest);
            return Ok(());
        }
        let dropped = self.sva_injections.dropped_page_requests > 0;
        if dropped {
            self.sva_injections.dropped_page_requests -= 1;
        }
        let (base, entries, head, tail) = self.regs.page_request_queue();
        let next = (tail + 1) % entries;
        let overflowing = self.regs.page_request_status() & super::registers::prs::PRO != 0;
        let written = !dropped
            && !overflowing
            && next != head
            && base.checked_add(tail * DESCRIPTOR_SIZE).is_some_and(|gpa| {
                let d = PageRequestDescriptor::new(request);
                self.memory
                    .memory()
                    .write_slice(zerocopy::IntoBytes::as_bytes(&d), GuestAddress(gpa))
                    .is_ok()
            });
        if written {
            self.counters.page_requests_queued += 1;
            if self.regs.page_request_queued(next) {
                self.send_page_request_event();
            }
        } else {
            self.counters.prq_overflows += 1;
            if self.regs.page_request_overflow() {
                self.send_page_request_event();
            }
            self.auto_respond(request, PageResponseCode::Success);
        }
        Ok(())
    }

    /// Whether `sid`'s scalable-mode context takes page requests (PRE).
    fn page_requests_enabled(&mut self, sid: u16) -> bool {
        if (self.regs.root_table() >> 10) & 3 != 1 || !self.regs.translation_enabled() {
            return false;
        }
        if let Some(CachedContext::Scalable(c)) = self.caches.context(sid) {
            return c.page_requests_enabled();
        }
        let root = self.regs.root_table() & !0xfff;
        super::scalable::lookup_context(&*self.memory.memory(), root, sid, self.geometry.width)
            .is_ok_and(|c| c.page_requests_enabled())
    }

    /// The unit's own answer to the group of `request` (sent only for the last request of a
    /// group, as a response answers the whole group).
    fn auto_respond(&mut self, request: &PageRequest, code: PageResponseCode) {
        if !request.last_in_group {
            return;
        }
        self.counters.auto_responses += 1;
        self.respond(
            request.requester_id,
            PageResponse {
                pasid: request.pasid,
                group_index: request.group_index,
                code,
            },
        );
    }

    /// Hands `response` to the function at `requester_id` (if one is registered).
    fn respond(&self, requester_id: RequesterId, response: PageResponse) {
        let mut delivered = false;
        for (binding, endpoint) in &self.endpoints {
            if binding.requester_id() == requester_id {
                endpoint.page_response(response);
                delivered = true;
            }
        }
        if !delivered {
            log::debug!("vt-d: page group response for {requester_id}, which has no endpoint");
        }
    }

    /// A page group response descriptor (type 9): to the device, with an injected code if one
    /// is pending; counted by the code the device gets.
    fn page_group_response(&mut self, desc: &Descriptor) {
        let decoded = decode_group_response(desc.qw[0], desc.qw[1]);
        let mut response = decoded.response;
        if let Some((code, count)) = self.sva_injections.forced_responses {
            response.code = code;
            self.counters.injected_responses += 1;
            self.sva_injections.forced_responses = (count > 1).then_some((code, count - 1));
        }
        match response.code {
            PageResponseCode::Success => self.counters.responses_success += 1,
            PageResponseCode::InvalidRequest => self.counters.responses_invalid += 1,
            PageResponseCode::ResponseFailure => self.counters.responses_failure += 1,
        }
        self.respond(decoded.requester_id, response);
    }

    /// Consumes one pending injected fault of `requester_id`, if any.
    fn take_injected(&mut self, requester_id: RequesterId) -> bool {
        let Some(index) = self.injected.iter().position(|(r, _)| *r == requester_id) else {
            return false;
        };
        let pending = &mut self.injected[index].1;
        *pending = pending.saturating_sub(1);
        if *pending == 0 {
            self.injected.swap_remove(index);
        }
        true
    }

    /// Records a primary fault for `request` (fault event if unmasked) and returns the error
    /// the device sees.
    fn fault(&mut self, request: &DmaRequest, reason: u8) -> DmaError {
        self.counters.faults += 1;
        let signal = self.regs.record_fault(FaultRecord {
            source_id: request.requester_id.0,
            pasid: request.pasid.map(Pasid::value),
            address: request.address,
            reason,
            write: request.access == DmaAccess::Write,
            execute: false,
            privileged: request.privileged,
        });
        if signal {
            self.send_fault_event();
        }
        DmaError::TranslationFault {
            requester_id: request.requester_id,
            iova: request.address,
            access: request.access,
            reason: format!("VT-d fault reason {reason:#04x}"),
        }
    }

    /// Legacy mode: context cache, IOTLB (tagged with the context's domain), then the
    /// second-stage walk.
    fn translate_legacy(&mut self, request: &DmaRequest) -> Result<Leaf, u8> {
        let write = request.access == DmaAccess::Write;
        let Geometry {
            sagaw,
            large_pages,
            width,
            ..
        } = self.geometry;
        let sid = request.requester_id.0;
        if let Some(hit) = self.caches.front(sid, NO_PASID, request.address, |e| {
            e.grants(write, false, false)
        }) {
            return Ok(hit.leaf(false));
        }
        let context = match self.caches.context(sid) {
            Some(CachedContext::Legacy(context)) => context,
            _ => {
                let root = self.regs.root_table() & !0xfff;
                let context =
                    super::tables::lookup_context(&*self.memory.memory(), root, sid, width)
                        .and_then(|entry| entry.decode(sagaw, width))?;
                self.caches
                    .insert_context(sid, CachedContext::Legacy(context));
                context
            }
        };
        if context.translation_type == TranslationType::PassThrough {
            return Ok(identity(request.address));
        }
        if let Some(hit) = self
            .caches
            .iotlb(context.domain, NO_PASID, request.address, |e| {
                e.grants(write, false, false)
            })
        {
            self.caches.fill_front(sid, NO_PASID, request.address, hit);
            return Ok(hit.leaf(false));
        }
        let walk = WalkRequest {
            address: request.address,
            write,
        };
        let leaf = super::tables::second_stage_walk(
            &*self.memory.memory(),
            &context,
            walk,
            width,
            large_pages,
        )?;
        let entry = IotlbEntry {
            page: leaf.page,
            page_size: leaf.page_size,
            read: leaf.read,
            write: leaf.write,
            first_stage: None,
        };
        self.caches
            .insert_iotlb(context.domain, NO_PASID, request.address, entry);
        self.caches
            .fill_front(sid, NO_PASID, request.address, entry);
        Ok(leaf)
    }

    /// Scalable mode: context cache, PASID cache, IOTLB (tagged with the PASID entry's domain
    /// and the PASID — RID_PASID for requests without one), then the first- or second-stage
    /// walk.
    fn translate_scalable(&mut self, request: &DmaRequest) -> Result<Leaf, u8> {
        use super::scalable::reason;
        let Geometry {
            sagaw,
            large_pages,
            width,
            scalable,
        } = self.geometry;
        if !scalable {
            return Err(reason::ROOT_TABLE_ADDRESS);
        }
        let write = request.access == DmaAccess::Write;
        let sid = request.requester_id.0;
        let tag = request.pasid.map_or(NO_PASID, Pasid::value);
        let privileged = request.privileged;
        if let Some(hit) = self.caches.front(sid, tag, request.address, |e| {
            e.grants(write, privileged, false)
        }) {
            return Ok(hit.leaf(privileged));
        }
        let context = match self.caches.context(sid) {
            Some(CachedContext::Scalable(context)) => context,
            _ => {
                let root = self.regs.root_table() & !0xfff;
                let context =
                    super::scalable::lookup_context(&*self.memory.memory(), root, sid, width)?;
                self.caches
                    .insert_context(sid, CachedContext::Scalable(context));
                context
            }
        };
        let pasid = context.pasid_for(request.pasid.map(Pasid::value))?;
        let cached = match self.caches.pasid(sid, pasid) {
            Some(cached) => cached,
            None => {
                let entry = super::scalable::lookup_pasid_in_context(
                    &*self.memory.memory(),
                    &context,
                    pasid,
                    width,
                )?;
                let cached = CachedPasid {
                    translation: entry.decode(sagaw, width)?,
                    domain: (entry.qw[1] & 0xffff) as u16,
                };
                self.caches.insert_pasid(sid, pasid, cached);
                cached
            }
        };
        let sreq = ScalableRequest {
            walk: WalkRequest {
                address: request.address,
                write,
            },
            pasid: request.pasid.map(Pasid::value),
            privileged: request.privileged,
            execute: false,
        };
        if cached.translation == PasidTranslation::PassThrough {
            return Ok(identity(request.address));
        }
        if let Some(hit) = self
            .caches
            .iotlb(cached.domain, pasid, request.address, |e| {
                e.grants(write, sreq.privileged, sreq.execute)
            })
        {
            self.caches.fill_front(sid, tag, request.address, hit);
            return Ok(hit.leaf(privileged));
        }
        let memory = self.memory.memory();
        let (leaf, first_stage) = match cached.translation {
            PasidTranslation::FirstStage {
                root,
                supervisor,
                write_protect,
            } => {
                let detail = super::scalable::first_stage_walk_detailed(
                    &*memory,
                    root,
                    &sreq,
                    supervisor,
                    write_protect,
                    width,
                )?;
                (
                    detail.leaf,
                    Some(FirstStageRights {
                        writable: detail.writable,
                        user: detail.user,
                        executable: detail.executable,
                        dirty: detail.dirty,
                        supervisor,
                        write_protect,
                    }),
                )
            }
            PasidTranslation::SecondStage(context) => {
                let leaf = super::tables::second_stage_walk(
                    &*memory,
                    &context,
                    sreq.walk,
                    width,
                    large_pages,
                )
                .map_err(super::scalable::second_stage_reason)?;
                (leaf, None)
            }
            PasidTranslation::PassThrough => return Ok(identity(request.address)),
        };
        drop(memory);
        let entry = IotlbEntry {
            page: leaf.page,
            page_size: leaf.page_size,
            read: leaf.read,
            write: leaf.write,
            first_stage,
        };
        self.caches
            .insert_iotlb(cached.domain, pasid, request.address, entry);
        self.caches.fill_front(sid, tag, request.address, entry);
        Ok(leaf)
    }

    fn deliver(&mut self, (address, upper, data): (u32, u32, u32)) {
        self.counters.interrupts += 1;
        let msg = MsiMessage {
            address: (u64::from(upper) << 32) | u64::from(address),
            data,
            requester_id: RequesterId(0),
        };
        if let Err(e) = self.msi.deliver(msg) {
            log::warn!("vt-d: event interrupt: {e}");
        }
    }

    fn send_fault_event(&mut self) {
        let message = self.regs.fault_event_message();
        self.deliver(message);
    }

    fn send_invalidation_event(&mut self) {
        let message = self.regs.invalidation_event_message();
        self.deliver(message);
    }

    fn send_page_request_event(&mut self) {
        let message = self.regs.page_request_event_message();
        self.deliver(message);
    }

    fn report_queue_error(&mut self, info: u64) {
        self.counters.queue_errors += 1;
        log::debug!("vt-d: invalidation queue error {info:#x}");
        if self.regs.queue_error(info) {
            self.send_fault_event();
        }
    }

    /// Processes descriptors from the head to the tail, unless the queue is off or stopped on
    /// an error (FSTS.IQE set).
    fn process_queue(&mut self) {
        if !self.regs.queued_invalidation_enabled() {
            return;
        }
        let mut fsts = [0u8; 4];
        self.regs.read(super::registers::offset::FSTS, &mut fsts);
        if u32::from_le_bytes(fsts) & super::registers::fsts::IQE != 0 {
            return;
        }
        let (base, entries, wide, mut head, tail) = self.regs.queue();
        let mut raw_tail = [0u8; 8];
        self.regs.read(super::registers::offset::IQT, &mut raw_tail);
        let misaligned = wide && u64::from_le_bytes(raw_tail) & 0x10 != 0;
        if tail >= entries || misaligned {
            self.report_queue_error(queue_error::TAIL);
            return;
        }
        let size = if wide { 32 } else { 16 };
        let mut guard = 0;
        while head != tail && guard < entries {
            guard += 1;
            let mut desc = Descriptor::default();
            let bytes = &mut desc.as_mut_bytes()[..size];
            // The queue base is guest-programmed: a queue wrapping the address space faults.
            let fetched = base.checked_add(head * size as u64).is_some_and(|gpa| {
                self.memory
                    .memory()
                    .read_slice(bytes, GuestAddress(gpa))
                    .is_ok()
            });
            if !fetched {
                self.report_queue_error(queue_error::FETCH);
                return;
            }
            if let Err(info) = self.execute(&desc, wide) {
                self.report_queue_error(info);
                return;
            }
            head = (head + 1) % entries;
            self.regs.set_queue_head(head);
        }
    }

    /// Carries out one descriptor.
    fn execute(&mut self, desc: &Descriptor, wide: bool) -> Result<(), u64> {
        let kind = desc.kind();
        let reserved_upper = wide && (desc.qw[2] != 0 || desc.qw[3] != 0);
        match kind {
            descriptor::CONTEXT_CACHE
            | descriptor::IOTLB
            | descriptor::PASID_IOTLB
            | descriptor::PASID_CACHE => {
                if reserved_upper {
                    return Err(queue_error::DESCRIPTOR);
                }
                self.invalidate_caches(desc);
            }
            descriptor::DEVICE_TLB | descriptor::PASID_DEVICE_TLB => {
                if reserved_upper {
                    return Err(queue_error::DESCRIPTOR);
                }
                self.invalidate_device_tlb(desc);
            }
            descriptor::WAIT => self.wait(desc)?,
            descriptor::PAGE_GROUP_RESPONSE if self.regs.page_requests_supported() => {
                if reserved_upper {
                    return Err(queue_error::DESCRIPTOR);
                }
                self.page_group_response(desc);
            }
            _ => return Err(queue_error::DESCRIPTOR),
        }
        self.counters.descriptors[usize::from(kind)] += 1;
        Ok(())
    }

    /// A context-cache (type 1), IOTLB (2), PASID-based IOTLB (6) or PASID-cache (7)
    /// invalidation (VT-d 6.5.2.1–6.5.2.4): granularity in 5:4 and DID in 31:16 of qw0 for all;
    /// type 1 SID 47:32 and FM 49:48; types 6 and 7 PASID 51:32; types 2 and 6 qw1 address
    /// 63:12, IH 6, AM 5:0.
    fn invalidate_caches(&mut self, desc: &Descriptor) {
        let qw0 = desc.qw[0];
        let granularity = ((qw0 >> 4) & 3) as u8;
        let domain = (qw0 >> 16) as u16;
        let pasid = ((qw0 >> 32) & 0xf_ffff) as u32;
        let address = desc.qw[1] & !0xfff;
        let address_mask = (desc.qw[1] & 0x3f) as u8;
        match desc.kind() {
            descriptor::CONTEXT_CACHE => self.caches.invalidate_context(
                granularity,
                domain,
                (qw0 >> 32) as u16,
                ((qw0 >> 48) & 3) as u8,
            ),
            descriptor::IOTLB => {
                self.caches
                    .invalidate_iotlb(granularity, domain, address, address_mask);
            }
            descriptor::PASID_IOTLB => self.caches.invalidate_pasid_iotlb(
                granularity,
                domain,
                pasid,
                address,
                address_mask,
            ),
            _ => self
                .caches
                .invalidate_pasid_cache(granularity, domain, pasid),
        }
    }

    /// A device-TLB invalidation (type 3: SID 47:32, address 63:12 with S at bit 0 of qw1) or
    /// its PASID-based form (type 8: SID 31:16, PASID 51:32; qw1 G bit 0, S bit 11, address).
    fn invalidate_device_tlb(&mut self, desc: &Descriptor) {
        let (source, pasid, global, size_bit) = if desc.kind() == descriptor::DEVICE_TLB {
            ((desc.qw[0] >> 32) as u16, None, false, 1)
        } else {
            (
                (desc.qw[0] >> 16) as u16,
                Pasid::new(((desc.qw[0] >> 32) & 0xf_ffff) as u32),
                desc.qw[1] & 1 != 0,
                1 << 11,
            )
        };
        let raw = desc.qw[1] & !0xfff;
        // S = 1: the lowest clear bit of the address (from bit 12) gives the size.
        let (address, size) = if desc.qw[1] & size_bit != 0 {
            let ones = (raw >> 12).trailing_ones();
            if ones >= 51 {
                (0, u64::MAX)
            } else {
                let size = 1u64 << (12 + ones + 1);
                (raw & !(size - 1), size)
            }
        } else {
            (raw, 4096)
        };
        let rid = RequesterId(source);
        for (binding, endpoint) in &self.endpoints {
            if binding.requester_id() == rid {
                let completion = Completion::new();
                self.pending_device_tlb.push(completion.clone());
                endpoint.invalidate_atc(AtcInvalidation {
                    pasid,
                    global,
                    address,
                    size,
                    completion,
                });
            }
        }
    }

    /// An invalidation wait (type 5): IF 4, SW 5, FN 6, PD 7, status data 63:32; status address
    /// qw1 63:2. Earlier device-TLB invalidations complete first (or the wait times out: ITE).
    fn wait(&mut self, desc: &Descriptor) -> Result<(), u64> {
        let interrupt = desc.qw[0] & (1 << 4) != 0;
        let status_write = desc.qw[0] & (1 << 5) != 0;
        let delay = self.sva_injections.wait_delay;
        if !delay.is_zero() {
            self.counters.delayed_waits += 1;
            std::thread::sleep(delay);
        }
        for completion in std::mem::take(&mut self.pending_device_tlb) {
            if !completion.wait(DEVICE_TLB_TIMEOUT) {
                log::warn!("vt-d: a device-TLB invalidation did not complete");
                if self.regs.invalidation_time_out() {
                    self.send_fault_event();
                }
            }
        }
        if status_write {
            let data = (desc.qw[0] >> 32) as u32;
            let address = desc.qw[1] & !3;
            self.memory
                .memory()
                .write_obj(data, GuestAddress(address))
                .map_err(|_| queue_error::STATUS_WRITE)?;
        }
        if interrupt && self.regs.invalidation_complete() {
            self.send_invalidation_event();
        }
        Ok(())
    }
}

/// What `iommu-state` shows of one device's context (VT-d 9.3 legacy, 9.4 + 9.6 scalable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceContext {
    /// The device.
    pub requester_id: RequesterId,
    /// Domain ID (legacy: the context entry's; scalable: the RID_PASID PASID entry's).
    pub domain: Option<u16>,
    /// Legacy: "multi-level", "dev-tlb", "pass-through" (TT); scalable: the RID_PASID entry's
    /// PGTT, "first-stage", "second-stage", "nested", "pass-through"; "reserved" otherwise.
    pub translation: &'static str,
    /// Input address width of the tables, when they have one (39 or 48).
    pub address_width: Option<u8>,
    /// Scalable mode: PASID Enable.
    pub pasid_enabled: Option<bool>,
    /// Scalable mode: RID_PASID.
    pub rid_pasid: Option<u32>,
    /// Scalable mode: Device-TLB Enable (legacy: TT dev-tlb).
    pub device_tlb: bool,
    /// The fault a request from the device would see, for a present but bad entry.
    pub fault_reason: Option<u8>,
}

impl DeviceContext {
    fn new(requester_id: RequesterId) -> Self {
        DeviceContext {
            requester_id,
            domain: None,
            translation: "reserved",
            address_width: None,
            pasid_enabled: None,
            rid_pasid: None,
            device_tlb: false,
            fault_reason: None,
        }
    }

    fn failed(mut self, reason: u8) -> Self {
        self.fault_reason = Some(reason);
        self
    }
}

/// The legacy-mode context of `sid`, if present.
fn legacy_device_context(
    memory: &GuestMemoryMmap,
    root: u64,
    sid: u16,
    sagaw: u8,
    width: u8,
) -> Option<DeviceContext> {
    use super::tables::reason;
    let mut out = DeviceContext::new(RequesterId(sid));
    let entry = match super::tables::lookup_context(memory, root, sid, width) {
        Ok(entry) => entry,
        Err(reason::ROOT_NOT_PRESENT | reason::CONTEXT_NOT_PRESENT) => return None,
        Err(fault) => return Some(out.failed(fault)),
    };
    out.domain = Some(((entry.hi >> 8) & 0xffff) as u16);
    out.translation = match (entry.lo >> 2) & 3 {
        0 => "multi-level",
        1 => "dev-tlb",
        2 => "pass-through",
        _ => "reserved",
    };
    out.device_tlb = (entry.lo >> 2) & 3 == 1;
    out.address_width = match entry.hi & 7 {
        1 => Some(39),
        2 => Some(48),
        _ => None,
    };
    if let Err(fault) = entry.decode(sagaw, width) {
        return Some(out.failed(fault));
    }
    Some(out)
}

/// The fault reason of a request the context blocks (a translated or translation request
/// without the device TLB enabled).
fn blocked_reason(scalable: bool) -> u8 {
    if scalable {
        super::scalable::reason::DTE_CLEAR
    } else {
        super::tables::reason::BLOCKED
    }
}

/// Whether a fault reason is about the page itself (not present, or the access not allowed),
/// which an ATS translation request reports as a completion without permissions.
fn page_level_reason(reason: u8) -> bool {
    use super::scalable::reason as sm;
    use super::tables::reason as legacy;
    matches!(
        reason,
        sm::FIRST_STAGE_NOT_PRESENT
            | sm::SECOND_STAGE_PERMISSION
            | sm::USER_TO_SUPERVISOR
            | sm::NO_EXECUTE
            | sm::NO_WRITE
            | sm::NO_READ
            | legacy::NO_WRITE
            | legacy::NO_READ
    )
}

/// The pass-through translation of `address`: its own 4 KiB page, read/write.
fn identity(address: u64) -> Leaf {
    Leaf {
        page: address & !0xfff,
        page_size: 4096,
        read: true,
        write: true,
    }
}

/// The `DmaTranslator` of a remapping unit shared with its register window: every device
/// behind the unit gets a `DmaSpace` with this translator.
#[derive(Clone)]
pub struct VtdTranslator {
    unit: Arc<std::sync::Mutex<RemappingUnit>>,
}

impl std::fmt::Debug for VtdTranslator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VtdTranslator").finish_non_exhaustive()
    }
}

impl VtdTranslator {
    /// A translator for `unit`.
    pub fn new(unit: Arc<std::sync::Mutex<RemappingUnit>>) -> Self {
        VtdTranslator { unit }
    }
}

impl DmaTranslator for VtdTranslator {
    fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError> {
        if request.address_type == AddressType::Translated {
            // An ATS-translated request carries a guest-physical address the unit handed out
            // in a translation completion, only to a device whose context enables its device
            // TLB: it passes without the unit (VT-d 4.2.3). Not taking the unit's lock here is
            // what lets a device finish the access in flight — and then complete a device-TLB
            // invalidation — while the unit waits for that completion in a wait descriptor.
            return Ok(Translation {
                execute: true,
                privileged: true,
                ..Translation::new(request.address, request.len.max(1), true, true)
            });
        }
        self.unit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .translate(request)
    }

    fn page_request(&self, request: &PageRequest) -> Result<(), DmaError> {
        self.unit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .page_request(request)
    }

    fn register_endpoint(&self, binding: FunctionBinding, endpoint: Arc<dyn DeviceEndpoint>) {
        self.unit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_endpoint(binding, endpoint);
    }
}

#[cfg(test)]
mod tests {
    use super::super::registers::{global, iqa, offset};
    use super::*;
    use crate::RecordingMsiSink;

    const QUEUE: u64 = 0x10_0000;
    const STATUS: u64 = 0x20_0000;

    fn unit(sink: Arc<RecordingMsiSink>) -> (RemappingUnit, GuestMemoryAtomic<GuestMemoryMmap>) {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap(),
        );
        (
            RemappingUnit::new(VtdConfig::default(), mem.clone(), sink),
            mem,
        )
    }

    fn w32(u: &mut RemappingUnit, off: u64, v: u32) {
        u.write(off, &v.to_le_bytes());
    }

    fn w64(u: &mut RemappingUnit, off: u64, v: u64) {
        u.write(off, &v.to_le_bytes());
    }

    fn r32(u: &RemappingUnit, off: u64) -> u32 {
        let mut b = [0u8; 4];
        u.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn put(mem: &GuestMemoryAtomic<GuestMemoryMmap>, index: u64, desc: [u64; 4]) {
        let d = Descriptor { qw: desc };
        mem.memory()
            .write_slice(d.as_bytes(), GuestAddress(QUEUE + index * 32))
            .unwrap();
    }

    /// Linux's `dmar_enable_qi` in scalable mode: IQA with 256-bit descriptors, QIE.
    fn enable_queue(u: &mut RemappingUnit) {
        w64(u, offset::IQA, QUEUE | iqa::DW | 1);
        w32(u, offset::GCMD, global::QIE);
    }

    fn wait_descriptor(status: u32, interrupt: bool) -> [u64; 4] {
        let mut qw0 = 5 | (1 << 5) | (u64::from(status) << 32);
        if interrupt {
            qw0 |= 1 << 4;
        }
        [qw0, STATUS, 0, 0]
    }

    #[test]
    fn a_wait_descriptor_writes_its_status_before_the_tail_write_returns() {
        let sink = Arc::new(RecordingMsiSink::new());
        let (mut u, mem) = unit(sink.clone());
        enable_queue(&mut u);
        // qi_submit_sync: the IOTLB invalidation, then a wait with status write.
        put(&mem, 0, [2 | (1 << 4), 0, 0, 0]); // global IOTLB
        put(&mem, 1, wait_descriptor(1, false));
        w64(&mut u, offset::IQT, 2 << 5);
        assert_eq!(
            mem.memory().read_obj::<u32>(GuestAddress(STATUS)).unwrap(),
            1
        );
        let mut head = [0u8; 8];
        u.read(offset::IQH, &mut head);
        assert_eq!(u64::from_le_bytes(head), 2 << 5);
        let c = u.counters();
        assert_eq!(
            (c.descriptors[2], c.descriptors[5], c.queue_errors),
            (1, 1, 0)
        );
        assert!(sink.take().is_empty());
    }

    #[test]
    fn a_wait_with_interrupt_sets_iwc_and_signals_when_unmasked() {
        let sink = Arc::new(RecordingMsiSink::new());
        let (mut u, mem) = unit(sink.clone());
        enable_queue(&mut u);
        w32(&mut u, offset::IEDATA, 0x41);
        w32(&mut u, offset::IEADDR, 0xfee0_0000);
        w32(&mut u, offset::IECTL, 0);
        put(&mem, 0, wait_descriptor(7, true));
        w64(&mut u, offset::IQT, 1 << 5);
        assert_eq!(r32(&u, offset::ICS), 1);
        let msgs = sink.take();
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].address, msgs[0].data), (0xfee0_0000, 0x41));
    }

    #[test]
    fn bad_descriptors_and_tails_stop_the_queue_with_iqe_until_cleared() {
        let sink = Arc::new(RecordingMsiSink::new());
        let (mut u, mem) = unit(sink.clone());
        w32(&mut u, offset::FEDATA, 0x30);
        w32(&mut u, offset::FEADDR, 0xfee0_0000);
        w32(&mut u, offset::FECTL, 0);
        enable_queue(&mut u);
        // Descriptor 0: type 15 (invalid). Descriptor 1: a wait.
        put(&mem, 0, [0xf, 0, 0, 0]);
        put(&mem, 1, wait_descriptor(9, false));
        w64(&mut u, offset::IQT, 2 << 5);
        assert_ne!(
            r32(&u, offset::FSTS) & super::super::registers::fsts::IQE,
            0
        );
        assert_eq!(sink.take().len(), 1, "fault event for IQE");
        assert_eq!(
            mem.memory().read_obj::<u32>(GuestAddress(STATUS)).unwrap(),
            0
        );
        // Linux's qi_check_fault: replace the bad descriptor with the wait, clear IQE.
        put(&mem, 0, wait_descriptor(9, false));
        w32(&mut u, offset::FSTS, super::super::registers::fsts::IQE);
        assert_eq!(
            mem.memory().read_obj::<u32>(GuestAddress(STATUS)).unwrap(),
            9
        );
        assert_eq!(u.registers().queue().3, 2, "head caught up");
        // A tail past the queue (256 entries) and a misaligned one: IQE again.
        w64(&mut u, offset::IQT, 300 << 5);
        assert_ne!(
            r32(&u, offset::FSTS) & super::super::registers::fsts::IQE,
            0
        );
        w32(&mut u, offset::FSTS, super::super::registers::fsts::IQE);
        w64(&mut u, offset::IQT, (3 << 5) | 0x10);
        assert_ne!(
            r32(&u, offset::FSTS) & super::super::registers::fsts::IQE,
            0
        );
        // Reserved upper half of a 256-bit IOTLB descriptor.
        w32(&mut u, offset::FSTS, super::super::registers::fsts::IQE);
        let (_, _, _, head, _) = u.registers().queue();
        put(&mem, head, [2 | (1 << 4), 0, 1, 0]);
        w64(&mut u, offset::IQT, (head + 1) << 5);
        assert_ne!(
            r32(&u, offset::FSTS) & super::super::registers::fsts::IQE,
            0
        );
        assert!(u.counters().queue_errors >= 4);
    }

    /// What an invalidation asked: PASID, address, size, global.
    type Seen = (Option<Pasid>, u64, u64, bool);

    #[derive(Default)]
    struct Atc(std::sync::Mutex<Vec<Seen>>);

    impl DeviceEndpoint for Atc {
        fn invalidate_atc(&self, request: AtcInvalidation) {
            self.0.lock().unwrap().push((
                request.pasid,
                request.address,
                request.size,
                request.global,
            ));
            request.completion.complete();
        }
        fn page_response(&self, _response: crate::PageResponse) {}
    }

    #[test]
    fn device_tlb_invalidations_reach_the_function_by_requester_id() {
        let sink = Arc::new(RecordingMsiSink::new());
        let (mut u, mem) = unit(sink);
        let binding = FunctionBinding::new(RequesterId::new(0, 4, 0));
        let atc = Arc::new(Atc::default());
        u.register_endpoint(binding, atc.clone());
        enable_queue(&mut u);
        // Type 3 for 00:04.0, 8 KiB at 0x10_0000 (S = 1 with address bit 12 clear: 2 pages).
        let sid = u64::from(RequesterId::new(0, 4, 0).0);
        put(&mem, 0, [3 | (sid << 32), 0x10_0000 | 1, 0, 0]);
        // Type 8, PASID 5, a single page; another function's (ignored).
        put(&mem, 1, [8 | (sid << 16) | (5 << 32), 0x30_0000, 0, 0]);
        put(&mem, 2, [8 | (0x99 << 16) | (5 << 32), 0x30_0000, 0, 0]);
        // 16 KiB: S = 1, bit 12 set, bit 13 clear.
        put(&mem, 3, [3 | (sid << 32), 0x10_1000 | 1, 0, 0]);
        put(&mem, 4, wait_descriptor(1, false));
        w64(&mut u, offset::IQT, 5 << 5);
        assert_eq!(
            *atc.0.lock().unwrap(),
            vec![
                (None, 0x10_0000, 0x2000, false),
                (Pasid::new(5), 0x30_0000, 0x1000, false),
                (None, 0x10_0000, 0x4000, false),
            ]
        );
        assert_eq!(
            mem.memory().read_obj::<u32>(GuestAddress(STATUS)).unwrap(),
            1
        );
    }

    #[test]
    fn random_queues_never_panic_or_hang() {
        let sink = Arc::new(RecordingMsiSink::new());
        let (mut u, mem) = unit(sink);
        let mut x = 0x1357_9bdf_2468_ace0u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..100 {
            for i in 0..256 {
                let kind = next() % 12;
                put(
                    &mem,
                    i,
                    [kind | (next() & !0xf & !(7 << 9)), next() % 0x50_0000, 0, 0],
                );
            }
            if round % 10 == 0 {
                w64(&mut u, offset::IQA, QUEUE | (next() & (iqa::DW | 7)));
                w32(
                    &mut u,
                    offset::GCMD,
                    if next() & 1 == 0 { global::QIE } else { 0 },
                );
            }
            w32(&mut u, offset::FSTS, 0x7f);
            w64(&mut u, offset::IQT, next() & 0x7fff0);
        }
    }

    /// Legacy tables for 00:02.0 (IOVA 0x5000 → GPA 0x30_0000, read/write), programmed and
    /// enabled the way Linux does; DMA through a `DmaSpace` with the unit's translator.
    #[test]
    fn dma_is_remapped_once_translation_is_on_and_faults_are_recorded() {
        use crate::DmaSpace;
        let sink = Arc::new(RecordingMsiSink::new());
        let (unit, mem) = unit(sink.clone());
        let unit = Arc::new(std::sync::Mutex::new(unit));
        let rid = RequesterId::new(0, 2, 0);
        let m = mem.memory();
        let put = |gpa: u64, v: u64| m.write_obj(v, GuestAddress(gpa)).unwrap();
        let (root, ctx, l4, l3, l2, l1) = (0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000);
        put(root, ctx | 1);
        put(ctx + u64::from(rid.devfn()) * 16, l4 | 1);
        put(ctx + u64::from(rid.devfn()) * 16 + 8, 2 | (1 << 8));
        put(l4, l3 | 3);
        put(l3, l2 | 3);
        put(l2, l1 | 3);
        put(l1 + 5 * 8, 0x30_0000 | 3);
        m.write_slice(b"remapped", GuestAddress(0x30_0010)).unwrap();
        let dma =
            DmaSpace::with_translator(rid, mem.clone(), Arc::new(VtdTranslator::new(unit.clone())));
        dma.set_bus_master(true);
        // Translation off: pass-through.
        let mut buf = [0u8; 8];
        dma.read(0x30_0010, &mut buf).unwrap();
        assert_eq!(&buf, b"remapped");
        {
            let mut u = unit.lock().unwrap();
            w64(&mut u, offset::RTADDR, root);
            w32(&mut u, offset::GCMD, global::SRTP);
            w32(&mut u, offset::FEDATA, 0x33);
            w32(&mut u, offset::FEADDR, 0xfee0_0000);
            w32(&mut u, offset::FECTL, 0);
            w32(&mut u, offset::GCMD, global::TE);
        }
        dma.read(0x5010, &mut buf).unwrap();
        assert_eq!(&buf, b"remapped");
        dma.write(0x5020, b"by dev").unwrap();
        assert_eq!(
            &m.read_obj::<[u8; 6]>(GuestAddress(0x30_0020)).unwrap(),
            b"by dev"
        );
        // Unmapped IOVA: a fault, recorded with the source ID and address, and an MSI.
        let err = dma.write(0x9000, b"x").unwrap_err();
        assert!(matches!(err, DmaError::TranslationFault { .. }), "{err}");
        let u = unit.lock().unwrap();
        assert_ne!(
            r32(&u, offset::FSTS) & super::super::registers::fsts::PPF,
            0
        );
        let fr = super::super::registers::FAULT_RECORD_UNITS * 16;
        let mut rec = [0u8; 16];
        u.read(fr, &mut rec[..8]);
        u.read(fr + 8, &mut rec[8..]);
        let low = u64::from_le_bytes(rec[..8].try_into().unwrap());
        let high = u64::from_le_bytes(rec[8..].try_into().unwrap());
        assert_eq!(low, 0x9000);
        assert_eq!(high & 0xffff, u64::from(rid.0));
        assert_eq!((high >> 32) & 0xff, 0x05, "write to a not-present page");
        assert_eq!(sink.take().len(), 1);
        assert_eq!((u.counters().translations, u.counters().faults), (3, 1));
    }

    /// Guest pointers at the top of the address space (queue base, root table) fault; they
    /// never overflow an address computation (a panic in debug builds).
    #[test]
    fn pointers_at_the_top_of_the_address_space_fault_instead_of_wrapping() {
        let sink = Arc::new(RecordingMsiSink::new());
        let (mut u, mem) = unit(sink);
        let top = 0xffff_ffff_ffff_f000u64;
        // 130 descriptors processed at a valid base (the head moves on), then the guest points
        // the queue at the top of the address space: the next fetch is past 2^64.
        enable_queue(&mut u);
        for i in 0..130 {
            put(&mem, i, wait_descriptor(1, false));
        }
        w64(&mut u, offset::IQT, 130 << 5);
        assert_eq!(u.registers().queue().3, 130);
        w64(&mut u, offset::IQA, top | iqa::DW | 7);
        w64(&mut u, offset::IQT, 200 << 5);
        assert_ne!(
            r32(&u, offset::FSTS) & super::super::registers::fsts::IQE,
            0
        );
        for rtaddr in [top, top | (1 << 10)] {
            w64(&mut u, offset::RTADDR, rtaddr);
            w32(
                &mut u,
                offset::GCMD,
                global::SRTP | global::TE | global::QIE,
            );
            let request = DmaRequest {
                requester_id: RequesterId(0xffff),
                pasid: Pasid::new(0xf_ffff),
                privileged: false,
                address: u64::MAX - 7,
                len: 8,
                access: DmaAccess::Write,
                address_type: AddressType::Untranslated,
            };
            assert!(matches!(
                u.translate(&request),
                Err(DmaError::TranslationFault { .. })
            ));
            assert!(
                u.translate(&DmaRequest {
                    pasid: None,
                    ..request
                })
                .is_err()
            );
        }
    }

    // ---- Caching (VT-d chapter 6) ----

    fn request(rid: RequesterId, pasid: Option<u32>, address: u64, write: bool) -> DmaRequest {
        DmaRequest {
            requester_id: rid,
            pasid: pasid.and_then(Pasid::new),
            privileged: false,
            address,
            len: 8,
            access: if write {
                DmaAccess::Write
            } else {
                DmaAccess::Read
            },
            address_type: AddressType::Untranslated,
        }
    }

    fn gpa(u: &mut RemappingUnit, rid: RequesterId, pasid: Option<u32>, iova: u64) -> u64 {
        u.translate(&request(rid, pasid, iova, false))
            .map(|t| t.gpa)
            .unwrap_or(u64::MAX)
    }

    fn set(mem: &GuestMemoryAtomic<GuestMemoryMmap>, gpa: u64, v: u64) {
        mem.memory().write_obj(v, GuestAddress(gpa)).unwrap();
    }

    fn get(mem: &GuestMemoryAtomic<GuestMemoryMmap>, gpa: u64) -> u64 {
        mem.memory().read_obj(GuestAddress(gpa)).unwrap()
    }

    /// Puts `descs` at the queue's head and moves the tail past them.
    fn submit(u: &mut RemappingUnit, mem: &GuestMemoryAtomic<GuestMemoryMmap>, descs: &[[u64; 4]]) {
        let head = u.registers().queue().3;
        for (i, d) in descs.iter().enumerate() {
            put(mem, head + i as u64, *d);
        }
        w64(u, offset::IQT, (head + descs.len() as u64) << 5);
        assert_eq!(u.counters().queue_errors, 0);
    }

    /// Legacy tables: 00:02.0 (DID 1) and 00:02.1 (DID 2) share 4-level second-stage tables
    /// mapping IOVA 0x5000..0x8000 to GPA 0x30_5000.. (pages 5, 6, 7 → 0x30_0000 + i×0x1000).
    fn legacy() -> (RemappingUnit, GuestMemoryAtomic<GuestMemoryMmap>) {
        let (mut u, mem) = unit(Arc::new(RecordingMsiSink::new()));
        let (root, ctx, l4, l3, l2, l1) = (0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000);
        set(&mem, root, ctx | 1);
        for (devfn, did) in [(0x10u64, 1u64), (0x11, 2)] {
            set(&mem, ctx + devfn * 16, l4 | 1);
            set(&mem, ctx + devfn * 16 + 8, 2 | (did << 8));
        }
        set(&mem, l4, l3 | 3);
        set(&mem, l3, l2 | 3);
        set(&mem, l2, l1 | 3);
        for page in 5..8u64 {
            set(&mem, l1 + page * 8, (0x30_0000 + (page << 12)) | 3);
        }
        w64(&mut u, offset::RTADDR, root);
        w32(&mut u, offset::GCMD, global::SRTP);
        enable_queue(&mut u);
        w32(&mut u, offset::GCMD, global::QIE | global::TE);
        (u, mem)
    }

    const DEV_A: RequesterId = RequesterId::new(0, 2, 0);
    const DEV_B: RequesterId = RequesterId::new(0, 2, 1);
    const L1: u64 = 0x6000;

    /// IOTLB descriptor (type 2): granularity, DID, address | AM.
    fn iotlb_desc(g: u64, did: u64, qw1: u64) -> [u64; 4] {
        [2 | (g << 4) | (did << 16), qw1, 0, 0]
    }

    #[test]
    fn the_iotlb_serves_stale_entries_until_a_page_selective_invalidation_covers_them() {
        let (mut u, mem) = legacy();
        assert_eq!(gpa(&mut u, DEV_A, None, 0x5010), 0x30_5010);
        assert_eq!(gpa(&mut u, DEV_A, None, 0x7010), 0x30_7010);
        // The guest remaps page 5 without invalidating: the cached translation stays.
        set(&mem, L1 + 5 * 8, 0x31_0000 | 3);
        assert_eq!(gpa(&mut u, DEV_A, None, 0x5010), 0x30_5010, "cached");
        let c = u.counters();
        assert_eq!((c.iotlb_hits, c.iotlb_misses), (1, 2));
        // The hit came from the IOTLB's front: no context-cache lookup.
        assert_eq!((c.context_cache_hits, c.context_cache_misses), (1, 1));
        // Another domain, and a page-selective invalidation of another page: still stale.
        submit(
            &mut u,
            &mem,
            &[iotlb_desc(2, 2, 0), iotlb_desc(3, 1, 0x9000)],
        );
        assert_eq!(gpa(&mut u, DEV_A, None, 0x5010), 0x30_5010);
        // PSI at 0x4000 with AM = 2 (0x4000..0x8000) drops pages 5 and 7.
        set(&mem, L1 + 7 * 8, 0x32_0000 | 3);
        submit(&mut u, &mem, &[iotlb_desc(3, 1, 0x4000 | 2 | (1 << 6))]);
        assert_eq!(gpa(&mut u, DEV_A, None, 0x5010), 0x31_0010);
        assert_eq!(gpa(&mut u, DEV_A, None, 0x7010), 0x32_0010);
    }

    #[test]
    fn domain_selective_and_global_iotlb_invalidations_drop_only_their_domain() {
        let (mut u, mem) = legacy();
        assert_eq!(gpa(&mut u, DEV_A, None, 0x6000), 0x30_6000);
        assert_eq!(gpa(&mut u, DEV_B, None, 0x6000), 0x30_6000);
        set(&mem, L1 + 6 * 8, 0x31_0000 | 3);
        submit(&mut u, &mem, &[iotlb_desc(2, 1, 0)]);
        assert_eq!(gpa(&mut u, DEV_A, None, 0x6000), 0x31_0000, "DID 1 dropped");
        assert_eq!(gpa(&mut u, DEV_B, None, 0x6000), 0x30_6000, "DID 2 kept");
        submit(&mut u, &mem, &[iotlb_desc(1, 0, 0)]);
        assert_eq!(gpa(&mut u, DEV_B, None, 0x6000), 0x31_0000, "global");
    }

    #[test]
    fn not_present_entries_and_faults_are_never_cached() {
        let (mut u, mem) = legacy();
        assert_eq!(gpa(&mut u, DEV_A, None, 0x9000), u64::MAX, "not present");
        set(&mem, L1 + 9 * 8, 0x33_0000 | 3);
        assert_eq!(
            gpa(&mut u, DEV_A, None, 0x9000),
            0x33_0000,
            "no invalidation needed"
        );
        // A context that is not present yet (00:03.0): present later without invalidation.
        let dev_c = RequesterId::new(0, 3, 0);
        assert_eq!(gpa(&mut u, dev_c, None, 0x5000), u64::MAX);
        set(&mem, 0x2000 + 0x18 * 16, 0x3000 | 1);
        set(&mem, 0x2000 + 0x18 * 16 + 8, 2 | (3 << 8));
        assert_eq!(gpa(&mut u, dev_c, None, 0x5000), 0x30_5000);
        // A write to a read-only cached page walks again and faults; made writable, it works.
        assert_eq!(gpa(&mut u, DEV_A, None, 0x8000), u64::MAX);
        set(&mem, L1 + 8 * 8, 0x34_0000 | 1);
        assert_eq!(gpa(&mut u, DEV_A, None, 0x8000), 0x34_0000);
        assert!(u.translate(&request(DEV_A, None, 0x8000, true)).is_err());
        set(&mem, L1 + 8 * 8, 0x34_0000 | 3);
        assert!(u.translate(&request(DEV_A, None, 0x8000, true)).is_ok());
    }

    /// Context-cache descriptor (type 1): granularity, DID, SID, FM.
    fn context_desc(g: u64, did: u64, sid: u16, fm: u64) -> [u64; 4] {
        [
            1 | (g << 4) | (did << 16) | (u64::from(sid) << 32) | (fm << 48),
            0,
            0,
            0,
        ]
    }

    #[test]
    fn device_selective_context_invalidation_drops_only_the_devices_it_names() {
        let (mut u, mem) = legacy();
        gpa(&mut u, DEV_A, None, 0x5000);
        gpa(&mut u, DEV_B, None, 0x5000);
        // Both functions become pass-through (TT = 2) without invalidation: cached contexts.
        for devfn in [0x10u64, 0x11] {
            set(&mem, 0x2000 + devfn * 16, 0x3000 | 1 | (2 << 2));
        }
        assert_eq!(gpa(&mut u, DEV_A, None, 0x20_0000), u64::MAX);
        // Device-selective for 00:02.1 only.
        submit(&mut u, &mem, &[context_desc(3, 0, DEV_B.0, 0)]);
        assert_eq!(gpa(&mut u, DEV_A, None, 0x20_0000), u64::MAX, "02.0 kept");
        assert_eq!(
            gpa(&mut u, DEV_B, None, 0x20_0000),
            0x20_0000,
            "02.1 dropped"
        );
        // SID 00:02.4 with FM = 3 (bits 2:0 masked) covers 00:02.0.
        submit(
            &mut u,
            &mem,
            &[context_desc(3, 0, RequesterId::new(0, 2, 4).0, 3)],
        );
        assert_eq!(gpa(&mut u, DEV_A, None, 0x20_0000), 0x20_0000);
    }

    #[test]
    fn domain_selective_context_invalidation_and_the_registers_flush_too() {
        let (mut u, mem) = legacy();
        gpa(&mut u, DEV_A, None, 0x5000);
        gpa(&mut u, DEV_B, None, 0x5000);
        for devfn in [0x10u64, 0x11] {
            set(&mem, 0x2000 + devfn * 16, 0x3000 | 1 | (2 << 2));
        }
        submit(&mut u, &mem, &[context_desc(2, 2, 0, 0)]);
        assert_eq!(gpa(&mut u, DEV_A, None, 0x20_0000), u64::MAX, "DID 1 kept");
        assert_eq!(
            gpa(&mut u, DEV_B, None, 0x20_0000),
            0x20_0000,
            "DID 2 dropped"
        );
        // Register-based context invalidation (CCMD, global).
        use super::super::registers::ccmd;
        w64(&mut u, offset::CCMD, ccmd::ICC | (1 << ccmd::CIRG_SHIFT));
        assert_eq!(gpa(&mut u, DEV_A, None, 0x20_0000), 0x20_0000);
        // Register-based IOTLB invalidation (IVT, domain 2) drops cached pages.
        for devfn in [0x10u64, 0x11] {
            set(&mem, 0x2000 + devfn * 16, 0x3000 | 1);
        }
        w64(&mut u, offset::CCMD, ccmd::ICC | (1 << ccmd::CIRG_SHIFT));
        assert_eq!(gpa(&mut u, DEV_B, None, 0x5000), 0x30_5000);
        set(&mem, L1 + 5 * 8, 0x31_0000 | 3);
        assert_eq!(gpa(&mut u, DEV_B, None, 0x5000), 0x30_5000, "cached");
        use super::super::registers::{IOTLB_REGISTER_UNITS, iotlb};
        w64(
            &mut u,
            IOTLB_REGISTER_UNITS * 16 + 8,
            iotlb::IVT | (2 << iotlb::IIRG_SHIFT) | (2 << iotlb::DID_SHIFT),
        );
        assert_eq!(gpa(&mut u, DEV_B, None, 0x5000), 0x31_0000);
        // SRTP and TE toggles flush everything.
        set(&mem, L1 + 5 * 8, 0x32_0000 | 3);
        assert_eq!(gpa(&mut u, DEV_B, None, 0x5000), 0x31_0000, "cached");
        w32(
            &mut u,
            offset::GCMD,
            global::QIE | global::TE | global::SRTP,
        );
        assert_eq!(gpa(&mut u, DEV_B, None, 0x5000), 0x32_0000);
        set(&mem, L1 + 5 * 8, 0x33_0000 | 3);
        w32(&mut u, offset::GCMD, global::QIE);
        w32(&mut u, offset::GCMD, global::QIE | global::TE);
        assert_eq!(gpa(&mut u, DEV_B, None, 0x5000), 0x33_0000);
        assert_eq!(u.cache_occupancy().context, 1);
    }

    /// Scalable-mode tables for 00:02.0 (PASIDE, RID_PASID 0): PASID 0 and PASID 5 in DID 1,
    /// PASID 6 in DID 2, each with first-stage 4-level tables mapping IOVA 0x1234_5000 to
    /// 0x30_0000 + PASID × 0x1000 (user, writable, clean).
    const FS_IOVA: u64 = 0x1234_5000;
    const PTAB: u64 = 0x4000;

    fn fs_leaf(pasid: u64) -> u64 {
        0x28_0000 + pasid * 0x4000 + 0x3000 + ((FS_IOVA >> 12) & 0x1ff) * 8
    }

    fn scalable() -> (RemappingUnit, GuestMemoryAtomic<GuestMemoryMmap>) {
        let (mut u, mem) = unit(Arc::new(RecordingMsiSink::new()));
        let (root, ctx, dir) = (0x1000, 0x2000, 0x3000);
        set(&mem, root, ctx | 1);
        set(&mem, ctx + 0x10 * 32, dir | 1 | (1 << 3));
        set(&mem, dir, PTAB | 1);
        for (pasid, did) in [(0u64, 1u64), (5, 1), (6, 2)] {
            let l4 = 0x28_0000 + pasid * 0x4000;
            let e = PTAB + pasid * 64;
            set(&mem, e, 1 | (1 << 6));
            set(&mem, e + 8, did);
            set(&mem, e + 16, l4);
            let f = 7;
            set(&mem, l4 + ((FS_IOVA >> 39) & 0x1ff) * 8, (l4 + 0x1000) | f);
            set(
                &mem,
                l4 + 0x1000 + ((FS_IOVA >> 30) & 0x1ff) * 8,
                (l4 + 0x2000) | f,
            );
            set(
                &mem,
                l4 + 0x2000 + ((FS_IOVA >> 21) & 0x1ff) * 8,
                (l4 + 0x3000) | f,
            );
            set(&mem, fs_leaf(pasid), (0x30_0000 + pasid * 0x1000) | f);
        }
        w64(&mut u, offset::RTADDR, root | (1 << 10));
        w32(&mut u, offset::GCMD, global::SRTP);
        enable_queue(&mut u);
        w32(&mut u, offset::GCMD, global::QIE | global::TE);
        (u, mem)
    }

    /// PASID-based IOTLB descriptor (type 6).
    fn piotlb_desc(g: u64, did: u64, pasid: u64, qw1: u64) -> [u64; 4] {
        [6 | (g << 4) | (did << 16) | (pasid << 32), qw1, 0, 0]
    }

    /// PASID-cache descriptor (type 7).
    fn pc_desc(g: u64, did: u64, pasid: u64) -> [u64; 4] {
        [7 | (g << 4) | (did << 16) | (pasid << 32), 0, 0, 0]
    }

    #[test]
    fn pasid_selective_iotlb_invalidation_drops_only_that_pasid() {
        let (mut u, mem) = scalable();
        for p in [0u32, 5, 6] {
            let pasid = (p != 0).then_some(p);
            assert_eq!(
                gpa(&mut u, DEV_A, pasid, FS_IOVA),
                0x30_0000 + u64::from(p) * 0x1000
            );
        }
        for p in [0u64, 5, 6] {
            set(&mem, fs_leaf(p), (0x38_0000 + p * 0x1000) | 7);
        }
        // All-in-PASID for PASID 5 of DID 1: PASID 0 (RID_PASID) and PASID 6 stay stale.
        submit(&mut u, &mem, &[piotlb_desc(2, 1, 5, 0)]);
        assert_eq!(gpa(&mut u, DEV_A, Some(5), FS_IOVA), 0x38_5000);
        assert_eq!(gpa(&mut u, DEV_A, None, FS_IOVA), 0x30_0000);
        assert_eq!(gpa(&mut u, DEV_A, Some(6), FS_IOVA), 0x30_6000);
        // Page-selective within PASID 0 (the request without PASID), another page: kept; this
        // page: dropped.
        submit(&mut u, &mem, &[piotlb_desc(3, 1, 0, 0x1000_0000)]);
        assert_eq!(gpa(&mut u, DEV_A, None, FS_IOVA), 0x30_0000);
        submit(&mut u, &mem, &[piotlb_desc(3, 1, 0, FS_IOVA)]);
        assert_eq!(gpa(&mut u, DEV_A, None, FS_IOVA), 0x38_0000);
        assert_eq!(
            gpa(&mut u, DEV_A, Some(6), FS_IOVA),
            0x30_6000,
            "DID 2 kept"
        );
        // A domain-selective IOTLB descriptor drops every PASID of its domain.
        submit(&mut u, &mem, &[iotlb_desc(2, 2, 0)]);
        assert_eq!(gpa(&mut u, DEV_A, Some(6), FS_IOVA), 0x38_6000);
    }

    #[test]
    fn pasid_cache_invalidation_is_pasid_and_domain_selective() {
        let (mut u, mem) = scalable();
        gpa(&mut u, DEV_A, Some(5), FS_IOVA);
        gpa(&mut u, DEV_A, Some(6), FS_IOVA);
        // PASIDs 5 and 6 become pass-through; flushing the IOTLB alone leaves the PASID cache.
        for p in [5u64, 6] {
            set(&mem, PTAB + p * 64, 1 | (4 << 6));
        }
        submit(&mut u, &mem, &[iotlb_desc(1, 0, 0)]);
        assert_eq!(
            gpa(&mut u, DEV_A, Some(5), FS_IOVA),
            0x30_5000,
            "PASID entry cached"
        );
        // PASID-selective for (DID 2, PASID 5): the wrong domain, nothing dropped.
        submit(&mut u, &mem, &[pc_desc(1, 2, 5)]);
        assert_eq!(gpa(&mut u, DEV_A, Some(5), FS_IOVA), 0x30_5000);
        submit(&mut u, &mem, &[pc_desc(1, 1, 5)]);
        assert_eq!(
            gpa(&mut u, DEV_A, Some(5), FS_IOVA),
            FS_IOVA,
            "pass-through now"
        );
        assert_eq!(gpa(&mut u, DEV_A, Some(6), FS_IOVA), 0x30_6000);
        // Domain-selective for DID 2.
        submit(&mut u, &mem, &[pc_desc(0, 2, 0)]);
        assert_eq!(gpa(&mut u, DEV_A, Some(6), FS_IOVA), FS_IOVA);
        let c = u.counters();
        assert!(
            c.pasid_cache_hits >= 3 && c.pasid_cache_misses >= 4,
            "{c:?}"
        );
    }

    #[test]
    fn a_write_through_a_clean_cached_first_stage_entry_sets_dirty() {
        let (mut u, mem) = scalable();
        let leaf = fs_leaf(0);
        assert_eq!(gpa(&mut u, DEV_A, None, FS_IOVA), 0x30_0000);
        assert_eq!(get(&mem, leaf) & (1 << 6), 0, "clean after a read");
        assert_ne!(get(&mem, leaf) & (1 << 5), 0, "accessed");
        let hits = u.counters().iotlb_hits;
        u.translate(&request(DEV_A, None, FS_IOVA, true)).unwrap();
        assert_ne!(get(&mem, leaf) & (1 << 6), 0, "dirty after the write");
        assert_eq!(
            u.counters().iotlb_hits,
            hits,
            "the clean entry walked again"
        );
        // Now cached dirty: the next write is a hit.
        u.translate(&request(DEV_A, None, FS_IOVA, true)).unwrap();
        assert_eq!(u.counters().iotlb_hits, hits + 1);
        // A supervisor request (SRE clear) never hits: it walks and faults.
        let mut privileged = request(DEV_A, None, FS_IOVA, false);
        privileged.privileged = true;
        assert!(u.translate(&privileged).is_err());
    }

    // ---- Fault injection ----

    #[test]
    fn injected_faults_fail_the_next_translations_of_that_requester_only() {
        let sink = Arc::new(RecordingMsiSink::new());
        let (mut u, _mem) = legacy();
        u.msi = sink.clone();
        w32(&mut u, offset::FEDATA, 0x33);
        w32(&mut u, offset::FEADDR, 0xfee0_0000);
        w32(&mut u, offset::FECTL, 0);
        assert_eq!(u.inject_faults(DEV_A, 2), 2);
        assert_eq!(u.inject_faults(DEV_A, 0), 2);
        assert_eq!(u.pending_injected_faults(), vec![(DEV_A, 2)]);
        assert_eq!(
            gpa(&mut u, DEV_B, None, 0x5000),
            0x30_5000,
            "another device"
        );
        let err = u
            .translate(&request(DEV_A, None, 0x5008, true))
            .unwrap_err();
        assert!(
            matches!(err, DmaError::TranslationFault { iova: 0x5008, .. }),
            "{err}"
        );
        let fr = super::super::registers::FAULT_RECORD_UNITS * 16;
        let mut rec = [0u8; 16];
        u.read(fr, &mut rec[..8]);
        u.read(fr + 8, &mut rec[8..]);
        let high = u64::from_le_bytes(rec[8..].try_into().unwrap());
        assert_eq!(u64::from_le_bytes(rec[..8].try_into().unwrap()), 0x5000);
        assert_eq!(high & 0xffff, u64::from(DEV_A.0));
        assert_eq!((high >> 32) & 0xff, 0x05, "write to a not-present page");
        assert_eq!(sink.take().len(), 1, "fault event");
        assert_eq!(u.pending_injected_faults(), vec![(DEV_A, 1)]);
        // Even a cached translation fails while an injection is pending.
        assert_eq!(gpa(&mut u, DEV_A, None, 0x5000), u64::MAX);
        assert!(u.pending_injected_faults().is_empty());
        assert_eq!(gpa(&mut u, DEV_A, None, 0x5000), 0x30_5000);
        let c = u.counters();
        assert_eq!((c.injected_faults, c.faults), (2, 2));
        // Bounded, and reason 0x71 in scalable mode.
        assert_eq!(u.inject_faults(DEV_A, u32::MAX), MAX_INJECTED_FAULTS);
        let (mut s, _m) = scalable();
        s.inject_faults(DEV_A, 1);
        assert!(
            s.translate(&request(DEV_A, Some(5), FS_IOVA, false))
                .is_err()
        );
        s.read(fr + 8, &mut rec[8..]);
        let high = u64::from_le_bytes(rec[8..].try_into().unwrap());
        assert_eq!((high >> 32) & 0xff, 0x71);
        assert_eq!(gpa(&mut s, DEV_A, Some(5), FS_IOVA), 0x30_5000);
    }

    #[test]
    fn device_contexts_list_present_contexts_in_either_mode() {
        let (u, mem) = legacy();
        let (list, more) = u.device_contexts(16);
        assert!(!more);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].requester_id, DEV_A);
        assert_eq!(
            (list[1].domain, list[1].translation, list[1].address_width),
            (Some(2), "multi-level", Some(48))
        );
        assert_eq!(u.device_contexts(1), (vec![list[0].clone()], true));
        // A garbage context entry (reserved bits) is listed with its fault reason.
        set(&mem, 0x2000 + 0x20 * 16, 0xff1);
        let (list, _) = u.device_contexts(16);
        assert_eq!(list[2].fault_reason, Some(0x0b));
        let (s, _m) = scalable();
        let (list, _) = s.device_contexts(16);
        assert_eq!(list.len(), 1);
        let d = &list[0];
        assert_eq!(
            (d.domain, d.translation, d.pasid_enabled, d.rid_pasid),
            (Some(1), "first-stage", Some(true), Some(0))
        );
        // Root tables of garbage everywhere: bounded, no panic.
        let (mut g, gm) = unit(Arc::new(RecordingMsiSink::new()));
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for a in (0..0x40_0000u64).step_by(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            set(&gm, a, x & 0x3f_ffff_ffff);
        }
        for rt in [0u64, 0x1000 | (1 << 10), 0x3f_f000] {
            w64(&mut g, offset::RTADDR, rt);
            w32(&mut g, offset::GCMD, global::SRTP);
            let (list, _) = g.device_contexts(64);
            assert!(list.len() <= 64);
        }
    }

    // ---- Device TLBs and page requests (issue 9) ----

    /// Turns on DTE and PRE in 00:02.0's scalable-mode context (before anything is cached).
    fn enable_ats_and_pri(mem: &GuestMemoryAtomic<GuestMemoryMmap>) {
        set(
            mem,
            0x2000 + 0x10 * 32,
            0x3000 | 1 | (1 << 2) | (1 << 3) | (1 << 4),
        );
    }

    fn ats_request(pasid: u32, address: u64, write: bool) -> DmaRequest {
        DmaRequest {
            address_type: AddressType::TranslationRequest,
            ..request(DEV_A, Some(pasid), address, write)
        }
    }

    #[derive(Default)]
    struct Responses(std::sync::Mutex<Vec<PageResponse>>);

    impl DeviceEndpoint for Responses {
        fn invalidate_atc(&self, request: AtcInvalidation) {
            request.completion.complete();
        }
        fn page_response(&self, response: PageResponse) {
            self.0.lock().unwrap().push(response);
        }
    }

    #[test]
    fn translation_requests_need_the_device_tlb_and_report_missing_pages_without_a_fault() {
        let (mut u, mem) = scalable();
        // DTE clear: refused with a fault.
        assert!(u.translate(&ats_request(5, FS_IOVA, false)).is_err());
        assert_eq!(u.counters().faults, 1);
        let (mut u, mem2) = scalable();
        drop(mem);
        enable_ats_and_pri(&mem2);
        // A read: the page, readable, never writable (the device asks again to write).
        let t = u.translate(&ats_request(5, FS_IOVA, false)).unwrap();
        assert_eq!((t.gpa, t.read, t.write), (0x30_5000, true, false));
        assert_eq!(get(&mem2, fs_leaf(5)) & (1 << 6), 0, "still clean");
        // A write: writable, and the leaf is Dirty now.
        let t = u.translate(&ats_request(5, FS_IOVA + 8, true)).unwrap();
        assert_eq!((t.gpa, t.write), (0x30_5008, true));
        assert_ne!(get(&mem2, fs_leaf(5)) & (1 << 6), 0, "dirty");
        // A missing page: no permissions, no fault recorded.
        let faults = u.counters().faults;
        let t = u.translate(&ats_request(5, 0x7000_0000, true)).unwrap();
        assert!(!t.read && !t.write);
        assert_eq!(u.counters().faults, faults);
        assert_eq!(u.counters().ats_denied, 1);
        assert_eq!(u.counters().ats_translations, 3);
        // The translated request that follows passes untranslated.
        let translated = DmaRequest {
            address_type: AddressType::Translated,
            ..request(DEV_A, Some(5), 0x30_5008, true)
        };
        assert_eq!(u.translate(&translated).unwrap().gpa, 0x30_5008);
        // Another function (no context): translated requests are blocked.
        let other = DmaRequest {
            requester_id: DEV_B,
            ..translated
        };
        assert!(u.translate(&other).is_err());
    }

    const PRQ: u64 = 0x3a_0000;

    /// A unit with ATS and PRI on 00:02.0, its page request queue at [`PRQ`] (128 entries)
    /// and the page request event unmasked; returns the endpoint and the MSI sink.
    fn prq_unit() -> (
        RemappingUnit,
        GuestMemoryAtomic<GuestMemoryMmap>,
        Arc<Responses>,
        Arc<RecordingMsiSink>,
    ) {
        let (mut u, mem) = scalable();
        enable_ats_and_pri(&mem);
        let sink = Arc::new(RecordingMsiSink::new());
        u.msi = sink.clone();
        let responses = Arc::new(Responses::default());
        u.register_endpoint(FunctionBinding::new(DEV_A), responses.clone());
        u.register_endpoint(FunctionBinding::new(DEV_B), responses.clone());
        w64(&mut u, offset::PQH, 0);
        w64(&mut u, offset::PQT, 0);
        w64(&mut u, offset::PQA, PRQ);
        w32(&mut u, offset::PEDATA, 0x61);
        w32(&mut u, offset::PEADDR, 0xfee0_0000);
        w32(&mut u, offset::PECTL, 0);
        (u, mem, responses, sink)
    }

    fn page_request(rid: RequesterId, address: u64, group: u16) -> PageRequest {
        PageRequest {
            requester_id: rid,
            pasid: Pasid::new(5),
            address,
            read: true,
            write: true,
            execute: false,
            privileged: false,
            group_index: group,
            last_in_group: true,
        }
    }

    #[test]
    fn page_requests_go_to_the_queue_with_ppr_and_one_event_until_software_clears_it() {
        use super::super::registers::prs;
        let (mut u, mem, responses, sink) = prq_unit();
        u.page_request(&page_request(DEV_A, 0x7000_0000, 3))
            .unwrap();
        u.page_request(&page_request(DEV_A, 0x7000_1000, 4))
            .unwrap();
        let q0: [u64; 4] = mem.memory().read_obj(GuestAddress(PRQ)).unwrap();
        assert_eq!(q0[0] & 0xff, 1, "page request");
        assert_eq!((q0[0] >> 16) & 0xffff, u64::from(DEV_A.0));
        assert_eq!((q0[0] >> 32) & 0xf_ffff, 5);
        assert_eq!(q0[1], 0x7000_0000 | (3 << 3) | 0b111);
        let q1: [u64; 4] = mem.memory().read_obj(GuestAddress(PRQ + 32)).unwrap();
        assert_eq!(q1[1] >> 12, 0x7_0001);
        let mut tail = [0u8; 8];
        u.read(offset::PQT, &mut tail);
        assert_eq!(u64::from_le_bytes(tail), 2 << 5);
        assert_eq!(r32(&u, offset::PRS), prs::PPR);
        let events = sink.take();
        assert_eq!(events.len(), 1, "one event while PPR stays set");
        assert_eq!((events[0].address, events[0].data), (0xfee0_0000, 0x61));
        // Software consumes both, clears PPR: the next request signals again.
        w64(&mut u, offset::PQH, 2 << 5);
        w32(&mut u, offset::PRS, prs::PPR);
        u.page_request(&page_request(DEV_A, 0x7000_2000, 5))
            .unwrap();
        assert_eq!(sink.take().len(), 1);
        // Masked: IP instead of the message; unmasking sends it.
        w32(&mut u, offset::PRS, prs::PPR);
        w32(&mut u, offset::PECTL, super::super::registers::event::IM);
        u.page_request(&page_request(DEV_A, 0x7000_3000, 6))
            .unwrap();
        assert!(sink.is_empty());
        assert_ne!(
            r32(&u, offset::PECTL) & super::super::registers::event::IP,
            0
        );
        w32(&mut u, offset::PECTL, 0);
        assert_eq!(sink.take().len(), 1);
        assert!(
            responses.0.lock().unwrap().is_empty(),
            "nothing answered yet"
        );
        assert_eq!(u.counters().page_requests_queued, 4);
    }

    fn response_desc(rid: RequesterId, pasid: u64, code: u64, group: u64) -> [u64; 4] {
        [
            9 | (1 << 4) | (code << 12) | (u64::from(rid.0) << 16) | (pasid << 32),
            group << 3,
            0,
            0,
        ]
    }

    #[test]
    fn page_group_responses_reach_the_device_and_injections_replace_their_code() {
        let (mut u, mem, responses, _) = prq_unit();
        submit(&mut u, &mem, &[response_desc(DEV_A, 5, 0, 3)]);
        submit(&mut u, &mem, &[response_desc(DEV_A, 5, 1, 4)]);
        submit(&mut u, &mem, &[response_desc(DEV_A, 5, 2, 5)]);
        u.inject_page_responses(PageResponseCode::ResponseFailure, 1);
        submit(&mut u, &mem, &[response_desc(DEV_A, 5, 0, 6)]);
        submit(&mut u, &mem, &[response_desc(DEV_A, 5, 0, 7)]);
        let got: Vec<(u16, PageResponseCode, Option<Pasid>)> = responses
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.group_index, r.code, r.pasid))
            .collect();
        use PageResponseCode::*;
        assert_eq!(
            got,
            [
                (3, Success, Pasid::new(5)),
                (4, InvalidRequest, Pasid::new(5)),
                (5, ResponseFailure, Pasid::new(5)),
                (6, ResponseFailure, Pasid::new(5)),
                (7, Success, Pasid::new(5)),
            ]
        );
        let c = u.counters();
        assert_eq!(
            (
                c.responses_success,
                c.responses_invalid,
                c.responses_failure,
                c.injected_responses
            ),
            (2, 1, 2, 1)
        );
        assert_eq!(c.descriptors[9], 5);
    }

    #[test]
    fn lost_and_refused_page_requests_are_answered_by_the_unit() {
        use super::super::registers::prs;
        let (mut u, _mem, responses, sink) = prq_unit();
        // No context with PRE for 00:02.1: Invalid Request, nothing queued.
        u.page_request(&page_request(DEV_B, 0x7000_0000, 1))
            .unwrap();
        // An injected drop: PRO, the event, and Success so the device asks again.
        u.drop_page_requests(1);
        u.page_request(&page_request(DEV_A, 0x7000_0000, 2))
            .unwrap();
        assert_eq!(r32(&u, offset::PRS) & prs::PRO, prs::PRO);
        assert_eq!(sink.take().len(), 1);
        // While PRO is set, requests are lost too (until software clears it).
        u.page_request(&page_request(DEV_A, 0x7000_0000, 3))
            .unwrap();
        w32(&mut u, offset::PRS, prs::PRO);
        // A full queue (127 of 128 slots used) overflows as well.
        for i in 0..127u16 {
            u.page_request(&page_request(DEV_A, 0x7000_0000, i % 512))
                .unwrap();
        }
        assert_eq!(r32(&u, offset::PRS) & prs::PRO, 0);
        u.page_request(&page_request(DEV_A, 0x7000_0000, 9))
            .unwrap();
        assert_eq!(r32(&u, offset::PRS) & prs::PRO, prs::PRO);
        let got: Vec<(u16, PageResponseCode)> = responses
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.group_index, r.code))
            .collect();
        use PageResponseCode::*;
        assert_eq!(
            got,
            [
                (1, InvalidRequest),
                (2, Success),
                (3, Success),
                (9, Success)
            ]
        );
        let c = u.counters();
        assert_eq!(
            (c.prq_overflows, c.page_requests_queued, c.auto_responses),
            (3, 127, 4)
        );
        // Without PRS (ats off) the unit has no queue at all.
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        );
        let mut plain = RemappingUnit::new(
            VtdConfig {
                pri: false,
                ..VtdConfig::default()
            },
            mem,
            Arc::new(RecordingMsiSink::new()),
        );
        assert!(plain.page_request(&page_request(DEV_A, 0, 0)).is_err());
        w64(&mut plain, offset::PQA, PRQ);
        let mut pqa = [0u8; 8];
        plain.read(offset::PQA, &mut pqa);
        assert_eq!(u64::from_le_bytes(pqa), 0, "no page request registers");
    }

    #[test]
    fn an_injected_wait_delay_holds_the_wait_back() {
        let (mut u, mem) = scalable();
        u.set_wait_delay(Duration::from_millis(50));
        let start = std::time::Instant::now();
        submit(&mut u, &mem, &[wait_descriptor(1, false)]);
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert_eq!(u.counters().delayed_waits, 1);
        u.set_wait_delay(Duration::from_secs(3600));
        assert_eq!(u.sva_injections().wait_delay, MAX_WAIT_DELAY);
    }
}
