//! CXL 2.0 (Compute Express Link) Type 3 memory expansion: the device model an unmodified
//! Linux guest (`cxl_acpi`, `cxl_port`, `cxl_pci`, `cxl_mem`, `cxl_pmem`, `cxl_region`) drives.
//!
//! Topology (CXL 2.0 9.12, "virtual hierarchy"): the platform's ACPI0016 host bridge owns a
//! component register block at a fixed address (the CHBCR, [`host_bridge::CxlHostBridge`]);
//! below it sit CXL root ports ([`root_port::CxlRootPort`], PCIe port type 4) and below each
//! root port one Type 3 endpoint ([`type3::CxlType3Device`], class 0x050210).
//!
//! Module map:
//! - [`dvsec`]: the CXL DVSECs in PCIe extended config space (CXL 2.0 8.1);
//! - [`component`]: the component register block (CXL 2.0 8.2.5): CXL.cache/mem capability
//!   array, RAS, Link and HDM decoder capabilities, with commit validation;
//! - [`device_regs`]: the memory device register block (CXL 2.0 8.2.8): capability array,
//!   device status, primary mailbox, memory device status;
//! - [`type3`], [`root_port`], [`host_bridge`]: the three functions.
//!
//! The mailbox command set lives behind [`MailboxBackend`]; the host memory behind committed
//! HDM decoders is mapped by the VMM through [`HdmListener`]. Everything here is pure device
//! logic (no KVM): a fuzzer can drive config space, BARs and the CHBCR with arbitrary bytes.
//!
//! Register accesses: every block accepts naturally aligned 1-, 2-, 4- and 8-byte accesses
//! (8-byte ones are handled as two DWORDs, low first, like Linux's `lo_hi_writeq`); anything
//! else reads 0 and is ignored on write. The mailbox payload area also takes unaligned
//! accesses (it is plain memory, filled by `memcpy_toio`).

pub mod cdat;
pub mod component;
pub mod device_regs;
pub mod dvsec;
pub mod host_bridge;
pub mod root_port;
pub mod type3;
// The mailbox command set: `memdev::Memdev` implements [`MailboxBackend`].
pub mod events;
pub mod lsa;
pub mod mailbox;
pub mod memdev;
pub mod poison;

use std::sync::Arc;

use thiserror::Error;

use crate::bus::lock;
pub(crate) use crate::pci::registers::{DwordRegs, dword_read, dword_write, merge};
use crate::pci::{PciDevice, PciError};

pub use component::{ComponentRegisters, HdmConfig, HdmDecoderCapability, HdmRole, RasCapability};
pub use device_regs::DeviceRegisters;
pub use host_bridge::{CxlHostBridge, CxlHostBridgeConfig};
pub use root_port::CxlRootPort;
pub use type3::{CxlType3Device, Type3Config};

/// The CXL consortium's vendor ID, used in every CXL DVSEC header (CXL 2.0 8.1.1).
pub const CXL_VENDOR_ID: u16 = 0x1e98;
/// Class code of a CXL memory device: base 0x05 (memory), sub 0x02 (CXL), prog-if 0x10
/// (CXL 2.0 8.1.12.1; Linux `cxl_mem_pci_tbl`).
pub const CLASS_CXL_MEMORY: u32 = 0x05_02_10;
/// HDM decoder base, size and DPA skip granularity: 256 MiB (CXL 2.0 8.2.5.12.8 .. 8.2.5.12.11).
pub const HDM_GRANULE: u64 = 256 << 20;
/// Size of a component register block (CXL 2.0 8.2.4, Linux `CXL_COMPONENT_REG_BLOCK_SIZE`).
pub const COMPONENT_BLOCK_SIZE: u64 = 0x1_0000;

