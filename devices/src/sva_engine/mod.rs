//! The project's SVA DMA engine (`vmm run --dma-engine`; datasheet: docs/sva-engine.md): a
//! Root Complex Integrated Endpoint with ATS, PASID and PRI that runs a descriptor ring of
//! copies, fills and compares on a process's own virtual addresses, tagged with the PASID the
//! guest kernel gave the process (`iommu_sva_bind_device()`, driven by `uio_pci_generic_sva`).
//!
//! - [`registers`]: the BAR 0 register map;
//! - [`descriptor`]: the 64-byte descriptor and the 32-byte completion record;
//! - [`atc`]: the address translation cache ATS fills and device-TLB invalidations flush;
//! - `engine`: the worker thread that runs the ring — translation requests on ATC misses, a PRI
//!   page request (a group of one, LPIG) when the translation denies the access, the descriptor
//!   parked until the page group response — and the endpoint the IOMMU calls back.
//!
//! Every access goes through the function's [`iommu::DmaSpace`] with the descriptor's PASID, so
//! the VT-d model walks that PASID's first-stage tables (the process's page tables).

pub mod atc;
pub mod descriptor;
mod engine;
pub mod registers;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use iommu::{DmaSpace, MsiSink, RequesterId};

pub use engine::{EngineCounters, MAX_PAGE_REQUESTS_PER_PAGE};
use engine::{EngineEndpoint, Shared};

use crate::pci::address_translation::{
    AddressTranslation, AtsConfig, PasidConfig, PriConfig, TranslationEvent,
};
use crate::pci::msix::MsixLayout;
use crate::pci::pcie::PcieCapabilityConfig;
use crate::pci::{
    BarInfo, BarKind, ConfigSpace, FunctionInterrupts, HeaderType, MsixCapability, PciDevice,
    PciError, PciIds,
};
use registers::{caps, ctrl, error};

/// Vendor ID (the one QEMU's own test devices use; no Linux driver matches 1234:5356).
pub const VENDOR_ID: u16 = 0x1234;
/// Device ID ("SV").
pub const DEVICE_ID: u16 = 0x5356;
/// Class code: base system peripheral, other.
pub const CLASS_CODE: u32 = 0x08_80_00;
/// BAR 0 size.
pub const BAR0_SIZE: u64 = 0x4000;
/// MSI-X table offset in BAR 0.
pub const MSIX_TABLE_OFFSET: u32 = 0x2000;
/// MSI-X PBA offset in BAR 0.
pub const MSIX_PBA_OFFSET: u32 = 0x3000;
/// PASID width the function supports.
pub const PASID_WIDTH: u8 = 20;
/// PRI Outstanding Page Request Capacity.
pub const PRI_CAPACITY: u32 = 256;

/// What the function looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvaEngineConfig {
    /// The function has the ATS capability.
    pub ats: bool,
    /// The function has the PRI capability (needs ATS).
    pub pri: bool,
}

impl Default for SvaEngineConfig {
    fn default() -> Self {
        SvaEngineConfig {
            ats: true,
            pri: true,
        }
    }
}

/// What the control API shows of the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvaEngineSnapshot {
    /// STATUS register.
    pub status: u64,
    /// CTRL register.
    pub ctrl: u64,
    /// ERROR register.
    pub error: u64,
    /// RING_SIZE, RING_HEAD, RING_TAIL.
    pub ring: (u64, u64, u64),
    /// RING_PASID register.
    pub ring_pasid: u32,
    /// ATS, PASID and PRI enables the guest programmed.
    pub ats_enabled: bool,
    /// PASID Enable.
    pub pasid_enabled: bool,
    /// PRI Enable.
    pub pri_enabled: bool,
    /// PRI Outstanding Page Request Allocation.
    pub pri_allocation: u32,
    /// Page requests sent and not answered.
    pub pri_outstanding: usize,
    /// ATC entries.
    pub atc_entries: usize,
    /// Counters since the function was created.
    pub counters: EngineCounters,
}

/// The SVA engine function.
pub struct SvaEngineFunction {
    config: ConfigSpace,
    pcie_offset: u16,
    interrupts: FunctionInterrupts,
    translation: AddressTranslation,
    dma: DmaSpace,
    shared: Arc<Shared>,
    caps: u64,
    worker: Option<JoinHandle<()>>,
}

