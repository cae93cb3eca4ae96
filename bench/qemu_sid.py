#!/usr/bin/env python3
"""The newest Debian QEMU (from sid) for the benchmarks, run from the cache, never installed.

The benches compare our VMM with QEMU; besides the machine's QEMU they also run Debian sid's
qemu-system-x86. Its packages are pinned in bench/qemu-sid.lock (package, version, arch, size,
sha256 of the .deb): qemu-system-x86 and the closure of its Depends and Pre-Depends (no
Recommends/Suggests), which includes qemu-system-common, qemu-system-data, seabios, ipxe-qemu
and every shared library down to sid's libc6. A sid libc does not fit an older machine, so the
packages are unpacked (dpkg-deb -x, nothing is configured or installed) into a "newer-suite
root", and a wrapper script runs the root's qemu-system-x86_64 through the root's own dynamic
loader, with the root's libraries, modules and firmware:

  $VMM_CACHE_DIR (default ~/.cache/vmm)/
    debs/<sha256>.deb                  downloaded packages, content-addressed, verified
                                       (shared with the guest images, see guest-images/src/lib.rs)
    apt/<hash>/                        private apt configuration (sources.list, lists/, cache/)
    apt.lock                           serialises apt runs and debs/ between processes
    qemu-sid/<hash of lock>/
      root/                            the unpacked packages
      qemu-system-x86_64               the wrapper: takes qemu-system-x86_64's arguments
      stamp                            written last: the root is complete and was checked

The wrapper holds absolute paths only, so it also works inside the nested host, which mounts
this machine's / read-only at the same paths; nothing outside the root is used at run time but
the kernel: the loader runs with --inhibit-cache and a library path inside the root, and
QEMU, which finds its data, firmware and module directories relative to /proc/self/exe (the
loader), finds them through <loader dir>/qemu-bundle -> the root (QEMU's relocation hook;
QEMU_MODULE_DIR is set too). Building checks that every library of QEMU and its modules
resolves inside the root and that `-L help` lists only directories inside it.

Packages come from the Debian archive this machine's apt uses (or $VMM_DEBIAN_URI), through a
private apt configuration (own sources.list naming sid, own lists and cache, an empty dpkg
status): the machine's package state is never touched. Superseded versions disappear from sid;
then fetching fails with a message naming the package and the fix:
`python3 bench/qemu_sid.py --update-lock` (re-resolves the closure against today's sid and
rewrites the lock; commit the new lock).

Dependencies that only serve maintainer scripts are not followed (SKIP_DEPS below: libibverbs1
depends on a systemd-sysusers provider to create a group at configure time, which would drag in
systemd); nothing here is ever configured.

Use from a bench:   sys.path.insert(0, os.path.dirname(__file__)); import qemu_sid
                    qemu = qemu_sid.ensure_qemu_sid(log=...)   # path of the wrapper
CLI:  python3 bench/qemu_sid.py                 ensure, print the wrapper and its --version
      python3 bench/qemu_sid.py --print-path    ensure, print only the wrapper path (stdout)
      python3 bench/qemu_sid.py --check         ensure, check q35/microvm/cxl-type3 are there
      python3 bench/qemu_sid.py --smoke-boot [KERNEL]   short TCG boot to the kernel banner
      python3 bench/qemu_sid.py --update-lock   re-pin bench/qemu-sid.lock to today's sid
Progress goes to stderr; errors are one line naming the fix (exit status 1).
"""

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LOCK_FILE = os.path.join(HERE, "qemu-sid.lock")
SUITE = "sid"
ARCH = "amd64"
MULTIARCH = "x86_64-linux-gnu"
# Top-level packages of the root; everything else is their Depends/Pre-Depends closure.
ROOT_PACKAGES = ["qemu-system-x86"]
# Dependency groups naming any of these are not followed: they serve maintainer scripts only
# (creating users/groups, debconf questions), and nothing in the root is ever configured.
SKIP_DEPS = {
    "systemd-sysusers", "systemd", "systemd-standalone-sysusers", "opensysusers",
    "debconf", "debconf-2.0", "cdebconf", "adduser", "passwd",
}
# Bump when the root layout or the wrapper changes: a new directory gets built.
FORMAT = "1"
UPDATE_CMD = "python3 bench/qemu_sid.py --update-lock"
DEBIAN_URI_ENV = "VMM_DEBIAN_URI"


