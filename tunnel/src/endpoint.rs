//! The QUIC endpoint: one UDP socket, one connection per peer pair, the export exchange on
//! control streams, data streams for the data plane, and a lease per peer.
//!
//! Who dials: of two gateways, the one with the lexicographically lower cluster id dials and
//! the other accepts, so a pair never holds two connections. Every bidirectional stream starts
//! with one kind byte: [`KIND_CONTROL`] (HTTP/2 with the gRPC export exchange follows) or
//! [`KIND_DATA`] (a data-plane tunnel stream; the data plane defines what follows).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fedgate_discovery::exchange::{
    ExchangeService, PeerEvent, WatchSettings, exchange_server, watch_peer,
};
use fedgate_discovery::model::{ClusterId, ExportSet, PeerStatus, PeerUpdate};
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use quinn::VarInt;
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::identity::Identity;
use crate::io::QuicIo;
use crate::metrics::{
    PEER_CONNECTIONS_TOTAL, PEER_DISCONNECTS_TOTAL, PEER_LEASE_EXPIRIES_TOTAL,
    PEER_SESSION_RESETS_TOTAL, PEERS_CONNECTED,
};
use crate::reload::{IdentityFiles, IdentityWatcher, ReloadError, ReloadStatus};
use crate::socket::{MAX_GSO_BYTES, TunnelSocket, bind_udp};
use crate::tls::{
    Credentials, Expected, RejectReason, Rejection, RejectionSink, TlsError, check_peer_identity,
    client_crypto, server_crypto,
};

/// First byte of a control stream (HTTP/2 carrying the gRPC export exchange follows).
pub const KIND_CONTROL: u8 = 0x01;
/// First byte of a data-plane tunnel stream.
pub const KIND_DATA: u8 = 0x02;

/// `discovery.peerLeaseDuration` default.
pub const DEFAULT_PEER_LEASE: Duration = Duration::from_secs(15);
/// QUIC keep-alive: a PING this often keeps NATs open and shows a dead peer fast.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A connection silent for this long is dead.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Per-stream receive window: one proxied TCP connection may have this much in flight.
pub const DEFAULT_STREAM_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;
/// Per-connection receive window (and send window): all streams to one peer together.
pub const DEFAULT_CONNECTION_RECEIVE_WINDOW: u32 = 64 * 1024 * 1024;
/// Concurrent bidirectional streams a peer may open (≈ proxied connections per peer).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 4096;
/// SO_RCVBUF / SO_SNDBUF asked for. With CAP_NET_ADMIN it is forced past
/// `net.core.rmem_max`/`wmem_max` (SO_RCVBUFFORCE); without, the kernel caps it there.
pub const DEFAULT_SOCKET_BUFFER: usize = 8 * 1024 * 1024;
/// Upper bound of path MTU discovery, in bytes of UDP payload: a 9000-byte jumbo-frame path
/// with IPv6 headers. Discovery settles lower by itself where the path is smaller (≤ 1472 on
/// 1500-byte Ethernet); 1452 (`tunnel.maxUdpPayloadSize`) pins such a path.
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 8952;
/// Smallest UDP payload QUIC allows (RFC 9000 §14).
pub const MIN_UDP_PAYLOAD: u16 = 1200;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a peer has to send the kind byte of a new stream.
const KIND_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `PeerHandle::status` is refreshed (rtt, last seen) without events.
const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// Application close codes of a connection.
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_REPLACED: u32 = 1;
const CLOSE_WRONG_DIRECTION: u32 = 2;
/// Stream reset codes.
const STREAM_BAD_KIND: u32 = 1;
const STREAM_NOT_SERVED: u32 = 2;

/// A peer gateway as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub id: ClusterId,
    /// Its tunnel address, `host:port` (an IP or a DNS name, resolved at each dial).
    pub address: String,
}

/// Everything the tunnel needs to know; the composition root maps the YAML config into it.
#[derive(Clone, Debug)]
pub struct TunnelSettings {
    /// UDP address to bind (`tunnel.listen`).
    pub listen: SocketAddr,
    /// `cluster.clusterset`: the trust domain in every SPIFFE id.
    pub clusterset: String,
    /// `cluster.id` of this gateway.
    pub local: ClusterId,
    /// `peers`.
    pub peers: Vec<PeerConfig>,
    /// `discovery.peerLeaseDuration`: a peer silent this long has its exports withdrawn.
    pub peer_lease_duration: Duration,
    pub keep_alive_interval: Duration,
    pub idle_timeout: Duration,
    pub stream_receive_window: u32,
    pub connection_receive_window: u32,
    pub max_concurrent_streams: u32,
    pub socket_buffer: usize,
    /// Upper bound of path MTU discovery (UDP payload bytes, 1200..=65507).
    pub max_udp_payload: u16,
    /// Where the identity was loaded from: watched and reloaded on change. `None`: the
    /// identity given to [`TunnelEndpoint::new`] stays for the endpoint's life.
    pub identity_files: Option<IdentityFiles>,
    /// The runtime that reads the UDP socket, runs quinn's endpoint and connection tasks and
    /// accepts peers' tunnel streams: the gateway's data-plane thread. `None`: the runtime
    /// [`TunnelEndpoint::new`] is called on.
    pub runtime: Option<tokio::runtime::Handle>,
}

impl TunnelSettings {
    /// Settings with the documented defaults for everything but the four required values.
    pub fn new(
        listen: SocketAddr,
        clusterset: impl Into<String>,
        local: ClusterId,
        peers: Vec<PeerConfig>,
    ) -> Self {
        Self {
            listen,
            clusterset: clusterset.into(),
            local,
            peers,
            peer_lease_duration: DEFAULT_PEER_LEASE,
            keep_alive_interval: DEFAULT_KEEP_ALIVE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            stream_receive_window: DEFAULT_STREAM_RECEIVE_WINDOW,
            connection_receive_window: DEFAULT_CONNECTION_RECEIVE_WINDOW,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
            identity_files: None,
            runtime: None,
        }
    }

