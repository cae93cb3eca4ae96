//! MCFG (PCI Firmware Spec 3.3 §4.1.2): the ECAM allocation of segment 0.

use super::*;

/// MCFG (PCI Firmware Spec 3.3 §4.1.2): one ECAM allocation for the segment.
pub(super) fn build_mcfg(pci: &PciSegmentConfig) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, table_id(b"MCFG"), OEM_REVISION);
    mcfg.add_ecam(pci.ecam_base, pci.segment, pci.bus_start, pci.bus_end);
    aml_bytes(&mcfg)
}
