//! `DmaSpace` harness: arbitrary device DMA (address, length, direction) over a small guest
//! memory with holes, adjacent regions and, in one layout, a region at the very top of the
//! address space.
//!
//! Input: setup (layout, translator, PASID), then operations (see [`Op`]).
//!
//! With the identity translator (what the VMM uses today) the harness keeps a shadow copy of
//! guest memory and checks:
//! - an access succeeds exactly when every byte of it is backed by guest memory (regions may
//!   be adjacent); one that wraps the address space fails with `AddressOverflow`, one into a
//!   hole with `Unmapped`; empty accesses always succeed;
//! - successful reads return the shadow's bytes; no write changes memory outside its own range;
//! - ATS translation requests translate to themselves; page requests are refused.
//!
//! With the harness translator (standing in for the future VT-d model: pages of 16 B..1 MiB,
//! an IOVA→GPA offset that may wrap, per-page faults, read-only/write-only pages, zero-length
//! translations that break the translator contract) the oracle is: no panic, no hang, and a
//! result (never a partial success) for every access.

use std::fmt::Write as _;
use std::sync::Arc;

use iommu::{
    AddressType, DmaAccess, DmaError, DmaRequest, DmaSpace, DmaTranslator, PageRequest, Pasid,
    RequesterId, Translation,
};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::{MAX_OPS, Reader, Writer};

/// Guest memory layouts: `(start, size)` ranges.
pub const LAYOUTS: [&[(u64, u64)]; 4] = [
    // Low RAM, a hole, then two adjacent regions.
    &[(0, 0x4000), (0x1_0000, 0x2000), (0x1_2000, 0x1000)],
    // A page low, and the top of the address space: vm-memory refuses a region that ends at
    // 2^64, so the last one stops one byte short of it.
    &[
        (0x1000, 0x1000),
        (0xffff_ffff_ffff_d000, 0x1000),
        (0xffff_ffff_ffff_f000, 0xfff),
    ],
    // One region.
    &[(0, 0x8000)],
    // Pages with holes between them.
    &[
        (0x0000, 0x1000),
        (0x2000, 0x1000),
        (0x4000, 0x1000),
        (0x6000, 0x1000),
        (0x8000, 0x1000),
        (0xa000, 0x1000),
    ],
];

/// Translator parameters (a stand-in for an IOMMU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TranslatorParams {
    /// log2 of the page size, 4..=20.
    pub page_shift: u8,
    /// Added (wrapping) to the IOVA to get the GPA.
    pub offset: u64,
    /// Pages (by `page % 8`) that fault.
    pub fault_mask: u8,
    /// Pages that deny reads.
    pub deny_read_mask: u8,
    /// Pages that deny writes.
    pub deny_write_mask: u8,
    /// Pages whose translation has length 0 (a translator bug the DMA layer must survive).
    pub zero_len_mask: u8,
    /// Bytes the translation claims past the end of the page.
    pub overshoot: u32,
}

/// Setup: memory layout, translator (`None` = identity, as in the VMM today), PASID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setup {
    pub layout: u8,
    pub translator: Option<TranslatorParams>,
    pub pasid: Option<u32>,
}

struct FuzzTranslator(TranslatorParams);

impl DmaTranslator for FuzzTranslator {
    fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError> {
        let p = &self.0;
        let shift = u32::from(p.page_shift.clamp(4, 20));
        let page_bit = 1u8 << ((request.address >> shift) % 8);
        if p.fault_mask & page_bit != 0 {
            return Err(DmaError::TranslationFault {
                requester_id: request.requester_id,
                iova: request.address,
                access: request.access,
                reason: "harness: not present".into(),
            });
        }
        let in_page = (1u64 << shift) - (request.address & ((1u64 << shift) - 1));
        let len = if p.zero_len_mask & page_bit != 0 {
            0
        } else {
            in_page.saturating_add(u64::from(p.overshoot))
        };
        let gpa = match request.address_type {
            AddressType::Translated => request.address,
            _ => request.address.wrapping_add(p.offset),
        };
        Ok(Translation::new(
            gpa,
            len,
            p.deny_read_mask & page_bit == 0,
            p.deny_write_mask & page_bit == 0,
        ))
    }
}

