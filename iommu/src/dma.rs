//! The DMA API: every device access to guest memory goes through a [`DmaSpace`].
//!
//! A [`DmaSpace`] is bound to one requester ID (and optionally a PASID). Each access is split into
//! [`DmaRequest`]s that a [`DmaTranslator`] turns into guest-physical ranges:
//! - today [`IdentityTranslator`] (no IOMMU: IOVA == GPA);
//! - later the VT-d model (second-stage / first-stage walks, IOTLB, fault recording), which also
//!   answers ATS translation requests ([`DmaSpace::translation_request`]) and receives PRI page
//!   requests ([`DmaSpace::page_request`]).
//!
//! Guest memory is a [`GuestMemoryAtomic`] so that ranges the VMM adds at run time (e.g. a
//! committed CXL HDM decoder) become visible to DMA without rebuilding devices.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

use thiserror::Error;
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryError,
    GuestMemoryMmap,
};

use crate::{Pasid, RequesterId};

/// Direction of a DMA access, from the device's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DmaAccess {
    /// The device reads guest memory (memory read request).
    Read,
    /// The device writes guest memory (memory write request).
    Write,
}

/// The Address Type (AT) field of a memory request (PCIe Base Spec r6.0, 10.2.1, Table 10-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressType {
    /// AT=00b: the address is an IOVA the IOMMU must translate (or pass through).
    Untranslated,
    /// AT=01b: an ATS Translation Request; the answer is cached in the device's ATC.
    TranslationRequest,
    /// AT=10b: the address was translated by ATS and is already guest-physical.
    Translated,
}

/// One request presented to a [`DmaTranslator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaRequest {
    /// Requester ID of the issuing function (VT-d context lookup key).
    pub requester_id: RequesterId,
    /// PASID TLP prefix, if the request carries one.
    pub pasid: Option<Pasid>,
    /// Privileged-mode access (PASID prefix PMR bit).
    pub privileged: bool,
    /// Address of the first byte.
    pub address: u64,
    /// Number of bytes still to access from `address` (at least 1).
    pub len: u64,
    /// Read or write.
    pub access: DmaAccess,
    /// Untranslated, ATS translation request, or translated.
    pub address_type: AddressType,
}

/// Result of translating a [`DmaRequest`]: `[address, address + len)` of the request maps to
/// `[gpa, gpa + len)`, with the permissions of the mapping — what an ATS Translation Completion
/// carries (PCIe Base Spec r6.0, 10.2.3: R, W, Exe, Priv, U, and the size S) and what a
/// remapping IOMMU's page walk yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address that the request's `address` maps to.
    pub gpa: u64,
    /// Number of contiguous bytes mapped from the request's address (≥ 1; may be less than the
    /// request's `len`, e.g. up to the end of a page).
    pub len: u64,
    /// Reads are permitted.
    pub read: bool,
    /// Writes are permitted.
    pub write: bool,
    /// Instruction fetches are permitted (Exe; meaningful with a PASID).
    pub execute: bool,
    /// Privileged (supervisor) accesses are permitted (Priv; with a PASID).
    pub privileged: bool,
    /// Untranslated only (U): the device must not cache this translation; it keeps using
    /// untranslated requests for the range.
    pub untranslated_only: bool,
    /// Size of the translation's page (4 KiB, 2 MiB, 1 GiB, …): an ATC entry covers the
    /// naturally aligned page of this size around the address.
    pub page_size: u64,
}

impl Translation {
    /// A read/write translation of a 4 KiB page (execute and privileged off).
    pub fn new(gpa: u64, len: u64, read: bool, write: bool) -> Self {
        Translation {
            gpa,
            len,
            read,
            write,
            execute: false,
            privileged: false,
            untranslated_only: false,
            page_size: 4096,
        }
    }
}

