//! The VT-d commands of the control API:
//! - `iommu-state` — the unit's mode and enabled features as the guest programmed them, the
//!   devices it gave a present context, what the unit has done (translations, faults,
//!   invalidation descriptors by type, queue errors, event interrupts, IOTLB / context-cache /
//!   PASID-cache hits and misses) and the fault injections still pending;
//! - `iommu-inject-fault` — the next `count` translations requested by `device` fail as a
//!   real translation fault would ([`iommu::vtd::unit::RemappingUnit::inject_faults`]);
//! - `iommu-inject-page-response` — the next `count` page group responses the guest sends
//!   reach the device as `code` (`failure` or `invalid`);
//! - `iommu-drop-page-requests` — the next `count` page requests are lost as to a full queue
//!   (PRS.PRO; the unit answers the group Success so the device asks again);
//! - `iommu-delay-invalidation-wait` — every later invalidation wait completes `ms`
//!   milliseconds late (0 turns it off; at most 10 000).

use std::sync::PoisonError;

use iommu::vtd::unit::{MAX_INJECTED_FAULTS, MAX_WAIT_DELAY, RemappingUnit};
use iommu::{PageResponseCode, RequesterId};
use serde_json::{Value, json};

use super::ControlTarget;

/// Most devices `iommu-state` lists (the rest is reported as `devices_truncated`).
const MAX_LISTED_DEVICES: usize = 256;

/// Answers an `iommu-*` request.
pub(super) fn handle(target: &ControlTarget, request: &Value) -> Result<Value, String> {
    let command = request.get("command").and_then(Value::as_str).unwrap_or("");
    let allowed: &[&str] = match command {
        "iommu-state" => &["command"],
        "iommu-inject-fault" => &["command", "device", "count"],
        "iommu-inject-page-response" => &["command", "code", "count"],
        "iommu-drop-page-requests" => &["command", "count"],
        "iommu-delay-invalidation-wait" => &["command", "ms"],
        _ => {
            return Err(format!(
                "bad request: unknown command '{command}' (the IOMMU commands are iommu-state, \
                 iommu-inject-fault, iommu-inject-page-response, iommu-drop-page-requests, \
                 iommu-delay-invalidation-wait)"
            ));
        }
    };
    if let Some(extra) = request
        .as_object()
        .and_then(|o| o.keys().find(|k| !allowed.contains(&k.as_str())))
    {
        return Err(format!(
            "bad request: unknown field `{extra}` for {command}"
        ));
    }
    if command == "iommu-inject-fault" {
        let (rid, count) = parse_injection(request)?;
        let unit = iommu_unit(target)?;
        let mut unit = unit.lock().unwrap_or_else(PoisonError::into_inner);
        let pending = unit.inject_faults(rid, count);
        return Ok(json!({"device": rid.to_string(), "pending": pending}));
    }
    if command == "iommu-inject-page-response" {
        let code = match request.get("code").map(|c| (c, c.as_str())) {
            Some((_, Some("failure"))) => PageResponseCode::ResponseFailure,
            Some((_, Some("invalid"))) => PageResponseCode::InvalidRequest,
            Some((c, _)) => {
                return Err(format!("bad code {c}: expected \"failure\" or \"invalid\""));
            }
            None => return Err("bad request: iommu-inject-page-response needs \"code\"".into()),
        };
        let count = parse_count(request)?;
        let unit = iommu_unit(target)?;
        let mut unit = unit.lock().unwrap_or_else(PoisonError::into_inner);
        require_page_requests(&unit)?;
        unit.inject_page_responses(code, count);
        return Ok(sva_injections(&unit));
    }
    if command == "iommu-drop-page-requests" {
        let count = parse_count(request)?;
        let unit = iommu_unit(target)?;
        let mut unit = unit.lock().unwrap_or_else(PoisonError::into_inner);
        require_page_requests(&unit)?;
        unit.drop_page_requests(count);
        return Ok(sva_injections(&unit));
    }
    if command == "iommu-delay-invalidation-wait" {
        let max = MAX_WAIT_DELAY.as_millis() as u64;
        let ms = match request.get("ms") {
            Some(v) => v
                .as_u64()
                .filter(|ms| *ms <= max)
                .ok_or_else(|| format!("bad ms {v}: expected 0..={max}"))?,
            None => return Err("bad request: iommu-delay-invalidation-wait needs \"ms\"".into()),
        };
        let unit = iommu_unit(target)?;
        let mut unit = unit.lock().unwrap_or_else(PoisonError::into_inner);
        unit.set_wait_delay(std::time::Duration::from_millis(ms));
        return Ok(sva_injections(&unit));
    }
    state(target)
}

