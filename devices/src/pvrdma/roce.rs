//! RoCEv2 packets (IBA Annex A17): Ethernet / IPv4 or IPv6 / UDP 4791 / BTH / extension
//! headers / payload / pad / ICRC, built and parsed with `zerocopy`, the ICRC with `crc32fast`
//! as Linux rxe computes it (`rxe_icrc.c`: CRC-32 over eight 0xFF bytes, the IP and UDP headers
//! and the BTH with their variant fields masked to ones, then the rest of the packet). IPv4
//! when both GIDs are IPv4-mapped (`::ffff:a.b.c.d`), IPv6 otherwise.

use zerocopy::byteorder::network_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The RoCEv2 UDP port.
pub const ROCE_V2_PORT: u16 = 4791;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;

/// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`).
pub fn ipv4_of_gid(gid: &[u8; 16]) -> Option<[u8; 4]> {
    (gid[..10] == [0; 10] && gid[10..12] == [0xff, 0xff])
        .then(|| [gid[12], gid[13], gid[14], gid[15]])
}

/// The network header of a RoCEv2 packet as received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkHeader {
    /// An IPv4 header (RoCEv2 over IPv4).
    V4([u8; 20]),
    /// An IPv6 header (RoCEv2 over IPv6).
    V6([u8; 40]),
}

impl NetworkHeader {
    /// The 40-byte GRH area of a receive buffer: the IPv6 header as is, or the IPv4 header in
    /// its last 20 bytes (`ib_get_gids_from_rdma_hdr()`).
    pub fn grh_area(&self) -> [u8; 40] {
        let mut area = [0u8; 40];
        match self {
            NetworkHeader::V4(h) => area[20..].copy_from_slice(h),
            NetworkHeader::V6(h) => area.copy_from_slice(h),
        }
        area
    }

    /// Whether this is IPv6.
    pub fn is_ipv6(&self) -> bool {
        matches!(self, NetworkHeader::V6(_))
    }
}

/// BTH opcodes (IBA 9.2, table 35) this engine sends or accepts.
pub mod opcode {
    /// RC SEND first.
    pub const SEND_FIRST: u8 = 0x00;
    /// RC SEND middle.
    pub const SEND_MIDDLE: u8 = 0x01;
    /// RC SEND last.
    pub const SEND_LAST: u8 = 0x02;
    /// RC SEND last with immediate.
    pub const SEND_LAST_IMM: u8 = 0x03;
    /// RC SEND only.
    pub const SEND_ONLY: u8 = 0x04;
    /// RC SEND only with immediate.
    pub const SEND_ONLY_IMM: u8 = 0x05;
    /// RC RDMA WRITE first (RETH).
    pub const WRITE_FIRST: u8 = 0x06;
    /// RC RDMA WRITE middle.
    pub const WRITE_MIDDLE: u8 = 0x07;
    /// RC RDMA WRITE last.
    pub const WRITE_LAST: u8 = 0x08;
    /// RC RDMA WRITE last with immediate.
    pub const WRITE_LAST_IMM: u8 = 0x09;
    /// RC RDMA WRITE only (RETH).
    pub const WRITE_ONLY: u8 = 0x0a;
    /// RC RDMA WRITE only with immediate (RETH, ImmDt).
    pub const WRITE_ONLY_IMM: u8 = 0x0b;
    /// RC RDMA READ request (RETH).
    pub const READ_REQUEST: u8 = 0x0c;
    /// RC RDMA READ response first (AETH).
    pub const READ_RESPONSE_FIRST: u8 = 0x0d;
    /// RC RDMA READ response middle.
    pub const READ_RESPONSE_MIDDLE: u8 = 0x0e;
    /// RC RDMA READ response last (AETH).
    pub const READ_RESPONSE_LAST: u8 = 0x0f;
    /// RC RDMA READ response only (AETH).
    pub const READ_RESPONSE_ONLY: u8 = 0x10;
    /// RC ACKNOWLEDGE (AETH).
    pub const ACK: u8 = 0x11;
    /// UD SEND only.
    pub const UD_SEND_ONLY: u8 = 0x64;
    /// UD SEND only with immediate.
    pub const UD_SEND_ONLY_IMM: u8 = 0x65;

