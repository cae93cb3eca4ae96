//! Legacy port-I/O harness: the VMM's port bus (three 16550 UARTs, the ACPI sleep/reset
//! registers, the guest channel, the i8042 reset line and the 0xCF9 reset control), with the
//! PCI configuration ports behind it, dispatched as the vCPU loop in `vmm/src/vm.rs` does:
//! the bus first, then the root complex, else a read returns all-ones.
//!
//! Input: setup byte (bit 0: the UART output fails, as a closed console would), then operations
//! (see [`Op`]).
//!
//! Invariants checked after each operation:
//! - a read fills exactly its buffer and never raises a platform event;
//! - power-off, reset, boot markers and exit statuses are raised only by writes to their own
//!   ports with the documented values (ACPI S5 `(5 << 2) | 0x20` to 0x3C0, 1 to 0x3C2, 0xFE to
//!   0x64, bit 2 to 0xCF9, any byte to 0x500/0x501), at most one per write;
//! - UART output bytes come only from writes to a UART's data register;
//! - unmapped ports are unclaimed and leave the buffer untouched (the VMM then fills 0xff).

use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, lock};
use devices::legacy::{
    GuestChannel, I8042Reset, PlatformEvents, PowerRegisters, ResetControl, SerialPort,
};
use devices::pci::{BridgeResources, HostBridge, PciAddress, PciRootComplex, RootPort};
use iommu::NullMsiSink;
use vmm_sys_util::eventfd::EventFd;

use crate::{MAX_OPS, Reader, Writer, data_bytes, guarded_read, width, width_byte};

/// Port layout of `vmm/src/layout.rs`.
pub const COM1: u16 = 0x3f8;
pub const COM2: u16 = 0x2f8;
pub const COM3: u16 = 0x3e8;
pub const ACPI_SLEEP_CONTROL: u16 = 0x3c0;
pub const ACPI_RESET: u16 = 0x3c2;
pub const ACPI_RESET_VALUE: u8 = 0x01;
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
pub const GUEST_MARKER: u16 = 0x500;
pub const GUEST_EXIT_STATUS: u16 = 0x501;
pub const I8042_COMMAND: u16 = 0x64;
pub const RESET_CONTROL: u16 = 0xcf9;

/// Bases that port selectors point near (the devices above, the PCI config ports).
const INTERESTING: [u16; 9] = [
    COM1,
    COM2,
    COM3,
    ACPI_SLEEP_CONTROL,
    GUEST_MARKER,
    I8042_COMMAND,
    0xcf8,
    0xcfc,
    0x80,
];

/// Counts what the platform devices report.
#[derive(Default)]
pub struct Events {
    power_off: AtomicUsize,
    reset: AtomicUsize,
    markers: AtomicUsize,
    statuses: AtomicUsize,
}

impl Events {
    fn counts(&self) -> [usize; 4] {
        [
            self.power_off.load(Ordering::Relaxed),
            self.reset.load(Ordering::Relaxed),
            self.markers.load(Ordering::Relaxed),
            self.statuses.load(Ordering::Relaxed),
        ]
    }
}

impl PlatformEvents for Events {
    fn power_off(&self) {
        self.power_off.fetch_add(1, Ordering::Relaxed);
    }
    fn reset(&self) {
        self.reset.fetch_add(1, Ordering::Relaxed);
    }
    fn guest_marker(&self, _code: u8) {
        self.markers.fetch_add(1, Ordering::Relaxed);
    }
    fn exit_status(&self, _status: u8) {
        self.statuses.fetch_add(1, Ordering::Relaxed);
    }
}

/// UART output: counts bytes; optionally fails every write.
pub struct Output {
    bytes: Arc<AtomicUsize>,
    fail: bool,
}

impl io::Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.fail {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "closed"));
        }
        self.bytes.fetch_add(buf.len(), Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.fail {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "closed"));
        }
        Ok(())
    }
}

/// Setup options (the setup byte).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Setup {
    /// UART output writes fail.
    pub failing_output: bool,
}

/// One operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// IN of `len` bytes.
    In { port: u16, len: usize },
    /// OUT of `len` bytes.
    Out { port: u16, len: usize, value: u64 },
    /// Host input queued to COM1 (what the console forwards), up to 64 bytes.
    HostInput { bytes: Vec<u8> },
    /// Drains the UARTs' interrupt eventfds (what KVM's irqfd does).
    DrainIrqs,
}

const OP_KINDS: u8 = 6;

fn decode_port(r: &mut Reader) -> Option<u16> {
    let sel = r.u8()?;
    if sel < 0xc0 {
        let base = INTERESTING[usize::from(sel) % INTERESTING.len()];
        let delta = r.u8()?;
        // base - 4 ..= base + 11
        Some(base.wrapping_add(u16::from(delta % 16)).wrapping_sub(4))
    } else {
        r.u16()
    }
}

fn encode_port(w: &mut Writer, port: u16) {
    match INTERESTING
        .iter()
        .position(|&b| port.wrapping_sub(b).wrapping_add(4) < 16)
    {
        Some(i) => {
            w.u8(i as u8)
                .u8(port.wrapping_sub(INTERESTING[i]).wrapping_add(4) as u8);
        }
        None => {
            w.u8(0xff).u16(port);
        }
    }
}

