//! `GCB_INHERIT`: what an exec'ing image hands to the new image, the whole format in one
//! place (floor 0: it only formats and parses). The GCB client writes and adopts its
//! entries in [`crate::gcb::client`] and [`crate::gcb::udp`], the DPF client its own in
//! [`crate::dpf`]; each layer adopts its keys and skips the other's.
//!
//! The value is `v1;` then `;`-separated `key=fields` entries, fields separated by `:`.
//!
//! GCB's keys:
//! * `ctl=FD:INO` — a registration channel (UDP socket connected to the broker);
//! * `mbox=TXFD:TXINO:RXFD:RXINO` — the family's mailbox socketpair;
//! * `reg=FD:INO:PROXYIP:PORT:LOCALIP:PORT:LISTENIP:PORT:CTLFD` — a registered TCP
//!   listener;
//! * `udp=FD:INO:PROXYIP:PORT:LOCALIP:PORT:CTLFD:TOKEN` — a registered UDP socket, with
//!   its Dummy token (32 lowercase hex characters derived from the registration token,
//!   which the new image's keepalives carry);
//! * `own=t|u:PROXYIP:PORT:PROOF` — the ownership proof of the TCP (`t`) or UDP (`u`)
//!   registration at that proxy (32 lowercase hex, [`gcb_proto::token`]), which the new
//!   image's `unregister` and `register{previous_proxy}` carry;
//! * `hb=MS` — the heartbeat interval the exec'ing image used (fitted to the broker's
//!   lease, which the new image has not seen);
//! * `udpq=FD:INO` — a UDP socket bound to port 0 that has not registered yet
//!   ([`crate::sockstate::SockState::UdpPending`]).
//!
//! DPF's keys:
//! * `dpf=FD:INO:tcp|udp:PRIVIP:PORT:PUBIP:PORT:PROBEFD:PROBEINO` — a forwarded socket and
//!   its probe socket;
//! * `dpfq=FD:INO:tcp|udp` — a socket bound to port 0 not forwarded yet.
//!
//! The adopting image checks every fd against its inode (the fd must still be that
//! socket) before it trusts an entry. A malformed entry is reported (one line each, by the
//! layer that owns its key, never with a token) and skipped, never a panic.

use gcb_proto::{udp, Transport};
use libc::c_int;
use std::net::SocketAddrV4;
use std::time::Duration;

/// The version prefix of the value.
pub const VERSION: &str = "v1";

/// Shortest and longest heartbeat interval accepted from `hb=` (the same floor as
/// `GCB_HEARTBEAT_MS`; an hour is far beyond any lease).
const HB_MIN_MS: u64 = 50;
const HB_MAX_MS: u64 = 3_600_000;

/// A registered UDP socket handed over (`udp=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpEntry {
    pub fd: c_int,
    pub ino: u64,
    pub proxy: SocketAddrV4,
    pub local: SocketAddrV4,
    /// The registration channel it is registered on.
    pub ctl: c_int,
    pub token: Vec<u8>,
}

/// One GCB entry of `GCB_INHERIT`, parsed (fds not yet checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Ctl {
        fd: c_int,
        ino: u64,
    },
    Mbox {
        tx: c_int,
        tx_ino: u64,
        rx: c_int,
        rx_ino: u64,
    },
    Reg {
        fd: c_int,
        ino: u64,
        proxy: SocketAddrV4,
        local: SocketAddrV4,
        listen_at: SocketAddrV4,
        ctl: c_int,
    },
    Udp(UdpEntry),
    /// An ownership proof (`own=`).
    Own {
        transport: gcb_proto::Transport,
        proxy: SocketAddrV4,
        proof: String,
    },
    Heartbeat(Duration),
    /// A UDP socket bound to port 0, not registered yet (`udpq=`).
    UdpPending {
        fd: c_int,
        ino: u64,
    },
    /// A socket DPF forwards, with its probe socket (`dpf=`).
    Dpf {
        fd: c_int,
        ino: u64,
        transport: Transport,
        private: SocketAddrV4,
        public: SocketAddrV4,
        probe: c_int,
        probe_ino: u64,
    },
    /// A socket bound to port 0 that DPF forwards when it is asked for (`dpfq=`).
    DpfPending {
        fd: c_int,
        ino: u64,
        transport: Transport,
    },
}

