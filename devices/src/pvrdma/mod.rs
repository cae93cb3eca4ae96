//! An emulated VMware PVRDMA function (PCI 15AD:0820, device version 20, RoCE v2), the
//! function 1 next to a vmxnet3 function 0 that Linux's `vmw_pvrdma` driver and rdma-core's
//! `vmw_pvrdma` provider drive.
//!
//! - [`abi`]: the shared region, capabilities, command/response slots, port and QP attributes,
//!   event rings.
//!
//! What exists: the whole control path. The driver writes the shared region's address
//! (DSRLOW, then DSRHIGH: the device reads it and fills in its capabilities at once, as
//! `pvrdma_pci_probe()` expects), activates the device (CTL), and posts commands through the
//! command slot (REQUEST): the device checks every field, executes the command against its
//! resource tables — user contexts (UAR pages), PDs, MRs (with their page directories, DMA
//! and fast-register MRs), CQs, QPs (RC, UD and the GSI QP1) with their state machine and
//! attributes, GID table entries (binds) — writes the response and raises the response vector;
//! a bad command is refused through the ERR register, which the driver reports as a failed
//! command. Port state follows the paired NIC's link: changes post PORT_ACTIVE / PORT_ERR to
//! the async event ring. UAR doorbells (BAR 2, one page per context) arm CQs and accept QP
//! doorbells.
//!
//! The data path so far is UD (and the GSI QP1, so ib_core's MADs and rdma_cm reach the
//! wire): a send doorbell makes the device take each work request from the send queue, gather
//! its SGEs through the MRs named by their lkeys, build a RoCEv2 packet ([`roce`]: IPv4
//! addresses from the IPv4-mapped GIDs, the destination MAC from the address vector) and put
//! it on the paired NIC's wire, then post a send completion; an incoming UD packet for one of
//! its QPs (checked ICRC and Q_Key) is scattered into the next receive work request with the
//! 40-byte GRH area first, and completed. Completions go to the CQ's ring; an armed CQ posts
//! a notification and raises the CQ vector. RC (SEND, WRITE, READ, ACK/NAK, retransmission,
//! RNR) is [`rc`].
//!
//! Every guest value is checked: handles, counts against the capabilities, page directory
//! sizes and every page directory entry (read through the function's [`DmaSpace`], so the
//! IOMMU translates it), QP state transitions, GID indices.

pub mod abi;
pub mod datapath;
#[cfg(any(test, feature = "harness"))]
#[doc(hidden)]
pub mod harness;
pub mod rc;
pub mod roce;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use iommu::{DmaError, DmaSpace, MsiSink, RequesterId};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::pci::msix::MsixLayout;
use crate::pci::pcie::PcieCapabilityConfig;
use crate::pci::{
    BarInfo, BarKind, ConfigSpace, HeaderType, MsixCapability, PciDevice, PciError, PciIds,
};
use crate::vmxnet3::FrameSink;
use abi::{
    AhAttr, CMD_SIZE, CmdHdr, DSR_CAPS, DeviceCaps, Eqe, PAGE_DIR_ENTRIES, PAGE_SIZE, PortAttr,
    QpAttr, QpCap, RespHdr, RingIndices, SharedRegionHead, cmd, event, qp_mask, qp_state, qp_type,
    uar,
};

/// The PVRDMA device ID (`PCI_DEVICE_ID_VMWARE_PVRDMA`).
pub const DEVICE_ID_PVRDMA: u16 = 0x0820;
/// Class: network controller, other.
pub const CLASS_NETWORK_OTHER: u32 = 0x02_80_00;
/// MSI-X vectors: command response, async events, CQ notification.
pub const NUM_VECTORS: u16 = 3;
/// UAR pages (BAR 2): the driver's page 0 and one per user context.
pub const MAX_UAR: u32 = 64;
/// Limits the device advertises (and enforces).
pub const MAX_QP: u32 = 256;
/// Most CQs.
pub const MAX_CQ: u32 = 256;
/// Shared receive queues.
pub const MAX_SRQ: u32 = 64;
/// Most PDs.
pub const MAX_PD: u32 = 256;
/// Most MRs.
pub const MAX_MR: u32 = 4096;
/// Most work requests per queue.
pub const MAX_QP_WR: u32 = 4096;
/// Most CQEs per CQ.
pub const MAX_CQE: u32 = 65536;
/// Most SGEs per work request.
pub const MAX_SGE: u32 = 16;
/// GID table entries.
pub const GID_TABLE_LEN: u32 = 16;
/// Largest MR (the page directory's reach).
pub const MAX_MR_SIZE: u64 = abi::PAGE_DIR_MAX_PAGES * PAGE_SIZE;
/// Pages of the async and CQ notification rings the driver must give (`PVRDMA_NUM_RING_PAGES`
/// is 4; up to 64 accepted).
pub const MAX_RING_PAGES: u32 = 64;

/// Registers (BAR 1).
pub mod reg {
    /// Device version.
    pub const VERSION: u64 = 0x00;
    /// Shared region address, low half.
    pub const DSRLOW: u64 = 0x04;
    /// Shared region address, high half (writing it makes the device read the region).
    pub const DSRHIGH: u64 = 0x08;
    /// Control: 0 activate, 1 unquiesce, 2 reset.
    pub const CTL: u64 = 0x0c;
    /// Write: execute the command in the command slot.
    pub const REQUEST: u64 = 0x10;
    /// Error of the last activation or request (0 = none).
    pub const ERR: u64 = 0x14;
    /// Interrupt cause (INTx only).
    pub const ICR: u64 = 0x18;
    /// Interrupt mask (bit per vector).
    pub const IMR: u64 = 0x1c;
    /// MAC address, bytes 0..4.
    pub const MACL: u64 = 0x20;
    /// MAC address, bytes 4..6.
    pub const MACH: u64 = 0x24;
}

/// Error codes the device reports in ERR and the response header.
pub mod err {
    /// A field out of range or inconsistent.
    pub const INVALID: u32 = 1;
    /// A handle that names nothing.
    pub const NOT_FOUND: u32 = 2;
    /// Out of resources (table full).
    pub const NO_RESOURCES: u32 = 3;
    /// Guest memory the device cannot reach (page directories, slots).
    pub const BAD_ADDRESS: u32 = 4;
    /// A command this device does not offer (SRQs) or an unknown one.
    pub const UNSUPPORTED: u32 = 5;
    /// The device is not set up (no shared region) or not active.
    pub const NOT_READY: u32 = 6;
}

