//! The PVRDMA data path: work queue entries, memory translation through MRs, completions and
//! CQ notifications (`vmw_pvrdma-abi.h`: `pvrdma_sq_wqe_hdr`, `pvrdma_rq_wqe_hdr`,
//! `pvrdma_sge`, `pvrdma_cqe`), and the UD/GSI transport over [`super::roce`].
//!
//! Queue geometry (`pvrdma_set_sq_size()` and the provider's `pvrdma_create_qp()`): page 0 of
//! a QP's page directory holds the ring indices (send at +0, receive at +8), the send queue's
//! WQEs start at page 1 (stride = the next power of two of 80 + 16 × max_send_sge), the
//! receive queue's after the send pages (stride 16 + 16 × max_recv_sge, rounded up). A CQ's
//! page 0 holds its ring state (the device produces into the `rx` half at +8), its 64-byte
//! CQEs start at page 1. Every index, count and address is checked; a bad WQE completes with
//! an error status and moves the QP to the error state.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::abi::{PAGE_SIZE, RingIndices, qp_state, qp_type, ring_free_slot, ring_next};
use super::roce::{self, UdAddress};
use super::{MrKind, PvrdmaFunction, QueuePair, read_struct};

/// Size of the send WQE header.
pub const SQ_WQE_HDR: u64 = 80;
/// Size of the receive WQE header.
pub const RQ_WQE_HDR: u64 = 16;
/// Size of an SGE.
pub const SGE_SIZE: u64 = 16;
/// Size of a CQE.
pub const CQE_SIZE: u64 = 64;
/// Largest UD message (the port's largest MTU).
pub const MAX_UD_MESSAGE: usize = 4096;
/// The GRH area at the start of every UD receive buffer.
pub const GRH_SIZE: usize = 40;
/// QP1's Q_Key.
pub const GSI_QKEY: u32 = 0x8001_0000;

/// `struct pvrdma_sge`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Sge {
    /// Address (an IOVA for kernel MRs, a user virtual address for user MRs).
    pub addr: u64,
    /// Length.
    pub length: u32,
    /// Local key.
    pub lkey: u32,
}

/// `struct pvrdma_sq_wqe_hdr` with the UD variant of its `wr` union.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SqWqeHdr {
    /// Work request ID.
    pub wr_id: u64,
    /// SGEs that follow.
    pub num_sge: u32,
    /// Reserved.
    pub total_len: u32,
    /// `PVRDMA_WR_*`.
    pub opcode: u32,
    /// `PVRDMA_SEND_*`.
    pub send_flags: u32,
    /// Immediate data (big endian) or the rkey to invalidate.
    pub imm: u32,
    /// Reserved.
    pub reserved: u32,
    /// UD: remote QPN.
    pub remote_qpn: u32,
    /// UD: remote Q_Key (bit 31 set: use the QP's).
    pub remote_qkey: u32,
    /// UD address vector: port/PD.
    pub av_port_pd: u32,
    /// UD address vector: SL, traffic class, flow label.
    pub av_sl_tclass_flowlabel: u32,
    /// UD address vector: destination GID.
    pub av_dgid: [u8; 16],
    /// UD address vector: source path bits.
    pub av_src_path_bits: u8,
    /// UD address vector: source GID index.
    pub av_gid_index: u8,
    /// UD address vector: static rate.
    pub av_stat_rate: u8,
    /// UD address vector: hop limit.
    pub av_hop_limit: u8,
    /// UD address vector: destination MAC.
    pub av_dmac: [u8; 6],
    /// UD address vector: reserved.
    pub av_reserved: [u8; 6],
}
const _: () = assert!(size_of::<SqWqeHdr>() == SQ_WQE_HDR as usize);

/// `struct pvrdma_rq_wqe_hdr`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RqWqeHdr {
    /// Work request ID.
    pub wr_id: u64,
    /// SGEs that follow.
    pub num_sge: u32,
    /// Reserved.
    pub total_len: u32,
}

