//! Test harness: runs the built `vmm` binary and captures what it prints.
//!
//! Guest tests boot real guests through the public CLI (`vmm run`). Where this machine's
//! /dev/kvm cannot run a stock guest, `vmm run` itself moves into the nested-KVM host
//! (`--host auto`, the default) and says so on stderr; nothing is skipped.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

/// Path of the `vmm` binary cargo built for these tests.
pub const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// Guest boots are heavy (a TCG host on 2 cores): run them one at a time.
static GUEST_LOCK: Mutex<()> = Mutex::new(());

/// Outcome of one `vmm` invocation.
#[derive(Debug)]
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// Panics with everything the run printed unless it exited with `code`.
    pub fn expect_status(&self, code: i32) -> &Self {
        assert_eq!(
            self.status,
            Some(code),
            "expected exit status {code}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

fn run_with_limit(mut cmd: Command, stdin: Option<&[u8]>, limit: Duration) -> Run {
    let started = Instant::now();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("spawning vmm");
    if let Some(input) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().expect("stdin pipe");
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
            // Keep the pipe open a while so the guest shell reads everything before EOF.
            std::thread::sleep(Duration::from_secs(600));
        });
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output: Output = match rx.recv_timeout(limit) {
        Ok(out) => out.expect("waiting for vmm"),
        Err(_) => {
            // SAFETY: sending SIGKILL to the child process we spawned.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("vmm did not finish within {limit:?}");
        }
    };
    Run {
        status: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// Runs `vmm` with `args` (no guest boot expected; fast).
pub fn vmm<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(VMM);
    cmd.args(args);
    run_with_limit(cmd, None, Duration::from_secs(120))
}

/// Boots a guest with `vmm` and `args`; serialised with other guest boots.
pub fn guest<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    guest_with_stdin(args, None)
}

/// Like [`guest`], feeding `stdin` to the VMM (the interactive console).
pub fn guest_with_stdin<I, S>(args: I, stdin: Option<&[u8]>) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let _serial = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new(VMM);
    cmd.args(args);
    let run = run_with_limit(cmd, stdin, Duration::from_secs(20 * 60));
    eprintln!(
        "guest run took {:.1} s; stderr:\n{}",
        run.elapsed.as_secs_f64(),
        run.stderr
    );
    run
}

/// Boots two guests at once, each its own `vmm` with its own `args` (two VMs talking to each
/// other); serialised with other guest boots. Each run is limited to 20 minutes.
pub fn guests_side_by_side(a: Vec<std::ffi::OsString>, b: Vec<std::ffi::OsString>) -> (Run, Run) {
    let _serial = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let spawn = |args: Vec<std::ffi::OsString>| {
        std::thread::spawn(move || {
            let mut cmd = Command::new(VMM);
            cmd.args(args);
            run_with_limit(cmd, None, Duration::from_secs(20 * 60))
        })
    };
    let (ta, tb) = (spawn(a), spawn(b));
    let (ra, rb) = (ta.join().expect("guest A"), tb.join().expect("guest B"));
    for (name, run) in [("A", &ra), ("B", &rb)] {
        eprintln!(
            "guest {name} took {:.1} s; stderr:\n{}",
            run.elapsed.as_secs_f64(),
            run.stderr
        );
    }
    (ra, rb)
}

/// The default guest image (built on first use), for tests that need its paths or release.
pub fn default_image() -> guest_images::GuestImage {
    let store = guest_images::ImageStore::from_env().expect("image cache");
    store
        .guest(guest_images::DEFAULT_PROFILE)
        .expect("building the default guest image")
}

/// Builds the guest tool `tests/guest-tools/<name>.rs` (a single-file, std-only program) into a
/// static binary with the host's `rustc` (or `$RUSTC`) and returns its path, for
/// `vmm run --guest-file`. Built at most once per test process, into
/// `$CARGO_TARGET_TMPDIR/guest-tools/`; a binary newer than its source is reused. A compile failure panics with rustc's output.
pub fn guest_tool(name: &str) -> std::path::PathBuf {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());

    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guest-tools");
    let source = tools.join(format!("{name}.rs"));
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-tools");
    std::fs::create_dir_all(&out_dir).expect("creating the guest-tools directory");
    let binary = out_dir.join(name);
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let source_time = modified(&source)
        .unwrap_or_else(|| panic!("guest tool source {} is missing", source.display()));
    let fresh = modified(&binary).is_some_and(|b| b >= source_time);
    if !fresh {
        // Build under a private name, then rename: another test process may be reading the
        // previous binary.
        let tmp = out_dir.join(format!(".{name}.{}", std::process::id()));
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let out = Command::new(&rustc)
            .args([
                "--edition",
                "2024",
                "-O",
                "-C",
                "target-feature=+crt-static",
            ])
            .arg(&source)
            .arg("-o")
            .arg(&tmp)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", rustc.to_string_lossy()));
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            panic!(
                "compiling guest tool {} failed ({}):\n{}",
                source.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::rename(&tmp, &binary).expect("installing the guest tool");
    }
    built.insert(name.to_string(), binary.clone());
    binary
}

