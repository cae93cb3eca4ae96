//! Downloading pinned packages with a private apt configuration.
//!
//! The configuration lives in `<cache>/apt/<hash of sources.list>/`: a `sources.list` naming the
//! suites the lock needs, with the archive URI taken from this machine's own apt sources (or
//! `$VMM_DEBIAN_URI`), and private `lists/` and `cache/` directories. The system's package state
//! is never touched. `<cache>/apt.lock` serialises apt runs between processes.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::lock::Pin;
use crate::{Error, debver, run_capture, stderr_is_terminal};

/// Environment variable overriding the Debian archive URI.
pub const URI_ENV: &str = "VMM_DEBIAN_URI";

/// A Debian archive source derived from the host's apt configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ArchiveSource {
    pub uri: String,
    pub signed_by: Option<String>,
}

fn is_security(uri: &str, suites: &[&str]) -> bool {
    uri.trim_end_matches('/').ends_with("-security")
        || suites
            .iter()
            .all(|s| s.ends_with("-security") || s.contains('/'))
}

/// Finds the main Debian archive in deb822 `.sources` text.
pub(crate) fn source_from_deb822(text: &str) -> Option<ArchiveSource> {
    for stanza in text.split("\n\n") {
        let mut types = "";
        let mut uris = "";
        let mut suites = "";
        let mut signed_by = None;
        let mut enabled = true;
        for line in stanza.lines() {
            if line.starts_with('#') || line.starts_with(' ') || line.starts_with('\t') {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "types" => types = v,
                "uris" => uris = v,
                "suites" => suites = v,
                "signed-by" if v.starts_with('/') => signed_by = Some(v.to_string()),
                "enabled" => enabled = v != "no",
                _ => {}
            }
        }
        let suites: Vec<&str> = suites.split_whitespace().collect();
        if !enabled || !types.split_whitespace().any(|t| t == "deb") || suites.is_empty() {
            continue;
        }
        for uri in uris.split_whitespace() {
            if uri.starts_with("cdrom:") || is_security(uri, &suites) {
                continue;
            }
            return Some(ArchiveSource {
                uri: uri.to_string(),
                signed_by: signed_by.clone(),
            });
        }
    }
    None
}

/// Finds the main Debian archive in one-line `sources.list` text.
pub(crate) fn source_from_list(text: &str) -> Option<ArchiveSource> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        else {
            continue;
        };
        let mut rest = rest.trim();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, tail)) = opts.split_once(']') else {
                continue;
            };
            for opt in opts.split_whitespace() {
                if let Some(path) = opt.strip_prefix("signed-by=") {
                    signed_by = Some(path.to_string());
                }
            }
            rest = tail.trim();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        if uri.starts_with("cdrom:") || is_security(uri, &[suite]) {
            continue;
        }
        return Some(ArchiveSource {
            uri: uri.to_string(),
            signed_by,
        });
    }
    None
}

/// The archive URI: `$VMM_DEBIAN_URI`, else the first non-security Debian source configured in
/// `/etc/apt/sources.list.d/*.sources`, `/etc/apt/sources.list` or `sources.list.d/*.list`.
pub(crate) fn archive_source() -> Result<ArchiveSource, Error> {
    if let Some(uri) = std::env::var_os(URI_ENV).filter(|u| !u.is_empty()) {
        return Ok(ArchiveSource {
            uri: uri.to_string_lossy().into_owned(),
            signed_by: None,
        });
    }
    let dir = Path::new("/etc/apt/sources.list.d");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    entries.sort();
    for p in entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "sources"))
    {
        if let Some(s) = std::fs::read_to_string(p)
            .ok()
            .and_then(|t| source_from_deb822(&t))
        {
            return Ok(s);
        }
    }
    let lists = std::iter::once(PathBuf::from("/etc/apt/sources.list")).chain(
        entries
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "list"))
            .cloned(),
    );
    for p in lists {
        if let Some(s) = std::fs::read_to_string(&p)
            .ok()
            .and_then(|t| source_from_list(&t))
        {
            return Ok(s);
        }
    }
    Err(Error::NoArchiveUri)
}

/// A private apt configuration rooted at `<cache>/apt`.
#[derive(Debug)]
pub(crate) struct PrivateApt {
    root: PathBuf,
    sources: String,
}

