//! `vmm ctl`: the command-line client of the control API (`control/`): one subcommand per
//! request, numbers in decimal or `0x` hex, the answer's result printed as JSON on stdout.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value, json};

/// `vmm ctl` arguments.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// The control socket of a running VM (`vmm run --control PATH`).
    #[arg(long, visible_alias = "socket", value_name = "PATH")]
    control: PathBuf,
    /// Seconds to wait for the socket to appear (the VM may still be starting).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    wait: f64,
    #[command(subcommand)]
    request: CtlRequest,
}

/// Which event log an injected event goes to.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum Log {
    Informational,
    Warning,
    Failure,
    Fatal,
}

impl Log {
    fn name(self) -> &'static str {
        match self {
            Log::Informational => "informational",
            Log::Warning => "warning",
            Log::Failure => "failure",
            Log::Fatal => "fatal",
        }
    }
}

/// The page group response code an injection forces.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum InjectedResponse {
    /// Response Failure: the device stops page requests until PRI is re-enabled.
    Failure,
    /// Invalid Request: the device reports the access as failed.
    Invalid,
}

/// Parses a decimal or `0x`-prefixed hexadecimal number.
fn number(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|_| format!("'{text}' is not a number (decimal or 0x hex)"))
}

/// Fields common to General Media and DRAM events.
#[derive(clap::Args, Debug)]
struct MediaEventArgs {
    /// Device id (`id=` of its --cxl-type3).
    #[arg(long, default_value = "cxl0")]
    device: String,
    /// Device physical address (64-byte aligned).
    #[arg(long, visible_alias = "address", value_parser = number)]
    dpa: u64,
    /// Event log.
    #[arg(long, value_enum, default_value = "failure")]
    log: Log,
    /// Record header flags (permanent 0x4, maintenance 0x8, performance 0x10, replace 0x20).
    #[arg(long, value_parser = number, default_value = "0")]
    flags: u64,
    /// Memory Event Descriptor (bit 0 uncorrectable, 1 threshold, 2 poison list overflow).
    #[arg(long, value_parser = number, default_value = "0")]
    descriptor: u64,
    /// Memory Event Type (0 ECC error, 1 invalid address, 2 data path error).
    #[arg(long = "type", value_parser = number, default_value = "0")]
    event_type: u64,
    /// Transaction Type (1 host read, 2 host write, 3 scan media, 4 inject poison, ...).
    #[arg(long, value_parser = number, default_value = "0")]
    transaction_type: u64,
    #[arg(long, value_parser = number)]
    channel: Option<u64>,
    #[arg(long, value_parser = number)]
    rank: Option<u64>,
    /// Component identifier (up to 16 characters).
    #[arg(long)]
    component_id: Option<String>,
}

impl MediaEventArgs {
    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("device".into(), json!(self.device));
        m.insert("dpa".into(), json!(self.dpa));
        m.insert("log".into(), json!(self.log.name()));
        m.insert("flags".into(), json!(self.flags));
        m.insert("descriptor".into(), json!(self.descriptor));
        m.insert("type".into(), json!(self.event_type));
        m.insert("transaction_type".into(), json!(self.transaction_type));
        insert_opt(&mut m, "channel", self.channel);
        insert_opt(&mut m, "rank", self.rank);
        if let Some(c) = &self.component_id {
            m.insert("component_id".into(), json!(c));
        }
        m
    }
}

fn insert_opt(m: &mut Map<String, Value>, key: &str, v: Option<u64>) {
    if let Some(v) = v {
        m.insert(key.into(), json!(v));
    }
}

/// A device's DPA range (poison inject/clear).
#[derive(clap::Args, Debug)]
struct PoisonRangeArgs {
    #[arg(long, default_value = "cxl0")]
    device: String,
    /// First DPA (64-byte aligned).
    #[arg(long, visible_aliases = ["start", "address"], value_parser = number)]
    dpa: u64,
    /// Length in bytes (multiple of 64).
    #[arg(long, visible_alias = "len", value_parser = number, default_value = "64")]
    length: u64,
}

impl PoisonRangeArgs {
    fn request(&self, command: &str) -> Value {
        json!({"command": command, "device": self.device, "dpa": self.dpa, "length": self.length})
    }
}