    /// Extension headers after the BTH: (RETH, AETH, ImmDt, DETH).
    pub fn headers(op: u8) -> Option<(bool, bool, bool, bool)> {
        Some(match op {
            SEND_FIRST | SEND_MIDDLE | SEND_LAST | SEND_ONLY | WRITE_MIDDLE | WRITE_LAST => {
                (false, false, false, false)
            }
            READ_RESPONSE_MIDDLE => (false, false, false, false),
            SEND_LAST_IMM | SEND_ONLY_IMM | WRITE_LAST_IMM => (false, false, true, false),
            WRITE_FIRST | WRITE_ONLY | READ_REQUEST => (true, false, false, false),
            WRITE_ONLY_IMM => (true, false, true, false),
            READ_RESPONSE_FIRST | READ_RESPONSE_LAST | READ_RESPONSE_ONLY | ACK => {
                (false, true, false, false)
            }
            UD_SEND_ONLY => (false, false, false, true),
            UD_SEND_ONLY_IMM => (false, false, true, true),
            _ => return None,
        })
    }
}

/// A parsed RoCEv2 packet (any opcode this engine knows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// BTH opcode.
    pub opcode: u8,
    /// Solicited event.
    pub solicited: bool,
    /// Destination QP.
    pub dest_qp: u32,
    /// PSN.
    pub psn: u32,
    /// AckReq.
    pub ack_req: bool,
    /// RETH: (va, rkey, length).
    pub reth: Option<(u64, u32, u32)>,
    /// AETH: (syndrome, MSN).
    pub aeth: Option<(u8, u32)>,
    /// Immediate data (host value).
    pub imm: Option<u32>,
    /// DETH: (Q_Key, source QP).
    pub deth: Option<(u32, u32)>,
    /// Source MAC.
    pub smac: [u8; 6],
    /// The IP header as received.
    pub network: NetworkHeader,
    /// Payload.
    pub payload: Vec<u8>,
}

/// What goes into a packet's BTH and extension headers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Headers {
    /// BTH opcode.
    pub opcode: u8,
    /// Solicited event.
    pub solicited: bool,
    /// Destination QP.
    pub dest_qp: u32,
    /// PSN.
    pub psn: u32,
    /// AckReq.
    pub ack_req: bool,
    /// RETH.
    pub reth: Option<(u64, u32, u32)>,
    /// AETH.
    pub aeth: Option<(u8, u32)>,
    /// Immediate data.
    pub imm: Option<u32>,
    /// DETH.
    pub deth: Option<(u32, u32)>,
    /// UDP source port entropy (the source QP).
    pub entropy: u32,
}

