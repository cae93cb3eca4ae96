//! VMM side of the CXL Type 3 memory device: `--cxl-type3` parsing, the backing file, and the
//! memory mapping an HDM decoder commit asks for (a KVM memory slot at the committed host
//! physical range, backed by the device's file at the decoder's DPA, so guest access runs at
//! native speed, code can execute from it and device DMA reaches it).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::bus::lock;

use crate::cxl_interleave::{InterleaveMap, RoutedDevice, WindowRoute};
use crate::file_lock::FileLock;
use devices::cxl::{CommittedRange, DecodeTarget, HdmListener, Partition};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
    GuestRegionMmap, MmapRegion,
};

/// HDM decoders per Type 3 device.
pub const ENDPOINT_HDM_DECODERS: usize = 4;

/// Size granule for CXL capacities and HDM ranges (CXL 2.0 8.2.5.12).
pub const CXL_GRANULE: u64 = 256 << 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CxlConfigError {
    #[error("invalid --cxl-type3 '{spec}': {reason}")]
    Spec { spec: String, reason: String },
    #[error(
        "CXL backing file '{path}' is {actual} bytes; the device needs exactly {expected} (volatile + persistent); refusing to resize it"
    )]
    BackingSize {
        path: String,
        actual: u64,
        expected: u64,
    },
    #[error("cannot open CXL backing file '{path}': {reason}")]
    Backing { path: String, reason: String },
}

/// CXL host bridges a machine can have (`host-bridge=0` or `1`).
pub const MAX_HOST_BRIDGES: usize = 2;

/// One `--cxl-type3 volatile=SIZE,persistent=SIZE,backing=PATH[,lsa=PATH][,id=NAME][,host-bridge=N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CxlType3Spec {
    pub volatile: u64,
    pub persistent: u64,
    pub backing: PathBuf,
    pub lsa: Option<PathBuf>,
    pub id: String,
    /// The CXL host bridge its root port sits on (0: `\_SB.PCI0`, 1: `\_SB.PCI1`).
    pub host_bridge: usize,
}

impl CxlType3Spec {
    /// Parses one `--cxl-type3` value; `index` names devices without `id=`.
    pub fn parse(spec: &str, index: usize) -> Result<Self, CxlConfigError> {
        let err = |reason: String| CxlConfigError::Spec {
            spec: spec.to_string(),
            reason,
        };
        let mut volatile = None;
        let mut persistent = None;
        let mut backing = None;
        let mut lsa = None;
        let mut id = None;
        let mut host_bridge = 0;
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err(format!("'{part}' is not key=value")))?;
            let size = |v: &str| {
                let bytes = crate::config::parse_size(v).map_err(|e| err(e.to_string()))?;
                if bytes % CXL_GRANULE != 0 {
                    return Err(err(format!("{key}={v} is not a multiple of 256M")));
                }
                Ok(bytes)
            };
            match key {
                "volatile" => volatile = Some(size(value)?),
                "persistent" => persistent = Some(size(value)?),
                "backing" => backing = Some(PathBuf::from(value)),
                "lsa" => lsa = Some(PathBuf::from(value)),
                "id" if !value.is_empty() => id = Some(value.to_string()),
                "host-bridge" => {
                    host_bridge = value
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| n < MAX_HOST_BRIDGES)
                        .ok_or_else(|| {
                            err(format!(
                                "host-bridge={value}: the machine has CXL host bridges 0 and 1"
                            ))
                        })?;
                }
                other => return Err(err(format!("unknown key '{other}'"))),
            }
        }
        let volatile = volatile.unwrap_or(0);
        let persistent = persistent.unwrap_or(0);
        if volatile == 0 && persistent == 0 {
            return Err(err("volatile and persistent capacity are both 0".into()));
        }
        let backing = backing.ok_or_else(|| err("backing=PATH is required".into()))?;
        Ok(Self {
            volatile,
            persistent,
            backing,
            lsa,
            id: id.unwrap_or_else(|| format!("cxl{index}")),
            host_bridge,
        })
    }

    pub fn total(&self) -> u64 {
        self.volatile + self.persistent
    }

    /// The label storage area file, if the device has one: `lsa=PATH`, else `<backing>.lsa`
    /// when the device has persistent capacity (volatile-only devices need no labels).
    pub fn lsa_path(&self) -> Option<PathBuf> {
        if let Some(path) = &self.lsa {
            return Some(path.clone());
        }
        (self.persistent > 0).then(|| {
            let mut p = self.backing.clone().into_os_string();
            p.push(".lsa");
            PathBuf::from(p)
        })
    }
}

/// Opens `path` for reading and writing, creating it (empty) if missing; says whether it existed.
fn open_or_create(path: &Path) -> std::io::Result<(File, bool)> {
    let existed = path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    Ok((file, existed))
}

