//! The QUIC endpoint: the tunnel port's UDP socket (one per data-plane thread when there are
//! several, [`crate::steer`]), its TLS configurations, the accepting of peers' handshakes and
//! a task per configured peer that holds its connections ([`crate::peer`]). Streams are routed by kind byte ([`crate::streams`]): control streams to
//! whoever serves the control channel, data streams to the data plane.
//!
//! Who dials: of two gateways, the one with the lexicographically lower cluster id dials each
//! replica of the other, which accepts. The other dials only as a fallback, when it has had no
//! connection to the peer for a while (the peer's replicas sit behind one address, so their
//! dials reach another replica of ours); two connections between the same two addresses are
//! cut to the one the lower id dialed.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedgate_discovery::model::ClusterId;
use quinn::VarInt;
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::identity::Identity;
use crate::io::QuicIo;
use crate::peer::{CLOSE_SHUTDOWN, CLOSE_WRONG_DIRECTION, PeerHandle, Shared};
use crate::reload::{IdentityFiles, IdentityWatcher, ReloadError, ReloadStatus};
use crate::replicas::{PeerContext, PeerTask};
use crate::socket::{MAX_GSO_BYTES, TunnelSocket, bind_udp};
use crate::streams::{IncomingStream, Routes};
use crate::tls::{
    Credentials, Expected, RejectReason, Rejection, RejectionSink, TlsError, check_peer_identity,
    client_crypto, server_crypto,
};

pub use crate::streams::{KIND_CONTROL, KIND_DATA};

/// QUIC keep-alive: a PING this often keeps NATs open and shows a dead peer fast.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A connection silent for this long is dead.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Per-stream receive window: one proxied TCP connection may have this much in flight.
pub const DEFAULT_STREAM_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;
/// Per-connection receive window: all streams to one peer together. Also lane 0's send window
/// and the most a data lane's send window grows to (it follows the path: `crate::sendwin`).
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

/// A peer gateway as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub id: ClusterId,
    /// Its tunnel addresses, `host:port` each: an IP, or a DNS name whose every record is one
    /// replica (re-resolved periodically). One connection is kept to each replica.
    pub addresses: Vec<String>,
}

impl PeerConfig {
    /// A peer with one address.
    pub fn new(id: ClusterId, address: impl Into<String>) -> Self {
        Self { id, addresses: vec![address.into()] }
    }
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
    /// The runtimes of the gateway's data-plane threads, one each. With several, the tunnel
    /// port is a socket per thread with packets steered to the thread of their connection
    /// ([`crate::steer`]), each read by a quinn endpoint whose task runs there; every thread
    /// runs the connections (lanes) placed on it and accepts peers' tunnel streams on them,
    /// and each peer replica is dialed once per thread ([`crate::lanes`]). One: the same on
    /// one socket. Empty: everything on the runtime [`TunnelEndpoint::new`] is called on.
    pub shards: Vec<tokio::runtime::Handle>,
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
            keep_alive_interval: DEFAULT_KEEP_ALIVE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            stream_receive_window: DEFAULT_STREAM_RECEIVE_WINDOW,
            connection_receive_window: DEFAULT_CONNECTION_RECEIVE_WINDOW,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
            identity_files: None,
            shards: Vec::new(),
        }
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

/// The tunnel endpoint. `new` binds the UDP socket; `run` serves until shutdown.
pub struct TunnelEndpoint {
    settings: TunnelSettings,
    /// The first of [`Self::endpoints`]: dials lane 0 of every replica.
    endpoint: quinn::Endpoint,
    /// One per socket at the tunnel port (one per data-plane thread with steering,
    /// `crate::steer`; else one), each accepting.
    endpoints: Vec<quinn::Endpoint>,
    /// With steering, one per data-plane thread on an ephemeral port: data lanes dial from
    /// these. Empty otherwise.
    lane_endpoints: Arc<[quinn::Endpoint]>,
    address: SocketAddr,
    shared: Arc<Shared>,
    routes: Routes,
    accept_sink: Arc<RejectionSink>,
    credentials: Arc<Credentials>,
    watcher: Option<IdentityWatcher>,
    reload_status: watch::Receiver<ReloadStatus>,
}

