//! Fuzz target: see `vmm_fuzz::pio`. Under `cargo fuzz` (`--cfg fuzzing`) this is a libFuzzer
//! target; otherwise it replays the files given as arguments (`FUZZ_VERBOSE=1` prints each
//! operation before it runs).
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::pio::run(data));

#[cfg(not(fuzzing))]
fn main() {
    vmm_fuzz::replay_main(
        "legacy_pio",
        vmm_fuzz::pio::run_traced,
        std::env::args().skip(1),
    );
}
