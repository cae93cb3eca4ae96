//! Can this machine's `/dev/kvm` run a stock Linux guest?
//!
//! Some machines expose a `/dev/kvm` that creates VMs but cannot run an unmodified kernel: the
//! nested PVM hypervisor (`kvm_pvm`) runs a non-PVM guest's kernel mode under instruction
//! emulation, and its emulator fails on instructions a stock kernel executes early (BMI2 `shlx`
//! in the zstd decompressor, `lock cmpxchg16b`, `xrstor`, `int3` in the alternatives self-test;
//! see research/host-kvm.md). [`probe_stock_guest_support`] finds out by running exactly those
//! instructions in a tiny 64-bit guest, the way a kernel would run them: at CPL 0 with paging on.
//!
//! The guest (64 KiB at guest-physical 0, identity-mapped by one 2 MiB page) runs one snippet per
//! check. Each reports success with `out 0xe9, <check>`, a wrong result with `out 0xea, <check>`;
//! every exception vector reports `out 0xeb, <vector>`; the end is `out 0xe9, 0xff; hlt`. Checks
//! for features that KVM's supported CPUID does not offer are left out (a stock kernel would not
//! use them either). The vCPU runs on its own thread with a deadline, so the probe never hangs.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_MAX_CPUID_ENTRIES, kvm_segment,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

/// Whether `/dev/kvm` can run a stock (unmodified, non-paravirtualized) Linux guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    /// The probe guest ran every check: stock guests can run here.
    Capable,
    /// `/dev/kvm` works but cannot run a stock guest; the reason names the failing check.
    Incapable(String),
    /// No usable `/dev/kvm` (missing, no permission, broken API).
    NoKvm(String),
}

impl fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Capable => write!(f, "/dev/kvm can run stock guests"),
            Self::Incapable(reason) => write!(f, "/dev/kvm cannot run stock guests: {reason}"),
            Self::NoKvm(reason) => write!(f, "no usable /dev/kvm: {reason}"),
        }
    }
}

/// How long the probe vCPU may run before it is stopped and the probe reports failure.
const RUN_DEADLINE: Duration = Duration::from_secs(2);
/// After the deadline: how long to keep kicking the vCPU thread before abandoning it.
const KICK_GRACE: Duration = Duration::from_secs(1);
/// Exits the probe guest may take in all (one per check, the end, and slack).
const MAX_EXITS: usize = 32;
/// Real-time signal (offset from SIGRTMIN) that kicks the probe vCPU out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 7;

/// Guest-physical layout of the probe guest.
const MEM_SIZE: usize = 0x10000;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const GDT: u64 = 0x4000;
const IDT: u64 = 0x5000;
const CODE: u64 = 0x6000;
const EXCEPTION_STUBS: u64 = 0x8000;
const INT3_HANDLER: u64 = 0x8400;
const STACK_TOP: u64 = 0x9000;
/// The shlx check's memory operand (on its own page).
const SHLX_OPERAND: u64 = 0xa030;
/// Ports the guest reports on.
const PORT_PASS: u16 = 0xe9;
const PORT_WRONG: u16 = 0xea;
const PORT_EXCEPTION: u16 = 0xeb;
/// Value written to [`PORT_PASS`] after the last check.
const ALL_DONE: u8 = 0xff;

/// CPU features a check needs (from KVM's supported CPUID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Nothing,
    Bmi2,
    Cx16,
    Xsave,
}

/// One check: its report number, what it tests, and its code (position-independent; data at
/// 0x7000..0x7800).
struct Check {
    id: u8,
    what: &'static str,
    needs: Needs,
    code: &'static [u8],
}

