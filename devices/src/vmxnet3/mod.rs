//! An emulated VMware vmxnet3 Ethernet function (PCI 15AD:07B0, revision 1, UPT 1), the
//! netdev Linux's `vmxnet3` driver binds and the function 0 the PVRDMA device pairs with.
//!
//! - [`registers`]: BAR 0 (interrupt masks, producer doorbells) and BAR 1 (version, command,
//!   MAC, event registers);
//! - [`layout`]: the driver-shared area, queue descriptors and ring descriptors in guest memory;
//! - [`offload`]: checksum insertion, TSO and VLAN insertion on transmit.
//!
//! The driver hands the device one `Vmxnet3_DriverShared` area (DSAL/DSAH) and activates it
//! (CMD ACTIVATE_DEV); the device then reads the Tx/Rx queue configuration from guest memory.
//! Tx: a TXPROD doorbell makes the device walk the Tx ring while descriptors carry its
//! generation bit, gather each packet (SOP..EOP), apply its offload and hand the frames to the
//! [`FrameSink`], then post a Tx completion. Rx: [`Vmxnet3Function::receive_frame`] takes a
//! frame from the wire, filters it by destination MAC and the driver's Rx mode, writes it into
//! the next head buffer of ring 0 (continuing in ring 1's body buffers when it is longer) and
//! posts Rx completions; with no buffer the frame is dropped and counted. Completions raise the
//! queue's MSI-X vector unless the driver masked it (IMR), in which case the vector fires when
//! unmasked. Link changes set `DriverShared.ecr` and raise the event vector.
//!
//! Every guest value is checked: ring sizes (multiples of 32, at most 4096; 8192 for Rx
//! completion rings), queue counts, vector indices, descriptor chains (an EOP within the ring
//! and at most [`MAX_TX_DESCS_PER_PACKET`] descriptors) and buffer lengths. A bad activation
//! fails the command (result 1, as `vmxnet3_activate_dev()` reports); a bad packet stops its
//! queue with the architected `VMXNET3_ERR_*` code and the TQERR event. All DMA goes through
//! the function's [`DmaSpace`], so the IOMMU translates it.

pub mod layout;
pub mod offload;
pub mod registers;

use std::fmt;
use std::sync::Arc;

use iommu::{DmaError, DmaSpace, MsiSink, RequesterId};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::pci::msix::MsixLayout;
use crate::pci::pcie::PcieCapabilityConfig;
use crate::pci::{
    BarInfo, BarKind, ConfigSpace, HeaderType, MsixCapability, PciDevice, PciError, PciIds,
};
use layout::{
    DESC_SIZE, IntrConf, MiscConf, QueueStats, QueueStatus, RxCompDesc, RxDesc, RxQueueConf,
    TxCompDesc, TxDesc, TxQueueConf,
};
use registers as reg;

/// VMware's vendor ID.
pub const VENDOR_VMWARE: u16 = 0x15ad;
/// The vmxnet3 device ID (`PCI_DEVICE_ID_VMWARE_VMXNET3`).
pub const DEVICE_ID_VMXNET3: u16 = 0x07b0;
/// Class: Ethernet controller.
pub const CLASS_ETHERNET: u32 = 0x02_00_00;
/// BAR 0 and BAR 1 size.
pub const REGISTER_BAR_SIZE: u64 = 0x1000;
/// BAR 2 (MSI-X table and PBA) size.
pub const MSIX_BAR_SIZE: u64 = 0x2000;
/// MSI-X vectors (`VMXNET3_MAX_INTRS`).
pub const NUM_VECTORS: u16 = 25;
/// Most Tx queues a revision-1 driver configures (`VMXNET3_MAX_TX_QUEUES`).
pub const MAX_TX_QUEUES: usize = 8;
/// Most Rx queues (`VMXNET3_MAX_RX_QUEUES`).
pub const MAX_RX_QUEUES: usize = 16;
/// Largest Tx/Rx descriptor ring (`VMXNET3_TX_RING_MAX_SIZE`).
pub const MAX_RING_SIZE: u32 = 4096;
/// Largest Rx completion ring (`VMXNET3_RC_RING_MAX_SIZE`).
pub const MAX_RX_COMP_RING_SIZE: u32 = 8192;
/// Most descriptors one packet may use (`VMXNET3_MAX_TSO_TXD_PER_PKT`).
pub const MAX_TX_DESCS_PER_PACKET: usize = 24;
/// Largest frame accepted from the wire or built for it (64 KiB TSO packets plus headers).
pub const MAX_PACKET: usize = 1 << 17;

