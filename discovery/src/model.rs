//! The model every part of fedgate shares: clusters, services, endpoints, exports and imports.
//!
//! Wire types (Kubernetes objects, protobuf messages, YAML documents) are converted into these
//! with `TryFrom` at the edge; nothing in here knows about them. Values are immutable once
//! published: snapshots hand out `Arc`s, and a change produces a new value.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::names::{Label, NameError, SpiffeError, SpiffeId, Subdomain};

/// Label key under which a cluster's id takes part in locality and failover priority.
pub const LABEL_SOURCE_CLUSTER: &str = "multicluster.kubernetes.io/source-cluster";
/// Label key of the region in a locality.
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
/// Label key of the zone in a locality.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Label put on EndpointSlices of an import: the import's name.
pub const LABEL_SERVICE_NAME: &str = "multicluster.kubernetes.io/service-name";
/// Value of `endpointslice.kubernetes.io/managed-by` on slices fedgate writes (a label value:
/// no `/`, which the API server refuses there).
pub const MANAGED_BY: &str = "gateway.fedgate.io";

/// A cluster's id (KEP-2149): an RFC 1123 DNS label, unique and stable in the clusterset.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterId(Arc<str>);

/// Why a string is not a valid cluster id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cluster id {value:?}: {reason}")]
pub struct InvalidClusterId {
    pub value: String,
    pub reason: &'static str,
}