/// Where an access starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Iova {
    /// Start of region `region` (modulo) + `delta`.
    RegionStart { region: u8, delta: i16 },
    /// End (exclusive) of region `region` + `delta`.
    RegionEnd { region: u8, delta: i16 },
    /// Any address.
    Raw(u64),
    /// `u64::MAX - back`.
    Top(u16),
}

/// One device operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read {
        iova: Iova,
        len: u16,
    },
    Write {
        iova: Iova,
        len: u16,
        fill: u8,
    },
    ReadTranslated {
        iova: Iova,
        len: u16,
    },
    WriteTranslated {
        iova: Iova,
        len: u16,
        fill: u8,
    },
    ReadObj {
        iova: Iova,
    },
    WriteObj {
        iova: Iova,
        value: u64,
    },
    /// ATS translation request.
    Translate {
        iova: Iova,
        len: u64,
        write: bool,
    },
    /// PRI page request.
    PageRequest {
        iova: Iova,
        flags: u8,
    },
    /// The VMM swaps guest memory for another layout (fresh, zeroed).
    SwapMemory {
        layout: u8,
    },
}

const OP_KINDS: u8 = 9;

fn decode_iova(r: &mut Reader) -> Option<Iova> {
    Some(match r.u8()? % 4 {
        0 => Iova::RegionStart {
            region: r.u8()?,
            delta: r.u16()? as i16,
        },
        1 => Iova::RegionEnd {
            region: r.u8()?,
            delta: r.u16()? as i16,
        },
        2 => Iova::Raw(r.u64()?),
        _ => Iova::Top(r.u16()?),
    })
}

fn encode_iova(w: &mut Writer, iova: Iova) {
    match iova {
        Iova::RegionStart { region, delta } => w.u8(0).u8(region).u16(delta as u16),
        Iova::RegionEnd { region, delta } => w.u8(1).u8(region).u16(delta as u16),
        Iova::Raw(a) => w.u8(2).u64(a),
        Iova::Top(b) => w.u8(3).u16(b),
    };
}

fn decode_op(r: &mut Reader) -> Option<Op> {
    Some(match r.u8()? % OP_KINDS {
        0 => Op::Read {
            iova: decode_iova(r)?,
            len: r.u16()?,
        },
        1 => Op::Write {
            iova: decode_iova(r)?,
            len: r.u16()?,
            fill: r.u8()?,
        },
        2 => Op::ReadTranslated {
            iova: decode_iova(r)?,
            len: r.u16()?,
        },
        3 => Op::WriteTranslated {
            iova: decode_iova(r)?,
            len: r.u16()?,
            fill: r.u8()?,
        },
        4 => Op::ReadObj {
            iova: decode_iova(r)?,
        },
        5 => Op::WriteObj {
            iova: decode_iova(r)?,
            value: r.u64()?,
        },
        6 => Op::Translate {
            iova: decode_iova(r)?,
            len: r.u64()?,
            write: r.u8()? & 1 != 0,
        },
        7 => Op::PageRequest {
            iova: decode_iova(r)?,
            flags: r.u8()?,
        },
        _ => Op::SwapMemory { layout: r.u8()? },
    })
}

