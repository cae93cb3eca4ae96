//! Caching translation information (VT-d 4.1 chapter 6): the context cache (6.2.1), the PASID
//! cache (6.2.2) and the IOTLB (6.2.3) of one remapping unit, and their invalidation at every
//! granularity the unit accepts (6.5: register-based 6.5.1, queued 6.5.2).
//!
//! What is cached, and what is not:
//! - **Context cache**: the present, valid context entry of a source ID (legacy: decoded,
//!   with its domain ID; scalable mode: the 256-bit entry, which carries no domain ID).
//! - **PASID cache** (scalable mode): the present, valid PASID-table entry of (source ID,
//!   PASID), decoded, tagged with the entry's domain ID for domain- and PASID-selective
//!   invalidation.
//! - **IOTLB**: leaf translations, tagged (domain ID, PASID or none, page number at the leaf's
//!   page size), with the permissions ANDed over the walk. First-stage entries also keep U/S,
//!   XD, R/W and whether the leaf was Dirty when cached: a hit is only used when it grants the
//!   request outright — a write through a clean entry, a user request to a supervisor page, a
//!   denied write and the like walk again, which sets Dirty or reports the architected fault.
//! - Never cached: not-present or invalid entries and faults of any kind (every failure walks
//!   again next time), non-leaf paging entries (no paging-structure caches, so the invalidation
//!   hint IH changes nothing), pass-through translations (the context or PASID entry says
//!   pass-through; the cached entry is enough).
//!
//! **Caching mode** (CAP.CM, 6.1): with CM = 1 software also invalidates after making entries
//! present (not-present → present), which is how a virtual IOMMU would learn of new mappings.
//! Because nothing not-present is ever cached here, the unit is correct with CM either way:
//! the extra invalidations find nothing to drop.
//!
//! Invalidations drop at least what the specification says and sometimes more (always safe:
//! a dropped entry is walked again): a context-cache invalidation also drops the PASID-cache
//! entries of the source IDs it covers (their PASID directory came from the context entry),
//! and a domain-selective one drops every scalable-mode context entry (those carry no domain
//! ID). Each cache is bounded ([`IOTLB_CAPACITY`], [`CONTEXT_CAPACITY`], [`PASID_CAPACITY`]):
//! inserting into a full cache evicts one entry, so a guest cannot grow it without bound.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::scalable::{PasidTranslation, ScalableContextEntry};
use super::tables::{Context, Leaf};

/// Most IOTLB entries kept.
pub const IOTLB_CAPACITY: usize = 4096;
/// Most context-cache entries kept.
pub const CONTEXT_CAPACITY: usize = 1024;
/// Most PASID-cache entries kept.
pub const PASID_CAPACITY: usize = 4096;

/// Slots of the IOTLB's direct-mapped front (see [`TranslationCaches::front`]).
pub const FRONT_SLOTS: usize = 1024;

/// The PASID tag of translations for requests without a PASID in legacy mode.
pub const NO_PASID: u32 = u32::MAX;

/// A multiplicative hasher for the small integer keys here (the default SipHash costs more
/// than the rest of an IOTLB hit). Keys are guest-chosen, but the caches are bounded, so a
/// guest provoking collisions only slows its own DMA.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.write_u64(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

type Map<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// A cached context entry (VT-d 6.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachedContext {
    /// A legacy-mode context entry, decoded.
    Legacy(Context),
    /// A scalable-mode context entry (validated).
    Scalable(ScalableContextEntry),
}

/// A cached PASID-table entry (VT-d 6.2.2), decoded, with its domain ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedPasid {
    /// How the PASID translates.
    pub translation: PasidTranslation,
    /// The entry's domain ID (DID).
    pub domain: u16,
}

/// What a first-stage IOTLB entry remembers besides the page (VT-d 6.2.3: the U/S, R/W, XD
/// and Dirty state of the translation, and the PASID entry's SRE and WPE it was walked with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirstStageRights {
    /// R/W at every level.
    pub writable: bool,
    /// U/S at every level.
    pub user: bool,
    /// XD clear at every level.
    pub executable: bool,
    /// The leaf was Dirty when cached.
    pub dirty: bool,
    /// SRE: supervisor requests allowed.
    pub supervisor: bool,
    /// WPE: supervisor writes honour R/W.
    pub write_protect: bool,
}

