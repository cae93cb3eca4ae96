//! Capability builders and list walkers.
//!
//! A [`Capability`] (standard list at 0x34, PCI Local Bus Spec 3.0, 6.7) or
//! [`ExtendedCapability`] (list at 0x100, PCIe Base Spec r6.0, 7.6) is built as bytes plus write
//! and RW1C masks, offsets relative to the capability's start (so builder offsets match the
//! spec's register tables); [`super::ConfigSpace::add_capability`] /
//! [`super::ConfigSpace::add_ext_capability`] place it and link it in. The header bytes (ID, next
//! pointer, version) are filled in by the config space.

use std::ops::{Deref, DerefMut};

/// Standard capability IDs (PCI Code and ID Assignment Spec r1.11, 2).
pub mod cap_id {
    /// PCI Power Management.
    pub const POWER_MANAGEMENT: u8 = 0x01;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor specific.
    pub const VENDOR: u8 = 0x09;
    /// Bridge subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR: u8 = 0x0d;
    /// PCI Express.
    pub const PCI_EXPRESS: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// Extended capability IDs (PCI Code and ID Assignment Spec r1.11, 3).
pub mod ext_cap_id {
    /// Advanced Error Reporting.
    pub const AER: u16 = 0x0001;
    /// Vendor-Specific Extended Capability.
    pub const VSEC: u16 = 0x000b;
    /// Access Control Services.
    pub const ACS: u16 = 0x000d;
    /// Alternative Routing-ID Interpretation.
    pub const ARI: u16 = 0x000e;
    /// Address Translation Services.
    pub const ATS: u16 = 0x000f;
    /// Page Request Interface.
    pub const PRI: u16 = 0x0013;
    /// Process Address Space ID.
    pub const PASID: u16 = 0x001b;
    /// Designated Vendor-Specific Extended Capability (CXL DVSECs).
    pub const DVSEC: u16 = 0x0023;
}

/// Bytes and masks of one capability, relative to its first byte. Setters grow the capability
/// as needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapRegs {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    w1cmask: Vec<u8>,
}

impl CapRegs {
    fn with_len(len: usize) -> Self {
        CapRegs {
            bytes: vec![0; len],
            wmask: vec![0; len],
            w1cmask: vec![0; len],
        }
    }

    fn grow(&mut self, end: usize) {
        if end > self.bytes.len() {
            self.bytes.resize(end, 0);
            self.wmask.resize(end, 0);
            self.w1cmask.resize(end, 0);
        }
    }

    fn put(v: &mut [u8], off: usize, width: usize, value: u32) {
        for i in 0..width {
            v[off + i] = (value >> (8 * i)) as u8;
        }
    }

    fn set(&mut self, off: usize, width: usize, value: u32, which: u8) -> &mut Self {
        self.grow(off + width);
        let v = match which {
            0 => &mut self.bytes,
            1 => &mut self.wmask,
            _ => &mut self.w1cmask,
        };
        Self::put(v, off, width, value);
        self
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True if the capability has no bytes yet.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Register values.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Write mask.
    pub fn wmask(&self) -> &[u8] {
        &self.wmask
    }

    /// RW1C mask.
    pub fn w1cmask(&self) -> &[u8] {
        &self.w1cmask
    }

    /// Sets the initial value of a byte.
    pub fn set_u8(&mut self, off: usize, value: u8) -> &mut Self {
        self.set(off, 1, u32::from(value), 0)
    }

    /// Sets the initial value of a little-endian word.
    pub fn set_u16(&mut self, off: usize, value: u16) -> &mut Self {
        self.set(off, 2, u32::from(value), 0)
    }

    /// Sets the initial value of a little-endian dword.
    pub fn set_u32(&mut self, off: usize, value: u32) -> &mut Self {
        self.set(off, 4, value, 0)
    }

    /// Marks bits of a byte read-write.
    pub fn writable_u8(&mut self, off: usize, mask: u8) -> &mut Self {
        self.set(off, 1, u32::from(mask), 1)
    }

    /// Marks bits of a word read-write.
    pub fn writable_u16(&mut self, off: usize, mask: u16) -> &mut Self {
        self.set(off, 2, u32::from(mask), 1)
    }

    /// Marks bits of a dword read-write.
    pub fn writable_u32(&mut self, off: usize, mask: u32) -> &mut Self {
        self.set(off, 4, mask, 1)
    }

    /// Marks bits of a word write-1-to-clear.
    pub fn w1c_u16(&mut self, off: usize, mask: u16) -> &mut Self {
        self.set(off, 2, u32::from(mask), 2)
    }

    /// Marks bits of a dword write-1-to-clear.
    pub fn w1c_u32(&mut self, off: usize, mask: u32) -> &mut Self {
        self.set(off, 4, mask, 2)
    }
}

/// A standard (PCI-compatible) capability: byte 0 ID, byte 1 next pointer (both filled in when
/// placed). Dereferences to [`CapRegs`] for the register setters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    id: u8,
    regs: CapRegs,
}

