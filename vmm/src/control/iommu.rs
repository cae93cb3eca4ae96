//! The VT-d command of the control API: `iommu-state` — the unit's mode and enabled features
//! as the guest programmed them, and what it has done (translations, faults, invalidation
//! descriptors by type, queue errors, event interrupts).

use std::sync::PoisonError;

use serde_json::{Value, json};

use super::ControlTarget;

/// Answers an `iommu-*` request.
pub(super) fn handle(target: &ControlTarget, request: &Value) -> Result<Value, String> {
    let command = request.get("command").and_then(Value::as_str).unwrap_or("");
    if command != "iommu-state" {
        return Err(format!(
            "bad request: unknown command '{command}' (the IOMMU command is iommu-state)"
        ));
    }
    if let Some(extra) = request
        .as_object()
        .and_then(|o| o.keys().find(|k| k.as_str() != "command"))
    {
        return Err(format!(
            "bad request: unknown field `{extra}` for iommu-state"
        ));
    }
    let unit = target
        .iommu
        .as_ref()
        .ok_or("no IOMMU: this VM runs without --iommu vtd")?;
    let window = unit.lock().unwrap_or_else(PoisonError::into_inner);
    let unit = &window.0;
    let regs = unit.registers();
    let config = regs.config();
    let (cap, ecap) = config.capabilities();
    let rtaddr = regs.root_table();
    let counters = unit.counters();
    let (queue_base, queue_entries, wide, head, tail) = regs.queue();
    let d = &counters.descriptors;
    Ok(json!({
        "model": "vt-d",
        "scalable_mode_supported": config.scalable,
        "caching_mode": config.caching_mode,
        "address_width": config.address_width,
        "cap": format!("{cap:#x}"),
        "ecap": format!("{ecap:#x}"),
        "translation_enabled": regs.translation_enabled(),
        "queued_invalidation_enabled": regs.queued_invalidation_enabled(),
        "root_table": format!("{:#x}", rtaddr & !0xfff),
        "root_table_mode": match (rtaddr >> 10) & 3 {
            0 => "legacy",
            1 => "scalable",
            _ => "reserved",
        },
        "invalidation_queue": {
            "base": format!("{queue_base:#x}"),
            "entries": queue_entries,
            "descriptor_bits": if wide { 256 } else { 128 },
            "head": head,
            "tail": tail,
        },
        "counters": {
            "translations": counters.translations,
            "faults": counters.faults,
            "queue_errors": counters.queue_errors,
            "event_interrupts": counters.interrupts,
            "invalidations": {
                "context_cache": d[1],
                "iotlb": d[2],
                "device_tlb": d[3],
                "wait": d[5],
                "pasid_iotlb": d[6],
                "pasid_cache": d[7],
                "pasid_device_tlb": d[8],
            },
        },
    }))
}
