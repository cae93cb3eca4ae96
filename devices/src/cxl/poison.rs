//! Poison (media error) list of the CXL memory device.
//!
//! Spec: CXL 3.0 §8.2.9.8.4 Media and Poison Management — §8.2.9.8.4.1 Get Poison List (records
//! of DPA bits [63:6] + source in bits [2:0], length in 64-byte units; More/Overflow flags),
//! §8.2.9.8.4.2 Inject Poison, §8.2.9.8.4.3 Clear Poison. Linux: `cxl_mem_get_poison()`
//! (`drivers/cxl/core/mbox.c`, loops while the More flag is set, resending the same request),
//! `cxl_inject_poison_locked()` / `cxl_clear_poison_locked()` (`drivers/cxl/core/memdev.c`),
//! `struct cxl_mbox_poison_in/out` (`drivers/cxl/cxlmem.h`), trace point `cxl_poison`.
//!
//! The list is kept as non-overlapping DPA ranges. Injecting over an existing range replaces
//! the overlapped part; clearing splits ranges; adjacent ranges of the same source merge.

#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::collections::BTreeMap;

use super::mailbox::PayloadOut;

/// Poison granularity: DPAs and lengths are in 64-byte units (`CXL_POISON_LEN_MULT`).
pub const POISON_GRANULE: u64 = 64;

/// Get Poison List output header size (`struct cxl_mbox_poison_out` without records).
pub const LIST_HEADER: usize = 0x20;

/// Size of one Get Poison List record (`struct cxl_poison_record`).
pub const LIST_RECORD: usize = 0x10;

/// Default Poison List Maximum Media Error Records (Identify Memory Device).
pub const DEFAULT_MAX_RECORDS: u32 = 256;

/// Get Poison List output flag: more records to fetch (`CXL_POISON_FLAG_MORE`).
pub const FLAG_MORE: u8 = 1 << 0;
/// Get Poison List output flag: the list overflowed (`CXL_POISON_FLAG_OVERFLOW`).
pub const FLAG_OVERFLOW: u8 = 1 << 1;

/// Largest length one record can carry: a 32-bit count of 64-byte units.
const MAX_RECORD_UNITS: u64 = u32::MAX as u64;

/// Where a poisoned range came from — Get Poison List record bits [2:0]
/// (`CXL_POISON_SOURCE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonSource {
    /// Unknown (0).
    Unknown = 0,
    /// Received poisoned data from the host (1).
    External = 1,
    /// Device-detected media error (2) — used for control-API injections.
    Internal = 2,
    /// Injected with the Inject Poison command (3).
    Injected = 3,
    /// Vendor specific (7).
    Vendor = 7,
}

/// One poisoned range as the control API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoisonRange {
    /// First poisoned DPA (64-byte aligned).
    pub dpa: u64,
    /// Length in bytes (multiple of 64).
    pub length: u64,
    /// Origin.
    pub source: PoisonSource,
}

/// Why an insertion was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonInsertError {
    /// The list would exceed its maximum number of records; the overflow flag and timestamp
    /// are now set, as on a device that lost track of a media error.
    Overflow,
}

/// Cursor of a Get Poison List sequence that ended with the More flag set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    start: u64,
    end: u64,
    next: u64,
}

/// The device's poison list.
#[derive(Debug, Clone)]
pub struct PoisonList {
    /// start → (end exclusive, source).
    ranges: BTreeMap<u64, (u64, PoisonSource)>,
    max_records: u32,
    overflow_ts: Option<u64>,
    cursor: Option<Cursor>,
}

impl PoisonList {
    /// An empty list that holds at most `max_records` ranges.
    pub fn new(max_records: u32) -> Self {
        Self {
            ranges: BTreeMap::new(),
            max_records: max_records.clamp(1, 0x00ff_ffff),
            overflow_ts: None,
            cursor: None,
        }
    }

    /// Poison List Maximum Media Error Records (24-bit Identify field).
    pub fn max_records(&self) -> u32 {
        self.max_records
    }

    /// Device timestamp at which the list overflowed, if it did.
    pub fn overflow_timestamp(&self) -> Option<u64> {
        self.overflow_ts
    }

    /// Number of stored ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether nothing is poisoned.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of stored ranges with source [`PoisonSource::Injected`] (counted against the
    /// Inject Poison Limit).
    pub fn injected_count(&self) -> usize {
        self.ranges
            .values()
            .filter(|(_, s)| *s == PoisonSource::Injected)
            .count()
    }

