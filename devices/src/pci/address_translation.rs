//! The extended capabilities a function needs for address translation and shared virtual
//! addressing: ATS (Address Translation Services, ID 0x000F, PCIe Base Spec r6.0 §10.5.1), PASID
//! (Process Address Space ID, 0x001B, §7.8.8) and PRI (Page Request Interface, 0x0013,
//! §10.5.2) — builders for their registers, and [`AddressTranslation`], which keeps their
//! enable/reset/status semantics on guest writes and tells the device what changed.
//!
//! What Linux relies on (`drivers/pci/ats.c`, `drivers/iommu/intel/`; research note vtd-sva §4):
//! - ATS: capability +4 Invalidate Queue Depth \[4:0\] (0 means 32) and **Page Aligned Request
//!   \[5\]**, which the Intel IOMMU driver requires; control +6 Enable \[15\] and Smallest
//!   Translation Unit \[4:0\] (`pci_enable_ats` writes `ENABLE | (PAGE_SHIFT - 12)`).
//! - PASID: capability +4 Execute \[1\], Privileged \[2\], Max PASID Width \[12:8\]; control +6
//!   Enable \[0\], Execute \[1\], Privileged \[2\] (writable only where supported).
//! - PRI: control +4 Enable \[0\] and Reset \[1\] (write-only: clears the credits while Enable is
//!   clear, always reads 0); status +6 Response Failure \[0\] and Unexpected PRG Index \[1\]
//!   (RW1C), **Stopped \[8\]** (1 while Enable is clear and nothing is outstanding — the default,
//!   `pci_enable_pri` refuses a function that is not stopped), **PRG Response PASID Required
//!   \[15\]**; outstanding request capacity +8 (RO); allocation +0xC (RW; Linux writes
//!   `min(capacity, 2048)` before enabling).

use super::capability::{ExtendedCapability, ext_cap_id};
use super::{ConfigSpace, PciError};

/// ATS register offsets and bits.
pub mod ats {
    /// ATS Capability register (16 bits).
    pub const CAP: u16 = 0x04;
    /// Invalidate Queue Depth field (0 encodes 32).
    pub const CAP_QDEP_MASK: u16 = 0x1f;
    /// Page Aligned Request: untranslated addresses in translation requests are page aligned.
    pub const CAP_PAGE_ALIGNED: u16 = 1 << 5;
    /// ATS Control register (16 bits).
    pub const CTRL: u16 = 0x06;
    /// ATS Enable.
    pub const CTRL_ENABLE: u16 = 1 << 15;
    /// Smallest Translation Unit (2^(STU+12) bytes).
    pub const CTRL_STU_MASK: u16 = 0x1f;
    /// Size of the capability.
    pub const SIZE: usize = 8;
}

/// PASID register offsets and bits.
pub mod pasid {
    /// PASID Capability register (16 bits).
    pub const CAP: u16 = 0x04;
    /// Execute Permission Supported.
    pub const CAP_EXEC: u16 = 1 << 1;
    /// Privileged Mode Supported.
    pub const CAP_PRIV: u16 = 1 << 2;
    /// Max PASID Width field shift (bits 12:8).
    pub const CAP_WIDTH_SHIFT: u16 = 8;
    /// PASID Control register (16 bits).
    pub const CTRL: u16 = 0x06;
    /// PASID Enable.
    pub const CTRL_ENABLE: u16 = 1 << 0;
    /// Execute Permission Enable.
    pub const CTRL_EXEC: u16 = 1 << 1;
    /// Privileged Mode Enable.
    pub const CTRL_PRIV: u16 = 1 << 2;
    /// Size of the capability.
    pub const SIZE: usize = 8;
}

