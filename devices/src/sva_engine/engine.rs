//! The engine proper: the state the register model and the worker thread share, the worker that
//! runs the descriptor ring, and the way back from the IOMMU ([`EngineEndpoint`]: device-TLB
//! invalidations and page group responses).
//!
//! Locking: `state` is never held across a call into the IOMMU (translation requests, page
//! requests and untranslated accesses take the remapping unit's lock, and the unit calls the
//! endpoint with its lock held). The ATC lock is held across ATS-translated accesses — they do
//! not enter the unit — so a device-TLB invalidation, which takes it, completes only after the
//! access in flight (PCIe Base Spec r6.0 §10.3.1) and never waits for the unit.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use iommu::{
    AtcInvalidation, DeviceEndpoint, DmaAccess, DmaError, DmaSpace, PageRequest, PageResponse,
    PageResponseCode, Pasid,
};
use zerocopy::{FromBytes, IntoBytes};

use super::atc::Atc;
use super::descriptor::{
    self, CompletionRecord, Descriptor, DescriptorError, decode_pasid_field, fault_flags, flags,
    op, status as cstatus,
};
use super::registers::{ctrl, error, status};
use crate::pci::FunctionInterrupts;

/// Page requests per page before the descriptor ends with PAGE_FAILURE.
pub const MAX_PAGE_REQUESTS_PER_PAGE: u32 = 16;
/// Translation requests for one access before the descriptor ends with TRANSLATION_FAULT: a
/// granted translation normally serves the access at once, so only a translation the ATC
/// cannot hold or an endless stream of invalidations gets here — a fault, never a livelock
/// that looks like progress (the translation counter keeps moving).
pub const MAX_TRANSLATIONS_PER_ACCESS: u32 = 256;
/// The longest pause between two page requests for the same page.
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(250);
/// Page Request Group Indexes are 9 bits.
const GROUP_INDEXES: u16 = 512;
/// Bytes moved per step: a page (translations are per page).
const PAGE: u64 = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the engine has done since the function was created (the control API's view; the
/// COMPLETED, PAGE_REQUESTS, ATS_TRANSLATIONS and ATC_INVALIDATIONS registers count since the
/// last CTRL.RESET instead).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Descriptors completed (any status).
    pub descriptors_completed: u64,
    /// When the last descriptor completed (a stalled guest shows how long it has been idle).
    pub last_completion: Option<std::time::Instant>,
    /// Descriptors completed with SUCCESS.
    pub descriptors_succeeded: u64,
    /// Descriptors completed with another status.
    pub descriptors_failed: u64,
    /// Bytes moved, filled or compared.
    pub bytes: u64,
    /// ATS translation requests sent.
    pub ats_translations: u64,
    /// Accesses served from the ATC.
    pub atc_hits: u64,
    /// Device-TLB invalidations received.
    pub atc_invalidations: u64,
    /// ATC entries those invalidations dropped.
    pub atc_entries_invalidated: u64,
    /// PRI page requests sent.
    pub page_requests: u64,
    /// Page group responses: Success.
    pub responses_success: u64,
    /// Page group responses: Invalid Request.
    pub responses_invalid: u64,
    /// Page group responses: Response Failure.
    pub responses_failure: u64,
    /// Responses for a group index nothing was waiting for (UPRGI).
    pub unexpected_responses: u64,
    /// Descriptors that ended with TRANSLATION_FAULT.
    pub translation_faults: u64,
    /// Page requests whose response came back (the round trips below).
    pub page_request_round_trips: u64,
    /// Sum of the page-fault round trips as the device sees them: from sending the page
    /// request to holding the response (the retranslation that follows is not included).
    pub page_request_round_trip_ns: u64,
    /// The longest such round trip.
    pub page_request_round_trip_max_ns: u64,
}

