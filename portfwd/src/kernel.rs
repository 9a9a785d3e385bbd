//! The kernel table: the dnat maps in nftables, behind [`KernelBackend`].
//!
//! The daemon owns exactly one nftables table, `table ip gcb_portfwd`, and
//! touches nothing else. It holds one map per protocol, keyed by public
//! port (a hash lookup per new connection, O(1) at any number of mappings):
//!
//! ```text
//! table ip gcb_portfwd {
//!   map fwd_tcp { type inet_service : ipv4_addr . inet_service; elements = { 20000 : 10.1.0.11 . 8080 } }
//!   map fwd_udp { type inet_service : ipv4_addr . inet_service; }
//!   chain prerouting {   # traffic arriving at the gateway (public side, and hairpin from inside)
//!     type nat hook prerouting priority dstnat; policy accept;
//!     meta l4proto tcp ip daddr PUBLIC dnat ip addr . port to tcp dport map @fwd_tcp comment "gcb-portfwd:pre-tcp:PUBLIC"
//!     meta l4proto udp ip daddr PUBLIC dnat ip addr . port to udp dport map @fwd_udp comment "gcb-portfwd:pre-udp:PUBLIC"
//!   }
//!   chain output { ... same for connections made by the gateway itself ... }
//!   chain postrouting {  # hairpin: a private host reaching a private one by its public address
//!     type nat hook postrouting priority srcnat; policy accept;
//!     ip saddr PRIVATE ip daddr PRIVATE ct status dnat masquerade comment "gcb-portfwd:hairpin:PRIVATE"
//!   }
//! }
//! ```
//!
//! Forwarded packets must also pass the gateway's filter rules: a forward
//! chain with `policy drop` needs `ct status dnat accept` (the admin's
//! decision; the daemon never edits other tables).
//!
//! Every change is one nft transaction (atomic: all or nothing), run by
//! libnftables inside the daemon ([`crate::libnft`]; ~0.05 ms) or, if the
//! library cannot be loaded, by spawning `nft -f -` (~2 ms). The
//! structure is verified by the rule comments, which name the configuration;
//! a table that is missing, flushed or edited is replaced as a whole from
//! the mapping table ([`KernelBackend::replace_all`]).
//!
//! Connection tracking: [`KernelBackend::conntrack_ports`] lists the ports
//! with entries to the public address (`conntrack -L -f ipv4 --orig-dst
//! PUBLIC`) and [`KernelBackend::flush_conntrack`] deletes them per port
//! (`conntrack -D ... -p PROTO --orig-dst PUBLIC --orig-port-dst PORT`).
//! Each is one walk of the whole conntrack table (~10 ms on an empty one),
//! so the core calls them only for ports that may have entries (see
//! "Conntrack" in [`crate::core`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};

use gcb_proto::Transport;
use ipnet::Ipv4Net;

use crate::libnft::Libnft;
use crate::table::Key;

/// The kernel's view: public (transport, port) -> private address.
pub type Elements = BTreeMap<Key, SocketAddrV4>;

/// Name of the daemon's own nftables table (family `ip`).
pub const TABLE: &str = "gcb_portfwd";

/// One change to the kernel table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Forward `key` to the address.
    Add(Key, SocketAddrV4),
    /// Stop forwarding `key`.
    Del(Key),
}

/// Why the kernel could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A tool could not be run.
    #[error("cannot run {tool}: {source}")]
    Spawn {
        /// The program.
        tool: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("{tool} failed: {stderr}")]
    Failed {
        /// The program.
        tool: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// Output that could not be understood.
    #[error("cannot parse {0}")]
    Parse(String),
}

