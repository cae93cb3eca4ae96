use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use super::*;
use crate::cpio;
use crate::kernel::tests::fake_ko;

/// A scratch directory removed at the end of the test.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "guest-images-test-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn compress(tool: &str, data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = Command::new(tool)
        .arg("-c")
        .arg("-q")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let t = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    t.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

enum F<'a> {
    File(&'a str, u32, Vec<u8>),
    Link(&'a str, &'a str),
}

/// Builds a .deb with `dpkg-deb -b` and returns its path.
fn make_deb(dir: &Path, name: &str, version: &str, files: &[F]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.join(format!("{name}-root"));
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: amd64\nMaintainer: t <t@example.org>\nDescription: test\n"
        ),
    )
    .unwrap();
    for f in files {
        match f {
            F::File(path, mode, data) => {
                let p = root.join(path);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, data).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
            }
            F::Link(path, target) => {
                let p = root.join(path);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(target, &p).unwrap();
            }
        }
    }
    let deb = dir.join(format!("{name}.deb"));
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "-b"])
        .arg(&root)
        .arg(&deb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    deb
}

/// The ELF that plays vmlinux in the fake kernel package.
fn fake_vmlinux() -> Vec<u8> {
    fake_ko("vmlinux", &[])
}

/// A bzImage-shaped file: 2 setup sectors, `HdrS` header with payload_offset/length pointing at
/// a zstd frame followed by the 4-byte uncompressed size.
fn fake_bzimage() -> Vec<u8> {
    let elf = fake_vmlinux();
    let mut payload = compress("zstd", &elf);
    payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
    let mut bz = vec![0u8; 1024 + 0x40];
    bz[0x1f1] = 1; // setup_sects
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x248..0x24c].copy_from_slice(&0x40u32.to_le_bytes());
    bz[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    bz.extend_from_slice(&payload);
    bz.extend_from_slice(b"trailing setup data");
    bz
}

const REL: &str = "9.9.9-test";

struct Fixture {
    _dir: Scratch,
    debs: BTreeMap<String, PathBuf>,
    lock: String,
}

const CONF: &str = "[guest-t]\ninit = guest-init.sh\nmodule = foo\nmodule = builtin-mod\n\n[host]\ninit = host-init.sh\nmodule = bar\n";
const INITS: &[(&str, &str)] = &[
    ("guest-init.sh", "#!/bin/sh\necho guest\n"),
    ("host-init.sh", "#!/bin/sh\necho host\n"),
];

fn fixture() -> Fixture {
    let dir = Scratch::new("debs");
    let busybox = b"#!/bin/sh\n[ \"$1\" = --list-full ] && printf 'bin/sh\\nbin/ls\\nsbin/modprobe\\nusr/bin/env\\nlinuxrc\\nbin/busybox\\n'\n";
    let mut debs = BTreeMap::new();
    debs.insert(
        "busybox-static".to_string(),
        make_deb(
            &dir.0,
            "busybox-static",
            "1.0-1",
            &[
                F::File("usr/bin/busybox", 0o755, busybox.to_vec()),
                F::File(
                    "usr/share/doc/busybox-static/copyright",
                    0o644,
                    b"c".to_vec(),
                ),
                F::File("bin/extra", 0o700, b"extra".to_vec()),
                F::File("etc/motd", 0o600, b"hello\n".to_vec()),
            ],
        ),
    );
    debs.insert(
        "tool".to_string(),
        make_deb(
            &dir.0,
            "tool",
            "2.0",
            &[
                F::File("usr/bin/env", 0o755, b"real env".to_vec()),
                F::Link("usr/bin/tool-link", "env"),
            ],
        ),
    );
    let m = |name: &str, deps: &[&str]| compress("xz", &fake_ko(name, deps));
    let moddir = format!("usr/lib/modules/{REL}");
    debs.insert(
        format!("linux-image-{REL}"),
        make_deb(
            &dir.0,
            &format!("linux-image-{REL}"),
            "9.9.9-1",
            &[
                F::File(&format!("{moddir}/vmlinuz"), 0o644, fake_bzimage()),
                F::File(
                    &format!("{moddir}/kernel/drivers/foo/foo.ko.xz"),
                    0o644,
                    m("foo", &["bar"]),
                ),
                F::File(
                    &format!("{moddir}/kernel/lib/bar.ko.xz"),
                    0o644,
                    m("bar", &[]),
                ),
                F::File(
                    &format!("{moddir}/kernel/fs/unused.ko.xz"),
                    0o644,
                    m("unused", &[]),
                ),
                F::File(
                    &format!("{moddir}/modules.builtin"),
                    0o644,
                    b"kernel/fs/builtin-mod.ko\n".to_vec(),
                ),
            ],
        ),
    );
    let sha = |n: &str| crate::sha256_file(&debs[n]).unwrap();
    let lock = format!(
        "# test lock\n\
         busybox-static 1.0-1 test {} guest-t,host\n\
         tool 2.0 test {} guest-t\n\
         linux-image-{REL} 9.9.9-1 test {} guest-t,host linux-image-*-test\n",
        sha("busybox-static"),
        sha("tool"),
        sha(&format!("linux-image-{REL}"))
    );
    Fixture {
        _dir: dir,
        debs,
        lock,
    }
}