impl fmt::Debug for SvaEngineFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvaEngineFunction")
            .field("requester_id", &self.dma.requester_id())
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

impl SvaEngineFunction {
    /// Builds the function and starts its worker thread (`name` names the thread). Its DMA
    /// goes through `dma` (whose translator receives the function's device-TLB invalidations
    /// and page responses), its MSI-X messages to `msi`.
    pub fn new(
        cfg: SvaEngineConfig,
        dma: DmaSpace,
        msi: Arc<dyn MsiSink>,
        name: &str,
    ) -> Result<Self, PciError> {
        if cfg.pri && !cfg.ats {
            return Err(PciError::InvalidConfig(
                "the SVA engine's PRI needs ATS (pri=on with ats=off)".into(),
            ));
        }
        let mut config = ConfigSpace::new(
            HeaderType::Type0,
            PciIds {
                vendor_id: VENDOR_ID,
                device_id: DEVICE_ID,
                revision_id: 0x01,
                class_code: CLASS_CODE,
                subsystem_vendor_id: VENDOR_ID,
                subsystem_id: 0x0001,
            },
        );
        // 32-bit non-prefetchable: uio_pci_generic_sva maps only MEM | SIZEALIGN BARs.
        config.add_bar(0, BAR0_SIZE, BarKind::Memory32, false)?;
        let pcie_offset = u16::from(
            config.add_capability(
                &PcieCapabilityConfig {
                    flr: true,
                    end_end_tlp_prefix: true,
                    ..PcieCapabilityConfig::rc_integrated_endpoint()
                }
                .build(),
            )?,
        );
        let msix = MsixCapability::new(
            &mut config,
            MsixLayout {
                num_vectors: 1,
                table_bar: 0,
                table_offset: MSIX_TABLE_OFFSET,
                pba_bar: 0,
                pba_offset: MSIX_PBA_OFFSET,
            },
            msi,
            dma.requester_id(),
        )?;
        let translation = AddressTranslation::add(
            &mut config,
            cfg.ats.then(AtsConfig::default),
            Some(PasidConfig {
                width: PASID_WIDTH,
                exec: true,
                privileged: true,
            }),
            cfg.pri.then_some(PriConfig {
                capacity: PRI_CAPACITY,
            }),
        )?;
        let interrupts = FunctionInterrupts::new(Arc::new(Mutex::new(msix)));
        dma.set_bus_master(false);
        let shared = Shared::new();
        dma.register_endpoint(Arc::new(EngineEndpoint(shared.clone())));
        let worker = engine::spawn(shared.clone(), dma.clone(), interrupts.clone(), name)
            .map_err(|e| PciError::InvalidConfig(format!("cannot start the engine thread: {e}")))?;
        let caps = caps::COPY
            | caps::FILL
            | caps::COMPARE
            | if cfg.ats { caps::ATS } else { 0 }
            | if cfg.pri { caps::PRI } else { 0 }
            | u64::from(PASID_WIDTH) << caps::PASID_WIDTH_SHIFT
            | registers::MAX_RING_ENTRIES << caps::MAX_RING_SHIFT;
        Ok(SvaEngineFunction {
            config,
            pcie_offset,
            interrupts,
            translation,
            dma,
            shared,
            caps,
            worker: Some(worker),
        })
    }

    /// The function's DMA space.
    pub fn dma(&self) -> &DmaSpace {
        &self.dma
    }

    /// Config space (device-side view).
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// Offsets of the ATS, PASID and PRI capabilities.
    pub fn capability_offsets(&self) -> (Option<u16>, Option<u16>, Option<u16>) {
        self.translation.offsets()
    }

    /// Counters since the function was created.
    pub fn counters(&self) -> EngineCounters {
        self.shared.state().counters
    }

    /// What the control API shows.
    pub fn snapshot(&self) -> SvaEngineSnapshot {
        let atc_entries = self
            .shared
            .atc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        let s = self.shared.state();
        SvaEngineSnapshot {
            status: s.status(),
            ctrl: s.ctrl,
            error: s.error,
            ring: (s.ring_size, s.ring_head, s.ring_tail),
            ring_pasid: s.ring_pasid,
            ats_enabled: s.ats_enabled,
            pasid_enabled: s.pasid_enabled,
            pri_enabled: s.pri_enabled,
            pri_allocation: s.pri_allocation,
            pri_outstanding: s.outstanding_groups.len(),
            atc_entries,
            counters: s.counters,
        }
    }

