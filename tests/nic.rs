//! Guest tests of the vmxnet3 NIC (`vmm run --nic`): two guests, each its own `vmm run` as a
//! user would start them on one machine, reach each other over the UDP fabric — ARP and ping
//! over IPv4, ping over IPv6 link-local addresses (neighbour discovery: multicast), a 4 MiB TCP
//! transfer checked end to end (checksum offload and TSO in the device) — and a link flap
//! through the control API reaches one guest's driver as a carrier change, after which traffic
//! resumes. With `--rdma-nic` (vmxnet3 + PVRDMA): the RoCE v2 device as `ibv_devinfo` and
//! `rdma link` show it, port events from link flaps, and rdma-core's, perftest's and
//! librdmacm's tools between two guests, also with both guests' DMA remapped by VT-d. Where
//! /dev/kvm cannot run a stock guest, each `vmm run` moves into its own nested-KVM host and the
//! frames cross between the two hosts (docs/nic.md).

mod common;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{VMM, guest_tool, guests_side_by_side, vmm};

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nic");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// Two UDP ports free on loopback now.
fn free_ports() -> (u16, u16) {
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// `vmm ctl --control SOCK --wait=300 ARGS...`: stdout, panicking on failure.
fn ctl(sock: &Path, args: &[&str]) -> String {
    let out = Command::new(VMM)
        .arg("ctl")
        .arg("--control")
        .arg(sock)
        .arg("--wait=300")
        .args(args)
        .output()
        .expect("running vmm ctl");
    assert!(
        out.status.success(),
        "vmm ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A number from a `nic-state` JSON answer (first NIC).
fn state_field(state: &str, field: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(state).expect("nic-state JSON");
    v["nics"][0][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {state}"))
}

const BLOB: u64 = 4 << 20;

#[test]
fn two_guests_ping_and_transfer_over_the_udp_fabric_and_survive_a_link_flap() {
    let (port_a, port_b) = free_ports();
    let sock_a = scratch("a.sock");
    let tcp_blob = guest_tool("tcp-blob");
    // Guest A: waits for B, pings it (IPv4, then IPv6 link-local), sends a 4 MiB blob, then
    // waits for the link flap the test makes through the control API, and sends a second blob.
    let script_a = format!(
        r#"
        set -e
        wait_until() {{ # wait_until SECONDS COMMAND...
            n=$1; shift
            while [ "$n" -gt 0 ]; do "$@" && return 0; sleep 1; n=$((n - 1)); done
            echo "gave up waiting for: $*"; exit 1
        }}
        d=/sys/class/net/eth0
        echo "driver $(basename "$(readlink $d/device/driver)")"
        echo "mac $(cat $d/address)"
        echo "carrier $(cat $d/carrier)"
        /usr/bin/ip -4 addr show eth0 | grep -o 'inet [0-9./]*'
        wait_until 600 ping -c 1 -W 1 10.77.0.2
        ping -c 3 -W 2 10.77.0.2 | grep 'packets transmitted'
        echo "neigh $(/usr/bin/ip neigh show 10.77.0.2)"
        wait_until 60 ping -6 -c 1 -W 1 fe80::ff:fe00:b%eth0
        ping -6 -c 2 -W 2 fe80::ff:fe00:b%eth0 | grep 'packets transmitted' | sed 's/^/v6 /'
        tcp-blob send 10.77.0.2:5001 {BLOB} 7
        echo "phase:sent"
        down() {{ [ "$(cat $d/carrier)" = 0 ]; }}
        up() {{ [ "$(cat $d/carrier)" = 1 ]; }}
        wait_until 600 down
        echo "carrier-down $(cat $d/operstate)"
        wait_until 600 up
        echo "carrier-up $(cat $d/operstate)"
        wait_until 60 ping -c 1 -W 1 10.77.0.2
        tcp-blob send 10.77.0.2:5001 65536 8 | sed 's/^/after-flap /'
        "#
    );
    // Guest B: waits for A, pings it, receives both blobs.
    let script_b = r#"
        set -e
        wait_until() {
            n=$1; shift
            while [ "$n" -gt 0 ]; do "$@" && return 0; sleep 1; n=$((n - 1)); done
            echo "gave up waiting for: $*"; exit 1
        }
        wait_until 600 ping -c 1 -W 1 10.77.0.1
        ping -c 3 -W 2 10.77.0.1 | grep 'packets transmitted'
        tcp-blob recv 5001
        tcp-blob recv 5001 | sed 's/^/after-flap /'
        "#;
    let guest_args = |sock: Option<&Path>, nic: String, script: &str| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "run".into(),
            "--timeout=1200".into(),
            format!("--nic={nic}").into(),
            format!("--guest-file={}", tcp_blob.display()).into(),
        ];
        if let Some(s) = sock {
            args.push(format!("--control={}", s.display()).into());
        }
        args.extend(["--".into(), "sh".into(), "-c".into(), script.into()]);
        args
    };
    let a = guest_args(
        Some(&sock_a),
        format!(
            "id=a,mac=02:00:00:00:00:0a,ip=10.77.0.1/24,fabric=udp:127.0.0.1:{port_a},peer=127.0.0.1:{port_b}"
        ),
        &script_a,
    );
    let b = guest_args(
        None,
        format!(
            "id=b,mac=02:00:00:00:00:0b,ip=10.77.0.2/24,fabric=udp:127.0.0.1:{port_b},peer=127.0.0.1:{port_a}"
        ),
        script_b,
    );
    // The link flap: once A has sent its first blob (its NIC has put > 4 MiB on the wire), take
    // A's link down, check the control API says so, and bring it back.
    let flapper = {
        let sock = sock_a.clone();
        std::thread::spawn(move || -> Result<String, String> {
            let started = Instant::now();
            loop {
                if started.elapsed() > Duration::from_secs(900) {
                    return Err("A never sent its blob".into());
                }
                if sock.exists() {
                    let state = ctl(&sock, &["nic-state"]);
                    if state_field(&state, "tx_bytes") > BLOB {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_secs(2));
            }
            std::thread::sleep(Duration::from_secs(2));
            ctl(&sock, &["nic-link", "--id", "a", "down"]);
            let down = ctl(&sock, &["nic-state"]);
            std::thread::sleep(Duration::from_secs(5));
            ctl(&sock, &["nic-link", "--id", "a", "up"]);
            Ok(down)
        })
    };
    let (ra, rb) = guests_side_by_side(a, b);
    let down_state = flapper.join().expect("flapper thread");
    ra.expect_status(0);
    rb.expect_status(0);
    let (out_a, out_b) = (&ra.stdout, &rb.stdout);
    // A's own tools: the vmxnet3 driver bound, MAC and address from --nic, carrier up.
    assert!(out_a.contains("driver vmxnet3"), "{out_a}");
    assert!(out_a.contains("mac 02:00:00:00:00:0a"), "{out_a}");
    assert!(out_a.contains("carrier 1"), "{out_a}");
    assert!(out_a.contains("inet 10.77.0.1/24"), "{out_a}");
    // ARP resolved B's MAC; every ping answered, both ways and over IPv6.
    assert!(out_a.contains("lladdr 02:00:00:00:00:0b"), "{out_a}");
    assert!(
        out_a.contains("3 packets transmitted, 3 packets received"),
        "{out_a}"
    );
    assert!(
        out_a.contains("v6 2 packets transmitted, 2 packets received"),
        "{out_a}"
    );
    assert!(
        out_b.contains("3 packets transmitted, 3 packets received"),
        "{out_b}"
    );
    // The blob crossed intact: B's hash of what arrived is A's hash of what it sent.
    let sent = out_a
        .lines()
        .find(|l| l.starts_with("tcp-blob sent"))
        .unwrap_or_else(|| panic!("{out_a}"));
    let received = out_b
        .lines()
        .find(|l| l.starts_with("tcp-blob received"))
        .unwrap_or_else(|| panic!("{out_b}"));
    let fnv = |l: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("fnv="))
            .map(str::to_string)
    };
    assert_eq!(fnv(sent), fnv(received), "{sent} / {received}");
    assert!(received.contains(&format!("bytes={BLOB}")), "{received}");
    // The link flap: the control API reported the link down, A's driver saw the carrier go
    // and come back, and traffic resumed.
    let down_state = down_state.expect("link flap");
    let v: serde_json::Value = serde_json::from_str(&down_state).expect("nic-state JSON");
    assert_eq!(v["nics"][0]["link"], "down", "{down_state}");
    assert!(out_a.contains("carrier-down down"), "{out_a}");
    assert!(out_a.contains("carrier-up up"), "{out_a}");
    assert!(
        out_b.contains("after-flap tcp-blob received bytes=65536"),
        "{out_b}"
    );
}

#[test]
fn bad_nic_values_are_refused_with_one_line_naming_them() {
    for (spec, needle) in [
        ("fabric=udp:127.0.0.1:7001", "peer=IP:PORT is required"),
        (
            "fabric=udp:127.0.0.1:7001,peer=127.0.0.1:7002,mac=01:02:03:04:05:06",
            "mac=01:02:03:04:05:06",
        ),
        (
            "fabric=udp:127.0.0.1:7001,peer=127.0.0.1:7002,ip=10.0.0.1/40",
            "ip=10.0.0.1/40",
        ),
    ] {
        let run = vmm(["run".to_string(), format!("--nic={spec}")]);
        assert_ne!(run.status, Some(0), "{spec}");
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{spec}: {}", run.stderr);
        assert!(lines[0].contains(needle), "{spec}: {}", run.stderr);
    }
    // A fabric port another process holds is refused before any guest boots.
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let run = vmm([
        "run".to_string(),
        format!("--nic=fabric=udp:127.0.0.1:{port},peer=127.0.0.1:9"),
        "--".into(),
        "true".into(),
    ]);
    assert_ne!(run.status, Some(0));
    assert!(
        run.stderr.contains(&format!(
            "cannot bind the fabric socket to 127.0.0.1:{port}"
        )),
        "{}",
        run.stderr
    );
}

/// `--rdma-nic`: the guest's vmw_pvrdma binds the PVRDMA function beside the vmxnet3 one;
/// `ibv_devinfo -v` shows the device with its port ACTIVE on Ethernet and RoCE v2 GIDs (the
/// link-local one and the IPv4-mapped one of `ip=`), `rdma link` shows it up; a link flap
/// through the control API reaches user space as IBV_EVENT_PORT_ERR then PORT_ACTIVE
/// (`ibv_asyncwatch`), after which RC traffic with a second guest resumes; the control API
/// lists the GIDs and the GSI QP ib_core created.
#[test]
fn rdma_nic_shows_a_roce_v2_device_and_reports_port_events() {
    let (port_a, port_b) = free_ports();
    let sock = scratch("rdma.sock");
    let script = r#"
        set -e
        ibv_asyncwatch vmw_pvrdma0 > /tmp/events 2>&1 &
        wait_until() {
            n=$1; shift
            while [ "$n" -gt 0 ]; do "$@" && return 0; sleep 1; n=$((n - 1)); done
            echo "gave up waiting for: $*"; cat /tmp/events; exit 1
        }
        ibv_devinfo -v | grep -E "hca_id|vendor_id|phys_port_cnt|state:|link_layer|GID\[" | sed 's/^[[:space:]]*//'
        rdma link show
        for i in 0 1; do
            echo "gid$i $(cat /sys/class/infiniband/vmw_pvrdma0/ports/1/gids/$i) $(cat /sys/class/infiniband/vmw_pvrdma0/ports/1/gid_attrs/types/$i)"
        done
        seen() { grep -q "$1" /tmp/events; }
        wait_until 600 seen IBV_EVENT_PORT_ERR
        wait_until 600 seen IBV_EVENT_PORT_ACTIVE
        cat /tmp/events
        wait_until 60 sh -c 'rdma link show | grep -q "state ACTIVE"'
        echo "after: $(rdma link show)"
        # Traffic resumes: RC ping-pong with the second guest after the flap.
        n=0
        until ibv_rc_pingpong -d vmw_pvrdma0 -g 1 -n 50 -p 19010 10.77.0.2 > /tmp/pp 2>&1; do
            n=$((n + 1)); [ $n -lt 60 ] || { cat /tmp/pp; exit 1; }; sleep 2
        done
        echo "after the flap: $(grep 'iters in' /tmp/pp)"
    "#;
    let peer_script = r#"
        i=0; until ping -c 1 -W 1 10.77.0.1 >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 600 ] || exit 1; done
        timeout 900 ibv_rc_pingpong -d vmw_pvrdma0 -g 1 -n 50 -p 19010
    "#;
    let peer_args: Vec<std::ffi::OsString> = vec![
        "run".into(),
        "--timeout=900".into(),
        format!(
            "--rdma-nic=mac=02:00:00:00:00:0b,ip=10.77.0.2/24,fabric=udp:127.0.0.1:{port_b},peer=127.0.0.1:{port_a}"
        )
        .into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        peer_script.into(),
    ];
    let args: Vec<std::ffi::OsString> = vec![
        "run".into(),
        "--timeout=900".into(),
        format!(
            "--rdma-nic=mac=02:00:00:00:00:0a,ip=10.77.0.1/24,fabric=udp:127.0.0.1:{port_a},peer=127.0.0.1:{port_b}"
        )
        .into(),
        format!("--control={}", sock.display()).into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        script.into(),
    ];
    let flapper = {
        let sock = sock.clone();
        std::thread::spawn(move || -> Result<String, String> {
            let started = Instant::now();
            // ibv_asyncwatch holds a user context once it has opened the device.
            loop {
                if started.elapsed() > Duration::from_secs(900) {
                    return Err("the guest never opened the device".into());
                }
                if sock.exists() {
                    let state = ctl(&sock, &["nic-state"]);
                    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
                    if v["nics"][0]["rdma"]["contexts"].as_u64().unwrap_or(0) >= 1 {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            std::thread::sleep(Duration::from_secs(3));
            let before = ctl(&sock, &["nic-state"]);
            ctl(&sock, &["nic-link", "--id", "rdma0", "down"]);
            std::thread::sleep(Duration::from_secs(3));
            ctl(&sock, &["nic-link", "--id", "rdma0", "up"]);
            Ok(before)
        })
    };
    let (run, peer) = guests_side_by_side(args, peer_args);
    let before = flapper.join().expect("flapper").expect("link flap");
    peer.expect_status(0);
    assert!(peer.stdout.contains("50 iters in"), "{}", peer.stdout);
    run.expect_status(0);
    let out = &run.stdout;
    assert!(
        out.contains("hca_id:\tvmw_pvrdma0") || out.contains("hca_id: vmw_pvrdma0"),
        "{out}"
    );
    assert!(
        out.contains("vendor_id:\t\t\t0x15ad") || out.contains("0x15ad"),
        "{out}"
    );
    assert!(out.contains("PORT_ACTIVE (4)"), "{out}");
    assert!(
        out.contains("link_layer:\t\tEthernet") || out.contains("Ethernet"),
        "{out}"
    );
    assert!(
        out.contains("link vmw_pvrdma0/1 state ACTIVE physical_state LINK_UP netdev eth0"),
        "{out}"
    );
    assert!(
        out.contains("gid0 fe80:0000:0000:0000:0000:00ff:fe00:000a RoCE v2"),
        "{out}"
    );
    assert!(
        out.contains("gid1 0000:0000:0000:0000:0000:ffff:0a4d:0001 RoCE v2"),
        "{out}"
    );
    assert!(out.contains("IBV_EVENT_PORT_ERR"), "{out}");
    assert!(out.contains("IBV_EVENT_PORT_ACTIVE"), "{out}");
    assert!(
        out.contains("after: link vmw_pvrdma0/1 state ACTIVE"),
        "{out}"
    );
    assert!(
        out.contains("after the flap: ") && out.contains("50 iters in"),
        "{out}"
    );
    // The control API saw ib_core's GSI QP and the two GIDs.
    let v: serde_json::Value = serde_json::from_str(&before).unwrap();
    let rdma = &v["nics"][0]["rdma"];
    assert_eq!(rdma["active"], true, "{before}");
    let qps = rdma["qps"].as_array().unwrap();
    assert!(
        qps.iter()
            .any(|q| q["type"] == "GSI" && q["qpn"] == 1 && q["state"] == "RTS"),
        "{before}"
    );
    assert!(rdma["gids"].as_array().unwrap().len() >= 2, "{before}");
}

/// One tool run between two `--rdma-nic` guests: its name, the server's command, the client's
/// command (which retries while the server is not yet listening).
type Tool = (&'static str, &'static str, &'static str);

/// rdma-core's and perftest's RC tools, each on its own TCP port for the out-of-band exchange.
const RC_TOOLS: [Tool; 5] = [
    (
        "rc_pingpong",
        "ibv_rc_pingpong -d vmw_pvrdma0 -g 1 -n 200 -p 19001",
        "ibv_rc_pingpong -d vmw_pvrdma0 -g 1 -n 200 -p 19001 10.77.0.2",
    ),
    (
        "send_bw",
        "ib_send_bw -d vmw_pvrdma0 -x 1 -s 65536 -n 200 -p 19002",
        "ib_send_bw -d vmw_pvrdma0 -x 1 -s 65536 -n 200 -p 19002 10.77.0.2",
    ),
    (
        "write_bw",
        "ib_write_bw -d vmw_pvrdma0 -x 1 -s 65536 -n 200 -p 19003",
        "ib_write_bw -d vmw_pvrdma0 -x 1 -s 65536 -n 200 -p 19003 10.77.0.2",
    ),
    (
        "read_bw",
        "ib_read_bw -d vmw_pvrdma0 -x 1 -s 65536 -n 200 -p 19004",
        "ib_read_bw -d vmw_pvrdma0 -x 1 -s 65536 -n 200 -p 19004 10.77.0.2",
    ),
    (
        "write_lat",
        "ib_write_lat -d vmw_pvrdma0 -x 1 -s 64 -n 200 -p 19005",
        "ib_write_lat -d vmw_pvrdma0 -x 1 -s 64 -n 200 -p 19005 10.77.0.2",
    ),
];

/// `rping -v -V` through the RDMA CM: address and route resolution over the vmxnet3, the CM's
/// REQ/REP/RTU as MADs on both GSI QPs (QP1), then RC SEND/READ/WRITE whose data rping checks
/// (`-V`) and prints (`-v`).
const RPING: Tool = (
    "rping",
    "rping -s -a 10.77.0.2 -p 19006 -C 10 -v -V",
    "rping -c -a 10.77.0.2 -p 19006 -C 10 -v -V",
);

/// The same verbs over RoCEv2/IPv6: GID index 0 is each port's link-local RoCE v2 GID
/// (`fe80::…` from the MAC), so the packets are IPv6 (the out-of-band TCP exchange stays IPv4).
const IPV6_TOOLS: [Tool; 3] = [
    (
        "ud_pingpong_v6",
        "ibv_ud_pingpong -d vmw_pvrdma0 -g 0 -s 1000 -n 50 -p 19011",
        "ibv_ud_pingpong -d vmw_pvrdma0 -g 0 -s 1000 -n 50 -p 19011 10.77.0.2",
    ),
    (
        "rc_pingpong_v6",
        "ibv_rc_pingpong -d vmw_pvrdma0 -g 0 -n 50 -p 19012",
        "ibv_rc_pingpong -d vmw_pvrdma0 -g 0 -n 50 -p 19012 10.77.0.2",
    ),
    (
        "write_bw_v6",
        "ib_write_bw -d vmw_pvrdma0 -x 0 -s 65536 -n 100 -p 19013",
        "ib_write_bw -d vmw_pvrdma0 -x 0 -s 65536 -n 100 -p 19013 10.77.0.2",
    ),
];

/// `ibv_srq_pingpong`: four RC QPs receiving through one shared receive queue.
const SRQ_PINGPONG: Tool = (
    "srq_pingpong",
    "ibv_srq_pingpong -d vmw_pvrdma0 -g 1 -q 4 -n 100 -p 19014",
    "ibv_srq_pingpong -d vmw_pvrdma0 -g 1 -q 4 -n 100 -p 19014 10.77.0.2",
);

/// UD ping-pong.
const UD_PINGPONG: Tool = (
    "ud_pingpong",
    "ibv_ud_pingpong -d vmw_pvrdma0 -g 1 -s 1000 -n 100 -p 19007",
    "ibv_ud_pingpong -d vmw_pvrdma0 -g 1 -s 1000 -n 100 -p 19007 10.77.0.2",
);

/// perftest's refusal when its CPU clock samples scatter (see `run_tools_between_two_guests`).
const CLOCK_NOISE: &str = "Can't produce a report";

/// Two `--rdma-nic` guests (client 10.77.0.1, server 10.77.0.2; `extra` flags on both) ping
/// each other, run `tools` in order, then `finally` (on both); panics unless every tool exits 0
/// on both sides. Returns (client stdout, server stdout).
fn run_tools_between_two_guests(extra: &[&str], tools: &[Tool], finally: &str) -> (String, String) {
    let (port_a, port_b) = free_ports();
    let mut server = String::from(
        "i=0; until ping -c 1 -W 1 10.77.0.1 >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 600 ] || exit 1; done\nst=0\n",
    );
    let mut client = String::from(
        "i=0; until ping -c 1 -W 1 10.77.0.2 >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 600 ] || exit 1; done\nst=0\n",
    );
    for (name, srv, cli) in tools {
        // perftest converts cycles to time with a CPU clock it samples, and when the samples
        // scatter ("Correlation coefficient r^2 ... Can't produce a report"), as TCG's clock
        // sometimes makes them, it exits 1 after the run instead of printing the report: that
        // side's run counts as done (retrying it alone found its peer gone: the peer's run had
        // succeeded). A peer's broken exchange is retried up to 3 times; connections until the
        // peer listens.
        server.push_str(&format!(
            "echo '== {name}'; a=0; while :; do timeout 300 {srv} > /tmp/{name} 2>&1; r=$?; [ $r = 0 ] && break; if grep -q \"{CLOCK_NOISE}\" /tmp/{name}; then echo \"== {name} ran but printed no report (TCG clock)\"; r=0; break; fi; grep -q \"Couldn't read remote address\\|Failed to exchange data\" /tmp/{name} || break; a=$((a+1)); [ $a -lt 3 ] || break; cat /tmp/{name}; echo \"== {name} retried\"; done; cat /tmp/{name}; echo \"== {name} exit $r\"; [ $r = 0 ] || st=1\n"
        ));
        client.push_str(&format!(
            "echo '== {name}'; n=0; a=0; while :; do timeout 300 {cli} > /tmp/{name} 2>&1; r=$?; [ $r = 0 ] && break; if grep -q \"{CLOCK_NOISE}\" /tmp/{name}; then echo \"== {name} ran but printed no report (TCG clock)\"; r=0; break; fi; if grep -q \"Failed to exchange data\" /tmp/{name}; then a=$((a+1)); [ $a -lt 3 ] || break; cat /tmp/{name}; echo \"== {name} retried\"; else grep -q \"Couldn't connect\\|Unable to open\\|Failed to connect\\|Couldn't get\\|REJECTED\\|connect error\" /tmp/{name} || break; n=$((n+1)); [ $n -lt 60 ] || break; fi; sleep 2; done; cat /tmp/{name}; echo \"== {name} exit $r\"; [ $r = 0 ] || st=1\n"
        ));
    }
    for script in [&mut server, &mut client] {
        script.push_str(finally);
        script.push_str("\nexit $st\n");
    }
    let args = |nic: String, script: &str| -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec!["run".into(), "--timeout=1500".into()];
        a.extend(extra.iter().map(|e| e.into()));
        a.push(format!("--rdma-nic={nic}").into());
        a.extend(["--", "sh", "-c", script].map(Into::into));
        a
    };
    let (ra, rb) = guests_side_by_side(
        args(
            format!(
                "mac=02:00:00:00:00:0a,ip=10.77.0.1/24,fabric=udp:127.0.0.1:{port_a},peer=127.0.0.1:{port_b}"
            ),
            &client,
        ),
        args(
            format!(
                "mac=02:00:00:00:00:0b,ip=10.77.0.2/24,fabric=udp:127.0.0.1:{port_b},peer=127.0.0.1:{port_a}"
            ),
            &server,
        ),
    );
    eprintln!(
        "--- client ---\n{}\n--- server ---\n{}",
        ra.stdout, rb.stdout
    );
    for (name, _, _) in tools {
        for (who, out) in [("client", &ra.stdout), ("server", &rb.stdout)] {
            assert!(
                out.contains(&format!("== {name} exit 0")),
                "{who} {name}: {out}"
            );
        }
    }
    ra.expect_status(0);
    rb.expect_status(0);
    (ra.stdout, rb.stdout)
}

/// rping's output: the client printed all ten pings' data (which `-V` checked).
fn assert_rping_verified(client: &str, server: &str) {
    for i in 0..10 {
        assert!(
            client.contains(&format!("ping data: rdma-ping-{i}: ")),
            "rping ping {i}: {client}"
        );
    }
    assert!(
        server.contains("server ping data: rdma-ping-9: "),
        "{server}"
    );
}

/// Acceptance 2 between two `--rdma-nic` guests: `ibv_ud_pingpong` (UD sends as RoCEv2
/// packets, addresses from the IPv4-mapped GIDs, MACs from the guests' neighbour tables),
/// `ibv_rc_pingpong`, perftest's `ib_send_bw`, `ib_write_bw`, `ib_read_bw` and
/// `ib_write_lat` complete with their own checks, and `rping -v -V` connects through the
/// RDMA CM and verifies its data; `ibv_srq_pingpong` runs four QPs on one shared receive
/// queue; UD, RC and `ib_write_bw` also run over RoCEv2/IPv6 on the link-local GIDs.
#[test]
fn two_guests_run_ud_rc_perftest_and_rping_over_roce_v2() {
    let mut tools = vec![UD_PINGPONG];
    tools.extend(RC_TOOLS);
    tools.push(RPING);
    tools.push(SRQ_PINGPONG);
    tools.extend(IPV6_TOOLS);
    let (client, server) = run_tools_between_two_guests(&[], &tools, "");
    for (who, out) in [("client", &client), ("server", &server)] {
        assert!(
            out.contains("GID fe80::ff:fe00:"),
            "{who}: IPv6 GIDs used: {out}"
        );
        assert!(out.contains("50 iters in"), "{who}: {out}");
    }
    for (who, out) in [("client", &client), ("server", &server)] {
        assert!(out.contains("100 iters in"), "{who} ud_pingpong: {out}");
        assert!(
            out.contains("local address:") && out.contains("remote address:"),
            "{who}: {out}"
        );
    }
    assert!(client.contains("200 iters in"), "{client}");
    assert_rping_verified(&client, &server);
}

/// Acceptance 5: with `--iommu vtd` on both guests, the PVRDMA function's DMA (rings, page
/// directories, user MRs) goes through the guest's DMA-API domain — IOVAs the device
/// translates through the guest's VT-d tables — and the UD, RC and RDMA CM tools still pass.
#[test]
fn two_guests_with_vtd_remapping_run_the_rdma_tools() {
    let mut tools = vec![UD_PINGPONG];
    tools.extend(RC_TOOLS);
    tools.push(RPING);
    let domain = "for d in /sys/bus/pci/devices/*; do \
        [ \"$(cat $d/vendor):$(cat $d/device)\" = 0x15ad:0x0820 ] && \
        echo \"pvrdma-domain $(cat $d/iommu_group/type 2>/dev/null || echo none)\"; done; true";
    let (client, server) = run_tools_between_two_guests(&["--iommu=vtd"], &tools, domain);
    for (who, out) in [("client", &client), ("server", &server)] {
        // "DMA" or "DMA-FQ": translated, not identity-mapped.
        assert!(
            out.lines().any(|l| l.starts_with("pvrdma-domain DMA")),
            "{who}: the PVRDMA function is not in a translated DMA domain:\n{out}"
        );
        assert!(out.contains("100 iters in"), "{who}: {out}");
    }
    assert_rping_verified(&client, &server);
}
