//! The data plane: ClusterSetIP listeners, endpoint selection with failover priority, health
//! checks, connection-level failover and the tunnel stream protocol between gateways.
//!
//! Shape (STYLE rule 1): [`DataPlane::new`] builds everything and binds the listeners the
//! first snapshot asks for; [`DataPlane::run`] serves until shutdown and then drains. The
//! decisions live in pure modules ([`select`], [`codec`], [`health`]'s state machines); the
//! I/O modules wrap them. See docs/endpoint-selection.md and docs/tunnel-protocol.md.

pub mod acceptor;
pub mod activity;
pub mod codec;
pub mod connect;
pub mod drain;
pub mod front;
pub mod health;
pub mod inspect;
pub mod limits;
pub mod listeners;
pub mod metrics;
pub mod peers;
pub mod proxy;
pub mod select;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod views;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use fedgate_discovery::model::{ClusterId, ClusterState, HealthMap, ImportSnapshot, Locality};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use drain::{Drain, DrainOutcome};
pub use health::{HealthChecker, HealthSettings, OutlierSettings};
pub use proxy::{ActivityHook, BoxRecv, BoxSend, TunnelRecv, TunnelSend};
pub use select::{EndpointView, PriorityLabel, SkipReason};
pub use views::DebugPort;

use health::{FailureOutcome, Outliers};
use select::EndpointState;

