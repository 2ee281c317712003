//! MCS semantics (KEP-1645) as pure functions: which local services are exported and whether
//! their ServiceExports are valid, how the exports of every cluster merge into one import,
//! which conflicts that raises, and the conditions each ServiceExport gets.
//!
//! Nothing here does I/O or keeps state: the tasks in `exports` and `imports` call these with
//! the previous result so unchanged values keep their `Arc` (consumers diff by pointer).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{
    ClusterId, ClusterState, Condition, ConditionStatus, ConflictInfo, Endpoint, ExportedService,
    HealthMap, ImportPort, ImportedService, LocalService, ServiceExportObject, ServiceKey,
    ServicePort, ServiceType, SessionAffinity,
};

/// Condition types on a ServiceExport.
pub const CONDITION_VALID: &str = "Valid";
pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_CONFLICT: &str = "Conflict";

/// Condition reasons (mcs-api).
pub const REASON_VALID: &str = "Valid";
pub const REASON_NO_SERVICE: &str = "NoService";
pub const REASON_INVALID_SERVICE_TYPE: &str = "InvalidServiceType";
pub const REASON_EXPORTED: &str = "Exported";
pub const REASON_PENDING: &str = "Pending";
pub const REASON_FAILED: &str = "Failed";
pub const REASON_NO_CONFLICTS: &str = "NoConflicts";
pub const REASON_PORT_CONFLICT: &str = "PortConflict";
pub const REASON_TYPE_CONFLICT: &str = "TypeConflict";
pub const REASON_SESSION_AFFINITY_CONFLICT: &str = "SessionAffinityConflict";
pub const REASON_SESSION_AFFINITY_CONFIG_CONFLICT: &str = "SessionAffinityConfigConflict";
pub const REASON_ANNOTATIONS_CONFLICT: &str = "AnnotationsConflict";
pub const REASON_LABELS_CONFLICT: &str = "LabelsConflict";
pub const REASON_INTERNAL_TRAFFIC_POLICY_CONFLICT: &str = "InternalTrafficPolicyConflict";
pub const REASON_TRAFFIC_DISTRIBUTION_CONFLICT: &str = "TrafficDistributionConflict";
pub const REASON_IP_FAMILY_CONFLICT: &str = "IPFamilyConflict";

/// Whether a local ServiceExport can be exported (its `Valid` condition).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Validity {
    /// The Service exists and can be exported.
    Valid,
    /// There is no Service with the ServiceExport's namespace and name.
    NoService,
    /// The Service is of type ExternalName, which cannot be exported.
    InvalidServiceType,
}

impl Validity {
    pub fn is_valid(self) -> bool {
        self == Validity::Valid
    }

    /// The `Valid` condition's reason.
    pub fn reason(self) -> &'static str {
        match self {
            Validity::Valid => REASON_VALID,
            Validity::NoService => REASON_NO_SERVICE,
            Validity::InvalidServiceType => REASON_INVALID_SERVICE_TYPE,
        }
    }

    /// The `Valid` condition of the export of `key`.
    pub fn condition(self, key: &ServiceKey) -> Condition {
        let (status, message) = match self {
            Validity::Valid => (ConditionStatus::True, format!("service {key} is exported")),
            Validity::NoService => (
                ConditionStatus::False,
                format!("service {key} does not exist; create it or delete the ServiceExport"),
            ),
            Validity::InvalidServiceType => (
                ConditionStatus::False,
                format!("service {key} is of type ExternalName, which cannot be exported"),
            ),
        };
        Condition {
            type_: CONDITION_VALID.to_owned(),
            status,
            reason: self.reason().to_owned(),
            message,
        }
    }
}

/// The local exports: what this cluster tells its peers, and the validity of every
/// ServiceExport object (valid or not).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalExportsOutcome {
    pub services: BTreeMap<ServiceKey, Arc<ExportedService>>,
    pub validity: BTreeMap<ServiceKey, Validity>,
}

/// What `cluster` exports given its state and the health its checks observed. Services equal
/// to their value in `prev` keep `prev`'s `Arc`.
pub fn compute_exports(
    state: &ClusterState,
    cluster: &ClusterId,
    health: &HealthMap,
    prev: &BTreeMap<ServiceKey, Arc<ExportedService>>,
) -> LocalExportsOutcome {
    let mut out = LocalExportsOutcome { services: BTreeMap::new(), validity: BTreeMap::new() };
    for (key, export) in &state.exports {
        let service = state.services.get(key).map(|s| &**s);
        match export_one(export, service, cluster, health) {
            Ok(exported) => {
                out.services.insert(key.clone(), reuse(prev.get(key), exported));
                out.validity.insert(key.clone(), Validity::Valid);
            }
            Err(invalid) => {
                out.validity.insert(key.clone(), invalid);
            }
        }
    }
    out
}

/// Like [`compute_exports`], but recomputes only the services in `dirty` (see
/// [`changed_local_keys`]); everything else is carried over from `prev` as is.
pub fn update_exports(
    state: &ClusterState,
    cluster: &ClusterId,
    health: &HealthMap,
    prev: LocalExportsOutcome,
    dirty: &BTreeSet<ServiceKey>,
) -> LocalExportsOutcome {
    let mut out = prev;
    for key in dirty {
        let old = out.services.remove(key);
        out.validity.remove(key);
        let Some(export) = state.exports.get(key) else { continue };
        let service = state.services.get(key).map(|s| &**s);
        match export_one(export, service, cluster, health) {
            Ok(exported) => {
                out.services.insert(key.clone(), reuse(old.as_ref(), exported));
                out.validity.insert(key.clone(), Validity::Valid);
            }
            Err(invalid) => {
                out.validity.insert(key.clone(), invalid);
            }
        }
    }
    out
}

/// The services whose export may differ between two states of the cluster and its health:
/// those whose Service or ServiceExport `Arc` changed, or one of whose endpoints' health did.
pub fn changed_local_keys(
    old: &ClusterState,
    new: &ClusterState,
    old_health: &HealthMap,
    new_health: &HealthMap,
) -> BTreeSet<ServiceKey> {
    let mut dirty = BTreeSet::new();
    changed_keys_by_ptr(&old.services, &new.services, &mut dirty);
    changed_keys_by_ptr(&old.exports, &new.exports, &mut dirty);
    if !std::ptr::eq(old_health, new_health) {
        changed_keys_of(old_health, new_health, |(key, _)| key, &mut dirty);
    }
    dirty
}

