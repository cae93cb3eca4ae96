//! Durability of CXL persistent memory however a run ends: ext4 on an fsdax namespace over CXL
//! pmem, files written and synced in the guest, then the run ended from outside — SIGINT,
//! SIGTERM, SIGKILL of the VMM, SIGKILL of the nested host's QEMU, and a crash loop of SIGKILLs
//! at random moments of a write-and-sync loop. After each, the next boot (which finds the
//! region, the namespace label and the file system again) checks the file system with e2fsck
//! (a journal replay at most: status ≤ 1) and every file whose sync completed before the end
//! against the checksum the guest printed. Also: a second run on a backing file in use is
//! refused at once, naming the file, and the file is free again after a `kill -9`.
//!
//! Backing files live under the target directory: a normal file system, not a tmpfs.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::RunningGuest;

/// A fresh backing file path: no image, label storage area or console log left from a run
/// before (an old LSA would describe a namespace the new, empty image does not have).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cxl-durability-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    for suffix in ["", ".lsa", ".console.log"] {
        let mut p = path.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    path
}

/// One CXL device with 256 MiB of persistent memory backed by `img`, committed at boot.
fn device_flags(img: &Path) -> Vec<String> {
    vec![
        "--cxl-precommit".to_string(),
        format!(
            "--cxl-type3=volatile=0,persistent=256M,backing={}",
            img.display()
        ),
    ]
}

/// A file the guest reported synced: its name under the mount point and its sha256.
#[derive(Debug, Clone)]
struct Synced {
    name: String,
    sha256: String,
}

/// The guest script of one boot.
///
/// `first`: create the fsdax namespace and the file system; otherwise e2fsck it (printing
/// `FSCK <status>`; above 1 fails the boot) and check every file in `expect` (printing `INTACT
/// name` or `DAMAGED name`). Then mount with `-o dax` and write `count` files named `TAG-N`
/// (64–512 KiB of random data each), each followed by `sync` and a line `SYNCED <sha256>
/// <name>` once the sync returned; `pause` seconds of sleep between files; then `DONE` and sleep
/// until the run is ended from outside.
fn boot_script(first: bool, expect: &[Synced], tag: &str, count: u32, pause: u32) -> String {
    let mut s = String::from("set -u\n");
    if first {
        s.push_str(
            "ndctl create-namespace -m fsdax -r region0 >/dev/null || { echo NO-NAMESPACE; exit 10; }\n\
             mkfs.ext4 -q -b 4096 /dev/pmem0 || exit 11\n",
        );
    } else {
        s.push_str(
            "[ -b /dev/pmem0 ] || { echo NO-PMEM; ndctl list -N; exit 12; }\n\
             e2fsck -fy /dev/pmem0 >/tmp/fsck.log 2>&1; rc=$?\n\
             echo \"FSCK $rc\"\n\
             [ $rc -le 1 ] || { cat /tmp/fsck.log; exit 13; }\n",
        );
    }
    s.push_str(
        "mkdir -p /mnt && mount -o dax /dev/pmem0 /mnt || exit 14\n\
         grep -q ' /mnt ext4 .*dax' /proc/mounts || { echo NOT-DAX; exit 15; }\n",
    );
    for f in expect {
        s.push_str(&format!(
            "got=$(sha256sum /mnt/{n} 2>/dev/null | cut -d' ' -f1)\n\
             if [ \"$got\" = {sha} ]; then echo 'INTACT {n}'; else echo \"DAMAGED {n} $got\"; fi\n",
            n = f.name,
            sha = f.sha256
        ));
    }
    s.push_str(&format!(
        "echo CHECKED\n\
         i=0\n\
         while [ $i -lt {count} ]; do\n\
           i=$((i + 1)); f=/mnt/{tag}-$i\n\
           dd if=/dev/urandom of=$f bs=64k count=$(( (i % 8) + 1 )) 2>/dev/null || exit 16\n\
           sync\n\
           echo \"SYNCED $(sha256sum $f | cut -d' ' -f1) {tag}-$i\"\n\
           sleep {pause}\n\
         done\n\
         echo DONE\n\
         sleep 100000\n"
    ));
    s
}

