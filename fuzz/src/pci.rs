//! `PciRootComplex` harness: ECAM, BAR MMIO and configuration mechanism #1 accesses of any
//! width and offset against the VMM's topology.
//!
//! Topology (as `vmm/src/pci.rs` `Platform::new` builds it): host bridge at 00:00.0, root port
//! 00:01.0 added with `add_bridge` and `BridgeResources::default()`, the VMM's windows
//! (32-bit 0xc000_0000 + 512 MiB, 64-bit 0x80_0000_0000 + 64 GiB), MSIs into a
//! `RecordingMsiSink`. The setup byte can add, on top of that:
//! - bit 0: a harness endpoint with two functions at 01:00.0 and 01:00.3 behind the root port
//!   (MSI-X table in a 64-bit prefetchable BAR, PBA and a doorbell in a 32-bit BAR), so the
//!   bridge windows, multi-function decode and endpoint MSI-X paths are reachable;
//! - bit 1: a second root port at 00:02.0 (bus 2), so two bridges compete for bus numbers.
//!
//! Functions the harness must reach directly (to trigger vectors and inspect state) are added
//! through [`Shared`], which forwards every call unchanged.
//!
//! Input: setup byte, then operations (see [`Op`] and [`decode_ops`]).
//!
//! Invariants checked after each operation:
//! - malformed ECAM accesses and accesses to absent functions read all-ones; a function is
//!   absent exactly when its Vendor ID reads 0xffff, present ones read 0x1b36;
//! - reads have no side effects: reading again returns the same bytes, and no MSI is sent;
//! - ECAM and configuration mechanism #1 agree on the first 256 bytes;
//! - a BAR MMIO access is claimed exactly when an address lies in a BAR that
//!   `decoded_bars` lists; unclaimed reads leave the buffer untouched;
//! - decoded BARs are naturally aligned powers of two that do not wrap;
//! - the platform functions' IDs never change;
//! - every MSI comes from a function with Bus Master Enable and MSI-X Enable set and Function
//!   Mask clear, carries the requester ID the function was addressed with, and matches an
//!   unmasked entry of its table.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::pci::config::COMMAND_MASTER;
use devices::pci::msix::{CONTROL_ENABLE, CONTROL_FUNCTION_MASK, MsixLayout};
use devices::pci::root_complex::ECAM_SIZE;
use devices::pci::{
    BarInfo, BarKind, BridgeResources, ConfigSpace, HeaderType, HostBridge, MsixCapability,
    PciAddress, PciDevice, PciIds, PciRootComplex, PciWindows, RootPort, RootPortConfig,
};
use iommu::{MsiMessage, MsiSink, RecordingMsiSink, RequesterId};

use crate::{MAX_OPS, Reader, Writer, data_bytes, guarded_read, width, width_byte};

/// The VMM's BAR windows (`vmm/src/layout.rs`).
pub const WINDOWS: PciWindows = PciWindows {
    mmio32_base: 0xc000_0000,
    mmio32_size: 0x2000_0000,
    mmio64_base: 0x80_0000_0000,
    mmio64_size: 0x10_0000_0000,
};

const VENDOR: u16 = devices::pci::ids::VENDOR_REDHAT;
/// Device ID of the harness endpoint (not a real device).
const ENDPOINT_DEVICE_ID: u16 = 0x7f00;
/// Endpoint BAR0 layout: scratch registers, a doorbell (write a vector number to trigger it),
/// and the PBA.
const SCRATCH_LEN: u64 = 0x100;
const DOORBELL: u64 = 0x100;
const PBA_OFFSET: u32 = 0x800;
const BAR0_SIZE: u64 = 0x1000;
/// Endpoint BAR2: 64-bit prefetchable, MSI-X table at 0.
const BAR2_SIZE: u64 = 0x4000;

/// A function shared between the root complex and the harness; forwards every call.
pub struct Shared<T>(pub Arc<Mutex<T>>);

impl<T: PciDevice> PciDevice for Shared<T> {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        lock(&self.0).config_read(offset, data)
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        lock(&self.0).config_write(offset, data)
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        lock(&self.0).bar_read(bar, offset, data)
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        lock(&self.0).bar_write(bar, offset, data)
    }
    fn bars(&self) -> Vec<BarInfo> {
        lock(&self.0).bars()
    }
    fn set_requester_id(&mut self, requester_id: RequesterId) {
        lock(&self.0).set_requester_id(requester_id)
    }
    fn name(&self) -> &str {
        "shared"
    }
}

