//! The PVRDMA function driven the way `vmw_pvrdma` drives it: probe (shared region, caps,
//! activation), the commands ib_core's registration and a verbs program issue, and the
//! refusals malformed commands earn.

use std::sync::Arc;

use zerocopy::IntoBytes;

use super::abi::*;
use super::harness::*;
use super::*;

#[test]
fn probe_fills_the_capabilities_and_activates() {
    let mut r = rig();
    assert_eq!(r.probe(), 0);
    let caps = r.get(DSR + DSR_CAPS, 208);
    assert_eq!(caps[200], MODE_ROCE, "mode");
    assert_eq!(caps[203], GID_TYPE_FLAG_ROCE_V2, "gid_types");
    assert_eq!(caps[199], 1, "phys_port_cnt");
    assert_eq!(
        u32::from_le_bytes(caps[188..192].try_into().unwrap()),
        MAX_UAR
    );
    assert_eq!(
        u32::from_le_bytes(caps[192..196].try_into().unwrap()),
        GID_TABLE_LEN
    );
    // The node GUID is the MAC's EUI-64, big endian.
    assert_eq!(caps[8..16], [0, 0, 0, 0xff, 0xfe, 0, 0, 0x0a]);
}

#[test]
fn registration_and_verbs_commands_succeed() {
    let mut r = rig();
    assert_eq!(r.probe(), 0);
    let port = r.ok(&with(hdr(cmd::QUERY_PORT), &[1, 0]));
    assert_eq!(word(&port, 0), 4, "PORT_ACTIVE");
    let pkey = r.ok(&with(hdr(cmd::QUERY_PKEY), &[1, 0]));
    assert_eq!(&pkey[16..18], &[0xff, 0xff]);
    // GID bind.
    let mut bind = with(hdr(cmd::CREATE_BIND), &[1024, 0, 0]);
    bind.extend_from_slice(&[
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe, 0, 0, 0x0a,
    ]);
    bind.extend_from_slice(&[1, 0, 0, 0]);
    r.ok(&bind);
    // A user context, a PD, a DMA MR, a CQ, the GSI QP and an RC QP.
    let uc = r.ok(&with(hdr(cmd::CREATE_UC), &[0x1234, 0]));
    let ctx = word(&uc, 0);
    let pd = word(&r.ok(&with(hdr(cmd::CREATE_PD), &[ctx, 0])), 0);
    let mut mr = hdr(cmd::CREATE_MR);
    mr.extend_from_slice(&[0u8; 24]);
    mr = with(mr, &[pd, 7, 1, 0]);
    let mr_resp = r.ok(&mr);
    assert_ne!(word(&mr_resp, 1), 0, "lkey");
    let cq_dir = r.pdir(2);
    let mut cq = hdr(cmd::CREATE_CQ);
    cq.extend_from_slice(&cq_dir.to_le_bytes());
    cq = with(cq, &[0, 64, 2, 0]);
    let cq_resp = r.ok(&cq);
    let cqh = word(&cq_resp, 0);
    assert_eq!(word(&cq_resp, 1), 64);
    let qp_req = |r: &mut Rig, qp_type_: u8| {
        let dir = r.pdir(4);
        let c = CreateQp {
            hdr: CmdHdr {
                response: 1,
                cmd: cmd::CREATE_QP,
                reserved: 0,
            },
            pdir_dma: dir,
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
            total_chunks: 4,
            send_chunks: 1,
            max_atomic_arg: 0,
            sq_sig_all: 0,
            qp_type: qp_type_,
            is_srq: 0,
            reserved: [0; 3],
        };
        c.as_bytes().to_vec()
    };
    let gsi = qp_req(&mut r, qp_type::GSI);
    let gsi = r.ok(&gsi);
    assert_eq!(word(&gsi, 0), 1, "QP1");
    let rc = qp_req(&mut r, qp_type::RC);
    let rc = r.ok(&rc);
    let (qpn, handle) = (word(&rc, 0), word(&rc, 1));
    assert!(qpn >= 2);
    // A second GSI QP is refused.
    let again = qp_req(&mut r, qp_type::GSI);
    assert_eq!(r.post(&again).0, err::NO_RESOURCES);
    // RESET -> INIT -> RTR -> RTS with PSNs and the destination.
    for (state, mask) in [
        (
            qp_state::INIT,
            qp_mask::STATE | qp_mask::PORT | qp_mask::ACCESS_FLAGS,
        ),
        (
            qp_state::RTR,
            qp_mask::STATE | qp_mask::AV | qp_mask::PATH_MTU | qp_mask::DEST_QPN | qp_mask::RQ_PSN,
        ),
        (
            qp_state::RTS,
            qp_mask::STATE | qp_mask::SQ_PSN | qp_mask::TIMEOUT,
        ),
    ] {
        let m = ModifyQp {
            hdr: CmdHdr {
                response: 2,
                cmd: cmd::MODIFY_QP,
                reserved: 0,
            },
            qp_handle: handle,
            attr_mask: mask,
            attrs: QpAttr {
                qp_state: state,
                path_mtu: 3,
                dest_qp_num: 0x77,
                rq_psn: 0x1000,
                sq_psn: 0x2000,
                port_num: 1,
                timeout: 14,
                ..Default::default()
            },
        };
        r.ok(m.as_bytes());
    }
    let q = r.ok(&with(hdr(cmd::QUERY_QP), &[handle, qp_mask::ALL]));
    assert_eq!(word(&q, 0), qp_state::RTS);
    assert_eq!(word(&q, 5), 0x1000, "rq_psn");
    assert_eq!(word(&q, 6), 0x2000, "sq_psn");
    assert_eq!(word(&q, 7), 0x77, "dest_qp_num");
    // RTS -> INIT is not a transition.
    let bad = ModifyQp {
        hdr: CmdHdr {
            response: 3,
            cmd: cmd::MODIFY_QP,
            reserved: 0,
        },
        qp_handle: handle,
        attr_mask: qp_mask::STATE,
        attrs: QpAttr {
            qp_state: qp_state::INIT,
            ..Default::default()
        },
    };
    assert_eq!(r.post(bad.as_bytes()).0, err::INVALID);
    // Teardown in the driver's order; a CQ in use cannot go first.
    assert_eq!(
        r.post(&with(hdr(cmd::DESTROY_CQ), &[cqh, 0])).0,
        err::INVALID
    );
    r.ok(&with(hdr(cmd::DESTROY_QP), &[handle, 0]));
    r.ok(&with(hdr(cmd::DESTROY_QP), &[word(&gsi, 1), 0]));
    r.ok(&with(hdr(cmd::DESTROY_CQ), &[cqh, 0]));
    r.ok(&with(hdr(cmd::DESTROY_MR), &[word(&mr_resp, 0), 0]));
    r.ok(&with(hdr(cmd::DESTROY_PD), &[pd, 0]));
    r.ok(&with(hdr(cmd::DESTROY_UC), &[ctx, 0]));
    assert_eq!(r.f.state().counts, (0, 0, 0, 0));
}

