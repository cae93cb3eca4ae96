//! Scalable-mode translation structures (VT-d 4.1 chapter 9: scalable-mode root entry 9.2,
//! context entry 9.4, PASID directory entry 9.5, PASID table entry 9.6) and the first-stage walk
//! (chapter 3.6, x86 4-level paging), read from guest memory.
//!
//! As in [`super::tables`], entries are parsed with `zerocopy`, every field is validated and a
//! failure is the architected scalable-mode fault reason (0x30 and up, VT-d Appendix A, the
//! codes Linux prints). The first-stage walk sets Accessed at each level and Dirty on the leaf
//! of a write with atomic updates, because the CPU shares those tables (SVA).

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileMemory};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::tables::{Context, Leaf, WalkRequest, read_entry, second_stage_walk};

/// Scalable-mode fault reasons (VT-d Appendix A).
pub mod reason {
    /// The root table address is invalid.
    pub const ROOT_TABLE_ADDRESS: u8 = 0x30;
    /// The root entry could not be read.
    pub const ROOT_ACCESS: u8 = 0x38;
    /// The root entry's present bit (for this half) is clear.
    pub const ROOT_NOT_PRESENT: u8 = 0x39;
    /// Reserved bits set in the root entry.
    pub const ROOT_RESERVED: u8 = 0x3a;
    /// The context entry could not be read.
    pub const CONTEXT_ACCESS: u8 = 0x40;
    /// The context entry's present bit is clear.
    pub const CONTEXT_NOT_PRESENT: u8 = 0x41;
    /// Reserved bits set in the context entry.
    pub const CONTEXT_RESERVED: u8 = 0x42;
    /// A translation request with DTE clear.
    pub const DTE_CLEAR: u8 = 0x44;
    /// A request with a PASID while PASID Enable is clear.
    pub const PASIDE_CLEAR: u8 = 0x45;
    /// The PASID is beyond the PASID directory's size.
    pub const PASID_TOO_LARGE: u8 = 0x46;
    /// The PASID directory entry could not be read.
    pub const DIRECTORY_ACCESS: u8 = 0x50;
    /// The PASID directory entry's present bit is clear.
    pub const DIRECTORY_NOT_PRESENT: u8 = 0x51;
    /// Reserved bits set in the PASID directory entry.
    pub const DIRECTORY_RESERVED: u8 = 0x52;
    /// The PASID table entry could not be read.
    pub const PASID_ACCESS: u8 = 0x58;
    /// The PASID table entry's present bit is clear.
    pub const PASID_NOT_PRESENT: u8 = 0x59;
    /// Reserved bits set in the PASID table entry.
    pub const PASID_RESERVED: u8 = 0x5a;
    /// An invalid PASID table entry (translation type, address width).
    pub const PASID_INVALID: u8 = 0x5b;
    /// A privileged request with SRE clear.
    pub const SRE_CLEAR: u8 = 0x5d;
    /// A first-stage entry could not be read.
    pub const FIRST_STAGE_ACCESS: u8 = 0x70;
    /// A first-stage entry's present bit is clear.
    pub const FIRST_STAGE_NOT_PRESENT: u8 = 0x71;
    /// Reserved bits set in a first-stage entry.
    pub const FIRST_STAGE_RESERVED: u8 = 0x72;
    /// A second-stage entry could not be read.
    pub const SECOND_STAGE_ACCESS: u8 = 0x78;
    /// Read/write permission error in a second-stage entry.
    pub const SECOND_STAGE_PERMISSION: u8 = 0x79;
    /// Reserved bits set in a second-stage entry.
    pub const SECOND_STAGE_RESERVED: u8 = 0x7a;
    /// The address is not canonical for first-stage translation.
    pub const NOT_CANONICAL: u8 = 0x80;
    /// A user request to a supervisor page (U/S clear).
    pub const USER_TO_SUPERVISOR: u8 = 0x81;
    /// An instruction fetch without execute permission.
    pub const NO_EXECUTE: u8 = 0x82;
    /// The address is beyond what the hardware translates.
    pub const BEYOND_MAX: u8 = 0x83;
    /// A write without write permission.
    pub const NO_WRITE: u8 = 0x85;
    /// A read without read permission.
    pub const NO_READ: u8 = 0x86;
}

