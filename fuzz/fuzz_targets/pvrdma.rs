//! Fuzz target: see `vmm_fuzz::pvrdma::run`. Under `cargo fuzz` (`--cfg fuzzing`) this is a
//! libFuzzer target; otherwise it replays the files given as arguments.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::pvrdma::run(data));

#[cfg(not(fuzzing))]
fn main() {
    for path in std::env::args().skip(1) {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        vmm_fuzz::pvrdma::run(&data);
    }
}
