//! `vmm host`: run a command inside the nested-KVM host.
//!
//! Where this machine's `/dev/kvm` cannot run a stock Linux guest (see `kvm_probe`), the VMM runs
//! one level down: QEMU with TCG emulates an AMD CPU with SVM, the host kernel inside loads the
//! real `kvm-amd`, and the VMM runs there against a working `/dev/kvm`. This module boots that
//! host, runs one command in it as if it ran here, and returns the command's exit status.
//!
//! # How a run works
//! * A run directory `<cache>/host-runs/run-<pid>-<nanos>/` (never under `/run`, which the host
//!   hides) holds `config` (shell assignments for the host's `/init`), `cmd.sh` (the command as a
//!   shell script with every argument and environment value single-quoted, so any byte but NUL
//!   survives), and receives `started` (just before the command runs), `status` / `error` /
//!   `stdout` / `stderr` from the host, plus
//!   `console.log` and `qemu.log`.
//! * QEMU exports this machine's `/` read-write (9p tag `host`) and the run directory (tag
//!   `vmmrun`). The host's `/init` (`guest-images/init/host-init.sh`) loads kvm-amd and 9p, mounts
//!   `/` with `cache=mmap`, mounts proc/sys/dev and a tmpfs on `/run` in it (`/tmp` stays the outer one), `chroot`s,
//!   and runs `cmd.sh`, which changes to the working directory, sets the environment and execs the
//!   command.
//! * Output reaches our stdout/stderr byte for byte, while the command runs. A stream that is a
//!   pipe or file here is a pipe inside too: the host's `/init` relays it (`cat`) into the run
//!   directory's `stdout`/`stderr` file over 9p, where each write is complete on this side when
//!   it returns; a thread here follows the file and copies new data out. A stream that is a
//!   terminal here is a terminal inside (so `isatty()` answers the same): ISA serial port
//!   `ttyS1` (stdout) / `ttyS2` (stderr) in raw mode, whose QEMU back ends are pipes copied out
//!   by threads here; the host drains them (`tcsetattr(TCSADRAIN)` waits until QEMU took every
//!   byte) before reporting. `ttyS0` is the host kernel console: `console.log`, and stderr with
//!   `VMM_HOST_VERBOSE=1`; it is never mixed into the command's output.
//! * Interactive runs connect `ttyS1` to our terminal (`-chardev stdio`, which puts it in raw
//!   mode); the command gets it as stdin/stdout (and stderr, when ours is a terminal) and as its
//!   controlling terminal, in cooked mode with our window size (raw when our stdin is not a
//!   terminal). Non-interactive runs give the command `/dev/null` as stdin and QEMU `/dev/null`.
//! * Exit status: the host writes the command's status (0..255; 128+N if killed by signal N) to
//!   `status` and powers off. No status (kernel panic, QEMU failure, init failure) is an error
//!   naming the console log and its last lines.
//! * SIGINT/SIGTERM/SIGHUP stop the run: `stop` in the run directory makes the host's `/init`
//!   send the command SIGTERM, then sync and power off; a second signal, or no shutdown within
//!   [`STOP_GRACE`], kills QEMU. Either way the run directory goes ([`HostError::Interrupted`]);
//!   QEMU also gets `PR_SET_PDEATHSIG(SIGKILL)` so it never outlives us.
//!
//! Knobs read from the environment: `VMM_CACHE_DIR` (else `$HOME/.cache/vmm`), `VMM_QEMU` (QEMU binary, default `qemu-system-x86_64`) and
//! `VMM_HOST_VERBOSE=1` (host console on stderr, run directory kept),
//! `VMM_HOST_CMDLINE_EXTRA` (more host kernel parameters, for experiments); `vmm run` also reads
//! `VMM_HOST_CPUS` (the nested host's vCPUs; default 1, see `DEFAULT_CPUS`).
//!
//! The host has a heartbeat device ([`HEARTBEAT_DEVICE`]): QEMU 7.2's TCG now and then loses the
//! host kernel's timer interrupt while it idles, and a guest waiting on a timer then stalls
//! until the next interrupt; a balloon whose statistics QEMU polls every second supplies one.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;

/// Set (to `1`) in the command's environment inside the nested host, so that a VMM started there
/// uses the host's `/dev/kvm` directly instead of nesting again.
pub const NESTED_MARKER_ENV: &str = "VMM_NESTED_HOST";
/// The project's cache directory (images, run directories); passed into the host unchanged.
pub const CACHE_DIR_ENV: &str = "VMM_CACHE_DIR";
/// QEMU arguments for the nested host's user-mode network: a virtio-net NIC on slirp's
/// 10.0.2.0/24 with each of `forwards` (UDP, on this machine) forwarded to the same port of the
/// host (10.0.2.15). The host's `/init` configures the interface when it sees one.
fn user_network_args(forwards: &[std::net::SocketAddr]) -> Vec<OsString> {
    let mut netdev = String::from("user,id=fabric,net=10.0.2.0/24,host=10.0.2.2");
    for f in forwards {
        let ip = match f.ip() {
            ip if ip.is_unspecified() => String::new(),
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        };
        netdev.push_str(&format!(
            ",hostfwd=udp:{ip}:{port}-:{port}",
            port = f.port()
        ));
    }
    vec![
        "-netdev".into(),
        netdev.into(),
        "-device".into(),
        "virtio-net-pci,netdev=fabric".into(),
    ]
}

/// QEMU binary to use instead of `qemu-system-x86_64` from `PATH`.
pub const QEMU_ENV: &str = "VMM_QEMU";
/// `1`: show the host kernel console on stderr and keep the run directory.
pub const VERBOSE_ENV: &str = "VMM_HOST_VERBOSE";
/// Default QEMU binary.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
/// Default vCPUs of the nested host: one. Several let QEMU's multi-threaded TCG race the host
/// kernel's text patching (see [`tcg_accel_option`]), which kills the host now and then; guest
/// vCPUs are threads inside the host and run on one host CPU too.
pub const DEFAULT_CPUS: u32 = 1;
/// Default memory of the nested host: a 4 GiB guest plus the host's own needs.
pub const DEFAULT_MEMORY_MIB: u64 = 6144;