/// Where the device puts Ethernet frames it transmits.
pub trait FrameSink: Send + Sync {
    /// Puts one frame (destination MAC first, no FCS) on the wire.
    fn send_frame(&self, frame: &[u8]);
}

/// What the function counts (for the control API and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicCounters {
    /// Frames put on the wire (after segmentation).
    pub tx_frames: u64,
    /// Bytes put on the wire.
    pub tx_bytes: u64,
    /// Packets dropped on transmit (bad descriptors, failed DMA, offload errors).
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered.
    pub rx_bytes: u64,
    /// Frames dropped: no Rx buffer.
    pub rx_no_buffer: u64,
    /// Frames dropped: not for this station (MAC filter).
    pub rx_filtered: u64,
    /// Frames dropped: device not active or link down.
    pub rx_not_ready: u64,
    /// Frames dropped: malformed (shorter than an Ethernet header, or too long).
    pub rx_malformed: u64,
}

/// A ring the device consumes or produces, with its generation bit.
#[derive(Clone, Copy, Debug, Default)]
struct Ring {
    base: u64,
    size: u32,
    next: u32,
    generation: bool,
}

impl Ring {
    fn new(base: u64, size: u32) -> Self {
        Ring {
            base,
            size,
            next: 0,
            generation: true,
        }
    }

    fn addr(&self, index: u32) -> u64 {
        self.base + u64::from(index) * DESC_SIZE
    }

    fn advance(&mut self) {
        self.next += 1;
        if self.next == self.size {
            self.next = 0;
            self.generation = !self.generation;
        }
    }
}

#[derive(Debug, Default)]
struct TxQueue {
    desc_pa: u64,
    ring: Ring,
    comp: Ring,
    vector: u16,
    stopped: Option<u32>,
    stats: QueueStats,
}

#[derive(Debug, Default)]
struct RxQueue {
    desc_pa: u64,
    rings: [Ring; 2],
    comp: Ring,
    vector: u16,
    stats: QueueStats,
}

/// The vmxnet3 function.
pub struct Vmxnet3Function {
    config: ConfigSpace,
    msix: MsixCapability,
    dma: DmaSpace,
    sink: Arc<dyn FrameSink>,
    permanent_mac: [u8; 6],
    mac: [u8; 6],
    shared_pa: u64,
    cmd_result: u32,
    active: bool,
    link_up: bool,
    masked: [bool; NUM_VECTORS as usize],
    pending: [bool; NUM_VECTORS as usize],
    event_vector: u16,
    rx_mode: u32,
    ecr: u32,
    tx: Vec<TxQueue>,
    rx: Vec<RxQueue>,
    counters: NicCounters,
}

impl fmt::Debug for Vmxnet3Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vmxnet3Function")
            .field("mac", &self.mac)
            .field("active", &self.active)
            .field("link_up", &self.link_up)
            .finish_non_exhaustive()
    }
}

/// Reads a guest structure through the function's DMA space.
fn read_struct<T: FromBytes + IntoBytes + KnownLayout + Immutable>(
    dma: &DmaSpace,
    addr: u64,
) -> Result<T, DmaError> {
    let mut v = T::new_zeroed();
    dma.read(addr, v.as_mut_bytes())?;
    Ok(v)
}

/// Writes a 16-byte completion descriptor with its last DWORD (holding the generation bit)
/// last, so the driver never sees the new generation with stale fields.
fn write_completion(dma: &DmaSpace, addr: u64, desc: &[u8]) -> Result<(), DmaError> {
    dma.write(addr, &desc[..12])?;
    dma.write(addr + 12, &desc[12..16])
}

fn valid_ring(base: u64, size: u32, max: u32) -> bool {
    size != 0
        && size.is_multiple_of(32)
        && size <= max
        && base != 0
        && base.is_multiple_of(DESC_SIZE)
}

