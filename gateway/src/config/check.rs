//! The rules serde cannot express: cross-field checks over what parsed, and checks of the
//! files a config names. Each returns every violation it finds, with its field path.

use std::collections::BTreeMap;
use std::path::Path;

use fedgate_discovery::model::{LABEL_REGION, LABEL_SOURCE_CLUSTER, LABEL_ZONE};
use ipnet::IpNet;

use super::{
    CaSource, ConfigError, FileInputs, FrontMode, Locator, MAX_BUSY_POLL, MAX_DATA_PLANE_THREADS,
    MIN_CLUSTERSET_IPS, Sections, SourceKind,
};
use crate::certs::{self, CertInfo};

/// Bounds of `tunnel.socketBufferSize`: 64 KiB (a few dozen datagrams) to 1 GiB.
const SOCKET_BUFFER_MIN: u32 = 64 * 1024;
const SOCKET_BUFFER_MAX: u32 = 1024 * 1024 * 1024;

/// Usable addresses of a ClusterSetIP range: all but the first (network / subnet-router
/// anycast) and the last (broadcast), for IPv4 and IPv6 alike.
pub(crate) fn usable_addresses(net: &IpNet) -> u128 {
    let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
    let total = if host_bits >= 128 { u128::MAX } else { 1u128 << host_bits };
    total.saturating_sub(2)
}

