//! The CXL commands of the control API: `query-devices`, `cxl-state` and the `cxl-inject-*` /
//! `cxl-clear-poison` faults, answered from the devices' command sets.

use std::sync::{Arc, Mutex, PoisonError};

use devices::cxl::events::{
    DramEvent, EventLogKind, GeneralMediaEvent, MemoryModuleEvent, Overflow,
};
use devices::cxl::memdev::{HealthInfo, Memdev, MemdevError, MemdevReport, SharedMemdev};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ControlTarget, unsupported_qmp_command};

/// One CXL Type 3 device as the control API sees it.
#[derive(Clone)]
pub struct ControlDevice {
    /// The device's `id=`.
    pub id: String,
    /// Its mailbox command set and state (poison list, event logs, health).
    pub memdev: SharedMemdev,
    /// Its register model, for the committed HDM decoders and RAS injection (absent in unit
    /// tests).
    pub function: Option<Arc<Mutex<devices::cxl::CxlType3Device>>>,
    /// The CXL root port above it, which receives its AER error messages.
    pub root_port: Option<Arc<Mutex<devices::cxl::root_port::CxlRootPort>>>,
}

/// CXL RAS Uncorrectable Error Status bits by QMP's `CxlUncorErrorType` names (CXL 2.0
/// 8.2.5.9.1; QEMU qapi/cxl.json).
const UNCORRECTABLE_ERRORS: &[(&str, u32)] = &[
    ("cache-data-parity", 0),
    ("cache-address-parity", 1),
    ("cache-be-parity", 2),
    ("cache-data-ecc", 3),
    ("mem-data-parity", 4),
    ("mem-address-parity", 5),
    ("mem-be-parity", 6),
    ("mem-data-ecc", 7),
    ("reinit-threshold", 8),
    ("rsvd-encoding", 9),
    ("poison-received", 10),
    ("receiver-overflow", 11),
    ("internal", 14),
    ("cxl-ide-tx", 15),
    ("cxl-ide-rx", 16),
];

/// CXL RAS Correctable Error Status bits by QMP's `CxlCorErrorType` names (8.2.5.9.4).
const CORRECTABLE_ERRORS: &[(&str, u32)] = &[
    ("cache-data-ecc", 0),
    ("mem-data-ecc", 1),
    ("crc-threshold", 2),
    ("retry-threshold", 3),
    ("cache-poison-received", 4),
    ("mem-poison-received", 5),
    ("physical", 6),
];

/// The status bit of error type `name` in `table`, or a one-line refusal listing the names.
fn error_bit(table: &[(&str, u32)], name: &str, what: &str) -> Result<u32, String> {
    table
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bit)| 1 << bit)
        .ok_or_else(|| {
            let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown {what} error type '{name}' (one of: {})",
                names.join(", ")
            )
        })
}

/// The endpoint's committed HDM decoders as JSON (`cxl-state`'s `hdm_decoders`).
fn decoders_json(function: &Option<Arc<Mutex<devices::cxl::CxlType3Device>>>) -> Value {
    let Some(function) = function else {
        return Value::Array(Vec::new());
    };
    let committed = function
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .component()
        .hdm()
        .map(|h| h.committed())
        .unwrap_or_default();
    Value::Array(
        committed
            .iter()
            .map(|r| {
                let mut v = json!({
                    "decoder": r.decoder_index,
                    "hpa": r.hpa_base,
                    "size": r.size,
                });
                if let devices::cxl::DecodeTarget::Memory {
                    dpa_base,
                    partition,
                    ..
                } = r.target
                {
                    v["dpa"] = json!(dpa_base);
                    v["partition"] = json!(format!("{partition:?}").to_lowercase());
                }
                v
            })
            .collect(),
    )
}

/// Event log names on the wire.
#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum LogName {
    Informational,
    Warning,
    #[default]
    Failure,
    Fatal,
}

impl From<LogName> for EventLogKind {
    fn from(l: LogName) -> Self {
        match l {
            LogName::Informational => EventLogKind::Informational,
            LogName::Warning => EventLogKind::Warning,
            LogName::Failure => EventLogKind::Failure,
            LogName::Fatal => EventLogKind::Fatal,
        }
    }
}

