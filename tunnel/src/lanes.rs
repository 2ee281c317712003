//! Lanes: the data connections of a replica. Each replica of a peer is reached over one QUIC
//! connection for the export exchange (lane 0) and one more per data-plane thread for data
//! (lanes 1…). quinn drives each connection from one task, so one connection's packets are
//! encrypted, decrypted and turned into stream data on one thread; a connection per thread
//! lets a peer's traffic use every thread, and a proxied connection's stream then lives on the
//! thread that copies it to TCP.
//!
//! Lane 0 is the replica's connection as [`crate::replicas`] keeps it: it carries the export
//! exchange, counts for the peer's lease and readiness, and its end ends the replica. It
//! carries no data while a data lane is up: data streams share a connection's flow-control
//! credit and send buffer, and a few streams into a slow backend fill both, which would hold
//! the exchange's heartbeats back until the peer's lease lapsed (tests/fault_starve.rs,
//! docs/decisions.md, session 16). Lanes 1… carry data streams only. The dialer opens lane
//! `k` (k ≥ 1) once lane 0 is up, with its driver on its thread `k - 1`, and names the lane in
//! the first destination connection id it sends ([`lane_cid`]; the Initial packets are keyed
//! with it, so it cannot be rewritten on the way); the acceptor places the connection's task
//! on its thread `(k - 1) mod threads` before the handshake and, once the peer's certificate
//! is verified, serves it here, filed under the replica whose lane 0 named the same [`Group`]
//! (replicas behind one NAT address share an IP, not a group). A dialer that names no lane (an
//! older gateway) only ever has lane 0, which then carries data too.
//!
//! New data streams prefer the lane on the caller's thread ([`crate::PeerHandle::open_stream`]),
//! then any other data lane of the replica, and fall back to lane 0 only while the replica has
//! none (just connected, or a lane being redialed). Lanes share the replica's standing:
//! draining, suspect and synced are tracked on lane 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use fedgate_discovery::model::ClusterId;
use quinn::VarInt;
use quinn_proto::ConnectionId;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::peer::{CLOSE_REPLACED, CLOSE_SHUTDOWN, CLOSE_TOO_MANY, Shared, TooManyLanes};
use crate::replicas::{BACKOFF_MAX, Backoff, PeerContext, dial, handshake_confirmed};
use crate::streams::{self, Routes};
use crate::tls::Credentials;

/// The most lanes per replica: lane numbers at or above it are refused.
pub const MAX_LANES: u8 = 64;
/// First bytes of a destination connection id that names a lane: `f`, `g`, the lane number.
pub(crate) const MARKER: [u8; 2] = *b"fg";
/// Length of such an id: long enough to be unguessable after the marker (RFC 9000 §7.2 asks
/// for at least 8 bytes), and distinct from quinn's own 20-byte random ids.
pub(crate) const LANE_CID_LEN: usize = 18;
/// Length of a lane group: the bytes after the lane number that every lane of one replica
/// connection shares.
pub(crate) const GROUP_LEN: usize = 8;

/// The lanes of one replica connection, as the dialer names them in every lane's first id
/// (lane 0 included): random, drawn for each dial of lane 0. The acceptor files a lane under
/// the replica connection whose lane 0 carried the same group, which works where a replica's
/// address cannot tell (several replicas behind one NAT address).
pub(crate) type Group = [u8; GROUP_LEN];

/// A replica's first connection as the endpoint accepted it, with the lane group its first id
/// named, on its way to the peer's task.
pub(crate) type AcceptedConnection = (quinn::Connection, Option<Group>);

/// A new random group for a dial of lane 0.
pub(crate) fn new_group() -> Group {
    let mut group = [0u8; GROUP_LEN];
    // Fails only where the system has no random source; lanes are then filed by address.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut group);
    group
}

/// A first destination connection id naming `lane` of `group`: the marker, the lane, the
/// group, random bytes.
pub(crate) fn lane_cid(lane: u8, group: &Group) -> ConnectionId {
    let mut bytes = [0u8; LANE_CID_LEN];
    bytes[..2].copy_from_slice(&MARKER);
    bytes[2] = lane;
    bytes[3..3 + GROUP_LEN].copy_from_slice(group);
    // Fails only where the system has no random source; the id is then less random, not
    // wrong (the lane is still named).
    let _ = ring::rand::SecureRandom::fill(
        &ring::rand::SystemRandom::new(),
        &mut bytes[3 + GROUP_LEN..],
    );
    ConnectionId::new(&bytes)
}

