//! Guest tests: boot the pinned stock Debian kernel and the project's initramfs through
//! `vmm run`, and assert on what the guest's own tools report.
//!
//! On a host whose /dev/kvm cannot run a stock guest (this workplace's nested PVM), `vmm run`
//! moves into the nested-KVM host by itself and prints one notice line; these tests then take
//! minutes, not seconds. They are never skipped: a run that cannot boot fails.

mod common;

use common::{default_image, guest, guest_with_stdin};

const EXIT_GUEST_PANIC: i32 = 123;
const EXIT_TIMEOUT: i32 = 124;
/// Generous limit so a wedged guest fails the test instead of hanging CI.
const TIMEOUT: &str = "--timeout=900";

/// Prints the kernel release, then `module-missing NAME` for each module of the image's list
/// (`/etc/vmm/modules`, loaded by the guest init) that is not loaded, `not-mounted PATH:FS` for
/// each of tracefs, debugfs and configfs that init did not mount where systemd would (issue 11,
/// acceptance 4), and `lo-down` unless the loopback interface is up.
const RELEASE_AND_MISSING_MODULES: &str = r#"
    uname -r
    while read -r m _; do
        case "$m" in '' | '#'*) continue ;; esac
        [ -d "/sys/module/$(echo "$m" | tr - _)" ] || echo "module-missing $m"
    done </etc/vmm/modules
    for m in /sys/kernel/tracing:tracefs /sys/kernel/debug:debugfs /sys/kernel/config:configfs; do
        grep -q " ${m%%:*} ${m#*:} " /proc/mounts || echo "not-mounted $m"
    done
    [ $(($(cat /sys/class/net/lo/flags) & 1)) = 1 ] || echo "lo-down"
"#;

#[test]
fn uname_prints_the_pinned_kernel_release() {
    let image = default_image();
    let run = guest([
        "run",
        TIMEOUT,
        "--",
        "sh",
        "-c",
        RELEASE_AND_MISSING_MODULES,
    ]);
    run.expect_status(0);
    assert_eq!(run.stdout.trim(), image.kernel_release);
}

