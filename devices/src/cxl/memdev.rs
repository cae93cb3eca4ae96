//! The CXL Type 3 memory device's command set behind the primary mailbox.
//!
//! [`Memdev`] holds the device state the mailbox commands read and change — capacities, label
//! storage, event logs, poison list, timestamp, firmware and health information — and executes
//! one command per doorbell with [`Memdev::execute`]. It is pure: no KVM, no MMIO, no guest
//! memory (the one media write, Clear Poison's write data, goes through an optional
//! [`MediaBacking`]), so the register model owns the registers and this type can be fuzzed.
//!
//! What Linux sends, in `cxl_pci_probe()` order (`drivers/cxl/pci.c`):
//! 1. `cxl_enumerate_cmds()` — Get Supported Logs (0400h) then Get Log (0401h) of the Command
//!    Effects Log in payload-size chunks; only commands listed there are used later.
//! 2. `cxl_set_timestamp()` — Set Timestamp (0301h).
//! 3. `cxl_dev_state_identify()` — Identify Memory Device (4000h), at least 43h bytes.
//! 4. `cxl_mem_dpa_fetch()` (7.x) / `cxl_mem_create_range_info()` (6.12) — with Partition
//!    Alignment 0 the volatile and persistent capacities are taken as-is, without Get Partition
//!    Info.
//! 5. `cxl_event_config()` — with native CXL error control and MSI/MSI-X: Get/Set Event
//!    Interrupt Policy (0102h/0103h), then Get/Clear Event Records (0100h/0101h) for every log.
//! 6. `cxl_nvdimm_probe()` (`drivers/cxl/pmem.c`) — Set Shutdown State (4204h), then
//!    Get LSA/Set LSA (4102h/4103h) through the nvdimm label code.
//!
//! Poison: `cxl_trigger_poison_list()` / `cxl_inject_poison()` / `cxl_clear_poison()`
//! (`drivers/cxl/core/memdev.c`) send Get Poison List / Inject Poison / Clear Poison
//! (4300h–4302h). Health: Get Health Info (4200h) from `cxl_get_dirty_count()` and ndctl.

#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::events::{
    DEFAULT_LOG_CAPACITY, DramEvent, EventInterrupt, EventLogKind, EventLogReport, EventLogs,
    EventRecord, GeneralMediaEvent, MemoryModuleEvent,
};
use super::lsa::{LabelStorage, MAX_LSA_SIZE, MIN_LSA_SIZE};
use super::mailbox::{
    CEL_UUID, CelEntry, MAX_PAYLOAD_SIZE, PayloadIn, PayloadOut, ReturnCode, effect, opcode,
};
use super::poison::{
    DEFAULT_MAX_RECORDS, POISON_GRANULE, PoisonInsertError, PoisonList, PoisonRange, PoisonSource,
};

/// Capacities are reported in multiples of 256 MiB (`CXL_CAPACITY_MULTIPLIER`, CXL 3.0
/// §8.2.9.8.1.1).
pub const CAPACITY_MULTIPLIER: u64 = 256 << 20;

/// Firmware revision reported by Identify and Get FW Info (16 ASCII bytes, NUL padded).
pub const FW_REVISION: [u8; 16] = *b"vmm-cxl-t3 0.1\0\0";

/// Size of the Identify Memory Device output (CXL 2.0 layout, `struct cxl_mbox_identify`).
pub const IDENTIFY_SIZE: usize = 0x43;

/// Default Inject Poison Limit (Identify): injected records the device tracks at once.
pub const DEFAULT_INJECT_POISON_LIMIT: u16 = 64;

/// Default MSI/MSI-X message number reported for event interrupts.
pub const DEFAULT_EVENT_MSGNUM: u8 = 0;

/// Memory Event Type "Invalid Address" is 01h; Transaction Type "Host Inject Poison" is 04h
/// (CXL 3.0 Table 8-43; `CXL_GMER_TRANS_HOST_INJECT_POISON`).
const GMER_TRANS_HOST_INJECT_POISON: u8 = 0x04;

/// Configuration of one memory device.
pub struct MemdevConfig {
    /// Volatile-only capacity in bytes (multiple of 256 MiB); DPA `0..volatile_bytes`.
    pub volatile_bytes: u64,
    /// Persistent-only capacity in bytes (multiple of 256 MiB); DPA follows the volatile part.
    pub persistent_bytes: u64,
    /// Label storage area; required when `persistent_bytes > 0` (nvdimm labels live there).
    pub lsa: Option<Box<dyn LabelStorage>>,
    /// Device serial number (also the PCIe DSN the register model exposes).
    pub serial: u64,
    /// Name used in logs and the control API.
    pub id: String,
}

impl Default for MemdevConfig {
    fn default() -> Self {
        Self {
            volatile_bytes: 0,
            persistent_bytes: 0,
            lsa: None,
            serial: 0,
            id: String::from("cxl-mem0"),
        }
    }
}

impl fmt::Debug for MemdevConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemdevConfig")
            .field("volatile_bytes", &self.volatile_bytes)
            .field("persistent_bytes", &self.persistent_bytes)
            .field("lsa_size", &self.lsa.as_ref().map(|l| l.size()))
            .field("serial", &self.serial)
            .field("id", &self.id)
            .finish()
    }
}

