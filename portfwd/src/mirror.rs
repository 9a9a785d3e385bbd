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
//! end in `\n` is a torn write (the daemon died mid-append) and is ignored.
//! Compaction (at startup and at every sync) writes the live mappings to
//! `mirror.tmp`, fsyncs it, renames it over `mirror` and fsyncs the
//! directory, so a crash at any point leaves either the old or the new file.
//!
//! ## Replay never installs what today's daemon would refuse
//!
//! A mirror file is not trusted more than a request. [`replay`] checks
//! what it rebuilt against today's [`Policy`] and *quarantines* what fails:
//! not installed, reported in [`Replay::quarantined`] (the daemon logs one
//! line per mapping: what and why), and gone from the file at the next
//! compaction (which runs right after the replay at startup).
//!
//! * **Policy** (checked on the replayed table, so a record that a later
//!   record replaced or deleted is not judged): the client (private IP)
//!   inside today's `--private`, the public port inside today's `--ports`,
//!   private and probe ports not 0, at most `--quota` mappings per client
//!   (the lowest public ports are kept, TCP before UDP).
//! * **Conflict**: an `A` record for a public port that another client
//!   holds (no `D` in between) is something the daemon never writes (it
//!   refuses such a request). Neither the record's mapping nor the ones it
//!   would displace are installed.
//! * **Corrupt record** (a complete line whose checksum or syntax is
//!   wrong): its fields cannot be trusted, not even its kind or port, so it
//!   may have been the `D` (or the moving `A`) of *any* mapping replayed
//!   before it. The safe reading is that it removed them all: every mapping
//!   live at that point of the replay is quarantined ("a corrupt record may
//!   have removed it"), and the records after it are replayed normally. A
//!   flipped byte therefore never resurrects a deleted mapping; what it
//!   costs is that live clients' mappings from before it are dropped until
//!   the clients ask again (the shim checks its mappings periodically and
//!   forwards lost ones again, with the same public port). Probing the
//!   candidates before installing them was rejected: a socket deleted
//!   because it became active (`connect()`) still answers probes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use gcb_proto::Transport;
use ipnet::Ipv4Net;

use crate::policy::{Policy, PortRange};
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

/// Why a replayed mapping is not installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The corrupt record at this line (1-based) may have removed it.
    Corrupt {
        /// Line of the corrupt record.
        line: usize,
    },
    /// The client is outside today's `--private`.
    Private(Ipv4Net),
    /// The public port is outside today's `--ports`.
    Ports(PortRange),
    /// Private or probe port 0 (never handed out).
    PortZero,
    /// The client has more than `--quota` mappings.
    Quota(usize),
    /// The record at this line gave a port held by one client to another.
    Conflict {
        /// Line of the conflicting record.
        line: usize,
    },
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Corrupt { line } => {
                write!(f, "the corrupt record at line {line} may have removed it")
            }
            Why::Private(c) => write!(f, "client outside --private {c}"),
            Why::Ports(r) => write!(f, "public port outside --ports {r}"),
            Why::PortZero => write!(f, "private or probe port 0"),
            Why::Quota(q) => write!(f, "client over --quota {q}"),
            Why::Conflict { line } => write!(
                f,
                "the record at line {line} gives a port held by one client to another"
            ),
        }
    }
}

/// A mapping the replay did not install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quarantined {
    /// Line (1-based) of the record that set the mapping.
    pub line: usize,
    /// Its public port.
    pub key: Key,
    /// What it forwarded to.
    pub entry: Entry,
    /// Why it is not installed.
    pub why: Why,
}

impl fmt::Display for Quarantined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mirror line {}: {}/{} -> {} (probe port {}) quarantined, not installed: {}",
            self.line,
            self.key.1,
            t_name(self.key.0),
            self.entry.private,
            self.entry.probe_port,
            self.why
        )
    }
}

/// What a replay found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// Valid records applied.
    pub records: usize,
    /// Complete lines skipped (bad checksum or syntax).
    pub bad: usize,
    /// Their line numbers (1-based).
    pub corrupt_lines: Vec<usize>,
    /// Bytes of a torn last record (no final newline), ignored.
    pub torn_bytes: usize,
    /// Mappings not installed (module docs), in the order found.
    pub quarantined: Vec<Quarantined>,
}

