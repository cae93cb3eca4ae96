//! HMAT (Heterogeneous Memory Attribute Table, §5.2.28, revision 2): latency and bandwidth of
//! RAM and of CXL memory as seen from the CPUs.

use super::*;

/// HMAT revision 2 (ACPI 6.3 and later, §5.2.28): latencies are in picoseconds, and the Memory
/// Proximity Domain Attributes structure carries no address range.
pub(super) const HMAT_REVISION: u8 = 2;
/// HMAT header: the common table header, then 4 reserved bytes (§5.2.28).
pub(super) const HMAT_HEADER_LEN: usize = HEADER_LEN + 4;
/// Memory Proximity Domain Attributes structure (§5.2.28.3).
pub(super) const HMAT_TYPE_PROXIMITY_DOMAIN: u16 = 0;
pub(super) const HMAT_PROXIMITY_DOMAIN_LEN: u32 = 40;
/// Its flag "Initiator Proximity Domain Valid": the memory is attached to the initiator in that
/// domain (Linux then reports that domain as the memory's local initiator).
pub(super) const HMAT_INITIATOR_DOMAIN_VALID: u16 = 1 << 0;
/// System Locality Latency and Bandwidth Information structure (§5.2.28.4): this
/// fixed part, then the initiator and target domain lists (4 bytes each) and the 2-byte entries
/// (row = initiator, column = target).
pub(super) const HMAT_TYPE_LOCALITY: u16 = 1;
pub(super) const HMAT_LOCALITY_FIXED_LEN: usize = 32;
/// Its flags: memory hierarchy 0 = the memory itself (not a memory-side cache); no access
/// attributes (minimum transfer size, non-sequential transfers).
pub(super) const HMAT_HIERARCHY_MEMORY: u8 = 0;
/// Its data types ("Data Type", §5.2.28.4).
pub(super) const HMAT_READ_LATENCY: u8 = 1;
pub(super) const HMAT_WRITE_LATENCY: u8 = 2;
pub(super) const HMAT_READ_BANDWIDTH: u8 = 4;
pub(super) const HMAT_WRITE_BANDWIDTH: u8 = 5;
/// Entry base units: in revision 2 a latency is `entry × base` picoseconds and a bandwidth
/// `entry × base` MB/s. With these bases the entries are nanoseconds and MB/s, which is what Linux
/// reports (drivers/acpi/numa/hmat.c `hmat_normalize` rounds latencies up to nanoseconds).
pub(super) const HMAT_LATENCY_BASE_UNIT_PS: u64 = 1000;
pub(super) const HMAT_BANDWIDTH_BASE_UNIT_MBPS: u64 = 1;

/// Performance the HMAT states for the CPUs (proximity domain 0) reaching each memory. These are
/// plausible figures for the hardware the machine models, not measurements: in the VM both kinds
/// of memory are host RAM behind KVM memory slots.
///
/// RAM (domain 0): DRAM on the CPUs' own memory controller, ~100 ns idle load-to-use latency
/// and ~20 GB/s (about a DDR4-3200 channel's sustained rate).
pub(super) const DRAM_LATENCY_NS: u16 = 100;
pub(super) const DRAM_BANDWIDTH_MBPS: u16 = 20_000;
/// CXL windows (their own domains): a CXL 2.0 Type 3 memory expander on an x8 link (32 GT/s,
/// 32 GB/s raw per direction), ~250 ns (the DRAM access plus the CXL root port, link and device
/// controller round trip) and ~16 GB/s deliverable after flit and protocol overhead.
/// The same figures each device reports in its CDAT (DSLBIS), so both views of the memory agree.
pub(super) const CXL_X8_LATENCY_NS: u16 = devices::cxl::cdat::LATENCY_NS;
pub(super) const CXL_X8_BANDWIDTH_MBPS: u16 = devices::cxl::cdat::BANDWIDTH_MBPS;
/// CXL host bridges (SRAT generic ports): the CPUs reach the host bridge as fast as their own
/// memory controller; the link and the device (their CDAT) add the rest of the CXL figures.
pub(super) const GENERIC_PORT_LATENCY_NS: u16 = DRAM_LATENCY_NS;
pub(super) const GENERIC_PORT_BANDWIDTH_MBPS: u16 = DRAM_BANDWIDTH_MBPS;
// Entries 0 ("not provided") and 0xFFFF ("unreachable") mean something else.
const _: () = assert!(DRAM_LATENCY_NS != 0 && DRAM_LATENCY_NS != u16::MAX);
const _: () = assert!(DRAM_BANDWIDTH_MBPS != 0 && DRAM_BANDWIDTH_MBPS != u16::MAX);
const _: () = assert!(CXL_X8_LATENCY_NS != 0 && CXL_X8_LATENCY_NS != u16::MAX);
const _: () = assert!(CXL_X8_BANDWIDTH_MBPS != 0 && CXL_X8_BANDWIDTH_MBPS != u16::MAX);

