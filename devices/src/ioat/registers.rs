//! The Crystal Beach 3 register map of an Intel I/OAT DMA function (BAR 0), as the kernel's
//! `drivers/dma/ioat/registers.h` and the VFIO selftests' `lib/drivers/ioat/` use it: the
//! device-wide registers in the first 0x80 bytes, then one 0x80-byte block per channel (channel
//! `i` at `0x80 * (i + 1)`, `ioat_init_channel()`), and the PCI config registers the driver
//! reads and clears (`ioat_reset_hw()`, `ioat_eh()`).

/// Device-wide registers (offsets into BAR 0).
pub mod device {
    /// Channel count, bits 4:0 (8-bit, RO).
    pub const CHANCNT: u64 = 0x00;
    /// Maximum transfer size per descriptor as log2 bytes, bits 4:0 (8-bit, RO).
    pub const XFERCAP: u64 = 0x01;
    /// General control (8-bit; bit 0 debug enable).
    pub const GENCTRL: u64 = 0x02;
    /// Interrupt control (8-bit).
    pub const INTRCTRL: u64 = 0x03;
    /// Attention status: a bit per channel with an interrupt pending (32-bit, read-clear).
    pub const ATTNSTATUS: u64 = 0x04;
    /// Crystal Beach version, major in bits 7:4 (8-bit, RO).
    pub const CBVER: u64 = 0x08;
    /// Offset of the per-port registers (16-bit, RO, 0: none).
    pub const PERPORTOFFSET: u64 = 0x0a;
    /// Interrupt delay / coalescing (16-bit; bit 15 RO "coalescing supported").
    pub const INTRDELAY: u64 = 0x0c;
    /// Device status (16-bit, RO).
    pub const DEVICE_STATUS: u64 = 0x0e;
    /// DMA capabilities (32-bit, RO).
    pub const DMA_CAP: u64 = 0x10;
    /// Offset of the DCA registers (16-bit, RO; 0 = no DCA, `ioat_dca_init()` gives up).
    pub const DCAOFFSET: u64 = 0x14;
    /// Descriptor prefetch limit (8-bit; only with `DMA_CAP` DPS).
    pub const PREFETCH_LIMIT: u64 = 0x4c;

    /// INTRCTRL: master interrupt enable.
    pub const INTRCTRL_MASTER_INT_EN: u8 = 0x01;
    /// INTRCTRL: an attention bit is set (RO).
    pub const INTRCTRL_INT_STATUS: u8 = 0x02;
    /// INTRCTRL: INT_STATUS and MASTER_INT_EN (RO).
    pub const INTRCTRL_INT: u8 = 0x04;
    /// INTRCTRL: per-channel MSI-X vectors.
    pub const INTRCTRL_MSIX_VECTOR_CONTROL: u8 = 0x08;

    /// CBVER of a Skylake-X CBDMA function: 3.3 (`ioat_pci_probe()` then runs it as 3.2).
    pub const VERSION_3_3: u8 = 0x33;
}

/// Per-channel registers (offsets into a channel's 0x80-byte block).
pub mod channel {
    /// Size of a channel's register block; channel `i` starts at `BLOCK * (i + 1)`.
    pub const BLOCK: u64 = 0x80;
    /// Channel control (16-bit).
    pub const CHANCTRL: u64 = 0x00;
    /// DMA compatibility (16-bit, RO).
    pub const DMA_COMP: u64 = 0x02;
    /// Channel command (8-bit, CB2+ layout).
    pub const CHANCMD: u64 = 0x04;
    /// Descriptor count doorbell (16-bit, CB2+).
    pub const DMACOUNT: u64 = 0x06;
    /// Channel status (64-bit, RO): last completed descriptor address | status.
    pub const CHANSTS: u64 = 0x08;
    /// Descriptor chain address (64-bit, CB2+).
    pub const CHAINADDR: u64 = 0x10;
    /// Completion writeback address (64-bit).
    pub const CHANCMP: u64 = 0x18;
    /// Current descriptor address (64-bit, RO).
    pub const CDAR: u64 = 0x20;
    /// Channel error (32-bit, write 1 to clear).
    pub const CHANERR: u64 = 0x28;
    /// Channel error mask (32-bit).
    pub const CHANERR_MASK: u64 = 0x2c;
    /// DCA control (32-bit; stored, no DCA behind it).
    pub const DCACTRL: u64 = 0x30;

