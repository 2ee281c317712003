//! The value and cross-field rules serde cannot express, over what deserialized. They are the
//! one validation `fedgate analyze` and `fedgate run` share: whatever the gateway would refuse
//! at start-up because of a config value is refused here first, with the value's position.
//!
//! A section with errors still comes here with those fields at their defaults; a rule reads
//! only fields that are as written ([`Partial::reading`]), so a range error is reported beside
//! a type error in the same section, and no rule judges a default that stands in for an error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use fedgate_discovery::model::{LABEL_REGION, LABEL_SOURCE_CLUSTER, LABEL_ZONE};
use ipnet::IpNet;

use super::{
    FrontMode, MAX_BUSY_POLL, MAX_DATA_PLANE_THREADS, MIN_CLUSTERSET_IPS, Sections, SourceKind,
};
use crate::certs;
use fedgate_discovery::yaml::Partial;

/// Bounds of `tunnel.socketBufferSize`: 64 KiB (a few dozen datagrams) to 1 GiB.
const SOCKET_BUFFER_MIN: u32 = 64 * 1024;
const SOCKET_BUFFER_MAX: u32 = 1024 * 1024 * 1024;
/// Bounds of `tunnel.maxUdpPayloadSize`: QUIC's minimum datagram, UDP's largest payload (the
/// tunnel refuses anything outside, `tunnel/src/endpoint.rs`).
const UDP_PAYLOAD_MIN: u16 = fedgate_tunnel::endpoint::MIN_UDP_PAYLOAD;
const UDP_PAYLOAD_MAX: u16 = 65_507;
/// The shortest `discovery.peerLeaseDuration` the tunnel accepts: its keep-alives must fit.
pub(crate) const MIN_PEER_LEASE_DURATION: Duration = Duration::from_millis(300);
/// The longest `dns.ttl`: RFC 2181 §8 keeps TTLs to 31 bits, and the DNS server refuses more.
pub(crate) const MAX_DNS_TTL: Duration = Duration::from_secs(i32::MAX as u64);

/// Usable addresses of a ClusterSetIP range: all but the first (network / subnet-router
/// anycast) and the last (broadcast), for IPv4 and IPv6 alike.
pub(crate) fn usable_addresses(net: &IpNet) -> u128 {
    let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
    let total = if host_bits >= 128 { u128::MAX } else { 1u128 << host_bits };
    total.saturating_sub(2)
}

/// Whether two listeners on the same protocol would take the same port: same port (0 picks a
/// free one, so never) and the same IP, or one of them on every address of the other's
/// family (an IPv6 wildcard also takes IPv4, as Linux binds it dual-stack by default).
pub(crate) fn listeners_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wild: SocketAddr, other: SocketAddr| {
        wild.ip().is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
    };
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// `section`'s value when `fields` are as written (see [`Partial::reading`]).
fn read<'a, T>(section: &'a Option<Partial<T>>, fields: &[&str]) -> Option<&'a T> {
    section.as_ref().and_then(|p| p.reading(fields))
}

/// Every rule over the sections that deserialized; each violation with its field path.
pub(crate) fn semantics(s: &Sections) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    cluster(s, &mut out);
    peers(s, &mut out);
    if let Some(d) = read(&s.discovery, &["discovery.peerLeaseDuration"])
        && d.peer_lease_duration < MIN_PEER_LEASE_DURATION
    {
        out.push((
            "discovery.peerLeaseDuration".to_owned(),
            compared(d.peer_lease_duration, "is shorter than", MIN_PEER_LEASE_DURATION),
        ));
    }
    leader_election(s, &mut out);
    if let Some(front) = read(&s.front, &["front.kube.gatewayService"])
        && let Some(name) = &front.kube.gateway_service
        && let Err(e) = fedgate_discovery::names::Label::check(name)
    {
        let path = "front.kube.gatewayService".to_owned();
        out.push((path, format!("invalid Service name {name:?}: {}", e.reason())));
    }
    if let Some(tls) = read(&s.tls, &["tls.ca"])
        && let Err(message) = tls.ca.file()
    {
        out.push(("tls.ca".to_owned(), message.to_owned()));
    }
    tunnel(s, &mut out);
    dns(s, &mut out);
    listeners(s, &mut out);
    front(s, &mut out);
    traffic(s, &mut out);
    out
}

