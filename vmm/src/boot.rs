//! Direct kernel boot: loads a bzImage or an uncompressed ELF vmlinux (PVH entry), the initrd and
//! the command line, and writes the boot information (Documentation/arch/x86/boot.rst zero page,
//! or the PVH `hvm_start_info`) with the E820 map and the RSDP address.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams, linux::LinuxBootConfigurator};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::cpu::EntryMode;
use crate::layout::*;
use crate::memory::{E820Entry, E820Type};

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot open kernel '{path}': {source}")]
    OpenKernel {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read initrd '{path}': {source}")]
    ReadInitrd {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel '{path}' is neither a bzImage nor an x86_64 ELF vmlinux")]
    UnknownKernelFormat { path: String },
    #[error("loading kernel '{path}' failed: {source}")]
    Load {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("ELF kernel '{path}' has no PVH entry point (needs CONFIG_PVH=y)")]
    NoPvhEntry { path: String },
    #[error("kernel command line is {0} bytes; the x86 limit is {max}", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("initrd of {0} bytes does not fit in guest low memory next to the kernel")]
    InitrdTooLarge(u64),
    #[error("writing boot information into guest memory failed: {0}")]
    GuestMemory(String),
}

/// Kernel image formats we boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

/// Detects the kernel format from its magic numbers.
pub fn detect_format(header: &[u8]) -> Option<KernelFormat> {
    if header.len() >= 4 && &header[..4] == b"\x7fELF" {
        return Some(KernelFormat::Elf);
    }
    if header.len() >= 0x206 && &header[0x202..0x206] == b"HdrS" {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// What the VMM needs to boot: kernel, optional initrd with an extra archive appended, cmdline.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    /// Appended after the initrd (e.g. a cpio carrying the command to run); the kernel unpacks
    /// concatenated archives in order.
    pub initrd_extra: Vec<u8>,
    pub cmdline: String,
    pub rsdp_addr: u64,
    pub e820: Vec<E820Entry>,
    /// End of RAM below 4 GiB (initrd is placed under it).
    pub low_ram_end: u64,
}

/// Result of loading: how to start the boot CPU.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub mode: EntryMode,
    /// RSI (boot_params) for the 64-bit entry, or EBX (start_info) for PVH.
    pub boot_info: u64,
    pub format: KernelFormat,
}

/// Loads everything into guest memory and returns the entry point.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<BootEntry, BootError> {
    let kernel_path = spec.kernel.display().to_string();
    let mut kernel = File::open(spec.kernel).map_err(|source| BootError::OpenKernel {
        path: kernel_path.clone(),
        source,
    })?;
    let mut header = vec![0u8; 0x400];
    let n = read_up_to(&mut kernel, &mut header).map_err(|source| BootError::OpenKernel {
        path: kernel_path.clone(),
        source,
    })?;
    header.truncate(n);
    let format = detect_format(&header).ok_or_else(|| BootError::UnknownKernelFormat {
        path: kernel_path.clone(),
    })?;
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(|source| BootError::OpenKernel {
            path: kernel_path.clone(),
            source,
        })?;

    if spec.cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(spec.cmdline.len()));
    }
    let mut cmdline_bytes = spec.cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);
    mem.write_slice(&cmdline_bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| BootError::GuestMemory(e.to_string()))?;

    let load_err = |source| BootError::Load {
        path: kernel_path.clone(),
        source,
    };
    let loaded = match format {
        KernelFormat::BzImage => {
            BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?
        }
        KernelFormat::Elf => {
            Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(load_err)?
        }
    };
    let kernel_end = loaded.kernel_load.0 + loaded.kernel_end;

    let initrd = load_initrd(
        mem,
        spec,
        kernel_end,
        loaded.setup_header.map(|h| h.initrd_addr_max),
    )?;

    match format {
        KernelFormat::BzImage => {
            let Some(hdr) = loaded.setup_header else {
                return Err(BootError::UnknownKernelFormat { path: kernel_path });
            };
            let mut params = boot_params {
                hdr,
                ..Default::default()
            };
            params.hdr.type_of_loader = 0xff;
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = 0x5372_6448;
            params.hdr.cmd_line_ptr = CMDLINE_START as u32;
            params.hdr.cmdline_size = cmdline_bytes.len() as u32;
            params.hdr.loadflags |= 0x80; // CAN_USE_HEAP
            params.hdr.heap_end_ptr = 0xfe00;
            if let Some((addr, size)) = initrd {
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            params.acpi_rsdp_addr = spec.rsdp_addr;
            if spec.e820.len() > params.e820_table.len() {
                return Err(BootError::GuestMemory("too many E820 entries".into()));
            }
            for (slot, e) in params.e820_table.iter_mut().zip(&spec.e820) {
                *slot = boot_e820_entry {
                    addr: e.addr,
                    size: e.size,
                    r#type: e.kind as u32,
                };
            }
            params.e820_entries = spec.e820.len() as u8;
            let bp = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams(&bp, mem)
                .map_err(|e| BootError::GuestMemory(e.to_string()))?;
            Ok(BootEntry {
                // The 64-bit entry point is 0x200 past the protected-mode kernel's start.
                mode: EntryMode::Linux64 {
                    entry: loaded.kernel_load.0 + 0x200,
                },
                boot_info: ZERO_PAGE_START,
                format,
            })
        }
        KernelFormat::Elf => {
            let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
                return Err(BootError::NoPvhEntry { path: kernel_path });
            };
            let mut start_info = hvm_start_info {
                magic: linux_loader::loader::elf::start_info::XEN_HVM_START_MAGIC_VALUE,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                rsdp_paddr: spec.rsdp_addr,
                memmap_entries: spec.e820.len() as u32,
                ..Default::default()
            };
            let memmap_addr = PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64;
            start_info.memmap_paddr = memmap_addr;
            let memmap: Vec<hvm_memmap_table_entry> = spec
                .e820
                .iter()
                .map(|e| hvm_memmap_table_entry {
                    addr: e.addr,
                    size: e.size,
                    type_: match e.kind {
                        E820Type::Ram => 1,
                        E820Type::Reserved => 2,
                    },
                    reserved: 0,
                })
                .collect();
            let modlist_addr =
                memmap_addr + (memmap.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
            let mut bp = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
            bp.set_sections(&memmap, GuestAddress(memmap_addr));
            if let Some((addr, size)) = initrd {
                start_info.nr_modules = 1;
                start_info.modlist_paddr = modlist_addr;
                bp = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
                bp.set_sections(&memmap, GuestAddress(memmap_addr));
                let module = hvm_modlist_entry {
                    paddr: addr,
                    size,
                    ..Default::default()
                };
                bp.set_modules(&[module], GuestAddress(modlist_addr));
            }
            PvhBootConfigurator::write_bootparams(&bp, mem)
                .map_err(|e| BootError::GuestMemory(e.to_string()))?;
            Ok(BootEntry {
                mode: EntryMode::Pvh { entry: entry.0 },
                boot_info: PVH_INFO_START,
                format,
            })
        }
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        let n = file.read(&mut buf[total..])?;
        if n == 0 {
            break;
        }
        total += n;
    }
    Ok(total)
}

