//! CXL Designated Vendor-Specific Extended Capabilities (CXL 2.0 8.1), all with DVSEC vendor
//! ID 0x1E98, plus the PCIe Device Serial Number capability Linux reads as the memdev serial.
//!
//! Builders return [`ExtendedCapability`] values with their write masks; offsets are relative
//! to the capability start, as in the spec's register tables. Linux finds them with
//! `pci_find_dvsec_capability` (drivers/pci/pci.c); [`find_dvsec`] walks the list the same way.

use crate::pci::ExtendedCapability;
use crate::pci::capability::ext_cap_id;

use super::CXL_VENDOR_ID;

/// DVSEC IDs (CXL 2.0 Table 124; Linux `PCI_DVSEC_CXL_*` in include/uapi/linux/pci_regs.h).
pub mod id {
    /// PCIe DVSEC for CXL Devices (CXL 2.0 8.1.3).
    pub const CXL_DEVICE: u16 = 0;
    /// CXL Extensions DVSEC for Ports (8.1.5).
    pub const PORT_EXTENSIONS: u16 = 3;
    /// GPF DVSEC for CXL Ports (8.1.6).
    pub const GPF_PORT: u16 = 4;
    /// GPF DVSEC for CXL Devices (8.1.7).
    pub const GPF_DEVICE: u16 = 5;
    /// PCIe DVSEC for Flex Bus Port (8.1.8).
    pub const FLEX_BUS_PORT: u16 = 7;
    /// Register Locator DVSEC (8.1.9).
    pub const REGISTER_LOCATOR: u16 = 8;
}

/// PCIe DVSEC for CXL Devices, revision 1 (CXL 2.0 8.1.3). Served to Linux
/// `cxl_dvsec_rr_decode`, `cxl_await_media_ready` and `cxl_set_mem_enable`
/// (drivers/cxl/core/pci.c).
pub mod device {
    /// Structure length.
    pub const LEN: u16 = 0x38;
    /// Revision (CXL 2.0).
    pub const REVISION: u8 = 1;
    /// DVSEC CXL Capability (u16).
    pub const CAP: usize = 0x0a;
    /// DVSEC CXL Control (u16).
    pub const CTRL: usize = 0x0c;
    /// DVSEC CXL Status (u16).
    pub const STATUS: usize = 0x0e;
    /// DVSEC CXL Control2 (u16).
    pub const CTRL2: usize = 0x10;
    /// DVSEC CXL Status2 (u16).
    pub const STATUS2: usize = 0x12;
    /// DVSEC CXL Lock (u16).
    pub const LOCK: usize = 0x14;
    /// DVSEC CXL Capability2 (u16).
    pub const CAP2: usize = 0x16;
    /// Range `i` (0 or 1) Size High.
    pub const fn range_size_high(i: usize) -> usize {
        0x18 + 0x10 * i
    }
    /// Range `i` Size Low: \[0\] Memory_Info_Valid, \[1\] Memory_Active, \[4:2\] Media_Type,
    /// \[7:5\] Memory_Class, \[12:8\] Desired_Interleave, \[15:13\] Memory_Active_Timeout,
    /// \[31:28\] size bits 31:28.
    pub const fn range_size_low(i: usize) -> usize {
        0x1c + 0x10 * i
    }
    /// Range `i` Base High.
    pub const fn range_base_high(i: usize) -> usize {
        0x20 + 0x10 * i
    }
    /// Range `i` Base Low (\[31:28\] base bits 31:28).
    pub const fn range_base_low(i: usize) -> usize {
        0x24 + 0x10 * i
    }
    /// Capability: IO_Capable.
    pub const CAP_IO: u16 = 1 << 1;
    /// Capability: Mem_Capable.
    pub const CAP_MEM: u16 = 1 << 2;
    /// Capability: Mem_HwInit_Mode (the device initialises its memory itself).
    pub const CAP_MEM_HWINIT: u16 = 1 << 3;
    /// Capability: HDM_Count field shift (bits 5:4).
    pub const CAP_HDM_COUNT_SHIFT: u16 = 4;
    /// Control: IO_Enable (read-only 1).
    pub const CTRL_IO_ENABLE: u16 = 1 << 1;
    /// Control: Mem_Enable (RW).
    pub const CTRL_MEM_ENABLE: u16 = 1 << 2;
    /// Size Low: Memory_Info_Valid.
    pub const MEM_INFO_VALID: u32 = 1 << 0;
    /// Size Low: Memory_Active.
    pub const MEM_ACTIVE: u32 = 1 << 1;
    /// Size Low: Media_Type and Memory_Class "described by CDAT" (010b each, CXL 2.0).
    pub const MEDIA_CDAT: u32 = (2 << 2) | (2 << 5);
}

