//! The kube writer: what the import set decided, written back into the local cluster.
//!
//! - ServiceExport `status.conditions` (`Valid`, `Ready`, `Conflict`) from the status map;
//!   `lastTransitionTime` moves only when a condition's status changes.
//! - One ServiceImport per import (type, ports, ips, session affinity, families, policies,
//!   exported labels/annotations, `status.clusters`).
//! - Per import and source cluster, EndpointSlices labelled
//!   `multicluster.kubernetes.io/service-name`, `multicluster.kubernetes.io/source-cluster` and
//!   `endpointslice.kubernetes.io/managed-by: gateway.fedgate.io` (one address family and port
//!   set per slice, at most [`MAX_ENDPOINTS_PER_SLICE`] endpoints).
//! - In `front.mode: kube`, a derived selector-less Service per ClusterSetIP import whose
//!   EndpointSlice points at the gateway pod on a port the gateway serves that import on;
//!   the ServiceImport's `ips` are that Service's ClusterIPs.
//!
//! Everything is written with server-side apply under one field manager ([`FIELD_MANAGER`]),
//! with names that depend only on the import, so a restarted gateway re-applies the same
//! objects in place (same uid) and deletes only what is no longer wanted. The decisions are
//! pure ([`desired`], [`plan`], [`merge_conditions`], [`FrontPorts`], the schedule in
//! [`super::queue`], [`Settle`]); [`KubeWriter`] carries them out, up to
//! [`MAX_WRITES_IN_FLIGHT`] requests at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::imports::StatusMap;
use crate::model::{
    ClusterId, Condition, ConditionStatus, Endpoint, Health, ImportSnapshot, ImportedService,
    IpFamily, LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER, MANAGED_BY, ServiceKey, ServicePort,
    ServiceType, SessionAffinity,
};

use super::crd;
use super::queue::{MAX_WRITES_IN_FLIGHT, WriteQueue};
use super::source::LABEL_SLICE_MANAGED_BY;
use super::{KubeError, LABEL_MANAGED_BY, MANAGED_BY_FEDGATE};

/// The server-side apply field manager of everything fedgate writes.
pub const FIELD_MANAGER: &str = "fedgate";
/// The most endpoints one EndpointSlice carries (the API server's limit is 1000).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 1000;
/// Label tying an EndpointSlice to the Service kube-proxy serves it for.
pub const LABEL_KUBE_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Annotation on a derived Service naming the import it stands for (`namespace/name`).
pub const ANNOTATION_DERIVED_FOR: &str = "fedgate.io/derived-for";
/// How long the inputs must stay unchanged before the writer writes.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// The longest the writer waits for its inputs to settle.
pub const MAX_SETTLE: Duration = Duration::from_secs(1);
/// How often objects that failed to write (e.g. namespace missing) are tried again.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(10);

/// The kinds the writer writes, in the order their writes are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WriteKind {
    /// The `status.conditions` of a local ServiceExport (not owned: only its status is
    /// written, never listed or deleted). First: what a user waits for after exporting.
    ServiceExport,
    /// Derived Services before ServiceImports: ServiceImports need their ClusterIPs.
    Service,
    ServiceImport,
    EndpointSlice,
}

impl WriteKind {
    /// The Kubernetes kind (a bounded metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::ServiceExport => "ServiceExport",
            WriteKind::Service => "Service",
            WriteKind::ServiceImport => "ServiceImport",
            WriteKind::EndpointSlice => "EndpointSlice",
        }
    }
}

/// One object the writer owns.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjRef {
    pub kind: WriteKind,
    pub namespace: String,
    pub name: String,
}

/// What one owned object should look like: the applied body, and for kinds with a status
/// subresource the applied status. Shared (`Arc`) between the writer's passes: an unchanged
/// import keeps its objects, and comparing an object with itself is a pointer comparison
/// (`Arc`'s `PartialEq` for `Eq` types).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredObject {
    pub body: Value,
    pub status: Option<Value>,
}

/// One step of bringing the cluster in line.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Apply(ObjRef, Arc<DesiredObject>),
    Delete(ObjRef),
    /// Apply these conditions to the status of the ServiceExport `ObjRef`
    /// ([`WriteKind::ServiceExport`]).
    Conditions(ObjRef, Vec<crd::Condition>),
}

impl Action {
    /// The object the action writes.
    pub fn target(&self) -> &ObjRef {
        match self {
            Action::Apply(r, _) | Action::Delete(r) | Action::Conditions(r, _) => r,
        }
    }
}

/// The pure diff: apply what is new or different from what was last applied (`None`: exists
/// in the cluster, content unknown, e.g. after a restart), delete what is owned and no longer
/// wanted (only when `deletions` is true: right after a restart, peers' exports have not
/// arrived yet and their objects must not go). Derived Services come first (ServiceImports
/// need their ClusterIPs), deletions last.
pub fn plan(
    desired: &BTreeMap<ObjRef, Arc<DesiredObject>>,
    applied: &BTreeMap<ObjRef, Option<Arc<DesiredObject>>>,
    deletions: bool,
) -> Vec<Action> {
    let mut out: Vec<Action> = desired
        .iter()
        .filter(|(r, d)| applied.get(*r).is_none_or(|a| a.as_ref() != Some(*d)))
        .map(|(r, d)| Action::Apply(r.clone(), d.clone()))
        .collect();
    out.sort_by_key(|a| a.target().kind);
    if deletions {
        out.extend(
            applied.keys().filter(|r| !desired.contains_key(*r)).cloned().map(Action::Delete),
        );
    }
    out
}

/// 32-bit FNV-1a: a short, stable (across builds and releases) suffix for generated names.
fn fnv(parts: &[&str]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h ^= u32::from(b'/');
            h = h.wrapping_mul(0x0100_0193);
        }
        for b in part.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// Name of the derived Service of an import: `fedgate-<hash>` (a valid Service name whatever
/// the import's name, and never the name of a user's Service by accident).
pub fn derived_service_name(key: &ServiceKey) -> String {
    format!("fedgate-{:08x}", fnv(&[&key.namespace, &key.name]))
}

/// Name of the `index`-th EndpointSlice of `cluster`'s endpoints of import `key`:
/// `<service>-<cluster>-<hash>`, cut to fit 63 characters; the hash makes names of different
/// (service, cluster) pairs distinct even when the dashes line up.
pub fn slice_name(key: &ServiceKey, cluster: &str, index: usize) -> String {
    let hash = fnv(&[&key.name, cluster, &index.to_string()]);
    let mut head = format!("{}-{}", key.name, cluster);
    head.truncate(63 - 9);
    let head = head.trim_end_matches('-');
    format!("{head}-{hash:08x}")
}