/// Builds a RoCEv2 frame: IPv4 when both GIDs are IPv4-mapped, IPv6 otherwise (callers check
/// that the two are of one family, [`UdAddress::same_family`]).
pub fn build(addr: &UdAddress, h: &Headers, payload: &[u8]) -> Vec<u8> {
    let pad = (4 - payload.len() % 4) % 4;
    let mut ext = Vec::with_capacity(32);
    if let Some((qkey, src_qp)) = h.deth {
        let d = Deth {
            qkey: U32::new(qkey),
            src_qp: U32::new(src_qp & 0xff_ffff),
        };
        ext.extend_from_slice(d.as_bytes());
    }
    if let Some((va, rkey, len)) = h.reth {
        let r = Reth {
            va: U64::new(va),
            rkey: U32::new(rkey),
            len: U32::new(len),
        };
        ext.extend_from_slice(r.as_bytes());
    }
    if let Some((syndrome, msn)) = h.aeth {
        ext.extend_from_slice(&(u32::from(syndrome) << 24 | (msn & 0xff_ffff)).to_be_bytes());
    }
    if let Some(imm) = h.imm {
        ext.extend_from_slice(&imm.to_be_bytes());
    }
    let v4 = ipv4_of_gid(&addr.src_gid).zip(ipv4_of_gid(&addr.dst_gid));
    let ip_hdr = if v4.is_some() { IP } else { IP6 };
    let udp_len = UDP + BTH + ext.len() + payload.len() + pad + 4;
    let mut f = Vec::with_capacity(ETH + ip_hdr + udp_len);
    f.extend_from_slice(&addr.dmac);
    f.extend_from_slice(&addr.smac);
    let hop_limit = if addr.hop_limit == 0 {
        64
    } else {
        addr.hop_limit
    };
    match v4 {
        Some((src, dst)) => {
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let mut ip = Ipv4 {
                version_ihl: 0x45,
                tos: addr.tclass,
                total_len: U16::new((IP + udp_len) as u16),
                id: U16::new(0),
                frag: U16::new(0x4000),
                ttl: hop_limit,
                protocol: IPPROTO_UDP,
                checksum: U16::new(0),
                src,
                dst,
            };
            ip.checksum = U16::new(ip_checksum(ip.as_bytes()));
            f.extend_from_slice(ip.as_bytes());
        }
        None => {
            f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            let ip = Ipv6 {
                version_class_flow: U32::new(
                    6 << 28 | u32::from(addr.tclass) << 20 | (addr.flow_label & 0xf_ffff),
                ),
                payload_len: U16::new(udp_len as u16),
                next_header: IPPROTO_UDP,
                hop_limit,
                src: addr.src_gid,
                dst: addr.dst_gid,
            };
            f.extend_from_slice(ip.as_bytes());
        }
    }
    let udp = Udp {
        src_port: U16::new(0xc000 | (h.entropy as u16 & 0x3fff)),
        dst_port: U16::new(ROCE_V2_PORT),
        len: U16::new(udp_len as u16),
        checksum: U16::new(0),
    };
    f.extend_from_slice(udp.as_bytes());
    let bth = Bth {
        opcode: h.opcode,
        flags: u8::from(h.solicited) << 7 | (pad as u8) << 4,
        pkey: U16::new(0xffff),
        dest_qp: U32::new(h.dest_qp & 0xff_ffff),
        psn: U32::new(u32::from(h.ack_req) << 31 | (h.psn & 0xff_ffff)),
    };
    f.extend_from_slice(bth.as_bytes());
    f.extend_from_slice(&ext);
    f.extend_from_slice(payload);
    f.extend(std::iter::repeat_n(0u8, pad));
    let crc = icrc(&f[ETH..]);
    f.extend_from_slice(&crc.to_le_bytes());
    if v4.is_none() {
        // IPv6 forbids a zero UDP checksum (RFC 8200 8.1); the ICRC masks the field.
        let sum = udp6_checksum(&addr.src_gid, &addr.dst_gid, &f[ETH + IP6..]);
        f[ETH + IP6 + 6..ETH + IP6 + 8].copy_from_slice(&sum.to_be_bytes());
    }
    f
}

/// The UDP checksum over IPv6 (RFC 8200 8.1 pseudo-header) of `udp` (header with a zero
/// checksum field, then the payload).
fn udp6_checksum(src: &[u8; 16], dst: &[u8; 16], udp: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + udp.len());
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
    pseudo.extend_from_slice(udp);
    match ip_checksum(&pseudo) {
        0 => 0xffff,
        sum => sum,
    }
}