/// Adds to `out` every key present in only one of the maps or whose `Arc`s differ by pointer.
/// A merge walk over both sorted maps: linear, no allocation for unchanged entries.
pub fn changed_keys_by_ptr<K: Ord + Clone, V>(
    old: &BTreeMap<K, Arc<V>>,
    new: &BTreeMap<K, Arc<V>>,
    out: &mut BTreeSet<K>,
) {
    merge_walk(old, new, |k, a, b| {
        let same = matches!((a, b), (Some(a), Some(b)) if Arc::ptr_eq(a, b));
        if !same {
            out.insert(k.clone());
        }
    });
}

/// Adds `group(key)` for every entry that differs between the two maps.
fn changed_keys_of<K: Ord, V: PartialEq, G: Ord + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    group: impl Fn(&K) -> &G,
    out: &mut BTreeSet<G>,
) {
    merge_walk(old, new, |k, a, b| {
        if a != b {
            out.insert(group(k).clone());
        }
    });
}

fn merge_walk<K: Ord, V>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    mut visit: impl FnMut(&K, Option<&V>, Option<&V>),
) {
    let mut a = old.iter().peekable();
    let mut b = new.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return,
            (Some((ka, va)), None) => {
                visit(ka, Some(va), None);
                a.next();
            }
            (None, Some((kb, vb))) => {
                visit(kb, None, Some(vb));
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    visit(ka, Some(va), None);
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    visit(kb, None, Some(vb));
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    visit(ka, Some(va), Some(vb));
                    a.next();
                    b.next();
                }
            },
        }
    }
}

fn reuse<T: PartialEq>(prev: Option<&Arc<T>>, value: T) -> Arc<T> {
    match prev {
        Some(p) if **p == value => Arc::clone(p),
        _ => Arc::new(value),
    }
}

/// The export of one ServiceExport, or why it is not valid.
pub fn export_one(
    export: &ServiceExportObject,
    service: Option<&LocalService>,
    cluster: &ClusterId,
    health: &HealthMap,
) -> Result<ExportedService, Validity> {
    let service = service.ok_or(Validity::NoService)?;
    if service.kube_type == "ExternalName" {
        return Err(Validity::InvalidServiceType);
    }
    let endpoints = service
        .endpoints
        .iter()
        .map(|ep| Endpoint {
            health: health.get(&(export.key.clone(), ep.address)).copied().unwrap_or(ep.health),
            ..ep.clone()
        })
        .collect();
    Ok(ExportedService {
        key: export.key.clone(),
        cluster: cluster.clone(),
        service_type: if service.is_headless() {
            ServiceType::Headless
        } else {
            ServiceType::ClusterSetIP
        },
        ports: service.ports.clone(),
        session_affinity: service.session_affinity.clone(),
        internal_traffic_policy: service.internal_traffic_policy.clone(),
        traffic_distribution: service.traffic_distribution.clone(),
        ip_families: service.ip_families.clone(),
        labels: export.exported_labels.clone(),
        annotations: export.exported_annotations.clone(),
        created: export.created,
        endpoints,
    })
}

/// Precedence of exports: oldest `creationTimestamp` first, ties to the lower cluster id.
fn precedence(a: &ExportedService, b: &ExportedService) -> std::cmp::Ordering {
    (a.created, &a.cluster).cmp(&(b.created, &b.cluster))
}

/// A property value in force and the cluster it comes from.
struct Resolved<T> {
    value: T,
    winner: ClusterId,
}

/// Which value of a property is in force.
///
/// The oldest export wins, except that a value the import already had stays in force while a
/// remaining export still holds it and every export older than that holder was already there
/// with the same value (so the only way the old value could lose is that its holder left).
/// That keeps the import stable when the oldest exporter leaves, yet follows the oldest export
/// when it changes and lets an older export that joins take over (KEP-1645: "the ServiceImport
/// may be left as is rather than changed").
fn resolve<T: PartialEq + Clone>(
    ordered: &[&Arc<ExportedService>],
    prev: Option<&ImportedService>,
    get: impl Fn(&ExportedService) -> T,
    prev_value: impl Fn(&ImportedService) -> T,
) -> Resolved<T> {
    let oldest = ordered[0];
    if let Some(prev) = prev {
        let kept = prev_value(prev);
        if let Some(pos) = ordered.iter().position(|e| get(e) == kept) {
            let older_unchanged = ordered[..pos]
                .iter()
                .all(|e| prev.clusters.get(&e.cluster).is_some_and(|p| get(p) == get(e)));
            if older_unchanged {
                return Resolved { value: kept, winner: ordered[pos].cluster.clone() };
            }
        }
    }
    Resolved { value: get(oldest), winner: oldest.cluster.clone() }
}

/// Where the value in force comes from, for conflict messages.
fn origin(winner: &ClusterId, oldest: &ClusterId) -> String {
    if winner == oldest {
        format!("from oldest service export in \"{winner}\"")
    } else {
        format!("from service export in \"{winner}\", kept stable after the oldest exporter left")
    }
}

fn conflict_of<T: PartialEq>(
    reason: &str,
    what: &str,
    shown: &str,
    resolved: &Resolved<T>,
    ordered: &[&Arc<ExportedService>],
    disagrees: impl Fn(&ExportedService) -> bool,
) -> Option<ConflictInfo> {
    let disagreeing: BTreeSet<ClusterId> =
        ordered.iter().filter(|e| disagrees(e)).map(|e| e.cluster.clone()).collect();
    if disagreeing.is_empty() {
        return None;
    }
    let message = format!(
        "Conflicting {what}. Using {shown} {}. {}/{} clusters disagree.",
        origin(&resolved.winner, &ordered[0].cluster),
        disagreeing.len(),
        ordered.len()
    );
    Some(ConflictInfo {
        reason: reason.to_owned(),
        winner: resolved.winner.clone(),
        disagreeing,
        message,
    })
}

fn quoted_opt(v: &Option<String>) -> String {
    v.as_ref().map_or_else(|| "unset".to_owned(), |v| format!("\"{v}\""))
}

fn shown_map(map: &BTreeMap<String, String>) -> String {
    const MAX: usize = 120;
    let mut out = String::from("{");
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{k}={v}");
        if out.len() > MAX {
            out.truncate(MAX);
            out.push('…');
            break;
        }
    }
    out.push('}');
    out
}

fn shown_port(p: &ServicePort) -> String {
    match &p.name {
        Some(n) => format!("\"{n}\" {}/{}", p.protocol.as_str(), p.port),
        None => format!("{}/{}", p.protocol.as_str(), p.port),
    }
}

fn affinity_kind(a: &SessionAffinity) -> &'static str {
    match a {
        SessionAffinity::None => "None",
        SessionAffinity::ClientIP { .. } => "ClientIP",
    }
}

