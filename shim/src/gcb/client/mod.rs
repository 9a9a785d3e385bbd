//! The GCB client of one process: its control channels to the broker, the registrations
//! of the listening sockets it holds, the mailbox of brokered connections, and the
//! asynchronous event handler ([`Client::pump`]) that the interposed blocking calls run.
//!
//! One [`Client`] (defined in [`state`]) with its `impl` blocks spread over the files of
//! this directory, from the bottom up:
//! * [`timers`]: the AEH's [`timers::TimerTable`] (no dependencies);
//! * [`mailbox`]: the family's mailbox of brokered connections (`SCM_RIGHTS`);
//! * [`state`]: the `Client` struct, its registration records and requests in flight,
//!   the registration tokens and ownership proofs;
//! * [`channels`]: the registration and private channels, requests on them, the
//!   negative cache, heartbeat fitting, unregistering;
//! * [`register`]: TCP listener registration (at listen(), retried later), release,
//!   re-registration;
//! * [`failover`]: a listener's order of the pool's brokers, and moving the listeners
//!   of a lost broker to the next one;
//! * [`udp_register`]: UDP socket registration and its keepalives;
//! * [`punching`]: the broker's side of UDP hole punching (`punch_request`,
//!   `punch_back`, `punch_end`);
//! * [`placeholder`]: handing a brokered connection to the program through a
//!   placeholder connection and the mailbox, and taking it back out at accept();
//! * [`standbys`]: the listeners' standby connections to the broker's relay;
//! * [`connect_back`]: the broker's `connect_back` and the dial-backs it starts;
//! * [`handoff`]: handing the registrations across exec (`GCB_INHERIT`) and adopting
//!   them in the new image;
//! * [`aeh`]: the event pump, its wake-up time, and fork.
//!
//! A child imports only from children below it (never through this file), so
//! `scripts/modgraph shim/src` shows no cycle among them.
//!
//! ## What the AEH never does
//! It never waits for the network inside the program's call: a `connect_back` dial is
//! started and finished later ([`crate::gcb::dial`]; only a dial to the broker's relay port
//! may take up to `RELAY_DIAL_QUICK` at once), and a listener the broker did not
//! register at listen() is registered again by requests it does not wait for
//! (`RegisterRetry`). It dials only public addresses and the broker's own
//! ([`crate::net::dial_refusal`]): a fooled or spoofed broker cannot point it at the
//! host's loopback or its LAN.
//!
//! All methods run with the re-entrancy guard set and the client lock held.

pub mod aeh;
pub mod channels;
pub mod connect_back;
pub mod failover;
pub mod handoff;
pub mod mailbox;
pub mod placeholder;
pub mod punching;
pub mod register;
pub mod standbys;
pub mod state;
pub mod timers;
pub mod udp_register;

pub use crate::control::Answer;
pub use channels::{CONNECT_DEADLINE, NEGATIVE_TTL};
pub use connect_back::{preamble, DIAL_TIMEOUT, PREAMBLE_LEN};
pub use placeholder::PLACEHOLDER_IP;
pub use register::{awaiting_registration, set_listener_proxy, REGISTER_DEADLINE};
pub use state::{Client, DIAL_SPACING};
