//! Label Storage Area (LSA) backends for the CXL Type 3 memory device.
//!
//! The LSA is the small per-device area the host reads and writes with Get LSA (opcode 4102h) and
//! Set LSA (4103h) — CXL 2.0 §8.2.9.5.2.3/§8.2.9.5.2.4 (CXL 3.x §8.2.9.9.2.3/4). Linux uses it
//! as the nvdimm namespace label area of a CXL pmem device (`drivers/cxl/pmem.c`
//! `cxl_pmem_get_config_data()` / `cxl_pmem_set_config_data()`, consumed by
//! `drivers/nvdimm/label.c` `nd_label_data_init()`), so it must survive VM restarts: use
//! [`FileLabelStorage`] for real devices and [`MemLabelStorage`] for tests.

#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Default LSA size: 128 KiB holds two namespace index blocks and ~500 v1.2 labels.
pub const DEFAULT_LSA_SIZE: usize = 128 * 1024;

/// Smallest LSA Linux's nvdimm label code accepts: two 256-byte index blocks plus two 256-byte
/// labels (UEFI 2.7 label format; `sizeof_namespace_index()` in `drivers/nvdimm/label.c`).
pub const MIN_LSA_SIZE: usize = 1024;

/// Largest LSA the Identify Memory Device payload can describe (`lsa_size` is a 32-bit field).
pub const MAX_LSA_SIZE: usize = u32::MAX as usize;

/// Errors creating a label storage backend.
#[derive(Debug, thiserror::Error)]
pub enum LsaError {
    /// The requested size is outside [`MIN_LSA_SIZE`, `MAX_LSA_SIZE`].
    #[error("label storage size {size} is outside {min}..={max} bytes")]
    BadSize {
        /// Requested size.
        size: u64,
        /// Minimum accepted size.
        min: usize,
        /// Maximum accepted size.
        max: usize,
    },
    /// An existing LSA file has a different size than requested; it is never resized, so labels
    /// written by an earlier run are not silently truncated or shifted.
    #[error("label storage file {path} is {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// File path.
        path: PathBuf,
        /// Size on disk.
        actual: u64,
        /// Size requested.
        expected: usize,
    },
    /// Opening, sizing or syncing the backing file failed.
    #[error("label storage file {path}: {source}")]
    Io {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

/// Storage behind the device's Label Storage Area.
///
/// Offsets are byte offsets into the area. Implementations must reject any access that does not
/// lie entirely inside `0..size()` (the device model checks too, but a backend must never write
/// outside its area whatever its caller does).
pub trait LabelStorage: Send {
    /// Size of the area in bytes (reported as `lsa_size` by Identify Memory Device).
    fn size(&self) -> usize;
    /// Fill `buf` from the area starting at `off`.
    fn read(&mut self, off: usize, buf: &mut [u8]) -> io::Result<()>;
    /// Store `data` into the area starting at `off`; durable when this returns `Ok`.
    fn write(&mut self, off: usize, data: &[u8]) -> io::Result<()>;
}

/// Check that `off..off+len` lies inside an area of `size` bytes.
fn check_range(off: usize, len: usize, size: usize) -> io::Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("LSA access {off:#x}+{len:#x} outside the {size:#x}-byte area"),
        )),
    }
}

fn check_size(size: u64) -> Result<usize, LsaError> {
    match usize::try_from(size) {
        Ok(s) if (MIN_LSA_SIZE..=MAX_LSA_SIZE).contains(&s) => Ok(s),
        _ => Err(LsaError::BadSize {
            size,
            min: MIN_LSA_SIZE,
            max: MAX_LSA_SIZE,
        }),
    }
}

/// Volatile label storage (tests, or a throw-away pmem device). Starts zero-filled.
#[derive(Debug, Clone)]
pub struct MemLabelStorage {
    data: Vec<u8>,
}

impl MemLabelStorage {
    /// A zero-filled area of `size` bytes.
    pub fn new(size: usize) -> Result<Self, LsaError> {
        let size = check_size(size as u64)?;
        Ok(Self {
            data: vec![0; size],
        })
    }