/// CXL Extensions DVSEC for Ports, revision 0 (CXL 2.0 8.1.5). Linux `cxl_sbr_masked` /
/// `cxl_reset_bus_function` (drivers/pci/pci.c) use the Port Control register.
pub mod port_ext {
    /// Structure length.
    pub const LEN: u16 = 0x28;
    /// Port Extension Status (u16).
    pub const STATUS: usize = 0x0a;
    /// Port Control Extensions (u16): \[0\] Unmask SBR, \[1\] Unmask Link Disable.
    pub const CTRL: usize = 0x0c;
    /// Port Control: Unmask SBR.
    pub const CTRL_UNMASK_SBR: u16 = 1 << 0;
    /// Port Control: Unmask Link Disable.
    pub const CTRL_UNMASK_LINK_DISABLE: u16 = 1 << 1;
}

/// GPF DVSEC for CXL Ports, revision 0 (CXL 2.0 8.1.6). Linux `update_gpf_port_dvsec`
/// (drivers/cxl/core/pci.c) programs both phase timeouts.
pub mod gpf_port {
    /// Structure length.
    pub const LEN: u16 = 0x10;
    /// GPF Phase 1 Control (u16): \[3:0\] timeout base, \[11:8\] timeout scale.
    pub const PHASE1_CTRL: usize = 0x0c;
    /// GPF Phase 2 Control (u16), same fields.
    pub const PHASE2_CTRL: usize = 0x0e;
    /// Writable bits of both control registers.
    pub const CTRL_MASK: u16 = 0x0f0f;
}

/// GPF DVSEC for CXL Devices, revision 0 (CXL 2.0 8.1.7). Linux `cxl_gpf_get_dvsec` only checks
/// that it exists (dirty shutdown tracking in drivers/cxl/pmem.c).
pub mod gpf_device {
    /// Structure length.
    pub const LEN: u16 = 0x10;
    /// GPF Phase 2 Duration (u16): \[3:0\] base, \[11:8\] scale.
    pub const PHASE2_DURATION: usize = 0x0a;
    /// GPF Phase 2 Power in mW (u32).
    pub const PHASE2_POWER: usize = 0x0c;
}

/// PCIe DVSEC for Flex Bus Port, revision 1 (CXL 2.0 8.1.8). Linux `set_pcie_cxl`
/// (drivers/pci/probe.c) marks a function CXL when Status reports CXL.cache or CXL.mem enabled.
pub mod flex_bus {
    /// Structure length (CXL 2.0).
    pub const LEN: u16 = 0x14;
    /// Revision (CXL 2.0).
    pub const REVISION: u8 = 1;
    /// Flex Bus Port Capability (u16).
    pub const CAP: usize = 0x0a;
    /// Flex Bus Port Control (u16).
    pub const CTRL: usize = 0x0c;
    /// Flex Bus Port Status (u16).
    pub const STATUS: usize = 0x0e;
    /// Received Flex Bus Data Phase1 Modified TS (u32).
    pub const RECEIVED_TS: usize = 0x10;
    /// IO capable / enabled (bit 1 of capability, control, status).
    pub const IO: u16 = 1 << 1;
    /// Mem capable / enabled (bit 2).
    pub const MEM: u16 = 1 << 2;
    /// CXL 2.0 capable / enabled (bit 5).
    pub const CXL2: u16 = 1 << 5;
}

