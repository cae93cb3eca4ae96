//! PCI/PCIe framework: config space model, capabilities, host bridge, root ports and the ECAM
//! root complex.
//!
//! Everything here is pure device logic (no KVM): the VMM forwards ECAM and BAR MMIO exits to a
//! [`PciRootComplex`], and devices raise interrupts through an [`iommu::MsiSink`]. A fuzzer can
//! drive [`PciRootComplex::ecam_read`]/[`PciRootComplex::ecam_write`]/
//! [`PciRootComplex::mmio_read`]/[`PciRootComplex::mmio_write`] with arbitrary bytes.
//!
//! Module map:
//! - [`config`]: 4 KiB config space with write / write-1-to-clear masks, type 0/1 headers, BARs;
//! - [`capability`]: capability builders (PM, AER, VSEC, DVSEC, generic) and list walkers;
//! - [`address_translation`]: ATS, PASID and PRI capabilities and their enable/reset/status
//!   semantics ([`address_translation::AddressTranslation`] reports each change to the device);
//! - [`pcie`]: the PCI Express capability;
//! - [`msi`]: MSI capability (64-bit, per-vector masking);
//! - [`msix`]: MSI-X capability and table/PBA;
//! - [`function`]: [`SharedFunction`] (a function the root complex and the VMM both hold) and
//!   [`FunctionInterrupts`] (raising its MSI-X vectors from device workers);
//! - [`registers`]: 32-bit register blocks with byte enables behind 1/2/4/8-byte MMIO accesses;
//! - [`host_bridge`], [`root_port`]: the platform's fixed functions;
//! - [`root_complex`]: topology, ECAM decode, type 1 forwarding, BAR dispatch and allocation.
//!
//! VMM wiring (host bridge at 00:00.0, root port at 00:01.0 with secondary bus 1):
//!
//! ```
//! use std::sync::Arc;
//! use devices::pci::{
//!     BridgeResources, HostBridge, PciAddress, PciRootComplex, PciWindows, RootPort,
//!     RootPortConfig,
//! };
//!
//! # fn main() -> Result<(), devices::pci::PciError> {
//! let msi: Arc<dyn iommu::MsiSink> = Arc::new(iommu::NullMsiSink); // VMM: KVM_SIGNAL_MSI
//! let mut rc = PciRootComplex::new(PciWindows::default())?;
//! rc.add_device(PciAddress::new(0, 0, 0)?, Box::new(HostBridge::new()))?;
//! let port = RootPort::new(RootPortConfig::new(1), msi.clone())?;
//! let bus = rc.add_bridge(PciAddress::new(0, 1, 0)?, Box::new(port), BridgeResources::default())?;
//! assert_eq!(bus, 1); // endpoints go at PciAddress::new(bus, 0, 0)
//!
//! // MMIO exit in 0xe000_0000..0xf000_0000: pass the offset into the ECAM window.
//! let mut id = [0u8; 4];
//! rc.ecam_read(0xe000_8000 - 0xe000_0000, &mut id); // 00:01.0, register 0
//! assert_eq!(u32::from_le_bytes(id), 0x000c_1b36);
//! // Any other MMIO exit: try the BARs; `false` means no BAR decodes it.
//! let mut data = [0u8; 4];
//! let _claimed = rc.mmio_read(0xc000_0000, &mut data);
//! # Ok(())
//! # }
//! ```

pub mod address_translation;
pub mod aer;
pub mod capability;
pub mod config;
pub mod doe;
pub mod function;
pub mod host_bridge;
pub mod msi;
pub mod msix;
pub mod pcie;
pub mod registers;
pub mod root_complex;
pub mod root_port;

use std::fmt;

use iommu::RequesterId;
use thiserror::Error;

pub use capability::{Capability, ExtendedCapability};
pub use config::{ConfigSpace, HeaderType, PciIds};
pub use function::{FunctionInterrupts, SharedFunction};
pub use host_bridge::HostBridge;
pub use msi::MsiCapability;
pub use msix::{MsixCapability, MsixTable, MsixTriggerResult};
pub use pcie::{LinkSpeed, PcieCapabilityConfig, PciePortType};
pub use root_complex::{BridgeResources, PciRootComplex, PciWindows, RootBusResources};
pub use root_port::{RootPort, RootPortConfig, RootPortCore};

