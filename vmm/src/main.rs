//! `vmm`: a KVM virtual machine monitor for kernel developers.
//!
//! `vmm run` boots a stock Linux guest (the project's pinned default image, or `--kernel`) and
//! either gives an interactive serial console or runs one command and exits with its status.
//! `vmm images` builds the pinned, reproducible guest images; `vmm host` runs a command inside
//! the nested-KVM host used where this machine's `/dev/kvm` cannot run stock guests.

mod acpi;
mod boot;
mod config;
mod control;
mod cpu;
mod ctl;
mod cxl;
mod cxl_interleave;
mod dma_engine;
mod file_lock;
mod host;
mod ioat;
mod kvm_probe;
mod layout;
mod memory;
mod nested_memory;
mod nic;
mod pci;
mod signals;
mod vm;
mod vtd;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};

/// Exit status when `--timeout` expires (as coreutils `timeout`).
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit status for VMM errors, including bad command-line input.
pub const EXIT_VMM_ERROR: u8 = 125;
/// Exit status when the guest kernel panicked.
pub const EXIT_GUEST_PANIC: u8 = 123;
/// Exit status when the guest stopped without reporting the command's status.
pub const EXIT_NO_STATUS: u8 = 122;

const EXIT_CODES_HELP: &str = "\
Exit status of `vmm run -- CMD`: CMD's own status (0-255) when it ran, otherwise
  122  the guest stopped without reporting a status (init died, powered off early)
  123  the guest kernel panicked
  124  --timeout expired
  125  VMM error (bad arguments, KVM failure, missing kernel, a device's file in use, ...)
  128+N  stopped by signal N (130 SIGINT/Ctrl-C, 143 SIGTERM, 129 SIGHUP): the guest was
       stopped and its device media flushed first";

#[derive(Parser, Debug)]
#[command(name = "vmm", version, about = "KVM VMM with CXL Type 3, VT-d (PASID/ATS/PRI) and PVRDMA device models", after_help = EXIT_CODES_HELP)]
struct Cli {
    /// Log level for the VMM's own messages (error, warn, info, debug, trace); also RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest; with `-- CMD ARGS...` run CMD in it and exit with its status.
    #[command(after_help = EXIT_CODES_HELP)]
    Run(Box<RunArgs>),
    /// Build or update the pinned guest images.
    Images {
        #[command(subcommand)]
        action: ImagesAction,
    },
    /// Run CMD inside the nested-KVM host (QEMU TCG with emulated AMD SVM, real kvm-amd inside).
    Host(HostArgs),
    /// Talk to a running VM's control socket (`vmm run --control PATH`): inject CXL poison and
    /// events, report device state.
    Ctl(ctl::CtlArgs),
}

#[derive(Subcommand, Debug)]
enum ImagesAction {
    /// Build every artifact (guest profiles and the nested host) and print `sha256  path` lines.
    Build,
    /// Re-resolve every pin to the archive's current version and rewrite the lock file.
    Update {
        /// Lock file to rewrite (default: the repository's guest-images/images.lock).
        #[arg(long)]
        lock: Option<PathBuf>,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum HostMode {
    /// Probe /dev/kvm; use the nested host only if it cannot run a stock guest.
    Auto,
    /// Always use this machine's /dev/kvm.
    Direct,
    /// Always run inside the nested-KVM host.
    Nested,
}

#[derive(clap::Args, Debug, Clone, PartialEq)]
struct RunArgs {
    /// Kernel to boot: a bzImage or an uncompressed ELF vmlinux (PVH entry). Default: the
    /// project's pinned guest image.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio, optionally compressed). Default: the pinned image's initramfs
    /// when --kernel is not given.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended to the VMM's defaults.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(
        long,
        default_value = "1",
        value_name = "N",
        allow_hyphen_values = true
    )]
    cpus: String,
    /// Guest memory size, e.g. 512M or 4G [default: 512M; 2G with --ioat, whose VFIO
    /// selftests map 1 GiB of DMA memory]
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    memory: Option<String>,
    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS", allow_hyphen_values = true)]
    timeout: Option<f64>,
    /// Guest image profile used without --kernel ("7.2", the default, or "6.12").
    #[arg(long, default_value = guest_images::DEFAULT_PROFILE)]
    profile: String,
    /// Where to run: probe /dev/kvm (auto), use it directly, or use the nested-KVM host.
    #[arg(long, value_enum, default_value = "auto")]
    host: HostMode,
    /// Report boot times (VMM start → kernel entry → guest init) on stderr.
    #[arg(long)]
    boot_time: bool,
    /// In command mode, also show the guest kernel console on stderr.
    #[arg(long)]
    console: bool,
    /// Write the guest kernel console to this file.
    #[arg(long, value_name = "PATH")]
    console_log: Option<PathBuf>,
    /// Add a CXL 2.0 Type 3 memory device (repeatable):
    /// `volatile=SIZE,persistent=SIZE,backing=PATH[,lsa=PATH][,id=NAME][,host-bridge=0|1]`;
    /// sizes are multiples of 256M, either may be 0. The backing file holds volatile then
    /// persistent capacity. `host-bridge=1` puts the device below a second CXL host bridge
    /// (its own root bus, 80:xx.0); windows: decoder0.0 = host bridge 0, decoder0.1 = host
    /// bridge 1, decoder0.2 / decoder0.3 = both, interleaved at 4 KiB / 256 B.
    #[arg(long = "cxl-type3", value_name = "SPEC")]
    cxl_type3: Vec<String>,
    /// Commit the CXL HDM decoders at boot, as platform firmware would, so the guest kernel
    /// assembles the regions itself.
    #[arg(long)]
    cxl_precommit: bool,
    /// Hide the hypervisor from the guest (CPUID.1:ECX[31] clear, no KVM leaves) even without
    /// CXL devices. With `--cxl-type3` it is hidden by default: the guest kernel commits CXL
    /// regions itself only on what it believes is bare metal (no cache invalidation in a VM).
    /// Costs kvmclock and other paravirtual features.
    #[arg(long, conflicts_with = "cpuid_hypervisor")]
    cpuid_no_hypervisor: bool,
    /// Show the hypervisor to the guest (CPUID.1:ECX[31] set, KVM leaves) even with
    /// `--cxl-type3` devices: kvmclock and paravirtual features stay, but the guest kernel then
    /// refuses to commit CXL regions itself (use `--cxl-precommit` for those).
    #[arg(long)]
    cpuid_hypervisor: bool,
    /// Copy a host file into the guest's initramfs (repeatable): `SRC[:DEST]`. DEST defaults to
    /// `/usr/local/bin/<name of SRC>`; the file keeps its permission bits. Handy for test
    /// programs (build them static: the guest has Debian's libc, not necessarily yours).
    #[arg(long = "guest-file", value_name = "SRC[:DEST]")]
    guest_file: Vec<String>,
    /// Serve the control API (`vmm ctl`) on this UNIX socket while the VM runs: CXL poison and
    /// event injection, device state. A stale socket there is replaced, any other file refused.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Add an Intel VT-d IOMMU (DMA remapping) and boot the guest with `intel_iommu=on`:
    /// `vtd[,scalable=on|off][,caching-mode=on|off][,aw-bits=39|48][,pasid-bits=1..20]
    /// [,ats=on|off][,pri=on|off]` (defaults: scalable mode, no caching mode, 48-bit; in
    /// scalable mode 20-bit PASIDs, device TLBs (ATS) and page requests (PRI)).
    #[arg(long, value_name = "SPEC")]
    iommu: Option<String>,
    /// Add an emulated Intel I/OAT DMA engine (Crystal Beach 3.3, the Skylake-X function
    /// 8086:2021; the guest's ioatdma driver and the kernel's VFIO selftests drive it) on the
    /// root bus, its DMA through the IOMMU when there is one (repeatable):
    /// `[id=NAME][,channels=1..4]` (default: 1 channel).
    #[arg(
        long,
        value_name = "SPEC",
        num_args = 0..=1,
        default_missing_value = ""
    )]
    ioat: Vec<String>,
    /// Add the project's SVA DMA engine (PCI 1234:5356, docs/sva-engine.md: a descriptor ring of
    /// copies, fills and compares on a process's virtual addresses, with ATS, PASID and PRI;
    /// the guest drives it with uio_pci_generic_sva and `sva-test`) on the root bus from
    /// 00:18.0, its DMA through the IOMMU (use it with `--iommu vtd`) (repeatable):
    /// `[id=NAME][,ats=on|off][,pri=on|off]` (default: ATS and PRI on; PRI needs ATS).
    #[arg(
        long = "dma-engine",
        value_name = "SPEC",
        num_args = 0..=1,
        default_missing_value = ""
    )]
    dma_engine: Vec<String>,
    /// Add an emulated vmxnet3 Ethernet NIC (PCI 15AD:07B0, the guest's vmxnet3 driver) on the
    /// root bus from 00:08.0, its frames carried as UDP datagrams to another `vmm run`
    /// (docs/nic.md) (repeatable):
    /// `[id=NAME][,mac=MAC][,ip=ADDR/PREFIX],fabric=udp:LOCAL_IP:PORT,peer=IP:PORT`; with `ip=`
    /// the guest's init brings the interface up with that address.
    #[arg(long, value_name = "SPEC")]
    nic: Vec<String>,
    /// Add an emulated RDMA NIC: the vmxnet3 function of `--nic` plus a VMware PVRDMA function
    /// (15AD:0820, RoCE v2) beside it in the same slot, which the guest's vmw_pvrdma driver and
    /// rdma-core drive (docs/nic.md; today the verbs control path — devices, ports, GIDs, PDs,
    /// MRs, CQs, QPs — and UD and RC traffic as RoCEv2 packets) (repeatable; same SPEC as
    /// --nic).
    #[arg(long = "rdma-nic", value_name = "SPEC")]
    rdma_nic: Vec<String>,
    /// Internal (nested host): serve the control API on this serial port.
    #[arg(long, value_name = "TTY", hide = true)]
    control_serial: Option<PathBuf>,
    /// Internal (nested host): `SLOT:PATH`, the backing file PATH is the nested host's NVDIMM
    /// in SLOT (the outer QEMU maps the file); map that instead of the file over 9p.
    #[arg(long = "nested-nvdimm", value_name = "SLOT:PATH", hide = true)]
    nested_nvdimm: Vec<String>,
    /// Command to run in the guest (after `--`); without it, an interactive console.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(clap::Args, Debug)]
