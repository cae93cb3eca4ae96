//! I/OAT + VT-d guest tests (issue 8 §2): with `--iommu vtd --ioat` the guest's `intel_iommu`
//! remaps the emulated I/OAT DMA engine's DMA, `ioatdma` binds it, the kernel's own `dmatest`
//! and VFIO selftests pass through the IOMMU, and a DMA to an unmapped IOVA shows up as the
//! guest's DMAR fault report while the channel recovers. One boot per mode (scalable with lazy
//! invalidation, legacy with `iommu.strict=1`); each phase prints a marker so a failure names
//! the phase. What counts is what the guest's own tools report.

mod common;

/// Everything the guest checks, phase by phase. `$IOAT` is the list of I/OAT functions.
const SCRIPT: &str = r#"
IOAT=$(for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = "0x8086:0x2021" ] && basename $d; done)
echo "ioat-functions: $(echo $IOAT)"
echo "== remapping"
dmesg | grep -E "DMAR|iommu" | sed 's/^\[[ 0-9.]*\] //'
echo "ecap=$(cat /sys/class/iommu/dmar0/intel-iommu/ecap)"
echo "== binding"
for f in $IOAT; do
  g=$(readlink /sys/bus/pci/devices/$f/iommu_group)
  echo "bind $f driver=$(basename $(readlink /sys/bus/pci/devices/$f/driver)) group=$(basename $g) members=$(ls /sys/kernel/iommu_groups/$(basename $g)/devices | tr '\n' ' ')"
done
ls /sys/class/dma | sed 's/^/dma-channel /'
echo "== dmatest"
modprobe dmatest iterations=1000 threads_per_chan=2 run=1 || echo "dmatest: modprobe failed"
cat /sys/module/dmatest/parameters/wait >/dev/null
dmesg | grep "dmatest: .*summary" | sed 's/^\[[ 0-9.]*\] //'
rmmod dmatest
echo "== vfio-selftests"
vfio-selftests; echo "vfio-selftests status=$?"
for f in $IOAT; do echo "after-vfio $f driver=$(basename $(readlink /sys/bus/pci/devices/$f/driver))"; done
echo "== msi"
rmmod ioatdma && modprobe ioatdma ioat_interrupt_style=msi || echo "msi: ioatdma reload failed"
modprobe dmatest iterations=200 threads_per_chan=1 run=1 || echo "msi: dmatest modprobe failed"
cat /sys/module/dmatest/parameters/wait >/dev/null
dmesg | grep "dmatest: .*summary" | tail -n $(ls /sys/class/dma | wc -l) | sed 's/^\[[ 0-9.]*\] //' | sed 's/^/msi-dmatest /'
rmmod dmatest
grep ioat /proc/interrupts | sed 's/^/msi-irq /'
rmmod ioatdma && modprobe ioatdma
echo "== done"
"#;

/// Phase 4 (scalable boot only): the host injects a fault on the I/OAT's next DMA; the guest
/// keeps issuing single copies until its intel_iommu reports the fault, then runs a full
/// dmatest on the reset channel.
const FAULT_SCRIPT: &str = r#"
echo "== fault"
dmesg -c >/dev/null
echo INJECT-NOW
for i in $(seq 1 120); do
  dmesg | grep -q "DMAR: \[DMA" && break
  modprobe dmatest iterations=1 channel=dma0chan0 threads_per_chan=1 run=1
  cat /sys/module/dmatest/parameters/wait >/dev/null
  rmmod dmatest
  sleep 1
done
dmesg | grep -E "DMAR: \[DMA|fault addr|ioatdma|dmatest: .*(result|summary)" | sed 's/^\[[ 0-9.]*\] //' | sed 's/^/fault-report /'
dmesg -c >/dev/null
echo FAULT-SEEN
sleep 10
modprobe dmatest iterations=200 channel=dma0chan0 threads_per_chan=1 run=1
cat /sys/module/dmatest/parameters/wait >/dev/null
dmesg | grep "dmatest: .*summary" | sed 's/^\[[ 0-9.]*\] //' | sed 's/^/after-fault /'
rmmod dmatest
echo "== end"
"#;

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ioat-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// The lines of `out` between `== phase` and the next `== ` marker.
fn phase<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
    let start = format!("== {name}");
    out.lines()
        .skip_while(|l| *l != start)
        .skip(1)
        .take_while(|l| !l.starts_with("== "))
        .collect()
}

