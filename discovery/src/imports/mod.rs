//! The import set: every cluster's exports (the local one and the peers') merged into one
//! import per service, with ClusterSetIPs and headless endpoint VIPs allocated, published as an
//! immutable [`ImportSnapshot`] for DNS and the data plane, plus the conditions of the local
//! ServiceExports.
//!
//! ClusterSetIPs (rules in docs/mcs-semantics.md): an import whose cluster's lease expired
//! keeps its address *reserved* for [`DEFAULT_WITHDRAWN_GRACE`], so it gets the same one back
//! when the cluster returns; imports that find the range full wait in line and are served as
//! soon as an address frees ([`ImportState`] picks up what the allocator granted after every
//! update); waiting imports are reported ([`AllocReport`], a condition on the local
//! ServiceExport, the metrics) and logged once per update, not once per object.
//!
//! New addresses are allocated at the end of each batch of updates, in key order, so that
//! replicas agree whatever order updates reach them in (`batch.rs`, docs/replicas.md).
//!
//! Incremental: an export set that arrives is diffed against the one held for its cluster by
//! `Arc::ptr_eq` per service, and only those services are merged again. An import that merges
//! to the same value keeps its `Arc`, so consumers that diff by pointer skip it too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::alloc::{AllocKey, Allocator};
use crate::exports::ValidityMap;
use crate::mcs;
use crate::model::{
    ClusterId, Condition, ConditionStatus, EndpointVip, ExportSet, ExportStatus, ExportedService,
    ImportSnapshot, ImportedService, Locality, PeerUpdate, ServiceKey, ServiceType,
};

mod batch;
mod metrics;
mod problems;
mod task;
mod view;

pub use metrics::{
    METRIC_ADDRESSES, METRIC_IMPORT_UPDATES, METRIC_IMPORTED_SERVICES, METRIC_UNALLOCATED_SERVICES,
    describe_metrics,
};
pub use problems::{AllocReport, MAX_LISTED};
pub use task::ImportSet;
pub use view::{Query, exports_view, import_json, imports_json, imports_view};

/// How long IPs restored from the state file stay reserved for imports that have not come back
/// yet (peers reconnecting after a restart), before they are released.
pub const DEFAULT_RESTORE_GRACE: Duration = Duration::from_secs(300);

/// How long the addresses of imports withdrawn with their cluster (its lease expired) stay
/// reserved for them: the cluster coming back within this gets the same ClusterSetIPs.
pub const DEFAULT_WITHDRAWN_GRACE: Duration = Duration::from_secs(600);

/// Condition on a local ServiceExport whose import waits for a ClusterSetIP (present only then).
pub const CONDITION_CLUSTERSET_IP: &str = "fedgate.io/ClusterSetIPAllocated";
/// Its reason.
pub const REASON_RANGE_FULL: &str = "RangeExhausted";

/// How many waiting keys one log line names.
const LOGGED_NAMES: usize = 5;

/// Conditions of the local ServiceExports, by service.
pub type StatusMap = BTreeMap<ServiceKey, ExportStatus>;

/// ClusterSetIPs the cluster's writer already published, by import (the ServiceImports'
/// `spec.ips`, read back by `kube::observed`): every replica serves these, and only imports
/// without one are allocated (issue 19, docs/replicas.md).
pub type Pins = BTreeMap<ServiceKey, Vec<IpAddr>>;

/// What a pinned address outside `front.clusterSetIPRange` means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PinsOutsideRange {
    /// Ignored (`front.mode: vip`: an address of an older range; the import is allocated
    /// from the range and the writer publishes that).
    #[default]
    Ignore,
    /// Served as they are (`front.mode: kube`: the derived Services' ClusterIPs).
    Serve,
}

/// How one import's ClusterSetIPs are pinned.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pin {
    /// An address of the range, held in the allocator.
    Range(IpAddr),
    /// Addresses outside the range, served as they are.
    Verbatim(Vec<IpAddr>),
}

