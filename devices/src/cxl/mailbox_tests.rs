//! Mailbox command-set tests. The helpers replay what Linux sends, byte for byte, with the
//! payload structs of `drivers/cxl/cxlmem.h` and `include/cxl/event.h` (7.2; 6.12 sends the
//! same commands), including the checks `cxl_internal_send_cmd()` applies to the reply.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::super::events::*;
use super::super::lsa::*;
use super::super::mailbox::*;
use super::super::poison::FLAG_OVERFLOW as POISON_FLAG_OVERFLOW;
use super::super::poison::{FLAG_MORE, PoisonRange, PoisonSource};
use super::*;

const GIB: u64 = 1 << 30;
/// A common payload size (Mailbox Capabilities Payload Size = 11).
const PAYLOAD: usize = 2048;

fn lsa(size: usize) -> Option<Box<dyn LabelStorage>> {
    Some(Box::new(MemLabelStorage::new(size).unwrap()))
}

fn dev(volatile: u64, persistent: u64) -> Memdev {
    Memdev::new(MemdevConfig {
        volatile_bytes: volatile,
        persistent_bytes: persistent,
        lsa: lsa(DEFAULT_LSA_SIZE),
        serial: 0x1234,
        id: "mem0".into(),
    })
    .unwrap()
}

fn temp_path(tag: &str) -> PathBuf {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "cxl-mbox-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn le24(b: &[u8], o: usize) -> u32 {
    u32::from(b[o]) | u32::from(b[o + 1]) << 8 | u32::from(b[o + 2]) << 16
}

/// `cxl_internal_send_cmd()` + `__cxl_pci_mbox_send_cmd()`: returns the reply truncated to
/// `size_out` (as `memcpy_fromio` of min3(size_out, payload_size, out_len) does), or the
/// return code, or "EIO" when the reply is shorter than `min_out` (0 = `size_out`).
fn send(
    md: &mut Memdev,
    op: u16,
    input: &[u8],
    size_out: usize,
    min_out: usize,
    payload: usize,
) -> Result<Vec<u8>, ReturnCode> {
    assert!(input.len() <= payload && size_out <= payload, "-E2BIG");
    let (rc, out) = md.execute(op, input, payload);
    assert!(out.len() <= payload);
    if !rc.is_success() {
        assert!(out.is_empty());
        return Err(rc);
    }
    let n = size_out.min(out.len());
    let min = if min_out == 0 { size_out } else { min_out };
    if size_out != 0 && n < min {
        panic!("-EIO: opcode {op:#x} returned {n} bytes, wanted {min}");
    }
    Ok(out[..n].to_vec())
}

/// `cxl_enumerate_cmds()`: Get Supported Logs, then the CEL through `cxl_xfer_log()`.
fn cxl_enumerate_cmds(md: &mut Memdev, payload: usize) -> Vec<(u16, u16)> {
    let gsl = send(md, opcode::GET_SUPPORTED_LOGS, &[], payload, 2, payload).unwrap();
    let entries = le16(&gsl, 0) as usize;
    let mut found = None;
    for i in 0..entries {
        let e = &gsl[8 + 20 * i..8 + 20 * (i + 1)];
        if e[..16] == CEL_UUID {
            found = Some(le32(e, 16));
        }
    }
    let size = found.expect("CEL listed (else -ENOENT)") as usize;
    // cxl_xfer_log()
    let mut log = Vec::new();
    let mut remaining = size;
    let mut offset = 0usize;
    while remaining > 0 {
        let xfer = remaining.min(payload);
        let mut inp = CEL_UUID.to_vec();
        inp.extend_from_slice(&(offset as u32).to_le_bytes());
        inp.extend_from_slice(&(xfer as u32).to_le_bytes());
        let (rc, out) = md.execute(opcode::GET_LOG, &inp, payload);
        assert_eq!(rc, ReturnCode::Success);
        log.extend_from_slice(&out[..xfer.min(out.len())]);
        if out.len() < xfer {
            break;
        }
        remaining -= xfer;
        offset += xfer;
    }
    assert_eq!(log.len(), size);
    log.chunks_exact(4)
        .map(|c| (le16(c, 0), le16(c, 2)))
        .collect()
}

/// `struct cxl_mbox_identify` as `cxl_dev_state_identify()` reads it.
#[derive(Debug)]
struct Identify {
    fw: [u8; 16],
    total: u64,
    volatile: u64,
    persistent: u64,
    align: u64,
    log_sizes: [u16; 4],
    lsa_size: u32,
    max_mer: u32,
    inject_limit: u16,
    poison_caps: u8,
    qos: u8,
}

fn cxl_dev_state_identify(md: &mut Memdev, payload: usize) -> Identify {
    let id = send(md, opcode::IDENTIFY, &[], 0x43, 0, payload).unwrap();
    assert_eq!(id.len(), 0x43);
    Identify {
        fw: id[..16].try_into().unwrap(),
        total: le64(&id, 0x10),
        volatile: le64(&id, 0x18),
        persistent: le64(&id, 0x20),
        align: le64(&id, 0x28),
        log_sizes: [
            le16(&id, 0x30),
            le16(&id, 0x32),
            le16(&id, 0x34),
            le16(&id, 0x36),
        ],
        lsa_size: le32(&id, 0x38),
        max_mer: le24(&id, 0x3c),
        inject_limit: le16(&id, 0x3f),
        poison_caps: id[0x41],
        qos: id[0x42],
    }
}

/// `cxl_set_timestamp()`: tolerates Unsupported only.
fn cxl_set_timestamp(md: &mut Memdev, ns: u64, payload: usize) {
    match send(md, opcode::SET_TIMESTAMP, &ns.to_le_bytes(), 0, 0, payload) {
        Ok(_) | Err(ReturnCode::Unsupported) => {}
        Err(rc) => panic!("set timestamp: {rc:?}"),
    }
}

/// `cxl_event_config()` + `cxl_event_irqsetup()`: returns the settings read back.
fn cxl_event_config(md: &mut Memdev, payload: usize) -> [u8; 4] {
    let p = send(md, opcode::GET_EVT_INT_POLICY, &[], 4, 0, payload).unwrap();
    assert!(p.iter().all(|s| s & 3 != 2), "FW still in control");
    send(md, opcode::SET_EVT_INT_POLICY, &[1, 1, 1, 1], 0, 0, payload).unwrap();
    let p = send(md, opcode::GET_EVT_INT_POLICY, &[], 4, 0, payload).unwrap();
    for s in &p {
        assert_eq!(s & 3, 1, "cxl_event_req_irq needs MSI/MSI-X");
    }
    p.try_into().unwrap()
}