/// The checks, in the order they run.
const CHECKS: &[Check] = &[
    Check {
        id: 1,
        what: "mov/out (basic execution)",
        needs: Needs::Nothing,
        // mov eax, 1; out 0xe9, al
        code: &[0xb8, 0x01, 0x00, 0x00, 0x00, 0xe6, 0xe9],
    },
    Check {
        id: 2,
        what: "BMI2 shlx (zstd decompressor)",
        needs: Needs::Bmi2,
        // mov ecx, 3; shlx eax, dword [0xa030], ecx; cmp eax, 8; je ok
        // mov al, 2; out 0xea, al; hlt; ok: mov al, 2; out 0xe9, al
        // The operand (1, written by the host) is on a page the guest has not touched before.
        code: &[
            0xb9, 0x03, 0x00, 0x00, 0x00, 0xc4, 0xe2, 0x71, 0xf7, 0x04, 0x25, 0x30, 0xa0, 0x00,
            0x00, 0x83, 0xf8, 0x08, 0x74, 0x05, 0xb0, 0x02, 0xe6, 0xea, 0xf4, 0xb0, 0x02, 0xe6,
            0xe9,
        ],
    },
    Check {
        id: 3,
        what: "lock cmpxchg16b",
        needs: Needs::Cx16,
        // mov edi, 0x7000; xor eax, eax; mov [rdi], rax; mov [rdi+8], rax; xor edx, edx
        // mov ebx, 0x1111; mov ecx, 0x2222; lock cmpxchg16b [rdi]; jne bad
        // cmp qword [rdi], 0x1111; jne bad; cmp qword [rdi+8], 0x2222; jne bad
        // mov al, 3; out 0xe9, al; jmp end; bad: mov al, 3; out 0xea, al; hlt; end:
        code: &[
            0xbf, 0x00, 0x70, 0x00, 0x00, 0x31, 0xc0, 0x48, 0x89, 0x07, 0x48, 0x89, 0x47, 0x08,
            0x31, 0xd2, 0xbb, 0x11, 0x11, 0x00, 0x00, 0xb9, 0x22, 0x22, 0x00, 0x00, 0xf0, 0x48,
            0x0f, 0xc7, 0x0f, 0x75, 0x19, 0x48, 0x81, 0x3f, 0x11, 0x11, 0x00, 0x00, 0x75, 0x10,
            0x48, 0x81, 0x7f, 0x08, 0x22, 0x22, 0x00, 0x00, 0x75, 0x06, 0xb0, 0x03, 0xe6, 0xe9,
            0xeb, 0x05, 0xb0, 0x03, 0xe6, 0xea, 0xf4,
        ],
    },
    Check {
        id: 4,
        what: "int3 through the IDT and iretq (alternatives self-test)",
        needs: Needs::Nothing,
        // mov byte [0x7020], 0; int3; cmp byte [0x7020], 0x55; je ok
        // mov al, 4; out 0xea, al; hlt; ok: mov al, 4; out 0xe9, al
        code: &[
            0xc6, 0x04, 0x25, 0x20, 0x70, 0x00, 0x00, 0x00, 0xcc, 0x80, 0x3c, 0x25, 0x20, 0x70,
            0x00, 0x00, 0x55, 0x74, 0x05, 0xb0, 0x04, 0xe6, 0xea, 0xf4, 0xb0, 0x04, 0xe6, 0xe9,
        ],
    },
    Check {
        id: 5,
        what: "fxsave/fxrstor",
        needs: Needs::Nothing,
        // fxsave [0x7100]; fxrstor [0x7100]; mov al, 5; out 0xe9, al
        code: &[
            0x0f, 0xae, 0x04, 0x25, 0x00, 0x71, 0x00, 0x00, 0x0f, 0xae, 0x0c, 0x25, 0x00, 0x71,
            0x00, 0x00, 0xb0, 0x05, 0xe6, 0xe9,
        ],
    },
    Check {
        id: 6,
        what: "xsetbv/xsave/xrstor (FPU init)",
        needs: Needs::Xsave,
        // xor ecx, ecx; xor edx, edx; mov eax, 3; xsetbv; mov eax, 3; xor edx, edx
        // xsave [0x7400]; xrstor [0x7400]; mov al, 6; out 0xe9, al
        code: &[
            0x31, 0xc9, 0x31, 0xd2, 0xb8, 0x03, 0x00, 0x00, 0x00, 0x0f, 0x01, 0xd1, 0xb8, 0x03,
            0x00, 0x00, 0x00, 0x31, 0xd2, 0x0f, 0xae, 0x24, 0x25, 0x00, 0x74, 0x00, 0x00, 0x0f,
            0xae, 0x2c, 0x25, 0x00, 0x74, 0x00, 0x00, 0xb0, 0x06, 0xe6, 0xe9,
        ],
    },
];