/// The state of the import set, without the task around it: apply updates, then read the
/// snapshot. Pure apart from the allocator's state file.
#[derive(Debug)]
pub struct ImportState {
    local: ClusterId,
    alloc: Allocator,
    /// Export sets in force, the local one included; withdrawn clusters are absent.
    sets: BTreeMap<ClusterId, Arc<ExportSet>>,
    localities: BTreeMap<ClusterId, Locality>,
    /// Peers whose tunnel is down or that are draining.
    down: BTreeSet<ClusterId>,
    withdrawn: BTreeSet<ClusterId>,
    services: BTreeMap<ServiceKey, Arc<ImportedService>>,
    vips_by_service: BTreeMap<ServiceKey, BTreeMap<IpAddr, EndpointVip>>,
    endpoint_vips: BTreeMap<IpAddr, EndpointVip>,
    validity: Arc<ValidityMap>,
    /// Shared with the last published copy (the writer and `/debug/exports` read it): a
    /// change copies it once, instead of every publication copying it.
    statuses: Arc<StatusMap>,
    version: u64,
    /// How long addresses of withdrawn imports stay reserved.
    withdrawn_grace: Duration,
    /// While a cluster is being withdrawn: addresses that go are reserved until then.
    reserving: Option<Instant>,
    /// Published ClusterSetIPs ([`Pins`]) as they apply to this range.
    pins: BTreeMap<ServiceKey, Pin>,
    pins_outside: PinsOutsideRange,
    /// New keys, by service, allocated at the end of the batch in key order (`batch.rs`).
    pending: BTreeMap<ServiceKey, BTreeSet<AllocKey>>,
    /// While [`ImportState::apply_peers`] applies its updates.
    in_batch: bool,
    /// Start-up: the peers whose first export set is awaited before anything new is
    /// allocated; `None` once the start-up batch closed.
    awaiting: Option<BTreeSet<ClusterId>>,
    /// Clusters in flat network mode: their endpoints get no VIPs.
    flat: BTreeSet<ClusterId>,
}

/// What one batch of updates changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    pub snapshot: bool,
    pub statuses: bool,
}

impl Changed {
    fn or(self, other: Changed) -> Changed {
        Changed {
            snapshot: self.snapshot || other.snapshot,
            statuses: self.statuses || other.statuses,
        }
    }
}

impl ImportState {
    pub fn new(local: ClusterId, alloc: Allocator) -> Self {
        ImportState {
            local,
            alloc,
            sets: BTreeMap::new(),
            localities: BTreeMap::new(),
            down: BTreeSet::new(),
            withdrawn: BTreeSet::new(),
            services: BTreeMap::new(),
            vips_by_service: BTreeMap::new(),
            endpoint_vips: BTreeMap::new(),
            validity: Arc::new(ValidityMap::new()),
            statuses: Arc::default(),
            version: 0,
            withdrawn_grace: DEFAULT_WITHDRAWN_GRACE,
            reserving: None,
            pins: BTreeMap::new(),
            pins_outside: PinsOutsideRange::Ignore,
            pending: BTreeMap::new(),
            in_batch: false,
            awaiting: None,
            flat: BTreeSet::new(),
        }
    }

    /// The clusters in flat network mode ([`ImportSnapshot::flat`]): the endpoints of their
    /// headless services are reached at their own addresses, so they get no VIPs (those they
    /// had are released).
    pub fn set_flat(&mut self, flat: BTreeSet<ClusterId>) -> Changed {
        if flat == self.flat {
            return Changed::default();
        }
        self.flat = flat;
        let dirty: BTreeSet<ServiceKey> = self.services.keys().cloned().collect();
        let changed = self.remerge(&dirty);
        Changed { snapshot: true, ..self.settle(changed) }
    }

    /// What pinned addresses outside the range mean.
    pub fn set_pins_outside_range(&mut self, outside: PinsOutsideRange) {
        self.pins_outside = outside;
    }

