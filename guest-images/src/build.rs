//! The image store: cache management, downloads and the build pipeline.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::apt::{AptFetcher, Fetcher, PrivateApt, resolve_newest};
use crate::cpio::{Archive, Node};
use crate::deb::{self, Entry};
use crate::kbuild;
use crate::kernel::{self, ModuleIndex, ModuleSet};
use crate::lock::{ImageSpec, Lock, Pin, parse_images_conf};
use crate::{
    BUILD_PROGRAMS, CACHE_DIR_ENV, EMBEDDED_CONF, EMBEDDED_LOCK, Error, GUEST_PROGRAMS,
    INIT_SCRIPTS, progress, run_capture,
};

/// Bump when the pipeline changes its output for the same inputs; part of every input hash.
const BUILDER_VERSION: &str = "2";

/// Name of the host image in `images.conf`.
const HOST_IMAGE: &str = "host";
/// Prefix of guest profile images in `images.conf`.
const GUEST_PREFIX: &str = "guest-";

/// A built guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// Profile name (`"7.2"`).
    pub profile: String,
    /// Kernel release (`uname -r` in the guest).
    pub kernel_release: String,
    /// The kernel as shipped (bzImage).
    pub bzimage: PathBuf,
    /// The uncompressed ELF kernel extracted from the bzImage (PVH entry note included).
    pub vmlinux: PathBuf,
    /// Uncompressed newc initramfs.
    pub initramfs: PathBuf,
}

/// The built nested-KVM host image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostImage {
    /// Kernel release of the host kernel.
    pub kernel_release: String,
    /// The host kernel (bzImage).
    pub bzimage: PathBuf,
    /// Uncompressed newc initramfs with `init/host-init.sh` as `/init`.
    pub initramfs: PathBuf,
}

/// One built file and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Absolute path in the cache.
    pub path: PathBuf,
    /// sha256, lowercase hex.
    pub sha256: String,
}

/// One change made by [`update_lock`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinUpdate {
    /// Package name before.
    pub old_name: String,
    /// Version before (`None` if it was unpinned).
    pub old_version: Option<String>,
    /// Package name now.
    pub name: String,
    /// Version now.
    pub version: String,
    /// Suite.
    pub suite: String,
}

impl fmt::Display for PinUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let old = self.old_version.as_deref().unwrap_or("(unpinned)");
        if self.old_name == self.name {
            write!(
                f,
                "{} {old} -> {} ({})",
                self.name, self.version, self.suite
            )
        } else {
            write!(
                f,
                "{} {old} -> {} {} ({})",
                self.old_name, self.name, self.version, self.suite
            )
        }
    }
}

/// Builds images into, and reuses them from, a cache directory.
pub struct ImageStore {
    cache_dir: PathBuf,
    lock_text: String,
    conf_text: String,
    init_scripts: Vec<(String, String)>,
    fetcher: Box<dyn Fetcher>,
}

impl fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageStore")
            .field("cache_dir", &self.cache_dir)
            .finish()
    }
}

/// A built image directory, read back from its `image.info` and `SHA256SUMS`.
#[derive(Debug)]
struct Built {
    dir: PathBuf,
    kernel_release: String,
    /// `(file name, sha256)` in build order.
    sums: Vec<(String, String)>,
}

impl Built {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

struct Recipe {
    spec: ImageSpec,
    init: String,
    pins: Vec<Pin>,
    /// The packages of the build root (`build-root =`), empty if the image builds nothing.
    build_pins: Vec<Pin>,
    /// `(name, script)` of the image's `program =` lines.
    programs: Vec<(String, String)>,
    /// `(name, C source)` of the image's `build-program =` lines.
    build_programs: Vec<(String, String)>,
    suites: Vec<String>,
    vmlinux: bool,
}

impl Recipe {
    fn input_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("guest-images builder {BUILDER_VERSION}\n"));
        h.update(format!(
            "image {}\nvmlinux {}\n",
            self.spec.name, self.vmlinux
        ));
        for p in &self.pins {
            h.update(format!("pin {}\n", p.fingerprint()));
        }
        for m in &self.spec.modules {
            h.update(format!("module {m}\n"));
        }
        for m in &self.spec.extra_modules {
            h.update(format!("extra-module {m}\n"));
        }
        h.update(format!("init {} {}\n", self.spec.init, self.init.len()));
        h.update(self.init.as_bytes());
        for (name, text) in &self.programs {
            h.update(format!("program {name} {}\n", text.len()));
            h.update(text.as_bytes());
        }
        if self.spec.builds() {
            for p in &self.build_pins {
                h.update(format!("build-pin {}\n", p.fingerprint()));
            }
            for m in &self.spec.build_modules {
                h.update(format!("build-module {m}\n"));
            }
            for t in &self.spec.build_selftests {
                h.update(format!("build-selftest {t}\n"));
            }
            for (name, text) in &self.build_programs {
                h.update(format!("build-program {name} {}\n", text.len()));
                h.update(text.as_bytes());
            }
            let support = std::iter::once(("build.sh", kbuild::BUILD_SCRIPT))
                .chain(kbuild::SUPPORT_FILES.iter().copied());
            for (name, text) in support {
                h.update(format!("kbuild {name} {}\n", text.len()));
                h.update(text.as_bytes());
            }
        }
        crate::hex(&h.finalize())[..16].to_string()
    }
}

