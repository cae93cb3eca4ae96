//! Deterministic writer (and reader) for the `newc` cpio format used by Linux initramfs.
//!
//! An [`Archive`] collects entries keyed by path and serialises them sorted by path, with every
//! piece of metadata that could depend on the build host fixed: mtime 0, uid/gid 0, device
//! numbers 0, inode numbers assigned 1, 2, 3, ... in output order, regular files `nlink` 1 and
//! directories `nlink` 2. The same set of entries therefore always produces the same bytes,
//! whatever order they were added in.
//!
//! Format (one record per entry, then a `TRAILER!!!` record): the 6-byte magic `070701`, thirteen
//! 8-digit hexadecimal fields (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
//! rdevmajor, rdevminor, namesize, check), the NUL-terminated name padded with NULs so that
//! header + name is a multiple of 4 bytes, then the data padded likewise. Paths are stored
//! relative (`usr/bin/busybox`), parents before children. The output length is a multiple of 4,
//! so archives can be concatenated: the kernel unpacks every archive in an initramfs in turn.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// `S_IFMT` and the file-type bits used in the `mode` field.
pub const S_IFMT: u32 = 0o170_000;
/// Directory.
pub const S_IFDIR: u32 = 0o040_000;
/// Regular file.
pub const S_IFREG: u32 = 0o100_000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120_000;
/// Character device.
pub const S_IFCHR: u32 = 0o020_000;

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// Errors from building or parsing an archive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path is empty, contains `..`, or contains a NUL byte.
    #[error("invalid cpio path {0:?}: paths must be non-empty, without `..` or NUL bytes")]
    InvalidPath(String),
    /// A path is used as a directory by one entry and as a non-directory by another.
    #[error("cpio path {0:?} is needed as a directory but was added as another kind of entry")]
    NotADirectory(String),
    /// Parsing found something that is not a newc record.
    #[error("malformed cpio archive at byte {offset}: {reason}")]
    Malformed {
        /// Byte offset of the problem.
        offset: usize,
        /// What was wrong.
        reason: String,
    },
}

/// The content of one archive entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory with the given permission bits.
    Directory {
        /// Permission bits (e.g. `0o755`).
        perm: u32,
    },
    /// A regular file.
    File {
        /// Permission bits (e.g. `0o644`).
        perm: u32,
        /// File contents.
        data: Vec<u8>,
    },
    /// A symbolic link pointing at `target`.
    Symlink {
        /// Link target, stored as the entry's data.
        target: String,
    },
    /// A character device node.
    CharDevice {
        /// Permission bits (e.g. `0o600`).
        perm: u32,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

impl Node {
    /// The full `mode` field (type bits | permission bits).
    pub fn mode(&self) -> u32 {
        match self {
            Node::Directory { perm } => S_IFDIR | (perm & 0o7777),
            Node::File { perm, .. } => S_IFREG | (perm & 0o7777),
            Node::Symlink { .. } => S_IFLNK | 0o777,
            Node::CharDevice { perm, .. } => S_IFCHR | (perm & 0o7777),
        }
    }

    fn data(&self) -> &[u8] {
        match self {
            Node::File { data, .. } => data,
            Node::Symlink { target } => target.as_bytes(),
            Node::Directory { .. } | Node::CharDevice { .. } => &[],
        }
    }
}

/// Normalises an archive path: strips leading `/`, drops empty and `.` components.
pub fn normalize_path(path: &str) -> Result<String, Error> {
    if path.contains('\0') {
        return Err(Error::InvalidPath(path.to_string()));
    }
    let mut parts = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(Error::InvalidPath(path.to_string())),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(Error::InvalidPath(path.to_string()));
    }
    Ok(parts.join("/"))
}