class QemuSidError(Exception):
    """Something that keeps the sid QEMU from being provided; str() is one line with the fix."""


# ---------------------------------------------------------------------------------------------
# Cache and lock file

def default_cache_dir():
    """$VMM_CACHE_DIR, else $HOME/.cache/vmm (as guest-images and vmm resolve it)."""
    d = os.environ.get("VMM_CACHE_DIR")
    if d:
        return d
    home = os.environ.get("HOME")
    if not home:
        raise QemuSidError("no cache directory: set VMM_CACHE_DIR or HOME")
    return os.path.join(home, ".cache", "vmm")


class Pin:
    __slots__ = ("name", "version", "arch", "size", "sha256")

    def __init__(self, name, version, arch, size, sha256):
        self.name, self.version, self.arch = name, version, arch
        self.size, self.sha256 = int(size), sha256

    def line(self):
        return f"{self.name} {self.version} {self.arch} {self.size} {self.sha256}"


def read_lock(path=None):
    """The pins of the lock file (default: bench/qemu-sid.lock), in file order."""
    path = path or LOCK_FILE
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise QemuSidError(f"cannot read {path}: {e.strerror}; run {UPDATE_CMD}") from None
    pins = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        cols = line.split()
        if (len(cols) != 5 or not cols[3].isdigit()
                or not re.fullmatch(r"[0-9a-f]{64}", cols[4])):
            raise QemuSidError(
                f"{path} line {n}: expected `package version arch size sha256`; run {UPDATE_CMD}")
        pins.append(Pin(*cols))
    if not any(p.name == "qemu-system-x86" for p in pins):
        raise QemuSidError(f"{path} pins no qemu-system-x86; run {UPDATE_CMD}")
    return pins


def lock_key(pins):
    """Names the root directory: the pins (not the comments) and FORMAT."""
    h = hashlib.sha256(f"format {FORMAT}\n".encode())
    for p in pins:
        h.update((p.line() + "\n").encode())
    return h.hexdigest()[:16]


def qemu_version_of(pins):
    """Upstream version of the pinned qemu-system-x86 (1:11.1.3+ds-1 -> 11.1.3)."""
    v = next(p.version for p in pins if p.name == "qemu-system-x86")
    v = v.split(":", 1)[-1].rsplit("-", 1)[0]
    return re.split(r"[+~]", v)[0]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FileLock:
    """flock on a file (the Rust side's File::lock is flock too, so they exclude each other)."""

    def __init__(self, path, log, what):
        self.path, self.log, self.what = path, log, what

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.f = open(self.path, "a")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log(f"qemu-sid: waiting for another process using {self.what}")
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()


# ---------------------------------------------------------------------------------------------
# Private apt configuration (the same layout as guest-images/src/apt.rs)

def _source_from_deb822(text):
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith(("#", " ", "\t")) or ":" not in line:
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
        suites = fields.get("suites", "").split()
        if (fields.get("enabled", "yes") == "no" or "deb" not in fields.get("types", "").split()
                or not suites):
            continue
        for uri in fields.get("uris", "").split():
            if uri.startswith("cdrom:") or _is_security(uri, suites):
                continue
            signed = fields.get("signed-by")
            return uri, (signed if signed and signed.startswith("/") else None)
    return None


def _source_from_list(text):
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"deb\s+(?:\[([^\]]*)\]\s*)?(\S+)\s+(\S+)", line)
        if not m:
            continue
        signed = None
        for opt in (m.group(1) or "").split():
            if opt.startswith("signed-by="):
                signed = opt[len("signed-by="):]
        if m.group(2).startswith("cdrom:") or _is_security(m.group(2), [m.group(3)]):
            continue
        return m.group(2), signed
    return None


def _is_security(uri, suites):
    return (uri.rstrip("/").endswith("-security")
            or all(s.endswith("-security") or "/" in s for s in suites))


