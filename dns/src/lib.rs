//! fedgate-dns serves `clusterset.local` (per the MCS DNS specification 1.0.0) and
//! `cluster.local` (this cluster only) from discovery snapshots, and forwards every other name
//! upstream. It reads `fedgate_discovery::model` snapshots and depends on nothing else of
//! fedgate.
//!
//! Shape: [`DnsServer::new`] binds UDP and TCP, [`DnsServer::address`] tells the port,
//! [`DnsServer::run`] serves until its shutdown future resolves. Zones are rebuilt per changed
//! service ([`zone::ZoneWriter`]); UDP queries for existing names are answered from
//! pre-encoded responses ([`wire`]), everything else goes through hickory ([`handler`]).

pub mod error;
#[cfg(any(test, feature = "test-util"))]
pub mod fixture;
pub mod forward;
pub mod handler;
pub mod metrics;
pub mod names;
pub mod path;
pub mod records;
pub mod server;
pub mod settings;
pub mod table;
mod tcp;
pub mod tier;
pub mod wire;
pub mod zone;

pub use error::DnsError;
pub use server::DnsServer;
pub use settings::{DnsSettings, Upstream};