/// The 6.12 profile boots its own kernel with its modules loaded. It also carries `sva-test`
/// (issue 9, acceptance 8): 6.12 has no `uio_pci_generic_sva`, so the tool says so in one line
/// and exits 2 instead of waiting for an engine.
#[test]
fn six_twelve_profile_boots_its_own_kernel() {
    let script =
        format!("{RELEASE_AND_MISSING_MODULES}\n sva-test 2>&1; echo \"sva-test-exit $?\"");
    let run = guest([
        "run",
        TIMEOUT,
        "--profile",
        "6.12",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    run.expect_status(0);
    let mut lines = run.stdout.lines();
    assert!(
        lines.next().unwrap_or_default().starts_with("6.12."),
        "{}",
        run.stdout
    );
    let rest: Vec<&str> = lines.collect();
    assert!(
        !rest.iter().any(|l| l.starts_with("module-missing")
            || l.starts_with("not-mounted")
            || *l == "lo-down"),
        "modules missing, file systems not mounted or lo down: {}",
        run.stdout
    );
    // Exactly one line from sva-test, naming the kernel and the missing driver.
    let said: Vec<&&str> = rest.iter().filter(|l| l.starts_with("sva-test:")).collect();
    assert_eq!(said.len(), 1, "{}", run.stdout);
    assert!(
        said[0].contains("this kernel (6.12.")
            && said[0].contains("lacks the uio_pci_generic_sva driver"),
        "{}",
        run.stdout
    );
    assert_eq!(
        rest.last().copied(),
        Some("sva-test-exit 2"),
        "{}",
        run.stdout
    );
}

#[test]
fn two_cpus_are_online() {
    let run = guest(["run", TIMEOUT, "--cpus", "2", "--", "nproc"]);
    run.expect_status(0);
    assert_eq!(run.stdout.trim(), "2");
}

#[test]
fn four_gib_across_the_32bit_hole() {
    let run = guest([
        "run",
        TIMEOUT,
        "--memory",
        "4G",
        "--",
        "cat",
        "/proc/meminfo",
    ]);
    run.expect_status(0);
    let kib: u64 = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {}", run.stdout));
    let expected = 4u64 << 20; // KiB
    let ratio = kib as f64 / expected as f64;
    assert!(
        (0.95..=1.0).contains(&ratio),
        "MemTotal {kib} kB is not within 5% of 4 GiB ({ratio:.3})"
    );
}

#[test]
fn command_exit_status_passes_through() {
    let run = guest([
        "run",
        TIMEOUT,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    run.expect_status(7);
    assert_eq!(run.stdout, "out\n");
    assert!(run.stderr.contains("err\n"), "{}", run.stderr);
}

#[test]
fn arguments_reach_the_guest_verbatim() {
    let tricky = "it's a \"quoted\" $HOME `x` \\ arg";
    let run = guest([
        "run",
        TIMEOUT,
        "--",
        "printf",
        "%s|",
        tricky,
        "",
        "two words",
    ]);
    run.expect_status(0);
    assert_eq!(run.stdout, format!("{tricky}||two words|"));
}

#[test]
fn guest_kernel_panic_gives_the_panic_status() {
    let run = guest([
        "run",
        TIMEOUT,
        "--",
        "sh",
        "-c",
        "echo c > /proc/sysrq-trigger",
    ]);
    run.expect_status(EXIT_GUEST_PANIC);
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("guest kernel panic"), "{}", run.stderr);
}

#[test]
fn timeout_fires_on_a_hung_command() {
    let run = guest(["run", "--timeout", "90", "--", "sleep", "1000"]);
    run.expect_status(EXIT_TIMEOUT);
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("timed out"), "{}", run.stderr);
}

#[test]
fn bzimage_and_vmlinux_both_boot() {
    let image = default_image();
    for kernel in [&image.bzimage, &image.vmlinux] {
        let run = guest([
            "run".as_ref(),
            TIMEOUT.as_ref(),
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--initrd".as_ref(),
            image.initramfs.as_os_str(),
            "--".as_ref(),
            "uname".as_ref(),
            "-r".as_ref(),
        ]);
        run.expect_status(0);
        assert_eq!(
            run.stdout.trim(),
            image.kernel_release,
            "kernel {}",
            kernel.display()
        );
    }
}

#[test]
fn guest_sees_host_bridge_and_extended_config_space() {
    // The host bridge at 00:00.0 and a PCIe device (the root port) whose config space is the full
    // 4096 bytes, with a real extended capability at 0x100 — as sysfs and lspci report them.
    let script = r#"
        set -e
        echo "class $(cat /sys/bus/pci/devices/0000:00:00.0/class)"
        echo "config-size $(wc -c < /sys/bus/pci/devices/0000:00:01.0/config)"
        echo "ext-header $(od -A n -t x4 -j 256 -N 4 /sys/bus/pci/devices/0000:00:01.0/config)"
        lspci
        echo "xxxx-lines $(lspci -xxxx -s 00:01.0 | grep -cE '^[0-9a-f]+: ')"
        lspci -vvv -s 00:01.0
    "#;
    let run = guest(["run", TIMEOUT, "--", "sh", "-c", script]);
    run.expect_status(0);
    let field = |name: &str| {
        run.stdout
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {name} in {}", run.stdout))
    };
    assert_eq!(field("class "), "0x060000");
    assert_eq!(field("config-size "), "4096");
    let header = u32::from_str_radix(&field("ext-header "), 16).unwrap();
    assert!(header != 0 && header != 0xffff_ffff, "header {header:#x}");
    // lspci -xxxx prints the 4096-byte space as 256 lines of 16 bytes.
    assert_eq!(field("xxxx-lines "), "256");
    assert!(run.stdout.contains("00:00.0 Host bridge"), "{}", run.stdout);
    assert!(run.stdout.contains("Capabilities: [100"), "{}", run.stdout);
    assert!(run.stdout.contains("MSI-X: Enable+"), "{}", run.stdout);
}

#[test]
fn boot_time_is_reported() {
    let run = guest(["run", TIMEOUT, "--boot-time", "--", "true"]);
    run.expect_status(0);
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("boot time"))
        .unwrap_or_else(|| panic!("no boot time line: {}", run.stderr));
    assert!(
        line.contains("kernel entry -> init") && line.contains(" ms"),
        "{line}"
    );
    assert!(!line.contains("not reached"), "{line}");
}

#[test]
fn interactive_console_runs_what_is_typed() {
    let input = b"echo answer-$((6 * 7))\npoweroff -f\n";
    let run = guest_with_stdin(["run", TIMEOUT], Some(input));
    run.expect_status(0);
    assert!(run.stdout.contains("answer-42"), "{}", run.stdout);
}

#[test]
fn guest_reboot_before_reporting_is_its_own_status() {
    // `reboot -f` resets the machine through the ACPI reset register; in command mode the VMM
    // ends the run and says the guest reset without reporting a status.
    let run = guest(["run", TIMEOUT, "--", "reboot", "-f"]);
    run.expect_status(122);
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("reset"), "{}", run.stderr);
}

