//! The tasks that keep a connection to every replica of a peer (see [`crate::peer`]): one dial
//! task per resolved replica address on the dialing side, one acceptor per peer on the other,
//! and the serving of each connection while it is up.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::endpoint::{PeerConfig, TunnelError, TunnelSettings, transport_config};
use crate::metrics::{
    PEER_CONNECTIONS_TOTAL, PEER_DISCONNECTS_TOTAL, PEER_REPLICAS_CONNECTED,
    PEER_UNEXPECTED_INSTANCES_TOTAL, PEERS_CONNECTED,
};
use crate::peer::{
    CLOSE_ADDRESS_GONE, CLOSE_DUPLICATE, CLOSE_REPLACED, CLOSE_RESTARTED, CLOSE_SHUTDOWN,
    CLOSE_TOO_MANY, MAX_CONNECTIONS_PER_PEER, RESOLVE_INTERVAL, Shared, disconnect_reason,
};
use crate::streams::{self, Routes};
use crate::tls::{Credentials, RejectionSink, client_crypto};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a dialed connection is checked for the peer's handshake confirmation: from 1 ms,
/// doubling up to 50 ms.
const CONFIRM_POLL_MIN: Duration = Duration::from_millis(1);
const CONFIRM_POLL_MAX: Duration = Duration::from_millis(50);

/// What every task of one peer shares.
#[derive(Clone)]
pub(crate) struct PeerContext {
    pub peer: PeerConfig,
    pub settings: TunnelSettings,
    /// The tunnel port's first endpoint: lane 0 dials from it.
    pub endpoint: quinn::Endpoint,
    /// Data lanes dial from the one of their thread when there are these (`crate::steer`);
    /// from [`Self::endpoint`] otherwise.
    pub lane_endpoints: Arc<[quinn::Endpoint]>,
    pub routes: Routes,
    pub shared: Arc<Shared>,
    pub shutdown: CancellationToken,
}

/// One configured peer: its replicas dialed and its connections accepted.
pub(crate) struct PeerTask {
    pub ctx: PeerContext,
    pub credentials: Arc<Credentials>,
    /// Connections the endpoint accepted from this peer's replicas, with the lane group their
    /// first id named.
    pub accepted: mpsc::Receiver<crate::lanes::AcceptedConnection>,
}

impl PeerTask {
    /// The gateway with the lower cluster id dials every replica of the peer; the other
    /// dials only as a fallback ([`FALLBACK_AFTER`] without any connection: the peer's
    /// replicas sit behind one address, and its dials all reach another replica of ours).
    /// Both accept.
    pub(crate) async fn run(self) {
        let Self { ctx, credentials, accepted } = self;
        let fallback = ctx.peer.id < ctx.settings.local;
        tokio::join!(run_dialer(ctx.clone(), credentials, fallback), run_acceptor(ctx, accepted));
    }
}

/// How long the gateway that normally only accepts (the higher cluster id) waits without any
/// connection to a peer before it dials the peer itself.
pub const FALLBACK_AFTER: Duration = Duration::from_secs(3);

/// Resolves the peer's addresses now and every [`RESOLVE_INTERVAL`], and keeps a dial task
/// per resolved address. An address that no longer resolves loses its task (and connection);
/// a name that fails to resolve keeps what it resolved to before.
async fn run_dialer(ctx: PeerContext, credentials: Arc<Credentials>, fallback: bool) {
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
            if !fallback {
                // Shown in the status from now on (a fallback target once it is dialed).
                ctx.shared.with(&ctx.peer.id, |s| {
                    s.targets.entry(*addr).or_insert(None);
                });
            }
            let task = DialTask {
                ctx: ctx.clone(),
                target: *addr,
                credentials: credentials.clone(),
                fallback,
                token,
                backoff: Backoff::default(),
                last_logged_error: None,
                last_rtt: None,
            };
            let span = tracing::info_span!("replica", address = %addr);
            tokio::spawn(task.run().instrument(span));
        }
        let configured = ctx.peer.addresses.len();
        ctx.shared.with(&ctx.peer.id, |s| {
            s.targets.retain(|a, _| targets.contains(a));
            s.expected = targets.len().max(configured);
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
/// address of an old one replaces it.
async fn run_acceptor(
    ctx: PeerContext,
    mut accepted: mpsc::Receiver<crate::lanes::AcceptedConnection>,
) {
    let mut by_address: HashMap<SocketAddr, (quinn::Connection, CancellationToken)> =
        HashMap::new();
    let mut warned_excess = false;
    loop {
        let (conn, group) = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
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
                let _ = serve(&ctx, conn, "accept", token, None, group).await;
            }
            .instrument(span),
        );
    }
}

/// How serving a connection ended.
enum Served {
    /// It never counted as up (refused after the handshake, or gone before confirmed).
    NeverUp(Option<quinn::ConnectionError>),
    /// It was up for this long; `restarted`: it ended by a stateless reset (its own or a
    /// lane's), so the replica is back already.
    Ended { up: Duration, restarted: bool },
}