/// `struct pvrdma_cqe`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Cqe {
    /// Work request ID.
    pub wr_id: u64,
    /// QP handle (low 16 bits are what drivers match).
    pub qp: u64,
    /// `PVRDMA_WC_*` opcode.
    pub opcode: u32,
    /// `PVRDMA_WC_*` status.
    pub status: u32,
    /// Bytes received.
    pub byte_len: u32,
    /// Immediate data (big endian).
    pub imm_data: u32,
    /// Source QP (UD).
    pub src_qp: u32,
    /// `PVRDMA_WC_*` flags.
    pub wc_flags: u32,
    /// Vendor error.
    pub vendor_err: u32,
    /// P_Key index.
    pub pkey_index: u16,
    /// Source LID.
    pub slid: u16,
    /// Service level.
    pub sl: u8,
    /// DLID path bits.
    pub dlid_path_bits: u8,
    /// Port.
    pub port_num: u8,
    /// Source MAC.
    pub smac: [u8; 6],
    /// `PVRDMA_NETWORK_*`.
    pub network_hdr_type: u8,
    /// Padding.
    pub reserved2: [u8; 6],
}
const _: () = assert!(size_of::<Cqe>() == CQE_SIZE as usize);

/// Work request opcodes (`PVRDMA_WR_*`).
pub mod wr {
    /// RDMA write.
    pub const RDMA_WRITE: u32 = 0;
    /// RDMA write with immediate.
    pub const RDMA_WRITE_WITH_IMM: u32 = 1;
    /// Send.
    pub const SEND: u32 = 2;
    /// Send with immediate.
    pub const SEND_WITH_IMM: u32 = 3;
    /// RDMA read.
    pub const RDMA_READ: u32 = 4;
}

/// Completion statuses (`PVRDMA_WC_*`).
pub mod wc_status {
    /// Success.
    pub const SUCCESS: u32 = 0;
    /// Local length error.
    pub const LOC_LEN_ERR: u32 = 1;
    /// Local QP operation error.
    pub const LOC_QP_OP_ERR: u32 = 2;
    /// Local protection error (bad lkey or range).
    pub const LOC_PROT_ERR: u32 = 4;
    /// Flushed.
    pub const WR_FLUSH_ERR: u32 = 5;
}

/// Completion opcodes and flags.
pub mod wc {
    /// Send completed.
    pub const SEND: u32 = 0;
    /// Receive completed.
    pub const RECV: u32 = 1 << 7;
    /// GRH present.
    pub const FLAG_GRH: u32 = 1 << 0;
    /// Immediate data present.
    pub const FLAG_WITH_IMM: u32 = 1 << 1;
    /// Source MAC present.
    pub const FLAG_WITH_SMAC: u32 = 1 << 4;
    /// Network header type present.
    pub const FLAG_WITH_NETWORK_HDR_TYPE: u32 = 1 << 6;
    /// RoCEv2 over IPv4: `PVRDMA_NETWORK_IPV4` (`PVRDMA_NETWORK_IB` = `_ROCE_V1` = 0, IPv4 1,
    /// IPv6 2), which `pvrdma_network_type_to_ib` turns into `RDMA_NETWORK_IPV4`: the CM then
    /// finds the sender's IPv4 header in the last 20 bytes of the GRH area
    /// (`ib_get_gids_from_rdma_hdr`).
    pub const NETWORK_IPV4: u8 = 1;
    /// RoCEv2 over IPv6 (`PVRDMA_NETWORK_IPV6`): the GRH area is the IPv6 header.
    pub const NETWORK_IPV6: u8 = 2;
}

const SEND_SIGNALED: u32 = 1 << 1;
const ACCESS_LOCAL_WRITE: u32 = 1 << 0;

pub use super::roce::ipv4_of_gid;

impl QueuePair {
    fn sq_stride(&self) -> u64 {
        (SQ_WQE_HDR + SGE_SIZE * u64::from(self.attr.cap.max_send_sge)).next_power_of_two()
    }

    fn rq_stride(&self) -> u64 {
        (RQ_WQE_HDR + SGE_SIZE * u64::from(self.attr.cap.max_recv_sge)).next_power_of_two()
    }

    /// Address of byte `offset` of the queue that starts at page `first_page`.
    fn queue_addr(&self, first_page: u64, offset: u64) -> Option<u64> {
        let page = self
            .pages
            .pages
            .get(usize::try_from(first_page + offset / PAGE_SIZE).ok()?)?;
        Some(page + offset % PAGE_SIZE)
    }

