//! VMM side of the emulated vmxnet3 NIC: `--nic [id=NAME][,mac=MAC][,ip=ADDR/PREFIX],
//! fabric=udp:LOCAL_IP:PORT,peer=IP:PORT` parsing, the UDP fabric that carries its Ethernet
//! frames to another `vmm run`, and placing the function on the root bus. The model is
//! `devices::vmxnet3`.
//!
//! # The fabric
//! Each Ethernet frame travels as one UDP datagram from the NIC's local socket
//! (`fabric=udp:LOCAL_IP:PORT`) to its peer (`peer=IP:PORT`); two `vmm run` commands whose
//! fabrics name each other are two stations on one wire. Datagrams from any source are frames
//! for this NIC (so the path through NATs and forwarders does not matter). Sending never blocks
//! a vCPU: a full socket buffer drops the frame, as a congested wire would.
//!
//! Received datagrams are read on the VMM's main event loop (the NIC's socket is one of its
//! device subscribers); transmitted frames leave from the vCPU that rang the Tx doorbell.
//!
//! # Under the nested-KVM host
//! When the VMM runs one level down (this machine's /dev/kvm cannot run a stock guest), the
//! outer `vmm run` gives the nested host a user-mode network (QEMU's slirp) that forwards
//! `LOCAL_IP:PORT` (UDP, on this machine) to the same port inside, and the VMM inside binds
//! `0.0.0.0:PORT`. Its frames to a peer on this machine's loopback go to the slirp gateway
//! 10.0.2.2, which is this machine's 127.0.0.1 — so they arrive at the peer's forwarded port,
//! whether the peer runs directly on /dev/kvm or in a nested host of its own. Peers elsewhere
//! are reached through slirp's NAT.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::pci::{PciAddress, SharedFunction};
use devices::pvrdma::PvrdmaFunction;
use devices::vmxnet3::{FrameSink, Vmxnet3Function, format_mac};
use event_manager::{EventOps, Events, MutEventSubscriber};
use iommu::{DmaSpace, DmaTranslator, MsiSink};
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

/// How many `--nic` functions a VM may have.
pub const MAX_NICS: usize = 4;
/// The nested host's slirp gateway: this machine's loopback as seen from inside.
pub const NESTED_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// A bad `--nic` / `--rdma-nic` value.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid --{flag} '{spec}': {reason}")]
pub struct NicSpecError {
    flag: &'static str,
    spec: String,
    reason: String,
}

/// `--nic [id=NAME][,mac=MAC][,ip=ADDR/PREFIX],fabric=udp:LOCAL_IP:PORT,peer=IP:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// Name for logs and the control API (default `nic<index>`).
    pub id: String,
    /// Station address (default: locally administered, derived from the id and the fabric's
    /// local address, so two VMs on one machine differ).
    pub mac: [u8; 6],
    /// Address the guest's init gives the interface (with its prefix length).
    pub ip: Option<(IpAddr, u8)>,
    /// Where the fabric socket binds.
    pub local: SocketAddr,
    /// Where frames go.
    pub peer: SocketAddr,
    /// `--rdma-nic`: a PVRDMA function 1 next to the vmxnet3 function 0.
    pub rdma: bool,
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// A locally administered unicast MAC from `id` and `local` (FNV-1a).
fn derived_mac(id: &str, local: &SocketAddr) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes().chain(local.to_string().bytes()) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let [a, b, c, _] = h.to_be_bytes();
    [0x02, 0x76, 0x6d, a, b, c]
}