/// Cross-field and value rules over the sections that deserialized.
pub(crate) fn semantics(s: &Sections) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut err = |path: &str, msg: String| out.push((path.to_owned(), msg));

    if let Some(cluster) = &s.cluster {
        if let Err(e) = certs::check_clusterset(&cluster.clusterset) {
            err("cluster.clusterset", e.to_string());
        }
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
        for (field, value) in
            [("region", &cluster.locality.region), ("zone", &cluster.locality.zone)]
        {
            if value.as_deref() == Some("") {
                err(
                    &format!("cluster.locality.{field}"),
                    "must not be empty (leave it out instead)".to_owned(),
                );
            }
        }
    }

    if let Some(peers) = &s.peers {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, peer) in peers.iter().map(|(i, p)| (*i, p)) {
            let path = format!("peers[{i}].id");
            if s.cluster_id.as_ref() == Some(&peer.id) {
                err(
                    &path,
                    format!("peer id {:?} is this gateway's own cluster.id", peer.id.as_str()),
                );
                continue;
            }
            match seen.get(peer.id.as_str()) {
                Some(first) => err(
                    &path,
                    format!("duplicate peer id {:?} (also peers[{first}])", peer.id.as_str()),
                ),
                None => {
                    seen.insert(peer.id.as_str(), i);
                }
            }
        }
    }

    if let Some(discovery) = &s.discovery
        && discovery.peer_lease_duration.is_zero()
    {
        err("discovery.peerLeaseDuration", "must be longer than zero".to_owned());
    }

    if let Some(tunnel) = &s.tunnel
        && !(1200..=65_507).contains(&tunnel.max_udp_payload_size)
    {
        err(
            "tunnel.maxUdpPayloadSize",
            format!(
                "{} is out of range: QUIC needs at least 1200, UDP allows at most 65507",
                tunnel.max_udp_payload_size
            ),
        );
    }

    if let Some(tunnel) = &s.tunnel
        && !(SOCKET_BUFFER_MIN..=SOCKET_BUFFER_MAX).contains(&tunnel.socket_buffer_size)
    {
        err(
            "tunnel.socketBufferSize",
            format!(
                "{} is out of range ({SOCKET_BUFFER_MIN}..={SOCKET_BUFFER_MAX} bytes)",
                tunnel.socket_buffer_size
            ),
        );
    }

    if let Some(dns) = &s.dns {
        if dns.upstream.is_empty() {
            err("dns.upstream", "must name at least one upstream (`system` or ip:port)".to_owned());
        }
        if dns.ttl.subsec_nanos() != 0 {
            err(
                "dns.ttl",
                format!("must be whole seconds, got {}", humantime::format_duration(dns.ttl)),
            );
        } else if dns.ttl.as_secs() > u64::from(u32::MAX) {
            err("dns.ttl", "is too long for a DNS TTL".to_owned());
        }
        if let Some(tunnel) = &s.tunnel
            && tunnel.listen == dns.listen
        {
            err("dns.listen", format!("{} is also tunnel.listen (both use UDP)", dns.listen));
        }
    }

    if let Some(front) = &s.front {
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
                    "range {net} is too small: {usable} usable addresses, at least {MIN_CLUSTERSET_IPS} needed \
                     (use a /27 or larger for IPv4, /123 or larger for IPv6)"
                ),
            );
        }
        if front.kube.first_port == 0 || front.kube.first_port > front.kube.last_port {
            err(
                "front.kube.firstPort",
                format!(
                    "ports {}-{} are not a range of ports (1-65535, firstPort <= lastPort)",
                    front.kube.first_port, front.kube.last_port
                ),
            );
        }
        if front.mode == FrontMode::Kube
            && let Some(discovery) = &s.discovery
            && discovery.source != SourceKind::Kube
        {
            err("front.mode", "`kube` needs discovery.source: kube".to_owned());
        }
    }

    if let Some(traffic) = &s.traffic {
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
        let hc = &traffic.health_check;
        if hc.interval.is_zero() {
            err("traffic.healthCheck.interval", "must be longer than zero".to_owned());
        }
        if hc.timeout.is_zero() {
            err("traffic.healthCheck.timeout", "must be longer than zero".to_owned());
        } else if hc.timeout > hc.interval && !hc.interval.is_zero() {
            err(
                "traffic.healthCheck.timeout",
                format!(
                    "{} is longer than interval {}",
                    humantime::format_duration(hc.timeout),
                    humantime::format_duration(hc.interval)
                ),
            );
        }
        if hc.unhealthy_threshold == 0 {
            err("traffic.healthCheck.unhealthyThreshold", "must be at least 1".to_owned());
        }
        if hc.healthy_threshold == 0 {
            err("traffic.healthCheck.healthyThreshold", "must be at least 1".to_owned());
        }
        if !(1..=MAX_DATA_PLANE_THREADS).contains(&traffic.data_plane_threads) {
            err(
                "traffic.dataPlaneThreads",
                format!(
                    "{} is out of range (1..={MAX_DATA_PLANE_THREADS})",
                    traffic.data_plane_threads
                ),
            );
        }
        if traffic.busy_poll > MAX_BUSY_POLL {
            err(
                "traffic.busyPoll",
                format!(
                    "{} is longer than {}",
                    humantime::format_duration(traffic.busy_poll),
                    humantime::format_duration(MAX_BUSY_POLL)
                ),
            );
        } else if !traffic.busy_poll.is_zero() && traffic.data_plane_threads > 1 {
            err(
                "traffic.busyPoll",
                format!("needs traffic.dataPlaneThreads: 1 (it is {})", traffic.data_plane_threads),
            );
        }
    }
    out
}

