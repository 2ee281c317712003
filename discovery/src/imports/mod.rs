//! The import set: every cluster's exports (the local one and the peers') merged into one
//! import per service, with ClusterSetIPs and headless endpoint VIPs allocated, published as an
//! immutable [`ImportSnapshot`] for DNS and the data plane, plus the conditions of the local
//! ServiceExports.
//!
//! Incremental: an export set that arrives is diffed against the one held for its cluster by
//! `Arc::ptr_eq` per service, and only those services are merged again. An import that merges
//! to the same value keeps its `Arc`, so consumers that diff by pointer skip it too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::alloc::{AllocKey, Allocator};
use crate::exports::ValidityMap;
use crate::mcs;
use crate::model::{
    ClusterId, EndpointVip, ExportSet, ExportStatus, ExportedService, ImportSnapshot,
    ImportedService, Locality, PeerUpdate, ServiceKey, ServiceType,
};

/// Gauge: services in the import set.
pub const METRIC_IMPORTED_SERVICES: &str = "fedgate_imported_services";
/// Counter: updates (local or from peers) that changed the import snapshot.
pub const METRIC_IMPORT_UPDATES: &str = "fedgate_import_updates_total";

/// How long IPs restored from the state file stay reserved for imports that have not come back
/// yet (peers reconnecting after a restart), before they are released.
pub const DEFAULT_RESTORE_GRACE: Duration = Duration::from_secs(300);

/// Peer updates applied in one batch before a snapshot is published.
const MAX_BATCH: usize = 256;

/// Describes this module's metrics to the installed recorder (the composition root calls it).
pub fn describe_metrics() {
    metrics::describe_gauge!(METRIC_IMPORTED_SERVICES, "Services in the clusterset import set.");
    metrics::describe_counter!(
        METRIC_IMPORT_UPDATES,
        "Export updates (local or from peers) that changed the import snapshot."
    );
}

/// Conditions of the local ServiceExports, by service.
pub type StatusMap = BTreeMap<ServiceKey, ExportStatus>;

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
    statuses: StatusMap,
    version: u64,
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
            statuses: StatusMap::new(),
            version: 0,
        }
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
        self.sets.insert(cluster, set);
        let changed = self.remerge(&dirty);
        changed.or(Changed { snapshot: locality_changed || came_back, statuses: false })
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
        self.remerge(&dirty).or(Changed { snapshot: newly, statuses: false })
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

    /// Releases every IP (restored from the state file or not) that no import uses.
    pub fn release_unused(&mut self) -> usize {
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
        released
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
        }
    }

    pub fn statuses(&self) -> &StatusMap {
        &self.statuses
    }

    pub fn services(&self) -> &BTreeMap<ServiceKey, Arc<ImportedService>> {
        &self.services
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
        let prev = self.services.get(key).cloned();
        let Some(mut merged) = mcs::merge(key, &contributions, prev.as_deref()) else {
            self.alloc.release(&AllocKey::service(key));
            self.set_endpoint_vips(key, BTreeMap::new());
            return self.services.remove(key).is_some();
        };
        let service_key = AllocKey::service(key);
        if merged.service_type == ServiceType::ClusterSetIP {
            match self.alloc.allocate(&service_key) {
                Ok(ip) => merged.ips = vec![ip],
                Err(e) => {
                    tracing::error!(service = %key, error = %e, "no clusterset ip for import")
                }
            }
            self.set_endpoint_vips(key, BTreeMap::new());
        } else {
            self.alloc.release(&service_key);
            let vips = self.endpoint_vips_for(&merged);
            self.set_endpoint_vips(key, vips);
        }
        match prev {
            Some(p) if *p == merged => false,
            _ => {
                self.services.insert(key.clone(), Arc::new(merged));
                true
            }
        }
    }

    /// A VIP for each endpoint of a headless import in another cluster.
    fn endpoint_vips_for(&mut self, import: &ImportedService) -> BTreeMap<IpAddr, EndpointVip> {
        let mut out = BTreeMap::new();
        for (cluster, export) in &import.clusters {
            if *cluster == self.local {
                continue;
            }
            for ep in &export.endpoints {
                let key = AllocKey::endpoint(&import.key, cluster, ep.address);
                match self.alloc.allocate(&key) {
                    Ok(vip) => {
                        out.insert(
                            vip,
                            EndpointVip {
                                key: import.key.clone(),
                                cluster: cluster.clone(),
                                endpoint: ep.address,
                            },
                        );
                    }
                    Err(e) => tracing::error!(error = %e, "no vip for headless endpoint"),
                }
            }
        }
        out
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
                    self.alloc.release(&AllocKey::endpoint(&vip.key, &vip.cluster, vip.endpoint));
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
                changed |= self.statuses.remove(key).is_some();
                continue;
            };
            let conditions = mcs::export_conditions(
                key,
                self.services.get(key).map(|s| &**s),
                &self.local,
                validity,
            );
            if self.statuses.get(key).is_some_and(|s| s.conditions == conditions) {
                continue;
            }
            self.statuses.insert(
                key.clone(),
                ExportStatus { key: key.clone(), cluster: self.local.clone(), conditions },
            );
            changed = true;
        }
        changed
    }
}

