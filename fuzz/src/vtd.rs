//! VT-d register file harness: arbitrary guest register accesses (any width and offset in and
//! past the 4 KiB window) interleaved with what the remapping unit does on its side (record a
//! fault, report a queue error, complete an invalidation wait, advance the queue head), against
//! `iommu::vtd::registers::RegisterFile`.
//!
//! Input: byte 0 picks the configuration (bit 0 scalable, bit 1 caching mode, bit 2 39-bit,
//! bits 7:3 fault records). Then operations of 12 bytes: kind (bits 1:0 read / write / unit
//! event / reset of nothing; bits 7:4 the width byte, see `crate::width`), offset (2 bytes, modulo
//! 0x1100), value (8 bytes), extra (1 byte: the unit event and its fields).
//!
//! Invariants after every operation: CAP, ECAP and VER never change; GCMD reads 0; GSTS holds
//! only TE, RTPS and QIES; FSTS.PPF is set exactly when a fault record has F set; FRI names an
//! existing record; the queue indices fit the queue; a write never asks for an action the
//! configuration cannot do.

use iommu::vtd::registers::{
    FaultRecord, RegisterAction, RegisterFile, VtdConfig, fsts, global, offset,
};

/// Fuzz target `vtd_registers`.
pub fn run_registers(data: &[u8]) {
    let Some((&setup, mut ops)) = data.split_first() else {
        return;
    };
    let config = VtdConfig {
        scalable: setup & 1 != 0,
        caching_mode: setup & 2 != 0,
        address_width: if setup & 4 != 0 { 39 } else { 48 },
        fault_records: u16::from(setup >> 3),
        // Scalable mode brings PASIDs, device TLBs and page requests (the defaults).
        pasid_bits: 20,
        ats: setup & 1 != 0,
        pri: setup & 1 != 0,
    };
    let mut regs = RegisterFile::new(config);
    let (cap, ecap) = config.capabilities();
    let mut steps = 0;
    while ops.len() >= 12 && steps < crate::MAX_OPS {
        let (op, rest) = ops.split_at(12);
        ops = rest;
        steps += 1;
        let kind = op[0] & 3;
        let width = crate::width(op[0] >> 4);
        let off = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x1100;
        let value = u64::from_le_bytes(op[3..11].try_into().expect("8 bytes"));
        let extra = op[11];
        match kind {
            0 => {
                let mut buf = vec![0u8; width];
                regs.read(off, &mut buf);
            }
            1 => {
                let bytes = value.to_le_bytes();
                let mut data = bytes[..width.min(8)].to_vec();
                data.resize(width, 0xa5);
                for action in regs.write(off, &data) {
                    if let RegisterAction::QueueTail(_) = action {
                        assert!(regs.queued_invalidation_enabled(), "tail action, queue off");
                    }
                }
            }
            2 => match extra & 3 {
                0 => {
                    let _ = regs.record_fault(FaultRecord {
                        source_id: value as u16,
                        pasid: (extra & 4 != 0).then_some((value >> 16) as u32),
                        address: value,
                        reason: (value >> 56) as u8,
                        write: extra & 8 != 0,
                        execute: extra & 16 != 0,
                        privileged: extra & 32 != 0,
                    });
                }
                1 => {
                    let _ = regs.queue_error(value);
                }
                2 => {
                    let _ = regs.invalidation_complete();
                }
                _ => regs.set_queue_head(value % 0x8000),
            },
            _ => {}
        }
        check(&regs, cap, ecap);
    }
}