/// One raw record handed to `__cxl_event_trace_record()`.
#[derive(Debug, Clone)]
struct Traced {
    log: u8,
    rec: Vec<u8>,
    overflow: bool,
}

/// `cxl_mem_get_records_log()` + `cxl_clear_event_record()` for one log.
fn cxl_mem_get_records_log(md: &mut Memdev, log: u8, payload: usize) -> Vec<Traced> {
    let mut traced = Vec::new();
    let max_handles = (255usize).min((payload - 6) / 2);
    for _ in 0..10_000 {
        let pl = send(
            md,
            opcode::GET_EVENT_RECORDS,
            &[log],
            payload,
            0x20,
            payload,
        )
        .unwrap();
        let nr = le16(&pl, 0x14) as usize;
        if nr == 0 {
            return traced;
        }
        let overflow = pl[0] & 1 != 0;
        let mut handles = Vec::new();
        for i in 0..nr {
            let rec = pl[0x20 + 128 * i..0x20 + 128 * (i + 1)].to_vec();
            handles.push(le16(&rec, 0x14));
            traced.push(Traced { log, rec, overflow });
        }
        for chunk in handles.chunks(max_handles) {
            let mut clr = vec![log, 0, chunk.len() as u8, 0, 0, 0];
            for h in chunk {
                clr.extend_from_slice(&h.to_le_bytes());
            }
            send(md, opcode::CLEAR_EVENT_RECORDS, &clr, 0, 0, payload).unwrap();
        }
    }
    panic!("event log never drained");
}

/// `cxl_mem_get_event_records(mds, status)`: fatal first, as Linux does.
fn cxl_mem_get_event_records(md: &mut Memdev, status: u32, payload: usize) -> Vec<Traced> {
    let mut all = Vec::new();
    for log in [3u8, 2, 1, 0] {
        if status & (1 << log) != 0 {
            all.extend(cxl_mem_get_records_log(md, log, payload));
        }
    }
    all
}

/// A Get Poison List record: (dpa, bytes, source).
type PoisonRec = (u64, u64, u8);

/// `cxl_mem_get_poison()`: (dpa, bytes, source) records for `offset..offset+len`.
fn cxl_mem_get_poison(
    md: &mut Memdev,
    offset: u64,
    len: u64,
    max_errors: u32,
    payload: usize,
) -> Result<(u8, Vec<PoisonRec>), ReturnCode> {
    let mut pi = offset.to_le_bytes().to_vec();
    pi.extend_from_slice(&(len / 64).to_le_bytes());
    let mut recs = Vec::new();
    let mut last_flags;
    loop {
        let po = send(md, opcode::GET_POISON_LIST, &pi, payload, 0x20, payload)?;
        last_flags = po[0];
        let count = le16(&po, 10) as usize;
        if count == 0 {
            break;
        }
        for i in 0..count {
            let o = 0x20 + 16 * i;
            let a = le64(&po, o);
            recs.push((a & !0x3f, u64::from(le32(&po, o + 8)) * 64, (a & 7) as u8));
        }
        if recs.len() >= max_errors as usize || po[0] & FLAG_MORE == 0 {
            break;
        }
    }
    Ok((last_flags, recs))
}

/// `cxl_pmem_get_config_data()`.
fn get_lsa(md: &mut Memdev, off: u32, len: u32, payload: usize) -> Result<Vec<u8>, ReturnCode> {
    let mut inp = off.to_le_bytes().to_vec();
    inp.extend_from_slice(&len.to_le_bytes());
    send(md, opcode::GET_LSA, &inp, len as usize, 0, payload)
}

/// `cxl_pmem_set_config_data()`.
fn set_lsa(md: &mut Memdev, off: u32, data: &[u8], payload: usize) -> Result<(), ReturnCode> {
    let mut inp = off.to_le_bytes().to_vec();
    inp.extend_from_slice(&[0; 4]);
    inp.extend_from_slice(data);
    send(md, opcode::SET_LSA, &inp, 0, 0, payload).map(|_| ())
}

/// `nd_label_data_init()`: read the whole LSA in `max_xfer` (= payload - 8) chunks.
fn read_whole_lsa(md: &mut Memdev, payload: usize) -> Vec<u8> {
    let id = cxl_dev_state_identify(md, payload);
    let size = id.lsa_size as usize;
    let max_xfer = payload - 8;
    let mut data = Vec::new();
    while data.len() < size {
        let n = max_xfer.min(size - data.len());
        data.extend(get_lsa(md, data.len() as u32, n as u32, payload).unwrap());
    }
    data
}

#[test]
fn linux_probe_sequence() {
    for payload in [256, PAYLOAD, MAX_PAYLOAD_SIZE] {
        let mut md = dev(GIB, 2 * GIB);
        let cel = cxl_enumerate_cmds(&mut md, payload);
        let ops: Vec<u16> = cel.iter().map(|e| e.0).collect();
        for op in [
            opcode::IDENTIFY,
            opcode::GET_SUPPORTED_LOGS,
            opcode::GET_LOG,
            opcode::GET_FW_INFO,
            opcode::GET_PARTITION_INFO,
            opcode::GET_LSA,
            opcode::SET_LSA,
            opcode::GET_HEALTH_INFO,
            opcode::GET_TIMESTAMP,
            opcode::SET_TIMESTAMP,
            opcode::GET_EVENT_RECORDS,
            opcode::CLEAR_EVENT_RECORDS,
            opcode::GET_EVT_INT_POLICY,
            opcode::SET_EVT_INT_POLICY,
            opcode::GET_POISON_LIST,
            opcode::INJECT_POISON,
            opcode::CLEAR_POISON,
            opcode::GET_SECURITY_STATE,
            opcode::GET_SHUTDOWN_STATE,
            opcode::SET_SHUTDOWN_STATE,
        ] {
            assert!(ops.contains(&op), "{op:#x} missing from CEL");
        }
        assert!(!ops.contains(&opcode::SANITIZE));
        cxl_set_timestamp(&mut md, 1_700_000_000_000_000_000, payload);
        let id = cxl_dev_state_identify(&mut md, payload);
        assert_eq!(&id.fw, &FW_REVISION);
        assert_eq!((id.total, id.volatile, id.persistent), (12, 4, 8));
        assert_eq!(
            id.align, 0,
            "not partitionable: no Get Partition Info at probe"
        );
        assert_eq!(id.log_sizes, [DEFAULT_LOG_CAPACITY; 4]);
        assert_eq!(id.lsa_size as usize, DEFAULT_LSA_SIZE);
        assert_eq!(id.max_mer, DEFAULT_MAX_RECORDS);
        assert_eq!(id.inject_limit, DEFAULT_INJECT_POISON_LIMIT);
        assert_eq!((id.poison_caps, id.qos), (0, 0));
        // cxl_event_config(): policy round trip, then drain every log.
        md.set_event_msgnum(3).unwrap();
        let p = cxl_event_config(&mut md, payload);
        assert_eq!(p, [0x31; 4]);
        assert!(cxl_mem_get_event_records(&mut md, 0xf, payload).is_empty());
        // cxl_nvdimm_probe(): arm dirty shutdown, then label init.
        send(&mut md, opcode::SET_SHUTDOWN_STATE, &[1], 0, 0, payload).unwrap();
        assert_eq!(md.state_report().shutdown_state, 1);
        let labels = read_whole_lsa(&mut md, payload);
        assert_eq!(labels.len(), DEFAULT_LSA_SIZE);
        // cxl_pmem_get_security_flags()
        let sec = send(&mut md, opcode::GET_SECURITY_STATE, &[], 4, 0, payload).unwrap();
        assert_eq!(le32(&sec, 0), 0);
        // cxl_get_dirty_count()
        let hi = send(&mut md, opcode::GET_HEALTH_INFO, &[], 0x12, 0, payload).unwrap();
        assert_eq!(le32(&hi, 6), 0);
    }
}