/// The kernel representation of the forwarding rules.
pub trait KernelBackend {
    /// Applies `ops` in one atomic transaction.
    fn apply(&mut self, ops: &[Op]) -> Result<(), KernelError>;
    /// The elements of our maps; `None` if our table is missing or not
    /// exactly as we made it (then [`KernelBackend::replace_all`] repairs it).
    fn list(&mut self) -> Result<Option<Elements>, KernelError>;
    /// Atomically (re)creates our table holding exactly `elems`.
    fn replace_all(&mut self, elems: &Elements) -> Result<(), KernelError>;
    /// Removes the connection-tracking entries of traffic to these public
    /// ports (so a port handed to a new client does not keep forwarding old
    /// flows to the previous one). Returns how many ports had entries. An
    /// error means some entries may be left.
    fn flush_conntrack(&mut self, keys: &[Key]) -> Result<usize, KernelError>;
    /// The public ports (transport, port) that have connection-tracking
    /// entries now (any entry whose original destination is the public
    /// address). One full dump of the conntrack table.
    fn conntrack_ports(&mut self) -> Result<BTreeSet<Key>, KernelError>;
}

fn proto(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
    }
}

fn map_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "fwd_tcp",
        Transport::Udp => "fwd_udp",
    }
}

/// The real backend: libnftables (or the `nft` tool) and the `conntrack`
/// tool.
#[derive(Debug)]
pub struct NftKernel {
    /// The gateway's public address (the dnat rules match it).
    pub public: Ipv4Addr,
    /// The private network (hairpin masquerade).
    pub private: Ipv4Net,
    /// `nft` program.
    pub nft: String,
    /// `conntrack` program.
    pub conntrack: String,
    /// libnftables in this process, for transactions ([`NftKernel::apply`]
    /// and [`NftKernel::replace_all`]); `None`: they spawn `nft -f -`.
    /// Listings always spawn `nft -j`.
    pub libnft: Option<Libnft>,
}

impl NftKernel {
    /// A backend using libnftables if it loads (else `nft` from `$PATH`)
    /// and `conntrack` from `$PATH`.
    pub fn new(public: Ipv4Addr, private: Ipv4Net) -> NftKernel {
        NftKernel {
            public,
            private,
            nft: "nft".into(),
            conntrack: "conntrack".into(),
            libnft: Libnft::load(),
        }
    }

    /// (chain, comment) of every rule we install; also our structure check.
    fn rules(&self) -> Vec<(&'static str, String, String)> {
        let p = self.public;
        let mut v = Vec::new();
        for (chain, tag) in [("prerouting", "pre"), ("output", "out")] {
            for t in [Transport::Tcp, Transport::Udp] {
                let (pr, m) = (proto(t), map_name(t));
                let comment = format!("gcb-portfwd:{tag}-{pr}:{p}");
                let rule = format!(
                    "meta l4proto {pr} ip daddr {p} dnat ip addr . port to {pr} dport map @{m} comment \"{comment}\""
                );
                v.push((chain, comment, rule));
            }
        }
        let c = self.private;
        let comment = format!("gcb-portfwd:hairpin:{c}");
        v.push((
            "postrouting",
            comment.clone(),
            format!("ip saddr {c} ip daddr {c} ct status dnat masquerade comment \"{comment}\""),
        ));
        v
    }

    /// The complete `nft -f` script that (re)creates our table with `elems`
    /// in one transaction. A pure function of the configuration and `elems`.
    pub fn ruleset(&self, elems: &Elements) -> String {
        let mut s = String::new();
        // `table x {}` first, so the delete never fails on a missing table.
        let _ = writeln!(s, "table ip {TABLE} {{}}\ndelete table ip {TABLE}");
        let _ = writeln!(s, "table ip {TABLE} {{");
        for t in [Transport::Tcp, Transport::Udp] {
            let _ = write!(
                s,
                "  map {} {{\n    type inet_service : ipv4_addr . inet_service\n",
                map_name(t)
            );
            let mut first = true;
            for ((et, port), a) in elems {
                if *et != t {
                    continue;
                }
                s.push_str(if first {
                    "    elements = { "
                } else {
                    ",\n      "
                });
                first = false;
                let _ = write!(s, "{port} : {} . {}", a.ip(), a.port());
            }
            if !first {
                s.push_str(" }\n");
            }
            s.push_str("  }\n");
        }
        let hooks = [
            ("prerouting", "type nat hook prerouting priority dstnat"),
            ("output", "type nat hook output priority -100"),
            ("postrouting", "type nat hook postrouting priority srcnat"),
        ];
        let rules = self.rules();
        for (chain, hook) in hooks {
            let _ = writeln!(s, "  chain {chain} {{\n    {hook}; policy accept;");
            for (c, _, r) in &rules {
                if *c == chain {
                    let _ = writeln!(s, "    {r}");
                }
            }
            s.push_str("  }\n");
        }
        s.push_str("}\n");
        s
    }

