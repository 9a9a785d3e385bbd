//! The mirror file: the on-disk copy of the mapping table (paper 3.2.2).
//!
//! Append-only text records, one per line, each with its own CRC-32:
//!
//! ```text
//! # gcb-portfwd mirror v1
//! 1c291ca3 A tcp 20000 10.1.0.11:8080 41000
//! 5d8fa1e2 D tcp 20000
//! ```
//!
//! `A` sets a public port's mapping (private address, probe port); `D`
//! removes it. Replaying the records in order gives the mapping table. Every
//! append is `fdatasync`ed before the daemon replies. A line that does not
//! end in `\n` is a torn write (the daemon died mid-append) and is ignored;
//! a complete line whose checksum or syntax is wrong is skipped and counted.
//! Compaction (at startup and at every sync) writes the live mappings to
//! `mirror.tmp`, fsyncs it, renames it over `mirror` and fsyncs the
//! directory, so a crash at any point leaves either the old or the new file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

use gcb_proto::Transport;

use crate::table::{Entry, Key, Table};

/// File name of the mirror inside the state directory.
pub const MIRROR_FILE: &str = "mirror";
const HEADER: &str = "# gcb-portfwd mirror v1\n";

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// One mirror record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// `key` forwards to `entry` (replaces any earlier record of `key`).
    Add(Key, Entry),
    /// `key` has no mapping.
    Del(Key),
}

fn t_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
    }
}

fn t_parse(s: &str) -> Option<Transport> {
    match s {
        "tcp" => Some(Transport::Tcp),
        "udp" => Some(Transport::Udp),
        _ => None,
    }
}

impl Record {
    /// The record's line, checksum and newline included.
    pub fn encode(&self) -> String {
        let payload = match self {
            Record::Add((t, port), e) => {
                format!("A {} {port} {} {}", t_name(*t), e.private, e.probe_port)
            }
            Record::Del((t, port)) => format!("D {} {port}", t_name(*t)),
        };
        format!("{:08x} {payload}\n", crc32(payload.as_bytes()))
    }

    /// Parses one line (without its `\n`); `None` if the checksum or the
    /// syntax is wrong.
    pub fn decode(line: &str) -> Option<Record> {
        let (sum, payload) = line.split_once(' ')?;
        if sum.len() != 8 || u32::from_str_radix(sum, 16).ok()? != crc32(payload.as_bytes()) {
            return None;
        }
        let f: Vec<&str> = payload.split(' ').collect();
        match f.as_slice() {
            ["A", t, port, private, probe] => Some(Record::Add(
                (t_parse(t)?, port.parse().ok().filter(|&p| p != 0)?),
                Entry {
                    private: private.parse::<SocketAddrV4>().ok()?,
                    probe_port: probe.parse().ok()?,
                },
            )),
            ["D", t, port] => Some(Record::Del((t_parse(t)?, port.parse().ok()?))),
            _ => None,
        }
    }
}

/// What a replay found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// Valid records applied.
    pub records: usize,
    /// Complete lines skipped (bad checksum or syntax).
    pub bad: usize,
    /// Bytes of a torn last record (no final newline), ignored.
    pub torn_bytes: usize,
}

/// Replays mirror-file contents into a table.
pub fn replay(bytes: &[u8]) -> (Table, Replay) {
    let mut table = Table::new();
    let mut rep = Replay::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            rep.torn_bytes = rest.len();
            break;
        };
        let line = &rest[..nl];
        rest = &rest[nl + 1..];
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        match std::str::from_utf8(line).ok().and_then(Record::decode) {
            Some(Record::Add(k, e)) => {
                table.insert(k, e);
                rep.records += 1;
            }
            Some(Record::Del(k)) => {
                table.remove(k);
                rep.records += 1;
            }
            None => rep.bad += 1,
        }
    }
    (table, rep)
}

/// Writes `contents` to `dir/name` atomically and durably: temp file,
/// fsync, rename, fsync of the directory.
pub fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// The open mirror file.
#[derive(Debug)]
pub struct Mirror {
    dir: PathBuf,
    file: File,
    len: u64,
    /// Unit tests: make the next appends fail.
    #[cfg(test)]
    pub fail_appends: bool,
}

