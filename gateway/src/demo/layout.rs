//! The demo's plan, as plain values: which clusters, which addresses, which services, and the
//! YAML (gateway configs and Kubernetes file sources) that describes them. Pure: nothing here
//! touches the network or the file system, so the whole plan is tested as data, and
//! `examples/three-clusters` is this module's output for the default base address.
//!
//! Address plan inside the /24 of `--base-ip` (default 127.0.0.11, host part `h`):
//!
//! | what                         | address                          |
//! |------------------------------|----------------------------------|
//! | gateways east, west, north   | `h`, `h+1`, `h+2` (ports 15443 UDP, 15000 admin, DNS 5353) |
//! | demo control API             | `h`:15080                        |
//! | backends                     | `h+10` .. `h+14` (HTTP 8080, TCP echo 9000) |
//! | ClusterSetIPs of east/west/north | `.128/27`, `.160/27`, `.192/27` |

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};

/// The clusterset the demo's certificates and configs name.
pub const CLUSTERSET: &str = "demo";
/// The namespace of every sample service.
pub const NAMESPACE: &str = "demo";
/// Default address of the first gateway.
pub const DEFAULT_BASE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
/// DNS port of every gateway: above 1024, so no privilege is needed.
pub const DEFAULT_DNS_PORT: u16 = 5353;
/// Admin HTTP port of every gateway.
pub const ADMIN_PORT: u16 = 15000;
/// Tunnel (QUIC, UDP) port of every gateway.
pub const TUNNEL_PORT: u16 = 15443;
/// Port of the demo's control API, on the first gateway's address.
pub const CONTROL_PORT: u16 = 15080;
/// Port of every backend's HTTP server.
pub const BACKEND_HTTP_PORT: u16 = 8080;
/// Port of every backend's TCP echo.
pub const BACKEND_TCP_PORT: u16 = 9000;
/// Service ports: above 1024 too, since each gateway binds them on its ClusterSetIPs and an
/// unprivileged process may not bind lower ones (`net.ipv4.ip_unprivileged_port_start`).
pub const SERVICE_HTTP_PORT: u16 = 8080;
/// The `echo` service's TCP echo port.
pub const SERVICE_ECHO_PORT: u16 = 9000;
/// The headless `db` service's port.
pub const SERVICE_DB_PORT: u16 = 5432;
/// Highest host part of `--base-ip`: the backends (`h+14`) must stay below the VIP ranges.
pub const MAX_BASE_HOST: u8 = 113;
/// First host of the ClusterSetIP ranges; each gateway gets a /27 from here on.
const VIP_FIRST_HOST: u8 = 128;
const VIP_PREFIX: u8 = 27;
const VIP_RANGE_SIZE: u8 = 32;

/// Why a plan cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("--base-ip {0} is not a loopback address: the demo runs on 127.0.0.0/8 only")]
    NotLoopback(Ipv4Addr),
    #[error(
        "--base-ip {0}: the last number must be 1..={MAX_BASE_HOST} (the gateways use h..h+2, \
         the backends h+10..h+14 and the ClusterSetIPs .128-.223 of the same /24)"
    )]
    HostOutOfRange(Ipv4Addr),
    #[error("--dns-port 0: give a port number (5353 works without root)")]
    DnsPort,
}

/// One backend: a loopback address with an HTTP server and a TCP echo that name the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendPlan {
    /// Unique inside its cluster (`east-1`, `db-0`).
    pub name: String,
    pub ip: Ipv4Addr,
}

impl BackendPlan {
    pub fn http(&self) -> SocketAddr {
        SocketAddr::from((self.ip, BACKEND_HTTP_PORT))
    }

    pub fn tcp(&self) -> SocketAddr {
        SocketAddr::from((self.ip, BACKEND_TCP_PORT))
    }
}

/// One cluster: its gateway's addresses and locality, and its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterPlan {
    pub id: &'static str,
    pub region: &'static str,
    pub zone: &'static str,
    pub ip: Ipv4Addr,
    pub dns_port: u16,
    /// The ClusterSetIP range, `a.b.c.d/27`.
    pub vip_range: String,
    pub backends: Vec<BackendPlan>,
}

