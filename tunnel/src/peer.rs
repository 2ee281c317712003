//! A connection to every replica of every configured peer (DESIGN.md, "Replicas").
//!
//! - The gateway with the lower cluster id dials. It resolves each of the peer's configured
//!   addresses (an IP, or a DNS name whose every record is one replica) at start and every
//!   [`RESOLVE_INTERVAL`], and keeps one dial task per resolved address: dial with backoff,
//!   serve the connection until it ends, dial again.
//! - The other side accepts. Connections of one identity from different addresses are
//!   different replicas and are all kept; a new connection from the address of an existing one
//!   replaces it (that replica restarted). An identity seen from more addresses than the peer
//!   has configured is flagged (warning, `fedgate_peer_unexpected_instances_total`); beyond
//!   [`MAX_CONNECTIONS_PER_PEER`] it is refused.
//! - Working connections are published ([`PeerHandle::connections`]) for whoever runs the
//!   control channel over them, and data streams are opened on any of them
//!   ([`PeerHandle::open_stream`]): replicas that announced draining or were marked suspect
//!   (a stream on them went unanswered) come last.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fedgate_discovery::model::ClusterId;
use quinn::VarInt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::endpoint::{PeerConfig, TunnelError, TunnelSettings, transport_config};
use crate::metrics::{
    PEER_CONNECTIONS_TOTAL, PEER_DISCONNECTS_TOTAL, PEER_REPLICAS_CONNECTED,
    PEER_UNEXPECTED_INSTANCES_TOTAL, PEERS_CONNECTED,
};
use crate::streams::{self, KIND_DATA, Routes};
use crate::tls::{Credentials, RejectionSink, client_crypto};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a dialed connection is checked for the peer's handshake confirmation: from 1 ms,
/// doubling up to 50 ms.
const CONFIRM_POLL_MIN: Duration = Duration::from_millis(1);
const CONFIRM_POLL_MAX: Duration = Duration::from_millis(50);
/// How often peers' addresses are resolved again (a DNS name's records are its replicas).
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// The most connections kept with one peer identity; more are refused.
pub const MAX_CONNECTIONS_PER_PEER: usize = 32;

/// Application close codes of a connection.
pub(crate) const CLOSE_SHUTDOWN: u32 = 0;
pub(crate) const CLOSE_REPLACED: u32 = 1;
pub(crate) const CLOSE_WRONG_DIRECTION: u32 = 2;
pub(crate) const CLOSE_TOO_MANY: u32 = 3;
pub(crate) const CLOSE_ADDRESS_GONE: u32 = 4;

/// A working connection to one replica of a peer, as handed out by
/// [`PeerHandle::connections`].
#[derive(Clone, Debug)]
pub struct PeerConnection {
    peer: ClusterId,
    conn: quinn::Connection,
    draining: Arc<AtomicBool>,
}

impl PeerConnection {
    pub fn peer(&self) -> &ClusterId {
        &self.peer
    }

    /// The replica's address (the remote end of the connection).
    pub fn remote(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Identifies the connection among this gateway's connections.
    pub fn id(&self) -> usize {
        self.conn.stable_id()
    }

    /// Whether `other` is this same connection.
    pub fn same(&self, other: &PeerConnection) -> bool {
        self.conn.stable_id() == other.conn.stable_id()
    }

    /// Records that this replica announced it is draining (or no longer is): data streams
    /// go to other replicas of the peer first.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// A gRPC channel to the peer whose HTTP/2 connections are new control streams on this
    /// connection.
    pub async fn control_channel(
        &self,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        streams::control_channel(self.conn.clone(), self.peer.clone()).await
    }

    /// Resolves when the connection has ended.
    pub async fn closed(&self) {
        self.conn.closed().await;
    }

    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }
}

/// How the transport sees one peer and each of its replicas.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkStatus {
    pub cluster: ClusterId,
    /// Its configured addresses, joined with ", ".
    pub address: String,
    /// Whether any replica is connected.
    pub connected: bool,
    /// Smallest round-trip time over the connected replicas.
    pub rtt_ms: Option<f64>,
    /// Smallest path MTU over the connected replicas.
    pub path_mtu: Option<u16>,
    /// Why the last connection attempt failed or the last connection ended.
    pub last_error: Option<String>,
    /// How many replica addresses the configured addresses resolved to.
    pub expected_replicas: usize,
    /// Each connected replica, and each address dialed without a connection now.
    pub replicas: Vec<ReplicaLink>,
}