#[derive(clap::Subcommand, Debug)]
enum CtlRequest {
    /// List the VM's CXL devices.
    Devices,
    /// Report a CXL device's state: poison list, event logs, health.
    #[command(visible_aliases = ["cxl-state", "status", "info"])]
    State {
        #[arg(long, default_value = "cxl0")]
        device: String,
    },
    /// Mark a DPA range poisoned (device-detected media error), like QMP cxl-inject-poison.
    #[command(visible_aliases = ["cxl-inject-poison", "poison-inject"])]
    InjectPoison(PoisonRangeArgs),
    /// Remove a DPA range from the poison list.
    #[command(visible_aliases = ["cxl-clear-poison", "poison-clear"])]
    ClearPoison(PoisonRangeArgs),
    /// Add a General Media event record, like QMP cxl-inject-general-media-event.
    #[command(visible_aliases = ["cxl-inject-general-media-event", "inject-general-media-event", "inject-media-event"])]
    InjectGeneralMedia {
        #[command(flatten)]
        event: MediaEventArgs,
        /// The record's Device field (which media device).
        #[arg(long, value_parser = number)]
        media_device: Option<u64>,
    },
    /// Add a DRAM event record, like QMP cxl-inject-dram-event.
    #[command(visible_aliases = ["cxl-inject-dram-event", "inject-dram-event"])]
    InjectDram {
        #[command(flatten)]
        event: MediaEventArgs,
        #[arg(long, value_parser = number)]
        nibble_mask: Option<u64>,
        #[arg(long, value_parser = number)]
        bank_group: Option<u64>,
        #[arg(long, value_parser = number)]
        bank: Option<u64>,
        #[arg(long, value_parser = number)]
        row: Option<u64>,
        #[arg(long, value_parser = number)]
        column: Option<u64>,
    },
    /// Add a Memory Module event record (and set the health it reports), like QMP
    /// cxl-inject-memory-module-event.
    #[command(visible_aliases = ["cxl-inject-memory-module-event", "inject-memory-module-event"])]
    InjectMemoryModule {
        #[arg(long, default_value = "cxl0")]
        device: String,
        #[arg(long, value_enum, default_value = "failure")]
        log: Log,
        #[arg(long, value_parser = number, default_value = "0")]
        flags: u64,
        /// Device Event Type (0 health status change, 1 media status change, 2 life used
        /// threshold, 3 temperature change, 4 data path error, 5 LSA error).
        #[arg(long = "type", value_parser = number, default_value = "0")]
        event_type: u64,
        #[arg(long, value_parser = number)]
        health_status: Option<u64>,
        #[arg(long, value_parser = number)]
        media_status: Option<u64>,
        #[arg(long, value_parser = number)]
        additional_status: Option<u64>,
        #[arg(long, value_parser = number)]
        life_used: Option<u64>,
        /// Degrees Celsius.
        #[arg(long, allow_hyphen_values = true)]
        temperature: Option<i16>,
        #[arg(long, value_parser = number)]
        dirty_shutdown_count: Option<u64>,
        #[arg(long, value_parser = number)]
        corrected_volatile_errors: Option<u64>,
        #[arg(long, value_parser = number)]
        corrected_persistent_errors: Option<u64>,
    },
    /// Log uncorrectable CXL RAS errors in a device and signal them through AER (ERR_FATAL or
    /// ERR_NONFATAL by the AER severity, to its root port), like QMP
    /// cxl-inject-uncorrectable-errors; the guest's cxl_pci traces cxl_aer_uncorrectable_error.
    #[command(visible_aliases = ["cxl-inject-uncorrectable-errors", "inject-uncorrectable-error"])]
    InjectUncorrectableErrors {
        #[arg(long, default_value = "cxl0")]
        device: String,
        /// Error type (repeatable; default mem-data-ecc): cache-data-parity,
        /// cache-address-parity, cache-be-parity, cache-data-ecc, mem-data-parity,
        /// mem-address-parity, mem-be-parity, mem-data-ecc, reinit-threshold, rsvd-encoding,
        /// poison-received, receiver-overflow, internal, cxl-ide-tx, cxl-ide-rx.
        #[arg(long = "type", value_name = "TYPE", default_value = "mem-data-ecc")]
        types: Vec<String>,
        /// Header log of the first error: up to 16 DWORDs, comma-separated (decimal or 0x).
        #[arg(long, value_delimiter = ',', value_parser = number)]
        header: Vec<u64>,
    },
    /// Log a correctable CXL RAS error in a device and signal it through AER (ERR_COR), like
    /// QMP cxl-inject-correctable-error; the guest traces cxl_aer_correctable_error.
    #[command(visible_aliases = ["cxl-inject-correctable-error", "inject-correctable-errors"])]
    InjectCorrectableError {
        #[arg(long, default_value = "cxl0")]
        device: String,
        /// Error type (default mem-data-ecc): cache-data-ecc, mem-data-ecc, crc-threshold,
        /// retry-threshold, cache-poison-received, mem-poison-received, physical.
        #[arg(long = "type", value_name = "TYPE", default_value = "mem-data-ecc")]
        error_type: String,
    },
    /// Report the VT-d unit's state (`--iommu vtd`): mode, enabled features, devices with a
    /// context, counters, pending fault injections.
    #[command(name = "iommu-state", visible_alias = "iommu")]
    IommuState,
    /// Make the next N DMA translations of a device fail with a VT-d translation fault.
    #[command(name = "iommu-inject-fault")]
    IommuInjectFault {
        /// PCI address of the requester, e.g. 00:03.0.
        #[arg(long, value_parser = bdf)]
        device: String,
        /// How many translations fail (1..=65535).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65535))]
        count: u32,
    },
    /// Make the next N page group responses the guest sends reach the device as Response
    /// Failure or Invalid Request (needs --iommu vtd with page requests).
    #[command(name = "iommu-inject-page-response")]
    IommuInjectPageResponse {
        /// The code the device gets.
        #[arg(long, value_enum)]
        code: InjectedResponse,
        /// How many responses (1..=65535).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65535))]
        count: u32,
    },
    /// Lose the next N page requests as to a full page request queue (PRS.PRO).
    #[command(name = "iommu-drop-page-requests")]
    IommuDropPageRequests {
        /// How many requests (1..=65535).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65535))]
        count: u32,
    },
    /// Complete every later invalidation wait this many milliseconds late (0 turns it off).
    #[command(name = "iommu-delay-invalidation-wait")]
    IommuDelayInvalidationWait {
        /// Milliseconds (0..=10000).
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=10000))]
        ms: u64,
    },
    /// Report the I/OAT DMA engines (`--ioat`): per channel its state, CHANERR and counters.
    #[command(name = "ioat-state", visible_alias = "ioat")]
    IoatState,
    /// Report the SVA DMA engines (`--dma-engine`): ATS/PASID/PRI enables, ring, ATC, page
    /// requests and responses by code.
    #[command(name = "dma-engine-state", visible_alias = "dma-engine")]
    DmaEngineState,
    /// Report the NICs (`--nic`): MAC, link, whether the driver activated it, frames and bytes
    /// each way, drops by cause, the fabric's datagrams.
    #[command(name = "nic-state", visible_alias = "nic")]
    NicState,
    /// Set a NIC's link down or up; the guest's driver sees the link event.
    #[command(name = "nic-link")]
    NicLink {
        /// The NIC's id (`--nic id=...`; default nic0, nic1, ...).
        #[arg(long, default_value = "nic0")]
        id: String,
        /// The new link state.
        #[arg(value_parser = ["up", "down"])]
        state: String,
    },
    /// Send one raw JSON request (see `docs/control-api.md`).
    Raw {
        /// The request object, e.g. '{"command":"query-devices"}'.
        json: String,
    },
}

