//! The zone writer: turns discovery snapshots into table changes, rebuilding only services
//! whose inputs changed and re-encoding only names whose records changed.

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
use crate::table::{Change, Entry, Table};
use crate::tier::PriorityLabel;

type Vips = BTreeMap<(ClusterId, IpAddr), IpAddr>;

struct ImportState {
    svc: Arc<ImportedService>,
    vips: Vips,
    names: NameMap,
}

struct LocalState {
    svc: Arc<LocalService>,
    names: NameMap,
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
    ) -> Self {
        let soas = [soa(Zone::ClusterSet, ttl, serial), soa(Zone::Cluster, ttl, serial)];
        let writer = Self {
            table,
            ttl,
            soas,
            priority,
            extra_labels,
            imports: HashMap::new(),
            locals: HashMap::new(),
            namespaces: HashMap::new(),
            globals: None,
        };
        let mut changes = Vec::new();
        writer.diff(&NameMap::new(), &static_names(ttl, serial), &mut changes);
        writer.table.apply(changes);
        writer
    }

    /// The SOA record of a zone (negative answers carry it).
    pub fn soa(&self, zone: Zone) -> &Record {
        &self.soas[zone_index(zone)]
    }

    fn diff(&self, old: &NameMap, new: &NameMap, changes: &mut Vec<Change>) {
        for (key, data) in new {
            if old.get(key) != Some(data) {
                let zone = data.zone.unwrap_or(Zone::ClusterSet);
                let entry = Entry::build(zone, data.clone(), self.soa(zone));
                changes.push((key.clone(), Some(Arc::new(entry))));
            }
        }
        for key in old.keys() {
            if !new.contains_key(key) {
                changes.push((key.clone(), None));
            }
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
        let key = crate::names::wire_key(&ent.name);
        if before == 0 && after > 0 {
            let entry = Entry::build(zone, ent, self.soa(zone));
            changes.push((key, Some(Arc::new(entry))));
        } else if before > 0 && after == 0 {
            changes.push((key, None));
        }
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
            let previous = self.imports.remove(key);
            let rebuild = match &previous {
                None => true,
                Some(p) => {
                    !Arc::ptr_eq(&p.svc, svc)
                        || (svc.service_type == ServiceType::Headless
                            && (globals_changed || p.vips != vips))
                }
            };
            if !rebuild {
                if let Some(p) = previous {
                    self.imports.insert(key.clone(), p);
                }
                continue;
            }
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
            let empty = NameMap::new();
            self.diff(previous.as_ref().map_or(&empty, |p| &p.names), &names, &mut changes);
            if previous.is_none() {
                self.namespace_ref(Zone::ClusterSet, &key.namespace, 1, &mut changes);
            }
            stats.services_rebuilt += 1;
            self.imports.insert(key.clone(), ImportState { svc: svc.clone(), vips, names });
        }
        let gone: Vec<ServiceKey> =
            self.imports.keys().filter(|k| !snap.services.contains_key(*k)).cloned().collect();
        for key in gone {
            if let Some(old) = self.imports.remove(&key) {
                self.diff(&old.names, &NameMap::new(), &mut changes);
                self.namespace_ref(Zone::ClusterSet, &key.namespace, -1, &mut changes);
                stats.services_removed += 1;
            }
        }
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
            let previous = match self.locals.remove(key) {
                Some(p) if Arc::ptr_eq(&p.svc, svc) => {
                    self.locals.insert(key.clone(), p);
                    continue;
                }
                other => other,
            };
            let names = local_names(svc, self.ttl);
            let empty = NameMap::new();
            self.diff(previous.as_ref().map_or(&empty, |p| &p.names), &names, &mut changes);
            if previous.is_none() {
                self.namespace_ref(Zone::Cluster, &key.namespace, 1, &mut changes);
            }
            stats.services_rebuilt += 1;
            self.locals.insert(key.clone(), LocalState { svc: svc.clone(), names });
        }
        let gone: Vec<ServiceKey> =
            self.locals.keys().filter(|k| !state.services.contains_key(*k)).cloned().collect();
        for key in gone {
            if let Some(old) = self.locals.remove(&key) {
                self.diff(&old.names, &NameMap::new(), &mut changes);
                self.namespace_ref(Zone::Cluster, &key.namespace, -1, &mut changes);
                stats.services_removed += 1;
            }
        }
        stats.names_changed = changes.len();
        self.table.apply(changes);
        stats
    }
}