/// Default bound on all connect attempts of one client connection (failover included).
pub const DEFAULT_CONNECT_BUDGET: Duration = Duration::from_secs(3);
/// Default bound on one connect attempt (TCP connect, or tunnel stream + status).
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time an accepted tunnel stream has to deliver its request header.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default longest wait for open connections when draining (Istio's default).
pub const DEFAULT_DRAIN_DURATION: Duration = Duration::from_secs(45);
/// Default cap on client connections open on one gateway.
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;
/// Default cap on client connections of one service on one gateway.
pub const DEFAULT_MAX_CONNECTIONS_PER_SERVICE: usize = 4096;
/// Default idle timeout of client connections (no bytes either way): 1 hour, Istio's and
/// Envoy's TCP proxy default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// At most this many candidates of one tier are tried before moving to the next tier.
pub const CANDIDATES_PER_TIER: usize = 8;

/// Everything the data plane needs from the configuration; the composition root maps the
/// validated `Config` onto it.
#[derive(Clone, Debug)]
pub struct DataPlaneSettings {
    /// This gateway's cluster.
    pub cluster: ClusterId,
    /// This gateway's locality: the client locality for failover priority.
    pub locality: Locality,
    /// `traffic.failoverPriority` entries (`label` or `label=value`).
    pub failover_priority: Vec<String>,
    pub health: HealthSettings,
    pub outliers: OutlierSettings,
    /// `front.mode: vip`: bind ClusterSetIPs and endpoint VIPs. Off in `kube` mode.
    pub vip_listeners: bool,
    pub connect_budget: Duration,
    pub attempt_timeout: Duration,
    pub header_timeout: Duration,
    pub drain_duration: Duration,
    /// Client connections open at once on this gateway; more are reset.
    pub max_connections: usize,
    /// Client connections of one service open at once; more are reset.
    pub max_connections_per_service: usize,
    /// A client connection without bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Called by the copy loops when they move bytes (the data thread's busy poller).
    pub activity: ActivityHook,
    /// The data-plane threads' runtimes (`DataThread::handles`): accepted client connections
    /// are served on them in turn. Empty or one: on the accepting runtime.
    pub shards: Vec<tokio::runtime::Handle>,
    /// The gateway's readiness registry: the listeners register as `listeners`.
    pub ready: crate::readiness::Ready,
}

impl DataPlaneSettings {
    /// Settings with every default (failover priority: region, cluster, zone).
    pub fn new(cluster: ClusterId, locality: Locality) -> Self {
        Self {
            cluster,
            locality,
            failover_priority: vec![
                fedgate_discovery::model::LABEL_REGION.to_owned(),
                fedgate_discovery::model::LABEL_SOURCE_CLUSTER.to_owned(),
                fedgate_discovery::model::LABEL_ZONE.to_owned(),
            ],
            health: HealthSettings::default(),
            outliers: OutlierSettings::default(),
            vip_listeners: true,
            connect_budget: DEFAULT_CONNECT_BUDGET,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            drain_duration: DEFAULT_DRAIN_DURATION,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_service: DEFAULT_MAX_CONNECTIONS_PER_SERVICE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            activity: ActivityHook::NONE,
            shards: Vec::new(),
            ready: crate::readiness::Ready::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("binding listener {0}: {1} (is the ClusterSetIP range local or routed to lo?)")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// What the data plane needs from the QUIC tunnel; implemented by [`peers::PeerTunnel`] over
/// `fedgate_tunnel`'s `PeerHandle`, and by an in-memory loopback in tests.
pub trait Tunnel: Send + Sync + 'static {
    /// Opens a stream to `peer` (the tunnel writes the stream-kind byte).
    fn open(&self, peer: &ClusterId) -> BoxFuture<'static, Result<(BoxSend, BoxRecv), String>>;
    /// Opens a stream to one replica of `peer`, and names the replica's connection (for
    /// [`Tunnel::suspect`]). Without replicas: [`Tunnel::open`], connection 0.
    fn open_replica(
        &self,
        peer: &ClusterId,
    ) -> BoxFuture<'static, Result<(BoxSend, BoxRecv, usize), String>> {
        let open = self.open(peer);
        Box::pin(async move { open.await.map(|(s, r)| (s, r, 0)) })
    }
    /// A stream on connection `link` to `peer` went unanswered or was refused: new streams
    /// go to the peer's other replicas first for a while.
    fn suspect(&self, _peer: &ClusterId, _link: usize) {}
    /// How many replicas of `peer` are connected.
    fn replicas(&self, peer: &ClusterId) -> usize {
        usize::from(self.is_connected(peer))
    }
    /// Tells peers this gateway is draining.
    fn set_draining(&self, draining: bool);
    /// Whether the connection to `peer` is up right now.
    fn is_connected(&self, peer: &ClusterId) -> bool;
}

/// A tunnel stream a peer opened to us (its kind byte already consumed).
pub struct Incoming {
    pub peer: ClusterId,
    pub send: BoxSend,
    pub recv: BoxRecv,
    /// Where to serve it: the runtime of the data-plane thread its tunnel connection runs
    /// on. `None`: the runtime that receives it.
    pub runtime: Option<tokio::runtime::Handle>,
}

/// Live state of endpoints: passive ejections and outstanding connections.
#[derive(Debug, Default)]
struct EndpointTable {
    outliers: Outliers,
    outstanding: HashMap<(ClusterId, IpAddr), u32>,
}

struct TableView<'a> {
    table: &'a EndpointTable,
    now: Instant,
}

impl EndpointState for TableView<'_> {
    fn is_ejected(&self, cluster: &ClusterId, address: IpAddr) -> bool {
        self.table.outliers.is_ejected(cluster, address, self.now)
    }
    fn outstanding(&self, cluster: &ClusterId, address: IpAddr) -> u32 {
        self.table.outstanding.get(&(cluster.clone(), address)).copied().unwrap_or(0)
    }
}