/// Where the IP header of a RoCEv2 frame ends and its IP packet ends: (IP header length, IP
/// packet length including that header), after checking it is IPv4 or IPv6 carrying UDP to port
/// 4791.
fn locate(frame: &[u8]) -> Result<(usize, usize), PacketError> {
    if frame.len() < ETH + IP + UDP {
        return Err(PacketError::NotRoce);
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let (hdr, total) = if ethertype == ETHERTYPE_IPV4 && frame[ETH] == 0x45 {
        if frame[ETH + 9] != IPPROTO_UDP {
            return Err(PacketError::NotRoce);
        }
        (
            IP,
            usize::from(u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]])),
        )
    } else if ethertype == ETHERTYPE_IPV6 && frame[ETH] >> 4 == 6 {
        if frame.len() < ETH + IP6 + UDP || frame[ETH + 6] != IPPROTO_UDP {
            return Err(PacketError::NotRoce);
        }
        let payload = usize::from(u16::from_be_bytes([frame[ETH + 4], frame[ETH + 5]]));
        (IP6, IP6 + payload)
    } else {
        return Err(PacketError::NotRoce);
    };
    if frame[ETH + hdr + 2..ETH + hdr + 4] != ROCE_V2_PORT.to_be_bytes() {
        return Err(PacketError::NotRoce);
    }
    if total < hdr + UDP + BTH + 4 || ETH + total > frame.len() {
        return Err(PacketError::Malformed);
    }
    Ok((hdr, total))
}

/// Parses any RoCEv2 packet this engine knows, checking lengths, pad and ICRC.
pub fn parse(frame: &[u8]) -> Result<Packet, PacketError> {
    let (hdr, ip_len) = locate(frame)?;
    let packet = &frame[ETH..ETH + ip_len];
    let (body, icrc_bytes) = packet.split_at(ip_len - 4);
    if icrc(body).to_le_bytes() != icrc_bytes {
        return Err(PacketError::BadIcrc);
    }
    let (bth, mut rest) =
        Bth::read_from_prefix(&body[hdr + UDP..]).map_err(|_| PacketError::Malformed)?;
    let (has_reth, has_aeth, has_imm, has_deth) =
        opcode::headers(bth.opcode).ok_or(PacketError::UnsupportedOpcode(bth.opcode))?;
    let mut deth = None;
    if has_deth {
        let (d, r) = Deth::read_from_prefix(rest).map_err(|_| PacketError::Malformed)?;
        deth = Some((d.qkey.get(), d.src_qp.get() & 0xff_ffff));
        rest = r;
    }
    let mut reth = None;
    if has_reth {
        let (h, r) = Reth::read_from_prefix(rest).map_err(|_| PacketError::Malformed)?;
        reth = Some((h.va.get(), h.rkey.get(), h.len.get()));
        rest = r;
    }
    let mut aeth = None;
    if has_aeth {
        let (v, r) = U32::read_from_prefix(rest).map_err(|_| PacketError::Malformed)?;
        aeth = Some(((v.get() >> 24) as u8, v.get() & 0xff_ffff));
        rest = r;
    }
    let mut imm = None;
    if has_imm {
        let (v, r) = U32::read_from_prefix(rest).map_err(|_| PacketError::Malformed)?;
        imm = Some(v.get());
        rest = r;
    }
    let pad = usize::from((bth.flags >> 4) & 3);
    if pad > rest.len() {
        return Err(PacketError::Malformed);
    }
    let network = network_header(body);
    let mut smac = [0u8; 6];
    smac.copy_from_slice(&frame[6..12]);
    Ok(Packet {
        opcode: bth.opcode,
        solicited: bth.flags & 0x80 != 0,
        dest_qp: bth.dest_qp.get() & 0xff_ffff,
        psn: bth.psn.get() & 0xff_ffff,
        ack_req: bth.psn.get() & (1 << 31) != 0,
        reth,
        aeth,
        imm,
        deth,
        smac,
        network,
        payload: rest[..rest.len() - pad].to_vec(),
    })
}

/// The IP header at the start of `ip_packet` (already located: IPv4 or IPv6).
fn network_header(ip_packet: &[u8]) -> NetworkHeader {
    if ip_packet[0] >> 4 == 6 {
        let mut h = [0u8; 40];
        h.copy_from_slice(&ip_packet[..IP6]);
        NetworkHeader::V6(h)
    } else {
        let mut h = [0u8; 20];
        h.copy_from_slice(&ip_packet[..IP]);
        NetworkHeader::V4(h)
    }
}