impl PrivateApt {
    /// Prepares `<cache>/apt` for the given suites (does not touch the network).
    pub fn new(cache_dir: &Path, suites: &[String]) -> Result<Self, Error> {
        let src = archive_source()?;
        let opts = src
            .signed_by
            .as_ref()
            .map(|k| format!("[signed-by={k}] "))
            .unwrap_or_default();
        let mut sources = String::new();
        for s in suites {
            sources.push_str(&format!("deb {opts}{} {s} main\n", src.uri));
        }
        // One directory per sources.list, so that stores with different suites (or mirrors)
        // sharing a cache do not keep invalidating each other's lists.
        let digest = crate::hex(&<sha2::Sha256 as sha2::Digest>::digest(sources.as_bytes()));
        let root = cache_dir.join("apt").join(&digest[..16]);
        for d in ["lists/partial", "cache/archives/partial"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p)
                .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
        }
        let list = root.join("sources.list");
        if std::fs::read_to_string(&list).ok().as_deref() != Some(sources.as_str()) {
            crate::write_atomic(&list, sources.as_bytes())?;
        }
        Ok(Self { root, sources })
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let r = &self.root;
        c.arg("-o")
            .arg(format!(
                "Dir::Etc::sourcelist={}",
                r.join("sources.list").display()
            ))
            .args(["-o", "Dir::Etc::sourceparts=-"])
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", r.join("lists").display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", r.join("cache").display()))
            .args(["-o", "APT::Get::List-Cleanup=0"])
            .args(["-o", "Acquire::Languages=none"])
            .args([
                "-o",
                "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
            ])
            .args([
                "-o",
                "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false",
            ]);
        // As root, apt would drop to the `_apt` user for downloads, which cannot write into a
        // cache under root's home directory.
        if is_root() {
            c.args(["-o", "APT::Sandbox::User=root"]);
        }
        c.env("LC_ALL", "C");
        c
    }

    fn stamp(&self) -> PathBuf {
        self.root.join("lists.stamp")
    }

    /// Whether the package lists were fetched for the current `sources.list`.
    pub fn lists_current(&self) -> bool {
        std::fs::read_to_string(self.stamp()).ok().as_deref() == Some(self.sources.as_str())
    }

    /// `apt-get update` for the private configuration.
    pub fn update(&self) -> Result<(), Error> {
        log::info!("updating the private apt lists in {}", self.root.display());
        let mut cmd = self.command("apt-get");
        if !stderr_is_terminal() {
            cmd.arg("-q");
        }
        cmd.arg("update");
        run_progress(&mut cmd)?;
        crate::write_atomic(&self.stamp(), self.sources.as_bytes())
    }

    /// `apt-get download name=version ...` into `dest`.
    pub fn download(&self, specs: &[String], dest: &Path) -> Result<(), Error> {
        let mut cmd = self.command("apt-get");
        if !stderr_is_terminal() {
            cmd.arg("-q");
        }
        cmd.arg("download").args(specs).current_dir(dest);
        run_progress(&mut cmd)
    }

    /// `apt-cache madison`: `(package, version, suite)` for every binary version known.
    pub fn madison(&self, names: &[String]) -> Result<Vec<(String, String, String)>, Error> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = self.command("apt-cache");
        cmd.arg("madison").args(names);
        // madison exits non-zero when a name is unknown; partial output is still valid.
        let out = run_capture(&mut cmd, true)?;
        Ok(parse_madison(&String::from_utf8_lossy(&out)))
    }

    /// Package names starting with `prefix`.
    pub fn pkgnames(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let mut cmd = self.command("apt-cache");
        cmd.arg("pkgnames").arg(prefix);
        let out = run_capture(&mut cmd, true)?;
        let mut names: Vec<String> = String::from_utf8_lossy(&out)
            .lines()
            .map(str::to_string)
            .collect();
        names.sort();
        Ok(names)
    }
}

