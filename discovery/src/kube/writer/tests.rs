//! The writer's pure parts: desired objects, the diff, names, conditions, ports, settling.

use super::slices::{direct_targets, endpoint_json};
use super::*;
use crate::kube::source::LABEL_SLICE_MANAGED_BY;
use crate::model::{
    Condition, ConditionStatus, ConflictInfo, Endpoint, ExportedService, Health, ImportPort,
    IpFamily, LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER, MANAGED_BY, Protocol, ServicePort,
    ServiceType, SessionAffinity, TargetPort,
};
use serde_json::Value;

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
    let fk =
        |n: &str| FrontKey { key: ServiceKey::new("shop", n), port: 80, protocol: Protocol::Tcp };
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
fn a_new_leader_keeps_the_gateway_ports_the_last_one_wrote() {
    let snap = |names: &[&str]| {
        let mut s = ImportSnapshot::default();
        for n in names {
            let mut imp = import(&[("east", vec![])]);
            imp.key = ServiceKey::new("shop", *n);
            s.services.insert(imp.key.clone(), Arc::new(imp));
        }
        s
    };
    let fk =
        |n: &str| FrontKey { key: ServiceKey::new("shop", n), port: 80, protocol: Protocol::Tcp };
    let range = 20000..=20009;
    // the last leader gave b 20000 and a 20003 (a fresh allocation would give a 20000)
    let mut ports = FrontPorts::default();
    ports.keep(fk("b"), 20000);
    ports.keep(fk("a"), 20003);
    // a second claim on a key or a port is ignored
    ports.keep(fk("a"), 20005);
    ports.keep(fk("c"), 20000);
    assert!(ports.reconcile(&snap(&["a", "b", "c"]), &range).is_empty());
    assert_eq!(
        [ports.get(&fk("a")), ports.get(&fk("b")), ports.get(&fk("c"))],
        [Some(20003), Some(20000), Some(20001)]
    );
    // a kept port of an import port that is gone is freed
    let mut ports = FrontPorts::default();
    ports.keep(fk("gone"), 20000);
    ports.reconcile(&snap(&["a"]), &range);
    assert_eq!(ports.routes().into_iter().collect::<Vec<_>>(), [(20000, fk("a"))]);
}

#[test]
fn front_kube_derives_a_service_pointing_at_the_gateway() {
    let imp = import(&[("east", vec![ep("10.1.0.1", Some(8080))])]);
    let mut snap = ImportSnapshot::default();
    snap.services.insert(imp.key.clone(), Arc::new(imp.clone()));
    let settings = FrontSettings {
        pod_ip: "10.244.0.5".parse().expect("ip"),
        ports: 20000..=20999,
        gateway_service: None,
        replicas: Vec::new(),
        priority: Vec::new(),
        labels: BTreeMap::new(),
    };
    let mut ports = FrontPorts::default();
    ports.reconcile(&snap, &settings.ports);

    // before the derived Service has a ClusterIP the ServiceImport has no ips
    let front = || Some(Front { settings: &settings, ports: &ports, direct: Vec::new() });
    let objs = desired(&imp, front(), &[], V1BETA1);
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

    let objs = desired(&imp, front(), &["10.96.0.50".to_owned()], V1BETA1);
    assert_eq!(
        by_kind(&objs, WriteKind::ServiceImport)[0].body["spec"]["ips"],
        json!(["10.96.0.50"])
    );
}