/// Base Transport Header.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Bth {
    /// Opcode.
    pub opcode: u8,
    /// SE, MigReq, PadCnt (2 bits), TVer (4 bits).
    pub flags: u8,
    /// Partition key.
    pub pkey: U16,
    /// FECN, BECN, reserved (byte 4), then the 24-bit destination QP.
    pub dest_qp: U32,
    /// AckReq (bit 31) and the 24-bit PSN.
    pub psn: U32,
}

/// Datagram Extended Transport Header.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Deth {
    /// Queue key.
    pub qkey: U32,
    /// Reserved (8) and the 24-bit source QP.
    pub src_qp: U32,
}

/// RDMA Extended Transport Header (for later RC opcodes; parsed by the fuzz target).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Reth {
    /// Virtual address.
    pub va: U64,
    /// Remote key.
    pub rkey: U32,
    /// DMA length.
    pub len: U32,
}

/// IPv4 header without options.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Ipv4 {
    /// Version and IHL (0x45).
    pub version_ihl: u8,
    /// DSCP/ECN (the traffic class).
    pub tos: u8,
    /// Total length.
    pub total_len: U16,
    /// Identification.
    pub id: U16,
    /// Flags and fragment offset (DF).
    pub frag: U16,
    /// TTL (the hop limit).
    pub ttl: u8,
    /// Protocol (17).
    pub protocol: u8,
    /// Header checksum.
    pub checksum: U16,
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
}

/// IPv6 header (no extension headers).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Ipv6 {
    /// Version (6), traffic class, flow label.
    pub version_class_flow: U32,
    /// Payload length (UDP header onwards).
    pub payload_len: U16,
    /// Next header (17).
    pub next_header: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Source address (the source GID).
    pub src: [u8; 16],
    /// Destination address (the destination GID).
    pub dst: [u8; 16],
}

/// UDP header.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Udp {
    /// Source port.
    pub src_port: U16,
    /// Destination port (4791).
    pub dst_port: U16,
    /// Length.
    pub len: U16,
    /// Checksum (0: none, as RoCEv2 senders use).
    pub checksum: U16,
}

const ETH: usize = 14;
const IP: usize = 20;
const IP6: usize = 40;
const UDP: usize = 8;
const BTH: usize = 12;
/// Offset of the BTH in a RoCEv2/IPv4 frame.
pub const BTH_OFFSET: usize = ETH + IP + UDP;

/// The ICRC over a RoCEv2 packet from its IP header up to (not including) the ICRC, with the
/// variant fields masked to ones as `rxe_icrc_hdr()` does: IPv4 TOS, TTL and header checksum;
/// IPv6 traffic class, flow label and hop limit; the UDP checksum; the BTH's reserved byte.
pub fn icrc(ip_to_payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[0xff; 8]);
    let ipv6 = ip_to_payload.first().is_some_and(|b| b >> 4 == 6);
    let hdr = if ipv6 { IP6 } else { IP };
    let mut masked = [0u8; IP6 + UDP + BTH];
    let n = (hdr + UDP + BTH).min(ip_to_payload.len());
    masked[..n].copy_from_slice(&ip_to_payload[..n]);
    if n == hdr + UDP + BTH {
        if ipv6 {
            masked[0] |= 0x0f; // traffic class (high nibble)
            masked[1..4].fill(0xff); // traffic class (low nibble), flow label
            masked[7] = 0xff; // hop limit
        } else {
            masked[1] = 0xff; // TOS
            masked[8] = 0xff; // TTL
            masked[10..12].fill(0xff); // header checksum
        }
        masked[hdr + 6..hdr + 8].fill(0xff); // UDP checksum
        masked[hdr + UDP + 4] = 0xff; // BTH FECN/BECN/reserved
    }
    h.update(&masked[..n]);
    h.update(&ip_to_payload[n..]);
    h.finalize()
}

fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in header.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Where a UD packet goes and comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdAddress {
    /// Destination MAC.
    pub dmac: [u8; 6],
    /// Source MAC.
    pub smac: [u8; 6],
    /// Source GID (the source IP address: IPv4-mapped or IPv6).
    pub src_gid: [u8; 16],
    /// Destination GID.
    pub dst_gid: [u8; 16],
    /// Traffic class.
    pub tclass: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// IPv6 flow label.
    pub flow_label: u32,
}

