//! The state of one program socket the shim manages: one enum, every transition here.
//!
//! Floor 1 (uses only [`crate::fdtable::ShimFd`]'s type through [`DpfSock`] and plain
//! data from `gcb-proto`). The fd table ([`crate::fdtable`]) keeps one [`SockState`] per
//! managed socket, behind the entry's lock and shared by dup'd fds; the GCB and DPF
//! layers read and change it only through the methods below, so the life of a socket
//! can be read in one place:
//!
//! ```text
//!  TCP, GCB:  Plain --listen()+registered--> GcbListener --(exec/close)--> gone
//!             Plain --bind(our public IP)--> PublicBind --getsockname()/listen()--> GcbListener
//!             Plain <--accept() returns a brokered connection-- GcbAccepted
//!  UDP, GCB:  Plain --bind(port 0)--> UdpPending --first send to the broker's host-->
//!             UdpRegistering --answer--> UdpRegistered (relay, receivers, punch table)
//!             (bind(port N), or getsockname() on a pending socket, registers at once)
//!  DPF:       Plain --bind(port 0)--> DpfPending --getsockname()/listen()--> DpfMapped
//!             Plain --bind(port N)--> DpfMapped --connect()/close--> Plain
//! ```

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use gcb_proto::punch::PunchTable;
use gcb_proto::Transport;

use crate::ownfd::ShimFd;

/// What the shim knows about one managed program socket.
#[derive(Default)]
pub enum SockState {
    /// In the table (so its calls reach the layer), nothing registered or mapped.
    #[default]
    Plain,
    /// A GCB TCP socket: a registered listener or a brokered accepted connection.
    Gcb(GcbSock),
    /// A UDP socket the program bound to port 0: it registers only when its address
    /// matters, at its first getsockname() or its first send to the broker's host.
    UdpPending,
    /// A [`SockState::UdpPending`] socket whose registration is on its way (answered in the
    /// AEH); meanwhile a plain socket, and getsockname() waits for the answer.
    UdpRegistering,
    /// A GCB-registered UDP socket.
    UdpRegistered(UdpSock),
    /// A TCP socket the program bound to the host's public address (bound locally by the
    /// shim): GCB registers it at its first getsockname(), before listen().
    PublicBind,
    /// A socket bound to port 0 under DPF: forwarded at getsockname() or listen().
    DpfPending(Transport),
    /// A socket portfwd forwards.
    DpfMapped(DpfSock),
}

/// A GCB TCP socket's addresses (copied out by value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GcbSock {
    /// A registered listening socket.
    Listener {
        proxy: SocketAddrV4,
        local: SocketAddrV4,
    },
    /// A brokered connection returned by accept(): its logical peer, the listener's proxy
    /// (the address the peer dialed) and the listener's address family (the form the
    /// program expects addresses in; the connection itself is the shim's AF_INET socket).
    Accepted {
        peer: SocketAddrV4,
        proxy: SocketAddrV4,
        family: libc::c_int,
    },
}

/// A GCB-registered UDP socket.
pub struct UdpSock {
    pub proxy: SocketAddrV4,
    /// `connect()`ed to this relayed sender (virtually: the kernel stays unconnected).
    pub peer: Option<SocketAddrV4>,
    /// Senders seen through the proxy: replies to them go back through it.
    pub receivers: HashSet<SocketAddrV4>,
    /// Punched peers (GCB <-> GCB): datagrams to them go direct.
    pub punch: PunchTable,
    /// The broker's IP: a send to another address on it may be punched.
    pub broker: Ipv4Addr,
}

impl UdpSock {
    /// A registered socket's state: relayed through `proxy` on the broker at `broker`,
    /// no sender heard yet, nothing punched.
    pub fn new(proxy: SocketAddrV4, broker: Ipv4Addr) -> UdpSock {
        UdpSock {
            proxy,
            peer: None,
            receivers: HashSet::new(),
            punch: PunchTable::new(),
            broker,
        }
    }
}

/// A socket portfwd forwards.
pub struct DpfSock {
    pub transport: Transport,
    pub private: SocketAddrV4,
    pub public: SocketAddrV4,
    /// The probe socket that proves to portfwd the mapping is still wanted.
    pub probe: Arc<ShimFd>,
    /// The socket's inode (identifies it across processes).
    pub inode: u64,
}

impl SockState {
    /// The GCB TCP addresses, if a GCB listener or accepted connection.
    pub fn gcb(&self) -> Option<GcbSock> {
        match self {
            SockState::Gcb(g) => Some(*g),
            _ => None,
        }
    }