    /// How often peers should send heartbeats to us: a third of the lease, so two can be lost.
    pub fn heartbeat_interval(&self) -> Duration {
        self.peer_lease_duration / 3
    }
}

/// Errors of the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("binding the tunnel's UDP port {0}: {1} (is another gateway using it?)")]
    Bind(SocketAddr, #[source] io::Error),
    #[error("tunnel TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Reload(#[from] Box<ReloadError>),
    #[error("invalid tunnel settings: {0}")]
    Settings(String),
    #[error("no connection to peer {0} (its tunnel is down)")]
    NotConnected(ClusterId),
    #[error("opening a stream to peer {peer}: {source}")]
    OpenStream {
        peer: ClusterId,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("writing the stream kind to peer {peer}: {source}")]
    WriteKind {
        peer: ClusterId,
        #[source]
        source: quinn::WriteError,
    },
    #[error("peer {peer} refused: {reason}")]
    PeerRejected { peer: ClusterId, reason: Rejection },
    #[error("dialing peer {peer} at {address}: {detail}")]
    Connect { peer: ClusterId, address: String, detail: String },
    #[error(
        "handshake with peer {peer} failed: {source} (does it trust our CA and list us as a peer?)"
    )]
    Handshake {
        peer: ClusterId,
        #[source]
        source: quinn::ConnectionError,
    },
}

impl TunnelError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TunnelError::Bind(..) => "bind",
            TunnelError::Tls(_) => "tls",
            TunnelError::Reload(e) => e.reason(),
            TunnelError::Settings(_) => "settings",
            TunnelError::NotConnected(_) => "not_connected",
            TunnelError::OpenStream { .. } => "open_stream",
            TunnelError::WriteKind { .. } => "write_kind",
            TunnelError::PeerRejected { reason, .. } => reason.reason.as_str(),
            TunnelError::Connect { .. } => "connect",
            TunnelError::Handshake { .. } => "handshake",
        }
    }
}

/// A data stream a peer opened to us; its kind byte is already consumed.
#[derive(Debug)]
pub struct IncomingStream {
    pub peer: ClusterId,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

struct PeerEntry {
    status: PeerStatus,
    last_seen: Option<Instant>,
}

/// State shared by the endpoint's tasks and every `PeerHandle`.
struct Shared {
    connections: Mutex<HashMap<ClusterId, quinn::Connection>>,
    peers: Mutex<BTreeMap<ClusterId, PeerEntry>>,
    status_tx: watch::Sender<Arc<Vec<PeerStatus>>>,
    draining: watch::Sender<bool>,
}

impl Shared {
    fn connection(&self, peer: &ClusterId) -> Option<quinn::Connection> {
        self.connections.lock().unwrap_or_else(PoisonError::into_inner).get(peer).cloned()
    }

    fn update(&self, peer: &ClusterId, f: impl FnOnce(&mut PeerEntry)) {
        {
            let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = peers.get_mut(peer) {
                f(entry);
            }
        }
        self.publish();
    }

    /// Publishes the statuses, with rtt and time since last seen computed now.
    fn publish(&self) {
        let now = Instant::now();
        let connections = self.connections.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let list: Vec<PeerStatus> = peers
            .iter()
            .map(|(id, e)| {
                let mut s = e.status.clone();
                let conn = connections.get(id);
                s.connected = conn.is_some();
                s.rtt_ms = conn.map(|c| c.rtt().as_secs_f64() * 1000.0);
                s.path_mtu = conn.map(|c| c.stats().path.current_mtu);
                s.last_seen_secs = e.last_seen.map(|t| now.duration_since(t).as_secs_f64());
                s
            })
            .collect();
        drop(peers);
        self.status_tx.send_replace(Arc::new(list));
    }
}

/// What the data plane and admin use: open streams, read peer status, announce draining.
#[derive(Clone)]
pub struct PeerHandle {
    shared: Arc<Shared>,
}

impl PeerHandle {
    /// Opens a data stream to `peer` on the existing connection and writes the kind byte.
    pub async fn open_stream(
        &self,
        peer: &ClusterId,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), TunnelError> {
        let conn =
            self.shared.connection(peer).ok_or_else(|| TunnelError::NotConnected(peer.clone()))?;
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|source| TunnelError::OpenStream { peer: peer.clone(), source })?;
        send.write_all(&[KIND_DATA])
            .await
            .map_err(|source| TunnelError::WriteKind { peer: peer.clone(), source })?;
        Ok((send, recv))
    }

    /// Whether the connection to `peer` is up right now.
    pub fn is_connected(&self, peer: &ClusterId) -> bool {
        self.shared.connection(peer).is_some()
    }

    /// Every configured peer's status, refreshed on each event and every second.
    pub fn status(&self) -> watch::Receiver<Arc<Vec<PeerStatus>>> {
        self.shared.status_tx.subscribe()
    }

    /// Tells peers (with the next update, at once) whether this gateway is draining.
    pub fn set_draining(&self, draining: bool) {
        self.shared.draining.send_replace(draining);
    }
}

/// The tunnel endpoint. `new` binds the UDP socket; `run` serves until shutdown.
pub struct TunnelEndpoint {
    settings: TunnelSettings,
    endpoint: quinn::Endpoint,
    address: SocketAddr,
    shared: Arc<Shared>,
    local_exports: watch::Receiver<Arc<ExportSet>>,
    peer_updates: mpsc::Sender<PeerUpdate>,
    incoming_tunnel: mpsc::Sender<IncomingStream>,
    /// Client configurations of the peers we dial (lower id dials), with their rejection sinks.
    dial_configs: HashMap<ClusterId, (quinn::ClientConfig, Arc<RejectionSink>)>,
    accept_sink: Arc<RejectionSink>,
    credentials: Arc<Credentials>,
    watcher: Option<IdentityWatcher>,
    reload_status: watch::Receiver<ReloadStatus>,
}