    /// Whether any byte of `start..end` is poisoned.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.ranges
            .range(..end)
            .next_back()
            .is_some_and(|(_, (e, _))| *e > start)
    }

    /// The list, lowest DPA first.
    pub fn ranges(&self) -> Vec<PoisonRange> {
        self.ranges
            .iter()
            .map(|(s, (e, src))| PoisonRange {
                dpa: *s,
                length: e.saturating_sub(*s),
                source: *src,
            })
            .collect()
    }

    /// Remove `start..end` from every stored range (splitting where needed). Returns whether
    /// anything was removed.
    fn cut(&mut self, start: u64, end: u64) -> bool {
        let hit: Vec<(u64, u64, PoisonSource)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, (e, src))| (*s, *e, *src))
            .collect();
        for (s, e, src) in &hit {
            self.ranges.remove(s);
            if *s < start {
                self.ranges.insert(*s, (start, *src));
            }
            if *e > end {
                self.ranges.insert(end, (*e, *src));
            }
        }
        !hit.is_empty()
    }

    /// Merge the range starting at `start` with same-source neighbours that touch it.
    fn merge_around(&mut self, start: u64) {
        let Some(&(mut end, src)) = self.ranges.get(&start) else {
            return;
        };
        let mut start = start;
        if let Some((&ps, &(pe, psrc))) = self.ranges.range(..start).next_back()
            && pe == start
            && psrc == src
        {
            self.ranges.remove(&start);
            self.ranges.insert(ps, (end, src));
            start = ps;
        }
        if let Some(&(ne, nsrc)) = self.ranges.get(&end)
            && nsrc == src
        {
            self.ranges.remove(&end);
            end = ne;
            self.ranges.insert(start, (end, src));
        }
    }

    /// Record `start..end` as poisoned by `source`, replacing whatever covered it. The caller
    /// has validated alignment and bounds. On overflow nothing is recorded and the overflow
    /// timestamp is set (kept from the first overflow).
    pub fn insert(
        &mut self,
        start: u64,
        end: u64,
        source: PoisonSource,
        timestamp: u64,
    ) -> Result<(), PoisonInsertError> {
        if start >= end {
            return Ok(());
        }
        let before = self.ranges.clone();
        self.cut(start, end);
        self.ranges.insert(start, (end, source));
        self.merge_around(start);
        if self.ranges.len() > self.max_records as usize {
            self.ranges = before;
            self.overflow_ts.get_or_insert(timestamp);
            log::warn!("cxl: poison list overflowed at {start:#x}..{end:#x}");
            return Err(PoisonInsertError::Overflow);
        }
        Ok(())
    }

    /// Remove `start..end` from the list. Returns whether anything was poisoned there. Clearing
    /// the last range also ends the overflow condition (the list is complete again).
    pub fn remove(&mut self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        let hit = self.cut(start, end);
        if self.ranges.is_empty() {
            self.overflow_ts = None;
        }
        hit
    }

    /// Forget a pending More sequence (conventional reset).
    pub fn reset_cursor(&mut self) {
        self.cursor = None;
    }

    /// Get Poison List output for DPAs `start..end` (CXL 3.0 §8.2.9.8.4.1), at most
    /// `capacity` bytes. Records are clipped to the requested range. When they do not all fit,
    /// the More flag is set and the next request for the same range continues after the last
    /// record returned (Linux resends the identical request while More is set).
    pub fn get_list(&mut self, start: u64, end: u64, capacity: usize) -> Vec<u8> {
        let room = capacity.saturating_sub(LIST_HEADER) / LIST_RECORD;
        let from = match self.cursor {
            Some(c) if c.start == start && c.end == end => c.next.max(start),
            _ => start,
        };
        // Never hand BTreeMap::range an inverted range.
        let stop = end.max(from);
        let mut records: Vec<(u64, u32, PoisonSource)> = Vec::new();
        let mut more = false;
        let mut next = from;
        // The range holding `from` may start before it.
        let first = self
            .ranges
            .range(..=from)
            .next_back()
            .map(|(s, _)| *s)
            .unwrap_or(from);
        'outer: for (&s, &(e, src)) in self.ranges.range(first..stop) {
            let mut a = s.max(from);
            let b = e.min(stop);
            while a < b {
                if records.len() >= room {
                    more = true;
                    break 'outer;
                }
                let units = ((b - a) / POISON_GRANULE).clamp(1, MAX_RECORD_UNITS);
                records.push((a, units as u32, src));
                a = a.saturating_add(units * POISON_GRANULE);
                next = a;
            }
        }
        self.cursor = more.then_some(Cursor { start, end, next });
        let mut flags = 0;
        if more {
            flags |= FLAG_MORE;
        }
        if self.overflow_ts.is_some() {
            flags |= FLAG_OVERFLOW;
        }
        let mut out = PayloadOut::zeroed(LIST_HEADER + records.len() * LIST_RECORD);
        out.u8(0, flags)
            .u64(2, self.overflow_ts.unwrap_or(0))
            .u16(10, records.len() as u16);
        for (i, (dpa, units, src)) in records.iter().enumerate() {
            let off = LIST_HEADER + i * LIST_RECORD;
            out.u64(off, (dpa & !0x3f) | *src as u64)
                .u32(off + 8, *units);
        }
        out.into_vec()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn parse(out: &[u8]) -> (u8, Vec<(u64, u64, u8)>) {
        let n = u16::from_le_bytes([out[10], out[11]]) as usize;
        let recs = (0..n)
            .map(|i| {
                let o = LIST_HEADER + i * LIST_RECORD;
                let a = u64::from_le_bytes(out[o..o + 8].try_into().unwrap());
                let l = u32::from_le_bytes(out[o + 8..o + 12].try_into().unwrap());
                (a & !0x3f, u64::from(l) * 64, (a & 7) as u8)
            })
            .collect();
        (out[0], recs)
    }

    #[test]
    fn split_merge_and_clip() {
        let mut p = PoisonList::new(16);
        p.insert(0x1000, 0x2000, PoisonSource::Internal, 1).unwrap();
        p.insert(0x2000, 0x2040, PoisonSource::Internal, 1).unwrap();
        assert_eq!(p.len(), 1, "adjacent same-source ranges merge");
        p.insert(0x1800, 0x1840, PoisonSource::Injected, 1).unwrap();
        assert_eq!(p.len(), 3);
        assert!(p.remove(0x1000, 0x1040));
        assert!(!p.remove(0x0, 0x40));
        let (flags, recs) = parse(&p.get_list(0x1400, 0x1900, 4096));
        assert_eq!(flags, 0);
        assert_eq!(
            recs,
            vec![(0x1400, 0x400, 2), (0x1800, 0x40, 3), (0x1840, 0xc0, 2)]
        );
    }

    #[test]
    fn more_flag_resumes_and_overflow_sets_flag() {
        let mut p = PoisonList::new(4);
        for i in 0..4u64 {
            p.insert(i * 0x100, i * 0x100 + 0x40, PoisonSource::Injected, 5)
                .unwrap();
        }
        assert_eq!(
            p.insert(0x1000, 0x1040, PoisonSource::Injected, 9),
            Err(PoisonInsertError::Overflow)
        );
        assert_eq!(p.overflow_timestamp(), Some(9));
        // Room for 2 records per call.
        let cap = LIST_HEADER + 2 * LIST_RECORD;
        let (f1, r1) = parse(&p.get_list(0, 0x10000, cap));
        assert_eq!(f1, FLAG_MORE | FLAG_OVERFLOW);
        let (f2, r2) = parse(&p.get_list(0, 0x10000, cap));
        assert_eq!(f2, FLAG_OVERFLOW);
        assert_eq!(r1.len() + r2.len(), 4);
        assert_eq!(r2[1].0, 0x300);
        // Sequence complete: the next call starts over.
        let (_, r3) = parse(&p.get_list(0, 0x10000, cap));
        assert_eq!(r3[0].0, 0);
        for i in 0..4u64 {
            p.remove(i * 0x100, i * 0x100 + 0x40);
        }
        assert_eq!(p.overflow_timestamp(), None);
    }

    #[test]
    fn huge_range_splits_into_u32_records() {
        let mut p = PoisonList::new(4);
        let end = (u64::from(u32::MAX) + 10) * 64;
        p.insert(0, end, PoisonSource::Internal, 0).unwrap();
        let (_, recs) = parse(&p.get_list(0, end, 4096));
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].1, u64::from(u32::MAX) * 64);
        assert_eq!(recs[1].1, 10 * 64);
    }
}
