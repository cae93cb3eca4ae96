//! Device media shared with the nested-KVM host as NVDIMMs, so that guest stores land in this
//! machine's own page cache.
//!
//! Inside the nested host, this machine's `/` is a 9p export. A CXL backing file mapped
//! `MAP_SHARED` through 9p keeps the guest's stores in the *nested host's* page cache until its
//! writeback; a run that ends without that writeback (Ctrl-C, `kill -9`, a host kernel crash)
//! loses them, however durable the guest made them. So the outer `vmm run` hands each backing
//! file to QEMU as guest memory instead: `memory-backend-file,share=on` (QEMU maps the file
//! `MAP_SHARED` here) behind an `nvdimm` device. The nested host's kernel sees the range only in
//! the NFIT, and loads no NVDIMM driver (the host image has no `nfit` module loaded), so nothing
//! inside claims it; the inner VMM maps that physical range through `/dev/mem` and gives it to
//! KVM as the CXL device's memory. Every guest store is then a store into QEMU's mapping of the
//! file: in this machine's page cache at once, surviving any end of QEMU or of the nested host,
//! and as fast as RAM wherever the file lies (no 9p on the data path).
//!
//! The outer side builds QEMU's arguments ([`qemu_args`]); the inner side finds the range of
//! slot N in the NFIT ([`nvdimm_range`]): QEMU gives the NVDIMM in slot N the NFIT device handle
//! N + 1 (`nvdimm_slot_to_handle()` in QEMU's `hw/acpi/nvdimm.c`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// A file the nested host gets as an NVDIMM: its slot is its index in the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFile {
    /// Absolute path of the file on this machine (it exists and has `size` bytes).
    pub path: PathBuf,
    /// Its size in bytes (a multiple of 256 MiB for CXL backing files).
    pub size: u64,
}

/// Where the nested host's kernel exposes the NFIT QEMU builds.
pub const NFIT_PATH: &str = "/sys/firmware/acpi/tables/NFIT";

/// QEMU arguments giving the host `files` as NVDIMMs in slots 0, 1, …, next to `ram_mib` of RAM
/// (they replace the plain `-m`). Empty `files`: just `-m`.
pub fn qemu_args(ram_mib: u64, files: &[SharedFile]) -> Vec<OsString> {
    if files.is_empty() {
        return vec!["-m".into(), format!("{ram_mib}M").into()];
    }
    let dimm_mib: u64 = files.iter().map(|f| f.size.div_ceil(1 << 20)).sum();
    let mut args: Vec<OsString> = vec![
        "-machine".into(),
        "pc,nvdimm=on".into(),
        "-m".into(),
        format!(
            "{ram_mib}M,slots={},maxmem={}M",
            files.len(),
            ram_mib + dimm_mib
        )
        .into(),
    ];
    for (slot, file) in files.iter().enumerate() {
        // share=on: QEMU maps the file MAP_SHARED, so the stores are the file's page cache here.
        // discard-data=off (the default, spelled out): the data is the point.
        let mut object = OsString::from(format!(
            "memory-backend-file,id=media{slot},share=on,discard-data=off,size={},mem-path=",
            file.size
        ));
        object.push(crate::host::qemu_escape(file.path.as_os_str()));
        args.push("-object".into());
        args.push(object);
        args.push("-device".into());
        args.push(format!("nvdimm,id=nvdimm{slot},memdev=media{slot},slot={slot}").into());
    }
    args
}

/// The physical range `(base, length)` of the NVDIMM in `slot`, from the nested host's NFIT.
pub fn nvdimm_range(slot: u32) -> Result<(u64, u64), String> {
    nvdimm_range_in(Path::new(NFIT_PATH), slot)
}

fn nvdimm_range_in(nfit: &Path, slot: u32) -> Result<(u64, u64), String> {
    let table = std::fs::read(nfit).map_err(|e| {
        format!(
            "reading {}: {e} (is this the nested host, started with the device's NVDIMM?)",
            nfit.display()
        )
    })?;
    parse_nfit(&table, slot + 1).ok_or_else(|| {
        format!(
            "{} describes no persistent-memory range for NVDIMM slot {slot}",
            nfit.display()
        )
    })
}

