//! The virtual machine: KVM VM and vCPUs, guest memory, platform devices, the PCIe root complex,
//! MSI delivery, and the main event loop that decides how a run ends.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::{Bus, lock};
use devices::legacy::{
    GuestChannel, I8042Reset, PlatformEvents, PowerRegisters, ResetControl, SerialPort,
};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use iommu::{MsiError, MsiMessage, MsiSink};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_msi, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use thiserror::Error;
use vm_memory::{
    Address, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;
use vmm_sys_util::timerfd::TimerFd;

use crate::acpi;
use crate::boot::{self, BootSpec, KernelFormat};
use crate::cpu;
use crate::layout::*;
use crate::memory;
use crate::pci::Platform;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM ioctl {0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    #[error("cannot allocate {size} bytes of guest memory: {msg}")]
    Memory { size: u64, msg: String },
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("building ACPI tables failed: {0}")]
    Acpi(String),
    #[error("setting up the PCIe root complex failed: {0}")]
    Pci(String),
    #[error("CXL: {0}")]
    Cxl(String),
    #[error("control API: {0}")]
    Control(String),
    #[error("event loop failed: {0}")]
    EventLoop(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Where the kernel console (COM1) goes.
#[derive(Debug, Clone)]
pub enum ConsoleMode {
    /// Interactive: COM1 is the terminal (stdin forwarded, stdout shown).
    Interactive,
    /// Command mode: the console is captured (shown on stderr only when `echo`), optionally
    /// logged to a file; the command's stdout/stderr come through COM2/COM3.
    Captured { echo: bool, log: Option<PathBuf> },
}

/// Everything needed to run one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub cpus: u32,
    pub memory: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub initrd_extra: Vec<u8>,
    pub cmdline: String,
    pub console: ConsoleMode,
    pub timeout: Option<Duration>,
    /// CXL Type 3 memory devices (`--cxl-type3`).
    pub cxl_devices: Vec<crate::cxl::CxlType3Spec>,
    /// Commit their HDM decoders before boot (`--cxl-precommit`).
    pub cxl_precommit: bool,
    /// Hide the hypervisor from the guest's CPUID (`--cpuid-no-hypervisor`).
    pub hide_hypervisor: bool,
    /// Where the control API is served (`--control`), if anywhere.
    pub control: Option<ControlEndpoint>,
    /// Backing files the nested host has as NVDIMMs (path, slot), mapped from there.
    pub nested_media: Vec<(PathBuf, u32)>,
    /// The VT-d remapping unit (`--iommu vtd`), if any.
    pub iommu: Option<crate::vtd::VtdSpec>,
    /// Emulated I/OAT DMA engines (`--ioat`).
    pub ioat: Vec<crate::ioat::IoatSpec>,
    /// Emulated vmxnet3 NICs with their UDP fabrics (`--nic`).
    pub nics: Vec<crate::nic::NicSpec>,
    /// SVA DMA engines (`--dma-engine`).
    pub dma_engines: Vec<crate::dma_engine::DmaEngineSpec>,
}

/// Where this VMM serves the control API.
#[derive(Debug, Clone)]
pub enum ControlEndpoint {
    /// A UNIX socket bound by `main` before the VM is built.
    Socket(Arc<crate::control::ControlListener>),
    /// The nested host's control serial port (the outer VMM relays the user's socket to it).
    Serial(PathBuf),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest init reported the command's exit status, then powered off.
    CommandExited(u8),
    /// The guest powered off without reporting a status.
    PoweredOff,
    /// The guest asked for a reset (no panic seen).
    Reset,
    /// The guest kernel panicked; the panic line.
    Panic(String),
    /// `--timeout` expired.
    TimedOut,
    /// The user left the interactive console (Ctrl-A x).
    UserQuit,
    /// A vCPU hit an error the VMM cannot continue from.
    VmmError(String),
    /// The VMM got SIGINT, SIGTERM or SIGHUP (the signal): the vCPUs were stopped and the
    /// devices' media flushed.
    Interrupted(i32),
}

/// Boot milestones, measured from VMM start.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimes {
    pub kernel_entry: Option<Duration>,
    pub init: Option<Duration>,
}