struct HostArgs {
    /// vCPUs of the nested host.
    #[arg(long, default_value_t = host::DEFAULT_CPUS)]
    cpus: u32,
    /// Memory of the nested host, e.g. 6G.
    #[arg(long)]
    memory: Option<String>,
    /// Command to run inside the host (after `--`); without it, an interactive shell.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// A one-line error and the exit status it maps to.
#[derive(Debug)]
struct Failure {
    message: String,
    status: u8,
}

impl Failure {
    fn vmm(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            status: EXIT_VMM_ERROR,
        }
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let rendered = e.to_string();
            let first = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("vmm: {first}");
            return ExitCode::from(EXIT_VMM_ERROR);
        }
    };
    let env = env_logger::Env::default().default_filter_or(cli.log_level.clone());
    env_logger::Builder::from_env(env)
        .format_target(false)
        .init();
    let result = match cli.command {
        Command::Run(args) => cmd_run(*args, &cli.log_level, started),
        Command::Images { action } => cmd_images(action),
        Command::Host(args) => cmd_host(args),
        Command::Ctl(args) => ctl::run(&args).map(|()| 0).map_err(Failure::vmm),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("vmm: {}", f.message);
            }
            ExitCode::from(f.status)
        }
    }
}

/// Guest memory without `--memory`.
const DEFAULT_MEMORY: &str = "512M";
/// Guest memory without `--memory` when there is an `--ioat`: the VFIO selftests map (and pin)
/// a 1 GiB DMA region.
const DEFAULT_MEMORY_WITH_IOAT: &str = "2G";