/// The registers and state the vCPU side and the worker share.
#[derive(Debug, Default)]
pub(crate) struct EngineState {
    pub ctrl: u64,
    pub ring_base: u64,
    pub ring_size: u64,
    pub ring_head: u64,
    pub ring_tail: u64,
    pub ring_pasid: u32,
    pub error: u64,
    pub error_addr: u64,
    pub int_status: u64,
    pub enabled: bool,
    pub halted: bool,
    pub busy: bool,
    pub waiting_page: bool,
    /// Since the last CTRL.RESET (the registers).
    pub reg_completed: u64,
    pub reg_page_requests: u64,
    pub reg_ats_translations: u64,
    pub reg_atc_invalidations: u64,
    pub counters: EngineCounters,
    /// ATS Enable (from the capability).
    pub ats_enabled: bool,
    /// PASID Enable.
    pub pasid_enabled: bool,
    /// Privileged Mode Enable.
    pub pasid_privileged: bool,
    /// PRI Enable.
    pub pri_enabled: bool,
    /// A Response Failure stopped page requests (until PRI is re-enabled).
    pub pri_stopped: bool,
    /// Outstanding Page Request Allocation.
    pub pri_allocation: u32,
    /// Group indexes sent and not yet answered.
    pub outstanding_groups: Vec<u16>,
    next_group: u16,
    /// Responses that arrived for a group the parked descriptor waits for.
    responses: VecDeque<PageResponse>,
    /// PRI status bits to set in config space (Response Failure, UPRGI) at the next access.
    pub pending_response_failure: bool,
    pub pending_unexpected_group: bool,
    /// Moves on CTRL.RESET and FLR: the descriptor in flight leaves the ring registers alone.
    pub reset_epoch: u64,
    /// Moves on every abort (reset, FLR, Bus Master Enable cleared).
    pub abort_epoch: u64,
    pub bus_master: bool,
    shutdown: bool,
}

impl EngineState {
    /// STATUS register.
    pub fn status(&self) -> u64 {
        let mut s = 0;
        if self.enabled {
            s |= status::ENABLED;
        }
        if self.halted {
            s |= status::HALTED;
        }
        if self.busy {
            s |= status::BUSY;
        }
        if self.waiting_page {
            s |= status::WAITING_PAGE;
        }
        if self.pri_stopped {
            s |= status::PRI_STOPPED;
        }
        s
    }

    fn work_ready(&self) -> bool {
        self.enabled && !self.halted && self.bus_master && self.ring_head != self.ring_tail
    }

    /// CTRL.RESET: stop, abort, zero the ring registers and the register counters.
    pub fn reset_engine(&mut self) {
        self.ctrl = 0;
        self.ring_base = 0;
        self.ring_size = 0;
        self.ring_head = 0;
        self.ring_tail = 0;
        self.ring_pasid = 0;
        self.error = 0;
        self.error_addr = 0;
        self.int_status = 0;
        self.enabled = false;
        self.halted = false;
        self.reg_completed = 0;
        self.reg_page_requests = 0;
        self.reg_ats_translations = 0;
        self.reg_atc_invalidations = 0;
        self.reset_epoch += 1;
        self.abort_epoch += 1;
        // Requests of the aborted descriptor are given up: a late response is unexpected.
        self.pri_clear_credits();
    }

    /// PRI disabled or reset: nothing outstanding any more.
    pub fn pri_clear_credits(&mut self) {
        self.outstanding_groups.clear();
        self.responses.clear();
    }

    fn allocate_group(&mut self) -> u16 {
        loop {
            let g = self.next_group;
            self.next_group = (self.next_group + 1) % GROUP_INDEXES;
            if !self.outstanding_groups.contains(&g) {
                return g;
            }
        }
    }
}

/// What the vCPU side, the worker and the IOMMU endpoint share.
pub(crate) struct Shared {
    pub state: Mutex<EngineState>,
    pub wake: Condvar,
    pub atc: Mutex<Atc>,
}

impl Shared {
    pub fn new() -> Arc<Self> {
        Arc::new(Shared {
            state: Mutex::new(EngineState::default()),
            wake: Condvar::new(),
            atc: Mutex::new(Atc::new()),
        })
    }

    pub fn state(&self) -> MutexGuard<'_, EngineState> {
        lock(&self.state)
    }

    pub fn clear_atc(&self) {
        lock(&self.atc).clear();
    }
}

/// The IOMMU's way back to the engine.
pub(crate) struct EngineEndpoint(pub Arc<Shared>);

