//! fedgate-discovery owns what a gateway knows about services: the cluster sources (a
//! directory of Kubernetes YAML, or a Kubernetes API server), the MCS export/import model and
//! its semantics (conflicts, conditions, ClusterSetIPs, leases) and the peer sessions: the
//! exchange of exports with peer gateways over gRPC, heartbeats and the lease on each peer's
//! exports (`peers`, generic over the control channel a transport provides). It must not
//! depend on the gateway, tunnel or DNS crates: they read its immutable snapshots, and the
//! gateway wires the sessions to the tunnel.

pub mod alloc;
pub mod exchange;
pub mod exports;
pub mod failover;
pub mod imports;
pub mod kube;
pub mod mcs;
pub mod model;
pub mod names;
pub mod objects;
pub mod peers;
pub mod source;
pub mod yaml;

/// The next change of an optional flag (`Err` once its sender is gone); never resolves
/// without one. For `select!` loops that follow a flag only when they were given one.
pub(crate) async fn flag_changed(
    flag: &mut Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match flag {
        Some(f) => f.changed().await,
        None => std::future::pending().await,
    }
}
