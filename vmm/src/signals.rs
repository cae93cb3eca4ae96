//! The signals that end a run (SIGINT, SIGTERM, SIGHUP), caught instead of killing the process,
//! so that a run stops cleanly: the guest's vCPUs stopped, what the VMM holds for the guest
//! flushed, the nested host shut down. A run ended this way exits with 128 + the signal number,
//! as a shell reports a command killed by it.
//!
//! The handler only counts the signal and remembers it (two atomic stores); whoever waits (the
//! VM's main loop, the nested host's wait loop) polls [`SignalWatch::next`].

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

/// Signals that stop a run.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
/// Signals caught so far (all watches), and the last one.
static SIGNAL_COUNT: AtomicUsize = AtomicUsize::new(0);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Active watches and the handlers to restore when the last one ends.
static SIGNAL_STATE: Mutex<(usize, Vec<(libc::c_int, libc::sigaction)>)> =
    Mutex::new((0, Vec::new()));

extern "C" fn on_stop_signal(signal: libc::c_int) {
    LAST_SIGNAL.store(signal, Ordering::SeqCst);
    SIGNAL_COUNT.fetch_add(1, Ordering::SeqCst);
}

/// Catches [`STOP_SIGNALS`] while at least one watch is alive (shared by concurrent watches).
#[derive(Debug)]
pub struct SignalWatch {
    seen: usize,
}

impl SignalWatch {
    /// Installs the handlers (the first watch) and starts counting from now.
    pub fn install() -> io::Result<Self> {
        let mut state = SIGNAL_STATE.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 == 0 {
            let mut previous = Vec::new();
            for &sig in &STOP_SIGNALS {
                // SAFETY: a zeroed sigaction is valid; we fill in the handler and an empty mask.
                let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
                action.sa_sigaction = on_stop_signal as *const () as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                // SAFETY: sigemptyset initialises the mask inside our own struct.
                unsafe { libc::sigemptyset(&mut action.sa_mask) };
                // SAFETY: see above; `old` is a valid struct for the previous action.
                let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
                // SAFETY: installs an async-signal-safe handler (two atomic operations).
                if unsafe { libc::sigaction(sig, &action, &mut old) } < 0 {
                    let err = io::Error::last_os_error();
                    restore_handlers(&previous);
                    return Err(err);
                }
                previous.push((sig, old));
            }
            state.1 = previous;
        }
        state.0 += 1;
        Ok(Self {
            seen: SIGNAL_COUNT.load(Ordering::SeqCst),
        })
    }

    /// A signal caught since the last call (or since the watch started), if any: the last one
    /// when several arrived in between.
    pub fn next(&mut self) -> Option<i32> {
        let count = SIGNAL_COUNT.load(Ordering::SeqCst);
        (count != self.seen).then(|| {
            self.seen = count;
            LAST_SIGNAL.load(Ordering::SeqCst)
        })
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        let mut state = SIGNAL_STATE.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        if state.0 == 0 {
            let previous = std::mem::take(&mut state.1);
            restore_handlers(&previous);
        }
    }
}

fn restore_handlers(previous: &[(libc::c_int, libc::sigaction)]) {
    for (sig, old) in previous {
        // SAFETY: reinstalls an action previously returned by sigaction for the same signal.
        unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
    }
}

/// The signal's name for messages ("SIGINT"), or its number.
pub fn name(signal: i32) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGKILL => "SIGKILL".into(),
        other => format!("signal {other}"),
    }
}

/// The exit status of a run ended by `signal`: 128 + its number (130 for SIGINT, 143 for
/// SIGTERM), as shells report it.
pub fn exit_status(signal: i32) -> u8 {
    u8::try_from(128 + signal).unwrap_or(crate::EXIT_VMM_ERROR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_128_plus_the_signal() {
        assert_eq!(exit_status(libc::SIGINT), 130);
        assert_eq!(exit_status(libc::SIGTERM), 143);
        assert_eq!(exit_status(libc::SIGHUP), 129);
        assert_eq!(name(libc::SIGINT), "SIGINT");
    }

    #[test]
    fn a_caught_signal_is_reported_once_and_does_not_kill_us() {
        let mut watch = SignalWatch::install().unwrap();
        assert_eq!(watch.next(), None);
        // SAFETY: sending SIGHUP to our own process, which the watch catches.
        unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut got = None;
        while got.is_none() && std::time::Instant::now() < deadline {
            got = watch.next();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, Some(libc::SIGHUP));
        assert_eq!(watch.next(), None);
    }
}
