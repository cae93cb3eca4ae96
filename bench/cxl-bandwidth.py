#!/usr/bin/env python3
"""CXL memory bandwidth benchmark (a benchmark, not a test): bench/cxl-bandwidth.sh --help.

Sequential write and read bandwidth of CXL Type 3 memory against ordinary RAM of the same
guest, measured by the guest tool memio (tests/guest-tools/memio.rs, built statically once):
`memio bw` maps SIZE bytes and touches them (first touch: the best of ROUNDS fresh mappings,
untimed for the rates), then times ROUNDS sequential write passes and read passes.

  our VMM   --memory=1G --cpus=1 --cxl-precommit, one 512 MiB volatile CXL device, its
            backing file on tmpfs (on a writeback file system every streaming write pays for
            dirty tracking and writeback: with the file on the nested host's 9p root, CXL
            writes ran at ~60 MB/s against ~5000 for RAM), kernel `memhp_default_state=offline`.
            The firmware-committed RAM region is NUMA node 1, onlined movable with daxctl.
            memio over SIZE (default 256 MiB) of anonymous memory bound with numactl to node 0
            (RAM) and to node 1 (CXL), interleaved REPEAT times after one untimed warm-up run
            of each; then the region as device dax (/dev/dax0.0), again interleaved with node-0
            RAM; both with memio's default access ("vec": memset and a vectorised sum) and
            with --u64 (one 64-bit load/store per word).
  QEMU      this machine's qemu-system-x86_64 (7.2 here, whose cxl-type3 is persistent memory
            only): -M q35,cxl=on, pxb-cxl + cxl-rp + cxl-type3 (256 MiB pmem on tmpfs, LSA,
            serial number), -accel kvm -cpu host,hypervisor=off (Linux creates regions only on
            "bare metal"), 1 vCPU, 1 GiB, the same kernel and initramfs as our guest plus
            `pci=nomsi` (see QEMU_CMDLINE_EXTRA). In the guest: `cxl create-region -t pmem`, a
            devdax namespace with its struct pages in RAM, then memio --u64 on /dev/dax0.0
            against anonymous RAM. QEMU's CXL window is emulated MMIO (every access exits to
            QEMU, ~0.1 MB/s here), so its CXL runs have --qemu-rounds (default 1) rounds of
            passes over --qemu-size (default 1 MiB), each pass capped at --qemu-max-secs
            (default 10 s); u64 because plain loads and stores are what every instruction
            emulator handles (vector instructions on emulated MMIO may not be).

Where this machine's /dev/kvm cannot run a stock guest (nested PVM), everything runs inside ONE
nested host (`vmm host -- bench/cxl-bandwidth.py --inner ...`, like bench/boot.py), so both
VMMs see the same (TCG-distorted) conditions: absolute MB/s mean little there, only ratios
within a guest do.

Results: stdout, target/bench/cxl-bandwidth-results.{txt,json}; guest outputs and consoles in
target/bench/cxl-logs/.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
WORK = os.path.join(REPO, "target", "bench")  # never /tmp: the nested host hides it
LOGS = os.path.join(WORK, "cxl-logs")
MEMIO_SRC = os.path.join(REPO, "tests", "guest-tools", "memio.rs")
CMDLINE = "console=ttyS0 reboot=acpi panic=-1 quiet"  # our VMM's base command line
# QEMU 7.2's cxl-type3 has no event interrupts: with the OS owning CXL error reporting (_OSC),
# Linux 7.2's cxl_pci fails its probe ("Failed to get interrupt for event Info log") and no
# memdev appears. Without MSI, cxl_pci skips event processing and probes fine (the guest has no
# other device that needs MSI).
QEMU_CMDLINE_EXTRA = "pci=nomsi"
# Last line of both guest scripts: the guest's own clock (what memio times with) against the
# harness's wall time for the whole VMM run (boot and power-off included), to catch a guest
# clock that runs fast or slow.
CLOCK_LINE = ('echo "guest-clock uptime=$(cut -d" " -f1 /proc/uptime) '
              'clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"')
CLOCK_RE = re.compile(r"^guest-clock uptime=([0-9.]+) clocksource=(\S+)", re.M)
BW_RE = re.compile(r"^(\S+) memio-bw (.*)$")

sys.path.insert(0, BENCH)
import boot as bootbench  # noqa: E402  (pinned_images, cpio_record, hold_kvm_static_keys)


def die(msg, status=1):
    print(f"cxl-bandwidth.sh: error: {msg}", file=sys.stderr)
    sys.exit(status)


def note(msg):
    print(f"cxl-bandwidth.sh: {msg}", file=sys.stderr, flush=True)


def size_bytes(s):
    m = re.fullmatch(r"([0-9]+)([KMG]?)", s)
    if not m:
        die(f"bad size '{s}' (use e.g. 256M)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


# ---------------------------------------------------------------------------------------------
# Guest scripts (busybox sh). Each measurement prints one line "LABEL memio-bw key=value ...".


def ours_script(a):
    return f"""
