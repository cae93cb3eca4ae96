//! The CXL 2.0 Type 3 memory expander endpoint (class 0x050210), bound by Linux `cxl_pci`
//! (drivers/cxl/pci.c `cxl_pci_probe`) and, through its memdev, `cxl_mem` / `cxl_port`.
//!
//! Layout:
//! - BAR0: component registers, 64 KiB, 64-bit ([`ComponentRegisters`]: RAS, Link, HDM decoder
//!   capability with N endpoint decoders);
//! - BAR2: memory device registers, 64-bit ([`DeviceRegisters`]: status, primary mailbox,
//!   memory device status);
//! - BAR4: MSI-X table at 0 and PBA at 0x800, 4 KiB, 32-bit;
//! - capabilities: PCI Express (endpoint), MSI-X, Power Management;
//! - extended capabilities: AER, Device Serial Number, PCIe DVSEC for CXL Devices (ID 0), GPF
//!   DVSEC for CXL Devices (ID 5), Flex Bus Port DVSEC (ID 7), Register Locator DVSEC (ID 8:
//!   component block in BAR0, memdev block in BAR2), DOE serving the CDAT ([`super::cdat`]:
//!   one DSMAS per partition with its latency and bandwidth).
//!
//! Config writes to the DVSEC control register reach the HDM decoders (Mem_Enable gates
//! commits); everything in the BARs is pure register logic, so tests and fuzzers can drive
//! config and BAR accesses directly.

use std::fmt;
use std::sync::{Arc, Mutex};

use super::cdat::CdatTableAccess;
use crate::pci::doe::DoeMailbox;

use iommu::{MsiSink, RequesterId};

use crate::pci::aer::{self as pci_aer, ErrorMessage};
use crate::pci::capability::{aer, aer_capability, power_management_capability};
use crate::pci::msix::MsixLayout;
use crate::pci::{
    BarInfo, BarKind, ConfigSpace, HeaderType, MsixCapability, PciDevice, PciIds,
    PcieCapabilityConfig, ids,
};

use super::component::{ComponentRegisters, HdmConfig, HdmDecoderCapability, HdmRole};
use super::device_regs::DeviceRegisters;
use super::dvsec::{self, RegisterBlock, regloc};
use super::{
    CLASS_CXL_MEMORY, COMPONENT_BLOCK_SIZE, CommittedRange, CxlError, HdmError, HdmListener,
    HpaWindow, MailboxBackend, Partition,
};
use crate::pci::FunctionInterrupts;

/// BAR holding the component registers.
pub const COMPONENT_BAR: u8 = 0;
/// BAR holding the memory device registers.
pub const DEVICE_BAR: u8 = 2;
/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 4;
/// Size of the MSI-X BAR.
pub const MSIX_BAR_SIZE: u64 = 0x1000;
/// Offset of the PBA in the MSI-X BAR.
pub const MSIX_PBA_OFFSET: u32 = 0x800;
/// MSI-X vector of mailbox background-command completion (Mailbox Capabilities message number).
pub const MAILBOX_VECTOR: u16 = 0;
/// MSI-X vector the command set should report in Get Event Interrupt Policy (Linux requests
/// the vectors the device names there, `cxl_event_req_irq`).
pub const EVENT_VECTOR: u16 = 1;
/// Default number of MSI-X vectors (Linux allocates up to 16, `CXL_PCI_DEFAULT_MAX_VECTORS`).
pub const DEFAULT_MSIX_VECTORS: u16 = 4;
/// Placeholder device ID under the Red Hat (QEMU) vendor ID the platform functions use: no ID
/// is assigned to this device, and Linux binds `cxl_pci` by class code only. Change it here.
pub const DEVICE_ID_CXL_TYPE3: u16 = 0x0fff;

/// Construction parameters.
#[derive(Clone)]
pub struct Type3Config {
    /// Volatile capacity in bytes (multiple of 256 MiB), DPA `[0, volatile_size)`.
    pub volatile_size: u64,
    /// Persistent capacity in bytes (multiple of 256 MiB), after the volatile partition.
    pub persistent_size: u64,
    /// Device serial number (PCIe DSN capability; the memdev's `serial`).
    pub serial: u64,
    /// Number of HDM decoders (1, 2, 4, 6, 8 or 10).
    pub hdm_decoders: usize,
    /// CFMWS windows (targeting this device's host bridge) its decoders may commit into.
    pub windows: Vec<HpaWindow>,
    /// Told about commits / uncommits (the VMM maps the memory).
    pub listener: Option<Arc<dyn HdmListener>>,
    /// Mailbox payload size, log2 (8..=20).
    pub mailbox_payload_log2: u8,
    /// MSI-X vectors (2..=16: mailbox and event interrupts).
    pub msix_vectors: u16,
    /// PCI vendor ID.
    pub vendor_id: u16,
    /// PCI device ID.
    pub device_id: u16,
}

impl fmt::Debug for Type3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Type3Config")
            .field("volatile_size", &self.volatile_size)
            .field("persistent_size", &self.persistent_size)
            .field("serial", &self.serial)
            .field("hdm_decoders", &self.hdm_decoders)
            .field("windows", &self.windows)
            .field("listener", &self.listener.is_some())
            .field("mailbox_payload_log2", &self.mailbox_payload_log2)
            .field("msix_vectors", &self.msix_vectors)
            .finish_non_exhaustive()
    }
}

impl Type3Config {
    /// Defaults: 2 HDM decoders, 2 KiB mailbox payload, 4 MSI-X vectors, serial 0, no windows,
    /// no listener.
    pub fn new(volatile_size: u64, persistent_size: u64) -> Self {
        Type3Config {
            volatile_size,
            persistent_size,
            serial: 0,
            hdm_decoders: 2,
            windows: Vec::new(),
            listener: None,
            mailbox_payload_log2: 11,
            msix_vectors: DEFAULT_MSIX_VECTORS,
            vendor_id: ids::VENDOR_REDHAT,
            device_id: DEVICE_ID_CXL_TYPE3,
        }
    }
}

/// A CXL Type 3 memory device function.
pub struct CxlType3Device {
    config: ConfigSpace,
    component: ComponentRegisters,
    device_regs: DeviceRegisters,
    interrupts: FunctionInterrupts,
    msix_cap_offset: u16,
    dvsec_offset: u16,
    pcie_offset: u16,
    aer_offset: u16,
    doe_offset: u16,
    doe: DoeMailbox,
    volatile_size: u64,
    persistent_size: u64,
}

impl fmt::Debug for CxlType3Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CxlType3Device")
            .field("volatile_size", &self.volatile_size)
            .field("persistent_size", &self.persistent_size)
            .field("component", &self.component)
            .finish_non_exhaustive()
    }
}

