//! The 64-byte Crystal Beach DMA descriptor (`struct ioat_dma_descriptor` in
//! `drivers/dma/ioat/hw.h`): size, control word, source, destination, next-descriptor
//! pointer; the rest is reserved for the engine or free for the driver.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of a descriptor in bytes (and the alignment CHAINADDR and `next` must have).
pub const SIZE: u64 = 64;

/// Operation codes (control word bits 31:24).
pub mod op {
    /// Memory copy (`IOAT_OP_COPY`), the one operation this engine implements.
    pub const COPY: u8 = 0x00;
}

/// Control word bits.
pub mod ctl {
    /// Interrupt on completion.
    pub const INT_EN: u32 = 1 << 0;
    /// Write the completion status to CHANCMP when this descriptor completes.
    pub const COMPL_WRITE: u32 = 1 << 3;
    /// Fence: later descriptors wait for this one (always true here: execution is in order).
    pub const FENCE: u32 = 1 << 4;
    /// Null descriptor: no transfer (used for interrupts and to start a channel).
    pub const NULL: u32 = 1 << 5;
}

/// One descriptor as the guest lays it out in memory (little endian).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DmaDescriptor {
    /// Transfer size in bytes.
    pub size: u32,
    /// Control word.
    pub ctl: u32,
    /// Source address (an IOVA).
    pub src_addr: u64,
    /// Destination address (an IOVA).
    pub dst_addr: u64,
    /// Address of the next descriptor in the chain.
    pub next: u64,
    /// Reserved.
    pub rsv1: u64,
    /// Reserved.
    pub rsv2: u64,
    /// Free for software.
    pub user1: u64,
    /// Free for software.
    pub user2: u64,
}

const _: () = assert!(std::mem::size_of::<DmaDescriptor>() == SIZE as usize);

impl DmaDescriptor {
    /// The operation code.
    pub fn op(&self) -> u8 {
        (self.ctl >> 24) as u8
    }

    /// Whether control bit `bit` (a [`ctl`] constant) is set.
    pub fn has(&self, bit: u32) -> bool {
        self.ctl & bit != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_kernel_struct() {
        let mut bytes = [0u8; 64];
        bytes[0..4].copy_from_slice(&2000u32.to_le_bytes());
        bytes[4..8].copy_from_slice(&(ctl::INT_EN | ctl::COMPL_WRITE | (0x87 << 24)).to_le_bytes());
        bytes[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
        bytes[16..24].copy_from_slice(&0x2000u64.to_le_bytes());
        bytes[24..32].copy_from_slice(&0x3000u64.to_le_bytes());
        let d = DmaDescriptor::read_from_bytes(&bytes).unwrap();
        assert_eq!(d.size, 2000);
        assert!(d.has(ctl::INT_EN) && d.has(ctl::COMPL_WRITE) && !d.has(ctl::NULL));
        assert_eq!(d.op(), 0x87);
        assert_eq!((d.src_addr, d.dst_addr, d.next), (0x1000, 0x2000, 0x3000));
        assert_eq!(d.as_bytes(), &bytes[..]);
    }
}
