//! Control API: fault injection and device state over a UNIX socket (`vmm run --control PATH`,
//! driven by `vmm ctl`), the same faults QEMU's QMP `cxl-inject-*` commands offer, and the VT-d
//! unit's state. This module is the protocol and its transports; each device family answers its
//! own commands in its own module (`cxl`, `iommu`).
//!
//! # Protocol
//! JSON lines: the client writes one request object per line, the VMM answers each with one
//! response object on one line, in order. A request names its command in `"command"`:
//!
//! | command | arguments |
//! |---|---|
//! | `query-devices` | — |
//! | `cxl-state` | `device` |
//! | `cxl-inject-poison`, `cxl-clear-poison` | `device`, `dpa`, `length` (64-byte multiples) |
//! | `cxl-inject-general-media-event` | `device`, `dpa`, optional `log`, `flags`, `descriptor`, `type`, `transaction_type`, `channel`, `rank`, `dram_device`, `component_id` |
//! | `cxl-inject-dram-event` | as general media, plus `nibble_mask`, `bank_group`, `bank`, `row`, `column` |
//! | `cxl-inject-memory-module-event` | `device`, optional `log`, `flags`, `type`, `health_status`, `media_status`, `additional_status`, `life_used`, `temperature`, `dirty_shutdown_count`, `corrected_volatile_errors`, `corrected_persistent_errors` |
//! | `cxl-inject-uncorrectable-errors` | `device`, `errors`: list of `{"type": T, "header": [up to 16 DWORDs]}` (T: QMP's `CxlUncorErrorType` names, e.g. `mem-data-ecc`, `internal`) |
//! | `cxl-inject-correctable-error` | `device`, `type` (QMP's `CxlCorErrorType` names, e.g. `mem-data-ecc`, `physical`) |
//! | `iommu-state` | — (with `--iommu vtd`) |
//! | `iommu-inject-fault` | `device` (PCI address `BB:DD.F`), optional `count` (1..=65535, default 1) |
//! | `iommu-inject-page-response` | `code` (`failure` or `invalid`), optional `count` (1..=65535, default 1) |
//! | `iommu-drop-page-requests` | optional `count` (1..=65535, default 1) |
//! | `iommu-delay-invalidation-wait` | `ms` (0..=10000; 0 turns the delay off) |
//!
//! `device` is the `id=` of a `--cxl-type3` device (default `cxl0`, `cxl1`, ...; `memN` also
//! names the N-th device, as the guest numbers them); `log` is one
//! of `informational`, `warning`, `failure` (default), `fatal`. Answers are
//! `{"ok":true,"result":...}` or `{"ok":false,"error":"one line"}`.
//!
//! Injected poison is what the guest's Get Poison List returns (`cxl list -L`, trace event
//! `cxl_poison`); injected events go into the device's event logs and raise the event
//! interrupt the guest configured (`cxl_general_media`, `cxl_dram`, `cxl_memory_module` trace
//! events from `cxl_event_thread()`). Injected RAS errors are logged in the device's RAS
//! capability and signalled through AER (an internal error at the endpoint, ERR_COR /
//! ERR_FATAL to its root port, the root port's AER interrupt): the guest's `cxl_pci` error
//! handlers trace `cxl_aer_correctable_error` / `cxl_aer_uncorrectable_error`.
//!
//! # Transports
//! * Direct: [`ControlListener`] listens on the socket and answers from the device models.
//! * Nested host: the `vmm run` the user started listens on the socket ([`Relay`]) and forwards
//!   each line over an extra serial port of the nested host (`ttyS3`) to the VMM inside, which
//!   serves the same protocol on that port ([`serve_serial`]) after announcing itself with
//!   [`READY_LINE`].

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use thiserror::Error;

mod cxl;
mod dma_engine;
mod ioat;
mod iommu;
mod nic;

pub use iommu::parse_bdf;

/// First line the VMM inside the nested host sends on the control port once it serves it.
pub const READY_LINE: &str = r#"{"event":"ready"}"#;
/// Longest request line accepted (a request is a few hundred bytes).
pub const MAX_LINE: usize = 64 * 1024;
/// How long a relayed request waits for the VMM inside the nested host to come up.
const RELAY_READY_WAIT: Duration = Duration::from_secs(180);
/// How long a relayed request waits for its answer.
const RELAY_ANSWER_WAIT: Duration = Duration::from_secs(60);