/// `"<a> <relation> <b>"` with both durations in humantime's words, e.g. "1m is longer than
/// interval 30s".
fn compared(a: Duration, relation: &str, b: Duration) -> String {
    format!("{} {relation} {}", humantime::format_duration(a), humantime::format_duration(b))
}

/// `discovery.kube.leaderElection`: a Lease counts whole seconds and is renewed halfway
/// (`kube::leader`), so the duration is whole seconds, at least 2; its name is a Kubernetes
/// object name (RFC 1123 subdomain) and its namespace a namespace name (RFC 1123 label).
fn leader_election(s: &Sections, out: &mut Vec<(String, String)>) {
    use fedgate_discovery::kube::leader::MIN_LEASE_DURATION;
    use fedgate_discovery::names::{Label, Subdomain};
    const P: &str = "discovery.kube.leaderElection";
    let field = |f: &str| format!("{P}.{f}");
    if let Some(d) = read(&s.discovery, &[&field("leaseDuration")]) {
        let duration = d.kube.leader_election.lease_duration;
        if duration < MIN_LEASE_DURATION {
            out.push((
                field("leaseDuration"),
                compared(duration, "is shorter than", MIN_LEASE_DURATION),
            ));
        } else if duration.subsec_nanos() != 0 {
            out.push((
                field("leaseDuration"),
                format!(
                    "must be whole seconds (a Lease's unit), got {}",
                    humantime::format_duration(duration)
                ),
            ));
        }
    }
    if let Some(d) = read(&s.discovery, &[&field("leaseName")])
        && let Err(e) = Subdomain::check(&d.kube.leader_election.lease_name)
    {
        let name = &d.kube.leader_election.lease_name;
        out.push((field("leaseName"), format!("invalid Lease name {name:?}: {}", e.reason())));
    }
    if let Some(d) = read(&s.discovery, &[&field("namespace")])
        && let Some(ns) = &d.kube.leader_election.namespace
        && let Err(e) = Label::check(ns)
    {
        out.push((field("namespace"), format!("invalid namespace {ns:?}: {}", e.reason())));
    }
}

fn cluster(s: &Sections, out: &mut Vec<(String, String)>) {
    let mut err = |path: &str, msg: String| out.push((path.to_owned(), msg));
    if let Some(cluster) = read(&s.cluster, &["cluster.clusterset"])
        && let Err(e) = certs::check_clusterset(&cluster.clusterset)
    {
        err("cluster.clusterset", e.to_string());
    }
    if let Some(cluster) = read(&s.cluster, &["cluster.labels"]) {
        for key in cluster.labels.keys() {
            let path = format!("cluster.labels.{key}");
            if [LABEL_SOURCE_CLUSTER, LABEL_REGION, LABEL_ZONE].contains(&key.as_str()) {
                err(
                    &path,
                    format!(
                        "label {key:?} is set from cluster.id / cluster.locality, not from labels"
                    ),
                );
            } else if !super::is_label_key(key) {
                err(&path, format!("invalid label key {key:?}"));
            }
        }
    }
    for field in ["region", "zone"] {
        let path = format!("cluster.locality.{field}");
        let Some(cluster) = read(&s.cluster, &[&path]) else { continue };
        let value = match field {
            "region" => &cluster.locality.region,
            _ => &cluster.locality.zone,
        };
        if value.as_deref() == Some("") {
            err(&path, "must not be empty (leave it out instead)".to_owned());
        }
    }
}