impl UdAddress {
    /// Whether both GIDs are IPv4-mapped or both are not (a packet has one IP version).
    pub fn same_family(&self) -> bool {
        ipv4_of_gid(&self.src_gid).is_some() == ipv4_of_gid(&self.dst_gid).is_some()
    }
}

/// A parsed UD packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdPacket {
    /// Destination QP.
    pub dest_qp: u32,
    /// Source QP (DETH).
    pub src_qp: u32,
    /// Q_Key (DETH).
    pub qkey: u32,
    /// Immediate data (big-endian value as sent).
    pub imm: Option<u32>,
    /// Source MAC.
    pub smac: [u8; 6],
    /// The IP header as received (for the GRH area of the receive buffer).
    pub network: NetworkHeader,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Why an incoming frame was not a usable RoCEv2 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketError {
    /// Not IPv4 or IPv6 / UDP to port 4791.
    NotRoce,
    /// Truncated or inconsistent lengths.
    Malformed,
    /// ICRC mismatch.
    BadIcrc,
    /// An opcode this engine does not handle.
    UnsupportedOpcode(u8),
}

/// Builds a UD SEND-only packet.
pub fn build_ud(
    addr: &UdAddress,
    dest_qp: u32,
    src_qp: u32,
    qkey: u32,
    imm: Option<u32>,
    psn: u32,
    payload: &[u8],
) -> Vec<u8> {
    let h = Headers {
        opcode: if imm.is_some() {
            opcode::UD_SEND_ONLY_IMM
        } else {
            opcode::UD_SEND_ONLY
        },
        dest_qp,
        psn,
        deth: Some((qkey, src_qp)),
        imm,
        entropy: src_qp,
        ..Default::default()
    };
    build(addr, &h, payload)
}

/// Sets a built frame's AckReq bit (and recomputes its ICRC and, over IPv6, UDP checksum).
pub fn set_ack_req(frame: &mut [u8]) {
    let Ok((hdr, _)) = locate(frame) else {
        return;
    };
    let at = ETH + hdr + UDP + 8;
    if frame[at] & 0x80 != 0 {
        return;
    }
    frame[at] |= 0x80;
    let end = frame.len() - 4;
    let crc = icrc(&frame[ETH..end]);
    frame[end..].copy_from_slice(&crc.to_le_bytes());
    if hdr == IP6 {
        let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
        src.copy_from_slice(&frame[ETH + 8..ETH + 24]);
        dst.copy_from_slice(&frame[ETH + 24..ETH + 40]);
        frame[ETH + IP6 + 6..ETH + IP6 + 8].fill(0);
        let sum = udp6_checksum(&src, &dst, &frame[ETH + IP6..]);
        frame[ETH + IP6 + 6..ETH + IP6 + 8].copy_from_slice(&sum.to_be_bytes());
    }
}

/// Whether `frame` is IPv4 or IPv6 / UDP to the RoCEv2 port (the NIC hands such frames to the
/// RDMA function rather than the netdev).
pub fn is_roce_v2(frame: &[u8]) -> bool {
    !matches!(locate(frame), Err(PacketError::NotRoce))
}