/// PRI register offsets and bits.
pub mod pri {
    /// Page Request Control register (16 bits).
    pub const CTRL: u16 = 0x04;
    /// Enable.
    pub const CTRL_ENABLE: u16 = 1 << 0;
    /// Reset (write-only).
    pub const CTRL_RESET: u16 = 1 << 1;
    /// Page Request Status register (16 bits).
    pub const STATUS: u16 = 0x06;
    /// Response Failure (RW1C).
    pub const STATUS_RF: u16 = 1 << 0;
    /// Unexpected Page Request Group Index (RW1C).
    pub const STATUS_UPRGI: u16 = 1 << 1;
    /// Stopped (RO).
    pub const STATUS_STOPPED: u16 = 1 << 8;
    /// PRG Response PASID Required (RO).
    pub const STATUS_PASID_REQUIRED: u16 = 1 << 15;
    /// Outstanding Page Request Capacity (32 bits, RO).
    pub const CAPACITY: u16 = 0x08;
    /// Outstanding Page Request Allocation (32 bits, RW).
    pub const ALLOCATION: u16 = 0x0c;
    /// Size of the capability.
    pub const SIZE: usize = 16;
}

/// What a function's ATS capability advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtsConfig {
    /// Invalidate Queue Depth: device-TLB invalidations it can hold (1..=32).
    pub invalidate_queue_depth: u8,
}

impl Default for AtsConfig {
    fn default() -> Self {
        AtsConfig {
            invalidate_queue_depth: 32,
        }
    }
}

/// What a function's PASID capability advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasidConfig {
    /// Max PASID Width in bits (1..=20).
    pub width: u8,
    /// Execute permission supported.
    pub exec: bool,
    /// Privileged mode supported.
    pub privileged: bool,
}

impl Default for PasidConfig {
    fn default() -> Self {
        PasidConfig {
            width: 20,
            exec: false,
            privileged: false,
        }
    }
}

/// What a function's PRI capability advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriConfig {
    /// Outstanding Page Request Capacity.
    pub capacity: u32,
}

impl Default for PriConfig {
    fn default() -> Self {
        PriConfig { capacity: 512 }
    }
}

/// The ATS capability (version 1); page-aligned requests always.
pub fn ats_capability(cfg: AtsConfig) -> ExtendedCapability {
    let mut cap = ExtendedCapability::new(ext_cap_id::ATS, 1, ats::SIZE);
    let qdep = u16::from(cfg.invalidate_queue_depth.clamp(1, 32)) & ats::CAP_QDEP_MASK;
    cap.set_u16(ats::CAP as usize, qdep | ats::CAP_PAGE_ALIGNED);
    cap.writable_u16(ats::CTRL as usize, ats::CTRL_ENABLE | ats::CTRL_STU_MASK);
    cap
}

/// The PASID capability (version 1).
pub fn pasid_capability(cfg: PasidConfig) -> ExtendedCapability {
    let mut cap = ExtendedCapability::new(ext_cap_id::PASID, 1, pasid::SIZE);
    let mut caps = u16::from(cfg.width.clamp(1, 20)) << pasid::CAP_WIDTH_SHIFT;
    let mut writable = pasid::CTRL_ENABLE;
    if cfg.exec {
        caps |= pasid::CAP_EXEC;
        writable |= pasid::CTRL_EXEC;
    }
    if cfg.privileged {
        caps |= pasid::CAP_PRIV;
        writable |= pasid::CTRL_PRIV;
    }
    cap.set_u16(pasid::CAP as usize, caps);
    cap.writable_u16(pasid::CTRL as usize, writable);
    cap
}

/// The PRI capability (version 1): stopped, responses carry the PASID.
pub fn pri_capability(cfg: PriConfig) -> ExtendedCapability {
    let mut cap = ExtendedCapability::new(ext_cap_id::PRI, 1, pri::SIZE);
    cap.writable_u16(pri::CTRL as usize, pri::CTRL_ENABLE | pri::CTRL_RESET);
    cap.set_u16(
        pri::STATUS as usize,
        pri::STATUS_STOPPED | pri::STATUS_PASID_REQUIRED,
    );
    cap.w1c_u16(pri::STATUS as usize, pri::STATUS_RF | pri::STATUS_UPRGI);
    cap.set_u32(pri::CAPACITY as usize, cfg.capacity);
    cap.writable_u32(pri::ALLOCATION as usize, u32::MAX);
    cap
}