/// A scalable-mode root entry (VT-d 9.2): context tables for devfn 0–127 (lower) and 128–255
/// (upper).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct ScalableRootEntry {
    /// LP (0), lower context-table pointer (63:12).
    pub lo: u64,
    /// UP (0), upper context-table pointer (63:12).
    pub hi: u64,
}

/// A scalable-mode context entry (VT-d 9.4), 256 bits.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct ScalableContextEntry {
    /// qw0: P (0), FPD (1), DTE (2), PASIDE (3), PRE (4), PDTS (11:9), PASID directory (63:12);
    /// qw1: RID_PASID (19:0), RID_PRIV (20); qw2, qw3 reserved.
    pub qw: [u64; 4],
}

/// A PASID table entry (VT-d 9.6), 512 bits.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct PasidEntry {
    /// qw0: P (0), FPD (1), AW (4:2), PGTT (8:6), SSADE (9), second-stage pointer (63:12);
    /// qw1: DID (15:0), PWSNP (23), PGSNP (24); qw2: SRE (0), FLPM (3:2), WPE (4), EAFE (7),
    /// first-stage pointer (63:12).
    pub qw: [u64; 8],
}

/// How a PASID table entry translates (PGTT, VT-d 9.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasidTranslation {
    /// First-stage (x86 paging) tables at this root.
    FirstStage {
        /// PML4 address.
        root: u64,
        /// Supervisor requests allowed (SRE).
        supervisor: bool,
        /// Write protect: supervisor writes honour R/W (WPE).
        write_protect: bool,
    },
    /// Second-stage tables.
    SecondStage(Context),
    /// Pass-through.
    PassThrough,
}

/// A request in scalable mode: the IOVA, write or read, the PASID (`None`: RID_PASID), user or
/// supervisor, instruction fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScalableRequest {
    /// The walk's address and direction.
    pub walk: WalkRequest,
    /// The PASID carried, if any.
    pub pasid: Option<u32>,
    /// A privileged (supervisor) request.
    pub privileged: bool,
    /// An instruction fetch.
    pub execute: bool,
}

/// Finds the PASID table entry for `source_id` and the request's PASID (or the context's
/// RID_PASID) from the scalable-mode root table at `root_table`; returns it with the PASID used.
pub fn lookup_pasid_entry<M: GuestMemoryBackend>(
    memory: &M,
    root_table: u64,
    source_id: u16,
    request: &ScalableRequest,
    address_width: u8,
) -> Result<(PasidEntry, u32), u8> {
    let context = lookup_context(memory, root_table, source_id, address_width)?;
    let pasid = context.pasid_for(request.pasid)?;
    let entry = lookup_pasid_in_context(memory, &context, pasid, address_width)?;
    Ok((entry, pasid))
}

/// Looks up the scalable-mode context entry of `source_id` (VT-d 9.2, 9.4): the root entry's
/// lower or upper half by devfn, then the 256-bit context entry; present and reserved bits
/// checked.
pub fn lookup_context<M: GuestMemoryBackend>(
    memory: &M,
    root_table: u64,
    source_id: u16,
    address_width: u8,
) -> Result<ScalableContextEntry, u8> {
    let bus = u64::from(source_id >> 8);
    let devfn = u64::from(source_id & 0xff);
    let root: ScalableRootEntry = read_entry(memory, root_table, bus * 16, reason::ROOT_ACCESS)?;
    let half = if devfn < 128 { root.lo } else { root.hi };
    if half & 1 == 0 {
        return Err(reason::ROOT_NOT_PRESENT);
    }
    if half & 0xffe != 0 || (half & !0xfff) >> address_width != 0 {
        return Err(reason::ROOT_RESERVED);
    }
    let context: ScalableContextEntry = read_entry(
        memory,
        half & !0xfff,
        (devfn & 0x7f) * 32,
        reason::CONTEXT_ACCESS,
    )?;
    let qw0 = context.qw[0];
    if qw0 & 1 == 0 {
        return Err(reason::CONTEXT_NOT_PRESENT);
    }
    if qw0 & 0x1e0 != 0 || context.qw[2] != 0 || context.qw[3] != 0 {
        return Err(reason::CONTEXT_RESERVED);
    }
    Ok(context)
}

