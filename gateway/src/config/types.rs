//! The configuration as typed data: one struct per section of the YAML file, defaults as
//! named constants. `docs/configuration.md` documents every field; a test keeps it in sync.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use fedgate_discovery::model::{ClusterId, Locality, SpiffeId, Subdomain};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::traffic::{NetworkMode, TrafficConfig};

/// `TryFrom<String>` through `FromStr` and `From<T> for String` through `Display`: a type
/// that serde reads and writes as its text form (`#[serde(try_from = "String", into =
/// "String")]`).
macro_rules! text_form {
    ($($t:ty),+) => {$(
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }

        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.to_string()
            }
        }
    )+};
}

text_form!(PriorityLabel, PeerAddress);

/// Clusterset name (and SPIFFE trust domain) when `cluster.clusterset` is not set.
pub const DEFAULT_CLUSTERSET: &str = "fedgate";
/// How long a peer may be unreachable before its exports are withdrawn: 15 seconds.
pub const DEFAULT_PEER_LEASE_DURATION: Duration = Duration::from_secs(15);
/// UDP port of the QUIC tunnel (data and control).
pub const DEFAULT_TUNNEL_PORT: u16 = 15443;
/// Where the QUIC tunnel listens: all IPv4 addresses, UDP 15443.
pub const DEFAULT_TUNNEL_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DEFAULT_TUNNEL_PORT));
/// Where the DNS server listens (UDP and TCP): all IPv4 addresses, port 53.
pub const DEFAULT_DNS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 53));
/// Port assumed for a `dns.upstream` entry given as a bare IP address.
pub const DEFAULT_UPSTREAM_PORT: u16 = 53;
/// TTL of the DNS answers fedgate gives: 5 seconds.
pub const DEFAULT_DNS_TTL: Duration = Duration::from_secs(5);
/// Range ClusterSetIPs are taken from in `vip` mode (IPv4 class E space, never routed).
pub const DEFAULT_CLUSTERSET_IP_RANGE: &str = "242.1.0.0/16";
/// The smallest number of usable addresses `front.clusterSetIPRange` must hold.
pub const MIN_CLUSTERSET_IPS: u128 = 16;
/// Where the admin HTTP server (metrics, health, dashboard) listens.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15000));
/// Directory of the file source, relative to the config file, when `discovery.file.dir` is
/// not set: `clusters/<cluster.id>`.
pub const DEFAULT_FILE_DIR_PARENT: &str = "clusters";
/// File name of the CA bundle when `tls.ca` is not set (next to the config file).
pub const DEFAULT_CA_FILE: &str = "ca.crt";

/// The whole gateway configuration. Every field has a default except `cluster.id` and
/// `peers`. Relative paths are resolved against the directory of the config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Who this gateway is: cluster id, clusterset, locality.
    pub cluster: ClusterConfig,
    /// Where local services come from and how long peers' exports live.
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    /// The other gateways of the clusterset (may be empty, but must be given).
    pub peers: Vec<PeerConfig>,
    /// Certificate, key and CA bundle of the tunnel's mutual TLS.
    #[serde(default)]
    pub tls: TlsConfig,
    /// The QUIC tunnel listener.
    #[serde(default)]
    pub tunnel: TunnelConfig,
    /// The DNS server.
    #[serde(default)]
    pub dns: DnsConfig,
    /// How clients reach imported services.
    #[serde(default)]
    pub front: FrontConfig,
    /// The admin HTTP server.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Endpoint selection, health checks, draining.
    #[serde(default)]
    pub traffic: TrafficConfig,
}

impl Config {
    /// The peers in flat network mode: `peers[].network`, else `traffic.network`.
    pub fn flat_peers(&self) -> std::collections::BTreeSet<ClusterId> {
        self.peers
            .iter()
            .filter(|p| p.network.unwrap_or(self.traffic.network) == NetworkMode::Flat)
            .map(|p| p.id.clone())
            .collect()
    }
}