/// Register Locator DVSEC, revision 0 (CXL 2.0 8.1.9). Linux `__cxl_find_regblock_instance`
/// and `cxl_decode_regblock` (drivers/cxl/core/regs.c).
pub mod regloc {
    /// Offset of the first Register Block entry (8 bytes each).
    pub const BLOCK1: usize = 0x0c;
    /// Register Block Identifier: component registers.
    pub const BLOCK_COMPONENT: u8 = 1;
    /// Register Block Identifier: BAR virtualization ACL registers.
    pub const BLOCK_BAR_VIRT: u8 = 2;
    /// Register Block Identifier: CXL memory device registers.
    pub const BLOCK_MEMDEV: u8 = 3;
}

/// One Register Locator entry: a register block at `offset` (64 KiB aligned) in BAR `bir`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisterBlock {
    /// BAR Indicator (index of the BAR register holding the block).
    pub bir: u8,
    /// Register Block Identifier ([`regloc`]).
    pub block_id: u8,
    /// Offset in the BAR; bits 15:0 must be 0.
    pub offset: u64,
}

/// PCIe DVSEC for CXL Devices describing a Type 3 device with CXL.io and CXL.mem, and one DVSEC
/// range per non-empty partition (`ranges`: sizes in bytes, multiples of 256 MiB; at most 2).
/// Every range reports Memory_Info_Valid and Memory_Active (so `cxl_await_media_ready` passes at
/// once) with media type and class "CDAT". Writable: Mem_Enable and the range bases.
/// HDM_Count is the number of ranges (1 if `ranges` is empty).
pub fn cxl_device_dvsec(ranges: &[u64]) -> ExtendedCapability {
    let ranges = &ranges[..ranges.len().min(2)];
    let count = ranges.len().max(1) as u16;
    let mut cap =
        ExtendedCapability::dvsec(CXL_VENDOR_ID, device::REVISION, id::CXL_DEVICE, device::LEN);
    cap.set_u16(
        device::CAP,
        device::CAP_IO
            | device::CAP_MEM
            | device::CAP_MEM_HWINIT
            | (count << device::CAP_HDM_COUNT_SHIFT),
    );
    cap.set_u16(device::CTRL, device::CTRL_IO_ENABLE)
        .writable_u16(device::CTRL, device::CTRL_MEM_ENABLE);
    for i in 0..usize::from(count) {
        let size = ranges.get(i).copied().unwrap_or(0);
        cap.set_u32(device::range_size_high(i), (size >> 32) as u32);
        cap.set_u32(
            device::range_size_low(i),
            (size as u32 & 0xf000_0000)
                | device::MEM_INFO_VALID
                | device::MEM_ACTIVE
                | device::MEDIA_CDAT,
        );
        cap.writable_u32(device::range_base_high(i), u32::MAX)
            .writable_u32(device::range_base_low(i), 0xf000_0000);
    }
    cap
}

/// CXL Extensions DVSEC for Ports: no alternate decode ranges, Unmask SBR and Unmask Link
/// Disable writable (reset 0: SBR masked, as the spec requires).
pub fn port_extensions_dvsec() -> ExtendedCapability {
    let mut cap = ExtendedCapability::dvsec(CXL_VENDOR_ID, 0, id::PORT_EXTENSIONS, port_ext::LEN);
    cap.writable_u16(
        port_ext::CTRL,
        port_ext::CTRL_UNMASK_SBR | port_ext::CTRL_UNMASK_LINK_DISABLE,
    );
    cap
}

/// GPF DVSEC for CXL Ports with writable phase 1 / phase 2 timeouts (reset 0).
pub fn gpf_port_dvsec() -> ExtendedCapability {
    let mut cap = ExtendedCapability::dvsec(CXL_VENDOR_ID, 0, id::GPF_PORT, gpf_port::LEN);
    cap.writable_u16(gpf_port::PHASE1_CTRL, gpf_port::CTRL_MASK)
        .writable_u16(gpf_port::PHASE2_CTRL, gpf_port::CTRL_MASK);
    cap
}

/// GPF DVSEC for CXL Devices: phase 2 takes 1 ms (base 1, scale 3) at negligible power.
pub fn gpf_device_dvsec() -> ExtendedCapability {
    let mut cap = ExtendedCapability::dvsec(CXL_VENDOR_ID, 0, id::GPF_DEVICE, gpf_device::LEN);
    cap.set_u16(gpf_device::PHASE2_DURATION, 0x0301);
    cap
}

