//! `front.mode: kube`: the gateway pod's side of the derived Services. The kube writer hands
//! each TCP port of a ClusterSetIP import a port of the gateway pod
//! ([`fedgate_discovery::kube::writer::FrontPorts`]) and points the import's derived Service at
//! `<pod IP>:<that port>`; kube-proxy sends the ClusterIP's traffic there, and this module
//! accepts it and hands each connection to the same endpoint selection and failover as a
//! ClusterSetIP listener in `vip` mode.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use fedgate_discovery::kube::writer::FrontKey;
use fedgate_discovery::model::ImportSnapshot;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::listeners::{Route, accept_loop, bind_freebind};

/// The gateway ports the kube writer allocated, and which import port each serves.
pub type FrontRoutes = Arc<BTreeMap<u16, FrontKey>>;

/// How long to wait before binding a port that failed again.
const REBIND_DELAY: Duration = Duration::from_secs(1);

/// The route of a gateway port: the import's service port, from the current snapshot.
pub fn route_for(snapshot: &ImportSnapshot, k: &FrontKey) -> Option<Route> {
    let service = snapshot.services.get(&k.key)?;
    let port =
        service.ports.iter().find(|p| p.port.port == k.port && p.port.protocol == k.protocol)?;
    Some(Route::Service { key: k.key.clone(), port: port.port.clone() })
}

struct Bound {
    route: Arc<ArcSwap<Route>>,
    /// Stops its accept loop (a child of the drain).
    stop: CancellationToken,
}

/// Binds `ip:<port>` for every allocated port and serves connections until draining starts.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    ip: IpAddr,
    mut routes: watch::Receiver<FrontRoutes>,
) {
    let mut bound: BTreeMap<u16, Bound> = BTreeMap::new();
    let mut snapshots = shared.snapshot.clone();
    let drain = shared.drain.clone();
    loop {
        let current = routes.borrow_and_update().clone();
        let snapshot = snapshots.borrow_and_update().clone();
        bound.retain(|port, b| {
            let keep = current.contains_key(port);
            if !keep {
                b.stop.cancel();
                tracing::debug!(port, "front port closed");
            }
            keep
        });
        let mut failed = false;
        for (port, k) in current.iter() {
            let Some(route) = route_for(&snapshot, k) else { continue };
            if let Some(b) = bound.get(port) {
                if **b.route.load() != route {
                    b.route.store(Arc::new(route));
                }
                continue;
            }
            let addr = SocketAddr::new(ip, *port);
            match bind_freebind(addr) {
                Ok(listener) => {
                    tracing::debug!(%addr, service = %k.key, "front port bound");
                    let route = Arc::new(ArcSwap::from_pointee(route));
                    let stop = drain.child_token();
                    let task = accept_loop(listener, route.clone(), shared.clone(), stop.clone());
                    tokio::spawn(task);
                    bound.insert(*port, Bound { route, stop });
                }
                Err(e) => {
                    tracing::warn!(%addr, service = %k.key, error = %e, "front port not bound; retrying");
                    failed = true;
                }
            }
        }
        tokio::select! {
            () = drain.cancelled() => break,
            r = routes.changed() => if r.is_err() { break },
            r = snapshots.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(REBIND_DELAY), if failed => {}
        }
    }
    for (_, b) in bound {
        b.stop.cancel();
    }
}
