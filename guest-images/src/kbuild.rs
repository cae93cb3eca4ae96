//! Out-of-tree builds for a guest image: kernel modules and kernel selftests compiled from
//! Debian's `linux-source-<version>` with the compiler that built the image's kernel, and our
//! own C programs (`programs/<name>.c`, `build-program =`) compiled static with that compiler.
//!
//! The build root is the set of `images.lock` pins naming it in their images column (e.g.
//! `kbuild-7.2`: sid's gcc, binutils, pahole, libc6(-dev), the kernel's headers and kbuild, and
//! `linux-source-7.2`). Its packages are unpacked into a scratch directory, never installed:
//! every dynamically linked program under `usr/bin`, `usr/libexec` and `usr/lib/linux-kbuild-*`
//! is renamed to `<name>.real` and replaced by a shell wrapper that runs it with the build root's
//! own dynamic loader and libraries (`ld-linux-x86-64.so.2 --library-path … --argv0 "$0"`), so
//! sid's binaries run on an older host glibc without patching them. Only the needed members of
//! the source tarball are extracted, in one streaming pass. `kbuild/build.sh` then compiles; its
//! results are reproducible whatever the scratch directory is called (see that script).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::deb::{self, Entry, Node};
use crate::lock::{ImageSpec, Pin};
use crate::{Error, run_capture, run_with};

/// The build script (`guest-images/kbuild/build.sh`).
pub(crate) const BUILD_SCRIPT: &str = include_str!("../kbuild/build.sh");

/// Support files the build script compiles into the selftests.
pub(crate) const SUPPORT_FILES: &[(&str, &str)] = &[
    (
        "selftest-compat.h",
        include_str!("../kbuild/selftest-compat.h"),
    ),
    (
        "selftest-compat.c",
        include_str!("../kbuild/selftest-compat.c"),
    ),
];

/// Directories of the build root whose dynamically linked programs get a loader wrapper.
const WRAPPED_DIRS: &[&str] = &["usr/bin/", "usr/libexec/", "usr/lib/linux-kbuild-"];

/// Parts of the build-root packages that are not unpacked.
const UNUSED_PREFIXES: &[&str] = &[
    "usr/share/doc/",
    "usr/share/man/",
    "usr/share/info/",
    "usr/share/locale/",
    "usr/share/lintian/",
    "usr/share/bug/",
];

/// Source members a selftest suite needs besides `tools/testing/selftests/<suite>/`: the
/// headers its Makefile puts on the include path and the targets of its symlinks.
fn suite_members(suite: &str) -> &'static [&'static str] {
    match suite {
        "vfio" => &[
            // lib/drivers/ioat/{hw,registers}.h and lib/drivers/dsa/registers.h link here.
            "drivers/dma/ioat/",
            "drivers/dma/idxd/registers.h",
            // tools/include/linux/pci_ids.h links here.
            "include/linux/pci_ids.h",
        ],
        _ => &[],
    }
}

/// The paths (relative to the source tree; a trailing `/` means the whole directory) to extract
/// for an image's modules and selftests.
pub(crate) fn source_members(spec: &ImageSpec) -> Vec<String> {
    let mut out: Vec<String> = spec.build_modules.clone();
    let mut suites: Vec<&str> = spec
        .build_selftests
        .iter()
        .filter_map(|t| t.split('/').next())
        .collect();
    suites.sort();
    suites.dedup();
    if !suites.is_empty() {
        for common in [
            "tools/include/",
            "tools/arch/x86/include/",
            "tools/testing/selftests/kselftest.h",
            "tools/testing/selftests/kselftest_harness.h",
        ] {
            out.push(common.to_string());
        }
    }
    for s in suites {
        out.push(format!("tools/testing/selftests/{s}/"));
        out.extend(suite_members(s).iter().map(|m| m.to_string()));
    }
    out.sort();
    out.dedup();
    out
}

/// Whether `path` (relative to the source tree) is one of `members` or inside one of them.
fn is_member(members: &[String], path: &str) -> bool {
    members.iter().any(|m| match m.strip_suffix('/') {
        Some(dir) => path == dir || path.starts_with(m.as_str()),
        None => path == m,
    })
}

