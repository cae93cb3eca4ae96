//! Reading a `.deb`'s file system tree in memory: `dpkg-deb --fsys-tarfile` piped into a small
//! tar reader (GNU and POSIX ustar/pax headers). Nothing is unpacked to disk, so a 110 MB
//! module package costs its decompression time only, not thousands of file creations.

use std::io::{self, Read};
use std::path::Path;
use std::process::Command;

use crate::{Error, run_streaming};

/// One file system object of a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    Dir,
    File { mode: u32, data: Vec<u8> },
    Symlink(String),
}

/// A package entry: path relative to `/` (no leading `./` or `/`, no trailing `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub path: String,
    pub node: Node,
}

const BLOCK: usize = 512;

fn octal(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // GNU base-256 encoding.
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b))
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&s).ok()?, 8).ok()
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn normalize(path: &str) -> String {
    let p = path.trim_start_matches("./").trim_start_matches('/');
    let p = p.trim_end_matches('/');
    if p == "." {
        String::new()
    } else {
        p.to_string()
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_padded(r: &mut dyn Read, size: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(size).map_err(|_| bad("entry too large"))?;
    let mut data = vec![0u8; len];
    r.read_exact(&mut data)?;
    skip(r, (BLOCK - len % BLOCK) % BLOCK)?;
    Ok(data)
}

fn skip(r: &mut dyn Read, n: usize) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n as u64), &mut io::sink())?;
    if copied != n as u64 {
        return Err(bad("truncated tar archive"));
    }
    Ok(())
}

