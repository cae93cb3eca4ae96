//! A CXL 2.0 root port: a PCI Express Root Port (type 1 header, class 0x060400, port type 4)
//! with the CXL port DVSECs and a component register block, built like
//! [`crate::pci::RootPort`] on the same [`RootPortCore`].
//!
//! Linux treats it as a downstream port ("dport") of the host bridge's CXL port:
//! `devm_cxl_add_dport_by_dev` (drivers/cxl/core/pci.c) takes its Port Number from Link
//! Capabilities and requires a component register block in the Register Locator DVSEC; the
//! dport's RAS capability is mapped by `devm_cxl_dport_ras_setup`; `cxl_gpf_port_setup`
//! programs the GPF DVSEC; `set_pcie_cxl` (drivers/pci/probe.c) reads the Flex Bus DVSEC.
//! Root ports have no HDM decoders (CXL 2.0 Table 141): the host bridge's decoders target them
//! by Port Number.
//!
//! Layout:
//! - BAR0: component registers, 64 KiB, 32-bit (RAS and Link capabilities);
//! - BAR1: MSI-X table at 0 and PBA at 0x800, 4 KiB, 32-bit;
//! - capabilities: PCI Express (root port, Port Number), MSI-X, Power Management;
//! - extended capabilities: AER (with root registers), CXL Extensions DVSEC for Ports (ID 3),
//!   GPF DVSEC for Ports (ID 4), Flex Bus Port DVSEC (ID 7), Register Locator DVSEC (ID 8).

use std::sync::Arc;

use iommu::{MsiSink, RequesterId};

use crate::pci::{
    BarInfo, ConfigSpace, MsixTriggerResult, PciDevice, RootPortConfig, RootPortCore,
};

use super::component::ComponentRegisters;
use super::dvsec::{self, RegisterBlock, regloc};
use super::{COMPONENT_BLOCK_SIZE, CxlError};

/// BAR holding the component registers.
pub const COMPONENT_BAR: u8 = 0;
/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 1;
/// Size of the MSI-X BAR.
pub const MSIX_BAR_SIZE: u64 = crate::pci::root_port::ROOT_PORT_BAR0_SIZE;

/// A CXL root port: the PCIe root port core plus the CXL port DVSECs and component registers.
#[derive(Debug)]
pub struct CxlRootPort {
    core: RootPortCore,
    component: ComponentRegisters,
    port_number: u8,
}

impl CxlRootPort {
    /// Builds a root port delivering its interrupts to `msi`; `cfg.port_number` is the ID host
    /// bridge decoders use in their target lists (Linux `pci_get_port_num` reads it from Link
    /// Capabilities; unique per host bridge). [`RootPortConfig::cxl`] gives CXL's link speed.
    pub fn new(cfg: RootPortConfig, msi: Arc<dyn MsiSink>) -> Result<Self, CxlError> {
        let mut core =
            RootPortCore::new(cfg, MSIX_BAR, &[(COMPONENT_BAR, COMPONENT_BLOCK_SIZE)], msi)?;
        let config = core.config_mut();
        config.add_ext_capability(&dvsec::port_extensions_dvsec())?;
        config.add_ext_capability(&dvsec::gpf_port_dvsec())?;
        config.add_ext_capability(&dvsec::flex_bus_port_dvsec())?;
        config.add_ext_capability(&dvsec::register_locator_dvsec(&[RegisterBlock {
            bir: COMPONENT_BAR,
            block_id: regloc::BLOCK_COMPONENT,
            offset: 0,
        }]))?;
        Ok(CxlRootPort {
            core,
            component: ComponentRegisters::new(true, None),
            port_number: cfg.port_number,
        })
    }

    /// The Port Number host bridge decoders target.
    pub fn port_number(&self) -> u8 {
        self.port_number
    }

    /// Offset of the PCI Express capability.
    pub fn pcie_offset(&self) -> u16 {
        self.core.pcie_offset()
    }

    /// Offset of the AER extended capability.
    pub fn aer_offset(&self) -> u16 {
        self.core.aer_offset()
    }

    /// Config space (device-side view).
    pub fn config(&self) -> &ConfigSpace {
        self.core.config()
    }

