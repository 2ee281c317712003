use std::path::Path;
use std::time::Duration;

use super::*;
use crate::certs::{self, CertOptions};

const MINIMAL: &str = "cluster:\n  id: east\npeers: []\n";

fn parse_ok(text: &str) -> Config {
    match parse(Path::new("/etc/fedgate/east.yaml"), text) {
        Ok(c) => c,
        Err(e) => panic!("config should parse:\n{e}"),
    }
}

fn errors(text: &str) -> Vec<String> {
    match parse(Path::new("east.yaml"), text) {
        Ok(c) => panic!("config should be rejected, got {c:?}"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn defaults_are_the_documented_constants() {
    let c = parse_ok(MINIMAL);
    assert_eq!(c.cluster.id.as_str(), "east");
    assert_eq!(c.cluster.clusterset, DEFAULT_CLUSTERSET);
    assert_eq!(c.cluster.locality, LocalityConfig::default());
    assert!(c.cluster.labels.is_empty());
    assert_eq!(c.discovery.source, SourceKind::File);
    assert_eq!(c.discovery.file.dir, Path::new("/etc/fedgate/clusters/east"));
    assert_eq!(c.discovery.kube.kubeconfig, None);
    assert_eq!(c.discovery.peer_lease_duration, Duration::from_secs(15));
    assert!(c.peers.is_empty());
    assert_eq!(c.tls.cert, Path::new("/etc/fedgate/east.crt"));
    assert_eq!(c.tls.key, Path::new("/etc/fedgate/east.key"));
    assert_eq!(c.tls.ca, CaSource::File("/etc/fedgate/ca.crt".into()));
    assert_eq!(c.tunnel.listen.to_string(), "0.0.0.0:15443");
    assert_eq!(c.tunnel.socket_buffer_size, 8 * 1024 * 1024);
    assert_eq!(c.dns.listen.to_string(), "0.0.0.0:53");
    assert_eq!(c.dns.upstream, vec![Upstream::System]);
    assert_eq!(c.dns.ttl, Duration::from_secs(5));
    assert_eq!(c.front.mode, FrontMode::Vip);
    assert_eq!(c.front.cluster_set_ip_range.to_string(), DEFAULT_CLUSTERSET_IP_RANGE);
    assert_eq!(c.front.state_dir, None);
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:15000");
    let keys: Vec<String> = c.traffic.failover_priority.iter().map(ToString::to_string).collect();
    assert_eq!(
        keys,
        [
            "topology.kubernetes.io/region",
            "multicluster.kubernetes.io/source-cluster",
            "topology.kubernetes.io/zone"
        ]
    );
    assert_eq!(c.traffic.health_check.interval, Duration::from_secs(1));
    assert_eq!(c.traffic.health_check.timeout, Duration::from_millis(500));
    assert_eq!(c.traffic.health_check.unhealthy_threshold, 2);
    assert_eq!(c.traffic.health_check.healthy_threshold, 1);
    assert_eq!(c.traffic.drain_duration, Duration::from_secs(45));
    // As many as the CPUs this test may use.
    let cpus = std::thread::available_parallelism().expect("cpu count").get();
    assert_eq!(c.traffic.data_plane_threads, cpus.min(256));
    assert_eq!(c.traffic.busy_poll, Duration::ZERO);
}

#[test]
fn busy_poll_takes_a_duration() {
    let c = parse_ok("cluster: { id: east }\npeers: []\ntraffic: { busyPoll: 200us }\n");
    assert_eq!(c.traffic.busy_poll, Duration::from_micros(200));
}

#[test]
fn the_design_example_parses_with_every_value() {
    let text = r#"
cluster:
  id: east
  clusterset: demo
  locality: { region: us-east, zone: us-east-a }
  labels: { rack: "7", tier: gold }
discovery:
  source: kube
  file: { dir: ./clusters/east }
  kube: { kubeconfig: null }
  peerLeaseDuration: 15s
peers:
  - { id: west, address: 10.0.0.2:15443 }
  - { id: north, address: "[fd00::3]:15443" }
  - { id: south, address: south.gw.example.com:15443 }
tls: { cert: east.crt, key: /abs/east.key, ca: pki/ca.pem }
tunnel: { listen: 0.0.0.0:15443 }
dns:
  listen: 127.0.0.1:5353
  upstream: [ system, 1.1.1.1, "[2001:db8::1]:5353" ]
  ttl: 30s
front:
  mode: kube
  clusterSetIPRange: 242.1.0.0/16
  stateDir: state
admin: { listen: 127.0.0.1:15000 }
traffic:
  failoverPriority:
    [ topology.kubernetes.io/region, multicluster.kubernetes.io/source-cluster, tier=gold ]
  healthCheck: { interval: 2s, timeout: 500ms, unhealthyThreshold: 3, healthyThreshold: 2 }
  drainDuration: 1m 30s
  dataPlaneThreads: 4
"#;
    let c = parse_ok(text);
    assert_eq!(c.cluster.clusterset, "demo");
    assert_eq!(c.locality().region.as_deref(), Some("us-east"));
    assert_eq!(c.cluster.labels.get("rack").map(String::as_str), Some("7"));
    assert_eq!(c.discovery.source, SourceKind::Kube);
    assert_eq!(c.discovery.file.dir, Path::new("/etc/fedgate/clusters/east"));
    assert_eq!(
        c.peers[0].address.as_ref().and_then(|a| a.socket_addr()).map(|a| a.to_string()).as_deref(),
        Some("10.0.0.2:15443")
    );
    assert_eq!(c.peers[1].all_addresses()[0].to_string(), "[fd00::3]:15443");
    assert_eq!(c.peers[2].all_addresses()[0].host, "south.gw.example.com");
    assert_eq!(c.peers[2].all_addresses()[0].socket_addr(), None);
    assert_eq!(c.tls.cert, Path::new("/etc/fedgate/east.crt"));
    assert_eq!(c.tls.key, Path::new("/abs/east.key"));
    assert_eq!(c.tls.ca, CaSource::File("/etc/fedgate/pki/ca.pem".into()));
    assert_eq!(
        c.dns.upstream,
        vec![
            Upstream::System,
            Upstream::Address("1.1.1.1:53".parse().expect("addr")),
            Upstream::Address("[2001:db8::1]:5353".parse().expect("addr")),
        ]
    );
    assert_eq!(c.front.state_dir.as_deref(), Some(Path::new("/etc/fedgate/state")));
    assert_eq!(
        c.traffic.failover_priority[2],
        PriorityLabel { key: "tier".into(), value: Some("gold".into()) }
    );
    assert_eq!(c.traffic.drain_duration, Duration::from_secs(90));
    assert_eq!(c.traffic.data_plane_threads, 4);
    assert_eq!(c.spiffe_id(&c.cluster.id), "spiffe://demo/cluster/east");
    // The summary is one line of JSON naming the values in config spelling.
    let summary = c.redacted_summary();
    assert!(!summary.contains('\n'));
    assert!(summary.contains("\"clusterSetIPRange\":\"242.1.0.0/16\""), "{summary}");
    assert!(summary.contains("\"drainDuration\":\"1m 30s\""), "{summary}");
}

/// One row per class of error: the config and exactly what `analyze` prints for it.
#[test]
fn every_error_class_names_file_line_column_and_path() {
    let table: &[(&str, &str, &[&str])] = &[
        (
            "unknown field",
            "cluster:\n  id: east\n  colour: red\npeers: []\n",
            &[
                "east.yaml:3:3: cluster.colour: unknown field `colour`, expected one of `id`, `clusterset`, `locality`, `labels`",
            ],
        ),
        (
            "unknown top-level section",
            "cluster: { id: east }\npeers: []\nmetrics: {}\n",
            &[
                "east.yaml:3:1: metrics: unknown field `metrics`, expected one of `cluster`, `discovery`, `peers`, `tls`, `tunnel`, `dns`, `front`, `admin`, `traffic`",
            ],
        ),
        (
            "bad duration",
            "cluster: { id: east }\npeers: []\ntraffic:\n  healthCheck:\n    interval: 5x\n",
            &["east.yaml:5:15: traffic.healthCheck.interval: invalid duration \"5x\""],
        ),
        (
            "socket buffer too small",
            "cluster: { id: east }\npeers: []\ntunnel: { socketBufferSize: 4096 }\n",
            &[
                "east.yaml:3:29: tunnel.socketBufferSize: 4096 is out of range (65536..=1073741824 bytes)",
            ],
        ),
        (
            "bad CIDR",
            "cluster: { id: east }\npeers: []\nfront: { clusterSetIPRange: 242.1.0.0/33 }\n",
            &[
                "east.yaml:3:29: front.clusterSetIPRange: invalid CIDR \"242.1.0.0/33\": expected address/prefix, e.g. 242.1.0.0/16",
            ],
        ),
        (
            "tiny range",
            "cluster: { id: east }\npeers: []\nfront:\n  clusterSetIPRange: 10.9.0.0/28\n",
            &[
                "east.yaml:4:22: front.clusterSetIPRange: range 10.9.0.0/28 is too small: 14 usable addresses, at least 16 needed (use a /27 or larger for IPv4, /123 or larger for IPv6)",
            ],
        ),
        (
            "range with host bits",
            "cluster: { id: east }\npeers: []\nfront:\n  clusterSetIPRange: 10.9.0.1/24\n",
            &[
                "east.yaml:4:22: front.clusterSetIPRange: 10.9.0.1/24 has host bits set; did you mean 10.9.0.0/24?",
            ],
        ),
        (
            "duplicate peer",
            "cluster: { id: east }\npeers:\n  - { id: west, address: 10.0.0.2:15443 }\n  - id: west\n    address: 10.0.0.3:15443\n",
            &["east.yaml:4:9: peers[1].id: duplicate peer id \"west\" (also peers[0])"],
        ),
        (
            "peer without an address",
            "cluster: { id: east }\npeers:\n  - { id: west }\n",
            &[
                "east.yaml:3:5: peers[0]: peer \"west\" has no address: give `address: host:port` (a DNS name may have one record per replica) or `addresses: [host:port, ...]`",
            ],
        ),
        (
            "peer with address and addresses",
            "cluster: { id: east }\npeers:\n  - { id: west, address: 10.0.0.2:15443, addresses: [10.0.0.3:15443] }\n",
            &["east.yaml:3:53: peers[0].addresses: give either `address` or `addresses`, not both"],
        ),
        (
            "duplicate replica address",
            "cluster: { id: east }\npeers:\n  - id: west\n    addresses: [10.0.0.2:15443, 10.0.0.3:15443, 10.0.0.2:15443]\n",
            &[
                "east.yaml:4:49: peers[0].addresses[2]: duplicate address 10.0.0.2:15443 (also peers[0].addresses[0])",
            ],
        ),
        (
            "bad replica address",
            "cluster: { id: east }\npeers:\n  - { id: west, addresses: [10.0.0.2:15443, nowhere] }\n",
            &[
                "east.yaml:3:45: peers[0].addresses[1]: invalid address \"nowhere\": expected host:port, e.g. 10.0.0.2:15443",
            ],
        ),
        (
            "self peer",
            "cluster: { id: east }\npeers:\n  - { id: east, address: 10.0.0.2:15443 }\n",
            &["east.yaml:3:11: peers[0].id: peer id \"east\" is this gateway's own cluster.id"],
        ),
        (
            "bad cluster id",
            "cluster:\n  id: East_1\npeers: []\n",
            &[
                "east.yaml:2:7: cluster.id: invalid cluster id \"East_1\": may contain only lowercase letters, digits and '-' (an RFC 1123 label)",
            ],
        ),
        (
            "missing cluster id",
            "cluster:\n  clusterset: demo\npeers: []\n",
            &[
                "east.yaml:2:3: cluster: missing field `id` (required with discovery.source: file; with `kube` the ClusterProperty cluster.clusterset.k8s.io may provide it)",
            ],
        ),
        (
            "missing peers",
            "cluster: { id: east }\n",
            &[
                "east.yaml:1:1: missing field `peers` (list the other gateways, or write `peers: []`)",
            ],
        ),
        (
            "bad peer address",
            "cluster: { id: east }\npeers:\n  - { id: west, address: \"10.0.0.2\" }\n",
            &[
                "east.yaml:3:26: peers[0].address: invalid address \"10.0.0.2\": expected host:port, e.g. 10.0.0.2:15443",
            ],
        ),
        (
            "bad listen address",
            "cluster: { id: east }\npeers: []\nadmin: { listen: localhost }\n",
            &[
                "east.yaml:3:18: admin.listen: invalid address \"localhost\": expected ip:port, e.g. 0.0.0.0:53 or [::]:53",
            ],
        ),
        (
            "bad enum",
            "cluster: { id: east }\npeers: []\ndiscovery: { source: etcd }\n",
            &[
                "east.yaml:3:22: discovery.source: unknown variant `etcd`, expected `file` or `kube`",
            ],
        ),
        (
            "wrong type",
            "cluster: { id: east }\npeers: []\ntraffic: { healthCheck: { unhealthyThreshold: many } }\n",
            &[
                "east.yaml:3:47: traffic.healthCheck.unhealthyThreshold: invalid type: string \"many\", expected u32",
            ],
        ),
        (
            "timeout over interval",
            "cluster: { id: east }\npeers: []\ntraffic:\n  healthCheck: { interval: 1s, timeout: 2s }\n",
            &["east.yaml:4:41: traffic.healthCheck.timeout: 2s is longer than interval 1s"],
        ),
        (
            "no data-plane thread",
            "cluster: { id: east }\npeers: []\ntraffic: { dataPlaneThreads: 0 }\n",
            &["east.yaml:3:30: traffic.dataPlaneThreads: 0 is out of range (1..=256)"],
        ),
        (
            "busy poll too long",
            "cluster: { id: east }\npeers: []\ntraffic: { busyPoll: 1s }\n",
            &["east.yaml:3:22: traffic.busyPoll: 1s is longer than 10ms"],
        ),
        (
            "busy poll not a duration",
            "cluster: { id: east }\npeers: []\ntraffic: { busyPoll: fast }\n",
            &["east.yaml:3:22: traffic.busyPoll: invalid duration \"fast\""],
        ),
        (
            "kube front without kube source",
            "cluster: { id: east }\npeers: []\nfront: { mode: kube }\n",
            &["east.yaml:3:16: front.mode: `kube` needs discovery.source: kube"],
        ),
        (
            "fractional dns ttl",
            "cluster: { id: east }\npeers: []\ndns: { ttl: 1500ms }\n",
            &["east.yaml:3:13: dns.ttl: must be whole seconds, got 1s 500ms"],
        ),
        (
            "bad clusterset",
            "cluster: { id: east, clusterset: Demo }\npeers: []\n",
            &[
                "east.yaml:1:34: cluster.clusterset: invalid clusterset name \"Demo\": may contain only lowercase letters, digits, '-', '.' and '_' (a SPIFFE trust domain)",
            ],
        ),
        (
            "duplicate failover label",
            "cluster: { id: east }\npeers: []\ntraffic: { failoverPriority: [a, b, a=x] }\n",
            &[
                "east.yaml:3:37: traffic.failoverPriority[2]: label \"a\" is already listed at traffic.failoverPriority[0]",
            ],
        ),
        (
            "leader lease too short or misnamed",
            "cluster: { id: east }\npeers: []\ndiscovery:\n  kube:\n    leaderElection: { leaseName: Fedgate_Leader, namespace: fedgate.system, leaseDuration: 1s }\n",
            &[
                "east.yaml:5:34: discovery.kube.leaderElection.leaseName: invalid Lease name \"Fedgate_Leader\": may contain only lowercase letters, digits and '-' (an RFC 1123 label)",
                "east.yaml:5:61: discovery.kube.leaderElection.namespace: invalid namespace \"fedgate.system\": may contain only lowercase letters, digits and '-' (an RFC 1123 label)",
                "east.yaml:5:92: discovery.kube.leaderElection.leaseDuration: 1s is shorter than 2s",
            ],
        ),
        (
            "bad gateway service name",
            "cluster: { id: east }\npeers: []\nfront: { kube: { gatewayService: Fedgate } }\n",
            &[
                "east.yaml:3:34: front.kube.gatewayService: invalid Service name \"Fedgate\": may contain only lowercase letters, digits and '-' (an RFC 1123 label)",
            ],
        ),
        (
            "fractional leader lease",
            "cluster: { id: east }\npeers: []\ndiscovery: { kube: { leaderElection: { leaseDuration: 2500ms } } }\n",
            &[
                "east.yaml:3:55: discovery.kube.leaderElection.leaseDuration: must be whole seconds (a Lease's unit), got 2s 500ms",
            ],
        ),
        (
            "duplicate yaml key",
            "cluster: { id: east }\npeers: []\ncluster: { id: west }\n",
            &["east.yaml:3:1: duplicate key \"cluster\""],
        ),
        (
            "yaml syntax",
            "cluster: { id: east\npeers: []\n",
            &[
                "east.yaml:2:6: invalid yaml: while parsing a flow mapping, did not find expected ',' or '}'",
            ],
        ),
        (
            "not a mapping",
            "- just\n- a list\n",
            &["east.yaml:1:1: expected a mapping of sections (cluster, peers, ...)"],
        ),
    ];
    for (name, text, expected) in table {
        let got = errors(text);
        assert_eq!(got, *expected, "case {name:?}");
    }
}

#[test]
fn several_errors_in_one_file_are_all_reported_in_file_order() {
    let text = "\
cluster:
  id: east
  region: us-east
peers:
  - { id: west, address: 10.0.0.2:15443 }
  - { id: west, address: nowhere }
  - { id: east, address: 10.0.0.4:15443 }
dns:
  ttl: soon
  upstream: [ system, 'not an ip' ]
front:
  clusterSetIPRange: 10.0.0.0/30
traffic:
  healthCheck:
    interval: 5x
    timeout: 5q
  drainDuration: forever
";
    let got = errors(text);
    assert_eq!(
        got,
        [
            "east.yaml:3:3: cluster.region: unknown field `region`, expected one of `id`, `clusterset`, `locality`, `labels`",
            "east.yaml:6:26: peers[1].address: invalid address \"nowhere\": expected host:port, e.g. 10.0.0.2:15443",
            "east.yaml:7:11: peers[2].id: peer id \"east\" is this gateway's own cluster.id",
            "east.yaml:9:8: dns.ttl: invalid duration \"soon\"",
            "east.yaml:10:23: dns.upstream[1]: invalid upstream \"not an ip\": expected `system`, an IP address or ip:port",
            "east.yaml:12:22: front.clusterSetIPRange: range 10.0.0.0/30 is too small: 2 usable addresses, at least 16 needed (use a /27 or larger for IPv4, /123 or larger for IPv6)",
            "east.yaml:15:15: traffic.healthCheck.interval: invalid duration \"5x\"",
            "east.yaml:16:14: traffic.healthCheck.timeout: invalid duration \"5q\"",
            "east.yaml:17:18: traffic.drainDuration: invalid duration \"forever\"",
        ]
    );
}

#[test]
fn range_size_rule() {
    use rules::usable_addresses;
    let n = |s: &str| s.parse::<ipnet::IpNet>().expect("cidr");
    assert_eq!(usable_addresses(&n("242.1.0.0/16")), 65_534);
    assert_eq!(usable_addresses(&n("10.0.0.0/27")), 30);
    assert_eq!(usable_addresses(&n("10.0.0.0/28")), 14);
    assert_eq!(usable_addresses(&n("10.0.0.1/32")), 0);
    assert_eq!(usable_addresses(&n("fd00::/123")), 30);
    assert_eq!(usable_addresses(&n("fd00::/124")), 14);
    assert_eq!(usable_addresses(&n("::/0")), u128::MAX - 2); // saturated: 2^128 does not fit
    assert!(
        parse(
            Path::new("x.yaml"),
            "cluster: {id: a}\npeers: []\nfront: {clusterSetIPRange: 10.0.0.0/27}\n"
        )
        .is_ok()
    );
    assert!(
        parse(
            Path::new("x.yaml"),
            "cluster: {id: a}\npeers: []\nfront: {clusterSetIPRange: 'fd00::/120'}\n"
        )
        .is_ok()
    );
}

/// A directory with a CA, a certificate for `east` and a config pointing at them.
struct Pki {
    dir: tempfile::TempDir,
    ca: certs::CertPair,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca =
            certs::create_ca("demo", &CertOptions::new(certs::DEFAULT_CA_VALIDITY)).expect("ca");
        let pki = Pki { dir, ca };
        pki.issue("east", "demo", None);
        std::fs::write(pki.dir.path().join("ca.crt"), &pki.ca.cert_pem).expect("write ca");
        std::fs::create_dir_all(pki.dir.path().join("clusters/east")).expect("file dir");
        pki
    }

    fn issue(&self, id: &str, clusterset: &str, not_before: Option<jiff::Timestamp>) {
        let opts = CertOptions { not_before, ..CertOptions::new(Duration::from_secs(86_400)) };
        let id = fedgate_discovery::model::ClusterId::new(id).expect("id");
        let pair = certs::issue(&self.ca, Some(clusterset), &id, &opts).expect("issue");
        std::fs::write(self.dir.path().join("east.crt"), pair.cert_pem).expect("write cert");
        std::fs::write(self.dir.path().join("east.key"), pair.key_pem).expect("write key");
    }

    /// The errors as text, with this directory's path taken out of the file names.
    fn strip(&self, e: ConfigErrors) -> Vec<String> {
        let prefix = format!("{}/", self.dir.path().display());
        e.iter().map(|e| e.to_string().replace(&prefix, "")).collect()
    }

    /// Writes `text` as `east.yaml` and loads it.
    fn write_and_load(&self, text: &str) -> Result<Loaded, Vec<String>> {
        let path = self.dir.path().join("east.yaml");
        std::fs::write(&path, text).expect("write config");
        load(&path).map_err(|e| self.strip(e))
    }

    fn load(&self, text: &str) -> Result<Config, Vec<String>> {
        match self.write_and_load(text)? {
            Loaded::Complete(c) => Ok(*c),
            Loaded::NeedsClusterId(_) => panic!("config without cluster.id: use load_pending"),
        }
    }

    /// `load` of a kube-source config without `cluster.id`, finished with `id`.
    fn load_pending(&self, text: &str, id: &str) -> Result<Config, Vec<String>> {
        match self.write_and_load(text)? {
            Loaded::Complete(c) => panic!("expected a pending id, got {c:?}"),
            Loaded::NeedsClusterId(p) => {
                let id = fedgate_discovery::model::ClusterId::new(id).expect("id");
                p.with_cluster_id(&id).map_err(|e| self.strip(e))
            }
        }
    }
}

const DEMO: &str = "cluster:\n  id: east\n  clusterset: demo\npeers: []\n";

#[test]
fn certificate_checks() {
    let pki = Pki::new();
    let config = pki.load(DEMO).expect("good pki loads");
    assert_eq!(config.tls.cert, pki.dir.path().join("east.crt"));

    // Missing certificate file, named with its path; the key is still checked.
    let got =
        pki.load("cluster:\n  id: east\n  clusterset: demo\npeers: []\ntls:\n  cert: gone.crt\n");
    let got = got.expect_err("missing cert");
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("east.yaml:6:9: tls.cert: cannot read certificate gone.crt: "),
        "{got:?}"
    );

    // SAN mismatch: the cert names another cluster.
    pki.issue("west", "demo", None);
    assert_eq!(
        pki.load(DEMO).expect_err("san mismatch"),
        [
            "east.yaml:1:1: tls.cert: certificate east.crt names spiffe://demo/cluster/west, expected SAN URI spiffe://demo/cluster/east"
        ]
    );

    // Expired.
    let past = jiff::Timestamp::from_second(1_600_000_000).expect("ts");
    pki.issue("east", "demo", Some(past));
    assert_eq!(
        pki.load(DEMO).expect_err("expired"),
        ["east.yaml:1:1: tls.cert: certificate east.crt expired at 2020-09-14T12:26:40Z"]
    );

    // Signed by another CA, and a key that belongs to another cert.
    pki.issue("east", "demo", None);
    let other =
        certs::create_ca("demo", &CertOptions::new(certs::DEFAULT_CA_VALIDITY)).expect("ca");
    std::fs::write(pki.dir.path().join("ca.crt"), &other.cert_pem).expect("write");
    std::fs::write(pki.dir.path().join("east.key"), &other.key_pem).expect("write");
    assert_eq!(
        pki.load(DEMO).expect_err("wrong ca and key"),
        [
            "east.yaml:1:1: tls.cert: certificate east.crt is not signed by any CA in ca.crt",
            "east.yaml:1:1: tls.key: east.key is not the key of east.crt",
        ]
    );

    // Garbage instead of PEM, and a missing file-source directory.
    std::fs::write(pki.dir.path().join("ca.crt"), "hello").expect("write");
    std::fs::remove_dir(pki.dir.path().join("clusters/east")).expect("rmdir");
    assert_eq!(
        pki.load(DEMO).expect_err("garbage"),
        [
            "east.yaml:1:1: discovery.file.dir: clusters/east is not a directory",
            "east.yaml:1:1: tls.ca: ca.crt: no PEM certificate found",
            "east.yaml:1:1: tls.key: east.key is not the key of east.crt",
        ]
    );
}

#[test]
fn file_problems_are_reported_beside_other_problems() {
    let pki = Pki::new();
    std::fs::remove_file(pki.dir.path().join("east.key")).expect("rm key");
    let got = pki
        .load(
            "cluster:\n  id: east\n  clusterset: demo\npeers: []\ntraffic: { drainDuration: 5x }\n",
        )
        .expect_err("two problems");
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got[0].starts_with("east.yaml:1:1: tls.key: cannot read private key east.key: "),
        "{got:?}"
    );
    assert_eq!(got[1], "east.yaml:5:27: traffic.drainDuration: invalid duration \"5x\"");
}

