//! ClusterSetIP and endpoint-VIP listeners (front mode `vip`), added and removed as the import
//! snapshot changes.
//!
//! Sockets are bound with `IP_FREEBIND`, so an address of a range that is local
//! (127.0.0.0/8) or routed to `lo` (`ip route add local 242.1.0.0/16 dev lo`) binds before
//! any interface carries it. Services are diffed by `Arc::ptr_eq`: an unchanged service costs
//! one pointer comparison per snapshot.
//!
//! A listener of the first snapshot that cannot bind fails start-up (STYLE rule 1: the
//! operator sees the error at once). One asked for later (a new import at runtime) cannot
//! stop a running gateway: it is reported in [`ListenerState::failed`] (`/debug/problems`,
//! `/readyz`), counted (`fedgate_listener_bind_errors_total`, `fedgate_listeners_failed`) and
//! retried with exponential backoff from [`RETRY_MIN`] to [`RETRY_MAX`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use fedgate_discovery::model::{
    ClusterId, EndpointVip, ImportSnapshot, ImportedService, Protocol, ServiceKey, ServicePort,
    ServiceType,
};
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{DataPlaneError, Shared, connect, metrics};

/// How often the data plane looks for failed binds that are due for a retry.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// First delay before a failed bind is retried; it doubles after every failure...
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// ...up to this.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
const BACKLOG: i32 = 1024;

/// Where connections accepted on one address go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// A ClusterSetIP service port: the best healthy endpoint in the clusterset.
    Service { key: ServiceKey, port: ServicePort },
    /// A headless service's remote endpoint: exactly that endpoint.
    Endpoint { key: ServiceKey, cluster: ClusterId, endpoint: IpAddr, port: ServicePort },
}

impl Route {
    pub fn key(&self) -> &ServiceKey {
        match self {
            Route::Service { key, .. } | Route::Endpoint { key, .. } => key,
        }
    }
    pub fn port(&self) -> &ServicePort {
        match self {
            Route::Service { port, .. } | Route::Endpoint { port, .. } => port,
        }
    }
}

/// The listeners a ClusterSetIP service needs: each ClusterSetIP × each TCP port.
pub fn service_routes(service: &ImportedService) -> Vec<(SocketAddr, Route)> {
    if service.service_type != ServiceType::ClusterSetIP {
        return Vec::new();
    }
    let mut out = Vec::new();
    for ip in &service.ips {
        for p in service.ports.iter().filter(|p| p.port.protocol == Protocol::Tcp) {
            out.push((
                SocketAddr::new(*ip, p.port.port),
                Route::Service { key: service.key.clone(), port: p.port.clone() },
            ));
        }
    }
    out
}

/// The listeners of one endpoint VIP: the VIP × each TCP port of its service.
pub fn vip_routes(
    vip: IpAddr,
    target: &EndpointVip,
    service: Option<&ImportedService>,
) -> Vec<(SocketAddr, Route)> {
    let Some(service) = service else { return Vec::new() };
    service
        .ports
        .iter()
        .filter(|p| p.port.protocol == Protocol::Tcp)
        .map(|p| {
            (
                SocketAddr::new(vip, p.port.port),
                Route::Endpoint {
                    key: target.key.clone(),
                    cluster: target.cluster.clone(),
                    endpoint: target.endpoint,
                    port: p.port.clone(),
                },
            )
        })
        .collect()
}

/// Binds a TCP listener with `IP_FREEBIND` and `SO_REUSEADDR`.
pub fn bind_freebind(addr: SocketAddr) -> Result<TcpListener, DataPlaneError> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        #[cfg(any(target_os = "linux", target_os = "android"))]
        match addr {
            SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
            SocketAddr::V6(_) => {
                socket.set_only_v6(true)?;
                socket.set_freebind_v6(true)?
            }
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        TcpListener::from_std(socket.into())
    };
    bind().map_err(|e| DataPlaneError::Bind(addr, e))
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    Service(ServiceKey),
    Vip(IpAddr),
}