fn decode_op(r: &mut Reader) -> Option<Op> {
    Some(match r.u8()? % OP_KINDS {
        0 | 1 => Op::In {
            port: decode_port(r)?,
            len: width(r.u8()?),
        },
        2 | 3 => Op::Out {
            port: decode_port(r)?,
            len: width(r.u8()?),
            value: r.u64()?,
        },
        4 => {
            let n = usize::from(r.u8()? % 64);
            Op::HostInput {
                bytes: r.bytes(n)?.to_vec(),
            }
        }
        _ => Op::DrainIrqs,
    })
}

fn encode_op(w: &mut Writer, op: &Op) {
    match op {
        Op::In { port, len } => {
            w.u8(0);
            encode_port(w, *port);
            w.u8(width_byte(*len));
        }
        Op::Out { port, len, value } => {
            w.u8(2);
            encode_port(w, *port);
            w.u8(width_byte(*len)).u64(*value);
        }
        Op::HostInput { bytes } => {
            let n = bytes.len().min(63);
            w.u8(4).u8(n as u8);
            w.0.extend_from_slice(&bytes[..n]);
        }
        Op::DrainIrqs => {
            w.u8(5);
        }
    }
}

/// Splits an input into its setup and operations.
pub fn decode_ops(data: &[u8]) -> (Setup, Vec<Op>) {
    let mut r = Reader::new(data);
    let setup = Setup {
        failing_output: r.u8().unwrap_or(0) & 1 != 0,
    };
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS {
        match decode_op(&mut r) {
            Some(op) => ops.push(op),
            None => break,
        }
    }
    (setup, ops)
}

/// The input that [`decode_ops`] turns into `setup` and `ops`.
pub fn encode(setup: Setup, ops: &[Op]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(u8::from(setup.failing_output));
    for op in ops {
        encode_op(&mut w, op);
    }
    w.0
}

/// An input as readable text, one operation per line.
pub fn decode(data: &[u8]) -> String {
    let (setup, ops) = decode_ops(data);
    let mut s = format!("{setup:?}\n");
    for (i, op) in ops.iter().enumerate() {
        let _ = writeln!(s, "{i:4}: {op:x?}");
    }
    s
}

type Uart = SerialPort<Output>;

/// The port bus under test.
pub struct Harness {
    bus: Bus,
    pci: PciRootComplex,
    events: Arc<Events>,
    uarts: Vec<(u16, Arc<Mutex<Uart>>, EventFd)>,
    output: Arc<AtomicUsize>,
}

impl Harness {
    pub fn new(setup: Setup) -> Self {
        let events = Arc::new(Events::default());
        let platform: Arc<dyn PlatformEvents> = events.clone();
        let output = Arc::new(AtomicUsize::new(0));
        let mut bus = Bus::new();
        let mut uarts = Vec::new();
        for port in [COM1, COM2, COM3] {
            let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            let irq_reader = irq.try_clone().expect("eventfd clone");
            // No settle time: host input reaches the receive path as soon as the fuzzed guest
            // enables the interrupt (the VMM's 50 ms wait would keep it out of every run).
            let uart = Arc::new(Mutex::new(SerialPort::with_input_settle(
                irq,
                Output {
                    bytes: output.clone(),
                    fail: setup.failing_output,
                },
                std::time::Duration::ZERO,
            )));
            bus.insert(uart.clone(), u64::from(port), 8)
                .expect("UART range");
            uarts.push((port, uart, irq_reader));
        }
        bus.insert(
            Arc::new(Mutex::new(PowerRegisters::new(
                platform.clone(),
                ACPI_S5_SLEEP_TYPE,
                ACPI_RESET_VALUE,
            ))),
            u64::from(ACPI_SLEEP_CONTROL),
            3,
        )
        .expect("ACPI range");
        bus.insert(
            Arc::new(Mutex::new(GuestChannel::new(platform.clone()))),
            u64::from(GUEST_MARKER),
            u64::from(GUEST_EXIT_STATUS - GUEST_MARKER + 1),
        )
        .expect("guest channel range");
        bus.insert(
            Arc::new(Mutex::new(I8042Reset::new(platform.clone()))),
            u64::from(I8042_COMMAND),
            1,
        )
        .expect("i8042 range");
        bus.insert(
            Arc::new(Mutex::new(ResetControl::new(platform))),
            u64::from(RESET_CONTROL),
            1,
        )
        .expect("CF9 range");

        let mut pci = PciRootComplex::new(crate::pci::WINDOWS).expect("root complex");
        pci.add_device(
            PciAddress::new(0, 0, 0).expect("address"),
            Box::new(HostBridge::new()),
        )
        .expect("host bridge");
        let port = RootPort::new(devices::pci::RootPortConfig::new(1), Arc::new(NullMsiSink))
            .expect("root port");
        pci.add_bridge(
            PciAddress::new(0, 1, 0).expect("address"),
            Box::new(port),
            BridgeResources::default(),
        )
        .expect("root port bridge");
        Harness {
            bus,
            pci,
            events,
            uarts,
            output,
        }
    }