/// Vendor and device IDs of the functions this crate provides.
///
/// The project has no PCI-SIG vendor ID of its own. The platform functions use the IDs Red Hat
/// assigned to QEMU's generic virtual PCIe host bridge and root port (vendor 0x1b36, see
/// QEMU's `docs/specs/pci-ids.rst`): Linux has no quirks keyed on them, `lspci` names them from
/// pci.ids, and guest drivers bind by class code, never by these IDs. Change them here only.
pub mod ids {
    /// Red Hat, Inc. (QEMU virtual devices).
    pub const VENDOR_REDHAT: u16 = 0x1b36;
    /// "QEMU PCIe Host bridge".
    pub const DEVICE_HOST_BRIDGE: u16 = 0x0008;
    /// "QEMU PCIe Root port".
    pub const DEVICE_ROOT_PORT: u16 = 0x000c;
    /// Class code of a host bridge (base 0x06, sub 0x00, prog-if 0x00).
    pub const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;
    /// Class code of a PCI-to-PCI bridge, normal decode (base 0x06, sub 0x04, prog-if 0x00).
    pub const CLASS_PCI_BRIDGE: u32 = 0x06_04_00;
}

/// Errors from building or populating the PCI topology (VMM-side; guest accesses never error).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciError {
    /// Device number > 31 or function number > 7.
    #[error("invalid PCI address {bus:02x}:{device:02x}.{function}")]
    InvalidAddress {
        /// Bus number.
        bus: u8,
        /// Device number.
        device: u8,
        /// Function number.
        function: u8,
    },
    /// No bus with this number is reachable from the root bus.
    #[error("bus {0:#04x} does not exist")]
    NoSuchBus(u8),
    /// A further root bus cannot be added as asked.
    #[error("cannot add root bus {number:#04x}: {reason}")]
    RootBus {
        /// Its bus number.
        number: u8,
        /// Why not.
        reason: &'static str,
    },
    /// A function is already present at this address.
    #[error("{0} is already occupied")]
    SlotOccupied(PciAddress),
    /// A PCIe downstream port only forwards to device 0 (PCIe Base Spec r6.0, 7.3.1).
    #[error("{0}: only device 0 is reachable below a PCIe downstream port")]
    NotDeviceZero(PciAddress),
    /// Not enough bus numbers left below the parent bus.
    #[error("no bus numbers left for a bridge at {0}")]
    BusNumbersExhausted(PciAddress),
    /// A BAR or bridge window could not be placed.
    #[error("cannot allocate {size:#x} bytes of {what} for {address}")]
    OutOfSpace {
        /// Function being placed.
        address: PciAddress,
        /// What was being allocated.
        what: &'static str,
        /// Requested size.
        size: u64,
    },
    /// Invalid BAR definition (index, size or overlap with another BAR).
    #[error("invalid BAR {index}: {reason}")]
    InvalidBar {
        /// BAR index.
        index: u8,
        /// What is wrong.
        reason: &'static str,
    },
    /// The capability does not fit in the remaining config space.
    #[error("no room for a {len}-byte capability")]
    CapabilitySpaceFull {
        /// Capability length.
        len: usize,
    },
    /// Invalid capability contents.
    #[error("invalid capability: {0}")]
    InvalidCapability(&'static str),
    /// Invalid MSI-X layout.
    #[error("invalid MSI-X layout: {0}")]
    InvalidMsix(&'static str),
    /// Invalid window layout given to the root complex.
    #[error("invalid address window: {0}")]
    InvalidWindow(&'static str),
    /// A device model was asked for a configuration it does not support.
    #[error("{0}")]
    InvalidConfig(String),
}

/// A bus/device/function address as currently seen on the bus hierarchy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// Bus number (0..=255).
    pub bus: u8,
    /// Device number (0..=31).
    pub device: u8,
    /// Function number (0..=7).
    pub function: u8,
}

impl PciAddress {
    /// Validates device (≤ 31) and function (≤ 7) numbers.
    pub fn new(bus: u8, device: u8, function: u8) -> Result<Self, PciError> {
        if device > 31 || function > 7 {
            return Err(PciError::InvalidAddress {
                bus,
                device,
                function,
            });
        }
        Ok(PciAddress {
            bus,
            device,
            function,
        })
    }

    /// From a bus number and a combined device/function byte (Linux `PCI_DEVFN`).
    pub fn from_devfn(bus: u8, devfn: u8) -> Self {
        PciAddress {
            bus,
            device: devfn >> 3,
            function: devfn & 7,
        }
    }

    /// Combined device/function byte.
    pub fn devfn(&self) -> u8 {
        ((self.device & 0x1f) << 3) | (self.function & 7)
    }

    /// The requester ID a function at this address uses.
    pub fn requester_id(&self) -> RequesterId {
        RequesterId::new(self.bus, self.device, self.function)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Kind of a memory BAR (PCI Local Bus Spec 3.0, 6.2.5.1). I/O BARs are not supported (the
/// platform has no I/O window).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// 32-bit memory BAR (type 00b).
    Memory32,
    /// 64-bit memory BAR (type 10b), occupying this BAR register and the next.
    Memory64,
}

/// A BAR as currently programmed by the guest (or by the VMM at device add).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR index (0..=5 for type 0, 0..=1 for type 1). For 64-bit BARs, the lower register.
    pub index: u8,
    /// Current base address (naturally aligned to `size`).
    pub address: u64,
    /// Size in bytes (power of two).
    pub size: u64,
    /// 32- or 64-bit.
    pub kind: BarKind,
    /// Prefetchable bit.
    pub prefetchable: bool,
}

/// A PCI function as the root complex sees it.
///
/// The root complex only passes config accesses of 1..=4 bytes inside one DWORD below 4096,
/// and BAR accesses that lie entirely inside the BAR (offset relative to the BAR base).
/// Implementations must nevertheless tolerate anything (unhandled reads return all-ones, bad
/// writes are ignored) and never panic: tests and fuzzers call them directly.
///
/// Most devices embed a [`ConfigSpace`] (plus a [`MsixCapability`] if they have MSI-X) and only
/// implement their BAR semantics; see [`RootPort`] for the pattern.
pub trait PciDevice: Send {
    /// Reads `data.len()` bytes of config space at `offset`.
    fn config_read(&mut self, offset: u16, data: &mut [u8]);
    /// Writes config space at `offset`.
    fn config_write(&mut self, offset: u16, data: &[u8]);
    /// Reads from memory BAR `bar` at `offset` from its base.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// Writes to memory BAR `bar` at `offset` from its base.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
    /// Implemented BARs with their current addresses and sizes.
    fn bars(&self) -> Vec<BarInfo>;
    /// The function's requester ID changed: it captured a new bus/device number from a type 0
    /// configuration write (PCIe Base Spec r6.0, 2.2.6.2), or was just added. Devices that do DMA
    /// or send MSIs re-tag them here.
    fn set_requester_id(&mut self, _requester_id: RequesterId) {}
    /// Short name for logs.
    fn name(&self) -> &str {
        "pci-function"
    }
}

/// Returns true if `len` bytes at `offset` lie within one naturally-sized DWORD of a
/// `limit`-byte space: the accesses a PCIe configuration request can express (1..=4 bytes with
/// contiguous byte enables inside one DWORD, PCIe Base Spec r6.0, 2.2.7).
pub(crate) fn config_access_ok(offset: u64, len: usize, limit: u64) -> bool {
    (1..=4).contains(&len)
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= limit && (offset & !3) == ((end - 1) & !3))
}

/// Little-endian value of up to 8 bytes.
pub(crate) fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0u64, |acc, (i, b)| acc | (u64::from(*b) << (8 * i)))
}

