//! Peer sessions: for each configured peer, the export exchange over its control channel,
//! heartbeats, the lease on its exports and the [`PeerUpdate`]s that feed the import set.
//!
//! The import side holds the leases (DESIGN.md): a peer's exports stay while it is heard from
//! (an update or a heartbeat at least every lease), are withdrawn when it falls silent for a
//! whole lease, and come back with the next word from it. A session runs over whatever
//! connection the transport has to the peer right now ([`ControlConnector`]); the gateway
//! implements that over the QUIC tunnel, so this module knows nothing of QUIC. The other
//! direction (serving our exports to peers' watches) is the gRPC server [`PeerSessions::run`]
//! feeds with the control streams peers open.
//!
//! The sessions also own the merged per-peer status (transport and session) that `/debug/peers`,
//! the dashboard and the peer gauges read.

mod metrics;
mod session;
mod status;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::transport::server::Connected;
use tracing::Instrument;

pub use metrics::{PEER_LEASE_EXPIRIES_TOTAL, PEER_SESSION_RESETS_TOTAL, describe_metrics};

use crate::exchange::{ExchangeService, exchange_server};
use crate::model::{ClusterId, ExportSet, PeerStatus, PeerUpdate};
use session::Session;
use status::State;

/// `discovery.peerLeaseDuration` default.
pub const DEFAULT_PEER_LEASE: Duration = Duration::from_secs(15);
/// The shortest lease: heartbeats come every third of it.
pub const MIN_PEER_LEASE: Duration = Duration::from_millis(300);
/// How often the status is republished without events (rtt, time since last seen).
const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// An error from a transport, as the sessions see it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The transport under the sessions: its connections to each replica of each peer, and how
/// it sees them.
pub trait ControlConnector: Send + Sync + 'static {
    type Link: ControlLink;
    /// The transport's working connections to `peer`, one per connected replica: the current
    /// list first, then every change. Ends when the transport stops.
    fn links(&self, peer: &ClusterId) -> BoxStream<'static, Vec<Self::Link>>;
    /// How the transport sees `peer` right now.
    fn transport(&self, peer: &ClusterId) -> TransportStatus;
}

/// One working connection to one replica of a peer, on which control channels are opened.
pub trait ControlLink: Clone + Send + Sync + 'static {
    /// Identifies the connection among the transport's connections.
    fn id(&self) -> usize;
    /// The replica's address, as the transport shows it in [`TransportReplica::address`].
    fn remote(&self) -> String;
    /// A gRPC channel to the peer's exchange service over this connection.
    fn channel(&self) -> BoxFuture<'static, Result<Channel, BoxError>>;
    /// Resolves when the connection has ended.
    fn closed(&self) -> BoxFuture<'static, ()>;
    fn is_closed(&self) -> bool;
    /// Tells the transport whether this replica announced draining (data streams go to the
    /// peer's other replicas first).
    fn set_draining(&self, draining: bool);
    /// Tells the transport this replica sent its exports (it knows its cluster's services):
    /// until then data streams go to the peer's other replicas first.
    fn set_synced(&self);
}

/// The transport's view of one peer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TransportStatus {
    /// The peer's configured addresses.
    pub address: String,
    /// Whether any replica is connected.
    pub connected: bool,
    pub rtt_ms: Option<f64>,
    pub path_mtu: Option<u16>,
    /// Why the last connection attempt failed or the last connection ended.
    pub last_error: Option<String>,
    /// How many replicas the configured addresses resolve to.
    pub expected_replicas: usize,
    /// Each replica the transport knows: connected ones, and dialed addresses without a
    /// connection now.
    pub replicas: Vec<TransportReplica>,
}

/// The transport's view of one replica of a peer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TransportReplica {
    pub address: String,
    pub connected: bool,
    /// `dial` or `accept`.
    pub direction: String,
    pub rtt_ms: Option<f64>,
    pub path_mtu: Option<u16>,
    pub connected_secs: Option<f64>,
    /// Connections beyond the first (lanes).
    pub lanes: usize,
    /// The lanes' send windows together (each follows its path); `None` while not connected.
    pub send_window_bytes: Option<u64>,
    pub last_error: Option<String>,
}

/// What the sessions need to know.
#[derive(Clone, Debug)]
pub struct SessionSettings {
    /// `cluster.id` of this gateway.
    pub local: ClusterId,
    /// The configured peers.
    pub peers: Vec<ClusterId>,
    /// `discovery.peerLeaseDuration`: a peer silent this long has its exports withdrawn.
    pub peer_lease_duration: Duration,
    /// This replica's instance id, announced to peers with every snapshot.
    pub instance: String,
}

impl SessionSettings {
    /// Settings with the default lease and a new instance id.
    pub fn new(local: ClusterId, peers: Vec<ClusterId>) -> Self {
        Self { local, peers, peer_lease_duration: DEFAULT_PEER_LEASE, instance: instance_id() }
    }

    /// How often peers should send heartbeats to us: a third of the lease, so two can be lost.
    pub fn heartbeat_interval(&self) -> Duration {
        self.peer_lease_duration / 3
    }
}