/// How the transport sees one replica of a peer.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaLink {
    /// The replica's address.
    pub address: SocketAddr,
    pub connected: bool,
    /// `dial` or `accept`.
    pub direction: &'static str,
    pub rtt_ms: Option<f64>,
    pub path_mtu: Option<u16>,
    /// Seconds the connection has been up.
    pub connected_secs: Option<f64>,
    /// Whether it announced draining (data streams avoid it).
    pub draining: bool,
    /// Why the last attempt to this address failed (dialed replicas).
    pub last_error: Option<String>,
}

/// One working connection.
struct Live {
    conn: quinn::Connection,
    direction: &'static str,
    since: Instant,
    draining: Arc<AtomicBool>,
    /// Until when data streams avoid it (a stream on it went unanswered).
    suspect_until: Option<Instant>,
}

/// One peer: its working connections and what we know of its addresses.
struct PeerState {
    configured: Vec<String>,
    live: Vec<Live>,
    /// Dialed addresses with the last error of each (dialing side only).
    targets: BTreeMap<SocketAddr, Option<String>>,
    /// How many replica addresses the configured ones resolved to.
    expected: usize,
    last_error: Option<String>,
}

/// State shared by the endpoint's tasks and every `PeerHandle`.
pub(crate) struct Shared {
    peers: Mutex<HashMap<ClusterId, PeerState>>,
    watches: HashMap<ClusterId, watch::Sender<Vec<PeerConnection>>>,
    /// Rotates data streams over a peer's replicas.
    next: AtomicUsize,
    /// How long a replica whose stream went unanswered is avoided.
    suspect_for: Duration,
}

impl Shared {
    pub(crate) fn new(peers: &[PeerConfig], suspect_for: Duration) -> Self {
        let state = peers
            .iter()
            .map(|p| {
                let state = PeerState {
                    configured: p.addresses.clone(),
                    live: Vec::new(),
                    targets: BTreeMap::new(),
                    expected: p.addresses.len(),
                    last_error: None,
                };
                (p.id.clone(), state)
            })
            .collect();
        let watches = peers.iter().map(|p| (p.id.clone(), watch::channel(Vec::new()).0)).collect();
        Self { peers: Mutex::new(state), watches, next: AtomicUsize::new(0), suspect_for }
    }

