//! VMM side of the SVA DMA engine: `--dma-engine [id=NAME][,ats=on|off][,pri=on|off]` parsing,
//! and placing each engine on the root bus with its DMA — translation requests, page requests,
//! PASID-tagged accesses — going through the VT-d unit (`--iommu vtd`). The model is
//! `devices::sva_engine`; the register interface is docs/sva-engine.md.

use std::sync::{Arc, Mutex};

use devices::pci::{PciAddress, SharedFunction};
use devices::sva_engine::{SvaEngineConfig, SvaEngineFunction};
use iommu::{DmaSpace, DmaTranslator, MsiSink};
use thiserror::Error;

/// How many `--dma-engine` functions a VM may have.
pub const MAX_FUNCTIONS: usize = 8;

/// A bad `--dma-engine` value.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid --dma-engine '{spec}': {reason}")]
pub struct DmaEngineSpecError {
    spec: String,
    reason: String,
}

/// `--dma-engine [id=NAME][,ats=on|off][,pri=on|off]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaEngineSpec {
    /// Name for logs and the control API (default `dma<index>`).
    pub id: String,
    /// The ATS capability (default on).
    pub ats: bool,
    /// The PRI capability (default on; needs ATS).
    pub pri: bool,
}

impl DmaEngineSpec {
    /// Parses the `index`-th `--dma-engine` value (may be empty: every default).
    pub fn parse(spec: &str, index: usize) -> Result<Self, DmaEngineSpecError> {
        let err = |reason: String| DmaEngineSpecError {
            spec: spec.to_string(),
            reason,
        };
        let mut out = DmaEngineSpec {
            id: format!("dma{index}"),
            ats: true,
            pri: true,
        };
        let mut pri_given = false;
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err(format!("'{part}' is not key=value")))?;
            let on_off = |v: &str| match v {
                "on" => Ok(true),
                "off" => Ok(false),
                _ => Err(err(format!("{key}={v}: expected on or off"))),
            };
            match key {
                "id" => {
                    crate::config::check_device_id(value).map_err(err)?;
                    out.id = value.to_string();
                }
                "ats" => out.ats = on_off(value)?,
                "pri" => {
                    out.pri = on_off(value)?;
                    pri_given = true;
                }
                other => {
                    return Err(err(format!("unknown key '{other}' (keys: id, ats, pri)")));
                }
            }
        }
        if !out.ats && out.pri {
            if pri_given {
                return Err(err(
                    "pri=on needs ats=on (page requests follow a denied ATS translation)".into(),
                ));
            }
            // ats=off alone: no PRI either.
            out.pri = false;
        }
        Ok(out)
    }

    /// Parses every `--dma-engine` value, refusing duplicate ids and too many functions.
    pub fn parse_all(specs: &[String]) -> Result<Vec<Self>, String> {
        crate::config::parse_device_specs(
            "dma-engine",
            specs,
            MAX_FUNCTIONS,
            |s, i| Self::parse(s, i).map_err(|e| e.to_string()),
            |spec| &spec.id,
        )
    }
}

/// The root-bus device number of the `index`-th engine (00:18.0, 00:19.0, …: after the eight
/// I/OAT slots from 00:10.0).
pub fn device_number(index: usize) -> u8 {
    0x18 + index as u8
}

/// An installed engine.
#[derive(Clone)]
pub struct DmaEngineHandle {
    /// Its `id=`.
    pub id: String,
    /// Where it sits.
    pub address: PciAddress,
    /// The model (for the control API and tests).
    pub function: Arc<Mutex<SvaEngineFunction>>,
}

/// Adds one engine per spec to the root bus. Their DMA goes through `translator` (the VT-d
/// unit) or, without one, to guest memory untranslated (no PASIDs, no SVA).
pub fn install(
    specs: &[DmaEngineSpec],
    memory: &crate::cxl::DmaMemory,
    msi: &Arc<dyn MsiSink>,
    translator: Option<Arc<dyn DmaTranslator>>,
    platform: &mut crate::pci::Platform,
) -> Result<Vec<DmaEngineHandle>, String> {
    if !specs.is_empty() && translator.is_none() {
        log::warn!(
            "--dma-engine without --iommu vtd: no PASIDs, translation or page requests \
             (the guest cannot bind SVA); descriptors use guest-physical addresses"
        );
    }
    let mut handles = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        let device = device_number(index);
        let rid = iommu::RequesterId::new(0, device, 0);
        let dma = match &translator {
            Some(t) => DmaSpace::with_translator(rid, memory.clone(), t.clone()),
            None => DmaSpace::identity(rid, memory.clone()),
        };
        let function = SvaEngineFunction::new(
            SvaEngineConfig {
                ats: spec.ats,
                pri: spec.pri,
            },
            dma,
            msi.clone(),
            &spec.id,
        )
        .map_err(|e| format!("--dma-engine {}: {e}", spec.id))?;
        let (shared, handle) = SharedFunction::new(function);
        let address = platform.add_root_bus_function(device, Box::new(shared))?;
        log::info!(
            "SVA DMA engine {} at {address} (ATS {}, PRI {}){}",
            spec.id,
            if spec.ats { "on" } else { "off" },
            if spec.pri { "on" } else { "off" },
            if translator.is_some() {
                ", DMA through the VT-d unit"
            } else {
                ""
            }
        );
        handles.push(DmaEngineHandle {
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
            DmaEngineSpec::parse("", 1).unwrap(),
            DmaEngineSpec {
                id: "dma1".into(),
                ats: true,
                pri: true
            }
        );
        assert_eq!(
            DmaEngineSpec::parse("id=sva,pri=off", 0).unwrap(),
            DmaEngineSpec {
                id: "sva".into(),
                ats: true,
                pri: false
            }
        );
        let no_ats = DmaEngineSpec::parse("ats=off", 0).unwrap();
        assert!(!no_ats.ats && !no_ats.pri);
    }

    #[test]
    fn bad_specs_name_the_value() {
        for (spec, needle) in [
            ("ats=maybe", "ats=maybe"),
            ("pri=1", "pri=1"),
            ("ats=off,pri=on", "pri=on needs ats=on"),
            ("id=", "id=:"),
            ("id=a b", "id=a b"),
            ("speed=fast", "unknown key 'speed'"),
            ("ats", "not key=value"),
        ] {
            let e = DmaEngineSpec::parse(spec, 0).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains(spec), "{spec}: {e}");
        }
        let dup = DmaEngineSpec::parse_all(&["id=a".into(), "id=a".into()]).unwrap_err();
        assert!(dup.contains("'a' is used twice"), "{dup}");
        let many = DmaEngineSpec::parse_all(&vec![String::new(); 9]).unwrap_err();
        assert!(many.contains("at most 8"), "{many}");
    }
}