/// `count` (1..=65535, default 1).
fn parse_count(request: &Value) -> Result<u32, String> {
    match request.get("count") {
        None => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=u64::from(MAX_INJECTED_FAULTS)).contains(&n) => Ok(n as u32),
            _ => Err(format!("bad count {v}: expected 1..={MAX_INJECTED_FAULTS}")),
        },
    }
}

fn require_page_requests(unit: &RemappingUnit) -> Result<(), String> {
    if unit.registers().page_requests_supported() {
        Ok(())
    } else {
        Err("the IOMMU takes no page requests (needs --iommu vtd with scalable=on,pri=on)".into())
    }
}

/// The page-request and invalidation-wait injections still pending.
fn sva_injections(unit: &RemappingUnit) -> Value {
    let i = unit.sva_injections();
    json!({
        "forced_page_responses": i.forced_responses.map(|(code, count)| json!({
            "code": match code {
                PageResponseCode::Success => "success",
                PageResponseCode::InvalidRequest => "invalid",
                PageResponseCode::ResponseFailure => "failure",
            },
            "count": count,
        })),
        "dropped_page_requests": i.dropped_page_requests,
        "invalidation_wait_delay_ms": i.wait_delay.as_millis() as u64,
    })
}

fn iommu_unit(
    target: &ControlTarget,
) -> Result<&std::sync::Arc<std::sync::Mutex<RemappingUnit>>, String> {
    target
        .iommu
        .as_ref()
        .ok_or_else(|| "no IOMMU: this VM runs without --iommu vtd".to_string())
}

/// `device` (a PCI address `BB:DD.F`, hex, optionally with a `0000:` segment) and `count`
/// (1..=65535, default 1) of an `iommu-inject-fault` request.
fn parse_injection(request: &Value) -> Result<(RequesterId, u32), String> {
    let device = request
        .get("device")
        .ok_or("bad request: iommu-inject-fault needs \"device\" (a PCI address like 00:03.0)")?;
    let text = device
        .as_str()
        .ok_or_else(|| format!("bad device {device}: expected a PCI address like 00:03.0"))?;
    let rid = parse_bdf(text)
        .ok_or_else(|| format!("bad device '{text}': expected a PCI address like 00:03.0"))?;
    let count = match request.get("count") {
        None => 1,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=u64::from(MAX_INJECTED_FAULTS)).contains(&n) => n as u32,
            _ => {
                return Err(format!("bad count {v}: expected 1..={MAX_INJECTED_FAULTS}"));
            }
        },
    };
    Ok((rid, count))
}

/// `BB:DD.F` in hex (device ≤ 1f, function ≤ 7), optionally `0000:BB:DD.F`.
pub fn parse_bdf(text: &str) -> Option<RequesterId> {
    let text = text.strip_prefix("0000:").unwrap_or(text);
    let (bus, rest) = text.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let hex = |s: &str, max: u8| {
        (!s.is_empty() && s.len() <= 2 && s.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| u8::from_str_radix(s, 16).ok())
            .flatten()
            .filter(|v| *v <= max)
    };
    let function = (function.len() == 1).then(|| hex(function, 7)).flatten()?;
    Some(RequesterId::new(
        hex(bus, 0xff)?,
        hex(device, 0x1f)?,
        function,
    ))
}