struct Bound {
    route: Arc<ArcSwap<Route>>,
    /// Stops its accept loop (a child of the drain: draining stops every one).
    stop: CancellationToken,
}

/// Which listeners are bound and which wait for a retry, published after every change (for
/// `/readyz`, `/debug/endpoints` and `/debug/problems`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ListenerState {
    pub bound: Vec<SocketAddr>,
    pub failed: Vec<SocketAddr>,
    /// Why each of `failed` is not bound, in the same order.
    pub problems: Vec<ListenerProblem>,
}

/// A listener that could not be bound and waits for its next attempt.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerProblem {
    pub address: SocketAddr,
    /// The service the listener serves (`namespace/name`).
    pub service: String,
    /// The last bind error.
    pub reason: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// The backoff chosen after the last failure: the next attempt comes this long after it.
    pub backoff_ms: u64,
}

/// The delay after the `attempts`-th failed bind: [`RETRY_MIN`] doubled per failure, capped
/// at [`RETRY_MAX`].
pub fn retry_delay(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    RETRY_MIN.saturating_mul(1 << doublings).min(RETRY_MAX)
}

/// A bind that failed: what it should serve, the error and when to try again.
struct Failed {
    route: Route,
    error: std::io::Error,
    attempts: u32,
    next: Instant,
}

/// The set of bound listeners and what each serves.
#[derive(Default)]
pub struct Listeners {
    state: Arc<ArcSwap<ListenerState>>,
    bound: BTreeMap<SocketAddr, Bound>,
    /// Binds that failed, retried with backoff.
    failed: BTreeMap<SocketAddr, Failed>,
    /// The addresses each service or VIP listens on, sorted. A boxed slice: a one-element
    /// BTreeSet takes a whole 370-byte node, per service.
    owned: BTreeMap<Owner, Box<[SocketAddr]>>,
    services: BTreeMap<ServiceKey, Arc<ImportedService>>,
    vips: BTreeMap<IpAddr, EndpointVip>,
    /// `listeners` in the readiness registry: pending while a bind waits for a retry.
    readiness: Option<crate::readiness::Guard>,
}

impl Listeners {
    /// Registers this set as `listeners` with the gateway's readiness registry.
    pub fn register_readiness(&mut self, ready: &crate::readiness::Ready) {
        let mut guard = ready.register("listeners");
        guard.set_ready(self.failed.is_empty());
        self.readiness = Some(guard);
    }

    /// The live view of this set, updated after every change.
    pub fn state(&self) -> Arc<ArcSwap<ListenerState>> {
        self.state.clone()
    }

    fn publish(&mut self) {
        if let Some(guard) = &mut self.readiness {
            guard.set_ready(self.failed.is_empty());
        }
        metrics::set_listeners(self.bound.len());
        metrics::set_listeners_failed(self.failed.len());
        self.state.store(Arc::new(ListenerState {
            bound: self.bound.keys().copied().collect(),
            failed: self.failed.keys().copied().collect(),
            problems: self
                .failed
                .iter()
                .map(|(address, f)| ListenerProblem {
                    address: *address,
                    service: f.route.key().to_string(),
                    reason: f.error.to_string(),
                    attempts: f.attempts,
                    backoff_ms: retry_delay(f.attempts).as_millis() as u64,
                })
                .collect(),
        }));
    }