/// Places the initrd (plus the extra archive, 4-byte aligned as the initramfs unpacker requires)
/// as high as allowed in low memory. Returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    kernel_end: u64,
    initrd_addr_max: Option<u32>,
) -> Result<Option<(u64, u64)>, BootError> {
    let mut data = match spec.initrd {
        Some(path) => std::fs::read(path).map_err(|source| BootError::ReadInitrd {
            path: path.display().to_string(),
            source,
        })?,
        None => Vec::new(),
    };
    if !spec.initrd_extra.is_empty() {
        while data.len() % 4 != 0 {
            data.push(0);
        }
        data.extend_from_slice(&spec.initrd_extra);
    }
    if data.is_empty() {
        return Ok(None);
    }
    let size = data.len() as u64;
    let max = match initrd_addr_max {
        Some(m) if m != 0 => u64::from(m) + 1,
        _ => 0x8000_0000,
    };
    let top = spec.low_ram_end.min(max);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.max(HIMEM_START))
        .ok_or(BootError::InitrdTooLarge(size))?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| BootError::GuestMemory(e.to_string()))?;
    Ok(Some((addr, size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"garbage"), None);
        assert_eq!(detect_format(&[]), None);
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("vmm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, [1u8, 2, 3]).unwrap();
        let spec = BootSpec {
            kernel: Path::new("/nonexistent"),
            initrd: Some(&initrd),
            initrd_extra: vec![9, 9],
            cmdline: String::new(),
            rsdp_addr: 0,
            e820: vec![],
            low_ram_end: 64 << 20,
        };
        let (addr, size) = load_initrd(&mem, &spec, 2 << 20, None).unwrap().unwrap();
        assert_eq!(size, 6); // 3 bytes, padded to 4, then the 2-byte extra archive
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20);
        let mut back = [0u8; 6];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, [1, 2, 3, 0, 9, 9]);
        // An initrd that cannot fit above the kernel is an error, not an overlap.
        let err = load_initrd(&mem, &spec, 64 << 20, None).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge(6)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