    fn sq_wqe(&self, slot: u32) -> Option<u64> {
        self.queue_addr(1, u64::from(slot) * self.sq_stride())
    }

    fn rq_wqe(&self, slot: u32) -> Option<u64> {
        self.queue_addr(
            1 + u64::from(self.send_pages),
            u64::from(slot) * self.rq_stride(),
        )
    }
}

impl PvrdmaFunction {
    /// The guest memory pieces `[addr, addr + len)` of MR `lkey` covers.
    fn translate(
        &self,
        lkey: u32,
        addr: u64,
        len: u64,
        write: bool,
    ) -> Result<Vec<(u64, usize)>, u32> {
        let mr = self
            .mrs
            .values()
            .find(|m| m.lkey == lkey)
            .ok_or(wc_status::LOC_PROT_ERR)?;
        if write && mr.access & ACCESS_LOCAL_WRITE == 0 {
            return Err(wc_status::LOC_PROT_ERR);
        }
        match &mr.kind {
            MrKind::Dma => Ok(vec![(addr, len as usize)]),
            MrKind::FastReg(_) => Err(wc_status::LOC_PROT_ERR),
            MrKind::Pages(list) => {
                let end = addr.checked_add(len).ok_or(wc_status::LOC_PROT_ERR)?;
                if addr < mr.start || end > mr.start + mr.length {
                    return Err(wc_status::LOC_PROT_ERR);
                }
                let mut out = Vec::new();
                let mut offset = addr - mr.start + mr.start % PAGE_SIZE;
                let mut left = len;
                while left > 0 {
                    let page = *list
                        .pages
                        .get((offset / PAGE_SIZE) as usize)
                        .ok_or(wc_status::LOC_PROT_ERR)?;
                    let n = (PAGE_SIZE - offset % PAGE_SIZE).min(left);
                    out.push((page + offset % PAGE_SIZE, n as usize));
                    offset += n;
                    left -= n;
                }
                Ok(out)
            }
        }
    }

    /// Local read translation (for the RC requester).
    pub(super) fn translate_pub(
        &self,
        lkey: u32,
        addr: u64,
        len: u64,
    ) -> Result<Vec<(u64, usize)>, u32> {
        self.translate(lkey, addr, len, false)
    }

    /// Local write translation (READ responses, received SENDs).
    pub(super) fn translate_write_pub(
        &self,
        lkey: u32,
        addr: u64,
        len: u64,
    ) -> Result<Vec<(u64, usize)>, u32> {
        self.translate(lkey, addr, len, true)
    }

    pub(super) fn read_sges_pub(&self, at: u64, count: u32) -> Result<Vec<Sge>, u32> {
        self.read_sges(at, count)
    }

    pub(super) fn gather_pub(&self, sges: &[Sge], limit: usize) -> Result<Vec<u8>, u32> {
        self.gather(sges, limit)
    }

    fn read_sges(&self, at: u64, count: u32) -> Result<Vec<Sge>, u32> {
        (0..u64::from(count))
            .map(|i| {
                read_struct::<Sge>(&self.dma, at + i * SGE_SIZE)
                    .map_err(|_| wc_status::LOC_PROT_ERR)
            })
            .collect()
    }

    /// Gathers the bytes of `sges`, at most `limit`.
    fn gather(&self, sges: &[Sge], limit: usize) -> Result<Vec<u8>, u32> {
        let mut data = Vec::new();
        for sge in sges {
            if data.len() + sge.length as usize > limit {
                return Err(wc_status::LOC_LEN_ERR);
            }
            for (iova, n) in self.translate(sge.lkey, sge.addr, u64::from(sge.length), false)? {
                let start = data.len();
                data.resize(start + n, 0);
                self.dma
                    .read(iova, &mut data[start..])
                    .map_err(|_| wc_status::LOC_PROT_ERR)?;
            }
        }
        Ok(data)
    }

    /// Scatters `data` over `sges`; `Err(LOC_LEN_ERR)` when it does not fit.
    fn scatter(&self, sges: &[Sge], data: &[u8]) -> Result<(), u32> {
        let capacity: u64 = sges.iter().map(|s| u64::from(s.length)).sum();
        if (data.len() as u64) > capacity {
            return Err(wc_status::LOC_LEN_ERR);
        }
        let mut done = 0usize;
        for sge in sges {
            if done == data.len() {
                break;
            }
            let n = (sge.length as usize).min(data.len() - done);
            for (iova, len) in self.translate(sge.lkey, sge.addr, n as u64, true)? {
                self.dma
                    .write(iova, &data[done..done + len])
                    .map_err(|_| wc_status::LOC_PROT_ERR)?;
                done += len;
            }
        }
        Ok(())
    }