    /// The first bind that failed, as the error that stops start-up (the set is emptied, so
    /// nothing is retried behind the caller's back).
    pub(crate) fn take_startup_failure(&mut self) -> Option<DataPlaneError> {
        let addr = *self.failed.keys().next()?;
        let failed = self.failed.remove(&addr)?;
        self.close_all();
        Some(DataPlaneError::Bind(addr, failed.error))
    }

    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.bound.keys().copied().collect()
    }

    pub fn has_failed(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Brings the listeners in line with `snapshot`, touching only what changed.
    pub(crate) fn reconcile(&mut self, snapshot: &ImportSnapshot, shared: &Arc<Shared>) {
        let mut changed: BTreeSet<ServiceKey> = BTreeSet::new();
        for key in self.services.keys() {
            if !snapshot.services.contains_key(key) {
                changed.insert(key.clone());
            }
        }
        for (key, service) in &snapshot.services {
            if !self.services.get(key).is_some_and(|old| Arc::ptr_eq(old, service)) {
                changed.insert(key.clone());
            }
        }
        for key in &changed {
            let routes = match snapshot.services.get(key) {
                Some(service) => {
                    self.services.insert(key.clone(), service.clone());
                    service_routes(service)
                }
                None => {
                    self.services.remove(key);
                    Vec::new()
                }
            };
            self.apply(Owner::Service(key.clone()), routes, shared);
        }
        let old_vips = std::mem::take(&mut self.vips);
        for ip in old_vips.keys() {
            if !snapshot.endpoint_vips.contains_key(ip) {
                self.apply(Owner::Vip(*ip), Vec::new(), shared);
            }
        }
        for (ip, vip) in &snapshot.endpoint_vips {
            if old_vips.get(ip) == Some(vip) && !changed.contains(&vip.key) {
                continue;
            }
            let routes = vip_routes(*ip, vip, snapshot.services.get(&vip.key).map(|s| &**s));
            self.apply(Owner::Vip(*ip), routes, shared);
        }
        self.vips = snapshot.endpoint_vips.clone();
        self.publish();
    }

    fn apply(&mut self, owner: Owner, routes: Vec<(SocketAddr, Route)>, shared: &Arc<Shared>) {
        let old = self.owned.remove(&owner).unwrap_or_default();
        let new: BTreeSet<SocketAddr> = routes.iter().map(|(a, _)| *a).collect();
        for addr in old.iter().filter(|a| !new.contains(a)) {
            self.close(*addr);
        }
        for (addr, route) in routes {
            self.upsert(addr, route, shared);
        }
        if !new.is_empty() {
            self.owned.insert(owner, new.into_iter().collect());
        }
    }

    fn upsert(&mut self, addr: SocketAddr, route: Route, shared: &Arc<Shared>) {
        if let Some(b) = self.bound.get(&addr) {
            if **b.route.load() != route {
                b.route.store(Arc::new(route));
            }
            return;
        }
        if let Some(f) = self.failed.get_mut(&addr) {
            // Waiting for its retry: only the route may have changed.
            f.route = route;
            return;
        }
        self.bind(addr, route, 0, shared);
    }

    /// Binds `addr`, or records the failure (the `attempts + 1`-th) with its next retry time.
    fn bind(&mut self, addr: SocketAddr, route: Route, attempts: u32, shared: &Arc<Shared>) {
        let budget = listener_budget();
        let bound = if self.bound.len() >= budget {
            Err(DataPlaneError::Bind(
                addr,
                std::io::Error::other(format!(
                    "descriptor budget: {} listeners hold three quarters of the open-file limit; \
                     raise the gateway's LimitNOFILE (the rest is kept for connections, probes \
                     and the admin port)",
                    self.bound.len()
                )),
            ))
        } else {
            bind_freebind(addr)
        };
        match bound {
            Ok(listener) => {
                if attempts > 0 {
                    tracing::info!(%addr, attempts, "listener bound after failed attempts");
                }
                let route = Arc::new(ArcSwap::from_pointee(route));
                let stop = shared.drain.child_token();
                tokio::spawn(accept_loop(listener, route.clone(), shared.clone(), stop.clone()));
                tracing::debug!(%addr, "listener bound");
                self.bound.insert(addr, Bound { route, stop });
            }
            Err(DataPlaneError::Bind(_, error)) => {
                let attempts = attempts + 1;
                let delay = retry_delay(attempts);
                // One WARN line per 10 s for all listeners (20 000 services over the
                // descriptor limit fail together); every failure is on /debug/problems.
                static NOT_BOUND: crate::logging::LogGate =
                    crate::logging::LogGate::new(Duration::from_secs(10));
                if attempts == 1
                    && let Some(held) = NOT_BOUND.pass()
                {
                    tracing::warn!(%addr, service = %route.key(), %error, retry_in = ?delay, similar_since_last = held, "listener not bound; retrying with backoff");
                } else {
                    tracing::debug!(%addr, %error, attempts, retry_in = ?delay, "listener still not bound");
                }
                metrics::record_bind_error();
                self.failed
                    .insert(addr, Failed { route, error, attempts, next: Instant::now() + delay });
            }
        }
    }

    fn close(&mut self, addr: SocketAddr) {
        self.failed.remove(&addr);
        if let Some(b) = self.bound.remove(&addr) {
            // Stops accepting; connections already accepted run in their own tasks.
            b.stop.cancel();
            tracing::debug!(%addr, "listener closed");
        }
    }

    /// Retries the failed binds whose backoff has passed.
    pub(crate) fn retry(&mut self, shared: &Arc<Shared>) {
        let now = Instant::now();
        let due: Vec<SocketAddr> =
            self.failed.iter().filter(|(_, f)| f.next <= now).map(|(a, _)| *a).collect();
        if due.is_empty() {
            return;
        }
        for addr in due {
            if let Some(f) = self.failed.remove(&addr) {
                self.bind(addr, f.route, f.attempts, shared);
            }
        }
        self.publish();
    }

    pub fn close_all(&mut self) {
        let addrs: Vec<SocketAddr> = self.bound.keys().copied().collect();
        for a in addrs {
            self.close(a);
        }
        self.failed.clear();
        self.publish();
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for b in self.bound.values() {
            b.stop.cancel();
        }
    }
}