impl Vmxnet3Function {
    /// Builds the function with station address `mac`. Its DMA goes through `dma`, its MSI-X
    /// messages to `msi`, its transmitted frames to `sink`. The link starts up.
    pub fn new(
        mac: [u8; 6],
        dma: DmaSpace,
        msi: Arc<dyn MsiSink>,
        sink: Arc<dyn FrameSink>,
    ) -> Result<Self, PciError> {
        if mac[0] & 1 != 0 {
            return Err(PciError::InvalidConfig(format!(
                "vmxnet3: MAC {} is a multicast address",
                format_mac(&mac)
            )));
        }
        let mut config = ConfigSpace::new(
            HeaderType::Type0,
            PciIds {
                vendor_id: VENDOR_VMWARE,
                device_id: DEVICE_ID_VMXNET3,
                revision_id: 0x01,
                class_code: CLASS_ETHERNET,
                subsystem_vendor_id: VENDOR_VMWARE,
                subsystem_id: DEVICE_ID_VMXNET3,
            },
        );
        config.add_bar(0, REGISTER_BAR_SIZE, BarKind::Memory32, false)?;
        config.add_bar(1, REGISTER_BAR_SIZE, BarKind::Memory32, false)?;
        config.add_bar(2, MSIX_BAR_SIZE, BarKind::Memory32, false)?;
        config.add_capability(&PcieCapabilityConfig::rc_integrated_endpoint().build())?;
        let msix = MsixCapability::new(
            &mut config,
            MsixLayout {
                num_vectors: NUM_VECTORS,
                table_bar: 2,
                table_offset: 0,
                pba_bar: 2,
                pba_offset: 0x1000,
            },
            msi,
            dma.requester_id(),
        )?;
        dma.set_bus_master(false);
        Ok(Vmxnet3Function {
            config,
            msix,
            dma,
            sink,
            permanent_mac: mac,
            mac,
            shared_pa: 0,
            cmd_result: 0,
            active: false,
            link_up: true,
            masked: [true; NUM_VECTORS as usize],
            pending: [false; NUM_VECTORS as usize],
            event_vector: 0,
            rx_mode: 0,
            ecr: 0,
            tx: Vec::new(),
            rx: Vec::new(),
            counters: NicCounters::default(),
        })
    }

    /// The station address the driver uses now (MACL/MACH).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether the driver has activated the device.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The link state.
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// What the function has counted.
    pub fn counters(&self) -> NicCounters {
        self.counters
    }

    /// Config space (device-side view).
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// Sets the link state; a change raises the LINK event (the driver then asks GET_LINK and
    /// sets its carrier).
    pub fn set_link(&mut self, up: bool) {
        if self.link_up == up {
            return;
        }
        self.link_up = up;
        self.raise_event(reg::ecr::LINK);
    }

    fn raise_event(&mut self, bits: u32) {
        if !self.active {
            return;
        }
        self.ecr |= bits;
        if self
            .dma
            .write(self.shared_pa + layout::SHARED_ECR, &self.ecr.to_le_bytes())
            .is_err()
        {
            log::warn!("vmxnet3: cannot write the event cause to the driver-shared area");
        }
        self.raise(self.event_vector);
    }

    /// Signals `vector`, or leaves it pending while the driver has it masked.
    fn raise(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.masked.len() {
            return;
        }
        if self.masked[v] {
            self.pending[v] = true;
            return;
        }
        self.pending[v] = false;
        let _ = self.msix.trigger(vector);
    }

    fn set_mask(&mut self, vector: usize, masked: bool) {
        if vector >= self.masked.len() {
            return;
        }
        self.masked[vector] = masked;
        if !masked && self.pending[vector] {
            self.raise(vector as u16);
        }
    }

    /// Back to the state before activation: queues gone, vectors masked, events clear.
    fn reset_device(&mut self) {
        self.active = false;
        self.tx.clear();
        self.rx.clear();
        self.masked = [true; NUM_VECTORS as usize];
        self.pending = [false; NUM_VECTORS as usize];
        self.ecr = 0;
        self.rx_mode = 0;
    }