/// A set of entries that serialises deterministically to a newc archive.
///
/// Adding an entry whose parent directories are missing creates them (mode 0755). Adding an
/// entry at an existing path replaces it (directories keep their children).
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Node>,
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the entry at `path`, creating missing parent directories.
    pub fn insert(&mut self, path: &str, node: Node) -> Result<&mut Self, Error> {
        let path = normalize_path(path)?;
        let mut parent = String::new();
        let comps: Vec<&str> = path.split('/').collect();
        for comp in &comps[..comps.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            match self.entries.get(&parent) {
                None => {
                    self.entries
                        .insert(parent.clone(), Node::Directory { perm: 0o755 });
                }
                Some(Node::Directory { .. }) => {}
                Some(_) => return Err(Error::NotADirectory(parent)),
            }
        }
        if let (Some(Node::Directory { .. }), false) = (
            self.entries.get(&path),
            matches!(node, Node::Directory { .. }),
        ) {
            let prefix = format!("{path}/");
            if self.entries.keys().any(|k| k.starts_with(&prefix)) {
                return Err(Error::NotADirectory(path));
            }
        }
        self.entries.insert(path, node);
        Ok(self)
    }

    /// Adds a directory.
    ///
    /// # Panics
    /// If `path` is invalid (empty, `..`, NUL) or collides with a non-directory; use
    /// [`Archive::insert`] for paths that are not program constants.
    pub fn directory(&mut self, path: &str, perm: u32) -> &mut Self {
        self.add_or_panic(path, Node::Directory { perm })
    }

    /// Adds a regular file.
    ///
    /// # Panics
    /// As [`Archive::directory`].
    pub fn file(&mut self, path: &str, perm: u32, data: impl AsRef<[u8]>) -> &mut Self {
        self.add_or_panic(
            path,
            Node::File {
                perm,
                data: data.as_ref().to_vec(),
            },
        )
    }

    /// Adds a symbolic link.
    ///
    /// # Panics
    /// As [`Archive::directory`].
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.add_or_panic(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// Adds a character device node.
    ///
    /// # Panics
    /// As [`Archive::directory`].
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.add_or_panic(path, Node::CharDevice { perm, major, minor })
    }

    fn add_or_panic(&mut self, path: &str, node: Node) -> &mut Self {
        match self.insert(path, node) {
            Ok(_) => self,
            Err(e) => panic!("{e}"),
        }
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Node> {
        normalize_path(path).ok().and_then(|p| self.entries.get(&p))
    }

    /// Number of entries (trailer excluded).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the archive has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Iterates over the entries in output order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.entries.iter().map(|(p, n)| (p.as_str(), n))
    }

    /// Writes the archive (entries sorted by path, then the trailer) and returns its length.
    pub fn write_to<W: Write>(&self, mut out: W) -> io::Result<u64> {
        let mut written = 0u64;
        for (i, (path, node)) in self.entries.iter().enumerate() {
            let ino = u32::try_from(i + 1).map_err(|_| io::Error::other("too many entries"))?;
            let nlink = if matches!(node, Node::Directory { .. }) {
                2
            } else {
                1
            };
            let (rmaj, rmin) = match node {
                Node::CharDevice { major, minor, .. } => (*major, *minor),
                _ => (0, 0),
            };
            written += write_record(
                &mut out,
                path,
                ino,
                node.mode(),
                nlink,
                rmaj,
                rmin,
                node.data(),
            )?;
        }
        written += write_record(&mut out, TRAILER, 0, 0, 1, 0, 0, &[])?;
        Ok(written)
    }

    /// The serialised archive.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut out);
        out
    }

    /// Consumes the archive and returns its bytes.
    pub fn finish(self) -> Vec<u8> {
        self.to_bytes()
    }
}

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

#[allow(clippy::too_many_arguments)]
fn write_record<W: Write>(
    out: &mut W,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdevmajor: u32,
    rdevminor: u32,
    data: &[u8],
) -> io::Result<u64> {
    let size = u32::try_from(data.len())
        .map_err(|_| io::Error::other(format!("cpio entry {name} is larger than 4 GiB")))?;
    let namesize = name.len() + 1;
    let fields: [u32; 13] = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        size,
        0, // devmajor
        0, // devminor
        rdevmajor,
        rdevminor,
        namesize as u32,
        0, // check
    ];
    let mut header = Vec::with_capacity(HEADER_LEN + namesize + 3);
    header.extend_from_slice(MAGIC);
    for f in fields {
        header.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    header.extend_from_slice(name.as_bytes());
    header.push(0);
    header.resize(header.len() + pad4(header.len()), 0);
    out.write_all(&header)?;
    out.write_all(data)?;
    let pad = pad4(data.len());
    out.write_all(&[0u8; 3][..pad])?;
    Ok((header.len() + data.len() + pad) as u64)
}

/// One record read back by [`parse`], with every header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Entry path as stored.
    pub name: String,
    /// The 13 header fields in order: ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
    /// devminor, rdevmajor, rdevminor, namesize, check.
    pub fields: [u32; 13],
    /// Entry data (file contents or symlink target).
    pub data: Vec<u8>,
}

impl Record {
    /// The `mode` field.
    pub fn mode(&self) -> u32 {
        self.fields[1]
    }
}

