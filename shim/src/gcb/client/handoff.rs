//! Handing the registrations across exec: [`Client::handoff`] writes the `GCB_INHERIT`
//! entry (format in [`crate::inherit`]) for the registered sockets that survive
//! exec, and [`Client::adopt`] takes them over in the new image, each fd checked against
//! its recorded inode.

use gcb_proto::{Ticker, Transport};
use libc::c_int;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddrV4;
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::mailbox::Mailbox;
use super::state::{Channel, Client, Registration, UdpReg};
use crate::fdtable::{self, FdEntry};
use crate::inherit::{self, Entry, Owner, UdpEntry};
use crate::net;
use crate::procid::inode;
use crate::sockstate::{GcbSock, SockState, UdpSock};

/// Whether `fd` stays open across exec (no close-on-exec).
fn survives_exec(fd: c_int) -> bool {
    crate::sys::fcntl_raw(fd, libc::F_GETFD, 0).is_ok_and(|f| f & libc::FD_CLOEXEC == 0)
}

impl Client {
    /// The environment entry that hands this process's registrations to an exec'd image
    /// (`GCB_INHERIT`, see [`crate::inherit`]), for the registered sockets whose fds
    /// survive exec (close-on-exec ones are left out): TCP listeners (`reg=`) and UDP
    /// sockets (`udp=`, with their token), the channels they are registered on, the
    /// mailbox, and the heartbeat interval (fitted to a lease the new image has not
    /// seen). Clears close-on-exec on the channel and mailbox fds they need.
    pub fn handoff(&self) -> Option<String> {
        let mbox = self.mailbox.as_ref()?;
        let mut regs: Vec<Entry> = Vec::new();
        let mut chans = HashSet::new();
        for ((_, proxy), r) in &self.regs {
            let Some(c) = self.families.iter().find(|c| c.id == r.chan) else {
                continue;
            };
            let ctl = c.fd.fd();
            let before = regs.len();
            match &r.udp {
                None => {
                    let Some(entry) = r.entry.upgrade().filter(|_| r.inode != 0) else {
                        continue;
                    };
                    for fd in fdtable::fds_of(&entry) {
                        if survives_exec(fd) {
                            regs.push(Entry::Reg {
                                fd,
                                ino: r.inode,
                                proxy: *proxy,
                                local: r.local,
                                listen_at: r.listen_at,
                                ctl,
                            });
                        }
                    }
                }
                // Every socket of ours that holds the registration, every fd of each.
                Some(u) => {
                    for entry in u.holders.iter().filter_map(Weak::upgrade) {
                        for fd in fdtable::fds_of(&entry) {
                            let Some(ino) = inode(fd).filter(|_| survives_exec(fd)) else {
                                continue;
                            };
                            regs.push(Entry::Udp(UdpEntry {
                                fd,
                                ino,
                                proxy: *proxy,
                                local: r.local,
                                ctl,
                                token: u.token.clone(),
                            }));
                        }
                    }
                }
            }
            if regs.len() > before {
                chans.insert(ctl);
                let transport = if r.udp.is_some() {
                    Transport::Udp
                } else {
                    Transport::Tcp
                };
                if let Some(proof) = self.proofs.get(&(transport, *proxy)) {
                    regs.push(Entry::Own {
                        transport,
                        proxy: *proxy,
                        proof: proof.clone(),
                    });
                }
            }
        }
        if regs.is_empty() {
            return None;
        }
        let mut parts = vec![inherit::VERSION.to_owned()];
        for fd in chans.iter().copied().chain([mbox.tx.fd(), mbox.rx.fd()]) {
            let _ = crate::sys::fcntl_raw(fd, libc::F_SETFD, 0);
        }
        for fd in chans {
            parts.push(
                Entry::Ctl {
                    fd,
                    ino: inode(fd).unwrap_or(0),
                }
                .format(),
            );
        }
        parts.push(
            Entry::Mbox {
                tx: mbox.tx.fd(),
                tx_ino: inode(mbox.tx.fd()).unwrap_or(0),
                rx: mbox.rx.fd(),
                rx_ino: inode(mbox.rx.fd()).unwrap_or(0),
            }
            .format(),
        );
        parts.extend(regs.iter().map(Entry::format));
        parts.push(Entry::Heartbeat(self.heartbeat.interval()).format());
        Some(parts.join(";"))
    }