/// Claims the files every device's media lives in for this run: each backing file and label
/// storage area is opened (created if missing: the backing file sparse at the device's size, the
/// LSA zero-filled at [`devices::cxl::lsa::DEFAULT_LSA_SIZE`]) and locked
/// ([`crate::file_lock`]) *before* anything is written to it, so a second run on the same file
/// fails at once, naming the file and its holder, without touching it. An existing backing
/// file of another size is refused untouched. The locks last as long as the returned values.
///
/// Backing files in `held_outside` are skipped: inside the nested host they arrive as NVDIMMs
/// and the outer run holds their locks.
pub fn claim_media(
    specs: &[CxlType3Spec],
    held_outside: &[PathBuf],
) -> Result<Vec<FileLock>, String> {
    let mut locks = Vec::new();
    for spec in specs {
        if held_outside.contains(&spec.backing) {
            if let Some(lsa) = spec.lsa_path() {
                locks.extend(claim_lsa(spec, &lsa)?);
            }
            continue;
        }
        let shown = spec.backing.display().to_string();
        let (file, existed) = open_or_create(&spec.backing).map_err(|e| {
            CxlConfigError::Backing {
                path: shown.clone(),
                reason: e.to_string(),
            }
            .to_string()
        })?;
        let lock = FileLock::exclusive(file, &spec.backing, "CXL backing file")
            .map_err(|e| e.to_string())?;
        let actual = lock.file().metadata().map_err(|e| e.to_string())?.len();
        if !existed && actual == 0 {
            lock.file()
                .set_len(spec.total())
                .map_err(|e| format!("sizing CXL backing file '{shown}': {e}"))?;
        } else if actual != spec.total() {
            return Err(CxlConfigError::BackingSize {
                path: shown,
                actual,
                expected: spec.total(),
            }
            .to_string());
        }
        locks.push(lock);
        if let Some(lsa) = spec.lsa_path() {
            locks.extend(claim_lsa(spec, &lsa)?);
        }
    }
    Ok(locks)
}

/// Claims one device's label storage area (see [`claim_media`]).
fn claim_lsa(spec: &CxlType3Spec, lsa: &Path) -> Result<Option<FileLock>, String> {
    use devices::cxl::lsa::DEFAULT_LSA_SIZE;
    let what = "CXL label storage area";
    let err = |e: &dyn std::fmt::Display| format!("{}: {what} '{}': {e}", spec.id, lsa.display());
    let (file, _) = open_or_create(lsa).map_err(|e| err(&e))?;
    let lock = FileLock::exclusive(file, lsa, what).map_err(|e| e.to_string())?;
    if lock.file().metadata().map_err(|e| err(&e))?.len() == 0 {
        lock.file()
            .set_len(DEFAULT_LSA_SIZE as u64)
            .and_then(|()| lock.file().sync_all())
            .map_err(|e| err(&e))?;
    }
    Ok(Some(lock))
}

/// The device's memory: the backing file mapped shared, volatile capacity first, then
/// persistent (DPA order). Guest writes land in the file; persistent capacity survives runs.
///
/// Inside the nested host the file is not mapped through 9p: the outer QEMU maps it as an
/// NVDIMM and this maps that physical range through `/dev/mem` ([`Backing::nested`]), so the
/// stores land in the outer machine's page cache directly (see `nested_memory`).
pub struct Backing {
    /// What is mapped: the backing file, or `/dev/mem` for a nested host's NVDIMM.
    file: File,
    /// Offset in `file` of DPA 0 (0 for the file itself, the NVDIMM's physical base otherwise).
    base: u64,
    host: *mut u8,
    len: u64,
    /// Whether `msync` means anything (a file mapping; not `/dev/mem`).
    file_backed: bool,
}

// SAFETY: the mapping is plain shared memory owned by this struct for its whole life; access
// goes through KVM (the guest) and bounds-checked copies.
unsafe impl Send for Backing {}
// SAFETY: as above; no interior state besides the mapping itself.
unsafe impl Sync for Backing {}

impl Backing {
    /// Opens (creating it, sparse, if missing) and maps the backing file. An existing file of a
    /// different size is refused: we never truncate or grow what the user has.
    pub fn open(path: &Path, len: u64) -> Result<Self, CxlConfigError> {
        let shown = path.display().to_string();
        let backing_err = |reason: String| CxlConfigError::Backing {
            path: shown.clone(),
            reason,
        };
        let (file, existed) = open_or_create(path).map_err(|e| backing_err(e.to_string()))?;
        let actual = file
            .metadata()
            .map_err(|e| backing_err(e.to_string()))?
            .len();
        if existed && actual != len {
            return Err(CxlConfigError::BackingSize {
                path: shown,
                actual,
                expected: len,
            });
        }
        if !existed {
            file.set_len(len).map_err(|e| backing_err(e.to_string()))?;
        }
        let host = map_shared(&file, 0, len).map_err(|e| backing_err(e.to_string()))?;
        Ok(Self {
            file,
            base: 0,
            host,
            len,
            file_backed: true,
        })
    }

    /// Maps the nested host's NVDIMM in `slot` — the outer machine's backing file `path`, which
    /// the outer QEMU maps `MAP_SHARED` — through `/dev/mem`. Its length must be `len`.
    pub fn nested(path: &Path, slot: u32, len: u64) -> Result<Self, CxlConfigError> {
        let backing_err = |reason: String| CxlConfigError::Backing {
            path: path.display().to_string(),
            reason,
        };
        let (base, size) = crate::nested_memory::nvdimm_range(slot).map_err(backing_err)?;
        if size != len {
            return Err(backing_err(format!(
                "the nested host's NVDIMM {slot} holding it is {size} bytes, the device needs {len}"
            )));
        }
        // Without O_SYNC /dev/mem maps a range that is not RAM write-back cacheable.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/mem")
            .map_err(|e| backing_err(format!("/dev/mem: {e}")))?;
        let host = map_shared(&file, base, len)
            .map_err(|e| backing_err(format!("mapping NVDIMM {slot} at {base:#x}: {e}")))?;
        log::info!(
            "{}: mapped from the nested host's NVDIMM {slot} at {base:#x}+{len:#x}",
            path.display()
        );
        Ok(Self {
            file,
            base,
            host,
            len,
            file_backed: false,
        })
    }

