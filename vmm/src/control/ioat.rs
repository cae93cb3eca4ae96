//! The I/OAT command of the control API: `ioat-state` — every `--ioat` function with its
//! address, and per channel the state the guest sees (CHANSTS state, CHANERR) and what the
//! channel has done (descriptors, bytes copied, errors, interrupts).

use std::sync::PoisonError;

use serde_json::{Value, json};

use super::ControlTarget;

/// Answers an `ioat-*` request.
pub(super) fn handle(target: &ControlTarget, request: &Value) -> Result<Value, String> {
    let command = request.get("command").and_then(Value::as_str).unwrap_or("");
    if command != "ioat-state" {
        return Err(format!(
            "bad request: unknown command '{command}' (the I/OAT command is ioat-state)"
        ));
    }
    if let Some(extra) = request
        .as_object()
        .and_then(|o| o.keys().find(|k| k.as_str() != "command"))
    {
        return Err(format!(
            "bad request: unknown field `{extra}` for ioat-state"
        ));
    }
    if target.ioat.is_empty() {
        return Err("no I/OAT: this VM runs without --ioat".into());
    }
    let functions: Vec<Value> = target
        .ioat
        .iter()
        .map(|h| {
            let f = h.function.lock().unwrap_or_else(PoisonError::into_inner);
            let channels: Vec<Value> = (0..f.channel_count())
                .filter_map(|i| f.channel(i))
                .map(|c| {
                    let n = c.counters();
                    json!({
                        "state": match c.status() {
                            0 => "active",
                            1 => "done",
                            2 => "suspended",
                            _ => "halted",
                        },
                        "chanerr": format!("{:#x}", c.chanerr()),
                        "descriptors": n.descriptors,
                        "bytes": n.bytes,
                        "errors": n.errors,
                        "interrupts": n.interrupts,
                    })
                })
                .collect();
            json!({
                "id": h.id,
                "address": h.address.to_string(),
                "bus_master": f.dma().bus_master_enabled(),
                "channels": channels,
            })
        })
        .collect();
    Ok(json!({ "functions": functions }))
}