    /// ACTIVATE_DEV: reads and checks the driver-shared area and the queue descriptors.
    fn activate(&mut self) -> Result<(), String> {
        let shared = self.shared_pa;
        if shared == 0 || !shared.is_multiple_of(8) {
            return Err(format!(
                "driver-shared address {shared:#x} is not set or not aligned"
            ));
        }
        let dma_err = |what: &str, e: DmaError| format!("cannot read the {what}: {e}");
        let mut magic = [0u8; 4];
        self.dma
            .read(shared, &mut magic)
            .map_err(|e| dma_err("driver-shared area", e))?;
        let magic = u32::from_le_bytes(magic);
        if magic != layout::REV1_MAGIC {
            return Err(format!(
                "driver-shared magic {magic:#x} is not VMXNET3_REV1_MAGIC"
            ));
        }
        let misc: MiscConf = read_struct(&self.dma, shared + layout::SHARED_DEV_READ)
            .map_err(|e| dma_err("misc configuration", e))?;
        let intr: IntrConf = read_struct(&self.dma, shared + layout::SHARED_INTR_CONF)
            .map_err(|e| dma_err("interrupt configuration", e))?;
        let ntx = usize::from(misc.num_tx_queues);
        let nrx = usize::from(misc.num_rx_queues);
        if !(1..=MAX_TX_QUEUES).contains(&ntx) || !(1..=MAX_RX_QUEUES).contains(&nrx) {
            return Err(format!(
                "{ntx} Tx / {nrx} Rx queues (1..={MAX_TX_QUEUES} / 1..={MAX_RX_QUEUES})"
            ));
        }
        let needed = (ntx + nrx) as u64 * layout::QUEUE_DESC_SIZE;
        if u64::from(misc.queue_desc_len) < needed || misc.queue_desc_pa == 0 {
            return Err(format!(
                "queue descriptor table of {} bytes at {:#x} (needs {needed})",
                misc.queue_desc_len, misc.queue_desc_pa
            ));
        }
        if intr.num_intrs == 0
            || u16::from(intr.num_intrs) > NUM_VECTORS
            || u16::from(intr.event_intr_idx) >= NUM_VECTORS
        {
            return Err(format!(
                "{} vectors, event vector {} ({NUM_VECTORS} exist)",
                intr.num_intrs, intr.event_intr_idx
            ));
        }
        let vector = |idx: u8, what: &str| {
            if u16::from(idx) < NUM_VECTORS {
                Ok(u16::from(idx))
            } else {
                Err(format!("{what} uses vector {idx} ({NUM_VECTORS} exist)"))
            }
        };
        let mut tx = Vec::with_capacity(ntx);
        for q in 0..ntx {
            let desc_pa = misc.queue_desc_pa + q as u64 * layout::QUEUE_DESC_SIZE;
            let c: TxQueueConf = read_struct(&self.dma, desc_pa + layout::QUEUE_DESC_CONF)
                .map_err(|e| dma_err("Tx queue configuration", e))?;
            if !valid_ring(c.tx_ring_base_pa, c.tx_ring_size, MAX_RING_SIZE)
                || !valid_ring(c.comp_ring_base_pa, c.comp_ring_size, MAX_RING_SIZE)
            {
                return Err(format!(
                    "Tx queue {q}: ring of {} at {:#x}, completion ring of {} at {:#x}",
                    c.tx_ring_size, c.tx_ring_base_pa, c.comp_ring_size, c.comp_ring_base_pa
                ));
            }
            tx.push(TxQueue {
                desc_pa,
                ring: Ring::new(c.tx_ring_base_pa, c.tx_ring_size),
                comp: Ring::new(c.comp_ring_base_pa, c.comp_ring_size),
                vector: vector(c.intr_idx, &format!("Tx queue {q}"))?,
                stopped: None,
                stats: QueueStats::default(),
            });
        }
        let mut rx = Vec::with_capacity(nrx);
        for q in 0..nrx {
            let desc_pa = misc.queue_desc_pa + (ntx + q) as u64 * layout::QUEUE_DESC_SIZE;
            let c: RxQueueConf = read_struct(&self.dma, desc_pa + layout::QUEUE_DESC_CONF)
                .map_err(|e| dma_err("Rx queue configuration", e))?;
            let ring1_ok = c.rx_ring_size[1] == 0
                || valid_ring(c.rx_ring_base_pa[1], c.rx_ring_size[1], MAX_RING_SIZE);
            if !valid_ring(c.rx_ring_base_pa[0], c.rx_ring_size[0], MAX_RING_SIZE)
                || !ring1_ok
                || !valid_ring(c.comp_ring_base_pa, c.comp_ring_size, MAX_RX_COMP_RING_SIZE)
            {
                return Err(format!(
                    "Rx queue {q}: rings of {} at {:#x} and {} at {:#x}, completion ring of {} at {:#x}",
                    c.rx_ring_size[0],
                    c.rx_ring_base_pa[0],
                    c.rx_ring_size[1],
                    c.rx_ring_base_pa[1],
                    c.comp_ring_size,
                    c.comp_ring_base_pa
                ));
            }
            rx.push(RxQueue {
                desc_pa,
                rings: [
                    Ring::new(c.rx_ring_base_pa[0], c.rx_ring_size[0]),
                    Ring::new(c.rx_ring_base_pa[1], c.rx_ring_size[1]),
                ],
                comp: Ring::new(c.comp_ring_base_pa, c.comp_ring_size),
                vector: vector(c.intr_idx, &format!("Rx queue {q}"))?,
                stats: QueueStats::default(),
            });
        }
        self.event_vector = u16::from(intr.event_intr_idx);
        self.tx = tx;
        self.rx = rx;
        self.ecr = 0;
        self.active = true;
        self.read_rx_mode();
        log::info!(
            "vmxnet3 {}: activated ({ntx} Tx / {nrx} Rx queues, MTU {})",
            format_mac(&self.mac),
            misc.mtu
        );
        Ok(())
    }