    fn with<T>(&self, peer: &ClusterId, f: impl FnOnce(&mut PeerState) -> T) -> Option<T> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        peers.get_mut(peer).map(f)
    }

    /// Publishes `peer`'s working connections to its watchers.
    fn publish(&self, peer: &ClusterId) {
        let list: Vec<PeerConnection> = self
            .with(peer, |s| {
                s.live
                    .iter()
                    .map(|l| PeerConnection {
                        peer: peer.clone(),
                        conn: l.conn.clone(),
                        draining: l.draining.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(tx) = self.watches.get(peer) {
            tx.send_replace(list);
        }
    }

    /// Adds a working connection; returns how many the peer has now.
    fn add(&self, peer: &ClusterId, conn: &quinn::Connection, direction: &'static str) -> usize {
        let n = self
            .with(peer, |s| {
                s.live.push(Live {
                    conn: conn.clone(),
                    direction,
                    since: Instant::now(),
                    draining: Arc::new(AtomicBool::new(false)),
                    suspect_until: None,
                });
                s.last_error = None;
                if let Some(addr) = s.targets.get_mut(&conn.remote_address()) {
                    *addr = None;
                }
                s.live.len()
            })
            .unwrap_or(0);
        self.publish(peer);
        n
    }

    /// Removes a connection that ended; returns how many the peer has left.
    fn remove(&self, peer: &ClusterId, conn: &quinn::Connection, error: Option<String>) -> usize {
        let n = self
            .with(peer, |s| {
                s.live.retain(|l| l.conn.stable_id() != conn.stable_id());
                if let Some(e) = &error {
                    s.last_error = Some(e.clone());
                    if let Some(addr) = s.targets.get_mut(&conn.remote_address()) {
                        *addr = Some(e.clone());
                    }
                }
                s.live.len()
            })
            .unwrap_or(0);
        self.publish(peer);
        n
    }

    fn set_target_error(&self, peer: &ClusterId, target: SocketAddr, error: String) {
        self.with(peer, |s| {
            s.targets.insert(target, Some(error.clone()));
            s.last_error = Some(error);
        });
    }

    fn status(&self, id: &ClusterId, s: &PeerState) -> LinkStatus {
        let now = Instant::now();
        let mut replicas: Vec<ReplicaLink> = s
            .live
            .iter()
            .map(|l| ReplicaLink {
                address: l.conn.remote_address(),
                connected: true,
                direction: l.direction,
                rtt_ms: Some(l.conn.rtt().as_secs_f64() * 1000.0),
                path_mtu: Some(l.conn.stats().path.current_mtu),
                connected_secs: Some(now.duration_since(l.since).as_secs_f64()),
                draining: l.draining.load(Ordering::Relaxed),
                last_error: None,
            })
            .collect();
        for (addr, error) in &s.targets {
            if !replicas.iter().any(|r| r.address == *addr) {
                replicas.push(ReplicaLink {
                    address: *addr,
                    connected: false,
                    direction: "dial",
                    rtt_ms: None,
                    path_mtu: None,
                    connected_secs: None,
                    draining: false,
                    last_error: error.clone(),
                });
            }
        }
        replicas.sort_by_key(|r| r.address);
        let connected: Vec<&ReplicaLink> = replicas.iter().filter(|r| r.connected).collect();
        LinkStatus {
            cluster: id.clone(),
            address: s.configured.join(", "),
            connected: !connected.is_empty(),
            rtt_ms: connected.iter().filter_map(|r| r.rtt_ms).min_by(f64::total_cmp),
            path_mtu: connected.iter().filter_map(|r| r.path_mtu).min(),
            last_error: s.last_error.clone(),
            expected_replicas: s.expected,
            replicas,
        }
    }
}

/// What the data plane and the peer sessions use: open data streams, follow each peer's
/// connections, read the transport's status.
#[derive(Clone)]
pub struct PeerHandle {
    pub(crate) shared: Arc<Shared>,
}

impl PeerHandle {
    /// Opens a data stream to `peer` on one of its working connections and writes the kind
    /// byte. Replicas take turns; draining and suspect ones come last; a connection that
    /// cannot open a stream is passed over for the next. Returns the connection's id with the
    /// stream, for [`Self::suspect`].
    pub async fn open_stream(
        &self,
        peer: &ClusterId,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, usize), TunnelError> {
        let now = Instant::now();
        let mut candidates: Vec<(bool, quinn::Connection)> = self
            .shared
            .with(peer, |s| {
                s.live
                    .iter()
                    .map(|l| {
                        let avoid = l.draining.load(Ordering::Relaxed)
                            || l.suspect_until.is_some_and(|t| t > now);
                        (avoid, l.conn.clone())
                    })
                    .collect()
            })
            .unwrap_or_default();
        if candidates.is_empty() {
            return Err(TunnelError::NotConnected(peer.clone()));
        }
        let turn = self.shared.next.fetch_add(1, Ordering::Relaxed) % candidates.len();
        candidates.rotate_left(turn);
        // Stable: the rotation stays within each group.
        candidates.sort_by_key(|(avoid, _)| *avoid);
        let mut last = None;
        for (_, conn) in candidates {
            match streams::open(&conn, peer, KIND_DATA).await {
                Ok((send, recv)) => return Ok((send, recv, conn.stable_id())),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| TunnelError::NotConnected(peer.clone())))
    }

    /// A stream on connection `id` to `peer` went unanswered: new streams avoid that replica
    /// for a while (its connection may be dead and not yet timed out).
    pub fn suspect(&self, peer: &ClusterId, id: usize) {
        let until = Instant::now() + self.shared.suspect_for;
        self.shared.with(peer, |s| {
            if let Some(l) = s.live.iter_mut().find(|l| l.conn.stable_id() == id) {
                l.suspect_until = Some(until);
            }
        });
    }

    /// How many working connections (replicas) `peer` has right now.
    pub fn replicas(&self, peer: &ClusterId) -> usize {
        self.shared.with(peer, |s| s.live.len()).unwrap_or(0)
    }

    /// Whether any connection to `peer` is up right now.
    pub fn is_connected(&self, peer: &ClusterId) -> bool {
        self.replicas(peer) > 0
    }

    /// The working connections to `peer` (empty while there is none), following dials,
    /// replacements and losses. `None` for a peer that is not configured.
    pub fn connections(&self, peer: &ClusterId) -> Option<watch::Receiver<Vec<PeerConnection>>> {
        self.shared.watches.get(peer).map(watch::Sender::subscribe)
    }

    /// How the transport sees `peer` now (rtt and path MTU measured now).
    pub fn link_status(&self, peer: &ClusterId) -> Option<LinkStatus> {
        let peers = self.shared.peers.lock().unwrap_or_else(PoisonError::into_inner);
        peers.get(peer).map(|s| self.shared.status(peer, s))
    }

    /// Every configured peer's transport status, by cluster id.
    pub fn status(&self) -> Vec<LinkStatus> {
        let peers = self.shared.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<LinkStatus> =
            peers.iter().map(|(id, s)| self.shared.status(id, s)).collect();
        list.sort_by(|a, b| a.cluster.cmp(&b.cluster));
        list
    }
}

/// What every task of one peer shares.
#[derive(Clone)]
pub(crate) struct PeerContext {
    pub peer: PeerConfig,
    pub settings: TunnelSettings,
    pub endpoint: quinn::Endpoint,
    pub routes: Routes,
    pub shared: Arc<Shared>,
    pub shutdown: CancellationToken,
}

/// One configured peer: dialed (our id is lower: `dial` has our credentials) or accepted.
pub(crate) struct PeerTask {
    pub ctx: PeerContext,
    pub dial: Option<Arc<Credentials>>,
    pub accepted: mpsc::Receiver<quinn::Connection>,
}

impl PeerTask {
    pub(crate) async fn run(self) {
        let Self { ctx, dial, accepted } = self;
        match dial {
            Some(credentials) => run_dialer(ctx, credentials).await,
            None => run_acceptor(ctx, accepted).await,
        }
    }
}

/// Resolves the peer's addresses now and every [`RESOLVE_INTERVAL`], and keeps a dial task
/// per resolved address. An address that no longer resolves loses its task (and connection);
/// a name that fails to resolve keeps what it resolved to before.
async fn run_dialer(ctx: PeerContext, credentials: Arc<Credentials>) {
    let mut tasks: BTreeMap<SocketAddr, CancellationToken> = BTreeMap::new();
    let mut known: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
    let local_v4 = ctx.endpoint.local_addr().map(|a| a.is_ipv4()).unwrap_or(true);
    loop {
        let targets = resolve_all(&ctx, &mut known, local_v4).await;
        for (addr, token) in &tasks {
            if !targets.contains(addr) {
                tracing::info!(address = %addr, "replica address no longer resolves; closing its connection");
                token.cancel();
            }
        }
        tasks.retain(|addr, _| targets.contains(addr));
        for addr in &targets {
            if tasks.contains_key(addr) {
                continue;
            }
            let token = ctx.shutdown.child_token();
            tasks.insert(*addr, token.clone());
            ctx.shared.with(&ctx.peer.id, |s| {
                s.targets.entry(*addr).or_insert(None);
            });
            let task = DialTask {
                ctx: ctx.clone(),
                target: *addr,
                credentials: credentials.clone(),
                token,
                backoff: Backoff::default(),
                last_logged_error: None,
                last_rtt: None,
            };
            let span = tracing::info_span!("replica", address = %addr);
            tokio::spawn(task.run().instrument(span));
        }
        ctx.shared.with(&ctx.peer.id, |s| {
            s.targets.retain(|a, _| targets.contains(a));
            s.expected = targets.len().max(1);
        });
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(RESOLVE_INTERVAL) => {}
        }
    }
}

/// Every replica address of the peer: each configured address resolved (an IP as is; a name
/// to all its records of the local socket's family, or all of them when it has none). A name
/// that fails keeps its last answer in `known`; the failure is logged and shown.
async fn resolve_all(
    ctx: &PeerContext,
    known: &mut BTreeMap<String, Vec<SocketAddr>>,
    local_v4: bool,
) -> Vec<SocketAddr> {
    for address in &ctx.peer.addresses {
        match tokio::net::lookup_host(address.as_str()).await {
            Ok(found) => {
                let all: Vec<SocketAddr> = found.collect();
                let same: Vec<SocketAddr> =
                    all.iter().copied().filter(|a| a.is_ipv4() == local_v4).collect();
                let mut chosen = if same.is_empty() { all } else { same };
                chosen.sort();
                chosen.dedup();
                if chosen.is_empty() {
                    tracing::warn!(%address, "peer address resolves to no address");
                }
                known.insert(address.clone(), chosen);
            }
            Err(e) => {
                let text = format!("resolving {address}: {e}");
                tracing::warn!(error = %text, "peer address did not resolve; keeping its last addresses");
                ctx.shared.with(&ctx.peer.id, |s| s.last_error = Some(text));
            }
        }
    }
    let mut all: Vec<SocketAddr> = known.values().flatten().copied().collect();
    all.sort();
    all.dedup();
    all
}

/// Accepts the peer's connections: one per replica address, all kept; a new one from the
/// address of an old one replaces it. Also resolves the peer's configured addresses, to know
/// how many replicas to expect.
async fn run_acceptor(ctx: PeerContext, mut accepted: mpsc::Receiver<quinn::Connection>) {
    let local_v4 = ctx.endpoint.local_addr().map(|a| a.is_ipv4()).unwrap_or(true);
    let mut known = BTreeMap::new();
    let mut resolve = tokio::time::interval(RESOLVE_INTERVAL);
    let mut by_address: HashMap<SocketAddr, (quinn::Connection, CancellationToken)> =
        HashMap::new();
    let mut warned_excess = false;
    loop {
        let conn = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = resolve.tick() => {
                let n = resolve_all(&ctx, &mut known, local_v4).await.len();
                ctx.shared.with(&ctx.peer.id, |s| s.expected = n.max(ctx.peer.addresses.len()));
                continue;
            }
            conn = accepted.recv() => match conn {
                Some(conn) => conn,
                None => return,
            },
        };
        by_address.retain(|_, (c, _)| c.close_reason().is_none());
        let remote = conn.remote_address();
        if let Some((_, old)) = by_address.remove(&remote) {
            // The same replica connected again (it restarted, or lost the old connection).
            old.cancel();
        }
        if by_address.len() >= MAX_CONNECTIONS_PER_PEER {
            tracing::warn!(%remote, max = MAX_CONNECTIONS_PER_PEER, "too many connections with this peer's identity; refusing");
            metrics::counter!(PEER_UNEXPECTED_INSTANCES_TOTAL, "peer" => ctx.peer.id.to_string())
                .increment(1);
            conn.close(VarInt::from_u32(CLOSE_TOO_MANY), b"too many connections of this identity");
            continue;
        }
        let token = ctx.shutdown.child_token();
        by_address.insert(remote, (conn.clone(), token.clone()));
        let expected = ctx.shared.with(&ctx.peer.id, |s| s.expected).unwrap_or(1).max(1);
        if by_address.len() > expected {
            metrics::counter!(PEER_UNEXPECTED_INSTANCES_TOTAL, "peer" => ctx.peer.id.to_string())
                .increment(1);
            if !warned_excess {
                let from: Vec<String> = by_address.keys().map(ToString::to_string).collect();
                tracing::warn!(
                    instances = by_address.len(),
                    expected,
                    from = %from.join(", "),
                    "this peer's identity connects from more addresses than it has replicas configured; \
                     a copied certificate, or a replica missing from peers[].addresses"
                );
                warned_excess = true;
            }
        } else {
            warned_excess = false;
        }
        let ctx = ctx.clone();
        let span = tracing::info_span!("replica", address = %remote);
        tokio::spawn(
            async move {
                let _ = serve(&ctx, conn, "accept", token).await;
            }
            .instrument(span),
        );
    }
}

/// How serving a connection ended.
enum Served {
    /// It never counted as up (refused after the handshake, or gone before confirmed).
    NeverUp(Option<quinn::ConnectionError>),
    /// It was up for this long.
    Ended(Duration),
}

/// Serves one connection until it closes or `token` is cancelled: its incoming streams, and
/// its place among the peer's working connections while it is up. A dialed connection counts
/// as up once the acceptor confirmed the handshake.
async fn serve(
    ctx: &PeerContext,
    conn: quinn::Connection,
    direction: &'static str,
    token: CancellationToken,
) -> Served {
    let peer = ctx.peer.id.clone();
    let streams = crate::runtime::spawn_on(
        ctx.settings.runtime.as_ref(),
        streams::accept_streams(conn.clone(), peer.clone(), ctx.routes.clone()),
    );
    // The acceptor verified the peer's certificate before the handshake completed. The
    // dialer's handshake completes before the acceptor has checked *our* certificate
    // (TLS 1.3), so the dialer counts the peer up only once the acceptor confirmed it.
    if direction == "dial" {
        let confirmed = tokio::select! {
            _ = token.cancelled() => false,
            _ = conn.closed() => false,
            _ = handshake_confirmed(&conn) => true,
        };
        if !confirmed {
            streams.abort();
            if token.is_cancelled() {
                conn.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"gateway shutting down");
            }
            return Served::NeverUp(conn.close_reason());
        }
    }
    let started = Instant::now();
    let n = ctx.shared.add(&peer, &conn, direction);
    metrics::counter!(PEER_CONNECTIONS_TOTAL, "direction" => direction).increment(1);
    metrics::gauge!(PEER_REPLICAS_CONNECTED, "peer" => peer.to_string()).set(n as f64);
    if n == 1 {
        metrics::gauge!(PEERS_CONNECTED).increment(1.0);
    }
    tracing::info!(direction, remote = %conn.remote_address(), replicas = n, "peer connected");

    // Cancelled without shutdown: an accepted connection was replaced by a newer one from
    // the same replica; a dialed one's address no longer resolves.
    let mut label = None;
    tokio::select! {
        _ = token.cancelled() => {
            let (code, why): (u32, &[u8]) = if ctx.shutdown.is_cancelled() {
                (CLOSE_SHUTDOWN, b"gateway shutting down")
            } else if direction == "accept" {
                label = Some("replaced");
                (CLOSE_REPLACED, b"replaced by a new connection")
            } else {
                (CLOSE_ADDRESS_GONE, b"the address no longer resolves")
            };
            conn.close(VarInt::from_u32(code), why);
        }
        _ = conn.closed() => {}
    }
    streams.abort();
    let reason = conn.close_reason();
    let label = label.unwrap_or_else(|| disconnect_reason(reason.as_ref()));
    let text = reason.as_ref().map(ToString::to_string);
    let n = ctx.shared.remove(&peer, &conn, text.clone());
    metrics::gauge!(PEER_REPLICAS_CONNECTED, "peer" => peer.to_string()).set(n as f64);
    if n == 0 {
        metrics::gauge!(PEERS_CONNECTED).decrement(1.0);
    }
    metrics::counter!(PEER_DISCONNECTS_TOTAL, "reason" => label).increment(1);
    tracing::info!(reason = text.as_deref().unwrap_or("local"), replicas = n, "peer disconnected");
    Served::Ended(started.elapsed())
}

