//! Scenario tables for the value rules (`rules.rs`): the ClusterSetIP range against the
//! gateway's own addresses, rules that still run beside type errors of their section, and the
//! start-up refusals of `fedgate run` that the shared validation makes first.

use std::path::Path;

use super::*;

/// `(case, config, exactly the lines analyze prints)`.
type Table<'a> = &'a [(&'a str, &'a str, &'a [&'a str])];

fn check_table(table: Table<'_>) {
    for (name, text, expected) in table {
        let got: Vec<String> = match parse(Path::new("east.yaml"), text) {
            Ok(_) if expected.is_empty() => Vec::new(),
            Ok(c) => panic!("case {name:?}: should be rejected, got {c:?}"),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        };
        assert_eq!(got, *expected, "case {name:?}");
    }
}

const HEAD: &str = "cluster: { id: east }\npeers: []\n";

fn with_head(rest: &str) -> String {
    format!("{HEAD}{rest}")
}

#[test]
fn the_clusterset_ip_range_must_not_hold_the_gateways_own_addresses() {
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "tunnel.listen inside the default range",
            with_head("tunnel: { listen: 242.1.0.5:15443 }\n"),
            // The default range is not in the file: the error points at the top.
            vec![
                "east.yaml:1:1: front.clusterSetIPRange: range 242.1.0.0/16 contains tunnel.listen 242.1.0.5:15443: ClusterSetIPs must not be the gateway's own addresses",
            ],
        ),
        (
            "dns.listen inside a written range",
            with_head(
                "dns: { listen: 10.96.0.10:53 }\nfront:\n  clusterSetIPRange: 10.96.0.0/12\n",
            ),
            vec![
                "east.yaml:5:22: front.clusterSetIPRange: range 10.96.0.0/12 contains dns.listen 10.96.0.10:53: ClusterSetIPs must not be the gateway's own addresses",
            ],
        ),
        (
            "admin and tunnel both inside",
            with_head(
                "tunnel: { listen: 10.9.0.1:15443 }\nadmin: { listen: 10.9.0.2:15000 }\nfront: { clusterSetIPRange: 10.9.0.0/24 }\n",
            ),
            vec![
                "east.yaml:5:29: front.clusterSetIPRange: range 10.9.0.0/24 contains tunnel.listen 10.9.0.1:15443: ClusterSetIPs must not be the gateway's own addresses",
                "east.yaml:5:29: front.clusterSetIPRange: range 10.9.0.0/24 contains admin.listen 10.9.0.2:15000: ClusterSetIPs must not be the gateway's own addresses",
            ],
        ),
        (
            "an IPv6 range and an IPv6 listener",
            with_head(
                "dns: { listen: \"[fd00:1::53]:53\" }\nfront: { clusterSetIPRange: \"fd00:1::/64\" }\n",
            ),
            vec![
                "east.yaml:4:29: front.clusterSetIPRange: range fd00:1::/64 contains dns.listen [fd00:1::53]:53: ClusterSetIPs must not be the gateway's own addresses",
            ],
        ),
        (
            "IPv4 wildcard listeners are not addresses of the range",
            with_head(
                "dns: { listen: 0.0.0.0:53 }\nadmin: { listen: \"[::1]:15000\" }\nfront: { clusterSetIPRange: 0.0.0.0/0 }\n",
            ),
            vec![],
        ),
        (
            "IPv6 wildcard listeners are not addresses of the range",
            with_head(
                "tunnel: { listen: \"[::]:15443\" }\ndns: { listen: \"[::]:53\" }\nfront: { clusterSetIPRange: \"::/0\" }\n",
            ),
            vec![],
        ),
        (
            "listeners outside the range",
            with_head(
                "tunnel: { listen: 10.0.0.1:15443 }\nadmin: { listen: 127.0.0.1:15000 }\nfront: { clusterSetIPRange: 10.9.0.0/24 }\n",
            ),
            vec![],
        ),
        (
            "a listener of another family",
            with_head("dns: { listen: 10.0.0.1:53 }\nfront: { clusterSetIPRange: \"::/0\" }\n"),
            vec![],
        ),
        (
            "a range with host bits is compared as its network",
            with_head(
                "admin: { listen: 10.9.0.7:15000 }\nfront: { clusterSetIPRange: 10.9.0.1/24 }\n",
            ),
            vec![
                "east.yaml:4:29: front.clusterSetIPRange: 10.9.0.1/24 has host bits set; did you mean 10.9.0.0/24?",
                "east.yaml:4:29: front.clusterSetIPRange: range 10.9.0.1/24 contains admin.listen 10.9.0.7:15000: ClusterSetIPs must not be the gateway's own addresses",
            ],
        ),
        (
            // A listen address with an error is reported as such, not compared as its default.
            "a bad listen address is not compared",
            with_head("admin: { listen: 10.9.0.7 }\nfront: { clusterSetIPRange: 127.0.0.0/8 }\n"),
            vec![
                "east.yaml:3:18: admin.listen: invalid address \"10.9.0.7\": expected ip:port, e.g. 0.0.0.0:53 or [::]:53",
            ],
        ),
    ];
    let table: Vec<(&str, &str, &[&str])> =
        cases.iter().map(|(n, t, e)| (*n, t.as_str(), e.as_slice())).collect();
    check_table(&table);
}