fn is_root() -> bool {
    // /proc/self/status "Uid:" line: real, effective, saved, fs.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Runs an apt command: on a terminal its progress goes to stderr; otherwise its output is
/// captured and only the error lines end up in the error message.
fn run_progress(cmd: &mut Command) -> Result<(), Error> {
    if stderr_is_terminal() {
        use std::os::fd::AsFd;
        let stderr = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicating stderr".to_string(), e))?;
        cmd.stdout(stderr);
        let status = cmd
            .status()
            .map_err(|e| Error::io(format!("running {}", describe(cmd)), e))?;
        if !status.success() {
            return Err(Error::Command {
                command: describe(cmd),
                detail: format!("{status} (see the messages above)"),
            });
        }
        Ok(())
    } else {
        run_capture(cmd, false).map(|_| ())
    }
}

pub(crate) fn describe(cmd: &Command) -> String {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .filter(|a| a != "-o" && !a.contains("::"))
        .collect();
    std::iter::once(prog)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn parse_madison(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        if cols.len() != 3 || !cols[2].ends_with("Packages") {
            continue;
        }
        // "<uri> <suite>/<component> <arch> Packages"
        let Some(suite) = cols[2]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.split('/').next())
        else {
            continue;
        };
        out.push((cols[0].to_string(), cols[1].to_string(), suite.to_string()));
    }
    out
}

/// `*`-wildcard match over the whole string.
pub(crate) fn glob_match(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Something that can put `.deb` files for pins into a directory.
pub(crate) trait Fetcher: Send + Sync {
    /// Downloads every pin (all resolved) into `dest`; returns the file of each, in order.
    fn fetch(
        &self,
        cache_dir: &Path,
        suites: &[String],
        pins: &[Pin],
        dest: &Path,
    ) -> Result<Vec<PathBuf>, Error>;
}

/// The real fetcher: `apt-get download` with the private configuration, `apt-get update` only
/// when the lists are missing or a pinned version cannot be found in them.
#[derive(Debug, Default)]
pub(crate) struct AptFetcher;

/// Finds the file apt downloaded for `name` (at `version`, if given) in `dir`
/// (`name_version_arch.deb`, the epoch's `:` written `%3a`). The version tells apart one
/// package pinned in two suites.
pub(crate) fn find_downloaded(dir: &Path, name: &str, version: Option<&str>) -> Option<PathBuf> {
    let prefix = match version {
        Some(v) => format!("{name}_{}_", v.replace(':', "%3a")),
        None => format!("{name}_"),
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&prefix) && f.ends_with(".deb"))
        })
        .collect();
    found.sort();
    found.pop()
}

impl Fetcher for AptFetcher {
    fn fetch(
        &self,
        cache_dir: &Path,
        suites: &[String],
        pins: &[Pin],
        dest: &Path,
    ) -> Result<Vec<PathBuf>, Error> {
        let apt = PrivateApt::new(cache_dir, suites)?;
        let mut updated = false;
        if !apt.lists_current() {
            apt.update()?;
            updated = true;
        }
        let specs: Vec<String> = pins.iter().map(Pin::spec).collect();
        if let Err(first) = apt.download(&specs, dest) {
            if updated {
                return Err(diagnose(&apt, pins).unwrap_or(first));
            }
            log::info!("download failed ({first}); refreshing the package lists and retrying");
            apt.update()?;
            if let Err(second) = apt.download(&specs, dest) {
                return Err(diagnose(&apt, pins).unwrap_or(second));
            }
        }
        pins.iter()
            .map(|p| {
                find_downloaded(dest, &p.name, p.version.as_deref()).ok_or_else(|| Error::Command {
                    command: "apt-get download".into(),
                    detail: format!("no .deb for {} was written", p.spec()),
                })
            })
            .collect()
    }
}

/// Turns a failed download into "pin X is gone" when the lists say so.
fn diagnose(apt: &PrivateApt, pins: &[Pin]) -> Option<Error> {
    let names: Vec<String> = pins.iter().map(|p| p.name.clone()).collect();
    missing_pin(pins, &apt.madison(&names).ok()?)
}

/// The first pin whose exact version is not among the `(package, version, suite)` rows.
pub(crate) fn missing_pin(pins: &[Pin], known: &[(String, String, String)]) -> Option<Error> {
    pins.iter().find_map(|p| {
        let version = p.version.as_deref()?;
        let present = known.iter().any(|(n, v, _)| *n == p.name && v == version);
        (!present).then(|| Error::PinMissing {
            package: p.name.clone(),
            version: version.to_string(),
            suite: p.suite.clone(),
        })
    })
}