/// Errors from configuring the device or from the control API.
#[derive(Debug, thiserror::Error)]
pub enum MemdevError {
    /// A capacity is not a multiple of 256 MiB.
    #[error("{what} capacity {bytes:#x} is not a multiple of 256 MiB")]
    CapacityAlignment {
        /// "volatile" or "persistent".
        what: &'static str,
        /// The configured value.
        bytes: u64,
    },
    /// Both capacities are zero, or their sum overflows.
    #[error("invalid device capacity (volatile {volatile:#x}, persistent {persistent:#x})")]
    BadCapacity {
        /// Volatile bytes.
        volatile: u64,
        /// Persistent bytes.
        persistent: u64,
    },
    /// Persistent capacity without a label storage area (Linux's nvdimm label code fails).
    #[error("persistent capacity needs a label storage area (lsa)")]
    PmemWithoutLsa,
    /// The label storage area has an unusable size.
    #[error("label storage area of {size} bytes is outside {min}..={max}")]
    LsaSize {
        /// Configured size.
        size: usize,
        /// Minimum.
        min: usize,
        /// Maximum.
        max: usize,
    },
    /// A DPA range is not 64-byte aligned or is empty.
    #[error("DPA {dpa:#x} length {length:#x}: must be 64-byte aligned and non-empty")]
    Misaligned {
        /// Start.
        dpa: u64,
        /// Length in bytes.
        length: u64,
    },
    /// A DPA range lies (partly) outside the device.
    #[error("DPA {dpa:#x} length {length:#x} is outside the device's {total:#x} bytes")]
    DpaOutOfRange {
        /// Start.
        dpa: u64,
        /// Length in bytes.
        length: u64,
        /// Device capacity.
        total: u64,
    },
    /// The poison list is full: the range was not recorded; the list's overflow flag and
    /// timestamp are set, as on a device that lost track of a media error.
    #[error("poison list full ({max} records): overflow recorded, range not listed")]
    PoisonListOverflow {
        /// Maximum records.
        max: u32,
    },
    /// The event log is full: the record was dropped and the overflow counters advanced.
    #[error("{0:?} event log full: overflow recorded, record dropped")]
    EventLogOverflow(EventLogKind),
    /// MSI/MSI-X message numbers are 4 bits.
    #[error("event interrupt message number {0} is not below 16")]
    InvalidMsgnum(u8),
}

/// Device health — Get Health Info output (CXL 3.0 §8.2.9.8.3.1,
/// `struct cxl_mbox_get_health_info_out`, 12h bytes); also embedded in Memory Module events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthInfo {
    /// Health Status (bit 0 maintenance needed, bit 1 performance degraded, bit 2 hardware
    /// replacement needed).
    pub health_status: u8,
    /// Media Status (0 normal, 1 not ready, 2 write persistency lost, 3 all data lost, ...).
    pub media_status: u8,
    /// Additional Status (life used / temperature / error-count warning bits).
    pub additional_status: u8,
    /// Life used, percent.
    pub life_used: u8,
    /// Device temperature, degrees Celsius.
    pub temperature: i16,
    /// Dirty shutdown count.
    pub dirty_shutdown_count: u32,
    /// Corrected volatile error count.
    pub corrected_volatile_errors: u32,
    /// Corrected persistent error count.
    pub corrected_persistent_errors: u32,
}

impl Default for HealthInfo {
    fn default() -> Self {
        Self {
            health_status: 0,
            media_status: 0,
            additional_status: 0,
            life_used: 0,
            temperature: 35,
            dirty_shutdown_count: 0,
            corrected_volatile_errors: 0,
            corrected_persistent_errors: 0,
        }
    }
}

impl HealthInfo {
    /// Encoded size.
    pub const SIZE: usize = 0x12;

    /// Little-endian encoding.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = PayloadOut::zeroed(Self::SIZE);
        out.u8(0, self.health_status)
            .u8(1, self.media_status)
            .u8(2, self.additional_status)
            .u8(3, self.life_used)
            .put(4, &self.temperature.to_le_bytes())
            .u32(6, self.dirty_shutdown_count)
            .u32(10, self.corrected_volatile_errors)
            .u32(14, self.corrected_persistent_errors);
        let mut b = [0u8; Self::SIZE];
        super::mailbox::put_bytes(&mut b, 0, &out.into_vec());
        b
    }
}

/// Where Clear Poison's 64 bytes of write data go: the device's media at a DPA. The register
/// model implements it over the backing memory; without one the data is dropped.
pub trait MediaBacking: Send {
    /// Write `data` at device physical address `dpa`.
    fn write(&mut self, dpa: u64, data: &[u8]) -> io::Result<()>;
}

/// Plain snapshot of the device for the control API (`vmm ctl`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemdevReport {
    /// Device name.
    pub id: String,
    /// Serial number.
    pub serial: u64,
    /// Volatile capacity, bytes.
    pub volatile_bytes: u64,
    /// Persistent capacity, bytes.
    pub persistent_bytes: u64,
    /// Label storage size, bytes (0 without LSA).
    pub lsa_size: usize,
    /// Poisoned ranges, lowest DPA first.
    pub poison: Vec<PoisonRange>,
    /// Device timestamp at which the poison list overflowed.
    pub poison_overflow: Option<u64>,
    /// Event logs.
    pub events: Vec<EventLogReport>,
    /// Health information.
    pub health: HealthInfo,
    /// Current device timestamp (0 until the host sets it).
    pub timestamp: u64,
    /// Shutdown state (1 = dirty, armed by Linux's `cxl_arm_dirty_shutdown()`).
    pub shutdown_state: u8,
}

