//! The PCI Express Capability structure, version 2 (PCIe Base Spec r6.0, 7.5.3).
//!
//! Register offsets are relative to the capability. Which registers exist follows the port type
//! the way Linux `pcie_capability_reg_implemented` (drivers/pci/access.c) expects: link registers
//! for everything but RCiEPs and event collectors, root registers for root ports and event
//! collectors, no slot (Slot Implemented = 0). Link status reports the link trained at its
//! maximum speed and width, so `lspci -vvv` and Linux's `pcie_print_link_status` are content.

use super::capability::{Capability, cap_id};

/// PCI Express Capabilities register.
pub const FLAGS: usize = 0x02;
/// Device Capabilities.
pub const DEVCAP: usize = 0x04;
/// Device Control.
pub const DEVCTL: usize = 0x08;
/// Device Status.
pub const DEVSTA: usize = 0x0a;
/// Link Capabilities.
pub const LNKCAP: usize = 0x0c;
/// Link Control.
pub const LNKCTL: usize = 0x10;
/// Link Status.
pub const LNKSTA: usize = 0x12;
/// Slot Capabilities.
pub const SLTCAP: usize = 0x14;
/// Slot Control.
pub const SLTCTL: usize = 0x18;
/// Slot Status.
pub const SLTSTA: usize = 0x1a;
/// Root Control.
pub const RTCTL: usize = 0x1c;
/// Root Capabilities.
pub const RTCAP: usize = 0x1e;
/// Root Status.
pub const RTSTA: usize = 0x20;
/// Device Capabilities 2.
pub const DEVCAP2: usize = 0x24;
/// Device Control 2.
pub const DEVCTL2: usize = 0x28;
/// Device Status 2.
pub const DEVSTA2: usize = 0x2a;
/// Link Capabilities 2.
pub const LNKCAP2: usize = 0x2c;
/// Link Control 2.
pub const LNKCTL2: usize = 0x30;
/// Link Status 2.
pub const LNKSTA2: usize = 0x32;
/// Size of a version 2 PCI Express capability.
pub const SIZE: usize = 0x3c;

/// Device Control: Initiate Function Level Reset (endpoints; reads 0).
pub const DEVCTL_BCR_FLR: u16 = 1 << 15;
/// Device Capabilities: Function Level Reset capable.
pub const DEVCAP_FLR: u32 = 1 << 28;
/// Device Capabilities 2: ARI Forwarding Supported.
pub const DEVCAP2_ARI: u32 = 1 << 5;
/// Device Control 2: ARI Forwarding Enable.
pub const DEVCTL2_ARI: u16 = 1 << 5;

/// Device/Port Type field of the PCI Express Capabilities register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PciePortType {
    /// PCI Express Endpoint.
    Endpoint = 0x0,
    /// Legacy PCI Express Endpoint.
    LegacyEndpoint = 0x1,
    /// Root Port of a Root Complex.
    RootPort = 0x4,
    /// Upstream Port of a Switch.
    UpstreamPort = 0x5,
    /// Downstream Port of a Switch.
    DownstreamPort = 0x6,
    /// PCI Express to PCI/PCI-X Bridge.
    PcieToPciBridge = 0x7,
    /// PCI/PCI-X to PCI Express Bridge.
    PciToPcieBridge = 0x8,
    /// Root Complex Integrated Endpoint.
    RcIntegratedEndpoint = 0x9,
    /// Root Complex Event Collector.
    RcEventCollector = 0xa,
}

impl PciePortType {
    /// Decodes the 4-bit field; `None` for reserved values.
    pub fn from_bits(v: u8) -> Option<Self> {
        use PciePortType::*;
        Some(match v & 0xf {
            0x0 => Endpoint,
            0x1 => LegacyEndpoint,
            0x4 => RootPort,
            0x5 => UpstreamPort,
            0x6 => DownstreamPort,
            0x7 => PcieToPciBridge,
            0x8 => PciToPcieBridge,
            0x9 => RcIntegratedEndpoint,
            0xa => RcEventCollector,
            _ => return None,
        })
    }