fn peers(s: &Sections, out: &mut Vec<(String, String)>) {
    let Some(peers) = &s.peers else { return };
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, peer) in peers.iter().map(|(i, p)| (*i, p)) {
        let path = format!("peers[{i}].id");
        if s.cluster_id.as_ref() == Some(&peer.id) {
            out.push((
                path,
                format!("peer id {:?} is this gateway's own cluster.id", peer.id.as_str()),
            ));
            continue;
        }
        let addresses = format!("peers[{i}].addresses");
        match (&peer.address, peer.addresses.is_empty()) {
            (None, true) => out.push((
                format!("peers[{i}]"),
                format!(
                    "peer {:?} has no address: give `address: host:port` (a DNS name may have \
                     one record per replica) or `addresses: [host:port, ...]`",
                    peer.id.as_str()
                ),
            )),
            (Some(_), false) => out.push((
                addresses.clone(),
                "give either `address` or `addresses`, not both".to_owned(),
            )),
            _ => {}
        }
        let mut listed: BTreeMap<String, usize> = BTreeMap::new();
        for (j, a) in peer.addresses.iter().enumerate() {
            let text = a.to_string();
            match listed.get(&text) {
                Some(first) => out.push((
                    format!("{addresses}[{j}]"),
                    format!("duplicate address {text} (also {addresses}[{first}])"),
                )),
                None => {
                    listed.insert(text, j);
                }
            }
        }
        match seen.get(peer.id.as_str()) {
            Some(first) => out.push((
                path,
                format!("duplicate peer id {:?} (also peers[{first}])", peer.id.as_str()),
            )),
            None => {
                seen.insert(peer.id.as_str(), i);
            }
        }
    }
}

fn tunnel(s: &Sections, out: &mut Vec<(String, String)>) {
    if let Some(tunnel) = read(&s.tunnel, &["tunnel.maxUdpPayloadSize"])
        && !(UDP_PAYLOAD_MIN..=UDP_PAYLOAD_MAX).contains(&tunnel.max_udp_payload_size)
    {
        out.push((
            "tunnel.maxUdpPayloadSize".to_owned(),
            format!(
                "{} is out of range: QUIC needs at least {UDP_PAYLOAD_MIN}, UDP allows at most \
                 {UDP_PAYLOAD_MAX}",
                tunnel.max_udp_payload_size
            ),
        ));
    }
    if let Some(tunnel) = read(&s.tunnel, &["tunnel.socketBufferSize"])
        && !(SOCKET_BUFFER_MIN..=SOCKET_BUFFER_MAX).contains(&tunnel.socket_buffer_size)
    {
        out.push((
            "tunnel.socketBufferSize".to_owned(),
            format!(
                "{} is out of range ({SOCKET_BUFFER_MIN}..={SOCKET_BUFFER_MAX} bytes)",
                tunnel.socket_buffer_size
            ),
        ));
    }
}

fn dns(s: &Sections, out: &mut Vec<(String, String)>) {
    if let Some(dns) = read(&s.dns, &["dns.upstream"])
        && dns.upstream.is_empty()
    {
        out.push((
            "dns.upstream".to_owned(),
            "must name at least one upstream (`system` or ip:port)".to_owned(),
        ));
    }
    if let Some(dns) = read(&s.dns, &["dns.ttl"]) {
        if dns.ttl.subsec_nanos() != 0 {
            out.push((
                "dns.ttl".to_owned(),
                format!("must be whole seconds, got {}", humantime::format_duration(dns.ttl)),
            ));
        } else if dns.ttl > MAX_DNS_TTL {
            out.push((
                "dns.ttl".to_owned(),
                format!("is too long for a DNS TTL (at most {}s)", MAX_DNS_TTL.as_secs()),
            ));
        }
    }
    if read(&s.dns, &["dns.maxTcpConnections"]).is_some_and(|d| d.max_tcp_connections == 0) {
        out.push(("dns.maxTcpConnections".to_owned(), "must be at least 1".to_owned()));
    }
}

/// The gateway's own listeners: `(field, address, protocols)`, each read only when as written.
fn own_listeners(s: &Sections) -> Vec<(&'static str, SocketAddr, &'static str)> {
    let mut all = Vec::new();
    if let Some(t) = read(&s.tunnel, &["tunnel.listen"]) {
        all.push(("tunnel.listen", t.listen, "udp"));
    }
    if let Some(d) = read(&s.dns, &["dns.listen"]) {
        all.push(("dns.listen", d.listen, "udp tcp"));
    }
    if let Some(a) = read(&s.admin, &["admin.listen"]) {
        all.push(("admin.listen", a.listen, "tcp"));
    }
    all
}