#[test]
fn malformed_commands_are_refused_through_err() {
    let mut r = rig();
    // Before activation.
    assert_eq!(
        r.post(&with(hdr(cmd::QUERY_PORT), &[1, 0])).0,
        err::NOT_READY
    );
    assert_eq!(r.probe(), 0);
    for (what, req, want) in [
        ("unknown command", hdr(99), err::UNSUPPORTED),
        ("SRQ of no PD", hdr(cmd::CREATE_SRQ), err::NOT_FOUND),
        ("command 21", hdr(cmd::MAX), err::UNSUPPORTED),
        ("port 2", with(hdr(cmd::QUERY_PORT), &[2, 0]), err::INVALID),
        (
            "PD of no context",
            with(hdr(cmd::CREATE_PD), &[77, 0]),
            err::NOT_FOUND,
        ),
        (
            "destroy nothing",
            with(hdr(cmd::DESTROY_PD), &[5, 0]),
            err::NOT_FOUND,
        ),
        (
            "GID index",
            {
                let mut b = with(hdr(cmd::CREATE_BIND), &[1024, 0, GID_TABLE_LEN]);
                b.extend_from_slice(&[0u8; 20]);
                b
            },
            err::INVALID,
        ),
    ] {
        assert_eq!(r.post(&req).0, want, "{what}");
    }
    let pd = word(&r.ok(&with(hdr(cmd::CREATE_PD), &[0, 0])), 0);
    // A user MR whose page count does not match its length, and one whose directory points
    // outside guest memory.
    let mut mr = hdr(cmd::CREATE_MR);
    mr.extend_from_slice(&0x1000u64.to_le_bytes());
    mr.extend_from_slice(&0x3000u64.to_le_bytes());
    mr.extend_from_slice(&(MEM + 0x1000).to_le_bytes());
    let bad_count = with(mr.clone(), &[pd, 0, 0, 2]);
    assert_eq!(r.post(&bad_count).0, err::INVALID);
    let bad_dir = with(mr, &[pd, 0, 0, 3]);
    assert_eq!(r.post(&bad_dir).0, err::BAD_ADDRESS);
    // A CQ whose pages cannot hold its entries.
    let dir = r.pdir(2);
    let mut cq = hdr(cmd::CREATE_CQ);
    cq.extend_from_slice(&dir.to_le_bytes());
    assert_eq!(r.post(&with(cq, &[0, 1000, 2, 0])).0, err::INVALID);
    assert!(r.f.state().commands.1 >= 10);
}

