//! The RC transport (IBA 9.7) of the RoCEv2 engine: requester (SEND, RDMA WRITE, RDMA READ,
//! with and without immediate; segmentation at the path MTU; PSNs; completion on ACK or read
//! response; go-back-N retransmission on NAK or timeout, counted against the QP's retry
//! count; RNR NAK waits for the negotiated timer) and responder (PSN checking with duplicate
//! re-ACKs and one sequence NAK; receive WQEs consumed by SENDs, RNR NAK when none is posted;
//! rkey, range and access checks for WRITE and READ; READ responses at the path MTU).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::abi::qp_state;
use super::datapath::{Cqe, SQ_WQE_HDR, Sge, SqWqeHdr, wc, wc_status, wr};
use super::roce::{self, Headers, Packet, UdAddress, opcode};
use super::{MrKind, PvrdmaFunction, QueuePair};

const ACCESS_REMOTE_WRITE: u32 = 1 << 1;
const ACCESS_REMOTE_READ: u32 = 1 << 2;
const SEND_SIGNALED: u32 = 1 << 1;
const SEND_SOLICITED: u32 = 1 << 2;
/// Largest message (the port's max_msg_sz is 2 GiB; keep a single message's copy bounded).
pub const MAX_MESSAGE: usize = 1 << 26;
/// Most packets in flight (sent, not yet acknowledged) per QP: the requester's window grows
/// to this while ACKs come back, halves on a sequence NAK and restarts small after a timeout
/// (a software engine shares CPUs with busy-polling guests; bursts it cannot drain are lost).
pub const WINDOW: i32 = 64;
/// The window after a timeout, and its floor.
pub const MIN_WINDOW: i32 = 4;
/// The local ACK timeout's floor. The QP's own (4.096 µs × 2^timeout, 67 ms for the usual 14)
/// is shorter than the scheduling delays a software engine sees when guests busy-poll.
pub const MIN_ACK_TIMEOUT: Duration = Duration::from_millis(1000);
/// Within a message, every this many packets asks for an ACK (so the window keeps moving).
pub const ACK_EVERY: usize = 16;
/// AETH syndromes.
const AETH_ACK: u8 = 0x1f;
const AETH_RNR_NAK: u8 = 0x20;
const AETH_NAK_SEQ: u8 = 0x60;
const AETH_NAK_INVALID: u8 = 0x61;
const AETH_NAK_ACCESS: u8 = 0x62;
/// WC opcodes beyond SEND/RECV.
const WC_RDMA_WRITE: u32 = 1;
const WC_RDMA_READ: u32 = 2;
const WC_RECV_RDMA_WITH_IMM: u32 = (1 << 7) | 1;
/// Completion statuses beyond those in datapath.
const WC_REM_ACCESS_ERR: u32 = 10;
const WC_REM_OP_ERR: u32 = 11;
const WC_REM_INV_REQ_ERR: u32 = 9;
const WC_RETRY_EXC_ERR: u32 = 12;
const WC_RNR_RETRY_EXC_ERR: u32 = 13;

/// Signed distance a − b between two 24-bit PSNs.
pub fn psn_diff(a: u32, b: u32) -> i32 {
    ((a.wrapping_sub(b)) << 8) as i32 >> 8
}

fn mtu_bytes(code: u32) -> usize {
    match code {
        1 => 256,
        2 => 512,
        3 => 1024,
        4 => 2048,
        _ => 4096,
    }
}

/// The RNR NAK timer for a 5-bit code (IBA table 45), rounded.
fn rnr_delay(code: u8) -> Duration {
    const US: [u64; 32] = [
        655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1280, 1920, 2560, 3840,
        5120, 7680, 10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880, 163_840,
        245_760, 327_680, 491_520,
    ];
    Duration::from_micros(US[usize::from(code & 31)])
}

/// A send WQE in flight.
#[derive(Clone, Debug)]
pub struct Pending {
    wr_id: u64,
    signaled: bool,
    wc_opcode: u32,
    first_psn: u32,
    last_psn: u32,
    byte_len: u32,
    /// (PSN, frame) of every packet, for retransmission.
    packets: Vec<(u32, Vec<u8>)>,
    /// READ: where the response goes and how much has arrived.
    read: Option<(Vec<Sge>, usize)>,
}

/// A SEND or WRITE-with-immediate being received.
#[derive(Clone, Debug)]
struct InboundMessage {
    wr_id: u64,
    sges: Vec<Sge>,
    offset: usize,
}