    /// Writes `cqe` to CQ `handle`'s ring and, if the CQ is armed, notifies.
    pub(super) fn post_cqe(&mut self, handle: u32, cqe: &Cqe) {
        let Some(cq) = self.cqs.get(&handle) else {
            return;
        };
        let (Some(&state), entries) = (cq.pages.pages.first(), cq.entries) else {
            return;
        };
        let Ok(ring) = read_struct::<RingIndices>(&self.dma, state + 8) else {
            return;
        };
        let Some(slot) = ring_free_slot(&ring, entries) else {
            log::debug!("pvrdma: CQ {handle} overflow, completion dropped");
            return;
        };
        let offset = u64::from(slot) * CQE_SIZE;
        let Some(&page) = cq.pages.pages.get(1 + (offset / PAGE_SIZE) as usize) else {
            return;
        };
        if self
            .dma
            .write(page + offset % PAGE_SIZE, cqe.as_bytes())
            .is_err()
        {
            return;
        }
        let tail = ring_next(ring.prod_tail, entries);
        if self.dma.write(state + 8, &tail.to_le_bytes()).is_err() {
            return;
        }
        self.counters.completions += 1;
        if cqe.status != wc_status::SUCCESS {
            self.counters.error_completions += 1;
        }
        let armed = self.cqs.get_mut(&handle).and_then(|c| c.armed.take());
        if armed.is_some() {
            self.notify_cq(handle);
        }
    }

    /// A CQ notification: the CQ handle into the notification ring, then the CQ vector.
    fn notify_cq(&mut self, handle: u32) {
        if self.cq_ring_pages.pages.len() < 2 {
            return;
        }
        let slots = ((self.cq_ring_pages.pages.len() as u64 - 1) * PAGE_SIZE / 4) as u32;
        let state = self.cq_ring_pages.pages[0] + 8;
        let Ok(ring) = read_struct::<RingIndices>(&self.dma, state) else {
            return;
        };
        let Some(slot) = ring_free_slot(&ring, slots) else {
            return;
        };
        let offset = PAGE_SIZE + u64::from(slot) * 4;
        let page = self.cq_ring_pages.pages[(offset / PAGE_SIZE) as usize];
        if self
            .dma
            .write(page + offset % PAGE_SIZE, &handle.to_le_bytes())
            .is_ok()
            && self
                .dma
                .write(state, &ring_next(ring.prod_tail, slots).to_le_bytes())
                .is_ok()
        {
            self.raise(2);
        }
    }

    /// The send doorbell of QP `handle`: executes every posted send work request.
    pub(super) fn process_send_queue(&mut self, handle: u32) {
        let Some(qp) = self.qps.get(&handle) else {
            return;
        };
        let count = qp.attr.cap.max_send_wr;
        let Some(&state) = qp.pages.pages.first() else {
            return;
        };
        for _ in 0..count {
            let Some(qp) = self.qps.get(&handle) else {
                return;
            };
            let Ok(ring) = read_struct::<RingIndices>(&self.dma, state) else {
                return;
            };
            if !super::abi::ring_index_valid(ring.prod_tail, count)
                || !super::abi::ring_index_valid(ring.cons_head, count)
                || ring.prod_tail == ring.cons_head
            {
                return;
            }
            let slot = ring.cons_head & (count - 1);
            let (qp_snapshot, send_cq) = (qp.snapshot(), qp.send_cq);
            let (wr_id, signaled, status) = match qp_snapshot.sq_wqe(slot) {
                None => (0, true, Some(wc_status::LOC_QP_OP_ERR)),
                Some(at) => match read_struct::<SqWqeHdr>(&self.dma, at) {
                    Err(_) => (0, true, Some(wc_status::LOC_PROT_ERR)),
                    Ok(hdr) if qp_snapshot.kind == qp_type::RC => {
                        // RC completes when acknowledged (rc.rs); only failures now.
                        (hdr.wr_id, true, self.rc_post(handle, at, &hdr).err())
                    }
                    Ok(hdr) => {
                        let signaled =
                            qp_snapshot.sq_sig_all || hdr.send_flags & SEND_SIGNALED != 0;
                        let status = self.execute_send(&qp_snapshot, at, &hdr);
                        (hdr.wr_id, signaled, Some(status))
                    }
                },
            };
            let Some(status) = status else {
                let head = ring_next(ring.cons_head, count);
                if self.dma.write(state + 4, &head.to_le_bytes()).is_err() {
                    return;
                }
                continue;
            };
            let failed = status != wc_status::SUCCESS;
            if signaled || failed {
                let cqe = Cqe {
                    wr_id,
                    qp: u64::from(handle),
                    opcode: wc::SEND,
                    status,
                    port_num: 1,
                    ..Default::default()
                };
                self.post_cqe(send_cq, &cqe);
            }
            let head = ring_next(ring.cons_head, count);
            if self.dma.write(state + 4, &head.to_le_bytes()).is_err() {
                return;
            }
            if failed {
                self.enter_error(handle);
                return;
            }
        }
    }

