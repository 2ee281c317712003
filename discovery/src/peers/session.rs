//! One peer's session: follows the transport's connections to the peer's replicas, watches
//! the exports on each (resyncing with backoff after an error), and holds the peer's exports
//! under a lease that runs across connections and replicas.
//!
//! The replicas of a cluster share its identity, and their exports are that cluster's
//! exports: the import set gets the newest version any connected replica sent (versions
//! compare across replicas, `exports::next_version`). When the replica that sent it goes, the
//! newest of the remaining replicas' sets is imported. The lease holds while any replica is
//! heard from; the peer is reachable while any replica is connected, and draining when every
//! connected replica announced it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics::{PEER_LEASE_EXPIRIES_TOTAL, PEER_SESSION_RESETS_TOTAL};
use super::status::ReplicaEntry;
use super::{ControlLink, SessionSettings, Shared};
use crate::exchange::{PeerEvent, WatchSettings, watch_peer};
use crate::model::{ClusterId, ExportSet, PeerUpdate};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

type Links<L> = Option<BoxStream<'static, Vec<L>>>;

/// What a replica's watch reports to its peer's session.
enum ReplicaEvent {
    Event(PeerEvent),
    /// The exchange on this connection was reset (it is resynced after a backoff).
    Reset(String),
}

/// One connected replica of the peer.
struct Replica<L> {
    link: L,
    /// Stops its watch.
    stop: CancellationToken,
    /// The export set it sent last.
    exports: Option<Arc<ExportSet>>,
    draining: bool,
    last_seen: Option<Instant>,
    instance: Option<String>,
}

pub(super) struct Session<L: ControlLink> {
    peer: ClusterId,
    watch: WatchSettings,
    lease: Duration,
    /// The transport's connections to the peer; `None` once that stream ended.
    links: Links<L>,
    updates: mpsc::Sender<PeerUpdate>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    replicas: BTreeMap<usize, Replica<L>>,
    events_tx: mpsc::Sender<(usize, ReplicaEvent)>,
    events: mpsc::Receiver<(usize, ReplicaEvent)>,
    /// The set the import set holds (the newest over the replicas).
    exports: Option<Arc<ExportSet>>,
    /// When any replica was last heard from.
    last_seen: Option<Instant>,
    withdrawn: bool,
    /// What the import set was told last: (reachable, draining).
    told: (bool, bool),
}

impl<L: ControlLink> Session<L> {
    pub fn new(
        peer: ClusterId,
        settings: &SessionSettings,
        links: BoxStream<'static, Vec<L>>,
        updates: mpsc::Sender<PeerUpdate>,
        shared: Arc<Shared>,
        shutdown: CancellationToken,
    ) -> Self {
        let watch = WatchSettings {
            local: settings.local.clone(),
            peer: peer.clone(),
            heartbeat_interval: settings.heartbeat_interval(),
        };
        let (events_tx, events) = mpsc::channel(64);
        Self {
            peer,
            watch,
            lease: settings.peer_lease_duration,
            links: Some(links),
            updates,
            shared,
            shutdown,
            replicas: BTreeMap::new(),
            events_tx,
            events,
            exports: None,
            last_seen: None,
            withdrawn: false,
            told: (false, false),
        }
    }

