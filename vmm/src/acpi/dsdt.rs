//! DSDT (§5.2.11.1): the AML namespace — PCI host bridge (or CXL host bridge with its `_OSC`),
//! ECAM reservation, the CXL root object, UARTs, processors, `_S5_`.

use super::*;

/// DSDT revision 2: AML integers are 64 bits wide (§5.2.11.1; ASL `DefinitionBlock`, §19.6).
pub(super) const DSDT_REVISION: u8 = 2;

/// Control bits of the PCI host bridge `_OSC` granted to the OS (PCI Firmware Spec 3.3 §4.5.1):
/// native PCIe hot-plug, SHPC hot-plug, PME, AER, PCIe capability structure.
pub(super) const OSC_GRANTED_CONTROL: u8 = 0x1f;
/// `_OSC` UUID for PCI/PCIe host bridges (PCI Firmware Spec 3.3 §4.5.1).
pub(super) const PCI_HOST_BRIDGE_OSC_UUID: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";
/// `_OSC` status bits in the first capabilities dword (§6.2.11).
pub(super) const OSC_UNRECOGNIZED_UUID: u8 = 1 << 2;
pub(super) const OSC_UNRECOGNIZED_REVISION: u8 = 1 << 3;
pub(super) const OSC_CAPABILITIES_MASKED: u8 = 1 << 4;

/// `_OSC` UUID of CXL host bridges (CXL 2.0 §9.14.2), 5 capability dwords: the PCIe ones, then
/// CXL support (CDW4) and CXL control (CDW5).
pub(super) const CXL_HOST_BRIDGE_OSC_UUID: &str = "68F2D50B-C469-4D8A-BD3D-941A103FD3FC";
/// CXL `_OSC` control bits granted to the OS: CXL memory error reporting (CDW5 bit 0).
pub(super) const CXL_OSC_GRANTED_CONTROL: u8 = 0x01;
/// `_OSC` status bit: `_OSC` failure (§6.2.11).
pub(super) const OSC_FAILURE: u8 = 1 << 1;
/// `_DSM` UUID of the CXL root object's QoS throttling group query (CXL 3.0 §9.17.3.1; Linux
/// `acpi_cxl_qtg_id_guid`).
pub(super) const CXL_QTG_DSM_UUID: &str = "F365F9A6-A7DE-4071-A66A-B40C0B4F8E52";
/// `_STA` of `\_SB.CXLM`: present, enabled, functioning, not shown in UI.
pub(super) const CXL_ROOT_STA: u8 = 0x0b;

/// Legacy I/O port ranges routed through the host bridge, leaving out 0xCF8..0xCFF (PCI
/// configuration mechanism #1).
pub(super) const PCI_IO_WINDOWS: [(u16, u16); 2] = [(0x0000, 0x0cf7), (0x0d00, 0xffff)];

/// `Device (name) { children }` (ASL `Device`, §19.6) as AML bytes.
pub(super) fn device(name: &str, children: &[&dyn Aml]) -> Vec<u8> {
    aml_bytes(&aml::Device::new(Path::new(name), children.to_vec()))
}

/// Already-encoded AML passed through as it is.
pub(super) struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.0);
    }
}

/// ISA IRQ resource descriptor (§6.4.2.1): `IRQNoFlags` (2-byte form: edge, active high,
/// exclusive), or, when the IRQ is shared, `IRQ (Edge, ActiveHigh, Shared)` (3-byte form).
pub(super) struct IsaIrq {
    irq: u8,
    shared: bool,
}

impl Aml for IsaIrq {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let mask = 1u16 << (self.irq & 0xf);
        if self.shared {
            sink.byte(0x23);
            sink.word(mask);
            // Bit 0 edge triggered, bit 3 clear (active high), bit 4 shared.
            sink.byte(0x11);
        } else {
            sink.byte(0x22);
            sink.word(mask);
        }
    }
}

