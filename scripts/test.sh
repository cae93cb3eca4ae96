#!/usr/bin/env bash
# The project's test command: installs what it needs, then builds, lints and runs every test —
# unit tests, CLI tests, the reproducible-image test and the guest tests (which boot real
# guests; through the nested-KVM host where /dev/kvm cannot run stock guests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The RoCE engine benchmark and its driver-side rig build only with the `harness` feature.
cargo clippy -p devices --all-targets --features harness --locked -- -D warnings
# Guest images are built (downloaded from the Debian archive) once, up front, so the tests'
# timings are about the guests.
cargo build --workspace --locked
target/debug/vmm images build >/dev/null
cargo test --workspace --locked -- --test-threads=2
# The ACPI tables through ACPICA's own disassembler and interpreter (iasl, acpiexec).
cargo test -p vmm --bins --locked -- --ignored
# Replay the fuzz corpora through the fuzz targets' logic (stable Rust, no libFuzzer).
(cd fuzz && cargo test --locked)