/// CPU model of the TCG host: EPYC with SVM and nested paging. XSAVE and AVX-class features are
/// hidden because TCG reports inconsistent XSAVE sizes, which makes Debian 7.2 guests oops in
/// `fpstate_reset` (research/host-kvm.md); the second group are features TCG cannot emulate and
/// would drop anyway (hidden here so QEMU does not warn about them on every run).
pub const HOST_CPU_MODEL: &str = "EPYC,+svm,+npt,\
-xsave,-xsaveopt,-xsavec,-xsaves,-xgetbv1,-avx,-avx2,-fma,-f16c,-vaes,-vpclmulqdq,\
-rdseed,-sha-ni,-fxsr-opt,-misalignsse,-3dnowprefetch,-osvw,-topoext,-nrip-save";

/// The nested host's heartbeat device (see `qemu_args`): a balloon whose statistics QEMU
/// polls every second; the host image loads `virtio_balloon`.
const HEARTBEAT_DEVICE: &str = "virtio-balloon-pci,guest-stats-polling-interval=1";

/// Version of the run-directory protocol spoken with `guest-images/init/host-init.sh`.
const PROTOCOL_VERSION: u32 = 2;
/// Directories the host replaces with its own file systems: invisible from inside.
const HIDDEN_PREFIXES: &[&str] = &["/run", "/proc", "/sys", "/dev"];
/// Failed run directories kept for inspection.
const KEEP_FAILED_RUNS: usize = 5;
/// Console lines quoted in an error.
const TAIL_LINES: usize = 4;
/// Requested capacity of the output pipes (QEMU blocks when a pipe is full).
const PIPE_CAPACITY: libc::c_int = 1 << 20;
/// How often the wait loop checks QEMU and signals.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// What to boot and how to run the command.
#[derive(Debug, Clone)]
pub struct NestedHostOptions {
    /// Host kernel (bzImage) with SVM-capable `kvm-amd` and 9p modules in `initramfs`.
    pub kernel: PathBuf,
    /// Host initramfs: busybox, the modules, `host-init.sh` as `/init`.
    pub initramfs: PathBuf,
    /// vCPUs of the nested host ([`DEFAULT_CPUS`]).
    pub cpus: u32,
    /// Memory of the nested host in MiB ([`DEFAULT_MEMORY_MIB`]).
    pub memory_mib: u64,
    /// The command's working directory; must be visible inside (not under `/run`, `/proc`, ...).
    pub workdir: PathBuf,
    /// Connect our terminal (stdin) to the command; otherwise its stdin is `/dev/null`.
    pub interactive: bool,
    /// QEMU's end of the control link: becomes the host's [`CONTROL_PORT_TTY`] (the VMM inside
    /// serves the control API there; `control::Relay` holds the other end).
    pub control_port: Option<Arc<OwnedFd>>,
    /// Files handed to the host as NVDIMMs (slot = index), so the command inside can map them
    /// with its stores landing in this machine's page cache (see `nested_memory`).
    pub shared_files: Vec<crate::nested_memory::SharedFile>,
    /// UDP addresses of this machine forwarded to the same port inside (the NICs' fabric
    /// sockets, `vmm run --nic`): the host gets a user-mode network (slirp, 10.0.2.15/24,
    /// gateway 10.0.2.2 = this machine's loopback) when there are any.
    pub udp_forwards: Vec<std::net::SocketAddr>,
}

/// The nested host's serial port that carries the control API (`vmm run --control`).
pub const CONTROL_PORT_TTY: &str = "/dev/ttyS3";

impl Default for NestedHostOptions {
    /// No kernel or initramfs yet; 2 vCPUs, 6 GiB, the current directory, non-interactive.
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            workdir: PathBuf::from("."),
            interactive: false,
            control_port: None,
            shared_files: Vec::new(),
            udp_forwards: Vec::new(),
        }
    }
}

/// Why a command could not be run in the nested host (its own failures are exit statuses).
#[derive(Debug, Error)]
pub enum HostError {
    /// Bad options or an environment the host cannot work with.
    #[error("nested host: {0}")]
    Invalid(String),
    /// A local file or process operation failed.
    #[error("nested host: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// QEMU could not be started.
    #[error(
        "nested host: cannot start {}: {source} (install it with `apt-get install qemu-system-x86` or set {QEMU_ENV})",
        qemu.display()
    )]
    QemuSpawn {
        /// The QEMU binary.
        qemu: PathBuf,
        /// Why it did not start.
        #[source]
        source: io::Error,
    },
    /// The host did not report the command's exit status.
    #[error("nested host failed: {reason}; host console log: {}{}", console_log.display(), fmt_tail(tail))]
    Failed {
        /// One line: what went wrong.
        reason: String,
        /// The host kernel console log (kept for inspection).
        console_log: PathBuf,
        /// The console log's last lines, joined with " | ".
        tail: String,
        /// Whether the host had started the command (`started` in the run directory) before it
        /// failed: a failure before that is safe to retry, the command never ran.
        command_started: bool,
    },
    /// We were asked to stop (SIGINT, SIGTERM or SIGHUP). The command inside was asked to
    /// stop (SIGTERM) and the host shut down; if that took longer than [`STOP_GRACE`] or a
    /// second signal came, QEMU was killed. Exit with 128 + signal.
    #[error("stopped by {}: {}", crate::signals::name(*signal), if *clean {
        "the command in the nested host stopped and the host shut down"
    } else {
        "QEMU killed before the nested host had shut down"
    })]
    Interrupted {
        /// The signal number.
        signal: i32,
        /// Whether the host shut down by itself after the stop request.
        clean: bool,
    },
}

fn fmt_tail(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(" (last lines: {tail})")
    }
}

fn io_err(context: impl Into<String>, source: io::Error) -> HostError {
    HostError::Io {
        context: context.into(),
        source,
    }
}

/// Environment variable choosing QEMU's TCG threading for the host: `multi` (default) or
/// `single`.
pub const TCG_THREAD_ENV: &str = "VMM_HOST_TCG_THREAD";

/// `-accel` argument. With QEMU 7.2, multi-threaded TCG occasionally (about once in thirty runs
/// here) kills the host kernel on a stale `int3` while it patches its own text (static keys via
/// `text_poke_bp`: cross-modifying code another vCPU thread has not yet seen); callers retry
/// such a run once (see [`is_host_crash`]). Single-threaded TCG avoids that race but the nested
/// guest then makes next to no progress, so it is opt-in only.
fn tcg_accel_option() -> String {
    match std::env::var(TCG_THREAD_ENV).as_deref() {
        Ok("single") => "tcg,thread=single".into(),
        _ => "tcg,thread=multi".into(),
    }
}

