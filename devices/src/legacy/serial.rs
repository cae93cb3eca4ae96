//! 16550A UART on port I/O, built on vm-superio's `Serial`, raising its ISA IRQ through an
//! eventfd that the VMM registers as a KVM irqfd.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Interrupt trigger backed by an eventfd (a KVM irqfd on the UART's GSI).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A UART whose transmitted bytes go to `W`.
pub struct SerialPort<W: Write + Send> {
    serial: Serial<EventFdTrigger, NoEvents, W>,
}

impl<W: Write + Send> SerialPort<W> {
    pub fn new(irq: EventFd, out: W) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.serial.fifo_capacity() == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }

    pub fn writer_mut(&mut self) -> &mut W {
        self.serial.writer_mut()
    }
}

impl<W: Write + Send> BusDevice for SerialPort<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            log::debug!("serial write failed: {e:?}");
        }
    }
}