    /// The published ClusterSetIPs are now `pins`: imports take theirs (an unpinned import
    /// that held one of those addresses gets another). Of two imports published with one
    /// address, the first by name keeps it.
    pub fn set_pins(&mut self, pins: &Pins) -> Changed {
        let mut next: BTreeMap<ServiceKey, Pin> = BTreeMap::new();
        let mut claimed: BTreeMap<IpAddr, &ServiceKey> = BTreeMap::new();
        for (key, ips) in pins {
            let pin = match ips.iter().find(|ip| self.alloc.contains(**ip)) {
                Some(ip) => Pin::Range(*ip),
                None if self.pins_outside == PinsOutsideRange::Serve && !ips.is_empty() => {
                    Pin::Verbatim(ips.clone())
                }
                None => continue,
            };
            if let Pin::Range(ip) = &pin
                && let Some(first) = claimed.insert(*ip, key)
            {
                tracing::warn!(service = %key, %ip, holder = %first, "two ServiceImports carry one clusterset ip; the first keeps it");
                claimed.insert(*ip, first);
                continue;
            }
            next.insert(key.clone(), pin);
        }
        let mut dirty: BTreeSet<ServiceKey> = BTreeSet::new();
        for (key, pin) in &self.pins {
            if next.get(key) != Some(pin) {
                dirty.insert(key.clone());
            }
        }
        for key in next.keys() {
            if !self.pins.contains_key(key) {
                dirty.insert(key.clone());
            }
        }
        self.pins = next;
        let changed = self.remerge(&dirty);
        self.settle(changed)
    }

    /// How long addresses of imports withdrawn with their cluster stay reserved for them.
    pub fn set_withdrawn_grace(&mut self, grace: Duration) {
        self.withdrawn_grace = grace;
    }

