//! Tests of the ACPI tables: structure, checksums, what Linux parses, and the ACPICA checks
//! (iasl disassembly, acpiexec) run by `scripts/test.sh`.

use super::*;

/// FADT length for major version 6 (§5.2.9).
const FADT_LEN: usize = 276;

fn read_u64(bytes: &[u8], offset: usize) -> Option<u64> {
    let raw = bytes.get(offset..offset.checked_add(8)?)?;
    Some(u64::from_le_bytes(raw.try_into().ok()?))
}

impl AcpiTables {
    /// Finds a table by signature by walking RSDP → XSDT (and FADT → X_DSDT for
    /// `DSDT`), as a guest would. Returns its guest address and bytes; `None` if absent or
    /// malformed.
    fn find_table(&self, signature: &[u8; 4]) -> Option<(u64, &[u8])> {
        let rsdp = self.slice_at(self.rsdp_addr, RSDP_LEN)?;
        let xsdt_addr = read_u64(rsdp, 24)?;
        let xsdt = self.table_at(xsdt_addr)?;
        if signature == b"XSDT" {
            return Some((xsdt_addr, xsdt));
        }
        let entries = xsdt.get(HEADER_LEN..)?;
        for entry in entries.chunks_exact(8) {
            let addr = read_u64(entry, 0)?;
            let table = self.table_at(addr)?;
            if table.get(0..4)? == signature {
                return Some((addr, table));
            }
            if signature == b"DSDT" && table.get(0..4)? == b"FACP" {
                let dsdt_addr = read_u64(table, 140)?;
                return Some((dsdt_addr, self.table_at(dsdt_addr)?));
            }
        }
        None
    }

    fn slice_at(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let offset = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        self.bytes.get(offset..offset.checked_add(len)?)
    }

    /// A table at `addr`, sized by its header's length field.
    fn table_at(&self, addr: u64) -> Option<&[u8]> {
        let header = self.slice_at(addr, HEADER_LEN)?;
        let len = usize::try_from(read_u32(header, 4)?).ok()?;
        self.slice_at(addr, len)
    }
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    read_u32(bytes, offset).unwrap()
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    read_u64(bytes, offset).unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// 2 GiB guest like the VMM's: low RAM only.
fn config(cpus: u8) -> AcpiConfig {
    AcpiConfig::new(cpus, vec![(0, 2 << 30)])
}

fn tables(cpus: u8) -> AcpiTables {
    create_acpi_tables(&config(cpus)).unwrap()
}

/// The MADT's interrupt controller structures as (type, bytes).
fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
    let mut entries = Vec::new();
    let mut offset = HEADER_LEN + 8;
    while offset < madt.len() {
        let len = madt[offset + 1] as usize;
        assert!(len >= 2, "zero-length MADT entry");
        entries.push((madt[offset], &madt[offset..offset + len]));
        offset += len;
    }
    assert_eq!(offset, madt.len());
    entries
}

const ALL_SIGNATURES: [&[u8; 4]; 6] = [b"XSDT", b"FACP", b"DSDT", b"APIC", b"MCFG", b"SRAT"];

#[test]
fn every_table_checksums_to_zero_and_length_matches() {
    let t = tables(4);
    for sig in ALL_SIGNATURES {
        let (addr, table) = t
            .find_table(sig)
            .unwrap_or_else(|| panic!("{sig:?} missing"));
        assert_eq!(&table[0..4], sig);
        assert_eq!(u32_at(table, 4) as usize, table.len(), "{sig:?} length");
        assert_eq!(sum(table), 0, "{sig:?} checksum");
        assert_eq!(addr % TABLE_ALIGN as u64, 0, "{sig:?} alignment");
    }
}

#[test]
fn rsdp_is_first_with_both_checksums() {
    let t = tables(1);
    assert_eq!(t.base, layout::ACPI_START);
    assert_eq!(t.rsdp_addr, layout::ACPI_START);
    let rsdp = &t.bytes[..RSDP_LEN];
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "revision");
    assert_eq!(sum(&rsdp[..20]), 0, "v1 checksum over 20 bytes");
    assert_eq!(u32_at(rsdp, 20), 36, "length");
    assert_eq!(sum(&rsdp[..36]), 0, "extended checksum over 36 bytes");
    assert_eq!(u32_at(rsdp, 16), 0, "no RSDT");
    let xsdt_addr = u64_at(rsdp, 24);
    assert_eq!(t.find_table(b"XSDT").unwrap().0, xsdt_addr);
}

#[test]
fn xsdt_points_at_each_table() {
    let t = tables(2);
    let (_, xsdt) = t.find_table(b"XSDT").unwrap();
    let entries: Vec<u64> = xsdt[HEADER_LEN..]
        .chunks_exact(8)
        .map(|e| u64_at(e, 0))
        .collect();
    let expected: [&[u8; 4]; 4] = [b"FACP", b"APIC", b"MCFG", b"SRAT"];
    assert_eq!(entries.len(), expected.len());
    for (addr, sig) in entries.iter().zip(expected) {
        let offset = (addr - t.base) as usize;
        assert_eq!(&t.bytes[offset..offset + 4], sig);
        assert_eq!(t.find_table(sig).unwrap().0, *addr);
    }
    // Everything lies inside the image and the image inside the ACPI area.
    assert!(t.bytes.len() as u64 <= layout::ACPI_SIZE);
}

#[test]
fn madt_describes_cpus_ioapic_and_nmi() {
    let t = tables(8);
    let (_, madt) = t.find_table(b"APIC").unwrap();
    assert_eq!(u32_at(madt, 36), 0xfee0_0000, "local APIC address");
    assert_eq!(u32_at(madt, 40) & MADT_PCAT_COMPAT, MADT_PCAT_COMPAT);
    let entries = madt_entries(madt);

    let lapics: Vec<&[u8]> = entries
        .iter()
        .filter(|(ty, _)| *ty == 0)
        .map(|(_, e)| *e)
        .collect();
    assert_eq!(lapics.len(), 8);
    for (i, lapic) in lapics.iter().enumerate() {
        assert_eq!(lapic.len(), 8);
        assert_eq!(lapic[2] as usize, i, "processor UID");
        assert_eq!(lapic[3] as usize, i, "APIC ID");
        assert_eq!(u32_at(lapic, 4), 1, "enabled");
    }

    let ioapics: Vec<&[u8]> = entries
        .iter()
        .filter(|(ty, _)| *ty == 1)
        .map(|(_, e)| *e)
        .collect();
    assert_eq!(ioapics.len(), 1);
    assert_eq!(ioapics[0].len(), 12);
    assert_eq!(ioapics[0][2], 0, "IOAPIC ID");
    assert_eq!(u32_at(ioapics[0], 4), 0xfec0_0000);
    assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");

    let nmis: Vec<&[u8]> = entries
        .iter()
        .filter(|(ty, _)| *ty == 4)
        .map(|(_, e)| *e)
        .collect();
    assert_eq!(nmis, vec![&[4u8, 6, 0xff, 0, 0, 1][..]]);

    assert!(
        !entries.iter().any(|(ty, _)| *ty == 2),
        "no override by default"
    );
}

#[test]
fn madt_irq0_override_when_asked() {
    let mut cfg = config(1);
    cfg.irq0_override_gsi = Some(2);
    let t = create_acpi_tables(&cfg).unwrap();
    let (_, madt) = t.find_table(b"APIC").unwrap();
    let isos: Vec<(u8, &[u8])> = madt_entries(madt)
        .into_iter()
        .filter(|(ty, _)| *ty == 2)
        .collect();
    assert_eq!(isos.len(), 1);
    let iso = isos[0].1;
    assert_eq!(iso.len(), 10);
    assert_eq!((iso[2], iso[3]), (0, 0), "ISA bus, IRQ0");
    assert_eq!(u32_at(iso, 4), 2, "GSI");
    assert_eq!(u16_at(iso, 8), 0b0101, "edge, active high");
    assert_eq!(sum(madt), 0);

    cfg.irq0_override_gsi = Some(24);
    assert_eq!(create_acpi_tables(&cfg), Err(AcpiError::InvalidGsi(24)));
}

#[test]
fn mcfg_has_one_ecam_allocation() {
    let t = tables(1);
    let (_, mcfg) = t.find_table(b"MCFG").unwrap();
    assert_eq!(mcfg.len(), HEADER_LEN + 8 + 16);
    let entry = &mcfg[HEADER_LEN + 8..];
    assert_eq!(u64_at(entry, 0), 0xe000_0000);
    assert_eq!(u16_at(entry, 8), 0, "segment");
    assert_eq!((entry[10], entry[11]), (0, 255), "bus range");
}