/// Kernel command line the VMM always passes; `--cmdline` is appended.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=acpi panic=-1 quiet";

impl RunArgs {
    /// The command line (after `vmm run`) that parses back to exactly these arguments: how the
    /// nested re-run hands them on. The destructuring names every field, so a new flag does
    /// not compile until it is handed on too.
    fn to_args(&self) -> Vec<OsString> {
        let RunArgs {
            kernel,
            initrd,
            cmdline,
            cpus,
            memory,
            timeout,
            profile,
            host,
            boot_time,
            console,
            console_log,
            cxl_type3,
            cxl_precommit,
            cpuid_no_hypervisor,
            cpuid_hypervisor,
            guest_file,
            iommu,
            ioat,
            dma_engine,
            nic,
            rdma_nic,
            control,
            control_serial,
            nested_nvdimm,
            command,
        } = self;
        let mut a: Vec<OsString> = Vec::new();
        let mut value = |flag: &str, v: &std::ffi::OsStr| {
            let mut arg = OsString::from(format!("--{flag}="));
            arg.push(v);
            a.push(arg);
        };
        for (flag, path) in [
            ("kernel", kernel),
            ("initrd", initrd),
            ("console-log", console_log),
            ("control", control),
            ("control-serial", control_serial),
        ] {
            if let Some(p) = path {
                value(flag, p.as_os_str());
            }
        }
        for (flag, v) in [("cmdline", cmdline), ("cpus", cpus), ("profile", profile)] {
            value(flag, v.as_ref());
        }
        if let Some(m) = memory {
            value("memory", m.as_ref());
        }
        if let Some(t) = timeout {
            value("timeout", t.to_string().as_ref());
        }
        if let Some(spec) = iommu {
            value("iommu", spec.as_ref());
        }
        let host = match host {
            HostMode::Auto => "auto",
            HostMode::Direct => "direct",
            HostMode::Nested => "nested",
        };
        value("host", host.as_ref());
        for (flag, values) in [
            ("cxl-type3", cxl_type3),
            ("guest-file", guest_file),
            ("ioat", ioat),
            ("dma-engine", dma_engine),
            ("nic", nic),
            ("rdma-nic", rdma_nic),
            ("nested-nvdimm", nested_nvdimm),
        ] {
            for v in values {
                value(flag, v.as_ref());
            }
        }
        for (flag, on) in [
            ("boot-time", boot_time),
            ("console", console),
            ("cxl-precommit", cxl_precommit),
            ("cpuid-no-hypervisor", cpuid_no_hypervisor),
            ("cpuid-hypervisor", cpuid_hypervisor),
        ] {
            if *on {
                a.push(format!("--{flag}").into());
            }
        }
        if !command.is_empty() {
            a.push("--".into());
            a.extend(command.iter().cloned());
        }
        a
    }
}