    /// CHANCTRL: re-arm the completion interrupt.
    pub const CHANCTRL_INT_REARM: u16 = 0x0001;
    /// CHANCTRL: write the completion status on an error.
    pub const CHANCTRL_ERR_COMPLETION_EN: u16 = 0x0004;
    /// CHANCTRL: abort on any error.
    pub const CHANCTRL_ANY_ERR_ABORT_EN: u16 = 0x0008;
    /// CHANCTRL: interrupt on an error.
    pub const CHANCTRL_ERR_INT_EN: u16 = 0x0010;
    /// CHANCTRL bits that are stored (priority, DCA, in-use, snoop control, the enables).
    pub const CHANCTRL_WRITABLE: u16 = 0xf33d;

    /// CHANCMD: reset the channel (reads 1 until done; done at once here).
    pub const CHANCMD_RESET: u8 = 0x20;
    /// CHANCMD: resume a suspended channel.
    pub const CHANCMD_RESUME: u8 = 0x10;
    /// CHANCMD: abort the current chain.
    pub const CHANCMD_ABORT: u8 = 0x08;
    /// CHANCMD: suspend after the current descriptor.
    pub const CHANCMD_SUSPEND: u8 = 0x04;
    /// CHANCMD: append (CB1 chaining; CB2+ drivers use DMACOUNT).
    pub const CHANCMD_APPEND: u8 = 0x02;
    /// CHANCMD: start (CB1 chaining).
    pub const CHANCMD_START: u8 = 0x01;

    /// CHANSTS status field: active.
    pub const STATUS_ACTIVE: u64 = 0;
    /// CHANSTS status field: done (idle, all issued descriptors completed).
    pub const STATUS_DONE: u64 = 1;
    /// CHANSTS status field: suspended.
    pub const STATUS_SUSPENDED: u64 = 2;
    /// CHANSTS status field: halted (after reset or an error).
    pub const STATUS_HALTED: u64 = 3;
    /// CHANSTS: the completed-descriptor address bits.
    pub const CHANSTS_ADDRESS_MASK: u64 = !0x3f;
}

/// CHANERR bits (`chanerr_str[]` in `drivers/dma/ioat/dma.c`).
pub mod chanerr {
    /// DMA transfer source address error.
    pub const SRC_ADDR: u32 = 0x0001;
    /// DMA transfer destination address error.
    pub const DEST_ADDR: u32 = 0x0002;
    /// Next descriptor address error (a descriptor could not be fetched).
    pub const NEXT_ADDR: u32 = 0x0004;
    /// Next descriptor alignment error.
    pub const NEXT_DESC_ALIGN: u32 = 0x0008;
    /// Chain address value error (CHAINADDR not 64-byte aligned).
    pub const CHAIN_ADDR_VALUE: u32 = 0x0010;
    /// Read data error (a source read failed: `ioat_eh()` completes it as READ_FAILED).
    pub const READ_DATA: u32 = 0x0100;
    /// Write data error (a destination write failed: WRITE_FAILED).
    pub const WRITE_DATA: u32 = 0x0200;
    /// Descriptor control error (an operation this engine does not implement).
    pub const CONTROL: u32 = 0x0400;
    /// Descriptor transfer size error (0, or above XFERCAP).
    pub const LENGTH: u32 = 0x0800;
    /// Completion address error (the writeback failed).
    pub const COMPLETION_ADDR: u32 = 0x1000;
    /// Every bit this model sets.
    pub const IMPLEMENTED: u32 = SRC_ADDR
        | DEST_ADDR
        | NEXT_ADDR
        | NEXT_DESC_ALIGN
        | CHAIN_ADDR_VALUE
        | READ_DATA
        | WRITE_DATA
        | CONTROL
        | LENGTH
        | COMPLETION_ADDR;
}

/// Registers in the function's PCI config space.
pub mod config {
    /// DMA uncorrectable error status (32-bit, write 1 to clear).
    pub const DMAUNCERRSTS: u16 = 0x148;
    /// Channel error, internal (32-bit, write 1 to clear).
    pub const CHANERR_INT: u16 = 0x180;
    /// Channel error mask, internal (32-bit).
    pub const CHANERRMASK_INT: u16 = 0x184;
}