/// `cluster`: the identity and locality of this gateway's cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterConfig {
    /// The cluster id (KEP-2149): an RFC 1123 label, unique in the clusterset. Required with
    /// `discovery.source: file`; with `kube` the ClusterProperty `cluster.clusterset.k8s.io`
    /// provides it when the config leaves it out.
    pub id: ClusterId,
    /// The clusterset's name, also the SPIFFE trust domain of gateway certificates.
    #[serde(default = "default_clusterset")]
    pub clusterset: String,
    /// Region and zone of the cluster, used by failover priority.
    #[serde(default)]
    pub locality: LocalityConfig,
    /// Extra labels of this cluster that `traffic.failoverPriority` may name.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `cluster` as the file spells it: `id` may be left out (with `discovery.source: kube` the
/// ClusterProperty provides it). Becomes a [`ClusterConfig`] once the id is known.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ClusterSection {
    #[serde(default)]
    pub id: Option<ClusterId>,
    #[serde(default = "default_clusterset")]
    pub clusterset: String,
    #[serde(default)]
    pub locality: LocalityConfig,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl ClusterSection {
    pub(crate) fn with_id(self, id: ClusterId) -> ClusterConfig {
        ClusterConfig {
            id,
            clusterset: self.clusterset,
            locality: self.locality,
            labels: self.labels,
        }
    }
}

/// `cluster.locality`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalityConfig {
    /// `topology.kubernetes.io/region` of the cluster; none by default.
    #[serde(default)]
    pub region: Option<String>,
    /// `topology.kubernetes.io/zone` of the cluster; none by default.
    #[serde(default)]
    pub zone: Option<String>,
}

/// `discovery`: the cluster source and peer leases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DiscoveryConfig {
    /// Where local Services, EndpointSlices and ServiceExports come from.
    pub source: SourceKind,
    /// Settings of the `file` source.
    pub file: FileSourceConfig,
    /// Settings of the `kube` source.
    pub kube: KubeSourceConfig,
    /// A peer unreachable for longer than this has its exports withdrawn.
    #[serde(with = "duration")]
    pub peer_lease_duration: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            source: SourceKind::File,
            file: FileSourceConfig::default(),
            kube: KubeSourceConfig::default(),
            peer_lease_duration: DEFAULT_PEER_LEASE_DURATION,
        }
    }
}

/// `discovery.source`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Kubernetes YAML files in `discovery.file.dir`, watched for changes.
    #[default]
    File,
    /// A Kubernetes API server (watch).
    Kube,
}

/// `discovery.file`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct FileSourceConfig {
    /// Directory of Kubernetes YAML (Service, EndpointSlice, ServiceExport). Default
    /// `clusters/<cluster.id>` next to the config file.
    pub dir: PathBuf,
}

/// `discovery.kube`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KubeSourceConfig {
    /// Path of a kubeconfig; none = in-cluster config, else `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// How the replicas of this cluster elect the one that writes (ServiceImports,
    /// EndpointSlices, derived Services, ServiceExport status).
    pub leader_election: LeaderElectionConfig,
}

/// Default `discovery.kube.leaderElection.leaseName`.
pub const DEFAULT_LEADER_LEASE_NAME: &str = "fedgate-leader";
/// Default `discovery.kube.leaderElection.leaseDuration`.
pub const DEFAULT_LEADER_LEASE_DURATION: Duration = Duration::from_secs(15);

/// `discovery.kube.leaderElection`: a coordination.k8s.io/v1 Lease; its holder is the only
/// replica that writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LeaderElectionConfig {
    /// Name of the Lease.
    pub lease_name: String,
    /// Namespace of the Lease; none = the `POD_NAMESPACE` environment variable (the
    /// Deployment sets it from the downward API), else `default`.
    pub namespace: Option<String>,
    /// How long a leader's claim lasts without renewal: a new leader takes over at most
    /// this long after the old one died.
    #[serde(with = "duration")]
    pub lease_duration: Duration,
    /// This replica's name in the Lease; none = the `POD_NAME` environment variable, else
    /// the host name and process id.
    pub identity: Option<String>,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        Self {
            lease_name: DEFAULT_LEADER_LEASE_NAME.to_owned(),
            namespace: None,
            lease_duration: DEFAULT_LEADER_LEASE_DURATION,
            identity: None,
        }
    }
}

/// One entry of `peers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerConfig {
    /// The peer's cluster id; its certificate must name it.
    pub id: ClusterId,
    /// The peer's tunnel address, `host:port`: an IP, or a DNS name whose every A/AAAA
    /// record is one replica (re-resolved periodically). Give this or `addresses`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<PeerAddress>,
    /// One tunnel address per replica of the peer (each may also be a DNS name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<PeerAddress>,
    /// How this peer's endpoints are reached; default `traffic.network`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkMode>,
}

