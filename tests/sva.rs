//! SVA guest tests (issue 9): with `--iommu vtd --dma-engine` the guest's `intel_iommu` binds a
//! process's address space to the project's SVA DMA engine through the upstream
//! `uio_pci_generic_sva` driver, and the image's `sva-test` drives the engine on the process's
//! own virtual addresses: first-touch pages become PRI page requests the guest kernel serves
//! (its `dmar0-prq` interrupt and `intel_iommu:prq_report` trace event), file-backed and DAX
//! destinations run the file system's write fault again after writeback, munmap ends a copy
//! with Invalid, a remap is seen through the device-TLB invalidation, 64 processes get 64
//! PASIDs, and the host's injections (Failure, Invalid, dropped requests, slow invalidation
//! waits) are reported and recovered from. Two boots; each phase prints a marker (`== name`)
//! so a failure names the phase. What counts is what the guest's own tools report.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sva-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    // A CXL backing file's label storage area (namespaces of an earlier run).
    let mut lsa = path.clone().into_os_string();
    lsa.push(".lsa");
    let _ = std::fs::remove_file(lsa);
    path
}

fn ctl(sock: &Path, args: &[&str]) -> Value {
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

/// What the control API says about the engine and the IOMMU, for a wait that timed out: a
/// stall then shows whether the engine was parked on a page request, translating, or idle.
fn state_report(sock: PathBuf) -> impl FnMut() -> String {
    move || {
        ["dma-engine-state", "iommu-state"]
            .iter()
            .map(|what| {
                let run = common::vmm([
                    "ctl".to_string(),
                    format!("--control={}", sock.display()),
                    "--wait=20".to_string(),
                    what.to_string(),
                ]);
                format!(
                    "vmm ctl {what} (exit {:?}):\n{}{}",
                    run.status, run.stdout, run.stderr
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
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

/// The value after `key ` on the phase's line starting with it.
fn value<'a>(lines: &[&'a str], key: &str) -> &'a str {
    let prefix = format!("{key} ");
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no `{key}` line in:\n{}", lines.join("\n")))
}

/// The `name=value` field of sva-test's summary line.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key.as_str()))
        .unwrap_or_else(|| panic!("no {name}= in `{line}`"))
}

fn number(line: &str, name: &str) -> u64 {
    field(line, name)
        .parse()
        .unwrap_or_else(|_| panic!("{name}= is not a number in `{line}`"))
}

/// The summary line of the phase (the one ending in ` ok`), or a panic naming the phase.
fn summary<'a>(lines: &[&'a str], what: &str) -> &'a str {
    lines
        .iter()
        .copied()
        .find(|l| l.starts_with("sva-test: ") && l.contains(what) && l.ends_with(" ok"))
        .unwrap_or_else(|| panic!("no `sva-test: {what} … ok` line in:\n{}", lines.join("\n")))
}