/// State every task of the data plane reads.
pub(crate) struct Shared {
    settings: DataPlaneSettings,
    client_labels: BTreeMap<String, String>,
    priority: Vec<PriorityLabel>,
    snapshot: watch::Receiver<Arc<ImportSnapshot>>,
    cluster: watch::Receiver<Arc<ClusterState>>,
    health: watch::Receiver<Arc<HealthMap>>,
    tunnel: Option<Arc<dyn Tunnel>>,
    table: Mutex<EndpointTable>,
    drain: Drain,
    listeners: Arc<ArcSwap<listeners::ListenerState>>,
    /// Traffic and failovers for the dashboard (`/debug/traffic`, `/debug/failovers`).
    activity: Arc<activity::Activity>,
    /// Last probe of each local endpoint (`/debug/probes`, explain).
    probes: health::ProbeLog,
    /// Caps on client connections.
    limits: Arc<limits::Limits>,
    /// Client connections open on each data-plane thread (`listeners::spawn_client`).
    per_shard: Arc<[std::sync::atomic::AtomicUsize]>,
}

/// One outstanding connection to an endpoint, for least-outstanding balancing.
pub(crate) struct Outstanding {
    shared: Arc<Shared>,
    key: (ClusterId, IpAddr),
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let mut t = self.shared.lock_table();
        if let Some(n) = t.outstanding.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.outstanding.remove(&self.key);
            }
        }
    }
}

impl Shared {
    fn lock_table(&self) -> MutexGuard<'_, EndpointTable> {
        // A panic while holding the lock leaves counters that are still usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn track(self: &Arc<Self>, cluster: &ClusterId, address: IpAddr) -> Outstanding {
        let key = (cluster.clone(), address);
        *self.lock_table().outstanding.entry(key.clone()).or_default() += 1;
        Outstanding { shared: self.clone(), key }
    }

    pub(crate) fn record_success(&self, cluster: &ClusterId, address: IpAddr) {
        if self.lock_table().outliers.record_success(cluster, address, Instant::now()) {
            tracing::info!(%cluster, endpoint = %address, "ejection ended by a successful connect");
            metrics::record_ejection_ended("success");
        }
    }

    /// A failed connect to `address`, an endpoint of a service whose endpoints are `pool`
    /// (for the cap on the share of them that may be ejected).
    pub(crate) fn record_failure<'a>(
        &self,
        cluster: &ClusterId,
        address: IpAddr,
        pool: impl IntoIterator<Item = (&'a ClusterId, IpAddr)>,
    ) {
        let outcome =
            self.lock_table().outliers.record_failure(cluster, address, pool, Instant::now());
        match outcome {
            FailureOutcome::Ejected(time) => {
                tracing::warn!(%cluster, endpoint = %address, ejection_secs = time.as_secs(), "endpoint ejected after consecutive connect failures");
                metrics::record_ejection(cluster.as_str());
            }
            FailureOutcome::CapReached => {
                tracing::debug!(%cluster, endpoint = %address, "not ejected: the service has maxEjectionPercent of its endpoints ejected");
                metrics::record_ejection_capped(cluster.as_str());
            }
            FailureOutcome::Counted | FailureOutcome::AlreadyEjected => {}
        }
    }

    /// A passing active probe of the local endpoint `address` ends its ejection.
    fn probe_passed(&self, address: IpAddr) {
        let local = &self.settings.cluster;
        if self.lock_table().outliers.probe_passed(local, address, Instant::now()) {
            tracing::info!(cluster = %local, endpoint = %address, "ejection ended by a passing probe");
            metrics::record_ejection_ended("probe");
        }
    }

    pub(crate) fn is_ejected(&self, cluster: &ClusterId, address: IpAddr) -> bool {
        self.lock_table().outliers.is_ejected(cluster, address, Instant::now())
    }

    pub(crate) fn outstanding(&self, cluster: &ClusterId, address: IpAddr) -> u32 {
        TableView { table: &self.lock_table(), now: Instant::now() }.outstanding(cluster, address)
    }

    /// Clusters that cannot take traffic: unreachable per the snapshot, or (when a tunnel is
    /// configured) whose QUIC connection is down right now. Only the clusters of `service` are
    /// checked against the tunnel, or every known cluster when `service` is `None`.
    fn unreachable(
        &self,
        snapshot: &ImportSnapshot,
        service: Option<&fedgate_discovery::model::ImportedService>,
    ) -> std::collections::BTreeSet<ClusterId> {
        let mut out = snapshot.unreachable.clone();
        if let Some(t) = &self.tunnel {
            let mut check = |cluster: &ClusterId| {
                if *cluster != self.settings.cluster
                    && !out.contains(cluster)
                    && !t.is_connected(cluster)
                {
                    out.insert(cluster.clone());
                }
            };
            match service {
                Some(s) => s.clusters.keys().for_each(&mut check),
                None => {
                    snapshot.localities.keys().for_each(&mut check);
                    for s in snapshot.services.values() {
                        s.clusters.keys().for_each(&mut check);
                    }
                }
            }
        }
        out
    }

    /// Ranks the endpoints of one port of a service (see [`select::rank`]).
    pub(crate) fn rank(
        &self,
        snapshot: &ImportSnapshot,
        service: &fedgate_discovery::model::ImportedService,
        port: &fedgate_discovery::model::ServicePort,
        unreachable: &std::collections::BTreeSet<ClusterId>,
        only: Option<(&ClusterId, IpAddr)>,
    ) -> Vec<EndpointView> {
        let health = self.health.borrow().clone();
        let table = self.lock_table();
        let view = TableView { table: &table, now: Instant::now() };
        select::rank(&select::SelectionInput {
            service,
            port,
            local_cluster: &self.settings.cluster,
            client_labels: &self.client_labels,
            priority: &self.priority,
            localities: &snapshot.localities,
            unreachable,
            local_health: &health,
            state: &view,
            only,
            flat: &snapshot.flat,
        })
    }
}