/// True if `e` says the nested host's own kernel crashed (not the command, not the guest): an
/// infrastructure failure worth one retry.
pub fn is_host_crash(e: &HostError) -> bool {
    matches!(e, HostError::Failed { reason, .. } if reason.starts_with("host kernel panic"))
}

/// True if the nested host's kernel crashed before the command started: retrying cannot run
/// the command twice.
pub fn is_host_crash_before_command(e: &HostError) -> bool {
    is_host_crash(e)
        && matches!(
            e,
            HostError::Failed {
                command_started: false,
                ..
            }
        )
}

/// True inside the nested host (the command's environment has [`NESTED_MARKER_ENV`]).
pub fn inside_nested_host() -> bool {
    std::env::var_os(NESTED_MARKER_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The project's cache directory, as `guest-images` resolves it: `$VMM_CACHE_DIR`, else
/// `$HOME/.cache/vmm`.
pub fn default_cache_dir() -> Result<PathBuf, HostError> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty(CACHE_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(home) = non_empty("HOME") {
        return Ok(PathBuf::from(home).join(".cache").join("vmm"));
    }
    Err(HostError::Invalid(format!(
        "no cache directory: set {CACHE_DIR_ENV} or HOME"
    )))
}

/// Runs `argv` inside the nested host (an interactive `$SHELL` when `argv` is empty) and returns
/// its exit status (0..255, passed through unchanged), or an error if the host itself failed.
pub fn run_in_nested_host(opts: &NestedHostOptions, argv: &[OsString]) -> Result<i32, HostError> {
    let verbose = std::env::var_os(VERBOSE_ENV).is_some_and(|v| v == "1");
    let plan = Plan::prepare(opts, argv, verbose)?;
    let outcome = plan.execute(opts);
    plan.finish(outcome)
}

/// Everything decided before QEMU starts.
struct Plan {
    run_dir: PathBuf,
    qemu: PathBuf,
    stdout_tty: bool,
    stderr_tty: bool,
    stdin_tty: bool,
    verbose: bool,
}

/// How QEMU ended.
enum Outcome {
    Exited(ExitStatus),
    /// Stopped on a signal; whether the host shut down by itself.
    Interrupted(i32, bool),
    Error(HostError),
}

impl Plan {
    fn prepare(
        opts: &NestedHostOptions,
        argv: &[OsString],
        verbose: bool,
    ) -> Result<Self, HostError> {
        if inside_nested_host() {
            return Err(HostError::Invalid(format!(
                "already inside the nested host ({NESTED_MARKER_ENV} is set): run the command directly"
            )));
        }
        if opts.cpus == 0 {
            return Err(HostError::Invalid("cpus must be at least 1".into()));
        }
        if opts.memory_mib < 512 {
            return Err(HostError::Invalid(format!(
                "memory {} MiB is too small: the host needs at least 512 MiB",
                opts.memory_mib
            )));
        }
        for (what, path) in [("kernel", &opts.kernel), ("initramfs", &opts.initramfs)] {
            if !path.is_file() {
                return Err(HostError::Invalid(format!(
                    "host {what} {} does not exist (build it with `vmm images build`)",
                    path.display()
                )));
            }
        }
        let workdir = fs::canonicalize(&opts.workdir)
            .map_err(|e| io_err(format!("working directory {}", opts.workdir.display()), e))?;
        check_visible("working directory", &workdir)?;
        let cache_dir = default_cache_dir()?;
        fs::create_dir_all(&cache_dir).map_err(|e| {
            io_err(
                format!("creating cache directory {}", cache_dir.display()),
                e,
            )
        })?;
        let cache_dir = fs::canonicalize(&cache_dir)
            .map_err(|e| io_err(format!("cache directory {}", cache_dir.display()), e))?;
        check_visible(&format!("cache directory (${CACHE_DIR_ENV})"), &cache_dir)?;
        if let Some(first) = argv.first() {
            let p = Path::new(first);
            if p.is_absolute() {
                check_visible("command", p)?;
            }
        }

        let stdin_tty = io::stdin().is_terminal();
        let stdout_tty = io::stdout().is_terminal();
        let stderr_tty = io::stderr().is_terminal();
        let winsize = if opts.interactive {
            window_size(libc::STDIN_FILENO).or_else(|| window_size(libc::STDOUT_FILENO))
        } else {
            window_size(libc::STDOUT_FILENO).or_else(|| window_size(libc::STDERR_FILENO))
        };

        let runs = cache_dir.join("host-runs");
        fs::create_dir_all(&runs).map_err(|e| io_err(format!("creating {}", runs.display()), e))?;
        prune_runs(&runs);
        let run_dir = runs.join(format!("run-{}-{}", std::process::id(), unix_nanos()));
        fs::create_dir(&run_dir)
            .map_err(|e| io_err(format!("creating {}", run_dir.display()), e))?;

        let mut config = format!(
            "VMM_PROTO={PROTOCOL_VERSION}\nVMM_MODE={}\nVMM_STDOUT_TTY={}\nVMM_STDERR_TTY={}\n\
             VMM_STDERR_SAME={}\nVMM_TERM_RAW={}\n",
            if opts.interactive {
                "interactive"
            } else {
                "batch"
            },
            u8::from(stdout_tty),
            u8::from(stderr_tty),
            u8::from(
                stdout_tty && stderr_tty && same_terminal(libc::STDOUT_FILENO, libc::STDERR_FILENO)
            ),
            u8::from(opts.interactive && !stdin_tty),
        );
        if let Some((rows, cols)) = winsize {
            config.push_str(&format!("VMM_ROWS={rows}\nVMM_COLS={cols}\n"));
        }
        let env = command_env(&workdir, &cache_dir);
        let shell_default = std::env::var_os("SHELL")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "/bin/sh".into());
        let argv: Vec<OsString> = if argv.is_empty() {
            vec![shell_default]
        } else {
            argv.to_vec()
        };
        let script = command_script(&workdir, current_umask(), &env, &argv);
        let plan = Self {
            run_dir,
            qemu: std::env::var_os(QEMU_ENV)
                .filter(|q| !q.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_QEMU)),
            stdout_tty,
            stderr_tty,
            stdin_tty,
            verbose,
        };
        let write = |name: &str, data: &[u8]| {
            let path = plan.run_dir.join(name);
            fs::write(&path, data).map_err(|e| io_err(format!("writing {}", path.display()), e))
        };
        if let Err(e) = write("config", config.as_bytes()).and_then(|()| write("cmd.sh", &script)) {
            let _ = fs::remove_dir_all(&plan.run_dir);
            return Err(e);
        }
        Ok(plan)
    }

    /// The command line (after the binary) for QEMU; `con` is the write end of the console
    /// pipe, `tty1`/`tty2` the back ends of ttyS1/ttyS2.
    fn qemu_args(
        &self,
        opts: &NestedHostOptions,
        con: RawFd,
        tty1: Port,
        tty2: Port,
    ) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(OsString::from(s));
        push("-nodefaults");
        push("-no-user-config");
        push("-nographic");
        push("-no-reboot");
        push("-monitor");
        push("none");
        push("-accel");
        push(&tcg_accel_option());
        push("-cpu");
        push(HOST_CPU_MODEL);
        push("-smp");
        push(&opts.cpus.to_string());
        a.extend(crate::nested_memory::qemu_args(
            opts.memory_mib,
            &opts.shared_files,
        ));
        let mut push = |s: &str| a.push(OsString::from(s));
        let mut cmdline = String::from(if self.verbose {
            "console=ttyS0 panic=-1 mitigations=off"
        } else {
            "console=ttyS0 quiet panic=-1 mitigations=off"
        });
        if let Ok(extra) = std::env::var("VMM_HOST_CMDLINE_EXTRA")
            && !extra.trim().is_empty()
        {
            cmdline.push(' ');
            cmdline.push_str(extra.trim());
        }
        push("-append");
        push(&cmdline);
        // ttyS0: host console; ttyS1: stdout or the interactive terminal; ttyS2: stderr.
        // ttyS3: the control link, when there is one.
        let ctl = opts
            .control_port
            .as_ref()
            .map(|fd| ("ctl", Port::Socket(fd.as_raw_fd())));
        for (id, port) in [("con", Port::Pipe(con)), ("tty1", tty1), ("tty2", tty2)]
            .into_iter()
            .chain(ctl)
        {
            match port {
                Port::Pipe(fd) => {
                    push("-chardev");
                    push(&format!("file,id={id},path=/proc/self/fd/{fd},append=on"));
                    push("-serial");
                    push(&format!("chardev:{id}"));
                }
                Port::Socket(fd) => {
                    push("-chardev");
                    push(&format!("socket,id={id},fd={fd},server=off"));
                    push("-serial");
                    push(&format!("chardev:{id}"));
                }
                Port::Null => {
                    push("-serial");
                    push("null");
                }
            }
        }
        push("-fsdev");
        push("local,id=fsroot,path=/,security_model=none,multidevs=remap");
        push("-device");
        push("virtio-9p-pci,fsdev=fsroot,mount_tag=host");
        let mut run = OsString::from("local,id=fsrun,security_model=none,path=");
        run.push(qemu_escape(self.run_dir.as_os_str()));
        a.push("-fsdev".into());
        a.push(run);
        a.push("-device".into());
        a.push("virtio-9p-pci,fsdev=fsrun,mount_tag=vmmrun".into());
        // A heartbeat: QEMU asks the host's balloon driver for memory statistics every second,
        // an interrupt that wakes the host kernel whatever its own timers do. Under QEMU 7.2's
        // TCG the host kernel now and then loses its timer interrupt while idle ("soft lockup
        // - CPU#0 stuck for 23s! [swapper/0:0]" on its console) and then sleeps until some
        // other interrupt comes: a guest waiting on a timer (sva-test polling a completion
        // record, a `sleep`) stalled for minutes — until a `vmm ctl` query woke the host.
        a.push("-device".into());
        a.push(HEARTBEAT_DEVICE.into());
        if !opts.udp_forwards.is_empty() {
            a.extend(user_network_args(&opts.udp_forwards));
        }
        a.push("-kernel".into());
        a.push(opts.kernel.clone().into_os_string());
        a.push("-initrd".into());
        a.push(opts.initramfs.clone().into_os_string());
        a
    }

    fn execute(&self, opts: &NestedHostOptions) -> Outcome {
        match self.run_qemu(opts) {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Error(e),
        }
    }

    fn run_qemu(&self, opts: &NestedHostOptions) -> Result<Outcome, HostError> {
        let interactive = opts.interactive;
        let (con_r, con_w) = pipe()?;
        // Batch: ttyS1/ttyS2 carry the streams that are terminals here. Interactive: ttyS1 is
        // our terminal, through a socket pair (so that we decide when input starts to flow).
        let mut qemu_fds: Vec<OwnedFd> = vec![con_w];
        let mut tty_sources: Vec<(&'static str, OwnedFd, Sink)> = Vec::new();
        let mut terminal: Option<OwnedFd> = None;
        let (tty1, tty2) = if interactive {
            let (ours, theirs) = socket_pair()?;
            let port = Port::Socket(theirs.as_raw_fd());
            qemu_fds.push(theirs);
            terminal = Some(ours);
            (port, Port::Null)
        } else {
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            let ports = (Port::Pipe(out_w.as_raw_fd()), Port::Pipe(err_w.as_raw_fd()));
            qemu_fds.push(out_w);
            qemu_fds.push(err_w);
            tty_sources.push(("stdout", out_r, Sink::Stdout));
            tty_sources.push(("stderr", err_r, Sink::Stderr));
            ports
        };
        // Streams that are not terminals here arrive through files in the run directory.
        let stdout_file = (!interactive && !self.stdout_tty).then(|| self.run_dir.join("stdout"));
        let stderr_file = (!self.stderr_tty).then(|| self.run_dir.join("stderr"));
        for path in stdout_file.iter().chain(stderr_file.iter()) {
            File::create(path).map_err(|e| io_err(format!("creating {}", path.display()), e))?;
        }
        let args = self.qemu_args(opts, qemu_fds[0].as_raw_fd(), tty1, tty2);
        log::debug!(
            "nested host: {} {}",
            self.qemu.display(),
            args.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let qemu_log_path = self.run_dir.join("qemu.log");
        let qemu_log = File::create(&qemu_log_path)
            .map_err(|e| io_err(format!("creating {}", qemu_log_path.display()), e))?;
        let console_path = self.run_dir.join("console.log");
        let console_file = File::create(&console_path)
            .map_err(|e| io_err(format!("creating {}", console_path.display()), e))?;

        let mut cmd = Command::new(&self.qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(
                qemu_log
                    .try_clone()
                    .map_err(|e| io_err("duplicating the QEMU log descriptor", e))?,
            )
            .stderr(qemu_log)
            // Keyboard signals reach only us; we stop QEMU ourselves.
            .process_group(0);
        let inherit: Vec<RawFd> = qemu_fds
            .iter()
            .map(|fd| fd.as_raw_fd())
            .chain(opts.control_port.as_ref().map(|fd| fd.as_raw_fd()))
            .collect();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (fcntl, prctl) on descriptors it owns; `inherit` was allocated
        // before the fork and is only read.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &inherit {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }

        // The output and input threads start first: they wait for QEMU's data, and nothing is
        // left to undo but them if QEMU does not start.
        let qemu_done = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let started = self.start_threads(
            &mut threads,
            con_r,
            console_file,
            tty_sources,
            stdout_file,
            stderr_file,
            terminal,
            &qemu_done,
        );
        let stop_threads = |threads: Vec<JoinHandle<()>>| {
            qemu_done.store(true, Ordering::SeqCst);
            for t in threads {
                let _ = t.join();
            }
        };
        if let Err(e) = started {
            drop(qemu_fds);
            stop_threads(threads);
            return Err(e);
        }

        // Interactive on a terminal: raw mode (no echo, no signals, no output translation), so
        // that every key reaches the command's terminal inside and its output comes out as is.
        let _raw = if interactive && self.stdin_tty {
            TermiosGuard::make_raw(libc::STDIN_FILENO)
        } else {
            None
        };
        let mut signals = match crate::signals::SignalWatch::install() {
            Ok(s) => s,
            Err(e) => {
                drop(qemu_fds);
                stop_threads(threads);
                return Err(io_err("installing signal handlers", e));
            }
        };
        let spawned = cmd.spawn();
        // Our copies of QEMU's ends must go, or the copiers would never see end of file.
        drop(qemu_fds);
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                stop_threads(threads);
                return Err(HostError::QemuSpawn {
                    qemu: self.qemu.clone(),
                    source: e,
                });
            }
        };
        let outcome = wait_for(&mut child, &mut signals, &self.run_dir.join("stop"));
        drop(signals);
        stop_threads(threads);
        outcome
    }

    /// Starts the threads that copy the console, the serial ports and the relayed files to us
    /// and (interactive) our stdin to the terminal; pushes each onto `threads`.
    #[allow(clippy::too_many_arguments)]
    fn start_threads(
        &self,
        threads: &mut Vec<JoinHandle<()>>,
        console: OwnedFd,
        console_file: File,
        tty_sources: Vec<(&'static str, OwnedFd, Sink)>,
        stdout_file: Option<PathBuf>,
        stderr_file: Option<PathBuf>,
        terminal: Option<OwnedFd>,
        qemu_done: &Arc<AtomicBool>,
    ) -> Result<(), HostError> {
        threads.push(spawn_copier(
            "console",
            console,
            Sink::Console {
                file: console_file,
                echo: self.verbose,
            },
        )?);
        for (name, fd, sink) in tty_sources {
            threads.push(spawn_copier(name, fd, sink)?);
        }
        if let Some(path) = stdout_file {
            threads.push(spawn_tailer(
                "stdout",
                path,
                Sink::Stdout,
                qemu_done.clone(),
            )?);
        }
        if let Some(path) = stderr_file {
            threads.push(spawn_tailer(
                "stderr",
                path,
                Sink::Stderr,
                qemu_done.clone(),
            )?);
        }
        if let Some(ours) = terminal {
            let input = ours
                .try_clone()
                .map_err(|e| io_err("duplicating the terminal socket", e))?;
            threads.push(spawn_copier("terminal", ours, Sink::Stdout)?);
            threads.push(spawn_input_forwarder(
                input,
                self.run_dir.join("ready"),
                qemu_done.clone(),
            )?);
        }
        Ok(())
    }

    /// Turns QEMU's outcome and the run directory's contents into the result, and cleans up.
    fn finish(self, outcome: Outcome) -> Result<i32, HostError> {
        let read_trimmed = |name: &str| {
            fs::read(self.run_dir.join(name))
                .ok()
                .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        };
        let result = match outcome {
            Outcome::Interrupted(signal, clean) => {
                let clean = clean && self.run_dir.join("status").exists();
                let _ = fs::remove_dir_all(&self.run_dir);
                return Err(HostError::Interrupted { signal, clean });
            }
            Outcome::Error(e) => {
                let _ = fs::remove_dir_all(&self.run_dir);
                return Err(e);
            }
            Outcome::Exited(qemu_status) => {
                if let Some(error) = read_trimmed("error") {
                    Err(format!("host init: {error}"))
                } else if let Some(status) = read_trimmed("status") {
                    match status.parse::<i32>() {
                        Ok(code) if (0..=255).contains(&code) => Ok(code),
                        _ => Err(format!("host reported a malformed exit status '{status}'")),
                    }
                } else if !qemu_status.success() {
                    let qemu_msg = last_lines(&self.run_dir.join("qemu.log"), 1);
                    Err(format!(
                        "QEMU {qemu_status} before the command's status was reported{}",
                        if qemu_msg.is_empty() {
                            String::new()
                        } else {
                            format!(" ({qemu_msg})")
                        }
                    ))
                } else if let Some(line) = console_line(&self.run_dir, "Kernel panic - not syncing")
                {
                    Err(format!("host kernel panic: {line}"))
                } else if let Some(line) = console_line(&self.run_dir, "host-init: error: ") {
                    Err(format!("host init: {line}"))
                } else {
                    Err("the host stopped without reporting the command's exit status".to_string())
                }
            }
        };
        match result {
            Ok(code) => {
                if self.verbose {
                    let kept = self.keep("kept");
                    eprintln!("vmm: nested host run directory kept: {}", kept.display());
                } else if let Err(e) = fs::remove_dir_all(&self.run_dir) {
                    log::warn!("cannot remove {}: {e}", self.run_dir.display());
                }
                Ok(code)
            }
            Err(reason) => {
                let kept = self.keep("failed");
                let console_log = kept.join("console.log");
                Err(HostError::Failed {
                    command_started: kept.join("started").exists(),
                    tail: last_lines(&console_log, TAIL_LINES),
                    console_log,
                    reason,
                })
            }
        }
    }

    /// Renames the run directory to `<kind>-<time>-<pid>` (kept for inspection) and removes
    /// all but the newest [`KEEP_FAILED_RUNS`] of that kind.
    fn keep(&self, kind: &str) -> PathBuf {
        let Some(parent) = self.run_dir.parent() else {
            return self.run_dir.clone();
        };
        let kept = parent.join(format!(
            "{kind}-{:020}-{}",
            unix_nanos(),
            std::process::id()
        ));
        if fs::rename(&self.run_dir, &kept).is_err() {
            return self.run_dir.clone();
        }
        let prefix = format!("{kind}-");
        if let Ok(entries) = fs::read_dir(parent) {
            let mut failed: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| e.file_name().as_bytes().starts_with(prefix.as_bytes()))
                .map(|e| e.path())
                .collect();
            failed.sort();
            let excess = failed.len().saturating_sub(KEEP_FAILED_RUNS);
            for old in &failed[..excess] {
                let _ = fs::remove_dir_all(old);
            }
        }
        kept
    }
}