/// The harness endpoint: a type 0 function with MSI-X, scratch registers and a doorbell.
pub struct Endpoint {
    config: ConfigSpace,
    msix: MsixCapability,
    scratch: [u8; SCRATCH_LEN as usize],
    requester_id: RequesterId,
}

impl Endpoint {
    pub fn new(vectors: u16, sink: Arc<dyn MsiSink>) -> Self {
        let mut config = ConfigSpace::new(
            HeaderType::Type0,
            PciIds {
                vendor_id: VENDOR,
                device_id: ENDPOINT_DEVICE_ID,
                revision_id: 0,
                class_code: 0xff_00_00,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            },
        );
        config
            .add_bar(0, BAR0_SIZE, BarKind::Memory32, false)
            .expect("harness endpoint BAR0");
        config
            .add_bar(2, BAR2_SIZE, BarKind::Memory64, true)
            .expect("harness endpoint BAR2");
        let msix = MsixCapability::new(
            &mut config,
            MsixLayout {
                num_vectors: vectors,
                table_bar: 2,
                table_offset: 0,
                pba_bar: 0,
                pba_offset: PBA_OFFSET,
            },
            sink,
            RequesterId(0),
        )
        .expect("harness endpoint MSI-X");
        Endpoint {
            config,
            msix,
            scratch: [0; SCRATCH_LEN as usize],
            requester_id: RequesterId(0),
        }
    }
}

impl PciDevice for Endpoint {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        self.msix.config_written(&self.config, offset, data.len());
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if self.msix.bar_read(bar, offset, data) {
            return;
        }
        let end = offset.checked_add(data.len() as u64);
        match (bar, end) {
            (0, Some(end)) if end <= SCRATCH_LEN => {
                let o = offset as usize;
                data.copy_from_slice(&self.scratch[o..o + data.len()]);
            }
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if self.msix.bar_write(bar, offset, data) {
            return;
        }
        let end = offset.checked_add(data.len() as u64);
        match (bar, end) {
            (0, Some(end)) if end <= SCRATCH_LEN => {
                let o = offset as usize;
                self.scratch[o..o + data.len()].copy_from_slice(data);
            }
            (0, _) if offset == DOORBELL && !data.is_empty() => {
                let mut v = [0u8; 2];
                for (d, s) in v.iter_mut().zip(data) {
                    *d = *s;
                }
                self.msix.trigger(u16::from_le_bytes(v));
            }
            _ => {}
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn set_requester_id(&mut self, requester_id: RequesterId) {
        self.requester_id = requester_id;
        self.msix.set_requester_id(requester_id);
    }

    fn name(&self) -> &str {
        "fuzz-endpoint"
    }
}

/// Topology options (the setup byte).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Setup {
    /// Add the harness endpoint (01:00.0 with 8 vectors, 01:00.3 with 65).
    pub endpoints: bool,
    /// Add a second root port at 00:02.0.
    pub second_port: bool,
    /// Add a second root bus 0x80 with a root port at 80:02.0.
    pub second_root: bool,
}

impl Setup {
    fn from_byte(b: u8) -> Self {
        Setup {
            endpoints: b & 1 != 0,
            second_port: b & 2 != 0,
            second_root: b & 4 != 0,
        }
    }

    fn to_byte(self) -> u8 {
        u8::from(self.endpoints)
            | (u8::from(self.second_port) << 1)
            | (u8::from(self.second_root) << 2)
    }
}

/// Where an MMIO access goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Into the `index`-th (modulo) BAR that currently decodes, `offset` modulo twice its size
    /// (so about half the accesses straddle or pass its end).
    Bar { index: u8, offset: u32 },
    /// 32-bit window base + offset.
    Mmio32(u32),
    /// 64-bit window base + offset.
    Mmio64(u32),
    /// Any guest-physical address.
    Raw(u64),
}

