//! Hand-made seed inputs: what a booting Linux guest and a few hostile ones do. The replay test
//! checks that `corpus/<target>/seed-<name>` holds exactly these bytes (`UPDATE_SEEDS=1`
//! rewrites them), so the committed seeds stay readable as code.

use std::sync::Arc;

use devices::pci::capability::{cap_id, find_capability};
use devices::pci::{PciDevice, RootPort, RootPortConfig};
use iommu::NullMsiSink;

use crate::{dma, pci, pio};

/// A seed: target name, seed name, input bytes.
pub type Seed = (&'static str, &'static str, Vec<u8>);

/// Every hand-made seed.
pub fn all() -> Vec<Seed> {
    let mut v = pci_seeds();
    v.extend(pio_seeds());
    v.extend(dma_seeds());
    v
}

fn root_port_cap(id: u8) -> u16 {
    let mut rp =
        RootPort::new(RootPortConfig::new(1), Arc::new(NullMsiSink)).expect("seed root port");
    let mut read = |o: u16, d: &mut [u8]| rp.config_read(o, d);
    u16::from(find_capability(&mut read, id).unwrap_or(0x40))
}

fn pci_seeds() -> Vec<Seed> {
    use pci::Op::*;
    use pci::Target;
    let rd = |bus, devfn, reg, len| EcamRead {
        bus,
        devfn,
        reg,
        len,
    };
    let wr = |bus, devfn, reg, len, value| EcamWrite {
        bus,
        devfn,
        reg,
        len,
        value,
    };
    let rp = 1 << 3; // 00:01.0
    let msix = root_port_cap(cap_id::MSIX);
    let pcie = root_port_cap(cap_id::PCI_EXPRESS);

    // Linux enumeration: IDs, header types, capability walk, BAR sizing, bus scan below the
    // root port, extended config space, the same through CF8/CFC.
    let mut enumerate = vec![];
    for devfn in [0u8, 8, 16, 24] {
        enumerate.push(rd(0, devfn, 0, 4));
        enumerate.push(rd(0, devfn, 0x0e, 1));
    }
    enumerate.extend([
        rd(0, rp, 0x08, 4),
        rd(0, rp, 0x34, 1),
        rd(0, rp, msix, 4),
        rd(0, rp, pcie, 4),
        rd(0, rp, pcie + 2, 2),
        rd(0, rp, 0x100, 4),
        rd(0, rp, 0x18, 4),
        wr(0, rp, 0x04, 2, 0),
        wr(0, rp, 0x10, 4, 0xffff_ffff),
        rd(0, rp, 0x10, 4),
        wr(0, rp, 0x10, 4, 0xc000_0000),
        wr(0, rp, 0x04, 2, 6),
        rd(1, 0, 0, 4),
        rd(1, 8, 0, 4),
        rd(2, 0, 0, 4),
        rd(0, 0, 0xffc, 4),
        PioWrite {
            port: 0xcf8,
            len: 4,
            value: 0x8000_0800,
        },
        PioRead {
            port: 0xcfc,
            len: 4,
        },
        PioRead {
            port: 0xcfe,
            len: 2,
        },
        Inspect,
    ]);

    // Root port MSI-X: program entry 0 through BAR0 (at the bottom of the 32-bit window),
    // enable, bus master, trigger (PME/AER), mask/unmask with a pending vector, read the PBA.
    let bar = |offset| Target::Mmio32(offset);
    let msix_seq = vec![
        MmioWrite {
            target: bar(0),
            len: 4,
            value: 0xfee0_0000,
        },
        MmioWrite {
            target: bar(4),
            len: 4,
            value: 0,
        },
        MmioWrite {
            target: bar(8),
            len: 4,
            value: 0x41,
        },
        MmioWrite {
            target: bar(12),
            len: 4,
            value: 0,
        },
        MmioRead {
            target: bar(0),
            len: 8,
        },
        wr(0, rp, msix + 2, 2, 0x8000),
        Trigger {
            function: 0,
            vector: 0,
        },
        wr(0, rp, 0x04, 2, 6),
        Trigger {
            function: 0,
            vector: 0,
        },
        wr(0, rp, msix + 2, 2, 0xc000),
        Trigger {
            function: 0,
            vector: 0,
        },
        MmioRead {
            target: bar(0x800),
            len: 8,
        },
        wr(0, rp, msix + 2, 2, 0x8000),
        MmioWrite {
            target: bar(12),
            len: 4,
            value: 1,
        },
        Trigger {
            function: 0,
            vector: 0,
        },
        MmioWrite {
            target: bar(12),
            len: 4,
            value: 0,
        },
        MmioWrite {
            target: bar(0x800),
            len: 8,
            value: u64::MAX,
        },
        MmioRead {
            target: bar(0xffc),
            len: 8,
        },
        Trigger {
            function: 0,
            vector: 7,
        },
    ];

    // Endpoints and a second root port: bus renumbering, BAR moves in and out of the bridge
    // windows, window reprogramming, endpoint MSI-X through the doorbell.
    let ep = |devfn| (1u8, devfn);
    let (eb, ef) = ep(0);
    let endpoints = vec![
        rd(eb, ef, 0, 4),
        rd(eb, ef, 0x0e, 1),
        rd(eb, 3, 0, 4),
        rd(eb, 8, 0, 4),
        Inspect,
        MmioRead {
            target: Target::Bar {
                index: 1,
                offset: 0x10,
            },
            len: 4,
        },
        // MSI-X on 01:00.0: table in BAR2 (64-bit window), enable, bus master, doorbell.
        MmioWrite {
            target: Target::Mmio64(0),
            len: 8,
            value: 0xfee0_1000,
        },
        MmioWrite {
            target: Target::Mmio64(8),
            len: 8,
            value: 0x22,
        },
        wr(eb, ef, 0x04, 2, 6),
        wr(eb, ef, 0x42, 2, 0x8000),
        rd(eb, ef, 0x40, 4),
        rd(eb, ef, 0x10, 4),
        // Renumber the root port's secondary bus to 5, then reach the endpoint there.
        wr(0, rp, 0x18, 4, 0x0005_0500),
        rd(5, 0, 0, 4),
        wr(5, 0, 0x04, 2, 6),
        rd(1, 0, 0, 4),
        // Second root port claims an overlapping range.
        wr(0, 16, 0x18, 4, 0x0006_0400),
        rd(5, 0, 0, 4),
        rd(4, 0, 0, 4),
        // Move the endpoint's 64-bit BAR out of the prefetchable window and back.
        wr(5, 0, 0x18, 4, 0x4000_000c),
        wr(5, 0, 0x1c, 4, 0x80),
        Inspect,
        wr(5, 0, 0x18, 4, 0x0000_000c),
        // Shrink the memory window to nothing, then widen it.
        wr(0, rp, 0x20, 4, 0x0000_fff0),
        Inspect,
        wr(0, rp, 0x20, 4, 0xdff0_c000),
        Inspect,
        Trigger {
            function: 2,
            vector: 0,
        },
        Trigger {
            function: 3,
            vector: 64,
        },
        MmioWrite {
            target: Target::Bar {
                index: 0,
                offset: 0x100,
            },
            len: 2,
            value: 1,
        },
    ];

    // Malformed accesses: odd widths, DWORD-crossing, past the window, 8-byte ECAM.
    let malformed = vec![
        rd(0, rp, 0x3, 2),
        rd(0, rp, 0x2, 4),
        rd(0, rp, 0xffe, 4),
        rd(0, rp, 0x10, 0),
        rd(0, rp, 0x10, 3),
        rd(0, rp, 0x10, 16),
        rd(0, rp, 0x18, 8),
        wr(0, rp, 0x18, 8, 0x1122_3344_0005_0500),
        EcamRawRead {
            offset: 0x1000_0000,
            len: 4,
        },
        EcamRawRead {
            offset: u64::MAX - 3,
            len: 4,
        },
        EcamRawWrite {
            offset: u64::MAX - 7,
            len: 8,
            value: 0,
        },
        PioRead {
            port: 0xcf9,
            len: 1,
        },
        PioWrite {
            port: 0xcfb,
            len: 1,
            value: 6,
        },
        PioRead {
            port: 0xcfd,
            len: 4,
        },
        MmioRead {
            target: Target::Raw(u64::MAX),
            len: 8,
        },
        MmioWrite {
            target: Target::Raw(0xc000_0ffc),
            len: 16,
            value: 0,
        },
    ];

    let none = pci::Setup::default();
    let all = pci::Setup {
        endpoints: true,
        second_port: true,
        second_root: false,
    };
    // A second root bus (0x80, root port 80:02.0): enumerate it, then point the first root's
    // port into its bus range (it must not reach the second root's buses) and renumber the
    // second root's port.
    let second_root = pci::Setup {
        endpoints: true,
        second_port: false,
        second_root: true,
    };
    let rp80 = 2 << 3;
    let roots = vec![
        rd(0x80, 0, 0, 4),
        rd(0x80, rp80, 0, 4),
        rd(0x80, rp80, 0x18, 4),
        rd(0x81, 0, 0, 4),
        wr(0, rp, 0x18, 4, 0x0081_8100),
        rd(0x81, 0, 0, 4),
        rd(1, 0, 0, 4),
        wr(0x80, rp80, 0x18, 4, 0x0090_9080),
        rd(0x90, 0, 0, 4),
        rd(0x7f, 0, 0, 4),
        wr(0x80, rp80, 0x18, 4, 0x0000_0000),
        rd(0x80, rp80, 0, 4),
    ];
    vec![
        (
            "pci_root_complex",
            "enumerate",
            pci::encode(none, &enumerate),
        ),
        ("pci_root_complex", "msix", pci::encode(none, &msix_seq)),
        (
            "pci_root_complex",
            "endpoints",
            pci::encode(all, &endpoints),
        ),
        (
            "pci_root_complex",
            "malformed",
            pci::encode(all, &malformed),
        ),
        (
            "pci_root_complex",
            "second-root",
            pci::encode(second_root, &roots),
        ),
    ]
}

