//! # gcb-brokerd: the GCB broker daemon
//!
//! The broker of Generic Connection Brokering (paper section 4): an
//! unprivileged daemon, normally on a public host, that GCB clients (the
//! `libgcb.so` shim) register their listening sockets with. For each one it
//! opens a *proxy socket* whose address the program advertises instead of
//! its real (private) address. It then *brokers* every connection to such a
//! listener: it decides who should actively connect, and relays the bytes
//! itself when neither side can reach the other.
//!
//! ## Sockets
//!
//! All bound on the `--bind` IP (or `--listen`; default port 9650), which may be
//! the wildcard `0.0.0.0`. Clients are told the `--advertise` IP (default: the bound
//! one) with the bound port: every proxy address and the relay port in `relay`
//! decisions and `connect_back` are on it, so a broker behind a 1:1 NAT (a cloud VM
//! whose public IP no interface holds) advertises the public IP:
//!
//! * **control**: UDP `IP:PORT`, the gcb-proto request/response protocol
//!   (reliable UDP, optional pool-key HMAC);
//! * **relay port**: TCP on the same `IP:PORT`. Every connection to it
//!   starts with a 45-byte preamble ([`preamble`]): `GCB-CONNECT <32 hex
//!   connect id>\n` (two connections presenting the same id are spliced), or
//!   `GCB-STANDBY <32 hex standby key>\n` (a listener's parked *standby*
//!   connection, see [`standby`]);
//! * **proxy sockets**: one per registration, `IP:<ephemeral>` or a port of
//!   `--proxy-ports LO-HI` (or the `previous_proxy` port if free; with the range
//!   exhausted the registration is refused with `port_range`): a TCP listener for a TCP registration,
//!   a UDP socket for a UDP registration. A proxy address names exactly one
//!   registration: a TCP and a UDP proxy never share a port number, because
//!   `heartbeat` and `unregister` name proxies by address only. One IP has at most
//!   64,511 proxy ports: `--proxy-ip IP` (repeatable) adds IPs of the host for TCP
//!   proxies, each with its own port space, taken in order once the ones before are
//!   full (100,000 TCP registrations need two IPs; each also needs an fd, see
//!   `LimitNOFILE` in the systemd unit). GCB clients ask the broker only for proxies
//!   on its own address: a connection to a proxy on another `--proxy-ip` is brokered
//!   like a non-GCB client's (standby or dial-back, relayed).
//!
//! ## Architecture
//!
//! Like mio's `tcp_server` example: one thread, one `Poll`, and a
//! [`server::Server`] that moves bytes between sockets and small state
//! machines. The decisions live in pure modules that are unit-tested
//! without sockets:
//!
//! * [`registry`]: registrations keyed by (client's observed control
//!   address, listening socket's local address), with leases renewed by
//!   heartbeats and per-IP / global quotas;
//! * [`decision`]: direct / reverse / relay (paper 4.1); a relay between two punch-capable
//!   shims of a keyed pool becomes a TCP punch (`server::tcp_punch`, and
//!   [`gcb_proto::tcp_punch`] for the exchange), except for pairs of public IPs whose punch
//!   failed lately ([`punchmemo`]);
//! * [`preamble`]: parse and check the data-connection preamble byte by
//!   byte, so junk is dropped early and never over-read;
//! * [`standby`]: standby keys and parked standby connections per proxy;
//! * [`relay`]: two TCP sockets spliced through a pipe per direction with
//!   splice(2) (zero copy), half-close and reset propagation;
//! * [`udprules`]: UDP relay rules (proxy, sender) with idle expiry and
//!   global / per-proxy / per-sender-IP limits;
//! * [`udpproxy`]: the UDP data plane: proxy UDP sockets, Dummy/DummyAck,
//!   From/To frames ([`gcb_proto::udp`]);
//! * [`allow`]: the `--allow CIDR` source filter (networks are [`ipnet`]'s);
//! * [`iplimits`]: the per-IP token bucket of control datagrams;
//! * [`gcb_ops::logging`] (shared with the other daemon): `TIMESTAMP gcb-brokerd: LEVEL message` lines on stderr
//!   through [`tracing`] (`<PRIORITY>gcb-brokerd: ...` under journald), the
//!   level changeable at run time;
//! * [`gcb_ops`] (crate in `brokerd/ops/`, shared with the other daemon): the operator's
//!   sockets, served in the loop: the admin unix socket (`--admin-socket`) and the
//!   Prometheus endpoint (`--metrics`), and what both daemons do alike around them (the
//!   `status` command's client, table helpers, metrics encoding, the stats line);
//!   [`status`]: the status document they answer and its tables for `gcb-brokerd status`;
//!   [`metrics`]: every `gcb_broker_*` metric and the stats counter it comes from;
//! * [`server`]: the event loop gluing them to gcb-proto's sans-IO
//!   `Endpoint` (which does retransmission, duplicate suppression, auth, and
//!   counts every malformed or rejected datagram), one module per job
//!   (control datagrams, registrations, connect decisions, the relay port,
//!   standby claims, timers, stats, and `lifecycle`: SIGUSR1 logs the stats
//!   line, SIGHUP reloads through [`server::Server::reconfigure`], SIGTERM
//!   drains for up to `--drain-grace-secs`). The clock and the random source are
//!   injected ([`server::Clock`], [`server::Random`]), so its unit tests drive
//!   leases, deadlines and idle timeouts with a fake clock.
//!
//! Floors: each module uses only modules on its own floor or below, with
//! no cycle; `scripts/modgraph --check brokerd/src` checks the list:
//!
//! - **Floor 0, decisions and data**: `decision`, `registry`, `standby`, `relay`, `udprules`, `iplimits`, `allow`, `status`, `metrics`, `punchmemo`
//! - **Floor 1, the UDP data plane**: `udpproxy`
//! - **Floor 2, the server's state**: `server::env`, `server::counters`, `server::config`, `server::state`
//! - **Floor 3, the server's jobs**: `server`
//!
//! ## One brokered connection, end to end
//!
//! A server `S` at 10.1.0.5 behind NAT A, a broker `B` at 203.0.113.10, and
//! an ordinary client `X` on the internet that knows nothing of GCB:
//!
//! 1. `S` calls `listen()`; its shim sends `register{tcp, local:
//!    10.1.0.5:9618}` from its control socket, which NAT A maps to
//!    203.0.113.1:40001. `B` binds a proxy listener 203.0.113.10:41234,
//!    records (203.0.113.1:40001, 10.1.0.5:9618) -> proxy, and answers
//!    `registered{proxy, lease_ms}`. `S`'s `getsockname()` now reports the
//!    proxy, which is what it advertises. Heartbeats every ~10 s renew the
//!    lease and keep NAT A's UDP mapping open.
//!    The `registered` answer also carries the registration token `T`
//!    ([`gcb_proto::token`]); `S`'s shim derives the standby key from it
//!    (an HMAC under the pool key), dials the relay port 203.0.113.10:9650
//!    once and writes `GCB-STANDBY <key>\n`: `B` parks that connection for
//!    the proxy, because it comes from the registration's observed IP
//!    203.0.113.1 (a key replayed from elsewhere is refused). `S` keeps
//!    `T`'s ownership proof for `unregister` and for asking for the same
//!    proxy again (`register{previous_proxy, previous_token}`).
//! 2. `X` connects to 203.0.113.10:41234. `B` accepts and does **not** read
//!    (X's first bytes wait in the kernel). It takes the proxy's parked
//!    standby, writes the 12-byte claim `GCB-GO` + X's address on it, and
//!    splices the two as soon as the shim answers the one-byte ack; the shim
//!    hands the standby to `S`'s `accept()` as coming from X and dials a new
//!    standby. No datagram and no new TCP handshake on the critical path.
//! 3. Without a standby (none parked yet, `GCB_STANDBY=0`, or a claim not
//!    acked within a second because `S` is not running the shim's event
//!    handler), `B` draws a random 128-bit connect id and sends
//!    `connect_back{connect_id, dial: 203.0.113.10:9650, proxy,
//!    logical_peer: X's address}` to 203.0.113.1:40001: through the hole
//!    the heartbeats keep open. `S`'s shim acks, connects *out* to the relay
//!    port and writes `GCB-CONNECT <id>\n`. `B` reads exactly those 45
//!    bytes, finds the id, and splices the two connections; the shim hands
//!    the outbound connection to `S`'s `accept()` as coming from
//!    `logical_peer`.
//! 4. Bytes flow `X <-> B <-> S` through pipes in the kernel. When `X`
//!    half-closes, `B` drains what is in flight and half-closes towards `S`;
//!    `S` can still answer. A reset on either side resets the other.
//!
//! A GCB-aware connector instead asks `B` first (`connect_request`) and
//! gets a [`decision`]: `direct` (connect to the listener's real address),
//! `reverse` (the listener dials the connector) or `relay` (the connector
//! dials the relay port with the id; the listener's side is a claimed
//! standby, else a dial-back with the same id, as in step 3).
//!
//! ## One UDP datagram, end to end (paper 4.2.2)
//!
//! 1. The program's UDP socket 10.1.0.5:9618 is bound under GCB: the shim
//!    sends `register{udp, local: 10.1.0.5:9618}`; `B` binds a proxy UDP
//!    socket 203.0.113.10:41300 and answers `registered{proxy, lease_ms,
//!    token}` with the registration token `T` (32 lowercase hex chars).
//! 2. The shim sends, **from the program's socket**, a `Dummy` frame
//!    carrying the Dummy token derived from `T` ([`gcb_proto::token`]) to
//!    the proxy; NAT A maps it to 203.0.113.1:40777. `B` checks the token
//!    and that it comes from the registration's observed IP, records 203.0.113.1:40777 as the listener's
//!    *data address* and answers `DummyAck{addr: 203.0.113.1:40777,
//!    token}`. The shim repeats the Dummy every ~10-15 s (keeps the NAT
//!    mapping open); a good Dummy from a new source moves the data address.
//! 3. `X` sends a datagram to 203.0.113.10:41300. `B` creates (or renews)
//!    the relay rule (proxy, X) and sends `From{addr: X} | datagram` from
//!    the proxy socket to the data address. The shim unwraps it and
//!    `recvfrom()` reports `X`.
//! 4. The program answers `sendto(X)`: the shim sends `To{addr: X} |
//!    datagram` to the proxy; `B` accepts it only from the data address
//!    and only because (proxy, X) has a live rule, and sends the bare
//!    datagram from the proxy socket to `X`, which sees the reply coming
//!    from the address it sent to.
//! 5. A rule that relays nothing (either way) for `--udp-rule-idle-ms`
//!    (60 s) expires; the listener can no longer send to `X` until `X`
//!    sends again, which creates a new rule.
//!
//! Frame layout and the exact rules: [`gcb_proto::udp`] and [`udpproxy`].
//!
//! ## Contract for the shim
//!
//! * **Listener, on `connect_back{connect_id, dial, proxy, logical_peer}`**:
//!   answer `ack`, open a TCP connection to `dial`, write the 45 bytes
//!   `GCB-CONNECT <connect_id>\n`, and queue that connection for the
//!   listening socket registered as `proxy`; `accept()`/`getpeername()`
//!   report `logical_peer`. `dial` is either the broker's relay port
//!   (proxy and relay cases) or the connector's `connector_listen`
//!   (reverse case); the listener does the same thing in both. The broker
//!   waits `--connect-timeout-ms` (10 s) for the dial-back; after that the
//!   id is dead and the waiting side is closed.
//! * **Connector, `connect_decision{route}`**:
//!   * `direct{addr}`: `connect(addr)` (the listener's real address).
//!   * `reverse{connect_id}`: the broker has asked the listener to dial the
//!     `connector_listen` address from the request; accept on that socket a
//!     connection whose first 45 bytes are `GCB-CONNECT <connect_id>\n`
//!     (close any other), strip them, and use it as the connected socket.
//!     Only given when the connector is public and sent `connector_listen`.
//!   * `relay{addr, connect_id}`: `connect(addr)` (the broker's relay port),
//!     write `GCB-CONNECT <connect_id>\n`, then use the connection as is;
//!     the listener is told to dial the same port with the same id, and the
//!     broker splices the two. The listener's `logical_peer` is the
//!     request's `connector_listen`, else the connector's observed control
//!     address.
//!   * `error{..}`: `no_such_registration` (not a proxy of this broker or
//!     lapsed), `unsupported` (udp), `busy` (relay limit).
//! * **Restart recovery (paper 4.2.2)**: a heartbeat naming proxies the
//!   broker does not know for that client gets `heartbeat_ack{unknown}` (and,
//!   with a pool key only, a `reregister_request`); the client re-registers each unknown socket with
//!   `previous_proxy` set, and gets the same proxy port back if it is free.
//! * Registration is idempotent per (control source address, local
//!   address, transport); a duplicate UDP register gets the same proxy and
//!   the same token. `unregister{proxy}` is accepted only from the
//!   registering control address. UDP registrations take leases,
//!   heartbeats, `unregister` and `reregister_request` exactly as TCP ones;
//!   a re-registration gets a new token (send a Dummy with it at once).
//! * **Listener, standby**: a TCP registration's `registered.token` is its
//!   standby key. Park a relay-port connection with `GCB-STANDBY <key>\n`
//!   (at most [`standby::MAX_PER_PROXY`] per proxy); when `GCB-GO` + 6
//!   bytes (IPv4 + port of the logical peer) arrive on it, answer one `!`
//!   byte and use it as an accepted connection from that peer. Anything else
//!   on a parked standby closes it. A claim not acked within a second is
//!   abandoned (reset) and the broker sends `connect_back` instead.
//! * **UDP listener**: see the walk-through above. `connect_request{udp}`
//!   is answered `error{unsupported}`: a GCB UDP sender sends to the proxy
//!   like any sender, and a *registered* GCB sender also asks for a hole
//!   punch (`punch_request`; the broker answers `punch` and tells the
//!   destination `punch_back`, see [`gcb_proto::punch`]) so that its
//!   datagrams go direct once both sides' Dummy/DummyAck crossed. When a
//!   UDP registration goes away (unregister, lease expiry), every
//!   registration it was paired with (the last [`udpproxy::MAX_PUNCHED`])
//!   that is still registered gets `punch_end` naming it, and its shim
//!   drops the direct record (`udp_punch_ends`, `udp_punch_end_failures`).
//!
//! ## Limits and refusals
//!
//! Every resource has a broker-wide cap and a per-source-IP cap (per IP, not
//! IP:port: a host gets new source ports for free), chosen so that a whole pool
//! behind one NAT fits in one IP's share while one host cannot take all (the
//! reasoning is in each flag's `--help`): `--max-registrations` (16384) /
//! `--max-registrations-per-ip` (2048) answer `register` with `error{quota}`;
//! `--max-relays` (1024, running relays plus pairings waiting for their partner)
//! / `--max-relays-per-ip` (256, counted against the connector) /
//! `--max-pending-per-proxy` (64) / `--max-pending-per-ip` (32) reset new proxy
//! connections and answer relay decisions with `error{busy}`; `--max-preambles`
//! (1024) / `--max-preambles-per-ip` (128) reset relay-port connections;
//! `--control-rate-per-ip` (200/s, burst `--control-burst-per-ip` 2000) drops
//! control datagrams over a token bucket per IP; `--relay-idle-secs` (3600)
//! resets relays that moved no byte for that long. Relayed sockets carry
//! `SO_LINGER 0` while the relay runs, so a broker that dies resets both ends
//! (see [`relay`]). A restart storm (every client of a pool re-registering within one
//! heartbeat interval) is served as it comes: answers go out every 64 control datagrams
//! read, and `reregister_request` is skipped while half the endpoint's outstanding
//! requests are taken (the heartbeat ack's `unknown` already has the shim re-register;
//! connect_backs keep the other half); the control socket asks for a 1 MiB receive
//! buffer, and a line at start says when `net.core.rmem_max` grants less. Without a key, replies are never larger than the request
//! (see [`gcb_proto::rudp`]) and no `reregister_request` is sent; with a key,
//! frames stamped before the broker's start are refused. Each refusal logs a
//! line (at most one per second per limit) and is counted in the stats line
//! (`gcb-brokerd: INFO stats ...`), printed every `--stats-interval-secs`
//! and at exit.
//!
//! UDP: `--max-udp-rules` (65536, broker-wide) and
//! `--max-udp-rules-per-proxy` (4096): when full, a datagram from a *new*
//! sender is dropped with a rate-limited log line (dead rules are purged
//! first; live rules are never evicted). UDP drops are counted by reason in
//! the stats line: `udp_drop_bad_token` (Dummy with a wrong or missing
//! token), `udp_drop_no_listener` (sender datagram before any Dummy),
//! `udp_drop_no_rule` (To to a destination without a live rule),
//! `udp_drop_table_full`, `udp_drop_not_frame` (from the data address but
//! not a Dummy/To frame), `udp_drop_stray` (other GCBU frames from anyone
//! but the listener), `udp_drop_too_big` (sender datagrams over
//! [`gcb_proto::udp::MAX_UDP_PAYLOAD`] = 65496 bytes cannot be wrapped into
//! one IPv4 datagram), `udp_send_errors`; relayed traffic as
//! `udp_to_listener[_bytes]`, `udp_from_listener[_bytes]`, plus
//! `udp_proxies`, `udp_rules`, `udp_rules_created`, `udp_rules_expired`,
//! `udp_dummies`.
//!
//! ## Not yet
//!
//! TCP hole punching is not attempted (relay is the fallback). UDP proxies
//! need an IPv4 `--listen` (frames carry IPv4 addresses). A sender datagram whose bytes happen to start with a
//! GCBU frame header is treated as a frame (dropped unless it is a Dummy
//! with the right token).

pub mod allow;
pub mod decision;
pub mod iplimits;
pub mod metrics;
pub use gcb_proto::preamble;
pub mod punchmemo;
pub mod registry;
pub mod relay;
pub mod server;
pub mod standby;
pub mod status;
pub mod udpproxy;
pub mod udprules;