    fn on_bus(port: u16) -> bool {
        [COM1, COM2, COM3]
            .iter()
            .any(|&b| (b..b + 8).contains(&port))
            || (ACPI_SLEEP_CONTROL..ACPI_SLEEP_CONTROL + 3).contains(&port)
            || (GUEST_MARKER..=GUEST_EXIT_STATUS).contains(&port)
            || port == I8042_COMMAND
            || port == RESET_CONTROL
    }

    /// Runs one operation and checks the invariants.
    pub fn step(&mut self, op: &Op) {
        let before = self.events.counts();
        let out_before = self.output.load(Ordering::Relaxed);
        match op {
            Op::In { port, len } => {
                let (port, len) = (*port, *len);
                let (claimed, got) = guarded_read(len, 0x5a, |data| {
                    self.bus.read(u64::from(port), data) || self.pci.pio_read(port, data)
                });
                assert_eq!(
                    self.bus_claims(port) || self.pci_claims(port, len),
                    claimed,
                    "IN {port:#x} len {len}: claim"
                );
                if !claimed {
                    assert!(got.iter().all(|&b| b == 0x5a), "unclaimed IN {port:#x}");
                }
                assert_eq!(before, self.events.counts(), "IN {port:#x} raised an event");
                assert_eq!(
                    out_before,
                    self.output.load(Ordering::Relaxed),
                    "IN {port:#x} produced UART output"
                );
            }
            Op::Out { port, len, value } => {
                let (port, len, value) = (*port, *len, *value);
                let data = data_bytes(value, len);
                let claimed =
                    self.bus.write(u64::from(port), &data) || self.pci.pio_write(port, &data);
                assert_eq!(
                    self.bus_claims(port) || self.pci_claims(port, len),
                    claimed,
                    "OUT {port:#x} len {len}: claim"
                );
                self.check_events(port, &data, before);
                let out = self.output.load(Ordering::Relaxed) - out_before;
                let uart_data = [COM1, COM2, COM3].contains(&port);
                assert!(
                    out == 0 || (uart_data && out == 1),
                    "OUT {port:#x} {data:x?} produced {out} output bytes"
                );
            }
            Op::HostInput { bytes } => {
                let (_, uart, _) = &self.uarts[0];
                let n = lock(uart).enqueue_input(bytes);
                assert!(
                    n <= bytes.len(),
                    "enqueue_input accepted {n} of {}",
                    bytes.len()
                );
                assert_eq!(before, self.events.counts());
            }
            Op::DrainIrqs => {
                for (_, _, irq) in &self.uarts {
                    // Nonblocking: EAGAIN when nothing is pending.
                    let _ = irq.read();
                }
            }
        }
    }

    /// Events raised so far: power-off, reset, boot markers, exit statuses.
    pub fn events(&self) -> [usize; 4] {
        self.events.counts()
    }

    /// UART output bytes so far.
    pub fn output_bytes(&self) -> usize {
        self.output.load(Ordering::Relaxed)
    }

    fn bus_claims(&self, port: u16) -> bool {
        Self::on_bus(port)
    }

    fn pci_claims(&self, port: u16, len: usize) -> bool {
        !Self::on_bus(port) && ((port == 0xcf8 && len == 4) || (0xcfc..=0xcff).contains(&port))
    }

    fn check_events(&self, port: u16, data: &[u8], before: [usize; 4]) {
        let after = self.events.counts();
        let delta: Vec<usize> = after.iter().zip(before).map(|(a, b)| a - b).collect();
        let first = data.first().copied();
        let want = [
            port == ACPI_SLEEP_CONTROL
                && first.is_some_and(|v| v & 0x20 != 0 && (v >> 2) & 7 == ACPI_S5_SLEEP_TYPE),
            (port == ACPI_RESET && first == Some(ACPI_RESET_VALUE))
                || (port == I8042_COMMAND && first == Some(0xfe))
                || (port == RESET_CONTROL && first.is_some_and(|v| v & 4 != 0)),
            port == GUEST_MARKER && first.is_some(),
            port == GUEST_EXIT_STATUS && first.is_some(),
        ];
        for (i, (&d, w)) in delta.iter().zip(want).enumerate() {
            assert_eq!(
                d,
                usize::from(w),
                "OUT {port:#x} {data:x?}: event {} raised {d} times",
                ["power_off", "reset", "guest_marker", "exit_status"][i]
            );
        }
    }
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    run_traced(data, false);
}

/// Runs one fuzz input; with `trace`, prints each operation to stderr before running it (the
/// last one printed is the one that failed).
pub fn run_traced(data: &[u8], trace: bool) {
    let (setup, ops) = decode_ops(data);
    if trace {
        eprintln!("{setup:x?}");
    }
    let mut h = Harness::new(setup);
    for (i, op) in ops.iter().enumerate() {
        if trace {
            eprintln!("{i:4}: {op:x?}");
        }
        h.step(op);
    }
}