    /// Ports that forward configuration requests only to device 0 of their secondary bus
    /// unless ARI forwarding is enabled (PCIe Base Spec r6.0, 7.3.1).
    pub fn is_downstream_port(self) -> bool {
        matches!(
            self,
            PciePortType::RootPort | PciePortType::DownstreamPort | PciePortType::PciToPcieBridge
        )
    }

    fn has_link(self) -> bool {
        !matches!(
            self,
            PciePortType::RcIntegratedEndpoint | PciePortType::RcEventCollector
        )
    }

    fn has_root(self) -> bool {
        matches!(
            self,
            PciePortType::RootPort | PciePortType::RcEventCollector
        )
    }

    fn is_endpoint(self) -> bool {
        matches!(
            self,
            PciePortType::Endpoint
                | PciePortType::LegacyEndpoint
                | PciePortType::RcIntegratedEndpoint
        )
    }
}

/// Link speeds (Supported Link Speeds Vector bit positions / Max Link Speed encodings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum LinkSpeed {
    /// 2.5 GT/s (Gen1).
    Gt2_5 = 1,
    /// 5.0 GT/s (Gen2).
    Gt5 = 2,
    /// 8.0 GT/s (Gen3).
    Gt8 = 3,
    /// 16.0 GT/s (Gen4).
    Gt16 = 4,
    /// 32.0 GT/s (Gen5).
    Gt32 = 5,
    /// 64.0 GT/s (Gen6).
    Gt64 = 6,
}

/// What to advertise in the PCI Express capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcieCapabilityConfig {
    /// Device/Port type.
    pub port_type: PciePortType,
    /// Max_Payload_Size Supported encoding (0 = 128 B, 1 = 256 B, … 5 = 4096 B).
    pub max_payload_supported: u8,
    /// Maximum and current link speed.
    pub link_speed: LinkSpeed,
    /// Maximum and negotiated link width (1, 2, 4, 8, 12, 16, 32).
    pub link_width: u8,
    /// Port Number (Link Capabilities \[31:24\]).
    pub port_number: u8,
    /// MSI/MSI-X vector used for PME/hotplug/link events (Interrupt Message Number).
    pub interrupt_message_number: u8,
    /// Function Level Reset capable. A device setting this must act on
    /// [`DEVCTL_BCR_FLR`] writes itself (the bit reads 0).
    pub flr: bool,
    /// Extended (8-bit) Tag Field supported.
    pub extended_tags: bool,
    /// End-End TLP Prefix supported (needed before Linux enables PASID).
    pub end_end_tlp_prefix: bool,
    /// ARI Forwarding supported (downstream ports).
    pub ari_forwarding: bool,
}

impl PcieCapabilityConfig {
    /// Defaults for a port type: 256-byte max payload, 16 GT/s x16 link, port number 0,
    /// extended tags, no FLR/ARI/TLP prefixes.
    pub fn new(port_type: PciePortType) -> Self {
        PcieCapabilityConfig {
            port_type,
            max_payload_supported: 1,
            link_speed: LinkSpeed::Gt16,
            link_width: 16,
            port_number: 0,
            interrupt_message_number: 0,
            flr: false,
            extended_tags: true,
            end_end_tlp_prefix: false,
            ari_forwarding: false,
        }
    }

    /// A PCI Express Endpoint.
    pub fn endpoint() -> Self {
        Self::new(PciePortType::Endpoint)
    }

    /// A Root Port with the given port number.
    pub fn root_port(port_number: u8) -> Self {
        PcieCapabilityConfig {
            port_number,
            ..Self::new(PciePortType::RootPort)
        }
    }

    /// A Root Complex Integrated Endpoint.
    pub fn rc_integrated_endpoint() -> Self {
        Self::new(PciePortType::RcIntegratedEndpoint)
    }