/// Strips the tarball's top directory (`linux-source-7.2/drivers/…` → `drivers/…`).
fn source_rel(path: &str) -> Option<&str> {
    path.split_once('/').map(|(_, rest)| rest)
}

fn le16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn le32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn le64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Whether a file is a little-endian ELF64 executable with a program interpreter (`PT_INTERP`),
/// i.e. a dynamically linked program (not a shared library, object or static program).
pub(crate) fn is_dynamic_program(elf: &[u8]) -> bool {
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (le64(elf, 0x20), le16(elf, 0x36), le16(elf, 0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let ph = phoff as usize + i * usize::from(phentsize);
        le32(elf, ph) == Some(3)
    })
}

/// The wrapper that runs `<root>/<rel>.real` with the build root's loader and libraries.
pub(crate) fn loader_wrapper(root: &Path, rel: &str) -> String {
    let r = root.display();
    format!(
        "#!/bin/sh\n# Runs {rel} with the build root's own loader and libraries (guest-images kbuild).\n\
         exec '{r}/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2' \
         --library-path '{r}/usr/lib/x86_64-linux-gnu' --argv0 \"$0\" '{r}/{rel}.real' \"$@\"\n"
    )
}

/// Writes package entries under `dir`, replacing what earlier packages put there. With `wrap`,
/// dynamically linked programs in [`WRAPPED_DIRS`] get a [`loader_wrapper`].
fn write_entries(dir: &Path, entries: &[Entry], wrap: Option<&Path>) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what: &str, p: &Path, e| Error::io(format!("{what} {}", p.display()), e);
    for e in entries {
        let path = dir.join(&e.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|x| io("creating", parent, x))?;
        }
        match &e.node {
            Node::Dir => {
                if !path.is_dir() {
                    std::fs::create_dir_all(&path).map_err(|x| io("creating", &path, x))?;
                }
            }
            Node::Symlink(target) => {
                if path.symlink_metadata().is_ok() {
                    std::fs::remove_file(&path).map_err(|x| io("replacing", &path, x))?;
                }
                std::os::unix::fs::symlink(target, &path)
                    .map_err(|x| io("creating the symlink", &path, x))?;
            }
            Node::File { mode, data } => {
                if path.symlink_metadata().is_ok() {
                    std::fs::remove_file(&path).map_err(|x| io("replacing", &path, x))?;
                }
                let perm = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                let wrapped = wrap.filter(|_| {
                    perm == 0o755
                        && WRAPPED_DIRS.iter().any(|d| e.path.starts_with(d))
                        && is_dynamic_program(data)
                });
                let real = match wrapped {
                    Some(_) => PathBuf::from(format!("{}.real", path.display())),
                    None => path.clone(),
                };
                std::fs::write(&real, data).map_err(|x| io("writing", &real, x))?;
                std::fs::set_permissions(&real, std::fs::Permissions::from_mode(perm))
                    .map_err(|x| io("chmod", &real, x))?;
                if let Some(root) = wrapped {
                    std::fs::write(&path, loader_wrapper(root, &e.path))
                        .map_err(|x| io("writing", &path, x))?;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                        .map_err(|x| io("chmod", &path, x))?;
                }
            }
        }
    }
    Ok(())
}

/// What an out-of-tree build produced.
#[derive(Debug, Default)]
pub(crate) struct Outputs {
    /// `(module name, stripped .ko)`, in `build-module` order.
    pub modules: Vec<(String, Vec<u8>)>,
    /// `(program name, static executable)`: the selftests in `build-selftest` order, then our
    /// programs in `build-program` order.
    pub programs: Vec<(String, Vec<u8>)>,
}

/// Whether a pin is the kernel source package (`linux-source-<version>`).
pub(crate) fn is_source_package(p: &Pin) -> bool {
    p.name.starts_with("linux-source-")
}

