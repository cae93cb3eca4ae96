//! The lock file (`images.lock`: pinned Debian packages) and the image list (`images.conf`).
//!
//! `images.lock` has one package per line, whitespace-separated columns:
//!
//! ```text
//! <package> <version> <suite> <sha256> <images> [<track>]
//! ```
//!
//! * `package`: exact Debian binary package name; `version`: exact Debian version; `suite`:
//!   the suite it is downloaded from (`sid`, `trixie`, ...); `sha256`: digest of the `.deb`.
//!   `version` and `sha256` may be `-` for a package added by hand and not resolved yet
//!   (`vmm images update` fills them in; building refuses unresolved pins).
//! * `images`: comma-separated images that contain the package (`guest-7.2`, `host`, ...).
//! * `track` (optional): the package-name pattern (`*` matches anything) that `vmm images update`
//!   resolves to the newest matching package of the suite; defaults to the package name. Kernel
//!   packages carry their ABI in the name, so their pattern has a `*` where the version goes.
//!
//! A package may appear once per suite (a build root's sid `libc6` next to the guests' trixie
//! `libc6`). `#` starts a comment. Comments and blank lines are kept when the file is rewritten.
//!
//! `images.conf` lists the images: a `[name]` section per image (`guest-<profile>` for guest
//! profiles, `host` for the nested-KVM host) with `init = <script in init/>` and any number of
//! `module = <name> [<name>...]` lines (kernel modules loaded at boot; dependencies are added
//! automatically), `extra-module =` (carried, loaded on request), `build-root = <set>` with
//! `build-module = <source.c | driver-dir/>` / `build-selftest = <suite>/<test>` (compiled from the kernel
//! source by the lock's packages of that set), `build-program = <name>` (our own C program
//! `programs/<name>.c`, compiled static by that set's compiler) and
//! `program = <guest-bin script>`.

use std::fmt::Write as _;

use crate::Error;

/// One pinned package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// Debian binary package name.
    pub name: String,
    /// Exact version, `None` if not resolved yet.
    pub version: Option<String>,
    /// Suite to download from.
    pub suite: String,
    /// sha256 of the `.deb`, `None` if not resolved yet.
    pub sha256: Option<String>,
    /// Images containing this package.
    pub images: Vec<String>,
    /// Name pattern for `vmm images update`, if different from the name.
    pub track: Option<String>,
}

impl Pin {
    /// The pattern `vmm images update` resolves.
    pub fn pattern(&self) -> &str {
        self.track.as_deref().unwrap_or(&self.name)
    }

    /// `name=version` (or just `name` if unresolved).
    pub fn spec(&self) -> String {
        match &self.version {
            Some(v) => format!("{}={v}", self.name),
            None => self.name.clone(),
        }
    }

    /// Version and sha256, or an error telling the user to run `vmm images update`.
    pub fn resolved(&self) -> Result<(&str, &str), Error> {
        match (&self.version, &self.sha256) {
            (Some(v), Some(s)) => Ok((v, s)),
            _ => Err(Error::Unpinned {
                package: self.name.clone(),
            }),
        }
    }

    /// Canonical one-line description used in the image input hash.
    pub(crate) fn fingerprint(&self) -> String {
        format!(
            "{} {} {} {}",
            self.name,
            self.version.as_deref().unwrap_or("-"),
            self.suite,
            self.sha256.as_deref().unwrap_or("-")
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    Text(String),
    Pin(usize),
}

/// A parsed lock file; rewriting it keeps comments and order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    lines: Vec<Line>,
    pins: Vec<Pin>,
}

fn valid_name(s: &str, extra: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|c| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || b"+.-".contains(&c)
                || extra.as_bytes().contains(&c)
        })
}

fn valid_version(s: &str) -> bool {
    !s.is_empty()
        && s.as_bytes()[0].is_ascii_digit()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".+~:-".contains(&c))
}

fn valid_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