    /// The registered UDP socket, if registered.
    pub fn udp(&self) -> Option<&UdpSock> {
        match self {
            SockState::UdpRegistered(u) => Some(u),
            _ => None,
        }
    }

    /// The registered UDP socket, mutable.
    pub fn udp_mut(&mut self) -> Option<&mut UdpSock> {
        match self {
            SockState::UdpRegistered(u) => Some(u),
            _ => None,
        }
    }

    /// The DPF mapping, if mapped.
    pub fn dpf(&self) -> Option<&DpfSock> {
        match self {
            SockState::DpfMapped(d) => Some(d),
            _ => None,
        }
    }

    /// The transport of a DPF-pending socket.
    pub fn dpf_pending(&self) -> Option<Transport> {
        match self {
            SockState::DpfPending(t) => Some(*t),
            _ => None,
        }
    }

    /// Ends the state if `matches` says it is the one to end; returns the old state.
    fn take_if(&mut self, matches: impl FnOnce(&SockState) -> bool) -> Option<SockState> {
        matches(self).then(|| std::mem::take(self))
    }

    /// UdpPending -> Plain; true if it was pending.
    pub fn take_udp_pending(&mut self) -> bool {
        self.take_if(|s| matches!(s, SockState::UdpPending))
            .is_some()
    }

    /// UdpRegistering -> Plain; true if it was registering (the AEH's answer applies).
    pub fn take_udp_registering(&mut self) -> bool {
        self.take_if(|s| matches!(s, SockState::UdpRegistering))
            .is_some()
    }

    /// DpfPending -> Plain; the transport if it was pending.
    pub fn take_dpf_pending(&mut self) -> Option<Transport> {
        match self.take_if(|s| matches!(s, SockState::DpfPending(_)))? {
            SockState::DpfPending(t) => Some(t),
            _ => None,
        }
    }

    /// DpfMapped -> Plain; the mapping if it was mapped.
    pub fn take_dpf(&mut self) -> Option<DpfSock> {
        match self.take_if(|s| matches!(s, SockState::DpfMapped(_)))? {
            SockState::DpfMapped(d) => Some(d),
            _ => None,
        }
    }

    /// Plain -> DpfPending (a socket in any other state keeps it).
    pub fn mark_dpf_pending(&mut self, transport: Transport) {
        if matches!(self, SockState::Plain) {
            *self = SockState::DpfPending(transport);
        }
    }

    /// A registered socket's proxy changed (re-registration after a broker restart).
    pub fn set_proxy(&mut self, proxy: SocketAddrV4) {
        match self {
            SockState::Gcb(GcbSock::Listener { proxy: p, .. }) => *p = proxy,
            SockState::UdpRegistered(u) => u.proxy = proxy,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn transitions_take_only_their_own_state() {
        let mut s = SockState::UdpPending;
        assert!(!s.take_udp_registering());
        assert!(s.take_udp_pending());
        assert!(matches!(s, SockState::Plain));
        s.mark_dpf_pending(Transport::Tcp);
        assert_eq!(s.dpf_pending(), Some(Transport::Tcp));
        s.mark_dpf_pending(Transport::Udp); // already pending: unchanged
        assert_eq!(s.take_dpf_pending(), Some(Transport::Tcp));
        assert!(s.take_dpf().is_none());
    }

    #[test]
    fn set_proxy_updates_listeners_and_udp_only() {
        let mut l = SockState::Gcb(GcbSock::Listener {
            proxy: a("1.1.1.1:1"),
            local: a("10.0.0.1:2"),
        });
        l.set_proxy(a("1.1.1.1:9"));
        assert_eq!(
            l.gcb(),
            Some(GcbSock::Listener {
                proxy: a("1.1.1.1:9"),
                local: a("10.0.0.1:2")
            })
        );
        let mut u = SockState::UdpRegistered(UdpSock::new(a("1.1.1.1:3"), Ipv4Addr::LOCALHOST));
        u.set_proxy(a("1.1.1.1:4"));
        assert_eq!(u.udp().unwrap().proxy, a("1.1.1.1:4"));
        let accepted = GcbSock::Accepted {
            peer: a("2.2.2.2:5"),
            proxy: a("1.1.1.1:3"),
            family: libc::AF_INET6,
        };
        let mut acc = SockState::Gcb(accepted);
        acc.set_proxy(a("1.1.1.1:4"));
        assert_eq!(acc.gcb(), Some(accepted));
    }
}
