//! A driver-side rig for the PVRDMA function — what `vmw_pvrdma` and the verbs provider do,
//! reduced to what tests and the RoCE engine benchmark need: guest memory, probe and
//! activation, commands, page directories, RC/UD QPs set up to RTS, posting WQEs and reading
//! CQEs, and a wire between two functions. Test support only (feature `harness`, or unit tests):
//! it panics on anything unexpected.

use std::sync::Arc;

use iommu::{DmaSpace, RecordingMsiSink, RequesterId};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use zerocopy::{FromBytes, IntoBytes};

use crate::pci::PciDevice;
use crate::pci::capability::find_capability;
use crate::pci::config::{COMMAND, COMMAND_MASTER, COMMAND_MEMORY};
use crate::pci::msix::CONTROL_ENABLE;
use crate::pvrdma::abi::*;
use crate::pvrdma::*;

pub const MEM: u64 = 0x100_0000;
pub const DSR: u64 = 0x1000;
pub const CMD_SLOT: u64 = 0x2000;
pub const RESP_SLOT: u64 = 0x3000;
/// Page directories live here (one page each), tables after them, pages after that.
pub const DIRS: u64 = 0x10_0000;
pub const TABLES: u64 = 0x20_0000;
pub const PAGES: u64 = 0x40_0000;
pub const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];

pub struct Rig {
    pub f: PvrdmaFunction,
    pub mem: GuestMemoryMmap,
    pub msi: Arc<RecordingMsiSink>,
    next_dir: u64,
    next_page: u64,
}

pub fn rig() -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let dma = DmaSpace::identity(
        RequesterId::new(0, 8, 1),
        GuestMemoryAtomic::new(mem.clone()),
    );
    let msi = Arc::new(RecordingMsiSink::new());
    let f = PvrdmaFunction::new(MAC, dma, msi.clone()).unwrap();
    Rig {
        f,
        mem,
        msi,
        next_dir: 0,
        next_page: 0,
    }
}

impl Rig {
    pub fn w(&mut self, off: u64, v: u32) {
        self.f.bar_write(1, off, &v.to_le_bytes());
    }
    pub fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.f.bar_read(1, off, &mut b);
        u32::from_le_bytes(b)
    }
    pub fn put(&self, at: u64, b: &[u8]) {
        self.mem.write_slice(b, GuestAddress(at)).unwrap();
    }
    pub fn get(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }
    /// A page directory of `n` fresh pages (`pvrdma_page_dir_init`).
    pub fn pdir(&mut self, n: u64) -> u64 {
        let dir = DIRS + self.next_dir * PAGE_SIZE;
        let tables = n.div_ceil(512);
        for t in 0..tables {
            let table = TABLES + (self.next_dir * 4 + t) * PAGE_SIZE;
            self.put(dir + t * 8, &table.to_le_bytes());
            for i in 0..(n - t * 512).min(512) {
                let page = PAGES + self.next_page * PAGE_SIZE;
                self.next_page += 1;
                self.put(table + i * 8, &page.to_le_bytes());
            }
        }
        self.next_dir += 1;
        dir
    }
    /// `pvrdma_pci_probe()` up to CTL_ACTIVATE; returns ERR.
    pub fn probe(&mut self) -> u32 {
        self.f
            .config_write(COMMAND, &(COMMAND_MEMORY | COMMAND_MASTER).to_le_bytes());
        let cap = {
            let c = self.f.config();
            find_capability(&mut |o, d| c.read(o, d), 0x11).unwrap()
        };
        for v in 0..u64::from(NUM_VECTORS) {
            self.f.bar_write(0, 16 * v, &0xfee0_0000u32.to_le_bytes());
            self.f
                .bar_write(0, 16 * v + 8, &(0x50 + v as u32).to_le_bytes());
            self.f.bar_write(0, 16 * v + 12, &0u32.to_le_bytes());
        }
        self.f
            .config_write(u16::from(cap) + 2, &CONTROL_ENABLE.to_le_bytes());
        assert_eq!(self.r(reg::VERSION), VERSION_QPHANDLE);
        let async_dir = self.pdir(4);
        let cq_dir = self.pdir(4);
        let head = SharedRegionHead {
            driver_version: VERSION_QPHANDLE,
            cmd_slot_dma: CMD_SLOT,
            resp_slot_dma: RESP_SLOT,
            async_ring_pages: RingPageInfo {
                num_pages: 4,
                reserved: 0,
                pdir_dma: async_dir,
            },
            cq_ring_pages: RingPageInfo {
                num_pages: 4,
                reserved: 0,
                pdir_dma: cq_dir,
            },
            ..Default::default()
        };
        self.put(DSR, head.as_bytes());
        self.w(reg::DSRLOW, DSR as u32);
        self.w(reg::DSRHIGH, 0);
        self.w(reg::IMR, 0);
        self.w(reg::CTL, 0);
        self.r(reg::ERR)
    }
    /// `pvrdma_cmd_post()`: returns ERR and, when 0, the response.
    pub fn post(&mut self, req: &[u8]) -> (u32, Vec<u8>) {
        let (e, resp, interrupts) = self.post_counting_interrupts(req);
        if e == 0 {
            assert_eq!(interrupts, 1, "response interrupt");
        }
        (e, resp)
    }
    /// `post`, returning ERR, the response and how many MSIs the command raised.
    pub fn post_counting_interrupts(&mut self, req: &[u8]) -> (u32, Vec<u8>, usize) {
        let mut slot = [0u8; CMD_SIZE];
        slot[..req.len()].copy_from_slice(req);
        self.put(CMD_SLOT, &slot);
        self.put(RESP_SLOT, &[0u8; RESP_SIZE]);
        self.msi.take();
        self.w(reg::REQUEST, 0);
        let e = self.r(reg::ERR);
        let interrupts = self.msi.take().len();
        (e, self.get(RESP_SLOT, RESP_SIZE), interrupts)
    }
    pub fn ok(&mut self, req: &[u8]) -> Vec<u8> {
        let (e, resp) = self.post(req);
        assert_eq!(e, 0, "command {:?} refused", &req[8..12]);
        let ack = u32::from_le_bytes(resp[8..12].try_into().unwrap());
        assert_eq!(
            ack,
            u32::from_le_bytes(req[8..12].try_into().unwrap()) | cmd::RESP
        );
        resp
    }
}

