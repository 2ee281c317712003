//! Scenario tables for what services publish.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use fedgate_discovery::exchange::delta::testing::{endpoint, imported};
use fedgate_discovery::model::{
    ClusterId, Endpoint, ExportedService, Health, ImportPort, ImportedService, LocalService,
    Locality, ServiceKey, ServicePort, ServiceType, SessionAffinity,
};
use hickory_proto::rr::RecordType;

use super::*;
pub(crate) use crate::fixture::{cid, export};
use crate::tier::parse_priority;

pub(crate) fn ep(ip: &str, hostname: Option<&str>, ready: bool, health: Health) -> Endpoint {
    Endpoint {
        hostname: hostname.map(str::to_owned),
        ready,
        ..endpoint(ip.parse().expect("ip"), 8080, health)
    }
}

pub(crate) fn port(name: Option<&str>, p: u16) -> ServicePort {
    ServicePort::tcp(name, p)
}

pub(crate) fn import(
    ns: &str,
    name: &str,
    ty: ServiceType,
    ips: &[&str],
    clusters: Vec<Arc<ExportedService>>,
) -> ImportedService {
    let all: BTreeSet<ClusterId> = clusters.iter().map(|c| c.cluster.clone()).collect();
    let ports = vec![
        ImportPort { port: port(Some("http"), 80), clusters: all.clone() },
        ImportPort { port: port(None, 81), clusters: all },
    ];
    let ips = ips.iter().map(|s| s.parse().expect("ip")).collect();
    let winner = clusters.first().map_or_else(|| cid("east"), |c| c.cluster.clone());
    imported(ServiceKey::new(ns, name), ty, ports, ips, winner, clusters)
}

struct World {
    local: ClusterId,
    client: BTreeMap<String, String>,
    priority: Vec<crate::tier::PriorityLabel>,
    localities: BTreeMap<ClusterId, Locality>,
    unreachable: BTreeSet<ClusterId>,
    vips: BTreeMap<(ClusterId, IpAddr), IpAddr>,
    flat: BTreeSet<ClusterId>,
}

impl World {
    fn new() -> Self {
        let loc = |r: &str, z: &str| Locality {
            region: Some(r.into()),
            zone: Some(z.into()),
            labels: BTreeMap::new(),
        };
        let localities: BTreeMap<ClusterId, Locality> = [
            (cid("east"), loc("us", "us-a")),
            (cid("east2"), loc("us", "us-b")),
            (cid("west"), loc("eu", "eu-a")),
        ]
        .into_iter()
        .collect();
        let local = cid("east");
        let client = localities[&local].labels_for(&local);
        Self {
            local,
            client,
            priority: parse_priority(&crate::settings::default_failover_priority()),
            localities,
            unreachable: BTreeSet::new(),
            vips: BTreeMap::new(),
            flat: BTreeSet::new(),
        }
    }

    /// The context the records are built in.
    fn cx(&self) -> ImportContext<'_> {
        ImportContext {
            ttl: 5,
            local_cluster: Some(&self.local),
            client_labels: &self.client,
            priority: &self.priority,
            localities: &self.localities,
            unreachable: &self.unreachable,
            vips: &self.vips,
            flat: &self.flat,
        }
    }

    fn names(&self, svc: &ImportedService) -> NameMap {
        import_names(svc, &self.cx())
    }

    /// The PTR targets a service asks for, as sorted `(address, target)` strings.
    fn ptrs(&self, svc: &ImportedService) -> Vec<(String, String)> {
        sorted_ptrs(&import_records(svc, &self.cx()).ptrs)
    }
}

fn sorted_ptrs(ptrs: &Ptrs) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> =
        ptrs.iter().map(|(ip, n)| (ip.to_string(), n.to_ascii())).collect();
    v.sort();
    v
}

/// (name, type) → sorted rdata strings.
fn flatten(map: &NameMap) -> BTreeMap<(String, String), Vec<String>> {
    let mut out = BTreeMap::new();
    for data in map.values() {
        if data.rrsets.is_empty() {
            out.insert((data.name.to_ascii(), "ENT".to_owned()), vec![]);
        }
        for (t, records) in &data.rrsets {
            let mut v: Vec<String> = records.iter().map(|r| r.data.to_string()).collect();
            v.sort();
            out.insert((data.name.to_ascii(), RecordType::from(*t).to_string()), v);
        }
    }
    out
}

fn get(map: &NameMap, name: &str, t: RecordType) -> Option<Vec<String>> {
    flatten(map).get(&(name.to_owned(), t.to_string())).cloned()
}

