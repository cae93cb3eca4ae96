//! The CXL component register block (CXL 2.0 8.2.4, 8.2.5): 64 KiB, CXL.io registers at 0
//! (none implemented, read 0), CXL.cache/CXL.mem registers at 0x1000.
//!
//! Layout of the CXL.cache/mem area (what Linux `cxl_probe_component_regs` walks,
//! drivers/cxl/core/regs.c):
//!
//! ```text
//! 0x1000  CXL Capability Header: ID 1, version 1, cache/mem version 1, array size N
//! 0x1004  capability entries, 4 bytes each: ID [15:0], version [19:16], pointer [31:20]
//! 0x1100  RAS capability (ID 2, version 2, 0x58 bytes)                  CXL 2.0 8.2.5.9
//! 0x1200  Link capability (ID 4, version 2, 0x38 bytes, reads 0)        CXL 2.0 8.2.5.11
//! 0x1400  HDM decoder capability (ID 5, version 1, 0x10 + 0x20 * count) CXL 2.0 8.2.5.12
//! ```
//!
//! Each capability sits in its own range, so Linux's per-capability `devm_request_mem_region`
//! calls never overlap.
//!
//! # HDM decoders
//!
//! Decoder `n` occupies 0x20 bytes at 0x10 + 0x20·n: base low/high, size low/high, control,
//! target list (switches, host bridges) or DPA skip (endpoints) low/high. Linux programs them in
//! `setup_hw_decoder` / `cxl_decoder_commit` (drivers/cxl/core/hdm.c): base, size, targets or
//! skip, then control with Commit, then polls Committed / Error Not Committed; on error or reset
//! it clears Commit. At probe `init_hdm_decoder` reads committed decoders back (firmware
//! commits, see [`HdmDecoderCapability::precommit`]).
//!
//! Commit (Commit 0 → 1) validates, in this order (CXL 2.0 8.2.5.12.20 plus this model's
//! limits), and sets Committed or Error Not Committed at once:
//! 1. endpoints only: HDM Decoder Enable (global control) and DVSEC Mem_Enable are set (Linux
//!    never sets the global enable of switch or host bridge decoders, so those are exempt);
//! 2. decoder n-1 is committed (in-order commit);
//! 3. interleave ways 1, 2, 4 or 8 (IW 0..=3; switches: at most their downstream port count)
//!    and a defined granularity (IG ≤ 6: 256 B … 16 KiB);
//! 4. size ≠ 0, base and size multiples of 256 MiB × ways (each target's share is whole
//!    256 MiB units, the base on an interleave-set boundary), end within 2^52;
//! 5. the range is inside one of the decoder's windows (CFMWS targeting its host bridge);
//! 6. no overlap with other committed decoders, and HPA increasing with the decoder index;
//! 7. endpoints: DPA = Σ_{j<n}(skip_j + size_j / ways_j) + skip_n, and
//!    `[DPA, DPA + size / ways)` lies inside one partition (volatile `[0, vol)` or persistent
//!    `[vol, vol + pers)`), whose memory type the window accepts; switches: target list entries
//!    `0..ways` are distinct known downstream ports;
//! 8. the [`HdmListener`] accepts the range (the VMM maps it).
//!
//! While committed, base, size, target/skip and the control fields are frozen; clearing Commit
//! uncommits (the listener unmaps). With Lock On Commit set, a committed decoder is read-only
//! until [`HdmDecoderCapability::reset`]. Clearing HDM Decoder Enable or Mem_Enable later does
//! not unmap committed decoders (Linux only does so after tearing its regions down).

use std::fmt;
use std::sync::Arc;

use super::{
    CommittedRange, CxlError, DecodeTarget, DwordRegs, HDM_GRANULE, HdmError, HdmListener,
    HpaWindow, Interleave, Partition, dword_read, dword_write, merge,
};

/// Offset of the CXL.cache/CXL.mem registers in the block (Linux `CXL_CM_OFFSET`).
pub const CM_OFFSET: u64 = 0x1000;
/// Offset of the RAS capability in the block.
pub const RAS_OFFSET: u64 = 0x1100;
/// Offset of the Link capability in the block.
pub const LINK_OFFSET: u64 = 0x1200;
/// Offset of the HDM decoder capability in the block.
pub const HDM_OFFSET: u64 = 0x1400;

/// CXL.cache/mem capability IDs (CXL 2.0 Table 138).
pub mod cap_id {
    /// CXL Capability (the array header).
    pub const CAPABILITY: u16 = 1;
    /// CXL RAS Capability.
    pub const RAS: u16 = 2;
    /// CXL Link Capability.
    pub const LINK: u16 = 4;
    /// CXL HDM Decoder Capability.
    pub const HDM: u16 = 5;
}

/// RAS capability registers (CXL 2.0 8.2.5.9; Linux `CXL_RAS_*`, drivers/cxl/cxl.h).
pub mod ras {
    /// Uncorrectable Error Status (RW1CS).
    pub const UC_STATUS: u64 = 0x00;
    /// Uncorrectable Error Mask (RWS).
    pub const UC_MASK: u64 = 0x04;
    /// Uncorrectable Error Severity (RWS).
    pub const UC_SEVERITY: u64 = 0x08;
    /// Correctable Error Status (RW1CS).
    pub const CE_STATUS: u64 = 0x0c;
    /// Correctable Error Mask (RWS).
    pub const CE_MASK: u64 = 0x10;
    /// Error Capability and Control: \[5:0\] First Error Pointer, \[13\] Poison Enabled.
    pub const CAP_CONTROL: u64 = 0x14;
    /// Header Log, 16 DWORDs (ROS).
    pub const HEADER_LOG: u64 = 0x18;
    /// Length of the capability (Linux `CXL_RAS_CAPABILITY_LENGTH`).
    pub const LEN: u64 = 0x58;
    /// Defined uncorrectable error bits: 11:0 and 16:14.
    pub const UC_BITS: u32 = 0x0001_cfff;
    /// Defined correctable error bits: 6:0.
    pub const CE_BITS: u32 = 0x0000_007f;
    /// Error Capability and Control: Poison Enabled (RW).
    pub const POISON_ENABLED: u32 = 1 << 13;
}

/// Link capability length (CXL 2.0 8.2.5.11).
pub const LINK_LEN: u64 = 0x38;

/// HDM decoder capability registers (CXL 2.0 8.2.5.12; Linux `CXL_HDM_DECODER*`).
pub mod hdm {
    /// HDM Decoder Capability: \[3:0\] decoder count, \[7:4\] target count, \[8\] A11:8
    /// interleave capable, \[9\] A14:12 interleave capable.
    pub const CAP: u64 = 0x00;
    /// Capability: interleave on HPA address bits 11:8 supported.
    pub const CAP_INTERLEAVE_11_8: u32 = 1 << 8;
    /// Capability: interleave on HPA address bits 14:12 supported.
    pub const CAP_INTERLEAVE_14_12: u32 = 1 << 9;
    /// HDM Decoder Global Control: \[0\] Poison On Decode Error Enable, \[1\] HDM Decoder Enable.
    pub const GLOBAL_CTRL: u64 = 0x04;
    /// Global Control: HDM Decoder Enable.
    pub const ENABLE: u32 = 1 << 1;
    /// First decoder's registers.
    pub const DECODER0: u64 = 0x10;
    /// Stride between decoders.
    pub const STRIDE: u64 = 0x20;
    /// Decoder Base Low (\[31:28\] = base bits 31:28).
    pub const BASE_LO: u64 = 0x00;
    /// Decoder Base High.
    pub const BASE_HI: u64 = 0x04;
    /// Decoder Size Low (\[31:28\] = size bits 31:28).
    pub const SIZE_LO: u64 = 0x08;
    /// Decoder Size High.
    pub const SIZE_HI: u64 = 0x0c;
    /// Decoder Control.
    pub const CTRL: u64 = 0x10;
    /// Target List Low (switch) / DPA Skip Low (endpoint, \[31:28\]).
    pub const TL_LO: u64 = 0x14;
    /// Target List High / DPA Skip High.
    pub const TL_HI: u64 = 0x18;
    /// Control: interleave granularity \[3:0\].
    pub const CTRL_IG: u32 = 0xf;
    /// Control: interleave ways \[7:4\].
    pub const CTRL_IW: u32 = 0xf0;
    /// Control: Lock On Commit.
    pub const CTRL_LOCK: u32 = 1 << 8;
    /// Control: Commit.
    pub const CTRL_COMMIT: u32 = 1 << 9;
    /// Control: Committed (RO).
    pub const CTRL_COMMITTED: u32 = 1 << 10;
    /// Control: Error Not Committed (RO).
    pub const CTRL_ERR: u32 = 1 << 11;
    /// Control: Target Device Type, 1 = host-only coherent (HDM-H, Type 3; Linux
    /// `CXL_HDM_DECODER0_CTRL_HOSTONLY`).
    pub const CTRL_HOSTONLY: u32 = 1 << 12;
    /// Control bits software may write.
    pub const CTRL_WRITABLE: u32 = CTRL_IG | CTRL_IW | CTRL_LOCK | CTRL_COMMIT | CTRL_HOSTONLY;
    /// Writable bits of the low DWORD of base, size and DPA skip.
    pub const LO_MASK: u32 = 0xf000_0000;
}

