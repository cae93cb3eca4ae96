//! Host-native cost of one VT-d translation through the remapping unit (issue 8 §6 goal:
//! IOTLB hit ≤ 20 ns, 4-level miss ≤ 200 ns): the miss path (the IOTLB invalidated globally
//! through the IOTLB registers before each translation, so every one is a full walk; the
//! context and PASID caches stay warm) and the IOTLB hit, for legacy 4-level second-stage
//! tables and for scalable-mode RID_PASID with 4-level first-stage tables (Linux's default DMA
//! domain) — `cargo bench -p iommu --bench translation`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use iommu::vtd::registers::{IOTLB_REGISTER_UNITS, VtdConfig, global, iotlb, offset};
use iommu::vtd::unit::RemappingUnit;
use iommu::{AddressType, DmaAccess, DmaRequest, NullMsiSink, RequesterId};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const IOVA: u64 = 0x1234_5000;

fn index(iova: u64, level: u32) -> u64 {
    (iova >> (12 + 9 * (level - 1))) & 0x1ff
}

/// A unit with translation on over tables for 00:03.0: legacy (second stage) or scalable
/// (first stage through RID_PASID 0).
fn unit(scalable: bool) -> RemappingUnit {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let put = |gpa: u64, v: u64| mem.write_obj(v, GuestAddress(gpa)).unwrap();
    let devfn = 3u64 << 3;
    let (root, ctx, l4, l3, l2, l1) = (0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000);
    let rtaddr = if scalable {
        let (dir, ptab) = (0x7000, 0x8000);
        put(root, ctx | 1);
        put(ctx + devfn * 32, dir | 1 | (1 << 3));
        put(dir, ptab | 1);
        put(ptab, 1 | (1 << 6));
        put(ptab + 8, 1);
        put(ptab + 16, l4);
        let f = 7; // P, R/W, U/S
        put(l4 + index(IOVA, 4) * 8, l3 | f);
        put(l3 + index(IOVA, 3) * 8, l2 | f);
        put(l2 + index(IOVA, 2) * 8, l1 | f);
        put(l1 + index(IOVA, 1) * 8, 0x30_0000 | f);
        root | (1 << 10)
    } else {
        put(root, ctx | 1);
        put(ctx + devfn * 16, l4 | 1);
        put(ctx + devfn * 16 + 8, 2 | (1 << 8));
        put(l4 + index(IOVA, 4) * 8, l3 | 3);
        put(l3 + index(IOVA, 3) * 8, l2 | 3);
        put(l2 + index(IOVA, 2) * 8, l1 | 3);
        put(l1 + index(IOVA, 1) * 8, 0x30_0000 | 3);
        root
    };
    let mut unit = RemappingUnit::new(
        VtdConfig::default(),
        GuestMemoryAtomic::new(mem),
        Arc::new(NullMsiSink),
    );
    unit.write(offset::RTADDR, &rtaddr.to_le_bytes());
    unit.write(offset::GCMD, &global::SRTP.to_le_bytes());
    unit.write(offset::GCMD, &global::TE.to_le_bytes());
    unit
}

fn bench(c: &mut Criterion) {
    let request = DmaRequest {
        requester_id: RequesterId::new(0, 3, 0),
        pasid: None,
        privileged: false,
        address: IOVA + 0x40,
        len: 64,
        access: DmaAccess::Read,
        address_type: AddressType::Untranslated,
    };
    let flush = (iotlb::IVT | (1 << iotlb::IIRG_SHIFT)).to_le_bytes();
    for (name, scalable) in [
        ("legacy_4level_second_stage", false),
        ("scalable_4level_first_stage", true),
    ] {
        let mut unit = unit(scalable);
        assert_eq!(unit.translate(&request).unwrap().gpa, 0x30_0040);
        c.bench_function(&format!("vtd_miss_{name}"), |b| {
            b.iter(|| {
                unit.write(IOTLB_REGISTER_UNITS * 16 + 8, &flush);
                unit.translate(black_box(&request))
            })
        });
        let misses = unit.counters().iotlb_misses;
        c.bench_function(&format!("vtd_iotlb_hit_{name}"), |b| {
            b.iter(|| unit.translate(black_box(&request)))
        });
        assert_eq!(unit.counters().iotlb_misses, misses, "hits only");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