impl ScalableContextEntry {
    /// PASID Enable: requests with a PASID are allowed.
    pub fn pasid_enabled(&self) -> bool {
        self.qw[0] & (1 << 3) != 0
    }

    /// Device-TLB Enable.
    pub fn device_tlb_enabled(&self) -> bool {
        self.qw[0] & (1 << 2) != 0
    }

    /// Page Request Enable: the device's page requests go to the page request queue.
    pub fn page_requests_enabled(&self) -> bool {
        self.qw[0] & (1 << 4) != 0
    }

    /// RID_PASID: the PASID of requests without one.
    pub fn rid_pasid(&self) -> u32 {
        (self.qw[1] & 0xf_ffff) as u32
    }

    /// Entries in the PASID directory: 2^(PDTS + 7).
    pub fn directory_entries(&self) -> u64 {
        1u64 << (((self.qw[0] >> 9) & 7) + 7)
    }

    /// The PASID a request uses: its own (PASIDE must be set) or RID_PASID.
    pub fn pasid_for(&self, requested: Option<u32>) -> Result<u32, u8> {
        match requested {
            Some(_) if !self.pasid_enabled() => Err(reason::PASIDE_CLEAR),
            Some(p) => Ok(p & 0xf_ffff),
            None => Ok(self.rid_pasid()),
        }
    }
}

/// Reads the PASID table entry of `pasid` through the PASID directory of a present, valid
/// scalable-mode `context` (VT-d 9.5, 9.6): the directory entry (one per 64 PASIDs), then the
/// 512-bit entry; present and reserved bits checked.
pub fn lookup_pasid_in_context<M: GuestMemoryBackend>(
    memory: &M,
    context: &ScalableContextEntry,
    pasid: u32,
    address_width: u8,
) -> Result<PasidEntry, u8> {
    let qw0 = context.qw[0];
    let dir_index = u64::from(pasid >> 6);
    if dir_index >= context.directory_entries() {
        return Err(reason::PASID_TOO_LARGE);
    }
    let dir: u64 = read_entry(
        memory,
        qw0 & !0xfff,
        dir_index * 8,
        reason::DIRECTORY_ACCESS,
    )?;
    if dir & 1 == 0 {
        return Err(reason::DIRECTORY_NOT_PRESENT);
    }
    if dir & 0xffc != 0 || (dir & !0xfff) >> address_width != 0 {
        return Err(reason::DIRECTORY_RESERVED);
    }
    let entry: PasidEntry = read_entry(
        memory,
        dir & !0xfff,
        u64::from(pasid & 0x3f) * 64,
        reason::PASID_ACCESS,
    )?;
    if entry.qw[0] & 1 == 0 {
        return Err(reason::PASID_NOT_PRESENT);
    }
    Ok(entry)
}

