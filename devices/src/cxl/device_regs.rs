//! The CXL memory device register block (CXL 2.0 8.2.8), in its own BAR.
//!
//! ```text
//! 0x000  Device Capabilities Array Register (u64): ID 0, version 1, count 3   8.2.8.1
//! 0x010  capability header 1: Device Status (ID 1), offset 0x100, length 0x100 8.2.8.2
//! 0x020  capability header 2: Primary Mailbox (ID 2), offset 0x400
//! 0x030  capability header 3: Memory Device (ID 0x4000), offset 0x200, length 0x100
//! 0x100  Event Status (u64)                                                    8.2.8.3.1
//! 0x200  Memory Device Status (u64): media ready, mailbox interface ready       8.2.8.5.1
//! 0x400  Mailbox: capabilities, control, command, status, background status,   8.2.8.4
//!        payload at 0x420 (2^payload_log2 bytes)
//! ```
//!
//! Served to Linux `cxl_probe_device_regs` (drivers/cxl/core/regs.c), which requires all three
//! capabilities, `cxl_pci_setup_mailbox` and `__cxl_pci_mbox_send_cmd` (drivers/cxl/pci.c) and
//! `cxl_await_media_ready` (drivers/cxl/core/pci.c).
//!
//! The mailbox executes synchronously: the write that sets the doorbell runs the command
//! through the [`MailboxBackend`], stores the return code, output length and payload, and
//! clears the doorbell before returning, so Linux's doorbell poll succeeds on its first read.
//! The Mailbox Control register is a plain RW register (CXL 2.0 8.2.8.4.4): Linux rings with
//! `writel(DOORBELL)`, which also clears the background-interrupt enable it set earlier; a
//! background command (e.g. Sanitize) completes at once anyway, and Linux polls for it.

use std::fmt;

use super::{CxlError, DwordRegs, MailboxBackend, dword_read, dword_write, mbox_rc, merge};
use crate::pci::FunctionInterrupts;

/// Capability IDs of the device register block (CXL 2.0 Table 164; Linux `CXLDEV_CAP_CAP_ID_*`).
pub mod cap_id {
    /// Device Status.
    pub const DEVICE_STATUS: u16 = 0x0001;
    /// Primary Mailbox.
    pub const PRIMARY_MAILBOX: u16 = 0x0002;
    /// Memory Device Status.
    pub const MEMDEV: u16 = 0x4000;
}

/// Offset of the Device Status registers.
pub const STATUS_OFFSET: u64 = 0x100;
/// Length of the Device Status capability.
pub const STATUS_LEN: u64 = 0x100;
/// Offset of the Memory Device Status registers.
pub const MEMDEV_OFFSET: u64 = 0x200;
/// Length of the Memory Device capability.
pub const MEMDEV_LEN: u64 = 0x100;
/// Offset of the primary mailbox registers.
pub const MAILBOX_OFFSET: u64 = 0x400;

/// Mailbox registers relative to [`MAILBOX_OFFSET`] (CXL 2.0 8.2.8.4; Linux `CXLDEV_MBOX_*`).
pub mod mbox {
    /// Mailbox Capabilities (u32): \[4:0\] payload size log2, \[6\] background command
    /// complete interrupt capable, \[10:7\] interrupt message number.
    pub const CAPS: u64 = 0x00;
    /// Mailbox Control (u32): \[0\] doorbell, \[1\] doorbell interrupt enable, \[2\] background
    /// command complete interrupt enable.
    pub const CTRL: u64 = 0x04;
    /// Command Register (u64): \[15:0\] opcode, \[36:16\] payload length.
    pub const CMD: u64 = 0x08;
    /// Mailbox Status (u64): \[0\] background operation, \[47:32\] return code.
    pub const STATUS: u64 = 0x10;
    /// Background Command Status (u64): \[15:0\] opcode, \[22:16\] percent complete,
    /// \[47:32\] return code.
    pub const BG_STATUS: u64 = 0x18;
    /// Command payload.
    pub const PAYLOAD: u64 = 0x20;
    /// Capabilities: background command complete interrupt capable.
    pub const CAP_BG_IRQ: u32 = 1 << 6;
    /// Control: doorbell.
    pub const CTRL_DOORBELL: u32 = 1 << 0;
    /// Control: background command complete interrupt enable.
    pub const CTRL_BG_IRQ: u32 = 1 << 2;
    /// Payload length field of the Command register (bits 36:16).
    pub const CMD_LEN_MASK: u64 = 0x1f_ffff << 16;
}