impl Capability {
    /// A `len`-byte capability with ID `id` (len includes the 2 header bytes).
    pub fn new(id: u8, len: usize) -> Self {
        Capability {
            id,
            regs: CapRegs::with_len(len.max(2)),
        }
    }

    /// Capability ID.
    pub fn id(&self) -> u8 {
        self.id
    }
}

impl Deref for Capability {
    type Target = CapRegs;
    fn deref(&self) -> &CapRegs {
        &self.regs
    }
}

impl DerefMut for Capability {
    fn deref_mut(&mut self) -> &mut CapRegs {
        &mut self.regs
    }
}

/// A PCIe extended capability: dword 0 holds ID \[15:0\], version \[19:16\], next \[31:20\] (filled in
/// when placed). Dereferences to [`CapRegs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtendedCapability {
    id: u16,
    version: u8,
    regs: CapRegs,
}

impl ExtendedCapability {
    /// A `len`-byte extended capability (len includes the 4-byte header).
    pub fn new(id: u16, version: u8, len: usize) -> Self {
        ExtendedCapability {
            id,
            version: version & 0xf,
            regs: CapRegs::with_len(len.max(4)),
        }
    }

    /// Capability ID.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Capability version.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// A Designated Vendor-Specific Extended Capability (PCIe Base Spec r6.0, 7.9.6): DVSEC
    /// header 1 at +4 (vendor \[15:0\], revision \[19:16\], length \[31:20\] = `len`, the whole
    /// structure including headers), header 2 at +8 (DVSEC ID). The body starts at +0xA.
    /// CXL uses vendor 0x1E98.
    pub fn dvsec(vendor_id: u16, revision: u8, dvsec_id: u16, len: u16) -> Self {
        let len = len.clamp(0x0a, 0xfff);
        let mut cap = ExtendedCapability::new(ext_cap_id::DVSEC, 1, usize::from(len));
        cap.set_u32(
            4,
            u32::from(vendor_id) | (u32::from(revision & 0xf) << 16) | (u32::from(len) << 20),
        );
        cap.set_u16(8, dvsec_id);
        cap
    }

    /// A Vendor-Specific Extended Capability (PCIe Base Spec r6.0, 7.9.5): VSEC header at +4
    /// (ID \[15:0\], revision \[19:16\], length \[31:20\] = `len`). The meaning is defined by the
    /// function's vendor ID.
    pub fn vsec(vsec_id: u16, revision: u8, len: u16) -> Self {
        let len = len.clamp(8, 0xfff);
        let mut cap = ExtendedCapability::new(ext_cap_id::VSEC, 1, usize::from(len));
        cap.set_u32(
            4,
            u32::from(vsec_id) | (u32::from(revision & 0xf) << 16) | (u32::from(len) << 20),
        );
        cap
    }
}

impl Deref for ExtendedCapability {
    type Target = CapRegs;
    fn deref(&self) -> &CapRegs {
        &self.regs
    }
}

impl DerefMut for ExtendedCapability {
    fn deref_mut(&mut self) -> &mut CapRegs {
        &mut self.regs
    }
}

/// PCI Power Management capability, version 3 (PCI Bus Power Management Interface Spec 1.2, 3.2):
/// D0 and D3hot only, no PME, No_Soft_Reset = 1 (D3hot → D0 keeps state). PowerState \[1:0\] of
/// PMCSR is writable.
pub fn power_management_capability() -> Capability {
    let mut cap = Capability::new(cap_id::POWER_MANAGEMENT, 8);
    // PMC: version 3.
    cap.set_u16(2, 0x0003);
    // PMCSR: No_Soft_Reset (bit 3); PowerState RW; PME_Status RW1C (never set: no PME).
    cap.set_u16(4, 1 << 3)
        .writable_u16(4, 0x0003)
        .w1c_u16(4, 1 << 15);
    cap
}

