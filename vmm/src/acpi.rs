//! ACPI tables for a stock Linux x86_64 guest.
//!
//! [`create_acpi_tables`] lays the tables out in a byte image meant to be copied to
//! [`ACPI_START`](crate::layout::ACPI_START); the VMM copies it into guest memory, reserves the
//! area in E820 and hands [`AcpiTables::rsdp_addr`] to the kernel (`boot_params.acpi_rsdp_addr` or
//! the PVH start info). Keeping guest memory out of this module makes it unit-testable.
//!
//! ```text
//! ACPI_START  RSDP (rev 2)          -> XSDT
//!             DSDT (AML)            \_SB.PCI0, \_SB.MRES (ECAM reservation), \_SB.COM1..3,
//!                                   \_SB.Cnnn (ACPI0007 processors), \_S5_, caller's extra AML
//!             FACP (FADT rev 6.5)   HW-reduced, reset + sleep registers, X_DSDT -> DSDT
//!             APIC (MADT)           local APICs, IOAPIC, LAPIC NMI (LINT1)
//!             MCFG                  one ECAM allocation
//!             SRAT                  CPU and memory affinity (when memory ranges are given)
//!             caller's extra tables (e.g. DMAR, CEDT)
//!             XSDT                  -> FACP, APIC, MCFG, SRAT, extra tables
//! ```
//! Every table starts 16-byte aligned.
//!
//! Section numbers refer to the ACPI Specification 6.5 unless stated otherwise; MCFG and the PCI
//! host bridge `_OSC` come from the PCI Firmware Specification 3.3.
//!
//! # HW-reduced ACPI and the legacy devices
//! The FADT sets `HW_REDUCED_ACPI` (§4.1, §5.2.9): there is no SCI, no PM1/GPE blocks, no FACS;
//! power-off and reset go through the sleep control/status registers and the reset register.
//! Linux reacts to HW-reduced mode on x86 (`acpi_generic_reduced_hw_init`,
//! arch/x86/kernel/acpi/boot.c) by installing `null_legacy_pic` and skipping the PIT/HPET timer
//! setup. Consequences the VMM must live with:
//! - the 8259 PIC is never programmed and `nr_legacy_irqs()` is 0, so Linux does not pre-map ISA
//!   IRQs 0..15 onto the IOAPIC. Legacy devices get their interrupts from DSDT `_CRS` entries
//!   instead, which is why the 16550 UARTs are described as `PNP0501` devices: `8250_pnp` then
//!   re-registers ttyS0..2 (matched by I/O base) with an IRQ mapped through the IOAPIC;
//! - the PIT interrupt is not used; the local APIC timer must work without PIT calibration (KVM's
//!   TSC-deadline timer and a known TSC frequency, as Firecracker and Cloud Hypervisor guests use).
//!   The PIT can still be read for TSC calibration;
//! - the IOAPIC works normally (GSIs come from the MADT IOAPIC entry).
//!
//! No interrupt source override for ISA IRQ0 is emitted by default: the VMM uses KVM's default GSI
//! routing, where the in-kernel PIT raises GSI 0 on IOAPIC pin 0 (QEMU's IRQ0 → GSI 2 override
//! matches QEMU's own routing, not KVM's default). Set [`AcpiConfig::irq0_override_gsi`] if the
//! VMM installs a route that sends the PIT elsewhere.

use acpi_tables::aml::{self, Path};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::srat::MemoryAffinity;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use thiserror::Error;

use crate::layout;

/// OEM ID in every table header (§5.2.6).
const OEM_ID: [u8; 6] = *b"RUSTVM";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;

/// Size of the RSDP structure, revision 2 (§5.2.5.3).
const RSDP_LEN: usize = 36;
/// Size of the common system description table header (§5.2.6).
const HEADER_LEN: usize = 36;
/// Every table starts at a multiple of this (the RSDP must be 16-byte aligned, §5.2.5.1).
const TABLE_ALIGN: usize = 16;

/// IA-PC boot architecture flags (§5.2.9.3).
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// MADT revision (ACPI 6.5, §5.2.12).
const MADT_REVISION: u8 = 6;
/// MADT flag: the system also has a PC-AT-compatible dual 8259 setup (§5.2.12, "Multiple APIC
/// Flags").
const MADT_PCAT_COMPAT: u32 = 1 << 0;
/// Interrupt controller structure types (§5.2.12).
const MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_TYPE_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags (§5.2.12.5): active high, edge triggered.
const MPS_INTI_ACTIVE_HIGH_EDGE: u16 = 0b01 | (0b01 << 2);
/// Processor UID meaning "all processors" in a Local APIC NMI structure (§5.2.12.7).
const ALL_PROCESSORS_UID: u8 = 0xff;

/// SRAT revision (§5.2.16).
const SRAT_REVISION: u8 = 3;
/// SRAT Processor Local APIC/SAPIC Affinity structure (§5.2.16.1).
const SRAT_TYPE_LAPIC_AFFINITY: u8 = 0;
const SRAT_LAPIC_AFFINITY_LEN: u8 = 16;
const SRAT_LAPIC_AFFINITY_ENABLED: u32 = 1 << 0;

/// DSDT revision 2: AML integers are 64 bits wide (§5.2.11.1; ASL `DefinitionBlock`, §19.6).
const DSDT_REVISION: u8 = 2;

/// Control bits of the PCI host bridge `_OSC` granted to the OS (PCI Firmware Spec 3.3 §4.5.1):
/// native PCIe hot-plug, SHPC hot-plug, PME, AER, PCIe capability structure.
const OSC_GRANTED_CONTROL: u8 = 0x1f;
/// `_OSC` UUID for PCI/PCIe host bridges (PCI Firmware Spec 3.3 §4.5.1).
const PCI_HOST_BRIDGE_OSC_UUID: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";
/// `_OSC` status bits in the first capabilities dword (§6.2.11).
const OSC_UNRECOGNIZED_UUID: u8 = 1 << 2;
const OSC_UNRECOGNIZED_REVISION: u8 = 1 << 3;
const OSC_CAPABILITIES_MASKED: u8 = 1 << 4;

/// Legacy I/O port ranges routed through the host bridge, leaving out 0xCF8..0xCFF (PCI
/// configuration mechanism #1).
const PCI_IO_WINDOWS: [(u16, u16); 2] = [(0x0000, 0x0cf7), (0x0d00, 0xffff)];

/// Size of the IOAPIC and local APIC register pages, kept clear of RAM and PCI windows.
const APIC_PAGE_SIZE: u64 = 0x1000;

const _: () = assert!(layout::IOAPIC_START <= u32::MAX as u64);
const _: () = assert!(layout::APIC_START <= u32::MAX as u64);

/// Why the tables could not be built. Every invalid input ends here; nothing panics.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("ACPI needs at least one vCPU")]
    NoCpus,
    #[error("invalid {what}: base {base:#x}, size {size:#x}")]
    InvalidRange {
        what: &'static str,
        base: u64,
        size: u64,
    },
    #[error("{first} [{:#x}, +{:#x}) overlaps {second} [{:#x}, +{:#x})", .first_range.0, .first_range.1, .second_range.0, .second_range.1)]
    Overlap {
        first: &'static str,
        first_range: (u64, u64),
        second: &'static str,
        second_range: (u64, u64),
    },
    #[error("invalid PCI bus range {start}..={end}")]
    InvalidBusRange { start: u8, end: u8 },
    #[error("ECAM base {0:#x} is not 1 MiB aligned")]
    EcamMisaligned(u64),
    #[error("ECAM window [{base:#x}, +{size:#x}) must lie below 4 GiB")]
    EcamAbove4G { base: u64, size: u64 },
    #[error("legacy IRQ {0} is not an ISA IRQ (0..=15)")]
    InvalidIsaIrq(u32),
    #[error("GSI {0} for the IRQ0 override is not on the IOAPIC (0..=23)")]
    InvalidGsi(u32),
    #[error("extra ACPI table #{index}: {reason}")]
    InvalidExtraTable { index: usize, reason: &'static str },
    #[error("ACPI tables need {needed:#x} bytes but the ACPI area holds {available:#x}")]
    TooLarge { needed: u64, available: u64 },
}

