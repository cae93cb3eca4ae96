//! Control API guest tests: faults injected with `vmm ctl` into a running VM (`vmm run
//! --control PATH`) show up in what the guest's own tools report — `cxl list -L` (Get Poison
//! List), and the `cxl_poison` / `cxl_general_media` / `cxl_dram` / `cxl_memory_module` trace
//! events Linux emits when it reads the device's event logs after the event interrupt.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{RunningGuest, VMM};

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cxl-control-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// `vmm ctl --control SOCK --wait=120 ARGS...`: (status, stdout, stderr).
fn ctl(sock: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["--wait=120"];
    all.extend_from_slice(args);
    ctl_raw(sock, &all)
}

fn ctl_ok(sock: &Path, args: &[&str]) -> String {
    let (status, out, err) = ctl(sock, args);
    assert_eq!(status, Some(0), "vmm ctl {args:?}: {err}");
    out
}

#[test]
fn poison_and_events_injected_through_the_control_api_reach_the_guest() {
    let img = scratch("ctl.img");
    let sock = scratch("ctl.sock");
    // The guest waits for each fault to appear through its own tools, printing a marker per
    // phase so the test knows when to inject the next one.
    let script = r#"
        echo 1 > /sys/kernel/tracing/events/cxl/enable
        echo "phase:tracing"
        wait_until() { # wait_until SECONDS COMMAND...
            n=$1; shift
            while [ "$n" -gt 0 ]; do "$@" && return 0; sleep 1; n=$((n - 1)); done
            echo "gave up waiting for: $*"; exit 1
        }
        listed() { cxl list -L -m mem0 | grep -q '"offset"'; }
        wait_until 120 listed
        cxl list -L -u -m mem0
        echo "phase:poison-listed"
        traced() { grep -q "$1" /sys/kernel/tracing/trace; }
        wait_until 120 traced cxl_general_media
        wait_until 120 traced cxl_dram
        wait_until 120 traced cxl_memory_module
        grep -E "cxl_poison|cxl_general_media|cxl_dram|cxl_memory_module" /sys/kernel/tracing/trace
        echo "phase:events-traced"
        cleared() { ! cxl list -L -m mem0 | grep -q '"offset"'; }
        wait_until 120 cleared
        echo "phase:cleared"
        # RAS through AER: the root port's AER service is bound (`_OSC` grants AER).
        ls /sys/bus/pci_express/devices/ | sed 's/^/pcie-service /'
        echo "phase:ras-ready"
        wait_until 120 traced cxl_aer_correctable_error
        echo "phase:ras-cor"
        wait_until 120 traced cxl_aer_uncorrectable_error
        grep cxl_aer /sys/kernel/tracing/trace
        dmesg | grep -iE "aer|cxl_pci|error" | tail -20
        echo "still up"
    "#;
    let mut guest = RunningGuest::start(
        scratch("ctl-console.log"),
        &[
            "run".into(),
            "--timeout=900".into(),
            format!("--control={}", sock.display()),
            "--cxl-precommit".into(),
            format!(
                "--cxl-type3=volatile=256M,persistent=0,backing={}",
                img.display()
            ),
            "--".into(),
            "sh".into(),
            "-c".into(),
            script.into(),
        ],
    );
    guest.wait_for("phase:tracing");

    let devices = ctl_ok(&sock, &["devices"]);
    assert!(devices.contains("\"id\": \"cxl0\""), "{devices}");
    ctl_ok(
        &sock,
        &[
            "inject-poison",
            "--device=cxl0",
            "--dpa=0x40000",
            "--length=256",
        ],
    );
    let state: serde_json::Value =
        serde_json::from_str(&ctl_ok(&sock, &["state", "--device=cxl0"])).unwrap();
    assert_eq!(state["poison"][0]["dpa"], 0x40000, "{state}");
    // The firmware-committed endpoint decoder: the whole device at the window base.
    assert_eq!(
        state["hdm_decoders"][0]["hpa"], 0x40_0000_0000u64,
        "{state}"
    );
    assert_eq!(state["hdm_decoders"][0]["size"], 256u64 << 20, "{state}");
    assert_eq!(state["hdm_decoders"][0]["partition"], "volatile", "{state}");
    guest.wait_for("phase:poison-listed");

    ctl_ok(
        &sock,
        &[
            "inject-general-media",
            "--dpa=0x80000",
            "--log=warning",
            "--descriptor=1",
            "--transaction-type=1",
            "--channel=3",
        ],
    );
    ctl_ok(
        &sock,
        &["inject-dram", "--dpa=0xc0000", "--row=77", "--column=5"],
    );
    ctl_ok(
        &sock,
        &[
            "inject-memory-module",
            "--log=fatal",
            "--type=3",
            "--temperature=95",
        ],
    );
    guest.wait_for("phase:events-traced");

    // The health the memory-module event reported is what the device reports from now on.
    let state = ctl_ok(&sock, &["state"]);
    assert!(state.contains("\"temperature\": 95"), "{state}");
    ctl_ok(&sock, &["clear-poison", "--dpa=0x40000", "--length=256"]);
    guest.wait_for("phase:cleared");

    // Issue 11 acceptance 5: RAS errors through the QMP names, signalled through AER.
    guest.wait_for("phase:ras-ready");
    let cor = ctl_ok(
        &sock,
        &["cxl-inject-correctable-error", "--type=mem-data-ecc"],
    );
    assert!(
        cor.contains("\"message\": \"ERR_COR\"") && cor.contains("\"aer_interrupt\": true"),
        "{cor}"
    );
    guest.wait_for("phase:ras-cor");
    let uncor = ctl_ok(
        &sock,
        &[
            "cxl-inject-uncorrectable-errors",
            "--type=mem-data-ecc",
            "--type=internal",
            "--header=0xcafe,0xf00d",
        ],
    );
    assert!(uncor.contains("\"aer_interrupt\": true"), "{uncor}");

    let (status, out, _) = guest.finish();
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains("\"offset\":\"0x40000\""), "{out}");
    assert!(out.contains("\"source\":\"Internal\""), "{out}");
    assert!(out.contains("\"length\":256"), "{out}");
    assert!(
        out.contains("cxl_poison: memdev=mem0") && out.contains("dpa=0x40000"),
        "{out}"
    );
    assert!(
        out.contains("cxl_general_media: memdev=mem0")
            && out.contains("log=Warning")
            && out.contains("dpa=80000")
            && out.contains("transaction_type='Host Read'"),
        "{out}"
    );
    assert!(
        out.contains("cxl_dram: memdev=mem0") && out.contains("dpa=c0000"),
        "{out}"
    );
    assert!(
        out.contains("cxl_memory_module: memdev=mem0") && out.contains("log=Fatal"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("pcie-service ") && l.ends_with(":pcie002")),
        "no AER port service: {out}"
    );
    // cxl_cor_error_detected: Mem_Data_ECC is bit 1 of the Correctable Error Status.
    assert!(
        out.contains("cxl_aer_correctable_error: memdev=mem0")
            && out.contains("status: 'Memory Data ECC Error'"),
        "{out}"
    );
    // cxl_error_detected: both bits (Internal is "Component Specific Error" to the kernel),
    // the first error pointing at Mem_Data_ECC; the AER core saw ERR_FATAL from the device.
    assert!(
        out.contains("cxl_aer_uncorrectable_error: memdev=mem0")
            && out.contains("status: 'Memory Data ECC Error | Component Specific Error'")
            && out.contains("first_error: 'Memory Data ECC Error'"),
        "{out}"
    );
    assert!(
        out.contains("AER: Uncorrectable (Fatal) error message received from"),
        "{out}"
    );
    assert!(out.contains("still up"), "{out}");
    // The socket is gone once the VM is.
    assert!(!sock.exists(), "control socket left behind");
}

#[test]
fn ctl_without_a_running_vm_is_one_line_error() {
    let sock = scratch("nobody.sock");
    let (status, out, err) = ctl_raw(&sock, &["--wait=0", "devices"]);
    assert_eq!(status, Some(125), "{err}");
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&sock.display().to_string()), "{err}");
}

#[test]
fn run_refuses_a_control_path_that_is_not_a_socket() {
    let path = scratch("precious.txt");
    std::fs::write(&path, b"user data").unwrap();
    let run = common::vmm([
        "run".to_string(),
        format!("--control={}", path.display()),
        "--".to_string(),
        "true".to_string(),
    ]);
    run.expect_status(125);
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("vmm: ") && !l.contains("running inside the nested"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(lines[0].contains("not a socket"), "{}", run.stderr);
    assert_eq!(std::fs::read(&path).unwrap(), b"user data");
}

/// `vmm ctl --control SOCK ARGS...`: (status, stdout, stderr).
fn ctl_raw(sock: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(VMM)
        .arg("ctl")
        .arg("--control")
        .arg(sock)
        .args(args)
        .output()
        .expect("running vmm ctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