def archive_source():
    """(uri, signed-by or None): $VMM_DEBIAN_URI, else the machine's main Debian source."""
    if os.environ.get(DEBIAN_URI_ENV):
        return os.environ[DEBIAN_URI_ENV], None
    d = "/etc/apt/sources.list.d"
    try:
        entries = sorted(os.path.join(d, e) for e in os.listdir(d))
    except OSError:
        entries = []
    for p in (e for e in entries if e.endswith(".sources")):
        try:
            with open(p) as f:
                s = _source_from_deb822(f.read())
        except OSError:
            continue
        if s:
            return s
    for p in ["/etc/apt/sources.list"] + [e for e in entries if e.endswith(".list")]:
        try:
            with open(p) as f:
                s = _source_from_list(f.read())
        except OSError:
            continue
        if s:
            return s
    raise QemuSidError("no Debian archive found in /etc/apt/sources.list(.d); "
                       f"set {DEBIAN_URI_ENV}=http://deb.debian.org/debian")


class PrivateApt:
    """apt with its own sources.list (sid only), lists, cache and an empty dpkg status."""

    def __init__(self, cache_dir, log):
        self.log = log
        uri, signed = archive_source()
        opts = f"[signed-by={signed}] " if signed else ""
        self.sources = f"deb {opts}{uri} {SUITE} main\n"
        digest = hashlib.sha256(self.sources.encode()).hexdigest()
        self.root = os.path.join(cache_dir, "apt", digest[:16])
        for d in ("lists/partial", "cache/archives/partial"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        self._write_if_changed("sources.list", self.sources)
        self._write_if_changed("status.empty", "")

    def _write_if_changed(self, name, text):
        path = os.path.join(self.root, name)
        try:
            with open(path) as f:
                if f.read() == text:
                    return
        except OSError:
            pass
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def _cmd(self, program, *args):
        r = self.root
        c = [program,
             "-o", f"Dir::Etc::sourcelist={r}/sources.list",
             "-o", "Dir::Etc::sourceparts=-",
             "-o", f"Dir::State::Lists={r}/lists",
             "-o", f"Dir::Cache={r}/cache",
             "-o", f"Dir::State::status={r}/status.empty",
             "-o", f"APT::Architectures={ARCH}",
             "-o", f"APT::Architecture={ARCH}",
             "-o", "APT::Get::List-Cleanup=0",
             "-o", "Acquire::Languages=none",
             "-o", "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
             "-o", "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"]
        if os.geteuid() == 0:
            # As root, apt drops to `_apt` for downloads, which cannot write under ~root.
            c += ["-o", "APT::Sandbox::User=root"]
        return c + list(args)

    def run(self, program, *args, cwd=None, check=True):
        cmd = self._cmd(program, *args)
        env = dict(os.environ, LC_ALL="C")
        try:
            p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise QemuSidError(f"cannot run {program}: {e.strerror}; "
                               "this needs apt (a Debian-based machine)") from None
        if check and p.returncode != 0:
            err = [l for l in p.stderr.splitlines() if l.strip()]
            detail = "; ".join(err[-3:]) or f"exit status {p.returncode}"
            sub = next((a for a in args if not a.startswith("-")), "")
            raise QemuSidError(f"{program} {sub} failed: {detail}")
        return p

    def lists_current(self):
        try:
            with open(os.path.join(self.root, "lists.stamp")) as f:
                return f.read() == self.sources
        except OSError:
            return False

    def update(self):
        self.log(f"qemu-sid: updating the private apt lists for {SUITE} in {self.root}")
        self.run("apt-get", "-q", "update")
        self._write_if_changed("lists.stamp", self.sources)

    def versions(self, names):
        """{(name, version)} known to the lists (apt-cache madison)."""
        p = self.run("apt-cache", "madison", *names, check=False)
        out = set()
        for line in p.stdout.splitlines():
            cols = [c.strip() for c in line.split("|")]
            if len(cols) >= 3 and "Packages" in cols[2]:
                out.add((cols[0], cols[1]))
        return out


# ---------------------------------------------------------------------------------------------
# Resolving the closure (--update-lock)

def _order(c):
    if c == "":
        return 0
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _verrevcmp(a, b):
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i] if i < len(a) else "")
            bc = _order(b[j] if j < len(b) else "")
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        first = 0
        while i < len(a) and j < len(b) and a[i].isdigit() and b[j].isdigit():
            if not first:
                first = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first:
            return first
    return 0