/// The group a first destination connection id names ([`lane_cid`]); `None` for any other id
/// (a dialer that names no lanes). Pure.
pub(crate) fn group_of(cid: &ConnectionId) -> Option<Group> {
    match cid.as_ref() {
        [b'f', b'g', lane, rest @ ..] if cid.len() == LANE_CID_LEN && *lane < MAX_LANES => {
            rest.get(..GROUP_LEN)?.try_into().ok()
        }
        _ => None,
    }
}

/// The lane a first destination connection id names; 0 when it names none (a dialer with one
/// thread, or one that does not know lanes) or an out-of-range lane. Pure.
pub(crate) fn lane_of(cid: &ConnectionId) -> u8 {
    match cid.as_ref() {
        [b'f', b'g', lane, ..] if cid.len() == LANE_CID_LEN && *lane < MAX_LANES => *lane,
        _ => 0,
    }
}

/// One lane beyond the first of a replica.
pub(crate) struct Lane {
    /// The replica's address (lane 0's remote address).
    pub remote: SocketAddr,
    pub index: u8,
    /// The data-plane thread its connection's task runs on.
    pub shard: usize,
    pub conn: quinn::Connection,
    /// This side dialed it. Streams this side opens prefer such lanes: a peer's lanes accepted
    /// here may belong to its fallback connection, which is cut as soon as ours is up.
    pub dialed: bool,
    /// Its send window as [`crate::sendwin`] last set it.
    pub send_window: Arc<AtomicU64>,
}

/// What the acceptor needs to serve lanes peers open to it.
#[derive(Clone)]
pub(crate) struct Accepted {
    pub shared: Arc<Shared>,
    pub routes: Routes,
    pub shutdown: CancellationToken,
    /// The configured send window: the most a lane's window follows its path to
    /// ([`crate::sendwin`]).
    pub send_window: u64,
}

impl Accepted {
    /// Serves lane `index` of one of `peer`'s replicas (`conn` already verified) until it
    /// closes: its streams accepted on `runtime`, the thread its task was placed on. The lane
    /// is filed under its replica ([`file_lane`]) beside that, so that its streams are
    /// accepted at once.
    pub(crate) fn serve(
        &self,
        peer: ClusterId,
        conn: quinn::Connection,
        index: u8,
        group: Option<Group>,
        shard: usize,
        runtime: Option<Handle>,
    ) {
        let from = conn.remote_address();
        let filed = self.shared.replica_of_lane(&peer, group, from.ip());
        let window = Arc::new(AtomicU64::new(0));
        let lane = Lane {
            remote: filed.unwrap_or(from),
            index,
            shard,
            conn: conn.clone(),
            dialed: false,
            send_window: window.clone(),
        };
        if keep(&self.shared, &peer, lane).is_err() {
            tracing::warn!(%peer, %from, "too many lanes with this peer's identity; refusing");
            conn.close(VarInt::from_u32(CLOSE_TOO_MANY), b"too many connections of this identity");
            return;
        }
        tracing::debug!(%peer, %from, replica = ?filed, lane = index, shard, "lane accepted");
        if filed.is_none() {
            tokio::spawn(file_lane(self.shared.clone(), peer.clone(), conn.clone(), group));
        }
        let (shared, routes, shutdown) =
            (self.shared.clone(), self.routes.clone(), self.shutdown.clone());
        let window = (self.send_window, window);
        crate::runtime::spawn_on(runtime.as_ref(), async move {
            let why = || -> &'static [u8] { b"gateway shutting down" };
            carry(&shared, &peer, &conn, routes, None, window, &shutdown, why).await;
        });
    }
}

/// How long an accepted lane waits for its replica's first connection to be listed: the
/// dialer opens lanes once that connection's handshake is confirmed, which can be a moment
/// before this side has handed the connection to its peer task.
const REPLICA_WAIT: Duration = Duration::from_secs(1);

