//! Kernel artifacts: the uncompressed `vmlinux` inside a bzImage, and kernel modules (index,
//! `.modinfo` dependencies, dependency closure, `modules.dep`).

use std::collections::{BTreeMap, BTreeSet};

use crate::{Error, run_filter};

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

fn le16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn le32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn le64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Locates the compressed kernel payload of a bzImage (boot protocol ≥ 2.08 header fields
/// `payload_offset`/`payload_length`), falling back to the first zstd frame magic.
/// Returns the zstd data without the 4-byte uncompressed-size trailer, and that size.
fn zstd_payload(bz: &[u8]) -> Result<(&[u8], Option<u32>), Error> {
    let bad = |m: &str| Error::BzImage(m.to_string());
    if bz.get(0x202..0x206) == Some(b"HdrS") && le16(bz, 0x206).is_some_and(|v| v >= 0x208) {
        let setup_sects = match bz[0x1f1] {
            0 => 4,
            n => usize::from(n),
        };
        let start = (setup_sects + 1) * 512
            + le32(bz, 0x248).ok_or_else(|| bad("truncated header"))? as usize;
        let len = le32(bz, 0x24c).ok_or_else(|| bad("truncated header"))? as usize;
        if let Some(payload) = bz.get(start..start + len)
            && len > 8
            && payload[..4] == ZSTD_MAGIC
        {
            let size = le32(payload, len - 4);
            return Ok((&payload[..len - 4], size));
        }
    }
    let pos = bz
        .windows(4)
        .position(|w| w == ZSTD_MAGIC)
        .ok_or_else(|| bad("no zstd-compressed payload found (only zstd kernels are supported)"))?;
    Ok((&bz[pos..], None))
}

/// Extracts the uncompressed ELF `vmlinux` from a zstd-compressed bzImage (uses `zstd(1)`).
pub(crate) fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>, Error> {
    let (payload, size) = zstd_payload(bz)?;
    let mut cmd = std::process::Command::new("zstd");
    cmd.args(["-q", "-d", "-c"]);
    // Without the size trailer the payload may carry trailing bytes zstd complains about.
    let out = run_filter(&mut cmd, payload, size.is_none())?;
    if !out.starts_with(b"\x7fELF") {
        return Err(Error::BzImage(
            "the decompressed payload is not an ELF file".into(),
        ));
    }
    if let Some(size) = size
        && out.len() != size as usize
    {
        return Err(Error::BzImage(format!(
            "decompressed payload is {} bytes, the bzImage says {size}",
            out.len()
        )));
    }
    if !has_pvh_note(&out) {
        log::warn!("vmlinux has no PVH entry ELF note (XEN_ELFNOTE_PHYS32_ENTRY)");
    }
    Ok(out)
}

/// Whether an ELF64 image has a `Xen` note of type 18 (`XEN_ELFNOTE_PHYS32_ENTRY`, PVH entry).
pub(crate) fn has_pvh_note(elf: &[u8]) -> bool {
    let Some(phoff) = le64(elf, 0x20) else {
        return false;
    };
    let (Some(phentsize), Some(phnum)) = (le16(elf, 0x36), le16(elf, 0x38)) else {
        return false;
    };
    for i in 0..usize::from(phnum) {
        let ph = phoff as usize + i * usize::from(phentsize);
        if le32(elf, ph) != Some(4) {
            continue; // not PT_NOTE
        }
        let (Some(off), Some(size)) = (le64(elf, ph + 8), le64(elf, ph + 32)) else {
            continue;
        };
        let (mut p, end) = (off as usize, (off + size) as usize);
        while p + 12 <= end {
            let (Some(namesz), Some(descsz), Some(ty)) =
                (le32(elf, p), le32(elf, p + 4), le32(elf, p + 8))
            else {
                break;
            };
            let name = elf.get(p + 12..p + 12 + namesz as usize);
            if ty == 18 && name == Some(b"Xen\0") {
                return true;
            }
            p += 12 + (namesz as usize).div_ceil(4) * 4 + (descsz as usize).div_ceil(4) * 4;
        }
    }
    false
}

/// The contents of an ELF64 section, by name.
pub(crate) fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return None; // only little-endian ELF64
    }
    let shoff = le64(elf, 0x28)? as usize;
    let shentsize = usize::from(le16(elf, 0x3a)?);
    let shnum = usize::from(le16(elf, 0x3c)?);
    let shstrndx = usize::from(le16(elf, 0x3e)?);
    let section = |i: usize| -> Option<(u32, &'a [u8])> {
        let sh = shoff + i * shentsize;
        let name = le32(elf, sh)?;
        let off = le64(elf, sh + 24)? as usize;
        let size = le64(elf, sh + 32)? as usize;
        Some((name, elf.get(off..off.checked_add(size)?)?))
    };
    let (_, strtab) = section(shstrndx)?;
    (0..shnum).find_map(|i| {
        let (name_off, data) = section(i)?;
        let name = strtab.get(name_off as usize..)?;
        let name = &name[..name.iter().position(|&b| b == 0)?];
        (name == wanted.as_bytes()).then_some(data)
    })
}

