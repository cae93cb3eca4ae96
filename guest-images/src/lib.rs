//! Guest images built reproducibly from pinned Debian packages.
//!
//! * [`ImageStore::guest`]: kernel (`bzImage`, `vmlinux`) and initramfs of a guest profile
//!   (`"7.2"`, the default, from sid; `"6.12"` from trixie).
//! * [`ImageStore::host`]: kernel and initramfs of the nested-KVM host.
//! * [`ImageStore::build_all`]: every artifact with its sha256 (`vmm images build`).
//! * [`update_lock`]: re-pin every package to its suite's current version (`vmm images update`).
//! * [`cpio`]: the deterministic newc writer, also used by the VMM for its run-time archive.
//!
//! Inputs live next to this crate and are embedded in the binary: `images.lock` (every
//! package pinned by name, version, suite and sha256; see [`lock`]), `images.conf` (the
//! images, their init scripts, kernel modules, out-of-tree builds and programs), `init/*.sh`,
//! `guest-bin/*`, `programs/*.c` and `kbuild/*`.
//!
//! Cache layout (`$VMM_CACHE_DIR`, default `~/.cache/vmm`):
//!
//! ```text
//! debs/<sha256>.deb                    downloaded packages, content-addressed, verified
//! apt/<hash>/  apt.lock               private apt configuration (sources.list, lists/, cache/)
//! images/<image>-<input hash>/         one directory per built image, renamed into place
//!     bzImage  vmlinux  initramfs.cpio  image.info  SHA256SUMS
//! images/.tmp-*                        builds in progress (stale ones are removed)
//! ```
//!
//! The input hash covers the builder version, the image's pins, modules, init script and
//! programs, and the build root, `kbuild/` files and program sources of images that compile
//! kernel modules, selftests or programs (`src/kbuild.rs`), so changing any of them builds a
//! new directory. A warm cache does not touch the network.

pub mod cpio;
pub mod lock;
pub mod protocol;

mod apt;
mod build;
mod deb;
mod debver;
mod kbuild;
mod kernel;

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use build::{Artifact, GuestImage, HostImage, ImageStore, PinUpdate, update_lock};
pub use kernel::normalize_module;

/// The default guest profile.
pub const DEFAULT_PROFILE: &str = "7.2";

/// Environment variable naming the cache directory.
pub const CACHE_DIR_ENV: &str = "VMM_CACHE_DIR";

/// The lock file embedded at build time.
pub const EMBEDDED_LOCK: &str = include_str!("../images.lock");

/// The image list embedded at build time.
pub const EMBEDDED_CONF: &str = include_str!("../images.conf");

/// Init scripts by file name (as referenced from `images.conf`).
pub const INIT_SCRIPTS: &[(&str, &str)] = &[
    ("guest-init.sh", include_str!("../init/guest-init.sh")),
    ("host-init.sh", include_str!("../init/host-init.sh")),
];

/// Scripts installed into a guest's `/usr/bin` by `program =` lines of `images.conf`, by name
/// (files of `guest-images/guest-bin/`).
pub const GUEST_PROGRAMS: &[(&str, &str)] = &[(
    "vfio-selftests",
    include_str!("../guest-bin/vfio-selftests"),
)];

/// C programs of our own compiled static by an image's build root and installed into its
/// `/usr/bin` (`build-program =` lines of `images.conf`), by name (`guest-images/programs/
/// <name>.c`).
pub const BUILD_PROGRAMS: &[(&str, &str)] = &[("sva-test", include_str!("../programs/sva-test.c"))];