impl Replay {
    /// Logs one line per corrupt record and one per quarantined mapping.
    pub fn log(&self) {
        for line in &self.corrupt_lines {
            let dropped = self
                .quarantined
                .iter()
                .filter(|q| q.why == Why::Corrupt { line: *line })
                .count();
            tracing::warn!(
                "mirror line {line}: corrupt record (bad checksum or syntax) skipped; \
                 the {dropped} mappings replayed before it are not installed (it may have removed them)"
            );
        }
        for q in &self.quarantined {
            tracing::warn!("{q}");
        }
        if self.torn_bytes > 0 {
            tracing::info!(
                "mirror: {} bytes of a torn last record ignored (the daemon died mid-append)",
                self.torn_bytes
            );
        }
    }
}

/// Replays mirror-file contents into a table, under `policy` (module docs).
pub fn replay(bytes: &[u8], policy: &Policy) -> (Table, Replay) {
    let mut table = Table::new();
    let mut rep = Replay::default();
    // The line of the record that set each live mapping.
    let mut set_at: HashMap<Key, usize> = HashMap::new();
    let mut rest = bytes;
    let mut lineno = 0;
    while !rest.is_empty() {
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            rep.torn_bytes = rest.len();
            break;
        };
        lineno += 1;
        let line = &rest[..nl];
        rest = &rest[nl + 1..];
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        match std::str::from_utf8(line).ok().and_then(Record::decode) {
            Some(Record::Add(k, e)) => {
                rep.records += 1;
                let held_by_other = table.get(k).is_some_and(|old| old.owner() != e.owner());
                let displaced = table.insert(k, e);
                if held_by_other {
                    // Not a history the daemon writes: trust neither side.
                    table.remove(k);
                    let why = Why::Conflict { line: lineno };
                    for (dk, de) in displaced {
                        rep.quarantined.push(Quarantined {
                            line: set_at.remove(&dk).unwrap_or(0),
                            key: dk,
                            entry: de,
                            why,
                        });
                    }
                    rep.quarantined.push(Quarantined {
                        line: lineno,
                        key: k,
                        entry: e,
                        why,
                    });
                    set_at.remove(&k);
                } else {
                    for (dk, _) in displaced {
                        set_at.remove(&dk);
                    }
                    set_at.insert(k, lineno);
                }
            }
            Some(Record::Del(k)) => {
                rep.records += 1;
                table.remove(k);
                set_at.remove(&k);
            }
            None => {
                rep.bad += 1;
                rep.corrupt_lines.push(lineno);
                let why = Why::Corrupt { line: lineno };
                let live: Vec<(Key, Entry)> = table.iter().map(|(k, e)| (k, *e)).collect();
                for (k, e) in live {
                    table.remove(k);
                    rep.quarantined.push(Quarantined {
                        line: set_at.remove(&k).unwrap_or(0),
                        key: k,
                        entry: e,
                        why,
                    });
                }
            }
        }
    }
    // Today's policy, on what the history left.
    let mut per_client: BTreeMap<std::net::Ipv4Addr, usize> = BTreeMap::new();
    let live: Vec<(Key, Entry)> = table.iter().map(|(k, e)| (k, *e)).collect();
    for (k, e) in live {
        let why = if !policy.private.contains(&e.owner()) {
            Some(Why::Private(policy.private))
        } else if !policy.ports.contains(k.1) {
            Some(Why::Ports(policy.ports))
        } else if e.private.port() == 0 || e.probe_port == 0 {
            Some(Why::PortZero)
        } else {
            let n = per_client.entry(e.owner()).or_default();
            *n += 1;
            (*n > policy.quota).then_some(Why::Quota(policy.quota))
        };
        if let Some(why) = why {
            table.remove(k);
            rep.quarantined.push(Quarantined {
                line: set_at.get(&k).copied().unwrap_or(0),
                key: k,
                entry: e,
                why,
            });
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
    policy: Policy,
    file: File,
    len: u64,
    /// Unit tests: make the next appends fail.
    #[cfg(test)]
    pub fail_appends: bool,
}

impl Mirror {
    /// Opens (or creates) the mirror in `dir`, replays it under `policy`
    /// (also every later [`Mirror::read`]), and compacts it: quarantined
    /// records are gone from the file.
    pub fn open(dir: &Path, policy: Policy) -> io::Result<(Mirror, Table, Replay)> {
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
        let (table, rep) = replay(&bytes, &policy);
        let mut m = Mirror {
            dir: dir.to_path_buf(),
            policy,
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

    /// Reads and replays the file as it is on disk (under the policy given
    /// at open).
    pub fn read(&self) -> io::Result<(Table, Replay)> {
        let bytes = std::fs::read(self.path())?;
        Ok(replay(&bytes, &self.policy))
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

    fn policy() -> Policy {
        Policy {
            private: "10.1.0.0/24".parse().unwrap(),
            ports: "20000-29999".parse().unwrap(),
            quota: 100,
        }
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
        let (t, rep) = replay(bytes.as_bytes(), &policy());
        assert_eq!(
            rep,
            Replay {
                records: 4,
                bad: 1,
                corrupt_lines: vec![3],
                torn_bytes: torn.len() - 5,
                // The corrupt line may have been a delete of 20000: not installed.
                quarantined: vec![Quarantined {
                    line: 2,
                    key: (Transport::Tcp, 20000),
                    entry: Entry {
                        private: "10.1.0.11:8080".parse().unwrap(),
                        probe_port: 1
                    },
                    why: Why::Corrupt { line: 3 }
                }],
            }
        );
        let keys: Vec<u16> = t.iter().map(|(k, _)| k.1).collect();
        assert_eq!(keys, vec![20003]);
    }

    /// Flips one bit of the last payload byte of `line` (its checksum no longer matches).
    fn flip(line: &str) -> String {
        let mut b = line.trim_end().as_bytes().to_vec();
        *b.last_mut().unwrap() ^= 1;
        String::from_utf8(b).unwrap() + "\n"
    }

    #[test]
    fn a_corrupt_delete_never_resurrects_its_mapping() {
        let del = Record::Del((Transport::Tcp, 20005)).encode();
        // "D tcp 20005" -> "D tcp 20004": well-formed, wrong checksum
        assert_eq!(Record::decode(flip(&del).trim_end()), None);
        let mut bytes = String::from(HEADER);
        bytes += &add(20001, "10.1.0.11:1", 1).encode();
        bytes += &add(20005, "10.1.0.11:5", 1).encode();
        bytes += &flip(&del);
        bytes += &add(20006, "10.1.0.11:6", 1).encode();
        let (t, rep) = replay(bytes.as_bytes(), &policy());
        assert!(t.get((Transport::Tcp, 20005)).is_none(), "resurrected");
        assert!(t.get((Transport::Tcp, 20001)).is_none(), "may have been it");
        assert!(
            t.get((Transport::Tcp, 20006)).is_some(),
            "after it: replayed"
        );
        assert_eq!(rep.corrupt_lines, vec![4]);
        let q: Vec<(u16, usize, Why)> = rep
            .quarantined
            .iter()
            .map(|q| (q.key.1, q.line, q.why))
            .collect();
        assert_eq!(
            q,
            vec![
                (20001, 2, Why::Corrupt { line: 4 }),
                (20005, 3, Why::Corrupt { line: 4 })
            ]
        );
        // The same for a byte flipped in the checksum, or a line of garbage.
        for bad in [format!("x{}", &del[1..]), "garbage\n".to_owned()] {
            let mut bytes = String::from(HEADER);
            bytes += &add(20005, "10.1.0.11:5", 1).encode();
            bytes += &bad;
            assert!(replay(bytes.as_bytes(), &policy()).0.is_empty(), "{bad}");
        }
    }

    #[test]
    fn replay_quarantines_what_todays_policy_refuses() {
        let p = Policy {
            private: "10.1.0.8/30".parse().unwrap(),
            ports: "20000-20049".parse().unwrap(),
            quota: 2,
        };
        let mut bytes = String::from(HEADER);
        bytes += &add(20001, "10.1.0.11:1", 1).encode(); // kept
        bytes += &add(20040, "10.1.0.12:4", 1).encode(); // client outside --private
        bytes += &add(20060, "10.1.0.11:6", 1).encode(); // port outside --ports
        bytes += &add(20045, "192.168.7.7:22", 1).encode(); // another host
        bytes += &add(20002, "10.1.0.11:2", 1).encode(); // kept (quota 2)
        bytes += &add(20003, "10.1.0.11:3", 1).encode(); // over quota
        bytes += &add(20004, "10.1.0.11:0", 1).encode(); // private port 0
        bytes += &add(20007, "10.1.0.10:7", 0).encode(); // probe port 0
                                                         // A record out of policy that a later one deleted is not judged.
        bytes += &add(20070, "10.1.0.11:70", 1).encode();
        bytes += &Record::Del((Transport::Tcp, 20070)).encode();
        let (t, rep) = replay(bytes.as_bytes(), &p);
        let kept: Vec<u16> = t.iter().map(|(k, _)| k.1).collect();
        assert_eq!(kept, vec![20001, 20002]);
        let mut q: Vec<(u16, usize, Why)> = rep
            .quarantined
            .iter()
            .map(|q| (q.key.1, q.line, q.why))
            .collect();
        q.sort_by_key(|x| x.0);
        assert_eq!(
            q,
            vec![
                (20003, 7, Why::Quota(2)),
                (20004, 8, Why::PortZero),
                (20007, 9, Why::PortZero),
                (20040, 3, Why::Private(p.private)),
                (20045, 5, Why::Private(p.private)),
                (20060, 4, Why::Ports(p.ports)),
            ]
        );
        assert_eq!((rep.records, rep.bad), (10, 0));
        let line = rep.quarantined[0].to_string();
        assert!(
            line.starts_with("mirror line ") && line.contains("quarantined"),
            "{line}"
        );
    }

    #[test]
    fn a_record_giving_another_clients_port_away_installs_neither() {
        let mut bytes = String::from(HEADER);
        bytes += &add(20001, "10.1.0.11:1", 1).encode();
        bytes += &add(20002, "10.1.0.12:2", 1).encode();
        // a2's address moved onto a1's port: never written by the daemon
        bytes += &add(20001, "10.1.0.12:2", 1).encode();
        bytes += &add(20003, "10.1.0.13:3", 1).encode();
        let (t, rep) = replay(bytes.as_bytes(), &policy());
        let kept: Vec<u16> = t.iter().map(|(k, _)| k.1).collect();
        assert_eq!(kept, vec![20003]);
        assert!(rep
            .quarantined
            .iter()
            .all(|q| q.why == Why::Conflict { line: 4 }));
        assert_eq!(rep.quarantined.len(), 3);
        // the same client re-pointing its own port is ordinary history
        let mut bytes = String::from(HEADER);
        bytes += &add(20001, "10.1.0.11:1", 1).encode();
        bytes += &add(20001, "10.1.0.11:1", 2).encode();
        let (t, rep) = replay(bytes.as_bytes(), &policy());
        assert_eq!(t.get((Transport::Tcp, 20001)).unwrap().probe_port, 2);
        assert!(rep.quarantined.is_empty());
    }

    #[test]
    fn open_drops_quarantined_records_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, _, _) = Mirror::open(dir.path(), policy()).unwrap();
        m.append(&[add(20001, "10.1.0.11:1", 1), add(20040, "10.1.0.12:4", 1)])
            .unwrap();
        drop(m);
        let narrow = Policy {
            private: "10.1.0.8/30".parse().unwrap(),
            ..policy()
        };
        let (m, t, rep) = Mirror::open(dir.path(), narrow).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(rep.quarantined.len(), 1);
        let text = std::fs::read_to_string(m.path()).unwrap();
        assert!(!text.contains("20040"), "{text}");
        // ...so a later start with the wide policy does not bring it back
        drop(m);
        let (_, t, rep) = Mirror::open(dir.path(), policy()).unwrap();
        assert_eq!((t.len(), rep.quarantined.len()), (1, 0));
    }

    #[test]
    fn open_append_compact_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, t, rep) = Mirror::open(dir.path(), policy()).unwrap();
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
        let (m, t2, rep) = Mirror::open(dir.path(), policy()).unwrap();
        assert_eq!(rep.torn_bytes, 4);
        assert_eq!(t2, t);
        assert!(!std::fs::read_to_string(m.path()).unwrap().ends_with("0000"));
    }
}
