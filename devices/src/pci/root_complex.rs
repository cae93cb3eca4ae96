//! The PCIe root complex: topology, ECAM, type 1 forwarding, BAR dispatch and allocation.
//!
//! - **ECAM** (PCIe Base Spec r6.0, 7.2.2): offset in the window = bus\[27:20\] | device\[19:15\] |
//!   function\[14:12\] | register\[11:0\]. Absent functions read all-ones (Unsupported Request on a
//!   config read completes with all-ones, as Linux expects in `pci_bus_read_dev_vendor_id`),
//!   writes to them are dropped.
//! - **Type 1 forwarding** (PCI-to-PCI Bridge Spec 1.2, 3.2.5.3): a request for bus N goes down
//!   the bridge whose secondary..=subordinate range holds N, using the bus numbers the guest
//!   programmed. Below a PCIe downstream port only device 0 exists (PCIe Base Spec r6.0, 7.3.1).
//! - **Multi-function**: bit 7 of function 0's Header Type reads 1 when other functions exist on
//!   the same device, so Linux's `pci_scan_slot` probes them.
//! - **Memory dispatch**: a BAR decodes an address only if its function's Memory Space Enable is
//!   set and every bridge above it has Memory Space Enable set and a memory or prefetchable
//!   window covering the whole BAR. The decode table is rebuilt after any config write, so the
//!   guest may move BARs and windows at any time.
//! - **Allocation**: like firmware, [`PciRootComplex::add_device`] assigns BARs from the bus's
//!   windows (non-prefetchable or 32-bit BARs from the 32-bit window, 64-bit prefetchable BARs
//!   from the 64-bit window), then sets Memory Space Enable. Bridges get bus numbers and
//!   windows carved out of their parent's, sized by [`BridgeResources`], so devices can be added
//!   below them in any order.
//! - **Several root buses** ([`PciRootComplex::add_root_bus`]): like a PCI expander bridge, a
//!   further host bridge in the same segment owns the bus numbers from its own up to the next
//!   root's and a slice of the memory windows; a bus number resolves from the root whose range
//!   holds it.
//! - **Config mechanism #1** (0xCF8/0xCFC, PCI Local Bus Spec 3.0, 3.2.2.3.2) for offsets
//!   below 256 via [`PciRootComplex::pio_read`] / [`PciRootComplex::pio_write`].
//!
//! Nothing here touches KVM: a fuzzer can drive the four access functions with arbitrary input.

use std::collections::BTreeMap;

use iommu::RequesterId;
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use super::capability::{cap_id, find_capability};
use super::config::{self as cfg, COMMAND_MEMORY, CONFIG_SPACE_SIZE, HEADER_TYPE};
use super::pcie::{self, PciePortType};
use super::{BarInfo, BarKind, PciAddress, PciDevice, PciError, config_access_ok};

/// Size of an ECAM window covering buses 0..=255.
pub const ECAM_SIZE: u64 = 256 << 20;
/// CONFIG_ADDRESS port of configuration mechanism #1.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// First CONFIG_DATA port of configuration mechanism #1.
pub const CONFIG_DATA_PORT: u16 = 0xcfc;
/// Bridge window granularity (PCI-to-PCI Bridge Spec 1.2, 3.2.5.8).
pub const BRIDGE_WINDOW_ALIGN: u64 = 1 << 20;
/// Minimum BAR allocation granule: BARs never share a 4 KiB page.
pub const BAR_MIN_ALIGN: u64 = 0x1000;

/// The host bridge's memory windows (what the VMM also reports in ACPI `_CRS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindows {
    /// Base of the window below 4 GiB (non-prefetchable and 32-bit BARs).
    pub mmio32_base: u64,
    /// Size of the 32-bit window.
    pub mmio32_size: u64,
    /// Base of the 64-bit window (64-bit prefetchable BARs).
    pub mmio64_base: u64,
    /// Size of the 64-bit window.
    pub mmio64_size: u64,
}

impl Default for PciWindows {
    /// 0xc000_0000..0xe000_0000 and 64 GiB at 0x80_0000_0000 (the VMM layout).
    fn default() -> Self {
        PciWindows {
            mmio32_base: 0xc000_0000,
            mmio32_size: 0x2000_0000,
            mmio64_base: 0x80_0000_0000,
            mmio64_size: 0x10_0000_0000,
        }
    }
}

/// What a further root bus ([`PciRootComplex::add_root_bus`]) owns: its host bridge's `_BBN` and
/// `_CRS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootBusResources {
    /// First and last bus number (inclusive).
    pub bus_start: u8,
    pub bus_end: u8,
    /// Its slice of the 32-bit and 64-bit windows.
    pub windows: PciWindows,
}

/// Resources reserved below a bridge when it is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgeResources {
    /// Bus numbers reserved, including the secondary bus (≥ 1; more for switches below).
    pub bus_count: u8,
    /// Non-prefetchable memory window size (rounded up to 1 MiB; 0 = none).
    pub mem_window: u64,
    /// 64-bit prefetchable window size (rounded up to 1 MiB; 0 = none).
    pub pref_window: u64,
}

impl Default for BridgeResources {
    /// One bus, 32 MiB non-prefetchable, 1 GiB prefetchable.
    fn default() -> Self {
        BridgeResources {
            bus_count: 1,
            mem_window: 32 << 20,
            pref_window: 1 << 30,
        }
    }
}

struct Node {
    device: Box<dyn PciDevice>,
    /// Index of the bus this function sits on.
    bus: usize,
    devfn: u8,
    /// Index of the bus behind this function, if it is a bridge.
    child_bus: Option<usize>,
    /// Last requester ID handed to the device.
    requester_id: RequesterId,
}

struct Bus {
    /// Bridge node whose secondary side this bus is; `None` for a root bus.
    bridge: Option<usize>,
    /// A root bus's number (its host bridge's `_BBN`); unused below a bridge.
    root_number: u8,
    children: BTreeMap<u8, usize>,
    /// Only device 0 is reachable (below a PCIe downstream port).
    only_device_zero: bool,
    mem: Option<AddressAllocator>,
    pref: Option<AddressAllocator>,
    /// Next bus number to hand to a bridge on this bus (256 = none left).
    next_bus: u16,
    /// Last bus number reserved below this bus.
    last_bus: u8,
}

#[derive(Clone, Copy, Debug)]
struct Decode {
    start: u64,
    /// Inclusive.
    end: u64,
    node: usize,
    bar: u8,
}

#[derive(Clone, Copy)]
enum Pool {
    Mem,
    Pref,
}

/// A PCIe root complex (one segment, buses 0..=255) with its topology.
pub struct PciRootComplex {
    nodes: Vec<Node>,
    buses: Vec<Bus>,
    windows: PciWindows,
    /// What is left of `windows` to the first root bus after [`Self::add_root_bus`] took the
    /// top of them.
    first_root_windows: PciWindows,
    /// Memory decode table; `None` when stale.
    decode: Option<Vec<Decode>>,
    /// CONFIG_ADDRESS latch of mechanism #1.
    config_address: u32,
}

impl std::fmt::Debug for PciRootComplex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRootComplex")
            .field("functions", &self.nodes.len())
            .field("buses", &self.buses.len())
            .field("windows", &self.windows)
            .finish_non_exhaustive()
    }
}

fn read_reg(dev: &mut dyn PciDevice, offset: u16, len: usize) -> u32 {
    let mut b = [0u8; 4];
    dev.config_read(offset, &mut b[..len]);
    u32::from_le_bytes(b)
}

fn write_reg(dev: &mut dyn PciDevice, offset: u16, len: usize, value: u32) {
    dev.config_write(offset, &value.to_le_bytes()[..len]);
}

