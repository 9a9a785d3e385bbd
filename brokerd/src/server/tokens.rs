//! Registration tokens and their presentations ([`gcb_proto::token`]): what a
//! registration's owner proves ownership with, its standby key, its UDP Dummy token,
//! and how a connect id is presented on the relay port.

use std::net::SocketAddr;

use gcb_proto::token::{self, Use};
use gcb_proto::Transport;

use super::state::Server;

impl Server {
    /// The registration token of the `transport` registration at `proxy`, as hex.
    pub(super) fn token_hex(&self, transport: Transport, proxy: SocketAddr) -> String {
        token::to_hex(&self.owner.token(transport, proxy))
    }

    /// What a holder of the registration at `proxy` presents for `what`.
    pub(super) fn presentation(
        &self,
        what: Use,
        transport: Transport,
        proxy: SocketAddr,
    ) -> [u8; 16] {
        token::present(
            self.cfg.key.as_ref(),
            what,
            &self.owner.token(transport, proxy),
        )
    }

    /// The presentation of connect id `raw` on the relay port.
    pub(super) fn connect_presentation(&self, raw: &[u8; 16]) -> [u8; 16] {
        token::present(self.cfg.key.as_ref(), Use::Connect, raw)
    }

    /// Whether `proof` proves ownership of the `transport` registration at `proxy` (see
    /// [`gcb_proto::token`]): its token presented for [`Use::Ownership`].
    pub(super) fn ownership_proven(
        &self,
        transport: Transport,
        proxy: SocketAddr,
        proof: Option<&str>,
    ) -> bool {
        let want = token::to_hex(&self.presentation(Use::Ownership, transport, proxy));
        proof.is_some_and(|p| token::same(p.as_bytes(), want.as_bytes()))
    }
}