/// Fields shared by General Media and DRAM events (CXL 3.0 §8.2.9.2.1.1/2).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MediaEventArgs {
    device: String,
    #[serde(default)]
    log: LogName,
    #[serde(default)]
    flags: u32,
    #[serde(default)]
    maint_op_class: u8,
    dpa: u64,
    #[serde(default)]
    not_repairable: bool,
    #[serde(default)]
    descriptor: u8,
    #[serde(default, rename = "type")]
    event_type: u8,
    #[serde(default)]
    transaction_type: u8,
    channel: Option<u8>,
    rank: Option<u8>,
    /// General Media: the "Device" field (which DRAM device); QEMU calls it `device`.
    dram_device: Option<u32>,
    component_id: Option<String>,
    // DRAM only.
    nibble_mask: Option<u32>,
    bank_group: Option<u8>,
    bank: Option<u8>,
    row: Option<u32>,
    column: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryModuleArgs {
    device: String,
    #[serde(default)]
    log: LogName,
    #[serde(default)]
    flags: u32,
    #[serde(default)]
    maint_op_class: u8,
    #[serde(default, rename = "type")]
    event_type: u8,
    health_status: Option<u8>,
    media_status: Option<u8>,
    additional_status: Option<u8>,
    life_used: Option<u8>,
    temperature: Option<i16>,
    dirty_shutdown_count: Option<u32>,
    corrected_volatile_errors: Option<u32>,
    corrected_persistent_errors: Option<u32>,
    component_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoisonArgs {
    device: String,
    dpa: u64,
    length: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceArg {
    device: String,
}

/// One uncorrectable error of `cxl-inject-uncorrectable-errors`: its type and up to 16
/// header-log DWORDs (QMP's `CXLUncorErrorRecord`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UncorrectableError {
    #[serde(rename = "type")]
    error_type: String,
    #[serde(default)]
    header: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UncorrectableArgs {
    device: String,
    errors: Vec<UncorrectableError>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CorrectableArgs {
    device: String,
    #[serde(rename = "type")]
    error_type: String,
}

/// A request, tagged by `command`.
#[derive(Debug, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
enum Request {
    QueryDevices,
    CxlState(DeviceArg),
    CxlInjectPoison(PoisonArgs),
    CxlClearPoison(PoisonArgs),
    CxlInjectGeneralMediaEvent(MediaEventArgs),
    CxlInjectDramEvent(MediaEventArgs),
    CxlInjectMemoryModuleEvent(MemoryModuleArgs),
    CxlInjectUncorrectableErrors(UncorrectableArgs),
    CxlInjectCorrectableError(CorrectableArgs),
}

/// Component ID: up to 16 bytes of text (QEMU takes a string too), zero padded.
fn component_id(text: &Option<String>) -> Result<Option<[u8; 16]>, String> {
    let Some(text) = text else { return Ok(None) };
    let bytes = text.as_bytes();
    if bytes.len() > 16 {
        return Err(format!("component_id '{text}' is longer than 16 bytes"));
    }
    let mut id = [0u8; 16];
    id[..bytes.len()].copy_from_slice(bytes);
    Ok(Some(id))
}

impl ControlTarget {
    /// The CXL device named `id`; `memN` (the guest's name, when no device has that id) is the
    /// N-th `--cxl-type3` device, which is how Linux numbers them on this single-host-bridge
    /// topology.
    fn device(&self, id: &str) -> Result<&ControlDevice, String> {
        let by_guest_name = || {
            id.strip_prefix("mem")
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|n| self.devices.get(n))
        };
        let found = self
            .devices
            .iter()
            .find(|d| d.id == id)
            .or_else(by_guest_name);
        found.ok_or_else(|| {
            let known: Vec<&str> = self.devices.iter().map(|d| d.id.as_str()).collect();
            if known.is_empty() {
                format!("no CXL device '{id}': this VM has no --cxl-type3 devices")
            } else {
                format!("no CXL device '{id}' (devices: {})", known.join(", "))
            }
        })
    }

    /// Runs `op` on device `id`'s command set, naming the device in its error.
    fn on_device<T>(
        &self,
        id: &str,
        op: impl FnOnce(&mut Memdev) -> Result<T, MemdevError>,
    ) -> Result<T, String> {
        let dev = self.device(id)?;
        let mut md = dev.memdev.lock();
        op(&mut md).map_err(|e| format!("{id}: {e}"))
    }

    /// Logs an error in device `id`'s RAS and AER registers (`inject` on the endpoint) and
    /// delivers the message it sends to its root port. The answer says what reached the guest.
    fn inject_ras(
        &self,
        id: &str,
        inject: impl FnOnce(
            &mut devices::cxl::CxlType3Device,
        ) -> Option<devices::pci::aer::ErrorMessage>,
    ) -> Result<Value, String> {
        let dev = self.device(id)?;
        let (Some(function), Some(port)) = (&dev.function, &dev.root_port) else {
            return Err(format!("{id}: no register model to inject into"));
        };
        let message = inject(&mut function.lock().unwrap_or_else(PoisonError::into_inner));
        let interrupted = message.is_some_and(|m| {
            port.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .receive_error_message(m)
        });
        let message_name = match message {
            Some(devices::pci::aer::ErrorMessage::Correctable) => "ERR_COR",
            Some(devices::pci::aer::ErrorMessage::NonFatal) => "ERR_NONFATAL",
            Some(devices::pci::aer::ErrorMessage::Fatal) => "ERR_FATAL",
            None => "none",
        };
        log::info!(
            "control: {id}: RAS error injected, message {message_name}, AER interrupt {interrupted}"
        );
        Ok(json!({ "message": message_name, "aer_interrupt": interrupted }))
    }

    fn handle(&self, req: Request) -> Result<Value, String> {
        match req {
            Request::CxlInjectUncorrectableErrors(a) => {
                if a.errors.is_empty() {
                    return Err("errors: give at least one {\"type\": ...}".into());
                }
                let mut bits = 0;
                for e in &a.errors {
                    if e.header.len() > 16 {
                        return Err(format!(
                            "header of '{}': {} DWORDs, at most 16 (the RAS header log)",
                            e.error_type,
                            e.header.len()
                        ));
                    }
                    bits |= error_bit(UNCORRECTABLE_ERRORS, &e.error_type, "uncorrectable")?;
                }
                // The first error's header goes to the header log (QEMU logs the first too).
                let header = a.errors[0].header.clone();
                self.inject_ras(&a.device, |f| f.inject_uncorrectable(bits, &header))
            }
            Request::CxlInjectCorrectableError(a) => {
                let bit = error_bit(CORRECTABLE_ERRORS, &a.error_type, "correctable")?;
                self.inject_ras(&a.device, |f| f.inject_correctable(bit))
            }
            Request::QueryDevices => Ok(Value::Array(
                self.devices
                    .iter()
                    .map(|d| {
                        let md = d.memdev.lock();
                        json!({
                            "id": d.id,
                            "serial": md.serial(),
                            "volatile_bytes": md.volatile_bytes(),
                            "persistent_bytes": md.persistent_bytes(),
                        })
                    })
                    .collect(),
            )),
            Request::CxlState(a) => {
                let dev = self.device(&a.device)?;
                let report = dev.memdev.lock().state_report();
                let mut state = report_json(&report);
                state["hdm_decoders"] = decoders_json(&dev.function);
                Ok(state)
            }
            Request::CxlInjectPoison(a) => {
                self.on_device(&a.device, |md| md.inject_poison(a.dpa, a.length))?;
                log::info!(
                    "control: {} poison injected at dpa {:#x} length {:#x}",
                    a.device,
                    a.dpa,
                    a.length
                );
                Ok(Value::Null)
            }
            Request::CxlClearPoison(a) => {
                self.on_device(&a.device, |md| md.clear_poison(a.dpa, a.length))?;
                Ok(Value::Null)
            }
            Request::CxlInjectGeneralMediaEvent(a) => {
                let ev = GeneralMediaEvent {
                    flags: a.flags,
                    maint_op_class: a.maint_op_class,
                    dpa: a.dpa,
                    not_repairable: a.not_repairable,
                    descriptor: a.descriptor,
                    event_type: a.event_type,
                    transaction_type: a.transaction_type,
                    channel: a.channel,
                    rank: a.rank,
                    device: a.dram_device,
                    component_id: component_id(&a.component_id)?,
                };
                let handle = self.on_device(&a.device, |md| {
                    md.inject_general_media_event(a.log.into(), &ev)
                })?;
                Ok(json!({ "handle": handle }))
            }
            Request::CxlInjectDramEvent(a) => {
                let ev = DramEvent {
                    flags: a.flags,
                    maint_op_class: a.maint_op_class,
                    dpa: a.dpa,
                    not_repairable: a.not_repairable,
                    descriptor: a.descriptor,
                    event_type: a.event_type,
                    transaction_type: a.transaction_type,
                    channel: a.channel,
                    rank: a.rank,
                    nibble_mask: a.nibble_mask,
                    bank_group: a.bank_group,
                    bank: a.bank,
                    row: a.row,
                    column: a.column,
                    correction_mask: None,
                    component_id: component_id(&a.component_id)?,
                };
                let handle =
                    self.on_device(&a.device, |md| md.inject_dram_event(a.log.into(), &ev))?;
                Ok(json!({ "handle": handle }))
            }
            Request::CxlInjectMemoryModuleEvent(a) => {
                let dev = self.device(&a.device)?;
                let mut md = dev.memdev.lock();
                let current = md.health();
                let health = HealthInfo {
                    health_status: a.health_status.unwrap_or(current.health_status),
                    media_status: a.media_status.unwrap_or(current.media_status),
                    additional_status: a.additional_status.unwrap_or(current.additional_status),
                    life_used: a.life_used.unwrap_or(current.life_used),
                    temperature: a.temperature.unwrap_or(current.temperature),
                    dirty_shutdown_count: a
                        .dirty_shutdown_count
                        .unwrap_or(current.dirty_shutdown_count),
                    corrected_volatile_errors: a
                        .corrected_volatile_errors
                        .unwrap_or(current.corrected_volatile_errors),
                    corrected_persistent_errors: a
                        .corrected_persistent_errors
                        .unwrap_or(current.corrected_persistent_errors),
                };
                let ev = MemoryModuleEvent {
                    flags: a.flags,
                    maint_op_class: a.maint_op_class,
                    event_type: a.event_type,
                    health,
                    component_id: component_id(&a.component_id)?,
                };
                let handle = md
                    .inject_memory_module_event(a.log.into(), &ev)
                    .map_err(|e| format!("{}: {e}", a.device))?;
                // The module's health is what the event reports: Get Health Info agrees.
                md.set_health(health);
                Ok(json!({ "handle": handle }))
            }
        }
    }
}

fn log_name(kind: EventLogKind) -> &'static str {
    match kind {
        EventLogKind::Informational => "informational",
        EventLogKind::Warning => "warning",
        EventLogKind::Failure => "failure",
        EventLogKind::Fatal => "fatal",
    }
}

fn overflow_json(o: &Option<Overflow>) -> Value {
    match o {
        Some(o) => json!({
            "count": o.count,
            "first_timestamp": o.first_timestamp,
            "last_timestamp": o.last_timestamp,
        }),
        None => Value::Null,
    }
}

/// The device state report as JSON (`cxl-state`).
fn report_json(r: &MemdevReport) -> Value {
    let h = &r.health;
    json!({
        "id": r.id,
        "serial": r.serial,
        "volatile_bytes": r.volatile_bytes,
        "persistent_bytes": r.persistent_bytes,
        "lsa_size": r.lsa_size,
        "poison": r.poison.iter().map(|p| json!({
            "dpa": p.dpa,
            "length": p.length,
            "source": format!("{:?}", p.source).to_lowercase(),
        })).collect::<Vec<_>>(),
        "poison_overflow_timestamp": r.poison_overflow,
        "event_logs": r.events.iter().map(|l| json!({
            "log": log_name(l.kind),
            "pending": l.pending,
            "handles": l.handles,
            "overflow": overflow_json(&l.overflow),
            "interrupt_setting": l.interrupt_setting,
        })).collect::<Vec<_>>(),
        "health": {
            "health_status": h.health_status,
            "media_status": h.media_status,
            "additional_status": h.additional_status,
            "life_used": h.life_used,
            "temperature": h.temperature,
            "dirty_shutdown_count": h.dirty_shutdown_count,
            "corrected_volatile_errors": h.corrected_volatile_errors,
            "corrected_persistent_errors": h.corrected_persistent_errors,
        },
        "timestamp": r.timestamp,
        "shutdown_state": if r.shutdown_state == 1 { "dirty" } else { "clean" },
    })
}

/// Answers a `query-devices` or `cxl-*` request line.
pub(super) fn handle(target: &ControlTarget, line: &str) -> Result<Value, String> {
    match serde_json::from_str::<Request>(line) {
        Ok(req) => target.handle(req),
        Err(e) => Err(unsupported_qmp_command(line).unwrap_or(format!("bad request: {e}"))),
    }
}