#[test]
fn the_cluster_id_may_be_left_to_the_cluster_property_only_with_the_kube_source() {
    // (name, config, Ok(pending?) or Err(first error))
    let table: &[(&str, &str, Result<bool, &str>)] = &[
        ("file source with id", "cluster: { id: east }\npeers: []\n", Ok(false)),
        (
            "file source without id",
            "cluster: { clusterset: demo }\npeers: []\n",
            Err(
                "east.yaml:1:10: cluster: missing field `id` (required with discovery.source: file; with `kube` the ClusterProperty cluster.clusterset.k8s.io may provide it)",
            ),
        ),
        (
            "file source, no cluster section",
            "peers: []\n",
            Err("east.yaml:1:1: cluster: missing field `id` (required with discovery.source: file"),
        ),
        (
            "kube source without id",
            "cluster: { clusterset: demo }\ndiscovery: { source: kube }\npeers: []\n",
            Ok(true),
        ),
        ("kube source, no cluster section", "discovery: { source: kube }\npeers: []\n", Ok(true)),
        (
            "kube source with id",
            "cluster: { id: east }\ndiscovery: { source: kube }\npeers: []\n",
            Ok(false),
        ),
        (
            "kube source, invalid id",
            "cluster: { id: -east }\ndiscovery: { source: kube }\npeers: []\n",
            Err(
                "east.yaml:1:16: cluster.id: invalid cluster id \"-east\": must start and end with a letter or digit (an RFC 1123 label)",
            ),
        ),
        (
            "kube source, id too long",
            "cluster: { id: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa }\ndiscovery: { source: kube }\npeers: []\n",
            Err("east.yaml:1:16: cluster.id: invalid cluster id"),
        ),
        (
            "kube source without id, other errors still reported",
            "cluster: { colour: red }\ndiscovery: { source: kube }\npeers: []\n",
            Err("east.yaml:1:12: cluster.colour: unknown field `colour`"),
        ),
    ];
    for (name, text, want) in table {
        let got = parse_loaded(Path::new("east.yaml"), text);
        match (got, want) {
            (Ok(Loaded::Complete(_)), Ok(false)) | (Ok(Loaded::NeedsClusterId(_)), Ok(true)) => {}
            (Err(e), Err(prefix)) => {
                let first = e.iter().next().map(ToString::to_string).unwrap_or_default();
                assert!(first.starts_with(prefix), "case {name:?}: {first}");
            }
            (got, want) => panic!("case {name:?}: got {got:?}, want {want:?}"),
        }
    }
    // `parse` wants a complete config whatever the source
    let err = parse(Path::new("east.yaml"), "discovery: { source: kube }\npeers: []\n")
        .expect_err("no id");
    assert_eq!(
        err.to_string(),
        "east.yaml:1:1: cluster: missing field `id` (only `fedgate run` reads it from the ClusterProperty cluster.clusterset.k8s.io)"
    );
}