impl CxlType3Device {
    /// Builds the function. `backend` executes mailbox commands; MSIs go to `msi`.
    pub fn new(
        cfg: Type3Config,
        backend: Box<dyn MailboxBackend>,
        msi: Arc<dyn MsiSink>,
    ) -> Result<Self, CxlError> {
        if cfg.volatile_size == 0 && cfg.persistent_size == 0 {
            return Err(CxlError::InvalidConfig(
                "a Type 3 device needs some capacity",
            ));
        }
        if !(2..=16).contains(&cfg.msix_vectors) {
            return Err(CxlError::InvalidConfig(
                "a Type 3 device needs 2..=16 MSI-X vectors",
            ));
        }
        let hdm = HdmDecoderCapability::new(HdmConfig {
            decoder_count: cfg.hdm_decoders,
            role: HdmRole::Endpoint {
                volatile_size: cfg.volatile_size,
                persistent_size: cfg.persistent_size,
            },
            windows: cfg.windows.clone(),
            listener: cfg.listener.clone(),
        })?;
        let mut component = ComponentRegisters::new(true, Some(hdm));
        // Every RAS error reported: Linux 7.2 unmasks the RAS capability of switch and root
        // ports (`cxl_ras_unmask`) but never an endpoint's, whose RAS it reads in its AER
        // handlers — so the device comes out of reset reporting, as firmware that hands error
        // handling to the OS leaves it.
        component.ras_mut().set_masks(0, 0);

        let mut config = ConfigSpace::new(
            HeaderType::Type0,
            PciIds {
                vendor_id: cfg.vendor_id,
                device_id: cfg.device_id,
                revision_id: 0,
                class_code: CLASS_CXL_MEMORY,
                subsystem_vendor_id: cfg.vendor_id,
                subsystem_id: cfg.device_id,
            },
        );
        let dev_regs_size = DeviceRegisters::size_for(cfg.mailbox_payload_log2);
        config.add_bar(
            COMPONENT_BAR,
            COMPONENT_BLOCK_SIZE,
            BarKind::Memory64,
            false,
        )?;
        config.add_bar(DEVICE_BAR, dev_regs_size, BarKind::Memory64, false)?;
        config.add_bar(MSIX_BAR, MSIX_BAR_SIZE, BarKind::Memory32, false)?;

        let pcie_offset =
            u16::from(config.add_capability(&PcieCapabilityConfig::endpoint().build())?);
        let msix = MsixCapability::new(
            &mut config,
            MsixLayout {
                num_vectors: cfg.msix_vectors,
                table_bar: MSIX_BAR,
                table_offset: 0,
                pba_bar: MSIX_BAR,
                pba_offset: MSIX_PBA_OFFSET,
            },
            msi,
            RequesterId(0),
        )?;
        let msix_cap_offset = msix.cap_offset();
        config.add_capability(&power_management_capability())?;

        let aer_offset = config.add_ext_capability(&aer_capability(false))?;
        // CXL.cachemem errors travel as AER internal errors (CXL 2.0 §12.2.2), masked by
        // default in PCIe; nothing in Linux 7.2 unmasks them for a VH endpoint
        // (`pci_aer_unmask_internal_errors` serves RCH RCECs), so this device leaves them
        // unmasked from reset.
        let uncor_mask = aer_offset + aer::UNCOR_MASK as u16;
        config.set_u32(
            uncor_mask,
            config.read_u32(uncor_mask) & !pci_aer::UNCOR_INTERNAL,
        );
        let cor_mask = aer_offset + aer::COR_MASK as u16;
        config.set_u32(cor_mask, config.read_u32(cor_mask) & !pci_aer::COR_INTERNAL);
        config.add_ext_capability(&dvsec::device_serial_number_capability(cfg.serial))?;
        let ranges: Vec<u64> = [cfg.volatile_size, cfg.persistent_size]
            .into_iter()
            .filter(|&s| s != 0)
            .collect();
        let dvsec_offset = config.add_ext_capability(&dvsec::cxl_device_dvsec(&ranges))?;
        config.add_ext_capability(&dvsec::gpf_device_dvsec())?;
        config.add_ext_capability(&dvsec::flex_bus_port_dvsec())?;
        config.add_ext_capability(&dvsec::register_locator_dvsec(&[
            RegisterBlock {
                bir: COMPONENT_BAR,
                block_id: regloc::BLOCK_COMPONENT,
                offset: 0,
            },
            RegisterBlock {
                bir: DEVICE_BAR,
                block_id: regloc::BLOCK_MEMDEV,
                offset: 0,
            },
        ]))?;
        let doe_offset = config.add_ext_capability(&DoeMailbox::capability())?;
        let doe = DoeMailbox::new(vec![Box::new(CdatTableAccess::new(
            cfg.volatile_size,
            cfg.persistent_size,
        ))]);

        let interrupts = FunctionInterrupts::new(Arc::new(Mutex::new(msix)));
        let device_regs = DeviceRegisters::new(
            cfg.mailbox_payload_log2,
            backend,
            Some(interrupts.clone()),
            MAILBOX_VECTOR,
        )?;
        Ok(CxlType3Device {
            config,
            component,
            device_regs,
            interrupts,
            msix_cap_offset,
            dvsec_offset,
            pcie_offset,
            aer_offset,
            doe_offset,
            doe,
            volatile_size: cfg.volatile_size,
            persistent_size: cfg.persistent_size,
        })
    }

    /// Raises this function's MSI-X vectors (give it to the command set for event interrupts).
    pub fn interrupts(&self) -> FunctionInterrupts {
        self.interrupts.clone()
    }

    /// Replaces the mailbox command set.
    pub fn set_backend(&mut self, backend: Box<dyn MailboxBackend>) {
        self.device_regs.set_backend(backend);
    }

    /// Attaches (or replaces) the HDM listener.
    pub fn set_listener(&mut self, listener: Option<Arc<dyn HdmListener>>) {
        if let Some(h) = self.component.hdm_mut() {
            h.set_listener(listener);
        }
    }

    /// Volatile and persistent capacity.
    pub fn capacity(&self) -> (u64, u64) {
        (self.volatile_size, self.persistent_size)
    }

    /// Offset of the PCIe DVSEC for CXL Devices in config space.
    pub fn dvsec_offset(&self) -> u16 {
        self.dvsec_offset
    }

    /// Offset of the PCI Express capability.
    pub fn pcie_offset(&self) -> u16 {
        self.pcie_offset
    }

    /// DVSEC Mem_Enable.
    pub fn mem_enabled(&self) -> bool {
        self.config
            .read_u16(self.dvsec_offset + dvsec::device::CTRL as u16)
            & dvsec::device::CTRL_MEM_ENABLE
            != 0
    }

    /// Firmware-style commit before boot (`--cxl-precommit`): sets DVSEC Mem_Enable and HDM
    /// Decoder Enable, programs decoder `decoder` to map `[hpa_base, hpa_base + size)` at DPA
    /// Σ(lower decoders) + `dpa_skip`, optionally with Lock On Commit, and commits it through
    /// the listener. Linux then finds the decoder committed (`init_hdm_decoder`), leaves
    /// Mem_Enable alone (`cxl_hdm_decode_init`) and assembles the region (`discover_region`).
    pub fn precommit(
        &mut self,
        decoder: usize,
        hpa_base: u64,
        size: u64,
        dpa_skip: u64,
        lock: bool,
    ) -> Result<CommittedRange, HdmError> {
        // Firmware enables CXL.mem first; the mirror in the HDM capability follows.
        let ctrl = self.dvsec_offset + dvsec::device::CTRL as u16;
        let v = self.config.read_u16(ctrl) | dvsec::device::CTRL_MEM_ENABLE;
        self.config.set_u16(ctrl, v);
        let Some(hdm) = self.component.hdm_mut() else {
            return Err(HdmError::NoSuchDecoder(decoder));
        };
        hdm.precommit(decoder, hpa_base, size, dpa_skip, lock)
    }

