//! VMM side of the VT-d vIOMMU: `--iommu vtd[,scalable=on|off][,caching-mode=on|off]
//! [,aw-bits=39|48]` parsing, and the remapping unit's register window (the DRHD) on the
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

/// `--iommu vtd[,scalable=on|off][,caching-mode=on|off][,aw-bits=39|48]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdSpec {
    /// What the remapping unit advertises.
    pub config: VtdConfig,
}

impl VtdSpec {
    /// Parses an `--iommu` value. Defaults: scalable mode on, caching mode off, 48-bit.
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
        Ok(Self { config })
    }
}

/// The DRHD register window: the remapping unit behind the platform's fixed MMIO.
pub struct DrhdWindow(pub RemappingUnit);

impl devices::bus::BusDevice for DrhdWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

/// The unit as the `DmaTranslator` of the functions behind it (their `DmaSpace`s).
pub struct DrhdTranslator(pub Arc<Mutex<DrhdWindow>>);

impl iommu::DmaTranslator for DrhdTranslator {
    fn translate(
        &self,
        request: &iommu::DmaRequest,
    ) -> Result<iommu::Translation, iommu::DmaError> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .translate(request)
    }

    fn register_endpoint(
        &self,
        binding: iommu::FunctionBinding,
        endpoint: Arc<dyn iommu::DeviceEndpoint>,
    ) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .register_endpoint(binding, endpoint);
    }
}

/// Builds the remapping unit, maps its registers at `layout::VTD_DRHD_START` and returns the
/// DMAR configuration that describes it.
pub fn install(
    spec: &VtdSpec,
    memory: crate::cxl::DmaMemory,
    msi: Arc<dyn iommu::MsiSink>,
    platform: &mut crate::pci::Platform,
) -> Result<(Arc<Mutex<DrhdWindow>>, crate::acpi::DmarConfig), String> {
    let unit = Arc::new(Mutex::new(DrhdWindow(RemappingUnit::new(
        spec.config,
        memory,
        msi,
    ))));
    platform.add_fixed_mmio(
        "VT-d remapping unit (DRHD)",
        crate::layout::VTD_DRHD_START,
        crate::layout::VTD_DRHD_SIZE,
        unit.clone(),
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
    }

    #[test]
    fn bad_specs_name_the_value() {
        for (spec, needle) in [
            ("amd", "unknown IOMMU 'amd'"),
            ("vtd,scalable=yes", "scalable=yes"),
            ("vtd,aw-bits=57", "aw-bits=57"),
            ("vtd,colour=red", "unknown key 'colour'"),
            ("vtd,scalable", "not key=value"),
        ] {
            let e = VtdSpec::parse(spec).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains(spec), "{spec}: {e}");
        }
    }
}