#[test]
fn a_pending_id_fills_every_default_derived_from_it() {
    let text = "cluster: { clusterset: demo }\ndiscovery: { source: kube }\npeers:\n  - { id: west, address: 10.0.0.2:15443 }\n";
    let Ok(Loaded::NeedsClusterId(p)) = parse_loaded(Path::new("/etc/fedgate/g.yaml"), text) else {
        panic!("pending expected");
    };
    assert_eq!(p.clusterset, "demo");
    let east = fedgate_discovery::model::ClusterId::new("east").expect("id");
    let c = p.with_cluster_id(&east).expect("complete");
    assert_eq!(c.cluster.id, east);
    assert_eq!(c.tls.cert, Path::new("/etc/fedgate/east.crt"));
    assert_eq!(c.tls.key, Path::new("/etc/fedgate/east.key"));
    assert_eq!(c.spiffe_id(&c.cluster.id), "spiffe://demo/cluster/east");
    // the id from the cluster is checked like a written one: not one of the peers
    let west = fedgate_discovery::model::ClusterId::new("west").expect("id");
    let err = p.with_cluster_id(&west).expect_err("own id is a peer");
    assert_eq!(
        err.to_string(),
        "/etc/fedgate/g.yaml:4:11: peers[0].id: peer id \"west\" is this gateway's own cluster.id"
    );
}

