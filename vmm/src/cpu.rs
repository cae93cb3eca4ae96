//! vCPU architectural setup: CPUID, MSRs, boot register state, local APIC, boot page tables.

use kvm_bindings::{
    CpuId, Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

#[derive(Debug, Error)]
pub enum CpuError {
    #[error("vCPU ioctl {0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    #[error("writing boot page tables or GDT into guest memory failed")]
    GuestMemory,
    #[error("KVM accepted only {0} of {1} boot MSRs")]
    Msrs(usize, usize),
}

/// How the boot CPU enters the kernel.
#[derive(Debug, Clone, Copy)]
pub enum EntryMode {
    /// bzImage 64-bit entry (`startup_64`, Documentation/arch/x86/boot.rst "64-bit boot protocol"):
    /// long mode, identity-mapped, RSI = boot_params.
    Linux64 { entry: u64 },
    /// PVH entry (32-bit protected mode, paging off, EBX = hvm_start_info), xen PVH ABI.
    Pvh { entry: u64 },
}

const CPUID_HYPERVISOR_BIT: u32 = 1 << 31;

/// Adjusts the KVM-supported CPUID for vCPU `index` of `count` (Intel SDM vol. 2A "CPUID").
/// With `hide_hypervisor`, CPUID.1:ECX[31] is clear and the hypervisor leaves (0x4000_0000+)
/// are gone: the guest believes it runs on bare metal (no kvmclock or other PV features). Linux's
/// `cpu_cache_has_invalidate_memregion()` needs that to commit CXL regions itself.
pub fn configure_cpuid(base: &CpuId, index: u32, count: u32, hide_hypervisor: bool) -> CpuId {
    let mut cpuid = base.clone();
    if hide_hypervisor {
        let kept: Vec<_> = cpuid
            .as_slice()
            .iter()
            .filter(|e| !(0x4000_0000..0x5000_0000).contains(&e.function))
            .copied()
            .collect();
        if let Ok(filtered) = CpuId::from_entries(&kept) {
            cpuid = filtered;
        }
    }
    let threads_shift = 32 - (count.max(1) - 1).leading_zeros();
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            0x1 => {
                // Initial APIC ID [31:24], logical processor count [23:16], CLFLUSH size 8 qwords.
                entry.ebx = (index << 24) | ((count & 0xff) << 16) | (8 << 8);
                if hide_hypervisor {
                    entry.ecx &= !CPUID_HYPERVISOR_BIT;
                } else {
                    entry.ecx |= CPUID_HYPERVISOR_BIT;
                }
                if count > 1 {
                    entry.edx |= 1 << 28; // HTT: the count field above is valid.
                }
            }
            0x4 => {
                // Cores per package - 1 in EAX[31:26]; threads sharing this cache in [25:14].
                entry.eax &= 0x3fff;
                entry.eax |= ((count - 1).min(63)) << 26;
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread per core), level 1 = core.
                entry.edx = index;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = threads_shift;
                        entry.ebx = count;
                        entry.ecx = (2 << 8) | 1;
                    }
                    i => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = i;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: NC = cores - 1, ApicIdCoreIdSize.
                entry.ecx = (threads_shift << 12) | (count - 1);
            }
            _ => {}
        }
    }
    cpuid
}

/// Boot MSRs: fast strings, and MTRRs enabled with write-back default so that Linux doesn't treat
/// all of RAM as uncached (MSR_MTRRdefType, SDM vol. 3A 12.11.2.1).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_MISC_ENABLE, 1),
        entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

/// GDT entry from flags, base and limit (SDM vol. 3A 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit,
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Writes identity-mapped page tables for the first 4 GiB (2 MiB pages) used by the 64-bit entry.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let w = |addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|_| CpuError::GuestMemory)
    };
    w(PML4_START, PDPT_START | 0x3)?;
    for pdpt_index in 0..4u64 {
        let pd = PD_START + pdpt_index * 0x1000;
        w(PDPT_START + pdpt_index * 8, pd | 0x3)?;
        for i in 0..512u64 {
            let phys = (pdpt_index << 30) | (i << 21);
            w(pd + i * 8, phys | 0x83)?; // present, writable, 2 MiB page
        }
    }
    Ok(())
}

/// Sets registers, segments, FPU, MSRs and LAPIC LINT pins for the boot CPU (`boot` = true) or an
/// application processor (which waits for INIT/SIPI in the in-kernel LAPIC).
pub fn setup_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    cpuid: &CpuId,
    boot: Option<(EntryMode, u64)>,
) -> Result<(), CpuError> {
    vcpu.set_cpuid2(cpuid)
        .map_err(|e| CpuError::Ioctl("KVM_SET_CPUID2", e))?;
    let msr_entries = boot_msrs();
    let msrs =
        Msrs::from_entries(&msr_entries).map_err(|_| CpuError::Msrs(0, msr_entries.len()))?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(|e| CpuError::Ioctl("KVM_SET_MSRS", e))?;
    if written != msr_entries.len() {
        return Err(CpuError::Msrs(written, msr_entries.len()));
    }
    setup_lint(vcpu)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| CpuError::Ioctl("KVM_SET_FPU", e))?;

    let Some((mode, boot_info)) = boot else {
        return Ok(());
    };
    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| CpuError::Ioctl("KVM_GET_SREGS", e))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 { entry } => {
            let gdt = [
                gdt_entry(0, 0, 0),
                gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
                gdt_entry(0xc093, 0, 0xfffff), // data
                gdt_entry(0x808b, 0, 0xfffff), // TSS
            ];
            write_gdt(mem, &gdt)?;
            load_segments(&mut sregs, &gdt);
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = boot_info;
        }
        EntryMode::Pvh { entry } => {
            let gdt = [
                gdt_entry(0, 0, 0),
                gdt_entry(0xc09b, 0, 0xffff_ffff), // 32-bit code
                gdt_entry(0xc093, 0, 0xffff_ffff), // data
                gdt_entry(0x008b, 0, 0x67),        // TSS
            ];
            write_gdt(mem, &gdt)?;
            load_segments(&mut sregs, &gdt);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = boot_info;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| CpuError::Ioctl("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| CpuError::Ioctl("KVM_SET_REGS", e))?;
    Ok(())
}

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), CpuError> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| CpuError::GuestMemory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| CpuError::GuestMemory)
}

fn load_segments(sregs: &mut kvm_sregs, gdt: &[u64; 4]) {
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

/// LINT0 = ExtINT (the 8259 PIC), LINT1 = NMI, as a BIOS leaves them (MP spec "virtual wire").
fn setup_lint(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic: kvm_lapic_state = vcpu
        .get_lapic()
        .map_err(|e| CpuError::Ioctl("KVM_GET_LAPIC", e))?;
    let set_mode = |lapic: &mut kvm_lapic_state, reg: usize, mode: u32| {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = lapic.regs[reg + i] as u8;
        }
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    };
    set_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| CpuError::Ioctl("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_into_segments() {
        let code = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(code, 0x00af_9b00_0000_ffff);
        let seg = segment_from_gdt(code, 1);
        assert_eq!(seg.selector, 8);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.limit, 0xffff_ffff);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(data.db, 1);
        assert_eq!(data.type_, 3);
    }

    #[test]
    fn boot_page_tables_identity_map_4g() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_START);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPT_START + 24)).unwrap();
        let last: u64 = mem
            .read_obj(GuestAddress((pdpt3 & !0xfff) + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, (3 << 30) | (511 << 21));
        assert_eq!(last & 0x83, 0x83);
    }
}