/// A control-socket setup failure (user-facing, one line).
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("control socket '{path}' exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("control socket '{path}' is in use by another running VMM")]
    InUse { path: PathBuf },
    #[error("control socket '{path}': {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub use cxl::ControlDevice;

/// Everything requests can act on.
#[derive(Clone, Default)]
pub struct ControlTarget {
    /// The CXL Type 3 devices (`cxl-*` commands).
    pub devices: Vec<ControlDevice>,
    /// The VT-d remapping unit (`iommu-*` commands), with `--iommu vtd`.
    pub iommu: Option<Arc<Mutex<::iommu::vtd::unit::RemappingUnit>>>,
    /// The I/OAT DMA engines (`ioat-*` commands), with `--ioat`.
    pub ioat: Vec<crate::ioat::IoatHandle>,
    /// The SVA DMA engines (`dma-engine-*` commands), with `--dma-engine`.
    pub dma_engines: Vec<crate::dma_engine::DmaEngineHandle>,
    /// The vmxnet3 NICs (`nic-*` commands), with `--nic`.
    pub nics: Vec<crate::nic::NicHandle>,
}

/// Every command, by family (for the unknown-command error).
const COMMANDS: &[&str] = &[
    "query-devices",
    "cxl-state",
    "cxl-inject-poison",
    "cxl-clear-poison",
    "cxl-inject-general-media-event",
    "cxl-inject-dram-event",
    "cxl-inject-memory-module-event",
    "cxl-inject-uncorrectable-errors",
    "cxl-inject-correctable-error",
    "iommu-state",
    "iommu-inject-fault",
    "iommu-inject-page-response",
    "iommu-drop-page-requests",
    "iommu-delay-invalidation-wait",
    "ioat-state",
    "dma-engine-state",
    "nic-state",
    "nic-link",
];

impl ControlTarget {
    /// Answers one request line with one response line (no newline). Each device family
    /// handles its own commands (`cxl`, `iommu` modules).
    pub fn handle_line(&self, line: &str) -> String {
        let answer = match serde_json::from_str::<Value>(line) {
            Err(e) => Err(format!("bad request: {e}")),
            Ok(request) => match request.get("command").and_then(Value::as_str) {
                None => Err("bad request: no \"command\" string".to_string()),
                Some(c) if c == "query-devices" || c.starts_with("cxl-") => cxl::handle(self, line),
                Some(c) if c.starts_with("iommu-") => iommu::handle(self, &request),
                Some(c) if c.starts_with("ioat-") => ioat::handle(self, &request),
                Some(c) if c.starts_with("dma-engine-") => dma_engine::handle(self, &request),
                Some(c) if c.starts_with("nic-") => nic::handle(self, &request),
                Some(c) => Err(unsupported_qmp_command(line).unwrap_or(format!(
                    "bad request: unknown command '{c}' (commands: {})",
                    COMMANDS.join(", ")
                ))),
            },
        };
        match answer {
            Ok(result) => json!({"ok": true, "result": result}).to_string(),
            Err(error) => json!({"ok": false, "error": error}).to_string(),
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes (without the newline). `Ok(None)` at end of
/// input; an over-long line is consumed and reported as an error string.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<Result<String, String>>> {
    let mut buf = Vec::new();
    let n = reader
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') && buf.len() > MAX_LINE {
        // Skip the rest of the line.
        let mut rest = Vec::new();
        reader.read_until(b'\n', &mut rest)?;
        return Ok(Some(Err(format!(
            "bad request: line longer than {MAX_LINE} bytes"
        ))));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(
        String::from_utf8(buf).map_err(|_| "bad request: not UTF-8".to_string()),
    ))
}

/// Serves JSON lines on one byte stream until it ends: each request answered by `answer`.
fn serve_stream(
    reader: impl Read,
    mut writer: impl Write,
    answer: &dyn Fn(&str) -> String,
) -> io::Result<()> {
    let mut reader = BufReader::new(reader);
    while let Some(line) = read_line(&mut reader)? {
        let response = match line {
            Ok(l) if l.trim().is_empty() => continue,
            Ok(l) => answer(&l),
            Err(e) => json!({"ok": false, "error": e}).to_string(),
        };
        writer.write_all(response.as_bytes())?;
        writer.write_all(b"\n")?;
        writer.flush()?;
    }
    Ok(())
}

/// Binds `path` as a listening UNIX socket, replacing a stale socket (nobody listening) but
/// never any other kind of file.
fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse {
                    path: path.to_path_buf(),
                });
            }
            fs::remove_file(path).map_err(io_err)?;
        }
        Ok(_) => {
            return Err(ControlError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    UnixListener::bind(path).map_err(io_err)
}

/// Accepts connections on `listener` forever, one thread each, answering with `answer`.
fn accept_loop(listener: UnixListener, answer: Arc<dyn Fn(&str) -> String + Send + Sync>) {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                log::warn!("control socket: accept failed: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let answer = answer.clone();
        let spawned = thread::Builder::new()
            .name("vmm-ctl-conn".into())
            .spawn(move || {
                let reader = match conn.try_clone() {
                    Ok(r) => r,
                    Err(e) => {
                        log::warn!("control connection: {e}");
                        return;
                    }
                };
                if let Err(e) = serve_stream(reader, conn, &*answer) {
                    log::debug!("control connection ended: {e}");
                }
            });
        if let Err(e) = spawned {
            log::warn!("control socket: cannot start a connection thread: {e}");
        }
    }
}

/// The bound control socket of a directly running VMM: bound before the VM is built (so a bad
/// path fails early), served once the devices exist. Removes the socket file when dropped.
pub struct ControlListener {
    path: PathBuf,
    listener: Mutex<Option<UnixListener>>,
}

impl std::fmt::Debug for ControlListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlListener({})", self.path.display())
    }
}