/// A resolved page directory: the pages it maps, in order.
#[derive(Clone, Debug, Default)]
pub struct PageList {
    /// Page addresses (IOVAs).
    pub pages: Vec<u64>,
}

/// Reads `npages` page addresses through the two-level page directory at `dir`
/// (`pvrdma_page_dir_*`: directory → tables of 512 entries → pages).
pub fn read_page_directory(dma: &DmaSpace, dir: u64, npages: u64) -> Result<PageList, u32> {
    if npages > abi::PAGE_DIR_MAX_PAGES {
        return Err(err::INVALID);
    }
    if npages == 0 {
        return Ok(PageList::default());
    }
    if dir == 0 || !dir.is_multiple_of(8) {
        return Err(err::BAD_ADDRESS);
    }
    let tables = npages.div_ceil(PAGE_DIR_ENTRIES);
    let mut pages = Vec::with_capacity(npages as usize);
    let mut table = vec![0u8; (PAGE_DIR_ENTRIES * 8) as usize];
    for t in 0..tables {
        let mut entry = [0u8; 8];
        dma.read(dir + t * 8, &mut entry)
            .map_err(|_| err::BAD_ADDRESS)?;
        let table_addr = u64::from_le_bytes(entry);
        let in_table = (npages - t * PAGE_DIR_ENTRIES).min(PAGE_DIR_ENTRIES) as usize;
        if table_addr == 0 || !table_addr.is_multiple_of(8) {
            return Err(err::BAD_ADDRESS);
        }
        dma.read(table_addr, &mut table[..in_table * 8])
            .map_err(|_| err::BAD_ADDRESS)?;
        for e in table[..in_table * 8].chunks_exact(8) {
            let page = u64::from_le_bytes(e.try_into().map_err(|_| err::INVALID)?);
            if page == 0 || !page.is_multiple_of(PAGE_SIZE) {
                return Err(err::BAD_ADDRESS);
            }
            pages.push(page);
        }
    }
    Ok(PageList { pages })
}

/// A memory region.
#[derive(Clone, Debug)]
pub struct MemoryRegion {
    /// Its PD.
    pub pd: u32,
    /// Local key.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
    /// Start (IOVA of the registration).
    pub start: u64,
    /// Length.
    pub length: u64,
    /// `IB_ACCESS_*`.
    pub access: u32,
    /// DMA MR (all of memory), fast-register MR, or pages.
    pub kind: MrKind,
}

/// What an MR maps.
#[derive(Clone, Debug)]
pub enum MrKind {
    /// Every address (the kernel's DMA MR).
    Dma,
    /// A fast-register MR with room for this many pages.
    FastReg(u32),
    /// These pages.
    Pages(PageList),
}

/// A completion queue.
#[derive(Clone, Debug)]
pub struct CompletionQueue {
    /// Owning user context (0: kernel).
    pub context: u32,
    /// Entries.
    pub entries: u32,
    /// Ring-state page, then CQE pages.
    pub pages: PageList,
    /// Armed for the next completion (`Some(solicited_only)`).
    pub armed: Option<bool>,
}

/// A queue pair.
#[derive(Clone, Debug)]
pub struct QueuePair {
    /// QP number on the wire.
    pub qpn: u32,
    /// `PVRDMA_QPT_*`.
    pub kind: u8,
    /// PD.
    pub pd: u32,
    /// Send CQ handle.
    pub send_cq: u32,
    /// Receive CQ handle.
    pub recv_cq: u32,
    /// Attributes (state, PSNs, path, ...).
    pub attr: QpAttr,
    /// Ring-state page, send queue pages, then receive queue pages.
    pub pages: PageList,
    /// Pages of the send queue (after the ring-state page).
    pub send_pages: u32,
    /// Whether every send is signalled.
    pub sq_sig_all: bool,
    /// Doorbells rung since creation (send, receive).
    pub doorbells: (u64, u64),
    /// RC transport state.
    pub rc: rc::RcState,
    /// The shared receive queue its receives come from, if any.
    pub srq: Option<u32>,
}

impl QueuePair {
    /// A copy for reading attributes while the device changes the QP: everything but the RC
    /// messages in flight (`RcState::without_messages`).
    pub fn snapshot(&self) -> Self {
        Self {
            rc: self.rc.without_messages(),
            pages: self.pages.clone(),
            ..*self
        }
    }
}

/// A GID table entry (bind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gid {
    /// The GID.
    pub gid: [u8; 16],
    /// `IB_GID_TYPE_*` as the driver passes it (1 = RoCE v2 UDP encapsulation).
    pub gid_type: u8,
    /// VLAN.
    pub vlan: u32,
    /// MTU.
    pub mtu: u32,
}

/// What the control API shows.
#[derive(Clone, Debug, Default)]
pub struct PvrdmaState {
    /// Activated by the driver.
    pub active: bool,
    /// Port up (follows the NIC's link).
    pub port_active: bool,
    /// Commands executed and refused.
    pub commands: (u64, u64),
    /// GID table.
    pub gids: Vec<(u32, Gid)>,
    /// QPs.
    pub qps: Vec<QpSummary>,
    /// Resource counts: contexts, PDs, MRs, CQs.
    pub counts: (usize, usize, usize, usize),
}

/// One QP as the control API shows it.
#[derive(Clone, Copy, Debug, Default)]
pub struct QpSummary {
    /// Handle (= QPN).
    pub handle: u32,
    /// QP number.
    pub qpn: u32,
    /// `PVRDMA_QPT_*`.
    pub kind: u8,
    /// `PVRDMA_QPS_*`.
    pub state: u32,
    /// Next send PSN.
    pub sq_psn: u32,
    /// Expected receive PSN.
    pub rq_psn: u32,
    /// Remote QPN (RC).
    pub dest_qpn: u32,
    /// RC packets retransmitted.
    pub retransmissions: u64,
    /// RC NAKs received.
    pub naks: u64,
}