/// The guest-programmed state of a function's ATS, PASID and PRI capabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TranslationState {
    /// ATS Enable.
    pub ats_enabled: bool,
    /// Smallest Translation Unit: translations cover at least 2^(stu+12) bytes.
    pub stu: u8,
    /// PASID Enable.
    pub pasid_enabled: bool,
    /// Execute Permission Enable.
    pub pasid_exec: bool,
    /// Privileged Mode Enable.
    pub pasid_privileged: bool,
    /// PRI Enable.
    pub pri_enabled: bool,
    /// Outstanding Page Request Allocation (meaningful while PRI is enabled).
    pub pri_allocation: u32,
}

/// A change the device must act on, reported after a guest config write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranslationEvent {
    /// ATS was enabled with this Smallest Translation Unit.
    AtsEnabled {
        /// STU field.
        stu: u8,
    },
    /// ATS was disabled: the device drops its address translation cache.
    AtsDisabled,
    /// PASID was enabled (with these permissions).
    PasidEnabled {
        /// Execute permission enabled.
        exec: bool,
        /// Privileged mode enabled.
        privileged: bool,
    },
    /// PASID was disabled.
    PasidDisabled,
    /// PRI was enabled with this outstanding-request allocation.
    PriEnabled {
        /// Page requests the device may have outstanding.
        allocation: u32,
    },
    /// PRI was disabled: the device stops issuing page requests (Stopped is set).
    PriDisabled,
    /// PRI Reset while disabled: the device clears its page request credits.
    PriReset,
}

/// A function's ATS/PASID/PRI capabilities in its config space, and their semantics: call
/// [`AddressTranslation::config_written`] after every guest config write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressTranslation {
    ats: Option<u16>,
    pasid: Option<u16>,
    pri: Option<u16>,
    state: TranslationState,
}

impl AddressTranslation {
    /// Adds the capabilities given (in the order ATS, PASID, PRI) to `config`.
    pub fn add(
        config: &mut ConfigSpace,
        ats: Option<AtsConfig>,
        pasid: Option<PasidConfig>,
        pri: Option<PriConfig>,
    ) -> Result<Self, PciError> {
        let ats = ats
            .map(|c| config.add_ext_capability(&ats_capability(c)))
            .transpose()?;
        let pasid = pasid
            .map(|c| config.add_ext_capability(&pasid_capability(c)))
            .transpose()?;
        let pri = pri
            .map(|c| config.add_ext_capability(&pri_capability(c)))
            .transpose()?;
        Ok(AddressTranslation {
            ats,
            pasid,
            pri,
            state: TranslationState::default(),
        })
    }

    /// Offsets of the ATS, PASID and PRI capabilities (those present).
    pub fn offsets(&self) -> (Option<u16>, Option<u16>, Option<u16>) {
        (self.ats, self.pasid, self.pri)
    }

    /// The state the guest programmed.
    pub fn state(&self) -> TranslationState {
        self.state
    }