    /// The mapped file (the backing file or `/dev/mem`) and the offset of DPA 0 in it.
    pub fn file(&self) -> (&File, u64) {
        (&self.file, self.base)
    }

    /// Writes the guest's stores back to the backing file (`msync`); nothing to do for a nested
    /// host's NVDIMM, whose stores are already in the outer machine's page cache.
    pub fn flush(&self) -> std::io::Result<()> {
        if !self.file_backed {
            return Ok(());
        }
        // SAFETY: syncs exactly the live mapping this struct owns.
        if unsafe { libc::msync(self.host.cast(), self.len as usize, libc::MS_SYNC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Host address of DPA `dpa`, if `[dpa, dpa+size)` lies inside the device.
    pub fn host_address(&self, dpa: u64, size: u64) -> Option<u64> {
        let end = dpa.checked_add(size)?;
        (end <= self.len).then(|| self.host as u64 + dpa)
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        let _ = self.flush();
        // SAFETY: unmapping exactly the region mmap gave us; no slot uses it any more (the VM
        // is gone when the device is dropped).
        unsafe {
            libc::munmap(self.host.cast(), self.len as usize);
        }
    }
}

/// `mmap(MAP_SHARED)` of `len` bytes of `file` from `offset`, read-write.
fn map_shared(file: &File, offset: u64, len: u64) -> std::io::Result<*mut u8> {
    let (Ok(len), Ok(offset)) = (usize::try_from(len), libc::off_t::try_from(offset)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: a fresh shared mapping of a descriptor we hold open; the result is checked below.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(host.cast())
}

/// KVM memory slot numbers for CXL mappings, above the RAM slots.
pub struct SlotAllocator {
    free: Vec<u32>,
}

impl SlotAllocator {
    pub fn new(first: u32, count: u32) -> Self {
        Self {
            free: (first..first + count).rev().collect(),
        }
    }

    /// Takes a free slot number.
    pub fn pop(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Gives a slot number back.
    pub fn push(&mut self, slot: u32) {
        self.free.push(slot);
    }
}

/// The VMM's guest memory map, which device DMA (`iommu::DmaSpace`) reads and writes through.
pub type DmaMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Adds `size` bytes of `file` from `offset` to the DMA-visible guest memory map at `gpa` (a
/// second shared mapping of the same file pages KVM maps, so both views stay coherent).
pub fn add_dma_region(
    memory: &DmaMemory,
    file: &File,
    offset: u64,
    gpa: u64,
    size: u64,
) -> Result<(), String> {
    let file = file.try_clone().map_err(|e| e.to_string())?;
    let region = MmapRegion::from_file(FileOffset::new(file, offset), size as usize)
        .map_err(|e| e.to_string())?;
    let region = GuestRegionMmap::new(region, GuestAddress(gpa))
        .ok_or_else(|| format!("{gpa:#x}+{size:#x} overflows the guest address space"))?;
    let guard = memory.lock().map_err(|e| e.to_string())?;
    let updated = memory
        .memory()
        .insert_region(Arc::new(region))
        .map_err(|e| e.to_string())?;
    guard.replace(updated);
    Ok(())
}

/// Removes the region [`add_dma_region`] added at `gpa`.
pub fn remove_dma_region(memory: &DmaMemory, gpa: u64, size: u64) -> Result<(), String> {
    let guard = memory.lock().map_err(|e| e.to_string())?;
    let (updated, _) = memory
        .memory()
        .remove_region(GuestAddress(gpa), size)
        .map_err(|e| e.to_string())?;
    guard.replace(updated);
    Ok(())
}

/// Maps committed endpoint decoder ranges into the guest: a KVM memory slot (CPU access at
/// native speed, code can execute from it) and an entry in the DMA-visible guest memory map
/// (emulated devices' DMA reaches it).
pub struct MemoryMapper {
    vm: Arc<VmFd>,
    backing: Arc<Backing>,
    volatile: u64,
    slots: Arc<Mutex<SlotAllocator>>,
    dma: DmaMemory,
    mapped: Mutex<Vec<(CommittedRange, u32)>>,
    name: String,
    /// Interleaved decoders (2 or more ways) go here with this device's index.
    interleave: Option<(Arc<InterleaveMap>, usize)>,
}

impl MemoryMapper {
    pub fn new(
        vm: Arc<VmFd>,
        backing: Arc<Backing>,
        volatile: u64,
        slots: Arc<Mutex<SlotAllocator>>,
        dma: DmaMemory,
        name: String,
    ) -> Self {
        Self {
            vm,
            backing,
            volatile,
            slots,
            dma,
            mapped: Mutex::new(Vec::new()),
            name,
            interleave: None,
        }
    }

    /// Sends this device's interleaved decoders (device `index`) to `map`.
    pub fn with_interleave(mut self, map: Arc<InterleaveMap>, index: usize) -> Self {
        self.interleave = Some((map, index));
        self
    }

    fn set_slot(&self, slot: u32, gpa: u64, size: u64, host: u64) -> Result<(), String> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: `host..host+size` lies inside the backing mapping (checked by the caller),
        // which lives as long as the VM; size 0 deletes the slot.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| e.to_string())
    }
}

impl HdmListener for MemoryMapper {
    fn committed(&self, range: &CommittedRange) -> Result<(), String> {
        let DecodeTarget::Memory {
            dpa_base,
            partition,
            ..
        } = range.target
        else {
            return Ok(()); // host bridge / port decoders only route; nothing to map
        };
        if range.interleave.ways > 1 {
            return match &self.interleave {
                Some((map, index)) => map.endpoint_committed(*index, range),
                None => Err(format!(
                    "{}: interleaved decoders are not supported",
                    self.name
                )),
            };
        }
        // The DPA space is the backing file: volatile partition first, then persistent.
        let in_partition = match partition {
            Partition::Volatile => dpa_base + range.size <= self.volatile,
            Partition::Persistent => dpa_base >= self.volatile,
        };
        let host = self
            .backing
            .host_address(dpa_base, range.size)
            .filter(|_| in_partition)
            .ok_or_else(|| format!("DPA {dpa_base:#x}+{:#x} is outside the device", range.size))?;
        let slot = lock(&self.slots)
            .free
            .pop()
            .ok_or("no free KVM memory slot for a CXL mapping")?;
        if let Err(e) = self.set_slot(slot, range.hpa_base, range.size, host) {
            lock(&self.slots).free.push(slot);
            return Err(format!(
                "mapping {:#x}+{:#x}: {e}",
                range.hpa_base, range.size
            ));
        }
        let (file, dpa0) = self.backing.file();
        if let Err(e) = add_dma_region(&self.dma, file, dpa0 + dpa_base, range.hpa_base, range.size)
        {
            let _ = self.set_slot(slot, range.hpa_base, 0, 0);
            lock(&self.slots).free.push(slot);
            return Err(format!(
                "adding {:#x}+{:#x} to the DMA memory map: {e}",
                range.hpa_base, range.size
            ));
        }
        log::info!(
            "{}: HDM decoder {} committed: HPA {:#x}+{:#x} -> DPA {dpa_base:#x} ({partition:?})",
            self.name,
            range.decoder_index,
            range.hpa_base,
            range.size
        );
        lock(&self.mapped).push((*range, slot));
        Ok(())
    }

    fn uncommitted(&self, range: &CommittedRange) {
        if range.interleave.ways > 1 {
            if let Some((map, index)) = &self.interleave {
                map.endpoint_uncommitted(*index, range);
            }
            return;
        }
        let mut mapped = lock(&self.mapped);
        if let Some(pos) = mapped.iter().position(|(r, _)| r == range) {
            let (_, slot) = mapped.remove(pos);
            if let Err(e) = remove_dma_region(&self.dma, range.hpa_base, range.size) {
                log::error!(
                    "{}: removing {:#x} from the DMA memory map: {e}",
                    self.name,
                    range.hpa_base
                );
            }
            if let Err(e) = self.set_slot(slot, range.hpa_base, 0, 0) {
                log::error!("{}: unmapping {:#x}: {e}", self.name, range.hpa_base);
            }
            lock(&self.slots).free.push(slot);
            log::info!(
                "{}: HDM decoder {} uncommitted",
                self.name,
                range.decoder_index
            );
        }
    }
}

/// The host bridge's decoders, seen by the interleave map (they route; the endpoints map).
struct BridgeListener {
    map: Arc<InterleaveMap>,
    index: usize,
}

impl HdmListener for BridgeListener {
    fn committed(&self, range: &CommittedRange) -> Result<(), String> {
        self.map.bridge_committed(self.index, range);
        Ok(())
    }

    fn uncommitted(&self, range: &CommittedRange) {
        self.map.bridge_uncommitted(self.index, range);
    }
}

/// The CXL machine: host bridge 0 (`\_SB.PCI0`, UID [`crate::acpi::CXL_HOST_BRIDGE_UID`], CHBCR
/// at `CXL_CHBCR_START`) and, when a device asks for it, host bridge 1 (`\_SB.PCI1`, a root bus
/// of its own at [`crate::layout::CXL_SECOND_ROOT_BUS`], the next UID and CHBCR); one CXL root
/// port per Type 3 device on its bridge's root bus; the fixed memory windows of
/// [`plan_windows`].
pub struct CxlTopology {
    /// Host bridge `i` of the machine.
    pub host_bridges: Vec<Arc<Mutex<devices::cxl::CxlHostBridge>>>,
    /// Root bus resources of each host bridge but the first (`None` for `\_SB.PCI0`).
    pub root_buses: Vec<Option<devices::pci::RootBusResources>>,
    pub devices: Vec<CxlDeviceHandles>,
    pub windows: Vec<CxlWindow>,
    /// Every device's memory, for [`CxlTopology::flush`].
    pub backings: Vec<Arc<Backing>>,
    /// Interleaved regions (their shadow copies are written back by [`CxlTopology::flush`]).
    pub interleave: Arc<InterleaveMap>,
}

impl CxlTopology {
    /// Writes every device's memory back to its backing file (at the end of a run, however it
    /// ended: the guest's stores are in the page cache already; this makes them durable).
    pub fn flush(&self) {
        self.interleave.write_back_all();
        for (backing, dev) in self.backings.iter().zip(&self.devices) {
            if let Err(e) = backing.flush() {
                log::warn!(
                    "{}: flushing '{}': {e}",
                    dev.spec.id,
                    dev.spec.backing.display()
                );
            }
        }
    }

    /// What the ACPI tables describe: the host bridges (CHBS, ACPI0016 devices) and the
    /// windows (CFMWS), every window on `proximity_domain`.
    pub fn acpi_config(&self, proximity_domain: u32) -> crate::acpi::CxlConfig {
        use crate::acpi::{CxlConfig, CxlHostBridgeConfig, CxlWindowConfig, PciRootConfig};
        CxlConfig {
            host_bridges: self
                .root_buses
                .iter()
                .enumerate()
                .map(|(index, root)| CxlHostBridgeConfig {
                    uid: host_bridge_uid(index),
                    chbcr_base: chbcr_base(index),
                    pci_root: root.map(|r| PciRootConfig {
                        bus_start: r.bus_start,
                        bus_end: r.bus_end,
                        mmio32_base: r.windows.mmio32_base,
                        mmio32_size: r.windows.mmio32_size,
                        mmio64_base: r.windows.mmio64_base,
                        mmio64_size: r.windows.mmio64_size,
                    }),
                })
                .collect(),
            windows: self
                .windows
                .iter()
                .map(|w| {
                    let mut config = CxlWindowConfig::new(
                        w.window.base,
                        w.window.size,
                        w.host_bridges
                            .iter()
                            .map(|&hb| host_bridge_uid(hb))
                            .collect(),
                        proximity_domain,
                    );
                    config.granularity = w.granularity as u32;
                    config
                })
                .collect(),
        }
    }
}

/// What the VMM keeps of one Type 3 device after handing it to the root complex.
pub struct CxlDeviceHandles {
    pub spec: CxlType3Spec,
    pub port_number: u8,
    pub device: Arc<Mutex<devices::cxl::CxlType3Device>>,
    /// The CXL root port above it (receives its AER error messages).
    pub root_port: Arc<Mutex<devices::cxl::root_port::CxlRootPort>>,
    /// The device's command set and state, shared with the register model (control API).
    pub memdev: devices::cxl::memdev::SharedMemdev,
}

/// PCI device number of the CXL root port of the `index`-th device on a host bridge (xx:02.0,
/// xx:03.0, … on the bridge's root bus); also its Port Number.
pub fn root_port_device_number(index: usize) -> u8 {
    2 + index as u8
}

/// `_UID` of host bridge `index` (CHBS UID, CFMWS target).
pub fn host_bridge_uid(index: usize) -> u32 {
    crate::acpi::CXL_HOST_BRIDGE_UID + index as u32
}

/// Base of host bridge `index`'s component registers (CHBCR).
pub fn chbcr_base(index: usize) -> u64 {
    crate::layout::CXL_CHBCR_START + index as u64 * crate::layout::CXL_CHBCR_SIZE
}

/// A stable serial number for a device: FNV-1a of its id, so labels survive restarts.
pub fn serial_for(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Size of the fixed memory window for `specs`: every device's capacity, rounded up to a
/// whole interleave set of all of them (256 MiB × devices), so that a region interleaved over
/// every device fits after Linux aligns its base to that set size.
pub fn window_size(specs: &[CxlType3Spec]) -> u64 {
    let total: u64 = specs.iter().map(CxlType3Spec::total).sum();
    let set = CXL_GRANULE * (specs.len().max(1) as u64);
    total.div_ceil(set) * set
}

/// One CFMWS window of the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CxlWindow {
    pub window: devices::cxl::HpaWindow,
    /// Host bridge indices in interleave order (one: the window does not interleave bridges).
    pub host_bridges: Vec<usize>,
    /// Host bridge interleave granularity (CFMWS HBIG) in bytes.
    pub granularity: u64,
}

/// Host bridges `specs` use: 1, or 2 when a device asks for `host-bridge=1`.
pub fn host_bridge_count(specs: &[CxlType3Spec]) -> usize {
    specs.iter().map(|s| s.host_bridge + 1).max().unwrap_or(1)
}

/// Alignment of every window's base: a whole 8-way interleave set, so a region of any width
/// starts at the window's base.
const WINDOW_ALIGN: u64 = 8 * CXL_GRANULE;

/// The fixed memory windows for `specs`, from `CXL_WINDOW_START`, in CEDT order (Linux's root
/// decoders `decoder0.0`, `decoder0.1`, …): one per host bridge over its devices' capacity; with
/// two host bridges, then one interleaving both at 4 KiB (the granularity regions across the
/// bridges are mapped at native speed with) and one at 256 B, each over every device's
/// capacity (Linux requires a region across bridges to use the window's granularity).
pub fn plan_windows(specs: &[CxlType3Spec]) -> Result<Vec<CxlWindow>, String> {
    let bridges = host_bridge_count(specs);
    let mut plan: Vec<(u64, Vec<usize>, u64)> = (0..bridges)
        .map(|hb| {
            let on: Vec<CxlType3Spec> = specs
                .iter()
                .filter(|s| s.host_bridge == hb)
                .cloned()
                .collect();
            (window_size(&on), vec![hb], 256)
        })
        .collect();
    if bridges > 1 {
        for granularity in [4096, 256] {
            plan.push((window_size(specs), (0..bridges).collect(), granularity));
        }
    }
    let mut base = crate::layout::CXL_WINDOW_START;
    let mut windows = Vec::new();
    for (size, host_bridges, granularity) in plan {
        windows.push(CxlWindow {
            window: devices::cxl::HpaWindow::new(base, size),
            host_bridges,
            granularity,
        });
        base = (base + size).next_multiple_of(WINDOW_ALIGN);
    }
    let used = base - crate::layout::CXL_WINDOW_START;
    if used > crate::layout::CXL_WINDOW_MAX_SIZE {
        return Err(format!(
            "CXL devices need {used} bytes of fixed memory windows; the machine has {}",
            crate::layout::CXL_WINDOW_MAX_SIZE
        ));
    }
    Ok(windows)
}

/// Commits the decoders at boot as platform firmware would (`--cxl-precommit`): for each
/// device, one endpoint decoder for the volatile capacity and one for the persistent capacity,
/// at consecutive HPAs in its host bridge's own window, and matching host bridge decoders
/// targeting its root port.
pub fn precommit(topology: &CxlTopology) -> Result<(), String> {
    let bridges = topology.host_bridges.len();
    let mut hpa: Vec<u64> = (0..bridges)
        .map(|hb| topology.windows[hb].window.base)
        .collect();
    let mut hb_decoder = vec![0; bridges];
    for dev in &topology.devices {
        let hb = dev.spec.host_bridge;
        let mut decoder = 0;
        for size in [dev.spec.volatile, dev.spec.persistent] {
            if size == 0 {
                continue;
            }
            lock(&topology.host_bridges[hb])
                .precommit(hb_decoder[hb], hpa[hb], size, dev.port_number, false)
                .map_err(|e| {
                    format!(
                        "{}: host bridge {hb} decoder {}: {e}",
                        dev.spec.id, hb_decoder[hb]
                    )
                })?;
            lock(&dev.device)
                .precommit(decoder, hpa[hb], size, 0, false)
                .map_err(|e| format!("{}: decoder {decoder}: {e}", dev.spec.id))?;
            hpa[hb] += size;
            decoder += 1;
            hb_decoder[hb] += 1;
        }
    }
    Ok(())
}

/// Builds the CXL devices, adds them to `platform`, and returns the handles the VMM keeps.
///
/// `nested_media` lists the backing files the nested host has as NVDIMMs (path, slot): those are
/// mapped from there ([`Backing::nested`]) instead of through the 9p file.
pub fn build_topology(
    specs: &[CxlType3Spec],
    nested_media: &[(PathBuf, u32)],
    vm: &Arc<VmFd>,
    dma: &DmaMemory,
    msi: &Arc<dyn iommu::MsiSink>,
    platform: &mut crate::pci::Platform,
) -> Result<CxlTopology, String> {
    use devices::cxl::lsa::{DEFAULT_LSA_SIZE, FileLabelStorage, LabelStorage};
    use devices::cxl::memdev::{Memdev, MemdevConfig, SharedMemdev};
    use devices::cxl::{
        CxlHostBridge, CxlHostBridgeConfig, CxlRootPort, CxlType3Device, HpaWindow, Type3Config,
    };

    let bridges = host_bridge_count(specs);
    if let Some(hb) = (0..bridges).find(|&hb| specs.iter().all(|s| s.host_bridge != hb)) {
        return Err(format!(
            "CXL host bridge {hb} has no --cxl-type3 device (host-bridge={hb}); put devices on \
             host bridge 0 first"
        ));
    }
    let windows = plan_windows(specs)?;
    // Windows a host bridge's decoders (and its devices') may commit into.
    let windows_of = |hb: usize| -> Vec<HpaWindow> {
        windows
            .iter()
            .filter(|w| w.host_bridges.contains(&hb))
            .map(|w| w.window)
            .collect()
    };
    // Root buses first, before any root port takes bus numbers.
    let mut root_buses = vec![None];
    for _ in 1..bridges {
        root_buses.push(Some(platform.add_root_bus(
            crate::layout::CXL_SECOND_ROOT_BUS,
            crate::layout::CXL_SECOND_ROOT_MMIO32_SIZE,
            crate::layout::CXL_SECOND_ROOT_MMIO64_SIZE,
        )?));
    }
    let root_bus_number = |hb: usize| -> u8 {
        root_buses[hb].map_or(0, |r: devices::pci::RootBusResources| r.bus_start)
    };
    let slots = Arc::new(Mutex::new(SlotAllocator::new(16, 64)));
    let mut handles = Vec::new();
    let mut ports: Vec<Vec<u8>> = vec![Vec::new(); bridges];
    let mut backings = Vec::new();
    for spec in specs {
        let nested_slot = nested_media
            .iter()
            .find(|(path, _)| *path == spec.backing)
            .map(|&(_, slot)| slot);
        let backing = match nested_slot {
            Some(slot) => Backing::nested(&spec.backing, slot, spec.total()),
            None => Backing::open(&spec.backing, spec.total()),
        }
        .map_err(|e| e.to_string())?;
        backings.push(Arc::new(backing));
    }
    // Each device's root port: the next device number on its bridge's root bus.
    let port_numbers: Vec<u8> = specs
        .iter()
        .enumerate()
        .map(|(index, spec)| {
            let before = specs[..index]
                .iter()
                .filter(|s| s.host_bridge == spec.host_bridge)
                .count();
            root_port_device_number(before)
        })
        .collect();
    // Interleaved regions route window → host bridge → root port → endpoint.
    let interleave = InterleaveMap::new(
        vm.clone(),
        slots.clone(),
        dma.clone(),
        windows
            .iter()
            .map(|w| WindowRoute {
                window: w.window,
                granularity: w.granularity,
                host_bridges: w.host_bridges.clone(),
            })
            .collect(),
        specs
            .iter()
            .zip(&backings)
            .zip(&port_numbers)
            .map(|((spec, backing), &port_number)| RoutedDevice {
                port_number,
                host_bridge: spec.host_bridge,
                backing: backing.clone(),
                id: spec.id.clone(),
            })
            .collect(),
    );
    for (index, spec) in specs.iter().enumerate() {
        let port_number = port_numbers[index];
        let backing = backings[index].clone();
        let lsa: Option<Box<dyn LabelStorage>> = if let Some(path) = spec.lsa_path() {
            let storage = if path.exists() {
                FileLabelStorage::open_existing(&path)
            } else {
                FileLabelStorage::open(&path, DEFAULT_LSA_SIZE)
            }
            .map_err(|e| format!("{}: label storage area '{}': {e}", spec.id, path.display()))?;
            Some(Box::new(storage))
        } else {
            None
        };
        let serial = serial_for(&spec.id);
        let memdev = Memdev::new(MemdevConfig {
            volatile_bytes: spec.volatile,
            persistent_bytes: spec.persistent,
            lsa,
            serial,
            id: spec.id.clone(),
        })
        .map_err(|e| format!("{}: {e}", spec.id))?;
        let memdev = Arc::new(Mutex::new(memdev));
        let mapper = MemoryMapper::new(
            vm.clone(),
            backing,
            spec.volatile,
            slots.clone(),
            dma.clone(),
            spec.id.clone(),
        )
        .with_interleave(interleave.clone(), index);
        let mut cfg = Type3Config::new(spec.volatile, spec.persistent);
        cfg.serial = serial;
        // Four, as QEMU's Type 3 device has: a RAM and a pmem region plus two more (e.g. one
        // region per granularity side by side) without tearing any down.
        cfg.hdm_decoders = ENDPOINT_HDM_DECODERS;
        cfg.windows = windows_of(spec.host_bridge);
        cfg.listener = Some(Arc::new(mapper));
        let device = CxlType3Device::new(cfg, Box::new(SharedMemdev(memdev.clone())), msi.clone())
            .map_err(|e| format!("{}: {e}", spec.id))?;
        let interrupts = device.interrupts();
        {
            let mut md = lock(&memdev);
            md.set_event_msgnum(devices::cxl::type3::EVENT_VECTOR as u8)
                .map_err(|e| e.to_string())?;
            md.set_event_interrupt_sink(Some(Box::new(move |ev| {
                interrupts.trigger(u16::from(ev.msgnum));
            })));
        }
        let (function, device) = devices::pci::SharedFunction::new(device);
        let port = CxlRootPort::new(devices::pci::RootPortConfig::cxl(port_number), msi.clone())
            .map_err(|e| e.to_string())?;
        let (port, root_port) = devices::pci::SharedFunction::new(port);
        platform.add_behind_root_port(
            root_bus_number(spec.host_bridge),
            port_number,
            Box::new(port),
            Box::new(function),
        )?;
        ports[spec.host_bridge].push(port_number);
        handles.push(CxlDeviceHandles {
            spec: spec.clone(),
            port_number,
            device,
            root_port,
            memdev: SharedMemdev(memdev),
        });
    }
    let mut host_bridges = Vec::new();
    for (hb, ports) in ports.into_iter().enumerate() {
        let devices_here = ports.len();
        let mut hb_cfg = CxlHostBridgeConfig::new(ports, windows_of(hb));
        hb_cfg.decoders = (ENDPOINT_HDM_DECODERS * devices_here).clamp(2, 10);
        hb_cfg.listener = Some(Arc::new(BridgeListener {
            map: interleave.clone(),
            index: hb,
        }));
        let host_bridge = Arc::new(Mutex::new(
            CxlHostBridge::new(hb_cfg).map_err(|e| format!("CXL host bridge {hb}: {e}"))?,
        ));
        platform.add_fixed_mmio(
            &format!("CXL host bridge {hb} registers (CHBCR)"),
            chbcr_base(hb),
            crate::layout::CXL_CHBCR_SIZE,
            host_bridge.clone(),
        )?;
        host_bridges.push(host_bridge);
    }
    Ok(CxlTopology {
        host_bridges,
        root_buses,
        devices: handles,
        windows,
        backings,
        interleave,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_range_is_reachable_by_device_dma_and_lands_in_the_backing_file() {
        let dir = std::env::temp_dir().join(format!("vmm-cxl-dma-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("backing.img");
        let backing = Backing::open(&path, 2 * CXL_GRANULE).unwrap();
        let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let memory = GuestMemoryAtomic::new(ram);
        let dma = iommu::DmaSpace::identity(iommu::RequesterId::new(2, 0, 0), memory.clone());
        dma.set_bus_master(true);
        let hpa = crate::layout::CXL_WINDOW_START;
        // Not committed yet: DMA to the window fails.
        assert!(dma.write(hpa + 0x1000, b"early").is_err());
        // Commit the second 256 MiB of the device (DPA 256M) at the window base.
        add_dma_region(&memory, backing.file().0, CXL_GRANULE, hpa, CXL_GRANULE).unwrap();
        dma.write(hpa + 0x1000, b"device wrote this").unwrap();
        let mut back = [0u8; 17];
        dma.read(hpa + 0x1000, &mut back).unwrap();
        assert_eq!(&back, b"device wrote this");
        // The same bytes are in the backing file at DPA 256M + 0x1000, and in the mapping
        // KVM uses for the guest's CPU view.
        let file = std::fs::read(&path).unwrap();
        let at = (CXL_GRANULE + 0x1000) as usize;
        assert_eq!(&file[at..at + 17], b"device wrote this");
        let cpu_view = backing.host_address(CXL_GRANULE + 0x1000, 17).unwrap();
        // SAFETY: host_address checked the range lies inside the live mapping.
        let cpu = unsafe { std::slice::from_raw_parts(cpu_view as *const u8, 17) };
        assert_eq!(cpu, b"device wrote this");
        // Uncommit: gone from the DMA map again; RAM is untouched.
        remove_dma_region(&memory, hpa, CXL_GRANULE).unwrap();
        assert!(dma.write(hpa + 0x1000, b"late").is_err());
        dma.write(0x100, b"ram").unwrap();
        drop(backing);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parses_full_spec() {
        let s = CxlType3Spec::parse(
            "volatile=512M,persistent=256M,backing=/var/cxl0.img,lsa=/var/cxl0.lsa,id=mem0",
            0,
        )
        .unwrap();
        assert_eq!(s.volatile, 512 << 20);
        assert_eq!(s.persistent, 256 << 20);
        assert_eq!(s.backing, PathBuf::from("/var/cxl0.img"));
        assert_eq!(s.lsa, Some(PathBuf::from("/var/cxl0.lsa")));
        assert_eq!(s.id, "mem0");
        assert_eq!(s.total(), 768 << 20);
        assert_eq!(s.host_bridge, 0);
        let s = CxlType3Spec::parse("volatile=256M,backing=b,host-bridge=1", 0).unwrap();
        assert_eq!(s.host_bridge, 1);
    }

    #[test]
    fn one_bridge_has_one_window_and_two_bridges_add_windows_across_both() {
        let spec = |hb: usize| CxlType3Spec {
            volatile: 512 << 20,
            persistent: 256 << 20,
            backing: PathBuf::from("b"),
            lsa: None,
            id: String::new(),
            host_bridge: hb,
        };
        let start = crate::layout::CXL_WINDOW_START;
        // One bridge: the window it always had, over every device.
        let one = plan_windows(&[spec(0), spec(0)]).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].window.base, start);
        assert_eq!(one[0].window.size, 1536 << 20);
        assert_eq!(one[0].host_bridges, [0]);
        // Two bridges: decoder0.0 / decoder0.1 per bridge, decoder0.2 / decoder0.3 across both
        // at 4 KiB / 256 B; each base a whole 8-way set (2 GiB) after the previous window.
        let two = plan_windows(&[spec(0), spec(0), spec(1), spec(1)]).unwrap();
        let summary: Vec<(u64, u64, Vec<usize>, u64)> = two
            .iter()
            .map(|w| {
                (
                    w.window.base - start,
                    w.window.size,
                    w.host_bridges.clone(),
                    w.granularity,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (0, 1536 << 20, vec![0], 256),
                (2 << 30, 1536 << 20, vec![1], 256),
                (4 << 30, 3 << 30, vec![0, 1], 4096),
                (8 << 30, 3 << 30, vec![0, 1], 256),
            ]
        );
        assert_eq!(host_bridge_count(&[spec(0), spec(1)]), 2);
        // Too much capacity for the windows is refused with the sizes.
        let huge = CxlType3Spec {
            volatile: 100 << 30,
            ..spec(1)
        };
        let e = plan_windows(&[spec(0), huge]).unwrap_err();
        assert!(e.contains("fixed memory windows"), "{e}");
    }

    #[test]
    fn either_capacity_may_be_zero_but_not_both() {
        let s = CxlType3Spec::parse("volatile=0,persistent=1G,backing=b", 3).unwrap();
        assert_eq!(
            (s.volatile, s.persistent, s.id.as_str()),
            (0, 1 << 30, "cxl3")
        );
        assert!(CxlType3Spec::parse("volatile=0,persistent=0,backing=b", 0).is_err());
    }

    #[test]
    fn bad_specs_name_the_problem() {
        for (spec, needle) in [
            ("volatile=100M,backing=b", "multiple of 256M"),
            ("volatile=1G", "backing=PATH is required"),
            ("volatile=1G,backing=b,colour=red", "unknown key 'colour'"),
            ("volatile=lots,backing=b", "'lots'"),
            ("volatile,backing=b", "not key=value"),
            ("volatile=1G,backing=b,host-bridge=2", "host-bridge=2"),
            (
                "volatile=1G,backing=b,host-bridge=x",
                "host bridges 0 and 1",
            ),
        ] {
            let e = CxlType3Spec::parse(spec, 0).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
            assert!(e.contains(spec), "{e}");
        }
    }

    #[test]
    fn backing_file_is_created_sparse_and_never_resized() {
        let dir = std::env::temp_dir().join(format!("vmm-cxl-backing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem.img");
        let b = Backing::open(&path, 512 << 20).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 512 << 20);
        assert!(b.host_address(256 << 20, 256 << 20).is_some());
        assert!(b.host_address(256 << 20, 512 << 20).is_none());
        assert!(b.host_address(u64::MAX, 2).is_none());
        drop(b);
        let err = Backing::open(&path, 1 << 30).err().unwrap();
        assert!(matches!(err, CxlConfigError::BackingSize { .. }), "{err}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            512 << 20,
            "left untouched"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
