//! A PCI Express Root Port (type 1 header, class 0x060400).
//!
//! Layout (what Linux's portdrv, AER and `lspci -vvv` look at):
//! - BAR0: 4 KiB 32-bit memory BAR with the MSI-X table at 0 and the PBA at 0x800;
//! - capabilities: PCI Express (v2, port type 4, Slot Implemented = 0), MSI-X, Power Management;
//! - extended capabilities: AER at 0x100 (with root error registers), so the 4 KiB config space
//!   has real data at 0x100.
//!
//! Bus numbers and memory / 64-bit prefetchable windows are plain registers; the root complex
//! reads them to route config requests and memory accesses (type 1 forwarding).

use std::sync::Arc;

use iommu::{MsiSink, RequesterId};

use super::capability::{aer_capability, power_management_capability};
use super::config::{ConfigSpace, HeaderType, PciIds};
use super::msix::{MsixCapability, MsixLayout, MsixTriggerResult};
use super::pcie::{LinkSpeed, PcieCapabilityConfig};
use super::{BarInfo, BarKind, PciDevice, PciError, ids};

/// Size of the root port's own BAR0.
pub const ROOT_PORT_BAR0_SIZE: u64 = 0x1000;

/// Construction parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootPortConfig {
    /// Port Number in Link Capabilities (unique per root port).
    pub port_number: u8,
    /// Advertised link speed.
    pub link_speed: LinkSpeed,
    /// Advertised link width.
    pub link_width: u8,
    /// Number of MSI-X vectors (1..=128; vector 0 serves PME and AER).
    pub msix_vectors: u16,
}

impl RootPortConfig {
    /// 16 GT/s x16, one MSI-X vector.
    pub fn new(port_number: u8) -> Self {
        RootPortConfig {
            port_number,
            link_speed: LinkSpeed::Gt16,
            link_width: 16,
            msix_vectors: 1,
        }
    }

    /// A CXL root port's: 32 GT/s x16 (CXL 2.0 runs on PCIe 5.0 PHYs), one MSI-X vector.
    pub fn cxl(port_number: u8) -> Self {
        RootPortConfig {
            link_speed: LinkSpeed::Gt32,
            ..Self::new(port_number)
        }
    }
}

/// What every root port is (the bridge core shared by [`RootPort`] and the CXL root port): a
/// type 1 header (bus numbers and windows as plain registers the root complex routes by), the
/// PCI Express capability (port type 4, Port Number), MSI-X in `msix_bar` (table at 0, PBA at
/// 0x800), Power Management, and AER at 0x100. A port that needs more (DVSECs, a register
/// block BAR) adds them to [`RootPortCore::config_mut`] and serves its own BARs.
#[derive(Debug)]
pub struct RootPortCore {
    config: ConfigSpace,
    msix: MsixCapability,
    pcie_offset: u16,
    aer_offset: u16,
}

impl RootPortCore {
    /// Builds the core. `other_bars` (index, size) are 32-bit memory BARs the port serves
    /// itself; the MSI-X BAR is [`ROOT_PORT_BAR0_SIZE`] bytes at `msix_bar`.
    pub fn new(
        cfg: RootPortConfig,
        msix_bar: u8,
        other_bars: &[(u8, u64)],
        msi: Arc<dyn MsiSink>,
    ) -> Result<Self, PciError> {
        if cfg.msix_vectors == 0 || cfg.msix_vectors > 128 {
            return Err(PciError::InvalidMsix("root port supports 1..=128 vectors"));
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
        for &(index, size) in other_bars {
            config.add_bar(index, size, BarKind::Memory32, false)?;
        }
        config.add_bar(msix_bar, ROOT_PORT_BAR0_SIZE, BarKind::Memory32, false)?;

        let mut pcie = PcieCapabilityConfig::root_port(cfg.port_number);
        pcie.link_speed = cfg.link_speed;
        pcie.link_width = cfg.link_width;
        let pcie_offset = u16::from(config.add_capability(&pcie.build())?);

        let msix = MsixCapability::new(
            &mut config,
            MsixLayout {
                num_vectors: cfg.msix_vectors,
                table_bar: msix_bar,
                table_offset: 0,
                pba_bar: msix_bar,
                pba_offset: 0x800,
            },
            msi,
            RequesterId(0),
        )?;
        config.add_capability(&power_management_capability())?;
        let aer_offset = config.add_ext_capability(&aer_capability(true))?;
        Ok(RootPortCore {
            config,
            msix,
            pcie_offset,
            aer_offset,
        })
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

    /// Config space, mutably (to add capabilities, raise status bits).
    pub fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    /// Signals MSI-X `vector` (PME, AER, …).
    pub fn trigger(&mut self, vector: u16) -> MsixTriggerResult {
        self.msix.trigger(vector)
    }

    /// A guest config read.
    pub fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    /// A guest config write (MSI-X sees its control register change).
    pub fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        self.msix.config_written(&self.config, offset, data.len());
    }

    /// A guest read of the MSI-X table or PBA; false if `bar`/`offset` is neither.
    pub fn msix_bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        self.msix.bar_read(bar, offset, data)
    }

