//! The task that owns the import set: follows the local exports, their validity and the peer
//! updates, and publishes snapshots, statuses and problems.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::metrics::{METRIC_IMPORT_UPDATES, METRIC_IMPORTED_SERVICES, record_range};
use super::{
    AllocReport, Changed, DEFAULT_RESTORE_GRACE, ImportState, Pins, PinsOutsideRange, StatusMap,
};
use crate::alloc::Allocator;
use crate::exports::ValidityMap;
use crate::model::{ClusterId, ExportSet, ImportSnapshot, PeerUpdate};

/// Peer updates applied in one batch before a snapshot is published.
const MAX_BATCH: usize = 256;

/// The task that owns the import set.
pub struct ImportSet {
    pub(super) state: ImportState,
    local_rx: watch::Receiver<Arc<ExportSet>>,
    validity_rx: watch::Receiver<Arc<ValidityMap>>,
    peers_rx: mpsc::Receiver<PeerUpdate>,
    snapshot_tx: watch::Sender<Arc<ImportSnapshot>>,
    status_tx: watch::Sender<Arc<StatusMap>>,
    problems_tx: watch::Sender<Arc<AllocReport>>,
    restore_grace: Duration,
    /// The published ClusterSetIPs (none until read), when there is a writer.
    pins_rx: Option<watch::Receiver<Option<Arc<Pins>>>>,
    /// True once the first published ClusterSetIPs are in a published snapshot.
    pins_applied: watch::Sender<bool>,
    /// The longest the start-up batch waits for peers' first export sets.
    startup_bound: Duration,
    /// What the first complete snapshot waits for ([`ImportSet::with_completion`]).
    completion: Option<Completion>,
    /// True once a published snapshot is complete ([`ImportSet::subscribe_complete`]).
    complete_tx: watch::Sender<bool>,
}

/// The inputs of a complete snapshot: the local export set after the cluster source's first
/// sync, the first export set of every peer (or the bound passed), the published
/// ClusterSetIPs when there is a writer, and the start-up batch allocated.
struct Completion {
    local: watch::Receiver<bool>,
    awaiting: BTreeSet<ClusterId>,
    bound: Duration,
}

impl ImportSet {
    /// Builds the first snapshot from the current local export set and validity, so
    /// subscribers see the local services before `run` starts.
    pub fn new(
        local: ClusterId,
        mut local_rx: watch::Receiver<Arc<ExportSet>>,
        mut validity_rx: watch::Receiver<Arc<ValidityMap>>,
        peers_rx: mpsc::Receiver<PeerUpdate>,
        alloc: Allocator,
    ) -> Self {
        let mut state = ImportState::new(local, alloc);
        let set = Arc::clone(&local_rx.borrow_and_update());
        let validity = Arc::clone(&validity_rx.borrow_and_update());
        state.set_validity(validity);
        state.set_exports(set);
        state.persist();
        let (snapshot_tx, _) = watch::channel(Arc::new(state.snapshot()));
        let (status_tx, _) = watch::channel(state.shared_statuses());
        metrics::gauge!(METRIC_IMPORTED_SERVICES).set(state.services().len() as f64);
        let report = state.alloc_report();
        record_range(&report);
        let (problems_tx, _) = watch::channel(Arc::new(report));
        ImportSet {
            state,
            local_rx,
            validity_rx,
            peers_rx,
            snapshot_tx,
            status_tx,
            problems_tx,
            restore_grace: DEFAULT_RESTORE_GRACE,
            pins_rx: None,
            pins_applied: watch::channel(false).0,
            startup_bound: Duration::ZERO,
            completion: None,
            complete_tx: watch::channel(true).0,
        }
    }

    /// Imports take the ClusterSetIPs the cluster's writer published (`pins`, none until
    /// they have been read; see [`Pins`]); `outside` says what an address outside the range
    /// means.
    pub fn with_pins(
        mut self,
        pins: watch::Receiver<Option<Arc<Pins>>>,
        outside: PinsOutsideRange,
    ) -> Self {
        self.state.set_pins_outside_range(outside);
        self.pins_rx = Some(pins);
        self
    }

    /// Clusters in flat network mode (`traffic.network: flat`, `peers[].network`): their
    /// endpoints get no VIPs, and the snapshot names them for DNS and the data plane.
    pub fn with_flat(mut self, flat: BTreeSet<ClusterId>) -> Self {
        self.state.set_flat(flat);
        self.snapshot_tx.send_replace(Arc::new(self.state.snapshot()));
        self
    }