fn cmd_run(args: RunArgs, log_level: &str, started: Instant) -> Result<u8, Failure> {
    let cpus: u32 = args.cpus.parse().map_err(|_| {
        Failure::vmm(format!(
            "invalid --cpus value '{}': expected a whole number",
            args.cpus
        ))
    })?;
    let cpus = config::validate_cpus(cpus).map_err(Failure::vmm)?;
    let memory_spec = args.memory.as_deref().unwrap_or(if args.ioat.is_empty() {
        DEFAULT_MEMORY
    } else {
        DEFAULT_MEMORY_WITH_IOAT
    });
    let memory = config::parse_memory_size(memory_spec).map_err(Failure::vmm)?;
    let timeout = match args.timeout {
        Some(t) if !(t.is_finite() && t > 0.0) => {
            return Err(Failure::vmm(format!(
                "invalid --timeout value {t}: must be a positive number of seconds"
            )));
        }
        Some(t) => Some(Duration::from_secs_f64(t)),
        None => None,
    };
    let cxl_devices = args
        .cxl_type3
        .iter()
        .enumerate()
        .map(|(i, spec)| cxl::CxlType3Spec::parse(spec, i).map_err(Failure::vmm))
        .collect::<Result<Vec<_>, _>>()?;
    let ioat = ioat::IoatSpec::parse_all(&args.ioat).map_err(Failure::vmm)?;
    let dma_engines =
        dma_engine::DmaEngineSpec::parse_all(&args.dma_engine).map_err(Failure::vmm)?;
    let nics = nic::NicSpec::parse_all(&args.nic, &args.rdma_nic).map_err(Failure::vmm)?;
    let iommu = args
        .iommu
        .as_deref()
        .map(vtd::VtdSpec::parse)
        .transpose()
        .map_err(Failure::vmm)?;
    if cxl::host_bridge_count(&cxl_devices) > 1 && cxl_devices.iter().all(|d| d.host_bridge != 0) {
        return Err(Failure::vmm(
            "--cxl-type3 ...,host-bridge=1 needs a device on host bridge 0 too",
        ));
    }
    if args.cxl_precommit && cxl_devices.is_empty() {
        return Err(Failure::vmm(
            "--cxl-precommit needs at least one --cxl-type3 device",
        ));
    }
    let guest_files = args
        .guest_file
        .iter()
        .map(|spec| GuestFile::parse(spec))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(k) = &args.kernel
        && !k.is_file()
    {
        return Err(Failure::vmm(format!(
            "kernel '{}' does not exist or is not a file",
            k.display()
        )));
    }
    if let Some(i) = &args.initrd
        && !i.is_file()
    {
        return Err(Failure::vmm(format!(
            "initrd '{}' does not exist or is not a file",
            i.display()
        )));
    }

    // The devices' media (backing files, label storage areas) are this run's alone: locked
    // before anything is written to them, for as long as this process lives (under the nested
    // host, the outer run holds them).
    let nested_media = args
        .nested_nvdimm
        .iter()
        .map(|spec| parse_nested_nvdimm(spec))
        .collect::<Result<Vec<_>, _>>()?;
    let held_outside: Vec<PathBuf> = nested_media.iter().map(|(p, _)| p.clone()).collect();
    let _media_locks = cxl::claim_media(&cxl_devices, &held_outside).map_err(Failure::vmm)?;

    // Resolve the default image (this may download and build it, outside any nested host).
    let (kernel, initrd) = match &args.kernel {
        Some(k) => (k.clone(), args.initrd.clone()),
        None => {
            let store = guest_images::ImageStore::from_env().map_err(Failure::vmm)?;
            let image = store.guest(&args.profile).map_err(Failure::vmm)?;
            (
                image.bzimage,
                Some(args.initrd.clone().unwrap_or(image.initramfs)),
            )
        }
    };

    let use_nested = match args.host {
        HostMode::Direct => false,
        HostMode::Nested => true,
        HostMode::Auto => {
            if host::inside_nested_host() {
                false
            } else {
                match kvm_probe::probe_stock_guest_support() {
                    kvm_probe::ProbeResult::Capable => false,
                    kvm_probe::ProbeResult::Incapable(reason) => {
                        eprintln!(
                            "vmm: /dev/kvm cannot run a stock guest here ({reason}); running inside the nested-KVM host"
                        );
                        true
                    }
                    kvm_probe::ProbeResult::NoKvm(reason) => {
                        eprintln!(
                            "vmm: no usable /dev/kvm ({reason}); running inside the nested-KVM host"
                        );
                        true
                    }
                }
            }
        }
    };
    if use_nested {
        return run_nested(
            &args,
            log_level,
            NestedDevices {
                cxl: &cxl_devices,
                nics: &nics,
            },
            &kernel,
            initrd.as_ref(),
            memory,
            cpus,
        );
    }
    let control = match (&args.control, &args.control_serial) {
        (Some(path), _) => Some(vm::ControlEndpoint::Socket(std::sync::Arc::new(
            control::ControlListener::bind(path).map_err(Failure::vmm)?,
        ))),
        (None, Some(tty)) => Some(vm::ControlEndpoint::Serial(tty.clone())),
        (None, None) => None,
    };

    let command_mode = !args.command.is_empty();
    let initrd_extra = guest_extra_archive(
        command_mode.then_some(args.command.as_slice()),
        &guest_files,
    )?;
    let hide_hypervisor = hides_hypervisor(&args, !cxl_devices.is_empty());
    let mut cmdline = BASE_CMDLINE.to_string();
    if !cxl_devices.is_empty() {
        // CXL RAM regions come up as hot-plugged memory (kmem). Online it movable, as CXL
        // platforms do, so it holds no unmovable kernel data and `daxctl reconfigure-device
        // --mode=devdax` can take it offline again. `--cmdline` can override it.
        cmdline.push_str(" memhp_default_state=online_movable");
    }
    if iommu.is_some() {
        // Debian builds the kernel with the IOMMU off by default.
        cmdline.push_str(" intel_iommu=on");
    }
    for parameter in nics.iter().filter_map(nic::NicSpec::kernel_parameter) {
        // The guest's init gives the interface with this MAC its address.
        cmdline.push(' ');
        cmdline.push_str(&parameter);
    }
    if !args.cmdline.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(args.cmdline.trim());
    }
    let config = vm::VmConfig {
        cpus,
        memory,
        kernel,
        initrd,
        initrd_extra,
        cmdline,
        console: if command_mode {
            vm::ConsoleMode::Captured {
                echo: args.console,
                log: args.console_log.clone(),
            }
        } else {
            vm::ConsoleMode::Interactive
        },
        timeout,
        cxl_devices,
        cxl_precommit: args.cxl_precommit,
        hide_hypervisor,
        control,
        nested_media,
        iommu,
        ioat,
        dma_engines,
        nics,
    };
    let report = vm::run(&config, started).map_err(Failure::vmm)?;
    if args.boot_time {
        let ms = |d: Option<Duration>| {
            d.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "not reached".into())
        };
        let t = report.boot_times;
        let kernel_to_init = match (t.kernel_entry, t.init) {
            (Some(k), Some(i)) => format!("{:.1} ms", (i.saturating_sub(k)).as_secs_f64() * 1000.0),
            _ => "n/a".into(),
        };
        eprintln!(
            "vmm: boot time: vmm start -> kernel entry {}, kernel entry -> init {}, vmm start -> init {}",
            ms(t.kernel_entry),
            kernel_to_init,
            ms(t.init)
        );
    }
    log::info!("guest booted from a {:?} kernel", report.kernel_format);
    match report.outcome {
        vm::Outcome::CommandExited(status) => Ok(status),
        vm::Outcome::PoweredOff if !command_mode => Ok(0),
        vm::Outcome::UserQuit => Ok(0),
        vm::Outcome::PoweredOff => Err(Failure {
            message: "guest powered off without reporting the command's exit status".into(),
            status: EXIT_NO_STATUS,
        }),
        vm::Outcome::Reset if !command_mode => restart_self(),
        vm::Outcome::Reset => Err(Failure {
            message: "guest reset before reporting the command's exit status".into(),
            status: EXIT_NO_STATUS,
        }),
        vm::Outcome::Panic(line) => Err(Failure {
            message: format!("guest kernel panic: {line}"),
            status: EXIT_GUEST_PANIC,
        }),
        vm::Outcome::TimedOut => Err(Failure {
            message: format!(
                "guest timed out after {} s",
                args.timeout.unwrap_or_default()
            ),
            status: EXIT_TIMEOUT,
        }),
        vm::Outcome::VmmError(msg) => Err(Failure::vmm(msg)),
        vm::Outcome::Interrupted(signal) => Err(Failure {
            // Inside the nested host the outer run says why it stopped (its own signal).
            message: if host::inside_nested_host() {
                String::new()
            } else {
                format!(
                    "stopped by {}: guest stopped, device media flushed",
                    signals::name(signal)
                )
            },
            status: signals::exit_status(signal),
        }),
    }
}