    /// Config space, mutably (to raise status bits).
    pub fn config_mut(&mut self) -> &mut ConfigSpace {
        self.core.config_mut()
    }

    /// Component registers (RAS).
    pub fn component(&self) -> &ComponentRegisters {
        &self.component
    }

    /// Component registers, mutably (RAS injection).
    pub fn component_mut(&mut self) -> &mut ComponentRegisters {
        &mut self.component
    }

    /// Signals MSI-X `vector` (PME, AER, …).
    pub fn trigger(&mut self, vector: u16) -> MsixTriggerResult {
        self.core.trigger(vector)
    }

    /// The endpoint below (device 0 function 0 of the secondary bus) sent `message`: the root
    /// error registers record it with that endpoint's requester ID, and the AER interrupt
    /// (MSI-X vector 0, the AER Interrupt Message Number) fires when the Root Error Command
    /// enables it — Linux's `aer_isr` then finds the source and calls its driver's handlers.
    /// Returns whether the interrupt was signalled.
    pub fn receive_error_message(&mut self, message: crate::pci::aer::ErrorMessage) -> bool {
        let secondary = self.config().read_u8(crate::pci::config::SECONDARY_BUS);
        let source = u16::from(secondary) << 8;
        let aer = self.aer_offset();
        if crate::pci::aer::root_receive(self.config_mut(), aer, message, source) {
            self.trigger(0);
            true
        } else {
            false
        }
    }
}

impl PciDevice for CxlRootPort {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.core.config_read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.core.config_write(offset, data);
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            COMPONENT_BAR => self.component.read(offset, data),
            _ => {
                if !self.core.msix_bar_read(bar, offset, data) {
                    data.fill(0);
                }
            }
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            COMPONENT_BAR => self.component.write(offset, data),
            _ => {
                if !self.core.msix_bar_write(bar, offset, data) {
                    log::debug!("cxl root port: ignoring BAR{bar} write at {offset:#x}");
                }
            }
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.core.bars()
    }

    fn set_requester_id(&mut self, requester_id: RequesterId) {
        self.core.set_requester_id(requester_id);
    }

    fn name(&self) -> &str {
        "cxl-root-port"
    }
}

#[cfg(test)]
mod tests {
    use iommu::{NullMsiSink, RecordingMsiSink};

    use super::*;
    use crate::cxl::component::tests::probe;
    use crate::cxl::component::{RAS_OFFSET, ras};
    use crate::cxl::dvsec::{find_dvsec, flex_bus, gpf_port, id, port_ext};
    use crate::pci::capability::{cap_id, ext_cap_id, find_capability, find_ext_capability};
    use crate::pci::pcie::{FLAGS, LNKCAP, PciePortType};

    fn cfg16(p: &mut CxlRootPort, off: u16) -> u16 {
        let mut b = [0u8; 2];
        p.config_read(off, &mut b);
        u16::from_le_bytes(b)
    }

