//! fedgate-tunnel owns the one UDP port a gateway opens to its peers: a QUIC endpoint (quinn,
//! ALPN `fedgate/1`) with mutual TLS (rustls) whose certificates name the clusterset and the
//! cluster (`spiffe://<clusterset>/cluster/<id>`). One connection per peer pair carries the
//! export exchange (gRPC from `fedgate_discovery::exchange` on control streams) and the data
//! plane's tunnel streams. It holds each peer's exports under a lease and reports them as
//! `PeerUpdate`s, and reloads its certificate and CA bundle when their files change. It depends on discovery (model and exchange) and never on the gateway.

pub mod endpoint;
pub mod expiry;
pub mod identity;
pub mod io;
mod junk;
pub mod metrics;
pub mod reload;
pub mod runtime;
mod socket;
pub mod tls;

#[cfg(any(test, feature = "test-util"))]
pub mod testing;

#[cfg(test)]
mod tests;

pub use endpoint::{
    IncomingStream, PeerConfig, PeerHandle, TunnelEndpoint, TunnelError, TunnelSettings,
};
pub use expiry::{CertExpiry, CertRef, ExpiryWarning};
pub use identity::{Identity, IdentityError, IdentityProblem, IdentityProblems, LeafValidity};
pub use reload::{IdentityFiles, ReloadStatus};
pub use tls::{ALPN, RejectReason, Rejection};
