//! The sans-IO reliable request/response endpoint.
//!
//! One [`Endpoint`] per UDP socket, on both sides (shim and daemons): either
//! side may send requests. The owner feeds it input and drains its output:
//!
//! ```text
//!   owner                                   Endpoint
//!   send_request / respond / cancel  --->   (queue transmissions, timers)
//!   handle_datagram(bytes from socket) ->   (auth, decode, dedup, match)
//!   handle_timeout(now) at poll_timeout ->  (retransmit, expire)
//!   poll_transmit()  <-- send these on the socket
//!   poll_event()     <-- Request / Response / Timeout for the application
//!   poll_timeout()   <-- when to call handle_timeout next
//! ```
//!
//! Rules:
//! - A request is transmitted at once, then retransmitted after `initial_rto`,
//!   doubling to `max_rto`, until its response arrives or `request_deadline`
//!   passes; then exactly one [`Event::Timeout`]. Every (re)transmission is
//!   sealed afresh (new auth nonce and timestamp), with the same message id.
//! - A response from a peer other than the request's destination is ignored
//!   and counted. (With a key, such a frame still consumes its auth nonce, so
//!   a captured reply raced from a spoofed address delays the request by one
//!   retransmission, answered from the peer's cache with a fresh nonce.) A response that matches nothing outstanding (late duplicate)
//!   is counted and dropped.
//! - A new request is surfaced as [`Event::Request`] once and remembered per
//!   (peer, id). A duplicate arriving before the application responds is
//!   dropped (counted); after [`Endpoint::respond`], duplicates are answered
//!   from the reply cache for `reply_cache_ttl` and never surfaced again.
//!   `reply_cache_ttl` must exceed the peers' `request_deadline`.
//! - A request this version cannot decode is answered automatically with
//!   `error{code}`: `version` (newer `v`), `unsupported` (unknown `type`),
//!   `bad_request` (bad fields). A response that cannot be decoded completes
//!   its request with such an `error` body synthesized locally.
//! - Memory is bounded: at most `max_outstanding` requests in flight
//!   ([`SendError::TooManyOutstanding`]), `max_cache_entries` remembered
//!   incoming requests (beyond that, new requests are answered `error{busy}`
//!   without executing them), `max_queued_transmits` queued datagrams, and
//!   the auth layer's `max_sessions`.
//! - Malformed or rejected datagrams are counted in [`Stats`] and dropped.
//!
//! **No amplification without a key**: an unkeyed datagram's source address is not
//! proven, so an unkeyed endpoint never sends a reply frame larger than the request
//! datagram it answers (the reply would flood a spoofed victim). A reply that does not
//! fit is replaced by the smallest `error{bad_request}` envelope (reason empty); if
//! even that does not fit, nothing is sent. Both are counted
//! ([`Stats::replies_shrunk`], [`Stats::replies_withheld`]). So that honest peers' replies
//! fit, an unkeyed endpoint pads its own requests with trailing JSON whitespace to
//! [`UNKEYED_REQUEST_MIN`] bytes. Keyed endpoints neither pad nor limit: a keyed
//! request is authenticated and cannot be replayed from a spoofed address.
//!
//! **Not before**: [`Endpoint::set_not_before`] refuses keyed frames stamped before the
//! owner's start (see [`crate::auth`]).
//!
//! Message ids start at a value derived from the caller's random `session`,
//! so a restarted peer does not collide with the ids in our reply cache.
//!
//! Heartbeats are ordinary requests the owner sends on a timer; [`Ticker`]
//! says when the next one is due.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::auth::{Opener, PoolKey, RejectReason, Sealer, DEFAULT_MAX_SESSIONS, UNKEYED_OVERHEAD};
use crate::msg::{Body, DecodeError, EncodeError, Envelope, ErrorCode, MAX_ENVELOPE};

/// An unkeyed endpoint pads its requests to at least this many bytes (frame included), so
/// that the answers it expects fit the no-amplification rule (see module docs): the
/// largest reply of the protocol (`registered` with a token, `punch`, a forward mapping)
/// stays well under it.
pub const UNKEYED_REQUEST_MIN: usize = 512;