fn managed_labels() -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert(LABEL_MANAGED_BY.to_owned(), json!(MANAGED_BY_FEDGATE));
    m
}

fn family_str(f: IpFamily) -> &'static str {
    match f {
        IpFamily::IPv4 => "IPv4",
        IpFamily::IPv6 => "IPv6",
    }
}

fn family_of(ip: &IpAddr) -> IpFamily {
    match ip {
        IpAddr::V4(_) => IpFamily::IPv4,
        IpAddr::V6(_) => IpFamily::IPv6,
    }
}

/// Settings of the writer.
#[derive(Clone, Debug)]
pub struct WriterSettings {
    /// This gateway's cluster: its ServiceExports get conditions.
    pub cluster: ClusterId,
    /// `front.mode: kube`: derived Services point at this gateway pod.
    pub front: Option<FrontSettings>,
    /// The configured peers. After a restart nothing is deleted until each of them has sent
    /// its exports (or [`deletion_grace`](Self::deletion_grace) passed): their objects must
    /// not go just because their exports have not arrived yet.
    pub peers: BTreeSet<ClusterId>,
    /// The longest deletions wait for the peers after start.
    pub deletion_grace: Duration,
}

/// `front.mode: kube`.
#[derive(Clone, Debug)]
pub struct FrontSettings {
    /// The gateway pod's IP (the derived Services' endpoint).
    pub pod_ip: IpAddr,
    /// Ports of the gateway pod handed to import ports, first to last.
    pub ports: std::ops::RangeInclusive<u16>,
}

/// A port of an import as the front serves it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontKey {
    pub key: ServiceKey,
    pub port: u16,
    pub protocol: crate::model::Protocol,
}

/// Which gateway port serves which import port in `front.mode: kube`. An allocation lasts as
/// long as the import port exists; freed ports are reused lowest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontPorts {
    by_key: BTreeMap<FrontKey, u16>,
    used: BTreeSet<u16>,
}

impl FrontPorts {
    /// Brings the allocation in line with the ClusterSetIP imports' TCP ports of `snapshot`.
    /// Import ports that find no free port are left out (and logged once by the caller).
    pub fn reconcile(
        &mut self,
        snapshot: &ImportSnapshot,
        range: &std::ops::RangeInclusive<u16>,
    ) -> Vec<FrontKey> {
        let wanted: BTreeSet<FrontKey> = snapshot
            .services
            .values()
            .filter(|s| s.service_type == ServiceType::ClusterSetIP)
            .flat_map(|s| {
                s.ports.iter().filter(|p| p.port.protocol == crate::model::Protocol::Tcp).map(|p| {
                    FrontKey { key: s.key.clone(), port: p.port.port, protocol: p.port.protocol }
                })
            })
            .collect();
        let gone: Vec<FrontKey> =
            self.by_key.keys().filter(|k| !wanted.contains(*k)).cloned().collect();
        for k in gone {
            if let Some(p) = self.by_key.remove(&k) {
                self.used.remove(&p);
            }
        }
        let mut exhausted = Vec::new();
        let mut next = *range.start();
        for k in wanted {
            if self.by_key.contains_key(&k) {
                continue;
            }
            while self.used.contains(&next) && next < *range.end() {
                next += 1;
            }
            if self.used.contains(&next) || !range.contains(&next) {
                exhausted.push(k);
                continue;
            }
            self.used.insert(next);
            self.by_key.insert(k, next);
        }
        exhausted
    }

    pub fn get(&self, k: &FrontKey) -> Option<u16> {
        self.by_key.get(k).copied()
    }

    /// Every allocation: gateway port → import port.
    pub fn routes(&self) -> BTreeMap<u16, FrontKey> {
        self.by_key.iter().map(|(k, p)| (*p, k.clone())).collect()
    }
}

/// The objects of one import: its derived Service and slice (front kube), its ServiceImport,
/// and its per-cluster EndpointSlices. `derived_ips` are the ClusterIPs the derived Service
/// got (front kube; empty until known); `import_api_version` is the served ServiceImport
/// version (`multicluster.x-k8s.io/v1beta1`, or `v1alpha1` on older clusters).
pub fn desired(
    import: &ImportedService,
    front: Option<(&FrontSettings, &FrontPorts)>,
    derived_ips: &[String],
    import_api_version: &str,
) -> Vec<(ObjRef, DesiredObject)> {
    let key = &import.key;
    let mut out = Vec::new();
    let clusterset_ip = import.service_type == ServiceType::ClusterSetIP;

    // front kube: the derived Service and the slice that points at the gateway pod
    let mut ips: Vec<String> = import.ips.iter().map(ToString::to_string).collect();
    if let Some((settings, ports)) = front {
        ips = Vec::new();
        if clusterset_ip {
            let served: Vec<(&ServicePort, u16)> = import
                .ports
                .iter()
                .filter_map(|p| {
                    ports
                        .get(&FrontKey {
                            key: key.clone(),
                            port: p.port.port,
                            protocol: p.port.protocol,
                        })
                        .map(|gw| (&p.port, gw))
                })
                .collect();
            if !served.is_empty() {
                let name = derived_service_name(key);
                out.push(derived_service(import, &name, &served));
                out.push(derived_slice(key, &name, settings.pod_ip, &served));
                ips = derived_ips.to_vec();
            }
        }
    }

    out.push(service_import(import, &ips, import_api_version));
    for (cluster, export) in &import.clusters {
        let exposed: Vec<&ServicePort> =
            import.ports.iter().filter(|p| p.clusters.contains(cluster)).map(|p| &p.port).collect();
        out.extend(cluster_slices(key, cluster.as_str(), &export.endpoints, &exposed));
    }
    out
}

