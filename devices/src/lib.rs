//! Device models: port/MMIO bus dispatch, legacy platform devices, PCI.

pub mod bus;
pub mod cxl;
pub mod ioat;
pub mod legacy;
pub mod pci;
pub mod pvrdma;
pub mod sva_engine;
pub mod vmxnet3;