    /// The `nft -f` script for incremental `ops`.
    pub fn ops_script(ops: &[Op]) -> String {
        let mut s = String::new();
        for op in ops {
            match op {
                Op::Add((t, port), a) => {
                    let _ = writeln!(
                        s,
                        "add element ip {TABLE} {} {{ {port} : {} . {} }}",
                        map_name(*t),
                        a.ip(),
                        a.port()
                    );
                }
                Op::Del((t, port)) => {
                    let _ = writeln!(s, "delete element ip {TABLE} {} {{ {port} }}", map_name(*t));
                }
            }
        }
        s
    }

    fn run(
        &self,
        prog: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<(bool, String, String), KernelError> {
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_err = |source| KernelError::Spawn {
            tool: prog.to_owned(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A write error shows up as the tool's failure below.
            let _ = pipe.write_all(input.as_bytes());
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }

    fn nft_script(&mut self, script: &str) -> Result<(), KernelError> {
        if let Some(lib) = self.libnft.as_mut() {
            return lib.run(script).map_err(|e| KernelError::Failed {
                tool: "nft".into(),
                stderr: e.chars().take(400).collect(),
            });
        }
        let (ok, _, stderr) = self.run(&self.nft, &["-f", "-"], Some(script))?;
        if ok {
            Ok(())
        } else {
            Err(KernelError::Failed {
                tool: "nft".into(),
                stderr: stderr.chars().take(400).collect(),
            })
        }
    }

    /// Parses `nft -j list table ip gcb_portfwd`; `None` if the structure
    /// is not exactly ours.
    pub fn parse_listing(&self, json: &str) -> Result<Option<Elements>, KernelError> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| KernelError::Parse(format!("nft json: {e}")))?;
        let items = v["nftables"]
            .as_array()
            .ok_or_else(|| KernelError::Parse("nft json: no nftables array".into()))?;
        let mut maps = BTreeSet::new();
        let mut chains = BTreeSet::new();
        let mut comments = BTreeSet::new();
        let mut elems = Elements::new();
        for it in items {
            if let Some(m) = it.get("map") {
                let name = m["name"].as_str().unwrap_or("");
                let t = match name {
                    "fwd_tcp" => Transport::Tcp,
                    "fwd_udp" => Transport::Udp,
                    _ => return Ok(None),
                };
                if m["type"] != "inet_service" || m["map"] != "ipv4_addr . inet_service" {
                    return Ok(None);
                }
                maps.insert(name.to_owned());
                for e in m["elem"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                    let parsed = (|| {
                        let port = u16::try_from(e[0].as_u64()?).ok()?;
                        let c = e[1]["concat"].as_array()?;
                        let ip: Ipv4Addr = c.first()?.as_str()?.parse().ok()?;
                        let p = u16::try_from(c.get(1)?.as_u64()?).ok()?;
                        Some((port, SocketAddrV4::new(ip, p)))
                    })();
                    match parsed {
                        Some((port, a)) => {
                            elems.insert((t, port), a);
                        }
                        None => return Ok(None),
                    }
                }
            } else if let Some(c) = it.get("chain") {
                chains.insert(c["name"].as_str().unwrap_or("").to_owned());
            } else if let Some(r) = it.get("rule") {
                let chain = r["chain"].as_str().unwrap_or("");
                let comment = r["comment"].as_str().unwrap_or("");
                if !comments.insert((chain.to_owned(), comment.to_owned())) {
                    return Ok(None); // duplicate rule
                }
            } else if it.get("set").is_some() || it.get("flowtable").is_some() {
                return Ok(None);
            }
        }
        let want_comments: BTreeSet<(String, String)> = self
            .rules()
            .into_iter()
            .map(|(c, com, _)| (c.to_owned(), com))
            .collect();
        let want_chains: BTreeSet<String> = ["prerouting", "output", "postrouting"]
            .into_iter()
            .map(String::from)
            .collect();
        if maps.len() != 2 || chains != want_chains || comments != want_comments {
            return Ok(None);
        }
        Ok(Some(elems))
    }

    /// The count in `conntrack -D`'s summary line ("conntrack v1.4.7
    /// (conntrack-tools): 3 flow entries have been deleted."); `None` if
    /// there is none (the command failed).
    pub fn parse_deleted(stderr: &str) -> Option<usize> {
        stderr.lines().find_map(|l| {
            let head = l.strip_suffix(" flow entries have been deleted.")?;
            head.rsplit(' ').next()?.parse().ok()
        })
    }

    /// Parses `conntrack -L` output: (protocol, original destination port)
    /// of each entry.
    pub fn parse_conntrack(text: &str) -> BTreeSet<Key> {
        let mut out = BTreeSet::new();
        for line in text.lines() {
            let t = match line.split_whitespace().next() {
                Some("tcp") => Transport::Tcp,
                Some("udp") => Transport::Udp,
                _ => continue,
            };
            if let Some(port) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("dport="))
                .and_then(|p| p.parse().ok())
            {
                out.insert((t, port));
            }
        }
        out
    }
}