/// The PCI segment group behind the single host bridge `\_SB.PCI0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciSegmentConfig {
    /// PCI segment group number (`_SEG`, MCFG segment).
    pub segment: u16,
    /// ECAM base address as MCFG states it: the address of bus 0's configuration space, even when
    /// `bus_start` is not 0 (PCI Firmware Spec 3.3 §4.1.2). Must be 1 MiB aligned.
    pub ecam_base: u64,
    /// First and last bus decoded by the ECAM window (`_BBN`, `WordBusNumber`).
    pub bus_start: u8,
    pub bus_end: u8,
    /// 32-bit MMIO window for BARs; must end at or below 4 GiB.
    pub mmio32_base: u64,
    pub mmio32_size: u64,
    /// 64-bit MMIO window for BARs; a size of 0 leaves it out.
    pub mmio64_base: u64,
    pub mmio64_size: u64,
}

impl Default for PciSegmentConfig {
    /// The segment described by [`crate::layout`].
    fn default() -> Self {
        Self {
            segment: 0,
            ecam_base: layout::PCI_ECAM_START,
            bus_start: layout::PCI_ECAM_BUS_START,
            bus_end: layout::PCI_ECAM_BUS_END,
            mmio32_base: layout::PCI_MMIO32_START,
            mmio32_size: layout::PCI_MMIO32_SIZE,
            mmio64_base: layout::PCI_MMIO64_START,
            mmio64_size: layout::PCI_MMIO64_SIZE,
        }
    }
}

impl PciSegmentConfig {
    /// The ECAM range actually decoded, `(base, size)`: 1 MiB per bus from `bus_start` to
    /// `bus_end`. This is what the DSDT reserves through `PNP0C02` and what E820 must reserve.
    pub fn ecam_region(&self) -> (u64, u64) {
        let buses = u64::from(self.bus_end.saturating_sub(self.bus_start)) + 1;
        (
            self.ecam_base
                .saturating_add(u64::from(self.bus_start) << 20),
            buses << 20,
        )
    }
}

/// One SRAT Memory Affinity entry (§5.2.16.2): a guest-physical range and its proximity domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryAffinityRange {
    pub base: u64,
    pub size: u64,
    /// Proximity domain (NUMA node in Linux terms).
    pub proximity_domain: u32,
    pub hot_pluggable: bool,
    pub non_volatile: bool,
}

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// vCPUs; APIC ID = ACPI processor UID = index.
    pub num_cpus: u8,
    /// Guest RAM as `(start, size)`: SRAT memory affinity in proximity domain 0. Pass every E820
    /// RAM range: Linux drops the SRAT if it leaves more than 1 MiB of E820 RAM uncovered.
    pub ram_ranges: Vec<(u64, u64)>,
    /// Further SRAT memory affinity entries (e.g. CXL memory on its own proximity domain).
    pub extra_memory_affinity: Vec<MemoryAffinityRange>,
    /// The PCIe segment (ECAM, buses, windows).
    pub pci_segment: PciSegmentConfig,
    /// Whether the VMM emulates the CMOS RTC at ports 0x70/0x71 (FADT "CMOS RTC Not Present").
    pub cmos_rtc: bool,
    /// Emit a MADT interrupt source override ISA IRQ0 → this GSI (edge, active high). Only right
    /// when the VMM routes the PIT there; KVM's default routing keeps IRQ0 on GSI 0.
    pub irq0_override_gsi: Option<u32>,
    /// Complete tables (header, checksum) added to the XSDT as they are, e.g. DMAR or CEDT.
    pub extra_tables: Vec<Vec<u8>>,
    /// AML appended to the DSDT after the built-in objects (e.g. `\_SB.CXLM`).
    pub extra_dsdt_aml: Vec<u8>,
}

impl AcpiConfig {
    /// The layout's machine: `num_cpus` vCPUs, `ram_ranges` of RAM on proximity domain 0, the
    /// default PCI segment, no CMOS RTC, no IRQ0 override, no extra tables.
    pub fn new(num_cpus: u8, ram_ranges: Vec<(u64, u64)>) -> Self {
        Self {
            num_cpus,
            ram_ranges,
            extra_memory_affinity: Vec::new(),
            pci_segment: PciSegmentConfig::default(),
            cmos_rtc: false,
            irq0_override_gsi: None,
            extra_tables: Vec::new(),
            extra_dsdt_aml: Vec::new(),
        }
    }

    /// All SRAT memory affinity entries: RAM on domain 0, then the extra ones.
    fn memory_affinity(&self) -> Vec<MemoryAffinityRange> {
        self.ram_ranges
            .iter()
            .map(|&(base, size)| MemoryAffinityRange {
                base,
                size,
                proximity_domain: 0,
                hot_pluggable: false,
                non_volatile: false,
            })
            .chain(self.extra_memory_affinity.iter().copied())
            .collect()
    }
}

/// The table image: copy `bytes` to guest physical `base`; the RSDP is at `rsdp_addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    pub base: u64,
    pub bytes: Vec<u8>,
    pub rsdp_addr: u64,
}

/// Builds RSDP, XSDT, FADT, MADT, MCFG, SRAT (if there is memory to describe), DSDT and the
/// caller's extra tables, laid out from [`layout::ACPI_START`] with the RSDP first.
///
/// Fails with [`AcpiError::TooLarge`] if they do not fit in [`layout::ACPI_SIZE`], and with the
/// matching error for any invalid configuration.
pub fn create_acpi_tables(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    validate(cfg)?;
    let base = layout::ACPI_START;
    let mut image = Image::new(base);

    // The RSDP needs the XSDT address, known last: reserve its slot now.
    image.place(&[0u8; RSDP_LEN])?;

    let dsdt_addr = image.place(&build_dsdt(cfg)?)?;
    let mut xsdt_entries = vec![image.place(&build_fadt(cfg, dsdt_addr))?];
    xsdt_entries.push(image.place(&build_madt(cfg))?);
    xsdt_entries.push(image.place(&build_mcfg(&cfg.pci_segment))?);
    let affinity = cfg.memory_affinity();
    if !affinity.is_empty() {
        xsdt_entries.push(image.place(&build_srat(cfg.num_cpus, &affinity)?)?);
    }
    for table in &cfg.extra_tables {
        xsdt_entries.push(image.place(table)?);
    }

    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    for addr in xsdt_entries {
        xsdt.add_entry(addr);
    }
    let xsdt_addr = image.place(&aml_bytes(&xsdt))?;

    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    image.write_at(0, &rsdp)?;

    Ok(AcpiTables {
        base,
        rsdp_addr: base,
        bytes: image.bytes,
    })
}

/// The growing table image, bounded by `ACPI_SIZE`.
struct Image {
    base: u64,
    bytes: Vec<u8>,
}

impl Image {
    fn new(base: u64) -> Self {
        Self {
            base,
            bytes: Vec::new(),
        }
    }