/// One guest operation. `len` is the access width (see [`crate::width`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// ECAM read of `bus:devfn` register `reg` (0..=0xfff).
    EcamRead {
        bus: u8,
        devfn: u8,
        reg: u16,
        len: usize,
    },
    /// ECAM write.
    EcamWrite {
        bus: u8,
        devfn: u8,
        reg: u16,
        len: usize,
        value: u64,
    },
    /// ECAM read at any offset (also past the 256 MiB window).
    EcamRawRead { offset: u64, len: usize },
    /// ECAM write at any offset.
    EcamRawWrite { offset: u64, len: usize, value: u64 },
    /// Memory read outside ECAM (BAR dispatch).
    MmioRead { target: Target, len: usize },
    /// Memory write outside ECAM.
    MmioWrite {
        target: Target,
        len: usize,
        value: u64,
    },
    /// Port read around 0xCF8..=0xCFF.
    PioRead { port: u16, len: usize },
    /// Port write around 0xCF8..=0xCFF.
    PioWrite { port: u16, len: usize, value: u64 },
    /// Device-side event: a function signals an MSI-X vector (root ports: PME/AER; endpoint:
    /// its own interrupts). `function` picks among the functions that have MSI-X, modulo.
    Trigger { function: u8, vector: u16 },
    /// Calls `decoded_bars` and `functions` and checks what they return.
    Inspect,
}

const OP_KINDS: u8 = 10;
/// Ports of the PIO operations: 0xCF0 + (byte % 24), i.e. 0xCF0..=0xD07.
const PIO_BASE: u16 = 0xcf0;
const PIO_SPAN: u8 = 24;

fn decode_target(r: &mut Reader) -> Option<Target> {
    Some(match r.u8()? % 4 {
        0 => Target::Bar {
            index: r.u8()?,
            offset: r.u32()?,
        },
        1 => Target::Mmio32(r.u32()?),
        2 => Target::Mmio64(r.u32()?),
        _ => Target::Raw(r.u64()?),
    })
}

fn encode_target(w: &mut Writer, t: Target) {
    match t {
        Target::Bar { index, offset } => w.u8(0).u8(index).u32(offset),
        Target::Mmio32(o) => w.u8(1).u32(o),
        Target::Mmio64(o) => w.u8(2).u32(o),
        Target::Raw(a) => w.u8(3).u64(a),
    };
}

fn decode_op(r: &mut Reader) -> Option<Op> {
    Some(match r.u8()? % OP_KINDS {
        0 => Op::EcamRead {
            bus: r.u8()?,
            devfn: r.u8()?,
            reg: r.u16()? & 0xfff,
            len: width(r.u8()?),
        },
        1 => Op::EcamWrite {
            bus: r.u8()?,
            devfn: r.u8()?,
            reg: r.u16()? & 0xfff,
            len: width(r.u8()?),
            value: r.u64()?,
        },
        2 => Op::EcamRawRead {
            offset: r.u64()?,
            len: width(r.u8()?),
        },
        3 => Op::EcamRawWrite {
            offset: r.u64()?,
            len: width(r.u8()?),
            value: r.u64()?,
        },
        4 => Op::MmioRead {
            target: decode_target(r)?,
            len: width(r.u8()?),
        },
        5 => Op::MmioWrite {
            target: decode_target(r)?,
            len: width(r.u8()?),
            value: r.u64()?,
        },
        6 => Op::PioRead {
            port: PIO_BASE + u16::from(r.u8()? % PIO_SPAN),
            len: width(r.u8()?),
        },
        7 => Op::PioWrite {
            port: PIO_BASE + u16::from(r.u8()? % PIO_SPAN),
            len: width(r.u8()?),
            value: r.u64()?,
        },
        8 => Op::Trigger {
            function: r.u8()?,
            vector: r.u16()?,
        },
        _ => Op::Inspect,
    })
}

