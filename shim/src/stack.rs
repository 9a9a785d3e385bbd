//! The installed layer: DPF and GCB together. DPF serves the sockets it can (portfwd
//! mapped them at bind, or, for a socket bound to port 0, at its first `getsockname()`
//! or `listen()`); GCB serves the rest (listening sockets it registers with the broker,
//! brokered connects). Either may be absent.

use libc::{c_int, ssize_t};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use crate::dpf::{self, Bound, DpfClient, Refusal};
use crate::fdtable::FdEntry;
use crate::gcb::GcbLayer;
use crate::layer::{AddrIn, AddrOut, IoCall, Layer, OptOut, Outcome, WaitCall};
use crate::net;
use crate::sockaddr::SockAddrBuf;

pub struct Stack {
    pub gcb: Option<GcbLayer>,
    pub dpf: Option<DpfClient>,
}

use crate::sys::errno;

impl Stack {
    /// A pending socket's first `getsockname()`/`listen()` (`what`): let DPF forward it.
    /// `Ok(true)`: it was pending and DPF did not take it (left to GCB, or to local
    /// service); `Ok(false)`: not pending, or now DPF's; `Err(errno)`: refused with DPF as
    /// the only layer.
    fn settle(
        &self,
        d: &DpfClient,
        fd: c_int,
        entry: &Arc<FdEntry>,
        what: &str,
    ) -> Result<bool, c_int> {
        match d.settle(fd, entry) {
            Ok(()) | Err(Refusal::NotApplicable) => Ok(false),
            Err(Refusal::Refused(e, why)) => {
                if self.gcb.is_none() {
                    crate::notice!(Error, DpfRefused, "{} (at {})", why, what);
                    return Err(e);
                }
                crate::debug!("{}; GCB serves this socket", why);
                Ok(true)
            }
            Err(Refusal::Unreachable(why)) => {
                if self.gcb.is_none() {
                    crate::notice!(
                        Warn,
                        DpfUnavailable,
                        "{}; serving locally only (plain socket)",
                        why
                    );
                } else {
                    crate::notice!(Warn, DpfUnavailable, "{}; GCB serves this socket", why);
                }
                Ok(true)
            }
        }
    }

    /// The IP where this host's sockets are reached from the Internet: the gateway's public
    /// IP under DPF (its forwarded ports), else the broker's under GCB (its proxies).
    fn public_ip(&self) -> Option<Ipv4Addr> {
        self.dpf
            .as_ref()
            .and_then(DpfClient::public_ip)
            .or_else(|| self.gcb.as_ref().map(GcbLayer::broker_ip))
    }

    /// A bind to the address the shim reported as the host's own (the public IP, which no
    /// interface here holds: bind said EADDRNOTAVAIL; a program that read it from
    /// getsockname() binds to it next, e.g. an FTP server's passive data socket) binds
    /// locally instead, to the unspecified address and the same port; the socket is then
    /// registered or forwarded like any other. Other addresses are left as they are.
    fn local_bind_addr(&self, addr: AddrIn) -> Option<SockAddrBuf> {
        let want = net::addr_in(addr)?;
        if want.ip().is_unspecified() {
            return None;
        }
        // Under GCB any broker of the pool: a listener that moved has its proxy there.
        let pool_ip = || {
            self.dpf.as_ref().and_then(DpfClient::public_ip).is_none()
                && self
                    .gcb
                    .as_ref()
                    .is_some_and(|g| g.is_broker_ip(*want.ip()))
        };
        if Some(*want.ip()) != self.public_ip() && !pool_ip() {
            return None;
        }
        // SAFETY: the program passed `ptr`/`len` to bind, whose contract makes the family
        // field readable (addr_in above read the whole address).
        let family = unsafe { std::ptr::read_unaligned(addr.ptr as *const libc::sa_family_t) };
        crate::debug!("bind to our public address {}: binding locally", want);
        Some(SockAddrBuf::new(
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, want.port()),
            family as c_int,
        ))
    }

    /// In an exec'd image: take over what the exec'ing image handed over.
    pub fn adopt(&self, spec: &str) {
        if let Some(g) = &self.gcb {
            g.adopt(spec);
        }
        if let Some(d) = &self.dpf {
            d.adopt(spec);
        }
    }
}

