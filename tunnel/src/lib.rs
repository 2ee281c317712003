//! fedgate-tunnel is transport only. It owns the one UDP port a gateway opens to its peers: a
//! QUIC endpoint (quinn, ALPN `fedgate/1`) with mutual TLS (rustls) whose certificates name
//! the clusterset and the cluster (`spiffe://<clusterset>/cluster/<id>`), reloaded when their
//! files change; one connection per peer pair, redialed with backoff; the stream kind byte
//! that routes a peer's streams; data streams for the data plane and the control channel
//! (gRPC over control streams) for whoever runs sessions over it. It knows nothing of
//! exports, imports, leases or the exchange (discovery's peer sessions run over it, wired by
//! the gateway), depends on discovery only for `ClusterId`, and never on the gateway.

mod coalesce;
pub mod endpoint;
pub mod expiry;
pub mod identity;
pub mod io;
mod junk;
mod lanes;
pub mod metrics;
pub mod peer;
pub mod reload;
pub(crate) mod replicas;
pub mod runtime;
mod sendwin;
mod socket;
mod steer;
pub mod streams;
pub mod tls;

#[cfg(any(test, feature = "test-util"))]
pub mod testing;

#[cfg(test)]
mod tests;

pub use endpoint::{PeerConfig, TunnelEndpoint, TunnelError, TunnelSettings};
pub use expiry::{CertExpiry, CertRef, ExpiryWarning};
pub use identity::{Identity, IdentityError, IdentityProblem, IdentityProblems, LeafValidity};
pub use io::QuicIo;
pub use peer::{LinkStatus, PeerConnection, PeerHandle};
pub use reload::{IdentityFiles, ReloadStatus};
pub use streams::IncomingStream;
pub use tls::{ALPN, RejectReason, Rejection};