/// Serves one connection until it closes or `token` is cancelled: its incoming streams, and
/// its place among the peer's working connections while it is up. A dialed connection counts
/// as up once the acceptor confirmed the handshake. `group`: the lane group its first id
/// named (ours when we dialed it: our lanes name it too).
async fn serve(
    ctx: &PeerContext,
    conn: quinn::Connection,
    direction: &'static str,
    token: CancellationToken,
    credentials: Option<&Arc<Credentials>>,
    group: Option<crate::lanes::Group>,
) -> Served {
    let peer = ctx.peer.id.clone();
    let streams = crate::runtime::spawn_on(
        ctx.settings.shards.first(),
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
    // Both gateways may have dialed each other at once (the fallback): of two connections
    // between the same two addresses, the one the lower cluster id dialed stays.
    let lower_dials = ctx.settings.local < peer;
    let ours_wins = (direction == "dial") == lower_dials;
    if let Some(other) = ctx.shared.same_remote(&peer, &conn) {
        let loser = if ours_wins { &other } else { &conn };
        tracing::debug!(remote = %conn.remote_address(), "two connections between the same gateways; closing one");
        loser.close(VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate connection");
        if !ours_wins {
            streams.abort();
            return Served::NeverUp(None);
        }
    }
    let started = Instant::now();
    let n = ctx.shared.add(&peer, &conn, direction, group);
    metrics::counter!(PEER_CONNECTIONS_TOTAL, "direction" => direction).increment(1);
    metrics::gauge!(PEER_REPLICAS_CONNECTED, "peer" => peer.to_string()).set(n as f64);
    if n == 1 {
        metrics::gauge!(PEERS_CONNECTED).increment(1.0);
    }
    tracing::info!(direction, remote = %conn.remote_address(), replicas = n, "peer connected");
    // The dialer keeps a lane per further data-plane thread while this connection is up.
    let lanes = token.child_token();
    let _lanes_end = lanes.clone().drop_guard();
    // Cancelled by a lane that got a stateless reset: the replica restarted.
    let restarted = CancellationToken::new();
    if let Some(credentials) = credentials
        && let Some(group) = group
    {
        crate::lanes::dial_lanes(
            ctx,
            credentials,
            conn.remote_address(),
            &lanes,
            &restarted,
            group,
        );
    }

    // Cancelled without shutdown: an accepted connection was replaced by a newer one from
    // the same replica; a dialed one's address no longer resolves.
    let mut label = None;
    let mut text = None;
    tokio::select! {
        // A data lane of this replica got a stateless reset, so the process we connected to
        // is gone and this connection is dead too; it would only learn that from its own
        // next packet's reset (heartbeats are seconds apart), meanwhile counting the replica
        // up while its lanes, redialed to the new process, would be cut again when it ends
        // (tests/fault_peers.rs). End it now: the dial task redials at once.
        _ = restarted.cancelled() => {
            label = Some("reset");
            text = Some("the replica restarted: one of its data lanes got a stateless reset".to_owned());
            conn.close(VarInt::from_u32(CLOSE_RESTARTED), b"the peer restarted");
        }
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
    let text = text.or_else(|| reason.as_ref().map(ToString::to_string));
    let n = ctx.shared.remove(&peer, &conn, text.clone());
    metrics::gauge!(PEER_REPLICAS_CONNECTED, "peer" => peer.to_string()).set(n as f64);
    if n == 0 {
        metrics::gauge!(PEERS_CONNECTED).decrement(1.0);
    }
    metrics::counter!(PEER_DISCONNECTS_TOTAL, "reason" => label).increment(1);
    tracing::info!(reason = text.as_deref().unwrap_or("local"), replicas = n, "peer disconnected");
    let restarted =
        restarted.is_cancelled() || matches!(reason, Some(quinn::ConnectionError::Reset));
    Served::Ended { up: started.elapsed(), restarted }
}

/// Dials one replica address: dial with backoff, serve the connection, dial again.
struct DialTask {
    ctx: PeerContext,
    target: SocketAddr,
    credentials: Arc<Credentials>,
    /// Dial only while the peer has had no connection for [`FALLBACK_AFTER`].
    fallback: bool,
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
            if self.fallback {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = alone_for(&self.ctx, FALLBACK_AFTER) => {}
                }
            }
            // Drawn for each dial: lanes of this connection name it, so that the acceptor
            // files them under it (crate::lanes::Group).
            let group = crate::lanes::new_group();
            let conn = tokio::select! {
                _ = token.cancelled() => return,
                conn = self.try_dial(&group) => conn,
            };
            let conn = match conn {
                Ok(conn) => conn,
                Err(e) => {
                    self.note_error(&e);
                    delay = Some(self.backoff.fail());
                    continue;
                }
            };
            let served = serve(
                &self.ctx,
                conn.clone(),
                "dial",
                self.token.clone(),
                Some(&self.credentials),
                Some(group),
            )
            .await;
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
                Served::Ended { up, restarted } => {
                    self.last_logged_error = None;
                    if up >= BACKOFF_MAX || restarted {
                        self.backoff.reset();
                    } else {
                        // A connection that keeps dying young is retried with backoff.
                        delay = Some(self.backoff.fail());
                    }
                }
            }
        }
    }

    async fn try_dial(
        &mut self,
        group: &crate::lanes::Group,
    ) -> Result<quinn::Connection, TunnelError> {
        dial(&self.ctx, &self.credentials, self.target, self.last_rtt, None, group).await
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

/// Dials `target`, a replica of the context's peer, and completes the handshake. `lane`: the
/// lane number to name in the first destination connection id and the data-plane thread to
/// place the connection's task on ([`crate::lanes`]); `None`: lane 0, on the first thread.
/// The id names `group` too. `last_rtt`: the previous connection's RTT, the first estimate of
/// this one.
pub(crate) async fn dial(
    ctx: &PeerContext,
    credentials: &Arc<Credentials>,
    target: SocketAddr,
    last_rtt: Option<Duration>,
    lane: Option<(u8, usize)>,
    group: &crate::lanes::Group,
) -> Result<quinn::Connection, TunnelError> {
    let peer = ctx.peer.id.clone();
    let address = target.to_string();
    let connect_err = |detail: String| TunnelError::Connect {
        peer: peer.clone(),
        address: address.clone(),
        detail,
    };
    // A rejection sink of this replica's own: concurrent dials to other replicas of the
    // peer must not take each other's reasons.
    let sink = Arc::new(RejectionSink::new(true));
    let crypto = client_crypto(credentials, peer.clone(), sink.clone())
        .map_err(|e| connect_err(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = transport_config(&ctx.settings)?;
    if let Some(rtt) = redial_initial_rtt(last_rtt) {
        // RFC 9002 §6.2.2: a new connection to a peer may start from the RTT measured on
        // the previous one instead of 333 ms. The first Initial of a redial is often lost
        // (the peer is restarting, its port closed), and its resend waits for the first
        // PTO: ~3 × the initial RTT, 1 s with the default.
        transport.initial_rtt(rtt);
    }
    config.transport_config(Arc::new(transport));
    let (index, shard) = lane.unwrap_or((0, 0));
    let group = *group;
    config.initial_dst_cid_provider(Arc::new(move || crate::lanes::lane_cid(index, &group)));
    // quinn instruments the connection's driver task with the span current at this call
    // and enters it at every poll. Here that would be this task's span, which is enabled
    // at the default `info` level, so every packet would pay the subscriber's enter, exit
    // and filter calls. The call runs in a task of its own, outside any span, as accepted
    // connections' calls do (docs/decisions.md, session 6).
    let endpoint = match lane {
        Some((_, shard)) => ctx.lane_endpoints.get(shard).unwrap_or(&ctx.endpoint).clone(),
        None => ctx.endpoint.clone(),
    };
    let server_name = peer.clone();
    let connecting = tokio::spawn(async move {
        crate::runtime::place(shard, || endpoint.connect_with(config, target, server_name.as_str()))
    })
    .await
    .map_err(|e| connect_err(format!("the dial task failed: {e}")))?
    .map_err(|e| connect_err(e.to_string()))?;
    connecting.await.map_err(|source| match sink.take() {
        Some(reason) => TunnelError::PeerRejected { peer: peer.clone(), reason },
        None => TunnelError::Handshake { peer: peer.clone(), source },
    })
}

/// Resolves once the peer has had no working connection for `wait` in a row (checked every
/// quarter of it).
async fn alone_for(ctx: &PeerContext, wait: Duration) {
    let mut since: Option<Instant> = None;
    loop {
        let alone = ctx.shared.with(&ctx.peer.id, |s| s.is_alone()).unwrap_or(true);
        match (alone, since) {
            (false, _) => since = None,
            (true, None) => since = Some(Instant::now()),
            (true, Some(t)) if t.elapsed() >= wait => return,
            (true, Some(_)) => {}
        }
        tokio::time::sleep(wait / 4).await;
    }
}

/// Resolves once the peer confirmed the handshake (RFC 9001 §4.1.2: its HANDSHAKE_DONE frame
/// arrived). A dialer's handshake completes before the acceptor has checked our certificate
/// (TLS 1.3); the acceptor sends HANDSHAKE_DONE only once it has, so a peer that refuses us
/// never confirms. quinn reports no event for it; its frame counters show it.
pub(crate) async fn handshake_confirmed(conn: &quinn::Connection) {
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
    pub(crate) fn fail(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }
    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