/// Offsets inside the AER capability (PCIe Base Spec r6.0, 7.8.4).
pub mod aer {
    /// Uncorrectable Error Status (RW1CS).
    pub const UNCOR_STATUS: usize = 0x04;
    /// Uncorrectable Error Mask (RWS).
    pub const UNCOR_MASK: usize = 0x08;
    /// Uncorrectable Error Severity (RWS).
    pub const UNCOR_SEVERITY: usize = 0x0c;
    /// Correctable Error Status (RW1CS).
    pub const COR_STATUS: usize = 0x10;
    /// Correctable Error Mask (RWS).
    pub const COR_MASK: usize = 0x14;
    /// Advanced Error Capabilities and Control.
    pub const CAP_CONTROL: usize = 0x18;
    /// Header Log (4 DWORDs, RO).
    pub const HEADER_LOG: usize = 0x1c;
    /// Root Error Command (root ports / RCECs).
    pub const ROOT_COMMAND: usize = 0x2c;
    /// Root Error Status (root ports / RCECs).
    pub const ROOT_STATUS: usize = 0x30;
    /// Error Source Identification (root ports / RCECs).
    pub const ERROR_SOURCE: usize = 0x34;
    /// Size including the TLP Prefix Log.
    pub const SIZE: usize = 0x48;
    /// Uncorrectable error bits defined by PCIe r6.0 (4, 5, 12..=26).
    pub const UNCOR_BITS: u32 = 0x07ff_f030;
    /// Correctable error bits (0, 6, 7, 8, 12..=15).
    pub const COR_BITS: u32 = 0x0000_f1c1;
}

/// Advanced Error Reporting extended capability, version 2 (PCIe Base Spec r6.0, 7.8.4), with
/// the spec's default masks and severities. With `root` the Root Error Command/Status registers
/// are implemented (root ports, Linux `aer_probe`), with AER interrupt message number 0.
/// No ECRC, no multiple header recording: those control bits are read-only 0.
pub fn aer_capability(root: bool) -> ExtendedCapability {
    let mut cap = ExtendedCapability::new(ext_cap_id::AER, 2, aer::SIZE);
    cap.w1c_u32(aer::UNCOR_STATUS, aer::UNCOR_BITS);
    // Uncorrectable Internal Error (22) is masked by default.
    cap.set_u32(aer::UNCOR_MASK, 1 << 22)
        .writable_u32(aer::UNCOR_MASK, aer::UNCOR_BITS);
    // Default severities: DLP (4), SDES (5), FCP (13), RO (17), MTLP (18), UCIE (22) fatal.
    cap.set_u32(aer::UNCOR_SEVERITY, 0x0046_2030)
        .writable_u32(aer::UNCOR_SEVERITY, aer::UNCOR_BITS);
    cap.w1c_u32(aer::COR_STATUS, aer::COR_BITS);
    // Advisory Non-Fatal (13), Corrected Internal (14), Header Log Overflow (15) masked.
    cap.set_u32(aer::COR_MASK, 0x0000_e000)
        .writable_u32(aer::COR_MASK, aer::COR_BITS);
    if root {
        // Correctable / non-fatal / fatal error reporting enables.
        cap.writable_u32(aer::ROOT_COMMAND, 0x7);
        // ERR_COR/ERR_FATAL/NONFATAL received, multiple, first-uncorrectable-fatal, messages.
        cap.w1c_u32(aer::ROOT_STATUS, 0x7f);
    }
    cap
}