#[test]
fn port_changes_go_to_the_async_ring() {
    let mut r = rig();
    assert_eq!(r.probe(), 0);
    r.msi.take();
    r.f.set_port_active(false);
    let msgs = r.msi.take();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].data, 0x51, "async vector");
    // Ring state page 0 of the async directory: rx.prod_tail moved to 1, the EQE on page 1.
    let state_page = u64::from_le_bytes(r.get(TABLES, 8).try_into().unwrap());
    assert_eq!(r.get(state_page + 8, 4), 1u32.to_le_bytes());
    let first = u64::from_le_bytes(r.get(TABLES + 8, 8).try_into().unwrap());
    assert_eq!(
        r.get(first, 8),
        [10, 0, 0, 0, 1, 0, 0, 0],
        "PORT_ERR on port 1"
    );
    let port = r.ok(&with(hdr(cmd::QUERY_PORT), &[1, 0]));
    assert_eq!(word(&port, 0), 1, "PORT_DOWN");
    r.f.set_port_active(true);
    assert_eq!(r.get(first + 8, 4), event::PORT_ACTIVE.to_le_bytes());
}

#[test]
fn cq_doorbells_arm_and_polls_cost_nothing() {
    let mut r = rig();
    assert_eq!(r.probe(), 0);
    let dir = r.pdir(2);
    let mut cq = hdr(cmd::CREATE_CQ);
    cq.extend_from_slice(&dir.to_le_bytes());
    let h = word(&r.ok(&with(cq, &[0, 64, 2, 0])), 0);
    r.f.bar_write(2, uar::CQ_OFFSET, &(uar::CQ_POLL | h).to_le_bytes());
    assert_eq!(r.f.cqs[&h].armed, None);
    r.f.bar_write(
        2,
        PAGE_SIZE + uar::CQ_OFFSET,
        &(uar::CQ_ARM | h).to_le_bytes(),
    );
    assert_eq!(r.f.cqs[&h].armed, Some(false));
    // A doorbell naming no CQ is ignored.
    r.f.bar_write(2, uar::CQ_OFFSET, &(uar::CQ_ARM | 0xabcd).to_le_bytes());
}

#[test]
fn ring_indices_mirror_pvrdma_ring_h() {
    let ring = RingIndices {
        prod_tail: 3,
        cons_head: 3,
    };
    assert_eq!(ring_free_slot(&ring, 4), Some(3));
    let full = RingIndices {
        prod_tail: 4 | 1,
        cons_head: 1,
    };
    assert_eq!(ring_free_slot(&full, 4), None);
    assert_eq!(ring_next(7, 4), 0);
    assert!(!ring_index_valid(8, 4));
}