impl CtlRequest {
    fn to_json(&self) -> Result<Value, String> {
        Ok(match self {
            CtlRequest::Devices => json!({"command": "query-devices"}),
            CtlRequest::IommuState => json!({"command": "iommu-state"}),
            CtlRequest::IommuInjectFault { device, count } => {
                json!({"command": "iommu-inject-fault", "device": device, "count": count})
            }
            CtlRequest::IommuInjectPageResponse { code, count } => json!({
                "command": "iommu-inject-page-response",
                "code": match code {
                    InjectedResponse::Failure => "failure",
                    InjectedResponse::Invalid => "invalid",
                },
                "count": count,
            }),
            CtlRequest::IommuDropPageRequests { count } => {
                json!({"command": "iommu-drop-page-requests", "count": count})
            }
            CtlRequest::IommuDelayInvalidationWait { ms } => {
                json!({"command": "iommu-delay-invalidation-wait", "ms": ms})
            }
            CtlRequest::IoatState => json!({"command": "ioat-state"}),
            CtlRequest::DmaEngineState => json!({"command": "dma-engine-state"}),
            CtlRequest::NicState => json!({"command": "nic-state"}),
            CtlRequest::NicLink { id, state } => {
                json!({"command": "nic-link", "id": id, "state": state})
            }
            CtlRequest::State { device } => json!({"command": "cxl-state", "device": device}),
            CtlRequest::InjectPoison(r) => r.request("cxl-inject-poison"),
            CtlRequest::InjectUncorrectableErrors {
                device,
                types,
                header,
            } => {
                if header.len() > 16 {
                    return Err(format!(
                        "--header has {} DWORDs: the RAS header log holds at most 16",
                        header.len()
                    ));
                }
                if let Some(big) = header.iter().find(|&&d| d > u64::from(u32::MAX)) {
                    return Err(format!("--header value {big:#x} does not fit a DWORD"));
                }
                let errors: Vec<Value> = types
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let h: &[u64] = if i == 0 { header } else { &[] };
                        json!({"type": t, "header": h})
                    })
                    .collect();
                json!({"command": "cxl-inject-uncorrectable-errors", "device": device, "errors": errors})
            }
            CtlRequest::InjectCorrectableError { device, error_type } => json!({
                "command": "cxl-inject-correctable-error", "device": device, "type": error_type
            }),
            CtlRequest::ClearPoison(r) => r.request("cxl-clear-poison"),
            CtlRequest::InjectGeneralMedia {
                event,
                media_device,
            } => {
                let mut m = event.fields();
                m.insert("command".into(), json!("cxl-inject-general-media-event"));
                insert_opt(&mut m, "dram_device", *media_device);
                Value::Object(m)
            }
            CtlRequest::InjectDram {
                event,
                nibble_mask,
                bank_group,
                bank,
                row,
                column,
            } => {
                let mut m = event.fields();
                m.insert("command".into(), json!("cxl-inject-dram-event"));
                insert_opt(&mut m, "nibble_mask", *nibble_mask);
                insert_opt(&mut m, "bank_group", *bank_group);
                insert_opt(&mut m, "bank", *bank);
                insert_opt(&mut m, "row", *row);
                insert_opt(&mut m, "column", *column);
                Value::Object(m)
            }
            CtlRequest::InjectMemoryModule {
                device,
                log,
                flags,
                event_type,
                health_status,
                media_status,
                additional_status,
                life_used,
                temperature,
                dirty_shutdown_count,
                corrected_volatile_errors,
                corrected_persistent_errors,
            } => {
                let mut m = Map::new();
                m.insert("command".into(), json!("cxl-inject-memory-module-event"));
                m.insert("device".into(), json!(device));
                m.insert("log".into(), json!(log.name()));
                m.insert("flags".into(), json!(flags));
                m.insert("type".into(), json!(event_type));
                insert_opt(&mut m, "health_status", *health_status);
                insert_opt(&mut m, "media_status", *media_status);
                insert_opt(&mut m, "additional_status", *additional_status);
                insert_opt(&mut m, "life_used", *life_used);
                if let Some(t) = temperature {
                    m.insert("temperature".into(), json!(t));
                }
                insert_opt(&mut m, "dirty_shutdown_count", *dirty_shutdown_count);
                insert_opt(
                    &mut m,
                    "corrected_volatile_errors",
                    *corrected_volatile_errors,
                );
                insert_opt(
                    &mut m,
                    "corrected_persistent_errors",
                    *corrected_persistent_errors,
                );
                Value::Object(m)
            }
            CtlRequest::Raw { json } => {
                serde_json::from_str(json).map_err(|e| format!("invalid JSON request: {e}"))?
            }
        })
    }
}