set -e -o pipefail
bw() {{ label=$1; shift; "$@" | sed "s/^/$label /"; }}
# kmem left the region's memory offline (memhp_default_state=offline); online it movable so
# it can be handed back to device dax afterwards.
daxctl online-memory dax0.0 >&2
daxctl list >&2
numactl -H >&2
# Warm-up, not reported: the first runs after boot are sometimes much slower (nested host).
numactl --membind=0 memio bw anon {a.size} 1 >&2
numactl --membind=1 memio bw anon {a.size} 1 >&2
for i in $(seq {a.repeat}); do
    bw ram numactl --membind=0 memio bw anon {a.size} {a.rounds}
    bw cxl-node1 numactl --membind=1 memio bw anon {a.size} {a.rounds}
done
daxctl reconfigure-device --mode=devdax --force dax0.0 >&2
memio bw /dev/dax0.0 {a.size} 1 >&2
for i in $(seq {a.repeat}); do
    bw ram-b numactl --membind=0 memio bw anon {a.size} {a.rounds}
    bw cxl-devdax memio bw /dev/dax0.0 {a.size} {a.rounds}
done
for i in $(seq {a.repeat}); do
    bw ram-u64 numactl --membind=0 memio bw anon {a.size} {a.rounds} --u64
    bw cxl-devdax-u64 memio bw /dev/dax0.0 {a.size} {a.rounds} --u64
done
{CLOCK_LINE}
"""


def interleaved_script(a, granularities=(4096, 256), suffix=""):
    """Two devices, one host bridge: 2-way RAM regions created by the kernel (no
    --cxl-precommit), at 4 KiB granularity (mapped granule run by granule run) and at 256 B
    (run from a shadow copy), each as NUMA node 1 against node 0 RAM, first touch included.
    Labels are ram-il-TAG / cxl-il2-TAG (TAG 4k or 256, then `suffix`)."""
    return f"""
set -e -o pipefail
bw() {{ label=$1; shift; "$@" | sed "s/^/$label /"; }}
D=/sys/bus/cxl/devices
for g in {' '.join(str(g) for g in granularities)}; do
    tag=$([ $g = 4096 ] && echo 4k || echo 256){suffix}
    r=$(cxl create-region -t ram -d decoder0.0 -m -w 2 -g $g mem0 mem1 \\
        | sed -n 's/.*"region":"\\([^"]*\\)".*/\\1/p' | head -n 1)
    cxl list -R -r $r >&2
    dax=$(basename $(ls -d $D/$r/dax_$r/dax*.* | head -n 1))
    daxctl online-memory $dax >&2
    numactl -H >&2
    numactl --membind=0 memio bw anon {a.size} 1 >&2
    numactl --membind=1 memio bw anon {a.size} 1 >&2
    for i in $(seq {a.repeat}); do
        bw ram-il-$tag numactl --membind=0 memio bw anon {a.size} {a.rounds}
        bw cxl-il2-$tag numactl --membind=1 memio bw anon {a.size} {a.rounds}
    done
    daxctl offline-memory $dax >&2
    cxl disable-region $r >&2
    cxl destroy-region -f $r >&2
done
"""


def placement_script(a):
    """The node 1 vs node 0 part of ours_script: what --placement compares."""
    return f"""
set -e -o pipefail
bw() {{ label=$1; shift; "$@" | sed "s/^/$label /"; }}
daxctl online-memory dax0.0 >&2
numactl --membind=0 memio bw anon {a.size} 1 >&2
numactl --membind=1 memio bw anon {a.size} 1 >&2
for i in $(seq {a.repeat}); do
    bw ram numactl --membind=0 memio bw anon {a.size} {a.rounds}
    bw cxl-node1 numactl --membind=1 memio bw anon {a.size} {a.rounds}
done
{CLOCK_LINE}
"""


def qemu_script(a):
    if a.qemu_guest_script:
        with open(a.qemu_guest_script) as f:
            return f.read()
    cap = f"--max-secs={a.qemu_max_secs}"
    return f"""
set -e -o pipefail
bw() {{ label=$1; shift; "$@" | sed "s/^/$label /"; }}
cxl list -M -u >&2
cxl create-region -t pmem -d decoder0.0 -m mem0 -s 256M >&2
ndctl create-namespace -m devdax -M mem -r region0 >&2
daxctl list >&2
dax=$(ls /dev/dax* | head -n1)
memio bw anon {a.size} 1 >&2
for i in $(seq {a.repeat}); do
    bw ram-u64 memio bw anon {a.size} {a.rounds} --u64
    bw cxl-devdax-u64 memio bw $dax {a.qemu_size} {a.qemu_rounds} --u64 {cap}
done
for i in $(seq {a.repeat}); do
    bw ram memio bw anon {a.size} {a.rounds}