/// How long the command inside gets to stop (and the host to shut down) after a stop request
/// before QEMU is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// Waits for QEMU. The first stop signal asks the host to stop the command (`stop` in the run
/// directory: the host's `/init` sends it SIGTERM, then syncs and powers off); a second signal,
/// or [`STOP_GRACE`] without the host going down, kills QEMU.
fn wait_for(
    child: &mut Child,
    signals: &mut crate::signals::SignalWatch,
    stop_request: &Path,
) -> Result<Outcome, HostError> {
    let mut stopping: Option<(i32, std::time::Instant)> = None;
    loop {
        if let Some(signal) = signals.next() {
            match stopping {
                None if File::create(stop_request).is_ok() => {
                    log::info!("nested host: {signal}: asking the command to stop");
                    stopping = Some((signal, std::time::Instant::now()));
                }
                _ => {
                    log::info!("nested host: signal {signal}: killing QEMU");
                    let _ = child.kill();
                    let _ = child.wait();
                    let first = stopping.map_or(signal, |(s, _)| s);
                    return Ok(Outcome::Interrupted(first, false));
                }
            }
        }
        if let Some((signal, since)) = stopping
            && since.elapsed() > STOP_GRACE
        {
            log::warn!(
                "nested host: no shutdown {STOP_GRACE:?} after the stop request: killing QEMU"
            );
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Outcome::Interrupted(signal, false));
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                return Ok(match stopping {
                    Some((signal, _)) => Outcome::Interrupted(signal, true),
                    None => Outcome::Exited(status),
                });
            }
            Ok(None) => std::thread::sleep(POLL_INTERVAL),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io_err("waiting for QEMU", e));
            }
        }
    }
}