/// The highest host physical address bit CXL decoders handle (52-bit HPA).
const HPA_LIMIT: u64 = 1 << 52;

/// The CXL RAS capability: error status, masks, severity, first error pointer, header log.
/// Nothing raises errors by itself; the VMM injects them ([`RasCapability::inject_uncorrectable`],
/// [`RasCapability::inject_correctable`]) and Linux reads / clears them in `cxl_handle_ras` /
/// `cxl_handle_cor_ras` (drivers/cxl/core/ras.c).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RasCapability {
    uc_status: u32,
    uc_mask: u32,
    uc_severity: u32,
    ce_status: u32,
    ce_mask: u32,
    cap_control: u32,
    header_log: [u32; 16],
}

impl Default for RasCapability {
    fn default() -> Self {
        Self::new()
    }
}

impl RasCapability {
    /// Reset state: nothing logged, every error masked, uncorrectable errors fatal (CXL 2.0
    /// 8.2.5.9.2 .. 8.2.5.9.5 default values). Linux unmasks in `cxl_ras_unmask`.
    pub fn new() -> Self {
        RasCapability {
            uc_status: 0,
            uc_mask: ras::UC_BITS,
            uc_severity: ras::UC_BITS,
            ce_status: 0,
            ce_mask: ras::CE_BITS,
            cap_control: 0,
            header_log: [0; 16],
        }
    }

    /// Sets the Uncorrectable and Correctable Error Masks (device reset values).
    pub fn set_masks(&mut self, uncorrectable: u32, correctable: u32) {
        self.uc_mask = uncorrectable & ras::UC_BITS;
        self.ce_mask = correctable & ras::CE_BITS;
    }

    /// Uncorrectable Error Status.
    pub fn uncorrectable_status(&self) -> u32 {
        self.uc_status
    }

    /// Correctable Error Status.
    pub fn correctable_status(&self) -> u32 {
        self.ce_status
    }

    /// Uncorrectable Error Mask.
    pub fn uncorrectable_mask(&self) -> u32 {
        self.uc_mask
    }

    /// Logs uncorrectable errors `bits` (undefined bits ignored). If no error was logged
    /// before, the First Error Pointer names the lowest new bit and `header_log` (up to 16
    /// DWORDs) is recorded. Returns true if an unmasked error was logged (the caller signals
    /// it, e.g. through AER).
    pub fn inject_uncorrectable(&mut self, bits: u32, header_log: &[u32]) -> bool {
        let bits = bits & ras::UC_BITS;
        if bits == 0 {
            return false;
        }
        if self.uc_status == 0 {
            self.cap_control = (self.cap_control & !0x3f) | bits.trailing_zeros().min(0x3f);
            self.header_log = [0; 16];
            for (d, s) in self.header_log.iter_mut().zip(header_log) {
                *d = *s;
            }
        }
        self.uc_status |= bits;
        bits & !self.uc_mask != 0
    }

    /// Logs correctable errors `bits`; returns true if any is unmasked.
    pub fn inject_correctable(&mut self, bits: u32) -> bool {
        let bits = bits & ras::CE_BITS;
        self.ce_status |= bits;
        bits & !self.ce_mask != 0
    }

    /// Register read at `off` (DWORD aligned) from the capability start.
    pub fn read(&self, off: u64) -> u32 {
        match off {
            ras::UC_STATUS => self.uc_status,
            ras::UC_MASK => self.uc_mask,
            ras::UC_SEVERITY => self.uc_severity,
            ras::CE_STATUS => self.ce_status,
            ras::CE_MASK => self.ce_mask,
            ras::CAP_CONTROL => self.cap_control,
            o if (ras::HEADER_LOG..ras::LEN).contains(&o) => {
                self.header_log[((o - ras::HEADER_LOG) / 4) as usize]
            }
            _ => 0,
        }
    }

    /// Register write of the `enables` bits of `value` at `off`.
    pub fn write(&mut self, off: u64, value: u32, enables: u32) {
        let v = value & enables;
        match off {
            ras::UC_STATUS => self.uc_status &= !(v & ras::UC_BITS),
            ras::UC_MASK => self.uc_mask = merge(self.uc_mask, value, enables, ras::UC_BITS),
            ras::UC_SEVERITY => {
                self.uc_severity = merge(self.uc_severity, value, enables, ras::UC_BITS)
            }
            ras::CE_STATUS => self.ce_status &= !(v & ras::CE_BITS),
            ras::CE_MASK => self.ce_mask = merge(self.ce_mask, value, enables, ras::CE_BITS),
            ras::CAP_CONTROL => {
                self.cap_control = merge(self.cap_control, value, enables, ras::POISON_ENABLED)
            }
            _ => {}
        }
    }
}

/// What an HDM decoder capability decodes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HdmRole {
    /// Endpoint decoders: HPA → DPA of a device with this capacity (each a multiple of
    /// 256 MiB; volatile first).
    Endpoint {
        /// Volatile capacity in bytes.
        volatile_size: u64,
        /// Persistent capacity in bytes.
        persistent_size: u64,
    },
    /// Switch / host bridge decoders: HPA → downstream port. `dports` are the Port Numbers
    /// (root ports' Link Capabilities) a target list may name.
    Switch {
        /// Valid downstream port numbers.
        dports: Vec<u8>,
    },
}

/// Construction parameters of an [`HdmDecoderCapability`].
#[derive(Clone)]
pub struct HdmConfig {
    /// Number of decoders: 1, 2, 4, 6, 8 or 10 (CXL 2.0 decoder count encodings).
    pub decoder_count: usize,
    /// Endpoint or switch.
    pub role: HdmRole,
    /// HPA windows decoders may commit into (the CFMWS windows targeting this hierarchy).
    pub windows: Vec<HpaWindow>,
    /// Told about commits and uncommits.
    pub listener: Option<Arc<dyn HdmListener>>,
}

impl fmt::Debug for HdmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HdmConfig")
            .field("decoder_count", &self.decoder_count)
            .field("role", &self.role)
            .field("windows", &self.windows)
            .field("listener", &self.listener.is_some())
            .finish()
    }
}

impl HdmConfig {
    /// Two endpoint decoders (a RAM and a pmem region can coexist), no windows, no listener.
    pub fn endpoint(volatile_size: u64, persistent_size: u64) -> Self {
        HdmConfig {
            decoder_count: 2,
            role: HdmRole::Endpoint {
                volatile_size,
                persistent_size,
            },
            windows: Vec::new(),
            listener: None,
        }
    }

    /// Two switch decoders targeting `dports`, no windows, no listener.
    pub fn switch(dports: Vec<u8>) -> Self {
        HdmConfig {
            decoder_count: 2,
            role: HdmRole::Switch { dports },
            windows: Vec::new(),
            listener: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Decoder {
    base: u64,
    size: u64,
    /// Software-written control bits ([`hdm::CTRL_WRITABLE`]).
    ctrl: u32,
    /// Target list (switch) or DPA skip (endpoint).
    targets: u64,
    committed: bool,
    error: bool,
    active: Option<CommittedRange>,
}

impl Decoder {
    fn locked(&self) -> bool {
        self.committed && self.ctrl & hdm::CTRL_LOCK != 0
    }

    fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }
}

/// The HDM decoder capability of an endpoint, switch or host bridge.
pub struct HdmDecoderCapability {
    role: HdmRole,
    decoders: Vec<Decoder>,
    global_ctrl: u32,
    cap: u32,
    windows: Vec<HpaWindow>,
    listener: Option<Arc<dyn HdmListener>>,
    mem_enable: bool,
}

impl fmt::Debug for HdmDecoderCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HdmDecoderCapability")
            .field("role", &self.role)
            .field("decoders", &self.decoders.len())
            .field("global_ctrl", &self.global_ctrl)
            .field("committed", &self.committed())
            .finish_non_exhaustive()
    }
}

/// Decoder Count field for `count` decoders (CXL 2.0 8.2.5.12.1), or `None`.
fn decoder_count_encoding(count: usize) -> Option<u32> {
    match count {
        1 => Some(0),
        2 | 4 | 6 | 8 | 10 => Some((count / 2) as u32),
        _ => None,
    }
}