/// Stores the low `data.len()` bytes (≤ 8) of `value` little-endian.
pub(crate) fn le_store(value: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().take(8).enumerate() {
        *b = (value >> (8 * i)) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_address_and_access_rules() {
        let a = PciAddress::new(1, 2, 3).unwrap();
        assert_eq!(a.devfn(), 0x13);
        assert_eq!(PciAddress::from_devfn(1, 0x13), a);
        assert_eq!(a.to_string(), "01:02.3");
        assert_eq!(a.requester_id(), RequesterId(0x0113));
        assert!(PciAddress::new(0, 32, 0).is_err());
        assert!(PciAddress::new(0, 0, 8).is_err());

        assert!(config_access_ok(0, 4, 4096));
        assert!(config_access_ok(1, 2, 4096));
        assert!(config_access_ok(3, 1, 4096));
        assert!(!config_access_ok(3, 2, 4096));
        assert!(!config_access_ok(2, 4, 4096));
        assert!(!config_access_ok(0, 8, 4096));
        assert!(!config_access_ok(0, 0, 4096));
        assert!(!config_access_ok(4094, 4, 4096));
        assert!(!config_access_ok(4096, 1, 4096));
        assert!(!config_access_ok(u64::MAX, 1, 4096));
        assert!(config_access_ok(252, 4, 256));

        let mut b = [0u8; 3];
        le_store(0x0011_2233, &mut b);
        assert_eq!(b, [0x33, 0x22, 0x11]);
        assert_eq!(le_value(&b), 0x11_2233);
    }
}
