//! The local export set: which of this cluster's services are exported, with the health its
//! checks observed stamped on their endpoints. One task owns it and publishes each real change
//! as a new `Arc<ExportSet>` with a higher version; peers and the import set read that.
//!
//! Updates are incremental: a new cluster state or health map is diffed against the previous
//! one by `Arc` pointer (services, exports) and by value (health entries), and only the
//! services that differ are rebuilt. Unchanged services keep their `Arc`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::mcs::{self, LocalExportsOutcome, Validity};
use crate::model::{
    ClusterId, ClusterState, ExportSet, ExportStatus, HealthMap, Locality, ServiceKey,
};

/// Validity of every local ServiceExport object, valid or not (the `Valid` condition).
pub type ValidityMap = BTreeMap<ServiceKey, Validity>;

/// `/debug/exports`: the conditions of each local ServiceExport (`Valid`, `Conflict`, ...), as
/// the import set last computed them. The shape is read by `fedgate status` and the end-to-end
/// tests.
pub fn statuses_json(statuses: &BTreeMap<ServiceKey, ExportStatus>) -> serde_json::Value {
    serde_json::Value::Array(
        statuses
            .values()
            .map(|s| {
                serde_json::json!({
                    "namespace": s.key.namespace,
                    "name": s.key.name,
                    "cluster": s.cluster,
                    "conditions": s.conditions,
                })
            })
            .collect(),
    )
}

/// The task that turns the local cluster state into the local export set.
pub struct LocalExports {
    cluster: ClusterId,
    state_rx: watch::Receiver<Arc<ClusterState>>,
    health_rx: watch::Receiver<Arc<HealthMap>>,
    exports_tx: watch::Sender<Arc<ExportSet>>,
    validity_tx: watch::Sender<Arc<ValidityMap>>,
    state: Arc<ClusterState>,
    health: Arc<HealthMap>,
    outcome: LocalExportsOutcome,
    /// The cluster source's first full sync ([`LocalExports::with_synced`]).
    synced_rx: watch::Receiver<bool>,
    /// True once the export set was computed from a synced cluster state.
    complete_tx: watch::Sender<bool>,
}

/// The version of a new export set after `previous`: the wall clock in milliseconds, or
/// `previous + 1` when the clock has not moved past it (a hybrid logical clock). So versions
/// grow across restarts, and the replicas of one cluster, which see the same changes, give
/// them versions that compare across replicas: the set with the higher version is the newer
/// one (docs/replicas.md), up to the replicas' clock skew.
pub fn next_version(previous: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2));
    now.max(previous + 1).max(1)
}

impl LocalExports {
    /// Builds the export set from the current values of both inputs at once, so subscribers
    /// see it before `run` starts. Versions follow [`next_version`].
    pub fn new(
        cluster: ClusterId,
        locality: Locality,
        mut state_rx: watch::Receiver<Arc<ClusterState>>,
        mut health_rx: watch::Receiver<Arc<HealthMap>>,
    ) -> Self {
        let state = Arc::clone(&state_rx.borrow_and_update());
        let health = Arc::clone(&health_rx.borrow_and_update());
        let outcome = mcs::compute_exports(&state, &cluster, &health, &BTreeMap::new());
        let version = next_version(0);
        let set = ExportSet {
            cluster: cluster.clone(),
            locality,
            version,
            services: outcome.services.clone(),
        };
        let (exports_tx, _) = watch::channel(Arc::new(set));
        let (validity_tx, _) = watch::channel(Arc::new(outcome.validity.clone()));
        LocalExports {
            cluster,
            state_rx,
            health_rx,
            exports_tx,
            validity_tx,
            state,
            health,
            outcome,
            synced_rx: watch::channel(true).1,
            complete_tx: watch::channel(true).0,
        }
    }

    /// The cluster source publishes its state before it has listed everything (`synced`
    /// false until then): the export set counts as complete ([`Self::complete`]) only once it
    /// was computed from a state published after the sync. Without this call, at once (the
    /// file source reads the whole directory before it publishes).
    pub fn with_synced(mut self, mut synced: watch::Receiver<bool>) -> Self {
        let complete = *synced.borrow_and_update() && !self.state_rx.has_changed().unwrap_or(false);
        self.complete_tx.send_replace(complete);
        self.synced_rx = synced;
        self
    }

    /// True once the export set reflects the cluster source's first full sync. Peers are
    /// served nothing before: a restarted replica's empty set would replace its sibling's
    /// full one (the newest version wins).
    pub fn complete(&self) -> watch::Receiver<bool> {
        self.complete_tx.subscribe()
    }

