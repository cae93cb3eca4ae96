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
//! This unit caches nothing yet (no IOTLB, no context or PASID cache), so every invalidation
//! is trivially honoured and every change to the tables is seen at once; the descriptors are
//! still validated and counted.

use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::registers::{FaultRecord, RegisterAction, RegisterFile, VtdConfig};
use super::scalable::ScalableRequest;
use super::tables::{TranslationType, WalkRequest};
use crate::{
    AddressType, AtcInvalidation, Completion, DeviceEndpoint, DmaAccess, DmaError, DmaRequest,
    DmaTranslator, FunctionBinding, MsiMessage, MsiSink, Pasid, RequesterId, Translation,
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
}

/// One remapping unit.
pub struct RemappingUnit {
    regs: RegisterFile,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    msi: Arc<dyn MsiSink>,
    endpoints: Vec<(FunctionBinding, Arc<dyn DeviceEndpoint>)>,
    pending_device_tlb: Vec<Completion>,
    counters: UnitCounters,
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
        }
    }

    /// The register file.
    pub fn registers(&self) -> &RegisterFile {
        &self.regs
    }

    /// What the unit has done so far.
    pub fn counters(&self) -> UnitCounters {
        self.counters
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
                RegisterAction::SetRootTable(rtaddr) => {
                    log::debug!("vt-d: root table {rtaddr:#x}");
                }
                RegisterAction::Translation(on) => {
                    log::info!(
                        "vt-d: DMA remapping {}",
                        if on { "enabled" } else { "disabled" }
                    );
                }
                RegisterAction::QueuedInvalidation(on) => {
                    log::debug!(
                        "vt-d: queued invalidation {}",
                        if on { "on" } else { "off" }
                    );
                }
                RegisterAction::QueueTail(_)
                | RegisterAction::InvalidateContextCache { .. }
                | RegisterAction::InvalidateIotlb { .. } => {} // nothing cached
            }
        }
        // A tail write, or software clearing IQE after a bad descriptor: go on from the head.
        self.process_queue();
    }

    /// Translates one DMA request (VT-d chapter 3): pass-through while translation is off;
    /// otherwise the walk for the root table's mode. A fault is recorded (fault event MSI if
    /// unmasked) and returned as [`DmaError::TranslationFault`].
    pub fn translate(&mut self, request: &DmaRequest) -> Result<Translation, DmaError> {
        if !self.regs.translation_enabled() {
            return Ok(Translation {
                execute: true,
                privileged: true,
                ..Translation::new(request.address, request.len.max(1), true, true)
            });
        }
        self.counters.translations += 1;
        let config = self.regs.config();
        let (cap, ecap) = config.capabilities();
        let sagaw = ((cap >> 8) & 0x1f) as u8;
        let large_pages = ((cap >> 34) & 0xf) as u8;
        let width = config.address_width;
        let rtaddr = self.regs.root_table();
        let root = rtaddr & !0xfff;
        let scalable = (rtaddr >> 10) & 3 == 1;
        let walk = WalkRequest {
            address: request.address,
            write: request.access == DmaAccess::Write,
        };
        let memory = self.memory.memory();
        let result = if request.address_type != AddressType::Untranslated {
            // No device TLB in this unit (ECAP.DT clear): ATS requests are blocked.
            Err(if scalable {
                super::scalable::reason::DTE_CLEAR
            } else {
                super::tables::reason::BLOCKED
            })
        } else if scalable {
            if ecap & (1 << 43) == 0 {
                Err(super::scalable::reason::ROOT_TABLE_ADDRESS)
            } else {
                let sreq = ScalableRequest {
                    walk,
                    pasid: request.pasid.map(Pasid::value),
                    privileged: request.privileged,
                    execute: false,
                };
                super::scalable::translate(
                    &*memory,
                    root,
                    request.requester_id.0,
                    &sreq,
                    sagaw,
                    width,
                    large_pages,
                )
            }
        } else if request.pasid.is_some() {
            Err(0x31) // SM: TTM 0 for a request with PASID
        } else {
            super::tables::lookup_context(&*memory, root, request.requester_id.0, width)
                .and_then(|entry| entry.decode(sagaw, width))
                .and_then(|context| match context.translation_type {
                    TranslationType::PassThrough => Ok(super::tables::Leaf {
                        page: request.address & !0xfff,
                        page_size: 4096,
                        read: true,
                        write: true,
                    }),
                    _ => super::tables::second_stage_walk(
                        &*memory,
                        &context,
                        walk,
                        width,
                        large_pages,
                    ),
                })
        };
        drop(memory);
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
            Err(reason) => {
                self.counters.faults += 1;
                let signal = self.regs.record_fault(FaultRecord {
                    source_id: request.requester_id.0,
                    pasid: request.pasid.map(Pasid::value),
                    address: request.address,
                    reason,
                    write: walk.write,
                    execute: false,
                    privileged: request.privileged,
                });
                if signal {
                    self.send_fault_event();
                }
                Err(DmaError::TranslationFault {
                    requester_id: request.requester_id,
                    iova: request.address,
                    access: request.access,
                    reason: format!("VT-d fault reason {reason:#04x}"),
                })
            }
        }
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
            }
            descriptor::DEVICE_TLB | descriptor::PASID_DEVICE_TLB => {
                if reserved_upper {
                    return Err(queue_error::DESCRIPTOR);
                }
                self.invalidate_device_tlb(desc);
            }
            descriptor::WAIT => self.wait(desc)?,
            _ => return Err(queue_error::DESCRIPTOR),
        }
        self.counters.descriptors[usize::from(kind)] += 1;
        Ok(())
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
        self.unit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .translate(request)
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
}