#[test]
fn value_rules_run_beside_type_errors_of_their_section() {
    check_table(&[
        (
            "range and type error in tunnel",
            "cluster: { id: east }\npeers: []\ntunnel: { socketBufferSize: 12, maxUdpPayloadSize: many }\n",
            &[
                "east.yaml:3:29: tunnel.socketBufferSize: 12 is out of range (65536..=1073741824 bytes)",
                "east.yaml:3:52: tunnel.maxUdpPayloadSize: invalid type: string \"many\", expected u16",
            ],
        ),
        (
            "range error and an unknown field",
            "cluster: { id: east }\npeers: []\ntunnel:\n  bogus: 1\n  socketBufferSize: 12\n",
            &[
                "east.yaml:4:3: tunnel.bogus: unknown field `bogus`, expected one of `listen`, `maxUdpPayloadSize`, `socketBufferSize`",
                "east.yaml:5:21: tunnel.socketBufferSize: 12 is out of range (65536..=1073741824 bytes)",
            ],
        ),
        (
            "traffic: threads out of range, drain not a duration",
            "cluster: { id: east }\npeers: []\ntraffic: { dataPlaneThreads: 0, drainDuration: 5x }\n",
            &[
                "east.yaml:3:30: traffic.dataPlaneThreads: 0 is out of range (1..=256)",
                "east.yaml:3:48: traffic.drainDuration: invalid duration \"5x\"",
            ],
        ),
        (
            // The interval is at its default 1s after the error: the timeout is not compared.
            "a cross-field rule skips a field with an error",
            "cluster: { id: east }\npeers: []\ntraffic:\n  healthCheck: { interval: 5x, timeout: 2s }\n",
            &["east.yaml:4:28: traffic.healthCheck.interval: invalid duration \"5x\""],
        ),
        (
            "a zero threshold beside a bad interval",
            "cluster: { id: east }\npeers: []\ntraffic:\n  healthCheck: { interval: 5x, healthyThreshold: 0 }\n",
            &[
                "east.yaml:4:28: traffic.healthCheck.interval: invalid duration \"5x\"",
                "east.yaml:4:50: traffic.healthCheck.healthyThreshold: must be at least 1",
            ],
        ),
        (
            "threads that are not a number",
            "cluster: { id: east }\npeers: []\ntraffic: { busyPoll: 100us, dataPlaneThreads: many }\n",
            &[
                "east.yaml:3:47: traffic.dataPlaneThreads: invalid type: string \"many\", expected usize",
            ],
        ),
        (
            "front: tiny range and a bad mode",
            "cluster: { id: east }\npeers: []\nfront: { mode: vipp, clusterSetIPRange: 10.0.0.0/30 }\n",
            &[
                "east.yaml:3:16: front.mode: unknown variant `vipp`, expected `vip` or `kube`",
                "east.yaml:3:41: front.clusterSetIPRange: range 10.0.0.0/30 is too small: 2 usable addresses, at least 16 needed (use a /27 or larger for IPv4, /123 or larger for IPv6)",
            ],
        ),
        (
            "dns: fractional ttl and a bad listen address",
            "cluster: { id: east }\npeers: []\ndns: { ttl: 1500ms, listen: nowhere }\n",
            &[
                "east.yaml:3:13: dns.ttl: must be whole seconds, got 1s 500ms",
                "east.yaml:3:29: dns.listen: invalid address \"nowhere\": expected ip:port, e.g. 0.0.0.0:53 or [::]:53",
            ],
        ),
        (
            "cluster: bad clusterset and an unknown field",
            "cluster: { id: east, clusterset: Demo, colour: red }\npeers: []\n",
            &[
                "east.yaml:1:34: cluster.clusterset: invalid clusterset name \"Demo\": may contain only lowercase letters, digits, '-', '.' and '_' (a SPIFFE trust domain)",
                "east.yaml:1:40: cluster.colour: unknown field `colour`, expected one of `id`, `clusterset`, `locality`, `labels`",
            ],
        ),
        (
            // `source` at its default (file) must not make `front.mode: kube` an error.
            "discovery: short lease and a bad source",
            "cluster: { id: east }\npeers: []\ndiscovery: { peerLeaseDuration: 0s, source: etcd }\nfront: { mode: kube }\n",
            &[
                "east.yaml:3:33: discovery.peerLeaseDuration: 0s is shorter than 300ms",
                "east.yaml:3:45: discovery.source: unknown variant `etcd`, expected `file` or `kube`",
            ],
        ),
        (
            "an invalid cluster id is not also a missing one",
            "cluster: { id: East_1, colour: red }\npeers: []\n",
            &[
                "east.yaml:1:16: cluster.id: invalid cluster id \"East_1\": may contain only lowercase letters, digits and '-' (an RFC 1123 label)",
                "east.yaml:1:24: cluster.colour: unknown field `colour`, expected one of `id`, `clusterset`, `locality`, `labels`",
            ],
        ),
        (
            "a failover list with a bad entry is not checked for duplicates",
            "cluster: { id: east }\npeers: []\ntraffic: { failoverPriority: [a, 'b c', a], drainDuration: 5x }\n",
            &[
                "east.yaml:3:34: traffic.failoverPriority[1]: invalid failover label \"b c\": expected a Kubernetes label key or key=value",
                "east.yaml:3:60: traffic.drainDuration: invalid duration \"5x\"",
            ],
        ),
    ]);
}

