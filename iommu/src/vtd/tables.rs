//! Legacy-mode translation structures (VT-d 4.1 chapter 9: root entry 9.1, context entry 9.3,
//! second-stage paging entries 9.8) read from guest memory, and the walk from a requester ID
//! and an IOVA to a host (guest-physical) address (chapter 3.6, second-stage translation).
//!
//! Entries are parsed with `zerocopy` from the bytes the guest wrote; every reserved bit, table
//! pointer and address width is checked, and every failure is the architected fault reason
//! (VT-d Appendix A, the codes Linux prints with `dmar_fault`) — never a panic. Not-present
//! entries are never cached by the caller (Linux does not invalidate on not-present → present).
//!
//! Still to come: the scalable-mode root/context entries, PASID directory and tables, and the
//! first-stage walk.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Fault reasons for DMA remapping in legacy mode (VT-d Appendix A).
pub mod reason {
    /// The present bit of the root entry is clear.
    pub const ROOT_NOT_PRESENT: u8 = 0x01;
    /// The present bit of the context entry is clear.
    pub const CONTEXT_NOT_PRESENT: u8 = 0x02;
    /// The context entry is invalid (translation type or address width not supported).
    pub const INVALID_CONTEXT: u8 = 0x03;
    /// The address is beyond the guest address width.
    pub const BEYOND_MGAW: u8 = 0x04;
    /// A write to a page without write permission (or not present).
    pub const NO_WRITE: u8 = 0x05;
    /// A read from a page without read permission (or not present).
    pub const NO_READ: u8 = 0x06;
    /// A paging-structure pointer could not be read.
    pub const BAD_TABLE_POINTER: u8 = 0x07;
    /// The root table address could not be read.
    pub const BAD_ROOT_TABLE: u8 = 0x08;
    /// The context table pointer could not be read.
    pub const BAD_CONTEXT_TABLE: u8 = 0x09;
    /// Reserved bits set in a root entry.
    pub const ROOT_RESERVED: u8 = 0x0a;
    /// Reserved bits set in a context entry.
    pub const CONTEXT_RESERVED: u8 = 0x0b;
    /// Reserved bits set in a paging entry.
    pub const PTE_RESERVED: u8 = 0x0c;
    /// The translation type blocks this request (e.g. a translation request with TT = 00b).
    pub const BLOCKED: u8 = 0x0d;
}

/// A legacy-mode root entry (VT-d 9.1): one per bus.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct RootEntry {
    /// P (bit 0), context-table pointer (63:12); 11:1 reserved.
    pub lo: u64,
    /// Reserved.
    pub hi: u64,
}

impl RootEntry {
    /// Present.
    pub fn present(&self) -> bool {
        self.lo & 1 != 0
    }

    /// The context table's address.
    pub fn context_table(&self) -> u64 {
        self.lo & !0xfff
    }

    fn reserved_set(&self, address_width: u8) -> bool {
        self.lo & 0xffe != 0 || self.hi != 0 || self.context_table() >> address_width != 0
    }
}

/// How a context entry translates (TT, VT-d 9.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranslationType {
    /// 00b: untranslated requests through the second-stage tables; translation requests blocked.
    Untranslated,
    /// 01b: untranslated and translation requests (the device may have an ATC).
    WithDeviceTlb,
    /// 10b: untranslated requests pass through (IOVA = GPA); translation requests blocked.
    PassThrough,
}

/// A legacy-mode context entry (VT-d 9.3): one per device/function.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct ContextEntry {
    /// P (0), FPD (1), TT (3:2), second-stage table pointer (63:12); 11:4 reserved.
    pub lo: u64,
    /// AW (2:0), ignored (6:3), DID (23:8); 7 and 63:24 reserved.
    pub hi: u64,
}

/// What a present, valid context entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    /// Fault Processing Disable: faults are not recorded.
    pub fault_processing_disabled: bool,
    /// How requests are translated.
    pub translation_type: TranslationType,
    /// The second-stage page table root (ignored for pass-through).
    pub second_stage_table: u64,
    /// Levels of the second-stage tables: 3 (39-bit) or 4 (48-bit).
    pub levels: u8,
    /// Domain ID.
    pub domain: u16,
}

