//! DMAR (DMA Remapping Reporting table, Intel VT-d 4.1 chapter 8): one remapping hardware unit
//! (DRHD) that covers every PCI device of segment 0 (INCLUDE_PCI_ALL), no interrupt remapping.
//!
//! ```text
//! header (36) | +36 host address width − 1 | +37 flags | +38 10 reserved bytes
//! DRHD        | +0 type 0 | +2 length 16 | +4 flags (bit 0 INCLUDE_PCI_ALL) | +5 size
//!             | +6 segment | +8 register base address
//! ```
//! The register window is 4 KiB (size field 0: 2^0 pages). No device scopes: with
//! INCLUDE_PCI_ALL Linux (`dmar_parse_one_drhd`, drivers/iommu/intel/dmar.c) puts every PCI
//! device of the segment under this unit. Devices on the root bus need no ATSR for ATS
//! (`dmar_ats_supported`), which is where the VMM places remapped devices.

use super::*;

/// DMAR revision (VT-d 8.1).
pub(super) const DMAR_REVISION: u8 = 1;
/// DRHD structure type and length without device scopes (VT-d 8.3).
pub(super) const DRHD_TYPE: u16 = 0;
pub(super) const DRHD_LEN: u16 = 16;
/// DRHD flag: the unit covers every PCI device of its segment not covered by another unit.
pub(super) const DRHD_INCLUDE_PCI_ALL: u8 = 1 << 0;
/// Size of the DRHD register window.
pub(super) const DRHD_WINDOW: u64 = 0x1000;

/// The remapping hardware the DMAR describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmarConfig {
    /// Host address width in bits (DMA addresses the platform can generate): 39 or 48.
    pub host_address_width: u8,
    /// Base of the unit's 4 KiB register window.
    pub register_base: u64,
}

/// The DMAR for `cfg` (validated by the caller).
pub(super) fn build_dmar(cfg: &DmarConfig, segment: u16) -> Vec<u8> {
    let mut dmar = Sdt::new(
        *b"DMAR",
        HEADER_LEN as u32,
        DMAR_REVISION,
        OEM_ID,
        table_id(b"DMAR"),
        OEM_REVISION,
    );
    let mut body = vec![cfg.host_address_width.saturating_sub(1), 0];
    body.extend_from_slice(&[0; 10]);
    body.extend_from_slice(&DRHD_TYPE.to_le_bytes());
    body.extend_from_slice(&DRHD_LEN.to_le_bytes());
    body.extend_from_slice(&[DRHD_INCLUDE_PCI_ALL, 0]);
    body.extend_from_slice(&segment.to_le_bytes());
    body.extend_from_slice(&cfg.register_base.to_le_bytes());
    dmar.append_slice(&body);
    dmar.as_slice().to_vec()
}
