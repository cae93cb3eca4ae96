//! CXL Type 3 harnesses: the register model (config space, component and device register BARs,
//! the host bridge CHBCR, HDM commit/uncommit through a checking listener, precommit and reset:
//! `devices::cxl::fuzz_cxl`) and the mailbox command set (`devices::cxl::memdev::fuzz_execute`:
//! arbitrary opcodes and payloads, fault injection; never a panic, never more output than the
//! payload area, LSA accesses bounds-checked).

use devices::cxl::lsa::MemLabelStorage;
use devices::cxl::memdev::{Memdev, MemdevConfig, fuzz_execute};

/// Fuzz target `cxl_registers`.
pub fn run_registers(data: &[u8]) {
    devices::cxl::fuzz_cxl(data);
}

/// Fuzz target `cxl_mailbox`: a device with 256 MiB volatile + 256 MiB persistent capacity and a
/// 128 KiB label storage area.
pub fn run_mailbox(data: &[u8]) {
    let lsa = MemLabelStorage::new(128 << 10).expect("LSA size is valid");
    let mut memdev = Memdev::new(MemdevConfig {
        volatile_bytes: 256 << 20,
        persistent_bytes: 256 << 20,
        lsa: Some(Box::new(lsa)),
        serial: 1,
        id: "fuzz".into(),
    })
    .expect("capacities are valid");
    fuzz_execute(&mut memdev, data);
}