/// What `fedgate run` used to find only at start-up (the tunnel, the DNS server, the
/// sockets of the gateway's own listeners), now refused by the shared validation.
#[test]
fn start_up_refusals_are_config_errors() {
    check_table(&[
        (
            "tls.ca: system",
            "cluster: { id: east }\npeers: []\ntls:\n  ca: system\n",
            &[
                "east.yaml:4:7: tls.ca: `system` (the operating system's roots) is not supported: peers' certificates must chain to the clusterset's CA; name its PEM bundle",
            ],
        ),
        (
            "peer lease shorter than the tunnel accepts",
            "cluster: { id: east }\npeers: []\ndiscovery: { peerLeaseDuration: 100ms }\n",
            &["east.yaml:3:33: discovery.peerLeaseDuration: 100ms is shorter than 300ms"],
        ),
        (
            "dns ttl over 31 bits",
            "cluster: { id: east }\npeers: []\ndns: { ttl: 3000000000s }\n",
            &["east.yaml:3:13: dns.ttl: is too long for a DNS TTL (at most 2147483647s)"],
        ),
        (
            "dns and admin on one TCP port",
            "cluster: { id: east }\npeers: []\ndns: { listen: 127.0.0.1:8053 }\nadmin: { listen: 127.0.0.1:8053 }\n",
            &[
                "east.yaml:4:18: admin.listen: 127.0.0.1:8053 takes the same TCP port as dns.listen 127.0.0.1:8053",
            ],
        ),
        (
            "dns on every address takes the tunnel's UDP port",
            "cluster: { id: east }\npeers: []\ntunnel: { listen: 127.0.0.1:5353 }\ndns: { listen: 0.0.0.0:5353 }\n",
            &[
                "east.yaml:4:16: dns.listen: 0.0.0.0:5353 takes the same UDP port as tunnel.listen 127.0.0.1:5353",
            ],
        ),
        (
            "tunnel (UDP) and admin (TCP) may share a port",
            "cluster: { id: east }\npeers: []\ntunnel: { listen: 127.0.0.1:15000 }\n",
            &[],
        ),
        (
            "port 0 never collides",
            "cluster: { id: east }\npeers: []\ntunnel: { listen: 127.0.0.1:0 }\ndns: { listen: 127.0.0.1:0 }\nadmin: { listen: 127.0.0.1:0 }\n",
            &[],
        ),
        (
            "the edges of what the tunnel and DNS server accept",
            "cluster: { id: east }\npeers: []\ndiscovery: { peerLeaseDuration: 300ms }\ndns: { ttl: 2147483647s }\ntunnel: { maxUdpPayloadSize: 65507 }\n",
            &[],
        ),
    ]);
}