/// Parses the `path`/`linkpath` records of a pax extended header.
fn pax_records(data: &[u8]) -> (Option<String>, Option<String>) {
    let (mut path, mut link) = (None, None);
    let mut rest = data;
    while !rest.is_empty() {
        let Some(sp) = rest.iter().position(|&b| b == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        if len <= sp || len > rest.len() {
            break;
        }
        let record = &rest[sp + 1..len - 1]; // without the trailing newline
        if let Some(v) = record.strip_prefix(b"path=") {
            path = Some(String::from_utf8_lossy(v).into_owned());
        } else if let Some(v) = record.strip_prefix(b"linkpath=") {
            link = Some(String::from_utf8_lossy(v).into_owned());
        }
        rest = &rest[len..];
    }
    (path, link)
}

/// Reads a tar stream, keeping the entries for which `keep(path)` is true (directories and
/// symlinks are always cheap; file data of other entries is skipped without being stored).
pub(crate) fn read_tar(r: &mut dyn Read, keep: &dyn Fn(&str) -> bool) -> io::Result<Vec<Entry>> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut long_name: Option<String> = None;
    let mut long_link: Option<String> = None;
    let mut header = [0u8; BLOCK];
    loop {
        match r.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && entries.is_empty() => {
                return Err(bad("empty tar archive"));
            }
            Err(e) => return Err(e),
        }
        if header.iter().all(|&b| b == 0) {
            break; // end of archive
        }
        let stored = octal(&header[148..156]).ok_or_else(|| bad("bad header checksum field"))?;
        let sum: u64 = header
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        if sum != stored {
            return Err(bad("tar header checksum mismatch"));
        }
        let size = octal(&header[124..136]).ok_or_else(|| bad("bad size field"))?;
        let mode = octal(&header[100..108]).ok_or_else(|| bad("bad mode field"))? as u32;
        let typeflag = header[156];
        match typeflag {
            b'L' => {
                long_name = Some(cstr(&read_padded(r, size)?));
                continue;
            }
            b'K' => {
                long_link = Some(cstr(&read_padded(r, size)?));
                continue;
            }
            b'x' => {
                let (p, l) = pax_records(&read_padded(r, size)?);
                long_name = p.or(long_name);
                long_link = l.or(long_link);
                continue;
            }
            b'g' => {
                read_padded(r, size)?;
                continue;
            }
            _ => {}
        }
        let mut name = cstr(&header[0..100]);
        if &header[257..263] == b"ustar\0" {
            let prefix = cstr(&header[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        let path = normalize(&long_name.take().unwrap_or(name));
        let link = long_link.take().unwrap_or_else(|| cstr(&header[157..257]));
        let has_data = matches!(typeflag, b'0' | 0 | b'7');
        let wanted = !path.is_empty() && keep(&path);
        if has_data && !wanted {
            let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
            skip(
                r,
                usize::try_from(padded).map_err(|_| bad("entry too large"))?,
            )?;
            continue;
        }
        let node = match typeflag {
            b'0' | 0 | b'7' => Node::File {
                mode: mode & 0o7777,
                data: read_padded(r, size)?,
            },
            b'5' => Node::Dir,
            b'2' => Node::Symlink(link),
            b'1' => {
                let target = normalize(&link);
                match entries.iter().rev().find(|e| e.path == target) {
                    Some(Entry {
                        node: Node::File { mode, data },
                        ..
                    }) => Node::File {
                        mode: *mode,
                        data: data.clone(),
                    },
                    _ => {
                        log::debug!("skipping hard link {path} to an entry that was not kept");
                        continue;
                    }
                }
            }
            other => {
                if wanted {
                    log::warn!(
                        "skipping special file {path} (tar type {:?})",
                        char::from(other)
                    );
                }
                continue;
            }
        };
        if wanted {
            entries.push(Entry { path, node });
        }
    }
    Ok(entries)
}

/// The entries of a `.deb`'s data archive for which `keep(path)` is true.
pub(crate) fn read_deb(deb: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Vec<Entry>, Error> {
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("--fsys-tarfile").arg(deb);
    run_streaming(&mut cmd, &mut |out| {
        read_tar(out, keep)
            .map_err(|e| Error::io(format!("reading the data of {}", deb.display()), e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tar with GNU tar in the given format and parses it back.
    fn round_trip(format: &str) {
        let dir =
            std::env::temp_dir().join(format!("guest-images-tar-{}-{format}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let long_dir = format!("usr/lib/modules/{}/kernel", "x".repeat(90));
        std::fs::create_dir_all(dir.join(&long_dir)).unwrap();
        std::fs::write(dir.join(&long_dir).join("a-module.ko.xz"), b"module data").unwrap();
        std::fs::write(dir.join("usr/big"), vec![7u8; 1300]).unwrap();
        std::fs::write(dir.join("usr/skipped"), vec![1u8; 700]).unwrap();
        std::os::unix::fs::symlink(
            format!("{long_dir}/{}", "y".repeat(120)),
            dir.join("usr/link"),
        )
        .unwrap();
        std::fs::hard_link(dir.join("usr/big"), dir.join("usr/big-hardlink")).unwrap();
        let out = Command::new("tar")
            .arg(format!("--format={format}"))
            .args(["--sort=name", "-C"])
            .arg(&dir)
            .args(["-cf", "-", "./"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(&dir);
        let entries = read_tar(&mut out.stdout.as_slice(), &|p| p != "usr/skipped").unwrap();
        let get = |p: &str| entries.iter().find(|e| e.path == p).map(|e| &e.node);
        assert_eq!(get("usr"), Some(&Node::Dir), "{format}");
        assert!(get("usr/skipped").is_none());
        let Some(Node::File { data, .. }) = get(&format!("{long_dir}/a-module.ko.xz")) else {
            panic!("{format}: long file name lost: {entries:?}");
        };
        assert_eq!(data, b"module data");
        let Some(Node::File { data, .. }) = get("usr/big") else {
            panic!()
        };
        assert_eq!(data.len(), 1300);
        let Some(Node::File { data, .. }) = get("usr/big-hardlink") else {
            panic!("{format}")
        };
        assert_eq!(data.len(), 1300);
        assert_eq!(
            get("usr/link"),
            Some(&Node::Symlink(format!("{long_dir}/{}", "y".repeat(120))))
        );
    }

    #[test]
    fn gnu_tar() {
        round_trip("gnu");
    }

    #[test]
    fn pax_tar() {
        round_trip("pax");
    }

    #[test]
    fn corrupt_header() {
        let mut block = vec![0u8; 1024];
        block[0] = b'a';
        block[148..156].copy_from_slice(b"0000000\0");
        assert!(read_tar(&mut block.as_slice(), &|_| true).is_err());
    }
}