/// The PVRDMA function.
pub struct PvrdmaFunction {
    config: ConfigSpace,
    msix: MsixCapability,
    dma: DmaSpace,
    mac: [u8; 6],
    dsr: u64,
    head: SharedRegionHead,
    async_pages: PageList,
    cq_ring_pages: PageList,
    err: u32,
    active: bool,
    port_active: bool,
    imr: u32,
    pending: u32,
    next_key: u32,
    contexts: BTreeMap<u32, u64>,
    pds: BTreeMap<u32, u32>,
    mrs: BTreeMap<u32, MemoryRegion>,
    cqs: BTreeMap<u32, CompletionQueue>,
    qps: BTreeMap<u32, QueuePair>,
    srqs: BTreeMap<u32, SharedReceiveQueue>,
    gids: BTreeMap<u32, Gid>,
    commands_ok: u64,
    commands_refused: u64,
    wire: Option<Arc<dyn FrameSink>>,
    counters: RoceCounters,
}

/// What the RoCE data path counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoceCounters {
    /// Packets put on the wire.
    pub tx_packets: u64,
    /// Bytes of payload sent.
    pub tx_bytes: u64,
    /// Packets delivered to a receive work request.
    pub rx_packets: u64,
    /// Payload bytes delivered.
    pub rx_bytes: u64,
    /// Incoming packets dropped: malformed or bad ICRC.
    pub rx_malformed: u64,
    /// Incoming packets dropped: no such QP, wrong state, wrong Q_Key or opcode.
    pub rx_no_qp: u64,
    /// Incoming packets dropped: no receive work request posted.
    pub rx_no_wqe: u64,
    /// Completions written.
    pub completions: u64,
    /// Completions with an error status.
    pub error_completions: u64,
}

impl fmt::Debug for PvrdmaFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PvrdmaFunction")
            .field("active", &self.active)
            .field("qps", &self.qps.len())
            .finish_non_exhaustive()
    }
}

fn lowest_free<V>(map: &BTreeMap<u32, V>, start: u32, limit: u32) -> Option<u32> {
    (start..limit).find(|k| !map.contains_key(k))
}

fn parse<T: FromBytes + KnownLayout + Immutable + Copy>(req: &[u8]) -> Result<T, u32> {
    T::read_from_prefix(req)
        .map(|(v, _)| v)
        .map_err(|_| err::INVALID)
}

/// `CREATE_MR`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct CreateMr {
    hdr: CmdHdr,
    start: u64,
    length: u64,
    pdir_dma: u64,
    pd_handle: u32,
    access_flags: u32,
    flags: u32,
    nchunks: u32,
}

/// `CREATE_CQ`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct CreateCq {
    hdr: CmdHdr,
    pdir_dma: u64,
    ctx_handle: u32,
    cqe: u32,
    nchunks: u32,
    reserved: u32,
}

/// `CREATE_QP`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct CreateQp {
    hdr: CmdHdr,
    pdir_dma: u64,
    pd_handle: u32,
    send_cq_handle: u32,
    recv_cq_handle: u32,
    srq_handle: u32,
    max_send_wr: u32,
    max_recv_wr: u32,
    max_send_sge: u32,
    max_recv_sge: u32,
    max_inline_data: u32,
    lkey: u32,
    access_flags: u32,
    total_chunks: u16,
    send_chunks: u16,
    max_atomic_arg: u16,
    sq_sig_all: u8,
    qp_type: u8,
    is_srq: u8,
    reserved: [u8; 3],
}
const _: () = assert!(size_of::<CreateQp>() == 80);

/// `struct pvrdma_srq_attr`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SrqAttr {
    /// Work requests.
    pub max_wr: u32,
    /// SGEs per work request.
    pub max_sge: u32,
    /// Limit: fewer WQEs than this raise SRQ_LIMIT_REACHED once armed (0: not armed).
    pub srq_limit: u32,
    reserved: u32,
}

/// `CREATE_SRQ`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct CreateSrq {
    hdr: CmdHdr,
    pdir_dma: u64,
    pd_handle: u32,
    nchunks: u32,
    attrs: SrqAttr,
    srq_type: u8,
    reserved: [u8; 7],
}

/// `MODIFY_SRQ`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct ModifySrq {
    hdr: CmdHdr,
    srq_handle: u32,
    attr_mask: u32,
    attrs: SrqAttr,
}

/// `IB_SRQ_LIMIT`: the only attribute `pvrdma_modify_srq` changes.
const SRQ_ATTR_LIMIT: u32 = 1 << 1;

/// A shared receive queue: the provider's buffer (ring state in the first page, its `rx`
/// half at +8; WQEs from the second page, `pvrdma_create_srq` in rdma-core).
#[derive(Clone, Debug)]
pub struct SharedReceiveQueue {
    /// PD.
    pub pd: u32,
    /// Ring-state page, then WQE pages.
    pub pages: PageList,
    /// Attributes (max_wr and max_sge as created; the armed limit).
    pub attr: SrqAttr,
}

impl SharedReceiveQueue {
    /// WQE stride: the header and `max_sge` SGEs, rounded to a power of two.
    fn stride(&self) -> u64 {
        (RQ_WQE_HDR_SIZE + 16 * u64::from(self.attr.max_sge.max(1))).next_power_of_two()
    }

    /// Guest address of the WQE in `slot`.
    pub fn wqe(&self, slot: u32) -> Option<u64> {
        let offset = u64::from(slot) * self.stride();
        let page = *self.pages.pages.get(1 + (offset / PAGE_SIZE) as usize)?;
        Some(page + offset % PAGE_SIZE)
    }
}

/// Size of `pvrdma_rq_wqe_hdr`.
const RQ_WQE_HDR_SIZE: u64 = 16;

/// `MODIFY_QP`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct ModifyQp {
    hdr: CmdHdr,
    qp_handle: u32,
    attr_mask: u32,
    attrs: QpAttr,
}
const _: () = assert!(size_of::<ModifyQp>() == CMD_SIZE);

/// `CREATE_BIND`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct CreateBind {
    hdr: CmdHdr,
    mtu: u32,
    vlan: u32,
    index: u32,
    new_gid: [u8; 16],
    gid_type: u8,
    reserved: [u8; 3],
}
const _: () = assert!(size_of::<CreateBind>() == 48);

/// The command's first u32 and u32 argument after the header (handles, indices).
fn args(req: &[u8]) -> (u32, u32) {
    let word = |o: usize| {
        req.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0)
    };
    (word(16), word(20))
}

/// Whether a QP may go from `from` to `to` (IBA 10.3.1, the transitions `ib_modify_qp_is_ok`
/// accepts for RC/UD/GSI).
fn transition_ok(from: u32, to: u32) -> bool {
    use qp_state::*;
    matches!(
        (from, to),
        (_, RESET)
            | (_, ERR)
            | (RESET, INIT)
            | (INIT, INIT)
            | (INIT, RTR)
            | (RTR, RTS)
            | (RTS, RTS)
            | (RTS, SQD)
            | (SQD, SQD)
            | (SQD, RTS)
            | (SQE, RTS)
    )
}