    /// Appends `table` at the next aligned offset; returns its guest address.
    fn place(&mut self, table: &[u8]) -> Result<u64, AcpiError> {
        let offset = self.bytes.len().next_multiple_of(TABLE_ALIGN);
        let end = offset.saturating_add(table.len());
        let needed = u64::try_from(end).unwrap_or(u64::MAX);
        if needed > layout::ACPI_SIZE {
            return Err(AcpiError::TooLarge {
                needed,
                available: layout::ACPI_SIZE,
            });
        }
        self.bytes.resize(offset, 0);
        self.bytes.extend_from_slice(table);
        // `offset < ACPI_SIZE`, so neither conversion nor addition can fail.
        Ok(self.base + offset as u64)
    }

    fn write_at(&mut self, offset: usize, data: &[u8]) -> Result<(), AcpiError> {
        let end = offset.saturating_add(data.len());
        let dst = self.bytes.get_mut(offset..end).ok_or(AcpiError::TooLarge {
            needed: u64::try_from(end).unwrap_or(u64::MAX),
            available: layout::ACPI_SIZE,
        })?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

/// OEM table ID: "RVMM" followed by the table signature.
fn table_id(signature: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"RVMM____";
    id[4..].copy_from_slice(signature);
    id
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    let raw = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes(raw.try_into().ok()?))
}

/// `[base, base + size)` as an inclusive end, or `None` if empty or past `u64::MAX`.
fn range_last(base: u64, size: u64) -> Option<u64> {
    base.checked_add(size.checked_sub(1)?)
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    match (range_last(a.0, a.1), range_last(b.0, b.1)) {
        (Some(a_last), Some(b_last)) => a.0 <= b_last && b.0 <= a_last,
        _ => false,
    }
}

/// Rejects every configuration the tables cannot describe, before any table is built.
fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    let pci = &cfg.pci_segment;
    if pci.bus_start > pci.bus_end {
        return Err(AcpiError::InvalidBusRange {
            start: pci.bus_start,
            end: pci.bus_end,
        });
    }
    if !pci.ecam_base.is_multiple_of(1 << 20) {
        return Err(AcpiError::EcamMisaligned(pci.ecam_base));
    }
    let ecam = pci.ecam_region();
    let ecam_below_4g = range_last(ecam.0, ecam.1).is_some_and(|last| last <= u64::from(u32::MAX));
    if !ecam_below_4g {
        return Err(AcpiError::EcamAbove4G {
            base: ecam.0,
            size: ecam.1,
        });
    }
    // The 32-bit window must fit a DWord descriptor, whose length field is 32 bits too.
    let mmio32_ok = pci.mmio32_size <= u64::from(u32::MAX)
        && range_last(pci.mmio32_base, pci.mmio32_size)
            .is_some_and(|last| last <= u64::from(u32::MAX));
    if !mmio32_ok {
        return Err(AcpiError::InvalidRange {
            what: "PCI MMIO32 window",
            base: pci.mmio32_base,
            size: pci.mmio32_size,
        });
    }
    if pci.mmio64_size != 0 && range_last(pci.mmio64_base, pci.mmio64_size).is_none() {
        return Err(AcpiError::InvalidRange {
            what: "PCI MMIO64 window",
            base: pci.mmio64_base,
            size: pci.mmio64_size,
        });
    }
    if let Some(gsi) = cfg.irq0_override_gsi {
        // The IOAPIC model (KVM's in-kernel one) has 24 pins.
        if gsi > 23 {
            return Err(AcpiError::InvalidGsi(gsi));
        }
    }

    let mut regions: Vec<(&'static str, (u64, u64))> = vec![
        ("PCI ECAM", ecam),
        ("PCI MMIO32 window", (pci.mmio32_base, pci.mmio32_size)),
        ("IOAPIC", (layout::IOAPIC_START, APIC_PAGE_SIZE)),
        ("local APIC", (layout::APIC_START, APIC_PAGE_SIZE)),
    ];
    if pci.mmio64_size != 0 {
        regions.push(("PCI MMIO64 window", (pci.mmio64_base, pci.mmio64_size)));
    }
    for range in cfg.memory_affinity() {
        if range_last(range.base, range.size).is_none() {
            return Err(AcpiError::InvalidRange {
                what: "SRAT memory range",
                base: range.base,
                size: range.size,
            });
        }
        regions.push(("SRAT memory range", (range.base, range.size)));
    }
    // Sorted by base, any overlap shows up between neighbours.
    regions.sort_by_key(|&(_, (base, _))| base);
    for pair in regions.windows(2) {
        let [(first, first_range), (second, second_range)] = *pair else {
            continue;
        };
        if overlaps(first_range, second_range) {
            return Err(AcpiError::Overlap {
                first,
                first_range,
                second,
                second_range,
            });
        }
    }

    for (index, table) in cfg.extra_tables.iter().enumerate() {
        validate_extra_table(index, table)?;
    }
    let limit = usize::try_from(layout::ACPI_SIZE).unwrap_or(usize::MAX);
    if cfg.extra_dsdt_aml.len() > limit {
        return Err(AcpiError::TooLarge {
            needed: u64::try_from(cfg.extra_dsdt_aml.len()).unwrap_or(u64::MAX),
            available: layout::ACPI_SIZE,
        });
    }
    Ok(())
}

/// Signatures this module generates itself; an extra table must not duplicate them.
const BUILT_IN_SIGNATURES: [&[u8; 4]; 6] = [b"XSDT", b"FACP", b"DSDT", b"APIC", b"MCFG", b"SRAT"];

fn validate_extra_table(index: usize, table: &[u8]) -> Result<(), AcpiError> {
    let invalid = |reason| AcpiError::InvalidExtraTable { index, reason };
    if table.len() < HEADER_LEN {
        return Err(invalid("shorter than a table header"));
    }
    let length = read_u32(table, 4).and_then(|l| usize::try_from(l).ok());
    if length != Some(table.len()) {
        return Err(invalid("header length differs from the table size"));
    }
    if table.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) != 0 {
        return Err(invalid("checksum does not sum to zero"));
    }
    if BUILT_IN_SIGNATURES
        .iter()
        .any(|sig| table.get(0..4) == Some(&sig[..]))
    {
        return Err(invalid("signature clashes with a built-in table"));
    }
    Ok(())
}

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
fn build_fadt(cfg: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
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
fn io_port_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// MADT (§5.2.12): local APIC address and `PCAT_COMPAT` (KVM's in-kernel 8259s exist), then
/// - one Processor Local APIC structure per vCPU (§5.2.12.2): UID = APIC ID = index, enabled;
/// - the I/O APIC (§5.2.12.3): ID 0, GSI base 0;
/// - optionally an Interrupt Source Override for ISA IRQ0 (§5.2.12.5), see [`AcpiConfig`];
/// - a Local APIC NMI structure (§5.2.12.7) wiring LINT1 to NMI on all processors.
///
/// No SCI override: HW-reduced ACPI has no SCI.
fn build_madt(cfg: &AcpiConfig) -> Vec<u8> {
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

/// MCFG (PCI Firmware Spec 3.3 §4.1.2): one ECAM allocation for the segment.
fn build_mcfg(pci: &PciSegmentConfig) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, table_id(b"MCFG"), OEM_REVISION);
    mcfg.add_ecam(pci.ecam_base, pci.segment, pci.bus_start, pci.bus_end);
    aml_bytes(&mcfg)
}