    /// The QP enters the Error state (IBA 10.3.1): every outstanding work request completes
    /// with a flush error, signalled or not — RC sends waiting for their ACK, send WQEs posted
    /// and not yet executed, then the posted receive WQEs — so a consumer blocked on its
    /// completion channel wakes (rping's CQ thread after `rdma_disconnect` moves the QP to
    /// error, `pthread_join`ed before rping exits). Ring indices the guest corrupted end the
    /// flush of that ring.
    pub(super) fn enter_error(&mut self, handle: u32) {
        let pending = match self.qps.get_mut(&handle) {
            Some(q) => {
                q.attr.qp_state = qp_state::ERR;
                q.attr.cur_qp_state = qp_state::ERR;
                q.rc.take_pending()
            }
            None => return,
        };
        for p in &pending {
            self.complete_send(handle, p, wc_status::WR_FLUSH_ERR);
        }
        self.flush_ring(handle, false);
        self.flush_ring(handle, true);
    }

    /// Completes every WQE between the consumer and producer index of the QP's send
    /// (`receive` false) or receive ring with a flush error, advancing the consumer index.
    pub(super) fn flush_ring(&mut self, handle: u32, receive: bool) {
        let Some(qp) = self.qps.get(&handle).map(QueuePair::snapshot) else {
            return;
        };
        let Some(&state_page) = qp.pages.pages.first() else {
            return;
        };
        let (state, count, cq) = if receive {
            (state_page + 8, qp.attr.cap.max_recv_wr, qp.recv_cq)
        } else {
            (state_page, qp.attr.cap.max_send_wr, qp.send_cq)
        };
        for _ in 0..count {
            let Ok(ring) = read_struct::<RingIndices>(&self.dma, state) else {
                return;
            };
            if !super::abi::ring_index_valid(ring.prod_tail, count)
                || !super::abi::ring_index_valid(ring.cons_head, count)
                || ring.prod_tail == ring.cons_head
            {
                return;
            }
            let slot = ring.cons_head & (count - 1);
            let wr_id = if receive {
                qp.rq_wqe(slot)
                    .and_then(|at| read_struct::<RqWqeHdr>(&self.dma, at).ok())
                    .map(|h| h.wr_id)
            } else {
                qp.sq_wqe(slot)
                    .and_then(|at| read_struct::<SqWqeHdr>(&self.dma, at).ok())
                    .map(|h| h.wr_id)
            };
            let cqe = Cqe {
                wr_id: wr_id.unwrap_or(0),
                qp: u64::from(handle),
                opcode: if receive { wc::RECV } else { wc::SEND },
                status: wc_status::WR_FLUSH_ERR,
                port_num: 1,
                ..Default::default()
            };
            self.post_cqe(cq, &cqe);
            let head = ring_next(ring.cons_head, count);
            if self.dma.write(state + 4, &head.to_le_bytes()).is_err() {
                return;
            }
        }
    }