/// The `depends=` list of a module's `.modinfo` section (normalised names).
pub(crate) fn modinfo_depends(ko: &[u8]) -> Result<Vec<String>, String> {
    let modinfo = elf_section(ko, ".modinfo").ok_or("no .modinfo section")?;
    let mut deps = Vec::new();
    for field in modinfo.split(|&b| b == 0) {
        if let Some(v) = field.strip_prefix(b"depends=") {
            let v = std::str::from_utf8(v).map_err(|_| "depends= is not UTF-8")?;
            deps.extend(v.split(',').filter(|s| !s.is_empty()).map(normalize_module));
        }
    }
    Ok(deps)
}

/// Module names treat `-` and `_` alike; the canonical form uses `_`.
pub fn normalize_module(name: &str) -> String {
    name.replace('-', "_")
}

/// Module file suffixes and the tool that decompresses each.
const MODULE_SUFFIXES: [(&str, Option<&str>); 4] = [
    (".ko", None),
    (".ko.xz", Some("xz")),
    (".ko.zst", Some("zstd")),
    (".ko.gz", Some("gzip")),
];

/// Whether a path is a kernel module file (compressed or not).
pub(crate) fn is_module_file(path: &str) -> bool {
    MODULE_SUFFIXES.iter().any(|(s, _)| path.ends_with(s))
}

/// A module file found in the kernel packages.
#[derive(Debug, Clone)]
pub(crate) struct ModuleFile {
    /// Path relative to `lib/modules/<release>/`, without compression suffix (`kernel/…/x.ko`).
    pub rel: String,
    /// The file as packaged.
    pub data: Vec<u8>,
    /// Decompression tool, if compressed.
    pub tool: Option<&'static str>,
}

/// All modules of one kernel release, merged over several packages.
#[derive(Debug, Default)]
pub(crate) struct ModuleIndex {
    pub by_name: BTreeMap<String, ModuleFile>,
    pub builtin: BTreeSet<String>,
    /// Raw `modules.builtin` contents (kept in the initramfs).
    pub builtin_file: Option<Vec<u8>>,
}

impl ModuleIndex {
    /// Adds a file of `lib/modules/<release>/` (`rel` is relative to it); files other than
    /// modules and `modules.builtin` are ignored.
    pub fn add_file(&mut self, rel: &str, data: Vec<u8>) -> Result<(), Error> {
        if rel == "modules.builtin" {
            for line in String::from_utf8_lossy(&data).lines() {
                if let Some(name) = line.rsplit('/').next().and_then(|f| f.strip_suffix(".ko")) {
                    self.builtin.insert(normalize_module(name));
                }
            }
            self.builtin_file = Some(data);
            return Ok(());
        }
        let Some((stem, tool)) = MODULE_SUFFIXES
            .iter()
            .find_map(|(s, tool)| rel.strip_suffix(s).map(|stem| (stem.to_string(), *tool)))
        else {
            return Ok(());
        };
        let name = normalize_module(stem.rsplit('/').next().unwrap_or(&stem));
        let file = ModuleFile {
            rel: format!("{stem}.ko"),
            data,
            tool,
        };
        if let Some(prev) = self.by_name.get(&name)
            && prev.rel != file.rel
        {
            return Err(Error::Module(format!(
                "module {name} exists twice: {} and {}",
                prev.rel, file.rel
            )));
        }
        self.by_name.insert(name, file);
        Ok(())
    }
}

