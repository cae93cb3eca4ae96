//! MSI (PCI Local Bus Spec 3.0, 6.8.1; PCIe Base Spec r6.0, 7.7.1): the capability with a
//! 64-bit message address and per-vector masking.
//!
//! Layout (ID 0x05, 24 bytes): Message Control at +2 (bit 0 MSI Enable, bits 3:1 Multiple
//! Message Capable, bits 6:4 Multiple Message Enable, bit 7 64-bit address capable, bit 8
//! per-vector masking capable), Message Address at +4/+8, Message Data at +0xC, Mask Bits at
//! +0x10, Pending Bits at +0x14 (read-only to software).
//!
//! Delivery rules: with MSI disabled nothing is sent and nothing becomes pending; vector `v` of
//! the `2^MME` enabled ones sends Message Data with its low `MME` bits replaced by `v`; a masked
//! vector sets its pending bit instead, and unmasking it delivers it; nothing is sent while Bus
//! Master Enable is clear.

use std::sync::Arc;

use iommu::{MsiMessage, MsiSink, RequesterId};

use super::capability::{Capability, cap_id};
use super::config::{COMMAND, ConfigSpace};
use super::{MsixTriggerResult, PciError};

/// Message Control: MSI Enable.
pub const CONTROL_ENABLE: u16 = 1;
/// Message Control: Multiple Message Enable field (bits 6:4).
pub const CONTROL_MME_MASK: u16 = 0x70;
/// Message Control: 64-bit address capable.
pub const CONTROL_64BIT: u16 = 1 << 7;
/// Message Control: per-vector masking capable.
pub const CONTROL_PER_VECTOR_MASK: u16 = 1 << 8;
/// Offsets inside the capability.
pub mod reg {
    /// Message Control.
    pub const CONTROL: u16 = 2;
    /// Message Address (low dword).
    pub const ADDRESS_LO: u16 = 4;
    /// Message Upper Address.
    pub const ADDRESS_HI: u16 = 8;
    /// Message Data.
    pub const DATA: u16 = 0xc;
    /// Mask Bits.
    pub const MASK: u16 = 0x10;
    /// Pending Bits.
    pub const PENDING: u16 = 0x14;
    /// Capability length.
    pub const LEN: usize = 0x18;
}

/// An MSI capability in a function's config space. The registers live in the config space
/// (the guest reads them back as written); this tracks Bus Master Enable and delivers.
pub struct MsiCapability {
    cap_offset: u16,
    vectors: u8,
    bus_master: bool,
    sink: Arc<dyn MsiSink>,
    requester_id: RequesterId,
}

impl std::fmt::Debug for MsiCapability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiCapability")
            .field("cap_offset", &self.cap_offset)
            .field("vectors", &self.vectors)
            .field("requester_id", &self.requester_id)
            .finish_non_exhaustive()
    }
}

impl MsiCapability {
    /// Adds an MSI capability with `vectors` (1, 2, 4, 8, 16 or 32) requestable vectors to
    /// `config`.
    pub fn new(
        config: &mut ConfigSpace,
        vectors: u8,
        sink: Arc<dyn MsiSink>,
        requester_id: RequesterId,
    ) -> Result<Self, PciError> {
        if !vectors.is_power_of_two() || vectors > 32 {
            return Err(PciError::InvalidConfig(format!(
                "MSI needs 1, 2, 4, 8, 16 or 32 vectors (got {vectors})"
            )));
        }
        let mmc = vectors.trailing_zeros() as u16;
        let mut cap = Capability::new(cap_id::MSI, reg::LEN);
        cap.set_u16(
            usize::from(reg::CONTROL),
            CONTROL_64BIT | CONTROL_PER_VECTOR_MASK | mmc << 1,
        )
        .writable_u16(usize::from(reg::CONTROL), CONTROL_ENABLE | CONTROL_MME_MASK)
        .writable_u32(usize::from(reg::ADDRESS_LO), !3)
        .writable_u32(usize::from(reg::ADDRESS_HI), u32::MAX)
        .writable_u16(usize::from(reg::DATA), u16::MAX)
        .writable_u32(
            usize::from(reg::MASK),
            u32::MAX >> (32 - u32::from(vectors)),
        );
        let cap_offset = u16::from(config.add_capability(&cap)?);
        Ok(MsiCapability {
            cap_offset,
            vectors,
            bus_master: config.bus_master_enabled(),
            sink,
            requester_id,
        })
    }

    /// Offset of the capability in config space.
    pub fn cap_offset(&self) -> u16 {
        self.cap_offset
    }