impl PasidEntry {
    /// Decodes a present entry for a unit with `supported_levels` (CAP.SAGAW) and host address
    /// width `address_width`.
    pub fn decode(&self, supported_levels: u8, address_width: u8) -> Result<PasidTranslation, u8> {
        let qw0 = self.qw[0];
        let qw2 = self.qw[2];
        if self.qw[3..].iter().any(|&q| q != 0) {
            return Err(reason::PASID_RESERVED);
        }
        let domain = (self.qw[1] & 0xffff) as u16;
        match (qw0 >> 6) & 7 {
            1 => {
                let root = qw2 & !0xfff;
                if (qw2 >> 2) & 3 != 0 {
                    return Err(reason::PASID_INVALID); // FLPM: 5-level not supported
                }
                if root >> address_width != 0 {
                    return Err(reason::PASID_RESERVED);
                }
                Ok(PasidTranslation::FirstStage {
                    root,
                    supervisor: qw2 & 1 != 0,
                    write_protect: qw2 & (1 << 4) != 0,
                })
            }
            2 => {
                let levels = match (qw0 >> 2) & 7 {
                    1 => 3,
                    2 => 4,
                    _ => return Err(reason::PASID_INVALID),
                };
                if supported_levels & (1 << (levels - 2)) == 0 {
                    return Err(reason::PASID_INVALID);
                }
                let table = qw0 & !0xfff;
                if table >> address_width != 0 {
                    return Err(reason::PASID_RESERVED);
                }
                Ok(PasidTranslation::SecondStage(Context {
                    fault_processing_disabled: qw0 & 2 != 0,
                    translation_type: super::tables::TranslationType::Untranslated,
                    second_stage_table: table,
                    levels,
                    domain,
                }))
            }
            4 => Ok(PasidTranslation::PassThrough),
            _ => Err(reason::PASID_INVALID),
        }
    }
}

/// Walks first-stage (x86 4-level) tables from `root` for `request` (VT-d 3.6.1): canonical
/// 48-bit addresses; present, U/S (user requests need it at every level), R/W (writes need it
/// unless a supervisor write with `write_protect` clear), XD (instruction fetches); 2 MiB and
/// 1 GiB pages; Accessed set on every entry used and Dirty on the leaf of a write, atomically.
pub fn first_stage_walk<M: GuestMemoryBackend>(
    memory: &M,
    root: u64,
    request: &ScalableRequest,
    supervisor_allowed: bool,
    write_protect: bool,
    address_width: u8,
) -> Result<Leaf, u8> {
    first_stage_walk_detailed(
        memory,
        root,
        request,
        supervisor_allowed,
        write_protect,
        address_width,
    )
    .map(|leaf| leaf.leaf)
}

/// What a successful first-stage walk found, beyond the [`Leaf`] it grants this request: the
/// permissions ANDed over the levels and whether the leaf is now Dirty — what an IOTLB entry
/// needs to decide later requests without walking (VT-d 6.2.1: a cached first-stage
/// translation whose leaf is not Dirty must not complete a write without setting D).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirstStageLeaf {
    /// The page and what this request may do with it.
    pub leaf: Leaf,
    /// R/W set at every level.
    pub writable: bool,
    /// U/S set at every level (user requests allowed).
    pub user: bool,
    /// XD clear at every level.
    pub executable: bool,
    /// The leaf's Dirty bit is set (by this walk or before).
    pub dirty: bool,
}

