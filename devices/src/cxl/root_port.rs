//! A CXL 2.0 root port: a PCI Express Root Port (type 1 header, class 0x060400, port type 4)
//! with the CXL port DVSECs and a component register block, built like
//! [`crate::pci::RootPort`].
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

use crate::pci::capability::{aer_capability, power_management_capability};
use crate::pci::msix::MsixLayout;
use crate::pci::{
    BarInfo, BarKind, ConfigSpace, HeaderType, LinkSpeed, MsixCapability, MsixTriggerResult,
    PciDevice, PciIds, PcieCapabilityConfig, ids,
};

use super::component::ComponentRegisters;
use super::dvsec::{self, RegisterBlock, regloc};
use super::{COMPONENT_BLOCK_SIZE, CxlError};

/// BAR holding the component registers.
pub const COMPONENT_BAR: u8 = 0;
/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 1;
/// Size of the MSI-X BAR.
pub const MSIX_BAR_SIZE: u64 = 0x1000;

/// Construction parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CxlRootPortConfig {
    /// Port Number in Link Capabilities: the ID host bridge decoders use in their target lists
    /// (Linux `pci_get_port_num` reads it from here; unique per host bridge).
    pub port_number: u8,
    /// Advertised link speed.
    pub link_speed: LinkSpeed,
    /// Advertised link width.
    pub link_width: u8,
    /// Number of MSI-X vectors (1..=128; vector 0 serves PME and AER).
    pub msix_vectors: u16,
}

impl CxlRootPortConfig {
    /// 32 GT/s x16 (CXL 2.0 runs on PCIe 5.0 PHYs), one MSI-X vector.
    pub fn new(port_number: u8) -> Self {
        CxlRootPortConfig {
            port_number,
            link_speed: LinkSpeed::Gt32,
            link_width: 16,
            msix_vectors: 1,
        }
    }
}

/// A CXL root port.
#[derive(Debug)]
pub struct CxlRootPort {
    config: ConfigSpace,
    msix: MsixCapability,
    component: ComponentRegisters,
    port_number: u8,
    pcie_offset: u16,
    aer_offset: u16,
}

impl CxlRootPort {
    /// Builds a root port delivering its interrupts to `msi`.
    pub fn new(cfg: CxlRootPortConfig, msi: Arc<dyn MsiSink>) -> Result<Self, CxlError> {
        if cfg.msix_vectors == 0 || cfg.msix_vectors > 128 {
            return Err(CxlError::InvalidConfig(
                "root port supports 1..=128 MSI-X vectors",
            ));
        }
        let mut config = ConfigSpace::new(
            HeaderType::Type1,
            PciIds {
                vendor_id: ids::VENDOR_REDHAT,
                device_id: ids::DEVICE_ROOT_PORT,
                revision_id: 0,
                class_code: ids::CLASS_PCI_BRIDGE,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            },
        );
        config.add_bar(
            COMPONENT_BAR,
            COMPONENT_BLOCK_SIZE,
            BarKind::Memory32,
            false,
        )?;
        config.add_bar(MSIX_BAR, MSIX_BAR_SIZE, BarKind::Memory32, false)?;

        let mut pcie = PcieCapabilityConfig::root_port(cfg.port_number);
        pcie.link_speed = cfg.link_speed;
        pcie.link_width = cfg.link_width;
        let pcie_offset = u16::from(config.add_capability(&pcie.build())?);
        let msix = MsixCapability::new(
            &mut config,
            MsixLayout {
                num_vectors: cfg.msix_vectors,
                table_bar: MSIX_BAR,
                table_offset: 0,
                pba_bar: MSIX_BAR,
                pba_offset: 0x800,
            },
            msi,
            RequesterId(0),
        )?;
        config.add_capability(&power_management_capability())?;

        let aer_offset = config.add_ext_capability(&aer_capability(true))?;
        config.add_ext_capability(&dvsec::port_extensions_dvsec())?;
        config.add_ext_capability(&dvsec::gpf_port_dvsec())?;
        config.add_ext_capability(&dvsec::flex_bus_port_dvsec())?;
        config.add_ext_capability(&dvsec::register_locator_dvsec(&[RegisterBlock {
            bir: COMPONENT_BAR,
            block_id: regloc::BLOCK_COMPONENT,
            offset: 0,
        }]))?;
        Ok(CxlRootPort {
            config,
            msix,
            component: ComponentRegisters::new(true, None),
            port_number: cfg.port_number,
            pcie_offset,
            aer_offset,
        })
    }

    /// The Port Number host bridge decoders target.
    pub fn port_number(&self) -> u8 {
        self.port_number
    }

    /// Offset of the PCI Express capability.
    pub fn pcie_offset(&self) -> u16 {
        self.pcie_offset
    }

    /// Offset of the AER extended capability.
    pub fn aer_offset(&self) -> u16 {
        self.aer_offset
    }

    /// Config space (device-side view).
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// Config space, mutably (to raise status bits).
    pub fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
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
        self.msix.trigger(vector)
    }
}

impl PciDevice for CxlRootPort {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        self.msix.config_written(&self.config, offset, data.len());
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            COMPONENT_BAR => self.component.read(offset, data),
            _ => {
                if !self.msix.bar_read(bar, offset, data) {
                    data.fill(0);
                }
            }
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            COMPONENT_BAR => self.component.write(offset, data),
            _ => {
                if !self.msix.bar_write(bar, offset, data) {
                    log::debug!("cxl root port: ignoring BAR{bar} write at {offset:#x}");
                }
            }
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn set_requester_id(&mut self, requester_id: RequesterId) {
        self.msix.set_requester_id(requester_id);
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
        let mut p = CxlRootPort::new(CxlRootPortConfig::new(7), Arc::new(NullMsiSink)).unwrap();
        assert_eq!(p.port_number(), 7);
        assert_eq!(cfg32(&mut p, 8) >> 8, ids::CLASS_PCI_BRIDGE);
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
        let mut p = CxlRootPort::new(CxlRootPortConfig::new(1), sink.clone()).unwrap();
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
        let mut c = CxlRootPortConfig::new(0);
        c.msix_vectors = 0;
        assert!(CxlRootPort::new(c, Arc::new(NullMsiSink)).is_err());
    }
}