/// Removes a directory tree when dropped (temporary build and download directories).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.0)
        {
            log::warn!("cannot remove {}: {e}", self.0.display());
        }
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| {
            s.trim()
                .chars()
                .filter(char::is_ascii_hexdigit)
                .take(8)
                .collect()
        })
        .unwrap_or_else(|_| "noboot".into())
}

fn tmp_name(label: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".tmp-{label}.{}.{}.{n}", boot_id(), std::process::id())
}

/// Removes `.tmp-*` entries left behind by builds that are no longer running: same boot and a
/// dead process, or (another boot, or an unparsable name) older than a day.
fn clean_stale_tmp(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let (boot, me) = (boot_id(), std::process::id().to_string());
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(".tmp-") {
            continue;
        }
        let parts: Vec<&str> = name.rsplitn(4, '.').collect();
        let old = || {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 24 * 3600)
        };
        let stale = match parts.as_slice() {
            [_, pid, b, _] if *b == boot => *pid != me && !Path::new("/proc").join(pid).exists(),
            _ => old(),
        };
        if stale {
            log::info!("removing stale temporary {}", entry.path().display());
            let p = entry.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            if let Err(e) = r {
                log::warn!("cannot remove {}: {e}", p.display());
            }
        }
    }
}

fn create_dir_all(p: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(p).map_err(|e| Error::io(format!("creating {}", p.display()), e))
}

/// Resolves symlinks in the longest existing prefix of `p`.
fn canonical_prefix(p: &Path) -> PathBuf {
    let mut existing = p.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    out.extend(rest.iter().rev());
    out
}

/// Rejects cache directories inside the source repository this crate was built from, except
/// under its (ignored) `target/` directory, which tests use.
fn check_outside_repository(cache: &Path) -> Result<(), Error> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let Ok(repo) = repo.canonicalize() else {
        return Ok(()); // not running from a checkout
    };
    if !repo.join(".git").exists() && !repo.join("Cargo.toml").exists() {
        return Ok(());
    }
    let cache = canonical_prefix(cache);
    if cache.starts_with(&repo) && !cache.starts_with(repo.join("target")) {
        return Err(Error::CacheInRepository(cache));
    }
    Ok(())
}

impl ImageStore {
    /// The store at `$VMM_CACHE_DIR`, or `~/.cache/vmm`. Refuses a directory inside the
    /// repository.
    pub fn from_env() -> Result<Self, Error> {
        let dir = match std::env::var_os(CACHE_DIR_ENV).filter(|d| !d.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => {
                let home = std::env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .ok_or(Error::NoCacheDir)?;
                PathBuf::from(home).join(".cache/vmm")
            }
        };
        let dir = std::path::absolute(&dir)
            .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
        check_outside_repository(&dir)?;
        Ok(Self::new(dir))
    }

    /// A store with the embedded lock file, image list and init scripts.
    pub fn new(cache_dir: PathBuf) -> Self {
        Self {
            cache_dir,
            lock_text: EMBEDDED_LOCK.to_string(),
            conf_text: EMBEDDED_CONF.to_string(),
            init_scripts: INIT_SCRIPTS
                .iter()
                .map(|(n, s)| (n.to_string(), s.to_string()))
                .collect(),
            fetcher: Box::new(AptFetcher),
        }
    }