/// Boot 1: anonymous memory. Phases: the default run (64 MiB first touch), PASID width,
/// munmap during a copy, ATS coherence after a remap, 64 processes, then the host's
/// injections one by one, each with a handshake: the guest prints `INJECT-…`, the host
/// injects, the guest repeats a small run until it sees the effect.
const ANON_SCRIPT: &str = r#"
T=/sys/kernel/tracing
prq() { awk '/dmar0-prq/ {print $2}' /proc/interrupts; }
echo "== first-touch"
echo 1 > $T/events/intel_iommu/prq_report/enable
p0=$(prq)
sva-test; echo "exit $?"
echo "prq-interrupts $(( $(prq) - p0 ))"
echo "prq-report-events $(grep -c 'prq_report: dmar0/0000:00:18.0' $T/trace)"
grep -m1 'prq_report:' $T/trace | sed 's/^ */trace-line /'
echo 0 > $T/events/intel_iommu/prq_report/enable
echo "== pasid"
echo "ecap $(cat /sys/class/iommu/dmar0/intel-iommu/ecap)"
echo "pasid-cap $(lspci -vvv -s 00:18.0 | grep -m1 'PASIDCap:' | sed 's/^[[:space:]]*//')"
echo "pasid-ctl $(lspci -vvv -s 00:18.0 | grep -m1 'PASIDCtl:' | sed 's/^[[:space:]]*//')"
echo "ats-ctl $(lspci -vvv -s 00:18.0 | grep -m1 'ATSCtl:' | sed 's/^[[:space:]]*//')"
echo "pri-ctl $(lspci -vvv -s 00:18.0 | grep -m1 'PRICtl:' | sed 's/^[[:space:]]*//')"
echo "== munmap"
sva-test --munmap-race; echo "exit $?"
sva-test --size 1M; echo "after-exit $?"
echo "== remap"
sva-test --remap; echo "exit $?"
echo "== procs"
sva-test --procs 64 --size 256K > /tmp/procs 2>&1; echo "exit $?"
grep -c '^sva-test: proc .* status=SUCCESS ok' /tmp/procs | sed 's/^/procs-ok /'
grep '^sva-test: proc ' /tmp/procs | sed 's/.*pasid=\([0-9]*\).*/\1/' | sort -u | wc -l | sed 's/^/distinct-pasids /'
tail -n 1 /tmp/procs
retry() { n=0; until sva-test "$@" > /tmp/out 2>&1; do n=$((n+1)); [ $n -ge 60 ] && break; sleep 1; done; cat /tmp/out; echo "tries $n"; }
echo "== inject-failure"
echo INJECT-FAILURE
retry --size 64K --expect PAGE_FAILURE
sva-test --size 64K --expect PAGE_FAILURE; echo "still-stopped-exit $?"
echo "pri-status $(lspci -vvv -s 00:18.0 | grep -m1 'PRISta:' | sed 's/^[[:space:]]*//')"
echo 1 > /sys/bus/pci/devices/0000:00:18.0/remove
echo 1 > /sys/bus/pci/rescan
sva-test --size 1M; echo "recovered-exit $?"
echo "== inject-invalid"
echo INJECT-INVALID
retry --size 64K --expect PAGE_INVALID
sva-test --size 1M; echo "after-exit $?"
echo "== inject-drop"
dmesg -c > /dev/null
echo INJECT-DROP
n=0; bad=0
until dmesg | grep -q 'PRQ overflow'; do
  sva-test --size 256K > /tmp/out 2>&1 || { bad=$((bad+1)); cat /tmp/out; }
  n=$((n+1)); [ $n -ge 60 ] && break
done
dmesg | grep -m1 'PRQ overflow detected' | sed 's/^\[[ 0-9.]*\] /guest-says /'
echo "runs $n failed $bad"
sva-test --size 1M; echo "after-exit $?"
echo "== inject-delay"
echo INJECT-DELAY
retry --size 64K --expect PAGE_INVALID
t0=$(date +%s)
sva-test --remap; echo "exit $?"
echo "seconds $(( $(date +%s) - t0 ))"
echo DELAY-DONE
echo "== end"
"#;