done
{CLOCK_LINE}
"""


# ---------------------------------------------------------------------------------------------
# Running the guests (inside the nested host where needed)


def run_logged(name, argv, timeout, env=None, preexec_fn=None):
    """Runs argv with stdout/stderr in LOGS/name.{out,err}; returns (status, out, err, secs)."""
    os.makedirs(LOGS, exist_ok=True)
    out_path = os.path.join(LOGS, f"{name}.out")
    err_path = os.path.join(LOGS, f"{name}.err")
    note(f"{name}: {' '.join(argv[:-1] if argv[-2:-1] == ['-c'] else argv)} ...")
    t0 = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        try:
            status = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    timeout=timeout, env=env,
                                    preexec_fn=preexec_fn).returncode
        except subprocess.TimeoutExpired:
            status = None
    secs = time.monotonic() - t0
    with open(out_path, errors="replace") as f:
        o = f.read()
    with open(err_path, errors="replace") as f:
        e = f.read()
    note(f"{name}: status {status} after {secs:.0f} s")
    return status, o, e, secs


def measure_ours(a, stage, host="direct", name="vmm", script=None):
    backing = os.path.join(stage, "cxl-ram.img")
    argv = [a.vmm, "run", f"--host={host}", "--memory=1G", "--cpus=1", "--cxl-precommit",
            f"--cxl-type3=volatile=512M,persistent=0,backing={backing}",
            "--cmdline=memhp_default_state=offline", f"--guest-file={a.memio}:/usr/local/bin/memio",
            f"--timeout={a.timeout}", "--", "sh", "-c", script or ours_script(a)]
    status, out, err, secs = run_logged(name, argv, a.timeout + 60)
    if status != 0:
        tail = "\n".join(err.splitlines()[-25:])
        die(f"our VMM's run failed (status {status}); {LOGS}/{name}.err:\n{tail}")
    return parse(out), secs, guest_clock(out)


def disable_thp():
    """preexec_fn: no transparent huge pages for this process and what it executes
    (prctl PR_SET_THP_DISABLE, inherited across fork and kept across execve)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(41, 1, 0, 0, 0) != 0:  # PR_SET_THP_DISABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")