/// The data plane's debug views (`/debug/endpoints`, listener problems); see [`views`].
/// Cheap to clone; hand it to the admin server.
#[derive(Clone)]
pub struct DebugHandle(Arc<Shared>);

/// The data plane of one gateway.
pub struct DataPlane {
    shared: Arc<Shared>,
    health: HealthChecker,
    listeners: listeners::Listeners,
    incoming: Option<mpsc::Receiver<Incoming>>,
    served: Served,
}

/// What the data plane publishes for DNS in front mode `vip` ([`DataPlane::served_snapshots`]):
/// each import snapshot once its listeners are in place, and the import set's completeness
/// once the snapshot it refers to is.
struct Served {
    snapshot: watch::Sender<Arc<ImportSnapshot>>,
    complete: watch::Sender<bool>,
    /// The import set's completeness as discovery publishes it, forwarded to `complete`.
    complete_in: Option<watch::Receiver<bool>>,
}

impl Served {
    /// Binds the listeners of the newest snapshot in `snapshots`, then serves it.
    fn apply(
        &self,
        snapshots: &mut watch::Receiver<Arc<ImportSnapshot>>,
        listeners: &mut listeners::Listeners,
        shared: &Arc<Shared>,
    ) {
        let snap = snapshots.borrow_and_update().clone();
        listeners.reconcile(&snap, shared);
        self.snapshot.send_replace(snap);
    }
}

impl DataPlane {
    /// Builds the data plane and binds the listeners of the current snapshot. `peers` is the
    /// tunnel with the peer sessions (`None`: no peers, local endpoints only). Returns the
    /// receiver of local endpoint health (it travels to peers with the exports). Call inside a
    /// runtime.
    pub fn new(
        settings: DataPlaneSettings,
        snapshot: watch::Receiver<Arc<ImportSnapshot>>,
        cluster: watch::Receiver<Arc<ClusterState>>,
        peers: Option<Arc<peers::PeerTunnel>>,
    ) -> Result<(Self, watch::Receiver<Arc<HealthMap>>), DataPlaneError> {
        let tunnel = peers.map(|p| p as Arc<dyn Tunnel>);
        Self::with_tunnel(settings, snapshot, cluster, tunnel)
    }

