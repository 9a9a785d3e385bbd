//! # gcb-portfwd: the DPF server
//!
//! Dynamic Port Forwarding (paper section 3): a root daemon on the NAT
//! gateway that forwards public ports of the gateway to sockets of clients
//! in the private network, on request, and removes the forwarding when the
//! client socket is gone.
//!
//! ```text
//! gcb-portfwd --public 203.0.113.1 --private 10.1.0.0/24 --ports 20000-29999 \
//!             --state /var/lib/gcb-portfwd (--key-file F | --insecure) \
//!             [--listen 10.1.0.1[:9651]] [--lan-if IFNAME]... \
//!             [--probe-interval-secs 10] [--quota 256] [--rate 50 --burst 200]
//! ```
//!
//! The control socket is UDP port 9651 on the gateway's first address
//! inside `--private` unless `--listen` says otherwise. On a cloud whose
//! public IP is 1:1-NATed to the gateway's WAN address (no interface holds
//! the public IP), `--public` is the WAN address (the dnat rules match what
//! packets arrive to) and `--advertise PUBLIC_IP` what clients are told. `--help` documents
//! every flag. SIGTERM/SIGINT stop it (mappings are kept: table, mirror and
//! kernel stay as they are); `kill -9` loses nothing either. SIGHUP reloads
//! what can change live, SIGUSR1 logs the stats line (see [`server`]).
//!
//! ## Secure by default
//!
//! * **Pool key required**: without `--key-file` (default `$GCB_KEY_FILE`)
//!   the daemon refuses to start (one line on stderr, exit status 1) unless
//!   `--insecure` is given; then it says once that requests are not
//!   authenticated and are accepted only from `--private` on the LAN
//!   interfaces.
//! * **LAN side only**: a control datagram is accepted only if it arrived
//!   on a LAN interface (the one holding the control address, loopback,
//!   and any `--lan-if`), whatever its source address claims; others are
//!   dropped and counted (`dropped_wrong_interface`). See [`server`].
//! * **Replay is not a way around policy**: at start (and at every sync)
//!   the mirror file is replayed under today's `--private`, `--ports` and
//!   `--quota`; what fails is quarantined (logged, not installed, dropped
//!   from the file), and a corrupt record never resurrects a deleted
//!   mapping. See [`mirror`].
//!
//! ## Architecture
//!
//! * [`table`]: the mapping table (public port -> private address, probe
//!   port), indexed by public port, private address and client;
//! * [`mirror`]: the mirror file, append-only, checksummed, fsynced,
//!   compacted at sync;
//! * [`kernel`]: the kernel table behind [`kernel::KernelBackend`]:
//!   nftables dnat maps in the daemon's own `table ip gcb_portfwd`
//!   ([`kernel::NftKernel`]) or an in-memory fake for tests;
//! * [`libnft`]: libnftables loaded at run time, so a transaction does not
//!   spawn `nft`;
//! * [`policy`]: who may forward what (`--private`, `--ports`, `--quota`,
//!   `--rate`), for requests and for what the mirror file replays;
//! * [`core`]: the paper's orders (add: table, mirror, kernel; delete:
//!   table, kernel, mirror), rule reuse, rollback, probe results, sync;
//!   no sockets and no clock reads (the server passes `now`);
//! * [`server`]: the mio loop (control UDP socket + gcb-proto `Endpoint`,
//!   non-blocking probe connections);
//! * [`client`]: a blocking client, used by the `gcb-dpf-request` tool;
//! * [`gcb_ops`] (crate in `brokerd/ops/`, shared with the other daemon): the operator's
//!   sockets, served in the loop: the admin unix socket (`--admin-socket`) and the
//!   Prometheus endpoint (`--metrics`), and what both daemons do alike around them (the
//!   `status` command's client, table helpers, metrics encoding, the stats line);
//!   [`status`]: the status document they answer and its tables for `gcb-portfwd status`;
//!   [`metrics`]: every `gcb_portfwd_*` metric and the stats counter it comes from.
//! * [`gcb_ops::logging`] (shared with the other daemon): the log line format and the
//!   level (changed by a reload).
//!
//! Floors: each module uses only modules on its own floor or below, with
//! no cycle; `scripts/modgraph --check portfwd/src` checks the list:
//!
//! - **Floor 0, data and policy**: `table`, `policy`, `libnft`, `client`, `status`, `metrics`
//! - **Floor 1, the two other representations**: `kernel`, `mirror`
//! - **Floor 2, the paper's orders**: `core`
//! - **Floor 3, the event loop**: `server` (`server::{iface, lifecycle, admin}`: the
//!   interfaces and `IP_PKTINFO`, the reload, the operator's view)
//!
//! `core`'s submodules (`core::plan`, `core::batch`, `core::probe`,
//! `core::sync`) add `impl Core` blocks and use `core`, never the reverse.
//! Logging is `tracing`; [`gcb_ops::logging`] installs the subscriber that writes
//! `TIMESTAMP gcb-portfwd: LEVEL message` lines to stderr (journald priorities
//! instead of timestamps under systemd).
//!
//! ## Protocol contract for the shim's DPF client
//!
//! Requests are gcb-proto messages over reliable UDP to the control port
//! (with the pool key if the server has one). Every successful reply
//! carries `epoch`, which grows by one at every daemon start.
//!
//! * **`forward{transport, private, desired_public_port, probe_port}`** ->
//!   `forwarded{public, epoch}`. Send it right after `bind()` of a TCP or
//!   UDP socket; `private` is the socket's bound address and must be the
//!   client host's own IPv4 address as the server sees it (the datagram's
//!   source IP): a socket bound to `0.0.0.0` must be reported with the
//!   address that faces the server. `getsockname()` then reports `public`.
//!   - Idempotent: the same request again (same private, same probe port)
//!     returns the same public port and changes nothing. A different
//!     `probe_port` for the same private address only updates the client
//!     information (same public port).
//!   - `desired_public_port`: that port if free and in range (if it is the
//!     private address's current port, nothing moves); absent: the
//!     private port's number if free and in range, else the next free
//!     port. Asking a different port for an already-mapped private
//!     address moves the mapping.
//!   - Refusals (`error{code, reason}`, nothing installed):
//!     `unauthorized` (source not in `--private`; a datagram that arrived
//!     on a non-LAN interface gets no answer at all), `not_owner` (`private`
//!     is not the sender's address), `port_range` (desired port outside
//!     `--ports` or used by another socket; range exhausted), `quota`
//!     (`--quota` mappings per client IP), `busy` (rate limit: back off
//!     and retry), `bad_request` (private port 0, probe port 0, IPv6),
//!     `internal` (mirror or kernel failure, rolled back).
//! * **`delete{transport, private}`** -> `deleted{epoch}`. Send it when the
//!   program makes the socket active (`connect()`) or closes it. Deleting
//!   an unmapped address also answers `deleted` (idempotent). Only the
//!   owner (source IP) may delete.
//! * **`query{transport, public}`** -> `query_result{private, epoch}`:
//!   `private` is the address behind `public` if it is one of this
//!   server's mappings (a same-network peer: connect to `private`
//!   directly), else absent. Any client in `--private` may ask.
//! * **Management (probe) socket**: a passive TCP socket on the client's
//!   private IP, `probe_port` in `forward`, that lives exactly as long as
//!   the client socket (shares its fate across dup, fork, exec, close).
//!   Each probe round (every `--probe-interval-secs`, default 10 s) the
//!   server connects to it once and closes at once, sending no data. A
//!   refused connection removes the socket's mappings at once; timeouts
//!   remove them after `--probe-failures` (default 3) rounds in a row.
//!   **The client must accept and close these connections** (from its
//!   event handler or a helper thread): the kernel keeps even closed
//!   probe connections in the accept queue, and a full queue makes probes
//!   time out, which removes the mapping. One management socket may
//!   serve several mappings (the server probes each distinct socket once
//!   per round).
//! * **Epoch**: if a reply's epoch differs from the one the client saw
//!   before, the server restarted. Its mappings survived (the mirror file),
//!   but the client should re-send `forward` for each live socket with
//!   `desired_public_port` = its current public port (idempotent; this also
//!   re-creates a mapping that was removed while the client was
//!   unreachable).
//! * Same public port reuse: a public port handed to a new client has its
//!   old connection-tracking entries removed before the reply is sent (only
//!   ports that may have some run the conntrack tool; see
//!   [`core`], "Conntrack", also for the residual risk).
//!
//! ## Kernel table
//!
//! See [`kernel`]. Forwarded packets also cross the gateway's forward
//! hook; a filter with `policy drop` needs `ct status dnat accept`. The
//! table holds a hairpin masquerade so private hosts may also use the
//! public address of a private peer.

#![warn(missing_docs)]

pub mod client;
pub mod core;
pub mod kernel;
pub mod libnft;
pub mod metrics;
pub mod mirror;
pub mod policy;
pub mod server;
pub mod status;
pub mod table;
