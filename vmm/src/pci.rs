//! The platform's PCIe side as seen from vCPU exits: the ECAM window and BAR dispatch into the
//! devices crate's root complex (host bridge 00:00.0, root port 00:01.0 with its secondary bus).

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::pci::{
    BridgeResources, HostBridge, PciAddress, PciError, PciRootComplex, PciWindows, RootPort,
    RootPortConfig,
};
use iommu::MsiSink;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::layout::*;

/// PCIe root complex behind the ECAM window and the BAR windows.
pub struct Platform {
    root_complex: Mutex<PciRootComplex>,
    _memory: GuestMemoryAtomic<GuestMemoryMmap>,
    /// CXL host bridge component registers (CHBCR), when CXL devices are configured.
    chbcr: Option<Arc<Mutex<devices::cxl::CxlHostBridge>>>,
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
            chbcr: None,
        })
    }

    /// Adds a CXL root port at 00:`device`.0 and `endpoint` below it.
    pub fn add_cxl_device(
        &mut self,
        device: u8,
        port: Box<dyn devices::pci::PciDevice>,
        endpoint: Box<dyn devices::pci::PciDevice>,
    ) -> Result<(), String> {
        let err = |e: PciError| e.to_string();
        let mut rc = lock(&self.root_complex);
        let bus = rc
            .add_bridge(
                PciAddress::new(0, device, 0).map_err(err)?,
                port,
                BridgeResources::default(),
            )
            .map_err(err)?;
        rc.add_device(PciAddress::new(bus, 0, 0).map_err(err)?, endpoint)
            .map_err(err)
    }

    /// Maps the CXL host bridge component registers at `CXL_CHBCR_START`.
    pub fn set_cxl_host_bridge(&mut self, hb: Arc<Mutex<devices::cxl::CxlHostBridge>>) {
        self.chbcr = Some(hb);
    }

    fn chbcr_offset(&self, addr: u64) -> Option<(&Mutex<devices::cxl::CxlHostBridge>, u64)> {
        let hb = self.chbcr.as_ref()?;
        let off = addr
            .checked_sub(CXL_CHBCR_START)
            .filter(|&o| o < CXL_CHBCR_SIZE)?;
        Some((hb, off))
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
        if let Some((hb, off)) = self.chbcr_offset(addr) {
            devices::bus::BusDevice::read(&mut *lock(hb), off, data);
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
        if let Some((hb, off)) = self.chbcr_offset(addr) {
            devices::bus::BusDevice::write(&mut *lock(hb), off, data);
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
}
