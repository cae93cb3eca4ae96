//! The PVRDMA device ABI (`drivers/infiniband/hw/vmw_pvrdma/pvrdma_dev_api.h`,
//! `pvrdma_verbs.h`, `pvrdma_ring.h`), parsed with `zerocopy`: the device shared region, the
//! capabilities the device fills in, the command and response slots, port and QP attributes,
//! and the event/notification rings. Sizes are checked at compile time against what gcc lays
//! out for the kernel's headers.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Device versions (`PVRDMA_*_VERSION`): 20 reports a QP handle next to the QPN.
pub const VERSION_QPHANDLE: u32 = 20;
/// RoCE mode (`PVRDMA_DEVICE_MODE_ROCE`).
pub const MODE_ROCE: u8 = 0;
/// RoCE v2 GIDs only (`PVRDMA_GID_TYPE_FLAG_ROCE_V2`).
pub const GID_TYPE_FLAG_ROCE_V2: u8 = 1 << 1;
/// Pages per page table and tables per directory (`PVRDMA_PTABLE_SHIFT` = 9).
pub const PAGE_DIR_ENTRIES: u64 = 512;
/// Most pages a page directory maps (`PVRDMA_PAGE_DIR_MAX_PAGES`: 1 GiB).
pub const PAGE_DIR_MAX_PAGES: u64 = 512 * 512;
/// Page size of rings, page directories and MR pages.
pub const PAGE_SIZE: u64 = 4096;

/// `struct pvrdma_ring_page_info`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RingPageInfo {
    /// Pages including the ring-state page.
    pub num_pages: u32,
    /// Reserved.
    pub reserved: u32,
    /// Page directory address.
    pub pdir_dma: u64,
}

/// The driver-written head of `struct pvrdma_device_shared_region` (packed; the capabilities
/// the device writes follow at [`DSR_CAPS`]).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SharedRegionHead {
    /// Driver version.
    pub driver_version: u32,
    /// Padding.
    pub pad: u32,
    /// Guest OS information.
    pub gos_info: [u32; 2],
    /// Command slot address.
    pub cmd_slot_dma: u64,
    /// Response slot address.
    pub resp_slot_dma: u64,
    /// Async event ring.
    pub async_ring_pages: RingPageInfo,
    /// CQ notification ring.
    pub cq_ring_pages: RingPageInfo,
    /// The driver's UAR page frame (64-bit from version 19).
    pub uar_pfn64: u64,
}
const _: () = assert!(size_of::<SharedRegionHead>() == 72);

/// Offset of the capabilities in the shared region.
pub const DSR_CAPS: u64 = 72;