    /// Applies the side effects of a guest write of `len` bytes at `offset` (already stored by
    /// `config.write`) and returns what changed, in ATS, PASID, PRI order.
    pub fn config_written(
        &mut self,
        config: &mut ConfigSpace,
        offset: u16,
        len: usize,
    ) -> Vec<TranslationEvent> {
        let touches = |base: Option<u16>, reg: u16| {
            base.is_some_and(|b| {
                let at = b + reg;
                let end = u32::from(offset) + len as u32;
                u32::from(at) < end && u32::from(offset) < u32::from(at) + 2
            })
        };
        let mut events = Vec::new();
        if let Some(base) = self.ats
            && touches(self.ats, ats::CTRL)
        {
            let ctrl = config.read_u16(base + ats::CTRL);
            let enabled = ctrl & ats::CTRL_ENABLE != 0;
            let stu = (ctrl & ats::CTRL_STU_MASK) as u8;
            if enabled && (!self.state.ats_enabled || stu != self.state.stu) {
                events.push(TranslationEvent::AtsEnabled { stu });
            } else if !enabled && self.state.ats_enabled {
                events.push(TranslationEvent::AtsDisabled);
            }
            self.state.ats_enabled = enabled;
            self.state.stu = stu;
        }
        if let Some(base) = self.pasid
            && touches(self.pasid, pasid::CTRL)
        {
            let ctrl = config.read_u16(base + pasid::CTRL);
            let enabled = ctrl & pasid::CTRL_ENABLE != 0;
            let exec = ctrl & pasid::CTRL_EXEC != 0;
            let privileged = ctrl & pasid::CTRL_PRIV != 0;
            let was = (
                self.state.pasid_enabled,
                self.state.pasid_exec,
                self.state.pasid_privileged,
            );
            if enabled && was != (true, exec, privileged) {
                events.push(TranslationEvent::PasidEnabled { exec, privileged });
            } else if !enabled && was.0 {
                events.push(TranslationEvent::PasidDisabled);
            }
            self.state.pasid_enabled = enabled;
            self.state.pasid_exec = exec;
            self.state.pasid_privileged = privileged;
        }
        if let Some(base) = self.pri {
            if touches(self.pri, pri::ALLOCATION) || touches(self.pri, pri::ALLOCATION + 2) {
                self.state.pri_allocation = config.read_u32(base + pri::ALLOCATION);
            }
            if touches(self.pri, pri::CTRL) {
                let ctrl = config.read_u16(base + pri::CTRL);
                let enabled = ctrl & pri::CTRL_ENABLE != 0;
                // Reset always reads 0; it acts only while Enable is (being written) clear.
                config.set_u16(base + pri::CTRL, ctrl & !pri::CTRL_RESET);
                if ctrl & pri::CTRL_RESET != 0 && !enabled {
                    events.push(TranslationEvent::PriReset);
                }
                let status = config.read_u16(base + pri::STATUS);
                if enabled && !self.state.pri_enabled {
                    self.state.pri_allocation = config.read_u32(base + pri::ALLOCATION);
                    config.set_u16(base + pri::STATUS, status & !pri::STATUS_STOPPED);
                    events.push(TranslationEvent::PriEnabled {
                        allocation: self.state.pri_allocation,
                    });
                } else if !enabled && self.state.pri_enabled {
                    // The device finishes or drops what is outstanding when told (the event).
                    config.set_u16(base + pri::STATUS, status | pri::STATUS_STOPPED);
                    events.push(TranslationEvent::PriDisabled);
                }
                self.state.pri_enabled = enabled;
            }
        }
        events
    }

    /// The device received a PRG Response Failure: sets Response Failure (the device stops
    /// issuing page requests until PRI is re-enabled).
    pub fn pri_response_failure(&self, config: &mut ConfigSpace) {
        self.set_pri_status(config, pri::STATUS_RF);
    }

    /// The device received a response for a PRG index it had not used: sets UPRGI.
    pub fn pri_unexpected_group(&self, config: &mut ConfigSpace) {
        self.set_pri_status(config, pri::STATUS_UPRGI);
    }

    fn set_pri_status(&self, config: &mut ConfigSpace, bit: u16) {
        if let Some(base) = self.pri {
            let status = config.read_u16(base + pri::STATUS);
            config.set_u16(base + pri::STATUS, status | bit);
        }
    }