/// Walks the standard capability list like Linux `pci_find_capability` (drivers/pci/pci.c):
/// requires Status bit 4, starts at the pointer at 0x34, masks the low 2 bits, stops on an ID of
/// 0xff, a pointer below 0x40 or after 48 hops. `read` is a config read (offset, buffer).
pub fn find_capability(read: &mut dyn FnMut(u16, &mut [u8]), id: u8) -> Option<u8> {
    let mut w = [0u8; 2];
    read(super::config::STATUS, &mut w);
    if u16::from_le_bytes(w) & super::config::STATUS_CAP_LIST == 0 {
        return None;
    }
    let mut b = [0u8; 1];
    read(super::config::CAPABILITY_LIST, &mut b);
    let mut pos = b[0];
    for _ in 0..48 {
        if pos < 0x40 {
            break;
        }
        pos &= !3;
        read(u16::from(pos), &mut w);
        let ent = u16::from_le_bytes(w);
        let cid = (ent & 0xff) as u8;
        if cid == 0xff {
            break;
        }
        if cid == id {
            return Some(pos);
        }
        pos = (ent >> 8) as u8;
    }
    None
}

/// Walks the extended capability list like Linux `pci_find_ext_capability`: starts at 0x100,
/// an all-zero (or all-ones) first header means no capabilities, next pointer is
/// `(header >> 20) & 0xffc`, stops below 0x100 or after (4096 - 256) / 8 hops.
pub fn find_ext_capability(read: &mut dyn FnMut(u16, &mut [u8]), id: u16) -> Option<u16> {
    let mut d = [0u8; 4];
    let mut pos = super::config::EXT_CAP_START;
    read(pos, &mut d);
    let mut header = u32::from_le_bytes(d);
    if header == 0 || header == 0xffff_ffff {
        return None;
    }
    for _ in 0..(4096 - 256) / 8 {
        if (header & 0xffff) as u16 == id {
            return Some(pos);
        }
        pos = ((header >> 20) & 0xffc) as u16;
        if pos < super::config::EXT_CAP_START {
            break;
        }
        read(pos, &mut d);
        header = u32::from_le_bytes(d);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::config::{ConfigSpace, HeaderType, PciIds, STATUS, STATUS_CAP_LIST};
    use super::*;

    fn cfg() -> ConfigSpace {
        ConfigSpace::new(
            HeaderType::Type0,
            PciIds {
                vendor_id: 0x1b36,
                device_id: 0x1,
                revision_id: 0,
                class_code: 0xff0000,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            },
        )
    }

    fn reader(c: &ConfigSpace) -> impl FnMut(u16, &mut [u8]) + '_ {
        |off, data| c.read(off, data)
    }

    #[test]
    fn standard_list_links_and_walks() {
        let mut c = cfg();
        assert_eq!(find_capability(&mut reader(&c), cap_id::MSIX), None);
        let pm = c.add_capability(&power_management_capability()).unwrap();
        let mut vendor = Capability::new(cap_id::VENDOR, 5);
        vendor.set_u8(2, 5).set_u8(3, 0xab).writable_u8(4, 0x0f);
        let v = c.add_capability(&vendor).unwrap();
        let third = c
            .add_capability(&Capability::new(cap_id::MSIX, 12))
            .unwrap();
        assert_eq!((pm, v, third), (0x40, 0x48, 0x50));
        assert_ne!(c.read_u16(STATUS) & STATUS_CAP_LIST, 0);
        assert_eq!(c.read_u8(0x34), 0x40);
        assert_eq!(c.read_u16(0x40), 0x4801);
        assert_eq!(c.read_u16(0x48), 0x5009);
        assert_eq!(c.read_u16(0x50), 0x0011);
        let mut r = reader(&c);
        assert_eq!(
            find_capability(&mut r, cap_id::POWER_MANAGEMENT),
            Some(0x40)
        );
        assert_eq!(find_capability(&mut r, cap_id::VENDOR), Some(0x48));
        assert_eq!(find_capability(&mut r, cap_id::MSIX), Some(0x50));
        assert_eq!(find_capability(&mut r, cap_id::PCI_EXPRESS), None);
        drop(r);

        // Header bytes are read-only; body masks apply at the placed offset.
        c.write(0x48, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.read_u32(0x48), 0xab05_5009);
        c.write(0x4c, &[0xff]);
        assert_eq!(c.read_u8(0x4c), 0x0f);
        // PM: PowerState RW, No_Soft_Reset RO.
        c.write(0x44, &[0x03, 0x00]);
        assert_eq!(c.read_u16(0x44), 0x000b);
        c.write(0x44, &[0x00, 0x00]);
        assert_eq!(c.read_u16(0x44), 0x0008);
    }

    #[test]
    fn standard_space_runs_out_cleanly() {
        let mut c = cfg();
        let big = Capability::new(0x09, 0x80);
        c.add_capability(&big).unwrap();
        assert!(c.add_capability(&big).is_err());
        c.add_capability(&Capability::new(0x09, 0x40)).unwrap();
        assert!(c.add_capability(&Capability::new(0x09, 1)).is_err());
    }

    #[test]
    fn a_looping_list_terminates() {
        let mut c = cfg();
        c.add_capability(&Capability::new(cap_id::VENDOR, 4))
            .unwrap();
        c.set_u8(0x41, 0x40); // next points to itself
        assert_eq!(find_capability(&mut reader(&c), cap_id::MSIX), None);
        c.set_u8(0x41, 0x43); // low bits are masked off like Linux does
        assert_eq!(find_capability(&mut reader(&c), cap_id::MSIX), None);
    }

    #[test]
    fn extended_list_links_and_walks() {
        let mut c = cfg();
        assert_eq!(find_ext_capability(&mut reader(&c), ext_cap_id::AER), None);
        let aer_off = c.add_ext_capability(&aer_capability(false)).unwrap();
        let dv = c
            .add_ext_capability(&ExtendedCapability::dvsec(0x1e98, 3, 0, 0x3c))
            .unwrap();
        let vs = c
            .add_ext_capability(&ExtendedCapability::vsec(0x42, 1, 0x10))
            .unwrap();
        assert_eq!(aer_off, 0x100);
        assert_eq!(dv, 0x148);
        assert_eq!(vs, 0x184);
        assert_eq!(c.read_u32(0x100), 0x1482_0001);
        assert_eq!(c.read_u32(0x148), 0x1841_0023);
        assert_eq!(c.read_u32(0x184), 0x0001_000b);
        assert_eq!(c.read_u32(0x14c), 0x03c3_1e98);
        assert_eq!(c.read_u16(0x150), 0);
        assert_eq!(c.read_u32(0x188), 0x0101_0042);
        let mut r = reader(&c);
        assert_eq!(find_ext_capability(&mut r, ext_cap_id::AER), Some(0x100));
        assert_eq!(find_ext_capability(&mut r, ext_cap_id::DVSEC), Some(0x148));
        assert_eq!(find_ext_capability(&mut r, ext_cap_id::VSEC), Some(0x184));
        assert_eq!(find_ext_capability(&mut r, ext_cap_id::ATS), None);
        drop(r);
        // Header dword read-only.
        c.write(0x100, &[0; 4]);
        assert_eq!(c.read_u32(0x100), 0x1482_0001);
        // A self-loop terminates.
        c.set_u32(0x184, 0x1841_000b);
        assert_eq!(find_ext_capability(&mut reader(&c), ext_cap_id::ATS), None);
    }

    #[test]
    fn aer_masks() {
        let mut c = cfg();
        let off = c.add_ext_capability(&aer_capability(true)).unwrap();
        let status = off + aer::UNCOR_STATUS as u16;
        c.set_u32(status, 1 << 20 | 1 << 14);
        c.write(status, &(1u32 << 20).to_le_bytes());
        assert_eq!(c.read_u32(status), 1 << 14);
        let mask = off + aer::UNCOR_MASK as u16;
        assert_eq!(c.read_u32(mask), 1 << 22);
        c.write(mask, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_u32(mask), aer::UNCOR_BITS);
        let ctl = off + aer::CAP_CONTROL as u16;
        c.write(ctl, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_u32(ctl), 0);
        let rc = off + aer::ROOT_COMMAND as u16;
        c.write(rc, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_u32(rc), 7);
    }

    #[test]
    fn extended_space_runs_out_cleanly() {
        let mut c = cfg();
        c.add_ext_capability(&ExtendedCapability::new(0x0b, 1, 0xe00))
            .unwrap();
        assert!(
            c.add_ext_capability(&ExtendedCapability::new(0x0b, 1, 0x104))
                .is_err()
        );
        assert_eq!(
            c.add_ext_capability(&ExtendedCapability::new(0x0b, 1, 0x100)),
            Ok(0xf00)
        );
        assert!(
            c.add_ext_capability(&ExtendedCapability::new(0x0b, 1, 4))
                .is_err()
        );
    }
}