/// The task that owns the import set.
pub struct ImportSet {
    state: ImportState,
    local_rx: watch::Receiver<Arc<ExportSet>>,
    validity_rx: watch::Receiver<Arc<ValidityMap>>,
    peers_rx: mpsc::Receiver<PeerUpdate>,
    snapshot_tx: watch::Sender<Arc<ImportSnapshot>>,
    status_tx: watch::Sender<Arc<StatusMap>>,
    restore_grace: Duration,
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
        let (status_tx, _) = watch::channel(Arc::new(state.statuses().clone()));
        metrics::gauge!(METRIC_IMPORTED_SERVICES).set(state.services().len() as f64);
        ImportSet {
            state,
            local_rx,
            validity_rx,
            peers_rx,
            snapshot_tx,
            status_tx,
            restore_grace: DEFAULT_RESTORE_GRACE,
        }
    }

    /// How long IPs restored from the state file stay reserved for imports not seen again.
    pub fn with_restore_grace(mut self, grace: Duration) -> Self {
        self.restore_grace = grace;
        self
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ImportSnapshot>> {
        self.snapshot_tx.subscribe()
    }

    /// Conditions of the local ServiceExports.
    pub fn subscribe_status(&self) -> watch::Receiver<Arc<StatusMap>> {
        self.status_tx.subscribe()
    }

    /// Serves until the local export set's sender is dropped (the gateway stops). When the
    /// peer channel closes, the local exports are still followed.
    pub async fn run(mut self) {
        let grace = tokio::time::sleep(self.restore_grace);
        tokio::pin!(grace);
        let mut swept = false;
        let mut peers_open = true;
        let mut validity_open = true;
        loop {
            // What changed, and how many updates changed the snapshot.
            let (changed, updates) = tokio::select! {
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
                    let mut changed = self.state.apply_peer(update);
                    let mut updates = u64::from(changed.snapshot);
                    for _ in 1..MAX_BATCH {
                        let Ok(update) = self.peers_rx.try_recv() else { break };
                        let one = self.state.apply_peer(update);
                        updates += u64::from(one.snapshot);
                        changed = changed.or(one);
                    }
                    (changed, updates)
                }
                () = &mut grace, if !swept => {
                    swept = true;
                    // Releasing IPs nobody uses changes nothing a consumer sees.
                    self.state.release_unused();
                    (Changed::default(), 0)
                }
            };
            self.publish(changed, updates);
        }
    }

    fn publish(&mut self, changed: Changed, updates: u64) {
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
            self.status_tx.send_replace(Arc::new(self.state.statuses().clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use crate::mcs::Validity;

    use super::*;
    use crate::model::{ConditionStatus, Endpoint, Health, IpFamily, ServicePort};

    fn cid(s: &str) -> ClusterId {
        ClusterId::new(s).unwrap()
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("ns", name)
    }

    fn ep(ip: &str) -> Endpoint {
        Endpoint {
            address: ip.parse().unwrap(),
            hostname: None,
            ready: true,
            zone: None,
            ports: Vec::new(),
            health: Health::Healthy,
        }
    }

    fn exported(
        cluster: &str,
        name: &str,
        created: i64,
        service_type: ServiceType,
        endpoints: &[&str],
    ) -> Arc<ExportedService> {
        Arc::new(ExportedService {
            ip_families: vec![IpFamily::IPv4],
            created: jiff::Timestamp::from_second(1_700_000_000 + created).unwrap(),
            ..crate::exchange::delta::testing::exported(
                key(name),
                cluster,
                service_type,
                vec![ServicePort::tcp(Some("http"), 80)],
                endpoints.iter().map(|ip| ep(ip)).collect(),
            )
        })
    }

    fn set(cluster: &str, version: u64, services: Vec<Arc<ExportedService>>) -> Arc<ExportSet> {
        Arc::new(ExportSet {
            cluster: cid(cluster),
            locality: Locality { region: Some(format!("{cluster}-region")), ..Locality::default() },
            version,
            services: services.into_iter().map(|s| (s.key.clone(), s)).collect(),
        })
    }

    fn state() -> ImportState {
        ImportState::new(
            cid("east"),
            Allocator::open("242.1.0.0/16".parse().unwrap(), None).unwrap(),
        )
    }

    #[test]
    fn merges_allocates_and_withdraws() {
        let mut st = state();
        st.set_exports(set(
            "east",
            1,
            vec![exported("east", "a", 2, ServiceType::ClusterSetIP, &["10.0.0.1"])],
        ));
        let changed = st.apply_peer(PeerUpdate::Exports(set(
            "west",
            1,
            vec![
                exported("west", "a", 1, ServiceType::ClusterSetIP, &["10.1.0.1"]),
                exported("west", "db", 1, ServiceType::Headless, &["10.1.0.5", "10.1.0.6"]),
            ],
        )));
        assert_eq!(changed, Changed { snapshot: true, statuses: false });
        let snap = st.snapshot();
        assert_eq!(snap.local_cluster, Some(cid("east")));
        assert_eq!(snap.services.len(), 2);
        let a = &snap.services[&key("a")];
        assert_eq!(a.clusters.keys().cloned().collect::<Vec<_>>(), vec![cid("east"), cid("west")]);
        assert_eq!(a.winner, cid("west"));
        assert_eq!(a.ips.len(), 1);
        assert!("242.1.0.0/16".parse::<ipnet::IpNet>().unwrap().contains(&a.ips[0]));
        let db = &snap.services[&key("db")];
        assert!(db.ips.is_empty(), "headless imports get no clusterset ip");
        assert_eq!(snap.endpoint_vips.len(), 2);
        let targets: BTreeSet<IpAddr> = snap.endpoint_vips.values().map(|v| v.endpoint).collect();
        assert_eq!(
            targets,
            BTreeSet::from(["10.1.0.5".parse().unwrap(), "10.1.0.6".parse().unwrap()])
        );
        assert!(
            snap.endpoint_vips.values().all(|v| v.cluster == cid("west") && v.key == key("db"))
        );
        assert!(!snap.endpoint_vips.contains_key(&a.ips[0]));
        assert_eq!(snap.localities[&cid("west")].region.as_deref(), Some("west-region"));
        assert_eq!(st.allocator().len(), 3);

        // reachability marks, never withdraws
        let before = st.snapshot();
        st.apply_peer(PeerUpdate::Reachability {
            cluster: cid("west"),
            reachable: false,
            draining: false,
        });
        let down = st.snapshot();
        assert!(down.unreachable.contains(&cid("west")));
        assert!(Arc::ptr_eq(&down.services[&key("a")], &before.services[&key("a")]));
        assert_eq!(down.endpoint_vips, before.endpoint_vips);
        st.apply_peer(PeerUpdate::Reachability {
            cluster: cid("west"),
            reachable: true,
            draining: true,
        });
        assert!(st.snapshot().unreachable.contains(&cid("west")), "draining counts as unreachable");
        st.apply_peer(PeerUpdate::Reachability {
            cluster: cid("west"),
            reachable: true,
            draining: false,
        });
        assert!(st.snapshot().unreachable.is_empty());

        // withdrawal: db had only west, so it goes with its vips; a stays with the same ip
        let a_ip = a.ips[0];
        st.apply_peer(PeerUpdate::Withdrawn(cid("west")));
        let gone = st.snapshot();
        assert_eq!(gone.services.keys().cloned().collect::<Vec<_>>(), vec![key("a")]);
        assert_eq!(gone.services[&key("a")].ips, vec![a_ip]);
        assert_eq!(gone.services[&key("a")].winner, cid("east"));
        assert!(gone.endpoint_vips.is_empty());
        assert!(gone.unreachable.contains(&cid("west")));
        assert_eq!(st.allocator().len(), 1);

        // the last export leaving takes the import and its ip
        st.set_exports(set("east", 2, vec![]));
        assert!(st.snapshot().services.is_empty());
        assert!(st.allocator().is_empty());
    }

    #[test]
    fn endpoint_vips_follow_endpoints_and_type_changes() {
        let mut st = state();
        let headless = |eps: &[&str]| {
            PeerUpdate::Exports(set(
                "west",
                1,
                vec![exported("west", "db", 1, ServiceType::Headless, eps)],
            ))
        };
        st.apply_peer(headless(&["10.1.0.1", "10.1.0.2"]));
        let first = st.snapshot().endpoint_vips;
        let vip_of = |vips: &BTreeMap<IpAddr, EndpointVip>, ep: &str| {
            let ep: IpAddr = ep.parse().unwrap();
            vips.iter().find(|(_, v)| v.endpoint == ep).map(|(ip, _)| *ip)
        };
        let kept = vip_of(&first, "10.1.0.2").unwrap();
        // one endpoint goes, one comes: the survivor keeps its vip, the gone one is released
        st.apply_peer(headless(&["10.1.0.2", "10.1.0.3"]));
        let second = st.snapshot().endpoint_vips;
        assert_eq!(second.len(), 2);
        assert_eq!(vip_of(&second, "10.1.0.2"), Some(kept));
        assert_eq!(vip_of(&second, "10.1.0.1"), None);
        assert_eq!(st.allocator().len(), 2);
        // the local cluster's own endpoints of the same headless service get no vip
        st.set_exports(set(
            "east",
            1,
            vec![exported("east", "db", 2, ServiceType::Headless, &["10.0.0.9"])],
        ));
        assert_eq!(st.snapshot().endpoint_vips.len(), 2);
        // the service turns ClusterSetIP: the vips go, a clusterset ip comes
        st.set_exports(set("east", 2, vec![]));
        st.apply_peer(PeerUpdate::Exports(set(
            "west",
            2,
            vec![exported("west", "db", 1, ServiceType::ClusterSetIP, &["10.1.0.2"])],
        )));
        let third = st.snapshot();
        assert!(third.endpoint_vips.is_empty());
        assert_eq!(third.services[&key("db")].ips.len(), 1);
        assert_eq!(st.allocator().len(), 1);
    }

    #[test]
    fn ignores_peers_claiming_the_local_id() {
        let mut st = state();
        let changed = st.apply_peer(PeerUpdate::Exports(set(
            "east",
            1,
            vec![exported("east", "x", 1, ServiceType::ClusterSetIP, &[])],
        )));
        assert_eq!(changed, Changed::default());
        assert_eq!(st.withdraw(&cid("east")), Changed::default());
        // an export filed under the wrong cluster is skipped
        st.apply_peer(PeerUpdate::Exports(set(
            "west",
            1,
            vec![exported("south", "x", 1, ServiceType::ClusterSetIP, &[])],
        )));
        assert!(st.services().is_empty());
    }

    #[test]
    fn local_statuses_follow_validity_and_conflicts() {
        let mut st = state();
        let validity = Arc::new(ValidityMap::from([
            (key("a"), Validity::Valid),
            (key("ghost"), Validity::NoService),
        ]));
        assert!(st.set_validity(validity).statuses);
        st.set_exports(set(
            "east",
            1,
            vec![exported("east", "a", 2, ServiceType::ClusterSetIP, &[])],
        ));
        let reasons = |st: &ImportState, k: &str| -> Vec<(String, ConditionStatus, String)> {
            st.statuses()[&key(k)]
                .conditions
                .iter()
                .map(|c| (c.type_.clone(), c.status, c.reason.clone()))
                .collect()
        };
        assert_eq!(
            reasons(&st, "ghost")[0],
            ("Valid".into(), ConditionStatus::False, "NoService".into())
        );
        assert_eq!(
            reasons(&st, "a")[1],
            ("Ready".into(), ConditionStatus::True, "Exported".into())
        );
        assert_eq!(
            reasons(&st, "a")[2],
            ("Conflict".into(), ConditionStatus::False, "NoConflicts".into())
        );
        // an older peer export of another type: the local export gets the conflict too
        let changed = st.apply_peer(PeerUpdate::Exports(set(
            "west",
            1,
            vec![exported("west", "a", 1, ServiceType::Headless, &[])],
        )));
        assert!(changed.statuses);
        assert_eq!(
            reasons(&st, "a")[2],
            ("Conflict".into(), ConditionStatus::True, "TypeConflict".into())
        );
        let msg = &st.statuses()[&key("a")].conditions[2].message;
        assert!(
            msg.contains(
                "Using \"Headless\" from oldest service export in \"west\". 1/2 clusters disagree."
            ),
            "{msg}"
        );
        // the peer goes: the conflict goes
        st.withdraw(&cid("west"));
        assert_eq!(reasons(&st, "a")[2].1, ConditionStatus::False);
        // the export goes from the validity map: its status goes
        assert!(
            st.set_validity(Arc::new(ValidityMap::from([(key("a"), Validity::Valid)]))).statuses
        );
        assert!(!st.statuses().contains_key(&key("ghost")));
    }

    #[test]
    fn clusterset_ips_survive_a_restart_and_unused_ones_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ips.json");
        let range: ipnet::IpNet = "242.1.0.0/24".parse().unwrap();
        let peer = set(
            "west",
            1,
            (0..20)
                .map(|i| exported("west", &format!("s{i}"), 1, ServiceType::ClusterSetIP, &[]))
                .collect(),
        );
        let first: BTreeMap<ServiceKey, Vec<IpAddr>> = {
            let mut st =
                ImportState::new(cid("east"), Allocator::open(range, Some(path.clone())).unwrap());
            st.apply_peer(PeerUpdate::Exports(Arc::clone(&peer)));
            st.persist();
            st.services().iter().map(|(k, v)| (k.clone(), v.ips.clone())).collect()
        };
        assert_eq!(first.len(), 20);
        // after a restart, a new service arrives before the old ones come back: it must not
        // take any of their ips
        let mut st =
            ImportState::new(cid("east"), Allocator::open(range, Some(path.clone())).unwrap());
        st.apply_peer(PeerUpdate::Exports(set(
            "south",
            1,
            vec![exported("south", "new", 1, ServiceType::ClusterSetIP, &[])],
        )));
        let new_ip = st.services()[&key("new")].ips[0];
        assert!(first.values().all(|ips| ips[0] != new_ip));
        st.apply_peer(PeerUpdate::Exports(set(
            "west",
            1,
            (0..10)
                .map(|i| exported("west", &format!("s{i}"), 1, ServiceType::ClusterSetIP, &[]))
                .collect(),
        )));
        for i in 0..10 {
            assert_eq!(st.services()[&key(&format!("s{i}"))].ips, first[&key(&format!("s{i}"))]);
        }
        // s10..s19 never came back: after the grace they are released
        assert_eq!(st.release_unused(), 10);
        assert_eq!(st.allocator().len(), 11);
    }

    /// 10k services from one peer; one endpoint changes: one import is merged again, every
    /// other import keeps its Arc, and the update is fast.
    #[test]
    fn one_endpoint_change_in_ten_thousand_services_is_incremental() {
        const N: usize = 10_000;
        let mut st = state();
        let mut services: Vec<Arc<ExportedService>> = (0..N)
            .map(|i| {
                exported(
                    "west",
                    &format!("s{i:05}"),
                    1,
                    ServiceType::ClusterSetIP,
                    &["10.1.0.1", "10.1.0.2"],
                )
            })
            .collect();
        let t0 = Instant::now();
        st.apply_peer(PeerUpdate::Exports(set("west", 1, services.clone())));
        let full = st.snapshot();
        let initial = t0.elapsed();
        assert_eq!(full.services.len(), N);

        let mut changed = (*services[4242]).clone();
        changed.endpoints[1].health = Health::Unhealthy;
        services[4242] = Arc::new(changed);
        let next_set = set("west", 2, services);
        let t1 = Instant::now();
        let c = st.apply_peer(PeerUpdate::Exports(next_set));
        let apply = t1.elapsed();
        let snap = st.snapshot();
        let update = t1.elapsed();
        assert!(c.snapshot);
        let rebuilt: Vec<&ServiceKey> = snap
            .services
            .iter()
            .filter(|(k, v)| !Arc::ptr_eq(v, &full.services[*k]))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(rebuilt, vec![&key("s04242")]);
        assert_eq!(snap.services[&key("s04242")].ips, full.services[&key("s04242")].ips);
        eprintln!(
            "import set, {N} services: initial merge {initial:?}; one endpoint change: diff+merge {apply:?}, with snapshot {update:?}"
        );
        assert!(apply < initial / 10, "incremental update {apply:?} vs initial {initial:?}");
    }

    #[test]
    fn publishing_records_metrics() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let (_local_tx, local_rx) = watch::channel(set(
                "east",
                1,
                vec![exported("east", "a", 1, ServiceType::ClusterSetIP, &[])],
            ));
            let (_validity_tx, validity_rx) = watch::channel(Arc::new(ValidityMap::new()));
            let (_peers_tx, peers_rx) = mpsc::channel(1);
            let mut task = ImportSet::new(
                cid("east"),
                local_rx,
                validity_rx,
                peers_rx,
                Allocator::open("242.1.0.0/16".parse().unwrap(), None).unwrap(),
            );
            let changed = task.state.apply_peer(PeerUpdate::Exports(set(
                "west",
                1,
                vec![exported("west", "b", 1, ServiceType::ClusterSetIP, &[])],
            )));
            task.publish(changed, 1);
        });
        let values: BTreeMap<String, DebugValue> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(k, _, _, v)| (k.key().name().to_owned(), v))
            .collect();
        assert_eq!(values.get(METRIC_IMPORTED_SERVICES), Some(&DebugValue::Gauge(2.0.into())));
        assert_eq!(values.get(METRIC_IMPORT_UPDATES), Some(&DebugValue::Counter(1)));
    }

    async fn eventually<T>(rx: &mut watch::Receiver<T>, what: &str, f: impl Fn(&T) -> bool) {
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| f(v)))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap_or_else(|_| panic!("channel closed waiting for {what}"));
    }

    #[tokio::test]
    async fn task_follows_local_and_peer_updates() {
        let (local_tx, local_rx) = watch::channel(set(
            "east",
            1,
            vec![exported("east", "web", 5, ServiceType::ClusterSetIP, &["10.0.0.1"])],
        ));
        let (validity_tx, validity_rx) =
            watch::channel(Arc::new(ValidityMap::from([(key("web"), Validity::Valid)])));
        let (peers_tx, peers_rx) = mpsc::channel(16);
        let task = ImportSet::new(
            cid("east"),
            local_rx,
            validity_rx,
            peers_rx,
            Allocator::open("242.1.0.0/16".parse().unwrap(), None).unwrap(),
        )
        .with_restore_grace(Duration::from_millis(10));
        let mut snaps = task.subscribe();
        let mut statuses = task.subscribe_status();
        let first = Arc::clone(&snaps.borrow_and_update());
        assert_eq!(first.services.len(), 1);
        let web_ip = first.services[&key("web")].ips[0];
        assert_eq!(statuses.borrow_and_update()[&key("web")].conditions[1].reason, "Exported");
        let handle = tokio::spawn(task.run());

        peers_tx
            .send(PeerUpdate::Exports(set(
                "west",
                1,
                vec![
                    exported("west", "web", 1, ServiceType::ClusterSetIP, &["10.1.0.1"]),
                    exported("west", "cache", 1, ServiceType::Headless, &["10.1.0.7"]),
                ],
            )))
            .await
            .unwrap();
        eventually(&mut snaps, "west imported", |s| s.services.len() == 2).await;
        {
            let s = snaps.borrow_and_update();
            assert_eq!(s.services[&key("web")].clusters.len(), 2);
            assert_eq!(s.services[&key("web")].ips, vec![web_ip]);
            assert_eq!(s.endpoint_vips.len(), 1);
            assert!(s.version > first.version);
        }

        peers_tx
            .send(PeerUpdate::Reachability {
                cluster: cid("west"),
                reachable: false,
                draining: false,
            })
            .await
            .unwrap();
        eventually(&mut snaps, "west unreachable", |s| s.unreachable.contains(&cid("west"))).await;
        assert_eq!(snaps.borrow().services.len(), 2, "unreachable is not withdrawn");

        // local export changes to a conflicting type: the local status says so
        local_tx.send_replace(set(
            "east",
            2,
            vec![exported("east", "web", 5, ServiceType::Headless, &["10.0.0.1"])],
        ));
        eventually(&mut statuses, "local conflict", |m| {
            m.get(&key("web")).is_some_and(|s| s.conditions[2].reason == "TypeConflict")
        })
        .await;

        peers_tx.send(PeerUpdate::Withdrawn(cid("west"))).await.unwrap();
        eventually(&mut snaps, "west withdrawn", |s| {
            s.services.len() == 1 && s.endpoint_vips.is_empty()
        })
        .await;
        // with west gone, the local export is the only one: Headless now, no conflict
        eventually(&mut statuses, "conflict cleared", |m| {
            m.get(&key("web")).is_some_and(|s| s.conditions[2].reason == "NoConflicts")
        })
        .await;
        assert!(snaps.borrow().services[&key("web")].ips.is_empty());

        validity_tx.send_replace(Arc::new(ValidityMap::new()));
        eventually(&mut statuses, "status gone", |m| m.is_empty()).await;

        drop(peers_tx);
        drop(local_tx);
        tokio::time::timeout(Duration::from_secs(5), handle).await.unwrap().unwrap();
    }
}