/// Mailbox return codes (CXL 2.0 8.2.8.4.5.1, Table 150).
pub mod mbox_rc {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Background command started (this model completes it at once, see
    /// [`super::DeviceRegisters`]).
    pub const BACKGROUND_STARTED: u16 = 0x0001;
    /// Invalid input.
    pub const INVALID_INPUT: u16 = 0x0002;
    /// Unsupported command.
    pub const UNSUPPORTED: u16 = 0x0003;
    /// Internal error.
    pub const INTERNAL_ERROR: u16 = 0x0004;
    /// Busy.
    pub const BUSY: u16 = 0x0006;
    /// Invalid payload length: the Command register's length exceeds the payload area.
    pub const INVALID_PAYLOAD_LENGTH: u16 = 0x0016;
}

/// The mailbox command set behind the primary mailbox (CXL 2.0 8.2.9). The register model
/// ([`DeviceRegisters`]) calls it synchronously when the guest rings the doorbell.
pub trait MailboxBackend: Send {
    /// Executes `opcode` with the input payload `input` (`input.len()` is the Command register's
    /// payload length, already checked against the payload area). Returns the return code
    /// ([`mbox_rc`]) and the output payload, at most `capacity` bytes (longer output is
    /// truncated and logged). Returning [`mbox_rc::BACKGROUND_STARTED`] means the command ran
    /// to completion in the background: the model reports it finished (100 %, success) in the
    /// Background Command Status register and raises the background interrupt if enabled.
    fn execute(&mut self, opcode: u16, input: &[u8], capacity: usize) -> (u16, Vec<u8>);

    /// Event Status register value (CXL 2.0 8.2.8.3.1): bit 0 informational, 1 warning,
    /// 2 failure, 3 fatal log has records. Linux's `cxl_event_thread` reads it after an event
    /// interrupt.
    fn event_status(&self) -> u32 {
        0
    }

    /// Memory Device Status register override (CXL 2.0 8.2.8.5.1); `None` keeps the default
    /// "media ready, mailbox interface ready".
    fn memdev_status(&self) -> Option<u64> {
        None
    }
}

/// A backend that supports no command (every opcode returns [`mbox_rc::UNSUPPORTED`]). For
/// tests, fuzzing, and as a placeholder until the real command set is attached.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnsupportedMailbox;

impl MailboxBackend for UnsupportedMailbox {
    fn execute(&mut self, _opcode: u16, _input: &[u8], _capacity: usize) -> (u16, Vec<u8>) {
        (mbox_rc::UNSUPPORTED, Vec::new())
    }
}

/// A host physical address window HDM decoders may map into: a CEDT CFMWS window that targets
/// the decoder's host bridge (CXL 2.0 9.14.1.3). Base and size are multiples of 256 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HpaWindow {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
    /// Volatile memory may be mapped here (CFMWS restriction bit 2).
    pub volatile: bool,
    /// Persistent memory may be mapped here (CFMWS restriction bit 3).
    pub persistent: bool,
}

impl HpaWindow {
    /// A window accepting both volatile and persistent memory.
    pub fn new(base: u64, size: u64) -> Self {
        HpaWindow {
            base,
            size,
            volatile: true,
            persistent: true,
        }
    }

    /// True if `[base, base + size)` lies inside the window.
    pub fn contains(&self, base: u64, size: u64) -> bool {
        let (Some(end), Some(wend)) = (base.checked_add(size), self.base.checked_add(self.size))
        else {
            return false;
        };
        base >= self.base && end <= wend
    }
}

/// Device capacity partitions (CXL 2.0 8.2.9.5: volatile first, then persistent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Partition {
    /// DPA `[0, volatile_size)`.
    Volatile,
    /// DPA `[volatile_size, volatile_size + persistent_size)`.
    Persistent,
}

/// Interleave of a committed decoder (CXL 2.0 8.2.5.12.7: IW and IG of the Decoder Control
/// register), with the address arithmetic of 8.2.5.12.20 / CXL 3.1 8.2.4.20.13 for the modulo
/// arithmetic this model implements (ways 1, 2, 4, 8; granularity 256 B … 16 KiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interleave {
    /// Interleave ways: 1, 2, 4 or 8.
    pub ways: u8,
    /// Interleave granularity in bytes: 256 << IG.
    pub granularity: u32,
}

