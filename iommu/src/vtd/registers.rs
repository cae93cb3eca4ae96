//! The VT-d remapping unit's register file (Intel VT-d Architecture Specification rev 4.1,
//! chapter 11 "Register Descriptions"), as the guest's `intel-iommu` driver sees it through the
//! DRHD's MMIO window.
//!
//! What this models and what it leaves to the remapping unit around it:
//! - identification and capabilities: VER, CAP, ECAP ([`VtdConfig::capabilities`]);
//! - the Global Command/Status pair: GCMD is write-only, and GSTS follows every command
//!   *before the write returns* — Linux reads GSTS once after the write and panics ("DMAR
//!   hardware is malfunctioning") if it has not changed;
//! - RTADDR, latched by Set Root Table Pointer;
//! - the register-based invalidation interfaces (CCMD, and IVA/IOTLB at IRO×16), completed at
//!   once;
//! - fault status and fault event registers (FSTS, FECTL/FEDATA/FEADDR/FEUADDR) and the fault
//!   recording registers at FRO×16;
//! - the invalidation queue registers (IQH, IQT, IQA, ICS, IECTL/IEDATA/IEADDR/IEUADDR, IQER);
//! - the page request queue registers (PQH, PQT, PQA, PRS, PECTL/PEDATA/PEADDR/PEUADDR,
//!   VT-d 11.4.11), when page requests are supported (ECAP.PRS); the queue itself is
//!   [`super::page_request`].
//!
//! Every write that asks the unit to do something comes back as a [`RegisterAction`]
//! (translation enabled, root table latched, queue tail moved, caches to invalidate); the unit
//! performs it and reports faults and queue progress back through the methods here. Accesses
//! are 32 or 64 bits, naturally aligned (VT-d 11.1: other accesses are undefined — here they
//! read 0 and are ignored); registers Linux writes as 64 bits (RTADDR, CCMD, IQA, IQT, the
//! IOTLB registers) also accept two 32-bit halves, low first.

/// Register offsets (VT-d 11.4).
pub mod offset {
    /// Version.
    pub const VER: u64 = 0x00;
    /// Capability (64 bits).
    pub const CAP: u64 = 0x08;
    /// Extended Capability (64 bits).
    pub const ECAP: u64 = 0x10;
    /// Global Command.
    pub const GCMD: u64 = 0x18;
    /// Global Status.
    pub const GSTS: u64 = 0x1c;
    /// Root Table Address (64 bits).
    pub const RTADDR: u64 = 0x20;
    /// Context Command (64 bits).
    pub const CCMD: u64 = 0x28;
    /// Fault Status.
    pub const FSTS: u64 = 0x34;
    /// Fault Event Control.
    pub const FECTL: u64 = 0x38;
    /// Fault Event Data.
    pub const FEDATA: u64 = 0x3c;
    /// Fault Event Address.
    pub const FEADDR: u64 = 0x40;
    /// Fault Event Upper Address.
    pub const FEUADDR: u64 = 0x44;
    /// Invalidation Queue Head (64 bits).
    pub const IQH: u64 = 0x80;
    /// Invalidation Queue Tail (64 bits).
    pub const IQT: u64 = 0x88;
    /// Invalidation Queue Address (64 bits).
    pub const IQA: u64 = 0x90;
    /// Invalidation Completion Status.
    pub const ICS: u64 = 0x9c;
    /// Invalidation Event Control.
    pub const IECTL: u64 = 0xa0;
    /// Invalidation Event Data.
    pub const IEDATA: u64 = 0xa4;
    /// Invalidation Event Address.
    pub const IEADDR: u64 = 0xa8;
    /// Invalidation Event Upper Address.
    pub const IEUADDR: u64 = 0xac;
    /// Invalidation Queue Error Record (64 bits).
    pub const IQER: u64 = 0xb0;
    /// Page Request Queue Head (64 bits).
    pub const PQH: u64 = 0xc0;
    /// Page Request Queue Tail (64 bits).
    pub const PQT: u64 = 0xc8;
    /// Page Request Queue Address (64 bits).
    pub const PQA: u64 = 0xd0;
    /// Page Request Status.
    pub const PRS: u64 = 0xdc;
    /// Page Request Event Control.
    pub const PECTL: u64 = 0xe0;
    /// Page Request Event Data.
    pub const PEDATA: u64 = 0xe4;
    /// Page Request Event Address.
    pub const PEADDR: u64 = 0xe8;
    /// Page Request Event Upper Address.
    pub const PEUADDR: u64 = 0xec;
}

/// Page Request Status bits (VT-d 11.4.11.4).
pub mod prs {
    /// Pending Page Request (RW1C): a request was written to the queue.
    pub const PPR: u32 = 1 << 0;
    /// Page Request Overflow (RW1C): a request found the queue full and was not recorded.
    pub const PRO: u32 = 1 << 1;
}

/// Global Command / Global Status bits (VT-d 11.4.4, 11.4.5).
pub mod global {
    /// Translation Enable / Status.
    pub const TE: u32 = 1 << 31;
    /// Set Root Table Pointer / Root Table Pointer Status.
    pub const SRTP: u32 = 1 << 30;
    /// Write Buffer Flush / Status.
    pub const WBF: u32 = 1 << 27;
    /// Queued Invalidation Enable / Status.
    pub const QIE: u32 = 1 << 26;
    /// Interrupt Remapping Enable / Status.
    pub const IRE: u32 = 1 << 25;
    /// Set Interrupt Remap Table Pointer / Status.
    pub const SIRTP: u32 = 1 << 24;
    /// Compatibility Format Interrupt.
    pub const CFI: u32 = 1 << 23;
}

/// Fault Status bits (VT-d 11.4.9.1).
pub mod fsts {
    /// Primary Fault Overflow (RW1C).
    pub const PFO: u32 = 1 << 0;
    /// Primary Pending Fault (RO: some fault record has F set).
    pub const PPF: u32 = 1 << 1;
    /// Invalidation Queue Error (RW1C).
    pub const IQE: u32 = 1 << 4;
    /// Invalidation Completion Error (RW1C).
    pub const ICE: u32 = 1 << 5;
    /// Invalidation Time-out Error (RW1C).
    pub const ITE: u32 = 1 << 6;
    /// Fault Record Index field shift (bits 15:8, RO).
    pub const FRI_SHIFT: u32 = 8;
    /// The RW1C bits.
    pub const RW1C: u32 = PFO | IQE | ICE | ITE;
}