/// Commands in the Command Effects Log: opcode, effect, needs an LSA.
const COMMANDS: &[(u16, u16, bool)] = &[
    (opcode::GET_EVENT_RECORDS, 0, false),
    (
        opcode::CLEAR_EVENT_RECORDS,
        effect::IMMEDIATE_LOG_CHANGE,
        false,
    ),
    (opcode::GET_EVT_INT_POLICY, 0, false),
    (
        opcode::SET_EVT_INT_POLICY,
        effect::IMMEDIATE_POLICY_CHANGE,
        false,
    ),
    (opcode::GET_FW_INFO, 0, false),
    (opcode::GET_TIMESTAMP, 0, false),
    (
        opcode::SET_TIMESTAMP,
        effect::IMMEDIATE_POLICY_CHANGE,
        false,
    ),
    (opcode::GET_SUPPORTED_LOGS, 0, false),
    (opcode::GET_LOG, 0, false),
    (opcode::IDENTIFY, 0, false),
    (opcode::GET_PARTITION_INFO, 0, false),
    (opcode::GET_LSA, 0, true),
    (opcode::SET_LSA, effect::IMMEDIATE_CONFIG_CHANGE, true),
    (opcode::GET_HEALTH_INFO, 0, false),
    (opcode::GET_SHUTDOWN_STATE, 0, false),
    (
        opcode::SET_SHUTDOWN_STATE,
        effect::IMMEDIATE_POLICY_CHANGE,
        false,
    ),
    (opcode::GET_POISON_LIST, 0, false),
    (opcode::INJECT_POISON, effect::IMMEDIATE_DATA_CHANGE, false),
    (opcode::CLEAR_POISON, effect::IMMEDIATE_DATA_CHANGE, false),
    (opcode::GET_SECURITY_STATE, 0, false),
];

type Reply = (ReturnCode, Vec<u8>);

fn ok(out: Vec<u8>) -> Reply {
    (ReturnCode::Success, out)
}

fn err(rc: ReturnCode) -> Reply {
    (rc, Vec::new())
}

/// The CXL Type 3 memory device's state and mailbox command set.
pub struct Memdev {
    id: String,
    serial: u64,
    volatile_bytes: u64,
    persistent_bytes: u64,
    lsa: Option<Box<dyn LabelStorage>>,
    events: EventLogs,
    poison: PoisonList,
    inject_poison_limit: u16,
    poison_inject_event: bool,
    health: HealthInfo,
    shutdown_state: u8,
    /// (host timestamp, clock reading) of the last Set Timestamp.
    timestamp_base: Option<(u64, u64)>,
    clock: Box<dyn Fn() -> u64 + Send>,
    media: Option<Box<dyn MediaBacking>>,
    irq_sink: Option<Box<dyn FnMut(EventInterrupt) + Send>>,
}

impl fmt::Debug for Memdev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memdev")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("volatile_bytes", &self.volatile_bytes)
            .field("persistent_bytes", &self.persistent_bytes)
            .field("lsa_size", &self.lsa_size())
            .field("poison_ranges", &self.poison.len())
            .finish_non_exhaustive()
    }
}