/// Builds the modules, selftests and programs (`(name, C source)`, the image's
/// `build-program` lines) of `spec` for kernel `release` in the scratch directory `work`, from
/// the build root's `.deb` files (`(pin, path)`, lock order; the kernel source package is only
/// needed, and only unpacked, for modules and selftests).
pub(crate) fn build(
    spec: &ImageSpec,
    release: &str,
    debs: &[(Pin, PathBuf)],
    programs: &[(String, String)],
    work: &Path,
) -> Result<Outputs, Error> {
    let root_name = spec.build_root.as_deref().unwrap_or("");
    let work = std::path::absolute(work)
        .map_err(|e| Error::io(format!("resolving {}", work.display()), e))?;
    if work
        .to_string_lossy()
        .contains(['\'', '"', ' ', '\\', '$', '`'])
    {
        return Err(Error::Kernel(format!(
            "cannot build kernel modules under {}: use a cache directory without quotes, \
             spaces, `$`, backquotes or backslashes in its path",
            work.display()
        )));
    }
    let root = work.join("root");
    let src = work.join("src");
    let out = work.join("out");
    let support = work.join("support");
    let scratch = work.join("scratch");
    let program_dir = work.join("programs");
    for d in [&root, &src, &support, &scratch, &program_dir] {
        std::fs::create_dir_all(d)
            .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
    }

    let started = std::time::Instant::now();
    let mut source = None;
    for (pin, deb) in debs {
        if is_source_package(pin) {
            source = Some(deb);
            continue;
        }
        let keep = |p: &str| !UNUSED_PREFIXES.iter().any(|u| p.starts_with(u));
        let entries = deb::read_deb(deb, &keep)?;
        write_entries(&root, &entries, Some(&root))?;
    }
    log::info!(
        "{}: unpacked build root {root_name} in {:.1}s",
        spec.name,
        started.elapsed().as_secs_f64()
    );

    if spec.needs_source() {
        let source = source.ok_or_else(|| {
            Error::Conf(format!(
                "build root {root_name} of image {} has no linux-source-* package in images.lock",
                spec.name
            ))
        })?;
        let started = std::time::Instant::now();
        let members = source_members(spec);
        extract_source(source, &members, &src)?;
        log::info!(
            "{}: extracted {} source members in {:.1}s",
            spec.name,
            members.len(),
            started.elapsed().as_secs_f64()
        );
    }
    for (name, text) in programs {
        let p = program_dir.join(format!("{name}.c"));
        std::fs::write(&p, text).map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
    }

    for (name, text) in SUPPORT_FILES {
        std::fs::write(support.join(name), text)
            .map_err(|e| Error::io(format!("writing {name}"), e))?;
    }
    let script = work.join("build.sh");
    std::fs::write(&script, BUILD_SCRIPT).map_err(|e| Error::io("writing build.sh", e))?;
    let started = std::time::Instant::now();
    let mut cmd = Command::new("sh");
    cmd.arg(&script)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("ROOT", &root)
        .env("SRC", &src)
        .env("WORK", &scratch)
        .env("OUT", &out)
        .env("SUPPORT", &support)
        .env("KREL", release)
        .env("MODULES", spec.build_modules.join(" "))
        .env("SELFTESTS", spec.build_selftests.join(" "))
        .env("PROGRAM_DIR", &program_dir)
        .env(
            "PROGRAMS",
            programs
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        )
        .env("JOBS", "2");
    run_capture(&mut cmd, false)?;
    log::info!(
        "{}: compiled in {:.1}s",
        spec.name,
        started.elapsed().as_secs_f64()
    );

    let read = |name: &str| {
        let p = out.join(name);
        std::fs::read(&p).map_err(|e| Error::io(format!("reading {}", p.display()), e))
    };
    let mut outputs = Outputs::default();
    for m in &spec.build_modules {
        let name = module_name(m);
        outputs
            .modules
            .push((name.clone(), read(&format!("{name}.ko"))?));
    }
    for t in &spec.build_selftests {
        let name = t.rsplit('/').next().unwrap_or(t).to_string();
        outputs.programs.push((name.clone(), read(&name)?));
    }
    for (name, _) in programs {
        outputs.programs.push((name.clone(), read(name)?));
    }
    Ok(outputs)
}

/// `drivers/dma/dmatest.c` → `dmatest`; a driver directory `drivers/infiniband/hw/vmw_pvrdma/`
/// → `vmw_pvrdma` (the module its Makefile builds is named after it).
pub(crate) fn module_name(source: &str) -> String {
    let source = source.strip_suffix('/').unwrap_or(source);
    let file = source.rsplit('/').next().unwrap_or(source);
    file.strip_suffix(".c").unwrap_or(file).to_string()
}