impl ContextEntry {
    /// Present.
    pub fn present(&self) -> bool {
        self.lo & 1 != 0
    }

    /// Fault Processing Disable (meaningful even when the entry is not valid otherwise).
    pub fn fault_processing_disabled(&self) -> bool {
        self.lo & 2 != 0
    }

    /// Decodes a present entry for a unit with `supported_levels` (CAP.SAGAW: bit 1 3-level,
    /// bit 2 4-level tables) and host addresses of `address_width` bits.
    pub fn decode(&self, supported_levels: u8, address_width: u8) -> Result<Context, u8> {
        if self.lo & 0xff0 != 0 || self.hi & !0x00ff_ff7f != 0 {
            return Err(reason::CONTEXT_RESERVED);
        }
        let translation_type = match (self.lo >> 2) & 3 {
            0 => TranslationType::Untranslated,
            1 => TranslationType::WithDeviceTlb,
            2 => TranslationType::PassThrough,
            _ => return Err(reason::INVALID_CONTEXT),
        };
        let second_stage_table = self.lo & !0xfff;
        let levels = match self.hi & 7 {
            1 => 3,
            2 => 4,
            _ if translation_type == TranslationType::PassThrough => 4,
            _ => return Err(reason::INVALID_CONTEXT),
        };
        if translation_type != TranslationType::PassThrough {
            if supported_levels & (1 << (levels - 2)) == 0 {
                return Err(reason::INVALID_CONTEXT);
            }
            if second_stage_table >> address_width != 0 {
                return Err(reason::CONTEXT_RESERVED);
            }
        }
        Ok(Context {
            fault_processing_disabled: self.fault_processing_disabled(),
            translation_type,
            second_stage_table,
            levels,
            domain: ((self.hi >> 8) & 0xffff) as u16,
        })
    }
}

/// A second-stage paging entry (VT-d 9.8): R (0), W (1), X (2), EMT (5:3), IPAT (6), PS (7),
/// A (8), D (9), SNP (11), address (51:12).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct SecondStageEntry(pub u64);

impl SecondStageEntry {
    /// Read permission.
    pub fn read(self) -> bool {
        self.0 & 1 != 0
    }
    /// Write permission.
    pub fn write(self) -> bool {
        self.0 & 2 != 0
    }
    /// Maps a page (PS) rather than pointing to the next table.
    pub fn page_size(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// The address (next table or page frame).
    pub fn address(self) -> u64 {
        self.0 & 0x000f_ffff_ffff_f000
    }
}

/// A request being translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkRequest {
    /// The IOVA.
    pub address: u64,
    /// A write (else a read).
    pub write: bool,
}

/// The result of a second-stage walk: the page that maps the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Guest-physical address of the page (aligned to `page_size`).
    pub page: u64,
    /// Page size: 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
    /// Read permitted at every level.
    pub read: bool,
    /// Write permitted at every level.
    pub write: bool,
}

/// Reads an entry of type `T` at `base + offset`, or `fault` if that address wraps the address
/// space (a guest-programmed pointer near the top) or guest memory does not back it.
pub(super) fn read_entry<T: FromBytes + IntoBytes + Default, M: GuestMemoryBackend>(
    memory: &M,
    base: u64,
    offset: u64,
    fault: u8,
) -> Result<T, u8> {
    let gpa = base.checked_add(offset).ok_or(fault)?;
    let mut entry = T::default();
    memory
        .read_slice(entry.as_mut_bytes(), GuestAddress(gpa))
        .map_err(|_| fault)?;
    Ok(entry)
}

/// Looks up the context entry of `source_id` (bus 15:8, devfn 7:0) from the root table at
/// `root_table`: the root entry of the bus, then the context entry of the devfn.
pub fn lookup_context<M: GuestMemoryBackend>(
    memory: &M,
    root_table: u64,
    source_id: u16,
    address_width: u8,
) -> Result<ContextEntry, u8> {
    let bus = u64::from(source_id >> 8);
    let devfn = u64::from(source_id & 0xff);
    let root: RootEntry = read_entry(memory, root_table, bus * 16, reason::BAD_ROOT_TABLE)?;
    if !root.present() {
        return Err(reason::ROOT_NOT_PRESENT);
    }
    if root.reserved_set(address_width) {
        return Err(reason::ROOT_RESERVED);
    }
    let context: ContextEntry = read_entry(
        memory,
        root.context_table(),
        devfn * 16,
        reason::BAD_CONTEXT_TABLE,
    )?;
    if !context.present() {
        return Err(reason::CONTEXT_NOT_PRESENT);
    }
    Ok(context)
}