/// Runs `vmm ctl`: prints the result (JSON, nothing for a null result) and returns Ok, or the
/// one-line error the VMM answered with.
pub fn run(args: &CtlArgs) -> Result<(), String> {
    if !(args.wait.is_finite() && args.wait >= 0.0) {
        return Err(format!(
            "invalid --wait value {}: must be a non-negative number of seconds",
            args.wait
        ));
    }
    let request = args.request.to_json()?;
    let answer = crate::control::client_request(
        &args.control,
        &request,
        Duration::from_secs_f64(args.wait),
    )?;
    if answer["ok"] == Value::Bool(true) {
        match &answer["result"] {
            Value::Null => {}
            r => {
                // A reader that stops early (`| head`) is not an error worth a panic.
                use std::io::Write;
                let text = serde_json::to_string_pretty(r).unwrap_or_else(|_| r.to_string());
                let _ = writeln!(std::io::stdout(), "{text}");
            }
        }
        Ok(())
    } else {
        Err(answer["error"]
            .as_str()
            .unwrap_or("the VMM refused the request")
            .to_string())
    }
}

/// A PCI address `BB:DD.F` (hex), as `iommu-inject-fault` takes it.
fn bdf(text: &str) -> Result<String, String> {
    crate::control::parse_bdf(text)
        .map(|_| text.to_string())
        .ok_or_else(|| format!("'{text}' is not a PCI address like 00:03.0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(args: &[&str]) -> Result<Value, String> {
        use clap::Parser;
        let cli = Cli::try_parse_from(
            ["ctl", "--control", "/nonexistent"]
                .iter()
                .chain(args.iter()),
        )
        .map_err(|e| e.to_string())?;
        cli.ctl.request.to_json()
    }

    #[test]
    fn ras_injections_take_qmp_names_and_check_the_header() {
        assert_eq!(
            parse(&[
                "cxl-inject-uncorrectable-errors",
                "--device",
                "mem0",
                "--type",
                "mem-data-ecc",
                "--type",
                "internal",
                "--header",
                "0x1,2"
            ])
            .unwrap(),
            json!({"command": "cxl-inject-uncorrectable-errors", "device": "mem0", "errors": [
                {"type": "mem-data-ecc", "header": [1, 2]}, {"type": "internal", "header": []}
            ]})
        );
        assert_eq!(
            parse(&["inject-correctable-error", "--type", "physical"]).unwrap(),
            json!({"command": "cxl-inject-correctable-error", "device": "cxl0", "type": "physical"})
        );
        let long: Vec<String> = (0..17).map(|i| i.to_string()).collect();
        let long = long.join(",");
        let e = parse(&[
            "inject-uncorrectable-errors",
            "--type",
            "internal",
            "--header",
            &long,
        ])
        .unwrap_err();
        assert!(e.contains("at most 16"), "{e}");
        let e = parse(&[
            "inject-uncorrectable-errors",
            "--type",
            "internal",
            "--header",
            "0x100000000",
        ])
        .unwrap_err();
        assert!(e.contains("0x100000000"), "{e}");
        assert_eq!(
            parse(&["inject-uncorrectable-errors"]).unwrap(),
            json!({"command": "cxl-inject-uncorrectable-errors", "device": "cxl0", "errors": [
                {"type": "mem-data-ecc", "header": []}
            ]})
        );
    }

    #[test]
    fn iommu_inject_fault_checks_the_device_and_count() {
        assert_eq!(
            parse(&["iommu-inject-fault", "--device", "00:03.0"]).unwrap(),
            json!({"command": "iommu-inject-fault", "device": "00:03.0", "count": 1})
        );
        assert_eq!(
            parse(&[
                "iommu-inject-fault",
                "--device",
                "0a:1f.7",
                "--count",
                "65535"
            ])
            .unwrap()["count"],
            65535
        );
        for (args, needle) in [
            (
                &["iommu-inject-fault", "--device", "00:32.0"][..],
                "'00:32.0'",
            ),
            (&["iommu-inject-fault", "--device", "zz"][..], "'zz'"),
            (
                &["iommu-inject-fault", "--device", "00:03.0", "--count", "0"][..],
                "0",
            ),
            (
                &[
                    "iommu-inject-fault",
                    "--device",
                    "00:03.0",
                    "--count",
                    "70000",
                ][..],
                "70000",
            ),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn numbers_in_decimal_and_hex() {
        assert_eq!(number("4096"), Ok(4096));
        assert_eq!(number("0x1000"), Ok(4096));
        assert!(number("4k").unwrap_err().contains("'4k'"));
    }
}