/// Starts a boot of `script` on `img`.
fn boot(img: &Path, script: &str) -> RunningGuest {
    let mut args = vec!["run".to_string(), "--timeout=1200".to_string()];
    args.extend(device_flags(img));
    args.extend(["--", "sh", "-c", script].map(String::from));
    let mut console = img.as_os_str().to_owned();
    console.push(".console.log");
    RunningGuest::start(PathBuf::from(console), &args)
}

/// Parses the `SYNCED <sha> <name>` lines a boot printed.
fn synced_files(lines: &[String]) -> Vec<Synced> {
    lines
        .iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "SYNCED").then_some(())?;
            let sha256 = w.next()?.to_string();
            let name = w.next()?.to_string();
            (sha256.len() == 64).then_some(Synced { name, sha256 })
        })
        .collect()
}

/// Checks what a boot printed before its first write: the file system checked with status ≤ 1
/// and every expected file intact.
fn assert_checked(guest: &mut RunningGuest, expect: &[Synced], after: &str) {
    guest.wait_for("CHECKED");
    let lines = guest.lines_so_far();
    let fsck: Vec<&String> = lines.iter().filter(|l| l.starts_with("FSCK ")).collect();
    assert!(
        matches!(fsck.as_slice(), [l] if *l == "FSCK 0" || *l == "FSCK 1"),
        "after {after}: e2fsck must at most replay the journal; got {fsck:?}\n{}",
        lines.join("\n")
    );
    for f in expect {
        assert!(
            lines.iter().any(|l| *l == format!("INTACT {}", f.name)),
            "after {after}: {} (synced before the end) is not intact:\n{}",
            f.name,
            lines.join("\n")
        );
    }
}

/// The nested host's QEMU among `pid`'s children, if the run went through the nested host.
fn qemu_child_of(pid: u32) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((comm_part, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) && comm_part.contains("qemu-system") {
            return Some(child);
        }
    }
    None
}

/// Waits up to `limit` for `guest` to end and checks its exit status.
fn expect_end(guest: RunningGuest, status: Option<i32>, how: &str) -> String {
    let started = Instant::now();
    let (got, stdout, stderr) = guest.finish();
    assert_eq!(
        got, status,
        "{how}: exit status\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    eprintln!(
        "{how}: ended {:.1} s after the signal",
        started.elapsed().as_secs_f64()
    );
    stderr
}

