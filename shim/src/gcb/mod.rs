//! The GCB client layer (paper section 4.2.1), active when `GCB_BROKER` is set.
//!
//! * `listen()` on an IPv4 TCP socket registers it with the broker, which opens a proxy
//!   socket; from then on `getsockname()` reports the proxy address, the address the
//!   program will advertise. If the broker does not answer (or refuses), listen() still
//!   succeeds and the socket serves locally (one log line); the AEH asks again, after 1 s
//!   and then twice as long each time up to 30 s, and from the registration on
//!   `getsockname()` reports the proxy.
//! * The broker's `connect_back` arrives on the process's control socket while the
//!   program waits in accept/select/poll/epoll (the AEH runs inside those calls). The
//!   shim dials out (to the connector for a reversed connection, to the broker's relay
//!   port otherwise; never to loopback, private, link-local or multicast addresses other
//!   than the broker's own, and without ever waiting for the dial in the program's call:
//!   see [`dial`]), presents the single-use connect id, and then makes a loopback
//!   *placeholder* connection to the program's own listening socket, so the kernel's
//!   accept queue holds an entry in arrival order and every readiness call wakes up as
//!   for a kernel connection. The interposed `accept()` recognises the placeholder by
//!   its source address, closes it and returns the brokered connection instead, with the
//!   logical peer as its address (also from `getpeername()`). When the program is
//!   blocked in `accept()` on that very listener, the connection is returned directly.
//! * Faster still, the registering process keeps a *standby* connection parked at the
//!   broker's relay port ([`standby`]): a connection to the proxy is spliced onto it at
//!   once (the broker writes a 12-byte claim, the AEH acks and hands it over as above),
//!   without the `connect_back` datagram and the dial; `connect_back` is the fallback.
//! * A **pool** of brokers (`GCB_BROKER=IP,IP,...` or a DNS name): each listener
//!   registers with the first broker of its own rendezvous order ([`gcb_proto::pool`])
//!   and, when that broker stops answering heartbeats, with the next one (a new proxy;
//!   `getsockname()` reports it); see [`client::failover`] for the bound, why it does not
//!   move back, and what peers that hold the old address see.
//! * `connect()` to an address on a broker's IP (any broker of the pool: the one whose IP
//!   it is owns the proxy) asks that broker how: `direct` (connect
//!   to the listener's real address), `reverse` (we listen, the listener dials us and
//!   presents the connect id), `punch` (both behind different NATs: [`tcp_punch`]), or
//!   `relay` (connect to the broker's relay port and present the connect id). Destinations the broker does not know, and an unreachable broker,
//!   are remembered for a minute (negative cache), so a plain connect is delayed once.
//!   A proxy the broker just *relayed* is also remembered for a minute: connecting to
//!   it plainly is that same relay (through the proxy socket, onto the standby), so the
//!   process's next connects skip the question.
//!
//! * A bound UDP socket registers too (port 0: at its first getsockname() or send to the
//!   broker's host); see [`udp`] (relay frames, keepalives, the
//!   receiver list).
//! * Shared sockets (see [`client`]): the registration channel and a mailbox of
//!   brokered connections are inherited across fork and handed across exec
//!   (`GCB_INHERIT`, see [`crate::inherit`]), so every process holding a registered TCP listener
//!   or UDP socket can serve it and keep it alive; the registration ends when no process
//!   holds the socket.
//!
//! * UDP between two registered GCB sockets punches a hole through both NATs ([`punch`]);
//!   the relay carries the first datagrams and everything where punching fails. The
//!   shim's own datagrams on a registered UDP socket never make it readable for the
//!   program: select/poll and epoll ([`udp_epoll`]) hide readiness they alone caused.
//!
//! * TCP between two GCB programs behind different NATs punches a hole through both
//!   ([`tcp_punch`]): the broker decides `punch`, both shims connect at once from the ports
//!   the broker observed, prove the pairing, and the relay serves the connection when the
//!   punch has not connected within `GCB_PUNCH_MS`.
//!
//! Limits today: IPv4 only; UDP sockets use the pool's first broker only (no failover);
//! `execl*`/`posix_spawn` get no
//! handoff.

pub mod accepted_opts;
pub mod client;
pub mod core;
pub mod dial;
pub mod punch;
pub mod standby;
pub mod tcp;
pub mod tcp_punch;
pub mod udp;
pub mod udp_epoll;
pub mod udp_recv;
pub mod udp_send;
pub mod wait;

use gcb_proto::Transport;
use libc::{c_int, ssize_t};
use std::sync::Arc;

