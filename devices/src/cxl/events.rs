//! Event logs of the CXL memory device: the four logs (informational, warning, failure, fatal),
//! their records, overflow tracking, the event interrupt policy and the interrupts it asks for.
//!
//! Spec: CXL 3.0 §8.2.9.2 Events — §8.2.9.2.1 event record formats (common header Table 8-42,
//! General Media 8.2.9.2.1.1, DRAM 8.2.9.2.1.2, Memory Module 8.2.9.2.1.3; CXL 3.1 adds fields in
//! formerly reserved bytes, which are laid out here too), §8.2.9.2.2 Get Event Records,
//! §8.2.9.2.3 Clear Event Records, §8.2.9.2.4/5 Get/Set Event Interrupt Policy, and
//! §8.2.8.3.1 Event Status register. Linux side: `cxl_mem_get_records_log()`,
//! `cxl_clear_event_record()`, `__cxl_event_trace_record()` (`drivers/cxl/core/mbox.c`),
//! `cxl_event_config()` / `cxl_event_irqsetup()` / `cxl_event_thread()` (`drivers/cxl/pci.c`),
//! record structs in `include/cxl/event.h`, trace points in `drivers/cxl/core/trace.h`.

#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::collections::VecDeque;

use super::mailbox::{PayloadOut, ReturnCode, Uuid, put_bytes, uuid};
use super::memdev::HealthInfo;

/// General Media Event Record UUID fbcd0a77-c260-417f-85a9-088b1621eba6 (CXL 3.0 §8.2.9.2.1.1;
/// `CXL_EVENT_GEN_MEDIA_UUID`).
pub const GENERAL_MEDIA_UUID: Uuid = uuid(
    0xfbcd_0a77,
    0xc260,
    0x417f,
    [0x85, 0xa9, 0x08, 0x8b, 0x16, 0x21, 0xeb, 0xa6],
);

/// DRAM Event Record UUID 601dcbb3-9c06-4eab-b8af-4e9bfb5c9624 (CXL 3.0 §8.2.9.2.1.2;
/// `CXL_EVENT_DRAM_UUID`).
pub const DRAM_UUID: Uuid = uuid(
    0x601d_cbb3,
    0x9c06,
    0x4eab,
    [0xb8, 0xaf, 0x4e, 0x9b, 0xfb, 0x5c, 0x96, 0x24],
);

/// Memory Module Event Record UUID fe927475-dd59-4339-a586-79bab113b774 (CXL 3.0
/// §8.2.9.2.1.3; `CXL_EVENT_MEM_MODULE_UUID`).
pub const MEMORY_MODULE_UUID: Uuid = uuid(
    0xfe92_7475,
    0xdd59,
    0x4339,
    [0xa5, 0x86, 0x79, 0xba, 0xb1, 0x13, 0xb7, 0x74],
);

/// Size of one event record in a Get Event Records payload (`struct cxl_event_record_raw`).
pub const RECORD_SIZE: usize = 128;

/// Size of the Get Event Records output header (`struct cxl_get_event_payload`).
pub const GET_RECORDS_HEADER: usize = 0x20;

/// Size of the Clear Event Records input header (`struct cxl_mbox_clear_event_payload`).
pub const CLEAR_HEADER: usize = 6;

/// Records each log holds before it overflows (reported in Identify Memory Device).
pub const DEFAULT_LOG_CAPACITY: u16 = 64;

/// Get Event Records output flag: the log overflowed (CXL 3.0 Table 8-50;
/// `CXL_GET_EVENT_FLAG_OVERFLOW`).
pub const FLAG_OVERFLOW: u8 = 1 << 0;
/// Get Event Records output flag: more records than returned (`CXL_GET_EVENT_FLAG_MORE_RECORDS`).
pub const FLAG_MORE_RECORDS: u8 = 1 << 1;
/// Clear Event Records input flag: clear every record of the log.
pub const CLEAR_ALL: u8 = 1 << 0;