fn read32(regs: &RegisterFile, off: u64) -> u32 {
    let mut b = [0u8; 4];
    regs.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn read64(regs: &RegisterFile, off: u64) -> u64 {
    let mut b = [0u8; 8];
    regs.read(off, &mut b);
    u64::from_le_bytes(b)
}

fn check(regs: &RegisterFile, cap: u64, ecap: u64) {
    assert_eq!(read64(regs, offset::CAP), cap, "CAP changed");
    assert_eq!(read64(regs, offset::ECAP), ecap, "ECAP changed");
    assert_eq!(read32(regs, offset::VER), 0x10, "VER changed");
    assert_eq!(read32(regs, offset::GCMD), 0, "GCMD is write-only");
    let gsts = read32(regs, offset::GSTS);
    assert_eq!(
        gsts & !(global::TE | global::SRTP | global::QIE),
        0,
        "GSTS {gsts:#x} reports a feature the unit lacks"
    );
    let records = (((cap >> 40) & 0xff) + 1) as usize;
    let fro = ((cap >> 24) & 0x3ff) * 16;
    let any_f = (0..records).any(|i| read32(regs, fro + 16 * i as u64 + 12) & (1 << 31) != 0);
    let status = read32(regs, offset::FSTS);
    assert_eq!(
        status & fsts::PPF != 0,
        any_f,
        "PPF {status:#x} vs the records"
    );
    assert!(
        ((status >> fsts::FRI_SHIFT) & 0xff) < records as u32,
        "FRI past the records"
    );
    let (_, entries, _, head, tail) = regs.queue();
    assert!(entries >= 128, "queue of {entries} entries");
    assert!(
        head < 0x8000 && tail < 0x8000,
        "queue indices {head}/{tail}"
    );
}

/// Fuzz target `vtd_queue`: the invalidation queue of a remapping unit over a 1 MiB guest
/// memory. Input: byte 0 the queue setup (bit 0 256-bit descriptors, bits 3:1 QS), then 32-byte
/// chunks: each is written into the queue memory as the next descriptor (the kind byte's low
/// bits steered to the types Linux sends one time in two), and every fourth chunk also moves the
/// tail (by its last byte) and clears FSTS.
///
/// Invariants: no panic or hang; the head stays inside the queue; a wait descriptor's status
/// write only lands in guest memory (the unit writes through the guest memory map).
pub fn run_queue(data: &[u8]) {
    use iommu::vtd::registers::iqa;
    use iommu::vtd::unit::RemappingUnit;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

    let Some((&setup, mut rest)) = data.split_first() else {
        return;
    };
    let memory = GuestMemoryAtomic::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("1 MiB"),
    );
    let mut unit = RemappingUnit::new(
        VtdConfig::default(),
        memory.clone(),
        Arc::new(iommu::NullMsiSink),
    );
    const QUEUE: u64 = 0x8_0000;
    let wide = setup & 1 != 0;
    let qs = u64::from((setup >> 1) & 7).min(3); // up to 32 KiB: inside the 1 MiB
    let iqa_value = QUEUE | qs | if wide { iqa::DW } else { 0 };
    unit.write(offset::IQA, &iqa_value.to_le_bytes());
    unit.write(offset::GCMD, &global::QIE.to_le_bytes());
    let entries = (4096u64 << qs) / if wide { 32 } else { 16 };
    let size = if wide { 32 } else { 16 };
    let mut slot = 0u64;
    let mut n = 0;
    while rest.len() >= 32 && n < crate::MAX_OPS {
        let (chunk, tail) = rest.split_at(32);
        rest = tail;
        n += 1;
        let mut desc = chunk[..size].to_vec();
        if desc[0] & 0x80 == 0 {
            desc[0] = (desc[0] % 10) & 0xf; // a type Linux sends (or 0)
            desc[1] &= !0x0e; // no extended type bits
        }
        let gpa = QUEUE + slot * size as u64;
        let _ = memory.memory().write_slice(&desc, GuestAddress(gpa));
        slot = (slot + 1) % entries;
        if n % 4 == 0 {
            let shift = if wide { 5 } else { 4 };
            let tail_index = u64::from(chunk[31]) % (entries + 2);
            unit.write(offset::FSTS, &0x7fu32.to_le_bytes());
            unit.write(offset::IQT, &(tail_index << shift).to_le_bytes());
            let (_, queue_entries, _, head, _) = unit.registers().queue();
            assert!(head < queue_entries, "head {head} outside {queue_entries}");
        }
    }
}

