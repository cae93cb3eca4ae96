//! MSI-X (PCI Local Bus Spec 3.0, 6.8.2; PCIe Base Spec r6.0, 7.7.2).
//!
//! [`MsixTable`] holds the vector table (16-byte entries: message address low/high, message data,
//! vector control with the per-vector Mask bit) and the Pending Bit Array, and delivers messages
//! through an [`MsiSink`]. [`MsixCapability`] ties a table to a function's config space (the
//! capability's Message Control holds MSI-X Enable and Function Mask) and to the BAR(s) that hold
//! the table and the PBA.
//!
//! Delivery rules: with MSI-X disabled nothing is sent and nothing becomes pending; with the
//! function masked or the vector masked the vector's pending bit is set; when the vector (or the
//! function) is unmasked while enabled, pending vectors are delivered and their bits cleared.

use std::sync::Arc;

use iommu::{MsiMessage, MsiSink, RequesterId};

use super::capability::{Capability, cap_id};
use super::config::{COMMAND, ConfigSpace};
use super::{PciError, le_store, le_value};

/// Size of one table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Largest table (Table Size field is 11 bits, N-1 encoded).
pub const MAX_VECTORS: u16 = 2048;
/// Message Control: MSI-X Enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message Control: Function Mask.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector Control: Mask Bit.
pub const VECTOR_MASKED: u32 = 1;

/// One MSI-X table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message Address (low 2 bits always 0).
    pub address: u64,
    /// Message Data.
    pub data: u32,
    /// Vector Control (bit 0 = Mask).
    pub control: u32,
}

impl Default for MsixEntry {
    /// Reset state: masked (PCI Local Bus Spec 3.0, 6.8.2.9).
    fn default() -> Self {
        MsixEntry {
            address: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

impl MsixEntry {
    /// True if the per-vector Mask bit is set.
    pub fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.address.to_le_bytes());
        b[8..12].copy_from_slice(&self.data.to_le_bytes());
        b[12..16].copy_from_slice(&self.control.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; 16]) -> Self {
        let q = |r: std::ops::Range<usize>| le_value(&b[r]);
        MsixEntry {
            address: q(0..8) & !3,
            data: q(8..12) as u32,
            // Only the Mask bit is implemented; other bits are reserved (or TPH steering tags
            // we do not support) and read 0.
            control: (q(12..16) as u32) & VECTOR_MASKED,
        }
    }
}

/// What happened to a triggered vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixTriggerResult {
    /// The message was handed to the sink.
    Delivered,
    /// The vector or function is masked: the pending bit is set.
    Pending,
    /// MSI-X is disabled: nothing happened.
    Disabled,
    /// The vector number is outside the table.
    InvalidVector,
    /// The sink refused the message (logged).
    DeliveryFailed,
    /// Bus Master Enable is clear: the function may not issue the memory write (PCIe Base Spec
    /// r6.0, 7.5.1.1.3), the message is dropped.
    BusMasterDisabled,
}

/// MSI-X vector table and Pending Bit Array.
pub struct MsixTable {
    entries: Vec<MsixEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_mask: bool,
    bus_master: bool,
    sink: Arc<dyn MsiSink>,
    requester_id: RequesterId,
}

impl std::fmt::Debug for MsixTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixTable")
            .field("vectors", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("function_mask", &self.function_mask)
            .field("requester_id", &self.requester_id)
            .finish_non_exhaustive()
    }
}

/// Validates an access of `len` bytes at `offset` into a region of `size` bytes: 1, 2, 4 or 8
/// bytes, naturally aligned, inside the region. The spec requires DWORD or aligned QWORD
/// accesses; narrower aligned accesses are served too (harmless and what some guests do).
fn access_ok(offset: u64, len: usize, size: u64) -> bool {
    matches!(len, 1 | 2 | 4 | 8)
        && offset.is_multiple_of(len as u64)
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
}