/// Asserts each `(name, type, records)` row: `names` has exactly those records there.
fn expect_records(names: &NameMap, rows: &[(&str, RecordType, &[&str])]) {
    for (name, t, want) in rows {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(get(names, name, *t), Some(want), "{name} {t}");
    }
}

#[test]
fn clusterset_ip_service() {
    let w = World::new();
    let key = ServiceKey::new("ns", "web");
    let svc = import(
        "ns",
        "web",
        ServiceType::ClusterSetIP,
        &["242.1.0.1", "fd00::1"],
        vec![export(
            &key,
            "east",
            ServiceType::ClusterSetIP,
            vec![ep("10.0.0.1", None, true, Health::Healthy)],
        )],
    );
    let names = w.names(&svc);
    let flat = flatten(&names);
    expect_records(
        &names,
        &[
            ("web.ns.svc.clusterset.local.", RecordType::A, &["242.1.0.1"]),
            ("web.ns.svc.clusterset.local.", RecordType::AAAA, &["fd00::1"]),
            (
                "_http._tcp.web.ns.svc.clusterset.local.",
                RecordType::SRV,
                &["0 100 80 web.ns.svc.clusterset.local."],
            ),
            // One SRV per service port at the service name, unnamed ports included (CoreDNS).
            (
                "web.ns.svc.clusterset.local.",
                RecordType::SRV,
                &["0 100 80 web.ns.svc.clusterset.local.", "0 100 81 web.ns.svc.clusterset.local."],
            ),
        ],
    );
    assert!(flat.contains_key(&("_tcp.web.ns.svc.clusterset.local.".into(), "ENT".into())));
    // Nothing per cluster, no `_<port>` name for the unnamed port.
    assert!(flat.keys().all(|(n, _)| !n.starts_with("east.")), "{flat:?}");
    assert_eq!(flat.len(), 5, "{flat:?}");
    // Each ClusterSetIP points back at the service.
    let svc_name = "web.ns.svc.clusterset.local.".to_owned();
    assert_eq!(
        w.ptrs(&svc),
        vec![("242.1.0.1".into(), svc_name.clone()), ("fd00::1".into(), svc_name)]
    );
}

#[test]
fn clusterset_ip_without_ip_publishes_nothing_and_bad_names_are_skipped() {
    let w = World::new();
    let svc = import("ns", "web", ServiceType::ClusterSetIP, &[], vec![]);
    assert!(w.names(&svc).is_empty());
    let svc = import("ns", "Bad_Name", ServiceType::ClusterSetIP, &["242.1.0.1"], vec![]);
    assert!(w.names(&svc).is_empty());
}

#[test]
fn headless_answers_best_healthy_tier_with_vips_for_remote() {
    let mut w = World::new();
    let key = ServiceKey::new("ns", "db");
    w.vips.insert((cid("west"), "10.2.0.1".parse().expect("ip")), "242.2.0.1".parse().expect("ip"));
    let east = vec![
        ep("10.0.0.1", Some("db-0"), true, Health::Healthy),
        ep("10.0.0.2", None, true, Health::Unknown),
        ep("10.0.0.3", Some("db-2"), false, Health::Healthy),
    ];
    let west = vec![
        ep("10.2.0.1", Some("db-0"), true, Health::Healthy),
        ep("10.2.0.9", None, true, Health::Healthy),
    ];
    let svc = import(
        "ns",
        "db",
        ServiceType::Headless,
        &[],
        vec![
            export(&key, "east", ServiceType::Headless, east),
            export(&key, "west", ServiceType::Headless, west),
        ],
    );
    let names = w.names(&svc);
    expect_records(
        &names,
        &[
            ("db.ns.svc.clusterset.local.", RecordType::A, &["10.0.0.1", "10.0.0.2"]),
            ("db-0.east.db.ns.svc.clusterset.local.", RecordType::A, &["10.0.0.1"]),
            ("10-0-0-2.east.db.ns.svc.clusterset.local.", RecordType::A, &["10.0.0.2"]),
            ("db-0.west.db.ns.svc.clusterset.local.", RecordType::A, &["242.2.0.1"]),
        ],
    );
    // Not ready, or remote without a VIP: no name.
    assert_eq!(get(&names, "db-2.east.db.ns.svc.clusterset.local.", RecordType::A), None);
    assert_eq!(get(&names, "10-2-0-9.west.db.ns.svc.clusterset.local.", RecordType::A), None);
    // `<clusterid>.<svc>...` does not exist.
    assert!(flatten(&names).keys().all(|(n, _)| n != "east.db.ns.svc.clusterset.local."));
    assert_eq!(
        get(&names, "_http._tcp.db.ns.svc.clusterset.local.", RecordType::SRV),
        Some(vec![
            "0 100 8080 10-0-0-2.east.db.ns.svc.clusterset.local.".into(),
            "0 100 8080 db-0.east.db.ns.svc.clusterset.local.".into(),
        ])
    );
    // At the service name: one SRV per (best-tier endpoint, port), unnamed port included.
    assert_eq!(
        get(&names, "db.ns.svc.clusterset.local.", RecordType::SRV),
        Some(vec![
            "0 100 8080 10-0-0-2.east.db.ns.svc.clusterset.local.".into(),
            "0 100 8080 db-0.east.db.ns.svc.clusterset.local.".into(),
            "0 100 81 10-0-0-2.east.db.ns.svc.clusterset.local.".into(),
            "0 100 81 db-0.east.db.ns.svc.clusterset.local.".into(),
        ])
    );
    // Every address answered for a per-host name points back at it: the local endpoints'
    // own addresses and the remote endpoint's VIP (never the remote pod address).
    assert_eq!(
        w.ptrs(&svc),
        vec![
            ("10.0.0.1".into(), "db-0.east.db.ns.svc.clusterset.local.".into()),
            ("10.0.0.2".into(), "10-0-0-2.east.db.ns.svc.clusterset.local.".into()),
            ("242.2.0.1".into(), "db-0.west.db.ns.svc.clusterset.local.".into()),
        ]
    );
}

