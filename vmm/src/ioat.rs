//! VMM side of the emulated Intel I/OAT DMA engine: `--ioat [id=NAME][,channels=N]`
//! parsing, and placing each function on the root bus with its DMA going through the IOMMU
//! (when `--iommu vtd` is given) or straight to guest memory. The model is `devices::ioat`.

use std::sync::{Arc, Mutex};

use devices::ioat::{IoatConfig, IoatFunction, MAX_CHANNELS};
use devices::pci::{PciAddress, SharedFunction};
use iommu::{DmaSpace, DmaTranslator, MsiSink};
use thiserror::Error;

/// How many `--ioat` functions a VM may have.
pub const MAX_FUNCTIONS: usize = 8;

/// A bad `--ioat` value.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid --ioat '{spec}': {reason}")]
pub struct IoatSpecError {
    spec: String,
    reason: String,
}

/// `--ioat [id=NAME][,channels=N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoatSpec {
    /// Name for logs and the control API (default `ioat<index>`).
    pub id: String,
    /// DMA channels (default 1, as each Skylake-X CBDMA function has).
    pub channels: u8,
}

impl IoatSpec {
    /// Parses the `index`-th `--ioat` value (may be empty: every default).
    pub fn parse(spec: &str, index: usize) -> Result<Self, IoatSpecError> {
        let err = |reason: String| IoatSpecError {
            spec: spec.to_string(),
            reason,
        };
        let mut out = IoatSpec {
            id: format!("ioat{index}"),
            channels: 1,
        };
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err(format!("'{part}' is not key=value")))?;
            match key {
                "id" => {
                    crate::config::check_device_id(value).map_err(err)?;
                    out.id = value.to_string();
                }
                "channels" => {
                    out.channels = value
                        .parse::<u8>()
                        .ok()
                        .filter(|n| (1..=MAX_CHANNELS).contains(n))
                        .ok_or_else(|| {
                            err(format!(
                                "channels={value}: expected 1..={MAX_CHANNELS} (the ioatdma driver's limit)"
                            ))
                        })?;
                }
                other => return Err(err(format!("unknown key '{other}' (keys: id, channels)"))),
            }
        }
        Ok(out)
    }

    /// Parses every `--ioat` value, refusing duplicate ids and too many functions.
    pub fn parse_all(specs: &[String]) -> Result<Vec<Self>, String> {
        crate::config::parse_device_specs(
            "ioat",
            specs,
            MAX_FUNCTIONS,
            |s, i| Self::parse(s, i).map_err(|e| e.to_string()),
            |spec| &spec.id,
        )
    }
}

/// The root-bus device number of the `index`-th I/OAT function (00:10.0, 00:11.0, …: clear of
/// the PCIe root port at 00:01.0 and the CXL root ports from 00:02.0).
pub fn device_number(index: usize) -> u8 {
    0x10 + index as u8
}

/// An installed I/OAT function.
#[derive(Clone)]
pub struct IoatHandle {
    /// Its `id=`.
    pub id: String,
    /// Where it sits.
    pub address: PciAddress,
    /// The model (for the control API and tests).
    pub function: Arc<Mutex<IoatFunction>>,
}

/// Adds one function per spec to the root bus. Their DMA goes through `translator` (the VT-d
/// unit) or, without one, to guest memory untranslated.
pub fn install(
    specs: &[IoatSpec],
    memory: &crate::cxl::DmaMemory,
    msi: &Arc<dyn MsiSink>,
    translator: Option<Arc<dyn DmaTranslator>>,
    platform: &mut crate::pci::Platform,
) -> Result<Vec<IoatHandle>, String> {
    let mut handles = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        let device = device_number(index);
        let rid = iommu::RequesterId::new(0, device, 0);
        let dma = match &translator {
            Some(t) => DmaSpace::with_translator(rid, memory.clone(), t.clone()),
            None => DmaSpace::identity(rid, memory.clone()),
        };
        let function = IoatFunction::new(
            IoatConfig {
                channels: spec.channels,
                ..Default::default()
            },
            dma,
            msi.clone(),
        )
        .map_err(|e| format!("--ioat {}: {e}", spec.id))?;
        let (shared, handle) = SharedFunction::new(function);
        let address = platform.add_root_bus_function(device, Box::new(shared))?;
        log::info!(
            "I/OAT {} at {address} ({} channel(s)){}",
            spec.id,
            spec.channels,
            if translator.is_some() {
                ", DMA through the VT-d unit"
            } else {
                ""
            }
        );
        handles.push(IoatHandle {
            id: spec.id.clone(),
            address,
            function: handle,
        });
    }
    Ok(handles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_defaults() {
        assert_eq!(
            IoatSpec::parse("", 2).unwrap(),
            IoatSpec {
                id: "ioat2".into(),
                channels: 1
            }
        );
        assert_eq!(
            IoatSpec::parse("id=dma0,channels=4", 0).unwrap(),
            IoatSpec {
                id: "dma0".into(),
                channels: 4
            }
        );
    }

    #[test]
    fn bad_specs_name_the_value() {
        for (spec, needle) in [
            ("channels=0", "channels=0"),
            ("channels=5", "channels=5"),
            ("channels=two", "channels=two"),
            ("id=", "id=:"),
            ("id=a/b", "id=a/b"),
            ("colour=red", "unknown key 'colour'"),
            ("channels", "not key=value"),
        ] {
            let e = IoatSpec::parse(spec, 0).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains(spec), "{spec}: {e}");
        }
        let dup = IoatSpec::parse_all(&["id=a".into(), "id=a".into()]).unwrap_err();
        assert!(dup.contains("'a' is used twice"), "{dup}");
        let many = IoatSpec::parse_all(&vec![String::new(); 9]).unwrap_err();
        assert!(many.contains("at most 8"), "{many}");
    }
}