fn encode_op(w: &mut Writer, op: Op) {
    match op {
        Op::Read { iova, len } => {
            w.u8(0);
            encode_iova(w, iova);
            w.u16(len);
        }
        Op::Write { iova, len, fill } => {
            w.u8(1);
            encode_iova(w, iova);
            w.u16(len).u8(fill);
        }
        Op::ReadTranslated { iova, len } => {
            w.u8(2);
            encode_iova(w, iova);
            w.u16(len);
        }
        Op::WriteTranslated { iova, len, fill } => {
            w.u8(3);
            encode_iova(w, iova);
            w.u16(len).u8(fill);
        }
        Op::ReadObj { iova } => {
            w.u8(4);
            encode_iova(w, iova);
        }
        Op::WriteObj { iova, value } => {
            w.u8(5);
            encode_iova(w, iova);
            w.u64(value);
        }
        Op::Translate { iova, len, write } => {
            w.u8(6);
            encode_iova(w, iova);
            w.u64(len).u8(u8::from(write));
        }
        Op::PageRequest { iova, flags } => {
            w.u8(7);
            encode_iova(w, iova);
            w.u8(flags);
        }
        Op::SwapMemory { layout } => {
            w.u8(8).u8(layout);
        }
    }
}

/// Setup encoding: `flags` (bits 0-1 layout, bit 2 harness translator, bit 3 PASID), then if
/// the translator is on: page shift, offset (8 bytes), fault, deny-read, deny-write, zero-length
/// masks, overshoot (4 bytes); then if PASID is on: PASID (4 bytes).
fn decode_setup(r: &mut Reader) -> Setup {
    let flags = r.u8().unwrap_or(0);
    let translator = if flags & 4 != 0 {
        (|| {
            Some(TranslatorParams {
                page_shift: 4 + r.u8()? % 17,
                offset: r.u64()?,
                fault_mask: r.u8()?,
                deny_read_mask: r.u8()?,
                deny_write_mask: r.u8()?,
                zero_len_mask: r.u8()?,
                overshoot: r.u32()?,
            })
        })()
    } else {
        None
    };
    let pasid = if flags & 8 != 0 { r.u32() } else { None };
    Setup {
        layout: flags & 3,
        translator,
        pasid,
    }
}

fn encode_setup(w: &mut Writer, s: &Setup) {
    let flags = (s.layout & 3)
        | if s.translator.is_some() { 4 } else { 0 }
        | if s.pasid.is_some() { 8 } else { 0 };
    w.u8(flags);
    if let Some(t) = s.translator {
        w.u8(t.page_shift.saturating_sub(4))
            .u64(t.offset)
            .u8(t.fault_mask)
            .u8(t.deny_read_mask)
            .u8(t.deny_write_mask)
            .u8(t.zero_len_mask)
            .u32(t.overshoot);
    }
    if let Some(p) = s.pasid {
        w.u32(p);
    }
}

/// Splits an input into its setup and operations.
pub fn decode_ops(data: &[u8]) -> (Setup, Vec<Op>) {
    let mut r = Reader::new(data);
    let setup = decode_setup(&mut r);
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS {
        match decode_op(&mut r) {
            Some(op) => ops.push(op),
            None => break,
        }
    }
    (setup, ops)
}

/// The input that [`decode_ops`] turns into `setup` and `ops`.
pub fn encode(setup: Setup, ops: &[Op]) -> Vec<u8> {
    let mut w = Writer::default();
    encode_setup(&mut w, &setup);
    for &op in ops {
        encode_op(&mut w, op);
    }
    w.0
}

/// An input as readable text, one operation per line.
pub fn decode(data: &[u8]) -> String {
    let (setup, ops) = decode_ops(data);
    let mut s = format!("{setup:x?}\n");
    for (i, op) in ops.iter().enumerate() {
        let _ = writeln!(s, "{i:4}: {op:x?}");
    }
    s
}