/// mov al, 0xff; out 0xe9, al; hlt
const DONE_CODE: &[u8] = &[0xb0, ALL_DONE, 0xe6, 0xe9, 0xf4];
/// The int3 handler: mov byte [0x7020], 0x55; iretq
const INT3_CODE: &[u8] = &[0xc6, 0x04, 0x25, 0x20, 0x70, 0x00, 0x00, 0x55, 0x48, 0xcf];

/// Probes `/dev/kvm` by running a stock kernel's early instructions in a tiny guest (well under
/// a second on working KVM; bounded by a deadline otherwise).
pub fn probe_stock_guest_support() -> ProbeResult {
    let started = Instant::now();
    let result = probe();
    log::debug!(
        "kvm probe: {result} ({:.1} ms)",
        started.elapsed().as_secs_f64() * 1000.0
    );
    match result {
        ProbeResult::Incapable(reason) if pvm_loaded() => ProbeResult::Incapable(format!(
            "{reason}; /dev/kvm is PVM (module kvm_pvm is loaded)"
        )),
        other => other,
    }
}

fn pvm_loaded() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

fn probe() -> ProbeResult {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            return ProbeResult::NoKvm(match e.errno() {
                libc::ENOENT => {
                    "/dev/kvm does not exist (KVM not enabled or not passed through)".into()
                }
                libc::EACCES | libc::EPERM => {
                    "/dev/kvm: permission denied (add the user to the kvm group)".into()
                }
                _ => format!("cannot open /dev/kvm: {e}"),
            });
        }
    };
    let version = kvm.get_api_version();
    if version != 12 {
        return ProbeResult::NoKvm(format!("/dev/kvm speaks API version {version}, not 12"));
    }
    let vm = match kvm.create_vm() {
        Ok(vm) => vm,
        Err(e) => return ProbeResult::NoKvm(format!("KVM_CREATE_VM failed: {e}")),
    };
    let cpuid = match kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES) {
        Ok(c) => c,
        Err(e) => return ProbeResult::Incapable(format!("KVM_GET_SUPPORTED_CPUID failed: {e}")),
    };
    let features = Features::from_cpuid(&cpuid);
    let checks: Vec<&'static Check> = CHECKS.iter().filter(|c| features.has(c.needs)).collect();
    let memory = match GuestMemory::new(&checks) {
        Ok(m) => m,
        Err(e) => return ProbeResult::Incapable(format!("cannot map probe guest memory: {e}")),
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: memory.host_addr(),
    };
    // SAFETY: the region is our own anonymous mapping of MEM_SIZE bytes, which stays mapped as
    // long as the VM exists (`memory` moves to the vCPU thread with the VM and outlives it, or
    // is leaked with it if that thread must be abandoned).
    if let Err(e) = unsafe { vm.set_user_memory_region(region) } {
        return ProbeResult::Incapable(format!("KVM_SET_USER_MEMORY_REGION failed: {e}"));
    }
    let vcpu = match setup_vcpu(&vm, &cpuid, features) {
        Ok(v) => v,
        Err(reason) => return ProbeResult::Incapable(reason),
    };
    run_with_deadline(vm, vcpu, memory, checks)
}

/// The features of KVM's supported CPUID that decide which checks run.
#[derive(Debug, Clone, Copy)]
struct Features {
    bmi2: bool,
    cx16: bool,
    xsave: bool,
}

impl Features {
    fn from_cpuid(cpuid: &CpuId) -> Self {
        let entry = |function: u32, index: u32| {
            cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == function && e.index == index)
                .copied()
        };
        let leaf1 = entry(1, 0);
        let leaf7 = entry(7, 0);
        Self {
            bmi2: leaf7.is_some_and(|e| e.ebx & (1 << 8) != 0),
            cx16: leaf1.is_some_and(|e| e.ecx & (1 << 13) != 0),
            xsave: leaf1.is_some_and(|e| e.ecx & (1 << 26) != 0),
        }
    }

    fn has(self, needs: Needs) -> bool {
        match needs {
            Needs::Nothing => true,
            Needs::Bmi2 => self.bmi2,
            Needs::Cx16 => self.cx16,
            Needs::Xsave => self.xsave,
        }
    }
}