    /// A function reset (FLR, or the device's own reset): every enable clears, PRI is stopped,
    /// its error bits clear. Returns the events for what was enabled.
    pub fn reset(&mut self, config: &mut ConfigSpace) -> Vec<TranslationEvent> {
        let mut events = Vec::new();
        if let Some(base) = self.ats {
            config.set_u16(base + ats::CTRL, 0);
            if self.state.ats_enabled {
                events.push(TranslationEvent::AtsDisabled);
            }
        }
        if let Some(base) = self.pasid {
            config.set_u16(base + pasid::CTRL, 0);
            if self.state.pasid_enabled {
                events.push(TranslationEvent::PasidDisabled);
            }
        }
        if let Some(base) = self.pri {
            config.set_u16(base + pri::CTRL, 0);
            config.set_u16(
                base + pri::STATUS,
                pri::STATUS_STOPPED | pri::STATUS_PASID_REQUIRED,
            );
            config.set_u32(base + pri::ALLOCATION, 0);
            if self.state.pri_enabled {
                events.push(TranslationEvent::PriDisabled);
            }
        }
        self.state = TranslationState::default();
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::capability::find_ext_capability;
    use crate::pci::{HeaderType, PciIds};

    fn function() -> (ConfigSpace, AddressTranslation) {
        let ids = PciIds {
            vendor_id: 0x8086,
            device_id: 0x1234,
            revision_id: 0,
            class_code: 0x08_80_00,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        };
        let mut config = ConfigSpace::new(HeaderType::Type0, ids);
        let at = AddressTranslation::add(
            &mut config,
            Some(AtsConfig::default()),
            Some(PasidConfig {
                width: 20,
                exec: false,
                privileged: true,
            }),
            Some(PriConfig { capacity: 256 }),
        )
        .unwrap();
        (config, at)
    }

    fn write16(
        c: &mut ConfigSpace,
        at: &mut AddressTranslation,
        off: u16,
        v: u16,
    ) -> Vec<TranslationEvent> {
        c.write(off, &v.to_le_bytes());
        at.config_written(c, off, 2)
    }

    #[test]
    fn capabilities_sit_where_linux_finds_them_with_the_bits_it_checks() {
        let (config, at) = function();
        let mut rd = |o: u16, b: &mut [u8]| config.read(o, b);
        let ats_at = find_ext_capability(&mut rd, ext_cap_id::ATS).unwrap();
        let pasid_at = find_ext_capability(&mut rd, ext_cap_id::PASID).unwrap();
        let pri_at = find_ext_capability(&mut rd, ext_cap_id::PRI).unwrap();
        assert_eq!(at.offsets(), (Some(ats_at), Some(pasid_at), Some(pri_at)));
        // ATS: queue depth 32 encodes as 0; Page Aligned Request set (intel-iommu needs it).
        assert_eq!(config.read_u16(ats_at + ats::CAP), ats::CAP_PAGE_ALIGNED);
        // PASID: 20 bits, privileged mode, no execute.
        assert_eq!(
            config.read_u16(pasid_at + pasid::CAP),
            (20 << 8) | pasid::CAP_PRIV
        );
        // PRI: stopped, PASID required in responses, capacity 256.
        assert_eq!(
            config.read_u16(pri_at + pri::STATUS),
            pri::STATUS_STOPPED | pri::STATUS_PASID_REQUIRED
        );
        assert_eq!(config.read_u32(pri_at + pri::CAPACITY), 256);
    }

    #[test]
    fn enables_follow_the_linux_sequence_and_report_each_change() {
        let (mut c, mut at) = function();
        let (Some(ats_at), Some(pasid_at), Some(pri_at)) = at.offsets() else {
            panic!("all three capabilities");
        };
        // pci_prepare_ats: STU only, then pci_enable_ats: ENABLE | STU.
        assert!(write16(&mut c, &mut at, ats_at + ats::CTRL, 0).is_empty());
        assert_eq!(
            write16(&mut c, &mut at, ats_at + ats::CTRL, ats::CTRL_ENABLE),
            vec![TranslationEvent::AtsEnabled { stu: 0 }]
        );
        // pci_enable_pasid with PCI_PASID_CTRL_EXEC | PRIV: exec is not supported, so it stays 0.
        assert_eq!(
            write16(&mut c, &mut at, pasid_at + pasid::CTRL, 0x7),
            vec![TranslationEvent::PasidEnabled {
                exec: false,
                privileged: true
            }]
        );
        assert_eq!(c.read_u16(pasid_at + pasid::CTRL), 0x5);
        // pci_reset_pri: Reset while disabled; reads back 0.
        assert_eq!(
            write16(&mut c, &mut at, pri_at + pri::CTRL, pri::CTRL_RESET),
            vec![TranslationEvent::PriReset]
        );
        assert_eq!(c.read_u16(pri_at + pri::CTRL), 0);
        // pci_enable_pri: status must show Stopped; allocation, then Enable.
        assert_ne!(c.read_u16(pri_at + pri::STATUS) & pri::STATUS_STOPPED, 0);
        c.write(pri_at + pri::ALLOCATION, &256u32.to_le_bytes());
        assert!(
            at.config_written(&mut c, pri_at + pri::ALLOCATION, 4)
                .is_empty()
        );
        assert_eq!(
            write16(&mut c, &mut at, pri_at + pri::CTRL, pri::CTRL_ENABLE),
            vec![TranslationEvent::PriEnabled { allocation: 256 }]
        );
        assert_eq!(c.read_u16(pri_at + pri::STATUS) & pri::STATUS_STOPPED, 0);
        assert_eq!(
            at.state(),
            TranslationState {
                ats_enabled: true,
                stu: 0,
                pasid_enabled: true,
                pasid_exec: false,
                pasid_privileged: true,
                pri_enabled: true,
                pri_allocation: 256,
            }
        );
        // Writing the same values again reports nothing.
        assert!(write16(&mut c, &mut at, ats_at + ats::CTRL, ats::CTRL_ENABLE).is_empty());
        // Response failure is RW1C; disabling PRI stops it.
        at.pri_response_failure(&mut c);
        assert_ne!(c.read_u16(pri_at + pri::STATUS) & pri::STATUS_RF, 0);
        assert_eq!(
            write16(&mut c, &mut at, pri_at + pri::CTRL, 0),
            vec![TranslationEvent::PriDisabled]
        );
        assert_ne!(c.read_u16(pri_at + pri::STATUS) & pri::STATUS_STOPPED, 0);
        write16(&mut c, &mut at, pri_at + pri::STATUS, pri::STATUS_RF);
        assert_eq!(c.read_u16(pri_at + pri::STATUS) & pri::STATUS_RF, 0);
        // A function reset clears the rest and says so.
        assert_eq!(
            at.reset(&mut c),
            vec![
                TranslationEvent::AtsDisabled,
                TranslationEvent::PasidDisabled
            ]
        );
        assert_eq!(at.state(), TranslationState::default());
        assert_eq!(c.read_u16(ats_at + ats::CTRL), 0);
    }

    #[test]
    fn a_dword_write_covering_capability_and_control_is_seen() {
        let (mut c, mut at) = function();
        let ats_at = at.offsets().0.unwrap();
        // Some code writes the dword at +4 (capability RO, control RW) in one access.
        let dword = u32::from(ats::CTRL_ENABLE | 3) << 16;
        c.write(ats_at + ats::CAP, &dword.to_le_bytes());
        assert_eq!(
            at.config_written(&mut c, ats_at + ats::CAP, 4),
            vec![TranslationEvent::AtsEnabled { stu: 3 }]
        );
        assert_eq!(c.read_u16(ats_at + ats::CAP), ats::CAP_PAGE_ALIGNED);
        // Writes elsewhere do nothing.
        assert!(at.config_written(&mut c, 0x04, 2).is_empty());
    }

    #[test]
    fn random_writes_keep_the_read_only_bits() {
        let (mut c, mut at) = function();
        let (Some(ats_at), Some(pasid_at), Some(pri_at)) = at.offsets() else {
            panic!("all three capabilities");
        };
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let base = [ats_at, pasid_at, pri_at][(x % 3) as usize];
            let off = base + ((x >> 8) % 16) as u16;
            let len = [1usize, 2, 4][((x >> 16) % 3) as usize];
            let off = off & !(len as u16 - 1);
            c.write(off, &(x >> 24).to_le_bytes()[..len]);
            at.config_written(&mut c, off, len);
            assert_eq!(c.read_u16(ats_at + ats::CAP), ats::CAP_PAGE_ALIGNED);
            assert_eq!(
                c.read_u16(pasid_at + pasid::CAP),
                (20 << 8) | pasid::CAP_PRIV
            );
            assert_eq!(c.read_u16(pasid_at + pasid::CTRL) & pasid::CTRL_EXEC, 0);
            assert_eq!(c.read_u16(pri_at + pri::CTRL) & pri::CTRL_RESET, 0);
            assert_eq!(c.read_u32(pri_at + pri::CAPACITY), 256);
            let status = c.read_u16(pri_at + pri::STATUS);
            assert_ne!(status & pri::STATUS_PASID_REQUIRED, 0);
            assert_eq!(
                status & pri::STATUS_STOPPED != 0,
                !at.state().pri_enabled,
                "Stopped mirrors Enable"
            );
        }
    }
}