#[test]
fn guest_poweroff_before_reporting_is_its_own_status() {
    let run = guest(["run", TIMEOUT, "--", "poweroff", "-f"]);
    run.expect_status(122);
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("powered off"), "{}", run.stderr);
}

/// The modules and programs the guest image builds from the kernel source (one boot):
/// `dmatest.ko` loads on request (not at boot) with the kernel's vermagic, `vfio-pci` loads,
/// the static VFIO selftests execute on the guest's userland, and `vfio-selftests` fails
/// clearly when the VM has no Intel I/OAT function.
#[test]
fn kernel_source_builds_load_and_run() {
    let script = r#"
        echo "at-boot $(grep -c '^dmatest' /proc/modules)"
        modprobe dmatest run=1 iterations=1000 threads_per_chan=2 && echo dmatest-loaded
        lsmod | grep '^dmatest'
        echo "release $(uname -r)"
        modinfo dmatest | grep vermagic
        vfio_pci_device_test -h 0000:00:00.0; echo "device-test-help-exit $?"
        vfio_dma_mapping_test -l 0000:00:00.0 2>&1 | grep -o 'vfio_type1v2_iommu_anonymous ' | head -n 1
        vfio_pci_driver_test; echo "driver-test-exit $?"
        vfio-selftests; echo "vfio-selftests-exit $?"
        grep -o '^vfio_pci ' /proc/modules
    "#;
    let run = guest(["run", TIMEOUT, "--", "sh", "-c", script]);
    run.expect_status(0);
    let out = format!("{}{}", run.stdout, run.stderr);
    let line = |prefix: &str| {
        run.stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{out}"))
    };
    assert_eq!(line("at-boot "), "0", "dmatest must not load at boot");
    assert!(run.stdout.contains("dmatest-loaded"), "{out}");
    let release = line("release ");
    // vermagic:       7.2.13+deb14-amd64 SMP preempt mod_unload
    let vermagic = line("vermagic:");
    assert!(
        vermagic.starts_with(&format!("{release} SMP preempt mod_unload")),
        "{vermagic} vs {release}"
    );
    // The harness's usage (-h exits with KSFT_SKIP, 4) and variant list.
    assert!(out.contains("-v name  include variant"), "{out}");
    assert_eq!(line("device-test-help-exit "), "4");
    assert!(run.stdout.contains("vfio_type1v2_iommu_anonymous"), "{out}");
    // Without a device the driver test skips (4) after saying how to pass one.
    assert!(out.contains("VFIO_SELFTESTS_BDF"), "{out}");
    assert_eq!(line("driver-test-exit "), "4");
    assert!(
        out.contains("no Intel I/OAT DMA function (PCI 8086:2021)"),
        "{out}"
    );
    assert_eq!(line("vfio-selftests-exit "), "1");
    // vfio-selftests loaded vfio-pci before looking for devices.
    assert!(run.stdout.lines().any(|l| l.trim() == "vfio_pci"), "{out}");
}