    /// Takes the next receive WQE for QP `handle` — from its shared receive queue when it
    /// has one, else from its own receive queue — advancing that ring's consumer index: its
    /// wr_id and its SGEs (or the error status its SGE count earns). `None`: nothing posted,
    /// or ring indices the guest corrupted. Reaching an armed SRQ limit posts
    /// SRQ_LIMIT_REACHED once (IBA 10.2.9.3; `pvrdma_srq_event`).
    pub(super) fn take_receive_wqe(&mut self, handle: u32) -> Option<(u64, Result<Vec<Sge>, u32>)> {
        let qp = self.qps.get(&handle).map(QueuePair::snapshot)?;
        let (state, count, max_sge, srq) = match qp.srq {
            Some(n) => {
                let srq = self.srqs.get(&n)?;
                (
                    *srq.pages.pages.first()? + 8,
                    srq.attr.max_wr,
                    srq.attr.max_sge,
                    Some((n, srq.clone())),
                )
            }
            None => (
                *qp.pages.pages.first()? + 8,
                qp.attr.cap.max_recv_wr,
                qp.attr.cap.max_recv_sge,
                None,
            ),
        };
        let ring = read_struct::<RingIndices>(&self.dma, state).ok()?;
        if !super::abi::ring_index_valid(ring.prod_tail, count)
            || !super::abi::ring_index_valid(ring.cons_head, count)
            || ring.prod_tail == ring.cons_head
        {
            return None;
        }
        let slot = ring.cons_head & (count - 1);
        let at = match &srq {
            Some((_, s)) => s.wqe(slot)?,
            None => qp.rq_wqe(slot)?,
        };
        let hdr = read_struct::<RqWqeHdr>(&self.dma, at).ok()?;
        let head = ring_next(ring.cons_head, count);
        let _ = self.dma.write(state + 4, &head.to_le_bytes());
        let sges = if hdr.num_sge > max_sge {
            Err(wc_status::LOC_LEN_ERR)
        } else {
            self.read_sges(at + RQ_WQE_HDR, hdr.num_sge)
        };
        if let Some((n, s)) = srq {
            let left = ring.prod_tail.wrapping_sub(head) & ((count << 1) - 1);
            if s.attr.srq_limit != 0 && left < s.attr.srq_limit {
                if let Some(q) = self.srqs.get_mut(&n) {
                    q.attr.srq_limit = 0;
                }
                self.post_event(super::abi::event::SRQ_LIMIT_REACHED, n);
            }
        }
        Some((hdr.wr_id, sges))
    }

    /// One send work request; the completion status.
    fn execute_send(&mut self, qp: &QueuePair, at: u64, hdr: &SqWqeHdr) -> u32 {
        if qp.attr.qp_state != qp_state::RTS {
            return wc_status::WR_FLUSH_ERR;
        }
        if hdr.num_sge > qp.attr.cap.max_send_sge {
            return wc_status::LOC_LEN_ERR;
        }
        if !matches!(qp.kind, qp_type::UD | qp_type::GSI) {
            return wc_status::LOC_QP_OP_ERR;
        }
        let imm = match hdr.opcode {
            wr::SEND => None,
            wr::SEND_WITH_IMM => Some(u32::from_be_bytes(hdr.imm.to_ne_bytes())),
            _ => return wc_status::LOC_QP_OP_ERR,
        };
        let sges = match self.read_sges(at + SQ_WQE_HDR, hdr.num_sge) {
            Ok(s) => s,
            Err(e) => return e,
        };
        let payload = match self.gather(&sges, MAX_UD_MESSAGE) {
            Ok(p) => p,
            Err(e) => return e,
        };
        let Some(src_gid) = self.gids.get(&u32::from(hdr.av_gid_index)) else {
            return wc_status::LOC_QP_OP_ERR;
        };
        let qkey = if hdr.remote_qkey & (1 << 31) != 0 {
            qp.attr.qkey
        } else {
            hdr.remote_qkey
        };
        let addr = UdAddress {
            dmac: hdr.av_dmac,
            smac: self.mac,
            src_gid: src_gid.gid,
            dst_gid: hdr.av_dgid,
            tclass: (hdr.av_sl_tclass_flowlabel >> 20) as u8,
            hop_limit: hdr.av_hop_limit,
            flow_label: hdr.av_sl_tclass_flowlabel & 0xf_ffff,
        };
        if !addr.same_family() {
            // An IPv4-mapped GID to an IPv6 one (or back): no packet can carry both.
            return wc_status::LOC_QP_OP_ERR;
        }
        let psn = qp.attr.sq_psn;
        let packet = roce::build_ud(&addr, hdr.remote_qpn, qp.qpn, qkey, imm, psn, &payload);
        if let Some(q) = self.qps.get_mut(&qp.qpn) {
            q.attr.sq_psn = (psn + 1) & 0xff_ffff;
        }
        match &self.wire {
            Some(wire) => wire.send_frame(&packet),
            None => return wc_status::LOC_QP_OP_ERR,
        }
        self.counters.tx_packets += 1;
        self.counters.tx_bytes += payload.len() as u64;
        wc_status::SUCCESS
    }