impl TunnelEndpoint {
    /// Validates the settings, builds the TLS configurations and binds the UDP socket at once.
    /// Must be called inside a tokio runtime.
    pub fn new(
        settings: TunnelSettings,
        identity: Identity,
        local_exports: watch::Receiver<Arc<ExportSet>>,
        peer_updates: mpsc::Sender<PeerUpdate>,
        incoming_tunnel: mpsc::Sender<IncomingStream>,
    ) -> Result<Self, TunnelError> {
        validate(&settings)?;
        let credentials = Credentials::new(&identity, &settings.clusterset, &settings.local)?;
        let watcher = match &settings.identity_files {
            Some(files) => {
                Some(IdentityWatcher::new(files.clone(), credentials.clone()).map_err(Box::new)?)
            }
            None => None,
        };
        let reload_status = match &watcher {
            Some(w) => w.status(),
            None => watch::channel(ReloadStatus::default()).1,
        };
        let transport = Arc::new(transport_config(&settings)?);
        let peer_ids: Vec<ClusterId> = settings.peers.iter().map(|p| p.id.clone()).collect();

        let accept_sink = Arc::new(RejectionSink::new(false));
        let crypto = server_crypto(&credentials, peer_ids, accept_sink.clone())?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server_config.transport_config(transport.clone());

        let mut dial_configs = HashMap::new();
        for peer in settings.peers.iter().filter(|p| settings.local < p.id) {
            let sink = Arc::new(RejectionSink::new(true));
            let crypto = client_crypto(&credentials, peer.id.clone(), sink.clone())?;
            let mut config = quinn::ClientConfig::new(Arc::new(crypto));
            config.transport_config(transport.clone());
            dial_configs.insert(peer.id.clone(), (config, sink));
        }

        let socket = bind_udp(settings.listen, settings.socket_buffer)?;
        let runtime: Arc<dyn quinn::Runtime> = match &settings.runtime {
            Some(handle) => Arc::new(crate::runtime::Pinned(handle.clone())),
            None => Arc::new(quinn::TokioRuntime),
        };
        // The socket registers with the reactor of the runtime that polls it.
        // Connection ids signed with a key of the identity too: the restarted gateway must
        // recognise its predecessor's ids as its own to answer them with a stateless reset.
        let cid_key = cid_key(&identity);
        let entered = settings.runtime.as_ref().map(|h| h.enter());
        let socket = TunnelSocket::new(socket, Some(cid_key))
            .map_err(|e| TunnelError::Bind(settings.listen, e))?;
        drop(entered);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key(&identity)));
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        // What we tell peers we accept, and how large quinn's receive buffers are cut.
        endpoint_config
            .max_udp_payload_size(settings.max_udp_payload.max(1472))
            .map_err(|e| TunnelError::Settings(format!("maxUdpPayloadSize: {e}")))?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server_config),
            socket,
            runtime,
        )
        .map_err(|e| TunnelError::Bind(settings.listen, e))?;
        let address = endpoint.local_addr().map_err(|e| TunnelError::Bind(settings.listen, e))?;

        let peers = settings
            .peers
            .iter()
            .map(|p| {
                let status = PeerStatus {
                    cluster: p.id.clone(),
                    address: p.address.clone(),
                    connected: false,
                    draining: false,
                    rtt_ms: None,
                    path_mtu: None,
                    last_seen_secs: None,
                    exports_version: None,
                    exports_withdrawn: false,
                    last_error: None,
                };
                (p.id.clone(), PeerEntry { status, last_seen: None })
            })
            .collect();
        let (status_tx, _) = watch::channel(Arc::new(Vec::new()));
        let (draining, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            connections: Mutex::default(),
            peers: Mutex::new(peers),
            status_tx,
            draining,
        });
        shared.publish();
        Ok(Self {
            settings,
            endpoint,
            address,
            shared,
            local_exports,
            peer_updates,
            incoming_tunnel,
            dial_configs,
            accept_sink,
            credentials,
            watcher,
            reload_status,
        })
    }

    /// The certificate and CA bundle new handshakes use (replaced on reload).
    pub fn credentials(&self) -> Arc<Credentials> {
        self.credentials.clone()
    }

    /// Outcomes of identity reloads (stays at the default without `identity_files`).
    pub fn reload_status(&self) -> watch::Receiver<ReloadStatus> {
        self.reload_status.clone()
    }

    /// The UDP address actually bound.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn handle(&self) -> PeerHandle {
        PeerHandle { shared: self.shared.clone() }
    }

    /// Serves until `shutdown` is cancelled: accepts peers, dials the peers it must, runs the
    /// export exchange both ways, and closes every connection on the way out.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let (control_tx, control_rx) = mpsc::channel::<io::Result<QuicIo>>(64);
        let service = exchange_server(ExchangeService::new(
            self.local_exports.clone(),
            self.shared.draining.subscribe(),
        ));
        let grpc_shutdown = shutdown.clone();
        let grpc = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    ReceiverStream::new(control_rx),
                    grpc_shutdown.cancelled_owned(),
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "export exchange server failed");
            }
        });

        let mut accepted = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(watcher) = self.watcher.take() {
            tasks.spawn(watcher.run(shutdown.clone()));
        }
        for peer in self.settings.peers.clone() {
            let (tx, rx) = mpsc::channel(4);
            accepted.insert(peer.id.clone(), tx);
            let span = tracing::info_span!("peer", peer = %peer.id, address = %peer.address);
            let task = PeerTask {
                dial: self.dial_configs.remove(&peer.id),
                peer,
                settings: self.settings.clone(),
                endpoint: self.endpoint.clone(),
                accepted: rx,
                control_tx: control_tx.clone(),
                incoming_tunnel: self.incoming_tunnel.clone(),
                updates: self.peer_updates.clone(),
                shared: self.shared.clone(),
                shutdown: shutdown.clone(),
                exports: None,
                last_seen: None,
                withdrawn: false,
                draining: false,
                backoff: Backoff::default(),
                delay: None,
                up: false,
                last_logged_error: None,
                last_rtt: None,
            };
            tasks.spawn(task.run().instrument(span));
        }
        drop(control_tx);
        let accepted = Arc::new(accepted);

        let mut refresh = tokio::time::interval(STATUS_REFRESH);
        tracing::info!(address = %self.address, local = %self.settings.local, peers = self.settings.peers.len(), "tunnel listening");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = refresh.tick() => self.shared.publish(),
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    tokio::spawn(handle_incoming(
                        incoming,
                        self.settings.clone(),
                        accepted.clone(),
                        self.accept_sink.clone(),
                    ));
                }
            }
        }
        self.endpoint.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"gateway shutting down");
        while tasks.join_next().await.is_some() {}
        grpc.abort();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        tracing::debug!("tunnel stopped");
    }
}