    /// The current contents.
    pub fn contents(&self) -> &[u8] {
        &self.data
    }
}

impl LabelStorage for MemLabelStorage {
    fn size(&self) -> usize {
        self.data.len()
    }

    fn read(&mut self, off: usize, buf: &mut [u8]) -> io::Result<()> {
        check_range(off, buf.len(), self.data.len())?;
        let src = self
            .data
            .get(off..off + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, off: usize, data: &[u8]) -> io::Result<()> {
        check_range(off, data.len(), self.data.len())?;
        let dst = self
            .data
            .get_mut(off..off + data.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

/// Label storage persisted in a host file of exactly `size` bytes.
///
/// Every [`LabelStorage::write`] is followed by `fdatasync`, so a Set LSA that completed with
/// Success survives a host crash. The file is never written outside `0..size`, and an existing
/// file of another size is refused rather than resized.
#[derive(Debug)]
pub struct FileLabelStorage {
    file: File,
    size: usize,
    path: PathBuf,
}

impl FileLabelStorage {
    /// Open `path`, creating it zero-filled with `size` bytes if it is missing or empty.
    /// An existing non-empty file must already be `size` bytes long.
    pub fn open(path: impl AsRef<Path>, size: usize) -> Result<Self, LsaError> {
        let path = path.as_ref().to_path_buf();
        let size = check_size(size as u64)?;
        let io_err = |source| LsaError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        let actual = file.metadata().map_err(io_err)?.len();
        if actual == 0 {
            file.set_len(size as u64).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        } else if actual != size as u64 {
            return Err(LsaError::SizeMismatch {
                path,
                actual,
                expected: size,
            });
        }
        Ok(Self { file, size, path })
    }

    /// Open an existing LSA file and take its size from the file.
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Self, LsaError> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| LsaError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err)?;
        let size = check_size(file.metadata().map_err(io_err)?.len())?;
        Ok(Self { file, size, path })
    }

    /// Path of the backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl LabelStorage for FileLabelStorage {
    fn size(&self) -> usize {
        self.size
    }

    fn read(&mut self, off: usize, buf: &mut [u8]) -> io::Result<()> {
        check_range(off, buf.len(), self.size)?;
        self.file.read_exact_at(buf, off as u64)
    }

    fn write(&mut self, off: usize, data: &[u8]) -> io::Result<()> {
        check_range(off, data.len(), self.size)?;
        if data.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(data, off as u64)?;
        self.file.sync_data()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        std::env::temp_dir().join(format!(
            "cxl-lsa-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    #[test]
    fn mem_bounds() {
        let mut m = MemLabelStorage::new(MIN_LSA_SIZE).unwrap();
        m.write(MIN_LSA_SIZE - 4, &[1, 2, 3, 4]).unwrap();
        assert!(m.write(MIN_LSA_SIZE - 3, &[1, 2, 3, 4]).is_err());
        assert!(m.write(usize::MAX, &[1]).is_err());
        let mut b = [0u8; 4];
        m.read(MIN_LSA_SIZE - 4, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(m.read(MIN_LSA_SIZE, &mut b).is_err());
        assert!(MemLabelStorage::new(16).is_err());
    }

    #[test]
    fn file_persists_and_never_grows() {
        let p = temp_path("persist");
        {
            let mut f = FileLabelStorage::open(&p, 4096).unwrap();
            f.write(4000, &[0xab; 96]).unwrap();
            assert!(f.write(4001, &[0xcd; 96]).is_err());
            assert!(f.write(usize::MAX - 1, &[0xcd; 4]).is_err());
        }
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096);
        let mut f = FileLabelStorage::open_existing(&p).unwrap();
        assert_eq!(f.size(), 4096);
        let mut b = [0u8; 96];
        f.read(4000, &mut b).unwrap();
        assert_eq!(b, [0xab; 96]);
        drop(f);
        assert!(matches!(
            FileLabelStorage::open(&p, 8192),
            Err(LsaError::SizeMismatch { .. })
        ));
        std::fs::remove_file(&p).unwrap();
    }
}
