//! vmxnet3 register map (`vmxnet3_defs.h`): BAR 0 holds the pass-through registers (interrupt
//! masks and the producer doorbells), BAR 1 the virtual-device registers (version selection,
//! the driver-shared address, the command register, MAC, event cause).

/// BAR 0: per-vector Interrupt Mask Register, `IMR + 8 * vector`.
pub const IMR: u64 = 0x0;
/// BAR 0: Tx producer index of queue q, `TXPROD + 8 * q`.
pub const TXPROD: u64 = 0x600;
/// BAR 0: Rx ring 0 producer index of queue q.
pub const RXPROD: u64 = 0x800;
/// BAR 0: Rx ring 1 producer index of queue q.
pub const RXPROD2: u64 = 0xa00;
/// Registers are 8 bytes apart.
pub const REG_ALIGN: u64 = 8;

/// BAR 1: Vmxnet3 Revision Report Selection (read: supported revisions; write: chosen one).
pub const VRRS: u64 = 0x00;
/// BAR 1: UPT Version Report Selection.
pub const UVRS: u64 = 0x08;
/// BAR 1: Driver Shared Address Low.
pub const DSAL: u64 = 0x10;
/// BAR 1: Driver Shared Address High.
pub const DSAH: u64 = 0x18;
/// BAR 1: Command (write: run; read: the last command's result).
pub const CMD: u64 = 0x20;
/// BAR 1: MAC address, bytes 0..4.
pub const MACL: u64 = 0x28;
/// BAR 1: MAC address, bytes 4..6.
pub const MACH: u64 = 0x30;
/// BAR 1: Interrupt Cause Register (INTx only).
pub const ICR: u64 = 0x38;
/// BAR 1: Event Cause Register (write 1s to acknowledge `DriverShared.ecr` bits).
pub const ECR: u64 = 0x40;

/// Revisions offered in VRRS: revision 1 only (the driver then runs its version-1 paths: no
/// Rx data ring, no coalescing or RSS-field commands, no large BAR).
pub const SUPPORTED_REVISIONS: u32 = 1;
/// UPT versions offered in UVRS.
pub const SUPPORTED_UPT_VERSIONS: u32 = 1;

/// Commands (`VMXNET3_CMD_*`).
pub mod cmd {
    /// Read the driver-shared area and start the queues.
    pub const ACTIVATE_DEV: u32 = 0xcafe_0000;
    /// Stop the queues.
    pub const QUIESCE_DEV: u32 = 0xcafe_0001;
    /// Back to the state before activation.
    pub const RESET_DEV: u32 = 0xcafe_0002;
    /// Re-read `rxFilterConf.rxMode`.
    pub const UPDATE_RX_MODE: u32 = 0xcafe_0003;
    /// Last of the SET commands this device knows (`VMXNET3_CMD_SET_RING_BUFFER_SIZE`).
    pub const LAST_SET: u32 = 0xcafe_0013;
    /// Queue status into the queue descriptors.
    pub const GET_QUEUE_STATUS: u32 = 0xf00d_0000;
    /// Counters into the queue descriptors.
    pub const GET_STATS: u32 = 0xf00d_0001;
    /// Link state: `speed << 16 | up`.
    pub const GET_LINK: u32 = 0xf00d_0002;
    /// Permanent MAC, bytes 0..4.
    pub const GET_PERM_MAC_LO: u32 = 0xf00d_0003;
    /// Permanent MAC, bytes 4..6.
    pub const GET_PERM_MAC_HI: u32 = 0xf00d_0004;
    /// Device ID.
    pub const GET_DID_LO: u32 = 0xf00d_0005;
    /// Device revision.
    pub const GET_DID_HI: u32 = 0xf00d_0006;
    /// Extra device information.
    pub const GET_DEV_EXTRA_INFO: u32 = 0xf00d_0007;
    /// Interrupt configuration: type (bits 1:0) and mask mode (bits 3:2).
    pub const GET_CONF_INTR: u32 = 0xf00d_0008;
}

/// `VMXNET3_LINK_UP`: 10 Gbit/s, up.
pub const LINK_UP: u32 = 10000 << 16 | 1;

/// GET_CONF_INTR: MSI-X (`VMXNET3_IT_MSIX` = 3), the driver masks a vector itself while it
/// handles it (`VMXNET3_IMM_ACTIVE` = 1 in bits 3:2).
pub const CONF_INTR_MSIX_ACTIVE_MASK: u32 = 3 | 1 << 2;

/// Event cause bits (`VMXNET3_ECR_*`).
pub mod ecr {
    /// An Rx queue stopped on an error.
    pub const RQERR: u32 = 1 << 0;
    /// A Tx queue stopped on an error.
    pub const TQERR: u32 = 1 << 1;
    /// The link state changed.
    pub const LINK: u32 = 1 << 2;
}

/// Queue stop reasons (`VMXNET3_ERR_*`), reported by GET_QUEUE_STATUS.
pub mod queue_error {
    /// No EOP descriptor within the ring.
    pub const NOEOP: u32 = 0x8000_0000;
    /// Too many descriptors for one packet.
    pub const BIG_PKT: u32 = 0x8000_0002;
    /// Descriptor type not supported.
    pub const DESC_NOT_SPT: u32 = 0x8000_0003;
    /// Head buffer too small.
    pub const SMALL_BUF: u32 = 0x8000_0004;
    /// Invalid descriptor (address the device cannot reach).
    pub const TXD_INVALID: u32 = 0x8000_0007;
}

/// Rx filter modes (`VMXNET3_RXM_*`).
pub mod rx_mode {
    /// Unicast to the station address.
    pub const UCAST: u32 = 0x01;
    /// Multicast passing the filter table.
    pub const MCAST: u32 = 0x02;
    /// Broadcast.
    pub const BCAST: u32 = 0x04;
    /// Every multicast.
    pub const ALL_MULTI: u32 = 0x08;
    /// Everything.
    pub const PROMISC: u32 = 0x10;
}