/// [`first_stage_walk`], returning the leaf's details too.
pub fn first_stage_walk_detailed<M: GuestMemoryBackend>(
    memory: &M,
    root: u64,
    request: &ScalableRequest,
    supervisor_allowed: bool,
    write_protect: bool,
    address_width: u8,
) -> Result<FirstStageLeaf, u8> {
    let address = request.walk.address;
    let sign = (address >> 47) & 1;
    let top = address >> 48;
    if (sign == 0 && top != 0) || (sign == 1 && top != 0xffff) {
        return Err(reason::NOT_CANONICAL);
    }
    if request.privileged && !supervisor_allowed {
        return Err(reason::SRE_CLEAR);
    }
    let user = !request.privileged;
    let mut table = root;
    let (mut writable, mut user_ok, mut executable) = (true, true, true);
    for level in (1..=4u32).rev() {
        let shift = 12 + 9 * (level - 1);
        let slot = table
            .checked_add(((address >> shift) & 0x1ff) * 8)
            .ok_or(reason::FIRST_STAGE_ACCESS)?;
        // The entry as an atomic in guest memory (aligned: entries are 8-byte slots).
        let slice = memory
            .get_slice(GuestAddress(slot), 8)
            .map_err(|_| reason::FIRST_STAGE_ACCESS)?;
        let atomic = slice
            .get_atomic_ref::<AtomicU64>(0)
            .map_err(|_| reason::FIRST_STAGE_ACCESS)?;
        // Validate the entry, then set Accessed (and Dirty on a write to the leaf) with a
        // compare-exchange on exactly the value validated: the CPU shares these tables, and if
        // it changed the entry in between (cleared Present, remapped the frame, cleared A/D)
        // the walk looks at the new value again instead of marking an entry it never checked.
        // No bit the CPU set is ever lost: the update is one atomic operation.
        let mut entry = atomic.load(Ordering::Acquire);
        let (frame, leaf, after, level_rights) = loop {
            if entry & 1 == 0 {
                return Err(reason::FIRST_STAGE_NOT_PRESENT);
            }
            let leaf = level == 1 || (entry & (1 << 7) != 0 && level <= 3);
            let frame = entry & 0x000f_ffff_ffff_f000;
            if frame >> address_width != 0 || (level == 4 && entry & (1 << 7) != 0) {
                return Err(reason::FIRST_STAGE_RESERVED);
            }
            let w = writable && entry & 2 != 0;
            let u = user_ok && entry & 4 != 0;
            let x = executable && entry & (1 << 63) == 0;
            let mut set = 1 << 5; // Accessed
            if leaf && request.walk.write {
                set |= 1 << 6; // Dirty
            }
            if leaf {
                let page_size = 1u64 << shift;
                if frame & (page_size - 1) != 0 {
                    return Err(reason::FIRST_STAGE_RESERVED);
                }
                if user && !u {
                    return Err(reason::USER_TO_SUPERVISOR);
                }
                if request.execute && !x {
                    return Err(reason::NO_EXECUTE);
                }
                let may_write = w || (request.privileged && !write_protect);
                if request.walk.write && !may_write {
                    return Err(reason::NO_WRITE);
                }
            }
            if entry & set == set {
                break (frame, leaf, entry, (w, u, x));
            }
            match atomic.compare_exchange_weak(
                entry,
                entry | set,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break (frame, leaf, entry | set, (w, u, x)),
                Err(now) => entry = now,
            }
        };
        (writable, user_ok, executable) = level_rights;
        if leaf {
            return Ok(FirstStageLeaf {
                leaf: Leaf {
                    page: frame,
                    page_size: 1u64 << shift,
                    read: true,
                    write: writable || (request.privileged && !write_protect),
                },
                writable,
                user: user_ok,
                executable,
                dirty: after & (1 << 6) != 0,
            });
        }
        table = frame;
    }
    Err(reason::FIRST_STAGE_NOT_PRESENT) // unreachable: level 1 is a leaf
}

/// Translates a scalable-mode request end to end: root → context → PASID directory → PASID
/// entry → first-stage, second-stage or pass-through. Second-stage fault reasons are mapped to
/// their scalable-mode codes.
pub fn translate<M: GuestMemoryBackend>(
    memory: &M,
    root_table: u64,
    source_id: u16,
    request: &ScalableRequest,
    supported_levels: u8,
    address_width: u8,
    large_pages: u8,
) -> Result<Leaf, u8> {
    let (entry, _) = lookup_pasid_entry(memory, root_table, source_id, request, address_width)?;
    match entry.decode(supported_levels, address_width)? {
        PasidTranslation::PassThrough => Ok(Leaf {
            page: request.walk.address & !0xfff,
            page_size: 4096,
            read: true,
            write: true,
        }),
        PasidTranslation::FirstStage {
            root,
            supervisor,
            write_protect,
        } => first_stage_walk(
            memory,
            root,
            request,
            supervisor,
            write_protect,
            address_width,
        ),
        PasidTranslation::SecondStage(context) => {
            second_stage_walk(memory, &context, request.walk, address_width, large_pages)
                .map_err(second_stage_reason)
        }
    }
}