/// A port as the clusterset sees it: `targetPort` only means something inside its own
/// cluster, so it takes no part in merging.
fn clusterset_port(p: &ServicePort) -> ServicePort {
    ServicePort { name: p.name.clone().filter(|n| !n.is_empty()), target_port: None, ..p.clone() }
}

fn same_ports(a: &[ServicePort], b: &[ServicePort]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| clusterset_port(x) == clusterset_port(y))
}

/// The union of all ports, matched by name first, then by (protocol, port). A port that
/// cannot join (same name but another protocol/number, or a clash with a port already in
/// force) is dropped for its cluster; a port not exposed by every cluster is a conflict too.
/// Ports kept from `prev` follow the same stability rule as the other properties.
fn merge_ports(
    ordered: &[&Arc<ExportedService>],
    prev: Option<&ImportedService>,
) -> (Vec<ImportPort>, Option<ConflictInfo>) {
    let mut merged: Vec<ImportPort> = Vec::new();
    let mut winner = ordered[0].cluster.clone();
    if let Some(prev) = prev {
        for pp in &prev.ports {
            let holds = |e: &ExportedService| e.ports.iter().any(|p| clusterset_port(p) == pp.port);
            let Some(pos) = ordered.iter().position(|e| holds(e)) else { continue };
            let older_unchanged = ordered[..pos].iter().all(|e| {
                prev.clusters.get(&e.cluster).is_some_and(|p| same_ports(&p.ports, &e.ports))
            });
            if older_unchanged {
                if merged.is_empty() {
                    winner = ordered[pos].cluster.clone();
                }
                merged.push(ImportPort { port: pp.port.clone(), clusters: BTreeSet::new() });
            }
        }
    }
    let mut disagreeing = BTreeSet::new();
    for e in ordered {
        for p in &e.ports {
            let p = clusterset_port(p);
            // Names match first, the empty name included (KEP-1645: no two ports may share a
            // name, "including unnamed/empty name").
            let by_name = merged.iter().position(|m| m.port.name == p.name);
            if let Some(i) = by_name {
                if merged[i].port == p {
                    merged[i].clusters.insert(e.cluster.clone());
                } else {
                    // Same name, another protocol, number or app protocol: the one in force
                    // stays, this cluster does not serve it.
                    disagreeing.insert(e.cluster.clone());
                }
                continue;
            }
            if let Some(i) =
                merged.iter().position(|m| m.port.protocol == p.protocol && m.port.port == p.port)
            {
                // The same port under another name (or app protocol): the cluster serves the
                // port, but the definitions disagree.
                if merged[i].port != p {
                    disagreeing.insert(e.cluster.clone());
                }
                merged[i].clusters.insert(e.cluster.clone());
                continue;
            }
            merged.push(ImportPort { port: p, clusters: BTreeSet::from([e.cluster.clone()]) });
        }
    }
    merged.retain(|m| !m.clusters.is_empty());
    for e in ordered {
        if merged.iter().any(|m| !m.clusters.contains(&e.cluster)) {
            disagreeing.insert(e.cluster.clone());
        }
    }
    if disagreeing.is_empty() {
        return (merged, None);
    }
    let shown: Vec<String> = merged.iter().map(|m| shown_port(&m.port)).collect();
    let message = format!(
        "Conflicting ports. Using [{}] {}; a port gets traffic only in the clusters that expose \
         it. {}/{} clusters disagree.",
        shown.join(", "),
        origin(&winner, &ordered[0].cluster),
        disagreeing.len(),
        ordered.len()
    );
    let conflict =
        ConflictInfo { reason: REASON_PORT_CONFLICT.to_owned(), winner, disagreeing, message };
    (merged, Some(conflict))
}

/// The import of `key` from the exports of every cluster that exports it (any order, at most
/// one per cluster), or `None` when no cluster exports it any more. `prev` is the import as
/// it was, for stability. `ips` is left empty: the caller allocates them.
pub fn merge(
    key: &ServiceKey,
    exports: &[&Arc<ExportedService>],
    prev: Option<&ImportedService>,
) -> Option<ImportedService> {
    let mut ordered: Vec<&Arc<ExportedService>> = exports.to_vec();
    ordered.sort_by(|a, b| precedence(a, b));
    ordered.dedup_by(|a, b| a.cluster == b.cluster);
    let ordered = ordered.as_slice();
    if ordered.is_empty() {
        return None;
    }
    let mut conflicts = Vec::new();

    let (ports, port_conflict) = merge_ports(ordered, prev);
    conflicts.extend(port_conflict);

    let service_type = resolve(ordered, prev, |e| e.service_type, |p| p.service_type);
    conflicts.extend(conflict_of(
        REASON_TYPE_CONFLICT,
        "type",
        &format!("\"{}\"", service_type.value.as_str()),
        &service_type,
        ordered,
        |e| e.service_type != service_type.value,
    ));

    let affinity =
        resolve(ordered, prev, |e| e.session_affinity.clone(), |p| p.session_affinity.clone());
    let kind = affinity_kind(&affinity.value);
    conflicts.extend(conflict_of(
        REASON_SESSION_AFFINITY_CONFLICT,
        "session affinity",
        &format!("\"{kind}\""),
        &affinity,
        ordered,
        |e| affinity_kind(&e.session_affinity) != kind,
    ));
    let timeout_shown = match &affinity.value {
        SessionAffinity::ClientIP { timeout_seconds: Some(t) } => format!("timeoutSeconds {t}"),
        _ => "the default timeout".to_owned(),
    };
    conflicts.extend(conflict_of(
        REASON_SESSION_AFFINITY_CONFIG_CONFLICT,
        "session affinity config",
        &timeout_shown,
        &affinity,
        ordered,
        |e| affinity_kind(&e.session_affinity) == kind && e.session_affinity != affinity.value,
    ));

    let annotations = resolve(ordered, prev, |e| e.annotations.clone(), |p| p.annotations.clone());
    conflicts.extend(conflict_of(
        REASON_ANNOTATIONS_CONFLICT,
        "annotations",
        &shown_map(&annotations.value),
        &annotations,
        ordered,
        |e| e.annotations != annotations.value,
    ));

    let labels = resolve(ordered, prev, |e| e.labels.clone(), |p| p.labels.clone());
    conflicts.extend(conflict_of(
        REASON_LABELS_CONFLICT,
        "labels",
        &shown_map(&labels.value),
        &labels,
        ordered,
        |e| e.labels != labels.value,
    ));

    let itp = resolve(
        ordered,
        prev,
        |e| e.internal_traffic_policy.clone(),
        |p| p.internal_traffic_policy.clone(),
    );
    conflicts.extend(conflict_of(
        REASON_INTERNAL_TRAFFIC_POLICY_CONFLICT,
        "internal traffic policy",
        &quoted_opt(&itp.value),
        &itp,
        ordered,
        |e| e.internal_traffic_policy != itp.value,
    ));

    let td = resolve(
        ordered,
        prev,
        |e| e.traffic_distribution.clone(),
        |p| p.traffic_distribution.clone(),
    );
    conflicts.extend(conflict_of(
        REASON_TRAFFIC_DISTRIBUTION_CONFLICT,
        "traffic distribution",
        &quoted_opt(&td.value),
        &td,
        ordered,
        |e| e.traffic_distribution != td.value,
    ));

    let families = resolve(ordered, prev, |e| e.ip_families.clone(), |p| p.ip_families.clone());
    conflicts.extend(conflict_of(
        REASON_IP_FAMILY_CONFLICT,
        "IP families",
        &format!("{:?}", families.value),
        &families,
        ordered,
        |e| e.ip_families != families.value,
    ));

    Some(ImportedService {
        key: key.clone(),
        service_type: service_type.value,
        ports,
        session_affinity: affinity.value,
        internal_traffic_policy: itp.value,
        traffic_distribution: td.value,
        ip_families: families.value,
        labels: labels.value,
        annotations: annotations.value,
        ips: Vec::new(),
        winner: service_type.winner,
        clusters: ordered.iter().map(|e| (e.cluster.clone(), Arc::clone(e))).collect(),
        conflicts,
    })
}

