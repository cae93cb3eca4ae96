//! Pieces every emulated PCI function uses beyond its config space: a handle shared between the
//! root complex and the VMM ([`SharedFunction`]) and a handle that raises the function's MSI-X
//! vectors from outside its register model ([`FunctionInterrupts`]).

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::bus::lock;
use crate::pci::{BarInfo, MsixCapability, MsixTriggerResult, PciDevice};

/// A handle that raises a function's MSI-X vectors from outside its register model (a CXL
/// memory device's command set signals event-log interrupts with it, CXL 2.0 8.2.9.1.5; a DMA
/// engine's worker signals completions). Cloneable, shared with the function.
#[derive(Clone)]
pub struct FunctionInterrupts {
    msix: Arc<Mutex<MsixCapability>>,
}

impl fmt::Debug for FunctionInterrupts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FunctionInterrupts").finish_non_exhaustive()
    }
}

impl FunctionInterrupts {
    pub(crate) fn new(msix: Arc<Mutex<MsixCapability>>) -> Self {
        FunctionInterrupts { msix }
    }

    /// Signals MSI-X `vector` (pending if masked, dropped if MSI-X is disabled).
    pub fn trigger(&self, vector: u16) -> MsixTriggerResult {
        lock(&self.msix).trigger(vector)
    }

    /// Number of MSI-X vectors of the function.
    pub fn num_vectors(&self) -> u16 {
        lock(&self.msix).table().num_vectors()
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut MsixCapability) -> R) -> R {
        f(&mut lock(&self.msix))
    }
}

/// A PCI function shared between the root complex (which owns a `Box<dyn PciDevice>`) and the
/// VMM, which keeps the `Arc<Mutex<T>>` to reset the function, inject errors or inspect its
/// state later (the control API). Every [`PciDevice`] call locks the function.
pub struct SharedFunction<T: PciDevice> {
    inner: Arc<Mutex<T>>,
    name: String,
}

impl<T: PciDevice> fmt::Debug for SharedFunction<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedFunction")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<T: PciDevice> SharedFunction<T> {
    /// Wraps `device`; returns the wrapper (for the root complex) and the VMM's handle.
    pub fn new(device: T) -> (Self, Arc<Mutex<T>>) {
        let name = device.name().to_string();
        let inner = Arc::new(Mutex::new(device));
        (
            SharedFunction {
                inner: inner.clone(),
                name,
            },
            inner,
        )
    }
}

impl<T: PciDevice> PciDevice for SharedFunction<T> {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        lock(&self.inner).config_read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        lock(&self.inner).config_write(offset, data);
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        lock(&self.inner).bar_read(bar, offset, data);
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        lock(&self.inner).bar_write(bar, offset, data);
    }

    fn bars(&self) -> Vec<BarInfo> {
        lock(&self.inner).bars()
    }

    fn set_requester_id(&mut self, requester_id: iommu::RequesterId) {
        lock(&self.inner).set_requester_id(requester_id);
    }

    fn name(&self) -> &str {
        &self.name
    }
}