    /// Committed endpoint decoders.
    pub fn committed(&self) -> Vec<CommittedRange> {
        self.component
            .hdm()
            .map(|h| h.committed())
            .unwrap_or_default()
    }

    /// The partition and DPA `hpa` decodes to, if a committed decoder covers it.
    pub fn translate(&self, hpa: u64) -> Option<(Partition, u64)> {
        let (r, dpa) = self.component.hdm()?.decode(hpa)?;
        match r.target {
            super::DecodeTarget::Memory { partition, .. } => Some((partition, dpa?)),
            super::DecodeTarget::Ports(_) => None,
        }
    }

    /// Reset of the CXL state (call on VM reset): uncommits every decoder, locked ones included
    /// (telling the listener), clears HDM Decoder Enable, DVSEC Mem_Enable, RAS and the mailbox
    /// registers. The rest of config space (BARs, MSI-X) is the PCI layer's business.
    pub fn reset(&mut self) {
        if let Some(h) = self.component.hdm_mut() {
            h.reset();
        }
        let mut ras = super::RasCapability::new();
        ras.set_masks(0, 0);
        *self.component.ras_mut() = ras;
        let ctrl = self.dvsec_offset + dvsec::device::CTRL as u16;
        let v = self.config.read_u16(ctrl) & !dvsec::device::CTRL_MEM_ENABLE;
        self.config.set_u16(ctrl, v);
        self.device_regs.reset();
        self.doe.abort();
    }

    /// The DOE register (dword-aligned offset from the capability) that config `offset` falls
    /// in, if any.
    fn doe_register(&self, offset: u16) -> Option<u16> {
        let rel = offset.checked_sub(self.doe_offset)? & !3;
        DoeMailbox::serves(rel).then_some(rel)
    }

    /// Config space (device-side view).
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// An uncorrectable CXL.cachemem error (CXL 2.0 §12.2.2): `bits` logged in the RAS
    /// capability's Uncorrectable Error Status (First Error Pointer and `header_log` for the
    /// first), then an Uncorrectable Internal Error in AER. Returns the message the endpoint
    /// sends upstream (ERR_FATAL or ERR_NONFATAL by the AER severity), if any — for its Root
    /// Port to record ([`crate::pci::aer::root_receive`]). Linux's `cxl_error_detected` reads
    /// and clears the RAS status (`cxl_aer_uncorrectable_error` trace event).
    pub fn inject_uncorrectable(&mut self, bits: u32, header_log: &[u32]) -> Option<ErrorMessage> {
        if !self
            .component
            .ras_mut()
            .inject_uncorrectable(bits, header_log)
        {
            return None;
        }
        pci_aer::log_error(
            &mut self.config,
            self.aer_offset,
            self.pcie_offset,
            false,
            pci_aer::UNCOR_INTERNAL,
        )
    }

    /// A corrected CXL.cachemem error: `bits` in the RAS Correctable Error Status, then a
    /// Corrected Internal Error in AER; returns ERR_COR when it is sent (Linux's
    /// `cxl_cor_error_detected`: `cxl_aer_correctable_error`).
    pub fn inject_correctable(&mut self, bits: u32) -> Option<ErrorMessage> {
        if !self.component.ras_mut().inject_correctable(bits) {
            return None;
        }
        pci_aer::log_error(
            &mut self.config,
            self.aer_offset,
            self.pcie_offset,
            true,
            pci_aer::COR_INTERNAL,
        )
    }

    /// Component registers.
    pub fn component(&self) -> &ComponentRegisters {
        &self.component
    }

    /// Component registers, mutably (RAS injection).
    pub fn component_mut(&mut self) -> &mut ComponentRegisters {
        &mut self.component
    }

    /// Device registers, mutably.
    pub fn device_regs_mut(&mut self) -> &mut DeviceRegisters {
        &mut self.device_regs
    }

    /// Offset of the MSI-X capability.
    pub fn msix_cap_offset(&self) -> u16 {
        self.msix_cap_offset
    }
}

