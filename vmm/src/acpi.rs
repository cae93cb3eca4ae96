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
//!                                   \_SB.Cnnn (ACPI0007 processors), \_S5_, caller's extra AML;
//!                                   with CXL: PCI0 is an ACPI0016 host bridge, \_SB.CXLM
//!             FACP (FADT rev 6.5)   HW-reduced, reset + sleep registers, X_DSDT -> DSDT
//!             APIC (MADT)           local APICs, IOAPIC, LAPIC NMI (LINT1)
//!             MCFG                  one ECAM allocation
//!             SRAT                  CPU and memory affinity (when memory ranges are given)
//!             HMAT                  latency and bandwidth of RAM and CXL memory, when the SRAT
//!                                   gives a CXL window its own proximity domain
//!             CEDT                  CXL host bridges (CHBS) and fixed memory windows (CFMWS),
//!                                   only with [`AcpiConfig::cxl`]
//!             caller's extra tables (e.g. DMAR)
//!             XSDT                  -> FACP, APIC, MCFG, SRAT, HMAT, CEDT, extra tables
//! ```
//! Every table starts 16-byte aligned. Without [`AcpiConfig::cxl`] the tables are byte for byte
//! those of a build without CXL support.
//!
//! # CXL (Compute Express Link 2.0)
//! With [`CxlConfig`] the machine describes one CXL 2.0 host bridge the way Linux's `cxl_acpi`
//! expects (CXL 2.0 §9.14 "ACPI"; the CEDT is CXL 2.0 §9.14.1, its signature reserved in ACPI 6.5 Table 5.6):
//! - the single PCIe root `\_SB.PCI0` (segment 0, root bus 0) becomes the CXL host bridge:
//!   `_HID "ACPI0016"`, `_CID { PNP0A08, PNP0A03 }`, `_UID` = the CHBS UID, `_PXM 0` (the RAM and
//!   CPU domain: the window's node would otherwise leave PCI on no node). Linux's PCI root driver
//!   binds through the `_CID`, treats the bridge as PCIe (`ACPI_BRIDGE_TYPE_CXL`,
//!   drivers/acpi/pci_root.c) and negotiates `_OSC` with the CXL UUID; `cxl_acpi` walks ACPI0016
//!   devices, takes their PCI root bus (`acpi_pci_find_root`) and finds the CHBS by `_UID`
//!   (drivers/cxl/acpi.c). CXL root ports sit on bus 0 next to the existing ones;
//! - `_OSC` answers the CXL UUID (5 dwords: the PCIe control dword as for the PCIe UUID, and
//!   CXL memory error reporting control, CDW5 bit 0) as well as the PCIe UUID;
//! - `\_SB.CXLM` (`ACPI0017`, the CXL root object `cxl_acpi` binds to), with the QTG `_DSM`;
//! - CEDT revision 1: one CHBS per host bridge (CXL 2.0, CHBCR base, length 64 KiB) and one CFMWS
//!   per window (modulo arithmetic, 256 B host bridge granularity, ways = number of targets);
//! - SRAT (when it is emitted, i.e. RAM ranges are given): one hot-pluggable memory affinity
//!   entry per window on the window's proximity domain, so Linux gives CXL memory its own NUMA
//!   node. Without SRAT Linux still creates a node per CFMWS itself (`acpi_parse_cfmws`);
//! - HMAT revision 2 (with the SRAT): domain 0 (RAM) and each window domain are memory attached
//!   to initiator domain 0 (the CPUs), with read/write latency and bandwidth for DRAM and for a
//!   CXL 2.0 x8 memory expander (see [`build_hmat`]). Linux shows them in
//!   `/sys/devices/system/node/nodeN/access0/initiators/` and ranks the CXL node below DRAM
//!   in its memory tiers.
//!
//! The CEDT is encoded here rather than with `acpi_tables::cedt`: that module (0.2.1) writes the
//! CHBS record length as one byte and leaves out the reserved dword at +0xC (a 27-byte CHBS), and
//! its `cxl_type_3_memory()` sets the Type 2 restriction bit.
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

/// CEDT revision (CXL 2.0 §9.14.1).
const CEDT_REVISION: u8 = 1;
/// CEDT structure types and lengths (CXL 2.0 §9.14.1.2, §9.14.1.3).
const CEDT_TYPE_CHBS: u8 = 0;
const CEDT_CHBS_LEN: u16 = 0x20;
const CEDT_TYPE_CFMWS: u8 = 1;
const CEDT_CFMWS_LEN: usize = 0x24;
/// CHBS "CXL Version": 1 = CXL 2.0 host bridge, whose base is a CHBCR of 64 KiB.
const CHBS_VERSION_CXL20: u32 = 1;
const CXL_CHBCR_LEN: u64 = 0x1_0000;
/// CFMWS base and size granule (and the HDM decoder granule).
const CXL_WINDOW_ALIGN: u64 = 256 << 20;
const _: () = assert!(layout::CXL_CHBCR_SIZE == CXL_CHBCR_LEN);
const _: () = assert!(layout::CXL_CHBCR_START.is_multiple_of(CXL_CHBCR_LEN));
const _: () = assert!(layout::CXL_WINDOW_START.is_multiple_of(CXL_WINDOW_ALIGN));
const _: () = assert!(layout::CXL_WINDOW_MAX_SIZE.is_multiple_of(CXL_WINDOW_ALIGN));
/// `_OSC` UUID of CXL host bridges (CXL 2.0 §9.14.2), 5 capability dwords: the PCIe ones, then
/// CXL support (CDW4) and CXL control (CDW5).
const CXL_HOST_BRIDGE_OSC_UUID: &str = "68F2D50B-C469-4D8A-BD3D-941A103FD3FC";
/// CXL `_OSC` control bits granted to the OS: CXL memory error reporting (CDW5 bit 0).
const CXL_OSC_GRANTED_CONTROL: u8 = 0x01;
/// `_OSC` status bit: `_OSC` failure (§6.2.11).
const OSC_FAILURE: u8 = 1 << 1;
/// `_DSM` UUID of the CXL root object's QoS throttling group query (CXL 3.0 §9.17.3.1; Linux
/// `acpi_cxl_qtg_id_guid`).
const CXL_QTG_DSM_UUID: &str = "F365F9A6-A7DE-4071-A66A-B40C0B4F8E52";
/// `_STA` of `\_SB.CXLM`: present, enabled, functioning, not shown in UI.
const CXL_ROOT_STA: u8 = 0x0b;

/// HMAT revision 2 (ACPI 6.3 and later, §5.2.28): latencies are in picoseconds, and the Memory
/// Proximity Domain Attributes structure carries no address range.
const HMAT_REVISION: u8 = 2;
/// HMAT header: the common table header, then 4 reserved bytes (§5.2.28).
const HMAT_HEADER_LEN: usize = HEADER_LEN + 4;
/// Memory Proximity Domain Attributes structure (§5.2.28.3).
const HMAT_TYPE_PROXIMITY_DOMAIN: u16 = 0;
const HMAT_PROXIMITY_DOMAIN_LEN: u32 = 40;
/// Its flag "Initiator Proximity Domain Valid": the memory is attached to the initiator in that
/// domain (Linux then reports that domain as the memory's local initiator).
const HMAT_INITIATOR_DOMAIN_VALID: u16 = 1 << 0;
/// System Locality Latency and Bandwidth Information structure (§5.2.28.4): this
/// fixed part, then the initiator and target domain lists (4 bytes each) and the 2-byte entries
/// (row = initiator, column = target).
const HMAT_TYPE_LOCALITY: u16 = 1;
const HMAT_LOCALITY_FIXED_LEN: usize = 32;
/// Its flags: memory hierarchy 0 = the memory itself (not a memory-side cache); no access
/// attributes (minimum transfer size, non-sequential transfers).
const HMAT_HIERARCHY_MEMORY: u8 = 0;
/// Its data types ("Data Type", §5.2.28.4).
const HMAT_READ_LATENCY: u8 = 1;
const HMAT_WRITE_LATENCY: u8 = 2;
const HMAT_READ_BANDWIDTH: u8 = 4;
const HMAT_WRITE_BANDWIDTH: u8 = 5;
/// Entry base units: in revision 2 a latency is `entry × base` picoseconds and a bandwidth
/// `entry × base` MB/s. With these bases the entries are nanoseconds and MB/s, which is what Linux
/// reports (drivers/acpi/numa/hmat.c `hmat_normalize` rounds latencies up to nanoseconds).
const HMAT_LATENCY_BASE_UNIT_PS: u64 = 1000;
const HMAT_BANDWIDTH_BASE_UNIT_MBPS: u64 = 1;

/// Performance the HMAT states for the CPUs (proximity domain 0) reaching each memory. These are
/// plausible figures for the hardware the machine models, not measurements: in the VM both kinds
/// of memory are host RAM behind KVM memory slots.
///
/// RAM (domain 0): DRAM on the CPUs' own memory controller, ~100 ns idle load-to-use latency
/// and ~20 GB/s (about a DDR4-3200 channel's sustained rate).
const DRAM_LATENCY_NS: u16 = 100;
const DRAM_BANDWIDTH_MBPS: u16 = 20_000;
/// CXL windows (their own domains): a CXL 2.0 Type 3 memory expander on an x8 link (32 GT/s,
/// 32 GB/s raw per direction), ~250 ns (the DRAM access plus the CXL root port, link and device
/// controller round trip) and ~16 GB/s deliverable after flit and protocol overhead.
const CXL_X8_LATENCY_NS: u16 = 250;
const CXL_X8_BANDWIDTH_MBPS: u16 = 16_000;
// Entries 0 ("not provided") and 0xFFFF ("unreachable") mean something else.
const _: () = assert!(DRAM_LATENCY_NS != 0 && DRAM_LATENCY_NS != u16::MAX);
const _: () = assert!(DRAM_BANDWIDTH_MBPS != 0 && DRAM_BANDWIDTH_MBPS != u16::MAX);
const _: () = assert!(CXL_X8_LATENCY_NS != 0 && CXL_X8_LATENCY_NS != u16::MAX);
const _: () = assert!(CXL_X8_BANDWIDTH_MBPS != 0 && CXL_X8_BANDWIDTH_MBPS != u16::MAX);

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
    #[error("CXL: {0}")]
    InvalidCxl(&'static str),
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

/// A CXL 2.0 host bridge: CEDT CHBS, and the `_UID` of the ACPI0016 host bridge `\_SB.PCI0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CxlHostBridgeConfig {
    /// ACPI `_UID` of the host bridge; CFMWS windows name it as a target.
    pub uid: u32,
    /// Host bridge component registers (CHBCR): a 64 KiB block, 64 KiB aligned, non-zero.
    pub chbcr_base: u64,
}