def host_thp():
    """The host's transparent huge page mode for anonymous memory (the bracketed word)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            m = re.search(r"\[(\w+)\]", f.read())
        return m.group(1) if m else "?"
    except OSError:
        return "unavailable"


def measure_interleaved(a, stage, name="vmm-interleaved", granularities=(4096, 256), suffix="",
                        thp=True):
    """Two 256 MiB volatile devices under one host bridge, regions made by the guest kernel.
    With thp=False our VMM runs without transparent huge pages, so node 0's RAM has 4 KiB
    host pages like the interleaved region (the page-size control of the 4 KiB ratio)."""
    # The records: cxl-il2-4k / ram-il-4k, cxl-il2-256 / ram-il-256 (+ suffix).
    backings = [os.path.join(stage, f"{name}-cxl{i}.img") for i in range(2)]
    argv = [a.vmm, "run", "--host=direct", "--memory=1G", "--cpus=1"]
    argv += [f"--cxl-type3=volatile=256M,persistent=0,backing={b},id=cxl{i}"
             for i, b in enumerate(backings)]
    argv += ["--cmdline=memhp_default_state=offline",
             f"--guest-file={a.memio}:/usr/local/bin/memio", f"--timeout={a.timeout}", "--",
             "sh", "-c", interleaved_script(a, granularities, suffix)]
    status, out, err, secs = run_logged(name, argv, a.timeout + 60,
                                        preexec_fn=None if thp else disable_thp)
    for b in backings:
        if os.path.exists(b):
            os.unlink(b)
    if status != 0:
        tail = "\n".join(err.splitlines()[-25:])
        die(f"our VMM's interleaved run failed (status {status}); "
            f"{LOGS}/{name}.err:\n{tail}")
    return parse(out)


def placement(a):
    """--placement DIR: our VMM as a user runs it (`vmm run`, which moves into the nested host
    by itself where it must), the backing file first on a tmpfs, then in DIR (a normal file
    system); the CXL/RAM ratio of each and the second over the first."""
    tmpfs, why = ram_dir()
    if not tmpfs:
        die(why)
    os.makedirs(a.placement, exist_ok=True)
    fs_type = "?"
    target = os.path.realpath(a.placement)
    best = ""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and (target + "/").startswith(fields[1].rstrip("/") + "/") \
                    and len(fields[1]) >= len(best):
                best, fs_type = fields[1], fields[2]
    if fs_type == "tmpfs":
        die(f"--placement {a.placement} is on a tmpfs: give a directory on a disk file system")
    ratios = {}
    for name, where in (("tmpfs", tmpfs), ("disk", a.placement)):
        stage = tempfile.mkdtemp(prefix="cxlbench-", dir=where)
        try:
            records, secs, _ = measure_ours(a, stage, host=a.host, name=f"placement-{name}",
                                            script=placement_script(a))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        ratios[name] = {k: paired(records, "cxl-node1", "ram", f"{k}_best_mb_s")
                        for k in ("write", "read")}
        ratios[name]["cxl"] = {k: med(records, "cxl-node1", f"{k}_best_mb_s")
                               for k in ("write", "read")}
    lines = [f"CXL/RAM ratio by where the backing file lies (vmm run --host={a.host}, 512 MiB "
             f"volatile CXL device, memio over {a.size}, {a.repeat} interleaved runs x "
             f"{a.rounds} rounds; median (min-max) of per-run best rates)",
             f"  tmpfs: {tmpfs}   disk: {a.placement} ({fs_type})"]
    for name in ("tmpfs", "disk"):
        r = ratios[name]
        lines.append(f"ratio ours CXL/RAM, backing on {name:5s}  write {fmt_p(r['write'])}  "
                     f"read {fmt_p(r['read'])}   (CXL MB/s: write {fmt(r['cxl']['write'])}, "
                     f"read {fmt(r['cxl']['read'])})")
    verdicts = []
    for k in ("write", "read"):
        t, d = ratios["tmpfs"][k], ratios["disk"][k]
        if t and d:
            q = d[0] / t[0]
            verdicts.append(f"{k} {q:.2f}")
            ratios[f"disk/tmpfs {k}"] = q
    ok = all(v >= 0.9 for k, v in ratios.items() if k.startswith("disk/tmpfs"))
    lines.append(f"disk / tmpfs ratio: {', '.join(verdicts)}   goal within 10 %: "
                 + ("met" if ok and verdicts else "NOT MET"))
    lines.append(f"logs in {LOGS}/")
    text = "\n".join(lines)
    print(text, flush=True)
    with open(os.path.join(WORK, "cxl-placement-results.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(WORK, "cxl-placement-results.json"), "w") as f:
        json.dump({"ratios": ratios, "args": vars(a)}, f, indent=1)
    return 0


def qemu_initrd(a, stage):
    """The pinned guest initramfs plus a cpio with memio and /vmm/args (what our VMM appends)."""
    with open(a.memio, "rb") as f:
        memio = f.read()
    args = "set -- 'sh' '-c' '" + qemu_script(a).replace("'", "'\\''") + "'\n"
    entries = [
        ("usr", 0o040755, b"", (0, 0), 2),
        ("usr/local", 0o040755, b"", (0, 0), 2),
        ("usr/local/bin", 0o040755, b"", (0, 0), 2),
        ("usr/local/bin/memio", 0o100755, memio, (0, 0), 1),
        ("vmm", 0o040755, b"", (0, 0), 2),
        ("vmm/args", 0o100644, args.encode(), (0, 0), 1),
    ]
    extra = b"".join(bootbench.cpio_record(1000 + i, *e) for i, e in enumerate(entries))
    extra += bootbench.cpio_record(0, "TRAILER!!!", 0)
    path = os.path.join(stage, "qemu-initramfs.cpio")
    with open(a.initrd, "rb") as src, open(path, "wb") as dst:
        base = src.read()
        dst.write(base + b"\0" * (-len(base) % 4) + extra)
    return path


def measure_qemu(a, stage, qemu, name):
    """One QEMU (binary `qemu`, logs named `name`): returns (records, seconds, guest clock,
    None) or (records or None, seconds, guest clock, what went wrong)."""
    if shutil.which(qemu) is None:
        return None, 0, None, f"QEMU binary '{qemu}' not found"
    pmem = os.path.join(stage, "qemu-cxl-pmem.raw")
    lsa = os.path.join(stage, "qemu-cxl-lsa.raw")
    for p, size in ((pmem, 256 << 20), (lsa, 128 << 10)):
        with open(p, "wb") as f:
            f.truncate(size)
    files = {n: os.path.join(stage, f"{name}-{n}") for n in ("console", "stdout", "stderr")}
    argv = [
        qemu, "-accel", "kvm", "-cpu", "host,hypervisor=off", "-smp", "1", "-m", "1G",
        "-M", "q35,cxl=on", "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot", "-kernel", a.kernel, "-initrd", qemu_initrd(a, stage),
        "-append", f"{CMDLINE} {QEMU_CMDLINE_EXTRA}",
        "-serial", f"file:{files['console']}", "-serial", f"file:{files['stdout']}",
        "-serial", f"file:{files['stderr']}",
        # The guest init writes the command's status to port 0x501: QEMU exits with
        # (status << 1) | 1 there.
        "-device", "isa-debug-exit,iobase=0x501,iosize=1",
        "-object", f"memory-backend-file,id=cxl-mem0,share=on,mem-path={pmem},size=256M",
        "-object", f"memory-backend-file,id=cxl-lsa0,share=on,mem-path={lsa},size=128K",
        "-device", "pxb-cxl,bus_nr=12,bus=pcie.0,id=cxl.0",
        "-device", "cxl-rp,port=0,bus=cxl.0,id=rp0,chassis=0,slot=2",
        "-device", "cxl-type3,bus=rp0,memdev=cxl-mem0,lsa=cxl-lsa0,id=cxl-pmem0,sn=0x1234",
        "-M", "cxl-fmw.0.targets.0=cxl.0,cxl-fmw.0.size=4G",
    ]
    status, _, qerr, secs = run_logged(name, argv, a.qemu_timeout)
    logs = {}
    for n, p in files.items():
        try:
            with open(p, errors="replace") as f:
                logs[n] = f.read()
        except OSError:
            logs[n] = ""
        with open(os.path.join(LOGS, f"{name}-guest.{n}"), "w") as f:
            f.write(logs[n])
    records = parse(logs["stdout"])
    clock = guest_clock(logs["stdout"])
    if status is None:
        why = f"QEMU did not finish within {a.qemu_timeout} s (killed)"
    elif status != 1:  # (0 << 1) | 1: the guest command exited 0
        guest = (status >> 1) if status & 1 else None
        why = (f"QEMU exited with status {status}"
               + (f" (guest command status {guest})" if guest is not None else ""))
    else:
        return records, secs, clock, None
    tail = "\n".join((logs["stderr"] + qerr).strip().splitlines()[-15:])
    console = "\n".join(logs["console"].strip().splitlines()[-10:])
    return (records or None), secs, clock, (f"{why}; guest stderr / QEMU stderr tail:\n{tail}\n"
                                     f"console tail:\n{console}")


def guest_clock(text):
    m = CLOCK_RE.search(text)
    return (float(m.group(1)), m.group(2)) if m else None


def parse(text):
    records = []
    for line in text.splitlines():
        m = BW_RE.match(line.strip())
        if m:
            fields = dict(kv.split("=", 1) for kv in m.group(2).split())
            fields["label"] = m.group(1)
            records.append(fields)
    return records


def ram_dir():
    """A tmpfs directory for the backing files, kernel and initramfs (the nested host's /tmp is
    the outer machine's, over 9p); (path, None) or (fallback, a warning for the report)."""
    mounts = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3:
                mounts[fields[1]] = fields[2]
    for d in ("/dev/shm", "/tmp", "/run/shm"):
        if mounts.get(d) == "tmpfs" and os.access(d, os.W_OK):
            return d, None
    return None, (f"no writable tmpfs found (tried /dev/shm, /tmp, /run/shm): backing files "
                  f"are in {tempfile.gettempdir()}, whose write-back costs may show in the CXL "
                  "figures")


def inner(a):
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        die("/dev/kvm is not usable here")
    if os.environ.get("VMM_NESTED_HOST", "") not in ("", "0"):
        bootbench.hold_kvm_static_keys()
    stage_dir, stage_note = ram_dir()
    stage = tempfile.mkdtemp(prefix="cxlbench-", dir=stage_dir)
    a.stage_note = stage_note
    a.stage = os.path.dirname(stage)
    try:
        # Kernel, initramfs and memio from a RAM-backed copy (the nested host's / is 9p).
        for attr in ("kernel", "initrd", "memio"):
            dst = os.path.join(stage, os.path.basename(getattr(a, attr)))
            shutil.copyfile(getattr(a, attr), dst)
            shutil.copymode(getattr(a, attr), dst)
            setattr(a, attr, dst)
        ours = measure_ours(a, stage) if not a.no_vmm else ([], 0, None)
        a.interleaved = None
        if not a.no_vmm:
            a.interleaved = measure_interleaved(a, stage)
            a.interleaved += measure_interleaved(a, stage, "vmm-interleaved-4k-pages", (4096,),
                                                 "-4kpages", thp=False)
        a.host_thp = host_thp()
        qemus = [("qemu", a.qemu)] + ([("qemu-sid", a.qemu_sid)] if a.qemu_sid else [])
        runs = []
        for name, binary in qemus:
            run = ((None, 0, None, "skipped (--no-qemu)") if a.no_qemu
                   else measure_qemu(a, stage, binary, name))
            runs.append((name, binary, run))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report(a, ours, runs)


# ---------------------------------------------------------------------------------------------
# Report


def med(records, label, key):
    vals = [float(r[key]) for r in records if r["label"] == label]
    return statistics.median(vals) if vals else None


def fmt(v):
    """Four significant digits: QEMU's CXL rates are below 1 MB/s, RAM's in the thousands."""
    return "-" if v is None else f"{v:.4g}"


def paired(records, num, den, key):
    """Median, min, max over the interleaved runs of num/den, the i-th run of `num` paired with
    the i-th of `den` (adjacent in time, so slow drift of the machine cancels)."""
    n = [float(r[key]) for r in records if r["label"] == num]
    d = [float(r[key]) for r in records if r["label"] == den]
    ratios = [x / y for x, y in zip(n, d) if y > 0]
    if not ratios:
        return None
    return statistics.median(ratios), min(ratios), max(ratios)


def nodes_text(nodes):
    """memio's `node:pages` list; move_pages reports an error (e.g. -2) for device memory."""
    if all(n.startswith("-") for n in nodes.split(",")):
        return "(device memory: no NUMA page)"
    return "node:pages " + nodes


def report(a, ours_run, qemu_runs):
    ours, ours_secs, ours_clock = ours_run
    nested = os.environ.get("VMM_NESTED_HOST") == "1"
    lines = [f"CXL memory vs RAM: sequential write/read bandwidth in the same guest (memio, "
             f"{a.repeat} interleaved runs x {a.rounds} rounds; MB = 10^6 bytes)"]
    if nested:
        lines.append("  NOTE: measured inside ONE nested host (QEMU TCG + kvm-amd) for both "
                     "VMMs: absolute MB/s")
        lines.append("        are TCG speeds; only ratios within one guest mean anything.")
    lines.append(f"  vmm   {a.vmm_label}: --memory=1G --cpus=1 --cxl-precommit, 512 MiB volatile "
                 f"CXL device (node 1), backing file in {a.stage} "
                 f"({'tmpfs' if not a.stage_note else 'NOT tmpfs'})")
    for name, binary, _ in qemu_runs:
        lines.append(f"  {name:8s} {bootbench.qemu_version(binary)}: -M q35,cxl=on, cxl-type3 "
                     f"256 MiB pmem (devdax), -accel kvm -cpu host,hypervisor=off, 1 GiB, "
                     f"1 vCPU, '{QEMU_CMDLINE_EXTRA}'")
    if getattr(a, "stage_note", None):
        lines.append(f"  WARNING: {a.stage_note}")
    lines.append("  access: vec = memset + vectorised sum; u64 = one 64-bit load/store per word")
    lines.append("  best = a run's fastest round (interference only ever slows a round down), "
                 "mean = its total bytes / total time;")
    lines.append("  both the median over the runs")
    lines.append("")
    lines.append(f"{'VMM':8s} {'memory':25s} {'bytes':>10s} {'access':>6s}  {'write MB/s':>16s} "
                 f"{'read MB/s':>16s} {'1st touch':>9s}  pages")
    lines.append(f"{'':8s} {'':25s} {'':>10s} {'':>6s}  {'best':>7s} {'mean':>8s} "
                 f"{'best':>7s} {'mean':>8s}")

    def rows(vmm, records, labels):
        for label, desc in labels:
            rs = [r for r in records if r["label"] == label]
            if not rs:
                continue
            part = sum(int(r.get("partial", "0")) for r in rs)
            sizes = sorted({int(r["bytes"]) for r in rs})
            size = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}+"
            lines.append(
                f"{vmm:8s} {desc:25s} {size:>10s} {rs[0]['access']:>6s}  "
                f"{fmt(med(records, label, 'write_best_mb_s')):>7s} "
                f"{fmt(med(records, label, 'write_mb_s')):>8s} "
                f"{fmt(med(records, label, 'read_best_mb_s')):>7s} "
                f"{fmt(med(records, label, 'read_mb_s')):>8s} "
                f"{fmt(med(records, label, 'first_touch_mb_s')):>9s}  "
                f"{nodes_text(rs[0]['nodes'])}"
                + (f" (time cap cut {part} run(s) short)" if part else ""))

    rows("vmm", ours, [("ram", "RAM, anon node 0"), ("cxl-node1", "CXL, anon node 1"),
                       ("ram-b", "RAM, anon node 0"), ("cxl-devdax", "CXL, /dev/dax0.0"),
                       ("ram-u64", "RAM, anon node 0"), ("cxl-devdax-u64", "CXL, /dev/dax0.0")])
    interleaved = getattr(a, "interleaved", None)
    if interleaved:
        rows("vmm", interleaved, [("ram-il-4k", "RAM, anon node 0"),
                                  ("cxl-il2-4k", "CXL 2-way 4K, node 1"),
                                  ("ram-il-256", "RAM, anon node 0"),
                                  ("cxl-il2-256", "CXL 2-way 256B, node 1"),
                                  ("ram-il-4k-4kpages", "RAM, node 0, no THP"),
                                  ("cxl-il2-4k-4kpages", "CXL 2-way 4K, no THP")])
    for name, _, (qemu, _, _, _) in qemu_runs:
        if qemu:
            rows(name, qemu, [("ram", "RAM, anon"), ("ram-u64", "RAM, anon"),
                              ("cxl-devdax-u64", "CXL pmem, /dev/dax0.0")])
    lines.append("")
    lines.append("ratios CXL/RAM: median (min-max) over the interleaved runs of the per-run best "
                 "rates")
    results = {}

    def ratio_line(name, records, num, den, goal=False, first_touch=False):
        w = paired(records, num, den, "write_best_mb_s")
        r = paired(records, num, den, "read_best_mb_s")
        t = paired(records, num, den, "first_touch_mb_s") if first_touch else None
        results[name] = {"write": w, "read": r, "first_touch": t}
        verdict = ""
        level = goal if isinstance(goal, float) else 0.9
        if goal and w and r:
            worst = min(w[0], r[0], t[0] if t else w[0])
            verdict = f"  goal >= {level}: " + ("met" if worst >= level else "NOT MET")
        touch = f"  1st touch {fmt_p(t)}" if first_touch else ""
        lines.append(f"ratio {name:36s} write {fmt_p(w)}  read {fmt_p(r)}{touch}{verdict}")

    ratio_line("ours CXL/RAM (node 1 / node 0, vec)", ours, "cxl-node1", "ram", goal=True)
    ratio_line("ours CXL/RAM (devdax / node 0, vec)", ours, "cxl-devdax", "ram-b", goal=True)
    ratio_line("ours CXL/RAM (devdax / node 0, u64)", ours, "cxl-devdax-u64", "ram-u64")
    if interleaved:
        ratio_line("ours 2-way 4 KiB region / node 0", interleaved, "cxl-il2-4k", "ram-il-4k",
                   goal=0.95, first_touch=True)
        ratio_line("  the same, host pages 4 KiB for both", interleaved, "cxl-il2-4k-4kpages",
                   "ram-il-4k-4kpages", goal=0.95, first_touch=True)
        lines.append(f"  host transparent huge pages: [{getattr(a, 'host_thp', '?')}]. Node 0's "
                     "RAM is anonymous memory, which THP backs with 2 MiB host pages and")
        lines.append("  KVM maps with 2 MiB stage-2 entries; a 4 KiB-interleaved region can "
                     "only be mapped in 4 KiB pieces (each 2 MiB of it")
        lines.append("  spans both devices' files). The second line runs that guest with THP "
                     "off for our VMM (prctl PR_SET_THP_DISABLE),")
        lines.append("  so node 0 has 4 KiB host pages too: what is left is the cost of the "
                     "interleaved mapping itself.")
        ratio_line("ours 2-way 256 B region / node 0", interleaved, "cxl-il2-256", "ram-il-256",
                   first_touch=True)
        lines.append("  256 B granularity runs from a shadow copy (sub-page granules cannot be "
                     "mapped; written back every second)")
    for name, _, (qemu, _, _, why) in qemu_runs:
        label = "QEMU" if name == "qemu" else f"QEMU ({name})"
        if qemu and med(qemu, "cxl-devdax-u64", "write_best_mb_s"):
            ratio_line(f"{label} CXL/RAM (devdax / anon, u64)", qemu, "cxl-devdax-u64",
                       "ram-u64")
            lines.append(f"  {label}'s CXL window is emulated MMIO (every access exits to "
                         f"QEMU): its CXL runs have {a.qemu_rounds} round(s),")
            lines.append(f"  passes of at most {a.qemu_size},")
            lines[-1] += (f" each capped at ~{a.qemu_max_secs:g} s ('bytes' = what the first "
                          "pass reached; the later ones cover the same).")
            for key, what in (("write_best_mb_s", "write"), ("read_best_mb_s", "read")):
                o, q = med(ours, "cxl-devdax-u64", key), med(qemu, "cxl-devdax-u64", key)
                if o and q:
                    lines.append(f"  ours CXL / {label} CXL (devdax, u64, {what}): {o / q:.0f}x")
            rv, rq = med(ours, "ram", "read_best_mb_s"), med(qemu, "ram", "read_best_mb_s")
            wv, wq = med(ours, "ram", "write_best_mb_s"), med(qemu, "ram", "write_best_mb_s")
            if rv and rq and wv and wq:
                lines.append(f"  sanity: RAM in {label}'s guest / in ours: write {wq / wv:.2f}, "
                             f"read {rq / rv:.2f} (~1: the two guests run at comparable speed)")
        else:
            results[f"{label} CXL/RAM (devdax / anon, u64)"] = None
            lines.append(f"ratio {label} CXL/RAM: not measured: {why}")
        if why and qemu:
            lines.append(f"  NOTE: {label}'s run did not end cleanly: {why}")
    lines.append("")
    clocks = [("our", ours_clock, ours_secs)] + [
        (f"{name}'s", run[2], run[1]) for name, _, run in qemu_runs]
    for name, clock, secs in clocks:
        if clock:
            lines.append(f"{name} guest: {secs:.0f} s wall time (launch to exit), guest clock "
                         f"{clock[0]:.0f} s at the end ({clock[1]})")
    lines.append(f"logs in {LOGS}/")
    text = "\n".join(lines)
    print(text, flush=True)
    os.makedirs(WORK, exist_ok=True)
    with open(os.path.join(WORK, "cxl-bandwidth-results.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(WORK, "cxl-bandwidth-results.json"), "w") as f:
        json.dump({"nested": nested, "ratios": results, "vmm": ours,
                   "interleaved": interleaved,
                   "qemu": {name: {"binary": binary, "records": run[0], "problem": run[3]}
                            for name, binary, run in qemu_runs},
                   "args": vars(a)}, f, indent=1)


def fmt_p(p):
    if p is None:
        return f"{'-':>17s}"
    return f"{fmt_r(p[0])} ({fmt_r(p[1])}-{fmt_r(p[2])})".strip().rjust(17)


def fmt_r(v):
    if v is None:
        return "  -  "
    return f"{v:5.2f}" if v >= 0.01 else f"{v:.1e}"


# ---------------------------------------------------------------------------------------------


def build_memio():
    os.makedirs(WORK, exist_ok=True)
    out = os.path.join(WORK, "memio")
    rustc = os.environ.get("RUSTC", "rustc")
    res = subprocess.run([rustc, "--edition", "2024", "-O", "-C", "target-feature=+crt-static",
                          MEMIO_SRC, "-o", out + ".tmp"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        die(f"building memio failed:\n{res.stdout}")
    os.replace(out + ".tmp", out)
    return out


def main():
    p = argparse.ArgumentParser(
        prog="bench/cxl-bandwidth.sh",
        description="CXL Type 3 memory vs RAM: sequential write/read bandwidth in the same "
                    "guest, our VMM and QEMU's cxl-type3.")
    p.add_argument("--size", default="256M", help="bytes per memio pass (default 256M)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per memio run (default 3)")
    p.add_argument("--repeat", type=int, default=9,
                   help="interleaved RAM/CXL memio runs per kind (default 9: single runs "
                        "scatter by 10-20 %% inside the nested host)")
    p.add_argument("--qemu-size", default="1M",
                   help="bytes per pass on QEMU's CXL memory (default 1M)")
    p.add_argument("--qemu-rounds", type=int, default=1,
                   help="timed rounds per run on QEMU's CXL memory (default 1)")
    p.add_argument("--qemu-max-secs", type=float, default=10,
                   help="time cap per pass on QEMU's CXL memory, seconds (default 10)")
    p.add_argument("--no-qemu", action="store_true", help="measure our VMM only")
    p.add_argument("--placement", metavar="DIR", nargs="?", const=os.path.join(WORK, "placement"),
                   help="instead: our VMM through `vmm run` as a user runs it, backing file on a "
                        "tmpfs and then in DIR (a disk file system; default target/bench/"
                        "placement): CXL/RAM ratio of each, and disk/tmpfs (goal >= 0.9)")
    p.add_argument("--no-vmm", action="store_true", help="measure QEMU only")
    p.add_argument("--qemu-guest-script", default=None,
                   help="diagnostics: run this shell script in QEMU's guest instead (its "
                        "stdout/stderr land in target/bench/cxl-logs/qemu-guest.*)")
    p.add_argument("--timeout", type=int, default=1800, help="our guest's --timeout (s)")
    p.add_argument("--qemu-timeout", type=int, default=2400, help="QEMU's run, seconds")
    p.add_argument("--host", choices=("auto", "direct", "nested"), default="auto",
                   help="run on this /dev/kvm or inside the nested host (auto: nested when "
                        "/sys/module/kvm_pvm exists or /dev/kvm is unusable)")
    p.add_argument("--host-memory", default="4G", help="memory of the nested host (default 4G)")
    p.add_argument("--vmm", default=os.path.join(REPO, "target", "debug", "vmm"),
                   help="our VMM binary (default target/debug/vmm)")
    p.add_argument("--qemu", default=os.environ.get("VMM_QEMU", "qemu-system-x86_64"))
    p.add_argument("--qemu-sid", default=None, metavar="PATH",
                   help="the newest Debian QEMU to measure too (default: sid's, fetched into "
                        "the cache by bench/qemu_sid.py)")
    p.add_argument("--no-qemu-sid", action="store_true",
                   help="measure the machine's QEMU only")
    p.add_argument("--profile", default="7.2", help="guest image profile (default 7.2)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kernel", help=argparse.SUPPRESS)
    p.add_argument("--initrd", help=argparse.SUPPRESS)
    p.add_argument("--memio", help=argparse.SUPPRESS)
    p.add_argument("--vmm-label", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    for s in (a.size, a.qemu_size):
        size_bytes(s)
    if min(a.rounds, a.repeat, a.qemu_rounds) < 1:
        die("--rounds, --repeat and --qemu-rounds must be at least 1")
    a.vmm = os.path.abspath(a.vmm)
    if not os.access(a.vmm, os.X_OK):
        die(f"our VMM binary {a.vmm} is missing: build it (cargo build) or pass --vmm")
    if a.inner:
        a.vmm_label = a.vmm_label or a.vmm
        inner(a)
        return 0

    if a.no_qemu_sid or a.no_qemu:
        a.qemu_sid = None
    elif not a.qemu_sid:
        import qemu_sid
        try:
            a.qemu_sid = qemu_sid.ensure_qemu_sid(log=note)
        except qemu_sid.QemuSidError as e:
            die(f"the newest Debian QEMU: {e} (or pass --no-qemu-sid)")
    memio = build_memio()
    os.makedirs(WORK, exist_ok=True)
    shutil.rmtree(LOGS, ignore_errors=True)
    if a.placement:
        a.memio = memio
        return placement(a)
    kernel, _, initrd = bootbench.pinned_images(a.vmm, a.profile)
    # A private copy of our binary: a concurrent `cargo build` must not swap it mid-run.
    snapshot = os.path.join(WORK, "vmm-cxl")
    shutil.copy2(a.vmm, snapshot + ".tmp")
    os.replace(snapshot + ".tmp", snapshot)
    argv = [os.path.abspath(__file__), "--inner", "--kernel", kernel, "--initrd", initrd,
            "--memio", memio, "--vmm", snapshot, "--vmm-label", a.vmm, "--qemu", a.qemu,
            "--size", a.size, "--rounds", str(a.rounds), "--repeat", str(a.repeat),
            "--qemu-size", a.qemu_size, "--qemu-max-secs", str(a.qemu_max_secs),
            "--qemu-rounds", str(a.qemu_rounds),
            "--timeout", str(a.timeout), "--qemu-timeout", str(a.qemu_timeout)]
    if a.no_qemu:
        argv.append("--no-qemu")
    if a.qemu_sid:
        argv += ["--qemu-sid", a.qemu_sid]
    if a.no_vmm:
        argv.append("--no-vmm")
    if a.qemu_guest_script:
        argv += ["--qemu-guest-script", os.path.abspath(a.qemu_guest_script)]
    nested = a.host == "nested" or (a.host == "auto" and bootbench.needs_nested())
    if not nested:
        os.execv(sys.executable, [sys.executable] + argv)
    note("this /dev/kvm cannot run a stock guest (nested PVM): measuring both VMMs inside ONE "
         "nested host (QEMU TCG + kvm-amd); only ratios are meaningful")
    env = dict(os.environ)
    env.setdefault("VMM_HOST_TCG_THREAD", "multi")
    res = subprocess.run([snapshot, "host", "--memory", a.host_memory, "--", sys.executable]
                         + argv, cwd=REPO, env=env)
    if res.returncode != 0:
        die(f"the measurement inside the nested host failed (status {res.returncode})",
            res.returncode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