#[test]
fn fadt_is_hw_reduced_with_reset_and_sleep_registers() {
    let t = tables(1);
    let (_, fadt) = t.find_table(b"FACP").unwrap();
    assert_eq!(fadt.len(), FADT_LEN);
    assert_eq!(fadt[8], 6, "major revision");
    assert_eq!(fadt[131], 5, "minor revision");

    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_ne!(flags & (1 << 4), 0, "PWR_BUTTON (no fixed button)");
    assert_ne!(flags & (1 << 5), 0, "SLP_BUTTON (no fixed button)");

    let iapc = u16_at(fadt, 109);
    assert_eq!(iapc & (1 << 1), 0, "no 8042");
    assert_ne!(iapc & (1 << 0), 0, "legacy devices");
    assert_ne!(iapc & (1 << 2), 0, "VGA not present");
    assert_eq!(iapc & (1 << 3), 0, "MSI supported");
    assert_ne!(iapc & (1 << 4), 0, "PCIe ASPM controls");
    assert_ne!(iapc & (1 << 5), 0, "CMOS RTC not present");

    // GAS: space 1 (system I/O), 8 bits wide, offset 0, byte access, address.
    let gas = |offset: usize| (&fadt[offset..offset + 4], u64_at(fadt, offset + 4));
    assert_eq!(gas(116), (&[1u8, 8, 0, 1][..], 0x3c2), "RESET_REG");
    assert_eq!(fadt[128], 0x01, "RESET_VALUE");
    assert_eq!(gas(244), (&[1u8, 8, 0, 1][..], 0x3c0), "SLEEP_CONTROL_REG");
    assert_eq!(gas(256), (&[1u8, 8, 0, 1][..], 0x3c1), "SLEEP_STATUS_REG");

    assert_eq!(u32_at(fadt, 36), 0, "no FACS");
    assert_eq!(u64_at(fadt, 132), 0, "no X_FACS");
    assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT unused");
    let (dsdt_addr, dsdt) = t.find_table(b"DSDT").unwrap();
    assert_eq!(u64_at(fadt, 140), dsdt_addr, "X_DSDT");
    assert_eq!(&dsdt[0..4], b"DSDT");
}

#[test]
fn fadt_cmos_rtc_flag_follows_config() {
    let mut cfg = config(1);
    cfg.cmos_rtc = true;
    let t = create_acpi_tables(&cfg).unwrap();
    let (_, fadt) = t.find_table(b"FACP").unwrap();
    assert_eq!(u16_at(fadt, 109) & (1 << 5), 0);
}

#[test]
fn dsdt_contains_the_devices() {
    let t = tables(3);
    let (_, dsdt) = t.find_table(b"DSDT").unwrap();
    assert_eq!(dsdt[8], DSDT_REVISION);
    // EisaId encodings (DWordPrefix + compressed id).
    for id in [
        [0x41u8, 0xd0, 0x0a, 0x08], // PNP0A08
        [0x41, 0xd0, 0x0a, 0x03],   // PNP0A03
        [0x41, 0xd0, 0x0c, 0x02],   // PNP0C02
        [0x41, 0xd0, 0x05, 0x01],   // PNP0501
    ] {
        let mut needle = vec![0x0c];
        needle.extend_from_slice(&id);
        assert!(contains(dsdt, &needle), "EisaId {id:02x?}");
    }
    for name in [
        &b"\\_SB_"[..],
        b"PCI0",
        b"MRES",
        b"COM1",
        b"COM2",
        b"COM3",
        b"_SEG",
        b"_BBN",
        b"_OSC",
        b"C000",
        b"C002",
        b"ACPI0007\0",
    ] {
        assert!(contains(dsdt, name), "{}", String::from_utf8_lossy(name));
    }
    assert!(!contains(dsdt, b"C003"));
    assert!(!contains(dsdt, b"_ADR"));
    // Name (_S5_, Package (4) { 5, 0, 0, 0 }).
    assert!(contains(
        dsdt,
        &[
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0x00, 0x00, 0x00
        ]
    ));
    // Memory32Fixed (ReadWrite, 0xE0000000, 0x10000000).
    assert!(contains(
        dsdt,
        &[
            0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xe0, 0x00, 0x00, 0x00, 0x10
        ]
    ));
    // COM1: IO (Decode16, 0x3F8, 0x3F8, 1, 8) then IRQ (Edge, ActiveHigh, Shared) {4}.
    assert!(contains(
        dsdt,
        &[
            0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, 0x23, 0x10, 0x00, 0x11
        ]
    ));
    // COM2: IRQNoFlags {3}.
    assert!(contains(
        dsdt,
        &[
            0x47, 0x01, 0xf8, 0x02, 0xf8, 0x02, 0x01, 0x08, 0x22, 0x08, 0x00
        ]
    ));
}

#[test]
fn dsdt_host_bridge_windows() {
    let t = tables(1);
    let (_, dsdt) = t.find_table(b"DSDT").unwrap();
    // WordBusNumber 0..255: type 2, min 0, max 255, length 256.
    let mut bus = vec![
        0x88, 0x0d, 0x00, 0x02, 0x0c, 0x00, 0, 0, 0, 0, 0xff, 0, 0, 0,
    ];
    bus.extend_from_slice(&256u16.to_le_bytes());
    assert!(contains(dsdt, &bus));
    // DWordMemory 0xC0000000..0xDFFFFFFF.
    let mut mmio32 = 0xc000_0000u32.to_le_bytes().to_vec();
    mmio32.extend_from_slice(&0xdfff_ffffu32.to_le_bytes());
    assert!(contains(dsdt, &mmio32));
    // QWordMemory over the 64-bit window.
    let mut mmio64 = crate::layout::PCI_MMIO64_START.to_le_bytes().to_vec();
    mmio64.extend_from_slice(
        &(crate::layout::PCI_MMIO64_START + crate::layout::PCI_MMIO64_SIZE - 1).to_le_bytes(),
    );
    assert!(contains(dsdt, &mmio64));
    // WordIO 0x0D00..0xFFFF.
    let mut io = 0x0d00u16.to_le_bytes().to_vec();
    io.extend_from_slice(&0xffffu16.to_le_bytes());
    assert!(contains(dsdt, &io));
}

#[test]
fn srat_puts_cpus_and_ram_on_node_0_and_extra_ranges_on_theirs() {
    let mut cfg = AcpiConfig::new(2, vec![(0, 3 << 30), (1 << 32, 1 << 30)]);
    cfg.extra_memory_affinity.push(MemoryAffinityRange {
        base: 0x200_0000_0000,
        size: 1 << 30,
        proximity_domain: 1,
        hot_pluggable: true,
        non_volatile: false,
    });
    let t = create_acpi_tables(&cfg).unwrap();
    let (_, srat) = t.find_table(b"SRAT").unwrap();
    assert_eq!(srat[8], SRAT_REVISION);
    assert_eq!(u32_at(srat, 36), 1, "reserved 1");
    let mut offset = HEADER_LEN + 12;
    let mut cpus = Vec::new();
    let mut memory = Vec::new();
    while offset < srat.len() {
        let (ty, len) = (srat[offset], srat[offset + 1] as usize);
        let entry = &srat[offset..offset + len];
        match ty {
            0 => {
                assert_eq!(len, 16);
                let domain = u32::from_le_bytes([entry[2], entry[9], entry[10], entry[11]]);
                cpus.push((entry[3], domain, u32_at(entry, 4)));
            }
            1 => {
                assert_eq!(len, 40);
                memory.push((
                    u32_at(entry, 2),
                    u64_at(entry, 8),
                    u64_at(entry, 16),
                    u32_at(entry, 28),
                ));
            }
            _ => panic!("unexpected SRAT entry type {ty}"),
        }
        offset += len;
    }
    assert_eq!(offset, srat.len());
    assert_eq!(cpus, vec![(0, 0, 1), (1, 0, 1)]);
    assert_eq!(
        memory,
        vec![
            (0, 0, 3 << 30, 1),
            (0, 1 << 32, 1 << 30, 1),
            (1, 0x200_0000_0000, 1 << 30, 0b11),
        ]
    );
}

#[test]
fn no_srat_without_memory_ranges() {
    let t = create_acpi_tables(&AcpiConfig::new(1, Vec::new())).unwrap();
    assert!(t.find_table(b"SRAT").is_none());
    assert!(t.find_table(b"APIC").is_some());
}

#[test]
fn fits_for_1_to_32_cpus_and_up_to_255() {
    for cpus in (1..=32).chain([64, 128, u8::MAX]) {
        let t = tables(cpus);
        assert!(t.bytes.len() as u64 <= layout::ACPI_SIZE, "{cpus} CPUs");
        let (_, madt) = t.find_table(b"APIC").unwrap();
        let lapics = madt_entries(madt).iter().filter(|(ty, _)| *ty == 0).count();
        assert_eq!(lapics, cpus as usize);
        for sig in ALL_SIGNATURES {
            let (_, table) = t.find_table(sig).unwrap();
            assert_eq!(sum(table), 0, "{sig:?} with {cpus} CPUs");
        }
    }
}