impl Interleave {
    /// No interleave (1-way, 256 B: what Linux programs for a 1-way decoder).
    pub const NONE: Interleave = Interleave {
        ways: 1,
        granularity: 256,
    };

    /// Decodes the IW and IG fields, or says which one is outside this model's support.
    pub fn from_encodings(eiw: u8, eig: u8) -> Result<Self, HdmError> {
        let ways = match eiw {
            0..=3 => 1u8 << eiw,
            _ => return Err(HdmError::Interleave(eiw)),
        };
        if eig > 6 {
            return Err(HdmError::Granularity(eig));
        }
        Ok(Interleave {
            ways,
            granularity: 256 << eig,
        })
    }

    /// The target list position an offset from the decoder base goes to.
    pub fn position(&self, offset: u64) -> usize {
        ((offset / u64::from(self.granularity)) % u64::from(self.ways)) as usize
    }

    /// The endpoint's DPA offset for an HPA offset from the decoder base: the interleave
    /// selector bits `[IG + 8, IG + 8 + log2(ways))` are removed (CXL 3.1 8.2.4.20.13).
    pub fn dpa_offset(&self, offset: u64) -> u64 {
        let g = u64::from(self.granularity);
        (offset / (g * u64::from(self.ways))) * g + offset % g
    }
}

/// Where a committed decoder sends its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeTarget {
    /// Endpoint decoder: device physical addresses.
    Memory {
        /// First DPA (CXL 2.0 8.2.5.12.20: Σ (skip + size / ways) of lower decoders + own
        /// skip).
        dpa_base: u64,
        /// The partition the whole range lies in.
        partition: Partition,
        /// `dpa_base` relative to the start of `partition` (the offset into that partition's
        /// backing).
        partition_offset: u64,
    },
    /// Switch / host bridge decoder: the downstream ports (Port Numbers of the root ports'
    /// Link Capabilities) of the target list; entries `0..ways` are meaningful.
    Ports([u8; 8]),
}

/// A committed HDM decoder range, as reported to the [`HdmListener`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommittedRange {
    /// Decoder index in its HDM decoder capability.
    pub decoder_index: usize,
    /// First host physical address.
    pub hpa_base: u64,
    /// Length in bytes of host physical address space (multiple of 256 MiB × ways).
    pub size: u64,
    /// Interleave ways and granularity.
    pub interleave: Interleave,
    /// Where the range goes.
    pub target: DecodeTarget,
}

impl CommittedRange {
    /// First DPA for an endpoint decoder.
    pub fn dpa_base(&self) -> Option<u64> {
        match self.target {
            DecodeTarget::Memory { dpa_base, .. } => Some(dpa_base),
            DecodeTarget::Ports(_) => None,
        }
    }

    /// Bytes of device capacity an endpoint decoder decodes: its HPA size over the ways.
    pub fn dpa_size(&self) -> u64 {
        self.size / u64::from(self.interleave.ways)
    }

    /// True if `hpa` is inside the range.
    pub fn contains(&self, hpa: u64) -> bool {
        hpa >= self.hpa_base && hpa - self.hpa_base < self.size
    }

    /// Switch / host bridge decoders: the downstream port `hpa` (inside the range) routes to.
    pub fn route(&self, hpa: u64) -> Option<u8> {
        match self.target {
            DecodeTarget::Ports(t) if self.contains(hpa) => {
                Some(t[self.interleave.position(hpa - self.hpa_base)])
            }
            _ => None,
        }
    }

    /// Endpoint decoders: the DPA `hpa` (inside the range) decodes to.
    pub fn dpa(&self, hpa: u64) -> Option<u64> {
        let base = self.dpa_base()?;
        self.contains(hpa)
            .then(|| base + self.interleave.dpa_offset(hpa - self.hpa_base))
    }
}