impl MsixTable {
    /// A table of `num_vectors` (clamped to 1..=2048) masked entries, disabled, with Bus Master
    /// Enable clear.
    pub fn new(num_vectors: u16, sink: Arc<dyn MsiSink>, requester_id: RequesterId) -> Self {
        let n = usize::from(num_vectors.clamp(1, MAX_VECTORS));
        MsixTable {
            entries: vec![MsixEntry::default(); n],
            pba: vec![0; n.div_ceil(64)],
            enabled: false,
            function_mask: false,
            bus_master: false,
            sink,
            requester_id,
        }
    }

    /// Number of vectors.
    pub fn num_vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Bytes occupied by the table.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Bytes occupied by the PBA (QWORD granular).
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// MSI-X Enable as last set through [`MsixTable::set_control`].
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Function Mask as last set.
    pub fn function_masked(&self) -> bool {
        self.function_mask
    }

    /// The entry for `vector`, if it exists.
    pub fn entry(&self, vector: u16) -> Option<MsixEntry> {
        self.entries.get(usize::from(vector)).copied()
    }

    /// The pending bit of `vector` (false if out of range).
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        v < self.entries.len() && self.pba[v / 64] & (1 << (v % 64)) != 0
    }

    /// Tags future messages with a new requester ID.
    pub fn set_requester_id(&mut self, requester_id: RequesterId) {
        self.requester_id = requester_id;
    }

    /// Guest read of the vector table; malformed or out-of-range accesses read all-ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        if !access_ok(offset, data.len(), self.table_size()) {
            data.fill(0xff);
            return;
        }
        let entry = self.entries[(offset / ENTRY_SIZE) as usize].to_bytes();
        let o = (offset % ENTRY_SIZE) as usize;
        data.copy_from_slice(&entry[o..o + data.len()]);
    }

    /// Guest write of the vector table; malformed or out-of-range accesses are ignored.
    /// Unmasking a pending vector while enabled delivers it.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !access_ok(offset, data.len(), self.table_size()) {
            log::debug!(
                "ignoring MSI-X table write at {offset:#x} len {}",
                data.len()
            );
            return;
        }
        let v = (offset / ENTRY_SIZE) as usize;
        let mut bytes = self.entries[v].to_bytes();
        let o = (offset % ENTRY_SIZE) as usize;
        bytes[o..o + data.len()].copy_from_slice(data);
        let was_masked = self.entries[v].masked();
        self.entries[v] = MsixEntry::from_bytes(&bytes);
        if was_masked && !self.entries[v].masked() {
            self.deliver_if_pending(v);
        }
    }

    /// Guest read of the PBA; malformed or out-of-range accesses read all-ones.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        if !access_ok(offset, data.len(), self.pba_size()) {
            data.fill(0xff);
            return;
        }
        let q = self.pba[(offset / 8) as usize];
        le_store(q >> (8 * (offset % 8)), data);
    }

    /// Guest write of the PBA: read-only, ignored.
    pub fn write_pba(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "ignoring write to read-only MSI-X PBA at {offset:#x} len {}",
            data.len()
        );
    }

    /// Updates MSI-X Enable and Function Mask (from Message Control). Enabling or unmasking the
    /// function delivers pending, unmasked vectors.
    pub fn set_control(&mut self, enabled: bool, function_mask: bool) {
        self.enabled = enabled;
        self.function_mask = function_mask;
        if enabled && !function_mask {
            for v in 0..self.entries.len() {
                self.deliver_if_pending(v);
            }
        }
    }

    /// Tracks the function's Bus Master Enable. Setting it delivers pending, unmasked vectors
    /// (they could not be sent while it was clear).
    pub fn set_bus_master(&mut self, enabled: bool) {
        let rising = enabled && !self.bus_master;
        self.bus_master = enabled;
        if rising {
            for v in 0..self.entries.len() {
                self.deliver_if_pending(v);
            }
        }
    }

    /// Signals `vector`.
    pub fn trigger(&mut self, vector: u16) -> MsixTriggerResult {
        let v = usize::from(vector);
        if v >= self.entries.len() {
            log::debug!("MSI-X vector {vector} out of range");
            return MsixTriggerResult::InvalidVector;
        }
        if !self.enabled {
            return MsixTriggerResult::Disabled;
        }
        if self.function_mask || self.entries[v].masked() {
            self.pba[v / 64] |= 1 << (v % 64);
            return MsixTriggerResult::Pending;
        }
        if !self.bus_master {
            log::debug!(
                "{}: MSI-X vector {v} dropped, bus mastering disabled",
                self.requester_id
            );
            return MsixTriggerResult::BusMasterDisabled;
        }
        self.send(v)
    }

    /// Back to the reset state (all vectors masked, nothing pending, disabled), e.g. on FLR.
    pub fn reset(&mut self) {
        self.entries.fill(MsixEntry::default());
        self.pba.fill(0);
        self.enabled = false;
        self.function_mask = false;
        self.bus_master = false;
    }

    fn deliver_if_pending(&mut self, v: usize) {
        let bit = 1u64 << (v % 64);
        if self.enabled
            && self.bus_master
            && !self.function_mask
            && !self.entries[v].masked()
            && self.pba[v / 64] & bit != 0
        {
            self.pba[v / 64] &= !bit;
            self.send(v);
        }
    }

    fn send(&self, v: usize) -> MsixTriggerResult {
        let e = self.entries[v];
        let msg = MsiMessage {
            address: e.address,
            data: e.data,
            requester_id: self.requester_id,
        };
        match self.sink.deliver(msg) {
            Ok(()) => MsixTriggerResult::Delivered,
            Err(err) => {
                log::warn!(
                    "{}: MSI-X vector {v} ({:#x}/{:#x}) not delivered: {err}",
                    self.requester_id,
                    e.address,
                    e.data
                );
                MsixTriggerResult::DeliveryFailed
            }
        }
    }
}

