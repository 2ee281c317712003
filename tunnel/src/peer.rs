//! One connection per configured peer: dialed (the lower cluster id dials) with backoff, or
//! accepted; replaced when the peer reconnects; published while it works, for data streams
//! and for whoever runs the control channel over it ([`PeerHandle::connections`]).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fedgate_discovery::model::ClusterId;
use quinn::VarInt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::endpoint::{PeerConfig, TunnelError, TunnelSettings, transport_config};
use crate::metrics::{PEER_CONNECTIONS_TOTAL, PEER_DISCONNECTS_TOTAL, PEERS_CONNECTED};
use crate::streams::{self, KIND_DATA, Routes};
use crate::tls::RejectionSink;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a dialed connection is checked for the peer's handshake confirmation: from 1 ms,
/// doubling up to 50 ms.
const CONFIRM_POLL_MIN: Duration = Duration::from_millis(1);
const CONFIRM_POLL_MAX: Duration = Duration::from_millis(50);

/// Application close codes of a connection.
pub(crate) const CLOSE_SHUTDOWN: u32 = 0;
pub(crate) const CLOSE_REPLACED: u32 = 1;
pub(crate) const CLOSE_WRONG_DIRECTION: u32 = 2;

/// A working connection to a peer, as handed out by [`PeerHandle::connections`].
#[derive(Clone, Debug)]
pub struct PeerConnection {
    peer: ClusterId,
    conn: quinn::Connection,
}

impl PeerConnection {
    pub fn peer(&self) -> &ClusterId {
        &self.peer
    }

    /// Whether `other` is this same connection.
    pub fn same(&self, other: &PeerConnection) -> bool {
        self.conn.stable_id() == other.conn.stable_id()
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

/// How the transport sees one peer.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkStatus {
    pub cluster: ClusterId,
    /// Its configured address.
    pub address: String,
    pub connected: bool,
    /// Round-trip time of the QUIC connection, when connected.
    pub rtt_ms: Option<f64>,
    /// Largest UDP payload the connection uses now (path MTU discovery), when connected.
    pub path_mtu: Option<u16>,
    /// Why the last connection attempt failed or the last connection ended.
    pub last_error: Option<String>,
}

struct LinkEntry {
    address: String,
    last_error: Option<String>,
}

/// State shared by the endpoint's tasks and every `PeerHandle`.
pub(crate) struct Shared {
    connections: Mutex<HashMap<ClusterId, quinn::Connection>>,
    links: Mutex<BTreeMap<ClusterId, LinkEntry>>,
    watches: HashMap<ClusterId, watch::Sender<Option<PeerConnection>>>,
}

impl Shared {
    pub(crate) fn new(peers: &[PeerConfig]) -> Self {
        let links = peers
            .iter()
            .map(|p| {
                (p.id.clone(), LinkEntry { address: p.addresses.join(", "), last_error: None })
            })
            .collect();
        let watches = peers.iter().map(|p| (p.id.clone(), watch::channel(None).0)).collect();
        Self { connections: Mutex::default(), links: Mutex::new(links), watches }
    }

    fn connection(&self, peer: &ClusterId) -> Option<quinn::Connection> {
        self.connections.lock().unwrap_or_else(PoisonError::into_inner).get(peer).cloned()
    }

    fn set_error(&self, peer: &ClusterId, error: Option<String>) {
        if let Some(entry) = self.links.lock().unwrap_or_else(PoisonError::into_inner).get_mut(peer)
        {
            entry.last_error = error;
        }
    }

    fn status(&self, id: &ClusterId, entry: &LinkEntry) -> LinkStatus {
        let conn = self.connection(id);
        LinkStatus {
            cluster: id.clone(),
            address: entry.address.clone(),
            connected: conn.is_some(),
            rtt_ms: conn.as_ref().map(|c| c.rtt().as_secs_f64() * 1000.0),
            path_mtu: conn.as_ref().map(|c| c.stats().path.current_mtu),
            last_error: entry.last_error.clone(),
        }
    }
}

/// What the data plane and the peer sessions use: open data streams, follow each peer's
/// connection, read the transport's status.
#[derive(Clone)]
pub struct PeerHandle {
    pub(crate) shared: Arc<Shared>,
}

impl PeerHandle {
    /// Opens a data stream to `peer` on the existing connection and writes the kind byte.
    pub async fn open_stream(
        &self,
        peer: &ClusterId,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), TunnelError> {
        let conn =
            self.shared.connection(peer).ok_or_else(|| TunnelError::NotConnected(peer.clone()))?;
        streams::open(&conn, peer, KIND_DATA).await
    }

    /// Whether the connection to `peer` is up right now.
    pub fn is_connected(&self, peer: &ClusterId) -> bool {
        self.shared.connection(peer).is_some()
    }

    /// The working connection to `peer` (`None` while there is none), following redials and
    /// replacements. `None` for a peer that is not configured.
    pub fn connections(&self, peer: &ClusterId) -> Option<watch::Receiver<Option<PeerConnection>>> {
        self.shared.watches.get(peer).map(watch::Sender::subscribe)
    }

