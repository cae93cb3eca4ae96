#!/usr/bin/env python3
"""RDMA NIC benchmark (a benchmark, not a test): bench/rdma.sh --help.

perftest's ib_write_bw (--size bytes, --iters iterations) and ib_write_lat (64 bytes,
--lat-iters iterations) between two guests, in two setups, one after the other:

  ours   two `vmm run --rdma-nic` guests (vmxnet3 + PVRDMA, our RoCEv2 engine in the VMM),
         their NICs joined by the UDP fabric on loopback; the tools run on vmw_pvrdma0,
         GID index 1 (the IPv4-mapped RoCE v2 GID).
  QEMU   two guests of this machine's qemu-system-x86_64 (-accel kvm, 1 vCPU, 1 GiB), each with
         a virtio-net NIC, the two joined by QEMU's UDP socket netdev on loopback, running
         Linux's soft RoCE (rdma_rxe) on it: `rdma link add rxe0 type rxe netdev eth0`; the
         tools run on rxe0, GID index 1. This is the setup users pick today for RDMA in a VM
         without RDMA hardware.

Both use the same pinned guest kernel and initramfs (the QEMU guests get virtio_net, ib_uverbs
and rdma_rxe loaded at boot through /vmm/modules). The client's perftest report is parsed:
ib_write_bw's average (perftest 25's BW average column, MiB/s), ib_write_lat's typical
and average microseconds. Printed: both setups' figures and the ratios ours/QEMU (bandwidth:
higher is better, goal >= 2; latency: QEMU/ours, higher is better).

Where this machine's /dev/kvm cannot run a stock guest (nested PVM), everything runs inside ONE
nested host with 2 vCPUs (`vmm host --cpus 2 -- bench/rdma.py --inner ...`), where our VMM and
QEMU both use the nested host's kvm-amd: absolute figures are TCG-distorted, only the ratios
mean something.

Results: stdout, target/bench/rdma-results.{txt,json}; guest outputs in target/bench/rdma-logs/.
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
WORK = os.path.join(REPO, "target", "bench")  # never /tmp: the nested host hides it
LOGS = os.path.join(WORK, "rdma-logs")
CMDLINE = "console=ttyS0 reboot=acpi panic=-1 quiet"  # our VMM's base command line

sys.path.insert(0, BENCH)
import boot as bootbench  # noqa: E402  (pinned_images, cpio_record, needs_nested)

CLIENT_IP, SERVER_IP = "10.77.0.1", "10.77.0.2"
CLIENT_MAC, SERVER_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def die(msg, status=1):
    print(f"rdma.sh: error: {msg}", file=sys.stderr)
    sys.exit(status)


def note(msg):
    print(f"rdma.sh: {msg}", file=sys.stderr, flush=True)


def free_udp_ports(n):
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def guest_script(a, role, dev, setup=""):
    """The shell script of one guest: `setup`, wait for the peer, then the two tools (the
    client retries while the server is not listening yet). Lines `bw-…`/`lat-…` carry the
    tools' status and output."""
    peer = SERVER_IP if role == "client" else CLIENT_IP
    target = f" {SERVER_IP}" if role == "client" else ""
    tools = [
        ("bw", f"ib_write_bw -d {dev} -x 1 -s {a.size} -n {a.iters} -p 19101{target}"),
        ("lat", f"ib_write_lat -d {dev} -x 1 -s 64 -n {a.lat_iters} -p 19102{target}"),
    ]
    s = [setup,
         "i=0; until ping -c 1 -W 1 %s >/dev/null 2>&1; do i=$((i+1)); "
         "[ $i -lt 600 ] || { echo 'no ping to %s'; exit 1; }; done" % (peer, peer),
         "st=0"]
    # perftest gives up when its CPU-clock samples scatter ("Can't produce a report"), which
    # TCG's clock sometimes makes them do; both sides then try again (up to 3 times).
    noise = "Can't produce a report\\|Failed to exchange data\\|Couldn't read remote address"
    for name, cmd in tools:
        if role == "client":
            s.append(f"n=0; a=0; while :; do timeout {a.tool_timeout} {cmd} >/tmp/{name} 2>&1; "
                     f"r=$?; [ $r = 0 ] && break; if grep -q \"{noise}\" /tmp/{name}; then "
                     f"a=$((a+1)); [ $a -lt 3 ] || break; else grep -q \"Couldn't connect\\|"
                     f"Unable to open\" /tmp/{name} || break; n=$((n+1)); [ $n -lt 60 ] || break; "
                     f"fi; sleep 2; done")
        else:
            s.append(f"a=0; while :; do timeout {a.tool_timeout} {cmd} >/tmp/{name} 2>&1; r=$?; "
                     f"[ $r = 0 ] && break; grep -q \"{noise}\" /tmp/{name} || break; "
                     f"a=$((a+1)); [ $a -lt 3 ] || break; done")
        s.append(f"echo \"{name}-exit $r\"; sed 's/^/{name}-out /' /tmp/{name}; "
                 f"[ $r = 0 ] || st=1")
    s.append("exit $st")
    return "\n".join(s) + "\n"


