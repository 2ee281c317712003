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
use hickory_proto::rr::{Name, Record};

use crate::names::Zone;
use crate::records::{
    ImportContext, NameMap, Ptrs, import_records, local_records, namespace_ent, ptr_names, soa,
    static_names,
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
    ptrs: Ptrs,
}

struct LocalState {
    svc: Arc<LocalService>,
    names: Names,
    ptrs: Ptrs,
}

/// Who asked for a PTR target: a service of one zone.
type PtrOwner = (Zone, ServiceKey);

/// One reverse name: the targets each service asks for, merged into one PTR set.
#[derive(Default)]
struct ReverseState {
    owners: BTreeMap<PtrOwner, Vec<Name>>,
    /// What the table holds for the name now.
    entry: Option<Arc<Entry>>,
}

/// Inputs shared by every headless import; a change rebuilds all headless services.
#[derive(Clone, PartialEq, Eq)]
struct Globals {
    local_cluster: Option<ClusterId>,
    localities: BTreeMap<ClusterId, Locality>,
    unreachable: BTreeSet<ClusterId>,
    flat: BTreeSet<ClusterId>,
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
    soas: [Record; Zone::COUNT],
    priority: Vec<PriorityLabel>,
    extra_labels: BTreeMap<String, String>,
    imports: HashMap<ServiceKey, ImportState>,
    locals: HashMap<ServiceKey, LocalState>,
    namespaces: HashMap<(Zone, String), usize>,
    /// PTR records, merged over the services that name each address.
    reverse: HashMap<IpAddr, ReverseState>,
    globals: Option<Globals>,
    nodata: SharedNodata,
}