fn validate(settings: &TunnelSettings) -> Result<(), TunnelError> {
    let mut seen = std::collections::HashSet::new();
    for p in &settings.peers {
        if p.id == settings.local {
            return Err(TunnelError::Settings(format!(
                "peer {} is this gateway's own cluster id",
                p.id
            )));
        }
        if !seen.insert(&p.id) {
            return Err(TunnelError::Settings(format!("peer {} is listed twice", p.id)));
        }
    }
    if !(MIN_UDP_PAYLOAD..=MAX_GSO_BYTES as u16).contains(&settings.max_udp_payload) {
        return Err(TunnelError::Settings(format!(
            "maxUdpPayloadSize {} is out of range ({MIN_UDP_PAYLOAD}..={MAX_GSO_BYTES})",
            settings.max_udp_payload
        )));
    }
    if settings.peer_lease_duration < Duration::from_millis(300) {
        return Err(TunnelError::Settings(format!(
            "peerLeaseDuration {:?} is too short (at least 300ms)",
            settings.peer_lease_duration
        )));
    }
    Ok(())
}

fn transport_config(settings: &TunnelSettings) -> Result<quinn::TransportConfig, TunnelError> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(settings.stream_receive_window))
        .receive_window(VarInt::from_u32(settings.connection_receive_window))
        .send_window(u64::from(settings.connection_receive_window))
        .max_concurrent_bidi_streams(VarInt::from_u32(settings.max_concurrent_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(settings.keep_alive_interval));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(settings.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    let idle = quinn::IdleTimeout::try_from(settings.idle_timeout).map_err(|_| {
        TunnelError::Settings(format!("idle timeout {:?} is too large", settings.idle_timeout))
    })?;
    t.max_idle_timeout(Some(idle));
    Ok(t)
}

/// The stateless-reset key (RFC 9000 §10.3), derived from the gateway's private key instead of
/// drawn at random: a gateway restarted with the same key on the same port answers packets of
/// its predecessor's connections with resets its peers accept, so they drop the dead
/// connection and redial at once instead of waiting for the idle timeout. HMAC-SHA256 under a
/// fixed label: one-way, and nothing else is keyed with it.
fn reset_key(identity: &Identity) -> ring::hmac::Key {
    ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &derive(identity, b"fedgate/1 stateless reset key"),
    )
}

/// Key of the connection-id generator, derived like [`reset_key`]: quinn only answers a packet
/// for an unknown connection with a stateless reset when its generator validates the id.
fn cid_key(identity: &Identity) -> u64 {
    let d = derive(identity, b"fedgate/1 connection id key");
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// HMAC-SHA256 of the private key under `label`.
fn derive(identity: &Identity, label: &[u8]) -> [u8; 32] {
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, label),
        identity.key.secret_der(),
    );
    let mut out = [0; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// First RTT estimate for redialing a peer whose last connection measured `last`: that RTT,
/// kept between 10 ms (no storm of Initials to a peer that is down: resends at 30, 60,
/// 120 ms …) and quinn's 333 ms default (a worse guess than the default is no guess).
/// `None`: never connected, use the default. Pure.
pub fn redial_initial_rtt(last: Option<Duration>) -> Option<Duration> {
    last.map(|rtt| rtt.clamp(REDIAL_RTT_MIN, REDIAL_RTT_MAX))
}

const REDIAL_RTT_MIN: Duration = Duration::from_millis(10);
const REDIAL_RTT_MAX: Duration = Duration::from_millis(333);

/// Bounded label of why a peer connection ended, for `fedgate_peer_disconnects_total`;
/// `None`: still open when this gateway stopped serving it.
pub fn disconnect_reason(reason: Option<&quinn::ConnectionError>) -> &'static str {
    use quinn::ConnectionError as E;
    match reason {
        None | Some(E::LocallyClosed) => "local",
        Some(E::ApplicationClosed(c)) if c.error_code == VarInt::from_u32(CLOSE_REPLACED) => {
            "replaced"
        }
        Some(E::ApplicationClosed(_) | E::ConnectionClosed(_)) => "closed",
        Some(E::Reset) => "reset",
        Some(E::TimedOut) => "timed_out",
        Some(_) => "other",
    }
}

/// The peer a connection's verified certificate names.
fn peer_of(conn: &quinn::Connection, settings: &TunnelSettings) -> Option<ClusterId> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let peers: Vec<ClusterId> = settings.peers.iter().map(|p| p.id.clone()).collect();
    check_peer_identity(certs.first()?, &settings.clusterset, Expected::AnyOf(&peers)).ok()
}

/// Finishes a handshake a peer started and hands the connection to that peer's task.
async fn handle_incoming(
    incoming: quinn::Incoming,
    settings: TunnelSettings,
    accepted: Arc<HashMap<ClusterId, mpsc::Sender<quinn::Connection>>>,
    sink: Arc<RejectionSink>,
) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            // Certificate problems were counted and logged by the verifier; a missing client
            // certificate never reaches it.
            if is_certificate_required(&e) {
                sink.record(
                    "accept",
                    Rejection {
                        reason: RejectReason::NoCertificate,
                        detail: format!("{remote} presented no certificate"),
                    },
                );
            } else {
                tracing::debug!(%remote, error = %e, "incoming handshake failed");
            }
            return;
        }
    };
    let Some(peer) = peer_of(&conn, &settings) else {
        conn.close(VarInt::from_u32(CLOSE_WRONG_DIRECTION), b"no peer identity");
        return;
    };
    if settings.local < peer {
        tracing::warn!(%peer, %remote, "peer dialed us, but the gateway with the lower cluster id dials; refusing");
        conn.close(
            VarInt::from_u32(CLOSE_WRONG_DIRECTION),
            b"the gateway with the lower cluster id dials",
        );
        return;
    }
    if let Some(tx) = accepted.get(&peer) {
        let _ = tx.send(conn).await;
    }
}

