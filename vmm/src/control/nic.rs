//! The NIC commands of the control API: `nic-state` — every `--nic` with its address, MAC,
//! link, whether the driver activated it, and its counters (frames and bytes each way, drops by
//! cause, the fabric's datagrams) — and `nic-link` — set a NIC's link down or up (the guest's
//! driver sees the LINK event and changes its carrier).

use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use devices::vmxnet3::format_mac;
use serde_json::{Value, json};

use super::ControlTarget;

fn check_fields(request: &Value, command: &str, allowed: &[&str]) -> Result<(), String> {
    if let Some(extra) = request.as_object().and_then(|o| {
        o.keys()
            .find(|k| k.as_str() != "command" && !allowed.contains(&k.as_str()))
    }) {
        return Err(format!(
            "bad request: unknown field `{extra}` for {command}"
        ));
    }
    Ok(())
}

/// Answers a `nic-*` request.
pub(super) fn handle(target: &ControlTarget, request: &Value) -> Result<Value, String> {
    let command = request.get("command").and_then(Value::as_str).unwrap_or("");
    match command {
        "nic-state" => {
            check_fields(request, command, &[])?;
            if target.nics.is_empty() {
                return Err("no NIC: this VM runs without --nic".into());
            }
            let nics: Vec<Value> = target
                .nics
                .iter()
                .map(|h| {
                    let f = h.function.lock().unwrap_or_else(PoisonError::into_inner);
                    let c = f.counters();
                    let rdma = h.rdma.as_ref().map(|r| {
                        let s = r.lock().unwrap_or_else(PoisonError::into_inner).state();
                        let gids: Vec<Value> = s
                            .gids
                            .iter()
                            .map(|(i, g)| {
                                let text: Vec<String> = g
                                    .gid
                                    .chunks(2)
                                    .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
                                    .collect();
                                let kind = if g.gid_type == 1 {
                                    "RoCE v2"
                                } else {
                                    "RoCE v1"
                                };
                                json!({ "index": i, "gid": text.join(":"), "type": kind })
                            })
                            .collect();
                        let qps: Vec<Value> = s
                            .qps
                            .iter()
                            .map(|q| {
                                let kind = match q.kind {
                                    1 => "GSI",
                                    2 => "RC",
                                    4 => "UD",
                                    _ => "?",
                                };
                                let state = ["RESET", "INIT", "RTR", "RTS", "SQD", "SQE", "ERR"]
                                    .get(q.state as usize)
                                    .copied()
                                    .unwrap_or("?");
                                json!({
                                    "handle": q.handle,
                                    "qpn": q.qpn,
                                    "type": kind,
                                    "state": state,
                                    "sq_psn": q.sq_psn,
                                    "rq_psn": q.rq_psn,
                                    "dest_qpn": q.dest_qpn,
                                    "retransmissions": q.retransmissions,
                                    "naks": q.naks,
                                })
                            })
                            .collect();
                        let port = if s.port_active { "active" } else { "down" };
                        let rc = r
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .roce_counters();
                        let roce = json!({
                            "tx_packets": rc.tx_packets,
                            "tx_bytes": rc.tx_bytes,
                            "rx_packets": rc.rx_packets,
                            "rx_bytes": rc.rx_bytes,
                            "completions": rc.completions,
                            "error_completions": rc.error_completions,
                            "rx_dropped": {
                                "malformed": rc.rx_malformed,
                                "no_qp": rc.rx_no_qp,
                                "no_wqe": rc.rx_no_wqe,
                            },
                        });
                        json!({
                            "active": s.active,
                            "port": port,
                            "commands": s.commands.0,
                            "commands_refused": s.commands.1,
                            "contexts": s.counts.0,
                            "pds": s.counts.1,
                            "mrs": s.counts.2,
                            "cqs": s.counts.3,
                            "gids": gids,
                            "qps": qps,
                            "roce": roce,
                        })
                    });
                    json!({
                        "id": h.id,
                        "address": h.address.to_string(),
                        "mac": format_mac(&f.mac()),
                        "link": if f.link_up() { "up" } else { "down" },
                        "active": f.is_active(),
                        "tx_frames": c.tx_frames,
                        "tx_bytes": c.tx_bytes,
                        "tx_dropped": c.tx_dropped,
                        "rx_frames": c.rx_frames,
                        "rx_bytes": c.rx_bytes,
                        "rx_dropped": {
                            "no_buffer": c.rx_no_buffer,
                            "filtered": c.rx_filtered,
                            "not_ready": c.rx_not_ready,
                            "malformed": c.rx_malformed,
                        },
                        "fabric": {
                            "sent": h.fabric.sent.load(Ordering::Relaxed),
                            "send_dropped": h.fabric.send_dropped.load(Ordering::Relaxed),
                            "received": h.fabric.received.load(Ordering::Relaxed),
                        },
                        "rdma": rdma,
                    })
                })
                .collect();
            Ok(json!({ "nics": nics }))
        }
        "nic-link" => {
            check_fields(request, command, &["id", "state"])?;
            let id = request
                .get("id")
                .and_then(Value::as_str)
                .ok_or("bad request: nic-link needs \"id\" (a --nic id)")?;
            let up = match request.get("state").and_then(Value::as_str) {
                Some("up") => true,
                Some("down") => false,
                other => {
                    return Err(format!(
                        "bad request: nic-link \"state\" must be \"up\" or \"down\" (got {})",
                        other.map_or("nothing".to_string(), |s| format!("'{s}'"))
                    ));
                }
            };
            let handle = target.nics.iter().find(|h| h.id == id).ok_or_else(|| {
                let ids: Vec<&str> = target.nics.iter().map(|h| h.id.as_str()).collect();
                format!("no NIC '{id}' (NICs: {})", ids.join(", "))
            })?;
            handle.set_link(up);
            Ok(json!({ "id": id, "link": if up { "up" } else { "down" } }))
        }
        _ => Err(format!(
            "bad request: unknown command '{command}' (the NIC commands are nic-state, nic-link)"
        )),
    }
}
