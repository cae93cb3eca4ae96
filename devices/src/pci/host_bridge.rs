//! The host bridge at 00:00.0: class 0x060000, no BARs, no capabilities.
//!
//! Linux only needs it to exist (and reads its 4 KiB config space, since
//! `pci_cfg_space_size` probes extended space for host bridges). IDs: see [`super::ids`].

use super::config::{ConfigSpace, HeaderType, PciIds};
use super::{BarInfo, PciDevice, ids};

/// The root complex's host bridge function.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    /// A host bridge with the project's IDs.
    pub fn new() -> Self {
        HostBridge {
            config: ConfigSpace::new(
                HeaderType::Type0,
                PciIds {
                    vendor_id: ids::VENDOR_REDHAT,
                    device_id: ids::DEVICE_HOST_BRIDGE,
                    revision_id: 0,
                    class_code: ids::CLASS_HOST_BRIDGE,
                    subsystem_vendor_id: 0,
                    subsystem_id: 0,
                },
            ),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}

    fn bars(&self) -> Vec<BarInfo> {
        Vec::new()
    }

    fn name(&self) -> &str {
        "host-bridge"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_class() {
        let mut hb = HostBridge::new();
        let mut d = [0u8; 4];
        hb.config_read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        hb.config_read(8, &mut d);
        assert_eq!(u32::from_le_bytes(d) >> 8, 0x06_00_00);
        hb.config_read(0x0c, &mut d);
        assert_eq!(d[2], 0, "type 0 header, single function");
        hb.config_read(0x3c, &mut d);
        assert_eq!(d[1], 0, "no INTx pin");
        hb.config_read(0x100, &mut d);
        assert_eq!(d, [0; 4]);
        assert!(hb.bars().is_empty());
        hb.bar_read(0, 0, &mut d);
        assert_eq!(d, [0xff; 4]);
    }
}