/// The module as an uncompressed ELF object.
pub(crate) fn decompress_module(m: &ModuleFile) -> Result<Vec<u8>, Error> {
    match m.tool {
        None => Ok(m.data.clone()),
        Some(tool) => {
            let mut cmd = std::process::Command::new(tool);
            cmd.args(["-d", "-c"]);
            run_filter(&mut cmd, &m.data, false)
        }
    }
}

/// A module selected for an initramfs, decompressed.
#[derive(Debug, Clone)]
pub(crate) struct SelectedModule {
    pub rel: String,
    pub data: Vec<u8>,
    pub depends: Vec<String>,
}

/// The dependency closure of the requested modules.
#[derive(Debug, Default)]
pub(crate) struct ModuleSet {
    /// Selected modules by canonical name.
    pub modules: BTreeMap<String, SelectedModule>,
    /// Requested modules that are built into the kernel (nothing to load).
    pub builtin: Vec<String>,
    /// Requested modules to load, in request order (canonical names, builtins removed).
    pub load: Vec<String>,
}

/// Resolves `requested` and their dependencies, reading modules through `read`.
pub(crate) fn resolve_modules(
    index: &ModuleIndex,
    requested: &[String],
    release: &str,
    read: &dyn Fn(&ModuleFile) -> Result<Vec<u8>, Error>,
) -> Result<ModuleSet, Error> {
    let mut set = ModuleSet::default();
    let mut queue: Vec<String> = Vec::new();
    for m in requested {
        let name = normalize_module(m);
        if index.builtin.contains(&name) {
            log::debug!("module {name} is built into {release}");
            if !set.builtin.contains(&name) {
                set.builtin.push(name);
            }
        } else if !set.load.contains(&name) {
            set.load.push(name.clone());
            queue.push(name);
        }
    }
    while let Some(name) = queue.pop() {
        if set.modules.contains_key(&name) || index.builtin.contains(&name) {
            continue;
        }
        let file = index
            .by_name
            .get(&name)
            .ok_or_else(|| Error::ModuleNotFound {
                module: name.clone(),
                release: release.to_string(),
            })?;
        let data = read(file)?;
        let depends =
            modinfo_depends(&data).map_err(|e| Error::Module(format!("{}: {e}", file.rel)))?;
        queue.extend(depends.iter().cloned());
        set.modules.insert(
            name,
            SelectedModule {
                rel: file.rel.clone(),
                data,
                depends,
            },
        );
    }
    Ok(set)
}

impl ModuleSet {
    /// `modules.dep` for the selected modules: one line per module, sorted by path, listing its
    /// full transitive dependency set ordered so that every module comes before the modules it
    /// depends on (modprobe loads the list from the end), as depmod writes it.
    pub fn modules_dep(&self) -> String {
        let mut lines: Vec<(String, String)> = Vec::new();
        for (name, m) in &self.modules {
            let mut order = Vec::new();
            let mut seen = BTreeSet::new();
            seen.insert(name.clone());
            let mut deps: Vec<&String> = m.depends.iter().collect();
            deps.sort();
            for d in deps {
                self.post_order(d, &mut seen, &mut order);
            }
            let mut line = format!("{}:", m.rel);
            for dep in order.iter().rev() {
                line.push(' ');
                line.push_str(&self.modules[dep].rel);
            }
            lines.push((m.rel.clone(), line));
        }
        lines.sort();
        let mut out = String::new();
        for (_, l) in lines {
            out.push_str(&l);
            out.push('\n');
        }
        out
    }