/// A new instance id: 12 hex digits from the clock and the process id, different for every
/// process start (replicas of a cluster and restarts of one replica are told apart by it).
pub fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // RandomState is seeded per process from the OS: two processes started in the same
    // nanosecond still differ.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// Errors of the peer sessions.
#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    #[error("invalid peer session settings: {0}")]
    Settings(String),
}

fn validate(settings: &SessionSettings) -> Result<(), PeersError> {
    if settings.peer_lease_duration < MIN_PEER_LEASE {
        return Err(PeersError::Settings(format!(
            "peerLeaseDuration {:?} is too short (at least 300ms)",
            settings.peer_lease_duration
        )));
    }
    Ok(())
}

/// State shared by the sessions and every [`PeersHandle`].
struct Shared {
    state: State,
    draining: watch::Sender<bool>,
}

/// Every peer's session. `new` checks the settings; `run` serves until shutdown.
pub struct PeerSessions<C: ControlConnector> {
    settings: SessionSettings,
    connector: Arc<C>,
    local_exports: watch::Receiver<Arc<ExportSet>>,
    /// Peers' watches get our exports once this is true ([`PeerSessions::with_exports_ready`]).
    exports_ready: watch::Receiver<bool>,
    updates: mpsc::Sender<PeerUpdate>,
    shared: Arc<Shared>,
}

impl<C: ControlConnector> PeerSessions<C> {
    /// Sessions with every peer of `settings` over `connector`: `local_exports` is served to
    /// the peers, their exports go to `updates` (the import set).
    pub fn new(
        settings: SessionSettings,
        connector: C,
        local_exports: watch::Receiver<Arc<ExportSet>>,
        updates: mpsc::Sender<PeerUpdate>,
    ) -> Result<Self, PeersError> {
        validate(&settings)?;
        let connector = Arc::new(connector);
        let transport = connector.clone();
        let state = State::new(
            settings.peers.iter().cloned(),
            Box::new(move |peer: &ClusterId| transport.transport(peer)),
        );
        let (draining, _) = watch::channel(false);
        let shared = Arc::new(Shared { state, draining });
        let exports_ready = watch::channel(true).1;
        Ok(Self { settings, connector, local_exports, exports_ready, updates, shared })
    }

    /// Serves peers' watches only once `ready` is true (`LocalExports::complete`: the local
    /// export set reflects the cluster source's first sync).
    pub fn with_exports_ready(mut self, ready: watch::Receiver<bool>) -> Self {
        self.exports_ready = ready;
        self
    }

    pub fn handle(&self) -> PeersHandle {
        PeersHandle { shared: self.shared.clone() }
    }

    /// Serves until `shutdown` is cancelled: a session per peer, and the exchange service on
    /// every control stream a peer opens (`control`).
    pub async fn run<IO>(self, control: mpsc::Receiver<IO>, shutdown: CancellationToken)
    where
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        IO::ConnectInfo: Clone + Send + Sync + 'static,
    {
        let service = exchange_server(
            ExchangeService::new(self.local_exports.clone(), self.shared.draining.subscribe())
                .with_instance(&self.settings.instance)
                .with_ready(self.exports_ready.clone()),
        );
        let grpc_shutdown = shutdown.clone();
        let grpc = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    ReceiverStream::new(control).map(Ok::<_, std::io::Error>),
                    grpc_shutdown.cancelled_owned(),
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "export exchange server failed");
            }
        });

        let mut tasks = tokio::task::JoinSet::new();
        for peer in &self.settings.peers {
            let span = tracing::info_span!("peer", peer = %peer);
            let session = Session::new(
                peer.clone(),
                &self.settings,
                self.connector.links(peer),
                self.updates.clone(),
                self.shared.clone(),
                shutdown.clone(),
            );
            tasks.spawn(session.run().instrument(span));
        }
        let mut refresh = tokio::time::interval(STATUS_REFRESH);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = refresh.tick() => self.shared.state.publish(),
            }
        }
        while tasks.join_next().await.is_some() {}
        grpc.abort();
        tracing::debug!("peer sessions stopped");
    }
}

/// What the data plane and admin use: every peer's status, and the draining announcement.
#[derive(Clone)]
pub struct PeersHandle {
    shared: Arc<Shared>,
}

impl PeersHandle {
    /// Every configured peer's status (transport and session), refreshed on each event and
    /// every second.
    pub fn status(&self) -> watch::Receiver<Arc<Vec<PeerStatus>>> {
        self.shared.state.subscribe()
    }

    /// Tells peers (with the next update, at once) whether this gateway is draining.
    pub fn set_draining(&self, draining: bool) {
        self.shared.draining.send_replace(draining);
    }

    /// Whether `peer` announced it is draining.
    pub fn is_draining(&self, peer: &ClusterId) -> bool {
        self.shared.state.current().iter().any(|s| s.cluster == *peer && s.draining)
    }

    /// `/debug/peers`: every peer's status as JSON, read when a request comes in.
    pub fn view(
        &self,
    ) -> impl Fn(&BTreeMap<String, String>) -> serde_json::Value + Send + Sync + 'static {
        let shared = self.shared.clone();
        move |_| shared.state.debug_view()
    }
}