/// The current time, as the owner read it: monotonic for timers, wall clock
/// (unix ms) for auth timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time (timers, deadlines).
    pub mono: Instant,
    /// Wall clock, unix epoch milliseconds (auth timestamps).
    pub unix_ms: u64,
}

/// Endpoint tuning. `Default` gives the values in the field docs.
#[derive(Debug, Clone)]
pub struct Config {
    /// First retransmission delay (200 ms).
    pub initial_rto: Duration,
    /// Backoff ceiling (2 s).
    pub max_rto: Duration,
    /// Give up on a request after this (10 s).
    pub request_deadline: Duration,
    /// Keep replies (and unanswered incoming requests) this long (30 s).
    pub reply_cache_ttl: Duration,
    /// Accepted clock difference for keyed frames (30 s).
    pub replay_window: Duration,
    /// Cap on requests in flight (1024).
    pub max_outstanding: usize,
    /// Cap on remembered incoming requests, answered or not (4096).
    pub max_cache_entries: usize,
    /// Cap on datagrams waiting in `poll_transmit` (4096).
    pub max_queued_transmits: usize,
    /// Cap on sender sessions tracked by the replay window (4096).
    pub max_sessions: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            initial_rto: Duration::from_millis(200),
            max_rto: Duration::from_secs(2),
            request_deadline: Duration::from_secs(10),
            reply_cache_ttl: Duration::from_secs(30),
            replay_window: Duration::from_secs(30),
            max_outstanding: 1024,
            max_cache_entries: 4096,
            max_queued_transmits: 4096,
            max_sessions: DEFAULT_MAX_SESSIONS,
        }
    }
}

/// A message id. For our requests it is ours; in [`Event::Request`] it is the
/// peer's (unique together with the peer address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub to: SocketAddr,
    /// The frame (auth framing included), at most [`crate::MAX_DATAGRAM`] bytes.
    pub payload: Vec<u8>,
}

/// What the application must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new request; answer with [`Endpoint::respond`] using `from` and `id`.
    Request {
        /// The peer.
        from: SocketAddr,
        /// The peer's message id.
        id: RequestId,
        /// The request.
        body: Body,
    },
    /// The response to one of our requests.
    Response {
        /// The peer (always the request's destination).
        from: SocketAddr,
        /// Our request id.
        request: RequestId,
        /// The response (possibly `error`).
        body: Body,
    },
    /// No response before the deadline.
    Timeout {
        /// The request's destination.
        to: SocketAddr,
        /// Our request id.
        request: RequestId,
    },
}

/// Why a request or response could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The message does not fit in a datagram.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// `max_outstanding` requests are in flight.
    #[error("too many outstanding requests")]
    TooManyOutstanding,
    /// The reply cache is full and the request being answered is not in it.
    #[error("reply cache full")]
    CacheFull,
}

/// Counters. Everything dropped is counted somewhere here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to `poll_transmit` (all kinds, retransmits included).
    pub sent: u64,
    /// New requests sent (first transmissions).
    pub requests_sent: u64,
    /// Request retransmissions.
    pub retransmits: u64,
    /// Responses sent by `respond` (first transmissions).
    pub responses_sent: u64,
    /// Automatic `error` replies to undecodable requests.
    pub error_replies: u64,
    /// New requests refused with `error{busy}` because the cache was full.
    pub busy_refusals: u64,
    /// Datagrams received (before any check).
    pub received: u64,
    /// New requests surfaced as `Event::Request`.
    pub requests_received: u64,
    /// Responses that completed a request.
    pub responses_received: u64,
    /// Duplicate requests answered again from the reply cache.
    pub duplicates_answered_from_cache: u64,
    /// Duplicate requests dropped while the application had not responded.
    pub duplicates_pending: u64,
    /// Responses for no outstanding request (late duplicates, cancelled).
    pub unmatched_responses: u64,
    /// Responses from a peer other than the request's destination.
    pub wrong_peer_responses: u64,
    /// Undecodable responses turned into a local `error` body.
    pub undecodable_responses: u64,
    /// Requests that reached their deadline.
    pub timeouts: u64,
    /// Frames that passed auth but are not a usable envelope (no header).
    pub malformed: u64,
    /// Frames rejected by auth, indexed by [`RejectReason::index`].
    pub rejected: [u64; RejectReason::COUNT],
    /// Datagrams dropped because the transmit queue was full.
    pub transmit_queue_drops: u64,
    /// Unkeyed replies larger than their request, replaced by a minimal error.
    pub replies_shrunk: u64,
    /// Unkeyed replies not sent at all: even the minimal error was larger than the request.
    pub replies_withheld: u64,
}