impl KernelBackend for NftKernel {
    fn apply(&mut self, ops: &[Op]) -> Result<(), KernelError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.nft_script(&Self::ops_script(ops))
    }

    fn list(&mut self) -> Result<Option<Elements>, KernelError> {
        let (ok, out, stderr) = self.run(&self.nft, &["-j", "list", "table", "ip", TABLE], None)?;
        if !ok {
            if stderr.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(KernelError::Failed {
                tool: "nft".into(),
                stderr,
            });
        }
        self.parse_listing(&out)
    }

    fn replace_all(&mut self, elems: &Elements) -> Result<(), KernelError> {
        self.nft_script(&self.ruleset(elems))
    }

    fn flush_conntrack(&mut self, keys: &[Key]) -> Result<usize, KernelError> {
        // Every conntrack command with a filter walks the whole conntrack
        // table (~10 ms even when it is empty): one port costs one `-D`; more
        // cost one `-L` plus one `-D` per port that has entries.
        let present: Vec<Key> = match keys {
            [] => return Ok(0),
            [k] => vec![*k],
            _ => {
                let have = self.conntrack_ports()?;
                keys.iter().copied().filter(|k| have.contains(k)).collect()
            }
        };
        let public = self.public.to_string();
        let mut n = 0;
        for k in present {
            let port = k.1.to_string();
            let (_, _, stderr) = self.run(
                &self.conntrack,
                &[
                    "-D",
                    "-f",
                    "ipv4",
                    "-p",
                    proto(k.0),
                    "--orig-dst",
                    &public,
                    "--orig-port-dst",
                    &port,
                ],
                None,
            )?;
            // Exit status 1 means "0 entries deleted" as well as failure; the
            // summary line tells them apart.
            match Self::parse_deleted(&stderr) {
                Some(0) => {}
                Some(_) => n += 1,
                None => {
                    return Err(KernelError::Failed {
                        tool: "conntrack".into(),
                        stderr,
                    })
                }
            }
        }
        Ok(n)
    }

    fn conntrack_ports(&mut self) -> Result<BTreeSet<Key>, KernelError> {
        let public = self.public.to_string();
        let (ok, out, stderr) = self.run(
            &self.conntrack,
            &["-L", "-f", "ipv4", "--orig-dst", &public],
            None,
        )?;
        if !ok {
            return Err(KernelError::Failed {
                tool: "conntrack".into(),
                stderr,
            });
        }
        Ok(Self::parse_conntrack(&out))
    }
}