/// DSDT (§5.2.11.1), revision 2 (64-bit AML integers).
///
/// ```text
/// Scope (\_SB) {
///   Device (PCI0) {                   // PCI Express host bridge (§6.1, PCI FW Spec §4.3)
///     _HID EisaId("PNP0A08"), _CID EisaId("PNP0A03"), _SEG, _UID 0, _BBN
///     _CRS: WordBusNumber, WordIO x2, DWordMemory (MMIO32), QWordMemory (MMIO64)
///     _OSC: grants native hot-plug, SHPC, PME, AER, PCIe capability control
///   }                                 // with CXL: _HID "ACPI0016", _CID { PNP0A08, PNP0A03 },
///                                     // _UID = CHBS UID, _PXM 0, _OSC also for the CXL UUID
///   Device (PCIn) { ACPI0016, _UID, _SEG, _BBN, _PXM 0, _CRS (buses, MMIO32, MMIO64), _OSC }
///                                     // each further CXL host bridge: a root bus of its own
///   Device (CXLM) { _HID "ACPI0017", _STA, _DSM (QTG) }                  // with CXL only
///   Device (MRES) { _HID EisaId("PNP0C02"), _UID 0, _CRS Memory32Fixed(ECAM) }
///   Device (COMn) { _HID EisaId("PNP0501"), _UID n, _CRS IO + IRQ }      // n = 1..3
///   Device (Cnnn) { _HID "ACPI0007", _UID n }                            // one per vCPU (§8.4)
/// }
/// Name (_S5_, Package { 5, 0, 0, 0 })                                     // §7.4.2
/// <extra AML>
/// ```
/// `_ADR` is left out of PCI0: a device carries `_HID` or `_ADR`, not both (§6.1). No `_PRT`: the
/// devices use MSI/MSI-X.
pub(super) fn build_dsdt(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    // Validated: with CXL the first host bridge is \_SB.PCI0, further ones have root buses.
    let cxl_uid = cfg
        .cxl
        .as_ref()
        .and_then(|cxl| cxl.host_bridges.first())
        .map(|hb| hb.uid);
    let mut sb_children = pci_host_bridge(&cfg.first_root(), cxl_uid);
    if let Some(cxl) = &cfg.cxl {
        for (index, hb) in cxl.host_bridges.iter().enumerate().skip(1) {
            if let Some(root) = &hb.pci_root {
                sb_children.extend_from_slice(&host_bridge_device(
                    &format!("PCI{index}"),
                    cfg.pci_segment.segment,
                    root,
                    false,
                    Some(hb.uid),
                ));
            }
        }
        sb_children.extend_from_slice(&cxl_root_device(cxl));
    }
    sb_children.extend_from_slice(&ecam_reservation(&cfg.pci_segment));
    sb_children.extend_from_slice(&serial_ports()?);
    for cpu in 0..cfg.num_cpus {
        let hid: &dyn Aml = &"ACPI0007";
        sb_children.extend_from_slice(&device(
            &format!("C{cpu:03X}"),
            &[
                &aml::Name::new("_HID".into(), hid),
                &aml::Name::new("_UID".into(), &u32::from(cpu)),
            ],
        ));
    }

    let sb_raw = RawAml(&sb_children);
    let sb = aml::Scope::new("\\_SB_".into(), vec![&sb_raw]);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&layout::ACPI_S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    );
    let mut body = aml_bytes(&sb);
    s5.to_aml_bytes(&mut body);
    body.extend_from_slice(&cfg.extra_dsdt_aml);

    if body.len() > usize::try_from(layout::ACPI_SIZE).unwrap_or(usize::MAX) {
        return Err(AcpiError::TooLarge {
            needed: u64::try_from(body.len()).unwrap_or(u64::MAX),
            available: layout::ACPI_SIZE,
        });
    }
    let mut dsdt = Sdt::new(
        *b"DSDT",
        HEADER_LEN as u32,
        DSDT_REVISION,
        OEM_ID,
        table_id(b"DSDT"),
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

/// `\_SB.PCI0`, the PCIe host bridge. Its `_CRS` (§6.2.2) produces the bus range
/// (WordBusNumber, §6.4.3.5.3), the legacy I/O ports except 0xCF8..0xCFF (WordIO), the 32-bit
/// window (DWordMemory, §6.4.3.5.2) and the 64-bit window (QWordMemory, §6.4.3.5.1). Both memory
/// windows are non-cacheable (not prefetchable) so that Linux accepts any BAR inside them.
/// The caller validated every range, so the descriptors' `max - min + 1` cannot overflow.
///
/// With `cxl_uid` the bridge is also the CXL 2.0 host bridge of that CHBS UID (see the module
/// documentation); without it the bytes are exactly those of a plain PCIe host bridge.
pub(super) fn pci_host_bridge(pci: &PciSegmentConfig, cxl_uid: Option<u32>) -> Vec<u8> {
    host_bridge_device(
        "PCI0",
        pci.segment,
        &PciRootConfig {
            bus_start: pci.bus_start,
            bus_end: pci.bus_end,
            mmio32_base: pci.mmio32_base,
            mmio32_size: pci.mmio32_size,
            mmio64_base: pci.mmio64_base,
            mmio64_size: pci.mmio64_size,
        },
        true,
        cxl_uid,
    )
}

/// A PCI host bridge device `name` over `root`'s bus numbers and windows (with the legacy I/O
/// ports if `legacy_io`): plain PCIe, or the ACPI0016 CXL host bridge of CHBS UID `cxl_uid`.
pub(super) fn host_bridge_device(
    name: &str,
    segment: u16,
    root: &PciRootConfig,
    legacy_io: bool,
    cxl_uid: Option<u32>,
) -> Vec<u8> {
    let pci = root;
    let bus = aml::AddressSpace::new_bus_number(u16::from(pci.bus_start), u16::from(pci.bus_end));
    let io: Vec<aml::AddressSpace<u16>> = PCI_IO_WINDOWS
        .iter()
        .filter(|_| legacy_io)
        .map(|&(min, max)| aml::AddressSpace::new_io(min, max, None))
        .collect();
    // Validated: the window is non-empty and ends at or below 4 GiB.
    let mmio32_min = pci.mmio32_base as u32;
    let mmio32_max = range_last(pci.mmio32_base, pci.mmio32_size).unwrap_or(pci.mmio32_base) as u32;
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio32_min,
        mmio32_max,
        None,
    );
    let mmio64 = range_last(pci.mmio64_base, pci.mmio64_size).map(|max| {
        aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            pci.mmio64_base,
            max,
            None,
        )
    });
    let mut resources: Vec<&dyn Aml> = vec![&bus];
    for window in &io {
        resources.push(window);
    }
    resources.push(&mmio32);
    if let Some(window) = &mmio64 {
        resources.push(window);
    }
    let crs = aml::ResourceTemplate::new(resources);

    let pcie = aml::EISAName::new("PNP0A08");
    let pci_compat = aml::EISAName::new("PNP0A03");
    let segment = u32::from(segment);
    let bbn = u32::from(pci.bus_start);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let seg = aml::Name::new("_SEG".into(), &segment);
    let bbn = aml::Name::new("_BBN".into(), &bbn);
    match cxl_uid {
        None => device(
            name,
            &[
                &aml::Name::new("_HID".into(), &pcie),
                &aml::Name::new("_CID".into(), &pci_compat),
                &seg,
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &bbn,
                &crs,
                &RawAml(&pci_host_bridge_osc()),
            ],
        ),
        Some(uid) => {
            let hid: &dyn Aml = &"ACPI0016";
            let cids = aml::Package::new(vec![&pcie, &pci_compat]);
            // The CXL window adds a NUMA node; without _PXM Linux leaves the root bus (and every
            // PCI device) on no node and warns "Unknown NUMA node".
            let pxm = aml::Name::new("_PXM".into(), &aml::ZERO);
            device(
                name,
                &[
                    &aml::Name::new("_HID".into(), hid),
                    &aml::Name::new("_CID".into(), &cids),
                    &seg,
                    &aml::Name::new("_UID".into(), &uid),
                    &bbn,
                    &pxm,
                    &crs,
                    &RawAml(&cxl_host_bridge_osc()),
                ],
            )
        }
    }
}

