//! The platform's PCIe side as seen from vCPU exits: the ECAM window and BAR dispatch into the
//! devices crate's root complex (host bridge 00:00.0, root port 00:01.0 with its secondary bus),
//! plus the fixed MMIO regions platform devices own (the CXL host bridge's CHBCR; the VT-d
//! DRHD next).
//!
//! Adding a device: a PCI function goes below a root port of its own
//! ([`Platform::add_behind_root_port`]) or on the root bus as an integrated endpoint
//! ([`Platform::add_root_bus_function`]); a register block at a fixed address is a
//! [`Platform::add_fixed_mmio`]. Nothing else in the VMM needs to change for the exits to reach
//! it.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusDevice, lock};
use devices::pci::{
    BridgeResources, HostBridge, PciAddress, PciDevice, PciError, PciRootComplex, PciWindows,
    RootPort, RootPortConfig,
};
use iommu::MsiSink;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::layout::*;

/// PCIe root complex behind the ECAM window and the BAR windows.
pub struct Platform {
    root_complex: Mutex<PciRootComplex>,
    _memory: GuestMemoryAtomic<GuestMemoryMmap>,
    /// Register blocks at fixed addresses (CXL CHBCR, …), decoded before ECAM and BARs.
    fixed_mmio: Bus,
}

/// The BAR windows, from the memory map.
pub fn windows() -> PciWindows {
    PciWindows {
        mmio32_base: PCI_MMIO32_START,
        mmio32_size: PCI_MMIO32_SIZE,
        mmio64_base: PCI_MMIO64_START,
        mmio64_size: PCI_MMIO64_SIZE,
    }
}