fn service_import(
    import: &ImportedService,
    ips: &[String],
    api_version: &str,
) -> (ObjRef, DesiredObject) {
    let key = &import.key;
    let mut labels: serde_json::Map<String, Value> =
        import.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    labels.extend(managed_labels());
    let mut spec = json!({
        "type": import.service_type.as_str(),
        "ports": import.ports.iter().map(|p| {
            let mut port = json!({"protocol": p.port.protocol.as_str(), "port": p.port.port});
            if let Some(n) = &p.port.name { port["name"] = json!(n); }
            if let Some(a) = &p.port.app_protocol { port["appProtocol"] = json!(a); }
            port
        }).collect::<Vec<_>>(),
    });
    if import.service_type == ServiceType::ClusterSetIP && !ips.is_empty() {
        spec["ips"] = json!(ips);
    }
    match &import.session_affinity {
        SessionAffinity::None => spec["sessionAffinity"] = json!("None"),
        SessionAffinity::ClientIP { timeout_seconds } => {
            spec["sessionAffinity"] = json!("ClientIP");
            if let Some(t) = timeout_seconds {
                spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
            }
        }
    }
    if !import.ip_families.is_empty() {
        spec["ipFamilies"] =
            json!(import.ip_families.iter().map(|f| family_str(*f)).collect::<Vec<_>>());
    }
    if let Some(p) = &import.internal_traffic_policy {
        spec["internalTrafficPolicy"] = json!(p);
    }
    if let Some(d) = &import.traffic_distribution {
        spec["trafficDistribution"] = json!(d);
    }
    let mut metadata = json!({"name": key.name, "namespace": key.namespace, "labels": labels});
    if !import.annotations.is_empty() {
        metadata["annotations"] = json!(import.annotations);
    }
    let body = json!({
        "apiVersion": api_version,
        "kind": "ServiceImport",
        "metadata": metadata,
        "spec": spec,
    });
    let status = json!({
        "apiVersion": api_version,
        "kind": "ServiceImport",
        "status": {
            "clusters": import.clusters.keys().map(|c| json!({"cluster": c.as_str()})).collect::<Vec<_>>(),
        },
    });
    (
        ObjRef {
            kind: WriteKind::ServiceImport,
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        },
        DesiredObject { body, status: Some(status) },
    )
}

/// A cluster's endpoints as EndpointSlices: grouped by address family and by the ports they
/// serve the exposed service ports on, cut into slices of at most
/// [`MAX_ENDPOINTS_PER_SLICE`].
fn cluster_slices(
    key: &ServiceKey,
    cluster: &str,
    endpoints: &[Endpoint],
    exposed: &[&ServicePort],
) -> Vec<(ObjRef, DesiredObject)> {
    type PortSet = Vec<(Option<String>, &'static str, Option<u16>)>;
    let mut groups: BTreeMap<(&'static str, PortSet), Vec<&Endpoint>> = BTreeMap::new();
    for e in endpoints {
        let ports: PortSet =
            exposed.iter().map(|p| (p.name.clone(), p.protocol.as_str(), e.port_for(p))).collect();
        groups.entry((family_str(family_of(&e.address)), ports)).or_default().push(e);
    }
    let mut out = Vec::new();
    let mut index = 0;
    for ((family, ports), members) in groups {
        for chunk in members.chunks(MAX_ENDPOINTS_PER_SLICE) {
            let name = slice_name(key, cluster, index);
            index += 1;
            let mut labels = managed_labels();
            labels.insert(LABEL_SERVICE_NAME.to_owned(), json!(key.name));
            labels.insert(LABEL_SOURCE_CLUSTER.to_owned(), json!(cluster));
            labels.insert(LABEL_SLICE_MANAGED_BY.to_owned(), json!(MANAGED_BY));
            let body = json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": key.namespace, "labels": labels},
                "addressType": family,
                "ports": ports.iter().map(|(n, proto, port)| {
                    let mut p = json!({"protocol": proto});
                    if let Some(n) = n { p["name"] = json!(n); }
                    if let Some(port) = port { p["port"] = json!(port); }
                    p
                }).collect::<Vec<_>>(),
                "endpoints": chunk.iter().map(|e| endpoint_json(e)).collect::<Vec<_>>(),
            });
            out.push((
                ObjRef { kind: WriteKind::EndpointSlice, namespace: key.namespace.clone(), name },
                DesiredObject { body, status: None },
            ));
        }
    }
    out
}

fn endpoint_json(e: &Endpoint) -> Value {
    // Ready means traffic may go there: ready in its cluster and not failing its checks.
    let ready = e.ready && e.health != Health::Unhealthy;
    let mut v = json!({
        "addresses": [e.address.to_string()],
        "conditions": {"ready": ready, "serving": e.ready},
    });
    if let Some(h) = &e.hostname {
        v["hostname"] = json!(h);
    }
    if let Some(z) = &e.zone {
        v["zone"] = json!(z);
    }
    v
}

fn derived_service(
    import: &ImportedService,
    name: &str,
    served: &[(&ServicePort, u16)],
) -> (ObjRef, DesiredObject) {
    let key = &import.key;
    let mut labels = managed_labels();
    labels.insert(LABEL_SERVICE_NAME.to_owned(), json!(key.name));
    let mut spec = json!({
        "type": "ClusterIP",
        "ports": served.iter().map(|(p, gw)| service_port_json(p, Some(*gw))).collect::<Vec<_>>(),
    });
    if let SessionAffinity::ClientIP { timeout_seconds } = &import.session_affinity {
        spec["sessionAffinity"] = json!("ClientIP");
        if let Some(t) = timeout_seconds {
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
        }
    }
    let body = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name, "namespace": key.namespace, "labels": labels,
            "annotations": {ANNOTATION_DERIVED_FOR: key.to_string()},
        },
        "spec": spec,
    });
    (
        ObjRef {
            kind: WriteKind::Service,
            namespace: key.namespace.clone(),
            name: name.to_owned(),
        },
        DesiredObject { body, status: None },
    )
}

fn service_port_json(p: &ServicePort, target: Option<u16>) -> Value {
    let mut v = json!({"protocol": p.protocol.as_str(), "port": p.port});
    // A Service with several ports needs names; give unnamed ports a generated one.
    v["name"] = json!(p.name.clone().unwrap_or_else(|| format!(
        "{}-{}",
        p.protocol.as_str().to_lowercase(),
        p.port
    )));
    if let Some(t) = target {
        v["targetPort"] = json!(t);
    }
    if let Some(a) = &p.app_protocol {
        v["appProtocol"] = json!(a);
    }
    v
}

fn derived_slice(
    key: &ServiceKey,
    service: &str,
    pod_ip: IpAddr,
    served: &[(&ServicePort, u16)],
) -> (ObjRef, DesiredObject) {
    let mut labels = managed_labels();
    labels.insert(LABEL_KUBE_SERVICE_NAME.to_owned(), json!(service));
    labels.insert(LABEL_SLICE_MANAGED_BY.to_owned(), json!(MANAGED_BY));
    let body = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": service, "namespace": key.namespace, "labels": labels},
        "addressType": family_str(family_of(&pod_ip)),
        "ports": served.iter().map(|(p, gw)| {
            let svc = service_port_json(p, None);
            json!({"name": svc["name"], "protocol": p.protocol.as_str(), "port": gw})
        }).collect::<Vec<_>>(),
        "endpoints": [{"addresses": [pod_ip.to_string()], "conditions": {"ready": true}}],
    });
    (
        ObjRef {
            kind: WriteKind::EndpointSlice,
            namespace: key.namespace.clone(),
            name: service.to_owned(),
        },
        DesiredObject { body, status: None },
    )
}