/// Guest memory for layout `layout` (modulo), zeroed.
pub fn memory(layout: u8) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = LAYOUTS[usize::from(layout) % LAYOUTS.len()]
        .iter()
        .map(|&(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("harness guest memory")
}

/// Copy of guest memory as the harness expects it to be.
struct Shadow {
    regions: Vec<(u64, Vec<u8>)>,
}

impl Shadow {
    fn new(layout: u8) -> Self {
        Shadow {
            regions: LAYOUTS[usize::from(layout) % LAYOUTS.len()]
                .iter()
                .map(|&(start, size)| (start, vec![0u8; size as usize]))
                .collect(),
        }
    }

    fn locate(&self, addr: u64) -> Option<(usize, usize)> {
        self.regions
            .iter()
            .enumerate()
            .find_map(|(i, (start, bytes))| {
                let off = addr.checked_sub(*start)?;
                (off < bytes.len() as u64).then_some((i, off as usize))
            })
    }

    /// True if every byte of `[addr, addr + len)` is backed.
    fn mapped(&self, addr: u64, len: u64) -> bool {
        let end = u128::from(addr) + u128::from(len);
        let mut a = u128::from(addr);
        while a < end {
            // a < end <= 2^64, so it fits.
            let Some((i, _)) = self.locate(a as u64) else {
                return false;
            };
            let (start, bytes) = &self.regions[i];
            a = u128::from(*start) + bytes.len() as u128;
        }
        true
    }

    /// Calls `f(region, offset_in_region, offset_in_access, len)` for every piece of
    /// `[addr, addr + len)` that guest memory backs (the range may run past 2^64).
    fn overlaps(&self, addr: u64, len: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (a0, a1) = (u128::from(addr), u128::from(addr) + len as u128);
        for (i, (start, bytes)) in self.regions.iter().enumerate() {
            let (r0, r1) = (u128::from(*start), u128::from(*start) + bytes.len() as u128);
            let (lo, hi) = (a0.max(r0), a1.min(r1));
            if lo < hi {
                f(
                    i,
                    (lo - r0) as usize,
                    (lo - a0) as usize,
                    (hi - lo) as usize,
                );
            }
        }
    }

    fn get(&self, addr: u64, out: &mut [u8]) {
        self.overlaps(addr, out.len(), |i, r, o, n| {
            out[o..o + n].copy_from_slice(&self.regions[i].1[r..r + n]);
        });
    }

    fn set(&mut self, addr: u64, data: &[u8]) {
        let mut pieces = Vec::new();
        self.overlaps(addr, data.len(), |i, r, o, n| pieces.push((i, r, o, n)));
        for (i, r, o, n) in pieces {
            self.regions[i].1[r..r + n].copy_from_slice(&data[o..o + n]);
        }
    }
}

/// The DMA space under test.
pub struct Harness {
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    dma: DmaSpace,
    layout: u8,
    /// `None` with a translator other than the identity.
    shadow: Option<Shadow>,
}

impl Harness {
    pub fn new(setup: Setup) -> Self {
        let memory = GuestMemoryAtomic::new(memory(setup.layout));
        let rid = RequesterId::new(1, 0, 0);
        let mut dma = match setup.translator {
            None => DmaSpace::identity(rid, memory.clone()),
            Some(p) => DmaSpace::with_translator(rid, memory.clone(), Arc::new(FuzzTranslator(p))),
        };
        if let Some(p) = setup.pasid {
            dma = dma.with_pasid(Pasid::new(p & Pasid::MAX), p & (1 << 31) != 0);
        }
        // The device under test is a bus master (Bus Master Enable's gate has its own unit test).
        dma.set_bus_master(true);
        Harness {
            memory,
            dma,
            layout: setup.layout,
            shadow: setup
                .translator
                .is_none()
                .then(|| Shadow::new(setup.layout)),
        }
    }

    fn regions(&self) -> &'static [(u64, u64)] {
        LAYOUTS[usize::from(self.layout) % LAYOUTS.len()]
    }

    fn address(&self, iova: Iova) -> u64 {
        let regions = self.regions();
        match iova {
            Iova::RegionStart { region, delta } => {
                let (start, _) = regions[usize::from(region) % regions.len()];
                start.wrapping_add(delta as i64 as u64)
            }
            Iova::RegionEnd { region, delta } => {
                let (start, size) = regions[usize::from(region) % regions.len()];
                start.wrapping_add(size).wrapping_add(delta as i64 as u64)
            }
            Iova::Raw(a) => a,
            Iova::Top(back) => u64::MAX - u64::from(back),
        }
    }

    /// Access length: the harness translator may split into many chunks, so keep it shorter.
    fn len(&self, len: u16) -> usize {
        if self.shadow.is_some() {
            usize::from(len)
        } else {
            usize::from(len % 0x1001)
        }
    }

    /// Reads the whole of guest memory from the host side and compares it with the shadow.
    fn check_memory(&self, what: &str) {
        let Some(shadow) = &self.shadow else { return };
        let mem = self.memory.memory();
        for (start, bytes) in &shadow.regions {
            let mut actual = vec![0u8; bytes.len()];
            mem.read_slice(&mut actual, GuestAddress(*start))
                .expect("host-side read of guest memory");
            if let Some(i) = actual.iter().zip(bytes).position(|(a, b)| a != b) {
                panic!(
                    "{what}: guest memory at {:#x} is {:#x}, expected {:#x}",
                    start + i as u64,
                    actual[i],
                    bytes[i]
                );
            }
        }
    }

    /// Expected outcome of an identity access: `Ok`, `Overflow` or `Unmapped`.
    fn expect(&self, addr: u64, len: usize) -> Expect {
        let Some(shadow) = &self.shadow else {
            return Expect::Unknown;
        };
        if len == 0 {
            return Expect::Ok;
        }
        if addr.checked_add(len as u64 - 1).is_none() {
            return Expect::Overflow;
        }
        if shadow.mapped(addr, len as u64) {
            Expect::Ok
        } else {
            Expect::Unmapped
        }
    }

    fn check_result(&self, what: &str, expect: Expect, r: Result<(), &DmaError>) {
        let ok = matches!(
            (expect, r),
            (Expect::Unknown, _)
                | (Expect::Ok, Ok(()))
                | (Expect::Overflow, Err(DmaError::AddressOverflow { .. }))
                | (Expect::Unmapped, Err(DmaError::Unmapped { .. }))
        );
        assert!(ok, "{what}: expected {expect:?}, got {r:?}");
    }

    fn read(&mut self, what: &str, addr: u64, len: usize, translated: bool) {
        let expect = self.expect(addr, len);
        let mut buf = vec![0x5au8; len];
        let r = if translated {
            self.dma.read_translated(addr, &mut buf)
        } else {
            self.dma.read(addr, &mut buf)
        };
        self.check_result(what, expect, r.as_ref().map(|_| ()));
        if let (Some(shadow), Ok(())) = (&self.shadow, &r) {
            let mut want = vec![0u8; len];
            shadow.get(addr, &mut want);
            assert!(
                buf == want,
                "{what}: read returned other bytes than memory holds"
            );
        }
    }

    fn write(&mut self, what: &str, addr: u64, data: &[u8], translated: bool) {
        let expect = self.expect(addr, data.len());
        let r = if translated {
            self.dma.write_translated(addr, data)
        } else {
            self.dma.write(addr, data)
        };
        self.check_result(what, expect, r.as_ref().map(|_| ()));
        if let Some(shadow) = &mut self.shadow {
            if r.is_ok() {
                shadow.set(addr, data);
            } else {
                // A failed write may have written a prefix of its own range, nothing else:
                // take the actual bytes of that range, then compare everything.
                let mem = self.memory.memory();
                let mut pieces = Vec::new();
                shadow.overlaps(addr, data.len(), |i, r, _, n| pieces.push((i, r, n)));
                for (i, r, n) in pieces {
                    let region = &mut shadow.regions[i];
                    let gpa = region.0 + r as u64;
                    mem.read_slice(&mut region.1[r..r + n], GuestAddress(gpa))
                        .expect("host-side read of guest memory");
                }
            }
        }
        self.check_memory(what);
    }

    /// Runs one operation and checks the invariants.
    pub fn step(&mut self, op: Op) {
        let what = format!("{op:x?}");
        match op {
            Op::Read { iova, len } => {
                let len = self.len(len);
                self.read(&what, self.address(iova), len, false)
            }
            Op::ReadTranslated { iova, len } => {
                let len = self.len(len);
                self.read(&what, self.address(iova), len, true)
            }
            Op::Write { iova, len, fill } => {
                let data: Vec<u8> = (0..self.len(len))
                    .map(|i| fill.wrapping_add(i as u8))
                    .collect();
                self.write(&what, self.address(iova), &data, false)
            }
            Op::WriteTranslated { iova, len, fill } => {
                let data: Vec<u8> = (0..self.len(len))
                    .map(|i| fill.wrapping_add(i as u8))
                    .collect();
                self.write(&what, self.address(iova), &data, true)
            }
            Op::ReadObj { iova } => {
                let addr = self.address(iova);
                let expect = self.expect(addr, 8);
                let r = self.dma.read_obj::<u64>(addr);
                self.check_result(&what, expect, r.as_ref().map(|_| ()));
                if let (Some(shadow), Ok(v)) = (&self.shadow, &r) {
                    let mut want = [0u8; 8];
                    shadow.get(addr, &mut want);
                    assert_eq!(*v, u64::from_le_bytes(want), "{what}");
                }
            }
            Op::WriteObj { iova, value } => {
                let addr = self.address(iova);
                let expect = self.expect(addr, 8);
                let r = self.dma.write_obj(addr, &value);
                self.check_result(&what, expect, r.as_ref().map(|_| ()));
                if let Some(shadow) = &mut self.shadow {
                    if r.is_ok() {
                        shadow.set(addr, &value.to_le_bytes());
                        self.check_memory(&what);
                    } else {
                        // Redo through the slice path, which resyncs a partial write.
                        self.write(&what, addr, &value.to_le_bytes(), false);
                    }
                }
            }
            Op::Translate { iova, len, write } => {
                let addr = self.address(iova);
                let access = if write {
                    DmaAccess::Write
                } else {
                    DmaAccess::Read
                };
                let r = self.dma.translation_request(addr, len, access);
                if self.shadow.is_some() {
                    let t = r.unwrap_or_else(|e| panic!("{what}: identity refused: {e}"));
                    assert!(
                        t.gpa == addr && t.len >= len.max(1) && t.read && t.write,
                        "{what}: identity translated to {t:x?}"
                    );
                } else if let Ok(t) = r {
                    assert!(t.len > 0, "{what}: empty translation returned as success");
                }
            }
            Op::PageRequest { iova, flags } => {
                let r = self.dma.page_request(PageRequest {
                    requester_id: RequesterId(0xffff),
                    pasid: None,
                    address: self.address(iova) & !0xfff,
                    read: flags & 1 != 0,
                    write: flags & 2 != 0,
                    execute: flags & 4 != 0,
                    privileged: flags & 8 != 0,
                    group_index: u16::from(flags >> 4) << 5,
                    last_in_group: flags & 0x80 != 0,
                });
                assert!(
                    matches!(r, Err(DmaError::PageRequestUnsupported)),
                    "{what}: {r:?}"
                );
            }
            Op::SwapMemory { layout } => {
                let layout = layout % LAYOUTS.len() as u8;
                self.memory
                    .lock()
                    .expect("memory lock")
                    .replace(memory(layout));
                self.layout = layout;
                if self.shadow.is_some() {
                    self.shadow = Some(Shadow::new(layout));
                }
                self.check_memory(&what);
            }
        }
    }
}

/// Expected outcome of an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Ok,
    Overflow,
    Unmapped,
    Unknown,
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    run_traced(data, false);
}

/// Runs one fuzz input; with `trace`, prints each operation to stderr before running it (the
/// last one printed is the one that failed).
pub fn run_traced(data: &[u8], trace: bool) {
    let (setup, ops) = decode_ops(data);
    if trace {
        eprintln!("{setup:x?}");
    }
    let mut h = Harness::new(setup);
    for (i, op) in ops.iter().enumerate() {
        if trace {
            eprintln!("{i:4}: {op:x?}");
        }
        h.step(*op);
    }
}
