//! Host-native throughput of the software RoCEv2 engine (issue 10 acceptance 6) —
//! `cargo bench -p devices --features harness --bench roce_engine`.
//!
//! Two PVRDMA functions, each driven by the driver-side rig (`devices::pvrdma::harness`), with an
//! RC QP pair connected at path MTU 1024 over an in-memory wire. One iteration posts a batch of
//! work requests through the send doorbell and moves frames both ways until the wire is quiet:
//! everything the engine does per message — WQE and SGE parsing, MR translation, gathering,
//! segmentation, BTH/RETH/AETH building and ICRC (crc32fast) on the way out, ICRC and PSN checks,
//! rkey/range checks and placement into guest memory on the way in, ACK coalescing, completions
//! into the CQ ring — on one core, without sockets. Criterion reports messages/s (64 B) and
//! bytes/s (64 KiB) per case.

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use devices::pvrdma::datapath::{Sge, SqWqeHdr, wr};
use devices::pvrdma::harness::{Rig, Wire, pump, rig};

/// Source buffers in A, destination buffers in B (inside the rigs' 16 MiB of memory).
const SRC: u64 = 0x60_0000;
const DST: u64 = 0x80_0000;
/// Work requests per doorbell (half the 16-entry send queue).
const BATCH: u32 = 8;
/// The rigs' CQs have 64 entries.
const CQ_ENTRIES: u32 = 64;

struct Pair {
    a: Rig,
    b: Rig,
    wa: Arc<Wire>,
    wb: Arc<Wire>,
    key_a: u32,
    key_b: u32,
    cq_a: u64,
    cq_b: u64,
    qp_a: u32,
    dir_a: u64,
    dir_b: u64,
    sq_index: u32,
    rq_index: u32,
}

fn pair() -> Pair {
    let (mut a, mut b) = (rig(), rig());
    let (wa, wb) = (Arc::new(Wire::default()), Arc::new(Wire::default()));
    a.f.set_wire(wa.clone());
    b.f.set_wire(wb.clone());
    let mac = [2, 0, 0, 0, 0, 0xa];
    let (key_a, cq_a, qp_a, dir_a) = a.rc_qp([10, 77, 0, 1], [10, 77, 0, 2], mac, 2);
    let (key_b, cq_b, _qp_b, dir_b) = b.rc_qp([10, 77, 0, 2], [10, 77, 0, 1], mac, qp_a);
    let data: Vec<u8> = (0..(BATCH as usize * 65536))
        .map(|i| (i * 7) as u8)
        .collect();
    a.put(SRC, &data);
    Pair {
        a,
        b,
        wa,
        wb,
        key_a,
        key_b,
        cq_a,
        cq_b,
        qp_a,
        dir_a,
        dir_b,
        sq_index: 0,
        rq_index: 0,
    }
}

impl Pair {
    /// One batch of `opcode` work requests of `len` bytes each, carried to completion.
    fn batch(&mut self, opcode: u32, len: u32) {
        let mut wqes = Vec::with_capacity(BATCH as usize);
        for i in 0..BATCH {
            let offset = u64::from(i) * u64::from(len);
            let mut wqe = SqWqeHdr {
                wr_id: u64::from(i),
                num_sge: 1,
                opcode,
                send_flags: 1 << 1, // signaled
                ..Default::default()
            };
            let mut sge = Sge {
                addr: SRC + offset,
                length: len,
                lkey: self.key_a,
            };
            match opcode {
                wr::SEND => {
                    self.b.post_recv_at(
                        self.dir_b,
                        self.rq_index,
                        u64::from(i),
                        Sge {
                            addr: DST + offset,
                            length: len,
                            lkey: self.key_b,
                        },
                    );
                    self.rq_index = (self.rq_index + 1) & 31;
                }
                wr::RDMA_WRITE | wr::RDMA_READ => {
                    // remote_addr (low, high) and rkey share the UD address fields.
                    wqe.remote_qpn = (DST + offset) as u32;
                    wqe.remote_qkey = ((DST + offset) >> 32) as u32;
                    wqe.av_port_pd = self.key_b;
                    if opcode == wr::RDMA_READ {
                        // Read B's memory into A's destination area.
                        sge.addr = DST + offset;
                    }
                }
                _ => unreachable!(),
            }
            wqes.push((wqe, sge));
        }
        self.a
            .post_sends(self.dir_a, self.qp_a, self.sq_index, &wqes);
        self.sq_index = (self.sq_index + BATCH) & 31;
        pump(&mut self.a, &self.wa, &mut self.b, &self.wb, &mut |_| false);
        let done = self.a.consume_cq(self.cq_a, CQ_ENTRIES);
        assert_eq!(done, BATCH, "every work request completed");
        self.b.consume_cq(self.cq_b, CQ_ENTRIES);
    }
}

fn roce_engine(c: &mut Criterion) {
    let mut group = c.benchmark_group("roce_rc");
    for (name, opcode) in [
        ("write", wr::RDMA_WRITE),
        ("send", wr::SEND),
        ("read", wr::RDMA_READ),
    ] {
        for len in [64u32, 65536] {
            let mut p = pair();
            if len == 64 {
                group.throughput(Throughput::Elements(u64::from(BATCH)));
            } else {
                group.throughput(Throughput::Bytes(u64::from(BATCH) * u64::from(len)));
            }
            group.bench_function(format!("{name}_{len}B_x{BATCH}"), |bench| {
                bench.iter(|| p.batch(opcode, len));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, roce_engine);
criterion_main!(benches);
