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
/// `[gpa, gpa + len)`.
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
}

/// Translates device addresses to guest-physical addresses. Implemented by
/// [`IdentityTranslator`] today and by the VT-d model later.
pub trait DmaTranslator: Send + Sync {
    /// Translates the first bytes of `request`. Must return a [`Translation`] with `len >= 1`
    /// or an error.
    fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError>;

    /// Queues a PRI page request. The response travels back asynchronously (the future VT-d model
    /// will hand it to the device through a per-device callback).
    fn page_request(&self, _request: &PageRequest) -> Result<(), DmaError> {
        Err(DmaError::PageRequestUnsupported)
    }
}

/// No IOMMU: every address is guest-physical, every access is permitted.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityTranslator;

impl DmaTranslator for IdentityTranslator {
    fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError> {
        Ok(Translation {
            gpa: request.address,
            len: request.len.max(1),
            read: true,
            write: true,
        })
    }
}

/// A device's view of guest memory, bound to its requester ID (and optional PASID).
///
/// Cheap to clone; clones share the guest memory map and the translator.
#[derive(Clone)]
pub struct DmaSpace {
    requester_id: RequesterId,
    pasid: Option<Pasid>,
    privileged: bool,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    translator: Arc<dyn DmaTranslator>,
}

impl std::fmt::Debug for DmaSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaSpace")
            .field("requester_id", &self.requester_id)
            .field("pasid", &self.pasid)
            .field("privileged", &self.privileged)
            .finish_non_exhaustive()
    }
}

impl DmaSpace {
    /// A DMA space with identity translation (no IOMMU).
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
            requester_id,
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
        self.requester_id
    }

    /// Re-binds to a new requester ID (the function captured a new bus number, PCIe Base Spec
    /// r6.0, 2.2.6.2).
    pub fn set_requester_id(&mut self, requester_id: RequesterId) {
        self.requester_id = requester_id;
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
        request.requester_id = self.requester_id;
        request.pasid = self.pasid;
        self.translator.page_request(&request)
    }

    fn request(&self, at: AddressType, address: u64, len: u64, access: DmaAccess) -> DmaRequest {
        DmaRequest {
            requester_id: self.requester_id,
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
                    requester_id: self.requester_id,
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

    #[test]
    fn identity_read_write_roundtrip() {
        let dma = DmaSpace::identity(RequesterId::new(1, 0, 0), memory());
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
        let dma = DmaSpace::identity(RequesterId::new(1, 0, 0), memory());
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
        let dma = DmaSpace::identity(RequesterId::new(0, 3, 0), mem.clone());
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
            Ok(Translation {
                gpa: request.address + 0x10_0000,
                len: 0x1000 - (request.address & 0xfff),
                read: true,
                write: page != 0x5000,
            })
        }
    }

    #[test]
    fn translated_accesses_are_split_per_page() {
        let translator = Arc::new(PagedTranslator {
            seen: Mutex::new(Vec::new()),
        });
        let pasid = Pasid::new(7);
        let dma =
            DmaSpace::with_translator(RequesterId::new(2, 0, 1), memory(), translator.clone())
                .with_pasid(pasid, false);
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
        let phys = DmaSpace::identity(RequesterId::new(0, 0, 0), dma.memory.clone());
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
        let dma = DmaSpace::identity(RequesterId::new(1, 0, 0), memory());
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
            Ok(Translation {
                gpa: request.address,
                len: 0,
                read: true,
                write: true,
            })
        }
    }

    #[test]
    fn empty_translation_is_an_error_not_a_hang() {
        let dma = DmaSpace::with_translator(RequesterId(0), memory(), Arc::new(EmptyTranslator));
        assert!(matches!(
            dma.read(0, &mut [0u8; 4]),
            Err(DmaError::EmptyTranslation { .. })
        ));
    }
}
