//! The Type 3 device's Coherent Device Attribute Table (CDAT 1.04) and the CXL Table Access
//! protocol that serves it over DOE (CXL 2.0 §8.1.11; Linux `read_cdat_data` /
//! `cxl_cdat_read_table` in drivers/cxl/core/pci.c, parsed by `cxl_endpoint_parse_cdat` in
//! drivers/cxl/core/cdat.c).
//!
//! One DSMAS (memory range) per non-empty partition — volatile first (handle 0), then
//! persistent (flag NonVolatile) — each with four DSLBIS: read and write latency, read and write
//! bandwidth, the same figures the VMM's HMAT gives the CXL memory ([`LATENCY_NS`],
//! [`BANDWIDTH_MBPS`]).
//!
//! Table access: a Read Entry request names entry handle *h*; handle 0 is the 16-byte header,
//! handle *k* ≥ 1 the *k*-th structure; the response carries the next handle (0xFFFF after the
//! last). Anything else (another request code or table type, a handle past the end) is refused.

use zerocopy::{Immutable, IntoBytes, KnownLayout};

use crate::pci::doe::DoeProtocol;

/// CXL vendor ID (DOE protocols defined by the CXL specification).
pub const CXL_VENDOR: u16 = 0x1e98;
/// DOE data object type of CXL Table Access.
pub const TABLE_ACCESS_TYPE: u8 = 2;

/// Latency the device reports for reads and writes, in ns (the HMAT's CXL figure).
pub const LATENCY_NS: u16 = 250;
/// Bandwidth the device reports for reads and writes, in MB/s (the HMAT's CXL figure: x8).
pub const BANDWIDTH_MBPS: u16 = 16_000;

const DSMAS: u8 = 0;
const DSLBIS: u8 = 1;
const DSMAS_NON_VOLATILE: u8 = 1 << 2;
/// DSLBIS data types (HMAT's): read latency, write latency, read bandwidth, write bandwidth.
const READ_LATENCY: u8 = 1;
const WRITE_LATENCY: u8 = 2;
const READ_BANDWIDTH: u8 = 4;
const WRITE_BANDWIDTH: u8 = 5;
/// DSLBIS latency unit: entries × base unit in ps.
const LATENCY_BASE_PS: u64 = 1000;
/// DSLBIS bandwidth unit: entries × base unit in MB/s.
const BANDWIDTH_BASE_MBPS: u64 = 1;
/// Response's next handle after the last entry.
const LAST_HANDLE: u16 = 0xffff;

/// CDAT header (CDAT 1.04 §2.1).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, KnownLayout, Immutable)]
struct Header {
    length: u32,
    revision: u8,
    checksum: u8,
    reserved: [u8; 6],
    sequence: u32,
}

/// Device Scoped Memory Affinity Structure (CDAT 1.04 §3.1).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, KnownLayout, Immutable)]
struct Dsmas {
    kind: u8,
    reserved: u8,
    length: u16,
    handle: u8,
    flags: u8,
    reserved2: u16,
    dpa_base: u64,
    dpa_length: u64,
}

/// Device Scoped Latency and Bandwidth Information Structure (CDAT 1.04 §3.2).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, KnownLayout, Immutable)]
struct Dslbis {
    kind: u8,
    reserved: u8,
    length: u16,
    handle: u8,
    flags: u8,
    data_type: u8,
    reserved2: u8,
    entry_base_unit: u64,
    entries: [u16; 3],
    reserved3: u16,
}

/// The CDAT of a device with `volatile_size` and `persistent_size` bytes, as its DOE entries:
/// entry 0 the header, then the structures.
pub fn table(volatile_size: u64, persistent_size: u64) -> Vec<Vec<u8>> {
    let mut structures: Vec<Vec<u8>> = Vec::new();
    let partitions = [
        (0u64, volatile_size, 0u8),
        (volatile_size, persistent_size, DSMAS_NON_VOLATILE),
    ];
    let mut handle = 0u8;
    for (base, size, flags) in partitions {
        if size == 0 {
            continue;
        }
        structures.push(
            Dsmas {
                kind: DSMAS,
                length: size_of::<Dsmas>() as u16,
                handle,
                flags,
                dpa_base: base,
                dpa_length: size,
                ..Default::default()
            }
            .as_bytes()
            .to_vec(),
        );
        for (data_type, base_unit, value) in [
            (READ_LATENCY, LATENCY_BASE_PS, LATENCY_NS),
            (WRITE_LATENCY, LATENCY_BASE_PS, LATENCY_NS),
            (READ_BANDWIDTH, BANDWIDTH_BASE_MBPS, BANDWIDTH_MBPS),
            (WRITE_BANDWIDTH, BANDWIDTH_BASE_MBPS, BANDWIDTH_MBPS),
        ] {
            structures.push(
                Dslbis {
                    kind: DSLBIS,
                    length: size_of::<Dslbis>() as u16,
                    handle,
                    flags: 0, // memory (HMAT memory hierarchy)
                    data_type,
                    entry_base_unit: base_unit,
                    entries: [value, 0, 0],
                    ..Default::default()
                }
                .as_bytes()
                .to_vec(),
            );
        }
        handle += 1;
    }
    let length = size_of::<Header>() + structures.iter().map(Vec::len).sum::<usize>();
    let mut header = Header {
        length: length as u32,
        revision: 1,
        ..Default::default()
    };
    let sum = header
        .as_bytes()
        .iter()
        .chain(structures.iter().flatten())
        .fold(0u8, |s, b| s.wrapping_add(*b));
    header.checksum = sum.wrapping_neg();
    let mut entries = vec![header.as_bytes().to_vec()];
    entries.extend(structures);
    entries
}