impl DeviceEndpoint for EngineEndpoint {
    fn invalidate_atc(&self, request: AtcInvalidation) {
        // Waits for an ATS-translated access in flight (it holds the ATC lock).
        let dropped = lock(&self.0.atc).invalidate(&request);
        {
            let mut s = self.0.state();
            s.reg_atc_invalidations += 1;
            s.counters.atc_invalidations += 1;
            s.counters.atc_entries_invalidated += dropped as u64;
        }
        request.completion.complete();
    }

    fn page_response(&self, response: PageResponse) {
        let mut s = self.0.state();
        match response.code {
            PageResponseCode::Success => s.counters.responses_success += 1,
            PageResponseCode::InvalidRequest => s.counters.responses_invalid += 1,
            PageResponseCode::ResponseFailure => s.counters.responses_failure += 1,
        }
        if let Some(i) = s
            .outstanding_groups
            .iter()
            .position(|&g| g == response.group_index)
        {
            s.outstanding_groups.swap_remove(i);
            s.responses.push_back(response);
            self.0.wake.notify_all();
        } else {
            log::debug!(
                "sva-engine: response for group {} nothing waits for",
                response.group_index
            );
            s.counters.unexpected_responses += 1;
            s.pending_unexpected_group = true;
        }
    }
}

/// How one descriptor ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Outcome {
    status: u8,
    fault_flags: u8,
    fault_address: u64,
    bytes: u64,
    result: u32,
}

/// Why an access stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fault {
    status: u8,
    address: u64,
    access: DmaAccess,
}

/// The worker thread running the ring.
pub(crate) struct Worker {
    shared: Arc<Shared>,
    dma: DmaSpace,
    interrupts: FunctionInterrupts,
    buffer: Vec<u8>,
    second: Vec<u8>,
}

/// Starts the worker; it runs until [`stop`] is called.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    dma: DmaSpace,
    interrupts: FunctionInterrupts,
    name: &str,
) -> std::io::Result<JoinHandle<()>> {
    let mut worker = Worker {
        shared,
        dma,
        interrupts,
        buffer: Vec::new(),
        second: Vec::new(),
    };
    std::thread::Builder::new()
        .name(format!("{name}-worker"))
        .spawn(move || worker.run())
}

/// Asks the worker to stop (it finishes the access in flight).
pub(crate) fn stop(shared: &Shared) {
    let mut s = shared.state();
    s.shutdown = true;
    s.abort_epoch += 1;
    shared.wake.notify_all();
}

