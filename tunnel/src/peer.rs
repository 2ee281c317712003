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
use tokio::sync::watch;
use tokio::time::Instant;

use crate::endpoint::{PeerConfig, TunnelError};
use crate::streams::{self, KIND_DATA};

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
pub(crate) const CLOSE_DUPLICATE: u32 = 5;
/// The dialer closes a replica's first connection when one of its lanes got a stateless reset
/// (the replica restarted; the close goes to the old process's address, where the new one
/// answers it with a reset too).
pub(crate) const CLOSE_RESTARTED: u32 = 6;

/// A working connection to one replica of a peer, as handed out by
/// [`PeerHandle::connections`].
#[derive(Clone, Debug)]
pub struct PeerConnection {
    peer: ClusterId,
    conn: quinn::Connection,
    draining: Arc<AtomicBool>,
    synced: Arc<AtomicBool>,
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

    /// Records that this replica sent its exports (its cluster source has synced): until
    /// then data streams go to other replicas of the peer first, since a replica that just
    /// started may not know the service yet.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
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
    /// Its data connections (lanes 1…, `crate::lanes`): one per data-plane thread of the
    /// dialer.
    pub lanes: usize,
    /// The send windows of those lanes together ([`crate::sendwin`]: each follows its path);
    /// `None` while not connected.
    pub send_window_bytes: Option<u64>,
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
    /// Whether it sent its exports ([`PeerConnection::set_synced`]).
    synced: Arc<AtomicBool>,
    /// Until when data streams avoid it (a stream on it went unanswered).
    suspect_until: Option<Instant>,
    /// The lane group its dialer named ([`crate::lanes::Group`]): accepted lanes with the same
    /// group belong to it.
    group: Option<crate::lanes::Group>,
}

/// One peer: its working connections and what we know of its addresses.
impl PeerState {
    /// No working connection.
    pub(crate) fn is_alone(&self) -> bool {
        self.live.is_empty()
    }
}

pub(crate) struct PeerState {
    configured: Vec<String>,
    live: Vec<Live>,
    /// Lanes 1… of the replicas (`crate::lanes`).
    lanes: Vec<crate::lanes::Lane>,
    /// Dialed addresses with the last error of each (dialing side only).
    pub(crate) targets: BTreeMap<SocketAddr, Option<String>>,
    /// How many replica addresses the configured ones resolved to.
    pub(crate) expected: usize,
    pub(crate) last_error: Option<String>,
}