/// Walks the second-stage tables of `context` for `request` (VT-d 3.6): 9 address bits per
/// level from bit 12; a PS entry at level 2 maps 2 MiB, at level 3 1 GiB (when
/// `large_pages` allows: bit 0 2 MiB, bit 1 1 GiB, from CAP.SLLPS). Permissions are the AND of
/// every level's. A not-present or forbidding entry faults with the access's reason.
pub fn second_stage_walk<M: GuestMemoryBackend>(
    memory: &M,
    context: &Context,
    request: WalkRequest,
    address_width: u8,
    large_pages: u8,
) -> Result<Leaf, u8> {
    let guest_width = 12 + 9 * u32::from(context.levels);
    let limit_width = guest_width.min(u32::from(address_width));
    if request.address.checked_shr(limit_width).unwrap_or(0) != 0 {
        return Err(reason::BEYOND_MGAW);
    }
    let denied = if request.write {
        reason::NO_WRITE
    } else {
        reason::NO_READ
    };
    let mut table = context.second_stage_table;
    let (mut read, mut write) = (true, true);
    for level in (1..=context.levels).rev() {
        let shift = 12 + 9 * (u32::from(level) - 1);
        let index = (request.address >> shift) & 0x1ff;
        let entry: SecondStageEntry =
            read_entry(memory, table, index * 8, reason::BAD_TABLE_POINTER)?;
        if !entry.read() && !entry.write() {
            return Err(denied); // not present
        }
        // Reserved: 63 (SNP-related on some), 62:52 except TM(62) ignored here; address bits
        // past the host width; bits 6:3 on non-leaf entries.
        let leaf = level == 1 || entry.page_size();
        if entry.address() >> address_width != 0 || entry.0 & (1 << 10) != 0 {
            return Err(reason::PTE_RESERVED);
        }
        if !leaf && entry.0 & 0x78 != 0 {
            return Err(reason::PTE_RESERVED);
        }
        read &= entry.read();
        write &= entry.write();
        if leaf {
            let allowed = match level {
                1 => true,
                2 => large_pages & 1 != 0,
                3 => large_pages & 2 != 0,
                _ => false,
            };
            if !allowed {
                return Err(reason::PTE_RESERVED);
            }
            let page_size = 1u64 << shift;
            if entry.address() & (page_size - 1) != 0 {
                return Err(reason::PTE_RESERVED);
            }
            if (request.write && !write) || (!request.write && !read) {
                return Err(denied);
            }
            return Ok(Leaf {
                page: entry.address(),
                page_size,
                read,
                write,
            });
        }
        table = entry.address();
    }
    Err(denied) // unreachable with levels >= 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const ROOT: u64 = 0x1000;
    const CTX: u64 = 0x2000;
    const L4: u64 = 0x3000;
    const L3: u64 = 0x4000;
    const L2: u64 = 0x5000;
    const L1: u64 = 0x6000;
    /// An IOVA mapped by a 2 MiB page.
    const BIG: u64 = 0x4000_0000;

    /// The table index of `iova` at `level`.
    fn index(iova: u64, level: u32) -> u64 {
        (iova >> (12 + 9 * (level - 1))) & 0x1ff
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn put(m: &GuestMemoryMmap, gpa: u64, value: u64) {
        m.write_obj(value, GuestAddress(gpa)).unwrap();
    }

    /// Device 01:02.3 with a 4-level table mapping IOVA 0x1234_5000 → 0x20_0000 (R/W), IOVA
    /// 0x1234_6000 → 0x20_1000 (read-only), and a 2 MiB page at IOVA 0x4000_0000.
    fn setup(m: &GuestMemoryMmap) -> u16 {
        let sid = (1u16 << 8) | (2 << 3) | 3;
        put(m, ROOT + 16, CTX | 1);
        let devfn = u64::from(sid & 0xff);
        put(m, CTX + devfn * 16, L4 | 1); // P, TT 00
        put(m, CTX + devfn * 16 + 8, 2 | (7 << 8)); // AW 48-bit, DID 7
        let iova = 0x1234_5000u64;
        put(m, L4 + ((iova >> 39) & 0x1ff) * 8, L3 | 3);
        put(m, L3 + ((iova >> 30) & 0x1ff) * 8, L2 | 3);
        put(m, L2 + ((iova >> 21) & 0x1ff) * 8, L1 | 3);
        put(m, L1 + ((iova >> 12) & 0x1ff) * 8, 0x20_0000 | 3);
        put(m, L1 + (((iova + 0x1000) >> 12) & 0x1ff) * 8, 0x20_1000 | 1);
        put(m, L2 + index(BIG, 2) * 8, 0x20_0000 | 3 | (1 << 7));
        put(m, L3 + index(BIG, 3) * 8, L2 | 3);
        sid
    }

    fn walk(m: &GuestMemoryMmap, sid: u16, iova: u64, write: bool) -> Result<Leaf, u8> {
        let ctx = lookup_context(m, ROOT, sid, 48)?.decode(0b0110, 48)?;
        second_stage_walk(
            m,
            &ctx,
            WalkRequest {
                address: iova,
                write,
            },
            48,
            0b01,
        )
    }

    #[test]
    fn a_mapped_page_translates_with_its_permissions() {
        let m = memory();
        let sid = setup(&m);
        let ctx = lookup_context(&m, ROOT, sid, 48)
            .unwrap()
            .decode(0b0110, 48)
            .unwrap();
        assert_eq!(ctx.domain, 7);
        assert_eq!(ctx.levels, 4);
        assert_eq!(ctx.translation_type, TranslationType::Untranslated);
        let leaf = walk(&m, sid, 0x1234_5678, true).unwrap();
        assert_eq!(
            (leaf.page, leaf.page_size, leaf.read, leaf.write),
            (0x20_0000, 4096, true, true)
        );
        // Read-only page: reads work, writes fault with reason 5.
        assert!(walk(&m, sid, 0x1234_6000, false).unwrap().read);
        assert_eq!(walk(&m, sid, 0x1234_6000, true), Err(reason::NO_WRITE));
        // 2 MiB page.
        let big = walk(&m, sid, 0x4001_2345, false).unwrap();
        assert_eq!((big.page, big.page_size), (0x20_0000, 2 << 20));
    }

    #[test]
    fn each_missing_or_bad_structure_has_its_fault_reason() {
        let m = memory();
        let sid = setup(&m);
        // Unmapped IOVA (L1 entry empty): read fault 6.
        assert_eq!(walk(&m, sid, 0x1234_7000, false), Err(reason::NO_READ));
        // Another function on the same bus: context not present.
        assert_eq!(
            walk(&m, sid + 1, 0x1234_5000, false),
            Err(reason::CONTEXT_NOT_PRESENT)
        );
        // Another bus: root not present.
        assert_eq!(
            walk(&m, sid + 0x100, 0, false),
            Err(reason::ROOT_NOT_PRESENT)
        );
        // Beyond the 48-bit width.
        assert_eq!(walk(&m, sid, 1 << 48, false), Err(reason::BEYOND_MGAW));
        // Root table outside guest memory.
        assert_eq!(
            lookup_context(&m, 0x1_0000_0000, sid, 48),
            Err(reason::BAD_ROOT_TABLE)
        );
        // Reserved bits in the root entry.
        put(&m, ROOT + 16, CTX | 1 | 0x10);
        assert_eq!(
            walk(&m, sid, 0x1234_5000, false),
            Err(reason::ROOT_RESERVED)
        );
        put(&m, ROOT + 16, CTX | 1);
        // Context entry: reserved bits, TT 11b, unsupported width.
        let entry = CTX + u64::from(sid & 0xff) * 16;
        put(&m, entry, L4 | 1 | 0x100);
        assert_eq!(
            walk(&m, sid, 0x1234_5000, false),
            Err(reason::CONTEXT_RESERVED)
        );
        put(&m, entry, L4 | 1 | (3 << 2));
        assert_eq!(
            walk(&m, sid, 0x1234_5000, false),
            Err(reason::INVALID_CONTEXT)
        );
        put(&m, entry, L4 | 1);
        put(&m, entry + 8, 3 | (7 << 8)); // 5-level: not supported
        assert_eq!(
            walk(&m, sid, 0x1234_5000, false),
            Err(reason::INVALID_CONTEXT)
        );
        put(&m, entry + 8, 2 | (7 << 8));
        // A table pointer past guest memory.
        let iova = 0x1234_5000u64;
        put(&m, L2 + ((iova >> 21) & 0x1ff) * 8, 0x7f_0000_0000 | 3);
        assert_eq!(walk(&m, sid, iova, false), Err(reason::BAD_TABLE_POINTER));
        // A 1 GiB page where the unit supports only 2 MiB: reserved.
        put(&m, L3 + ((iova >> 30) & 0x1ff) * 8, 3 | (1 << 7));
        assert_eq!(walk(&m, sid, iova, false), Err(reason::PTE_RESERVED));
        // A misaligned 2 MiB page.
        put(&m, L3 + ((iova >> 30) & 0x1ff) * 8, L2 | 3);
        put(
            &m,
            L2 + ((iova >> 21) & 0x1ff) * 8,
            0x20_1000 | 3 | (1 << 7),
        );
        assert_eq!(walk(&m, sid, iova, false), Err(reason::PTE_RESERVED));
    }

    #[test]
    fn pass_through_and_three_levels() {
        let m = memory();
        let sid = setup(&m);
        let entry = CTX + u64::from(sid & 0xff) * 16;
        put(&m, entry, 1 | (2 << 2)); // pass-through
        put(&m, entry + 8, 1 << 8);
        let ctx = lookup_context(&m, ROOT, sid, 48)
            .unwrap()
            .decode(0b0110, 48)
            .unwrap();
        assert_eq!(ctx.translation_type, TranslationType::PassThrough);
        // 3-level tables: 39-bit addresses.
        put(&m, entry, L3 | 1);
        put(&m, entry + 8, 1 | (3 << 8));
        let ctx = lookup_context(&m, ROOT, sid, 48)
            .unwrap()
            .decode(0b0110, 48)
            .unwrap();
        assert_eq!(ctx.levels, 3);
        let req = |address| WalkRequest {
            address,
            write: false,
        };
        assert_eq!(
            second_stage_walk(&m, &ctx, req(1 << 39), 48, 1),
            Err(reason::BEYOND_MGAW)
        );
        assert_eq!(
            second_stage_walk(&m, &ctx, req(0x1234_5000), 48, 1)
                .unwrap()
                .page,
            0x20_0000
        );
    }

    #[test]
    fn random_tables_never_panic_or_escape_guest_memory() {
        let m = memory();
        let mut x = 0x0bad_5eed_1234_5678u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..200 {
            // Fill the table pages with random entries, biased towards pointing at each other.
            for page in 1..8u64 {
                for i in 0..512u64 {
                    let r = next();
                    let v = if r % 3 == 0 {
                        ((r >> 8) % 8) << 12 | (r & 0x8f)
                    } else {
                        r
                    };
                    put(&m, page * 0x1000 + i * 8, v);
                }
            }
            for _ in 0..50 {
                let sid = next() as u16;
                let iova = if round % 2 == 0 {
                    next() & 0xffff_ffff_ffff
                } else {
                    next()
                };
                let Ok(entry) = lookup_context(&m, ROOT, sid, 48) else {
                    continue;
                };
                let Ok(ctx) = entry.decode(0b0110, 48) else {
                    continue;
                };
                if let Ok(leaf) = second_stage_walk(
                    &m,
                    &ctx,
                    WalkRequest {
                        address: iova,
                        write: next() & 1 == 0,
                    },
                    48,
                    0b11,
                ) {
                    assert!(
                        leaf.page >> 48 == 0,
                        "leaf {:#x} past the host width",
                        leaf.page
                    );
                    assert_eq!(leaf.page % leaf.page_size, 0);
                    assert!(leaf.read || leaf.write);
                }
            }
        }
    }
}