/// Receives HDM decoder commits and uncommits. For endpoint decoders the VMM maps (unmaps) a
/// KVM memory slot at `hpa_base` backed by the device's memory at the DPA. Called with the
/// device's lock held, from the vCPU thread that wrote the decoder control register.
pub trait HdmListener: Send + Sync {
    /// A decoder passed validation. Returning an error refuses the commit: the decoder reports
    /// Error Not Committed.
    fn committed(&self, range: &CommittedRange) -> Result<(), String>;
    /// A committed decoder was uncommitted (Commit cleared, or the device was reset).
    fn uncommitted(&self, range: &CommittedRange);
}

/// Why an HDM decoder commit was refused (CXL 2.0 8.2.5.12.20, plus this model's limits).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum HdmError {
    /// No such decoder.
    #[error("no HDM decoder {0}")]
    NoSuchDecoder(usize),
    /// The decoder is committed already.
    #[error("decoder {0} is already committed")]
    AlreadyCommitted(usize),
    /// The HDM Decoder Enable bit of the Global Control register is clear.
    #[error("HDM decoders are globally disabled")]
    HdmDisabled,
    /// The endpoint's DVSEC Mem_Enable is clear.
    #[error("CXL.mem is disabled (DVSEC Mem_Enable clear)")]
    MemDisabled,
    /// Decoder n committed before decoder n-1.
    #[error("decoder {0} committed before decoder {prev}", prev = .0 - 1)]
    OutOfOrder(usize),
    /// Interleave ways encoding other than 1, 2, 4 or 8 ways (3/6/12-way need CXL 3.0).
    #[error("interleave ways encoding {0} unsupported (1, 2, 4 or 8 ways)")]
    Interleave(u8),
    /// More interleave ways than the decoder has targets.
    #[error("{ways}-way interleave exceeds the decoder's {targets} targets")]
    TooManyWays {
        /// Ways programmed.
        ways: u8,
        /// Target count of the decoder capability.
        targets: usize,
    },
    /// Size (or base) not a multiple of 256 MiB × ways: each device's share of the range
    /// must be whole 256 MiB units (CXL 2.0 8.2.5.12.20).
    #[error("range {base:#x}+{size:#x} is not a multiple of 256 MiB x {ways} ways")]
    InterleaveAlignment {
        /// Base HPA.
        base: u64,
        /// Size.
        size: u64,
        /// Ways programmed.
        ways: u8,
    },
    /// A target list entry within the ways names the same port twice.
    #[error("target list names port {0} twice")]
    DuplicateTarget(u8),
    /// Reserved interleave granularity encoding.
    #[error("interleave granularity encoding {0} reserved")]
    Granularity(u8),
    /// Size 0.
    #[error("decoder size is 0")]
    ZeroSize,
    /// Base or size not a multiple of 256 MiB.
    #[error("base {base:#x} / size {size:#x} not 256 MiB aligned")]
    Misaligned {
        /// Base HPA.
        base: u64,
        /// Size.
        size: u64,
    },
    /// Range wraps around or is beyond 2^52.
    #[error("range {base:#x}+{size:#x} exceeds the 52-bit host physical address space")]
    OutOfAddressSpace {
        /// Base HPA.
        base: u64,
        /// Size.
        size: u64,
    },
    /// The range is not inside a window this decoder may use.
    #[error("range {base:#x}+{size:#x} is outside every CXL window of this decoder")]
    OutsideWindows {
        /// Base HPA.
        base: u64,
        /// Size.
        size: u64,
    },
    /// Overlaps another committed decoder.
    #[error("range overlaps committed decoder {0}")]
    Overlap(usize),
    /// Decoders must decode increasing HPA ranges in index order (CXL 2.0 8.2.5.12.20).
    #[error("range violates HPA order with committed decoder {0}")]
    HpaOrder(usize),
    /// The DPA range runs past the device's capacity.
    #[error("DPA range {dpa:#x}+{size:#x} exceeds the device capacity {capacity:#x}")]
    DpaOutOfRange {
        /// First DPA.
        dpa: u64,
        /// Length.
        size: u64,
        /// Total capacity.
        capacity: u64,
    },
    /// The DPA range spans the volatile/persistent boundary.
    #[error("DPA range {dpa:#x}+{size:#x} spans both partitions")]
    SpansPartitions {
        /// First DPA.
        dpa: u64,
        /// Length.
        size: u64,
    },
    /// No window containing the range allows this partition's memory type.
    #[error("no window containing the range accepts {0:?} memory")]
    WindowType(Partition),
    /// A target list entry within the ways names no downstream port.
    #[error("target port {0} does not exist")]
    UnknownTarget(u8),
    /// The VMM refused the mapping.
    #[error("mapping refused: {0}")]
    Refused(String),
}