BW_ROW = re.compile(r"^bw-out\s+(\d+)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)", re.M)
LAT_ROW = re.compile(r"^lat-out\s+(\d+)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)",
                     re.M)


def parse_client(out):
    """{'bw_mib_s', 'lat_typical_us', 'lat_avg_us'} from the client's output (None when a tool
    failed)."""
    r = {"bw_mib_s": None, "lat_typical_us": None, "lat_avg_us": None}
    m = BW_ROW.search(out)
    if m and "bw-exit 0" in out:
        r["bw_mib_s"] = float(m.group(4))
    m = LAT_ROW.search(out)
    if m and "lat-exit 0" in out:
        r["lat_typical_us"] = float(m.group(5))
        r["lat_avg_us"] = float(m.group(6))
    return r


def run_pair(name, client_argv, server_argv, timeout):
    """Starts both guests, waits for both; returns (client status, client out, server status,
    server out). Outputs are kept in LOGS."""
    os.makedirs(LOGS, exist_ok=True)
    procs = {}
    for role, argv in (("server", server_argv), ("client", client_argv)):
        out = open(os.path.join(LOGS, f"{name}-{role}.out"), "wb")
        err = open(os.path.join(LOGS, f"{name}-{role}.err"), "wb")
        procs[role] = (subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err),
                       out, err)
    note(f"{name}: two guests started (logs in {LOGS}/{name}-*)")
    deadline = time.monotonic() + timeout
    status = {}
    for role, (p, out, err) in procs.items():
        try:
            status[role] = p.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            status[role] = None
        out.close()
        err.close()
    texts = {}
    for role in procs:
        with open(os.path.join(LOGS, f"{name}-{role}.out"), errors="replace") as f:
            texts[role] = f.read()
    return status["client"], texts["client"], status["server"], texts["server"]


def measure_ours(a):
    p1, p2 = free_udp_ports(2)

    def argv(role, mac, ip, local, peer):
        nic = f"mac={mac},ip={ip}/24,fabric=udp:127.0.0.1:{local},peer=127.0.0.1:{peer}"
        return [a.vmm, "run", "--host=direct", "--memory=1G", "--cpus=1",
                f"--timeout={a.timeout}", f"--rdma-nic={nic}", "--", "sh", "-c",
                guest_script(a, role, "vmw_pvrdma0")]

    cs, co, ss, so = run_pair("ours", argv("client", CLIENT_MAC, CLIENT_IP, p1, p2),
                              argv("server", SERVER_MAC, SERVER_IP, p2, p1), a.timeout + 120)
    return check("ours", cs, co, ss, so, ok_status=0)


def qemu_initrd(a, role, stage):
    """The pinned initramfs plus /vmm/modules (virtio_net, ib_uverbs, rdma_rxe) and /vmm/args."""
    setup = ("dev=''; for d in /sys/class/net/*; do [ \"$(cat $d/address)\" = '%s' ] && "
             "dev=${d##*/}; done; [ -n \"$dev\" ] || { echo 'no virtio-net interface'; exit 1; }\n"
             "rdma link add rxe0 type rxe netdev $dev || exit 1\n"
             "rdma link show rxe0/1 >&2" % (CLIENT_MAC if role == "client" else SERVER_MAC))
    script = guest_script(a, role, "rxe0", setup)
    args = "set -- 'sh' '-c' '" + script.replace("'", "'\\''") + "'\n"
    entries = [
        ("vmm", 0o040755, b"", (0, 0), 2),
        ("vmm/modules", 0o100644, b"virtio_net\nib_uverbs\nrdma_rxe\n", (0, 0), 1),
        ("vmm/args", 0o100644, args.encode(), (0, 0), 1),
    ]
    extra = b"".join(bootbench.cpio_record(1000 + i, *e) for i, e in enumerate(entries))
    extra += bootbench.cpio_record(0, "TRAILER!!!", 0)
    path = os.path.join(stage, f"qemu-{role}-initramfs.cpio")
    with open(a.initrd, "rb") as src, open(path, "wb") as dst:
        base = src.read()
        dst.write(base + b"\0" * (-len(base) % 4) + extra)
    return path