/// Interrupt mode of an event interrupt setting, bits [1:0] (CXL 3.0 Table 8-52;
/// `enum cxl_event_int_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptMode {
    /// No interrupt.
    None,
    /// MSI or MSI-X, message number in bits [7:4].
    MsiMsix,
    /// Firmware interrupt (EFN VDM). Accepted and reported, but this device raises nothing for
    /// it; Linux refuses to run with it anyway ("FW still in control of Event Logs").
    Firmware,
}

/// The four event logs — CXL 3.0 Table 8-49 (`enum cxl_event_log_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventLogKind {
    /// Informational Event Log (00h).
    Informational = 0,
    /// Warning Event Log (01h).
    Warning = 1,
    /// Failure Event Log (02h).
    Failure = 2,
    /// Fatal Event Log (03h).
    Fatal = 3,
}

impl EventLogKind {
    /// All logs, in log-number order.
    pub const ALL: [EventLogKind; 4] = [
        EventLogKind::Informational,
        EventLogKind::Warning,
        EventLogKind::Failure,
        EventLogKind::Fatal,
    ];

    /// The log a payload's Event Log byte names, if any.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }

    /// Index into per-log arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// This log's bit in the Event Status register (CXL 3.0 §8.2.8.3.1;
    /// `CXLDEV_EVENT_STATUS_INFO` .. `_FATAL`).
    pub fn status_bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// An interrupt the register model must deliver: the event log `log` gained a record and the
/// guest's policy for it is MSI/MSI-X with message number `msgnum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventInterrupt {
    /// Log that gained a record.
    pub log: EventLogKind,
    /// MSI/MSI-X vector (message number) to raise.
    pub msgnum: u8,
}

/// Header flags of a common event record, bits above the severity field (CXL 3.0 Table 8-42;
/// `CXL_EVENT_RECORD_FLAG_*` in `drivers/cxl/core/trace.h`).
pub mod record_flags {
    /// Permanent condition.
    pub const PERMANENT: u32 = 1 << 2;
    /// Maintenance needed.
    pub const MAINTENANCE_NEEDED: u32 = 1 << 3;
    /// Performance degraded.
    pub const PERFORMANCE_DEGRADED: u32 = 1 << 4;
    /// Hardware replacement needed.
    pub const HARDWARE_REPLACEMENT_NEEDED: u32 = 1 << 5;
}

/// General Media Event Record contents — CXL 3.0 §8.2.9.2.1.1 (`struct cxl_event_gen_media`).
/// `None` fields are left out and their validity flag clear.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GeneralMediaEvent {
    /// Header flags ([`record_flags`]); bits [1:0] (severity) are set from the log.
    pub flags: u32,
    /// Maintenance operation class.
    pub maint_op_class: u8,
    /// Device physical address (64-byte aligned, inside the device).
    pub dpa: u64,
    /// Set bit 1 of the Physical Address field: the location is not repairable (CXL 3.1).
    /// Bit 0 (volatile) is derived from the DPA.
    pub not_repairable: bool,
    /// Memory Event Descriptor (bit 0 uncorrectable, bit 1 threshold, bit 2 poison list overflow).
    pub descriptor: u8,
    /// Memory Event Type (0 ECC error, 1 invalid address, 2 data path error, ...).
    pub event_type: u8,
    /// Transaction Type (0 unknown, 1 host read, 2 host write, 3 scan media, 4 inject poison,
    /// 5 internal scrub, 6 internal management).
    pub transaction_type: u8,
    /// Channel.
    pub channel: Option<u8>,
    /// Rank.
    pub rank: Option<u8>,
    /// Device (24 bits).
    pub device: Option<u32>,
    /// Component identifier.
    pub component_id: Option<[u8; 16]>,
}