fn functions(out: &str) -> Vec<String> {
    out.lines()
        .find_map(|l| l.strip_prefix("ioat-functions: "))
        .unwrap_or_else(|| panic!("no ioat-functions line:\n{out}"))
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn assert_remapped_and_bound(out: &str, scalable: bool, expected_functions: usize) {
    let remap = phase(out, "remapping").join("\n");
    for line in [
        "DMAR: IOMMU enabled",
        "DMAR: dmar0: Using Queued invalidation",
        "DMAR: Intel(R) Virtualization Technology for Directed I/O",
    ] {
        assert!(remap.contains(line), "remapping: no {line:?}:\n{out}");
    }
    let ecap = remap
        .lines()
        .find_map(|l| l.strip_prefix("ecap="))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or_else(|| panic!("remapping: no ecap:\n{out}"));
    assert_eq!(ecap & (1 << 43) != 0, scalable, "ECAP.SMTS {ecap:#x}");

    let fns = functions(out);
    assert_eq!(
        fns.len(),
        expected_functions,
        "I/OAT functions: {fns:?}\n{out}"
    );
    let bind = phase(out, "binding");
    for f in &fns {
        let line = bind
            .iter()
            .find(|l| l.starts_with(&format!("bind {f} ")))
            .unwrap_or_else(|| panic!("binding: no line for {f}:\n{out}"));
        assert!(line.contains("driver=ioatdma"), "binding: {line}");
        let members = line.split("members=").nth(1).unwrap_or("").trim();
        assert_eq!(
            members, f,
            "binding: {f}'s IOMMU group holds only it: {line}"
        );
    }
    assert!(
        bind.iter().any(|l| l.starts_with("dma-channel dma")),
        "binding: no dmaengine channel:\n{out}"
    );
}

/// `ioatdma ioat_interrupt_style=msi`: the function's MSI carries every channel's completions
/// (the `ioat-msi` line in /proc/interrupts counts them) and dmatest still passes on every
/// channel.
fn assert_msi_mode_works(out: &str, channels: usize) {
    let lines = phase(out, "msi");
    let text = lines.join("\n");
    let passed = lines
        .iter()
        .filter(|l| l.starts_with("msi-dmatest ") && l.contains("summary 200 tests, 0 failures"))
        .count();
    assert_eq!(passed, channels, "dmatest over MSI:\n{text}");
    let irqs: Vec<&&str> = lines.iter().filter(|l| l.starts_with("msi-irq ")).collect();
    assert!(
        !irqs.is_empty()
            && irqs
                .iter()
                .all(|l| l.contains("ioat-msi") && !l.contains("ioat-msix")),
        "ioatdma did not use MSI:\n{text}"
    );
    let counted: u64 = irqs
        .iter()
        .flat_map(|l| {
            // "msi-irq  NN:  count-per-cpu...  chip  hwirq  ioat-msi"
            l.split_whitespace()
                .skip(2)
                .take_while(|w| w.parse::<u64>().is_ok())
        })
        .map(|w| w.parse::<u64>().unwrap())
        .sum();
    assert!(counted > 0, "no MSI arrived:\n{text}");
}

/// Every dmatest thread summary reports its 1000 tests with 0 failures, one per channel and
/// thread (two threads per channel).
fn assert_dmatest_passed(out: &str, channels: usize) {
    let lines = phase(out, "dmatest");
    let summaries: Vec<&&str> = lines.iter().filter(|l| l.contains("summary")).collect();
    assert_eq!(
        summaries.len(),
        2 * channels,
        "dmatest: one summary per thread:\n{}",
        lines.join("\n")
    );
    for s in summaries {
        assert!(
            s.contains("summary 1000 tests, 0 failures"),
            "dmatest: {s}\n{}",
            lines.join("\n")
        );
    }
}

/// The wrapper's verdict and the harness's own lines: tests ran, none failed.
fn assert_vfio_selftests_passed(out: &str) {
    let lines = phase(out, "vfio-selftests");
    let text = lines.join("\n");
    assert!(
        lines.contains(&"vfio-selftests status=0"),
        "vfio-selftests failed:\n{text}"
    );
    for test in [
        "vfio_pci_driver_test",
        "vfio_dma_mapping_test",
        "vfio_pci_device_test",
    ] {
        assert!(text.contains(test), "{test} did not run:\n{text}");
    }
    for needle in [
        "vfio_pci_irq_test.msi.",
        "vfio_pci_irq_test.msix.",
        "memcpy_success",
        "memcpy_from_unmapped_iova",
        "memcpy_to_unmapped_iova",
        "send_msi",
        "memcpy_storm",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("ok ") && l.contains(needle) && !l.contains("# SKIP")),
            "no passing {needle} (a skip does not count):\n{text}"
        );
    }
    assert!(
        !lines.iter().any(|l| l.starts_with("not ok")),
        "a selftest failed:\n{text}"
    );
    for l in phase(out, "vfio-selftests")
        .iter()
        .filter(|l| l.starts_with("after-vfio"))
    {
        assert!(l.contains("driver=ioatdma"), "driver restored: {l}");
    }
}