/// `vfio-selftests` end to end on a function it is given (no I/OAT device needed): with the VT-d
/// model, the CXL Type 3 function 02:00.0 moves from cxl_pci to vfio-pci, the selftests run in
/// both type1 modes (the iommufd variants skipped with the reason; the driver test skips, as
/// the selftests have no driver for this device), and the function goes back to cxl_pci.
#[test]
fn vfio_selftests_drive_a_function_through_vfio_type1() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("vfio-selftests");
    std::fs::create_dir_all(&dir).unwrap();
    let backing = dir.join("cxl.img");
    let _ = std::fs::remove_file(&backing);
    let cxl = format!(
        "--cxl-type3=volatile=256M,persistent=0,backing={}",
        backing.display()
    );
    let script = r#"
        vfio-selftests 0000:02:00.0; echo "vfio-selftests-exit $?"
        echo "driver-after $(basename "$(readlink /sys/bus/pci/devices/0000:02:00.0/driver)")"
    "#;
    let run = guest([
        "run",
        TIMEOUT,
        "--iommu=vtd",
        &cxl,
        "--",
        "sh",
        "-c",
        script,
    ]);
    run.expect_status(0);
    let out = format!("{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("0000:02:00.0: bound to vfio-pci (was cxl_pci)"),
        "{out}"
    );
    assert!(run.stdout.contains("skipping variants iommufd"), "{out}");
    for passed in [
        "ok 1 vfio_dma_mapping_test.vfio_type1_iommu_anonymous.dma_map_unmap",
        "ok 2 vfio_dma_mapping_test.vfio_type1v2_iommu_anonymous.dma_map_unmap",
        "ok 1 vfio_pci_device_test.config_space_read_write",
        "ok 3 vfio_pci_device_test.reset",
    ] {
        assert!(run.stdout.contains(passed), "{passed} missing in:\n{out}");
    }
    assert!(!run.stdout.contains("not ok"), "{out}");
    assert!(run.stdout.contains("vfio-selftests: all passed"), "{out}");
    assert!(run.stdout.contains("vfio-selftests-exit 0"), "{out}");
    assert!(run.stdout.contains("driver-after cxl_pci"), "{out}");
}