/// DRAM Event Record contents — CXL 3.0 §8.2.9.2.1.2 (`struct cxl_event_dram`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DramEvent {
    /// Header flags ([`record_flags`]); severity bits come from the log.
    pub flags: u32,
    /// Maintenance operation class.
    pub maint_op_class: u8,
    /// Device physical address (64-byte aligned, inside the device).
    pub dpa: u64,
    /// Not repairable (Physical Address bit 1, CXL 3.1).
    pub not_repairable: bool,
    /// Memory Event Descriptor.
    pub descriptor: u8,
    /// Memory Event Type.
    pub event_type: u8,
    /// Transaction Type.
    pub transaction_type: u8,
    /// Channel.
    pub channel: Option<u8>,
    /// Rank.
    pub rank: Option<u8>,
    /// Nibble mask (24 bits).
    pub nibble_mask: Option<u32>,
    /// Bank group.
    pub bank_group: Option<u8>,
    /// Bank.
    pub bank: Option<u8>,
    /// Row (24 bits).
    pub row: Option<u32>,
    /// Column.
    pub column: Option<u16>,
    /// Correction mask (4 × 64 bits).
    pub correction_mask: Option<[u8; 32]>,
    /// Component identifier (CXL 3.1).
    pub component_id: Option<[u8; 16]>,
}

/// Memory Module Event Record contents — CXL 3.0 §8.2.9.2.1.3 (`struct cxl_event_mem_module`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryModuleEvent {
    /// Header flags ([`record_flags`]); severity bits come from the log.
    pub flags: u32,
    /// Maintenance operation class.
    pub maint_op_class: u8,
    /// Device Event Type (0 health status change, 1 media status change, 2 life used change,
    /// 3 temperature change, 4 data path error, 5 LSA error, ...).
    pub event_type: u8,
    /// Device Health Information at the time of the event (Get Health Info layout).
    pub health: HealthInfo,
    /// Component identifier (CXL 3.1).
    pub component_id: Option<[u8; 16]>,
}

// Offsets inside a 128-byte record (UUID included) — CXL 3.0 Table 8-42.
const R_LENGTH: usize = 0x10;
const R_FLAGS: usize = 0x11;
const R_HANDLE: usize = 0x14;
const R_TIMESTAMP: usize = 0x18;
const R_MAINT_OP_CLASS: usize = 0x20;
/// Start of the record-specific data (`struct cxl_event_record_hdr` is 0x20 bytes).
const R_DATA: usize = 0x30;
// Media event header (General Media and DRAM), relative to the record.
const M_PHYS_ADDR: usize = R_DATA;
const M_DESCRIPTOR: usize = R_DATA + 0x08;
const M_TYPE: usize = R_DATA + 0x09;
const M_TRANSACTION: usize = R_DATA + 0x0a;
const M_VALIDITY: usize = R_DATA + 0x0b;
const M_CHANNEL: usize = R_DATA + 0x0d;
const M_RANK: usize = R_DATA + 0x0e;
const M_END: usize = R_DATA + 0x0f;

/// Physical Address field bit 0: the DPA is volatile (`CXL_DPA_VOLATILE`).
const DPA_VOLATILE: u64 = 1 << 0;
/// Physical Address field bit 1: not repairable (`CXL_DPA_NOT_REPAIRABLE`).
const DPA_NOT_REPAIRABLE: u64 = 1 << 1;
/// Physical Address field bits [63:6] (`CXL_DPA_MASK`).
const DPA_MASK: u64 = !0x3f;

/// Media-event header fields shared by General Media and DRAM records
/// (`struct cxl_event_media_hdr`).
struct MediaHeader {
    dpa: u64,
    volatile: bool,
    not_repairable: bool,
    descriptor: u8,
    event_type: u8,
    transaction_type: u8,
    validity: u16,
    channel: Option<u8>,
    rank: Option<u8>,
}

impl MediaHeader {
    fn write(&self, r: &mut PayloadOut) {
        let mut phys = self.dpa & DPA_MASK;
        if self.volatile {
            phys |= DPA_VOLATILE;
        }
        if self.not_repairable {
            phys |= DPA_NOT_REPAIRABLE;
        }
        r.u64(M_PHYS_ADDR, phys)
            .u8(M_DESCRIPTOR, self.descriptor)
            .u8(M_TYPE, self.event_type)
            .u8(M_TRANSACTION, self.transaction_type)
            .u16(M_VALIDITY, self.validity)
            .u8(M_CHANNEL, self.channel.unwrap_or(0))
            .u8(M_RANK, self.rank.unwrap_or(0));
    }
}

/// One encoded event record: UUID followed by the 112-byte event (`struct cxl_event_record_raw`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord(pub [u8; RECORD_SIZE]);