    /// In a new image: take over what the exec'ing image handed over in `GCB_INHERIT`.
    /// Every fd is checked against its recorded inode (it must still be that socket);
    /// anything that does not match is ignored, a malformed entry with one log line.
    /// Inherited channel fds that serve no registration are closed. Returns what was
    /// adopted: (fd, transport, local, proxy).
    pub fn adopt(&mut self, spec: &str) -> Vec<(c_int, Transport, SocketAddrV4, SocketAddrV4)> {
        let mut adopted = Vec::new();
        let (entries, bad) = inherit::parse(spec);
        for why in bad.iter().filter(|m| m.reported_by(Owner::Gcb)) {
            crate::warn!("GCB_INHERIT: ignored {}", why);
        }
        let fd_ok = |fd: c_int, ino: u64| inode(fd) == Some(ino);
        let mut ctls: HashSet<c_int> = HashSet::new();
        let mut mbox: Option<(c_int, c_int)> = None;
        let mut regs = Vec::new();
        let mut udps: Vec<UdpEntry> = Vec::new();
        let mut heartbeat = None;
        for e in entries {
            match e {
                Entry::Ctl { fd, ino } if fd_ok(fd, ino) => {
                    ctls.insert(fd);
                }
                Entry::Mbox {
                    tx,
                    tx_ino,
                    rx,
                    rx_ino,
                } if fd_ok(tx, tx_ino) && fd_ok(rx, rx_ino) => mbox = Some((tx, rx)),
                Entry::Reg {
                    fd,
                    ino,
                    proxy,
                    local,
                    listen_at,
                    ctl,
                } if fd_ok(fd, ino) => regs.push((fd, ino, proxy, local, listen_at, ctl)),
                Entry::Udp(u) if fd_ok(u.fd, u.ino) && net::is_udp4(u.fd) => udps.push(u),
                Entry::Own {
                    transport,
                    proxy,
                    proof,
                } => {
                    self.proofs.insert((transport, proxy), proof);
                }
                Entry::Heartbeat(d) => heartbeat = Some(d),
                // Adopted elsewhere: udpq= by gcb::udp, dpf=/dpfq= by DPF.
                Entry::UdpPending { .. } | Entry::Dpf { .. } | Entry::DpfPending { .. } => {}
                other => crate::debug!(
                    "GCB_INHERIT: {} is no longer what it was; ignored",
                    inherit::redacted(&other.format())
                ),
            }
        }
        let Some((tx, rx)) = mbox else {
            for fd in ctls {
                net::close(fd);
            }
            return adopted;
        };
        let mut chan_of: HashMap<c_int, (u64, SocketAddrV4)> = HashMap::new();
        for fd in ctls {
            if !regs.iter().any(|r| r.5 == fd) && !udps.iter().any(|u| u.ctl == fd) {
                net::close(fd);
                continue;
            }
            // The connected socket names its broker (one of the pool's).
            let peer = net::sock_name(fd, true).unwrap_or(self.broker);
            if let Ok(owned) = fdtable::own_fd(fd, "gcb-control") {
                let c = Channel::adopt(owned, &self.key, 0, peer);
                chan_of.insert(fd, (c.id, peer));
                self.families.push(c);
            }
        }
        if chan_of.is_empty() {
            net::close(tx);
            net::close(rx);
            return adopted;
        }
        match (
            fdtable::own_fd(tx, "gcb-mailbox"),
            fdtable::own_fd(rx, "gcb-mailbox"),
        ) {
            (Ok(tx), Ok(rx)) => self.mailbox = Some(Mailbox { tx, rx }),
            _ => return adopted,
        }
        // The exec'ing image's heartbeat may have been fitted to the broker's lease.
        if let Some(d) = heartbeat.filter(|d| *d < self.heartbeat.interval()) {
            crate::debug!("heartbeat every {:?}, as the exec'ing image did", d);
            self.heartbeat = Ticker::new(d);
        }
        for (fd, ino, proxy, local, listen_at, ctl) in regs {
            let Some(&(chan, broker)) = chan_of.get(&ctl) else {
                continue;
            };
            let Some(entry) = fdtable::socket_entry(fd, None) else {
                continue;
            };
            entry.set_gcb(GcbSock::Listener { proxy, local });
            self.regs.insert(
                (Transport::Tcp, proxy),
                Registration {
                    local,
                    listen_at,
                    inode: ino,
                    chan,
                    broker,
                    entry: Arc::downgrade(&entry),
                    family: entry.domain(),
                    udp: None,
                    standby: None,
                },
            );
            adopted.push((fd, Transport::Tcp, local, proxy));
        }
        self.adopt_udp(udps, &chan_of, &mut adopted);
        if self.local_ip.is_none() {
            self.ensure_local_ip();
        }
        adopted
    }

