//! `vmm images build` is byte-for-byte reproducible: two builds from empty caches print the
//! same digests. Needs the Debian archive (the package registry) — as the images themselves do.

mod common;

use std::process::Command;

fn build_into(cache: &std::path::Path) -> Vec<(String, String)> {
    let out = Command::new(common::VMM)
        .args(["images", "build"])
        .env("VMM_CACHE_DIR", cache)
        .output()
        .expect("running vmm images build");
    assert!(
        out.status.success(),
        "vmm images build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 output");
    let lines: Vec<(String, String)> = text
        .lines()
        .map(|l| {
            let (digest, path) = l
                .split_once("  ")
                .unwrap_or_else(|| panic!("not sha256sum format: {l:?}"));
            assert_eq!(digest.len(), 64, "{l:?}");
            assert!(digest.chars().all(|c| c.is_ascii_hexdigit()), "{l:?}");
            (digest.to_string(), path.to_string())
        })
        .collect();
    assert!(!lines.is_empty(), "no artifacts listed");
    lines
}

#[test]
fn two_builds_from_empty_caches_print_identical_digests() {
    // Under the target directory, not /tmp: the nested host hides /tmp.
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("images-repro");
    let _ = std::fs::remove_dir_all(&base);
    let first = build_into(&base.join("a"));
    let second = build_into(&base.join("b"));
    let digests = |v: &[(String, String)]| {
        v.iter()
            .map(|(d, p)| {
                (
                    d.clone(),
                    std::path::Path::new(p).file_name().unwrap().to_owned(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(digests(&first), digests(&second));
    for (digest, path) in &first {
        // sha256sum -c style: the digest printed is the file's digest.
        let out = Command::new("sha256sum")
            .arg(path)
            .output()
            .expect("sha256sum");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with(digest.as_str()), "{path}: {text}");
    }
    let _ = std::fs::remove_dir_all(&base);
}