/// Two of the gateway's own listeners that would take the same port: the second could not
/// bind. Reported at the later field, naming the earlier.
fn listeners(s: &Sections, out: &mut Vec<(String, String)>) {
    let all = own_listeners(s);
    for (i, (field, addr, protos)) in all.iter().enumerate() {
        for (other, other_addr, other_protos) in &all[..i] {
            let shared = protos.split(' ').find(|p| other_protos.split(' ').any(|o| o == *p));
            if let Some(proto) = shared
                && listeners_overlap(*addr, *other_addr)
            {
                out.push((
                    (*field).to_owned(),
                    format!(
                        "{addr} takes the same {} port as {other} {other_addr}",
                        proto.to_uppercase()
                    ),
                ));
            }
        }
    }
}

fn front(s: &Sections, out: &mut Vec<(String, String)>) {
    let mut err = |path: &str, msg: String| out.push((path.to_owned(), msg));
    if let Some(front) = read(&s.front, &["front.clusterSetIPRange"]) {
        let net = front.cluster_set_ip_range;
        if net.trunc() != net {
            err(
                "front.clusterSetIPRange",
                format!("{net} has host bits set; did you mean {}?", net.trunc()),
            );
        }
        let usable = usable_addresses(&net);
        if usable < MIN_CLUSTERSET_IPS {
            err(
                "front.clusterSetIPRange",
                format!(
                    "range {net} is too small: {usable} usable addresses, at least \
                     {MIN_CLUSTERSET_IPS} needed (use a /27 or larger for IPv4, /123 or larger \
                     for IPv6)"
                ),
            );
        }
        // A ClusterSetIP is bound by the gateway and answered in DNS: one that is also the
        // address of the gateway's own listener would take its traffic.
        for (field, addr, _) in own_listeners(s) {
            if !addr.ip().is_unspecified() && net.trunc().contains(&addr.ip()) {
                err(
                    "front.clusterSetIPRange",
                    format!(
                        "range {net} contains {field} {addr}: ClusterSetIPs must not be the \
                         gateway's own addresses"
                    ),
                );
            }
        }
    }
    if let Some(front) = read(&s.front, &["front.kube.firstPort", "front.kube.lastPort"])
        && (front.kube.first_port == 0 || front.kube.first_port > front.kube.last_port)
    {
        err(
            "front.kube.firstPort",
            format!(
                "ports {}-{} are not a range of ports (1-65535, firstPort <= lastPort)",
                front.kube.first_port, front.kube.last_port
            ),
        );
    }
    if let Some(front) = read(&s.front, &["front.mode"])
        && front.mode == FrontMode::Kube
        && let Some(discovery) = read(&s.discovery, &["discovery.source"])
        && discovery.source != SourceKind::Kube
    {
        err("front.mode", "`kube` needs discovery.source: kube".to_owned());
    }
}