    /// Adopt inherited registered UDP sockets (fds already checked): each gets its
    /// [`UdpSock`] back with the same proxy (an empty receiver list, no
    /// punch records: peers punch again) and holds the registration with its token; the
    /// first keepalive goes out at the AEH's first run.
    fn adopt_udp(
        &mut self,
        udps: Vec<UdpEntry>,
        chan_of: &HashMap<c_int, (u64, SocketAddrV4)>,
        adopted: &mut Vec<(c_int, Transport, SocketAddrV4, SocketAddrV4)>,
    ) {
        // dup'd fds of one socket share one table entry, as in the exec'ing image.
        let mut by_ino: HashMap<u64, Arc<FdEntry>> = HashMap::new();
        for u in udps {
            let Some(&(chan, broker)) = chan_of.get(&u.ctl) else {
                continue;
            };
            let key = (Transport::Udp, u.proxy);
            if self.regs.get(&key).is_some_and(|r| r.local != u.local) {
                crate::warn!(
                    "GCB_INHERIT: udp fd {} claims proxy {} of another local address; ignored",
                    u.fd,
                    u.proxy
                );
                continue;
            }
            if let Some(e) = by_ino.get(&u.ino) {
                if let Ok(displaced) = fdtable::insert(u.fd, e.clone()) {
                    drop(displaced);
                    adopted.push((u.fd, Transport::Udp, u.local, u.proxy));
                }
                continue;
            }
            let Some(entry) = fdtable::socket_entry(u.fd, None) else {
                continue;
            };
            entry.with_state(|s| {
                *s = SockState::UdpRegistered(UdpSock::new(u.proxy, *broker.ip()));
            });
            match self.regs.get_mut(&key).and_then(|r| r.udp.as_mut()) {
                // Another socket on the same local address (SO_REUSEADDR) holds it too.
                Some(reg) => reg.holders.push(Arc::downgrade(&entry)),
                None => {
                    self.regs.insert(
                        key,
                        Registration {
                            local: u.local,
                            listen_at: u.local,
                            inode: u.ino,
                            chan,
                            broker,
                            entry: Arc::downgrade(&entry),
                            family: entry.domain(),
                            udp: Some(UdpReg {
                                holders: vec![Arc::downgrade(&entry)],
                                token: u.token,
                                // The NAT mapping and the broker's data address are
                                // the exec'ing image's: one keepalive refreshes them.
                                quick_left: 0,
                                next_dummy: Instant::now(),
                            }),
                            standby: None,
                        },
                    );
                }
            }
            by_ino.insert(u.ino, entry);
            adopted.push((u.fd, Transport::Udp, u.local, u.proxy));
        }
    }
}