/// `_OSC` for the PCI host bridge (§6.2.11; PCI Firmware Spec 3.3 §4.5):
///
/// ```text
/// Method (_OSC, 4) {
///   CreateDWordField (Arg3, 0, CDW1)
///   If (Arg0 == ToUUID ("33DB4D5B-1FF7-401C-9657-7441C03DD766")) {
///     CreateDWordField (Arg3, 8, CDW3)
///     Local0 = CDW3 & 0x1F
///     If (Arg1 != 1) { CDW1 |= 0x08 }          // unrecognized revision
///     If (CDW3 != Local0) { CDW1 |= 0x10 }     // capabilities masked
///     CDW3 = Local0
///   } Else { CDW1 |= 0x04 }                    // unrecognized UUID
///   Return (Arg3)
/// }
/// ```
/// Without `_OSC`, Linux keeps AER, PME and native hot-plug away from its PCIe port drivers.
pub(super) fn pci_host_bridge_osc() -> Vec<u8> {
    let cdw1 = Path::new("CDW1");
    let cdw3 = Path::new("CDW3");
    let arg3 = aml::Arg(3);
    let local0 = aml::Local(0);

    let create_cdw1 = aml::CreateDWordField::new(&cdw1, &arg3, &aml::ZERO);
    let create_cdw3 = aml::CreateDWordField::new(&cdw3, &arg3, &8u8);
    let mask = aml::And::new(&local0, &cdw3, &OSC_GRANTED_CONTROL);
    let bad_revision = aml::NotEqual::new(&aml::Arg(1), &aml::ONE);
    let flag_revision = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_REVISION);
    let if_revision = aml::If::new(&bad_revision, vec![&flag_revision]);
    let masked = aml::NotEqual::new(&cdw3, &local0);
    let flag_masked = aml::Or::new(&cdw1, &cdw1, &OSC_CAPABILITIES_MASKED);
    let if_masked = aml::If::new(&masked, vec![&flag_masked]);
    let store = aml::Store::new(&cdw3, &local0);

    let uuid = aml::Uuid::new(PCI_HOST_BRIDGE_OSC_UUID);
    let is_pci = aml::Equal::new(&aml::Arg(0), &uuid);
    let if_pci = aml::If::new(
        &is_pci,
        vec![&create_cdw3, &mask, &if_revision, &if_masked, &store],
    );
    let flag_uuid = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
    let else_other = aml::Else::new(vec![&flag_uuid]);
    let ret = aml::Return::new(&arg3);

    aml_bytes(&aml::Method::new(
        "_OSC".into(),
        4,
        false,
        vec![&create_cdw1, &if_pci, &else_other, &ret],
    ))
}

