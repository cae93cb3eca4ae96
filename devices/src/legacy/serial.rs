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

    /// Queues host input for the guest; returns how many bytes were taken. Input is held back
    /// (0 taken) until the guest driver has enabled the received-data interrupt: Linux's
    /// `serial8250_do_startup` clears the FIFOs when the port is opened, so typed-ahead bytes
    /// queued before that would be lost.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        const IER_RDI: u8 = 0x01;
        if self.serial.state().interrupt_enable & IER_RDI == 0 || self.serial.fifo_capacity() == 0 {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> SerialPort<Vec<u8>> {
        SerialPort::new(EventFd::new(0).unwrap(), Vec::new())
    }

    #[test]
    fn input_waits_until_the_guest_enables_receive_interrupts() {
        let mut p = port();
        assert_eq!(
            p.enqueue_input(b"echo"),
            0,
            "held back before the driver opened the port"
        );
        p.write(1, &[0x01]); // IER: received-data interrupt on
        assert_eq!(p.enqueue_input(b"echo"), 4);
        let mut got = Vec::new();
        for _ in 0..4 {
            let mut b = [0u8];
            p.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"echo");
    }

    #[test]
    fn transmitted_bytes_reach_the_writer_and_bad_accesses_are_ignored() {
        let mut p = port();
        p.write(0, b"A");
        p.write(0, b"BC"); // two-byte access to a byte register: ignored
        p.write(9, b"D"); // past the register block
        let mut wide = [0u8; 2];
        p.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        assert_eq!(p.writer_mut().as_slice(), b"A");
    }
}
