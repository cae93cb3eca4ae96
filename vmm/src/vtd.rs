//! VMM side of the VT-d vIOMMU: `--iommu vtd[,scalable=on|off][,caching-mode=on|off]
//! [,aw-bits=39|48][,pasid-bits=N][,ats=on|off][,pri=on|off]` parsing, and the remapping unit's register window (the DRHD) on the
//! platform's fixed MMIO. The model itself is `iommu::vtd`.

use std::sync::{Arc, Mutex};

use iommu::vtd::registers::VtdConfig;
use iommu::vtd::unit::RemappingUnit;
use thiserror::Error;

/// A bad `--iommu` value.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid --iommu '{spec}': {reason}")]
pub struct IommuSpecError {
    spec: String,
    reason: String,
}

/// `--iommu vtd[,scalable=on|off][,caching-mode=on|off][,aw-bits=39|48][,pasid-bits=N]
/// [,ats=on|off][,pri=on|off]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdSpec {
    /// What the remapping unit advertises.
    pub config: VtdConfig,
}

impl VtdSpec {
    /// Parses an `--iommu` value. Defaults: scalable mode on, caching mode off, 48-bit,
    /// 20-bit PASIDs, ATS and PRI on in scalable mode (off in legacy mode, where Linux does
    /// not use them).
    pub fn parse(spec: &str) -> Result<Self, IommuSpecError> {
        let err = |reason: String| IommuSpecError {
            spec: spec.to_string(),
            reason,
        };
        let mut parts = spec.split(',');
        match parts.next() {
            Some("vtd") => {}
            Some(other) => {
                return Err(err(format!(
                    "unknown IOMMU '{other}' (the one modelled is 'vtd')"
                )));
            }
            None => return Err(err("empty".into())),
        }
        let mut config = VtdConfig::default();
        let (mut ats, mut pri) = (None, None);
        for part in parts.filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err(format!("'{part}' is not key=value")))?;
            let on_off = |v: &str| match v {
                "on" => Ok(true),
                "off" => Ok(false),
                other => Err(err(format!("{key}={other}: expected on or off"))),
            };
            match key {
                "scalable" => config.scalable = on_off(value)?,
                "caching-mode" => config.caching_mode = on_off(value)?,
                "pasid-bits" => {
                    config.pasid_bits = match value.parse::<u8>() {
                        Ok(n @ 1..=20) => n,
                        _ => return Err(err(format!("pasid-bits={value}: expected 1..=20"))),
                    }
                }
                "ats" => ats = Some(on_off(value)?),
                "pri" => pri = Some(on_off(value)?),
                "aw-bits" => {
                    config.address_width = match value {
                        "39" => 39,
                        "48" => 48,
                        other => return Err(err(format!("aw-bits={other}: expected 39 or 48"))),
                    }
                }
                other => return Err(err(format!("unknown key '{other}'"))),
            }
        }
        if !config.scalable && (ats == Some(true) || pri == Some(true)) {
            return Err(err(
                "ats and pri need scalable=on (Linux uses them only in scalable mode)".into(),
            ));
        }
        config.ats = ats.unwrap_or(config.scalable);
        config.pri = pri.unwrap_or(config.ats);
        if config.pri && !config.ats {
            return Err(err(
                "pri=on needs ats=on (page requests follow ATS translation misses)".into(),
            ));
        }
        Ok(Self { config })
    }
}

/// The DRHD register window: the remapping unit behind the platform's fixed MMIO. The unit
/// itself is shared with the devices' DMA (`iommu::vtd::unit::VtdTranslator`) and the control
/// API.
pub struct DrhdWindow(pub Arc<Mutex<RemappingUnit>>);

impl DrhdWindow {
    fn unit(&self) -> std::sync::MutexGuard<'_, RemappingUnit> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl devices::bus::BusDevice for DrhdWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.unit().read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.unit().write(offset, data);
    }
}

/// Builds the remapping unit, maps its registers at `layout::VTD_DRHD_START` and returns the
/// DMAR configuration that describes it.
pub fn install(
    spec: &VtdSpec,
    memory: crate::cxl::DmaMemory,
    msi: Arc<dyn iommu::MsiSink>,
    platform: &mut crate::pci::Platform,
) -> Result<(Arc<Mutex<RemappingUnit>>, crate::acpi::DmarConfig), String> {
    let unit = Arc::new(Mutex::new(RemappingUnit::new(spec.config, memory, msi)));
    platform.add_fixed_mmio(
        "VT-d remapping unit (DRHD)",
        crate::layout::VTD_DRHD_START,
        crate::layout::VTD_DRHD_SIZE,
        Arc::new(Mutex::new(DrhdWindow(unit.clone()))),
    )?;
    let dmar = crate::acpi::DmarConfig {
        host_address_width: spec.config.address_width,
        register_base: crate::layout::VTD_DRHD_START,
    };
    Ok((unit, dmar))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_defaults_and_every_key() {
        let d = VtdSpec::parse("vtd").unwrap().config;
        assert_eq!(
            (d.scalable, d.caching_mode, d.address_width),
            (true, false, 48)
        );
        let c = VtdSpec::parse("vtd,scalable=off,caching-mode=on,aw-bits=39")
            .unwrap()
            .config;
        assert_eq!(
            (c.scalable, c.caching_mode, c.address_width),
            (false, true, 39)
        );
        assert!(!c.ats && !c.pri, "legacy mode: no ATS/PRI");
        assert_eq!((d.pasid_bits, d.ats, d.pri), (20, true, true));
        let n = VtdSpec::parse("vtd,pasid-bits=8,ats=on,pri=off")
            .unwrap()
            .config;
        assert_eq!((n.pasid_bits, n.ats, n.pri), (8, true, false));
        let a = VtdSpec::parse("vtd,ats=off").unwrap().config;
        assert!(!a.ats && !a.pri, "pri follows ats");
    }

    #[test]
    fn bad_specs_name_the_value() {
        for (spec, needle) in [
            ("amd", "unknown IOMMU 'amd'"),
            ("vtd,scalable=yes", "scalable=yes"),
            ("vtd,aw-bits=57", "aw-bits=57"),
            ("vtd,colour=red", "unknown key 'colour'"),
            ("vtd,scalable", "not key=value"),
            ("vtd,pasid-bits=21", "pasid-bits=21"),
            ("vtd,pasid-bits=0", "pasid-bits=0"),
            ("vtd,ats=off,pri=on", "pri=on needs ats=on"),
            ("vtd,scalable=off,ats=on", "need scalable=on"),
        ] {
            let e = VtdSpec::parse(spec).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains(spec), "{spec}: {e}");
        }
    }
}