/// `_OSC` for the CXL host bridge (§6.2.11; PCI Firmware Spec 3.3 §4.5; CXL 2.0 §9.14.2): the
/// PCIe UUID as in [`pci_host_bridge_osc`], and the CXL UUID, whose first three dwords are the
/// PCIe ones and whose CDW5 is the CXL control field:
///
/// ```text
/// Method (_OSC, 4) {
///   CreateDWordField (Arg3, 0, CDW1)
///   Local0 = 0
///   If (Arg0 == ToUUID ("33DB4D5B-1FF7-401C-9657-7441C03DD766")) { Local0 = 1 }
///   If (Arg0 == ToUUID ("68F2D50B-C469-4D8A-BD3D-941A103FD3FC")) { Local0 = 2 }
///   If (Local0 != 0) {
///     CreateDWordField (Arg3, 8, CDW3)
///     Local1 = CDW3 & 0x1F
///     If (Arg1 != 1) { CDW1 |= 0x08 }          // unrecognized revision
///     If (CDW3 != Local1) { CDW1 |= 0x10 }     // capabilities masked
///     CDW3 = Local1
///     If (Local0 == 2) {
///       If (SizeOf (Arg3) < 20) { CDW1 |= 0x02 }       // _OSC failure: no CDW5
///       Else {
///         CreateDWordField (Arg3, 16, CDW5)
///         Local1 = CDW5 & 0x01                 // CXL memory error reporting
///         If (CDW5 != Local1) { CDW1 |= 0x10 }
///         CDW5 = Local1
///       }
///     }
///   } Else { CDW1 |= 0x04 }                    // unrecognized UUID
///   Return (Arg3)
/// }
/// ```
/// CDW4 (the OS's CXL support field) is returned as it came. Linux asks with the CXL UUID and
/// falls back to the PCIe UUID if that fails (drivers/acpi/pci_root.c).
pub(super) fn cxl_host_bridge_osc() -> Vec<u8> {
    let cdw1 = Path::new("CDW1");
    let cdw3 = Path::new("CDW3");
    let cdw5 = Path::new("CDW5");
    let arg3 = aml::Arg(3);
    let local0 = aml::Local(0);
    let local1 = aml::Local(1);
    let two = 2u8;

    let create_cdw1 = aml::CreateDWordField::new(&cdw1, &arg3, &aml::ZERO);
    let init_kind = aml::Store::new(&local0, &aml::ZERO);
    let pci_uuid = aml::Uuid::new(PCI_HOST_BRIDGE_OSC_UUID);
    let is_pci = aml::Equal::new(&aml::Arg(0), &pci_uuid);
    let set_pci = aml::Store::new(&local0, &aml::ONE);
    let if_pci = aml::If::new(&is_pci, vec![&set_pci]);
    let cxl_uuid = aml::Uuid::new(CXL_HOST_BRIDGE_OSC_UUID);
    let is_cxl = aml::Equal::new(&aml::Arg(0), &cxl_uuid);
    let set_cxl = aml::Store::new(&local0, &two);
    let if_cxl = aml::If::new(&is_cxl, vec![&set_cxl]);

    // PCIe control (CDW3), as for a PCIe host bridge.
    let create_cdw3 = aml::CreateDWordField::new(&cdw3, &arg3, &8u8);
    let mask = aml::And::new(&local1, &cdw3, &OSC_GRANTED_CONTROL);
    let bad_revision = aml::NotEqual::new(&aml::Arg(1), &aml::ONE);
    let flag_revision = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_REVISION);
    let if_revision = aml::If::new(&bad_revision, vec![&flag_revision]);
    let masked = aml::NotEqual::new(&cdw3, &local1);
    let flag_masked = aml::Or::new(&cdw1, &cdw1, &OSC_CAPABILITIES_MASKED);
    let if_masked = aml::If::new(&masked, vec![&flag_masked]);
    let store3 = aml::Store::new(&cdw3, &local1);

    // CXL control (CDW5).
    let size = aml::SizeOf::new(&arg3);
    let too_short = aml::LessThan::new(&size, &20u8);
    let flag_failure = aml::Or::new(&cdw1, &cdw1, &OSC_FAILURE);
    let if_short = aml::If::new(&too_short, vec![&flag_failure]);
    let create_cdw5 = aml::CreateDWordField::new(&cdw5, &arg3, &16u8);
    let mask5 = aml::And::new(&local1, &cdw5, &CXL_OSC_GRANTED_CONTROL);
    let masked5 = aml::NotEqual::new(&cdw5, &local1);
    let if_masked5 = aml::If::new(&masked5, vec![&flag_masked]);
    let store5 = aml::Store::new(&cdw5, &local1);
    let else_long = aml::Else::new(vec![&create_cdw5, &mask5, &if_masked5, &store5]);
    let is_cxl_kind = aml::Equal::new(&local0, &two);
    let if_cxl_kind = aml::If::new(&is_cxl_kind, vec![&if_short, &else_long]);

    let known = aml::NotEqual::new(&local0, &aml::ZERO);
    let if_known = aml::If::new(
        &known,
        vec![
            &create_cdw3,
            &mask,
            &if_revision,
            &if_masked,
            &store3,
            &if_cxl_kind,
        ],
    );
    let flag_uuid = aml::Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
    let else_other = aml::Else::new(vec![&flag_uuid]);
    let ret = aml::Return::new(&arg3);

    aml_bytes(&aml::Method::new(
        "_OSC".into(),
        4,
        false,
        vec![
            &create_cdw1,
            &init_kind,
            &if_pci,
            &if_cxl,
            &if_known,
            &else_other,
            &ret,
        ],
    ))
}