/// PCIe DVSEC for Flex Bus Port: CXL.io + CXL.mem + CXL 2.0, trained and enabled (the
/// control bits read back the enabled state and are read-only: there is no link to retrain).
pub fn flex_bus_port_dvsec() -> ExtendedCapability {
    let mut cap = ExtendedCapability::dvsec(
        CXL_VENDOR_ID,
        flex_bus::REVISION,
        id::FLEX_BUS_PORT,
        flex_bus::LEN,
    );
    let bits = flex_bus::IO | flex_bus::MEM | flex_bus::CXL2;
    cap.set_u16(flex_bus::CAP, bits)
        .set_u16(flex_bus::CTRL, bits)
        .set_u16(flex_bus::STATUS, bits);
    cap
}

/// Register Locator DVSEC with the given entries (length 0xC + 8 per entry).
pub fn register_locator_dvsec(blocks: &[RegisterBlock]) -> ExtendedCapability {
    let blocks = &blocks[..blocks.len().min(64)];
    let len = (regloc::BLOCK1 + 8 * blocks.len()) as u16;
    let mut cap = ExtendedCapability::dvsec(CXL_VENDOR_ID, 0, id::REGISTER_LOCATOR, len);
    for (i, b) in blocks.iter().enumerate() {
        let off = regloc::BLOCK1 + 8 * i;
        cap.set_u32(
            off,
            u32::from(b.bir & 7) | (u32::from(b.block_id) << 8) | (b.offset as u32 & 0xffff_0000),
        );
        cap.set_u32(off + 4, (b.offset >> 32) as u32);
    }
    cap
}

/// Device Serial Number extended capability (PCIe Base Spec r6.0, 7.9.3; ID 0x0003): Linux
/// `pci_get_dsn` gives the CXL memdev its `serial`.
pub fn device_serial_number_capability(serial: u64) -> ExtendedCapability {
    let mut cap = ExtendedCapability::new(0x0003, 1, 12);
    cap.set_u32(4, serial as u32)
        .set_u32(8, (serial >> 32) as u32);
    cap
}