/// A hidden `--nested-nvdimm SLOT:PATH` (the outer run passes it into the nested host).
fn parse_nested_nvdimm(spec: &str) -> Result<(PathBuf, u32), Failure> {
    spec.split_once(':')
        .and_then(|(slot, path)| Some((PathBuf::from(path), slot.parse().ok()?)))
        .filter(|(path, _)| path.is_absolute())
        .ok_or_else(|| {
            Failure::vmm(format!(
                "invalid --nested-nvdimm '{spec}': expected SLOT:ABSOLUTE-PATH"
            ))
        })
}

/// Interactive reboot: start over with the same arguments (a fresh VM, as a reset would give).
fn restart_self() -> Result<u8, Failure> {
    use std::os::unix::process::CommandExt;
    let mut argv = std::env::args_os();
    let exe = std::env::current_exe().map_err(Failure::vmm)?;
    argv.next();
    eprintln!("vmm: guest reset; restarting");
    let err = std::process::Command::new(exe).args(argv).exec();
    Err(Failure::vmm(format!(
        "restart after guest reset failed: {err}"
    )))
}

/// A `--guest-file SRC[:DEST]`: a host file copied into the guest's initramfs.
#[derive(Debug, Clone)]
struct GuestFile {
    source: PathBuf,
    dest: String,
}

impl GuestFile {
    fn parse(spec: &str) -> Result<Self, Failure> {
        let (source, dest) = match spec.rsplit_once(':') {
            Some((s, d)) => (PathBuf::from(s), Some(d.to_string())),
            None => (PathBuf::from(spec), None),
        };
        if !source.is_file() {
            return Err(Failure::vmm(format!(
                "invalid --guest-file '{spec}': '{}' is not a readable file",
                source.display()
            )));
        }
        let dest = match dest {
            Some(d) if d.starts_with('/') && d.len() > 1 && !d.ends_with('/') => d,
            Some(d) => {
                return Err(Failure::vmm(format!(
                    "invalid --guest-file '{spec}': destination '{d}' must be an absolute file path"
                )));
            }
            None => {
                let name = source.file_name().map(|n| n.to_string_lossy().into_owned());
                format!("/usr/local/bin/{}", name.unwrap_or_default())
            }
        };
        if guest_images::cpio::normalize_path(&dest).is_err() {
            return Err(Failure::vmm(format!(
                "invalid --guest-file '{spec}': destination '{dest}' is not a valid path"
            )));
        }
        Ok(Self {
            source: absolute(&source),
            dest,
        })
    }
}

/// The cpio archive appended to the initrd: the `--guest-file` files and, in command mode,
/// `/vmm/args`, a shell fragment that sets the positional parameters to the command (see
/// [`guest_command_script`]). Empty when there is nothing to add.
/// Whether the guest's CPUID hides the hypervisor: asked for with `--cpuid-no-hypervisor`, and
/// by default with CXL devices (Linux's `cpu_cache_has_invalidate_memregion()` is false under a
/// hypervisor, so `cxl create-region` would fail with "Failed to synchronize CPU cache state")
/// unless `--cpuid-hypervisor` keeps it.
fn hides_hypervisor(args: &RunArgs, has_cxl_devices: bool) -> bool {
    args.cpuid_no_hypervisor || (has_cxl_devices && !args.cpuid_hypervisor)
}

