//! The writer among replicas (issue 19): the inputs of a term as the leader and the waits
//! around it ([`super::KubeWriter::with_election`]), and the replicas a derived Service's
//! slice lists (`front.kube.gatewayService`).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::kube::leader::LeaderState;
use crate::kube::observed::FrontRoutes;
use crate::model::{ClusterState, ServiceKey};

/// The ready endpoints of the gateway's own Service in `state`, sorted (pure).
pub fn ready_replicas(state: &ClusterState, gateway_service: Option<&ServiceKey>) -> Vec<IpAddr> {
    let Some(service) = gateway_service.and_then(|k| state.services.get(k)) else {
        return Vec::new();
    };
    let ips: BTreeSet<IpAddr> =
        service.endpoints.iter().filter(|e| e.ready).map(|e| e.address).collect();
    ips.into_iter().collect()
}

/// With several replicas ([`super::KubeWriter::with_election`]): when to write, and what
/// the leader wrote. Without them the writer always writes.
#[derive(Default)]
pub(super) struct ElectionInputs {
    /// The role of this replica: writes only while `leading`.
    pub(super) leader: Option<watch::Receiver<LeaderState>>,
    /// True once the import set holds the ClusterSetIPs the ServiceImports carry.
    pub(super) pins_applied: Option<watch::Receiver<bool>>,
    /// `front.mode: kube`: the gateway ports of the leader's derived Services.
    pub(super) observed_routes: Option<watch::Receiver<Arc<FrontRoutes>>>,
}

/// How a term as the leader ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Term {
    /// The lease was lost (or not renewed in time): follow again.
    Lost,
    /// Shutdown, or the inputs closed.
    Stopped,
}

/// Resolves when this replica stops leading (at once if it does not lead); never without
/// an election.
pub(super) async fn lost(leader: &mut Option<watch::Receiver<LeaderState>>) {
    match leader {
        Some(rx) => {
            let _ = rx.wait_for(|s| !s.leading).await;
        }
        None => std::future::pending().await,
    }
}

/// Resolves when the cluster state changes; never without it (or once it closed).
pub(super) async fn changed_state(rx: &mut Option<watch::Receiver<Arc<ClusterState>>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Resolves when the leader's front routes change; never without them.
pub(super) async fn changed_routes(rx: &mut Option<watch::Receiver<Arc<FrontRoutes>>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}