    fn post_order(&self, name: &String, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(name.clone()) {
            return;
        }
        let Some(m) = self.modules.get(name) else {
            return; // built in
        };
        let mut deps: Vec<&String> = m.depends.iter().collect();
        deps.sort();
        for d in deps {
            self.post_order(d, seen, order);
        }
        order.push(name.clone());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal little-endian ELF64 relocatable file with a `.modinfo` section.
    pub(crate) fn fake_ko(name: &str, depends: &[&str]) -> Vec<u8> {
        let modinfo = format!(
            "license=GPL\0depends={}\0name={name}\0vermagic=test\0",
            depends.join(",")
        );
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // ELFCLASS64
        elf[5] = 1; // little endian
        elf[6] = 1; // version
        elf[16..18].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo.as_bytes());
        let strtab_off = elf.len();
        elf.extend_from_slice(shstrtab);
        while !elf.len().is_multiple_of(8) {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut sh = |name: u32, ty: u32, off: usize, size: usize| {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&ty.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0, 0);
        sh(1, 1, modinfo_off, modinfo.len());
        sh(10, 3, strtab_off, shstrtab.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes()); // shentsize
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes()); // shnum
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes()); // shstrndx
        elf
    }

    #[test]
    fn parses_modinfo_depends() {
        let ko = fake_ko("kvm_amd", &["kvm", "ccp"]);
        assert_eq!(modinfo_depends(&ko).unwrap(), ["kvm", "ccp"]);
        assert_eq!(
            modinfo_depends(&fake_ko("irqbypass", &[])).unwrap(),
            Vec::<String>::new()
        );
        assert!(modinfo_depends(b"not an elf").is_err());
    }

    fn index(mods: &[(&str, &str, &[&str])], builtin: &[&str]) -> ModuleIndex {
        let mut idx = ModuleIndex::default();
        for (name, rel, deps) in mods {
            idx.add_file(rel, fake_ko(name, deps)).unwrap();
        }
        let builtin: String = builtin
            .iter()
            .map(|b| format!("kernel/fs/{b}.ko\n"))
            .collect();
        idx.add_file("modules.builtin", builtin.into_bytes())
            .unwrap();
        idx.add_file("modules.order", b"ignored".to_vec()).unwrap();
        idx
    }

    #[test]
    fn closure_and_modules_dep() {
        let idx = index(
            &[
                ("kvm-amd", "kernel/arch/x86/kvm/kvm-amd.ko", &["kvm", "ccp"]),
                ("kvm", "kernel/arch/x86/kvm/kvm.ko", &["irqbypass"]),
                ("irqbypass", "kernel/virt/lib/irqbypass.ko", &[]),
                ("ccp", "kernel/drivers/crypto/ccp/ccp.ko", &[]),
                ("9p", "kernel/fs/9p/9p.ko", &["9pnet", "netfs"]),
                ("9pnet", "kernel/net/9p/9pnet.ko", &[]),
                ("netfs", "kernel/fs/netfs/netfs.ko", &[]),
                ("unused", "kernel/unused.ko", &[]),
            ],
            &["fuse"],
        );
        assert_eq!(idx.by_name.len(), 8);
        assert_eq!(
            idx.builtin_file.as_deref(),
            Some(&b"kernel/fs/fuse.ko\n"[..])
        );
        let read = |m: &ModuleFile| decompress_module(m);
        let req: Vec<String> = ["kvm-amd", "fuse", "9p", "kvm_amd"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let set = resolve_modules(&idx, &req, "9.9", &read).unwrap();
        assert_eq!(set.load, ["kvm_amd", "9p"]);
        assert_eq!(set.builtin, ["fuse"]);
        let names: Vec<&String> = set.modules.keys().collect();
        assert_eq!(
            names,
            ["9p", "9pnet", "ccp", "irqbypass", "kvm", "kvm_amd", "netfs"]
        );
        assert_eq!(
            set.modules_dep(),
            "kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko kernel/drivers/crypto/ccp/ccp.ko\n\
             kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko\n\
             kernel/drivers/crypto/ccp/ccp.ko:\n\
             kernel/fs/9p/9p.ko: kernel/fs/netfs/netfs.ko kernel/net/9p/9pnet.ko\n\
             kernel/fs/netfs/netfs.ko:\n\
             kernel/net/9p/9pnet.ko:\n\
             kernel/virt/lib/irqbypass.ko:\n"
        );
        let missing = resolve_modules(&idx, &["nope".to_string()], "9.9", &read).unwrap_err();
        assert_eq!(
            missing.to_string(),
            "kernel module `nope` not found in the 9.9 modules"
        );
    }

    #[test]
    fn pvh_note_detection() {
        // ELF64 header + one PT_NOTE program header + a Xen note of type 18.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let note_off = elf.len();
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&8u32.to_le_bytes());
        note.extend_from_slice(&18u32.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x100_0000u64.to_le_bytes());
        elf.extend_from_slice(&note);
        elf[64..68].copy_from_slice(&4u32.to_le_bytes());
        elf[64 + 8..64 + 16].copy_from_slice(&(note_off as u64).to_le_bytes());
        elf[64 + 32..64 + 40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        assert!(has_pvh_note(&elf));
        elf[note_off + 8] = 17;
        assert!(!has_pvh_note(&elf));
    }
}