/// The newest `(package, version)` matching `pattern` in `suite`.
pub(crate) fn resolve_newest(
    apt: &PrivateApt,
    pattern: &str,
    suite: &str,
) -> Result<(String, String), Error> {
    let names = if pattern.contains('*') {
        let prefix = pattern.split('*').next().unwrap_or("");
        apt.pkgnames(prefix)?
            .into_iter()
            .filter(|n| glob_match(pattern, n))
            .collect()
    } else {
        vec![pattern.to_string()]
    };
    apt.madison(&names)?
        .into_iter()
        .filter(|(_, _, s)| s == suite)
        .max_by(|a, b| debver::compare(&a.1, &b.1).then_with(|| b.0.cmp(&a.0)))
        .map(|(n, v, _)| (n, v))
        .ok_or_else(|| Error::UpdateNoMatch {
            pattern: pattern.to_string(),
            suite: suite.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_source_skips_security() {
        let text = "Types: deb\n# comment\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n\
                    Types: deb deb-src\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
        let s = source_from_deb822(text).unwrap();
        assert_eq!(s.uri, "http://mirror.example/debian");
        assert_eq!(
            s.signed_by.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
        assert!(
            source_from_deb822("Types: deb-src\nURIs: http://x/debian\nSuites: sid\n").is_none()
        );
        assert!(
            source_from_deb822("Types: deb\nURIs: http://x/debian\nSuites: sid\nEnabled: no\n")
                .is_none()
        );
    }

    #[test]
    fn list_source() {
        let text = "# deb http://old/debian buster main\n\
                    deb http://sec.example/debian-security bookworm-security main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib\n";
        let s = source_from_list(text).unwrap();
        assert_eq!(s.uri, "http://mirror.example/debian");
        assert_eq!(s.signed_by.as_deref(), Some("/k.gpg"));
        // Old-style security line "bookworm/updates".
        assert!(source_from_list("deb http://x/debian-security buster/updates main\n").is_none());
    }

    #[test]
    fn madison_parsing() {
        let text = " busybox-static | 1:1.38.0-3+b1 | http://m/debian sid/main amd64 Packages\n\
                     busybox-static | 1:1.37.0-6+b9 | http://m/debian trixie/main amd64 Packages\n\
                     busybox | 1:1.37.0-6 | http://m/debian trixie/main Sources\n\
                     linux-image-amd64 | 7.3.4-1~bpo13+1 | http://m/debian trixie-backports/main amd64 Packages\n";
        let rows = parse_madison(text);
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[1],
            (
                "busybox-static".into(),
                "1:1.37.0-6+b9".into(),
                "trixie".into()
            )
        );
        assert_eq!(rows[2].2, "trixie-backports");
    }

    #[test]
    fn globbing() {
        assert!(glob_match(
            "linux-binary-7.2.*+deb14-amd64",
            "linux-binary-7.2.13+deb14-amd64"
        ));
        assert!(!glob_match(
            "linux-binary-7.2.*+deb14-amd64",
            "linux-binary-7.3.1+deb14-amd64"
        ));
        assert!(!glob_match(
            "linux-binary-7.2.*+deb14-amd64",
            "linux-binary-7.2.13+deb14-amd64-dbg"
        ));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*b*c", "ac"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    #[test]
    fn finds_downloads_by_name_and_version() {
        let dir = std::env::temp_dir().join(format!("guest-images-dl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "libc6_2.41-12+deb13u5_amd64.deb",
            "libc6_2.43-7_amd64.deb",
            "libc6-dev_2.43-7_amd64.deb",
            "zlib1g_1%3a1.3.dfsg+really1.3.2-4_amd64.deb",
        ] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        let found = |n: &str, v: Option<&str>| {
            find_downloaded(&dir, n, v)
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        };
        assert_eq!(
            found("libc6", Some("2.41-12+deb13u5")).as_deref(),
            Some("libc6_2.41-12+deb13u5_amd64.deb")
        );
        assert_eq!(
            found("libc6", Some("2.43-7")).as_deref(),
            Some("libc6_2.43-7_amd64.deb")
        );
        assert_eq!(
            found("zlib1g", Some("1:1.3.dfsg+really1.3.2-4")).as_deref(),
            Some("zlib1g_1%3a1.3.dfsg+really1.3.2-4_amd64.deb")
        );
        assert_eq!(found("libc6", Some("2.40-1")), None);
        assert_eq!(
            found("libc6-dev", None).as_deref(),
            Some("libc6-dev_2.43-7_amd64.deb")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn describe_hides_apt_options() {
        let mut c = Command::new("apt-get");
        c.args(["-o", "Dir::Cache=/x", "download", "a=1"]);
        assert_eq!(describe(&c), "apt-get download a=1");
    }
}
