//! tcp-blob: a bulk TCP transfer with an end-to-end check, for the NIC guest tests.
//!
//! A single-file, std-only program compiled statically on the host (`tests/common::guest_tool`)
//! and copied into the guest with `vmm run --guest-file`.
//!
//! ```text
//! tcp-blob send HOST:PORT LEN SEED [--retry-secs=S]
//!     connect (retrying for S seconds, default 120, while the receiver is not listening yet),
//!     send LEN bytes of the pattern of SEED, half-close, read the receiver's report line and
//!     print `tcp-blob sent bytes=LEN fnv=HASH peer-report=...`
//! tcp-blob recv PORT
//!     accept one connection, read to EOF, answer `bytes=N fnv=HASH\n`, print
//!     `tcp-blob received bytes=N fnv=HASH`
//! ```
//!
//! The sender's process exits only after the receiver answered, so every byte had arrived;
//! comparing the two hashes proves the data crossed intact (through checksum offload and TSO).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::exit;
use std::time::{Duration, Instant};

fn fnv(hash: u64, data: &[u8]) -> u64 {
    data.iter()
        .fold(hash, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (offset + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
        *b = (x >> 29) as u8;
    }
}

fn die(msg: String) -> ! {
    eprintln!("tcp-blob: {msg}");
    exit(1);
}

fn send(addr: &str, len: u64, seed: u64, retry: Duration) {
    let started = Instant::now();
    let mut stream = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if started.elapsed() < retry => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => die(format!("cannot connect to {addr}: {e}")),
        }
    };
    let mut hash = FNV_START;
    let mut buf = vec![0u8; 1 << 16];
    let mut sent = 0u64;
    while sent < len {
        let n = (len - sent).min(buf.len() as u64) as usize;
        pattern(seed, sent, &mut buf[..n]);
        hash = fnv(hash, &buf[..n]);
        stream
            .write_all(&buf[..n])
            .unwrap_or_else(|e| die(format!("send: {e}")));
        sent += n as u64;
    }
    stream
        .shutdown(Shutdown::Write)
        .unwrap_or_else(|e| die(format!("shutdown: {e}")));
    let mut report = String::new();
    BufReader::new(&stream)
        .read_line(&mut report)
        .unwrap_or_else(|e| die(format!("reading the receiver's report: {e}")));
    println!(
        "tcp-blob sent bytes={len} fnv={hash:016x} peer-report={}",
        report.trim()
    );
}

fn recv(port: u16) {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .unwrap_or_else(|e| die(format!("cannot listen on {port}: {e}")));
    let (mut stream, _) = listener
        .accept()
        .unwrap_or_else(|e| die(format!("accept: {e}")));
    let mut hash = FNV_START;
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hash = fnv(hash, &buf[..n]);
                total += n as u64;
            }
            Err(e) => die(format!("receive: {e}")),
        }
    }
    let line = format!("bytes={total} fnv={hash:016x}");
    stream
        .write_all(format!("{line}\n").as_bytes())
        .unwrap_or_else(|e| die(format!("answer: {e}")));
    let _ = stream.shutdown(Shutdown::Both);
    println!("tcp-blob received {line}");
}

fn usage() -> ! {
    die("usage: tcp-blob send HOST:PORT LEN SEED [--retry-secs=S] | tcp-blob recv PORT".into())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("send") if args.len() >= 4 => {
            let len = args[2].parse().unwrap_or_else(|_| usage());
            let seed = args[3].parse().unwrap_or_else(|_| usage());
            let retry = args
                .get(4)
                .and_then(|a| a.strip_prefix("--retry-secs="))
                .map(|s| s.parse().unwrap_or_else(|_| usage()))
                .unwrap_or(120);
            send(&args[1], len, seed, Duration::from_secs(retry));
        }
        Some("recv") if args.len() == 2 => recv(args[1].parse().unwrap_or_else(|_| usage())),
        _ => usage(),
    }
}