impl Lock {
    /// Parses lock-file text.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut lines = Vec::new();
        let mut pins: Vec<Pin> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let lineno = i + 1;
            let err = |msg: String| Error::LockSyntax { line: lineno, msg };
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                lines.push(Line::Text(raw.to_string()));
                continue;
            }
            let cols: Vec<&str> = content.split_whitespace().collect();
            if !(5..=6).contains(&cols.len()) {
                return Err(err(format!(
                    "expected `package version suite sha256 images [track]`, found {} columns",
                    cols.len()
                )));
            }
            let name = cols[0];
            if !valid_name(name, "") {
                return Err(err(format!("invalid package name `{name}`")));
            }
            let version = match cols[1] {
                "-" => None,
                v if valid_version(v) => Some(v.to_string()),
                v => return Err(err(format!("invalid version `{v}` for {name}"))),
            };
            let suite = cols[2];
            if !valid_name(suite, "") {
                return Err(err(format!("invalid suite `{suite}` for {name}")));
            }
            let sha256 = match cols[3] {
                "-" => None,
                s if valid_sha256(s) => Some(s.to_string()),
                s => {
                    return Err(err(format!(
                        "invalid sha256 `{s}` for {name} (64 lowercase hex digits)"
                    )));
                }
            };
            if version.is_some() != sha256.is_some() {
                return Err(err(format!(
                    "{name}: version and sha256 must both be set or both be `-`"
                )));
            }
            let images: Vec<String> = cols[4].split(',').map(str::to_string).collect();
            if images.iter().any(|s| !valid_name(s, "")) {
                return Err(err(format!("invalid image list `{}` for {name}", cols[4])));
            }
            let track = match cols.get(5) {
                None => None,
                Some(t) if valid_name(t, "*") => (*t != name).then(|| t.to_string()),
                Some(t) => return Err(err(format!("invalid track pattern `{t}` for {name}"))),
            };
            // A package may be pinned once per suite: the guest's userland (trixie) and a build
            // root (sid) can both need e.g. libc6.
            if pins.iter().any(|p| p.name == name && p.suite == suite) {
                return Err(err(format!("package {name} is listed twice for {suite}")));
            }
            lines.push(Line::Pin(pins.len()));
            pins.push(Pin {
                name: name.to_string(),
                version,
                suite: suite.to_string(),
                sha256,
                images,
                track,
            });
        }
        Ok(Self { lines, pins })
    }

    /// Every pinned package, in file order.
    pub fn pins(&self) -> &[Pin] {
        &self.pins
    }

    /// Mutable access for `vmm images update`.
    pub(crate) fn pins_mut(&mut self) -> &mut [Pin] {
        &mut self.pins
    }

    /// The packages of one image, in file order.
    pub fn pins_for(&self, image: &str) -> Vec<Pin> {
        self.pins
            .iter()
            .filter(|p| p.images.iter().any(|i| i == image))
            .cloned()
            .collect()
    }

    /// The suites any pin needs, sorted.
    pub fn suites(&self) -> Vec<String> {
        let mut s: Vec<String> = self.pins.iter().map(|p| p.suite.clone()).collect();
        s.sort();
        s.dedup();
        s
    }

    /// Serialises the lock, aligning the columns and keeping comments.
    pub fn render(&self) -> String {
        let rows: Vec<[String; 6]> = self
            .pins
            .iter()
            .map(|p| {
                [
                    p.name.clone(),
                    p.version.clone().unwrap_or_else(|| "-".into()),
                    p.suite.clone(),
                    p.sha256.clone().unwrap_or_else(|| "-".into()),
                    p.images.join(","),
                    p.track.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let mut widths = [0usize; 6];
        for row in &rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.len());
            }
        }
        let mut out = String::new();
        for line in &self.lines {
            match line {
                Line::Text(t) => out.push_str(t),
                Line::Pin(i) => {
                    let mut l = String::new();
                    for (c, (cell, w)) in rows[*i].iter().zip(widths).enumerate() {
                        if c > 0 {
                            l.push_str("  ");
                        }
                        let _ = write!(l, "{cell:<w$}");
                    }
                    out.push_str(l.trim_end());
                }
            }
            out.push('\n');
        }
        out
    }
}