    /// Function Level Reset: the engine stops (the descriptor in flight is ABORTED), the
    /// ATC empties, ATS/PASID/PRI and MSI-X are disabled, Bus Master Enable clears.
    pub fn function_level_reset(&mut self) {
        self.config.set_u16(crate::pci::config::COMMAND, 0);
        self.dma.set_bus_master(false);
        let events = self.translation.reset(&mut self.config);
        let msix_control = self.interrupts.with(|m| m.cap_offset()) + 2;
        let v = self.config.read_u16(msix_control) & !0xc000;
        self.config.set_u16(msix_control, v);
        self.interrupts.with(|m| {
            m.config_written(&self.config, msix_control, 2);
            m.table_mut().reset();
        });
        {
            let mut s = self.shared.state();
            s.reset_engine();
            s.bus_master = false;
            s.pri_stopped = false;
            s.pending_response_failure = false;
            s.pending_unexpected_group = false;
            apply_events(&mut s, &events);
            s.pri_clear_credits();
        }
        self.shared.clear_atc();
        self.shared.wake.notify_all();
    }

    /// Moves the PRI status bits the worker and the endpoint noted into config space.
    fn sync_pri_status(&mut self) {
        let (rf, uprgi) = {
            let mut s = self.shared.state();
            (
                std::mem::take(&mut s.pending_response_failure),
                std::mem::take(&mut s.pending_unexpected_group),
            )
        };
        if rf {
            self.translation.pri_response_failure(&mut self.config);
        }
        if uprgi {
            self.translation.pri_unexpected_group(&mut self.config);
        }
    }

    fn read_register(&self, reg: u64) -> u64 {
        let s = self.shared.state();
        match reg {
            registers::ID => registers::ID_VALUE,
            registers::CAPS => self.caps,
            registers::CTRL => s.ctrl,
            registers::STATUS => s.status(),
            registers::RING_BASE => s.ring_base,
            registers::RING_SIZE => s.ring_size,
            registers::RING_HEAD => s.ring_head,
            registers::RING_TAIL => s.ring_tail,
            registers::RING_PASID => u64::from(s.ring_pasid),
            registers::ERROR => s.error,
            registers::ERROR_ADDR => s.error_addr,
            registers::INT_STATUS => s.int_status,
            registers::COMPLETED => s.reg_completed,
            registers::PAGE_REQUESTS => s.reg_page_requests,
            registers::ATS_TRANSLATIONS => s.reg_ats_translations,
            registers::ATC_INVALIDATIONS => s.reg_atc_invalidations,
            _ => 0,
        }
    }

    /// Writes the bits of `value` selected by `mask` to the register at `reg`.
    fn write_register(&mut self, reg: u64, value: u64, mask: u64) {
        let mut clear_atc = false;
        {
            let mut s = self.shared.state();
            let merge = |old: u64| (old & !mask) | (value & mask);
            match reg {
                registers::CTRL => {
                    let new = merge(s.ctrl);
                    if new & ctrl::RESET != 0 {
                        s.reset_engine();
                        clear_atc = true;
                    } else {
                        s.ctrl = new & (ctrl::ENABLE | ctrl::INT_ENABLE);
                        let enable = new & ctrl::ENABLE != 0;
                        if enable && !s.enabled && !s.halted {
                            let size_ok = s.ring_size.is_power_of_two()
                                && (2..=registers::MAX_RING_ENTRIES).contains(&s.ring_size);
                            if !size_ok || s.ring_base & 63 != 0 {
                                s.halted = true;
                                s.error = error::RING_CONFIG;
                            } else {
                                s.ring_head = 0;
                                s.ring_tail = 0;
                            }
                            s.enabled = true;
                        } else if !enable {
                            s.enabled = false;
                        }
                    }
                }
                registers::RING_BASE if !s.enabled => s.ring_base = merge(s.ring_base),
                registers::RING_SIZE if !s.enabled => s.ring_size = merge(s.ring_size),
                registers::RING_PASID if !s.enabled => {
                    s.ring_pasid = merge(u64::from(s.ring_pasid)) as u32;
                }
                registers::RING_TAIL => {
                    let tail = merge(s.ring_tail);
                    if !s.enabled || s.halted {
                        log::debug!("sva-engine: doorbell {tail} while not running");
                    } else if tail >= s.ring_size {
                        s.halted = true;
                        s.error = error::TAIL_RANGE;
                    } else {
                        s.ring_tail = tail;
                    }
                }
                registers::ERROR => s.error &= !(value & mask),
                registers::INT_STATUS => s.int_status &= !(value & mask),
                _ => log::debug!("sva-engine: ignoring write to register {reg:#x}"),
            }
        }
        if clear_atc {
            self.shared.clear_atc();
        }
        self.shared.wake.notify_all();
    }
}