/// The back end of one of the host's serial ports.
#[derive(Clone, Copy)]
enum Port {
    /// Output only: the write end of a pipe (QEMU opens `/proc/self/fd/N`).
    Pipe(RawFd),
    /// Both ways: one end of a connected socket pair.
    Socket(RawFd),
    /// No back end.
    Null,
}

/// Where a copier thread writes.
enum Sink {
    Stdout,
    Stderr,
    Console { file: File, echo: bool },
}

impl Sink {
    /// Writes `data`; errors on our stdout/stderr (e.g. a closed pipe) are reported once, and
    /// the caller keeps reading so that the host never blocks on us.
    fn write(&mut self, name: &str, data: &[u8], failed: &mut bool) {
        let res = match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(data).and_then(|()| out.flush())
            }
            Sink::Stderr => io::stderr().lock().write_all(data),
            Sink::Console { file, echo } => {
                if *echo {
                    let _ = io::stderr().lock().write_all(data);
                }
                file.write_all(data)
            }
        };
        if let Err(e) = res
            && !*failed
        {
            *failed = true;
            log::warn!("nested host: writing {name}: {e} (discarding the rest)");
        }
    }
}

/// Size of the copy buffers.
const COPY_BUFFER: usize = 64 * 1024;
/// How often a tailer looks for new data in its file.
const TAIL_INTERVAL: Duration = Duration::from_millis(5);