/// `status.conditions` to write for `want`, keeping each condition's `lastTransitionTime`
/// from `prev` while its status stays the same.
pub fn merge_conditions(
    prev: &[crd::Condition],
    want: &[Condition],
    now: jiff::Timestamp,
) -> Vec<crd::Condition> {
    let now = now.round(jiff::Unit::Second).unwrap_or(now).to_string();
    want.iter()
        .map(|c| {
            let status = match c.status {
                ConditionStatus::True => "True",
                ConditionStatus::False => "False",
                ConditionStatus::Unknown => "Unknown",
            };
            let since = prev
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
            crd::Condition {
                last_transition_time: since,
                message: c.message.clone(),
                observed_generation: None,
                reason: c.reason.clone(),
                status: status.to_owned(),
                type_: c.type_.clone(),
            }
        })
        .collect()
}

/// Whether `written` already says what `want` says (times aside).
pub fn conditions_match(written: &[crd::Condition], want: &[Condition]) -> bool {
    written.len() == want.len()
        && want.iter().all(|c| {
            written.iter().any(|w| {
                w.type_ == c.type_
                    && w.reason == c.reason
                    && w.message == c.message
                    && w.status
                        == match c.status {
                            ConditionStatus::True => "True",
                            ConditionStatus::False => "False",
                            ConditionStatus::Unknown => "Unknown",
                        }
            })
        })
}

/// The writer task. Build with [`KubeWriter::new`], spawn [`KubeWriter::run`].
pub struct KubeWriter {
    client: Client,
    settings: WriterSettings,
    exports: ApiResource,
    imports: ApiResource,
    snapshots: watch::Receiver<Arc<ImportSnapshot>>,
    statuses: watch::Receiver<Arc<StatusMap>>,
    front_routes: watch::Sender<Arc<BTreeMap<u16, FrontKey>>>,
}

/// The objects of one import.
type Objects = Vec<(ObjRef, Arc<DesiredObject>)>;

/// What the writer believes the cluster holds once every queued and in-flight write is
/// answered (a write is recorded when it is queued; a failed one is taken back, so the next
/// pass sends it again).
#[derive(Default)]
struct Written {
    /// Owned objects: their last written content, `None` = exists, content unknown.
    applied: BTreeMap<ObjRef, Option<Arc<DesiredObject>>>,
    /// Conditions this writer put on each local ServiceExport.
    conditions: BTreeMap<ServiceKey, Vec<crd::Condition>>,
    /// Conditions found on ServiceExports at start-up (their transition times carry over).
    listed: BTreeMap<ServiceKey, Vec<crd::Condition>>,
    /// Objects of the last pass per import, so unchanged imports (same `Arc`) are not rebuilt.
    per_import: BTreeMap<ServiceKey, (Arc<ImportedService>, Objects)>,
    derived_ips: BTreeMap<ServiceKey, Vec<String>>,
    ports: FrontPorts,
    /// Objects whose last write failed: written again on the next pass, and a pass is run
    /// every [`RETRY_INTERVAL`] while there are any.
    failed: BTreeSet<ObjRef>,
}

/// When the writer's inputs have settled: [`DEBOUNCE`] after the last change, at most
/// [`MAX_SETTLE`] after the first one since the last pass. Pure: the loop feeds it the times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settle {
    first: Option<tokio::time::Instant>,
    last: Option<tokio::time::Instant>,
}

impl Settle {
    /// An input changed at `now`.
    pub fn changed(&mut self, now: tokio::time::Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When the next pass is due; `None` when nothing changed since the last one.
    pub fn due(&self) -> Option<tokio::time::Instant> {
        Some((self.last? + DEBOUNCE).min(self.first? + MAX_SETTLE))
    }

    /// A pass starts: later changes count towards the next one.
    pub fn reset(&mut self) {
        *self = Settle::default();
    }
}

/// The answer to one request.
struct Answer {
    action: Action,
    result: Result<Option<DynamicObject>, kube::Error>,
}

impl KubeWriter {
    /// `exports` is the ServiceExport resource the source reads (its version is used for
    /// ServiceImports too).
    pub fn new(
        client: Client,
        settings: WriterSettings,
        exports: ApiResource,
        snapshots: watch::Receiver<Arc<ImportSnapshot>>,
        statuses: watch::Receiver<Arc<StatusMap>>,
    ) -> Self {
        let imports = super::import_resource(&exports);
        let (front_routes, _) = watch::channel(Arc::new(BTreeMap::new()));
        Self { client, settings, exports, imports, snapshots, statuses, front_routes }
    }

    /// `front.mode: kube`: which gateway port serves which import port (the data plane
    /// listens on these).
    pub fn front_routes(&self) -> watch::Receiver<Arc<BTreeMap<u16, FrontKey>>> {
        self.front_routes.subscribe()
    }

    /// Reconciles until `shutdown`: first lists what fedgate owns (so a restart updates in
    /// place and deletes only what is gone), then writes on every change.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::info_span!("kube_writer", cluster = %self.settings.cluster);
        self.serve(shutdown).instrument(span).await
    }