/// Event control bits (FECTL, IECTL: VT-d 11.4.9.2, 11.4.9.?).
pub mod event {
    /// Interrupt Mask.
    pub const IM: u32 = 1 << 31;
    /// Interrupt Pending (RO).
    pub const IP: u32 = 1 << 30;
}

/// Context Command register fields (VT-d 11.4.7).
pub mod ccmd {
    /// Invalidate Context-Cache: set by software, cleared by hardware when done.
    pub const ICC: u64 = 1 << 63;
    /// Context Invalidation Request Granularity (62:61).
    pub const CIRG_SHIFT: u32 = 61;
    /// Context Actual Invalidation Granularity (60:59).
    pub const CAIG_SHIFT: u32 = 59;
    /// Domain-ID (15:0).
    pub const DID_MASK: u64 = 0xffff;
    /// Source-ID (31:16).
    pub const SID_SHIFT: u32 = 16;
    /// Function Mask (33:32).
    pub const FM_SHIFT: u32 = 32;
}

/// IOTLB Invalidate register fields (VT-d 11.4.8.1), at IRO×16 + 8; IVA (11.4.8.2) at IRO×16.
pub mod iotlb {
    /// Invalidate IOTLB: set by software, cleared by hardware when done.
    pub const IVT: u64 = 1 << 63;
    /// IOTLB Invalidation Request Granularity (61:60): 1 global, 2 domain, 3 page.
    pub const IIRG_SHIFT: u32 = 60;
    /// IOTLB Actual Invalidation Granularity (58:57).
    pub const IAIG_SHIFT: u32 = 57;
    /// Drain Reads / Drain Writes.
    pub const DRAIN: u64 = (1 << 49) | (1 << 48);
    /// Domain-ID (47:32).
    pub const DID_SHIFT: u32 = 32;
    /// IVA: Address Mask (5:0).
    pub const AM_MASK: u64 = 0x3f;
    /// IVA: Invalidation Hint.
    pub const IH: u64 = 1 << 6;
}

/// Invalidation Queue Address register fields (VT-d 11.4.9.?).
pub mod iqa {
    /// Descriptor Width: 1 = 256-bit descriptors (required in scalable mode).
    pub const DW: u64 = 1 << 11;
    /// Queue Size: 2^QS 4 KiB pages.
    pub const QS_MASK: u64 = 0x7;
    /// Base address (63:12).
    pub const BASE_MASK: u64 = !0xfff;
}

/// The remapping unit's configuration: what it advertises in CAP/ECAP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdConfig {
    /// Scalable-mode translation (ECAP.SMTS, with PASID tables) besides legacy mode.
    pub scalable: bool,
    /// Caching Mode (CAP.CM): not-present and erroneous entries may be cached, so software
    /// invalidates after making entries present (how a virtual IOMMU learns of new mappings).
    pub caching_mode: bool,
    /// Guest address width in bits: 39 (3-level) or 48 (4-level second-stage tables).
    pub address_width: u8,
    /// Number of fault recording registers (1..=[`MAX_FAULT_RECORDS`]).
    pub fault_records: u16,
    /// PASID width in bits (scalable mode: ECAP.PASID, ECAP.PSS = width − 1; Linux's
    /// `max_pasids` is `2 << PSS`), 1..=20; 0 for no PASID support.
    pub pasid_bits: u8,
    /// Device-TLB support (ECAP.DT): answers ATS translation requests and passes ATS-translated
    /// requests of devices whose context enables the device TLB (scalable mode).
    pub ats: bool,
    /// Page request support (ECAP.PRS with PDS): the page request queue and page group
    /// responses (scalable mode, needs `ats`).
    pub pri: bool,
}

impl Default for VtdConfig {
    fn default() -> Self {
        VtdConfig {
            scalable: true,
            caching_mode: false,
            address_width: 48,
            fault_records: 8,
            pasid_bits: 20,
            ats: true,
            pri: true,
        }
    }
}

/// Offset of the fault recording registers, in 16-byte units (CAP.FRO).
pub const FAULT_RECORD_UNITS: u64 = 0x20;
/// Most fault recording registers: they end before the IOTLB registers.
pub const MAX_FAULT_RECORDS: u16 = 16;
/// Offset of the IOTLB registers, in 16-byte units (ECAP.IRO).
pub const IOTLB_REGISTER_UNITS: u64 = 0x30;
/// Size of the register window the DRHD describes (4 KiB, `size` field 0).
pub const REGISTER_WINDOW: u64 = 0x1000;

impl VtdConfig {
    /// CAP and ECAP for this configuration (VT-d 11.4.2, 11.4.3).
    pub fn capabilities(&self) -> (u64, u64) {
        let aw: u64 = if self.address_width <= 39 { 39 } else { 48 };
        // SAGAW: bit 1 = 3-level (39-bit), bit 2 = 4-level (48-bit).
        let sagaw: u64 = if aw == 39 { 0b0010 } else { 0b0110 };
        let records = u64::from(self.fault_records.clamp(1, MAX_FAULT_RECORDS));
        let mut cap = 0u64;
        cap |= 2; // ND: 8-bit domain IDs (256 domains)
        if self.caching_mode {
            cap |= 1 << 7; // CM
        }
        cap |= sagaw << 8;
        cap |= (aw - 1) << 16; // MGAW
        cap |= FAULT_RECORD_UNITS << 24; // FRO
        cap |= 1 << 34; // SLLPS: 2 MiB second-stage pages
        cap |= 1 << 39; // PSI: page-selective invalidation
        cap |= (records - 1) << 40; // NFR
        cap |= 0x3f << 48; // MAMV: page-selective invalidation up to 2^63 bytes
        cap |= (1 << 54) | (1 << 55); // DWD, DRD: drain writes and reads
        let mut ecap = 0u64;
        ecap |= 1 << 0; // C: page walks are coherent
        ecap |= 1 << 1; // QI
        ecap |= 1 << 6; // PT: pass-through
        ecap |= IOTLB_REGISTER_UNITS << 8; // IRO
        ecap |= 0xf << 20; // MHMV
        if self.scalable {
            ecap |= 1 << 43; // SMTS
            ecap |= 1 << 46; // SLTS: second-stage translation
            ecap |= 1 << 47; // FLTS: first-stage translation
            ecap |= 1 << 48; // SMPWC: scalable-mode page walks are coherent
            // FL1GP: 1 GiB first-stage pages (the walker takes them; Linux refuses SVA on a
            // CPU with 1 GiB pages without it, `intel_svm_check()`).
            cap |= 1 << 56;
            if self.pasid_bits > 0 {
                let bits = u64::from(self.pasid_bits.min(20));
                ecap |= 1 << 40; // PASID
                ecap |= (bits - 1) << 35; // PSS
                ecap |= 1 << 31; // SRS: supervisor (privileged) requests
            }
            if self.ats {
                ecap |= 1 << 2; // DT: device TLBs (ATS)
                ecap |= 1 << 33; // NWFS: translation requests with No Write
                if self.pri {
                    ecap |= 1 << 29; // PRS: page requests
                    ecap |= 1 << 42; // PDS: page-request drain (Linux needs it with PRS)
                }
            }
        }
        (cap, ecap)
    }
}