/// Errors building a CXL function (VMM side; guest accesses never error).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CxlError {
    /// Invalid configuration value.
    #[error("invalid CXL configuration: {0}")]
    InvalidConfig(&'static str),
    /// PCI layout error.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// A firmware-style commit failed.
    #[error(transparent)]
    Hdm(#[from] HdmError),
}

/// Fuzzing entry point: builds a host bridge (CHBCR), a CXL root port and a Type 3 device
/// (1 GiB volatile + 1 GiB persistent, one 4 GiB window; the bridge has root ports 1 and 2, so
/// interleaved target lists are checked) and interprets `bytes` as guest accesses to their
/// config spaces, BARs and the CHBCR. The listener asserts what every commit must satisfy:
/// ways 1, 2, 4 or 8, granularity 256 B … 16 KiB, base and size whole 256 MiB × ways, a DPA
/// share inside one partition, target lists of distinct known ports, no overlap.
///
/// Each step reads: selector (1 byte: bits 2:0 pick type3 config / type3 BAR / root port
/// config / root port BAR / CHBCR / type3 precommit, bit 3 write, bits 6:4 the access size
/// 0, 1, 2, 3, 4, 8, 9 or 16 bytes), BAR index (1 byte), offset (4 bytes), then the data for
/// writes. Writes to HDM decoder registers are common enough in practice that the offsets
/// reach them often.
///
/// # Panics
/// Only when an invariant breaks: a range handed to the HDM listener outside the window, the
/// device's capacity or one partition, or overlapping another live range of the same decoder
/// set.
pub fn fuzz_cxl(bytes: &[u8]) {
    use std::sync::Mutex as M;

    const WIN: u64 = 0x40_0000_0000;
    const SIZE: u64 = 4 << 30;
    const VOL: u64 = 1 << 30;
    const PERS: u64 = 1 << 30;

    #[derive(Default)]
    struct Checker {
        live: M<Vec<CommittedRange>>,
    }
    impl HdmListener for Checker {
        fn committed(&self, r: &CommittedRange) -> Result<(), String> {
            assert!(
                r.hpa_base >= WIN && r.hpa_base + r.size <= WIN + SIZE,
                "outside window"
            );
            if let DecodeTarget::Memory {
                dpa_base,
                partition,
                partition_offset,
            } = r.target
            {
                let (start, len) = match partition {
                    Partition::Volatile => (0, VOL),
                    Partition::Persistent => (VOL, PERS),
                };
                assert!(
                    dpa_base >= start && dpa_base + r.dpa_size() <= start + len,
                    "outside partition"
                );
                assert_eq!(partition_offset, dpa_base - start);
            }
            let ways = r.interleave.ways;
            assert!(matches!(ways, 1 | 2 | 4 | 8), "{ways} ways");
            assert!(
                r.size.is_multiple_of(HDM_GRANULE * u64::from(ways))
                    && r.hpa_base.is_multiple_of(HDM_GRANULE * u64::from(ways)),
                "range not a multiple of 256 MiB x ways: {r:?}"
            );
            assert!(r.interleave.granularity.is_power_of_two());
            assert!((256..=16384).contains(&r.interleave.granularity));
            if let DecodeTarget::Ports(t) = r.target {
                // The bridge has two root ports (Port Numbers 1 and 2).
                assert!(ways <= 2, "more ways than targets");
                let used = &t[..usize::from(ways)];
                assert!(used.iter().all(|p| [1, 2].contains(p)), "unknown port");
                assert!(ways == 1 || used[0] != used[1], "a port twice");
            }
            let mut live = lock(&self.live);
            for x in live.iter() {
                let same_set = matches!(x.target, DecodeTarget::Ports(_))
                    == matches!(r.target, DecodeTarget::Ports(_));
                assert!(
                    !same_set
                        || r.hpa_base + r.size <= x.hpa_base
                        || x.hpa_base + x.size <= r.hpa_base,
                    "overlapping live ranges"
                );
            }
            live.push(*r);
            Ok(())
        }
        fn uncommitted(&self, r: &CommittedRange) {
            lock(&self.live).retain(|x| x != r);
        }
    }

    let checker = Arc::new(Checker::default());
    let window = vec![HpaWindow::new(WIN, SIZE)];
    let mut cfg = Type3Config::new(VOL, PERS);
    cfg.windows = window.clone();
    cfg.listener = Some(checker.clone());
    let msi: Arc<dyn iommu::MsiSink> = Arc::new(iommu::NullMsiSink);
    let (Ok(mut dev), Ok(mut port), Ok(mut hb)) = (
        CxlType3Device::new(cfg, Box::new(UnsupportedMailbox), msi.clone()),
        CxlRootPort::new(crate::pci::RootPortConfig::cxl(1), msi),
        CxlHostBridge::new(CxlHostBridgeConfig {
            listener: Some(checker.clone()),
            ..CxlHostBridgeConfig::new(vec![1, 2], window)
        }),
    ) else {
        return;
    };
    let mut rest = bytes;
    while let [sel, bar, o0, o1, o2, o3, tail @ ..] = rest {
        let offset = u64::from(u32::from_le_bytes([*o0, *o1, *o2, *o3]));
        let len = [0usize, 1, 2, 3, 4, 8, 9, 16][usize::from((sel >> 4) & 7)];
        let write = sel & 8 != 0;
        let (data, next) = if write {
            tail.split_at(len.min(tail.len()))
        } else {
            (&[][..], tail)
        };
        rest = next;
        let mut buf = vec![0u8; len];
        match (sel & 7, write) {
            (0, true) => dev.config_write(offset as u16, data),
            (0, false) => dev.config_read(offset as u16, &mut buf),
            (1, true) => dev.bar_write(*bar, offset, data),
            (1, false) => dev.bar_read(*bar, offset, &mut buf),
            (2, true) => port.config_write(offset as u16, data),
            (2, false) => port.config_read(offset as u16, &mut buf),
            (3, true) => port.bar_write(*bar, offset, data),
            (3, false) => port.bar_read(*bar, offset, &mut buf),
            (4, true) => crate::bus::BusDevice::write(&mut hb, offset, data),
            (4, false) => crate::bus::BusDevice::read(&mut hb, offset, &mut buf),
            (5, _) => {
                let hpa = WIN + u64::from(*o0 & 0x1f) * HDM_GRANULE;
                let size = u64::from(*o1 & 7) * HDM_GRANULE;
                let skip = u64::from(*o2 & 7) * HDM_GRANULE;
                let _ = dev.precommit(usize::from(*bar & 3), hpa, size, skip, *o3 & 1 != 0);
                let _ = hb.precommit(usize::from(*bar & 3), hpa, size, *o3 >> 1, false);
            }
            _ => {
                dev.reset();
                hb.reset();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_entry_point_runs_random_inputs() {
        let mut rng = testutil::Rng(99);
        for _ in 0..200 {
            let len = rng.below(4000) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            fuzz_cxl(&bytes);
        }
        // A hand-made input: precommit, then a guest tearing down through the BAR.
        fuzz_cxl(&[5, 0, 0, 2, 0, 2, 0x4d, 0, 0x10, 0x14, 0, 0, 0, 0, 0, 0]);
        fuzz_cxl(&[]);
    }

    #[test]
    fn windows_and_ranges() {
        let w = HpaWindow::new(0x40_0000_0000, 1 << 30);
        assert!(w.contains(0x40_0000_0000, 1 << 30));
        assert!(w.contains(0x40_1000_0000, 0x1000_0000));
        assert!(!w.contains(0x40_1000_0000, 1 << 30));
        assert!(!w.contains(u64::MAX, 2));
        let r = CommittedRange {
            decoder_index: 0,
            hpa_base: 0x1000,
            size: 0x1000,
            interleave: Interleave::NONE,
            target: DecodeTarget::Ports([3, 0, 0, 0, 0, 0, 0, 0]),
        };
        assert!(r.contains(0x1fff) && !r.contains(0x2000) && !r.contains(0xfff));
        assert_eq!(r.dpa_base(), None);
        assert_eq!(
            HdmError::OutOfOrder(1).to_string(),
            "decoder 1 committed before decoder 0"
        );
    }
    #[test]
    fn interleave_arithmetic_removes_the_selector_bits() {
        // 2-way, 4 KiB: granules alternate between positions 0 and 1, each device's DPA
        // advancing by one granule every two.
        let two = Interleave::from_encodings(1, 4).unwrap();
        assert_eq!((two.ways, two.granularity), (2, 4096));
        assert_eq!((two.position(0x10), two.dpa_offset(0x10)), (0, 0x10));
        assert_eq!((two.position(0x1010), two.dpa_offset(0x1010)), (1, 0x10));
        assert_eq!((two.position(0x2010), two.dpa_offset(0x2010)), (0, 0x1010));
        // 4-way, 256 B.
        let four = Interleave::from_encodings(2, 0).unwrap();
        assert_eq!((four.position(0x7ff), four.dpa_offset(0x7ff)), (3, 0x1ff));
        assert_eq!(Interleave::from_encodings(0, 0).unwrap(), Interleave::NONE);
        assert_eq!(Interleave::from_encodings(3, 6).unwrap().granularity, 16384);
        // 16-way and the CXL 3.0 3/6/12-way encodings are not modelled; IG 7+ is reserved.
        for eiw in [4u8, 8, 9, 10, 15] {
            assert_eq!(
                Interleave::from_encodings(eiw, 0),
                Err(HdmError::Interleave(eiw))
            );
        }
        assert_eq!(
            Interleave::from_encodings(0, 7),
            Err(HdmError::Granularity(7))
        );
        let r = CommittedRange {
            decoder_index: 0,
            hpa_base: 0x1_0000_0000,
            size: 1 << 30,
            interleave: two,
            target: DecodeTarget::Ports([5, 7, 0, 0, 0, 0, 0, 0]),
        };
        assert_eq!(r.route(0x1_0000_0fff), Some(5));
        assert_eq!(r.route(0x1_0000_1000), Some(7));
        assert_eq!(r.route(0x1_4000_0000), None);
    }
}

/// Shared test helpers: a recording listener and a small deterministic PRNG.
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use std::sync::Mutex;

    /// Records commits and uncommits; refuses commits while `refuse` is set.
    #[derive(Default)]
    pub struct RecordingListener {
        pub events: Mutex<Vec<(bool, CommittedRange)>>,
        pub refuse: std::sync::atomic::AtomicBool,
    }

    impl RecordingListener {
        pub fn take(&self) -> Vec<(bool, CommittedRange)> {
            std::mem::take(&mut *lock(&self.events))
        }
    }

    impl HdmListener for RecordingListener {
        fn committed(&self, range: &CommittedRange) -> Result<(), String> {
            if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
                return Err("no memory slot left".into());
            }
            lock(&self.events).push((true, *range));
            Ok(())
        }
        fn uncommitted(&self, range: &CommittedRange) {
            lock(&self.events).push((false, *range));
        }
    }

    /// xorshift64*.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            if n == 0 { 0 } else { self.next() % n }
        }
    }
}