    /// Like [`new`](Self::new) over any [`Tunnel`] (tests use an in-memory one).
    pub fn with_tunnel(
        settings: DataPlaneSettings,
        snapshot: watch::Receiver<Arc<ImportSnapshot>>,
        cluster: watch::Receiver<Arc<ClusterState>>,
        tunnel: Option<Arc<dyn Tunnel>>,
    ) -> Result<(Self, watch::Receiver<Arc<HealthMap>>), DataPlaneError> {
        let (health, health_rx) = HealthChecker::new(settings.health.clone(), cluster.clone());
        let dp = Self::with_health(settings, snapshot, health, tunnel)?;
        Ok((dp, health_rx))
    }

    /// Like [`new`](Self::new) with a health checker the caller built first (to hand its
    /// receiver to discovery before the import snapshot exists).
    pub fn with_health(
        settings: DataPlaneSettings,
        snapshot: watch::Receiver<Arc<ImportSnapshot>>,
        mut health: HealthChecker,
        tunnel: Option<Arc<dyn Tunnel>>,
    ) -> Result<Self, DataPlaneError> {
        let client_labels = settings.locality.labels_for(&settings.cluster);
        let priority = PriorityLabel::parse_all(&settings.failover_priority);
        let drain = Drain::new(drain::Active::default(), tunnel.clone());
        let shared = Shared {
            listeners: Default::default(),
            client_labels,
            priority,
            cluster: health.cluster_receiver(),
            health: health.subscribe(),
            snapshot,
            tunnel,
            table: Mutex::new(EndpointTable {
                outliers: Outliers::new(settings.outliers.clone()),
                outstanding: HashMap::new(),
            }),
            drain,
            activity: Arc::default(),
            probes: health.probe_log(),
            limits: limits::Limits::new(
                settings.max_connections,
                settings.max_connections_per_service,
            ),
            per_shard: (0..settings.shards.len().max(1))
                .map(|_| std::sync::atomic::AtomicUsize::new(0))
                .collect(),
            settings,
        };
        let mut listeners = listeners::Listeners::default();
        listeners.register_readiness(&shared.settings.ready);
        let shared = Arc::new(Shared { listeners: listeners.state(), ..shared });
        let weak = Arc::downgrade(&shared);
        health.on_probe_pass(Arc::new(move |address| {
            if let Some(shared) = weak.upgrade() {
                shared.probe_passed(address);
            }
        }));
        let snap = shared.snapshot.borrow().clone();
        if shared.settings.vip_listeners {
            listeners.reconcile(&snap, &shared);
            // A listener of the first snapshot that cannot bind fails start-up.
            if let Some(e) = listeners.take_startup_failure() {
                return Err(e);
            }
        }
        let served = Served {
            snapshot: watch::channel(snap).0,
            complete: watch::channel(false).0,
            complete_in: None,
        };
        Ok(Self { shared, health, listeners, incoming: None, served })
    }

    /// The import snapshots, and whether the import set is complete (`complete`, as discovery
    /// publishes it), as DNS should answer from them. In front mode `vip` each snapshot comes
    /// once the listeners of its ClusterSetIPs and endpoint VIPs are bound (or their bind
    /// failed and waits for a retry), and completeness once the snapshot current when it
    /// turned true has: a name is not answered with an address that refuses connections for
    /// the moment its listener takes to bind, and a name of the complete set is never answered
    /// NXDOMAIN because its snapshot was not yet applied. In other front modes, the two
    /// receivers as they come. Call before [`run`](Self::run).
    pub fn served_snapshots(
        &mut self,
        complete: watch::Receiver<bool>,
    ) -> (watch::Receiver<Arc<ImportSnapshot>>, watch::Receiver<bool>) {
        if !self.shared.settings.vip_listeners {
            return (self.shared.snapshot.clone(), complete);
        }
        // Looked at once when `run` starts, whatever it says then.
        let mut complete = complete;
        complete.mark_changed();
        self.served.complete_in = Some(complete);
        (self.served.snapshot.subscribe(), self.served.complete.subscribe())
    }