pub struct RunReport {
    pub outcome: Outcome,
    pub boot_times: BootTimes,
    pub kernel_format: KernelFormat,
}

/// Why the guest stopped running, as reported by devices and vCPU threads.
#[derive(Debug, Clone)]
enum StopRequest {
    PowerOff,
    Reset,
    VmmError(String),
}

/// Shared state the devices, vCPUs and console write to; the main loop reads it.
struct VmEvents {
    stop_evt: EventFd,
    started: Instant,
    state: Mutex<EventState>,
}

#[derive(Default)]
struct EventState {
    stop: Option<StopRequest>,
    exit_status: Option<u8>,
    kernel_entry: Option<Duration>,
    init: Option<Duration>,
    panic: Option<String>,
}

impl VmEvents {
    fn request_stop(&self, request: StopRequest) {
        let mut st = lock(&self.state);
        if st.stop.is_none() {
            st.stop = Some(request);
        }
        drop(st);
        if let Err(e) = self.stop_evt.write(1) {
            log::error!("cannot signal the main loop: {e}");
        }
    }
}

impl PlatformEvents for VmEvents {
    fn power_off(&self) {
        self.request_stop(StopRequest::PowerOff);
    }
    fn reset(&self) {
        self.request_stop(StopRequest::Reset);
    }
    fn guest_marker(&self, code: u8) {
        if code == 1 {
            let mut st = lock(&self.state);
            if st.init.is_none() {
                st.init = Some(self.started.elapsed());
            }
        } else {
            log::debug!("guest marker {code}");
        }
    }
    fn exit_status(&self, status: u8) {
        lock(&self.state).exit_status = Some(status);
    }
}

/// Console sink that keeps watching for the kernel's panic line.
struct ConsoleWriter {
    events: Arc<VmEvents>,
    line: Vec<u8>,
    echo: Option<Box<dyn Write + Send>>,
    log: Option<std::fs::File>,
}