/// Parses a UD packet, checking lengths, pad and ICRC.
pub fn parse_ud(frame: &[u8]) -> Result<UdPacket, PacketError> {
    let p = parse(frame)?;
    let Some((qkey, src_qp)) = p.deth else {
        return Err(PacketError::UnsupportedOpcode(p.opcode));
    };
    Ok(UdPacket {
        dest_qp: p.dest_qp,
        src_qp,
        qkey,
        imm: p.imm,
        smac: p.smac,
        network: p.network,
        payload: p.payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> UdAddress {
        UdAddress {
            dmac: [2, 0, 0, 0, 0, 0xb],
            smac: [2, 0, 0, 0, 0, 0xa],
            src_gid: mapped([10, 77, 0, 1]),
            dst_gid: mapped([10, 77, 0, 2]),
            tclass: 0,
            hop_limit: 64,
            flow_label: 0,
        }
    }

    fn mapped(ip: [u8; 4]) -> [u8; 16] {
        let mut g = [0u8; 16];
        g[10..12].copy_from_slice(&[0xff, 0xff]);
        g[12..].copy_from_slice(&ip);
        g
    }

    #[test]
    fn ud_packets_round_trip_with_pad_imm_and_icrc() {
        for len in [0usize, 1, 3, 4, 1000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = build_ud(
                &addr(),
                0x12,
                0x34,
                0x1111_2222,
                Some(0xdead_beef),
                7,
                &payload,
            );
            assert!(is_roce_v2(&f));
            let p = parse_ud(&f).unwrap();
            assert_eq!(p.payload, payload);
            assert_eq!((p.dest_qp, p.src_qp, p.qkey), (0x12, 0x34, 0x1111_2222));
            assert_eq!(p.imm, Some(0xdead_beef));
            assert_eq!(p.smac, [2, 0, 0, 0, 0, 0xa]);
            let NetworkHeader::V4(ip) = p.network else {
                panic!("IPv4 expected")
            };
            assert_eq!(ip_checksum(&ip), 0, "IPv4 header checksum");
        }
    }

    #[test]
    fn corrupted_packets_are_refused() {
        let f = build_ud(&addr(), 1, 1, 0x8001_0000, None, 0, b"hello");
        let mut bad = f.clone();
        let last = bad.len() - 6;
        bad[last] ^= 1;
        assert_eq!(parse_ud(&bad), Err(PacketError::BadIcrc));
        assert_eq!(parse_ud(&f[..40]), Err(PacketError::NotRoce));
        assert_eq!(parse_ud(&f[..50]), Err(PacketError::Malformed));
        // The variant fields (TTL, TOS) do not enter the ICRC.
        let mut ttl = f.clone();
        ttl[ETH + 8] = 3;
        assert!(parse_ud(&ttl).is_ok());
    }

    #[test]
    fn ipv6_gids_make_ipv6_packets_with_their_own_icrc_masks_and_udp_checksum() {
        let mut a = addr();
        a.src_gid = [
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe, 0, 0, 0x0a,
        ];
        a.dst_gid = [
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe, 0, 0, 0x0b,
        ];
        a.tclass = 0x20;
        a.flow_label = 0x12345;
        assert!(a.same_family());
        let f = build_ud(&a, 0x12, 0x34, 0x1111, None, 9, b"payload!");
        assert_eq!(f[12..14], [0x86, 0xdd]);
        assert!(is_roce_v2(&f));
        let p = parse_ud(&f).unwrap();
        assert_eq!(p.payload, b"payload!");
        let NetworkHeader::V6(ip) = p.network else {
            panic!("IPv6 expected")
        };
        assert_eq!(ip[8..24], a.src_gid);
        assert_eq!(
            p.network.grh_area(),
            ip,
            "the GRH area holds the IPv6 header"
        );
        // The UDP checksum verifies (a sum over pseudo-header and datagram of all ones).
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&a.src_gid);
        pseudo.extend_from_slice(&a.dst_gid);
        pseudo.extend_from_slice(&((f.len() - ETH - IP6) as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 17]);
        pseudo.extend_from_slice(&f[ETH + IP6..]);
        assert_eq!(ip_checksum(&pseudo), 0);
        // Flow label and hop limit are outside the ICRC; AckReq is inside and the checksum
        // follows it.
        let mut g = f.clone();
        g[ETH + 7] = 1;
        g[ETH + 3] ^= 0x55;
        assert!(parse_ud(&g).is_ok());
        let mut r = build(
            &a,
            &Headers {
                opcode: opcode::SEND_ONLY,
                dest_qp: 2,
                ..Default::default()
            },
            b"x",
        );
        set_ack_req(&mut r);
        assert!(parse(&r).unwrap().ack_req);
        // Mixed families are refused by the caller's check.
        a.dst_gid = mapped([10, 77, 0, 2]);
        assert!(!a.same_family());
    }
}
