//! The protocol between the VMM and the guest `/init` (`init/guest-init.sh`).
//!
//! * The guest writes [`INIT_REACHED`] to I/O port [`PORT_INIT_REACHED`] once its file systems
//!   are mounted and the modules of `/etc/vmm/modules` and `/vmm/modules` are loaded.
//! * Command mode: the VMM appends a second cpio archive (see [`command_archive`]) containing
//!   `/vmm/args`, a shell fragment `set -- 'cmd' 'arg'...`, and optionally `/vmm/env` (sourced
//!   first; `export NAME='value'` lines) and `/vmm/modules` (one module per line). The command
//!   runs with stdin `/dev/null`, stdout on `/dev/ttyS1` and stderr on `/dev/ttyS2` (both raw,
//!   no echo), environment `PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=linux`. Its exit
//!   status is written as one byte to [`PORT_EXIT_STATUS`], then the guest powers off.
//! * Without `/vmm/args`: an interactive login shell on the console; power-off when it exits.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::cpio::Archive;

/// I/O port the guest writes [`INIT_REACHED`] to.
pub const PORT_INIT_REACHED: u16 = 0x500;
/// Byte written to [`PORT_INIT_REACHED`].
pub const INIT_REACHED: u8 = 0x01;
/// I/O port receiving the command's exit status (one byte).
pub const PORT_EXIT_STATUS: u16 = 0x501;

/// Quotes bytes for a POSIX shell: `'...'` with each `'` written as `'\''`.
pub fn shell_quote(arg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(arg.len() + 2);
    out.push(b'\'');
    for &b in arg {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// `/vmm/args` for a command line.
pub fn args_script<S: AsRef<OsStr>>(command: &[S]) -> Vec<u8> {
    let mut script = b"set --".to_vec();
    for arg in command {
        script.push(b' ');
        script.extend(shell_quote(arg.as_ref().as_bytes()));
    }
    script.push(b'\n');
    script
}

/// The run-time archive for command mode: `vmm/args`, plus `vmm/env` when `env` is not empty.
/// Environment names must be shell identifiers; others are skipped with a warning.
pub fn command_archive<S: AsRef<OsStr>>(command: &[S], env: &[(String, S)]) -> Vec<u8> {
    let mut archive = Archive::new();
    archive.directory("vmm", 0o755);
    archive.file("vmm/args", 0o644, args_script(command));
    if !env.is_empty() {
        let mut script = Vec::new();
        for (name, value) in env {
            let valid = name.bytes().enumerate().all(|(i, c)| {
                c == b'_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
            });
            if !valid || name.is_empty() {
                log::warn!("skipping guest environment variable with invalid name {name:?}");
                continue;
            }
            script.extend_from_slice(b"export ");
            script.extend_from_slice(name.as_bytes());
            script.push(b'=');
            script.extend(shell_quote(value.as_ref().as_bytes()));
            script.push(b'\n');
        }
        archive.file("vmm/env", 0o644, script);
    }
    archive.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(args_script(&["uname", "-r"]), b"set -- 'uname' '-r'\n");
        assert_eq!(
            args_script(&["echo", "it's"]),
            b"set -- 'echo' 'it'\\''s'\n"
        );
        assert_eq!(args_script::<&str>(&[]), b"set --\n");
    }

    #[test]
    fn archive_contents() {
        let bytes = command_archive(
            &["true"],
            &[("A_1".to_string(), "x y"), ("1bad".to_string(), "z")],
        );
        let recs = crate::cpio::parse(&bytes).unwrap();
        let names: Vec<&str> = recs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["vmm", "vmm/args", "vmm/env"]);
        assert_eq!(recs[2].data, b"export A_1='x y'\n");
    }

    /// Runs the quoting through a real shell.
    #[test]
    fn shell_round_trip() {
        let args = ["printf", "%s|", "a b", "it's", "$HOME", "`x`", "\\n", ""];
        let script = String::from_utf8(args_script(&args)).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{script}\"$@\""))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "a b|it's|$HOME|`x`|\\n||"
        );
    }
}