#[test]
fn a_pending_id_defers_the_checks_of_files_named_after_it() {
    let pki = Pki::new();
    let kube = "cluster:\n  clusterset: demo\ndiscovery: { source: kube }\npeers: []\n";
    // east.crt names spiffe://demo/cluster/east: fine once the id is east...
    let c = pki.load_pending(kube, "east").expect("east");
    assert_eq!(c.tls.cert, pki.dir.path().join("east.crt"));
    // ...but a ClusterProperty naming another cluster finds no west.crt/west.key
    let err = pki.load_pending(kube, "west").expect_err("no west files");
    assert_eq!(err.len(), 2, "{err:?}");
    assert!(
        err[0].starts_with("east.yaml:1:1: tls.cert: cannot read certificate west.crt"),
        "{err:?}"
    );
    // an explicit certificate for east used while the cluster says west
    let explicit = "cluster:\n  clusterset: demo\ndiscovery: { source: kube }\npeers: []\ntls: { cert: east.crt, key: east.key }\n";
    let err = pki.load_pending(explicit, "west").expect_err("cert names east");
    assert_eq!(
        err,
        [
            "east.yaml:5:14: tls.cert: certificate east.crt names spiffe://demo/cluster/east, expected SAN URI spiffe://demo/cluster/west"
        ]
    );
    // before the id is known, the certificate must at least belong to the clusterset
    pki.issue("east", "other", None);
    let path = pki.dir.path().join("east.yaml");
    std::fs::write(&path, explicit).expect("write");
    let err = load(&path).expect_err("wrong clusterset");
    let msg = err.to_string().replace(&format!("{}/", pki.dir.path().display()), "");
    assert_eq!(
        msg,
        "east.yaml:5:14: tls.cert: certificate east.crt names spiffe://other/cluster/east, expected SAN URI spiffe://demo/cluster/<cluster id>"
    );
}