impl TunnelEndpoint {
    /// Validates the settings, builds the TLS configurations and binds the UDP socket at once.
    /// Streams peers open go to `incoming_control` (control streams, for the control
    /// channel's server) and `incoming_data` (data streams). Must be called inside a tokio
    /// runtime.
    pub fn new(
        settings: TunnelSettings,
        identity: Identity,
        incoming_control: mpsc::Sender<QuicIo>,
        incoming_data: mpsc::Sender<IncomingStream>,
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

        // Dial configurations are built per replica address, with a rejection sink each;
        // build one now so that a bad identity fails here, not at the first dial.
        if let Some(peer) = settings.peers.iter().find(|p| settings.local < p.id) {
            client_crypto(&credentials, peer.id.clone(), Arc::new(RejectionSink::new(true)))?;
        }

        let runtime: Arc<dyn quinn::Runtime> = if settings.shards.is_empty() {
            Arc::new(quinn::TokioRuntime)
        } else {
            Arc::new(crate::runtime::Pinned(settings.shards.clone().into()))
        };
        // Connection ids signed with a key of the identity too: the restarted gateway must
        // recognise its predecessor's ids as its own to answer them with a stateless reset.
        let cid_key = cid_key(&identity);
        // Lanes name at most 63 threads (crate::lanes::MAX_LANES): sockets beyond 64 would
        // get no connections.
        let threads = settings.shards.len().min(usize::from(crate::lanes::MAX_LANES));
        // A socket per data-plane thread at the tunnel port when there are several
        // (crate::steer); one socket otherwise, or where the kernel refuses the steering.
        let sockets = if threads >= 2 {
            match crate::steer::bind_group(settings.listen, settings.socket_buffer, threads) {
                Ok(sockets) => sockets,
                Err(e) => {
                    // A port in use fails here too, with its own error.
                    let single = bind_udp(settings.listen, settings.socket_buffer)?;
                    tracing::warn!(error = %e, "one UDP socket for every data-plane thread: \
                        packets are read on the first and handed to the others");
                    vec![single]
                }
            }
        } else {
            vec![bind_udp(settings.listen, settings.socket_buffer)?]
        };
        let group = sockets.len();
        let mut endpoints = Vec::with_capacity(group);
        for (k, socket) in sockets.into_iter().enumerate() {
            let endpoint = new_endpoint(EndpointParts {
                settings: &settings,
                identity: &identity,
                socket,
                shard: k,
                cids: (cid_key, group),
                server: Some(server_config.clone()),
                runtime: runtime.clone(),
            })?;
            endpoints.push(endpoint);
        }
        // Data lanes dial from sockets of their own, one per thread on an ephemeral port, when
        // the tunnel port is a group (crate::steer: lanes must not share a UDP flow).
        let mut lane_endpoints = Vec::new();
        if group >= 2 {
            let ephemeral = SocketAddr::new(settings.listen.ip(), 0);
            for k in 0..group {
                let socket = bind_udp(ephemeral, settings.socket_buffer)?;
                lane_endpoints.push(new_endpoint(EndpointParts {
                    settings: &settings,
                    identity: &identity,
                    socket,
                    shard: k,
                    cids: (cid_key, 1),
                    server: None,
                    runtime: runtime.clone(),
                })?);
            }
        }
        let endpoint = endpoints[0].clone();
        let address = endpoint.local_addr().map_err(|e| TunnelError::Bind(settings.listen, e))?;

        let shared = Arc::new(Shared::new(&settings.peers, settings.idle_timeout));
        let routes = Routes { control: incoming_control, data: incoming_data };
        Ok(Self {
            settings,
            endpoint,
            endpoints,
            lane_endpoints: lane_endpoints.into(),
            address,
            shared,
            routes,
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

    /// Serves until `shutdown` is cancelled: accepts peers, dials the peers it must, and
    /// closes every connection on the way out.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut accepted = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(watcher) = self.watcher.take() {
            tasks.spawn(watcher.run(shutdown.clone()));
        }
        for peer in self.settings.peers.clone() {
            let (tx, rx) = mpsc::channel(4);
            accepted.insert(peer.id.clone(), tx);
            let span = tracing::info_span!("peer", peer = %peer.id, addresses = ?peer.addresses);

            let task = PeerTask {
                ctx: PeerContext {
                    peer,
                    settings: self.settings.clone(),
                    endpoint: self.endpoint.clone(),
                    lane_endpoints: self.lane_endpoints.clone(),
                    routes: self.routes.clone(),
                    shared: self.shared.clone(),
                    shutdown: shutdown.clone(),
                },
                credentials: self.credentials.clone(),
                accepted: rx,
            };
            tasks.spawn(task.run().instrument(span));
        }
        let accepted = Arc::new(accepted);
        let lanes = crate::lanes::Accepted {
            shared: self.shared.clone(),
            routes: self.routes.clone(),
            shutdown: shutdown.clone(),
            send_window: u64::from(self.settings.connection_receive_window),
        };

        tracing::info!(address = %self.address, local = %self.settings.local, peers = self.settings.peers.len(), sockets = self.endpoints.len(), "tunnel listening");
        for endpoint in &self.endpoints {
            let (endpoint, settings, sink) =
                (endpoint.clone(), self.settings.clone(), self.accept_sink.clone());
            let (accepted, lanes, shutdown) = (accepted.clone(), lanes.clone(), shutdown.clone());
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        incoming = endpoint.accept() => {
                            let Some(incoming) = incoming else { break };
                            tokio::spawn(handle_incoming(
                                incoming,
                                settings.clone(),
                                accepted.clone(),
                                sink.clone(),
                                lanes.clone(),
                            ));
                        }
                    }
                }
            });
        }
        shutdown.cancelled().await;
        for endpoint in self.endpoints.iter().chain(self.lane_endpoints.iter()) {
            endpoint.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"gateway shutting down");
        }
        while tasks.join_next().await.is_some() {}
        let idle = async {
            for endpoint in self.endpoints.iter().chain(self.lane_endpoints.iter()) {
                endpoint.wait_idle().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), idle).await;
        tracing::debug!("tunnel stopped");
    }
}