fn pio_seeds() -> Vec<Seed> {
    use pio::Op::*;
    let out = |port, value| Out {
        port,
        len: 1,
        value,
    };
    let inb = |port| In { port, len: 1 };
    let com1 = pio::COM1;

    // Linux 8250 probe and console: scratch test, loopback test, divisor latch, IER, output,
    // host input and RX interrupt, LSR/IIR polling.
    let mut uart = vec![
        out(com1 + 7, 0xa5),
        inb(com1 + 7),
        out(com1 + 4, 0x10),
        inb(com1 + 6),
        out(com1, b'x'.into()),
        inb(com1 + 5),
        inb(com1),
        out(com1 + 4, 0x0b),
        out(com1 + 3, 0x80),
        out(com1, 0x01),
        out(com1 + 1, 0x00),
        inb(com1),
        out(com1 + 3, 0x03),
        out(com1 + 2, 0xc7),
        out(com1 + 1, 0x0f),
        inb(com1 + 2),
    ];
    for b in b"hi\n" {
        uart.push(out(com1, u64::from(*b)));
        uart.push(inb(com1 + 5));
    }
    uart.extend([
        HostInput {
            bytes: b"ls\r".to_vec(),
        },
        inb(com1 + 2),
        inb(com1 + 5),
        inb(com1),
        inb(com1),
        inb(com1),
        inb(com1),
        DrainIrqs,
        In { port: com1, len: 2 },
        Out {
            port: com1,
            len: 4,
            value: 0x41,
        },
        out(pio::COM2, b'o'.into()),
        out(pio::COM3, b'e'.into()),
    ]);

    // Platform registers: markers, exit status, S3 (ignored), S5, ACPI reset, i8042, CF9.
    let power = vec![
        out(pio::GUEST_MARKER, 1),
        out(pio::GUEST_EXIT_STATUS, 0),
        Out {
            port: pio::GUEST_MARKER,
            len: 4,
            value: 0x0102_0304,
        },
        inb(pio::GUEST_MARKER),
        out(pio::ACPI_SLEEP_CONTROL, (3 << 2) | 0x20),
        out(pio::ACPI_SLEEP_CONTROL, 5 << 2),
        out(pio::ACPI_SLEEP_CONTROL, (5 << 2) | 0x20),
        inb(pio::ACPI_SLEEP_CONTROL + 1),
        out(pio::ACPI_RESET, 2),
        out(pio::ACPI_RESET, 1),
        inb(pio::I8042_COMMAND),
        out(pio::I8042_COMMAND, 0xd1),
        out(pio::I8042_COMMAND, 0xfe),
        out(pio::RESET_CONTROL, 0x02),
        inb(pio::RESET_CONTROL),
        out(pio::RESET_CONTROL, 0x06),
        In {
            port: pio::RESET_CONTROL,
            len: 4,
        },
        out(0x80, 0x55),
        inb(0x61),
    ];

    // PCI configuration mechanism #1 next to the CF9 register.
    let cf8 = vec![
        Out {
            port: 0xcf8,
            len: 4,
            value: 0x8000_0800,
        },
        In {
            port: 0xcfc,
            len: 4,
        },
        In {
            port: 0xcf8,
            len: 4,
        },
        out(0xcfb, 0x01),
        inb(0xcfb),
        In {
            port: 0xcfa,
            len: 2,
        },
        Out {
            port: 0xcf8,
            len: 4,
            value: 0x8000_0818,
        },
        Out {
            port: 0xcfd,
            len: 1,
            value: 0x07,
        },
        In {
            port: 0xcfe,
            len: 4,
        },
    ];

    let failing = vec![
        out(com1, b'a'.into()),
        out(com1 + 4, 0x10),
        out(com1, b'b'.into()),
        inb(com1),
    ];

    vec![
        (
            "legacy_pio",
            "uart",
            pio::encode(pio::Setup::default(), &uart),
        ),
        (
            "legacy_pio",
            "power",
            pio::encode(pio::Setup::default(), &power),
        ),
        (
            "legacy_pio",
            "cf8",
            pio::encode(pio::Setup::default(), &cf8),
        ),
        (
            "legacy_pio",
            "failing-output",
            pio::encode(
                pio::Setup {
                    failing_output: true,
                },
                &failing,
            ),
        ),
    ]
}