fn ctl(sock: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut argv = vec![
        "ctl".to_string(),
        format!("--control={}", sock.display()),
        "--wait=120".to_string(),
    ];
    argv.extend(args.iter().map(|s| s.to_string()));
    let run = common::vmm(argv);
    run.expect_status(0);
    serde_json::from_str(&run.stdout).expect("JSON from vmm ctl")
}

/// Scalable mode, lazy invalidation (the guest's default), two functions (2 + 1 channels):
/// remapping, ioatdma, dmatest, the VFIO selftests, then a fault injected from the host.
#[test]
fn ioat_through_scalable_mode_vtd() {
    let sock = scratch("ioat.sock");
    let script = format!("{SCRIPT}{FAULT_SCRIPT}");
    let args: Vec<String> = [
        "run",
        "--timeout=1500",
        "--iommu=vtd",
        "--ioat=channels=2",
        "--ioat",
        &format!("--control={}", sock.display()),
        "--",
        "sh",
        "-c",
        &script,
    ]
    .map(String::from)
    .to_vec();
    let mut g = common::RunningGuest::start(scratch("scalable-console.log"), &args);
    g.wait_for("INJECT-NOW");
    let before = ctl(&sock, &["ioat-state"]);
    let iommu = ctl(&sock, &["iommu-state"]);
    let injected = ctl(
        &sock,
        &["iommu-inject-fault", "--device", "00:10.0", "--count", "1"],
    );
    g.wait_for("FAULT-SEEN");
    let iommu_after = ctl(&sock, &["iommu-state"]);
    let ioat_after = ctl(&sock, &["ioat-state"]);
    g.wait_for("== end");
    let (status, out, _) = g.finish();
    assert_eq!(status, Some(0), "guest script:\n{out}");

    assert_remapped_and_bound(&out, true, 2);
    assert_dmatest_passed(&out, 3);
    assert_vfio_selftests_passed(&out);
    assert_msi_mode_works(&out, 3);

    // The engine did the work, through the unit.
    let copied: u64 = before["functions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["channels"].as_array().unwrap().iter())
        .map(|c| c["bytes"].as_u64().unwrap())
        .sum();
    assert!(
        copied > 3 * 1000 * 2 * 1024,
        "ioat-state bytes {copied}: {before}"
    );
    assert!(
        iommu["counters"]["translations"].as_u64().unwrap_or(0) > 10_000,
        "{iommu}"
    );
    assert_eq!(injected["pending"], 1, "{injected}");
    assert_eq!(
        iommu_after["counters"]["injected_faults"], 1,
        "the injection was consumed: {iommu_after}"
    );
    assert_eq!(
        iommu_after["pending_fault_injections"],
        serde_json::json!([]),
        "{iommu_after}"
    );
    let errors = |state: &serde_json::Value| {
        state["functions"][0]["channels"][0]["errors"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        errors(&ioat_after) > errors(&before),
        "channel 0 of 00:10.0 halted on the injected fault: {before} then {ioat_after}"
    );

    // The injected fault: the guest's DMAR report names the I/OAT's source ID, the channel
    // reports the error, and a full dmatest on it afterwards has no failures.
    let fault: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("fault-report "))
        .collect();
    let text = fault.join("\n");
    assert!(
        fault
            .iter()
            .any(|l| l.contains("DMAR: [DMA") && l.contains("00:10.0] fault addr")),
        "no DMAR fault report for 00:10.0:\n{text}\n{out}"
    );
    assert!(
        fault.iter().any(|l| l.contains("ioatdma 0000:00:10.0")
            || (l.contains("dmatest") && !l.contains("0 failures"))),
        "the channel did not report the error:\n{text}"
    );
    let after: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("after-fault "))
        .collect();
    assert!(
        after
            .iter()
            .any(|l| l.contains("summary 200 tests, 0 failures")),
        "DMA after the fault:\n{}\n{out}",
        after.join("\n")
    );
}

/// Legacy mode with strict invalidation: remapping, ioatdma, dmatest, the VFIO selftests.
#[test]
fn ioat_through_legacy_mode_vtd_with_strict_invalidation() {
    let run = common::guest([
        "run",
        "--timeout=1500",
        "--iommu=vtd,scalable=off",
        "--ioat",
        "--cmdline=iommu.strict=1",
        "--",
        "sh",
        "-c",
        SCRIPT,
    ]);
    run.expect_status(0);
    let out = &run.stdout;
    assert!(
        out.contains("DMA domain TLB invalidation policy: strict mode"),
        "{out}"
    );
    assert_remapped_and_bound(out, false, 1);
    assert_dmatest_passed(out, 1);
    assert_vfio_selftests_passed(out);
    assert_msi_mode_works(out, 1);
}
