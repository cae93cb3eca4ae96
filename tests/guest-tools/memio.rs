//! memio: memory I/O through `mmap`, for CXL guest tests and the CXL bandwidth benchmark.
//!
//! A single-file, std-only program compiled statically on the host (`tests/common::guest_tool`)
//! and copied into the guest with `vmm run --guest-file`. It runs on the host as well.
//!
//! ```text
//! memio fill  PATH LEN SEED     write the pattern of SEED over bytes 0..LEN of PATH
//! memio check PATH LEN SEED     verify it; exit 1 naming the first mismatching offset
//! memio bw    TARGET LEN [ROUNDS] [--u64] [--max-secs=S]
//!             sequential write then sequential read of LEN bytes, ROUNDS times (default 3),
//!             after ROUNDS first-touch write passes, each over a fresh mapping (page faults;
//!             the fastest reported as first_touch_mb_s, not in the rates); prints one line
//!             `memio-bw target=.. bytes=.. requested=.. rounds=.. access=vec|u64
//!             first_touch_mb_s=.. write_mb_s=.. read_mb_s=.. write_best_mb_s=..
//!             read_best_mb_s=.. partial=0|1 nodes=..`
//!             MB = 10^6 bytes; write/read = total bytes / total time over the rounds, best =
//!             the fastest round; nodes = `node:pages` of the mapping's pages (move_pages(2)).
//!             Access: memset and a vectorised sum (default), or `--u64`: one volatile 64-bit
//!             load or store per word (all an instruction emulator handles on emulated MMIO).
//!             `--max-secs=S` caps every pass at about S seconds (checked every 256 KiB): the
//!             last first-touch pass then fixes `bytes` (what later passes cover;
//!             `requested` is LEN) and `partial=1` says a later pass was cut short.
//! ```
//!
//! PATH is a regular file (never extended: LEN must fit) or a character device such as a
//! device-dax instance (`/dev/dax0.0`), which is mapped `MAP_SHARED`. TARGET is PATH, `anon`
//! (private anonymous memory, placed by the task's memory policy, e.g. under `numactl
//! --membind=N`) or `anon:N` (anonymous memory bound to node N with mbind(2)). LEN takes the
//! suffixes K, M, G (binary) or is `all` (the whole file or device). Device dax only maps whole
//! multiples of its alignment (`/sys/dev/char/MAJ:MIN/align`, typically 2 MiB): the mapping
//! length is rounded up to it (LEN itself need not be aligned; the device must be big enough).
//!
//! The pattern is one 64-bit little-endian word per 8-byte offset `off` from the start of the
//! file: `mix64(off + mix64(SEED))` (wrapping add), `mix64` being the splitmix64 finaliser.
//! LEN must be a multiple of 8 for fill and check.

use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::process::ExitCode;
use std::time::Instant;

const PROT_READ: i32 = 1;
const PROT_WRITE: i32 = 2;
const MAP_SHARED: i32 = 0x01;
const MAP_PRIVATE: i32 = 0x02;
const MAP_ANONYMOUS: i32 = 0x20;
const MS_SYNC: i32 = 4;
const MPOL_BIND: i64 = 2;
const SYS_MBIND: i64 = 237; // x86_64
const SYS_MOVE_PAGES: i64 = 279; // x86_64
const PAGE: usize = 4096;

// SAFETY: these are the C library's own declarations of mmap/munmap/msync/syscall (x86_64
// Linux ABI); every call site checks its arguments and results.
unsafe extern "C" {
    fn mmap(addr: *mut c_void, len: usize, prot: i32, flags: i32, fd: i32, off: i64)
    -> *mut c_void;
    fn munmap(addr: *mut c_void, len: usize) -> i32;
    fn msync(addr: *mut c_void, len: usize, flags: i32) -> i32;
    fn syscall(number: i64, ...) -> i64;
}