/// Memory Device Status bits (CXL 2.0 8.2.8.5.1; Linux `CXLMDEV_*`).
pub mod memdev {
    /// Media status "ready" in bits 3:2.
    pub const MEDIA_READY: u64 = 1 << 2;
    /// Mailbox Interface Ready.
    pub const MBOX_READY: u64 = 1 << 4;
}

/// Smallest and largest payload sizes (log2): Linux requires ≥ 256 bytes, the spec allows 1 MiB.
pub const PAYLOAD_LOG2_RANGE: std::ops::RangeInclusive<u8> = 8..=20;

/// The device register block with the primary mailbox.
pub struct DeviceRegisters {
    payload_log2: u8,
    payload: Vec<u8>,
    ctrl: u32,
    command: u64,
    status: u64,
    bg_status: u64,
    backend: Box<dyn MailboxBackend>,
    interrupts: Option<FunctionInterrupts>,
    mailbox_vector: u16,
}

impl fmt::Debug for DeviceRegisters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceRegisters")
            .field("payload_size", &self.payload.len())
            .field("command", &self.command)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl DeviceRegisters {
    /// A block with a `2^payload_log2`-byte payload (8..=20) executing commands on `backend`.
    /// With `interrupts`, background command completion is signalled on `mailbox_vector`
    /// (advertised in the Mailbox Capabilities register, so it must be < 16).
    pub fn new(
        payload_log2: u8,
        backend: Box<dyn MailboxBackend>,
        interrupts: Option<FunctionInterrupts>,
        mailbox_vector: u16,
    ) -> Result<Self, CxlError> {
        if !PAYLOAD_LOG2_RANGE.contains(&payload_log2) {
            return Err(CxlError::InvalidConfig(
                "mailbox payload size must be 2^8..=2^20 bytes",
            ));
        }
        if mailbox_vector > 15 {
            return Err(CxlError::InvalidConfig(
                "mailbox interrupt message number must be < 16",
            ));
        }
        Ok(DeviceRegisters {
            payload_log2,
            payload: vec![0; 1 << payload_log2],
            ctrl: 0,
            command: 0,
            status: 0,
            bg_status: 0,
            backend,
            interrupts,
            mailbox_vector,
        })
    }

    /// Bytes needed for the block (a power of two, at least 4 KiB): the BAR size.
    pub fn size(&self) -> u64 {
        Self::size_for(self.payload_log2)
    }

    /// Block size for a given payload size.
    pub fn size_for(payload_log2: u8) -> u64 {
        (MAILBOX_OFFSET + mbox::PAYLOAD + (1u64 << payload_log2.min(20)))
            .next_power_of_two()
            .max(0x1000)
    }

    /// Payload area size in bytes.
    pub fn payload_size(&self) -> usize {
        self.payload.len()
    }

    /// Replaces the command set.
    pub fn set_backend(&mut self, backend: Box<dyn MailboxBackend>) {
        self.backend = backend;
    }

    /// The command set.
    pub fn backend_mut(&mut self) -> &mut dyn MailboxBackend {
        self.backend.as_mut()
    }

    /// Guest read at `offset` into the block. Registers take naturally aligned 1/2/4/8-byte
    /// accesses, the payload any access inside it; everything else reads 0.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if let Some(p) = self.payload_slice(offset, data.len()) {
            data.copy_from_slice(&self.payload[p]);
            return;
        }
        dword_read(self, offset, data);
    }

    /// Guest write at `offset` into the block; malformed accesses are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(p) = self.payload_slice(offset, data.len()) {
            self.payload[p].copy_from_slice(data);
            return;
        }
        dword_write(self, offset, data);
    }

    /// Back to the reset state (payload cleared, no command pending).
    pub fn reset(&mut self) {
        self.payload.fill(0);
        self.ctrl = 0;
        self.command = 0;
        self.status = 0;
        self.bg_status = 0;
    }

    fn payload_slice(&self, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = offset.checked_sub(MAILBOX_OFFSET + mbox::PAYLOAD)?;
        let end = start.checked_add(len as u64)?;
        if len == 0 || len > 8 || end > self.payload.len() as u64 {
            return None;
        }
        Some(start as usize..end as usize)
    }

    fn caps(&self) -> u32 {
        let mut caps = u32::from(self.payload_log2);
        if self.interrupts.is_some() {
            caps |= mbox::CAP_BG_IRQ | (u32::from(self.mailbox_vector) << 7);
        }
        caps
    }

    /// Runs the command in the Command register (the doorbell was rung).
    fn execute(&mut self) {
        let opcode = self.command as u16;
        let len = ((self.command & mbox::CMD_LEN_MASK) >> 16) as usize;
        let (rc, out) = if len > self.payload.len() {
            log::debug!("cxl mailbox: opcode {opcode:#06x} input length {len} too large");
            (mbox_rc::INVALID_PAYLOAD_LENGTH, Vec::new())
        } else {
            let input = self.payload[..len].to_vec();
            self.backend.execute(opcode, &input, self.payload.len())
        };
        let mut out = out;
        if out.len() > self.payload.len() {
            log::warn!(
                "cxl mailbox: opcode {opcode:#06x} produced {} bytes, truncated to {}",
                out.len(),
                self.payload.len()
            );
            out.truncate(self.payload.len());
        }
        log::debug!(
            "cxl mailbox: opcode {opcode:#06x} in {len} out {} rc {rc:#x}",
            out.len()
        );
        self.payload[..out.len()].copy_from_slice(&out);
        self.command = (self.command & 0xffff) | ((out.len() as u64) << 16);
        self.status = u64::from(rc) << 32;
        if rc == mbox_rc::BACKGROUND_STARTED {
            // Completed at once: opcode, 100 %, success.
            self.bg_status = u64::from(opcode) | (100 << 16);
            if self.ctrl & mbox::CTRL_BG_IRQ != 0
                && let Some(irq) = &self.interrupts
            {
                let r = irq.trigger(self.mailbox_vector);
                log::debug!("cxl mailbox: background completion interrupt: {r:?}");
            }
        }
    }
}