    fn read_rx_mode(&mut self) {
        let mut mode = [0u8; 4];
        if self
            .dma
            .read(self.shared_pa + layout::SHARED_RX_FILTER, &mut mode)
            .is_ok()
        {
            self.rx_mode = u32::from_le_bytes(mode);
        }
    }

    fn command(&mut self, command: u32) {
        use reg::cmd;
        self.cmd_result = match command {
            cmd::ACTIVATE_DEV => match self.activate() {
                Ok(()) => 0,
                Err(e) => {
                    log::warn!("vmxnet3: ACTIVATE_DEV refused: {e}");
                    self.reset_device();
                    1
                }
            },
            cmd::QUIESCE_DEV => {
                self.active = false;
                0
            }
            cmd::RESET_DEV => {
                self.reset_device();
                0
            }
            cmd::UPDATE_RX_MODE => {
                self.read_rx_mode();
                0
            }
            // Filters, RSS, moderation, wake-up, features, coalescing: accepted; every frame
            // goes to Rx queue 0 and the guest checks its own checksums.
            c if (cmd::ACTIVATE_DEV..=cmd::LAST_SET).contains(&c) => 0,
            cmd::GET_QUEUE_STATUS => {
                self.write_queue_status();
                0
            }
            cmd::GET_STATS => {
                self.write_queue_stats();
                0
            }
            cmd::GET_LINK => {
                if self.link_up {
                    reg::LINK_UP
                } else {
                    0
                }
            }
            cmd::GET_PERM_MAC_LO => {
                u32::from_le_bytes(self.permanent_mac[..4].try_into().unwrap_or([0; 4]))
            }
            cmd::GET_PERM_MAC_HI => u32::from(u16::from_le_bytes([
                self.permanent_mac[4],
                self.permanent_mac[5],
            ])),
            cmd::GET_DID_LO => u32::from(DEVICE_ID_VMXNET3),
            cmd::GET_DID_HI => 1,
            cmd::GET_DEV_EXTRA_INFO => 0,
            cmd::GET_CONF_INTR => reg::CONF_INTR_MSIX_ACTIVE_MASK,
            other => {
                log::debug!("vmxnet3: unknown command {other:#x}");
                u32::MAX
            }
        };
    }

    fn write_queue_status(&self) {
        for q in &self.tx {
            let status = QueueStatus {
                stopped: u8::from(q.stopped.is_some()),
                pad: [0; 3],
                error: q.stopped.unwrap_or(0),
            };
            let _ = self
                .dma
                .write(q.desc_pa + layout::QUEUE_DESC_STATUS, status.as_bytes());
        }
        for q in &self.rx {
            let _ = self.dma.write(
                q.desc_pa + layout::QUEUE_DESC_STATUS,
                QueueStatus::default().as_bytes(),
            );
        }
    }

    fn write_queue_stats(&self) {
        for (pa, stats) in self
            .tx
            .iter()
            .map(|q| (q.desc_pa, &q.stats))
            .chain(self.rx.iter().map(|q| (q.desc_pa, &q.stats)))
        {
            let _ = self
                .dma
                .write(pa + layout::QUEUE_DESC_STATS, stats.as_bytes());
        }
    }

    /// Stops Tx queue `q` with `error` and tells the driver (TQERR event).
    fn stop_tx_queue(&mut self, q: usize, error: u32) {
        log::warn!("vmxnet3: Tx queue {q} stopped, error {error:#x}");
        if let Some(queue) = self.tx.get_mut(q) {
            queue.stopped = Some(error);
        }
        self.raise_event(reg::ecr::TQERR);
    }

