//! Page requests (VT-d 4.1 chapter 7.5 "Handling of Page Requests"; PCIe Base Spec r6.0
//! §10.4): the 32-byte page request descriptor the unit writes into the page request queue
//! (7.5.1), and the page group response descriptor (type 9) software answers with through the
//! invalidation queue (6.5.2).
//!
//! Layouts (Linux's `struct page_req_dsc` in `drivers/iommu/intel/prq.c` and the `QI_PGRP_*`
//! macros in `iommu.h` read the same bits):
//! - request qw0: Type 7:0 = 1, PASID Present 8, Private Data Present 9, Requester ID 31:16,
//!   PASID 51:32, Execute Requested 52, Privileged Mode Requested 53;
//!   qw1: Read 0, Write 1, Last Page In Group 2, Page Request Group Index 11:3, address 63:12;
//!   qw2/qw3: private data (unused, 0).
//! - response qw0: Type 3:0 = 9, PASID Present 4, Response Code 15:12, Requester ID 31:16,
//!   PASID 51:32; qw1: Page Request Group Index 11:3 (LPIG at 2 is ignored here).
//!
//! Response codes: 0 Success, 1 Invalid Request, 0xF Response Failure; Linux may send other
//! values for failure, and every value other than 0 and 1 is treated as Response Failure.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{PageRequest, PageResponse, PageResponseCode, Pasid, RequesterId};

/// Size of a page request descriptor.
pub const DESCRIPTOR_SIZE: u64 = 32;

/// One page request descriptor, as the unit writes it into the queue.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct PageRequestDescriptor {
    /// The four quadwords.
    pub qw: [u64; 4],
}

impl PageRequestDescriptor {
    /// Encodes `request`.
    pub fn new(request: &PageRequest) -> Self {
        let mut qw0 = 1u64; // Type: page request
        if let Some(pasid) = request.pasid {
            qw0 |= 1 << 8;
            qw0 |= u64::from(pasid.value() & 0xf_ffff) << 32;
        }
        qw0 |= u64::from(request.requester_id.0) << 16;
        if request.execute {
            qw0 |= 1 << 52;
        }
        if request.privileged {
            qw0 |= 1 << 53;
        }
        let mut qw1 = request.address & !0xfff;
        if request.read {
            qw1 |= 1;
        }
        if request.write {
            qw1 |= 1 << 1;
        }
        if request.last_in_group {
            qw1 |= 1 << 2;
        }
        qw1 |= u64::from(request.group_index & 0x1ff) << 3;
        PageRequestDescriptor {
            qw: [qw0, qw1, 0, 0],
        }
    }
}

/// A decoded page group response descriptor: to whom, and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupResponse {
    /// The function the response goes to.
    pub requester_id: RequesterId,
    /// The response as the function sees it.
    pub response: PageResponse,
    /// The raw Response Code (for counters and logs).
    pub raw_code: u8,
}

/// Decodes a page group response descriptor (`qw0`, `qw1`); the caller has checked the type.
/// Reserved fields are ignored; the response code maps as the spec says (0, 1, else failure).
pub fn decode_group_response(qw0: u64, qw1: u64) -> GroupResponse {
    let raw_code = ((qw0 >> 12) & 0xf) as u8;
    let code = match raw_code {
        0 => PageResponseCode::Success,
        1 => PageResponseCode::InvalidRequest,
        _ => PageResponseCode::ResponseFailure,
    };
    let pasid = if qw0 & (1 << 4) != 0 {
        Pasid::new(((qw0 >> 32) & 0xf_ffff) as u32)
    } else {
        None
    };
    GroupResponse {
        requester_id: RequesterId((qw0 >> 16) as u16),
        response: PageResponse {
            pasid,
            group_index: ((qw1 >> 3) & 0x1ff) as u16,
            code,
        },
        raw_code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_descriptor_has_linux_layout() {
        let d = PageRequestDescriptor::new(&PageRequest {
            requester_id: RequesterId::new(0, 0x12, 0),
            pasid: Pasid::new(0x12345),
            address: 0x7fff_1234_5678,
            read: true,
            write: true,
            execute: false,
            privileged: false,
            group_index: 0x1a5,
            last_in_group: true,
        });
        assert_eq!(d.qw[0] & 0xff, 1, "type");
        assert_eq!((d.qw[0] >> 8) & 1, 1, "PASID present");
        assert_eq!((d.qw[0] >> 16) & 0xffff, 0x90, "RID 00:12.0");
        assert_eq!((d.qw[0] >> 32) & 0xf_ffff, 0x12345);
        assert_eq!(d.qw[1] & 7, 0b111, "read, write, LPIG");
        assert_eq!((d.qw[1] >> 3) & 0x1ff, 0x1a5);
        assert_eq!(d.qw[1] >> 12, 0x7fff_1234_5678 >> 12);
        assert_eq!(d.as_bytes().len() as u64, DESCRIPTOR_SIZE);
    }

    #[test]
    fn response_codes_other_than_success_and_invalid_are_failure() {
        let qw0 = 9 | (1 << 4) | (0x90 << 16) | (7u64 << 32);
        for (code, want) in [
            (0u64, PageResponseCode::Success),
            (1, PageResponseCode::InvalidRequest),
            (2, PageResponseCode::ResponseFailure),
            (0xf, PageResponseCode::ResponseFailure),
        ] {
            let r = decode_group_response(qw0 | (code << 12), 0x1a5 << 3);
            assert_eq!(r.response.code, want);
            assert_eq!(r.response.group_index, 0x1a5);
            assert_eq!(r.response.pasid, Pasid::new(7));
            assert_eq!(r.requester_id, RequesterId(0x90));
        }
        assert_eq!(decode_group_response(9, 0).response.pasid, None);
    }
}