    /// True once the first published ClusterSetIPs are in a published snapshot (the writer
    /// waits for it before it writes: it must not publish other addresses first).
    pub fn subscribe_pins_applied(&self) -> watch::Receiver<bool> {
        self.pins_applied.subscribe()
    }

    /// Without a writer (file mode): imports get no new address until each of `peers` has
    /// sent its first export set, or `bound` passed since `run` started (the readiness bound
    /// of `peers`); then the whole first batch is allocated in key order, so replicas started
    /// with the same inputs agree on every ClusterSetIP, collisions included
    /// (docs/replicas.md). Imports wait without an address meantime, as for a full range. The
    /// local services `new` found are allocated already (in key order, on every replica).
    pub fn with_startup_hold(
        mut self,
        peers: impl IntoIterator<Item = ClusterId>,
        bound: Duration,
    ) -> Self {
        self.state.hold_for_peers(peers);
        self.startup_bound = bound;
        if self.state.is_starting() && !self.state.allocator().persists() {
            tracing::warn!(
                "front.stateDir is not set: clusterset ips are allocated afresh at every start. \
                 If this cluster runs several replicas, a restarted one may give two imports \
                 whose hash slots collide each other's address, unlike the replicas that kept \
                 running; set front.stateDir (docs/replicas.md)"
            );
        }
        self
    }

    /// The snapshot counts as complete ([`Self::subscribe_complete`]) only once it holds the
    /// local exports after the cluster source's first sync (`local_complete`,
    /// `LocalExports::complete`), the first export set of each of `peers` (or `bound` passed
    /// since `run` started), the writer's ClusterSetIPs (with [`Self::with_pins`]) and the
    /// start-up batch ([`Self::with_startup_hold`]). Without this call, at once.
    pub fn with_completion(
        mut self,
        local_complete: watch::Receiver<bool>,
        peers: impl IntoIterator<Item = ClusterId>,
        bound: Duration,
    ) -> Self {
        let local = self.state.local.clone();
        let awaiting = peers.into_iter().filter(|p| *p != local).collect();
        self.completion = Some(Completion { local: local_complete, awaiting, bound });
        self.complete_tx.send_replace(false);
        self
    }

    /// True once a published snapshot is complete (see [`Self::with_completion`]): until
    /// then a name missing from it may only be late, and the DNS server answers SERVFAIL
    /// rather than NXDOMAIN (a restarted replica sends clients to its siblings, not away).
    pub fn subscribe_complete(&self) -> watch::Receiver<bool> {
        self.complete_tx.subscribe()
    }

    /// How long IPs restored from the state file stay reserved for imports not seen again.
    pub fn with_restore_grace(mut self, grace: Duration) -> Self {
        self.restore_grace = grace;
        self
    }