impl ControlListener {
    /// Binds `path` (see [`bind`] for what it replaces).
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        Ok(Self {
            listener: Mutex::new(Some(bind(path)?)),
            path: path.to_path_buf(),
        })
    }

    /// Serves `target` from a background thread. A second call does nothing.
    pub fn serve(&self, target: ControlTarget) -> Result<(), ControlError> {
        let Some(listener) = self
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return Ok(());
        };
        let target = Arc::new(target);
        let answer: Arc<dyn Fn(&str) -> String + Send + Sync> =
            Arc::new(move |line: &str| target.handle_line(line));
        thread::Builder::new()
            .name("vmm-ctl".into())
            .spawn(move || accept_loop(listener, answer))
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })?;
        log::info!("control socket listening on {}", self.path.display());
        Ok(())
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Puts a serial port into raw mode (no echo, no line editing, no CR/LF translation).
fn make_raw(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it for an open descriptor we own.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor and `t` a valid termios to fill.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `t` is a valid termios obtained above.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    t.c_cflag &= !libc::CRTSCTS;
    // SAFETY: `fd` is open and `t` a valid termios.
    if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Inside the nested host: serves `target` on the serial port `tty` (the outer VMM's
/// [`Relay`] is on the other end), after sending [`READY_LINE`].
pub fn serve_serial(tty: &Path, target: ControlTarget) -> Result<(), ControlError> {
    let io_err = |source| ControlError::Io {
        path: tty.to_path_buf(),
        source,
    };
    let port = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_noctty()
        .open(tty)
        .map_err(io_err)?;
    make_raw(&port).map_err(io_err)?;
    let mut writer = port.try_clone().map_err(io_err)?;
    writer
        .write_all(format!("{READY_LINE}\n").as_bytes())
        .map_err(io_err)?;
    thread::Builder::new()
        .name("vmm-ctl-serial".into())
        .spawn(move || {
            if let Err(e) = serve_stream(port, writer, &|l| target.handle_line(l)) {
                log::warn!("control port: {e}");
            }
        })
        .map_err(io_err)?;
    Ok(())
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOCTTY)
    }
}

/// State shared by the relay's threads.
struct RelayShared {
    /// Set once the VMM inside announced itself.
    ready: Mutex<bool>,
    ready_cv: Condvar,
    /// Answers from inside, in order, and how many of the next ones belong to requests that
    /// timed out (they are skipped, so a late answer never goes to the wrong request).
    answers: Mutex<(mpsc::Receiver<String>, usize)>,
    /// Our end of the serial link (written by one request at a time).
    link: Mutex<std::fs::File>,
    /// How long a request waits for its answer.
    answer_wait: Duration,
}