/// `struct pvrdma_device_caps` (208 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DeviceCaps {
    /// Firmware version.
    pub fw_ver: u64,
    /// Node GUID (big endian).
    pub node_guid: u64,
    /// System image GUID (big endian).
    pub sys_image_guid: u64,
    /// Largest MR.
    pub max_mr_size: u64,
    /// Supported page sizes (bit mask).
    pub page_size_cap: u64,
    /// Extended verbs.
    pub atomic_arg_sizes: u64,
    /// Extended verbs.
    pub ex_comp_mask: u32,
    /// Extended verbs.
    pub device_cap_flags2: u32,
    /// Extended verbs.
    pub max_fa_bit_boundary: u32,
    /// Extended verbs.
    pub log_max_atomic_inline_arg: u32,
    /// PCI vendor ID.
    pub vendor_id: u32,
    /// Vendor part ID.
    pub vendor_part_id: u32,
    /// Hardware version.
    pub hw_ver: u32,
    /// Most QPs.
    pub max_qp: u32,
    /// Most work requests per queue.
    pub max_qp_wr: u32,
    /// IB_DEVICE_* flags.
    pub device_cap_flags: u32,
    /// Most SGEs per work request.
    pub max_sge: u32,
    /// Most SGEs per RDMA read.
    pub max_sge_rd: u32,
    /// Most CQs.
    pub max_cq: u32,
    /// Most CQEs per CQ.
    pub max_cqe: u32,
    /// Most MRs.
    pub max_mr: u32,
    /// Most PDs.
    pub max_pd: u32,
    /// Outstanding RDMA reads/atomics per QP as responder.
    pub max_qp_rd_atom: u32,
    /// Unused (EE).
    pub max_ee_rd_atom: u32,
    /// Outstanding reads/atomics as responder, device wide.
    pub max_res_rd_atom: u32,
    /// Outstanding reads/atomics per QP as requester.
    pub max_qp_init_rd_atom: u32,
    /// Unused (EE).
    pub max_ee_init_rd_atom: u32,
    /// Unused (EE).
    pub max_ee: u32,
    /// Unused.
    pub max_rdd: u32,
    /// Memory windows.
    pub max_mw: u32,
    /// Raw IPv6 QPs.
    pub max_raw_ipv6_qp: u32,
    /// Raw Ethernet QPs.
    pub max_raw_ethy_qp: u32,
    /// Multicast groups.
    pub max_mcast_grp: u32,
    /// QPs per multicast group.
    pub max_mcast_qp_attach: u32,
    /// Multicast attachments in total.
    pub max_total_mcast_qp_attach: u32,
    /// Most address handles.
    pub max_ah: u32,
    /// FMRs.
    pub max_fmr: u32,
    /// Maps per FMR.
    pub max_map_per_fmr: u32,
    /// Most SRQs (0: none, the driver then offers no SRQ verbs).
    pub max_srq: u32,
    /// Work requests per SRQ.
    pub max_srq_wr: u32,
    /// SGEs per SRQ work request.
    pub max_srq_sge: u32,
    /// UAR pages (BAR 2).
    pub max_uar: u32,
    /// GID table entries.
    pub gid_tbl_len: u32,
    /// P_Key table entries.
    pub max_pkeys: u16,
    /// Local CA ACK delay.
    pub local_ca_ack_delay: u8,
    /// Ports.
    pub phys_port_cnt: u8,
    /// `PVRDMA_DEVICE_MODE_*`.
    pub mode: u8,
    /// `PVRDMA_ATOMIC_OP_*`.
    pub atomic_ops: u8,
    /// `PVRDMA_BMME_FLAG_*`.
    pub bmme_flags: u8,
    /// `PVRDMA_GID_TYPE_FLAG_*`.
    pub gid_types: u8,
    /// Fast-register page list length.
    pub max_fast_reg_page_list_len: u32,
}
const _: () = assert!(size_of::<DeviceCaps>() == 208);

/// Size of the command and response unions (`union pvrdma_cmd_req` / `_resp`).
pub const CMD_SIZE: usize = 184;
/// Size of the response union.
pub const RESP_SIZE: usize = 176;

/// `struct pvrdma_cmd_hdr`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CmdHdr {
    /// Key the driver matches the response with.
    pub response: u64,
    /// `PVRDMA_CMD_*`.
    pub cmd: u32,
    /// Reserved.
    pub reserved: u32,
}

/// `struct pvrdma_cmd_resp_hdr`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RespHdr {
    /// From the command header.
    pub response: u64,
    /// `PVRDMA_CMD_*_RESP` (= command | 1 << 31).
    pub ack: u32,
    /// Error code (0 = success).
    pub err: u8,
    /// Reserved.
    pub reserved: [u8; 3],
}

