//! The zone writer: turns discovery snapshots into table changes, rebuilding only services
//! whose inputs changed and replacing only names whose answers changed. It remembers each
//! service's names as the table entries themselves (shared, not copied): an entry's encoded
//! answers are all it needs to diff.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use fedgate_discovery::model::{
    ClusterId, ClusterState, ImportSnapshot, ImportedService, LocalService, Locality, ServiceKey,
    ServiceType,
};
use hickory_proto::rr::Record;

use crate::names::Zone;
use crate::records::{
    ImportContext, NameMap, import_names, local_names, namespace_ent, soa, static_names,
};
use crate::table::{Change, Entry, SharedNodata, Table};
use crate::tier::PriorityLabel;

type Vips = BTreeMap<(ClusterId, IpAddr), IpAddr>;

/// The table entries of one service's names.
type Names = Box<[Arc<Entry>]>;

struct ImportState {
    svc: Arc<ImportedService>,
    vips: Vips,
    names: Names,
}

struct LocalState {
    svc: Arc<LocalService>,
    names: Names,
}

/// Inputs shared by every headless import; a change rebuilds all headless services.
#[derive(Clone, PartialEq, Eq)]
struct Globals {
    local_cluster: Option<ClusterId>,
    localities: BTreeMap<ClusterId, Locality>,
    unreachable: BTreeSet<ClusterId>,
}

/// What one update did, for logs, metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpdateStats {
    pub services_rebuilt: usize,
    pub services_removed: usize,
    pub names_changed: usize,
}

/// Owns the table's contents; one task drives it.
pub struct ZoneWriter {
    table: Arc<Table>,
    ttl: u32,
    soas: [Record; 2],
    priority: Vec<PriorityLabel>,
    extra_labels: BTreeMap<String, String>,
    imports: HashMap<ServiceKey, ImportState>,
    locals: HashMap<ServiceKey, LocalState>,
    namespaces: HashMap<(Zone, String), usize>,
    globals: Option<Globals>,
    nodata: SharedNodata,
}

fn zone_index(zone: Zone) -> usize {
    match zone {
        Zone::ClusterSet => 0,
        Zone::Cluster => 1,
    }
}

impl ZoneWriter {
    /// A writer over `table`, which it fills with the static names at once.
    pub fn new(
        table: Arc<Table>,
        ttl: u32,
        serial: u32,
        priority: Vec<PriorityLabel>,
        extra_labels: BTreeMap<String, String>,
        ns_address: Option<IpAddr>,
    ) -> Self {
        let soas = [soa(Zone::ClusterSet, ttl, serial), soa(Zone::Cluster, ttl, serial)];
        let mut writer = Self {
            table,
            ttl,
            soas,
            priority,
            extra_labels,
            imports: HashMap::new(),
            locals: HashMap::new(),
            namespaces: HashMap::new(),
            globals: None,
            nodata: SharedNodata::default(),
        };
        let mut changes = Vec::new();
        // The table alone holds the static names: nothing withdraws them.
        writer.diff(&[], &static_names(ttl, serial, ns_address), &mut changes);
        writer.table.apply(changes);
        writer
    }

    /// The SOA record of a zone (negative answers carry it).
    pub fn soa(&self, zone: Zone) -> &Record {
        &self.soas[zone_index(zone)]
    }

    /// Turns a service's names from `old` (its entries) into `new`: puts the names whose
    /// answers differ, removes the names gone, and returns the service's entries now (the old
    /// `Arc` where nothing changed).
    fn diff(&mut self, old: &[Arc<Entry>], new: &NameMap, changes: &mut Vec<Change>) -> Names {
        let before: HashMap<&[u8], &Arc<Entry>> = old.iter().map(|e| (e.key(), e)).collect();
        let mut names = Vec::with_capacity(new.len());
        for data in new.values() {
            let zone = data.zone.unwrap_or(Zone::ClusterSet);
            let entry = Entry::build(zone, data, &self.soas[zone_index(zone)], &mut self.nodata);
            match before.get(entry.key()) {
                Some(prev) if ***prev == entry => names.push(Arc::clone(prev)),
                _ => {
                    let entry = Arc::new(entry);
                    changes.push(Change::Put(entry.clone()));
                    names.push(entry);
                }
            }
        }
        for entry in old {
            if !new.contains_key(entry.key()) {
                changes.push(entry.removal());
            }
        }
        names.into_boxed_slice()
    }