    /// MSI Enable as the guest set it.
    pub fn enabled(&self, config: &ConfigSpace) -> bool {
        config.read_u16(self.cap_offset + reg::CONTROL) & CONTROL_ENABLE != 0
    }

    /// Number of vectors the guest enabled (`2^MME`, at most what the function asks for).
    pub fn enabled_vectors(&self, config: &ConfigSpace) -> u8 {
        let mme = (config.read_u16(self.cap_offset + reg::CONTROL) & CONTROL_MME_MASK) >> 4;
        (1u8 << mme.min(5)).min(self.vectors)
    }

    /// Tags future messages with a new requester ID.
    pub fn set_requester_id(&mut self, requester_id: RequesterId) {
        self.requester_id = requester_id;
    }

    /// Call after every config write the function accepted: picks up Bus Master Enable and
    /// delivers vectors that became unmasked (or deliverable) while pending.
    pub fn config_written(&mut self, config: &mut ConfigSpace, offset: u16, len: usize) {
        let overlaps = |reg: u16, width: u16| {
            u32::from(offset) < u32::from(reg) + u32::from(width)
                && u32::from(offset) + len as u32 > u32::from(reg)
        };
        if overlaps(COMMAND, 2) {
            self.bus_master = config.bus_master_enabled();
        }
        if overlaps(COMMAND, 2)
            || overlaps(self.cap_offset + reg::CONTROL, 2)
            || overlaps(self.cap_offset + reg::MASK, 4)
        {
            self.deliver_pending(config);
        }
    }

    /// Signals `vector`.
    pub fn trigger(&mut self, config: &mut ConfigSpace, vector: u8) -> MsixTriggerResult {
        if !self.enabled(config) {
            return MsixTriggerResult::Disabled;
        }
        if vector >= self.enabled_vectors(config) {
            log::debug!("{}: MSI vector {vector} not enabled", self.requester_id);
            return MsixTriggerResult::InvalidVector;
        }
        let bit = 1u32 << vector;
        if config.read_u32(self.cap_offset + reg::MASK) & bit != 0 {
            let pending = config.read_u32(self.cap_offset + reg::PENDING);
            config.set_u32(self.cap_offset + reg::PENDING, pending | bit);
            return MsixTriggerResult::Pending;
        }
        if !self.bus_master {
            log::debug!(
                "{}: MSI vector {vector} dropped, bus mastering disabled",
                self.requester_id
            );
            return MsixTriggerResult::BusMasterDisabled;
        }
        self.send(config, vector)
    }

    /// Back to the reset state: disabled, unmasked, nothing pending, address and data 0.
    pub fn reset(&mut self, config: &mut ConfigSpace) {
        let ctl = config.read_u16(self.cap_offset + reg::CONTROL);
        config.set_u16(
            self.cap_offset + reg::CONTROL,
            ctl & !(CONTROL_ENABLE | CONTROL_MME_MASK),
        );
        for r in [
            reg::ADDRESS_LO,
            reg::ADDRESS_HI,
            reg::DATA,
            reg::MASK,
            reg::PENDING,
        ] {
            config.set_u32(self.cap_offset + r, 0);
        }
        self.bus_master = false;
    }

    fn deliver_pending(&mut self, config: &mut ConfigSpace) {
        if !self.enabled(config) || !self.bus_master {
            return;
        }
        let pending = config.read_u32(self.cap_offset + reg::PENDING);
        let ready = pending & !config.read_u32(self.cap_offset + reg::MASK);
        if ready == 0 {
            return;
        }
        config.set_u32(self.cap_offset + reg::PENDING, pending & !ready);
        for v in 0..self.enabled_vectors(config) {
            if ready & (1 << v) != 0 {
                self.send(config, v);
            }
        }
    }

