//! The guest-memory structures of the vmxnet3 ABI (`drivers/net/vmxnet3/vmxnet3_defs.h`,
//! little-endian layout), parsed with `zerocopy`: the driver-shared area the device reads on
//! ACTIVATE_DEV, the per-queue descriptors, and the 16-byte ring descriptors. Offsets and sizes
//! are checked at compile time against what gcc lays out for the kernel's header.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `VMXNET3_REV1_MAGIC`: `DriverShared.magic`.
pub const REV1_MAGIC: u32 = 3_133_079_265;

/// Offset of `devRead` (a [`MiscConf`], then [`IntrConf`], then the rx filter) in
/// `struct Vmxnet3_DriverShared`.
pub const SHARED_DEV_READ: u64 = 8;
/// Offset of `devRead.intrConf`.
pub const SHARED_INTR_CONF: u64 = SHARED_DEV_READ + 72;
/// Offset of `devRead.rxFilterConf` (its first field is `rxMode`).
pub const SHARED_RX_FILTER: u64 = SHARED_DEV_READ + 112;
/// Offset of `ecr`, the event cause the device reports and the driver acknowledges.
pub const SHARED_ECR: u64 = 696;
/// Size of `struct Vmxnet3_DriverShared`.
pub const SHARED_SIZE: u64 = 800;

/// Size of one queue descriptor (`Vmxnet3_TxQueueDesc` / `Vmxnet3_RxQueueDesc`).
pub const QUEUE_DESC_SIZE: u64 = 256;
/// Offset of `conf` in a queue descriptor.
pub const QUEUE_DESC_CONF: u64 = 16;
/// Offset of `status` in a queue descriptor.
pub const QUEUE_DESC_STATUS: u64 = 80;
/// Offset of `stats` in a queue descriptor.
pub const QUEUE_DESC_STATS: u64 = 88;

/// `struct Vmxnet3_MiscConf` (with its `Vmxnet3_DriverInfo`).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MiscConf {
    /// Driver version.
    pub driver_version: u32,
    /// Guest OS info bitfield.
    pub gos: u32,
    /// Revisions the driver supports.
    pub vmxnet3_rev_spt: u32,
    /// UPT versions the driver supports.
    pub upt_ver_spt: u32,
    /// UPT1_F_* features the driver enabled.
    pub upt_features: u64,
    /// Driver data (opaque to the device).
    pub dd_pa: u64,
    /// The array of Tx then Rx queue descriptors.
    pub queue_desc_pa: u64,
    /// Driver data length.
    pub dd_len: u32,
    /// Length of the queue descriptor array in bytes.
    pub queue_desc_len: u32,
    /// MTU.
    pub mtu: u32,
    /// Most Rx buffers per packet.
    pub max_num_rx_sg: u16,
    /// Tx queues in use.
    pub num_tx_queues: u8,
    /// Rx queues in use.
    pub num_rx_queues: u8,
    /// Reserved.
    pub reserved: [u32; 4],
}
const _: () = assert!(size_of::<MiscConf>() == 72);

/// `struct Vmxnet3_IntrConf`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct IntrConf {
    /// The device masks a vector itself when it fires (`VMXNET3_IMM_AUTO`).
    pub auto_mask: u8,
    /// Vectors in use.
    pub num_intrs: u8,
    /// The vector of device events (link, queue errors).
    pub event_intr_idx: u8,
    /// Moderation level per vector.
    pub mod_levels: [u8; 25],
    /// `VMXNET3_IC_DISABLE_ALL` (bit 0).
    pub intr_ctrl: u32,
    /// Reserved.
    pub reserved: [u32; 2],
}
const _: () = assert!(size_of::<IntrConf>() == 40);

/// `struct Vmxnet3_TxQueueConf`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct TxQueueConf {
    /// Tx descriptor ring.
    pub tx_ring_base_pa: u64,
    /// Tx data ring (header copies the SOP descriptor points into).
    pub data_ring_base_pa: u64,
    /// Tx completion ring.
    pub comp_ring_base_pa: u64,
    /// Driver data.
    pub dd_pa: u64,
    /// Reserved.
    pub reserved: u64,
    /// Tx descriptors.
    pub tx_ring_size: u32,
    /// Data ring entries.
    pub data_ring_size: u32,
    /// Completion descriptors.
    pub comp_ring_size: u32,
    /// Driver data length.
    pub dd_len: u32,
    /// MSI-X vector of the queue's completions.
    pub intr_idx: u8,
    /// Padding.
    pub pad1: u8,
    /// Data ring entry size (version 3 and later; 0 = 128).
    pub tx_data_ring_desc_size: u16,
    /// Padding.
    pub pad2: [u8; 4],
}
const _: () = assert!(size_of::<TxQueueConf>() == 64);