/// Dials one replica address: dial with backoff, serve the connection, dial again.
struct DialTask {
    ctx: PeerContext,
    target: SocketAddr,
    credentials: Arc<Credentials>,
    token: CancellationToken,
    backoff: Backoff,
    last_logged_error: Option<String>,
    /// Smoothed RTT of the last connection to this replica: the first RTT estimate of a redial.
    last_rtt: Option<Duration>,
}

impl DialTask {
    async fn run(mut self) {
        let mut delay = None;
        loop {
            if let Some(d) = delay.take() {
                tokio::select! {
                    _ = self.token.cancelled() => return,
                    _ = tokio::time::sleep(d) => {}
                }
            }
            let token = self.token.clone();
            let conn = tokio::select! {
                _ = token.cancelled() => return,
                conn = self.try_dial() => conn,
            };
            let conn = match conn {
                Ok(conn) => conn,
                Err(e) => {
                    self.note_error(&e);
                    delay = Some(self.backoff.fail());
                    continue;
                }
            };
            let served = serve(&self.ctx, conn.clone(), "dial", self.token.clone()).await;
            self.last_rtt = Some(conn.rtt());
            if self.token.is_cancelled() {
                return;
            }
            match served {
                Served::NeverUp(reason) => {
                    // Refused after the handshake (our certificate), or gone before confirmed.
                    if let Some(source) = reason {
                        let peer = self.ctx.peer.id.clone();
                        self.note_error(&TunnelError::Handshake { peer, source });
                    }
                    delay = Some(self.backoff.fail());
                }
                Served::Ended(up) => {
                    self.last_logged_error = None;
                    if up >= BACKOFF_MAX {
                        self.backoff.reset();
                    } else {
                        // A connection that keeps dying young is retried with backoff.
                        delay = Some(self.backoff.fail());
                    }
                }
            }
        }
    }