/// Fuzz target `vtd_page_requests`: the page request queue and page group responses of a
/// scalable-mode unit (ATS and PRI on) over 1 MiB of guest memory whose root/context tables give
/// 00:02.0 Page Request Enable. Input: 16-byte operations, byte 0 picks one:
/// - 0: a page request from 00:02.0 or a random requester ID (bytes 1..=15: address, flags,
///   group index, PASID);
/// - 1: a register write (bytes 1..=2 offset inside 0xc0..=0xef, bytes 3..=10 value, 4 or 8
///   bytes) — PQH, PQT, PQA, PRS, PECTL and the event message registers;
/// - 2: a page group response (random code, requester ID, PASID, group) through the
///   invalidation queue;
/// - 3: a random injection (forced response codes, dropped requests).
///
/// Invariants: no panic or hang; PQT stays inside the queue; every response the endpoint gets
/// is for its own requester ID; the unit answers at most one response per request it took or
/// descriptor it processed.
pub fn run_page_requests(data: &[u8]) {
    use iommu::vtd::registers::iqa;
    use iommu::vtd::unit::RemappingUnit;
    use iommu::{
        AtcInvalidation, DeviceEndpoint, FunctionBinding, PageRequest, PageResponse,
        PageResponseCode, Pasid, RequesterId,
    };
    use std::sync::{Arc, Mutex};
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

    #[derive(Default)]
    struct Endpoint(Mutex<Vec<PageResponse>>);
    impl DeviceEndpoint for Endpoint {
        fn invalidate_atc(&self, request: AtcInvalidation) {
            request.completion.complete();
        }
        fn page_response(&self, response: PageResponse) {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(response);
        }
    }

    let memory = GuestMemoryAtomic::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("1 MiB"),
    );
    let put = |gpa: u64, v: u64| {
        let _ = memory.memory().write_obj(v, GuestAddress(gpa));
    };
    // Root 0x1000 → context table 0x2000; 00:02.0 (devfn 0x10): P, DTE, PASIDE, PRE.
    put(0x1000, 0x2000 | 1);
    put(
        0x2000 + 0x10 * 32,
        0x3000 | 1 | (1 << 2) | (1 << 3) | (1 << 4),
    );
    let mut unit = RemappingUnit::new(
        VtdConfig::default(),
        memory.clone(),
        Arc::new(iommu::NullMsiSink),
    );
    let device = RequesterId::new(0, 2, 0);
    let endpoint = Arc::new(Endpoint::default());
    unit.register_endpoint(FunctionBinding::new(device), endpoint.clone());
    const QUEUE: u64 = 0x8_0000;
    const PRQ: u64 = 0x4_0000;
    unit.write(offset::RTADDR, &(0x1000u64 | (1 << 10)).to_le_bytes());
    unit.write(offset::GCMD, &global::SRTP.to_le_bytes());
    unit.write(offset::IQA, &(QUEUE | iqa::DW).to_le_bytes());
    unit.write(offset::GCMD, &(global::QIE | global::TE).to_le_bytes());
    unit.write(offset::PQA, &PRQ.to_le_bytes());
    unit.write(offset::PECTL, &0u32.to_le_bytes());
    let mut slot = 0u64;
    let mut answers_possible = 0usize;
    for op in data.chunks_exact(16).take(crate::MAX_OPS) {
        let word = |at: usize| u64::from_le_bytes(op[at..at + 8].try_into().expect("8 bytes"));
        match op[0] % 4 {
            0 => {
                answers_possible += 1;
                let rid = if op[1] & 1 == 0 {
                    device
                } else {
                    RequesterId(u16::from_le_bytes([op[2], op[3]]))
                };
                let flags = op[4];
                let _ = unit.page_request(&PageRequest {
                    requester_id: rid,
                    pasid: Pasid::new(u32::from(op[5]) | (u32::from(op[6]) << 8)),
                    address: word(8),
                    read: flags & 1 != 0,
                    write: flags & 2 != 0,
                    execute: flags & 4 != 0,
                    privileged: flags & 8 != 0,
                    group_index: u16::from(op[7]) | (u16::from(flags >> 7) << 8),
                    last_in_group: flags & 0x10 != 0,
                });
            }
            1 => {
                let off = (0xc0 + u64::from(op[1] % 0x30)) & !3;
                let value = word(3 + (op[2] as usize % 5));
                if op[2] & 0x80 != 0 && off % 8 == 0 {
                    unit.write(off, &value.to_le_bytes());
                } else {
                    unit.write(off, &(value as u32).to_le_bytes());
                }
            }
            2 => {
                answers_possible += 1;
                let desc = [
                    9 | (word(1) & !0xf & 0x000f_ffff_ffff_fff0),
                    word(8) & 0xff8,
                    0,
                    0,
                ];
                let bytes: Vec<u8> = desc.iter().flat_map(|q| q.to_le_bytes()).collect();
                let _ = memory
                    .memory()
                    .write_slice(&bytes, GuestAddress(QUEUE + slot * 32));
                slot = (slot + 1) % 128;
                unit.write(offset::FSTS, &0x7fu32.to_le_bytes());
                unit.write(offset::IQT, &(slot << 5).to_le_bytes());
            }
            _ => {
                if op[1] & 1 == 0 {
                    let code = if op[2] & 1 == 0 {
                        PageResponseCode::ResponseFailure
                    } else {
                        PageResponseCode::InvalidRequest
                    };
                    unit.inject_page_responses(code, u32::from(op[3] % 4));
                } else {
                    unit.drop_page_requests(u32::from(op[3] % 4));
                }
            }
        }
        let (_, entries, head, tail) = unit.registers().page_request_queue();
        assert!(
            head < entries && tail < entries,
            "PRQ indices {head}/{tail} of {entries}"
        );
    }
    let got = endpoint.0.lock().unwrap_or_else(|e| e.into_inner()).len();
    assert!(
        got <= answers_possible,
        "{got} responses for {answers_possible} requests and descriptors"
    );
}
