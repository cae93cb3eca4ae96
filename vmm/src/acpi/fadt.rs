//! FADT (Fixed ACPI Description Table, §5.2.9): HW-reduced, with the sleep control/status and
//! reset registers.

use super::*;

/// IA-PC boot architecture flags (§5.2.9.3).
pub(super) const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
pub(super) const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
pub(super) const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
pub(super) const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// FADT, major version 6 (§5.2.9).
///
/// - `HW_REDUCED_ACPI` (fixed feature flag bit 20; §4.1): no SCI, PM blocks or FACS
///   (FIRMWARE_CTRL and X_FIRMWARE_CTRL stay 0).
/// - `RESET_REG_SUP` with RESET_REG = 8-bit system I/O register at the reset port, RESET_VALUE
///   (§4.8.3.6 "Reset Register").
/// - SLEEP_CONTROL_REG / SLEEP_STATUS_REG = 8-bit system I/O registers (§4.8.3.7 "Sleep Control
///   and Status Registers"); writing `SLP_TYP << 2 | SLP_EN` powers off with `\_S5_`'s type.
/// - `PWR_BUTTON` and `SLP_BUTTON` set: no fixed-feature buttons (none exist in HW-reduced mode).
/// - IAPC_BOOT_ARCH (§5.2.9.3): LEGACY_DEVICES (the 16550 UARTs), VGA Not Present,
///   PCIe ASPM Controls (OSPM must not touch ASPM), CMOS RTC Not Present unless the VMM has one.
///   "8042" is clear (no PS/2 controller) and "MSI Not Supported" is clear (devices use MSI/MSI-X).
/// - X_DSDT holds the DSDT's 64-bit address (DSDT stays 0).
pub(super) fn build_fadt(cfg: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let mut iapc = IAPC_LEGACY_DEVICES | IAPC_VGA_NOT_PRESENT | IAPC_PCIE_ASPM_CONTROLS;
    if !cfg.cmos_rtc {
        iapc |= IAPC_CMOS_RTC_NOT_PRESENT;
    }
    fadt.iapc_boot_arch = iapc.into();
    fadt.reset_reg = io_port_gas(layout::ACPI_RESET_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_port_gas(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_port_gas(layout::ACPI_SLEEP_STATUS_PORT);
    aml_bytes(&fadt.finalize())
}

/// An 8-bit, byte-accessed register in system I/O space (Generic Address Structure, §5.2.3.2).
pub(super) fn io_port_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}
