//! Interleaved CXL regions at native speed.
//!
//! A region interleaved over N Type 3 devices (`cxl create-region -w N -g G`) has its host
//! physical range cut into granules of G bytes that go round the devices: the CFMWS window
//! picks a host bridge, the host bridge's HDM decoder picks a root port from its target list,
//! and the endpoint's HDM decoder drops the interleave selector bits to find the DPA (CXL 2.0
//! 8.2.5.12, 9.14.1.3). Nothing routes by itself here: once every decoder on the way is
//! committed, [`InterleaveMap`] walks the region granule by granule through exactly those
//! committed decoders and builds one host mapping for the whole region — a reserved virtual
//! range into which each run of granules is mapped `MAP_SHARED | MAP_FIXED` from its device's
//! backing file at the DPA the decoders give — then hands that range to KVM as one memory slot
//! and to device DMA as one region. Guest loads and stores then never exit.
//!
//! Each granule run is one kernel mapping (VMA): a 1 GiB region at 4 KiB granularity needs
//! 262144 of them, above Linux's default `vm.max_map_count` (65530); the nested host raises the
//! limit, and elsewhere the commit is refused with a message naming the sysctl.
//!
//! **Below a page** (256 B – 2 KiB granularity) a mapping cannot place granules, so such a
//! region runs from a *shadow*: an anonymous copy of the region, filled from the devices' media
//! at commit (every granule from the DPA the decoders give; granules of zeros are left to the
//! anonymous memory's own zeros, so the shadow costs host memory only for what the devices
//! hold), given to KVM with dirty-page logging and to DMA like a native region, so the guest
//! still runs at native speed. The copy is written back granule by granule to the devices: the
//! pages the vCPUs dirtied every [`SHADOW_WRITEBACK_PERIOD`], everything that differs at
//! uncommit and when the run ends. The backing files therefore trail the guest by up to that
//! period (a VMM killed with SIGKILL loses those writes; device DMA into the region reaches the
//! files at uncommit or exit).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::Duration;

use devices::bus::lock;
use devices::cxl::{CommittedRange, HpaWindow};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestRegionMmap, MmapRegion};

use crate::cxl::{Backing, DmaMemory, SlotAllocator};

/// The smallest interleave granularity mapped natively: one page. Finer regions run from a
/// shadow copy (see the module docs).
pub const MIN_NATIVE_GRANULARITY: u64 = 4096;

/// How often the pages the vCPUs dirtied in a shadowed region are written back to the devices.
pub const SHADOW_WRITEBACK_PERIOD: Duration = Duration::from_secs(1);

/// KVM's dirty-log page size.
const PAGE: u64 = 4096;

/// A CFMWS window as routing sees it: which host bridges its interleave positions name.
#[derive(Clone, Debug)]
pub struct WindowRoute {
    /// The window.
    pub window: HpaWindow,
    /// Host bridge interleave granularity (CFMWS HBIG) in bytes.
    pub granularity: u64,
    /// Host bridge index per interleave position (one entry: no host bridge interleave).
    pub host_bridges: Vec<usize>,
}

impl WindowRoute {
    /// The host bridge `hpa` (inside the window) goes to.
    fn host_bridge(&self, hpa: u64) -> Option<usize> {
        let ways = self.host_bridges.len() as u64;
        if ways == 0 || !self.window.contains(hpa, 1) {
            return None;
        }
        let position = ((hpa - self.window.base) / self.granularity) % ways;
        Some(self.host_bridges[position as usize])
    }
}

/// One Type 3 device as routing sees it.
pub struct RoutedDevice {
    /// Port Number of the root port it sits behind.
    pub port_number: u8,
    /// Host bridge index of that root port.
    pub host_bridge: usize,
    /// Its media.
    pub backing: Arc<Backing>,
    /// Its id, for messages.
    pub id: String,
}

