//! Mailbox command vocabulary shared by the register model and the memory-device command set:
//! return codes, opcodes, Command Effects Log (CEL) entries, UUIDs and payload codecs.
//!
//! The register interface itself (CXL 2.0 §8.2.8.4 Mailbox Registers: capabilities, control,
//! command, status, background status, payload) lives with the register model; it hands each
//! doorbell to [`super::memdev::Memdev::execute`] and writes the returned [`ReturnCode`] into
//! bits [47:32] of the Mailbox Status register and the output length into bits [36:16] of the
//! Command register, which is what Linux's `__cxl_pci_mbox_send_cmd()` (`drivers/cxl/pci.c`)
//! reads back.

#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

/// Smallest payload area the spec allows and Linux accepts (`cxl_pci_setup_mailbox()` fails
/// with "Mailbox is too small" below 256 bytes). CXL 2.0 §8.2.8.4.3.
pub const MIN_PAYLOAD_SIZE: usize = 256;

/// Largest payload area the spec allows (Payload Size field 20 → 1 MiB). CXL 2.0 §8.2.8.4.3.
pub const MAX_PAYLOAD_SIZE: usize = 1 << 20;

/// Mailbox command return codes — CXL 2.0/3.0 §8.2.8.4.5.1 (CXL 3.0 Table 8-34).
///
/// Linux maps them to errnos in `cxl_mbox_cmd_rc2errno()` (`drivers/cxl/cxlmem.h`) by indexing
/// a table that ends at [`ReturnCode::InvalidExtentList`] (1Eh): a device must never report a
/// larger value, so this enum stops there too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ReturnCode {
    /// 00h: the command completed normally.
    Success = 0x00,
    /// 01h: a background command was started.
    BackgroundStarted = 0x01,
    /// 02h: a field of the input payload is invalid (Linux: -ENXIO).
    InvalidInput = 0x02,
    /// 03h: the command is not supported (`cxl_set_timestamp()` tolerates this one).
    Unsupported = 0x03,
    /// 04h: internal device error.
    InternalError = 0x04,
    /// 05h: temporary error, retry once.
    RetryRequired = 0x05,
    /// 06h: a background operation is in progress.
    Busy = 0x06,
    /// 07h: media access is disabled.
    MediaDisabled = 0x07,
    /// 08h: FW transfer in progress.
    FwTransferInProgress = 0x08,
    /// 09h: FW transfer out of order.
    FwTransferOutOfOrder = 0x09,
    /// 0Ah: FW verification failed.
    FwVerificationFailed = 0x0a,
    /// 0Bh: invalid FW slot.
    InvalidSlot = 0x0b,
    /// 0Ch: FW activation failed, rolled back.
    ActivationFailedRolledBack = 0x0c,
    /// 0Dh: FW activation failed, cold reset required.
    ActivationFailedColdReset = 0x0d,
    /// 0Eh: one or more event record handles were invalid.
    InvalidHandle = 0x0e,
    /// 0Fh: invalid physical address (Linux: -EFAULT; `cxl_get_poison_by_memdev()` ignores it
    /// for volatile partitions).
    InvalidPhysicalAddress = 0x0f,
    /// 10h: inject poison limit reached (Linux: -EBUSY).
    InjectPoisonLimitReached = 0x10,
    /// 11h: permanent media failure.
    PermanentMediaFailure = 0x11,
    /// 12h: background command aborted.
    Aborted = 0x12,
    /// 13h: not valid in the current security state.
    InvalidSecurityState = 0x13,
    /// 14h: incorrect passphrase.
    IncorrectPassphrase = 0x14,
    /// 15h: unsupported on the mailbox it was issued on.
    UnsupportedMailbox = 0x15,
    /// 16h: the input payload length is not valid for the command.
    InvalidPayloadLength = 0x16,
    /// 17h: invalid or unsupported log page (CXL 3.x).
    InvalidLog = 0x17,
    /// 18h: interrupted by an asynchronous event (CXL 3.x).
    Interrupted = 0x18,
    /// 19h: unsupported feature version (CXL 3.x).
    UnsupportedFeatureVersion = 0x19,
    /// 1Ah: unsupported feature selection value (CXL 3.x).
    UnsupportedFeatureSelectionValue = 0x1a,
    /// 1Bh: feature transfer in progress (CXL 3.x).
    FeatureTransferInProgress = 0x1b,
    /// 1Ch: feature transfer out of order (CXL 3.x).
    FeatureTransferOutOfOrder = 0x1c,
    /// 1Dh: resources exhausted (CXL 3.x).
    ResourcesExhausted = 0x1d,
    /// 1Eh: invalid extent list (CXL 3.x).
    InvalidExtentList = 0x1e,
}