#[test]
fn impossible_configs_fail_cleanly() {
    assert_eq!(
        create_acpi_tables(&AcpiConfig::new(0, vec![(0, 1 << 30)])),
        Err(AcpiError::NoCpus)
    );

    // More SRAT entries than the ACPI area can hold.
    let many: Vec<(u64, u64)> = (0..4000u64)
        .map(|i| (layout::HIGH_RAM_START + (i << 21), 1 << 20))
        .collect();
    assert!(matches!(
        create_acpi_tables(&AcpiConfig::new(1, many)),
        Err(AcpiError::TooLarge { .. })
    ));

    // Extra AML that cannot fit.
    let mut cfg = config(1);
    cfg.extra_dsdt_aml = vec![0; layout::ACPI_SIZE as usize];
    assert!(matches!(
        create_acpi_tables(&cfg),
        Err(AcpiError::TooLarge { .. })
    ));

    let overlapping = AcpiConfig::new(1, vec![(0, 1 << 30), (1 << 29, 1 << 30)]);
    assert!(matches!(
        create_acpi_tables(&overlapping),
        Err(AcpiError::Overlap { .. })
    ));
    let into_ecam = AcpiConfig::new(1, vec![(0, 0xe800_0000)]);
    assert!(matches!(
        create_acpi_tables(&into_ecam),
        Err(AcpiError::Overlap { .. })
    ));
    for bad in [(0, 0), (u64::MAX, 2)] {
        assert!(matches!(
            create_acpi_tables(&AcpiConfig::new(1, vec![bad])),
            Err(AcpiError::InvalidRange { .. })
        ));
    }

    let mut cfg = config(1);
    cfg.pci_segment.bus_start = 10;
    cfg.pci_segment.bus_end = 9;
    assert_eq!(
        create_acpi_tables(&cfg),
        Err(AcpiError::InvalidBusRange { start: 10, end: 9 })
    );

    let mut cfg = config(1);
    cfg.pci_segment.ecam_base = 0xe000_1000;
    assert_eq!(
        create_acpi_tables(&cfg),
        Err(AcpiError::EcamMisaligned(0xe000_1000))
    );

    let mut cfg = config(1);
    cfg.pci_segment.ecam_base = 0xfff0_0000;
    assert!(matches!(
        create_acpi_tables(&cfg),
        Err(AcpiError::EcamAbove4G { .. })
    ));

    for (base, size) in [(0xc000_0000, 0), (0xc000_0000, 0x8000_0000), (0, 1 << 32)] {
        let mut cfg = config(1);
        cfg.pci_segment.mmio32_base = base;
        cfg.pci_segment.mmio32_size = size;
        assert!(matches!(
            create_acpi_tables(&cfg),
            Err(AcpiError::InvalidRange { .. } | AcpiError::Overlap { .. })
        ));
    }

    let mut cfg = config(1);
    cfg.pci_segment.mmio64_base = u64::MAX;
    assert!(matches!(
        create_acpi_tables(&cfg),
        Err(AcpiError::InvalidRange { .. })
    ));
}

#[test]
fn edge_configs_do_not_panic() {
    // A window ending at 4 GiB runs into the APIC pages: an error, not a panic.
    let mut cfg = config(1);
    cfg.pci_segment.mmio32_base = 0xf000_0000;
    cfg.pci_segment.mmio32_size = 0x1000_0000;
    assert!(matches!(
        create_acpi_tables(&cfg),
        Err(AcpiError::Overlap {
            second: "IOAPIC",
            ..
        })
    ));

    // Window ending at u64::MAX, no 64-bit window, a single bus.
    let mut cfg = AcpiConfig::new(u8::MAX, vec![(0, 1 << 30)]);
    cfg.pci_segment.mmio32_base = 0xf000_0000;
    cfg.pci_segment.mmio32_size = 0x0ec0_0000;
    cfg.pci_segment.mmio64_base = u64::MAX - 0xfff;
    cfg.pci_segment.mmio64_size = 0x1000;
    cfg.pci_segment.bus_start = 255;
    cfg.pci_segment.bus_end = 255;
    cfg.pci_segment.ecam_base = 0x8000_0000;
    let t = create_acpi_tables(&cfg).unwrap();
    assert_eq!(cfg.pci_segment.ecam_region(), (0x8ff0_0000, 1 << 20));
    let (_, mcfg) = t.find_table(b"MCFG").unwrap();
    assert_eq!(u64_at(mcfg, HEADER_LEN + 8), 0x8000_0000);

    cfg.pci_segment.mmio64_size = 0;
    let t = create_acpi_tables(&cfg).unwrap();
    let (_, dsdt) = t.find_table(b"DSDT").unwrap();
    assert_eq!(sum(dsdt), 0);
}