/// Whether a handshake failed because the client sent no certificate (TLS alert 116).
fn is_certificate_required(e: &quinn::ConnectionError) -> bool {
    const CERTIFICATE_REQUIRED: u8 = 116;
    matches!(e, quinn::ConnectionError::TransportError(t)
        if t.code == quinn::TransportErrorCode::crypto(CERTIFICATE_REQUIRED))
}

/// Exponential backoff from 100 ms to 5 s.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The delay before the next attempt; doubles the one after.
    fn fail(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

async fn sleep_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Accepts the streams a peer opens on `conn` and routes them by kind byte.
async fn accept_streams(
    conn: quinn::Connection,
    peer: ClusterId,
    control_tx: mpsc::Sender<io::Result<QuicIo>>,
    incoming_tunnel: mpsc::Sender<IncomingStream>,
) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let control_tx = control_tx.clone();
        let incoming_tunnel = incoming_tunnel.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            let mut kind = [0u8; 1];
            let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code: u32| {
                let _ = send.reset(VarInt::from_u32(code));
                let _ = recv.stop(VarInt::from_u32(code));
            };
            match tokio::time::timeout(KIND_BYTE_TIMEOUT, recv.read_exact(&mut kind)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "stream ended before its kind byte");
                    return refuse(&mut send, &mut recv, STREAM_BAD_KIND);
                }
                Err(_) => {
                    tracing::debug!(%peer, "no kind byte in time");
                    return refuse(&mut send, &mut recv, STREAM_BAD_KIND);
                }
            }
            match kind[0] {
                KIND_CONTROL => {
                    if let Err(mpsc::error::SendError(Ok(mut io))) =
                        control_tx.send(Ok(QuicIo::new(peer, send, recv))).await
                    {
                        let (s, r) = io.streams_mut();
                        refuse(s, r, STREAM_NOT_SERVED);
                    }
                }
                KIND_DATA => {
                    if let Err(mpsc::error::SendError(mut s)) =
                        incoming_tunnel.send(IncomingStream { peer, send, recv }).await
                    {
                        refuse(&mut s.send, &mut s.recv, STREAM_NOT_SERVED);
                    }
                }
                other => {
                    tracing::debug!(%peer, kind = other, "unknown stream kind; resetting");
                    refuse(&mut send, &mut recv, STREAM_BAD_KIND);
                }
            }
        });
    }
}

/// A gRPC channel whose connections are new control streams on `conn`.
async fn control_channel(
    conn: quinn::Connection,
    peer: ClusterId,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let conn = conn.clone();
        let peer = peer.clone();
        async move {
            let (mut send, recv) = conn.open_bi().await.map_err(io::Error::other)?;
            send.write_all(&[KIND_CONTROL]).await.map_err(io::Error::other)?;
            Ok::<_, io::Error>(TokioIo::new(QuicIo::new(peer, send, recv)))
        }
    });
    tonic::transport::Endpoint::from_static("http://peer.fedgate")
        .connect_with_connector(connector)
        .await
}

/// One configured peer: its connection (dialed or accepted), its export session, its lease.
struct PeerTask {
    peer: PeerConfig,
    settings: TunnelSettings,
    endpoint: quinn::Endpoint,
    /// Set when we dial this peer (our id is lower).
    dial: Option<(quinn::ClientConfig, Arc<RejectionSink>)>,
    accepted: mpsc::Receiver<quinn::Connection>,
    control_tx: mpsc::Sender<io::Result<QuicIo>>,
    incoming_tunnel: mpsc::Sender<IncomingStream>,
    updates: mpsc::Sender<PeerUpdate>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    exports: Option<Arc<ExportSet>>,
    last_seen: Option<Instant>,
    withdrawn: bool,
    draining: bool,
    backoff: Backoff,
    /// Wait this long before the next dial.
    delay: Option<Duration>,
    /// Whether the current connection counts as up (published, Reachability sent).
    up: bool,
    last_logged_error: Option<String>,
    /// Smoothed RTT of the last connection to this peer: the first RTT estimate of a redial.
    last_rtt: Option<Duration>,
}

enum Next {
    Shutdown,
    LeaseExpired,
    Connected(Option<quinn::Connection>),
}

enum Step {
    Stop,
    Replace(Option<quinn::Connection>),
    LeaseExpired,
    Event(Option<Result<PeerEvent, fedgate_discovery::exchange::ExchangeError>>),
}

impl PeerTask {
    async fn run(mut self) {
        loop {
            let deadline = self.lease_deadline();
            let shutdown = self.shutdown.clone();
            let next = tokio::select! {
                _ = shutdown.cancelled() => Next::Shutdown,
                _ = sleep_opt(deadline) => Next::LeaseExpired,
                conn = self.next_connection() => Next::Connected(conn),
            };
            match next {
                Next::Shutdown | Next::Connected(None) => return,
                Next::LeaseExpired => self.expire_lease().await,
                Next::Connected(Some(conn)) => {
                    let mut current = Some(conn);
                    while let Some(conn) = current.take() {
                        current = self.serve_connection(conn).await;
                    }
                    if self.shutdown.is_cancelled() {
                        return;
                    }
                }
            }
        }
    }