impl ReturnCode {
    /// Value for bits [47:32] of the Mailbox Status register.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// Whether the command succeeded (only then does Linux read the output payload length).
    pub fn is_success(self) -> bool {
        self == ReturnCode::Success
    }
}

/// Command opcodes (CXL 3.0 §8.2.9 and §8.2.9.8 opcode tables; names as in Linux's
/// `enum cxl_opcode`, `drivers/cxl/cxlmem.h`).
pub mod opcode {
    /// Get Event Records — CXL 3.0 §8.2.9.2.2.
    pub const GET_EVENT_RECORDS: u16 = 0x0100;
    /// Clear Event Records — CXL 3.0 §8.2.9.2.3.
    pub const CLEAR_EVENT_RECORDS: u16 = 0x0101;
    /// Get Event Interrupt Policy — CXL 3.0 §8.2.9.2.4.
    pub const GET_EVT_INT_POLICY: u16 = 0x0102;
    /// Set Event Interrupt Policy — CXL 3.0 §8.2.9.2.5.
    pub const SET_EVT_INT_POLICY: u16 = 0x0103;
    /// Get FW Info — CXL 3.0 §8.2.9.3.1.
    pub const GET_FW_INFO: u16 = 0x0200;
    /// Transfer FW — CXL 3.0 §8.2.9.3.2 (unsupported).
    pub const TRANSFER_FW: u16 = 0x0201;
    /// Activate FW — CXL 3.0 §8.2.9.3.3 (unsupported).
    pub const ACTIVATE_FW: u16 = 0x0202;
    /// Get Timestamp — CXL 3.0 §8.2.9.4.1.
    pub const GET_TIMESTAMP: u16 = 0x0300;
    /// Set Timestamp — CXL 3.0 §8.2.9.4.2.
    pub const SET_TIMESTAMP: u16 = 0x0301;
    /// Get Supported Logs — CXL 3.0 §8.2.9.5.1.
    pub const GET_SUPPORTED_LOGS: u16 = 0x0400;
    /// Get Log — CXL 3.0 §8.2.9.5.2.
    pub const GET_LOG: u16 = 0x0401;
    /// Identify Memory Device — CXL 3.0 §8.2.9.8.1.1 (CXL 2.0 §8.2.9.5.1.1).
    pub const IDENTIFY: u16 = 0x4000;
    /// Get Partition Info — CXL 3.0 §8.2.9.8.2.1.
    pub const GET_PARTITION_INFO: u16 = 0x4100;
    /// Set Partition Info — CXL 3.0 §8.2.9.8.2.2 (unsupported: the device is not partitionable).
    pub const SET_PARTITION_INFO: u16 = 0x4101;
    /// Get LSA — CXL 3.0 §8.2.9.8.2.3.
    pub const GET_LSA: u16 = 0x4102;
    /// Set LSA — CXL 3.0 §8.2.9.8.2.4.
    pub const SET_LSA: u16 = 0x4103;
    /// Get Health Info — CXL 3.0 §8.2.9.8.3.1.
    pub const GET_HEALTH_INFO: u16 = 0x4200;
    /// Get Alert Configuration — CXL 3.0 §8.2.9.8.3.2 (unsupported).
    pub const GET_ALERT_CONFIG: u16 = 0x4201;
    /// Set Alert Configuration — CXL 3.0 §8.2.9.8.3.3 (unsupported).
    pub const SET_ALERT_CONFIG: u16 = 0x4202;
    /// Get Shutdown State — CXL 3.0 §8.2.9.8.3.4.
    pub const GET_SHUTDOWN_STATE: u16 = 0x4203;
    /// Set Shutdown State — CXL 3.0 §8.2.9.8.3.5.
    pub const SET_SHUTDOWN_STATE: u16 = 0x4204;
    /// Get Poison List — CXL 3.0 §8.2.9.8.4.1.
    pub const GET_POISON_LIST: u16 = 0x4300;
    /// Inject Poison — CXL 3.0 §8.2.9.8.4.2.
    pub const INJECT_POISON: u16 = 0x4301;
    /// Clear Poison — CXL 3.0 §8.2.9.8.4.3.
    pub const CLEAR_POISON: u16 = 0x4302;
    /// Get Scan Media Capabilities — CXL 3.0 §8.2.9.8.4.4 (unsupported).
    pub const GET_SCAN_MEDIA_CAPS: u16 = 0x4303;
    /// Scan Media — CXL 3.0 §8.2.9.8.4.5 (unsupported).
    pub const SCAN_MEDIA: u16 = 0x4304;
    /// Get Scan Media Results — CXL 3.0 §8.2.9.8.4.6 (unsupported).
    pub const GET_SCAN_MEDIA_RESULTS: u16 = 0x4305;
    /// Sanitize — CXL 3.0 §8.2.9.8.5.1 (unsupported).
    pub const SANITIZE: u16 = 0x4400;
    /// Secure Erase — CXL 3.0 §8.2.9.8.5.2 (unsupported).
    pub const SECURE_ERASE: u16 = 0x4401;
    /// Get Security State — CXL 3.0 §8.2.9.8.6.1.
    pub const GET_SECURITY_STATE: u16 = 0x4500;
}

