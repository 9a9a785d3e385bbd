//! gcb-brokerd: the GCB broker daemon (placeholder docs, see below).

#[macro_use]
pub mod log;
pub mod allow;
pub mod decision;
pub mod preamble;
pub mod registry;
pub mod relay;
pub mod server;