/// HMAT (§5.2.28), revision 2: how fast the CPUs (all on proximity domain 0) reach RAM (domain 0,
/// [`DRAM_LATENCY_NS`], [`DRAM_BANDWIDTH_MBPS`]) and each CXL window domain in `cxl_domains`
/// ([`CXL_X8_LATENCY_NS`], [`CXL_X8_BANDWIDTH_MBPS`]):
///
/// ```text
/// header  36-byte table header, +36 reserved (4)
/// type 0  Memory Proximity Domain Attributes (§5.2.28.3), one per target domain (0, then CXL):
///         +0 type 0, +2 reserved, +4 length 40, +8 flags (bit 0: initiator domain valid),
///         +0xA reserved, +0xC initiator domain 0, +0x10 memory domain, +0x14 reserved (4 + 16)
/// type 1  System Locality Latency and Bandwidth Information (§5.2.28.4), one per data type
///         (read latency, write latency, read bandwidth, write bandwidth):
///         +0 type 1, +2 reserved, +4 length 32 + 4·I + 4·T + 2·I·T, +8 flags (0: memory),
///         +9 data type, +0xA minimum transfer size 0, +0xB reserved, +0xC initiators I = 1,
///         +0x10 targets T, +0x14 reserved, +0x18 entry base unit (ps or MB/s),
///         +0x20 initiator domains {0}, target domains {0, CXL...}, entries [initiator][target]
/// ```
/// Linux (drivers/acpi/numa/hmat.c) needs every memory domain here to be in the SRAT, takes
/// the initiator of a type 0 structure as the memory's local initiator, and shows the type 1
/// values under `/sys/devices/system/node/nodeN/access{0,1}/initiators/` once the node has
/// memory online.
///
/// Each domain of `generic_ports` (the CXL host bridges' SRAT Generic Port domains) is a further
/// target of the type 1 structures only — no type 0 structure, which would hide its figures from
/// Linux — with [`GENERIC_PORT_LATENCY_NS`] and [`GENERIC_PORT_BANDWIDTH_MBPS`]: the CPUs'
/// side of the path to the CXL devices, which Linux combines with each device's CDAT.
pub(super) fn build_hmat(cxl_domains: &[u32], generic_ports: &[u32]) -> Vec<u8> {
    let mut hmat = Sdt::new(
        *b"HMAT",
        HMAT_HEADER_LEN as u32,
        HMAT_REVISION,
        OEM_ID,
        table_id(b"HMAT"),
        OEM_REVISION,
    );
    // (domain, latency entry, bandwidth entry) in the entry base units.
    let targets: Vec<(u32, u16, u16)> = std::iter::once((0, DRAM_LATENCY_NS, DRAM_BANDWIDTH_MBPS))
        .chain(
            cxl_domains
                .iter()
                .map(|&d| (d, CXL_X8_LATENCY_NS, CXL_X8_BANDWIDTH_MBPS)),
        )
        .collect();
    let initiator: u32 = 0;

    let mut body = Vec::new();
    for &(domain, _, _) in &targets {
        body.extend_from_slice(&HMAT_TYPE_PROXIMITY_DOMAIN.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&HMAT_PROXIMITY_DOMAIN_LEN.to_le_bytes());
        body.extend_from_slice(&HMAT_INITIATOR_DOMAIN_VALID.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&initiator.to_le_bytes());
        body.extend_from_slice(&domain.to_le_bytes());
        body.extend_from_slice(&[0; 20]);
    }
    // The generic ports are locality targets only (after the memory, which has its type 0).
    let targets: Vec<(u32, u16, u16)> = targets
        .into_iter()
        .chain(
            generic_ports
                .iter()
                .map(|&d| (d, GENERIC_PORT_LATENCY_NS, GENERIC_PORT_BANDWIDTH_MBPS)),
        )
        .collect();
    let locality_len = HMAT_LOCALITY_FIXED_LEN + 4 + targets.len() * (4 + 2);
    // (data type, entry base unit, whether the entries are latencies).
    let localities = [
        (HMAT_READ_LATENCY, HMAT_LATENCY_BASE_UNIT_PS, true),
        (HMAT_WRITE_LATENCY, HMAT_LATENCY_BASE_UNIT_PS, true),
        (HMAT_READ_BANDWIDTH, HMAT_BANDWIDTH_BASE_UNIT_MBPS, false),
        (HMAT_WRITE_BANDWIDTH, HMAT_BANDWIDTH_BASE_UNIT_MBPS, false),
    ];
    for (data_type, base_unit, is_latency) in localities {
        body.extend_from_slice(&HMAT_TYPE_LOCALITY.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        // A table too large for the ACPI area is refused when placed, so a length that does not
        // fit 32 bits never reaches the guest.
        body.extend_from_slice(&(locality_len as u32).to_le_bytes());
        body.extend_from_slice(&[HMAT_HIERARCHY_MEMORY, data_type, 0, 0]);
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&(targets.len() as u32).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&base_unit.to_le_bytes());
        body.extend_from_slice(&initiator.to_le_bytes());
        for &(domain, _, _) in &targets {
            body.extend_from_slice(&domain.to_le_bytes());
        }
        for &(_, latency, bandwidth) in &targets {
            let entry = if is_latency { latency } else { bandwidth };
            body.extend_from_slice(&entry.to_le_bytes());
        }
    }
    hmat.append_slice(&body);
    hmat.as_slice().to_vec()
}
