//! Bad command-line input: one clear line naming the bad value, VMM-error status, nothing booted.

mod common;

use common::vmm;

const EXIT_VMM_ERROR: i32 = 125;

fn assert_one_line_error(run: &common::Run, needle: &str) {
    run.expect_status(EXIT_VMM_ERROR);
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr, got: {:?}",
        run.stderr
    );
    assert!(lines[0].starts_with("vmm: "), "{:?}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "{:?} should mention {needle:?}",
        lines[0]
    );
    assert!(run.stdout.is_empty(), "stdout: {:?}", run.stdout);
}

#[test]
fn missing_kernel_path_is_one_line_error() {
    let run = vmm(["run", "--kernel", "/nonexistent/bzImage", "--", "true"]);
    assert_one_line_error(&run, "/nonexistent/bzImage");
}

#[test]
fn missing_initrd_path_is_one_line_error() {
    let run = vmm([
        "run",
        "--kernel",
        "/proc/self/exe",
        "--initrd",
        "/no/such/initrd",
        "--",
        "true",
    ]);
    assert_one_line_error(&run, "/no/such/initrd");
}

#[test]
fn malformed_memory_size_is_one_line_error() {
    for bad in ["4X", "lots", "-1G", "1.5G"] {
        let run = vmm(["run", "--memory", bad, "--", "true"]);
        assert_one_line_error(&run, &format!("'{bad}'"));
    }
}

#[test]
fn too_small_memory_is_one_line_error() {
    let run = vmm(["run", "--memory", "1M", "--", "true"]);
    assert_one_line_error(&run, "'1M'");
}

#[test]
fn zero_cpus_is_one_line_error() {
    let run = vmm(["run", "--cpus", "0", "--", "true"]);
    assert_one_line_error(&run, "--cpus value 0");
}

#[test]
fn non_numeric_cpus_is_one_line_error() {
    let run = vmm(["run", "--cpus", "two", "--", "true"]);
    assert_one_line_error(&run, "'two'");
}

#[test]
fn bad_timeout_is_one_line_error() {
    let run = vmm(["run", "--timeout", "-3", "--", "true"]);
    assert_one_line_error(&run, "-3");
}

#[test]
fn unknown_flag_is_one_line_error() {
    let run = vmm(["run", "--frobnicate"]);
    assert_one_line_error(&run, "--frobnicate");
}