/// ACPI 6.x §5.2.25.2 System Physical Address Range structure type; persistent-memory GUID.
const NFIT_SPA_RANGE: u16 = 0;
/// §5.2.25.3 NVDIMM Region Mapping (memory device to SPA range) structure type.
const NFIT_REGION_MAPPING: u16 = 1;
/// Address Range Type GUID of persistent memory, as stored (little-endian fields).
const PERSISTENT_MEMORY_GUID: [u8; 16] = [
    0x79, 0xd3, 0xf0, 0x66, 0xf3, 0xb4, 0x74, 0x40, 0xac, 0x43, 0x0d, 0x33, 0x18, 0xb7, 0x8c, 0xdb,
];
/// ACPI header (36 bytes) plus the NFIT's 4 reserved bytes.
const NFIT_FIRST_STRUCTURE: usize = 40;

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The persistent-memory SPA range `(base, length)` mapped by the NVDIMM with NFIT device
/// `handle`, if the table has one. Bounds-checked throughout: a short or malformed table yields
/// `None`.
pub fn parse_nfit(table: &[u8], handle: u32) -> Option<(u64, u64)> {
    if table.get(0..4)? != b"NFIT" {
        return None;
    }
    let len = usize::try_from(le_u32(table, 4)?).ok()?.min(table.len());
    let mut ranges = Vec::new(); // (index, base, length) of persistent-memory ranges
    let mut wanted_index = None;
    let mut at = NFIT_FIRST_STRUCTURE;
    while at + 4 <= len {
        let kind = le_u16(table, at)?;
        let size = usize::from(le_u16(table, at + 2)?);
        if size < 4 || at + size > len {
            return None;
        }
        let s = table.get(at..at + size)?;
        match kind {
            NFIT_SPA_RANGE if size >= 56 && s.get(16..32)? == PERSISTENT_MEMORY_GUID => {
                ranges.push((le_u16(s, 4)?, le_u64(s, 32)?, le_u64(s, 40)?));
            }
            NFIT_REGION_MAPPING if size >= 48 && le_u32(s, 4)? == handle => {
                wanted_index = Some(le_u16(s, 12)?);
            }
            _ => {}
        }
        at += size;
    }
    let index = wanted_index?;
    ranges
        .into_iter()
        .find(|&(i, _, _)| i == index)
        .map(|(_, base, length)| (base, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An NFIT with one SPA range and one region mapping per (handle, index, base, length).
    fn nfit(entries: &[(u32, u16, u64, u64)]) -> Vec<u8> {
        let mut t = b"NFIT".to_vec();
        t.extend_from_slice(&[0; 36]);
        for &(handle, index, base, length) in entries {
            let mut spa = vec![0u8; 56];
            spa[2..4].copy_from_slice(&56u16.to_le_bytes());
            spa[4..6].copy_from_slice(&index.to_le_bytes());
            spa[6..8].copy_from_slice(&3u16.to_le_bytes());
            spa[16..32].copy_from_slice(&PERSISTENT_MEMORY_GUID);
            spa[32..40].copy_from_slice(&base.to_le_bytes());
            spa[40..48].copy_from_slice(&length.to_le_bytes());
            t.extend_from_slice(&spa);
            let mut map = vec![0u8; 48];
            map[0..2].copy_from_slice(&1u16.to_le_bytes());
            map[2..4].copy_from_slice(&48u16.to_le_bytes());
            map[4..8].copy_from_slice(&handle.to_le_bytes());
            map[12..14].copy_from_slice(&index.to_le_bytes());
            map[16..24].copy_from_slice(&length.to_le_bytes());
            t.extend_from_slice(&map);
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t
    }

    #[test]
    fn finds_each_slots_range_by_its_handle() {
        let t = nfit(&[
            (1, 2, 0x1_c000_0000, 0x3000_0000),
            (2, 3, 0x2_0000_0000, 0x1000_0000),
        ]);
        assert_eq!(parse_nfit(&t, 1), Some((0x1_c000_0000, 0x3000_0000)));
        assert_eq!(parse_nfit(&t, 2), Some((0x2_0000_0000, 0x1000_0000)));
        assert_eq!(parse_nfit(&t, 3), None);
    }

    /// The table QEMU 7.2 built for one 768 MiB NVDIMM in slot 0 (read in the nested host).
    #[test]
    fn reads_qemus_own_table() {
        let mut t = nfit(&[(1, 2, 0x1_c000_0000, 0x3000_0000)]);
        // QEMU adds a control region structure (type 4) after the mapping.
        let mut control = vec![0u8; 80];
        control[0..2].copy_from_slice(&4u16.to_le_bytes());
        control[2..4].copy_from_slice(&80u16.to_le_bytes());
        t.extend_from_slice(&control);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        assert_eq!(parse_nfit(&t, 1), Some((0x1_c000_0000, 0x3000_0000)));
    }

    #[test]
    fn malformed_tables_are_refused() {
        let good = nfit(&[(1, 2, 0x1_0000_0000, 0x1000_0000)]);
        assert_eq!(parse_nfit(b"NFI", 1), None);
        assert_eq!(parse_nfit(b"XXXX0000", 1), None);
        for cut in 0..good.len() {
            // Truncated anywhere (length field kept): never a wrong answer, never a panic.
            let r = parse_nfit(&good[..cut], 1);
            assert!(r.is_none() || r == Some((0x1_0000_0000, 0x1000_0000)));
        }
        let mut zero_len = good.clone();
        zero_len[42..44].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(parse_nfit(&zero_len, 1), None);
        let mut volatile = good.clone();
        volatile[40 + 16] ^= 0xff; // another address range type
        assert_eq!(parse_nfit(&volatile, 1), None);
    }

    #[test]
    fn qemu_arguments_share_each_file() {
        let files = vec![
            SharedFile {
                path: "/data/a,b.img".into(),
                size: 768 << 20,
            },
            SharedFile {
                path: "/data/c.img".into(),
                size: 256 << 20,
            },
        ];
        let args: Vec<String> = qemu_args(2048, &files)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args[..4],
            [
                "-machine",
                "pc,nvdimm=on",
                "-m",
                "2048M,slots=2,maxmem=3072M"
            ]
        );
        assert!(args.contains(
            &"memory-backend-file,id=media0,share=on,discard-data=off,size=805306368,mem-path=/data/a,,b.img".to_string()
        ));
        assert!(args.contains(&"nvdimm,id=nvdimm1,memdev=media1,slot=1".to_string()));
        assert_eq!(
            qemu_args(512, &[]),
            vec![OsString::from("-m"), "512M".into()]
        );
    }
}
