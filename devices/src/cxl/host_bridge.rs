//! The CXL host bridge component register block (CHBCR, CXL 2.0 8.2.5 / 9.14.1.2): 64 KiB of
//! MMIO at the address the CEDT CHBS structure reports, with RAS and an HDM decoder capability
//! whose switch-style decoders route host physical ranges to root ports.
//!
//! Linux `cxl_acpi` registers the host bridge as a CXL port with this block as its component
//! registers; when the first dport arrives, `cxl_port_add_dport` (drivers/cxl/port.c) maps it,
//! `devm_cxl_switch_port_decoders_setup` enumerates the decoders (drivers/cxl/core/hdm.c) and
//! region setup commits them with a target list naming the root port's Port Number. With at
//! least two decoders a RAM region and a pmem region coexist (the passthrough decoder Linux
//! uses when a bridge has no HDM capability allows a single region).
//!
//! Linux never sets HDM Decoder Enable on host bridges, so their commits do not require it
//! (see [`super::component`]). The block is a [`BusDevice`]: the VMM maps it at
//! `CXL_CHBCR_START` with length [`CxlHostBridge::SIZE`].

use std::sync::Arc;

use crate::bus::BusDevice;

use super::component::{ComponentRegisters, HdmConfig, HdmDecoderCapability, HdmRole};
use super::{COMPONENT_BLOCK_SIZE, CommittedRange, CxlError, HdmError, HdmListener, HpaWindow};

/// Construction parameters.
#[derive(Clone)]
pub struct CxlHostBridgeConfig {
    /// Number of HDM decoders (1, 2, 4, 6, 8 or 10; default 2).
    pub decoders: usize,
    /// Port Numbers of the CXL root ports below this bridge (1..=8).
    pub root_ports: Vec<u8>,
    /// CFMWS windows targeting this bridge.
    pub windows: Vec<HpaWindow>,
    /// Told about commits / uncommits (optional: the endpoint's listener maps memory).
    pub listener: Option<Arc<dyn HdmListener>>,
}

impl std::fmt::Debug for CxlHostBridgeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CxlHostBridgeConfig")
            .field("decoders", &self.decoders)
            .field("root_ports", &self.root_ports)
            .field("windows", &self.windows)
            .field("listener", &self.listener.is_some())
            .finish()
    }
}

impl CxlHostBridgeConfig {
    /// Two decoders, the given root ports and windows, no listener.
    pub fn new(root_ports: Vec<u8>, windows: Vec<HpaWindow>) -> Self {
        CxlHostBridgeConfig {
            decoders: 2,
            root_ports,
            windows,
            listener: None,
        }
    }
}

/// The host bridge component register block.
#[derive(Debug)]
pub struct CxlHostBridge {
    component: ComponentRegisters,
}

impl CxlHostBridge {
    /// Size of the MMIO block (the CHBS length).
    pub const SIZE: u64 = COMPONENT_BLOCK_SIZE;

    /// Builds the block.
    pub fn new(cfg: CxlHostBridgeConfig) -> Result<Self, CxlError> {
        let hdm = HdmDecoderCapability::new(HdmConfig {
            decoder_count: cfg.decoders,
            role: HdmRole::Switch {
                dports: cfg.root_ports,
            },
            windows: cfg.windows,
            listener: cfg.listener,
        })?;
        Ok(CxlHostBridge {
            component: ComponentRegisters::new(false, Some(hdm)),
        })
    }

    /// Firmware-style commit before boot: decoder `decoder` routes `[hpa_base, hpa_base + size)`
    /// to the root port with Port Number `target_port`, optionally locked; sets HDM Decoder
    /// Enable. Use the same range as the endpoint's precommit so Linux's `discover_region`
    /// matches them.
    pub fn precommit(
        &mut self,
        decoder: usize,
        hpa_base: u64,
        size: u64,
        target_port: u8,
        lock: bool,
    ) -> Result<CommittedRange, HdmError> {
        self.component
            .hdm_mut()
            .ok_or(HdmError::NoSuchDecoder(decoder))?
            .precommit(decoder, hpa_base, size, u64::from(target_port), lock)
    }

    /// The root port a committed decoder routes `hpa` to.
    pub fn route(&self, hpa: u64) -> Option<u8> {
        self.component.hdm()?.decode(hpa)?.0.route(hpa)
    }

    /// Committed decoders.
    pub fn committed(&self) -> Vec<CommittedRange> {
        self.component
            .hdm()
            .map(HdmDecoderCapability::committed)
            .unwrap_or_default()
    }

    /// Conventional reset: uncommits every decoder and clears the registers.
    pub fn reset(&mut self) {
        if let Some(h) = self.component.hdm_mut() {
            h.reset();
        }
        *self.component.ras_mut() = super::RasCapability::new();
    }

    /// The component registers.
    pub fn component(&self) -> &ComponentRegisters {
        &self.component
    }

    /// The component registers, mutably (RAS injection, listener).
    pub fn component_mut(&mut self) -> &mut ComponentRegisters {
        &mut self.component
    }
}

impl BusDevice for CxlHostBridge {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.component.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.component.write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::bus::Bus;
    use crate::cxl::component::tests::{GIB, M256, WIN, linux_commit, linux_reset, probe};
    use crate::cxl::component::{HDM_OFFSET, hdm};
    use crate::cxl::testutil::{RecordingListener, Rng};
    use crate::cxl::{DecodeTarget, HdmError};

    const CHBCR: u64 = 0xf000_0000;