#[test]
fn unreadable_config_file_is_an_error_naming_it() {
    let err = load(Path::new("/nonexistent/fedgate.yaml")).expect_err("no file");
    let msg = err.to_string();
    assert!(msg.starts_with("/nonexistent/fedgate.yaml: cannot read config file: "), "{msg}");
}

/// Every field path of the config, as `a.b.c` (`peers[].id` for list entries), from a
/// config with every field present.
fn field_paths(value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                out.push(p.clone());
                // `cluster.labels` is a free-form map, not fields.
                if p != "cluster.labels" {
                    field_paths(v, &p, out);
                }
            }
        }
        serde_json::Value::Array(items) => {
            if let Some(first) = items.first() {
                field_paths(first, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn docs_name_every_field() {
    let mut c = parse_ok(
        "cluster: { id: east, labels: { rack: r1 } }\npeers: [ { id: west, address: 10.0.0.2:15443 } ]\nfront: { stateDir: s }\ndiscovery: { kube: { kubeconfig: k } }\n",
    );
    c.cluster.locality = LocalityConfig { region: Some("r".into()), zone: Some("z".into()) };
    let value = serde_json::to_value(&c).expect("serializes");
    let mut paths = Vec::new();
    field_paths(&value, "", &mut paths);
    assert!(paths.len() > 30, "{paths:?}");
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/configuration.md exists");
    let missing: Vec<&String> = paths.iter().filter(|p| !doc.contains(&format!("`{p}`"))).collect();
    assert!(missing.is_empty(), "docs/configuration.md does not document: {missing:?}");
}

#[test]
fn the_example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/gateway.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/examples/gateway.yaml exists");
    let c = match parse(&path, &text) {
        Ok(c) => c,
        Err(e) => panic!("example does not parse:\n{e}"),
    };
    assert_eq!(c.cluster.id.as_str(), "east");
    assert_eq!(c.peers.len(), 1);
}

#[test]
fn damaged_files_never_panic() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/gateway.yaml");
    let text = std::fs::read_to_string(&path).expect("example exists");
    let mut rejected = 0;
    // Every prefix (cut anywhere, also inside multi-byte characters' neighbours).
    for end in (0..text.len()).filter(|i| text.is_char_boundary(*i)) {
        if parse(Path::new("cut.yaml"), &text[..end]).is_err() {
            rejected += 1;
        }
    }
    // Every line removed, and every line's indentation broken.
    let lines: Vec<&str> = text.lines().collect();
    for i in 0..lines.len() {
        for variant in [String::new(), format!(" {}", lines[i]), format!("{}: [", lines[i])] {
            let mut v = lines.clone();
            v[i] = &variant;
            if parse(Path::new("edit.yaml"), &v.join("\n")).is_err() {
                rejected += 1;
            }
        }
    }
    assert!(rejected > 100, "most damaged variants are rejected ({rejected})");
}

#[tokio::test]
async fn peer_addresses_resolve() {
    let ip: PeerAddress = "10.0.0.2:15443".parse().expect("ip");
    assert_eq!(ip.resolve().await.expect("no lookup"), ["10.0.0.2:15443".parse().expect("addr")]);
    let v6: PeerAddress = "[fd00::2]:15443".parse().expect("v6");
    assert_eq!(v6.host, "fd00::2");
    assert_eq!(v6.to_string(), "[fd00::2]:15443");
    let name: PeerAddress = "localhost:15443".parse().expect("name");
    let addrs = name.resolve().await.expect("localhost resolves");
    assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 15443), "{addrs:?}");
    for bad in ["10.0.0.2", "10.0.0.2:0", "host:port", "Bad_Host:1", ":15443", "[fd00::2]"] {
        assert!(bad.parse::<PeerAddress>().is_err(), "{bad:?} must be rejected");
    }
}