impl NicSpec {
    /// Parses the `index`-th `--nic` value (`rdma`: the `index`-th `--rdma-nic`).
    pub fn parse(spec: &str, index: usize, rdma: bool) -> Result<Self, NicSpecError> {
        let flag = if rdma { "rdma-nic" } else { "nic" };
        let err = |reason: String| NicSpecError {
            flag,
            spec: spec.to_string(),
            reason,
        };
        let mut id = if rdma {
            format!("rdma{index}")
        } else {
            format!("nic{index}")
        };
        let mut mac = None;
        let mut ip = None;
        let mut local = None;
        let mut peer = None;
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err(format!("'{part}' is not key=value")))?;
            match key {
                "id" => {
                    crate::config::check_device_id(value).map_err(err)?;
                    id = value.to_string();
                }
                "mac" => {
                    let m = parse_mac(value).ok_or_else(|| {
                        err(format!(
                            "mac={value}: expected six hex bytes like 02:00:00:00:00:01"
                        ))
                    })?;
                    if m[0] & 1 != 0 || m == [0; 6] {
                        return Err(err(format!("mac={value}: not a unicast station address")));
                    }
                    mac = Some(m);
                }
                "ip" => {
                    let (addr, prefix) = value
                        .split_once('/')
                        .ok_or_else(|| err(format!("ip={value}: expected ADDR/PREFIX")))?;
                    let addr: IpAddr = addr
                        .parse()
                        .map_err(|_| err(format!("ip={value}: '{addr}' is not an IP address")))?;
                    let max = if addr.is_ipv4() { 32 } else { 128 };
                    let prefix: u8 = prefix
                        .parse()
                        .ok()
                        .filter(|p| *p <= max)
                        .ok_or_else(|| err(format!("ip={value}: prefix must be 0..={max}")))?;
                    ip = Some((addr, prefix));
                }
                "fabric" => {
                    let addr = value.strip_prefix("udp:").ok_or_else(|| {
                        err(format!("fabric={value}: expected udp:LOCAL_IP:PORT"))
                    })?;
                    let a: SocketAddr = addr
                        .parse()
                        .map_err(|_| err(format!("fabric={value}: '{addr}' is not IP:PORT")))?;
                    if a.port() == 0 {
                        return Err(err(format!("fabric={value}: the port must not be 0")));
                    }
                    local = Some(a);
                }
                "peer" => {
                    let a: SocketAddr = value
                        .parse()
                        .map_err(|_| err(format!("peer={value}: expected IP:PORT")))?;
                    if a.port() == 0 || a.ip().is_unspecified() {
                        return Err(err(format!("peer={value}: needs an address and a port")));
                    }
                    peer = Some(a);
                }
                other => {
                    return Err(err(format!(
                        "unknown key '{other}' (keys: id, mac, ip, fabric, peer)"
                    )));
                }
            }
        }
        let local = local.ok_or_else(|| err("fabric=udp:LOCAL_IP:PORT is required".to_string()))?;
        let peer = peer.ok_or_else(|| err("peer=IP:PORT is required".to_string()))?;
        if local == peer {
            return Err(err(format!("peer={peer} is the NIC's own fabric address")));
        }
        Ok(NicSpec {
            mac: mac.unwrap_or_else(|| derived_mac(&id, &local)),
            id,
            ip,
            local,
            peer,
            rdma,
        })
    }

    /// Parses every `--nic` and `--rdma-nic` value (plain NICs first), refusing duplicate ids,
    /// duplicate fabric addresses or MACs and too many NICs.
    pub fn parse_all(nics: &[String], rdma_nics: &[String]) -> Result<Vec<Self>, String> {
        let mut all = crate::config::parse_device_specs(
            "nic",
            nics,
            MAX_NICS,
            |s, i| Self::parse(s, i, false).map_err(|e| e.to_string()),
            |spec| &spec.id,
        )?;
        all.extend(crate::config::parse_device_specs(
            "rdma-nic",
            rdma_nics,
            MAX_NICS,
            |s, i| Self::parse(s, i, true).map_err(|e| e.to_string()),
            |spec| &spec.id,
        )?);
        if all.len() > MAX_NICS {
            return Err(format!(
                "too many --nic and --rdma-nic devices ({}): at most {MAX_NICS}",
                all.len()
            ));
        }
        let nics = all;
        let mut ids = HashSet::new();
        for n in &nics {
            if !ids.insert(n.id.as_str()) {
                return Err(format!(
                    "invalid --nic/--rdma-nic: two NICs use the id '{}'",
                    n.id
                ));
            }
        }
        let mut seen = HashSet::new();
        for n in &nics {
            if !seen.insert(n.local) {
                return Err(format!(
                    "invalid --nic/--rdma-nic: two NICs use the fabric address {}",
                    n.local
                ));
            }
        }
        let mut macs = HashSet::new();
        for n in &nics {
            if !macs.insert(n.mac) {
                return Err(format!(
                    "invalid --nic/--rdma-nic: two NICs use the MAC address {}",
                    format_mac(&n.mac)
                ));
            }
        }
        Ok(nics)
    }

    /// The spec as a `--nic` value (every field explicit).
    pub fn to_arg(&self) -> String {
        let mut s = format!("id={},mac={}", self.id, format_mac(&self.mac));
        if let Some((addr, prefix)) = self.ip {
            s.push_str(&format!(",ip={addr}/{prefix}"));
        }
        s.push_str(&format!(",fabric=udp:{},peer={}", self.local, self.peer));
        s
    }

    /// The spec for the VMM inside the nested host: it binds the forwarded port on every
    /// address, and reaches peers on this machine's loopback through the slirp gateway.
    pub fn for_nested_host(&self) -> NicSpec {
        let mut inner = self.clone();
        inner.local = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), self.local.port());
        if self.peer.ip().is_loopback() {
            inner.peer = SocketAddr::new(IpAddr::V4(NESTED_GATEWAY), self.peer.port());
        }
        inner
    }

    /// The guest's init configures the interface from this kernel parameter
    /// (`vmm.nic=MAC,ADDR/PREFIX`).
    pub fn kernel_parameter(&self) -> Option<String> {
        self.ip
            .map(|(addr, prefix)| format!("vmm.nic={},{addr}/{prefix}", format_mac(&self.mac)))
    }
}

