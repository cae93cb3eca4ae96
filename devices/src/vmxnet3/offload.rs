//! Transmit offloads the vmxnet3 driver asks of the device per packet (SOP descriptor's `om`,
//! `hlen`, `msscof`; `vmxnet3_tq_xmit()`): checksum insertion (CHECKSUM_PARTIAL), TCP
//! segmentation (TSO over IPv4 and IPv6) and VLAN tag insertion. A packet whose headers do not
//! parse as the offload needs is dropped and counted, never sent half-done.

/// Ethernet header length without a VLAN tag.
const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_CWR: u8 = 0x80;

/// Why a packet's offload could not be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffloadError {
    /// The checksum start or location lies outside the packet.
    BadChecksumOffsets,
    /// TSO on something that is not TCP over IPv4/IPv6 with the header length given.
    BadTsoHeaders,
    /// MSS of 0.
    ZeroMss,
    /// An offload mode this device does not offer (ENCAP needs version 4).
    UnsupportedMode,
}

/// Inserts an 802.1Q tag with `tci` after the MAC addresses.
pub fn insert_vlan_tag(frame: &mut Vec<u8>, tci: u16) {
    if frame.len() < 12 {
        return;
    }
    let mut tag = [0u8; 4];
    tag[..2].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
    tag[2..].copy_from_slice(&tci.to_be_bytes());
    frame.splice(12..12, tag);
}