#[test]
fn ud_sends_cross_the_wire_into_the_peers_receive_buffer() {
    use super::datapath::*;
    let (mut a, mut b) = (rig(), rig());
    let wire = Arc::new(Wire::default());
    a.f.set_wire(wire.clone());
    let (a_lkey, _, a_cq_dir, a_qp, a_qp_dir) = a.ud_qp([10, 77, 0, 1]);
    let (b_lkey, _, b_cq_dir, b_qp, b_qp_dir) = b.ud_qp([10, 77, 0, 2]);
    // B posts one receive: 2 KiB at 0x80000.
    let rq = b.page_of(b_qp_dir, 2);
    b.put(
        rq,
        RqWqeHdr {
            wr_id: 0xb0b,
            num_sge: 1,
            total_len: 0,
        }
        .as_bytes(),
    );
    b.put(
        rq + 16,
        Sge {
            addr: 0x8_0000,
            length: 2048,
            lkey: b_lkey,
        }
        .as_bytes(),
    );
    let b_state = b.page_of(b_qp_dir, 0);
    b.put(b_state + 8, &1u32.to_le_bytes());
    // A sends 100 bytes with immediate data to B's QP.
    let payload: Vec<u8> = (0..100u8).collect();
    a.put(0x9_0000, &payload);
    let sq = a.page_of(a_qp_dir, 1);
    let mut dgid = [0u8; 16];
    dgid[10..12].copy_from_slice(&[0xff, 0xff]);
    dgid[12..].copy_from_slice(&[10, 77, 0, 2]);
    let wqe = SqWqeHdr {
        wr_id: 0xa0a,
        num_sge: 1,
        opcode: wr::SEND_WITH_IMM,
        send_flags: 1 << 1,
        imm: u32::from_ne_bytes(0x0102_0304u32.to_be_bytes()),
        remote_qpn: b_qp,
        remote_qkey: 0x1111,
        av_dgid: dgid,
        av_gid_index: 0,
        av_dmac: [2, 0, 0, 0, 0, 0xb],
        ..Default::default()
    };
    a.put(sq, wqe.as_bytes());
    a.put(
        sq + SQ_WQE_HDR,
        Sge {
            addr: 0x9_0000,
            length: 100,
            lkey: a_lkey,
        }
        .as_bytes(),
    );
    let a_state = a.page_of(a_qp_dir, 0);
    a.put(a_state, &1u32.to_le_bytes());
    a.f.bar_write(2, uar::QP_OFFSET, &(uar::QP_SEND | a_qp).to_le_bytes());
    // A consumed the WQE and completed it.
    assert_eq!(a.get(a_state + 4, 4), 1u32.to_le_bytes(), "SQ cons_head");
    let a_cqe = Cqe::read_from_bytes(&a.get(a.page_of(a_cq_dir, 1), 64)).unwrap();
    assert_eq!(
        (a_cqe.wr_id, a_cqe.status, a_cqe.opcode),
        (0xa0a, 0, wc::SEND)
    );
    // The frame reaches B.
    let frames = wire.0.lock().unwrap().clone();
    assert_eq!(frames.len(), 1);
    assert!(b.f.receive_packet(&frames[0]));
    let got = b.get(0x8_0000, 140);
    assert_eq!(
        &got[40..],
        &payload[..],
        "payload after the 40-byte GRH area"
    );
    assert_eq!(
        &got[20 + 12..20 + 16],
        &[10, 77, 0, 1],
        "IPv4 source in the GRH area"
    );
    let b_cqe = Cqe::read_from_bytes(&b.get(b.page_of(b_cq_dir, 1), 64)).unwrap();
    assert_eq!(
        (b_cqe.wr_id, b_cqe.status, b_cqe.opcode),
        (0xb0b, 0, wc::RECV)
    );
    assert_eq!((b_cqe.byte_len, b_cqe.src_qp), (140, a_qp));
    assert_eq!(b_cqe.imm_data.to_ne_bytes(), [1, 2, 3, 4]);
    assert_ne!(b_cqe.wc_flags & wc::FLAG_WITH_IMM, 0);
    assert_eq!(b.f.roce_counters().rx_packets, 1);
    // A second packet finds no receive posted: dropped and counted; a corrupted one too.
    assert!(b.f.receive_packet(&frames[0]));
    assert_eq!(b.f.roce_counters().rx_no_wqe, 1);
    let mut bad = frames[0].clone();
    let n = bad.len();
    bad[n - 10] ^= 0xff;
    assert!(b.f.receive_packet(&bad));
    assert_eq!(b.f.roce_counters().rx_malformed, 1);
    // Not RoCE: left for the netdev.
    assert!(!b.f.receive_packet(&[0u8; 60]));
}

#[test]
fn bad_send_work_requests_complete_in_error() {
    use super::datapath::*;
    let mut a = rig();
    a.f.set_wire(Arc::new(Wire::default()));
    let (_, _, cq_dir, qp, qp_dir) = a.ud_qp([10, 77, 0, 1]);
    // An lkey that names no MR.
    let sq = a.page_of(qp_dir, 1);
    let wqe = SqWqeHdr {
        wr_id: 1,
        num_sge: 1,
        opcode: wr::SEND,
        ..Default::default()
    };
    a.put(sq, wqe.as_bytes());
    a.put(
        sq + SQ_WQE_HDR,
        Sge {
            addr: 0,
            length: 8,
            lkey: 0xdead,
        }
        .as_bytes(),
    );
    let state = a.page_of(qp_dir, 0);
    a.put(state, &1u32.to_le_bytes());
    a.f.bar_write(2, uar::QP_OFFSET, &(uar::QP_SEND | qp).to_le_bytes());
    let cqe = Cqe::read_from_bytes(&a.get(a.page_of(cq_dir, 1), 64)).unwrap();
    assert_eq!(cqe.status, wc_status::LOC_PROT_ERR);
    assert_eq!(a.f.qp(qp).unwrap().attr.qp_state, qp_state::ERR);
}