/// Outside the nested host: listens on the user's control socket and forwards each request
/// over the nested host's control serial port. Removes the socket file when dropped.
pub struct Relay {
    path: PathBuf,
}

impl Relay {
    /// Binds `path`; `link` is our end of the socket pair whose other end is the nested host's
    /// control serial port.
    pub fn start(path: &Path, link: OwnedFd) -> Result<Self, ControlError> {
        Self::start_with_wait(path, link, RELAY_ANSWER_WAIT)
    }

    fn start_with_wait(
        path: &Path,
        link: OwnedFd,
        answer_wait: Duration,
    ) -> Result<Self, ControlError> {
        let io_err = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        let listener = bind(path)?;
        let link = std::fs::File::from(link);
        let reader = link.try_clone().map_err(io_err)?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(RelayShared {
            ready: Mutex::new(false),
            ready_cv: Condvar::new(),
            answers: Mutex::new((rx, 0)),
            link: Mutex::new(link),
            answer_wait,
        });
        let from_inside = shared.clone();
        thread::Builder::new()
            .name("vmm-ctl-link".into())
            .spawn(move || {
                let mut reader = BufReader::new(reader);
                while let Ok(Some(line)) = read_line(&mut reader) {
                    let Ok(line) = line else { continue };
                    // Serial noise before the VMM inside opened the port is not JSON: skip it.
                    if line.trim() == READY_LINE {
                        *from_inside
                            .ready
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner) = true;
                        from_inside.ready_cv.notify_all();
                    } else if line.starts_with('{') && tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(io_err)?;
        let answer: Arc<dyn Fn(&str) -> String + Send + Sync> =
            Arc::new(move |line: &str| relay_one(&shared, line));
        thread::Builder::new()
            .name("vmm-ctl".into())
            .spawn(move || accept_loop(listener, answer))
            .map_err(io_err)?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn relay_one(shared: &RelayShared, line: &str) -> String {
    let fail = |e: &str| json!({"ok": false, "error": e}).to_string();
    // Only well-formed JSON goes over the link, re-encoded on one line, so a malformed request
    // cannot desynchronise it.
    let compact = match serde_json::from_str::<Value>(line) {
        Ok(v) => v.to_string(),
        Err(e) => return fail(&format!("bad request: {e}")),
    };
    let deadline = Instant::now() + RELAY_READY_WAIT;
    {
        let mut ready = shared.ready.lock().unwrap_or_else(PoisonError::into_inner);
        while !*ready {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return fail("the VM did not start serving the control API in time");
            }
            ready = shared
                .ready_cv
                .wait_timeout(ready, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
    // One request in flight at a time: hold the link while waiting for the answer.
    let mut link = shared.link.lock().unwrap_or_else(PoisonError::into_inner);
    let mut guard = shared
        .answers
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let (answers, abandoned) = &mut *guard;
    if let Err(e) = link
        .write_all(format!("{compact}\n").as_bytes())
        .and_then(|()| link.flush())
    {
        return fail(&format!("the VM's control link failed: {e}"));
    }
    let deadline = Instant::now() + shared.answer_wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match answers.recv_timeout(left) {
            // The late answer of a request that timed out earlier: not ours.
            Ok(_) if *abandoned > 0 => *abandoned -= 1,
            Ok(answer) => return answer,
            Err(_) => {
                *abandoned += 1;
                return fail("the VM did not answer (has it exited?)");
            }
        }
    }
}

/// `vmm ctl`: sends `request` (one JSON object) to the control socket at `path` and returns
/// the answer line. Waits up to `wait` for the socket to appear (the VM may be starting).
pub fn client_request(path: &Path, request: &Value, wait: Duration) -> Result<Value, String> {
    let deadline = Instant::now() + wait;
    let mut stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "cannot connect to control socket '{}': {e} (is `vmm run --control {}` running?)",
                        path.display(),
                        path.display()
                    ));
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    };
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(|e| format!("control socket '{}': {e}", path.display()))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("control socket '{}': {e}", path.display()))?;
    if line.trim().is_empty() {
        return Err(format!(
            "control socket '{}' closed without an answer",
            path.display()
        ));
    }
    serde_json::from_str(line.trim())
        .map_err(|e| format!("control socket '{}': malformed answer: {e}", path.display()))
}

/// QEMU QMP CXL commands this control API does not offer, with what is missing.
const UNSUPPORTED_QMP_COMMANDS: &[(&str, &str)] = &[
    (
        "cxl-add-dynamic-capacity",
        "dynamic capacity devices are not modelled",
    ),
    (
        "cxl-release-dynamic-capacity",
        "dynamic capacity devices are not modelled",
    ),
];

/// A clear refusal for a QMP CXL command we do not implement, instead of serde's "unknown
/// variant" (the line's `command` field, if it names one of them).
fn unsupported_qmp_command(line: &str) -> Option<String> {
    let value: Value = serde_json::from_str(line).ok()?;
    let command = value.get("command")?.as_str()?;
    let (_, why) = UNSUPPORTED_QMP_COMMANDS
        .iter()
        .find(|(name, _)| *name == command)?;
    Some(format!(
        "{command} is not supported by this VMM: {why}; poison, event records and device state are"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::cxl::memdev::{Memdev, MemdevConfig, SharedMemdev};

    fn target() -> ControlTarget {
        let memdev = Memdev::new(MemdevConfig {
            volatile_bytes: 256 << 20,
            persistent_bytes: 0,
            lsa: None,
            serial: 7,
            id: "cxl0".into(),
        })
        .unwrap();
        ControlTarget {
            devices: vec![ControlDevice {
                id: "cxl0".into(),
                memdev: SharedMemdev::new(memdev),
                function: None,
                root_port: None,
            }],
            iommu: None,
            ioat: Vec::new(),
            nics: Vec::new(),
            dma_engines: Vec::new(),
        }
    }

    fn ask(t: &ControlTarget, req: &str) -> Value {
        serde_json::from_str(&t.handle_line(req)).unwrap()
    }

    #[test]
    fn poison_injection_shows_in_the_state_report_and_clears() {
        let t = target();
        let r = ask(
            &t,
            r#"{"command":"cxl-inject-poison","device":"cxl0","dpa":4096,"length":128}"#,
        );
        assert_eq!(r["ok"], true, "{r}");
        let s = ask(&t, r#"{"command":"cxl-state","device":"cxl0"}"#);
        assert_eq!(s["result"]["poison"][0]["dpa"], 4096);
        assert_eq!(s["result"]["poison"][0]["length"], 128);
        assert_eq!(s["result"]["poison"][0]["source"], "internal");
        assert_eq!(s["result"]["hdm_decoders"], json!([]));
        // The guest's name for the first device works too.
        let s = ask(&t, r#"{"command":"cxl-state","device":"mem0"}"#);
        assert_eq!(s["result"]["id"], "cxl0");
        let r = ask(
            &t,
            r#"{"command":"cxl-clear-poison","device":"cxl0","dpa":4096,"length":128}"#,
        );
        assert_eq!(r["ok"], true, "{r}");
        let s = ask(&t, r#"{"command":"cxl-state","device":"cxl0"}"#);
        assert_eq!(s["result"]["poison"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn events_land_in_the_named_log() {
        let t = target();
        let r = ask(
            &t,
            r#"{"command":"cxl-inject-general-media-event","device":"cxl0","dpa":8192,"log":"warning","descriptor":1,"type":0,"transaction_type":1,"channel":2}"#,
        );
        assert_eq!(r["ok"], true, "{r}");
        let r = ask(
            &t,
            r#"{"command":"cxl-inject-dram-event","device":"cxl0","dpa":64,"row":5,"column":3}"#,
        );
        assert_eq!(r["ok"], true, "{r}");
        let r = ask(
            &t,
            r#"{"command":"cxl-inject-memory-module-event","device":"cxl0","log":"fatal","health_status":4,"temperature":90}"#,
        );
        assert_eq!(r["ok"], true, "{r}");
        let s = ask(&t, r#"{"command":"cxl-state","device":"cxl0"}"#);
        let logs = s["result"]["event_logs"].as_array().unwrap();
        let pending = |name: &str| {
            logs.iter().find(|l| l["log"] == name).unwrap()["pending"]
                .as_u64()
                .unwrap()
        };
        assert_eq!(pending("warning"), 1);
        assert_eq!(pending("failure"), 1);
        assert_eq!(pending("fatal"), 1);
        assert_eq!(pending("informational"), 0);
        assert_eq!(s["result"]["health"]["temperature"], 90);
        assert_eq!(s["result"]["health"]["health_status"], 4);
    }

    #[test]
    fn bad_requests_get_one_line_errors() {
        let t = target();
        for (req, needle) in [
            ("not json", "bad request"),
            (
                r#"{"command":"reboot-universe"}"#,
                "unknown command 'reboot-universe'",
            ),
            (r#"{"command":"cxl-reboot"}"#, "unknown variant"),
            (r#"{"device":"cxl0"}"#, "no \"command\""),
            (
                r#"{"command":"iommu-state"}"#,
                "no IOMMU: this VM runs without --iommu vtd",
            ),
            (r#"{"command":"iommu-reset"}"#, "iommu-state"),
            (
                r#"{"command":"iommu-inject-fault","device":"00:03.0"}"#,
                "no IOMMU",
            ),
            (
                r#"{"command":"cxl-add-dynamic-capacity","device":"cxl0"}"#,
                "cxl-add-dynamic-capacity is not supported by this VMM",
            ),
            (
                r#"{"command":"cxl-inject-correctable-error","device":"cxl0","type":"bit-flip"}"#,
                "unknown correctable error type 'bit-flip' (one of: cache-data-ecc,",
            ),
            (
                r#"{"command":"cxl-inject-uncorrectable-errors","device":"cxl0","errors":[]}"#,
                "at least one",
            ),
            (
                r#"{"command":"cxl-inject-uncorrectable-errors","device":"cxl0","errors":[{"type":"internal","header":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]}]}"#,
                "at most 16",
            ),
            (
                r#"{"command":"cxl-inject-uncorrectable-errors","device":"nope","errors":[{"type":"internal"}]}"#,
                "no CXL device 'nope'",
            ),
            (
                r#"{"command":"cxl-state","device":"nope"}"#,
                "no CXL device 'nope'",
            ),
            (
                r#"{"command":"cxl-inject-poison","device":"cxl0","dpa":1,"length":64}"#,
                "cxl0",
            ),
            (
                r#"{"command":"cxl-inject-poison","device":"cxl0","dpa":268435456,"length":64}"#,
                "cxl0",
            ),
            (
                r#"{"command":"cxl-inject-poison","device":"cxl0","dpa":0,"length":64,"bogus":1}"#,
                "unknown field",
            ),
            (
                r#"{"command":"cxl-inject-general-media-event","device":"cxl0","dpa":0,"component_id":"01234567890123456789"}"#,
                "longer than 16",
            ),
        ] {
            let r = ask(&t, req);
            assert_eq!(r["ok"], false, "{req}: {r}");
            let e = r["error"].as_str().unwrap();
            assert!(e.contains(needle), "{req}: {e}");
            assert!(!e.contains('\n'));
        }
        // The device is unchanged by all of that.
        let s = ask(&t, r#"{"command":"cxl-state","device":"cxl0"}"#);
        assert_eq!(s["result"]["poison"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn arbitrary_request_lines_get_an_answer_never_a_panic() {
        let t = target();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let pieces = [
            "{",
            "}",
            "\"command\"",
            ":",
            ",",
            "\"cxl-inject-poison\"",
            "\"device\"",
            "\"cxl0\"",
            "\"dpa\"",
            "\"length\"",
            "18446744073709551615",
            "-1",
            "64",
            "null",
            "[",
            "]",
            "\"log\"",
            "\"fatal\"",
            "\"cxl-inject-dram-event\"",
            "1e99",
            "\"\\u0000\"",
        ];
        for _ in 0..20_000 {
            let n = next() % 16;
            let line: String = (0..n)
                .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                .collect();
            let answer: Value = serde_json::from_str(&t.handle_line(&line)).unwrap();
            assert!(answer["ok"].is_boolean(), "{line} -> {answer}");
        }
    }

    #[test]
    fn socket_serves_requests_and_refuses_to_replace_other_files() {
        let dir = std::env::temp_dir().join(format!("vmm-ctl-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let regular = dir.join("file");
        fs::write(&regular, b"keep me").unwrap();
        assert!(matches!(
            ControlListener::bind(&regular),
            Err(ControlError::NotASocket { .. })
        ));
        assert_eq!(fs::read(&regular).unwrap(), b"keep me");

        let sock = dir.join("ctl.sock");
        let server = ControlListener::bind(&sock).unwrap();
        server.serve(target()).unwrap();
        assert!(matches!(
            ControlListener::bind(&sock),
            Err(ControlError::InUse { .. })
        ));
        let r = client_request(
            &sock,
            &json!({"command":"query-devices"}),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r["result"][0]["id"], "cxl0");
        assert_eq!(r["result"][0]["volatile_bytes"], 256u64 << 20);
        drop(server);
        assert!(!sock.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_late_answer_never_goes_to_the_next_request() {
        let dir = std::env::temp_dir().join(format!("vmm-relay-late-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("ctl.sock");
        let (outer, inner) = UnixStream::pair().unwrap();
        let _relay =
            Relay::start_with_wait(&sock, OwnedFd::from(outer), Duration::from_millis(300))
                .unwrap();
        // The "VMM inside" answers its first request only after the relay gave up on it: it
        // holds the answer until the second request arrives (which the client sends only once
        // the first timed out), then answers both at once. No timing assumption.
        let server = thread::spawn(move || {
            let mut w = inner.try_clone().unwrap();
            w.write_all(format!("{READY_LINE}\n").as_bytes()).unwrap();
            let mut r = BufReader::new(inner);
            for _ in 0..2 {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
            }
            for n in 0..2 {
                w.write_all(format!("{{\"ok\":true,\"result\":{n}}}\n").as_bytes())
                    .unwrap();
            }
        });
        let ask = || {
            client_request(
                &sock,
                &json!({"command":"query-devices"}),
                Duration::from_secs(5),
            )
            .unwrap()
        };
        let first = ask();
        assert_eq!(first["ok"], false, "{first}");
        let second = ask();
        assert_eq!(second["result"], 1, "{second}");
        server.join().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn relay_forwards_after_ready() {
        let dir = std::env::temp_dir().join(format!("vmm-relay-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("ctl.sock");
        let (outer, inner) = UnixStream::pair().unwrap();
        let _relay = Relay::start(&sock, OwnedFd::from(outer)).unwrap();
        // The "VMM inside": noise first, then ready, then serve.
        let t = target();
        let server = thread::spawn(move || {
            let mut w = inner.try_clone().unwrap();
            w.write_all(b"\x00garbage\n").unwrap();
            w.write_all(format!("{READY_LINE}\n").as_bytes()).unwrap();
            let _ = serve_stream(inner, w, &|l| t.handle_line(l));
        });
        let r = client_request(
            &sock,
            &json!({"command":"cxl-inject-poison","device":"cxl0","dpa":0,"length":64}),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r["ok"], true, "{r}");
        let r = client_request(
            &sock,
            &json!({"command":"cxl-state","device":"cxl0"}),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r["result"]["poison"][0]["length"], 64);
        drop(_relay);
        drop(server);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// `iommu-state` reports what the guest programmed and what the unit did.
    #[test]
    fn iommu_state_reports_mode_features_and_counters() {
        use ::iommu::vtd::registers::{VtdConfig, global, iqa, offset};
        use ::iommu::vtd::unit::RemappingUnit;
        use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
        let memory = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        );
        let mut unit =
            RemappingUnit::new(VtdConfig::default(), memory, Arc::new(::iommu::NullMsiSink));
        unit.write(offset::RTADDR, &(0x1000u64 | (1 << 10)).to_le_bytes());
        unit.write(offset::GCMD, &global::SRTP.to_le_bytes());
        unit.write(offset::IQA, &(0x8000u64 | iqa::DW).to_le_bytes());
        unit.write(offset::GCMD, &(global::QIE | global::TE).to_le_bytes());
        let mut t = target();
        t.iommu = Some(Arc::new(Mutex::new(unit)));
        let r = ask(&t, r#"{"command":"iommu-state"}"#);
        assert_eq!(r["ok"], true, "{r}");
        let s = &r["result"];
        assert_eq!(s["translation_enabled"], true);
        assert_eq!(s["queued_invalidation_enabled"], true);
        assert_eq!(s["root_table"], "0x1000");
        assert_eq!(s["root_table_mode"], "scalable");
        assert_eq!(s["invalidation_queue"]["descriptor_bits"], 256);
        assert_eq!(s["counters"]["faults"], 0);
        assert_eq!(s["counters"]["iotlb"]["hits"], 0);
        assert_eq!(s["devices"], json!([]));
        // Fault injection: parsed, validated, pending in the state.
        let r = ask(
            &t,
            r#"{"command":"iommu-inject-fault","device":"00:03.0","count":3}"#,
        );
        assert_eq!(
            r["result"],
            json!({"device": "00:03.0", "pending": 3}),
            "{r}"
        );
        let r = ask(
            &t,
            r#"{"command":"iommu-inject-fault","device":"0000:00:03.0"}"#,
        );
        assert_eq!(r["result"]["pending"], 4, "{r}");
        let s = ask(&t, r#"{"command":"iommu-state"}"#);
        assert_eq!(
            s["result"]["pending_fault_injections"],
            json!([{"device": "00:03.0", "count": 4}])
        );
        for (req, needle) in [
            (r#"{"command":"iommu-inject-fault"}"#, "needs \"device\""),
            (
                r#"{"command":"iommu-inject-fault","device":"00:20.0"}"#,
                "bad device '00:20.0'",
            ),
            (
                r#"{"command":"iommu-inject-fault","device":"3.0"}"#,
                "bad device '3.0'",
            ),
            (
                r#"{"command":"iommu-inject-fault","device":"00:03.8"}"#,
                "bad device '00:03.8'",
            ),
            (
                r#"{"command":"iommu-inject-fault","device":3}"#,
                "bad device 3",
            ),
            (
                r#"{"command":"iommu-inject-fault","device":"00:03.0","count":0}"#,
                "bad count 0",
            ),
            (
                r#"{"command":"iommu-inject-fault","device":"00:03.0","count":65536}"#,
                "bad count 65536",
            ),
            (
                r#"{"command":"iommu-inject-fault","device":"00:03.0","count":"x"}"#,
                "bad count \"x\"",
            ),
            (
                r#"{"command":"iommu-inject-fault","device":"00:03.0","rid":1}"#,
                "unknown field `rid`",
            ),
        ] {
            let r = ask(&t, req);
            let e = r["error"].as_str().unwrap_or_default();
            assert!(e.contains(needle) && !e.contains('\n'), "{req}: {r}");
        }
        let extra = ask(&t, r#"{"command":"iommu-state","verbose":true}"#);
        assert!(
            extra["error"]
                .as_str()
                .unwrap()
                .contains("unknown field `verbose`")
        );
        // SVA injections: pending ones show in the answer and in iommu-state.
        let r = ask(
            &t,
            r#"{"command":"iommu-inject-page-response","code":"failure","count":2}"#,
        );
        assert_eq!(
            r["result"]["forced_page_responses"],
            json!({"code": "failure", "count": 2}),
            "{r}"
        );
        let r = ask(&t, r#"{"command":"iommu-drop-page-requests","count":3}"#);
        assert_eq!(r["result"]["dropped_page_requests"], 3, "{r}");
        let r = ask(
            &t,
            r#"{"command":"iommu-delay-invalidation-wait","ms":250}"#,
        );
        assert_eq!(r["result"]["invalidation_wait_delay_ms"], 250, "{r}");
        let s = ask(&t, r#"{"command":"iommu-state"}"#);
        let s = &s["result"];
        assert_eq!(s["sva_injections"]["dropped_page_requests"], 3, "{s}");
        assert_eq!(
            (s["pasid_bits"].clone(), s["ats"].clone()),
            (json!(20), json!(true))
        );
        assert_eq!(s["counters"]["sva"]["page_requests"], 0, "{s}");
        assert_eq!(s["page_request_queue"]["overflow"], false, "{s}");
        for (req, needle) in [
            (
                r#"{"command":"iommu-inject-page-response"}"#,
                "needs \"code\"",
            ),
            (
                r#"{"command":"iommu-inject-page-response","code":"success"}"#,
                "bad code \"success\"",
            ),
            (
                r#"{"command":"iommu-drop-page-requests","count":0}"#,
                "bad count 0",
            ),
            (
                r#"{"command":"iommu-delay-invalidation-wait","ms":10001}"#,
                "bad ms 10001",
            ),
            (
                r#"{"command":"iommu-delay-invalidation-wait"}"#,
                "needs \"ms\"",
            ),
        ] {
            let r = ask(&t, req);
            let e = r["error"].as_str().unwrap_or_default();
            assert!(e.contains(needle) && !e.contains('\n'), "{req}: {r}");
        }
    }
}