def measure_qemu(a):
    if shutil.which(a.qemu) is None:
        return None, f"QEMU binary '{a.qemu}' not found"
    stage = os.path.join(WORK, "rdma-stage")
    os.makedirs(stage, exist_ok=True)
    p1, p2 = free_udp_ports(2)

    def argv(role, mac, ip, local, peer):
        files = [os.path.join(LOGS, f"qemu-{role}.{n}") for n in ("console", "stdout", "stderr")]
        return [
            a.qemu, "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "1G", "-M", "q35",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", a.kernel, "-initrd", qemu_initrd(a, role, stage),
            "-append", f"{CMDLINE} vmm.nic={mac},{ip}/24",
            "-serial", f"file:{files[0]}", "-serial", f"file:{files[1]}",
            "-serial", f"file:{files[2]}",
            # The guest init writes the command's status to port 0x501: QEMU exits with
            # (status << 1) | 1 there.
            "-device", "isa-debug-exit,iobase=0x501,iosize=1",
            "-netdev", f"socket,id=n0,udp=127.0.0.1:{peer},localaddr=127.0.0.1:{local}",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
        ]

    cs, _, ss, _ = run_pair("qemu", argv("client", CLIENT_MAC, CLIENT_IP, p1, p2),
                            argv("server", SERVER_MAC, SERVER_IP, p2, p1), a.timeout + 120)
    texts = {}
    for role in ("client", "server"):
        with open(os.path.join(LOGS, f"qemu-{role}.stdout"), errors="replace") as f:
            texts[role] = f.read()
    return check("QEMU rxe", cs, texts["client"], ss, texts["server"], ok_status=1)


def check(name, cs, co, ss, so, ok_status):
    r = parse_client(co)
    problems = []
    if cs != ok_status or ss != ok_status:
        problems.append(f"exit status client {cs}, server {ss}")
    for k, v in r.items():
        if v is None:
            problems.append(f"no {k}")
    if problems:
        tail = "\n".join(co.strip().splitlines()[-20:])
        return r, f"{name}: {'; '.join(problems)}; client output tail:\n{tail}"
    return r, None


def fmt(v, unit=""):
    return "n/a" if v is None else f"{v:.2f}{unit}"