#[test]
fn rc_send_write_and_read_cross_between_two_functions_with_a_lost_packet() {
    use super::datapath::*;
    let (mut a, mut b) = (rig(), rig());
    let (wa, wb) = (Arc::new(Wire::default()), Arc::new(Wire::default()));
    a.f.set_wire(wa.clone());
    b.f.set_wire(wb.clone());
    let mac_a = [2, 0, 0, 0, 0, 0xa];
    let (ka, cqa, qpa, da) = a.rc_qp([10, 77, 0, 1], [10, 77, 0, 2], mac_a, 2);
    let (kb, cqb, qpb, db) = b.rc_qp([10, 77, 0, 2], [10, 77, 0, 1], mac_a, qpa);
    assert_eq!((qpa, qpb), (2, 2));
    // SEND of 3000 bytes (3 packets at MTU 1024); the second packet is lost once.
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    a.put(0x9_0000, &data);
    b.post_recv(
        db,
        0,
        0xb1,
        Sge {
            addr: 0x8_0000,
            length: 4096,
            lkey: kb,
        },
    );
    a.post_send(
        da,
        qpa,
        0,
        SqWqeHdr {
            wr_id: 0xa1,
            num_sge: 1,
            opcode: wr::SEND,
            ..Default::default()
        },
        Sge {
            addr: 0x9_0000,
            length: 3000,
            lkey: ka,
        },
    );
    pump(&mut a, &wa, &mut b, &wb, &mut |n| n == 2);
    assert_eq!(
        b.get(0x8_0000, 3000),
        data,
        "NAK sequence error, go-back-N, delivered once"
    );
    let rb = b.cqe(cqb, 0);
    assert_eq!(
        (rb.wr_id, rb.status, rb.opcode, rb.byte_len),
        (0xb1, 0, wc::RECV, 3000)
    );
    let sa = a.cqe(cqa, 0);
    assert_eq!((sa.wr_id, sa.status, sa.opcode), (0xa1, 0, wc::SEND));
    assert!(a.f.qp(qpa).unwrap().rc.retransmissions >= 2);
    // RDMA WRITE of 2500 bytes into B at 0xa0000 (rkey = B's key).
    let w: Vec<u8> = (0..2500u32).map(|i| (i * 3 + 1) as u8).collect();
    a.put(0x9_8000, &w);
    let mut wqe = SqWqeHdr {
        wr_id: 0xa2,
        num_sge: 1,
        opcode: wr::RDMA_WRITE,
        ..Default::default()
    };
    wqe.remote_qpn = 0xa_0000; // remote_addr low
    wqe.remote_qkey = 0; // remote_addr high
    wqe.av_port_pd = kb; // rkey
    a.post_send(
        da,
        qpa,
        1,
        wqe,
        Sge {
            addr: 0x9_8000,
            length: 2500,
            lkey: ka,
        },
    );
    pump(&mut a, &wa, &mut b, &wb, &mut |_| false);
    assert_eq!(b.get(0xa_0000, 2500), w);
    assert_eq!(a.cqe(cqa, 1).status, 0);
    // RDMA READ of 2000 bytes from B at 0xa0000 into A at 0xc0000.
    let mut wqe = SqWqeHdr {
        wr_id: 0xa3,
        num_sge: 1,
        opcode: 4,
        ..Default::default()
    };
    wqe.remote_qpn = 0xa_0000;
    wqe.av_port_pd = kb;
    a.post_send(
        da,
        qpa,
        2,
        wqe,
        Sge {
            addr: 0xc_0000,
            length: 2000,
            lkey: ka,
        },
    );
    pump(&mut a, &wa, &mut b, &wb, &mut |_| false);
    assert_eq!(a.get(0xc_0000, 2000), w[..2000]);
    let r = a.cqe(cqa, 2);
    assert_eq!(
        (r.wr_id, r.status, r.opcode, r.byte_len),
        (0xa3, 0, 2, 2000)
    );
    // A SEND with no receive posted: RNR NAK, then delivered once B posts one and the timer
    // fires.
    a.post_send(
        da,
        qpa,
        3,
        SqWqeHdr {
            wr_id: 0xa4,
            num_sge: 1,
            opcode: wr::SEND,
            ..Default::default()
        },
        Sge {
            addr: 0x9_0000,
            length: 100,
            lkey: ka,
        },
    );
    pump(&mut a, &wa, &mut b, &wb, &mut |_| false);
    assert!(a.f.qp(qpa).unwrap().rc.naks >= 1);
    b.post_recv(
        db,
        1,
        0xb2,
        Sge {
            addr: 0x8_4000,
            length: 4096,
            lkey: kb,
        },
    );
    std::thread::sleep(std::time::Duration::from_millis(5));
    a.f.tick(std::time::Instant::now() + std::time::Duration::from_secs(1));
    pump(&mut a, &wa, &mut b, &wb, &mut |_| false);
    assert_eq!(b.get(0x8_4000, 100), data[..100]);
    assert_eq!(a.cqe(cqa, 3).wr_id, 0xa4);
    // A WRITE with a bad rkey: remote access error, the QP goes to error.
    let mut wqe = SqWqeHdr {
        wr_id: 0xa5,
        num_sge: 1,
        opcode: wr::RDMA_WRITE,
        ..Default::default()
    };
    wqe.av_port_pd = 0xbad;
    a.post_send(
        da,
        qpa,
        4,
        wqe,
        Sge {
            addr: 0x9_0000,
            length: 10,
            lkey: ka,
        },
    );
    pump(&mut a, &wa, &mut b, &wb, &mut |_| false);
    let e = a.cqe(cqa, 4);
    assert_eq!((e.wr_id, e.status), (0xa5, 10), "REM_ACCESS_ERR");
    assert_eq!(a.f.qp(qpa).unwrap().attr.qp_state, qp_state::ERR);
}