    /// Builds the capability (ID 0x10, version 2, 0x3c bytes).
    pub fn build(&self) -> Capability {
        let t = self.port_type;
        let mut cap = Capability::new(cap_id::PCI_EXPRESS, SIZE);
        cap.set_u16(
            FLAGS,
            2 | ((t as u16) << 4) | (u16::from(self.interrupt_message_number & 0x1f) << 9),
        );

        // Device Capabilities: MPS supported, extended tags, Role-Based Error Reporting (bit 15,
        // mandatory since PCIe 1.1), endpoint L0s/L1 acceptable latency "no limit" (7),
        // FLR.
        let mut devcap = u32::from(self.max_payload_supported.min(5)) | (1 << 15);
        if self.extended_tags {
            devcap |= 1 << 5;
        }
        if t.is_endpoint() {
            devcap |= (7 << 6) | (7 << 9);
            if self.flr {
                devcap |= DEVCAP_FLR;
            }
        }
        cap.set_u32(DEVCAP, devcap);

        // Device Control: error reporting enables (3:0), relaxed ordering (4), MPS (7:5),
        // ext tag (8), no snoop (11), MRRS (14:12). Defaults: RO + NS on, MRRS 512 B.
        let mut devctl_rw: u16 = 0x00ff | (1 << 11) | (0x7 << 12);
        if self.extended_tags {
            devctl_rw |= 1 << 8;
        }
        cap.set_u16(DEVCTL, (1 << 4) | (1 << 11) | (2 << 12))
            .writable_u16(DEVCTL, devctl_rw);
        // Device Status: error detected bits RW1C.
        cap.w1c_u16(DEVSTA, 0x000f);

        if t.has_link() {
            let speed = self.link_speed as u32;
            let width = u32::from(self.link_width & 0x3f);
            cap.set_u32(
                LNKCAP,
                speed | (width << 4) | (u32::from(self.port_number) << 24),
            );
            // Link Control: ASPM control (1:0), common clock (6), extended synch (7); RCB (3)
            // for endpoints, Link Disable (4) for downstream ports. Retrain Link (5) reads 0.
            let mut lnkctl_rw: u16 = 0x0003 | (1 << 6) | (1 << 7);
            if t.is_downstream_port() {
                lnkctl_rw |= 1 << 4;
                // Root ports report a 128-byte Read Completion Boundary.
                if t == PciePortType::RootPort {
                    cap.set_u16(LNKCTL, 1 << 3);
                }
            } else {
                lnkctl_rw |= 1 << 3;
            }
            cap.writable_u16(LNKCTL, lnkctl_rw);
            cap.set_u16(LNKSTA, (speed | (width << 4)) as u16);
            // Supported Link Speeds Vector: every speed up to the maximum.
            cap.set_u32(LNKCAP2, ((1u32 << speed) - 1) << 1);
            cap.set_u16(LNKCTL2, speed as u16)
                .writable_u16(LNKCTL2, 0x000f);
        }

        if t.has_root() {
            // System error on correctable/non-fatal/fatal, PME interrupt enable.
            cap.writable_u16(RTCTL, 0x000f);
            // PME Status RW1C.
            cap.w1c_u32(RTSTA, 1 << 16);
        }

        // Device Capabilities 2: extended fmt field (20) whenever we do TLP prefixes.
        let mut devcap2 = 0u32;
        let mut devctl2_rw = 0u16;
        if self.end_end_tlp_prefix {
            devcap2 |= (1 << 20) | (1 << 21);
        }
        if self.ari_forwarding && t.is_downstream_port() {
            devcap2 |= DEVCAP2_ARI;
            devctl2_rw |= DEVCTL2_ARI;
        }
        if t.is_endpoint() || t == PciePortType::RootPort {
            // AtomicOp Requester Enable.
            devctl2_rw |= 1 << 6;
        }
        cap.set_u32(DEVCAP2, devcap2)
            .writable_u16(DEVCTL2, devctl2_rw);
        cap
    }
}

#[cfg(test)]
mod tests {
    use super::super::capability::find_capability;
    use super::super::config::{ConfigSpace, HeaderType, PciIds};
    use super::*;

    fn space(cfg: PcieCapabilityConfig) -> (ConfigSpace, u16) {
        let mut c = ConfigSpace::new(
            HeaderType::Type0,
            PciIds {
                vendor_id: 1,
                device_id: 2,
                revision_id: 0,
                class_code: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            },
        );
        let off = c.add_capability(&cfg.build()).unwrap();
        (c, u16::from(off))
    }

