//! The data plane's view of the peers: [`PeerTunnel`] implements [`Tunnel`] over the tunnel's
//! `PeerHandle` (data streams, connections) and discovery's `PeersHandle` (draining, status),
//! and [`forward_incoming`] turns the tunnel's `IncomingStream`s into the acceptor's input.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use fedgate_discovery::model::{ClusterId, PeerStatus};
use fedgate_discovery::peers::PeersHandle;
use fedgate_tunnel::{IncomingStream, PeerHandle};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use super::{BoxRecv, BoxSend, Incoming, Tunnel, metrics};

/// [`Tunnel`] over the QUIC endpoint's `PeerHandle` and the peer sessions' `PeersHandle`.
pub struct PeerTunnel {
    handle: PeerHandle,
    sessions: PeersHandle,
    status: watch::Receiver<Arc<Vec<PeerStatus>>>,
}

impl PeerTunnel {
    /// Wraps `handle` and `sessions`, and keeps the peer gauges (`fedgate_peer_up`,
    /// `fedgate_peer_rtt_seconds`, `fedgate_peer_path_mtu_bytes`,
    /// `fedgate_peer_send_window_bytes`) in step with the sessions'
    /// status until they are gone. Needs a Tokio runtime.
    pub fn new(handle: PeerHandle, sessions: PeersHandle) -> Arc<Self> {
        let status = sessions.status();
        tokio::spawn(record_peer_gauges(status.clone()));
        Arc::new(Self { handle, sessions, status })
    }
}

/// What the peer gauges show for one peer. Up means connected and not draining, as for
/// [`Tunnel::is_connected`]; RTT, path MTU and send window only while connected (the send
/// window: every connected replica's lanes together).
#[derive(Debug, PartialEq)]
struct PeerGauge<'a> {
    peer: &'a str,
    up: bool,
    rtt: Option<Duration>,
    path_mtu: Option<u16>,
    send_window: Option<u64>,
}

fn peer_gauges(status: &[PeerStatus]) -> Vec<PeerGauge<'_>> {
    status
        .iter()
        .map(|s| PeerGauge {
            peer: s.cluster.as_str(),
            up: s.connected && !s.draining,
            rtt: s
                .rtt_ms
                .filter(|ms| s.connected && ms.is_finite() && *ms >= 0.0)
                .map(|ms| Duration::from_secs_f64(ms / 1000.0)),
            path_mtu: s.path_mtu.filter(|_| s.connected),
            send_window: s
                .replicas
                .iter()
                .filter(|r| r.connected)
                .filter_map(|r| r.send_window_bytes)
                .reduce(u64::saturating_add)
                .filter(|_| s.connected),
        })
        .collect()
}

/// Sets the peer gauges on every status update (the sessions republish RTTs periodically);
/// ends when the sessions drop their status sender.
async fn record_peer_gauges(mut status: watch::Receiver<Arc<Vec<PeerStatus>>>) {
    let mut replicas_seen = BTreeSet::new();
    loop {
        let current = status.borrow_and_update().clone();
        for g in peer_gauges(&current) {
            metrics::set_peer(g.peer, g.up, g.rtt, g.path_mtu, g.send_window);
        }
        record_replicas(&current, &mut replicas_seen);
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Sets each replica's gauges; a replica no longer listed (its address gone) is shown down.
fn record_replicas(status: &[PeerStatus], seen: &mut BTreeSet<(String, String)>) {
    let mut now = BTreeSet::new();
    for peer in status {
        metrics::set_peer_replicas_expected(peer.cluster.as_str(), peer.expected_replicas);
        for r in &peer.replicas {
            let age = r.last_seen_secs.filter(|s| s.is_finite() && *s >= 0.0);
            metrics::set_peer_replica(
                peer.cluster.as_str(),
                &r.address,
                r.connected,
                age.map(Duration::from_secs_f64),
            );
            now.insert((peer.cluster.to_string(), r.address.clone()));
        }
    }
    for (peer, replica) in seen.difference(&now) {
        metrics::set_peer_replica(peer, replica, false, None);
    }
    *seen = now;
}

impl Tunnel for PeerTunnel {
    fn open(&self, peer: &ClusterId) -> BoxFuture<'static, Result<(BoxSend, BoxRecv), String>> {
        let open = self.open_replica(peer);
        Box::pin(async move { open.await.map(|(s, r, _)| (s, r)) })
    }

    fn open_replica(
        &self,
        peer: &ClusterId,
    ) -> BoxFuture<'static, Result<(BoxSend, BoxRecv, usize), String>> {
        let handle = self.handle.clone();
        let peer = peer.clone();
        Box::pin(async move {
            let (send, recv, link) = handle.open_stream(&peer).await.map_err(|e| e.to_string())?;
            Ok((Box::new(send) as BoxSend, Box::new(recv) as BoxRecv, link))
        })
    }

    fn suspect(&self, peer: &ClusterId, link: usize) {
        self.handle.suspect(peer, link);
    }

    fn replicas(&self, peer: &ClusterId) -> usize {
        self.handle.replicas(peer)
    }

    fn set_draining(&self, draining: bool) {
        self.sessions.set_draining(draining);
    }

    /// Connected (any replica) and not announced draining (every connected replica). A
    /// cluster that is no configured peer cannot be reached.
    fn is_connected(&self, peer: &ClusterId) -> bool {
        self.handle.is_connected(peer)
            && !self.status.borrow().iter().any(|s| s.cluster == *peer && s.draining)
    }
}