impl PeerConfig {
    /// A peer with one address.
    pub fn new(id: ClusterId, address: PeerAddress) -> Self {
        Self { id, address: Some(address), addresses: Vec::new(), network: None }
    }

    /// Every configured address, `address` first, in order.
    pub fn all_addresses(&self) -> Vec<PeerAddress> {
        self.address.iter().chain(&self.addresses).cloned().collect()
    }
}

/// `tls`: the gateway's identity in the tunnel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TlsConfig {
    /// PEM certificate (chain) of this gateway. Default `<cluster.id>.crt` next to the
    /// config file.
    pub cert: PathBuf,
    /// PEM private key of `cert`. Default `<cluster.id>.key` next to the config file.
    pub key: PathBuf,
    /// PEM CA bundle that peers' certificates must chain to (the clusterset's CA). Default
    /// `ca.crt` next to the config file.
    pub ca: CaSource,
}

/// `tls.ca`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CaSource {
    /// `system`, the operating system's roots: refused by the config's rules ([`Self::file`]).
    System,
    /// A PEM bundle.
    File(PathBuf),
}

impl CaSource {
    /// The CA bundle file. `system` has none: the peer tunnel trusts only the clusterset's
    /// own CA (public roots do not issue SPIFFE identities), so the config check refuses it
    /// with this message, and so does the gateway given a config built in code.
    pub fn file(&self) -> Result<&std::path::Path, &'static str> {
        match self {
            CaSource::File(p) => Ok(p),
            CaSource::System => Err("`system` (the operating system's roots) is not supported: \
                 peers' certificates must chain to the clusterset's CA; name its PEM bundle"),
        }
    }
}

impl Default for CaSource {
    fn default() -> Self {
        CaSource::File(PathBuf::from(DEFAULT_CA_FILE))
    }
}

impl TryFrom<String> for CaSource {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "" => Err("must be a file path or `system`".to_owned()),
            "system" => Ok(CaSource::System),
            _ => Ok(CaSource::File(PathBuf::from(s))),
        }
    }
}

impl From<CaSource> for String {
    fn from(c: CaSource) -> String {
        match c {
            CaSource::System => "system".to_owned(),
            CaSource::File(p) => p.display().to_string(),
        }
    }
}

/// `tunnel`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TunnelConfig {
    /// UDP address of the QUIC listener (data and control traffic).
    #[serde(with = "socket_addr")]
    pub listen: SocketAddr,
    /// Largest UDP payload (bytes) path MTU discovery may reach (default 8952, jumbo
    /// frames; a 1500-byte path settles at <= 1472 by itself). 1200..=65507.
    pub max_udp_payload_size: u16,
    /// Receive and send buffer (bytes each) asked for the UDP socket (default 8 MiB),
    /// 65536..=1073741824.
    pub socket_buffer_size: u32,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_TUNNEL_LISTEN,
            max_udp_payload_size: fedgate_tunnel::endpoint::DEFAULT_MAX_UDP_PAYLOAD,
            socket_buffer_size: fedgate_tunnel::endpoint::DEFAULT_SOCKET_BUFFER as u32,
        }
    }
}

/// `dns`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DnsConfig {
    /// Address of the DNS server, UDP and TCP.
    #[serde(with = "socket_addr")]
    pub listen: SocketAddr,
    /// Where names outside `clusterset.local` and `cluster.local` go: `system` (the servers
    /// of /etc/resolv.conf) and/or `ip:port` entries, tried in order.
    pub upstream: Vec<Upstream>,
    /// TTL of the answers fedgate gives (whole seconds).
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// DNS-over-TCP client connections served at once; more are closed at once.
    pub max_tcp_connections: usize,
}

/// DNS-over-TCP connections served at once by default: 512.
pub const DEFAULT_DNS_MAX_TCP_CONNECTIONS: usize =
    fedgate_dns::settings::DEFAULT_MAX_TCP_CONNECTIONS;

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_DNS_LISTEN,
            upstream: vec![Upstream::System],
            ttl: DEFAULT_DNS_TTL,
            max_tcp_connections: DEFAULT_DNS_MAX_TCP_CONNECTIONS,
        }
    }
}

