//! The engine's 64-byte descriptor and 32-byte completion record (docs/sva-engine.md,
//! "Descriptor" and "Completion record"), parsed with `zerocopy`.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::registers::pasid_field;

/// Size of a descriptor in bytes.
pub const SIZE: u64 = 64;
/// Size of a completion record in bytes.
pub const COMPLETION_SIZE: u64 = 32;
/// The longest a descriptor may move (1 GiB).
pub const MAX_LEN: u64 = 1 << 30;

/// Operation codes.
pub mod op {
    /// No operation (completes with SUCCESS).
    pub const NOP: u8 = 0;
    /// Copy `len` bytes from `src` to `dst`.
    pub const COPY: u8 = 1;
    /// Fill `len` bytes at `dst` with the 8-byte pattern in `src`.
    pub const FILL: u8 = 2;
    /// Compare `len` bytes at `src` and `dst`.
    pub const COMPARE: u8 = 3;
}

/// Descriptor flags.
pub mod flags {
    /// Raise the completion interrupt.
    pub const INTERRUPT: u8 = 1 << 0;
    /// A missing page ends the descriptor with TRANSLATION_FAULT instead of a page request.
    pub const NO_PAGE_REQUEST: u8 = 1 << 1;
    /// Every defined flag.
    pub const ALL: u8 = INTERRUPT | NO_PAGE_REQUEST;
}

/// Completion status codes.
pub mod status {
    /// Done.
    pub const SUCCESS: u8 = 1;
    /// A page request was answered Invalid Request.
    pub const PAGE_INVALID: u8 = 2;
    /// A page request was answered Response Failure, or PRI is stopped.
    pub const PAGE_FAILURE: u8 = 3;
    /// The translation failed and no page request could be sent.
    pub const TRANSLATION_FAULT: u8 = 4;
    /// Unknown opcode, reserved bits, bad length or a wrapping range.
    pub const BAD_DESCRIPTOR: u8 = 5;
    /// Reset, FLR or Bus Master Enable cleared while in flight.
    pub const ABORTED: u8 = 6;
}

/// Completion record fault flags.
pub mod fault_flags {
    /// The faulting access was a write.
    pub const WRITE: u8 = 1 << 0;
    /// The faulting access was a read.
    pub const READ: u8 = 1 << 1;
}

/// One ring entry as the guest lays it out (little endian).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct Descriptor {
    /// Operation code.
    pub opcode: u8,
    /// Flags.
    pub flags: u8,
    /// Reserved, 0.
    pub reserved0: u16,
    /// PASID field: bits 19:0 PASID, 30 privileged, 31 valid.
    pub pasid: u32,
    /// Source (COPY, COMPARE) or the pattern (FILL).
    pub src: u64,
    /// Destination (COPY, FILL) or the second source (COMPARE).
    pub dst: u64,
    /// Length in bytes.
    pub len: u64,
    /// Completion record address (0: none).
    pub completion: u64,
    /// Reserved, 0.
    pub reserved1: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<Descriptor>() == SIZE as usize);

/// Why a descriptor is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorError {
    /// A reserved field or bit is set (ERROR code 4 halts the engine).
    ReservedField,
    /// Unknown opcode, a length above 1 GiB, a misaligned completion record or a wrapping range.
    Invalid,
}

impl Descriptor {
    /// The PASID the descriptor's requests carry (`None` without PASID valid) and whether
    /// they are privileged.
    pub fn pasid(&self) -> (Option<iommu::Pasid>, bool) {
        decode_pasid_field(self.pasid)
    }