def inner(a):
    if os.environ.get("VMM_NESTED_HOST", "") not in ("", "0"):
        # Two vCPUs of multi-threaded TCG: keep KVM's static keys from flipping (boot.py).
        bootbench.hold_kvm_static_keys()
    results, problems = {}, []
    if not a.no_vmm:
        results["ours"], why = measure_ours(a)
        if why:
            problems.append(why)
    if not a.no_qemu:
        results["qemu_rxe"], why = measure_qemu(a)
        if why:
            problems.append(why)
    lines = [f"ib_write_bw -s {a.size} -n {a.iters} and ib_write_lat -s 64 -n {a.lat_iters} "
             f"between two guests (client's report)"]
    labels = {"ours": f"ours (vmm {a.vmm_label}, PVRDMA)", "qemu_rxe": f"QEMU ({a.qemu}) rxe "
              "over virtio-net"}
    for k, r in results.items():
        if r is None:
            continue
        lines.append(f"  {labels[k]:50s} write_bw {fmt(r['bw_mib_s'], ' MiB/s'):>14s}   write_lat "
                     f"typical {fmt(r['lat_typical_us'], ' us')}, avg {fmt(r['lat_avg_us'], ' us')}")
    o, q = results.get("ours"), results.get("qemu_rxe")
    ratios = {}
    if o and q and o["bw_mib_s"] and q["bw_mib_s"]:
        ratios["bw_ours_over_qemu"] = o["bw_mib_s"] / q["bw_mib_s"]
        lines.append(f"ratio bandwidth ours/QEMU-rxe {ratios['bw_ours_over_qemu']:.2f}   goal >= 2: "
                     + ("met" if ratios["bw_ours_over_qemu"] >= 2 else "NOT MET"))
    if o and q and o["lat_typical_us"] and q["lat_typical_us"]:
        ratios["lat_qemu_over_ours"] = q["lat_typical_us"] / o["lat_typical_us"]
        lines.append(f"ratio latency QEMU-rxe/ours (typical) {ratios['lat_qemu_over_ours']:.2f}"
                     "   (> 1: ours is faster)")
    if a.nested:
        lines.append("(inside ONE nested host: TCG-distorted absolute figures, compare ratios)")
    lines += problems
    lines.append(f"logs in {LOGS}/")
    text = "\n".join(lines)
    print(text, flush=True)
    with open(os.path.join(WORK, "rdma-results.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(WORK, "rdma-results.json"), "w") as f:
        json.dump({"results": results, "ratios": ratios, "problems": problems, "args": vars(a)},
                  f, indent=1)
    return 1 if problems else 0


def main():
    p = argparse.ArgumentParser(
        prog="bench/rdma.sh",
        description="RDMA between two guests: ib_write_bw and ib_write_lat over our PVRDMA NIC "
                    "and over Linux rxe on QEMU virtio-net; figures and ratios.")
    p.add_argument("--size", type=int, default=65536, help="ib_write_bw message size (65536)")
    p.add_argument("--iters", type=int, default=2000, help="ib_write_bw iterations (2000)")
    p.add_argument("--lat-iters", type=int, default=1000, help="ib_write_lat iterations (1000)")
    p.add_argument("--no-qemu", action="store_true", help="measure our VMM only")
    p.add_argument("--no-vmm", action="store_true", help="measure QEMU rxe only")
    p.add_argument("--timeout", type=int, default=1800, help="each guest's time limit (s)")
    p.add_argument("--tool-timeout", type=int, default=900, help="each tool's time limit (s)")
    p.add_argument("--host", choices=("auto", "direct", "nested"), default="auto",
                   help="run on this /dev/kvm or inside the nested host (auto: nested when "
                        "/sys/module/kvm_pvm exists or /dev/kvm is unusable)")
    p.add_argument("--host-memory", default="4G", help="memory of the nested host (default 4G)")
    p.add_argument("--vmm", default=os.path.join(REPO, "target", "release", "vmm"),
                   help="our VMM binary (default target/release/vmm: the RoCE engine is "
                        "software, an unoptimised build measures the compiler's debug "
                        "output — about 5x slower here)")
    p.add_argument("--qemu", default=os.environ.get("VMM_QEMU", "qemu-system-x86_64"))
    p.add_argument("--profile", default="7.2", help="guest image profile (default 7.2)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--nested", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kernel", help=argparse.SUPPRESS)
    p.add_argument("--initrd", help=argparse.SUPPRESS)
    p.add_argument("--vmm-label", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if min(a.size, a.iters, a.lat_iters) < 1:
        die("--size, --iters and --lat-iters must be at least 1")
    if a.no_qemu and a.no_vmm:
        die("--no-qemu and --no-vmm leave nothing to measure")
    a.vmm = os.path.abspath(a.vmm)
    if not os.access(a.vmm, os.X_OK):
        die(f"our VMM binary {a.vmm} is missing: build it (cargo build --release -p vmm) or "
            "pass --vmm")
    if a.inner:
        a.vmm_label = a.vmm_label or a.vmm
        return inner(a)
    os.makedirs(WORK, exist_ok=True)
    shutil.rmtree(LOGS, ignore_errors=True)
    kernel, _, initrd = bootbench.pinned_images(a.vmm, a.profile)
    # A private copy of our binary: a concurrent `cargo build` must not swap it mid-run.
    snapshot = os.path.join(WORK, "vmm-rdma")
    shutil.copy2(a.vmm, snapshot + ".tmp")
    os.replace(snapshot + ".tmp", snapshot)
    argv = [os.path.abspath(__file__), "--inner", "--kernel", kernel, "--initrd", initrd,
            "--vmm", snapshot, "--vmm-label", a.vmm, "--qemu", a.qemu,
            "--size", str(a.size), "--iters", str(a.iters), "--lat-iters", str(a.lat_iters),
            "--timeout", str(a.timeout), "--tool-timeout", str(a.tool_timeout)]
    argv += [f for f, on in (("--no-qemu", a.no_qemu), ("--no-vmm", a.no_vmm)) if on]
    nested = a.host == "nested" or (a.host == "auto" and bootbench.needs_nested())
    if not nested:
        os.execv(sys.executable, [sys.executable] + argv)
    note("this /dev/kvm cannot run a stock guest (nested PVM): measuring both setups inside ONE "
         "nested host with 2 vCPUs (QEMU TCG + kvm-amd); only ratios are meaningful")
    env = dict(os.environ)
    env.setdefault("VMM_HOST_TCG_THREAD", "multi")
    res = subprocess.run([snapshot, "host", "--cpus", "2", "--memory", a.host_memory, "--",
                          sys.executable] + argv + ["--nested"], cwd=REPO, env=env)
    if res.returncode != 0:
        die(f"the measurement inside the nested host failed (status {res.returncode})",
            res.returncode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
