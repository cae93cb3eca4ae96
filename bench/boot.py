#!/usr/bin/env python3
"""Boot-time benchmark: our VMM vs QEMU -M microvm vs QEMU -M q35 (a benchmark, not a test),
each QEMU twice: the machine's (Debian bookworm's 7.2, or --qemu) and the newest Debian QEMU
(sid's 11.x, run from the cache by bench/qemu_sid.py, never installed; --no-qemu-sid skips it).

All of them boot the SAME kernel (the default guest profile's bzImage) with the SAME minimal
initramfs (busybox taken from the pinned guest initramfs, plus a tiny /init), 256 MiB, 1 vCPU,
the same kernel command line, N times each, interleaved round-robin.

What is measured, identically for every VMM, by this harness:
  init  launch (just before fork/exec) -> the line BOOTBENCH-INIT-REACHED, which /init prints
        on the serial console (ttyS0), appears on the VMM's stdout;
  exit  launch -> the VMM process has exited, after /init did `poweroff -f` (ACPI S5 on all
        machines).
/init first writes 1 to I/O port 0x500 (our VMM's "init reached" marker, for its own
`--boot-time` breakdown; unassigned and ignored on QEMU), then prints the marker line, then the
guest's /proc/uptime (the kernel's own clock), writes 42 to I/O port 0x501 (our VMM exits with
that status; with --qemu-debug-exit QEMU gets an isa-debug-exit device there and exits at that
write, status (42<<1)|1), then `poweroff -f`.

Where this machine's /dev/kvm cannot run a stock guest (nested PVM: /sys/module/kvm_pvm), the
whole measurement runs inside ONE nested host (`vmm host -- bench/boot.py --inner ...`), so all
VMMs run under the same (TCG-distorted) conditions: only the ratios mean anything there.
The nested host gets VMM_HOST_TCG_THREAD=multi unless that is set already (see
hold_kvm_static_keys for why multi-threaded TCG is safe for this run).

Usage: bench/boot.sh [-n RUNS] [--kernel-format bzimage|vmlinux] [--help for the rest]
Results: stdout, plus target/bench/boot-results.{txt,json}; console logs of every boot in
target/bench/logs/. Our binary is copied to target/bench/vmm first (a concurrent cargo build
must not swap it mid-run).
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(REPO, "target", "bench")  # never /tmp: the nested host hides it

MARKER = b"BOOTBENCH-INIT-REACHED"
UPTIME_RE = re.compile(rb"BOOTBENCH-UPTIME ([0-9.]+)")
EXIT_VALUE = 42
# Kernel command line of our VMM (vmm/src/main.rs BASE_CMDLINE); QEMU gets the same.
CMDLINE = "console=ttyS0 reboot=acpi panic=-1 quiet"
MEMORY_MIB = 256
BOOT_TIME_RE = re.compile(
    r"vmm start -> kernel entry ([0-9.]+) ms, kernel entry -> init ([0-9.]+) ms, "
    r"vmm start -> init ([0-9.]+) ms"
)

INIT_SCRIPT = f"""#!/bin/busybox sh
# Boot benchmark /init: signal, report, power off. Nothing else (no devtmpfs: /dev/port and
# /dev/console are static nodes in the archive).
bb=/bin/busybox
printf '\\001' | $bb dd of=/dev/port bs=1 seek={0x500} count=1 conv=notrunc 2>/dev/null
echo {MARKER.decode()}
$bb mount -t proc proc /proc
read up idle </proc/uptime
echo "BOOTBENCH-UPTIME $up"
printf '\\{EXIT_VALUE:03o}' | $bb dd of=/dev/port bs=1 seek={0x501} count=1 conv=notrunc 2>/dev/null
$bb poweroff -f
echo "BOOTBENCH-POWEROFF-FAILED"
while :; do $bb sleep 1; done
"""

def vmm_names(args):
    """Our VMM, then each QEMU's microvm and q35 (the machine's, then sid's if there is one)."""
    names = ["vmm", "qemu-microvm", "qemu-q35"]
    if args.qemu_sid:
        names += ["qemu-sid-microvm", "qemu-sid-q35"]
    return names


def die(msg, status=1):
    print(f"boot.sh: error: {msg}", file=sys.stderr)
    sys.exit(status)