/// Forwards the tunnel's incoming data streams to a receiver for `DataPlane::serve_tunnel`.
/// The forwarding task ends when either side is gone.
pub fn forward_incoming(mut streams: mpsc::Receiver<IncomingStream>) -> mpsc::Receiver<Incoming> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        while let Some(IncomingStream { peer, send, recv, runtime }) = streams.recv().await {
            let incoming = Incoming { peer, send: Box::new(send), recv: Box::new(recv), runtime };
            if tx.send(incoming).await.is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(cluster: &str, connected: bool, draining: bool, rtt_ms: Option<f64>) -> PeerStatus {
        PeerStatus {
            cluster: ClusterId::new(cluster).expect("valid cluster id"),
            address: "127.0.0.1:15443".to_owned(),
            connected,
            draining,
            rtt_ms,
            path_mtu: connected.then_some(1452),
            last_seen_secs: None,
            exports_version: None,
            exports_withdrawn: false,
            last_error: None,
            expected_replicas: 1,
            replicas: Vec::new(),
        }
    }

    #[test]
    fn peer_gauges_follow_connection_draining_and_rtt() {
        let cases = [
            ("up with rtt", status("west", true, false, Some(1.5)), true, Some(1_500_000)),
            ("up, no rtt yet", status("west", true, false, None), true, None),
            ("draining", status("west", true, true, Some(2.0)), false, Some(2_000_000)),
            ("down: stale rtt ignored", status("west", false, false, Some(3.0)), false, None),
            ("nonsense rtt", status("west", true, false, Some(f64::NAN)), true, None),
            ("negative rtt", status("west", true, false, Some(-1.0)), true, None),
        ];
        for (what, s, up, rtt_ns) in cases {
            let got = peer_gauges(std::slice::from_ref(&s));
            let want = vec![PeerGauge {
                peer: "west",
                up,
                rtt: rtt_ns.map(Duration::from_nanos),
                path_mtu: s.connected.then_some(1452),
                send_window: None,
            }];
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn the_send_window_gauge_adds_up_the_connected_replicas() {
        use fedgate_discovery::model::ReplicaStatus;
        let replica = |address: &str, connected: bool, window: Option<u64>| ReplicaStatus {
            address: address.to_owned(),
            connected,
            send_window_bytes: window,
            ..ReplicaStatus::default()
        };
        let mut s = status("west", true, false, Some(1.0));
        s.replicas = vec![
            replica("10.0.0.1:15443", true, Some(1 << 20)),
            replica("10.0.0.2:15443", true, Some(3 << 20)),
            // A replica that went away keeps no window.
            replica("10.0.0.3:15443", false, Some(8 << 20)),
            replica("10.0.0.4:15443", true, None),
        ];
        assert_eq!(peer_gauges(std::slice::from_ref(&s))[0].send_window, Some(4 << 20));
        s.connected = false;
        assert_eq!(peer_gauges(std::slice::from_ref(&s))[0].send_window, None);
    }
}