    pub async fn run(mut self) {
        loop {
            let deadline = self.lease_deadline();
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = sleep_opt(deadline) => self.expire_lease().await,
                links = next_links(&mut self.links) => self.on_links(links).await,
                Some((id, event)) = self.events.recv() => self.on_replica(id, event).await,
            }
        }
        for replica in self.replicas.values() {
            replica.stop.cancel();
        }
    }

    /// Sends `update` to the import set; gives up when shutting down (the reader may be gone
    /// or no longer reading). Borrows only what it needs: the session itself is not `Sync`.
    async fn emit(&mut self, update: PeerUpdate) {
        let (updates, shutdown) = (&self.updates, &self.shutdown);
        tokio::select! {
            _ = updates.send(update) => {}
            _ = shutdown.cancelled() => {}
        }
    }

    fn lease_deadline(&self) -> Option<Instant> {
        match (&self.exports, self.last_seen) {
            (Some(_), Some(seen)) if !self.withdrawn => Some(seen + self.lease),
            _ => None,
        }
    }

    async fn expire_lease(&mut self) {
        if self.withdrawn || self.exports.is_none() {
            return;
        }
        self.withdrawn = true;
        metrics::counter!(PEER_LEASE_EXPIRIES_TOTAL).increment(1);
        tracing::warn!(lease = ?self.lease, "peer silent past its lease; withdrawing its exports");
        self.emit(PeerUpdate::Withdrawn(self.peer.clone())).await;
        self.shared.state.update(&self.peer, |e| e.exports_withdrawn = true);
    }

    /// The transport's connections changed: watch new replicas, forget gone ones.
    async fn on_links(&mut self, links: Vec<L>) {
        let ids: Vec<usize> = links.iter().map(ControlLink::id).collect();
        let gone: Vec<usize> =
            self.replicas.keys().filter(|id| !ids.contains(id)).copied().collect();
        let mut lost_imported = false;
        for id in gone {
            if let Some(replica) = self.replicas.remove(&id) {
                replica.stop.cancel();
                tracing::info!(replica = %replica.link.remote(), "peer replica disconnected");
                lost_imported |= matches!(
                    (&replica.exports, &self.exports),
                    (Some(a), Some(b)) if Arc::ptr_eq(a, b)
                );
            }
        }
        for link in links.into_iter().filter(|l| !l.is_closed()) {
            let id = link.id();
            if self.replicas.contains_key(&id) {
                continue;
            }
            let stop = self.shutdown.child_token();
            tokio::spawn(watch_replica(
                link.clone(),
                self.watch.clone(),
                self.exports.clone(),
                self.events_tx.clone(),
                stop.clone(),
            ));
            let replica = Replica {
                link,
                stop,
                exports: None,
                draining: false,
                last_seen: None,
                instance: None,
            };
            self.replicas.insert(id, replica);
        }
        if lost_imported {
            // The replica whose set was imported is gone: the newest of the others', if any
            // sent one (else the set stays, under the lease).
            self.import_newest(None).await;
        }
        self.publish_replicas();
        self.tell_reachability().await;
    }

    async fn on_replica(&mut self, id: usize, event: ReplicaEvent) {
        let Some(replica) = self.replicas.get_mut(&id) else { return };
        let event = match event {
            ReplicaEvent::Event(event) => event,
            ReplicaEvent::Reset(error) => {
                self.shared.state.update(&self.peer, |e| {
                    if let Some(r) = e.replicas.get_mut(&replica.link.remote()) {
                        r.last_error = Some(error.clone());
                    }
                    e.last_error = Some(error);
                });
                return;
            }
        };
        let now = Instant::now();
        replica.last_seen = Some(now);
        self.last_seen = Some(now);
        let draining = event.draining();
        if draining != replica.draining {
            replica.draining = draining;
            replica.link.set_draining(draining);
            tracing::info!(replica = %replica.link.remote(), draining, "peer replica draining state changed");
        }
        match event {
            PeerEvent::Exports { set, instance, .. } => {
                tracing::debug!(
                    replica = %replica.link.remote(),
                    version = set.version,
                    services = set.services.len(),
                    "peer exports updated"
                );
                if instance.is_some() {
                    replica.instance = instance;
                }
                if replica.exports.is_none() {
                    replica.link.set_synced();
                }
                replica.exports = Some(set.clone());
                let newer = self.exports.as_ref().is_none_or(|held| set.version > held.version);
                if newer || self.withdrawn {
                    self.import_newest(Some(set)).await;
                }
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
        self.publish_replicas();
        self.tell_reachability().await;
    }

    /// Imports `set`, or the newest set of the connected replicas when `None` (nothing when
    /// none sent one).
    async fn import_newest(&mut self, set: Option<Arc<ExportSet>>) {
        let newest = set.or_else(|| {
            self.replicas.values().filter_map(|r| r.exports.clone()).max_by_key(|s| s.version)
        });
        let Some(set) = newest else { return };
        let same = self.exports.as_ref().is_some_and(|held| Arc::ptr_eq(held, &set));
        if same && !self.withdrawn {
            return;
        }
        self.exports = Some(set.clone());
        self.withdrawn = false;
        self.emit(PeerUpdate::Exports(set)).await;
    }

    /// Tells the import set when the peer became reachable or not, or draining or not: it is
    /// reachable while any replica is connected, draining when all connected replicas are.
    async fn tell_reachability(&mut self) {
        let reachable = !self.replicas.is_empty();
        let draining = reachable && self.replicas.values().all(|r| r.draining);
        if (reachable, draining) == self.told {
            return;
        }
        self.told = (reachable, draining);
        tracing::info!(
            reachable,
            draining,
            replicas = self.replicas.len(),
            "peer reachability changed"
        );
        self.emit(PeerUpdate::Reachability { cluster: self.peer.clone(), reachable, draining })
            .await;
    }

    /// Publishes what the session knows of the peer and each replica.
    fn publish_replicas(&self) {
        let replicas: BTreeMap<String, ReplicaEntry> = self
            .replicas
            .values()
            .map(|r| {
                let entry = ReplicaEntry {
                    instance: r.instance.clone(),
                    draining: r.draining,
                    last_seen: r.last_seen,
                    exports_version: r.exports.as_ref().map(|s| s.version),
                    last_error: None,
                };
                (r.link.remote(), entry)
            })
            .collect();
        let draining = !self.replicas.is_empty() && self.replicas.values().all(|r| r.draining);
        let version = self.exports.as_ref().map(|s| s.version);
        let (last_seen, withdrawn) = (self.last_seen, self.withdrawn);
        self.shared.state.update(&self.peer, |e| {
            // A replica's last reset stays shown until it is heard from again.
            let mut merged = replicas;
            for (address, entry) in merged.iter_mut() {
                if let Some(old) = e.replicas.get(address)
                    && old.last_seen == entry.last_seen
                {
                    entry.last_error = old.last_error.clone();
                }
            }
            e.replicas = merged;
            e.draining = draining;
            e.exports_version = version;
            e.exports_withdrawn = withdrawn;
            e.last_seen = last_seen;
            if e.replicas.values().all(|r| r.last_error.is_none()) {
                e.last_error = None;
            }
        });
    }
}

/// Watches the exports of one replica over `link`, re-watching (full resync) after an error
/// with backoff, until the connection ends or `stop`. Its events go to the peer's session.
async fn watch_replica<L: ControlLink>(
    link: L,
    settings: WatchSettings,
    mut previous: Option<Arc<ExportSet>>,
    events: mpsc::Sender<(usize, ReplicaEvent)>,
    stop: CancellationToken,
) {
    let id = link.id();
    let mut retry = Backoff::default();
    loop {
        let channel = tokio::select! {
            _ = stop.cancelled() => return,
            _ = link.closed() => return,
            channel = link.channel() => channel,
        };
        match channel {
            Ok(channel) => {
                let mut stream = watch_peer(channel, settings.clone(), previous.clone());
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = link.closed() => return,
                        next = stream.next() => next,
                    };
                    match next {
                        Some(Ok(event)) => {
                            retry.reset();
                            if let PeerEvent::Exports { set, .. } = &event {
                                previous = Some(set.clone());
                            }
                            if events.send((id, ReplicaEvent::Event(event))).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(e)) => {
                            metrics::counter!(PEER_SESSION_RESETS_TOTAL, "reason" => e.reason())
                                .increment(1);
                            if !link.is_closed() {
                                tracing::warn!(replica = %link.remote(), error = %e, "export session reset; resyncing");
                                let _ = events.send((id, ReplicaEvent::Reset(e.to_string()))).await;
                            }
                            break;
                        }
                        None => break,
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "opening the control channel failed"),
        }
        // Wait before re-watching, still minding the connection and stop.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = link.closed() => return,
            _ = tokio::time::sleep(retry.fail()) => {}
        }
    }
}

/// The next list of the transport's connections; never resolves once the transport stopped
/// reporting (the session then waits for shutdown, still minding the lease).
async fn next_links<L>(links: &mut Links<L>) -> Vec<L> {
    if let Some(stream) = links {
        if let Some(next) = stream.next().await {
            return next;
        }
        *links = None;
    }
    std::future::pending().await
}

async fn sleep_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff from 100 ms to 5 s between resyncs.
#[derive(Debug)]
pub(super) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The delay before the next attempt; doubles the one after.
    pub fn fail(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}