#[test]
fn synced_files_survive_sigint_sigterm_and_sigkill_of_the_vmm_and_of_qemu() {
    let img = scratch("ends.img");
    let mut expect: Vec<Synced> = Vec::new();

    // 1. SIGINT (Ctrl-C): clean stop, status 130.
    let mut g = boot(&img, &boot_script(true, &[], "sigint", 1, 0));
    g.wait_for("DONE");
    expect.extend(synced_files(&g.lines_so_far()));
    assert_eq!(expect.len(), 1);
    std::thread::sleep(Duration::from_secs(3));
    g.signal(libc::SIGINT);
    let stderr = expect_end(g, Some(130), "SIGINT");
    assert!(stderr.contains("stopped by SIGINT"), "{stderr}");

    // 2. SIGTERM: clean stop, status 143.
    let mut g = boot(&img, &boot_script(false, &expect, "sigterm", 1, 0));
    assert_checked(&mut g, &expect, "SIGINT");
    g.wait_for("DONE");
    expect = merge(expect, synced_files(&g.lines_so_far()));
    std::thread::sleep(Duration::from_secs(3));
    g.signal(libc::SIGTERM);
    let stderr = expect_end(g, Some(143), "SIGTERM");
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");

    // 3. A second run on the same backing file is refused at once and leaves the first alone;
    //    then SIGKILL of the VMM.
    let mut g = boot(&img, &boot_script(false, &expect, "sigkill-vmm", 2, 10));
    assert_checked(&mut g, &expect, "SIGTERM");
    g.wait_for("SYNCED");
    let refused_at = Instant::now();
    let mut second = vec!["run".to_string(), "--timeout=60".to_string()];
    second.extend(device_flags(&img));
    second.extend(["--", "true"].map(String::from));
    let refused = common::vmm(&second);
    let took = refused_at.elapsed();
    refused.expect_status(125);
    let line = refused.stderr.trim();
    assert_eq!(line.lines().count(), 1, "one line: {line}");
    assert!(
        line.contains(&img.display().to_string())
            && line.contains("in use by")
            && line.contains(&format!("pid {}", g.pid())),
        "{line}"
    );
    assert!(took < Duration::from_secs(10), "refusal took {took:?}");
    g.wait_for("DONE"); // the first run went on writing and syncing
    expect = merge(expect, synced_files(&g.lines_so_far()));
    g.signal(libc::SIGKILL);
    expect_end(g, None, "SIGKILL of the VMM");

    // 4. SIGKILL of the nested host's QEMU (of the VMM again where there is no nested host).
    let mut g = boot(&img, &boot_script(false, &expect, "sigkill-qemu", 1, 0));
    assert_checked(&mut g, &expect, "SIGKILL of the VMM");
    g.wait_for("DONE");
    expect = merge(expect, synced_files(&g.lines_so_far()));
    std::thread::sleep(Duration::from_secs(2));
    match qemu_child_of(g.pid()) {
        Some(qemu) => {
            // SAFETY: killing the nested host's QEMU, a child of the run we started.
            unsafe { libc::kill(qemu as i32, libc::SIGKILL) };
            let stderr = expect_end(g, Some(125), "SIGKILL of QEMU");
            assert!(stderr.contains("nested host failed"), "{stderr}");
        }
        None => {
            eprintln!(
                "NOTE: this run used /dev/kvm directly (no nested host): there is no QEMU to \
                 kill; killing the VMM with SIGKILL instead"
            );
            g.signal(libc::SIGKILL);
            expect_end(g, None, "SIGKILL of the VMM (direct)");
        }
    }

    // 5. Everything synced before each end is there.
    assert_eq!(expect.len(), 5, "{expect:?}");
    let g = boot(&img, &boot_script(false, &expect, "final", 0, 0));
    let mut g = g;
    assert_checked(&mut g, &expect, "SIGKILL of QEMU");
    g.signal(libc::SIGTERM);
    expect_end(g, Some(143), "final check");
    // The label storage area was written through (the namespace came back each time) and
    // neither file changed size.
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 256 << 20);
}

/// `old` plus `new`, later entries replacing earlier ones of the same name.
fn merge(mut old: Vec<Synced>, new: Vec<Synced>) -> Vec<Synced> {
    for f in new {
        old.retain(|o| o.name != f.name);
        old.push(f);
    }
    old
}

/// A small xorshift generator; the seed is printed so a failing sequence can be replayed
/// (`VMM_CRASH_SEED`).
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("VMM_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        eprintln!("crash loop seed: {seed} (set VMM_CRASH_SEED to replay)");
        Self(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn crash_loop_of_sigkills_mid_write_loses_no_synced_file() {
    const RUNS: u32 = 10;
    let img = scratch("crash-loop.img");
    let mut rng = Rng::new();
    let mut expect: Vec<Synced> = Vec::new();
    for run in 0..=RUNS {
        let tag = format!("r{run}");
        let writing = run < RUNS;
        let script = boot_script(run == 0, &expect, &tag, if writing { 40 } else { 0 }, 0);
        let mut g = boot(&img, &script);
        if run > 0 {
            assert_checked(&mut g, &expect, &format!("kill {run}"));
        } else {
            g.wait_for("CHECKED");
        }
        if !writing {
            g.signal(libc::SIGTERM);
            expect_end(g, Some(143), "final check");
            break;
        }
        // A random moment of the write-and-sync loop: after its first completed sync, 0–4 s on.
        g.wait_for("SYNCED");
        let delay = rng.below(4000);
        std::thread::sleep(Duration::from_millis(delay));
        g.signal(libc::SIGKILL);
        let (status, stdout, _) = g.finish();
        assert_eq!(status, None, "run {run} should have been killed:\n{stdout}");
        // Only whole lines: the kill may have cut the last one (a `SYNCED` line cut inside its
        // name would name another file).
        let lines: Vec<String> = stdout
            .split_inclusive('\n')
            .filter_map(|l| l.strip_suffix('\n'))
            .map(String::from)
            .collect();
        let synced = synced_files(&lines);
        eprintln!(
            "run {run}: killed {delay} ms after the first sync, {} file(s) synced",
            synced.len()
        );
        assert!(!synced.is_empty());
        expect = merge(expect, synced);
    }
}