/// An in-memory backend for unit tests: records every call and can be made
/// to fail.
#[derive(Default)]
pub struct FakeKernel {
    /// The table's elements; `None`: the table does not exist.
    pub elems: Option<Elements>,
    /// Every call, in order (`apply [..]`, `list`, `replace_all N`, `flush [..]`).
    pub journal: Vec<String>,
    /// Adds of these keys fail (the whole transaction, as nft does).
    pub fail_keys: BTreeSet<Key>,
    /// Every apply/replace fails.
    pub fail_all: bool,
    /// Ports flushed from "conntrack" (every key asked for).
    pub flushed: Vec<Key>,
    /// Ports that have "conntrack" entries (listed by `conntrack_ports`,
    /// removed by a flush).
    pub conntrack: BTreeSet<Key>,
    /// Conntrack listings and flushes fail.
    pub fail_conntrack: bool,
    /// Called at the start of every `apply` with the ops (order checks).
    #[allow(clippy::type_complexity)]
    pub on_apply: Option<Box<dyn FnMut(&[Op])>>,
}

impl std::fmt::Debug for FakeKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKernel")
            .field("elems", &self.elems)
            .field("journal", &self.journal)
            .finish_non_exhaustive()
    }
}

impl FakeKernel {
    /// An empty, existing table.
    pub fn new() -> FakeKernel {
        FakeKernel {
            elems: Some(Elements::new()),
            ..FakeKernel::default()
        }
    }

    fn fail(what: &str) -> KernelError {
        KernelError::Failed {
            tool: "fake".into(),
            stderr: what.into(),
        }
    }
}

impl KernelBackend for FakeKernel {
    fn apply(&mut self, ops: &[Op]) -> Result<(), KernelError> {
        self.journal.push(format!("apply {ops:?}"));
        if let Some(f) = self.on_apply.as_mut() {
            f(ops);
        }
        if self.fail_all {
            return Err(Self::fail("injected"));
        }
        let Some(cur) = self.elems.as_ref() else {
            return Err(Self::fail("No such file or directory (table)"));
        };
        // Transaction semantics: compute on a copy, commit only if all work.
        let mut next = cur.clone();
        for op in ops {
            match *op {
                Op::Add(k, a) => {
                    if self.fail_keys.contains(&k) {
                        return Err(Self::fail("injected add failure"));
                    }
                    match next.get(&k) {
                        Some(old) if *old != a => return Err(Self::fail("File exists")),
                        _ => {
                            next.insert(k, a);
                        }
                    }
                }
                Op::Del(k) => {
                    if next.remove(&k).is_none() {
                        return Err(Self::fail("No such file or directory"));
                    }
                }
            }
        }
        self.elems = Some(next);
        Ok(())
    }

    fn list(&mut self) -> Result<Option<Elements>, KernelError> {
        self.journal.push("list".into());
        Ok(self.elems.clone())
    }

    fn replace_all(&mut self, elems: &Elements) -> Result<(), KernelError> {
        self.journal.push(format!("replace_all {}", elems.len()));
        if self.fail_all || elems.keys().any(|k| self.fail_keys.contains(k)) {
            return Err(Self::fail("injected"));
        }
        self.elems = Some(elems.clone());
        Ok(())
    }

    fn flush_conntrack(&mut self, keys: &[Key]) -> Result<usize, KernelError> {
        self.journal.push(format!("flush {keys:?}"));
        if self.fail_conntrack {
            return Err(Self::fail("injected conntrack failure"));
        }
        self.flushed.extend_from_slice(keys);
        Ok(keys.iter().filter(|k| self.conntrack.remove(k)).count())
    }