/// SRAT (§5.2.16): every vCPU in proximity domain 0 (Processor Local APIC/SAPIC Affinity,
/// §5.2.16.1), then one Memory Affinity structure per range (§5.2.16.2).
fn build_srat(num_cpus: u8, memory: &[MemoryAffinityRange]) -> Result<Vec<u8>, AcpiError> {
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

/// `Device (name) { children }` (ASL `Device`, §19.6) as AML bytes.
fn device(name: &str, children: &[&dyn Aml]) -> Vec<u8> {
    aml_bytes(&aml::Device::new(Path::new(name), children.to_vec()))
}

/// Already-encoded AML passed through as it is.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.0);
    }
}

/// ISA IRQ resource descriptor (§6.4.2.1): `IRQNoFlags` (2-byte form: edge, active high,
/// exclusive), or, when the IRQ is shared, `IRQ (Edge, ActiveHigh, Shared)` (3-byte form).
struct IsaIrq {
    irq: u8,
    shared: bool,
}

impl Aml for IsaIrq {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let mask = 1u16 << (self.irq & 0xf);
        if self.shared {
            sink.byte(0x23);
            sink.word(mask);
            // Bit 0 edge triggered, bit 3 clear (active high), bit 4 shared.
            sink.byte(0x11);
        } else {
            sink.byte(0x22);
            sink.word(mask);
        }
    }
}

/// DSDT (§5.2.11.1), revision 2 (64-bit AML integers).
///
/// ```text
/// Scope (\_SB) {
///   Device (PCI0) {                   // PCI Express host bridge (§6.1, PCI FW Spec §4.3)
///     _HID EisaId("PNP0A08"), _CID EisaId("PNP0A03"), _SEG, _UID 0, _BBN
///     _CRS: WordBusNumber, WordIO x2, DWordMemory (MMIO32), QWordMemory (MMIO64)
///     _OSC: grants native hot-plug, SHPC, PME, AER, PCIe capability control
///   }
///   Device (MRES) { _HID EisaId("PNP0C02"), _UID 0, _CRS Memory32Fixed(ECAM) }
///   Device (COMn) { _HID EisaId("PNP0501"), _UID n, _CRS IO + IRQ }      // n = 1..3
///   Device (Cnnn) { _HID "ACPI0007", _UID n }                            // one per vCPU (§8.4)
/// }
/// Name (_S5_, Package { 5, 0, 0, 0 })                                     // §7.4.2
/// <extra AML>
/// ```
/// `_ADR` is left out of PCI0: a device carries `_HID` or `_ADR`, not both (§6.1). No `_PRT`: the
/// devices use MSI/MSI-X.
fn build_dsdt(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    let mut sb_children = pci_host_bridge(&cfg.pci_segment);
    sb_children.extend_from_slice(&ecam_reservation(&cfg.pci_segment));
    sb_children.extend_from_slice(&serial_ports()?);
    for cpu in 0..cfg.num_cpus {
        let hid: &dyn Aml = &"ACPI0007";
        sb_children.extend_from_slice(&device(
            &format!("C{cpu:03X}"),
            &[
                &aml::Name::new("_HID".into(), hid),
                &aml::Name::new("_UID".into(), &u32::from(cpu)),
            ],
        ));
    }

    let sb_raw = RawAml(&sb_children);
    let sb = aml::Scope::new("\\_SB_".into(), vec![&sb_raw]);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&layout::ACPI_S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    );
    let mut body = aml_bytes(&sb);
    s5.to_aml_bytes(&mut body);
    body.extend_from_slice(&cfg.extra_dsdt_aml);

    if body.len() > usize::try_from(layout::ACPI_SIZE).unwrap_or(usize::MAX) {
        return Err(AcpiError::TooLarge {
            needed: u64::try_from(body.len()).unwrap_or(u64::MAX),
            available: layout::ACPI_SIZE,
        });
    }
    let mut dsdt = Sdt::new(
        *b"DSDT",
        HEADER_LEN as u32,
        DSDT_REVISION,
        OEM_ID,
        table_id(b"DSDT"),
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

/// `\_SB.PCI0`, the PCIe host bridge. Its `_CRS` (§6.2.2) produces the bus range
/// (WordBusNumber, §6.4.3.5.3), the legacy I/O ports except 0xCF8..0xCFF (WordIO), the 32-bit
/// window (DWordMemory, §6.4.3.5.2) and the 64-bit window (QWordMemory, §6.4.3.5.1). Both memory
/// windows are non-cacheable (not prefetchable) so that Linux accepts any BAR inside them.
/// The caller validated every range, so the descriptors' `max - min + 1` cannot overflow.
fn pci_host_bridge(pci: &PciSegmentConfig) -> Vec<u8> {
    let bus = aml::AddressSpace::new_bus_number(u16::from(pci.bus_start), u16::from(pci.bus_end));
    let io: Vec<aml::AddressSpace<u16>> = PCI_IO_WINDOWS
        .iter()
        .map(|&(min, max)| aml::AddressSpace::new_io(min, max, None))
        .collect();
    // Validated: the window is non-empty and ends at or below 4 GiB.
    let mmio32_min = pci.mmio32_base as u32;
    let mmio32_max = range_last(pci.mmio32_base, pci.mmio32_size).unwrap_or(pci.mmio32_base) as u32;
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio32_min,
        mmio32_max,
        None,
    );
    let mmio64 = range_last(pci.mmio64_base, pci.mmio64_size).map(|max| {
        aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            pci.mmio64_base,
            max,
            None,
        )
    });
    let mut resources: Vec<&dyn Aml> = vec![&bus];
    for window in &io {
        resources.push(window);
    }
    resources.push(&mmio32);
    if let Some(window) = &mmio64 {
        resources.push(window);
    }
    let crs = aml::ResourceTemplate::new(resources);

    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let segment = u32::from(pci.segment);
    let bbn = u32::from(pci.bus_start);
    device(
        "PCI0",
        &[
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_CID".into(), &cid),
            &aml::Name::new("_SEG".into(), &segment),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &bbn),
            &aml::Name::new("_CRS".into(), &crs),
            &RawAml(&pci_host_bridge_osc()),
        ],
    )
}

/// `_OSC` for the PCI host bridge (§6.2.11; PCI Firmware Spec 3.3 §4.5):
///
/// ```text
/// Method (_OSC, 4) {
///   CreateDWordField (Arg3, 0, CDW1)
///   If (Arg0 == ToUUID ("33DB4D5B-1FF7-401C-9657-7441C03DD766")) {
///     CreateDWordField (Arg3, 8, CDW3)
///     Local0 = CDW3 & 0x1F
///     If (Arg1 != 1) { CDW1 |= 0x08 }          // unrecognized revision
///     If (CDW3 != Local0) { CDW1 |= 0x10 }     // capabilities masked
///     CDW3 = Local0
///   } Else { CDW1 |= 0x04 }                    // unrecognized UUID
///   Return (Arg3)
/// }
/// ```
/// Without `_OSC`, Linux keeps AER, PME and native hot-plug away from its PCIe port drivers.
fn pci_host_bridge_osc() -> Vec<u8> {
    let cdw1 = Path::new("CDW1");
    let cdw3 = Path::new("CDW3");
    let arg3 = aml::Arg(3);
    let local0 = aml::Local(0);

    let create_cdw1 = aml::CreateDWordField::new(&cdw1, &arg3, &aml::ZERO);
    let create_cdw3 = aml::CreateDWordField::new(&cdw3, &arg3, &8u8);
    let mask = aml::And::new(&local0, &cdw3, &OSC_GRANTED_CONTROL);
    let bad_revision = aml::NotEqual::new(&aml::Arg(1), &aml::ONE);
    let flag_revision = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_REVISION);
    let if_revision = aml::If::new(&bad_revision, vec![&flag_revision]);
    let masked = aml::NotEqual::new(&cdw3, &local0);
    let flag_masked = aml::Or::new(&cdw1, &cdw1, &OSC_CAPABILITIES_MASKED);
    let if_masked = aml::If::new(&masked, vec![&flag_masked]);
    let store = aml::Store::new(&cdw3, &local0);

    let uuid = aml::Uuid::new(PCI_HOST_BRIDGE_OSC_UUID);
    let is_pci = aml::Equal::new(&aml::Arg(0), &uuid);
    let if_pci = aml::If::new(
        &is_pci,
        vec![&create_cdw3, &mask, &if_revision, &if_masked, &store],
    );
    let flag_uuid = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
    let else_other = aml::Else::new(vec![&flag_uuid]);
    let ret = aml::Return::new(&arg3);

    aml_bytes(&aml::Method::new(
        "_OSC".into(),
        4,
        false,
        vec![&create_cdw1, &if_pci, &else_other, &ret],
    ))
}

