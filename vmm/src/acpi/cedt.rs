//! CEDT (CXL Early Discovery Table, CXL 2.0 §9.14.1): host bridges (CHBS) and fixed memory
//! windows (CFMWS).

use super::*;

/// CEDT revision (CXL 2.0 §9.14.1).
pub(super) const CEDT_REVISION: u8 = 1;
/// CEDT structure types and lengths (CXL 2.0 §9.14.1.2, §9.14.1.3).
pub(super) const CEDT_TYPE_CHBS: u8 = 0;
pub(super) const CEDT_CHBS_LEN: u16 = 0x20;
pub(super) const CEDT_TYPE_CFMWS: u8 = 1;
pub(super) const CEDT_CFMWS_LEN: usize = 0x24;
/// CHBS "CXL Version": 1 = CXL 2.0 host bridge, whose base is a CHBCR of 64 KiB.
pub(super) const CHBS_VERSION_CXL20: u32 = 1;

/// CFMWS "Encoded Number of Interleave Ways" (ENIW) for `ways` targets (CXL 2.0 §9.14.1.3;
/// 3/6/12-way from CXL 3.0).
pub(super) fn cfmws_eniw(ways: usize) -> Option<u8> {
    Some(match ways {
        1 => 0,
        2 => 1,
        4 => 2,
        8 => 3,
        16 => 4,
        3 => 8,
        6 => 9,
        12 => 10,
        _ => return None,
    })
}

/// CEDT (ACPI 6.5 §5.2.28, CXL 2.0 §9.14.1), revision 1:
///
/// ```text
/// CHBS  +0 type 0, +2 length 0x20, +4 UID, +8 CXL version (1 = 2.0), +0xC reserved,
///       +0x10 base (CHBCR), +0x18 length 0x10000
/// CFMWS +0 type 1, +2 length 0x24 + 4·ways, +8 base HPA, +0x10 window size,
///       +0x18 ENIW, +0x19 arithmetic (0 modulo), +0x1C HBIG (0 = 256 B), +0x20 restrictions,
///       +0x22 QTG id, +0x24 target UIDs
/// ```
/// The caller validated the configuration (ways, alignment, targets).
pub(super) fn build_cedt(cxl: &CxlConfig) -> Vec<u8> {
    let mut cedt = Sdt::new(
        *b"CEDT",
        HEADER_LEN as u32,
        CEDT_REVISION,
        OEM_ID,
        table_id(b"CEDT"),
        OEM_REVISION,
    );
    let mut body = Vec::new();
    for hb in &cxl.host_bridges {
        body.extend_from_slice(&[CEDT_TYPE_CHBS, 0]);
        body.extend_from_slice(&CEDT_CHBS_LEN.to_le_bytes());
        body.extend_from_slice(&hb.uid.to_le_bytes());
        body.extend_from_slice(&CHBS_VERSION_CXL20.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&hb.chbcr_base.to_le_bytes());
        body.extend_from_slice(&CXL_CHBCR_LEN.to_le_bytes());
    }
    for window in &cxl.windows {
        // Validated: at most 16 targets, so the length fits and the ENIW exists.
        let len = CEDT_CFMWS_LEN + 4 * window.targets.len();
        let eniw = cfmws_eniw(window.targets.len()).unwrap_or(0);
        body.extend_from_slice(&[CEDT_TYPE_CFMWS, 0]);
        body.extend_from_slice(&(len as u16).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&window.base.to_le_bytes());
        body.extend_from_slice(&window.size.to_le_bytes());
        // ENIW, interleave arithmetic (modulo), reserved.
        body.extend_from_slice(&[eniw, 0, 0, 0]);
        // HBIG: log2(granularity) - 8 (validated: 256 B – 16 KiB).
        let hbig = window.granularity.trailing_zeros().saturating_sub(8);
        body.extend_from_slice(&hbig.to_le_bytes());
        body.extend_from_slice(&window.restrictions.to_le_bytes());
        body.extend_from_slice(&window.qtg_id.to_le_bytes());
        for target in &window.targets {
            body.extend_from_slice(&target.to_le_bytes());
        }
    }
    cedt.append_slice(&body);
    cedt.as_slice().to_vec()
}