/// Where an MSI-X table and PBA live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    /// Number of vectors (1..=2048).
    pub num_vectors: u16,
    /// BAR Indicator Register of the table.
    pub table_bar: u8,
    /// Offset of the table in its BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR Indicator Register of the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in its BAR (8-byte aligned).
    pub pba_offset: u32,
}

/// An MSI-X capability in a function's config space plus its table.
#[derive(Debug)]
pub struct MsixCapability {
    cap_offset: u16,
    layout: MsixLayout,
    table: MsixTable,
}

impl MsixCapability {
    /// Adds the MSI-X capability (ID 0x11, 12 bytes) to `config` and creates the table. The BARs
    /// named in `layout` must already be defined in `config` and large enough; table and PBA
    /// must be 8-byte aligned and must not overlap.
    pub fn new(
        config: &mut ConfigSpace,
        layout: MsixLayout,
        sink: Arc<dyn MsiSink>,
        requester_id: RequesterId,
    ) -> Result<Self, PciError> {
        if layout.num_vectors == 0 || layout.num_vectors > MAX_VECTORS {
            return Err(PciError::InvalidMsix("vector count must be 1..=2048"));
        }
        if !layout.table_offset.is_multiple_of(8) || !layout.pba_offset.is_multiple_of(8) {
            return Err(PciError::InvalidMsix(
                "table and PBA offsets must be 8-byte aligned",
            ));
        }
        let table = MsixTable::new(layout.num_vectors, sink, requester_id);
        let fits = |bar: u8, off: u32, len: u64| {
            config
                .bar(bar)
                .is_some_and(|b| u64::from(off) + len <= b.size)
        };
        if !fits(layout.table_bar, layout.table_offset, table.table_size())
            || !fits(layout.pba_bar, layout.pba_offset, table.pba_size())
        {
            return Err(PciError::InvalidMsix(
                "table or PBA outside an implemented BAR",
            ));
        }
        if layout.table_bar == layout.pba_bar {
            let (t0, t1) = (
                u64::from(layout.table_offset),
                u64::from(layout.table_offset) + table.table_size(),
            );
            let (p0, p1) = (
                u64::from(layout.pba_offset),
                u64::from(layout.pba_offset) + table.pba_size(),
            );
            if t0 < p1 && p0 < t1 {
                return Err(PciError::InvalidMsix("table and PBA overlap"));
            }
        }
        let mut cap = Capability::new(cap_id::MSIX, 12);
        cap.set_u16(2, layout.num_vectors - 1)
            .writable_u16(2, CONTROL_ENABLE | CONTROL_FUNCTION_MASK)
            .set_u32(4, layout.table_offset | u32::from(layout.table_bar & 7))
            .set_u32(8, layout.pba_offset | u32::from(layout.pba_bar & 7));
        let cap_offset = u16::from(config.add_capability(&cap)?);
        let mut table = table;
        table.set_bus_master(config.bus_master_enabled());
        Ok(MsixCapability {
            cap_offset,
            layout,
            table,
        })
    }