/// 30 SENDs of 64 KiB (64 packets each) over a wire that loses about one frame in eight
/// either way: sequence NAKs, timeouts and the window bring every message across once.
#[test]
fn rc_sends_survive_a_lossy_wire() {
    use super::datapath::*;
    let (mut a, mut b) = (rig(), rig());
    let (wa, wb) = (Arc::new(Wire::default()), Arc::new(Wire::default()));
    a.f.set_wire(wa.clone());
    b.f.set_wire(wb.clone());
    let mac = [2, 0, 0, 0, 0, 0xa];
    let (ka, cqa, qpa, da) = a.rc_qp([10, 77, 0, 1], [10, 77, 0, 2], mac, 2);
    let (kb, cqb, _qpb, db) = b.rc_qp([10, 77, 0, 2], [10, 77, 0, 1], mac, qpa);
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    a.put(0x80_0000, &data);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut lose = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng.is_multiple_of(8)
    };
    for k in 0..30u32 {
        let slot = k % 16;
        b.post_recv(
            db,
            slot,
            u64::from(k),
            Sge {
                addr: 0x90_0000,
                length: 65536,
                lkey: kb,
            },
        );
        // The ring indices run over [0, 32): post_recv/post_send write slot + 1.
        let ring = (k + 1) % 32;
        let state_b = b.page_of(db, 0);
        b.put(state_b + 8, &ring.to_le_bytes());
        let at = a.page_of(da, 1) + u64::from(slot) * 128;
        a.put(
            at,
            SqWqeHdr {
                wr_id: u64::from(k),
                num_sge: 1,
                opcode: wr::SEND,
                ..Default::default()
            }
            .as_bytes(),
        );
        a.put(
            at + SQ_WQE_HDR,
            Sge {
                addr: 0x80_0000,
                length: 65536,
                lkey: ka,
            }
            .as_bytes(),
        );
        let state_a = a.page_of(da, 0);
        a.put(state_a, &ring.to_le_bytes());
        a.f.bar_write(2, uar::QP_OFFSET, &(uar::QP_SEND | qpa).to_le_bytes());
        let mut rounds = 0;
        loop {
            let fa: Vec<Vec<u8>> = wa.0.lock().unwrap().drain(..).collect();
            let fb: Vec<Vec<u8>> = wb.0.lock().unwrap().drain(..).collect();
            if fa.is_empty() && fb.is_empty() {
                let done = a.cqe(cqa, u64::from(k % 64));
                if done.wr_id == u64::from(k)
                    && done.opcode == wc::SEND
                    && a.f.qp(qpa).unwrap().rc.pending_len() == 0
                {
                    break;
                }
                a.f.tick(std::time::Instant::now() + std::time::Duration::from_secs(5));
            }
            for f in fa {
                if !lose() {
                    b.f.receive_packet(&f);
                }
            }
            for f in fb {
                if !lose() {
                    a.f.receive_packet(&f);
                }
            }
            rounds += 1;
            assert!(rounds < 10_000, "message {k} never completed");
        }
        let done = a.cqe(cqa, u64::from(k % 64));
        assert_eq!(done.status, 0, "message {k}");
        let r = b.cqe(cqb, u64::from(k % 64));
        assert_eq!(
            (r.wr_id, r.status, r.byte_len),
            (u64::from(k), 0, 65536),
            "message {k}"
        );
        assert_eq!(b.get(0x90_0000, 65536), data, "message {k}");
        b.put(0x90_0000, &[0u8; 65536]);
    }
    let rc = &a.f.qp(qpa).unwrap().rc;
    assert!(
        rc.retransmissions > 0 && rc.naks > 0,
        "the wire did lose frames"
    );
}