/// The splitmix64 finaliser.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The pattern word at byte offset `off` (a multiple of 8) for `seed`.
fn pattern(seed: u64, off: u64) -> u64 {
    mix64(off.wrapping_add(mix64(seed)))
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("memio: {msg}");
    std::process::exit(2);
}

fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        digits.parse::<u64>().ok()?
    };
    n.checked_mul(1 << shift)
}

fn parse_u64(what: &str, s: &str) -> u64 {
    parse_size(s).unwrap_or_else(|| fail(format!("bad {what} '{s}'")))
}

/// A shared or anonymous mapping, unmapped on drop.
struct Mapping {
    ptr: *mut c_void,
    map_len: usize,
    file: Option<File>,
}

impl Mapping {
    /// The mapping as 64-bit words (mmap returns page-aligned addresses).
    fn words(&self) -> *mut u64 {
        self.ptr.cast()
    }

    /// Writes a regular file's dirty pages back (device dax has no page cache: stores are in
    /// the device's memory already, and msync on it fails with EINVAL).
    fn sync(&self) {
        if !self
            .file
            .as_ref()
            .is_some_and(|f| f.metadata().is_ok_and(|m| m.file_type().is_file()))
        {
            return;
        }
        // SAFETY: msync on exactly the range this mapping owns.
        let rc = unsafe { msync(self.ptr, self.map_len, MS_SYNC) };
        if rc != 0 {
            fail(format!("msync: {}", std::io::Error::last_os_error()));
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range mmap returned; no references into it outlive
        // the Mapping (callers only hold raw pointers while it is alive).
        unsafe { munmap(self.ptr, self.map_len) };
    }
}

fn sysfs_u64(path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let t = text.trim();
    match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// Size and mapping alignment of PATH: a regular file's length (page alignment), or for a
/// character device its sysfs `size` and `align` (device dax).
fn size_and_align(path: &str, file: &File) -> (u64, u64) {
    let meta = file
        .metadata()
        .unwrap_or_else(|e| fail(format!("{path}: {e}")));
    if meta.file_type().is_char_device() {
        let dev = meta.rdev();
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let dir = format!("/sys/dev/char/{major}:{minor}");
        let size = sysfs_u64(&format!("{dir}/size"))
            .unwrap_or_else(|| fail(format!("{path}: no size in {dir} (not a dax device?)")));
        let align = sysfs_u64(&format!("{dir}/align")).unwrap_or(PAGE as u64);
        (size, align.max(PAGE as u64))
    } else if meta.file_type().is_file() {
        (meta.len(), PAGE as u64)
    } else {
        fail(format!(
            "{path}: neither a regular file nor a character device"
        ))
    }
}

/// Maps bytes 0..LEN of PATH shared, read-write; returns the mapping and LEN (resolved `all`).
fn map_path(path: &str, len_arg: &str) -> (Mapping, usize) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| fail(format!("{path}: {e}")));
    let (size, align) = size_and_align(path, &file);
    let len = if len_arg == "all" {
        size
    } else {
        parse_u64("length", len_arg)
    };
    if len == 0 {
        fail("length is 0");
    }
    let map_len = len.div_ceil(align) * align;
    if map_len > size {
        fail(format!(
            "{path}: {len} bytes (mapped as {map_len}, alignment {align}) exceed its size {size}"
        ));
    }
    let map_len = usize::try_from(map_len).unwrap_or_else(|_| fail("length too large"));
    // SAFETY: a fresh shared mapping of an open file descriptor chosen by the kernel; the
    // result is checked before use.
    let ptr = unsafe {
        mmap(
            std::ptr::null_mut(),
            map_len,
            PROT_READ | PROT_WRITE,
            MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr as isize == -1 {
        fail(format!(
            "mmap {path} ({map_len} bytes): {}",
            std::io::Error::last_os_error()
        ));
    }
    (
        Mapping {
            ptr,
            map_len,
            file: Some(file),
        },
        len as usize,
    )
}

/// Private anonymous memory of `len` bytes, bound to `node` when given.
fn map_anon(len: usize, node: Option<u32>) -> Mapping {
    let map_len = len.div_ceil(PAGE) * PAGE;
    // SAFETY: a fresh private anonymous mapping; the result is checked before use.
    let ptr = unsafe {
        mmap(
            std::ptr::null_mut(),
            map_len,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr as isize == -1 {
        fail(format!(
            "mmap anonymous ({map_len} bytes): {}",
            std::io::Error::last_os_error()
        ));
    }
    let mapping = Mapping {
        ptr,
        map_len,
        file: None,
    };
    if let Some(node) = node {
        if node >= 64 {
            fail(format!("node {node} out of range (0..63)"));
        }
        let mask: u64 = 1 << node;
        // SAFETY: mbind(addr, len, mode, nodemask, maxnode, flags) on our own mapping; the
        // node mask is a live u64 of 64 bits.
        let rc = unsafe {
            syscall(
                SYS_MBIND,
                ptr,
                map_len,
                MPOL_BIND,
                &raw const mask,
                64u64,
                0u64,
            )
        };
        if rc != 0 {
            fail(format!(
                "mbind to node {node}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    mapping
}

fn fill(path: &str, len: &str, seed: u64) -> ExitCode {
    let (map, len) = map_path(path, len);
    if len % 8 != 0 {
        fail("length must be a multiple of 8");
    }
    let words = map.words();
    let t = Instant::now();
    for i in 0..len / 8 {
        // SAFETY: i * 8 + 8 <= len <= the mapping's length; the mapping is 8-aligned.
        unsafe {
            words
                .add(i)
                .write_volatile(pattern(seed, i as u64 * 8).to_le());
        }
    }
    map.sync();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "memio-fill path={path} bytes={len} seed={seed} secs={secs:.3} mb_s={:.1}",
        len as f64 / secs / 1e6
    );
    ExitCode::SUCCESS
}

fn check(path: &str, len: &str, seed: u64) -> ExitCode {
    let (map, len) = map_path(path, len);
    if len % 8 != 0 {
        fail("length must be a multiple of 8");
    }
    let words = map.words();
    let t = Instant::now();
    let mut first = None;
    let mut bad = 0u64;
    for i in 0..len / 8 {
        // SAFETY: as in fill: in bounds and aligned.
        let found = u64::from_le(unsafe { words.add(i).read_volatile() });
        let off = i as u64 * 8;
        let want = pattern(seed, off);
        if found != want {
            bad += 1;
            first.get_or_insert((off, want, found));
        }
    }
    let secs = t.elapsed().as_secs_f64();
    match first {
        None => {
            println!(
                "memio-check path={path} bytes={len} seed={seed} ok secs={secs:.3} mb_s={:.1}",
                len as f64 / secs / 1e6
            );
            ExitCode::SUCCESS
        }
        Some((off, want, found)) => {
            println!(
                "memio-check path={path} bytes={len} seed={seed} MISMATCH first_offset={off:#x} \
                 expected={want:#018x} found={found:#018x} bad_words={bad}"
            );
            ExitCode::from(1)
        }
    }
}

/// How `bw` touches memory.
#[derive(Clone, Copy, PartialEq)]
enum Access {
    /// `memset` for writes, a vectorised sum for reads: what ordinary code does.
    Vec,
    /// One volatile 64-bit `mov` per word: the only kind of access a hypervisor's instruction
    /// emulator reliably handles when the memory is emulated MMIO (QEMU's CXL window).
    U64,
}

/// Sum of the words of `len` bytes at `p`, read in order (four independent accumulators so
/// the loop is not latency-bound; the compiler vectorises it).
fn read_sum(p: *const u64, len: usize) -> u64 {
    // SAFETY: callers pass a live mapping of at least `len` bytes, 8-aligned, that nothing
    // writes while the slice exists.
    let words = unsafe { std::slice::from_raw_parts(std::hint::black_box(p), len / 8) };
    let mut acc = [0u64; 4];
    let mut chunks = words.chunks_exact(4);
    for c in &mut chunks {
        for k in 0..4 {
            acc[k] = acc[k].wrapping_add(c[k]);
        }
    }
    let tail: u64 = chunks.remainder().iter().fold(0, |a, &w| a.wrapping_add(w));
    std::hint::black_box(acc[0] ^ acc[1] ^ acc[2] ^ acc[3] ^ tail)
}

fn write_all(p: *mut u8, len: usize, byte: u8) {
    // SAFETY: callers pass a live writable mapping of at least `len` bytes.
    unsafe { std::ptr::write_bytes(std::hint::black_box(p), byte, len) };
    std::hint::black_box(p);
}

/// Sequential pass over bytes 0..`len` of `p`, writing `byte` or reading, in
/// chunks; stops early once `max_secs` have passed. Returns (bytes done, seconds).
fn pass(p: *mut u64, len: usize, write: Option<u8>, access: Access, max_secs: f64) -> (usize, f64) {
    const CHUNK: usize = 256 << 10;
    let t = Instant::now();
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        let at = p.wrapping_add(done / 8);
        match (access, write) {
            (Access::Vec, Some(b)) => write_all(at.cast(), n, b),
            (Access::Vec, None) => {
                read_sum(at, n);
            }
            (Access::U64, Some(b)) => {
                let word = u64::from_ne_bytes([b; 8]);
                for i in 0..n / 8 {
                    // SAFETY: within the caller's live mapping (done + n <= len), 8-aligned.
                    unsafe { at.add(i).write_volatile(word) };
                }
            }
            (Access::U64, None) => {
                let mut sum = 0u64;
                for i in 0..n / 8 {
                    // SAFETY: as above.
                    sum = sum.wrapping_add(unsafe { at.add(i).read_volatile() });
                }
                std::hint::black_box(sum);
            }
        }
        done += n;
        // Only with a cap: reading the clock may be expensive (an emulated HPET exits to the
        // VMM on every read).
        if max_secs.is_finite() && t.elapsed().as_secs_f64() >= max_secs {
            break;
        }
    }
    (done, t.elapsed().as_secs_f64())
}

/// `node:pages` counts of the mapping's pages (`move_pages(2)` with no target nodes reports
/// where each page is); negative statuses are errors (e.g. `-14` EFAULT for device memory).
fn page_nodes(p: *mut u8, len: usize) -> String {
    let pages: Vec<*mut c_void> = (0..len.div_ceil(PAGE))
        .map(|i| p.wrapping_add(i * PAGE).cast())
        .collect();
    let mut status = vec![i32::MIN; pages.len()];
    // SAFETY: move_pages(pid 0 = self, count, pages, nodes = NULL (query), status, flags 0);
    // both arrays hold `count` live elements.
    let rc = unsafe {
        syscall(
            SYS_MOVE_PAGES,
            0i64,
            pages.len() as u64,
            pages.as_ptr(),
            std::ptr::null::<i32>(),
            status.as_mut_ptr(),
            0i64,
        )
    };
    if rc != 0 {
        return format!("unknown({})", std::io::Error::last_os_error());
    }
    let mut counts = std::collections::BTreeMap::new();
    for s in status {
        *counts.entry(s).or_insert(0u64) += 1;
    }
    counts
        .iter()
        .map(|(n, c)| format!("{n}:{c}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn bw(target: &str, len: &str, rounds: u32, access: Access, max_secs: f64) -> ExitCode {
    if rounds == 0 {
        fail("ROUNDS must be at least 1");
    }
    // A fresh mapping of the target each time: the first-touch passes each need one.
    let open = || match target.strip_prefix("anon") {
        Some(rest) => {
            if len == "all" {
                fail("anonymous memory needs an explicit length");
            }
            let len = usize::try_from(parse_u64("length", len))
                .unwrap_or_else(|_| fail("length too large"));
            let node = match rest {
                "" => None,
                r => Some(
                    r.strip_prefix(':')
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_else(|| fail(format!("bad target '{target}'"))),
                ),
            };
            (map_anon(len, node), len)
        }
        None => map_path(target, len),
    };
    let mb = |bytes: f64, secs: f64| bytes / secs / 1e6;

    // Untimed for the rates below: first touch (page faults, zeroing, device-dax faults), of
    // a fresh mapping each round, the best reported (one pass of page faults is short, so a
    // single interruption skews it). The last mapping is the one measured afterwards, over
    // what its first touch reached.
    let touch = || {
        let (map, len) = open();
        let requested = len / 8 * 8;
        let (len, secs) = pass(map.words(), requested, Some(0x5a), access, max_secs);
        (map, len, requested, mb(len as f64, secs))
    };
    let (mut map, mut len, mut requested, mut first_touch) = touch();
    for _ in 1..rounds {
        drop(map); // its pages go back to the allocator before the next mapping takes some
        let rate;
        (map, len, requested, rate) = touch();
        first_touch = first_touch.max(rate);
    }
    let p = map.words();
    let nodes = page_nodes(p.cast(), len);

    let (mut wbytes, mut rbytes) = (0usize, 0usize);
    let (mut wsum, mut rsum, mut wbest, mut rbest) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut partial = false;
    for r in 0..rounds {
        let (wb, w) = pass(p, len, Some(r as u8), access, max_secs);
        let (rb, rd) = pass(p, len, None, access, max_secs);
        partial |= wb < len || rb < len;
        wbytes += wb;
        rbytes += rb;
        wsum += w;
        rsum += rd;
        wbest = wbest.max(mb(wb as f64, w));
        rbest = rbest.max(mb(rb as f64, rd));
    }
    let access = match access {
        Access::Vec => "vec",
        Access::U64 => "u64",
    };
    println!(
        "memio-bw target={target} bytes={len} requested={requested} rounds={rounds} access={access} \
         first_touch_mb_s={first_touch:.3} write_mb_s={:.3} read_mb_s={:.3} \
         write_best_mb_s={wbest:.3} read_best_mb_s={rbest:.3} partial={} nodes={nodes}",
        mb(wbytes as f64, wsum),
        mb(rbytes as f64, rsum),
        u8::from(partial),
    );
    ExitCode::SUCCESS
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: memio fill PATH LEN SEED | memio check PATH LEN SEED | \
         memio bw PATH|anon|anon:NODE LEN [ROUNDS] [--u64] [--max-secs=S]\n\
         LEN: bytes with optional K/M/G suffix, or 'all' (whole file or device)"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // bw options, anywhere after the subcommand.
    let mut access = Access::Vec;
    let mut max_secs = f64::INFINITY;
    args.retain(|a| {
        if a == "--u64" {
            access = Access::U64;
        } else if let Some(v) = a.strip_prefix("--max-secs=") {
            max_secs = v
                .parse()
                .ok()
                .filter(|s: &f64| *s > 0.0)
                .unwrap_or_else(|| fail(format!("bad --max-secs '{v}'")));
        } else {
            return true;
        }
        false
    });
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["fill", path, len, seed] => fill(path, len, parse_u64("seed", seed)),
        ["check", path, len, seed] => check(path, len, parse_u64("seed", seed)),
        ["bw", target, len] => bw(target, len, 3, access, max_secs),
        ["bw", target, len, rounds] => bw(
            target,
            len,
            u32::try_from(parse_u64("rounds", rounds)).unwrap_or_else(|_| fail("bad rounds")),
            access,
            max_secs,
        ),
        _ => usage(),
    }
}