/// `\_SB.CXLM`, the CXL root object (`ACPI0017`, CXL 2.0 §9.14.1) Linux's `cxl_acpi` binds to:
///
/// ```text
/// Device (CXLM) {
///   Name (_HID, "ACPI0017")
///   Method (_STA) { Return (0x0B) }
///   Method (_DSM, 4) {
///     If (Arg0 == ToUUID ("F365F9A6-A7DE-4071-A66A-B40C0B4F8E52")) {   // QTG query
///       If (Arg2 == 0) { Return (Buffer { 0x03 }) }                     // functions 0 and 1
///       If (Arg2 == 1) { Return (Package { max QTG id, Package { QTG ids of the windows } }) }
///     }
///     Return (Buffer { 0 })
///   }
/// }
/// ```
/// Linux evaluates the QTG `_DSM` only for devices whose CDAT gives performance data; it then
/// compares the answer with the CFMWS QTG ids.
pub(super) fn cxl_root_device(cxl: &CxlConfig) -> Vec<u8> {
    let mut qtg_ids: Vec<u16> = Vec::new();
    for window in &cxl.windows {
        if !qtg_ids.contains(&window.qtg_id) {
            qtg_ids.push(window.qtg_id);
        }
    }
    let max_qtg = qtg_ids.iter().copied().max().unwrap_or(0);
    let ids: Vec<&dyn Aml> = qtg_ids.iter().map(|id| id as &dyn Aml).collect();
    let id_package = aml::Package::new(ids);
    let answer = aml::Package::new(vec![&max_qtg, &id_package]);

    let functions = aml::BufferData::new(vec![0x03]);
    let nothing = aml::BufferData::new(vec![0x00]);
    let is_query = aml::Equal::new(&aml::Arg(2), &aml::ZERO);
    let ret_functions = aml::Return::new(&functions);
    let if_query = aml::If::new(&is_query, vec![&ret_functions]);
    let is_qtg = aml::Equal::new(&aml::Arg(2), &aml::ONE);
    let ret_answer = aml::Return::new(&answer);
    let if_qtg = aml::If::new(&is_qtg, vec![&ret_answer]);
    let uuid = aml::Uuid::new(CXL_QTG_DSM_UUID);
    let is_uuid = aml::Equal::new(&aml::Arg(0), &uuid);
    let if_uuid = aml::If::new(&is_uuid, vec![&if_query, &if_qtg]);
    let ret_nothing = aml::Return::new(&nothing);
    let dsm = aml::Method::new("_DSM".into(), 4, false, vec![&if_uuid, &ret_nothing]);

    let sta_value = CXL_ROOT_STA;
    let ret_sta = aml::Return::new(&sta_value);
    let sta = aml::Method::new("_STA".into(), 0, false, vec![&ret_sta]);
    let hid: &dyn Aml = &"ACPI0017";
    device("CXLM", &[&aml::Name::new("_HID".into(), hid), &sta, &dsm])
}