impl EventRecord {
    /// A record with the common header filled in except handle, severity and timestamp, which
    /// [`EventLogs::push`] stamps.
    fn start(uuid: &Uuid, flags: u32, maint_op_class: u8) -> PayloadOut {
        let mut r = PayloadOut::zeroed(RECORD_SIZE);
        r.put(0, uuid)
            .u8(R_LENGTH, RECORD_SIZE as u8)
            .u24(R_FLAGS, flags & 0x00ff_fffc)
            .u8(R_MAINT_OP_CLASS, maint_op_class);
        r
    }

    fn finish(out: PayloadOut) -> Self {
        let mut rec = [0u8; RECORD_SIZE];
        put_bytes(&mut rec, 0, &out.into_vec());
        Self(rec)
    }

    /// Encode a General Media Event Record. `volatile` is bit 0 of the Physical Address field.
    pub fn general_media(ev: &GeneralMediaEvent, volatile: bool) -> Self {
        let validity = u16::from(ev.channel.is_some())
            | u16::from(ev.rank.is_some()) << 1
            | u16::from(ev.device.is_some()) << 2
            | u16::from(ev.component_id.is_some()) << 3;
        let mut r = Self::start(&GENERAL_MEDIA_UUID, ev.flags, ev.maint_op_class);
        MediaHeader {
            dpa: ev.dpa,
            volatile,
            not_repairable: ev.not_repairable,
            descriptor: ev.descriptor,
            event_type: ev.event_type,
            transaction_type: ev.transaction_type,
            validity,
            channel: ev.channel,
            rank: ev.rank,
        }
        .write(&mut r);
        // struct cxl_event_gen_media after the media header: device[3], component_id[16].
        r.u24(M_END, ev.device.unwrap_or(0))
            .put(M_END + 3, &ev.component_id.unwrap_or_default());
        Self::finish(r)
    }

    /// Encode a DRAM Event Record.
    pub fn dram(ev: &DramEvent, volatile: bool) -> Self {
        let validity = u16::from(ev.channel.is_some())
            | u16::from(ev.rank.is_some()) << 1
            | u16::from(ev.nibble_mask.is_some()) << 2
            | u16::from(ev.bank_group.is_some()) << 3
            | u16::from(ev.bank.is_some()) << 4
            | u16::from(ev.row.is_some()) << 5
            | u16::from(ev.column.is_some()) << 6
            | u16::from(ev.correction_mask.is_some()) << 7
            | u16::from(ev.component_id.is_some()) << 8;
        let mut r = Self::start(&DRAM_UUID, ev.flags, ev.maint_op_class);
        MediaHeader {
            dpa: ev.dpa,
            volatile,
            not_repairable: ev.not_repairable,
            descriptor: ev.descriptor,
            event_type: ev.event_type,
            transaction_type: ev.transaction_type,
            validity,
            channel: ev.channel,
            rank: ev.rank,
        }
        .write(&mut r);
        // struct cxl_event_dram after the media header: nibble_mask[3], bank_group, bank,
        // row[3], column[2], correction_mask[32], component_id[16], sub_channel, ...
        r.u24(M_END, ev.nibble_mask.unwrap_or(0))
            .u8(M_END + 3, ev.bank_group.unwrap_or(0))
            .u8(M_END + 4, ev.bank.unwrap_or(0))
            .u24(M_END + 5, ev.row.unwrap_or(0))
            .u16(M_END + 8, ev.column.unwrap_or(0))
            .put(M_END + 10, &ev.correction_mask.unwrap_or([0; 32]))
            .put(M_END + 42, &ev.component_id.unwrap_or_default());
        Self::finish(r)
    }

    /// Encode a Memory Module Event Record.
    pub fn memory_module(ev: &MemoryModuleEvent) -> Self {
        let mut r = Self::start(&MEMORY_MODULE_UUID, ev.flags, ev.maint_op_class);
        // struct cxl_event_mem_module: event_type, health info[18], validity[2], component id.
        r.u8(R_DATA, ev.event_type)
            .put(R_DATA + 1, &ev.health.to_bytes())
            .u16(R_DATA + 19, u16::from(ev.component_id.is_some()))
            .put(R_DATA + 21, &ev.component_id.unwrap_or_default());
        Self::finish(r)
    }