    /// The local export set, from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ExportSet>> {
        self.exports_tx.subscribe()
    }

    /// Validity of each local ServiceExport, from now on.
    pub fn subscribe_validity(&self) -> watch::Receiver<Arc<ValidityMap>> {
        self.validity_tx.subscribe()
    }

    /// Follows the inputs until `shutdown` is cancelled or the cluster source's sender is
    /// dropped. When the health sender goes first, the last health map stays in force.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut health_open = true;
        let mut synced_open = !*self.complete_tx.borrow();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = self.synced_rx.changed(), if synced_open => {
                    synced_open = changed.is_ok() && !*self.synced_rx.borrow_and_update();
                    self.note_complete();
                    continue;
                }
                changed = self.state_rx.changed() => {
                    if changed.is_err() {
                        tracing::debug!(cluster = %self.cluster, "cluster source closed, local exports stop");
                        return;
                    }
                }
                changed = self.health_rx.changed(), if health_open => {
                    if changed.is_err() {
                        health_open = false;
                        continue;
                    }
                }
            }
            let state = Arc::clone(&self.state_rx.borrow_and_update());
            let health = Arc::clone(&self.health_rx.borrow_and_update());
            self.apply(state, health);
            self.note_complete();
        }
    }

    /// Marks the set complete once the source has synced and its latest state is applied
    /// (the source publishes the state before it flags the sync).
    fn note_complete(&self) {
        if !*self.complete_tx.borrow()
            && *self.synced_rx.borrow()
            && !self.state_rx.has_changed().unwrap_or(false)
        {
            self.complete_tx.send_replace(true);
        }
    }

    /// Applies new inputs; publishes what changed. Returns whether the export set changed.
    fn apply(&mut self, state: Arc<ClusterState>, health: Arc<HealthMap>) -> bool {
        let dirty = mcs::changed_local_keys(&self.state, &state, &self.health, &health);
        self.state = state;
        self.health = health;
        if dirty.is_empty() {
            return false;
        }
        let prev = std::mem::take(&mut self.outcome);
        let before: Vec<_> = dirty.iter().map(|k| prev.services.get(k).cloned()).collect();
        let validity_before: Vec<_> = dirty.iter().map(|k| prev.validity.get(k).copied()).collect();
        self.outcome = mcs::update_exports(&self.state, &self.cluster, &self.health, prev, &dirty);
        let exports_changed =
            dirty.iter().zip(&before).any(|(k, old)| match (old, self.outcome.services.get(k)) {
                (None, None) => false,
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                _ => true,
            });
        let validity_changed = dirty
            .iter()
            .zip(&validity_before)
            .any(|(k, old)| self.outcome.validity.get(k).copied() != *old);
        if exports_changed {
            let services = self.outcome.services.clone();
            self.exports_tx.send_modify(|set| {
                let next = ExportSet {
                    cluster: set.cluster.clone(),
                    locality: set.locality.clone(),
                    version: next_version(set.version),
                    services,
                };
                tracing::debug!(
                    cluster = %next.cluster,
                    version = next.version,
                    services = next.services.len(),
                    changed = dirty.len(),
                    "local export set changed"
                );
                *set = Arc::new(next);
            });
        }
        if validity_changed {
            let validity = Arc::new(self.outcome.validity.clone());
            self.validity_tx.send_replace(validity);
        }
        exports_changed
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::Duration;

    use super::*;
    use crate::exchange::delta::testing::{self, eventually};
    use crate::model::{Health, LocalService, ServiceExportObject};

    fn service(name: &str, ips: &[&str]) -> Arc<LocalService> {
        Arc::new(testing::local_service(ServiceKey::new("ns", name), "10.96.0.1", ips))
    }

    fn export(name: &str) -> Arc<ServiceExportObject> {
        Arc::new(testing::export_object(
            ServiceKey::new("ns", name),
            jiff::Timestamp::UNIX_EPOCH,
            BTreeMap::new(),
        ))
    }

    #[test]
    fn versions_follow_the_clock_and_always_grow() {
        let now = next_version(0);
        assert!(now > 1_700_000_000_000, "the wall clock in ms: {now}");
        // Behind the clock: the clock; ahead of it (a faster replica, or many changes in one
        // millisecond): one more.
        assert!(next_version(now - 10_000) >= now);
        assert_eq!(next_version(now + 10_000), now + 10_001);
        assert_eq!(next_version(u64::MAX / 2), u64::MAX / 2 + 1);
    }

    #[tokio::test]
    async fn the_set_is_complete_once_computed_from_a_synced_source() {
        // A kube source publishes an empty state before it has listed everything.
        let (state_tx, state_rx) = watch::channel(Arc::new(ClusterState::default()));
        let (_health_tx, health_rx) = watch::channel(Arc::new(HealthMap::new()));
        let (synced_tx, synced_rx) = watch::channel(false);
        let task = LocalExports::new(
            ClusterId::new("east").unwrap(),
            Locality::default(),
            state_rx,
            health_rx,
        )
        .with_synced(synced_rx);
        let (mut complete, mut exports) = (task.complete(), task.subscribe());
        assert!(!*complete.borrow(), "not complete before the sync");
        let handle = tokio::spawn(task.run(CancellationToken::new()));
        // The source publishes the synced state, then flags the sync.
        let mut state = ClusterState::default();
        state.services.insert(ServiceKey::new("ns", "web"), service("web", &["10.0.0.1"]));
        state.exports.insert(ServiceKey::new("ns", "web"), export("web"));
        state_tx.send_replace(Arc::new(state));
        synced_tx.send_replace(true);
        eventually(&mut complete, "complete", |c| *c).await;
        assert_eq!(exports.borrow_and_update().services.len(), 1, "complete means the synced set");
        drop(state_tx);
        tokio::time::timeout(Duration::from_secs(5), handle).await.unwrap().unwrap();
        // Without a source that syncs later (the file source): complete at once.
        let (_s, state_rx) = watch::channel(Arc::new(ClusterState::default()));
        let (_h, health_rx) = watch::channel(Arc::new(HealthMap::new()));
        let file = LocalExports::new(
            ClusterId::new("east").unwrap(),
            Locality::default(),
            state_rx,
            health_rx,
        );
        assert!(*file.complete().borrow());
    }

    #[tokio::test]
    async fn follows_state_and_health_incrementally() {
        let mut state = ClusterState::default();
        for i in 0..100 {
            let name = format!("s{i}");
            state.services.insert(ServiceKey::new("ns", &name), service(&name, &["10.0.0.1"]));
            state.exports.insert(ServiceKey::new("ns", &name), export(&name));
        }
        state.exports.insert(ServiceKey::new("ns", "ghost"), export("ghost"));
        let (state_tx, state_rx) = watch::channel(Arc::new(state.clone()));
        let (health_tx, health_rx) = watch::channel(Arc::new(HealthMap::new()));
        let task = LocalExports::new(
            ClusterId::new("east").unwrap(),
            Locality { region: Some("r1".into()), ..Locality::default() },
            state_rx,
            health_rx,
        );
        let mut exports = task.subscribe();
        let mut validity = task.subscribe_validity();
        let first = Arc::clone(&exports.borrow_and_update());
        assert_eq!(first.services.len(), 100);
        assert_eq!(first.locality.region.as_deref(), Some("r1"));
        assert_eq!(
            validity.borrow_and_update().get(&ServiceKey::new("ns", "ghost")),
            Some(&Validity::NoService)
        );
        let handle = tokio::spawn(task.run(CancellationToken::new()));

        // one endpoint's health changes: one new Arc, everything else shared, a higher version
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let s7 = ServiceKey::new("ns", "s7");
        health_tx.send_replace(Arc::new(HealthMap::from([((s7.clone(), ip), Health::Healthy)])));
        eventually(&mut exports, "health stamped", |s| s.version > first.version).await;
        let second = Arc::clone(&exports.borrow_and_update());
        assert_eq!(second.services[&s7].endpoints[0].health, Health::Healthy);
        let shared =
            second.services.iter().filter(|(k, v)| Arc::ptr_eq(v, &first.services[*k])).count();
        assert_eq!(shared, 99);

        // a state that changes nothing exported publishes nothing
        let mut same = state.clone();
        same.services.insert(ServiceKey::new("ns", "unexported"), service("unexported", &[]));
        state_tx.send_replace(Arc::new(same.clone()));
        // the ghost's Service appears: it becomes valid and exported
        same.services.insert(ServiceKey::new("ns", "ghost"), service("ghost", &["10.0.0.9"]));
        state_tx.send_replace(Arc::new(same));
        eventually(&mut exports, "ghost exported", |s| s.services.len() == 101).await;
        assert!(exports.borrow().version > second.version);
        eventually(&mut validity, "ghost valid", |v| {
            v.get(&ServiceKey::new("ns", "ghost")) == Some(&Validity::Valid)
        })
        .await;

        drop(state_tx);
        tokio::time::timeout(Duration::from_secs(5), handle).await.unwrap().unwrap();
    }
}