/// Copies everything from the pipe `src` (a serial port's back end) to `sink` until end of file.
fn spawn_copier(
    name: &'static str,
    src: OwnedFd,
    mut sink: Sink,
) -> Result<JoinHandle<()>, HostError> {
    std::thread::Builder::new()
        .name(format!("host-{name}"))
        .spawn(move || {
            let mut src = File::from(src);
            let mut buf = vec![0u8; COPY_BUFFER];
            let mut failed = false;
            loop {
                match src.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => sink.write(name, &buf[..n], &mut failed),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::warn!("nested host: reading {name}: {e}");
                        break;
                    }
                }
            }
        })
        .map_err(|e| io_err("starting an output thread", e))
}

/// Follows the file `path`, which the host appends to through 9p (each write is complete on
/// this side when the host's write returns), copying new data to `sink`; after `done` is set
/// (QEMU has exited) it copies the rest and ends.
fn spawn_tailer(
    name: &'static str,
    path: PathBuf,
    mut sink: Sink,
    done: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, HostError> {
    let mut src =
        File::open(&path).map_err(|e| io_err(format!("opening {}", path.display()), e))?;
    std::thread::Builder::new()
        .name(format!("host-{name}"))
        .spawn(move || {
            let mut buf = vec![0u8; COPY_BUFFER];
            let mut failed = false;
            loop {
                // Read the flag before the file: data written before QEMU exited is then seen.
                let finished = done.load(Ordering::SeqCst);
                match src.read(&mut buf) {
                    Ok(0) if finished => break,
                    Ok(0) => std::thread::sleep(TAIL_INTERVAL),
                    Ok(n) => sink.write(name, &buf[..n], &mut failed),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::warn!("nested host: reading {}: {e}", path.display());
                        break;
                    }
                }
            }
        })
        .map_err(|e| io_err("starting an output thread", e))
}