/// Finds the CXL DVSEC with ID `dvsec_id` like Linux `pci_find_dvsec_capability`: walks the
/// DVSEC extended capabilities comparing header 1's vendor and header 2's ID. `read` is a
/// config read (offset, buffer).
pub fn find_dvsec(read: &mut dyn FnMut(u16, &mut [u8]), dvsec_id: u16) -> Option<u16> {
    let mut d = [0u8; 4];
    let mut w = [0u8; 2];
    let mut pos = crate::pci::config::EXT_CAP_START;
    for _ in 0..(4096 - 256) / 8 {
        read(pos, &mut d);
        let header = u32::from_le_bytes(d);
        if header == 0 || header == u32::MAX {
            return None;
        }
        if header & 0xffff == u32::from(ext_cap_id::DVSEC) {
            read(pos + 4, &mut d);
            read(pos + 8, &mut w);
            if u32::from_le_bytes(d) & 0xffff == u32::from(CXL_VENDOR_ID)
                && u16::from_le_bytes(w) == dvsec_id
            {
                return Some(pos);
            }
        }
        pos = ((header >> 20) & 0xffc) as u16;
        if pos < crate::pci::config::EXT_CAP_START {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{ConfigSpace, HeaderType, PciIds};

    fn space() -> ConfigSpace {
        ConfigSpace::new(
            HeaderType::Type0,
            PciIds {
                vendor_id: 0x1b36,
                device_id: 1,
                revision_id: 0,
                class_code: super::super::CLASS_CXL_MEMORY,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            },
        )
    }

    #[test]
    fn device_dvsec_matches_linux_rr_decode() {
        let mut c = space();
        c.add_ext_capability(&device_serial_number_capability(0x1122_3344_5566_7788))
            .unwrap();
        let d = c
            .add_ext_capability(&cxl_device_dvsec(&[1 << 30, 512 << 20]))
            .unwrap();
        assert_eq!(
            find_dvsec(&mut |o, b: &mut [u8]| c.read(o, b), id::CXL_DEVICE),
            Some(d)
        );
        assert_eq!(c.read_u32(0x104), 0x5566_7788);
        // Header 1: vendor 0x1e98, revision 1, length 0x38.
        assert_eq!(c.read_u32(d + 4), 0x0381_1e98);
        let cap = c.read_u16(d + device::CAP as u16);
        assert_ne!(cap & device::CAP_MEM, 0);
        assert_eq!((cap >> 4) & 3, 2, "HDM_Count");
        for (i, size) in [(0, 1u64 << 30), (1, 512 << 20)] {
            let lo = c.read_u32(d + device::range_size_low(i) as u16);
            let hi = c.read_u32(d + device::range_size_high(i) as u16);
            assert_eq!(lo & 3, 3, "valid and active");
            assert_eq!((u64::from(hi) << 32) | u64::from(lo & 0xf000_0000), size);
        }
        // Mem_Enable is the only writable control bit; IO_Enable reads 1.
        c.write(d + device::CTRL as u16, &0xffffu16.to_le_bytes());
        assert_eq!(
            c.read_u16(d + device::CTRL as u16),
            device::CTRL_IO_ENABLE | device::CTRL_MEM_ENABLE
        );
        c.write(
            d + device::range_base_low(0) as u16,
            &u32::MAX.to_le_bytes(),
        );
        assert_eq!(
            c.read_u32(d + device::range_base_low(0) as u16),
            0xf000_0000
        );
        // Size registers are read-only.
        c.write(d + device::range_size_low(0) as u16, &0u32.to_le_bytes());
        assert_eq!(c.read_u32(d + device::range_size_low(0) as u16) & 3, 3);
    }

    #[test]
    fn locator_and_port_dvsecs() {
        let mut c = space();
        c.add_ext_capability(&port_extensions_dvsec()).unwrap();
        c.add_ext_capability(&gpf_port_dvsec()).unwrap();
        c.add_ext_capability(&flex_bus_port_dvsec()).unwrap();
        let rl = c
            .add_ext_capability(&register_locator_dvsec(&[
                RegisterBlock {
                    bir: 0,
                    block_id: regloc::BLOCK_COMPONENT,
                    offset: 0,
                },
                RegisterBlock {
                    bir: 2,
                    block_id: regloc::BLOCK_MEMDEV,
                    offset: 0x1_0001_0000,
                },
            ]))
            .unwrap();
        let mut rd = |o: u16, b: &mut [u8]| c.read(o, b);
        assert_eq!(find_dvsec(&mut rd, id::REGISTER_LOCATOR), Some(rl));
        let pe = find_dvsec(&mut rd, id::PORT_EXTENSIONS).unwrap();
        let gpf = find_dvsec(&mut rd, id::GPF_PORT).unwrap();
        let fb = find_dvsec(&mut rd, id::FLEX_BUS_PORT).unwrap();
        assert_eq!(find_dvsec(&mut rd, id::CXL_DEVICE), None);
        // Linux: regblocks = (len - 0xc) / 8.
        let len = c.read_u32(rl + 4) >> 20;
        assert_eq!((len - 0xc) / 8, 2);
        assert_eq!(c.read_u32(rl + 0xc), 0x0000_0100);
        assert_eq!(c.read_u32(rl + 0x14), 0x0001_0302);
        assert_eq!(c.read_u32(rl + 0x18), 1);
        // Flex bus status: CXL.mem enabled (is_cxl for Linux).
        assert_ne!(c.read_u16(fb + flex_bus::STATUS as u16) & flex_bus::MEM, 0);
        c.write(pe + port_ext::CTRL as u16, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(pe + port_ext::CTRL as u16), 3);
        c.write(gpf + gpf_port::PHASE1_CTRL as u16, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(gpf + gpf_port::PHASE1_CTRL as u16), 0x0f0f);
    }

    #[test]
    fn empty_device_dvsec_still_has_one_range() {
        let mut c = space();
        let d = c.add_ext_capability(&cxl_device_dvsec(&[])).unwrap();
        assert_eq!((c.read_u16(d + device::CAP as u16) >> 4) & 3, 1);
        assert_eq!(c.read_u32(d + device::range_size_low(0) as u16) & 3, 3);
        assert_eq!(c.read_u32(d + device::range_size_low(1) as u16), 0);
    }
}