#[test]
fn outlier_detection_connection_limits_and_dns_tcp_cap() {
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "every field at a valid value",
            with_head(
                "traffic:\n  outlierDetection: { consecutiveFailures: 5, baseEjectionTime: 2s, maxEjectionTime: 1m, maxEjectionPercent: 50 }\n  connections: { max: 100, maxPerService: 10, idleTimeout: 5m }\ndns: { maxTcpConnections: 8 }\n",
            ),
            vec![],
        ),
        (
            "zeros and a percentage over 100",
            with_head(
                "traffic:\n  outlierDetection: { consecutiveFailures: 0, baseEjectionTime: 0s, maxEjectionPercent: 101 }\n  connections: { max: 0, maxPerService: 0, idleTimeout: 0s }\ndns: { maxTcpConnections: 0 }\n",
            ),
            vec![
                "east.yaml:4:44: traffic.outlierDetection.consecutiveFailures: must be at least 1",
                "east.yaml:4:65: traffic.outlierDetection.baseEjectionTime: must be longer than zero",
                "east.yaml:4:89: traffic.outlierDetection.maxEjectionPercent: 101 is out of range (0..=100)",
                "east.yaml:5:23: traffic.connections.max: must be at least 1",
                "east.yaml:5:41: traffic.connections.maxPerService: must be at least 1",
                "east.yaml:5:57: traffic.connections.idleTimeout: must be longer than zero",
                "east.yaml:6:27: dns.maxTcpConnections: must be at least 1",
            ],
        ),
        (
            "max ejection shorter than the base",
            with_head(
                "traffic:\n  outlierDetection: { baseEjectionTime: 10s, maxEjectionTime: 5s }\n",
            ),
            vec![
                "east.yaml:4:63: traffic.outlierDetection.maxEjectionTime: 5s is shorter than baseEjectionTime 10s",
            ],
        ),
    ];
    for (name, text, expected) in cases {
        check_table(&[(name, &text, &expected)]);
    }
}

/// `traffic.network` and `peers[].network`: gateway by default, flat globally or per peer
/// (with either front), bad values refused with the field named.
#[test]
fn network_modes() {
    let peers = "peers:\n  - { id: west, address: 10.0.0.2:15443 }\n  - { id: north, address: 10.0.0.3:15443, network: gateway }\n";
    let text = format!("cluster: {{ id: east }}\n{peers}");
    let c = parse(Path::new("east.yaml"), &text).expect("parses");
    assert_eq!(c.traffic.network, NetworkMode::Gateway);
    assert!(c.flat_peers().is_empty(), "gateway is the default");
    let text = format!("cluster: {{ id: east }}\n{peers}traffic: {{ network: flat }}\n");
    let c = parse(Path::new("east.yaml"), &text).expect("parses");
    assert_eq!(c.flat_peers().len(), 1);
    assert!(c.flat_peers().iter().any(|p| p.as_str() == "west"), "per-peer gateway wins");
    let per_peer =
        "cluster: { id: east }\npeers:\n  - { id: west, address: 10.0.0.2:15443, network: flat }\n";
    let c = parse(Path::new("east.yaml"), per_peer).expect("parses");
    assert!(c.flat_peers().iter().any(|p| p.as_str() == "west"));
    let kube = format!("{per_peer}discovery: {{ source: kube }}\nfront: {{ mode: kube }}\n");
    let c = parse(Path::new("east.yaml"), &kube).expect("flat with the kube front parses");
    assert_eq!(c.flat_peers().len(), 1);
    check_table(&[
        (
            "a bad global mode",
            "cluster: { id: east }\npeers: []\ntraffic: { network: routed }\n",
            &[
                "east.yaml:3:21: traffic.network: unknown variant `routed`, expected `gateway` or `flat`",
            ],
        ),
        (
            "a bad peer mode",
            "cluster: { id: east }\npeers:\n  - { id: west, address: 10.0.0.2:15443, network: Flat }\n",
            &[
                "east.yaml:3:51: peers[0].network: unknown variant `Flat`, expected `gateway` or `flat`",
            ],
        ),
    ]);
}
