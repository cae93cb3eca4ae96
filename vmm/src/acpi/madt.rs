//! MADT (Multiple APIC Description Table, §5.2.12): local APICs, the IOAPIC, LINT1 NMI.

use super::*;

/// MADT revision (ACPI 6.5, §5.2.12).
pub(super) const MADT_REVISION: u8 = 6;
/// MADT flag: the system also has a PC-AT-compatible dual 8259 setup (§5.2.12, "Multiple APIC
/// Flags").
pub(super) const MADT_PCAT_COMPAT: u32 = 1 << 0;
/// Interrupt controller structure types (§5.2.12).
pub(super) const MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
pub(super) const MADT_TYPE_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags (§5.2.12.5): active high, edge triggered.
pub(super) const MPS_INTI_ACTIVE_HIGH_EDGE: u16 = 0b01 | (0b01 << 2);
/// Processor UID meaning "all processors" in a Local APIC NMI structure (§5.2.12.7).
pub(super) const ALL_PROCESSORS_UID: u8 = 0xff;

/// MADT (§5.2.12): local APIC address and `PCAT_COMPAT` (KVM's in-kernel 8259s exist), then
/// - one Processor Local APIC structure per vCPU (§5.2.12.2): UID = APIC ID = index, enabled;
/// - the I/O APIC (§5.2.12.3): ID 0, GSI base 0;
/// - optionally an Interrupt Source Override for ISA IRQ0 (§5.2.12.5), see [`AcpiConfig`];
/// - a Local APIC NMI structure (§5.2.12.7) wiring LINT1 to NMI on all processors.
///
/// No SCI override: HW-reduced ACPI has no SCI.
pub(super) fn build_madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        HEADER_LEN as u32,
        MADT_REVISION,
        OEM_ID,
        table_id(b"APIC"),
        OEM_REVISION,
    );
    let mut body = Vec::new();
    body.extend_from_slice(&(layout::APIC_START as u32).to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..cfg.num_cpus {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    IoApic::new(0, layout::IOAPIC_START as u32, 0).to_aml_bytes(&mut body);
    if let Some(gsi) = cfg.irq0_override_gsi {
        // Type, length 10, bus 0 (ISA), source IRQ, GSI, MPS INTI flags.
        body.extend_from_slice(&[MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE, 10, 0, 0]);
        body.extend_from_slice(&gsi.to_le_bytes());
        body.extend_from_slice(&MPS_INTI_ACTIVE_HIGH_EDGE.to_le_bytes());
    }
    // Type, length 6, processor UID, flags (0: conforms to the bus, i.e. edge/high for NMI),
    // LINT#.
    body.extend_from_slice(&[MADT_TYPE_LOCAL_APIC_NMI, 6, ALL_PROCESSORS_UID, 0, 0, 1]);
    madt.append_slice(&body);
    madt.as_slice().to_vec()
}