pub fn hdr(command: u32) -> Vec<u8> {
    let h = CmdHdr {
        response: 0x1234,
        cmd: command,
        reserved: 0,
    };
    h.as_bytes().to_vec()
}

pub fn word(resp: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(resp[16 + 4 * i..20 + 4 * i].try_into().unwrap())
}

pub fn with(mut v: Vec<u8>, words: &[u32]) -> Vec<u8> {
    for w in words {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

/// Captures what a function puts on the wire.
#[derive(Default)]
pub struct Wire(pub std::sync::Mutex<Vec<Vec<u8>>>);

impl crate::vmxnet3::FrameSink for Wire {
    fn send_frame(&self, frame: &[u8]) {
        self.0.lock().unwrap().push(frame.to_vec());
    }
}

impl Rig {
    /// The (type, info) events on the async ring so far (`probe` made it the first page
    /// directory: ring state, then 8-byte `pvrdma_eqe`s).
    pub fn async_events(&self) -> Vec<(u32, u32)> {
        let state = self.page_of(DIRS, 0) + 8;
        let tail = u32::from_le_bytes(self.get(state, 4).try_into().unwrap()) & 0xff;
        (0..u64::from(tail))
            .map(|i| {
                let e = self.get(self.page_of(DIRS, 1) + 8 * i, 8);
                (
                    u32::from_le_bytes(e[..4].try_into().unwrap()),
                    u32::from_le_bytes(e[4..].try_into().unwrap()),
                )
            })
            .collect()
    }

    /// Page `i` of the page directory at `dir`.
    pub fn page_of(&self, dir: u64, i: u64) -> u64 {
        let table = u64::from_le_bytes(self.get(dir + (i / 512) * 8, 8).try_into().unwrap());
        u64::from_le_bytes(self.get(table + (i % 512) * 8, 8).try_into().unwrap())
    }
    /// Probe, GID 0 = ::ffff:`ip`, a PD, a DMA MR with `access` (its key), a 64-entry CQ, and a
    /// QP of `kind` on it (16 send and receive WQEs of one SGE each, three pages: ring state,
    /// send queue, receive queue). Returns (key, cq handle, cq dir, qp handle, qp dir).
    fn setup_qp(
        &mut self,
        ip: [u8; 4],
        access: u32,
        kind: u8,
        sq_sig_all: u8,
    ) -> (u32, u32, u64, u32, u64) {
        assert_eq!(self.probe(), 0);
        let mut bind = with(hdr(cmd::CREATE_BIND), &[1024, 0, 0]);
        bind.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        bind.extend_from_slice(&ip);
        bind.extend_from_slice(&[1, 0, 0, 0]);
        self.ok(&bind);
        let pd = word(&self.ok(&with(hdr(cmd::CREATE_PD), &[0, 0])), 0);
        let mut mr = hdr(cmd::CREATE_MR);
        mr.extend_from_slice(&[0u8; 24]);
        let key = word(&self.ok(&with(mr, &[pd, access, 1, 0])), 1);
        let cq_dir = self.pdir(2);
        let mut cq = hdr(cmd::CREATE_CQ);
        cq.extend_from_slice(&cq_dir.to_le_bytes());
        let cqh = word(&self.ok(&with(cq, &[0, 64, 2, 0])), 0);
        let qp_dir = self.pdir(3);
        let c = CreateQp {
            hdr: CmdHdr {
                response: 1,
                cmd: cmd::CREATE_QP,
                reserved: 0,
            },
            pdir_dma: qp_dir,
            pd_handle: pd,
            send_cq_handle: cqh,
            recv_cq_handle: cqh,
            srq_handle: 0,
            max_send_wr: 16,
            max_recv_wr: 16,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
            lkey: 0,
            access_flags: 0,
            total_chunks: 3,
            send_chunks: 1,
            max_atomic_arg: 0,
            sq_sig_all,
            qp_type: kind,
            is_srq: 0,
            reserved: [0; 3],
        };
        let qp = word(&self.ok(c.as_bytes()), 1);
        (key, cqh, cq_dir, qp, qp_dir)
    }

    /// A PD, a DMA MR, a CQ, GID 0 = ::ffff:`ip`, and a UD QP in RTS with Q_Key 0x1111.
    /// Returns (lkey, cq handle, cq dir, qp handle, qp dir).
    pub fn ud_qp(&mut self, ip: [u8; 4]) -> (u32, u32, u64, u32, u64) {
        let (lkey, cqh, cq_dir, qp, qp_dir) = self.setup_qp(ip, 1, qp_type::UD, 0);
        for (state, mask) in [
            (
                qp_state::INIT,
                qp_mask::STATE | qp_mask::QKEY | qp_mask::PORT,
            ),
            (qp_state::RTR, qp_mask::STATE),
            (qp_state::RTS, qp_mask::STATE | qp_mask::SQ_PSN),
        ] {
            let m = ModifyQp {
                hdr: CmdHdr {
                    response: 2,
                    cmd: cmd::MODIFY_QP,
                    reserved: 0,
                },
                qp_handle: qp,
                attr_mask: mask,
                attrs: QpAttr {
                    qp_state: state,
                    qkey: 0x1111,
                    port_num: 1,
                    ..Default::default()
                },
            };
            self.ok(m.as_bytes());
        }
        (lkey, cqh, cq_dir, qp, qp_dir)
    }
}

impl Rig {
    /// A PD, a DMA MR with every access (lkey = rkey), a CQ, GID 0 = ::ffff:`ip`, and an RC
    /// QP connected to `peer_qpn` at `peer_ip`/`peer_mac` in RTS (path MTU 1024).
    /// Returns (key, cq dir, qp handle, qp dir).
    pub fn rc_qp(
        &mut self,
        ip: [u8; 4],
        peer_ip: [u8; 4],
        peer_mac: [u8; 6],
        peer_qpn: u32,
    ) -> (u32, u64, u32, u64) {
        let (key, _, cq_dir, qp, qp_dir) = self.setup_qp(ip, 7, qp_type::RC, 1);
        self.connect_rc(qp, peer_ip, peer_mac, peer_qpn);
        (key, cq_dir, qp, qp_dir)
    }

    /// Moves RC QP `qp` through INIT, RTR and RTS towards `peer_qpn` at `peer_ip`/`peer_mac`
    /// (path MTU 1024, PSNs 100, every access).
    pub fn connect_rc(&mut self, qp: u32, peer_ip: [u8; 4], peer_mac: [u8; 6], peer_qpn: u32) {
        let mut dgid = [0u8; 16];
        dgid[10..12].copy_from_slice(&[0xff, 0xff]);
        dgid[12..].copy_from_slice(&peer_ip);
        for (state, mask) in [
            (
                qp_state::INIT,
                qp_mask::STATE | qp_mask::PORT | qp_mask::ACCESS_FLAGS,
            ),
            (
                qp_state::RTR,
                qp_mask::STATE
                    | qp_mask::AV
                    | qp_mask::PATH_MTU
                    | qp_mask::DEST_QPN
                    | qp_mask::RQ_PSN,
            ),
            (
                qp_state::RTS,
                qp_mask::STATE
                    | qp_mask::SQ_PSN
                    | qp_mask::TIMEOUT
                    | qp_mask::RETRY_CNT
                    | qp_mask::RNR_RETRY,
            ),
        ] {
            let m = ModifyQp {
                hdr: CmdHdr {
                    response: 2,
                    cmd: cmd::MODIFY_QP,
                    reserved: 0,
                },
                qp_handle: qp,
                attr_mask: mask,
                attrs: QpAttr {
                    qp_state: state,
                    path_mtu: 3,
                    dest_qp_num: peer_qpn,
                    rq_psn: 100,
                    sq_psn: 100,
                    port_num: 1,
                    timeout: 14,
                    retry_cnt: 7,
                    rnr_retry: 7,
                    qp_access_flags: 7,
                    ah_attr: AhAttr {
                        dgid,
                        sgid_index: 0,
                        dmac: peer_mac,
                        hop_limit: 64,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            };
            self.ok(m.as_bytes());
        }
    }

    /// Posts one send WQE at `slot` of a fresh (first-lap) 16-entry send queue and rings.
    pub fn post_send(
        &mut self,
        qp_dir: u64,
        qp: u32,
        slot: u32,
        wqe: crate::pvrdma::datapath::SqWqeHdr,
        sge: crate::pvrdma::datapath::Sge,
    ) {
        self.post_sends(qp_dir, qp, slot, &[(wqe, sge)]);
    }

    /// Posts `wqes` at running index `first` (wrapping as `pvrdma_idx_ring_inc` does) of a
    /// 16-entry send queue, then rings the send doorbell once.
    pub fn post_sends(
        &mut self,
        qp_dir: u64,
        qp: u32,
        first: u32,
        wqes: &[(
            crate::pvrdma::datapath::SqWqeHdr,
            crate::pvrdma::datapath::Sge,
        )],
    ) {
        use crate::pvrdma::datapath::*;
        const SQ_ENTRIES: u32 = 16;
        let mut index = first;
        for (wqe, sge) in wqes {
            let slot = index & (SQ_ENTRIES - 1);
            let at = self.page_of(qp_dir, 1) + u64::from(slot) * 128;
            self.put(at, wqe.as_bytes());
            self.put(at + SQ_WQE_HDR, sge.as_bytes());
            index = ring_next(index, SQ_ENTRIES);
        }
        let state = self.page_of(qp_dir, 0);
        self.put(state, &index.to_le_bytes());
        self.f
            .bar_write(2, uar::QP_OFFSET, &(uar::QP_SEND | qp).to_le_bytes());
    }

    /// Consumes every completion on the CQ at `cq_dir` (its head catches up with its tail);
    /// returns how many there were.
    pub fn consume_cq(&mut self, cq_dir: u64, entries: u32) -> u32 {
        let state = self.page_of(cq_dir, 0) + 8;
        let tail = u32::from_le_bytes(self.get(state, 4).try_into().unwrap());
        let head = u32::from_le_bytes(self.get(state + 4, 4).try_into().unwrap());
        self.put(state + 4, &tail.to_le_bytes());
        tail.wrapping_sub(head) & ((entries << 1) - 1)
    }

    /// Posts one receive WQE at `slot` of a fresh (first-lap) 16-entry receive queue.
    pub fn post_recv(
        &mut self,
        qp_dir: u64,
        slot: u32,
        wr_id: u64,
        sge: crate::pvrdma::datapath::Sge,
    ) {
        self.post_recv_at(qp_dir, slot, wr_id, sge);
    }

    /// Posts a receive WQE at running index `index` of a 16-entry receive queue.
    pub fn post_recv_at(
        &mut self,
        qp_dir: u64,
        index: u32,
        wr_id: u64,
        sge: crate::pvrdma::datapath::Sge,
    ) {
        use crate::pvrdma::datapath::*;
        const RQ_ENTRIES: u32 = 16;
        let at = self.page_of(qp_dir, 2) + u64::from(index & (RQ_ENTRIES - 1)) * 32;
        self.put(
            at,
            RqWqeHdr {
                wr_id,
                num_sge: 1,
                total_len: 0,
            }
            .as_bytes(),
        );
        self.put(at + 16, sge.as_bytes());
        let state = self.page_of(qp_dir, 0);
        self.put(state + 8, &ring_next(index, RQ_ENTRIES).to_le_bytes());
    }

    pub fn cqe(&self, cq_dir: u64, n: u64) -> crate::pvrdma::datapath::Cqe {
        crate::pvrdma::datapath::Cqe::read_from_bytes(
            &self.get(self.page_of(cq_dir, 1) + 64 * n, 64),
        )
        .unwrap()
    }
}

/// Delivers frames both ways until the wire is quiet; `drop` decides which frames A→B are lost.
pub fn pump(a: &mut Rig, wa: &Wire, b: &mut Rig, wb: &Wire, drop: &mut dyn FnMut(usize) -> bool) {
    let mut n = 0;
    for _ in 0..100 {
        let fa: Vec<Vec<u8>> = wa.0.lock().unwrap().drain(..).collect();
        let fb: Vec<Vec<u8>> = wb.0.lock().unwrap().drain(..).collect();
        if fa.is_empty() && fb.is_empty() {
            return;
        }
        for f in fa {
            n += 1;
            if !drop(n) {
                assert!(b.f.receive_packet(&f));
            }
        }
        for f in fb {
            assert!(a.f.receive_packet(&f));
        }
    }
    panic!("the wire never went quiet");
}
