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
//!   CXL 2.0 x8 memory expander (see [`hmat::build_hmat`]). Linux shows them in
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

mod cedt;
mod dmar;
mod dsdt;
mod fadt;
mod hmat;
mod madt;
mod mcfg;
mod srat;

use cedt::*;
pub use dmar::DmarConfig;
use dmar::*;
use dsdt::*;
use fadt::*;
use hmat::*;
use madt::*;
use mcfg::*;
use srat::*;

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
const CXL_CHBCR_LEN: u64 = 0x1_0000;
/// CFMWS base and size granule (and the HDM decoder granule).
const CXL_WINDOW_ALIGN: u64 = 256 << 20;
const _: () = assert!(layout::CXL_CHBCR_SIZE == CXL_CHBCR_LEN);
const _: () = assert!(layout::CXL_CHBCR_START.is_multiple_of(CXL_CHBCR_LEN));
const _: () = assert!(layout::CXL_WINDOW_START.is_multiple_of(CXL_WINDOW_ALIGN));
const _: () = assert!(layout::CXL_WINDOW_MAX_SIZE.is_multiple_of(CXL_WINDOW_ALIGN));

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
    #[error("DMAR: {0}")]
    InvalidDmar(&'static str),
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

/// A CXL 2.0 host bridge: CEDT CHBS, and the `_UID` of its ACPI0016 host bridge device — the
/// first is `\_SB.PCI0`, each further one `\_SB.PCIn`, a root bus of its own in the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CxlHostBridgeConfig {
    /// ACPI `_UID` of the host bridge; CFMWS windows name it as a target.
    pub uid: u32,
    /// Host bridge component registers (CHBCR): a 64 KiB block, 64 KiB aligned, non-zero.
    pub chbcr_base: u64,
    /// `None` for the first host bridge (`\_SB.PCI0`, the segment's first root bus); for each
    /// further one, its root bus: bus numbers and windows taken from the top of the segment's.
    pub pci_root: Option<PciRootConfig>,
}

/// A further PCI root bus of the segment (`_BBN` and `_CRS` of its host bridge device): its bus
/// numbers and windows lie at the top of the segment's, and `\_SB.PCI0` keeps what is below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciRootConfig {
    pub bus_start: u8,
    pub bus_end: u8,
    pub mmio32_base: u64,
    pub mmio32_size: u64,
    pub mmio64_base: u64,
    pub mmio64_size: u64,
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
    /// Host bridge interleave granularity (HBIG) in bytes: 256 B – 16 KiB, a power of two.
    pub granularity: u32,
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
            granularity: 256,
            restrictions: CXL_WINDOW_DEFAULT_RESTRICTIONS,
            qtg_id: 0,
            proximity_domain,
        }
    }
}

/// `_UID` of the layout's CXL host bridge (CHBS UID, CFMWS target). Not 0: Linux finds a
/// generic port's HMAT figures by `_UID` among all HMAT targets (`acpi_find_genport_target`),
/// and the memory targets, which have no device handle, all read as UID 0.
pub const CXL_HOST_BRIDGE_UID: u32 = 1;

/// CXL topology described by the tables (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CxlConfig {
    /// The first is `\_SB.PCI0`; further ones bring root buses of their own.
    pub host_bridges: Vec<CxlHostBridgeConfig>,
    pub windows: Vec<CxlWindowConfig>,
}