impl Mirror {
    /// Opens (or creates) the mirror in `dir`, replays it, and compacts it.
    pub fn open(dir: &Path) -> io::Result<(Mirror, Table, Replay)> {
        let path = dir.join(MIRROR_FILE);
        let bytes = match File::open(&path) {
            Ok(mut f) => {
                let mut b = Vec::new();
                f.read_to_end(&mut b)?;
                b
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let (table, rep) = replay(&bytes);
        let mut m = Mirror {
            dir: dir.to_path_buf(),
            file: File::open(dir)?, // replaced by compact()
            len: 0,
            #[cfg(test)]
            fail_appends: false,
        };
        m.compact(&table)?;
        Ok((m, table, rep))
    }

    /// Path of the mirror file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(MIRROR_FILE)
    }

    /// Current size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if the file holds nothing (not even the header).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `records` and fdatasyncs. On failure the file is cut back to
    /// its previous length (best effort) so no partial record stays.
    pub fn append(&mut self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        if self.fail_appends {
            return Err(io::Error::other("injected mirror failure"));
        }
        let mut buf = String::new();
        for r in records {
            buf.push_str(&r.encode());
        }
        let res = self
            .file
            .write_all(buf.as_bytes())
            .and_then(|()| self.file.sync_data());
        match res {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }

    /// Reads and replays the file as it is on disk.
    pub fn read(&self) -> io::Result<(Table, Replay)> {
        let bytes = std::fs::read(self.path())?;
        Ok(replay(&bytes))
    }

    /// Rewrites the file to hold exactly `table` (write temp, fsync, rename,
    /// fsync dir) and reopens it for appending.
    pub fn compact(&mut self, table: &Table) -> io::Result<()> {
        let mut buf = String::from(HEADER);
        for (k, e) in table.iter() {
            buf.push_str(&Record::Add(k, *e).encode());
        }
        write_atomic(&self.dir, MIRROR_FILE, buf.as_bytes())?;
        self.file = OpenOptions::new().append(true).open(self.path())?;
        self.len = buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(port: u16, private: &str, probe: u16) -> Record {
        Record::Add(
            (Transport::Tcp, port),
            Entry {
                private: private.parse().unwrap(),
                probe_port: probe,
            },
        )
    }

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn record_roundtrip_and_rejects() {
        for r in [
            add(20000, "10.1.0.11:8080", 41000),
            Record::Del((Transport::Udp, 1)),
        ] {
            let line = r.encode();
            assert!(line.ends_with('\n'));
            assert_eq!(Record::decode(line.trim_end_matches('\n')), Some(r));
        }
        let line = add(20000, "10.1.0.11:8080", 41000).encode();
        let flipped = line.replace("8080", "8081");
        assert_eq!(Record::decode(flipped.trim_end()), None, "checksum");
        assert_eq!(Record::decode("zz"), None);
        assert_eq!(Record::decode(""), None);
        let p = "A sctp 1 1.2.3.4:5 6";
        assert_eq!(
            Record::decode(&format!("{:08x} {p}", crc32(p.as_bytes()))),
            None
        );
    }

    #[test]
    fn replay_torn_tail_and_bad_checksum() {
        let mut bytes = String::from(HEADER);
        bytes += &add(20000, "10.1.0.11:8080", 1).encode();
        bytes += &add(20001, "10.1.0.11:8081", 1)
            .encode()
            .replace("8081", "9999");
        bytes += &add(20002, "10.1.0.12:80", 2).encode();
        bytes += &Record::Del((Transport::Tcp, 20002)).encode();
        bytes += &add(20003, "10.1.0.12:81", 2).encode();
        let torn = add(20004, "10.1.0.12:82", 2).encode();
        bytes += &torn[..torn.len() - 5];
        let (t, rep) = replay(bytes.as_bytes());
        assert_eq!(
            rep,
            Replay {
                records: 4,
                bad: 1,
                torn_bytes: torn.len() - 5
            }
        );
        let keys: Vec<u16> = t.iter().map(|(k, _)| k.1).collect();
        assert_eq!(keys, vec![20000, 20003]);
    }

    #[test]
    fn open_append_compact_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, t, rep) = Mirror::open(dir.path()).unwrap();
        assert!(t.is_empty());
        assert_eq!(rep, Replay::default());
        m.append(&[add(20000, "10.1.0.11:1", 1), add(20000, "10.1.0.11:2", 1)])
            .unwrap();
        m.append(&[add(20001, "10.1.0.11:3", 1)]).unwrap();
        m.append(&[Record::Del((Transport::Tcp, 20001))]).unwrap();
        let (t, rep) = m.read().unwrap();
        assert_eq!(rep.records, 4);
        assert_eq!(t.len(), 1);
        // compaction keeps exactly the live mapping
        let before = m.len();
        m.compact(&t).unwrap();
        assert!(m.len() < before);
        let text = std::fs::read_to_string(m.path()).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!dir.path().join("mirror.tmp").exists());
        // a torn tail left by a crash is ignored at open and cut by compaction
        let mut f = OpenOptions::new().append(true).open(m.path()).unwrap();
        f.write_all(b"0000").unwrap();
        drop((f, m));
        let (m, t2, rep) = Mirror::open(dir.path()).unwrap();
        assert_eq!(rep.torn_bytes, 4);
        assert_eq!(t2, t);
        assert!(!std::fs::read_to_string(m.path()).unwrap().ends_with("0000"));
    }
}