/// A PRI Page Request (PCIe Base Spec r6.0, 10.4.1): the device asks the host to make a page
/// resident, and parks the work until the matching Page Request Group Response arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// Requester ID of the issuing function.
    pub requester_id: RequesterId,
    /// PASID, if the request carries one.
    pub pasid: Option<Pasid>,
    /// Page-aligned untranslated address.
    pub address: u64,
    /// Read access requested.
    pub read: bool,
    /// Write access requested.
    pub write: bool,
    /// Execute access requested.
    pub execute: bool,
    /// Privileged access requested.
    pub privileged: bool,
    /// Page Request Group Index (9 bits).
    pub group_index: u16,
    /// Last request in its group (LPIG).
    pub last_in_group: bool,
}

/// DMA failures. A device turns them into its architected error (completer abort, CQE error, …).
#[derive(Debug, Error)]
pub enum DmaError {
    /// `iova + len` wraps around the 64-bit address space.
    #[error("DMA range {iova:#x}+{len:#x} overflows the address space")]
    AddressOverflow {
        /// Start of the access.
        iova: u64,
        /// Length of the access.
        len: usize,
    },
    /// No guest memory backs (all of) the translated range.
    #[error("DMA to unmapped guest-physical range {gpa:#x}+{len:#x}: {source}")]
    Unmapped {
        /// Guest-physical start of the failing chunk.
        gpa: u64,
        /// Length of the failing chunk.
        len: usize,
        /// What vm-memory reported.
        #[source]
        source: GuestMemoryError,
    },
    /// The translator blocked the access (IOMMU fault; recorded by the IOMMU model).
    #[error("DMA translation fault for {requester_id} at {iova:#x} ({access:?}): {reason}")]
    TranslationFault {
        /// Issuing function.
        requester_id: RequesterId,
        /// Faulting address.
        iova: u64,
        /// Read or write.
        access: DmaAccess,
        /// Human-readable fault reason.
        reason: String,
    },
    /// The translator returned a zero-length translation (a translator bug; never loops forever).
    #[error("translator returned an empty translation at {iova:#x}")]
    EmptyTranslation {
        /// Address that was being translated.
        iova: u64,
    },
    /// Page requests are not supported by the current translator (no IOMMU, or PRI disabled).
    #[error("page requests are not supported")]
    PageRequestUnsupported,
    /// The function's Bus Master Enable is clear: it may not issue memory requests (PCIe Base
    /// Spec r6.0, 7.5.1.1.3).
    #[error("DMA by {requester_id} with Bus Master Enable clear")]
    BusMasterDisabled {
        /// Issuing function.
        requester_id: RequesterId,
    },
}

/// Translates device addresses to guest-physical addresses. Implemented by
/// [`IdentityTranslator`] today and by the VT-d model later.
pub trait DmaTranslator: Send + Sync {
    /// Translates the first bytes of `request`. Must return a [`Translation`] with `len >= 1`
    /// or an error.
    fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError>;

    /// Queues a PRI page request. The response travels back asynchronously, through the
    /// [`DeviceEndpoint`] registered for the function ([`DmaSpace::register_endpoint`]).
    fn page_request(&self, _request: &PageRequest) -> Result<(), DmaError> {
        Err(DmaError::PageRequestUnsupported)
    }

    /// A function with an address translation cache or page requests registers the way back to
    /// it: the IOMMU finds it by its *current* requester ID (`binding`) when it sends device-TLB
    /// invalidations and page group responses. The default (no IOMMU) keeps nothing: nothing
    /// is ever invalidated or answered.
    fn register_endpoint(&self, _binding: FunctionBinding, _endpoint: Arc<dyn DeviceEndpoint>) {}
}

/// The identity a function's DMA carries, shared by every clone of its [`DmaSpace`] (worker
/// threads hold clones): its requester ID, which changes when the guest renumbers buses, and its
/// Bus Master Enable, without which it may not issue memory requests.
#[derive(Clone, Debug)]
pub struct FunctionBinding(Arc<BindingState>);

#[derive(Debug)]
struct BindingState {
    requester_id: AtomicU16,
    bus_master: AtomicBool,
}

impl FunctionBinding {
    /// A function at `requester_id`, Bus Master Enable clear (as after reset).
    pub fn new(requester_id: RequesterId) -> Self {
        FunctionBinding(Arc::new(BindingState {
            requester_id: AtomicU16::new(requester_id.0),
            bus_master: AtomicBool::new(false),
        }))
    }