const PANIC_MARKER: &str = "Kernel panic - not syncing";

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(echo) = self.echo.as_mut() {
            // A terminal that went away must not stop the guest.
            let _ = echo.write_all(buf).and_then(|_| echo.flush());
        }
        if let Some(log) = self.log.as_mut() {
            let _ = log.write_all(buf);
        }
        for &b in buf {
            if b == b'\n' || self.line.len() >= 512 {
                let text = String::from_utf8_lossy(&self.line);
                if let Some(pos) = text.find(PANIC_MARKER) {
                    let mut st = lock(&self.events.state);
                    if st.panic.is_none() {
                        st.panic = Some(text[pos..].trim_end().to_string());
                    }
                }
                self.line.clear();
            } else if b != b'\r' {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A byte stream to one of our standard streams, flushed on every write.
struct StdStream(fn() -> Box<dyn Write>);

impl Write for StdStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut w = (self.0)();
        w.write_all(buf)?;
        w.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn stdout_stream() -> Box<dyn Write> {
    Box::new(std::io::stdout().lock())
}
fn stderr_stream() -> Box<dyn Write> {
    Box::new(std::io::stderr().lock())
}

/// The one place every MSI goes through (the future vIOMMU's interrupt-remapping hook).
pub struct KvmMsiSink {
    vm: Arc<VmFd>,
}

impl MsiSink for KvmMsiSink {
    fn deliver(&self, msg: MsiMessage) -> Result<(), MsiError> {
        deliver_msi(&self.vm, msg)
    }
}

/// Delivers one MSI to the in-kernel local APICs (KVM_SIGNAL_MSI).
pub fn deliver_msi(vm: &VmFd, msg: MsiMessage) -> Result<(), MsiError> {
    let msi = kvm_msi {
        address_lo: msg.address as u32,
        address_hi: (msg.address >> 32) as u32,
        data: msg.data,
        ..Default::default()
    };
    match vm.signal_msi(msi) {
        Ok(_) => Ok(()),
        Err(e) => {
            log::warn!(
                "MSI {:#x}/{:#x} from {:?} not delivered: {e}",
                msg.address,
                msg.data,
                msg.requester_id
            );
            Err(MsiError::Injection(std::io::Error::from_raw_os_error(
                e.errno(),
            )))
        }
    }
}

type Com1 = SerialPort<ConsoleWriter>;

/// Runs a VM to completion.
pub fn run(config: &VmConfig, started: Instant) -> Result<RunReport, VmError> {
    // From here on SIGINT/SIGTERM/SIGHUP stop the run cleanly (see `signals`).
    let mut signals = crate::signals::SignalWatch::install()
        .map_err(|e| VmError::EventLoop(format!("installing signal handlers: {e}")))?;
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm = Arc::new(
        kvm.create_vm()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VM", e))?,
    );
    vm.set_tss_address(0xfffb_d000)
        .map_err(|e| VmError::Ioctl("KVM_SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(0xfffb_c000)
        .map_err(|e| VmError::Ioctl("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Ioctl("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Ioctl("KVM_CREATE_PIT2", e))?;

    // Guest RAM.
    let ranges: Vec<(GuestAddress, usize)> = memory::ram_ranges(config.memory)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|e| VmError::Memory {
        size: config.memory,
        msg: e.to_string(),
    })?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmError::Memory {
                size: config.memory,
                msg: e.to_string(),
            })?;
        let region_desc = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (both are
        // dropped when this function returns, after the vCPUs stop), and slots don't overlap.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(|e| VmError::Ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    let guest_memory = GuestMemoryAtomic::new(mem.clone());

    let events = Arc::new(VmEvents {
        stop_evt: EventFd::new(libc::EFD_NONBLOCK)?,
        started,
        state: Mutex::new(EventState::default()),
    });

    // Platform devices on port I/O.
    let mut pio = Bus::new();
    let (console_echo, console_log): (Option<Box<dyn Write + Send>>, Option<PathBuf>) =
        match &config.console {
            ConsoleMode::Interactive => (Some(Box::new(std::io::stdout())), None),
            ConsoleMode::Captured { echo, log } => (
                echo.then(|| Box::new(std::io::stderr()) as Box<dyn Write + Send>),
                log.clone(),
            ),
        };
    let log_file = match console_log {
        Some(path) => Some(std::fs::File::create(&path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("console log '{}': {e}", path.display()))
        })?),
        None => None,
    };
    let com1_irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_irqfd(&com1_irq, COM1_IRQ)
        .map_err(|e| VmError::Ioctl("KVM_IRQFD", e))?;
    let com1: Arc<Mutex<Com1>> = Arc::new(Mutex::new(SerialPort::new(
        com1_irq,
        ConsoleWriter {
            events: events.clone(),
            line: Vec::new(),
            echo: console_echo,
            log: log_file,
        },
    )));
    pio.insert(com1.clone(), u64::from(COM1_PORT), 8)
        .map_err(|e| VmError::Pci(e.to_string()))?;
    let com2_irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_irqfd(&com2_irq, COM2_IRQ)
        .map_err(|e| VmError::Ioctl("KVM_IRQFD", e))?;
    let com2 = Arc::new(Mutex::new(SerialPort::new(
        com2_irq,
        StdStream(stdout_stream),
    )));
    pio.insert(com2, u64::from(COM2_PORT), 8)
        .map_err(|e| VmError::Pci(e.to_string()))?;
    let com3_irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_irqfd(&com3_irq, COM3_IRQ)
        .map_err(|e| VmError::Ioctl("KVM_IRQFD", e))?;
    let com3 = Arc::new(Mutex::new(SerialPort::new(
        com3_irq,
        StdStream(stderr_stream),
    )));
    pio.insert(com3, u64::from(COM3_PORT), 8)
        .map_err(|e| VmError::Pci(e.to_string()))?;
    let platform_events: Arc<dyn PlatformEvents> = events.clone();
    let insert =
        |bus: &mut Bus, dev: Arc<Mutex<dyn devices::bus::BusDevice>>, base: u16, len: u64| {
            bus.insert(dev, u64::from(base), len)
                .map_err(|e| VmError::Pci(e.to_string()))
        };
    insert(
        &mut pio,
        Arc::new(Mutex::new(PowerRegisters::new(
            platform_events.clone(),
            ACPI_S5_SLEEP_TYPE,
            ACPI_RESET_VALUE,
        ))),
        ACPI_SLEEP_CONTROL_PORT,
        3,
    )?;
    insert(
        &mut pio,
        Arc::new(Mutex::new(GuestChannel::new(platform_events.clone()))),
        GUEST_MARKER_PORT,
        u64::from(GUEST_EXIT_STATUS_PORT - GUEST_MARKER_PORT + 1),
    )?;
    insert(
        &mut pio,
        Arc::new(Mutex::new(I8042Reset::new(platform_events.clone()))),
        0x64,
        1,
    )?;
    insert(
        &mut pio,
        Arc::new(Mutex::new(ResetControl::new(platform_events.clone()))),
        0xcf9,
        1,
    )?;

    // PCIe root complex (ECAM + BARs) with MSI through the one delivery function.
    let msi_sink: Arc<dyn MsiSink> = Arc::new(KvmMsiSink { vm: vm.clone() });
    let mut platform =
        Platform::new(msi_sink.clone(), guest_memory.clone()).map_err(VmError::Pci)?;
    let cxl_topology = if config.cxl_devices.is_empty() {
        None
    } else {
        let topology = crate::cxl::build_topology(
            &config.cxl_devices,
            &config.nested_media,
            &vm,
            &guest_memory,
            &msi_sink,
            &mut platform,
        )
        .map_err(VmError::Cxl)?;
        if config.cxl_precommit {
            crate::cxl::precommit(&topology).map_err(VmError::Cxl)?;
        }
        Some(topology)
    };
    // The VT-d remapping unit: its registers on the fixed MMIO, the DMAR describing it.
    let vtd = match &config.iommu {
        Some(spec) => Some(
            crate::vtd::install(spec, guest_memory.clone(), msi_sink.clone(), &mut platform)
                .map_err(VmError::Pci)?,
        ),
        None => None,
    };
    // I/OAT DMA engines on the root bus, their DMA through the VT-d unit if there is one.
    let translator = vtd.as_ref().map(|(unit, _)| {
        Arc::new(iommu::vtd::unit::VtdTranslator::new(unit.clone()))
            as Arc<dyn iommu::DmaTranslator>
    });
    let ioat = crate::ioat::install(
        &config.ioat,
        &guest_memory,
        &msi_sink,
        translator.clone(),
        &mut platform,
    )
    .map_err(VmError::Pci)?;
    // SVA DMA engines: PASID-tagged DMA, ATS and PRI through the same unit.
    let dma_engines = crate::dma_engine::install(
        &config.dma_engines,
        &guest_memory,
        &msi_sink,
        translator.clone(),
        &mut platform,
    )
    .map_err(VmError::Pci)?;
    // vmxnet3 NICs, their DMA through the same unit; their fabric sockets join the main loop.
    let (nics, device_subscribers) = crate::nic::install(
        &config.nics,
        &guest_memory,
        &msi_sink,
        translator,
        &mut platform,
    )
    .map_err(VmError::Pci)?;
    let platform = Arc::new(platform);
    if let Some(endpoint) = &config.control {
        let target = crate::control::ControlTarget {
            devices: cxl_topology
                .iter()
                .flat_map(|t| t.devices.iter())
                .map(|d| crate::control::ControlDevice {
                    id: d.spec.id.clone(),
                    memdev: d.memdev.clone(),
                    function: Some(d.device.clone()),
                    root_port: Some(d.root_port.clone()),
                })
                .collect(),
            iommu: vtd.as_ref().map(|(unit, _)| unit.clone()),
            ioat,
            dma_engines,
            nics: nics.clone(),
        };
        match endpoint {
            ControlEndpoint::Socket(listener) => listener.serve(target),
            ControlEndpoint::Serial(tty) => crate::control::serve_serial(tty, target),
        }
        .map_err(|e| VmError::Control(e.to_string()))?;
    }

    // ACPI tables and boot.
    let ram_ranges = memory::ram_ranges(config.memory);
    let mut acpi_config = acpi::AcpiConfig::new(config.cpus as u8, ram_ranges.clone());
    acpi_config.dmar = vtd.as_ref().map(|(_, dmar)| *dmar);
    if let Some(topology) = &cxl_topology {
        // CXL memory gets its own NUMA node (proximity domain 1).
        acpi_config.cxl = Some(topology.acpi_config(1));
    }
    let tables =
        acpi::create_acpi_tables(&acpi_config).map_err(|e| VmError::Acpi(e.to_string()))?;
    vm_memory::Bytes::write_slice(&mem, &tables.bytes, GuestAddress(tables.base))
        .map_err(|e| VmError::Acpi(e.to_string()))?;
    // vCPU file descriptors first: the TSC frequency is needed on the command line when the
    // hypervisor is hidden (no kvmclock; HW-reduced ACPI has no PIT/PM timer to calibrate on).
    let mut vcpu_fds = Vec::new();
    for index in 0..config.cpus {
        vcpu_fds.push(
            vm.create_vcpu(u64::from(index))
                .map_err(|e| VmError::Ioctl("KVM_CREATE_VCPU", e))?,
        );
    }
    let mut cmdline = config.cmdline.clone();
    if config.hide_hypervisor {
        let khz = vcpu_fds[0]
            .get_tsc_khz()
            .map_err(|e| VmError::Ioctl("KVM_GET_TSC_KHZ", e))?;
        cmdline.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    let spec = BootSpec {
        kernel: &config.kernel,
        initrd: config.initrd.as_deref(),
        initrd_extra: config.initrd_extra.clone(),
        cmdline,
        rsdp_addr: tables.rsdp_addr,
        e820: memory::e820_map(config.memory),
        low_ram_end: ram_ranges[0].1,
    };
    let entry = boot::load(&mem, &spec)?;

    // vCPUs.
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
    let stopping = Arc::new(AtomicBool::new(false));
    let mut vcpu_threads = Vec::new();
    for (index, vcpu) in (0..config.cpus).zip(vcpu_fds) {
        let cpuid = cpu::configure_cpuid(&supported, index, config.cpus, config.hide_hypervisor);
        let boot = (index == 0).then_some((entry.mode, entry.boot_info));
        cpu::setup_vcpu(&vcpu, &mem, &cpuid, boot)?;
        let pio = pio.clone();
        let platform = platform.clone();
        let events = events.clone();
        let stopping = stopping.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu_loop(index, vcpu, &pio, &platform, &events, &stopping))?;
        vcpu_threads.push(thread);
    }

    let outcome = main_loop(config, &events, &com1, &mut signals, device_subscribers);
    stop_vcpus(vcpu_threads, &stopping);
    // Whatever ended the run, the guest's stores to device media reach the backing files.
    if let Some(topology) = &cxl_topology {
        topology.flush();
    }
    let outcome = outcome?;
    let st = lock(&events.state);
    Ok(RunReport {
        outcome,
        boot_times: BootTimes {
            kernel_entry: st.kernel_entry,
            init: st.init,
        },
        kernel_format: entry.format,
    })
}

/// Stops the vCPU threads: each leaves `KVM_RUN` on a kick signal (a real-time signal whose
/// handler does nothing, installed without `SA_RESTART`, so `KVM_RUN` returns `EINTR`) and sees
/// `stopping`. A kick can land just before a thread enters `KVM_RUN`, so it is repeated until
/// the thread ends, for at most a second; a thread still running then is left to the process
/// exit (logged).
fn stop_vcpus(threads: Vec<std::thread::JoinHandle<()>>, stopping: &AtomicBool) {
    use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    stopping.store(true, Ordering::SeqCst);
    let kick = SIGRTMIN();
    if let Err(e) = register_signal_handler(kick, on_kick) {
        log::warn!("cannot install the vCPU kick signal handler: {e}");
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    for thread in threads {
        while !thread.is_finished() && Instant::now() < deadline {
            let _ = thread.kill(kick);
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::warn!("a vCPU thread did not stop within a second");
        }
    }
}

fn vcpu_loop(
    index: u32,
    mut vcpu: kvm_ioctls::VcpuFd,
    pio: &Bus,
    platform: &Platform,
    events: &VmEvents,
    stopping: &AtomicBool,
) {
    if index == 0 {
        lock(&events.state).kernel_entry = Some(events.started.elapsed());
    }
    while !stopping.load(Ordering::Relaxed) {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pio.read(u64::from(port), data) && !platform.pio_read(port, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !pio.write(u64::from(port), data) {
                    platform.pio_write(port, data);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !platform.mmio_read(addr, data) {
                    log::debug!("unhandled MMIO read at {addr:#x}");
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !platform.mmio_write(addr, data) {
                    log::debug!("unhandled MMIO write at {addr:#x}");
                }
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel LAPIC a halted vCPU stays in KVM; an exit here means the
                // CPU halted with interrupts disabled for good.
                log::debug!("vcpu{index} halted");
                return;
            }
            Ok(VcpuExit::Shutdown) => {
                // Triple fault: the platform resets.
                events.request_stop(StopRequest::Reset);
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                let request = match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => StopRequest::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => StopRequest::Reset,
                    other => StopRequest::VmmError(format!("vcpu{index}: system event {other}")),
                };
                events.request_stop(request);
                return;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                events.request_stop(StopRequest::VmmError(format!(
                    "vcpu{index}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                )));
                return;
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit, KVM filled the `internal`
                // member of the exit-reason union.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                events.request_stop(StopRequest::VmmError(format!(
                    "vcpu{index}: KVM internal error (suberror {suberror}; 1 = instruction emulation failure)"
                )));
                return;
            }
            Ok(other) => {
                log::debug!("vcpu{index}: unhandled exit {other:?}");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                events.request_stop(StopRequest::VmmError(format!("vcpu{index}: KVM_RUN: {e}")));
                return;
            }
        }
    }
}

/// A device's own event handler on the VMM's main thread: in `init` it subscribes its own file
/// descriptors (sockets, eventfds, timers) to the main loop's epoll set with tokens of its
/// choosing, and `process` handles them. Devices whose back end lives outside the guest's MMIO
/// path (the RDMA NIC's fabric sockets, issue 10) hand one to [`main_loop`] next to the loop's
/// own handler; each subscriber has its own token space (event-manager keys by subscriber).
pub type DeviceSubscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The main thread's event loop: its own handler (stop requests, console input, the timeout)
/// plus the devices' subscribers.
fn event_loop(
    main: &Arc<Mutex<MainLoop>>,
    devices: Vec<DeviceSubscriber>,
) -> Result<EventManager<DeviceSubscriber>, VmError> {
    let mut manager: EventManager<DeviceSubscriber> =
        EventManager::new().map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
    let own: DeviceSubscriber = main.clone();
    manager.add_subscriber(own);
    for device in devices {
        manager.add_subscriber(device);
    }
    Ok(manager)
}

const STOP_TOKEN: u32 = 1;
const STDIN_TOKEN: u32 = 2;
const TIMER_TOKEN: u32 = 3;

/// Main-thread event handler: guest stop requests, interactive input, the timeout.
struct MainLoop {
    events: Arc<VmEvents>,
    com1: Arc<Mutex<Com1>>,
    timer: Option<TimerFd>,
    interactive: bool,
    pending_input: Vec<u8>,
    escape: bool,
    timed_out: bool,
    user_quit: bool,
    done: bool,
}

impl MutEventSubscriber for MainLoop {
    fn init(&mut self, ops: &mut EventOps) {
        let add = |ops: &mut EventOps, fd: i32, token: u32| {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                if token == STDIN_TOKEN {
                    // A regular file or /dev/null cannot be polled: no console input then.
                    log::debug!("stdin cannot be watched ({e:?}); console input disabled");
                } else {
                    log::error!("event loop: cannot watch fd {fd}: {e:?}");
                }
            }
        };
        add(ops, self.events.stop_evt.as_raw_fd(), STOP_TOKEN);
        if let Some(timer) = &self.timer {
            add(ops, timer.as_raw_fd(), TIMER_TOKEN);
        }
        if self.interactive {
            add(ops, libc::STDIN_FILENO, STDIN_TOKEN);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            STOP_TOKEN => {
                let _ = self.events.stop_evt.read();
                self.done = true;
            }
            TIMER_TOKEN => {
                self.timed_out = true;
                self.done = true;
            }
            STDIN_TOKEN => {
                let mut buf = [0u8; 256];
                // SAFETY: reading into a stack buffer of the given length from our own stdin.
                let n =
                    unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    // End of input: stop watching stdin, keep the guest running.
                    let _ = ops.remove(Events::with_data_raw(
                        libc::STDIN_FILENO,
                        STDIN_TOKEN,
                        EventSet::IN,
                    ));
                    return;
                }
                for &b in &buf[..n as usize] {
                    if self.escape {
                        self.escape = false;
                        match b {
                            b'x' | b'X' => {
                                self.user_quit = true;
                                self.done = true;
                                return;
                            }
                            0x01 => self.pending_input.push(0x01),
                            other => {
                                self.pending_input.push(0x01);
                                self.pending_input.push(other);
                            }
                        }
                    } else if b == 0x01 {
                        self.escape = true;
                    } else {
                        self.pending_input.push(b);
                    }
                }
                self.flush_input();
            }
            _ => {}
        }
    }
}

impl MainLoop {
    fn flush_input(&mut self) {
        if self.pending_input.is_empty() {
            return;
        }
        let taken = lock(&self.com1).enqueue_input(&self.pending_input);
        self.pending_input.drain(..taken);
    }
}

struct TerminalGuard(bool);
impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

fn main_loop(
    config: &VmConfig,
    events: &Arc<VmEvents>,
    com1: &Arc<Mutex<Com1>>,
    signals: &mut crate::signals::SignalWatch,
    device_subscribers: Vec<DeviceSubscriber>,
) -> Result<Outcome, VmError> {
    let interactive = matches!(config.console, ConsoleMode::Interactive);
    let stdin_is_tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let _guard = TerminalGuard(interactive && stdin_is_tty);
    if interactive && stdin_is_tty {
        std::io::stdin()
            .lock()
            .set_raw_mode()
            .map_err(|e| VmError::EventLoop(format!("cannot put the terminal in raw mode: {e}")))?;
    }
    let timer = match config.timeout {
        Some(limit) => {
            let timer_err =
                |e: vmm_sys_util::errno::Error| VmError::EventLoop(format!("timeout timer: {e}"));
            let mut t = TimerFd::new().map_err(timer_err)?;
            let remaining = limit
                .saturating_sub(events.started.elapsed())
                .max(Duration::from_millis(1));
            t.reset(remaining, None).map_err(timer_err)?;
            Some(t)
        }
        None => None,
    };
    let main = Arc::new(Mutex::new(MainLoop {
        events: events.clone(),
        com1: com1.clone(),
        timer,
        interactive,
        pending_input: Vec::new(),
        escape: false,
        timed_out: false,
        user_quit: false,
        done: false,
    }));
    let mut manager = event_loop(&main, device_subscribers)?;
    let mut interrupted = None;
    loop {
        // Wake periodically so input held back by a full UART FIFO gets another chance, and a
        // stop signal is seen within 20 ms.
        manager
            .run_with_timeout(20)
            .map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
        if let Some(signal) = signals.next() {
            interrupted = Some(signal);
            break;
        }
        let mut m = lock(&main);
        m.flush_input();
        if m.done {
            break;
        }
    }
    let m = lock(&main);
    let st = lock(&events.state);
    let outcome = if let Some(signal) = interrupted {
        Outcome::Interrupted(signal)
    } else if m.user_quit {
        Outcome::UserQuit
    } else if m.timed_out {
        Outcome::TimedOut
    } else {
        match st.stop.clone() {
            Some(StopRequest::VmmError(msg)) => Outcome::VmmError(msg),
            Some(StopRequest::Reset) => match (&st.panic, st.exit_status) {
                (Some(line), _) => Outcome::Panic(line.clone()),
                (None, Some(status)) => Outcome::CommandExited(status),
                (None, None) => Outcome::Reset,
            },
            Some(StopRequest::PowerOff) | None => match (st.exit_status, &st.panic) {
                (Some(status), _) => Outcome::CommandExited(status),
                (None, Some(line)) => Outcome::Panic(line.clone()),
                (None, None) => Outcome::PoweredOff,
            },
        }
    };
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device subscriber counting the writes to its own eventfd.
    struct CountingDevice {
        fd: EventFd,
        seen: u64,
    }

    impl MutEventSubscriber for CountingDevice {
        fn init(&mut self, ops: &mut EventOps) {
            // Token 1, the same number as the main loop's STOP_TOKEN: token spaces are separate.
            ops.add(Events::with_data_raw(self.fd.as_raw_fd(), 1, EventSet::IN))
                .expect("watching the device's fd");
        }

        fn process(&mut self, events: Events, _ops: &mut EventOps) {
            assert_eq!(events.data(), 1);
            self.seen += self.fd.read().expect("reading the device's fd");
        }
    }

    /// The main loop runs a device's own descriptors next to its own: the device's events reach
    /// the device (not the loop's handler, though both use token 1), and a stop request still
    /// reaches the loop.
    #[test]
    fn device_subscribers_run_on_the_main_loop() {
        let events = Arc::new(VmEvents {
            stop_evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            started: Instant::now(),
            state: Mutex::new(EventState::default()),
        });
        let com1 = Arc::new(Mutex::new(SerialPort::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleWriter {
                events: events.clone(),
                line: Vec::new(),
                echo: None,
                log: None,
            },
        )));
        let main = Arc::new(Mutex::new(MainLoop {
            events: events.clone(),
            com1,
            timer: None,
            interactive: false,
            pending_input: Vec::new(),
            escape: false,
            timed_out: false,
            user_quit: false,
            done: false,
        }));
        let device = Arc::new(Mutex::new(CountingDevice {
            fd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            seen: 0,
        }));
        let mut manager = event_loop(&main, vec![device.clone() as DeviceSubscriber]).unwrap();

        lock(&device).fd.write(3).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(lock(&device).seen, 3);
        assert!(
            !lock(&main).done,
            "the device's event went to the main handler"
        );

        events.request_stop(StopRequest::PowerOff);
        manager.run_with_timeout(1000).unwrap();
        assert!(lock(&main).done);
        assert_eq!(lock(&device).seen, 3);
    }
}