/// IBA 10.3.1: a QP moved to the Error state (what `rdma_disconnect` does) flushes its posted
/// receive WQEs, and send or receive WQEs posted afterwards flush too, signalled or not — each
/// a WR_FLUSH_ERR completion on its CQ, with the CQ's notification when armed.
#[test]
fn a_qp_in_error_flushes_every_outstanding_work_request() {
    use super::datapath::*;
    let mut a = rig();
    let mac = [2, 0, 0, 0, 0, 0xb];
    let (key, cq_dir, qp, qp_dir) = a.rc_qp([10, 77, 0, 1], [10, 77, 0, 2], mac, 2);
    let sge = Sge {
        addr: 0x8_0000,
        length: 64,
        lkey: key,
    };
    a.post_recv(qp_dir, 0, 0x71, sge);
    a.post_recv(qp_dir, 1, 0x72, sge);
    // Arm the CQ (handle 0: the first CQ) for the next completion.
    a.f.bar_write(2, uar::CQ_OFFSET, &uar::CQ_ARM.to_le_bytes());
    a.msi.take();
    let m = ModifyQp {
        hdr: CmdHdr {
            response: 3,
            cmd: cmd::MODIFY_QP,
            reserved: 0,
        },
        qp_handle: qp,
        attr_mask: qp_mask::STATE,
        attrs: QpAttr {
            qp_state: qp_state::ERR,
            ..Default::default()
        },
    };
    let (e, _, interrupts) = a.post_counting_interrupts(m.as_bytes());
    assert_eq!(
        (e, interrupts),
        (0, 2),
        "the command's response and the armed CQ's notification"
    );
    assert_eq!(a.f.qp(qp).unwrap().attr.qp_state, qp_state::ERR);
    let flushed: Vec<(u64, u32, u32)> = (0..2)
        .map(|n| a.cqe(cq_dir, n))
        .map(|c| (c.wr_id, c.status, c.opcode))
        .collect();
    assert_eq!(
        flushed,
        vec![
            (0x71, wc_status::WR_FLUSH_ERR, wc::RECV),
            (0x72, wc_status::WR_FLUSH_ERR, wc::RECV)
        ]
    );
    // An unsignalled SEND posted now flushes as well, and so does a receive.
    a.post_send(
        qp_dir,
        qp,
        0,
        SqWqeHdr {
            wr_id: 0x73,
            num_sge: 1,
            opcode: wr::SEND,
            ..Default::default()
        },
        sge,
    );
    a.post_recv(qp_dir, 2, 0x74, sge);
    a.f.bar_write(2, uar::QP_OFFSET, &(uar::QP_RECV | qp).to_le_bytes());
    let later: Vec<(u64, u32)> = (2..4)
        .map(|n| a.cqe(cq_dir, n))
        .map(|c| (c.wr_id, c.status))
        .collect();
    assert_eq!(
        later,
        vec![
            (0x73, wc_status::WR_FLUSH_ERR),
            (0x74, wc_status::WR_FLUSH_ERR)
        ]
    );
}