    /// A store with other inputs and a custom fetcher (tests).
    #[cfg(test)]
    pub(crate) fn with_inputs(
        cache_dir: PathBuf,
        lock_text: &str,
        conf_text: &str,
        init_scripts: &[(&str, &str)],
        fetcher: Box<dyn Fetcher>,
    ) -> Self {
        Self {
            cache_dir,
            lock_text: lock_text.to_string(),
            conf_text: conf_text.to_string(),
            init_scripts: init_scripts
                .iter()
                .map(|(n, s)| (n.to_string(), s.to_string()))
                .collect(),
            fetcher,
        }
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The guest profiles defined in `images.conf` (e.g. `["7.2", "6.12"]`).
    pub fn profiles(&self) -> Result<Vec<String>, Error> {
        Ok(parse_images_conf(&self.conf_text)?
            .into_iter()
            .filter_map(|s| s.name.strip_prefix(GUEST_PREFIX).map(str::to_string))
            .collect())
    }

    /// Builds (or reuses from the cache) the guest image of a profile.
    pub fn guest(&self, profile: &str) -> Result<GuestImage, Error> {
        let profiles = self.profiles()?;
        if !profiles.iter().any(|p| p == profile) {
            return Err(Error::UnknownProfile {
                profile: profile.to_string(),
                available: profiles.join(", "),
            });
        }
        let built = self.build(&format!("{GUEST_PREFIX}{profile}"))?;
        Ok(GuestImage {
            profile: profile.to_string(),
            kernel_release: built.kernel_release.clone(),
            bzimage: built.path("bzImage"),
            vmlinux: built.path("vmlinux"),
            initramfs: built.path("initramfs.cpio"),
        })
    }

    /// Builds (or reuses from the cache) the nested-KVM host image.
    pub fn host(&self) -> Result<HostImage, Error> {
        let built = self.build(HOST_IMAGE)?;
        Ok(HostImage {
            kernel_release: built.kernel_release.clone(),
            bzimage: built.path("bzImage"),
            initramfs: built.path("initramfs.cpio"),
        })
    }

    /// Builds every guest profile and the host image; returns each artifact with its sha256,
    /// guest profiles first (in `images.conf` order), then the host.
    pub fn build_all(&self) -> Result<Vec<Artifact>, Error> {
        let mut images: Vec<String> = self
            .profiles()?
            .into_iter()
            .map(|p| format!("{GUEST_PREFIX}{p}"))
            .collect();
        images.push(HOST_IMAGE.to_string());
        // Fetch the packages of every image still to build in one apt run, then build the
        // images in parallel (each is mostly one decompression process) without apt.
        let mut pins: Vec<Pin> = Vec::new();
        let mut suites = Vec::new();
        for image in &images {
            let r = self.recipe(image)?;
            if load_built(&self.image_dir(&r)).is_some() {
                continue;
            }
            for p in r.pins.into_iter().chain(r.build_pins) {
                if !pins.iter().any(|q| q.name == p.name && q.suite == p.suite) {
                    pins.push(p);
                }
            }
            suites = r.suites;
        }
        if !pins.is_empty() {
            self.ensure_debs(&pins, &suites)?;
        }
        let results: Vec<Result<Built, Error>> = std::thread::scope(|scope| {
            let handles: Vec<_> = images
                .iter()
                .map(|image| scope.spawn(move || self.build(image)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Kernel("an image build thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut out = Vec::new();
        for built in results {
            let built = built?;
            for (file, sha256) in &built.sums {
                out.push(Artifact {
                    path: built.path(file),
                    sha256: sha256.clone(),
                });
            }
        }
        Ok(out)
    }

    fn image_dir(&self, r: &Recipe) -> PathBuf {
        self.cache_dir
            .join("images")
            .join(format!("{}-{}", r.spec.name, r.input_hash()))
    }

    fn recipe(&self, image: &str) -> Result<Recipe, Error> {
        let lock = Lock::parse(&self.lock_text)?;
        let spec = parse_images_conf(&self.conf_text)?
            .into_iter()
            .find(|s| s.name == image)
            .ok_or_else(|| Error::UnknownImage(image.to_string()))?;
        let init = self
            .init_scripts
            .iter()
            .find(|(n, _)| *n == spec.init)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| {
                Error::Conf(format!(
                    "image {image}: init script `{}` is not one of guest-images/init/",
                    spec.init
                ))
            })?;
        let pins = lock.pins_for(image);
        if pins.is_empty() {
            return Err(Error::Kernel(format!(
                "image {image} has no packages in images.lock"
            )));
        }
        for p in &pins {
            p.resolved()?;
        }
        let build_pins = match &spec.build_root {
            Some(root) if spec.builds() => {
                let build_pins = lock.pins_for(root);
                if build_pins.is_empty() {
                    return Err(Error::Conf(format!(
                        "image {image}: build root `{root}` has no packages in images.lock"
                    )));
                }
                for p in &build_pins {
                    p.resolved()?;
                }
                // Our own programs need only the compiler and libc: no kernel source download.
                build_pins
                    .into_iter()
                    .filter(|p| spec.needs_source() || !kbuild::is_source_package(p))
                    .collect()
            }
            _ => Vec::new(),
        };
        let build_programs = spec
            .build_programs
            .iter()
            .map(|name| {
                BUILD_PROGRAMS
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(n, text)| (n.to_string(), text.to_string()))
                    .ok_or_else(|| {
                        Error::Conf(format!(
                            "image {image}: build-program `{name}` is not one of \
                             guest-images/programs/ (BUILD_PROGRAMS)"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let programs = spec
            .programs
            .iter()
            .map(|name| {
                GUEST_PROGRAMS
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(n, text)| (n.to_string(), text.to_string()))
                    .ok_or_else(|| {
                        Error::Conf(format!(
                            "image {image}: program `{name}` is not one of guest-images/guest-bin/ \
                             (GUEST_PROGRAMS)"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Recipe {
            vmlinux: image.starts_with(GUEST_PREFIX),
            spec,
            init,
            pins,
            build_pins,
            programs,
            build_programs,
            suites: lock.suites(),
        })
    }

    fn build(&self, image: &str) -> Result<Built, Error> {
        let recipe = self.recipe(image)?;
        let images = self.cache_dir.join("images");
        create_dir_all(&images)?;
        let final_dir = self.image_dir(&recipe);
        if let Some(b) = load_built(&final_dir) {
            log::debug!("{image}: using {}", final_dir.display());
            return Ok(b);
        }
        if final_dir.exists() {
            if let Some(b) = load_built(&final_dir) {
                return Ok(b); // another process just finished it
            }
            log::warn!("{} is incomplete; rebuilding it", final_dir.display());
            std::fs::remove_dir_all(&final_dir)
                .map_err(|e| Error::io(format!("removing {}", final_dir.display()), e))?;
        }
        clean_stale_tmp(&images);
        let label = final_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = TempDir(images.join(tmp_name(&label)));
        std::fs::create_dir(&tmp.0)
            .map_err(|e| Error::io(format!("creating {}", tmp.0.display()), e))?;
        let started = std::time::Instant::now();
        self.build_into(&recipe, &tmp.0)?;
        match std::fs::rename(&tmp.0, &final_dir) {
            Ok(()) => {}
            Err(e) => {
                if load_built(&final_dir).is_none() {
                    return Err(Error::io(
                        format!("moving the build into {}", final_dir.display()),
                        e,
                    ));
                }
                log::debug!("{image}: built concurrently by another process");
            }
        }
        progress(&format!(
            "built {image} in {:.1}s: {}",
            started.elapsed().as_secs_f64(),
            final_dir.display()
        ));
        load_built(&final_dir).ok_or_else(|| {
            Error::Kernel(format!("{} vanished after the build", final_dir.display()))
        })
    }

    /// Makes sure every pin's `.deb` is in `debs/`, downloading and verifying missing ones.
    fn ensure_debs(&self, pins: &[Pin], suites: &[String]) -> Result<Vec<PathBuf>, Error> {
        let debs = self.cache_dir.join("debs");
        create_dir_all(&debs)?;
        let mut missing = Vec::new();
        for p in pins {
            let (_, sha) = p.resolved()?;
            if !debs.join(format!("{sha}.deb")).is_file() {
                missing.push(p.clone());
            }
        }
        if !missing.is_empty() {
            let _lock = self.apt_lock()?;
            // Another process may have fetched them while this one waited for the lock.
            missing.retain(|p| {
                p.sha256
                    .as_ref()
                    .is_some_and(|sha| !debs.join(format!("{sha}.deb")).is_file())
            });
            if !missing.is_empty() {
                self.download(&missing, suites, &debs)?;
            }
        }
        pins.iter()
            .map(|p| Ok(debs.join(format!("{}.deb", p.resolved()?.1))))
            .collect()
    }

    /// Serialises the use of apt and of `debs/` between processes sharing the cache (released
    /// when the returned file is dropped).
    fn apt_lock(&self) -> Result<std::fs::File, Error> {
        create_dir_all(&self.cache_dir)?;
        let path = self.cache_dir.join("apt.lock");
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                progress("waiting for another process using the package cache");
                file.lock()
                    .map_err(|e| Error::io(format!("locking {}", path.display()), e))?;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io(format!("locking {}", path.display()), e));
            }
        }
        Ok(file)
    }

    /// Downloads `pins` into `debs/` (verifying their digest when pinned); returns the digests.
    /// The caller holds [`ImageStore::apt_lock`].
    fn download(&self, pins: &[Pin], suites: &[String], debs: &Path) -> Result<Vec<String>, Error> {
        clean_stale_tmp(debs);
        let tmp = TempDir(debs.join(tmp_name("download")));
        std::fs::create_dir(&tmp.0)
            .map_err(|e| Error::io(format!("creating {}", tmp.0.display()), e))?;
        let names: Vec<String> = pins.iter().map(Pin::spec).collect();
        progress(&format!("downloading {}", names.join(" ")));
        let files = self.fetcher.fetch(&self.cache_dir, suites, pins, &tmp.0)?;
        let mut digests = Vec::new();
        for (p, file) in pins.iter().zip(&files) {
            let actual = crate::sha256_file(file)?;
            if let Some(expected) = &p.sha256
                && *expected != actual
            {
                return Err(Error::ShaMismatch {
                    package: p.name.clone(),
                    version: p.version.clone().unwrap_or_default(),
                    expected: expected.clone(),
                    actual,
                });
            }
            let dest = debs.join(format!("{actual}.deb"));
            std::fs::rename(file, &dest)
                .map_err(|e| Error::io(format!("moving {} into the cache", file.display()), e))?;
            digests.push(actual);
        }
        Ok(digests)
    }

    fn build_into(&self, r: &Recipe, out: &Path) -> Result<(), Error> {
        let name = &r.spec.name;
        let debs = self.ensure_debs(&r.pins, &r.suites)?;
        progress(&format!("building {name}"));
        let mut packages = Vec::new();
        for deb in &debs {
            packages.push(deb::read_deb(deb, &keep_entry)?);
        }
        let mut layout = classify(name, packages)?;
        let built = if r.spec.builds() {
            let debs = self.ensure_debs(&r.build_pins, &r.suites)?;
            let debs: Vec<(Pin, PathBuf)> = r.build_pins.iter().cloned().zip(debs).collect();
            progress(&format!(
                "{name}: compiling {} with build root {}",
                r.spec
                    .build_modules
                    .iter()
                    .chain(&r.spec.build_selftests)
                    .chain(&r.spec.build_programs)
                    .map(|s| s.rsplit('/').next().unwrap_or(s))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.spec.build_root.as_deref().unwrap_or("?")
            ));
            let started = std::time::Instant::now();
            let work = TempDir(out.join("kbuild"));
            let built = kbuild::build(&r.spec, &layout.release, &debs, &r.build_programs, &work.0)?;
            drop(work);
            progress(&format!(
                "{name}: {} modules and {} programs built in {:.1}s",
                built.modules.len(),
                built.programs.len(),
                started.elapsed().as_secs_f64()
            ));
            built
        } else {
            kbuild::Outputs::default()
        };
        add_built_modules(&mut layout, &built)?;

        let mut sums = String::new();
        let mut emit = |file: &str, data: &[u8]| -> Result<(), Error> {
            write_file(&out.join(file), data)?;
            sums.push_str(&format!("{}  {file}\n", crate::hex(&Sha256::digest(data))));
            Ok(())
        };
        emit("bzImage", &layout.vmlinuz)?;
        if r.vmlinux {
            emit("vmlinux", &kernel::extract_vmlinux(&layout.vmlinuz)?)?;
        }
        // Carried modules (extra and built ones) join the closure but are not loaded at boot.
        let requested: Vec<String> = r
            .spec
            .modules
            .iter()
            .chain(&r.spec.extra_modules)
            .cloned()
            .chain(built.modules.iter().map(|(n, _)| n.clone()))
            .collect();
        let mut modules = kernel::resolve_modules(
            &layout.modules,
            &requested,
            &layout.release,
            &kernel::decompress_module,
        )?;
        let at_boot: Vec<String> = r
            .spec
            .modules
            .iter()
            .map(|m| kernel::normalize_module(m))
            .collect();
        modules.load.retain(|m| at_boot.contains(m));
        let archive = initramfs(r, &layout, &modules, &built, out)?;
        emit("initramfs.cpio", &archive.to_bytes())?;

        let info = format!(
            "image={name}\nkernel_release={}\ninputs={}\nbuilder={BUILDER_VERSION}\n",
            layout.release,
            r.input_hash()
        );
        write_file(&out.join("image.info"), info.as_bytes())?;
        write_file(&out.join("SHA256SUMS"), sums.as_bytes())?;
        Ok(())
    }

    /// Re-resolves every pin of the lock file at `lock_path` to the newest version of its track
    /// pattern in its suite, downloads what changed into the cache (recording the digests) and
    /// rewrites the file. Returns the changes.
    pub fn update_lock(&self, lock_path: &Path) -> Result<Vec<PinUpdate>, Error> {
        let text = std::fs::read_to_string(lock_path)
            .map_err(|e| Error::io(format!("reading {}", lock_path.display()), e))?;
        let mut lock = Lock::parse(&text)?;
        let suites = lock.suites();
        let _apt_lock = self.apt_lock()?;
        let apt = PrivateApt::new(&self.cache_dir, &suites)?;
        apt.update()?;
        let mut changed: Vec<(usize, Pin)> = Vec::new();
        for (i, p) in lock.pins().iter().enumerate() {
            let (name, version) = resolve_newest(&apt, p.pattern(), &p.suite)?;
            if name == p.name
                && p.version.as_deref() == Some(version.as_str())
                && p.sha256.is_some()
            {
                continue;
            }
            let mut new = p.clone();
            new.track = p.track.clone().filter(|t| *t != name).or_else(|| {
                // Keep tracking the old name when a package is renamed without a pattern.
                (name != p.name).then(|| p.pattern().to_string())
            });
            new.name = name;
            new.version = Some(version);
            new.sha256 = None;
            changed.push((i, new));
        }
        let mut updates = Vec::new();
        if !changed.is_empty() {
            let pins: Vec<Pin> = changed.iter().map(|(_, p)| p.clone()).collect();
            let debs = self.cache_dir.join("debs");
            create_dir_all(&debs)?;
            let digests = self.download(&pins, &suites, &debs)?;
            for ((i, mut new), sha) in changed.into_iter().zip(digests) {
                new.sha256 = Some(sha);
                let old = &lock.pins()[i];
                updates.push(PinUpdate {
                    old_name: old.name.clone(),
                    old_version: old.version.clone(),
                    name: new.name.clone(),
                    version: new.version.clone().unwrap_or_default(),
                    suite: new.suite.clone(),
                });
                lock.pins_mut()[i] = new;
            }
            crate::write_atomic(lock_path, lock.render().as_bytes())?;
        }
        for u in &updates {
            progress(&format!("updated {u}"));
        }
        Ok(updates)
    }
}

/// `vmm images update`: re-pins the lock file at `lock_path` (cache from `$VMM_CACHE_DIR`).
pub fn update_lock(lock_path: &Path) -> Result<Vec<PinUpdate>, Error> {
    ImageStore::from_env()?.update_lock(lock_path)
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), Error> {
    let mut f = std::fs::File::create(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))
}

/// Reads a finished image directory; `None` if it is missing or incomplete.
fn load_built(dir: &Path) -> Option<Built> {
    let info = std::fs::read_to_string(dir.join("image.info")).ok()?;
    let kernel_release = info
        .lines()
        .find_map(|l| l.strip_prefix("kernel_release="))?
        .to_string();
    let sums_text = std::fs::read_to_string(dir.join("SHA256SUMS")).ok()?;
    let mut sums = Vec::new();
    for line in sums_text.lines() {
        let (sha, file) = line.split_once("  ")?;
        if !dir.join(file).is_file() {
            return None;
        }
        sums.push((file.to_string(), sha.to_string()));
    }
    (!sums.is_empty()).then(|| Built {
        dir: dir.to_path_buf(),
        kernel_release,
        sums,
    })
}

/// What the packages of an image contain.
struct Layout {
    release: String,
    /// The bzImage.
    vmlinuz: Vec<u8>,
    modules: ModuleIndex,
    /// Entries of the non-kernel packages, in lock order.
    userland: Vec<Vec<Entry>>,
}

/// Splits `usr/lib/modules/<release>/<rest>` (or `lib/modules/...`) into release and rest.
fn module_path(path: &str) -> Option<(&str, Option<&str>)> {
    let tail = path
        .strip_prefix("usr/lib/modules/")
        .or_else(|| path.strip_prefix("lib/modules/"))?;
    match tail.split_once('/') {
        Some((release, rest)) => Some((release, Some(rest))),
        None => Some((tail, None)),
    }
}

/// Which package entries are read into memory.
fn keep_entry(path: &str) -> bool {
    if SKIPPED_PREFIXES
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
    {
        return false;
    }
    if let Some(rest) = path.strip_prefix("boot/") {
        return rest.starts_with("vmlinuz-");
    }
    match module_path(path) {
        None | Some((_, None)) => true,
        Some((_, Some(rest))) => {
            rest == "vmlinuz" || rest == "modules.builtin" || kernel::is_module_file(rest)
        }
    }
}

/// Subdirectory of `lib/modules/<release>/` for modules built out of tree (as kbuild's
/// `modules_install` puts external modules).
const BUILT_MODULE_DIR: &str = "updates";

/// Adds the modules built out of tree to the image's module index, after checking that their
/// vermagic is the one of the kernel's own modules.
fn add_built_modules(layout: &mut Layout, built: &kbuild::Outputs) -> Result<(), Error> {
    if built.modules.is_empty() {
        return Ok(());
    }
    let reference = layout
        .modules
        .by_name
        .values()
        .next()
        .ok_or_else(|| Error::Module("the kernel packages contain no modules".into()))?;
    let expected = kbuild::vermagic(&kernel::decompress_module(reference)?);
    for (name, ko) in &built.modules {
        let got = kbuild::vermagic(ko);
        if got != expected {
            return Err(Error::Module(format!(
                "{name}.ko was built with vermagic {:?}, the kernel's modules have {:?}: \
                 pin the headers and compiler of kernel {} in the build root",
                got.unwrap_or_default(),
                expected.unwrap_or_default(),
                layout.release
            )));
        }
        layout
            .modules
            .add_file(&format!("{BUILT_MODULE_DIR}/{name}.ko"), ko.clone())?;
    }
    Ok(())
}

/// Sorts packages into kernel packages (with `lib/modules/<release>` or
/// `boot/vmlinuz-<release>`) and userland packages.
fn classify(image: &str, packages: Vec<Vec<Entry>>) -> Result<Layout, Error> {
    let mut releases = BTreeSet::new();
    let mut vmlinuz = Vec::new();
    let mut modules = ModuleIndex::default();
    let mut userland = Vec::new();
    for entries in packages {
        let is_kernel = entries.iter().any(|e| {
            module_path(&e.path).is_some_and(|(r, _)| !r.is_empty())
                || e.path.starts_with("boot/vmlinuz-")
        });
        if !is_kernel {
            userland.push(entries);
            continue;
        }
        for e in entries {
            if let Some((release, rest)) = module_path(&e.path)
                && !release.is_empty()
            {
                releases.insert(release.to_string());
                if let (Some(rest), deb::Node::File { data, .. }) = (rest, e.node) {
                    if rest == "vmlinuz" {
                        vmlinuz.push(data);
                    } else {
                        modules.add_file(rest, data)?;
                    }
                }
            } else if let Some(release) = e.path.strip_prefix("boot/vmlinuz-")
                && let deb::Node::File { data, .. } = e.node
            {
                releases.insert(release.to_string());
                vmlinuz.push(data);
            }
        }
    }
    if releases.len() != 1 {
        return Err(Error::Kernel(format!(
            "image {image}: its packages must contain exactly one kernel release, found {}",
            if releases.is_empty() {
                "none".to_string()
            } else {
                releases.into_iter().collect::<Vec<_>>().join(", ")
            }
        )));
    }
    let release = releases.into_iter().next().unwrap_or_default();
    if vmlinuz.len() != 1 {
        return Err(Error::Kernel(format!(
            "image {image}: expected one kernel image (vmlinuz) for {release}, found {}",
            vmlinuz.len()
        )));
    }
    Ok(Layout {
        release,
        vmlinuz: vmlinuz.remove(0),
        modules,
        userland,
    })
}

/// Paths of userland packages that are not copied into an initramfs.
const SKIPPED_PREFIXES: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/locale",
    "usr/share/initramfs-tools",
];

/// Top-level directories that are symlinks into `usr/` in the initramfs (merged /usr).
const MERGED_DIRS: &[&str] = &["bin", "sbin", "lib", "lib64"];

/// Maps a package path to its initramfs path (`bin/x` → `usr/bin/x`); `None` to skip it.
fn canonical(rel: &str) -> Option<String> {
    if SKIPPED_PREFIXES
        .iter()
        .any(|p| rel == *p || rel.starts_with(&format!("{p}/")))
    {
        return None;
    }
    let first = rel.split('/').next().unwrap_or("");
    if MERGED_DIRS.contains(&first) {
        if rel == first {
            return None; // the directory itself is a symlink in the initramfs
        }
        return Some(format!("usr/{rel}"));
    }
    Some(rel.to_string())
}

fn skeleton(a: &mut Archive) {
    for (d, perm) in [
        ("dev", 0o755),
        ("etc", 0o755),
        ("etc/vmm", 0o755),
        ("mnt", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("run", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("usr/lib", 0o755),
        ("usr/lib64", 0o755),
        ("usr/sbin", 0o755),
        ("var", 0o755),
    ] {
        a.directory(d, perm);
    }
    for d in MERGED_DIRS {
        a.symlink(d, &format!("usr/{d}"));
    }
    a.char_device("dev/console", 0o600, 5, 1);
    a.char_device("dev/null", 0o666, 1, 3);
    a.file("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n");
    a.file("etc/group", 0o644, "root:x:0:\n");
    a.file("etc/hostname", 0o644, "vmm\n");
    a.file(
        "etc/profile",
        0o644,
        "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport HOME=/root\nexport PS1='\\u@\\h:\\w\\$ '\ncd \"$HOME\" 2>/dev/null\n",
    );
}

/// Copies a userland package into the archive.
fn add_package(a: &mut Archive, entries: &[Entry]) -> Result<(), Error> {
    for e in entries {
        let Some(path) = canonical(&e.path) else {
            continue;
        };
        let node = match &e.node {
            deb::Node::Dir => {
                if matches!(a.get(&path), Some(Node::Directory { .. })) {
                    continue; // keep the skeleton's mode
                }
                Node::Directory { perm: 0o755 }
            }
            deb::Node::Symlink(target) => Node::Symlink {
                target: target.clone(),
            },
            deb::Node::File { mode, data } => Node::File {
                perm: if mode & 0o111 != 0 { 0o755 } else { 0o644 },
                data: data.clone(),
            },
        };
        a.insert(&path, node)?;
    }
    Ok(())
}

/// Symlinks every busybox applet (from `busybox --list-full`) that no package file provides.
fn add_busybox_applets(a: &mut Archive, image: &str, scratch: &Path) -> Result<(), Error> {
    let Some(Node::File { data, .. }) = a.get("usr/bin/busybox") else {
        return Err(Error::NoBusybox(image.to_string()));
    };
    // Run the pinned busybox itself to list its applets.
    let binary = scratch.join("busybox");
    write_file(&binary, data)?;
    set_mode(&binary, 0o755)?;
    let mut cmd = Command::new(&binary);
    cmd.arg("--list-full").env_clear();
    // Another thread forking while the file was open for writing can hold the write descriptor
    // until its exec: the kernel then refuses to execute the file for a moment (ETXTBSY).
    let mut attempts = 0;
    let list = loop {
        match run_capture(&mut cmd, false) {
            Err(Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 100 =>
            {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => break r,
        }
    };
    let _ = std::fs::remove_file(&binary);
    let list = list?;
    let list = String::from_utf8_lossy(&list);
    let mut applets: Vec<String> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "linuxrc" && !l.ends_with("/busybox"))
        .filter_map(canonical)
        .collect();
    applets.sort();
    applets.dedup();
    for path in applets {
        if a.get(&path).is_none() {
            a.insert(
                &path,
                Node::Symlink {
                    target: "/usr/bin/busybox".into(),
                },
            )?;
        }
    }
    Ok(())
}

fn initramfs(
    r: &Recipe,
    layout: &Layout,
    modules: &ModuleSet,
    built: &kbuild::Outputs,
    scratch: &Path,
) -> Result<Archive, Error> {
    let mut a = Archive::new();
    skeleton(&mut a);
    for entries in &layout.userland {
        add_package(&mut a, entries)?;
    }
    for (name, data) in &built.programs {
        a.insert(
            &format!("usr/bin/{name}"),
            Node::File {
                perm: 0o755,
                data: data.clone(),
            },
        )?;
    }
    for (name, text) in &r.programs {
        a.insert(
            &format!("usr/bin/{name}"),
            Node::File {
                perm: 0o755,
                data: text.as_bytes().to_vec(),
            },
        )?;
    }
    add_busybox_applets(&mut a, &r.spec.name, scratch)?;

    let moddir = format!("usr/lib/modules/{}", layout.release);
    a.insert(&moddir, Node::Directory { perm: 0o755 })?;
    for m in modules.modules.values() {
        a.insert(
            &format!("{moddir}/{}", m.rel),
            Node::File {
                perm: 0o644,
                data: m.data.clone(),
            },
        )?;
    }
    a.insert(
        &format!("{moddir}/modules.dep"),
        Node::File {
            perm: 0o644,
            data: modules.modules_dep().into_bytes(),
        },
    )?;
    if let Some(b) = &layout.modules.builtin_file {
        a.insert(
            &format!("{moddir}/modules.builtin"),
            Node::File {
                perm: 0o644,
                data: b.clone(),
            },
        )?;
    }
    let mut load = String::new();
    for m in &modules.load {
        load.push_str(m);
        load.push('\n');
    }
    a.file("etc/vmm/modules", 0o644, load);
    a.file(
        "etc/vmm/image",
        0o644,
        format!("image={}\nkernel_release={}\n", r.spec.name, layout.release),
    );
    a.file("init", 0o755, &r.init);
    Ok(a)
}

#[cfg(test)]
mod tests;