/// One piece of a region mapping: `len` bytes at `offset` into the region come from `device`'s
/// media at `dpa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Offset into the region.
    pub offset: u64,
    /// Length (a multiple of the granularity).
    pub len: u64,
    /// Index into the device list.
    pub device: usize,
    /// Device physical address of the first byte.
    pub dpa: u64,
}

/// A mapped interleaved region.
struct RegionMapping {
    hpa_base: u64,
    size: u64,
    host: *mut u8,
    slot: u32,
    /// Sub-page granularity: `host` is a shadow copy and these pieces (sorted by offset) say
    /// where each granule lives on the devices.
    shadow: Option<Vec<Piece>>,
}

// SAFETY: `host` is a mapping owned by the region for its whole life; it is only passed to KVM
// and munmap, never dereferenced here.
unsafe impl Send for RegionMapping {}

/// The decoders committed so far and the regions mapped from them.
#[derive(Default)]
struct State {
    /// Committed endpoint decoders with more than one way, by device index.
    endpoints: Vec<(usize, CommittedRange)>,
    /// Committed host bridge decoders, by host bridge index.
    bridges: Vec<(usize, CommittedRange)>,
    regions: Vec<RegionMapping>,
}

/// Maps interleaved regions once their decoders are committed (see the module docs).
pub struct InterleaveMap {
    /// This map, for the shadow write-back thread.
    me: Weak<InterleaveMap>,
    writeback: Once,
    vm: Arc<VmFd>,
    slots: Arc<Mutex<SlotAllocator>>,
    dma: DmaMemory,
    windows: Vec<WindowRoute>,
    devices: Vec<RoutedDevice>,
    /// (host bridge, port number) of each device, for [`resolve`].
    routes: Vec<(usize, u8)>,
    state: Mutex<State>,
}