fn zone_index(zone: Zone) -> usize {
    zone.index()
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
        let soas = [Zone::ClusterSet, Zone::Cluster, Zone::ReverseV4, Zone::ReverseV6]
            .map(|zone| soa(zone, ttl, serial));
        let mut writer = Self {
            table,
            ttl,
            soas,
            priority,
            extra_labels,
            imports: HashMap::new(),
            locals: HashMap::new(),
            namespaces: HashMap::new(),
            reverse: HashMap::new(),
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

    /// Replaces the PTR targets `owner` asks for (`old` → `new`), noting the addresses whose
    /// set may change in `dirty`.
    fn set_ptrs(&mut self, owner: &PtrOwner, old: &Ptrs, new: &Ptrs, dirty: &mut Vec<IpAddr>) {
        if old == new {
            return;
        }
        for (ip, _) in old {
            if let Some(state) = self.reverse.get_mut(ip) {
                state.owners.remove(owner);
            }
            dirty.push(*ip);
        }
        for (ip, target) in new {
            let state = self.reverse.entry(*ip).or_default();
            state.owners.entry(owner.clone()).or_default().push(target.clone());
            dirty.push(*ip);
        }
    }

    /// Rewrites the PTR names of `dirty` addresses from their owners' targets.
    fn flush_ptrs(&mut self, mut dirty: Vec<IpAddr>, changes: &mut Vec<Change>) {
        dirty.sort_unstable();
        dirty.dedup();
        for ip in dirty {
            let targets: std::collections::BTreeSet<Name> = self
                .reverse
                .get(&ip)
                .map(|s| s.owners.values().flatten().cloned().collect())
                .unwrap_or_default();
            if targets.is_empty() {
                if let Some(entry) = self.reverse.remove(&ip).and_then(|s| s.entry) {
                    changes.push(entry.removal());
                }
                continue;
            }
            let data = ptr_names(ip, &targets, self.ttl);
            let zone = Zone::reverse_of(ip);
            let entry = Entry::build(zone, &data, &self.soas[zone_index(zone)], &mut self.nodata);
            let Some(state) = self.reverse.get_mut(&ip) else { continue };
            if state.entry.as_deref() == Some(&entry) {
                continue;
            }
            let entry = Arc::new(entry);
            state.entry = Some(entry.clone());
            changes.push(Change::Put(entry));
        }
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

    /// Withdraws the names of services gone from `zone` (taken out by [`take_gone`]), their
    /// PTR targets and their hold on their namespace; returns how many there were.
    fn withdraw(
        &mut self,
        zone: Zone,
        gone: Vec<(ServiceKey, Names, Ptrs)>,
        changes: &mut Vec<Change>,
        dirty: &mut Vec<IpAddr>,
    ) -> usize {
        for (key, names, ptrs) in &gone {
            changes.extend(names.iter().map(|e| e.removal()));
            self.set_ptrs(&(zone, key.clone()), ptrs, &Ptrs::new(), dirty);
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
            flat: snap.flat.clone(),
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
        let mut dirty = Vec::new();
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
                flat: &globals.flat,
            };
            let published = import_records(svc, &cx);
            let names = self.diff(
                previous.as_ref().map_or(&[], |p| &p.names),
                &published.names,
                &mut changes,
            );
            let old_ptrs = previous.as_ref().map(|p| p.ptrs.clone()).unwrap_or_default();
            let owner = (Zone::ClusterSet, key.clone());
            self.set_ptrs(&owner, &old_ptrs, &published.ptrs, &mut dirty);
            if previous.is_none() {
                self.namespace_ref(Zone::ClusterSet, &key.namespace, 1, &mut changes);
            }
            stats.services_rebuilt += 1;
            let ptrs = published.ptrs;
            self.imports.insert(key.clone(), ImportState { svc: svc.clone(), vips, names, ptrs });
        }
        let gone =
            take_gone(&mut self.imports, |k| snap.services.contains_key(k), |s| (s.names, s.ptrs));
        stats.services_removed += self.withdraw(Zone::ClusterSet, gone, &mut changes, &mut dirty);
        self.flush_ptrs(dirty, &mut changes);
        self.globals = Some(globals);
        stats.names_changed = changes.len();
        self.table.apply(changes);
        stats
    }

    /// Brings `cluster.local` in line with the local cluster's state.
    pub fn apply_cluster(&mut self, state: &ClusterState) -> UpdateStats {
        let mut stats = UpdateStats::default();
        let mut changes = Vec::new();
        let mut dirty = Vec::new();
        for (key, svc) in &state.services {
            if self.locals.get(key).is_some_and(|p| Arc::ptr_eq(&p.svc, svc)) {
                continue;
            }
            let previous = self.locals.remove(key);
            let published = local_records(svc, self.ttl);
            let names = self.diff(
                previous.as_ref().map_or(&[], |p| &p.names),
                &published.names,
                &mut changes,
            );
            let old_ptrs = previous.as_ref().map(|p| p.ptrs.clone()).unwrap_or_default();
            self.set_ptrs(&(Zone::Cluster, key.clone()), &old_ptrs, &published.ptrs, &mut dirty);
            if previous.is_none() {
                self.namespace_ref(Zone::Cluster, &key.namespace, 1, &mut changes);
            }
            stats.services_rebuilt += 1;
            let ptrs = published.ptrs;
            self.locals.insert(key.clone(), LocalState { svc: svc.clone(), names, ptrs });
        }
        let gone =
            take_gone(&mut self.locals, |k| state.services.contains_key(k), |s| (s.names, s.ptrs));
        stats.services_removed += self.withdraw(Zone::Cluster, gone, &mut changes, &mut dirty);
        self.flush_ptrs(dirty, &mut changes);
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
    names: fn(V) -> (Names, Ptrs),
) -> Vec<(ServiceKey, Names, Ptrs)> {
    let gone: Vec<ServiceKey> = map.keys().filter(|k| !kept(k)).cloned().collect();
    gone.into_iter()
        .filter_map(|k| {
            map.remove(&k).map(|v| {
                let (names, ptrs) = names(v);
                (k, names, ptrs)
            })
        })
        .collect()
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
        // The service's A+SRV sets, its `_http._tcp` SRV set, the gone per-host name and the
        // gone endpoint's PTR (the other endpoint's PTR is unchanged, so not rewritten).
        assert!(stats.names_changed <= 4, "{stats:?}");
        assert!(!has(&table, "2.0.0.10.in-addr.arpa."));
        assert!(has(&table, "1.0.0.10.in-addr.arpa."));
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

    fn ptr_targets(table: &Table, name: &str) -> Vec<String> {
        let name = hickory_proto::rr::Name::from_ascii(name).expect("name");
        let Some(entry) = table.get(&wire_key(&name)) else { return Vec::new() };
        let records = entry.records(hickory_proto::rr::RecordType::PTR).expect("decodes");
        records.iter().map(|r| r.data.to_string()).collect()
    }

    /// One pod address behind two headless services, in both zones: one PTR set with every
    /// name; it shrinks as services go and disappears with the last one.
    #[test]
    fn ptr_sets_merge_services_and_zones() {
        let (table, mut w) = writer();
        let db = ServiceKey::new("ns0", "db");
        let other = ServiceKey::new("ns0", "db2");
        let eps = || vec![ep("10.0.0.1", Some("pod-0"), true, Health::Healthy)];
        let headless_import = |key: &ServiceKey| {
            let e = export(key, "east", ServiceType::Headless, eps());
            Arc::new(import(&key.namespace, &key.name, ServiceType::Headless, &[], vec![e]))
        };
        let mut snap = ImportSnapshot { local_cluster: Some(cid("east")), ..Default::default() };
        snap.services.insert(db.clone(), headless_import(&db));
        snap.services.insert(other.clone(), headless_import(&other));
        w.apply_imports(&snap);
        let mut state = ClusterState::default();
        state.services.insert(
            db.clone(),
            Arc::new(LocalService {
                key: db.clone(),
                kube_type: "ClusterIP".into(),
                cluster_ips: vec![],
                headless: true,
                ports: vec![],
                session_affinity: Default::default(),
                internal_traffic_policy: None,
                traffic_distribution: None,
                ip_families: vec![],
                endpoints: eps(),
            }),
        );
        w.apply_cluster(&state);
        let name = "1.0.0.10.in-addr.arpa.";
        assert_eq!(
            ptr_targets(&table, name),
            vec![
                "pod-0.db.ns0.svc.cluster.local.",
                "pod-0.east.db.ns0.svc.clusterset.local.",
                "pod-0.east.db2.ns0.svc.clusterset.local.",
            ]
        );
        snap.services.remove(&other);
        w.apply_imports(&snap);
        assert_eq!(
            ptr_targets(&table, name),
            vec!["pod-0.db.ns0.svc.cluster.local.", "pod-0.east.db.ns0.svc.clusterset.local."]
        );
        w.apply_imports(&ImportSnapshot::default());
        assert_eq!(ptr_targets(&table, name), vec!["pod-0.db.ns0.svc.cluster.local."]);
        w.apply_cluster(&ClusterState::default());
        assert!(!has(&table, name));
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