/// Memory and prefetchable windows of a type 1 function, as `(base, limit)` inclusive pairs
/// (`None` when base > limit, i.e. disabled).
fn bridge_windows(dev: &mut dyn PciDevice) -> [Option<(u64, u64)>; 2] {
    let mem_base = u64::from(read_reg(dev, cfg::MEMORY_BASE, 2) & 0xfff0) << 16;
    let mem_limit = (u64::from(read_reg(dev, cfg::MEMORY_LIMIT, 2) & 0xfff0) << 16) | 0xf_ffff;
    let pb = read_reg(dev, cfg::PREF_MEMORY_BASE, 2);
    let pl = read_reg(dev, cfg::PREF_MEMORY_LIMIT, 2);
    let mut pref_base = u64::from(pb & 0xfff0) << 16;
    let mut pref_limit = (u64::from(pl & 0xfff0) << 16) | 0xf_ffff;
    if pb & 0xf == 1 {
        pref_base |= u64::from(read_reg(dev, cfg::PREF_BASE_UPPER32, 4)) << 32;
        pref_limit |= u64::from(read_reg(dev, cfg::PREF_LIMIT_UPPER32, 4)) << 32;
    }
    let win = |b: u64, l: u64| (b <= l).then_some((b, l));
    [win(mem_base, mem_limit), win(pref_base, pref_limit)]
}

impl PciRootComplex {
    /// An empty root complex (bus 0 only) allocating BARs from `windows`.
    pub fn new(windows: PciWindows) -> Result<Self, PciError> {
        let mem = AddressAllocator::new(windows.mmio32_base, windows.mmio32_size)
            .map_err(|_| PciError::InvalidWindow("32-bit window"))?;
        if windows
            .mmio32_base
            .checked_add(windows.mmio32_size)
            .is_none_or(|end| end > 1 << 32)
        {
            return Err(PciError::InvalidWindow(
                "32-bit window must end below 4 GiB",
            ));
        }
        let pref = AddressAllocator::new(windows.mmio64_base, windows.mmio64_size)
            .map_err(|_| PciError::InvalidWindow("64-bit window"))?;
        Ok(PciRootComplex {
            nodes: Vec::new(),
            buses: vec![Bus {
                bridge: None,
                root_number: 0,
                children: BTreeMap::new(),
                only_device_zero: false,
                mem: Some(mem),
                pref: Some(pref),
                next_bus: 1,
                last_bus: 255,
            }],
            windows,
            first_root_windows: windows,
            decode: None,
            config_address: 0,
        })
    }

    /// The host bridge windows this root complex allocates from.
    pub fn windows(&self) -> PciWindows {
        self.windows
    }

    /// The first root bus's windows: [`Self::windows`] less what further root buses took
    /// (its host bridge's `_CRS`).
    pub fn first_root_windows(&self) -> PciWindows {
        self.first_root_windows
    }

    /// Adds a function at `address` (bus numbers as currently programmed; bus 0 is the root
    /// bus). Its BARs are assigned from the bus's windows and Memory Space Enable is set. A
    /// type 1 function is added as a bridge with [`BridgeResources::default`].
    pub fn add_device(
        &mut self,
        address: PciAddress,
        device: Box<dyn PciDevice>,
    ) -> Result<(), PciError> {
        self.add_function(address, device, None).map(|_| ())
    }

    /// Adds a bridge (type 1 function, e.g. a [`super::RootPort`]) at `address`, reserving bus
    /// numbers and windows below it. Returns its secondary bus number.
    pub fn add_bridge(
        &mut self,
        address: PciAddress,
        bridge: Box<dyn PciDevice>,
        resources: BridgeResources,
    ) -> Result<u8, PciError> {
        let mut bridge = bridge;
        if read_reg(bridge.as_mut(), HEADER_TYPE, 1) & 0x7f != 1 {
            return Err(PciError::InvalidCapability(
                "bridge must have a type 1 header",
            ));
        }
        self.add_function(address, bridge, Some(resources))
            .map(|b| b.unwrap_or(0))
    }

    /// Adds a further root bus numbered `number`, as a second host bridge in the same segment
    /// (a PCI expander bridge, a second CXL host bridge): bus numbers from `number` to the end
    /// of the last root's range move to it, and `mem_size` / `pref_size` bytes (whole MiB) at the
    /// top of the first root bus's 32-bit and 64-bit windows become its windows. Root buses
    /// are added in increasing bus number order, before the previous root hands out bus numbers
    /// at or above `number`. Returns what it owns, for its host bridge's `_BBN` and `_CRS`
    /// (its `bus_end` holds until a further root bus is added above it, which takes the top of
    /// its bus range).
    pub fn add_root_bus(
        &mut self,
        number: u8,
        mem_size: u64,
        pref_size: u64,
    ) -> Result<RootBusResources, PciError> {
        let err = |reason| PciError::RootBus { number, reason };
        let last_root = (0..self.buses.len())
            .filter(|&b| self.buses[b].bridge.is_none())
            .max_by_key(|&b| self.buses[b].root_number)
            .unwrap_or(0);
        let previous = &self.buses[last_root];
        if number <= previous.root_number || u16::from(number) < previous.next_bus {
            return Err(err("bus numbers at or below it are taken"));
        }
        let bus_end = previous.last_bus;
        if mem_size == 0
            || pref_size == 0
            || !mem_size.is_multiple_of(BRIDGE_WINDOW_ALIGN)
            || !pref_size.is_multiple_of(BRIDGE_WINDOW_ALIGN)
        {
            return Err(err("its windows must be whole, non-zero MiB"));
        }
        let carve = |alloc: &mut Option<AddressAllocator>, base: u64, size: u64, want: u64| {
            let range = alloc
                .as_mut()?
                .allocate(want, BRIDGE_WINDOW_ALIGN, AllocPolicy::LastMatch)
                .ok()?;
            // Only the top of what the first root has left: it keeps one contiguous window.
            if range.end() == base + size - 1 {
                Some(range.start())
            } else {
                let _ = alloc.as_mut()?.free(&range);
                None
            }
        };
        let w = self.first_root_windows;
        let mem = carve(
            &mut self.buses[0].mem,
            w.mmio32_base,
            w.mmio32_size,
            mem_size,
        )
        .ok_or(err("the top of the 32-bit window is taken"))?;
        let Some(pref) = carve(
            &mut self.buses[0].pref,
            w.mmio64_base,
            w.mmio64_size,
            pref_size,
        ) else {
            if let (Some(a), Ok(range)) = (
                self.buses[0].mem.as_mut(),
                RangeInclusive::new(mem, mem + mem_size - 1),
            ) {
                let _ = a.free(&range);
            }
            return Err(err("the top of the 64-bit window is taken"));
        };
        self.first_root_windows.mmio32_size -= mem_size;
        self.first_root_windows.mmio64_size -= pref_size;
        let windows = PciWindows {
            mmio32_base: mem,
            mmio32_size: mem_size,
            mmio64_base: pref,
            mmio64_size: pref_size,
        };
        self.buses[last_root].last_bus = number - 1;
        self.buses.push(Bus {
            bridge: None,
            root_number: number,
            children: BTreeMap::new(),
            only_device_zero: false,
            mem: AddressAllocator::new(mem, mem_size).ok(),
            pref: AddressAllocator::new(pref, pref_size).ok(),
            next_bus: u16::from(number) + 1,
            last_bus: bus_end,
        });
        Ok(RootBusResources {
            bus_start: number,
            bus_end,
            windows,
        })
    }

    /// The function at `address`, if any. Invalidates the memory decode table (the caller may
    /// change BARs).
    pub fn device_mut(&mut self, address: PciAddress) -> Option<&mut (dyn PciDevice + 'static)> {
        let n = self.find_function(address.bus, address.devfn())?;
        self.decode = None;
        Some(self.nodes[n].device.as_mut())
    }

    /// Addresses of every function, as currently numbered, with their names.
    pub fn functions(&mut self) -> Vec<(PciAddress, String)> {
        let mut v: Vec<(PciAddress, String)> = (0..self.nodes.len())
            .map(|n| {
                let name = self.nodes[n].device.name().to_string();
                (self.node_address(n), name)
            })
            .collect();
        v.sort();
        v
    }

    /// Forces the memory decode table to be rebuilt on the next access.
    pub fn invalidate_decode(&mut self) {
        self.decode = None;
    }