impl ClusterPlan {
    pub fn admin(&self) -> SocketAddr {
        SocketAddr::from((self.ip, ADMIN_PORT))
    }

    pub fn tunnel(&self) -> SocketAddr {
        SocketAddr::from((self.ip, TUNNEL_PORT))
    }

    pub fn dns(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.dns_port))
    }

    pub fn backend(&self, name: &str) -> Option<&BackendPlan> {
        self.backends.iter().find(|b| b.name == name)
    }
}

/// The whole demo: three clusters and the control API's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub clusters: Vec<ClusterPlan>,
    pub control: SocketAddr,
}

/// A file written for one cluster: its path relative to the state dir, and the text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedFile {
    pub path: String,
    pub text: String,
}

impl Layout {
    /// Plans the demo around `base` (the first gateway's address).
    pub fn new(base: Ipv4Addr, dns_port: u16) -> Result<Self, LayoutError> {
        if !base.is_loopback() {
            return Err(LayoutError::NotLoopback(base));
        }
        let [a, b, c, h] = base.octets();
        if h == 0 || h > MAX_BASE_HOST {
            return Err(LayoutError::HostOutOfRange(base));
        }
        if dns_port == 0 {
            return Err(LayoutError::DnsPort);
        }
        let ip = |host: u8| Ipv4Addr::new(a, b, c, host);
        let backend =
            |name: &str, offset: u8| BackendPlan { name: name.to_owned(), ip: ip(h + offset) };
        let vip = |i: u8| format!("{}/{VIP_PREFIX}", ip(VIP_FIRST_HOST + i * VIP_RANGE_SIZE));
        let clusters = vec![
            ClusterPlan {
                id: "east",
                region: "us-east",
                zone: "us-east-1a",
                ip: ip(h),
                dns_port,
                vip_range: vip(0),
                backends: vec![backend("east-1", 10)],
            },
            ClusterPlan {
                id: "west",
                region: "us-west",
                zone: "us-west-1a",
                ip: ip(h + 1),
                dns_port,
                vip_range: vip(1),
                backends: vec![backend("west-1", 11)],
            },
            ClusterPlan {
                id: "north",
                region: "us-east",
                zone: "us-east-1b",
                ip: ip(h + 2),
                dns_port,
                vip_range: vip(2),
                backends: vec![backend("north-1", 12), backend("db-0", 13), backend("db-1", 14)],
            },
        ];
        Ok(Self { clusters, control: SocketAddr::from((base, CONTROL_PORT)) })
    }

    pub fn cluster(&self, id: &str) -> Option<&ClusterPlan> {
        self.clusters.iter().find(|c| c.id == id)
    }

    /// Every file of the demo, relative to the state dir (`east/gateway.yaml`,
    /// `east/cluster/echo.yaml`, ...). Certificates are made separately (`certs/`).
    pub fn files(&self) -> Vec<PlannedFile> {
        let mut out = Vec::new();
        for c in &self.clusters {
            out.push(PlannedFile {
                path: format!("{}/gateway.yaml", c.id),
                text: self.gateway_yaml(c),
            });
            for (name, text) in cluster_files(c) {
                out.push(PlannedFile { path: format!("{}/cluster/{name}", c.id), text });
            }
        }
        out
    }