/// Errors of the image builder. Every message is one line and says what to do where possible.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Neither `$VMM_CACHE_DIR` nor `$HOME` is set.
    #[error("cannot find a cache directory: set VMM_CACHE_DIR (or HOME)")]
    NoCacheDir,
    /// The cache directory would be inside the source repository.
    #[error(
        "cache directory {0} is inside the repository; set VMM_CACHE_DIR to a directory outside it"
    )]
    CacheInRepository(PathBuf),
    /// A guest profile that `images.conf` does not define.
    #[error("unknown guest profile `{profile}` (available: {available})")]
    UnknownProfile {
        /// The requested profile.
        profile: String,
        /// Comma-separated list of defined profiles.
        available: String,
    },
    /// An image that `images.conf` does not define.
    #[error("image `{0}` is not defined in images.conf")]
    UnknownImage(String),
    /// `images.lock` syntax error.
    #[error("images.lock line {line}: {msg}")]
    LockSyntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// `images.conf` syntax error.
    #[error("images.conf line {line}: {msg}")]
    ConfSyntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// `images.conf` is inconsistent.
    #[error("images.conf: {0}")]
    Conf(String),
    /// A lock entry without version/sha256.
    #[error(
        "package {package} is in images.lock without a pinned version; run `vmm images update` to pin it"
    )]
    Unpinned {
        /// Package name.
        package: String,
    },
    /// A pinned version is no longer in the archive.
    #[error(
        "pinned package {package}={version} is no longer available in Debian {suite}; run `vmm images update` to re-pin"
    )]
    PinMissing {
        /// Package name.
        package: String,
        /// Pinned version.
        version: String,
        /// Suite of the pin.
        suite: String,
    },
    /// A downloaded package does not match its pinned digest.
    #[error(
        "sha256 mismatch for {package}={version}: images.lock pins {expected}, the archive served {actual}; run `vmm images update` if the change is expected"
    )]
    ShaMismatch {
        /// Package name.
        package: String,
        /// Pinned version.
        version: String,
        /// Digest in the lock.
        expected: String,
        /// Digest of the download.
        actual: String,
    },
    /// No Debian archive configured on this machine.
    #[error(
        "no Debian archive found in /etc/apt/sources.list or /etc/apt/sources.list.d; set VMM_DEBIAN_URI to the archive URI"
    )]
    NoArchiveUri,
    /// `vmm images update` found no package for a pattern.
    #[error(
        "no package matching `{pattern}` in Debian {suite}; fix its track pattern in images.lock"
    )]
    UpdateNoMatch {
        /// The track pattern.
        pattern: String,
        /// The suite searched.
        suite: String,
    },
    /// A host tool is missing.
    #[error("cannot run `{tool}`: {source} (install the `{package}` package)")]
    ToolMissing {
        /// Program name.
        tool: String,
        /// Debian package providing it.
        package: String,
        /// The spawn error.
        source: std::io::Error,
    },
    /// A host command failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line (without apt's `-o` options).
        command: String,
        /// Exit status and the last error line.
        detail: String,
    },
    /// The kernel packages of an image are not usable.
    #[error("{0}")]
    Kernel(String),
    /// The bzImage could not be decompressed.
    #[error("cannot extract vmlinux: {0}")]
    BzImage(String),
    /// A module is malformed or duplicated.
    #[error("kernel modules: {0}")]
    Module(String),
    /// A requested module does not exist.
    #[error("kernel module `{module}` not found in the {release} modules")]
    ModuleNotFound {
        /// Module name.
        module: String,
        /// Kernel release searched.
        release: String,
    },
    /// An image has no busybox.
    #[error("image {0} has no usr/bin/busybox; add busybox-static to it in images.lock")]
    NoBusybox(String),
    /// An archive error.
    #[error(transparent)]
    Cpio(#[from] cpio::Error),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

pub(crate) fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// A progress line: on a terminal it is printed, otherwise only logged.
pub(crate) fn progress(msg: &str) {
    if stderr_is_terminal() {
        eprintln!("guest-images: {msg}");
    } else {
        log::info!("{msg}");
    }
}

fn tool_package(tool: &str) -> &str {
    match tool {
        "dpkg-deb" => "dpkg",
        "xz" => "xz-utils",
        "apt-get" | "apt-cache" => "apt",
        t => t,
    }
}

/// Runs a command, returning its stdout. Unless `tolerate_failure`, a non-zero exit becomes an
/// error carrying the last error line of its stderr.
pub(crate) fn run_capture(cmd: &mut Command, tolerate_failure: bool) -> Result<Vec<u8>, Error> {
    let what = apt::describe(cmd);
    run_with(cmd, None, tolerate_failure, &mut |out| {
        let mut buf = Vec::new();
        out.read_to_end(&mut buf)
            .map_err(|e| Error::io(format!("reading the output of {what}"), e))?;
        Ok(buf)
    })
}

/// Runs a command with `input` on its stdin, returning its stdout (e.g. `xz -d -c`).
pub(crate) fn run_filter(
    cmd: &mut Command,
    input: &[u8],
    tolerate_failure: bool,
) -> Result<Vec<u8>, Error> {
    let what = apt::describe(cmd);
    run_with(cmd, Some(input), tolerate_failure, &mut |out| {
        let mut buf = Vec::new();
        out.read_to_end(&mut buf)
            .map_err(|e| Error::io(format!("reading the output of {what}"), e))?;
        Ok(buf)
    })
}

/// Runs a command, handing its stdout to `consume` as a stream; fails if the command fails.
pub(crate) fn run_streaming<T>(
    cmd: &mut Command,
    consume: &mut dyn FnMut(&mut dyn Read) -> Result<T, Error>,
) -> Result<T, Error> {
    run_with(cmd, None, false, consume)
}

pub(crate) fn run_with<T>(
    cmd: &mut Command,
    input: Option<&[u8]>,
    tolerate_failure: bool,
    consume: &mut dyn FnMut(&mut dyn Read) -> Result<T, Error>,
) -> Result<T, Error> {
    use std::io::Write;
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| spawn_error(cmd, e))?;
    let what = apt::describe(cmd);
    std::thread::scope(|scope| {
        // Feed stdin and drain stderr on threads so that no pipe can fill up and block the child.
        let mut stdin_pipe = child.stdin.take();
        let writer = scope.spawn(move || {
            if let (Some(p), Some(data)) = (stdin_pipe.as_mut(), input) {
                // A child that exits early closes the pipe; its exit status reports the problem.
                let _ = p.write_all(data);
            }
            drop(stdin_pipe);
        });
        let mut stderr_pipe = child.stderr.take();
        let err_reader = scope.spawn(move || {
            let mut buf = Vec::new();
            if let Some(p) = stderr_pipe.as_mut() {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        });
        let mut stdout = child.stdout.take();
        let result = match stdout.as_mut() {
            Some(out) => {
                let r = consume(out);
                // Drain what the consumer left (e.g. tar padding) so the child can finish.
                let _ = std::io::copy(out, &mut std::io::sink());
                r
            }
            None => Err(Error::io(
                format!("reading the output of {what}"),
                std::io::Error::other("no pipe"),
            )),
        };
        drop(stdout);
        let _ = writer.join();
        let status = child
            .wait()
            .map_err(|e| Error::io(format!("waiting for {what}"), e))?;
        let stderr = err_reader.join().unwrap_or_default();
        if !status.success() && !tolerate_failure {
            let text = String::from_utf8_lossy(&stderr);
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let last = lines
                .iter()
                .rev()
                .find(|l| l.starts_with("E:"))
                .or(lines.last())
                .map(|l| format!(": {l}"))
                .unwrap_or_default();
            return Err(Error::Command {
                command: what,
                detail: format!("{status}{last}"),
            });
        }
        result
    })
}

pub(crate) fn spawn_error(cmd: &Command, e: std::io::Error) -> Error {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::ToolMissing {
            package: tool_package(&tool).to_string(),
            tool,
            source: e,
        }
    } else {
        Error::io(format!("running {}", apt::describe(cmd)), e)
    }
}

/// Writes a file via a temporary sibling and a rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("renaming {}", tmp.display()), e))
}

/// sha256 of a file, as lowercase hex.
pub(crate) fn sha256_file(path: &Path) -> Result<String, Error> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
