//! The installed layer: DPF and GCB together. DPF serves the sockets it can (portfwd
//! mapped them at bind, or, for a socket bound to port 0, at its first `getsockname()`
//! or `listen()`); GCB serves the rest (listening sockets it registers with the broker,
//! brokered connects). Either may be absent.

use libc::{c_int, ssize_t};
use std::sync::Arc;

use crate::dpf::{self, Bound, DpfClient, Refusal};
use crate::fdtable::FdEntry;
use crate::gcb::GcbLayer;
use crate::layer::{AddrIn, AddrOut, IoCall, Layer, Outcome, WaitCall};
use crate::net;

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
                    crate::warn!("{} (at {})", why, what);
                    return Err(e);
                }
                crate::debug!("{}; GCB serves this socket", why);
                Ok(true)
            }
            Err(Refusal::Unreachable(why)) => {
                if self.gcb.is_none() {
                    crate::warn!("{}; serving locally only", why);
                } else {
                    crate::warn!("{}; GCB serves this socket", why);
                }
                Ok(true)
            }
        }
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
        if unsafe { libc::bind(fd, addr.ptr, addr.len) } != 0 {
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
                        crate::warn!("{}", why);
                        return Outcome::Error(e);
                    }
                    crate::debug!("{}; GCB serves this socket", why);
                }
                Err(Refusal::Unreachable(why)) => {
                    if self.gcb.is_none() {
                        crate::warn!("{}; serving locally only", why);
                        return Outcome::Handled(0);
                    }
                    crate::warn!("{}; GCB serves this socket", why);
                }
            }
        }
        if let Some(g) = &self.gcb {
            // UDP sockets register at bind (port 0: when needed); TCP ones at listen().
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
                    return match net::connect_raw(fd, private) {
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
                net::write_addr_out(addr, public);
                return Outcome::Handled(0);
            }
        }
        match &self.gcb {
            Some(g) => g.on_name(fd, entry, peer, addr),
            None => Outcome::Bypass("GCB not configured"),
        }
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