impl Worker {
    fn run(&mut self) {
        loop {
            let (index, ring_base, ring_pasid, reset_epoch, abort_epoch) = {
                let mut s = self.shared.state();
                while !s.shutdown && !s.work_ready() {
                    s = self.shared.wake.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                if s.shutdown {
                    return;
                }
                s.busy = true;
                (
                    s.ring_head,
                    s.ring_base,
                    s.ring_pasid,
                    s.reset_epoch,
                    s.abort_epoch,
                )
            };
            let (pasid, privileged) = decode_pasid_field(ring_pasid);
            let ring_space = self.dma.with_pasid(pasid, privileged);
            // RING_BASE is the guest's: a ring running past the top of the address space is a
            // failed fetch, not a wrapped address.
            let address = ring_base.checked_add(index * descriptor::SIZE);
            let mut raw = [0u8; descriptor::SIZE as usize];
            let fetched = match address {
                Some(a) => ring_space.read(a, &mut raw).map_err(|e| e.to_string()),
                None => Err("the ring wraps around the address space".to_string()),
            };
            let address = address.unwrap_or(ring_base);
            if let Err(e) = fetched {
                log::debug!("sva-engine: ring fetch at {address:#x} failed: {e}");
                let mut s = self.shared.state();
                s.busy = false;
                if s.reset_epoch == reset_epoch {
                    s.halted = true;
                    s.error = error::RING_FETCH;
                    s.error_addr = address;
                }
                continue;
            }
            let desc = Descriptor::read_from_bytes(&raw).unwrap_or_default();
            let outcome = match desc.validate() {
                Err(DescriptorError::ReservedField) => {
                    let mut s = self.shared.state();
                    if s.reset_epoch == reset_epoch {
                        s.halted = true;
                        s.error = error::RESERVED_FIELD;
                    }
                    None
                }
                Err(DescriptorError::Invalid) => Some(Outcome {
                    status: cstatus::BAD_DESCRIPTOR,
                    fault_flags: 0,
                    fault_address: 0,
                    bytes: 0,
                    result: 0,
                }),
                Ok(()) => Some(self.execute(&desc, abort_epoch)),
            };
            let record = self.write_record_body(&desc, outcome, abort_epoch);
            let mut s = self.shared.state();
            s.busy = false;
            s.waiting_page = false;
            if s.reset_epoch != reset_epoch {
                drop(s);
                if let Some(write_status) = record {
                    write_status(self);
                }
                continue;
            }
            let Some(outcome) = outcome else {
                // A reserved field halts the engine; the descriptor stays at HEAD.
                continue;
            };
            s.ring_head = (s.ring_head + 1) % s.ring_size.max(1);
            s.reg_completed += 1;
            s.counters.descriptors_completed += 1;
            s.counters.last_completion = Some(std::time::Instant::now());
            s.counters.bytes += outcome.bytes;
            if outcome.status == cstatus::SUCCESS {
                s.counters.descriptors_succeeded += 1;
            } else {
                s.counters.descriptors_failed += 1;
            }
            if outcome.status == cstatus::TRANSLATION_FAULT {
                s.counters.translation_faults += 1;
            }
            let interrupt = desc.flags & flags::INTERRUPT != 0 && s.ctrl & ctrl::INT_ENABLE != 0;
            if interrupt && record.is_some() {
                s.int_status |= 1;
            }
            drop(s);
            // The status byte last: software that sees it sees HEAD and the counters moved.
            let written = record.is_some_and(|write_status| write_status(self));
            if interrupt && written {
                let _ = self.interrupts.trigger(0);
            }
        }
    }

    /// Writes the completion record except its status byte; returns how to write that last
    /// byte (`None`: no record could be written). A descriptor without a record address
    /// counts as written.
    #[allow(clippy::type_complexity)]
    fn write_record_body(
        &mut self,
        desc: &Descriptor,
        outcome: Option<Outcome>,
        abort_epoch: u64,
    ) -> Option<Box<dyn FnOnce(&Worker) -> bool>> {
        let outcome = outcome?;
        if desc.completion == 0 {
            return Some(Box::new(|_| true));
        }
        let record = CompletionRecord {
            status: outcome.status,
            fault_flags: outcome.fault_flags,
            result: outcome.result,
            bytes_completed: outcome.bytes,
            fault_address: outcome.fault_address,
            ..Default::default()
        };
        let (pasid, privileged) = desc.pasid();
        let space = self.dma.with_pasid(pasid, privileged);
        let address = desc.completion;
        let status = outcome.status;
        if status == cstatus::ABORTED {
            // Aborted: one plain attempt (it fails while Bus Master Enable is clear).
            let bytes = record.as_bytes();
            return match space.write(address + 1, &bytes[1..]) {
                Ok(()) => Some(Box::new(move |_: &Worker| {
                    space.write(address, &[status]).is_ok()
                })),
                Err(_) => None,
            };
        }
        let body = self.access_write(
            &space,
            address + 1,
            &record.as_bytes()[1..],
            false,
            abort_epoch,
        );
        if let Err(f) = body {
            log::debug!(
                "sva-engine: completion record at {address:#x} not written (status {})",
                f.status
            );
            return None;
        }
        Some(Box::new(move |w: &Worker| {
            w.access_write(&space, address, &[status], false, abort_epoch)
                .is_ok()
        }))
    }

    fn execute(&mut self, desc: &Descriptor, abort_epoch: u64) -> Outcome {
        let (pasid, privileged) = desc.pasid();
        let no_pr = desc.flags & flags::NO_PAGE_REQUEST != 0;
        {
            let s = self.shared.state();
            // Requests with a PASID prefix need PASID Enable (and Privileged Mode Enable for
            // privileged ones): without it the device may not send them.
            if pasid.is_some() && (!s.pasid_enabled || (privileged && !s.pasid_privileged)) {
                return Outcome {
                    status: cstatus::TRANSLATION_FAULT,
                    fault_flags: 0,
                    fault_address: desc.src,
                    bytes: 0,
                    result: 0,
                };
            }
        }
        let space = self.dma.with_pasid(pasid, privileged);
        let mut done = 0u64;
        let mut result = 0u32;
        let fail = |f: Fault, done: u64| Outcome {
            status: f.status,
            fault_flags: match f.access {
                DmaAccess::Write => fault_flags::WRITE,
                DmaAccess::Read => fault_flags::READ,
            },
            fault_address: f.address,
            bytes: done,
            result: 0,
        };
        let pattern = desc.src.to_le_bytes();
        // NOP moves nothing, whatever its length says (its addresses are not validated).
        let len = if desc.opcode == op::NOP { 0 } else { desc.len };
        while done < len {
            let src = desc.src + done;
            let dst = desc.dst + done;
            let step =
                (len - done)
                    .min(PAGE - (dst & (PAGE - 1)))
                    .min(if desc.opcode == op::FILL {
                        u64::MAX
                    } else {
                        PAGE - (src & (PAGE - 1))
                    });
            let n = step as usize;
            let mut buf = std::mem::take(&mut self.buffer);
            buf.resize(n, 0);
            let r = match desc.opcode {
                op::COPY => self
                    .access_read(&space, src, &mut buf, no_pr, abort_epoch)
                    .and_then(|()| self.access_write(&space, dst, &buf, no_pr, abort_epoch)),
                op::FILL => {
                    for (i, b) in buf.iter_mut().enumerate() {
                        *b = pattern[(done as usize + i) % 8];
                    }
                    self.access_write(&space, dst, &buf, no_pr, abort_epoch)
                }
                op::COMPARE => {
                    let mut other = std::mem::take(&mut self.second);
                    other.resize(n, 0);
                    let r = self
                        .access_read(&space, src, &mut buf, no_pr, abort_epoch)
                        .and_then(|()| {
                            self.access_read(&space, dst, &mut other, no_pr, abort_epoch)
                        });
                    if r.is_ok()
                        && let Some(i) = buf.iter().zip(&other).position(|(a, b)| a != b)
                    {
                        done += i as u64;
                        result = 1;
                        self.second = other;
                        self.buffer = buf;
                        break;
                    }
                    self.second = other;
                    r
                }
                _ => Ok(()),
            };
            self.buffer = buf;
            if let Err(f) = r {
                return fail(f, done);
            }
            done += step;
        }
        if self.buffer.capacity() > 1 << 20 {
            self.buffer = Vec::new();
        }
        Outcome {
            status: cstatus::SUCCESS,
            fault_flags: 0,
            fault_address: 0,
            bytes: done,
            result,
        }
    }

    fn access_read(
        &self,
        space: &DmaSpace,
        address: u64,
        buf: &mut [u8],
        no_pr: bool,
        abort_epoch: u64,
    ) -> Result<(), Fault> {
        let mut off = 0usize;
        while off < buf.len() {
            let at = address + off as u64;
            let n =
                self.access_page(space, at, DmaAccess::Read, no_pr, abort_epoch, |atc_gpa| {
                    let len = ((buf.len() - off) as u64).min(PAGE - (at & (PAGE - 1))) as usize;
                    let chunk = &mut buf[off..off + len];
                    match atc_gpa {
                        Some(gpa) => space.read_translated(gpa, chunk),
                        None => space.read(at, chunk),
                    }
                    .map(|()| len)
                })?;
            off += n;
        }
        Ok(())
    }

    fn access_write(
        &self,
        space: &DmaSpace,
        address: u64,
        buf: &[u8],
        no_pr: bool,
        abort_epoch: u64,
    ) -> Result<(), Fault> {
        let mut off = 0usize;
        while off < buf.len() {
            let at = address + off as u64;
            let n =
                self.access_page(space, at, DmaAccess::Write, no_pr, abort_epoch, |atc_gpa| {
                    let len = ((buf.len() - off) as u64).min(PAGE - (at & (PAGE - 1))) as usize;
                    let chunk = &buf[off..off + len];
                    match atc_gpa {
                        Some(gpa) => space.write_translated(gpa, chunk),
                        None => space.write(at, chunk),
                    }
                    .map(|()| len)
                })?;
            off += n;
        }
        Ok(())
    }

    /// One access within one page at `address`: through the ATC when ATS is enabled
    /// (translation requests on a miss, page requests when the translation denies the access),
    /// as an untranslated request otherwise. `access` performs the memory access given the
    /// translated address (or `None`: untranslated) and returns the bytes it moved.
    fn access_page(
        &self,
        space: &DmaSpace,
        address: u64,
        kind: DmaAccess,
        no_pr: bool,
        abort_epoch: u64,
        mut access: impl FnMut(Option<u64>) -> Result<usize, DmaError>,
    ) -> Result<usize, Fault> {
        let fault = |status: u8| Fault {
            status,
            address,
            access: kind,
        };
        let dma_fault = |e: DmaError| match e {
            DmaError::BusMasterDisabled { .. } => fault(cstatus::ABORTED),
            _ => fault(cstatus::TRANSLATION_FAULT),
        };
        let pasid = space.pasid();
        let mut page_requests = 0u32;
        let mut translations = 0u32;
        loop {
            let ats = {
                let s = self.shared.state();
                if s.abort_epoch != abort_epoch {
                    return Err(fault(cstatus::ABORTED));
                }
                s.ats_enabled
            };
            if !ats {
                return access(None).map_err(dma_fault);
            }
            let generation = {
                let atc = lock(&self.shared.atc);
                if let Some(hit) = atc.lookup(pasid, address, kind) {
                    // The access runs under the ATC lock: an invalidation waits for it.
                    let r = access(Some(hit.gpa)).map_err(dma_fault);
                    drop(atc);
                    self.shared.state().counters.atc_hits += 1;
                    return r;
                }
                atc.generation()
            };
            let page = address & !(PAGE - 1);
            translations += 1;
            if translations > MAX_TRANSLATIONS_PER_ACCESS {
                log::warn!(
                    "sva-engine: {kind:?} at {address:#x} (PASID {pasid:?}): \
                     {MAX_TRANSLATIONS_PER_ACCESS} translations and no usable ATC entry; \
                     the descriptor ends with a translation fault"
                );
                return Err(fault(cstatus::TRANSLATION_FAULT));
            }
            let translation = space
                .translation_request(page, PAGE, kind)
                .map_err(dma_fault)?;
            {
                let mut s = self.shared.state();
                s.reg_ats_translations += 1;
                s.counters.ats_translations += 1;
            }
            let permitted = match kind {
                DmaAccess::Read => translation.read,
                DmaAccess::Write => translation.write,
            };
            if permitted {
                if translation.untranslated_only {
                    return access(None).map_err(dma_fault);
                }
                let mut atc = lock(&self.shared.atc);
                if atc.generation() != generation {
                    // An invalidation raced with the request: translate again.
                    continue;
                }
                if !atc.insert(pasid, page, &translation, generation) {
                    // Current, but not a translation the ATC holds (an odd size or alignment):
                    // it serves this access only, under the ATC lock like a hit.
                    let r = access(Some(translation.gpa + (address - page))).map_err(dma_fault);
                    drop(atc);
                    return r;
                }
                // Loop: the access goes through the ATC.
                continue;
            }
            if no_pr {
                return Err(fault(cstatus::TRANSLATION_FAULT));
            }
            if page_requests >= MAX_PAGE_REQUESTS_PER_PAGE {
                return Err(fault(cstatus::PAGE_FAILURE));
            }
            if page_requests > 0 {
                // Success came, yet the page is still denied: the host may not have served
                // the request at all (a full page request queue answers Success for a lost
                // request, VT-d 7.5.1). Ask again after a pause that doubles each time, so
                // the retries span the time the host needs to drain its queue.
                self.back_off(page_requests, abort_epoch).map_err(fault)?;
            }
            page_requests += 1;
            self.page_request(space, pasid, page, kind, abort_epoch)
                .map_err(fault)?;
        }
    }

    /// Waits before the `retry`-th repeated page request for a page: 1 ms doubling up to
    /// [`MAX_RETRY_PAUSE`] (about 2 s over the [`MAX_PAGE_REQUESTS_PER_PAGE`] requests).
    /// Returns ABORTED if the descriptor is aborted meanwhile.
    fn back_off(&self, retry: u32, abort_epoch: u64) -> Result<(), u8> {
        let pause = Duration::from_millis(1 << (retry - 1).min(16)).min(MAX_RETRY_PAUSE);
        let deadline = std::time::Instant::now() + pause;
        let mut s = self.shared.state();
        loop {
            if s.abort_epoch != abort_epoch {
                return Err(cstatus::ABORTED);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(());
            }
            s = self
                .shared
                .wake
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sends one page request (a group of one, LPIG) and parks until its response.
    fn page_request(
        &self,
        space: &DmaSpace,
        pasid: Option<Pasid>,
        page: u64,
        kind: DmaAccess,
        abort_epoch: u64,
    ) -> Result<(), u8> {
        let group = {
            let mut s = self.shared.state();
            loop {
                if s.abort_epoch != abort_epoch {
                    return Err(cstatus::ABORTED);
                }
                // PRI off, or enabled with no allocation: no page request may be sent.
                if !s.pri_enabled || s.pri_allocation == 0 {
                    return Err(cstatus::TRANSLATION_FAULT);
                }
                if s.pri_stopped {
                    return Err(cstatus::PAGE_FAILURE);
                }
                // Never more outstanding than the allocation the guest wrote.
                if (s.outstanding_groups.len() as u64) < u64::from(s.pri_allocation) {
                    break;
                }
                s.waiting_page = true;
                s = self
                    .shared
                    .wake
                    .wait_timeout(s, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let g = s.allocate_group();
            s.outstanding_groups.push(g);
            s.reg_page_requests += 1;
            s.counters.page_requests += 1;
            s.waiting_page = true;
            g
        };
        let request = PageRequest {
            requester_id: space.requester_id(),
            pasid,
            address: page,
            read: true,
            write: kind == DmaAccess::Write,
            execute: false,
            privileged: false,
            group_index: group,
            last_in_group: true,
        };
        let sent = std::time::Instant::now();
        if let Err(e) = space.page_request(request) {
            log::debug!("sva-engine: page request refused: {e}");
            let mut s = self.shared.state();
            s.outstanding_groups.retain(|&g| g != group);
            s.waiting_page = false;
            return Err(match e {
                DmaError::BusMasterDisabled { .. } => cstatus::ABORTED,
                _ => cstatus::TRANSLATION_FAULT,
            });
        }
        let mut s = self.shared.state();
        loop {
            if let Some(i) = s.responses.iter().position(|r| r.group_index == group) {
                let response = s.responses.remove(i).unwrap_or(PageResponse {
                    pasid,
                    group_index: group,
                    code: PageResponseCode::ResponseFailure,
                });
                s.waiting_page = false;
                let ns = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let c = &mut s.counters;
                c.page_request_round_trips += 1;
                c.page_request_round_trip_ns = c.page_request_round_trip_ns.saturating_add(ns);
                c.page_request_round_trip_max_ns = c.page_request_round_trip_max_ns.max(ns);
                return match response.code {
                    PageResponseCode::Success => Ok(()),
                    PageResponseCode::InvalidRequest => Err(cstatus::PAGE_INVALID),
                    PageResponseCode::ResponseFailure => {
                        s.pri_stopped = true;
                        s.pending_response_failure = true;
                        Err(cstatus::PAGE_FAILURE)
                    }
                };
            }
            if s.abort_epoch != abort_epoch {
                s.waiting_page = false;
                return Err(cstatus::ABORTED);
            }
            if !s.pri_enabled {
                // PRI disabled with the request outstanding: it will not be answered.
                s.waiting_page = false;
                return Err(cstatus::PAGE_FAILURE);
            }
            s = self.shared.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}