/// What the guest asked the unit to do with its last register write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterAction {
    /// Set Root Table Pointer: use this root table (RTADDR: address and TTM) from now on; every
    /// cached context and translation is stale.
    SetRootTable(u64),
    /// Translation Enable changed.
    Translation(bool),
    /// Queued Invalidation Enable changed (enabling resets the head to 0).
    QueuedInvalidation(bool),
    /// The invalidation queue tail moved: process descriptors from the head to here.
    QueueTail(u64),
    /// Register-based context-cache invalidation: granularity (1 global, 2 domain, 3 device),
    /// domain ID, source ID, function mask.
    InvalidateContextCache {
        /// CIRG.
        granularity: u8,
        /// Domain ID.
        domain: u16,
        /// Source ID.
        source: u16,
        /// Function Mask.
        function_mask: u8,
    },
    /// Register-based IOTLB invalidation: granularity (1 global, 2 domain, 3 page-selective),
    /// domain, and for pages the address and address mask.
    InvalidateIotlb {
        /// IIRG.
        granularity: u8,
        /// Domain ID.
        domain: u16,
        /// Page address (IVA 63:12).
        address: u64,
        /// Address Mask: 2^AM pages.
        address_mask: u8,
    },
    /// A fault event was unmasked while one was pending: send the fault event MSI now.
    SendFaultEvent,
    /// An invalidation event was unmasked while one was pending: send it now.
    SendInvalidationEvent,
    /// The page request event was unmasked while pending: send its MSI now.
    SendPageRequestEvent,
}

/// The register file of one remapping unit.
#[derive(Clone, Debug)]
pub struct RegisterFile {
    config: VtdConfig,
    cap: u64,
    ecap: u64,
    gsts: u32,
    rtaddr: u64,
    ccmd: u64,
    fsts: u32,
    fectl: u32,
    fedata: u32,
    feaddr: u32,
    feuaddr: u32,
    iqh: u64,
    iqt: u64,
    iqa: u64,
    ics: u32,
    iectl: u32,
    iedata: u32,
    ieaddr: u32,
    ieuaddr: u32,
    iqer: u64,
    iva: u64,
    iotlb: u64,
    pqh: u64,
    pqt: u64,
    pqa: u64,
    prs: u32,
    pectl: u32,
    pedata: u32,
    peaddr: u32,
    peuaddr: u32,
    /// Fault recording registers, 128 bits each (low, high qwords).
    fault_records: Vec<(u64, u64)>,
    /// The record the next fault goes to (the hardware's internal pointer; FSTS.FRI instead
    /// names the first pending record, VT-d 11.4.9).
    next_fault_record: usize,
}

/// A primary fault, as recorded in a fault recording register (VT-d 11.4.14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// Requester (source) ID.
    pub source_id: u16,
    /// PASID of the request, if it had one.
    pub pasid: Option<u32>,
    /// Faulting page address.
    pub address: u64,
    /// Fault reason (VT-d Appendix A).
    pub reason: u8,
    /// The request was a write (T = 0) or a read (T = 1).
    pub write: bool,
    /// Execute requested.
    pub execute: bool,
    /// Privileged-mode request.
    pub privileged: bool,
}

