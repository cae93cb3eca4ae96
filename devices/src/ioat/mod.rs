//! An emulated Intel I/OAT DMA engine (QuickData / Crystal Beach 3.3, the Skylake-X CBDMA
//! function 8086:2021), the device the guest's `ioatdma` driver and the kernel's VFIO
//! selftests (`tools/testing/selftests/vfio/lib/drivers/ioat/`) drive.
//!
//! - [`registers`]: the BAR 0 register map and the config-space error registers;
//! - [`descriptor`]: the 64-byte DMA descriptor;
//! - [`channel`]: a channel's registers and the engine that executes its descriptor chain.
//!
//! The function is a Root Complex Integrated Endpoint on bus 0 (its own IOMMU group: no
//! bridge, one function, so Linux's `pci_device_group()` gives it a group of its own and vfio
//! accepts it). BAR 0 (16 KiB, 64-bit) holds the device registers, one register block per
//! channel, and the MSI-X table (0x2000) and PBA (0x3000); one MSI-X vector per channel
//! (`ioat_dma_setup_interrupts()` asks for exactly CHANCNT). An MSI capability (one vector,
//! 64-bit, maskable) serves the driver's `ioat_interrupt_style=msi` fallback and the VFIO
//! selftests' MSI variants; with it every channel's attention goes out as the one message. CBVER is 3.3 as on Skylake-X (the
//! driver then takes its CB3.2 paths, `is_skx_ioat()`); DMA_CAP advertises nothing beyond the
//! memcpy every channel does (no XOR, PQ, DCA or fill), so `ioatdma` registers memcpy and
//! interrupt descriptors only. XFERCAP is 4 KiB per descriptor by default: the driver splits
//! longer copies itself, and the selftests' 65 535-copy storm stays a 256 MiB job.
//!
//! Every access to guest memory — descriptor fetches, copies, completion writebacks — goes
//! through the function's [`iommu::DmaSpace`], so the IOMMU translates (and may fault) it and
//! nothing moves while Bus Master Enable is clear.

pub mod channel;
pub mod descriptor;
pub mod registers;

use std::fmt;
use std::sync::Arc;

use iommu::{DmaSpace, MsiSink, RequesterId};

use crate::pci::msix::MsixLayout;
use crate::pci::pcie::PcieCapabilityConfig;
use crate::pci::registers::{DwordRegs, dword_read, dword_write};
use crate::pci::{
    BarInfo, BarKind, ConfigSpace, HeaderType, MsiCapability, MsixCapability, PciDevice, PciError,
    PciIds,
};
use channel::{Channel, ChannelCounters, Engine};
use registers::{channel as chan_reg, config as cfg_reg, device as dev_reg};

/// Intel's vendor ID.
pub const VENDOR_INTEL: u16 = 0x8086;
/// The Skylake-X CBDMA function (`PCI_DEVICE_ID_INTEL_IOAT_SKX`).
pub const DEVICE_ID_SKX: u16 = 0x2021;
/// Class code: base system peripheral, other (0x0880), as Intel's CBDMA functions report.
pub const CLASS_SYSTEM_PERIPHERAL_OTHER: u32 = 0x08_80_00;
/// BAR 0 size.
pub const BAR0_SIZE: u64 = 0x4000;
/// Offset of the MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u32 = 0x2000;
/// Offset of the MSI-X PBA in BAR 0.
pub const MSIX_PBA_OFFSET: u32 = 0x3000;
/// The most channels a function may have (`IOAT_MAX_CHANS` in the driver).
pub const MAX_CHANNELS: u8 = 4;
/// Default XFERCAP (log2 of the largest transfer per descriptor): 4 KiB.
pub const DEFAULT_XFERCAP_LOG: u8 = 12;

/// What the function looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoatConfig {
    /// Number of DMA channels, 1..=[`MAX_CHANNELS`].
    pub channels: u8,
    /// XFERCAP, 12..=20 (4 KiB .. 1 MiB per descriptor).
    pub xfercap_log: u8,
}

impl Default for IoatConfig {
    fn default() -> Self {
        IoatConfig {
            channels: 1,
            xfercap_log: DEFAULT_XFERCAP_LOG,
        }
    }
}

/// The I/OAT function.
pub struct IoatFunction {
    config: ConfigSpace,
    pcie_offset: u16,
    msix: MsixCapability,
    msi: MsiCapability,
    dma: DmaSpace,
    channels: Vec<Channel>,
    xfercap_log: u8,
    genctrl: u8,
    intrctrl: u8,
    attnstatus: u32,
    intrdelay: u16,
    buffer: Vec<u8>,
}

impl fmt::Debug for IoatFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoatFunction")
            .field("channels", &self.channels.len())
            .field("requester_id", &self.dma.requester_id())
            .finish_non_exhaustive()
    }
}