    pub fn local_cluster(&self) -> &ClusterId {
        &self.local
    }

    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }

    /// A cluster's export set (the local one or a peer's) is now `set`.
    pub fn set_exports(&mut self, set: Arc<ExportSet>) -> Changed {
        let cluster = set.cluster.clone();
        let mut dirty = BTreeSet::new();
        match self.sets.get(&cluster) {
            Some(old) if Arc::ptr_eq(old, &set) => {}
            Some(old) => mcs::changed_keys_by_ptr(&old.services, &set.services, &mut dirty),
            None => dirty.extend(set.services.keys().cloned()),
        }
        let locality_changed = self.localities.get(&cluster) != Some(&set.locality);
        if locality_changed {
            self.localities.insert(cluster.clone(), set.locality.clone());
        }
        let came_back = self.withdrawn.remove(&cluster);
        // What a returning cluster does not bring back keeps its reservation until the grace
        // ends: its first export set may be incomplete (a kube source not yet synced).
        self.sets.insert(cluster.clone(), set);
        let changed = self.remerge(&dirty);
        self.heard_from(&cluster);
        let changed =
            changed.or(Changed { snapshot: locality_changed || came_back, statuses: false });
        self.settle(changed)
    }

    /// A peer's lease expired: its exports leave every import (they come back with its next
    /// export set).
    pub fn withdraw(&mut self, cluster: &ClusterId) -> Changed {
        if *cluster == self.local {
            tracing::warn!(%cluster, "ignoring a withdrawal of the local cluster");
            return Changed::default();
        }
        let newly = self.withdrawn.insert(cluster.clone());
        let Some(old) = self.sets.remove(cluster) else {
            return Changed { snapshot: newly, statuses: false };
        };
        let dirty: BTreeSet<ServiceKey> = old.services.keys().cloned().collect();
        // The cluster may come back: what its imports lose is kept for them for a while.
        self.reserving = Some(Instant::now() + self.withdrawn_grace);
        let changed = self.remerge(&dirty);
        self.reserving = None;
        self.settle(changed.or(Changed { snapshot: newly, statuses: false }))
    }

    /// A peer's tunnel went up or down, or it announced draining. Down and draining peers are
    /// listed unreachable (their endpoints count as unhealthy) but keep their exports.
    pub fn set_reachability(
        &mut self,
        cluster: &ClusterId,
        reachable: bool,
        draining: bool,
    ) -> Changed {
        if *cluster == self.local {
            return Changed::default();
        }
        let changed = if reachable && !draining {
            self.down.remove(cluster)
        } else {
            self.down.insert(cluster.clone())
        };
        Changed { snapshot: changed, statuses: false }
    }

    /// The validity of the local ServiceExports is now `validity`.
    pub fn set_validity(&mut self, validity: Arc<ValidityMap>) -> Changed {
        if Arc::ptr_eq(&self.validity, &validity) {
            return Changed::default();
        }
        let old = std::mem::replace(&mut self.validity, validity);
        let mut keys: BTreeSet<ServiceKey> = BTreeSet::new();
        for (k, v) in old.iter() {
            if self.validity.get(k) != Some(v) {
                keys.insert(k.clone());
            }
        }
        for k in self.validity.keys() {
            if !old.contains_key(k) {
                keys.insert(k.clone());
            }
        }
        Changed { snapshot: false, statuses: self.refresh_statuses(&keys) }
    }

    /// Applies one peer update.
    pub fn apply_peer(&mut self, update: PeerUpdate) -> Changed {
        match update {
            PeerUpdate::Exports(set) if set.cluster == self.local => {
                tracing::warn!(cluster = %set.cluster, "ignoring a peer export set that claims the local cluster id");
                Changed::default()
            }
            PeerUpdate::Exports(set) => self.set_exports(set),
            PeerUpdate::Withdrawn(cluster) => self.withdraw(&cluster),
            PeerUpdate::Reachability { cluster, reachable, draining } => {
                self.set_reachability(&cluster, reachable, draining)
            }
        }
    }

    /// Releases every IP (restored from the state file or not) that no import uses; waiting
    /// imports get the addresses that frees.
    pub fn release_unused(&mut self) -> Changed {
        let mut live: BTreeSet<AllocKey> = self
            .services
            .values()
            .filter(|i| !i.ips.is_empty())
            .map(|i| AllocKey::service(&i.key))
            .collect();
        live.extend(
            self.endpoint_vips.values().map(|v| AllocKey::endpoint(&v.key, &v.cluster, v.endpoint)),
        );
        let released = self.alloc.retain(|key| live.contains(key));
        if released > 0 {
            tracing::info!(released, "released clusterset ips no import uses");
        }
        self.settle(Changed::default())
    }

    /// When the next reserved address of a withdrawn import is due to be freed.
    pub fn next_reservation_expiry(&self) -> Option<Instant> {
        self.alloc.next_expiry()
    }

    /// Frees the reserved addresses whose grace ran out by `now`; waiting imports get them.
    pub fn expire_reservations(&mut self, now: Instant) -> Changed {
        let expired = self.alloc.expire(now);
        if expired > 0 {
            tracing::info!(
                expired,
                "freed clusterset ips kept for imports of withdrawn clusters (grace over)"
            );
        }
        self.settle(Changed::default())
    }

    /// The range and the imports waiting for an address, for `/debug/problems` and metrics.
    pub fn alloc_report(&self) -> AllocReport {
        AllocReport::of(&self.alloc)
    }

    /// Writes allocator changes to its state file; a failure is logged and retried on the next
    /// change.
    pub fn persist(&mut self) {
        if let Err(e) = self.alloc.flush() {
            tracing::warn!(error = %e, "cannot persist clusterset ips; will retry");
        }
    }

    /// The snapshot as it is now, with the next version.
    pub fn snapshot(&mut self) -> ImportSnapshot {
        self.version += 1;
        ImportSnapshot {
            version: self.version,
            local_cluster: Some(self.local.clone()),
            services: self.services.clone(),
            localities: self.localities.clone(),
            unreachable: self.down.union(&self.withdrawn).cloned().collect(),
            endpoint_vips: self.endpoint_vips.clone(),
            flat: self.flat.clone(),
        }
    }

    pub fn statuses(&self) -> &StatusMap {
        &self.statuses
    }

    /// The statuses as they are now, to publish (no copy).
    pub fn shared_statuses(&self) -> Arc<StatusMap> {
        Arc::clone(&self.statuses)
    }

    pub fn services(&self) -> &BTreeMap<ServiceKey, Arc<ImportedService>> {
        &self.services
    }

    /// After an update: allocates the batch's new keys (unless a batch is still open), merges
    /// again the imports whose waiting keys got an address, and logs (once for the whole
    /// update) the keys that started waiting and those that were served.
    fn settle(&mut self, mut changed: Changed) -> Changed {
        let mut served: Vec<AllocKey> = Vec::new();
        loop {
            changed = changed.or(self.allocate_pending());
            let granted = self.alloc.take_granted();
            // keys that lost their address to a pinned import get another one
            let displaced = self.alloc.take_displaced();
            if granted.is_empty() && displaced.is_empty() {
                break;
            }
            let dirty: BTreeSet<ServiceKey> =
                granted.iter().chain(&displaced).map(|k| k.service_key().clone()).collect();
            changed = changed.or(self.remerge(&dirty));
            served.extend(granted);
        }
        let waiting: Vec<AllocKey> = self
            .alloc
            .take_newly_waiting()
            .into_iter()
            .filter(|k| self.alloc.is_waiting(k))
            .collect();
        if !waiting.is_empty() {
            tracing::warn!(
                count = waiting.len(),
                first = %names(&waiting),
                waiting = self.alloc.waiting_len(),
                range = %self.alloc.range(),
                in_use = self.alloc.in_use(),
                reserved = self.alloc.in_use() - self.alloc.len(),
                "clusterset ip range is full: imports wait for an address and get one as soon as \
                 one frees (all listed in /debug/problems); widen front.clusterSetIPRange"
            );
        }
        if !served.is_empty() {
            tracing::info!(
                count = served.len(),
                first = %names(&served),
                waiting = self.alloc.waiting_len(),
                "waiting imports got clusterset ips"
            );
        }
        changed
    }

    /// Gives `key`'s address up: reserved for it while its cluster is being withdrawn,
    /// released otherwise (a waiting key leaves the queue either way).
    fn free_key(&mut self, key: &AllocKey) {
        if let Some(until) = self.reserving
            && self.alloc.reserve(key, until).is_some()
        {
            return;
        }
        self.alloc.release(key);
    }

    /// Takes the waiting endpoint keys of `service` that are not in `wanted` out of the queue.
    fn cancel_waiting_endpoints(&mut self, service: &ServiceKey, wanted: &BTreeSet<AllocKey>) {
        let stale: Vec<AllocKey> = self
            .alloc
            .waiting_of(service)
            .filter(|k| matches!(k, AllocKey::Endpoint { .. }) && !wanted.contains(*k))
            .cloned()
            .collect();
        for key in &stale {
            self.alloc.release(key);
        }
    }

    /// Merges the services in `dirty` again from the export sets in force.
    fn remerge(&mut self, dirty: &BTreeSet<ServiceKey>) -> Changed {
        let mut snapshot = false;
        for key in dirty {
            snapshot |= self.remerge_one(key);
        }
        let statuses = self.refresh_statuses(dirty);
        Changed { snapshot, statuses }
    }

    fn remerge_one(&mut self, key: &ServiceKey) -> bool {
        let contributions: Vec<&Arc<ExportedService>> = self
            .sets
            .iter()
            .filter_map(|(cluster, set)| {
                let e = set.services.get(key)?;
                if e.cluster != *cluster || e.key != *key {
                    tracing::warn!(%cluster, service = %key, claimed = %e.cluster, "ignoring an export filed under the wrong cluster or service");
                    return None;
                }
                Some(e)
            })
            .collect();
        // What it asks for now is pending again below.
        self.pending.remove(key);
        let prev = self.services.get(key).cloned();
        let Some(mut merged) = mcs::merge(key, &contributions, prev.as_deref()) else {
            self.free_key(&AllocKey::service(key));
            self.set_endpoint_vips(key, BTreeMap::new());
            self.cancel_waiting_endpoints(key, &BTreeSet::new());
            return self.services.remove(key).is_some();
        };
        let service_key = AllocKey::service(key);
        if merged.service_type == ServiceType::ClusterSetIP {
            match self.pins.get(key) {
                // The address the writer published (a key it displaces is merged again by
                // `settle`).
                Some(Pin::Range(ip)) if self.alloc.pin(&service_key, *ip) => merged.ips = vec![*ip],
                Some(Pin::Verbatim(ips)) => {
                    self.alloc.release(&service_key);
                    merged.ips = ips.clone();
                }
                // A new key is allocated at the end of the batch; a full range queues it
                // (reported and logged once per update by `settle`).
                _ => {
                    if let Some(ip) = self.address_for(&service_key) {
                        merged.ips = vec![ip];
                    }
                }
            }
            self.set_endpoint_vips(key, BTreeMap::new());
            self.cancel_waiting_endpoints(key, &BTreeSet::new());
        } else {
            self.free_key(&service_key);
            let (vips, wanted) = self.endpoint_vips_for(&merged);
            self.set_endpoint_vips(key, vips);
            self.cancel_waiting_endpoints(key, &wanted);
        }
        match prev {
            Some(p) if *p == merged => false,
            _ => {
                self.services.insert(key.clone(), Arc::new(merged));
                true
            }
        }
    }

    /// A VIP for each endpoint of a headless import in another cluster (a new key waits for
    /// the end of the batch, a full range queues it), and every key asked for.
    fn endpoint_vips_for(
        &mut self,
        import: &ImportedService,
    ) -> (BTreeMap<IpAddr, EndpointVip>, BTreeSet<AllocKey>) {
        let mut out = BTreeMap::new();
        let mut wanted = BTreeSet::new();
        for (cluster, export) in &import.clusters {
            if *cluster == self.local || self.flat.contains(cluster) {
                continue;
            }
            for ep in &export.endpoints {
                let key = AllocKey::endpoint(&import.key, cluster, ep.address);
                if let Some(vip) = self.address_for(&key) {
                    out.insert(
                        vip,
                        EndpointVip {
                            key: import.key.clone(),
                            cluster: cluster.clone(),
                            endpoint: ep.address,
                        },
                    );
                }
                wanted.insert(key);
            }
        }
        (out, wanted)
    }

    /// Replaces the endpoint VIPs of `key`, releasing those that went.
    fn set_endpoint_vips(&mut self, key: &ServiceKey, vips: BTreeMap<IpAddr, EndpointVip>) {
        let old = if vips.is_empty() {
            self.vips_by_service.remove(key)
        } else {
            self.vips_by_service.insert(key.clone(), vips.clone())
        };
        if let Some(old) = old {
            for (ip, vip) in old {
                self.endpoint_vips.remove(&ip);
                if !vips.contains_key(&ip) {
                    self.free_key(&AllocKey::endpoint(&vip.key, &vip.cluster, vip.endpoint));
                }
            }
        }
        self.endpoint_vips.extend(vips);
    }

    /// Recomputes the conditions of the local exports among `keys`; whether any changed.
    fn refresh_statuses(&mut self, keys: &BTreeSet<ServiceKey>) -> bool {
        let mut changed = false;
        for key in keys {
            let Some(validity) = self.validity.get(key).copied() else {
                if self.statuses.contains_key(key) {
                    Arc::make_mut(&mut self.statuses).remove(key);
                    changed = true;
                }
                continue;
            };
            let mut conditions = mcs::export_conditions(
                key,
                self.services.get(key).map(|s| &**s),
                &self.local,
                validity,
            );
            if validity.is_valid() && self.alloc.is_waiting(&AllocKey::service(key)) {
                conditions.push(Condition {
                    type_: CONDITION_CLUSTERSET_IP.to_owned(),
                    status: ConditionStatus::False,
                    reason: REASON_RANGE_FULL.to_owned(),
                    message: format!(
                        "no clusterset ip for {key} on cluster {}: front.clusterSetIPRange {} is \
                         full; the import waits for the next free address (see /debug/problems); \
                         widen the range or remove imports",
                        self.local,
                        self.alloc.range()
                    ),
                });
            }
            if self.statuses.get(key).is_some_and(|s| s.conditions == conditions) {
                continue;
            }
            Arc::make_mut(&mut self.statuses).insert(
                key.clone(),
                ExportStatus { key: key.clone(), cluster: self.local.clone(), conditions },
            );
            changed = true;
        }
        changed
    }
}

/// The first few keys of `keys`, for a log line, and how many more there are.
fn names(keys: &[AllocKey]) -> String {
    let mut out: Vec<String> = keys.iter().take(LOGGED_NAMES).map(ToString::to_string).collect();
    if keys.len() > LOGGED_NAMES {
        out.push(format!("and {} more", keys.len() - LOGGED_NAMES));
    }
    out.join(", ")
}

#[cfg(test)]
mod tests;