fn encode_op(w: &mut Writer, op: Op) {
    match op {
        Op::EcamRead {
            bus,
            devfn,
            reg,
            len,
        } => {
            w.u8(0).u8(bus).u8(devfn).u16(reg).u8(width_byte(len));
        }
        Op::EcamWrite {
            bus,
            devfn,
            reg,
            len,
            value,
        } => {
            w.u8(1)
                .u8(bus)
                .u8(devfn)
                .u16(reg)
                .u8(width_byte(len))
                .u64(value);
        }
        Op::EcamRawRead { offset, len } => {
            w.u8(2).u64(offset).u8(width_byte(len));
        }
        Op::EcamRawWrite { offset, len, value } => {
            w.u8(3).u64(offset).u8(width_byte(len)).u64(value);
        }
        Op::MmioRead { target, len } => {
            w.u8(4);
            encode_target(w, target);
            w.u8(width_byte(len));
        }
        Op::MmioWrite { target, len, value } => {
            w.u8(5);
            encode_target(w, target);
            w.u8(width_byte(len)).u64(value);
        }
        Op::PioRead { port, len } => {
            w.u8(6)
                .u8(port.wrapping_sub(PIO_BASE) as u8)
                .u8(width_byte(len));
        }
        Op::PioWrite { port, len, value } => {
            w.u8(7)
                .u8(port.wrapping_sub(PIO_BASE) as u8)
                .u8(width_byte(len))
                .u64(value);
        }
        Op::Trigger { function, vector } => {
            w.u8(8).u8(function).u16(vector);
        }
        Op::Inspect => {
            w.u8(9);
        }
    }
}