/// Which layer owns an entry's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Gcb,
    Dpf,
}

/// The layer that owns `key` (None: nobody's).
pub fn owner(key: &str) -> Option<Owner> {
    match key {
        "ctl" | "mbox" | "reg" | "udp" | "own" | "hb" | "udpq" => Some(Owner::Gcb),
        "dpf" | "dpfq" => Some(Owner::Dpf),
        _ => None,
    }
}

/// A malformed entry: its key and what is wrong (never quotes a token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// The key, if the entry had one.
    pub key: Option<String>,
    pub why: String,
}

impl Malformed {
    /// Should the layer `me` report it? (Each report comes from one layer only.)
    pub fn reported_by(&self, me: Owner) -> bool {
        match &self.key {
            Some(k) => owner(k) == Some(me),
            // Not even a key: the GCB client says so when it runs, else DPF.
            None => me == Owner::Gcb,
        }
    }
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
    }
}

impl Entry {
    /// The entry as it appears in `GCB_INHERIT`.
    pub fn format(&self) -> String {
        match self {
            Entry::Ctl { fd, ino } => format!("ctl={fd}:{ino}"),
            Entry::Mbox {
                tx,
                tx_ino,
                rx,
                rx_ino,
            } => format!("mbox={tx}:{tx_ino}:{rx}:{rx_ino}"),
            Entry::Reg {
                fd,
                ino,
                proxy,
                local,
                listen_at,
                ctl,
            } => format!("reg={fd}:{ino}:{proxy}:{local}:{listen_at}:{ctl}"),
            Entry::Udp(u) => format!(
                "udp={}:{}:{}:{}:{}:{}",
                u.fd,
                u.ino,
                u.proxy,
                u.local,
                u.ctl,
                // A token is ASCII hex (checked when parsed; the broker sends no other).
                String::from_utf8_lossy(&u.token)
            ),
            Entry::Own {
                transport,
                proxy,
                proof,
            } => {
                let t = match transport {
                    gcb_proto::Transport::Tcp => 't',
                    gcb_proto::Transport::Udp => 'u',
                };
                format!("own={t}:{proxy}:{proof}")
            }
            Entry::Heartbeat(d) => format!("hb={}", d.as_millis()),
            Entry::UdpPending { fd, ino } => format!("udpq={fd}:{ino}"),
            Entry::Dpf {
                fd,
                ino,
                transport,
                private,
                public,
                probe,
                probe_ino,
            } => format!(
                "dpf={fd}:{ino}:{}:{private}:{public}:{probe}:{probe_ino}",
                transport_name(*transport)
            ),
            Entry::DpfPending { fd, ino, transport } => {
                format!("dpfq={fd}:{ino}:{}", transport_name(*transport))
            }
        }
    }
}

/// Fields of one entry, read left to right.
struct Fields<'a> {
    it: std::str::Split<'a, char>,
    n: usize,
}

impl<'a> Fields<'a> {
    fn new(v: &'a str) -> Self {
        Fields {
            it: v.split(':'),
            n: 0,
        }
    }