impl HdmDecoderCapability {
    /// Builds the capability. Endpoint capacities must be multiples of 256 MiB; switches need
    /// at least one downstream port.
    pub fn new(cfg: HdmConfig) -> Result<Self, CxlError> {
        let count_enc = decoder_count_encoding(cfg.decoder_count).ok_or(
            CxlError::InvalidConfig("HDM decoder count must be 1, 2, 4, 6, 8 or 10"),
        )?;
        let target_count = match &cfg.role {
            HdmRole::Endpoint {
                volatile_size,
                persistent_size,
            } => {
                if !volatile_size.is_multiple_of(HDM_GRANULE)
                    || !persistent_size.is_multiple_of(HDM_GRANULE)
                    || volatile_size.checked_add(*persistent_size).is_none()
                {
                    return Err(CxlError::InvalidConfig(
                        "CXL capacities must be multiples of 256 MiB",
                    ));
                }
                0
            }
            HdmRole::Switch { dports } => {
                if dports.is_empty() || dports.len() > 8 {
                    return Err(CxlError::InvalidConfig(
                        "a switch HDM decoder needs 1..=8 downstream ports",
                    ));
                }
                // Target Count encodings 1, 2, 4, 8.
                dports.len().next_power_of_two() as u32
            }
        };
        for w in &cfg.windows {
            if w.size == 0
                || !w.base.is_multiple_of(HDM_GRANULE)
                || !w.size.is_multiple_of(HDM_GRANULE)
                || w.base.checked_add(w.size).is_none_or(|e| e > HPA_LIMIT)
            {
                return Err(CxlError::InvalidConfig(
                    "CXL windows must be non-empty, 256 MiB aligned and below 2^52",
                ));
            }
        }
        Ok(HdmDecoderCapability {
            role: cfg.role,
            decoders: vec![Decoder::default(); cfg.decoder_count],
            global_ctrl: 0,
            // Interleave on HPA bits 11:8 and 14:12 (granularity up to 16 KiB at 2/4 ways).
            cap: count_enc
                | (target_count << 4)
                | hdm::CAP_INTERLEAVE_11_8
                | hdm::CAP_INTERLEAVE_14_12,
            windows: cfg.windows,
            listener: cfg.listener,
            mem_enable: false,
        })
    }

    /// Length of the capability's register range.
    pub fn len(&self) -> u64 {
        hdm::DECODER0 + hdm::STRIDE * self.decoders.len() as u64
    }

    /// Always false (a capability has at least its header); for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of decoders.
    pub fn decoder_count(&self) -> usize {
        self.decoders.len()
    }

    /// The role given at construction.
    pub fn role(&self) -> &HdmRole {
        &self.role
    }

    /// HDM Decoder Enable of the Global Control register.
    pub fn enabled(&self) -> bool {
        self.global_ctrl & hdm::ENABLE != 0
    }

    /// Sets HDM Decoder Enable (as firmware does).
    pub fn set_enabled(&mut self, enabled: bool) {
        if enabled {
            self.global_ctrl |= hdm::ENABLE;
        } else {
            self.global_ctrl &= !hdm::ENABLE;
        }
    }

    /// Mirrors the endpoint's DVSEC Mem_Enable (the function calls this after config writes).
    pub fn set_mem_enable(&mut self, enabled: bool) {
        self.mem_enable = enabled;
    }

    /// Replaces the listener (the VMM may attach it after building the device).
    pub fn set_listener(&mut self, listener: Option<Arc<dyn HdmListener>>) {
        self.listener = listener;
    }

    /// Replaces the windows commits are checked against (committed decoders stay).
    pub fn set_windows(&mut self, windows: Vec<HpaWindow>) {
        self.windows = windows;
    }

    /// Every committed decoder's range, by decoder index.
    pub fn committed(&self) -> Vec<CommittedRange> {
        self.decoders.iter().filter_map(|d| d.active).collect()
    }

    /// Decodes `hpa` through the committed decoders: the range and, for endpoints, the DPA.
    pub fn decode(&self, hpa: u64) -> Option<(CommittedRange, Option<u64>)> {
        let r = self
            .decoders
            .iter()
            .filter_map(|d| d.active)
            .find(|r| r.contains(hpa))?;
        Some((r, r.dpa(hpa)))
    }

    /// Commits decoder `decoder` the way platform firmware does before the OS boots, so Linux's
    /// `init_hdm_decoder` finds it committed and `discover_region` assembles the region: programs
    /// base, size and the Target List / DPA Skip register pair (`targets`: DPA skip in bytes for
    /// endpoints; target list for switches, byte 0 = downstream port number), HostOnly, 1-way,
    /// optional Lock On Commit, sets HDM Decoder Enable (and the endpoint's Mem_Enable mirror),
    /// then commits through the same validation and listener as a guest commit.
    pub fn precommit(
        &mut self,
        decoder: usize,
        hpa_base: u64,
        size: u64,
        targets: u64,
        lock: bool,
    ) -> Result<CommittedRange, HdmError> {
        let d = self
            .decoders
            .get_mut(decoder)
            .ok_or(HdmError::NoSuchDecoder(decoder))?;
        if d.committed {
            return Err(HdmError::AlreadyCommitted(decoder));
        }
        d.base = hpa_base;
        d.size = size;
        d.targets = targets;
        d.ctrl = hdm::CTRL_HOSTONLY | hdm::CTRL_COMMIT | if lock { hdm::CTRL_LOCK } else { 0 };
        self.global_ctrl |= hdm::ENABLE;
        if matches!(self.role, HdmRole::Endpoint { .. }) {
            self.mem_enable = true;
        }
        match self.commit(decoder) {
            Ok(r) => Ok(r),
            Err(e) => {
                // Leave the decoder as firmware would after a failed attempt: not committing.
                if let Some(d) = self.decoders.get_mut(decoder) {
                    d.ctrl &= !hdm::CTRL_COMMIT;
                    d.error = false;
                }
                Err(e)
            }
        }
    }

    /// Conventional reset: uncommits every decoder (telling the listener), clears all
    /// registers including locks and the global enable.
    pub fn reset(&mut self) {
        for i in 0..self.decoders.len() {
            self.uncommit(i);
        }
        self.decoders.fill(Decoder::default());
        self.global_ctrl = 0;
        self.mem_enable = false;
    }

    /// Register read at `off` (DWORD aligned) from the capability start; unimplemented
    /// registers read 0.
    pub fn read(&self, off: u64) -> u32 {
        match off {
            hdm::CAP => return self.cap,
            hdm::GLOBAL_CTRL => return self.global_ctrl,
            _ => {}
        }
        let Some((d, reg)) = self.locate(off) else {
            return 0;
        };
        let lo_targets = match self.role {
            HdmRole::Endpoint { .. } => d.targets as u32 & hdm::LO_MASK,
            HdmRole::Switch { .. } => d.targets as u32,
        };
        match reg {
            hdm::BASE_LO => d.base as u32 & hdm::LO_MASK,
            hdm::BASE_HI => (d.base >> 32) as u32,
            hdm::SIZE_LO => d.size as u32 & hdm::LO_MASK,
            hdm::SIZE_HI => (d.size >> 32) as u32,
            hdm::CTRL => {
                d.ctrl
                    | if d.committed { hdm::CTRL_COMMITTED } else { 0 }
                    | if d.error { hdm::CTRL_ERR } else { 0 }
            }
            hdm::TL_LO => lo_targets,
            hdm::TL_HI => (d.targets >> 32) as u32,
            _ => 0,
        }
    }

    /// Register write of the `enables` bits of `value` at `off` from the capability start.
    pub fn write(&mut self, off: u64, value: u32, enables: u32) {
        if off == hdm::GLOBAL_CTRL {
            let new = merge(self.global_ctrl, value, enables, hdm::ENABLE);
            if new != self.global_ctrl {
                log::debug!(
                    "cxl hdm: decoders globally {}",
                    if new != 0 { "enabled" } else { "disabled" }
                );
            }
            self.global_ctrl = new;
            return;
        }
        let Some(n) = self.index(off) else {
            return;
        };
        let reg = (off - hdm::DECODER0) % hdm::STRIDE;
        if reg == hdm::CTRL {
            self.write_ctrl(n, value, enables);
            return;
        }
        let endpoint = matches!(self.role, HdmRole::Endpoint { .. });
        let d = &mut self.decoders[n];
        if d.committed {
            log::debug!("cxl hdm: decoder {n} committed, ignoring write at {reg:#x}");
            return;
        }
        let set_lo = |v: u64, mask: u32| {
            (v & !0xffff_ffff) | u64::from(merge(v as u32, value, enables, mask))
        };
        let set_hi = |v: u64| {
            (v & 0xffff_ffff) | (u64::from(merge((v >> 32) as u32, value, enables, u32::MAX)) << 32)
        };
        match reg {
            hdm::BASE_LO => d.base = set_lo(d.base, hdm::LO_MASK),
            hdm::BASE_HI => d.base = set_hi(d.base),
            hdm::SIZE_LO => d.size = set_lo(d.size, hdm::LO_MASK),
            hdm::SIZE_HI => d.size = set_hi(d.size),
            hdm::TL_LO => {
                d.targets = set_lo(d.targets, if endpoint { hdm::LO_MASK } else { u32::MAX })
            }
            hdm::TL_HI => d.targets = set_hi(d.targets),
            _ => {}
        }
    }

    fn index(&self, off: u64) -> Option<usize> {
        let rel = off.checked_sub(hdm::DECODER0)?;
        let n = usize::try_from(rel / hdm::STRIDE).ok()?;
        (n < self.decoders.len()).then_some(n)
    }

    fn locate(&self, off: u64) -> Option<(&Decoder, u64)> {
        let n = self.index(off)?;
        Some((&self.decoders[n], (off - hdm::DECODER0) % hdm::STRIDE))
    }