/// `\_SB.MRES`, a motherboard resource device (`PNP0C02`) whose `_CRS` (Memory32Fixed,
/// §6.4.3.4) covers the decoded ECAM range. The PCI Firmware Spec 3.3 §4.1.2 asks for this
/// reservation; Linux's `pci_mmcfg_late_init` refuses MCFG without it.
pub(super) fn ecam_reservation(pci: &PciSegmentConfig) -> Vec<u8> {
    // Validated: the region lies below 4 GiB, so both values fit.
    let (base, size) = pci.ecam_region();
    let ecam = aml::Memory32Fixed::new(true, base as u32, size as u32);
    let crs = aml::ResourceTemplate::new(vec![&ecam]);
    let hid = aml::EISAName::new("PNP0C02");
    device(
        "MRES",
        &[
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
}

/// `\_SB.COM1..COM3` (`PNP0501`, 16550A-compatible), one per UART in [`crate::layout`], with an
/// 8-port `IO` descriptor (§6.4.2.5) and its ISA IRQ. A UART sharing its IRQ with another gets
/// the shared IRQ form. Under HW-reduced ACPI these entries are what give ttyS0..2 interrupts.
pub(super) fn serial_ports() -> Result<Vec<u8>, AcpiError> {
    let ports = [
        ("COM1", layout::COM1_PORT, layout::COM1_IRQ),
        ("COM2", layout::COM2_PORT, layout::COM2_IRQ),
        ("COM3", layout::COM3_PORT, layout::COM3_IRQ),
    ];
    let mut bytes = Vec::new();
    for (index, &(name, port, irq)) in ports.iter().enumerate() {
        let isa_irq = u8::try_from(irq)
            .ok()
            .filter(|irq| *irq < 16)
            .ok_or(AcpiError::InvalidIsaIrq(irq))?;
        let shared = ports
            .iter()
            .enumerate()
            .any(|(other, &(_, _, other_irq))| other != index && other_irq == irq);
        let io = aml::IO::new(port, port, 1, 8);
        let irq = IsaIrq {
            irq: isa_irq,
            shared,
        };
        let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
        let hid = aml::EISAName::new("PNP0501");
        // `index` < 3, so the conversion cannot fail.
        let uid = u32::try_from(index + 1).unwrap_or(u32::MAX);
        bytes.extend_from_slice(&device(
            name,
            &[
                &aml::Name::new("_HID".into(), &hid),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        ));
    }
    Ok(bytes)
}