def debver_cmp(a, b):
    """Debian version comparison (dpkg's algorithm): <0, 0, >0."""
    def split(v):
        epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
        up, _, rev = rest.rpartition("-") if "-" in rest else (rest, "", "")
        return int(epoch or 0), up, rev
    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return ea - eb
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


def parse_avail(text):
    """Newest record per package name of `apt-cache dumpavail`, and provider lists."""
    want = ("Package", "Version", "Architecture", "Depends", "Pre-Depends", "Provides",
            "Size", "SHA256")
    pkgs = {}
    for rec in text.split("\n\n"):
        fields = {}
        key = None
        for line in rec.splitlines():
            if line[:1] in (" ", "\t"):
                if key in fields:
                    fields[key] += " " + line.strip()
                continue
            k, _, v = line.partition(":")
            key = k if k in want else None
            if key:
                fields[key] = v.strip()
        name = fields.get("Package")
        if not name or fields.get("Architecture") not in (ARCH, "all"):
            continue
        old = pkgs.get(name)
        if old is None or debver_cmp(fields["Version"], old["Version"]) > 0:
            pkgs[name] = fields
    provides = {}
    for name, f in pkgs.items():
        for item in f.get("Provides", "").split(","):
            v = item.split("(")[0].strip().split(":")[0]
            if v:
                provides.setdefault(v, []).append(name)
    return pkgs, provides


def resolve_closure(pkgs, provides, roots):
    """Depends+Pre-Depends closure of roots: first satisfiable alternative, virtual names to a
    provider already chosen or else the first one by name; groups naming SKIP_DEPS skipped."""
    chosen = {}
    queue = list(roots)
    while queue:
        name = queue.pop(0)
        if name in chosen:
            continue
        if name not in pkgs:
            raise QemuSidError(f"{name} is not in {SUITE}")
        f = pkgs[name]
        chosen[name] = f
        deps = ", ".join(x for x in (f.get("Pre-Depends"), f.get("Depends")) if x)
        for group in deps.split(","):
            alts = [a.split("(")[0].strip().split(":")[0] for a in group.split("|")]
            alts = [a for a in alts if a]
            if not alts or any(a in SKIP_DEPS for a in alts):
                continue
            pick = next((a for a in alts if a in chosen), None)
            if pick is None:
                for a in alts:
                    if a in pkgs:
                        pick = a
                        break
                    provs = sorted(provides.get(a, []))
                    if provs:
                        pick = next((p for p in provs if p in chosen), provs[0])
                        break
            if pick is None:
                raise QemuSidError(f"{name}: cannot satisfy `{group.strip()}` from {SUITE}")
            queue.append(pick)
    return chosen


LOCK_HEADER = """\
# Debian {suite} QEMU for the benchmarks, run from the cache by bench/qemu_sid.py (never
# installed): {roots} and the closure of its Depends/Pre-Depends (no
# Recommends/Suggests; dependencies serving only maintainer scripts skipped, see SKIP_DEPS).
# qemu-system-x86 {qver}: {n} packages, {mib:.1f} MiB of .debs.
#
# Columns: package  version  arch  size-of-.deb  sha256-of-.deb   (all from Debian {suite})
# Regenerate (re-pin to today's {suite}): python3 bench/qemu_sid.py --update-lock
"""