impl RegisterFile {
    /// The registers after reset: translation off, queue off, no faults, events masked.
    pub fn new(config: VtdConfig) -> Self {
        let (cap, ecap) = config.capabilities();
        let records = usize::from(config.fault_records.clamp(1, MAX_FAULT_RECORDS));
        RegisterFile {
            config,
            cap,
            ecap,
            gsts: 0,
            rtaddr: 0,
            ccmd: 0,
            fsts: 0,
            fectl: event::IM,
            fedata: 0,
            feaddr: 0,
            feuaddr: 0,
            iqh: 0,
            iqt: 0,
            iqa: 0,
            ics: 0,
            iectl: event::IM,
            iedata: 0,
            ieaddr: 0,
            ieuaddr: 0,
            iqer: 0,
            iva: 0,
            iotlb: 0,
            pqh: 0,
            pqt: 0,
            pqa: 0,
            prs: 0,
            pectl: event::IM,
            pedata: 0,
            peaddr: 0,
            peuaddr: 0,
            fault_records: vec![(0, 0); records],
            next_fault_record: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> VtdConfig {
        self.config
    }

    /// Global Status.
    pub fn gsts(&self) -> u32 {
        self.gsts
    }

    /// Whether DMA remapping is enabled (GSTS.TES).
    pub fn translation_enabled(&self) -> bool {
        self.gsts & global::TE != 0
    }

    /// Whether queued invalidation is enabled (GSTS.QIES).
    pub fn queued_invalidation_enabled(&self) -> bool {
        self.gsts & global::QIE != 0
    }

    /// The latched root table address register value (address and TTM).
    pub fn root_table(&self) -> u64 {
        self.rtaddr
    }

    /// The invalidation queue: (base, entries, 256-bit descriptors, head, tail); head and
    /// tail are descriptor indices.
    pub fn queue(&self) -> (u64, u64, bool, u64, u64) {
        let wide = self.iqa & iqa::DW != 0;
        let entries = (4096u64 << (self.iqa & iqa::QS_MASK)) / if wide { 32 } else { 16 };
        let shift = if wide { 5 } else { 4 };
        (
            self.iqa & iqa::BASE_MASK,
            entries,
            wide,
            self.iqh >> shift,
            self.iqt >> shift,
        )
    }

    /// Records that descriptors up to index `head` were processed (IQH).
    pub fn set_queue_head(&mut self, head: u64) {
        let shift = if self.iqa & iqa::DW != 0 { 5 } else { 4 };
        self.iqh = head << shift;
    }

    /// An invalidation queue error (bad descriptor, bad tail): sets FSTS.IQE and records `info`
    /// in IQER; the queue stops at the head until software clears IQE. Returns whether the
    /// fault event MSI must be sent now.
    pub fn queue_error(&mut self, info: u64) -> bool {
        self.iqer = info;
        self.raise_fault_status(fsts::IQE)
    }

    /// A device-TLB invalidation did not complete in time: sets FSTS.ITE. Returns whether the
    /// fault event MSI must be sent now.
    pub fn invalidation_time_out(&mut self) -> bool {
        self.raise_fault_status(fsts::ITE)
    }

    /// An invalidation wait descriptor asked for completion status: sets ICS.IWC. Returns
    /// whether the invalidation event MSI must be sent now.
    pub fn invalidation_complete(&mut self) -> bool {
        let was = self.ics & 1 != 0;
        self.ics |= 1;
        if was {
            return false;
        }
        if self.iectl & event::IM != 0 {
            self.iectl |= event::IP;
            false
        } else {
            true
        }
    }

    /// Whether the unit takes page requests (ECAP.PRS).
    pub fn page_requests_supported(&self) -> bool {
        self.ecap & (1 << 29) != 0
    }

    /// Whether the unit answers ATS translation requests (ECAP.DT).
    pub fn device_tlb_supported(&self) -> bool {
        self.ecap & (1 << 2) != 0
    }

    /// The page request queue: (base, entries, head, tail); head and tail are indices of
    /// 32-byte descriptors. PQA.PQS gives 2^PQS 4 KiB pages (VT-d 11.4.11.3).
    pub fn page_request_queue(&self) -> (u64, u64, u64, u64) {
        let pages = 1u64 << (self.pqa & 0x7);
        let entries = pages * 4096 / 32;
        (
            self.pqa & !0xfff,
            entries,
            (self.pqh >> 5) % entries,
            (self.pqt >> 5) % entries,
        )
    }

    /// Page Request Status.
    pub fn page_request_status(&self) -> u32 {
        self.prs
    }

    /// A request was written at index `tail - 1`: PQT moves to `tail` and PRS.PPR is set. The
    /// page request event goes out when PPR was clear (VT-d 7.5.1.1) and PECTL.IM is clear;
    /// returns whether to send it now.
    pub fn page_request_queued(&mut self, tail: u64) -> bool {
        self.pqt = tail << 5;
        let was = self.prs & prs::PPR != 0;
        self.prs |= prs::PPR;
        !was && self.signal_page_request_event()
    }

    /// A request found the queue full (or PRO already set): PRS.PRO is set (VT-d 7.5.1.2).
    /// Returns whether the page request event must be sent now.
    pub fn page_request_overflow(&mut self) -> bool {
        let was = self.prs != 0;
        self.prs |= prs::PRO;
        !was && self.signal_page_request_event()
    }

    fn signal_page_request_event(&mut self) -> bool {
        if self.pectl & event::IM != 0 {
            self.pectl |= event::IP;
            false
        } else {
            true
        }
    }

    /// The page request event message (address, upper address, data).
    pub fn page_request_event_message(&self) -> (u32, u32, u32) {
        (self.peaddr, self.peuaddr, self.pedata)
    }

    /// The fault event message (address, upper address, data).
    pub fn fault_event_message(&self) -> (u32, u32, u32) {
        (self.feaddr, self.feuaddr, self.fedata)
    }

    /// The invalidation event message (address, upper address, data).
    pub fn invalidation_event_message(&self) -> (u32, u32, u32) {
        (self.ieaddr, self.ieuaddr, self.iedata)
    }

    /// Records a primary fault in the next free fault recording register (VT-d 7.2.1): the
    /// record at FSTS.FRI onward; if it is still in use the fault is lost and PFO is set.
    /// Returns whether the fault event MSI must be sent now.
    pub fn record_fault(&mut self, fault: FaultRecord) -> bool {
        if self.fsts & fsts::PFO != 0 {
            return false; // overflowed: no more recording until software clears PFO
        }
        let n = self.fault_records.len();
        let index = self.next_fault_record % n;
        if self.fault_records[index].1 & (1 << 63) != 0 {
            return self.raise_fault_status(fsts::PFO);
        }
        let low = fault.address & !0xfff;
        let mut high = u64::from(fault.source_id);
        if let Some(pasid) = fault.pasid {
            high |= 1 << 31; // PP
            high |= u64::from(pasid & 0xf_ffff) << 40; // PV (dword3 27:8)
        }
        if fault.execute {
            high |= 1 << 30; // EXE
        }
        if fault.privileged {
            high |= 1 << 29; // PRIV
        }
        high |= u64::from(fault.reason) << 32; // FR (dword3 7:0)
        if !fault.write {
            high |= 1 << 62; // T: 1 = read
        }
        high |= 1 << 63; // F
        self.fault_records[index] = (low, high);
        self.next_fault_record = (index + 1) % n;
        let pending = self.fsts & fsts::PPF != 0;
        if pending {
            return false; // the interrupt for the pending fault is already out or pending
        }
        // FRI: the first pending record, where Linux's dmar_fault() starts reading (it walks
        // on while records have F set, wrapping).
        self.fsts = (self.fsts & !(0xff << fsts::FRI_SHIFT)) | ((index as u32) << fsts::FRI_SHIFT);
        self.fsts |= fsts::PPF;
        self.signal_fault_event()
    }

    fn raise_fault_status(&mut self, bit: u32) -> bool {
        let was = self.fsts & (fsts::RW1C | fsts::PPF) != 0;
        self.fsts |= bit;
        if was {
            return false;
        }
        self.signal_fault_event()
    }

    fn signal_fault_event(&mut self) -> bool {
        if self.fectl & event::IM != 0 {
            self.fectl |= event::IP;
            false
        } else {
            true
        }
    }

    fn recompute_ppf(&mut self) {
        if self.fault_records.iter().any(|r| r.1 & (1 << 63) != 0) {
            self.fsts |= fsts::PPF;
        } else {
            self.fsts &= !fsts::PPF;
        }
    }

    fn fault_record_range(&self) -> (u64, u64) {
        let start = FAULT_RECORD_UNITS * 16;
        (start, start + 16 * self.fault_records.len() as u64)
    }

    /// A guest read of `data.len()` bytes (4 or 8, naturally aligned) at `offset`.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let value = match (data.len(), offset % data.len().max(1) as u64) {
            (4, 0) => u64::from(self.read32(offset)),
            (8, 0) => u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32),
            _ => 0,
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.checked_shr(8 * i as u32).unwrap_or(0) as u8;
        }
    }

    fn read32(&self, offset: u64) -> u32 {
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        let iotlb_base = IOTLB_REGISTER_UNITS * 16;
        let (fr_start, fr_end) = self.fault_record_range();
        match offset {
            offset::VER => 0x10, // version 1.0
            o if o == offset::CAP => lo(self.cap),
            o if o == offset::CAP + 4 => hi(self.cap),
            o if o == offset::ECAP => lo(self.ecap),
            o if o == offset::ECAP + 4 => hi(self.ecap),
            offset::GCMD => 0,
            offset::GSTS => self.gsts,
            o if o == offset::RTADDR => lo(self.rtaddr),
            o if o == offset::RTADDR + 4 => hi(self.rtaddr),
            o if o == offset::CCMD => lo(self.ccmd),
            o if o == offset::CCMD + 4 => hi(self.ccmd),
            offset::FSTS => self.fsts,
            offset::FECTL => self.fectl,
            offset::FEDATA => self.fedata,
            offset::FEADDR => self.feaddr,
            offset::FEUADDR => self.feuaddr,
            o if o == offset::IQH => lo(self.iqh),
            o if o == offset::IQH + 4 => hi(self.iqh),
            o if o == offset::IQT => lo(self.iqt),
            o if o == offset::IQT + 4 => hi(self.iqt),
            o if o == offset::IQA => lo(self.iqa),
            o if o == offset::IQA + 4 => hi(self.iqa),
            offset::ICS => self.ics,
            offset::IECTL => self.iectl,
            offset::IEDATA => self.iedata,
            offset::IEADDR => self.ieaddr,
            offset::IEUADDR => self.ieuaddr,
            o if o == offset::IQER => lo(self.iqer),
            o if o == offset::IQER + 4 => hi(self.iqer),
            o if o == offset::PQH && self.page_requests_supported() => lo(self.pqh),
            o if o == offset::PQT && self.page_requests_supported() => lo(self.pqt),
            o if o == offset::PQA && self.page_requests_supported() => lo(self.pqa),
            o if o == offset::PQA + 4 && self.page_requests_supported() => hi(self.pqa),
            offset::PRS if self.page_requests_supported() => self.prs,
            offset::PECTL if self.page_requests_supported() => self.pectl,
            offset::PEDATA if self.page_requests_supported() => self.pedata,
            offset::PEADDR if self.page_requests_supported() => self.peaddr,
            offset::PEUADDR if self.page_requests_supported() => self.peuaddr,
            o if o == iotlb_base => lo(self.iva),
            o if o == iotlb_base + 4 => hi(self.iva),
            o if o == iotlb_base + 8 => lo(self.iotlb),
            o if o == iotlb_base + 12 => hi(self.iotlb),
            o if (fr_start..fr_end).contains(&o) => {
                let (low, high) = self.fault_records[((o - fr_start) / 16) as usize];
                match (o - fr_start) % 16 {
                    0 => lo(low),
                    4 => hi(low),
                    8 => lo(high),
                    _ => hi(high),
                }
            }
            _ => 0,
        }
    }

    /// A guest write of `data.len()` bytes (4 or 8, naturally aligned) at `offset`; returns what
    /// the unit must do.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Vec<RegisterAction> {
        let mut value = 0u64;
        for (i, b) in data.iter().enumerate().take(8) {
            value |= u64::from(*b) << (8 * i);
        }
        let mut actions = Vec::new();
        match (data.len(), offset % data.len().max(1) as u64) {
            (4, 0) => self.write32(offset, value as u32, &mut actions),
            (8, 0) => {
                self.write32(offset, value as u32, &mut actions);
                self.write32(offset + 4, (value >> 32) as u32, &mut actions);
            }
            _ => log::debug!(
                "vt-d: ignoring a {}-byte register write at {offset:#x}",
                data.len()
            ),
        }
        actions
    }

    fn write32(&mut self, offset: u64, value: u32, actions: &mut Vec<RegisterAction>) {
        let set_lo = |reg: &mut u64, v: u32| *reg = (*reg & !0xffff_ffff) | u64::from(v);
        let set_hi = |reg: &mut u64, v: u32| *reg = (*reg & 0xffff_ffff) | (u64::from(v) << 32);
        let iotlb_base = IOTLB_REGISTER_UNITS * 16;
        let (fr_start, fr_end) = self.fault_record_range();
        match offset {
            offset::GCMD => self.global_command(value, actions),
            o if o == offset::RTADDR => set_lo(&mut self.rtaddr, value & !0x3ff),
            o if o == offset::RTADDR + 4 => set_hi(&mut self.rtaddr, value),
            o if o == offset::CCMD => set_lo(&mut self.ccmd, value),
            o if o == offset::CCMD + 4 => {
                set_hi(&mut self.ccmd, value);
                self.context_command(actions);
            }
            offset::FSTS => {
                self.fsts &= !(value & fsts::RW1C);
                if value & fsts::IQE != 0 {
                    self.iqer = 0;
                }
            }
            offset::FECTL => {
                let unmasked = value & event::IM == 0;
                self.fectl = (self.fectl & event::IP) | (value & event::IM);
                if unmasked && self.fectl & event::IP != 0 {
                    self.fectl &= !event::IP;
                    actions.push(RegisterAction::SendFaultEvent);
                }
            }
            offset::FEDATA => self.fedata = value,
            offset::FEADDR => self.feaddr = value & !0x3,
            offset::FEUADDR => self.feuaddr = value,
            o if o == offset::IQT => {
                // QT 18:4 (index << 4, or << 5 with 256-bit descriptors: bit 4 must be clear;
                // the queue checks that and reports IQE).
                set_lo(&mut self.iqt, value & 0x7fff0);
                if self.queued_invalidation_enabled() {
                    actions.push(RegisterAction::QueueTail(self.iqt));
                }
            }
            o if o == offset::IQT + 4 => {}
            o if o == offset::IQA => {
                set_lo(&mut self.iqa, value & !0x7f8);
            }
            o if o == offset::IQA + 4 => set_hi(&mut self.iqa, value),
            offset::ICS => self.ics &= !(value & 1),
            offset::IECTL => {
                let unmasked = value & event::IM == 0;
                self.iectl = (self.iectl & event::IP) | (value & event::IM);
                if unmasked && self.iectl & event::IP != 0 {
                    self.iectl &= !event::IP;
                    actions.push(RegisterAction::SendInvalidationEvent);
                }
            }
            offset::IEDATA => self.iedata = value,
            offset::IEADDR => self.ieaddr = value & !0x3,
            offset::IEUADDR => self.ieuaddr = value,
            // The page request queue registers exist only with ECAP.PRS. PQH/PQT hold the
            // offset of a 32-byte descriptor (bits 18:5); software writes PQH as it consumes
            // requests, and Linux also zeroes PQT when it sets the queue up or tears it down.
            o if !self.page_requests_supported()
                && (offset::PQH..=offset::PEUADDR).contains(&o) => {}
            o if o == offset::PQH => self.pqh = u64::from(value & 0x7ffe0),
            o if o == offset::PQT => self.pqt = u64::from(value & 0x7ffe0),
            o if o == offset::PQH + 4 || o == offset::PQT + 4 => {}
            o if o == offset::PQA => set_lo(&mut self.pqa, value & !0xff8),
            o if o == offset::PQA + 4 => set_hi(&mut self.pqa, value),
            offset::PRS => self.prs &= !(value & (prs::PPR | prs::PRO)),
            offset::PECTL => {
                let unmasked = value & event::IM == 0;
                self.pectl = (self.pectl & event::IP) | (value & event::IM);
                if unmasked && self.pectl & event::IP != 0 {
                    self.pectl &= !event::IP;
                    actions.push(RegisterAction::SendPageRequestEvent);
                }
            }
            offset::PEDATA => self.pedata = value,
            offset::PEADDR => self.peaddr = value & !0x3,
            offset::PEUADDR => self.peuaddr = value,
            o if o == iotlb_base => set_lo(&mut self.iva, value),
            o if o == iotlb_base + 4 => set_hi(&mut self.iva, value),
            o if o == iotlb_base + 8 => set_lo(&mut self.iotlb, value),
            o if o == iotlb_base + 12 => {
                set_hi(&mut self.iotlb, value);
                self.iotlb_command(actions);
            }
            // F (bit 31 of a record's last dword) is RW1C; the rest of a record is read-only.
            o if (fr_start..fr_end).contains(&o)
                && (o - fr_start) % 16 == 12
                && value & (1 << 31) != 0 =>
            {
                let index = ((o - fr_start) / 16) as usize;
                self.fault_records[index].1 &= !(1 << 63);
                self.recompute_ppf();
            }
            _ => {} // read-only or reserved
        }
    }

    /// GCMD: each bit set is a command; TE and QIE are states the status follows. The status
    /// changes before the write returns.
    fn global_command(&mut self, value: u32, actions: &mut Vec<RegisterAction>) {
        if value & global::SRTP != 0 {
            self.gsts |= global::SRTP;
            actions.push(RegisterAction::SetRootTable(self.rtaddr));
        }
        let te = value & global::TE != 0;
        if te != self.translation_enabled() {
            self.gsts = (self.gsts & !global::TE) | if te { global::TE } else { 0 };
            actions.push(RegisterAction::Translation(te));
        }
        let qie = value & global::QIE != 0;
        if qie != self.queued_invalidation_enabled() {
            self.gsts = (self.gsts & !global::QIE) | if qie { global::QIE } else { 0 };
            if qie {
                self.iqh = 0;
            }
            actions.push(RegisterAction::QueuedInvalidation(qie));
        }
        // WBF: no write buffer (CAP.RWBF = 0), done at once. IRE/SIRTP/CFI: no interrupt
        // remapping (ECAP.IR = 0): the status stays clear.
    }

    fn context_command(&mut self, actions: &mut Vec<RegisterAction>) {
        if self.ccmd & ccmd::ICC == 0 {
            return;
        }
        let granularity = ((self.ccmd >> ccmd::CIRG_SHIFT) & 3) as u8;
        actions.push(RegisterAction::InvalidateContextCache {
            granularity,
            domain: (self.ccmd & ccmd::DID_MASK) as u16,
            source: (self.ccmd >> ccmd::SID_SHIFT) as u16,
            function_mask: ((self.ccmd >> ccmd::FM_SHIFT) & 3) as u8,
        });
        // Done at the requested granularity: ICC clears, CAIG reports it.
        self.ccmd = (self.ccmd & !ccmd::ICC & !(3 << ccmd::CAIG_SHIFT))
            | (u64::from(granularity) << ccmd::CAIG_SHIFT);
    }

    fn iotlb_command(&mut self, actions: &mut Vec<RegisterAction>) {
        if self.iotlb & iotlb::IVT == 0 {
            return;
        }
        let granularity = ((self.iotlb >> iotlb::IIRG_SHIFT) & 3) as u8;
        actions.push(RegisterAction::InvalidateIotlb {
            granularity,
            domain: (self.iotlb >> iotlb::DID_SHIFT) as u16,
            address: self.iva & !0xfff,
            address_mask: (self.iva & iotlb::AM_MASK) as u8,
        });
        self.iotlb = (self.iotlb & !iotlb::IVT & !(3 << iotlb::IAIG_SHIFT))
            | (u64::from(granularity) << iotlb::IAIG_SHIFT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r32(r: &RegisterFile, off: u64) -> u32 {
        let mut b = [0u8; 4];
        r.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn r64(r: &RegisterFile, off: u64) -> u64 {
        let mut b = [0u8; 8];
        r.read(off, &mut b);
        u64::from_le_bytes(b)
    }

    fn w32(r: &mut RegisterFile, off: u64, v: u32) -> Vec<RegisterAction> {
        r.write(off, &v.to_le_bytes())
    }

    fn w64(r: &mut RegisterFile, off: u64, v: u64) -> Vec<RegisterAction> {
        r.write(off, &v.to_le_bytes())
    }

    /// The CAP/ECAP fields Linux's intel-iommu reads (research note vtd-sva §2).
    #[test]
    fn capabilities_say_what_linux_looks_for() {
        let r = RegisterFile::new(VtdConfig::default());
        let cap = r64(&r, offset::CAP);
        let ecap = r64(&r, offset::ECAP);
        assert_eq!((cap >> 8) & 0x1f, 0b0110, "SAGAW: 3- and 4-level");
        assert_eq!((cap >> 16) & 0x3f, 47, "MGAW = 48 - 1");
        assert_eq!(((cap >> 24) & 0x3ff) * 16, FAULT_RECORD_UNITS * 16, "FRO");
        assert_eq!((cap >> 40) & 0xff, 7, "NFR = 8 - 1");
        assert_ne!(cap & (1 << 39), 0, "PSI");
        assert_eq!(cap & (1 << 7), 0, "no caching mode by default");
        assert_eq!(((ecap >> 8) & 0x3ff) * 16, IOTLB_REGISTER_UNITS * 16, "IRO");
        for (bit, name) in [
            (0, "C"),
            (1, "QI"),
            (6, "PT"),
            (43, "SMTS"),
            (47, "FLTS"),
            (48, "SMPWC"),
        ] {
            assert_ne!(ecap & (1 << bit), 0, "{name}");
        }
        assert_eq!(ecap & (1 << 3), 0, "no interrupt remapping");
        // Shared virtual addressing (issue 9): PASID with 20 bits (Linux: max_pasids =
        // 2 << PSS), device TLBs, page requests with drain, and 1 GiB first-stage pages.
        for (bit, name) in [
            (2, "DT"),
            (29, "PRS"),
            (33, "NWFS"),
            (40, "PASID"),
            (42, "PDS"),
        ] {
            assert_ne!(ecap & (1 << bit), 0, "{name}");
        }
        assert_eq!((ecap >> 35) & 0x1f, 19, "PSS");
        assert_ne!(cap & (1 << 56), 0, "FL1GP");
        let (_, plain) = VtdConfig {
            ats: false,
            pasid_bits: 0,
            ..VtdConfig::default()
        }
        .capabilities();
        for bit in [2, 29, 40, 42] {
            assert_eq!(plain & (1 << bit), 0, "bit {bit} without ATS/PASID");
        }
        // The IOTLB and fault recording registers lie inside the 4 KiB window.
        let records = ((cap >> 40) & 0xff) + 1;
        assert!(FAULT_RECORD_UNITS * 16 + records * 16 <= REGISTER_WINDOW);
        const { assert!(IOTLB_REGISTER_UNITS * 16 + 16 <= REGISTER_WINDOW) };
        const {
            assert!(
                FAULT_RECORD_UNITS * 16 + MAX_FAULT_RECORDS as u64 * 16
                    <= IOTLB_REGISTER_UNITS * 16
            )
        };
        // Legacy-only, 39-bit, caching mode.
        let (cap, ecap) = VtdConfig {
            scalable: false,
            caching_mode: true,
            address_width: 39,
            fault_records: 1,
            ..VtdConfig::default()
        }
        .capabilities();
        assert_eq!((cap >> 8) & 0x1f, 0b0010);
        assert_eq!((cap >> 16) & 0x3f, 38);
        assert_ne!(cap & (1 << 7), 0);
        assert_eq!(ecap & (1 << 43), 0);
        assert_eq!(
            ecap & ((1 << 2) | (1 << 29) | (1 << 40)),
            0,
            "no SVA in legacy mode"
        );
    }

    /// Linux's `iommu_set_root_entry`, `iommu_enable_translation` and `dmar_enable_qi`: write
    /// GCMD = GSTS | command, then read GSTS once and expect the status.
    #[test]
    fn global_commands_update_the_status_before_the_write_returns() {
        let mut r = RegisterFile::new(VtdConfig::default());
        assert_eq!(r32(&r, offset::GCMD), 0);
        assert!(w64(&mut r, offset::RTADDR, 0x1234_5000 | (1 << 10)).is_empty());
        let status = r32(&r, offset::GSTS);
        assert_eq!(
            w32(&mut r, offset::GCMD, status | global::SRTP),
            vec![RegisterAction::SetRootTable(0x1234_5000 | (1 << 10))]
        );
        assert_ne!(r32(&r, offset::GSTS) & global::SRTP, 0);
        // Queued invalidation: IQA, then QIE; the head starts at 0.
        w64(&mut r, offset::IQA, 0x7000_0000 | iqa::DW | 1);
        let status = r32(&r, offset::GSTS) & !global::SRTP;
        assert_eq!(
            w32(&mut r, offset::GCMD, status | global::QIE),
            vec![RegisterAction::QueuedInvalidation(true)]
        );
        assert_ne!(r32(&r, offset::GSTS) & global::QIE, 0);
        assert_eq!(r.queue(), (0x7000_0000, 256, true, 0, 0));
        // Translation on, keeping QIE (Linux ORs the current status in).
        let status = r32(&r, offset::GSTS) & !global::SRTP;
        assert_eq!(
            w32(&mut r, offset::GCMD, status | global::TE),
            vec![RegisterAction::Translation(true)]
        );
        assert!(r.translation_enabled() && r.queued_invalidation_enabled());
        // Unsupported commands leave their status clear.
        let status = r32(&r, offset::GSTS) & !global::SRTP;
        w32(
            &mut r,
            offset::GCMD,
            status | global::IRE | global::SIRTP | global::WBF,
        );
        assert_eq!(
            r32(&r, offset::GSTS) & (global::IRE | global::SIRTP | global::WBF),
            0
        );
        // Translation off.
        let status = r32(&r, offset::GSTS) & !global::SRTP;
        assert_eq!(
            w32(&mut r, offset::GCMD, status & !global::TE),
            vec![RegisterAction::Translation(false)]
        );
    }

    #[test]
    fn queue_tail_moves_only_with_the_queue_enabled() {
        let mut r = RegisterFile::new(VtdConfig::default());
        w64(&mut r, offset::IQA, 0x8000_0000 | iqa::DW);
        assert!(w64(&mut r, offset::IQT, 3 << 5).is_empty(), "queue off");
        w32(&mut r, offset::GCMD, global::QIE);
        assert_eq!(
            w64(&mut r, offset::IQT, 4 << 5),
            vec![RegisterAction::QueueTail(4 << 5)]
        );
        r.set_queue_head(4);
        assert_eq!(r64(&r, offset::IQH), 4 << 5);
        assert_eq!(r.queue().3, 4);
        // Out-of-range tail bits are dropped.
        w64(&mut r, offset::IQT, u64::MAX);
        assert_eq!(r64(&r, offset::IQT), 0x7fff0);
        // A queue error: IQE, IQER; clearing IQE clears IQER.
        w32(&mut r, offset::FECTL, 0);
        assert!(r.queue_error(0x1234));
        assert_ne!(r32(&r, offset::FSTS) & fsts::IQE, 0);
        assert_eq!(r64(&r, offset::IQER), 0x1234);
        w32(&mut r, offset::FSTS, fsts::IQE);
        assert_eq!(r32(&r, offset::FSTS), 0);
        assert_eq!(r64(&r, offset::IQER), 0);
    }

    #[test]
    fn register_invalidations_complete_at_once() {
        let mut r = RegisterFile::new(VtdConfig::default());
        // Context cache, device-selective: CIRG 3, DID 5, SID 0x0100, FM 0.
        let cmd = ccmd::ICC | (3 << ccmd::CIRG_SHIFT) | (0x0100 << ccmd::SID_SHIFT) | 5;
        assert_eq!(
            w64(&mut r, offset::CCMD, cmd),
            vec![RegisterAction::InvalidateContextCache {
                granularity: 3,
                domain: 5,
                source: 0x0100,
                function_mask: 0
            }]
        );
        let done = r64(&r, offset::CCMD);
        assert_eq!(done & ccmd::ICC, 0);
        assert_eq!((done >> ccmd::CAIG_SHIFT) & 3, 3);
        // IOTLB page-selective: IVA then the command.
        let base = IOTLB_REGISTER_UNITS * 16;
        w64(&mut r, base, 0xabc_d000 | 2);
        let cmd = iotlb::IVT | (3 << iotlb::IIRG_SHIFT) | (7 << iotlb::DID_SHIFT) | iotlb::DRAIN;
        assert_eq!(
            w64(&mut r, base + 8, cmd),
            vec![RegisterAction::InvalidateIotlb {
                granularity: 3,
                domain: 7,
                address: 0xabc_d000,
                address_mask: 2
            }]
        );
        assert_eq!(r64(&r, base + 8) & iotlb::IVT, 0);
    }

    #[test]
    fn faults_are_recorded_signalled_once_and_overflow() {
        let mut r = RegisterFile::new(VtdConfig {
            fault_records: 2,
            ..VtdConfig::default()
        });
        let fault = FaultRecord {
            source_id: 0x0008,
            pasid: None,
            address: 0xdead_b123,
            reason: 0x05,
            write: true,
            execute: false,
            privileged: false,
        };
        // Masked at reset: pending, no MSI yet; unmasking sends it.
        assert!(!r.record_fault(fault));
        assert_ne!(r32(&r, offset::FECTL) & event::IP, 0);
        assert_eq!(
            w32(&mut r, offset::FECTL, 0),
            vec![RegisterAction::SendFaultEvent]
        );
        assert_eq!(r32(&r, offset::FECTL), 0);
        let fr = FAULT_RECORD_UNITS * 16;
        assert_eq!(r64(&r, fr), 0xdead_b000);
        let high = r64(&r, fr + 8);
        assert_eq!(high & 0xffff, 0x0008, "SID");
        assert_eq!((high >> 32) & 0xff, 0x05, "reason");
        assert_ne!(high & (1 << 63), 0, "F");
        assert_eq!(high & (1 << 62), 0, "T = write");
        let status = r32(&r, offset::FSTS);
        assert_ne!(status & fsts::PPF, 0);
        assert_eq!(
            (status >> fsts::FRI_SHIFT) & 0xff,
            0,
            "first pending record"
        );
        // A second fault while one is pending: recorded, no second MSI.
        assert!(!r.record_fault(FaultRecord {
            pasid: Some(0x42),
            write: false,
            ..fault
        }));
        let high = r64(&r, fr + 16 + 8);
        assert_ne!(high & (1 << 31), 0, "PASID present");
        assert_eq!((high >> 40) & 0xf_ffff, 0x42);
        assert_ne!(high & (1 << 62), 0, "T = read");
        // Both records full: the third overflows.
        assert!(!r.record_fault(fault));
        assert_ne!(r32(&r, offset::FSTS) & fsts::PFO, 0);
        // Software clears F of both (Linux writes DMA_FRCD_F to dword 3) and PFO.
        w32(&mut r, fr + 12, 1 << 31);
        w32(&mut r, fr + 16 + 12, 1 << 31);
        w32(&mut r, offset::FSTS, fsts::PFO);
        assert_eq!(r32(&r, offset::FSTS) & (fsts::PPF | fsts::PFO), 0);
        // The next fault signals again; it goes to the next record in turn, and FRI names it
        // (dmar_fault() reads from FRI while F is set).
        assert!(r.record_fault(fault));
        let status = r32(&r, offset::FSTS);
        assert_eq!(
            (status >> fsts::FRI_SHIFT) & 0xff,
            0,
            "record 0 again after wrapping"
        );
        assert_ne!(r64(&r, fr + 8) & (1 << 63), 0);
        w32(&mut r, fr + 12, 1 << 31);
        assert!(r.record_fault(fault));
        let status = r32(&r, offset::FSTS);
        assert_eq!(
            (status >> fsts::FRI_SHIFT) & 0xff,
            1,
            "FRI names the new first pending"
        );
        assert_ne!(r64(&r, fr + 16 + 8) & (1 << 63), 0);
    }

    #[test]
    fn invalidation_wait_completion_and_its_event() {
        let mut r = RegisterFile::new(VtdConfig::default());
        w32(&mut r, offset::IEDATA, 0x45);
        w32(&mut r, offset::IEADDR, 0xfee0_0000);
        assert!(!r.invalidation_complete(), "masked");
        assert_eq!(r32(&r, offset::ICS), 1);
        assert_eq!(
            w32(&mut r, offset::IECTL, 0),
            vec![RegisterAction::SendInvalidationEvent]
        );
        w32(&mut r, offset::ICS, 1);
        assert_eq!(r32(&r, offset::ICS), 0);
        assert!(r.invalidation_complete(), "unmasked: MSI now");
        assert_eq!(r.invalidation_event_message(), (0xfee0_0000, 0, 0x45));
    }

    #[test]
    fn odd_accesses_read_zero_and_never_panic() {
        let mut r = RegisterFile::new(VtdConfig::default());
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = x % 0x1100;
            let len = [1usize, 2, 3, 4, 8, 16][((x >> 20) % 6) as usize];
            let mut buf = vec![0u8; len];
            r.read(off, &mut buf);
            if len != 4 && len != 8 {
                assert!(buf.iter().all(|&b| b == 0));
            }
            let _ = r.write(off, &(x >> 3).to_le_bytes()[..len.min(8)]);
        }
        // Read-only registers kept their values.
        let (cap, ecap) = VtdConfig::default().capabilities();
        assert_eq!(r64(&r, offset::CAP), cap);
        assert_eq!(r64(&r, offset::ECAP), ecap);
        assert_eq!(r32(&r, offset::VER), 0x10);
    }
}