    /// ECAM read at `offset` from the start of the window. Malformed accesses and absent
    /// functions read all-ones. An aligned 8-byte access is split into two DWORD requests.
    pub fn ecam_read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 8 && offset.is_multiple_of(8) {
            let (lo, hi) = data.split_at_mut(4);
            self.ecam_read(offset, lo);
            self.ecam_read(offset + 4, hi);
            return;
        }
        let Some((bus, devfn, reg)) = Self::ecam_decode(offset, data.len()) else {
            data.fill(0xff);
            return;
        };
        self.config_read(bus, devfn, reg, data);
    }

    /// ECAM write at `offset` from the start of the window. Malformed accesses and writes to
    /// absent functions are dropped.
    pub fn ecam_write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 8 && offset.is_multiple_of(8) {
            self.ecam_write(offset, &data[..4]);
            self.ecam_write(offset + 4, &data[4..]);
            return;
        }
        let Some((bus, devfn, reg)) = Self::ecam_decode(offset, data.len()) else {
            log::debug!(
                "dropping malformed ECAM write at {offset:#x} len {}",
                data.len()
            );
            return;
        };
        self.config_write(bus, devfn, reg, data);
    }

    /// Port I/O for configuration mechanism #1. Returns false if `port` is not ours: only DWORD
    /// accesses to 0xCF8 and 1/2/4-byte accesses within 0xCFC..=0xCFF are.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) -> bool {
        match port {
            CONFIG_ADDRESS_PORT if data.len() == 4 => {
                data.copy_from_slice(&self.config_address.to_le_bytes());
                true
            }
            CONFIG_DATA_PORT..=0xcff => {
                match self.cf8_target(port, data.len()) {
                    Some((bus, devfn, reg)) => self.config_read(bus, devfn, reg, data),
                    None => data.fill(0xff),
                }
                true
            }
            _ => false,
        }
    }

    /// Port I/O write for configuration mechanism #1 (see [`PciRootComplex::pio_read`]).
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> bool {
        match port {
            CONFIG_ADDRESS_PORT if data.len() == 4 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                // Enable bit 31, bus/device/function/register [23:2]; the rest is reserved.
                self.config_address = v & 0x80ff_fffc;
                true
            }
            CONFIG_DATA_PORT..=0xcff => {
                if let Some((bus, devfn, reg)) = self.cf8_target(port, data.len()) {
                    self.config_write(bus, devfn, reg, data);
                }
                true
            }
            _ => false,
        }
    }

    /// Memory read at guest-physical `addr`. Returns false if no BAR decodes `addr`. An access
    /// that starts inside a BAR but runs past its end reads all-ones.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        let Some((d, inside)) = self.lookup(addr, data.len()) else {
            return false;
        };
        if inside {
            self.nodes[d.node]
                .device
                .bar_read(d.bar, addr - d.start, data);
        } else {
            data.fill(0xff);
        }
        true
    }

    /// Memory write at guest-physical `addr`. Returns false if no BAR decodes `addr`. An access
    /// that starts inside a BAR but runs past its end is dropped.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool {
        let Some((d, inside)) = self.lookup(addr, data.len()) else {
            return false;
        };
        if inside {
            self.nodes[d.node]
                .device
                .bar_write(d.bar, addr - d.start, data);
        } else {
            log::debug!("dropping MMIO write straddling the end of a BAR at {addr:#x}");
        }
        true
    }

    /// Every BAR that currently decodes, with the address of its function.
    pub fn decoded_bars(&mut self) -> Vec<(PciAddress, BarInfo)> {
        self.ensure_decode();
        let table = self.decode.clone().unwrap_or_default();
        table
            .iter()
            .filter_map(|d| {
                let addr = self.node_address(d.node);
                let bar = self.nodes[d.node]
                    .device
                    .bars()
                    .into_iter()
                    .find(|b| b.index == d.bar)?;
                Some((addr, bar))
            })
            .collect()
    }

    fn ecam_decode(offset: u64, len: usize) -> Option<(u8, u8, u16)> {
        if offset >= ECAM_SIZE {
            return None;
        }
        let reg = offset & 0xfff;
        if !config_access_ok(reg, len, CONFIG_SPACE_SIZE as u64) {
            return None;
        }
        Some(((offset >> 20) as u8, (offset >> 12) as u8, reg as u16))
    }

    fn cf8_target(&self, port: u16, len: usize) -> Option<(u8, u8, u16)> {
        let a = self.config_address;
        let byte = u64::from(port - CONFIG_DATA_PORT);
        if a & 0x8000_0000 == 0 || !config_access_ok(byte, len, 4) {
            return None;
        }
        let reg = (a & 0xfc) as u16 + byte as u16;
        Some(((a >> 16) as u8, (a >> 8) as u8, reg))
    }

    fn config_read(&mut self, bus: u8, devfn: u8, reg: u16, data: &mut [u8]) {
        let Some(n) = self.find_function(bus, devfn) else {
            data.fill(0xff);
            return;
        };
        self.nodes[n].device.config_read(reg, data);
        // Multi-function bit of function 0's header type.
        let ht = usize::from(HEADER_TYPE);
        let r = usize::from(reg);
        if devfn & 7 == 0 && (r..r + data.len()).contains(&ht) {
            let b = self.nodes[n].bus;
            let others = self.buses[b]
                .children
                .range(devfn + 1..=devfn | 7)
                .next()
                .is_some();
            if others {
                data[ht - r] |= 0x80;
            }
        }
    }

    fn config_write(&mut self, bus: u8, devfn: u8, reg: u16, data: &[u8]) {
        let Some(n) = self.find_function(bus, devfn) else {
            log::debug!(
                "dropping config write to absent {}",
                PciAddress::from_devfn(bus, devfn)
            );
            return;
        };
        let node = &mut self.nodes[n];
        // A function captures its bus and device number from type 0 config writes (PCIe Base
        // Spec r6.0, 2.2.6.2).
        let rid = RequesterId::new(bus, devfn >> 3, devfn & 7);
        if node.requester_id != rid {
            node.requester_id = rid;
            node.device.set_requester_id(rid);
        }
        node.device.config_write(reg, data);
        self.decode = None;
    }

    /// The bus index that bus number `bus` routes to, following the guest-programmed bus
    /// numbers of bridges from the root bus.
    fn resolve_bus(&mut self, bus: u8) -> Option<usize> {
        let mut b = (0..self.buses.len()).find(|&b| {
            let root = &self.buses[b];
            root.bridge.is_none() && root.root_number <= bus && bus <= root.last_bus
        })?;
        let mut number = self.buses[b].root_number;
        // Each step descends one level of a finite tree, so this terminates.
        loop {
            if number == bus {
                return Some(b);
            }
            let children: Vec<usize> = self.buses[b].children.values().copied().collect();
            let mut next = None;
            for n in children {
                let Some(child) = self.nodes[n].child_bus else {
                    continue;
                };
                let dev = self.nodes[n].device.as_mut();
                let sec = read_reg(dev, cfg::SECONDARY_BUS, 1) as u8;
                let sub = read_reg(dev, cfg::SUBORDINATE_BUS, 1) as u8;
                if sec <= bus && bus <= sub {
                    next = Some((child, sec));
                    break;
                }
            }
            let (child, sec) = next?;
            b = child;
            number = sec;
        }
    }

    fn find_function(&mut self, bus: u8, devfn: u8) -> Option<usize> {
        let b = self.resolve_bus(bus)?;
        let bus = &self.buses[b];
        if bus.only_device_zero && devfn >> 3 != 0 {
            return None;
        }
        bus.children.get(&devfn).copied()
    }

    fn bus_number(&mut self, b: usize) -> u8 {
        match self.buses[b].bridge {
            None => self.buses[b].root_number,
            Some(n) => read_reg(self.nodes[n].device.as_mut(), cfg::SECONDARY_BUS, 1) as u8,
        }
    }

    fn node_address(&mut self, n: usize) -> PciAddress {
        let (bus, devfn) = (self.nodes[n].bus, self.nodes[n].devfn);
        PciAddress::from_devfn(self.bus_number(bus), devfn)
    }

    fn add_function(
        &mut self,
        address: PciAddress,
        mut device: Box<dyn PciDevice>,
        bridge: Option<BridgeResources>,
    ) -> Result<Option<u8>, PciError> {
        let address = PciAddress::new(address.bus, address.device, address.function)?;
        let b = self
            .resolve_bus(address.bus)
            .ok_or(PciError::NoSuchBus(address.bus))?;
        if self.buses[b].only_device_zero && address.device != 0 {
            return Err(PciError::NotDeviceZero(address));
        }
        if self.buses[b].children.contains_key(&address.devfn()) {
            return Err(PciError::SlotOccupied(address));
        }
        let is_bridge = read_reg(device.as_mut(), HEADER_TYPE, 1) & 0x7f == 1;
        let bridge = match (is_bridge, bridge) {
            (true, None) => Some(BridgeResources::default()),
            (_, r) => r,
        };

        let mut taken: Vec<(Pool, RangeInclusive)> = Vec::new();
        let result = self.place(b, address, device.as_mut(), bridge, &mut taken);
        let child = match result {
            Ok(child) => child,
            Err(e) => {
                for (pool, range) in taken {
                    if let Some(a) = self.pool(b, pool) {
                        let _ = a.free(&range);
                    }
                }
                return Err(e);
            }
        };

        device.set_requester_id(address.requester_id());
        let n = self.nodes.len();
        self.nodes.push(Node {
            device,
            bus: b,
            devfn: address.devfn(),
            child_bus: None,
            requester_id: address.requester_id(),
        });
        self.buses[b].children.insert(address.devfn(), n);
        let secondary = child.map(|mut bus| {
            let sec = (bus.next_bus - 1) as u8;
            bus.bridge = Some(n);
            self.buses.push(bus);
            self.nodes[n].child_bus = Some(self.buses.len() - 1);
            sec
        });
        self.decode = None;
        log::debug!("pci: added {} at {address}", self.nodes[n].device.name());
        Ok(secondary)
    }

    fn pool(&mut self, b: usize, pool: Pool) -> Option<&mut AddressAllocator> {
        match pool {
            Pool::Mem => self.buses[b].mem.as_mut(),
            Pool::Pref => self.buses[b].pref.as_mut(),
        }
    }

    fn alloc(
        &mut self,
        b: usize,
        pool: Pool,
        size: u64,
        align: u64,
        taken: &mut Vec<(Pool, RangeInclusive)>,
    ) -> Option<u64> {
        let range = self
            .pool(b, pool)?
            .allocate(size, align, AllocPolicy::FirstMatch)
            .ok()?;
        taken.push((pool, range));
        Some(range.start())
    }

    /// Assigns BARs (and, for a bridge, bus numbers and windows) on bus `b`. Returns the new
    /// secondary bus for a bridge (with `next_bus` = secondary + 1).
    fn place(
        &mut self,
        b: usize,
        address: PciAddress,
        device: &mut dyn PciDevice,
        bridge: Option<BridgeResources>,
        taken: &mut Vec<(Pool, RangeInclusive)>,
    ) -> Result<Option<Bus>, PciError> {
        let bars = device.bars();
        for bar in &bars {
            let pool = if bar.kind == BarKind::Memory64
                && bar.prefetchable
                && self.buses[b].pref.is_some()
            {
                Pool::Pref
            } else {
                Pool::Mem
            };
            let size = bar.size.max(BAR_MIN_ALIGN);
            let base = self
                .alloc(b, pool, size, size, taken)
                .ok_or(PciError::OutOfSpace {
                    address,
                    what: "BAR space",
                    size,
                })?;
            let off = cfg::BAR0 + 4 * u16::from(bar.index);
            write_reg(device, off, 4, base as u32);
            if bar.kind == BarKind::Memory64 {
                write_reg(device, off + 4, 4, (base >> 32) as u32);
            }
        }

        let mut child = None;
        if let Some(res) = bridge {
            let parent = &self.buses[b];
            let sec = parent.next_bus;
            let sub = sec + u16::from(res.bus_count.max(1)) - 1;
            if sec > 255 || sub > u16::from(parent.last_bus) {
                return Err(PciError::BusNumbersExhausted(address));
            }
            let mut window = |pool: Pool, size: u64, what| -> Result<Option<(u64, u64)>, _> {
                if size == 0 {
                    return Ok(None);
                }
                let size = size.next_multiple_of(BRIDGE_WINDOW_ALIGN);
                // Align to the largest power of two ≤ size, so a BAR as big as the window fits.
                let align = 1u64 << (63 - size.leading_zeros());
                self.alloc(b, pool, size, align, taken)
                    .map(|base| Some((base, size)))
                    .ok_or(PciError::OutOfSpace {
                        address,
                        what,
                        size,
                    })
            };
            let mem = window(Pool::Mem, res.mem_window, "bridge memory window")?;
            let pref = window(Pool::Pref, res.pref_window, "bridge prefetchable window")?;

            write_reg(device, cfg::PRIMARY_BUS, 1, u32::from(address.bus));
            write_reg(device, cfg::SECONDARY_BUS, 1, u32::from(sec));
            write_reg(device, cfg::SUBORDINATE_BUS, 1, u32::from(sub));
            let (mb, ml) = mem.map_or((0xfff0, 0), |(base, size)| {
                (base >> 16, (base + size - 1) >> 16)
            });
            write_reg(device, cfg::MEMORY_BASE, 2, mb as u32);
            write_reg(device, cfg::MEMORY_LIMIT, 2, ml as u32);
            let (pb, pl) = pref.map_or((u64::MAX, 0), |(base, size)| (base, base + size - 1));
            write_reg(device, cfg::PREF_MEMORY_BASE, 2, (pb >> 16) as u32);
            write_reg(device, cfg::PREF_MEMORY_LIMIT, 2, (pl >> 16) as u32);
            write_reg(device, cfg::PREF_BASE_UPPER32, 4, (pb >> 32) as u32);
            write_reg(device, cfg::PREF_LIMIT_UPPER32, 4, (pl >> 32) as u32);

            let only_device_zero = find_capability(
                &mut |o, d: &mut [u8]| device.config_read(o, d),
                cap_id::PCI_EXPRESS,
            )
            .and_then(|pos| {
                let flags = read_reg(device, u16::from(pos) + pcie::FLAGS as u16, 2);
                PciePortType::from_bits(((flags >> 4) & 0xf) as u8)
            })
            .is_some_and(PciePortType::is_downstream_port);

            let new_alloc = |w: Option<(u64, u64)>| {
                w.and_then(|(base, size)| AddressAllocator::new(base, size).ok())
            };
            child = Some(Bus {
                bridge: None,
                root_number: 0,
                children: BTreeMap::new(),
                only_device_zero,
                mem: new_alloc(mem),
                pref: new_alloc(pref),
                next_bus: sec + 1,
                last_bus: sub as u8,
            });
            self.buses[b].next_bus = sub + 1;
        }

        if !bars.is_empty() || bridge.is_some() {
            let cmd = read_reg(device, cfg::COMMAND, 2) | u32::from(COMMAND_MEMORY);
            write_reg(device, cfg::COMMAND, 2, cmd);
        }
        Ok(child)
    }

    fn ensure_decode(&mut self) {
        if self.decode.is_some() {
            return;
        }
        let mut table = Vec::new();
        for n in 0..self.nodes.len() {
            let dev = self.nodes[n].device.as_mut();
            if read_reg(dev, cfg::COMMAND, 2) as u16 & COMMAND_MEMORY == 0 {
                continue;
            }
            for bar in dev.bars() {
                let Some(end) = bar
                    .size
                    .checked_sub(1)
                    .and_then(|s| bar.address.checked_add(s))
                else {
                    continue;
                };
                if self.reachable(self.nodes[n].bus, bar.address, end) {
                    table.push(Decode {
                        start: bar.address,
                        end,
                        node: n,
                        bar: bar.index,
                    });
                }
            }
        }
        table.sort_by_key(|d| (d.start, d.node, d.bar));
        self.decode = Some(table);
    }

    /// True if `[start, end]` on bus `b` is forwarded by every bridge between it and the root.
    fn reachable(&mut self, mut b: usize, start: u64, end: u64) -> bool {
        while let Some(br) = self.buses[b].bridge {
            let dev = self.nodes[br].device.as_mut();
            if read_reg(dev, cfg::COMMAND, 2) as u16 & COMMAND_MEMORY == 0 {
                return false;
            }
            let covered = bridge_windows(dev)
                .iter()
                .flatten()
                .any(|&(base, limit)| base <= start && end <= limit);
            if !covered {
                return false;
            }
            b = self.nodes[br].bus;
        }
        true
    }

    /// The decode entry for `addr`, and whether `len` bytes from `addr` stay inside it.
    fn lookup(&mut self, addr: u64, len: usize) -> Option<(Decode, bool)> {
        if len == 0 {
            return None;
        }
        self.ensure_decode();
        let table = self.decode.as_ref()?;
        let d = *table.iter().find(|d| d.start <= addr && addr <= d.end)?;
        let inside = addr
            .checked_add(len as u64 - 1)
            .is_some_and(|last| last <= d.end);
        Some((d, inside))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use iommu::NullMsiSink;

    use super::super::capability::{ext_cap_id, find_ext_capability};
    use super::super::config::{ConfigSpace, HeaderType, PciIds};
    use super::super::{HostBridge, RootPort, RootPortConfig};
    use super::*;

    type BarLog = Arc<Mutex<Vec<(u8, u64, Vec<u8>)>>>;

    /// A test endpoint: BAR0 32-bit 4 KiB, BAR2 64-bit prefetchable 1 MiB; BAR reads return
    /// the offset, writes are logged.
    struct TestDev {
        config: ConfigSpace,
        log: BarLog,
        rid: Arc<Mutex<RequesterId>>,
    }

    impl TestDev {
        fn new(device_id: u16) -> (Self, BarLog) {
            let mut config = ConfigSpace::new(
                HeaderType::Type0,
                PciIds {
                    vendor_id: 0x1b36,
                    device_id,
                    revision_id: 0,
                    class_code: 0xff_00_00,
                    subsystem_vendor_id: 0,
                    subsystem_id: 0,
                },
            );
            config.add_bar(0, 0x1000, BarKind::Memory32, false).unwrap();
            config
                .add_bar(2, 0x10_0000, BarKind::Memory64, true)
                .unwrap();
            let log = Arc::new(Mutex::new(Vec::new()));
            (
                TestDev {
                    config,
                    log: log.clone(),
                    rid: Arc::new(Mutex::new(RequesterId(0xffff))),
                },
                log,
            )
        }
    }

    impl PciDevice for TestDev {
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn config_write(&mut self, offset: u16, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            super::super::le_store(offset | (u64::from(bar) << 56), data);
        }
        fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
            self.log.lock().unwrap().push((bar, offset, data.to_vec()));
        }
        fn bars(&self) -> Vec<BarInfo> {
            self.config.bars()
        }
        fn set_requester_id(&mut self, rid: RequesterId) {
            *self.rid.lock().unwrap() = rid;
        }
    }

    fn ecam(bus: u8, dev: u8, func: u8, reg: u16) -> u64 {
        (u64::from(bus) << 20) | (u64::from(dev) << 15) | (u64::from(func) << 12) | u64::from(reg)
    }

    fn rd(rc: &mut PciRootComplex, off: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        rc.ecam_read(off, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn wr(rc: &mut PciRootComplex, off: u64, len: usize, v: u32) {
        rc.ecam_write(off, &v.to_le_bytes()[..len]);
    }

    fn addr(bus: u8, dev: u8, func: u8) -> PciAddress {
        PciAddress::new(bus, dev, func).unwrap()
    }

    /// Host bridge at 00:00.0, root port at 00:01.0 (secondary bus 1), test device at 01:00.0.
    fn platform() -> (PciRootComplex, BarLog) {
        let mut rc = PciRootComplex::new(PciWindows::default()).unwrap();
        rc.add_device(addr(0, 0, 0), Box::new(HostBridge::new()))
            .unwrap();
        let rp = RootPort::new(RootPortConfig::new(1), Arc::new(NullMsiSink)).unwrap();
        let sec = rc
            .add_bridge(addr(0, 1, 0), Box::new(rp), BridgeResources::default())
            .unwrap();
        assert_eq!(sec, 1);
        let (dev, log) = TestDev::new(0x1234);
        rc.add_device(addr(1, 0, 0), Box::new(dev)).unwrap();
        (rc, log)
    }

    #[test]
    fn ecam_decoding_and_absent_functions() {
        let (mut rc, _) = platform();
        let names: Vec<(PciAddress, String)> = rc.functions();
        assert_eq!(
            names,
            vec![
                (addr(0, 0, 0), "host-bridge".to_string()),
                (addr(0, 1, 0), "root-port".to_string()),
                (addr(1, 0, 0), "pci-function".to_string()),
            ]
        );
        assert_eq!(rd(&mut rc, ecam(0, 0, 0, 0), 4), 0x0008_1b36);
        assert_eq!(rd(&mut rc, ecam(0, 1, 0, 0), 4), 0x000c_1b36);
        assert_eq!(rd(&mut rc, ecam(1, 0, 0, 0), 4), 0x1234_1b36);
        // Byte and word reads at non-zero register offsets.
        assert_eq!(rd(&mut rc, ecam(0, 1, 0, 0x0b), 1), 0x06);
        assert_eq!(rd(&mut rc, ecam(0, 1, 0, 0x0a), 2), 0x0604);
        assert_eq!(rd(&mut rc, ecam(1, 0, 0, 2), 2), 0x1234);
        // Absent device, function, bus: all-ones.
        assert_eq!(rd(&mut rc, ecam(0, 2, 0, 0), 4), 0xffff_ffff);
        assert_eq!(rd(&mut rc, ecam(0, 0, 1, 0), 4), 0xffff_ffff);
        assert_eq!(rd(&mut rc, ecam(2, 0, 0, 0), 4), 0xffff_ffff);
        assert_eq!(rd(&mut rc, ecam(255, 31, 7, 0xffc), 4), 0xffff_ffff);
        // Below a root port only device 0 answers.
        assert_eq!(rd(&mut rc, ecam(1, 1, 0, 0), 4), 0xffff_ffff);
        // Extended config space through ECAM: AER at 0x100 of the root port.
        let mut r = |o: u16, d: &mut [u8]| rc.ecam_read(ecam(0, 1, 0, 0) + u64::from(o), d);
        assert_eq!(find_ext_capability(&mut r, ext_cap_id::AER), Some(0x100));
        // Out of window, malformed.
        assert_eq!(rd(&mut rc, ECAM_SIZE, 4), 0xffff_ffff);
        assert_eq!(rd(&mut rc, u64::MAX, 1), 0xff);
        assert_eq!(rd(&mut rc, ecam(0, 0, 0, 3), 2), 0xffff);
        let mut big = [0u8; 16];
        rc.ecam_read(0, &mut big);
        assert_eq!(big, [0xff; 16]);
        let mut q = [0u8; 8];
        rc.ecam_read(ecam(0, 0, 0, 0), &mut q);
        assert_eq!(u64::from_le_bytes(q) & 0xffff_ffff, 0x0008_1b36);
        // Writes to absent functions or malformed are harmless.
        wr(&mut rc, ecam(3, 0, 0, 4), 2, 0xffff);
        wr(&mut rc, ecam(0, 0, 0, 0xffe), 4, 0xffff_ffff);
        rc.ecam_write(u64::MAX, &[0]);
        rc.ecam_write(0, &[]);
    }

    #[test]
    fn type1_forwarding_follows_guest_bus_numbers() {
        let (mut rc, _) = platform();
        let rp = ecam(0, 1, 0, 0);
        assert_eq!(rd(&mut rc, rp + 0x18, 4), 0x0001_0100);
        // Guest renumbers the root port's secondary side to bus 5..=7.
        wr(&mut rc, rp + 0x18, 4, 0x0007_0500);
        assert_eq!(rd(&mut rc, ecam(1, 0, 0, 0), 4), 0xffff_ffff);
        assert_eq!(rd(&mut rc, ecam(5, 0, 0, 0), 4), 0x1234_1b36);
        // Bus 6 is in range but nothing is behind it (no bridge on bus 5).
        assert_eq!(rd(&mut rc, ecam(6, 0, 0, 0), 4), 0xffff_ffff);
        // The device captures its new requester ID on its next config write.
        wr(&mut rc, ecam(5, 0, 0, 4), 2, 0x0006);
        let dev = rc.device_mut(addr(5, 0, 0)).unwrap();
        let mut cmd = [0u8; 2];
        dev.config_read(4, &mut cmd);
        assert_eq!(u16::from_le_bytes(cmd), 0x0006);
        // Disabling forwarding: secondary > subordinate or a bus number of 0 routes nowhere.
        wr(&mut rc, rp + 0x18, 4, 0x0000_0000);
        assert_eq!(rd(&mut rc, ecam(5, 0, 0, 0), 4), 0xffff_ffff);
        assert_eq!(rd(&mut rc, ecam(0, 0, 0, 0), 4), 0x0008_1b36);
    }

    #[test]
    fn a_second_root_bus_owns_its_bus_numbers_and_the_top_of_the_windows() {
        let (mut rc, _) = platform();
        let w = PciWindows::default();
        let root = rc.add_root_bus(0x80, 128 << 20, 16 << 30).unwrap();
        assert_eq!((root.bus_start, root.bus_end), (0x80, 0xff));
        assert_eq!(
            root.windows,
            PciWindows {
                mmio32_base: w.mmio32_base + w.mmio32_size - (128 << 20),
                mmio32_size: 128 << 20,
                mmio64_base: w.mmio64_base + w.mmio64_size - (16 << 30),
                mmio64_size: 16 << 30,
            }
        );
        // A root port on bus 0x80 gets bus 0x81 and windows inside the new root's.
        let rp = RootPort::new(RootPortConfig::new(2), Arc::new(NullMsiSink)).unwrap();
        let sec = rc
            .add_bridge(addr(0x80, 0, 0), Box::new(rp), BridgeResources::default())
            .unwrap();
        assert_eq!(sec, 0x81);
        let (dev, _) = TestDev::new(0x5678);
        rc.add_device(addr(0x81, 0, 0), Box::new(dev)).unwrap();
        assert_eq!(rd(&mut rc, ecam(0x81, 0, 0, 0), 4), 0x5678_1b36);
        assert_eq!(rd(&mut rc, ecam(0x80, 0, 0, 0x18), 4), 0x0081_8180);
        for (address, bar) in rc.decoded_bars() {
            let inside = |base: u64, size: u64| bar.address >= base && bar.address < base + size;
            let second = inside(root.windows.mmio32_base, root.windows.mmio32_size)
                || inside(root.windows.mmio64_base, root.windows.mmio64_size);
            assert_eq!(second, address.bus >= 0x80, "{address}: {bar:?}");
        }
        // The first root keeps its devices and ends below 0x80: a bridge there can no longer
        // take bus numbers from the second root.
        assert_eq!(rd(&mut rc, ecam(1, 0, 0, 0), 4), 0x1234_1b36);
        assert_eq!(rd(&mut rc, ecam(0x7f, 0, 0, 0), 4), 0xffff_ffff);
        assert_eq!(rd(&mut rc, ecam(0x82, 0, 0, 0), 4), 0xffff_ffff);
        let functions = rc.functions();
        assert!(
            functions.iter().any(|(a, _)| *a == addr(0x80, 0, 0)),
            "{functions:?}"
        );
        // Roots come in increasing order, with whole-MiB windows.
        assert!(rc.add_root_bus(0x40, 1 << 20, 1 << 20).is_err());
        assert!(rc.add_root_bus(0x90, 0, 1 << 20).is_err());
        let third = rc.add_root_bus(0x90, 1 << 20, 1 << 20).unwrap();
        assert_eq!(
            third.windows.mmio32_base,
            root.windows.mmio32_base - (1 << 20)
        );
        assert_eq!((third.bus_start, third.bus_end), (0x90, 0xff));
        assert_eq!(
            rc.first_root_windows().mmio32_size,
            w.mmio32_size - (129 << 20)
        );
        // The second root now ends below the third.
        assert_eq!(rd(&mut rc, ecam(0x81, 0, 0, 0), 4), 0x5678_1b36);
    }

    #[test]
    fn requester_id_capture() {
        let mut rc = PciRootComplex::new(PciWindows::default()).unwrap();
        let rp = RootPort::new(RootPortConfig::new(1), Arc::new(NullMsiSink)).unwrap();
        rc.add_bridge(addr(0, 1, 0), Box::new(rp), BridgeResources::default())
            .unwrap();
        let (dev, _) = TestDev::new(1);
        let rid = dev.rid.clone();
        rc.add_device(addr(1, 0, 0), Box::new(dev)).unwrap();
        assert_eq!(*rid.lock().unwrap(), RequesterId::new(1, 0, 0));
        wr(&mut rc, ecam(0, 1, 0, 0x18), 4, 0x0009_0900);
        wr(&mut rc, ecam(9, 0, 0, 0x3c), 1, 0x0b);
        assert_eq!(*rid.lock().unwrap(), RequesterId::new(9, 0, 0));
    }

    #[test]
    fn multi_function_bit() {
        let mut rc = PciRootComplex::new(PciWindows::default()).unwrap();
        rc.add_device(addr(0, 3, 0), Box::new(TestDev::new(1).0))
            .unwrap();
        assert_eq!(rd(&mut rc, ecam(0, 3, 0, 0x0e), 1), 0x00);
        rc.add_device(addr(0, 3, 5), Box::new(TestDev::new(2).0))
            .unwrap();
        assert_eq!(rd(&mut rc, ecam(0, 3, 0, 0x0e), 1), 0x80);
        assert_eq!(rd(&mut rc, ecam(0, 3, 0, 0x0c), 4) >> 16, 0x0080);
        assert_eq!(rd(&mut rc, ecam(0, 3, 0, 0x0e), 2), 0x0080);
        // Only on function 0, and other bytes are untouched.
        assert_eq!(rd(&mut rc, ecam(0, 3, 5, 0x0e), 1), 0x00);
        assert_eq!(rd(&mut rc, ecam(0, 3, 0, 0x0f), 1), 0x00);
        assert_eq!(rd(&mut rc, ecam(0, 3, 5, 0), 4), 0x0002_1b36);
        assert_eq!(
            rc.add_device(addr(0, 3, 5), Box::new(TestDev::new(3).0)),
            Err(PciError::SlotOccupied(addr(0, 3, 5)))
        );
    }

    #[test]
    fn add_errors() {
        let (mut rc, _) = platform();
        assert_eq!(
            rc.add_device(addr(1, 1, 0), Box::new(TestDev::new(1).0)),
            Err(PciError::NotDeviceZero(addr(1, 1, 0)))
        );
        assert_eq!(
            rc.add_device(addr(7, 0, 0), Box::new(TestDev::new(1).0)),
            Err(PciError::NoSuchBus(7))
        );
        // Bus 1 has no bus numbers below it.
        let rp = RootPort::new(RootPortConfig::new(2), Arc::new(NullMsiSink)).unwrap();
        assert_eq!(
            rc.add_bridge(addr(1, 0, 1), Box::new(rp), BridgeResources::default()),
            Err(PciError::BusNumbersExhausted(addr(1, 0, 1)))
        );
        assert!(
            rc.add_bridge(
                addr(0, 9, 0),
                Box::new(TestDev::new(1).0),
                BridgeResources::default()
            )
            .is_err()
        );
        // Window exhaustion rolls back: a huge bridge window fails, a normal one still fits.
        let rp = RootPort::new(RootPortConfig::new(3), Arc::new(NullMsiSink)).unwrap();
        let huge = BridgeResources {
            mem_window: 1 << 30,
            ..BridgeResources::default()
        };
        assert!(matches!(
            rc.add_bridge(addr(0, 2, 0), Box::new(rp), huge),
            Err(PciError::OutOfSpace { .. })
        ));
        let rp = RootPort::new(RootPortConfig::new(3), Arc::new(NullMsiSink)).unwrap();
        assert_eq!(
            rc.add_bridge(addr(0, 2, 0), Box::new(rp), BridgeResources::default()),
            Ok(2)
        );
    }

    #[test]
    fn bars_assigned_inside_bridge_windows() {
        let (mut rc, _) = platform();
        let bars = rc.decoded_bars();
        let rp_bar = bars.iter().find(|(a, _)| *a == addr(0, 1, 0)).unwrap().1;
        assert_eq!(rp_bar.address, 0xc000_0000);
        let dev_bars: Vec<BarInfo> = bars
            .iter()
            .filter(|(a, _)| *a == addr(1, 0, 0))
            .map(|(_, b)| *b)
            .collect();
        assert_eq!(dev_bars.len(), 2);
        // Bridge windows as programmed.
        let rp = ecam(0, 1, 0, 0);
        let mem_base = u64::from(rd(&mut rc, rp + 0x20, 2) & 0xfff0) << 16;
        let mem_limit = (u64::from(rd(&mut rc, rp + 0x22, 2) & 0xfff0) << 16) | 0xfffff;
        assert_eq!(mem_limit - mem_base + 1, 32 << 20);
        assert!(mem_base >= 0xc000_0000 && mem_limit < 0xe000_0000);
        let pref_base = (u64::from(rd(&mut rc, rp + 0x28, 4)) << 32)
            | (u64::from(rd(&mut rc, rp + 0x24, 2) & 0xfff0) << 16);
        let pref_limit = (u64::from(rd(&mut rc, rp + 0x2c, 4)) << 32)
            | (u64::from(rd(&mut rc, rp + 0x26, 2) & 0xfff0) << 16)
            | 0xfffff;
        assert_eq!(pref_base, 0x80_0000_0000);
        assert_eq!(pref_limit - pref_base + 1, 1 << 30);
        let b0 = dev_bars.iter().find(|b| b.index == 0).unwrap();
        let b2 = dev_bars.iter().find(|b| b.index == 2).unwrap();
        assert!(b0.address >= mem_base && b0.address + b0.size - 1 <= mem_limit);
        assert!(b2.address >= pref_base && b2.address + b2.size - 1 <= pref_limit);
        assert_eq!(b2.address % b2.size, 0);
        // Memory decode enabled by "firmware".
        assert_eq!(rd(&mut rc, ecam(1, 0, 0, 4), 2) & 2, 2);
        assert_eq!(rd(&mut rc, rp + 4, 2) & 2, 2);
        // A second root port gets disjoint windows and bus 2.
        let rp2 = RootPort::new(RootPortConfig::new(2), Arc::new(NullMsiSink)).unwrap();
        assert_eq!(
            rc.add_bridge(addr(0, 2, 0), Box::new(rp2), BridgeResources::default()),
            Ok(2)
        );
        let mem2 = u64::from(rd(&mut rc, ecam(0, 2, 0, 0x20), 2) & 0xfff0) << 16;
        assert!(mem2 > mem_limit || mem2 + (32 << 20) <= mem_base);
    }

    #[test]
    fn mmio_dispatch_follows_bars_and_enables() {
        let (mut rc, log) = platform();
        let bars = rc.decoded_bars();
        let b0 = bars
            .iter()
            .find(|(a, b)| *a == addr(1, 0, 0) && b.index == 0)
            .unwrap()
            .1
            .address;
        let mut d = [0u8; 4];
        assert!(rc.mmio_read(b0 + 0x10, &mut d));
        assert_eq!(u32::from_le_bytes(d), 0x10);
        assert!(rc.mmio_write(b0 + 0x20, &[1, 2]));
        assert_eq!(log.lock().unwrap().pop(), Some((0, 0x20, vec![1, 2])));
        // Straddling the BAR end: claimed, all-ones, write dropped.
        assert!(rc.mmio_read(b0 + 0xffe, &mut d));
        assert_eq!(d, [0xff; 4]);
        assert!(rc.mmio_write(b0 + 0xffe, &[0; 4]));
        assert!(log.lock().unwrap().is_empty());
        // Nothing there.
        assert!(!rc.mmio_read(0xdfff_0000, &mut d));
        assert!(!rc.mmio_write(0x1000, &d));
        assert!(!rc.mmio_read(b0, &mut []));

        // Device memory decode off → not decoded.
        let cmd = ecam(1, 0, 0, 4);
        wr(&mut rc, cmd, 2, 0);
        assert!(!rc.mmio_read(b0, &mut d));
        wr(&mut rc, cmd, 2, 2);
        assert!(rc.mmio_read(b0, &mut d));
        // Bridge memory decode off → nothing below decodes.
        let rp_cmd = ecam(0, 1, 0, 4);
        wr(&mut rc, rp_cmd, 2, 0);
        assert!(!rc.mmio_read(b0, &mut d));
        wr(&mut rc, rp_cmd, 2, 2);
        assert!(rc.mmio_read(b0, &mut d));

        // Guest moves the BAR outside the bridge window: no longer decoded.
        wr(&mut rc, ecam(1, 0, 0, 0x10), 4, 0xd800_0000);
        assert!(!rc.mmio_read(0xd800_0000, &mut d));
        assert!(!rc.mmio_read(b0, &mut d));
        // Guest widens the bridge window to cover it: decoded again.
        wr(&mut rc, ecam(0, 1, 0, 0x22), 2, 0xd800);
        assert!(rc.mmio_read(0xd800_0004, &mut d));
        assert_eq!(u32::from_le_bytes(d), 4);

        // 64-bit BAR moved by the guest (low then high dword) within the prefetchable window.
        wr(&mut rc, ecam(1, 0, 0, 0x18), 4, 0x2000_000c);
        wr(&mut rc, ecam(1, 0, 0, 0x1c), 4, 0x80);
        let mut q = [0u8; 8];
        assert!(rc.mmio_read(0x80_2000_0008, &mut q));
        assert_eq!(u64::from_le_bytes(q), (2u64 << 56) | 8);
        // Past the 1 GiB prefetchable window: not forwarded by the root port.
        wr(&mut rc, ecam(1, 0, 0, 0x18), 4, 0x4000_000c);
        assert!(!rc.mmio_read(0x80_4000_0008, &mut q));
    }

    #[test]
    fn bar_sizing_through_ecam() {
        let (mut rc, _) = platform();
        let bar0 = ecam(1, 0, 0, 0x10);
        wr(&mut rc, ecam(1, 0, 0, 4), 2, 0);
        let orig = rd(&mut rc, bar0, 4);
        wr(&mut rc, bar0, 4, 0xffff_ffff);
        assert_eq!(rd(&mut rc, bar0, 4), 0xffff_f000);
        wr(&mut rc, bar0, 4, orig);
        assert_eq!(rd(&mut rc, bar0, 4), orig);
        wr(&mut rc, ecam(1, 0, 0, 0x18), 4, 0xffff_ffff);
        wr(&mut rc, ecam(1, 0, 0, 0x1c), 4, 0xffff_ffff);
        assert_eq!(rd(&mut rc, ecam(1, 0, 0, 0x18), 4), 0xfff0_000c);
        assert_eq!(rd(&mut rc, ecam(1, 0, 0, 0x1c), 4), 0xffff_ffff);
    }

    #[test]
    fn cf8_cfc_mechanism() {
        let (mut rc, _) = platform();
        let sel = |bus: u32, dev: u32, func: u32, reg: u32| {
            (0x8000_0000 | (bus << 16) | (dev << 11) | (func << 8) | reg).to_le_bytes()
        };
        assert!(rc.pio_write(0xcf8, &sel(0, 1, 0, 0)));
        let mut d = [0u8; 4];
        assert!(rc.pio_read(0xcf8, &mut d));
        assert_eq!(d, sel(0, 1, 0, 0));
        assert!(rc.pio_read(0xcfc, &mut d));
        assert_eq!(u32::from_le_bytes(d), 0x000c_1b36);
        let mut w = [0u8; 2];
        assert!(rc.pio_read(0xcfe, &mut w));
        assert_eq!(u16::from_le_bytes(w), 0x000c);
        // Crossing the data dword: all-ones.
        assert!(rc.pio_read(0xcfe, &mut d));
        assert_eq!(d, [0xff; 4]);
        // Behind the root port.
        rc.pio_write(0xcf8, &sel(1, 0, 0, 0));
        rc.pio_read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1234_1b36);
        // Writes through CFC land (cache line size).
        rc.pio_write(0xcf8, &sel(1, 0, 0, 0x0c));
        assert!(rc.pio_write(0xcfc, &[0x10]));
        assert_eq!(rd(&mut rc, ecam(1, 0, 0, 0x0c), 1), 0x10);
        // Disabled: all-ones, writes ignored.
        rc.pio_write(0xcf8, &0u32.to_le_bytes());
        rc.pio_read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Reserved address bits read back as 0.
        rc.pio_write(0xcf8, &0xffff_ffffu32.to_le_bytes());
        rc.pio_read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x80ff_fffc);
        // Not ours: byte access to 0xcf8..0xcfb (Linux's type 1 probe pokes 0xcfb), other ports.
        assert!(!rc.pio_write(0xcfb, &[1]));
        assert!(!rc.pio_read(0xcf8, &mut w));
        assert!(!rc.pio_read(0x3f8, &mut d));
    }

    #[test]
    fn nested_bridges() {
        let mut rc = PciRootComplex::new(PciWindows::default()).unwrap();
        let rp = RootPort::new(RootPortConfig::new(1), Arc::new(NullMsiSink)).unwrap();
        let res = BridgeResources {
            bus_count: 4,
            mem_window: 64 << 20,
            pref_window: 4 << 30,
        };
        assert_eq!(rc.add_bridge(addr(0, 1, 0), Box::new(rp), res), Ok(1));
        // A second-level bridge (we reuse a root port model as "a type 1 function").
        let sw = RootPort::new(RootPortConfig::new(2), Arc::new(NullMsiSink)).unwrap();
        let inner = BridgeResources {
            bus_count: 1,
            mem_window: 8 << 20,
            pref_window: 1 << 30,
        };
        assert_eq!(rc.add_bridge(addr(1, 0, 0), Box::new(sw), inner), Ok(2));
        rc.add_device(addr(2, 0, 0), Box::new(TestDev::new(7).0))
            .unwrap();
        assert_eq!(rd(&mut rc, ecam(0, 1, 0, 0x18), 4), 0x0004_0100);
        assert_eq!(rd(&mut rc, ecam(1, 0, 0, 0x18), 4), 0x0002_0201);
        assert_eq!(rd(&mut rc, ecam(2, 0, 0, 0), 4), 0x0007_1b36);
        assert_eq!(rd(&mut rc, ecam(3, 0, 0, 0), 4), 0xffff_ffff);
        let bars = rc.decoded_bars();
        assert_eq!(bars.iter().filter(|(a, _)| *a == addr(2, 0, 0)).count(), 2);
        // Another bridge on bus 1 gets bus 3; then bus numbers below bus 1 are exhausted.
        let sw2 = RootPort::new(RootPortConfig::new(3), Arc::new(NullMsiSink)).unwrap();
        let small = BridgeResources {
            bus_count: 1,
            mem_window: 1 << 20,
            pref_window: 0,
        };
        assert_eq!(rc.add_bridge(addr(1, 0, 1), Box::new(sw2), small), Ok(3));
        // Its prefetchable window is disabled (base > limit).
        let pb = rd(&mut rc, ecam(1, 0, 1, 0x24), 4);
        assert!((pb & 0xfff0) > ((pb >> 16) & 0xfff0));
        let sw3 = RootPort::new(RootPortConfig::new(4), Arc::new(NullMsiSink)).unwrap();
        assert!(matches!(
            rc.add_bridge(addr(1, 0, 2), Box::new(sw3), small),
            Ok(4)
        ));
        let sw4 = RootPort::new(RootPortConfig::new(5), Arc::new(NullMsiSink)).unwrap();
        assert!(matches!(
            rc.add_bridge(addr(1, 0, 3), Box::new(sw4), small),
            Err(PciError::BusNumbersExhausted(_))
        ));
    }

    #[test]
    fn last_bus_number() {
        let mut rc = PciRootComplex::new(PciWindows::default()).unwrap();
        let small = BridgeResources {
            bus_count: 254,
            mem_window: 1 << 20,
            pref_window: 0,
        };
        let rp = RootPort::new(RootPortConfig::new(1), Arc::new(NullMsiSink)).unwrap();
        assert_eq!(rc.add_bridge(addr(0, 1, 0), Box::new(rp), small), Ok(1));
        // No prefetchable window: the 64-bit prefetchable BAR falls back to the memory window.
        let one = BridgeResources {
            bus_count: 1,
            mem_window: 4 << 20,
            pref_window: 0,
        };
        let rp = RootPort::new(RootPortConfig::new(2), Arc::new(NullMsiSink)).unwrap();
        assert_eq!(rc.add_bridge(addr(0, 2, 0), Box::new(rp), one), Ok(255));
        let rp = RootPort::new(RootPortConfig::new(3), Arc::new(NullMsiSink)).unwrap();
        assert!(matches!(
            rc.add_bridge(addr(0, 3, 0), Box::new(rp), one),
            Err(PciError::BusNumbersExhausted(_))
        ));
        rc.add_device(addr(255, 0, 0), Box::new(TestDev::new(9).0))
            .unwrap();
        assert_eq!(rd(&mut rc, ecam(255, 0, 0, 0), 4), 0x0009_1b36);
        assert_eq!(rd(&mut rc, ecam(0, 2, 0, 0x18), 4), 0x00ff_ff00);
    }

    #[test]
    fn invalid_windows() {
        let w = PciWindows::default();
        assert!(
            PciRootComplex::new(PciWindows {
                mmio32_size: 0,
                ..w
            })
            .is_err()
        );
        assert!(
            PciRootComplex::new(PciWindows {
                mmio32_base: 0xf000_0000,
                mmio32_size: 0x2000_0000,
                ..w
            })
            .is_err()
        );
    }

    /// Deterministic pseudo-random accesses must never panic (a smoke test of what the fuzz
    /// target will do).
    #[test]
    fn random_accesses_never_panic() {
        let (mut rc, _) = platform();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let r = next();
            let len = [0usize, 1, 2, 3, 4, 8, 16][(r % 7) as usize];
            let mut buf = vec![0u8; len];
            let v = next();
            let off = match r >> 60 {
                0..=5 => v % ECAM_SIZE,
                6..=9 => ecam(0, 1, 0, (v % 0x1000) as u16),
                10..=11 => ecam(1, 0, 0, (v % 0x1000) as u16),
                12..=13 => 0xc000_0000 + v % 0x2000_0000,
                _ => v,
            };
            match (r >> 56) & 7 {
                0 => rc.ecam_read(off, &mut buf),
                1 => {
                    buf.fill(v as u8);
                    rc.ecam_write(off, &buf)
                }
                2 => {
                    rc.mmio_read(off, &mut buf);
                }
                3 => {
                    buf.fill((v >> 8) as u8);
                    rc.mmio_write(off, &buf);
                }
                4 => {
                    rc.pio_write(0xcf8 + (v % 8) as u16, &buf);
                }
                5 => {
                    rc.pio_read(0xcf8 + (v % 8) as u16, &mut buf);
                }
                _ => {
                    rc.decoded_bars();
                }
            }
        }
    }
}