#[allow(dead_code)] // Used by the CXL device's wiring (in progress) and the tests.
impl CxlConfig {
    /// The layout's CXL machine: host bridge UID [`CXL_HOST_BRIDGE_UID`] with its CHBCR at
    /// [`layout::CXL_CHBCR_START`], one window of `window_size` bytes at
    /// [`layout::CXL_WINDOW_START`] on `proximity_domain`.
    pub fn from_layout(window_size: u64, proximity_domain: u32) -> Self {
        Self {
            host_bridges: vec![CxlHostBridgeConfig {
                uid: CXL_HOST_BRIDGE_UID,
                chbcr_base: layout::CXL_CHBCR_START,
                pci_root: None,
            }],
            windows: vec![CxlWindowConfig::new(
                layout::CXL_WINDOW_START,
                window_size,
                vec![CXL_HOST_BRIDGE_UID],
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
    /// A VT-d remapping unit: the DMAR with one DRHD for the whole PCI segment. `None`: no
    /// DMAR (no IOMMU).
    pub dmar: Option<DmarConfig>,
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
            dmar: None,
        }
    }

    /// `\_SB.PCI0`'s part of the segment: everything below the further CXL host bridges' root
    /// buses (bus numbers and windows; validated to lie at the top of the segment's).
    fn first_root(&self) -> PciSegmentConfig {
        let mut pci = self.pci_segment.clone();
        let roots = self.cxl.iter().flat_map(|c| &c.host_bridges);
        for root in roots.filter_map(|hb| hb.pci_root.as_ref()) {
            pci.bus_end = pci.bus_end.min(root.bus_start.saturating_sub(1));
            pci.mmio32_size = pci
                .mmio32_size
                .min(root.mmio32_base.saturating_sub(pci.mmio32_base));
            pci.mmio64_size = pci
                .mmio64_size
                .min(root.mmio64_base.saturating_sub(pci.mmio64_base));
        }
        pci
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

    /// `(proximity domain, _UID)` of each CXL host bridge's SRAT Generic Port, when there is an
    /// HMAT to give it figures: domains after every other one.
    fn generic_ports(&self) -> Vec<(u32, u32)> {
        let cxl_domains = self.hmat_cxl_domains();
        let Some(cxl) = self.cxl.as_ref().filter(|_| !cxl_domains.is_empty()) else {
            return Vec::new();
        };
        let first = self
            .memory_affinity()
            .iter()
            .map(|r| r.proximity_domain)
            .chain(cxl_domains)
            .max()
            .unwrap_or(0)
            + 1;
        cxl.host_bridges
            .iter()
            .zip(first..)
            .map(|(hb, domain)| (domain, hb.uid))
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
    let generic_ports = cfg.generic_ports();
    if !affinity.is_empty() {
        xsdt_entries.push(image.place(&build_srat(cfg.num_cpus, &affinity, &generic_ports)?)?);
    }
    let hmat_cxl_domains = cfg.hmat_cxl_domains();
    if !hmat_cxl_domains.is_empty() {
        let port_domains: Vec<u32> = generic_ports.iter().map(|&(d, _)| d).collect();
        xsdt_entries.push(image.place(&build_hmat(&hmat_cxl_domains, &port_domains))?);
    }
    if let Some(cxl) = &cfg.cxl {
        xsdt_entries.push(image.place(&build_cedt(cxl))?);
    }
    if let Some(dmar) = &cfg.dmar {
        xsdt_entries.push(image.place(&build_dmar(dmar, cfg.pci_segment.segment))?);
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
        validate_root_buses(pci, cxl)?;
        for hb in &cxl.host_bridges {
            regions.push(("CXL host bridge registers", (hb.chbcr_base, CXL_CHBCR_LEN)));
        }
        for window in &cxl.windows {
            regions.push(("CXL fixed memory window", (window.base, window.size)));
        }
    }
    if let Some(dmar) = &cfg.dmar {
        if !matches!(dmar.host_address_width, 39 | 48) {
            return Err(AcpiError::InvalidDmar(
                "host address width must be 39 or 48 bits",
            ));
        }
        let base = dmar.register_base;
        if base == 0 || !base.is_multiple_of(DRHD_WINDOW) || range_last(base, DRHD_WINDOW).is_none()
        {
            return Err(AcpiError::InvalidRange {
                what: "VT-d register window",
                base,
                size: DRHD_WINDOW,
            });
        }
        regions.push(("VT-d register window", (base, DRHD_WINDOW)));
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

/// Further host bridges' root buses: bus numbers above the first root's and windows inside the
/// segment's, each after the previous one, so that `\_SB.PCI0` keeps the bottom of each.
fn validate_root_buses(pci: &PciSegmentConfig, cxl: &CxlConfig) -> Result<(), AcpiError> {
    let mut previous: Option<PciRootConfig> = None;
    for root in cxl.host_bridges.iter().filter_map(|hb| hb.pci_root) {
        let inside = |base: u64, size: u64, seg_base: u64, seg_size: u64| {
            size != 0
                && base >= seg_base
                && base
                    .checked_add(size)
                    .is_some_and(|end| end <= seg_base + seg_size)
        };
        let buses_ok = root.bus_start > pci.bus_start
            && root.bus_start <= root.bus_end
            && root.bus_end <= pci.bus_end
            && previous.is_none_or(|p| p.bus_end < root.bus_start);
        if !buses_ok {
            return Err(AcpiError::InvalidBusRange {
                start: root.bus_start,
                end: root.bus_end,
            });
        }
        // Each window inside the segment's, above PCI0's part, below the previous root's.
        let windows = [
            (
                "CXL host bridge root bus MMIO32 window",
                (root.mmio32_base, root.mmio32_size),
                (pci.mmio32_base, pci.mmio32_size),
                previous.map(|p| p.mmio32_base),
            ),
            (
                "CXL host bridge root bus MMIO64 window",
                (root.mmio64_base, root.mmio64_size),
                (pci.mmio64_base, pci.mmio64_size),
                previous.map(|p| p.mmio64_base),
            ),
        ];
        for (what, (base, size), (seg_base, seg_size), below) in windows {
            let ok = inside(base, size, seg_base, seg_size)
                && base > seg_base
                && below.is_none_or(|limit| base + size <= limit);
            if !ok {
                return Err(AcpiError::InvalidRange { what, base, size });
            }
        }
        previous = Some(root);
    }
    Ok(())
}

/// Rejects CXL topologies the tables cannot describe or Linux would refuse
/// (drivers/cxl/acpi.c `cxl_acpi_cfmws_verify`, `cxl_get_chbs_iter`).
fn validate_cxl(cxl: &CxlConfig) -> Result<(), AcpiError> {
    // The first ACPI0016 host bridge is \_SB.PCI0; each further one needs a root bus of its own.
    let Some((first, others)) = cxl.host_bridges.split_first() else {
        return Err(AcpiError::InvalidCxl("a CXL topology needs a host bridge"));
    };
    if first.pci_root.is_some() || others.iter().any(|hb| hb.pci_root.is_none()) {
        return Err(AcpiError::InvalidCxl(
            "the first CXL host bridge is \\_SB.PCI0; each further one needs a root bus",
        ));
    }
    if others.len() > 8 {
        return Err(AcpiError::InvalidCxl("at most 9 CXL host bridges"));
    }
    let uids_distinct = cxl
        .host_bridges
        .iter()
        .enumerate()
        .all(|(i, hb)| cxl.host_bridges[..i].iter().all(|o| o.uid != hb.uid));
    if !uids_distinct {
        return Err(AcpiError::InvalidCxl("two CXL host bridges share a _UID"));
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
        if !window.granularity.is_power_of_two() || !(256..=16384).contains(&window.granularity) {
            return Err(AcpiError::InvalidCxl(
                "a window's host bridge granularity must be 256 B to 16 KiB, a power of two",
            ));
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

#[cfg(test)]
mod tests;
