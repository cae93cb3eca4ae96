//! Fuzz target: see `vmm_fuzz::pio`. Under `cargo fuzz` (`--cfg fuzzing`) this is a libFuzzer
//! target; otherwise it replays the files given as arguments (`FUZZ_VERBOSE=1` prints them as
//! operations).
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::pio::run(data));

#[cfg(not(fuzzing))]
fn main() {
    vmm_fuzz::replay_main(
        "legacy_pio",
        vmm_fuzz::pio::run,
        vmm_fuzz::pio::decode,
        std::env::args().skip(1),
    );
}