/// RC state of a QP.
#[derive(Clone, Debug, Default)]
pub struct RcState {
    pending: VecDeque<Pending>,
    last_progress: Option<Instant>,
    retries_left: u8,
    rnr_retries_left: u8,
    resend_from: Option<(u32, Instant)>,
    /// PSN of the next packet never sent (go-back-N moves it back).
    send_next: u32,
    /// Last PSN the responder acknowledged.
    acked: u32,
    /// Current window (packets).
    cwnd: i32,
    msn: u32,
    nak_sent: bool,
    recv: Option<InboundMessage>,
    write: Option<(u64, u32, usize)>,
    /// Packets retransmitted.
    pub retransmissions: u64,
    /// NAKs received.
    pub naks: u64,
}

impl RcState {
    /// The state without the messages in flight (the pending sends with their built packets,
    /// the message being received): what the per-packet paths read from a QP snapshot, at
    /// the cost of a few words instead of copies of up to a window of frames.
    pub fn without_messages(&self) -> Self {
        Self {
            pending: VecDeque::new(),
            recv: None,
            last_progress: self.last_progress,
            retries_left: self.retries_left,
            rnr_retries_left: self.rnr_retries_left,
            resend_from: self.resend_from,
            send_next: self.send_next,
            acked: self.acked,
            cwnd: self.cwnd,
            msn: self.msn,
            nak_sent: self.nak_sent,
            write: self.write,
            retransmissions: self.retransmissions,
            naks: self.naks,
        }
    }

    /// Takes the send WQEs waiting for their ACK or READ response (to flush them).
    pub(super) fn take_pending(&mut self) -> Vec<Pending> {
        self.pending.drain(..).collect()
    }

    /// Send WQEs waiting for their ACK or READ response.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// One line for logs: window, PSNs, retries.
    pub fn debug_line(&self) -> String {
        format!(
            "acked={:#x} send_next={:#x} cwnd={} retries={} pending={} first={:?} retx={} naks={}",
            self.acked,
            self.send_next,
            self.cwnd,
            self.retries_left,
            self.pending.len(),
            self.pending.front().map(|p| (p.first_psn, p.last_psn)),
            self.retransmissions,
            self.naks
        )
    }

    /// Resets the requester's retry budget and PSN window when the QP reaches RTS.
    pub fn arm(&mut self, retry_cnt: u8, rnr_retry: u8, sq_psn: u32) {
        self.retries_left = retry_cnt;
        self.rnr_retries_left = rnr_retry;
        self.send_next = sq_psn;
        self.acked = sq_psn.wrapping_sub(1) & 0xff_ffff;
        self.cwnd = 16;
    }
}

impl PvrdmaFunction {
    fn path(&self, qp: &QueuePair) -> Option<UdAddress> {
        let ah = &qp.attr.ah_attr;
        let src = self.gids.get(&u32::from(ah.sgid_index))?;
        let addr = UdAddress {
            dmac: ah.dmac,
            smac: self.mac,
            src_gid: src.gid,
            dst_gid: ah.dgid,
            tclass: ah.traffic_class,
            hop_limit: ah.hop_limit,
            flow_label: ah.flow_label & 0xf_ffff,
        };
        addr.same_family().then_some(addr)
    }

    fn send_frame(&mut self, frame: &[u8]) {
        if let Some(w) = &self.wire {
            w.send_frame(frame);
            self.counters.tx_packets += 1;
        }
    }

    /// Translates a remote (rkey) access of `len` bytes at `va`.
    fn remote(&self, rkey: u32, va: u64, len: u64, access: u32) -> Result<Vec<(u64, usize)>, u8> {
        let mr = self
            .mrs
            .values()
            .find(|m| m.rkey == rkey)
            .ok_or(AETH_NAK_ACCESS)?;
        if mr.access & access == 0 || matches!(mr.kind, MrKind::FastReg(_)) {
            return Err(AETH_NAK_ACCESS);
        }
        self.translate_key(mr.lkey, va, len)
            .map_err(|_| AETH_NAK_ACCESS)
    }

    fn translate_key(&self, lkey: u32, va: u64, len: u64) -> Result<Vec<(u64, usize)>, u32> {
        self.translate_pub(lkey, va, len)
    }