/// One image described by `images.conf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Image name (`guest-7.2`, `host`).
    pub name: String,
    /// Init script file name (under `guest-images/init/`).
    pub init: String,
    /// Kernel modules to load at boot, in order.
    pub modules: Vec<String>,
    /// Kernel modules carried in the image (and in its `modules.dep`) but loaded only on
    /// request (`extra-module =`).
    pub extra_modules: Vec<String>,
    /// The lock-file set (the name in the images column) of the build root that compiles
    /// `build_modules` and `build_selftests` (`build-root =`).
    pub build_root: Option<String>,
    /// Kernel module sources, relative to the kernel source tree, built out of tree and carried
    /// like `extra_modules` (`build-module = drivers/dma/dmatest.c`).
    pub build_modules: Vec<String>,
    /// Kernel selftests built into `/usr/bin`, as `<suite>/<test>` under
    /// `tools/testing/selftests/` (`build-selftest = vfio/vfio_pci_device_test`).
    pub build_selftests: Vec<String>,
    /// C programs of `guest-images/programs/` (`<name>.c`) compiled static by the build root
    /// and installed into `/usr/bin` (`build-program = sva-test`).
    pub build_programs: Vec<String>,
    /// Scripts of `guest-images/guest-bin/` installed into `/usr/bin` (`program =`).
    pub programs: Vec<String>,
}

impl ImageSpec {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            init: String::new(),
            modules: Vec::new(),
            extra_modules: Vec::new(),
            build_root: None,
            build_modules: Vec::new(),
            build_selftests: Vec::new(),
            build_programs: Vec::new(),
            programs: Vec::new(),
        }
    }

    /// Whether the image compiles anything with its build root.
    pub fn builds(&self) -> bool {
        self.needs_source() || !self.build_programs.is_empty()
    }

    /// Whether the image compiles anything from the kernel source (modules, selftests); our
    /// own programs (`build-program`) need only the build root's compiler and libc.
    pub fn needs_source(&self) -> bool {
        !self.build_modules.is_empty() || !self.build_selftests.is_empty()
    }
}

fn valid_module_name(m: &str) -> bool {
    !m.is_empty()
        && m.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// A relative path of plain components (`a/b_c-1.d`), no `.`/`..`.
fn valid_rel_path(p: &str) -> bool {
    !p.is_empty()
        && p.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.+".contains(&b))
        })
}