fn extra_table(signature: &[u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut sdt = Sdt::new(
        *signature,
        HEADER_LEN as u32,
        1,
        OEM_ID,
        table_id(signature),
        1,
    );
    sdt.append_slice(payload);
    sdt.as_slice().to_vec()
}

#[test]
fn extra_tables_and_aml_are_linked() {
    let mut cfg = config(1);
    cfg.extra_tables.push(extra_table(b"DMAR", &[0x26, 0x01]));
    cfg.extra_tables.push(extra_table(b"CEDT", &[]));
    // Name (XTRA, 0x2A)
    cfg.extra_dsdt_aml = vec![0x08, b'X', b'T', b'R', b'A', 0x0a, 0x2a];
    let t = create_acpi_tables(&cfg).unwrap();
    let (_, dmar) = t.find_table(b"DMAR").unwrap();
    assert_eq!(&dmar[HEADER_LEN..], &[0x26, 0x01]);
    assert!(t.find_table(b"CEDT").is_some());
    let (_, dsdt) = t.find_table(b"DSDT").unwrap();
    assert!(dsdt.ends_with(&cfg.extra_dsdt_aml));
    assert_eq!(sum(dsdt), 0);
}

#[test]
fn bad_extra_tables_are_rejected() {
    let good = extra_table(b"DMAR", &[1, 2, 3]);
    let mut bad_sum = good.clone();
    bad_sum[38] ^= 1;
    let mut bad_len = good.clone();
    bad_len.push(0);
    let cases: [(Vec<u8>, &str); 4] = [
        (vec![0; 10], "shorter than a table header"),
        (bad_len, "header length differs from the table size"),
        (bad_sum, "checksum does not sum to zero"),
        (
            extra_table(b"APIC", &[]),
            "signature clashes with a built-in table",
        ),
    ];
    for (table, reason) in cases {
        let mut cfg = config(1);
        cfg.extra_tables.push(table);
        assert_eq!(
            create_acpi_tables(&cfg),
            Err(AcpiError::InvalidExtraTable { index: 0, reason })
        );
    }
}

#[test]
fn find_table_survives_garbage() {
    let mut t = tables(1);
    // Point the XSDT entry list at nonsense.
    let (xsdt_addr, _) = t.find_table(b"XSDT").unwrap();
    let offset = (xsdt_addr - t.base) as usize;
    t.bytes[offset + 4..offset + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(t.find_table(b"APIC").is_none());
    t.bytes.truncate(10);
    assert!(t.find_table(b"XSDT").is_none());
}

/// 2 GiB guest with the layout's CXL host bridge and a 1 GiB window on domain 1.
fn cxl_config() -> AcpiConfig {
    let mut cfg = AcpiConfig::new(2, vec![(0, 2 << 30)]);
    cfg.cxl = Some(CxlConfig::from_layout(1 << 30, 1));
    cfg
}

/// A second CXL host bridge `\_SB.PCI1` (UID `uid`) on root bus 0x80 with the top 128 MiB and
/// 16 GiB of the windows.
fn second_host_bridge(uid: u32) -> CxlHostBridgeConfig {
    CxlHostBridgeConfig {
        uid,
        chbcr_base: layout::CXL_CHBCR_START + 0x1_0000,
        pci_root: Some(PciRootConfig {
            bus_start: 0x80,
            bus_end: 0xff,
            mmio32_base: layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - (128 << 20),
            mmio32_size: 128 << 20,
            mmio64_base: layout::PCI_MMIO64_START + layout::PCI_MMIO64_SIZE - (16 << 30),
            mmio64_size: 16 << 30,
        }),
    }
}

#[test]
fn a_second_cxl_host_bridge_is_a_root_bus_of_its_own_and_pci0_keeps_the_rest() {
    let mut cfg = cxl_config();
    let cxl = cfg.cxl.as_mut().unwrap();
    cxl.host_bridges.push(second_host_bridge(2));
    let mut both = CxlWindowConfig::new(
        layout::CXL_WINDOW_START + (2 << 30),
        2 << 30,
        vec![CXL_HOST_BRIDGE_UID, 2],
        1,
    );
    both.granularity = 4096;
    cxl.windows.push(both);
    let first = cfg.first_root();
    assert_eq!(first.bus_end, 0x7f);
    assert_eq!(first.mmio32_size, layout::PCI_MMIO32_SIZE - (128 << 20));
    assert_eq!(first.mmio64_size, layout::PCI_MMIO64_SIZE - (16 << 30));
    let t = create_acpi_tables(&cfg).unwrap();
    let (_, dsdt) = t.find_table(b"DSDT").unwrap();
    assert!(contains(dsdt, b"PCI1"));
    assert!(contains(dsdt, b"ACPI0016"));
    // CEDT: two CHBS, two CFMWS; the second window interleaves both bridges at 4 KiB.
    let (_, cedt) = t.find_table(b"CEDT").unwrap();
    let structures = cedt_structures(cedt);
    assert_eq!(structures.iter().filter(|(ty, _)| *ty == 0).count(), 2);
    let (_, window) = structures[3];
    assert_eq!(window[0x18], 1, "ENIW: 2 ways");
    assert_eq!(u32_at(window, 0x1c), 4, "HBIG: 4 KiB");
    assert_eq!(u32_at(window, 0x24), CXL_HOST_BRIDGE_UID);
    assert_eq!(u32_at(window, 0x28), 2);
}

/// UUID as `ToUUID` encodes it (first three fields little-endian).
fn uuid_bytes(uuid: &str) -> Vec<u8> {
    let hex: String = uuid.chars().filter(|c| *c != '-').collect();
    let raw: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let mut out = Vec::new();
    out.extend(raw[0..4].iter().rev());
    out.extend(raw[4..6].iter().rev());
    out.extend(raw[6..8].iter().rev());
    out.extend(&raw[8..]);
    out
}

/// CEDT structures as (type, bytes).
fn cedt_structures(cedt: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let mut offset = HEADER_LEN;
    while offset < cedt.len() {
        let len = u16_at(cedt, offset + 2) as usize;
        assert!(len >= 4);
        out.push((cedt[offset], &cedt[offset..offset + len]));
        offset += len;
    }
    assert_eq!(offset, cedt.len());
    out
}

#[test]
fn no_cxl_means_no_cxl_objects() {
    let t = tables(2);
    assert!(t.find_table(b"CEDT").is_none());
    let (_, dsdt) = t.find_table(b"DSDT").unwrap();
    for needle in [
        &b"ACPI0016"[..],
        b"ACPI0017",
        b"CXLM",
        &uuid_bytes(CXL_HOST_BRIDGE_OSC_UUID),
    ] {
        assert!(!contains(dsdt, needle));
    }
    assert!(!contains(dsdt, b"_PXM"));
}

#[test]
fn cedt_has_chbs_and_cfmws() {
    let mut cfg = cxl_config();
    let cxl = cfg.cxl.as_mut().unwrap();
    cxl.host_bridges[0].uid = 0x1234_5678;
    cxl.windows[0].targets = vec![0x1234_5678];
    cxl.windows[0].qtg_id = 3;
    cxl.windows.push(CxlWindowConfig {
        base: layout::CXL_WINDOW_START + (1 << 30),
        size: 256 << 20,
        targets: vec![0x1234_5678],
        granularity: 256,
        restrictions: CXL_WINDOW_TYPE3 | CXL_WINDOW_PMEM,
        qtg_id: 0,
        proximity_domain: 2,
    });
    let t = create_acpi_tables(&cfg).unwrap();
    let (addr, cedt) = t.find_table(b"CEDT").unwrap();
    assert_eq!(addr % TABLE_ALIGN as u64, 0);
    assert_eq!(cedt[8], 1, "revision");
    assert_eq!(&cedt[10..16], b"RUSTVM");
    assert_eq!(&cedt[16..24], b"RVMMCEDT");
    assert_eq!(sum(cedt), 0, "checksum");
    assert_eq!(u32_at(cedt, 4) as usize, cedt.len());
    assert_eq!(cedt.len(), HEADER_LEN + 0x20 + 2 * 0x28);

    let structures = cedt_structures(cedt);
    assert_eq!(structures.len(), 3);
    let (ty, chbs) = structures[0];
    assert_eq!(ty, 0);
    let mut expected = vec![0u8, 0, 0x20, 0];
    expected.extend_from_slice(&0x1234_5678u32.to_le_bytes());
    expected.extend_from_slice(&1u32.to_le_bytes());
    expected.extend_from_slice(&0u32.to_le_bytes());
    expected.extend_from_slice(&0xf000_0000u64.to_le_bytes());
    expected.extend_from_slice(&0x1_0000u64.to_le_bytes());
    assert_eq!(chbs, &expected[..]);

    let (ty, cfmws) = structures[1];
    assert_eq!(ty, 1);
    let mut expected = vec![1u8, 0, 0x28, 0, 0, 0, 0, 0];
    expected.extend_from_slice(&0x40_0000_0000u64.to_le_bytes());
    expected.extend_from_slice(&(1u64 << 30).to_le_bytes());
    expected.extend_from_slice(&[0, 0, 0, 0]); // ENIW 1-way, modulo, reserved
    expected.extend_from_slice(&0u32.to_le_bytes()); // HBIG 256 B
    expected.extend_from_slice(&0x0eu16.to_le_bytes());
    expected.extend_from_slice(&3u16.to_le_bytes());
    expected.extend_from_slice(&0x1234_5678u32.to_le_bytes());
    assert_eq!(cfmws, &expected[..]);
    assert_eq!(u64_at(cfmws, 8), layout::CXL_WINDOW_START);

    let (ty, pmem_only) = structures[2];
    assert_eq!(ty, 1);
    assert_eq!(u64_at(pmem_only, 8), 0x40_4000_0000);
    assert_eq!(u64_at(pmem_only, 0x10), 256 << 20);
    assert_eq!(u16_at(pmem_only, 0x20), 0x0a);
}

#[test]
fn cfmws_ways_follow_the_targets() {
    for (ways, eniw) in [
        (1, 0),
        (2, 1),
        (4, 2),
        (8, 3),
        (16, 4),
        (3, 8),
        (6, 9),
        (12, 10),
    ] {
        assert_eq!(cfmws_eniw(ways), Some(eniw));
    }
    for ways in [0, 5, 7, 9, 17] {
        assert_eq!(cfmws_eniw(ways), None);
    }
}

/// The signatures of the tables the XSDT lists, in order.
fn xsdt_signatures(t: &AcpiTables) -> Vec<[u8; 4]> {
    let (_, xsdt) = t.find_table(b"XSDT").unwrap();
    xsdt[HEADER_LEN..]
        .chunks_exact(8)
        .map(|e| {
            let offset = (u64_at(e, 0) - t.base) as usize;
            t.bytes[offset..offset + 4].try_into().unwrap()
        })
        .collect()
}

#[test]
fn xsdt_lists_hmat_and_cedt_after_srat() {
    let t = create_acpi_tables(&cxl_config()).unwrap();
    assert_eq!(
        xsdt_signatures(&t),
        [*b"FACP", *b"APIC", *b"MCFG", *b"SRAT", *b"HMAT", *b"CEDT"]
    );
    for sig in ALL_SIGNATURES.iter().copied().chain([b"HMAT", b"CEDT"]) {
        let (_, table) = t.find_table(sig).unwrap();
        assert_eq!(sum(table), 0, "{sig:?}");
        assert_eq!(u32_at(table, 4) as usize, table.len(), "{sig:?}");
    }
}

#[test]
fn dsdt_describes_the_cxl_host_bridge_and_root() {
    let mut cfg = cxl_config();
    cfg.cxl.as_mut().unwrap().host_bridges[0].uid = 7;
    cfg.cxl.as_mut().unwrap().windows[0].targets = vec![7];
    let t = create_acpi_tables(&cfg).unwrap();
    let (_, dsdt) = t.find_table(b"DSDT").unwrap();
    assert_eq!(sum(dsdt), 0);
    // Name (_HID, "ACPI0016"), Name (_CID, Package (2) { PNP0A08, PNP0A03 }).
    assert!(contains(dsdt, b"_HID\x0dACPI0016\0"));
    assert!(contains(
        dsdt,
        &[
            b'_', b'C', b'I', b'D', 0x12, 0x0c, 0x02, 0x0c, 0x41, 0xd0, 0x0a, 0x08, 0x0c, 0x41,
            0xd0, 0x0a, 0x03
        ]
    ));
    // Name (_UID, 7) and Name (_PXM, Zero) in PCI0; the plain PNP0A08 _HID is gone.
    assert!(contains(dsdt, &[b'_', b'U', b'I', b'D', 0x0a, 0x07]));
    assert!(contains(dsdt, &[b'_', b'P', b'X', b'M', 0x00]));
    assert!(!contains(
        dsdt,
        &[b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x08]
    ));
    assert!(contains(dsdt, b"_HID\x0dACPI0017\0"));
    assert!(contains(dsdt, b"CXLM"));
    // _STA returns 0x0B.
    assert!(contains(
        dsdt,
        &[b'_', b'S', b'T', b'A', 0x00, 0xa4, 0x0a, 0x0b]
    ));
    for uuid in [
        PCI_HOST_BRIDGE_OSC_UUID,
        CXL_HOST_BRIDGE_OSC_UUID,
        CXL_QTG_DSM_UUID,
    ] {
        assert!(contains(dsdt, &uuid_bytes(uuid)), "{uuid}");
    }
    assert!(contains(dsdt, b"CDW5"));
    // The rest of the DSDT is unchanged: windows, ECAM reservation, UARTs, CPUs.
    for name in [
        &b"MRES"[..],
        b"COM1",
        b"C001",
        b"_S5_",
        b"_SEG",
        b"_BBN",
        b"_CRS",
    ] {
        assert!(contains(dsdt, name));
    }
}

#[test]
fn uuid_bytes_match_the_aml_encoding() {
    let mut encoded = Vec::new();
    aml::Uuid::new(CXL_HOST_BRIDGE_OSC_UUID).to_aml_bytes(&mut encoded);
    assert!(encoded.ends_with(&uuid_bytes(CXL_HOST_BRIDGE_OSC_UUID)));
    // 68F2D50B-C469-4D8A-...: first field little-endian.
    assert_eq!(
        &uuid_bytes(CXL_HOST_BRIDGE_OSC_UUID)[..6],
        &[0x0b, 0xd5, 0xf2, 0x68, 0x69, 0xc4]
    );
}

#[test]
fn srat_gives_each_cxl_window_its_domain() {
    let mut cfg = cxl_config();
    cfg.cxl.as_mut().unwrap().windows.push(CxlWindowConfig::new(
        layout::CXL_WINDOW_START + (4 << 30),
        512 << 20,
        vec![CXL_HOST_BRIDGE_UID],
        2,
    ));
    let t = create_acpi_tables(&cfg).unwrap();
    let (_, srat) = t.find_table(b"SRAT").unwrap();
    assert_eq!(sum(srat), 0);
    let mut memory = Vec::new();
    let mut offset = HEADER_LEN + 12;
    while offset < srat.len() {
        let (ty, len) = (srat[offset], srat[offset + 1] as usize);
        if ty == 1 {
            let entry = &srat[offset..offset + len];
            memory.push((
                u32_at(entry, 2),
                u64_at(entry, 8),
                u64_at(entry, 16),
                u32_at(entry, 28),
            ));
        }
        offset += len;
    }
    assert_eq!(
        memory,
        vec![
            (0, 0, 2 << 30, 1),
            (1, layout::CXL_WINDOW_START, 1 << 30, 0b11),
            (2, layout::CXL_WINDOW_START + (4 << 30), 512 << 20, 0b11),
        ]
    );
}

#[test]
fn cxl_without_ram_ranges_has_no_srat() {
    let mut cfg = AcpiConfig::new(1, Vec::new());
    cfg.cxl = Some(CxlConfig::from_layout(256 << 20, 1));
    let t = create_acpi_tables(&cfg).unwrap();
    assert!(t.find_table(b"SRAT").is_none());
    assert!(t.find_table(b"HMAT").is_none());
    assert!(t.find_table(b"CEDT").is_some());
}

/// HMAT structures after the 40-byte header as (type, bytes).
fn hmat_structures(hmat: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut offset = HEADER_LEN + 4;
    while offset < hmat.len() {
        let len = u32_at(hmat, offset + 4) as usize;
        assert!(len >= 8);
        out.push((u16_at(hmat, offset), &hmat[offset..offset + len]));
        offset += len;
    }
    assert_eq!(offset, hmat.len());
    out
}

/// Memory Proximity Domain Attributes structure: memory on `domain` attached to initiator
/// domain 0.
fn hmat_proximity(domain: u32) -> Vec<u8> {
    let mut s = vec![0u8, 0, 0, 0, 40, 0, 0, 0];
    s.extend_from_slice(&1u16.to_le_bytes()); // initiator domain valid
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(&0u32.to_le_bytes()); // initiator domain
    s.extend_from_slice(&domain.to_le_bytes());
    s.extend_from_slice(&[0; 20]);
    s
}

/// System Locality Latency and Bandwidth Information structure from initiator domain 0.
fn hmat_locality(data_type: u8, base_unit: u64, targets: &[u32], entries: &[u16]) -> Vec<u8> {
    let len = 32 + 4 + 4 * targets.len() + 2 * entries.len();
    let mut s = vec![1u8, 0, 0, 0];
    s.extend_from_slice(&(len as u32).to_le_bytes());
    s.extend_from_slice(&[0, data_type, 0, 0]);
    s.extend_from_slice(&1u32.to_le_bytes());
    s.extend_from_slice(&(targets.len() as u32).to_le_bytes());
    s.extend_from_slice(&0u32.to_le_bytes());
    s.extend_from_slice(&base_unit.to_le_bytes());
    s.extend_from_slice(&0u32.to_le_bytes());
    for t in targets {
        s.extend_from_slice(&t.to_le_bytes());
    }
    for e in entries {
        s.extend_from_slice(&e.to_le_bytes());
    }
    s
}

/// What Linux makes of an entry of an HMAT revision 2 (drivers/acpi/numa/hmat.c
/// `hmat_normalize`): latencies in ns rounded up, bandwidths in MB/s.
fn linux_hmat_value(entry: u16, base_unit: u64, data_type: u8) -> u64 {
    let value = u64::from(entry) * base_unit;
    if data_type <= 2 {
        value.div_ceil(1000)
    } else {
        value
    }
}

#[test]
fn hmat_describes_ram_and_the_cxl_domain() {
    let t = create_acpi_tables(&cxl_config()).unwrap();
    let (addr, hmat) = t.find_table(b"HMAT").unwrap();
    assert_eq!(addr % TABLE_ALIGN as u64, 0);
    assert_eq!(&hmat[0..4], b"HMAT");
    assert_eq!(hmat[8], 2, "revision");
    assert_eq!(&hmat[10..16], b"RUSTVM");
    assert_eq!(&hmat[16..24], b"RVMMHMAT");
    assert_eq!(sum(hmat), 0, "checksum");
    assert_eq!(u32_at(hmat, 4) as usize, hmat.len());
    assert_eq!(u32_at(hmat, 36), 0, "reserved");
    // Header, two proximity domain structures, four locality structures of 1×3 entries (RAM,
    // CXL, and the host bridge's generic port, which has no proximity domain structure).
    assert_eq!(hmat.len(), 40 + 2 * 40 + 4 * (32 + 4 + 3 * 4 + 3 * 2));

    let structures = hmat_structures(hmat);
    let types: Vec<u16> = structures.iter().map(|(ty, _)| *ty).collect();
    assert_eq!(types, [0, 0, 1, 1, 1, 1]);
    assert_eq!(structures[0].1, &hmat_proximity(0)[..]);
    assert_eq!(structures[1].1, &hmat_proximity(1)[..]);
    let expected = [
        (1, 1000, [100, 250, 100]),
        (2, 1000, [100, 250, 100]),
        (4, 1, [20_000, 16_000, 20_000]),
        (5, 1, [20_000, 16_000, 20_000]),
    ];
    for ((_, s), (data_type, base, entries)) in structures[2..].iter().zip(expected) {
        assert_eq!(
            *s,
            &hmat_locality(data_type, base, &[0, 1, 2], &entries)[..]
        );
        // Field offsets as Linux reads them (struct acpi_hmat_locality).
        assert_eq!(u32_at(s, 4), 54, "length");
        assert_eq!(s[9], data_type);
        assert_eq!(u32_at(s, 12), 1, "initiators");
        assert_eq!(u32_at(s, 16), 3, "targets");
        assert_eq!(u64_at(s, 24), base, "entry base unit");
        assert_eq!(u32_at(s, 32), 0, "initiator domain");
        assert_eq!(
            (u32_at(s, 36), u32_at(s, 40), u32_at(s, 44)),
            (0, 1, 2),
            "target domains"
        );
        assert_eq!(
            (u16_at(s, 48), u16_at(s, 50), u16_at(s, 52)),
            (entries[0], entries[1], entries[2])
        );
    }
}

#[test]
fn hmat_figures_are_what_linux_reports() {
    let t = create_acpi_tables(&cxl_config()).unwrap();
    let (_, hmat) = t.find_table(b"HMAT").unwrap();
    let mut seen = Vec::new();
    for (ty, s) in hmat_structures(hmat) {
        if ty != 1 {
            continue;
        }
        let data_type = s[9];
        let base = u64_at(s, 24);
        let values: Vec<u64> = (0..3)
            .map(|i| linux_hmat_value(u16_at(s, 48 + 2 * i), base, data_type))
            .collect();
        seen.push((data_type, values));
    }
    // read/write latency in ns, read/write bandwidth in MB/s; DRAM, CXL, generic port.
    assert_eq!(
        seen,
        [
            (1, vec![100, 250, 100]),
            (2, vec![100, 250, 100]),
            (4, vec![20_000, 16_000, 20_000]),
            (5, vec![20_000, 16_000, 20_000]),
        ]
    );
    assert_eq!(u64::from(DRAM_LATENCY_NS), 100);
    assert_eq!(u64::from(CXL_X8_LATENCY_NS), 250);
    assert_eq!(u64::from(DRAM_BANDWIDTH_MBPS), 20_000);
    assert_eq!(u64::from(CXL_X8_BANDWIDTH_MBPS), 16_000);
}

#[test]
fn hmat_lists_each_cxl_domain_once() {
    let mut cfg = cxl_config();
    let cxl = cfg.cxl.as_mut().unwrap();
    for (n, domain) in [(1u64, 3u32), (2, 1), (3, 3)] {
        cxl.windows.push(CxlWindowConfig::new(
            layout::CXL_WINDOW_START + (n << 30),
            256 << 20,
            vec![CXL_HOST_BRIDGE_UID],
            domain,
        ));
    }
    let t = create_acpi_tables(&cfg).unwrap();
    let (_, hmat) = t.find_table(b"HMAT").unwrap();
    assert_eq!(sum(hmat), 0);
    let structures = hmat_structures(hmat);
    let domains: Vec<u32> = structures
        .iter()
        .filter(|(ty, _)| *ty == 0)
        .map(|(_, s)| u32_at(s, 16))
        .collect();
    assert_eq!(domains, [0, 1, 3]);
    let localities: Vec<&[u8]> = structures
        .iter()
        .filter(|(ty, _)| *ty == 1)
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(localities.len(), 4);
    // 4 targets (the generic port is domain 4, after every other).
    assert_eq!(
        localities[0],
        &hmat_locality(1, 1000, &[0, 1, 3, 4], &[100, 250, 250, 100])[..]
    );
    assert_eq!(localities[0].len(), 32 + 4 + 16 + 8);
    assert_eq!(
        localities[3],
        &hmat_locality(5, 1, &[0, 1, 3, 4], &[20_000, 16_000, 16_000, 20_000])[..]
    );
    assert_eq!(hmat.len(), 40 + 3 * 40 + 4 * 60);
}

#[test]
fn xsdt_lists_hmat_only_with_a_cxl_domain() {
    let base: [[u8; 4]; 4] = [*b"FACP", *b"APIC", *b"MCFG", *b"SRAT"];
    // No CXL: no HMAT, and the tables are those of a build without it.
    let t = tables(2);
    assert!(t.find_table(b"HMAT").is_none());
    assert_eq!(xsdt_signatures(&t), base);
    // Extra SRAT domains alone do not make an HMAT.
    let mut cfg = config(2);
    cfg.extra_memory_affinity.push(MemoryAffinityRange {
        base: 1 << 32,
        size: 1 << 30,
        proximity_domain: 1,
        hot_pluggable: false,
        non_volatile: false,
    });
    let t = create_acpi_tables(&cfg).unwrap();
    assert!(t.find_table(b"HMAT").is_none());
    // CXL without windows, or with the window on the RAM's domain: no CXL domain.
    let mut cfg = cxl_config();
    cfg.cxl.as_mut().unwrap().windows.clear();
    let t = create_acpi_tables(&cfg).unwrap();
    assert!(t.find_table(b"HMAT").is_none());
    assert_eq!(xsdt_signatures(&t), [base.as_slice(), &[*b"CEDT"]].concat());
    let mut cfg = cxl_config();
    cfg.cxl.as_mut().unwrap().windows[0].proximity_domain = 0;
    assert!(
        create_acpi_tables(&cfg)
            .unwrap()
            .find_table(b"HMAT")
            .is_none()
    );
    // CXL without RAM ranges: no SRAT, so no HMAT (covered by
    // cxl_without_ram_ranges_has_no_srat). With both: listed after the SRAT.
    let t = create_acpi_tables(&cxl_config()).unwrap();
    let sigs = xsdt_signatures(&t);
    assert_eq!(sigs.iter().filter(|s| *s == b"HMAT").count(), 1);
    assert_eq!(sigs[4], *b"HMAT");
}

#[test]
fn extra_hmat_clashes_only_with_the_built_in_one() {
    let mut cfg = cxl_config();
    cfg.extra_tables.push(extra_table(b"HMAT", &[0; 4]));
    assert_eq!(
        create_acpi_tables(&cfg),
        Err(AcpiError::InvalidExtraTable {
            index: 0,
            reason: "signature clashes with a built-in table"
        })
    );
    // Without a CXL domain the caller may bring its own.
    cfg.cxl = None;
    let t = create_acpi_tables(&cfg).unwrap();
    let (_, hmat) = t.find_table(b"HMAT").unwrap();
    assert_eq!(hmat.len(), HEADER_LEN + 4);
}

#[test]
fn bad_cxl_configs_are_rejected() {
    let check = |edit: &dyn Fn(&mut CxlConfig), want: &dyn Fn(&AcpiError) -> bool| {
        let mut cfg = cxl_config();
        edit(cfg.cxl.as_mut().unwrap());
        let err = create_acpi_tables(&cfg).unwrap_err();
        assert!(want(&err), "{err:?}");
    };
    let invalid_cxl = |e: &AcpiError| matches!(e, AcpiError::InvalidCxl(_));
    let invalid_range = |e: &AcpiError| matches!(e, AcpiError::InvalidRange { .. });
    let overlap = |e: &AcpiError| matches!(e, AcpiError::Overlap { .. });

    check(&|c| c.host_bridges.clear(), &invalid_cxl);
    check(
        &|c| {
            c.host_bridges.push(CxlHostBridgeConfig {
                uid: 2,
                chbcr_base: 0xf001_0000,
                pci_root: None,
            })
        },
        &invalid_cxl,
    );
    // A second host bridge with a root bus, but the same UID as the first.
    check(
        &|c| c.host_bridges.push(second_host_bridge(CXL_HOST_BRIDGE_UID)),
        &invalid_cxl,
    );
    // Its root bus's window must lie inside the segment's, above PCI0's part.
    check(
        &|c| {
            let mut hb = second_host_bridge(2);
            if let Some(root) = hb.pci_root.as_mut() {
                root.mmio32_base = layout::PCI_MMIO32_START - (1 << 20);
            }
            c.host_bridges.push(hb)
        },
        &invalid_range,
    );
    check(&|c| c.windows[0].granularity = 128, &invalid_cxl);
    check(&|c| c.windows[0].granularity = 3 << 10, &invalid_cxl);
    check(&|c| c.host_bridges[0].chbcr_base = 0, &invalid_range);
    check(
        &|c| c.host_bridges[0].chbcr_base = 0xf000_8000,
        &invalid_range,
    );
    check(&|c| c.windows[0].base += 1 << 20, &invalid_range);
    check(
        &|c| c.windows[0].size = (1 << 30) + (1 << 20),
        &invalid_range,
    );
    check(&|c| c.windows[0].size = 0, &invalid_range);
    check(
        &|c| c.windows[0].base = u64::MAX - 0xfff_ffff,
        &invalid_range,
    );
    check(&|c| c.windows[0].targets.clear(), &invalid_cxl);
    const HB: u32 = CXL_HOST_BRIDGE_UID;
    check(&|c| c.windows[0].targets = vec![HB, HB], &invalid_cxl);
    check(
        &|c| c.windows[0].targets = vec![HB, HB, HB, HB, HB],
        &invalid_cxl,
    );
    check(&|c| c.windows[0].targets = vec![7], &invalid_cxl);
    // Overlaps: the ECAM, the 64-bit PCI window, RAM, each other.
    check(&|c| c.host_bridges[0].chbcr_base = 0xe000_0000, &overlap);
    check(&|c| c.windows[0].base = layout::PCI_MMIO64_START, &overlap);
    check(&|c| c.windows[0].base = 0, &overlap);
    check(
        &|c| {
            let again = c.windows[0].clone();
            c.windows.push(again);
        },
        &overlap,
    );

    // A CEDT of the caller's clashes with the built-in one, but only with CXL.
    let mut cfg = cxl_config();
    cfg.extra_tables.push(extra_table(b"CEDT", &[]));
    assert_eq!(
        create_acpi_tables(&cfg),
        Err(AcpiError::InvalidExtraTable {
            index: 0,
            reason: "signature clashes with a built-in table"
        })
    );
    cfg.cxl = None;
    assert!(create_acpi_tables(&cfg).is_ok());

    // No windows at all is fine (a host bridge without memory to map yet).
    let mut cfg = cxl_config();
    cfg.cxl.as_mut().unwrap().windows.clear();
    let t = create_acpi_tables(&cfg).unwrap();
    let (_, cedt) = t.find_table(b"CEDT").unwrap();
    assert_eq!(cedt.len(), HEADER_LEN + 0x20);
}

/// An ACPICA tool: `$IASL` / `$ACPIEXEC` if set, else `iasl` / `acpiexec` from PATH.
fn acpica_tool(name: &str) -> String {
    std::env::var(name.to_uppercase()).unwrap_or_else(|_| name.to_string())
}

/// Runs an ACPICA tool; panics with its output if it fails or reports an error.
fn run_acpica(tool: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(acpica_tool(tool))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (apt-get install acpica-tools)"));
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tool} {args:?}: {log}");
    log
}

/// Disassembles each of `sigs` with `iasl -d`; returns (signature, listing) pairs.
fn iasl_disassemble(
    t: &AcpiTables,
    sigs: &[&[u8; 4]],
    dir: &std::path::Path,
) -> Vec<(String, String)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut listings = Vec::new();
    for sig in sigs {
        let (_, table) = t.find_table(sig).unwrap();
        let name = String::from_utf8_lossy(&sig[..]).to_lowercase();
        let path = dir.join(format!("{name}.dat"));
        std::fs::write(&path, table).unwrap();
        let log = run_acpica("iasl", &["-d".as_ref(), path.as_os_str()]);
        assert!(!log.contains("rror"), "iasl -d {name}: {log}");
        let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
        println!("==== {name} ====\n{dsl}");
        listings.push((name, dsl));
    }
    listings
}