fn guest_extra_archive(
    command: Option<&[OsString]>,
    files: &[GuestFile],
) -> Result<Vec<u8>, Failure> {
    use std::os::unix::fs::PermissionsExt;
    if command.is_none() && files.is_empty() {
        return Ok(Vec::new());
    }
    let mut archive = guest_images::cpio::Archive::new();
    for f in files {
        let data = std::fs::read(&f.source)
            .map_err(|e| Failure::vmm(format!("--guest-file '{}': {e}", f.source.display())))?;
        let perm = std::fs::metadata(&f.source)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644);
        archive
            .insert(&f.dest, guest_images::cpio::Node::File { perm, data })
            .map_err(|e| Failure::vmm(format!("--guest-file '{}': {e}", f.dest)))?;
    }
    if let Some(command) = command {
        archive.file("vmm/args", 0o644, guest_command_script(command));
    }
    Ok(archive.finish())
}

/// `/vmm/args`: `set -- 'arg' ...`, every argument single-quoted.
fn guest_command_script(command: &[OsString]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut script = b"set --".to_vec();
    for arg in command {
        script.extend_from_slice(b" '");
        for &b in arg.as_bytes() {
            if b == b'\'' {
                script.extend_from_slice(b"'\\''");
            } else {
                script.push(b);
            }
        }
        script.push(b'\'');
    }
    script.push(b'\n');
    script
}

/// Room the nested host keeps for the shadow copies of sub-page interleaved CXL regions
/// (`cxl_interleave`): with two or more devices, their whole capacity (untouched unless such a
/// region is created: the nested host's memory is allocated as it is used), but at most half
/// this machine's memory less the guest's — QEMU maps the host's memory in one piece, and
/// Linux's default overcommit heuristic refuses a mapping larger than RAM + swap. A shadow that
/// does not fit then fails at commit inside, with the allocation error in the VMM's log.
fn shadow_room(cxl_devices: &[cxl::CxlType3Spec], guest_memory: u64) -> u64 {
    if cxl_devices.len() < 2 {
        return 0;
    }
    let wanted: u64 = cxl_devices.iter().map(cxl::CxlType3Spec::total).sum();
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib << 10)
    });
    match machine {
        Some(total) => wanted.min((total / 2).saturating_sub(guest_memory)),
        None => wanted,
    }
}

/// The devices whose host-side resources the nested host must provide: CXL backing files
/// (NVDIMMs) and NIC fabric ports (forwarded UDP).
struct NestedDevices<'a> {
    cxl: &'a [cxl::CxlType3Spec],
    nics: &'a [nic::NicSpec],
}

fn run_nested(
    args: &RunArgs,
    log_level: &str,
    devices: NestedDevices<'_>,
    kernel: &std::path::Path,
    initrd: Option<&PathBuf>,
    memory: u64,
    cpus: u32,
) -> Result<u8, Failure> {
    let NestedDevices {
        cxl: cxl_devices,
        nics,
    } = devices;
    let store = guest_images::ImageStore::from_env().map_err(Failure::vmm)?;
    let host_image = store.host().map_err(Failure::vmm)?;
    // Label storage areas stay files the VMM inside reads and writes (through 9p): they must be
    // the same files in there. (Backing files may lie anywhere: they go in as NVDIMMs.)
    for device in cxl_devices {
        if let Some(lsa) = device.lsa_path() {
            host::check_visible(
                &format!("{}: label storage area", device.id),
                &absolute(&lsa),
            )
            .map_err(Failure::vmm)?;
        }
    }
    // Each backing file goes to the nested host as an NVDIMM (QEMU maps it here), so guest
    // stores land in this machine's page cache, not the nested host's (see `nested_memory`).
    let shared_files: Vec<nested_memory::SharedFile> = cxl_devices
        .iter()
        .map(|d| nested_memory::SharedFile {
            path: absolute(&d.backing),
            size: d.total(),
        })
        .collect();
    // The run inside: the same arguments, made absolute, pointed at this machine's /dev/kvm
    // one level down, with the devices' media and the control link as the host provides them.
    let mut inner = args.clone();
    inner.host = HostMode::Direct;
    inner.kernel = Some(absolute(kernel));
    inner.initrd = initrd.map(|i| absolute(i));
    inner.cpus = cpus.to_string();
    inner.cxl_type3 = args
        .cxl_type3
        .iter()
        .map(|s| absolute_cxl_paths(s))
        .collect();
    inner.nested_nvdimm = shared_files
        .iter()
        .enumerate()
        .map(|(slot, file)| format!("{slot}:{}", file.path.display()))
        .collect();
    inner.console_log = args.console_log.as_deref().map(absolute);
    // The NICs' fabric ports are forwarded into the nested host (see nic.rs); a port taken
    // here is refused now, with the NIC's name, rather than by QEMU.
    for n in nics {
        std::net::UdpSocket::bind(n.local).map_err(|e| {
            Failure::vmm(format!(
                "--nic {}: cannot bind the fabric socket to {}: {e}",
                n.id, n.local
            ))
        })?;
    }
    inner.nic = nics
        .iter()
        .filter(|n| !n.rdma)
        .map(|n| n.for_nested_host().to_arg())
        .collect();
    inner.rdma_nic = nics
        .iter()
        .filter(|n| n.rdma)
        .map(|n| n.for_nested_host().to_arg())
        .collect();
    inner.guest_file = args
        .guest_file
        .iter()
        .map(|spec| GuestFile::parse(spec).map(|f| format!("{}:{}", f.source.display(), f.dest)))
        .collect::<Result<_, _>>()?;
    // The control socket is ours (outside); requests reach the VMM inside over the nested
    // host's control serial port.
    inner.control = None;
    let mut control_port = None;
    let _relay = match &args.control {
        Some(path) => {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair()
                .map_err(|e| Failure::vmm(format!("control link: {e}")))?;
            let relay = control::Relay::start(path, std::os::fd::OwnedFd::from(ours))
                .map_err(Failure::vmm)?;
            control_port = Some(std::sync::Arc::new(std::os::fd::OwnedFd::from(theirs)));
            inner.control_serial = Some(PathBuf::from(host::CONTROL_PORT_TTY));
            Some(relay)
        }
        None => None,
    };
    let exe = std::env::current_exe().map_err(Failure::vmm)?;
    let mut argv: Vec<OsString> = vec![
        exe.into_os_string(),
        format!("--log-level={log_level}").into(),
        "run".into(),
    ];
    argv.extend(inner.to_args());
    if let Some(t) = args.timeout {
        arm_nested_watchdog(Duration::from_secs_f64(t) + NESTED_TIMEOUT_MARGIN);
    }
    let opts = host::NestedHostOptions {
        kernel: host_image.bzimage,
        initramfs: host_image.initramfs,
        cpus: nested_host_cpus(),
        memory_mib: (memory >> 20) + 1536 + (shadow_room(cxl_devices, memory) >> 20),
        workdir: nested_workdir()?,
        interactive: args.command.is_empty(),
        control_port,
        shared_files,
        udp_forwards: nics.iter().map(|n| n.local).collect(),
    };
    let result = match host::run_in_nested_host(&opts, &argv) {
        Err(e) if host::is_host_crash_before_command(&e) => {
            eprintln!(
                "vmm: the nested host's kernel crashed while booting, before the command ran ({e}); retrying once"
            );
            host::run_in_nested_host(&opts, &argv)
        }
        other => other,
    };
    result.map_err(host_failure).and_then(|status| {
        u8::try_from(status)
            .map_err(|_| Failure::vmm(format!("nested host returned status {status}")))
    })
}