    /// A RoCEv2 frame from the wire. Returns false when it is not one (the NIC then gives it
    /// to the netdev).
    pub fn receive_packet(&mut self, frame: &[u8]) -> bool {
        if !roce::is_roce_v2(frame) {
            return false;
        }
        if !self.active || !self.port_active || !self.dma.bus_master_enabled() {
            self.counters.rx_no_qp += 1;
            return true;
        }
        let generic = match roce::parse(frame) {
            Ok(p) => p,
            Err(roce::PacketError::UnsupportedOpcode(_)) => {
                self.counters.rx_no_qp += 1;
                return true;
            }
            Err(_) => {
                self.counters.rx_malformed += 1;
                return true;
            }
        };
        let handle = generic.dest_qp;
        let Some(qp) = self.qps.get(&handle).map(QueuePair::snapshot) else {
            self.counters.rx_no_qp += 1;
            return true;
        };
        if qp.kind == qp_type::RC {
            if generic.deth.is_some() {
                self.counters.rx_no_qp += 1;
            } else {
                self.rc_receive(handle, &generic);
            }
            return true;
        }
        let Some((qkey, src_qp)) = generic.deth else {
            self.counters.rx_no_qp += 1;
            return true;
        };
        let packet = roce::UdPacket {
            dest_qp: generic.dest_qp,
            src_qp,
            qkey,
            imm: generic.imm,
            smac: generic.smac,
            network: generic.network,
            payload: generic.payload,
        };
        let expected_qkey = if qp.kind == qp_type::GSI {
            GSI_QKEY
        } else {
            qp.attr.qkey
        };
        if !matches!(qp.kind, qp_type::UD | qp_type::GSI)
            || !matches!(qp.attr.qp_state, qp_state::RTR | qp_state::RTS)
            || packet.qkey != expected_qkey
        {
            self.counters.rx_no_qp += 1;
            return true;
        }
        let Some((wr_id, sges)) = self.take_receive_wqe(handle) else {
            self.counters.rx_no_wqe += 1;
            return true;
        };
        let mut data = packet.network.grh_area().to_vec();
        data.extend_from_slice(&packet.payload);
        let status = match sges.and_then(|sges| self.scatter(&sges, &data)) {
            Ok(()) => wc_status::SUCCESS,
            Err(e) => e,
        };
        let hdr = RqWqeHdr {
            wr_id,
            num_sge: 0,
            total_len: 0,
        };
        let mut flags = wc::FLAG_GRH | wc::FLAG_WITH_SMAC | wc::FLAG_WITH_NETWORK_HDR_TYPE;
        if packet.imm.is_some() {
            flags |= wc::FLAG_WITH_IMM;
        }
        let cqe = Cqe {
            wr_id: hdr.wr_id,
            qp: u64::from(handle),
            opcode: wc::RECV,
            status,
            byte_len: data.len() as u32,
            imm_data: u32::from_ne_bytes(packet.imm.unwrap_or(0).to_be_bytes()),
            src_qp: packet.src_qp,
            wc_flags: flags,
            port_num: 1,
            smac: packet.smac,
            network_hdr_type: if packet.network.is_ipv6() {
                wc::NETWORK_IPV6
            } else {
                wc::NETWORK_IPV4
            },
            ..Default::default()
        };
        if status == wc_status::SUCCESS {
            self.counters.rx_packets += 1;
            self.counters.rx_bytes += packet.payload.len() as u64;
        }
        self.post_cqe(qp.recv_cq, &cqe);
        true
    }
}