/// CXL Table Access over DOE, serving one CDAT.
#[derive(Debug, Clone)]
pub struct CdatTableAccess {
    entries: Vec<Vec<u8>>,
}

impl CdatTableAccess {
    /// Serves the CDAT of a device with these partition sizes.
    pub fn new(volatile_size: u64, persistent_size: u64) -> Self {
        CdatTableAccess {
            entries: table(volatile_size, persistent_size),
        }
    }
}

impl DoeProtocol for CdatTableAccess {
    fn protocol(&self) -> (u16, u8) {
        (CXL_VENDOR, TABLE_ACCESS_TYPE)
    }

    /// Read Entry: DW0 = request code \[7:0\] (0) | table type \[15:8\] (0, CDAT) | entry handle
    /// \[31:16\]. Response: DW0 = response code (0) | table type | next handle, then the entry.
    fn respond(&self, request: &[u32]) -> Option<Vec<u32>> {
        let dw = *request.first()?;
        if dw & 0xffff != 0 {
            return None; // not Read Entry of the CDAT
        }
        let handle = (dw >> 16) as usize;
        let entry = self.entries.get(handle)?;
        let next = if handle + 1 < self.entries.len() {
            (handle + 1) as u16
        } else {
            LAST_HANDLE
        };
        let mut out = vec![u32::from(next) << 16];
        out.extend(
            entry
                .chunks(4)
                .map(|c| c.iter().rev().fold(0u32, |v, b| v << 8 | u32::from(*b))),
        );
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M256: u64 = 256 << 20;

    #[test]
    fn table_layout_checksum_and_partitions() {
        let entries = table(M256, 2 * M256);
        assert_eq!(entries.len(), 1 + 2 * 5);
        let all: Vec<u8> = entries.iter().flatten().copied().collect();
        assert_eq!(
            all.iter().fold(0u8, |s, b| s.wrapping_add(*b)),
            0,
            "checksum"
        );
        assert_eq!(entries[0].len(), 16);
        let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let le64 = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(le32(&entries[0], 0) as usize, all.len());
        // Volatile DSMAS, handle 0, DPA 0..256M.
        let v = &entries[1];
        assert_eq!((v[0], v.len(), v[4], v[5]), (0, 24, 0, 0));
        assert_eq!((le64(v, 8), le64(v, 16)), (0, M256));
        // Its read latency DSLBIS: 250 ns in ps units.
        let l = &entries[2];
        assert_eq!(
            (l[0], l.len(), l[4], l[5], l[6]),
            (1, 24, 0, 0, READ_LATENCY)
        );
        assert_eq!(
            le64(l, 8) * u64::from(u16::from_le_bytes([l[16], l[17]])),
            250_000
        );
        // Write bandwidth: 16000 MB/s.
        let w = &entries[5];
        assert_eq!(w[6], WRITE_BANDWIDTH);
        assert_eq!(u16::from_le_bytes([w[16], w[17]]), 16_000);
        // Persistent DSMAS, handle 1, non-volatile, DPA 256M..768M.
        let p = &entries[6];
        assert_eq!((p[0], p[4], p[5]), (0, 1, DSMAS_NON_VOLATILE));
        assert_eq!((le64(p, 8), le64(p, 16)), (M256, 2 * M256));
        // A pmem-only device has one range, handle 0.
        let pmem = table(0, M256);
        assert_eq!(pmem.len(), 6);
        assert_eq!((pmem[1][4], pmem[1][5]), (0, DSMAS_NON_VOLATILE));
    }

    /// Walks the table as cxl_cdat_read_table does: from handle 0, following the next handle.
    #[test]
    fn read_entry_walks_the_whole_table() {
        let access = CdatTableAccess::new(M256, M256);
        let mut handle = 0u32;
        let mut bytes = Vec::new();
        let mut count = 0;
        loop {
            let response = access.respond(&[handle << 16]).unwrap();
            bytes.extend(response[1..].iter().flat_map(|d| d.to_le_bytes()));
            count += 1;
            handle = response[0] >> 16;
            if handle == 0xffff {
                break;
            }
        }
        assert_eq!(count, 11);
        assert_eq!(bytes, table(M256, M256).concat());
        // Refused: past the end, another table type, another request code.
        assert!(access.respond(&[11 << 16]).is_none());
        assert!(access.respond(&[1 << 8]).is_none());
        assert!(access.respond(&[1]).is_none());
        assert!(access.respond(&[]).is_none());
    }
}