impl ClusterId {
    pub fn new(value: impl AsRef<str>) -> Result<Self, InvalidClusterId> {
        let value = value.as_ref();
        Label::check(value)
            .map_err(|e| InvalidClusterId { value: value.to_owned(), reason: e.reason() })?;
        Ok(Self(value.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

crate::names::name_conversions!(ClusterId, InvalidClusterId);

/// A namespaced service name; the identity of an export and of an import.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The type of an imported service (ServiceImport `spec.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ServiceType {
    /// The clusterset gets one virtual IP (per family) for the service.
    ClusterSetIP,
    /// No virtual IP: DNS answers with the endpoints themselves.
    Headless,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterSetIP => "ClusterSetIP",
            ServiceType::Headless => "Headless",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The Kubernetes spelling (`TCP`, `UDP`, `SCTP`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

/// A port of a service as the clusterset sees it (ServiceImport `spec.ports[]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    /// Required by Kubernetes when a service has more than one port.
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
    pub app_protocol: Option<String>,
    /// The Service's `targetPort`: a number, or the name of an endpoint port. Used only in the
    /// exporting cluster to reach its endpoints when the EndpointSlice has no matching port.
    pub target_port: Option<TargetPort>,
}

impl ServicePort {
    /// A TCP port with no appProtocol and no targetPort (the endpoint port of the same name,
    /// else the same number, serves it).
    pub fn tcp(name: Option<&str>, port: u16) -> Self {
        Self {
            name: name.map(str::to_owned),
            protocol: Protocol::Tcp,
            port,
            app_protocol: None,
            target_port: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// A port of an endpoint (EndpointSlice `ports[]`). Matched to a service port by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
}

/// Health of an endpoint as the gateway of its own cluster observed it with active probes
/// and passive outlier detection. `Unknown` until the first probe finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Health {
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

/// One backend of a service in one cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// The first address of the EndpointSlice endpoint (consumers use the first, per the
    /// EndpointSlice API).
    pub address: IpAddr,
    /// `hostname` of the EndpointSlice endpoint, used for headless per-host DNS names.
    pub hostname: Option<String>,
    /// `conditions.ready` (absent counts as ready, per the EndpointSlice API).
    pub ready: bool,
    /// The zone of the endpoint when its EndpointSlice says it; else the cluster's.
    pub zone: Option<String>,
    /// Ports from the endpoint's EndpointSlice.
    pub ports: Vec<EndpointPort>,
    /// What the exporting gateway's health checks say.
    pub health: Health,
}

impl Endpoint {
    /// The port on this endpoint that serves `service_port`: by name first, then by target
    /// port, then the service port itself.
    pub fn port_for(&self, service_port: &ServicePort) -> Option<u16> {
        if let Some(p) = self
            .ports
            .iter()
            .find(|p| p.name == service_port.name && p.protocol == service_port.protocol)
        {
            return Some(p.port);
        }
        match &service_port.target_port {
            Some(TargetPort::Number(n)) => Some(*n),
            Some(TargetPort::Name(name)) => {
                self.ports.iter().find(|p| p.name.as_deref() == Some(name.as_str())).map(|p| p.port)
            }
            None if self.ports.is_empty() => Some(service_port.port),
            None => None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionAffinity {
    #[default]
    None,
    /// `ClientIP`, with `sessionAffinityConfig.clientIP.timeoutSeconds` if set.
    ClientIP { timeout_seconds: Option<i32> },
}

/// Where a cluster (and by default each of its endpoints) sits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Locality {
    pub region: Option<String>,
    pub zone: Option<String>,
    /// Extra labels that `traffic.failoverPriority` may name.
    pub labels: BTreeMap<String, String>,
}

impl Locality {
    /// The labels of a workload in `cluster` at this locality, as failover priority sees
    /// them: the cluster id, region, zone and the extra labels.
    pub fn labels_for(&self, cluster: &ClusterId) -> BTreeMap<String, String> {
        let mut out = self.labels.clone();
        out.insert(LABEL_SOURCE_CLUSTER.to_owned(), cluster.to_string());
        if let Some(r) = &self.region {
            out.insert(LABEL_REGION.to_owned(), r.clone());
        }
        if let Some(z) = &self.zone {
            out.insert(LABEL_ZONE.to_owned(), z.clone());
        }
        out
    }
}

/// One Service of the local cluster as the cluster source sees it, exported or not.
/// `cluster.local` DNS answers from these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalService {
    pub key: ServiceKey,
    /// `ClusterIP`, `NodePort`, `LoadBalancer` or `ExternalName` (Kubernetes spelling).
    pub kube_type: String,
    /// `spec.clusterIP(s)`; empty for headless services, and for file-mode Services that
    /// name no clusterIP (they have no cluster.local address but are not headless).
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`: DNS answers with the endpoints, the import is `Headless`.
    pub headless: bool,
    pub ports: Vec<ServicePort>,
    pub session_affinity: SessionAffinity,
    pub internal_traffic_policy: Option<String>,
    pub traffic_distribution: Option<String>,
    pub ip_families: Vec<IpFamily>,
    /// Endpoints from all EndpointSlices labelled `kubernetes.io/service-name=<name>`.
    pub endpoints: Vec<Endpoint>,
}

impl LocalService {
    pub fn is_headless(&self) -> bool {
        self.headless
    }
}

/// A ServiceExport object of the local cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceExportObject {
    pub key: ServiceKey,
    /// `metadata.creationTimestamp`: precedence in conflicts, oldest first.
    pub created: jiff::Timestamp,
    /// Labels and annotations to carry to the import (`spec.exportedLabels` /
    /// `spec.exportedAnnotations` of mcs-api v1beta1).
    pub exported_labels: BTreeMap<String, String>,
    pub exported_annotations: BTreeMap<String, String>,
}

/// The whole local cluster as one immutable value, published by a cluster source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub services: BTreeMap<ServiceKey, Arc<LocalService>>,
    pub exports: BTreeMap<ServiceKey, Arc<ServiceExportObject>>,
}

/// A service one cluster exports to the clusterset: what it tells its peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedService {
    pub key: ServiceKey,
    pub cluster: ClusterId,
    pub service_type: ServiceType,
    pub ports: Vec<ServicePort>,
    pub session_affinity: SessionAffinity,
    pub internal_traffic_policy: Option<String>,
    pub traffic_distribution: Option<String>,
    pub ip_families: Vec<IpFamily>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The ServiceExport's creation time (conflict precedence).
    pub created: jiff::Timestamp,
    pub endpoints: Vec<Endpoint>,
}

/// Everything one cluster exports, with a version that grows with every change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSet {
    pub cluster: ClusterId,
    pub locality: Locality,
    pub version: u64,
    pub services: BTreeMap<ServiceKey, Arc<ExportedService>>,
}

/// Status of a Kubernetes-style condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// A condition as the MCS API writes it on a ServiceExport.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Condition {
    /// `Valid`, `Ready` or `Conflict`.
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    pub reason: String,
    pub message: String,
}

/// Status of one ServiceExport in one cluster: `Valid`, `Ready`, `Conflict`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportStatus {
    pub key: ServiceKey,
    pub cluster: ClusterId,
    pub conditions: Vec<Condition>,
}

/// A port of an import, and the clusters that expose it (traffic on a port goes only to
/// clusters that expose it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportPort {
    pub port: ServicePort,
    pub clusters: BTreeSet<ClusterId>,
}

/// One conflict on an import: which property, who won, who disagrees.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictInfo {
    /// The spec's reason string, e.g. `TypeConflict`, `PortConflict`.
    pub reason: String,
    /// The cluster whose value is in force (the oldest export).
    pub winner: ClusterId,
    /// Clusters whose export disagrees with the value in force.
    pub disagreeing: BTreeSet<ClusterId>,
    pub message: String,
}

/// A service as the clusterset imports it: the merge of every cluster's export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedService {
    pub key: ServiceKey,
    pub service_type: ServiceType,
    pub ports: Vec<ImportPort>,
    pub session_affinity: SessionAffinity,
    pub internal_traffic_policy: Option<String>,
    pub traffic_distribution: Option<String>,
    pub ip_families: Vec<IpFamily>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// ClusterSetIPs served by this gateway (empty for headless), stable for the life of the
    /// import.
    pub ips: Vec<IpAddr>,
    /// The cluster whose export defines the properties in force.
    pub winner: ClusterId,
    /// Each exporting cluster's contribution, endpoints included.
    pub clusters: BTreeMap<ClusterId, Arc<ExportedService>>,
    pub conflicts: Vec<ConflictInfo>,
}

/// Everything this gateway imports, plus what DNS and the data plane need beside it.
/// Published as one immutable snapshot; consumers diff by `Arc::ptr_eq` on services.
#[derive(Clone, Debug, Default)]
pub struct ImportSnapshot {
    pub version: u64,
    pub local_cluster: Option<ClusterId>,
    pub services: BTreeMap<ServiceKey, Arc<ImportedService>>,
    /// Localities of every known cluster (own included), for failover priority.
    pub localities: BTreeMap<ClusterId, Locality>,
    /// Clusters whose exports are currently withdrawn or whose tunnel is down.
    pub unreachable: BTreeSet<ClusterId>,
    /// VIPs given to remote endpoints of headless services: each leads to exactly one
    /// endpoint through the tunnel.
    pub endpoint_vips: BTreeMap<IpAddr, EndpointVip>,
    /// Clusters in `flat` network mode (`traffic.network`, `peers[].network`): their pod
    /// network is routed to this one, so their endpoints are answered and reached at their own
    /// addresses, without endpoint VIPs and without the tunnel.
    pub flat: BTreeSet<ClusterId>,
}

/// A VIP that stands for one endpoint of a headless service in another cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointVip {
    pub key: ServiceKey,
    pub cluster: ClusterId,
    pub endpoint: IpAddr,
}

/// Health of local endpoints as the gateway's checks see them, per service and endpoint
/// address. The local export set stamps it onto `Endpoint::health` before exporting.
pub type HealthMap = BTreeMap<(ServiceKey, IpAddr), Health>;

/// What a peer session tells the import set. The session keeps the peer's whole export set
/// and sends it as one value; the import set diffs services by `Arc::ptr_eq`, so unchanged
/// services cost nothing.
#[derive(Clone, Debug)]
pub enum PeerUpdate {
    /// The peer's current export set (after a resync or a delta was applied).
    Exports(Arc<ExportSet>),
    /// The peer's lease expired: withdraw all its exports (they come back with `Exports`).
    Withdrawn(ClusterId),
    /// The peer's QUIC connection went up or down, or it announced it is draining. A peer
    /// that is down or draining counts as unhealthy at once, before its lease expires.
    Reachability { cluster: ClusterId, reachable: bool, draining: bool },
}

/// How a peer looks from here, for `/debug`, the dashboard and metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub cluster: ClusterId,
    pub address: String,
    pub connected: bool,
    pub draining: bool,
    /// Round-trip time of the QUIC connection, when connected.
    pub rtt_ms: Option<f64>,
    /// Largest UDP payload the QUIC connection uses now (path MTU discovery), when connected.
    #[serde(default)]
    pub path_mtu: Option<u16>,
    /// Seconds since we last heard from the peer (the lease runs from then).
    pub last_seen_secs: Option<f64>,
    /// Version of the peer's export set we hold.
    pub exports_version: Option<u64>,
    pub exports_withdrawn: bool,
    /// Why the last connection attempt or handshake failed, if it did.
    pub last_error: Option<String>,
    /// How many replicas the peer's configured addresses resolve to.
    #[serde(default)]
    pub expected_replicas: usize,
    /// Each replica of the peer: connected ones, and dialed addresses without a connection.
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
}

/// How one replica of a peer looks from here.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Its tunnel address.
    pub address: String,
    /// The instance id it announced (new at each of its starts).
    pub instance: Option<String>,
    pub connected: bool,
    /// `dial` or `accept`.
    pub direction: String,
    pub draining: bool,
    pub rtt_ms: Option<f64>,
    pub path_mtu: Option<u16>,
    /// Seconds its connection has been up.
    pub connected_secs: Option<f64>,
    /// Connections to it beyond the first, one per further data-plane thread (lanes: data
    /// streams only).
    #[serde(default)]
    pub lanes: usize,
    /// The lanes' send windows together: each follows its path (twice the bandwidth-delay
    /// product it measures, at least 1 MiB, at most the configured window); `None` while not
    /// connected.
    #[serde(default)]
    pub send_window_bytes: Option<u64>,
    /// Seconds since it was last heard from (the lease age: the peer's exports stay while
    /// any replica is heard from within the lease).
    pub last_seen_secs: Option<f64>,
    /// Version of the export set it sent last (the newest over the replicas is imported).
    pub exports_version: Option<u64>,
    pub last_error: Option<String>,
}