    /// Offset of the capability in config space.
    pub fn cap_offset(&self) -> u16 {
        self.cap_offset
    }

    /// Table and PBA placement.
    pub fn layout(&self) -> MsixLayout {
        self.layout
    }

    /// The vector table.
    pub fn table(&self) -> &MsixTable {
        &self.table
    }

    /// The vector table, mutably.
    pub fn table_mut(&mut self) -> &mut MsixTable {
        &mut self.table
    }

    /// Call after every config write the function accepted: picks up MSI-X Enable / Function
    /// Mask changes from Message Control and Bus Master Enable from the Command register.
    pub fn config_written(&mut self, config: &ConfigSpace, offset: u16, len: usize) {
        let overlaps = |reg: u16| {
            u32::from(offset) < u32::from(reg) + 2
                && u32::from(offset) + len as u32 > u32::from(reg)
        };
        if overlaps(COMMAND) {
            self.table.set_bus_master(config.bus_master_enabled());
        }
        let ctl = self.cap_offset + 2;
        if overlaps(ctl) {
            let v = config.read_u16(ctl);
            self.table
                .set_control(v & CONTROL_ENABLE != 0, v & CONTROL_FUNCTION_MASK != 0);
        }
    }

    /// Serves a BAR read if it falls in the table or PBA; returns false otherwise.
    pub fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        match self.region(bar, offset) {
            Some((true, rel)) => self.table.read_table(rel, data),
            Some((false, rel)) => self.table.read_pba(rel, data),
            None => return false,
        }
        true
    }

    /// Serves a BAR write if it falls in the table or PBA; returns false otherwise.
    pub fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> bool {
        match self.region(bar, offset) {
            Some((true, rel)) => self.table.write_table(rel, data),
            Some((false, rel)) => self.table.write_pba(rel, data),
            None => return false,
        }
        true
    }

    /// Signals `vector`.
    pub fn trigger(&mut self, vector: u16) -> MsixTriggerResult {
        self.table.trigger(vector)
    }

    /// Tags future messages with a new requester ID.
    pub fn set_requester_id(&mut self, requester_id: RequesterId) {
        self.table.set_requester_id(requester_id);
    }

    /// `(is_table, offset_in_region)` if `offset` in `bar` is inside the table or the PBA.
    fn region(&self, bar: u8, offset: u64) -> Option<(bool, u64)> {
        let l = &self.layout;
        let t = u64::from(l.table_offset);
        if bar == l.table_bar && offset >= t && offset - t < self.table.table_size() {
            return Some((true, offset - t));
        }
        let p = u64::from(l.pba_offset);
        if bar == l.pba_bar && offset >= p && offset - p < self.table.pba_size() {
            return Some((false, offset - p));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::BarKind;
    use super::super::capability::find_capability;
    use super::super::config::{COMMAND_MASTER, ConfigSpace, HeaderType, PciIds};
    use super::*;
    use iommu::RecordingMsiSink;

    const RID: RequesterId = RequesterId::new(1, 0, 0);

    fn setup(n: u16) -> (ConfigSpace, MsixCapability, Arc<RecordingMsiSink>) {
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
        c.add_bar(4, 0x4000, BarKind::Memory64, false).unwrap();
        let sink = Arc::new(RecordingMsiSink::new());
        let layout = MsixLayout {
            num_vectors: n,
            table_bar: 4,
            table_offset: 0,
            pba_bar: 4,
            pba_offset: 0x2000,
        };
        let mut m = MsixCapability::new(&mut c, layout, sink.clone(), RID).unwrap();
        assert!(!m.table().bus_master);
        c.write(COMMAND, &COMMAND_MASTER.to_le_bytes());
        m.config_written(&c, COMMAND, 2);
        (c, m, sink)
    }

    fn program(m: &mut MsixCapability, v: u16, addr: u64, data: u32) {
        let base = u64::from(v) * 16;
        m.bar_write(4, base, &(addr as u32).to_le_bytes());
        m.bar_write(4, base + 4, &((addr >> 32) as u32).to_le_bytes());
        m.bar_write(4, base + 8, &data.to_le_bytes());
    }

    fn set_mask(m: &mut MsixCapability, v: u16, masked: bool) {
        m.bar_write(4, u64::from(v) * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    fn control(c: &mut ConfigSpace, m: &mut MsixCapability, value: u16) {
        let off = m.cap_offset() + 2;
        c.write(off, &value.to_le_bytes());
        m.config_written(c, off, 2);
    }

    fn rd32(m: &MsixCapability, off: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(m.bar_read(4, off, &mut b));
        u32::from_le_bytes(b)
    }

    #[test]
    fn capability_registers() {
        let (mut c, m, _) = setup(5);
        let off = find_capability(&mut |o, d: &mut [u8]| c.read(o, d), cap_id::MSIX).unwrap();
        assert_eq!(u16::from(off), m.cap_offset());
        let o = m.cap_offset();
        assert_eq!(c.read_u16(o + 2), 4);
        assert_eq!(c.read_u32(o + 4), 0x0000_0004);
        assert_eq!(c.read_u32(o + 8), 0x0000_2004);
        // Table size is read-only; enable/mask writable.
        c.write(o + 2, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(o + 2), 0xc004);
        c.write(o + 4, &0u32.to_le_bytes());
        assert_eq!(c.read_u32(o + 4), 0x0000_0004);
    }

    #[test]
    fn table_read_write() {
        let (_c, mut m, _) = setup(4);
        // Reset: all masked.
        for v in 0..4 {
            assert_eq!(rd32(&m, v * 16 + 12), 1);
        }
        program(&mut m, 2, 0x1_fee0_1004, 0x4055);
        assert_eq!(rd32(&m, 32), 0xfee0_1004);
        assert_eq!(rd32(&m, 36), 0x1);
        assert_eq!(rd32(&m, 40), 0x4055);
        let mut q = [0u8; 8];
        assert!(m.bar_read(4, 32, &mut q));
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1004);
        // QWORD write of address; the low two address bits are not writable.
        m.bar_write(4, 16, &0xfee0_0003u64.to_le_bytes());
        assert_eq!(m.table().entry(1).unwrap().address, 0xfee0_0000);
        // Only the Mask bit of vector control is implemented.
        m.bar_write(4, 12, &0xffff_fffeu32.to_le_bytes());
        assert_eq!(rd32(&m, 12), 0);
        // Narrow aligned read inside an entry.
        let mut b = [0u8; 1];
        assert!(m.bar_read(4, 41, &mut b));
        assert_eq!(b, [0x40]);
    }

    #[test]
    fn out_of_range_and_malformed_table_accesses() {
        let (_c, mut m, _) = setup(4);
        // Past the table (still in the BAR, not in table/PBA): not ours.
        let mut b = [0u8; 4];
        assert!(!m.bar_read(4, 64, &mut b));
        assert!(!m.bar_write(4, 0x1000, &[1, 2, 3, 4]));
        // Other BAR: not ours.
        assert!(!m.bar_read(0, 0, &mut b));
        // Unaligned and odd sizes read all-ones and are ignored on write.
        assert!(m.bar_read(4, 2, &mut b));
        assert_eq!(b, [0xff; 4]);
        let mut three = [0u8; 3];
        assert!(m.bar_read(4, 0, &mut three));
        assert_eq!(three, [0xff; 3]);
        let before = m.table().entry(0).unwrap();
        assert!(m.bar_write(4, 2, &[0xaa; 4]));
        assert!(m.bar_write(4, 60, &[0xaa; 8])); // crosses the table end
        assert_eq!(m.table().entry(0).unwrap(), before);
        assert_eq!(m.table().entry(3).unwrap(), MsixEntry::default());
        // The table API itself also rejects out-of-range offsets.
        let mut q = [0u8; 8];
        m.table().read_table(u64::MAX - 3, &mut q);
        assert_eq!(q, [0xff; 8]);
        m.table_mut().write_table(u64::MAX, &[0]);
        m.table().read_pba(8, &mut q);
        assert_eq!(q, [0xff; 8]);
        // PBA is read-only.
        assert!(m.bar_write(4, 0x2000, &u64::MAX.to_le_bytes()));
        assert_eq!(rd32(&m, 0x2000), 0);
        // Out-of-range trigger.
        assert_eq!(m.trigger(4), MsixTriggerResult::InvalidVector);
        assert_eq!(m.trigger(u16::MAX), MsixTriggerResult::InvalidVector);
    }

    #[test]
    fn masked_vector_pends_and_unmask_delivers() {
        let (mut c, mut m, sink) = setup(70);
        control(&mut c, &mut m, CONTROL_ENABLE);
        program(&mut m, 65, 0xfee0_0000, 0x31);
        // Still masked (reset value): pending.
        assert_eq!(m.trigger(65), MsixTriggerResult::Pending);
        assert!(sink.is_empty());
        assert!(m.table().is_pending(65));
        // Bit 65 is bit 1 of the second PBA qword.
        assert_eq!(rd32(&m, 0x2008), 0b10);
        // A second trigger while masked coalesces.
        assert_eq!(m.trigger(65), MsixTriggerResult::Pending);
        set_mask(&mut m, 65, false);
        let msgs = sink.take();
        assert_eq!(
            msgs,
            vec![MsiMessage {
                address: 0xfee0_0000,
                data: 0x31,
                requester_id: RID
            }]
        );
        assert!(!m.table().is_pending(65));
        assert_eq!(rd32(&m, 0x2008), 0);
        // Unmasked: delivered right away.
        assert_eq!(m.trigger(65), MsixTriggerResult::Delivered);
        assert_eq!(sink.take().len(), 1);
        // Unmasking a vector with nothing pending sends nothing.
        set_mask(&mut m, 65, true);
        set_mask(&mut m, 65, false);
        assert!(sink.is_empty());
    }

    #[test]
    fn function_mask() {
        let (mut c, mut m, sink) = setup(2);
        program(&mut m, 0, 0xfee0_0000, 1);
        program(&mut m, 1, 0xfee0_0000, 2);
        set_mask(&mut m, 0, false);
        control(&mut c, &mut m, CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(m.trigger(0), MsixTriggerResult::Pending);
        assert_eq!(m.trigger(1), MsixTriggerResult::Pending);
        assert!(sink.is_empty());
        // Function unmask delivers only vectors that are themselves unmasked.
        control(&mut c, &mut m, CONTROL_ENABLE);
        let msgs = sink.take();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].data, 1);
        assert!(m.table().is_pending(1));
        set_mask(&mut m, 1, false);
        assert_eq!(sink.take()[0].data, 2);
    }

    #[test]
    fn disabled_msix_delivers_nothing() {
        let (mut c, mut m, sink) = setup(1);
        program(&mut m, 0, 0xfee0_0000, 1);
        set_mask(&mut m, 0, false);
        assert_eq!(m.trigger(0), MsixTriggerResult::Disabled);
        assert!(!m.table().is_pending(0));
        // Enabling later does not deliver an interrupt that happened while disabled.
        control(&mut c, &mut m, CONTROL_ENABLE);
        assert!(sink.is_empty());
        // Disable again: nothing.
        control(&mut c, &mut m, 0);
        assert_eq!(m.trigger(0), MsixTriggerResult::Disabled);
        assert!(sink.is_empty());
        // A config write that does not touch Message Control leaves state alone.
        c.write(0x04, &[0x06, 0]);
        m.config_written(&c, 0x04, 2);
        assert!(!m.table().enabled());
    }

    #[test]
    fn bus_master_disable_drops_messages() {
        let (mut c, mut m, sink) = setup(2);
        control(&mut c, &mut m, CONTROL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 7);
        set_mask(&mut m, 0, false);
        c.write(COMMAND, &[0, 0]);
        m.config_written(&c, COMMAND, 2);
        assert_eq!(m.trigger(0), MsixTriggerResult::BusMasterDisabled);
        assert!(!m.table().is_pending(0));
        // Masked vectors still latch pending and go out once bus mastering is back.
        assert_eq!(m.trigger(1), MsixTriggerResult::Pending);
        program(&mut m, 1, 0xfee0_0000, 8);
        set_mask(&mut m, 1, false);
        assert!(sink.is_empty());
        assert!(m.table().is_pending(1));
        // A dword write at 0x04 also covers COMMAND.
        c.write(COMMAND, &u32::from(COMMAND_MASTER).to_le_bytes());
        m.config_written(&c, COMMAND, 4);
        assert_eq!(sink.take()[0].data, 8);
        assert_eq!(m.trigger(0), MsixTriggerResult::Delivered);
    }

    #[test]
    fn requester_id_follows_the_function() {
        let (mut c, mut m, sink) = setup(1);
        control(&mut c, &mut m, CONTROL_ENABLE);
        set_mask(&mut m, 0, false);
        m.set_requester_id(RequesterId::new(5, 0, 0));
        m.trigger(0);
        assert_eq!(sink.take()[0].requester_id, RequesterId::new(5, 0, 0));
        m.table_mut().reset();
        assert!(m.table().entry(0).unwrap().masked());
        assert!(!m.table().enabled());
    }

    #[test]
    fn invalid_layouts() {
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
        c.add_bar(0, 0x1000, BarKind::Memory32, false).unwrap();
        let sink: Arc<dyn MsiSink> = Arc::new(iommu::NullMsiSink);
        let ok = MsixLayout {
            num_vectors: 8,
            table_bar: 0,
            table_offset: 0,
            pba_bar: 0,
            pba_offset: 0x800,
        };
        let bad = |l: MsixLayout| MsixCapability::new(&mut c.clone(), l, sink.clone(), RID);
        assert!(
            bad(MsixLayout {
                num_vectors: 0,
                ..ok
            })
            .is_err()
        );
        assert!(
            bad(MsixLayout {
                num_vectors: 2049,
                ..ok
            })
            .is_err()
        );
        assert!(bad(MsixLayout { table_bar: 1, ..ok }).is_err());
        assert!(
            bad(MsixLayout {
                table_offset: 4,
                ..ok
            })
            .is_err()
        );
        assert!(
            bad(MsixLayout {
                pba_offset: 0x40,
                ..ok
            })
            .is_err()
        );
        assert!(
            bad(MsixLayout {
                pba_offset: 0x1000,
                ..ok
            })
            .is_err()
        );
        assert!(
            bad(MsixLayout {
                num_vectors: 256,
                ..ok
            })
            .is_err()
        );
        assert!(bad(ok).is_ok());
    }
}
