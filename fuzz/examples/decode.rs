//! Prints fuzz inputs as operation lists: `cargo run --example decode -- TARGET FILE...`
//! (TARGET: pci_root_complex, legacy_pio or dma_space).

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_default();
    let decode: fn(&[u8]) -> String = match target.as_str() {
        "pci_root_complex" => vmm_fuzz::pci::decode,
        "legacy_pio" => vmm_fuzz::pio::decode,
        "dma_space" => vmm_fuzz::dma::decode,
        _ => {
            eprintln!("usage: decode pci_root_complex|legacy_pio|dma_space FILE...");
            std::process::exit(2);
        }
    };
    for path in args {
        match std::fs::read(&path) {
            Ok(data) => println!("{path}:\n{}", decode(&data)),
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(2);
            }
        }
    }
}