fn state(target: &ControlTarget) -> Result<Value, String> {
    let unit = iommu_unit(target)?;
    let unit = unit.lock().unwrap_or_else(PoisonError::into_inner);
    let regs = unit.registers();
    let config = regs.config();
    let (cap, ecap) = config.capabilities();
    let rtaddr = regs.root_table();
    let counters = unit.counters();
    let occupancy = unit.cache_occupancy();
    let (queue_base, queue_entries, wide, head, tail) = regs.queue();
    let d = &counters.descriptors;
    let (devices, truncated) = unit.device_contexts(MAX_LISTED_DEVICES);
    let devices: Vec<Value> = devices
        .iter()
        .map(|c| {
            let mut o = json!({
                "device": c.requester_id.to_string(),
                "domain": c.domain,
                "translation": c.translation,
                "address_width": c.address_width,
                "device_tlb": c.device_tlb,
            });
            if let Some(paside) = c.pasid_enabled {
                o["pasid_enabled"] = json!(paside);
                o["rid_pasid"] = json!(c.rid_pasid);
            }
            if let Some(reason) = c.fault_reason {
                o["fault_reason"] = json!(format!("{reason:#04x}"));
            }
            o
        })
        .collect();
    let injections: Vec<Value> = unit
        .pending_injected_faults()
        .iter()
        .map(|(rid, count)| json!({"device": rid.to_string(), "count": count}))
        .collect();
    let page_request_queue = {
        let (base, entries, head, tail) = regs.page_request_queue();
        let prs = regs.page_request_status();
        json!({
            "base": format!("{base:#x}"),
            "entries": entries,
            "head": head,
            "tail": tail,
            "pending": prs & 1 != 0,
            "overflow": prs & 2 != 0,
        })
    };
    let sva_counters = json!({
        "ats_translations": counters.ats_translations,
        "ats_denied": counters.ats_denied,
        "device_tlb_invalidations": d[3] + d[8],
        "page_requests": counters.page_requests,
        "page_requests_queued": counters.page_requests_queued,
        "prq_overflows": counters.prq_overflows,
        "auto_responses": counters.auto_responses,
        "page_responses": {
            "success": counters.responses_success,
            "invalid": counters.responses_invalid,
            "failure": counters.responses_failure,
            "injected": counters.injected_responses,
        },
        "delayed_invalidation_waits": counters.delayed_waits,
    });
    Ok(json!({
        "model": "vt-d",
        "scalable_mode_supported": config.scalable,
        "caching_mode": config.caching_mode,
        "address_width": config.address_width,
        "pasid_bits": if config.scalable { config.pasid_bits } else { 0 },
        "ats": config.ats,
        "pri": config.pri,
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
        "devices": devices,
        "devices_truncated": truncated,
        "pending_fault_injections": injections,
        "sva_injections": sva_injections(&unit),
        "page_request_queue": page_request_queue,
        "caches": {
            "iotlb_entries": occupancy.iotlb,
            "context_entries": occupancy.context,
            "pasid_entries": occupancy.pasid,
        },
        "counters": {
            "translations": counters.translations,
            "faults": counters.faults,
            "injected_faults": counters.injected_faults,
            "queue_errors": counters.queue_errors,
            "event_interrupts": counters.interrupts,
            "iotlb": {"hits": counters.iotlb_hits, "misses": counters.iotlb_misses},
            "context_cache": {
                "hits": counters.context_cache_hits,
                "misses": counters.context_cache_misses,
            },
            "pasid_cache": {
                "hits": counters.pasid_cache_hits,
                "misses": counters.pasid_cache_misses,
            },
            "sva": sva_counters,
            "invalidations": {
                "context_cache": d[1],
                "iotlb": d[2],
                "device_tlb": d[3],
                "wait": d[5],
                "pasid_iotlb": d[6],
                "pasid_cache": d[7],
                "pasid_device_tlb": d[8],
                "page_group_response": d[9],
            },
        },
    }))
}