/// A shared receive queue (ibv_srq_pingpong's setup): an RC QP created on it takes its
/// receives from the SRQ's ring, and an armed limit posts SRQ_LIMIT_REACHED once.
#[test]
fn rc_sends_land_in_a_shared_receive_queue_and_its_limit_fires() {
    use super::datapath::*;
    let (mut a, mut b) = (rig(), rig());
    let (wa, wb) = (Arc::new(Wire::default()), Arc::new(Wire::default()));
    a.f.set_wire(wa.clone());
    b.f.set_wire(wb.clone());
    let mac = [2, 0, 0, 0, 0, 0xa];
    // B: an RC QP (handle 2) the normal way, to learn its PD, MR key and CQ; then an SRQ and
    // a second RC QP (handle 3) on it.
    let (kb, cqb, _, _) = b.rc_qp([10, 77, 0, 2], [10, 77, 0, 1], mac, 2);
    let srq_dir = b.pdir(2);
    let mut c = hdr(cmd::CREATE_SRQ);
    c.extend_from_slice(&srq_dir.to_le_bytes());
    // pd 1 (the first PD), 2 chunks, max_wr 16, max_sge 1, limit 0, reserved, srq_type 0.
    let c = with(c, &[1, 2, 16, 1, 0, 0, 0, 0]);
    let srq = word(&b.ok(&c), 0);
    let qp_dir = b.pdir(2);
    let create = CreateQp {
        hdr: CmdHdr {
            response: 1,
            cmd: cmd::CREATE_QP,
            reserved: 0,
        },
        pdir_dma: qp_dir,
        pd_handle: 1,
        send_cq_handle: 0,
        recv_cq_handle: 0,
        srq_handle: srq,
        max_send_wr: 16,
        max_recv_wr: 0,
        max_send_sge: 1,
        max_recv_sge: 0,
        max_inline_data: 0,
        lkey: 0,
        access_flags: 0,
        total_chunks: 2,
        send_chunks: 1,
        max_atomic_arg: 0,
        sq_sig_all: 1,
        qp_type: qp_type::RC,
        is_srq: 1,
        reserved: [0; 3],
    };
    let qpb = word(&b.ok(create.as_bytes()), 1);
    assert_eq!(qpb, 3);
    b.connect_rc(qpb, [10, 77, 0, 1], mac, 2);
    // Destroying an SRQ a QP still uses is refused.
    assert_eq!(
        b.post(&with(hdr(cmd::DESTROY_SRQ), &[srq, 0])).0,
        err::INVALID
    );
    // Two WQEs on the SRQ (ring state rx half at +8, WQEs of 32 bytes from page 1); limit 2.
    let state = b.page_of(srq_dir, 0);
    for (i, addr) in [(0u32, 0x8_0000u64), (1, 0x8_4000)] {
        let at = b.page_of(srq_dir, 1) + u64::from(i) * 32;
        b.put(
            at,
            RqWqeHdr {
                wr_id: 0x5000 + u64::from(i),
                num_sge: 1,
                total_len: 0,
            }
            .as_bytes(),
        );
        b.put(
            at + 16,
            Sge {
                addr,
                length: 4096,
                lkey: kb,
            }
            .as_bytes(),
        );
    }
    b.put(state + 8, &2u32.to_le_bytes());
    let mut m = hdr(cmd::MODIFY_SRQ);
    m.extend_from_slice(&srq.to_le_bytes());
    m.extend_from_slice(&2u32.to_le_bytes()); // IB_SRQ_LIMIT
    let m = with(m, &[0, 0, 2, 0]);
    b.ok(&m);
    // A: a QP connected to B's QP 3; one SEND.
    let (ka, _, qpa, da) = a.rc_qp([10, 77, 0, 1], [10, 77, 0, 2], mac, qpb);
    let data: Vec<u8> = (0..1500u32).map(|i| (i * 5) as u8).collect();
    a.put(0x9_0000, &data);
    a.post_send(
        da,
        qpa,
        0,
        SqWqeHdr {
            wr_id: 0xa1,
            num_sge: 1,
            opcode: wr::SEND,
            ..Default::default()
        },
        Sge {
            addr: 0x9_0000,
            length: 1500,
            lkey: ka,
        },
    );
    b.msi.take();
    pump(&mut a, &wa, &mut b, &wb, &mut |_| false);
    assert_eq!(
        b.get(0x8_0000, 1500),
        data,
        "scattered into the SRQ's first WQE"
    );
    let cqe = b.cqe(cqb, 0);
    assert_eq!(
        (cqe.wr_id, cqe.status, cqe.opcode, cqe.byte_len, cqe.qp),
        (0x5000, 0, wc::RECV, 1500, u64::from(qpb))
    );
    assert_eq!(
        u32::from_le_bytes(b.get(state + 12, 4).try_into().unwrap()),
        1,
        "the SRQ's consumer index moved"
    );
    // One WQE left < limit 2: SRQ_LIMIT_REACHED with the SRQ handle on the async ring.
    assert!(
        b.async_events()
            .contains(&(abi::event::SRQ_LIMIT_REACHED, srq))
    );
    let mut q = hdr(cmd::QUERY_SRQ);
    q.extend_from_slice(&srq.to_le_bytes());
    let resp = b.ok(&with(q, &[0]));
    assert_eq!(
        (word(&resp, 0), word(&resp, 1), word(&resp, 2)),
        (16, 1, 0),
        "limit disarmed"
    );
}