/// One entry of `dns.upstream`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Upstream {
    /// The name servers of the host's /etc/resolv.conf.
    System,
    /// One name server.
    Address(SocketAddr),
}

impl FromStr for Upstream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "system" {
            return Ok(Upstream::System);
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Upstream::Address(addr));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Upstream::Address(SocketAddr::new(ip, DEFAULT_UPSTREAM_PORT)));
        }
        Err(format!("invalid upstream {s:?}: expected `system`, an IP address or ip:port"))
    }
}

impl TryFrom<String> for Upstream {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Upstream> for String {
    fn from(u: Upstream) -> String {
        match u {
            Upstream::System => "system".to_owned(),
            Upstream::Address(a) => a.to_string(),
        }
    }
}

/// `front`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct FrontConfig {
    /// How clients reach imports: `vip` (ClusterSetIPs bound by the gateway) or `kube`
    /// (derived Services).
    pub mode: FrontMode,
    /// CIDR ClusterSetIPs are allocated from (`vip` mode).
    #[serde(rename = "clusterSetIPRange", with = "ip_net")]
    pub cluster_set_ip_range: IpNet,
    /// Directory where ClusterSetIP allocations persist across restarts; none = kept in
    /// memory only (imports may get new IPs after a restart).
    pub state_dir: Option<PathBuf>,
    /// Settings of `front.mode: kube`.
    pub kube: FrontKubeConfig,
}

/// First gateway port handed to import ports in `front.mode: kube`.
pub const DEFAULT_FRONT_KUBE_FIRST_PORT: u16 = 20000;
/// Last gateway port handed to import ports in `front.mode: kube`.
pub const DEFAULT_FRONT_KUBE_LAST_PORT: u16 = 29999;

/// `front.kube`: how the gateway pod serves derived Services.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct FrontKubeConfig {
    /// The gateway pod's IP, the endpoint of every derived Service; none = `fedgate run
    /// --pod-ip` / the `POD_IP` environment variable (the Deployment sets it from the
    /// downward API).
    #[serde(rename = "podIP")]
    pub pod_ip: Option<IpAddr>,
    /// First port of the gateway pod handed to an import port.
    pub first_port: u16,
    /// Last port of the gateway pod handed to an import port.
    pub last_port: u16,
    /// Name of the gateway's own Service (a headless Service selecting the gateway pods, in
    /// the leader Lease's namespace): the derived Services' EndpointSlices list its ready
    /// endpoints, every replica. None: only the writing replica's pod IP.
    pub gateway_service: Option<String>,
}

impl Default for FrontKubeConfig {
    fn default() -> Self {
        Self {
            pod_ip: None,
            first_port: DEFAULT_FRONT_KUBE_FIRST_PORT,
            last_port: DEFAULT_FRONT_KUBE_LAST_PORT,
            gateway_service: None,
        }
    }
}

impl Default for FrontConfig {
    fn default() -> Self {
        Self {
            mode: FrontMode::Vip,
            cluster_set_ip_range: default_clusterset_ip_range(),
            state_dir: None,
            kube: FrontKubeConfig::default(),
        }
    }
}

/// The default of `front.clusterSetIPRange` as a value.
pub fn default_clusterset_ip_range() -> IpNet {
    // A constant literal: parsing cannot fail, and a test pins it.
    DEFAULT_CLUSTERSET_IP_RANGE.parse().unwrap_or_else(|_| IpNet::V4(Default::default()))
}

/// `front.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrontMode {
    /// Each import gets a ClusterSetIP the gateway binds.
    #[default]
    Vip,
    /// Each import gets a selector-less Service pointing at the gateway pod.
    Kube,
}

/// `admin`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AdminConfig {
    /// TCP address of the admin HTTP server.
    #[serde(with = "socket_addr")]
    pub listen: SocketAddr,
    /// URL of a `fedgate demo` control API (`http://HOST:PORT`); when set, the dashboard
    /// shows fail/restore buttons for the demo's gateways and backends. Demo use only.
    pub demo_control: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: DEFAULT_ADMIN_LISTEN, demo_control: None }
    }
}

/// One entry of `traffic.failoverPriority`: a label key compared with the client's value,
/// or `key=value` compared with that literal value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PriorityLabel {
    pub key: String,
    pub value: Option<String>,
}