    /// Sends `update` to the import set; gives up when shutting down (the reader may be gone
    /// or no longer reading).
    async fn emit(&self, update: PeerUpdate) {
        tokio::select! {
            _ = self.updates.send(update) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }

    fn lease_deadline(&self) -> Option<Instant> {
        match (&self.exports, self.last_seen) {
            (Some(_), Some(seen)) if !self.withdrawn => {
                Some(seen + self.settings.peer_lease_duration)
            }
            _ => None,
        }
    }

    async fn expire_lease(&mut self) {
        if self.withdrawn || self.exports.is_none() {
            return;
        }
        self.withdrawn = true;
        metrics::counter!(PEER_LEASE_EXPIRIES_TOTAL).increment(1);
        tracing::warn!(lease = ?self.settings.peer_lease_duration, "peer silent past its lease; withdrawing its exports");
        self.emit(PeerUpdate::Withdrawn(self.peer.id.clone())).await;
        self.shared.update(&self.peer.id, |e| e.status.exports_withdrawn = true);
    }

    /// The next connection: dialed (with backoff) or accepted.
    async fn next_connection(&mut self) -> Option<quinn::Connection> {
        if self.dial.is_none() {
            return self.accepted.recv().await;
        }
        loop {
            if let Some(delay) = self.delay.take() {
                tokio::time::sleep(delay).await;
            }
            match self.try_dial().await {
                Ok(conn) => return Some(conn),
                Err(e) => {
                    self.note_error(&e);
                    self.delay = Some(self.backoff.fail());
                }
            }
        }
    }

    async fn try_dial(&mut self) -> Result<quinn::Connection, TunnelError> {
        let peer = self.peer.id.clone();
        let address = self.peer.address.clone();
        let connect_err = |detail: String| TunnelError::Connect {
            peer: peer.clone(),
            address: address.clone(),
            detail,
        };
        let Some((config, sink)) = &self.dial else {
            return Err(connect_err("this gateway does not dial the peer".into()));
        };
        let local_v4 = self.endpoint.local_addr().map(|a| a.is_ipv4()).unwrap_or(true);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&address)
            .await
            .map_err(|e| connect_err(format!("resolving: {e}")))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4() == local_v4)
            .or(addrs.first())
            .copied()
            .ok_or_else(|| connect_err("the name resolves to no address".into()))?;
        sink.take();
        let mut config = config.clone();
        if let Some(rtt) = redial_initial_rtt(self.last_rtt) {
            // RFC 9002 §6.2.2: a new connection to a peer may start from the RTT measured on
            // the previous one instead of 333 ms. The first Initial of a redial is often lost
            // (the peer is restarting, its port closed), and its resend waits for the first
            // PTO: ~3 × the initial RTT, 1 s with the default.
            let mut transport = transport_config(&self.settings)?;
            transport.initial_rtt(rtt);
            config.transport_config(Arc::new(transport));
        }
        // quinn instruments the connection's driver task with the span current at this call
        // and enters it at every poll. Here that would be this task's `peer` span, which is
        // enabled at the default `info` level, so every packet would pay the subscriber's
        // enter, exit and filter calls. The call runs in a task of its own, outside any span,
        // as accepted connections' calls do (docs/decisions.md, session 6).
        let endpoint = self.endpoint.clone();
        let server_name = peer.clone();
        let connecting =
            tokio::spawn(async move { endpoint.connect_with(config, addr, server_name.as_str()) })
                .await
                .map_err(|e| connect_err(format!("the dial task failed: {e}")))?
                .map_err(|e| connect_err(e.to_string()))?;
        connecting.await.map_err(|source| match sink.take() {
            Some(reason) => TunnelError::PeerRejected { peer: peer.clone(), reason },
            None => TunnelError::Handshake { peer: peer.clone(), source },
        })
    }

    /// Records `e` in the status, and logs it when it differs from the last one logged.
    fn note_error(&mut self, e: &dyn std::error::Error) {
        let text = e.to_string();
        if self.last_logged_error.as_deref() != Some(text.as_str()) {
            tracing::warn!(error = %text, "peer connection failed; retrying with backoff");
            self.last_logged_error = Some(text.clone());
        } else {
            tracing::debug!(error = %text, "peer connection failed again");
        }
        self.shared.update(&self.peer.id, |entry| entry.status.last_error = Some(text));
    }

    /// Serves one connection until it closes, shutdown, or the peer reconnects (then the new
    /// connection is returned to be served next).
    async fn serve_connection(&mut self, conn: quinn::Connection) -> Option<quinn::Connection> {
        let peer = self.peer.id.clone();
        // The acceptor verified the peer's certificate before the handshake completed. The
        // dialer's handshake completes before the acceptor has checked *our* certificate
        // (TLS 1.3), so the dialer counts the peer up only with its first update.
        self.up = false;
        if self.dial.is_none() {
            self.mark_up(&conn).await;
        }
        let streams = crate::runtime::spawn_on(
            self.settings.runtime.as_ref(),
            accept_streams(
                conn.clone(),
                peer.clone(),
                self.control_tx.clone(),
                self.incoming_tunnel.clone(),
            ),
        );
        let started = Instant::now();
        let replacement = self.exchange(&conn).await;

        streams.abort();
        if replacement.is_some() {
            conn.close(VarInt::from_u32(CLOSE_REPLACED), b"replaced by a new connection");
        }
        let reason = conn.close_reason();
        self.last_rtt = Some(conn.rtt());
        if !self.up {
            // Refused after the handshake (our certificate), or gone before any update.
            if let Some(source) = reason {
                self.note_error(&TunnelError::Handshake { peer, source });
            }
            self.delay = Some(self.backoff.fail());
            return replacement;
        }
        self.up = false;
        {
            let mut conns = self.shared.connections.lock().unwrap_or_else(PoisonError::into_inner);
            if conns.get(&peer).is_some_and(|c| c.stable_id() == conn.stable_id()) {
                conns.remove(&peer);
            }
        }
        metrics::gauge!(PEERS_CONNECTED).decrement(1.0);
        let label =
            if replacement.is_some() { "replaced" } else { disconnect_reason(reason.as_ref()) };
        metrics::counter!(PEER_DISCONNECTS_TOTAL, "reason" => label).increment(1);
        let reason = reason.map(|r| r.to_string());
        tracing::info!(reason = reason.as_deref().unwrap_or("replaced"), "peer disconnected");
        self.shared.update(&peer, |e| {
            e.status.draining = false;
            if let Some(r) = reason {
                e.status.last_error = Some(r);
            }
        });
        self.draining = false;
        self.emit(PeerUpdate::Reachability { cluster: peer, reachable: false, draining: false })
            .await;
        if started.elapsed() >= BACKOFF_MAX {
            self.backoff.reset();
        } else {
            // A connection that keeps dying young is retried with backoff, not in a loop.
            self.delay = Some(self.backoff.fail());
        }
        replacement
    }

    /// The connection works: publish it for data streams and tell the import set.
    async fn mark_up(&mut self, conn: &quinn::Connection) {
        if self.up {
            return;
        }
        self.up = true;
        let peer = self.peer.id.clone();
        let direction = if self.dial.is_some() { "dial" } else { "accept" };
        metrics::counter!(PEER_CONNECTIONS_TOTAL, "direction" => direction).increment(1);
        metrics::gauge!(PEERS_CONNECTED).increment(1.0);
        tracing::info!(direction, remote = %conn.remote_address(), "peer connected");
        self.last_logged_error = None;
        self.shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer.clone(), conn.clone());
        self.shared.update(&peer, |e| e.status.last_error = None);
        self.emit(PeerUpdate::Reachability {
            cluster: peer,
            reachable: true,
            draining: self.draining,
        })
        .await;
    }

    /// Runs the watch of the peer's exports on `conn`, re-watching (full resync) after a
    /// session error, until the connection ends.
    async fn exchange(&mut self, conn: &quinn::Connection) -> Option<quinn::Connection> {
        let mut retry = Backoff::default();
        let watch = WatchSettings {
            local: self.settings.local.clone(),
            peer: self.peer.id.clone(),
            heartbeat_interval: self.settings.heartbeat_interval(),
        };
        let accepting = self.dial.is_none();
        loop {
            let channel = match control_channel(conn.clone(), self.peer.id.clone()).await {
                Ok(channel) => Some(channel),
                Err(e) => {
                    tracing::debug!(error = %e, "opening the control channel failed");
                    None
                }
            };
            if let Some(channel) = channel {
                let mut events = watch_peer(channel, watch.clone(), self.exports.clone());
                loop {
                    let deadline = self.lease_deadline();
                    let step = tokio::select! {
                        _ = self.shutdown.cancelled() => Step::Stop,
                        _ = conn.closed() => Step::Stop,
                        new = self.accepted.recv(), if accepting => Step::Replace(new),
                        _ = sleep_opt(deadline) => Step::LeaseExpired,
                        ev = events.next() => Step::Event(ev),
                    };
                    match step {
                        Step::Stop | Step::Replace(None) => return None,
                        Step::Replace(Some(new)) => return Some(new),
                        Step::LeaseExpired => self.expire_lease().await,
                        Step::Event(Some(Ok(ev))) => {
                            retry.reset();
                            self.mark_up(conn).await;
                            self.on_event(ev).await;
                        }
                        Step::Event(Some(Err(e))) => {
                            metrics::counter!(PEER_SESSION_RESETS_TOTAL, "reason" => e.reason())
                                .increment(1);
                            if conn.close_reason().is_none() {
                                tracing::warn!(error = %e, "export session reset; resyncing");
                                self.shared.update(&self.peer.id, |entry| {
                                    entry.status.last_error = Some(e.to_string())
                                });
                            }
                            break;
                        }
                        Step::Event(None) => break,
                    }
                }
            }
            // Wait before re-watching, still minding the connection, the lease and shutdown.
            let pause = tokio::time::sleep(retry.fail());
            tokio::pin!(pause);
            loop {
                let deadline = self.lease_deadline();
                let step = tokio::select! {
                    _ = self.shutdown.cancelled() => Step::Stop,
                    _ = conn.closed() => Step::Stop,
                    new = self.accepted.recv(), if accepting => Step::Replace(new),
                    _ = sleep_opt(deadline) => Step::LeaseExpired,
                    _ = &mut pause => Step::Event(None),
                };
                match step {
                    Step::Stop | Step::Replace(None) => return None,
                    Step::Replace(Some(new)) => return Some(new),
                    Step::LeaseExpired => self.expire_lease().await,
                    Step::Event(_) => break,
                }
            }
        }
    }

    async fn on_event(&mut self, event: PeerEvent) {
        let now = Instant::now();
        self.last_seen = Some(now);
        let draining = event.draining();
        match event {
            PeerEvent::Exports { set, .. } => {
                tracing::debug!(
                    version = set.version,
                    services = set.services.len(),
                    "peer exports updated"
                );
                self.exports = Some(set.clone());
                self.withdrawn = false;
                self.emit(PeerUpdate::Exports(set)).await;
            }
            PeerEvent::Heartbeat { .. } => {
                if self.withdrawn
                    && let Some(set) = self.exports.clone()
                {
                    tracing::info!("peer heard from again; restoring its exports");
                    self.withdrawn = false;
                    self.emit(PeerUpdate::Exports(set)).await;
                }
            }
        }
        if draining != self.draining {
            self.draining = draining;
            tracing::info!(draining, "peer draining state changed");
            self.emit(PeerUpdate::Reachability {
                cluster: self.peer.id.clone(),
                reachable: true,
                draining,
            })
            .await;
        }
        let version = self.exports.as_ref().map(|s| s.version);
        self.shared.update(&self.peer.id, |e| {
            e.last_seen = Some(now);
            e.status.draining = draining;
            e.status.exports_version = version;
            e.status.exports_withdrawn = false;
        });
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use crate::testing::TestPki;

    fn id(s: &str) -> ClusterId {
        ClusterId::new(s).expect("valid id")
    }

    /// Lengths of the datagrams one `poll_recv` returns (`None`: it would wait).
    #[test]
    fn reset_key_is_the_same_for_the_same_identity_only() {
        use quinn::crypto::HmacKey;
        let pki = TestPki::new("demo");
        let east = pki.issue("east");
        let sign = |identity: &Identity| {
            let key = reset_key(identity);
            let mut out = vec![0; key.signature_len()];
            key.sign(b"connection id 0123", &mut out);
            out
        };
        // A restarted gateway (same key) issues and recognises the same reset tokens...
        assert_eq!(sign(&east), sign(&east.clone()));
        // ...another gateway's key does not, and the token is not the private key's HMAC
        // under an empty key (the label is in).
        assert_ne!(sign(&east), sign(&pki.issue("west")));
        assert!(sign(&east).iter().any(|b| *b != 0));
        // The connection-id key follows the identity the same way, with its own label.
        assert_eq!(cid_key(&east), cid_key(&east.clone()));
        assert_ne!(cid_key(&east), cid_key(&pki.issue("west")));
    }

    #[test]
    fn disconnect_reasons_are_bounded_labels() {
        use quinn::ConnectionError as E;
        let app = |code: u32| {
            E::ApplicationClosed(quinn::ApplicationClose {
                error_code: VarInt::from_u32(code),
                reason: bytes::Bytes::from_static(b"x"),
            })
        };
        let cases = [
            (None, "local"),
            (Some(E::LocallyClosed), "local"),
            (Some(app(CLOSE_REPLACED)), "replaced"),
            (Some(app(CLOSE_SHUTDOWN)), "closed"),
            (Some(E::Reset), "reset"),
            (Some(E::TimedOut), "timed_out"),
            (Some(E::VersionMismatch), "other"),
        ];
        for (error, want) in cases {
            assert_eq!(disconnect_reason(error.as_ref()), want, "{error:?}");
        }
    }

    #[test]
    fn redials_start_from_the_last_rtt_within_bounds() {
        let ms = Duration::from_millis;
        let cases = [
            (None, None),
            (Some(ms(0)), Some(ms(10))),
            (Some(Duration::from_micros(300)), Some(ms(10))),
            (Some(ms(42)), Some(ms(42))),
            (Some(ms(333)), Some(ms(333))),
            (Some(ms(2000)), Some(ms(333))),
        ];
        for (last, want) in cases {
            assert_eq!(redial_initial_rtt(last), want, "last rtt {last:?}");
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let got: Vec<u64> = (0..8).map(|_| b.fail().as_millis() as u64).collect();
        assert_eq!(got, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.fail(), BACKOFF_MIN);
    }

    #[test]
    fn settings_are_validated() {
        let base =
            TunnelSettings::new("127.0.0.1:0".parse().expect("addr"), "demo", id("east"), vec![]);
        let peer = |p: &str| PeerConfig { id: id(p), address: "127.0.0.1:1".into() };
        type Change = fn(&mut TunnelSettings);
        let cases: Vec<(&str, Change, Option<&str>)> = vec![
            ("defaults", |_| {}, None),
            (
                "self as peer",
                |s| s.peers = vec![PeerConfig { id: id("east"), address: "x:1".into() }],
                Some("own cluster id"),
            ),
            (
                "peer twice",
                |s| {
                    let p = PeerConfig { id: id("west"), address: "x:1".into() };
                    s.peers = vec![p.clone(), p];
                },
                Some("listed twice"),
            ),
            ("jumbo payload", |s| s.max_udp_payload = 8952, None),
            ("payload below QUIC's minimum", |s| s.max_udp_payload = 1000, Some("out of range")),
            ("payload above UDP's maximum", |s| s.max_udp_payload = 65_508, Some("out of range")),
            (
                "lease too short",
                |s| s.peer_lease_duration = Duration::from_millis(10),
                Some("too short"),
            ),
        ];
        for (name, change, want) in cases {
            let mut s = base.clone();
            s.peers.push(peer("zeta"));
            change(&mut s);
            match (validate(&s), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
        assert_eq!(base.heartbeat_interval(), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn port_in_use_fails_at_new() {
        let pki = TestPki::new("demo");
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let settings = TunnelSettings::new(addr, "demo", id("east"), vec![]);
        let (_tx, rx) = watch::channel(Arc::new(
            fedgate_discovery::exchange::delta::testing::export_set("east", 1, 0),
        ));
        let (utx, _urx) = mpsc::channel(1);
        let (itx, _irx) = mpsc::channel(1);
        let err = TunnelEndpoint::new(
            settings.clone(),
            pki.issue("east"),
            rx.clone(),
            utx.clone(),
            itx.clone(),
        )
        .err()
        .expect("port is taken");
        assert!(matches!(err, TunnelError::Bind(a, _) if a == addr), "{err}");
        // And a certificate for another cluster is refused before binding anything.
        let mut settings = settings;
        settings.listen = "127.0.0.1:0".parse().expect("addr");
        let err = TunnelEndpoint::new(settings, pki.issue("west"), rx, utx, itx)
            .err()
            .expect("wrong identity");
        assert_eq!(err.reason(), "tls", "{err}");
    }

    #[test]
    fn identity_loads_from_pem_files_with_clear_errors() {
        let pki = TestPki::new("demo");
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key, ca) = pki.write_pem(dir.path(), "east").expect("write pem");
        let identity = Identity::from_pem_files(&cert, &key, &ca).expect("loads");
        assert_eq!(identity.cert_chain.len(), 1);
        assert_eq!(identity.ca, vec![pki.ca_cert()]);
        crate::tls::check_own_identity(&identity, "demo", &id("east")).expect("names east");

        let missing = dir.path().join("missing.crt");
        let err = Identity::from_pem_files(&missing, &key, &ca).expect_err("missing cert");
        assert!(err.to_string().contains("missing.crt"), "{err}");
        let err = Identity::from_pem_files(&cert, &cert, &ca).expect_err("cert is no key");
        assert!(err.to_string().contains("private key"), "{err}");
        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "").expect("write");
        let err = Identity::from_pem_files(&cert, &key, &empty).expect_err("empty ca");
        assert!(err.to_string().contains("holds no certificate"), "{err}");
    }
}