/// A close-on-exec pipe `(read, write)`, enlarged to [`PIPE_CAPACITY`] where allowed.
fn pipe() -> Result<(OwnedFd, OwnedFd), HostError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io_err("creating a pipe", io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on a pipe we own; failure (limit) is harmless and ignored.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_CAPACITY) };
    Ok((r, w))
}

/// A close-on-exec connected pair of UNIX stream sockets.
fn socket_pair() -> Result<(OwnedFd, OwnedFd), HostError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two descriptors for socketpair to fill.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(io_err("creating a socket pair", io::Error::last_os_error()));
    }
    // SAFETY: socketpair succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Forwards our stdin to the interactive terminal inside, starting once the host has created
/// `ready` (input sent earlier would reach a UART nobody listens to yet and be lost), until
/// `done` is set or our stdin ends. End of input is not forwarded: a serial line has no EOF.
fn spawn_input_forwarder(
    dest: OwnedFd,
    ready: PathBuf,
    done: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, HostError> {
    std::thread::Builder::new()
        .name("host-stdin".into())
        .spawn(move || {
            while !ready.exists() {
                if done.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(TAIL_INTERVAL);
            }
            let mut buf = vec![0u8; 4096];
            while !done.load(Ordering::SeqCst) {
                let mut pfd = libc::pollfd {
                    fd: libc::STDIN_FILENO,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: polls one valid pollfd for at most 50 ms.
                let n = unsafe { libc::poll(&mut pfd, 1, 50) };
                if n <= 0 {
                    continue;
                }
                // SAFETY: reads into our own buffer of the given length.
                let got =
                    unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
                let Ok(got) = usize::try_from(got) else {
                    if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return;
                };
                if got == 0 {
                    return;
                }
                let mut data = &buf[..got];
                while !data.is_empty() {
                    // SAFETY: sends from our own buffer; MSG_NOSIGNAL turns a closed peer (QEMU
                    // gone) into EPIPE instead of SIGPIPE.
                    let sent = unsafe {
                        libc::send(
                            dest.as_raw_fd(),
                            data.as_ptr().cast(),
                            data.len(),
                            libc::MSG_NOSIGNAL,
                        )
                    };
                    match usize::try_from(sent) {
                        Ok(k) => data = &data[k..],
                        Err(_)
                            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return,
                    }
                }
            }
        })
        .map_err(|e| io_err("starting the input thread", e))
}

/// The terminal size of `fd` as (rows, columns), if it is a terminal with a size.
fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a `winsize` into the valid struct we pass.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// True when `a` and `b` are the same terminal device (then the command's stdout and stderr share
/// one port, which keeps their order).
fn same_terminal(a: RawFd, b: RawFd) -> bool {
    let rdev = |fd: RawFd| {
        // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into the valid struct we pass.
        (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_rdev)
    };
    matches!((rdev(a), rdev(b)), (Some(x), Some(y)) if x == y)
}

/// Our umask, from /proc (reading it with umask(2) would change it for a moment).
fn current_umask() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Errors out when `path` lies where the host mounts its own file systems.
pub fn check_visible(what: &str, path: &Path) -> Result<(), HostError> {
    match hidden_prefix(path) {
        Some(prefix) => Err(HostError::Invalid(format!(
            "{what} {} is under {prefix}, which the nested host replaces with its own file system; \
             use a directory elsewhere (e.g. under the repository or $HOME)",
            path.display()
        ))),
        None => Ok(()),
    }
}

fn hidden_prefix(path: &Path) -> Option<&'static str> {
    HIDDEN_PREFIXES
        .iter()
        .copied()
        .find(|prefix| path.starts_with(prefix))
}

/// Removes run directories of processes that no longer exist.
fn prune_runs(runs: &Path) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("run-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            log::debug!("removing stale run directory {}", entry.path().display());
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The command's environment: ours, with the marker, the cache directory and `PWD` set.
fn command_env(workdir: &Path, cache_dir: &Path) -> Vec<(OsString, OsString)> {
    let mut env: BTreeMap<OsString, OsString> =
        std::env::vars_os().filter(|(k, _)| !k.is_empty()).collect();
    env.remove(OsStr::new("OLDPWD"));
    env.insert(NESTED_MARKER_ENV.into(), "1".into());
    env.insert(CACHE_DIR_ENV.into(), cache_dir.as_os_str().to_owned());
    env.insert("PWD".into(), workdir.as_os_str().to_owned());
    env.entry("HOME".into()).or_insert_with(|| "/root".into());
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    env.into_iter().collect()
}

/// Appends `s` single-quoted for a POSIX shell: exact for every byte but NUL.
fn shell_quote(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'\'');
    for &b in s {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
}

/// `cmd.sh`: run by the chroot's `/bin/sh` inside the host; changes to `workdir`, replaces the
/// environment with `env` and execs `argv`.
fn command_script(
    workdir: &Path,
    umask: u32,
    env: &[(OsString, OsString)],
    argv: &[OsString],
) -> Vec<u8> {
    let mut s =
        b"# Generated by vmm host (vmm/src/host.rs); run inside the nested host.\n".to_vec();
    s.extend_from_slice(format!("umask {umask:04o}\ncd ").as_bytes());
    shell_quote(&mut s, workdir.as_os_str().as_bytes());
    s.extend_from_slice(b" || { echo \"cannot enter the working directory \"");
    shell_quote(&mut s, workdir.as_os_str().as_bytes());
    s.extend_from_slice(b"\" inside the nested host\" >/run/vmm/error; exit 126; }\nexec env -i");
    for (k, v) in env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        s.push(b' ');
        shell_quote(&mut s, &kv);
    }
    // env(1) would take a first argument containing '=' for another assignment: go through sh.
    if argv.first().is_some_and(|a| a.as_bytes().contains(&b'=')) {
        s.extend_from_slice(b" /bin/sh -c 'exec \"$@\"' vmm-host");
    }
    for a in argv {
        s.push(b' ');
        shell_quote(&mut s, a.as_bytes());
    }
    s.push(b'\n');
    s
}

/// Doubles commas, QEMU's escape inside option values.
pub fn qemu_escape(s: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(s.len());
    for &b in s.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    std::os::unix::ffi::OsStringExt::from_vec(out)
}

/// The text from `marker` on, in the first console log line that contains it.
fn console_line(run_dir: &Path, marker: &str) -> Option<String> {
    let data = fs::read(run_dir.join("console.log")).ok()?;
    let text = strip_escapes(&String::from_utf8_lossy(&data));
    text.lines().find_map(|l| {
        l.find(marker).map(|i| {
            l[i..]
                .trim_start_matches("host-init: error: ")
                .trim()
                .to_string()
        })
    })
}

/// The last `n` non-empty lines of a log, without terminal escapes, joined with " | ".
fn last_lines(path: &Path, n: usize) -> String {
    let Ok(data) = fs::read(path) else {
        return String::new();
    };
    let text = strip_escapes(&String::from_utf8_lossy(&data));
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Drops ANSI escape sequences and carriage returns (SeaBIOS clears the screen on the console).
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&c) = chars.peek() {
                        chars.next();
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// Puts a terminal in raw mode and restores its settings on drop.
struct TermiosGuard {
    fd: RawFd,
    saved: libc::termios,
}

impl TermiosGuard {
    fn make_raw(fd: RawFd) -> Option<Self> {
        // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into the valid struct we pass.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct we pass.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: applies a valid termios to our own terminal.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            log::warn!(
                "cannot put the terminal in raw mode: {}",
                io::Error::last_os_error()
            );
            return None;
        }
        Some(Self { fd, saved })
    }
}