/// The root-bus device number of the `index`-th NIC (00:08.0, 00:09.0, …: clear of the
/// root ports from 00:01.0, the I/OAT functions from 00:10.0 and the SVA engines from 00:18.0).
pub fn device_number(index: usize) -> u8 {
    0x08 + index as u8
}

/// What the fabric counts.
#[derive(Debug, Default)]
pub struct FabricCounters {
    /// Frames sent.
    pub sent: AtomicU64,
    /// Frames dropped on send (socket buffer full, unreachable peer).
    pub send_dropped: AtomicU64,
    /// Datagrams received.
    pub received: AtomicU64,
}

/// The sending half: frames from the NIC to the peer.
struct UdpFabric {
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    counters: Arc<FabricCounters>,
}

impl FrameSink for UdpFabric {
    fn send_frame(&self, frame: &[u8]) {
        match self.socket.send_to(frame, self.peer) {
            Ok(_) => self.counters.sent.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                log::debug!("nic fabric: frame to {} dropped: {e}", self.peer);
                self.counters.send_dropped.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// The receiving half: the main loop reads datagrams and hands them to the NIC.
struct FabricReceiver {
    socket: Arc<UdpSocket>,
    function: Arc<Mutex<Vmxnet3Function>>,
    /// RoCEv2 frames for the station go to the RDMA function instead of the netdev.
    rdma: Option<Arc<Mutex<PvrdmaFunction>>>,
    counters: Arc<FabricCounters>,
    buffer: Vec<u8>,
}

impl MutEventSubscriber for FabricReceiver {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.socket.as_ref(), EventSet::IN)) {
            log::error!("nic fabric: cannot watch the socket: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Drain what is there (bounded, so the loop's other work is not starved).
        for _ in 0..256 {
            match self.socket.recv_from(&mut self.buffer) {
                Ok((n, _from)) => {
                    self.counters.received.fetch_add(1, Ordering::Relaxed);
                    let frame = &self.buffer[..n];
                    if let Some(rdma) = &self.rdma
                        && devices::pvrdma::roce::is_roce_v2(frame)
                        && frame[..6] == lock(&self.function).mac()
                        && lock(rdma).receive_packet(frame)
                    {
                        continue;
                    }
                    lock(&self.function).receive_frame(frame);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors from an absent peer surface here as ECONNREFUSED: not fatal.
                Err(e) => log::debug!("nic fabric: receive: {e}"),
            }
        }
    }
}

/// An installed NIC.
#[derive(Clone)]
pub struct NicHandle {
    /// Its `id=`.
    pub id: String,
    /// Where it sits.
    pub address: PciAddress,
    /// The model (for the control API and tests).
    pub function: Arc<Mutex<Vmxnet3Function>>,
    /// The fabric's counters.
    pub fabric: Arc<FabricCounters>,
    /// `--rdma-nic`: the PVRDMA function 1.
    pub rdma: Option<Arc<Mutex<PvrdmaFunction>>>,
}

impl NicHandle {
    /// Sets the link of the vmxnet3 function and, with an RDMA function, its port.
    pub fn set_link(&self, up: bool) {
        lock(&self.function).set_link(up);
        if let Some(rdma) = &self.rdma {
            lock(rdma).set_port_active(up);
        }
    }
}

/// Adds one vmxnet3 function per spec to the root bus, binds its fabric socket and returns the
/// handles and the main-loop subscribers that receive their frames.
pub fn install(
    specs: &[NicSpec],
    memory: &crate::cxl::DmaMemory,
    msi: &Arc<dyn MsiSink>,
    translator: Option<Arc<dyn DmaTranslator>>,
    platform: &mut crate::pci::Platform,
) -> Result<(Vec<NicHandle>, Vec<crate::vm::DeviceSubscriber>), String> {
    let mut handles = Vec::new();
    let mut subscribers: Vec<crate::vm::DeviceSubscriber> = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        let socket = UdpSocket::bind(spec.local).map_err(|e| {
            format!(
                "--nic {}: cannot bind the fabric socket to {}: {e}",
                spec.id, spec.local
            )
        })?;
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("--nic {}: fabric socket: {e}", spec.id))?;
        // Bursts (an RC window, a READ's responses, TSO segments) must not overflow the
        // default buffers, least of all inside the nested host.
        for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            let size: libc::c_int = 4 << 20;
            // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its
            // size; failure only leaves the default size.
            let r = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                log::debug!("nic fabric: cannot enlarge a socket buffer");
            }
        }
        let socket = Arc::new(socket);
        let counters = Arc::new(FabricCounters::default());
        let device = device_number(index);
        let rid = iommu::RequesterId::new(0, device, 0);
        let dma = match &translator {
            Some(t) => DmaSpace::with_translator(rid, memory.clone(), t.clone()),
            None => DmaSpace::identity(rid, memory.clone()),
        };
        let sink = Arc::new(UdpFabric {
            socket: socket.clone(),
            peer: spec.peer,
            counters: counters.clone(),
        });
        let function = Vmxnet3Function::new(spec.mac, dma, msi.clone(), sink)
            .map_err(|e| format!("--nic {}: {e}", spec.id))?;
        let (shared, handle) = SharedFunction::new(function);
        let address = platform.add_root_bus_function(device, Box::new(shared))?;
        let rdma = if spec.rdma {
            let rid = iommu::RequesterId::new(0, device, 1);
            let dma = match &translator {
                Some(t) => DmaSpace::with_translator(rid, memory.clone(), t.clone()),
                None => DmaSpace::identity(rid, memory.clone()),
            };
            let mut f = PvrdmaFunction::new(spec.mac, dma, msi.clone())
                .map_err(|e| format!("--rdma-nic {}: {e}", spec.id))?;
            f.set_wire(Arc::new(UdpFabric {
                socket: socket.clone(),
                peer: spec.peer,
                counters: counters.clone(),
            }));
            let (shared, handle) = SharedFunction::new(f);
            platform.add_root_bus_function_at(device, 1, Box::new(shared))?;
            // The RC transport's retransmission and RNR timers.
            let timers = Arc::downgrade(&handle);
            std::thread::Builder::new()
                .name(format!("{}-rc-timers", spec.id))
                .spawn(move || {
                    while let Some(f) = timers.upgrade() {
                        lock(&f).tick(std::time::Instant::now());
                        drop(f);
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                })
                .map_err(|e| format!("--rdma-nic {}: timer thread: {e}", spec.id))?;
            Some(handle)
        } else {
            None
        };
        log::info!(
            "NIC {} (vmxnet3{}, {}) at {address}: fabric udp {} (fd {}) -> {}",
            spec.id,
            if spec.rdma { " + PVRDMA" } else { "" },
            format_mac(&spec.mac),
            spec.local,
            socket.as_raw_fd(),
            spec.peer
        );
        subscribers.push(Arc::new(Mutex::new(FabricReceiver {
            socket,
            function: handle.clone(),
            rdma: rdma.clone(),
            counters: counters.clone(),
            buffer: vec![0u8; 65536],
        })));
        handles.push(NicHandle {
            id: spec.id.clone(),
            address,
            function: handle,
            fabric: counters,
            rdma,
        });
    }
    Ok((handles, subscribers))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FABRIC: &str = "fabric=udp:127.0.0.1:7001,peer=127.0.0.1:7002";