/// Command Effect bits of a CEL entry — CXL 3.0 §8.2.9.5.2.1 (Command Effects Log).
pub mod effect {
    /// Configuration change after cold reset.
    pub const CONFIG_CHANGE_COLD_RESET: u16 = 1 << 0;
    /// Immediate configuration change.
    pub const IMMEDIATE_CONFIG_CHANGE: u16 = 1 << 1;
    /// Immediate data change.
    pub const IMMEDIATE_DATA_CHANGE: u16 = 1 << 2;
    /// Immediate policy change.
    pub const IMMEDIATE_POLICY_CHANGE: u16 = 1 << 3;
    /// Immediate log change.
    pub const IMMEDIATE_LOG_CHANGE: u16 = 1 << 4;
    /// Security state change.
    pub const SECURITY_STATE_CHANGE: u16 = 1 << 5;
    /// Background operation.
    pub const BACKGROUND_OPERATION: u16 = 1 << 6;
}

/// A UUID as the 16 bytes that appear in payloads: big-endian field order, as built by Linux's
/// `UUID_INIT()` and compared with `uuid_equal()`.
pub type Uuid = [u8; 16];

/// Build a [`Uuid`] from its textual fields (`aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee`).
pub const fn uuid(a: u32, b: u16, c: u16, d: [u8; 8]) -> Uuid {
    let a = a.to_be_bytes();
    let b = b.to_be_bytes();
    let c = c.to_be_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// Command Effects Log UUID 0da9c0b5-bf41-4b78-8f79-96b1623b3f17 — CXL 3.0 §8.2.9.5.2.1;
/// `DEFINE_CXL_CEL_UUID` in `drivers/cxl/cxlmem.h`, required by `cxl_enumerate_cmds()`.
pub const CEL_UUID: Uuid = uuid(
    0x0da9_c0b5,
    0xbf41,
    0x4b78,
    [0x8f, 0x79, 0x96, 0xb1, 0x62, 0x3b, 0x3f, 0x17],
);

/// One Command Effects Log entry — CXL 3.0 §8.2.9.5.2.1 (`struct cxl_cel_entry`, 4 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CelEntry {
    /// Command opcode.
    pub opcode: u16,
    /// Command effect bits ([`effect`]).
    pub effect: u16,
}

impl CelEntry {
    /// Size of one encoded entry.
    pub const SIZE: usize = 4;

    /// Little-endian encoding.
    pub fn to_bytes(self) -> [u8; 4] {
        let o = self.opcode.to_le_bytes();
        let e = self.effect.to_le_bytes();
        [o[0], o[1], e[0], e[1]]
    }
}

/// Bounds-checked little-endian reader over an input payload. Every accessor returns `None`
/// instead of panicking when the payload is too short.
#[derive(Debug, Clone, Copy)]
pub struct PayloadIn<'a>(pub &'a [u8]);