/// Commands (`PVRDMA_CMD_*`).
pub mod cmd {
    /// Port attributes.
    pub const QUERY_PORT: u32 = 0;
    /// P_Key table entry.
    pub const QUERY_PKEY: u32 = 1;
    /// Protection domain.
    pub const CREATE_PD: u32 = 2;
    /// Protection domain.
    pub const DESTROY_PD: u32 = 3;
    /// Memory region.
    pub const CREATE_MR: u32 = 4;
    /// Memory region.
    pub const DESTROY_MR: u32 = 5;
    /// Completion queue.
    pub const CREATE_CQ: u32 = 6;
    /// Completion queue.
    pub const RESIZE_CQ: u32 = 7;
    /// Completion queue.
    pub const DESTROY_CQ: u32 = 8;
    /// Queue pair.
    pub const CREATE_QP: u32 = 9;
    /// Queue pair.
    pub const MODIFY_QP: u32 = 10;
    /// Queue pair.
    pub const QUERY_QP: u32 = 11;
    /// Queue pair.
    pub const DESTROY_QP: u32 = 12;
    /// User context (a UAR page).
    pub const CREATE_UC: u32 = 13;
    /// User context.
    pub const DESTROY_UC: u32 = 14;
    /// GID table entry.
    pub const CREATE_BIND: u32 = 15;
    /// GID table entry.
    pub const DESTROY_BIND: u32 = 16;
    /// Shared receive queue (user space only: `pvrdma_create_srq`).
    pub const CREATE_SRQ: u32 = 17;
    /// Shared receive queue: arm the limit.
    pub const MODIFY_SRQ: u32 = 18;
    /// Shared receive queue: attributes.
    pub const QUERY_SRQ: u32 = 19;
    /// Shared receive queue.
    pub const DESTROY_SRQ: u32 = 20;
    /// Last command number + 1.
    pub const MAX: u32 = 21;
    /// Responses carry the command with bit 31 set.
    pub const RESP: u32 = 1 << 31;
}

/// `struct pvrdma_port_attr`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct PortAttr {
    /// `PVRDMA_PORT_*` state.
    pub state: u32,
    /// Largest MTU (`PVRDMA_MTU_*`).
    pub max_mtu: u32,
    /// Active MTU.
    pub active_mtu: u32,
    /// GID table length.
    pub gid_tbl_len: u32,
    /// `PVRDMA_PORT_*` capability flags.
    pub port_cap_flags: u32,
    /// Largest message.
    pub max_msg_sz: u32,
    /// Bad P_Key counter.
    pub bad_pkey_cntr: u32,
    /// Q_Key violation counter.
    pub qkey_viol_cntr: u32,
    /// P_Key table length.
    pub pkey_tbl_len: u16,
    /// LID (0 on RoCE).
    pub lid: u16,
    /// SM LID.
    pub sm_lid: u16,
    /// LMC.
    pub lmc: u8,
    /// VLs.
    pub max_vl_num: u8,
    /// SM SL.
    pub sm_sl: u8,
    /// Subnet timeout.
    pub subnet_timeout: u8,
    /// Init type reply.
    pub init_type_reply: u8,
    /// Active width (IB_WIDTH_*).
    pub active_width: u8,
    /// Active speed (IB_SPEED_*).
    pub active_speed: u8,
    /// Physical state (5 = LinkUp, 3 = Disabled).
    pub phys_state: u8,
    /// Reserved.
    pub reserved: [u8; 2],
}
const _: () = assert!(size_of::<PortAttr>() == 48);

/// `struct pvrdma_ah_attr` (with its `pvrdma_global_route`).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct AhAttr {
    /// Destination GID.
    pub dgid: [u8; 16],
    /// Flow label.
    pub flow_label: u32,
    /// Source GID index.
    pub sgid_index: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub traffic_class: u8,
    /// Reserved.
    pub reserved0: u8,
    /// Destination LID.
    pub dlid: u16,
    /// VLAN ID.
    pub vlan_id: u16,
    /// Service level.
    pub sl: u8,
    /// Source path bits.
    pub src_path_bits: u8,
    /// Static rate.
    pub static_rate: u8,
    /// AH flags (GRH).
    pub ah_flags: u8,
    /// Port.
    pub port_num: u8,
    /// Destination MAC.
    pub dmac: [u8; 6],
    /// Reserved.
    pub reserved: u8,
}
const _: () = assert!(size_of::<AhAttr>() == 40);

