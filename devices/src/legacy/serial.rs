//! 16550A UART on port I/O, built on vm-superio's `Serial`, raising its ISA IRQ through an
//! eventfd that the VMM registers as a KVM irqfd.

use std::io::Write;
use std::time::{Duration, Instant};

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

/// IER bit 0: received-data-available interrupt enable.
const IER_RDI: u8 = 0x01;
/// LCR bit 7: divisor latch access (offsets 0 and 1 are the baud divisor while it is set).
const LCR_DLAB: u8 = 0x80;
/// Register offset of IER (with DLAB clear).
const IER_OFFSET: u64 = 1;

/// How long the received-data interrupt must have stayed enabled before host input is handed to
/// the guest. Linux's `autoconfig()` probes the UART by writing IER = 0x0f for a few
/// instructions and then reads RBR while resetting the port (as `serial8250_do_startup` does
/// again when the tty is opened): input delivered inside that window would be read and thrown
/// away. Once it has stayed on that long (a tty is open), input flows whenever it is on: the
/// console turning IER off and back on around each kernel message does not delay it again, and a
/// later port start-up discards before it enables the interrupt.
pub const INPUT_SETTLE: Duration = Duration::from_millis(50);

/// A UART whose transmitted bytes go to `W`.
pub struct SerialPort<W: Write + Send> {
    serial: Serial<EventFdTrigger, NoEvents, W>,
    /// When the guest last turned the received-data interrupt on (None while it is off).
    rx_enabled_since: Option<Instant>,
    /// The interrupt has once stayed enabled for `input_settle`: the driver's probing is over.
    rx_settled: bool,
    input_settle: Duration,
}

impl<W: Write + Send> SerialPort<W> {
    pub fn new(irq: EventFd, out: W) -> Self {
        Self::with_input_settle(irq, out, INPUT_SETTLE)
    }

    /// A port that hands host input over once the guest has kept the received-data interrupt
    /// enabled for `settle` (see [`INPUT_SETTLE`]).
    pub fn with_input_settle(irq: EventFd, out: W, settle: Duration) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger(irq), out),
            rx_enabled_since: None,
            rx_settled: false,
            input_settle: settle,
        }
    }

    /// Queues host input for the guest; returns how many bytes were taken. Input is held back
    /// (0 taken) until the guest driver has enabled the received-data interrupt and kept it on
    /// for [`INPUT_SETTLE`]: before its tty is open, the driver's probing and port start-up read
    /// and discard whatever the receive buffer holds, so typed-ahead bytes would be lost.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let Some(since) = self.rx_enabled_since else {
            return 0;
        };
        self.rx_settled |= since.elapsed() >= self.input_settle;
        if !self.rx_settled || self.serial.fifo_capacity() == 0 {
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
        let ier_write = offset == IER_OFFSET && self.serial.state().line_control & LCR_DLAB == 0;
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            log::debug!("serial write failed: {e:?}");
        }
        if ier_write {
            if data[0] & IER_RDI == 0 {
                self.rx_enabled_since = None;
            } else if self.rx_enabled_since.is_none() {
                self.rx_enabled_since = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> SerialPort<Vec<u8>> {
        SerialPort::with_input_settle(EventFd::new(0).unwrap(), Vec::new(), Duration::ZERO)
    }

    fn port_with_settle(settle: Duration) -> SerialPort<Vec<u8>> {
        SerialPort::with_input_settle(EventFd::new(0).unwrap(), Vec::new(), settle)
    }

    #[test]
    fn input_waits_until_receive_interrupts_stay_enabled() {
        // A settle time no test run reaches: nothing gets through, however IER is set.
        let mut p = port_with_settle(Duration::from_secs(3600));
        p.write(1, &[0x0f]); // autoconfig()'s IER probe
        assert_eq!(p.enqueue_input(b"echo"), 0, "taken during the IER probe");
        p.write(1, &[0x05]); // the tty is opened
        assert_eq!(p.enqueue_input(b"echo"), 0, "taken before the settle time");
    }

    #[test]
    fn only_ier_writes_with_the_receive_interrupt_count() {
        let mut p = port_with_settle(Duration::ZERO);
        // autoconfig(): IER = 0x0f for a moment, then restored to 0.
        p.write(1, &[0x0f]);
        p.write(1, &[0x00]);
        assert_eq!(p.enqueue_input(b"echo"), 0, "taken with the interrupt off");
        // With DLAB set, offset 1 is the divisor latch, not IER.
        p.write(3, &[0x83]);
        p.write(1, &[0x01]);
        p.write(3, &[0x03]);
        assert_eq!(
            p.enqueue_input(b"echo"),
            0,
            "a divisor write counted as IER"
        );
        p.write(1, &[0x05]);
        assert_eq!(p.enqueue_input(b"echo"), 4);
    }

    #[test]
    fn once_settled_input_flows_whenever_the_interrupt_is_on() {
        let settle = Duration::from_millis(20);
        let mut p = port_with_settle(settle);
        p.write(1, &[0x05]);
        std::thread::sleep(settle * 2);
        p.write(1, &[0x07]); // THRI toggled by the driver: still on since the open
        assert_eq!(p.enqueue_input(b"echo"), 4);
        // The console masks IER around a message: nothing while off, at once when back on.
        p.write(1, &[0x00]);
        assert_eq!(
            p.enqueue_input(b"more"),
            0,
            "taken while the interrupt is off"
        );
        p.write(1, &[0x05]);
        assert_eq!(p.enqueue_input(b"more"), 4, "held again after settling");
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