/// One IOTLB entry: a leaf translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbEntry {
    /// Output page (aligned to `page_size`).
    pub page: u64,
    /// 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
    /// Reads allowed (second stage: R at every level).
    pub read: bool,
    /// Writes allowed (second stage: W at every level).
    pub write: bool,
    /// First-stage rights, for first-stage translations.
    pub first_stage: Option<FirstStageRights>,
}

impl IotlbEntry {
    /// The leaf this entry grants a request (`privileged`: a supervisor request, which may
    /// write a read-only first-stage page while WPE is clear).
    pub fn leaf(&self, privileged: bool) -> Leaf {
        let write = match self.first_stage {
            Some(r) => r.writable || (privileged && !r.write_protect),
            None => self.write,
        };
        Leaf {
            page: self.page,
            page_size: self.page_size,
            read: self.read,
            write,
        }
    }

    /// Whether this entry completes a request on its own: the access is allowed and, for
    /// first-stage translations, nothing needs setting in the tables (a write needs Dirty).
    /// Anything else walks again (and faults or sets Dirty as the walk says).
    pub fn grants(&self, write: bool, privileged: bool, execute: bool) -> bool {
        match self.first_stage {
            None => {
                if write {
                    self.write
                } else {
                    self.read
                }
            }
            Some(r) => {
                if privileged && !r.supervisor {
                    return false;
                }
                if !privileged && !r.user {
                    return false;
                }
                if execute && !r.executable {
                    return false;
                }
                if write {
                    let may_write = r.writable || (privileged && !r.write_protect);
                    may_write && r.dirty
                } else {
                    true
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct IotlbKey {
    domain: u16,
    pasid: u32,
    /// log2 of the page size: 12, 21 or 30.
    shift: u8,
    /// Input address >> shift.
    page: u64,
}

/// Hits and misses per cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// IOTLB lookups answered from the cache.
    pub iotlb_hits: u64,
    /// IOTLB lookups that walked the tables.
    pub iotlb_misses: u64,
    /// Context-cache lookups answered from the cache.
    pub context_hits: u64,
    /// Context-cache lookups that read the root and context tables.
    pub context_misses: u64,
    /// PASID-cache lookups answered from the cache.
    pub pasid_hits: u64,
    /// PASID-cache lookups that read the PASID directory and table.
    pub pasid_misses: u64,
}

/// Sizes of the caches now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheOccupancy {
    /// IOTLB entries.
    pub iotlb: usize,
    /// Context-cache entries.
    pub context: usize,
    /// PASID-cache entries.
    pub pasid: usize,
}

/// One slot of the IOTLB's front: the translation of one 4 KiB input page for one source ID
/// and requested PASID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrontEntry {
    source_id: u16,
    pasid: u32,
    page: u64,
    entry: IotlbEntry,
    /// The front's generation when filled: an entry of an older generation is empty.
    generation: u64,
}

/// The context cache, PASID cache and IOTLB of one remapping unit.
#[derive(Clone, Debug)]
pub struct TranslationCaches {
    context: Map<u16, CachedContext>,
    pasid: Map<(u16, u32), CachedPasid>,
    iotlb: Map<IotlbKey, IotlbEntry>,
    /// A direct-mapped front of the IOTLB keyed by what the request carries (source
    /// ID, PASID, 4 KiB page), so a hit needs neither the context nor the PASID cache: every
    /// invalidation of any cache empties it, by moving to the next generation (so emptying
    /// costs nothing however large the front is).
    front: Box<[Option<FrontEntry>]>,
    front_generation: u64,
    counters: CacheCounters,
}

impl Default for TranslationCaches {
    fn default() -> Self {
        TranslationCaches {
            context: Map::default(),
            pasid: Map::default(),
            iotlb: Map::default(),
            front: vec![None; FRONT_SLOTS].into_boxed_slice(),
            front_generation: 0,
            counters: CacheCounters::default(),
        }
    }
}

fn front_slot(source_id: u16, pasid: u32, page: u64) -> usize {
    let mixed = page ^ (u64::from(source_id) << 7) ^ (u64::from(pasid) << 3);
    (mixed as usize) % FRONT_SLOTS
}

/// Inserts into a bounded map, evicting one entry (whichever the map yields first, in hash
/// order: effectively random) when it is full.
fn insert_bounded<K: Copy + Eq + std::hash::Hash, V>(
    map: &mut Map<K, V>,
    capacity: usize,
    key: K,
    value: V,
) {
    if map.len() >= capacity
        && !map.contains_key(&key)
        && let Some(victim) = map.keys().next().copied()
    {
        map.remove(&victim);
    }
    map.insert(key, value);
}

/// The address range 2^(12 + AM) bytes around `address` (page-selective invalidation, VT-d
/// 6.5.2.3 and 11.4.8.2: the low AM bits of the page number are ignored) as `[start, end)`
/// in u128 so the whole 64-bit space fits.
fn masked_range(address: u64, address_mask: u8) -> (u128, u128) {
    let bits = 12 + u32::from(address_mask.min(52));
    let size = 1u128 << bits;
    let start = u128::from(address) & !(size - 1);
    (start, start + size)
}

impl IotlbKey {
    fn overlaps(&self, (start, end): (u128, u128)) -> bool {
        let base = u128::from(self.page) << self.shift;
        let limit = base + (1u128 << self.shift);
        base < end && start < limit
    }
}

impl TranslationCaches {
    /// Empty caches.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hits and misses so far.
    pub fn counters(&self) -> CacheCounters {
        self.counters
    }

    /// How many entries each cache holds.
    pub fn occupancy(&self) -> CacheOccupancy {
        CacheOccupancy {
            iotlb: self.iotlb.len(),
            context: self.context.len(),
            pasid: self.pasid.len(),
        }
    }

    /// The cached context entry of `source_id`, counting the hit or miss.
    pub fn context(&mut self, source_id: u16) -> Option<CachedContext> {
        let found = self.context.get(&source_id).copied();
        if found.is_some() {
            self.counters.context_hits += 1;
        } else {
            self.counters.context_misses += 1;
        }
        found
    }

    /// Caches the present, valid context entry of `source_id`.
    pub fn insert_context(&mut self, source_id: u16, context: CachedContext) {
        insert_bounded(&mut self.context, CONTEXT_CAPACITY, source_id, context);
    }

    /// The cached PASID-table entry of (`source_id`, `pasid`), counting the hit or miss.
    pub fn pasid(&mut self, source_id: u16, pasid: u32) -> Option<CachedPasid> {
        let found = self.pasid.get(&(source_id, pasid)).copied();
        if found.is_some() {
            self.counters.pasid_hits += 1;
        } else {
            self.counters.pasid_misses += 1;
        }
        found
    }

    /// Caches the present, valid PASID-table entry of (`source_id`, `pasid`).
    pub fn insert_pasid(&mut self, source_id: u16, pasid: u32, entry: CachedPasid) {
        insert_bounded(&mut self.pasid, PASID_CAPACITY, (source_id, pasid), entry);
    }

    /// The front of the IOTLB: the entry translating `address` for `source_id` and the
    /// request's PASID ([`NO_PASID`] for none), if cached there and `usable` accepts it; a hit
    /// counts as an IOTLB hit, a miss is not counted (the full lookup that follows is).
    pub fn front(
        &mut self,
        source_id: u16,
        pasid: u32,
        address: u64,
        usable: impl Fn(&IotlbEntry) -> bool,
    ) -> Option<IotlbEntry> {
        let page = address >> 12;
        match &self.front[front_slot(source_id, pasid, page)] {
            Some(f)
                if f.generation == self.front_generation
                    && f.source_id == source_id
                    && f.pasid == pasid
                    && f.page == page
                    && usable(&f.entry) =>
            {
                self.counters.iotlb_hits += 1;
                Some(f.entry)
            }
            _ => None,
        }
    }

    /// Puts the IOTLB entry for `address` of `source_id` and the request's PASID in the front.
    pub fn fill_front(&mut self, source_id: u16, pasid: u32, address: u64, entry: IotlbEntry) {
        let page = address >> 12;
        self.front[front_slot(source_id, pasid, page)] = Some(FrontEntry {
            source_id,
            pasid,
            page,
            entry,
            generation: self.front_generation,
        });
    }

    fn clear_front(&mut self) {
        self.front_generation += 1;
    }

    /// The IOTLB entry translating `address` for (`domain`, `pasid`) — 4 KiB, 2 MiB, then
    /// 1 GiB pages — if `usable` accepts it (an entry that cannot complete the request on its
    /// own, see [`IotlbEntry::grants`], is a miss), counting the hit or miss.
    pub fn iotlb(
        &mut self,
        domain: u16,
        pasid: u32,
        address: u64,
        usable: impl Fn(&IotlbEntry) -> bool,
    ) -> Option<IotlbEntry> {
        for shift in [12u8, 21, 30] {
            let key = IotlbKey {
                domain,
                pasid,
                shift,
                page: address >> shift,
            };
            if let Some(entry) = self.iotlb.get(&key) {
                if usable(entry) {
                    self.counters.iotlb_hits += 1;
                    return Some(*entry);
                }
                break;
            }
        }
        self.counters.iotlb_misses += 1;
        None
    }

    /// Caches the leaf translation of `address` for (`domain`, `pasid`). Page sizes other than
    /// 4 KiB, 2 MiB and 1 GiB are not cached.
    pub fn insert_iotlb(&mut self, domain: u16, pasid: u32, address: u64, entry: IotlbEntry) {
        let shift = match entry.page_size {
            0x1000 => 12,
            0x20_0000 => 21,
            0x4000_0000 => 30,
            _ => return,
        };
        let key = IotlbKey {
            domain,
            pasid,
            shift,
            page: address >> shift,
        };
        insert_bounded(&mut self.iotlb, IOTLB_CAPACITY, key, entry);
    }

    /// Drops everything: a new root table (GCMD.SRTP), translation enabled or disabled
    /// (GCMD.TE), or a global invalidation of every cache.
    pub fn flush_all(&mut self) {
        self.clear_front();
        self.context.clear();
        self.pasid.clear();
        self.iotlb.clear();
    }

    /// Context-cache invalidation (VT-d 6.5.2.1, register form 11.4.7): `granularity` 1 global,
    /// 2 domain-selective (`domain`), 3 device-selective (`source_id` with `function_mask`:
    /// 0 none, 1 masks SID bit 2, 2 bits 2:1, 3 bits 2:0). The PASID-cache entries of the
    /// source IDs covered go too. Granularity 0 (reserved) drops everything.
    pub fn invalidate_context(
        &mut self,
        granularity: u8,
        domain: u16,
        source_id: u16,
        function_mask: u8,
    ) {
        self.clear_front();
        match granularity {
            2 => {
                self.context.retain(|_, c| match c {
                    CachedContext::Legacy(l) => l.domain != domain,
                    CachedContext::Scalable(_) => false,
                });
                self.pasid.retain(|_, p| p.domain != domain);
            }
            3 => {
                let ignored: u16 = match function_mask & 3 {
                    0 => 0,
                    1 => 0b100,
                    2 => 0b110,
                    _ => 0b111,
                };
                let covers = |sid: u16| sid & !ignored == source_id & !ignored;
                self.context.retain(|&sid, _| !covers(sid));
                self.pasid.retain(|&(sid, _), _| !covers(sid));
            }
            _ => {
                self.context.clear();
                self.pasid.clear();
            }
        }
    }

    /// PASID-cache invalidation (VT-d 6.5.2.2, type 7): `granularity` 0 domain-selective, 1
    /// PASID-selective within the domain, 3 global; 2 (reserved) drops everything.
    pub fn invalidate_pasid_cache(&mut self, granularity: u8, domain: u16, pasid: u32) {
        self.clear_front();
        match granularity {
            0 => self.pasid.retain(|_, p| p.domain != domain),
            1 => self
                .pasid
                .retain(|&(_, p), e| !(e.domain == domain && p == pasid)),
            _ => self.pasid.clear(),
        }
    }

    /// IOTLB invalidation (VT-d 6.5.2.3, type 2; register form 11.4.8): `granularity` 1
    /// global, 2 domain-selective, 3 page-selective within the domain (2^`address_mask` pages
    /// at `address`; the hint IH is irrelevant with no paging-structure caches). Every PASID's
    /// entries of the domain go (first-stage ones included: more than needed, never less).
    /// Granularity 0 (reserved) drops everything.
    pub fn invalidate_iotlb(
        &mut self,
        granularity: u8,
        domain: u16,
        address: u64,
        address_mask: u8,
    ) {
        self.clear_front();
        match granularity {
            2 => self.iotlb.retain(|k, _| k.domain != domain),
            3 => {
                let range = masked_range(address, address_mask);
                self.iotlb
                    .retain(|k, _| !(k.domain == domain && k.overlaps(range)));
            }
            _ => self.iotlb.clear(),
        }
    }

    /// PASID-based IOTLB invalidation (VT-d 6.5.2.4, type 6): `granularity` 2 every
    /// (non-global) mapping of `pasid` in `domain`, 3 page-selective within the PASID
    /// (2^`address_mask` pages at `address`); 0 and 1 (reserved) drop the whole domain.
    pub fn invalidate_pasid_iotlb(
        &mut self,
        granularity: u8,
        domain: u16,
        pasid: u32,
        address: u64,
        address_mask: u8,
    ) {
        self.clear_front();
        match granularity {
            2 => self
                .iotlb
                .retain(|k, _| !(k.domain == domain && k.pasid == pasid)),
            3 => {
                let range = masked_range(address, address_mask);
                self.iotlb
                    .retain(|k, _| !(k.domain == domain && k.pasid == pasid && k.overlaps(range)));
            }
            _ => self.iotlb.retain(|k, _| k.domain != domain),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(page: u64, page_size: u64) -> IotlbEntry {
        IotlbEntry {
            page,
            page_size,
            read: true,
            write: true,
            first_stage: None,
        }
    }

    #[test]
    fn lookups_find_large_pages_from_any_address_inside() {
        let mut c = TranslationCaches::new();
        c.insert_iotlb(1, NO_PASID, 0x4020_0000, page(0x80_0000, 0x20_0000));
        assert!(c.iotlb(1, NO_PASID, 0x403f_f000, |_| true).is_some());
        assert!(c.iotlb(1, NO_PASID, 0x4040_0000, |_| true).is_none());
        assert!(c.iotlb(2, NO_PASID, 0x4020_0000, |_| true).is_none());
        assert!(c.iotlb(1, 0, 0x4020_0000, |_| true).is_none());
        assert_eq!((c.counters().iotlb_hits, c.counters().iotlb_misses), (1, 3));
    }

    #[test]
    fn page_selective_invalidation_honours_the_address_mask_and_large_pages() {
        let mut c = TranslationCaches::new();
        for i in 0..8u64 {
            c.insert_iotlb(1, NO_PASID, i << 12, page(0x10_0000 + (i << 12), 0x1000));
        }
        c.insert_iotlb(1, NO_PASID, 0x20_0000, page(0x40_0000, 0x20_0000));
        // AM = 2: pages 4..=7.
        c.invalidate_iotlb(3, 1, 0x5000, 2);
        for i in 0..8u64 {
            assert_eq!(
                c.iotlb(1, NO_PASID, i << 12, |_| true).is_some(),
                i < 4,
                "page {i}"
            );
        }
        // One 4 KiB page inside the 2 MiB page drops the 2 MiB entry.
        c.invalidate_iotlb(3, 1, 0x23_4000, 0);
        assert!(c.iotlb(1, NO_PASID, 0x20_0000, |_| true).is_none());
        // AM 63 from a descriptor: everything in the domain, no overflow.
        c.invalidate_iotlb(3, 1, u64::MAX, 63);
        assert_eq!(c.occupancy().iotlb, 0);
    }

    #[test]
    fn caches_stay_bounded() {
        let mut c = TranslationCaches::new();
        for i in 0..(IOTLB_CAPACITY as u64 * 3) {
            c.insert_iotlb((i % 7) as u16, NO_PASID, i << 12, page(0, 0x1000));
            c.insert_context(
                i as u16,
                CachedContext::Scalable(ScalableContextEntry::default()),
            );
            c.insert_pasid(
                i as u16,
                i as u32,
                CachedPasid {
                    translation: PasidTranslation::PassThrough,
                    domain: 0,
                },
            );
        }
        let o = c.occupancy();
        assert_eq!(
            (o.iotlb, o.context, o.pasid),
            (IOTLB_CAPACITY, CONTEXT_CAPACITY, PASID_CAPACITY)
        );
    }

    #[test]
    fn first_stage_entries_grant_only_what_needs_no_walk() {
        let rights = FirstStageRights {
            writable: true,
            user: true,
            executable: false,
            dirty: false,
            supervisor: false,
            write_protect: false,
        };
        let mut e = IotlbEntry {
            page: 0,
            page_size: 0x1000,
            read: true,
            write: true,
            first_stage: Some(rights),
        };
        assert!(e.grants(false, false, false));
        assert!(
            !e.grants(true, false, false),
            "clean: a write walks to set D"
        );
        assert!(!e.grants(false, true, false), "SRE clear");
        assert!(!e.grants(false, false, true), "XD");
        e.first_stage = Some(FirstStageRights {
            dirty: true,
            ..rights
        });
        assert!(e.grants(true, false, false));
        e.first_stage = Some(FirstStageRights {
            dirty: true,
            user: false,
            ..rights
        });
        assert!(
            !e.grants(false, false, false),
            "user request, supervisor page"
        );
    }
}