/// How many listeners may be bound: three quarters of the open-file limit (at most the limit
/// minus 256), so that 20 000 imports cannot take the descriptors that client connections,
/// probes, the tunnel, the admin port and the cluster source need. A listener over the budget
/// is a listener problem like any failed bind, retried with backoff.
fn listener_budget() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let limit = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
    (limit / 4 * 3).min(limit.saturating_sub(256))
}

/// Accepts client connections on one listener until `stop` (the listener closed, or
/// draining): each is admitted by the connection caps (or reset at once) and served in its
/// own task. Used by both fronts.
/// Serves an accepted client connection on the data-plane thread with the fewest open client
/// connections, the first on a tie: its stream then goes on that thread's lane to the peer
/// (`fedgate_tunnel`'s lanes), so its bytes are copied and its packets handled on one thread.
/// The first thread reads the tunnel's socket for every lane, so a lone connection stays on
/// it and pays no hand-off between threads; the others fill as connections add up. The socket
/// moves to the chosen thread's reactor.
fn spawn_client(
    shared: &Arc<Shared>,
    route: Arc<Route>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    admitted: super::limits::Admitted,
) {
    let k = least_loaded(shared.per_shard.iter().map(|n| n.load(Ordering::Relaxed)));
    let open = OpenOnShard::new(shared.per_shard.clone(), k);
    let here = fedgate_tunnel::runtime::current_shard() == Some(k);
    let target = shared.settings.shards.get(k).filter(|_| !here);
    let shared = shared.clone();
    let Some(target) = target else {
        tokio::spawn(async move {
            let _open = open;
            connect::serve_client(shared, route, stream, peer, admitted).await;
        });
        return;
    };
    // Deregistered here, registered with the target thread's reactor there.
    let failed = move |e: std::io::Error| {
        tracing::debug!(client = %peer, error = %e, "moving a client connection to its data-plane thread failed");
    };
    match stream.into_std() {
        Ok(std) => {
            target.spawn(async move {
                let _open = open;
                match tokio::net::TcpStream::from_std(std) {
                    Ok(stream) => {
                        connect::serve_client(shared, route, stream, peer, admitted).await
                    }
                    Err(e) => failed(e),
                }
            });
        }
        Err(e) => failed(e),
    }
}