    /// Checks the fields the engine relies on.
    pub fn validate(&self) -> Result<(), DescriptorError> {
        let pasid_reserved =
            !(pasid_field::PASID_MASK | pasid_field::PRIVILEGED | pasid_field::VALID);
        if self.reserved0 != 0
            || self.reserved1 != [0; 3]
            || self.flags & !flags::ALL != 0
            || self.pasid & pasid_reserved != 0
        {
            return Err(DescriptorError::ReservedField);
        }
        if self.opcode > op::COMPARE || self.len > MAX_LEN || self.completion & 7 != 0 {
            return Err(DescriptorError::Invalid);
        }
        let wraps = |a: u64| a.checked_add(self.len).is_none();
        let ranges_wrap = match self.opcode {
            op::COPY | op::COMPARE => wraps(self.src) || wraps(self.dst),
            op::FILL => wraps(self.dst),
            _ => false,
        };
        if ranges_wrap || self.completion.checked_add(COMPLETION_SIZE).is_none() {
            return Err(DescriptorError::Invalid);
        }
        Ok(())
    }
}

/// Decodes a PASID field (RING_PASID or a descriptor's).
pub fn decode_pasid_field(field: u32) -> (Option<iommu::Pasid>, bool) {
    if field & pasid_field::VALID == 0 {
        return (None, false);
    }
    (
        iommu::Pasid::new(field & pasid_field::PASID_MASK),
        field & pasid_field::PRIVILEGED != 0,
    )
}

/// The record the engine writes when a descriptor completes (status last).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct CompletionRecord {
    /// Status code ([`status`]).
    pub status: u8,
    /// [`fault_flags`].
    pub fault_flags: u8,
    /// Reserved.
    pub reserved0: u16,
    /// COMPARE: 0 equal, 1 different.
    pub result: u32,
    /// Bytes done.
    pub bytes_completed: u64,
    /// First byte not done, for a fault status.
    pub fault_address: u64,
    /// Reserved.
    pub reserved1: u64,
}

const _: () = assert!(std::mem::size_of::<CompletionRecord>() == COMPLETION_SIZE as usize);

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(len: u64) -> Descriptor {
        Descriptor {
            opcode: op::COPY,
            pasid: pasid_field::VALID | 7,
            src: 0x1000,
            dst: 0x2000,
            len,
            completion: 0x3000,
            ..Default::default()
        }
    }

    #[test]
    fn layout_matches_the_datasheet() {
        let d = copy(0x40);
        let b = d.as_bytes();
        assert_eq!(b[0], op::COPY);
        assert_eq!(
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
            (1 << 31) | 7
        );
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0x40);
        assert_eq!(u64::from_le_bytes(b[32..40].try_into().unwrap()), 0x3000);
        let c = CompletionRecord {
            status: status::PAGE_INVALID,
            fault_address: 0xdead_0000,
            ..Default::default()
        };
        assert_eq!(c.as_bytes()[0], 2);
        assert_eq!(
            u64::from_le_bytes(c.as_bytes()[16..24].try_into().unwrap()),
            0xdead_0000
        );
    }

    #[test]
    fn validation_catches_what_the_datasheet_forbids() {
        assert_eq!(copy(MAX_LEN).validate(), Ok(()));
        assert_eq!(copy(MAX_LEN + 1).validate(), Err(DescriptorError::Invalid));
        let mut d = copy(8);
        d.reserved1[2] = 1;
        assert_eq!(d.validate(), Err(DescriptorError::ReservedField));
        let mut d = copy(8);
        d.pasid |= 1 << 25;
        assert_eq!(d.validate(), Err(DescriptorError::ReservedField));
        let mut d = copy(8);
        d.flags = 0x80;
        assert_eq!(d.validate(), Err(DescriptorError::ReservedField));
        let mut d = copy(8);
        d.opcode = 9;
        assert_eq!(d.validate(), Err(DescriptorError::Invalid));
        let mut d = copy(8);
        d.src = u64::MAX - 3;
        assert_eq!(d.validate(), Err(DescriptorError::Invalid));
        let mut d = copy(8);
        d.completion = 0x3004;
        assert_eq!(d.validate(), Err(DescriptorError::Invalid));
        assert_eq!(copy(8).pasid(), (iommu::Pasid::new(7), false));
        assert_eq!(decode_pasid_field(7), (None, false));
    }
}