/// CFMWS window restriction bits (CXL 2.0 Table 9-22; ACPI `ACPI_CEDT_CFMWS_RESTRICT_*`).
// The CXL API is used by the CXL device's wiring (in progress) and the tests.
#[allow(dead_code)]
pub const CXL_WINDOW_TYPE2: u16 = 1 << 0;
pub const CXL_WINDOW_TYPE3: u16 = 1 << 1;
pub const CXL_WINDOW_VOLATILE: u16 = 1 << 2;
pub const CXL_WINDOW_PMEM: u16 = 1 << 3;
#[allow(dead_code)]
pub const CXL_WINDOW_FIXED: u16 = 1 << 4;
/// Type 3 memory, volatile and persistent: Linux offers both `create_ram_region` and
/// `create_pmem_region` on the root decoder.
pub const CXL_WINDOW_DEFAULT_RESTRICTIONS: u16 =
    CXL_WINDOW_TYPE3 | CXL_WINDOW_VOLATILE | CXL_WINDOW_PMEM;

/// A CXL fixed memory window (CEDT CFMWS): host physical addresses the HDM decoders map device
/// memory into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CxlWindowConfig {
    /// Base and size, both 256 MiB aligned, size non-zero.
    pub base: u64,
    pub size: u64,
    /// Host bridge UIDs the window interleaves across (1, 2, 4, 8, 16, 3, 6 or 12 of them);
    /// each must be a configured host bridge.
    pub targets: Vec<u32>,
    /// `CXL_WINDOW_*` bits; [`CXL_WINDOW_DEFAULT_RESTRICTIONS`] by default.
    pub restrictions: u16,
    /// QoS throttling group.
    pub qtg_id: u16,
    /// SRAT proximity domain of the window (its NUMA node).
    pub proximity_domain: u32,
}

#[allow(dead_code)] // Used by the CXL device's wiring (in progress) and the tests.
impl CxlWindowConfig {
    /// A window over `targets` with the default restrictions and QTG 0.
    pub fn new(base: u64, size: u64, targets: Vec<u32>, proximity_domain: u32) -> Self {
        Self {
            base,
            size,
            targets,
            restrictions: CXL_WINDOW_DEFAULT_RESTRICTIONS,
            qtg_id: 0,
            proximity_domain,
        }
    }
}

/// CXL topology described by the tables (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CxlConfig {
    /// Exactly one today: the host bridge is `\_SB.PCI0`, the only PCI root.
    pub host_bridges: Vec<CxlHostBridgeConfig>,
    pub windows: Vec<CxlWindowConfig>,
}

#[allow(dead_code)] // Used by the CXL device's wiring (in progress) and the tests.
impl CxlConfig {
    /// The layout's CXL machine: host bridge UID 0 with its CHBCR at
    /// [`layout::CXL_CHBCR_START`], one window of `window_size` bytes at
    /// [`layout::CXL_WINDOW_START`] on `proximity_domain`.
    pub fn from_layout(window_size: u64, proximity_domain: u32) -> Self {
        Self {
            host_bridges: vec![CxlHostBridgeConfig {
                uid: 0,
                chbcr_base: layout::CXL_CHBCR_START,
            }],
            windows: vec![CxlWindowConfig::new(
                layout::CXL_WINDOW_START,
                window_size,
                vec![0],
                proximity_domain,
            )],
        }
    }
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
    /// AML appended to the DSDT after the built-in objects.
    pub extra_dsdt_aml: Vec<u8>,
    /// CXL host bridge and fixed memory windows: CEDT, ACPI0016/ACPI0017 in the DSDT, SRAT
    /// entries and the HMAT. `None` leaves every table as it is without CXL.
    pub cxl: Option<CxlConfig>,
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
            cxl: None,
        }
    }

    /// The configured SRAT memory affinity entries: RAM on domain 0, then the extra ones.
    fn base_memory_affinity(&self) -> Vec<MemoryAffinityRange> {
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

    /// All SRAT memory affinity entries: [`Self::base_memory_affinity`], then one hot-pluggable
    /// entry per CXL window. The windows are added only when there is a SRAT anyway: a SRAT
    /// covering none of the E820 RAM makes Linux ignore it altogether.
    fn memory_affinity(&self) -> Vec<MemoryAffinityRange> {
        let mut ranges = self.base_memory_affinity();
        if let (false, Some(cxl)) = (ranges.is_empty(), &self.cxl) {
            ranges.extend(cxl.windows.iter().map(|w| MemoryAffinityRange {
                base: w.base,
                size: w.size,
                proximity_domain: w.proximity_domain,
                hot_pluggable: true,
                non_volatile: false,
            }));
        }
        ranges
    }

    /// The CXL windows' proximity domains the HMAT describes next to RAM's domain 0: each
    /// distinct window domain other than 0, in window order. Empty, and then there is no HMAT,
    /// unless the SRAT gives a CXL window a domain of its own, i.e. with CXL windows and RAM
    /// ranges (domain 0 must be in the SRAT too, or Linux ignores the whole HMAT).
    fn hmat_cxl_domains(&self) -> Vec<u32> {
        let mut domains: Vec<u32> = Vec::new();
        if let (false, Some(cxl)) = (self.ram_ranges.is_empty(), &self.cxl) {
            for window in &cxl.windows {
                let domain = window.proximity_domain;
                if domain != 0 && !domains.contains(&domain) {
                    domains.push(domain);
                }
            }
        }
        domains
    }
}

/// The table image: copy `bytes` to guest physical `base`; the RSDP is at `rsdp_addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    pub base: u64,
    pub bytes: Vec<u8>,
    pub rsdp_addr: u64,
}