/// `struct pvrdma_qp_cap`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct QpCap {
    /// Send queue depth.
    pub max_send_wr: u32,
    /// Receive queue depth.
    pub max_recv_wr: u32,
    /// SGEs per send WR.
    pub max_send_sge: u32,
    /// SGEs per receive WR.
    pub max_recv_sge: u32,
    /// Inline data (always 0).
    pub max_inline_data: u32,
    /// Reserved.
    pub reserved: u32,
}

/// `struct pvrdma_qp_attr` (160 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct QpAttr {
    /// `PVRDMA_QPS_*`.
    pub qp_state: u32,
    /// Current state (modify: what the driver believes).
    pub cur_qp_state: u32,
    /// Path MTU (`PVRDMA_MTU_*`).
    pub path_mtu: u32,
    /// Migration state.
    pub path_mig_state: u32,
    /// Q_Key (UD, GSI).
    pub qkey: u32,
    /// Receive PSN.
    pub rq_psn: u32,
    /// Send PSN.
    pub sq_psn: u32,
    /// Remote QPN (RC).
    pub dest_qp_num: u32,
    /// Remote access flags.
    pub qp_access_flags: u32,
    /// P_Key index.
    pub pkey_index: u16,
    /// Alternate P_Key index.
    pub alt_pkey_index: u16,
    /// SQ drained notification.
    pub en_sqd_async_notify: u8,
    /// SQ draining.
    pub sq_draining: u8,
    /// Outstanding reads as requester.
    pub max_rd_atomic: u8,
    /// Outstanding reads as responder.
    pub max_dest_rd_atomic: u8,
    /// RNR NAK timer.
    pub min_rnr_timer: u8,
    /// Port.
    pub port_num: u8,
    /// Local ACK timeout (4.096 µs × 2^timeout).
    pub timeout: u8,
    /// Retry count.
    pub retry_cnt: u8,
    /// RNR retry count.
    pub rnr_retry: u8,
    /// Alternate port.
    pub alt_port_num: u8,
    /// Alternate timeout.
    pub alt_timeout: u8,
    /// Reserved.
    pub reserved: [u8; 5],
    /// Capacities.
    pub cap: QpCap,
    /// Primary path.
    pub ah_attr: AhAttr,
    /// Alternate path.
    pub alt_ah_attr: AhAttr,
}
const _: () = assert!(size_of::<QpAttr>() == 160);

/// QP attribute mask bits (`PVRDMA_QP_*`).
pub mod qp_mask {
    /// `qp_state`.
    pub const STATE: u32 = 1 << 0;
    /// `qp_access_flags`.
    pub const ACCESS_FLAGS: u32 = 1 << 3;
    /// `pkey_index`.
    pub const PKEY_INDEX: u32 = 1 << 4;
    /// `port_num`.
    pub const PORT: u32 = 1 << 5;
    /// `qkey`.
    pub const QKEY: u32 = 1 << 6;
    /// `ah_attr`.
    pub const AV: u32 = 1 << 7;
    /// `path_mtu`.
    pub const PATH_MTU: u32 = 1 << 8;
    /// `timeout`.
    pub const TIMEOUT: u32 = 1 << 9;
    /// `retry_cnt`.
    pub const RETRY_CNT: u32 = 1 << 10;
    /// `rnr_retry`.
    pub const RNR_RETRY: u32 = 1 << 11;
    /// `rq_psn`.
    pub const RQ_PSN: u32 = 1 << 12;
    /// `max_rd_atomic`.
    pub const MAX_QP_RD_ATOMIC: u32 = 1 << 13;
    /// `min_rnr_timer`.
    pub const MIN_RNR_TIMER: u32 = 1 << 15;
    /// `sq_psn`.
    pub const SQ_PSN: u32 = 1 << 16;
    /// `max_dest_rd_atomic`.
    pub const MAX_DEST_RD_ATOMIC: u32 = 1 << 17;
    /// `dest_qp_num`.
    pub const DEST_QPN: u32 = 1 << 20;
    /// Every defined bit.
    pub const ALL: u32 = (1 << 21) - 1;
}