    /// How the transport sees `peer` now (rtt and path MTU measured now).
    pub fn link_status(&self, peer: &ClusterId) -> Option<LinkStatus> {
        let links = self.shared.links.lock().unwrap_or_else(PoisonError::into_inner);
        links.get(peer).map(|entry| self.shared.status(peer, entry))
    }

    /// Every configured peer's transport status, by cluster id.
    pub fn status(&self) -> Vec<LinkStatus> {
        let links = self.shared.links.lock().unwrap_or_else(PoisonError::into_inner);
        links.iter().map(|(id, entry)| self.shared.status(id, entry)).collect()
    }
}

/// One configured peer: its connection, dialed or accepted.
pub(crate) struct PeerTask {
    pub peer: PeerConfig,
    pub settings: TunnelSettings,
    pub endpoint: quinn::Endpoint,
    /// Set when we dial this peer (our id is lower).
    pub dial: Option<(quinn::ClientConfig, Arc<RejectionSink>)>,
    pub accepted: mpsc::Receiver<quinn::Connection>,
    pub routes: Routes,
    pub shared: Arc<Shared>,
    pub shutdown: CancellationToken,
    pub backoff: Backoff,
    /// Wait this long before the next dial.
    pub delay: Option<Duration>,
    /// Whether the current connection counts as up (published).
    pub up: bool,
    pub last_logged_error: Option<String>,
    /// Smoothed RTT of the last connection to this peer: the first RTT estimate of a redial.
    pub last_rtt: Option<Duration>,
}

impl PeerTask {
    pub(crate) async fn run(mut self) {
        loop {
            let shutdown = self.shutdown.clone();
            let next = tokio::select! {
                _ = shutdown.cancelled() => None,
                conn = self.next_connection() => conn,
            };
            let Some(conn) = next else { return };
            let mut current = Some(conn);
            while let Some(conn) = current.take() {
                current = self.serve_connection(conn).await;
            }
            if self.shutdown.is_cancelled() {
                return;
            }
        }
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
        let address = self.peer.addresses.first().cloned().unwrap_or_default();
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
        self.shared.set_error(&self.peer.id, Some(text));
    }

    /// Serves one connection until it closes, shutdown, or the peer reconnects (then the new
    /// connection is returned to be served next).
    async fn serve_connection(&mut self, conn: quinn::Connection) -> Option<quinn::Connection> {
        let peer = self.peer.id.clone();
        // The acceptor verified the peer's certificate before the handshake completed. The
        // dialer's handshake completes before the acceptor has checked *our* certificate
        // (TLS 1.3), so the dialer counts the peer up only once the acceptor confirmed it.
        self.up = false;
        if self.dial.is_none() {
            self.mark_up(&conn);
        }
        let streams = crate::runtime::spawn_on(
            self.settings.runtime.as_ref(),
            streams::accept_streams(conn.clone(), peer.clone(), self.routes.clone()),
        );
        let started = Instant::now();
        let replacement = self.hold(&conn).await;

        streams.abort();
        if replacement.is_some() {
            conn.close(VarInt::from_u32(CLOSE_REPLACED), b"replaced by a new connection");
        }
        let reason = conn.close_reason();
        self.last_rtt = Some(conn.rtt());
        if !self.up {
            // Refused after the handshake (our certificate), or gone before it was confirmed.
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
        if let Some(tx) = self.shared.watches.get(&peer) {
            tx.send_if_modified(|current| {
                let this = current.as_ref().is_some_and(|c| c.conn.stable_id() == conn.stable_id());
                if this {
                    *current = None;
                }
                this
            });
        }
        metrics::gauge!(PEERS_CONNECTED).decrement(1.0);
        let label =
            if replacement.is_some() { "replaced" } else { disconnect_reason(reason.as_ref()) };
        metrics::counter!(PEER_DISCONNECTS_TOTAL, "reason" => label).increment(1);
        let reason = reason.map(|r| r.to_string());
        tracing::info!(reason = reason.as_deref().unwrap_or("replaced"), "peer disconnected");
        if let Some(r) = reason {
            self.shared.set_error(&peer, Some(r));
        }
        if started.elapsed() >= BACKOFF_MAX {
            self.backoff.reset();
        } else {
            // A connection that keeps dying young is retried with backoff, not in a loop.
            self.delay = Some(self.backoff.fail());
        }
        replacement
    }

    /// Holds `conn` until it closes, shutdown, or the peer reconnects (the new connection is
    /// returned); a dialed connection counts as up once the acceptor confirmed it.
    async fn hold(&mut self, conn: &quinn::Connection) -> Option<quinn::Connection> {
        let accepting = self.dial.is_none();
        loop {
            let confirming = !self.up;
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = conn.closed() => return None,
                new = self.accepted.recv(), if accepting => return new,
                _ = handshake_confirmed(conn), if confirming => self.mark_up(conn),
            }
        }
    }

    /// The connection works: publish it for data streams and the control channel.
    fn mark_up(&mut self, conn: &quinn::Connection) {
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
        self.shared.set_error(&peer, None);
        if let Some(tx) = self.shared.watches.get(&peer) {
            tx.send_replace(Some(PeerConnection { peer, conn: conn.clone() }));
        }
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
