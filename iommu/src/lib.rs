//! DMA API for device models, and the seams where the future VT-d model plugs in.
//!
//! Devices never touch KVM or guest memory directly. They get:
//! - a [`DmaSpace`] bound to their function ([`FunctionBinding`]: requester ID, which follows
//!   bus renumbering, and Bus Master Enable, without which DMA is refused) and optionally a
//!   PASID, for every access to guest memory. Today the translation is the identity
//!   ([`IdentityTranslator`]); the VT-d model will implement [`DmaTranslator`] (untranslated
//!   requests, ATS translation requests with the full [`Translation`], translated requests, PRI
//!   page requests) without devices changing;
//! - the way back from the IOMMU: a function with an ATC or page requests registers a
//!   [`DeviceEndpoint`] ([`DmaSpace::register_endpoint`]) that receives device-TLB
//!   invalidations ([`AtcInvalidation`], each with a [`Completion`] an invalidation wait can
//!   wait for) and page group responses ([`PageResponse`]);
//! - an [`MsiSink`] that delivers an MSI/MSI-X message (address, data, requester ID). The VMM
//!   implements it (KVM_SIGNAL_MSI); VT-d interrupt remapping will hook in there.

mod dma;
mod msi;
pub mod vtd;

pub use dma::{
    AddressType, AtcInvalidation, Completion, DeviceEndpoint, DmaAccess, DmaError, DmaRequest,
    DmaSpace, DmaTranslator, FunctionBinding, IdentityTranslator, PageRequest, PageResponse,
    PageResponseCode, Translation,
};
pub use msi::{MsiError, MsiMessage, MsiSink, NullMsiSink, RecordingMsiSink};

use std::fmt;

/// A PCIe requester ID (PCIe Base Spec r6.0, 2.2.6.2): `bus[15:8] | device[7:3] | function[2:0]`.
///
/// This is the "source ID" VT-d uses to find a device's context entry, and the ID carried in MSI
/// writes for interrupt remapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequesterId(pub u16);

impl RequesterId {
    /// Builds a requester ID from bus, device (0..=31) and function (0..=7) numbers; out-of-range
    /// device/function bits are masked off.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        RequesterId(
            ((bus as u16) << 8) | (((device & 0x1f) as u16) << 3) | ((function & 0x7) as u16),
        )
    }

    /// Bus number, bits \[15:8\].
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// Device number, bits \[7:3\].
    pub const fn device(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }

    /// Function number, bits \[2:0\].
    pub const fn function(self) -> u8 {
        (self.0 & 0x7) as u8
    }

    /// Combined device/function number (Linux `PCI_DEVFN`), bits \[7:0\].
    pub const fn devfn(self) -> u8 {
        (self.0 & 0xff) as u8
    }
}

impl fmt::Display for RequesterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{}",
            self.bus(),
            self.device(),
            self.function()
        )
    }
}

/// A PCIe Process Address Space ID (PCIe Base Spec r6.0, 6.20): 20 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pasid(u32);

impl Pasid {
    /// Largest PASID value (20 bits).
    pub const MAX: u32 = (1 << 20) - 1;

    /// Returns `None` if `value` does not fit in 20 bits.
    pub const fn new(value: u32) -> Option<Self> {
        if value <= Self::MAX {
            Some(Pasid(value))
        } else {
            None
        }
    }

    /// The raw 20-bit value.
    pub const fn value(self) -> u32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requester_id_fields() {
        let rid = RequesterId::new(0x12, 0x1f, 7);
        assert_eq!(rid.0, 0x12ff);
        assert_eq!(rid.bus(), 0x12);
        assert_eq!(rid.device(), 0x1f);
        assert_eq!(rid.function(), 7);
        assert_eq!(rid.devfn(), 0xff);
        assert_eq!(rid.to_string(), "12:1f.7");
        // Out-of-range device/function bits are masked, never bleed into the bus number.
        assert_eq!(
            RequesterId::new(1, 0xff, 0xff),
            RequesterId::new(1, 0x1f, 7)
        );
        assert_eq!(RequesterId::new(0, 1, 0).0, 0x08);
    }

    #[test]
    fn pasid_range() {
        assert_eq!(Pasid::new(0xf_ffff).map(Pasid::value), Some(0xf_ffff));
        assert!(Pasid::new(0x10_0000).is_none());
    }
}