impl InterleaveMap {
    pub fn new(
        vm: Arc<VmFd>,
        slots: Arc<Mutex<SlotAllocator>>,
        dma: DmaMemory,
        windows: Vec<WindowRoute>,
        devices: Vec<RoutedDevice>,
    ) -> Arc<Self> {
        let routes = devices
            .iter()
            .map(|d| (d.host_bridge, d.port_number))
            .collect();
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            writeback: Once::new(),
            vm,
            slots,
            dma,
            windows,
            devices,
            routes,
            state: Mutex::new(State::default()),
        })
    }

    /// An endpoint decoder of `device` with 2 or more ways committed: records it and maps
    /// every region now fully decoded.
    pub fn endpoint_committed(&self, device: usize, range: &CommittedRange) -> Result<(), String> {
        let mut state = lock(&self.state);
        state.endpoints.push((device, *range));
        self.map_complete_regions(&mut state)
    }

    /// A host bridge decoder committed: record it and map what is now fully decoded. Never
    /// refuses (a bridge decoder commits whatever the endpoints below do).
    pub fn bridge_committed(&self, host_bridge: usize, range: &CommittedRange) {
        let mut state = lock(&self.state);
        state.bridges.push((host_bridge, *range));
        if let Err(e) = self.map_complete_regions(&mut state) {
            log::error!("cxl: mapping an interleaved region: {e}");
        }
    }

    /// An endpoint decoder uncommitted: regions over its range are unmapped.
    pub fn endpoint_uncommitted(&self, device: usize, range: &CommittedRange) {
        let mut state = lock(&self.state);
        state
            .endpoints
            .retain(|(d, r)| !(*d == device && r == range));
        self.unmap_overlapping(&mut state, range);
    }

    /// A host bridge decoder uncommitted: regions over its range are unmapped.
    pub fn bridge_uncommitted(&self, host_bridge: usize, range: &CommittedRange) {
        let mut state = lock(&self.state);
        state
            .bridges
            .retain(|(h, r)| !(*h == host_bridge && r == range));
        self.unmap_overlapping(&mut state, range);
    }

    fn unmap_overlapping(&self, state: &mut State, range: &CommittedRange) {
        let end = range.hpa_base + range.size;
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut state.regions)
            .into_iter()
            .partition(|m| m.hpa_base < end && range.hpa_base < m.hpa_base + m.size);
        state.regions = kept;
        for m in gone {
            self.unmap(m);
        }
    }

    /// Maps every recorded endpoint range whose granules all resolve and that no mapping
    /// covers yet.
    fn map_complete_regions(&self, state: &mut State) -> Result<(), String> {
        let candidates: Vec<CommittedRange> = state.endpoints.iter().map(|(_, r)| *r).collect();
        for range in candidates {
            let (base, size) = (range.hpa_base, range.size);
            if state
                .regions
                .iter()
                .any(|m| m.hpa_base < base + size && base < m.hpa_base + m.size)
            {
                continue;
            }
            let Some(pieces) = resolve(&self.windows, &self.routes, state, &range) else {
                continue; // some decoder on the way is not committed yet
            };
            let mapping = self.map(&range, pieces)?;
            state.regions.push(mapping);
        }
        Ok(())
    }

    /// Builds the host mapping of a region from its pieces and gives it to KVM and DMA.
    fn map(&self, range: &CommittedRange, pieces: Vec<Piece>) -> Result<RegionMapping, String> {
        let (hpa_base, size) = (range.hpa_base, range.size);
        let granularity = u64::from(range.interleave.granularity);
        let shadowed = granularity < MIN_NATIVE_GRANULARITY;
        if !shadowed {
            check_map_count(pieces.len())?;
        }
        let len = usize::try_from(size).map_err(|e| e.to_string())?;
        for p in &pieces {
            let device = &self.devices[p.device];
            if device.backing.host_address(p.dpa, p.len).is_none() {
                return Err(format!(
                    "{}: DPA {:#x}+{:#x} is outside the device",
                    device.id, p.dpa, p.len
                ));
            }
        }
        // A native region starts as a reservation (no access) that the pieces replace; a
        // shadow is plain anonymous memory.
        let prot = if shadowed {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_NONE
        };
        // SAFETY: a fresh anonymous mapping of `len` bytes anywhere; checked below.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(format!(
                "reserving {size:#x} bytes for the region at {hpa_base:#x}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let host = host.cast::<u8>();
        let release = |why: String| {
            // SAFETY: unmapping the mapping made above, which nothing else uses yet.
            unsafe { libc::munmap(host.cast(), len) };
            why
        };
        if shadowed {
            for p in &pieces {
                self.copy_piece(host, p, 0, p.len, Direction::FromDevice);
            }
        } else {
            for p in &pieces {
                let (file, dpa0) = self.devices[p.device].backing.file();
                // SAFETY: replaces pages inside our own reservation (offset + len ≤ size, as
                // the pieces tile the region) with a shared mapping of a file we hold open.
                let got = unsafe {
                    libc::mmap(
                        host.add(p.offset as usize).cast(),
                        p.len as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED | libc::MAP_FIXED,
                        file.as_raw_fd(),
                        (dpa0 + p.dpa) as libc::off_t,
                    )
                };
                if got == libc::MAP_FAILED {
                    let e = std::io::Error::last_os_error();
                    return Err(release(format!(
                        "mapping {} DPA {:#x}+{:#x} into the region at {hpa_base:#x}: {e}",
                        self.devices[p.device].id, p.dpa, p.len
                    )));
                }
            }
        }
        let slot = lock(&self.slots)
            .pop()
            .ok_or_else(|| release("no free KVM memory slot for a CXL region".into()))?;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: if shadowed {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: hpa_base,
            memory_size: size,
            userspace_addr: host as u64,
        };
        // SAFETY: the region's memory is the mapping built above, which lives until `unmap`
        // deletes the slot first.
        if let Err(e) = unsafe { self.vm.set_user_memory_region(region) } {
            lock(&self.slots).push(slot);
            return Err(release(format!(
                "KVM memory slot for the region at {hpa_base:#x}: {e}"
            )));
        }
        let pieces_count = pieces.len();
        let mut devices: Vec<usize> = pieces.iter().map(|p| p.device).collect();
        devices.sort_unstable();
        devices.dedup();
        let mapping = RegionMapping {
            hpa_base,
            size,
            host,
            slot,
            shadow: shadowed.then_some(pieces),
        };
        if let Err(e) = self.add_dma(&mapping) {
            self.unmap(mapping);
            return Err(format!(
                "adding the region at {hpa_base:#x} to the DMA memory map: {e}"
            ));
        }
        if shadowed {
            log::info!(
                "cxl: interleaved region HPA {hpa_base:#x}+{size:#x} at {granularity}-byte \
                 granularity over {} devices runs from a shadow copy ({pieces_count} granule \
                 runs; a page cannot place sub-page granules): dirty pages are written back to \
                 the devices every {} ms, everything at uncommit and at exit",
                devices.len(),
                SHADOW_WRITEBACK_PERIOD.as_millis()
            );
            self.start_writeback();
        } else {
            log::info!(
                "cxl: interleaved region HPA {hpa_base:#x}+{size:#x} mapped in {pieces_count} \
                 pieces over {} devices",
                devices.len()
            );
        }
        Ok(mapping)
    }

    /// Copies `[from, from + len)` of piece `p` (offsets relative to the piece) between the
    /// shadow at `host` and the piece's device media.
    fn copy_piece(&self, host: *mut u8, p: &Piece, from: u64, len: u64, direction: Direction) {
        let device = &self.devices[p.device];
        debug_assert!(from + len <= p.len);
        let Some(media) = device.backing.host_address(p.dpa + from, len) else {
            return; // checked for the whole piece when the region was mapped
        };
        let media = media as *mut u8;
        // SAFETY: `host + offset + from .. + len` lies inside the shadow (the pieces tile the
        // region) and `media .. + len` inside the device's mapping (checked just above); the two
        // mappings are distinct, so the ranges do not overlap. Concurrent guest stores make the
        // copied bytes stale, never invalid; the dirty log catches them next time.
        unsafe {
            let shadow = host.add((p.offset + from) as usize);
            let len = len as usize;
            match direction {
                // A granule of zeros stays out of the shadow (its pages read as zeros already):
                // the shadow holds only what the devices hold, not their whole capacity.
                Direction::FromDevice if !same_bytes(media, None, len) => {
                    std::ptr::copy_nonoverlapping(media, shadow, len)
                }
                // Only what differs is written: unchanged device memory (a sparse backing
                // file's holes above all) is left untouched.
                Direction::ToDevice if !same_bytes(shadow, Some(media), len) => {
                    std::ptr::copy_nonoverlapping(shadow, media, len)
                }
                _ => {}
            }
        }
    }

    /// Writes a shadowed region back to its devices: every granule (`all`), or those in pages
    /// KVM logged as dirty since the last call.
    fn write_back(&self, m: &RegionMapping, all: bool) {
        let Some(pieces) = &m.shadow else {
            return;
        };
        if all {
            for p in pieces {
                self.copy_piece(m.host, p, 0, p.len, Direction::ToDevice);
            }
            return;
        }
        let bitmap = match self.vm.get_dirty_log(m.slot, m.size as usize) {
            Ok(bitmap) => bitmap,
            Err(e) => {
                log::error!(
                    "cxl: dirty log of the shadowed region at {:#x}: {e}; writing all of it back",
                    m.hpa_base
                );
                return self.write_back(m, true);
            }
        };
        for (word_index, &word) in bitmap.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let start = (word_index as u64 * 64 + bit) * PAGE;
                write_back_range(pieces, start, (start + PAGE).min(m.size), |p, from, len| {
                    self.copy_piece(m.host, p, from, len, Direction::ToDevice);
                });
            }
        }
    }

    /// Writes back what the vCPUs dirtied in every shadowed region.
    fn write_back_dirty(&self) {
        let state = lock(&self.state);
        for m in &state.regions {
            self.write_back(m, false);
        }
    }

    /// Writes every shadowed region back to its devices in full (the end of a run).
    pub fn write_back_all(&self) {
        let state = lock(&self.state);
        for m in &state.regions {
            self.write_back(m, true);
        }
    }

    /// Starts the thread that writes dirty shadow pages back every
    /// [`SHADOW_WRITEBACK_PERIOD`] (once; it ends with the map).
    fn start_writeback(&self) {
        self.writeback.call_once(|| {
            let me = self.me.clone();
            let spawned = std::thread::Builder::new()
                .name("cxl-writeback".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(SHADOW_WRITEBACK_PERIOD);
                        let Some(map) = me.upgrade() else { break };
                        map.write_back_dirty();
                    }
                });
            if let Err(e) = spawned {
                log::error!(
                    "cxl: cannot start the shadow write-back thread ({e}); shadowed regions \
                     reach the backing files only at uncommit and exit"
                );
            }
        });
    }

    fn add_dma(&self, m: &RegionMapping) -> Result<(), String> {
        // SAFETY: the mapping stays valid while the region is in the DMA map (`unmap` removes
        // it before unmapping); `build_raw` regions do not unmap on drop.
        let region = unsafe {
            MmapRegion::build_raw(
                m.host,
                m.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .map_err(|e| e.to_string())?;
        let region = GuestRegionMmap::new(region, GuestAddress(m.hpa_base))
            .ok_or("the region overflows the guest address space")?;
        let guard = self.dma.lock().map_err(|e| e.to_string())?;
        let updated = vm_memory::GuestAddressSpace::memory(&self.dma)
            .insert_region(Arc::new(region))
            .map_err(|e| e.to_string())?;
        guard.replace(updated);
        Ok(())
    }

    fn unmap(&self, m: RegionMapping) {
        if let Err(e) = crate::cxl::remove_dma_region(&self.dma, m.hpa_base, m.size) {
            log::debug!(
                "cxl: region at {:#x} was not in the DMA map: {e}",
                m.hpa_base
            );
        }
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: m.slot,
            flags: 0,
            guest_phys_addr: m.hpa_base,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: size 0 deletes the slot; KVM stops using the mapping before it is unmapped.
        if let Err(e) = unsafe { self.vm.set_user_memory_region(region) } {
            log::error!(
                "cxl: deleting the slot of the region at {:#x}: {e}",
                m.hpa_base
            );
        }
        lock(&self.slots).push(m.slot);
        // The guest can no longer reach the shadow: its last state goes to the devices.
        self.write_back(&m, true);
        // SAFETY: unmapping exactly the region's reservation, no longer used by KVM or DMA.
        unsafe { libc::munmap(m.host.cast(), m.size as usize) };
        log::info!(
            "cxl: interleaved region HPA {:#x}+{:#x} unmapped",
            m.hpa_base,
            m.size
        );
    }
}

/// Routes every granule of `range` through the committed decoders: window → host bridge
/// decoder → root port → that device's endpoint decoder → DPA. `devices` gives each device's
/// (host bridge, root port number). `None` if any granule has no committed decoder on its way.
/// Consecutive granules that continue one device's DPA run are merged into one piece.
fn resolve(
    windows: &[WindowRoute],
    devices: &[(usize, u8)],
    state: &State,
    range: &CommittedRange,
) -> Option<Vec<Piece>> {
    let g = u64::from(range.interleave.granularity);
    let mut pieces: Vec<Piece> = Vec::new();
    let mut offset = 0;
    while offset < range.size {
        let hpa = range.hpa_base + offset;
        let window = windows.iter().find(|w| w.window.contains(hpa, g))?;
        let hb = window.host_bridge(hpa)?;
        let port = state
            .bridges
            .iter()
            .find(|(h, r)| *h == hb && r.contains(hpa))
            .and_then(|(_, r)| r.route(hpa))?;
        let device = devices.iter().position(|&d| d == (hb, port))?;
        let dpa = state
            .endpoints
            .iter()
            .find(|(d, r)| *d == device && r.contains(hpa))
            .and_then(|(_, r)| r.dpa(hpa))?;
        match pieces.last_mut() {
            Some(p) if p.device == device && p.dpa + p.len == dpa => p.len += g,
            _ => pieces.push(Piece {
                offset,
                len: g,
                device,
                dpa,
            }),
        }
        offset += g;
    }
    Some(pieces)
}

/// A page of zeros to compare granules with.
static ZEROS: [u8; 4096] = [0; 4096];

/// Whether the `len` bytes at `a` equal those at `b` (`None`: zeros). Compared with C's
/// `memcmp`, which stays fast in debug builds (a word loop over a whole region under the nested
/// TCG host took minutes) and reads the guest's memory without making Rust references to it:
/// the guest may be storing to it meanwhile.
///
/// # Safety
/// Both ranges are readable for `len` bytes. The guest may be writing them (the periodic
/// write-back runs beside the vCPUs): a comparison torn by a store only makes a granule copied
/// or skipped one round early, and that page is dirty again for the next round; the gather at
/// commit and the final write-backs run while no vCPU can reach the region.
unsafe fn same_bytes(a: *const u8, b: Option<*const u8>, len: usize) -> bool {
    let mut done = 0;
    while done < len {
        let n = match b {
            Some(_) => len - done,
            None => ZEROS.len().min(len - done),
        };
        let other = b.map_or(ZEROS.as_ptr(), |b| b.wrapping_add(done));
        // SAFETY: `a + done` and `other` are readable for `n` bytes: both lie inside the
        // caller's ranges (the function's contract), or `other` is ZEROS and `n` ≤ its length.
        let differ = unsafe { libc::memcmp(a.add(done).cast(), other.cast(), n) } != 0;
        if differ {
            return false;
        }
        done += n;
    }
    true
}

/// Which way [`InterleaveMap::copy_piece`] copies.
#[derive(Clone, Copy)]
enum Direction {
    FromDevice,
    ToDevice,
}

/// Calls `copy(piece, from, len)` for each part of `pieces` (sorted by offset, tiling the
/// region) inside the region offsets `[start, end)`; `from` is relative to the piece.
fn write_back_range(
    pieces: &[Piece],
    start: u64,
    end: u64,
    mut copy: impl FnMut(&Piece, u64, u64),
) {
    let first = pieces.partition_point(|p| p.offset + p.len <= start);
    for p in pieces[first..].iter().take_while(|p| p.offset < end) {
        let from = start.max(p.offset);
        let to = end.min(p.offset + p.len);
        copy(p, from - p.offset, to - from);
    }
}

/// Refuses a mapping that would need more memory mappings than `vm.max_map_count` leaves.
fn check_map_count(pieces: usize) -> Result<(), String> {
    let limit = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok());
    let in_use = std::fs::read_to_string("/proc/self/maps")
        .map(|s| s.lines().count())
        .unwrap_or(0);
    match limit {
        Some(limit) if in_use + pieces + 64 > limit => Err(format!(
            "the interleaved region needs {pieces} memory mappings and {in_use} are in use, \
             beyond vm.max_map_count ({limit}); raise it (sysctl vm.max_map_count={}) or use \
             a coarser granularity",
            (in_use + pieces + 65536).next_power_of_two()
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::cxl::{DecodeTarget, Interleave, Partition};

    const WIN: u64 = 0x40_0000_0000;
    const M256: u64 = 256 << 20;

    fn endpoint(base: u64, size: u64, ways: u8, g: u32, dpa_base: u64) -> CommittedRange {
        CommittedRange {
            decoder_index: 0,
            hpa_base: base,
            size,
            interleave: Interleave {
                ways,
                granularity: g,
            },
            target: DecodeTarget::Memory {
                dpa_base,
                partition: Partition::Volatile,
                partition_offset: dpa_base,
            },
        }
    }

    fn bridge(base: u64, size: u64, g: u32, ports: &[u8]) -> CommittedRange {
        let mut t = [0u8; 8];
        t[..ports.len()].copy_from_slice(ports);
        CommittedRange {
            decoder_index: 0,
            hpa_base: base,
            size,
            interleave: Interleave {
                ways: ports.len() as u8,
                granularity: g,
            },
            target: DecodeTarget::Ports(t),
        }
    }

    fn route(
        windows: Vec<WindowRoute>,
        devices: &[(usize, u8)],
        state: &State,
        range: &CommittedRange,
    ) -> Option<Vec<Piece>> {
        resolve(&windows, devices, state, range)
    }

    #[test]
    fn two_way_4k_region_alternates_devices_granule_by_granule() {
        let window = WindowRoute {
            window: HpaWindow::new(WIN, 4 << 30),
            granularity: 256,
            host_bridges: vec![0],
        };
        let state = State {
            endpoints: vec![
                (0, endpoint(WIN, 2 * M256, 2, 4096, 0)),
                (1, endpoint(WIN, 2 * M256, 2, 4096, 0)),
            ],
            bridges: vec![(0, bridge(WIN, 2 * M256, 4096, &[2, 3]))],
            regions: Vec::new(),
        };
        let pieces = route(
            vec![window.clone()],
            &[(0, 2), (0, 3)],
            &state,
            &state.endpoints[0].1,
        )
        .expect("every granule routes");
        assert_eq!(pieces.len(), (2 * M256 / 4096) as usize);
        assert_eq!(
            pieces[0],
            Piece {
                offset: 0,
                len: 4096,
                device: 0,
                dpa: 0
            }
        );
        assert_eq!(
            pieces[1],
            Piece {
                offset: 4096,
                len: 4096,
                device: 1,
                dpa: 0
            }
        );
        assert_eq!(
            pieces[2],
            Piece {
                offset: 8192,
                len: 4096,
                device: 0,
                dpa: 4096
            }
        );
        let last = pieces.last().unwrap();
        assert_eq!((last.device, last.dpa), (1, M256 - 4096));
        // Without the host bridge decoder nothing routes yet.
        let partial = State {
            bridges: Vec::new(),
            ..state
        };
        assert!(
            route(
                vec![window],
                &[(0, 2), (0, 3)],
                &partial,
                &partial.endpoints[0].1
            )
            .is_none()
        );
    }

    #[test]
    fn four_way_over_two_host_bridges_follows_the_window_then_the_bridges() {
        // CFMWS: 2 host bridges at 4 KiB; each bridge 2 ways at 8 KiB over its 2 root ports;
        // endpoints 4-way 4 KiB. Region position p = hb + 2 * port index.
        let window = WindowRoute {
            window: HpaWindow::new(WIN, 4 << 30),
            granularity: 4096,
            host_bridges: vec![0, 1],
        };
        let size = 4 * M256;
        let devices = [(0, 2), (0, 3), (1, 2), (1, 3)];
        let state = State {
            endpoints: (0..4)
                .map(|d| (d, endpoint(WIN, size, 4, 4096, 0)))
                .collect(),
            bridges: vec![
                (0, bridge(WIN, size, 8192, &[2, 3])),
                (1, bridge(WIN, size, 8192, &[2, 3])),
            ],
            regions: Vec::new(),
        };
        let pieces = route(vec![window], &devices, &state, &state.endpoints[0].1).unwrap();
        let order: Vec<(usize, u64)> = pieces.iter().take(5).map(|p| (p.device, p.dpa)).collect();
        assert_eq!(order, [(0, 0), (2, 0), (1, 0), (3, 0), (0, 4096)]);
    }

    #[test]
    fn one_way_neighbours_merge_into_one_piece() {
        let window = WindowRoute {
            window: HpaWindow::new(WIN, 4 << 30),
            granularity: 256,
            host_bridges: vec![0],
        };
        // A "2-way" endpoint decoder whose bridge sends everything to one port (both target
        // positions name the same device would be refused; here the bridge is 1-way): only the
        // granules of device 0 exist, and its DPA skips every other granule.
        let state = State {
            endpoints: vec![(0, endpoint(WIN, 2 * M256, 1, 4096, 0))],
            bridges: vec![(0, bridge(WIN, 2 * M256, 4096, &[2]))],
            regions: Vec::new(),
        };
        let pieces = route(vec![window], &[(0, 2)], &state, &state.endpoints[0].1).unwrap();
        assert_eq!(
            pieces,
            [Piece {
                offset: 0,
                len: 2 * M256,
                device: 0,
                dpa: 0
            }]
        );
    }

    #[test]
    fn a_dirty_page_of_a_256_byte_region_writes_back_its_sixteen_granules() {
        // 2-way at 256 B: a 4 KiB page holds 16 granules, 8 of each device.
        let window = WindowRoute {
            window: HpaWindow::new(WIN, 4 << 30),
            granularity: 256,
            host_bridges: vec![0],
        };
        let state = State {
            endpoints: vec![
                (0, endpoint(WIN, 2 * M256, 2, 256, 0)),
                (1, endpoint(WIN, 2 * M256, 2, 256, 0)),
            ],
            bridges: vec![(0, bridge(WIN, 2 * M256, 256, &[2, 3]))],
            regions: Vec::new(),
        };
        let pieces = route(
            vec![window],
            &[(0, 2), (0, 3)],
            &state,
            &state.endpoints[0].1,
        )
        .unwrap();
        assert_eq!(pieces.len(), (2 * M256 / 256) as usize);
        // The second page (region offsets 4096..8192): granules 16..32.
        let mut copied = Vec::new();
        write_back_range(&pieces, 4096, 8192, |p, from, len| {
            copied.push((p.offset, p.device, p.dpa + from, len));
        });
        assert_eq!(copied.len(), 16);
        assert_eq!(copied[0], (4096, 0, 2048, 256));
        assert_eq!(copied[1], (4096 + 256, 1, 2048, 256));
        assert_eq!(copied[15], (8192 - 256, 1, 2048 + 7 * 256, 256));
        // A range cutting a merged piece copies only its part of it.
        let merged = [Piece {
            offset: 0,
            len: 3 * PAGE,
            device: 0,
            dpa: 0x10_0000,
        }];
        let mut parts = Vec::new();
        write_back_range(&merged, PAGE, 2 * PAGE, |p, from, len| {
            parts.push((p.dpa + from, len));
        });
        assert_eq!(parts, [(0x10_0000 + PAGE, PAGE)]);
    }

    #[test]
    fn granule_comparison_sees_zeros_and_differences() {
        let zeros = [0u64; 32];
        let mut other = [0u64; 32];
        let (z, o) = (zeros.as_ptr().cast::<u8>(), other.as_ptr().cast::<u8>());
        // SAFETY: both arrays are 256 readable, 8-byte aligned bytes.
        unsafe {
            assert!(same_bytes(z, None, 256));
            assert!(same_bytes(z, Some(o), 256));
        }
        other[31] = 1;
        let o = other.as_ptr().cast::<u8>();
        // SAFETY: as above.
        unsafe {
            assert!(!same_bytes(o, None, 256));
            assert!(!same_bytes(z, Some(o), 256));
            // Only the first 248 bytes: equal again.
            assert!(same_bytes(z, Some(o), 248));
        }
        // Longer than the page of zeros it compares with: a difference in the third page.
        let mut long = vec![0u8; 10_000];
        // SAFETY: `long` is 10 000 readable bytes.
        unsafe { assert!(same_bytes(long.as_ptr(), None, long.len())) };
        long[9_000] = 1;
        // SAFETY: as above.
        unsafe {
            assert!(!same_bytes(long.as_ptr(), None, long.len()));
            assert!(same_bytes(long.as_ptr(), None, 9_000));
        }
    }
}