    /// Serves the data streams peers open to this gateway: the receiver whose sender was
    /// given to `TunnelEndpoint::new` as `incoming_tunnel`.
    pub fn serve_tunnel(&mut self, incoming: mpsc::Receiver<fedgate_tunnel::IncomingStream>) {
        self.incoming = Some(peers::forward_incoming(incoming));
    }

    /// Like [`serve_tunnel`](Self::serve_tunnel) for streams of any [`Tunnel`].
    pub fn serve_incoming(&mut self, incoming: mpsc::Receiver<Incoming>) {
        self.incoming = Some(incoming);
    }

    /// Addresses of the listeners bound right now.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.listeners.addresses()
    }

    /// Live listener state (bound / waiting for retry), for `/readyz`.
    pub fn listener_state(&self) -> Arc<ArcSwap<listeners::ListenerState>> {
        self.listeners.state()
    }

    pub fn drain_handle(&self) -> Drain {
        self.shared.drain.clone()
    }

    /// `front.mode: kube`: serves, on `ip`, the gateway ports the kube writer allocated to
    /// import ports (`routes`), until draining starts. Spawn the returned future.
    pub fn front_listeners(
        &self,
        ip: IpAddr,
        routes: watch::Receiver<front::FrontRoutes>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        front::serve(self.shared.clone(), ip, routes)
    }

    pub fn debug_handle(&self) -> DebugHandle {
        DebugHandle(self.shared.clone())
    }

    /// Serves until `shutdown`, then drains: stops accepting, waits for open connections
    /// (at most `drain_duration`) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> DrainOutcome {
        let Self { shared, health, mut listeners, incoming, mut served } = self;
        let tasks = CancellationToken::new();
        let health_task = tokio::spawn(health.run(tasks.clone()));
        let acceptor_task = incoming
            .map(|rx| tokio::spawn(acceptor::serve_incoming(shared.clone(), rx, tasks.clone())));
        if shared.settings.vip_listeners {
            let mut snapshots = shared.snapshot.clone();
            let mut retry = tokio::time::interval(listeners::RETRY_INTERVAL);
            retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    () = shared.drain.cancelled() => break,
                    r = snapshots.changed() => {
                        if r.is_err() {
                            shutdown.cancelled().await;
                            break;
                        }
                        served.apply(&mut snapshots, &mut listeners, &shared);
                    }
                    r = changed(&mut served.complete_in) => {
                        let Some(complete_in) = served.complete_in.as_mut().filter(|_| r) else {
                            // Discovery is gone: nothing completes any more.
                            served.complete_in = None;
                            continue;
                        };
                        let complete = *complete_in.borrow_and_update();
                        // The snapshot discovery published before it said complete: served
                        // first, so DNS applies it before it answers NXDOMAIN for unknown names.
                        if snapshots.has_changed().unwrap_or(false) {
                            served.apply(&mut snapshots, &mut listeners, &shared);
                        }
                        served.complete.send_replace(complete);
                    }
                    _ = retry.tick(), if listeners.has_failed() => listeners.retry(&shared),
                }
            }
            // Drain started elsewhere: keep serving existing connections until shutdown.
            shutdown.cancelled().await;
        } else {
            shutdown.cancelled().await;
        }
        listeners.close_all();
        let outcome = shared.drain.drain(shared.settings.drain_duration).await;
        tracing::info!(?outcome, "data plane stopped");
        tasks.cancel();
        let _ = health_task.await;
        if let Some(t) = acceptor_task {
            let _ = t.await;
        }
        outcome
    }
}

/// Waits until `rx` has a new value (true) or its sender is gone (false); never with none.
async fn changed(rx: &mut Option<watch::Receiver<bool>>) -> bool {
    match rx {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tunnel_tests;