/// `struct Vmxnet3_RxQueueConf`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RxQueueConf {
    /// Rx descriptor rings: 0 holds head buffers, 1 body buffers.
    pub rx_ring_base_pa: [u64; 2],
    /// Rx completion ring.
    pub comp_ring_base_pa: u64,
    /// Driver data.
    pub dd_pa: u64,
    /// Rx data ring (version 3 and later).
    pub rx_data_ring_base_pa: u64,
    /// Descriptors of each ring.
    pub rx_ring_size: [u32; 2],
    /// Completion descriptors.
    pub comp_ring_size: u32,
    /// Driver data length.
    pub dd_len: u32,
    /// MSI-X vector of the queue's completions.
    pub intr_idx: u8,
    /// Padding.
    pub pad1: u8,
    /// Rx data ring entry size.
    pub rx_data_ring_desc_size: u16,
    /// Padding.
    pub pad2: [u8; 4],
}
const _: () = assert!(size_of::<RxQueueConf>() == 64);

/// `struct Vmxnet3_QueueStatus`, written on GET_QUEUE_STATUS.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct QueueStatus {
    /// The queue stopped on an error.
    pub stopped: u8,
    /// Padding.
    pub pad: [u8; 3],
    /// `VMXNET3_ERR_*`.
    pub error: u32,
}

/// `struct UPT1_TxStats` / `UPT1_RxStats` (same shape: ten counters), written on GET_STATS.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct QueueStats {
    /// Tx: TSO packets after segmentation; Rx: LRO packets.
    pub offload_pkts: u64,
    /// Tx: TSO bytes; Rx: LRO bytes.
    pub offload_bytes: u64,
    /// Unicast packets.
    pub ucast_pkts: u64,
    /// Unicast bytes.
    pub ucast_bytes: u64,
    /// Multicast packets.
    pub mcast_pkts: u64,
    /// Multicast bytes.
    pub mcast_bytes: u64,
    /// Broadcast packets.
    pub bcast_pkts: u64,
    /// Broadcast bytes.
    pub bcast_bytes: u64,
    /// Tx: errors; Rx: packets dropped for want of a buffer.
    pub errors_or_out_of_buf: u64,
    /// Tx: discarded; Rx: errors.
    pub discard_or_errors: u64,
}
const _: () = assert!(size_of::<QueueStats>() == 80);

/// A Tx descriptor (`struct Vmxnet3_TxDesc`): buffer address, then two bitfield words.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct TxDesc {
    /// Buffer address (an IOVA).
    pub addr: u64,
    /// len:14, gen:1, oco:1, dtype:1, ext1:1, msscof:14.
    pub dword2: u32,
    /// hlen:10, om:2, eop:1, cq:1, ext2:1, ti:1, tci:16.
    pub dword3: u32,
}

/// Offload modes (`TxDesc.om`).
pub mod offload_mode {
    /// No offload.
    pub const NONE: u8 = 0;
    /// Encapsulated offload (version 4 and later).
    pub const ENCAP: u8 = 1;
    /// Checksum: `hlen` is where summing starts, `msscof` where the sum goes.
    pub const CSUM: u8 = 2;
    /// TCP segmentation: `hlen` is the full header length, `msscof` the MSS.
    pub const TSO: u8 = 3;
}