#[test]
fn kernel_that_is_not_a_kernel_is_rejected_before_boot() {
    let dir = std::env::temp_dir().join(format!("vmm-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("not-a-kernel");
    std::fs::write(&fake, b"hello").unwrap();
    let run = vmm([
        "run".as_ref(),
        "--host=direct".as_ref(),
        "--kernel".as_ref(),
        fake.as_os_str(),
        "--".as_ref(),
        "true".as_ref(),
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_one_line_error(&run, "not-a-kernel");
}

#[test]
fn help_documents_exit_statuses() {
    let run = vmm(["run", "--help"]);
    run.expect_status(0);
    for needle in [
        "124",
        "125",
        "123",
        "128+N",
        "130 SIGINT",
        "143 SIGTERM",
        "--timeout",
        "--cpus",
        "--memory",
        "--kernel",
    ] {
        assert!(
            run.stdout.contains(needle),
            "help lacks {needle}: {}",
            run.stdout
        );
    }
}

#[test]
fn malformed_cxl_spec_is_one_line_error() {
    let run = vmm([
        "run",
        "--cxl-type3",
        "volatile=100M,backing=x.img",
        "--",
        "true",
    ]);
    assert_one_line_error(&run, "multiple of 256M");
    let run = vmm(["run", "--cxl-type3", "volatile=256M", "--", "true"]);
    assert_one_line_error(&run, "backing=PATH is required");
    let run = vmm(["run", "--cxl-precommit", "--", "true"]);
    assert_one_line_error(&run, "--cxl-type3");
}

#[test]
fn cxl_backing_file_of_the_wrong_size_is_refused_and_left_alone() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-cxl-backing");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("small.img");
    std::fs::write(&img, b"precious user data").unwrap();
    let run = vmm([
        "run".to_string(),
        "--host=direct".to_string(),
        "--kernel=/proc/self/exe".to_string(),
        format!(
            "--cxl-type3=volatile=256M,persistent=0,backing={}",
            img.display()
        ),
        "--".to_string(),
        "true".to_string(),
    ]);
    assert_one_line_error(&run, "refusing to resize");
    assert_eq!(std::fs::read(&img).unwrap(), b"precious user data");
}

/// A `vmm run` on a backing file (or label storage area) another process holds is refused at
/// once, before any boot, naming the file and the holder; the file is left as it was.
#[test]
fn cxl_files_in_use_by_another_run_are_refused_naming_the_holder() {
    use std::os::fd::AsRawFd;
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-cxl-locked");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("held.img");
    let lsa = dir.join("held.lsa");
    let data = vec![0x5au8; 256 << 20];
    std::fs::write(&img, &data).unwrap();
    std::fs::write(&lsa, vec![0u8; 128 << 10]).unwrap();
    for (held, what) in [(&img, "CXL backing file"), (&lsa, "CXL label storage area")] {
        // This test process holds an OFD write lock on the file, as a running `vmm run` does.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(held)
            .unwrap();
        // SAFETY: a zeroed flock is valid; F_WRLCK over the whole file (l_len 0), pid 0.
        let mut request: libc::flock = unsafe { std::mem::zeroed() };
        request.l_type = libc::F_WRLCK as libc::c_short;
        // SAFETY: F_OFD_SETLK reads the valid flock we pass; the descriptor is open.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &request) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let started = std::time::Instant::now();
        let run = vmm([
            "run".to_string(),
            "--kernel=/proc/self/exe".to_string(),
            format!(
                "--cxl-type3=volatile=0,persistent=256M,backing={},lsa={}",
                img.display(),
                lsa.display()
            ),
            "--".to_string(),
            "true".to_string(),
        ]);
        assert_one_line_error(&run, &format!("{what} '{}' is in use by", held.display()));
        assert!(
            run.stderr.contains(&format!("pid {}", std::process::id())),
            "{}",
            run.stderr
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        drop(file);
    }
    assert!(std::fs::read(&img).unwrap() == data, "backing file changed");
    assert_eq!(std::fs::read(&lsa).unwrap(), vec![0u8; 128 << 10]);
}

#[test]
fn bad_iommu_spec_is_one_line_error() {
    for (bad, needle) in [
        ("amd", "unknown IOMMU 'amd'"),
        ("vtd,aw-bits=57", "aw-bits=57"),
        ("vtd,scalable=maybe", "scalable=maybe"),
    ] {
        let run = vmm(["run", "--iommu", bad, "--", "true"]);
        assert_one_line_error(&run, needle);
    }
}

#[test]
fn bad_dma_engine_spec_is_one_line_error() {
    for (bad, needle) in [
        ("ats=maybe", "ats=maybe"),
        ("ats=off,pri=on", "pri=on needs ats=on"),
        ("queues=4", "unknown key 'queues'"),
    ] {
        let run = vmm(["run", "--iommu", "vtd", "--dma-engine", bad, "--", "true"]);
        assert_one_line_error(&run, needle);
    }
    let run = vmm([
        "run",
        "--dma-engine=id=a",
        "--dma-engine=id=a",
        "--",
        "true",
    ]);
    assert_one_line_error(&run, "--dma-engine id 'a' is used twice");
}

#[test]
fn bad_guest_file_is_one_line_error() {
    let run = vmm(["run", "--guest-file", "/no/such/tool", "--", "true"]);
    assert_one_line_error(&run, "/no/such/tool");
    let run = vmm([
        "run",
        "--guest-file",
        "/proc/self/exe:relative",
        "--",
        "true",
    ]);
    assert_one_line_error(&run, "'relative'");
}