    /// Record UUID.
    pub fn uuid(&self) -> Uuid {
        let mut u = [0u8; 16];
        put_bytes(&mut u, 0, self.0.get(..16).unwrap_or_default());
        u
    }

    /// Event Record Handle.
    pub fn handle(&self) -> u16 {
        let b = |i: usize| self.0.get(R_HANDLE + i).copied().unwrap_or(0);
        u16::from_le_bytes([b(0), b(1)])
    }

    /// Header flags (24 bits; bits [1:0] are the severity once stamped).
    pub fn flags(&self) -> u32 {
        let b = |i: usize| u32::from(self.0.get(R_FLAGS + i).copied().unwrap_or(0));
        b(0) | b(1) << 8 | b(2) << 16
    }

    fn stamp(&mut self, log: EventLogKind, handle: u16, timestamp: u64) {
        let flags = (self.flags() & !0x3) | log as u32;
        put_bytes(&mut self.0, R_FLAGS, &flags.to_le_bytes()[..3]);
        put_bytes(&mut self.0, R_HANDLE, &handle.to_le_bytes());
        put_bytes(&mut self.0, R_TIMESTAMP, &timestamp.to_le_bytes());
    }
}

/// Overflow state of one log (CXL 3.0 Table 8-50 fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overflow {
    /// Records dropped since the overflow began (saturating).
    pub count: u16,
    /// Device timestamp of the first dropped record.
    pub first_timestamp: u64,
    /// Device timestamp of the last dropped record.
    pub last_timestamp: u64,
}

#[derive(Debug, Clone)]
struct EventLog {
    records: VecDeque<EventRecord>,
    overflow: Option<Overflow>,
    /// Policy byte as the guest reads it back: mode in [1:0], message number in [7:4].
    setting: u8,
}

/// Summary of one log for the control API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLogReport {
    /// Which log.
    pub kind: EventLogKind,
    /// Records waiting for the host.
    pub pending: usize,
    /// Handles of the waiting records, oldest first.
    pub handles: Vec<u16>,
    /// Overflow state, if the log overflowed since the host last cleared records.
    pub overflow: Option<Overflow>,
    /// Interrupt setting byte the guest programmed.
    pub interrupt_setting: u8,
}

/// The device's four event logs plus interrupt policy.
#[derive(Debug, Clone)]
pub struct EventLogs {
    logs: [EventLog; 4],
    capacity: u16,
    next_handle: u16,
    msgnum: u8,
    pending_irq: [bool; 4],
}

impl EventLogs {
    /// Empty logs holding up to `capacity` records each; MSI/MSI-X events use `msgnum`.
    pub fn new(capacity: u16, msgnum: u8) -> Self {
        let log = EventLog {
            records: VecDeque::new(),
            overflow: None,
            setting: 0,
        };
        Self {
            logs: [log.clone(), log.clone(), log.clone(), log],
            capacity: capacity.max(1),
            next_handle: 1,
            msgnum: msgnum & 0xf,
            pending_irq: [false; 4],
        }
    }

    /// Records each log holds (Identify Memory Device event log sizes).
    pub fn capacity(&self) -> u16 {
        self.capacity
    }

    /// Set the message number reported for MSI/MSI-X policies (0..=15).
    pub fn set_msgnum(&mut self, msgnum: u8) {
        self.msgnum = msgnum & 0xf;
        for log in &mut self.logs {
            if log.setting & 0x3 == 1 {
                log.setting = 1 | (self.msgnum << 4);
            }
        }
    }

    fn log(&self, kind: EventLogKind) -> Option<&EventLog> {
        self.logs.get(kind.index())
    }

    fn log_mut(&mut self, kind: EventLogKind) -> Option<&mut EventLog> {
        self.logs.get_mut(kind.index())
    }