impl IoatFunction {
    /// Builds the function. Its DMA goes through `dma`, its MSI-X messages to `msi`.
    pub fn new(cfg: IoatConfig, dma: DmaSpace, msi: Arc<dyn MsiSink>) -> Result<Self, PciError> {
        if !(1..=MAX_CHANNELS).contains(&cfg.channels) || !(12..=20).contains(&cfg.xfercap_log) {
            return Err(PciError::InvalidConfig(format!(
                "I/OAT needs 1..={MAX_CHANNELS} channels and XFERCAP 12..=20 (got {} and {})",
                cfg.channels, cfg.xfercap_log
            )));
        }
        let mut config = ConfigSpace::new(
            HeaderType::Type0,
            PciIds {
                vendor_id: VENDOR_INTEL,
                device_id: DEVICE_ID_SKX,
                revision_id: 0x04,
                class_code: CLASS_SYSTEM_PERIPHERAL_OTHER,
                subsystem_vendor_id: VENDOR_INTEL,
                subsystem_id: 0,
            },
        );
        config.add_bar(0, BAR0_SIZE, BarKind::Memory64, false)?;
        let pcie_offset = u16::from(
            config.add_capability(
                &PcieCapabilityConfig {
                    flr: true,
                    ..PcieCapabilityConfig::rc_integrated_endpoint()
                }
                .build(),
            )?,
        );
        let msix = MsixCapability::new(
            &mut config,
            MsixLayout {
                num_vectors: u16::from(cfg.channels),
                table_bar: 0,
                table_offset: MSIX_TABLE_OFFSET,
                pba_bar: 0,
                pba_offset: MSIX_PBA_OFFSET,
            },
            msi.clone(),
            dma.requester_id(),
        )?;
        let msi = MsiCapability::new(&mut config, 1, msi, dma.requester_id())?;
        // The error registers the driver and the selftests read and clear in config space
        // (no extended capabilities: the list at 0x100 is empty).
        config.set_masks(cfg_reg::DMAUNCERRSTS, 4, 0, u32::MAX);
        config.set_masks(cfg_reg::CHANERR_INT, 4, 0, u32::MAX);
        config.set_masks(cfg_reg::CHANERRMASK_INT, 4, u32::MAX, 0);
        dma.set_bus_master(false);
        Ok(IoatFunction {
            config,
            pcie_offset,
            msix,
            msi,
            dma,
            channels: (0..cfg.channels).map(|_| Channel::new()).collect(),
            xfercap_log: cfg.xfercap_log,
            genctrl: 0,
            intrctrl: 0,
            attnstatus: 0,
            intrdelay: 0,
            buffer: Vec::new(),
        })
    }

    /// The function's DMA space.
    pub fn dma(&self) -> &DmaSpace {
        &self.dma
    }

    /// Number of channels.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Channel `index`.
    pub fn channel(&self, index: usize) -> Option<&Channel> {
        self.channels.get(index)
    }

    /// What every channel has done.
    pub fn counters(&self) -> Vec<ChannelCounters> {
        self.channels.iter().map(Channel::counters).collect()
    }

    /// Config space (device-side view).
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// Function Level Reset (PCIe Base Spec r6.0, 6.6.2): every channel back to power-on,
    /// interrupts off, MSI-X disabled with its table cleared, Bus Master and Memory Space
    /// Enable off, the error registers cleared. Linux saves and restores config space around
    /// it (`pcie_flr()`); vfio-pci resets a function this way when it is opened and released.
    pub fn function_level_reset(&mut self) {
        for c in &mut self.channels {
            c.power_on_reset();
        }
        self.genctrl = 0;
        self.intrctrl = 0;
        self.attnstatus = 0;
        self.intrdelay = 0;
        self.config.set_u16(crate::pci::config::COMMAND, 0);
        let msix_control = self.msix.cap_offset() + 2;
        let v = self.config.read_u16(msix_control) & !0xc000;
        self.config.set_u16(msix_control, v);
        self.msix.table_mut().reset();
        self.msi.reset(&mut self.config);
        for reg in [
            cfg_reg::DMAUNCERRSTS,
            cfg_reg::CHANERR_INT,
            cfg_reg::CHANERRMASK_INT,
        ] {
            self.config.set_u32(reg, 0);
        }
        self.dma.set_bus_master(false);
    }

    /// A channel's attention: ATTNSTATUS records it; the interrupt goes out as MSI-X (vector =
    /// channel with MSIX_VECTOR_CONTROL, as `ioat_dma_setup_interrupts()` sets for one vector
    /// per channel; vector 0 without it, its single-vector mode) or, with MSI-X off, as the
    /// MSI message (`ioat_dma_do_interrupt()` then reads ATTNSTATUS to find the channels).
    /// There is no INTx pin.
    fn raise(&mut self, index: usize) {
        self.attnstatus |= 1 << index;
        let per_vector = self.intrctrl & dev_reg::INTRCTRL_MSIX_VECTOR_CONTROL != 0;
        if !per_vector && self.intrctrl & dev_reg::INTRCTRL_MASTER_INT_EN == 0 {
            return;
        }
        if self.msix.table().enabled() {
            let vector = if per_vector { index as u16 } else { 0 };
            let _ = self.msix.trigger(vector);
        } else if self.msi.enabled(&self.config) {
            let _ = self.msi.trigger(&mut self.config, 0);
        }
    }