    /// The function's requester ID now.
    pub fn requester_id(&self) -> RequesterId {
        RequesterId(self.0.requester_id.load(Ordering::Acquire))
    }

    /// Whether Bus Master Enable is set.
    pub fn bus_master(&self) -> bool {
        self.0.bus_master.load(Ordering::Acquire)
    }

    /// True if `other` is the same function (a clone of this binding).
    pub fn same_function(&self, other: &FunctionBinding) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Completion of a device-TLB invalidation: the function signals it once its ATC holds no
/// entry the invalidation covers and no request using one is in flight (PCIe Base Spec r6.0,
/// 10.3.1); the IOMMU's invalidation wait waits for it. Cloneable; all clones share one state.
#[derive(Clone, Debug, Default)]
pub struct Completion(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl Completion {
    /// A pending completion.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks it complete and wakes waiters.
    pub fn complete(&self) {
        let (done, cv) = &*self.0;
        *done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    /// Whether it completed.
    pub fn is_complete(&self) -> bool {
        *self.0.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits at most `timeout` for completion; returns whether it completed.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        let (done, cv) = &*self.0;
        let guard = done.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |d| !*d)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// A device-TLB (ATC) invalidation the IOMMU sends a function (PCIe Base Spec r6.0, 10.3.1;
/// VT-d "Device-TLB Invalidate Descriptor", and its PASID-based form).
#[derive(Clone, Debug)]
pub struct AtcInvalidation {
    /// Only entries of this PASID (`None`: entries without a PASID, or all with `global`).
    pub pasid: Option<Pasid>,
    /// Every PASID's entries (the PASID-based descriptor's G bit).
    pub global: bool,
    /// First untranslated address covered (aligned to `size`).
    pub address: u64,
    /// Bytes covered: a power of two ≥ 4 KiB; `u64::MAX` for the whole address space.
    pub size: u64,
    /// Signalled by the function when done.
    pub completion: Completion,
}

impl AtcInvalidation {
    /// True if an ATC entry for `pasid` covering `[address, address + len)` must go.
    pub fn covers(&self, pasid: Option<Pasid>, address: u64, len: u64) -> bool {
        if !self.global && pasid != self.pasid {
            return false;
        }
        if self.size == u64::MAX {
            return true;
        }
        let end = self.address.saturating_add(self.size);
        address < end && address.saturating_add(len.max(1)) > self.address
    }
}

/// How the host answered a page request group (PCIe Base Spec r6.0, 10.4.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageResponseCode {
    /// The pages are resident: retry the translation.
    Success,
    /// The request was invalid: do not retry; report the error to the device's user.
    InvalidRequest,
    /// The host cannot serve page requests: stop issuing them (Response Failure) until PRI is
    /// re-enabled.
    ResponseFailure,
}

/// A Page Request Group Response the IOMMU sends a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageResponse {
    /// The PASID of the group (responses always carry it here: PRG Response PASID Required).
    pub pasid: Option<Pasid>,
    /// Page Request Group Index (9 bits) of the group answered.
    pub group_index: u16,
    /// The answer.
    pub code: PageResponseCode,
}

/// The IOMMU's way back to a function: device-TLB invalidations and page group responses.
/// Implemented by functions with ATS or PRI; called from IOMMU context (the invalidation queue),
/// so implementations hand work to the device and return without blocking on guest action.
pub trait DeviceEndpoint: Send + Sync {
    /// Drop the ATC entries `request` covers, then complete `request.completion`.
    fn invalidate_atc(&self, request: AtcInvalidation);
    /// A page request group was answered.
    fn page_response(&self, response: PageResponse);
}

/// No IOMMU: every address is guest-physical, every access is permitted.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityTranslator;

impl DmaTranslator for IdentityTranslator {
    fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError> {
        Ok(Translation {
            execute: true,
            privileged: true,
            ..Translation::new(request.address, request.len.max(1), true, true)
        })
    }
}

/// A device's view of guest memory, bound to its function ([`FunctionBinding`]: requester ID
/// and Bus Master Enable) and optionally a PASID.
///
/// Cheap to clone; clones share the guest memory map, the translator and the binding, so a
/// worker thread's clone sees a renumbered bus or a cleared Bus Master Enable at once. Every
/// access is refused while Bus Master Enable is clear ([`DmaError::BusMasterDisabled`]); the
/// function mirrors its Command register into [`DmaSpace::set_bus_master`].
#[derive(Clone)]
pub struct DmaSpace {
    binding: FunctionBinding,
    pasid: Option<Pasid>,
    privileged: bool,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    translator: Arc<dyn DmaTranslator>,
}

impl std::fmt::Debug for DmaSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaSpace")
            .field("requester_id", &self.binding.requester_id())
            .field("bus_master", &self.binding.bus_master())
            .field("pasid", &self.pasid)
            .field("privileged", &self.privileged)
            .finish_non_exhaustive()
    }
}