impl<'a> PayloadIn<'a> {
    /// Payload length.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `N` bytes at `off`.
    pub fn array<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let end = off.checked_add(N)?;
        self.0.get(off..end)?.try_into().ok()
    }

    /// Bytes from `off` to the end.
    pub fn tail(&self, off: usize) -> Option<&'a [u8]> {
        self.0.get(off..)
    }

    /// Byte at `off`.
    pub fn u8(&self, off: usize) -> Option<u8> {
        self.0.get(off).copied()
    }

    /// Little-endian u16 at `off`.
    pub fn u16(&self, off: usize) -> Option<u16> {
        self.array(off).map(u16::from_le_bytes)
    }

    /// Little-endian u32 at `off`.
    pub fn u32(&self, off: usize) -> Option<u32> {
        self.array(off).map(u32::from_le_bytes)
    }

    /// Little-endian u64 at `off`.
    pub fn u64(&self, off: usize) -> Option<u64> {
        self.array(off).map(u64::from_le_bytes)
    }
}

/// Copy `bytes` into `buf` at `off`; a write that does not fit is dropped (never panics).
pub fn put_bytes(buf: &mut [u8], off: usize, bytes: &[u8]) {
    if let Some(dst) = off
        .checked_add(bytes.len())
        .and_then(|end| buf.get_mut(off..end))
    {
        dst.copy_from_slice(bytes);
    }
}

/// Little-endian writer for output payloads of a fixed size. Writes that do not fit are
/// dropped (they cannot happen for the fixed layouts built here; this keeps the writer total).
#[derive(Debug, Clone)]
pub struct PayloadOut(Vec<u8>);

impl PayloadOut {
    /// A zero-filled payload of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        Self(vec![0; len])
    }

    /// Copy `bytes` to `off`.
    pub fn put(&mut self, off: usize, bytes: &[u8]) -> &mut Self {
        put_bytes(&mut self.0, off, bytes);
        self
    }

    /// Byte at `off`.
    pub fn u8(&mut self, off: usize, v: u8) -> &mut Self {
        self.put(off, &[v])
    }

    /// Little-endian u16 at `off`.
    pub fn u16(&mut self, off: usize, v: u16) -> &mut Self {
        self.put(off, &v.to_le_bytes())
    }

    /// Little-endian 24-bit value (low three bytes of `v`) at `off`.
    pub fn u24(&mut self, off: usize, v: u32) -> &mut Self {
        let b = v.to_le_bytes();
        self.put(off, &[b[0], b[1], b[2]])
    }

    /// Little-endian u32 at `off`.
    pub fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.put(off, &v.to_le_bytes())
    }

    /// Little-endian u64 at `off`.
    pub fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.put(off, &v.to_le_bytes())
    }

    /// The encoded payload.
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cel_uuid_matches_linux_byte_order() {
        // UUID_INIT(0xda9c0b5, 0xbf41, 0x4b78, 0x8f, 0x79, ...) lays out a, b, c big-endian.
        assert_eq!(
            CEL_UUID,
            [
                0x0d, 0xa9, 0xc0, 0xb5, 0xbf, 0x41, 0x4b, 0x78, 0x8f, 0x79, 0x96, 0xb1, 0x62, 0x3b,
                0x3f, 0x17
            ]
        );
    }

    #[test]
    fn return_codes_stay_inside_linux_table() {
        // cxl_mbox_cmd_rctable[] has 0x1f entries (SUCCESS .. EXTLIST).
        assert_eq!(ReturnCode::InvalidExtentList.as_u16(), 0x1e);
        assert_eq!(ReturnCode::InvalidPayloadLength.as_u16(), 0x16);
        assert_eq!(ReturnCode::InvalidPhysicalAddress.as_u16(), 0x0f);
    }

    #[test]
    fn payload_reader_is_total() {
        let p = PayloadIn(&[1, 2, 3]);
        assert_eq!(p.u16(1), Some(0x0302));
        assert_eq!(p.u32(0), None);
        assert_eq!(p.u64(usize::MAX), None);
        assert_eq!(p.tail(4), None);
        let mut o = PayloadOut::zeroed(4);
        o.u32(2, 0xdead_beef).u16(0, 0x0201);
        assert_eq!(o.into_vec(), vec![1, 2, 0, 0]);
    }
}