/// A `vmm run` booting in the background (serialised with other guest boots of this test
/// process), whose stdout lines arrive as they are printed, so a test can act while the guest
/// runs: wait for a marker, signal or kill the VMM, then collect how it ended. Its stderr is
/// collected and echoed to ours.
pub struct RunningGuest {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// What stdout ended with after its last newline (a line cut short by the end of the run).
    unterminated: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
    /// Run when a wait times out; its text joins the failure message (the VMM's state, say).
    stall_report: Option<Box<dyn FnMut() -> String>>,
    /// The guest kernel console (`--console-log`), shown when a wait fails.
    console_log: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

impl RunningGuest {
    /// `vmm ARGS[0] --console-log=CONSOLE_LOG ARGS[1..]` (ARGS[0] is `run`).
    pub fn start(console_log: PathBuf, args: &[String]) -> Self {
        let serial = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut child = Command::new(VMM)
            .arg(args[0].as_str())
            .arg(format!("--console-log={}", console_log.display()))
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vmm run");
        let stdout = child.stdout.take().expect("stdout pipe");
        let (tx, lines) = mpsc::channel();
        let unterminated = Arc::new(Mutex::new(String::new()));
        let tail = unterminated.clone();
        std::thread::spawn(move || {
            // Only newline-terminated lines are lines: a SIGKILL can cut the last one short
            // (`SYNCED <sha> r4-32` read as `… r4-3`), and a cut line must not pass for a
            // whole one. The fragment is kept apart for `finish`.
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&buf).into_owned();
                let Some(line) = text.strip_suffix('\n') else {
                    *tail.lock().unwrap_or_else(|e| e.into_inner()) = text;
                    break;
                };
                let line = line.strip_suffix('\r').unwrap_or(line).to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr pipe");
        let sink = stderr.clone();
        let stderr_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]);
                eprint!("{text}");
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&text);
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            unterminated,
            stall_report: None,
            stderr,
            stderr_thread: Some(stderr_thread),
            console_log,
            _serial: serial,
        }
    }

    /// The `vmm run` process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the `vmm run` process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to the child process we spawned (not yet reaped).
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Sets what a timed-out wait reports besides the output (e.g. the control API's view of
    /// the devices, taken before the guest is killed).
    pub fn on_stall(&mut self, report: impl FnMut() -> String + 'static) {
        self.stall_report = Some(Box::new(report));
    }

    /// Waits (at most 600 s of silence: one phase of the SVA tests — 16384 page requests under
    /// nested TCG — can take minutes when two guests share the 2 CPUs) for a stdout line
    /// containing `marker` and returns it; panics with
    /// what was printed and the guest console's last lines if the guest ends or takes too long.
    pub fn wait_for(&mut self, marker: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(600)) {
                Ok(line) => {
                    let hit = line.contains(marker);
                    self.seen.push(line.clone());
                    if hit {
                        return line;
                    }
                }
                Err(_) => {
                    let report = self.stall_report.as_mut().map(|f| f()).unwrap_or_default();
                    let _ = self.child.kill();
                    let console = std::fs::read_to_string(&self.console_log).unwrap_or_default();
                    let tail: Vec<&str> = console.lines().rev().take(60).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    panic!(
                        "guest never printed {marker:?}; stdout so far:\n{}\n--- state when it stalled:\n{report}\n--- stderr:\n{}\n--- last lines of the guest console ({}):\n{}",
                        self.seen.join("\n"),
                        self.stderr.lock().unwrap_or_else(|e| e.into_inner()),
                        self.console_log.display(),
                        tail.join("\n")
                    );
                }
            }
        }
    }

    /// Every stdout line so far (including any still queued).
    pub fn lines_so_far(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.clone()
    }

    /// Waits (at most 600 s) for the VMM to exit; returns its status (`None`: killed by a
    /// signal), the whole stdout (every complete line ends in a newline; a line the end of the
    /// run cut short comes last, without one) and the whole stderr.
    pub fn finish(mut self) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + Duration::from_secs(600);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for vmm run") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("vmm run did not exit within 600 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.seen.push(line);
        }
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let stderr = self
            .stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut stdout: String = self.seen.iter().map(|l| format!("{l}\n")).collect();
        stdout.push_str(&self.unterminated.lock().unwrap_or_else(|e| e.into_inner()));
        (status.code(), stdout, stderr)
    }
}