impl DmaSpace {
    /// A DMA space with identity translation (no IOMMU). Bus Master Enable starts clear.
    pub fn identity(requester_id: RequesterId, memory: GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
        Self::with_translator(requester_id, memory, Arc::new(IdentityTranslator))
    }

    /// A DMA space whose requests go through `translator` (e.g. the VT-d model).
    pub fn with_translator(
        requester_id: RequesterId,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        translator: Arc<dyn DmaTranslator>,
    ) -> Self {
        DmaSpace {
            binding: FunctionBinding::new(requester_id),
            pasid: None,
            privileged: false,
            memory,
            translator,
        }
    }

    /// A clone of this space whose requests carry `pasid` (and the privileged-mode bit).
    pub fn with_pasid(&self, pasid: Option<Pasid>, privileged: bool) -> Self {
        DmaSpace {
            pasid,
            privileged,
            ..self.clone()
        }
    }

    /// The requester ID requests are tagged with.
    pub fn requester_id(&self) -> RequesterId {
        self.binding.requester_id()
    }

    /// Re-binds this function (every clone) to a new requester ID (it captured a new bus
    /// number, PCIe Base Spec r6.0, 2.2.6.2).
    pub fn set_requester_id(&self, requester_id: RequesterId) {
        self.binding
            .0
            .requester_id
            .store(requester_id.0, Ordering::Release);
    }

    /// Mirrors the function's Bus Master Enable (every clone sees it).
    pub fn set_bus_master(&self, enabled: bool) {
        self.binding.0.bus_master.store(enabled, Ordering::Release);
    }

    /// Whether the function may issue memory requests.
    pub fn bus_master_enabled(&self) -> bool {
        self.binding.bus_master()
    }

    /// The function this space belongs to.
    pub fn binding(&self) -> &FunctionBinding {
        &self.binding
    }

    /// Registers the IOMMU's way back to this function (device-TLB invalidations, page group
    /// responses); see [`DmaTranslator::register_endpoint`].
    pub fn register_endpoint(&self, endpoint: Arc<dyn DeviceEndpoint>) {
        self.translator
            .register_endpoint(self.binding.clone(), endpoint);
    }

    fn check_bus_master(&self) -> Result<(), DmaError> {
        if self.binding.bus_master() {
            Ok(())
        } else {
            Err(DmaError::BusMasterDisabled {
                requester_id: self.requester_id(),
            })
        }
    }

    /// The PASID requests carry, if any.
    pub fn pasid(&self) -> Option<Pasid> {
        self.pasid
    }

