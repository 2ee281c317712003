//! One peer's session: follows the transport's connection to the peer, watches the peer's
//! exports on each connection (resyncing with backoff after an error), and holds them under
//! a lease that runs across connections.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics::{PEER_LEASE_EXPIRIES_TOTAL, PEER_SESSION_RESETS_TOTAL};
use super::{ControlLink, SessionSettings, Shared};
use crate::exchange::{PeerEvent, WatchSettings, watch_peer};
use crate::model::{ClusterId, ExportSet, PeerUpdate};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

type Links<L> = Option<BoxStream<'static, Option<L>>>;

pub(super) struct Session<L: ControlLink> {
    peer: ClusterId,
    watch: WatchSettings,
    lease: Duration,
    /// The transport's connections to the peer; `None` once that stream ended.
    links: Links<L>,
    updates: mpsc::Sender<PeerUpdate>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    exports: Option<Arc<ExportSet>>,
    last_seen: Option<Instant>,
    withdrawn: bool,
    draining: bool,
}

enum Step<L, T> {
    Stop,
    Link(Option<L>),
    LeaseExpired,
    Done(T),
}

impl<L: ControlLink> Session<L> {
    pub fn new(
        peer: ClusterId,
        settings: &SessionSettings,
        links: BoxStream<'static, Option<L>>,
        updates: mpsc::Sender<PeerUpdate>,
        shared: Arc<Shared>,
        shutdown: CancellationToken,
    ) -> Self {
        let watch = WatchSettings {
            local: settings.local.clone(),
            peer: peer.clone(),
            heartbeat_interval: settings.heartbeat_interval(),
        };
        Self {
            peer,
            watch,
            lease: settings.peer_lease_duration,
            links: Some(links),
            updates,
            shared,
            shutdown,
            exports: None,
            last_seen: None,
            withdrawn: false,
            draining: false,
        }
    }

    pub async fn run(mut self) {
        let mut link: Option<L> = None;
        loop {
            let current = match link.take().filter(|l| !l.is_closed()) {
                Some(current) => current,
                None => {
                    // No connection: wait for one, minding the lease and shutdown.
                    let deadline = self.lease_deadline();
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = sleep_opt(deadline) => self.expire_lease().await,
                        new = next_link(&mut self.links) => {
                            link = new;
                            // The transport's view changed: publish it with the session's.
                            self.shared.state.publish();
                        }
                    }
                    continue;
                }
            };
            self.mark_up().await;
            link = self.exchange(&current).await;
            self.mark_down().await;
            if self.shutdown.is_cancelled() {
                return;
            }
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

    /// The transport has a working connection: tell the import set.
    async fn mark_up(&mut self) {
        self.shared.state.update(&self.peer, |e| e.last_error = None);
        self.emit(PeerUpdate::Reachability {
            cluster: self.peer.clone(),
            reachable: true,
            draining: self.draining,
        })
        .await;
    }

    /// The connection ended (or was replaced): the peer is unreachable until the next one.
    async fn mark_down(&mut self) {
        self.draining = false;
        self.shared.state.update(&self.peer, |e| {
            e.draining = false;
            e.last_error = None;
        });
        self.emit(PeerUpdate::Reachability {
            cluster: self.peer.clone(),
            reachable: false,
            draining: false,
        })
        .await;
    }

    /// Runs the watch of the peer's exports on `link`, re-watching (full resync) after a
    /// session error, until the connection ends, shutdown, or another connection replaces it
    /// (returned, to be served next).
    async fn exchange(&mut self, link: &L) -> Option<L> {
        let mut retry = Backoff::default();
        loop {
            let channel = match link.channel().await {
                Ok(channel) => Some(channel),
                Err(e) => {
                    tracing::debug!(error = %e, "opening the control channel failed");
                    None
                }
            };
            if let Some(channel) = channel {
                let mut events = watch_peer(channel, self.watch.clone(), self.exports.clone());
                loop {
                    match self.wait(link, events.next()).await {
                        Err(next) => return next,
                        Ok(Some(Ok(ev))) => {
                            retry.reset();
                            self.on_event(ev).await;
                        }
                        Ok(Some(Err(e))) => {
                            metrics::counter!(PEER_SESSION_RESETS_TOTAL, "reason" => e.reason())
                                .increment(1);
                            if !link.is_closed() {
                                tracing::warn!(error = %e, "export session reset; resyncing");
                                self.shared.state.update(&self.peer, |entry| {
                                    entry.last_error = Some(e.to_string())
                                });
                            }
                            break;
                        }
                        Ok(None) => break,
                    }
                }
            }
            // Wait before re-watching, still minding the connection, the lease and shutdown.
            if let Err(next) = self.wait(link, tokio::time::sleep(retry.fail())).await {
                return next;
            }
        }
    }

    /// Waits for `work` while minding what every wait of the session minds: shutdown, the
    /// connection closing or being replaced, and the lease (expired here, and the wait goes
    /// on). `Err` carries what [`Self::exchange`] returns: the connection to serve next, if
    /// any.
    async fn wait<T>(&mut self, link: &L, work: impl Future<Output = T>) -> Result<T, Option<L>> {
        tokio::pin!(work);
        loop {
            let deadline = self.lease_deadline();
            let step = tokio::select! {
                _ = self.shutdown.cancelled() => Step::Stop,
                _ = link.closed() => Step::Stop,
                new = next_link(&mut self.links) => Step::Link(new),
                _ = sleep_opt(deadline) => Step::LeaseExpired,
                out = &mut work => Step::Done(out),
            };
            match step {
                Step::Stop | Step::Link(None) => return Err(None),
                Step::Link(Some(new)) if !new.same(link) => return Err(Some(new)),
                Step::Link(Some(_)) => {}
                Step::LeaseExpired => self.expire_lease().await,
                Step::Done(out) => return Ok(out),
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
                cluster: self.peer.clone(),
                reachable: true,
                draining,
            })
            .await;
        }
        let version = self.exports.as_ref().map(|s| s.version);
        self.shared.state.update(&self.peer, |e| {
            e.last_seen = Some(now);
            e.draining = draining;
            e.exports_version = version;
            e.exports_withdrawn = false;
        });
    }
}

/// The next state of the transport's connection; never resolves once the transport stopped
/// reporting (the session then waits for shutdown, still minding the lease).
async fn next_link<L>(links: &mut Links<L>) -> Option<L> {
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