impl Layer for Stack {
    fn name(&self) -> &'static str {
        match (&self.gcb, &self.dpf) {
            (Some(_), Some(_)) => "gcb+dpf",
            (Some(_), None) => "gcb",
            (None, Some(_)) => "dpf",
            (None, None) => "none",
        }
    }

    fn on_bind(&self, fd: c_int, entry: Option<&Arc<FdEntry>>, addr: AddrIn) -> Outcome<c_int> {
        if self.dpf.is_none() && self.gcb.is_none() {
            return Outcome::Bypass("neither DPF nor GCB configured");
        }
        // SAFETY: the program's own arguments, under bind's contract.
        let mut r = unsafe { libc::bind(fd, addr.ptr, addr.len) };
        let local = (r != 0 && errno() == libc::EADDRNOTAVAIL)
            .then(|| self.local_bind_addr(addr))
            .flatten();
        let addr = local.as_ref().map_or(addr, |b| AddrIn {
            ptr: b.as_ptr(),
            len: b.len(),
        });
        if local.is_some() {
            // SAFETY: our local form of the program's address, alive in `local`.
            r = unsafe { libc::bind(fd, addr.ptr, addr.len) };
        }
        if r != 0 {
            return Outcome::Error(errno());
        }
        if let Some(d) = &self.dpf {
            // Port 0 (pending): GCB waits too; it gets the socket if DPF's lazy request is
            // refused.
            match d.on_bound(fd, entry, net::addr_in(addr)) {
                Ok(Bound::Mapped | Bound::Pending) => return Outcome::Handled(0),
                Err(Refusal::NotApplicable) => {}
                Err(Refusal::Refused(e, why)) => {
                    if self.gcb.is_none() {
                        crate::notice!(Error, DpfRefused, "{}", why);
                        return Outcome::Error(e);
                    }
                    crate::debug!("{}; GCB serves this socket", why);
                }
                Err(Refusal::Unreachable(why)) => {
                    if self.gcb.is_none() {
                        crate::notice!(
                            Warn,
                            DpfUnavailable,
                            "{}; serving locally only (plain socket)",
                            why
                        );
                        return Outcome::Handled(0);
                    }
                    crate::notice!(Warn, DpfUnavailable, "{}; GCB serves this socket", why);
                }
            }
        }
        if let Some(g) = &self.gcb {
            // UDP sockets register at bind (port 0: when needed); TCP ones at listen(), or
            // at their first getsockname() if bound to our public address.
            if local.is_some() && net::is_tcp4(fd) {
                if let Some(e) = crate::fdtable::socket_entry(fd, entry) {
                    e.with_state(|s| *s = crate::sockstate::SockState::PublicBind);
                }
            }
            g.on_bound_udp_lazy(fd, entry, net::addr_in(addr));
        }
        Outcome::Handled(0)
    }

    fn on_listen(&self, fd: c_int, entry: Option<&Arc<FdEntry>>, backlog: c_int) -> Outcome<c_int> {
        if let Some(d) = &self.dpf {
            d.maintain();
            if let Some(e) = entry {
                if let Err(errno) = self.settle(d, fd, e, "listen") {
                    return Outcome::Error(errno);
                }
            }
        }
        if entry.is_some_and(|e| dpf::dpf_state(e).is_some()) {
            crate::debug!("listen on fd {}: served by DPF", fd);
            return Outcome::Bypass("served by DPF");
        }
        match &self.gcb {
            Some(g) => g.on_listen(fd, entry, backlog),
            None => Outcome::Bypass("GCB not configured"),
        }
    }

    fn on_connect(&self, fd: c_int, entry: Option<&Arc<FdEntry>>, addr: AddrIn) -> Outcome<c_int> {
        if let Some(d) = &self.dpf {
            if let Some(e) = entry {
                // An active socket keeps no rule (paper 3.2.1).
                d.release(e, false);
            }
            if let Some(dest) = net::addr_in(addr) {
                if let Some(private) = d.lookup(fd, dest) {
                    return match net::connect_program(fd, private) {
                        Ok(()) => Outcome::Handled(0),
                        Err(e) => Outcome::Error(e),
                    };
                }
            }
        }
        match &self.gcb {
            Some(g) => g.on_connect(fd, entry, addr),
            None => Outcome::Bypass("GCB not configured"),
        }
    }

    fn on_accept(
        &self,
        fd: c_int,
        entry: &Arc<FdEntry>,
        addr: AddrOut,
        flags: c_int,
    ) -> Outcome<c_int> {
        if let Some(d) = &self.dpf {
            d.maintain();
        }
        match &self.gcb {
            Some(g) => g.on_accept(fd, entry, addr, flags),
            None => Outcome::Bypass("GCB not configured"),
        }
    }

    fn on_name(
        &self,
        fd: c_int,
        entry: &Arc<FdEntry>,
        peer: bool,
        addr: AddrOut,
    ) -> Outcome<c_int> {
        if !peer {
            if let Some(d) = &self.dpf {
                match self.settle(d, fd, entry, "getsockname") {
                    Err(errno) => return Outcome::Error(errno),
                    // Left to GCB: a UDP socket registers now (a TCP one at listen()).
                    Ok(true) => {
                        if let Some(g) = &self.gcb {
                            g.on_bound_udp(fd, Some(entry));
                        }
                    }
                    Ok(false) => {}
                }
            }
            if let Some((_, _, public, _)) = dpf::dpf_state(entry) {
                crate::sockaddr::write_out(addr, public, entry.domain());
                return Outcome::Handled(0);
            }
        }
        match &self.gcb {
            Some(g) => g.on_name(fd, entry, peer, addr),
            None => Outcome::Bypass("GCB not configured"),
        }
    }

    fn on_getsockopt(&self, fd: c_int, entry: &Arc<FdEntry>, call: OptOut) -> Outcome<c_int> {
        match &self.gcb {
            Some(g) => g.on_getsockopt(fd, entry, call),
            None => Outcome::Bypass("GCB not configured"),
        }
    }

    fn on_unmanaged_name(&self, fd: c_int, addr: AddrOut) -> Outcome<c_int> {
        if !crate::layer::public_names() {
            return Outcome::Bypass("GCB_PUBLIC_NAMES=0");
        }
        let mut own = SockAddrBuf::empty();
        let p = own.as_mut_ptr();
        // SAFETY: `own` is writable storage of the length it reports.
        if unsafe { libc::getsockname(fd, p, own.len_mut()) } != 0 {
            return Outcome::Bypass("getsockname fails: the kernel reports it");
        }
        let Some(local) = own.v4() else {
            return Outcome::Bypass("not an IPv4 address");
        };
        if !net::is_private(*local.ip()) {
            return Outcome::Bypass("not a private address");
        }
        let Some(peer) = net::sock_name(fd, true) else {
            return Outcome::Bypass("not connected");
        };
        if net::is_private(*peer.ip()) || net::never_brokered(*peer.ip()) {
            return Outcome::Bypass("connected inside the private network");
        }
        // A connection accepted on a forwarded listener: the address the peer dialed.
        let public = self
            .dpf
            .as_ref()
            .and_then(|d| d.public_for(local))
            .or_else(|| Some(SocketAddrV4::new(self.public_ip()?, local.port())));
        let Some(public) = public else {
            return Outcome::Bypass("the public address is not known yet");
        };
        crate::trace!("getsockname({}): {} reported as {}", fd, local, public);
        crate::sockaddr::write_out(addr, public, own.family());
        Outcome::Handled(0)
    }

    fn on_io(&self, fd: c_int, entry: &Arc<FdEntry>, call: IoCall) -> Outcome<ssize_t> {
        match &self.gcb {
            Some(g) => g.on_io(fd, entry, call),
            None => Outcome::Bypass("GCB not configured"),
        }
    }

    fn on_wait(&self, call: WaitCall) -> Outcome<c_int> {
        if let Some(d) = &self.dpf {
            d.maintain();
        }
        match &self.gcb {
            Some(g) => g.on_wait(call),
            None => Outcome::Bypass("GCB not configured"),
        }
    }

    fn on_epoll_ctl(
        &self,
        epfd: c_int,
        op: c_int,
        fd: c_int,
        entry: &Arc<FdEntry>,
        ev: *mut libc::epoll_event,
    ) -> Outcome<c_int> {
        match &self.gcb {
            Some(g) => g.on_epoll_ctl(epfd, op, fd, entry, ev),
            None => Outcome::Bypass("GCB not configured"),
        }
    }

    fn on_close(&self, fd: c_int, entry: &Arc<FdEntry>, last: bool) {
        if last {
            if let Some(d) = &self.dpf {
                d.release(entry, true);
            }
        }
        if let Some(g) = &self.gcb {
            g.on_close(fd, entry, last);
        }
    }

    fn fork_prepare(&self) {
        if let Some(g) = &self.gcb {
            g.fork_prepare();
        }
        if let Some(d) = &self.dpf {
            d.fork_prepare();
        }
    }

    fn fork_parent(&self) {
        if let Some(d) = &self.dpf {
            d.fork_parent();
        }
        if let Some(g) = &self.gcb {
            g.fork_parent();
        }
    }

    fn fork_child_locks(&self) {
        if let Some(d) = &self.dpf {
            d.fork_child_locks();
        }
        if let Some(g) = &self.gcb {
            g.fork_child_locks();
        }
    }

    fn on_fork_child(&self) {
        if let Some(g) = &self.gcb {
            g.on_fork_child();
        }
        if let Some(d) = &self.dpf {
            d.on_fork_child();
        }
    }

    /// `GCB_INHERIT`: `v1;` then the GCB entries (`ctl=`, `mbox=`, `reg=`, `udp=`, `hb=`;
    /// see [`crate::inherit`]) and the DPF entries (`dpf=`, `dpfq=`); each layer
    /// adopts its own keys and ignores the others'.
    fn exec_handoff(&self) -> Option<String> {
        let mut parts: Vec<String> = Vec::new();
        if let Some(g) = self.gcb.as_ref().and_then(|g| g.exec_handoff()) {
            parts.extend(g.split(';').skip(1).map(str::to_owned));
        }
        if let Some(d) = &self.dpf {
            parts.extend(d.handoff());
        }
        (!parts.is_empty()).then(|| format!("v1;{}", parts.join(";")))
    }
}