/// Flat network mode: a flat cluster's endpoints are answered at their own addresses (no VIP
/// needed), SRV records carry their own port, and their PTR points at their per-host name.
#[test]
fn headless_in_flat_mode_answers_remote_endpoints_own_addresses() {
    let mut w = World::new();
    let key = ServiceKey::new("ns", "db");
    // west is flat; its endpoint has no VIP, and one it had is not used.
    w.flat.insert(cid("west"));
    w.vips.insert((cid("west"), "10.2.0.1".parse().expect("ip")), "242.2.0.1".parse().expect("ip"));
    let west = vec![
        ep("10.2.0.1", Some("db-0"), true, Health::Healthy),
        ep("10.2.0.9", None, true, Health::Healthy),
    ];
    let svc = import(
        "ns",
        "db",
        ServiceType::Headless,
        &[],
        vec![export(&key, "west", ServiceType::Headless, west)],
    );
    let names = w.names(&svc);
    expect_records(
        &names,
        &[
            ("db.ns.svc.clusterset.local.", RecordType::A, &["10.2.0.1", "10.2.0.9"]),
            ("db-0.west.db.ns.svc.clusterset.local.", RecordType::A, &["10.2.0.1"]),
            ("10-2-0-9.west.db.ns.svc.clusterset.local.", RecordType::A, &["10.2.0.9"]),
            (
                "_http._tcp.db.ns.svc.clusterset.local.",
                RecordType::SRV,
                &[
                    "0 100 8080 10-2-0-9.west.db.ns.svc.clusterset.local.",
                    "0 100 8080 db-0.west.db.ns.svc.clusterset.local.",
                ],
            ),
        ],
    );
    assert_eq!(
        w.ptrs(&svc),
        vec![
            ("10.2.0.1".into(), "db-0.west.db.ns.svc.clusterset.local.".into()),
            ("10.2.0.9".into(), "10-2-0-9.west.db.ns.svc.clusterset.local.".into()),
        ]
    );
    // Gateway mode (the default) for the same service: the VIP, and the VIP-less endpoint
    // is left out.
    w.flat.clear();
    let names = w.names(&svc);
    assert_eq!(
        get(&names, "db.ns.svc.clusterset.local.", RecordType::A),
        Some(vec!["242.2.0.1".into()])
    );
}