    /// The TXPROD doorbell of queue `q`: sends every complete packet the driver has posted.
    pub fn process_tx(&mut self, q: usize) {
        if !self.active || q >= self.tx.len() || self.tx[q].stopped.is_some() {
            return;
        }
        let mut completed = false;
        let mut packet = Vec::new();
        // At most one pass over the ring per doorbell.
        for _ in 0..self.tx[q].ring.size {
            match self.next_tx_packet(q, &mut packet) {
                Ok(None) => break,
                Ok(Some((eop, offload))) => {
                    if self.link_up {
                        self.transmit(q, &mut packet, offload);
                    } else {
                        self.counters.tx_dropped += 1;
                        self.tx[q].stats.discard_or_errors += 1;
                    }
                    let queue = &mut self.tx[q];
                    let comp = TxCompDesc::new(eop, queue.comp.generation);
                    if write_completion(
                        &self.dma,
                        queue.comp.addr(queue.comp.next),
                        comp.as_bytes(),
                    )
                    .is_err()
                    {
                        self.stop_tx_queue(q, reg::queue_error::TXD_INVALID);
                        break;
                    }
                    queue.comp.advance();
                    completed = true;
                }
                Err(error) => {
                    self.counters.tx_dropped += 1;
                    self.stop_tx_queue(q, error);
                    break;
                }
            }
        }
        if completed && let Some(queue) = self.tx.get(q) {
            self.raise(queue.vector);
        }
    }

    /// Gathers the next complete packet of Tx queue `q` into `packet`; returns its EOP index
    /// and the SOP descriptor (offload request), `None` when no complete packet is posted, or
    /// the queue error a malformed chain earns.
    fn next_tx_packet(
        &mut self,
        q: usize,
        packet: &mut Vec<u8>,
    ) -> Result<Option<(u32, TxDesc)>, u32> {
        let mut ring = self.tx[q].ring;
        let mut descs: Vec<(u32, TxDesc)> = Vec::new();
        loop {
            let desc: TxDesc = read_struct(&self.dma, ring.addr(ring.next))
                .map_err(|_| reg::queue_error::TXD_INVALID)?;
            if desc.gen_bit() != ring.generation {
                if descs.is_empty() {
                    return Ok(None);
                }
                // SOP is only handed over once the whole chain is written.
                return Err(reg::queue_error::NOEOP);
            }
            if desc.dtype() {
                return Err(reg::queue_error::DESC_NOT_SPT);
            }
            descs.push((ring.next, desc));
            ring.advance();
            if desc.eop() {
                break;
            }
            if descs.len() >= MAX_TX_DESCS_PER_PACKET || descs.len() >= ring.size as usize {
                return Err(reg::queue_error::BIG_PKT);
            }
        }
        packet.clear();
        for (_, d) in &descs {
            let len = d.buffer_len() as usize;
            if packet.len() + len > MAX_PACKET {
                return Err(reg::queue_error::BIG_PKT);
            }
            let start = packet.len();
            packet.resize(start + len, 0);
            self.dma
                .read(d.addr, &mut packet[start..])
                .map_err(|_| reg::queue_error::TXD_INVALID)?;
        }
        self.tx[q].ring = ring;
        let eop = descs.last().map(|(i, _)| *i).unwrap_or(0);
        Ok(Some((eop, descs[0].1)))
    }

    /// Applies the SOP descriptor's offload and VLAN insertion and sends the frame(s).
    fn transmit(&mut self, q: usize, packet: &mut Vec<u8>, sop: TxDesc) {
        let mut frames = 0u64;
        let mut bytes = 0u64;
        let sink = self.sink.clone();
        let mut send = |f: &[u8]| {
            frames += 1;
            bytes += f.len() as u64;
            sink.send_frame(f);
        };
        let vlan = sop.ti().then(|| sop.tci());
        let result = match sop.om() {
            layout::offload_mode::NONE => {
                if let Some(tci) = vlan {
                    offload::insert_vlan_tag(packet, tci);
                }
                send(packet);
                Ok(())
            }
            layout::offload_mode::CSUM => {
                offload::insert_checksum(packet, sop.hlen() as usize, sop.msscof() as usize).map(
                    |()| {
                        if let Some(tci) = vlan {
                            offload::insert_vlan_tag(packet, tci);
                        }
                        send(packet);
                    },
                )
            }
            layout::offload_mode::TSO => {
                offload::segment_tcp(packet, sop.hlen() as usize, sop.msscof() as usize, |seg| {
                    match vlan {
                        Some(tci) => {
                            let mut s = seg.to_vec();
                            offload::insert_vlan_tag(&mut s, tci);
                            send(&s);
                        }
                        None => send(seg),
                    }
                })
                .map(|_| ())
            }
            _ => Err(offload::OffloadError::UnsupportedMode),
        };
        let stats = &mut self.tx[q].stats;
        match result {
            Ok(()) => {
                self.counters.tx_frames += frames;
                self.counters.tx_bytes += bytes;
                if sop.om() == layout::offload_mode::TSO {
                    stats.offload_pkts += frames;
                    stats.offload_bytes += bytes;
                }
                let dst = packet.first().copied().unwrap_or(0);
                if packet.get(..6) == Some(&[0xff; 6]) {
                    stats.bcast_pkts += frames;
                    stats.bcast_bytes += bytes;
                } else if dst & 1 != 0 {
                    stats.mcast_pkts += frames;
                    stats.mcast_bytes += bytes;
                } else {
                    stats.ucast_pkts += frames;
                    stats.ucast_bytes += bytes;
                }
            }
            Err(e) => {
                log::debug!("vmxnet3: Tx queue {q}: packet dropped: {e:?}");
                self.counters.tx_dropped += 1;
                stats.errors_or_out_of_buf += 1;
            }
        }
    }