impl PciDevice for CxlType3Device {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        if let Some(reg) = self.doe_register(offset) {
            let value = self.doe.read(reg).to_le_bytes();
            let start = usize::from(offset & 3);
            for (i, b) in data.iter_mut().enumerate() {
                *b = value.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        if let Some(reg) = self.doe_register(offset) {
            // The mailbox registers take whole dwords (pci_doe uses 32-bit accesses only).
            if let (0, Ok(dword)) = (offset & 3, <[u8; 4]>::try_from(data)) {
                self.doe.write(reg, u32::from_le_bytes(dword));
            }
            return;
        }
        self.config.write(offset, data);
        let config = &self.config;
        self.interrupts
            .with(|m| m.config_written(config, offset, data.len()));
        let mem = self.mem_enabled();
        if let Some(h) = self.component.hdm_mut() {
            h.set_mem_enable(mem);
        }
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            COMPONENT_BAR => self.component.read(offset, data),
            DEVICE_BAR => self.device_regs.read(offset, data),
            MSIX_BAR => {
                if !self.interrupts.with(|m| m.bar_read(bar, offset, data)) {
                    data.fill(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            COMPONENT_BAR => self.component.write(offset, data),
            DEVICE_BAR => self.device_regs.write(offset, data),
            MSIX_BAR => {
                if !self.interrupts.with(|m| m.bar_write(bar, offset, data)) {
                    log::debug!("cxl type3: ignoring MSI-X BAR write at {offset:#x}");
                }
            }
            _ => log::debug!("cxl type3: ignoring write to BAR{bar}"),
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn set_requester_id(&mut self, requester_id: RequesterId) {
        self.interrupts.with(|m| m.set_requester_id(requester_id));
    }

    fn name(&self) -> &str {
        "cxl-type3"
    }
}

#[cfg(test)]
mod tests {
    use iommu::{NullMsiSink, RecordingMsiSink};

    use super::*;
    use crate::cxl::component::tests::{
        GIB, M256, WIN, linux_commit, linux_init_endpoint_decoder, probe,
    };
    use crate::cxl::component::{HDM_OFFSET, hdm};
    use crate::cxl::device_regs::{MAILBOX_OFFSET, MEMDEV_OFFSET, mbox};
    use crate::cxl::dvsec::{device, find_dvsec, id};
    use crate::cxl::root_port::CxlRootPort;
    use crate::cxl::testutil::{RecordingListener, Rng};
    use crate::cxl::{DecodeTarget, UnsupportedMailbox, mbox_rc};
    use crate::pci::RootPortConfig;
    use crate::pci::capability::{cap_id, find_capability};
    use crate::pci::{BridgeResources, PciAddress, PciRootComplex, PciWindows};

    fn device_with(listener: Arc<RecordingListener>) -> CxlType3Device {
        let mut cfg = Type3Config::new(GIB, GIB);
        cfg.serial = 0xc0ffee;
        cfg.windows = vec![HpaWindow::new(WIN, 4 * GIB)];
        cfg.listener = Some(listener);
        CxlType3Device::new(cfg, Box::new(UnsupportedMailbox), Arc::new(NullMsiSink)).unwrap()
    }

    fn cfg32(d: &mut dyn PciDevice, off: u16) -> u32 {
        let mut b = [0u8; 4];
        d.config_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn cfg16(d: &mut dyn PciDevice, off: u16) -> u16 {
        let mut b = [0u8; 2];
        d.config_read(off, &mut b);
        u16::from_le_bytes(b)
    }

    /// Linux `__cxl_find_regblock_instance` + `cxl_decode_regblock`: (BIR, block ID, offset).
    fn regblocks(d: &mut dyn PciDevice) -> Vec<(u8, u8, u64)> {
        let pos = find_dvsec(
            &mut |o, b: &mut [u8]| d.config_read(o, b),
            id::REGISTER_LOCATOR,
        )
        .expect("register locator");
        let len = cfg32(d, pos + 4) >> 20;
        (0..(len - 0xc) / 8)
            .map(|i| {
                let lo = cfg32(d, pos + 0xc + 8 * i as u16);
                let hi = cfg32(d, pos + 0x10 + 8 * i as u16);
                (
                    (lo & 7) as u8,
                    (lo >> 8) as u8,
                    (u64::from(hi) << 32) | u64::from(lo & 0xffff_0000),
                )
            })
            .collect()
    }

    /// The CDAT as Linux reads it (pci_doe_create_mb, pci_doe_cache_features, read_cdat_data):
    /// through the DOE capability in config space, discovery then Read Entry from handle 0 until
    /// 0xFFFF; partial-width accesses to the mailbox change nothing.
    #[test]
    fn cdat_is_read_through_the_doe_mailbox_in_config_space() {
        use crate::pci::doe::{self, reg};
        let mut d = device_with(Arc::new(RecordingListener::default()));
        let d: &mut dyn PciDevice = &mut d;
        let pos = crate::pci::capability::find_ext_capability(
            &mut |o, b: &mut [u8]| d.config_read(o, b),
            doe::CAP_ID,
        )
        .expect("DOE capability");
        let w32 = |d: &mut dyn PciDevice, off: u16, v: u32| d.config_write(off, &v.to_le_bytes());
        let exchange = |d: &mut dyn PciDevice, request: &[u32]| -> Vec<u32> {
            for &dw in request {
                w32(d, pos + reg::WRITE_MAILBOX, dw);
            }
            w32(d, pos + reg::CONTROL, doe::CONTROL_GO);
            assert_eq!(cfg32(d, pos + reg::STATUS) & doe::STATUS_ERROR, 0);
            let mut out = Vec::new();
            while cfg32(d, pos + reg::STATUS) & doe::STATUS_READY != 0 {
                out.push(cfg32(d, pos + reg::READ_MAILBOX));
                w32(d, pos + reg::READ_MAILBOX, 0);
            }
            out
        };
        w32(d, pos + reg::CONTROL, doe::CONTROL_ABORT);
        assert_eq!(cfg32(d, pos + reg::STATUS), 0);
        assert_eq!(
            exchange(d, &[0x0001, 3, 1]),
            vec![0x0001, 3, 0x1e98 | 2 << 16]
        );
        // A 16-bit write to the write mailbox is dropped.
        d.config_write(pos + reg::WRITE_MAILBOX, &[1, 2]);
        let mut handle = 0u32;
        let mut table = Vec::new();
        while handle != 0xffff {
            let r = exchange(d, &[0x0002_1e98, 3, handle << 16]);
            assert_eq!(r[0], 0x0002_1e98);
            assert_eq!(r[1] as usize, r.len());
            table.extend(r[3..].iter().flat_map(|w| w.to_le_bytes()));
            handle = r[2] >> 16;
        }
        assert_eq!(table, super::super::cdat::table(GIB, GIB).concat());
        assert_eq!(
            u32::from_le_bytes(table[..4].try_into().unwrap()) as usize,
            table.len()
        );
    }

    #[test]
    fn config_space_matches_cxl_pci_expectations() {
        let l = Arc::new(RecordingListener::default());
        let mut d = device_with(l);
        assert_eq!(cfg32(&mut d, 8) >> 8, CLASS_CXL_MEMORY);
        let mut rd = |o: u16, b: &mut [u8]| d.config_read(o, b);
        let pcie = find_capability(&mut rd, cap_id::PCI_EXPRESS).unwrap();
        assert!(find_capability(&mut rd, cap_id::MSIX).is_some());
        for dv in [
            id::CXL_DEVICE,
            id::GPF_DEVICE,
            id::FLEX_BUS_PORT,
            id::REGISTER_LOCATOR,
        ] {
            assert!(find_dvsec(&mut rd, dv).is_some(), "DVSEC {dv}");
        }
        assert!(find_dvsec(&mut rd, id::PORT_EXTENSIONS).is_none());
        // Endpoint, not an RCiEP (else Linux takes the CXL 1.1 RCH path).
        let flags = cfg32(&mut d, u16::from(pcie)) >> 16;
        assert_eq!((flags >> 4) & 0xf, 0);
        // pci_get_dsn.
        let dsn = crate::pci::capability::find_ext_capability(
            &mut |o, b: &mut [u8]| d.config_read(o, b),
            0x0003,
        )
        .unwrap();
        assert_eq!(cfg32(&mut d, dsn + 4), 0xc0ffee);
        // Register locator: component block in BAR0, memdev block in BAR2.
        assert_eq!(regblocks(&mut d), [(0, 1, 0), (2, 3, 0)]);
        let bars = d.bars();
        assert_eq!(bars.len(), 3);
        assert_eq!(
            (bars[0].index, bars[0].size, bars[0].kind),
            (0, 0x1_0000, BarKind::Memory64)
        );
        assert_eq!(
            (bars[1].index, bars[1].size, bars[1].kind),
            (2, 0x1000, BarKind::Memory64)
        );
        assert_eq!((bars[2].index, bars[2].size), (4, 0x1000));
        assert!(bars.iter().all(|b| !b.prefetchable));
        // cxl_dvsec_rr_decode before Mem_Enable: MEM_Capable, HDM_Count 2, mem disabled.
        let dv = d.dvsec_offset();
        let cap = u32::from(cfg16(&mut d, dv + device::CAP as u16));
        assert_ne!(cap & u32::from(device::CAP_MEM), 0);
        assert_eq!((cap >> 4) & 3, 2);
        assert_eq!(
            u32::from(cfg16(&mut d, dv + device::CTRL as u16)) & u32::from(device::CTRL_MEM_ENABLE),
            0
        );
        // cxl_await_media_ready: every range valid and active, memdev media ready.
        for i in 0..2 {
            assert_eq!(cfg32(&mut d, dv + device::range_size_low(i) as u16) & 3, 3);
        }
        let mut md = [0u8; 8];
        d.bar_read(DEVICE_BAR, MEMDEV_OFFSET, &mut md);
        assert_eq!((u64::from_le_bytes(md) >> 2) & 3, 1);
        // Out-of-range BARs and BAR offsets read 0, writes vanish.
        let mut b = [0xffu8; 4];
        d.bar_read(3, 0, &mut b);
        assert_eq!(b, [0; 4]);
        d.bar_read(MSIX_BAR, 0x900, &mut b);
        assert_eq!(b, [0; 4]);
        d.bar_write(5, 0, &[1]);
    }

    #[test]
    fn mem_enable_through_config_gates_commits() {
        let l = Arc::new(RecordingListener::default());
        let mut d = device_with(l.clone());
        let ctrl = d.dvsec_offset() + device::CTRL as u16;
        let commit = |d: &mut CxlType3Device| {
            let mut c = std::mem::replace(&mut d.component, ComponentRegisters::new(false, None));
            let r = linux_commit(&mut c, HDM_OFFSET, 0, WIN, M256, 0);
            d.component = c;
            r
        };
        // devm_cxl_enable_hdm only.
        d.bar_write(
            COMPONENT_BAR,
            HDM_OFFSET + hdm::GLOBAL_CTRL,
            &hdm::ENABLE.to_le_bytes(),
        );
        assert_eq!(commit(&mut d), Err("EIO"));
        // cxl_set_mem_enable: a word write of the control register.
        let mut w = [0u8; 2];
        d.config_read(ctrl, &mut w);
        let v = u16::from_le_bytes(w) | device::CTRL_MEM_ENABLE;
        d.config_write(ctrl, &v.to_le_bytes());
        assert!(d.mem_enabled());
        commit(&mut d).unwrap();
        assert_eq!(l.take().len(), 1);
        assert_eq!(d.translate(WIN + 0x10), Some((Partition::Volatile, 0x10)));
        assert_eq!(d.translate(WIN + M256), None);
    }

    #[test]
    fn precommit_is_what_init_hdm_decoder_finds() {
        let l = Arc::new(RecordingListener::default());
        let mut d = device_with(l.clone());
        // RAM: first 512 MiB of the volatile partition; pmem: 256 MiB at the start of the
        // persistent partition (skip the remaining 512 MiB of RAM), locked.
        let r0 = d.precommit(0, WIN, 2 * M256, 0, false).unwrap();
        let r1 = d.precommit(1, WIN + GIB, M256, 2 * M256, true).unwrap();
        assert_eq!(r0.dpa_base(), Some(0));
        assert_eq!(
            r1.target,
            DecodeTarget::Memory {
                dpa_base: GIB,
                partition: Partition::Persistent,
                partition_offset: 0
            }
        );
        assert_eq!(l.take().len(), 2);
        // cxl_dvsec_rr_decode: Mem_Enable set by "firmware".
        let dv = d.dvsec_offset();
        assert_ne!(
            u32::from(cfg16(&mut d, dv + device::CTRL as u16)) & u32::from(device::CTRL_MEM_ENABLE),
            0
        );
        // cxl_hdm_decode_init: HDM enabled already -> Linux keeps firmware's setup.
        let mut g = [0u8; 4];
        d.bar_read(COMPONENT_BAR, HDM_OFFSET + hdm::GLOBAL_CTRL, &mut g);
        assert_ne!(u32::from_le_bytes(g) & hdm::ENABLE, 0);
        // init_hdm_decoder over BAR reads.
        let c = &d.component;
        let (hdm, _) = probe(c);
        let hdm = hdm.unwrap().0;
        let mut dpa = 0;
        assert_eq!(
            linux_init_endpoint_decoder(c, hdm, 0, &mut dpa),
            Some((WIN, 2 * M256, 0, false))
        );
        assert_eq!(
            linux_init_endpoint_decoder(c, hdm, 1, &mut dpa),
            Some((WIN + GIB, M256, GIB, true))
        );
        // A conventional reset unmaps both and clears Mem_Enable.
        d.reset();
        assert_eq!(l.take().iter().filter(|e| !e.0).count(), 2);
        assert!(!d.mem_enabled());
        assert!(d.committed().is_empty());
        // Precommit failures are reported and leave nothing mapped.
        assert_eq!(
            d.precommit(0, WIN, 3 * GIB, 0, false),
            Err(HdmError::DpaOutOfRange {
                dpa: 0,
                size: 3 * GIB,
                capacity: 2 * GIB
            })
        );
        assert_eq!(
            d.precommit(0, 0x1000_0000, M256, 0, false),
            Err(HdmError::OutsideWindows {
                base: 0x1000_0000,
                size: M256
            })
        );
        assert!(l.take().is_empty());
    }

    #[test]
    fn construction_errors() {
        let mk = |cfg: Type3Config| {
            CxlType3Device::new(cfg, Box::new(UnsupportedMailbox), Arc::new(NullMsiSink))
        };
        assert!(mk(Type3Config::new(0, 0)).is_err());
        assert!(mk(Type3Config::new(GIB + 4096, 0)).is_err());
        assert!(
            mk(Type3Config {
                msix_vectors: 1,
                ..Type3Config::new(GIB, 0)
            })
            .is_err()
        );
        assert!(
            mk(Type3Config {
                msix_vectors: 17,
                ..Type3Config::new(GIB, 0)
            })
            .is_err()
        );
        assert!(
            mk(Type3Config {
                mailbox_payload_log2: 7,
                ..Type3Config::new(GIB, 0)
            })
            .is_err()
        );
        assert!(
            mk(Type3Config {
                hdm_decoders: 3,
                ..Type3Config::new(GIB, 0)
            })
            .is_err()
        );
        // Persistent-only device: one DVSEC range.
        let mut d = mk(Type3Config::new(0, GIB)).unwrap();
        let dv = d.dvsec_offset();
        assert_eq!(
            (u32::from(cfg16(&mut d, dv + device::CAP as u16)) >> 4) & 3,
            1
        );
        // 1 MiB mailbox: 2 MiB BAR2.
        let d = mk(Type3Config {
            mailbox_payload_log2: 20,
            ..Type3Config::new(GIB, 0)
        })
        .unwrap();
        assert_eq!(d.bars()[1].size, 0x20_0000);
    }

    fn ecam(bus: u8, dev: u8, reg: u16) -> u64 {
        (u64::from(bus) << 20) | (u64::from(dev) << 15) | u64::from(reg)
    }

    /// The whole topology behind a root complex, driven through ECAM and MMIO like Linux:
    /// root port dport setup, endpoint register discovery, mailbox, Mem_Enable, decoder commit,
    /// MSI-X.
    #[test]
    fn topology_through_the_root_complex() {
        let sink = Arc::new(RecordingMsiSink::new());
        let l = Arc::new(RecordingListener::default());
        let mut rc = PciRootComplex::new(PciWindows::default()).unwrap();
        let port = CxlRootPort::new(RootPortConfig::cxl(3), sink.clone()).unwrap();
        let bus = rc
            .add_bridge(
                PciAddress::new(0, 2, 0).unwrap(),
                Box::new(port),
                BridgeResources::default(),
            )
            .unwrap();
        let mut cfg = Type3Config::new(GIB, GIB);
        cfg.windows = vec![HpaWindow::new(WIN, 4 * GIB)];
        cfg.listener = Some(l.clone());
        let dev = CxlType3Device::new(cfg, Box::new(UnsupportedMailbox), sink.clone()).unwrap();
        let irq = dev.interrupts();
        let (dev, handle) = crate::pci::SharedFunction::new(dev);
        rc.add_device(PciAddress::new(bus, 0, 0).unwrap(), Box::new(dev))
            .unwrap();

        let c32 = |rc: &mut PciRootComplex, b: u8, d: u8, reg: u16| {
            let mut v = [0u8; 4];
            rc.ecam_read(ecam(b, d, reg), &mut v);
            u32::from_le_bytes(v)
        };
        let bar_addr = |rc: &mut PciRootComplex, b: u8, d: u8, i: u16| -> u64 {
            let mut v = [0u8; 4];
            rc.ecam_read(ecam(b, d, 0x10 + 4 * i), &mut v);
            let lo = u64::from(u32::from_le_bytes(v) & !0xf);
            rc.ecam_read(ecam(b, d, 0x14 + 4 * i), &mut v);
            lo | (u64::from(u32::from_le_bytes(v)) << 32)
        };
        let m32 = |rc: &mut PciRootComplex, a: u64| {
            let mut v = [0u8; 4];
            assert!(rc.mmio_read(a, &mut v), "{a:#x} decodes");
            u32::from_le_bytes(v)
        };

        // Root port (dport): Port Number from Link Capabilities, component regs with RAS.
        let pcie = {
            let mut rd = |o: u16, b: &mut [u8]| rc.ecam_read(ecam(0, 2, o), b);
            find_capability(&mut rd, cap_id::PCI_EXPRESS).unwrap()
        };
        assert_eq!(c32(&mut rc, 0, 2, u16::from(pcie) + 0xc) >> 24, 3);
        let rp_comp = u64::from(c32(&mut rc, 0, 2, 0x10) & !0xf);
        assert_eq!(m32(&mut rc, rp_comp + 0x1000) & 0xffff, 1);
        assert_eq!(m32(&mut rc, rp_comp + 0x1004) & 0xffff, 2, "RAS first");

        // Endpoint: class, BARs, registers.
        assert_eq!(c32(&mut rc, bus, 0, 8) >> 8, CLASS_CXL_MEMORY);
        let comp = bar_addr(&mut rc, bus, 0, 0);
        let devr = bar_addr(&mut rc, bus, 0, 2);
        assert_eq!(m32(&mut rc, comp + HDM_OFFSET) & 0xf, 1, "two decoders");
        assert_eq!(
            m32(&mut rc, devr + 4) & 0xffff,
            3,
            "three device capabilities"
        );
        assert_ne!(
            m32(&mut rc, devr + MEMDEV_OFFSET) & 0x10,
            0,
            "mailbox ready"
        );
        // A mailbox command through MMIO.
        let mb = devr + MAILBOX_OFFSET;
        assert!(rc.mmio_write(mb + mbox::CMD, &0x4000u64.to_le_bytes()));
        assert!(rc.mmio_write(mb + mbox::CTRL, &1u32.to_le_bytes()));
        assert_eq!(m32(&mut rc, mb + mbox::CTRL) & 1, 0);
        assert_eq!(
            m32(&mut rc, mb + mbox::STATUS + 4) as u16,
            mbox_rc::UNSUPPORTED
        );

        // Mem_Enable via ECAM, HDM enable and a commit via MMIO.
        let dv = {
            let mut rd = |o: u16, b: &mut [u8]| rc.ecam_read(ecam(bus, 0, o), b);
            find_dvsec(&mut rd, id::CXL_DEVICE).unwrap()
        };
        rc.ecam_write(
            ecam(bus, 0, dv + device::CTRL as u16),
            &device::CTRL_MEM_ENABLE.to_le_bytes(),
        );
        let hdmb = comp + HDM_OFFSET;
        rc.mmio_write(hdmb + hdm::GLOBAL_CTRL, &hdm::ENABLE.to_le_bytes());
        let d0 = hdmb + hdm::DECODER0;
        rc.mmio_write(d0 + hdm::BASE_HI, &((WIN >> 32) as u32).to_le_bytes());
        rc.mmio_write(d0 + hdm::BASE_LO, &0u32.to_le_bytes());
        rc.mmio_write(d0 + hdm::SIZE_HI, &1u32.to_le_bytes());
        rc.mmio_write(d0 + hdm::SIZE_LO, &0u32.to_le_bytes());
        rc.mmio_write(
            d0 + hdm::CTRL,
            &(hdm::CTRL_COMMIT | hdm::CTRL_HOSTONLY).to_le_bytes(),
        );
        assert_ne!(
            m32(&mut rc, d0 + hdm::CTRL) & hdm::CTRL_ERR,
            0,
            "4 GiB > device capacity"
        );
        rc.mmio_write(d0 + hdm::CTRL, &0u32.to_le_bytes());
        rc.mmio_write(d0 + hdm::SIZE_HI, &0u32.to_le_bytes());
        rc.mmio_write(d0 + hdm::SIZE_LO, &(GIB as u32).to_le_bytes());
        rc.mmio_write(
            d0 + hdm::CTRL,
            &(hdm::CTRL_COMMIT | hdm::CTRL_HOSTONLY).to_le_bytes(),
        );
        assert_ne!(m32(&mut rc, d0 + hdm::CTRL) & hdm::CTRL_COMMITTED, 0);
        let ev = l.take();
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].1.hpa_base, ev[0].1.size), (WIN, GIB));

        // MSI-X vector 1 (events) through BAR4.
        let msix = u64::from(c32(&mut rc, bus, 0, 0x20) & !0xf);
        rc.mmio_write(msix + 16, &0xfee0_1000u32.to_le_bytes());
        rc.mmio_write(msix + 24, &0x55u32.to_le_bytes());
        rc.mmio_write(msix + 28, &0u32.to_le_bytes());
        let msix_cap = {
            let mut rd = |o: u16, b: &mut [u8]| rc.ecam_read(ecam(bus, 0, o), b);
            find_capability(&mut rd, cap_id::MSIX).unwrap()
        };
        rc.ecam_write(ecam(bus, 0, 4), &6u16.to_le_bytes());
        rc.ecam_write(
            ecam(bus, 0, u16::from(msix_cap) + 2),
            &0x8000u16.to_le_bytes(),
        );
        assert!(sink.is_empty());
        // The command set raises its event vector through the handle it was given.
        assert_eq!(
            irq.trigger(EVENT_VECTOR),
            crate::pci::MsixTriggerResult::Delivered
        );
        let m = sink.take();
        assert_eq!((m[0].address, m[0].data), (0xfee0_1000, 0x55));
        assert_eq!(m[0].requester_id, RequesterId::new(bus, 0, 0));
        // The VMM's handle still reaches the function (e.g. on VM reset).
        assert_eq!(rc.functions()[1].1, "cxl-type3");
        crate::bus::lock(&handle).reset();
        assert!(!l.take()[0].0, "unmapped");
        assert_eq!(m32(&mut rc, d0 + hdm::CTRL), 0);
    }

    #[test]
    fn event_interrupts_through_the_handle() {
        let sink = Arc::new(RecordingMsiSink::new());
        let mut d = CxlType3Device::new(
            Type3Config::new(GIB, 0),
            Box::new(UnsupportedMailbox),
            sink.clone(),
        )
        .unwrap();
        d.set_requester_id(RequesterId::new(1, 0, 0));
        let irq = d.interrupts();
        assert_eq!(irq.num_vectors(), DEFAULT_MSIX_VECTORS);
        d.bar_write(MSIX_BAR, 16, &0xfee0_0000u32.to_le_bytes());
        d.bar_write(MSIX_BAR, 24, &0x31u32.to_le_bytes());
        d.bar_write(MSIX_BAR, 28, &0u32.to_le_bytes());
        let cap = d.msix_cap_offset();
        // MSI-X disabled: dropped.
        assert_eq!(
            irq.trigger(EVENT_VECTOR),
            crate::pci::MsixTriggerResult::Disabled
        );
        d.config_write(4, &6u16.to_le_bytes());
        d.config_write(cap + 2, &0x8000u16.to_le_bytes());
        assert_eq!(
            irq.trigger(EVENT_VECTOR),
            crate::pci::MsixTriggerResult::Delivered
        );
        let m = sink.take();
        assert_eq!(
            (m[0].data, m[0].requester_id),
            (0x31, RequesterId::new(1, 0, 0))
        );
        // Masked vector 0 becomes pending and shows in the PBA.
        assert_eq!(irq.trigger(0), crate::pci::MsixTriggerResult::Pending);
        let mut p = [0u8; 8];
        d.bar_read(MSIX_BAR, u64::from(MSIX_PBA_OFFSET), &mut p);
        assert_eq!(u64::from_le_bytes(p), 1);
    }

    /// Arbitrary config and BAR traffic (what a fuzz target does): no panics, and the listener
    /// only ever sees ranges inside the device and the window.
    #[test]
    fn arbitrary_config_and_bar_accesses() {
        let l = Arc::new(RecordingListener::default());
        let mut d = device_with(l.clone());
        let mut rng = Rng(0x0dd_ba11);
        let dv = d.dvsec_offset();
        for i in 0..100_000u32 {
            let len = [1usize, 2, 4, 8, 3, 0][rng.below(6) as usize];
            let v = rng.next().to_le_bytes();
            let mut buf = vec![0u8; len];
            match rng.below(8) {
                0 => d.config_write(rng.below(0x1100) as u16, &v[..len]),
                1 => d.config_read(rng.below(0x1100) as u16, &mut buf),
                2 => d.config_write(dv + device::CTRL as u16, &[4 * rng.below(2) as u8, 0]),
                3 => d.bar_write(rng.below(6) as u8, rng.below(0x1_0010), &v[..len]),
                4 => d.bar_read(rng.below(6) as u8, rng.below(0x1_0010), &mut buf),
                _ => {
                    let reg = HDM_OFFSET
                        + [
                            4u64, 0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, 0x28, 0x30, 0x34, 0x38, 0x3c,
                            0x40, 0x44, 0x48,
                        ][rng.below(15) as usize];
                    let val = match rng.below(3) {
                        0 => (WIN + rng.below(20) * M256) >> (32 * rng.below(2)),
                        1 => rng.below(6) * M256,
                        _ => 0x1202 * rng.below(2),
                    };
                    d.bar_write(COMPONENT_BAR, reg, &val.to_le_bytes()[..4]);
                }
            }
            if i % 20_000 == 0 {
                d.reset();
            }
        }
        for (commit, r) in l.take() {
            if commit {
                assert!(r.hpa_base >= WIN && r.hpa_base + r.size <= WIN + 4 * GIB);
                let dpa = r.dpa_base().unwrap();
                assert!(dpa + r.size <= 2 * GIB);
            }
        }
    }
}

/// The register model driving the real command set ([`crate::cxl::memdev`]).
#[cfg(test)]
mod memdev_integration {
    use iommu::RecordingMsiSink;

    use super::*;
    use crate::cxl::device_regs::{MAILBOX_OFFSET, STATUS_OFFSET, mbox};
    use crate::cxl::events::{EventLogKind, GeneralMediaEvent};
    use crate::cxl::memdev::{Memdev, MemdevConfig, SharedMemdev};

    fn send(d: &mut CxlType3Device, opcode: u16, input: &[u8]) -> (u16, Vec<u8>) {
        for (i, b) in input.iter().enumerate() {
            d.bar_write(DEVICE_BAR, MAILBOX_OFFSET + mbox::PAYLOAD + i as u64, &[*b]);
        }
        let cmd = u64::from(opcode) | ((input.len() as u64) << 16);
        d.bar_write(DEVICE_BAR, MAILBOX_OFFSET + mbox::CMD, &cmd.to_le_bytes());
        d.bar_write(DEVICE_BAR, MAILBOX_OFFSET + mbox::CTRL, &1u32.to_le_bytes());
        let mut q = [0u8; 8];
        d.bar_read(DEVICE_BAR, MAILBOX_OFFSET + mbox::STATUS, &mut q);
        let rc = (u64::from_le_bytes(q) >> 32) as u16;
        d.bar_read(DEVICE_BAR, MAILBOX_OFFSET + mbox::CMD, &mut q);
        let len = ((u64::from_le_bytes(q) >> 16) & 0x1f_ffff) as usize;
        let mut out = vec![0u8; len];
        for (i, b) in out.iter_mut().enumerate() {
            let mut x = [0u8; 1];
            d.bar_read(
                DEVICE_BAR,
                MAILBOX_OFFSET + mbox::PAYLOAD + i as u64,
                &mut x,
            );
            *b = x[0];
        }
        (rc, out)
    }

    #[test]
    fn identify_and_event_interrupts() {
        let sink = Arc::new(RecordingMsiSink::new());
        let memdev = SharedMemdev::new(
            Memdev::new(MemdevConfig {
                volatile_bytes: 1 << 30,
                ..MemdevConfig::default()
            })
            .unwrap(),
        );
        let mut d = CxlType3Device::new(
            Type3Config::new(1 << 30, 0),
            Box::new(memdev.clone()),
            sink.clone(),
        )
        .unwrap();
        // IDENTIFY (CXL 2.0 8.2.9.5.1.1): total and volatile capacity in 256 MiB units.
        let (rc, out) = send(&mut d, 0x4000, &[]);
        assert_eq!(rc, 0);
        assert!(out.len() >= 0x43);
        let cap = |o: usize| u64::from_le_bytes(out[o..o + 8].try_into().unwrap());
        assert_eq!((cap(0x10), cap(0x18), cap(0x20)), (4, 4, 0));

        // Event interrupts: the command set raises the vector it reports through the handle.
        let irq = d.interrupts();
        memdev
            .lock()
            .set_event_interrupt_sink(Some(Box::new(move |e| {
                irq.trigger(u16::from(e.msgnum));
            })));
        let (rc, policy) = send(&mut d, 0x0102, &[]);
        assert_eq!(rc, 0);
        // cxl_event_config_msgnums: MSI/MSI-X for all four logs, then read back.
        assert_eq!(send(&mut d, 0x0103, &[1, 1, 1, 1]).0, 0);
        let (_, policy2) = send(&mut d, 0x0102, &[]);
        assert_ne!(policy, policy2);
        let vector = u16::from(policy2[0] >> 4);
        assert!(vector < DEFAULT_MSIX_VECTORS);
        // Guest programs that vector and enables MSI-X.
        d.bar_write(
            MSIX_BAR,
            16 * u64::from(vector),
            &0xfee0_0000u32.to_le_bytes(),
        );
        d.bar_write(MSIX_BAR, 16 * u64::from(vector) + 8, &0x77u32.to_le_bytes());
        d.bar_write(MSIX_BAR, 16 * u64::from(vector) + 12, &0u32.to_le_bytes());
        let cap_off = d.msix_cap_offset();
        d.config_write(4, &6u16.to_le_bytes());
        d.config_write(cap_off + 2, &0x8000u16.to_le_bytes());
        memdev
            .lock()
            .inject_general_media_event(EventLogKind::Failure, &GeneralMediaEvent::default())
            .unwrap();
        let m = sink.take();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].data, 0x77);
        // cxl_event_thread reads the Event Status register.
        let mut s = [0u8; 4];
        d.bar_read(DEVICE_BAR, STATUS_OFFSET, &mut s);
        assert_eq!(
            u32::from_le_bytes(s) & 0xf,
            1 << 2,
            "failure log has records"
        );
    }
}

#[cfg(test)]
mod ras_tests {
    use std::sync::Arc;