/// `\_SB.MRES`, a motherboard resource device (`PNP0C02`) whose `_CRS` (Memory32Fixed,
/// §6.4.3.4) covers the decoded ECAM range. The PCI Firmware Spec 3.3 §4.1.2 asks for this
/// reservation; Linux's `pci_mmcfg_late_init` refuses MCFG without it.
fn ecam_reservation(pci: &PciSegmentConfig) -> Vec<u8> {
    // Validated: the region lies below 4 GiB, so both values fit.
    let (base, size) = pci.ecam_region();
    let ecam = aml::Memory32Fixed::new(true, base as u32, size as u32);
    let crs = aml::ResourceTemplate::new(vec![&ecam]);
    let hid = aml::EISAName::new("PNP0C02");
    device(
        "MRES",
        &[
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
}

/// `\_SB.COM1..COM3` (`PNP0501`, 16550A-compatible), one per UART in [`crate::layout`], with an
/// 8-port `IO` descriptor (§6.4.2.5) and its ISA IRQ. A UART sharing its IRQ with another gets
/// the shared IRQ form. Under HW-reduced ACPI these entries are what give ttyS0..2 interrupts.
fn serial_ports() -> Result<Vec<u8>, AcpiError> {
    let ports = [
        ("COM1", layout::COM1_PORT, layout::COM1_IRQ),
        ("COM2", layout::COM2_PORT, layout::COM2_IRQ),
        ("COM3", layout::COM3_PORT, layout::COM3_IRQ),
    ];
    let mut bytes = Vec::new();
    for (index, &(name, port, irq)) in ports.iter().enumerate() {
        let isa_irq = u8::try_from(irq)
            .ok()
            .filter(|irq| *irq < 16)
            .ok_or(AcpiError::InvalidIsaIrq(irq))?;
        let shared = ports
            .iter()
            .enumerate()
            .any(|(other, &(_, _, other_irq))| other != index && other_irq == irq);
        let io = aml::IO::new(port, port, 1, 8);
        let irq = IsaIrq {
            irq: isa_irq,
            shared,
        };
        let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
        let hid = aml::EISAName::new("PNP0501");
        // `index` < 3, so the conversion cannot fail.
        let uid = u32::try_from(index + 1).unwrap_or(u32::MAX);
        bytes.extend_from_slice(&device(
            name,
            &[
                &aml::Name::new("_HID".into(), &hid),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FADT length for major version 6 (§5.2.9).
    const FADT_LEN: usize = 276;

    fn read_u64(bytes: &[u8], offset: usize) -> Option<u64> {
        let raw = bytes.get(offset..offset.checked_add(8)?)?;
        Some(u64::from_le_bytes(raw.try_into().ok()?))
    }

    impl AcpiTables {
        /// Finds a table by signature by walking RSDP → XSDT (and FADT → X_DSDT for
        /// `DSDT`), as a guest would. Returns its guest address and bytes; `None` if absent or
        /// malformed.
        fn find_table(&self, signature: &[u8; 4]) -> Option<(u64, &[u8])> {
            let rsdp = self.slice_at(self.rsdp_addr, RSDP_LEN)?;
            let xsdt_addr = read_u64(rsdp, 24)?;
            let xsdt = self.table_at(xsdt_addr)?;
            if signature == b"XSDT" {
                return Some((xsdt_addr, xsdt));
            }
            let entries = xsdt.get(HEADER_LEN..)?;
            for entry in entries.chunks_exact(8) {
                let addr = read_u64(entry, 0)?;
                let table = self.table_at(addr)?;
                if table.get(0..4)? == signature {
                    return Some((addr, table));
                }
                if signature == b"DSDT" && table.get(0..4)? == b"FACP" {
                    let dsdt_addr = read_u64(table, 140)?;
                    return Some((dsdt_addr, self.table_at(dsdt_addr)?));
                }
            }
            None
        }

        fn slice_at(&self, addr: u64, len: usize) -> Option<&[u8]> {
            let offset = usize::try_from(addr.checked_sub(self.base)?).ok()?;
            self.bytes.get(offset..offset.checked_add(len)?)
        }

        /// A table at `addr`, sized by its header's length field.
        fn table_at(&self, addr: u64) -> Option<&[u8]> {
            let header = self.slice_at(addr, HEADER_LEN)?;
            let len = usize::try_from(read_u32(header, 4)?).ok()?;
            self.slice_at(addr, len)
        }
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        read_u32(bytes, offset).unwrap()
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        read_u64(bytes, offset).unwrap()
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// 2 GiB guest like the VMM's: low RAM only.
    fn config(cpus: u8) -> AcpiConfig {
        AcpiConfig::new(cpus, vec![(0, 2 << 30)])
    }

    fn tables(cpus: u8) -> AcpiTables {
        create_acpi_tables(&config(cpus)).unwrap()
    }

    /// The MADT's interrupt controller structures as (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut entries = Vec::new();
        let mut offset = HEADER_LEN + 8;
        while offset < madt.len() {
            let len = madt[offset + 1] as usize;
            assert!(len >= 2, "zero-length MADT entry");
            entries.push((madt[offset], &madt[offset..offset + len]));
            offset += len;
        }
        assert_eq!(offset, madt.len());
        entries
    }

    const ALL_SIGNATURES: [&[u8; 4]; 6] = [b"XSDT", b"FACP", b"DSDT", b"APIC", b"MCFG", b"SRAT"];

    #[test]
    fn every_table_checksums_to_zero_and_length_matches() {
        let t = tables(4);
        for sig in ALL_SIGNATURES {
            let (addr, table) = t
                .find_table(sig)
                .unwrap_or_else(|| panic!("{sig:?} missing"));
            assert_eq!(&table[0..4], sig);
            assert_eq!(u32_at(table, 4) as usize, table.len(), "{sig:?} length");
            assert_eq!(sum(table), 0, "{sig:?} checksum");
            assert_eq!(addr % TABLE_ALIGN as u64, 0, "{sig:?} alignment");
        }
    }

    #[test]
    fn rsdp_is_first_with_both_checksums() {
        let t = tables(1);
        assert_eq!(t.base, layout::ACPI_START);
        assert_eq!(t.rsdp_addr, layout::ACPI_START);
        let rsdp = &t.bytes[..RSDP_LEN];
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(sum(&rsdp[..20]), 0, "v1 checksum over 20 bytes");
        assert_eq!(u32_at(rsdp, 20), 36, "length");
        assert_eq!(sum(&rsdp[..36]), 0, "extended checksum over 36 bytes");
        assert_eq!(u32_at(rsdp, 16), 0, "no RSDT");
        let xsdt_addr = u64_at(rsdp, 24);
        assert_eq!(t.find_table(b"XSDT").unwrap().0, xsdt_addr);
    }

    #[test]
    fn xsdt_points_at_each_table() {
        let t = tables(2);
        let (_, xsdt) = t.find_table(b"XSDT").unwrap();
        let entries: Vec<u64> = xsdt[HEADER_LEN..]
            .chunks_exact(8)
            .map(|e| u64_at(e, 0))
            .collect();
        let expected: [&[u8; 4]; 4] = [b"FACP", b"APIC", b"MCFG", b"SRAT"];
        assert_eq!(entries.len(), expected.len());
        for (addr, sig) in entries.iter().zip(expected) {
            let offset = (addr - t.base) as usize;
            assert_eq!(&t.bytes[offset..offset + 4], sig);
            assert_eq!(t.find_table(sig).unwrap().0, *addr);
        }
        // Everything lies inside the image and the image inside the ACPI area.
        assert!(t.bytes.len() as u64 <= layout::ACPI_SIZE);
    }

    #[test]
    fn madt_describes_cpus_ioapic_and_nmi() {
        let t = tables(8);
        let (_, madt) = t.find_table(b"APIC").unwrap();
        assert_eq!(u32_at(madt, 36), 0xfee0_0000, "local APIC address");
        assert_eq!(u32_at(madt, 40) & MADT_PCAT_COMPAT, MADT_PCAT_COMPAT);
        let entries = madt_entries(madt);

        let lapics: Vec<&[u8]> = entries
            .iter()
            .filter(|(ty, _)| *ty == 0)
            .map(|(_, e)| *e)
            .collect();
        assert_eq!(lapics.len(), 8);
        for (i, lapic) in lapics.iter().enumerate() {
            assert_eq!(lapic.len(), 8);
            assert_eq!(lapic[2] as usize, i, "processor UID");
            assert_eq!(lapic[3] as usize, i, "APIC ID");
            assert_eq!(u32_at(lapic, 4), 1, "enabled");
        }

        let ioapics: Vec<&[u8]> = entries
            .iter()
            .filter(|(ty, _)| *ty == 1)
            .map(|(_, e)| *e)
            .collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0].len(), 12);
        assert_eq!(ioapics[0][2], 0, "IOAPIC ID");
        assert_eq!(u32_at(ioapics[0], 4), 0xfec0_0000);
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");

        let nmis: Vec<&[u8]> = entries
            .iter()
            .filter(|(ty, _)| *ty == 4)
            .map(|(_, e)| *e)
            .collect();
        assert_eq!(nmis, vec![&[4u8, 6, 0xff, 0, 0, 1][..]]);

        assert!(
            !entries.iter().any(|(ty, _)| *ty == 2),
            "no override by default"
        );
    }

    #[test]
    fn madt_irq0_override_when_asked() {
        let mut cfg = config(1);
        cfg.irq0_override_gsi = Some(2);
        let t = create_acpi_tables(&cfg).unwrap();
        let (_, madt) = t.find_table(b"APIC").unwrap();
        let isos: Vec<(u8, &[u8])> = madt_entries(madt)
            .into_iter()
            .filter(|(ty, _)| *ty == 2)
            .collect();
        assert_eq!(isos.len(), 1);
        let iso = isos[0].1;
        assert_eq!(iso.len(), 10);
        assert_eq!((iso[2], iso[3]), (0, 0), "ISA bus, IRQ0");
        assert_eq!(u32_at(iso, 4), 2, "GSI");
        assert_eq!(u16_at(iso, 8), 0b0101, "edge, active high");
        assert_eq!(sum(madt), 0);

        cfg.irq0_override_gsi = Some(24);
        assert_eq!(create_acpi_tables(&cfg), Err(AcpiError::InvalidGsi(24)));
    }

    #[test]
    fn mcfg_has_one_ecam_allocation() {
        let t = tables(1);
        let (_, mcfg) = t.find_table(b"MCFG").unwrap();
        assert_eq!(mcfg.len(), HEADER_LEN + 8 + 16);
        let entry = &mcfg[HEADER_LEN + 8..];
        assert_eq!(u64_at(entry, 0), 0xe000_0000);
        assert_eq!(u16_at(entry, 8), 0, "segment");
        assert_eq!((entry[10], entry[11]), (0, 255), "bus range");
    }

    #[test]
    fn fadt_is_hw_reduced_with_reset_and_sleep_registers() {
        let t = tables(1);
        let (_, fadt) = t.find_table(b"FACP").unwrap();
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!(fadt[8], 6, "major revision");
        assert_eq!(fadt[131], 5, "minor revision");

        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_ne!(flags & (1 << 4), 0, "PWR_BUTTON (no fixed button)");
        assert_ne!(flags & (1 << 5), 0, "SLP_BUTTON (no fixed button)");

        let iapc = u16_at(fadt, 109);
        assert_eq!(iapc & (1 << 1), 0, "no 8042");
        assert_ne!(iapc & (1 << 0), 0, "legacy devices");
        assert_ne!(iapc & (1 << 2), 0, "VGA not present");
        assert_eq!(iapc & (1 << 3), 0, "MSI supported");
        assert_ne!(iapc & (1 << 4), 0, "PCIe ASPM controls");
        assert_ne!(iapc & (1 << 5), 0, "CMOS RTC not present");

        // GAS: space 1 (system I/O), 8 bits wide, offset 0, byte access, address.
        let gas = |offset: usize| (&fadt[offset..offset + 4], u64_at(fadt, offset + 4));
        assert_eq!(gas(116), (&[1u8, 8, 0, 1][..], 0x3c2), "RESET_REG");
        assert_eq!(fadt[128], 0x01, "RESET_VALUE");
        assert_eq!(gas(244), (&[1u8, 8, 0, 1][..], 0x3c0), "SLEEP_CONTROL_REG");
        assert_eq!(gas(256), (&[1u8, 8, 0, 1][..], 0x3c1), "SLEEP_STATUS_REG");

        assert_eq!(u32_at(fadt, 36), 0, "no FACS");
        assert_eq!(u64_at(fadt, 132), 0, "no X_FACS");
        assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT unused");
        let (dsdt_addr, dsdt) = t.find_table(b"DSDT").unwrap();
        assert_eq!(u64_at(fadt, 140), dsdt_addr, "X_DSDT");
        assert_eq!(&dsdt[0..4], b"DSDT");
    }

    #[test]
    fn fadt_cmos_rtc_flag_follows_config() {
        let mut cfg = config(1);
        cfg.cmos_rtc = true;
        let t = create_acpi_tables(&cfg).unwrap();
        let (_, fadt) = t.find_table(b"FACP").unwrap();
        assert_eq!(u16_at(fadt, 109) & (1 << 5), 0);
    }

    #[test]
    fn dsdt_contains_the_devices() {
        let t = tables(3);
        let (_, dsdt) = t.find_table(b"DSDT").unwrap();
        assert_eq!(dsdt[8], DSDT_REVISION);
        // EisaId encodings (DWordPrefix + compressed id).
        for id in [
            [0x41u8, 0xd0, 0x0a, 0x08], // PNP0A08
            [0x41, 0xd0, 0x0a, 0x03],   // PNP0A03
            [0x41, 0xd0, 0x0c, 0x02],   // PNP0C02
            [0x41, 0xd0, 0x05, 0x01],   // PNP0501
        ] {
            let mut needle = vec![0x0c];
            needle.extend_from_slice(&id);
            assert!(contains(dsdt, &needle), "EisaId {id:02x?}");
        }
        for name in [
            &b"\\_SB_"[..],
            b"PCI0",
            b"MRES",
            b"COM1",
            b"COM2",
            b"COM3",
            b"_SEG",
            b"_BBN",
            b"_OSC",
            b"C000",
            b"C002",
            b"ACPI0007\0",
        ] {
            assert!(contains(dsdt, name), "{}", String::from_utf8_lossy(name));
        }
        assert!(!contains(dsdt, b"C003"));
        assert!(!contains(dsdt, b"_ADR"));
        // Name (_S5_, Package (4) { 5, 0, 0, 0 }).
        assert!(contains(
            dsdt,
            &[
                0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0x00, 0x00, 0x00
            ]
        ));
        // Memory32Fixed (ReadWrite, 0xE0000000, 0x10000000).
        assert!(contains(
            dsdt,
            &[
                0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xe0, 0x00, 0x00, 0x00, 0x10
            ]
        ));
        // COM1: IO (Decode16, 0x3F8, 0x3F8, 1, 8) then IRQ (Edge, ActiveHigh, Shared) {4}.
        assert!(contains(
            dsdt,
            &[
                0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, 0x23, 0x10, 0x00, 0x11
            ]
        ));
        // COM2: IRQNoFlags {3}.
        assert!(contains(
            dsdt,
            &[
                0x47, 0x01, 0xf8, 0x02, 0xf8, 0x02, 0x01, 0x08, 0x22, 0x08, 0x00
            ]
        ));
    }

    #[test]
    fn dsdt_host_bridge_windows() {
        let t = tables(1);
        let (_, dsdt) = t.find_table(b"DSDT").unwrap();
        // WordBusNumber 0..255: type 2, min 0, max 255, length 256.
        let mut bus = vec![
            0x88, 0x0d, 0x00, 0x02, 0x0c, 0x00, 0, 0, 0, 0, 0xff, 0, 0, 0,
        ];
        bus.extend_from_slice(&256u16.to_le_bytes());
        assert!(contains(dsdt, &bus));
        // DWordMemory 0xC0000000..0xDFFFFFFF.
        let mut mmio32 = 0xc000_0000u32.to_le_bytes().to_vec();
        mmio32.extend_from_slice(&0xdfff_ffffu32.to_le_bytes());
        assert!(contains(dsdt, &mmio32));
        // QWordMemory over the 64-bit window.
        let mut mmio64 = crate::layout::PCI_MMIO64_START.to_le_bytes().to_vec();
        mmio64.extend_from_slice(
            &(crate::layout::PCI_MMIO64_START + crate::layout::PCI_MMIO64_SIZE - 1).to_le_bytes(),
        );
        assert!(contains(dsdt, &mmio64));
        // WordIO 0x0D00..0xFFFF.
        let mut io = 0x0d00u16.to_le_bytes().to_vec();
        io.extend_from_slice(&0xffffu16.to_le_bytes());
        assert!(contains(dsdt, &io));
    }

    #[test]
    fn srat_puts_cpus_and_ram_on_node_0_and_extra_ranges_on_theirs() {
        let mut cfg = AcpiConfig::new(2, vec![(0, 3 << 30), (1 << 32, 1 << 30)]);
        cfg.extra_memory_affinity.push(MemoryAffinityRange {
            base: 0x200_0000_0000,
            size: 1 << 30,
            proximity_domain: 1,
            hot_pluggable: true,
            non_volatile: false,
        });
        let t = create_acpi_tables(&cfg).unwrap();
        let (_, srat) = t.find_table(b"SRAT").unwrap();
        assert_eq!(srat[8], SRAT_REVISION);
        assert_eq!(u32_at(srat, 36), 1, "reserved 1");
        let mut offset = HEADER_LEN + 12;
        let mut cpus = Vec::new();
        let mut memory = Vec::new();
        while offset < srat.len() {
            let (ty, len) = (srat[offset], srat[offset + 1] as usize);
            let entry = &srat[offset..offset + len];
            match ty {
                0 => {
                    assert_eq!(len, 16);
                    let domain = u32::from_le_bytes([entry[2], entry[9], entry[10], entry[11]]);
                    cpus.push((entry[3], domain, u32_at(entry, 4)));
                }
                1 => {
                    assert_eq!(len, 40);
                    memory.push((
                        u32_at(entry, 2),
                        u64_at(entry, 8),
                        u64_at(entry, 16),
                        u32_at(entry, 28),
                    ));
                }
                _ => panic!("unexpected SRAT entry type {ty}"),
            }
            offset += len;
        }
        assert_eq!(offset, srat.len());
        assert_eq!(cpus, vec![(0, 0, 1), (1, 0, 1)]);
        assert_eq!(
            memory,
            vec![
                (0, 0, 3 << 30, 1),
                (0, 1 << 32, 1 << 30, 1),
                (1, 0x200_0000_0000, 1 << 30, 0b11),
            ]
        );
    }

    #[test]
    fn no_srat_without_memory_ranges() {
        let t = create_acpi_tables(&AcpiConfig::new(1, Vec::new())).unwrap();
        assert!(t.find_table(b"SRAT").is_none());
        assert!(t.find_table(b"APIC").is_some());
    }

    #[test]
    fn fits_for_1_to_32_cpus_and_up_to_255() {
        for cpus in (1..=32).chain([64, 128, u8::MAX]) {
            let t = tables(cpus);
            assert!(t.bytes.len() as u64 <= layout::ACPI_SIZE, "{cpus} CPUs");
            let (_, madt) = t.find_table(b"APIC").unwrap();
            let lapics = madt_entries(madt).iter().filter(|(ty, _)| *ty == 0).count();
            assert_eq!(lapics, cpus as usize);
            for sig in ALL_SIGNATURES {
                let (_, table) = t.find_table(sig).unwrap();
                assert_eq!(sum(table), 0, "{sig:?} with {cpus} CPUs");
            }
        }
    }

    #[test]
    fn impossible_configs_fail_cleanly() {
        assert_eq!(
            create_acpi_tables(&AcpiConfig::new(0, vec![(0, 1 << 30)])),
            Err(AcpiError::NoCpus)
        );

        // More SRAT entries than the ACPI area can hold.
        let many: Vec<(u64, u64)> = (0..4000u64)
            .map(|i| (layout::HIGH_RAM_START + (i << 21), 1 << 20))
            .collect();
        assert!(matches!(
            create_acpi_tables(&AcpiConfig::new(1, many)),
            Err(AcpiError::TooLarge { .. })
        ));

        // Extra AML that cannot fit.
        let mut cfg = config(1);
        cfg.extra_dsdt_aml = vec![0; layout::ACPI_SIZE as usize];
        assert!(matches!(
            create_acpi_tables(&cfg),
            Err(AcpiError::TooLarge { .. })
        ));

        let overlapping = AcpiConfig::new(1, vec![(0, 1 << 30), (1 << 29, 1 << 30)]);
        assert!(matches!(
            create_acpi_tables(&overlapping),
            Err(AcpiError::Overlap { .. })
        ));
        let into_ecam = AcpiConfig::new(1, vec![(0, 0xe800_0000)]);
        assert!(matches!(
            create_acpi_tables(&into_ecam),
            Err(AcpiError::Overlap { .. })
        ));
        for bad in [(0, 0), (u64::MAX, 2)] {
            assert!(matches!(
                create_acpi_tables(&AcpiConfig::new(1, vec![bad])),
                Err(AcpiError::InvalidRange { .. })
            ));
        }

        let mut cfg = config(1);
        cfg.pci_segment.bus_start = 10;
        cfg.pci_segment.bus_end = 9;
        assert_eq!(
            create_acpi_tables(&cfg),
            Err(AcpiError::InvalidBusRange { start: 10, end: 9 })
        );

        let mut cfg = config(1);
        cfg.pci_segment.ecam_base = 0xe000_1000;
        assert_eq!(
            create_acpi_tables(&cfg),
            Err(AcpiError::EcamMisaligned(0xe000_1000))
        );

        let mut cfg = config(1);
        cfg.pci_segment.ecam_base = 0xfff0_0000;
        assert!(matches!(
            create_acpi_tables(&cfg),
            Err(AcpiError::EcamAbove4G { .. })
        ));

        for (base, size) in [(0xc000_0000, 0), (0xc000_0000, 0x8000_0000), (0, 1 << 32)] {
            let mut cfg = config(1);
            cfg.pci_segment.mmio32_base = base;
            cfg.pci_segment.mmio32_size = size;
            assert!(matches!(
                create_acpi_tables(&cfg),
                Err(AcpiError::InvalidRange { .. } | AcpiError::Overlap { .. })
            ));
        }

        let mut cfg = config(1);
        cfg.pci_segment.mmio64_base = u64::MAX;
        assert!(matches!(
            create_acpi_tables(&cfg),
            Err(AcpiError::InvalidRange { .. })
        ));
    }

    #[test]
    fn edge_configs_do_not_panic() {
        // A window ending at 4 GiB runs into the APIC pages: an error, not a panic.
        let mut cfg = config(1);
        cfg.pci_segment.mmio32_base = 0xf000_0000;
        cfg.pci_segment.mmio32_size = 0x1000_0000;
        assert!(matches!(
            create_acpi_tables(&cfg),
            Err(AcpiError::Overlap {
                second: "IOAPIC",
                ..
            })
        ));

        // Window ending at u64::MAX, no 64-bit window, a single bus.
        let mut cfg = AcpiConfig::new(u8::MAX, vec![(0, 1 << 30)]);
        cfg.pci_segment.mmio32_base = 0xf000_0000;
        cfg.pci_segment.mmio32_size = 0x0ec0_0000;
        cfg.pci_segment.mmio64_base = u64::MAX - 0xfff;
        cfg.pci_segment.mmio64_size = 0x1000;
        cfg.pci_segment.bus_start = 255;
        cfg.pci_segment.bus_end = 255;
        cfg.pci_segment.ecam_base = 0x8000_0000;
        let t = create_acpi_tables(&cfg).unwrap();
        assert_eq!(cfg.pci_segment.ecam_region(), (0x8ff0_0000, 1 << 20));
        let (_, mcfg) = t.find_table(b"MCFG").unwrap();
        assert_eq!(u64_at(mcfg, HEADER_LEN + 8), 0x8000_0000);

        cfg.pci_segment.mmio64_size = 0;
        let t = create_acpi_tables(&cfg).unwrap();
        let (_, dsdt) = t.find_table(b"DSDT").unwrap();
        assert_eq!(sum(dsdt), 0);
    }

    fn extra_table(signature: &[u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut sdt = Sdt::new(
            *signature,
            HEADER_LEN as u32,
            1,
            OEM_ID,
            table_id(signature),
            1,
        );
        sdt.append_slice(payload);
        sdt.as_slice().to_vec()
    }

    #[test]
    fn extra_tables_and_aml_are_linked() {
        let mut cfg = config(1);
        cfg.extra_tables.push(extra_table(b"DMAR", &[0x26, 0x01]));
        cfg.extra_tables.push(extra_table(b"CEDT", &[]));
        // Name (XTRA, 0x2A)
        cfg.extra_dsdt_aml = vec![0x08, b'X', b'T', b'R', b'A', 0x0a, 0x2a];
        let t = create_acpi_tables(&cfg).unwrap();
        let (_, dmar) = t.find_table(b"DMAR").unwrap();
        assert_eq!(&dmar[HEADER_LEN..], &[0x26, 0x01]);
        assert!(t.find_table(b"CEDT").is_some());
        let (_, dsdt) = t.find_table(b"DSDT").unwrap();
        assert!(dsdt.ends_with(&cfg.extra_dsdt_aml));
        assert_eq!(sum(dsdt), 0);
    }

    #[test]
    fn bad_extra_tables_are_rejected() {
        let good = extra_table(b"DMAR", &[1, 2, 3]);
        let mut bad_sum = good.clone();
        bad_sum[38] ^= 1;
        let mut bad_len = good.clone();
        bad_len.push(0);
        let cases: [(Vec<u8>, &str); 4] = [
            (vec![0; 10], "shorter than a table header"),
            (bad_len, "header length differs from the table size"),
            (bad_sum, "checksum does not sum to zero"),
            (
                extra_table(b"APIC", &[]),
                "signature clashes with a built-in table",
            ),
        ];
        for (table, reason) in cases {
            let mut cfg = config(1);
            cfg.extra_tables.push(table);
            assert_eq!(
                create_acpi_tables(&cfg),
                Err(AcpiError::InvalidExtraTable { index: 0, reason })
            );
        }
    }

    #[test]
    fn find_table_survives_garbage() {
        let mut t = tables(1);
        // Point the XSDT entry list at nonsense.
        let (xsdt_addr, _) = t.find_table(b"XSDT").unwrap();
        let offset = (xsdt_addr - t.base) as usize;
        t.bytes[offset + 4..offset + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(t.find_table(b"APIC").is_none());
        t.bytes.truncate(10);
        assert!(t.find_table(b"XSDT").is_none());
    }

    /// Manual check, not part of the normal run: needs `iasl` from acpica-tools
    /// (`apt-get install acpica-tools`). Run with
    /// `cargo test -p vmm acpi::tests::iasl_disassembles_tables -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs iasl (acpica-tools); run manually with --ignored"]
    fn iasl_disassembles_tables() {
        let mut cfg = AcpiConfig::new(4, vec![(0, 3 << 30), (1 << 32, 1 << 30)]);
        cfg.irq0_override_gsi = Some(2);
        let t = create_acpi_tables(&cfg).unwrap();
        let dir = std::env::temp_dir().join(format!("acpi-iasl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for sig in ALL_SIGNATURES {
            let (_, table) = t.find_table(sig).unwrap();
            let name = String::from_utf8_lossy(sig).to_lowercase();
            let path = dir.join(format!("{name}.dat"));
            std::fs::write(&path, table).unwrap();
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&path)
                .output()
                .expect("iasl not found: apt-get install acpica-tools");
            let log = String::from_utf8_lossy(&out.stderr).to_string()
                + &String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "iasl -d {name}: {log}");
            let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
            println!("==== {name} ====\n{dsl}");
            assert!(!log.contains("rror"), "iasl -d {name}: {log}");
        }
        let dsdt = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        for expected in [
            "EisaId (\"PNP0A08\")",
            "EisaId (\"PNP0C02\")",
            "Name (_S5, Package",
            "Method (_OSC, 4",
            "Memory32Fixed (ReadWrite,",
        ] {
            assert!(dsdt.contains(expected), "{expected}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