#[test]
fn sva_anonymous_memory_munmap_remap_64_processes_and_injected_faults() {
    let sock = scratch("anon.sock");
    let args: Vec<String> = [
        "run",
        "--timeout=1500",
        "--memory=1G",
        "--iommu=vtd",
        "--dma-engine",
        &format!("--control={}", sock.display()),
        "--",
        "sh",
        "-c",
        ANON_SCRIPT,
    ]
    .map(String::from)
    .to_vec();
    let mut g = common::RunningGuest::start(scratch("anon-console.log"), &args);
    g.on_stall(state_report(sock.clone()));
    g.wait_for("INJECT-FAILURE");
    let engine_before = ctl(&sock, &["dma-engine-state"]);
    ctl(
        &sock,
        &[
            "iommu-inject-page-response",
            "--code",
            "failure",
            "--count",
            "1",
        ],
    );
    g.wait_for("INJECT-INVALID");
    ctl(
        &sock,
        &[
            "iommu-inject-page-response",
            "--code",
            "invalid",
            "--count",
            "1",
        ],
    );
    g.wait_for("INJECT-DROP");
    let dropped = ctl(&sock, &["iommu-drop-page-requests", "--count", "4"]);
    g.wait_for("INJECT-DELAY");
    ctl(&sock, &["iommu-delay-invalidation-wait", "--ms", "300"]);
    // The guest's handshake: an Invalid response tells it the delay is in place.
    ctl(
        &sock,
        &[
            "iommu-inject-page-response",
            "--code",
            "invalid",
            "--count",
            "1",
        ],
    );
    g.wait_for("DELAY-DONE");
    let iommu = ctl(&sock, &["iommu-state"]);
    ctl(&sock, &["iommu-delay-invalidation-wait", "--ms", "0"]);
    let engine = ctl(&sock, &["dma-engine-state"]);
    g.wait_for("== end");
    let (status, out, _) = g.finish();
    assert_eq!(status, Some(0), "guest script:\n{out}");

    // 1. 64 MiB into never-touched anonymous memory: right data, one page request per page,
    //    answered through the guest's page request interrupt and traced by intel_iommu.
    let p = phase(&out, "first-touch");
    assert_eq!(value(&p, "exit"), "0", "{}", p.join("\n"));
    let line = summary(&p, "copy anon 67108864 bytes");
    assert_eq!(field(line, "status"), "SUCCESS");
    assert!(number(line, "page_requests") >= 16384, "{line}");
    let interrupts: u64 = value(&p, "prq-interrupts").parse().unwrap();
    assert!(interrupts >= 1, "no dmar0-prq interrupt:\n{}", p.join("\n"));
    let traced: u64 = value(&p, "prq-report-events").parse().unwrap();
    assert!(
        traced >= 1,
        "no intel_iommu:prq_report event:\n{}",
        p.join("\n")
    );
    assert!(
        value(&p, "trace-line").contains("pasid=0x"),
        "{}",
        p.join("\n")
    );
    let e0 = &engine_before["engines"][0];
    assert_eq!(e0["address"], "00:18.0", "{engine_before}");
    assert!(
        e0["counters"]["page_requests"].as_u64().unwrap() >= 16384
            && e0["counters"]["page_responses"]["success"]
                .as_u64()
                .unwrap()
                >= 16384,
        "the VMM's counters show the page requests answered Success: {engine_before}"
    );
    assert!(e0["ats_enabled"] == true && e0["pasid_enabled"] == true && e0["pri_enabled"] == true);

    // 5b. pasid-bits=20 reaches the guest: ECAP.PSS = 19 (20-bit PASIDs) and the engine's
    //     PASID capability says 20 bits; Linux enabled PASID, ATS and PRI on it.
    let p = phase(&out, "pasid");
    let ecap = u64::from_str_radix(value(&p, "ecap").trim_start_matches("0x"), 16).unwrap();
    assert_eq!((ecap >> 35) & 0x1f, 19, "ECAP.PSS: {}", p.join("\n"));
    assert!(
        value(&p, "pasid-cap").contains("Max PASID Width: 14"),
        "{}",
        p.join("\n")
    );
    assert!(
        value(&p, "pasid-ctl").contains("Enable+"),
        "{}",
        p.join("\n")
    );
    assert!(value(&p, "ats-ctl").contains("Enable+"), "{}", p.join("\n"));
    assert!(value(&p, "pri-ctl").contains("Enable+"), "{}", p.join("\n"));

    // 3. munmap while the copy is outstanding: Invalid (or the torn-down PASID's translation
    //    fault), no hang, and the next process binds and copies.
    let p = phase(&out, "munmap");
    assert_eq!(value(&p, "exit"), "0", "{}", p.join("\n"));
    let line = summary(&p, "munmap-race");
    assert!(
        ["PAGE_INVALID", "TRANSLATION_FAULT"].contains(&field(line, "status")),
        "{line}"
    );
    assert_eq!(value(&p, "after-exit"), "0", "{}", p.join("\n"));

    // 4. ATS coherence: after the remap the device writes the new page (a device-TLB
    //    invalidation came first), the old page keeps the old data.
    let p = phase(&out, "remap");
    assert_eq!(value(&p, "exit"), "0", "{}", p.join("\n"));
    let line = summary(&p, "remap");
    assert!(number(line, "atc_invalidations") >= 1, "{line}");
    assert_eq!(field(line, "old_page"), "unchanged", "{line}");

    // 5. 64 processes, 64 PASIDs, every copy right.
    let p = phase(&out, "procs");
    assert_eq!(value(&p, "exit"), "0", "{}", p.join("\n"));
    assert_eq!(value(&p, "procs-ok"), "64", "{}", p.join("\n"));
    assert_eq!(value(&p, "distinct-pasids"), "64", "{}", p.join("\n"));

    // 6. Injections, each reported by the guest and recovered from.
    let p = phase(&out, "inject-failure");
    assert!(
        p.iter()
            .any(|l| l.contains("status=PAGE_FAILURE") && l.ends_with(" ok")),
        "the injected Failure came back as PAGE_FAILURE:\n{}",
        p.join("\n")
    );
    assert_eq!(
        value(&p, "still-stopped-exit"),
        "0",
        "PRI stays stopped: {}",
        p.join("\n")
    );
    assert!(value(&p, "pri-status").contains("RF+"), "{}", p.join("\n"));
    assert_eq!(value(&p, "recovered-exit"), "0", "{}", p.join("\n"));
    let p = phase(&out, "inject-invalid");
    assert!(
        p.iter()
            .any(|l| l.contains("status=PAGE_INVALID") && l.ends_with(" ok")),
        "{}",
        p.join("\n")
    );
    assert_eq!(value(&p, "after-exit"), "0", "{}", p.join("\n"));
    let p = phase(&out, "inject-drop");
    assert_eq!(dropped["dropped_page_requests"], 4, "{dropped}");
    assert!(
        value(&p, "guest-says").contains("PRQ overflow detected"),
        "{}",
        p.join("\n")
    );
    assert!(
        value(&p, "runs").ends_with("failed 0"),
        "unaffected copies are right: {}",
        p.join("\n")
    );
    assert_eq!(value(&p, "after-exit"), "0", "{}", p.join("\n"));
    let p = phase(&out, "inject-delay");
    assert_eq!(value(&p, "exit"), "0", "{}", p.join("\n"));
    assert!(
        iommu["counters"]["sva"]["delayed_invalidation_waits"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{iommu}"
    );
    assert!(
        iommu["counters"]["sva"]["prq_overflows"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{iommu}"
    );
    let c = &engine["engines"][0]["counters"];
    assert!(
        c["page_responses"]["failure"].as_u64().unwrap() >= 1
            && c["page_responses"]["invalid"].as_u64().unwrap() >= 2
            && c["atc_invalidations"].as_u64().unwrap() >= 1,
        "{engine}"
    );
}

/// Boot 2: file-backed destinations on a CXL pmem region (precommitted, 1 GiB persistent):
/// one fsdax namespace carries ext4 mounted without DAX (page cache), the other XFS mounted
/// with `-o dax` (the CPU and the device write the CXL memory itself).
const FILE_SCRIPT: &str = r#"
T=/sys/kernel/tracing
blockdev() { sed -n 's/.*"blockdev":"\([^"]*\)".*/\1/p'; }
echo "== namespaces"
E=$(ndctl create-namespace -m fsdax -s 256M | blockdev)
X=$(ndctl create-namespace -m fsdax | blockdev)
echo "ext4-on $E xfs-on $X"
mkfs.ext4 -q -F -b 4096 /dev/$E && mkdir -p /mnt/e && mount /dev/$E /mnt/e && echo ext4-mounted
mkfs.xfs -q -f -m reflink=0 /dev/$X && mkdir -p /mnt/x && mount -o dax /dev/$X /mnt/x && echo xfs-mounted
grep " /mnt/x " /proc/mounts | sed 's/^/xfs-mount /'
echo "== ext4"
echo ext4_page_mkwrite > $T/set_ftrace_filter
echo function > $T/current_tracer
echo > $T/trace
sva-test -v --mode file --path /mnt/e/f --size 1M --rounds 3 --fsync 2>&1 | grep -E '^sva-test: (round|copy)'
echo "exit $?"
echo "mkwrite $(grep -c 'ext4_page_mkwrite' $T/trace)"
echo nop > $T/current_tracer
echo "before-drop $(sha256sum < /mnt/e/f | cut -d' ' -f1)"
sync; echo 3 > /proc/sys/vm/drop_caches
echo "after-drop $(sha256sum < /mnt/e/f | cut -d' ' -f1)"
echo "== dax"
echo 1 > $T/events/xfs/xfs_write_fault/enable
echo > $T/trace
sva-test -v --mode dax --path /mnt/x/f --size 1M --rounds 2 --fsync 2>&1 | grep -E '^sva-test: (round|copy)'
echo "exit $?"
echo "write-faults $(grep -c 'xfs_write_fault' $T/trace)"
echo 0 > $T/events/xfs/xfs_write_fault/enable
echo "head $(od -An -tx1 -N64 /mnt/x/f | tr -d ' \n')"
echo "tail $(od -An -tx1 -j $((1048576 - 4096)) -N64 /mnt/x/f | tr -d ' \n')"
umount /mnt/x
umount /mnt/e
echo "== end"
"#;

/// Every round's `page_requests+N` (sva-test -v).
fn round_page_requests(lines: &[&str]) -> Vec<u64> {
    lines
        .iter()
        .filter(|l| l.starts_with("sva-test: round "))
        .map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("page_requests+"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no page_requests+ in `{l}`"))
        })
        .collect()
}

/// Whether some 4 KiB block of `file` starts with the bytes `hex` (hex digits).
fn backing_has_block(file: &Path, hex: &str) -> bool {
    let want: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert_eq!(want.len(), 64, "64 bytes expected: {hex}");
    let data = std::fs::read(file).unwrap();
    data.chunks(4096).any(|block| block.starts_with(&want))
}

#[test]
fn sva_file_backed_ext4_and_xfs_dax_on_cxl_pmem_fault_again_after_writeback() {
    let backing = scratch("pmem.img");
    let sock = scratch("file.sock");
    let args: Vec<String> = [
        "run".to_string(),
        "--timeout=1200".to_string(),
        format!("--control={}", sock.display()),
        "--memory=1G".to_string(),
        "--iommu=vtd".to_string(),
        "--dma-engine".to_string(),
        "--cxl-precommit".to_string(),
        format!(
            "--cxl-type3=volatile=0,persistent=1G,backing={}",
            backing.display()
        ),
        "--".to_string(),
        "sh".to_string(),
        "-c".to_string(),
        FILE_SCRIPT.to_string(),
    ]
    .to_vec();
    let mut g = common::RunningGuest::start(scratch("file-console.log"), &args);
    g.on_stall(state_report(sock));
    g.wait_for("== end");
    let (status, out, _) = g.finish();
    assert_eq!(status, Some(0), "guest script:\n{out}");
    let p = phase(&out, "namespaces");
    assert!(
        p.contains(&"ext4-mounted") && p.contains(&"xfs-mounted"),
        "{}",
        p.join("\n")
    );
    assert!(value(&p, "xfs-mount").contains("dax"), "{}", p.join("\n"));

    // ext4 (page cache): every round's device writes fault through PRI — the first on absent
    // pages, the later ones on pages writeback write-protected — and ext4's page_mkwrite runs
    // each time; the file holds the last write after the page cache is dropped.
    let p = phase(&out, "ext4");
    assert_eq!(value(&p, "exit"), "0", "{}", p.join("\n"));
    let line = summary(&p, "copy file 1048576 bytes");
    assert_eq!(field(line, "status"), "SUCCESS", "{line}");
    let rounds = round_page_requests(&p);
    assert_eq!(rounds.len(), 3, "{}", p.join("\n"));
    // Round 1 faults the file's pages in (a fault may map a whole large folio); after each
    // writeback every one of the 256 pages is write-protected and faults again.
    assert!(
        rounds[0] >= 1 && rounds[1..].iter().all(|&n| n >= 256),
        "page requests per round {rounds:?}:\n{}",
        p.join("\n")
    );
    let mkwrite: u64 = value(&p, "mkwrite").parse().unwrap();
    assert!(
        mkwrite >= rounds[0] + 2 * 256,
        "ext4_page_mkwrite ran {mkwrite} times for page requests {rounds:?}:\n{}",
        p.join("\n")
    );
    assert_eq!(
        value(&p, "before-drop"),
        value(&p, "after-drop"),
        "{}",
        p.join("\n")
    );

    // XFS on DAX: the same through xfs_write_fault, and the device's writes are in the CXL
    // device's backing file.
    let p = phase(&out, "dax");
    assert_eq!(value(&p, "exit"), "0", "{}", p.join("\n"));
    let line = summary(&p, "copy dax 1048576 bytes");
    assert_eq!(field(line, "status"), "SUCCESS", "{line}");
    let rounds = round_page_requests(&p);
    assert_eq!(rounds.len(), 2, "{}", p.join("\n"));
    assert!(
        rounds.iter().all(|&n| n >= 1),
        "{rounds:?}:\n{}",
        p.join("\n")
    );
    let faults: u64 = value(&p, "write-faults").parse().unwrap();
    assert!(
        faults >= rounds[0] + rounds[1],
        "xfs_write_fault fired {faults} times for page requests {rounds:?}:\n{}",
        p.join("\n")
    );
    for which in ["head", "tail"] {
        assert!(
            backing_has_block(&backing, value(&p, which)),
            "the device's last write ({which} of the file) is not in {}",
            backing.display()
        );
    }
}