    /// The gateway config of cluster `c` (paths relative to its own directory).
    pub fn gateway_yaml(&self, c: &ClusterPlan) -> String {
        let mut peers = String::new();
        for p in self.clusters.iter().filter(|p| p.id != c.id) {
            let _ = writeln!(peers, "  - {{ id: {}, address: \"{}\" }}", p.id, p.tunnel());
        }
        format!(
            "# Gateway \"{id}\" of the fedgate demo: three clusters on one machine, loopback only.\n\
             # Written by `fedgate demo`, which also makes the certificates in ../certs.\n\
             cluster:\n\
             \x20 id: {id}\n\
             \x20 clusterset: {CLUSTERSET}\n\
             \x20 locality: {{ region: {region}, zone: {zone} }}\n\
             discovery:\n\
             \x20 source: file\n\
             \x20 file: {{ dir: ./cluster }}     # this cluster's Services, EndpointSlices, ServiceExports\n\
             \x20 peerLeaseDuration: 5s\n\
             peers:\n{peers}\
             tls: {{ cert: ../certs/{id}.crt, key: ../certs/{id}.key, ca: ../certs/ca.crt }}\n\
             tunnel: {{ listen: \"{tunnel}\" }}   # UDP: QUIC with mutual TLS, exports and traffic\n\
             dns:\n\
             \x20 listen: \"{dns}\"            # dig @{ip} -p {dns_port} ...\n\
             \x20 upstream: [ system ]\n\
             \x20 ttl: 5s\n\
             front:\n\
             \x20 mode: vip\n\
             \x20 clusterSetIPRange: {range}\n\
             \x20 stateDir: ./state\n\
             admin:\n\
             \x20 listen: \"{admin}\"           # dashboard, /metrics, /debug/*\n\
             \x20 demoControl: \"http://{control}\"   # the dashboard's fail/restore buttons\n\
             traffic:\n\
             \x20 failoverPriority:               # same region first, then this cluster, then zone\n\
             \x20   - topology.kubernetes.io/region\n\
             \x20   - multicluster.kubernetes.io/source-cluster\n\
             \x20   - topology.kubernetes.io/zone\n\
             \x20 healthCheck: {{ interval: 1s, timeout: 500ms, unhealthyThreshold: 2, healthyThreshold: 1 }}\n\
             \x20 drainDuration: 5s\n",
            id = c.id,
            region = c.region,
            zone = c.zone,
            tunnel = c.tunnel(),
            dns = c.dns(),
            ip = c.ip,
            dns_port = c.dns_port,
            range = c.vip_range,
            admin = c.admin(),
            control = self.control,
        )
    }
}

/// When each cluster exported each service: the oldest export wins conflicts (KEP-1645).
fn exported_at(cluster: &str, service: &str) -> &'static str {
    match (cluster, service) {
        ("east", _) => "2026-01-01T00:00:00Z",
        ("north", _) => "2026-01-02T00:00:00Z",
        (_, "legacy") => "2026-01-05T00:00:00Z",
        _ => "2026-01-03T00:00:00Z",
    }
}

/// The file source of cluster `c`: (file name, YAML).
fn cluster_files(c: &ClusterPlan) -> Vec<(String, String)> {
    let index: u8 = match c.id {
        "east" => 0,
        "west" => 1,
        _ => 2,
    };
    let first = |prefix: &str| c.backends.iter().find(|b| b.name.starts_with(prefix));
    let mut files = Vec::new();
    // `echo`: exported by all three clusters, one backend each; the failover order is visible.
    if let Some(b) = first(c.id) {
        let header = format!(
            "# Service \"echo\" of cluster {id}: exported by all three clusters. From {id}, traffic\n\
             # goes to {id}'s own backend while it is healthy, then to the same region, then anywhere.\n",
            id = c.id
        );
        let svc = ServiceDoc {
            name: "echo",
            cluster_ip: Some(format!("10.96.{index}.10")),
            ports: &[
                ("http", SERVICE_HTTP_PORT, BACKEND_HTTP_PORT),
                ("echo", SERVICE_ECHO_PORT, BACKEND_TCP_PORT),
            ],
            endpoints: vec![(b.ip, None)],
        };
        files.push(("echo.yaml".to_owned(), header + &svc.render(c.id)));
    }
    // `db`: headless, north only: DNS answers per endpoint, each remote one gets its own VIP.
    let dbs: Vec<&BackendPlan> = c.backends.iter().filter(|b| b.name.starts_with("db-")).collect();
    if !dbs.is_empty() {
        let header = "# Service \"db\": headless (clusterIP: None). clusterset.local answers with one address per\n\
                      # ready endpoint, and db-0.north.db.demo.svc.clusterset.local names one of them.\n"
            .to_owned();
        let svc = ServiceDoc {
            name: "db",
            cluster_ip: None,
            ports: &[("tcp", SERVICE_DB_PORT, BACKEND_TCP_PORT)],
            endpoints: dbs.iter().map(|b| (b.ip, Some(b.name.as_str()))).collect(),
        };
        files.push(("db.yaml".to_owned(), header + &svc.render(c.id)));
    }
    // `legacy`: east exports it as a ClusterIP service, west as headless: a TypeConflict.
    let legacy_ip = match c.id {
        "east" => Some(Some("10.96.0.20".to_owned())),
        "west" => Some(None),
        _ => None,
    };
    if let (Some(cluster_ip), Some(b)) = (legacy_ip, first(c.id)) {
        let header = format!(
            "# Service \"legacy\": east exports it as a ClusterIP service, west as headless. The oldest\n\
             # export (east's) wins; both exports report Conflict=True, reason TypeConflict.\n\
             # This is {}'s version.\n",
            c.id
        );
        let svc = ServiceDoc {
            name: "legacy",
            cluster_ip,
            ports: &[("http", SERVICE_HTTP_PORT, BACKEND_HTTP_PORT)],
            endpoints: vec![(b.ip, None)],
        };
        files.push(("legacy.yaml".to_owned(), header + &svc.render(c.id)));
    }
    files
}