/// Manual check, not part of the normal run: needs `iasl` from acpica-tools
/// (`apt-get install acpica-tools`). Run with
/// `cargo test -p vmm acpi::tests::iasl_disassembles_tables -- --ignored --nocapture`.
/// Set `IASL` to use another binary. iasl before 20201217 (e.g. bookworm's 20200925) does
/// not know the CEDT and dumps it raw; the CEDT field checks then are skipped.
#[test]
#[ignore = "needs iasl (acpica-tools); scripts/test.sh installs it and runs this with --ignored"]
fn iasl_disassembles_tables() {
    let mut cfg = AcpiConfig::new(4, vec![(0, 3 << 30), (1 << 32, 1 << 30)]);
    cfg.irq0_override_gsi = Some(2);
    let t = create_acpi_tables(&cfg).unwrap();
    let dir = std::env::temp_dir().join(format!("acpi-iasl-{}", std::process::id()));
    let listings = iasl_disassemble(&t, &ALL_SIGNATURES, &dir);
    let dsdt = &listings.iter().find(|(n, _)| n == "dsdt").unwrap().1;
    for expected in [
        "EisaId (\"PNP0A08\")",
        "EisaId (\"PNP0C02\")",
        "Name (_S5, Package",
        "Method (_OSC, 4",
        "Memory32Fixed (ReadWrite,",
    ] {
        assert!(dsdt.contains(expected), "{expected}");
    }
    std::fs::remove_dir_all(&dir).unwrap();

    // With CXL.
    let t = create_acpi_tables(&cxl_config()).unwrap();
    let sigs: Vec<&[u8; 4]> = ALL_SIGNATURES
        .iter()
        .copied()
        .chain([b"HMAT", b"CEDT"])
        .collect();
    let listings = iasl_disassemble(&t, &sigs, &dir);
    let listing = |name: &str| &listings.iter().find(|(n, _)| n == name).unwrap().1;
    let dsdt = listing("dsdt");
    for expected in [
        "Name (_HID, \"ACPI0016\"",
        "Name (_PXM, Zero)",
        "EisaId (\"PNP0A08\")",
        "EisaId (\"PNP0A03\")",
        "ToUUID (\"68f2d50b-c469-4d8a-bd3d-941a103fd3fc\")",
        "ToUUID (\"33db4d5b-1ff7-401c-9657-7441c03dd766\")",
        "CreateDWordField (Arg3, 0x10, CDW5)",
        "Device (CXLM)",
        "Name (_HID, \"ACPI0017\")",
        "Return (0x0B)",
    ] {
        assert!(dsdt.contains(expected), "{expected}");
    }
    let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let cedt = squeeze(listing("cedt"));
    if cedt.contains("Unknown ACPI table signature") {
        println!("this iasl does not decode the CEDT; set IASL to a newer one (>= 20201217)");
    } else {
        for expected in [
            "Revision : 01",
            "Subtable Type : 00 [CXL Host Bridge Structure]",
            "Length : 0020",
            "Specification version : 00000001",
            "Register base : 00000000F0000000",
            "Register length : 0000000000010000",
            "Subtable Type : 01 [CXL Fixed Memory Window Structure]",
            "Length : 0028",
            "Window base address : 0000004000000000",
            "Window size : 0000000040000000",
            "Interleave Members : 00",
            "Restrictions : 000E",
            "First Target : 00000000",
        ] {
            assert!(cedt.contains(expected), "CEDT: {expected}");
        }
    }
    let srat = squeeze(listing("srat"));
    assert!(srat.contains("Proximity Domain : 00000001"));
    assert!(srat.contains("Base Address : 0000004000000000"));
    assert!(srat.contains("Hot Pluggable : 1"));
    // The fields without their "[offset decimal length]" prefixes, squeezed.
    let fields = |listing: &str| {
        let lines: Vec<&str> = listing
            .lines()
            .map(|l| match l.trim_start().strip_prefix('[') {
                Some(rest) => rest.split_once(']').map_or(l, |(_, field)| field),
                None => l,
            })
            .collect();
        squeeze(&lines.join("\n"))
    };
    let hmat = fields(listing("hmat"));
    for expected in [
        "Revision : 02",
        "Structure Type : 0000 [Memory Proximity Domain Attributes]",
        "Length : 00000028",
        "Memory Proximity Domain : 00000001",
        "Structure Type : 0001 [System Locality Latency and Bandwidth Information]",
        "Length : 00000036",
        "Data Type : 01",
        "Data Type : 02",
        "Data Type : 04",
        "Data Type : 05",
        "Entry Base Unit : 00000000000003E8",
        "Entry Base Unit : 0000000000000001",
        "Target Proximity Domain List : 00000001",
        "Target Proximity Domain List : 00000002",
        "Entry : 0064 Entry : 00FA Entry : 0064",
        "Entry : 4E20 Entry : 3E80 Entry : 4E20",
    ] {
        assert!(hmat.contains(expected), "HMAT: {expected}");
    }
    std::fs::remove_dir_all(&dir).unwrap();

    // Two CXL domains and the generic port, four targets: iasl must still find every
    // structure.
    let mut cfg = cxl_config();
    cfg.cxl.as_mut().unwrap().windows.push(CxlWindowConfig::new(
        layout::CXL_WINDOW_START + (1 << 30),
        256 << 20,
        vec![CXL_HOST_BRIDGE_UID],
        2,
    ));
    let t = create_acpi_tables(&cfg).unwrap();
    let listings = iasl_disassemble(&t, &[b"HMAT"], &dir);
    let hmat = fields(&listings[0].1);
    assert!(hmat.contains("Length : 0000003C"), "{hmat}");
    assert!(hmat.contains("Target Proximity Domain List : 00000003"));
    assert!(hmat.contains("Entry : 0064 Entry : 00FA Entry : 00FA Entry : 0064 Structure Type"));
    assert!(hmat.contains("Entry : 4E20 Entry : 3E80 Entry : 3E80 Entry : 4E20 Raw Table Data"));
    assert_eq!(hmat.matches("Data Type :").count(), 4);
    std::fs::remove_dir_all(&dir).unwrap();

    // A second CXL host bridge: \_SB.PCI1 on root bus 0x80 with the top of the windows, and
    // PCI0's _CRS ending below them.
    let mut cfg = cxl_config();
    cfg.cxl
        .as_mut()
        .unwrap()
        .host_bridges
        .push(second_host_bridge(2));
    let t = create_acpi_tables(&cfg).unwrap();
    let listings = iasl_disassemble(&t, &[b"DSDT"], &dir);
    let dsdt = squeeze(&listings[0].1);
    for expected in [
        "Device (PCI1)",
        "Name (_BBN, 0x80)",
        "0x0000, // Granularity 0x0080, // Range Minimum 0x00FF, // Range Maximum",
        "0x0000, // Granularity 0x0000, // Range Minimum 0x007F, // Range Maximum",
        "0xD8000000, // Range Minimum 0xDFFFFFFF, // Range Maximum",
        "0xC0000000, // Range Minimum 0xD7FFFFFF, // Range Maximum",
    ] {
        assert!(dsdt.contains(expected), "DSDT: {expected}\n{dsdt}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The bytes of the buffer acpiexec printed after `Evaluating \{method}`.
fn acpiexec_buffer(log: &str, method: &str) -> Vec<u8> {
    let block = log
        .split("Evaluating \\")
        .find(|b| b.starts_with(method))
        .unwrap_or_else(|| panic!("{method} not evaluated: {log}"));
    assert!(block.contains("[Buffer]"), "{method}: {block}");
    let mut bytes = Vec::new();
    for line in block.lines() {
        // "    0000: 11 00 00 00 ...  // ....", possibly after "[Buffer] Length 0C = ".
        let Some((_, rest)) = line.split_once(": ") else {
            continue;
        };
        let hex = rest.split("//").next().unwrap_or("");
        bytes.extend(
            hex.split_whitespace()
                .map_while(|b| u8::from_str_radix(b, 16).ok().filter(|_| b.len() == 2)),
        );
    }
    bytes
}

/// Evaluates the CXL host bridge `_OSC` and the CXL root's `_STA` and `_DSM` with acpiexec
/// (acpica-tools), calling them as Linux does from a test SSDT compiled by iasl. Run with
/// `cargo test -p vmm acpi::tests::acpiexec_runs_cxl_methods -- --ignored --nocapture`
/// (`IASL`, `ACPIEXEC` select other binaries).
#[test]
#[ignore = "needs iasl and acpiexec (acpica-tools); scripts/test.sh installs them and runs this with --ignored"]
fn acpiexec_runs_cxl_methods() {
    let t = create_acpi_tables(&cxl_config()).unwrap();
    let dir = std::env::temp_dir().join(format!("acpi-exec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_, dsdt) = t.find_table(b"DSDT").unwrap();
    std::fs::write(dir.join("dsdt.aml"), dsdt).unwrap();
    // CDW1 bit 0 = query; Linux asks for LTR (0x20) and DPC (0x80) too, which are masked.
    let ssdt = r#"DefinitionBlock ("", "SSDT", 2, "RUSTVM", "OSCTEST", 1)
{
    External (\_SB.PCI0._OSC, MethodObj)
    External (\_SB.CXLM._DSM, MethodObj)
    Method (TCXQ, 0) { Return (\_SB.PCI0._OSC (ToUUID ("68F2D50B-C469-4D8A-BD3D-941A103FD3FC"), 1, 5,
        Buffer () { 1,0,0,0, 0x1F,0,0,0, 0xBD,0,0,0, 0x0F,0,0,0, 0x01,0,0,0 })) }
    Method (TCXR, 0) { Return (\_SB.PCI0._OSC (ToUUID ("68F2D50B-C469-4D8A-BD3D-941A103FD3FC"), 1, 5,
        Buffer () { 0,0,0,0, 0x1F,0,0,0, 0x1D,0,0,0, 0x0F,0,0,0, 0x01,0,0,0 })) }
    Method (TCXM, 0) { Return (\_SB.PCI0._OSC (ToUUID ("68F2D50B-C469-4D8A-BD3D-941A103FD3FC"), 1, 5,
        Buffer () { 0,0,0,0, 0x1F,0,0,0, 0x1D,0,0,0, 0x0F,0,0,0, 0x03,0,0,0 })) }
    Method (TCXS, 0) { Return (\_SB.PCI0._OSC (ToUUID ("68F2D50B-C469-4D8A-BD3D-941A103FD3FC"), 1, 3,
        Buffer () { 1,0,0,0, 0x1F,0,0,0, 0x1D,0,0,0 })) }
    Method (TPCI, 0) { Return (\_SB.PCI0._OSC (ToUUID ("33DB4D5B-1FF7-401C-9657-7441C03DD766"), 1, 3,
        Buffer () { 1,0,0,0, 0x1F,0,0,0, 0xFF,0,0,0 })) }
    Method (TREV, 0) { Return (\_SB.PCI0._OSC (ToUUID ("33DB4D5B-1FF7-401C-9657-7441C03DD766"), 2, 3,
        Buffer () { 0,0,0,0, 0x1F,0,0,0, 0x1F,0,0,0 })) }
    Method (TUNK, 0) { Return (\_SB.PCI0._OSC (ToUUID ("0D4B8CE2-2CE7-4B9E-9A53-2E0D2A8A1C7F"), 1, 3,
        Buffer () { 1,0,0,0, 0x1F,0,0,0, 0x1F,0,0,0 })) }
    Method (TDS0, 0) { Return (\_SB.CXLM._DSM (ToUUID ("F365F9A6-A7DE-4071-A66A-B40C0B4F8E52"), 1, 0,
        Package () { })) }
    Method (TDS1, 0) { Return (\_SB.CXLM._DSM (ToUUID ("F365F9A6-A7DE-4071-A66A-B40C0B4F8E52"), 1, 1,
        Package () { 100, 100, 1000, 1000 })) }
}
"#;
    std::fs::write(dir.join("osctest.asl"), ssdt).unwrap();
    run_acpica("iasl", &[dir.join("osctest.asl").as_os_str()]);
    let log = run_acpica(
        "acpiexec",
        &[
            "-b".as_ref(),
            "execute TCXQ; execute TCXR; execute TCXM; execute TCXS; execute TPCI; \
             execute TREV; execute TUNK; execute TDS0; execute TDS1; \
             execute \\_SB.CXLM._STA"
                .as_ref(),
            dir.join("dsdt.aml").as_os_str(),
            dir.join("osctest.aml").as_os_str(),
        ],
    );
    println!("{log}");
    let dwords = |method: &str| -> Vec<u32> {
        acpiexec_buffer(&log, method)
            .chunks_exact(4)
            .map(|d| u32::from_le_bytes(d.try_into().unwrap()))
            .collect()
    };
    // Query: PCIe control trimmed to 0x1F (capabilities masked is fine in a query), CXL
    // memory error reporting granted.
    assert_eq!(dwords("TCXQ"), [0x11, 0x1f, 0x1d, 0x0f, 0x01]);
    // Commit of what the query granted: no error bits.
    assert_eq!(dwords("TCXR"), [0x00, 0x1f, 0x1d, 0x0f, 0x01]);
    // Unknown CXL control bit requested: masked.
    assert_eq!(dwords("TCXM"), [0x10, 0x1f, 0x1d, 0x0f, 0x01]);
    // CXL UUID without CDW5: _OSC failure, not an AML error.
    assert_eq!(dwords("TCXS"), [0x03, 0x1f, 0x1d]);
    // The PCIe UUID as before.
    assert_eq!(dwords("TPCI"), [0x11, 0x1f, 0x1f]);
    assert_eq!(dwords("TREV"), [0x08, 0x1f, 0x1f]);
    assert_eq!(dwords("TUNK"), [0x05, 0x1f, 0x1f]);
    assert_eq!(acpiexec_buffer(&log, "TDS0"), [0x03]);
    // QTG query: Package { max QTG id 0, Package { QTG id 0 } }.
    let tds1 = log.split("Evaluating \\TDS1").nth(1).unwrap_or_default();
    let tds1 = tds1.split("Evaluating").next().unwrap_or_default();
    let squeezed = tds1.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        squeezed.contains(
            "[Package] Contains 2 Elements: [Integer] = 0000000000000000 \
             [Package] Contains 1 Elements: [Integer] = 0000000000000000"
        ),
        "{tds1}"
    );
    assert!(log.contains("Evaluation of \\_SB.CXLM._STA returned"));
    assert!(log.contains("[Integer] = 000000000000000B"));
    assert!(!log.contains("AE_"), "AML exception: {log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn dmar_config() -> AcpiConfig {
    let mut cfg = AcpiConfig::new(2, vec![(0, 1 << 30)]);
    cfg.dmar = Some(DmarConfig {
        host_address_width: 48,
        register_base: 0xfed9_0000,
    });
    cfg
}

/// The DMAR Linux's `dmar_table_detect`/`dmar_parse_one_drhd` read: HAW − 1, no interrupt
/// remapping, one DRHD with INCLUDE_PCI_ALL on segment 0 at the register base.
#[test]
fn dmar_describes_one_unit_for_the_whole_segment() {
    let t = create_acpi_tables(&dmar_config()).unwrap();
    let (_, dmar) = t.find_table(b"DMAR").unwrap();
    assert_eq!(dmar.len(), HEADER_LEN + 12 + 16);
    assert_eq!(dmar[8], 1, "revision");
    assert_eq!(
        dmar.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
        0,
        "checksum"
    );
    assert_eq!(dmar[36], 47, "host address width - 1");
    assert_eq!(dmar[37], 0, "no INTR_REMAP, no x2APIC opt-out");
    let drhd = &dmar[48..];
    assert_eq!(u16::from_le_bytes([drhd[0], drhd[1]]), 0, "type DRHD");
    assert_eq!(u16::from_le_bytes([drhd[2], drhd[3]]), 16);
    assert_eq!(drhd[4], 1, "INCLUDE_PCI_ALL");
    assert_eq!(drhd[5], 0, "4 KiB window");
    assert_eq!(u16::from_le_bytes([drhd[6], drhd[7]]), 0, "segment");
    assert_eq!(read_u64(drhd, 8), Some(0xfed9_0000));
    // Without an IOMMU there is no DMAR.
    let plain = create_acpi_tables(&AcpiConfig::new(2, vec![(0, 1 << 30)])).unwrap();
    assert!(plain.find_table(b"DMAR").is_none());
}

#[test]
fn bad_dmar_configurations_are_refused() {
    let mut cfg = dmar_config();
    cfg.dmar.as_mut().unwrap().register_base = 0xfed9_0800;
    assert!(matches!(
        create_acpi_tables(&cfg),
        Err(AcpiError::InvalidRange { .. })
    ));
    cfg.dmar.as_mut().unwrap().register_base = layout::IOAPIC_START;
    assert!(matches!(
        create_acpi_tables(&cfg),
        Err(AcpiError::Overlap { .. })
    ));
    cfg.dmar.as_mut().unwrap().register_base = 0xfed9_0000;
    cfg.dmar.as_mut().unwrap().host_address_width = 52;
    assert!(matches!(
        create_acpi_tables(&cfg),
        Err(AcpiError::InvalidDmar(_))
    ));
}

/// Manual/ACPICA check (run by scripts/test.sh with --ignored): iasl disassembles the DMAR
/// and reads back the DRHD.
#[test]
#[ignore = "needs iasl (acpica-tools); scripts/test.sh installs it and runs this with --ignored"]
fn iasl_disassembles_the_dmar() {
    let t = create_acpi_tables(&dmar_config()).unwrap();
    let dir = std::env::temp_dir().join(format!("acpi-iasl-dmar-{}", std::process::id()));
    let listings = iasl_disassemble(&t, &[b"DMAR"], &dir);
    let dmar = &listings[0].1;
    for expected in [
        "Host Address Width : 2F",
        "Register Base Address : 00000000FED90000",
        "PCI Segment Number : 0000",
    ] {
        let squeezed: String = dmar.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(squeezed.contains(expected), "{expected} missing:\n{dmar}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With CXL the SRAT names the ACPI0016 host bridge as a Generic Port (§5.2.16.7) on a domain of
/// its own, after every other: Linux's `acpi_get_genport_coordinates` finds it by `_UID` (not 0,
/// see [`CXL_HOST_BRIDGE_UID`]) and gives `cxl_acpi` the HMAT figures of that domain.
#[test]
fn srat_names_the_cxl_host_bridge_as_a_generic_port() {
    let t = create_acpi_tables(&cxl_config()).unwrap();
    let (_, srat) = t.find_table(b"SRAT").unwrap();
    assert_eq!(sum(srat), 0);
    let mut ports = Vec::new();
    let mut offset = HEADER_LEN + 12;
    while offset < srat.len() {
        let (ty, len) = (srat[offset], srat[offset + 1] as usize);
        if ty == 6 {
            ports.push(srat[offset..offset + len].to_vec());
        }
        offset += len;
    }
    assert_eq!(ports.len(), 1);
    let p = &ports[0];
    assert_eq!(p.len(), 32);
    assert_eq!(p[3], 0, "ACPI device handle");
    assert_eq!(u32_at(p, 4), 2, "domain after RAM (0) and the window (1)");
    assert_eq!(&p[8..16], b"ACPI0016");
    assert_eq!(u32_at(p, 16), CXL_HOST_BRIDGE_UID);
    assert_ne!(CXL_HOST_BRIDGE_UID, 0);
    assert_eq!(u32_at(p, 24), 1, "enabled");
    // Without CXL there is none.
    let t = tables(2);
    let (_, srat) = t.find_table(b"SRAT").unwrap();
    assert!(
        !srat[HEADER_LEN + 12..]
            .chunks(16)
            .any(|c| c[0] == 6 && c[1] == 32)
    );
}