/// The Internet checksum's running sum (RFC 1071) of `data`, added to `sum`.
fn sum_words(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// CHECKSUM_PARTIAL: sums `frame[start..]` (whose checksum field already holds the
/// pseudo-header sum the stack put there) and stores the complement at `at`.
pub fn insert_checksum(frame: &mut [u8], start: usize, at: usize) -> Result<(), OffloadError> {
    if start > frame.len() || at < start || at.checked_add(2).is_none_or(|e| e > frame.len()) {
        return Err(OffloadError::BadChecksumOffsets);
    }
    let sum = !fold(sum_words(0, &frame[start..]));
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Where the L3 header starts and which protocol it is.
fn l3(frame: &[u8]) -> Option<(usize, u16)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype == ETHERTYPE_VLAN {
        let inner = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        return Some((ETH_HLEN + 4, inner));
    }
    Some((ETH_HLEN, ethertype))
}

/// TCP segmentation: splits the payload after `hlen` header bytes into `mss`-byte segments,
/// each with its own IP length/ID/checksum and TCP sequence number, flags and checksum, and
/// hands each frame to `emit`. Returns the number of segments.
pub fn segment_tcp(
    frame: &[u8],
    hlen: usize,
    mss: usize,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    if mss == 0 {
        return Err(OffloadError::ZeroMss);
    }
    let bad = OffloadError::BadTsoHeaders;
    let (l3_off, ethertype) = l3(frame).ok_or(bad)?;
    let (l4_off, v4) = match ethertype {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(*frame.get(l3_off).ok_or(bad)? & 0x0f) * 4;
            if ihl < 20 || frame.get(l3_off + 9) != Some(&IPPROTO_TCP) {
                return Err(bad);
            }
            (l3_off + ihl, true)
        }
        ETHERTYPE_IPV6 => {
            // Extension headers are not followed: the stack only offloads plain TCP/IPv6.
            if frame.get(l3_off + 6) != Some(&IPPROTO_TCP) {
                return Err(bad);
            }
            (l3_off + 40, false)
        }
        _ => return Err(bad),
    };
    let tcp_hlen = usize::from(*frame.get(l4_off + 12).ok_or(bad)? >> 4) * 4;
    if tcp_hlen < 20 || l4_off + tcp_hlen != hlen || hlen > frame.len() {
        return Err(bad);
    }
    let header = &frame[..hlen];
    let payload = &frame[hlen..];
    let seq0 = u32::from_be_bytes(header[l4_off + 4..l4_off + 8].try_into().map_err(|_| bad)?);
    let ip_id0 = if v4 {
        u16::from_be_bytes([header[l3_off + 4], header[l3_off + 5]])
    } else {
        0
    };
    let flags0 = header[l4_off + 13];
    let count = payload.len().div_ceil(mss).max(1);
    let mut seg = Vec::with_capacity(hlen + mss);
    for (i, chunk) in payload
        .chunks(mss)
        .chain(
            // A TSO packet without payload still goes out once.
            std::iter::once(&[][..]).filter(|_| payload.is_empty()),
        )
        .enumerate()
    {
        let last = i + 1 == count;
        seg.clear();
        seg.extend_from_slice(header);
        seg.extend_from_slice(chunk);
        let l4_len = tcp_hlen + chunk.len();
        if v4 {
            let total = (seg.len() - l3_off) as u16;
            seg[l3_off + 2..l3_off + 4].copy_from_slice(&total.to_be_bytes());
            let id = ip_id0.wrapping_add(i as u16);
            seg[l3_off + 4..l3_off + 6].copy_from_slice(&id.to_be_bytes());
            seg[l3_off + 10..l3_off + 12].fill(0);
            let ihl = l4_off - l3_off;
            let csum = !fold(sum_words(0, &seg[l3_off..l3_off + ihl]));
            seg[l3_off + 10..l3_off + 12].copy_from_slice(&csum.to_be_bytes());
        } else {
            let plen = (seg.len() - l3_off - 40) as u16;
            seg[l3_off + 4..l3_off + 6].copy_from_slice(&plen.to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[l4_off + 4..l4_off + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if !last {
            flags &= !(TCP_FLAG_FIN | TCP_FLAG_PSH);
        }
        if i > 0 {
            flags &= !TCP_FLAG_CWR;
        }
        seg[l4_off + 13] = flags;
        // TCP checksum over the pseudo header and the segment.
        seg[l4_off + 16..l4_off + 18].fill(0);
        let mut sum = if v4 {
            let s = sum_words(0, &seg[l3_off + 12..l3_off + 20]);
            sum_words(s, &[0, IPPROTO_TCP, (l4_len >> 8) as u8, l4_len as u8])
        } else {
            let s = sum_words(0, &seg[l3_off + 8..l3_off + 40]);
            let len = (l4_len as u32).to_be_bytes();
            sum_words(s, &[len[0], len[1], len[2], len[3], 0, 0, 0, IPPROTO_TCP])
        };
        sum = sum_words(sum, &seg[l4_off..]);
        let csum = !fold(sum);
        seg[l4_off + 16..l4_off + 18].copy_from_slice(&csum.to_be_bytes());
        emit(&seg);
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verifies an IPv4 TCP frame's IP and TCP checksums from scratch.
    fn checksums_ok(frame: &[u8]) -> bool {
        let ip = &frame[14..34];
        if fold(sum_words(0, ip)) != 0xffff {
            return false;
        }
        let tcp = &frame[34..];
        let len = tcp.len();
        let s = sum_words(0, &frame[26..34]);
        let s = sum_words(s, &[0, IPPROTO_TCP, (len >> 8) as u8, len as u8]);
        fold(sum_words(s, tcp)) == 0xffff
    }

    fn tcp_frame(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 54 + payload];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
        f[18..20].copy_from_slice(&0x1234u16.to_be_bytes());
        f[22] = 64;
        f[23] = IPPROTO_TCP;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[38..42].copy_from_slice(&1000u32.to_be_bytes());
        f[46] = 5 << 4;
        f[47] = TCP_FLAG_PSH | TCP_FLAG_FIN | 0x10;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f
    }

    #[test]
    fn tso_splits_at_mss_with_correct_headers_and_checksums() {
        let frame = tcp_frame(3000);
        let mut segs = Vec::new();
        let n = segment_tcp(&frame, 54, 1448, |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(n, 3);
        assert_eq!(segs.len(), 3);
        let mut payload = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(checksums_ok(s), "segment {i}");
            let seq = u32::from_be_bytes(s[38..42].try_into().unwrap());
            assert_eq!(seq, 1000 + (i as u32) * 1448);
            let id = u16::from_be_bytes([s[18], s[19]]);
            assert_eq!(id, 0x1234 + i as u16);
            let total = u16::from_be_bytes([s[16], s[17]]) as usize;
            assert_eq!(total, s.len() - 14);
            let last = i == 2;
            assert_eq!(s[47] & (TCP_FLAG_FIN | TCP_FLAG_PSH) != 0, last);
            payload.extend_from_slice(&s[54..]);
        }
        assert_eq!(payload, frame[54..]);
    }

    #[test]
    fn checksum_offload_matches_a_full_sum() {
        let mut frame = tcp_frame(101);
        // The stack leaves the pseudo-header sum (not complemented) in the field.
        let len = frame.len() - 34;
        let pseudo = fold(sum_words(
            sum_words(0, &frame[26..34]),
            &[0, IPPROTO_TCP, (len >> 8) as u8, len as u8],
        ));
        frame[50..52].copy_from_slice(&pseudo.to_be_bytes());
        let ip_csum = !fold(sum_words(0, &frame[14..34]));
        frame[24..26].copy_from_slice(&ip_csum.to_be_bytes());
        insert_checksum(&mut frame, 34, 50).unwrap();
        assert!(checksums_ok(&frame));
    }

    #[test]
    fn malformed_offloads_are_refused() {
        let frame = tcp_frame(10);
        assert_eq!(
            segment_tcp(&frame, 40, 100, |_| ()),
            Err(OffloadError::BadTsoHeaders)
        );
        assert_eq!(
            segment_tcp(&frame, 54, 0, |_| ()),
            Err(OffloadError::ZeroMss)
        );
        assert_eq!(
            segment_tcp(&frame[..20], 54, 10, |_| ()),
            Err(OffloadError::BadTsoHeaders)
        );
        let mut f = frame.clone();
        let last = f.len() - 1;
        assert_eq!(
            insert_checksum(&mut f, 34, last),
            Err(OffloadError::BadChecksumOffsets)
        );
        assert_eq!(
            insert_checksum(&mut f, 100, 10),
            Err(OffloadError::BadChecksumOffsets)
        );
    }

    #[test]
    fn vlan_tag_goes_after_the_addresses() {
        let mut f = tcp_frame(0);
        insert_vlan_tag(&mut f, 0x2005);
        assert_eq!(&f[12..18], &[0x81, 0x00, 0x20, 0x05, 0x08, 0x00]);
    }
}