    /// The loop: inputs that settled ([`Settle`]) start a pass, which diffs and queues writes
    /// ([`WriteQueue`]); up to [`MAX_WRITES_IN_FLIGHT`] requests run while the next changes
    /// are already being taken in.
    async fn serve(mut self, shutdown: CancellationToken) {
        let mut written = Written::default();
        // The owned objects that exist now; retried until the API server answers.
        loop {
            match self.list_owned(&mut written).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "listing fedgate's objects failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_INTERVAL) => {}
                    }
                }
            }
        }
        let grace_end = tokio::time::Instant::now() + self.settings.deletion_grace;
        let mut deletions = false;
        let mut grace_over = false;
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut queue = WriteQueue::new(MAX_WRITES_IN_FLIGHT);
        let mut running: FuturesUnordered<BoxFuture<'static, Answer>> = FuturesUnordered::new();
        let mut settle = Settle::default();
        // the first pass, once the inputs have settled after start
        settle.changed(tokio::time::Instant::now());
        self.snapshots.mark_unchanged();
        self.statuses.mark_unchanged();
        loop {
            while let Some(action) = queue.pop() {
                running.push(self.send(action));
            }
            let due = settle.due();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(answer) = running.next() => {
                    queue.finish(answer.action.target());
                    if self.complete(answer, &mut written, &queue) {
                        // a derived Service's ClusterIPs: its ServiceImport carries them next
                        settle.changed(tokio::time::Instant::now());
                    }
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    settle.reset();
                    if !deletions {
                        let snapshot = self.snapshots.borrow();
                        let heard =
                            self.settings.peers.iter().all(|p| snapshot.localities.contains_key(p));
                        deletions = heard || tokio::time::Instant::now() >= grace_end;
                        if deletions {
                            tracing::debug!(every_peer_heard = heard, "deleting stale objects from now on");
                        }
                    }
                    self.snapshots.mark_unchanged();
                    self.statuses.mark_unchanged();
                    queue.begin_pass();
                    self.plan_pass(&mut written, &mut queue, deletions);
                    tracing::trace!(queued = queue.queued(), in_flight = queue.in_flight(), superseded = queue.superseded(), "pass planned");
                }
                _ = tokio::time::sleep_until(grace_end), if !deletions && !grace_over => {
                    grace_over = true;
                    settle.changed(tokio::time::Instant::now());
                }
                r = self.snapshots.changed() => {
                    if r.is_err() { break }
                    settle.changed(tokio::time::Instant::now());
                }
                r = self.statuses.changed() => {
                    if r.is_err() { break }
                    settle.changed(tokio::time::Instant::now());
                }
                _ = retry.tick() => {
                    if !written.failed.is_empty() {
                        settle.changed(tokio::time::Instant::now());
                    }
                }
            }
        }
        tracing::debug!("kube writer stopped");
    }

    fn api(&self, kind: WriteKind, namespace: &str) -> Api<DynamicObject> {
        let res = match kind {
            WriteKind::ServiceExport => self.exports.clone(),
            WriteKind::Service => ApiResource::erase::<Service>(&()),
            WriteKind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
            WriteKind::ServiceImport => self.imports.clone(),
        };
        Api::namespaced_with(self.client.clone(), namespace, &res)
    }

    async fn list_owned(&self, written: &mut Written) -> Result<(), KubeError> {
        let api_err = |what: &str| {
            let what = what.to_owned();
            move |source| KubeError::Api { what, source }
        };
        let owned =
            ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY_FEDGATE}"));
        let kinds = [
            (WriteKind::Service, ApiResource::erase::<Service>(&())),
            (WriteKind::ServiceImport, self.imports.clone()),
            (WriteKind::EndpointSlice, ApiResource::erase::<EndpointSlice>(&())),
        ];
        for (kind, res) in kinds {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &res);
            let list = api.list(&owned).await.map_err(api_err(&format!("listing {}", res.kind)))?;
            for obj in list.items {
                let (Some(namespace), Some(name)) = (obj.metadata.namespace, obj.metadata.name)
                else {
                    continue;
                };
                if kind == WriteKind::Service
                    && let Some(ips) = obj.data["spec"]["clusterIPs"].as_array()
                    && let Some(Ok(key)) = obj
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(ANNOTATION_DERIVED_FOR))
                        .map(|k| k.split_once('/').map(|(ns, n)| ServiceKey::new(ns, n)).ok_or(()))
                {
                    written.derived_ips.insert(
                        key,
                        ips.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
                    );
                }
                written.applied.insert(ObjRef { kind, namespace, name }, None);
            }
        }
        let exports: Api<DynamicObject> = Api::all_with(self.client.clone(), &self.exports);
        let list = exports
            .list(&ListParams::default())
            .await
            .map_err(api_err("listing ServiceExports"))?;
        for obj in list.items {
            let (Some(namespace), Some(name)) =
                (obj.metadata.namespace.clone(), obj.metadata.name.clone())
            else {
                continue;
            };
            let conditions: Vec<crd::Condition> =
                serde_json::from_value(obj.data["status"]["conditions"].clone())
                    .unwrap_or_default();
            written.listed.insert(ServiceKey::new(namespace, name), conditions);
        }
        tracing::info!(
            owned = written.applied.len(),
            exports = written.listed.len(),
            "listed existing objects; reconciling in place"
        );
        Ok(())
    }

    /// One pass: diffs what the inputs want against [`Written`] and queues the difference,
    /// recording it in `written` as if done (an answer that says otherwise takes it back).
    fn plan_pass(&mut self, written: &mut Written, queue: &mut WriteQueue, deletions: bool) {
        self.plan_statuses(written, queue);
        let snapshot = Arc::clone(&self.snapshots.borrow());
        let front = self.settings.front.clone();
        if let Some(f) = &front {
            let exhausted = written.ports.reconcile(&snapshot, &f.ports);
            for k in exhausted {
                tracing::warn!(service = %k.key, port = k.port, "front.kube port range exhausted; import port not served");
            }
            let routes = Arc::new(written.ports.routes());
            if **self.front_routes.borrow() != *routes {
                self.front_routes.send_replace(routes);
                // port changes reach every import's derived Service
                written.per_import.clear();
            }
        }
        // In front kube mode a ServiceImport carries its derived Service's ClusterIPs once
        // the Service's apply has answered with them (a later pass: see `complete`).
        let mut desired_all = BTreeMap::new();
        let mut next = BTreeMap::new();
        for (key, import) in &snapshot.services {
            let ips = written.derived_ips.get(key).cloned().unwrap_or_default();
            let objects = match written.per_import.remove(key) {
                Some((prev, objects))
                    if Arc::ptr_eq(&prev, import)
                        && (front.is_none() || ips_in(&objects, &ips)) =>
                {
                    objects
                }
                _ => desired(
                    import,
                    front.as_ref().map(|f| (f, &written.ports)),
                    &ips,
                    &self.imports.api_version,
                )
                .into_iter()
                .map(|(r, d)| (r, Arc::new(d)))
                .collect(),
            };
            desired_all.extend(objects.iter().cloned());
            next.insert(key.clone(), (Arc::clone(import), objects));
        }
        written.per_import = next;
        // a failed object that is neither wanted nor known to exist needs no retry
        written.failed.retain(|r| {
            r.kind == WriteKind::ServiceExport
                || desired_all.contains_key(r)
                || written.applied.contains_key(r)
        });
        for action in plan(&desired_all, &written.applied, deletions) {
            match &action {
                Action::Apply(r, d) => {
                    written.applied.insert(r.clone(), Some(d.clone()));
                }
                Action::Delete(r) => {
                    written.applied.remove(r);
                }
                Action::Conditions(..) => {}
            }
            queue.push(action);
        }
    }

    /// Queues the conditions of this cluster's ServiceExports that differ from those written
    /// (or whose last write failed).
    fn plan_statuses(&self, written: &mut Written, queue: &mut WriteQueue) {
        let statuses = Arc::clone(&self.statuses.borrow());
        let now = jiff::Timestamp::now();
        for (key, status) in statuses.iter() {
            if status.cluster != self.settings.cluster {
                continue;
            }
            if let Some(listed) = written.listed.remove(key) {
                written.conditions.insert(key.clone(), listed);
            }
            let r = ObjRef {
                kind: WriteKind::ServiceExport,
                namespace: key.namespace.clone(),
                name: key.name.clone(),
            };
            let prev = written.conditions.get(key).cloned().unwrap_or_default();
            if conditions_match(&prev, &status.conditions) && !written.failed.contains(&r) {
                continue;
            }
            let conditions = merge_conditions(&prev, &status.conditions, now);
            written.conditions.insert(key.clone(), conditions.clone());
            queue.push(Action::Conditions(r, conditions));
        }
        written.conditions.retain(|k, _| statuses.contains_key(k));
        written.failed.retain(|r| {
            r.kind != WriteKind::ServiceExport
                || statuses.contains_key(&ServiceKey::new(r.namespace.clone(), r.name.clone()))
        });
    }

    /// The request of one action (an apply of a kind with a status is two requests, in order).
    fn send(&self, action: Action) -> BoxFuture<'static, Answer> {
        let r = action.target();
        let api = self.api(r.kind, &r.namespace);
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let export_version = self.exports.api_version.clone();
        Box::pin(async move {
            let result = match &action {
                Action::Apply(r, d) => {
                    async {
                        let obj = api.patch(&r.name, &pp, &Patch::Apply(&d.body)).await?;
                        if let Some(status) = &d.status {
                            api.patch_status(&r.name, &pp, &Patch::Apply(status)).await?;
                        }
                        Ok(Some(obj))
                    }
                    .await
                }
                Action::Delete(r) => {
                    api.delete(&r.name, &DeleteParams::default()).await.map(|_| None)
                }
                Action::Conditions(r, conditions) => {
                    let patch = json!({
                        "apiVersion": export_version,
                        "kind": "ServiceExport",
                        "status": {"conditions": conditions},
                    });
                    api.patch_status(&r.name, &pp, &Patch::Apply(&patch)).await.map(|_| None)
                }
            };
            Answer { action, result }
        })
    }

    /// Records an answer; true when a derived Service's ClusterIPs became known (its
    /// ServiceImport must be written again).
    fn complete(&self, answer: Answer, written: &mut Written, queue: &WriteQueue) -> bool {
        let Answer { action, result } = answer;
        let requeued = queue.is_queued(action.target());
        match action {
            Action::Apply(r, _) => {
                super::metrics::record_write(r.kind.as_str(), "apply", result.is_ok());
                match result {
                    Ok(obj) => {
                        written.failed.remove(&r);
                        tracing::debug!(kind = ?r.kind, namespace = %r.namespace, name = %r.name, "applied");
                        if r.kind == WriteKind::Service
                            && let Some(obj) = obj
                        {
                            let ips: Vec<String> = obj.data["spec"]["clusterIPs"]
                                .as_array()
                                .map(|a| {
                                    a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
                                })
                                .unwrap_or_default();
                            let key = obj
                                .metadata
                                .annotations
                                .as_ref()
                                .and_then(|a| a.get(ANNOTATION_DERIVED_FOR))
                                .and_then(|k| k.split_once('/'))
                                .map(|(ns, n)| ServiceKey::new(ns, n));
                            if let Some(key) = key
                                && written.derived_ips.get(&key) != Some(&ips)
                            {
                                written.derived_ips.insert(key, ips);
                                return true;
                            }
                        }
                    }
                    Err(e) => {
                        if written.failed.insert(r.clone()) {
                            tracing::warn!(kind = ?r.kind, namespace = %r.namespace, name = %r.name, error = %e, "write failed; retrying later");
                        }
                        // Unknown state: written again on the next pass (unless a newer
                        // state is already queued).
                        if !requeued {
                            written.applied.remove(&r);
                        }
                    }
                }
            }
            Action::Delete(r) => {
                let gone = matches!(&result, Err(kube::Error::Api(e)) if e.code == 404);
                super::metrics::record_write(r.kind.as_str(), "delete", result.is_ok() || gone);
                match result {
                    Ok(_) => {
                        written.failed.remove(&r);
                        tracing::debug!(kind = ?r.kind, namespace = %r.namespace, name = %r.name, "deleted");
                    }
                    Err(_) if gone => {
                        written.failed.remove(&r);
                    }
                    Err(e) => {
                        if written.failed.insert(r.clone()) {
                            tracing::warn!(kind = ?r.kind, namespace = %r.namespace, name = %r.name, error = %e, "delete failed; retrying later");
                        }
                        // Still there: deleted again by the next pass.
                        if !requeued {
                            written.applied.insert(r, None);
                        }
                    }
                }
            }
            Action::Conditions(r, _) => {
                super::metrics::record_write("ServiceExport", "status", result.is_ok());
                let key = ServiceKey::new(r.namespace.clone(), r.name.clone());
                match result {
                    Ok(_) => {
                        written.failed.remove(&r);
                        tracing::debug!(service = %key, "ServiceExport conditions written");
                    }
                    // The export was deleted meanwhile: nothing to report on.
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        written.failed.remove(&r);
                        if !requeued {
                            written.conditions.remove(&key);
                        }
                    }
                    Err(e) => {
                        if written.failed.insert(r) {
                            tracing::warn!(service = %key, error = %e, "writing ServiceExport conditions failed; retrying");
                        }
                    }
                }
            }
        }
        false
    }
}