/// Files an accepted lane under its replica once that replica's first connection is listed:
/// the one whose first id named the same group ([`Group`]), else (a dialer that names no
/// group) the one from the same IP (a dialer with several threads dials its lanes from ports
/// of their own, `crate::steer`). Gives up after [`REPLICA_WAIT`], or, without a group, when
/// none or several of the replica's connections come from that IP (behind one NAT address,
/// for example): the lane still carries the dialer's streams, only streams this side opens
/// do not use it, they go on the replica's first connection.
async fn file_lane(
    shared: Arc<Shared>,
    peer: ClusterId,
    conn: quinn::Connection,
    group: Option<Group>,
) {
    let from = conn.remote_address();
    let deadline = tokio::time::Instant::now() + REPLICA_WAIT;
    while tokio::time::Instant::now() < deadline && conn.close_reason().is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Some(replica) = shared.replica_of_lane(&peer, group, from.ip()) {
            shared.refile_lane(&peer, &conn, replica);
            return;
        }
    }
    tracing::debug!(%peer, %from, "no single replica connection from this lane's address");
}

/// Keeps `lane` among the peer's lanes, closing the one it replaces.
fn keep(shared: &Shared, peer: &ClusterId, lane: Lane) -> Result<(), TooManyLanes> {
    if let Some(old) = shared.add_lane(peer, lane)? {
        old.close(VarInt::from_u32(CLOSE_REPLACED), b"replaced by a new connection");
    }
    Ok(())
}

/// Carries a kept lane: accepts its streams (on `runtime`, else here) and keeps its send
/// window following its path up to `send_window.0`, shown in `send_window.1`
/// ([`crate::sendwin`]), until it closes or `stop` is cancelled, which closes it with
/// `why()`; then forgets it.
#[allow(clippy::too_many_arguments)]
async fn carry(
    shared: &Shared,
    peer: &ClusterId,
    conn: &quinn::Connection,
    routes: Routes,
    runtime: Option<&Handle>,
    send_window: (u64, Arc<AtomicU64>),
    stop: &CancellationToken,
    why: impl FnOnce() -> &'static [u8],
) {
    let streams = crate::runtime::spawn_on(
        runtime,
        streams::accept_streams(conn.clone(), peer.clone(), routes),
    );
    let window = crate::runtime::spawn_on(
        runtime,
        crate::sendwin::follow_path(conn.clone(), send_window.0, send_window.1),
    );
    tokio::select! {
        _ = stop.cancelled() => conn.close(VarInt::from_u32(CLOSE_SHUTDOWN), why()),
        _ = conn.closed() => {}
    }
    streams.abort();
    window.abort();
    shared.remove_lane(peer, conn);
}

/// The data-plane thread lane `index` (≥ 1) is placed on, at the dialer and the acceptor,
/// with `threads` data-plane threads (0: none, everything on one runtime). Pure.
pub(crate) fn shard_of(index: u8, threads: usize) -> usize {
    usize::from(index.saturating_sub(1)) % threads.max(1)
}

/// Keeps the data lanes (1…, one per data-plane thread, at least one) of the dialed replica
/// `target` while `token` lives (lane 0's connection is up): one task per lane, each dialing
/// with backoff. A lane that gets a stateless reset cancels `restarted`: the replica's
/// process is gone, lane 0 with it, and its lanes are dialed again once lane 0 is.
pub(crate) fn dial_lanes(
    ctx: &PeerContext,
    credentials: &Arc<Credentials>,
    target: SocketAddr,
    token: &CancellationToken,
    restarted: &CancellationToken,
    group: Group,
) {
    let threads = ctx.settings.shards.len();
    let lanes = threads.clamp(1, usize::from(MAX_LANES - 1));
    for index in 1..=lanes {
        let index = u8::try_from(index).unwrap_or(MAX_LANES - 1);
        let task = LaneTask {
            ctx: ctx.clone(),
            credentials: credentials.clone(),
            target,
            index,
            shard: shard_of(index, threads),
            token: token.clone(),
            restarted: restarted.clone(),
            group,
        };
        tokio::spawn(task.run());
    }
}

struct LaneTask {
    ctx: PeerContext,
    credentials: Arc<Credentials>,
    target: SocketAddr,
    index: u8,
    shard: usize,
    token: CancellationToken,
    restarted: CancellationToken,
    group: Group,
}