def note(msg):
    print(f"boot.sh: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# newc cpio (read the pinned initramfs, write the minimal one)


def cpio_entries(data):
    """Yields (name, mode, body) for each record of a newc archive (concatenations allowed)."""
    off = 0
    while off + 110 <= len(data):
        if data[off:off + 6] != b"070701":
            # Padding between concatenated archives.
            if data[off] == 0:
                off += 1
                continue
            raise ValueError(f"not a newc cpio record at byte {off}")
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = off + 110
        name = data[name_start:name_start + namesize - 1].decode()
        body_start = (name_start + namesize + 3) & ~3
        body = data[body_start:body_start + filesize]
        off = (body_start + filesize + 3) & ~3
        if name == "TRAILER!!!":
            continue
        yield name, mode, body


def cpio_record(ino, name, mode, body=b"", rdev=(0, 0), nlink=1):
    name_b = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, nlink, 0, len(body), 0, 0, rdev[0], rdev[1], len(name_b), 0]
    hdr = b"070701" + b"".join(b"%08x" % f for f in fields) + name_b
    hdr += b"\0" * (-len(hdr) % 4)
    return hdr + body + b"\0" * (-len(body) % 4)


def build_initramfs(pinned_initramfs, out_path):
    with open(pinned_initramfs, "rb") as f:
        data = f.read()
    busybox = None
    for name, mode, body in cpio_entries(data):
        if os.path.basename(name) == "busybox" and (mode & 0o170000) == 0o100000:
            busybox = body
            break
    if busybox is None:
        die(f"no busybox binary in {pinned_initramfs}")
    entries = [
        ("bin", 0o040755, b"", (0, 0), 2),
        ("bin/busybox", 0o100755, busybox, (0, 0), 1),
        ("bin/sh", 0o120777, b"busybox", (0, 0), 1),
        ("dev", 0o040755, b"", (0, 0), 2),
        ("dev/console", 0o020600, b"", (5, 1), 1),
        ("dev/port", 0o020600, b"", (1, 4), 1),
        ("init", 0o100755, INIT_SCRIPT.encode(), (0, 0), 1),
        ("proc", 0o040755, b"", (0, 0), 2),
    ]
    out = b"".join(cpio_record(i + 1, *e) for i, e in enumerate(entries))
    out += cpio_record(0, "TRAILER!!!", 0)
    out += b"\0" * (-len(out) % 512)
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(out)
    os.replace(tmp, out_path)


