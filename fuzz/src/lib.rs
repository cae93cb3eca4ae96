//! Fuzz harnesses for the guest-facing interfaces.
//!
//! Each module turns a fuzz input into a setup plus a sequence of guest operations, runs them
//! against the real device code and checks invariants after every operation (an invariant
//! violation panics, which libFuzzer reports as a crash):
//! - [`pci`]: `devices::pci::PciRootComplex` built like the VMM builds it (ECAM, BAR MMIO,
//!   configuration mechanism #1, MSI-X, bridge programming, BAR moves);
//! - [`pio`]: the legacy port-I/O devices behind a `devices::bus::Bus`, dispatched like the
//!   VMM's vCPU loop (bus first, then the PCI config ports);
//! - [`dma`]: `iommu::DmaSpace` over a small guest memory with holes;
//! - [`vtd`]: the VT-d remapping unit's register file, with the unit's own events between
//!   guest accesses;
//! - [`ioat`]: the emulated I/OAT DMA engine's registers and descriptor chains;
//! - [`sva_engine`]: the SVA DMA engine's registers, rings, descriptors and the IOMMU's page
//!   group responses and device-TLB invalidations;
//! - [`pvrdma`]: the PVRDMA function's command channel (every command, any field values),
//!   registers, UAR doorbells and port changes;
//! - [`vmxnet3`]: the vmxnet3 NIC's registers, commands, Tx rings and descriptors, and frames
//!   arriving from the wire.
//!
//! The same `run` functions serve the libFuzzer targets (`fuzz_targets/`), the stable replay test
//! (`tests/replay.rs`, over `corpus/`), and the replay binaries (`cargo run --bin TARGET -- FILE`).
//! Every module also has `decode` (to print an input as operations) and `encode` (to write
//! hand-made seeds).

pub mod cxl;
pub mod dma;
pub mod ioat;
pub mod pci;
pub mod pio;
pub mod pvrdma;
pub mod seeds;
pub mod sva_engine;
pub mod vmxnet3;
pub mod vtd;

/// Most operations decoded from one input; longer inputs are truncated (keeps runs short).
pub const MAX_OPS: usize = 2048;

/// Access widths chosen by a width byte: mostly what a CPU can issue, some malformed ones.
const WIDTHS: [usize; 16] = [1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 4, 0, 3, 6, 16];

/// Longest access any harness issues (bytes).
pub const MAX_WIDTH: usize = 16;

/// Maps a width byte to an access width (see [`WIDTHS`]).
pub fn width(b: u8) -> usize {
    WIDTHS[usize::from(b & 0xf)]
}

/// The width byte that encodes `len` (first match in [`WIDTHS`]), for hand-made seeds.
pub fn width_byte(len: usize) -> u8 {
    WIDTHS.iter().position(|&w| w == len).unwrap_or(0) as u8
}

/// Little-endian cursor over the fuzz input. Every getter returns `None` once the input is
/// exhausted, which ends decoding (a partial trailing operation is dropped).
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    pub fn u8(&mut self) -> Option<u8> {
        Some(self.bytes(1)?[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.bytes(2)?.try_into().ok()?))
    }

    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }
}

/// Builds inputs for hand-made seeds (the inverse of [`Reader`]).
#[derive(Debug, Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// `len` bytes of write data: `value` little-endian, repeated past 8 bytes.
pub fn data_bytes(value: u64, len: usize) -> Vec<u8> {
    let v = value.to_le_bytes();
    (0..len).map(|i| v[i % 8]).collect()
}

/// Guard bytes placed after every read buffer: a device must never write past what it was
/// given (it cannot in safe Rust; this documents and checks the contract).
const GUARD: u8 = 0xa5;
const GUARD_LEN: usize = 8;

/// Runs `read` on a buffer of `len` bytes (pre-filled with `fill`) and checks that nothing past
/// it changed. Returns what `read` returned and the bytes read.
pub fn guarded_read<T>(len: usize, fill: u8, read: impl FnOnce(&mut [u8]) -> T) -> (T, Vec<u8>) {
    let mut buf = vec![fill; len + GUARD_LEN];
    buf[len..].fill(GUARD);
    let r = read(&mut buf[..len]);
    assert!(
        buf[len..].iter().all(|&b| b == GUARD),
        "read of {len} bytes wrote past the buffer"
    );
    buf.truncate(len);
    (r, buf)
}

/// Replays every file named in `args` through `run`, printing each operation before it runs
/// if `FUZZ_VERBOSE` is set: the `main` of a target built without libFuzzer.
pub fn replay_main(name: &str, run: fn(&[u8], bool), args: impl Iterator<Item = String>) {
    let verbose = std::env::var_os("FUZZ_VERBOSE").is_some();
    let mut n = 0;
    for path in args {
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{name}: {path}: {e}");
                std::process::exit(2);
            }
        };
        if verbose {
            eprintln!("{name}: {path}:");
        }
        run(&data, verbose);
        n += 1;
    }
    eprintln!("{name}: {n} input(s) ran without a finding");
}

/// A xorshift64 generator for the stable smoke runs (`tests/*_smoke.rs`): the same inputs on
/// every run, no dependency. `seed` must not be 0.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