    /// One RC send WQE: builds its packets, sends them, queues it until acknowledged.
    pub(super) fn rc_post(&mut self, handle: u32, at: u64, hdr: &SqWqeHdr) -> Result<(), u32> {
        let qp = self
            .qps
            .get(&handle)
            .ok_or(wc_status::LOC_QP_OP_ERR)?
            .snapshot();
        if qp.attr.qp_state != qp_state::RTS {
            return Err(wc_status::WR_FLUSH_ERR);
        }
        if hdr.num_sge > qp.attr.cap.max_send_sge {
            return Err(wc_status::LOC_LEN_ERR);
        }
        let addr = self.path(&qp).ok_or(wc_status::LOC_QP_OP_ERR)?;
        let sges = self.read_sges_pub(at + SQ_WQE_HDR, hdr.num_sge)?;
        let mtu = mtu_bytes(qp.attr.path_mtu);
        let dest_qp = qp.attr.dest_qp_num;
        let signaled = qp.sq_sig_all || hdr.send_flags & SEND_SIGNALED != 0;
        let solicited = hdr.send_flags & SEND_SOLICITED != 0;
        let imm_value = u32::from_be_bytes(hdr.imm.to_ne_bytes());
        let mut psn = qp.attr.sq_psn;
        let first_psn = psn;
        let mut packets = Vec::new();
        let (wc_opcode, byte_len, read) = match hdr.opcode {
            wr::SEND | wr::SEND_WITH_IMM | wr::RDMA_WRITE | wr::RDMA_WRITE_WITH_IMM => {
                let data = self.gather_pub(&sges, MAX_MESSAGE)?;
                let is_send = matches!(hdr.opcode, wr::SEND | wr::SEND_WITH_IMM);
                let with_imm = matches!(hdr.opcode, wr::SEND_WITH_IMM | wr::RDMA_WRITE_WITH_IMM);
                let chunks: Vec<&[u8]> = if data.is_empty() {
                    vec![&[][..]]
                } else {
                    data.chunks(mtu).collect()
                };
                let n = chunks.len();
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let (first, last) = (i == 0, i + 1 == n);
                    let op = match (is_send, first, last, with_imm) {
                        (true, true, true, false) => opcode::SEND_ONLY,
                        (true, true, true, true) => opcode::SEND_ONLY_IMM,
                        (true, true, false, _) => opcode::SEND_FIRST,
                        (true, false, false, _) => opcode::SEND_MIDDLE,
                        (true, false, true, false) => opcode::SEND_LAST,
                        (true, false, true, true) => opcode::SEND_LAST_IMM,
                        (false, true, true, false) => opcode::WRITE_ONLY,
                        (false, true, true, true) => opcode::WRITE_ONLY_IMM,
                        (false, true, false, _) => opcode::WRITE_FIRST,
                        (false, false, false, _) => opcode::WRITE_MIDDLE,
                        (false, false, true, false) => opcode::WRITE_LAST,
                        (false, false, true, true) => opcode::WRITE_LAST_IMM,
                    };
                    let h = Headers {
                        opcode: op,
                        solicited: solicited && last,
                        dest_qp,
                        psn,
                        ack_req: last || i % ACK_EVERY == ACK_EVERY - 1,
                        reth: (!is_send && first).then_some((
                            hdr.remote_qpn_as_va(),
                            hdr.rdma_rkey(),
                            data.len() as u32,
                        )),
                        imm: (with_imm && last).then_some(imm_value),
                        entropy: qp.qpn,
                        ..Default::default()
                    };
                    packets.push((psn, roce::build(&addr, &h, chunk)));
                    psn = (psn + 1) & 0xff_ffff;
                }
                self.counters.tx_bytes += data.len() as u64;
                let op = if is_send { wc::SEND } else { WC_RDMA_WRITE };
                (op, data.len() as u32, None)
            }
            wr::RDMA_READ => {
                let len: u64 = sges.iter().map(|s| u64::from(s.length)).sum();
                if len as usize > MAX_MESSAGE {
                    return Err(wc_status::LOC_LEN_ERR);
                }
                // Check the local buffers now (they will be written).
                for s in &sges {
                    self.translate_write_pub(s.lkey, s.addr, u64::from(s.length))?;
                }
                let h = Headers {
                    opcode: opcode::READ_REQUEST,
                    dest_qp,
                    psn,
                    ack_req: true,
                    reth: Some((hdr.remote_qpn_as_va(), hdr.rdma_rkey(), len as u32)),
                    entropy: qp.qpn,
                    ..Default::default()
                };
                packets.push((psn, roce::build(&addr, &h, &[])));
                let responses = (len as usize).div_ceil(mtu).max(1) as u32;
                psn = (psn + responses) & 0xff_ffff;
                (WC_RDMA_READ, len as u32, Some((sges, 0)))
            }
            _ => return Err(wc_status::LOC_QP_OP_ERR),
        };
        let now = Instant::now();
        if let Some(q) = self.qps.get_mut(&handle) {
            q.attr.sq_psn = psn;
            if q.rc.pending.is_empty() {
                q.rc.last_progress = Some(now);
            }
            q.rc.pending.push_back(Pending {
                wr_id: hdr.wr_id,
                signaled,
                wc_opcode,
                first_psn,
                last_psn: (psn.wrapping_sub(1)) & 0xff_ffff,
                byte_len,
                packets,
                read,
            });
        }
        self.rc_push(handle);
        Ok(())
    }

    /// Sends the packets not yet sent that fit in the window.
    fn rc_push(&mut self, handle: u32) {
        let frames: Vec<Vec<u8>> = {
            let Some(q) = self.qps.get_mut(&handle) else {
                return;
            };
            let (acked, mut next) = (q.rc.acked, q.rc.send_next);
            let window = q.rc.cwnd.clamp(MIN_WINDOW, WINDOW);
            let mut out = Vec::new();
            for (psn, f) in q.rc.pending.iter().flat_map(|p| p.packets.iter()) {
                if psn_diff(*psn, next) < 0 {
                    continue;
                }
                if psn_diff(*psn, acked) > window {
                    break;
                }
                out.push(f.clone());
                next = (psn + 1) & 0xff_ffff;
            }
            // A READ request stands for all of its response PSNs.
            if let Some(p) =
                q.rc.pending
                    .iter()
                    .find(|p| p.read.is_some() && psn_diff(p.first_psn, next) == -1)
            {
                next = (p.last_psn + 1) & 0xff_ffff;
            }
            q.rc.send_next = next;
            if !out.is_empty() && q.rc.last_progress.is_none() {
                q.rc.last_progress = Some(Instant::now());
            }
            // The burst's last packet asks for an ACK, so the window keeps moving even when
            // it ends inside a message.
            if let Some(last) = out.last_mut() {
                roce::set_ack_req(last);
            }
            out
        };
        for f in frames {
            self.send_frame(&f);
        }
    }

    pub(super) fn complete_send(&mut self, handle: u32, p: &Pending, status: u32) {
        let Some(cq) = self.qps.get(&handle).map(|q| q.send_cq) else {
            return;
        };
        if p.signaled || status != wc_status::SUCCESS {
            let cqe = Cqe {
                wr_id: p.wr_id,
                qp: u64::from(handle),
                opcode: p.wc_opcode,
                status,
                byte_len: p.byte_len,
                port_num: 1,
                ..Default::default()
            };
            self.post_cqe(cq, &cqe);
        }
    }

    /// Moves the QP to the error state: the failing WQE completes with `status`, everything
    /// else outstanding flushes (`enter_error`).
    fn rc_fail(&mut self, handle: u32, status: u32) {
        let first = self
            .qps
            .get_mut(&handle)
            .and_then(|q| q.rc.pending.pop_front());
        if let Some(p) = first {
            self.complete_send(handle, &p, status);
        }
        self.enter_error(handle);
    }

    /// Completes every non-READ WQE up to `psn` (an ACK covers them) and slides the window.
    fn ack_up_to(&mut self, handle: u32, psn: u32) {
        if let Some(q) = self.qps.get_mut(&handle)
            && psn_diff(psn, q.rc.acked) > 0
            && psn_diff(psn, q.attr.sq_psn) < 0
        {
            // An ACK may cover packets a go-back-N has queued again: skip them.
            q.rc.acked = psn;
            if psn_diff(q.rc.send_next, psn) <= 0 {
                q.rc.send_next = (psn + 1) & 0xff_ffff;
            }
            q.rc.last_progress = Some(Instant::now());
            q.rc.retries_left = q.attr.retry_cnt;
            q.rc.cwnd = (q.rc.cwnd + ACK_EVERY as i32).min(WINDOW);
        }
        self.ack_complete(handle, psn);
        self.rc_push(handle);
    }

    fn ack_complete(&mut self, handle: u32, psn: u32) {
        loop {
            let done = match self.qps.get_mut(&handle) {
                Some(q) => match q.rc.pending.front() {
                    Some(p) if p.read.is_none() && psn_diff(p.last_psn, psn) <= 0 => {
                        q.rc.last_progress = Some(Instant::now());
                        q.rc.retries_left = q.attr.retry_cnt;
                        q.rc.pending.pop_front()
                    }
                    _ => None,
                },
                None => None,
            };
            match done {
                Some(p) => self.complete_send(handle, &p, wc_status::SUCCESS),
                None => return,
            }
        }
    }

    /// Resends every packet from `psn` on (go-back-N), within the window.
    fn resend_from(&mut self, handle: u32, psn: u32) {
        let Some(q) = self.qps.get_mut(&handle) else {
            return;
        };
        let before = q.rc.send_next;
        q.rc.send_next = psn;
        q.rc.last_progress = Some(Instant::now());
        let redo = psn_diff(before, psn).max(0) as u64;
        q.rc.retransmissions += redo;
        self.rc_push(handle);
    }

    /// Retransmission and RNR timers; called every few milliseconds.
    pub fn tick(&mut self, now: Instant) {
        let handles: Vec<u32> = self
            .qps
            .iter()
            .filter(|(_, q)| !q.rc.pending.is_empty() && q.attr.qp_state == qp_state::RTS)
            .map(|(h, _)| *h)
            .collect();
        for h in handles {
            let Some(q) = self.qps.get(&h) else { continue };
            if let Some((psn, at)) = q.rc.resend_from {
                if now >= at {
                    if let Some(q) = self.qps.get_mut(&h) {
                        q.rc.resend_from = None;
                    }
                    self.resend_from(h, psn);
                }
                continue;
            }
            // Local ACK timeout: 4.096 µs × 2^timeout (at least 10 ms here; 0 = infinite).
            if q.attr.timeout == 0 {
                continue;
            }
            let timeout =
                Duration::from_nanos(4096u64 << q.attr.timeout.min(31)).max(MIN_ACK_TIMEOUT);
            let Some(last) = q.rc.last_progress else {
                continue;
            };
            if now.duration_since(last) < timeout {
                continue;
            }
            let (left, from) = (q.rc.retries_left, (q.rc.acked + 1) & 0xff_ffff);
            if left == 0 {
                self.rc_fail(h, WC_RETRY_EXC_ERR);
                continue;
            }
            if let Some(q) = self.qps.get_mut(&h) {
                q.rc.retries_left -= 1;
                q.rc.cwnd = MIN_WINDOW;
            }
            // Go back to the oldest unacknowledged packet (a pending READ's request).
            let from = self
                .qps
                .get(&h)
                .and_then(|q| {
                    q.rc.pending
                        .iter()
                        .find(|p| psn_diff(p.last_psn, from) >= 0)
                        .map(|p| {
                            if p.read.is_some() || psn_diff(p.first_psn, from) > 0 {
                                p.first_psn
                            } else {
                                from
                            }
                        })
                })
                .unwrap_or(from);
            self.resend_from(h, from);
        }
    }

    /// An RC packet for QP `handle`.
    pub(super) fn rc_receive(&mut self, handle: u32, p: &Packet) {
        match p.opcode {
            opcode::ACK
            | opcode::READ_RESPONSE_FIRST
            | opcode::READ_RESPONSE_MIDDLE
            | opcode::READ_RESPONSE_LAST
            | opcode::READ_RESPONSE_ONLY => self.rc_requester_receive(handle, p),
            _ => self.rc_responder_receive(handle, p),
        }
    }

    fn rc_requester_receive(&mut self, handle: u32, p: &Packet) {
        if let Some((syndrome, _)) = p.aeth {
            match syndrome >> 5 {
                0 => {
                    if p.opcode == opcode::ACK {
                        self.ack_up_to(handle, p.psn);
                        return;
                    }
                }
                1 => {
                    // RNR NAK: wait, then resend from the NAK's PSN.
                    let Some(q) = self.qps.get_mut(&handle) else {
                        return;
                    };
                    q.rc.naks += 1;
                    if q.rc.rnr_retries_left == 0 {
                        self.rc_fail(handle, WC_RNR_RETRY_EXC_ERR);
                        return;
                    }
                    if q.rc.rnr_retries_left != 7 {
                        q.rc.rnr_retries_left -= 1;
                    }
                    q.rc.resend_from = Some((p.psn, Instant::now() + rnr_delay(syndrome & 31)));
                    return;
                }
                3 => {
                    let Some(q) = self.qps.get_mut(&handle) else {
                        return;
                    };
                    q.rc.naks += 1;
                    match syndrome {
                        AETH_NAK_SEQ => {
                            q.rc.cwnd = (q.rc.cwnd / 2).max(MIN_WINDOW);
                            // Everything before the NAK's PSN arrived.
                            self.ack_up_to(handle, p.psn.wrapping_sub(1) & 0xff_ffff);
                            self.resend_from(handle, p.psn);
                        }
                        AETH_NAK_INVALID => self.rc_fail(handle, WC_REM_INV_REQ_ERR),
                        AETH_NAK_ACCESS => self.rc_fail(handle, WC_REM_ACCESS_ERR),
                        _ => self.rc_fail(handle, WC_REM_OP_ERR),
                    }
                    return;
                }
                _ => return,
            }
        }
        // A READ response: it belongs to the oldest pending WQE if that is a READ covering
        // its PSN; earlier sends are implicitly acknowledged.
        let front = match self.qps.get(&handle).and_then(|q| q.rc.pending.front()) {
            Some(f) => f.clone(),
            None => return,
        };
        let Some((sges, received)) = &front.read else {
            // Responses for a READ behind unacknowledged sends: those are done.
            self.ack_up_to(handle, p.psn.wrapping_sub(1) & 0xff_ffff);
            return self.rc_requester_receive_read(handle, p);
        };
        let expected = (front.first_psn + (*received / self.qp_mtu(handle)) as u32) & 0xff_ffff;
        if p.psn != expected {
            return; // out of order or duplicate: the timeout resends the request
        }
        let _ = sges;
        self.rc_requester_receive_read(handle, p);
    }

    fn qp_mtu(&self, handle: u32) -> usize {
        self.qps
            .get(&handle)
            .map(|q| mtu_bytes(q.attr.path_mtu))
            .unwrap_or(4096)
    }

    fn rc_requester_receive_read(&mut self, handle: u32, p: &Packet) {
        let Some(front) = self
            .qps
            .get(&handle)
            .and_then(|q| q.rc.pending.front())
            .cloned()
        else {
            return;
        };
        let Some((sges, received)) = front.read.clone() else {
            return;
        };
        let mtu = self.qp_mtu(handle);
        let expected = (front.first_psn + (received / mtu) as u32) & 0xff_ffff;
        if p.psn != expected {
            return;
        }
        // Skip `received` bytes into the local SGEs and write the payload there.
        let mut skip = received;
        let mut data = &p.payload[..];
        for s in &sges {
            if data.is_empty() {
                break;
            }
            let len = s.length as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(data.len());
            if let Ok(pieces) = self.translate_write_pub(s.lkey, s.addr + skip as u64, n as u64) {
                let mut off = 0;
                for (iova, l) in pieces {
                    let _ = self.dma.write(iova, &data[off..off + l]);
                    off += l;
                }
            }
            data = &data[n..];
            skip = 0;
        }
        let total = received + p.payload.len();
        let last = matches!(
            p.opcode,
            opcode::READ_RESPONSE_LAST | opcode::READ_RESPONSE_ONLY
        );
        if let Some(q) = self.qps.get_mut(&handle) {
            q.rc.last_progress = Some(Instant::now());
            if let Some(f) = q.rc.pending.front_mut() {
                f.read = Some((sges, total));
            }
        }
        if last {
            let done = self
                .qps
                .get_mut(&handle)
                .and_then(|q| q.rc.pending.pop_front());
            if let Some(mut d) = done {
                d.byte_len = total as u32;
                self.complete_send(handle, &d, wc_status::SUCCESS);
            }
            self.ack_up_to(handle, p.psn);
        }
    }

    fn send_ack(&mut self, qp: &QueuePair, syndrome: u8, psn: u32, msn: u32) {
        let Some(addr) = self.path(qp) else { return };
        let h = Headers {
            opcode: opcode::ACK,
            dest_qp: qp.attr.dest_qp_num,
            psn,
            aeth: Some((syndrome, msn)),
            entropy: qp.qpn,
            ..Default::default()
        };
        let f = roce::build(&addr, &h, &[]);
        self.send_frame(&f);
    }

    fn rc_responder_receive(&mut self, handle: u32, p: &Packet) {
        let Some(qp) = self.qps.get(&handle).map(QueuePair::snapshot) else {
            return;
        };
        if !matches!(qp.attr.qp_state, qp_state::RTR | qp_state::RTS) {
            return;
        }
        let epsn = qp.attr.rq_psn;
        let d = psn_diff(p.psn, epsn);
        if d < 0 {
            // Duplicate: answer again (READs are re-executed), nothing else happens.
            if p.opcode == opcode::READ_REQUEST {
                self.read_responses(&qp, p);
            } else if p.ack_req {
                let last = epsn.wrapping_sub(1) & 0xff_ffff;
                self.send_ack(&qp, AETH_ACK, last, qp.rc.msn);
            }
            return;
        }
        if d > 0 {
            if !qp.rc.nak_sent {
                if let Some(q) = self.qps.get_mut(&handle) {
                    q.rc.nak_sent = true;
                }
                self.send_ack(&qp, AETH_NAK_SEQ, epsn, qp.rc.msn);
            }
            return;
        }
        if let Some(q) = self.qps.get_mut(&handle) {
            q.rc.nak_sent = false;
        }
        let result = match p.opcode {
            opcode::SEND_FIRST
            | opcode::SEND_MIDDLE
            | opcode::SEND_LAST
            | opcode::SEND_LAST_IMM
            | opcode::SEND_ONLY
            | opcode::SEND_ONLY_IMM => self.responder_send(handle, p),
            opcode::WRITE_FIRST
            | opcode::WRITE_MIDDLE
            | opcode::WRITE_LAST
            | opcode::WRITE_LAST_IMM
            | opcode::WRITE_ONLY
            | opcode::WRITE_ONLY_IMM => self.responder_write(handle, p),
            opcode::READ_REQUEST => {
                let (_, rkey, len) = p.reth.unwrap_or_default();
                let va = p.reth.map(|r| r.0).unwrap_or(0);
                match self.remote(rkey, va, u64::from(len), ACCESS_REMOTE_READ) {
                    Ok(_) => {
                        self.read_responses(&qp, p);
                        let n = (len as usize).div_ceil(mtu_bytes(qp.attr.path_mtu)).max(1) as u32;
                        if let Some(q) = self.qps.get_mut(&handle) {
                            q.attr.rq_psn = (epsn + n) & 0xff_ffff;
                            q.rc.msn = (q.rc.msn + 1) & 0xff_ffff;
                        }
                        return;
                    }
                    Err(s) => Err(s),
                }
            }
            _ => Err(AETH_NAK_INVALID),
        };
        match result {
            Ok(message_done) => {
                let Some(q) = self.qps.get_mut(&handle) else {
                    return;
                };
                q.attr.rq_psn = (epsn + 1) & 0xff_ffff;
                if message_done {
                    q.rc.msn = (q.rc.msn + 1) & 0xff_ffff;
                }
                let msn = q.rc.msn;
                if p.ack_req {
                    let qp = q.snapshot();
                    self.send_ack(&qp, AETH_ACK, p.psn, msn);
                }
            }
            Err(AETH_RNR_NAK) => {
                let code = qp.attr.min_rnr_timer;
                self.send_ack(&qp, AETH_RNR_NAK | (code & 31), p.psn, qp.rc.msn);
            }
            Err(syndrome) => {
                self.send_ack(&qp, syndrome, p.psn, qp.rc.msn);
                if let Some(q) = self.qps.get_mut(&handle) {
                    q.attr.qp_state = qp_state::ERR;
                }
            }
        }
    }

    /// Takes the next receive WQE of the QP (advancing the receive ring).
    fn take_recv_wqe(&mut self, handle: u32) -> Option<InboundMessage> {
        let (wr_id, sges) = self.take_receive_wqe(handle)?;
        // A WQE with too many SGEs scatters nothing: the message fails its length check.
        Some(InboundMessage {
            wr_id,
            sges: sges.unwrap_or_default(),
            offset: 0,
        })
    }

    fn complete_recv(
        &mut self,
        handle: u32,
        m: &InboundMessage,
        opcode: u32,
        imm: Option<u32>,
        status: u32,
        len: usize,
    ) {
        let Some(cq) = self.qps.get(&handle).map(|q| q.recv_cq) else {
            return;
        };
        let mut flags = 0;
        if imm.is_some() {
            flags |= wc::FLAG_WITH_IMM;
        }
        let cqe = Cqe {
            wr_id: m.wr_id,
            qp: u64::from(handle),
            opcode,
            status,
            byte_len: len as u32,
            imm_data: u32::from_ne_bytes(imm.unwrap_or(0).to_be_bytes()),
            wc_flags: flags,
            port_num: 1,
            ..Default::default()
        };
        self.counters.rx_packets += 1;
        self.post_cqe(cq, &cqe);
    }

    /// SEND packets: the payload goes to the current receive WQE. `Ok(true)` at the end of the
    /// message; `Err(AETH_RNR_NAK)` when no receive WQE is posted.
    fn responder_send(&mut self, handle: u32, p: &Packet) -> Result<bool, u8> {
        let first = matches!(
            p.opcode,
            opcode::SEND_FIRST | opcode::SEND_ONLY | opcode::SEND_ONLY_IMM
        );
        let last = !matches!(p.opcode, opcode::SEND_FIRST | opcode::SEND_MIDDLE);
        let mut m = if first {
            match self.take_recv_wqe(handle) {
                Some(m) => m,
                None => return Err(AETH_RNR_NAK),
            }
        } else {
            match self.qps.get_mut(&handle).and_then(|q| q.rc.recv.take()) {
                Some(m) => m,
                None => return Err(AETH_NAK_INVALID),
            }
        };
        let capacity: usize = m.sges.iter().map(|s| s.length as usize).sum();
        if m.offset + p.payload.len() > capacity {
            self.complete_recv(handle, &m, wc::RECV, None, wc_status::LOC_LEN_ERR, m.offset);
            return Err(AETH_NAK_INVALID);
        }
        // Scatter at m.offset.
        let mut skip = m.offset;
        let mut data = &p.payload[..];
        for s in &m.sges {
            if data.is_empty() {
                break;
            }
            let len = s.length as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(data.len());
            match self.translate_write_pub(s.lkey, s.addr + skip as u64, n as u64) {
                Ok(pieces) => {
                    let mut off = 0;
                    for (iova, l) in pieces {
                        let _ = self.dma.write(iova, &data[off..off + l]);
                        off += l;
                    }
                }
                Err(_) => {
                    self.complete_recv(
                        handle,
                        &m,
                        wc::RECV,
                        None,
                        wc_status::LOC_PROT_ERR,
                        m.offset,
                    );
                    return Err(AETH_NAK_INVALID);
                }
            }
            data = &data[n..];
            skip = 0;
        }
        m.offset += p.payload.len();
        self.counters.rx_bytes += p.payload.len() as u64;
        if last {
            self.complete_recv(handle, &m, wc::RECV, p.imm, wc_status::SUCCESS, m.offset);
            Ok(true)
        } else {
            if let Some(q) = self.qps.get_mut(&handle) {
                q.rc.recv = Some(m);
            }
            Ok(false)
        }
    }

    /// WRITE packets: the payload goes to the remote VA of the first packet's RETH.
    fn responder_write(&mut self, handle: u32, p: &Packet) -> Result<bool, u8> {
        let first = matches!(
            p.opcode,
            opcode::WRITE_FIRST | opcode::WRITE_ONLY | opcode::WRITE_ONLY_IMM
        );
        let last = !matches!(p.opcode, opcode::WRITE_FIRST | opcode::WRITE_MIDDLE);
        let (va, rkey, left) = if first {
            let (va, rkey, len) = p.reth.ok_or(AETH_NAK_INVALID)?;
            (va, rkey, len as usize)
        } else {
            self.qps
                .get_mut(&handle)
                .and_then(|q| q.rc.write.take())
                .ok_or(AETH_NAK_INVALID)?
        };
        if p.payload.len() > left {
            return Err(AETH_NAK_INVALID);
        }
        if !p.payload.is_empty() {
            let pieces = self.remote(rkey, va, p.payload.len() as u64, ACCESS_REMOTE_WRITE)?;
            let mut off = 0;
            for (iova, l) in pieces {
                self.dma
                    .write(iova, &p.payload[off..off + l])
                    .map_err(|_| AETH_NAK_ACCESS)?;
                off += l;
            }
        }
        self.counters.rx_bytes += p.payload.len() as u64;
        let rest = left - p.payload.len();
        if !last {
            if let Some(q) = self.qps.get_mut(&handle) {
                q.rc.write = Some((va + p.payload.len() as u64, rkey, rest));
            }
            return Ok(false);
        }
        if p.imm.is_some() {
            // WRITE with immediate consumes a receive WQE.
            let Some(m) = self.take_recv_wqe(handle) else {
                return Err(AETH_RNR_NAK);
            };
            self.complete_recv(
                handle,
                &m,
                WC_RECV_RDMA_WITH_IMM,
                p.imm,
                wc_status::SUCCESS,
                0,
            );
        }
        Ok(true)
    }

    /// The responses to a READ request (memory read now).
    fn read_responses(&mut self, qp: &QueuePair, p: &Packet) {
        let Some((va, rkey, len)) = p.reth else {
            return;
        };
        // The peer is untrusted: a DMA MR has no range to bound the length, so cap it here.
        if len as usize > MAX_MESSAGE {
            self.send_ack(qp, AETH_NAK_INVALID, p.psn, qp.rc.msn);
            return;
        }
        let Ok(pieces) = self.remote(rkey, va, u64::from(len), ACCESS_REMOTE_READ) else {
            self.send_ack(qp, AETH_NAK_ACCESS, p.psn, qp.rc.msn);
            return;
        };
        let mut data = vec![0u8; len as usize];
        let mut off = 0;
        for (iova, l) in pieces {
            if self.dma.read(iova, &mut data[off..off + l]).is_err() {
                self.send_ack(qp, AETH_NAK_ACCESS, p.psn, qp.rc.msn);
                return;
            }
            off += l;
        }
        let Some(addr) = self.path(qp) else { return };
        let mtu = mtu_bytes(qp.attr.path_mtu);
        let chunks: Vec<&[u8]> = if data.is_empty() {
            vec![&[][..]]
        } else {
            data.chunks(mtu).collect()
        };
        let n = chunks.len();
        let msn = (qp.rc.msn + 1) & 0xff_ffff;
        for (i, c) in chunks.into_iter().enumerate() {
            let op = match (i == 0, i + 1 == n) {
                (true, true) => opcode::READ_RESPONSE_ONLY,
                (true, false) => opcode::READ_RESPONSE_FIRST,
                (false, false) => opcode::READ_RESPONSE_MIDDLE,
                (false, true) => opcode::READ_RESPONSE_LAST,
            };
            let h = Headers {
                opcode: op,
                dest_qp: qp.attr.dest_qp_num,
                psn: (p.psn + i as u32) & 0xff_ffff,
                aeth: (op != opcode::READ_RESPONSE_MIDDLE).then_some((AETH_ACK, msn)),
                entropy: qp.qpn,
                ..Default::default()
            };
            let f = roce::build(&addr, &h, c);
            self.send_frame(&f);
        }
        self.counters.tx_bytes += data.len() as u64;
    }
}

impl SqWqeHdr {
    /// RC `wr.rdma.remote_addr` (the same bytes as UD's remote_qpn/remote_qkey).
    pub fn remote_qpn_as_va(&self) -> u64 {
        u64::from(self.remote_qpn) | u64::from(self.remote_qkey) << 32
    }

    /// RC `wr.rdma.rkey` (the bytes after remote_addr).
    pub fn rdma_rkey(&self) -> u32 {
        self.av_port_pd
    }
}
