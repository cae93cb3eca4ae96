//! Fuzz target: see `vmm_fuzz::pci`. Under `cargo fuzz` (`--cfg fuzzing`) this is a libFuzzer
//! target; otherwise it replays the files given as arguments (`FUZZ_VERBOSE=1` prints each
//! operation before it runs).
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::pci::run(data));

#[cfg(not(fuzzing))]
fn main() {
    vmm_fuzz::replay_main(
        "pci_root_complex",
        vmm_fuzz::pci::run_traced,
        std::env::args().skip(1),
    );
}
