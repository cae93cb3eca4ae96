//! Exclusive use of the files a run hands its guest as device media (CXL backing files, label
//! storage areas).
//!
//! Two VMs writing one device's media would corrupt it, so a run takes an open-file-description
//! (OFD) write lock on each such file for its whole life, as QEMU's image locking does. The lock
//! belongs to the open file description, not the process: opening and closing the same file
//! elsewhere in the VMM does not drop it, and the kernel releases it however the run ends
//! (`kill -9` included). Under the nested host the outer `vmm run` holds it (see `main.rs`).
//!
//! The kernel does not say who holds an OFD lock (`F_OFD_GETLK` reports pid -1), so the refusal
//! finds the holder the way `lslocks` does: the process with an open descriptor on the same file
//! whose `/proc/PID/fdinfo` lists an OFD write lock.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a file could not be locked.
#[derive(Debug, Error)]
pub enum LockError {
    /// Another open file description holds a conflicting lock.
    #[error("{what} '{}' is in use by {holder}; refusing to share it with another run", path.display())]
    Held {
        /// What the file is to the run ("CXL backing file", ...).
        what: String,
        /// The file.
        path: PathBuf,
        /// Who holds it: "pid N (command line)", "this run (...)" or "another process".
        holder: String,
    },
    /// The lock call itself failed.
    #[error("cannot lock {what} '{}': {source}", path.display())]
    Io {
        /// What the file is to the run.
        what: String,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// An OFD write lock on a whole file, held until this value is dropped (or the process ends).
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Takes an exclusive (write) OFD lock on all of `file` (opened for writing), without
    /// waiting. `what` and `path` name the file in errors.
    pub fn exclusive(file: File, path: &Path, what: &str) -> Result<Self, LockError> {
        // SAFETY: an all-zero flock is a valid value; we set every field we use below.
        let mut request: libc::flock = unsafe { std::mem::zeroed() };
        request.l_type = libc::F_WRLCK as libc::c_short;
        request.l_whence = libc::SEEK_SET as libc::c_short;
        request.l_start = 0;
        request.l_len = 0; // to the end of the file, however it grows
        request.l_pid = 0; // must be 0 for OFD locks
        // SAFETY: F_OFD_SETLK reads the valid flock we pass; the descriptor is ours and open.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &request) };
        if rc == 0 {
            return Ok(Self { file });
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Err(LockError::Held {
                what: what.to_string(),
                path: path.to_path_buf(),
                holder: holder_of(&file),
            }),
            _ => Err(LockError::Io {
                what: what.to_string(),
                path: path.to_path_buf(),
                source: err,
            }),
        }
    }

    /// The locked file (the lock lives as long as this descriptor).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Who holds an OFD write lock on the file `file` refers to: "pid N (command line)", "this
/// run" when it is our own process, or "another process" when no holder can be seen (one in
/// another PID namespace, or /proc unreadable).
fn holder_of(file: &File) -> String {
    let Ok(meta) = file.metadata() else {
        return "another process".into();
    };
    let (dev, ino) = (meta.dev(), meta.ino());
    let own = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return "another process".into();
    };
    for proc_entry in procs.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd_entry in fds.flatten() {
            let same_file =
                std::fs::metadata(fd_entry.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino);
            if !same_file {
                continue;
            }
            let info_path = proc_entry.path().join("fdinfo").join(fd_entry.file_name());
            let holds = std::fs::read_to_string(info_path).is_ok_and(|info| {
                info.lines()
                    .any(|l| l.starts_with("lock:") && l.contains("OFDLCK") && l.contains("WRITE"))
            });
            if !holds {
                continue;
            }
            if pid == own {
                return format!("this run (pid {pid}): the same file is given twice");
            }
            return format!("pid {pid} ({})", command_line(pid));
        }
    }
    "another process".into()
}

/// `/proc/PID/cmdline` as one line, shortened.
fn command_line(pid: u32) -> String {
    const MAX: usize = 100;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut text: String = String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if text.is_empty() {
        return "unknown command".into();
    }
    if text.chars().count() > MAX {
        text = text.chars().take(MAX).collect::<String>() + "...";
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn scratch(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("vmm-lock-{name}-{}", std::process::id()));
        std::fs::write(&path, b"media").unwrap();
        path
    }

    fn open(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn second_lock_is_refused_naming_the_holder_until_the_first_is_dropped() {
        let path = scratch("second");
        let first = FileLock::exclusive(open(&path), &path, "CXL backing file").unwrap();
        // Another open file description conflicts even in the same process (that is what makes
        // OFD locks per run, not per process).
        let err = FileLock::exclusive(open(&path), &path, "CXL backing file").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LockError::Held { .. }), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("CXL backing file"), "{msg}");
        assert!(
            msg.contains(&format!("this run (pid {})", std::process::id())),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
        // Opening and closing the file elsewhere does not release it (unlike POSIX locks).
        drop(open(&path));
        assert!(FileLock::exclusive(open(&path), &path, "x").is_err());
        drop(first);
        let again = FileLock::exclusive(open(&path), &path, "x").unwrap();
        drop(again);
        assert_eq!(std::fs::read(&path).unwrap(), b"media");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_lock_held_by_another_process_names_its_pid_and_dies_with_it() {
        use std::os::unix::ffi::OsStrExt;
        let path = scratch("other");
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut ready = [0 as libc::c_int; 2];
        // SAFETY: `ready` is a valid array of two descriptors for pipe to fill.
        assert_eq!(unsafe { libc::pipe(ready.as_mut_ptr()) }, 0);
        // SAFETY: the child makes only async-signal-safe calls (open, fcntl, write, pause,
        // _exit) on memory prepared before the fork.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            // SAFETY: see above; the child opens its own file description and locks it.
            unsafe {
                let fd = libc::open(c_path.as_ptr(), libc::O_RDWR);
                let mut request: libc::flock = std::mem::zeroed();
                request.l_type = libc::F_WRLCK as libc::c_short;
                if fd < 0 || libc::fcntl(fd, libc::F_OFD_SETLK, &request) != 0 {
                    libc::_exit(1);
                }
                libc::write(ready[1], b"x".as_ptr().cast(), 1);
                loop {
                    libc::pause();
                }
            }
        }
        let mut byte = [0u8; 1];
        // SAFETY: reads one byte into our buffer from the pipe we created.
        let got = unsafe { libc::read(ready[0], byte.as_mut_ptr().cast(), 1) };
        assert_eq!(got, 1, "the child could not lock the file");
        let msg = FileLock::exclusive(open(&path), &path, "label storage area")
            .unwrap_err()
            .to_string();
        assert!(msg.contains(&format!("pid {child} (")), "{msg}");
        // SAFETY: killing and reaping the child we forked; closing our pipe ends.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
            libc::close(ready[0]);
            libc::close(ready[1]);
        }
        // The kernel dropped the dead holder's lock.
        FileLock::exclusive(open(&path), &path, "label storage area").unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