fn dma_seeds() -> Vec<Seed> {
    use dma::Iova::*;
    use dma::Op::*;
    let identity = |layout| dma::Setup {
        layout,
        translator: None,
        pasid: None,
    };

    // Layout 0: within, across the adjacent regions, into the hole, past the end.
    let holes = vec![
        Write {
            iova: RegionStart {
                region: 0,
                delta: 0x10,
            },
            len: 0x20,
            fill: 1,
        },
        Read {
            iova: RegionStart {
                region: 0,
                delta: 0x10,
            },
            len: 0x20,
        },
        Write {
            iova: RegionEnd {
                region: 1,
                delta: -8,
            },
            len: 16,
            fill: 7,
        },
        Read {
            iova: RegionEnd {
                region: 1,
                delta: -8,
            },
            len: 16,
        },
        Write {
            iova: RegionEnd {
                region: 0,
                delta: -4,
            },
            len: 8,
            fill: 9,
        },
        Read {
            iova: RegionEnd {
                region: 2,
                delta: -1,
            },
            len: 2,
        },
        ReadObj {
            iova: RegionStart {
                region: 1,
                delta: 0,
            },
        },
        WriteObj {
            iova: RegionEnd {
                region: 0,
                delta: -4,
            },
            value: u64::MAX,
        },
        Read {
            iova: Raw(0x8000),
            len: 0,
        },
        Translate {
            iova: Raw(0x1000),
            len: 0x1000,
            write: true,
        },
        PageRequest {
            iova: Raw(0x1000),
            flags: 0x83,
        },
        SwapMemory { layout: 3 },
        Read {
            iova: RegionStart {
                region: 1,
                delta: 0,
            },
            len: 0x1001,
        },
        ReadTranslated {
            iova: Raw(0x2000),
            len: 0x100,
        },
        WriteTranslated {
            iova: Raw(0x2ff0),
            len: 0x20,
            fill: 3,
        },
    ];

    // Layout 1: the last page of the address space, and wrapping accesses.
    let top = vec![
        Write {
            iova: Top(7),
            len: 8,
            fill: 0xee,
        },
        Read {
            iova: Top(7),
            len: 8,
        },
        Read {
            iova: Top(7),
            len: 9,
        },
        ReadObj { iova: Top(3) },
        WriteObj {
            iova: Top(0),
            value: 1,
        },
        Read {
            iova: RegionStart {
                region: 1,
                delta: -1,
            },
            len: 2,
        },
        Write {
            iova: RegionEnd {
                region: 1,
                delta: -1,
            },
            len: 0x1001,
            fill: 4,
        },
        Translate {
            iova: Top(0),
            len: u64::MAX,
            write: false,
        },
        Read {
            iova: Raw(u64::MAX),
            len: 0,
        },
    ];

    // A paging translator: faults, read-only pages, zero-length translations, wrapping offset.
    let paged = dma::Setup {
        layout: 0,
        translator: Some(dma::TranslatorParams {
            page_shift: 12,
            offset: 0x1_0000,
            fault_mask: 0x80,
            deny_read_mask: 0x10,
            deny_write_mask: 0x20,
            zero_len_mask: 0x40,
            overshoot: 0,
        }),
        pasid: Some(5),
    };
    let paged_ops = vec![
        Write {
            iova: Raw(0x800),
            len: 0x1000,
            fill: 1,
        },
        Read {
            iova: Raw(0x0),
            len: 0x2800,
        },
        Write {
            iova: Raw(0x5000),
            len: 4,
            fill: 2,
        },
        Read {
            iova: Raw(0x4000),
            len: 4,
        },
        Read {
            iova: Raw(0x6000),
            len: 4,
        },
        Read {
            iova: Raw(0x7000),
            len: 4,
        },
        Translate {
            iova: Raw(0x6000),
            len: 0x10,
            write: true,
        },
        ReadTranslated {
            iova: Raw(0x10),
            len: 0x10,
        },
        PageRequest {
            iova: Raw(0x7000),
            flags: 1,
        },
    ];
    let wrapping = dma::Setup {
        layout: 1,
        translator: Some(dma::TranslatorParams {
            page_shift: 4,
            offset: 0xffff_ffff_ffff_f000,
            fault_mask: 0,
            deny_read_mask: 0,
            deny_write_mask: 0,
            zero_len_mask: 0,
            overshoot: u32::MAX,
        }),
        pasid: None,
    };
    let wrapping_ops = vec![
        Write {
            iova: Raw(0xff8),
            len: 0x10,
            fill: 5,
        },
        Read {
            iova: Raw(0x0),
            len: 0x1000,
        },
        Read {
            iova: Raw(0x1000),
            len: 0x10,
        },
        Translate {
            iova: Top(0),
            len: 1,
            write: false,
        },
    ];

    vec![
        ("dma_space", "holes", dma::encode(identity(0), &holes)),
        ("dma_space", "top", dma::encode(identity(1), &top)),
        ("dma_space", "paged", dma::encode(paged, &paged_ops)),
        (
            "dma_space",
            "wrapping",
            dma::encode(wrapping, &wrapping_ops),
        ),
    ]
}