    async fn try_dial(&mut self) -> Result<quinn::Connection, TunnelError> {
        let peer = self.ctx.peer.id.clone();
        let address = self.target.to_string();
        let connect_err = |detail: String| TunnelError::Connect {
            peer: peer.clone(),
            address: address.clone(),
            detail,
        };
        // A rejection sink of this replica's own: concurrent dials to other replicas of the
        // peer must not take each other's reasons.
        let sink = Arc::new(RejectionSink::new(true));
        let crypto = client_crypto(&self.credentials, peer.clone(), sink.clone())
            .map_err(|e| connect_err(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = transport_config(&self.ctx.settings)?;
        if let Some(rtt) = redial_initial_rtt(self.last_rtt) {
            // RFC 9002 §6.2.2: a new connection to a peer may start from the RTT measured on
            // the previous one instead of 333 ms. The first Initial of a redial is often lost
            // (the peer is restarting, its port closed), and its resend waits for the first
            // PTO: ~3 × the initial RTT, 1 s with the default.
            transport.initial_rtt(rtt);
        }
        config.transport_config(Arc::new(transport));
        // quinn instruments the connection's driver task with the span current at this call
        // and enters it at every poll. Here that would be this task's span, which is enabled
        // at the default `info` level, so every packet would pay the subscriber's enter, exit
        // and filter calls. The call runs in a task of its own, outside any span, as accepted
        // connections' calls do (docs/decisions.md, session 6).
        let endpoint = self.ctx.endpoint.clone();
        let server_name = peer.clone();
        let target = self.target;
        let connecting =
            tokio::spawn(
                async move { endpoint.connect_with(config, target, server_name.as_str()) },
            )
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
        self.ctx.shared.set_target_error(&self.ctx.peer.id, self.target, text);
    }
}

/// Resolves once the peer confirmed the handshake (RFC 9001 §4.1.2: its HANDSHAKE_DONE frame
/// arrived). A dialer's handshake completes before the acceptor has checked our certificate
/// (TLS 1.3); the acceptor sends HANDSHAKE_DONE only once it has, so a peer that refuses us
/// never confirms. quinn reports no event for it; its frame counters show it.
async fn handshake_confirmed(conn: &quinn::Connection) {
    let mut wait = CONFIRM_POLL_MIN;
    while conn.stats().frame_rx.handshake_done == 0 {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(CONFIRM_POLL_MAX);
    }
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

/// Exponential backoff from 100 ms to 5 s.
#[derive(Debug)]
pub(crate) struct Backoff {
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

#[cfg(test)]
mod tests {
    use super::*;

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
            (Some(app(CLOSE_TOO_MANY)), "closed"),
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
}