    fn next(&mut self) -> Result<&'a str, String> {
        self.n += 1;
        self.it
            .next()
            .ok_or_else(|| format!("field {} missing", self.n))
    }

    fn fd(&mut self) -> Result<c_int, String> {
        let s = self.next()?;
        s.parse::<c_int>()
            .ok()
            .filter(|&fd| fd >= 0)
            .ok_or_else(|| format!("field {}: not an fd", self.n))
    }

    /// An inode: 0 means "unknown" to the writer, which no fd can be checked against.
    fn ino(&mut self) -> Result<u64, String> {
        let s = self.next()?;
        s.parse::<u64>()
            .ok()
            .filter(|&i| i != 0)
            .ok_or_else(|| format!("field {}: not an inode", self.n))
    }

    fn addr(&mut self) -> Result<SocketAddrV4, String> {
        let ip = self.next()?;
        let port = self.next()?;
        let n = self.n;
        Ok(SocketAddrV4::new(
            ip.parse()
                .map_err(|_| format!("field {}: not an IPv4", n - 1))?,
            port.parse().map_err(|_| format!("field {n}: not a port"))?,
        ))
    }

    fn transport(&mut self) -> Result<Transport, String> {
        match self.next()? {
            "tcp" => Ok(Transport::Tcp),
            "udp" => Ok(Transport::Udp),
            _ => Err(format!("field {}: not tcp or udp", self.n)),
        }
    }

    fn end(mut self) -> Result<(), String> {
        match self.it.next() {
            None => Ok(()),
            Some(_) => Err(format!("more than {} fields", self.n)),
        }
    }
}

/// Parse one entry; `Ok(None)` for a key nobody owns.
fn parse_entry(key: &str, v: &str) -> Result<Option<Entry>, String> {
    let mut f = Fields::new(v);
    let e = match key {
        "ctl" => Entry::Ctl {
            fd: f.fd()?,
            ino: f.ino()?,
        },
        "mbox" => Entry::Mbox {
            tx: f.fd()?,
            tx_ino: f.ino()?,
            rx: f.fd()?,
            rx_ino: f.ino()?,
        },
        "reg" => Entry::Reg {
            fd: f.fd()?,
            ino: f.ino()?,
            proxy: f.addr()?,
            local: f.addr()?,
            listen_at: f.addr()?,
            ctl: f.fd()?,
        },
        "udp" => {
            let (fd, ino, proxy, local, ctl) = (f.fd()?, f.ino()?, f.addr()?, f.addr()?, f.fd()?);
            let token = f.next()?.as_bytes().to_vec();
            if !udp::is_token(&token) {
                return Err(format!("field {}: not a registration token", f.n));
            }
            Entry::Udp(UdpEntry {
                fd,
                ino,
                proxy,
                local,
                ctl,
                token,
            })
        }
        "own" => {
            let transport = match f.next()? {
                "t" => gcb_proto::Transport::Tcp,
                "u" => gcb_proto::Transport::Udp,
                _ => return Err("field 1: not t or u".into()),
            };
            let proxy = f.addr()?;
            let proof = f.next()?;
            if gcb_proto::token::from_hex(proof).is_none() {
                return Err(format!("field {}: not an ownership proof", f.n));
            }
            Entry::Own {
                transport,
                proxy,
                proof: proof.to_owned(),
            }
        }
        "hb" => {
            let ms = f
                .next()?
                .parse::<u64>()
                .ok()
                .filter(|ms| (HB_MIN_MS..=HB_MAX_MS).contains(ms))
                .ok_or("not a heartbeat interval in ms")?;
            Entry::Heartbeat(Duration::from_millis(ms))
        }
        "udpq" => Entry::UdpPending {
            fd: f.fd()?,
            ino: f.ino()?,
        },
        "dpf" => Entry::Dpf {
            fd: f.fd()?,
            ino: f.ino()?,
            transport: f.transport()?,
            private: f.addr()?,
            public: f.addr()?,
            probe: f.fd()?,
            probe_ino: f.ino()?,
        },
        "dpfq" => Entry::DpfPending {
            fd: f.fd()?,
            ino: f.ino()?,
            transport: f.transport()?,
        },
        _ => return Ok(None),
    };
    f.end()?;
    Ok(Some(e))
}