    /// A guest write of the MSI-X table or PBA; false if `bar`/`offset` is neither.
    pub fn msix_bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> bool {
        self.msix.bar_write(bar, offset, data)
    }

    /// The BARs as the guest programmed them.
    pub fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    /// The port's own requester ID (its MSI-X messages carry it).
    pub fn set_requester_id(&mut self, requester_id: RequesterId) {
        self.msix.set_requester_id(requester_id);
    }
}

/// A root port.
#[derive(Debug)]
pub struct RootPort {
    core: RootPortCore,
}

impl RootPort {
    /// Builds a root port delivering its interrupts to `msi`.
    pub fn new(cfg: RootPortConfig, msi: Arc<dyn MsiSink>) -> Result<Self, PciError> {
        Ok(RootPort {
            core: RootPortCore::new(cfg, 0, &[], msi)?,
        })
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

    /// Signals MSI-X `vector` (PME, AER, …).
    pub fn trigger(&mut self, vector: u16) -> MsixTriggerResult {
        self.core.trigger(vector)
    }
}

impl PciDevice for RootPort {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.core.config_read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.core.config_write(offset, data);
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if !self.core.msix_bar_read(bar, offset, data) {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if !self.core.msix_bar_write(bar, offset, data) {
            log::debug!("root port: ignoring BAR{bar} write at {offset:#x}");
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.core.bars()
    }

    fn set_requester_id(&mut self, requester_id: RequesterId) {
        self.core.set_requester_id(requester_id);
    }

    fn name(&self) -> &str {
        "root-port"
    }
}

#[cfg(test)]
mod tests {
    use super::super::capability::{cap_id, ext_cap_id, find_capability, find_ext_capability};
    use super::super::pcie::{FLAGS, PciePortType};
    use super::*;
    use iommu::{NullMsiSink, RecordingMsiSink};

    fn rp() -> RootPort {
        RootPort::new(RootPortConfig::new(1), Arc::new(NullMsiSink)).unwrap()
    }

    #[test]
    fn layout_matches_linux_expectations() {
        let mut p = rp();
        let mut d = [0u8; 4];
        p.config_read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x000c_1b36);
        p.config_read(8, &mut d);
        assert_eq!(u32::from_le_bytes(d) >> 8, 0x06_04_00);
        p.config_read(0x0c, &mut d);
        assert_eq!(d[2], 1);
        let mut rd = |o: u16, b: &mut [u8]| p.config_read(o, b);
        let pcie = find_capability(&mut rd, cap_id::PCI_EXPRESS).unwrap();
        assert!(find_capability(&mut rd, cap_id::MSIX).is_some());
        assert!(find_capability(&mut rd, cap_id::POWER_MANAGEMENT).is_some());
        assert_eq!(find_ext_capability(&mut rd, ext_cap_id::AER), Some(0x100));
        let flags = p.config().read_u16(u16::from(pcie) + FLAGS as u16);
        assert_eq!(
            PciePortType::from_bits(((flags >> 4) & 0xf) as u8),
            Some(PciePortType::RootPort)
        );
        assert_eq!(flags & 0x100, 0, "no slot");
        p.config_read(0x100, &mut d);
        assert_ne!(u32::from_le_bytes(d), 0);
        assert_eq!(p.bars().len(), 1);
        assert_eq!(p.bars()[0].size, 0x1000);
    }

    #[test]
    fn msix_through_bar0() {
        let sink = Arc::new(RecordingMsiSink::new());
        let mut p = RootPort::new(RootPortConfig::new(2), sink.clone()).unwrap();
        p.set_requester_id(RequesterId::new(0, 1, 0));
        p.bar_write(0, 0, &0xfee0_0000u32.to_le_bytes());
        p.bar_write(0, 8, &0x23u32.to_le_bytes());
        p.bar_write(0, 12, &0u32.to_le_bytes());
        let ctl = p.core.msix.cap_offset() + 2;
        p.config_write(ctl, &0x8000u16.to_le_bytes());
        assert_eq!(p.trigger(0), MsixTriggerResult::BusMasterDisabled);
        // Linux's portdrv calls pci_set_master().
        p.config_write(0x04, &0x0006u16.to_le_bytes());
        assert_eq!(p.trigger(0), MsixTriggerResult::Delivered);
        let m = sink.take();
        assert_eq!(m[0].data, 0x23);
        assert_eq!(m[0].requester_id, RequesterId::new(0, 1, 0));
        // Outside table/PBA reads all-ones.
        let mut d = [0u8; 4];
        p.bar_read(0, 0x400, &mut d);
        assert_eq!(d, [0xff; 4]);
        p.bar_read(1, 0, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn rejects_bad_vector_counts() {
        let mut c = RootPortConfig::new(0);
        c.msix_vectors = 0;
        assert!(RootPort::new(c, Arc::new(NullMsiSink)).is_err());
        c.msix_vectors = 129;
        assert!(RootPort::new(c, Arc::new(NullMsiSink)).is_err());
    }
}
