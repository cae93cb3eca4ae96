//! SRAT (System Resource Affinity Table, §5.2.16): CPU and memory proximity domains, the CXL
//! windows on their own.

use super::*;

/// SRAT revision (§5.2.16).
pub(super) const SRAT_REVISION: u8 = 3;
/// SRAT Processor Local APIC/SAPIC Affinity structure (§5.2.16.1).
pub(super) const SRAT_TYPE_LAPIC_AFFINITY: u8 = 0;
pub(super) const SRAT_LAPIC_AFFINITY_LEN: u8 = 16;
pub(super) const SRAT_LAPIC_AFFINITY_ENABLED: u32 = 1 << 0;

/// SRAT Generic Port Affinity structure (§5.2.16.7, ACPI 6.5).
pub(super) const SRAT_TYPE_GENERIC_PORT_AFFINITY: u8 = 6;
pub(super) const SRAT_GENERIC_PORT_AFFINITY_LEN: u8 = 32;
/// Its device handle type: ACPI (`_HID` and `_UID`).
pub(super) const SRAT_DEVICE_HANDLE_ACPI: u8 = 0;
/// Its flags: enabled.
pub(super) const SRAT_GENERIC_PORT_ENABLED: u32 = 1 << 0;

/// SRAT (§5.2.16): every vCPU in proximity domain 0 (Processor Local APIC/SAPIC Affinity,
/// §5.2.16.1), then one Memory Affinity structure per range (§5.2.16.2), then one Generic Port
/// Affinity structure (§5.2.16.7) per `(domain, _UID)` of a CXL host bridge (`ACPI0016`):
///
/// ```text
/// +0 type 6, +1 length 32, +2 reserved, +3 handle type 0 (ACPI), +4 proximity domain,
/// +8 device handle: _HID "ACPI0016" (8 bytes), _UID (4 bytes), reserved (4), +0x18 flags
/// (enabled), +0x1C reserved
/// ```
/// Linux (drivers/acpi/numa/hmat.c) gives the generic port the HMAT figures of its domain:
/// `cxl_acpi` adds them to the path to each CXL endpoint when it computes its QoS class.
pub(super) fn build_srat(
    num_cpus: u8,
    memory: &[MemoryAffinityRange],
    generic_ports: &[(u32, u32)],
) -> Result<Vec<u8>, AcpiError> {
    let mut srat = Sdt::new(
        *b"SRAT",
        HEADER_LEN as u32,
        SRAT_REVISION,
        OEM_ID,
        table_id(b"SRAT"),
        OEM_REVISION,
    );
    let mut body = Vec::new();
    // Reserved: 1 for backward compatibility, then 8 reserved bytes (§5.2.16).
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&[0; 8]);
    for cpu in 0..num_cpus {
        let domain: u32 = 0;
        let [d0, d1, d2, d3] = domain.to_le_bytes();
        body.extend_from_slice(&[SRAT_TYPE_LAPIC_AFFINITY, SRAT_LAPIC_AFFINITY_LEN, d0, cpu]);
        body.extend_from_slice(&SRAT_LAPIC_AFFINITY_ENABLED.to_le_bytes());
        // Local SAPIC EID, proximity domain bits 31:8, clock domain.
        body.extend_from_slice(&[0, d1, d2, d3]);
        body.extend_from_slice(&0u32.to_le_bytes());
    }
    for range in memory {
        let mut entry =
            MemoryAffinity::new(range.proximity_domain, range.base, range.size).enabled();
        if range.hot_pluggable {
            entry = entry.hotpluggable();
        }
        if range.non_volatile {
            entry = entry.nonvolatile();
        }
        entry.to_aml_bytes(&mut body);
    }
    for &(domain, uid) in generic_ports {
        body.extend_from_slice(&[
            SRAT_TYPE_GENERIC_PORT_AFFINITY,
            SRAT_GENERIC_PORT_AFFINITY_LEN,
            0,
            SRAT_DEVICE_HANDLE_ACPI,
        ]);
        body.extend_from_slice(&domain.to_le_bytes());
        body.extend_from_slice(b"ACPI0016");
        body.extend_from_slice(&uid.to_le_bytes());
        body.extend_from_slice(&[0; 4]);
        body.extend_from_slice(&SRAT_GENERIC_PORT_ENABLED.to_le_bytes());
        body.extend_from_slice(&[0; 4]);
    }
    if body.len() > usize::try_from(layout::ACPI_SIZE).unwrap_or(usize::MAX) {
        return Err(AcpiError::TooLarge {
            needed: u64::try_from(body.len()).unwrap_or(u64::MAX),
            available: layout::ACPI_SIZE,
        });
    }
    srat.append_slice(&body);
    Ok(srat.as_slice().to_vec())
}