/// The probe guest's memory: an anonymous private mapping, unmapped on drop.
struct GuestMemory {
    ptr: *mut u8,
}

// SAFETY: the mapping is plain memory owned by this value; moving it to another thread is fine.
unsafe impl Send for GuestMemory {}

impl GuestMemory {
    /// Maps the memory and writes page tables, GDT, IDT, exception stubs and the checks' code.
    fn new(checks: &[&Check]) -> std::io::Result<Self> {
        // SAFETY: anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let mut mem = Self { ptr: ptr.cast() };
        let write_u64 = |mem: &mut Self, at: u64, v: u64| mem.write(at, &v.to_le_bytes());
        // Identity map of the first 2 MiB: PML4[0] -> PDPT[0] -> PD[0] = 2 MiB page at 0.
        write_u64(&mut mem, PML4, PDPT | 0x3);
        write_u64(&mut mem, PDPT, PD | 0x3);
        write_u64(&mut mem, PD, 0x83);
        // GDT: null, 64-bit code (selector 0x08), data (selector 0x10).
        write_u64(&mut mem, GDT + 8, 0x00af_9b00_0000_ffff);
        write_u64(&mut mem, GDT + 16, 0x00cf_9300_0000_ffff);
        // IDT: vectors 0..31 report themselves; vector 3 (int3) has a real handler.
        for vector in 0..32u8 {
            let handler = if vector == 3 {
                INT3_HANDLER
            } else {
                let stub = EXCEPTION_STUBS + u64::from(vector) * 16;
                // mov al, vector; out 0xeb, al; hlt
                mem.write(stub, &[0xb0, vector, 0xe6, PORT_EXCEPTION as u8, 0xf4]);
                stub
            };
            mem.write(IDT + u64::from(vector) * 16, &idt_gate(handler));
        }
        mem.write(INT3_HANDLER, INT3_CODE);
        mem.write(SHLX_OPERAND, &1u32.to_le_bytes());
        let mut code = Vec::new();
        for check in checks {
            code.extend_from_slice(check.code);
        }
        code.extend_from_slice(DONE_CODE);
        mem.write(CODE, &code);
        Ok(mem)
    }

    fn write(&mut self, at: u64, bytes: &[u8]) {
        let at = at as usize;
        assert!(
            at + bytes.len() <= MEM_SIZE,
            "probe guest layout overflows its memory"
        );
        // SAFETY: bounds checked above against the mapping's size; nothing else aliases it yet.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(at), bytes.len()) };
    }

    fn host_addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping created in `new`; the VM using it has been dropped first.
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
    }
}

/// A 64-bit interrupt gate to `handler` in the code segment (selector 0x08), DPL 0.
fn idt_gate(handler: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&0x08u16.to_le_bytes());
    g[5] = 0x8e;
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

/// Creates the vCPU in 64-bit mode at CPL 0 with paging, SSE and (if offered) XSAVE enabled.
fn setup_vcpu(vm: &VmFd, cpuid: &CpuId, features: Features) -> Result<VcpuFd, String> {
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU failed: {e}"))?;
    vcpu.set_cpuid2(cpuid)
        .map_err(|e| format!("KVM_SET_CPUID2 failed: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS failed: {e}"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 23;
    sregs.idt.base = IDT;
    sregs.idt.limit = 32 * 16 - 1;
    sregs.cr3 = PML4;
    // CR4: PAE, OSFXSR, OSXMMEXCPT, and OSXSAVE when XSAVE is offered.
    sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10) | if features.xsave { 1 << 18 } else { 0 };
    // CR0: PE, MP, ET, NE, WP, PG.
    sregs.cr0 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
    // EFER: LME, LMA.
    sregs.efer = (1 << 8) | (1 << 10);
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS (64-bit mode) failed: {e}"))?;
    let mut regs = vcpu
        .get_regs()
        .map_err(|e| format!("KVM_GET_REGS failed: {e}"))?;
    regs.rip = CODE;
    regs.rsp = STACK_TOP;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS failed: {e}"))?;
    Ok(vcpu)
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the kick signal once; a handled signal interrupts KVM_RUN.
fn kick_signal() -> Option<libc::c_int> {
    static INSTALLED: OnceLock<Option<libc::c_int>> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let signal = SIGRTMIN() + KICK_SIGNAL_OFFSET;
        register_signal_handler(signal, on_kick)
            .ok()
            .map(|()| signal)
    })
}

