//! The broker's `connect_back`: this process dials out for a connection to one of its
//! registered listeners (to the connector for a reversed connection, to the broker's
//! relay port otherwise), presents the connect preamble, and hands the connection to the
//! program (see [`super::placeholder`]). The dial is started here and finished by the AEH
//! ([`crate::gcb::dial`]); only a dial to the broker's relay port may take up to
//! `RELAY_DIAL_QUICK` at once.

use gcb_proto::token::{self, Use};
use gcb_proto::{Body, ConnectId, PoolKey, Transport};
use libc::c_int;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::state::{Client, DialFor};
use crate::gcb::dial::{self, DialEvent};
use crate::gcb::standby::Watch;
use crate::net::{self, errstr};

/// Dial-backs and relay connections must be set up within this.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a dial-back to the broker's relay port may hold the AEH before it continues
/// in the background (on a LAN it completes well within this; see [`crate::gcb::dial`]).
const RELAY_DIAL_QUICK: Duration = Duration::from_millis(2);

/// Length of the dial-back / relay preamble: `GCB-CONNECT <32 hex>\n`.
pub const PREAMBLE_LEN: usize = 45;

/// The connect preamble for connect id `id`: the id presented for connects
/// ([`gcb_proto::token`]), so that an id read off a control datagram is not enough to
/// take the connection where the pool has a key.
pub fn preamble(key: Option<&PoolKey>, id: &ConnectId) -> Vec<u8> {
    let p = token::present_hex(key, Use::Connect, id.as_bytes());
    format!("GCB-CONNECT {p}\n").into_bytes()
}

impl Client {
    /// The broker asks us to dial out for a connection to our listener at `proxy`. The
    /// dial is started here and finished by the AEH ([`Self::service_dials`]): the
    /// answer goes out at once, and the program's waits never stall on a dead address.
    pub(super) fn on_connect_back(
        &mut self,
        id: ConnectId,
        dial: SocketAddr,
        proxy: SocketAddr,
        peer: SocketAddr,
    ) -> Body {
        let (Some(dial), Some(proxy), Some(peer)) = (net::v4(dial), net::v4(proxy), net::v4(peer))
        else {
            return Body::error(gcb_proto::ErrorCode::BadRequest, "IPv4 only");
        };
        let Some((listen_at, family, broker)) = self
            .regs
            .get(&(Transport::Tcp, proxy))
            .map(|r| (r.listen_at, r.family, r.broker))
        else {
            return Body::error(
                gcb_proto::ErrorCode::NoSuchRegistration,
                format!("{proxy} is not registered here"),
            );
        };
        if let Some(why) = net::dial_refusal(*dial.ip(), *broker.ip()) {
            crate::warn!(
                "connect_back for {} refused: dial target {} is {}",
                proxy,
                dial,
                why
            );
            return Body::error(
                gcb_proto::ErrorCode::BadRequest,
                format!("dial target {dial} is {why}"),
            );
        }
        if self.mailbox.is_none() {
            return Body::error(gcb_proto::ErrorCode::Internal, "no mailbox");
        }
        if self.watch.is_none() {
            match Watch::open() {
                Ok(w) => self.watch = Some(w),
                // The dials are then checked on a short timer (see `Dials::wakeup`).
                Err(e) => crate::debug!("no watch for dial-backs: {}", errstr(e)),
            }
        }
        let quick = if dial.ip() == broker.ip() {
            RELAY_DIAL_QUICK
        } else {
            Duration::ZERO
        };
        let what = DialFor {
            id,
            proxy,
            listen_at,
            peer,
        };
        match self
            .dials
            .start(dial, family, what, DIAL_TIMEOUT, quick, self.watch.as_ref())
        {
            Ok(None) => Body::Ack {},
            Ok(Some((fd, what))) => match self.finish_dial(fd, dial, what) {
                Ok(()) => Body::Ack {},
                Err(why) => Body::error(gcb_proto::ErrorCode::Internal, why),
            },
            Err((libc::EAGAIN, _)) => {
                crate::warn!(
                    "connect_back to {} for {} refused: {} dial-backs in flight",
                    dial,
                    proxy,
                    dial::MAX_DIALS
                );
                Body::error(gcb_proto::ErrorCode::Busy, "too many dial-backs in flight")
            }
            Err((e, _)) => {
                crate::warn!(
                    "connect_back to {} for {} failed: dial: {}",
                    dial,
                    proxy,
                    errstr(e)
                );
                Body::error(
                    gcb_proto::ErrorCode::Internal,
                    format!("dial: {}", errstr(e)),
                )
            }
        }
    }

    /// A dial-back connected (`fd`, ours): present the connect id, then hand the
    /// connection to the program. Failures are logged here.
    fn finish_dial(&mut self, fd: c_int, dial: SocketAddrV4, what: DialFor) -> Result<(), String> {
        let live = self
            .regs
            .values()
            .any(|r| r.udp.is_none() && r.listen_at == what.listen_at);
        let handed = if !live {
            net::close(fd);
            Err("the listener is gone".to_owned())
        } else if net::send_some(fd, &preamble(self.key.as_ref(), &what.id)) != Ok(PREAMBLE_LEN) {
            // 45 bytes into a fresh connection's empty send buffer: all or nothing.
            net::close(fd);
            Err("preamble not sent".to_owned())
        } else {
            self.hand_over(fd, what.listen_at, what.peer)
        };
        match handed {
            Ok(key) => {
                crate::debug!(
                    "connect_back for {}: dialed {} for peer {}; placeholder {}",
                    what.proxy,
                    dial,
                    what.peer,
                    key
                );
                Ok(())
            }
            Err(why) => {
                crate::warn!(
                    "connect_back to {} for {} failed: {}",
                    dial,
                    what.proxy,
                    why
                );
                Err(why)
            }
        }
    }

    /// Finish the dial-backs in flight that connected; log the ones that failed.
    pub(super) fn service_dials(&mut self) {
        if self.dials.is_empty() {
            return;
        }
        for ev in self.dials.poll(Instant::now(), self.watch.as_ref()) {
            match ev {
                DialEvent::Connected(fd, dial, what) => {
                    let _ = self.finish_dial(fd, dial, what);
                }
                DialEvent::Failed(dial, what, why) => crate::warn!(
                    "connect_back to {} for {} failed: dial: {}",
                    dial,
                    what.proxy,
                    why
                ),
            }
        }
        self.leave_epolls_if_idle();
    }
}
