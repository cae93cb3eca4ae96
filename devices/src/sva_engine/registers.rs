//! The SVA engine's BAR 0 register map (docs/sva-engine.md, "Registers"). Every register is
//! 64 bits wide; 32-bit accesses reach either half.

/// ID (RO): "SVAE" and the interface version.
pub const ID: u64 = 0x000;
/// CAPS (RO): operations, ATS/PRI presence, PASID width, largest ring.
pub const CAPS: u64 = 0x008;
/// CTRL (RW): ENABLE, RESET, INT_ENABLE.
pub const CTRL: u64 = 0x010;
/// STATUS (RO).
pub const STATUS: u64 = 0x018;
/// RING_BASE (RW while disabled): 64-byte aligned ring address.
pub const RING_BASE: u64 = 0x020;
/// RING_SIZE (RW while disabled): entries, a power of two 2..=4096.
pub const RING_SIZE: u64 = 0x028;
/// RING_HEAD (RO): next descriptor the engine fetches.
pub const RING_HEAD: u64 = 0x030;
/// RING_TAIL (RW): the doorbell.
pub const RING_TAIL: u64 = 0x038;
/// RING_PASID (RW while disabled): address space of the ring fetches.
pub const RING_PASID: u64 = 0x040;
/// ERROR (RW1C): why the engine halted.
pub const ERROR: u64 = 0x048;
/// ERROR_ADDR (RO): address of the failed ring fetch.
pub const ERROR_ADDR: u64 = 0x050;
/// INT_STATUS (RW1C): bit 0, a completion interrupt was raised.
pub const INT_STATUS: u64 = 0x058;
/// COMPLETED (RO): descriptors completed since reset.
pub const COMPLETED: u64 = 0x060;
/// PAGE_REQUESTS (RO): page requests sent since reset.
pub const PAGE_REQUESTS: u64 = 0x068;
/// ATS_TRANSLATIONS (RO): translation requests sent since reset.
pub const ATS_TRANSLATIONS: u64 = 0x070;
/// ATC_INVALIDATIONS (RO): device-TLB invalidations received since reset.
pub const ATC_INVALIDATIONS: u64 = 0x078;
/// End of the register block.
pub const BLOCK_END: u64 = 0x080;

/// The ID register's value: "SVAE" in bits 31:0, interface version 1 in bits 63:32.
pub const ID_VALUE: u64 = 0x0000_0001_4541_5653;

/// CAPS bits.
pub mod caps {
    /// COPY supported.
    pub const COPY: u64 = 1 << 0;
    /// FILL supported.
    pub const FILL: u64 = 1 << 1;
    /// COMPARE supported.
    pub const COMPARE: u64 = 1 << 2;
    /// The function has the ATS capability.
    pub const ATS: u64 = 1 << 8;
    /// The function has the PRI capability.
    pub const PRI: u64 = 1 << 9;
    /// PASID width field shift (bits 20:16).
    pub const PASID_WIDTH_SHIFT: u32 = 16;
    /// Largest ring field shift (bits 47:32).
    pub const MAX_RING_SHIFT: u32 = 32;
}

/// CTRL bits.
pub mod ctrl {
    /// The engine fetches descriptors while set.
    pub const ENABLE: u64 = 1 << 0;
    /// Write 1: stop, abort, drop the ATC, zero the ring registers and counters (reads 0).
    pub const RESET: u64 = 1 << 1;
    /// Descriptors with the INTERRUPT flag raise vector 0.
    pub const INT_ENABLE: u64 = 1 << 2;
}

/// STATUS bits.
pub mod status {
    /// CTRL.ENABLE took effect.
    pub const ENABLED: u64 = 1 << 0;
    /// The ring could not be used (see ERROR).
    pub const HALTED: u64 = 1 << 1;
    /// Descriptors fetched and not yet completed.
    pub const BUSY: u64 = 1 << 2;
    /// A descriptor is parked on a page request.
    pub const WAITING_PAGE: u64 = 1 << 3;
    /// A Response Failure stopped page requests.
    pub const PRI_STOPPED: u64 = 1 << 4;
}

/// ERROR codes.
pub mod error {
    /// A ring fetch failed.
    pub const RING_FETCH: u64 = 1;
    /// RING_TAIL out of range.
    pub const TAIL_RANGE: u64 = 2;
    /// RING_BASE/RING_SIZE invalid when ENABLE was set.
    pub const RING_CONFIG: u64 = 3;
    /// A descriptor's reserved field was not zero.
    pub const RESERVED_FIELD: u64 = 4;
}

/// RING_PASID / descriptor PASID field bits.
pub mod pasid_field {
    /// Bits 19:0: the PASID.
    pub const PASID_MASK: u32 = 0xf_ffff;
    /// Bit 30: privileged-mode requests.
    pub const PRIVILEGED: u32 = 1 << 30;
    /// Bit 31: requests carry the PASID.
    pub const VALID: u32 = 1 << 31;
}

/// Largest ring (entries).
pub const MAX_RING_ENTRIES: u64 = 4096;