    fn read_device_dword(&self, offset: u64) -> u32 {
        match offset {
            dev_reg::CHANCNT => {
                let intrctrl = self.intrctrl
                    | if self.attnstatus != 0 {
                        dev_reg::INTRCTRL_INT_STATUS
                            | if self.intrctrl & dev_reg::INTRCTRL_MASTER_INT_EN != 0 {
                                dev_reg::INTRCTRL_INT
                            } else {
                                0
                            }
                    } else {
                        0
                    };
                u32::from(self.channels.len() as u8)
                    | u32::from(self.xfercap_log) << 8
                    | u32::from(self.genctrl) << 16
                    | u32::from(intrctrl) << 24
            }
            dev_reg::ATTNSTATUS => self.attnstatus,
            // CBVER, then PERPORTOFFSET 0.
            0x08 => u32::from(dev_reg::VERSION_3_3),
            // INTRDELAY (no coalescing support bit), DEVICE_STATUS 0.
            0x0c => u32::from(self.intrdelay & 0x3fff),
            // DMA_CAP: memcpy only (no cap bits), DCAOFFSET 0.
            dev_reg::DMA_CAP | dev_reg::DCAOFFSET => 0,
            _ => 0,
        }
    }

    fn write_device_dword(&mut self, offset: u64, value: u32, enables: u32) {
        let merge = |old: u32| (old & !enables) | (value & enables);
        match offset {
            dev_reg::CHANCNT => {
                let v = merge(u32::from(self.genctrl) << 16 | u32::from(self.intrctrl) << 24);
                self.genctrl = (v >> 16) as u8 & 0x01;
                self.intrctrl = (v >> 24) as u8
                    & (dev_reg::INTRCTRL_MASTER_INT_EN | dev_reg::INTRCTRL_MSIX_VECTOR_CONTROL);
            }
            0x0c => self.intrdelay = merge(u32::from(self.intrdelay)) as u16 & 0x3fff,
            _ => log::debug!("ioat: ignoring write to device register {offset:#x}"),
        }
    }
}

/// BAR 0 register view: device registers, then one block per channel.
impl DwordRegs for IoatFunction {
    fn read_dword(&self, offset: u64) -> u32 {
        if offset < chan_reg::BLOCK {
            return self.read_device_dword(offset);
        }
        let index = (offset / chan_reg::BLOCK - 1) as usize;
        match self.channels.get(index) {
            Some(c) => c.read_dword(offset % chan_reg::BLOCK),
            None => 0,
        }
    }

    fn write_dword(&mut self, offset: u64, value: u32, enables: u32) {
        if offset < chan_reg::BLOCK {
            return self.write_device_dword(offset, value, enables);
        }
        let index = (offset / chan_reg::BLOCK - 1) as usize;
        let Some(channel) = self.channels.get_mut(index) else {
            return;
        };
        let rel = offset % chan_reg::BLOCK;
        let mut engine = Engine {
            dma: &self.dma,
            xfercap_log: self.xfercap_log,
            buffer: &mut self.buffer,
        };
        let events = channel.write_dword(rel, value, enables, &mut engine);
        if rel == chan_reg::CHANCTRL && enables & 0xffff != 0 {
            // The driver re-arms after handling the channel's attention.
            self.attnstatus &= !(1 << index);
        }
        if events.interrupt {
            self.raise(index);
        }
        // Keep the scratch buffer from pinning a large allocation.
        if self.buffer.capacity() > 1 << 20 {
            self.buffer = Vec::new();
        }
    }
}

impl PciDevice for IoatFunction {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        self.msix.config_written(&self.config, offset, data.len());
        self.msi
            .config_written(&mut self.config, offset, data.len());
        self.dma.set_bus_master(self.config.bus_master_enabled());
        // Initiate Function Level Reset: bit 15 of Device Control (the bit reads 0).
        let flr_byte = self.pcie_offset + crate::pci::pcie::DEVCTL as u16 + 1;
        let written = usize::from(flr_byte.wrapping_sub(offset));
        if flr_byte >= offset && data.get(written).is_some_and(|b| b & 0x80 != 0) {
            self.function_level_reset();
        }
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0xff);
            return;
        }
        if self.msix.bar_read(bar, offset, data) {
            return;
        }
        if offset < u64::from(MSIX_TABLE_OFFSET) {
            dword_read(self, offset, data);
        } else {
            data.fill(0);
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != 0 || self.msix.bar_write(bar, offset, data) {
            return;
        }
        if offset < u64::from(MSIX_TABLE_OFFSET) {
            dword_write(self, offset, data);
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn set_requester_id(&mut self, requester_id: RequesterId) {
        self.dma.set_requester_id(requester_id);
        self.msix.set_requester_id(requester_id);
        self.msi.set_requester_id(requester_id);
    }

    fn name(&self) -> &str {
        "ioat"
    }
}

#[cfg(test)]
mod tests;