/// Extracts `members` of the source package's `usr/src/linux-source-*.tar.xz` into `dest`
/// (top directory stripped) in one streaming pass, and checks that every extracted symlink
/// resolves inside what was extracted.
fn extract_source(deb: &Path, members: &[String], dest: &Path) -> Result<(), Error> {
    let tarballs = deb::read_deb(deb, &|p: &str| {
        p.starts_with("usr/src/linux-source-") && p.ends_with(".tar.xz")
    })?;
    let tarball = match tarballs.as_slice() {
        [
            Entry {
                node: Node::File { data, .. },
                ..
            },
        ] => data,
        _ => {
            return Err(Error::Kernel(format!(
                "{} does not contain exactly one usr/src/linux-source-*.tar.xz",
                deb.display()
            )));
        }
    };
    let keep = |p: &str| source_rel(p).is_some_and(|rel| is_member(members, rel));
    let mut cmd = Command::new("xz");
    cmd.args(["-d", "-c"]);
    let entries = run_with(&mut cmd, Some(tarball), false, &mut |out| {
        deb::read_tar(out, &keep).map_err(|e| {
            Error::io(
                format!("reading the source tarball of {}", deb.display()),
                e,
            )
        })
    })?;
    let entries: Vec<Entry> = entries
        .into_iter()
        .filter_map(|e| {
            let rel = source_rel(&e.path)?.to_string();
            Some(Entry {
                path: rel,
                node: e.node,
            })
        })
        .collect();
    for m in members {
        let dir = m.trim_end_matches('/');
        if !entries
            .iter()
            .any(|e| e.path == dir || e.path.starts_with(&format!("{dir}/")))
        {
            return Err(Error::Kernel(format!(
                "{m} is not in the kernel source of {}",
                deb.display()
            )));
        }
    }
    write_entries(dest, &entries, None)?;
    for e in &entries {
        if let Node::Symlink(target) = &e.node
            && std::fs::metadata(dest.join(&e.path)).is_err()
        {
            return Err(Error::Kernel(format!(
                "source symlink {} -> {target} points outside the extracted members: add its \
                 target to suite_members() in guest-images/src/kbuild.rs",
                e.path
            )));
        }
    }
    Ok(())
}