fn traffic(s: &Sections, out: &mut Vec<(String, String)>) {
    let mut err = |path: &str, msg: String| out.push((path.to_owned(), msg));
    if let Some(traffic) = read(&s.traffic, &["traffic.failoverPriority"]) {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, label) in traffic.failover_priority.iter().enumerate() {
            match seen.get(label.key.as_str()) {
                Some(first) => err(
                    &format!("traffic.failoverPriority[{i}]"),
                    format!(
                        "label {:?} is already listed at traffic.failoverPriority[{first}]",
                        label.key
                    ),
                ),
                None => {
                    seen.insert(label.key.as_str(), i);
                }
            }
        }
    }
    const INTERVAL: &str = "traffic.healthCheck.interval";
    const TIMEOUT: &str = "traffic.healthCheck.timeout";
    const UNHEALTHY: &str = "traffic.healthCheck.unhealthyThreshold";
    const HEALTHY: &str = "traffic.healthCheck.healthyThreshold";
    if let Some(t) = read(&s.traffic, &[INTERVAL])
        && t.health_check.interval.is_zero()
    {
        err(INTERVAL, "must be longer than zero".to_owned());
    }
    if let Some(t) = read(&s.traffic, &[TIMEOUT])
        && t.health_check.timeout.is_zero()
    {
        err(TIMEOUT, "must be longer than zero".to_owned());
    } else if let Some(t) = read(&s.traffic, &[TIMEOUT, INTERVAL])
        && t.health_check.timeout > t.health_check.interval
        && !t.health_check.interval.is_zero()
    {
        err(
            TIMEOUT,
            compared(t.health_check.timeout, "is longer than interval", t.health_check.interval),
        );
    }
    for (path, value) in [
        (UNHEALTHY, read(&s.traffic, &[UNHEALTHY]).map(|t| t.health_check.unhealthy_threshold)),
        (HEALTHY, read(&s.traffic, &[HEALTHY]).map(|t| t.health_check.healthy_threshold)),
    ] {
        if value == Some(0) {
            err(path, "must be at least 1".to_owned());
        }
    }
    const THREADS: &str = "traffic.dataPlaneThreads";
    const BUSY_POLL: &str = "traffic.busyPoll";
    if let Some(t) = read(&s.traffic, &[THREADS])
        && !(1..=MAX_DATA_PLANE_THREADS).contains(&t.data_plane_threads)
    {
        err(
            THREADS,
            format!("{} is out of range (1..={MAX_DATA_PLANE_THREADS})", t.data_plane_threads),
        );
    }
    if let Some(t) = read(&s.traffic, &[BUSY_POLL])
        && t.busy_poll > MAX_BUSY_POLL
    {
        err(BUSY_POLL, compared(t.busy_poll, "is longer than", MAX_BUSY_POLL));
    }
    outlier_detection(s, &mut err);
    const MAX: &str = "traffic.connections.max";
    const PER_SERVICE: &str = "traffic.connections.maxPerService";
    const IDLE: &str = "traffic.connections.idleTimeout";
    for (path, value) in [
        (MAX, read(&s.traffic, &[MAX]).map(|t| t.connections.max)),
        (PER_SERVICE, read(&s.traffic, &[PER_SERVICE]).map(|t| t.connections.max_per_service)),
    ] {
        if value == Some(0) {
            err(path, "must be at least 1".to_owned());
        }
    }
    if let Some(t) = read(&s.traffic, &[IDLE])
        && t.connections.idle_timeout.is_zero()
    {
        err(IDLE, "must be longer than zero".to_owned());
    }
}

fn outlier_detection(s: &Sections, err: &mut impl FnMut(&str, String)) {
    const FAILURES: &str = "traffic.outlierDetection.consecutiveFailures";
    const BASE: &str = "traffic.outlierDetection.baseEjectionTime";
    const MAX: &str = "traffic.outlierDetection.maxEjectionTime";
    const PERCENT: &str = "traffic.outlierDetection.maxEjectionPercent";
    if read(&s.traffic, &[FAILURES]).is_some_and(|t| t.outlier_detection.consecutive_failures == 0)
    {
        err(FAILURES, "must be at least 1".to_owned());
    }
    if read(&s.traffic, &[BASE]).is_some_and(|t| t.outlier_detection.base_ejection_time.is_zero()) {
        err(BASE, "must be longer than zero".to_owned());
    } else if let Some(t) = read(&s.traffic, &[BASE, MAX])
        && t.outlier_detection.max_ejection_time < t.outlier_detection.base_ejection_time
    {
        err(
            MAX,
            compared(
                t.outlier_detection.max_ejection_time,
                "is shorter than baseEjectionTime",
                t.outlier_detection.base_ejection_time,
            ),
        );
    }
    if let Some(t) = read(&s.traffic, &[PERCENT])
        && t.outlier_detection.max_ejection_percent > 100
    {
        err(
            PERCENT,
            format!("{} is out of range (0..=100)", t.outlier_detection.max_ejection_percent),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_listeners_overlap() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        // (first, second, whether they take the same port)
        let table = [
            ("0.0.0.0:53", "0.0.0.0:53", true),
            ("0.0.0.0:53", "10.0.0.1:53", true),
            ("10.0.0.1:53", "0.0.0.0:53", true),
            ("10.0.0.1:53", "10.0.0.2:53", false),
            ("10.0.0.1:53", "10.0.0.1:54", false),
            ("[::]:53", "10.0.0.1:53", true),
            ("0.0.0.0:53", "[fd00::1]:53", false),
            ("[::]:53", "[fd00::1]:53", true),
            ("[fd00::1]:53", "10.0.0.1:53", false),
            ("127.0.0.1:0", "127.0.0.1:0", false),
        ];
        for (x, y, want) in table {
            assert_eq!(listeners_overlap(a(x), a(y)), want, "{x} {y}");
        }
    }
}