/// What [`new_endpoint`] needs.
struct EndpointParts<'a> {
    settings: &'a TunnelSettings,
    identity: &'a Identity,
    socket: std::net::UdpSocket,
    /// The data-plane thread whose runtime polls the socket and runs the endpoint's task.
    shard: usize,
    /// (key, sockets in the group): ids name `shard` among that many (`crate::steer`).
    cids: (u64, usize),
    /// `None`: dials only.
    server: Option<quinn::ServerConfig>,
    runtime: Arc<dyn quinn::Runtime>,
}

/// A quinn endpoint over `socket`, its task on data-plane thread `shard`.
fn new_endpoint(p: EndpointParts) -> Result<quinn::Endpoint, TunnelError> {
    let listen = p.settings.listen;
    let (key, group) = p.cids;
    let shard = p.shard;
    // The socket registers with the reactor of the runtime that polls it.
    let entered = p.settings.shards.get(shard).map(|h| h.enter());
    let socket =
        TunnelSocket::new(p.socket, Some(key)).map_err(|e| TunnelError::Bind(listen, e))?;
    drop(entered);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key(p.identity)));
    endpoint_config.cid_generator(move || {
        if group >= 2 {
            Box::new(crate::steer::ShardCids::new(key, shard, group))
        } else {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(key))
        }
    });
    // What we tell peers we accept, and how large quinn's receive buffers are cut.
    endpoint_config
        .max_udp_payload_size(p.settings.max_udp_payload.max(1472))
        .map_err(|e| TunnelError::Settings(format!("maxUdpPayloadSize: {e}")))?;
    // quinn spawns the endpoint's task inside this call: on `shard` (crate::runtime::place).
    crate::runtime::place(shard, || {
        quinn::Endpoint::new_with_abstract_socket(endpoint_config, p.server, socket, p.runtime)
    })
    .map_err(|e| TunnelError::Bind(listen, e))
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
    Ok(())
}

pub(crate) fn transport_config(
    settings: &TunnelSettings,
) -> Result<quinn::TransportConfig, TunnelError> {
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

/// The peer a connection's verified certificate names.
fn peer_of(conn: &quinn::Connection, settings: &TunnelSettings) -> Option<ClusterId> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let peers: Vec<ClusterId> = settings.peers.iter().map(|p| p.id.clone()).collect();
    check_peer_identity(certs.first()?, &settings.clusterset, Expected::AnyOf(&peers)).ok()
}