/// [`Shared::add_lane`] refused: the peer has the most lanes it may.
#[derive(Debug)]
pub(crate) struct TooManyLanes;

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
                    lanes: Vec::new(),
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

    pub(crate) fn with<T>(
        &self,
        peer: &ClusterId,
        f: impl FnOnce(&mut PeerState) -> T,
    ) -> Option<T> {
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
                        synced: l.synced.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(tx) = self.watches.get(peer) {
            tx.send_replace(list);
        }
    }

    /// A working connection to `peer` other than `conn` with the same remote address.
    pub(crate) fn same_remote(
        &self,
        peer: &ClusterId,
        conn: &quinn::Connection,
    ) -> Option<quinn::Connection> {
        self.with(peer, |s| {
            s.live
                .iter()
                .find(|l| {
                    l.conn.stable_id() != conn.stable_id()
                        && l.conn.remote_address() == conn.remote_address()
                })
                .map(|l| l.conn.clone())
        })
        .flatten()
    }

    /// Adds a working connection; returns how many the peer has now.
    pub(crate) fn add(
        &self,
        peer: &ClusterId,
        conn: &quinn::Connection,
        direction: &'static str,
        group: Option<crate::lanes::Group>,
    ) -> usize {
        let n = self
            .with(peer, |s| {
                s.live.push(Live {
                    conn: conn.clone(),
                    direction,
                    since: Instant::now(),
                    draining: Arc::new(AtomicBool::new(false)),
                    synced: Arc::new(AtomicBool::new(false)),
                    suspect_until: None,
                    group,
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
    pub(crate) fn remove(
        &self,
        peer: &ClusterId,
        conn: &quinn::Connection,
        error: Option<String>,
    ) -> usize {
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

    /// Keeps a lane, in place of one with the same replica and number (returned, for the
    /// caller to close: the replica dialed it again). `Err` when the peer has the most lanes
    /// it may (or is not a configured peer).
    pub(crate) fn add_lane(
        &self,
        peer: &ClusterId,
        lane: crate::lanes::Lane,
    ) -> Result<Option<quinn::Connection>, TooManyLanes> {
        self.with(peer, |s| {
            s.lanes.retain(|l| l.conn.close_reason().is_none());
            if let Some(old) =
                s.lanes.iter_mut().find(|l| l.remote == lane.remote && l.index == lane.index)
            {
                return Ok(Some(std::mem::replace(old, lane).conn));
            }
            if s.lanes.len() >= MAX_CONNECTIONS_PER_PEER * usize::from(crate::lanes::MAX_LANES) {
                return Err(TooManyLanes);
            }
            s.lanes.push(lane);
            Ok(None)
        })
        .unwrap_or(Err(TooManyLanes))
    }

    /// Forgets a lane that ended.
    /// The address of `peer`'s replica an accepted lane belongs to: the one whose first
    /// connection named the lane's `group`, when the lane names one (none yet: `None`, the
    /// caller looks again); else the one whose first connection comes from `ip`, when exactly
    /// one does (a dialer with several threads dials its lanes from other ports than its first
    /// connection's, `crate::steer`).
    pub(crate) fn replica_of_lane(
        &self,
        peer: &ClusterId,
        group: Option<crate::lanes::Group>,
        ip: std::net::IpAddr,
    ) -> Option<SocketAddr> {
        self.with(peer, |s| {
            if let Some(group) = group {
                let l = s.live.iter().find(|l| l.group == Some(group))?;
                return Some(l.conn.remote_address());
            }
            let mut at = s.live.iter().map(|l| l.conn.remote_address()).filter(|a| a.ip() == ip);
            match (at.next(), at.next()) {
                (Some(one), None) => Some(one),
                _ => None,
            }
        })
        .flatten()
    }

    /// Files the accepted lane `conn` under the replica at `replica` ([`Self::replica_of_lane`]).
    pub(crate) fn refile_lane(
        &self,
        peer: &ClusterId,
        conn: &quinn::Connection,
        replica: SocketAddr,
    ) {
        self.with(peer, |s| {
            if let Some(lane) = s.lanes.iter_mut().find(|l| l.conn.stable_id() == conn.stable_id())
            {
                lane.remote = replica;
            }
        });
    }

    pub(crate) fn remove_lane(&self, peer: &ClusterId, conn: &quinn::Connection) {
        self.with(peer, |s| s.lanes.retain(|l| l.conn.stable_id() != conn.stable_id()));
    }

    pub(crate) fn set_target_error(&self, peer: &ClusterId, target: SocketAddr, error: String) {
        self.with(peer, |s| {
            s.targets.insert(target, Some(error.clone()));
            s.last_error = Some(error);
        });
    }

    fn status(&self, id: &ClusterId, s: &PeerState) -> LinkStatus {
        // A data lane of replica connection `l`, still open.
        let lane_of = |x: &crate::lanes::Lane, l: &Live| {
            x.remote == l.conn.remote_address() && x.conn.close_reason().is_none()
        };
        let now = Instant::now();
        let mut replicas: Vec<ReplicaLink> = s
            .live
            .iter()
            .map(|l| {
                let (lanes, window) =
                    s.lanes.iter().filter(|x| lane_of(x, l)).fold((0, 0), |(n, w), x| {
                        (n + 1, w + x.send_window.load(Ordering::Relaxed))
                    });
                ReplicaLink {
                    address: l.conn.remote_address(),
                    connected: true,
                    direction: l.direction,
                    rtt_ms: Some(l.conn.rtt().as_secs_f64() * 1000.0),
                    path_mtu: Some(l.conn.stats().path.current_mtu),
                    connected_secs: Some(now.duration_since(l.since).as_secs_f64()),
                    lanes,
                    send_window_bytes: Some(window),
                    draining: l.draining.load(Ordering::Relaxed),
                    last_error: None,
                }
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
                    lanes: 0,
                    send_window_bytes: None,
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
    /// byte. Replicas take turns; ones that have not sent their exports yet come after the
    /// others, draining and suspect ones last; a connection that
    /// cannot open a stream is passed over for the next. Of a replica, a data lane carries
    /// the stream, the one on the caller's data-plane thread when there is one
    /// (`crate::lanes`); the replica's first connection only while it has none.
    /// Returns the replica's id (its first connection's) with the stream, for
    /// [`Self::suspect`].
    pub async fn open_stream(
        &self,
        peer: &ClusterId,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, usize), TunnelError> {
        let now = Instant::now();
        let shard = crate::runtime::current_shard();
        let mut candidates: Vec<(u8, quinn::Connection, usize, Option<quinn::Connection>)> = self
            .shared
            .with(peer, |s| {
                s.live
                    .iter()
                    .map(|l| {
                        // The replica's data lane on this thread, else another of its
                        // data lanes (crate::lanes); its first connection, which carries
                        // the export exchange, only while it has none.
                        let remote = l.conn.remote_address();
                        // Lanes this side dialed first (crate::lanes::Lane::dialed).
                        let data = s
                            .lanes
                            .iter()
                            .filter(|x| x.remote == remote && x.conn.close_reason().is_none());
                        let lane = [true, false].into_iter().find_map(|dialed| {
                            let mut mine = data.clone().filter(|x| x.dialed == dialed);
                            match shard {
                                Some(shard) => {
                                    mine.clone().find(|x| x.shard == shard).or_else(|| mine.next())
                                }
                                None => mine.next(),
                            }
                        });
                        // A lane that closes as the stream opens (replaced, or its replica's
                        // first connection ended) leaves the first connection to try.
                        let (conn, first) = match lane {
                            Some(x) => (x.conn.clone(), Some(l.conn.clone())),
                            None => (l.conn.clone(), None),
                        };
                        // Served replicas first, then ones that have not sent their exports
                        // yet (just started), then draining and suspect ones.
                        let rank = if l.draining.load(Ordering::Relaxed)
                            || l.suspect_until.is_some_and(|t| t > now)
                        {
                            2
                        } else {
                            u8::from(!l.synced.load(Ordering::Relaxed))
                        };
                        (rank, conn, l.conn.stable_id(), first)
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
        candidates.sort_by_key(|(rank, _, _, _)| *rank);
        let mut last = None;
        for (_, conn, replica, first) in candidates {
            for conn in std::iter::once(conn).chain(first) {
                match streams::open(&conn, peer, KIND_DATA).await {
                    Ok((send, recv)) => return Ok((send, recv, replica)),
                    Err(e) => last = Some(e),
                }
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

    /// How many data lanes `peer`'s replicas have right now, all replicas together
    /// (`crate::lanes`: one per data-plane thread of the dialer, each replica).
    pub fn lanes(&self, peer: &ClusterId) -> usize {
        self.shared
            .with(peer, |s| s.lanes.iter().filter(|l| l.conn.close_reason().is_none()).count())
            .unwrap_or(0)
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
}
