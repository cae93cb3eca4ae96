//! PVRDMA harness: the command channel and the registers of an emulated PVRDMA function
//! (`devices::pvrdma::PvrdmaFunction`) over 4 MiB of guest memory, after a valid probe (shared
//! region, rings, activation), with DMA untranslated or through a translator that faults on
//! the upper half. Arbitrary commands go through the command slot (any command number, any
//! field values: handles, counts, page directory addresses), interleaved with guest-memory
//! stores (to plant page directories and tables, WQEs and SGEs), register writes, UAR
//! doorbells (a QP send doorbell makes the device parse and execute the send queue's WQEs),
//! port changes, and frames from the wire (well-formed RoCEv2 UD packets, corrupted ones and
//! raw bytes) for the packet parser and the receive path.
//!
//! Input: byte 0 picks the setup (bit 0 the faulting translator). Then operations: kind byte
//! (bits 2:0: 0/1 command, 2 register write, 3 store, 4 doorbell, 5 port change, 6/7 frame),
//! then for a command a command number byte and 40 bytes of fields (the rest of the slot
//! stays 0, the union is 184 bytes); for a frame a length and a corruption word and the body;
//! for the others 12 bytes (offset 4, value 8).
//!
//! Invariants: no panic; a command the device accepted (ERR 0) has a response whose `ack` is
//! the command with bit 31 set; a refused one (ERR ≠ 0) leaves the response slot untouched.

use std::sync::Arc;