fn read_pem(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// Checks the files the config names, as they are at `now`.
pub(crate) fn files(config: &FileInputs, loc: &Locator, now: jiff::Timestamp) -> Vec<ConfigError> {
    let mut out = Vec::new();
    // Without the id (kube source, id from the ClusterProperty) the certificate must name some
    // cluster of the clusterset; the exact id is checked once it is known.
    let (want, any_cluster) = match &config.id {
        Some(id) => (certs::spiffe_id(&config.clusterset, id.as_str()), false),
        None => (certs::spiffe_id(&config.clusterset, ""), true),
    };
    let names_it = |s: &String| if any_cluster { s.starts_with(&want) } else { *s == want };
    let expected = if any_cluster { format!("{want}<cluster id>") } else { want.clone() };
    // A path still empty is a default named after the id: checked once the id is known.
    let pending = |p: &Path| p.as_os_str().is_empty();

    let leaf: Option<CertInfo> = match read_pem(&config.tls.cert, "certificate") {
        _ if pending(&config.tls.cert) => None,
        Err(msg) => {
            out.push(loc.error("tls.cert", msg));
            None
        }
        Ok(pem) => match certs::inspect(&pem) {
            Err(e) => {
                out.push(loc.error("tls.cert", format!("{}: {e}", config.tls.cert.display())));
                None
            }
            Ok(info) => {
                let file = config.tls.cert.display();
                if now > info.not_after {
                    out.push(loc.error(
                        "tls.cert",
                        format!("certificate {file} expired at {}", info.not_after),
                    ));
                } else if now < info.not_before {
                    out.push(loc.error(
                        "tls.cert",
                        format!("certificate {file} is not valid before {}", info.not_before),
                    ));
                }
                if !info.spiffe_ids.iter().any(names_it) {
                    let found = if info.spiffe_ids.is_empty() {
                        "no spiffe:// URI SAN".to_owned()
                    } else {
                        info.spiffe_ids.join(", ")
                    };
                    out.push(loc.error(
                        "tls.cert",
                        format!("certificate {file} names {found}, expected SAN URI {expected}"),
                    ));
                }
                Some(info)
            }
        },
    };

    match read_pem(&config.tls.key, "private key") {
        _ if pending(&config.tls.key) => {}
        Err(msg) => out.push(loc.error("tls.key", msg)),
        Ok(pem) => match &leaf {
            Some(info) => match certs::key_matches(info, &pem) {
                Ok(true) => {}
                Ok(false) => out.push(loc.error(
                    "tls.key",
                    format!(
                        "{} is not the key of {}",
                        config.tls.key.display(),
                        config.tls.cert.display()
                    ),
                )),
                Err(e) => {
                    out.push(loc.error("tls.key", format!("{}: {e}", config.tls.key.display())))
                }
            },
            None => {
                if let Err(e) = rcgen::KeyPair::from_pem(&pem) {
                    out.push(loc.error(
                        "tls.key",
                        format!("{}: invalid private key: {e}", config.tls.key.display()),
                    ));
                }
            }
        },
    }

    if let CaSource::File(ca_path) = &config.tls.ca {
        match read_pem(ca_path, "CA bundle").and_then(|pem| {
            certs::inspect_all(&pem).map_err(|e| format!("{}: {e}", ca_path.display()))
        }) {
            Err(msg) => out.push(loc.error("tls.ca", msg)),
            Ok(cas) => {
                let usable: Vec<&CertInfo> = cas.iter().filter(|c| c.valid_at(now)).collect();
                if usable.is_empty() {
                    out.push(loc.error(
                        "tls.ca",
                        format!(
                            "no certificate in {} is valid now (all expired or not yet valid)",
                            ca_path.display()
                        ),
                    ));
                } else if let Some(info) = &leaf
                    && !usable.iter().any(|ca| certs::signed_by(info, ca))
                {
                    out.push(loc.error(
                        "tls.cert",
                        format!(
                            "certificate {} is not signed by any CA in {}",
                            config.tls.cert.display(),
                            ca_path.display()
                        ),
                    ));
                }
            }
        }
    }

    if config.discovery.source == SourceKind::File && !config.discovery.file.dir.is_dir() {
        out.push(loc.error(
            "discovery.file.dir",
            format!("{} is not a directory", config.discovery.file.dir.display()),
        ));
    }
    if let Some(kubeconfig) = &config.discovery.kube.kubeconfig
        && config.discovery.source == SourceKind::Kube
        && !kubeconfig.is_file()
    {
        out.push(
            loc.error(
                "discovery.kube.kubeconfig",
                format!("{} is not a file", kubeconfig.display()),
            ),
        );
    }
    out.sort_by(|a, b| (a.line, a.column, &a.path).cmp(&(b.line, b.column, &b.path)));
    out
}