    /// Reads `buf.len()` bytes at untranslated address `iova`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.read_with(AddressType::Untranslated, iova, buf)
    }

    /// Writes `buf` at untranslated address `iova`.
    pub fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.write_with(AddressType::Untranslated, iova, buf)
    }

    /// Reads with an ATS-translated address (AT=10b), e.g. taken from the device's ATC.
    pub fn read_translated(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.read_with(AddressType::Translated, addr, buf)
    }

    /// Writes with an ATS-translated address (AT=10b).
    pub fn write_translated(&self, addr: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.write_with(AddressType::Translated, addr, buf)
    }

    /// Reads a plain-data object at `iova`.
    pub fn read_obj<T: ByteValued>(&self, iova: u64) -> Result<T, DmaError> {
        let mut value = T::zeroed();
        self.read(iova, value.as_mut_slice())?;
        Ok(value)
    }

    /// Writes a plain-data object at `iova`.
    pub fn write_obj<T: ByteValued>(&self, iova: u64, value: &T) -> Result<(), DmaError> {
        self.write(iova, value.as_slice())
    }

    /// Sends an ATS Translation Request (PCIe Base Spec r6.0, 10.2.2) for `len` bytes at `iova`;
    /// the device caches the completion in its ATC.
    pub fn translation_request(
        &self,
        iova: u64,
        len: u64,
        access: DmaAccess,
    ) -> Result<Translation, DmaError> {
        self.check_bus_master()?;
        let request = self.request(AddressType::TranslationRequest, iova, len.max(1), access);
        let translation = self.translator.translate(&request)?;
        if translation.len == 0 {
            return Err(DmaError::EmptyTranslation { iova });
        }
        Ok(translation)
    }

    /// Sends a PRI Page Request (PCIe Base Spec r6.0, 10.4.1). The requester ID and PASID of
    /// `request` are overwritten with this space's.
    pub fn page_request(&self, mut request: PageRequest) -> Result<(), DmaError> {
        self.check_bus_master()?;
        request.requester_id = self.requester_id();
        request.pasid = self.pasid;
        self.translator.page_request(&request)
    }

    fn request(&self, at: AddressType, address: u64, len: u64, access: DmaAccess) -> DmaRequest {
        DmaRequest {
            requester_id: self.requester_id(),
            pasid: self.pasid,
            privileged: self.privileged,
            address,
            len,
            access,
            address_type: at,
        }
    }

    fn read_with(&self, at: AddressType, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let mem = self.memory.memory();
        self.for_each_chunk(at, iova, buf.len(), DmaAccess::Read, |gpa, range| {
            mem.read_slice(&mut buf[range], GuestAddress(gpa))
        })
    }

    fn write_with(&self, at: AddressType, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        let mem = self.memory.memory();
        self.for_each_chunk(at, iova, buf.len(), DmaAccess::Write, |gpa, range| {
            mem.write_slice(&buf[range], GuestAddress(gpa))
        })
    }

    /// Splits `[iova, iova + len)` into translated chunks and calls `f(gpa, buffer_range)` for
    /// each. Validates overflow and permissions before touching memory.
    fn for_each_chunk<F>(
        &self,
        at: AddressType,
        iova: u64,
        len: usize,
        access: DmaAccess,
        mut f: F,
    ) -> Result<(), DmaError>
    where
        F: FnMut(u64, std::ops::Range<usize>) -> Result<(), GuestMemoryError>,
    {
        if len == 0 {
            return Ok(());
        }
        self.check_bus_master()?;
        if iova.checked_add(len as u64 - 1).is_none() {
            return Err(DmaError::AddressOverflow { iova, len });
        }
        let mut done = 0usize;
        while done < len {
            let address = iova + done as u64;
            let remaining = (len - done) as u64;
            let request = self.request(at, address, remaining, access);
            let t = self.translator.translate(&request)?;
            if t.len == 0 {
                return Err(DmaError::EmptyTranslation { iova: address });
            }
            let permitted = match access {
                DmaAccess::Read => t.read,
                DmaAccess::Write => t.write,
            };
            if !permitted {
                return Err(DmaError::TranslationFault {
                    requester_id: request.requester_id,
                    iova: address,
                    access,
                    reason: "access not permitted by translation".into(),
                });
            }
            let chunk = remaining.min(t.len) as usize;
            if t.gpa.checked_add(chunk as u64 - 1).is_none() {
                return Err(DmaError::AddressOverflow {
                    iova: t.gpa,
                    len: chunk,
                });
            }
            f(t.gpa, done..done + chunk).map_err(|source| DmaError::Unmapped {
                gpa: t.gpa,
                len: chunk,
                source,
            })?;
            done += chunk;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn memory() -> GuestMemoryAtomic<GuestMemoryMmap> {
        // Two regions with a hole between them: [0, 64K) and [1M, 1M+64K).
        let mmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x10_0000), 0x1_0000),
        ])
        .unwrap();
        GuestMemoryAtomic::new(mmap)
    }

    /// A space whose function has Bus Master Enable set.
    fn enabled(dma: DmaSpace) -> DmaSpace {
        dma.set_bus_master(true);
        dma
    }

    #[test]
    fn identity_read_write_roundtrip() {
        let dma = enabled(DmaSpace::identity(RequesterId::new(1, 0, 0), memory()));
        dma.write(0x1000, &[1, 2, 3, 4]).unwrap();
        let mut buf = [0u8; 4];
        dma.read(0x1000, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        dma.write_obj(0x10_0010, &0x1122_3344_5566_7788u64).unwrap();
        assert_eq!(
            dma.read_obj::<u64>(0x10_0010).unwrap(),
            0x1122_3344_5566_7788
        );
        // Empty accesses are no-ops, even at absurd addresses.
        dma.read(u64::MAX, &mut []).unwrap();
    }

    #[test]
    fn unmapped_and_out_of_range_fail() {
        let dma = enabled(DmaSpace::identity(RequesterId::new(1, 0, 0), memory()));
        let mut buf = [0u8; 8];
        // In the hole.
        assert!(matches!(
            dma.read(0x8_0000, &mut buf),
            Err(DmaError::Unmapped { .. })
        ));
        // Straddling the end of the first region into the hole.
        assert!(matches!(
            dma.write(0xfffc, &buf),
            Err(DmaError::Unmapped { .. })
        ));
        // Past the end of all memory.
        assert!(matches!(
            dma.read(0x4000_0000, &mut buf),
            Err(DmaError::Unmapped { .. })
        ));
        // Wrapping the address space.
        assert!(matches!(
            dma.read(u64::MAX - 3, &mut buf),
            Err(DmaError::AddressOverflow { .. })
        ));
    }

    #[test]
    fn memory_swaps_are_visible() {
        let mem = memory();
        let dma = enabled(DmaSpace::identity(RequesterId::new(0, 3, 0), mem.clone()));
        assert!(dma.write(0x2000_0000, &[0xaa]).is_err());
        let bigger = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x2000_0000), 0x1000),
        ])
        .unwrap();
        mem.lock().unwrap().replace(bigger);
        dma.write(0x2000_0000, &[0xaa]).unwrap();
    }

    /// A translator that maps IOVA pages to GPA pages with an offset, page by page, read-only for
    /// one page, and records what it was asked.
    struct PagedTranslator {
        seen: Mutex<Vec<DmaRequest>>,
    }

    impl DmaTranslator for PagedTranslator {
        fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError> {
            self.seen.lock().unwrap().push(*request);
            let page = request.address & !0xfff;
            if page == 0x9000 {
                return Err(DmaError::TranslationFault {
                    requester_id: request.requester_id,
                    iova: request.address,
                    access: request.access,
                    reason: "not present".into(),
                });
            }
            Ok(Translation::new(
                request.address + 0x10_0000,
                0x1000 - (request.address & 0xfff),
                true,
                page != 0x5000,
            ))
        }
    }

    #[test]
    fn translated_accesses_are_split_per_page() {
        let translator = Arc::new(PagedTranslator {
            seen: Mutex::new(Vec::new()),
        });
        let pasid = Pasid::new(7);
        let dma = enabled(
            DmaSpace::with_translator(RequesterId::new(2, 0, 1), memory(), translator.clone())
                .with_pasid(pasid, false),
        );
        let data: Vec<u8> = (0..0x1800u32).map(|i| i as u8).collect();
        dma.write(0x0800, &data).unwrap();
        {
            let seen = translator.seen.lock().unwrap();
            assert_eq!(seen.len(), 2);
            assert_eq!(seen[0].address, 0x0800);
            assert_eq!(seen[0].len, 0x1800);
            assert_eq!(seen[1].address, 0x1000);
            assert_eq!(seen[1].len, 0x1000);
            assert!(seen.iter().all(|r| r.pasid == pasid
                && r.requester_id == RequesterId::new(2, 0, 1)
                && r.address_type == AddressType::Untranslated));
        }
        // Identity view of the same memory sees the data at +1 MiB.
        let phys = enabled(DmaSpace::identity(
            RequesterId::new(0, 0, 0),
            dma.memory.clone(),
        ));
        let mut back = vec![0u8; data.len()];
        phys.read(0x10_0800, &mut back).unwrap();
        assert_eq!(back, data);

        // Write to the read-only page faults; reading it works.
        assert!(matches!(
            dma.write(0x5000, &[1]),
            Err(DmaError::TranslationFault { .. })
        ));
        let mut one = [0u8; 1];
        dma.read(0x5000, &mut one).unwrap();
        // Non-present page faults.
        assert!(matches!(
            dma.read(0x9000, &mut one),
            Err(DmaError::TranslationFault { .. })
        ));
    }

    #[test]
    fn ats_and_pri_with_identity() {
        let dma = enabled(DmaSpace::identity(RequesterId::new(1, 0, 0), memory()));
        let t = dma
            .translation_request(0x2000, 0x1000, DmaAccess::Write)
            .unwrap();
        assert_eq!(t.gpa, 0x2000);
        assert!(t.len >= 0x1000 && t.write);
        dma.write_translated(t.gpa, &[5]).unwrap();
        let mut b = [0u8];
        dma.read_translated(0x2000, &mut b).unwrap();
        assert_eq!(b, [5]);
        let pr = PageRequest {
            requester_id: RequesterId(0),
            pasid: None,
            address: 0x2000,
            read: true,
            write: false,
            execute: false,
            privileged: false,
            group_index: 1,
            last_in_group: true,
        };
        assert!(matches!(
            dma.page_request(pr),
            Err(DmaError::PageRequestUnsupported)
        ));
    }

    struct EmptyTranslator;
    impl DmaTranslator for EmptyTranslator {
        fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError> {
            Ok(Translation::new(request.address, 0, true, true))
        }
    }

    #[test]
    fn empty_translation_is_an_error_not_a_hang() {
        let dma = enabled(DmaSpace::with_translator(
            RequesterId(0),
            memory(),
            Arc::new(EmptyTranslator),
        ));
        assert!(matches!(
            dma.read(0, &mut [0u8; 4]),
            Err(DmaError::EmptyTranslation { .. })
        ));
    }

    #[test]
    fn bus_master_enable_gates_every_request_and_is_shared_by_clones() {
        let dma = DmaSpace::identity(RequesterId::new(1, 0, 0), memory());
        let worker = dma.clone();
        let mut buf = [0u8; 4];
        // After reset Bus Master Enable is clear: nothing reaches memory.
        assert!(matches!(
            worker.write(0x1000, &[1, 2, 3, 4]),
            Err(DmaError::BusMasterDisabled { .. })
        ));
        assert!(matches!(
            worker.translation_request(0x1000, 0x1000, DmaAccess::Read),
            Err(DmaError::BusMasterDisabled { .. })
        ));
        // Empty accesses stay no-ops either way.
        worker.read(0, &mut []).unwrap();
        dma.set_bus_master(true);
        assert!(worker.bus_master_enabled());
        worker.write(0x1000, &[1, 2, 3, 4]).unwrap();
        dma.set_bus_master(false);
        assert!(worker.read(0x1000, &mut buf).is_err());
        // The guest renumbers the bus: the worker's requests carry the new ID at once.
        dma.set_requester_id(RequesterId::new(5, 0, 0));
        assert_eq!(worker.requester_id(), RequesterId::new(5, 0, 0));
        assert!(worker.binding().same_function(dma.binding()));
        let other = DmaSpace::identity(RequesterId::new(5, 0, 0), memory());
        assert!(!other.binding().same_function(dma.binding()));
    }

    /// A translator that keeps registered endpoints, as the VT-d model does, to check the way
    /// back reaches the function under its current requester ID.
    #[derive(Default)]
    struct Registry(Mutex<Vec<(FunctionBinding, Arc<dyn DeviceEndpoint>)>>);

    impl DmaTranslator for Registry {
        fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError> {
            IdentityTranslator.translate(request)
        }
        fn register_endpoint(&self, binding: FunctionBinding, endpoint: Arc<dyn DeviceEndpoint>) {
            self.0.lock().unwrap().push((binding, endpoint));
        }
    }

    impl Registry {
        fn endpoint(&self, rid: RequesterId) -> Option<Arc<dyn DeviceEndpoint>> {
            let list = self.0.lock().unwrap();
            list.iter()
                .find(|(b, _)| b.requester_id() == rid)
                .map(|(_, e)| e.clone())
        }
    }

    /// An ATC of (pasid, page) entries that completes invalidations and records responses.
    #[derive(Default)]
    struct Atc {
        entries: Mutex<Vec<(Option<Pasid>, u64)>>,
        responses: Mutex<Vec<PageResponse>>,
    }

    impl DeviceEndpoint for Atc {
        fn invalidate_atc(&self, request: AtcInvalidation) {
            self.entries
                .lock()
                .unwrap()
                .retain(|&(pasid, page)| !request.covers(pasid, page, 0x1000));
            request.completion.complete();
        }
        fn page_response(&self, response: PageResponse) {
            self.responses.lock().unwrap().push(response);
        }
    }

    #[test]
    fn invalidations_and_page_responses_reach_the_function_with_completion() {
        let registry = Arc::new(Registry::default());
        let dma = DmaSpace::with_translator(RequesterId::new(1, 0, 0), memory(), registry.clone());
        let atc = Arc::new(Atc::default());
        dma.register_endpoint(atc.clone());
        let p1 = Pasid::new(1);
        let p2 = Pasid::new(2);
        *atc.entries.lock().unwrap() =
            vec![(p1, 0x1000), (p1, 0x20_0000), (p2, 0x1000), (None, 0x1000)];
        // Renumbered: the IOMMU finds it under the new ID only.
        dma.set_requester_id(RequesterId::new(3, 0, 0));
        assert!(registry.endpoint(RequesterId::new(1, 0, 0)).is_none());
        let endpoint = registry.endpoint(RequesterId::new(3, 0, 0)).unwrap();
        let completion = Completion::new();
        assert!(!completion.is_complete());
        endpoint.invalidate_atc(AtcInvalidation {
            pasid: p1,
            global: false,
            address: 0,
            size: 0x20_0000,
            completion: completion.clone(),
        });
        assert!(completion.wait(std::time::Duration::from_secs(1)));
        assert_eq!(
            *atc.entries.lock().unwrap(),
            vec![(p1, 0x20_0000), (p2, 0x1000), (None, 0x1000)]
        );
        endpoint.invalidate_atc(AtcInvalidation {
            pasid: None,
            global: true,
            address: 0,
            size: u64::MAX,
            completion: Completion::new(),
        });
        assert!(atc.entries.lock().unwrap().is_empty());
        let response = PageResponse {
            pasid: p2,
            group_index: 0x1ff,
            code: PageResponseCode::Success,
        };
        endpoint.page_response(response);
        assert_eq!(*atc.responses.lock().unwrap(), vec![response]);
        // A pending completion times out rather than hanging.
        assert!(!Completion::new().wait(std::time::Duration::from_millis(10)));
    }

    #[test]
    fn invalidation_ranges_cover_what_they_say() {
        let inv = AtcInvalidation {
            pasid: Pasid::new(4),
            global: false,
            address: 0x4000,
            size: 0x4000,
            completion: Completion::new(),
        };
        assert!(inv.covers(Pasid::new(4), 0x4000, 0x1000));
        assert!(inv.covers(Pasid::new(4), 0x7000, 0x1000));
        assert!(
            inv.covers(Pasid::new(4), 0x3000, 0x2000),
            "overlap from below"
        );
        assert!(!inv.covers(Pasid::new(4), 0x8000, 0x1000));
        assert!(!inv.covers(Pasid::new(5), 0x4000, 0x1000));
        assert!(!inv.covers(None, 0x4000, 0x1000));
        // No overflow at the top of the address space.
        assert!(!inv.covers(Pasid::new(4), u64::MAX, 0x1000));
    }
}