/// A Service with its EndpointSlice and ServiceExport, as Kubernetes YAML.
struct ServiceDoc<'a> {
    name: &'a str,
    /// `None` = headless (`clusterIP: None`).
    cluster_ip: Option<String>,
    /// (name, port, targetPort)
    ports: &'a [(&'a str, u16, u16)],
    /// (address, hostname)
    endpoints: Vec<(Ipv4Addr, Option<&'a str>)>,
}

impl ServiceDoc<'_> {
    fn render(&self, cluster: &str) -> String {
        let name = self.name;
        let mut y = String::new();
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: {NAMESPACE} }}\n\
             spec:\n  type: ClusterIP\n  clusterIP: {}\n  ports:\n",
            self.cluster_ip.as_deref().unwrap_or("None")
        );
        for (pname, port, target) in self.ports {
            let _ = writeln!(
                y,
                "  - {{ name: {pname}, port: {port}, targetPort: {target}, protocol: TCP }}"
            );
        }
        let _ = write!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{cluster}\n  \
             namespace: {NAMESPACE}\n  labels: {{ kubernetes.io/service-name: {name} }}\n\
             addressType: IPv4\nports:\n"
        );
        for (pname, _, target) in self.ports {
            let _ = writeln!(y, "- {{ name: {pname}, port: {target}, protocol: TCP }}");
        }
        y.push_str("endpoints:\n");
        for (ip, hostname) in &self.endpoints {
            let _ = writeln!(y, "- addresses: [\"{ip}\"]");
            if let Some(h) = hostname {
                let _ = writeln!(y, "  hostname: {h}");
            }
            y.push_str("  conditions: { ready: true }\n");
        }
        let _ = write!(
            y,
            "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata:\n  name: {name}\n  \
             namespace: {NAMESPACE}\n  creationTimestamp: \"{}\"\n",
            exported_at(cluster, name)
        );
        y
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;

    fn layout() -> Layout {
        Layout::new(DEFAULT_BASE_IP, DEFAULT_DNS_PORT).expect("default layout")
    }

    #[test]
    fn bad_base_addresses_are_refused_with_a_reason() {
        let cases: &[(Ipv4Addr, u16, LayoutError)] = &[
            (
                Ipv4Addr::new(10, 0, 0, 11),
                5353,
                LayoutError::NotLoopback(Ipv4Addr::new(10, 0, 0, 11)),
            ),
            (
                Ipv4Addr::new(127, 0, 0, 0),
                5353,
                LayoutError::HostOutOfRange(Ipv4Addr::new(127, 0, 0, 0)),
            ),
            (
                Ipv4Addr::new(127, 0, 0, MAX_BASE_HOST + 1),
                5353,
                LayoutError::HostOutOfRange(Ipv4Addr::new(127, 0, 0, MAX_BASE_HOST + 1)),
            ),
            (DEFAULT_BASE_IP, 0, LayoutError::DnsPort),
        ];
        for (base, port, want) in cases {
            assert_eq!(Layout::new(*base, *port).as_ref().err(), Some(want), "{base} {port}");
        }
        assert!(Layout::new(Ipv4Addr::new(127, 9, 8, MAX_BASE_HOST), 5353).is_ok());
        assert!(LayoutError::HostOutOfRange(DEFAULT_BASE_IP).to_string().contains("1..=113"));
    }

    #[test]
    fn addresses_are_distinct_and_inside_the_base_block() {
        for base in [DEFAULT_BASE_IP, Ipv4Addr::new(127, 33, 44, 1), Ipv4Addr::new(127, 1, 2, 113)]
        {
            let l = Layout::new(base, 5353).expect("layout");
            let mut hosts = BTreeSet::new();
            for c in &l.clusters {
                assert!(hosts.insert(c.ip), "gateway {c:?}");
                for b in &c.backends {
                    assert!(hosts.insert(b.ip), "backend {b:?}");
                }
                let range: ipnet::Ipv4Net = c.vip_range.parse().expect("range parses");
                for ip in hosts.iter() {
                    assert!(!range.contains(ip), "{ip} inside {range}");
                }
                assert_eq!(range.network().octets()[..3], base.octets()[..3]);
            }
            for ip in &hosts {
                assert_eq!(ip.octets()[..3], base.octets()[..3], "{ip} outside {base}/24");
            }
            assert_eq!(l.control, SocketAddr::from((base, CONTROL_PORT)));
            assert_eq!(hosts.len(), 8);
        }
        let l = layout();
        let ranges: Vec<&str> = l.clusters.iter().map(|c| c.vip_range.as_str()).collect();
        assert_eq!(ranges, ["127.0.0.128/27", "127.0.0.160/27", "127.0.0.192/27"]);
    }

    #[test]
    fn generated_configs_pass_the_real_config_checks() {
        let l = layout();
        for c in &l.clusters {
            let path = Path::new("/demo").join(c.id).join("gateway.yaml");
            let cfg = crate::config::parse(&path, &l.gateway_yaml(c))
                .unwrap_or_else(|e| panic!("{}: {e:?}", c.id));
            assert_eq!(cfg.cluster.id.as_str(), c.id);
            assert_eq!(cfg.admin.listen, c.admin());
            assert_eq!(cfg.dns.listen, c.dns());
            assert_eq!(cfg.tunnel.listen, c.tunnel());
            assert_eq!(cfg.peers.len(), 2);
        }
    }

    #[test]
    fn cluster_files_load_without_problems_in_the_real_file_source() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let l = layout();
        for f in l.files() {
            let p = tmp.path().join(&f.path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, &f.text).expect("write");
        }
        let want: &[(&str, &[&str])] = &[
            ("east", &["echo", "legacy"]),
            ("west", &["echo", "legacy"]),
            ("north", &["db", "echo"]),
        ];
        for (id, services) in want {
            let source = fedgate_discovery::source::file::FileSource::new(
                tmp.path().join(id).join("cluster"),
            )
            .expect("file source");
            let problems = source.problems().borrow().clone();
            assert!(problems.is_empty(), "{id}: {problems:?}");
            let state = source.subscribe().borrow().clone();
            let names: Vec<&str> = state.services.keys().map(|k| k.name.as_str()).collect();
            assert_eq!(&names, services, "{id}");
            let exports: Vec<&str> = state.exports.keys().map(|k| k.name.as_str()).collect();
            assert_eq!(&exports, services, "{id}: every service is exported");
        }
    }

    /// `examples/three-clusters` is what `fedgate demo` writes for the default addresses;
    /// regenerate it with `fedgate demo --write-only --dir D` and copy `D/{east,west,north}`
    /// there (not `D/certs`: no keys in the repository).
    #[test]
    fn the_checked_in_example_is_the_default_layout() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-clusters");
        for f in layout().files() {
            let have = std::fs::read_to_string(root.join(&f.path))
                .unwrap_or_else(|e| panic!("examples/three-clusters/{}: {e}", f.path));
            assert_eq!(
                have, f.text,
                "examples/three-clusters/{} is stale: run `fedgate demo --write-only --dir D` and copy D/{{east,west,north}} there",
                f.path
            );
        }
    }
}