    fn conntrack_ports(&mut self) -> Result<BTreeSet<Key>, KernelError> {
        self.journal.push("conntrack_ports".into());
        if self.fail_conntrack {
            return Err(Self::fail("injected conntrack failure"));
        }
        Ok(self.conntrack.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k() -> NftKernel {
        NftKernel::new(
            Ipv4Addr::new(203, 0, 113, 1),
            "10.1.0.0/24".parse().unwrap(),
        )
    }

    #[test]
    fn ruleset_is_a_value() {
        let mut e = Elements::new();
        e.insert((Transport::Tcp, 20000), "10.1.0.11:8080".parse().unwrap());
        e.insert((Transport::Tcp, 20001), "10.1.0.12:80".parse().unwrap());
        e.insert((Transport::Udp, 20000), "10.1.0.11:53".parse().unwrap());
        let s = k().ruleset(&e);
        assert!(s.starts_with("table ip gcb_portfwd {}\ndelete table ip gcb_portfwd\n"));
        assert!(
            s.contains("elements = { 20000 : 10.1.0.11 . 8080,\n      20001 : 10.1.0.12 . 80 }"),
            "{s}"
        );
        assert!(s.contains("elements = { 20000 : 10.1.0.11 . 53 }"));
        assert!(s.contains(
            "meta l4proto udp ip daddr 203.0.113.1 dnat ip addr . port to udp dport map @fwd_udp"
        ));
        assert!(s.contains("ct status dnat masquerade comment \"gcb-portfwd:hairpin:10.1.0.0/24\""));
        assert_eq!(s, k().ruleset(&e.clone()));
        let ops = NftKernel::ops_script(&[
            Op::Add((Transport::Udp, 5), "10.1.0.11:6".parse().unwrap()),
            Op::Del((Transport::Tcp, 7)),
        ]);
        assert_eq!(
            ops,
            "add element ip gcb_portfwd fwd_udp { 5 : 10.1.0.11 . 6 }\ndelete element ip gcb_portfwd fwd_tcp { 7 }\n"
        );
    }

    #[test]
    fn listing_parse_checks_structure() {
        let rules: String = k()
            .rules()
            .iter()
            .map(|(c, com, _)| {
                format!(r#",{{"rule":{{"family":"ip","table":"gcb_portfwd","chain":"{c}","comment":"{com}","expr":[]}}}}"#)
            })
            .collect();
        let head = r#"{"nftables":[{"metainfo":{}},{"table":{"family":"ip","name":"gcb_portfwd"}},
            {"map":{"name":"fwd_tcp","type":"inet_service","map":"ipv4_addr . inet_service","elem":[[20000,{"concat":["10.1.0.11",8080]}]]}},
            {"map":{"name":"fwd_udp","type":"inet_service","map":"ipv4_addr . inet_service"}},
            {"chain":{"name":"prerouting"}},{"chain":{"name":"output"}},{"chain":{"name":"postrouting"}}"#;
        let full = format!("{head}{rules}]}}");
        let got = k().parse_listing(&full).unwrap().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[&(Transport::Tcp, 20000)],
            "10.1.0.11:8080".parse().unwrap()
        );
        // flushed chains (no rules): not ours any more
        let flushed = format!("{head}]}}");
        assert_eq!(k().parse_listing(&flushed).unwrap(), None);
        // rules made for another public IP: stale
        let other = NftKernel::new(
            Ipv4Addr::new(203, 0, 113, 9),
            "10.1.0.0/24".parse().unwrap(),
        );
        assert_eq!(other.parse_listing(&full).unwrap(), None);
        assert!(k().parse_listing("not json").is_err());
    }

    #[test]
    fn conntrack_parse() {
        let text = "tcp      6 119 TIME_WAIT src=203.0.113.10 dst=203.0.113.1 sport=45128 dport=20000 src=10.1.0.11 dst=203.0.113.10 sport=8080 dport=45128 [ASSURED] mark=0 use=1\n\
                    udp      17 29 src=203.0.113.10 dst=203.0.113.1 sport=5 dport=20001 [UNREPLIED] src=203.0.113.1 dst=203.0.113.10 sport=20001 dport=5 mark=0 use=1\n";
        let got: Vec<Key> = NftKernel::parse_conntrack(text).into_iter().collect();
        assert_eq!(got, vec![(Transport::Tcp, 20000), (Transport::Udp, 20001)]);
        let del = |s| NftKernel::parse_deleted(s);
        assert_eq!(
            del("conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n"),
            Some(3)
        );
        assert_eq!(
            del("conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted."),
            Some(0)
        );
        assert_eq!(
            del("conntrack v1.4.7 (conntrack-tools): Operation not permitted"),
            None
        );
        assert_eq!(del(""), None);
    }
}