impl Memdev {
    /// Build a device. Capacities must be multiples of 256 MiB, not both zero; persistent
    /// capacity requires an LSA of at least 1 KiB (128 KiB recommended).
    pub fn new(cfg: MemdevConfig) -> Result<Self, MemdevError> {
        for (what, bytes) in [
            ("volatile", cfg.volatile_bytes),
            ("persistent", cfg.persistent_bytes),
        ] {
            if !bytes.is_multiple_of(CAPACITY_MULTIPLIER) {
                return Err(MemdevError::CapacityAlignment { what, bytes });
            }
        }
        let bad = MemdevError::BadCapacity {
            volatile: cfg.volatile_bytes,
            persistent: cfg.persistent_bytes,
        };
        match cfg.volatile_bytes.checked_add(cfg.persistent_bytes) {
            None | Some(0) => return Err(bad),
            Some(_) => {}
        }
        if cfg.persistent_bytes > 0 && cfg.lsa.is_none() {
            return Err(MemdevError::PmemWithoutLsa);
        }
        if let Some(lsa) = &cfg.lsa {
            let size = lsa.size();
            if !(MIN_LSA_SIZE..=MAX_LSA_SIZE).contains(&size) {
                return Err(MemdevError::LsaSize {
                    size,
                    min: MIN_LSA_SIZE,
                    max: MAX_LSA_SIZE,
                });
            }
        }
        let start = Instant::now();
        Ok(Self {
            id: cfg.id,
            serial: cfg.serial,
            volatile_bytes: cfg.volatile_bytes,
            persistent_bytes: cfg.persistent_bytes,
            lsa: cfg.lsa,
            events: EventLogs::new(DEFAULT_LOG_CAPACITY, DEFAULT_EVENT_MSGNUM),
            poison: PoisonList::new(DEFAULT_MAX_RECORDS),
            inject_poison_limit: DEFAULT_INJECT_POISON_LIMIT,
            poison_inject_event: false,
            health: HealthInfo::default(),
            shutdown_state: 0,
            timestamp_base: None,
            clock: Box::new(move || u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)),
            media: None,
            irq_sink: None,
        })
    }

    /// Device name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Serial number.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// Volatile capacity (DPA `0..volatile_bytes`).
    pub fn volatile_bytes(&self) -> u64 {
        self.volatile_bytes
    }

    /// Persistent capacity (DPA `volatile_bytes..total_bytes`).
    pub fn persistent_bytes(&self) -> u64 {
        self.persistent_bytes
    }

    /// Total capacity.
    pub fn total_bytes(&self) -> u64 {
        self.volatile_bytes.saturating_add(self.persistent_bytes)
    }

    /// Label storage size (0 without LSA).
    pub fn lsa_size(&self) -> usize {
        self.lsa.as_ref().map_or(0, |l| l.size())
    }

    /// Health information reported by Get Health Info.
    pub fn health(&self) -> HealthInfo {
        self.health
    }

    /// Replace the health information (control API).
    pub fn set_health(&mut self, health: HealthInfo) {
        self.health = health;
    }

    /// Install the media writer used by Clear Poison.
    pub fn set_media_backing(&mut self, media: Option<Box<dyn MediaBacking>>) {
        self.media = media;
    }

    /// Replace the monotonic nanosecond clock behind the timestamp (tests, replay).
    pub fn set_clock(&mut self, clock: Box<dyn Fn() -> u64 + Send>) {
        self.clock = clock;
    }

    /// Message number (MSI/MSI-X vector index, 0..=15) the device reports for event
    /// interrupts; must be one the register model's MSI/MSI-X table can deliver.
    pub fn set_event_msgnum(&mut self, msgnum: u8) -> Result<(), MemdevError> {
        if msgnum > 0xf {
            return Err(MemdevError::InvalidMsgnum(msgnum));
        }
        self.events.set_msgnum(msgnum);
        Ok(())
    }

    /// Whether Inject Poison from the mailbox also logs a General Media event (Informational
    /// log, transaction type "host inject poison"). Off by default: Linux traces `cxl_poison`
    /// itself when it injects and does not expect a device event.
    pub fn set_poison_inject_event(&mut self, enabled: bool) {
        self.poison_inject_event = enabled;
    }

    /// The Command Effects Log this device returns.
    pub fn cel(&self) -> Vec<CelEntry> {
        let has_lsa = self.lsa.is_some();
        COMMANDS
            .iter()
            .filter(|(_, _, needs_lsa)| has_lsa || !needs_lsa)
            .map(|&(opcode, effect, _)| CelEntry { opcode, effect })
            .collect()
    }

    fn cel_bytes(&self) -> Vec<u8> {
        self.cel().iter().flat_map(|e| e.to_bytes()).collect()
    }

    /// Current device timestamp: the last Set Timestamp value plus the nanoseconds elapsed
    /// since, or 0 if the host never set it (CXL 3.0 §8.2.9.4.1).
    pub fn timestamp(&self) -> u64 {
        match self.timestamp_base {
            None => 0,
            Some((host, at)) => host.wrapping_add((self.clock)().saturating_sub(at)),
        }
    }

    /// Event Status register value (CXL 3.0 §8.2.8.3.1): bit n set while log n holds records.
    pub fn event_status(&self) -> u32 {
        self.events.status()
    }

    /// Next event interrupt the register model must raise (a record arrived in a log whose
    /// policy is MSI/MSI-X). Call after [`Memdev::execute`] and after every `inject_*` until it
    /// returns `None`. Unused when an interrupt sink is installed.
    pub fn take_event_interrupt(&mut self) -> Option<EventInterrupt> {
        self.events.take_interrupt()
    }

    /// Push model for event interrupts: `sink` receives every [`EventInterrupt`] as soon as the
    /// record arrives — at the end of [`Memdev::execute`] and of each `inject_*` call (the
    /// control API injects from outside any doorbell). Typically
    /// `Box::new(move |irq| { irqs.trigger(irq.msgnum.into()); })` with the function's
    /// `FunctionInterrupts`. The sink runs while the caller holds whatever lock guards this
    /// `Memdev`, so it must not take that lock. Interrupts queued before the sink was installed
    /// are delivered now.
    pub fn set_event_interrupt_sink(
        &mut self,
        sink: Option<Box<dyn FnMut(EventInterrupt) + Send>>,
    ) {
        self.irq_sink = sink;
        self.deliver_interrupts();
    }

    fn deliver_interrupts(&mut self) {
        if let Some(sink) = self.irq_sink.as_mut() {
            while let Some(irq) = self.events.take_interrupt() {
                log::debug!("cxl {}: event interrupt {irq:?}", self.id);
                sink(irq);
            }
        }
    }

    /// Conventional reset: interrupt policy, pending interrupts, timestamp and any pending
    /// poison-list continuation are reset. Event records, poison, LSA and health persist.
    pub fn reset(&mut self) {
        self.events.reset_policy();
        self.poison.reset_cursor();
        self.timestamp_base = None;
    }

    /// Execute one mailbox command (CXL 2.0 §8.2.8.4 doorbell → §8.2.9 command).
    ///
    /// `payload_in` is exactly what the guest placed in the payload registers, with the length
    /// it wrote to the Command register; `payload_capacity` is the payload area size the
    /// Mailbox Capabilities register advertises. Returns the return code and the output
    /// payload — empty unless the code is Success, never longer than `payload_capacity`.
    /// Total: any input yields a reply, never a panic.
    pub fn execute(&mut self, opcode: u16, payload_in: &[u8], payload_capacity: usize) -> Reply {
        let cap = payload_capacity.min(MAX_PAYLOAD_SIZE);
        let (rc, out) = self.dispatch(opcode, PayloadIn(payload_in), cap);
        let reply = if !rc.is_success() {
            (rc, Vec::new())
        } else if out.len() > cap {
            log::error!(
                "cxl {}: opcode {opcode:#06x} output {} exceeds payload {cap}",
                self.id,
                out.len()
            );
            err(ReturnCode::InternalError)
        } else {
            (rc, out)
        };
        self.deliver_interrupts();
        log::debug!(
            "cxl {}: opcode {opcode:#06x} in {} bytes -> {:?}, out {} bytes",
            self.id,
            payload_in.len(),
            reply.0,
            reply.1.len()
        );
        reply
    }

    fn dispatch(&mut self, op: u16, input: PayloadIn<'_>, cap: usize) -> Reply {
        // Fixed-size inputs: any other length is Invalid Payload Length (16h).
        let want = |n: usize| -> Result<(), ReturnCode> {
            if input.len() == n {
                Ok(())
            } else {
                Err(ReturnCode::InvalidPayloadLength)
            }
        };
        let fixed = |n: usize, out: Vec<u8>| -> Reply {
            match want(n) {
                Ok(()) => ok(out),
                Err(rc) => err(rc),
            }
        };
        match op {
            opcode::GET_EVENT_RECORDS => self.events.get_records(input.0, cap),
            opcode::CLEAR_EVENT_RECORDS => err(self.events.clear(input.0)),
            opcode::GET_EVT_INT_POLICY => fixed(0, self.events.policy()),
            opcode::SET_EVT_INT_POLICY => err(self.events.set_policy(input.0)),
            opcode::GET_FW_INFO => fixed(0, Self::fw_info()),
            opcode::GET_TIMESTAMP => fixed(0, self.timestamp().to_le_bytes().to_vec()),
            opcode::SET_TIMESTAMP => match (want(8), input.u64(0)) {
                (Ok(()), Some(ts)) => {
                    self.timestamp_base = Some((ts, (self.clock)()));
                    ok(Vec::new())
                }
                _ => err(ReturnCode::InvalidPayloadLength),
            },
            opcode::GET_SUPPORTED_LOGS => fixed(0, self.supported_logs()),
            opcode::GET_LOG => self.get_log(input, cap),
            opcode::IDENTIFY => fixed(0, self.identify()),
            opcode::GET_PARTITION_INFO => fixed(0, self.partition_info()),
            opcode::GET_LSA if self.lsa.is_some() => self.get_lsa(input, cap),
            opcode::SET_LSA if self.lsa.is_some() => self.set_lsa(input),
            opcode::GET_HEALTH_INFO => fixed(0, self.health.to_bytes().to_vec()),
            opcode::GET_SHUTDOWN_STATE => fixed(0, vec![self.shutdown_state]),
            opcode::SET_SHUTDOWN_STATE => match (want(1), input.u8(0)) {
                (Ok(()), Some(state)) => {
                    self.shutdown_state = state & 1;
                    ok(Vec::new())
                }
                _ => err(ReturnCode::InvalidPayloadLength),
            },
            opcode::GET_POISON_LIST => self.get_poison_list(input, cap),
            opcode::INJECT_POISON => self.mbox_inject_poison(input),
            opcode::CLEAR_POISON => self.mbox_clear_poison(input),
            // Get Security State: no passphrase set, not locked or frozen (`struct
            // cxl_get_security_output`, read by `cxl_pmem_get_security_flags()`).
            opcode::GET_SECURITY_STATE => fixed(0, vec![0; 4]),
            _ => err(ReturnCode::Unsupported),
        }
    }

    /// Get Supported Logs output (CXL 3.0 §8.2.9.5.1, `struct cxl_mbox_get_supported_logs`):
    /// one entry, the CEL.
    fn supported_logs(&self) -> Vec<u8> {
        let cel_size = self.cel().len() * CelEntry::SIZE;
        let mut out = PayloadOut::zeroed(8 + 20);
        out.u16(0, 1)
            .put(8, &CEL_UUID)
            .u32(24, u32::try_from(cel_size).unwrap_or(u32::MAX));
        out.into_vec()
    }

    /// Get Log (CXL 3.0 §8.2.9.5.2, `struct cxl_mbox_get_log`: UUID, offset, length). Returns
    /// `length` bytes from `offset`, fewer at the end of the log (`cxl_xfer_log()` accepts a
    /// short final chunk).
    fn get_log(&self, input: PayloadIn<'_>, cap: usize) -> Reply {
        let (Some(uuid), Some(offset), Some(length), 0x18) = (
            input.array::<16>(0),
            input.u32(16),
            input.u32(20),
            input.len(),
        ) else {
            return err(ReturnCode::InvalidPayloadLength);
        };
        if uuid != CEL_UUID {
            return err(ReturnCode::Unsupported);
        }
        let (offset, length) = (offset as usize, length as usize);
        let log = self.cel_bytes();
        if length > cap || offset > log.len() {
            return err(ReturnCode::InvalidInput);
        }
        let end = offset.saturating_add(length).min(log.len());
        ok(log.get(offset..end).unwrap_or_default().to_vec())
    }

    /// Get FW Info output (CXL 3.0 §8.2.9.3.1, `struct cxl_mbox_get_fw_info`, 50h bytes): two
    /// slots, slot 1 active, no live activation. Linux (`cxl_mem_get_fw_info()`) registers a
    /// firmware-upload device; Transfer FW then answers Unsupported.
    fn fw_info() -> Vec<u8> {
        let mut out = PayloadOut::zeroed(0x50);
        out.u8(0, 2).u8(1, 1).put(0x10, &FW_REVISION);
        out.into_vec()
    }

    /// Identify Memory Device output (CXL 3.0 §8.2.9.8.1.1, CXL 2.0 layout of 43h bytes as in
    /// `struct cxl_mbox_identify`). Partition Alignment is 0: not partitionable, so Linux skips
    /// Get Partition Info (`cxl_mem_dpa_fetch()`).
    fn identify(&self) -> Vec<u8> {
        let units = |b: u64| b / CAPACITY_MULTIPLIER;
        let log_size = self.events.capacity();
        let mut out = PayloadOut::zeroed(IDENTIFY_SIZE);
        out.put(0, &FW_REVISION)
            .u64(0x10, units(self.total_bytes()))
            .u64(0x18, units(self.volatile_bytes))
            .u64(0x20, units(self.persistent_bytes))
            .u64(0x28, 0)
            .u16(0x30, log_size)
            .u16(0x32, log_size)
            .u16(0x34, log_size)
            .u16(0x36, log_size)
            .u32(0x38, u32::try_from(self.lsa_size()).unwrap_or(u32::MAX))
            .u24(0x3c, self.poison.max_records())
            .u16(0x3f, self.inject_poison_limit)
            .u8(0x41, 0) // poison caps: injected poison is not persistent, no scan media
            .u8(0x42, 0); // QoS telemetry caps
        out.into_vec()
    }

    /// Get Partition Info output (CXL 3.0 §8.2.9.8.2.1, `struct cxl_mbox_get_partition_info`):
    /// the active split equals the fixed capacities; nothing pending.
    fn partition_info(&self) -> Vec<u8> {
        let mut out = PayloadOut::zeroed(0x20);
        out.u64(0, self.volatile_bytes / CAPACITY_MULTIPLIER)
            .u64(8, self.persistent_bytes / CAPACITY_MULTIPLIER);
        out.into_vec()
    }

    /// `offset..offset+length` inside the LSA, as usizes.
    fn lsa_range(&self, offset: u32, length: usize) -> Option<(usize, usize)> {
        let off = offset as usize;
        let end = off.checked_add(length)?;
        (end <= self.lsa_size()).then_some((off, length))
    }

    /// Get LSA (CXL 3.0 §8.2.9.8.2.3, `struct cxl_mbox_get_lsa`). Linux
    /// (`cxl_pmem_get_config_data()`) expects exactly `length` bytes back.
    fn get_lsa(&mut self, input: PayloadIn<'_>, cap: usize) -> Reply {
        let (Some(offset), Some(length), 8) = (input.u32(0), input.u32(4), input.len()) else {
            return err(ReturnCode::InvalidPayloadLength);
        };
        let length = length as usize;
        if length > cap {
            return err(ReturnCode::InvalidInput);
        }
        let Some((off, len)) = self.lsa_range(offset, length) else {
            return err(ReturnCode::InvalidInput);
        };
        let Some(lsa) = self.lsa.as_mut() else {
            return err(ReturnCode::Unsupported);
        };
        let mut buf = vec![0u8; len];
        match lsa.read(off, &mut buf) {
            Ok(()) => ok(buf),
            Err(e) => {
                log::error!("cxl {}: LSA read {off:#x}+{len:#x}: {e}", self.id);
                err(ReturnCode::InternalError)
            }
        }
    }

    /// Set LSA (CXL 3.0 §8.2.9.8.2.4, `struct cxl_mbox_set_lsa`: offset, reserved, data), as
    /// sent by `cxl_pmem_set_config_data()`. Durable before Success is returned.
    fn set_lsa(&mut self, input: PayloadIn<'_>) -> Reply {
        let (Some(offset), Some(data)) = (input.u32(0), input.tail(8)) else {
            return err(ReturnCode::InvalidPayloadLength);
        };
        let Some((off, _)) = self.lsa_range(offset, data.len()) else {
            return err(ReturnCode::InvalidInput);
        };
        let Some(lsa) = self.lsa.as_mut() else {
            return err(ReturnCode::Unsupported);
        };
        match lsa.write(off, data) {
            Ok(()) => ok(Vec::new()),
            Err(e) => {
                log::error!("cxl {}: LSA write {off:#x}+{:#x}: {e}", self.id, data.len());
                err(ReturnCode::InternalError)
            }
        }
    }

    /// Validate a 64-byte aligned DPA range for the control API.
    fn check_dpa_range(&self, dpa: u64, length: u64) -> Result<u64, MemdevError> {
        if length == 0
            || !dpa.is_multiple_of(POISON_GRANULE)
            || !length.is_multiple_of(POISON_GRANULE)
        {
            return Err(MemdevError::Misaligned { dpa, length });
        }
        match dpa.checked_add(length) {
            Some(end) if end <= self.total_bytes() => Ok(end),
            _ => Err(MemdevError::DpaOutOfRange {
                dpa,
                length,
                total: self.total_bytes(),
            }),
        }
    }

    /// Mailbox poison address: bits [5:0] must be clear (Invalid Input), the DPA inside the
    /// device (Invalid Physical Address, which Linux maps to -EFAULT).
    fn mbox_poison_dpa(&self, addr: u64) -> Result<u64, ReturnCode> {
        if !addr.is_multiple_of(POISON_GRANULE) {
            return Err(ReturnCode::InvalidInput);
        }
        match addr.checked_add(POISON_GRANULE) {
            Some(end) if end <= self.total_bytes() => Ok(addr),
            _ => Err(ReturnCode::InvalidPhysicalAddress),
        }
    }

    /// Get Poison List (CXL 3.0 §8.2.9.8.4.1; `struct cxl_mbox_poison_in`: DPA, length in
    /// 64-byte units). Linux asks per partition or per endpoint decoder range
    /// (`cxl_mem_get_poison()`) and repeats the request while the More flag is set.
    fn get_poison_list(&mut self, input: PayloadIn<'_>, cap: usize) -> Reply {
        let (Some(start), Some(units), 0x10) = (input.u64(0), input.u64(8), input.len()) else {
            return err(ReturnCode::InvalidPayloadLength);
        };
        if !start.is_multiple_of(POISON_GRANULE) {
            return err(ReturnCode::InvalidInput);
        }
        let end = units
            .checked_mul(POISON_GRANULE)
            .and_then(|len| start.checked_add(len));
        match end {
            Some(end) if end <= self.total_bytes() => ok(self.poison.get_list(start, end, cap)),
            _ => err(ReturnCode::InvalidPhysicalAddress),
        }
    }

    /// Inject Poison (CXL 3.0 §8.2.9.8.4.2; `struct cxl_mbox_inject_poison`), as sent by
    /// `cxl_inject_poison_locked()` (debugfs `inject_poison`). Poisons 64 bytes at the DPA; the
    /// record's source is "injected". Re-injecting an injected location is a no-op success.
    fn mbox_inject_poison(&mut self, input: PayloadIn<'_>) -> Reply {
        let (Some(addr), 8) = (input.u64(0), input.len()) else {
            return err(ReturnCode::InvalidPayloadLength);
        };
        let dpa = match self.mbox_poison_dpa(addr) {
            Ok(d) => d,
            Err(rc) => return err(rc),
        };
        let end = dpa + POISON_GRANULE;
        let already = self.poison.ranges().iter().any(|r| {
            r.source == PoisonSource::Injected
                && r.dpa <= dpa
                && r.dpa.saturating_add(r.length) >= end
        });
        if already {
            return ok(Vec::new());
        }
        if self.poison.injected_count() >= usize::from(self.inject_poison_limit) {
            return err(ReturnCode::InjectPoisonLimitReached);
        }
        let ts = self.timestamp();
        if let Err(PoisonInsertError::Overflow) =
            self.poison.insert(dpa, end, PoisonSource::Injected, ts)
        {
            return err(ReturnCode::InjectPoisonLimitReached);
        }
        if self.poison_inject_event {
            let ev = GeneralMediaEvent {
                dpa,
                transaction_type: GMER_TRANS_HOST_INJECT_POISON,
                ..GeneralMediaEvent::default()
            };
            let rec = EventRecord::general_media(&ev, dpa < self.volatile_bytes);
            self.events.push(EventLogKind::Informational, rec, ts);
        }
        ok(Vec::new())
    }

    /// Clear Poison (CXL 3.0 §8.2.9.8.4.3; `struct cxl_mbox_clear_poison`: DPA + 64 bytes of
    /// write data), as sent by `cxl_clear_poison_locked()`. The write data replaces the 64
    /// bytes at the DPA (through [`MediaBacking`]) whether or not the location was poisoned.
    fn mbox_clear_poison(&mut self, input: PayloadIn<'_>) -> Reply {
        let (Some(addr), Some(data), 0x48) = (input.u64(0), input.tail(8), input.len()) else {
            return err(ReturnCode::InvalidPayloadLength);
        };
        let dpa = match self.mbox_poison_dpa(addr) {
            Ok(d) => d,
            Err(rc) => return err(rc),
        };
        if let Some(media) = self.media.as_mut()
            && let Err(e) = media.write(dpa, data)
        {
            log::error!("cxl {}: clear poison write at {dpa:#x}: {e}", self.id);
            return err(ReturnCode::InternalError);
        }
        self.poison.remove(dpa, dpa + POISON_GRANULE);
        ok(Vec::new())
    }

    /// Control API: mark `dpa..dpa+length` poisoned as a device-detected media error
    /// (source "internal"), as QEMU's `cxl-inject-poison` does. Both must be 64-byte aligned.
    pub fn inject_poison(&mut self, dpa: u64, length: u64) -> Result<(), MemdevError> {
        let end = self.check_dpa_range(dpa, length)?;
        let ts = self.timestamp();
        self.poison
            .insert(dpa, end, PoisonSource::Internal, ts)
            .map_err(
                |PoisonInsertError::Overflow| MemdevError::PoisonListOverflow {
                    max: self.poison.max_records(),
                },
            )
    }

    /// Control API: remove `dpa..dpa+length` from the poison list (no media write).
    pub fn clear_poison(&mut self, dpa: u64, length: u64) -> Result<(), MemdevError> {
        let end = self.check_dpa_range(dpa, length)?;
        self.poison.remove(dpa, end);
        Ok(())
    }

    fn push_event(&mut self, log: EventLogKind, rec: EventRecord) -> Result<u16, MemdevError> {
        let ts = self.timestamp();
        let handle = self.events.push(log, rec, ts);
        self.deliver_interrupts();
        handle.ok_or(MemdevError::EventLogOverflow(log))
    }

    /// Control API: append a General Media event (QEMU `cxl-inject-general-media-event`) to
    /// `log`. Returns the record handle. The DPA must be 64-byte aligned and inside the device;
    /// the volatile bit of the address field is derived from it.
    pub fn inject_general_media_event(
        &mut self,
        log: EventLogKind,
        ev: &GeneralMediaEvent,
    ) -> Result<u16, MemdevError> {
        self.check_dpa_range(ev.dpa, POISON_GRANULE)?;
        let rec = EventRecord::general_media(ev, ev.dpa < self.volatile_bytes);
        self.push_event(log, rec)
    }

    /// Control API: append a DRAM event (QEMU `cxl-inject-dram-event`) to `log`.
    pub fn inject_dram_event(
        &mut self,
        log: EventLogKind,
        ev: &DramEvent,
    ) -> Result<u16, MemdevError> {
        self.check_dpa_range(ev.dpa, POISON_GRANULE)?;
        let rec = EventRecord::dram(ev, ev.dpa < self.volatile_bytes);
        self.push_event(log, rec)
    }

    /// Control API: append a Memory Module event (QEMU `cxl-inject-memory-module-event`) to
    /// `log`.
    pub fn inject_memory_module_event(
        &mut self,
        log: EventLogKind,
        ev: &MemoryModuleEvent,
    ) -> Result<u16, MemdevError> {
        let rec = EventRecord::memory_module(ev);
        self.push_event(log, rec)
    }

    /// Snapshot for the control API.
    pub fn state_report(&self) -> MemdevReport {
        MemdevReport {
            id: self.id.clone(),
            serial: self.serial,
            volatile_bytes: self.volatile_bytes,
            persistent_bytes: self.persistent_bytes,
            lsa_size: self.lsa_size(),
            poison: self.poison.ranges(),
            poison_overflow: self.poison.overflow_timestamp(),
            events: self.events.report(),
            health: self.health,
            timestamp: self.timestamp(),
            shutdown_state: self.shutdown_state,
        }
    }
}