/// The SVA guest side without an engine (one boot of the 7.2 profile): `uio_pci_generic_sva`
/// (built from linux-source) loads on request with `uio`, not at boot, and registers the
/// `uio_pci_sva` PCI driver; `sva-test --help` documents its options; `sva-test` with no
/// engine fails in one line naming what is missing, and a bad option in one line;
/// `sva-test --simulate` (the tool's own engine stand-in) copies, fills and compares, and runs
/// several processes with distinct PASIDs, on the guest's kernel.
#[test]
fn sva_driver_loads_and_sva_test_needs_an_engine() {
    let script = r#"
        echo "at-boot $(grep -c '^uio' /proc/modules)"
        modprobe uio_pci_generic_sva && echo modprobe-ok
        grep -o '^uio ' /proc/modules
        grep -o '^uio_pci_generic_sva ' /proc/modules
        [ -d /sys/bus/pci/drivers/uio_pci_sva ] && echo driver-registered
        grep uio_pci_generic_sva "/lib/modules/$(uname -r)/modules.dep"
        sva-test --help >/tmp/help; echo "help-exit $?"
        for o in --device --op --size --mode --path --touch --rounds --fsync --expect \
            --munmap-race --remap --procs --no-page-request --timeout --simulate -v; do
            grep -q -e "$o" /tmp/help || echo "help-missing $o"
        done
        sva-test 2>&1; echo "no-engine-exit $?"
        sva-test --size 12X 2>&1; echo "bad-size-exit $?"
        sva-test --simulate --size 16M 2>&1; echo "simulate-exit $?"
        sva-test --simulate --op fill --size 16M 2>&1; echo "fill-exit $?"
        sva-test --simulate --op compare --size 1M 2>&1; echo "compare-exit $?"
        sva-test --simulate --procs 4 --size 256K 2>&1 | tail -n 1; echo "procs-exit $?"
        modprobe vmw_pvrdma && echo pvrdma-modprobe-ok
        [ -d /sys/bus/pci/drivers/vmw_pvrdma ] && echo pvrdma-driver-registered
        ibv_devices >/dev/null; echo "ibv_devices-exit $?"
        ib_write_bw --help 2>&1 | grep -q "Run sizes from 2 till" && echo ib_write_bw-usage
        rdma dev show; echo "rdma-exit $?"
        /usr/bin/ip -V
    "#;
    let run = guest(["run", TIMEOUT, "--", "sh", "-c", script]);
    run.expect_status(0);
    let out = format!("{}{}", run.stdout, run.stderr);
    let has = |l: &str| run.stdout.lines().any(|x| x.trim() == l);
    let line = |prefix: &str| {
        run.stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{out}"))
    };
    assert!(has("at-boot 0"), "uio must not load at boot:\n{out}");
    assert!(has("modprobe-ok"), "{out}");
    assert!(has("uio"), "modprobe did not load uio:\n{out}");
    assert!(has("uio_pci_generic_sva"), "{out}");
    assert!(has("driver-registered"), "{out}");
    assert_eq!(
        line("updates/uio_pci_generic_sva.ko:"),
        "updates/uio_pci_generic_sva.ko: kernel/drivers/uio/uio.ko"
    );
    assert!(has("help-exit 0"), "{out}");
    assert!(!run.stdout.contains("help-missing"), "{out}");

    // No engine: one line naming it, exit 2.
    let said: Vec<&str> = run
        .stdout
        .lines()
        .take_while(|l| !l.starts_with("no-engine-exit"))
        .filter(|l| l.starts_with("sva-test:"))
        .collect();
    assert_eq!(
        said,
        [
            "sva-test: no SVA DMA engine: no PCI function 1234:5356 (start the VM with `vmm run --iommu vtd --dma-engine`)"
        ],
        "{out}"
    );
    assert!(has("no-engine-exit 2"), "{out}");
    assert!(
        line("sva-test: --size 12X:").ends_with("(see sva-test --help)"),
        "{out}"
    );
    assert!(has("bad-size-exit 2"), "{out}");

    assert!(
        has(
            "sva-test: copy anon 16777216 bytes pasid=1 status=SUCCESS page_requests=0 \
             ats_translations=0 atc_invalidations=0 (simulated engine) ok"
        ),
        "{out}"
    );
    assert!(has("simulate-exit 0"), "{out}");
    assert!(
        line("sva-test: fill anon 16777216 bytes").ends_with(" ok"),
        "{out}"
    );
    assert!(has("fill-exit 0"), "{out}");
    assert!(
        line("sva-test: compare anon 1048576 bytes").ends_with(" ok"),
        "{out}"
    );
    assert!(has("compare-exit 0"), "{out}");
    // The RDMA NIC's driver (built by the same machinery, issue 10) loads with its IB core.
    assert!(has("pvrdma-modprobe-ok"), "{out}");
    assert!(has("pvrdma-driver-registered"), "{out}");
    // The RDMA user space (rdma-core, perftest, iproute2) runs: its libraries are all there.
    assert!(has("ibv_devices-exit 0"), "{out}");
    assert!(has("ib_write_bw-usage"), "{out}");
    assert!(has("rdma-exit 0"), "{out}");
    assert!(out.contains("ip utility, iproute2-"), "{out}");
    assert!(
        line("sva-test: procs=4 copy anon 262144 bytes each pasids=5 distinct").ends_with(" ok"),
        "{out}"
    );
    assert!(has("procs-exit 0"), "{out}");
}
