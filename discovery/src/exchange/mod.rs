//! The export exchange between gateways: gRPC (tonic) over any byte stream.
//!
//! A gateway serves [`proto::exchange_server::Exchange`] with [`ExchangeService`], which
//! streams its local [`ExportSet`](crate::model::ExportSet): a full snapshot first, then
//! deltas (upserts and removed keys, computed by `Arc::ptr_eq` per service) and heartbeats
//! every `heartbeat_interval` so that silence means the peer is gone. The other side follows
//! it with [`watch_peer`], which applies the updates into a full `ExportSet` per peer.
//!
//! This module knows nothing of QUIC: the server takes any IO that implements
//! `AsyncRead + AsyncWrite + Connected`, the client any tonic `Channel`. The tunnel crate
//! carries both on streams of its QUIC connections. Protobuf types stop here: everything
//! that leaves this module is a `discovery::model` value, converted with `TryFrom` so a bad
//! message names the field that was wrong.

pub mod client;
pub mod convert;
pub mod delta;
pub mod server;

/// Code generated from `proto/fedgate/exchange/v1/exchange.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("fedgate.exchange.v1");
}

pub use client::{
    ExchangeError, PeerEvent, PeerEventStream, PeerExports, WatchSettings, watch_peer,
};
pub use convert::ConvertError;
pub use delta::{ExportDelta, diff_exports};
pub use server::{ExchangeService, MAX_MESSAGE_SIZE, exchange_server};

#[cfg(test)]
mod tests;