use crate::abi::{AddrIn, AddrOut, IoCall, OptOut, Outcome, WaitCall};
use crate::fdtable::FdEntry;
use crate::layer::Layer;
use core::gcb_state;

pub use crate::sockstate::GcbSock;
pub use core::{parse_broker, parse_pool, GcbLayer, PoolSetting, DEFAULT_BROKER_PORT};

impl GcbLayer {
    /// The `GCB_INHERIT` value for an exec, if registered sockets survive it.
    pub fn handoff(&self) -> Option<String> {
        let pending = udp::pending_handoff();
        let regs = self.client.lock().handoff();
        if pending.is_empty() {
            return regs;
        }
        let mut v = regs.unwrap_or_else(|| crate::inherit::VERSION.to_owned());
        for p in pending {
            v.push(';');
            v.push_str(&p);
        }
        Some(v)
    }

    /// At init of an exec'd image: adopt the registrations handed over in `spec`.
    pub fn adopt(&self, spec: &str) {
        udp::adopt_pending(spec);
        for (fd, transport, local, proxy) in self.client.lock().adopt(spec) {
            match transport {
                Transport::Tcp => crate::info!(
                    "inherited registration of fd {} ({}) as proxy {}",
                    fd,
                    local,
                    proxy
                ),
                Transport::Udp => crate::info!(
                    "inherited udp registration of fd {} ({}) as proxy {}",
                    fd,
                    local,
                    proxy
                ),
            }
        }
    }
}

impl Layer for GcbLayer {
    fn name(&self) -> &'static str {
        "gcb"
    }

    fn on_listen(&self, fd: c_int, entry: Option<&Arc<FdEntry>>, backlog: c_int) -> Outcome<c_int> {
        self.tcp_listen(fd, entry, backlog)
    }

    fn on_name(
        &self,
        fd: c_int,
        entry: &Arc<FdEntry>,
        peer: bool,
        addr: AddrOut,
    ) -> Outcome<c_int> {
        self.tcp_name(fd, entry, peer, addr)
    }

    fn on_accept(
        &self,
        fd: c_int,
        entry: &Arc<FdEntry>,
        addr: AddrOut,
        flags: c_int,
    ) -> Outcome<c_int> {
        self.tcp_accept(fd, entry, addr, flags)
    }

    fn on_getsockopt(&self, fd: c_int, entry: &Arc<FdEntry>, call: OptOut) -> Outcome<c_int> {
        self.tcp_getsockopt(fd, entry, call)
    }

    fn on_connect(&self, fd: c_int, entry: Option<&Arc<FdEntry>>, addr: AddrIn) -> Outcome<c_int> {
        self.tcp_connect(fd, entry, addr)
    }

    fn on_io(&self, fd: c_int, entry: &Arc<FdEntry>, call: IoCall) -> Outcome<ssize_t> {
        match call {
            IoCall::Recv { .. } | IoCall::RecvMsg { .. } => self.udp_recv(fd, entry, call),
            IoCall::Send { .. } | IoCall::SendMsg { .. } => self.udp_send(fd, entry, call),
        }
    }

    fn on_wait(&self, call: WaitCall) -> Outcome<c_int> {
        self.wait(call)
    }

    fn on_epoll_ctl(
        &self,
        epfd: c_int,
        op: c_int,
        fd: c_int,
        entry: &Arc<FdEntry>,
        ev: *mut libc::epoll_event,
    ) -> Outcome<c_int> {
        self.note_udp_epoll_ctl(epfd, op, fd, entry, ev);
        Outcome::Bypass("epoll_ctl on a managed socket goes to the kernel as is")
    }

    fn on_close(&self, fd: c_int, entry: &Arc<FdEntry>, last: bool) {
        self.forget_udp_epoll(fd);
        if !last {
            return;
        }
        if let Some(GcbSock::Listener { proxy, .. }) = gcb_state(entry) {
            self.client.lock().release(Transport::Tcp, proxy, entry);
        } else if let Some((proxy, _)) = udp::state(entry) {
            self.client.lock().release(Transport::Udp, proxy, entry);
        }
    }

    fn fork_prepare(&self) {
        self.client.lock_raw();
    }

    fn fork_parent(&self) {
        // SAFETY: fork_prepare locked it on this thread.
        unsafe { self.client.unlock_raw() };
    }

    fn fork_child_locks(&self) {
        // SAFETY: in the fork child (one thread); fork_prepare held the lock, no guard alive.
        unsafe { self.client.reset_in_child() };
    }

    fn exec_handoff(&self) -> Option<String> {
        self.handoff()
    }

    fn on_fork_child(&self) {
        self.client.lock().reset_after_fork();
        udp::registering_to_pending_after_fork();
    }
}