#[test]
fn peers_null_is_an_empty_list_and_a_map_is_an_error() {
    assert!(parse_ok("cluster: { id: east }\npeers:\n").peers.is_empty());
    assert_eq!(
        errors("cluster: { id: east }\npeers: { west: 10.0.0.2:15443 }\n"),
        ["east.yaml:2:8: peers: invalid type: map, expected a sequence"]
    );
}

#[test]
fn front_kube_settings_parse_and_ports_must_form_a_range() {
    let c = parse_ok(
        "cluster: { id: east }\npeers: []\ndiscovery: { source: kube }\nfront: { mode: kube, kube: { podIP: 10.0.0.5, firstPort: 21000, lastPort: 21009 } }\n",
    );
    assert_eq!(c.front.kube.pod_ip, Some("10.0.0.5".parse().expect("ip")));
    assert_eq!((c.front.kube.first_port, c.front.kube.last_port), (21000, 21009));
    let d = parse_ok("cluster: { id: east }\npeers: []\n");
    assert_eq!(d.front.kube.pod_ip, None);
    assert_eq!((d.front.kube.first_port, d.front.kube.last_port), (20000, 29999));
    let e = errors(
        "cluster: { id: east }\npeers: []\nfront: { kube: { firstPort: 30000, lastPort: 20000 } }\n",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("front.kube.firstPort: ports 30000-20000 are not a range"), "{e:?}");
    let e = errors("cluster: { id: east }\npeers: []\nfront: { kube: { podIP: not-an-ip } }\n");
    assert!(e[0].contains("front.kube.podIP"), "{e:?}");
}