    #[test]
    fn specs_parse_with_defaults_and_round_trip() {
        let n = NicSpec::parse(FABRIC, 0, false).unwrap();
        assert_eq!(n.id, "nic0");
        assert_eq!(n.local, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(n.peer, "127.0.0.1:7002".parse().unwrap());
        assert_eq!(n.mac[..3], [0x02, 0x76, 0x6d]);
        assert_eq!(n.ip, None);
        let other =
            NicSpec::parse("fabric=udp:127.0.0.1:7002,peer=127.0.0.1:7001", 0, false).unwrap();
        assert_ne!(n.mac, other.mac, "two VMs' default MACs differ");
        let full = NicSpec::parse(
            &format!("id=a,mac=02:00:00:00:00:0a,ip=10.9.0.1/24,{FABRIC}"),
            0,
            false,
        )
        .unwrap();
        assert_eq!(full.ip, Some(("10.9.0.1".parse().unwrap(), 24)));
        assert_eq!(NicSpec::parse(&full.to_arg(), 3, false).unwrap(), full);
        assert_eq!(
            full.kernel_parameter().as_deref(),
            Some("vmm.nic=02:00:00:00:00:0a,10.9.0.1/24")
        );
    }

    #[test]
    fn bad_specs_name_the_bad_value() {
        for (spec, needle) in [
            ("", "fabric=udp:LOCAL_IP:PORT is required"),
            ("fabric=udp:127.0.0.1:7001", "peer=IP:PORT is required"),
            (
                "fabric=tcp:1.2.3.4:5,peer=1.2.3.4:6",
                "fabric=tcp:1.2.3.4:5",
            ),
            (
                "fabric=udp:127.0.0.1:0,peer=1.2.3.4:6",
                "port must not be 0",
            ),
            ("fabric=udp:127.0.0.1:7,peer=nowhere", "peer=nowhere"),
            (
                "fabric=udp:127.0.0.1:7,peer=127.0.0.1:7",
                "own fabric address",
            ),
            (&format!("mac=01:00:00:00:00:01,{FABRIC}"), "not a unicast"),
            (
                &format!("mac=02:00:00:00:00,{FABRIC}"),
                "mac=02:00:00:00:00",
            ),
            (&format!("ip=10.0.0.1,{FABRIC}"), "ADDR/PREFIX"),
            (&format!("ip=10.0.0.1/33,{FABRIC}"), "prefix must be 0..=32"),
            (&format!("ip=ten/8,{FABRIC}"), "'ten' is not an IP address"),
            (&format!("speed=10,{FABRIC}"), "unknown key 'speed'"),
        ] {
            let e = NicSpec::parse(spec, 0, false).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
            assert!(e.starts_with("invalid --nic"), "{e}");
        }
        let rdma = NicSpec::parse(FABRIC, 0, true).unwrap();
        assert_eq!((rdma.id.as_str(), rdma.rdma), ("rdma0", true));
        let e = NicSpec::parse("fabric=udp:1.2.3.4:5", 0, true).unwrap_err();
        assert!(e.to_string().starts_with("invalid --rdma-nic"), "{e}");
        let same_id = NicSpec::parse_all(
            &[format!("id=x,{FABRIC}")],
            &["id=x,fabric=udp:127.0.0.1:7003,peer=127.0.0.1:7004".to_string()],
        );
        assert!(same_id.unwrap_err().contains("id 'x'"));
        let dup = NicSpec::parse_all(&[FABRIC.to_string(), format!("id=b,{FABRIC}")], &[]);
        assert!(dup.unwrap_err().contains("fabric address 127.0.0.1:7001"));
    }

    #[test]
    fn the_nested_host_binds_everywhere_and_reaches_loopback_peers_through_the_gateway() {
        let n = NicSpec::parse(FABRIC, 0, false).unwrap();
        let inner = n.for_nested_host();
        assert_eq!(inner.local, "0.0.0.0:7001".parse().unwrap());
        assert_eq!(inner.peer, "10.0.2.2:7002".parse().unwrap());
        assert_eq!(inner.mac, n.mac, "the MAC does not change inside");
        let far =
            NicSpec::parse("fabric=udp:192.0.2.1:7001,peer=192.0.2.2:7002", 0, false).unwrap();
        assert_eq!(far.for_nested_host().peer, far.peer);
    }

    /// Two fabrics on loopback carry frames both ways (the wire two VMs share).
    #[test]
    fn two_fabrics_exchange_frames() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sink = UdpFabric {
            socket: Arc::new(a.try_clone().unwrap()),
            peer: b.local_addr().unwrap(),
            counters: Arc::new(FabricCounters::default()),
        };
        sink.send_frame(&[0xab; 60]);
        let mut buf = [0u8; 100];
        let (n, from) = b.recv_from(&mut buf).unwrap();
        assert_eq!((n, from), (60, a.local_addr().unwrap()));
        assert_eq!(sink.counters.sent.load(Ordering::Relaxed), 1);
    }
}