/// Whether a front-kube import's ServiceImport already carries `ips`.
fn ips_in(objects: &[(ObjRef, Arc<DesiredObject>)], ips: &[String]) -> bool {
    objects.iter().filter(|(r, _)| r.kind == WriteKind::ServiceImport).all(|(_, d)| {
        let have = d.body["spec"]["ips"].as_array().cloned().unwrap_or_default();
        have.iter().filter_map(|v| v.as_str()).eq(ips.iter().map(String::as_str))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConflictInfo, ExportedService, ImportPort, Protocol, TargetPort};

    const V1BETA1: &str = "multicluster.x-k8s.io/v1beta1";

    fn cid(s: &str) -> ClusterId {
        ClusterId::new(s).expect("cluster id")
    }

    fn ep(ip: &str, port: Option<u16>) -> Endpoint {
        Endpoint {
            address: ip.parse().expect("ip"),
            hostname: None,
            ready: true,
            zone: Some("z1".into()),
            ports: port
                .map(|p| {
                    vec![crate::model::EndpointPort {
                        name: Some("http".into()),
                        protocol: Protocol::Tcp,
                        port: p,
                    }]
                })
                .unwrap_or_default(),
            health: Health::Healthy,
        }
    }

    fn export(cluster: &str, endpoints: Vec<Endpoint>) -> Arc<ExportedService> {
        Arc::new(ExportedService {
            internal_traffic_policy: Some("Cluster".into()),
            ip_families: vec![IpFamily::IPv4],
            ..crate::exchange::delta::testing::exported(
                ServiceKey::new("shop", "web"),
                cluster,
                ServiceType::ClusterSetIP,
                vec![ServicePort::tcp(Some("http"), 80)],
                endpoints,
            )
        })
    }

    fn import(clusters: &[(&str, Vec<Endpoint>)]) -> ImportedService {
        ImportedService {
            key: ServiceKey::new("shop", "web"),
            service_type: ServiceType::ClusterSetIP,
            ports: vec![ImportPort {
                port: ServicePort {
                    target_port: Some(TargetPort::Number(8080)),
                    ..ServicePort::tcp(Some("http"), 80)
                },
                clusters: clusters.iter().map(|(c, _)| cid(c)).collect(),
            }],
            session_affinity: SessionAffinity::ClientIP { timeout_seconds: Some(60) },
            internal_traffic_policy: Some("Cluster".into()),
            traffic_distribution: None,
            ip_families: vec![IpFamily::IPv4],
            labels: BTreeMap::from([("tier".to_owned(), "gold".to_owned())]),
            annotations: BTreeMap::new(),
            ips: vec!["242.1.0.7".parse().expect("ip")],
            winner: cid(clusters[0].0),
            clusters: clusters.iter().map(|(c, e)| (cid(c), export(c, e.clone()))).collect(),
            conflicts: Vec::<ConflictInfo>::new(),
        }
    }

    fn by_kind(objs: &[(ObjRef, DesiredObject)], kind: WriteKind) -> Vec<&DesiredObject> {
        objs.iter().filter(|(r, _)| r.kind == kind).map(|(_, d)| d).collect()
    }

    #[test]
    fn an_import_becomes_a_service_import_and_one_slice_per_cluster() {
        let imp = import(&[
            ("east", vec![ep("10.1.0.1", Some(8080)), ep("10.1.0.2", Some(8080))]),
            ("west", vec![ep("10.2.0.1", None)]),
        ]);
        let objs = desired(&imp, None, &[], V1BETA1);
        let si = by_kind(&objs, WriteKind::ServiceImport);
        assert_eq!(si.len(), 1);
        let body = &si[0].body;
        assert_eq!(body["apiVersion"], "multicluster.x-k8s.io/v1beta1");
        assert_eq!(body["spec"]["type"], "ClusterSetIP");
        assert_eq!(body["spec"]["ips"], json!(["242.1.0.7"]));
        assert_eq!(body["spec"]["ports"], json!([{"name": "http", "protocol": "TCP", "port": 80}]));
        assert_eq!(body["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"], 60);
        assert_eq!(body["metadata"]["labels"]["tier"], "gold");
        assert_eq!(body["metadata"]["labels"][LABEL_MANAGED_BY], MANAGED_BY_FEDGATE);
        let status = si[0].status.as_ref().expect("status");
        assert_eq!(status["status"]["clusters"], json!([{"cluster": "east"}, {"cluster": "west"}]));

        let slices = by_kind(&objs, WriteKind::EndpointSlice);
        assert_eq!(slices.len(), 2);
        let east = slices[0];
        let labels = &east.body["metadata"]["labels"];
        assert_eq!(labels[LABEL_SERVICE_NAME], "web");
        assert_eq!(labels[LABEL_SOURCE_CLUSTER], "east");
        assert_eq!(labels[LABEL_SLICE_MANAGED_BY], MANAGED_BY);
        assert_eq!(east.body["addressType"], "IPv4");
        assert_eq!(east.body["ports"], json!([{"name": "http", "protocol": "TCP", "port": 8080}]));
        assert_eq!(east.body["endpoints"].as_array().map(Vec::len), Some(2));
        assert_eq!(east.body["endpoints"][0]["zone"], "z1");
        // an endpoint without ports reaches the service port through targetPort
        assert_eq!(slices[1].body["ports"][0]["port"], 8080);
    }

    #[test]
    fn slices_split_by_family_ports_and_size() {
        let mut eps: Vec<Endpoint> = (0..1001u32)
            .map(|i| ep(&std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string(), Some(8080)))
            .collect();
        eps.push(ep("fd00::1", Some(8080)));
        eps.push(ep("10.9.0.1", Some(9090)));
        let imp = import(&[("east", eps)]);
        let objs = desired(&imp, None, &[], V1BETA1);
        let slices = by_kind(&objs, WriteKind::EndpointSlice);
        let shape: Vec<(String, u64, usize)> = slices
            .iter()
            .map(|d| {
                (
                    d.body["addressType"].as_str().unwrap_or_default().to_owned(),
                    d.body["ports"][0]["port"].as_u64().unwrap_or_default(),
                    d.body["endpoints"].as_array().map_or(0, Vec::len),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                ("IPv4".to_owned(), 8080, 1000),
                ("IPv4".to_owned(), 8080, 1),
                ("IPv4".to_owned(), 9090, 1),
                ("IPv6".to_owned(), 8080, 1)
            ]
        );
        let names: BTreeSet<&str> =
            slices.iter().filter_map(|d| d.body["metadata"]["name"].as_str()).collect();
        assert_eq!(names.len(), 4, "names are distinct");
    }

    #[test]
    fn names_are_stable_valid_and_distinct() {
        let k = ServiceKey::new("shop", "web");
        assert_eq!(slice_name(&k, "east", 0), slice_name(&k, "east", 0));
        // dashes that line up differently still give different names
        assert_ne!(
            slice_name(&ServiceKey::new("ns", "a-b"), "c", 0),
            slice_name(&ServiceKey::new("ns", "a"), "b-c", 0)
        );
        let long = slice_name(&ServiceKey::new("ns", "s".repeat(63)), &"c".repeat(63), 3);
        assert!(long.len() <= 63, "{long}");
        let derived = derived_service_name(&k);
        assert!(derived.starts_with("fedgate-") && derived.len() == 16, "{derived}");
        assert_ne!(derived, derived_service_name(&ServiceKey::new("other", "web")));
    }

    #[test]
    fn unhealthy_endpoints_are_not_ready_but_serving() {
        let mut bad = ep("10.1.0.1", Some(8080));
        bad.health = Health::Unhealthy;
        let v = endpoint_json(&bad);
        assert_eq!(v["conditions"], json!({"ready": false, "serving": true}));
    }

    #[test]
    fn plan_applies_changes_and_deletes_what_is_gone() {
        let r = |kind, name: &str| ObjRef { kind, namespace: "shop".into(), name: name.into() };
        let d = |v: i32| Arc::new(DesiredObject { body: json!({ "v": v }), status: None });
        let desired = BTreeMap::from([
            (r(WriteKind::EndpointSlice, "same"), d(1)),
            (r(WriteKind::EndpointSlice, "changed"), d(2)),
            (r(WriteKind::ServiceImport, "new"), d(3)),
            (r(WriteKind::Service, "unknown"), d(4)),
        ]);
        let applied = BTreeMap::from([
            (r(WriteKind::EndpointSlice, "same"), Some(d(1))),
            (r(WriteKind::EndpointSlice, "changed"), Some(d(1))),
            (r(WriteKind::Service, "unknown"), None),
            (r(WriteKind::EndpointSlice, "gone"), Some(d(9))),
        ]);
        let got: Vec<String> = plan(&desired, &applied, true)
            .iter()
            .map(|a| match a {
                Action::Apply(r, _) => format!("apply {}", r.name),
                Action::Delete(r) => format!("delete {}", r.name),
                Action::Conditions(r, _) => format!("conditions {}", r.name),
            })
            .collect();
        // Services first, then ServiceImports, then slices; deletions last
        assert_eq!(got, ["apply unknown", "apply new", "apply changed", "delete gone"]);
        let all_applied = desired.iter().map(|(k, v)| (k.clone(), Some(v.clone()))).collect();
        assert!(plan(&desired, &all_applied, true).is_empty());
        // during the grace after a restart, nothing is deleted
        let held = plan(&desired, &applied, false);
        assert!(held.iter().all(|a| matches!(a, Action::Apply(..))), "{held:?}");
        assert_eq!(held.len(), 3);
    }

    #[test]
    fn condition_times_move_only_on_status_change() {
        let t0: jiff::Timestamp = "2026-01-01T00:00:00Z".parse().expect("ts");
        let t1: jiff::Timestamp = "2026-01-01T00:05:00.7Z".parse().expect("ts");
        let cond = |t: &str, s, r: &str| Condition {
            type_: t.into(),
            status: s,
            reason: r.into(),
            message: "m".into(),
        };
        let first = merge_conditions(
            &[],
            &[
                cond("Valid", ConditionStatus::True, "Valid"),
                cond("Ready", ConditionStatus::False, "Pending"),
            ],
            t0,
        );
        assert_eq!(first[0].last_transition_time, "2026-01-01T00:00:00Z");
        let want = [
            cond("Valid", ConditionStatus::True, "Valid"),
            cond("Ready", ConditionStatus::True, "Exported"),
        ];
        assert!(!conditions_match(&first, &want));
        let second = merge_conditions(&first, &want, t1);
        assert_eq!(second[0].last_transition_time, "2026-01-01T00:00:00Z", "Valid unchanged");
        assert_eq!(
            second[1].last_transition_time, "2026-01-01T00:05:01Z",
            "Ready flipped (rounded to seconds)"
        );
        assert!(conditions_match(&second, &want));
    }

    #[test]
    fn a_pass_waits_for_quiet_inputs_but_not_forever() {
        let t0 = tokio::time::Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        let mut s = Settle::default();
        assert_eq!(s.due(), None, "nothing changed");
        s.changed(t0);
        assert_eq!(s.due(), Some(t0 + DEBOUNCE));
        // each change within the quiet period moves the pass back...
        s.changed(t0 + ms(80));
        assert_eq!(s.due(), Some(t0 + ms(80) + DEBOUNCE));
        // ...up to MAX_SETTLE after the first change
        for i in 1..=20 {
            s.changed(t0 + ms(90 * i));
        }
        assert_eq!(s.due(), Some(t0 + MAX_SETTLE));
        s.reset();
        assert_eq!(s.due(), None);
    }

    #[test]
    fn front_ports_are_stable_reused_and_bounded() {
        let snap = |names: &[&str]| {
            let mut s = ImportSnapshot::default();
            for n in names {
                let mut i = import(&[("east", vec![])]);
                i.key = ServiceKey::new("shop", *n);
                s.services.insert(i.key.clone(), Arc::new(i));
            }
            s
        };
        let fk = |n: &str| FrontKey {
            key: ServiceKey::new("shop", n),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let range = 20000..=20001;
        let mut ports = FrontPorts::default();
        assert!(ports.reconcile(&snap(&["a", "b"]), &range).is_empty());
        assert_eq!((ports.get(&fk("a")), ports.get(&fk("b"))), (Some(20000), Some(20001)));
        // a full range leaves the newcomer out
        assert_eq!(ports.reconcile(&snap(&["a", "b", "c"]), &range), [fk("c")]);
        // a freed port is reused, the others stay
        assert!(ports.reconcile(&snap(&["b", "c"]), &range).is_empty());
        assert_eq!((ports.get(&fk("b")), ports.get(&fk("c"))), (Some(20001), Some(20000)));
    }

    #[test]
    fn front_kube_derives_a_service_pointing_at_the_gateway() {
        let imp = import(&[("east", vec![ep("10.1.0.1", Some(8080))])]);
        let mut snap = ImportSnapshot::default();
        snap.services.insert(imp.key.clone(), Arc::new(imp.clone()));
        let settings =
            FrontSettings { pod_ip: "10.244.0.5".parse().expect("ip"), ports: 20000..=20999 };
        let mut ports = FrontPorts::default();
        ports.reconcile(&snap, &settings.ports);

        // before the derived Service has a ClusterIP the ServiceImport has no ips
        let objs = desired(&imp, Some((&settings, &ports)), &[], V1BETA1);
        let svc = by_kind(&objs, WriteKind::Service);
        assert_eq!(svc.len(), 1);
        assert_eq!(
            svc[0].body["spec"]["ports"],
            json!([{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 20000}])
        );
        assert!(svc[0].body["spec"].get("selector").is_none(), "selector-less");
        let name = derived_service_name(&imp.key);
        let gw_slice = by_kind(&objs, WriteKind::EndpointSlice)
            .into_iter()
            .find(|d| d.body["metadata"]["name"] == json!(name))
            .expect("derived slice");
        assert_eq!(gw_slice.body["metadata"]["labels"][LABEL_KUBE_SERVICE_NAME], json!(name));
        assert_eq!(gw_slice.body["endpoints"][0]["addresses"], json!(["10.244.0.5"]));
        assert_eq!(gw_slice.body["ports"][0]["port"], 20000);
        assert!(by_kind(&objs, WriteKind::ServiceImport)[0].body["spec"].get("ips").is_none());

        let objs = desired(&imp, Some((&settings, &ports)), &["10.96.0.50".to_owned()], V1BETA1);
        assert_eq!(
            by_kind(&objs, WriteKind::ServiceImport)[0].body["spec"]["ips"],
            json!(["10.96.0.50"])
        );
    }
}