/// The register model's view of the command set (`devices/src/cxl/mod.rs`).
impl super::MailboxBackend for Memdev {
    fn execute(&mut self, opcode: u16, input: &[u8], capacity: usize) -> (u16, Vec<u8>) {
        let (rc, out) = Memdev::execute(self, opcode, input, capacity);
        (rc.as_u16(), out)
    }

    fn event_status(&self) -> u32 {
        Memdev::event_status(self)
    }
}

/// A [`Memdev`] shared between the register model (which owns a `Box<dyn MailboxBackend>`)
/// and the control API (which injects poison and events and reads [`Memdev::state_report`]).
/// A poisoned lock is recovered, not propagated: the device state stays usable.
#[derive(Debug, Clone)]
pub struct SharedMemdev(pub Arc<Mutex<Memdev>>);

impl SharedMemdev {
    /// Share `memdev`.
    pub fn new(memdev: Memdev) -> Self {
        Self(Arc::new(Mutex::new(memdev)))
    }

    /// Lock the device.
    pub fn lock(&self) -> MutexGuard<'_, Memdev> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl super::MailboxBackend for SharedMemdev {
    fn execute(&mut self, opcode: u16, input: &[u8], capacity: usize) -> (u16, Vec<u8>) {
        let (rc, out) = self.lock().execute(opcode, input, capacity);
        (rc.as_u16(), out)
    }