    /// How long the addresses of imports withdrawn with their cluster (lease expired) stay
    /// reserved for them ([`super::DEFAULT_WITHDRAWN_GRACE`]).
    pub fn with_withdrawn_grace(mut self, grace: Duration) -> Self {
        self.state.set_withdrawn_grace(grace);
        self
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ImportSnapshot>> {
        self.snapshot_tx.subscribe()
    }

    /// The ClusterSetIP range and the imports waiting for an address (`/debug/problems`).
    pub fn subscribe_problems(&self) -> watch::Receiver<Arc<AllocReport>> {
        self.problems_tx.subscribe()
    }

    /// Conditions of the local ServiceExports.
    pub fn subscribe_status(&self) -> watch::Receiver<Arc<StatusMap>> {
        self.status_tx.subscribe()
    }

    /// Serves until `shutdown` is cancelled or the local export set's sender is dropped. When
    /// the peer channel closes, the local exports are still followed.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let grace = tokio::time::sleep(self.restore_grace);
        tokio::pin!(grace);
        let startup = tokio::time::sleep(self.startup_bound);
        tokio::pin!(startup);
        let mut swept = false;
        let mut peers_open = true;
        let mut validity_open = true;
        let mut pins_rx = self.pins_rx.take();
        if let Some(rx) = &mut pins_rx {
            rx.mark_changed();
        }
        let has_pins = pins_rx.is_some();
        let mut local_complete = self.completion.as_ref().map(|c| c.local.clone());
        let completion_bound =
            tokio::time::sleep(self.completion.as_ref().map_or(Duration::ZERO, |c| c.bound));
        tokio::pin!(completion_bound);
        let mut bound_passed = false;
        loop {
            // After every publish: is the snapshot complete now?
            self.note_complete(has_pins, bound_passed);
            let expiry = self.state.next_reservation_expiry();
            // What changed, and how many updates changed the snapshot.
            let (changed, updates) = tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.local_rx.changed() => {
                    if r.is_err() {
                        tracing::debug!("local export set closed, import set stops");
                        return;
                    }
                    let set = Arc::clone(&self.local_rx.borrow_and_update());
                    let changed = self.state.set_exports(set);
                    (changed, u64::from(changed.snapshot))
                }
                r = self.validity_rx.changed(), if validity_open => {
                    if r.is_err() {
                        validity_open = false;
                        continue;
                    }
                    let v = Arc::clone(&self.validity_rx.borrow_and_update());
                    (self.state.set_validity(v), 0)
                }
                update = self.peers_rx.recv(), if peers_open => {
                    let Some(update) = update else {
                        peers_open = false;
                        continue;
                    };
                    // One batch: its new keys are allocated together, in key order.
                    let rx = &mut self.peers_rx;
                    let more = std::iter::from_fn(|| rx.try_recv().ok());
                    let completion = &mut self.completion;
                    let batch = std::iter::once(update).chain(more).take(MAX_BATCH).inspect(|u| {
                        if let (PeerUpdate::Exports(set), Some(c)) = (u, completion.as_mut()) {
                            c.awaiting.remove(&set.cluster);
                        }
                    });
                    self.state.apply_peers(batch)
                }
                r = crate::flag_changed(&mut local_complete) => {
                    if r.is_err() {
                        local_complete = None;
                    }
                    continue;
                }
                () = &mut completion_bound, if !bound_passed && !*self.complete_tx.borrow() => {
                    bound_passed = true;
                    continue;
                }
                () = &mut startup, if self.state.is_starting() => {
                    (self.state.end_startup(), 0)
                }
                () = &mut grace, if !swept => {
                    swept = true;
                    // Freed addresses go to waiting imports at once.
                    (self.state.release_unused(), 0)
                }
                () = sleep_until(expiry) => {
                    (self.state.expire_reservations(std::time::Instant::now()), 0)
                }
                r = changed_pins(&mut pins_rx) => {
                    let Ok(Some(pins)) = r else {
                        if r.is_err() {
                            pins_rx = None;
                        }
                        continue;
                    };
                    let changed = self.state.set_pins(&pins);
                    self.publish(changed, u64::from(changed.snapshot));
                    self.pins_applied.send_if_modified(|applied| !std::mem::replace(applied, true));
                    continue;
                }
            };
            self.publish(changed, updates);
        }
    }

    /// Flags the snapshot complete once every input of [`Completion`] is in (never back).
    fn note_complete(&mut self, has_pins: bool, bound_passed: bool) {
        if *self.complete_tx.borrow() {
            return;
        }
        let Some(c) = &self.completion else { return };
        // The local set is in once the flag is up and no newer set waits to be applied.
        let local = *c.local.borrow() && !self.local_rx.has_changed().unwrap_or(false);
        let peers = c.awaiting.is_empty() || bound_passed;
        let pins = !has_pins || *self.pins_applied.borrow();
        if local && peers && pins && !self.state.is_starting() {
            if !c.awaiting.is_empty() {
                let missing: Vec<String> = c.awaiting.iter().map(ToString::to_string).collect();
                tracing::info!(missing = %missing.join(", "), bound = ?c.bound,
                    "import set complete without these peers' first exports");
            } else {
                tracing::debug!("import set complete");
            }
            self.complete_tx.send_replace(true);
        }
    }

    pub(super) fn publish(&mut self, changed: Changed, updates: u64) {
        self.state.persist();
        if changed.snapshot {
            let snapshot = self.state.snapshot();
            tracing::debug!(
                version = snapshot.version,
                services = snapshot.services.len(),
                "import snapshot"
            );
            metrics::gauge!(METRIC_IMPORTED_SERVICES).set(snapshot.services.len() as f64);
            metrics::counter!(METRIC_IMPORT_UPDATES).increment(updates);
            self.snapshot_tx.send_replace(Arc::new(snapshot));
        }
        if changed.statuses {
            self.status_tx.send_replace(self.state.shared_statuses());
        }
        let report = self.state.alloc_report();
        if **self.problems_tx.borrow() != report {
            record_range(&report);
            self.problems_tx.send_replace(Arc::new(report));
        }
    }
}

/// The next published ClusterSetIPs (`Ok(None)`: not read yet); forever without a writer.
async fn changed_pins(
    rx: &mut Option<watch::Receiver<Option<Arc<Pins>>>>,
) -> Result<Option<Arc<Pins>>, watch::error::RecvError> {
    match rx {
        Some(rx) => {
            rx.changed().await?;
            Ok(rx.borrow_and_update().clone())
        }
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}