impl TxDesc {
    /// Buffer length; 0 means 16 KiB (`VMXNET3_MAX_TX_BUF_SIZE`).
    pub fn buffer_len(&self) -> u32 {
        match self.dword2 & 0x3fff {
            0 => 1 << 14,
            n => n,
        }
    }
    /// Generation bit.
    pub fn gen_bit(&self) -> bool {
        self.dword2 & (1 << 14) != 0
    }
    /// Descriptor type (must be 0).
    pub fn dtype(&self) -> bool {
        self.dword2 & (1 << 16) != 0
    }
    /// MSS (TSO) or checksum offset (CSUM).
    pub fn msscof(&self) -> u32 {
        self.dword2 >> 18
    }
    /// Header length (TSO) or checksum start (CSUM).
    pub fn hlen(&self) -> u32 {
        self.dword3 & 0x3ff
    }
    /// Offload mode ([`offload_mode`]).
    pub fn om(&self) -> u8 {
        ((self.dword3 >> 10) & 3) as u8
    }
    /// End of packet.
    pub fn eop(&self) -> bool {
        self.dword3 & (1 << 12) != 0
    }
    /// Insert the VLAN tag `tci`.
    pub fn ti(&self) -> bool {
        self.dword3 & (1 << 15) != 0
    }
    /// VLAN tag control information to insert.
    pub fn tci(&self) -> u16 {
        (self.dword3 >> 16) as u16
    }
}

/// A Tx completion descriptor (`struct Vmxnet3_TxCompDesc`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct TxCompDesc {
    /// txdIdx:12 (the EOP descriptor), ext1:20.
    pub dword0: u32,
    /// Reserved.
    pub ext2: u32,
    /// Reserved.
    pub ext3: u32,
    /// rsvd:24, type:7, gen:1.
    pub dword3: u32,
}

impl TxCompDesc {
    /// The completion of the packet whose EOP descriptor is `eop_index`.
    pub fn new(eop_index: u32, generation: bool) -> Self {
        TxCompDesc {
            dword0: eop_index & 0xfff,
            ext2: 0,
            ext3: 0,
            dword3: u32::from(COMP_TYPE_TX) << 24 | u32::from(generation) << 31,
        }
    }
}

/// `VMXNET3_CDTYPE_TXCOMP`.
pub const COMP_TYPE_TX: u8 = 0;
/// `VMXNET3_CDTYPE_RXCOMP`.
pub const COMP_TYPE_RX: u8 = 3;

/// An Rx descriptor (`struct Vmxnet3_RxDesc`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct RxDesc {
    /// Buffer address (an IOVA).
    pub addr: u64,
    /// len:14, btype:1, dtype:1, rsvd:15, gen:1.
    pub dword2: u32,
    /// Reserved.
    pub ext1: u32,
}

impl RxDesc {
    /// Buffer length.
    pub fn buffer_len(&self) -> u32 {
        self.dword2 & 0x3fff
    }
    /// Body buffer (`VMXNET3_RXD_BTYPE_BODY`) rather than head.
    pub fn is_body(&self) -> bool {
        self.dword2 & (1 << 14) != 0
    }
    /// Generation bit.
    pub fn gen_bit(&self) -> bool {
        self.dword2 & (1 << 31) != 0
    }
}

/// An Rx completion descriptor (`struct Vmxnet3_RxCompDesc`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct RxCompDesc {
    /// rxdIdx:12, ext1:2, eop:1, sop:1, rqID:10, rssType:4, cnc:1, ext2:1.
    pub dword0: u32,
    /// RSS hash.
    pub rss_hash: u32,
    /// len:14, err:1, ts:1, tci:16.
    pub dword2: u32,
    /// csum:16, tuc, udp, tcp, ipc, v6, v4, frg, fcs, type:7, gen:1.
    pub dword3: u32,
}

impl RxCompDesc {
    /// A completion for `len` bytes in descriptor `rxd_index` of ring `rq_id`; the checksum is
    /// left for the guest to verify (`cnc`).
    pub fn new(
        rxd_index: u32,
        rq_id: u32,
        len: u32,
        sop: bool,
        eop: bool,
        generation: bool,
    ) -> Self {
        RxCompDesc {
            dword0: (rxd_index & 0xfff)
                | u32::from(eop) << 14
                | u32::from(sop) << 15
                | (rq_id & 0x3ff) << 16
                | 1 << 30,
            rss_hash: 0,
            dword2: len & 0x3fff,
            dword3: u32::from(COMP_TYPE_RX) << 24 | u32::from(generation) << 31,
        }
    }
}

const _: () = assert!(size_of::<TxDesc>() == 16);
const _: () = assert!(size_of::<TxCompDesc>() == 16);
const _: () = assert!(size_of::<RxDesc>() == 16);
const _: () = assert!(size_of::<RxCompDesc>() == 16);

/// Size of every ring descriptor.
pub const DESC_SIZE: u64 = 16;
