//! The SVA DMA engine command of the control API: `dma-engine-state` — every `--dma-engine`
//! function with its address, the ATS/PASID/PRI enables the guest programmed, the ring and what
//! the engine has done (descriptors, ATS translations and ATC hits, device-TLB invalidations,
//! page requests and responses by code).

use std::sync::PoisonError;

use serde_json::{Value, json};

use super::ControlTarget;

/// Answers a `dma-engine-*` request.
pub(super) fn handle(target: &ControlTarget, request: &Value) -> Result<Value, String> {
    let command = request.get("command").and_then(Value::as_str).unwrap_or("");
    if command != "dma-engine-state" {
        return Err(format!(
            "bad request: unknown command '{command}' (the DMA engine command is dma-engine-state)"
        ));
    }
    if let Some(extra) = request
        .as_object()
        .and_then(|o| o.keys().find(|k| k.as_str() != "command"))
    {
        return Err(format!(
            "bad request: unknown field `{extra}` for dma-engine-state"
        ));
    }
    if target.dma_engines.is_empty() {
        return Err("no DMA engine: this VM runs without --dma-engine".into());
    }
    let engines: Vec<Value> = target
        .dma_engines
        .iter()
        .map(|h| {
            let f = h.function.lock().unwrap_or_else(PoisonError::into_inner);
            let s = f.snapshot();
            let c = s.counters;
            json!({
                "id": h.id,
                "address": h.address.to_string(),
                "bus_master": f.dma().bus_master_enabled(),
                "ats_enabled": s.ats_enabled,
                "pasid_enabled": s.pasid_enabled,
                "pri_enabled": s.pri_enabled,
                "pri_allocation": s.pri_allocation,
                "pri_outstanding": s.pri_outstanding,
                "status": format!("{:#x}", s.status),
                "error": s.error,
                "ring": {"size": s.ring.0, "head": s.ring.1, "tail": s.ring.2,
                         "pasid": format!("{:#x}", s.ring_pasid)},
                "atc_entries": s.atc_entries,
                "counters": {
                    "descriptors_completed": c.descriptors_completed,
                    "seconds_since_last_completion": c
                        .last_completion
                        .map(|t| (t.elapsed().as_secs_f64() * 10.0).round() / 10.0),
                    "descriptors_succeeded": c.descriptors_succeeded,
                    "descriptors_failed": c.descriptors_failed,
                    "bytes": c.bytes,
                    "translation_faults": c.translation_faults,
                    "ats_translations": c.ats_translations,
                    "atc_hits": c.atc_hits,
                    "atc_invalidations": c.atc_invalidations,
                    "atc_entries_invalidated": c.atc_entries_invalidated,
                    "page_requests": c.page_requests,
                    "page_request_round_trip_us": {
                        "count": c.page_request_round_trips,
                        "mean": if c.page_request_round_trips == 0 {
                            0.0
                        } else {
                            c.page_request_round_trip_ns as f64
                                / c.page_request_round_trips as f64
                                / 1000.0
                        },
                        "max": c.page_request_round_trip_max_ns as f64 / 1000.0,
                    },
                    "page_responses": {
                        "success": c.responses_success,
                        "invalid": c.responses_invalid,
                        "failure": c.responses_failure,
                        "unexpected": c.unexpected_responses,
                    },
                },
            })
        })
        .collect();
    Ok(json!({ "engines": engines }))
}
