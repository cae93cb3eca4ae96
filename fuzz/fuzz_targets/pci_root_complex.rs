//! Fuzz target: see `vmm_fuzz::pci`. Under `cargo fuzz` (`--cfg fuzzing`) this is a libFuzzer
//! target; otherwise it replays the files given as arguments (`FUZZ_VERBOSE=1` prints them as
//! operations).
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::pci::run(data));

#[cfg(not(fuzzing))]
fn main() {
    vmm_fuzz::replay_main(
        "pci_root_complex",
        vmm_fuzz::pci::run,
        vmm_fuzz::pci::decode,
        std::env::args().skip(1),
    );
}