/// vCPUs of the nested host: `VMM_HOST_CPUS` if set, else one, whatever the guest has. With more
/// than one, QEMU's multi-threaded TCG can let a vCPU run a stale `int3` while the host kernel
/// patches its text (static keys flipping as KVM runs guest vCPUs), which kills the host kernel
/// mid-run — it failed a two-vCPU guest test that way here. Guest vCPUs are threads inside the
/// host, so a multi-vCPU guest still boots and runs on one host CPU, only slower (2 vCPUs
/// `nproc`: 19 s vs 14 s).
fn nested_host_cpus() -> u32 {
    std::env::var("VMM_HOST_CPUS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(host::DEFAULT_CPUS)
}

/// Extra time the nested host gets beyond `--timeout` (its own boot and shutdown) before the
/// outer VMM stops it: the inner VMM enforces `--timeout` itself, this is the backstop.
const NESTED_TIMEOUT_MARGIN: Duration = Duration::from_secs(300);

static NESTED_WATCHDOG_FIRED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Stops a nested run that outlives its timeout: SIGTERM to ourselves makes the host runner
/// kill QEMU and clean up; `host_failure` then reports a timeout.
fn arm_nested_watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        NESTED_WATCHDOG_FIRED.store(true, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: sending SIGTERM to our own process; the host runner handles it.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    });
}

/// Runs in the nested host, retrying once when the host kernel itself crashed (a QEMU TCG
/// issue, see `host::is_host_crash`), with a notice line.
fn run_nested_with_retry(
    opts: &host::NestedHostOptions,
    argv: &[OsString],
) -> Result<i32, host::HostError> {
    match host::run_in_nested_host(opts, argv) {
        Err(e)
            if host::is_host_crash(&e)
                && !NESTED_WATCHDOG_FIRED.load(std::sync::atomic::Ordering::SeqCst) =>
        {
            eprintln!("vmm: the nested host's kernel crashed ({e}); retrying once");
            host::run_in_nested_host(opts, argv)
        }
        other => other,
    }
}