/// Parses one or more concatenated newc archives (NUL padding between them is skipped), strictly
/// checking the format. Trailer records are not returned.
pub fn parse(bytes: &[u8]) -> Result<Vec<Record>, Error> {
    let malformed = |offset: usize, reason: &str| Error::Malformed {
        offset,
        reason: reason.to_string(),
    };
    let mut records = Vec::new();
    let mut pos = 0;
    let mut in_archive = false;
    while pos < bytes.len() {
        if !in_archive {
            if bytes[pos] == 0 {
                pos += 1;
                continue;
            }
            if pos % 4 != 0 {
                return Err(malformed(
                    pos,
                    "archive does not start on a 4-byte boundary",
                ));
            }
        }
        let header = bytes
            .get(pos..pos + HEADER_LEN)
            .ok_or_else(|| malformed(pos, "truncated header"))?;
        if &header[..6] != MAGIC {
            return Err(malformed(pos, "bad magic (expected 070701)"));
        }
        let mut fields = [0u32; 13];
        for (i, f) in fields.iter_mut().enumerate() {
            let hex = &header[6 + 8 * i..14 + 8 * i];
            let s = std::str::from_utf8(hex).map_err(|_| malformed(pos, "non-ASCII header"))?;
            if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(malformed(pos, "header field is not 8 hex digits"));
            }
            *f = u32::from_str_radix(s, 16).map_err(|_| malformed(pos, "bad hex field"))?;
        }
        let namesize = fields[11] as usize;
        let filesize = fields[6] as usize;
        if namesize == 0 {
            return Err(malformed(pos, "namesize 0"));
        }
        let name_start = pos + HEADER_LEN;
        let name_bytes = bytes
            .get(name_start..name_start + namesize)
            .ok_or_else(|| malformed(pos, "truncated name"))?;
        if name_bytes[namesize - 1] != 0 || name_bytes[..namesize - 1].contains(&0) {
            return Err(malformed(pos, "name is not NUL-terminated exactly once"));
        }
        let name = String::from_utf8(name_bytes[..namesize - 1].to_vec())
            .map_err(|_| malformed(pos, "name is not UTF-8"))?;
        let mut data_start = name_start + namesize;
        let pad = pad4(data_start - pos);
        if bytes
            .get(data_start..data_start + pad)
            .is_none_or(|p| p.iter().any(|&b| b != 0))
        {
            return Err(malformed(data_start, "bad padding after name"));
        }
        data_start += pad;
        let data = bytes
            .get(data_start..data_start + filesize)
            .ok_or_else(|| malformed(data_start, "truncated data"))?
            .to_vec();
        let mut next = data_start + filesize;
        let pad = pad4(filesize);
        if bytes
            .get(next..next + pad)
            .is_none_or(|p| p.iter().any(|&b| b != 0))
        {
            return Err(malformed(next, "bad padding after data"));
        }
        next += pad;
        pos = next;
        if name == TRAILER {
            in_archive = false;
            continue;
        }
        in_archive = true;
        records.push(Record { name, fields, data });
    }
    if in_archive {
        return Err(malformed(bytes.len(), "missing TRAILER!!! record"));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(order: &[usize]) -> Archive {
        type Adder = Box<dyn Fn(&mut Archive)>;
        let adders: Vec<Adder> = vec![
            Box::new(|a| {
                a.file("usr/bin/busybox", 0o755, b"\x7fELF binary");
            }),
            Box::new(|a| {
                a.symlink("bin", "usr/bin");
            }),
            Box::new(|a| {
                a.directory("/etc/vmm/", 0o755);
            }),
            Box::new(|a| {
                a.file("etc/vmm/modules", 0o644, b"kvm\n");
            }),
            Box::new(|a| {
                a.char_device("dev/console", 0o600, 5, 1);
            }),
            Box::new(|a| {
                a.file("init", 0o755, b"#!/bin/sh\n");
            }),
            Box::new(|a| {
                a.directory("tmp", 0o1777);
            }),
        ];
        let mut a = Archive::new();
        for &i in order {
            adders[i](&mut a);
        }
        a
    }

    #[test]
    fn output_is_independent_of_insertion_order() {
        let a = sample(&[0, 1, 2, 3, 4, 5, 6]).to_bytes();
        let b = sample(&[6, 5, 4, 3, 2, 1, 0]).to_bytes();
        let c = sample(&[3, 0, 6, 2, 5, 1, 4]).to_bytes();
        assert_eq!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn records_follow_the_newc_spec() {
        let bytes = sample(&[0, 1, 2, 3, 4, 5, 6]).to_bytes();
        assert_eq!(bytes.len() % 4, 0);
        let recs = parse(&bytes).unwrap();
        let names: Vec<&str> = recs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "dev",
                "dev/console",
                "etc",
                "etc/vmm",
                "etc/vmm/modules",
                "init",
                "tmp",
                "usr",
                "usr/bin",
                "usr/bin/busybox"
            ]
        );
        for (i, r) in recs.iter().enumerate() {
            let f = r.fields;
            assert_eq!(f[0] as usize, i + 1, "inode numbers in order");
            assert_eq!((f[2], f[3]), (0, 0), "uid/gid");
            assert_eq!(f[5], 0, "mtime");
            assert_eq!((f[7], f[8]), (0, 0), "dev numbers");
            assert_eq!(f[6] as usize, r.data.len());
            assert_eq!(f[11] as usize, r.name.len() + 1);
            assert_eq!(f[12], 0, "check");
        }
        let get = |n: &str| recs.iter().find(|r| r.name == n).unwrap();
        assert_eq!(get("bin").mode(), S_IFLNK | 0o777);
        assert_eq!(get("bin").data, b"usr/bin");
        assert_eq!(get("usr").mode(), S_IFDIR | 0o755);
        assert_eq!(get("usr").fields[4], 2);
        assert_eq!(get("tmp").mode(), S_IFDIR | 0o1777);
        assert_eq!(get("init").mode(), S_IFREG | 0o755);
        assert_eq!(get("init").fields[4], 1);
        let con = get("dev/console");
        assert_eq!(con.mode(), S_IFCHR | 0o600);
        assert_eq!((con.fields[9], con.fields[10]), (5, 1));
        // First header byte-for-byte: "bin" symlink, ino 1.
        let expected = "070701\
            00000001\
            0000A1FF\
            00000000\
            00000000\
            00000001\
            00000000\
            00000007\
            00000000\
            00000000\
            00000000\
            00000000\
            00000004\
            00000000";
        assert_eq!(&bytes[..110], expected.as_bytes());
        assert_eq!(&bytes[110..116], b"bin\0\0\0"); // 110 + 4 = 114, padded to 116
        assert_eq!(&bytes[116..124], b"usr/bin\0"); // data 7 bytes + 1 pad
        // The archive ends with the trailer record.
        let tail = &bytes[bytes.len() - 124..];
        assert_eq!(&tail[..6], b"070701");
        assert_eq!(&tail[110..121], b"TRAILER!!!\0");
    }

    #[test]
    fn concatenated_archives_parse() {
        let mut bytes = sample(&[0, 1]).to_bytes();
        bytes.extend_from_slice(&[0; 8]);
        let mut extra = Archive::new();
        extra
            .directory("vmm", 0o755)
            .file("vmm/args", 0o644, b"set -- 'true'\n");
        bytes.extend(extra.finish());
        let names: Vec<String> = parse(&bytes).unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(
            names,
            [
                "bin",
                "usr",
                "usr/bin",
                "usr/bin/busybox",
                "vmm",
                "vmm/args"
            ]
        );
    }

    #[test]
    fn parser_rejects_corruption() {
        let bytes = sample(&[0]).to_bytes();
        assert!(parse(&bytes[..bytes.len() - 4]).is_err());
        let mut bad = bytes.clone();
        bad[0] = b'1';
        assert!(parse(&bad).is_err());
        let mut bad = bytes;
        bad[7] = b'g';
        assert!(parse(&bad).is_err());
    }

    #[test]
    fn paths_are_validated_and_normalized() {
        assert_eq!(normalize_path("/a//b/./c/").unwrap(), "a/b/c");
        assert!(normalize_path("a/../b").is_err());
        assert!(normalize_path("/").is_err());
        assert!(normalize_path("a\0b").is_err());
        let mut a = Archive::new();
        a.file("f", 0o644, b"x");
        assert!(matches!(
            a.insert("f/g", Node::Directory { perm: 0o755 }),
            Err(Error::NotADirectory(_))
        ));
        a.directory("d", 0o700).file("d/x", 0o644, b"");
        assert!(
            a.insert(
                "d",
                Node::File {
                    perm: 0o644,
                    data: vec![]
                }
            )
            .is_err()
        );
        // Re-adding a directory keeps its children and updates its mode.
        a.directory("d", 0o755);
        assert_eq!(a.get("d"), Some(&Node::Directory { perm: 0o755 }));
        assert!(a.get("d/x").is_some());
    }

    #[test]
    fn gnu_cpio_lists_the_archive() {
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-i", "-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("cpio(1) not installed; skipping cross-check");
            return;
        };
        let bytes = sample(&[0, 1, 2, 3, 4, 5, 6]).to_bytes();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed = String::from_utf8(out.stdout).unwrap();
        assert_eq!(listed.lines().count(), 11);
        assert!(listed.lines().any(|l| l == "usr/bin/busybox"));
    }
}
