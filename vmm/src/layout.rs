//! Guest physical memory map (x86_64) and fixed I/O ports.
//!
//! ```text
//! 0x0000_0000 .. 0x0009_fc00  low RAM (zero page, PVH start info, command line, page tables)
//! 0x000e_0000 .. 0x0010_0000  ACPI tables (reserved in E820; RSDP at the start)
//! 0x0010_0000 .. low_ram_end  RAM (kernel, initrd); low_ram_end = min(total, 3 GiB)
//! 0xc000_0000 .. 0xe000_0000  PCI MMIO32 window (BARs)
//! 0xe000_0000 .. 0xf000_0000  PCIe ECAM, buses 0..=255 (reserved in E820, PNP0C02 _CRS, MCFG)
//! 0xfec0_0000                 IOAPIC
//! 0xfed9_0000                 VT-d remapping unit registers (DRHD), with --iommu vtd
//! 0xfee0_0000                 local APIC
//! 0x1_0000_0000 ..            high RAM (the rest of guest memory)
//! 0x80_0000_0000 ..           PCI MMIO64 window (64 GiB; below 2^40 so 40-bit-PA CPUs reach it)
//! ```

/// Boot parameters ("zero page") for the bzImage boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PVH `hvm_start_info` and its memory map / module list.
pub const PVH_INFO_START: u64 = 0x6000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Maximum kernel command line length we accept (COMMAND_LINE_SIZE on x86).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Boot GDT and IDT for the 64-bit bzImage entry.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// Identity-mapped boot page tables (PML4, PDPT, 4 PDs covering 4 GiB with 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Initial stack pointer for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// End of the usable low RAM below the EBDA.
pub const EBDA_START: u64 = 0x9_fc00;

/// ACPI tables area; RSDP first.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_SIZE: u64 = 0x2_0000;

/// Where the kernel is loaded (1 MiB, the boot protocol's default).
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit hole.
pub const MEM_32BIT_HOLE_START: u64 = 0xc000_0000;
/// PCI 32-bit MMIO window for BARs.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCIe enhanced configuration access mechanism (ECAM) window.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// First and last bus number decoded by the ECAM window.
pub const PCI_ECAM_BUS_START: u8 = 0;
pub const PCI_ECAM_BUS_END: u8 = 255;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// The VT-d remapping unit's 4 KiB register window (the DMAR's DRHD register base), where
/// QEMU's intel-iommu puts it too.
pub const VTD_DRHD_START: u64 = 0xfed9_0000;
pub const VTD_DRHD_SIZE: u64 = 0x1000;
/// Start of RAM above the 32-bit hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// PCI 64-bit MMIO window for BARs.
pub const PCI_MMIO64_START: u64 = 0x80_0000_0000;
pub const PCI_MMIO64_SIZE: u64 = 0x10_0000_0000;

/// ACPI fixed-hardware replacement (HW-reduced ACPI): sleep control/status and reset register.
/// Writing `(SLP_TYP << 2) | SLP_EN(0x20)` powers off (S5); writing [`ACPI_RESET_VALUE`] resets.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
pub const ACPI_RESET_PORT: u16 = 0x3c2;
pub const ACPI_RESET_VALUE: u8 = 0x01;
/// `_S5_` sleep type value the DSDT advertises.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;

/// Guest channel: the project's guest init writes here (through /dev/port).
/// A byte written to [`GUEST_MARKER_PORT`] is a boot marker (1 = init started);
/// a byte written to [`GUEST_EXIT_STATUS_PORT`] is the command's exit status.
pub const GUEST_MARKER_PORT: u16 = 0x500;
pub const GUEST_EXIT_STATUS_PORT: u16 = 0x501;

/// 16550 UARTs: COM1 is the kernel console (ttyS0), COM2 carries the command's stdout (ttyS1),
/// COM3 its stderr (ttyS2).
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const COM2_PORT: u16 = 0x2f8;
pub const COM2_IRQ: u32 = 3;
pub const COM3_PORT: u16 = 0x3e8;
pub const COM3_IRQ: u32 = 4;

// ---- CXL (issue: CXL 2.0 Type 3 memory device) ----
/// CXL host bridge component registers (CHBCR, CXL 2.0 8.2.5), 64 KiB per host bridge, listed in
/// the CEDT CHBS; outside E820 RAM and outside the PCI windows.
pub const CXL_CHBCR_START: u64 = 0xf000_0000;
pub const CXL_CHBCR_SIZE: u64 = 0x1_0000;
/// CXL fixed memory windows (CEDT CFMWS): host physical addresses the HDM decoders map device
/// memory into. Above the largest RAM (256 GiB), below the 64-bit PCI window; 256 MiB aligned.
pub const CXL_WINDOW_START: u64 = 0x40_0000_0000;
pub const CXL_WINDOW_MAX_SIZE: u64 = 0x40_0000_0000;
/// The second CXL host bridge (`--cxl-type3 …,host-bridge=1`), `\_SB.PCI1`: root bus 0x80 (so
/// buses 0x80..=0xff), the top 128 MiB of the 32-bit and the top 16 GiB of the 64-bit PCI
/// window; its CHBCR follows the first's.
pub const CXL_SECOND_ROOT_BUS: u8 = 0x80;
pub const CXL_SECOND_ROOT_MMIO32_SIZE: u64 = 128 << 20;
pub const CXL_SECOND_ROOT_MMIO64_SIZE: u64 = 16 << 30;