/// Makes `backing=` and `lsa=` paths in a `--cxl-type3` spec absolute, for the nested re-run.
fn absolute_cxl_paths(spec: &str) -> String {
    spec.split(',')
        .map(|part| match part.split_once('=') {
            Some((key @ ("backing" | "lsa"), path)) => {
                format!("{key}={}", absolute(std::path::Path::new(path)).display())
            }
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A nested-host failure; interruption by a signal exits as a shell would (128 + signal).
fn host_failure(e: host::HostError) -> Failure {
    if NESTED_WATCHDOG_FIRED.load(std::sync::atomic::Ordering::SeqCst) {
        return Failure {
            message: "guest timed out: the nested host did not finish within --timeout plus 300 s"
                .into(),
            status: EXIT_TIMEOUT,
        };
    }
    match e {
        host::HostError::Interrupted { signal, .. } => Failure {
            message: e.to_string(),
            status: signals::exit_status(signal),
        },
        other => Failure::vmm(other),
    }
}

/// Working directory for the nested `vmm run`: every path it gets is absolute, so when the
/// current directory is one the nested host cannot show (under /run), use $HOME instead.
fn nested_workdir() -> Result<PathBuf, Failure> {
    let cwd = std::env::current_dir().map_err(Failure::vmm)?;
    let hidden = ["/run", "/proc", "/sys", "/dev"]
        .iter()
        .any(|p| cwd.starts_with(p));
    if hidden && let Some(home) = std::env::var_os("HOME") {
        return Ok(PathBuf::from(home));
    }
    Ok(cwd)
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn cmd_images(action: ImagesAction) -> Result<u8, Failure> {
    match action {
        ImagesAction::Build => {
            let store = guest_images::ImageStore::from_env().map_err(Failure::vmm)?;
            let artifacts = store.build_all().map_err(Failure::vmm)?;
            let mut out = String::new();
            for a in artifacts {
                out.push_str(&format!("{}  {}\n", a.sha256, a.path.display()));
            }
            print!("{out}");
            Ok(0)
        }
        ImagesAction::Update { lock } => {
            let lock = lock.unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest-images/images.lock")
            });
            guest_images::update_lock(&lock).map_err(Failure::vmm)?;
            eprintln!(
                "vmm: updated {}; rebuild the binary to use the new pins",
                lock.display()
            );
            Ok(0)
        }
    }
}

fn cmd_host(args: HostArgs) -> Result<u8, Failure> {
    let memory_mib = match &args.memory {
        Some(m) => config::parse_size(m).map_err(Failure::vmm)? >> 20,
        None => host::DEFAULT_MEMORY_MIB,
    };
    let cpus = config::validate_cpus(args.cpus).map_err(Failure::vmm)?;
    let store = guest_images::ImageStore::from_env().map_err(Failure::vmm)?;
    let image = store.host().map_err(Failure::vmm)?;
    let interactive = args.command.is_empty();
    let command = if interactive {
        vec![OsString::from("/bin/sh")]
    } else {
        args.command
    };
    let opts = host::NestedHostOptions {
        kernel: image.bzimage,
        initramfs: image.initramfs,
        cpus,
        memory_mib,
        workdir: std::env::current_dir().map_err(Failure::vmm)?,
        interactive,
        control_port: None,
        shared_files: Vec::new(),
        udp_forwards: Vec::new(),
    };
    let status = run_nested_with_retry(&opts, &command).map_err(host_failure)?;
    u8::try_from(status).map_err(|_| Failure::vmm(format!("nested host returned status {status}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_run(args: &[OsString]) -> RunArgs {
        let mut argv: Vec<OsString> = vec!["vmm".into(), "run".into()];
        argv.extend(args.iter().cloned());
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Run(run) => *run,
            other => panic!("not a run: {other:?}"),
        }
    }

    /// The nested re-run hands every argument on: what `to_args` prints parses back to the same
    /// arguments, with every flag set (values with commas, spaces, '=' and a leading '-').
    #[test]
    fn run_arguments_survive_the_round_trip_to_the_nested_host() {
        let full: Vec<OsString> = [
            "--kernel=/k/bz Image",
            "--initrd=/k/initrd,1",
            "--cmdline=-x a=b c",
            "--cpus=3",
            "--memory=1G",
            "--timeout=12.5",
            "--profile=6.12",
            "--host=nested",
            "--boot-time",
            "--console",
            "--console-log=/tmp/con.log",
            "--cxl-type3=volatile=256M,persistent=0,backing=/b/a.img",
            "--cxl-type3=volatile=0,persistent=256M,backing=/b/b.img,lsa=/b/b.lsa,id=x",
            "--cxl-precommit",
            "--cpuid-no-hypervisor",
            "--guest-file=/bin/true:/t",
            "--guest-file=/bin/false",
            "--iommu=vtd,scalable=off",
            "--control=/tmp/ctl.sock",
            "--control-serial=/dev/ttyS3",
            "--nested-nvdimm=0:/b/a.img",
            "--nested-nvdimm=1:/b/b.img",
            "--",
            "sh",
            "-c",
            "echo --not-a-flag",
        ]
        .map(OsString::from)
        .to_vec();
        let args = parse_run(&full);
        assert_eq!(args.cxl_type3.len(), 2);
        assert_eq!(args.command.len(), 3);
        assert_eq!(parse_run(&args.to_args()), args);
        // Defaults stay defaults.
        let bare = parse_run(&[]);
        assert_eq!(parse_run(&bare.to_args()), bare);
        // The flag that conflicts with --cpuid-no-hypervisor.
        let shown = parse_run(&["--cpuid-hypervisor".into()]);
        assert!(shown.cpuid_hypervisor);
        assert_eq!(parse_run(&shown.to_args()), shown);
    }

    /// CXL devices hide the hypervisor unless --cpuid-hypervisor keeps it; without them only
    /// --cpuid-no-hypervisor hides it; asking for both is a usage error.
    #[test]
    fn the_hypervisor_is_hidden_by_default_only_with_cxl_devices() {
        let bare = parse_run(&[]);
        assert!(!hides_hypervisor(&bare, false));
        assert!(hides_hypervisor(&bare, true));
        let shown = parse_run(&["--cpuid-hypervisor".into()]);
        assert!(!hides_hypervisor(&shown, true));
        assert!(!hides_hypervisor(&shown, false));
        let hidden = parse_run(&["--cpuid-no-hypervisor".into()]);
        assert!(hides_hypervisor(&hidden, false));
        assert!(hides_hypervisor(&hidden, true));
        let both = ["vmm", "run", "--cpuid-hypervisor", "--cpuid-no-hypervisor"];
        assert!(Cli::try_parse_from(both).is_err());
    }

    #[test]
    fn nested_nvdimm_needs_a_slot_and_an_absolute_path() {
        assert_eq!(
            parse_nested_nvdimm("2:/a:b.img").unwrap(),
            (PathBuf::from("/a:b.img"), 2)
        );
        for bad in ["", "x:/a", "1:rel", "/a", "1"] {
            assert!(parse_nested_nvdimm(bad).is_err(), "{bad}");
        }
    }
}