    fn write_ctrl(&mut self, n: usize, value: u32, enables: u32) {
        let d = &mut self.decoders[n];
        if d.locked() {
            log::debug!("cxl hdm: decoder {n} is locked, ignoring control write");
            return;
        }
        let new = merge(d.ctrl, value, enables, hdm::CTRL_WRITABLE);
        let was = d.ctrl & hdm::CTRL_COMMIT != 0;
        let now = new & hdm::CTRL_COMMIT != 0;
        if d.committed {
            // Fields are frozen while committed; only clearing Commit has an effect.
            if !now {
                d.ctrl = new;
                self.uncommit(n);
            }
            return;
        }
        d.ctrl = new;
        if !now {
            d.error = false;
        } else if !was && let Err(e) = self.commit(n) {
            log::warn!("cxl hdm: decoder {n} commit refused: {e}");
        }
    }

    /// Validates and commits decoder `n` (Commit already set); sets Committed or Error.
    fn commit(&mut self, n: usize) -> Result<CommittedRange, HdmError> {
        let result = self.validate(n).and_then(|range| {
            if let Some(l) = &self.listener {
                l.committed(&range).map_err(HdmError::Refused)?;
            }
            Ok(range)
        });
        let d = &mut self.decoders[n];
        match &result {
            Ok(range) => {
                log::info!(
                    "cxl hdm: decoder {n} committed: HPA {:#x}+{:#x} -> {:?}",
                    range.hpa_base,
                    range.size,
                    range.target
                );
                d.committed = true;
                d.error = false;
                d.active = Some(*range);
            }
            Err(_) => {
                d.committed = false;
                d.error = true;
                d.active = None;
            }
        }
        result
    }

    fn uncommit(&mut self, n: usize) {
        let Some(d) = self.decoders.get_mut(n) else {
            return;
        };
        d.committed = false;
        d.error = false;
        if let Some(range) = d.active.take() {
            log::info!(
                "cxl hdm: decoder {n} uncommitted: HPA {:#x}+{:#x}",
                range.hpa_base,
                range.size
            );
            if let Some(l) = &self.listener {
                l.uncommitted(&range);
            }
        }
    }

    fn validate(&self, n: usize) -> Result<CommittedRange, HdmError> {
        let d = &self.decoders[n];
        if matches!(self.role, HdmRole::Endpoint { .. }) {
            if !self.enabled() {
                return Err(HdmError::HdmDisabled);
            }
            if !self.mem_enable {
                return Err(HdmError::MemDisabled);
            }
        }
        if n > 0 && !self.decoders[n - 1].committed {
            return Err(HdmError::OutOfOrder(n));
        }
        let interleave = Interleave::from_encodings(
            ((d.ctrl & hdm::CTRL_IW) >> 4) as u8,
            (d.ctrl & hdm::CTRL_IG) as u8,
        )?;
        let ways = interleave.ways;
        if let HdmRole::Switch { dports } = &self.role
            && usize::from(ways) > dports.len()
        {
            return Err(HdmError::TooManyWays {
                ways,
                targets: dports.len(),
            });
        }
        let (base, size) = (d.base, d.size);
        if size == 0 {
            return Err(HdmError::ZeroSize);
        }
        if !base.is_multiple_of(HDM_GRANULE) || !size.is_multiple_of(HDM_GRANULE) {
            return Err(HdmError::Misaligned { base, size });
        }
        // Each target's share is whole 256 MiB units, and the range starts on a boundary of
        // the whole interleave set (what Linux's region allocation guarantees).
        let set = HDM_GRANULE * u64::from(ways);
        if !base.is_multiple_of(set) || !size.is_multiple_of(set) {
            return Err(HdmError::InterleaveAlignment { base, size, ways });
        }
        if base.checked_add(size).is_none_or(|end| end > HPA_LIMIT) {
            return Err(HdmError::OutOfAddressSpace { base, size });
        }
        let windows: Vec<&HpaWindow> = self
            .windows
            .iter()
            .filter(|w| w.contains(base, size))
            .collect();
        if windows.is_empty() {
            return Err(HdmError::OutsideWindows { base, size });
        }
        for (j, o) in self.decoders.iter().enumerate() {
            if j == n || !o.committed {
                continue;
            }
            if base < o.end() && o.base < base + size {
                return Err(HdmError::Overlap(j));
            }
            if (j < n && o.base > base) || (j > n && o.base < base) {
                return Err(HdmError::HpaOrder(j));
            }
        }
        let target = match &self.role {
            HdmRole::Endpoint {
                volatile_size,
                persistent_size,
            } => {
                // DPA = Σ (skip + size / ways) of the lower decoders + own skip; the lower
                // decoders are committed, so their IW encodings are valid.
                let skip = |x: &Decoder| x.targets & !0x0fff_ffff;
                let share = |x: &Decoder| x.size >> ((x.ctrl & hdm::CTRL_IW) >> 4).min(3);
                let mut dpa = 0u64;
                for x in &self.decoders[..n] {
                    dpa = dpa.saturating_add(skip(x)).saturating_add(share(x));
                }
                dpa = dpa.saturating_add(skip(d));
                let capacity = volatile_size + persistent_size;
                let dpa_size = size / u64::from(ways);
                let end = dpa.saturating_add(dpa_size);
                if end > capacity {
                    return Err(HdmError::DpaOutOfRange {
                        dpa,
                        size: dpa_size,
                        capacity,
                    });
                }
                let (partition, partition_offset) = if end <= *volatile_size {
                    (Partition::Volatile, dpa)
                } else if dpa >= *volatile_size {
                    (Partition::Persistent, dpa - volatile_size)
                } else {
                    return Err(HdmError::SpansPartitions {
                        dpa,
                        size: dpa_size,
                    });
                };
                let allowed = windows.iter().any(|w| match partition {
                    Partition::Volatile => w.volatile,
                    Partition::Persistent => w.persistent,
                });
                if !allowed {
                    return Err(HdmError::WindowType(partition));
                }
                DecodeTarget::Memory {
                    dpa_base: dpa,
                    partition,
                    partition_offset,
                }
            }
            HdmRole::Switch { dports } => {
                // Target List: byte i is the Port Number of interleave position i.
                let mut targets = [0u8; 8];
                for i in 0..usize::from(ways) {
                    let port = (d.targets >> (8 * i)) as u8;
                    if !dports.contains(&port) {
                        return Err(HdmError::UnknownTarget(port));
                    }
                    if targets[..i].contains(&port) {
                        return Err(HdmError::DuplicateTarget(port));
                    }
                    targets[i] = port;
                }
                DecodeTarget::Ports(targets)
            }
        };
        Ok(CommittedRange {
            decoder_index: n,
            hpa_base: base,
            size,
            interleave,
            target,
        })
    }
}

/// A component register block: the capability array, RAS, optional Link and HDM decoder
/// capabilities. Endpoints and host bridges have HDM decoders, root ports do not.
#[derive(Debug)]
pub struct ComponentRegisters {
    ras: RasCapability,
    link: bool,
    hdm: Option<HdmDecoderCapability>,
    /// Capability array entries: (ID, version, pointer relative to [`CM_OFFSET`]).
    caps: Vec<(u16, u8, u64)>,
}

impl ComponentRegisters {
    /// A block with RAS, the Link capability if `link`, and `hdm` if given.
    pub fn new(link: bool, hdm: Option<HdmDecoderCapability>) -> Self {
        let mut caps = vec![(cap_id::RAS, 2, RAS_OFFSET - CM_OFFSET)];
        if link {
            caps.push((cap_id::LINK, 2, LINK_OFFSET - CM_OFFSET));
        }
        if hdm.is_some() {
            caps.push((cap_id::HDM, 1, HDM_OFFSET - CM_OFFSET));
        }
        ComponentRegisters {
            ras: RasCapability::new(),
            link,
            hdm,
            caps,
        }
    }

    /// Guest read at `offset` into the 64 KiB block (malformed accesses read 0).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        dword_read(self, offset, data);
    }

    /// Guest write at `offset` into the block (malformed accesses are ignored).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        dword_write(self, offset, data);
    }

    /// The RAS capability.
    pub fn ras(&self) -> &RasCapability {
        &self.ras
    }

    /// The RAS capability, mutably (error injection).
    pub fn ras_mut(&mut self) -> &mut RasCapability {
        &mut self.ras
    }

    /// The HDM decoder capability, if present.
    pub fn hdm(&self) -> Option<&HdmDecoderCapability> {
        self.hdm.as_ref()
    }

    /// The HDM decoder capability, mutably.
    pub fn hdm_mut(&mut self) -> Option<&mut HdmDecoderCapability> {
        self.hdm.as_mut()
    }

    fn hdm_range(&self) -> Option<(u64, u64)> {
        self.hdm
            .as_ref()
            .map(|h| (HDM_OFFSET, HDM_OFFSET + h.len()))
    }
}

impl DwordRegs for ComponentRegisters {
    fn read_dword(&self, offset: u64) -> u32 {
        if offset == CM_OFFSET {
            return u32::from(cap_id::CAPABILITY)
                | (1 << 16)
                | (1 << 20)
                | ((self.caps.len() as u32) << 24);
        }
        if offset > CM_OFFSET && offset <= CM_OFFSET + 4 * self.caps.len() as u64 {
            let (id, ver, ptr) = self.caps[((offset - CM_OFFSET) / 4 - 1) as usize];
            return u32::from(id) | (u32::from(ver) << 16) | ((ptr as u32) << 20);
        }
        if (RAS_OFFSET..RAS_OFFSET + ras::LEN).contains(&offset) {
            return self.ras.read(offset - RAS_OFFSET);
        }
        if let (Some((start, end)), Some(h)) = (self.hdm_range(), &self.hdm)
            && (start..end).contains(&offset)
        {
            return h.read(offset - start);
        }
        // The Link capability, CXL.io registers and everything else read 0.
        let _ = self.link;
        0
    }