impl PvrdmaFunction {
    /// Builds the function; `mac` is its paired vmxnet3's station address (for the node GUID).
    pub fn new(mac: [u8; 6], dma: DmaSpace, msi: Arc<dyn MsiSink>) -> Result<Self, PciError> {
        let mut config = ConfigSpace::new(
            HeaderType::Type0,
            PciIds {
                vendor_id: crate::vmxnet3::VENDOR_VMWARE,
                device_id: DEVICE_ID_PVRDMA,
                revision_id: 0x01,
                class_code: CLASS_NETWORK_OTHER,
                subsystem_vendor_id: crate::vmxnet3::VENDOR_VMWARE,
                subsystem_id: DEVICE_ID_PVRDMA,
            },
        );
        config.add_bar(0, 0x2000, BarKind::Memory32, false)?;
        config.add_bar(1, 0x1000, BarKind::Memory32, false)?;
        config.add_bar(2, u64::from(MAX_UAR) * PAGE_SIZE, BarKind::Memory64, false)?;
        config.add_capability(&PcieCapabilityConfig::rc_integrated_endpoint().build())?;
        let msix = MsixCapability::new(
            &mut config,
            MsixLayout {
                num_vectors: NUM_VECTORS,
                table_bar: 0,
                table_offset: 0,
                pba_bar: 0,
                pba_offset: 0x1000,
            },
            msi,
            dma.requester_id(),
        )?;
        dma.set_bus_master(false);
        Ok(PvrdmaFunction {
            config,
            msix,
            dma,
            mac,
            dsr: 0,
            head: SharedRegionHead::default(),
            async_pages: PageList::default(),
            cq_ring_pages: PageList::default(),
            err: 0,
            active: false,
            port_active: true,
            imr: u32::MAX,
            pending: 0,
            next_key: 0x100,
            contexts: BTreeMap::new(),
            pds: BTreeMap::new(),
            mrs: BTreeMap::new(),
            cqs: BTreeMap::new(),
            qps: BTreeMap::new(),
            srqs: BTreeMap::new(),
            gids: BTreeMap::new(),
            commands_ok: 0,
            commands_refused: 0,
            wire: None,
            counters: RoceCounters::default(),
        })
    }

    /// Where the device puts RoCEv2 packets (the paired NIC's wire).
    pub fn set_wire(&mut self, wire: Arc<dyn FrameSink>) {
        self.wire = Some(wire);
    }

    /// What the data path has counted.
    pub fn roce_counters(&self) -> RoceCounters {
        self.counters
    }