/// Runs the probe vCPU on its own thread; stops it at the deadline.
fn run_with_deadline(
    vm: VmFd,
    mut vcpu: VcpuFd,
    memory: GuestMemory,
    checks: Vec<&'static Check>,
) -> ProbeResult {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let thread_stop = stop.clone();
    let spawned = thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            let result = run_checks(&mut vcpu, &checks, &thread_stop);
            // The VM and its memory go in this order: vCPU, VM, then the memory it maps.
            drop(vcpu);
            drop(vm);
            drop(memory);
            let _ = tx.send(result);
        });
    let handle = match spawned {
        Ok(h) => h,
        Err(e) => return ProbeResult::Incapable(format!("cannot start the probe thread: {e}")),
    };
    match rx.recv_timeout(RUN_DEADLINE) {
        Ok(result) => {
            let _ = handle.join();
            return result;
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let _ = handle.join();
            return ProbeResult::Incapable("the probe thread failed".into());
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {}
    }
    // Deadline: ask the thread to stop and kick it out of KVM_RUN until it does.
    stop.store(true, Ordering::SeqCst);
    let signal = kick_signal();
    let grace_end = Instant::now() + KICK_GRACE;
    while Instant::now() < grace_end {
        if let Some(sig) = signal {
            let _ = handle.kill(sig);
        }
        if let Ok(result) = rx.recv_timeout(Duration::from_millis(20)) {
            let _ = handle.join();
            return match result {
                ProbeResult::Capable => ProbeResult::Capable,
                other => ProbeResult::Incapable(format!(
                    "the probe guest did not finish within {} ms ({})",
                    RUN_DEADLINE.as_millis(),
                    describe(&other)
                )),
            };
        }
    }
    // The thread stays blocked: leave it (it owns the VM and its memory) and report.
    ProbeResult::Incapable(format!(
        "KVM_RUN did not return within {} ms",
        (RUN_DEADLINE + KICK_GRACE).as_millis()
    ))
}

fn describe(result: &ProbeResult) -> String {
    match result {
        ProbeResult::Capable => "finished".into(),
        ProbeResult::Incapable(r) | ProbeResult::NoKvm(r) => r.clone(),
    }
}