impl Stats {
    /// Frames rejected for `reason`.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()]
    }

    /// Frames rejected for any reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

#[derive(Debug)]
struct Outstanding {
    to: SocketAddr,
    json: Vec<u8>,
    next_tx: Instant,
    rto: Duration,
    deadline: Instant,
}

impl Outstanding {
    fn wake(&self) -> Instant {
        self.next_tx.min(self.deadline)
    }
}

#[derive(Debug)]
enum Incoming {
    /// Surfaced, not yet answered; `req_len` is the request datagram's size (the
    /// unkeyed reply limit).
    Pending { expires: Instant, req_len: usize },
    /// Answered; `json` is replayed to duplicates.
    Answered { json: Vec<u8>, expires: Instant },
}

impl Incoming {
    fn expires(&self) -> Instant {
        match self {
            Incoming::Pending { expires, .. } | Incoming::Answered { expires, .. } => *expires,
        }
    }
}

type PeerId = (SocketAddr, u64);

/// The reliable request/response state machine (see module docs).
#[derive(Debug)]
pub struct Endpoint {
    config: Config,
    sealer: Sealer,
    opener: Opener,
    next_id: u64,
    outstanding: HashMap<u64, Outstanding>,
    /// (wake time, id) for every outstanding request.
    timers: BTreeSet<(Instant, u64)>,
    incoming: HashMap<PeerId, Incoming>,
    /// Expiry queue for `incoming` (lazy: entries may be stale).
    expiry: VecDeque<(Instant, PeerId)>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Endpoint {
    /// `session` must be random per process start (the caller's randomness):
    /// it is the auth nonce session and seeds the message ids.
    pub fn new(config: Config, key: Option<PoolKey>, session: u64) -> Self {
        let window_ms = u64::try_from(config.replay_window.as_millis()).unwrap_or(u64::MAX);
        let opener = Opener::new(key.clone(), window_ms, config.max_sessions);
        Endpoint {
            // Keep ids below 2^53 so they survive JSON readers that use doubles.
            next_id: (splitmix(session) >> 12).max(1),
            sealer: Sealer::new(key, session),
            opener,
            config,
            outstanding: HashMap::new(),
            timers: BTreeSet::new(),
            incoming: HashMap::new(),
            expiry: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// Refuses keyed frames stamped before `unix_ms` (give the process start: a frame
    /// captured before a restart is not accepted after it).
    pub fn set_not_before(&mut self, unix_ms: u64) {
        self.opener.set_not_before(unix_ms);
    }

    /// Seals and accepts frames with `key` from now on (a daemon's reload of its pool
    /// key): frames made with the old key are rejected like any wrong key. Requests in
    /// flight and the reply cache are kept.
    pub fn set_key(&mut self, key: Option<PoolKey>) {
        self.sealer.set_key(key.clone());
        self.opener.set_key(key);
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Requests in flight.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Incoming requests remembered (pending or answered).
    pub fn cached(&self) -> usize {
        self.incoming.len()
    }

    /// Sessions evicted from the replay window while still inside the
    /// timestamp window (see [`crate::auth`]).
    pub fn premature_session_evictions(&self) -> u64 {
        self.opener.premature_evictions()
    }

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    fn queue(&mut self, now: Now, to: SocketAddr, json: &[u8]) {
        if self.transmits.len() >= self.config.max_queued_transmits {
            self.stats.transmit_queue_drops += 1;
            return;
        }
        let payload = self.sealer.seal(now.unix_ms, json);
        self.stats.sent += 1;
        self.transmits.push_back(Transmit { to, payload });
    }

    /// Queues the first transmission of a request with the configured
    /// deadline. The response (or timeout) arrives as an [`Event`].
    pub fn send_request(
        &mut self,
        now: Now,
        to: SocketAddr,
        body: Body,
    ) -> Result<RequestId, SendError> {
        let deadline = self.config.request_deadline;
        self.send_request_with_deadline(now, to, body, deadline)
    }

    /// Like [`Endpoint::send_request`] with a per-request deadline.
    pub fn send_request_with_deadline(
        &mut self,
        now: Now,
        to: SocketAddr,
        body: Body,
        deadline: Duration,
    ) -> Result<RequestId, SendError> {
        if self.outstanding.len() >= self.config.max_outstanding {
            return Err(SendError::TooManyOutstanding);
        }
        let id = self.next_id;
        let mut json = Envelope::request(id, body).encode()?;
        if !self.sealer.is_keyed() {
            // Trailing whitespace is valid JSON: room for the reply (see module docs).
            let want = (UNKEYED_REQUEST_MIN - UNKEYED_OVERHEAD).min(MAX_ENVELOPE);
            if json.len() < want {
                json.resize(want, b' ');
            }
        }
        self.alloc_id();
        self.queue(now, to, &json);
        self.stats.requests_sent += 1;
        let o = Outstanding {
            to,
            json,
            next_tx: now.mono + self.config.initial_rto,
            rto: self.config.initial_rto,
            deadline: now.mono + deadline,
        };
        self.timers.insert((o.wake(), id));
        self.outstanding.insert(id, o);
        Ok(RequestId(id))
    }

    /// Answers request `request` from `to`: queues the reply and caches it
    /// for `reply_cache_ttl` so duplicates are answered without surfacing.
    pub fn respond(
        &mut self,
        now: Now,
        to: SocketAddr,
        request: RequestId,
        body: Body,
    ) -> Result<(), SendError> {
        let key = (to, request.0);
        // Unknown (expired) requests get no unkeyed reply: their size is forgotten.
        let req_len = match self.incoming.get(&key) {
            Some(Incoming::Pending { req_len, .. }) => *req_len,
            Some(Incoming::Answered { .. }) => usize::MAX,
            None => {
                self.purge(now.mono);
                if self.incoming.len() >= self.config.max_cache_entries {
                    return Err(SendError::CacheFull);
                }
                0
            }
        };
        let id = self.next_id;
        let json = Envelope::response(id, request.0, body).encode()?;
        self.alloc_id();
        let json = self.fit_reply(json, id, request.0, req_len);
        if let Some(json) = &json {
            self.queue(now, to, json);
        }
        self.stats.responses_sent += 1;
        self.cache_answer(now, key, json.unwrap_or_default());
        Ok(())
    }

    /// The no-amplification rule (module docs): `json` (reply `id` to request `re`) as
    /// is when keyed or when its frame fits in `limit` bytes, else the minimal error if
    /// that fits, else None (nothing may be sent).
    fn fit_reply(&mut self, json: Vec<u8>, id: u64, re: u64, limit: usize) -> Option<Vec<u8>> {
        if self.sealer.is_keyed() || json.len() + UNKEYED_OVERHEAD <= limit {
            return Some(json);
        }
        let small = Envelope::response(id, re, Body::error(ErrorCode::BadRequest, ""))
            .encode()
            .ok()
            .filter(|j| j.len() + UNKEYED_OVERHEAD <= limit);
        match small {
            Some(j) => {
                self.stats.replies_shrunk += 1;
                Some(j)
            }
            None => {
                self.stats.replies_withheld += 1;
                None
            }
        }
    }

    fn cache_answer(&mut self, now: Now, key: PeerId, json: Vec<u8>) {
        let expires = now.mono + self.config.reply_cache_ttl;
        self.incoming
            .insert(key, Incoming::Answered { json, expires });
        self.expiry.push_back((expires, key));
    }

    /// Stops retransmitting request `id`; no event will be reported for it.
    pub fn cancel(&mut self, id: RequestId) {
        if let Some(o) = self.outstanding.remove(&id.0) {
            self.timers.remove(&(o.wake(), id.0));
        }
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next application event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When the next retransmission or request deadline is due, ignoring reply-cache
    /// expiry. For a caller that should not wake up only to forget cached replies (the
    /// shim runs inside the program's blocking calls): the cache is still purged by
    /// every [`Endpoint::handle_timeout`] call, and it is bounded.
    pub fn poll_request_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// When [`Endpoint::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = self.timers.first().map(|(t, _)| *t);
        let c = self.expiry.front().map(|(t, _)| *t);
        match (t, c) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs timers due at `now`: retransmissions, deadlines, cache expiry.
    pub fn handle_timeout(&mut self, now: Now) {
        while let Some(&(wake, id)) = self.timers.first() {
            if wake > now.mono {
                break;
            }
            self.timers.remove(&(wake, id));
            let Some(mut o) = self.outstanding.remove(&id) else {
                continue;
            };
            if o.deadline <= now.mono {
                self.stats.timeouts += 1;
                self.events.push_back(Event::Timeout {
                    to: o.to,
                    request: RequestId(id),
                });
                continue;
            }
            if o.next_tx <= now.mono {
                let json = std::mem::take(&mut o.json);
                self.queue(now, o.to, &json);
                o.json = json;
                self.stats.retransmits += 1;
                o.rto = (o.rto * 2).min(self.config.max_rto);
                o.next_tx = now.mono + o.rto;
            }
            self.timers.insert((o.wake(), id));
            self.outstanding.insert(id, o);
        }
        self.purge(now.mono);
    }

    fn purge(&mut self, now: Instant) {
        while let Some(&(t, key)) = self.expiry.front() {
            if t > now {
                break;
            }
            self.expiry.pop_front();
            if self.incoming.get(&key).is_some_and(|e| e.expires() <= now) {
                self.incoming.remove(&key);
            }
        }
    }

    /// Feeds one received datagram. Never panics; bad input is counted.
    pub fn handle_datagram(&mut self, now: Now, from: SocketAddr, bytes: &[u8]) {
        self.stats.received += 1;
        let json = match self.opener.open(now.unix_ms, bytes) {
            Ok(j) => j,
            Err(r) => {
                self.stats.rejected[r.index()] += 1;
                return;
            }
        };
        match Envelope::decode(json) {
            Ok(env) => match env.re {
                Some(re) => self.on_response(from, re, env.body),
                None => self.on_request(now, from, env.id, env.body, bytes.len()),
            },
            Err(e) => self.on_undecodable(now, from, e, bytes.len()),
        }
    }

    fn on_response(&mut self, from: SocketAddr, re: u64, body: Body) {
        let Some(o) = self.outstanding.get(&re) else {
            self.stats.unmatched_responses += 1;
            return;
        };
        if o.to != from {
            self.stats.wrong_peer_responses += 1;
            return;
        }
        let wake = o.wake();
        self.outstanding.remove(&re);
        self.timers.remove(&(wake, re));
        self.stats.responses_received += 1;
        self.events.push_back(Event::Response {
            from,
            request: RequestId(re),
            body,
        });
    }

    /// Looks up (from, id). Returns true if the request is new and a cache
    /// slot was reserved for it; otherwise handles the duplicate/refusal.
    fn admit(&mut self, now: Now, from: SocketAddr, id: u64, req_len: usize) -> bool {
        self.purge(now.mono);
        let key = (from, id);
        match self.incoming.get(&key) {
            Some(Incoming::Answered { json, .. }) => {
                let json = json.clone();
                self.stats.duplicates_answered_from_cache += 1;
                // Empty: the reply was withheld. A duplicate may be smaller than the
                // request that was answered: the size rule holds for it too.
                if json.is_empty()
                    || (!self.sealer.is_keyed() && json.len() + UNKEYED_OVERHEAD > req_len)
                {
                    self.stats.replies_withheld += 1;
                } else {
                    self.queue(now, from, &json);
                }
                false
            }
            Some(Incoming::Pending { .. }) => {
                self.stats.duplicates_pending += 1;
                false
            }
            None if self.incoming.len() >= self.config.max_cache_entries => {
                self.stats.busy_refusals += 1;
                let reply = self.next_id;
                let body = Body::error(ErrorCode::Busy, "request cache full");
                if let Ok(json) = Envelope::response(reply, id, body).encode() {
                    self.alloc_id();
                    if let Some(json) = self.fit_reply(json, reply, id, req_len) {
                        self.queue(now, from, &json);
                    }
                }
                false
            }
            None => true,
        }
    }

    fn on_request(&mut self, now: Now, from: SocketAddr, id: u64, body: Body, req_len: usize) {
        if !self.admit(now, from, id, req_len) {
            return;
        }
        let expires = now.mono + self.config.reply_cache_ttl;
        self.incoming
            .insert((from, id), Incoming::Pending { expires, req_len });
        self.expiry.push_back((expires, (from, id)));
        self.stats.requests_received += 1;
        self.events.push_back(Event::Request {
            from,
            id: RequestId(id),
            body,
        });
    }

    fn on_undecodable(&mut self, now: Now, from: SocketAddr, e: DecodeError, req_len: usize) {
        let (Some((id, re)), Some(code)) = (e.header(), e.error_code()) else {
            self.stats.malformed += 1;
            return;
        };
        let body = Body::error(code, e.to_string());
        match re {
            Some(re) => {
                self.stats.undecodable_responses += 1;
                self.on_response(from, re, body);
            }
            None => {
                if !self.admit(now, from, id, req_len) {
                    return;
                }
                self.stats.error_replies += 1;
                let reply = self.next_id;
                if let Ok(json) = Envelope::response(reply, id, body).encode() {
                    self.alloc_id();
                    let json = self.fit_reply(json, reply, id, req_len);
                    if let Some(json) = &json {
                        self.queue(now, from, json);
                    }
                    self.cache_answer(now, (from, id), json.unwrap_or_default());
                }
            }
        }
    }
}

/// Says when a periodic action (a heartbeat) is due. Sans-IO like the rest:
/// the owner passes the time in and includes [`Ticker::next_due`] in its
/// sleep computation.
#[derive(Debug, Clone)]
pub struct Ticker {
    interval: Duration,
    next: Option<Instant>,
}

/// Heartbeat interval the shim should use: well under Linux conntrack's 30 s
/// timeout for unreplied UDP flows, so the NAT hole never closes.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

impl Ticker {
    /// A ticker that is due immediately on its first [`Ticker::poll`].
    pub fn new(interval: Duration) -> Self {
        Ticker {
            interval,
            next: None,
        }
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// When the next tick is due (`None`: due now, never ticked).
    pub fn next_due(&self) -> Option<Instant> {
        self.next
    }

    /// True if a tick is due at `now`; if so the next one is scheduled one
    /// interval later (missed ticks are not replayed).
    pub fn poll(&mut self, now: Instant) -> bool {
        match self.next {
            Some(t) if t > now => false,
            _ => {
                self.next = Some(now + self.interval);
                true
            }
        }
    }

    /// [`Ticker::poll`], with the next tick placed at a random point between 0.9 and 1.1
    /// intervals later (`random`: any random number). Processes started together then
    /// drift apart instead of ticking in step, so a broker restart meets their
    /// re-registrations spread over an interval rather than in one burst.
    pub fn poll_spread(&mut self, now: Instant, random: u64) -> bool {
        if !self.poll(now) {
            return false;
        }
        let tenth = self.interval / 10;
        let extra = tenth.mul_f64(2.0 * (random % 1_000_000) as f64 / 1_000_000.0);
        self.next = Some(now + self.interval - tenth + extra);
        true
    }

    /// Postpones the next tick to one interval after `now` (e.g. because any
    /// other traffic to the peer already refreshed the NAT mapping).
    pub fn reset(&mut self, now: Instant) {
        self.next = Some(now + self.interval);
    }
}

#[cfg(test)]
mod tests;