#[test]
fn headless_fails_over_when_local_endpoints_are_unhealthy_or_cluster_unreachable() {
    let mut w = World::new();
    let key = ServiceKey::new("ns", "db");
    w.vips
        .insert((cid("east2"), "10.1.0.1".parse().expect("ip")), "242.2.0.2".parse().expect("ip"));
    w.vips.insert((cid("west"), "10.2.0.1".parse().expect("ip")), "242.2.0.3".parse().expect("ip"));
    let build = |local_health: Health| {
        import(
            "ns",
            "db",
            ServiceType::Headless,
            &[],
            vec![
                export(
                    &key,
                    "east",
                    ServiceType::Headless,
                    vec![ep("10.0.0.1", None, true, local_health)],
                ),
                export(
                    &key,
                    "east2",
                    ServiceType::Headless,
                    vec![ep("10.1.0.1", None, true, Health::Healthy)],
                ),
                export(
                    &key,
                    "west",
                    ServiceType::Headless,
                    vec![ep("10.2.0.1", None, true, Health::Healthy)],
                ),
            ],
        )
    };
    let a = |w: &World, h| get(&w.names(&build(h)), "db.ns.svc.clusterset.local.", RecordType::A);
    assert_eq!(a(&w, Health::Healthy), Some(vec!["10.0.0.1".into()]));
    // Same region, other cluster next.
    assert_eq!(a(&w, Health::Unhealthy), Some(vec!["242.2.0.2".into()]));
    w.unreachable.insert(cid("east2"));
    assert_eq!(a(&w, Health::Unhealthy), Some(vec!["242.2.0.3".into()]));
    w.unreachable.insert(cid("west"));
    // Nothing healthy anywhere: the name does not exist.
    assert_eq!(a(&w, Health::Unhealthy), None);
}

#[test]
fn local_services() {
    let key = ServiceKey::new("ns", "api");
    let mut svc = LocalService {
        key: key.clone(),
        kube_type: "ClusterIP".into(),
        cluster_ips: vec!["10.96.0.10".parse().expect("ip")],
        headless: false,
        ports: vec![port(Some("http"), 80)],
        session_affinity: SessionAffinity::None,
        internal_traffic_policy: None,
        traffic_distribution: None,
        ip_families: vec![],
        endpoints: vec![ep("10.0.0.1", Some("api-0"), true, Health::Unknown)],
    };
    let names = local_names(&svc, 5);
    expect_records(
        &names,
        &[
            ("api.ns.svc.cluster.local.", RecordType::A, &["10.96.0.10"]),
            (
                "_http._tcp.api.ns.svc.cluster.local.",
                RecordType::SRV,
                &["0 100 80 api.ns.svc.cluster.local."],
            ),
            ("api.ns.svc.cluster.local.", RecordType::SRV, &["0 100 80 api.ns.svc.cluster.local."]),
        ],
    );
    assert_eq!(
        sorted_ptrs(&local_records(&svc, 5).ptrs),
        vec![("10.96.0.10".into(), "api.ns.svc.cluster.local.".into())]
    );
    svc.cluster_ips.clear();
    svc.headless = true;
    svc.endpoints.push(ep("10.0.0.2", None, false, Health::Unknown));
    let names = local_names(&svc, 5);
    expect_records(
        &names,
        &[
            ("api.ns.svc.cluster.local.", RecordType::A, &["10.0.0.1"]),
            ("api-0.api.ns.svc.cluster.local.", RecordType::A, &["10.0.0.1"]),
            (
                "_http._tcp.api.ns.svc.cluster.local.",
                RecordType::SRV,
                &["0 100 8080 api-0.api.ns.svc.cluster.local."],
            ),
            (
                "api.ns.svc.cluster.local.",
                RecordType::SRV,
                &["0 100 8080 api-0.api.ns.svc.cluster.local."],
            ),
        ],
    );
    assert_eq!(
        sorted_ptrs(&local_records(&svc, 5).ptrs),
        vec![("10.0.0.1".into(), "api-0.api.ns.svc.cluster.local.".into())],
        "ready endpoints only"
    );
    svc.kube_type = "ExternalName".into();
    assert!(local_names(&svc, 5).is_empty());
}

#[test]
fn static_names_and_soa() {
    let names = static_names(7, 42, Some("127.0.0.53".parse().expect("ip")));
    assert_eq!(
        get(&names, "dns-version.clusterset.local.", RecordType::TXT),
        Some(vec!["1.0.0".into()])
    );
    let soa = get(&names, "clusterset.local.", RecordType::SOA).expect("soa");
    assert!(soa[0].contains(" 42 ") && soa[0].ends_with(" 7"), "{soa:?}");
    assert!(get(&names, "cluster.local.", RecordType::SOA).is_some());
    assert!(flatten(&names).contains_key(&("svc.cluster.local.".into(), "ENT".into())));
    for zone in ["clusterset.local.", "cluster.local."] {
        let ns = format!("ns.dns.{zone}");
        assert_eq!(get(&names, zone, RecordType::NS), Some(vec![ns.clone()]));
        assert_eq!(get(&names, &ns, RecordType::A), Some(vec!["127.0.0.53".into()]));
    }
    // Listening on every address: the name server's name exists, without an address.
    let names = static_names(7, 42, None);
    assert!(flatten(&names).contains_key(&("ns.dns.cluster.local.".into(), "ENT".into())));
}