impl DwordRegs for DeviceRegisters {
    fn read_dword(&self, offset: u64) -> u32 {
        let q = |v: u64, off: u64| {
            if off & 4 == 0 {
                v as u32
            } else {
                (v >> 32) as u32
            }
        };
        match offset {
            // Capabilities array: ID 0, version 1, 3 capabilities.
            0x00 => 1 << 16,
            0x04 => 3,
            0x10 => u32::from(cap_id::DEVICE_STATUS) | (1 << 16),
            0x14 => STATUS_OFFSET as u32,
            0x18 => STATUS_LEN as u32,
            0x20 => u32::from(cap_id::PRIMARY_MAILBOX) | (1 << 16),
            0x24 => MAILBOX_OFFSET as u32,
            0x28 => (mbox::PAYLOAD + self.payload.len() as u64) as u32,
            0x30 => u32::from(cap_id::MEMDEV) | (1 << 16),
            0x34 => MEMDEV_OFFSET as u32,
            0x38 => MEMDEV_LEN as u32,
            o if o == STATUS_OFFSET => self.backend.event_status() & 0xf,
            o if o == MEMDEV_OFFSET || o == MEMDEV_OFFSET + 4 => {
                let v = self
                    .backend
                    .memdev_status()
                    .unwrap_or(memdev::MEDIA_READY | memdev::MBOX_READY);
                q(v, o)
            }
            o if (MAILBOX_OFFSET..MAILBOX_OFFSET + mbox::PAYLOAD).contains(&o) => {
                match o - MAILBOX_OFFSET {
                    mbox::CAPS => self.caps(),
                    mbox::CTRL => self.ctrl,
                    r @ (0x08 | 0x0c) => q(self.command, r),
                    r @ (0x10 | 0x14) => q(self.status, r),
                    r @ (0x18 | 0x1c) => q(self.bg_status, r),
                    _ => 0,
                }
            }
            o => {
                // Payload DWORDs (aligned accesses come here only through dword_read when the
                // fast path did not match, e.g. an 8-byte access split in two).
                let Some(p) = self.payload_slice(o, 4) else {
                    return 0;
                };
                let b = &self.payload[p];
                u32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
        }
    }

    fn write_dword(&mut self, offset: u64, value: u32, enables: u32) {
        let Some(r) = offset.checked_sub(MAILBOX_OFFSET) else {
            return;
        };
        let set_half = |v: u64, r: u64| {
            let shift = if r & 4 == 0 { 0 } else { 32 };
            let old = (v >> shift) as u32;
            let new = merge(old, value, enables, u32::MAX);
            (v & !(0xffff_ffffu64 << shift)) | (u64::from(new) << shift)
        };
        match r {
            mbox::CTRL => {
                // Interrupt enables are RW; the doorbell is set by software, cleared by us.
                self.ctrl = merge(self.ctrl, value, enables, mbox::CTRL_BG_IRQ);
                if value & enables & mbox::CTRL_DOORBELL != 0 {
                    self.execute();
                }
            }
            0x08 | 0x0c => {
                let v = set_half(self.command, r);
                self.command = v & (0xffff | mbox::CMD_LEN_MASK);
            }
            _ => {
                if let Some(p) = self.payload_slice(offset, 4) {
                    let old = &self.payload[p.clone()];
                    let old = u32::from_le_bytes([old[0], old[1], old[2], old[3]]);
                    let new = merge(old, value, enables, u32::MAX);
                    self.payload[p].copy_from_slice(&new.to_le_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use iommu::{RecordingMsiSink, RequesterId};

    use super::*;
    use crate::cxl::testutil::Rng;
    use crate::pci::msix::MsixLayout;
    use crate::pci::{BarKind, ConfigSpace, HeaderType, MsixCapability, PciIds};

    type Calls = Arc<Mutex<Vec<(u16, Vec<u8>, usize)>>>;

    /// Echoes the input reversed; opcode 0x4400 "runs in the background"; 0xffff returns too
    /// much; records every call.
    #[derive(Default)]
    struct Echo {
        calls: Calls,
        events: u32,
    }

    impl MailboxBackend for Echo {
        fn execute(&mut self, opcode: u16, input: &[u8], capacity: usize) -> (u16, Vec<u8>) {
            self.calls
                .lock()
                .unwrap()
                .push((opcode, input.to_vec(), capacity));
            match opcode {
                0x4400 => (mbox_rc::BACKGROUND_STARTED, Vec::new()),
                0xffff => (mbox_rc::SUCCESS, vec![0xab; capacity + 100]),
                0x0003 => (mbox_rc::UNSUPPORTED, Vec::new()),
                _ => (mbox_rc::SUCCESS, input.iter().rev().copied().collect()),
            }
        }
        fn event_status(&self) -> u32 {
            self.events
        }
    }

    fn regs(interrupts: Option<FunctionInterrupts>) -> (DeviceRegisters, Calls) {
        let echo = Echo {
            events: 0x5,
            ..Echo::default()
        };
        let calls = echo.calls.clone();
        (
            DeviceRegisters::new(11, Box::new(echo), interrupts, 0).unwrap(),
            calls,
        )
    }

    fn rd32(r: &DeviceRegisters, off: u64) -> u32 {
        let mut b = [0u8; 4];
        r.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn rd64(r: &DeviceRegisters, off: u64) -> u64 {
        let mut b = [0u8; 8];
        r.read(off, &mut b);
        u64::from_le_bytes(b)
    }

    /// Linux `cxl_probe_device_regs`: (status, mbox, memdev) as (offset, length).
    fn probe(r: &DeviceRegisters) -> [Option<(u64, u64)>; 3] {
        let cap_array = rd64(r, 0);
        assert_eq!(cap_array & 0xffff, 0);
        let count = (cap_array >> 32) & 0xffff;
        let mut found = [None; 3];
        for cap in 1..=count {
            let id = rd32(r, cap * 0x10) & 0xffff;
            let offset = u64::from(rd32(r, cap * 0x10 + 4));
            let length = u64::from(rd32(r, cap * 0x10 + 8));
            let slot = match id as u16 {
                cap_id::DEVICE_STATUS => 0,
                cap_id::PRIMARY_MAILBOX => 1,
                cap_id::MEMDEV => 2,
                _ => continue,
            };
            found[slot] = Some((offset, length));
        }
        found
    }

    /// Linux `__cxl_pci_mbox_send_cmd`: returns (return code, output).
    fn send(r: &mut DeviceRegisters, opcode: u16, input: &[u8], size_out: usize) -> (u16, Vec<u8>) {
        let mbox = MAILBOX_OFFSET;
        assert_eq!(
            rd32(r, mbox + mbox::CTRL) & mbox::CTRL_DOORBELL,
            0,
            "doorbell busy"
        );
        let mut cmd = u64::from(opcode);
        if !input.is_empty() {
            cmd |= (input.len() as u64) << 16;
            // memcpy_toio: DWORDs, then the tail in words and bytes.
            let mut off = 0;
            while off + 4 <= input.len() {
                r.write(mbox + mbox::PAYLOAD + off as u64, &input[off..off + 4]);
                off += 4;
            }
            for (i, b) in input[off..].iter().enumerate() {
                r.write(mbox + mbox::PAYLOAD + (off + i) as u64, &[*b]);
            }
        }
        r.write(mbox + mbox::CMD, &cmd.to_le_bytes());
        r.write(mbox + mbox::CTRL, &mbox::CTRL_DOORBELL.to_le_bytes());
        assert_eq!(
            rd32(r, mbox + mbox::CTRL) & mbox::CTRL_DOORBELL,
            0,
            "doorbell cleared"
        );
        let status = rd64(r, mbox + mbox::STATUS);
        let rc = (status >> 32) as u16;
        if rc != mbox_rc::SUCCESS {
            return (rc, Vec::new());
        }
        let out_len = ((rd64(r, mbox + mbox::CMD) >> 16) & 0x1f_ffff) as usize;
        let n = out_len.min(size_out).min(r.payload_size());
        let mut out = vec![0u8; n];
        // memcpy_fromio with QWORDs where possible.
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            r.read(mbox + mbox::PAYLOAD + 8 * i as u64, chunk);
        }
        (rc, out)
    }

    #[test]
    fn probe_finds_all_three_capabilities() {
        let (r, _) = regs(None);
        let [status, mbox, memdev] = probe(&r);
        assert_eq!(status, Some((STATUS_OFFSET, STATUS_LEN)));
        assert_eq!(mbox, Some((MAILBOX_OFFSET, 0x20 + 2048)));
        assert_eq!(memdev, Some((MEMDEV_OFFSET, MEMDEV_LEN)));
        // The three regions do not overlap and fit in the BAR.
        let mut regions = [status.unwrap(), mbox.unwrap(), memdev.unwrap()];
        regions.sort();
        for w in regions.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
        assert!(regions[2].0 + regions[2].1 <= r.size());
        assert_eq!(r.size(), 0x1000);
        assert_eq!(DeviceRegisters::size_for(20), 0x20_0000);
    }

    #[test]
    fn status_registers() {
        let (r, _) = regs(None);
        // Mailbox ready and media ready (cxl_await_media_ready / cxl_pci_setup_mailbox).
        let md = rd64(&r, MEMDEV_OFFSET);
        assert_ne!(md & memdev::MBOX_READY, 0);
        assert_eq!((md >> 2) & 3, 1);
        assert_eq!(md & 3, 0, "not fatal, no firmware halt");
        assert_eq!(
            rd32(&r, STATUS_OFFSET),
            0x5,
            "event status from the backend"
        );
        // Mailbox capabilities: 2 KiB payload, no interrupts without a handle.
        assert_eq!(rd32(&r, MAILBOX_OFFSET) & 0x1f, 11);
        assert_eq!(rd32(&r, MAILBOX_OFFSET) & mbox::CAP_BG_IRQ, 0);
    }

    #[test]
    fn linux_send_sequence() {
        let (mut r, calls) = regs(None);
        let input: Vec<u8> = (1..=23).collect();
        let (rc, out) = send(&mut r, 0x4102, &input, 100);
        assert_eq!(rc, mbox_rc::SUCCESS);
        assert_eq!(out, input.iter().rev().copied().collect::<Vec<_>>());
        assert_eq!(calls.lock().unwrap()[0], (0x4102, input.clone(), 2048));
        // No input payload.
        let (rc, out) = send(&mut r, 0x4000, &[], 100);
        assert_eq!((rc, out.len()), (0, 0));
        // Errors carry no payload.
        let (rc, _) = send(&mut r, 0x0003, &[1, 2, 3], 100);
        assert_eq!(rc, mbox_rc::UNSUPPORTED);
        // A full-size payload round-trips.
        let big: Vec<u8> = (0..2048u32).map(|i| i as u8).collect();
        let (rc, out) = send(&mut r, 0x4103, &big, 4096);
        assert_eq!(rc, 0);
        assert_eq!(out.len(), 2048);
        assert_eq!(out[0], big[2047]);
    }

    #[test]
    fn oversized_lengths() {
        let (mut r, calls) = regs(None);
        // Input length larger than the payload area: Invalid Payload Length, backend not called.
        let cmd = 0x4103u64 | (2049 << 16);
        r.write(MAILBOX_OFFSET + mbox::CMD, &cmd.to_le_bytes());
        r.write(MAILBOX_OFFSET + mbox::CTRL, &1u32.to_le_bytes());
        assert_eq!(
            (rd64(&r, MAILBOX_OFFSET + mbox::STATUS) >> 32) as u16,
            mbox_rc::INVALID_PAYLOAD_LENGTH
        );
        assert!(calls.lock().unwrap().is_empty());
        // Length field is 21 bits; higher command bits are reserved.
        r.write(MAILBOX_OFFSET + mbox::CMD, &u64::MAX.to_le_bytes());
        assert_eq!(rd64(&r, MAILBOX_OFFSET + mbox::CMD), 0x1f_ffff_ffff);
        // A backend producing too much is truncated to the payload area.
        let (rc, out) = send(&mut r, 0xffff, &[], usize::MAX);
        assert_eq!(rc, 0);
        assert_eq!(out.len(), 2048);
        assert_eq!(
            (rd64(&r, MAILBOX_OFFSET + mbox::CMD) >> 16) & 0x1f_ffff,
            2048
        );
    }

    #[test]
    fn background_commands_complete_and_interrupt() {
        let sink = Arc::new(RecordingMsiSink::new());
        let mut config = ConfigSpace::new(
            HeaderType::Type0,
            PciIds {
                vendor_id: 1,
                device_id: 2,
                revision_id: 0,
                class_code: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            },
        );
        config.add_bar(0, 0x1000, BarKind::Memory32, false).unwrap();
        let msix = MsixCapability::new(
            &mut config,
            MsixLayout {
                num_vectors: 2,
                table_bar: 0,
                table_offset: 0,
                pba_bar: 0,
                pba_offset: 0x800,
            },
            sink.clone(),
            RequesterId(0x0100),
        )
        .unwrap();
        let cap = msix.cap_offset();
        let irq = FunctionInterrupts::new(Arc::new(Mutex::new(msix)));
        // Guest programs vector 0 and enables MSI-X and bus mastering.
        irq.with(|m| {
            m.bar_write(0, 0, &0xfee0_0000u32.to_le_bytes());
            m.bar_write(0, 8, &0x41u32.to_le_bytes());
            m.bar_write(0, 12, &0u32.to_le_bytes());
            config.write(4, &6u16.to_le_bytes());
            config.write(cap + 2, &0x8000u16.to_le_bytes());
            m.config_written(&config, 4, 2);
            m.config_written(&config, cap + 2, 2);
        });
        let (mut r, _) = regs(Some(irq));
        let caps = rd32(&r, MAILBOX_OFFSET);
        assert_ne!(caps & mbox::CAP_BG_IRQ, 0);
        assert_eq!((caps >> 7) & 0xf, 0, "message number");
        // Without the interrupt enabled: completion is visible, no MSI.
        let (rc, _) = send(&mut r, 0x4400, &[], 0);
        assert_eq!(rc, mbox_rc::BACKGROUND_STARTED);
        let bg = rd64(&r, MAILBOX_OFFSET + mbox::BG_STATUS);
        assert_eq!(bg & 0xffff, 0x4400);
        assert_eq!((bg >> 16) & 0x7f, 100);
        assert_eq!((bg >> 32) & 0xffff, 0);
        assert!(sink.is_empty());
        // cxl_pci_setup_mailbox enables the background interrupt.
        let ctrl = rd32(&r, MAILBOX_OFFSET + mbox::CTRL);
        r.write(
            MAILBOX_OFFSET + mbox::CTRL,
            &(ctrl | mbox::CTRL_BG_IRQ).to_le_bytes(),
        );
        assert_eq!(rd32(&r, MAILBOX_OFFSET + mbox::CTRL), mbox::CTRL_BG_IRQ);
        // Control is a plain RW register: Linux's doorbell write (`writel(DOORBELL)`) clears
        // the enable again, so a later background completion does not interrupt.
        send(&mut r, 0x4400, &[], 0);
        assert_eq!(rd32(&r, MAILBOX_OFFSET + mbox::CTRL), 0);
        assert!(sink.is_empty());
        // Doorbell and enable written together: interrupt on completion.
        r.write(MAILBOX_OFFSET + mbox::CMD, &0x4400u64.to_le_bytes());
        r.write(
            MAILBOX_OFFSET + mbox::CTRL,
            &(mbox::CTRL_DOORBELL | mbox::CTRL_BG_IRQ).to_le_bytes(),
        );
        assert_eq!(rd32(&r, MAILBOX_OFFSET + mbox::CTRL), mbox::CTRL_BG_IRQ);
        let m = sink.take();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].data, 0x41);
        // Ordinary commands do not interrupt.
        send(&mut r, 0x0001, &[], 0);
        assert!(sink.is_empty());
    }

    #[test]
    fn rejects_bad_configuration() {
        assert!(DeviceRegisters::new(7, Box::new(Echo::default()), None, 0).is_err());
        assert!(DeviceRegisters::new(21, Box::new(Echo::default()), None, 0).is_err());
        assert!(DeviceRegisters::new(11, Box::new(Echo::default()), None, 16).is_err());
        let r = DeviceRegisters::new(8, Box::new(Echo::default()), None, 3).unwrap();
        assert_eq!(r.payload_size(), 256);
    }

    #[test]
    fn arbitrary_accesses_are_safe() {
        let (mut r, _) = regs(None);
        let mut rng = Rng(42);
        for _ in 0..100_000 {
            let off = match rng.below(3) {
                0 => rng.below(0x1000),
                1 => MAILBOX_OFFSET + rng.below(0x40),
                _ => rng.next(),
            };
            let len = rng.below(10) as usize;
            if rng.below(2) == 0 {
                let v = rng.next().to_le_bytes();
                let data: Vec<u8> = (0..len).map(|i| v[i % 8]).collect();
                r.write(off, &data);
            } else {
                let mut b = vec![0xeeu8; len];
                r.read(off, &mut b);
                if !(1..=8).contains(&len) {
                    assert!(b.iter().all(|&x| x == 0));
                }
            }
            assert_eq!(
                rd32(&r, MAILBOX_OFFSET + mbox::CTRL) & mbox::CTRL_DOORBELL,
                0
            );
        }
        // Unaligned payload accesses work; unaligned register accesses read 0.
        r.write(MAILBOX_OFFSET + mbox::PAYLOAD + 3, &[1, 2, 3, 4, 5]);
        let mut b = [0u8; 5];
        r.read(MAILBOX_OFFSET + mbox::PAYLOAD + 3, &mut b);
        assert_eq!(b, [1, 2, 3, 4, 5]);
        let mut d = [0xffu8; 4];
        r.read(MAILBOX_OFFSET + 2, &mut d);
        assert_eq!(d, [0; 4]);
        // Past the payload end reads 0.
        r.read(MAILBOX_OFFSET + mbox::PAYLOAD + 2046, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