    fn send(&self, config: &ConfigSpace, vector: u8) -> MsixTriggerResult {
        let base = self.cap_offset;
        let address = u64::from(config.read_u32(base + reg::ADDRESS_HI)) << 32
            | u64::from(config.read_u32(base + reg::ADDRESS_LO) & !3);
        let low_bits = u32::from(self.enabled_vectors(config)) - 1;
        let data = (u32::from(config.read_u16(base + reg::DATA)) & !low_bits)
            | (u32::from(vector) & low_bits);
        let msg = MsiMessage {
            address,
            data,
            requester_id: self.requester_id,
        };
        match self.sink.deliver(msg) {
            Ok(()) => MsixTriggerResult::Delivered,
            Err(err) => {
                log::warn!(
                    "{}: MSI vector {vector} ({address:#x}/{data:#x}) not delivered: {err}",
                    self.requester_id
                );
                MsixTriggerResult::DeliveryFailed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{HeaderType, PciIds};
    use iommu::RecordingMsiSink;

    fn ids() -> PciIds {
        PciIds {
            vendor_id: 0x8086,
            device_id: 0x2021,
            revision_id: 0,
            class_code: 0x08_80_00,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        }
    }

    fn function(vectors: u8) -> (ConfigSpace, MsiCapability, Arc<RecordingMsiSink>) {
        let mut config = ConfigSpace::new(HeaderType::Type0, ids());
        let sink = Arc::new(RecordingMsiSink::new());
        let msi =
            MsiCapability::new(&mut config, vectors, sink.clone(), RequesterId(0x80)).unwrap();
        (config, msi, sink)
    }

    fn write(config: &mut ConfigSpace, msi: &mut MsiCapability, offset: u16, data: &[u8]) {
        config.write(offset, data);
        msi.config_written(config, offset, data.len());
    }

    #[test]
    fn capability_reads_as_linux_expects() {
        let (config, msi, _) = function(4);
        let base = msi.cap_offset();
        assert_eq!(config.read_u8(base), cap_id::MSI);
        let ctl = config.read_u16(base + reg::CONTROL);
        assert_eq!(ctl & CONTROL_64BIT, CONTROL_64BIT);
        assert_eq!(ctl & CONTROL_PER_VECTOR_MASK, CONTROL_PER_VECTOR_MASK);
        assert_eq!((ctl >> 1) & 7, 2, "MMC = log2(4)");
        assert!(!msi.enabled(&config));
    }

    #[test]
    fn delivers_with_vector_in_data_low_bits_and_honours_mask_and_bus_master() {
        let (mut config, mut msi, sink) = function(4);
        let base = msi.cap_offset();
        assert_eq!(
            msi.trigger(&mut config, 0),
            MsixTriggerResult::Disabled,
            "disabled"
        );
        write(
            &mut config,
            &mut msi,
            base + reg::ADDRESS_LO,
            &0xfee0_1000u32.to_le_bytes(),
        );
        write(
            &mut config,
            &mut msi,
            base + reg::ADDRESS_HI,
            &0u32.to_le_bytes(),
        );
        write(
            &mut config,
            &mut msi,
            base + reg::DATA,
            &0x4120u16.to_le_bytes(),
        );
        // Enable with MME = 2 (4 vectors), bus mastering still off.
        write(
            &mut config,
            &mut msi,
            base + reg::CONTROL,
            &0x21u16.to_le_bytes(),
        );
        assert_eq!(msi.enabled_vectors(&config), 4);
        assert_eq!(
            msi.trigger(&mut config, 1),
            MsixTriggerResult::BusMasterDisabled
        );
        write(&mut config, &mut msi, COMMAND, &4u16.to_le_bytes());
        assert_eq!(msi.trigger(&mut config, 3), MsixTriggerResult::Delivered);
        assert_eq!(
            msi.trigger(&mut config, 4),
            MsixTriggerResult::InvalidVector
        );
        // Masked: pending, then delivered on unmask.
        write(
            &mut config,
            &mut msi,
            base + reg::MASK,
            &0b10u32.to_le_bytes(),
        );
        assert_eq!(msi.trigger(&mut config, 1), MsixTriggerResult::Pending);
        assert_eq!(config.read_u32(base + reg::PENDING), 0b10);
        // Pending Bits are read-only to software.
        write(
            &mut config,
            &mut msi,
            base + reg::PENDING,
            &0u32.to_le_bytes(),
        );
        assert_eq!(config.read_u32(base + reg::PENDING), 0b10);
        write(&mut config, &mut msi, base + reg::MASK, &0u32.to_le_bytes());
        assert_eq!(config.read_u32(base + reg::PENDING), 0);
        let got: Vec<(u64, u32)> = sink.take().iter().map(|m| (m.address, m.data)).collect();
        assert_eq!(got, vec![(0xfee0_1000, 0x4123), (0xfee0_1000, 0x4121)]);
        msi.reset(&mut config);
        assert!(!msi.enabled(&config));
        assert_eq!(config.read_u32(base + reg::ADDRESS_LO), 0);
    }

    #[test]
    fn bad_vector_counts_are_refused() {
        let mut config = ConfigSpace::new(HeaderType::Type0, ids());
        for n in [0u8, 3, 64] {
            assert!(
                MsiCapability::new(&mut config, n, Arc::new(iommu::NullMsiSink), RequesterId(0))
                    .is_err()
            );
        }
    }
}
