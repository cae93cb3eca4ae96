//! Guest RAM layout and the E820 map the guest firmware interface reports.

use crate::layout::*;

/// E820 entry types (ACPI spec, "Address Range Types").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

/// One E820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

/// Splits `total` bytes of guest RAM around the 32-bit hole: `[0, min(total, 3G))` and, for the
/// rest, `[4G, 4G + rest)`. Returns (guest address, size) pairs.
pub fn ram_ranges(total: u64) -> Vec<(u64, u64)> {
    let low = total.min(MEM_32BIT_HOLE_START);
    let mut ranges = vec![(0, low)];
    if total > low {
        ranges.push((HIGH_RAM_START, total - low));
    }
    ranges
}

/// Builds the E820 map: usable RAM minus the legacy BIOS area (where our ACPI tables live), plus
/// the ECAM window as reserved — Linux's early MCFG check (`pci_mmcfg_reserved`, is_mmconf_reserved)
/// wants the ECAM range reserved in E820.
pub fn e820_map(total: u64) -> Vec<E820Entry> {
    let mut map = Vec::new();
    let ranges = ram_ranges(total);
    let (low_start, low_size) = ranges[0];
    let low_end = low_start + low_size;
    map.push(E820Entry {
        addr: 0,
        size: EBDA_START,
        kind: E820Type::Ram,
    });
    map.push(E820Entry {
        addr: ACPI_START,
        size: HIMEM_START - ACPI_START,
        kind: E820Type::Reserved,
    });
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820Type::Ram,
        });
    }
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820Type::Reserved,
    });
    for &(start, size) in &ranges[1..] {
        map.push(E820Entry {
            addr: start,
            size,
            kind: E820Type::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_guest_has_one_low_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        let map = e820_map(256 << 20);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Type::Ram
            }
        );
        assert!(
            map.iter()
                .all(|e| e.addr + e.size <= 256 << 20 || e.kind == E820Type::Reserved)
        );
        // Everything but the EBDA and the BIOS area is RAM.
        assert_eq!(ram_total(&map), (256 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn four_gib_crosses_the_hole() {
        let total = 4u64 << 30;
        assert_eq!(
            ram_ranges(total),
            vec![(0, 3 << 30), (HIGH_RAM_START, 1 << 30)]
        );
        let map = e820_map(total);
        let high = map.iter().find(|e| e.addr == HIGH_RAM_START).unwrap();
        assert_eq!(high.size, 1 << 30);
        assert_eq!(high.kind, E820Type::Ram);
        assert_eq!(ram_total(&map), total - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn ecam_is_reserved_and_no_ram_overlaps_the_hole() {
        let map = e820_map(8 << 30);
        assert!(map.contains(&E820Entry {
            addr: PCI_ECAM_START,
            size: PCI_ECAM_SIZE,
            kind: E820Type::Reserved
        }));
        for e in map.iter().filter(|e| e.kind == E820Type::Ram) {
            let end = e.addr + e.size;
            assert!(
                end <= MEM_32BIT_HOLE_START || e.addr >= HIGH_RAM_START,
                "{e:?}"
            );
        }
        // Entries are sorted and do not overlap.
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{pair:?}");
        }
    }
}