def update_lock(cache_dir=None, log=print, lock_path=None):
    """Re-resolves the closure against the current sid lists and rewrites the lock file."""
    lock_path = lock_path or LOCK_FILE
    cache_dir = cache_dir or default_cache_dir()
    with FileLock(os.path.join(cache_dir, "apt.lock"), log, "the package cache"):
        apt = PrivateApt(cache_dir, log)
        apt.update()
        text = apt.run("apt-cache", "dumpavail").stdout
    pkgs, provides = parse_avail(text)
    chosen = resolve_closure(pkgs, provides, ROOT_PACKAGES)
    pins = []
    for name in sorted(chosen):
        f = chosen[name]
        if not re.fullmatch(r"[0-9a-f]{64}", f.get("SHA256", "")):
            raise QemuSidError(f"{name}: no SHA256 in the {SUITE} lists")
        pins.append(Pin(name, f["Version"], f["Architecture"], f.get("Size", "0"), f["SHA256"]))
    w = [max(len(getattr(p, a)) for p in pins) for a in ("name", "version", "arch")]
    body = "".join(f"{p.name:<{w[0]}}  {p.version:<{w[1]}}  {p.arch:<{w[2]}}  "
                   f"{p.size:>9}  {p.sha256}\n" for p in pins)
    header = LOCK_HEADER.format(
        suite=SUITE, roots=", ".join(ROOT_PACKAGES),
        qver=next(p.version for p in pins if p.name == "qemu-system-x86"),
        n=len(pins), mib=sum(p.size for p in pins) / 2**20)
    tmp = f"{lock_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(header + "\n" + body)
    os.replace(tmp, lock_path)
    log(f"qemu-sid: wrote {lock_path}: {len(pins)} packages, "
        f"{sum(p.size for p in pins) / 2**20:.1f} MiB")
    return pins


# ---------------------------------------------------------------------------------------------
# Fetching and building the root

def ensure_debs(pins, cache_dir, log):
    """Path of every pin's verified .deb in <cache>/debs, downloading the missing ones."""
    debs = os.path.join(cache_dir, "debs")
    path = lambda p: os.path.join(debs, f"{p.sha256}.deb")  # noqa: E731
    if any(not os.path.isfile(path(p)) for p in pins):
        os.makedirs(debs, exist_ok=True)
        with FileLock(os.path.join(cache_dir, "apt.lock"), log, "the package cache"):
            missing = [p for p in pins if not os.path.isfile(path(p))]
            if missing:
                _download(missing, cache_dir, debs, log)
    return [path(p) for p in pins]