/// The scalable-mode fault reason for a second-stage walk's legacy-mode one.
pub fn second_stage_reason(legacy: u8) -> u8 {
    match legacy {
        super::tables::reason::BEYOND_MGAW => reason::BEYOND_MAX,
        super::tables::reason::NO_WRITE => reason::NO_WRITE,
        super::tables::reason::NO_READ => reason::NO_READ,
        super::tables::reason::BAD_TABLE_POINTER => reason::SECOND_STAGE_ACCESS,
        _ => reason::SECOND_STAGE_RESERVED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const ROOT: u64 = 0x1000;
    const CTX: u64 = 0x2000;
    const DIR: u64 = 0x3000;
    const PTAB: u64 = 0x4000;
    const PML4: u64 = 0x5000;
    const PDPT: u64 = 0x6000;
    const PD: u64 = 0x7000;
    const PT: u64 = 0x8000;
    const IOVA: u64 = 0x1234_5000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn put(m: &GuestMemoryMmap, gpa: u64, value: u64) {
        m.write_obj(value, GuestAddress(gpa)).unwrap();
    }

    fn get(m: &GuestMemoryMmap, gpa: u64) -> u64 {
        m.read_obj(GuestAddress(gpa)).unwrap()
    }

    fn index(iova: u64, level: u32) -> u64 {
        (iova >> (12 + 9 * (level - 1))) & 0x1ff
    }

    /// Linux's layout for a DMA domain in scalable mode: device 00:03.0, RID_PASID 0, PASID
    /// entry with first-stage tables (US set: requests without PASID are user requests) mapping
    /// IOVA → 0x30_0000 read/write, and PASID 5 for a read-only page.
    fn setup(m: &GuestMemoryMmap) -> u16 {
        let sid = 3 << 3;
        put(m, ROOT, CTX | 1);
        put(m, CTX + u64::from(sid) * 32, DIR | 1 | (1 << 3)); // P, PASIDE, PDTS 0
        put(m, CTX + u64::from(sid) * 32 + 8, 0); // RID_PASID 0
        put(m, DIR, PTAB | 1);
        put(m, PTAB, 1 | (1 << 6)); // P, PGTT first-stage
        put(m, PTAB + 8, 1); // DID 1
        put(m, PTAB + 16, PML4); // first-stage root
        let (us, rw, p) = (4, 2, 1);
        put(m, PML4 + index(IOVA, 4) * 8, PDPT | us | rw | p);
        put(m, PDPT + index(IOVA, 3) * 8, PD | us | rw | p);
        put(m, PD + index(IOVA, 2) * 8, PT | us | rw | p);
        put(m, PT + index(IOVA, 1) * 8, 0x30_0000 | us | rw | p);
        put(m, PT + index(IOVA + 0x1000, 1) * 8, 0x30_1000 | us | p);
        // PASID 5: same table page, entry 5, sharing the first-stage tables.
        put(m, PTAB + 5 * 64, 1 | (1 << 6));
        put(m, PTAB + 5 * 64 + 16, PML4 | 1); // SRE
        sid
    }

    fn request(address: u64, write: bool, pasid: Option<u32>) -> ScalableRequest {
        ScalableRequest {
            walk: WalkRequest { address, write },
            pasid,
            privileged: false,
            execute: false,
        }
    }

    fn go(m: &GuestMemoryMmap, sid: u16, r: ScalableRequest) -> Result<Leaf, u8> {
        translate(m, ROOT, sid, &r, 0b0110, 48, 0b01)
    }

    #[test]
    fn first_stage_translation_sets_accessed_and_dirty() {
        let m = memory();
        let sid = setup(&m);
        let leaf = go(&m, sid, request(IOVA + 0x123, true, None)).unwrap();
        assert_eq!(
            (leaf.page, leaf.page_size, leaf.write),
            (0x30_0000, 4096, true)
        );
        let pte = get(&m, PT + index(IOVA, 1) * 8);
        assert_ne!(pte & (1 << 5), 0, "A");
        assert_ne!(pte & (1 << 6), 0, "D");
        assert_ne!(
            get(&m, PML4 + index(IOVA, 4) * 8) & (1 << 5),
            0,
            "A on the PML4E"
        );
        // Read-only page: a read works (no D), a write faults.
        let ro = PT + index(IOVA + 0x1000, 1) * 8;
        assert!(go(&m, sid, request(IOVA + 0x1000, false, None)).is_ok());
        assert_eq!(get(&m, ro) & (1 << 6), 0);
        assert_eq!(
            go(&m, sid, request(IOVA + 0x1000, true, None)),
            Err(reason::NO_WRITE)
        );
        // With PASID 5 (same tables).
        assert_eq!(
            go(&m, sid, request(IOVA, false, Some(5))).unwrap().page,
            0x30_0000
        );
    }

    /// The CPU and the device update the same leaf at once (issue 9 acceptance 7): the CPU sets
    /// software-available bits and clears Accessed and Dirty (as reclaim and writeback do) while
    /// the device writes through the page. Every device write sees the page Dirty (it set D on
    /// the entry it validated), no bit the CPU set is lost, and the entry's frame and rights
    /// are untouched.
    #[test]
    fn accessed_and_dirty_updates_race_the_cpu_without_losing_bits() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let m = memory();
        let _ = setup(&m);
        let pte = PT + index(IOVA, 1) * 8;
        let cpu_memory = m.clone();
        let cpu = std::thread::spawn(move || {
            let slice = cpu_memory.get_slice(GuestAddress(pte), 8).unwrap();
            let entry = slice.get_atomic_ref::<AtomicU64>(0).unwrap();
            for i in 0..20_000u64 {
                entry.fetch_or(1 << (52 + i % 7), Ordering::AcqRel);
                entry.fetch_and(!((1 << 5) | (1 << 6)), Ordering::AcqRel);
            }
        });
        for _ in 0..20_000 {
            let walk = first_stage_walk_detailed(
                &m,
                PML4,
                &request(IOVA + 8, true, None),
                false,
                false,
                48,
            )
            .unwrap();
            assert_eq!(walk.leaf.page, 0x30_0000);
            assert!(walk.dirty && walk.leaf.write);
        }
        cpu.join().unwrap();
        first_stage_walk_detailed(&m, PML4, &request(IOVA, true, None), false, false, 48).unwrap();
        let now = get(&m, pte);
        assert_eq!(now >> 52 & 0x7f, 0x7f, "every CPU-set bit kept: {now:#x}");
        assert_eq!(
            now & 0x000f_ffff_ffff_f007,
            0x30_0007,
            "frame, U/S, R/W, P: {now:#x}"
        );
        assert_ne!(now & (1 << 6), 0, "Dirty after the device's last write");
    }

    #[test]
    fn scalable_faults_have_their_codes() {
        let m = memory();
        let sid = setup(&m);
        assert_eq!(
            go(&m, sid, request(IOVA + 0x2000, false, None)),
            Err(reason::FIRST_STAGE_NOT_PRESENT)
        );
        assert_eq!(
            go(&m, sid, request(1 << 47, false, None)),
            Err(reason::NOT_CANONICAL)
        );
        assert_eq!(
            go(&m, sid, request(IOVA, false, Some(7))),
            Err(reason::PASID_NOT_PRESENT)
        );
        assert_eq!(
            go(&m, sid, request(IOVA, false, Some(64))),
            Err(reason::DIRECTORY_NOT_PRESENT)
        );
        assert_eq!(
            go(&m, sid, request(IOVA, false, Some(0x8_0000))),
            Err(reason::PASID_TOO_LARGE)
        );
        assert_eq!(
            go(&m, sid + 8, request(IOVA, false, None)),
            Err(reason::CONTEXT_NOT_PRESENT)
        );
        assert_eq!(
            go(&m, sid | 0x80, request(IOVA, false, None)),
            Err(reason::ROOT_NOT_PRESENT),
            "upper half"
        );
        // Supervisor request where SRE is clear (RID_PASID entry).
        let mut privileged = request(IOVA, false, None);
        privileged.privileged = true;
        assert_eq!(go(&m, sid, privileged), Err(reason::SRE_CLEAR));
        // A supervisor page (U/S clear) for a user request.
        put(&m, PT + index(IOVA, 1) * 8, 0x30_0000 | 3);
        assert_eq!(
            go(&m, sid, request(IOVA, false, None)),
            Err(reason::USER_TO_SUPERVISOR)
        );
        // Context without PASIDE: requests with PASID fault.
        put(&m, CTX + u64::from(sid) * 32, DIR | 1);
        assert_eq!(
            go(&m, sid, request(IOVA, false, Some(5))),
            Err(reason::PASIDE_CLEAR)
        );
        // A PASID directory at the top of the address space (PDTS 7, a high PASID): faults,
        // never wraps.
        let ctx_entry = CTX + u64::from(sid) * 32;
        let saved = get(&m, ctx_entry);
        put(
            &m,
            ctx_entry,
            0xffff_ffff_ffff_f000 | 1 | (1 << 3) | (7 << 9),
        );
        assert_eq!(
            go(&m, sid, request(IOVA, false, Some(0xf_ffc0))),
            Err(reason::DIRECTORY_ACCESS)
        );
        put(&m, ctx_entry, saved);
        // Invalid PGTT.
        put(&m, PTAB, 1 | (7 << 6));
        assert_eq!(
            go(&m, sid, request(IOVA, false, None)),
            Err(reason::PASID_INVALID)
        );
        // Pass-through.
        put(&m, PTAB, 1 | (4 << 6));
        assert_eq!(
            go(&m, sid, request(IOVA + 7, true, None)).unwrap().page,
            IOVA
        );
    }

    #[test]
    fn second_stage_through_a_pasid_entry() {
        let m = memory();
        let sid = setup(&m);
        // PGTT 2, AW 48-bit (2), second-stage root: build 4 levels with the legacy format.
        let (l4, l3, l2, l1) = (0x9000, 0xa000, 0xb000, 0xc000);
        put(&m, PTAB, 1 | (2 << 6) | (2 << 2) | l4);
        put(&m, l4 + index(IOVA, 4) * 8, l3 | 3);
        put(&m, l3 + index(IOVA, 3) * 8, l2 | 3);
        put(&m, l2 + index(IOVA, 2) * 8, l1 | 3);
        put(&m, l1 + index(IOVA, 1) * 8, 0x31_0000 | 1);
        assert_eq!(
            go(&m, sid, request(IOVA, false, None)).unwrap().page,
            0x31_0000
        );
        assert_eq!(
            go(&m, sid, request(IOVA, true, None)),
            Err(reason::NO_WRITE)
        );
        assert_eq!(
            go(&m, sid, request(1 << 50, false, None)),
            Err(reason::BEYOND_MAX)
        );
    }

    #[test]
    fn random_structures_never_panic() {
        let m = memory();
        let mut x = 0xfeed_f00d_dead_beefu64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..100 {
            for page in 1..16u64 {
                for i in 0..512u64 {
                    let r = next();
                    let v = if r % 3 == 0 {
                        ((r >> 8) % 16) << 12 | (r & 0x1ff)
                    } else {
                        r
                    };
                    put(&m, page * 0x1000 + i * 8, v);
                }
            }
            for _ in 0..50 {
                let r = ScalableRequest {
                    walk: WalkRequest {
                        address: next() >> (next() % 20),
                        write: next() & 1 == 0,
                    },
                    pasid: (next() & 1 == 0).then(|| (next() & 0xf_ffff) as u32),
                    privileged: next() & 3 == 0,
                    execute: next() & 7 == 0,
                };
                if let Ok(leaf) = translate(&m, ROOT, next() as u16, &r, 0b0110, 48, 0b11) {
                    assert_eq!(leaf.page % leaf.page_size, 0);
                }
            }
        }
    }
}