/// Runs the vCPU through the checks and interprets its exits.
fn run_checks(vcpu: &mut VcpuFd, checks: &[&Check], stop: &AtomicBool) -> ProbeResult {
    let mut next = 0usize;
    let current = |next: usize| {
        checks
            .get(next)
            .map(|c| c.what)
            .unwrap_or("the final report")
    };
    for _ in 0..MAX_EXITS {
        if stop.load(Ordering::SeqCst) {
            return ProbeResult::Incapable(format!("stopped while running {}", current(next)));
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if stop.load(Ordering::SeqCst) {
                    return ProbeResult::Incapable(format!(
                        "timed out while running {}",
                        current(next)
                    ));
                }
                continue;
            }
            Err(e) => {
                return ProbeResult::Incapable(format!(
                    "KVM_RUN failed while running {}: {e}",
                    current(next)
                ));
            }
        };
        match exit {
            VcpuExit::IoOut(PORT_PASS, data) if data.first() == Some(&ALL_DONE) => {
                return if next == checks.len() {
                    ProbeResult::Capable
                } else {
                    ProbeResult::Incapable(format!("the probe guest skipped {}", current(next)))
                };
            }
            VcpuExit::IoOut(PORT_PASS, data) => {
                let id = data.first().copied().unwrap_or(0);
                if checks.get(next).map(|c| c.id) != Some(id) {
                    return ProbeResult::Incapable(format!(
                        "the probe guest reported check {id} while running {}",
                        current(next)
                    ));
                }
                next += 1;
            }
            VcpuExit::IoOut(PORT_WRONG, _) => {
                return ProbeResult::Incapable(format!("{} gave a wrong result", current(next)));
            }
            VcpuExit::IoOut(PORT_EXCEPTION, data) => {
                let vector = data.first().copied().unwrap_or(0xff);
                return ProbeResult::Incapable(format!(
                    "{} raised exception {} (vector {vector})",
                    current(next),
                    exception_name(vector)
                ));
            }
            VcpuExit::InternalError => {
                let what = current(next);
                let run = vcpu.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // active member of the exit union (`emulation_failure` extends it for
                // suberror 1, as its flags say).
                let (suberror, failure) = unsafe {
                    (
                        run.__bindgen_anon_1.internal.suberror,
                        run.__bindgen_anon_1.emulation_failure,
                    )
                };
                let kind = match suberror {
                    KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
                    KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
                    KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failure",
                    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
                    _ => "internal error",
                };
                let mut detail = String::new();
                if suberror == KVM_INTERNAL_ERROR_EMULATION
                    && failure.ndata >= 3
                    && failure.flags
                        & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
                        != 0
                {
                    // SAFETY: the flag says the instruction bytes are valid.
                    let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
                    let n = usize::from(insn.insn_size).min(5);
                    let bytes: Vec<String> = insn.insn_bytes[..n]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    detail = format!(", instruction bytes {} ..", bytes.join(" "));
                }
                return ProbeResult::Incapable(format!(
                    "KVM_RUN: {kind} (internal error {suberror}{detail}) while running {what}"
                ));
            }
            VcpuExit::FailEntry(reason, _) => {
                return ProbeResult::Incapable(format!(
                    "KVM_RUN: VM entry failed (hardware reason {reason:#x}) while running {}",
                    current(next)
                ));
            }
            VcpuExit::Shutdown => {
                return ProbeResult::Incapable(format!(
                    "triple fault while running {}",
                    current(next)
                ));
            }
            VcpuExit::Hlt => {
                return ProbeResult::Incapable(format!(
                    "the probe guest halted early, in {}",
                    current(next)
                ));
            }
            other => {
                return ProbeResult::Incapable(format!(
                    "unexpected exit {other:?} while running {}",
                    current(next)
                ));
            }
        }
    }
    ProbeResult::Incapable(format!(
        "more than {MAX_EXITS} exits while running {}",
        current(next)
    ))
}

fn exception_name(vector: u8) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        3 => "#BP",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        19 => "#XM",
        _ => "exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_have_distinct_ids_and_fit() {
        let mut ids: Vec<u8> = CHECKS.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), CHECKS.len());
        let total: usize = CHECKS.iter().map(|c| c.code.len()).sum::<usize>() + DONE_CODE.len();
        assert!(
            CODE as usize + total <= 0x7000,
            "code would overlap the data area"
        );
        // Each check reports its own id on the pass port: ...0xb0 <id> 0xe6 0xe9 at its end or
        // before a jump over its failure block.
        for c in CHECKS {
            assert!(
                c.code.windows(4).any(|w| w == [0xb0, c.id, 0xe6, 0xe9])
                    || (c.id == 1 && c.code.ends_with(&[0xe6, 0xe9])),
                "check {} does not report itself",
                c.id
            );
        }
    }

    #[test]
    fn idt_gate_layout() {
        let g = idt_gate(0x1234_5678_9abc_def0);
        assert_eq!(&g[0..2], &[0xf0, 0xde]);
        assert_eq!(&g[2..4], &[0x08, 0x00]);
        assert_eq!(g[5], 0x8e);
        assert_eq!(&g[6..8], &[0xbc, 0x9a]);
        assert_eq!(&g[8..12], &[0x78, 0x56, 0x34, 0x12]);
    }

    /// Runs the real probe: whatever this machine's KVM is, the probe must answer quickly.
    #[test]
    fn probe_answers_quickly() {
        let started = Instant::now();
        let result = probe_stock_guest_support();
        eprintln!("probe: {result}");
        assert!(started.elapsed() < RUN_DEADLINE + KICK_GRACE + Duration::from_secs(1));
        if let ProbeResult::Incapable(reason) | ProbeResult::NoKvm(reason) = &result {
            assert!(!reason.is_empty());
        }
    }
}