    fn cfg32(p: &mut CxlRootPort, off: u16) -> u32 {
        let mut b = [0u8; 4];
        p.config_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn dport_view_matches_linux() {
        let mut p = CxlRootPort::new(RootPortConfig::cxl(7), Arc::new(NullMsiSink)).unwrap();
        assert_eq!(p.port_number(), 7);
        assert_eq!(cfg32(&mut p, 8) >> 8, crate::pci::ids::CLASS_PCI_BRIDGE);
        assert_eq!(cfg32(&mut p, 0x0c) >> 16 & 0x7f, 1, "type 1 header");
        let mut rd = |o: u16, b: &mut [u8]| p.config_read(o, b);
        let pcie = u16::from(find_capability(&mut rd, cap_id::PCI_EXPRESS).unwrap());
        assert!(find_capability(&mut rd, cap_id::MSIX).is_some());
        assert_eq!(find_ext_capability(&mut rd, ext_cap_id::AER), Some(0x100));
        let pe = find_dvsec(&mut rd, id::PORT_EXTENSIONS).unwrap();
        let gpf = find_dvsec(&mut rd, id::GPF_PORT).unwrap();
        let fb = find_dvsec(&mut rd, id::FLEX_BUS_PORT).unwrap();
        let rl = find_dvsec(&mut rd, id::REGISTER_LOCATOR).unwrap();
        assert!(find_dvsec(&mut rd, id::CXL_DEVICE).is_none());
        // pci_get_port_num: root port type, Port Number in LNKCAP[31:24].
        let flags = cfg16(&mut p, pcie + FLAGS as u16);
        assert_eq!(
            PciePortType::from_bits(((flags >> 4) & 0xf) as u8),
            Some(PciePortType::RootPort)
        );
        assert_eq!(cfg32(&mut p, pcie + LNKCAP as u16) >> 24, 7);
        // set_pcie_cxl: CXL.mem enabled in the Flex Bus status.
        assert_ne!(
            cfg16(&mut p, fb + flex_bus::STATUS as u16) & flex_bus::MEM,
            0
        );
        // cxl_sbr_masked: SBR masked at reset, unmask writable.
        assert_eq!(cfg16(&mut p, pe + port_ext::CTRL as u16), 0);
        p.config_write(pe + port_ext::CTRL as u16, &1u16.to_le_bytes());
        assert_eq!(cfg16(&mut p, pe + port_ext::CTRL as u16), 1);
        // update_gpf_port_dvsec: base 2, scale 7 for both phases.
        for off in [gpf_port::PHASE1_CTRL, gpf_port::PHASE2_CTRL] {
            p.config_write(gpf + off as u16, &0x0702u16.to_le_bytes());
            assert_eq!(cfg16(&mut p, gpf + off as u16), 0x0702);
        }
        // Register locator: one component block at BAR0 offset 0.
        assert_eq!(cfg32(&mut p, rl + 4) >> 20, 0x14);
        assert_eq!(cfg32(&mut p, rl + 0xc), 0x0000_0100);
        assert_eq!(cfg32(&mut p, rl + 0x10), 0);
        let bars = p.bars();
        assert_eq!((bars[0].index, bars[0].size), (0, 0x1_0000));
        assert_eq!((bars[1].index, bars[1].size), (1, 0x1000));
        // Component registers: RAS, no HDM decoders.
        let (hdm, ras_off) = probe(p.component());
        assert!(hdm.is_none());
        assert_eq!(ras_off, Some(RAS_OFFSET));
        let mut d = [0u8; 4];
        p.bar_read(COMPONENT_BAR, RAS_OFFSET + ras::UC_MASK, &mut d);
        assert_eq!(u32::from_le_bytes(d), ras::UC_BITS);
        p.bar_write(
            COMPONENT_BAR,
            RAS_OFFSET + ras::UC_MASK,
            &0u32.to_le_bytes(),
        );
        assert_eq!(p.component().ras().uncorrectable_mask(), 0);
        // Correctable errors are still masked: logged, not signalled.
        assert!(!p.component_mut().ras_mut().inject_correctable(1));
        assert_eq!(p.component().ras().correctable_status(), 1);
        // Past the component block / unknown BARs read 0.
        p.bar_read(2, 0, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn msix_through_bar1() {
        let sink = Arc::new(RecordingMsiSink::new());
        let mut p = CxlRootPort::new(RootPortConfig::cxl(1), sink.clone()).unwrap();
        p.set_requester_id(RequesterId::new(0, 2, 0));
        p.bar_write(MSIX_BAR, 0, &0xfee0_0000u32.to_le_bytes());
        p.bar_write(MSIX_BAR, 8, &0x23u32.to_le_bytes());
        p.bar_write(MSIX_BAR, 12, &0u32.to_le_bytes());
        let cap = {
            let mut rd = |o: u16, b: &mut [u8]| p.config_read(o, b);
            u16::from(find_capability(&mut rd, cap_id::MSIX).unwrap())
        };
        p.config_write(4, &6u16.to_le_bytes());
        p.config_write(cap + 2, &0x8000u16.to_le_bytes());
        assert_eq!(p.trigger(0), MsixTriggerResult::Delivered);
        assert_eq!(sink.take()[0].requester_id, RequesterId::new(0, 2, 0));
        let mut c = RootPortConfig::cxl(0);
        c.msix_vectors = 0;
        assert!(CxlRootPort::new(c, Arc::new(NullMsiSink)).is_err());
    }
}