impl Platform {
    /// Builds segment 0: the host bridge and one root port (where CXL and other PCIe endpoints
    /// attach). Every MSI the devices raise goes to `msi`.
    pub fn new(
        msi: Arc<dyn MsiSink>,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> Result<Self, String> {
        let err = |e: PciError| e.to_string();
        let mut rc = PciRootComplex::new(windows()).map_err(err)?;
        rc.add_device(
            PciAddress::new(0, 0, 0).map_err(err)?,
            Box::new(HostBridge::new()),
        )
        .map_err(err)?;
        let port = RootPort::new(RootPortConfig::new(1), msi).map_err(err)?;
        rc.add_bridge(
            PciAddress::new(0, 1, 0).map_err(err)?,
            Box::new(port),
            BridgeResources::default(),
        )
        .map_err(err)?;
        Ok(Self {
            root_complex: Mutex::new(rc),
            _memory: memory,
            fixed_mmio: Bus::new(),
        })
    }

    /// Adds `port` (a root port, type 1) at `root_bus`:`device`.0 (root bus 0, or one made by
    /// [`Self::add_root_bus`]) and `endpoint` as function 0 of its secondary bus; returns the
    /// endpoint's address.
    pub fn add_behind_root_port(
        &mut self,
        root_bus: u8,
        device: u8,
        port: Box<dyn PciDevice>,
        endpoint: Box<dyn PciDevice>,
    ) -> Result<PciAddress, String> {
        let err = |e: PciError| e.to_string();
        let mut rc = lock(&self.root_complex);
        let bus = rc
            .add_bridge(
                PciAddress::new(root_bus, device, 0).map_err(err)?,
                port,
                BridgeResources::default(),
            )
            .map_err(err)?;
        let address = PciAddress::new(bus, 0, 0).map_err(err)?;
        rc.add_device(address, endpoint).map_err(err)?;
        Ok(address)
    }

    /// Adds `function` as function 0 of device `device` on the root bus (a Root Complex
    /// Integrated Endpoint: no bridge above it, so Linux gives it an IOMMU group of its own);
    /// returns its address.
    pub fn add_root_bus_function(
        &mut self,
        device: u8,
        function: Box<dyn PciDevice>,
    ) -> Result<PciAddress, String> {
        let err = |e: PciError| e.to_string();
        let address = PciAddress::new(0, device, 0).map_err(err)?;
        lock(&self.root_complex)
            .add_device(address, function)
            .map_err(err)?;
        Ok(address)
    }

    /// Adds `function` as function `number` of root-bus device `device` (function 0 must be
    /// there first: Linux scans the other functions only when function 0 says it has them).
    pub fn add_root_bus_function_at(
        &mut self,
        device: u8,
        number: u8,
        function: Box<dyn PciDevice>,
    ) -> Result<PciAddress, String> {
        let err = |e: PciError| e.to_string();
        let address = PciAddress::new(0, device, number).map_err(err)?;
        lock(&self.root_complex)
            .add_device(address, function)
            .map_err(err)?;
        Ok(address)
    }

    /// Adds a further root bus `number` (a second host bridge of the segment) with the top
    /// `mem_size` / `pref_size` bytes of the 32-bit / 64-bit windows; see
    /// [`PciRootComplex::add_root_bus`].
    pub fn add_root_bus(
        &mut self,
        number: u8,
        mem_size: u64,
        pref_size: u64,
    ) -> Result<devices::pci::RootBusResources, String> {
        lock(&self.root_complex)
            .add_root_bus(number, mem_size, pref_size)
            .map_err(|e| e.to_string())
    }

    /// Maps `device`'s registers at the fixed range `[base, base + size)` (`name` is for
    /// errors): CPU accesses there reach it with the offset into the range.
    pub fn add_fixed_mmio(
        &mut self,
        name: &str,
        base: u64,
        size: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), String> {
        self.fixed_mmio
            .insert(device, base, size)
            .map_err(|e| format!("{name}: {e}"))
    }

    fn ecam_offset(addr: u64) -> Option<u64> {
        addr.checked_sub(PCI_ECAM_START)
            .filter(|&off| off < PCI_ECAM_SIZE)
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        lock(&self.root_complex).pio_read(port, data)
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        lock(&self.root_complex).pio_write(port, data)
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if self.fixed_mmio.read(addr, data) {
            return true;
        }
        let mut rc = lock(&self.root_complex);
        match Self::ecam_offset(addr) {
            Some(off) => {
                rc.ecam_read(off, data);
                true
            }
            None => rc.mmio_read(addr, data),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if self.fixed_mmio.write(addr, data) {
            return true;
        }
        let mut rc = lock(&self.root_complex);
        match Self::ecam_offset(addr) {
            Some(off) => {
                rc.ecam_write(off, data);
                true
            }
            None => rc.mmio_write(addr, data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn platform() -> Platform {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Platform::new(Arc::new(iommu::NullMsiSink), GuestMemoryAtomic::new(mem)).unwrap()
    }

    fn ecam_addr(bus: u64, dev: u64, func: u64, reg: u64) -> u64 {
        PCI_ECAM_START | (bus << 20) | (dev << 15) | (func << 12) | reg
    }

    #[test]
    fn ecam_window_decodes_host_bridge_and_root_port() {
        let p = platform();
        let mut d = [0u8; 4];
        assert!(p.mmio_read(ecam_addr(0, 0, 0, 0x8), &mut d));
        assert_eq!(u32::from_le_bytes(d) >> 8, 0x06_0000, "host bridge class");
        assert!(p.mmio_read(ecam_addr(0, 1, 0, 0x8), &mut d));
        assert_eq!(u32::from_le_bytes(d) >> 8, 0x06_0400, "root port class");
        // The root port's extended capability list starts at 0x100 with a real header.
        assert!(p.mmio_read(ecam_addr(0, 1, 0, 0x100), &mut d));
        let header = u32::from_le_bytes(d);
        assert!(header != 0 && header != 0xffff_ffff);
        // Absent functions read all-ones.
        assert!(p.mmio_read(ecam_addr(0, 7, 0, 0), &mut d));
        assert_eq!(d, [0xff; 4]);
        // Outside the ECAM window and any BAR: not ours.
        assert!(!p.mmio_read(PCI_ECAM_START + PCI_ECAM_SIZE, &mut d));
    }

    /// A register block that remembers the last write.
    struct Regs(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Regs {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn fixed_mmio_regions_get_their_offsets_and_may_not_overlap() {
        let mut p = platform();
        let regs = Arc::new(Mutex::new(Regs(Vec::new())));
        p.add_fixed_mmio("test block", CXL_CHBCR_START, 0x1_0000, regs.clone())
            .unwrap();
        let mut d = [0u8; 4];
        assert!(p.mmio_read(CXL_CHBCR_START + 0x24, &mut d));
        assert_eq!(d, [0x24; 4]);
        assert!(p.mmio_write(CXL_CHBCR_START + 0x10, &[1, 2]));
        assert_eq!(lock(&regs).0, vec![(0x10, vec![1, 2])]);
        assert!(!p.mmio_read(CXL_CHBCR_START + 0x1_0000, &mut d));
        let err = p
            .add_fixed_mmio("second block", CXL_CHBCR_START + 0x8000, 0x1000, regs)
            .unwrap_err();
        assert!(err.starts_with("second block: "), "{err}");
    }
}