/// Parse a `GCB_INHERIT` value: its entries, and one complaint per malformed entry (for
/// the log of the layer that owns its key; tokens are never quoted).
pub fn parse(spec: &str) -> (Vec<Entry>, Vec<Malformed>) {
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    let mut parts = spec.split(';');
    if parts.next() != Some(VERSION) {
        bad.push(Malformed {
            key: None,
            why: format!("not a {VERSION} value; nothing adopted"),
        });
        return (entries, bad);
    }
    for (i, p) in parts.enumerate() {
        let Some((key, v)) = p.split_once('=') else {
            bad.push(Malformed {
                key: None,
                why: format!("entry {}: no key=", i + 1),
            });
            continue;
        };
        match parse_entry(key, v) {
            Ok(Some(e)) => entries.push(e),
            Ok(None) => {}
            Err(why) => bad.push(Malformed {
                key: Some(key.to_owned()),
                why: format!("{key}= entry {}: {why}", i + 1),
            }),
        }
    }
    (entries, bad)
}

/// `spec` for a log line: registration tokens cut out (a token lets its holder move the
/// registration's data address).
pub fn redacted(spec: &str) -> String {
    spec.split(';')
        .map(|p| {
            for key in ["udp=", "own="] {
                if let Some(v) = p.strip_prefix(key) {
                    return match v.rsplit_once(':') {
                        Some((head, _)) => format!("{key}{head}:<token>"),
                        None => format!("{key}<token>"),
                    };
                }
            }
            p.to_owned()
        })
        .collect::<Vec<_>>()
        .join(";")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn udp_entry() -> Entry {
        Entry::Udp(UdpEntry {
            fd: 3,
            ino: 3098124,
            proxy: a("203.0.113.10:33865"),
            local: a("10.1.0.11:9300"),
            ctl: 515,
            token: TOKEN.as_bytes().to_vec(),
        })
    }

    #[test]
    fn every_entry_round_trips() {
        let all = vec![
            Entry::Ctl { fd: 515, ino: 7 },
            Entry::Mbox {
                tx: 513,
                tx_ino: 8,
                rx: 514,
                rx_ino: 9,
            },
            Entry::Reg {
                fd: 4,
                ino: 10,
                proxy: a("203.0.113.10:40000"),
                local: a("10.1.0.11:9000"),
                listen_at: a("10.1.0.11:9000"),
                ctl: 515,
            },
            udp_entry(),
            Entry::Heartbeat(Duration::from_millis(500)),
            Entry::UdpPending { fd: 6, ino: 11 },
            Entry::Dpf {
                fd: 7,
                ino: 12,
                transport: Transport::Tcp,
                private: a("10.1.0.11:8080"),
                public: a("203.0.113.1:20001"),
                probe: 516,
                probe_ino: 13,
            },
            Entry::DpfPending {
                fd: 8,
                ino: 14,
                transport: Transport::Udp,
            },
        ];
        let spec = std::iter::once(VERSION.to_owned())
            .chain(all.iter().map(Entry::format))
            .collect::<Vec<_>>()
            .join(";");
        assert_eq!(
            spec,
            format!(
                "v1;ctl=515:7;mbox=513:8:514:9;\
                 reg=4:10:203.0.113.10:40000:10.1.0.11:9000:10.1.0.11:9000:515;\
                 udp=3:3098124:203.0.113.10:33865:10.1.0.11:9300:515:{TOKEN};hb=500;\
                 udpq=6:11;dpf=7:12:tcp:10.1.0.11:8080:203.0.113.1:20001:516:13;dpfq=8:14:udp"
            )
        );
        assert_eq!(parse(&spec), (all, vec![]));
    }

    #[test]
    fn unknown_keys_are_skipped_and_each_complaint_has_one_reporter() {
        let spec = format!(
            "v1;future=1:2;{};dpf=3:1:sctp:10.1.0.11:1:203.0.113.1:1:9:2;udpq=x:1;nokey",
            udp_entry().format()
        );
        let (entries, bad) = parse(&spec);
        assert_eq!(entries, vec![udp_entry()]);
        assert_eq!(bad.len(), 3, "{bad:?}");
        let by = |o| bad.iter().filter(|m| m.reported_by(o)).count();
        assert_eq!((by(Owner::Gcb), by(Owner::Dpf)), (2, 1), "{bad:?}");
    }

    #[test]
    fn malformed_udp_entries_are_reported_once_each_and_skipped() {
        let good = udp_entry().format();
        let bad = [
            // Too few fields, too many, empty.
            "udp=3:3098124:203.0.113.10:33865:10.1.0.11:9300:515".to_owned(),
            format!("{good}:extra"),
            "udp=".to_owned(),
            // Bad fd, inode 0, bad IP, port out of range, negative ctl fd.
            format!("udp=x:1:203.0.113.10:1:10.1.0.11:1:5:{TOKEN}"),
            format!("udp=3:0:203.0.113.10:1:10.1.0.11:1:5:{TOKEN}"),
            format!("udp=3:1:203.0.113:1:10.1.0.11:1:5:{TOKEN}"),
            format!("udp=3:1:203.0.113.10:70000:10.1.0.11:1:5:{TOKEN}"),
            format!("udp=3:1:203.0.113.10:1:10.1.0.11:1:-5:{TOKEN}"),
            // Tokens: short, upper case, not hex, non-ASCII.
            "udp=3:1:203.0.113.10:1:10.1.0.11:1:5:0123".to_owned(),
            format!(
                "udp=3:1:203.0.113.10:1:10.1.0.11:1:5:{}",
                TOKEN.to_uppercase()
            ),
            format!("udp=3:1:203.0.113.10:1:10.1.0.11:1:5:{}", "g".repeat(32)),
            format!("udp=3:1:203.0.113.10:1:10.1.0.11:1:5:{}", "é".repeat(16)),
            // Heartbeats out of range or not numbers; an entry without '='.
            "hb=0".to_owned(),
            "hb=99999999999999999999999".to_owned(),
            "hb=ten".to_owned(),
            "udp".to_owned(),
        ];
        let spec = std::iter::once(VERSION.to_owned())
            .chain(bad.iter().cloned())
            .chain([good])
            .collect::<Vec<_>>()
            .join(";");
        let (entries, complaints) = parse(&spec);
        assert_eq!(entries, vec![udp_entry()]);
        assert_eq!(complaints.len(), bad.len(), "{complaints:#?}");
        for c in &complaints {
            assert!(!c.why.contains(TOKEN), "a complaint quotes the token: {c}");
        }
    }

    #[test]
    fn a_value_of_another_version_or_garbage_adopts_nothing() {
        for spec in ["", "v2;ctl=3:4", "ctl=3:4", ";;;", "\u{0}\u{ff}"] {
            let (entries, complaints) = parse(spec);
            assert!(entries.is_empty(), "{spec:?}");
            assert_eq!(complaints.len(), 1, "{spec:?}: {complaints:?}");
        }
    }

    #[test]
    fn ownership_proofs_round_trip_and_are_redacted() {
        let own = Entry::Own {
            transport: gcb_proto::Transport::Udp,
            proxy: a("203.0.113.10:33865"),
            proof: TOKEN.to_owned(),
        };
        let spec = format!("v1;{}", own.format());
        assert_eq!(spec, format!("v1;own=u:203.0.113.10:33865:{TOKEN}"));
        assert_eq!(parse(&spec), (vec![own], vec![]));
        assert_eq!(redacted(&spec), "v1;own=u:203.0.113.10:33865:<token>");
        let (entries, complaints) = parse("v1;own=x:203.0.113.10:1:00;own=t:1.2.3.4:5:zz");
        assert!(entries.is_empty());
        assert_eq!(complaints.len(), 2, "{complaints:?}");
        assert!(
            complaints.iter().all(|c| !c.why.contains("zz")),
            "{complaints:?}"
        );
    }

    #[test]
    fn redacted_cuts_tokens_only() {
        let spec = format!("v1;ctl=5:6;{};hb=500", udp_entry().format());
        let r = redacted(&spec);
        assert!(!r.contains(TOKEN), "{r}");
        assert_eq!(
            r,
            "v1;ctl=5:6;udp=3:3098124:203.0.113.10:33865:10.1.0.11:9300:515:<token>;hb=500"
        );
    }
}
