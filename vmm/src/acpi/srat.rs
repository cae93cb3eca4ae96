//! SRAT (System Resource Affinity Table, §5.2.16): CPU and memory proximity domains, the CXL
//! windows on their own.

use super::*;

/// SRAT revision (§5.2.16).
pub(super) const SRAT_REVISION: u8 = 3;
/// SRAT Processor Local APIC/SAPIC Affinity structure (§5.2.16.1).
pub(super) const SRAT_TYPE_LAPIC_AFFINITY: u8 = 0;
pub(super) const SRAT_LAPIC_AFFINITY_LEN: u8 = 16;
pub(super) const SRAT_LAPIC_AFFINITY_ENABLED: u32 = 1 << 0;

/// SRAT (§5.2.16): every vCPU in proximity domain 0 (Processor Local APIC/SAPIC Affinity,
/// §5.2.16.1), then one Memory Affinity structure per range (§5.2.16.2).
pub(super) fn build_srat(
    num_cpus: u8,
    memory: &[MemoryAffinityRange],
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
    if body.len() > usize::try_from(layout::ACPI_SIZE).unwrap_or(usize::MAX) {
        return Err(AcpiError::TooLarge {
            needed: u64::try_from(body.len()).unwrap_or(u64::MAX),
            available: layout::ACPI_SIZE,
        });
    }
    srat.append_slice(&body);
    Ok(srat.as_slice().to_vec())
}