    #[test]
    fn endpoint_layout() {
        let (mut c, o) = space(PcieCapabilityConfig::endpoint());
        assert_eq!(
            find_capability(&mut |off, d: &mut [u8]| c.read(off, d), 0x10),
            Some(o as u8)
        );
        assert_eq!(c.read_u16(o + FLAGS as u16), 0x0002);
        assert_eq!(c.read_u32(o + DEVCAP as u16) & 0x8027, 0x8021);
        // 16 GT/s x16 trained.
        assert_eq!(c.read_u32(o + LNKCAP as u16), 0x0000_0104);
        assert_eq!(c.read_u16(o + LNKSTA as u16), 0x0104);
        assert_eq!(c.read_u32(o + LNKCAP2 as u16), 0b1_1110);
        // DEVCTL: MPS field writable, FLR bit never sticks.
        c.write(o + DEVCTL as u16, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(o + DEVCTL as u16), 0x79ff);
        // DEVSTA RW1C.
        c.set_u16(o + DEVSTA as u16, 0x0009);
        c.write(o + DEVSTA as u16, &0x0001u16.to_le_bytes());
        assert_eq!(c.read_u16(o + DEVSTA as u16), 0x0008);
        // No root registers on an endpoint.
        c.write(o + RTCTL as u16, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(o + RTCTL as u16), 0);
        // Retrain link reads 0.
        c.write(o + LNKCTL as u16, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(o + LNKCTL as u16), 0x00cb);
    }

    #[test]
    fn root_port_layout() {
        let mut cfg = PcieCapabilityConfig::root_port(3);
        cfg.link_speed = LinkSpeed::Gt2_5;
        cfg.link_width = 1;
        let (mut c, o) = space(cfg);
        assert_eq!(c.read_u16(o + FLAGS as u16), 0x0042);
        assert_eq!(c.read_u32(o + LNKCAP as u16), 0x0300_0011);
        assert_eq!(c.read_u16(o + LNKSTA as u16), 0x0011);
        assert_eq!(c.read_u32(o + LNKCAP2 as u16), 0b10);
        // Slot not implemented: slot registers read 0 and are read-only.
        assert_eq!(c.read_u16(o + FLAGS as u16) & 0x0100, 0);
        c.write(o + SLTCTL as u16, &[0xff, 0xff]);
        assert_eq!(c.read_u32(o + SLTCAP as u16), 0);
        assert_eq!(c.read_u16(o + SLTCTL as u16), 0);
        // Root control writable, root status PME bit RW1C.
        c.write(o + RTCTL as u16, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(o + RTCTL as u16), 0x000f);
        c.set_u32(o + RTSTA as u16, 0x0001_0000);
        c.write(o + RTSTA as u16, &0x0001_0000u32.to_le_bytes());
        assert_eq!(c.read_u32(o + RTSTA as u16), 0);
        // RCB set and read-only on a root port; link disable writable.
        c.write(o + LNKCTL as u16, &[0, 0]);
        assert_eq!(c.read_u16(o + LNKCTL as u16), 0x0008);
    }

    #[test]
    fn rciep_has_no_link_registers() {
        let mut cfg = PcieCapabilityConfig::rc_integrated_endpoint();
        cfg.end_end_tlp_prefix = true;
        cfg.flr = true;
        let (c, o) = space(cfg);
        assert_eq!(c.read_u16(o + FLAGS as u16), 0x0092);
        assert_eq!(c.read_u32(o + LNKCAP as u16), 0);
        assert_eq!(c.read_u16(o + LNKSTA as u16), 0);
        assert_eq!(c.read_u32(o + LNKCAP2 as u16), 0);
        assert_ne!(c.read_u32(o + DEVCAP as u16) & DEVCAP_FLR, 0);
        assert_eq!(c.read_u32(o + DEVCAP2 as u16) & (3 << 20), 3 << 20);
    }

    #[test]
    fn port_type_decoding() {
        for t in [
            PciePortType::Endpoint,
            PciePortType::RootPort,
            PciePortType::DownstreamPort,
            PciePortType::RcIntegratedEndpoint,
        ] {
            assert_eq!(PciePortType::from_bits(t as u8), Some(t));
        }
        assert_eq!(PciePortType::from_bits(0xb), None);
        assert!(PciePortType::RootPort.is_downstream_port());
        assert!(!PciePortType::Endpoint.is_downstream_port());
    }
}