/// Index of the smallest count, the first of equals (0 for none). Pure.
pub(crate) fn least_loaded(counts: impl Iterator<Item = usize>) -> usize {
    counts.enumerate().min_by_key(|&(i, n)| (n, i)).map_or(0, |(i, _)| i)
}

/// One open client connection on a data-plane thread, counted until dropped.
struct OpenOnShard {
    per_shard: Arc<[AtomicUsize]>,
    shard: usize,
}

impl OpenOnShard {
    /// Counts one on `shard` (an index into `per_shard`, which is never empty).
    fn new(per_shard: Arc<[AtomicUsize]>, shard: usize) -> Self {
        per_shard[shard].fetch_add(1, Ordering::Relaxed);
        Self { per_shard, shard }
    }
}

impl Drop for OpenOnShard {
    fn drop(&mut self) {
        self.per_shard[self.shard].fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    route: Arc<ArcSwap<Route>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    /// One "accept failed" line per 10 s for all listeners together: with the descriptors
    /// gone every listener fails at once, 20 times a second.
    static ACCEPT_FAILED: crate::logging::LogGate =
        crate::logging::LogGate::new(Duration::from_secs(10));
    loop {
        let accepted = tokio::select! {
            // Closed or draining: stop accepting, drop the socket.
            () = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let route = route.load_full();
                match shared.limits.admit(route.key()) {
                    Ok(admitted) => {
                        let _ = stream.set_nodelay(true);
                        spawn_client(&shared, route, stream, peer, admitted);
                    }
                    Err(hit) => {
                        metrics::record_limit_hit(&route.key().to_string(), hit.as_str());
                        shared.activity.refused(route.key().to_string(), "over_limit");
                        // A reset tells the client at once.
                        let _ = stream.set_zero_linger();
                    }
                }
            }
            Err(e) => {
                metrics::record_accept_error();
                if let Some(held) = ACCEPT_FAILED.pass() {
                    tracing::warn!(error = %e, similar_since_last = held, "accept failed");
                }
                // Out of file descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::DataPlane;
    use crate::dataplane::select::tests::{cid, ep, export, service};
    use fedgate_discovery::model::Health;

    #[test]
    fn client_connections_go_to_the_least_loaded_thread_the_first_on_a_tie() {
        for (counts, want) in [
            (vec![], 0),
            (vec![0], 0),
            (vec![0, 0], 0), // a lone connection stays on the first thread
            (vec![1, 0], 1),
            (vec![1, 1, 0], 2),
            (vec![2, 1, 1], 1),
            (vec![3, 5, 4], 0),
        ] {
            assert_eq!(least_loaded(counts.iter().copied()), want, "{counts:?}");
        }
    }

    #[test]
    fn routes_table() {
        let mut svc =
            service(vec![export("east", vec![ep("10.0.0.1", None, Health::Healthy)])], &["east"]);
        svc.ips = vec!["242.1.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        let mut udp = svc.ports[0].clone();
        udp.port.protocol = Protocol::Udp;
        udp.port.port = 53;
        svc.ports.push(udp);
        let addrs: Vec<String> = service_routes(&svc).iter().map(|(a, _)| a.to_string()).collect();
        assert_eq!(addrs, vec!["242.1.0.1:80", "[fd00::1]:80"], "TCP ports only, every IP");
        let mut headless = svc.clone();
        headless.service_type = ServiceType::Headless;
        assert!(service_routes(&headless).is_empty());
        let vip = EndpointVip {
            key: svc.key.clone(),
            cluster: cid("west"),
            endpoint: "10.2.0.1".parse().unwrap(),
        };
        let routes = vip_routes("242.2.0.9".parse().unwrap(), &vip, Some(&headless));
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].0.to_string(), "242.2.0.9:80");
        assert!(
            matches!(&routes[0].1, Route::Endpoint { endpoint, .. } if endpoint.to_string() == "10.2.0.1")
        );
        assert!(vip_routes("242.2.0.9".parse().unwrap(), &vip, None).is_empty());
    }

    #[tokio::test]
    async fn a_listener_that_cannot_bind_at_start_up_fails_start_up() {
        use crate::dataplane::tests::{cluster_state, random_loopback, settings, snapshot};
        let vip = random_loopback();
        let taken = std::net::TcpListener::bind((vip, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let (_s, snap) = tokio::sync::watch::channel(Arc::new(snapshot(vip, port, &[], &[])));
        let (_c, cluster) = tokio::sync::watch::channel(Arc::new(cluster_state(port, &[])));
        let err = DataPlane::with_tunnel(settings("east", "us", "us-a"), snap, cluster, None)
            .err()
            .expect("the ClusterSetIP port is taken");
        let DataPlaneError::Bind(addr, _) = &err;
        assert_eq!(*addr, SocketAddr::new(vip, port));
        assert!(err.to_string().contains(&format!("binding listener {vip}:{port}")), "{err}");
    }

    #[tokio::test]
    async fn a_listener_added_later_that_cannot_bind_is_reported_and_retried() {
        use crate::dataplane::tests::{
            cluster_state, eventually_within, random_loopback, settings, snapshot, start,
        };
        let vip = random_loopback();
        let free = std::net::TcpListener::bind((vip, 0)).unwrap();
        let first = free.local_addr().unwrap().port();
        drop(free);
        let mut settings = settings("east", "us", "us-a");
        let ready = crate::readiness::Ready::new();
        settings.ready = ready.clone();
        let dp =
            start(settings, snapshot(vip, first, &[], &[]), cluster_state(first, &[]), None, None);
        assert!(dp.debug.listeners_ready());
        assert!(ready.is_ready(), "pending: {:?}", ready.pending());
        // A new import whose port another process holds: reported, not ready, not fatal.
        let taken = std::net::TcpListener::bind((vip, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut next = snapshot(vip, port, &[], &[]);
        next.version = 2;
        dp.snapshots.send_replace(Arc::new(next));
        let addr = SocketAddr::new(vip, port);
        eventually_within("the failed bind reported", Duration::from_secs(5), || {
            dp.debug.listener_problems().iter().any(|p| p.address == addr)
        })
        .await;
        let problem = dp.debug.listener_problems()[0].clone();
        assert_eq!(problem.service, "shop/web");
        assert!(problem.reason.contains("in use"), "{problem:?}");
        assert_eq!(problem.backoff_ms, RETRY_MIN.as_millis() as u64);
        assert!(!dp.debug.listeners_ready());
        assert_eq!(ready.pending(), ["listeners"]);
        assert_eq!(dp.debug.listeners().failed, vec![addr]);
        let rows = dp.debug.problems_json();
        assert_eq!(rows[0]["kind"], "listener");
        assert_eq!(rows[0]["object"], format!("listener {addr} (shop/web)"));
        // Once the port is free the retry binds it.
        drop(taken);
        eventually_within("bound after a retry", RETRY_MIN * 4, || {
            dp.debug.listeners().bound.contains(&addr)
        })
        .await;
        assert!(dp.debug.listener_problems().is_empty());
        assert!(dp.debug.listeners_ready());
        assert!(ready.is_ready(), "pending: {:?}", ready.pending());
        dp.shutdown.cancel();
        dp.task.await.unwrap();
    }

    #[test]
    fn retry_delay_doubles_to_the_cap() {
        let got: Vec<u64> = (1..=9).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_delay(0), RETRY_MIN);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }

    #[tokio::test]
    async fn freebind_binds_an_unassigned_loopback_address() {
        // 127.0.0.0/8 is local; FREEBIND would also allow addresses not yet configured.
        let l = bind_freebind("127.11.12.13:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(addr.ip().to_string(), "127.11.12.13");
        let taken = bind_freebind(addr);
        assert!(taken.is_err() || cfg!(not(target_os = "linux")), "port in use must fail");
    }
}