    /// Whether the driver's Rx mode and station address accept a frame for `dst`.
    fn accepts(&self, dst: &[u8]) -> bool {
        use reg::rx_mode;
        if self.rx_mode & rx_mode::PROMISC != 0 {
            return true;
        }
        if dst == [0xff; 6] {
            return self.rx_mode & rx_mode::BCAST != 0;
        }
        if dst[0] & 1 != 0 {
            return self.rx_mode & (rx_mode::MCAST | rx_mode::ALL_MULTI) != 0;
        }
        dst == self.mac && self.rx_mode & rx_mode::UCAST != 0
    }

    /// A frame from the wire: delivered to Rx queue 0, or dropped and counted.
    pub fn receive_frame(&mut self, frame: &[u8]) {
        if frame.len() < 14 || frame.len() > MAX_PACKET {
            self.counters.rx_malformed += 1;
            return;
        }
        if !self.active || !self.link_up || self.rx.is_empty() || !self.dma.bus_master_enabled() {
            self.counters.rx_not_ready += 1;
            return;
        }
        if !self.accepts(&frame[..6]) {
            self.counters.rx_filtered += 1;
            return;
        }
        let nrx = self.rx.len() as u32;
        match self.deliver(0, nrx, frame) {
            Ok(true) => {
                self.counters.rx_frames += 1;
                self.counters.rx_bytes += frame.len() as u64;
                let stats = &mut self.rx[0].stats;
                if frame[..6] == [0xff; 6] {
                    stats.bcast_pkts += 1;
                    stats.bcast_bytes += frame.len() as u64;
                } else if frame[0] & 1 != 0 {
                    stats.mcast_pkts += 1;
                    stats.mcast_bytes += frame.len() as u64;
                } else {
                    stats.ucast_pkts += 1;
                    stats.ucast_bytes += frame.len() as u64;
                }
                let vector = self.rx[0].vector;
                self.raise(vector);
            }
            Ok(false) => {
                self.counters.rx_no_buffer += 1;
                self.rx[0].stats.errors_or_out_of_buf += 1;
            }
            Err(e) => {
                log::debug!("vmxnet3: Rx DMA failed: {e}");
                self.counters.rx_no_buffer += 1;
                self.rx[0].stats.discard_or_errors += 1;
            }
        }
    }

    /// Writes `frame` into queue `q`'s buffers: ring 0's next head buffer, then ring 1's body
    /// buffers for the rest. `Ok(false)`: not enough buffers posted (nothing written).
    fn deliver(&mut self, q: usize, nrx: u32, frame: &[u8]) -> Result<bool, DmaError> {
        let queue = &self.rx[q];
        let mut rings = queue.rings;
        let head: RxDesc = read_struct(&self.dma, rings[0].addr(rings[0].next))?;
        if head.gen_bit() != rings[0].generation || head.is_body() || head.buffer_len() == 0 {
            return Ok(false);
        }
        // Plan every piece before writing anything.
        let mut pieces = vec![(0usize, rings[0].next, head)];
        rings[0].advance();
        let mut left = frame.len().saturating_sub(head.buffer_len() as usize);
        while left > 0 {
            if rings[1].size == 0 || pieces.len() > rings[1].size as usize {
                return Ok(false);
            }
            let body: RxDesc = read_struct(&self.dma, rings[1].addr(rings[1].next))?;
            if body.gen_bit() != rings[1].generation || body.buffer_len() == 0 {
                return Ok(false);
            }
            pieces.push((1, rings[1].next, body));
            rings[1].advance();
            left = left.saturating_sub(body.buffer_len() as usize);
        }
        // Completion ring room: the driver sizes it for both rings, but check anyway.
        if pieces.len() > queue.comp.size as usize {
            return Ok(false);
        }
        let mut comp = queue.comp;
        let mut offset = 0usize;
        let count = pieces.len();
        for (i, (ring, index, desc)) in pieces.into_iter().enumerate() {
            let n = (desc.buffer_len() as usize).min(frame.len() - offset);
            self.dma.write(desc.addr, &frame[offset..offset + n])?;
            offset += n;
            let rq_id = if ring == 0 { q as u32 } else { q as u32 + nrx };
            let c = RxCompDesc::new(
                index,
                rq_id,
                n as u32,
                i == 0,
                i + 1 == count,
                comp.generation,
            );
            write_completion(&self.dma, comp.addr(comp.next), c.as_bytes())?;
            comp.advance();
        }
        let queue = &mut self.rx[q];
        queue.rings = rings;
        queue.comp = comp;
        Ok(true)
    }

