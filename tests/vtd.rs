//! VT-d guest tests: with `--iommu vtd` the guest's own `intel_iommu` finds the DMAR, drives the
//! remapping unit (root table, queued invalidation, translation on) and puts the PCI devices
//! into IOMMU groups — in scalable mode (ECAP.SMTS) and in legacy mode (`scalable=off`). What
//! counts is what the guest reports: dmesg and /sys/class/iommu.

mod common;

use common::guest;

const SCRIPT: &str = r#"
dmesg | grep -E "DMAR|iommu" | sed 's/^\[[ 0-9.]*\] //'
echo "ecap=$(cat /sys/class/iommu/dmar0/intel-iommu/ecap)"
echo "cap=$(cat /sys/class/iommu/dmar0/intel-iommu/cap)"
echo "groups=$(ls /sys/kernel/iommu_groups | wc -l)"
echo "devices=$(ls /sys/class/iommu/dmar0/devices | wc -l)"
grep -E "dmar[0-9]+-prq" /proc/interrupts | sed 's/^/prq-irq /'
"#;

/// Boots with `--iommu SPEC` and returns the guest's report.
fn boot(spec: &str) -> String {
    let run = guest([
        "run",
        "--timeout=600",
        &format!("--iommu={spec}"),
        "--",
        "sh",
        "-c",
        SCRIPT,
    ]);
    run.expect_status(0);
    run.stdout
}

fn field(out: &str, key: &str) -> u64 {
    let value = out
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in:\n{out}"));
    u64::from_str_radix(value.trim(), 16)
        .or_else(|_| value.trim().parse())
        .unwrap_or_else(|_| panic!("{key}={value}"))
}

fn assert_remapping_on(out: &str) {
    for line in [
        "DMAR: IOMMU enabled",
        "DMAR: Host address width 48",
        "DMAR: DRHD base: 0x000000fed90000 flags: 0x1",
        "DMAR: dmar0: Using Queued invalidation",
        "DMAR: Intel(R) Virtualization Technology for Directed I/O",
        "Adding to iommu group",
    ] {
        assert!(out.contains(line), "guest did not report {line:?}:\n{out}");
    }
    assert!(!out.contains("malfunctioning"), "{out}");
    assert!(
        !out.contains("DMAR: DRHD: handling fault"),
        "unexpected faults:\n{out}"
    );
    // The host bridge and the root port, each in its own group.
    assert!(field(out, "groups") >= 2, "{out}");
    assert!(field(out, "devices") >= 2, "{out}");
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("vtd-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// Scalable mode, and `vmm ctl iommu-state` while the guest runs: what the unit saw the guest
/// program (translation on, scalable root table, queued invalidation with wait descriptors).
#[test]
fn guest_enables_dma_remapping_in_scalable_mode() {
    let sock = scratch("vtd.sock");
    let script = format!("{SCRIPT}\necho READY\nsleep 600\n");
    let args: Vec<String> = [
        "run",
        "--timeout=600",
        "--iommu=vtd",
        &format!("--control={}", sock.display()),
        "--",
        "sh",
        "-c",
        &script,
    ]
    .map(String::from)
    .to_vec();
    let mut g = common::RunningGuest::start(scratch("vtd-console.log"), &args);
    g.wait_for("READY");
    let ctl = common::vmm([
        "ctl".to_string(),
        format!("--control={}", sock.display()),
        "--wait=120".to_string(),
        "iommu-state".to_string(),
    ]);
    g.signal(libc::SIGTERM);
    let (status, out, _) = g.finish();
    ctl.expect_status(0);
    let state: serde_json::Value = serde_json::from_str(&ctl.stdout).expect("JSON from vmm ctl");
    assert_eq!(state["translation_enabled"], true, "{state}");
    assert_eq!(state["queued_invalidation_enabled"], true, "{state}");
    assert_eq!(state["root_table_mode"], "scalable", "{state}");
    assert_eq!(
        state["invalidation_queue"]["descriptor_bits"], 256,
        "{state}"
    );
    assert!(
        state["counters"]["invalidations"]["wait"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "the guest's qi_submit_sync waits: {state}"
    );
    assert_eq!(state["counters"]["queue_errors"], 0, "{state}");
    // The caches' counters, the devices the guest attached, no injections pending.
    assert!(state["counters"]["iotlb"]["hits"].is_u64(), "{state}");
    assert!(
        state["counters"]["context_cache"]["misses"].is_u64(),
        "{state}"
    );
    assert!(
        state["devices"].as_array().is_some_and(|d| !d.is_empty()),
        "the guest attached devices (a present context each): {state}"
    );
    assert_eq!(
        state["pending_fault_injections"],
        serde_json::json!([]),
        "{state}"
    );
    eprintln!("iommu-state: {state}");
    assert_eq!(status, Some(143), "SIGTERM ends the run: {out}");
    assert_remapping_on(&out);
    let ecap = field(&out, "ecap");
    assert_ne!(ecap & (1 << 43), 0, "ECAP.SMTS: {ecap:#x}");
    assert_ne!(ecap & (1 << 1), 0, "ECAP.QI: {ecap:#x}");
    // Shared virtual addressing (issue 9): 20-bit PASIDs, device TLBs, page requests — the
    // guest sets up its page request queue (PRQ_ORDER 4: 16 pages, 2048 requests) and its
    // dmarN-prq interrupt, and finds the unit SVM-capable.
    for (bit, name) in [
        (40, "PASID"),
        (2, "DT"),
        (29, "PRS"),
        (42, "PDS"),
        (48, "SMPWC"),
    ] {
        assert_ne!(ecap & (1 << bit), 0, "ECAP.{name}: {ecap:#x}");
    }
    assert_eq!((ecap >> 35) & 0x1f, 19, "ECAP.PSS: 2^20 PASIDs: {ecap:#x}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("prq-irq ") && l.contains("dmar0-prq")),
        "no dmar0-prq interrupt:\n{out}"
    );
    assert!(!out.contains("SVM disabled"), "{out}");
    assert_eq!(state["page_request_queue"]["entries"], 2048, "{state}");
    assert_ne!(state["page_request_queue"]["base"], "0x0", "{state}");
    assert_eq!(
        (state["pasid_bits"].clone(), state["pri"].clone()),
        (serde_json::json!(20), serde_json::json!(true))
    );
}

#[test]
fn guest_enables_dma_remapping_in_legacy_mode() {
    let out = boot("vtd,scalable=off");
    assert_remapping_on(&out);
    let ecap = field(&out, "ecap");
    assert_eq!(ecap & (1 << 43), 0, "no SMTS in legacy mode: {ecap:#x}");
}