use devices::pci::PciDevice;
use devices::pvrdma::abi::{CMD_SIZE, RESP_SIZE, RingPageInfo, SharedRegionHead};
use devices::pvrdma::{PvrdmaFunction, reg};
use iommu::{
    DmaError, DmaRequest, DmaSpace, DmaTranslator, IdentityTranslator, NullMsiSink, RequesterId,
    Translation,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use zerocopy::IntoBytes;

use crate::{MAX_OPS, Reader};

/// Guest memory size.
pub const MEMORY: u64 = 0x40_0000;
const DSR: u64 = 0x1000;
const CMD_SLOT: u64 = 0x2000;
const RESP_SLOT: u64 = 0x3000;
const ASYNC_DIR: u64 = 0x4000;
const CQ_DIR: u64 = 0x5000;
const TABLES: u64 = 0x6000;
const RING_PAGES: u64 = 0x10000;

struct UpperHalfFaults;

impl DmaTranslator for UpperHalfFaults {
    fn translate(&self, request: &DmaRequest) -> Result<Translation, DmaError> {
        if request.address >= MEMORY / 2 {
            return Err(DmaError::TranslationFault {
                requester_id: request.requester_id,
                iova: request.address,
                access: request.access,
                reason: "harness: unmapped".into(),
            });
        }
        IdentityTranslator.translate(request)
    }
}

fn put(mem: &GuestMemoryMmap, at: u64, b: &[u8]) {
    mem.write_slice(b, GuestAddress(at)).expect("harness store");
}

/// Plants what `pvrdma_pci_probe()` leaves: the shared region, slots and two 4-page rings.
pub fn plant_probe(mem: &GuestMemoryMmap) {
    for (i, dir) in [ASYNC_DIR, CQ_DIR].into_iter().enumerate() {
        let table = TABLES + i as u64 * 0x1000;
        put(mem, dir, &table.to_le_bytes());
        for p in 0..4u64 {
            let page = RING_PAGES + (i as u64 * 4 + p) * 0x1000;
            put(mem, table + p * 8, &page.to_le_bytes());
        }
    }
    let head = SharedRegionHead {
        driver_version: 20,
        cmd_slot_dma: CMD_SLOT,
        resp_slot_dma: RESP_SLOT,
        async_ring_pages: RingPageInfo {
            num_pages: 4,
            reserved: 0,
            pdir_dma: ASYNC_DIR,
        },
        cq_ring_pages: RingPageInfo {
            num_pages: 4,
            reserved: 0,
            pdir_dma: CQ_DIR,
        },
        ..Default::default()
    };
    put(mem, DSR, head.as_bytes());
}

fn reg_write(f: &mut PvrdmaFunction, offset: u64, value: u32) {
    f.bar_write(1, offset, &value.to_le_bytes());
}

fn reg_read(f: &mut PvrdmaFunction, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    f.bar_read(1, offset, &mut b);
    u32::from_le_bytes(b)
}

/// Fuzz target `pvrdma`.
pub fn run(data: &[u8]) {
    run_counted(data);
}

/// [`run`], returning how many commands the device accepted (for the smoke tests).
pub fn run_counted(data: &[u8]) -> usize {
    let mut r = Reader::new(data);
    let Some(setup) = r.u8() else {
        return 0;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)])
        .expect("harness memory");
    let translator: Arc<dyn DmaTranslator> = if setup & 1 != 0 {
        Arc::new(UpperHalfFaults)
    } else {
        Arc::new(IdentityTranslator)
    };
    let dma = DmaSpace::with_translator(
        RequesterId::new(0, 8, 1),
        GuestMemoryAtomic::new(mem.clone()),
        translator,
    );
    let mut f = PvrdmaFunction::new([2, 0, 0, 0, 0, 1], dma, Arc::new(NullMsiSink))
        .expect("harness function");
    f.config_write(0x04, &0x0006u16.to_le_bytes());
    plant_probe(&mem);
    reg_write(&mut f, reg::DSRLOW, DSR as u32);
    reg_write(&mut f, reg::DSRHIGH, 0);
    reg_write(&mut f, reg::CTL, 0);
    assert_eq!(
        reg_read(&mut f, reg::ERR),
        0,
        "the planted probe must activate"
    );
    let mut accepted = 0;
    for _ in 0..MAX_OPS {
        let Some(kind) = r.u8() else { break };
        match kind & 7 {
            0 | 1 => {
                let (Some(command), Some(fields)) = (r.u8(), r.bytes(40)) else {
                    break;
                };
                let mut slot = [0u8; CMD_SIZE];
                slot[8..12].copy_from_slice(&u32::from(command % 24).to_le_bytes());
                slot[16..56].copy_from_slice(fields);
                put(&mem, CMD_SLOT, &slot);
                let marker = [0xeeu8; RESP_SIZE];
                put(&mem, RESP_SLOT, &marker);
                reg_write(&mut f, reg::REQUEST, 0);
                let mut resp = [0u8; RESP_SIZE];
                mem.read_slice(&mut resp, GuestAddress(RESP_SLOT))
                    .expect("harness read");
                if reg_read(&mut f, reg::ERR) == 0 {
                    let ack = u32::from_le_bytes(resp[8..12].try_into().expect("4 bytes"));
                    assert_eq!(
                        ack,
                        u32::from(command % 24) | 1 << 31,
                        "ack of an accepted command"
                    );
                    accepted += 1;
                } else {
                    assert_eq!(resp, marker, "a refused command wrote a response");
                }
            }
            2 => {
                let (Some(offset), Some(value)) = (r.u32(), r.u64()) else {
                    break;
                };
                // Not DSRHIGH/CTL reset every time: keep the device mostly running.
                let offset = u64::from(offset % 0x28) & !3;
                if offset != reg::DSRHIGH || value & 1 != 0 {
                    reg_write(&mut f, offset, value as u32);
                }
            }
            3 => {
                let (Some(offset), Some(value)) = (r.u32(), r.u64()) else {
                    break;
                };
                let at = (u64::from(offset) % MEMORY) & !7;
                let _ = mem.write_slice(&value.to_le_bytes(), GuestAddress(at));
            }
            4 => {
                let (Some(offset), Some(value)) = (r.u32(), r.u64()) else {
                    break;
                };
                f.bar_write(
                    2,
                    (u64::from(offset) % (64 * 4096)) & !3,
                    &(value as u32).to_le_bytes(),
                );
            }
            5 => {
                let Some(up) = r.u8() else { break };
                f.set_port_active(up & 1 != 0);
            }
            _ => {
                // A frame from the wire: a RoCEv2 UD packet built from the input (so the
                // headers and ICRC are right and the parser goes deep), then corrupted at one
                // byte; or the raw input bytes.
                let (Some(len), Some(corrupt)) = (r.u16(), r.u16()) else {
                    break;
                };
                let Some(body) = r.bytes(usize::from(len % 96)) else {
                    break;
                };
                let mut frame = if corrupt & 0x8000 != 0 {
                    body.to_vec()
                } else {
                    // IPv4-mapped GIDs, or IPv6 ones when the body's third byte is odd.
                    let v6 = body.get(2).is_some_and(|b| b & 1 != 0);
                    let gid = |last: u8| {
                        let mut g = [0u8; 16];
                        if v6 {
                            g[..2].copy_from_slice(&[0xfe, 0x80]);
                        } else {
                            g[10..12].copy_from_slice(&[0xff, 0xff]);
                            g[12..15].copy_from_slice(&[10, 0, 0]);
                        }
                        g[15] = last;
                        g
                    };
                    let addr = devices::pvrdma::roce::UdAddress {
                        dmac: [2, 0, 0, 0, 0, 1],
                        smac: [2, 0, 0, 0, 0, 2],
                        src_gid: gid(2),
                        dst_gid: gid(1),
                        tclass: 0,
                        hop_limit: 64,
                        flow_label: 0,
                    };
                    let qp = u32::from(body.first().copied().unwrap_or(1) % 4);
                    let qkey = if body.get(1).is_some_and(|b| b & 1 != 0) {
                        0x8001_0000
                    } else {
                        0
                    };
                    devices::pvrdma::roce::build_ud(&addr, qp, 9, qkey, None, 0, body)
                };
                if corrupt & 0x4000 != 0 && !frame.is_empty() {
                    let at = usize::from(corrupt) % frame.len();
                    frame[at] ^= corrupt as u8 | 1;
                }
                let _ = f.receive_packet(&frame);
            }
        }
    }
    accepted
}