/// Applies the guest's ATS/PASID/PRI changes to the engine.
fn apply_events(s: &mut engine::EngineState, events: &[TranslationEvent]) {
    for event in events {
        match *event {
            TranslationEvent::AtsEnabled { .. } => s.ats_enabled = true,
            TranslationEvent::AtsDisabled => s.ats_enabled = false,
            TranslationEvent::PasidEnabled { privileged, .. } => {
                s.pasid_enabled = true;
                s.pasid_privileged = privileged;
            }
            TranslationEvent::PasidDisabled => {
                s.pasid_enabled = false;
                s.pasid_privileged = false;
            }
            TranslationEvent::PriEnabled { allocation } => {
                s.pri_enabled = true;
                s.pri_allocation = allocation;
                s.pri_stopped = false;
                s.pri_clear_credits();
            }
            TranslationEvent::PriDisabled => s.pri_enabled = false,
            TranslationEvent::PriReset => s.pri_clear_credits(),
        }
    }
}

impl Drop for SvaEngineFunction {
    fn drop(&mut self) {
        engine::stop(&self.shared);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl PciDevice for SvaEngineFunction {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.sync_pri_status();
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.sync_pri_status();
        self.config.write(offset, data);
        self.interrupts
            .with(|m| m.config_written(&self.config, offset, data.len()));
        let bus_master = self.config.bus_master_enabled();
        self.dma.set_bus_master(bus_master);
        let events = self
            .translation
            .config_written(&mut self.config, offset, data.len());
        let ats_off = events.contains(&TranslationEvent::AtsDisabled);
        {
            let mut s = self.shared.state();
            if s.bus_master && !bus_master {
                // Clearing Bus Master Enable aborts the descriptor in flight.
                s.abort_epoch += 1;
            }
            s.bus_master = bus_master;
            apply_events(&mut s, &events);
        }
        if ats_off {
            self.shared.clear_atc();
        }
        self.shared.wake.notify_all();
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
        if self.interrupts.with(|m| m.bar_read(bar, offset, data)) {
            return;
        }
        data.fill(0);
        let len = data.len();
        if offset >= registers::BLOCK_END
            || !(len == 4 || len == 8)
            || !offset.is_multiple_of(len as u64)
        {
            return;
        }
        let value = self.read_register(offset & !7) >> (8 * (offset & 4));
        data.copy_from_slice(&value.to_le_bytes()[..len]);
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != 0 || self.interrupts.with(|m| m.bar_write(bar, offset, data)) {
            return;
        }
        let len = data.len();
        if offset >= registers::BLOCK_END
            || !(len == 4 || len == 8)
            || !offset.is_multiple_of(len as u64)
        {
            log::debug!("sva-engine: ignoring {len}-byte write at {offset:#x}");
            return;
        }
        let mut bytes = [0u8; 8];
        bytes[..len].copy_from_slice(data);
        let shift = 8 * (offset & 4);
        let value = u64::from_le_bytes(bytes) << shift;
        let mask = if len == 8 {
            u64::MAX
        } else {
            0xffff_ffffu64 << shift
        };
        self.write_register(offset & !7, value, mask);
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn set_requester_id(&mut self, requester_id: RequesterId) {
        self.dma.set_requester_id(requester_id);
        self.interrupts.with(|m| m.set_requester_id(requester_id));
    }

    fn name(&self) -> &str {
        "sva-engine"
    }
}

#[cfg(test)]
mod tests;