/// The conditions of `cluster`'s ServiceExport for `key`: `Valid`, `Ready` and `Conflict`.
/// Conflicts are raised on every exporting cluster (KEP-1645 recommends it), each naming the
/// cluster whose value is in force.
pub fn export_conditions(
    key: &ServiceKey,
    import: Option<&ImportedService>,
    cluster: &ClusterId,
    validity: Validity,
) -> Vec<Condition> {
    let in_import = validity.is_valid() && import.is_some_and(|i| i.clusters.contains_key(cluster));
    let ready = if !validity.is_valid() {
        Condition {
            type_: CONDITION_READY.to_owned(),
            status: ConditionStatus::False,
            reason: REASON_FAILED.to_owned(),
            message: format!("the export of {key} is not valid ({})", validity.reason()),
        }
    } else if in_import {
        Condition {
            type_: CONDITION_READY.to_owned(),
            status: ConditionStatus::True,
            reason: REASON_EXPORTED.to_owned(),
            message: format!("service {key} is part of the clusterset import"),
        }
    } else {
        Condition {
            type_: CONDITION_READY.to_owned(),
            status: ConditionStatus::False,
            reason: REASON_PENDING.to_owned(),
            message: format!("waiting for service {key} to join the clusterset import"),
        }
    };
    let conflicts = match import {
        Some(i) if in_import && !i.conflicts.is_empty() => i.conflicts.as_slice(),
        _ => &[],
    };
    let conflict = if conflicts.is_empty() {
        Condition {
            type_: CONDITION_CONFLICT.to_owned(),
            status: ConditionStatus::False,
            reason: REASON_NO_CONFLICTS.to_owned(),
            message: "no conflicts with other clusters' exports".to_owned(),
        }
    } else {
        Condition {
            type_: CONDITION_CONFLICT.to_owned(),
            status: ConditionStatus::True,
            reason: conflicts.iter().map(|c| c.reason.as_str()).collect::<Vec<_>>().join(","),
            message: conflicts.iter().map(|c| c.message.as_str()).collect::<Vec<_>>().join(" "),
        }
    };
    vec![validity.condition(key), ready, conflict]
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::exchange::delta::testing;
    use crate::model::{Health, IpFamily, Protocol, TargetPort};

    fn cid(s: &str) -> ClusterId {
        ClusterId::new(s).expect("test cluster id")
    }

    fn key() -> ServiceKey {
        ServiceKey::new("shop", "cart")
    }

    fn ts(secs: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_700_000_000 + secs).expect("test timestamp")
    }

    fn port(name: Option<&str>, protocol: Protocol, number: u16) -> ServicePort {
        ServicePort {
            name: name.map(str::to_owned),
            protocol,
            port: number,
            app_protocol: None,
            target_port: None,
        }
    }

    fn http() -> ServicePort {
        port(Some("http"), Protocol::Tcp, 80)
    }

    /// An export of `shop/cart` from `cluster`, created `created` seconds after the epoch of
    /// the tests, with one port `http` TCP/80, changed by `f`.
    fn ex(
        cluster: &str,
        created: i64,
        f: impl FnOnce(&mut ExportedService),
    ) -> Arc<ExportedService> {
        let mut e = ExportedService {
            ip_families: vec![IpFamily::IPv4],
            created: ts(created),
            ..testing::exported(key(), cluster, ServiceType::ClusterSetIP, vec![http()], Vec::new())
        };
        f(&mut e);
        Arc::new(e)
    }

    fn plain(cluster: &str, created: i64) -> Arc<ExportedService> {
        ex(cluster, created, |_| {})
    }

    fn headless(cluster: &str, created: i64) -> Arc<ExportedService> {
        ex(cluster, created, |e| e.service_type = ServiceType::Headless)
    }

    fn with_ports(cluster: &str, created: i64, ports: Vec<ServicePort>) -> Arc<ExportedService> {
        ex(cluster, created, |e| e.ports = ports)
    }

    fn merge_all(
        exports: &[Arc<ExportedService>],
        prev: Option<&ImportedService>,
    ) -> Option<ImportedService> {
        let refs: Vec<&Arc<ExportedService>> = exports.iter().collect();
        merge(&key(), &refs, prev)
    }

    struct MergeCase {
        name: &'static str,
        /// Exports before (merged first, the result is `prev`), if any.
        before: Vec<Arc<ExportedService>>,
        exports: Vec<Arc<ExportedService>>,
        want_type: ServiceType,
        want_winner: &'static str,
        /// (port, clusters exposing it), in order.
        want_ports: Vec<(ServicePort, Vec<&'static str>)>,
        /// (reason, winner, disagreeing clusters).
        want_conflicts: Vec<(&'static str, &'static str, Vec<&'static str>)>,
        /// Substrings the conflict messages must contain.
        want_messages: Vec<&'static str>,
    }

    fn case(name: &'static str) -> MergeCase {
        MergeCase {
            name,
            before: Vec::new(),
            exports: Vec::new(),
            want_type: ServiceType::ClusterSetIP,
            want_winner: "c1",
            want_ports: vec![(http(), vec!["c1"])],
            want_conflicts: Vec::new(),
            want_messages: Vec::new(),
        }
    }

    #[test]
    fn merge_scenarios() {
        let dns_udp = port(Some("dns"), Protocol::Udp, 53);
        let dns_tcp = port(Some("dns-tcp"), Protocol::Tcp, 53);
        let metrics = port(Some("metrics"), Protocol::Tcp, 9090);
        let http_8080 = port(Some("http"), Protocol::Tcp, 8080);
        let cases = vec![
            MergeCase { exports: vec![plain("c1", 0)], ..case("one export, nothing to merge") },
            MergeCase {
                exports: vec![plain("c2", 5), plain("c1", 1)],
                want_ports: vec![(http(), vec!["c1", "c2"])],
                ..case("two agreeing exports, any order")
            },
            MergeCase {
                exports: vec![headless("c2", 2), plain("c1", 1)],
                want_ports: vec![(http(), vec!["c1", "c2"])],
                want_conflicts: vec![("TypeConflict", "c1", vec!["c2"])],
                want_messages: vec![
                    "Conflicting type. Using \"ClusterSetIP\" from oldest service export in \"c1\". 1/2 clusters disagree.",
                ],
                ..case("type conflict: the oldest wins")
            },
            MergeCase {
                exports: vec![plain("c1", 3), headless("c2", 1), plain("c3", 2)],
                want_type: ServiceType::Headless,
                want_winner: "c2",
                want_ports: vec![(http(), vec!["c1", "c2", "c3"])],
                want_conflicts: vec![("TypeConflict", "c2", vec!["c1", "c3"])],
                want_messages: vec![
                    "Conflicting type. Using \"Headless\" from oldest service export in \"c2\". 2/3 clusters disagree.",
                ],
                ..case("three clusters, two disagree with the oldest")
            },
            MergeCase {
                exports: vec![headless("c2", 1), plain("c1", 1)],
                want_ports: vec![(http(), vec!["c1", "c2"])],
                want_conflicts: vec![("TypeConflict", "c1", vec!["c2"])],
                ..case("equal timestamps: the lower cluster id wins")
            },
            MergeCase {
                exports: vec![
                    with_ports("c1", 1, vec![http()]),
                    with_ports("c2", 2, vec![http_8080.clone()]),
                ],
                want_ports: vec![(http(), vec!["c1"])],
                want_conflicts: vec![("PortConflict", "c1", vec!["c2"])],
                want_messages: vec![
                    "Conflicting ports. Using [\"http\" TCP/80] from oldest service export in \"c1\"",
                ],
                ..case("same port name, other number: matched by name, the oldest wins")
            },
            MergeCase {
                exports: vec![
                    with_ports("c1", 1, vec![port(None, Protocol::Tcp, 80)]),
                    with_ports("c2", 2, vec![port(Some("web"), Protocol::Tcp, 80)]),
                ],
                want_ports: vec![(port(None, Protocol::Tcp, 80), vec!["c1", "c2"])],
                want_conflicts: vec![("PortConflict", "c1", vec!["c2"])],
                ..case("same protocol and port, other name: one port, both serve it, conflict")
            },
            MergeCase {
                exports: vec![
                    with_ports("c1", 1, vec![port(None, Protocol::Tcp, 80)]),
                    with_ports("c2", 2, vec![port(Some(""), Protocol::Tcp, 81)]),
                ],
                want_ports: vec![(port(None, Protocol::Tcp, 80), vec!["c1"])],
                want_conflicts: vec![("PortConflict", "c1", vec!["c2"])],
                ..case("two unnamed ports share the empty name: the oldest wins")
            },
            MergeCase {
                exports: vec![
                    with_ports("c1", 1, vec![http()]),
                    with_ports("c2", 2, vec![http(), metrics.clone()]),
                ],
                want_ports: vec![(http(), vec!["c1", "c2"]), (metrics.clone(), vec!["c2"])],
                want_conflicts: vec![("PortConflict", "c1", vec!["c1"])],
                want_messages: vec![
                    "a port gets traffic only in the clusters that expose it. 1/2 clusters disagree.",
                ],
                ..case("ports are the union; a port only some clusters expose is a conflict")
            },
            MergeCase {
                exports: vec![
                    with_ports("c1", 1, vec![dns_udp.clone()]),
                    with_ports("c2", 2, vec![dns_tcp.clone()]),
                ],
                want_ports: vec![(dns_udp.clone(), vec!["c1"]), (dns_tcp.clone(), vec!["c2"])],
                want_conflicts: vec![("PortConflict", "c1", vec!["c1", "c2"])],
                ..case("same number, other protocol: two ports")
            },
            MergeCase {
                exports: vec![
                    with_ports("c1", 1, vec![http(), dns_udp.clone()]),
                    with_ports("c2", 2, vec![dns_udp.clone(), http()]),
                ],
                want_ports: vec![(http(), vec!["c1", "c2"]), (dns_udp.clone(), vec!["c1", "c2"])],
                ..case("port order does not matter")
            },
            MergeCase {
                exports: vec![
                    with_ports(
                        "c1",
                        1,
                        vec![ServicePort { target_port: Some(TargetPort::Number(8080)), ..http() }],
                    ),
                    with_ports(
                        "c2",
                        2,
                        vec![ServicePort {
                            target_port: Some(TargetPort::Name("web".into())),
                            ..http()
                        }],
                    ),
                ],
                want_ports: vec![(http(), vec!["c1", "c2"])],
                ..case("target ports are cluster-local and never conflict")
            },
            MergeCase {
                exports: vec![
                    plain("c1", 1),
                    with_ports(
                        "c2",
                        2,
                        vec![ServicePort { app_protocol: Some("h2c".into()), ..http() }],
                    ),
                ],
                want_ports: vec![(http(), vec!["c1"])],
                want_conflicts: vec![("PortConflict", "c1", vec!["c2"])],
                ..case("another app protocol under the same name is a conflict")
            },
            MergeCase {
                exports: vec![
                    plain("c1", 1),
                    ex("c2", 2, |e| {
                        e.session_affinity = SessionAffinity::ClientIP { timeout_seconds: None }
                    }),
                ],
                want_ports: vec![(http(), vec!["c1", "c2"])],
                want_conflicts: vec![("SessionAffinityConflict", "c1", vec!["c2"])],
                want_messages: vec![
                    "Conflicting session affinity. Using \"None\" from oldest service export in \"c1\". 1/2 clusters disagree.",
                ],
                ..case("session affinity conflict")
            },
            MergeCase {
                exports: vec![
                    ex("c1", 1, |e| {
                        e.session_affinity = SessionAffinity::ClientIP { timeout_seconds: Some(10) }
                    }),
                    ex("c2", 2, |e| {
                        e.session_affinity = SessionAffinity::ClientIP { timeout_seconds: Some(20) }
                    }),
                    plain("c3", 3),
                ],
                want_ports: vec![(http(), vec!["c1", "c2", "c3"])],
                want_conflicts: vec![
                    ("SessionAffinityConflict", "c1", vec!["c3"]),
                    ("SessionAffinityConfigConflict", "c1", vec!["c2"]),
                ],
                want_messages: vec![
                    "Using timeoutSeconds 10 from oldest service export in \"c1\". 1/3 clusters disagree.",
                ],
                ..case("session affinity config conflict, separate from the kind")
            },
            MergeCase {
                exports: vec![
                    ex("c1", 1, |e| e.labels = BTreeMap::from([("team".into(), "a".into())])),
                    ex("c2", 2, |e| e.labels = BTreeMap::from([("team".into(), "b".into())])),
                    ex("c3", 3, |e| e.annotations = BTreeMap::from([("note".into(), "x".into())])),
                ],
                want_ports: vec![(http(), vec!["c1", "c2", "c3"])],
                want_conflicts: vec![
                    ("AnnotationsConflict", "c1", vec!["c3"]),
                    ("LabelsConflict", "c1", vec!["c2", "c3"]),
                ],
                want_messages: vec![
                    "Using {team=a} from oldest service export in \"c1\". 2/3 clusters disagree.",
                ],
                ..case("labels and annotations come from the oldest export")
            },
            MergeCase {
                exports: vec![
                    plain("c1", 1),
                    ex("c2", 2, |e| {
                        e.internal_traffic_policy = Some("Local".into());
                        e.traffic_distribution = Some("PreferClose".into());
                        e.ip_families = vec![IpFamily::IPv6];
                    }),
                ],
                want_ports: vec![(http(), vec!["c1", "c2"])],
                want_conflicts: vec![
                    ("InternalTrafficPolicyConflict", "c1", vec!["c2"]),
                    ("TrafficDistributionConflict", "c1", vec!["c2"]),
                    ("IPFamilyConflict", "c1", vec!["c2"]),
                ],
                want_messages: vec!["Using unset from oldest"],
                ..case("traffic policies and ip families")
            },
            MergeCase {
                exports: vec![
                    with_ports("c1", 1, vec![http()]),
                    ex("c2", 2, |e| {
                        e.service_type = ServiceType::Headless;
                        e.ports = vec![http_8080.clone()];
                    }),
                ],
                want_ports: vec![(http(), vec!["c1"])],
                want_conflicts: vec![
                    ("PortConflict", "c1", vec!["c2"]),
                    ("TypeConflict", "c1", vec!["c2"]),
                ],
                ..case("several conflicts at once, in the spec's order")
            },
            // Stability: when the oldest exporter leaves, keep what a remaining export agrees with.
            MergeCase {
                before: vec![headless("c1", 1), plain("c2", 2), headless("c3", 3)],
                exports: vec![plain("c2", 2), headless("c3", 3)],
                want_type: ServiceType::Headless,
                want_winner: "c3",
                want_ports: vec![(http(), vec!["c2", "c3"])],
                want_conflicts: vec![("TypeConflict", "c3", vec!["c2"])],
                want_messages: vec![
                    "Conflicting type. Using \"Headless\" from service export in \"c3\", kept stable after the oldest exporter left. 1/2 clusters disagree.",
                ],
                ..case("oldest leaves: the type stays while a remaining export agrees")
            },
            MergeCase {
                before: vec![headless("c1", 1), plain("c2", 2)],
                exports: vec![plain("c2", 2)],
                want_winner: "c2",
                want_ports: vec![(http(), vec!["c2"])],
                ..case("oldest leaves and nobody agrees: the type must change")
            },
            MergeCase {
                before: vec![plain("c1", 1), headless("c2", 2), plain("c3", 3)],
                exports: vec![headless("c1", 1), headless("c2", 2), plain("c3", 3)],
                want_type: ServiceType::Headless,
                want_ports: vec![(http(), vec!["c1", "c2", "c3"])],
                want_conflicts: vec![("TypeConflict", "c1", vec!["c3"])],
                ..case("the oldest changes its type: the import follows it")
            },
            MergeCase {
                before: vec![plain("c2", 2)],
                exports: vec![headless("c1", 1), plain("c2", 2)],
                want_type: ServiceType::Headless,
                want_ports: vec![(http(), vec!["c1", "c2"])],
                want_conflicts: vec![("TypeConflict", "c1", vec!["c2"])],
                ..case("an older export joins: it takes precedence")
            },
            MergeCase {
                before: vec![
                    with_ports("c1", 1, vec![http()]),
                    with_ports("c2", 2, vec![http_8080.clone()]),
                    with_ports("c3", 3, vec![http()]),
                ],
                exports: vec![
                    with_ports("c2", 2, vec![http_8080.clone()]),
                    with_ports("c3", 3, vec![http()]),
                ],
                want_winner: "c2",
                want_ports: vec![(http(), vec!["c3"])],
                want_conflicts: vec![("PortConflict", "c3", vec!["c2"])],
                want_messages: vec!["from service export in \"c3\", kept stable"],
                ..case("oldest leaves: its port definition stays while a remaining export has it")
            },
            MergeCase {
                before: vec![
                    with_ports("c1", 1, vec![http()]),
                    with_ports("c2", 2, vec![http_8080.clone()]),
                    with_ports("c3", 3, vec![http_8080.clone()]),
                ],
                exports: vec![
                    with_ports("c2", 2, vec![http_8080.clone()]),
                    with_ports("c3", 3, vec![http_8080.clone()]),
                ],
                want_winner: "c2",
                want_ports: vec![(http_8080.clone(), vec!["c2", "c3"])],
                ..case("oldest leaves: the conflict goes away with it")
            },
        ];
        for c in cases {
            let prev = if c.before.is_empty() {
                None
            } else {
                Some(merge_all(&c.before, None).expect("before merges"))
            };
            let got = merge_all(&c.exports, prev.as_ref())
                .unwrap_or_else(|| panic!("{}: no import", c.name));
            assert_eq!(got.key, key(), "{}", c.name);
            assert_eq!(got.service_type, c.want_type, "{}: type", c.name);
            assert_eq!(got.winner, cid(c.want_winner), "{}: winner", c.name);
            assert!(got.ips.is_empty(), "{}: ips are the caller's", c.name);
            let ports: Vec<(ServicePort, Vec<ClusterId>)> = got
                .ports
                .iter()
                .map(|p| (p.port.clone(), p.clusters.iter().cloned().collect()))
                .collect();
            let want_ports: Vec<(ServicePort, Vec<ClusterId>)> = c
                .want_ports
                .iter()
                .map(|(p, cs)| (p.clone(), cs.iter().map(|c| cid(c)).collect()))
                .collect();
            assert_eq!(ports, want_ports, "{}: ports", c.name);
            let conflicts: Vec<(String, ClusterId, Vec<ClusterId>)> = got
                .conflicts
                .iter()
                .map(|x| {
                    (x.reason.clone(), x.winner.clone(), x.disagreeing.iter().cloned().collect())
                })
                .collect();
            let want_conflicts: Vec<(String, ClusterId, Vec<ClusterId>)> = c
                .want_conflicts
                .iter()
                .map(|(r, w, d)| (r.to_string(), cid(w), d.iter().map(|c| cid(c)).collect()))
                .collect();
            assert_eq!(conflicts, want_conflicts, "{}: conflicts", c.name);
            let messages: Vec<&str> = got.conflicts.iter().map(|x| x.message.as_str()).collect();
            for m in &c.want_messages {
                assert!(
                    messages.iter().any(|x| x.contains(m)),
                    "{}: no message with {m:?} in {messages:?}",
                    c.name
                );
            }
            let exporters: Vec<ClusterId> = got.clusters.keys().cloned().collect();
            let mut want_exporters: Vec<ClusterId> =
                c.exports.iter().map(|e| e.cluster.clone()).collect();
            want_exporters.sort();
            assert_eq!(exporters, want_exporters, "{}: clusters", c.name);
        }
    }

    #[test]
    fn merge_of_nothing_is_no_import() {
        assert_eq!(merge_all(&[], None), None);
        // the last export leaving takes the import with it, whatever it was
        let prev = merge_all(&[plain("c1", 1)], None).unwrap();
        assert_eq!(merge_all(&[], Some(&prev)), None);
    }

    #[test]
    fn merge_is_order_independent_and_deterministic() {
        let exports = vec![
            headless("c3", 1),
            with_ports("c1", 2, vec![port(Some("http"), Protocol::Tcp, 81)]),
            ex("c2", 1, |e| e.labels = BTreeMap::from([("a".into(), "b".into())])),
        ];
        let a = merge_all(&exports, None).unwrap();
        let mut reversed = exports.clone();
        reversed.reverse();
        assert_eq!(merge_all(&reversed, None).unwrap(), a);
        // remerging with itself as prev changes nothing
        assert_eq!(merge_all(&exports, Some(&a)).unwrap(), a);
        assert_eq!(a.winner, cid("c2"));
    }

    #[test]
    fn merge_drops_a_duplicated_cluster() {
        let got = merge_all(&[plain("c1", 1), plain("c1", 1)], None).unwrap();
        assert_eq!(got.clusters.len(), 1);
        assert!(got.conflicts.is_empty());
    }

    fn local_service(name: &str, f: impl FnOnce(&mut LocalService)) -> Arc<LocalService> {
        let mut s = testing::local_service(
            ServiceKey::new("shop", name),
            "10.96.0.10",
            &["10.0.0.1", "10.0.0.2"],
        );
        f(&mut s);
        Arc::new(s)
    }

    fn export_obj(name: &str, created: i64) -> Arc<ServiceExportObject> {
        Arc::new(testing::export_object(
            ServiceKey::new("shop", name),
            ts(created),
            BTreeMap::from([("tier".into(), "web".into())]),
        ))
    }

    fn state(
        services: Vec<Arc<LocalService>>,
        exports: Vec<Arc<ServiceExportObject>>,
    ) -> ClusterState {
        ClusterState {
            services: services.into_iter().map(|s| (s.key.clone(), s)).collect(),
            exports: exports.into_iter().map(|e| (e.key.clone(), e)).collect(),
        }
    }

    #[test]
    fn compute_exports_scenarios() {
        struct Case {
            name: &'static str,
            service: Option<Arc<LocalService>>,
            export: bool,
            want: Option<Validity>,
            want_type: Option<ServiceType>,
        }
        let cases = vec![
            Case {
                name: "service with export: valid, ClusterSetIP",
                service: Some(local_service("a", |_| {})),
                export: true,
                want: Some(Validity::Valid),
                want_type: Some(ServiceType::ClusterSetIP),
            },
            Case {
                name: "clusterIP None: headless",
                service: Some(local_service("a", |s| {
                    s.cluster_ips.clear();
                    s.headless = true;
                })),
                export: true,
                want: Some(Validity::Valid),
                want_type: Some(ServiceType::Headless),
            },
            Case {
                name: "NodePort and LoadBalancer export like ClusterIP",
                service: Some(local_service("a", |s| s.kube_type = "LoadBalancer".into())),
                export: true,
                want: Some(Validity::Valid),
                want_type: Some(ServiceType::ClusterSetIP),
            },
            Case {
                name: "ExternalName: invalid service type",
                service: Some(local_service("a", |s| {
                    s.kube_type = "ExternalName".into();
                    s.cluster_ips.clear();
                    s.headless = true;
                })),
                export: true,
                want: Some(Validity::InvalidServiceType),
                want_type: None,
            },
            Case {
                name: "export without service: no service",
                service: None,
                export: true,
                want: Some(Validity::NoService),
                want_type: None,
            },
            Case {
                name: "service without export: not exported, no status",
                service: Some(local_service("a", |_| {})),
                export: false,
                want: None,
                want_type: None,
            },
        ];
        let me = cid("east");
        for c in cases {
            let st = state(
                c.service.into_iter().collect(),
                if c.export { vec![export_obj("a", 1)] } else { vec![] },
            );
            let out = compute_exports(&st, &me, &HealthMap::new(), &BTreeMap::new());
            let k = ServiceKey::new("shop", "a");
            assert_eq!(out.validity.get(&k).copied(), c.want, "{}", c.name);
            assert_eq!(out.services.get(&k).map(|e| e.service_type), c.want_type, "{}", c.name);
            if let Some(e) = out.services.get(&k) {
                assert_eq!(e.cluster, me, "{}", c.name);
                assert_eq!(e.created, ts(1), "{}", c.name);
                assert_eq!(e.labels.get("tier").map(String::as_str), Some("web"), "{}", c.name);
            }
        }
    }

    #[test]
    fn compute_exports_stamps_health_and_keeps_arcs() {
        let me = cid("east");
        let st = state(
            vec![local_service("a", |_| {}), local_service("b", |_| {})],
            vec![export_obj("a", 1), export_obj("b", 2)],
        );
        let a = ServiceKey::new("shop", "a");
        let b = ServiceKey::new("shop", "b");
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let mut health = HealthMap::from([((a.clone(), ip1), Health::Healthy)]);
        let first = compute_exports(&st, &me, &health, &BTreeMap::new());
        assert_eq!(first.services[&a].endpoints[0].health, Health::Healthy);
        assert_eq!(first.services[&a].endpoints[1].health, Health::Unknown);

        let again = compute_exports(&st, &me, &health, &first.services);
        assert!(Arc::ptr_eq(&again.services[&a], &first.services[&a]));
        assert!(Arc::ptr_eq(&again.services[&b], &first.services[&b]));

        let old_health = health.clone();
        health.insert((a.clone(), ip1), Health::Unhealthy);
        let dirty = changed_local_keys(&st, &st, &old_health, &health);
        assert_eq!(dirty, BTreeSet::from([a.clone()]));
        let next = update_exports(&st, &me, &health, first.clone(), &dirty);
        assert!(!Arc::ptr_eq(&next.services[&a], &first.services[&a]));
        assert!(Arc::ptr_eq(&next.services[&b], &first.services[&b]));
        assert_eq!(next.services[&a].endpoints[0].health, Health::Unhealthy);
        assert_eq!(next, compute_exports(&st, &me, &health, &BTreeMap::new()));
    }

    #[test]
    fn update_exports_matches_full_compute() {
        let me = cid("east");
        let health = HealthMap::new();
        let old = state(
            vec![
                local_service("a", |_| {}),
                local_service("b", |_| {}),
                local_service("c", |_| {}),
            ],
            vec![export_obj("a", 1), export_obj("b", 2), export_obj("d", 3)],
        );
        let first = compute_exports(&old, &me, &health, &BTreeMap::new());
        assert_eq!(first.validity.len(), 3);
        let mut new = old.clone();
        // b changes, c gets exported, d's service appears as ExternalName, a's export goes
        new.services.insert(
            ServiceKey::new("shop", "b"),
            local_service("b", |s| s.ports.push(port(None, Protocol::Udp, 53))),
        );
        new.exports.insert(ServiceKey::new("shop", "c"), export_obj("c", 4));
        new.services.insert(
            ServiceKey::new("shop", "d"),
            local_service("d", |s| s.kube_type = "ExternalName".into()),
        );
        new.exports.remove(&ServiceKey::new("shop", "a"));
        let dirty = changed_local_keys(&old, &new, &health, &health);
        assert_eq!(dirty.len(), 4);
        let inc = update_exports(&new, &me, &health, first.clone(), &dirty);
        assert_eq!(inc, compute_exports(&new, &me, &health, &BTreeMap::new()));
        assert_eq!(
            inc.validity.get(&ServiceKey::new("shop", "d")),
            Some(&Validity::InvalidServiceType)
        );
        assert!(!inc.validity.contains_key(&ServiceKey::new("shop", "a")));
    }

    #[test]
    fn changed_keys_by_ptr_walks_both_maps() {
        let x = Arc::new(1);
        let old = BTreeMap::from([(1, x.clone()), (2, Arc::new(2)), (4, Arc::new(4))]);
        let new = BTreeMap::from([(1, x), (2, Arc::new(2)), (3, Arc::new(3))]);
        let mut out = BTreeSet::new();
        changed_keys_by_ptr(&old, &new, &mut out);
        assert_eq!(out, BTreeSet::from([2, 3, 4]));
    }

    fn cond(c: &Condition) -> (&str, ConditionStatus, &str) {
        (c.type_.as_str(), c.status, c.reason.as_str())
    }

    #[test]
    fn export_conditions_scenarios() {
        use ConditionStatus::{False, True};
        let conflicted = merge_all(
            &[
                with_ports("c1", 1, vec![http()]),
                ex("c2", 2, |e| {
                    e.service_type = ServiceType::Headless;
                    e.ports = vec![port(Some("http"), Protocol::Tcp, 8080)];
                }),
            ],
            None,
        )
        .unwrap();
        let clean = merge_all(&[plain("c1", 1)], None).unwrap();
        struct Case {
            name: &'static str,
            import: Option<ImportedService>,
            cluster: &'static str,
            validity: Validity,
            want: [(&'static str, ConditionStatus, &'static str); 3],
        }
        let cases = vec![
            Case {
                name: "valid, imported, no conflicts",
                import: Some(clean.clone()),
                cluster: "c1",
                validity: Validity::Valid,
                want: [
                    ("Valid", True, "Valid"),
                    ("Ready", True, "Exported"),
                    ("Conflict", False, "NoConflicts"),
                ],
            },
            Case {
                name: "valid, not yet in the import",
                import: None,
                cluster: "c1",
                validity: Validity::Valid,
                want: [
                    ("Valid", True, "Valid"),
                    ("Ready", False, "Pending"),
                    ("Conflict", False, "NoConflicts"),
                ],
            },
            Case {
                name: "valid, the import has others only",
                import: Some(clean.clone()),
                cluster: "c9",
                validity: Validity::Valid,
                want: [
                    ("Valid", True, "Valid"),
                    ("Ready", False, "Pending"),
                    ("Conflict", False, "NoConflicts"),
                ],
            },
            Case {
                name: "no service",
                import: Some(clean.clone()),
                cluster: "c1",
                validity: Validity::NoService,
                want: [
                    ("Valid", False, "NoService"),
                    ("Ready", False, "Failed"),
                    ("Conflict", False, "NoConflicts"),
                ],
            },
            Case {
                name: "external name",
                import: None,
                cluster: "c1",
                validity: Validity::InvalidServiceType,
                want: [
                    ("Valid", False, "InvalidServiceType"),
                    ("Ready", False, "Failed"),
                    ("Conflict", False, "NoConflicts"),
                ],
            },
            Case {
                name: "conflict on the winner too",
                import: Some(conflicted.clone()),
                cluster: "c1",
                validity: Validity::Valid,
                want: [
                    ("Valid", True, "Valid"),
                    ("Ready", True, "Exported"),
                    ("Conflict", True, "PortConflict,TypeConflict"),
                ],
            },
            Case {
                name: "conflict on the loser",
                import: Some(conflicted.clone()),
                cluster: "c2",
                validity: Validity::Valid,
                want: [
                    ("Valid", True, "Valid"),
                    ("Ready", True, "Exported"),
                    ("Conflict", True, "PortConflict,TypeConflict"),
                ],
            },
        ];
        for c in cases {
            let got = export_conditions(&key(), c.import.as_ref(), &cid(c.cluster), c.validity);
            let got: Vec<_> = got.iter().map(cond).collect();
            assert_eq!(got, c.want.to_vec(), "{}", c.name);
        }
        let conds = export_conditions(&key(), Some(&conflicted), &cid("c2"), Validity::Valid);
        assert!(conds[2].message.contains("Conflicting type. Using \"ClusterSetIP\" from oldest service export in \"c1\". 1/2 clusters disagree."), "{}", conds[2].message);
        assert!(conds[0].message.contains("shop/cart"));
    }
}