/// Finishes a handshake a peer started and hands the connection to that peer's task, or, for
/// a lane beyond the first of a replica ([`crate::lanes`]), serves it as a lane.
async fn handle_incoming(
    incoming: quinn::Incoming,
    settings: TunnelSettings,
    accepted: Arc<HashMap<ClusterId, mpsc::Sender<crate::lanes::AcceptedConnection>>>,
    sink: Arc<RejectionSink>,
    lanes: crate::lanes::Accepted,
) {
    let remote = incoming.remote_address();
    // The dialer names the lane in its first destination connection id; the connection's task
    // goes to that lane's data-plane thread (lane 0, and any other dialer: the first).
    let cid = incoming.orig_dst_cid();
    let (lane, group) = (crate::lanes::lane_of(&cid), crate::lanes::group_of(&cid));
    let shard = match lane {
        0 => 0,
        k => crate::lanes::shard_of(k, settings.shards.len()),
    };
    let accepted_conn = crate::runtime::place(shard, || incoming.accept());
    let conn = match accepted_conn {
        Ok(connecting) => connecting.await,
        Err(e) => Err(e),
    };
    let conn = match conn {
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
    if lane > 0 {
        lanes.serve(peer, conn, lane, group, shard, settings.shards.get(shard).cloned());
        return;
    }
    // A gateway with a higher cluster id dials too when none of our replicas' connections
    // reaches it (its fallback, crate::replicas::FALLBACK_AFTER): accepted like any other.
    if let Some(tx) = accepted.get(&peer) {
        let _ = tx.send((conn, group)).await;
    }
}

/// Whether a handshake failed because the client sent no certificate (TLS alert 116).
fn is_certificate_required(e: &quinn::ConnectionError) -> bool {
    const CERTIFICATE_REQUIRED: u8 = 116;
    matches!(e, quinn::ConnectionError::TransportError(t)
        if t.code == quinn::TransportErrorCode::crypto(CERTIFICATE_REQUIRED))
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use crate::testing::TestPki;

    fn id(s: &str) -> ClusterId {
        ClusterId::new(s).expect("valid id")
    }

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
    fn settings_are_validated() {
        let base =
            TunnelSettings::new("127.0.0.1:0".parse().expect("addr"), "demo", id("east"), vec![]);
        let peer = |p: &str| PeerConfig::new(id(p), "127.0.0.1:1");
        type Change = fn(&mut TunnelSettings);
        let cases: Vec<(&str, Change, Option<&str>)> = vec![
            ("defaults", |_| {}, None),
            (
                "self as peer",
                |s| s.peers = vec![PeerConfig::new(id("east"), "x:1")],
                Some("own cluster id"),
            ),
            (
                "peer twice",
                |s| {
                    let p = PeerConfig::new(id("west"), "x:1");
                    s.peers = vec![p.clone(), p];
                },
                Some("listed twice"),
            ),
            ("jumbo payload", |s| s.max_udp_payload = 8952, None),
            ("payload below QUIC's minimum", |s| s.max_udp_payload = 1000, Some("out of range")),
            ("payload above UDP's maximum", |s| s.max_udp_payload = 65_508, Some("out of range")),
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
    }

    #[tokio::test]
    async fn port_in_use_fails_at_new() {
        let pki = TestPki::new("demo");
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let settings = TunnelSettings::new(addr, "demo", id("east"), vec![]);
        let (ctx, _crx) = mpsc::channel(1);
        let (itx, _irx) = mpsc::channel(1);
        let err =
            TunnelEndpoint::new(settings.clone(), pki.issue("east"), ctx.clone(), itx.clone())
                .err()
                .expect("port is taken");
        assert!(matches!(err, TunnelError::Bind(a, _) if a == addr), "{err}");
        // And a certificate for another cluster is refused before binding anything.
        let mut settings = settings;
        settings.listen = "127.0.0.1:0".parse().expect("addr");
        let err = TunnelEndpoint::new(settings, pki.issue("west"), ctx, itx)
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