def pinned_images(vmm, profile):
    """bzImage, vmlinux, initramfs.cpio of the guest profile, from `vmm images build`; when that
    fails (e.g. a lock file being edited), the newest complete build of the profile in the
    cache, with a warning."""
    res = subprocess.run([vmm, "images", "build"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    found = {}
    for line in res.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) != 2:
            continue
        path = parts[1]
        d = os.path.basename(os.path.dirname(path))
        if d.startswith(f"guest-{profile}-"):
            found[os.path.basename(path)] = path
    artifacts = ("bzImage", "vmlinux", "initramfs.cpio")
    if res.returncode == 0 and all(a in found for a in artifacts):
        return tuple(found[a] for a in artifacts)
    cache = os.environ.get("VMM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vmm")
    images = os.path.join(cache, "images")
    dirs = []
    if os.path.isdir(images):
        for d in os.listdir(images):
            full = os.path.join(images, d)
            if d.startswith(f"guest-{profile}-") and all(
                    os.path.isfile(os.path.join(full, a)) for a in artifacts + ("SHA256SUMS",)):
                dirs.append((os.path.getmtime(os.path.join(full, "SHA256SUMS")), full))
    if not dirs:
        die(f"`vmm images build` failed ({res.returncode}) and no built guest-{profile} image "
            f"is in {images}:\n{res.stderr}")
    newest = max(dirs)[1]
    note(f"warning: `vmm images build` failed ({res.returncode}: {res.stderr.strip()}); "
         f"using the newest built guest-{profile} image in the cache, {newest}")
    return tuple(os.path.join(newest, a) for a in artifacts)


# ---------------------------------------------------------------------------------------------
# One boot


class Boot:
    """One launch of one VMM, timed by this harness."""

    def __init__(self, name, argv, expect_status, timeout):
        self.name = name
        self.argv = argv
        self.expect_status = expect_status
        self.timeout = timeout
        self.console = bytearray()
        self.stderr = bytearray()
        self.t_init = None
        self.status = None
        self.error = None

    def _read_stdout(self, fd, t0):
        while True:
            chunk = os.read(fd, 65536)
            now = time.monotonic()
            if not chunk:
                return
            self.console += chunk
            if self.t_init is None and MARKER in self.console:
                self.t_init = now - t0

    def _read_stderr(self, fd):
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            self.stderr += chunk

    def run(self):
        t0 = time.monotonic()
        proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        # stdin: a pipe closed at once (EOF), the same for every VMM.
        proc.stdin.close()
        readers = [
            threading.Thread(target=self._read_stdout, args=(proc.stdout.fileno(), t0)),
            threading.Thread(target=self._read_stderr, args=(proc.stderr.fileno(),)),
        ]
        for r in readers:
            r.start()
        try:
            self.status = proc.wait(timeout=self.timeout)
            self.t_exit = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.t_exit = None
            self.error = f"no exit within {self.timeout} s (killed)"
        for r in readers:
            r.join()
        proc.stdout.close()
        proc.stderr.close()
        if self.error is None:
            if self.t_init is None:
                self.error = (f"the guest never printed {MARKER.decode()} "
                              f"(exit status {self.status})")
            elif b"Kernel panic" in self.console:
                self.error = "the guest kernel panicked"
            elif self.status != self.expect_status:
                self.error = f"exit status {self.status}, expected {self.expect_status}"
        m = UPTIME_RE.search(self.console)
        self.uptime = float(m.group(1)) if m else None
        m = BOOT_TIME_RE.search(self.stderr.decode(errors="replace"))
        self.vmm_boot_time = tuple(float(x) for x in m.groups()) if m else None
        return self.error is None

    def save_log(self, tag):
        d = os.path.join(WORK, "logs")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{self.name}-{tag}.console"), "wb") as f:
            f.write(self.console)
        with open(os.path.join(d, f"{self.name}-{tag}.stderr"), "wb") as f:
            f.write(self.stderr)

    def failure_report(self, lines=25):
        text = self.console.decode(errors="replace").replace("\r", "")
        tail = "\n".join(text.splitlines()[-lines:])
        err = self.stderr.decode(errors="replace").strip()
        err_tail = "\n".join(err.splitlines()[-10:])
        cmd = " ".join(self.argv)
        return (f"{self.name} failed to boot: {self.error}\n  command: {cmd}\n"
                f"--- console tail ---\n{tail}\n--- stderr tail ---\n{err_tail}\n---")

    def record(self):
        return {
            "vmm": self.name,
            "init_ms": self.t_init * 1000 if self.t_init is not None else None,
            "exit_ms": self.t_exit * 1000 if self.t_exit is not None else None,
            "guest_uptime_ms": self.uptime * 1000 if self.uptime is not None else None,
            "vmm_boot_time_ms": self.vmm_boot_time,
            "status": self.status,
            "error": self.error,
        }


def cmdline(args):
    return f"{CMDLINE} {args.cmdline_extra}".strip()


def microvm_machine(args):
    return "microvm," + args.microvm_opts if args.microvm_opts else "microvm"


def commands(args, kernel, microvm_kernel, initrd):
    cmds = {
        "vmm": ([args.vmm, "run", "--host", "direct", "--kernel", kernel, "--initrd", initrd,
                 f"--memory={MEMORY_MIB}M", "--cpus=1", "--boot-time"]
                + ([f"--cmdline={args.cmdline_extra}"] if args.cmdline_extra else []), EXIT_VALUE),
    }
    qemus = [("qemu", args.qemu)] + ([("qemu-sid", args.qemu_sid)] if args.qemu_sid else [])
    for prefix, qemu in qemus:
        cmds.update(qemu_commands(args, qemu, prefix, kernel, microvm_kernel, initrd))
    return cmds


def qemu_commands(args, qemu, prefix, kernel, microvm_kernel, initrd):
    qemu_common = [
        qemu, "-accel", "kvm", "-cpu", "host", "-m", str(MEMORY_MIB), "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", "stdio", "-initrd", initrd, "-append", cmdline(args),
    ]
    if args.qemu_debug_exit:
        qemu_common += ["-device", "isa-debug-exit,iobase=0x501,iosize=1"]
        qemu_status = (EXIT_VALUE << 1) | 1
    else:
        qemu_status = 0
    return {
        f"{prefix}-microvm": (qemu_common + ["-M", microvm_machine(args), "-kernel",
                                             microvm_kernel], qemu_status),
        f"{prefix}-q35": (qemu_common + ["-M", "q35", "-kernel", kernel], qemu_status),
    }


# ---------------------------------------------------------------------------------------------
# Measurement (runs where /dev/kvm can run a stock guest)


def fmt(v):
    return "-" if v is None else f"{v:.0f}"


def summary(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


KVM_CREATE_VM = 0xAE01
KVM_CREATE_IRQCHIP = 0xAE60
KVM_CREATE_VCPU = 0xAE41


def hold_kvm_static_keys():
    """Keeps one idle KVM VM (in-kernel irqchip, one never-run vCPU) open for the whole run.

    Creating and destroying a VM toggles kernel static keys (preempt notifiers in __schedule,
    KVM's APIC keys), i.e. live text patching through int3. Inside the nested host (QEMU TCG,
    2 vCPUs) that patching races with the other vCPU's translated code: measured here, the host
    kernel died twice with "Oops: int3" at __schedule+0x432 after ~15 VM lifecycles. With one VM
    alive throughout, those keys never flip back. The idle VM costs the measured VMMs nothing
    (it never runs), and it is there for all three alike.
    """
    import fcntl
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    return [kvm, vm, vcpu]


def measure(args):
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        die("/dev/kvm is not usable here")
    if os.environ.get("VMM_NESTED_HOST", "") not in ("", "0"):
        hold_kvm_static_keys()
    if shutil.which(args.qemu) is None:
        die(f"QEMU binary '{args.qemu}' not found (install qemu-system-x86)")
    if args.qemu_sid and not os.access(args.qemu_sid, os.X_OK):
        die(f"sid QEMU wrapper '{args.qemu_sid}' is missing (python3 bench/qemu_sid.py)")
    os.makedirs(WORK, exist_ok=True)
    shutil.rmtree(os.path.join(WORK, "logs"), ignore_errors=True)
    # Kernel and initramfs from a RAM-backed copy: the nested host reaches / over 9p, whose reads
    # are not cached; every VMM must read the same bytes at the same cost.
    stage = tempfile.mkdtemp(prefix="bootbench-", dir=args.stage_dir)
    try:
        kernel = os.path.join(stage, "kernel-" + os.path.basename(args.kernel))
        initrd = os.path.join(stage, "initramfs.cpio")
        shutil.copyfile(args.kernel, kernel)
        shutil.copyfile(args.initrd, initrd)
        vmlinux = None
        if args.vmlinux and os.path.realpath(args.vmlinux) == os.path.realpath(args.kernel):
            vmlinux = kernel
        elif args.vmlinux:
            vmlinux = os.path.join(stage, "vmlinux")
            shutil.copyfile(args.vmlinux, vmlinux)
        return _measure(args, kernel, vmlinux, initrd)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _measure(args, kernel, vmlinux, initrd):
    notes = []
    microvm_kernel = kernel
    if args.microvm_kernel == "vmlinux":
        microvm_kernel = vmlinux
        notes.append("qemu-microvm boots the uncompressed vmlinux (PVH entry), as asked")
    cmds = commands(args, kernel, microvm_kernel, initrd)

    # Warm-up (untimed): page cache, and a check that every VMM boots this guest at all.
    names = vmm_names(args)
    for name in names:
        for _ in range(args.warmup):
            argv, status = cmds[name]
            b = Boot(name, argv, status, args.timeout)
            ok = b.run()
            b.save_log("warmup")
            if (not ok and name.endswith("-microvm") and microvm_kernel == kernel and vmlinux
                    and vmlinux != kernel):
                note(f"{name} cannot boot the bzImage:\n" + b.failure_report(10))
                note(f"retrying {name} with the uncompressed vmlinux (PVH entry)")
                microvm_kernel = vmlinux
                notes.append(f"{name} could not boot the bzImage here; the microvm runs boot "
                             "the SAME kernel's uncompressed vmlinux (PVH entry) instead")
                cmds = commands(args, kernel, microvm_kernel, initrd)
                argv, status = cmds[name]
                b = Boot(name, argv, status, args.timeout)
                ok = b.run()
                b.save_log("warmup")
            if not ok:
                print(b.failure_report(), file=sys.stderr)
                die(f"{name} failed to boot the benchmark guest (warm-up)")
            note(f"warm-up {name}: init {b.t_init * 1000:.0f} ms, exit {b.t_exit * 1000:.0f} ms")

    records = []
    for r in range(args.runs):
        k = r % len(names)
        order = names[k:] + names[:k]
        for name in order:
            argv, status = cmds[name]
            b = Boot(name, argv, status, args.timeout)
            ok = b.run()
            b.save_log(f"run{r + 1}")
            records.append(dict(b.record(), round=r))
            if not ok:
                print(b.failure_report(), file=sys.stderr)
                die(f"{name} failed to boot in round {r + 1}")
            up = f", guest uptime {b.uptime * 1000:.0f} ms" if b.uptime is not None else ""
            note(f"round {r + 1}/{args.runs} {name:13s} init {b.t_init * 1000:7.0f} ms, "
                 f"exit {b.t_exit * 1000:7.0f} ms{up}")
    return records, notes, cmds


def qemu_version(qemu):
    try:
        out = subprocess.run([qemu, "--version"], stdout=subprocess.PIPE, text=True).stdout
        return out.splitlines()[0].replace("QEMU emulator version ", "QEMU ")
    except (OSError, IndexError):
        return qemu


def paired_ratio(records, other):
    """Median, min, max over rounds of other/vmm (init), the boots of one round being adjacent."""
    by_round = {}
    for r in records:
        by_round.setdefault(r["round"], {})[r["vmm"]] = r["init_ms"]
    ratios = [d[other] / d["vmm"] for d in by_round.values()
              if d.get(other) and d.get("vmm")]
    return statistics.median(ratios), min(ratios), max(ratios)


def report(args, records, notes, cmds, nested):
    names = vmm_names(args)
    by = {n: [r for r in records if r["vmm"] == n] for n in names}
    lines = []
    lines.append(f"Boot time, launch -> guest init reached (median of {args.runs}, "
                 f"interleaved round-robin; {MEMORY_MIB} MiB, 1 vCPU)")
    lines.append(f"  kernel  {args.kernel}")
    lines.append(f"  initrd  minimal busybox /init, {args.initrd}")
    lines.append(f"  cmdline {cmdline(args)}")
    label = args.vmm_label or args.vmm
    lines.append(f"  vmm     {label}" + ("  (a DEBUG build)" if "/debug/" in label else ""))
    lines.append(f"  qemu    {qemu_version(args.qemu)}, -accel kvm -cpu host; microvm as "
                 f"-M {microvm_machine(args)}")
    if args.qemu_sid:
        lines.append(f"  qemu-sid {qemu_version(args.qemu_sid)} (Debian sid, from the cache: "
                     "bench/qemu_sid.py), the same options")
    if nested:
        tcg = os.environ.get("VMM_HOST_TCG_THREAD", "single (vmm default)")
        lines.append(f"  NOTE: measured inside the nested host (QEMU TCG thread={tcg}, kvm-amd "
                     "inside):")
        lines.append("        absolute times are distorted by TCG; only the ratios between VMMs "
                     "mean anything.")
    for n in notes:
        lines.append(f"  NOTE: {n}")
    lines.append("")
    hdr = (f"{'VMM':17s} {'init med':>9s} {'min':>7s} {'max':>7s}   {'exit med':>9s} "
           f"{'min':>7s} {'max':>7s}   {'guest uptime':>12s}  {'launch->kernel clock':>20s}")
    lines.append(hdr + "   (ms)")
    med = {}
    for n in names:
        i = summary([r["init_ms"] for r in by[n]])
        e = summary([r["exit_ms"] for r in by[n]])
        u = summary([r["guest_uptime_ms"] for r in by[n]])
        pre = summary([r["init_ms"] - r["guest_uptime_ms"] for r in by[n]
                       if r["init_ms"] is not None and r["guest_uptime_ms"] is not None])
        med[n] = (i[0] if i else None, e[0] if e else None)
        lines.append(f"{n:17s} {fmt(i and i[0]):>9s} {fmt(i and i[1]):>7s} "
                     f"{fmt(i and i[2]):>7s}   {fmt(e and e[0]):>9s} {fmt(e and e[1]):>7s} "
                     f"{fmt(e and e[2]):>7s}   {fmt(u and u[0]):>12s}  {fmt(pre and pre[0]):>20s}")
    lines.append("")
    for n in names[1:]:
        if med[n][0] and med["vmm"][0]:
            paired = paired_ratio(records, n)
            lines.append(f"ratio {n}/vmm = {med[n][0] / med['vmm'][0]:.2f}   "
                         f"(launch -> exit: {med[n][1] / med['vmm'][1]:.2f}; median of per-round "
                         f"ratios: {paired[0]:.2f}, range {paired[1]:.2f}-{paired[2]:.2f})")
    bt = [r["vmm_boot_time_ms"] for r in by["vmm"] if r["vmm_boot_time_ms"]]
    if bt:
        k, ki, t = (statistics.median(x) for x in zip(*bt))
        lines.append("")
        lines.append(f"our VMM's own --boot-time (median): vmm start -> kernel entry {k:.1f} ms, "
                     f"kernel entry -> init {ki:.1f} ms, vmm start -> init {t:.1f} ms")
        if med["vmm"][0]:
            lines.append(f"  => launch -> vmm start (exec, dynamic loading, before main()): "
                         f"~{med['vmm'][0] - t:.0f} ms (init - vmm start->init)")
    lines.append("")
    lines.append("columns: init = launch -> BOOTBENCH-INIT-REACHED seen on the VMM's console "
                 "output;")
    lines.append("  exit = launch -> VMM process gone after `poweroff -f`; guest uptime = "
                 "/proc/uptime")
    lines.append("  at init (the kernel's own clock); launch->kernel clock = init - guest uptime")
    lines.append("  (VMM start-up, firmware, kernel load and decompression, early boot before "
                 "timekeeping).")
    if args.qemu_debug_exit:
        lines.append("  QEMU had isa-debug-exit at 0x501: its 'exit' ends at the port write, "
                     "before poweroff.")
    text = "\n".join(lines)
    print(text, flush=True)
    os.makedirs(WORK, exist_ok=True)
    with open(os.path.join(WORK, "boot-results.json"), "w") as f:
        json.dump({"nested": nested, "runs": args.runs, "notes": notes, "records": records,
                   "commands": {n: c[0] for n, c in cmds.items()}}, f, indent=1)
    with open(os.path.join(WORK, "boot-results.txt"), "w") as f:
        f.write(text + "\n")


# ---------------------------------------------------------------------------------------------


def needs_nested():
    if os.environ.get("VMM_NESTED_HOST", "") not in ("", "0"):
        return False  # already inside it
    if os.path.exists("/sys/module/kvm_pvm"):
        return True
    return not os.access("/dev/kvm", os.R_OK | os.W_OK)


def main():
    p = argparse.ArgumentParser(
        prog="bench/boot.sh",
        description="Boot-time benchmark: our VMM vs QEMU microvm vs QEMU q35 (same kernel, "
                    "same minimal initramfs, 256 MiB, 1 vCPU).")
    p.add_argument("-n", "--runs", type=int, default=5, help="boots per VMM (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed boots per VMM first (default 1)")
    p.add_argument("--profile", default="7.2", help="guest image profile (default 7.2)")
    p.add_argument("--host", choices=("auto", "direct", "nested"), default="auto",
                   help="run on this /dev/kvm or inside the nested host (auto: nested when "
                        "/sys/module/kvm_pvm exists or /dev/kvm is unusable)")
    p.add_argument("--vmm", default=os.path.join(REPO, "target", "debug", "vmm"),
                   help="our VMM binary (default target/debug/vmm)")
    p.add_argument("--qemu", default=os.environ.get("VMM_QEMU", "qemu-system-x86_64"))
    p.add_argument("--qemu-sid", default=None, metavar="PATH",
                   help="the newest Debian QEMU to compare too (default: sid's, fetched into "
                        "the cache by bench/qemu_sid.py)")
    p.add_argument("--no-qemu-sid", action="store_true",
                   help="compare with the machine's QEMU only")
    p.add_argument("--kernel-format", choices=("bzimage", "vmlinux"), default="bzimage",
                   help="boot all of them from the profile's bzImage (default) or from its "
                        "uncompressed vmlinux (PVH entry: no decompression)")
    p.add_argument("--microvm-kernel", choices=("bzimage", "vmlinux"), default="bzimage",
                   help="kernel format for QEMU microvm (default bzimage; falls back to the "
                        "vmlinux automatically when microvm cannot boot the bzImage)")
    p.add_argument("--microvm-opts", default="",
                   help="extra -M microvm options, e.g. 'rtc=off' (default: QEMU's defaults)")
    p.add_argument("--qemu-debug-exit", action="store_true",
                   help="give QEMU isa-debug-exit at 0x501 (its 'exit' then ends at the port "
                        "write, before poweroff; 'init' is unaffected)")
    p.add_argument("--cmdline-extra", default="",
                   help="extra kernel arguments for all of them (e.g. 'loglevel=8' to see where "
                        "boot time goes in the saved console logs)")
    p.add_argument("--timeout", type=float, default=120, help="seconds per boot (default 120)")
    p.add_argument("--host-memory", default="2G", help="memory of the nested host (default 2G)")
    p.add_argument("--stage-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kernel", help=argparse.SUPPRESS)
    p.add_argument("--vmlinux", help=argparse.SUPPRESS)
    p.add_argument("--vmm-label", default=None, help=argparse.SUPPRESS)
    p.add_argument("--initrd", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.runs < 1:
        die("--runs must be at least 1")
    args.vmm = os.path.abspath(args.vmm)
    if not os.access(args.vmm, os.X_OK):
        die(f"our VMM binary {args.vmm} is missing: build it (cargo build) or pass --vmm")

    if args.inner:
        records, notes, cmds = measure(args)
        report(args, records, notes, cmds, nested=os.environ.get("VMM_NESTED_HOST") == "1")
        return 0

    if args.no_qemu_sid:
        args.qemu_sid = None
    elif not args.qemu_sid:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import qemu_sid
        try:
            args.qemu_sid = qemu_sid.ensure_qemu_sid(log=note)
        except qemu_sid.QemuSidError as e:
            die(f"the newest Debian QEMU: {e} (or pass --no-qemu-sid)")
    bzimage, vmlinux, pinned_initramfs = pinned_images(args.vmm, args.profile)
    os.makedirs(WORK, exist_ok=True)
    # A private copy of our binary (same file system as QEMU's): a concurrent `cargo build`
    # must not swap it between rounds.
    snapshot = os.path.join(WORK, "vmm")
    shutil.copy2(args.vmm, snapshot + ".tmp")
    os.replace(snapshot + ".tmp", snapshot)
    vmm_source, args.vmm = args.vmm, snapshot
    initrd = os.path.join(WORK, "boot-initramfs.cpio")
    build_initramfs(pinned_initramfs, initrd)
    nested = args.host == "nested" or (args.host == "auto" and needs_nested())
    kernel = vmlinux if args.kernel_format == "vmlinux" else bzimage
    inner = [os.path.abspath(__file__), "--inner", "--kernel", kernel, "--vmlinux", vmlinux,
             "--initrd", initrd, "--runs", str(args.runs), "--warmup", str(args.warmup),
             "--vmm", args.vmm, "--vmm-label", vmm_source, "--qemu", args.qemu,
             "--microvm-kernel", args.microvm_kernel, "--microvm-opts", args.microvm_opts,
             "--timeout", str(args.timeout), "--cmdline-extra", args.cmdline_extra]
    if args.qemu_debug_exit:
        inner.append("--qemu-debug-exit")
    if args.qemu_sid:
        inner += ["--qemu-sid", args.qemu_sid]
    if not nested:
        os.execv(sys.executable, [sys.executable] + inner)
    note("this /dev/kvm cannot run a stock guest (nested PVM): measuring every VMM inside "
         "ONE nested host (QEMU TCG + kvm-amd); only ratios are meaningful")
    cmd = [args.vmm, "host", "--memory", args.host_memory, "--", sys.executable] + inner
    # Multi-threaded TCG for the nested host unless the caller chose otherwise: the inner run
    # keeps the static keys that made it crash from flipping (hold_kvm_static_keys), and
    # single-threaded TCG would run the VMM's threads and this harness on one host CPU in turn.
    env = dict(os.environ)
    env.setdefault("VMM_HOST_TCG_THREAD", "multi")
    res = subprocess.run(cmd, cwd=REPO, env=env)
    if res.returncode != 0:
        die(f"the measurement inside the nested host failed (status {res.returncode})",
            res.returncode)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