    fn namespace_ref(
        &mut self,
        zone: Zone,
        namespace: &str,
        delta: isize,
        changes: &mut Vec<Change>,
    ) {
        let Some(ent) = namespace_ent(namespace, zone) else { return };
        let count = self.namespaces.entry((zone, namespace.to_owned())).or_insert(0);
        let before = *count;
        *count = count.saturating_add_signed(delta);
        let after = *count;
        if after == 0 {
            self.namespaces.remove(&(zone, namespace.to_owned()));
        }
        if before == 0 && after > 0 {
            let entry = Entry::build(zone, &ent, &self.soas[zone_index(zone)], &mut self.nodata);
            changes.push(Change::Put(Arc::new(entry)));
        } else if before > 0 && after == 0 {
            changes.push(Change::Remove(crate::names::wire_key(&ent.name).into()));
        }
    }

    /// Withdraws the names of services gone from `zone` (taken out by [`take_gone`]) and their
    /// hold on their namespace; returns how many there were.
    fn withdraw(
        &mut self,
        zone: Zone,
        gone: Vec<(ServiceKey, Names)>,
        changes: &mut Vec<Change>,
    ) -> usize {
        for (key, names) in &gone {
            changes.extend(names.iter().map(|e| e.removal()));
            self.namespace_ref(zone, &key.namespace, -1, changes);
        }
        gone.len()
    }

    /// Brings `clusterset.local` in line with an import snapshot.
    pub fn apply_imports(&mut self, snap: &ImportSnapshot) -> UpdateStats {
        let mut stats = UpdateStats::default();
        let globals = Globals {
            local_cluster: snap.local_cluster.clone(),
            localities: snap.localities.clone(),
            unreachable: snap.unreachable.clone(),
        };
        let globals_changed = self.globals.as_ref() != Some(&globals);
        let mut client_labels = match &globals.local_cluster {
            Some(id) => globals.localities.get(id).cloned().unwrap_or_default().labels_for(id),
            None => BTreeMap::new(),
        };
        client_labels.extend(self.extra_labels.clone());

        let mut vips_by_service: HashMap<&ServiceKey, Vips> = HashMap::new();
        for (vip, target) in &snap.endpoint_vips {
            vips_by_service
                .entry(&target.key)
                .or_default()
                .insert((target.cluster.clone(), target.endpoint), *vip);
        }

        let mut changes = Vec::new();
        for (key, svc) in &snap.services {
            let vips = vips_by_service.remove(key).unwrap_or_default();
            let unchanged = self.imports.get(key).is_some_and(|p| {
                Arc::ptr_eq(&p.svc, svc)
                    && (svc.service_type != ServiceType::Headless
                        || (!globals_changed && p.vips == vips))
            });
            if unchanged {
                continue;
            }
            let previous = self.imports.remove(key);
            let cx = ImportContext {
                ttl: self.ttl,
                local_cluster: globals.local_cluster.as_ref(),
                client_labels: &client_labels,
                priority: &self.priority,
                localities: &globals.localities,
                unreachable: &globals.unreachable,
                vips: &vips,
            };
            let names = import_names(svc, &cx);
            let names =
                self.diff(previous.as_ref().map_or(&[], |p| &p.names), &names, &mut changes);
            if previous.is_none() {
                self.namespace_ref(Zone::ClusterSet, &key.namespace, 1, &mut changes);
            }
            stats.services_rebuilt += 1;
            self.imports.insert(key.clone(), ImportState { svc: svc.clone(), vips, names });
        }
        let gone = take_gone(&mut self.imports, |k| snap.services.contains_key(k), |s| s.names);
        stats.services_removed += self.withdraw(Zone::ClusterSet, gone, &mut changes);
        self.globals = Some(globals);
        stats.names_changed = changes.len();
        self.table.apply(changes);
        stats
    }