    use iommu::{NullMsiSink, RecordingMsiSink, RequesterId};

    use super::*;
    use crate::cxl::UnsupportedMailbox;
    use crate::cxl::component::{RAS_OFFSET, ras};
    use crate::cxl::root_port::CxlRootPort;
    use crate::pci::RootPortConfig;
    use crate::pci::aer::root_status;
    use crate::pci::capability::{aer, cap_id, ext_cap_id, find_capability, find_ext_capability};
    use crate::pci::pcie::DEVCTL;

    fn cfg32(d: &mut dyn PciDevice, off: u16) -> u32 {
        let mut b = [0u8; 4];
        d.config_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// What Linux sets up before errors can reach `cxl_error_detected`: the endpoint's Device
    /// Control error reporting enables (`pci_aer_init`), the root port's Root Error Command
    /// and its MSI-X vector (portdrv, `aer_enable_rootport`), the secondary bus number.
    fn linux_setup() -> (CxlType3Device, CxlRootPort, Arc<RecordingMsiSink>, u16, u16) {
        let mut d = CxlType3Device::new(
            Type3Config::new(256 << 20, 0),
            Box::new(UnsupportedMailbox),
            Arc::new(NullMsiSink),
        )
        .unwrap();
        let pcie = d.pcie_offset();
        d.config_write(pcie + DEVCTL as u16, &0x000fu16.to_le_bytes());
        let daer = {
            let mut rd = |o: u16, b: &mut [u8]| d.config_read(o, b);
            find_ext_capability(&mut rd, ext_cap_id::AER).unwrap()
        };
        let sink = Arc::new(RecordingMsiSink::new());
        let mut p = CxlRootPort::new(RootPortConfig::cxl(0), sink.clone()).unwrap();
        p.set_requester_id(RequesterId::new(0, 2, 0));
        p.config_write(crate::pci::config::SECONDARY_BUS, &[0x0d]);
        p.bar_write(1, 0, &0xfee0_0000u32.to_le_bytes());
        p.bar_write(1, 8, &0x41u32.to_le_bytes());
        p.bar_write(1, 12, &0u32.to_le_bytes());
        let cap = {
            let mut rd = |o: u16, b: &mut [u8]| p.config_read(o, b);
            u16::from(find_capability(&mut rd, cap_id::MSIX).unwrap())
        };
        p.config_write(4, &6u16.to_le_bytes());
        p.config_write(cap + 2, &0x8000u16.to_le_bytes());
        let raer = p.aer_offset();
        p.config_write(raer + aer::ROOT_COMMAND as u16, &7u32.to_le_bytes());
        (d, p, sink, daer, raer)
    }

    #[test]
    fn an_injected_correctable_error_reaches_the_root_port_as_err_cor() {
        let (mut d, mut p, sink, daer, raer) = linux_setup();
        let message = d.inject_correctable(1 << 6).expect("ERR_COR sent");
        assert!(p.receive_error_message(message));
        assert_eq!(sink.take().len(), 1, "the AER interrupt");
        assert_eq!(
            cfg32(&mut p, raer + aer::ROOT_STATUS as u16) & 0x7f,
            root_status::COR
        );
        assert_eq!(cfg32(&mut p, raer + aer::ERROR_SOURCE as u16), 0x0d00);
        // What aer_isr then reads from the source and cxl_handle_cor_ras from the RAS block.
        assert_eq!(
            cfg32(&mut d, daer + aer::COR_STATUS as u16),
            crate::pci::aer::COR_INTERNAL
        );
        assert_eq!(d.component().ras().correctable_status(), 1 << 6);
        let mut b = [0u8; 4];
        d.bar_read(COMPONENT_BAR, RAS_OFFSET + ras::CE_STATUS, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1 << 6);
    }

    #[test]
    fn an_injected_uncorrectable_error_is_fatal_by_default_and_logs_its_header() {
        let (mut d, mut p, _sink, daer, raer) = linux_setup();
        let message = d
            .inject_uncorrectable((1 << 7) | (1 << 14), &[0xdead_beef, 1, 2])
            .expect("sent");
        assert_eq!(message, crate::pci::aer::ErrorMessage::Fatal);
        assert!(p.receive_error_message(message));
        let status = cfg32(&mut p, raer + aer::ROOT_STATUS as u16);
        assert_eq!(
            status & 0x7f,
            root_status::UNCOR | root_status::FIRST_FATAL | root_status::FATAL
        );
        assert_eq!(cfg32(&mut p, raer + aer::ERROR_SOURCE as u16) >> 16, 0x0d00);
        assert_eq!(
            cfg32(&mut d, daer + aer::UNCOR_STATUS as u16),
            crate::pci::aer::UNCOR_INTERNAL
        );
        let mut b = [0u8; 4];
        d.bar_read(COMPONENT_BAR, RAS_OFFSET + ras::HEADER_LOG, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        // Reporting disabled in Device Control: logged, nothing sent.
        let (mut d, ..) = linux_setup();
        let pcie = d.pcie_offset();
        d.config_write(pcie + DEVCTL as u16, &0u16.to_le_bytes());
        assert_eq!(d.inject_correctable(1), None);
        assert_eq!(d.component().ras().correctable_status(), 1);
    }
}