    /// The capabilities the device reports.
    pub fn caps(&self) -> DeviceCaps {
        let m = self.mac;
        let eui = [m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]];
        DeviceCaps {
            fw_ver: 0x0001_0000,
            node_guid: u64::from_le_bytes(eui),
            sys_image_guid: u64::from_le_bytes(eui),
            max_mr_size: MAX_MR_SIZE,
            page_size_cap: PAGE_SIZE,
            vendor_id: u32::from(crate::vmxnet3::VENDOR_VMWARE),
            vendor_part_id: u32::from(DEVICE_ID_PVRDMA),
            hw_ver: 1,
            max_qp: MAX_QP,
            max_qp_wr: MAX_QP_WR,
            max_sge: MAX_SGE,
            max_sge_rd: MAX_SGE,
            max_srq: MAX_SRQ,
            max_srq_wr: MAX_QP_WR,
            max_srq_sge: MAX_SGE,
            max_cq: MAX_CQ,
            max_cqe: MAX_CQE,
            max_mr: MAX_MR,
            max_pd: MAX_PD,
            max_qp_rd_atom: 16,
            max_res_rd_atom: 16 * MAX_QP,
            max_qp_init_rd_atom: 16,
            max_ah: 4096,
            max_uar: MAX_UAR,
            gid_tbl_len: GID_TABLE_LEN,
            max_pkeys: 1,
            local_ca_ack_delay: 15,
            phys_port_cnt: 1,
            mode: abi::MODE_ROCE,
            gid_types: abi::GID_TYPE_FLAG_ROCE_V2,
            max_fast_reg_page_list_len: 128,
            ..Default::default()
        }
    }

    /// The port's attributes (QUERY_PORT).
    pub fn port_attr(&self) -> PortAttr {
        PortAttr {
            state: if self.port_active { 4 } else { 1 },
            max_mtu: 5,
            active_mtu: 3,
            gid_tbl_len: GID_TABLE_LEN,
            port_cap_flags: (1 << 16) | (1 << 26),
            max_msg_sz: 1 << 31,
            pkey_tbl_len: 1,
            active_width: 2,
            active_speed: 1,
            phys_state: if self.port_active { 5 } else { 3 },
            ..Default::default()
        }
    }

    /// What the control API shows.
    pub fn state(&self) -> PvrdmaState {
        PvrdmaState {
            active: self.active,
            port_active: self.port_active,
            commands: (self.commands_ok, self.commands_refused),
            gids: self.gids.iter().map(|(i, g)| (*i, *g)).collect(),
            qps: self
                .qps
                .iter()
                .map(|(h, q)| QpSummary {
                    handle: *h,
                    qpn: q.qpn,
                    kind: q.kind,
                    state: q.attr.qp_state,
                    sq_psn: q.attr.sq_psn,
                    rq_psn: q.attr.rq_psn,
                    dest_qpn: q.attr.dest_qp_num,
                    retransmissions: q.rc.retransmissions,
                    naks: q.rc.naks,
                })
                .collect(),
            counts: (
                self.contexts.len(),
                self.pds.len(),
                self.mrs.len(),
                self.cqs.len(),
            ),
        }
    }

    /// The QP with `handle`.
    pub fn qp(&self, handle: u32) -> Option<&QueuePair> {
        self.qps.get(&handle)
    }

    /// Config space (device-side view).
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// Sets the port state (the paired NIC's link): PORT_ACTIVE or PORT_ERR goes to the async
    /// event ring (`ibv_asyncwatch` shows it).
    pub fn set_port_active(&mut self, up: bool) {
        if self.port_active == up {
            return;
        }
        self.port_active = up;
        let kind = if up {
            event::PORT_ACTIVE
        } else {
            event::PORT_ERR
        };
        self.post_event(kind, 1);
    }

    /// Writes one event to the async ring and raises the async vector.
    fn post_event(&mut self, kind: u32, info: u32) {
        if !self.active || self.async_pages.pages.len() < 2 {
            return;
        }
        let slots = ((self.async_pages.pages.len() as u64 - 1) * PAGE_SIZE / 8) as u32;
        // The ring state's rx half: the device produces, the driver consumes.
        let state_addr = self.async_pages.pages[0] + 8;
        let Ok(ring) = read_struct::<RingIndices>(&self.dma, state_addr) else {
            return;
        };
        let Some(slot) = abi::ring_free_slot(&ring, slots) else {
            log::debug!("pvrdma: async event ring full or corrupt; event {kind} dropped");
            return;
        };
        let offset = PAGE_SIZE + u64::from(slot) * 8;
        let page = self.async_pages.pages[(offset / PAGE_SIZE) as usize];
        let e = Eqe { kind, info };
        if self
            .dma
            .write(page + offset % PAGE_SIZE, e.as_bytes())
            .is_err()
        {
            return;
        }
        let tail = abi::ring_next(ring.prod_tail, slots);
        if self.dma.write(state_addr, &tail.to_le_bytes()).is_ok() {
            self.raise(1);
        }
    }

    fn raise(&mut self, vector: u16) {
        if self.imr & (1 << vector) != 0 {
            self.pending |= 1 << vector;
            return;
        }
        let _ = self.msix.trigger(vector);
    }

    fn set_imr(&mut self, value: u32) {
        self.imr = value;
        let fire = self.pending & !value;
        self.pending &= value;
        for v in 0..NUM_VECTORS {
            if fire & (1 << v) != 0 {
                let _ = self.msix.trigger(v);
            }
        }
    }

    /// DSRHIGH: reads the shared region, resolves the rings, writes the capabilities.
    fn load_shared_region(&mut self) {
        self.err = match self.try_load_shared_region() {
            Ok(()) => 0,
            Err(e) => {
                log::warn!(
                    "pvrdma: shared region at {:#x} refused (error {e})",
                    self.dsr
                );
                e
            }
        };
    }

    fn try_load_shared_region(&mut self) -> Result<(), u32> {
        if self.dsr == 0 {
            return Err(err::NOT_READY);
        }
        let head: SharedRegionHead =
            read_struct(&self.dma, self.dsr).map_err(|_| err::BAD_ADDRESS)?;
        self.dma
            .write(self.dsr + DSR_CAPS, self.caps().as_bytes())
            .map_err(|_| err::BAD_ADDRESS)?;
        let ring = |info: abi::RingPageInfo| {
            if !(2..=MAX_RING_PAGES).contains(&info.num_pages) {
                return Err(err::INVALID);
            }
            read_page_directory(&self.dma, info.pdir_dma, u64::from(info.num_pages))
        };
        self.async_pages = ring(head.async_ring_pages)?;
        self.cq_ring_pages = ring(head.cq_ring_pages)?;
        self.head = head;
        Ok(())
    }

    /// Back to power-on: every resource gone, not active.
    fn reset(&mut self) {
        self.active = false;
        self.contexts.clear();
        self.pds.clear();
        self.mrs.clear();
        self.cqs.clear();
        self.qps.clear();
        self.srqs.clear();
        self.gids.clear();
        self.imr = u32::MAX;
        self.pending = 0;
    }

    /// REQUEST: executes the command in the command slot.
    fn request(&mut self) {
        let mut req = [0u8; CMD_SIZE];
        if !self.active || self.head.cmd_slot_dma == 0 {
            self.err = err::NOT_READY;
            self.commands_refused += 1;
            return;
        }
        if self.dma.read(self.head.cmd_slot_dma, &mut req).is_err() {
            self.err = err::BAD_ADDRESS;
            self.commands_refused += 1;
            return;
        }
        let Ok(hdr) = parse::<CmdHdr>(&req) else {
            self.err = err::INVALID;
            return;
        };
        let mut resp = [0u8; abi::RESP_SIZE];
        match self.execute(hdr.cmd, &req, &mut resp[16..]) {
            Ok(()) => {
                let rh = RespHdr {
                    response: hdr.response,
                    ack: hdr.cmd | cmd::RESP,
                    err: 0,
                    reserved: [0; 3],
                };
                resp[..16].copy_from_slice(rh.as_bytes());
                if self.dma.write(self.head.resp_slot_dma, &resp).is_err() {
                    self.err = err::BAD_ADDRESS;
                    self.commands_refused += 1;
                    return;
                }
                self.err = 0;
                self.commands_ok += 1;
                self.raise(0);
            }
            Err(e) => {
                log::debug!("pvrdma: command {} refused: error {e}", hdr.cmd);
                self.err = e;
                self.commands_refused += 1;
            }
        }
    }

    fn new_key(&mut self) -> u32 {
        self.next_key = self.next_key.wrapping_add(0x100) & 0xffff_ff00;
        if self.next_key == 0 {
            self.next_key = 0x100;
        }
        self.next_key
    }

    fn execute(&mut self, command: u32, req: &[u8], out: &mut [u8]) -> Result<(), u32> {
        let put = |out: &mut [u8], words: &[u32]| {
            for (i, w) in words.iter().enumerate() {
                out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
        };
        let (a0, a1) = args(req);
        match command {
            cmd::QUERY_PORT => {
                if req[16] != 1 {
                    return Err(err::INVALID);
                }
                out[..48].copy_from_slice(self.port_attr().as_bytes());
            }
            cmd::QUERY_PKEY => {
                if req[16] != 1 || req[17] != 0 {
                    return Err(err::INVALID);
                }
                out[..2].copy_from_slice(&0xffffu16.to_le_bytes());
            }
            cmd::CREATE_UC => {
                let pfn = u64::from_le_bytes(req[16..24].try_into().map_err(|_| err::INVALID)?);
                let handle = lowest_free(&self.contexts, 1, MAX_UAR).ok_or(err::NO_RESOURCES)?;
                self.contexts.insert(handle, pfn);
                put(out, &[handle]);
            }
            cmd::DESTROY_UC => {
                self.contexts.remove(&a0).ok_or(err::NOT_FOUND)?;
            }
            cmd::CREATE_PD => {
                if a0 != 0 && !self.contexts.contains_key(&a0) {
                    return Err(err::NOT_FOUND);
                }
                let handle = lowest_free(&self.pds, 1, MAX_PD + 1).ok_or(err::NO_RESOURCES)?;
                self.pds.insert(handle, a0);
                put(out, &[handle]);
            }
            cmd::DESTROY_PD => {
                if self.mrs.values().any(|m| m.pd == a0) || self.qps.values().any(|q| q.pd == a0) {
                    return Err(err::INVALID);
                }
                self.pds.remove(&a0).ok_or(err::NOT_FOUND)?;
            }
            cmd::CREATE_MR => {
                let c: CreateMr = parse(req)?;
                if !self.pds.contains_key(&c.pd_handle) {
                    return Err(err::NOT_FOUND);
                }
                if self.mrs.len() >= MAX_MR as usize {
                    return Err(err::NO_RESOURCES);
                }
                let kind = match c.flags {
                    1 => MrKind::Dma,
                    2 if c.nchunks <= 128 => MrKind::FastReg(c.nchunks),
                    0 => {
                        if c.length == 0
                            || c.length > MAX_MR_SIZE
                            || c.start.checked_add(c.length).is_none()
                        {
                            return Err(err::INVALID);
                        }
                        let needed = (c.start % PAGE_SIZE + c.length).div_ceil(PAGE_SIZE);
                        if u64::from(c.nchunks) != needed {
                            return Err(err::INVALID);
                        }
                        MrKind::Pages(read_page_directory(
                            &self.dma,
                            c.pdir_dma,
                            u64::from(c.nchunks),
                        )?)
                    }
                    _ => return Err(err::INVALID),
                };
                let key = self.new_key();
                let handle = key;
                self.mrs.insert(
                    handle,
                    MemoryRegion {
                        pd: c.pd_handle,
                        lkey: key,
                        rkey: key,
                        start: c.start,
                        length: c.length,
                        access: c.access_flags,
                        kind,
                    },
                );
                put(out, &[handle, key, key]);
            }
            cmd::DESTROY_MR => {
                self.mrs.remove(&a0).ok_or(err::NOT_FOUND)?;
            }
            cmd::CREATE_CQ => {
                let c: CreateCq = parse(req)?;
                if c.ctx_handle != 0 && !self.contexts.contains_key(&c.ctx_handle) {
                    return Err(err::NOT_FOUND);
                }
                if c.cqe == 0 || c.cqe > MAX_CQE || c.nchunks < 2 {
                    return Err(err::INVALID);
                }
                // 64-byte CQEs after the ring-state page.
                if u64::from(c.nchunks - 1) * PAGE_SIZE < u64::from(c.cqe) * 64
                    || u64::from(c.nchunks) > u64::from(MAX_CQE) * 64 / PAGE_SIZE + 1
                {
                    return Err(err::INVALID);
                }
                let handle = lowest_free(&self.cqs, 0, MAX_CQ).ok_or(err::NO_RESOURCES)?;
                let pages = read_page_directory(&self.dma, c.pdir_dma, u64::from(c.nchunks))?;
                self.cqs.insert(
                    handle,
                    CompletionQueue {
                        context: c.ctx_handle,
                        entries: c.cqe,
                        pages,
                        armed: None,
                    },
                );
                put(out, &[handle, c.cqe]);
            }
            cmd::RESIZE_CQ => {
                let cq = self.cqs.get(&a0).ok_or(err::NOT_FOUND)?;
                // The driver never resizes (no resize_cq verb); only a same-size resize fits
                // the pages it gave.
                if a1 != cq.entries {
                    return Err(err::INVALID);
                }
                put(out, &[a1]);
            }
            cmd::DESTROY_CQ => {
                if self
                    .qps
                    .values()
                    .any(|q| q.send_cq == a0 || q.recv_cq == a0)
                {
                    return Err(err::INVALID);
                }
                self.cqs.remove(&a0).ok_or(err::NOT_FOUND)?;
            }
            cmd::CREATE_QP => self.create_qp(req, out)?,
            cmd::MODIFY_QP => {
                let m: ModifyQp = parse(req)?;
                self.modify_qp(m.qp_handle, m.attr_mask, &m.attrs)?;
            }
            cmd::QUERY_QP => {
                let qp = self.qps.get(&a0).ok_or(err::NOT_FOUND)?;
                out[..160].copy_from_slice(qp.attr.as_bytes());
            }
            cmd::DESTROY_QP => {
                self.qps.remove(&a0).ok_or(err::NOT_FOUND)?;
                put(out, &[0]);
            }
            cmd::CREATE_SRQ => {
                let c: CreateSrq = parse(req)?;
                if !self.pds.contains_key(&c.pd_handle) {
                    return Err(err::NOT_FOUND);
                }
                let a = c.attrs;
                // IB_SRQT_BASIC only; the provider rounds max_wr and max_sge to powers of two.
                if c.srq_type != 0
                    || !a.max_wr.is_power_of_two()
                    || a.max_wr > MAX_QP_WR
                    || !a.max_sge.is_power_of_two()
                    || a.max_sge > MAX_SGE
                    || a.srq_limit > a.max_wr
                {
                    return Err(err::INVALID);
                }
                let stride = (RQ_WQE_HDR_SIZE + 16 * u64::from(a.max_sge)).next_power_of_two();
                let needed = 1 + (u64::from(a.max_wr) * stride).div_ceil(PAGE_SIZE);
                if u64::from(c.nchunks) < needed || u64::from(c.nchunks) > abi::PAGE_DIR_MAX_PAGES {
                    return Err(err::INVALID);
                }
                let handle = lowest_free(&self.srqs, 0, MAX_SRQ).ok_or(err::NO_RESOURCES)?;
                let pages = read_page_directory(&self.dma, c.pdir_dma, u64::from(c.nchunks))?;
                self.srqs.insert(
                    handle,
                    SharedReceiveQueue {
                        pd: c.pd_handle,
                        pages,
                        attr: SrqAttr { reserved: 0, ..a },
                    },
                );
                put(out, &[handle]);
            }
            cmd::MODIFY_SRQ => {
                let m: ModifySrq = parse(req)?;
                let srq = self.srqs.get_mut(&m.srq_handle).ok_or(err::NOT_FOUND)?;
                if m.attr_mask & !SRQ_ATTR_LIMIT != 0 || m.attrs.srq_limit > srq.attr.max_wr {
                    return Err(err::INVALID);
                }
                if m.attr_mask & SRQ_ATTR_LIMIT != 0 {
                    srq.attr.srq_limit = m.attrs.srq_limit;
                }
            }
            cmd::QUERY_SRQ => {
                let srq = self.srqs.get(&a0).ok_or(err::NOT_FOUND)?;
                out[..16].copy_from_slice(srq.attr.as_bytes());
            }
            cmd::DESTROY_SRQ => {
                if self.qps.values().any(|q| q.srq == Some(a0)) {
                    // ib_core destroys the QPs first; a guest that does not gets refused.
                    return Err(err::INVALID);
                }
                self.srqs.remove(&a0).ok_or(err::NOT_FOUND)?;
            }
            cmd::CREATE_BIND => {
                let b: CreateBind = parse(req)?;
                if b.index >= GID_TABLE_LEN || b.vlan > 4095 {
                    return Err(err::INVALID);
                }
                self.gids.insert(
                    b.index,
                    Gid {
                        gid: b.new_gid,
                        gid_type: b.gid_type,
                        vlan: b.vlan,
                        mtu: b.mtu,
                    },
                );
            }
            cmd::DESTROY_BIND => {
                if a0 >= GID_TABLE_LEN {
                    return Err(err::INVALID);
                }
                self.gids.remove(&a0).ok_or(err::NOT_FOUND)?;
            }
            _ => return Err(err::UNSUPPORTED),
        }
        Ok(())
    }

    fn create_qp(&mut self, req: &[u8], out: &mut [u8]) -> Result<(), u32> {
        let c: CreateQp = parse(req)?;
        if !self.pds.contains_key(&c.pd_handle)
            || !self.cqs.contains_key(&c.send_cq_handle)
            || !self.cqs.contains_key(&c.recv_cq_handle)
        {
            return Err(err::NOT_FOUND);
        }
        if !matches!(c.qp_type, qp_type::GSI | qp_type::RC | qp_type::UD) {
            return Err(err::UNSUPPORTED);
        }
        let srq = match c.is_srq {
            0 => None,
            1 if self.srqs.contains_key(&c.srq_handle) => Some(c.srq_handle),
            1 => return Err(err::NOT_FOUND),
            _ => return Err(err::INVALID),
        };
        if c.max_send_wr == 0
            || c.max_send_wr > MAX_QP_WR
            || c.max_recv_wr > MAX_QP_WR
            || c.max_send_sge == 0
            || c.max_send_sge > MAX_SGE
            || c.max_recv_sge > MAX_SGE
            || c.max_inline_data != 0
        {
            return Err(err::INVALID);
        }
        // Ring-state page, send pages, receive pages (`pvrdma_create_qp`).
        let total = u64::from(c.total_chunks);
        let send = u64::from(c.send_chunks);
        let needed = |wr: u32, sge: u32, hdr: u64| {
            let stride = (hdr + 16 * u64::from(sge.max(1))).next_power_of_two();
            (u64::from(wr) * stride).div_ceil(PAGE_SIZE)
        };
        // With a shared receive queue the QP has no receive queue of its own (the provider
        // asks for 0 receive WRs and SGEs and gives no receive pages).
        let recv_pages = if srq.is_some() { 0 } else { 1 };
        if send == 0
            || total < send + 1 + recv_pages
            || send < needed(c.max_send_wr, c.max_send_sge, 80)
            || (srq.is_none() && total - 1 - send < needed(c.max_recv_wr, c.max_recv_sge, 16))
            || (srq.is_some() && (c.max_recv_wr != 0 || c.max_recv_sge != 0))
        {
            return Err(err::INVALID);
        }
        // The sizes come rounded up to powers of two (pvrdma_set_sq_size, the provider).
        if !c.max_send_wr.is_power_of_two()
            || !c.max_send_sge.is_power_of_two()
            || (srq.is_none()
                && (!c.max_recv_wr.is_power_of_two() || !c.max_recv_sge.is_power_of_two()))
        {
            return Err(err::INVALID);
        }
        // The QP number is the handle (the provider rings doorbells and matches CQEs by QP
        // number, the kernel by handle); QP1 is the GSI QP, ordinary QPs start at 2.
        let handle = if c.qp_type == qp_type::GSI {
            if self.qps.contains_key(&1) {
                return Err(err::NO_RESOURCES);
            }
            1
        } else {
            lowest_free(&self.qps, 2, MAX_QP).ok_or(err::NO_RESOURCES)?
        };
        let pages = read_page_directory(&self.dma, c.pdir_dma, total)?;
        let qpn = handle;
        let cap = QpCap {
            max_send_wr: c.max_send_wr,
            max_recv_wr: c.max_recv_wr,
            max_send_sge: c.max_send_sge,
            max_recv_sge: c.max_recv_sge,
            max_inline_data: 0,
            reserved: 0,
        };
        self.qps.insert(
            handle,
            QueuePair {
                qpn,
                kind: c.qp_type,
                pd: c.pd_handle,
                send_cq: c.send_cq_handle,
                recv_cq: c.recv_cq_handle,
                attr: QpAttr {
                    cap,
                    port_num: 1,
                    ..Default::default()
                },
                pages,
                send_pages: u32::from(c.send_chunks),
                sq_sig_all: c.sq_sig_all != 0,
                doorbells: (0, 0),
                rc: rc::RcState::default(),
                srq,
            },
        );
        // create_qp_resp_v2: qpn, qp_handle, then the capacities granted.
        for (i, w) in [
            qpn,
            handle,
            c.max_send_wr,
            c.max_recv_wr,
            c.max_send_sge,
            c.max_recv_sge,
            0,
        ]
        .iter()
        .enumerate()
        {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        Ok(())
    }

    fn modify_qp(&mut self, handle: u32, mask: u32, attrs: &QpAttr) -> Result<(), u32> {
        let qp = self.qps.get(&handle).ok_or(err::NOT_FOUND)?;
        if mask & !qp_mask::ALL != 0 {
            return Err(err::INVALID);
        }
        let mut a = qp.attr;
        if mask & qp_mask::STATE != 0 {
            if attrs.qp_state > qp_state::ERR || !transition_ok(a.qp_state, attrs.qp_state) {
                return Err(err::INVALID);
            }
            a.qp_state = attrs.qp_state;
        }
        if mask & qp_mask::PATH_MTU != 0 {
            if !(1..=5).contains(&attrs.path_mtu) {
                return Err(err::INVALID);
            }
            a.path_mtu = attrs.path_mtu;
        }
        if mask & qp_mask::AV != 0 {
            if u32::from(attrs.ah_attr.grh_sgid_index()) >= GID_TABLE_LEN {
                return Err(err::INVALID);
            }
            a.ah_attr = attrs.ah_attr;
        }
        if mask & qp_mask::PORT != 0 {
            if attrs.port_num != 1 {
                return Err(err::INVALID);
            }
            a.port_num = 1;
        }
        if mask & qp_mask::PKEY_INDEX != 0 && attrs.pkey_index != 0 {
            return Err(err::INVALID);
        }
        if mask & qp_mask::QKEY != 0 {
            a.qkey = attrs.qkey;
        }
        if mask & qp_mask::ACCESS_FLAGS != 0 {
            a.qp_access_flags = attrs.qp_access_flags;
        }
        if mask & qp_mask::RQ_PSN != 0 {
            a.rq_psn = attrs.rq_psn & 0xff_ffff;
        }
        if mask & qp_mask::SQ_PSN != 0 {
            a.sq_psn = attrs.sq_psn & 0xff_ffff;
        }
        if mask & qp_mask::DEST_QPN != 0 {
            a.dest_qp_num = attrs.dest_qp_num & 0xff_ffff;
        }
        if mask & qp_mask::TIMEOUT != 0 {
            a.timeout = attrs.timeout.min(31);
        }
        if mask & qp_mask::RETRY_CNT != 0 {
            a.retry_cnt = attrs.retry_cnt.min(7);
        }
        if mask & qp_mask::RNR_RETRY != 0 {
            a.rnr_retry = attrs.rnr_retry.min(7);
        }
        if mask & qp_mask::MIN_RNR_TIMER != 0 {
            a.min_rnr_timer = attrs.min_rnr_timer.min(31);
        }
        if mask & qp_mask::MAX_QP_RD_ATOMIC != 0 {
            a.max_rd_atomic = attrs.max_rd_atomic.min(16);
        }
        if mask & qp_mask::MAX_DEST_RD_ATOMIC != 0 {
            a.max_dest_rd_atomic = attrs.max_dest_rd_atomic.min(16);
        }
        a.cur_qp_state = a.qp_state;
        if let Some(qp) = self.qps.get_mut(&handle) {
            let was = qp.attr.qp_state;
            qp.attr = a;
            if a.qp_state == qp_state::RESET {
                qp.rc = rc::RcState::default();
            }
            if a.qp_state == qp_state::RTS && was != qp_state::RTS {
                qp.rc.arm(a.retry_cnt, a.rnr_retry, a.sq_psn);
            }
            if a.qp_state == qp_state::ERR && was != qp_state::ERR {
                self.enter_error(handle);
            }
        }
        Ok(())
    }

    /// A UAR doorbell (BAR 2: page `page`, offset `offset`).
    /// Handles are device-wide, so the page (the driver's or a context's) does not matter.
    fn doorbell(&mut self, _page: u64, offset: u64, value: u32) {
        let handle = value & uar::HANDLE_MASK;
        match offset {
            uar::QP_OFFSET => {
                if let Some(qp) = self.qps.get_mut(&handle) {
                    if value & uar::QP_SEND != 0 {
                        qp.doorbells.0 += 1;
                    }
                    if value & uar::QP_RECV != 0 {
                        qp.doorbells.1 += 1;
                    }
                    let in_error = qp.attr.qp_state == qp_state::ERR;
                    if value & uar::QP_SEND != 0 {
                        self.process_send_queue(handle);
                    }
                    // Receive WQEs posted to a QP in error flush at once (IBA 10.3.1).
                    if value & uar::QP_RECV != 0 && in_error {
                        self.flush_ring(handle, true);
                    }
                }
            }
            uar::CQ_OFFSET => {
                // CQ_POLL (the provider's empty poll) needs nothing: keep it trivial.
                if value & (uar::CQ_ARM | uar::CQ_ARM_SOL) != 0
                    && let Some(cq) = self.cqs.get_mut(&handle)
                {
                    cq.armed = Some(value & uar::CQ_ARM_SOL != 0);
                }
            }
            _ => {}
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DSRLOW => self.dsr = (self.dsr & !0xffff_ffff) | u64::from(value),
            reg::DSRHIGH => {
                self.dsr = (self.dsr & 0xffff_ffff) | u64::from(value) << 32;
                self.load_shared_region();
            }
            reg::CTL => match value {
                0 => {
                    self.err = if self.head.cmd_slot_dma != 0 && self.head.resp_slot_dma != 0 {
                        self.active = true;
                        log::info!("pvrdma: activated");
                        0
                    } else {
                        err::NOT_READY
                    };
                }
                1 => self.err = 0,
                2 => {
                    self.reset();
                    self.err = 0;
                }
                _ => self.err = err::INVALID,
            },
            reg::REQUEST => self.request(),
            reg::IMR => self.set_imr(value),
            reg::MACL => self.mac[..4].copy_from_slice(&value.to_le_bytes()),
            reg::MACH => self.mac[4..].copy_from_slice(&value.to_le_bytes()[..2]),
            _ => {}
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::VERSION => abi::VERSION_QPHANDLE,
            reg::ERR => self.err,
            reg::IMR => self.imr,
            reg::MACL => u32::from_le_bytes([self.mac[0], self.mac[1], self.mac[2], self.mac[3]]),
            reg::MACH => u32::from(u16::from_le_bytes([self.mac[4], self.mac[5]])),
            _ => 0,
        }
    }
}

impl AhAttr {
    /// The source GID index of the path.
    pub fn grh_sgid_index(&self) -> u8 {
        self.sgid_index
    }
}

fn read_struct<T: FromBytes + IntoBytes + KnownLayout + Immutable>(
    dma: &DmaSpace,
    addr: u64,
) -> Result<T, DmaError> {
    let mut v = T::new_zeroed();
    dma.read(addr, v.as_mut_bytes())?;
    Ok(v)
}

impl PciDevice for PvrdmaFunction {
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
        let value = match (bar, data.len(), offset % 4) {
            (1, 4, 0) => self.read_register(offset),
            _ => 0,
        };
        let n = data.len().min(4);
        data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
        data[n..].fill(0);
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if self.msix.bar_write(bar, offset, data) {
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes(bytes);
        match bar {
            1 => self.write_register(offset, value),
            2 => self.doorbell(offset / PAGE_SIZE, offset % PAGE_SIZE, value),
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
        "pvrdma"
    }
}

#[cfg(test)]
mod tests;
