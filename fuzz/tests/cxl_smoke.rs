//! Stable smoke run of the CXL harnesses: a few thousand pseudo-random inputs each (the same
//! code libFuzzer drives), so a panic on guest input fails `cargo test` here.

fn inputs(seed: u64, count: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut next = vmm_fuzz::xorshift(seed);
    (0..count).map(move |_| {
        let len = (next() % 512) as usize;
        (0..len).map(|_| next() as u8).collect()
    })
}

#[test]
fn cxl_registers_survive_random_programming() {
    for data in inputs(0x9e37_79b9_7f4a_7c15, 2000) {
        vmm_fuzz::cxl::run_registers(&data);
    }
}

#[test]
fn cxl_mailbox_survives_random_commands() {
    for data in inputs(0xd1b5_4a32_d192_ed03, 2000) {
        vmm_fuzz::cxl::run_mailbox(&data);
    }
}