    fn alloc_handle(&mut self) -> u16 {
        // Handles are nonzero (0 means "no related record") and unique among stored records.
        loop {
            let h = self.next_handle;
            self.next_handle = match self.next_handle.wrapping_add(1) {
                0 => 1,
                n => n,
            };
            if !self
                .logs
                .iter()
                .any(|l| l.records.iter().any(|r| r.handle() == h))
            {
                return h;
            }
        }
    }

    /// Append `record` to `kind`, stamping handle, severity and `timestamp`. Returns the handle,
    /// or `None` if the log was full and the record was dropped (overflow recorded). Either way
    /// an interrupt is queued when the log's policy asks for MSI/MSI-X.
    pub fn push(
        &mut self,
        kind: EventLogKind,
        mut record: EventRecord,
        timestamp: u64,
    ) -> Option<u16> {
        let full = self
            .log(kind)
            .is_none_or(|l| l.records.len() >= usize::from(self.capacity));
        let result = if full {
            if let Some(log) = self.log_mut(kind) {
                let o = log.overflow.get_or_insert(Overflow {
                    count: 0,
                    first_timestamp: timestamp,
                    last_timestamp: timestamp,
                });
                o.count = o.count.saturating_add(1);
                o.last_timestamp = timestamp;
            }
            log::warn!("cxl: {kind:?} event log overflowed, record dropped");
            None
        } else {
            let handle = self.alloc_handle();
            record.stamp(kind, handle, timestamp);
            if let Some(log) = self.log_mut(kind) {
                log.records.push_back(record);
            }
            Some(handle)
        };
        if self.log(kind).is_some_and(|l| l.setting & 0x3 == 1)
            && let Some(p) = self.pending_irq.get_mut(kind.index())
        {
            *p = true;
        }
        result
    }

    /// Event Status register bits [3:0]: logs holding records (CXL 3.0 §8.2.8.3.1). Linux's
    /// `cxl_event_thread()` keeps draining while any of these bits is set.
    pub fn status(&self) -> u32 {
        EventLogKind::ALL
            .iter()
            .filter(|k| self.log(**k).is_some_and(|l| !l.records.is_empty()))
            .fold(0, |acc, k| acc | k.status_bit())
    }

    /// Next interrupt to deliver, oldest log number first.
    pub fn take_interrupt(&mut self) -> Option<EventInterrupt> {
        let idx = self.pending_irq.iter().position(|p| *p)?;
        if let Some(p) = self.pending_irq.get_mut(idx) {
            *p = false;
        }
        let log = EventLogKind::ALL.get(idx).copied()?;
        Some(EventInterrupt {
            log,
            msgnum: self.msgnum,
        })
    }

    /// Get Event Records (CXL 3.0 §8.2.9.2.2): as many of the oldest records as fit in
    /// `capacity` bytes, with the overflow and more-records flags. Records stay in the log until
    /// cleared.
    pub fn get_records(&self, input: &[u8], capacity: usize) -> (ReturnCode, Vec<u8>) {
        let [log_byte] = input else {
            return (ReturnCode::InvalidPayloadLength, Vec::new());
        };
        let Some(kind) = EventLogKind::from_u8(*log_byte) else {
            return (ReturnCode::InvalidInput, Vec::new());
        };
        let Some(log) = self.log(kind) else {
            return (ReturnCode::InternalError, Vec::new());
        };
        let Some(room) = capacity.checked_sub(GET_RECORDS_HEADER) else {
            return (ReturnCode::InternalError, Vec::new());
        };
        let n = log
            .records
            .len()
            .min(room / RECORD_SIZE)
            .min(usize::from(u16::MAX));
        let mut flags = 0;
        if log.overflow.is_some() {
            flags |= FLAG_OVERFLOW;
        }
        if n < log.records.len() {
            flags |= FLAG_MORE_RECORDS;
        }
        let o = log.overflow.unwrap_or_default();
        let mut out = PayloadOut::zeroed(GET_RECORDS_HEADER + n * RECORD_SIZE);
        out.u8(0, flags)
            .u16(2, o.count)
            .u64(4, o.first_timestamp)
            .u64(12, o.last_timestamp)
            .u16(20, n as u16);
        for (i, rec) in log.records.iter().take(n).enumerate() {
            out.put(GET_RECORDS_HEADER + i * RECORD_SIZE, &rec.0);
        }
        (ReturnCode::Success, out.into_vec())
    }