/// Serves the fixture's .debs and counts the calls.
struct DirFetcher {
    debs: BTreeMap<String, PathBuf>,
    calls: Arc<AtomicUsize>,
}

impl Fetcher for DirFetcher {
    fn fetch(
        &self,
        _cache: &Path,
        suites: &[String],
        pins: &[Pin],
        dest: &Path,
    ) -> Result<Vec<PathBuf>, Error> {
        assert_eq!(suites, ["test"]);
        self.calls.fetch_add(1, Ordering::SeqCst);
        pins.iter()
            .map(|p| {
                let to = dest.join(format!(
                    "{}_{}_amd64.deb",
                    p.name,
                    p.version.as_deref().unwrap_or("")
                ));
                std::fs::copy(&self.debs[&p.name], &to).unwrap();
                Ok(to)
            })
            .collect()
    }
}

fn store(fx: &Fixture, cache: &Path, inits: &[(&str, &str)]) -> (ImageStore, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let fetcher = DirFetcher {
        debs: fx.debs.clone(),
        calls: calls.clone(),
    };
    (
        ImageStore::with_inputs(
            cache.to_path_buf(),
            &fx.lock,
            CONF,
            inits,
            Box::new(fetcher),
        ),
        calls,
    )
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn pipeline_builds_deterministically_and_reuses_the_cache() {
    let fx = fixture();
    let (a, b) = (Scratch::new("cache-a"), Scratch::new("cache-b"));
    let (store_a, calls_a) = store(&fx, &a.0, INITS);
    let (store_b, _) = store(&fx, &b.0, INITS);

    let ga = store_a.guest("t").unwrap();
    let gb = store_b.guest("t").unwrap();
    assert_eq!(calls_a.load(Ordering::SeqCst), 1);
    assert_eq!(ga.kernel_release, REL);
    for (x, y) in [
        (&ga.bzimage, &gb.bzimage),
        (&ga.vmlinux, &gb.vmlinux),
        (&ga.initramfs, &gb.initramfs),
    ] {
        assert_eq!(
            read(x),
            read(y),
            "{} differs between two builds",
            x.display()
        );
        assert_eq!(x.file_name(), y.file_name());
        assert_eq!(
            x.parent().unwrap().file_name(),
            y.parent().unwrap().file_name()
        );
    }
    assert_eq!(read(&ga.bzimage), fake_bzimage());
    assert_eq!(read(&ga.vmlinux), fake_vmlinux());

    // Warm cache: same paths, no fetch, no temporary directories left.
    assert_eq!(store_a.guest("t").unwrap(), ga);
    assert_eq!(calls_a.load(Ordering::SeqCst), 1);
    let leftovers: Vec<_> = std::fs::read_dir(a.0.join("images"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());

    // The initramfs contents.
    let recs = cpio::parse(&read(&ga.initramfs)).unwrap();
    let get = |n: &str| {
        recs.iter()
            .find(|r| r.name == n)
            .unwrap_or_else(|| panic!("{n} missing from the initramfs"))
    };
    assert_eq!(get("init").data, b"#!/bin/sh\necho guest\n");
    assert_eq!(get("init").mode(), cpio::S_IFREG | 0o755);
    assert_eq!(get("bin").data, b"usr/bin");
    assert_eq!(get("usr/bin/sh").data, b"/usr/bin/busybox");
    assert_eq!(get("usr/bin/sh").mode() & cpio::S_IFMT, cpio::S_IFLNK);
    assert_eq!(get("usr/sbin/modprobe").data, b"/usr/bin/busybox");
    assert_eq!(
        get("usr/bin/env").data,
        b"real env",
        "package files win over applet links"
    );
    assert_eq!(get("usr/bin/tool-link").data, b"env");
    assert_eq!(get("usr/bin/extra").mode(), cpio::S_IFREG | 0o755);
    assert_eq!(get("etc/motd").mode(), cpio::S_IFREG | 0o644);
    assert_eq!(get("dev/console").fields[9..11], [5, 1]);
    assert!(
        !recs
            .iter()
            .any(|r| r.name.starts_with("usr/share/doc") || r.name == "linuxrc")
    );
    let moddir = format!("usr/lib/modules/{REL}");
    assert_eq!(
        get(&format!("{moddir}/kernel/drivers/foo/foo.ko")).data,
        fake_ko("foo", &["bar"])
    );
    assert!(
        get(&format!("{moddir}/kernel/lib/bar.ko"))
            .data
            .starts_with(b"\x7fELF")
    );
    assert!(!recs.iter().any(|r| r.name.contains("unused")));
    assert_eq!(
        String::from_utf8(get(&format!("{moddir}/modules.dep")).data.clone()).unwrap(),
        "kernel/drivers/foo/foo.ko: kernel/lib/bar.ko\nkernel/lib/bar.ko:\n"
    );
    assert!(
        recs.iter()
            .any(|r| r.name == format!("{moddir}/modules.builtin"))
    );
    assert_eq!(get("etc/vmm/modules").data, b"foo\n");
    for r in &recs {
        assert_eq!(
            (r.fields[2], r.fields[3], r.fields[5]),
            (0, 0, 0),
            "{}",
            r.name
        );
    }

    // build_all lists every artifact with the digest of its contents.
    let all = store_a.build_all().unwrap();
    let names: Vec<String> = all
        .iter()
        .map(|a| {
            format!(
                "{}/{}",
                a.path
                    .parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .split('-')
                    .next()
                    .unwrap(),
                a.path.file_name().unwrap().to_string_lossy()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "guest/bzImage",
            "guest/vmlinux",
            "guest/initramfs.cpio",
            "host/bzImage",
            "host/initramfs.cpio"
        ]
    );
    for art in &all {
        assert_eq!(art.sha256, crate::sha256_file(&art.path).unwrap());
    }
    let host = store_a.host().unwrap();
    let recs = cpio::parse(&read(&host.initramfs)).unwrap();
    assert!(
        recs.iter()
            .any(|r| r.name == "init" && r.data == b"#!/bin/sh\necho host\n")
    );
    assert!(
        recs.iter()
            .any(|r| r.name == "etc/vmm/modules" && r.data == b"bar\n")
    );
    assert!(!recs.iter().any(|r| r.name.ends_with("foo.ko")));
    assert_eq!(
        calls_a.load(Ordering::SeqCst),
        1,
        "debs are shared between images"
    );
}

#[test]
fn input_changes_rebuild_and_stale_temporaries_are_removed() {
    let fx = fixture();
    let cache = Scratch::new("cache");
    let (s, _) = store(&fx, &cache.0, INITS);
    let first = s.guest("t").unwrap();

    // A build interrupted by a dead process: half-written files in a temporary directory.
    let boot = boot_id();
    let images = cache.0.join("images");
    let stale = images.join(format!(".tmp-guest-t-0123456789abcdef.{boot}.999999999.0"));
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("initramfs.cpio"), b"half").unwrap();
    let stale_dl = cache
        .0
        .join(format!("debs/.tmp-download.{boot}.999999999.3"));
    std::fs::create_dir_all(&stale_dl).unwrap();
    // One of a live process (this one) must survive.
    let live = images.join(format!(".tmp-guest-t-x.{boot}.{}.99", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();

    let inits = [("guest-init.sh", "#!/bin/sh\necho changed\n"), INITS[1]];
    let (s2, _) = store(&fx, &cache.0, &inits);
    let second = s2.guest("t").unwrap();
    assert_ne!(
        first.initramfs.parent(),
        second.initramfs.parent(),
        "init change → new image dir"
    );
    assert_eq!(read(&first.vmlinux), read(&second.vmlinux));
    assert!(!stale.exists(), "stale temporary build directory removed");
    assert!(live.exists());
    std::fs::remove_dir_all(&live).unwrap();

    // Re-downloading needs the stale download dir cleaned as well.
    std::fs::remove_dir_all(cache.0.join("debs")).unwrap();
    std::fs::create_dir_all(&stale_dl).unwrap();
    let third_cache = second.initramfs.parent().unwrap().to_path_buf();
    std::fs::remove_file(third_cache.join("SHA256SUMS")).unwrap();
    let third = s2.guest("t").unwrap();
    assert_eq!(
        third, second,
        "an incomplete image directory is rebuilt in place"
    );
    assert!(!stale_dl.exists());
    assert_eq!(read(&third.initramfs), read(&second.initramfs));
}

struct FailingFetcher(fn(&[Pin], &Path) -> Result<Vec<PathBuf>, Error>);

impl Fetcher for FailingFetcher {
    fn fetch(
        &self,
        _: &Path,
        _: &[String],
        pins: &[Pin],
        dest: &Path,
    ) -> Result<Vec<PathBuf>, Error> {
        (self.0)(pins, dest)
    }
}

#[test]
fn download_problems_name_the_package_and_the_fix() {
    let fx = fixture();
    let cache = Scratch::new("cache");
    let s = ImageStore::with_inputs(
        cache.0.clone(),
        &fx.lock,
        CONF,
        INITS,
        Box::new(FailingFetcher(|pins, dest| {
            // Serve garbage for every package.
            pins.iter()
                .map(|p| {
                    let f = dest.join(format!("{}_x.deb", p.name));
                    std::fs::write(&f, b"not the pinned package").unwrap();
                    Ok(f)
                })
                .collect()
        })),
    );
    let e = s.guest("t").unwrap_err().to_string();
    assert!(
        e.starts_with("sha256 mismatch for busybox-static=1.0-1: images.lock pins "),
        "{e}"
    );
    assert!(
        e.contains("`vmm images update`") && !e.contains('\n'),
        "{e}"
    );
    assert!(
        !cache
            .0
            .join("debs")
            .read_dir()
            .unwrap()
            .any(|e| e.unwrap().file_name() != ".")
    );

    let missing = crate::apt::missing_pin(
        &Lock::parse(&fx.lock).unwrap().pins_for("host"),
        &[("busybox-static".into(), "1.0-1".into(), "test".into())],
    )
    .unwrap()
    .to_string();
    assert_eq!(
        missing,
        format!(
            "pinned package linux-image-{REL}=9.9.9-1 is no longer available in Debian test; run `vmm images update` to re-pin"
        )
    );

    let unpinned = ImageStore::with_inputs(
        cache.0.clone(),
        "extra - test - guest-t\n",
        CONF,
        INITS,
        Box::new(FailingFetcher(|_, _| unreachable!())),
    );
    assert_eq!(
        unpinned.guest("t").unwrap_err().to_string(),
        "package extra is in images.lock without a pinned version; run `vmm images update` to pin it"
    );
    assert_eq!(
        unpinned.guest("nope").unwrap_err().to_string(),
        "unknown guest profile `nope` (available: t)"
    );
}

#[test]
fn embedded_inputs_are_consistent() {
    let lock = Lock::parse(EMBEDDED_LOCK).unwrap();
    let specs = parse_images_conf(EMBEDDED_CONF).unwrap();
    let s = ImageStore::new(PathBuf::from("/nonexistent"));
    let profiles = s.profiles().unwrap();
    assert_eq!(profiles, ["7.2", "6.12"]);
    assert!(profiles.iter().any(|p| p == crate::DEFAULT_PROFILE));
    for spec in &specs {
        assert!(
            INIT_SCRIPTS.iter().any(|(n, _)| *n == spec.init),
            "{}",
            spec.name
        );
        let pins = lock.pins_for(&spec.name);
        assert!(
            pins.iter().any(|p| p.name == "busybox-static"),
            "{}",
            spec.name
        );
        assert!(
            pins.iter().any(|p| p.name.starts_with("linux-")),
            "{}",
            spec.name
        );
        for p in pins {
            p.resolved().unwrap();
        }
        s.recipe(&spec.name).unwrap();
    }
    // Every pin belongs to images or build roots only.
    for p in lock.pins() {
        assert!(
            p.images.iter().all(|i| specs
                .iter()
                .any(|s| s.name == *i || s.build_root.as_deref() == Some(i))),
            "{}",
            p.name
        );
    }
    // The build roots: the kernel's source and headers, programs and modules named in the
    // images.
    let guest = specs.iter().find(|s| s.name == "guest-7.2").unwrap();
    let root = lock.pins_for(guest.build_root.as_deref().unwrap());
    for needed in [
        "linux-source-7.2",
        "gcc-16",
        "pahole",
        "libc6-dev",
        "uuid-dev",
    ] {
        assert!(root.iter().any(|p| p.name == needed), "{needed}");
    }
    assert!(root.iter().any(|p| p.name.starts_with("linux-headers-")));
    assert_eq!(
        guest.build_modules,
        [
            "drivers/dma/dmatest.c",
            "drivers/uio/uio_pci_generic_sva.c",
            "drivers/infiniband/hw/vmw_pvrdma/"
        ]
    );
    assert_eq!(guest.programs, ["vfio-selftests"]);
    // sva-test in both guest profiles; 6.12 compiles it with the 7.2 build root, without the
    // kernel source (only modules and selftests need it).
    for profile in ["guest-7.2", "guest-6.12"] {
        let spec = specs.iter().find(|s| s.name == profile).unwrap();
        assert_eq!(spec.build_programs, ["sva-test"], "{profile}");
        assert_eq!(spec.build_root.as_deref(), Some("kbuild-7.2"), "{profile}");
    }
    let r = s.recipe("guest-6.12").unwrap();
    assert!(r.build_pins.iter().any(|p| p.name == "gcc-16"));
    assert!(!r.build_pins.iter().any(kbuild::is_source_package));
    assert_eq!(r.build_programs.len(), 1);
    let r = s.recipe("guest-7.2").unwrap();
    assert!(r.build_pins.iter().any(kbuild::is_source_package));
    // libc6 is pinned twice: trixie for the guests, sid for the build root.
    let libc: Vec<&str> = lock
        .pins()
        .iter()
        .filter(|p| p.name == "libc6")
        .map(|p| p.suite.as_str())
        .collect();
    assert_eq!(libc, ["trixie", "sid"]);
    // Pattern tracking must still select the pinned package itself.
    for p in lock.pins() {
        assert!(crate::apt::glob_match(p.pattern(), &p.name), "{}", p.name);
    }
}

#[test]
fn init_scripts_parse() {
    for (name, text) in INIT_SCRIPTS.iter().chain(crate::GUEST_PROGRAMS) {
        let out = Command::new("sh")
            .arg("-n")
            .arg("-c")
            .arg(text)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn cache_inside_the_repository_is_refused() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let e = check_outside_repository(&repo.join("vmm-cache")).unwrap_err();
    assert!(e.to_string().contains("inside the repository"), "{e}");
    let e = check_outside_repository(&repo.join("guest-images/x/../cache")).unwrap_err();
    assert!(e.to_string().contains("inside the repository"), "{e}");
    check_outside_repository(&repo.join("target/tmp/cache")).unwrap();
    check_outside_repository(Path::new("/nonexistent/cache")).unwrap();
}

#[test]
fn canonical_paths() {
    assert_eq!(canonical("bin/sh").as_deref(), Some("usr/bin/sh"));
    assert_eq!(canonical("lib64/ld.so").as_deref(), Some("usr/lib64/ld.so"));
    assert_eq!(canonical("bin"), None);
    assert_eq!(canonical("usr/share/doc/x/copyright"), None);
    assert_eq!(
        canonical("usr/share/docs").as_deref(),
        Some("usr/share/docs")
    );
    assert_eq!(canonical("etc/x").as_deref(), Some("etc/x"));
}

/// Full build against the real archive: `VMM_NETWORK_TESTS=1 cargo test -p guest-images`.
/// Uses `$VMM_CACHE_DIR` if set, otherwise a fresh directory.
#[test]
fn network_full_build() {
    if std::env::var_os("VMM_NETWORK_TESTS").is_none_or(|v| v != "1") {
        eprintln!("skipped: set VMM_NETWORK_TESTS=1 to build the real images");
        return;
    }
    let scratch = Scratch::new("network");
    let cache = std::env::var_os(CACHE_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| scratch.0.clone());
    let store = ImageStore::new(cache);
    let g = store.guest(crate::DEFAULT_PROFILE).unwrap();
    assert!(read(&g.vmlinux).starts_with(b"\x7fELF"));
    assert!(kernel::has_pvh_note(&read(&g.vmlinux)));
    let recs = cpio::parse(&read(&g.initramfs)).unwrap();
    for n in [
        "init",
        "usr/bin/busybox",
        "usr/bin/sh",
        "usr/sbin/poweroff",
        "usr/bin/setsid",
        "usr/bin/stty",
    ] {
        assert!(recs.iter().any(|r| r.name == n), "{n}");
    }
    let h = store.host().unwrap();
    let recs = cpio::parse(&read(&h.initramfs)).unwrap();
    let moddir = format!("usr/lib/modules/{}", h.kernel_release);
    for m in [
        "kernel/arch/x86/kvm/kvm-amd.ko",
        "kernel/fs/9p/9p.ko",
        "kernel/net/9p/9pnet_virtio.ko",
    ] {
        assert!(
            recs.iter().any(|r| r.name == format!("{moddir}/{m}")),
            "{m}"
        );
    }
    assert_eq!(store.build_all().unwrap().len(), 8);
}

/// A pin whose version left the archive fails with the one-line "re-pin" message (real apt).
#[test]
fn network_missing_pin() {
    if std::env::var_os("VMM_NETWORK_TESTS").is_none_or(|v| v != "1") {
        eprintln!("skipped: set VMM_NETWORK_TESTS=1 to query the real archive");
        return;
    }
    let scratch = Scratch::new("network-missing");
    let cache = std::env::var_os(CACHE_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| scratch.0.clone());
    let lock = format!(
        "busybox-static 1:0.0.1-1 trixie {} guest-t\n",
        "0".repeat(64)
    );
    let store = ImageStore::with_inputs(cache, &lock, CONF, INITS, Box::new(AptFetcher));
    let e = store.guest("t").unwrap_err().to_string();
    assert_eq!(
        e,
        "pinned package busybox-static=1:0.0.1-1 is no longer available in Debian trixie; run `vmm images update` to re-pin"
    );
}