impl LaneTask {
    async fn run(self) {
        let mut backoff = Backoff::default();
        let peer = self.ctx.peer.id.clone();
        loop {
            let dialed = tokio::select! {
                _ = self.token.cancelled() => return,
                d = dial(&self.ctx, &self.credentials, self.target, None, Some((self.index, self.shard)), &self.group) => d,
            };
            let up = match dialed {
                Ok(conn) => self.serve(conn).await,
                Err(e) => {
                    tracing::debug!(%peer, target = %self.target, lane = self.index, error = %e, "lane dial failed");
                    None
                }
            };
            if self.token.is_cancelled() {
                return;
            }
            let delay = match up {
                Some(up) if up >= BACKOFF_MAX => {
                    backoff.reset();
                    Duration::ZERO
                }
                _ => backoff.fail(),
            };
            tokio::select! {
                _ = self.token.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Serves a dialed lane until it closes or the replica's lane 0 ends; how long it was up.
    async fn serve(&self, conn: quinn::Connection) -> Option<Duration> {
        let peer = self.ctx.peer.id.clone();
        // As for lane 0: usable once the acceptor confirmed it checked our certificate.
        let confirmed = tokio::select! {
            _ = self.token.cancelled() => false,
            _ = conn.closed() => false,
            _ = handshake_confirmed(&conn) => true,
        };
        if !confirmed {
            conn.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"lane no longer needed");
            return None;
        }
        let shown = Arc::new(AtomicU64::new(0));
        let lane = Lane {
            remote: self.target,
            index: self.index,
            shard: self.shard,
            conn: conn.clone(),
            dialed: true,
            send_window: shown.clone(),
        };
        if keep(&self.ctx.shared, &peer, lane).is_err() {
            conn.close(VarInt::from_u32(CLOSE_TOO_MANY), b"lane not kept");
            return None;
        }
        let started = tokio::time::Instant::now();
        let runtime = self.ctx.settings.shards.get(self.shard);
        let shutdown = &self.ctx.shutdown;
        let why = || -> &'static [u8] {
            if shutdown.is_cancelled() {
                b"gateway shutting down"
            } else {
                b"the replica's first connection ended"
            }
        };
        let window = (u64::from(self.ctx.settings.connection_receive_window), shown);
        let routes = self.ctx.routes.clone();
        carry(&self.ctx.shared, &peer, &conn, routes, runtime, window, &self.token, why).await;
        if matches!(conn.close_reason(), Some(quinn::ConnectionError::Reset)) {
            tracing::info!(%peer, target = %self.target, lane = self.index, "a data lane got a stateless reset: the replica restarted; redialing it");
            self.restarted.cancel();
        }
        Some(started.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_ids_name_their_lane_and_nothing_else_does() {
        let group = new_group();
        for lane in [0, 1, 2, 63] {
            let cid = lane_cid(lane, &group);
            assert_eq!(cid.len(), LANE_CID_LEN);
            assert_eq!(lane_of(&cid), lane);
            assert_eq!(group_of(&cid), Some(group), "lane {lane}");
        }
        // The random part differs between dials, and so do groups.
        assert_ne!(lane_cid(1, &group), lane_cid(1, &group));
        assert_ne!(new_group(), new_group());
        assert_eq!(group_of(&ConnectionId::new(&[0x66; 20])), None);
        // quinn's own ids (20 random bytes), ids that happen to start with the marker but have
        // another length, and lanes out of range all mean lane 0.
        assert_eq!(lane_of(&ConnectionId::new(&[0x66; 20])), 0);
        let mut short = [0u8; 8];
        short[..3].copy_from_slice(b"fg\x01");
        assert_eq!(lane_of(&ConnectionId::new(&short)), 0);
        assert_eq!(group_of(&ConnectionId::new(&short)), None);
        let mut big = [0u8; LANE_CID_LEN];
        big[..3].copy_from_slice(&[b'f', b'g', MAX_LANES]);
        assert_eq!(lane_of(&ConnectionId::new(&big)), 0);
        assert_eq!(group_of(&ConnectionId::new(&big)), None);
        assert_eq!(lane_of(&ConnectionId::new(&[])), 0);
    }
}