    /// Clear Event Records (CXL 3.0 §8.2.9.2.3). The handles must name the oldest records of the
    /// log in order (the spec requires temporal order and that no older record is left behind);
    /// otherwise nothing is cleared and Invalid Handle is returned. A successful clear also ends
    /// the log's overflow condition.
    pub fn clear(&mut self, input: &[u8]) -> ReturnCode {
        let (Some(&log_byte), Some(&flags), Some(&nr)) =
            (input.first(), input.get(1), input.get(2))
        else {
            return ReturnCode::InvalidPayloadLength;
        };
        let Some(handle_bytes) = input.get(CLEAR_HEADER..) else {
            return ReturnCode::InvalidPayloadLength;
        };
        if handle_bytes.len() != usize::from(nr) * 2 {
            return ReturnCode::InvalidPayloadLength;
        }
        let Some(kind) = EventLogKind::from_u8(log_byte) else {
            return ReturnCode::InvalidInput;
        };
        let Some(log) = self.log_mut(kind) else {
            return ReturnCode::InternalError;
        };
        if flags & CLEAR_ALL != 0 {
            if nr != 0 {
                return ReturnCode::InvalidInput;
            }
            log.records.clear();
            log.overflow = None;
            return ReturnCode::Success;
        }
        let handles = handle_bytes.chunks_exact(2).map(|c| {
            u16::from_le_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ])
        });
        let in_order = handles
            .clone()
            .zip(log.records.iter())
            .all(|(h, r)| h == r.handle())
            && usize::from(nr) <= log.records.len();
        if !in_order {
            return ReturnCode::InvalidHandle;
        }
        log.records.drain(..usize::from(nr));
        log.overflow = None;
        ReturnCode::Success
    }

    /// Get Event Interrupt Policy output (CXL 3.0 §8.2.9.2.4, `struct
    /// cxl_event_interrupt_policy`): one setting byte per log.
    pub fn policy(&self) -> Vec<u8> {
        self.logs.iter().map(|l| l.setting).collect()
    }

    /// Set Event Interrupt Policy (CXL 3.0 §8.2.9.2.5). Accepts the 4-byte CXL 2.0 payload and
    /// the 5-byte CXL 3.0 one (the Dynamic Capacity setting is ignored: no DCD). Message numbers
    /// written by the host are ignored; the device reports its own, as `cxl_event_irqsetup()`
    /// expects when it reads the policy back.
    pub fn set_policy(&mut self, input: &[u8]) -> ReturnCode {
        if input.len() != 4 && input.len() != 5 {
            return ReturnCode::InvalidPayloadLength;
        }
        let mut modes = [InterruptMode::None; 4];
        for (m, b) in modes.iter_mut().zip(input.iter()) {
            *m = match b & 0x3 {
                0 => InterruptMode::None,
                1 => InterruptMode::MsiMsix,
                2 => InterruptMode::Firmware,
                _ => return ReturnCode::InvalidInput,
            };
        }
        let msgnum = self.msgnum;
        for (log, m) in self.logs.iter_mut().zip(modes) {
            log.setting = match m {
                InterruptMode::None => 0,
                InterruptMode::MsiMsix => 1 | (msgnum << 4),
                InterruptMode::Firmware => 2,
            };
        }
        ReturnCode::Success
    }

    /// Reset the interrupt policy and pending interrupts (conventional reset); records stay.
    pub fn reset_policy(&mut self) {
        for log in &mut self.logs {
            log.setting = 0;
        }
        self.pending_irq = [false; 4];
    }

    /// Per-log summaries for the control API.
    pub fn report(&self) -> Vec<EventLogReport> {
        EventLogKind::ALL
            .iter()
            .zip(self.logs.iter())
            .map(|(kind, l)| EventLogReport {
                kind: *kind,
                pending: l.records.len(),
                handles: l.records.iter().map(EventRecord::handle).collect(),
                overflow: l.overflow,
                interrupt_setting: l.setting,
            })
            .collect()
    }
}