impl FromStr for PriorityLabel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (key, value) = match s.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => (s, None),
        };
        if !is_label_key(key) {
            return Err(format!(
                "invalid failover label {s:?}: expected a Kubernetes label key or key=value"
            ));
        }
        Ok(PriorityLabel { key: key.to_owned(), value })
    }
}

impl fmt::Display for PriorityLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={v}", self.key),
            None => f.write_str(&self.key),
        }
    }
}

/// A Kubernetes label key: `[prefix/]name`, name ≤ 63 of alphanumerics, `-`, `_`, `.`,
/// starting and ending alphanumeric; prefix a DNS subdomain.
pub(crate) fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    name_ok && prefix.is_none_or(is_dns_name)
}

/// An RFC 1123 DNS subdomain: dot-separated labels, ≤ 253 characters.
pub(crate) fn is_dns_name(s: &str) -> bool {
    Subdomain::check(s).is_ok()
}

/// A peer's tunnel address: `host:port`, host an IP address or a DNS name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PeerAddress {
    /// An IP address (without brackets) or a DNS name.
    pub host: String,
    pub port: u16,
}

impl PeerAddress {
    /// The socket address, when the host is an IP address (no DNS lookup needed).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.host.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, self.port))
    }

    /// The socket addresses to try: the address itself for an IP, else a DNS lookup (done
    /// on every call, so a peer that moves is found on the next reconnect).
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        if let Some(addr) = self.socket_addr() {
            return Ok(vec![addr]);
        }
        Ok(tokio::net::lookup_host((self.host.as_str(), self.port)).await?.collect())
    }
}

impl FromStr for PeerAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid address {s:?}: expected host:port, e.g. 10.0.0.2:{DEFAULT_TUNNEL_PORT}"
            )
        };
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(bad());
            }
            return Ok(PeerAddress { host: addr.ip().to_string(), port: addr.port() });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 || !is_dns_name(host) {
            return Err(bad());
        }
        Ok(PeerAddress { host: host.to_owned(), port })
    }
}

impl fmt::Display for PeerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl Config {
    /// This cluster's locality as the model sees it (region, zone, extra labels).
    pub fn locality(&self) -> Locality {
        Locality {
            region: self.cluster.locality.region.clone(),
            zone: self.cluster.locality.zone.clone(),
            labels: self.cluster.labels.clone(),
        }
    }

    /// The SPIFFE id this gateway's certificate must carry, and that a peer `id` must carry.
    pub fn spiffe_id(&self, cluster: &ClusterId) -> String {
        SpiffeId::new(self.cluster.clusterset.as_str(), cluster.clone()).to_string()
    }

    /// The effective configuration as one line of JSON, for the start-up log. The config
    /// holds no secret values (only paths to them), so nothing is left out but the key path
    /// is still shown as a path, never the key.
    pub fn redacted_summary(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("<config not serializable: {e}>"))
    }
}

fn default_clusterset() -> String {
    DEFAULT_CLUSTERSET.to_owned()
}

/// Durations spelled the humantime way: `15s`, `500ms`, `1m 30s`.
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|_| de::Error::custom(format!("invalid duration {s:?}")))
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// A serde `with` module for a type read and written as its text form (`FromStr`,
/// `Display`); a bad value's error names `what` and what was expected.
macro_rules! text_with {
    ($(#[$doc:meta])* $name:ident: $t:ty, $what:literal, $expected:literal) => {
        $(#[$doc])*
        pub(crate) mod $name {
            use serde::{Deserialize, Deserializer, Serializer, de};

            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(|_| {
                    de::Error::custom(format!(
                        concat!("invalid ", $what, " {:?}: expected ", $expected),
                        s
                    ))
                })
            }

            pub fn serialize<S: Serializer>(v: &$t, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(v)
            }
        }
    };
}

text_with!(
    /// Socket addresses `ip:port` (IPv6 in brackets).
    socket_addr: std::net::SocketAddr,
    "address",
    "ip:port, e.g. 0.0.0.0:53 or [::]:53"
);

text_with!(
    /// CIDR ranges `a.b.c.d/len`.
    ip_net: ipnet::IpNet,
    "CIDR",
    "address/prefix, e.g. 242.1.0.0/16"
);