    fn bar0_write(&mut self, offset: u64, value: u32) {
        let vector = offset / reg::REG_ALIGN;
        match offset {
            o if o < u64::from(NUM_VECTORS) * reg::REG_ALIGN
                && o.is_multiple_of(reg::REG_ALIGN) =>
            {
                self.set_mask(vector as usize, value & 1 != 0);
            }
            o if (reg::TXPROD..reg::TXPROD + MAX_TX_QUEUES as u64 * reg::REG_ALIGN)
                .contains(&o) =>
            {
                self.process_tx(((o - reg::TXPROD) / reg::REG_ALIGN) as usize);
            }
            // Rx producers: the device follows the generation bits, no doorbell needed.
            _ => {}
        }
    }

    fn bar0_read(&self, offset: u64) -> u32 {
        if offset < u64::from(NUM_VECTORS) * reg::REG_ALIGN && offset.is_multiple_of(reg::REG_ALIGN)
        {
            return u32::from(self.masked[(offset / reg::REG_ALIGN) as usize]);
        }
        0
    }

    fn bar1_write(&mut self, offset: u64, value: u32) {
        match offset {
            reg::VRRS | reg::UVRS if value & !1 != 0 => {
                log::warn!("vmxnet3: driver chose an unsupported revision {value:#x}");
            }
            reg::DSAL => self.shared_pa = (self.shared_pa & !0xffff_ffff) | u64::from(value),
            reg::DSAH => self.shared_pa = (self.shared_pa & 0xffff_ffff) | u64::from(value) << 32,
            reg::CMD => self.command(value),
            reg::MACL => self.mac[..4].copy_from_slice(&value.to_le_bytes()),
            reg::MACH => self.mac[4..].copy_from_slice(&value.to_le_bytes()[..2]),
            reg::ECR => {
                self.ecr &= !value;
                if self.active {
                    let _ = self
                        .dma
                        .write(self.shared_pa + layout::SHARED_ECR, &self.ecr.to_le_bytes());
                }
            }
            _ => {}
        }
    }

    fn bar1_read(&self, offset: u64) -> u32 {
        match offset {
            reg::VRRS => reg::SUPPORTED_REVISIONS,
            reg::UVRS => reg::SUPPORTED_UPT_VERSIONS,
            reg::DSAL => self.shared_pa as u32,
            reg::DSAH => (self.shared_pa >> 32) as u32,
            reg::CMD => self.cmd_result,
            reg::MACL => u32::from_le_bytes([self.mac[0], self.mac[1], self.mac[2], self.mac[3]]),
            reg::MACH => u32::from(u16::from_le_bytes([self.mac[4], self.mac[5]])),
            _ => 0,
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl PciDevice for Vmxnet3Function {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        self.msix.config_written(&self.config, offset, data.len());
        self.dma.set_bus_master(self.config.bus_master_enabled());
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if self.msix.bar_read(bar, offset, data) {
            return;
        }
        // The driver uses 32-bit accesses only (readl/writel).
        let value = match (bar, data.len(), offset % 4) {
            (0, 4, 0) => self.bar0_read(offset),
            (1, 4, 0) => self.bar1_read(offset),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if self.msix.bar_write(bar, offset, data) {
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!("vmxnet3: ignoring {}-byte write to BAR {bar}", data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes(bytes);
        match bar {
            0 => self.bar0_write(offset, value),
            1 => self.bar1_write(offset, value),
            _ => {}
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn set_requester_id(&mut self, requester_id: RequesterId) {
        self.dma.set_requester_id(requester_id);
        self.msix.set_requester_id(requester_id);
    }

    fn name(&self) -> &str {
        "vmxnet3"
    }
}

#[cfg(test)]
mod tests;