def _download(pins, cache_dir, debs, log):
    apt = PrivateApt(cache_dir, log)
    log(f"qemu-sid: downloading {len(pins)} packages "
        f"({sum(p.size for p in pins) / 2**20:.1f} MiB) from {SUITE}")
    updated = False
    if not apt.lists_current():
        apt.update()
        updated = True
    tmp = tempfile.mkdtemp(prefix=".tmp-qemu-sid-", dir=debs)
    try:
        specs = [f"{p.name}={p.version}" for p in pins]
        try:
            apt.run("apt-get", "-q", "download", *specs, cwd=tmp)
        except QemuSidError as first:
            if not updated:
                log(f"qemu-sid: download failed ({first}); refreshing the lists and retrying")
                apt.update()
            known = apt.versions(sorted({p.name for p in pins}))
            gone = next((p for p in pins if (p.name, p.version) not in known), None)
            if gone:
                raise QemuSidError(f"{gone.name} {gone.version} is no longer in {SUITE}; "
                                   f"run {UPDATE_CMD}") from None
            if updated:
                raise
            apt.run("apt-get", "-q", "download", *specs, cwd=tmp)
        files = os.listdir(tmp)
        for p in pins:
            prefix = f"{p.name}_{p.version.replace(':', '%3a')}_"
            f = next((f for f in files if f.startswith(prefix) and f.endswith(".deb")), None)
            if f is None:
                raise QemuSidError(f"apt-get download wrote no .deb for {p.name}={p.version}")
            actual = sha256_file(os.path.join(tmp, f))
            if actual != p.sha256:
                raise QemuSidError(
                    f"sha256 mismatch for {p.name} {p.version}: qemu-sid.lock pins {p.sha256}, "
                    f"the archive served {actual}; run {UPDATE_CMD} if the change is expected")
            os.replace(os.path.join(tmp, f), os.path.join(debs, f"{p.sha256}.deb"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _relink_absolute(root):
    """Absolute symlinks in the root (e.g. /usr/share/qemu/bios-256k.bin ->
    /usr/share/seabios/...) would point at the machine's files: make them relative, in the root."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                continue
            target = os.readlink(p)
            if target.startswith("/"):
                rel = os.path.relpath(root + target, dirpath)
                os.unlink(p)
                os.symlink(rel, p)
                n += 1
    return n


def _loader(root):
    for rel in (f"usr/lib/{MULTIARCH}/ld-linux-x86-64.so.2",
                f"lib/{MULTIARCH}/ld-linux-x86-64.so.2",
                "usr/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"):
        p = os.path.join(root, rel)
        if os.path.isfile(p):
            return os.path.realpath(p)
    raise QemuSidError(f"no ld-linux-x86-64.so.2 in {root}; run {UPDATE_CMD}")


def _library_dirs(root):
    """The root's library directories: its ld.so.conf.d entries, then the usual ones."""
    dirs = []
    conf = os.path.join(root, "etc/ld.so.conf.d")
    for name in sorted(os.listdir(conf)) if os.path.isdir(conf) else []:
        try:
            with open(os.path.join(conf, name)) as f:
                dirs += [l.strip() for l in f if l.strip().startswith("/")]
        except OSError:
            pass
    dirs += [f"/usr/lib/{MULTIARCH}", f"/lib/{MULTIARCH}", "/usr/lib", "/lib"]
    out = []
    for d in dirs:
        real = os.path.realpath(root + d)
        if os.path.isdir(real) and real.startswith(root + "/") and real not in out:
            out.append(real)
    return out


WRAPPER = """\
#!/bin/sh
# qemu-system-x86_64 {qver} from Debian {suite}, unpacked by bench/qemu_sid.py (lock {key}):
# run by the root's own loader with the root's libraries, modules and firmware only.
# Takes the same arguments as qemu-system-x86_64.
QEMU_MODULE_DIR='{moddir}'
export QEMU_MODULE_DIR
GCONV_PATH='{gconv}'
export GCONV_PATH
exec '{loader}' --inhibit-cache --library-path '{libpath}' --argv0 "$0" \\
    '{qemu}' "$@"
"""


def _build(pins, cache_dir, base, key, log):
    debs = ensure_debs(pins, cache_dir, log)
    for d in os.listdir(base):
        if d.startswith(f".tmp-{key}-"):
            pid = d.rsplit("-", 1)[-1]
            if not (pid.isdigit() and os.path.exists(f"/proc/{pid}")):
                shutil.rmtree(os.path.join(base, d), ignore_errors=True)
    final = os.path.join(base, key)
    if os.path.exists(final):  # unfinished (no stamp): an interrupted build
        shutil.rmtree(final)
    tmp = os.path.join(base, f".tmp-{key}-{os.getpid()}")
    root_tmp = os.path.join(tmp, "root")
    os.makedirs(root_tmp)
    log(f"qemu-sid: unpacking {len(pins)} packages into {final}/root")
    for p, deb in zip(pins, debs):
        r = subprocess.run(["dpkg-deb", "-x", deb, root_tmp], stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise QemuSidError(f"dpkg-deb -x {p.name} failed: {r.stderr.strip()[-300:]}")
    os.rename(tmp, final)
    root = os.path.join(final, "root")
    _relink_absolute(root)
    qemu = os.path.join(root, "usr/bin/qemu-system-x86_64")
    if not os.path.isfile(qemu):
        raise QemuSidError(f"{qemu} missing after unpacking; run {UPDATE_CMD}")
    loader = _loader(root)
    libdirs = _library_dirs(root)
    # QEMU finds its data, firmware and module directories relative to its executable (which,
    # for /proc/self/exe, is the loader): <exec dir>/qemu-bundle/<configured path> when that
    # exists. Pointing it at the root keeps all of them in the root, never the machine's.
    bundle = os.path.join(os.path.dirname(loader), "qemu-bundle")
    os.symlink(os.path.relpath(root, os.path.dirname(loader)), bundle)
    for s in [root] + libdirs + [qemu, loader]:
        if "'" in s or ":" in s:
            raise QemuSidError(f"the cache path {s} contains ' or :; set VMM_CACHE_DIR elsewhere")
    wrapper = os.path.join(final, "qemu-system-x86_64")
    with open(wrapper, "w") as f:
        f.write(WRAPPER.format(
            qver=qemu_version_of(pins), suite=SUITE, key=key,
            moddir=os.path.join(root, f"usr/lib/{MULTIARCH}/qemu"),
            gconv=os.path.join(root, f"usr/lib/{MULTIARCH}/gconv"),
            loader=loader, libpath=":".join(libdirs), qemu=qemu))
    os.chmod(wrapper, 0o755)
    _check_libraries(root, loader, libdirs, qemu)
    _check_data_dirs(root, wrapper)
    ver = _run_version(wrapper)
    want = qemu_version_of(pins)
    if f"version {want}" not in ver:
        raise QemuSidError(f"{wrapper} --version says `{ver}`, expected {want}")
    with open(os.path.join(final, "stamp.tmp"), "w") as f:
        f.write(f"{key}\n{ver}\n")
    os.replace(os.path.join(final, "stamp.tmp"), os.path.join(final, "stamp"))
    return wrapper


def _check_libraries(root, loader, libdirs, qemu):
    """Every library of QEMU and of its modules resolves inside the root."""
    moddir = os.path.join(root, f"usr/lib/{MULTIARCH}/qemu")
    objs = [qemu] + sorted(os.path.join(moddir, m) for m in
                           (os.listdir(moddir) if os.path.isdir(moddir) else [])
                           if m.endswith(".so"))
    for obj in objs:
        r = subprocess.run([loader, "--inhibit-cache", "--library-path", ":".join(libdirs),
                            "--list", obj], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
        for line in r.stdout.splitlines():
            m = re.match(r"\s*(\S+) => (.*?) \(0x", line)
            if "not found" in line or (m and not m.group(2).startswith(root + "/")):
                rel = os.path.relpath(obj, root)
                raise QemuSidError(
                    f"{rel} needs {line.strip()} from outside the root; a dependency is missing "
                    f"from the closure: check SKIP_DEPS and run {UPDATE_CMD}")


def _check_data_dirs(root, wrapper):
    """QEMU's firmware/data search path (-L help) lies inside the root only."""
    r = subprocess.run([wrapper, "-L", "help"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=60)
    dirs = [l.strip() for l in r.stdout.splitlines() if l.strip()]
    outside = [d for d in dirs if not os.path.realpath(d).startswith(root + "/")]
    if r.returncode != 0 or not dirs or outside:
        raise QemuSidError(f"{wrapper} -L help: data directories outside the root "
                           f"({', '.join(outside) or r.stdout.strip()[-200:]})")
    if not os.path.isfile(os.path.join(root, "usr/share/seabios/bios-256k.bin")):
        raise QemuSidError(f"no SeaBIOS bios-256k.bin in {root}; run {UPDATE_CMD}")


def _run_version(wrapper):
    try:
        r = subprocess.run([wrapper, "--version"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QemuSidError(f"{wrapper} --version did not run: {e}") from None
    first = (r.stdout.splitlines() or [""])[0].strip()
    if r.returncode != 0:
        raise QemuSidError(
            f"{wrapper} --version failed ({r.returncode}): {r.stdout.strip()[-300:]}")
    return first


def ensure_qemu_sid(cache_dir=None, log=print):
    """Path of an executable wrapper that behaves like sid's qemu-system-x86_64.

    Fast (no writes, no network) when the root for the current lock is there; otherwise
    downloads the pinned packages (sha256-verified), unpacks them, writes and checks the
    wrapper. Raises QemuSidError with a one-line reason and the fix."""
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    pins = read_lock()
    key = lock_key(pins)
    base = os.path.join(cache_dir, "qemu-sid")
    final = os.path.join(base, key)
    wrapper = os.path.join(final, "qemu-system-x86_64")
    if os.path.isfile(os.path.join(final, "stamp")) and os.access(wrapper, os.X_OK):
        return wrapper
    try:
        os.makedirs(base, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=base, prefix=".probe-")
        probe.close()
    except OSError as e:
        raise QemuSidError(
            f"sid QEMU {qemu_version_of(pins)} is not in {base} and that is not writable "
            f"({e.strerror}); run python3 bench/qemu_sid.py on the machine first "
            "(not inside the nested host)") from None
    started = time.monotonic()
    with FileLock(os.path.join(base, ".build.lock"), log, "the qemu-sid cache"):
        if os.path.isfile(os.path.join(final, "stamp")):  # built by another process meanwhile
            return wrapper
        wrapper = _build(pins, cache_dir, base, key, log)
    log(f"qemu-sid: QEMU {qemu_version_of(pins)} ready in {time.monotonic() - started:.1f}s: "
        f"{wrapper}")
    return wrapper


# ---------------------------------------------------------------------------------------------
# Checks (CLI)

def check(wrapper, log=print):
    """Machine and device lists a bench needs; raises QemuSidError when one is missing."""
    def out(*args):
        r = subprocess.run([wrapper, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=60)
        return r.stdout
    machines = out("-machine", "help")
    for m in ("q35", "microvm"):
        if not re.search(rf"^{m}\s", machines, re.M):
            raise QemuSidError(f"{wrapper} -machine help lists no {m}")
    devices = out("-M", "q35,cxl=on", "-device", "help")
    for d in ("cxl-type3", "pxb-cxl", "cxl-rp", "virtio-blk-pci", "virtio-net-pci"):
        if f'name "{d}"' not in devices:
            raise QemuSidError(f"{wrapper} -device help lists no {d}")
    objs = out("-object", "help")
    if "memory-backend-file" not in objs:
        raise QemuSidError(f"{wrapper} -object help lists no memory-backend-file")
    accels = out("-accel", "help")
    for a in ("kvm", "tcg"):
        if not re.search(rf"^{a}$", accels, re.M):
            raise QemuSidError(f"{wrapper} -accel help lists no {a}")
    log("qemu-sid: q35, microvm, cxl-type3, pxb-cxl, cxl-rp, virtio, memory-backend-file, "
        "kvm and tcg are available")


def default_kernel(cache_dir):
    images = os.path.join(cache_dir, "images")
    found = []
    for d in sorted(os.listdir(images)) if os.path.isdir(images) else []:
        p = os.path.join(images, d, "bzImage")
        if d.startswith("guest-") and os.path.isfile(p):
            found.append((os.path.getmtime(p), p))
    if not found:
        raise QemuSidError(f"no guest bzImage in {images}; pass --smoke-boot KERNEL")
    return max(found)[1]


def smoke_boot(wrapper, kernel, log=print, timeout=60):
    """TCG q35 boot until the kernel prints its banner (no KVM needed); returns the line."""
    cmd = [wrapper, "-M", "q35", "-accel", "tcg", "-m", "256", "-smp", "1", "-nographic",
           "-no-reboot", "-kernel", kernel, "-append", "console=ttyS0 panic=-1"]
    log(f"qemu-sid: smoke boot: {' '.join(cmd)}")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        os.set_blocking(p.stdout.fileno(), False)
        while time.monotonic() < deadline:
            chunk = p.stdout.read()
            if chunk:
                buf += chunk
                m = re.search(rb"Linux version [^\r\n]*", buf)
                if m:
                    return m.group(0).decode(errors="replace")
            elif p.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    tail = buf.decode(errors="replace").strip().splitlines()[-3:]
    raise QemuSidError(f"no kernel banner from the TCG smoke boot: {' | '.join(tail)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--update-lock", action="store_true",
                    help="re-pin bench/qemu-sid.lock to today's sid, then fetch it")
    ap.add_argument("--print-path", action="store_true",
                    help="print only the wrapper path on stdout")
    ap.add_argument("--check", action="store_true",
                    help="check the machine types, CXL devices and accelerators the benches use")
    ap.add_argument("--smoke-boot", nargs="?", const="", metavar="KERNEL",
                    help="boot KERNEL (default: newest guest bzImage in the cache) with TCG "
                         "until the kernel banner")
    ap.add_argument("--cache-dir", help="default: $VMM_CACHE_DIR or ~/.cache/vmm")
    a = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if a.update_lock:
            update_lock(a.cache_dir, log)
        wrapper = ensure_qemu_sid(a.cache_dir, log)
        if a.print_path:
            print(wrapper)
        else:
            print(wrapper)
            print(_run_version(wrapper))
        if a.check:
            check(wrapper, log)
        if a.smoke_boot is not None:
            kernel = a.smoke_boot or default_kernel(os.path.abspath(
                a.cache_dir or default_cache_dir()))
            log(f"qemu-sid: smoke boot reached: {smoke_boot(wrapper, kernel, log)}")
    except QemuSidError as e:
        print(f"qemu_sid: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