/// Builds RSDP, XSDT, FADT, MADT, MCFG, SRAT (if there is memory to describe), HMAT (with a CXL
/// window domain in the SRAT), CEDT (with CXL), DSDT and the caller's extra tables, laid out from
/// [`layout::ACPI_START`] with the RSDP first.
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
    let hmat_cxl_domains = cfg.hmat_cxl_domains();
    if !hmat_cxl_domains.is_empty() {
        xsdt_entries.push(image.place(&build_hmat(&hmat_cxl_domains))?);
    }
    if let Some(cxl) = &cfg.cxl {
        xsdt_entries.push(image.place(&build_cedt(cxl))?);
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
    // The CXL windows' SRAT entries repeat the windows, which are checked below.
    for range in cfg.base_memory_affinity() {
        if range_last(range.base, range.size).is_none() {
            return Err(AcpiError::InvalidRange {
                what: "SRAT memory range",
                base: range.base,
                size: range.size,
            });
        }
        regions.push(("SRAT memory range", (range.base, range.size)));
    }
    if let Some(cxl) = &cfg.cxl {
        validate_cxl(cxl)?;
        for hb in &cxl.host_bridges {
            regions.push(("CXL host bridge registers", (hb.chbcr_base, CXL_CHBCR_LEN)));
        }
        for window in &cxl.windows {
            regions.push(("CXL fixed memory window", (window.base, window.size)));
        }
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
        let clashes_with_cxl = (cfg.cxl.is_some() && table.get(0..4) == Some(&b"CEDT"[..]))
            || (!cfg.hmat_cxl_domains().is_empty() && table.get(0..4) == Some(&b"HMAT"[..]));
        if clashes_with_cxl {
            return Err(AcpiError::InvalidExtraTable {
                index,
                reason: "signature clashes with a built-in table",
            });
        }
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

/// Rejects CXL topologies the tables cannot describe or Linux would refuse
/// (drivers/cxl/acpi.c `cxl_acpi_cfmws_verify`, `cxl_get_chbs_iter`).
fn validate_cxl(cxl: &CxlConfig) -> Result<(), AcpiError> {
    // The ACPI0016 host bridge is \_SB.PCI0, the only PCI root: a second CHBS would have no
    // host bridge device to belong to.
    if cxl.host_bridges.len() != 1 {
        return Err(AcpiError::InvalidCxl(
            "exactly one CXL host bridge (\\_SB.PCI0) is supported",
        ));
    }
    for hb in &cxl.host_bridges {
        if hb.chbcr_base == 0
            || !hb.chbcr_base.is_multiple_of(CXL_CHBCR_LEN)
            || range_last(hb.chbcr_base, CXL_CHBCR_LEN).is_none()
        {
            return Err(AcpiError::InvalidRange {
                what: "CXL host bridge registers (CHBCR)",
                base: hb.chbcr_base,
                size: CXL_CHBCR_LEN,
            });
        }
    }
    for window in &cxl.windows {
        if window.size == 0
            || !window.base.is_multiple_of(CXL_WINDOW_ALIGN)
            || !window.size.is_multiple_of(CXL_WINDOW_ALIGN)
            || range_last(window.base, window.size).is_none()
        {
            return Err(AcpiError::InvalidRange {
                what: "CXL fixed memory window (256 MiB aligned)",
                base: window.base,
                size: window.size,
            });
        }
        if cfmws_eniw(window.targets.len()).is_none() {
            return Err(AcpiError::InvalidCxl(
                "a window needs 1, 2, 3, 4, 6, 8, 12 or 16 targets",
            ));
        }
        let known = |uid: &u32| cxl.host_bridges.iter().any(|hb| hb.uid == *uid);
        if !window.targets.iter().all(known) {
            return Err(AcpiError::InvalidCxl(
                "a window targets a UID that is not a configured host bridge",
            ));
        }
        let distinct = window
            .targets
            .iter()
            .enumerate()
            .all(|(i, uid)| !window.targets[..i].contains(uid));
        if !distinct {
            return Err(AcpiError::InvalidCxl(
                "a window names the same host bridge twice",
            ));
        }
    }
    Ok(())
}

/// Signatures this module always generates itself; an extra table must not duplicate them (nor
/// the CEDT or HMAT when those are generated, see [`validate`]).
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

/// HMAT (§5.2.28), revision 2: how fast the CPUs (all on proximity domain 0) reach RAM (domain 0,
/// [`DRAM_LATENCY_NS`], [`DRAM_BANDWIDTH_MBPS`]) and each CXL window domain in `cxl_domains`
/// ([`CXL_X8_LATENCY_NS`], [`CXL_X8_BANDWIDTH_MBPS`]):
///
/// ```text
/// header  36-byte table header, +36 reserved (4)
/// type 0  Memory Proximity Domain Attributes (§5.2.28.3), one per target domain (0, then CXL):
///         +0 type 0, +2 reserved, +4 length 40, +8 flags (bit 0: initiator domain valid),
///         +0xA reserved, +0xC initiator domain 0, +0x10 memory domain, +0x14 reserved (4 + 16)
/// type 1  System Locality Latency and Bandwidth Information (§5.2.28.4), one per data type
///         (read latency, write latency, read bandwidth, write bandwidth):
///         +0 type 1, +2 reserved, +4 length 32 + 4·I + 4·T + 2·I·T, +8 flags (0: memory),
///         +9 data type, +0xA minimum transfer size 0, +0xB reserved, +0xC initiators I = 1,
///         +0x10 targets T, +0x14 reserved, +0x18 entry base unit (ps or MB/s),
///         +0x20 initiator domains {0}, target domains {0, CXL...}, entries [initiator][target]
/// ```
/// Linux (drivers/acpi/numa/hmat.c) needs every memory domain here to be in the SRAT, takes
/// the initiator of a type 0 structure as the memory's local initiator, and shows the type 1
/// values under `/sys/devices/system/node/nodeN/access{0,1}/initiators/` once the node has
/// memory online.
fn build_hmat(cxl_domains: &[u32]) -> Vec<u8> {
    let mut hmat = Sdt::new(
        *b"HMAT",
        HMAT_HEADER_LEN as u32,
        HMAT_REVISION,
        OEM_ID,
        table_id(b"HMAT"),
        OEM_REVISION,
    );
    // (domain, latency entry, bandwidth entry) in the entry base units.
    let targets: Vec<(u32, u16, u16)> = std::iter::once((0, DRAM_LATENCY_NS, DRAM_BANDWIDTH_MBPS))
        .chain(
            cxl_domains
                .iter()
                .map(|&d| (d, CXL_X8_LATENCY_NS, CXL_X8_BANDWIDTH_MBPS)),
        )
        .collect();
    let initiator: u32 = 0;

    let mut body = Vec::new();
    for &(domain, _, _) in &targets {
        body.extend_from_slice(&HMAT_TYPE_PROXIMITY_DOMAIN.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&HMAT_PROXIMITY_DOMAIN_LEN.to_le_bytes());
        body.extend_from_slice(&HMAT_INITIATOR_DOMAIN_VALID.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&initiator.to_le_bytes());
        body.extend_from_slice(&domain.to_le_bytes());
        body.extend_from_slice(&[0; 20]);
    }
    let locality_len = HMAT_LOCALITY_FIXED_LEN + 4 + targets.len() * (4 + 2);
    // (data type, entry base unit, whether the entries are latencies).
    let localities = [
        (HMAT_READ_LATENCY, HMAT_LATENCY_BASE_UNIT_PS, true),
        (HMAT_WRITE_LATENCY, HMAT_LATENCY_BASE_UNIT_PS, true),
        (HMAT_READ_BANDWIDTH, HMAT_BANDWIDTH_BASE_UNIT_MBPS, false),
        (HMAT_WRITE_BANDWIDTH, HMAT_BANDWIDTH_BASE_UNIT_MBPS, false),
    ];
    for (data_type, base_unit, is_latency) in localities {
        body.extend_from_slice(&HMAT_TYPE_LOCALITY.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        // A table too large for the ACPI area is refused when placed, so a length that does not
        // fit 32 bits never reaches the guest.
        body.extend_from_slice(&(locality_len as u32).to_le_bytes());
        body.extend_from_slice(&[HMAT_HIERARCHY_MEMORY, data_type, 0, 0]);
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&(targets.len() as u32).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&base_unit.to_le_bytes());
        body.extend_from_slice(&initiator.to_le_bytes());
        for &(domain, _, _) in &targets {
            body.extend_from_slice(&domain.to_le_bytes());
        }
        for &(_, latency, bandwidth) in &targets {
            let entry = if is_latency { latency } else { bandwidth };
            body.extend_from_slice(&entry.to_le_bytes());
        }
    }
    hmat.append_slice(&body);
    hmat.as_slice().to_vec()
}

/// CFMWS "Encoded Number of Interleave Ways" (ENIW) for `ways` targets (CXL 2.0 §9.14.1.3;
/// 3/6/12-way from CXL 3.0).
fn cfmws_eniw(ways: usize) -> Option<u8> {
    Some(match ways {
        1 => 0,
        2 => 1,
        4 => 2,
        8 => 3,
        16 => 4,
        3 => 8,
        6 => 9,
        12 => 10,
        _ => return None,
    })
}

/// CEDT (ACPI 6.5 §5.2.28, CXL 2.0 §9.14.1), revision 1:
///
/// ```text
/// CHBS  +0 type 0, +2 length 0x20, +4 UID, +8 CXL version (1 = 2.0), +0xC reserved,
///       +0x10 base (CHBCR), +0x18 length 0x10000
/// CFMWS +0 type 1, +2 length 0x24 + 4·ways, +8 base HPA, +0x10 window size,
///       +0x18 ENIW, +0x19 arithmetic (0 modulo), +0x1C HBIG (0 = 256 B), +0x20 restrictions,
///       +0x22 QTG id, +0x24 target UIDs
/// ```
/// The caller validated the configuration (ways, alignment, targets).
fn build_cedt(cxl: &CxlConfig) -> Vec<u8> {
    let mut cedt = Sdt::new(
        *b"CEDT",
        HEADER_LEN as u32,
        CEDT_REVISION,
        OEM_ID,
        table_id(b"CEDT"),
        OEM_REVISION,
    );
    let mut body = Vec::new();
    for hb in &cxl.host_bridges {
        body.extend_from_slice(&[CEDT_TYPE_CHBS, 0]);
        body.extend_from_slice(&CEDT_CHBS_LEN.to_le_bytes());
        body.extend_from_slice(&hb.uid.to_le_bytes());
        body.extend_from_slice(&CHBS_VERSION_CXL20.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&hb.chbcr_base.to_le_bytes());
        body.extend_from_slice(&CXL_CHBCR_LEN.to_le_bytes());
    }
    for window in &cxl.windows {
        // Validated: at most 16 targets, so the length fits and the ENIW exists.
        let len = CEDT_CFMWS_LEN + 4 * window.targets.len();
        let eniw = cfmws_eniw(window.targets.len()).unwrap_or(0);
        body.extend_from_slice(&[CEDT_TYPE_CFMWS, 0]);
        body.extend_from_slice(&(len as u16).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&window.base.to_le_bytes());
        body.extend_from_slice(&window.size.to_le_bytes());
        // ENIW, interleave arithmetic (modulo), reserved.
        body.extend_from_slice(&[eniw, 0, 0, 0]);
        // HBIG: 256 bytes.
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&window.restrictions.to_le_bytes());
        body.extend_from_slice(&window.qtg_id.to_le_bytes());
        for target in &window.targets {
            body.extend_from_slice(&target.to_le_bytes());
        }
    }
    cedt.append_slice(&body);
    cedt.as_slice().to_vec()
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
///   }                                 // with CXL: _HID "ACPI0016", _CID { PNP0A08, PNP0A03 },
///                                     // _UID = CHBS UID, _PXM 0, _OSC also for the CXL UUID
///   Device (CXLM) { _HID "ACPI0017", _STA, _DSM (QTG) }                  // with CXL only
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
    // Validated: with CXL there is exactly one host bridge, \_SB.PCI0.
    let cxl_uid = cfg
        .cxl
        .as_ref()
        .and_then(|cxl| cxl.host_bridges.first())
        .map(|hb| hb.uid);
    let mut sb_children = pci_host_bridge(&cfg.pci_segment, cxl_uid);
    if let Some(cxl) = &cfg.cxl {
        sb_children.extend_from_slice(&cxl_root_device(cxl));
    }
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
///
/// With `cxl_uid` the bridge is also the CXL 2.0 host bridge of that CHBS UID (see the module
/// documentation); without it the bytes are exactly those of a plain PCIe host bridge.
fn pci_host_bridge(pci: &PciSegmentConfig, cxl_uid: Option<u32>) -> Vec<u8> {
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

    let pcie = aml::EISAName::new("PNP0A08");
    let pci_compat = aml::EISAName::new("PNP0A03");
    let segment = u32::from(pci.segment);
    let bbn = u32::from(pci.bus_start);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let seg = aml::Name::new("_SEG".into(), &segment);
    let bbn = aml::Name::new("_BBN".into(), &bbn);
    match cxl_uid {
        None => device(
            "PCI0",
            &[
                &aml::Name::new("_HID".into(), &pcie),
                &aml::Name::new("_CID".into(), &pci_compat),
                &seg,
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &bbn,
                &crs,
                &RawAml(&pci_host_bridge_osc()),
            ],
        ),
        Some(uid) => {
            let hid: &dyn Aml = &"ACPI0016";
            let cids = aml::Package::new(vec![&pcie, &pci_compat]);
            // The CXL window adds a NUMA node; without _PXM Linux leaves the root bus (and every
            // PCI device) on no node and warns "Unknown NUMA node".
            let pxm = aml::Name::new("_PXM".into(), &aml::ZERO);
            device(
                "PCI0",
                &[
                    &aml::Name::new("_HID".into(), hid),
                    &aml::Name::new("_CID".into(), &cids),
                    &seg,
                    &aml::Name::new("_UID".into(), &uid),
                    &bbn,
                    &pxm,
                    &crs,
                    &RawAml(&cxl_host_bridge_osc()),
                ],
            )
        }
    }
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

/// `_OSC` for the CXL host bridge (§6.2.11; PCI Firmware Spec 3.3 §4.5; CXL 2.0 §9.14.2): the
/// PCIe UUID as in [`pci_host_bridge_osc`], and the CXL UUID, whose first three dwords are the
/// PCIe ones and whose CDW5 is the CXL control field:
///
/// ```text
/// Method (_OSC, 4) {
///   CreateDWordField (Arg3, 0, CDW1)
///   Local0 = 0
///   If (Arg0 == ToUUID ("33DB4D5B-1FF7-401C-9657-7441C03DD766")) { Local0 = 1 }
///   If (Arg0 == ToUUID ("68F2D50B-C469-4D8A-BD3D-941A103FD3FC")) { Local0 = 2 }
///   If (Local0 != 0) {
///     CreateDWordField (Arg3, 8, CDW3)
///     Local1 = CDW3 & 0x1F
///     If (Arg1 != 1) { CDW1 |= 0x08 }          // unrecognized revision
///     If (CDW3 != Local1) { CDW1 |= 0x10 }     // capabilities masked
///     CDW3 = Local1
///     If (Local0 == 2) {
///       If (SizeOf (Arg3) < 20) { CDW1 |= 0x02 }       // _OSC failure: no CDW5
///       Else {
///         CreateDWordField (Arg3, 16, CDW5)
///         Local1 = CDW5 & 0x01                 // CXL memory error reporting
///         If (CDW5 != Local1) { CDW1 |= 0x10 }
///         CDW5 = Local1
///       }
///     }
///   } Else { CDW1 |= 0x04 }                    // unrecognized UUID
///   Return (Arg3)
/// }
/// ```
/// CDW4 (the OS's CXL support field) is returned as it came. Linux asks with the CXL UUID and
/// falls back to the PCIe UUID if that fails (drivers/acpi/pci_root.c).
fn cxl_host_bridge_osc() -> Vec<u8> {
    let cdw1 = Path::new("CDW1");
    let cdw3 = Path::new("CDW3");
    let cdw5 = Path::new("CDW5");
    let arg3 = aml::Arg(3);
    let local0 = aml::Local(0);
    let local1 = aml::Local(1);
    let two = 2u8;

    let create_cdw1 = aml::CreateDWordField::new(&cdw1, &arg3, &aml::ZERO);
    let init_kind = aml::Store::new(&local0, &aml::ZERO);
    let pci_uuid = aml::Uuid::new(PCI_HOST_BRIDGE_OSC_UUID);
    let is_pci = aml::Equal::new(&aml::Arg(0), &pci_uuid);
    let set_pci = aml::Store::new(&local0, &aml::ONE);
    let if_pci = aml::If::new(&is_pci, vec![&set_pci]);
    let cxl_uuid = aml::Uuid::new(CXL_HOST_BRIDGE_OSC_UUID);
    let is_cxl = aml::Equal::new(&aml::Arg(0), &cxl_uuid);
    let set_cxl = aml::Store::new(&local0, &two);
    let if_cxl = aml::If::new(&is_cxl, vec![&set_cxl]);

    // PCIe control (CDW3), as for a PCIe host bridge.
    let create_cdw3 = aml::CreateDWordField::new(&cdw3, &arg3, &8u8);
    let mask = aml::And::new(&local1, &cdw3, &OSC_GRANTED_CONTROL);
    let bad_revision = aml::NotEqual::new(&aml::Arg(1), &aml::ONE);
    let flag_revision = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_REVISION);
    let if_revision = aml::If::new(&bad_revision, vec![&flag_revision]);
    let masked = aml::NotEqual::new(&cdw3, &local1);
    let flag_masked = aml::Or::new(&cdw1, &cdw1, &OSC_CAPABILITIES_MASKED);
    let if_masked = aml::If::new(&masked, vec![&flag_masked]);
    let store3 = aml::Store::new(&cdw3, &local1);

    // CXL control (CDW5).
    let size = aml::SizeOf::new(&arg3);
    let too_short = aml::LessThan::new(&size, &20u8);
    let flag_failure = aml::Or::new(&cdw1, &cdw1, &OSC_FAILURE);
    let if_short = aml::If::new(&too_short, vec![&flag_failure]);
    let create_cdw5 = aml::CreateDWordField::new(&cdw5, &arg3, &16u8);
    let mask5 = aml::And::new(&local1, &cdw5, &CXL_OSC_GRANTED_CONTROL);
    let masked5 = aml::NotEqual::new(&cdw5, &local1);
    let if_masked5 = aml::If::new(&masked5, vec![&flag_masked]);
    let store5 = aml::Store::new(&cdw5, &local1);
    let else_long = aml::Else::new(vec![&create_cdw5, &mask5, &if_masked5, &store5]);
    let is_cxl_kind = aml::Equal::new(&local0, &two);
    let if_cxl_kind = aml::If::new(&is_cxl_kind, vec![&if_short, &else_long]);

    let known = aml::NotEqual::new(&local0, &aml::ZERO);
    let if_known = aml::If::new(
        &known,
        vec![
            &create_cdw3,
            &mask,
            &if_revision,
            &if_masked,
            &store3,
            &if_cxl_kind,
        ],
    );
    let flag_uuid = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
    let else_other = aml::Else::new(vec![&flag_uuid]);
    let ret = aml::Return::new(&arg3);

    aml_bytes(&aml::Method::new(
        "_OSC".into(),
        4,
        false,
        vec![
            &create_cdw1,
            &init_kind,
            &if_pci,
            &if_cxl,
            &if_known,
            &else_other,
            &ret,
        ],
    ))
}

/// `\_SB.CXLM`, the CXL root object (`ACPI0017`, CXL 2.0 §9.14.1) Linux's `cxl_acpi` binds to:
///
/// ```text
/// Device (CXLM) {
///   Name (_HID, "ACPI0017")
///   Method (_STA) { Return (0x0B) }
///   Method (_DSM, 4) {
///     If (Arg0 == ToUUID ("F365F9A6-A7DE-4071-A66A-B40C0B4F8E52")) {   // QTG query
///       If (Arg2 == 0) { Return (Buffer { 0x03 }) }                     // functions 0 and 1
///       If (Arg2 == 1) { Return (Package { max QTG id, Package { QTG ids of the windows } }) }
///     }
///     Return (Buffer { 0 })
///   }
/// }
/// ```
/// Linux evaluates the QTG `_DSM` only for devices whose CDAT gives performance data; it then
/// compares the answer with the CFMWS QTG ids.
fn cxl_root_device(cxl: &CxlConfig) -> Vec<u8> {
    let mut qtg_ids: Vec<u16> = Vec::new();
    for window in &cxl.windows {
        if !qtg_ids.contains(&window.qtg_id) {
            qtg_ids.push(window.qtg_id);
        }
    }
    let max_qtg = qtg_ids.iter().copied().max().unwrap_or(0);
    let ids: Vec<&dyn Aml> = qtg_ids.iter().map(|id| id as &dyn Aml).collect();
    let id_package = aml::Package::new(ids);
    let answer = aml::Package::new(vec![&max_qtg, &id_package]);

    let functions = aml::BufferData::new(vec![0x03]);
    let nothing = aml::BufferData::new(vec![0x00]);
    let is_query = aml::Equal::new(&aml::Arg(2), &aml::ZERO);
    let ret_functions = aml::Return::new(&functions);
    let if_query = aml::If::new(&is_query, vec![&ret_functions]);
    let is_qtg = aml::Equal::new(&aml::Arg(2), &aml::ONE);
    let ret_answer = aml::Return::new(&answer);
    let if_qtg = aml::If::new(&is_qtg, vec![&ret_answer]);
    let uuid = aml::Uuid::new(CXL_QTG_DSM_UUID);
    let is_uuid = aml::Equal::new(&aml::Arg(0), &uuid);
    let if_uuid = aml::If::new(&is_uuid, vec![&if_query, &if_qtg]);
    let ret_nothing = aml::Return::new(&nothing);
    let dsm = aml::Method::new("_DSM".into(), 4, false, vec![&if_uuid, &ret_nothing]);

    let sta_value = CXL_ROOT_STA;
    let ret_sta = aml::Return::new(&sta_value);
    let sta = aml::Method::new("_STA".into(), 0, false, vec![&ret_sta]);
    let hid: &dyn Aml = &"ACPI0017";
    device("CXLM", &[&aml::Name::new("_HID".into(), hid), &sta, &dsm])
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

    /// 2 GiB guest with the layout's CXL host bridge and a 1 GiB window on domain 1.
    fn cxl_config() -> AcpiConfig {
        let mut cfg = AcpiConfig::new(2, vec![(0, 2 << 30)]);
        cfg.cxl = Some(CxlConfig::from_layout(1 << 30, 1));
        cfg
    }

    /// UUID as `ToUUID` encodes it (first three fields little-endian).
    fn uuid_bytes(uuid: &str) -> Vec<u8> {
        let hex: String = uuid.chars().filter(|c| *c != '-').collect();
        let raw: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let mut out = Vec::new();
        out.extend(raw[0..4].iter().rev());
        out.extend(raw[4..6].iter().rev());
        out.extend(raw[6..8].iter().rev());
        out.extend(&raw[8..]);
        out
    }

    /// CEDT structures as (type, bytes).
    fn cedt_structures(cedt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut offset = HEADER_LEN;
        while offset < cedt.len() {
            let len = u16_at(cedt, offset + 2) as usize;
            assert!(len >= 4);
            out.push((cedt[offset], &cedt[offset..offset + len]));
            offset += len;
        }
        assert_eq!(offset, cedt.len());
        out
    }

    #[test]
    fn no_cxl_means_no_cxl_objects() {
        let t = tables(2);
        assert!(t.find_table(b"CEDT").is_none());
        let (_, dsdt) = t.find_table(b"DSDT").unwrap();
        for needle in [
            &b"ACPI0016"[..],
            b"ACPI0017",
            b"CXLM",
            &uuid_bytes(CXL_HOST_BRIDGE_OSC_UUID),
        ] {
            assert!(!contains(dsdt, needle));
        }
        assert!(!contains(dsdt, b"_PXM"));
    }

    #[test]
    fn cedt_has_chbs_and_cfmws() {
        let mut cfg = cxl_config();
        let cxl = cfg.cxl.as_mut().unwrap();
        cxl.host_bridges[0].uid = 0x1234_5678;
        cxl.windows[0].targets = vec![0x1234_5678];
        cxl.windows[0].qtg_id = 3;
        cxl.windows.push(CxlWindowConfig {
            base: layout::CXL_WINDOW_START + (1 << 30),
            size: 256 << 20,
            targets: vec![0x1234_5678],
            restrictions: CXL_WINDOW_TYPE3 | CXL_WINDOW_PMEM,
            qtg_id: 0,
            proximity_domain: 2,
        });
        let t = create_acpi_tables(&cfg).unwrap();
        let (addr, cedt) = t.find_table(b"CEDT").unwrap();
        assert_eq!(addr % TABLE_ALIGN as u64, 0);
        assert_eq!(cedt[8], 1, "revision");
        assert_eq!(&cedt[10..16], b"RUSTVM");
        assert_eq!(&cedt[16..24], b"RVMMCEDT");
        assert_eq!(sum(cedt), 0, "checksum");
        assert_eq!(u32_at(cedt, 4) as usize, cedt.len());
        assert_eq!(cedt.len(), HEADER_LEN + 0x20 + 2 * 0x28);

        let structures = cedt_structures(cedt);
        assert_eq!(structures.len(), 3);
        let (ty, chbs) = structures[0];
        assert_eq!(ty, 0);
        let mut expected = vec![0u8, 0, 0x20, 0];
        expected.extend_from_slice(&0x1234_5678u32.to_le_bytes());
        expected.extend_from_slice(&1u32.to_le_bytes());
        expected.extend_from_slice(&0u32.to_le_bytes());
        expected.extend_from_slice(&0xf000_0000u64.to_le_bytes());
        expected.extend_from_slice(&0x1_0000u64.to_le_bytes());
        assert_eq!(chbs, &expected[..]);

        let (ty, cfmws) = structures[1];
        assert_eq!(ty, 1);
        let mut expected = vec![1u8, 0, 0x28, 0, 0, 0, 0, 0];
        expected.extend_from_slice(&0x40_0000_0000u64.to_le_bytes());
        expected.extend_from_slice(&(1u64 << 30).to_le_bytes());
        expected.extend_from_slice(&[0, 0, 0, 0]); // ENIW 1-way, modulo, reserved
        expected.extend_from_slice(&0u32.to_le_bytes()); // HBIG 256 B
        expected.extend_from_slice(&0x0eu16.to_le_bytes());
        expected.extend_from_slice(&3u16.to_le_bytes());
        expected.extend_from_slice(&0x1234_5678u32.to_le_bytes());
        assert_eq!(cfmws, &expected[..]);
        assert_eq!(u64_at(cfmws, 8), layout::CXL_WINDOW_START);

        let (ty, pmem_only) = structures[2];
        assert_eq!(ty, 1);
        assert_eq!(u64_at(pmem_only, 8), 0x40_4000_0000);
        assert_eq!(u64_at(pmem_only, 0x10), 256 << 20);
        assert_eq!(u16_at(pmem_only, 0x20), 0x0a);
    }

    #[test]
    fn cfmws_ways_follow_the_targets() {
        for (ways, eniw) in [
            (1, 0),
            (2, 1),
            (4, 2),
            (8, 3),
            (16, 4),
            (3, 8),
            (6, 9),
            (12, 10),
        ] {
            assert_eq!(cfmws_eniw(ways), Some(eniw));
        }
        for ways in [0, 5, 7, 9, 17] {
            assert_eq!(cfmws_eniw(ways), None);
        }
    }

    /// The signatures of the tables the XSDT lists, in order.
    fn xsdt_signatures(t: &AcpiTables) -> Vec<[u8; 4]> {
        let (_, xsdt) = t.find_table(b"XSDT").unwrap();
        xsdt[HEADER_LEN..]
            .chunks_exact(8)
            .map(|e| {
                let offset = (u64_at(e, 0) - t.base) as usize;
                t.bytes[offset..offset + 4].try_into().unwrap()
            })
            .collect()
    }

    #[test]
    fn xsdt_lists_hmat_and_cedt_after_srat() {
        let t = create_acpi_tables(&cxl_config()).unwrap();
        assert_eq!(
            xsdt_signatures(&t),
            [*b"FACP", *b"APIC", *b"MCFG", *b"SRAT", *b"HMAT", *b"CEDT"]
        );
        for sig in ALL_SIGNATURES.iter().copied().chain([b"HMAT", b"CEDT"]) {
            let (_, table) = t.find_table(sig).unwrap();
            assert_eq!(sum(table), 0, "{sig:?}");
            assert_eq!(u32_at(table, 4) as usize, table.len(), "{sig:?}");
        }
    }

    #[test]
    fn dsdt_describes_the_cxl_host_bridge_and_root() {
        let mut cfg = cxl_config();
        cfg.cxl.as_mut().unwrap().host_bridges[0].uid = 7;
        cfg.cxl.as_mut().unwrap().windows[0].targets = vec![7];
        let t = create_acpi_tables(&cfg).unwrap();
        let (_, dsdt) = t.find_table(b"DSDT").unwrap();
        assert_eq!(sum(dsdt), 0);
        // Name (_HID, "ACPI0016"), Name (_CID, Package (2) { PNP0A08, PNP0A03 }).
        assert!(contains(dsdt, b"_HID\x0dACPI0016\0"));
        assert!(contains(
            dsdt,
            &[
                b'_', b'C', b'I', b'D', 0x12, 0x0c, 0x02, 0x0c, 0x41, 0xd0, 0x0a, 0x08, 0x0c, 0x41,
                0xd0, 0x0a, 0x03
            ]
        ));
        // Name (_UID, 7) and Name (_PXM, Zero) in PCI0; the plain PNP0A08 _HID is gone.
        assert!(contains(dsdt, &[b'_', b'U', b'I', b'D', 0x0a, 0x07]));
        assert!(contains(dsdt, &[b'_', b'P', b'X', b'M', 0x00]));
        assert!(!contains(
            dsdt,
            &[b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x08]
        ));
        assert!(contains(dsdt, b"_HID\x0dACPI0017\0"));
        assert!(contains(dsdt, b"CXLM"));
        // _STA returns 0x0B.
        assert!(contains(
            dsdt,
            &[b'_', b'S', b'T', b'A', 0x00, 0xa4, 0x0a, 0x0b]
        ));
        for uuid in [
            PCI_HOST_BRIDGE_OSC_UUID,
            CXL_HOST_BRIDGE_OSC_UUID,
            CXL_QTG_DSM_UUID,
        ] {
            assert!(contains(dsdt, &uuid_bytes(uuid)), "{uuid}");
        }
        assert!(contains(dsdt, b"CDW5"));
        // The rest of the DSDT is unchanged: windows, ECAM reservation, UARTs, CPUs.
        for name in [
            &b"MRES"[..],
            b"COM1",
            b"C001",
            b"_S5_",
            b"_SEG",
            b"_BBN",
            b"_CRS",
        ] {
            assert!(contains(dsdt, name));
        }
    }

    #[test]
    fn uuid_bytes_match_the_aml_encoding() {
        let mut encoded = Vec::new();
        aml::Uuid::new(CXL_HOST_BRIDGE_OSC_UUID).to_aml_bytes(&mut encoded);
        assert!(encoded.ends_with(&uuid_bytes(CXL_HOST_BRIDGE_OSC_UUID)));
        // 68F2D50B-C469-4D8A-...: first field little-endian.
        assert_eq!(
            &uuid_bytes(CXL_HOST_BRIDGE_OSC_UUID)[..6],
            &[0x0b, 0xd5, 0xf2, 0x68, 0x69, 0xc4]
        );
    }

    #[test]
    fn srat_gives_each_cxl_window_its_domain() {
        let mut cfg = cxl_config();
        cfg.cxl.as_mut().unwrap().windows.push(CxlWindowConfig::new(
            layout::CXL_WINDOW_START + (4 << 30),
            512 << 20,
            vec![0],
            2,
        ));
        let t = create_acpi_tables(&cfg).unwrap();
        let (_, srat) = t.find_table(b"SRAT").unwrap();
        assert_eq!(sum(srat), 0);
        let mut memory = Vec::new();
        let mut offset = HEADER_LEN + 12;
        while offset < srat.len() {
            let (ty, len) = (srat[offset], srat[offset + 1] as usize);
            if ty == 1 {
                let entry = &srat[offset..offset + len];
                memory.push((
                    u32_at(entry, 2),
                    u64_at(entry, 8),
                    u64_at(entry, 16),
                    u32_at(entry, 28),
                ));
            }
            offset += len;
        }
        assert_eq!(
            memory,
            vec![
                (0, 0, 2 << 30, 1),
                (1, layout::CXL_WINDOW_START, 1 << 30, 0b11),
                (2, layout::CXL_WINDOW_START + (4 << 30), 512 << 20, 0b11),
            ]
        );
    }

    #[test]
    fn cxl_without_ram_ranges_has_no_srat() {
        let mut cfg = AcpiConfig::new(1, Vec::new());
        cfg.cxl = Some(CxlConfig::from_layout(256 << 20, 1));
        let t = create_acpi_tables(&cfg).unwrap();
        assert!(t.find_table(b"SRAT").is_none());
        assert!(t.find_table(b"HMAT").is_none());
        assert!(t.find_table(b"CEDT").is_some());
    }

    /// HMAT structures after the 40-byte header as (type, bytes).
    fn hmat_structures(hmat: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        let mut offset = HEADER_LEN + 4;
        while offset < hmat.len() {
            let len = u32_at(hmat, offset + 4) as usize;
            assert!(len >= 8);
            out.push((u16_at(hmat, offset), &hmat[offset..offset + len]));
            offset += len;
        }
        assert_eq!(offset, hmat.len());
        out
    }

    /// Memory Proximity Domain Attributes structure: memory on `domain` attached to initiator
    /// domain 0.
    fn hmat_proximity(domain: u32) -> Vec<u8> {
        let mut s = vec![0u8, 0, 0, 0, 40, 0, 0, 0];
        s.extend_from_slice(&1u16.to_le_bytes()); // initiator domain valid
        s.extend_from_slice(&[0, 0]);
        s.extend_from_slice(&0u32.to_le_bytes()); // initiator domain
        s.extend_from_slice(&domain.to_le_bytes());
        s.extend_from_slice(&[0; 20]);
        s
    }

    /// System Locality Latency and Bandwidth Information structure from initiator domain 0.
    fn hmat_locality(data_type: u8, base_unit: u64, targets: &[u32], entries: &[u16]) -> Vec<u8> {
        let len = 32 + 4 + 4 * targets.len() + 2 * entries.len();
        let mut s = vec![1u8, 0, 0, 0];
        s.extend_from_slice(&(len as u32).to_le_bytes());
        s.extend_from_slice(&[0, data_type, 0, 0]);
        s.extend_from_slice(&1u32.to_le_bytes());
        s.extend_from_slice(&(targets.len() as u32).to_le_bytes());
        s.extend_from_slice(&0u32.to_le_bytes());
        s.extend_from_slice(&base_unit.to_le_bytes());
        s.extend_from_slice(&0u32.to_le_bytes());
        for t in targets {
            s.extend_from_slice(&t.to_le_bytes());
        }
        for e in entries {
            s.extend_from_slice(&e.to_le_bytes());
        }
        s
    }

    /// What Linux makes of an entry of an HMAT revision 2 (drivers/acpi/numa/hmat.c
    /// `hmat_normalize`): latencies in ns rounded up, bandwidths in MB/s.
    fn linux_hmat_value(entry: u16, base_unit: u64, data_type: u8) -> u64 {
        let value = u64::from(entry) * base_unit;
        if data_type <= 2 {
            value.div_ceil(1000)
        } else {
            value
        }
    }

    #[test]
    fn hmat_describes_ram_and_the_cxl_domain() {
        let t = create_acpi_tables(&cxl_config()).unwrap();
        let (addr, hmat) = t.find_table(b"HMAT").unwrap();
        assert_eq!(addr % TABLE_ALIGN as u64, 0);
        assert_eq!(&hmat[0..4], b"HMAT");
        assert_eq!(hmat[8], 2, "revision");
        assert_eq!(&hmat[10..16], b"RUSTVM");
        assert_eq!(&hmat[16..24], b"RVMMHMAT");
        assert_eq!(sum(hmat), 0, "checksum");
        assert_eq!(u32_at(hmat, 4) as usize, hmat.len());
        assert_eq!(u32_at(hmat, 36), 0, "reserved");
        // Header, two proximity domain structures, four locality structures of 1×2 entries.
        assert_eq!(hmat.len(), 40 + 2 * 40 + 4 * (32 + 4 + 2 * 4 + 2 * 2));

        let structures = hmat_structures(hmat);
        let types: Vec<u16> = structures.iter().map(|(ty, _)| *ty).collect();
        assert_eq!(types, [0, 0, 1, 1, 1, 1]);
        assert_eq!(structures[0].1, &hmat_proximity(0)[..]);
        assert_eq!(structures[1].1, &hmat_proximity(1)[..]);
        let expected = [
            (1, 1000, [100, 250]),
            (2, 1000, [100, 250]),
            (4, 1, [20_000, 16_000]),
            (5, 1, [20_000, 16_000]),
        ];
        for ((_, s), (data_type, base, entries)) in structures[2..].iter().zip(expected) {
            assert_eq!(*s, &hmat_locality(data_type, base, &[0, 1], &entries)[..]);
            // Field offsets as Linux reads them (struct acpi_hmat_locality).
            assert_eq!(u32_at(s, 4), 48, "length");
            assert_eq!(s[9], data_type);
            assert_eq!(u32_at(s, 12), 1, "initiators");
            assert_eq!(u32_at(s, 16), 2, "targets");
            assert_eq!(u64_at(s, 24), base, "entry base unit");
            assert_eq!(u32_at(s, 32), 0, "initiator domain");
            assert_eq!((u32_at(s, 36), u32_at(s, 40)), (0, 1), "target domains");
            assert_eq!((u16_at(s, 44), u16_at(s, 46)), (entries[0], entries[1]));
        }
    }

    #[test]
    fn hmat_figures_are_what_linux_reports() {
        let t = create_acpi_tables(&cxl_config()).unwrap();
        let (_, hmat) = t.find_table(b"HMAT").unwrap();
        let mut seen = Vec::new();
        for (ty, s) in hmat_structures(hmat) {
            if ty != 1 {
                continue;
            }
            let data_type = s[9];
            let base = u64_at(s, 24);
            let values: Vec<u64> = (0..2)
                .map(|i| linux_hmat_value(u16_at(s, 44 + 2 * i), base, data_type))
                .collect();
            seen.push((data_type, values));
        }
        // read/write latency in ns, read/write bandwidth in MB/s; DRAM then CXL.
        assert_eq!(
            seen,
            [
                (1, vec![100, 250]),
                (2, vec![100, 250]),
                (4, vec![20_000, 16_000]),
                (5, vec![20_000, 16_000]),
            ]
        );
        assert_eq!(u64::from(DRAM_LATENCY_NS), 100);
        assert_eq!(u64::from(CXL_X8_LATENCY_NS), 250);
        assert_eq!(u64::from(DRAM_BANDWIDTH_MBPS), 20_000);
        assert_eq!(u64::from(CXL_X8_BANDWIDTH_MBPS), 16_000);
    }

    #[test]
    fn hmat_lists_each_cxl_domain_once() {
        let mut cfg = cxl_config();
        let cxl = cfg.cxl.as_mut().unwrap();
        for (n, domain) in [(1u64, 3u32), (2, 1), (3, 3)] {
            cxl.windows.push(CxlWindowConfig::new(
                layout::CXL_WINDOW_START + (n << 30),
                256 << 20,
                vec![0],
                domain,
            ));
        }
        let t = create_acpi_tables(&cfg).unwrap();
        let (_, hmat) = t.find_table(b"HMAT").unwrap();
        assert_eq!(sum(hmat), 0);
        let structures = hmat_structures(hmat);
        let domains: Vec<u32> = structures
            .iter()
            .filter(|(ty, _)| *ty == 0)
            .map(|(_, s)| u32_at(s, 16))
            .collect();
        assert_eq!(domains, [0, 1, 3]);
        let localities: Vec<&[u8]> = structures
            .iter()
            .filter(|(ty, _)| *ty == 1)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(localities.len(), 4);
        // 3 targets: the length (54) is not a multiple of 4, and nothing pads it.
        assert_eq!(
            localities[0],
            &hmat_locality(1, 1000, &[0, 1, 3], &[100, 250, 250])[..]
        );
        assert_eq!(localities[0].len(), 32 + 4 + 12 + 6);
        assert_eq!(
            localities[3],
            &hmat_locality(5, 1, &[0, 1, 3], &[20_000, 16_000, 16_000])[..]
        );
        assert_eq!(hmat.len(), 40 + 3 * 40 + 4 * 54);
    }

    #[test]
    fn xsdt_lists_hmat_only_with_a_cxl_domain() {
        let base: [[u8; 4]; 4] = [*b"FACP", *b"APIC", *b"MCFG", *b"SRAT"];
        // No CXL: no HMAT, and the tables are those of a build without it.
        let t = tables(2);
        assert!(t.find_table(b"HMAT").is_none());
        assert_eq!(xsdt_signatures(&t), base);
        // Extra SRAT domains alone do not make an HMAT.
        let mut cfg = config(2);
        cfg.extra_memory_affinity.push(MemoryAffinityRange {
            base: 1 << 32,
            size: 1 << 30,
            proximity_domain: 1,
            hot_pluggable: false,
            non_volatile: false,
        });
        let t = create_acpi_tables(&cfg).unwrap();
        assert!(t.find_table(b"HMAT").is_none());
        // CXL without windows, or with the window on the RAM's domain: no CXL domain.
        let mut cfg = cxl_config();
        cfg.cxl.as_mut().unwrap().windows.clear();
        let t = create_acpi_tables(&cfg).unwrap();
        assert!(t.find_table(b"HMAT").is_none());
        assert_eq!(xsdt_signatures(&t), [base.as_slice(), &[*b"CEDT"]].concat());
        let mut cfg = cxl_config();
        cfg.cxl.as_mut().unwrap().windows[0].proximity_domain = 0;
        assert!(
            create_acpi_tables(&cfg)
                .unwrap()
                .find_table(b"HMAT")
                .is_none()
        );
        // CXL without RAM ranges: no SRAT, so no HMAT (covered by
        // cxl_without_ram_ranges_has_no_srat). With both: listed after the SRAT.
        let t = create_acpi_tables(&cxl_config()).unwrap();
        let sigs = xsdt_signatures(&t);
        assert_eq!(sigs.iter().filter(|s| *s == b"HMAT").count(), 1);
        assert_eq!(sigs[4], *b"HMAT");
    }

    #[test]
    fn extra_hmat_clashes_only_with_the_built_in_one() {
        let mut cfg = cxl_config();
        cfg.extra_tables.push(extra_table(b"HMAT", &[0; 4]));
        assert_eq!(
            create_acpi_tables(&cfg),
            Err(AcpiError::InvalidExtraTable {
                index: 0,
                reason: "signature clashes with a built-in table"
            })
        );
        // Without a CXL domain the caller may bring its own.
        cfg.cxl = None;
        let t = create_acpi_tables(&cfg).unwrap();
        let (_, hmat) = t.find_table(b"HMAT").unwrap();
        assert_eq!(hmat.len(), HEADER_LEN + 4);
    }

    #[test]
    fn bad_cxl_configs_are_rejected() {
        let check = |edit: &dyn Fn(&mut CxlConfig), want: &dyn Fn(&AcpiError) -> bool| {
            let mut cfg = cxl_config();
            edit(cfg.cxl.as_mut().unwrap());
            let err = create_acpi_tables(&cfg).unwrap_err();
            assert!(want(&err), "{err:?}");
        };
        let invalid_cxl = |e: &AcpiError| matches!(e, AcpiError::InvalidCxl(_));
        let invalid_range = |e: &AcpiError| matches!(e, AcpiError::InvalidRange { .. });
        let overlap = |e: &AcpiError| matches!(e, AcpiError::Overlap { .. });

        check(&|c| c.host_bridges.clear(), &invalid_cxl);
        check(
            &|c| {
                c.host_bridges.push(CxlHostBridgeConfig {
                    uid: 1,
                    chbcr_base: 0xf001_0000,
                })
            },
            &invalid_cxl,
        );
        check(&|c| c.host_bridges[0].chbcr_base = 0, &invalid_range);
        check(
            &|c| c.host_bridges[0].chbcr_base = 0xf000_8000,
            &invalid_range,
        );
        check(&|c| c.windows[0].base += 1 << 20, &invalid_range);
        check(
            &|c| c.windows[0].size = (1 << 30) + (1 << 20),
            &invalid_range,
        );
        check(&|c| c.windows[0].size = 0, &invalid_range);
        check(
            &|c| c.windows[0].base = u64::MAX - 0xfff_ffff,
            &invalid_range,
        );
        check(&|c| c.windows[0].targets.clear(), &invalid_cxl);
        check(&|c| c.windows[0].targets = vec![0, 0], &invalid_cxl);
        check(
            &|c| c.windows[0].targets = vec![0, 0, 0, 0, 0],
            &invalid_cxl,
        );
        check(&|c| c.windows[0].targets = vec![1], &invalid_cxl);
        // Overlaps: the ECAM, the 64-bit PCI window, RAM, each other.
        check(&|c| c.host_bridges[0].chbcr_base = 0xe000_0000, &overlap);
        check(&|c| c.windows[0].base = layout::PCI_MMIO64_START, &overlap);
        check(&|c| c.windows[0].base = 0, &overlap);
        check(
            &|c| {
                let again = c.windows[0].clone();
                c.windows.push(again);
            },
            &overlap,
        );

        // A CEDT of the caller's clashes with the built-in one, but only with CXL.
        let mut cfg = cxl_config();
        cfg.extra_tables.push(extra_table(b"CEDT", &[]));
        assert_eq!(
            create_acpi_tables(&cfg),
            Err(AcpiError::InvalidExtraTable {
                index: 0,
                reason: "signature clashes with a built-in table"
            })
        );
        cfg.cxl = None;
        assert!(create_acpi_tables(&cfg).is_ok());

        // No windows at all is fine (a host bridge without memory to map yet).
        let mut cfg = cxl_config();
        cfg.cxl.as_mut().unwrap().windows.clear();
        let t = create_acpi_tables(&cfg).unwrap();
        let (_, cedt) = t.find_table(b"CEDT").unwrap();
        assert_eq!(cedt.len(), HEADER_LEN + 0x20);
    }

    /// An ACPICA tool: `$IASL` / `$ACPIEXEC` if set, else `iasl` / `acpiexec` from PATH.
    fn acpica_tool(name: &str) -> String {
        std::env::var(name.to_uppercase()).unwrap_or_else(|_| name.to_string())
    }

    /// Runs an ACPICA tool; panics with its output if it fails or reports an error.
    fn run_acpica(tool: &str, args: &[&std::ffi::OsStr]) -> String {
        let out = std::process::Command::new(acpica_tool(tool))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e} (apt-get install acpica-tools)"));
        let log = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{tool} {args:?}: {log}");
        log
    }

    /// Disassembles each of `sigs` with `iasl -d`; returns (signature, listing) pairs.
    fn iasl_disassemble(
        t: &AcpiTables,
        sigs: &[&[u8; 4]],
        dir: &std::path::Path,
    ) -> Vec<(String, String)> {
        std::fs::create_dir_all(dir).unwrap();
        let mut listings = Vec::new();
        for sig in sigs {
            let (_, table) = t.find_table(sig).unwrap();
            let name = String::from_utf8_lossy(&sig[..]).to_lowercase();
            let path = dir.join(format!("{name}.dat"));
            std::fs::write(&path, table).unwrap();
            let log = run_acpica("iasl", &["-d".as_ref(), path.as_os_str()]);
            assert!(!log.contains("rror"), "iasl -d {name}: {log}");
            let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
            println!("==== {name} ====\n{dsl}");
            listings.push((name, dsl));
        }
        listings
    }

    /// Manual check, not part of the normal run: needs `iasl` from acpica-tools
    /// (`apt-get install acpica-tools`). Run with
    /// `cargo test -p vmm acpi::tests::iasl_disassembles_tables -- --ignored --nocapture`.
    /// Set `IASL` to use another binary. iasl before 20201217 (e.g. bookworm's 20200925) does
    /// not know the CEDT and dumps it raw; the CEDT field checks then are skipped.
    #[test]
    #[ignore = "needs iasl (acpica-tools); scripts/test.sh installs it and runs this with --ignored"]
    fn iasl_disassembles_tables() {
        let mut cfg = AcpiConfig::new(4, vec![(0, 3 << 30), (1 << 32, 1 << 30)]);
        cfg.irq0_override_gsi = Some(2);
        let t = create_acpi_tables(&cfg).unwrap();
        let dir = std::env::temp_dir().join(format!("acpi-iasl-{}", std::process::id()));
        let listings = iasl_disassemble(&t, &ALL_SIGNATURES, &dir);
        let dsdt = &listings.iter().find(|(n, _)| n == "dsdt").unwrap().1;
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

        // With CXL.
        let t = create_acpi_tables(&cxl_config()).unwrap();
        let sigs: Vec<&[u8; 4]> = ALL_SIGNATURES
            .iter()
            .copied()
            .chain([b"HMAT", b"CEDT"])
            .collect();
        let listings = iasl_disassemble(&t, &sigs, &dir);
        let listing = |name: &str| &listings.iter().find(|(n, _)| n == name).unwrap().1;
        let dsdt = listing("dsdt");
        for expected in [
            "Name (_HID, \"ACPI0016\"",
            "Name (_PXM, Zero)",
            "EisaId (\"PNP0A08\")",
            "EisaId (\"PNP0A03\")",
            "ToUUID (\"68f2d50b-c469-4d8a-bd3d-941a103fd3fc\")",
            "ToUUID (\"33db4d5b-1ff7-401c-9657-7441c03dd766\")",
            "CreateDWordField (Arg3, 0x10, CDW5)",
            "Device (CXLM)",
            "Name (_HID, \"ACPI0017\")",
            "Return (0x0B)",
        ] {
            assert!(dsdt.contains(expected), "{expected}");
        }
        let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let cedt = squeeze(listing("cedt"));
        if cedt.contains("Unknown ACPI table signature") {
            println!("this iasl does not decode the CEDT; set IASL to a newer one (>= 20201217)");
        } else {
            for expected in [
                "Revision : 01",
                "Subtable Type : 00 [CXL Host Bridge Structure]",
                "Length : 0020",
                "Specification version : 00000001",
                "Register base : 00000000F0000000",
                "Register length : 0000000000010000",
                "Subtable Type : 01 [CXL Fixed Memory Window Structure]",
                "Length : 0028",
                "Window base address : 0000004000000000",
                "Window size : 0000000040000000",
                "Interleave Members : 00",
                "Restrictions : 000E",
                "First Target : 00000000",
            ] {
                assert!(cedt.contains(expected), "CEDT: {expected}");
            }
        }
        let srat = squeeze(listing("srat"));
        assert!(srat.contains("Proximity Domain : 00000001"));
        assert!(srat.contains("Base Address : 0000004000000000"));
        assert!(srat.contains("Hot Pluggable : 1"));
        // The fields without their "[offset decimal length]" prefixes, squeezed.
        let fields = |listing: &str| {
            let lines: Vec<&str> = listing
                .lines()
                .map(|l| match l.trim_start().strip_prefix('[') {
                    Some(rest) => rest.split_once(']').map_or(l, |(_, field)| field),
                    None => l,
                })
                .collect();
            squeeze(&lines.join("\n"))
        };
        let hmat = fields(listing("hmat"));
        for expected in [
            "Revision : 02",
            "Structure Type : 0000 [Memory Proximity Domain Attributes]",
            "Length : 00000028",
            "Memory Proximity Domain : 00000001",
            "Structure Type : 0001 [System Locality Latency and Bandwidth Information]",
            "Length : 00000030",
            "Data Type : 01",
            "Data Type : 02",
            "Data Type : 04",
            "Data Type : 05",
            "Entry Base Unit : 00000000000003E8",
            "Entry Base Unit : 0000000000000001",
            "Target Proximity Domain List : 00000001",
            "Entry : 0064 Entry : 00FA",
            "Entry : 4E20 Entry : 3E80",
        ] {
            assert!(hmat.contains(expected), "HMAT: {expected}");
        }
        std::fs::remove_dir_all(&dir).unwrap();

        // Two CXL domains, three targets: the locality structures' length (54) is not a
        // multiple of 4; iasl must still find every structure.
        let mut cfg = cxl_config();
        cfg.cxl.as_mut().unwrap().windows.push(CxlWindowConfig::new(
            layout::CXL_WINDOW_START + (1 << 30),
            256 << 20,
            vec![0],
            2,
        ));
        let t = create_acpi_tables(&cfg).unwrap();
        let listings = iasl_disassemble(&t, &[b"HMAT"], &dir);
        let hmat = fields(&listings[0].1);
        assert!(hmat.contains("Length : 00000036"), "{hmat}");
        assert!(hmat.contains("Target Proximity Domain List : 00000002"));
        assert!(hmat.contains("Entry : 0064 Entry : 00FA Entry : 00FA Structure Type"));
        assert!(hmat.contains("Entry : 4E20 Entry : 3E80 Entry : 3E80 Raw Table Data"));
        assert_eq!(hmat.matches("Data Type :").count(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The bytes of the buffer acpiexec printed after `Evaluating \{method}`.
    fn acpiexec_buffer(log: &str, method: &str) -> Vec<u8> {
        let block = log
            .split("Evaluating \\")
            .find(|b| b.starts_with(method))
            .unwrap_or_else(|| panic!("{method} not evaluated: {log}"));
        assert!(block.contains("[Buffer]"), "{method}: {block}");
        let mut bytes = Vec::new();
        for line in block.lines() {
            // "    0000: 11 00 00 00 ...  // ....", possibly after "[Buffer] Length 0C = ".
            let Some((_, rest)) = line.split_once(": ") else {
                continue;
            };
            let hex = rest.split("//").next().unwrap_or("");
            bytes.extend(
                hex.split_whitespace()
                    .map_while(|b| u8::from_str_radix(b, 16).ok().filter(|_| b.len() == 2)),
            );
        }
        bytes
    }

    /// Evaluates the CXL host bridge `_OSC` and the CXL root's `_STA` and `_DSM` with acpiexec
    /// (acpica-tools), calling them as Linux does from a test SSDT compiled by iasl. Run with
    /// `cargo test -p vmm acpi::tests::acpiexec_runs_cxl_methods -- --ignored --nocapture`
    /// (`IASL`, `ACPIEXEC` select other binaries).
    #[test]
    #[ignore = "needs iasl and acpiexec (acpica-tools); scripts/test.sh installs them and runs this with --ignored"]
    fn acpiexec_runs_cxl_methods() {
        let t = create_acpi_tables(&cxl_config()).unwrap();
        let dir = std::env::temp_dir().join(format!("acpi-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (_, dsdt) = t.find_table(b"DSDT").unwrap();
        std::fs::write(dir.join("dsdt.aml"), dsdt).unwrap();
        // CDW1 bit 0 = query; Linux asks for LTR (0x20) and DPC (0x80) too, which are masked.
        let ssdt = r#"DefinitionBlock ("", "SSDT", 2, "RUSTVM", "OSCTEST", 1)
{
    External (\_SB.PCI0._OSC, MethodObj)
    External (\_SB.CXLM._DSM, MethodObj)
    Method (TCXQ, 0) { Return (\_SB.PCI0._OSC (ToUUID ("68F2D50B-C469-4D8A-BD3D-941A103FD3FC"), 1, 5,
        Buffer () { 1,0,0,0, 0x1F,0,0,0, 0xBD,0,0,0, 0x0F,0,0,0, 0x01,0,0,0 })) }
    Method (TCXR, 0) { Return (\_SB.PCI0._OSC (ToUUID ("68F2D50B-C469-4D8A-BD3D-941A103FD3FC"), 1, 5,
        Buffer () { 0,0,0,0, 0x1F,0,0,0, 0x1D,0,0,0, 0x0F,0,0,0, 0x01,0,0,0 })) }
    Method (TCXM, 0) { Return (\_SB.PCI0._OSC (ToUUID ("68F2D50B-C469-4D8A-BD3D-941A103FD3FC"), 1, 5,
        Buffer () { 0,0,0,0, 0x1F,0,0,0, 0x1D,0,0,0, 0x0F,0,0,0, 0x03,0,0,0 })) }
    Method (TCXS, 0) { Return (\_SB.PCI0._OSC (ToUUID ("68F2D50B-C469-4D8A-BD3D-941A103FD3FC"), 1, 3,
        Buffer () { 1,0,0,0, 0x1F,0,0,0, 0x1D,0,0,0 })) }
    Method (TPCI, 0) { Return (\_SB.PCI0._OSC (ToUUID ("33DB4D5B-1FF7-401C-9657-7441C03DD766"), 1, 3,
        Buffer () { 1,0,0,0, 0x1F,0,0,0, 0xFF,0,0,0 })) }
    Method (TREV, 0) { Return (\_SB.PCI0._OSC (ToUUID ("33DB4D5B-1FF7-401C-9657-7441C03DD766"), 2, 3,
        Buffer () { 0,0,0,0, 0x1F,0,0,0, 0x1F,0,0,0 })) }
    Method (TUNK, 0) { Return (\_SB.PCI0._OSC (ToUUID ("0D4B8CE2-2CE7-4B9E-9A53-2E0D2A8A1C7F"), 1, 3,
        Buffer () { 1,0,0,0, 0x1F,0,0,0, 0x1F,0,0,0 })) }
    Method (TDS0, 0) { Return (\_SB.CXLM._DSM (ToUUID ("F365F9A6-A7DE-4071-A66A-B40C0B4F8E52"), 1, 0,
        Package () { })) }
    Method (TDS1, 0) { Return (\_SB.CXLM._DSM (ToUUID ("F365F9A6-A7DE-4071-A66A-B40C0B4F8E52"), 1, 1,
        Package () { 100, 100, 1000, 1000 })) }
}
"#;
        std::fs::write(dir.join("osctest.asl"), ssdt).unwrap();
        run_acpica("iasl", &[dir.join("osctest.asl").as_os_str()]);
        let log = run_acpica(
            "acpiexec",
            &[
                "-b".as_ref(),
                "execute TCXQ; execute TCXR; execute TCXM; execute TCXS; execute TPCI; \
                 execute TREV; execute TUNK; execute TDS0; execute TDS1; \
                 execute \\_SB.CXLM._STA"
                    .as_ref(),
                dir.join("dsdt.aml").as_os_str(),
                dir.join("osctest.aml").as_os_str(),
            ],
        );
        println!("{log}");
        let dwords = |method: &str| -> Vec<u32> {
            acpiexec_buffer(&log, method)
                .chunks_exact(4)
                .map(|d| u32::from_le_bytes(d.try_into().unwrap()))
                .collect()
        };
        // Query: PCIe control trimmed to 0x1F (capabilities masked is fine in a query), CXL
        // memory error reporting granted.
        assert_eq!(dwords("TCXQ"), [0x11, 0x1f, 0x1d, 0x0f, 0x01]);
        // Commit of what the query granted: no error bits.
        assert_eq!(dwords("TCXR"), [0x00, 0x1f, 0x1d, 0x0f, 0x01]);
        // Unknown CXL control bit requested: masked.
        assert_eq!(dwords("TCXM"), [0x10, 0x1f, 0x1d, 0x0f, 0x01]);
        // CXL UUID without CDW5: _OSC failure, not an AML error.
        assert_eq!(dwords("TCXS"), [0x03, 0x1f, 0x1d]);
        // The PCIe UUID as before.
        assert_eq!(dwords("TPCI"), [0x11, 0x1f, 0x1f]);
        assert_eq!(dwords("TREV"), [0x08, 0x1f, 0x1f]);
        assert_eq!(dwords("TUNK"), [0x05, 0x1f, 0x1f]);
        assert_eq!(acpiexec_buffer(&log, "TDS0"), [0x03]);
        // QTG query: Package { max QTG id 0, Package { QTG id 0 } }.
        let tds1 = log.split("Evaluating \\TDS1").nth(1).unwrap_or_default();
        let tds1 = tds1.split("Evaluating").next().unwrap_or_default();
        let squeezed = tds1.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            squeezed.contains(
                "[Package] Contains 2 Elements: [Integer] = 0000000000000000 \
                 [Package] Contains 1 Elements: [Integer] = 0000000000000000"
            ),
            "{tds1}"
        );
        assert!(log.contains("Evaluation of \\_SB.CXLM._STA returned"));
        assert!(log.contains("[Integer] = 000000000000000B"));
        assert!(!log.contains("AE_"), "AML exception: {log}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