/// Parses `images.conf`.
pub fn parse_images_conf(text: &str) -> Result<Vec<ImageSpec>, Error> {
    let mut specs: Vec<ImageSpec> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        let err = |msg: String| Error::ConfSyntax { line: lineno, msg };
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            if !valid_name(name, "") {
                return Err(err(format!("invalid image name `{name}`")));
            }
            if specs.iter().any(|s| s.name == name) {
                return Err(err(format!("image `{name}` is defined twice")));
            }
            specs.push(ImageSpec::new(name));
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(err(format!(
                "expected `key = value` or `[image]`, found `{line}`"
            )));
        };
        let Some(spec) = specs.last_mut() else {
            return Err(err("setting outside an `[image]` section".into()));
        };
        let value = value.trim();
        match key.trim() {
            "init" => spec.init = value.to_string(),
            k @ ("module" | "modules" | "extra-module") => {
                for m in value.split_whitespace() {
                    if !valid_module_name(m) {
                        return Err(err(format!("invalid module name `{m}`")));
                    }
                    match k {
                        "extra-module" => spec.extra_modules.push(m.to_string()),
                        _ => spec.modules.push(m.to_string()),
                    }
                }
            }
            "build-root" => {
                if !valid_name(value, "") {
                    return Err(err(format!("invalid build root name `{value}`")));
                }
                spec.build_root = Some(value.to_string());
            }
            "build-module" => {
                for m in value.split_whitespace() {
                    // A source file (one-file module), or a driver directory ending in `/`
                    // built with its own Makefile (module = the directory's name).
                    let ok = match m.strip_suffix('/') {
                        Some(dir) => valid_rel_path(dir),
                        None => valid_rel_path(m) && m.ends_with(".c"),
                    };
                    if !ok {
                        return Err(err(format!(
                            "`{m}` is not a kernel source file like drivers/dma/dmatest.c or a \
                             driver directory like drivers/infiniband/hw/vmw_pvrdma/"
                        )));
                    }
                    spec.build_modules.push(m.to_string());
                }
            }
            "build-selftest" => {
                for t in value.split_whitespace() {
                    if !valid_rel_path(t) || t.split('/').count() != 2 {
                        return Err(err(format!(
                            "`{t}` is not a selftest like vfio/vfio_pci_device_test"
                        )));
                    }
                    spec.build_selftests.push(t.to_string());
                }
            }
            k @ ("program" | "build-program") => {
                for p in value.split_whitespace() {
                    if !valid_rel_path(p) || p.contains('/') {
                        return Err(err(format!("invalid program name `{p}`")));
                    }
                    let list = match k {
                        "build-program" => &mut spec.build_programs,
                        _ => &mut spec.programs,
                    };
                    if list.iter().any(|q| q == p) {
                        return Err(err(format!("program `{p}` is listed twice")));
                    }
                    list.push(p.to_string());
                }
            }
            k => {
                return Err(err(format!(
                    "unknown key `{k}` (expected init, module, extra-module, build-root, \
                     build-module, build-selftest, build-program or program)"
                )));
            }
        }
    }
    if let Some(s) = specs.iter().find(|s| s.builds() && s.build_root.is_none()) {
        return Err(Error::Conf(format!(
            "image `{}` builds modules, selftests or programs but has no `build-root =` line",
            s.name
        )));
    }
    if let Some(s) = specs.iter().find(|s| s.init.is_empty()) {
        return Err(Error::Conf(format!(
            "image `{}` has no `init =` line",
            s.name
        )));
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "598a3fd92bdafc34cd81196b2952ad36e910e47a4ecf162f8ce5e8e262598e53";

    #[test]
    fn parses_and_renders() {
        let text = format!(
            "# header\n\
             busybox-static 1:1.37.0-6+b9 trixie {SHA} guest-7.2,host\n\
             \n\
             # kernel\n\
             linux-binary-7.2.13+deb14-amd64   7.2.13-1  sid {SHA}  guest-7.2 linux-binary-7.2.*+deb14-amd64\n\
             extra-tool - sid - guest-7.2 # added by hand\n"
        );
        let lock = Lock::parse(&text).unwrap();
        assert_eq!(lock.pins().len(), 3);
        let bb = &lock.pins()[0];
        assert_eq!(bb.version.as_deref(), Some("1:1.37.0-6+b9"));
        assert_eq!(bb.images, ["guest-7.2", "host"]);
        assert_eq!(bb.pattern(), "busybox-static");
        assert_eq!(bb.spec(), "busybox-static=1:1.37.0-6+b9");
        let k = &lock.pins()[1];
        assert_eq!(k.pattern(), "linux-binary-7.2.*+deb14-amd64");
        assert!(matches!(
            lock.pins()[2].resolved(),
            Err(Error::Unpinned { .. })
        ));
        assert_eq!(lock.pins_for("host").len(), 1);
        assert_eq!(lock.pins_for("guest-7.2").len(), 3);
        assert_eq!(lock.suites(), ["sid", "trixie"]);

        let rendered = lock.render();
        assert!(rendered.starts_with("# header\n"));
        assert!(rendered.contains("\n# kernel\n"));
        // Rendering is a fixed point and parses back to the same pins.
        let again = Lock::parse(&rendered).unwrap();
        assert_eq!(again.pins(), lock.pins());
        assert_eq!(again.render(), rendered);
    }

    #[test]
    fn reports_errors_with_line_numbers() {
        let e = Lock::parse("# c\nfoo 1.0 sid\n").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = Lock::parse(&format!("foo 1.0 sid {} g\n", &SHA[1..]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid sha256"), "{e}");
        let e = Lock::parse("foo 1.0 sid - g\n").unwrap_err().to_string();
        assert!(e.contains("both"), "{e}");
        let e = Lock::parse(&format!("foo 1.0 sid {SHA} g\nfoo 1.0 sid {SHA} g\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice") && e.contains("line 2"), "{e}");
        // Once per suite is fine.
        let two = Lock::parse(&format!("foo 1.0 sid {SHA} g\nfoo 0.9 trixie {SHA} h\n")).unwrap();
        assert_eq!(two.pins_for("g")[0].version.as_deref(), Some("1.0"));
        assert_eq!(two.pins_for("h")[0].suite, "trixie");
        let e = Lock::parse(&format!("Foo 1.0 sid {SHA} g\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid package name"), "{e}");
    }

    #[test]
    fn images_conf() {
        let specs = parse_images_conf(
            "# c\n[guest-7.2]\ninit = guest-init.sh\nmodule = cxl_pci\nmodule = dax kvm-amd # x\n\n[host]\ninit=host-init.sh\n",
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].modules, ["cxl_pci", "dax", "kvm-amd"]);
        assert_eq!(specs[1].init, "host-init.sh");
        assert!(parse_images_conf("module = x\n").is_err());
        assert!(parse_images_conf("[a]\nfoo = x\n").is_err());
        assert!(parse_images_conf("[a]\nmodule = x\n").is_err());
    }

    #[test]
    fn images_conf_build_keys() {
        let specs = parse_images_conf(
            "[g]\ninit = i\nextra-module = vfio-pci vfio_iommu_type1\nbuild-root = kb-1\n\
             build-module = drivers/dma/dmatest.c drivers/infiniband/hw/vmw_pvrdma/\n\
             build-selftest = vfio/a_test vfio/b\n\
             program = tool\nbuild-program = sva-test\n",
        )
        .unwrap();
        let g = &specs[0];
        assert!(g.modules.is_empty());
        assert_eq!(g.extra_modules, ["vfio-pci", "vfio_iommu_type1"]);
        assert_eq!(g.build_root.as_deref(), Some("kb-1"));
        assert_eq!(
            g.build_modules,
            ["drivers/dma/dmatest.c", "drivers/infiniband/hw/vmw_pvrdma/"]
        );
        assert_eq!(g.build_selftests, ["vfio/a_test", "vfio/b"]);
        assert_eq!(g.programs, ["tool"]);
        assert_eq!(g.build_programs, ["sva-test"]);
        assert!(g.builds());
        assert!(g.needs_source());
        // A program alone needs the build root's compiler, not the kernel source.
        let p = parse_images_conf("[p]\ninit = i\nbuild-root = kb\nbuild-program = sva-test\n")
            .unwrap()
            .remove(0);
        assert!(p.builds() && !p.needs_source());
        for bad in [
            "build-module = ../x.c",
            "build-module = drivers/dma/dmatest.h",
            "build-module = drivers//x/",
            "build-module = /",
            "build-selftest = vfio",
            "build-selftest = a/b/c",
            "program = a/b",
            "build-program = a/b",
            "build-program = x x",
            "extra-module = a.b",
        ] {
            let text = format!("[g]\ninit = i\nbuild-root = r\n{bad}\n");
            assert!(parse_images_conf(&text).is_err(), "{bad}");
        }
        let e = parse_images_conf("[g]\ninit = i\nbuild-module = a.c\n").unwrap_err();
        assert!(e.to_string().contains("build-root"), "{e}");
        let e = parse_images_conf("[g]\ninit = i\nbuild-program = p\n").unwrap_err();
        assert!(e.to_string().contains("build-root"), "{e}");
    }
}