/// Splits an input into its setup and operations.
pub fn decode_ops(data: &[u8]) -> (Setup, Vec<Op>) {
    let mut r = Reader::new(data);
    let setup = Setup::from_byte(r.u8().unwrap_or(0));
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
    w.u8(setup.to_byte());
    for &op in ops {
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

/// ECAM offset of `bus:devfn` register `reg`.
pub fn ecam_offset(bus: u8, devfn: u8, reg: u16) -> u64 {
    (u64::from(bus) << 20) | (u64::from(devfn) << 12) | u64::from(reg & 0xfff)
}

/// CONFIG_ADDRESS value selecting `bus:devfn` register `reg` (mechanism #1).
fn cf8_select(bus: u8, devfn: u8, reg: u16) -> u32 {
    0x8000_0000 | (u32::from(bus) << 16) | (u32::from(devfn) << 8) | u32::from(reg & 0xfc)
}

/// The PCIe rule for a config request: 1..=4 bytes inside one DWORD of the 4 KiB space.
fn config_access_ok(reg: u64, len: usize) -> bool {
    (1..=4).contains(&len) && reg + len as u64 <= 4096 && reg / 4 == (reg + len as u64 - 1) / 4
}

/// A function with MSI-X that the harness can trigger and inspect.
enum MsixFunction {
    RootPort(Arc<Mutex<RootPort>>),
    Endpoint(Arc<Mutex<Endpoint>>),
}

impl MsixFunction {
    fn config_u16(&self, reg: u16) -> u16 {
        let mut b = [0u8; 2];
        match self {
            MsixFunction::RootPort(p) => lock(p).config_read(reg, &mut b),
            MsixFunction::Endpoint(e) => lock(e).config_read(reg, &mut b),
        }
        u16::from_le_bytes(b)
    }

    fn msix_cap(&self) -> Option<u8> {
        let mut read = |o: u16, d: &mut [u8]| match self {
            MsixFunction::RootPort(p) => lock(p).config_read(o, d),
            MsixFunction::Endpoint(e) => lock(e).config_read(o, d),
        };
        devices::pci::capability::find_capability(&mut read, devices::pci::capability::cap_id::MSIX)
    }

    /// True if the function may send MSI-X messages now.
    fn may_send(&self) -> bool {
        let Some(cap) = self.msix_cap() else {
            return false;
        };
        let ctl = self.config_u16(u16::from(cap) + 2);
        self.config_u16(devices::pci::config::COMMAND) & COMMAND_MASTER != 0
            && ctl & CONTROL_ENABLE != 0
            && ctl & CONTROL_FUNCTION_MASK == 0
    }

    /// True if an unmasked table entry holds `msg`'s address and data.
    fn has_entry(&self, msg: &MsiMessage) -> bool {
        let Some(cap) = self.msix_cap() else {
            return false;
        };
        let vectors = (self.config_u16(u16::from(cap) + 2) & 0x7ff) + 1;
        (0..u64::from(vectors)).any(|v| {
            let mut e = [0u8; 16];
            match self {
                MsixFunction::RootPort(p) => {
                    let mut p = lock(p);
                    p.bar_read(0, v * 16, &mut e[..8]);
                    p.bar_read(0, v * 16 + 8, &mut e[8..]);
                }
                MsixFunction::Endpoint(d) => {
                    let mut d = lock(d);
                    d.bar_read(2, v * 16, &mut e[..8]);
                    d.bar_read(2, v * 16 + 8, &mut e[8..]);
                }
            }
            let address = u64::from_le_bytes(e[0..8].try_into().unwrap_or_default());
            let data = u32::from_le_bytes(e[8..12].try_into().unwrap_or_default());
            let control = u32::from_le_bytes(e[12..16].try_into().unwrap_or_default());
            address == msg.address && data == msg.data && control & 1 == 0
        })
    }

    fn trigger(&self, vector: u16) {
        match self {
            MsixFunction::RootPort(p) => {
                lock(p).trigger(vector);
            }
            MsixFunction::Endpoint(e) => {
                lock(e).msix.trigger(vector);
            }
        }
    }
}

/// The root complex under test with handles on its functions.
pub struct Harness {
    pub rc: PciRootComplex,
    sink: Arc<RecordingMsiSink>,
    /// Functions with MSI-X and the requester IDs their messages may carry (`None`: any bus,
    /// device 0, this function number — an endpoint captures its bus number from config
    /// writes).
    msix: Vec<(MsixFunction, Option<RequesterId>, u8)>,
    /// MSIs delivered so far (all checked).
    pub delivered: usize,
}

fn addr(bus: u8, device: u8, function: u8) -> PciAddress {
    PciAddress::new(bus, device, function).expect("harness PCI address")
}

impl Harness {
    /// Builds the VMM topology plus what `setup` asks for.
    pub fn new(setup: Setup) -> Self {
        let sink = Arc::new(RecordingMsiSink::new());
        let msi: Arc<dyn MsiSink> = sink.clone();
        let mut rc = PciRootComplex::new(WINDOWS).expect("root complex");
        rc.add_device(addr(0, 0, 0), Box::new(HostBridge::new()))
            .expect("host bridge");
        let rp = Arc::new(Mutex::new(
            RootPort::new(RootPortConfig::new(1), msi.clone()).expect("root port"),
        ));
        let bus = rc
            .add_bridge(
                addr(0, 1, 0),
                Box::new(Shared(rp.clone())),
                BridgeResources::default(),
            )
            .expect("root port bridge");
        let mut msix = vec![(
            MsixFunction::RootPort(rp),
            Some(RequesterId::new(0, 1, 0)),
            0,
        )];
        if setup.second_port {
            let rp2 = Arc::new(Mutex::new(
                RootPort::new(RootPortConfig::new(2), msi.clone()).expect("root port 2"),
            ));
            rc.add_bridge(
                addr(0, 2, 0),
                Box::new(Shared(rp2.clone())),
                BridgeResources::default(),
            )
            .expect("second root port");
            msix.push((
                MsixFunction::RootPort(rp2),
                Some(RequesterId::new(0, 2, 0)),
                0,
            ));
        }
        if setup.second_root {
            rc.add_root_bus(0x80, 128 << 20, 16 << 30)
                .expect("second root bus");
            let rp3 = Arc::new(Mutex::new(
                RootPort::new(RootPortConfig::new(2), msi.clone()).expect("root port on 0x80"),
            ));
            rc.add_bridge(
                addr(0x80, 2, 0),
                Box::new(Shared(rp3.clone())),
                BridgeResources::default(),
            )
            .expect("root port on the second root bus");
            msix.push((
                MsixFunction::RootPort(rp3),
                Some(RequesterId::new(0x80, 2, 0)),
                0,
            ));
        }
        if setup.endpoints {
            for (function, vectors) in [(0u8, 8u16), (3, 65)] {
                let ep = Arc::new(Mutex::new(Endpoint::new(vectors, msi.clone())));
                rc.add_device(addr(bus, 0, function), Box::new(Shared(ep.clone())))
                    .expect("harness endpoint");
                msix.push((MsixFunction::Endpoint(ep), None, function));
            }
        }
        Harness {
            rc,
            sink,
            msix,
            delivered: 0,
        }
    }

    fn ecam_read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        guarded_read(len, 0x5a, |b| self.rc.ecam_read(offset, b)).1
    }

    fn ecam_u32(&mut self, bus: u8, devfn: u8, reg: u16) -> u32 {
        let d = self.ecam_read(ecam_offset(bus, devfn, reg), 4);
        u32::from_le_bytes(d.try_into().unwrap_or_default())
    }

    fn mmio_addr(&mut self, target: Target) -> u64 {
        match target {
            Target::Bar { index, offset } => {
                let bars = self.rc.decoded_bars();
                if bars.is_empty() {
                    return WINDOWS.mmio32_base.wrapping_add(u64::from(offset));
                }
                let bar = bars[usize::from(index) % bars.len()].1;
                let span = bar.size.saturating_mul(2).max(1);
                bar.address.wrapping_add(u64::from(offset) % span)
            }
            Target::Mmio32(o) => WINDOWS.mmio32_base + u64::from(o),
            Target::Mmio64(o) => WINDOWS.mmio64_base + u64::from(o),
            Target::Raw(a) => a,
        }
    }

    /// True if `addr` lies in a BAR that `decoded_bars` lists.
    fn decoded(&mut self, addr: u64) -> bool {
        self.rc
            .decoded_bars()
            .iter()
            .any(|(_, b)| b.address <= addr && addr - b.address < b.size)
    }

    fn check_ecam_read(&mut self, offset: u64, len: usize, got: &[u8]) {
        let aligned_qword = len == 8 && offset.is_multiple_of(8);
        if aligned_qword && offset < ECAM_SIZE {
            let mut want = self.ecam_read(offset, 4);
            want.extend(self.ecam_read(offset + 4, 4));
            assert_eq!(
                got, want,
                "8-byte ECAM read at {offset:#x} != two DWORD reads"
            );
            return;
        }
        let reg = offset & 0xfff;
        if offset >= ECAM_SIZE || !config_access_ok(reg, len) {
            assert!(
                got.iter().all(|&b| b == 0xff),
                "malformed ECAM read at {offset:#x} len {len} returned {got:x?}"
            );
            return;
        }
        let (bus, devfn) = ((offset >> 20) as u8, (offset >> 12) as u8);
        let vendor = self.ecam_read(ecam_offset(bus, devfn, 0), 2);
        let vendor = u16::from_le_bytes([vendor[0], vendor[1]]);
        if vendor == 0xffff {
            assert!(
                got.iter().all(|&b| b == 0xff),
                "absent function {:?} read {got:x?} at {reg:#x}",
                PciAddress::from_devfn(bus, devfn)
            );
        } else {
            assert_eq!(vendor, VENDOR, "unexpected vendor ID");
        }
        let again = self.ecam_read(offset, len);
        assert_eq!(got, again, "ECAM read at {offset:#x} not repeatable");
        if reg + len as u64 <= 256 {
            // Configuration mechanism #1 must see the same bytes (restore CONFIG_ADDRESS after).
            let (_, saved) = guarded_read(4, 0, |b| self.rc.pio_read(0xcf8, b));
            assert!(
                self.rc
                    .pio_write(0xcf8, &cf8_select(bus, devfn, reg as u16).to_le_bytes())
            );
            let port = 0xcfc + (reg & 3) as u16;
            let (claimed, via_cf8) = guarded_read(len, 0x5a, |b| self.rc.pio_read(port, b));
            assert!(claimed);
            assert_eq!(got, via_cf8, "ECAM and CF8/CFC disagree at {offset:#x}");
            assert!(self.rc.pio_write(0xcf8, &saved));
        }
    }

    fn check_msis(&mut self, before: usize, read_only: bool, op: &Op) {
        let all = self.sink.take();
        let new = &all[before.min(all.len())..];
        assert!(
            !read_only || new.is_empty(),
            "{op:x?} (a read) sent MSIs: {new:x?}"
        );
        self.delivered += new.len();
        for msg in new {
            assert_eq!(
                msg.address & 3,
                0,
                "MSI address not DWORD aligned: {msg:x?}"
            );
            let source = self.msix.iter().find(|(_, rid, function)| match rid {
                Some(rid) => *rid == msg.requester_id,
                None => {
                    msg.requester_id.device() == 0
                        && msg.requester_id.function() == *function
                        && msg.requester_id.bus() != 0
                }
            });
            let Some((f, _, _)) = source else {
                panic!("MSI with an unexpected requester ID: {msg:x?}");
            };
            assert!(
                f.may_send(),
                "MSI from a function with MSI-X disabled, masked or no bus mastering: {msg:x?}"
            );
            assert!(f.has_entry(msg), "MSI matches no unmasked entry: {msg:x?}");
        }
    }

    fn check_always(&mut self) {
        assert_eq!(
            self.ecam_u32(0, 0, 0),
            0x0008_1b36,
            "host bridge ID changed"
        );
        assert_eq!(self.ecam_u32(0, 8, 0), 0x000c_1b36, "root port ID changed");
    }

    fn check_mmio(&mut self, addr: u64, len: usize, claimed: bool) {
        let want = len > 0 && self.decoded(addr);
        assert_eq!(
            claimed, want,
            "MMIO at {addr:#x} len {len}: claimed {claimed}, decoded_bars says {want}"
        );
    }

    /// Runs one operation and checks the invariants.
    pub fn step(&mut self, op: Op) {
        let before = self.sink.len();
        let mut read_only = true;
        match op {
            Op::EcamRead {
                bus,
                devfn,
                reg,
                len,
            } => {
                let offset = ecam_offset(bus, devfn, reg);
                let got = self.ecam_read(offset, len);
                self.check_ecam_read(offset, len, &got);
            }
            Op::EcamRawRead { offset, len } => {
                let got = self.ecam_read(offset, len);
                self.check_ecam_read(offset, len, &got);
            }
            Op::EcamWrite {
                bus,
                devfn,
                reg,
                len,
                value,
            } => {
                read_only = false;
                self.rc
                    .ecam_write(ecam_offset(bus, devfn, reg), &data_bytes(value, len));
            }
            Op::EcamRawWrite { offset, len, value } => {
                read_only = false;
                self.rc.ecam_write(offset, &data_bytes(value, len));
            }
            Op::MmioRead { target, len } => {
                let addr = self.mmio_addr(target);
                let (claimed, got) = guarded_read(len, 0x5a, |b| self.rc.mmio_read(addr, b));
                if !claimed {
                    assert!(
                        got.iter().all(|&b| b == 0x5a),
                        "unclaimed MMIO read changed the buffer"
                    );
                }
                let again = guarded_read(len, 0x5a, |b| self.rc.mmio_read(addr, b));
                assert_eq!(
                    (claimed, got),
                    again,
                    "MMIO read at {addr:#x} not repeatable"
                );
                self.check_mmio(addr, len, claimed);
            }
            Op::MmioWrite { target, len, value } => {
                read_only = false;
                let addr = self.mmio_addr(target);
                // Decode as of before the write (a write never moves a BAR).
                let want = len > 0 && self.decoded(addr);
                let claimed = self.rc.mmio_write(addr, &data_bytes(value, len));
                assert_eq!(claimed, want, "MMIO write at {addr:#x} len {len}");
            }
            Op::PioRead { port, len } => {
                let (claimed, got) = guarded_read(len, 0x5a, |b| self.rc.pio_read(port, b));
                let ours = (port == 0xcf8 && len == 4) || (0xcfc..=0xcff).contains(&port);
                assert_eq!(claimed, ours, "port {port:#x} len {len} claim");
                if !claimed {
                    assert!(got.iter().all(|&b| b == 0x5a));
                }
                let again = guarded_read(len, 0x5a, |b| self.rc.pio_read(port, b));
                assert_eq!((claimed, got), again, "port read {port:#x} not repeatable");
            }
            Op::PioWrite { port, len, value } => {
                read_only = false;
                let claimed = self.rc.pio_write(port, &data_bytes(value, len));
                let ours = (port == 0xcf8 && len == 4) || (0xcfc..=0xcff).contains(&port);
                assert_eq!(claimed, ours, "port {port:#x} len {len} claim");
            }
            Op::Trigger { function, vector } => {
                read_only = false;
                let i = usize::from(function) % self.msix.len();
                self.msix[i].0.trigger(vector);
            }
            Op::Inspect => {
                for (a, bar) in self.rc.decoded_bars() {
                    assert!(
                        bar.size.is_power_of_two() && bar.address % bar.size == 0,
                        "{a}: BAR {bar:x?} not naturally aligned"
                    );
                    assert!(
                        bar.address.checked_add(bar.size - 1).is_some(),
                        "{a}: BAR {bar:x?} wraps"
                    );
                }
                let functions = self.rc.functions();
                assert!(functions.iter().any(|(a, _)| *a == addr(0, 0, 0)));
                assert!(functions.iter().any(|(a, _)| *a == addr(0, 1, 0)));
            }
        }
        self.check_msis(before, read_only, &op);
        self.check_always();
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
        h.step(*op);
    }
}
