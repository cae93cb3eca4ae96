//! Host-native I/OAT copy throughput, without an IOMMU and through the VT-d unit (issue 8 §6
//! goal: with the IOMMU ≥ 0.8× without) — `cargo bench -p devices --bench ioat_copy`.
//!
//! One iteration is what `ioatdma` issues for a 1 MiB copy: 256 linked 4 KiB copy descriptors
//! (XFERCAP) rung with one DMACOUNT write, a completion writeback on the last. With the IOMMU
//! the function's DMA space goes through a `RemappingUnit` in legacy mode over 4-level
//! second-stage tables mapping the buffers with 4 KiB pages, as the guest's DMA API maps them.
//! After criterion's own report the bench prints the throughput ratio, measured back to back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use devices::ioat::descriptor::{DmaDescriptor, ctl};
use devices::ioat::registers::channel as ch;
use devices::ioat::{IoatConfig, IoatFunction};
use devices::pci::PciDevice;
use iommu::vtd::registers::{VtdConfig, global, offset};
use iommu::vtd::unit::{RemappingUnit, VtdTranslator};
use iommu::{DmaSpace, NullMsiSink, RequesterId};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use zerocopy::IntoBytes;

const MEM: u64 = 16 << 20;
const RING: u64 = 0x10_0000;
const COMPLETION: u64 = 0x11_0000;
const SRC: u64 = 0x20_0000;
const DST: u64 = 0x40_0000;
const DESCRIPTORS: u64 = 256;
const CHUNK: u64 = 4096;
const DEVICE: u8 = 0x10;

/// Legacy-mode tables for 00:10.0 mapping IOVA = GPA for the first 8 MiB with 4 KiB pages.
fn vtd_unit(mem: &GuestMemoryMmap) -> RemappingUnit {
    let put = |gpa: u64, v: u64| mem.write_obj(v, GuestAddress(gpa)).unwrap();
    let (root, context, l4, l3, l2, l1_base) = (0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x8000);
    let devfn = u64::from(DEVICE) << 3;
    put(root, context | 1);
    put(context + devfn * 16, l4 | 1);
    put(context + devfn * 16 + 8, 2 | (1 << 8)); // 4-level, domain 1
    put(l4, l3 | 3);
    put(l3, l2 | 3);
    for table in 0..4u64 {
        let l1 = l1_base + table * 0x1000;
        put(l2 + table * 8, l1 | 3);
        for page in 0..512u64 {
            let gpa = (table * 512 + page) * 4096;
            put(l1 + page * 8, gpa | 3);
        }
    }
    let mut unit = RemappingUnit::new(
        VtdConfig {
            scalable: false,
            ..VtdConfig::default()
        },
        GuestMemoryAtomic::new(mem.clone()),
        Arc::new(NullMsiSink),
    );
    unit.write(offset::RTADDR, &root.to_le_bytes());
    unit.write(offset::GCMD, &global::SRTP.to_le_bytes());
    unit.write(offset::GCMD, &global::TE.to_le_bytes());
    unit
}

/// A started channel over a ring of 1 MiB worth of copies; returns the function and the
/// doorbell closure's state (the running DMACOUNT).
fn engine(with_iommu: bool) -> (IoatFunction, GuestMemoryMmap) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let rid = RequesterId::new(0, DEVICE, 0);
    let dma = if with_iommu {
        let unit = Arc::new(Mutex::new(vtd_unit(&mem)));
        DmaSpace::with_translator(
            rid,
            GuestMemoryAtomic::new(mem.clone()),
            Arc::new(VtdTranslator::new(unit)),
        )
    } else {
        DmaSpace::identity(rid, GuestMemoryAtomic::new(mem.clone()))
    };
    let mut f = IoatFunction::new(IoatConfig::default(), dma, Arc::new(NullMsiSink)).unwrap();
    f.config_write(0x04, &0x0006u16.to_le_bytes()); // memory + bus master
    for i in 0..DESCRIPTORS {
        let last = i == DESCRIPTORS - 1;
        let d = DmaDescriptor {
            size: CHUNK as u32,
            ctl: if last { ctl::COMPL_WRITE } else { 0 },
            src_addr: SRC + i * CHUNK,
            dst_addr: DST + i * CHUNK,
            next: RING + ((i + 1) % DESCRIPTORS) * 64,
            ..Default::default()
        };
        mem.write_slice(d.as_bytes(), GuestAddress(RING + i * 64))
            .unwrap();
    }
    mem.write_slice(
        &vec![0x5a; (DESCRIPTORS * CHUNK) as usize],
        GuestAddress(SRC),
    )
    .unwrap();
    let base = ch::BLOCK;
    f.bar_write(0, base + ch::CHANCMD, &[ch::CHANCMD_RESET]);
    f.bar_write(0, base + ch::CHANCMP, &COMPLETION.to_le_bytes());
    f.bar_write(0, base + ch::CHAINADDR, &RING.to_le_bytes());
    (f, mem)
}

/// Rings one 1 MiB copy.
fn copy_1mib(f: &mut IoatFunction, count: &mut u16) {
    *count = count.wrapping_add(DESCRIPTORS as u16);
    f.bar_write(0, ch::BLOCK + ch::DMACOUNT, &count.to_le_bytes());
}

fn check(f: &mut IoatFunction, mem: &GuestMemoryMmap) {
    let mut sts = [0u8; 8];
    f.bar_read(0, ch::BLOCK + ch::CHANSTS, &mut sts);
    assert_eq!(u64::from_le_bytes(sts) & 7, ch::STATUS_DONE, "copy failed");
    let last: u8 = mem
        .read_obj(GuestAddress(DST + DESCRIPTORS * CHUNK - 1))
        .unwrap();
    assert_eq!(last, 0x5a);
}

fn rate(with_iommu: bool, run_for: Duration) -> f64 {
    let (mut f, mem) = engine(with_iommu);
    let mut count = 0u16;
    // Warm up (first touch of the fresh guest memory, the IOTLB's first walks) off the clock,
    // as criterion's own warm-up does for the figures above.
    for _ in 0..16 {
        copy_1mib(&mut f, &mut count);
    }
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < run_for {
        copy_1mib(&mut f, &mut count);
        bytes += DESCRIPTORS * CHUNK;
    }
    check(&mut f, &mem);
    bytes as f64 / start.elapsed().as_secs_f64()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("ioat_copy_1MiB_in_4KiB_descriptors");
    group.throughput(Throughput::Bytes(DESCRIPTORS * CHUNK));
    for (name, with_iommu) in [("no_iommu", false), ("vtd_legacy_4level", true)] {
        let (mut f, mem) = engine(with_iommu);
        let mut count = 0u16;
        copy_1mib(&mut f, &mut count);
        check(&mut f, &mem);
        group.bench_function(name, |b| b.iter(|| copy_1mib(&mut f, &mut count)));
    }
    group.finish();
    // Back-to-back, alternating, so machine load hits both alike.
    let (mut plain, mut vtd) = (0.0, 0.0);
    for _ in 0..3 {
        plain += rate(false, Duration::from_millis(500));
        vtd += rate(true, Duration::from_millis(500));
    }
    println!(
        "ioat copy throughput: no IOMMU {:.0} MB/s, through VT-d {:.0} MB/s, ratio {:.2} (goal >= 0.8)",
        plain / 3e6,
        vtd / 3e6,
        vtd / plain
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
