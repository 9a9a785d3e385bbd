//! What the broker counts (printed by the stats line, see `stats`).

/// Counters, printed by the stats line.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Control datagrams dropped by `--allow`.
    pub not_allowed: u64,
    /// Registrations created.
    pub registered: u64,
    /// Registrations dropped because their lease ran out.
    pub expired: u64,
    /// Requests refused for quota/busy.
    pub refused: u64,
    /// Connections accepted on proxy sockets.
    pub proxy_accepts: u64,
    /// Connections refused on proxy or relay sockets (limits).
    pub conns_refused: u64,
    /// Relays started / finished cleanly / reset.
    pub relays_started: u64,
    /// Relays that finished cleanly.
    pub relays_done: u64,
    /// Relays that ended in a reset.
    pub relays_reset: u64,
    /// Bytes relayed by finished relays (the stats line adds running ones).
    pub relay_bytes: u64,
    /// Relay-port connections with a bad preamble, EOF or unknown id.
    pub bad_preambles: u64,
    /// Relay-port connections that did not send a preamble in time.
    pub preamble_timeouts: u64,
    /// Connect ids whose partner never arrived.
    pub pairing_timeouts: u64,
    /// Standby connections parked (see [`crate::standby`]).
    pub standby_parked: u64,
    /// Standby connections refused (unknown key, proxy full).
    pub standby_refused: u64,
    /// Proxy connections served by a standby.
    pub standby_claimed: u64,
    /// Claims not acked in time (fell back to connect_back).
    pub standby_fallbacks: u64,
    /// connect_back requests the listener never answered.
    pub connect_back_failures: u64,
    /// Decisions by route.
    pub direct: u64,
    /// Reverse decisions.
    pub reverse: u64,
    /// Relay decisions.
    pub relay: u64,
    /// reregister_request messages sent.
    pub reregister_sent: u64,
    /// `previous_proxy` or `unregister` requests without a valid ownership proof.
    pub ownership_refused: u64,
    /// Standby or connect presentations from an IP they are not bound to.
    pub foreign_presentations: u64,
    /// Control datagrams dropped by the per-IP rate limit.
    pub control_rate_limited: u64,
    /// Proxy connections and relay decisions refused by a relay limit (global,
    /// per proxy or per IP; also counted in `conns_refused` / `refused`).
    pub relay_limit_refusals: u64,
    /// Relay-port connections refused by the per-IP preamble limit.
    pub preamble_limit_refusals: u64,
    /// Relays reset for moving no byte for --relay-idle-secs.
    pub relays_idle_closed: u64,
    /// Registrations refused because every port of --proxy-ports was taken (also
    /// counted in `refused`).
    pub proxy_ports_exhausted: u64,
    /// TCP connections that went direct through a punched hole.
    pub punched: u64,
    /// TCP punches that did not connect: the connection was relayed.
    pub punch_fallback: u64,
    /// Relay decisions made at once because punching between the two public IPs failed
    /// lately (see `punchmemo`).
    pub punch_skipped: u64,
}
