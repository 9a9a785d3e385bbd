//! The broker's configuration and its startup errors.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use gcb_proto::PoolKey;

use crate::allow::AllowList;

/// Default control (UDP) and relay (TCP) port.
pub const DEFAULT_PORT: u16 = 9650;

/// Daemon configuration (built by `main` from the command line; a reload builds a new one
/// and hands it to [`Server::reconfigure`](super::Server::reconfigure)).
#[derive(Debug)]
pub struct Config {
    /// Where the control UDP socket binds; the relay TCP listener binds the same
    /// IP:port and proxy sockets the same IP. May be a wildcard (`0.0.0.0`) when
    /// `advertise` is set; otherwise it is also the address told to clients.
    pub listen: SocketAddr,
    /// Pool key: authenticate every control datagram.
    pub key: Option<PoolKey>,
    /// Sources allowed to send control datagrams (empty: all).
    pub allow: AllowList,
    /// Maximum registrations broker-wide.
    pub max_registrations: usize,
    /// Maximum registrations per client IP (all its source ports together).
    pub max_registrations_per_ip: usize,
    /// Maximum concurrent relays, counting pairings still waiting for their
    /// second connection.
    pub max_relays: usize,
    /// Maximum relays plus pairings waiting, per connector IP (the proxy
    /// client's IP, or the IP that sent the `connect_request`).
    pub max_relays_per_ip: usize,
    /// Maximum pairings waiting for their listener, per proxy.
    pub max_pending_per_proxy: usize,
    /// Maximum pairings waiting for their listener, per connector IP.
    pub max_pending_per_ip: usize,
    /// Maximum relay-port connections still reading their preamble.
    pub max_preambles: usize,
    /// Maximum relay-port connections still reading their preamble, per source IP.
    pub max_preambles_per_ip: usize,
    /// Control datagrams per second per source IP (token bucket; 0: no limit).
    pub control_rate_per_ip: u32,
    /// Token bucket size of `control_rate_per_ip`.
    pub control_burst_per_ip: u32,
    /// A relay that moved no byte either way for this long is reset (None: never).
    pub relay_idle: Option<Duration>,
    /// Registration lease.
    pub lease: Duration,
    /// How long a connect id waits for its partner connection.
    pub connect_timeout: Duration,
    /// How long a relay-port connection may take to send its preamble.
    pub preamble_timeout: Duration,
    /// Period of the stats log line (None: only at exit).
    pub stats_interval: Option<Duration>,
    /// A UDP relay rule unused for this long expires.
    pub udp_rule_idle: Duration,
    /// Maximum UDP relay rules broker-wide.
    pub max_udp_rules: usize,
    /// Maximum UDP relay rules per proxy.
    pub max_udp_rules_per_proxy: usize,
    /// How long a freed proxy address stays reserved for its owner (only a
    /// `register{previous_proxy}` with the ownership proof gets it back meanwhile).
    pub proxy_reserve: Duration,
    /// Maximum UDP relay rules per proxy from one sender IP.
    pub max_udp_rules_per_sender_ip: usize,
    /// The IP told to clients as the broker's own: proxy addresses, the relay port
    /// in relay decisions and `connect_back`. None: the `listen` IP, which must then
    /// be specific. Set it when clients reach this host at an address no interface
    /// holds (a cloud VM's 1:1-NATed public IP) or when `listen` is a wildcard.
    pub advertise: Option<IpAddr>,
    /// Ports proxy sockets (TCP and UDP) take, for a firewall or security group
    /// (None: ephemeral ports). A registration finding none free is refused with
    /// `port_range`.
    pub proxy_ports: Option<PortRange>,
    /// More IPs of this host for TCP proxy sockets, each with its own port space
    /// (`proxy_ports`, else the ephemeral range): taken in order once the ports of the
    /// ones before are all in use, so one broker can hold more TCP registrations than
    /// one IP has ports. Each is bound and advertised as is. Needs a specific `listen`
    /// IP (a wildcard proxy port would collide with every IP's). UDP proxies stay on
    /// the advertised IP (the shim expects them there).
    pub proxy_ips: Vec<IpAddr>,
    /// How long relays may run on after SIGTERM before they are reset
    /// (see [`super::lifecycle`]; zero: exit at once).
    pub drain_grace: Duration,
}

pub use gcb_proto::addr::{PortRange, PortRangeError};

/// Errors that stop the daemon at startup.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The bind address is a wildcard and no advertised IP was given.
    #[error("bind address {0} is a wildcard: give --advertise IP, the address clients reach this broker at (proxy addresses are advertised on it)")]
    Unspecified(SocketAddr),
    /// The advertised IP is unusable.
    #[error("--advertise {advertise}: {why}")]
    Advertise {
        /// The advertised IP.
        advertise: IpAddr,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A `--proxy-ip` is unusable.
    #[error("--proxy-ip {ip}: {why}")]
    ProxyIp {
        /// The extra proxy IP.
        ip: IpAddr,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A socket could not be set up.
    #[error("{what} {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The poller failed.
    #[error("poll: {0}")]
    Poll(#[from] io::Error),
}