#[test]
fn derived_slices_list_every_ready_replica_of_the_gateway_service() {
    use crate::exchange::delta::testing::local_service;
    let gw = ServiceKey::new("fedgate-system", "fedgate-replicas");
    let mut svc =
        local_service(gw.clone(), "10.96.0.2", &["10.244.0.7", "10.244.0.5", "10.244.1.9"]);
    svc.endpoints[2].ready = false; // draining: its readiness turned false
    let mut state = ClusterState::default();
    state.services.insert(gw.clone(), Arc::new(svc));
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    assert_eq!(ready_replicas(&state, Some(&gw)), [ip("10.244.0.5"), ip("10.244.0.7")]);
    assert!(ready_replicas(&state, None).is_empty(), "no gatewayService: none");
    let other = ServiceKey::new("fedgate-system", "missing");
    assert!(ready_replicas(&state, Some(&other)).is_empty());

    let imp = import(&[("east", vec![ep("10.1.0.1", Some(8080))])]);
    let mut snap = ImportSnapshot::default();
    snap.services.insert(imp.key.clone(), Arc::new(imp.clone()));
    let mut settings = FrontSettings {
        pod_ip: ip("10.244.0.5"),
        ports: 20000..=20999,
        gateway_service: Some(gw.clone()),
        replicas: ready_replicas(&state, Some(&gw)),
        priority: Vec::new(),
        labels: BTreeMap::new(),
    };
    let mut ports = FrontPorts::default();
    ports.reconcile(&snap, &settings.ports);
    let slice_addrs = |settings: &FrontSettings| {
        let front = Front { settings, ports: &ports, direct: Vec::new() };
        let objs = desired(&imp, Some(front), &[], V1BETA1);
        let name = derived_service_name(&imp.key);
        let slice = by_kind(&objs, WriteKind::EndpointSlice)
            .into_iter()
            .find(|d| d.body["metadata"]["name"] == json!(name))
            .expect("derived slice")
            .body
            .clone();
        slice["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .map(|e| e["addresses"][0].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(slice_addrs(&settings), [json!("10.244.0.5"), json!("10.244.0.7")]);
    // no replica known (the Service not found, none ready): this pod alone
    settings.replicas.clear();
    assert_eq!(slice_addrs(&settings), [json!("10.244.0.5")]);
}

/// Flat network mode in front kube: the derived Service lists a flat peer's endpoints (on
/// their own ports) instead of the gateway pods only while they alone are the best healthy
/// tier; a better local endpoint, a gateway-mode peer in the best tier, or an unreachable
/// flat peer keep (or bring back) the gateway pods.
#[test]
fn front_kube_lists_a_flat_peers_endpoints_while_they_are_the_best_tier() {
    use crate::failover::PriorityLabel;
    use crate::model::{LABEL_REGION, LABEL_SOURCE_CLUSTER as CLUSTER, Locality};
    let locality = |region: &str| Locality { region: Some(region.into()), ..Locality::default() };
    let settings = FrontSettings {
        pod_ip: "10.244.0.5".parse().expect("ip"),
        ports: 20000..=20999,
        gateway_service: None,
        replicas: Vec::new(),
        priority: PriorityLabel::parse_all(&[LABEL_REGION, CLUSTER]),
        labels: BTreeMap::new(),
    };
    // east (us) imports web from west (us, flat: tier 1) and north (eu, gateway: tier 2).
    let mut snap = ImportSnapshot {
        local_cluster: Some(cid("east")),
        localities: BTreeMap::from([
            (cid("east"), locality("us")),
            (cid("west"), locality("us")),
            (cid("north"), locality("eu")),
        ]),
        flat: BTreeSet::from([cid("west")]),
        ..ImportSnapshot::default()
    };
    let with = |clusters: &[(&str, Vec<Endpoint>)]| import(clusters);
    let targets = |imp: &ImportedService, snap: &ImportSnapshot| -> Vec<String> {
        direct_targets(imp, snap, &settings)
            .iter()
            .map(|(c, e)| format!("{c}/{}", e.address))
            .collect()
    };
    let west = || ("west", vec![ep("10.2.0.1", Some(8081)), ep("10.2.0.2", Some(8081))]);
    let north = || ("north", vec![ep("10.3.0.1", Some(8080))]);
    let imp = with(&[west(), north()]);
    assert_eq!(targets(&imp, &snap), ["west/10.2.0.1", "west/10.2.0.2"]);

    // The derived slices: west's endpoints on their own port, under the derived Service.
    snap.services.insert(imp.key.clone(), Arc::new(imp.clone()));
    let mut ports = FrontPorts::default();
    ports.reconcile(&snap, &settings.ports);
    let direct = direct_targets(&imp, &snap, &settings);
    let objs =
        desired(&imp, Some(Front { settings: &settings, ports: &ports, direct }), &[], V1BETA1);
    let name = derived_service_name(&imp.key);
    let derived: Vec<&DesiredObject> = by_kind(&objs, WriteKind::EndpointSlice)
        .into_iter()
        .filter(|d| d.body["metadata"]["labels"][LABEL_KUBE_SERVICE_NAME] == json!(name))
        .collect();
    assert_eq!(derived.len(), 1, "one slice for west, none for the gateway pods");
    let slice = &derived[0].body;
    assert_eq!(slice["metadata"]["name"], json!(format!("{name}-west-0")));
    assert_eq!(slice["ports"], json!([{"name": "http", "protocol": "TCP", "port": 8081}]));
    let addrs: Vec<&Value> = slice["endpoints"].as_array().expect("endpoints").iter().collect();
    assert_eq!(addrs.len(), 2);
    assert_eq!(addrs[0]["addresses"], json!(["10.2.0.1"]));
    assert_eq!(slice["metadata"]["labels"][LABEL_SOURCE_CLUSTER], json!("west"));

    // A local endpoint is better: the gateway pods (they pick it, and west's when it fails).
    let local = with(&[("east", vec![ep("10.1.0.1", Some(8080))]), west(), north()]);
    assert!(targets(&local, &snap).is_empty());
    // west unreachable or all unhealthy: north (gateway mode) is best, so the gateway pods.
    snap.unreachable.insert(cid("west"));
    assert!(targets(&imp, &snap).is_empty());
    snap.unreachable.clear();
    let mut sick = west();
    sick.1.iter_mut().for_each(|e| e.health = Health::Unhealthy);
    assert!(targets(&with(&[sick, north()]), &snap).is_empty());
    // north in the same tier as west (both us) and in gateway mode: the gateway pods.
    snap.localities.insert(cid("north"), locality("us"));
    let mut same_tier = settings.priority.clone();
    same_tier.truncate(1);
    let region_only = FrontSettings { priority: same_tier, ..settings.clone() };
    assert!(direct_targets(&imp, &snap, &region_only).is_empty());
    // No flat peer at all: never.
    snap.flat.clear();
    assert!(targets(&imp, &snap).is_empty());
}
