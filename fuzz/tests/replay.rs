//! Stable replay: the committed corpus and the hand-made seeds run through the same harness
//! code as the fuzz targets, plus a few thousand pseudo-random inputs per target.

use std::path::{Path, PathBuf};

use vmm_fuzz::{dma, pci, pio, seeds};

type Run = fn(&[u8]);

const TARGETS: [(&str, Run); 3] = [
    ("pci_root_complex", pci::run),
    ("legacy_pio", pio::run),
    ("dma_space", dma::run),
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// `corpus/<target>/seed-<name>` must hold what `seeds.rs` builds (`UPDATE_SEEDS=1` writes it).
#[test]
fn seeds_match_the_committed_corpus() {
    let update = std::env::var_os("UPDATE_SEEDS").is_some();
    for (target, name, bytes) in seeds::all() {
        let path = corpus_dir(target).join(format!("seed-{name}"));
        if update {
            std::fs::create_dir_all(corpus_dir(target)).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_SEEDS=1)", path.display()));
        assert_eq!(
            on_disk,
            bytes,
            "{} is stale (run with UPDATE_SEEDS=1)",
            path.display()
        );
    }
}

#[test]
fn seeds_run_clean() {
    for (target, _, bytes) in seeds::all() {
        let run = TARGETS.iter().find(|(t, _)| *t == target).unwrap().1;
        run(&bytes);
    }
}

fn replay(target: &str, run: Run) {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    for f in &files {
        eprintln!("replaying {}", f.display());
        run(&std::fs::read(f).unwrap());
    }
}

#[test]
fn replay_pci_root_complex_corpus() {
    replay("pci_root_complex", pci::run);
}

#[test]
fn replay_legacy_pio_corpus() {
    replay("legacy_pio", pio::run);
}

#[test]
fn replay_dma_space_corpus() {
    replay("dma_space", dma::run);
}

/// Pseudo-random inputs (fixed seed): a cheap stand-in for the fuzzer on stable.
#[test]
fn random_inputs() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (_, run) in TARGETS {
        for _ in 0..100 {
            let len = (next() % 800) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            run(&data);
        }
    }
}

/// Inputs round-trip through decode/encode, so printed operation lists are faithful.
#[test]
fn seeds_decode_to_what_was_encoded() {
    for (target, name, bytes) in seeds::all() {
        let text = match target {
            "pci_root_complex" => pci::decode(&bytes),
            "legacy_pio" => pio::decode(&bytes),
            _ => dma::decode(&bytes),
        };
        assert!(
            text.lines().count() > 1,
            "{target}/{name} decodes to nothing"
        );
    }
    let (setup, ops) = pci::decode_ops(&seeds::all()[0].2);
    assert_eq!(pci::encode(setup, &ops), seeds::all()[0].2);
}

/// The seeds reach the paths the oracles watch (so a harness change cannot silently disable
/// them).
#[test]
fn seeds_exercise_the_oracles() {
    let seed = |target: &str, name: &str| {
        seeds::all()
            .into_iter()
            .find(|(t, n, _)| *t == target && *n == name)
            .unwrap()
            .2
    };
    for (name, min) in [("msix", 2), ("endpoints", 1)] {
        let (setup, ops) = pci::decode_ops(&seed("pci_root_complex", name));
        let mut h = pci::Harness::new(setup);
        for op in ops {
            h.step(op);
        }
        assert!(h.delivered >= min, "{name}: {} MSIs", h.delivered);
    }
    let (setup, ops) = pio::decode_ops(&seed("legacy_pio", "power"));
    let mut h = pio::Harness::new(setup);
    for op in &ops {
        h.step(op);
    }
    assert_eq!(h.events(), [1, 3, 2, 1]);
    let (setup, ops) = pio::decode_ops(&seed("legacy_pio", "uart"));
    let mut h = pio::Harness::new(setup);
    for op in &ops {
        h.step(op);
    }
    assert!(h.output_bytes() >= 5, "{} UART bytes", h.output_bytes());
}
