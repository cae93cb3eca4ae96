//! The engine's address translation cache (ATC, PCIe Base Spec r6.0 §10.2): ATS translation
//! completions per PASID and page, used as translated requests until a device-TLB
//! invalidation covers them (§10.3).

use iommu::{AtcInvalidation, DmaAccess, Pasid, Translation};

/// Entries the ATC holds (docs/sva-engine.md, "ATS").
pub const ENTRIES: usize = 64;

/// One cached translation: the naturally aligned page `[page, page + size)` of `pasid`'s
/// address space maps to `[gpa, gpa + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtcEntry {
    /// Address space.
    pub pasid: Option<Pasid>,
    /// Untranslated start of the page.
    pub page: u64,
    /// Page size (a power of two ≥ 4 KiB).
    pub size: u64,
    /// Translated start of the page.
    pub gpa: u64,
    /// Reads permitted.
    pub read: bool,
    /// Writes permitted.
    pub write: bool,
}

/// A cache hit: where `address` goes and how many bytes from it the entry covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtcHit {
    /// Translated address of the byte asked for.
    pub gpa: u64,
    /// Bytes from there to the end of the entry's page.
    pub len: u64,
}

/// The cache. Replacement is first-in first-out. `generation` moves on every invalidation, so
/// a translation obtained before one is never inserted after it (it may be stale).
#[derive(Debug, Default)]
pub struct Atc {
    entries: Vec<AtcEntry>,
    next_victim: usize,
    generation: u64,
}

impl Atc {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The invalidation generation (read it before sending a translation request).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry covering `address` in `pasid`'s space, if it permits `access`.
    pub fn lookup(&self, pasid: Option<Pasid>, address: u64, access: DmaAccess) -> Option<AtcHit> {
        let e = self
            .entries
            .iter()
            .find(|e| e.pasid == pasid && address.wrapping_sub(e.page) < e.size)?;
        let allowed = match access {
            DmaAccess::Read => e.read,
            DmaAccess::Write => e.write,
        };
        allowed.then(|| {
            let offset = address - e.page;
            AtcHit {
                gpa: e.gpa + offset,
                len: e.size - offset,
            }
        })
    }

    /// Caches a translation completion for `address` obtained at `generation`. Returns false
    /// (and caches nothing) when an invalidation came in between, when the completion denies
    /// every access or says Untranslated Only, or when its page is malformed.
    pub fn insert(
        &mut self,
        pasid: Option<Pasid>,
        address: u64,
        translation: &Translation,
        generation: u64,
    ) -> bool {
        let size = translation.page_size;
        if generation != self.generation
            || translation.untranslated_only
            || !(translation.read || translation.write)
            || !size.is_power_of_two()
            || size < 4096
        {
            return false;
        }
        let page = address & !(size - 1);
        let gpa_page = translation.gpa.wrapping_sub(address - page);
        if gpa_page & (size - 1) != 0 {
            return false;
        }
        let entry = AtcEntry {
            pasid,
            page,
            size,
            gpa: gpa_page,
            read: translation.read,
            write: translation.write,
        };
        // The new translation supersedes every older one of this PASID that overlaps it (a
        // read-only 2 MiB entry must not keep answering for a page just translated writable at
        // 4 KiB: lookup takes the first entry that covers an address).
        self.entries
            .retain(|e| !(e.pasid == pasid && e.page < page + size && page < e.page + e.size));
        if self.entries.len() < ENTRIES {
            self.entries.push(entry);
        } else {
            self.entries[self.next_victim] = entry;
            self.next_victim = (self.next_victim + 1) % ENTRIES;
        }
        true
    }

    /// Drops what `request` covers; returns how many entries went.
    pub fn invalidate(&mut self, request: &AtcInvalidation) -> usize {
        self.generation += 1;
        let before = self.entries.len();
        self.entries
            .retain(|e| !request.covers(e.pasid, e.page, e.size));
        self.next_victim = 0;
        before - self.entries.len()
    }