    fn event_status(&self) -> u32 {
        self.lock().event_status()
    }
}

/// Opcodes [`fuzz_execute`] picks from when its selector byte is below 0xe0.
const FUZZ_OPCODES: &[u16] = &[
    opcode::GET_EVENT_RECORDS,
    opcode::CLEAR_EVENT_RECORDS,
    opcode::GET_EVT_INT_POLICY,
    opcode::SET_EVT_INT_POLICY,
    opcode::GET_FW_INFO,
    opcode::GET_TIMESTAMP,
    opcode::SET_TIMESTAMP,
    opcode::GET_SUPPORTED_LOGS,
    opcode::GET_LOG,
    opcode::IDENTIFY,
    opcode::GET_PARTITION_INFO,
    opcode::GET_LSA,
    opcode::SET_LSA,
    opcode::GET_HEALTH_INFO,
    opcode::GET_SHUTDOWN_STATE,
    opcode::SET_SHUTDOWN_STATE,
    opcode::GET_POISON_LIST,
    opcode::INJECT_POISON,
    opcode::CLEAR_POISON,
    opcode::GET_SECURITY_STATE,
    opcode::SANITIZE,
    opcode::TRANSFER_FW,
];

/// Fuzzing entry point: interpret `bytes` as a sequence of mailbox commands (and a few
/// control-API injections) against `memdev`, checking the invariants of
/// [`Memdev::execute`] after each one.
///
/// Each step reads: selector (1 byte; < 0xe0 picks a known opcode, 0xe0..0xef takes a raw
/// 16-bit opcode from the next 2 bytes, 0xf0.. runs an injection), payload-capacity exponent
/// (1 byte, 256 B .. 1 MiB), input length (2 bytes; clipped to the payload area, and an empty
/// payload when fewer bytes are left), then the input.
///
/// # Panics
/// Only when an invariant is broken (output longer than the payload area, output with a
/// non-success code, return code outside Linux's table) — the bugs the fuzzer hunts.
pub fn fuzz_execute(memdev: &mut Memdev, bytes: &[u8]) {
    struct Input<'a>(&'a [u8]);
    impl<'a> Input<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let (head, tail) = self.0.split_at_checked(n)?;
            self.0 = tail;
            Some(head)
        }
    }
    let mut input = Input(bytes);
    let mut take = |n: usize| input.take(n);
    while let Some(&[sel]) = take(1) {
        let op = match sel {
            0..=0xdf => FUZZ_OPCODES
                .get(usize::from(sel) % FUZZ_OPCODES.len())
                .copied()
                .unwrap_or(0),
            0xe0..=0xef => match take(2) {
                Some(&[lo, hi]) => u16::from_le_bytes([lo, hi]),
                _ => return,
            },
            _ => {
                let Some(&[a, b]) = take(2) else { return };
                let dpa = u64::from(u16::from_le_bytes([a, b])) * POISON_GRANULE;
                let log = EventLogKind::from_u8(a & 3).unwrap_or(EventLogKind::Informational);
                let _ = match sel & 3 {
                    0 => memdev
                        .inject_poison(dpa, POISON_GRANULE * u64::from(b))
                        .map(|_| 0),
                    1 => memdev
                        .clear_poison(dpa, POISON_GRANULE * u64::from(b))
                        .map(|_| 0),
                    2 => memdev.inject_general_media_event(
                        log,
                        &GeneralMediaEvent {
                            dpa,
                            ..Default::default()
                        },
                    ),
                    _ => memdev.inject_memory_module_event(log, &MemoryModuleEvent::default()),
                };
                while memdev.take_event_interrupt().is_some() {}
                continue;
            }
        };
        let Some(&[exp]) = take(1) else { return };
        let cap = 256usize << (exp % 13);
        let Some(&[lo, hi]) = take(2) else { return };
        let len = usize::from(u16::from_le_bytes([lo, hi]));
        let Some(payload) = take(len.min(cap)).or_else(|| take(0)) else {
            return;
        };
        let (rc, out) = memdev.execute(op, payload, cap);
        assert!(
            out.len() <= cap,
            "opcode {op:#x}: output {} > {cap}",
            out.len()
        );
        assert!(
            rc.is_success() || out.is_empty(),
            "opcode {op:#x}: output with {rc:?}"
        );
        assert!(rc.as_u16() <= 0x1e);
        while memdev.take_event_interrupt().is_some() {}
    }
}

#[cfg(test)]
#[path = "mailbox_tests.rs"]
mod mailbox_tests;