impl Drop for TermiosGuard {
    fn drop(&mut self) {
        // SAFETY: restores settings previously read from the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    fn os(b: &[u8]) -> OsString {
        OsString::from_vec(b.to_vec())
    }

    /// Runs the generated script with a local `/bin/sh`, replacing the command with a printer of
    /// its arguments and environment, and checks that every byte arrives.
    #[test]
    fn command_script_preserves_arbitrary_bytes() {
        let all: Vec<u8> = (1u8..=255).collect();
        let argv = vec![
            os(b"/usr/bin/printf"),
            os(b"%s\\0"),
            os(&all),
            os(b"it's \"quoted\" $HOME `x` \\ \n new line"),
            os(b""),
            os(b"-n"),
        ];
        let env = vec![
            (os(b"WEIRD"), os(&all)),
            (os(b"PATH"), os(b"/usr/bin:/bin")),
        ];
        let dir = std::env::current_dir().unwrap();
        let script = command_script(&dir, 0o022, &env, &argv);
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(os(&script))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut expected = Vec::new();
        for a in &argv[2..] {
            expected.extend_from_slice(a.as_bytes());
            expected.push(0);
        }
        assert_eq!(out.stdout, expected);

        let argv = vec![os(b"/usr/bin/env")];
        let script = command_script(&dir, 0o022, &env, &argv);
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(os(&script))
            .output()
            .unwrap();
        let mut want = b"WEIRD=".to_vec();
        want.extend_from_slice(&all);
        assert!(out.stdout.windows(want.len()).any(|w| w == want.as_slice()));
    }

    #[test]
    fn first_argument_with_equals_is_a_command() {
        let argv = vec![os(b"A=B"), os(b"x")];
        let script = command_script(Path::new("/"), 0o022, &[], &argv);
        let text = String::from_utf8_lossy(&script);
        assert!(
            text.contains("/bin/sh -c 'exec \"$@\"' vmm-host 'A=B' 'x'"),
            "{text}"
        );
    }

    #[test]
    fn hidden_paths_are_rejected() {
        assert_eq!(hidden_prefix(Path::new("/tmp/x")), None);
        assert_eq!(hidden_prefix(Path::new("/run")), Some("/run"));
        assert_eq!(hidden_prefix(Path::new("/runfoo")), None);
        assert_eq!(hidden_prefix(Path::new("/run/user/0")), Some("/run"));
        assert_eq!(hidden_prefix(Path::new("/work/main")), None);
        assert!(check_visible("working directory", Path::new("/run/a")).is_err());
    }

    #[test]
    fn environment_has_marker_cache_and_pwd() {
        let env = command_env(Path::new("/work/x"), Path::new("/root/.cache/vmm"));
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get(NESTED_MARKER_ENV), Some("1".into()));
        assert_eq!(get(CACHE_DIR_ENV), Some("/root/.cache/vmm".into()));
        assert_eq!(get("PWD"), Some("/work/x".into()));
        assert!(get("PATH").is_some());
        assert!(get("OLDPWD").is_none());
    }

    #[test]
    fn escapes_and_tails() {
        assert_eq!(qemu_escape(OsStr::new("/a,b")), OsString::from("/a,,b"));
        assert_eq!(
            strip_escapes("\u{1b}c\u{1b}[?7l\u{1b}[2J[ 4.6] reboot: Power down\r\n"),
            "[ 4.6] reboot: Power down\n"
        );
        let dir = std::env::temp_dir().join(format!("vmm-host-tail-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        fs::write(&log, "a\n\nb\r\nc\nd\n").unwrap();
        assert_eq!(last_lines(&log, 3), "b | c | d");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fabric_ports_are_forwarded_into_the_host_network() {
        let args = user_network_args(&[
            "127.0.0.1:7001".parse().unwrap(),
            "0.0.0.0:7002".parse().unwrap(),
            "[::1]:7003".parse().unwrap(),
        ]);
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[0], "-netdev");
        assert_eq!(
            args[1],
            "user,id=fabric,net=10.0.2.0/24,host=10.0.2.2,hostfwd=udp:127.0.0.1:7001-:7001,\
             hostfwd=udp::7002-:7002,hostfwd=udp:[::1]:7003-:7003"
        );
        assert_eq!(args[2..], ["-device", "virtio-net-pci,netdev=fabric"]);
    }

    #[test]
    fn cpu_model_hides_xsave_and_avx() {
        for f in [
            "xsave",
            "xsaveopt",
            "xsavec",
            "xsaves",
            "xgetbv1",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "vaes",
            "vpclmulqdq",
        ] {
            assert!(
                HOST_CPU_MODEL.split(',').any(|x| x == format!("-{f}")),
                "{f}"
            );
        }
        assert!(HOST_CPU_MODEL.contains("+svm,+npt"));
    }
}