    fn bridge() -> (CxlHostBridge, Arc<RecordingListener>) {
        let l = Arc::new(RecordingListener::default());
        let mut cfg = CxlHostBridgeConfig::new(vec![1], vec![HpaWindow::new(WIN, 4 * GIB)]);
        cfg.listener = Some(l.clone());
        (CxlHostBridge::new(cfg).unwrap(), l)
    }

    #[test]
    fn switch_port_decoders_setup_view() {
        let (hb, _) = bridge();
        let (hdm, ras) = probe(hb.component());
        assert_eq!(hdm, Some((HDM_OFFSET, 0x50)));
        assert!(ras.is_some());
        let mut d = [0u8; 4];
        let c = hb.component();
        c.read(HDM_OFFSET, &mut d);
        // 2 decoders, 1 target, interleave on A11:8 and A14:12.
        assert_eq!(u32::from_le_bytes(d), 0x311);
    }

    #[test]
    fn region_commit_and_teardown_like_linux() {
        let (mut hb, l) = bridge();
        let hdm = HDM_OFFSET;
        let c = hb.component_mut();
        // Linux never enables HDM decoding on host bridges; commits work anyway.
        linux_commit(c, hdm, 0, WIN, GIB, 1).unwrap();
        linux_commit(c, hdm, 1, WIN + 2 * GIB, GIB, 1).unwrap();
        assert_eq!(hb.route(WIN + 5), Some(1));
        assert_eq!(hb.route(WIN + 2 * GIB + GIB - 1), Some(1));
        assert_eq!(hb.route(WIN + GIB), None);
        let ev = l.take();
        assert_eq!(
            ev[1].1.target,
            DecodeTarget::Ports([1, 0, 0, 0, 0, 0, 0, 0])
        );
        // Wrong port, out of order, outside the window.
        let c = hb.component_mut();
        linux_reset(c, hdm, 1);
        assert_eq!(linux_commit(c, hdm, 1, WIN + GIB, GIB, 2), Err("EIO"));
        assert_eq!(linux_commit(c, hdm, 1, WIN + 4 * GIB, GIB, 1), Err("EIO"));
        linux_reset(c, hdm, 0);
        assert_eq!(linux_commit(c, hdm, 1, WIN, GIB, 1), Err("EIO"));
        assert!(hb.committed().is_empty());
        assert_eq!(l.take().len(), 2, "two uncommits");
    }

    #[test]
    fn precommit_and_mmio_bus() {
        let (mut hb, l) = bridge();
        let r = hb.precommit(0, WIN, GIB, 1, true).unwrap();
        assert_eq!(r.target, DecodeTarget::Ports([1, 0, 0, 0, 0, 0, 0, 0]));
        assert_eq!(
            hb.precommit(1, WIN, GIB, 1, false),
            Err(HdmError::Overlap(0))
        );
        assert_eq!(
            hb.precommit(1, WIN + GIB, GIB, 9, false),
            Err(HdmError::UnknownTarget(9))
        );
        assert_eq!(
            hb.precommit(2, WIN + GIB, GIB, 1, false),
            Err(HdmError::NoSuchDecoder(2))
        );
        assert_eq!(l.take().len(), 1);
        // Mapped on a bus like the VMM does at CXL_CHBCR_START.
        let hb = Arc::new(Mutex::new(hb));
        let mut bus = Bus::new();
        bus.insert(hb.clone(), CHBCR, CxlHostBridge::SIZE).unwrap();
        let mut d = [0u8; 4];
        assert!(bus.read(CHBCR + HDM_OFFSET + hdm::DECODER0 + hdm::CTRL, &mut d));
        let ctrl = u32::from_le_bytes(d);
        assert_ne!(ctrl & hdm::CTRL_COMMITTED, 0);
        assert_ne!(ctrl & hdm::CTRL_LOCK, 0);
        assert!(bus.read(CHBCR + HDM_OFFSET + hdm::DECODER0 + hdm::TL_LO, &mut d));
        assert_eq!(u32::from_le_bytes(d), 1);
        assert!(bus.read(CHBCR + HDM_OFFSET + hdm::GLOBAL_CTRL, &mut d));
        assert_eq!(u32::from_le_bytes(d), hdm::ENABLE);
        // Locked: the guest cannot tear it down.
        assert!(bus.write(
            CHBCR + HDM_OFFSET + hdm::DECODER0 + hdm::CTRL,
            &0u32.to_le_bytes()
        ));
        assert_eq!(crate::bus::lock(&hb).committed().len(), 1);
        crate::bus::lock(&hb).reset();
        assert!(crate::bus::lock(&hb).committed().is_empty());
        assert_eq!(l.take().len(), 1);
    }

    #[test]
    fn arbitrary_chbcr_accesses() {
        let (mut hb, _) = bridge();
        let mut rng = Rng(7);
        for _ in 0..100_000 {
            let off = if rng.below(2) == 0 {
                rng.below(0x1_0008)
            } else {
                HDM_OFFSET + rng.below(0x58)
            };
            let len = rng.below(10) as usize;
            let v = (WIN + rng.below(20) * M256).to_le_bytes();
            let data: Vec<u8> = (0..len).map(|i| v[i % 8] ^ (rng.below(2) as u8)).collect();
            if rng.below(2) == 0 {
                hb.write(off, &data);
            } else {
                let mut b = vec![0u8; len];
                hb.read(off, &mut b);
            }
        }
        assert!(CxlHostBridge::new(CxlHostBridgeConfig::new(vec![], vec![])).is_err());
    }
}