/// QP states (`PVRDMA_QPS_*`).
pub mod qp_state {
    /// Reset.
    pub const RESET: u32 = 0;
    /// Init.
    pub const INIT: u32 = 1;
    /// Ready to receive.
    pub const RTR: u32 = 2;
    /// Ready to send.
    pub const RTS: u32 = 3;
    /// Send queue drained.
    pub const SQD: u32 = 4;
    /// Send queue error.
    pub const SQE: u32 = 5;
    /// Error.
    pub const ERR: u32 = 6;
}

/// QP types (`PVRDMA_QPT_*`).
pub mod qp_type {
    /// General services (QP1).
    pub const GSI: u8 = 1;
    /// Reliable connected.
    pub const RC: u8 = 2;
    /// Unreliable datagram.
    pub const UD: u8 = 4;
}

/// Async event types (`PVRDMA_EVENT_*`).
pub mod event {
    /// QP fatal error.
    pub const QP_FATAL: u32 = 1;
    /// Port became active.
    pub const PORT_ACTIVE: u32 = 9;
    /// Port error (link down).
    pub const PORT_ERR: u32 = 10;
    /// An armed SRQ limit was reached (info: the SRQ handle).
    pub const SRQ_LIMIT_REACHED: u32 = 15;
}

/// `struct pvrdma_eqe`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Eqe {
    /// Event type.
    pub kind: u32,
    /// Handle or port.
    pub info: u32,
}

/// `struct pvrdma_ring`: producer tail and consumer head, each in [0, 2N) (the top bit is the
/// wrap generation; `pvrdma_ring.h`).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RingIndices {
    /// Producer tail.
    pub prod_tail: u32,
    /// Consumer head.
    pub cons_head: u32,
}

/// UAR doorbell offsets and bits (`vmw_pvrdma-abi.h`).
pub mod uar {
    /// QP doorbell.
    pub const QP_OFFSET: u64 = 0;
    /// CQ doorbell.
    pub const CQ_OFFSET: u64 = 4;
    /// SRQ doorbell.
    pub const SRQ_OFFSET: u64 = 8;
    /// Handle bits.
    pub const HANDLE_MASK: u32 = 0x00ff_ffff;
    /// QP: send queue has work.
    pub const QP_SEND: u32 = 1 << 30;
    /// QP: receive queue has work.
    pub const QP_RECV: u32 = 1 << 31;
    /// CQ: arm for solicited completions.
    pub const CQ_ARM_SOL: u32 = 1 << 29;
    /// CQ: arm.
    pub const CQ_ARM: u32 = 1 << 30;
    /// CQ: the provider polled an empty CQ.
    pub const CQ_POLL: u32 = 1 << 31;
}

/// `pvrdma_idx_valid()`: a ring index is in [0, 2 × `max_elems`).
pub fn ring_index_valid(index: u32, max_elems: u32) -> bool {
    index & !((max_elems << 1).wrapping_sub(1)) == 0
}

/// `pvrdma_idx_ring_has_space()`: the slot to produce into, `None` when full or corrupt.
pub fn ring_free_slot(ring: &RingIndices, max_elems: u32) -> Option<u32> {
    let (tail, head) = (ring.prod_tail, ring.cons_head);
    if !ring_index_valid(tail, max_elems) || !ring_index_valid(head, max_elems) {
        return None;
    }
    (tail != (head ^ max_elems)).then_some(tail & (max_elems - 1))
}

/// `pvrdma_idx_ring_inc()`.
pub fn ring_next(index: u32, max_elems: u32) -> u32 {
    index.wrapping_add(1) & ((max_elems << 1) - 1)
}