    /// Drops everything (ATS disabled, reset).
    pub fn clear(&mut self) {
        self.generation += 1;
        self.entries.clear();
        self.next_victim = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iommu::Completion;

    fn t(gpa: u64, write: bool) -> Translation {
        Translation::new(gpa, 4096, true, write)
    }

    fn inval(pasid: Option<Pasid>, address: u64, size: u64) -> AtcInvalidation {
        AtcInvalidation {
            pasid,
            global: false,
            address,
            size,
            completion: Completion::new(),
        }
    }

    #[test]
    fn hits_respect_pasid_page_and_permission() {
        let p1 = Pasid::new(1);
        let mut atc = Atc::new();
        assert!(atc.insert(p1, 0x7000_1234, &t(0x50_0234, false), 0));
        let hit = atc.lookup(p1, 0x7000_1ff0, DmaAccess::Read).unwrap();
        assert_eq!(
            hit,
            AtcHit {
                gpa: 0x50_0ff0,
                len: 0x10
            }
        );
        assert_eq!(atc.lookup(p1, 0x7000_1ff0, DmaAccess::Write), None);
        assert_eq!(
            atc.lookup(Pasid::new(2), 0x7000_1000, DmaAccess::Read),
            None
        );
        assert_eq!(atc.lookup(p1, 0x7000_2000, DmaAccess::Read), None);
    }

    #[test]
    fn an_invalidation_in_between_keeps_a_stale_translation_out() {
        let p = Pasid::new(3);
        let mut atc = Atc::new();
        let generation = atc.generation();
        atc.invalidate(&inval(p, 0, u64::MAX));
        assert!(!atc.insert(p, 0x1000, &t(0x2000, true), generation));
        assert!(atc.is_empty());
        assert!(!atc.insert(
            p,
            0x1000,
            &Translation::new(0x2000, 4096, false, false),
            atc.generation()
        ));
    }

    #[test]
    fn invalidations_drop_only_what_they_cover() {
        let (a, b) = (Pasid::new(1), Pasid::new(2));
        let mut atc = Atc::new();
        for page in 0..4u64 {
            let g = atc.generation();
            atc.insert(a, page << 12, &t(0x10_0000 + (page << 12), true), g);
            let g = atc.generation();
            atc.insert(b, page << 12, &t(0x20_0000 + (page << 12), true), g);
        }
        assert_eq!(atc.invalidate(&inval(a, 0x2000, 0x2000)), 2);
        assert!(atc.lookup(a, 0x1000, DmaAccess::Write).is_some());
        assert!(atc.lookup(a, 0x2000, DmaAccess::Write).is_none());
        assert!(atc.lookup(b, 0x2000, DmaAccess::Write).is_some());
        let mut global = inval(None, 0, u64::MAX);
        global.global = true;
        assert_eq!(atc.invalidate(&global), 6);
        assert!(atc.is_empty());
    }

    #[test]
    fn the_cache_never_grows_past_its_size() {
        let mut atc = Atc::new();
        for page in 0..(ENTRIES as u64 * 3) {
            let g = atc.generation();
            assert!(atc.insert(None, page << 12, &t(page << 12, true), g));
        }
        assert_eq!(atc.len(), ENTRIES);
        assert!(
            atc.lookup(None, (ENTRIES as u64 * 3 - 1) << 12, DmaAccess::Read)
                .is_some()
        );
    }

    #[test]
    fn large_pages_cover_their_whole_extent() {
        let mut atc = Atc::new();
        let tr = Translation {
            page_size: 2 << 20,
            ..Translation::new(0x4012_3000, 4096, true, true)
        };
        assert!(atc.insert(None, 0x8012_3000, &tr, 0));
        let hit = atc.lookup(None, 0x801f_f000, DmaAccess::Write).unwrap();
        assert_eq!(
            hit,
            AtcHit {
                gpa: 0x401f_f000,
                len: 0x1000
            }
        );
    }

    #[test]
    fn a_new_translation_supersedes_overlapping_older_entries() {
        let p = Pasid::new(5);
        let mut atc = Atc::new();
        // A read-only 2 MiB entry (a read translation), then the page at 0x20_1000 translated
        // writable at 4 KiB: a write there must hit the new entry, not stop at the old one.
        let ro = Translation {
            page_size: 2 << 20,
            ..Translation::new(0x4020_0000, 2 << 20, true, false)
        };
        assert!(atc.insert(p, 0x20_0000, &ro, atc.generation()));
        let rw = Translation {
            page_size: 4096,
            ..Translation::new(0x9000, 4096, true, true)
        };
        assert!(atc.insert(p, 0x20_1000, &rw, atc.generation()));
        assert_eq!(atc.len(), 1);
        assert_eq!(
            atc.lookup(p, 0x20_1008, DmaAccess::Write).map(|h| h.gpa),
            Some(0x9008)
        );
        assert!(atc.lookup(p, 0x20_0000, DmaAccess::Read).is_none());
        // Another PASID's entries stay.
        assert!(atc.insert(Pasid::new(6), 0x20_0000, &ro, atc.generation()));
        assert!(atc.insert(p, 0x20_2000, &rw, atc.generation()));
        assert_eq!(atc.len(), 3);
    }
}