/// The `vermagic=` of a module's `.modinfo`.
pub(crate) fn vermagic(ko: &[u8]) -> Option<String> {
    let modinfo = crate::kernel::elf_section(ko, ".modinfo")?;
    modinfo.split(|&b| b == 0).find_map(|f| {
        f.strip_prefix(b"vermagic=")
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::parse_images_conf;

    fn spec() -> ImageSpec {
        parse_images_conf(
            "[g]\ninit = i\nbuild-root = kb\nbuild-module = drivers/dma/dmatest.c\n\
             build-selftest = vfio/vfio_pci_device_test vfio/vfio_dma_mapping_test\n",
        )
        .unwrap()
        .remove(0)
    }

    #[test]
    fn members_of_modules_and_selftests() {
        let m = source_members(&spec());
        assert_eq!(
            m,
            [
                "drivers/dma/dmatest.c",
                "drivers/dma/idxd/registers.h",
                "drivers/dma/ioat/",
                "include/linux/pci_ids.h",
                "tools/arch/x86/include/",
                "tools/include/",
                "tools/testing/selftests/kselftest.h",
                "tools/testing/selftests/kselftest_harness.h",
                "tools/testing/selftests/vfio/",
            ]
        );
        assert!(is_member(&m, "drivers/dma/ioat/hw.h"));
        assert!(is_member(&m, "drivers/dma/ioat"));
        assert!(is_member(&m, "drivers/dma/dmatest.c"));
        assert!(!is_member(&m, "drivers/dma/dmatest.c.orig"));
        assert!(!is_member(&m, "drivers/dma/ioatx/a.h"));
        assert!(!is_member(&m, "tools/testing/selftests/kvm/x.c"));
        assert_eq!(
            source_rel("linux-source-7.2/drivers/dma/dmatest.c"),
            Some("drivers/dma/dmatest.c")
        );
        assert_eq!(module_name("drivers/dma/dmatest.c"), "dmatest");
        assert_eq!(
            module_name("drivers/infiniband/hw/vmw_pvrdma/"),
            "vmw_pvrdma"
        );
    }

    /// A minimal ELF64 header with one program header of type `ptype`.
    fn elf_with_phdr(ptype: u32) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&ptype.to_le_bytes());
        elf
    }

    #[test]
    fn dynamic_program_detection() {
        assert!(is_dynamic_program(&elf_with_phdr(3)));
        assert!(!is_dynamic_program(&elf_with_phdr(1)));
        assert!(!is_dynamic_program(b"#!/bin/sh\n"));
        assert!(!is_dynamic_program(&elf_with_phdr(3)[..66]));
    }

    #[test]
    fn wrapper_runs_the_real_program_with_the_roots_loader() {
        let w = loader_wrapper(Path::new("/c/root"), "usr/bin/as");
        assert!(w.starts_with("#!/bin/sh\n"));
        assert!(w.contains(
            "exec '/c/root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2' --library-path \
             '/c/root/usr/lib/x86_64-linux-gnu' --argv0 \"$0\" '/c/root/usr/bin/as.real' \"$@\"\n"
        ));
    }

    #[test]
    fn writes_entries_and_wraps_programs() {
        let dir = std::env::temp_dir().join(format!("guest-images-kbuild-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let entries = vec![
            Entry {
                path: "usr/bin".into(),
                node: Node::Dir,
            },
            Entry {
                path: "usr/bin/prog".into(),
                node: Node::File {
                    mode: 0o755,
                    data: elf_with_phdr(3),
                },
            },
            Entry {
                path: "usr/bin/script".into(),
                node: Node::File {
                    mode: 0o755,
                    data: b"#!/bin/sh\n".to_vec(),
                },
            },
            Entry {
                path: "usr/lib/x86_64-linux-gnu/libc.so.6".into(),
                node: Node::File {
                    mode: 0o755,
                    data: elf_with_phdr(3),
                },
            },
            Entry {
                path: "usr/bin/link".into(),
                node: Node::Symlink("prog".into()),
            },
        ];
        write_entries(&dir, &entries, Some(&dir)).unwrap();
        // Written twice: later packages replace earlier files and links.
        write_entries(&dir, &entries, Some(&dir)).unwrap();
        let text = std::fs::read_to_string(dir.join("usr/bin/prog")).unwrap();
        assert!(text.contains("usr/bin/prog.real"), "{text}");
        assert_eq!(
            std::fs::read(dir.join("usr/bin/prog.real")).unwrap(),
            elf_with_phdr(3)
        );
        assert_eq!(
            std::fs::read(dir.join("usr/bin/script")).unwrap(),
            b"#!/bin/sh\n"
        );
        assert!(!dir.join("usr/lib/x86_64-linux-gnu/libc.so.6.real").exists());
        assert_eq!(
            std::fs::read_link(dir.join("usr/bin/link")).unwrap(),
            Path::new("prog")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn build_script_parses() {
        let out = Command::new("sh")
            .args(["-n", "-c", BUILD_SCRIPT])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Our programs compile without warnings (the image build adds -Werror) with the host's C
    /// compiler too, when it has one; the build root's gcc compiles them for the images.
    #[test]
    fn programs_compile_without_warnings() {
        for (name, text) in crate::BUILD_PROGRAMS {
            let out = Command::new("cc")
                .args([
                    "-c",
                    "-o",
                    "/dev/null",
                    "-O2",
                    "-Wall",
                    "-Wextra",
                    "-Werror",
                    "-x",
                    "c",
                    "-",
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut child| {
                    use std::io::Write;
                    child.stdin.take().unwrap().write_all(text.as_bytes())?;
                    child.wait_with_output()
                });
            match out {
                Ok(out) => assert!(
                    out.status.success(),
                    "{name}.c: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => eprintln!("skipped {name}.c: no host C compiler ({e})"),
            }
        }
    }

    #[test]
    fn reads_vermagic() {
        let ko = crate::kernel::tests::fake_ko("m", &[]);
        assert_eq!(vermagic(&ko).as_deref(), Some("test"));
        assert_eq!(vermagic(b"nope"), None);
    }
}