#[test]
fn cel_without_lsa_omits_label_commands() {
    let mut md = Memdev::new(MemdevConfig {
        volatile_bytes: GIB,
        ..Default::default()
    })
    .unwrap();
    let ops: Vec<u16> = cxl_enumerate_cmds(&mut md, 256)
        .iter()
        .map(|e| e.0)
        .collect();
    assert!(!ops.contains(&opcode::GET_LSA) && !ops.contains(&opcode::SET_LSA));
    assert_eq!(
        md.execute(opcode::GET_LSA, &[0; 8], 256).0,
        ReturnCode::Unsupported
    );
    assert_eq!(cxl_dev_state_identify(&mut md, 256).lsa_size, 0);
}

#[test]
fn config_validation() {
    let bad = |v, p, l: Option<Box<dyn LabelStorage>>| {
        Memdev::new(MemdevConfig {
            volatile_bytes: v,
            persistent_bytes: p,
            lsa: l,
            ..Default::default()
        })
        .unwrap_err()
    };
    assert!(matches!(
        bad(GIB + 4096, 0, None),
        MemdevError::CapacityAlignment { .. }
    ));
    assert!(matches!(bad(0, 0, None), MemdevError::BadCapacity { .. }));
    assert!(matches!(
        bad(u64::MAX - (CAPACITY_MULTIPLIER - 1), GIB, lsa(4096)),
        MemdevError::BadCapacity { .. }
    ));
    assert!(matches!(bad(0, GIB, None), MemdevError::PmemWithoutLsa));
    struct Tiny;
    impl LabelStorage for Tiny {
        fn size(&self) -> usize {
            64
        }
        fn read(&mut self, _: usize, _: &mut [u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn write(&mut self, _: usize, _: &[u8]) -> std::io::Result<()> {
            Ok(())
        }
    }
    assert!(matches!(
        bad(0, GIB, Some(Box::new(Tiny))),
        MemdevError::LsaSize { .. }
    ));
}

#[test]
fn get_log_offsets_and_errors() {
    let mut md = dev(GIB, 0);
    let cel_len = md.cel().len() * 4;
    let req = |uuid: &[u8; 16], off: u32, len: u32| {
        let mut v = uuid.to_vec();
        v.extend_from_slice(&off.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v
    };
    // Middle chunk and short tail.
    let (rc, out) = md.execute(opcode::GET_LOG, &req(&CEL_UUID, 4, 8), 256);
    assert_eq!(rc, ReturnCode::Success);
    assert_eq!(
        out,
        md.cel()[1..3]
            .iter()
            .flat_map(|e| e.to_bytes())
            .collect::<Vec<_>>()
    );
    let (rc, out) = md.execute(
        opcode::GET_LOG,
        &req(&CEL_UUID, cel_len as u32 - 4, 64),
        256,
    );
    assert_eq!((rc, out.len()), (ReturnCode::Success, 4));
    let r = |md: &mut Memdev, i: &[u8]| md.execute(opcode::GET_LOG, i, 256).0;
    assert_eq!(
        r(&mut md, &req(&CEL_UUID, cel_len as u32 + 1, 4)),
        ReturnCode::InvalidInput
    );
    assert_eq!(
        r(&mut md, &req(&CEL_UUID, 0, 257)),
        ReturnCode::InvalidInput
    );
    assert_eq!(
        r(&mut md, &req(&CEL_UUID, u32::MAX, u32::MAX)),
        ReturnCode::InvalidInput
    );
    assert_eq!(r(&mut md, &req(&[0; 16], 0, 4)), ReturnCode::Unsupported);
    assert_eq!(
        r(&mut md, &req(&CEL_UUID, 0, 4)[..0x17]),
        ReturnCode::InvalidPayloadLength
    );
    let mut long = req(&CEL_UUID, 0, 4);
    long.push(0);
    assert_eq!(r(&mut md, &long), ReturnCode::InvalidPayloadLength);
}

#[test]
fn wrong_input_lengths_are_invalid_payload_length() {
    let mut md = dev(GIB, GIB);
    let fixed: &[(u16, usize)] = &[
        (opcode::GET_EVENT_RECORDS, 1),
        (opcode::GET_EVT_INT_POLICY, 0),
        (opcode::SET_EVT_INT_POLICY, 4),
        (opcode::GET_FW_INFO, 0),
        (opcode::GET_TIMESTAMP, 0),
        (opcode::SET_TIMESTAMP, 8),
        (opcode::GET_SUPPORTED_LOGS, 0),
        (opcode::GET_LOG, 0x18),
        (opcode::IDENTIFY, 0),
        (opcode::GET_PARTITION_INFO, 0),
        (opcode::GET_LSA, 8),
        (opcode::GET_HEALTH_INFO, 0),
        (opcode::GET_SHUTDOWN_STATE, 0),
        (opcode::SET_SHUTDOWN_STATE, 1),
        (opcode::GET_POISON_LIST, 0x10),
        (opcode::INJECT_POISON, 8),
        (opcode::CLEAR_POISON, 0x48),
        (opcode::GET_SECURITY_STATE, 0),
    ];
    for &(op, len) in fixed {
        for bad in [len + 1, len.wrapping_sub(1), len + 7] {
            if bad > 256 || (op == opcode::SET_EVT_INT_POLICY && bad == 5) {
                continue;
            }
            let (rc, out) = md.execute(op, &vec![0; bad], 256);
            assert_eq!(
                rc,
                ReturnCode::InvalidPayloadLength,
                "opcode {op:#x} len {bad}"
            );
            assert!(out.is_empty());
        }
    }
    for short in 0..8 {
        assert_eq!(
            md.execute(opcode::SET_LSA, &vec![0; short], 256).0,
            ReturnCode::InvalidPayloadLength
        );
    }
    for bad in [0, 5, 7, 9] {
        assert_eq!(
            md.execute(opcode::CLEAR_EVENT_RECORDS, &vec![0; bad], 256)
                .0,
            ReturnCode::InvalidPayloadLength
        );
    }
}

#[test]
fn unsupported_opcodes() {
    let mut md = dev(GIB, GIB);
    for op in [
        0x0000,
        0xffff,
        opcode::SANITIZE,
        opcode::SECURE_ERASE,
        opcode::TRANSFER_FW,
        opcode::ACTIVATE_FW,
        opcode::SET_PARTITION_INFO,
        opcode::GET_ALERT_CONFIG,
        opcode::SET_ALERT_CONFIG,
        opcode::SCAN_MEDIA,
        opcode::GET_SCAN_MEDIA_CAPS,
        0x4501,
        0x0500,
    ] {
        assert_eq!(md.execute(op, &[], 256), (ReturnCode::Unsupported, vec![]));
        assert_eq!(md.execute(op, &[1, 2, 3], 256).0, ReturnCode::Unsupported);
    }
}

#[test]
fn fixed_outputs_layout() {
    let mut md = dev(GIB, GIB);
    let fw = send(&mut md, opcode::GET_FW_INFO, &[], 0x50, 0, 256).unwrap();
    assert_eq!(fw.len(), 0x50);
    assert_eq!((fw[0], fw[1] & 7, fw[2]), (2, 1, 0));
    assert_eq!(&fw[0x10..0x20], &FW_REVISION);
    let pi = send(&mut md, opcode::GET_PARTITION_INFO, &[], 0x20, 0, 256).unwrap();
    assert_eq!(
        [le64(&pi, 0), le64(&pi, 8), le64(&pi, 16), le64(&pi, 24)],
        [4, 4, 0, 0]
    );
    md.set_health(HealthInfo {
        health_status: 1,
        media_status: 2,
        additional_status: 3,
        life_used: 42,
        temperature: -5,
        dirty_shutdown_count: 7,
        corrected_volatile_errors: 8,
        corrected_persistent_errors: 9,
    });
    let hi = send(&mut md, opcode::GET_HEALTH_INFO, &[], 0x12, 0, 256).unwrap();
    assert_eq!(&hi[..4], &[1, 2, 3, 42]);
    assert_eq!(le16(&hi, 4) as i16, -5);
    assert_eq!((le32(&hi, 6), le32(&hi, 10), le32(&hi, 14)), (7, 8, 9));
    assert_eq!(
        send(&mut md, opcode::GET_SHUTDOWN_STATE, &[], 1, 0, 256).unwrap(),
        vec![0]
    );
}

#[test]
fn timestamp_follows_clock() {
    let mut md = dev(GIB, 0);
    let now = Arc::new(AtomicU64::new(100));
    let c = now.clone();
    md.set_clock(Box::new(move || c.load(Ordering::Relaxed)));
    let get = |md: &mut Memdev| le64(&send(md, opcode::GET_TIMESTAMP, &[], 8, 0, 256).unwrap(), 0);
    assert_eq!(get(&mut md), 0, "unset timestamp reads 0");
    cxl_set_timestamp(&mut md, 1_000_000, 256);
    now.store(600, Ordering::Relaxed);
    assert_eq!(get(&mut md), 1_000_500);
    // Event records carry the device timestamp.
    md.inject_memory_module_event(EventLogKind::Warning, &MemoryModuleEvent::default())
        .unwrap();
    let ev = cxl_mem_get_records_log(&mut md, 1, 256);
    assert_eq!(le64(&ev[0].rec, 0x18), 1_000_500);
    md.reset();
    assert_eq!(get(&mut md), 0);
}

#[test]
fn event_records_as_linux_reads_them() {
    let mut md = dev(GIB, GIB);
    let irqs = Arc::new(Mutex::new(Vec::new()));
    let sink = irqs.clone();
    md.set_event_interrupt_sink(Some(Box::new(move |i| sink.lock().unwrap().push(i))));
    md.set_event_msgnum(5).unwrap();
    // Before the driver enables MSI/MSI-X, records queue but raise nothing.
    let gm = GeneralMediaEvent {
        flags: record_flags::MAINTENANCE_NEEDED,
        maint_op_class: 2,
        dpa: 0x4000_0040 + 0x1000, // persistent partition
        not_repairable: true,
        descriptor: 0x1,
        event_type: 0x0,
        transaction_type: 0x1,
        channel: Some(3),
        rank: None,
        device: Some(0x00ab_cdef),
        component_id: Some([0x11; 16]),
    };
    let h1 = md
        .inject_general_media_event(EventLogKind::Failure, &gm)
        .unwrap();
    assert!(irqs.lock().unwrap().is_empty());
    assert_eq!(md.event_status(), 0b0100);
    cxl_event_config(&mut md, 256);
    let dram = DramEvent {
        dpa: 0x80,
        descriptor: 0x2,
        event_type: 0x1,
        transaction_type: 0x5,
        channel: Some(1),
        rank: Some(2),
        nibble_mask: Some(0x0012_3456),
        bank_group: Some(4),
        bank: Some(5),
        row: Some(0x0001_2345),
        column: Some(0x0678),
        correction_mask: Some([0xee; 32]),
        ..Default::default()
    };
    let h2 = md.inject_dram_event(EventLogKind::Fatal, &dram).unwrap();
    let mm = MemoryModuleEvent {
        event_type: 3,
        health: HealthInfo {
            temperature: 99,
            ..Default::default()
        },
        ..Default::default()
    };
    let h3 = md
        .inject_memory_module_event(EventLogKind::Informational, &mm)
        .unwrap();
    let h4 = md
        .inject_memory_module_event(EventLogKind::Informational, &mm)
        .unwrap();
    assert_eq!(
        *irqs.lock().unwrap(),
        vec![
            EventInterrupt {
                log: EventLogKind::Fatal,
                msgnum: 5
            },
            EventInterrupt {
                log: EventLogKind::Informational,
                msgnum: 5
            },
            EventInterrupt {
                log: EventLogKind::Informational,
                msgnum: 5
            },
        ]
    );
    assert_eq!(md.event_status(), 0b1101);
    assert_eq!(md.take_event_interrupt(), None, "sink already took them");

    // Payload 256 holds one record per Get: exercises the More Records flag.
    let pl = send(&mut md, opcode::GET_EVENT_RECORDS, &[0], 256, 0x20, 256).unwrap();
    assert_eq!(pl[0], FLAG_MORE_RECORDS);
    assert_eq!(le16(&pl, 0x14), 1);

    let status = md.event_status();
    let t = cxl_mem_get_event_records(&mut md, status, 256);
    assert_eq!(md.event_status(), 0);
    assert_eq!(
        t.iter().map(|t| t.log).collect::<Vec<_>>(),
        vec![3, 2, 0, 0]
    );
    // DRAM record (fatal log).
    let r = &t[0].rec;
    assert_eq!(&r[..16], &DRAM_UUID);
    assert_eq!(r[0x10], 128);
    assert_eq!(le24(r, 0x11) & 3, 3, "severity = fatal");
    assert_eq!(le16(r, 0x14), h2);
    assert_eq!(le64(r, 0x30), 0x80 | 1, "volatile DPA");
    assert_eq!((r[0x38], r[0x39], r[0x3a]), (2, 1, 5));
    assert_eq!(le16(r, 0x3b), 0xff, "validity: channel..correction mask");
    assert_eq!((r[0x3d], r[0x3e]), (1, 2));
    assert_eq!(le24(r, 0x3f), 0x12_3456);
    assert_eq!((r[0x42], r[0x43]), (4, 5));
    assert_eq!(le24(r, 0x44), 0x1_2345);
    assert_eq!(le16(r, 0x47), 0x678);
    assert_eq!(&r[0x49..0x69], &[0xee; 32]);
    // General media record (failure log).
    let r = &t[1].rec;
    assert_eq!(&r[..16], &GENERAL_MEDIA_UUID);
    assert_eq!(le24(r, 0x11), record_flags::MAINTENANCE_NEEDED | 2);
    assert_eq!(le16(r, 0x14), h1);
    assert_eq!(r[0x20], 2);
    assert_eq!(le64(r, 0x30), (0x4000_1040) | 2, "pmem, not repairable");
    assert_eq!(le16(r, 0x3b), 0b1101, "channel, device, component id valid");
    assert_eq!(r[0x3d], 3);
    assert_eq!(le24(r, 0x3f), 0xab_cdef);
    assert_eq!(&r[0x42..0x52], &[0x11; 16]);
    // Memory module records (informational log).
    let r = &t[2].rec;
    assert_eq!(&r[..16], &MEMORY_MODULE_UUID);
    assert_eq!(le16(r, 0x14), h3);
    assert_eq!(le16(&t[3].rec, 0x14), h4);
    assert_eq!(r[0x30], 3);
    assert_eq!(le16(r, 0x31 + 4) as i16, 99);
    assert!(t.iter().all(|t| !t.overflow));
}

#[test]
fn clear_event_records_rules() {
    let mut md = dev(GIB, 0);
    let mm = MemoryModuleEvent::default();
    let h: Vec<u16> = (0..3)
        .map(|_| {
            md.inject_memory_module_event(EventLogKind::Warning, &mm)
                .unwrap()
        })
        .collect();
    let clear = |md: &mut Memdev, log: u8, flags: u8, hs: &[u16]| {
        let mut v = vec![log, flags, hs.len() as u8, 0, 0, 0];
        for x in hs {
            v.extend_from_slice(&x.to_le_bytes());
        }
        md.execute(opcode::CLEAR_EVENT_RECORDS, &v, 256).0
    };
    // Skipping the oldest record, or naming an unknown handle, clears nothing.
    assert_eq!(clear(&mut md, 1, 0, &[h[1]]), ReturnCode::InvalidHandle);
    assert_eq!(
        clear(&mut md, 1, 0, &[h[1], h[0]]),
        ReturnCode::InvalidHandle
    );
    assert_eq!(
        clear(&mut md, 1, 0, &[h[0], h[1], h[2], 999]),
        ReturnCode::InvalidHandle
    );
    assert_eq!(clear(&mut md, 0, 0, &[h[0]]), ReturnCode::InvalidHandle);
    assert_eq!(md.state_report().events[1].pending, 3);
    assert_eq!(clear(&mut md, 4, 0, &[h[0]]), ReturnCode::InvalidInput);
    assert_eq!(
        clear(&mut md, 1, CLEAR_ALL, &[h[0]]),
        ReturnCode::InvalidInput
    );
    // Count byte disagreeing with the payload length.
    assert_eq!(
        md.execute(opcode::CLEAR_EVENT_RECORDS, &[1, 0, 2, 0, 0, 0, 1, 0], 256)
            .0,
        ReturnCode::InvalidPayloadLength
    );
    assert_eq!(clear(&mut md, 1, 0, &[h[0]]), ReturnCode::Success);
    assert_eq!(md.state_report().events[1].handles, vec![h[1], h[2]]);
    assert_eq!(clear(&mut md, 1, CLEAR_ALL, &[]), ReturnCode::Success);
    assert_eq!(md.event_status(), 0);
    // Get Event Records with a bad log number / length.
    assert_eq!(
        md.execute(opcode::GET_EVENT_RECORDS, &[4], 256).0,
        ReturnCode::InvalidInput
    );
    assert_eq!(
        md.execute(opcode::GET_EVENT_RECORDS, &[], 256).0,
        ReturnCode::InvalidPayloadLength
    );
}

#[test]
fn event_log_overflow() {
    let mut md = dev(GIB, 0);
    let now = Arc::new(AtomicU64::new(0));
    let c = now.clone();
    md.set_clock(Box::new(move || c.load(Ordering::Relaxed)));
    cxl_set_timestamp(&mut md, 0, 256);
    let mm = MemoryModuleEvent::default();
    for i in 0..DEFAULT_LOG_CAPACITY {
        now.store(u64::from(i), Ordering::Relaxed);
        md.inject_memory_module_event(EventLogKind::Fatal, &mm)
            .unwrap();
    }
    for t in [1000, 2000] {
        now.store(t, Ordering::Relaxed);
        assert!(matches!(
            md.inject_memory_module_event(EventLogKind::Fatal, &mm),
            Err(MemdevError::EventLogOverflow(EventLogKind::Fatal))
        ));
    }
    let pl = send(
        &mut md,
        opcode::GET_EVENT_RECORDS,
        &[3],
        PAYLOAD,
        0x20,
        PAYLOAD,
    )
    .unwrap();
    assert_eq!(pl[0], FLAG_OVERFLOW | FLAG_MORE_RECORDS);
    assert_eq!(le16(&pl, 2), 2);
    assert_eq!((le64(&pl, 4), le64(&pl, 12)), (1000, 2000));
    assert_eq!(le16(&pl, 0x14) as usize, (PAYLOAD - 0x20) / 128);
    let t = cxl_mem_get_records_log(&mut md, 3, PAYLOAD);
    assert_eq!(t.len(), usize::from(DEFAULT_LOG_CAPACITY));
    assert!(t[0].overflow);
    assert!(
        !t.last().unwrap().overflow,
        "clearing ends the overflow condition"
    );
    // Handles stay unique and nonzero.
    let mut hs: Vec<u16> = t.iter().map(|t| le16(&t.rec, 0x14)).collect();
    assert!(hs.iter().all(|h| *h != 0));
    hs.sort();
    hs.dedup();
    assert_eq!(hs.len(), t.len());
}

#[test]
fn interrupt_policy_rules() {
    let mut md = dev(GIB, 0);
    assert_eq!(
        send(&mut md, opcode::GET_EVT_INT_POLICY, &[], 4, 0, 256).unwrap(),
        vec![0; 4]
    );
    // No interrupt without an MSI policy; pull model otherwise.
    md.inject_memory_module_event(EventLogKind::Informational, &MemoryModuleEvent::default())
        .unwrap();
    assert_eq!(md.take_event_interrupt(), None);
    // CXL 3.0's 5-byte form; host message numbers are ignored; FW mode accepted.
    send(
        &mut md,
        opcode::SET_EVT_INT_POLICY,
        &[0xf1, 0x02, 0x00, 0x01, 0x01],
        0,
        0,
        256,
    )
    .unwrap();
    assert_eq!(
        send(&mut md, opcode::GET_EVT_INT_POLICY, &[], 4, 0, 256).unwrap(),
        vec![0x01, 0x02, 0x00, 0x01]
    );
    md.set_event_msgnum(9).unwrap();
    assert_eq!(
        send(&mut md, opcode::GET_EVT_INT_POLICY, &[], 4, 0, 256).unwrap(),
        vec![0x91, 0x02, 0x00, 0x91]
    );
    md.inject_memory_module_event(EventLogKind::Fatal, &MemoryModuleEvent::default())
        .unwrap();
    md.inject_memory_module_event(EventLogKind::Warning, &MemoryModuleEvent::default())
        .unwrap();
    assert_eq!(
        md.take_event_interrupt(),
        Some(EventInterrupt {
            log: EventLogKind::Fatal,
            msgnum: 9
        })
    );
    assert_eq!(md.take_event_interrupt(), None);
    assert_eq!(
        md.execute(opcode::SET_EVT_INT_POLICY, &[3, 0, 0, 0], 256).0,
        ReturnCode::InvalidInput
    );
    assert!(matches!(
        md.set_event_msgnum(16),
        Err(MemdevError::InvalidMsgnum(16))
    ));
    md.reset();
    assert_eq!(
        send(&mut md, opcode::GET_EVT_INT_POLICY, &[], 4, 0, 256).unwrap(),
        vec![0; 4]
    );
}

#[test]
fn lsa_bounds() {
    let mut md = dev(0, GIB);
    let size = DEFAULT_LSA_SIZE as u32;
    set_lsa(&mut md, size - 4, &[1, 2, 3, 4], 256).unwrap();
    assert_eq!(
        get_lsa(&mut md, size - 4, 4, 256).unwrap(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(get_lsa(&mut md, size - 4, 0, 256).unwrap(), vec![]);
    assert_eq!(
        get_lsa(&mut md, size - 3, 4, 256),
        Err(ReturnCode::InvalidInput)
    );
    assert_eq!(
        get_lsa(&mut md, size, 1, 256),
        Err(ReturnCode::InvalidInput)
    );
    let mut inp = u32::MAX.to_le_bytes().to_vec();
    inp.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        md.execute(opcode::GET_LSA, &inp, 256).0,
        ReturnCode::InvalidInput
    );
    let mut inp = u32::MAX.to_le_bytes().to_vec();
    inp.extend_from_slice(&16u32.to_le_bytes());
    assert_eq!(
        md.execute(opcode::GET_LSA, &inp, 256).0,
        ReturnCode::InvalidInput
    );
    // Longer than the payload area.
    let mut inp = 0u32.to_le_bytes().to_vec();
    inp.extend_from_slice(&257u32.to_le_bytes());
    assert_eq!(
        md.execute(opcode::GET_LSA, &inp, 256).0,
        ReturnCode::InvalidInput
    );
    assert_eq!(
        set_lsa(&mut md, size - 3, &[9; 4], 256),
        Err(ReturnCode::InvalidInput)
    );
    assert_eq!(
        set_lsa(&mut md, u32::MAX, &[9; 4], 256),
        Err(ReturnCode::InvalidInput)
    );
    set_lsa(&mut md, size, &[], 256).unwrap();
    assert_eq!(
        get_lsa(&mut md, size - 4, 4, 256).unwrap(),
        vec![1, 2, 3, 4]
    );
}

#[test]
fn lsa_persists_in_file_and_never_grows() {
    let path = temp_path("persist");
    let open = |path: &PathBuf| {
        Memdev::new(MemdevConfig {
            persistent_bytes: GIB,
            lsa: Some(Box::new(
                FileLabelStorage::open(path, DEFAULT_LSA_SIZE).unwrap(),
            )),
            ..Default::default()
        })
        .unwrap()
    };
    let payload = 1024;
    let max_xfer = payload - 8;
    // Label data as nvdimm writes it: index blocks then labels, in max_xfer chunks.
    let labels: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    {
        let mut md = open(&path);
        for (i, chunk) in labels.chunks(max_xfer - 8).enumerate() {
            set_lsa(&mut md, (i * (max_xfer - 8)) as u32, chunk, payload).unwrap();
        }
        assert_eq!(
            set_lsa(&mut md, DEFAULT_LSA_SIZE as u32 - 8, &[0xff; 16], payload),
            Err(ReturnCode::InvalidInput)
        );
    }
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        DEFAULT_LSA_SIZE as u64
    );
    let mut md = open(&path);
    let all = read_whole_lsa(&mut md, payload);
    assert_eq!(&all[..labels.len()], &labels[..]);
    assert!(all[labels.len()..].iter().all(|b| *b == 0));
    std::fs::remove_file(&path).unwrap();
}

type Writes = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

struct RecordingMedia(Writes);

impl MediaBacking for RecordingMedia {
    fn write(&mut self, dpa: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().push((dpa, data.to_vec()));
        Ok(())
    }
}

#[test]
fn poison_inject_list_clear_as_linux() {
    let mut md = dev(GIB, GIB);
    let writes = Arc::new(Mutex::new(Vec::new()));
    md.set_media_backing(Some(Box::new(RecordingMedia(writes.clone()))));
    let id = cxl_dev_state_identify(&mut md, 256);
    // cxl_inject_poison_locked(): struct cxl_mbox_inject_poison.
    for dpa in [0x40u64, GIB + 0x1000] {
        send(
            &mut md,
            opcode::INJECT_POISON,
            &dpa.to_le_bytes(),
            0,
            0,
            256,
        )
        .unwrap();
    }
    // Re-injecting is a no-op.
    send(
        &mut md,
        opcode::INJECT_POISON,
        &0x40u64.to_le_bytes(),
        0,
        0,
        256,
    )
    .unwrap();
    // cxl_get_poison_by_memdev(): one request per partition.
    let (f, ram) = cxl_mem_get_poison(&mut md, 0, GIB, id.max_mer, 256).unwrap();
    assert_eq!(f, 0);
    assert_eq!(ram, vec![(0x40, 64, PoisonSource::Injected as u8)]);
    let (_, pm) = cxl_mem_get_poison(&mut md, GIB, GIB, id.max_mer, 256).unwrap();
    assert_eq!(pm, vec![(GIB + 0x1000, 64, 3)]);
    // cxl_clear_poison_locked(): struct cxl_mbox_clear_poison, zero write data.
    let mut clr = 0x40u64.to_le_bytes().to_vec();
    clr.extend_from_slice(&[0; 64]);
    send(&mut md, opcode::CLEAR_POISON, &clr, 0, 0, 256).unwrap();
    assert_eq!(*writes.lock().unwrap(), vec![(0x40, vec![0; 64])]);
    assert!(
        cxl_mem_get_poison(&mut md, 0, GIB, id.max_mer, 256)
            .unwrap()
            .1
            .is_empty()
    );
    // Bad addresses.
    let inj = |md: &mut Memdev, a: u64| md.execute(opcode::INJECT_POISON, &a.to_le_bytes(), 256).0;
    assert_eq!(inj(&mut md, 0x41), ReturnCode::InvalidInput);
    assert_eq!(inj(&mut md, 2 * GIB), ReturnCode::InvalidPhysicalAddress);
    assert_eq!(inj(&mut md, !0x3f), ReturnCode::InvalidPhysicalAddress);
    let mut clr = (2 * GIB).to_le_bytes().to_vec();
    clr.extend_from_slice(&[0; 64]);
    assert_eq!(
        md.execute(opcode::CLEAR_POISON, &clr, 256).0,
        ReturnCode::InvalidPhysicalAddress
    );
    assert_eq!(
        cxl_mem_get_poison(&mut md, GIB, 2 * GIB, 1024, 256),
        Err(ReturnCode::InvalidPhysicalAddress)
    );
    let mut gp = 0x20u64.to_le_bytes().to_vec();
    gp.extend_from_slice(&1u64.to_le_bytes());
    assert_eq!(
        md.execute(opcode::GET_POISON_LIST, &gp, 256).0,
        ReturnCode::InvalidInput
    );
    let mut gp = 0u64.to_le_bytes().to_vec();
    gp.extend_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(
        md.execute(opcode::GET_POISON_LIST, &gp, 256).0,
        ReturnCode::InvalidPhysicalAddress
    );
}

#[test]
fn poison_more_flag_and_limits() {
    let mut md = dev(GIB, 0);
    let limit = u64::from(DEFAULT_INJECT_POISON_LIMIT);
    for i in 0..limit {
        send(
            &mut md,
            opcode::INJECT_POISON,
            &(i * 0x1000).to_le_bytes(),
            0,
            0,
            256,
        )
        .unwrap();
    }
    assert_eq!(
        md.execute(opcode::INJECT_POISON, &(limit * 0x1000).to_le_bytes(), 256)
            .0,
        ReturnCode::InjectPoisonLimitReached
    );
    // 256-byte payload: 14 records per call, Linux loops on More.
    let (f, recs) = cxl_mem_get_poison(&mut md, 0, GIB, 1024, 256).unwrap();
    assert_eq!(f & FLAG_MORE, 0);
    assert_eq!(recs.len() as u64, limit);
    assert!(
        recs.iter()
            .enumerate()
            .all(|(i, r)| r.0 == i as u64 * 0x1000)
    );
    // Linux's max_errors cut-off stops early without wedging the device: a new, different
    // request starts from the beginning.
    let (f, recs) = cxl_mem_get_poison(&mut md, 0, GIB, 20, 256).unwrap();
    assert_ne!(f & FLAG_MORE, 0);
    assert_eq!(recs.len(), 28);
    let (_, recs) = cxl_mem_get_poison(&mut md, 0, GIB / 2, 1024, 256).unwrap();
    assert_eq!(recs[0].0, 0);
    // Control API: internal-source ranges, list overflow.
    let mut md = dev(GIB, 0);
    md.inject_poison(0x10_0000, 0x2000).unwrap();
    md.clear_poison(0x10_0800, 0x40).unwrap();
    assert_eq!(
        md.state_report().poison,
        vec![
            PoisonRange {
                dpa: 0x10_0000,
                length: 0x800,
                source: PoisonSource::Internal
            },
            PoisonRange {
                dpa: 0x10_0840,
                length: 0x17c0,
                source: PoisonSource::Internal
            },
        ]
    );
    assert!(matches!(
        md.inject_poison(0x10, 0x40),
        Err(MemdevError::Misaligned { .. })
    ));
    assert!(matches!(
        md.inject_poison(0x40, 0),
        Err(MemdevError::Misaligned { .. })
    ));
    assert!(matches!(
        md.inject_poison(GIB - 0x40, 0x80),
        Err(MemdevError::DpaOutOfRange { .. })
    ));
    assert!(matches!(
        md.inject_poison(u64::MAX - 0x3f, 0x40),
        Err(MemdevError::Misaligned { .. }) | Err(MemdevError::DpaOutOfRange { .. })
    ));
    md.clear_poison(0, GIB).unwrap();
    for i in 0..u64::from(DEFAULT_MAX_RECORDS) {
        md.inject_poison(i * 0x1000, 0x40).unwrap();
    }
    assert!(matches!(
        md.inject_poison(0x2000_0000, 0x40),
        Err(MemdevError::PoisonListOverflow { .. })
    ));
    assert!(md.state_report().poison_overflow.is_some());
    let (f, _) = cxl_mem_get_poison(&mut md, 0, GIB, 1024, PAYLOAD).unwrap();
    assert_ne!(f & POISON_FLAG_OVERFLOW, 0);
}

#[test]
fn optional_general_media_event_on_inject() {
    let mut md = dev(GIB, 0);
    md.set_poison_inject_event(true);
    send(
        &mut md,
        opcode::INJECT_POISON,
        &0x1000u64.to_le_bytes(),
        0,
        0,
        256,
    )
    .unwrap();
    let t = cxl_mem_get_records_log(&mut md, 0, 256);
    assert_eq!(t.len(), 1);
    assert_eq!(&t[0].rec[..16], &GENERAL_MEDIA_UUID);
    assert_eq!(le64(&t[0].rec, 0x30), 0x1000 | 1);
    assert_eq!(t[0].rec[0x3a], 4, "transaction type: host inject poison");
}

#[test]
fn inject_event_validation() {
    let mut md = dev(GIB, 0);
    let gm = |dpa| GeneralMediaEvent {
        dpa,
        ..Default::default()
    };
    assert!(matches!(
        md.inject_general_media_event(EventLogKind::Warning, &gm(GIB)),
        Err(MemdevError::DpaOutOfRange { .. })
    ));
    assert!(matches!(
        md.inject_general_media_event(EventLogKind::Warning, &gm(0x41)),
        Err(MemdevError::Misaligned { .. })
    ));
    assert!(matches!(
        md.inject_dram_event(
            EventLogKind::Warning,
            &DramEvent {
                dpa: !0x3f,
                ..Default::default()
            }
        ),
        Err(MemdevError::DpaOutOfRange { .. })
    ));
}

#[test]
fn mailbox_backend_trait() {
    let mut md = dev(GIB, 0);
    let b: &mut dyn super::super::MailboxBackend = &mut md;
    let (rc, out) = b.execute(opcode::IDENTIFY, &[], 256);
    assert_eq!((rc, out.len()), (0, IDENTIFY_SIZE));
    assert_eq!(b.execute(opcode::SANITIZE, &[], 256).0, 3);
    assert_eq!(b.event_status(), 0);
}

#[test]
fn shared_memdev_serves_both_sides() {
    let shared = SharedMemdev::new(dev(GIB, 0));
    let irqs = Arc::new(Mutex::new(Vec::new()));
    let sink = irqs.clone();
    shared
        .lock()
        .set_event_interrupt_sink(Some(Box::new(move |i: EventInterrupt| {
            sink.lock().unwrap().push(i.msgnum)
        })));
    let mut backend: Box<dyn super::super::MailboxBackend> = Box::new(shared.clone());
    assert_eq!(
        backend.execute(opcode::SET_EVT_INT_POLICY, &[1; 4], 256).0,
        0
    );
    // Control-API injection from another thread raises the vector without any doorbell.
    let ctl = shared.clone();
    std::thread::spawn(move || {
        ctl.lock()
            .inject_memory_module_event(EventLogKind::Warning, &MemoryModuleEvent::default())
            .unwrap();
    })
    .join()
    .unwrap();
    assert_eq!(*irqs.lock().unwrap(), vec![0]);
    assert_eq!(backend.event_status(), 0b10);
}

#[test]
fn state_report_snapshot() {
    let mut md = dev(GIB, GIB);
    md.inject_poison(0x1000, 0x40).unwrap();
    md.inject_memory_module_event(EventLogKind::Failure, &MemoryModuleEvent::default())
        .unwrap();
    let r = md.state_report();
    assert_eq!((r.id.as_str(), r.serial), ("mem0", 0x1234));
    assert_eq!((r.volatile_bytes, r.persistent_bytes), (GIB, GIB));
    assert_eq!(r.lsa_size, DEFAULT_LSA_SIZE);
    assert_eq!(r.poison.len(), 1);
    assert_eq!(r.events.len(), 4);
    assert_eq!(r.events[2].pending, 1);
    assert_eq!(r.events[2].kind, EventLogKind::Failure);
}

/// xorshift64*: deterministic pseudo-random bytes for the totality tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn random_commands_keep_invariants() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..40 {
        let mut md = if round % 2 == 0 {
            dev(GIB, GIB)
        } else {
            dev(GIB, 0)
        };
        for _ in 0..200 {
            let n = (rng.next() % 600) as usize;
            let buf = rng.bytes(n);
            fuzz_execute(&mut md, &buf);
        }
        // Structured inputs around the valid lengths, with random contents.
        for _ in 0..2000 {
            let op = FUZZ_OPCODES[(rng.next() as usize) % FUZZ_OPCODES.len()];
            let len = match rng.next() % 4 {
                0 => 8,
                1 => 0x10,
                2 => 0x48,
                _ => (rng.next() % 300) as usize,
            };
            let mut input = rng.bytes(len);
            // Bias addresses into the device so the success paths run too.
            if len >= 8 && rng.next().is_multiple_of(2) {
                let dpa = (rng.next() % (2 * GIB)) & !0x3f;
                input[..8].copy_from_slice(&dpa.to_le_bytes());
            }
            let cap = 256usize << (rng.next() % 5);
            let (rc, out) = md.execute(op, &input, cap);
            assert!(out.len() <= cap);
            assert!(rc.is_success() || out.is_empty());
        }
        // The device still answers Linux's probe afterwards.
        cxl_enumerate_cmds(&mut md, 256);
        cxl_dev_state_identify(&mut md, 256);
    }
}