    /// Brings `cluster.local` in line with the local cluster's state.
    pub fn apply_cluster(&mut self, state: &ClusterState) -> UpdateStats {
        let mut stats = UpdateStats::default();
        let mut changes = Vec::new();
        for (key, svc) in &state.services {
            if self.locals.get(key).is_some_and(|p| Arc::ptr_eq(&p.svc, svc)) {
                continue;
            }
            let previous = self.locals.remove(key);
            let names = local_names(svc, self.ttl);
            let names =
                self.diff(previous.as_ref().map_or(&[], |p| &p.names), &names, &mut changes);
            if previous.is_none() {
                self.namespace_ref(Zone::Cluster, &key.namespace, 1, &mut changes);
            }
            stats.services_rebuilt += 1;
            self.locals.insert(key.clone(), LocalState { svc: svc.clone(), names });
        }
        let gone = take_gone(&mut self.locals, |k| state.services.contains_key(k), |s| s.names);
        stats.services_removed += self.withdraw(Zone::Cluster, gone, &mut changes);
        stats.names_changed = changes.len();
        self.table.apply(changes);
        stats
    }
}

/// Takes out of `map` the services the source no longer has (`kept` is false for them),
/// with their names.
fn take_gone<V>(
    map: &mut HashMap<ServiceKey, V>,
    kept: impl Fn(&ServiceKey) -> bool,
    names: fn(V) -> Names,
) -> Vec<(ServiceKey, Names)> {
    let gone: Vec<ServiceKey> = map.keys().filter(|k| !kept(k)).cloned().collect();
    gone.into_iter().filter_map(|k| map.remove(&k).map(|v| (k, names(v)))).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use fedgate_discovery::model::{Health, ServiceKey, ServiceType};

    use super::*;
    use crate::names::wire_key;
    use crate::records::tests::{cid, ep, export, import};
    use crate::tier::parse_priority;

    fn writer() -> (Arc<Table>, ZoneWriter) {
        let table = Arc::new(Table::default());
        let prio = parse_priority(&crate::settings::default_failover_priority());
        let w = ZoneWriter::new(table.clone(), 5, 1, prio, BTreeMap::new(), None);
        (table, w)
    }

    fn has(table: &Table, name: &str) -> bool {
        let name = hickory_proto::rr::Name::from_ascii(name).expect("name");
        table.get(&wire_key(&name)).is_some()
    }

    /// `n` ClusterSetIP services in 100 namespaces, plus one headless service `db.ns0`.
    fn big_snapshot(n: usize) -> ImportSnapshot {
        let mut snap = ImportSnapshot { local_cluster: Some(cid("east")), ..Default::default() };
        for i in 0..n {
            let ns = format!("ns{}", i % 100);
            let name = format!("svc{i}");
            let key = ServiceKey::new(&ns, &name);
            let ip = format!("242.1.{}.{}", i / 250, i % 250 + 1);
            let e = export(&key, "east", ServiceType::ClusterSetIP, vec![]);
            snap.services.insert(
                key,
                Arc::new(import(&ns, &name, ServiceType::ClusterSetIP, &[&ip], vec![e])),
            );
        }
        snap.services.insert(ServiceKey::new("ns0", "db"), Arc::new(headless(Health::Healthy)));
        snap
    }

    fn headless(health: Health) -> ImportedService {
        let key = ServiceKey::new("ns0", "db");
        let eps = vec![ep("10.0.0.1", None, true, health), ep("10.0.0.2", None, true, health)];
        import(
            "ns0",
            "db",
            ServiceType::Headless,
            &[],
            vec![export(&key, "east", ServiceType::Headless, eps)],
        )
    }

    #[test]
    fn one_changed_service_rebuilds_one_service() {
        let (table, mut w) = writer();
        let snap = big_snapshot(10_000);
        let started = Instant::now();
        let stats = w.apply_imports(&snap);
        let full = started.elapsed();
        assert_eq!(stats.services_rebuilt, 10_001);
        let names = table.len();
        assert!(names > 30_000, "{names}");

        // One endpoint of the headless service changes.
        let mut next = snap.clone();
        let db = ServiceKey::new("ns0", "db");
        let mut changed = headless(Health::Healthy);
        if let Some(c) = changed.clusters.get_mut(&cid("east")) {
            let mut e = (**c).clone();
            e.endpoints[1].ready = false;
            *c = Arc::new(e);
        }
        next.services.insert(db, Arc::new(changed));
        let started = Instant::now();
        let stats = w.apply_imports(&next);
        let incremental = started.elapsed();
        assert_eq!(stats.services_rebuilt, 1);
        assert_eq!(stats.services_removed, 0);
        // The service's A set, SRV set and the gone per-host name.
        assert!(stats.names_changed <= 3, "{stats:?}");
        assert!(!has(&table, "10-0-0-2.east.db.ns0.svc.clusterset.local."));
        assert!(has(&table, "10-0-0-1.east.db.ns0.svc.clusterset.local."));
        eprintln!("10k services: full build {full:?}, one-endpoint update {incremental:?}");

        // Same snapshot again: nothing to do.
        assert_eq!(w.apply_imports(&next).services_rebuilt, 0);
        // Reachability changes rebuild headless services only.
        let mut unreachable = next.clone();
        unreachable.unreachable.insert(cid("west"));
        assert_eq!(w.apply_imports(&unreachable).services_rebuilt, 1);
    }

    #[test]
    fn namespaces_exist_while_a_service_does() {
        let (table, mut w) = writer();
        let snap = big_snapshot(200);
        w.apply_imports(&snap);
        assert!(has(&table, "ns0.svc.clusterset.local."));
        assert!(has(&table, "svc0.ns0.svc.clusterset.local."));
        let mut fewer = snap.clone();
        fewer.services.retain(|k, _| k.namespace != "ns0" || k.name == "svc0");
        let stats = w.apply_imports(&fewer);
        assert_eq!(stats.services_removed, 2);
        assert!(has(&table, "ns0.svc.clusterset.local."));
        assert!(!has(&table, "svc100.ns0.svc.clusterset.local."));
        fewer.services.retain(|k, _| k.namespace != "ns0");
        w.apply_imports(&fewer);
        assert!(!has(&table, "ns0.svc.clusterset.local."));
        assert!(has(&table, "ns1.svc.clusterset.local."));
        // Static names survive everything.
        w.apply_imports(&ImportSnapshot::default());
        assert!(has(&table, "dns-version.clusterset.local."));
        assert!(has(&table, "svc.clusterset.local."));
        assert!(!has(&table, "ns1.svc.clusterset.local."));
    }

    #[test]
    fn cluster_state_updates_are_incremental() {
        let (table, mut w) = writer();
        let mut state = ClusterState::default();
        let key = ServiceKey::new("ns", "api");
        let svc = LocalService {
            key: key.clone(),
            kube_type: "ClusterIP".into(),
            cluster_ips: vec!["10.96.0.1".parse().expect("ip")],
            headless: false,
            ports: vec![],
            session_affinity: Default::default(),
            internal_traffic_policy: None,
            traffic_distribution: None,
            ip_families: vec![],
            endpoints: vec![],
        };
        state.services.insert(key.clone(), Arc::new(svc.clone()));
        assert_eq!(w.apply_cluster(&state).services_rebuilt, 1);
        assert_eq!(w.apply_cluster(&state).services_rebuilt, 0);
        assert!(has(&table, "api.ns.svc.cluster.local."));
        assert!(!has(&table, "api.ns.svc.clusterset.local."));
        state.services.clear();
        assert_eq!(w.apply_cluster(&state).services_removed, 1);
        assert!(!has(&table, "api.ns.svc.cluster.local."));
        assert!(!has(&table, "ns.svc.cluster.local."));
    }
}
