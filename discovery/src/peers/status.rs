//! Each peer's status as the sessions keep it, merged with the transport's view into the
//! [`PeerStatus`] list that `/debug/peers`, the dashboard and the peer gauges read.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;
use tokio::time::Instant;

use super::TransportStatus;
use crate::model::{ClusterId, PeerStatus, ReplicaStatus};

/// The transport's view of a peer, asked for at each publish (rtt changes without events).
pub(super) type TransportFn = Box<dyn Fn(&ClusterId) -> TransportStatus + Send + Sync>;

/// What a session knows of its peer.
#[derive(Clone, Debug, Default)]
pub(super) struct Entry {
    /// Every connected replica announced draining.
    pub draining: bool,
    /// Version of the export set imported (the newest over the replicas).
    pub exports_version: Option<u64>,
    pub exports_withdrawn: bool,
    /// When we last heard from any replica (the lease runs from then).
    pub last_seen: Option<Instant>,
    /// Why a replica's session was last reset.
    pub last_error: Option<String>,
    /// What the session knows of each connected replica, by address.
    pub replicas: BTreeMap<String, ReplicaEntry>,
}

/// What a session knows of one replica of its peer.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct ReplicaEntry {
    pub instance: Option<String>,
    pub draining: bool,
    pub last_seen: Option<Instant>,
    pub exports_version: Option<u64>,
    pub last_error: Option<String>,
}

pub(super) struct State {
    entries: Mutex<BTreeMap<ClusterId, Entry>>,
    transport: TransportFn,
    status_tx: watch::Sender<Arc<Vec<PeerStatus>>>,
}

impl State {
    pub fn new(peers: impl IntoIterator<Item = ClusterId>, transport: TransportFn) -> Self {
        let entries = peers.into_iter().map(|p| (p, Entry::default())).collect();
        let (status_tx, _) = watch::channel(Arc::new(Vec::new()));
        let state = Self { entries: Mutex::new(entries), transport, status_tx };
        state.publish();
        state
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<PeerStatus>>> {
        self.status_tx.subscribe()
    }

    pub fn current(&self) -> Arc<Vec<PeerStatus>> {
        self.status_tx.borrow().clone()
    }

    /// Changes `peer`'s entry and publishes.
    pub fn update(&self, peer: &ClusterId, f: impl FnOnce(&mut Entry)) {
        {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = entries.get_mut(peer) {
                f(entry);
            }
        }
        self.publish();
    }

    /// Publishes the statuses, with the transport's view and the time since last seen
    /// computed now.
    pub fn publish(&self) {
        let now = Instant::now();
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let list: Vec<PeerStatus> =
            entries.iter().map(|(id, e)| merge(id, e, (self.transport)(id), now)).collect();
        self.status_tx.send_replace(Arc::new(list));
    }

    /// `/debug/peers`, merged now: the transport's view changes without telling the sessions
    /// (a connection it dropped may still be in the last published list for up to a second).
    pub fn debug_view(&self) -> serde_json::Value {
        self.publish();
        serde_json::to_value(&**self.status_tx.borrow()).unwrap_or(serde_json::Value::Null)
    }
}

/// One peer's status from the session's entry and the transport's view, replica by replica
/// (joined on the address). A session error (a reset exchange) is more telling than the
/// transport's last one, which it follows. Pure.
pub(super) fn merge(
    cluster: &ClusterId,
    entry: &Entry,
    transport: TransportStatus,
    now: Instant,
) -> PeerStatus {
    let ago = |t: Option<Instant>| t.map(|t| now.duration_since(t).as_secs_f64());
    let replicas = transport
        .replicas
        .into_iter()
        .map(|r| {
            let session = entry.replicas.get(&r.address).filter(|_| r.connected);
            let session = session.cloned().unwrap_or_default();
            ReplicaStatus {
                address: r.address,
                instance: session.instance,
                connected: r.connected,
                direction: r.direction,
                draining: session.draining,
                rtt_ms: r.rtt_ms,
                path_mtu: r.path_mtu,
                connected_secs: r.connected_secs,
                lanes: r.lanes,
                send_window_bytes: r.send_window_bytes,
                last_seen_secs: ago(session.last_seen),
                exports_version: session.exports_version,
                last_error: session.last_error.or(r.last_error),
            }
        })
        .collect();
    PeerStatus {
        cluster: cluster.clone(),
        address: transport.address,
        connected: transport.connected,
        draining: entry.draining,
        rtt_ms: transport.rtt_ms,
        path_mtu: transport.path_mtu,
        last_seen_secs: ago(entry.last_seen),
        exports_version: entry.exports_version,
        exports_withdrawn: entry.exports_withdrawn,
        last_error: entry.last_error.clone().or(transport.last_error),
        expected_replicas: transport.expected_replicas,
        replicas,
    }
}