    fn write_dword(&mut self, offset: u64, value: u32, enables: u32) {
        if (RAS_OFFSET..RAS_OFFSET + ras::LEN).contains(&offset) {
            self.ras.write(offset - RAS_OFFSET, value, enables);
            return;
        }
        if let Some((start, end)) = self.hdm_range()
            && (start..end).contains(&offset)
            && let Some(h) = &mut self.hdm
        {
            h.write(offset - start, value, enables);
            return;
        }
        log::trace!("cxl component: ignoring write at {offset:#x}");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::cxl::testutil::{RecordingListener, Rng};

    pub const WIN: u64 = 0x40_0000_0000;
    pub const GIB: u64 = 1 << 30;
    pub const M256: u64 = 256 << 20;

    pub fn rd(c: &ComponentRegisters, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn wr(c: &mut ComponentRegisters, off: u64, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    /// What Linux `cxl_probe_component_regs` finds: (HDM offset, HDM length, RAS offset).
    pub fn probe(c: &ComponentRegisters) -> (Option<(u64, u64)>, Option<u64>) {
        let hdr = rd(c, CM_OFFSET);
        assert_eq!(hdr & 0xffff, 1, "CXL capability header ID");
        let count = hdr >> 24;
        let (mut hdm, mut ras) = (None, None);
        for cap in 1..=u64::from(count) {
            let h = rd(c, CM_OFFSET + cap * 4);
            let offset = u64::from(h >> 20);
            let reg = CM_OFFSET + offset;
            match h & 0xffff {
                5 => {
                    // cxl_hdm_decoder_count()
                    let n = match rd(c, reg) & 0xf {
                        0 => 1,
                        v @ 1..=8 => v * 2,
                        v => (v - 4) * 4,
                    };
                    hdm = Some((reg, 0x20 * u64::from(n) + 0x10));
                }
                2 => ras = Some(reg),
                _ => {}
            }
        }
        (hdm, ras)
    }

    fn dec(hdm: u64, id: u64, reg: u64) -> u64 {
        hdm + 0x10 + 0x20 * id + reg
    }

    /// Linux `setup_hw_decoder` + `cxld_await_commit` (1-way, 256 B granularity).
    pub fn linux_commit(
        c: &mut ComponentRegisters,
        hdm: u64,
        id: u64,
        base: u64,
        size: u64,
        tl_or_skip: u64,
    ) -> Result<(), &'static str> {
        linux_commit_interleaved(c, hdm, id, base, size, tl_or_skip, (0, 0))
    }

    /// [`linux_commit`] with the IW and IG encodings `(eiw, eig)`.
    pub fn linux_commit_interleaved(
        c: &mut ComponentRegisters,
        hdm: u64,
        id: u64,
        base: u64,
        size: u64,
        tl_or_skip: u64,
        (eiw, eig): (u32, u32),
    ) -> Result<(), &'static str> {
        let mut ctrl = rd(c, dec(hdm, id, hdm::CTRL));
        ctrl &= !0xff;
        ctrl |= hdm::CTRL_COMMIT | hdm::CTRL_HOSTONLY | (eiw << 4) | eig;
        wr(c, dec(hdm, id, hdm::BASE_HI), (base >> 32) as u32);
        wr(c, dec(hdm, id, hdm::BASE_LO), base as u32);
        wr(c, dec(hdm, id, hdm::SIZE_HI), (size >> 32) as u32);
        wr(c, dec(hdm, id, hdm::SIZE_LO), size as u32);
        wr(c, dec(hdm, id, hdm::TL_HI), (tl_or_skip >> 32) as u32);
        wr(c, dec(hdm, id, hdm::TL_LO), tl_or_skip as u32);
        wr(c, dec(hdm, id, hdm::CTRL), ctrl);
        for _ in 0..20 {
            let ctrl = rd(c, dec(hdm, id, hdm::CTRL));
            if ctrl & hdm::CTRL_ERR != 0 {
                wr(c, dec(hdm, id, hdm::CTRL), ctrl & !hdm::CTRL_COMMIT);
                return Err("EIO");
            }
            if ctrl & hdm::CTRL_COMMITTED != 0 {
                return Ok(());
            }
        }
        Err("ETIMEDOUT")
    }

    /// Linux `cxl_decoder_reset`.
    pub fn linux_reset(c: &mut ComponentRegisters, hdm: u64, id: u64) {
        let ctrl = rd(c, dec(hdm, id, hdm::CTRL));
        wr(c, dec(hdm, id, hdm::CTRL), ctrl & !hdm::CTRL_COMMIT);
        for r in [hdm::SIZE_HI, hdm::SIZE_LO, hdm::BASE_HI, hdm::BASE_LO] {
            wr(c, dec(hdm, id, r), 0);
        }
    }

    /// Linux `init_hdm_decoder` for an endpoint: (base, size, dpa) of a committed decoder.
    pub fn linux_init_endpoint_decoder(
        c: &ComponentRegisters,
        hdm: u64,
        which: u64,
        dpa_base: &mut u64,
    ) -> Option<(u64, u64, u64, bool)> {
        let ctrl = rd(c, dec(hdm, which, hdm::CTRL));
        let q = |lo, hi| {
            u64::from(rd(c, dec(hdm, which, lo))) | (u64::from(rd(c, dec(hdm, which, hi))) << 32)
        };
        let base = q(hdm::BASE_LO, hdm::BASE_HI);
        let size = q(hdm::SIZE_LO, hdm::SIZE_HI);
        if ctrl & hdm::CTRL_COMMITTED == 0 {
            return None;
        }
        let skip = q(hdm::TL_LO, hdm::TL_HI);
        let dpa = *dpa_base + skip;
        *dpa_base += size + skip;
        Some((base, size, dpa, ctrl & hdm::CTRL_LOCK != 0))
    }

    pub fn endpoint(
        vol: u64,
        pers: u64,
        windows: Vec<HpaWindow>,
    ) -> (ComponentRegisters, Arc<RecordingListener>) {
        let l = Arc::new(RecordingListener::default());
        let mut cfg = HdmConfig::endpoint(vol, pers);
        cfg.windows = windows;
        cfg.listener = Some(l.clone());
        let hdm = HdmDecoderCapability::new(cfg).unwrap();
        (ComponentRegisters::new(true, Some(hdm)), l)
    }

    /// Endpoint with 1 GiB volatile + 1 GiB persistent, a 4 GiB window, HDM and Mem enabled.
    fn enabled_endpoint() -> (ComponentRegisters, Arc<RecordingListener>, u64) {
        let (mut c, l) = endpoint(GIB, GIB, vec![HpaWindow::new(WIN, 4 * GIB)]);
        let (hdm, _) = probe(&c);
        let hdm = hdm.unwrap().0;
        c.hdm_mut().unwrap().set_mem_enable(true);
        // devm_cxl_enable_hdm
        let g = rd(&c, hdm + hdm::GLOBAL_CTRL);
        wr(&mut c, hdm + hdm::GLOBAL_CTRL, g | hdm::ENABLE);
        (c, l, hdm)
    }

    #[test]
    fn probe_finds_ras_and_hdm_like_linux() {
        let (c, _) = endpoint(GIB, 0, vec![]);
        let (hdm, ras_off) = probe(&c);
        let (hdm, len) = hdm.unwrap();
        assert_eq!(hdm, HDM_OFFSET);
        assert_eq!(len, 0x10 + 0x20 * 2);
        assert_eq!(ras_off, Some(RAS_OFFSET));
        // Capability array: ID 1, version 1, cache/mem version 1, RAS + Link + HDM.
        assert_eq!(rd(&c, CM_OFFSET), 0x0311_0001);
        assert_eq!(rd(&c, CM_OFFSET + 4), 0x1002_0002);
        assert_eq!(rd(&c, CM_OFFSET + 8), 0x2002_0004);
        assert_eq!(rd(&c, CM_OFFSET + 12), 0x4001_0005);
        // Sub-blocks do not overlap (Linux requests each region separately).
        const { assert!(RAS_OFFSET + ras::LEN <= LINK_OFFSET) };
        const { assert!(LINK_OFFSET + LINK_LEN <= HDM_OFFSET) };
        // Endpoint: decoder count encoding 1 (2 decoders), target count 0, interleave on
        // A11:8 and A14:12.
        assert_eq!(rd(&c, HDM_OFFSET), 0x301);
        // Reset values: everything 0, the global enable off.
        for off in (HDM_OFFSET + 4..HDM_OFFSET + len).step_by(4) {
            assert_eq!(rd(&c, off), 0, "{off:#x}");
        }
        // CXL.io area and the rest of the block read 0.
        assert_eq!(rd(&c, 0), 0);
        assert_eq!(rd(&c, 0xfffc), 0);
        assert_eq!(rd(&c, 0x1_0000), 0);
    }

    #[test]
    fn linux_commit_sequence_maps_ram_then_pmem() {
        let (mut c, l, hdm) = enabled_endpoint();
        // RAM region: 512 MiB of the volatile partition.
        linux_commit(&mut c, hdm, 0, WIN, 2 * M256, 0).unwrap();
        // pmem region: skip the rest of the volatile partition (512 MiB), map 512 MiB pmem.
        linux_commit(&mut c, hdm, 1, WIN + GIB, 2 * M256, 2 * M256).unwrap();
        let ev = l.take();
        assert_eq!(ev.len(), 2);
        assert_eq!(
            ev[0],
            (
                true,
                CommittedRange {
                    decoder_index: 0,
                    hpa_base: WIN,
                    size: 2 * M256,
                    interleave: Interleave::NONE,
                    target: DecodeTarget::Memory {
                        dpa_base: 0,
                        partition: Partition::Volatile,
                        partition_offset: 0
                    }
                }
            )
        );
        assert_eq!(
            ev[1].1.target,
            DecodeTarget::Memory {
                dpa_base: GIB,
                partition: Partition::Persistent,
                partition_offset: 0
            }
        );
        // init_hdm_decoder reads the same back.
        let mut dpa = 0;
        assert_eq!(
            linux_init_endpoint_decoder(&c, hdm, 0, &mut dpa),
            Some((WIN, 2 * M256, 0, false))
        );
        assert_eq!(
            linux_init_endpoint_decoder(&c, hdm, 1, &mut dpa),
            Some((WIN + GIB, 2 * M256, GIB, false))
        );
        let h = c.hdm().unwrap();
        assert_eq!(h.decode(WIN + 0x1234), Some((ev[0].1, Some(0x1234))));
        assert_eq!(h.decode(WIN + GIB + 5).unwrap().1, Some(GIB + 5));
        assert_eq!(h.decode(WIN + 2 * M256), None);

        // Teardown in reverse order (cxl_region_decode_reset).
        linux_reset(&mut c, hdm, 1);
        linux_reset(&mut c, hdm, 0);
        let ev = l.take();
        assert_eq!(
            ev.iter()
                .map(|e| (e.0, e.1.decoder_index))
                .collect::<Vec<_>>(),
            [(false, 1), (false, 0)]
        );
        assert!(c.hdm().unwrap().committed().is_empty());
        assert_eq!(
            rd(&c, dec(hdm, 0, hdm::CTRL)) & (hdm::CTRL_COMMITTED | hdm::CTRL_ERR),
            0
        );
        assert_eq!(rd(&c, dec(hdm, 0, hdm::SIZE_LO)), 0);
        // And it can be committed again.
        linux_commit(&mut c, hdm, 0, WIN + GIB, M256, 0).unwrap();
    }

    #[test]
    fn misprogramming_sets_error_not_committed() {
        let (mut c, l, hdm) = enabled_endpoint();
        // Out of order: decoder 1 before decoder 0.
        assert_eq!(linux_commit(&mut c, hdm, 1, WIN, M256, 0), Err("EIO"));
        // After the kernel clears Commit, Error clears too.
        assert_eq!(rd(&c, dec(hdm, 1, hdm::CTRL)) & hdm::CTRL_ERR, 0);
        // Outside every window.
        assert_eq!(
            linux_commit(&mut c, hdm, 0, WIN + 4 * GIB, M256, 0),
            Err("EIO")
        );
        assert_eq!(
            linux_commit(&mut c, hdm, 0, WIN + 3 * GIB + 3 * M256, 2 * M256, 0),
            Err("EIO")
        );
        assert_eq!(linux_commit(&mut c, hdm, 0, 0, M256, 0), Err("EIO"));
        // Zero size.
        assert_eq!(linux_commit(&mut c, hdm, 0, WIN, 0, 0), Err("EIO"));
        // DPA beyond the device (skip 2 GiB).
        assert_eq!(linux_commit(&mut c, hdm, 0, WIN, M256, 2 * GIB), Err("EIO"));
        // DPA range spanning volatile and persistent.
        assert_eq!(
            linux_commit(&mut c, hdm, 0, WIN, 2 * M256, 3 * M256),
            Err("EIO")
        );
        // Larger than the device.
        assert_eq!(linux_commit(&mut c, hdm, 0, WIN, 3 * GIB, 0), Err("EIO"));
        // Misaligned addresses cannot even be written: the low bits are not implemented.
        wr(&mut c, dec(hdm, 0, hdm::BASE_LO), 0x1234_5678);
        assert_eq!(rd(&c, dec(hdm, 0, hdm::BASE_LO)), 0x1000_0000);
        wr(&mut c, dec(hdm, 0, hdm::TL_LO), 0x0fff_ffff);
        assert_eq!(rd(&c, dec(hdm, 0, hdm::TL_LO)), 0);
        // 2-way interleave of 256 MiB (a share below 256 MiB) and reserved granularity.
        for ctrl in [hdm::CTRL_COMMIT | (1 << 4), hdm::CTRL_COMMIT | 7] {
            wr(&mut c, dec(hdm, 0, hdm::BASE_LO), WIN as u32);
            wr(&mut c, dec(hdm, 0, hdm::BASE_HI), (WIN >> 32) as u32);
            wr(&mut c, dec(hdm, 0, hdm::SIZE_LO), M256 as u32);
            wr(&mut c, dec(hdm, 0, hdm::CTRL), ctrl);
            assert_ne!(rd(&c, dec(hdm, 0, hdm::CTRL)) & hdm::CTRL_ERR, 0);
            wr(&mut c, dec(hdm, 0, hdm::CTRL), 0);
        }
        assert!(l.take().is_empty(), "nothing was ever mapped");

        // Overlap and HPA order against a committed decoder 0 at WIN + 1 GiB.
        linux_commit(&mut c, hdm, 0, WIN + GIB, 2 * M256, 0).unwrap();
        assert_eq!(
            linux_commit(&mut c, hdm, 1, WIN + GIB + M256, M256, 0),
            Err("EIO")
        );
        assert_eq!(linux_commit(&mut c, hdm, 1, WIN, M256, 0), Err("EIO"));
        // A refused mapping.
        l.refuse.store(true, Ordering::Relaxed);
        assert_eq!(
            linux_commit(&mut c, hdm, 1, WIN + 2 * GIB, M256, 0),
            Err("EIO")
        );
        l.refuse.store(false, Ordering::Relaxed);
        linux_commit(&mut c, hdm, 1, WIN + 2 * GIB, M256, 0).unwrap();
        assert_eq!(l.take().len(), 2);

        // Direct API errors name the reason.
        let h = c.hdm_mut().unwrap();
        h.reset();
        assert_eq!(
            h.precommit(0, WIN + 1, M256, 0, false),
            Err(HdmError::Misaligned {
                base: WIN + 1,
                size: M256
            })
        );
        assert_eq!(
            h.precommit(1, WIN, M256, 0, false),
            Err(HdmError::OutOfOrder(1))
        );
        assert_eq!(
            h.precommit(2, WIN, M256, 0, false),
            Err(HdmError::NoSuchDecoder(2))
        );
        assert_eq!(
            h.precommit(0, WIN, 2 * M256, 3 * M256, false),
            Err(HdmError::SpansPartitions {
                dpa: 3 * M256,
                size: 2 * M256
            })
        );
        assert_eq!(
            h.precommit(0, u64::MAX - M256 + 1, M256, 0, false),
            Err(HdmError::OutOfAddressSpace {
                base: u64::MAX - M256 + 1,
                size: M256
            })
        );
        assert_eq!(
            h.precommit(0, 1 << 52, M256, 0, false),
            Err(HdmError::OutOfAddressSpace {
                base: 1 << 52,
                size: M256
            })
        );
        assert!(h.committed().is_empty());
    }

    #[test]
    fn endpoint_commit_needs_hdm_and_mem_enable() {
        let (mut c, l) = endpoint(GIB, 0, vec![HpaWindow::new(WIN, GIB)]);
        let hdm = HDM_OFFSET;
        assert_eq!(linux_commit(&mut c, hdm, 0, WIN, M256, 0), Err("EIO"));
        wr(&mut c, hdm + hdm::GLOBAL_CTRL, hdm::ENABLE);
        assert_eq!(linux_commit(&mut c, hdm, 0, WIN, M256, 0), Err("EIO"));
        c.hdm_mut().unwrap().set_mem_enable(true);
        linux_commit(&mut c, hdm, 0, WIN, M256, 0).unwrap();
        assert_eq!(l.take().len(), 1);
        // Global control: only the enable bit is writable.
        wr(&mut c, hdm + hdm::GLOBAL_CTRL, u32::MAX);
        assert_eq!(rd(&c, hdm + hdm::GLOBAL_CTRL), hdm::ENABLE);
    }

    #[test]
    fn window_memory_types_are_enforced() {
        let ram_only = HpaWindow {
            persistent: false,
            ..HpaWindow::new(WIN, GIB)
        };
        let pmem_only = HpaWindow {
            volatile: false,
            ..HpaWindow::new(WIN + GIB, GIB)
        };
        let (mut c, _l) = endpoint(M256, M256, vec![ram_only, pmem_only]);
        let h = c.hdm_mut().unwrap();
        assert_eq!(
            h.precommit(0, WIN + GIB, M256, 0, false),
            Err(HdmError::WindowType(Partition::Volatile))
        );
        h.precommit(0, WIN, M256, 0, false).unwrap();
        assert_eq!(
            h.precommit(1, WIN + M256, M256, 0, false),
            Err(HdmError::WindowType(Partition::Persistent))
        );
        h.precommit(1, WIN + GIB, M256, 0, false).unwrap();
    }

    #[test]
    fn committed_decoders_are_frozen_and_lock_on_commit_sticks() {
        let (mut c, l, hdm) = enabled_endpoint();
        linux_commit(&mut c, hdm, 0, WIN, M256, 0).unwrap();
        // Base/size/skip writes are ignored while committed.
        wr(&mut c, dec(hdm, 0, hdm::BASE_LO), 0x7000_0000);
        wr(&mut c, dec(hdm, 0, hdm::SIZE_HI), 1);
        wr(&mut c, dec(hdm, 0, hdm::TL_LO), 0x1000_0000);
        assert_eq!(rd(&c, dec(hdm, 0, hdm::BASE_LO)), 0);
        assert_eq!(rd(&c, dec(hdm, 0, hdm::SIZE_HI)), 0);
        assert_eq!(rd(&c, dec(hdm, 0, hdm::TL_LO)), 0);
        // Changing IW while committed does nothing either.
        let ctrl = rd(&c, dec(hdm, 0, hdm::CTRL));
        wr(&mut c, dec(hdm, 0, hdm::CTRL), ctrl | (3 << 4));
        assert_eq!(rd(&c, dec(hdm, 0, hdm::CTRL)), ctrl);

        // Lock On Commit: decoder 1 can never be uncommitted by the guest.
        let h = c.hdm_mut().unwrap();
        h.precommit(1, WIN + GIB, M256, 0, true).unwrap();
        let ctrl = rd(&c, dec(hdm, 1, hdm::CTRL));
        assert_eq!(
            ctrl & (hdm::CTRL_LOCK | hdm::CTRL_COMMITTED | hdm::CTRL_HOSTONLY),
            hdm::CTRL_LOCK | hdm::CTRL_COMMITTED | hdm::CTRL_HOSTONLY
        );
        linux_reset(&mut c, hdm, 1);
        assert_eq!(rd(&c, dec(hdm, 1, hdm::CTRL)), ctrl);
        assert_eq!(rd(&c, dec(hdm, 1, hdm::BASE_HI)), (WIN >> 32) as u32);
        assert_eq!(c.hdm().unwrap().committed().len(), 2);
        assert_eq!(
            c.hdm_mut().unwrap().precommit(1, WIN + GIB, M256, 0, false),
            Err(HdmError::AlreadyCommitted(1))
        );
        l.take();
        // A conventional reset unlocks and unmaps everything.
        c.hdm_mut().unwrap().reset();
        let ev = l.take();
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| !e.0));
        assert_eq!(rd(&c, dec(hdm, 1, hdm::CTRL)), 0);
        assert!(!c.hdm().unwrap().enabled());
    }

    #[test]
    fn byte_and_qword_accesses_program_decoders() {
        let (mut c, l, hdm) = enabled_endpoint();
        // 8-byte writes of base and size (lo_hi_writeq), then Commit through a byte write of
        // control bits 15:8.
        c.write(dec(hdm, 0, hdm::BASE_LO), &(WIN + GIB).to_le_bytes());
        c.write(dec(hdm, 0, hdm::SIZE_LO), &M256.to_le_bytes());
        c.write(
            dec(hdm, 0, hdm::CTRL) + 1,
            &[((hdm::CTRL_COMMIT | hdm::CTRL_HOSTONLY) >> 8) as u8],
        );
        let mut q = [0u8; 8];
        c.read(dec(hdm, 0, hdm::BASE_LO), &mut q);
        assert_eq!(u64::from_le_bytes(q), WIN + GIB);
        let mut w = [0u8; 2];
        c.read(dec(hdm, 0, hdm::CTRL), &mut w);
        assert_eq!(
            u16::from_le_bytes(w) as u32 & hdm::CTRL_COMMITTED,
            hdm::CTRL_COMMITTED
        );
        assert_eq!(l.take().len(), 1);
        // Misaligned accesses read 0 and do nothing.
        let mut d = [0xffu8; 4];
        c.read(dec(hdm, 0, hdm::CTRL) + 1, &mut d);
        assert_eq!(d, [0; 4]);
        c.write(dec(hdm, 0, hdm::CTRL) + 1, &[0, 0, 0, 0]);
        assert_eq!(c.hdm().unwrap().committed().len(), 1);
    }

    #[test]
    fn ras_registers() {
        let mut c = ComponentRegisters::new(false, None);
        let (hdm, ras_off) = probe(&c);
        assert!(hdm.is_none());
        let r = ras_off.unwrap();
        assert_eq!(rd(&c, CM_OFFSET), 0x0111_0001);
        assert_eq!(rd(&c, r + ras::UC_MASK), ras::UC_BITS);
        assert_eq!(rd(&c, r + ras::CE_MASK), ras::CE_BITS);
        // cxl_ras_unmask.
        wr(&mut c, r + ras::UC_MASK, 0);
        wr(&mut c, r + ras::CE_MASK, 0);
        assert!(
            c.ras_mut()
                .inject_uncorrectable((1 << 14) | (1 << 3), &[0xdead, 0xbeef])
        );
        assert!(c.ras_mut().inject_correctable(1 << 2 | 1 << 30));
        assert_eq!(rd(&c, r + ras::UC_STATUS), (1 << 14) | (1 << 3));
        assert_eq!(
            rd(&c, r + ras::CAP_CONTROL) & 0x3f,
            3,
            "first error pointer"
        );
        assert_eq!(rd(&c, r + ras::HEADER_LOG), 0xdead);
        assert_eq!(rd(&c, r + ras::HEADER_LOG + 4), 0xbeef);
        assert_eq!(rd(&c, r + ras::HEADER_LOG + 0x3c), 0);
        assert_eq!(rd(&c, r + ras::CE_STATUS), 1 << 2);
        // RW1C, and a byte write clears only its byte's bits.
        c.write(r + ras::UC_STATUS + 2, &[0xfe]);
        assert_eq!(rd(&c, r + ras::UC_STATUS), (1 << 14) | (1 << 3));
        wr(&mut c, r + ras::UC_STATUS, 1 << 3);
        assert_eq!(rd(&c, r + ras::UC_STATUS), 1 << 14);
        wr(&mut c, r + ras::CE_STATUS, u32::MAX);
        assert_eq!(rd(&c, r + ras::CE_STATUS), 0);
        // Header log and first error pointer are read-only; Poison Enabled is writable.
        wr(&mut c, r + ras::HEADER_LOG, 0);
        assert_eq!(rd(&c, r + ras::HEADER_LOG), 0xdead);
        wr(&mut c, r + ras::CAP_CONTROL, u32::MAX);
        assert_eq!(rd(&c, r + ras::CAP_CONTROL), ras::POISON_ENABLED | 3);
        // Masked errors are logged but not signalled.
        wr(&mut c, r + ras::CE_MASK, u32::MAX);
        assert!(!c.ras_mut().inject_correctable(1));
        assert!(!c.ras_mut().inject_uncorrectable(1 << 12, &[]));
    }

    #[test]
    fn switch_decoders_route_to_ports_without_global_enable() {
        let l = Arc::new(RecordingListener::default());
        let mut cfg = HdmConfig::switch(vec![1, 2]);
        cfg.windows = vec![HpaWindow::new(WIN, 4 * GIB)];
        cfg.listener = Some(l.clone());
        let mut c = ComponentRegisters::new(false, Some(HdmDecoderCapability::new(cfg).unwrap()));
        let (hdm, _) = probe(&c);
        let (hdm, _) = hdm.unwrap();
        // 2 decoders, target count 2, interleave on A11:8 and A14:12.
        assert_eq!(rd(&c, hdm), 0x321);
        assert_eq!(
            linux_commit(&mut c, hdm, 0, WIN, GIB, 7),
            Err("EIO"),
            "unknown port"
        );
        linux_commit(&mut c, hdm, 0, WIN, GIB, 2).unwrap();
        assert_eq!(
            l.take()[0].1.target,
            DecodeTarget::Ports([2, 0, 0, 0, 0, 0, 0, 0])
        );
        // Target list is a full register (8 port IDs).
        assert_eq!(rd(&c, dec(hdm, 0, hdm::TL_LO)), 2);
        linux_commit(&mut c, hdm, 1, WIN + GIB, GIB, 0x0000_0201).unwrap();
        assert_eq!(
            c.hdm()
                .unwrap()
                .decode(WIN + GIB)
                .unwrap()
                .0
                .route(WIN + GIB),
            Some(1)
        );
    }

    #[test]
    fn interleaved_switch_decoders_validate_their_target_lists() {
        let l = Arc::new(RecordingListener::default());
        let mut cfg = HdmConfig::switch(vec![2, 3]);
        cfg.windows = vec![HpaWindow::new(WIN, 4 * GIB)];
        cfg.listener = Some(l.clone());
        let mut c = ComponentRegisters::new(false, Some(HdmDecoderCapability::new(cfg).unwrap()));
        let hdm = probe(&c).0.unwrap().0;
        let two_4k = (1, 4);
        for (base, size, tl, il, why) in [
            (WIN, GIB, 0x0202, two_4k, "the same port twice"),
            (WIN, GIB, 0x0702, two_4k, "an unknown port in position 1"),
            (WIN, GIB, 0x0302, (2, 4), "4 ways over 2 ports"),
            (WIN, GIB, 0x0302, (4, 0), "16 ways"),
            (WIN, GIB, 0x0302, (1, 7), "a reserved granularity"),
            (WIN, M256, 0x0302, two_4k, "a 256 MiB range over 2 ways"),
            (
                WIN + M256,
                2 * M256,
                0x0302,
                two_4k,
                "a base off the 512 MiB set boundary",
            ),
        ] {
            assert_eq!(
                linux_commit_interleaved(&mut c, hdm, 0, base, size, tl, il),
                Err("EIO"),
                "{why}"
            );
        }
        assert!(l.take().is_empty(), "nothing committed");
        linux_commit_interleaved(&mut c, hdm, 0, WIN, GIB, 0x0302, two_4k).unwrap();
        let r = l.take()[0].1;
        assert_eq!(
            r.interleave,
            Interleave {
                ways: 2,
                granularity: 4096
            }
        );
        assert_eq!(r.target, DecodeTarget::Ports([2, 3, 0, 0, 0, 0, 0, 0]));
        assert_eq!(
            (r.route(WIN + 0xfff), r.route(WIN + 0x1000)),
            (Some(2), Some(3))
        );
        assert_eq!(r.route(WIN + 0x2000), Some(2));
    }

    #[test]
    fn interleaved_endpoint_decoders_take_a_share_of_the_dpa_space() {
        let (mut c, l, hdm) = enabled_endpoint();
        // A 2-way 4 KiB RAM region of 2 GiB: this device's share is its whole 1 GiB volatile
        // partition; then a 2-way 256 B pmem region of 2 GiB: the persistent partition.
        linux_commit_interleaved(&mut c, hdm, 0, WIN, 2 * GIB, 0, (1, 4)).unwrap();
        linux_commit_interleaved(&mut c, hdm, 1, WIN + 2 * GIB, 2 * GIB, 0, (1, 0)).unwrap();
        let ev = l.take();
        let (ram, pmem) = (ev[0].1, ev[1].1);
        assert_eq!((ram.dpa_base(), ram.dpa_size()), (Some(0), GIB));
        assert_eq!(
            ram.interleave,
            Interleave {
                ways: 2,
                granularity: 4096
            }
        );
        assert_eq!((pmem.dpa_base(), pmem.dpa_size()), (Some(GIB), GIB));
        assert!(matches!(
            pmem.target,
            DecodeTarget::Memory {
                partition: Partition::Persistent,
                partition_offset: 0,
                ..
            }
        ));
        // HPA granule 2 (offset 8 KiB) is this device's granule 1 (DPA 4 KiB).
        let h = c.hdm().unwrap();
        assert_eq!(h.decode(WIN + 0x2000 + 7).unwrap().1, Some(0x1007));
        assert_eq!(
            h.decode(WIN + 2 * GIB + 0x205).unwrap().1,
            Some(GIB + 0x105)
        );
        assert_eq!(
            rd(&c, dec(hdm, 0, hdm::CTRL)) & 0xff,
            0x14,
            "IW and IG read back"
        );
        linux_reset(&mut c, hdm, 1);
        linux_reset(&mut c, hdm, 0);
        l.take();
        // Inconsistent programming maps nothing: a share spanning both partitions, a share past
        // the device, 8 ways of 1 GiB (a 128 MiB share), an unaligned base.
        for (base, size, skip, il) in [
            (WIN, GIB, 3 * M256, (1, 4)),
            (WIN, 2 * GIB, 6 * M256, (1, 4)),
            (WIN, GIB, 0, (3, 4)),
            (WIN + M256, 2 * GIB, 0, (1, 4)),
        ] {
            assert_eq!(
                linux_commit_interleaved(&mut c, hdm, 0, base, size, skip, il),
                Err("EIO"),
                "{base:#x}+{size:#x} skip {skip:#x} {il:?}"
            );
        }
        assert!(l.take().is_empty(), "nothing was mapped");
    }

    #[test]
    fn construction_rejects_bad_configs() {
        let bad = |cfg: HdmConfig| HdmDecoderCapability::new(cfg).is_err();
        assert!(bad(HdmConfig {
            decoder_count: 3,
            ..HdmConfig::endpoint(GIB, 0)
        }));
        assert!(bad(HdmConfig {
            decoder_count: 0,
            ..HdmConfig::endpoint(GIB, 0)
        }));
        assert!(bad(HdmConfig::endpoint(GIB + 1, 0)));
        assert!(bad(HdmConfig::endpoint(u64::MAX - M256 + 1, M256)));
        assert!(bad(HdmConfig::switch(vec![])));
        assert!(bad(HdmConfig::switch(vec![0; 9])));
        assert!(bad(HdmConfig {
            windows: vec![HpaWindow::new(WIN + 1, GIB)],
            ..HdmConfig::switch(vec![0])
        }));
        assert!(bad(HdmConfig {
            windows: vec![HpaWindow::new(WIN, 0)],
            ..HdmConfig::switch(vec![0])
        }));
        for n in [1, 2, 4, 6, 8, 10] {
            let h = HdmDecoderCapability::new(HdmConfig {
                decoder_count: n,
                ..HdmConfig::endpoint(GIB, 0)
            })
            .unwrap();
            assert_eq!(h.decoder_count(), n);
        }
    }

    /// Random register traffic: never panics, and every range handed to the listener lies in
    /// a window and inside one partition of the device (the backing is never touched outside
    /// the device range).
    #[test]
    fn random_programming_never_maps_outside_the_device() {
        let (vol, pers) = (GIB, 2 * GIB);
        let windows = vec![
            HpaWindow::new(WIN, 4 * GIB),
            HpaWindow::new(WIN + 8 * GIB, GIB),
        ];
        let (mut c, l) = endpoint(vol, pers, windows.clone());
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let hdm = HDM_OFFSET;
        for i in 0..200_000u32 {
            let n = rng.below(2);
            let regs = [
                hdm::BASE_LO,
                hdm::BASE_HI,
                hdm::SIZE_LO,
                hdm::SIZE_HI,
                hdm::CTRL,
                hdm::TL_LO,
                hdm::TL_HI,
            ];
            let reg = regs[rng.below(regs.len() as u64) as usize];
            let (off, v) = match rng.below(64) {
                0..=3 => (rng.below(0x1_0100), rng.next()),
                4..=7 => (hdm + rng.below(0x60), rng.next()),
                8 => (hdm + hdm::GLOBAL_CTRL, 2 * u64::from(rng.below(4) != 0)),
                _ => {
                    let v = match reg {
                        hdm::BASE_LO => (WIN + rng.below(40) * M256) & 0xffff_ffff,
                        hdm::BASE_HI => (WIN >> 32) + u64::from(rng.below(8) == 0),
                        hdm::SIZE_LO | hdm::TL_LO => rng.below(8) * M256,
                        hdm::CTRL => {
                            (u64::from(hdm::CTRL_COMMIT) * rng.below(2))
                                | (u64::from(hdm::CTRL_LOCK) * u64::from(rng.below(32) == 0))
                        }
                        _ => u64::from(rng.below(8) == 0),
                    };
                    (dec(hdm, n, reg), v)
                }
            };
            let len = [4usize, 4, 4, 1, 2, 8, 3][rng.below(7) as usize];
            if rng.below(4) != 0 {
                c.write(off, &v.to_le_bytes()[..len]);
            } else {
                let mut b = vec![0u8; len];
                c.read(off, &mut b);
            }
            if i % 5000 == 0 {
                c.hdm_mut().unwrap().set_mem_enable(rng.below(4) != 0);
            }
            if i % 50_000 == 0 {
                c.hdm_mut().unwrap().reset();
            }
        }
        let mut maps = 0;
        let mut live: Vec<CommittedRange> = Vec::new();
        for (commit, r) in l.take() {
            if !commit {
                live.retain(|x| x != &r);
                continue;
            }
            maps += 1;
            assert!(windows.iter().any(|w| w.contains(r.hpa_base, r.size)));
            let DecodeTarget::Memory {
                dpa_base,
                partition,
                partition_offset,
            } = r.target
            else {
                panic!("endpoint decoded to a port");
            };
            match partition {
                Partition::Volatile => {
                    assert!(dpa_base + r.size <= vol && partition_offset == dpa_base)
                }
                Partition::Persistent => {
                    assert!(dpa_base >= vol && dpa_base + r.size <= vol + pers);
                    assert_eq!(partition_offset, dpa_base - vol);
                }
            }
            for x in &live {
                assert!(r.hpa_base + r.size <= x.hpa_base || x.hpa_base + x.size <= r.hpa_base);
            }
            live.push(r);
        }
        eprintln!("random walk: {maps} commits");
        assert!(maps > 10, "the random walk committed something");
    }
}
