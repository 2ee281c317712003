//! Tests of the import set: the state (pure) and the task around it.

use std::time::Instant;

use tokio::sync::{mpsc, watch};

use crate::mcs::Validity;

use super::*;
use crate::exchange::delta::testing::{bare_endpoint, eventually};
use crate::model::{ConditionStatus, Endpoint, Health, IpFamily, ServicePort};

fn cid(s: &str) -> ClusterId {
    ClusterId::new(s).unwrap()
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new("ns", name)
}

fn ep(ip: &str) -> Endpoint {
    bare_endpoint(ip, Health::Healthy)
}

fn exported(
    cluster: &str,
    name: &str,
    created: i64,
    service_type: ServiceType,
    endpoints: &[&str],
) -> Arc<ExportedService> {
    Arc::new(ExportedService {
        ip_families: vec![IpFamily::IPv4],
        created: jiff::Timestamp::from_second(1_700_000_000 + created).unwrap(),
        ..crate::exchange::delta::testing::exported(
            key(name),
            cluster,
            service_type,
            vec![ServicePort::tcp(Some("http"), 80)],
            endpoints.iter().map(|ip| ep(ip)).collect(),
        )
    })
}

fn set(cluster: &str, version: u64, services: Vec<Arc<ExportedService>>) -> Arc<ExportSet> {
    Arc::new(ExportSet {
        cluster: cid(cluster),
        locality: Locality { region: Some(format!("{cluster}-region")), ..Locality::default() },
        version,
        services: services.into_iter().map(|s| (s.key.clone(), s)).collect(),
    })
}

fn state() -> ImportState {
    ImportState::new(cid("east"), Allocator::open("242.1.0.0/16".parse().unwrap(), None).unwrap())
}

#[test]
fn merges_allocates_and_withdraws() {
    let mut st = state();
    st.set_exports(set(
        "east",
        1,
        vec![exported("east", "a", 2, ServiceType::ClusterSetIP, &["10.0.0.1"])],
    ));
    let changed = st.apply_peer(PeerUpdate::Exports(set(
        "west",
        1,
        vec![
            exported("west", "a", 1, ServiceType::ClusterSetIP, &["10.1.0.1"]),
            exported("west", "db", 1, ServiceType::Headless, &["10.1.0.5", "10.1.0.6"]),
        ],
    )));
    assert_eq!(changed, Changed { snapshot: true, statuses: false });
    let snap = st.snapshot();
    assert_eq!(snap.local_cluster, Some(cid("east")));
    assert_eq!(snap.services.len(), 2);
    let a = &snap.services[&key("a")];
    assert_eq!(a.clusters.keys().cloned().collect::<Vec<_>>(), vec![cid("east"), cid("west")]);
    assert_eq!(a.winner, cid("west"));
    assert_eq!(a.ips.len(), 1);
    assert!("242.1.0.0/16".parse::<ipnet::IpNet>().unwrap().contains(&a.ips[0]));
    let db = &snap.services[&key("db")];
    assert!(db.ips.is_empty(), "headless imports get no clusterset ip");
    assert_eq!(snap.endpoint_vips.len(), 2);
    let targets: BTreeSet<IpAddr> = snap.endpoint_vips.values().map(|v| v.endpoint).collect();
    assert_eq!(targets, BTreeSet::from(["10.1.0.5".parse().unwrap(), "10.1.0.6".parse().unwrap()]));
    assert!(snap.endpoint_vips.values().all(|v| v.cluster == cid("west") && v.key == key("db")));
    assert!(!snap.endpoint_vips.contains_key(&a.ips[0]));
    assert_eq!(snap.localities[&cid("west")].region.as_deref(), Some("west-region"));
    assert_eq!(st.allocator().len(), 3);

    // reachability marks, never withdraws
    let before = st.snapshot();
    st.apply_peer(PeerUpdate::Reachability {
        cluster: cid("west"),
        reachable: false,
        draining: false,
    });
    let down = st.snapshot();
    assert!(down.unreachable.contains(&cid("west")));
    assert!(Arc::ptr_eq(&down.services[&key("a")], &before.services[&key("a")]));
    assert_eq!(down.endpoint_vips, before.endpoint_vips);
    st.apply_peer(PeerUpdate::Reachability {
        cluster: cid("west"),
        reachable: true,
        draining: true,
    });
    assert!(st.snapshot().unreachable.contains(&cid("west")), "draining counts as unreachable");
    st.apply_peer(PeerUpdate::Reachability {
        cluster: cid("west"),
        reachable: true,
        draining: false,
    });
    assert!(st.snapshot().unreachable.is_empty());

    // withdrawal: db had only west, so it goes with its vips; a stays with the same ip
    let a_ip = a.ips[0];
    st.apply_peer(PeerUpdate::Withdrawn(cid("west")));
    let gone = st.snapshot();
    assert_eq!(gone.services.keys().cloned().collect::<Vec<_>>(), vec![key("a")]);
    assert_eq!(gone.services[&key("a")].ips, vec![a_ip]);
    assert_eq!(gone.services[&key("a")].winner, cid("east"));
    assert!(gone.endpoint_vips.is_empty());
    assert!(gone.unreachable.contains(&cid("west")));
    assert_eq!(st.allocator().len(), 1);

    // the last export leaving takes the import and its ip
    st.set_exports(set("east", 2, vec![]));
    assert!(st.snapshot().services.is_empty());
    assert!(st.allocator().is_empty());
}

#[test]
fn endpoint_vips_follow_endpoints_and_type_changes() {
    let mut st = state();
    let headless = |eps: &[&str]| {
        PeerUpdate::Exports(set(
            "west",
            1,
            vec![exported("west", "db", 1, ServiceType::Headless, eps)],
        ))
    };
    st.apply_peer(headless(&["10.1.0.1", "10.1.0.2"]));
    let first = st.snapshot().endpoint_vips;
    let vip_of = |vips: &BTreeMap<IpAddr, EndpointVip>, ep: &str| {
        let ep: IpAddr = ep.parse().unwrap();
        vips.iter().find(|(_, v)| v.endpoint == ep).map(|(ip, _)| *ip)
    };
    let kept = vip_of(&first, "10.1.0.2").unwrap();
    // one endpoint goes, one comes: the survivor keeps its vip, the gone one is released
    st.apply_peer(headless(&["10.1.0.2", "10.1.0.3"]));
    let second = st.snapshot().endpoint_vips;
    assert_eq!(second.len(), 2);
    assert_eq!(vip_of(&second, "10.1.0.2"), Some(kept));
    assert_eq!(vip_of(&second, "10.1.0.1"), None);
    assert_eq!(st.allocator().len(), 2);
    // the local cluster's own endpoints of the same headless service get no vip
    st.set_exports(set(
        "east",
        1,
        vec![exported("east", "db", 2, ServiceType::Headless, &["10.0.0.9"])],
    ));
    assert_eq!(st.snapshot().endpoint_vips.len(), 2);
    // the service turns ClusterSetIP: the vips go, a clusterset ip comes
    st.set_exports(set("east", 2, vec![]));
    st.apply_peer(PeerUpdate::Exports(set(
        "west",
        2,
        vec![exported("west", "db", 1, ServiceType::ClusterSetIP, &["10.1.0.2"])],
    )));
    let third = st.snapshot();
    assert!(third.endpoint_vips.is_empty());
    assert_eq!(third.services[&key("db")].ips.len(), 1);
    assert_eq!(st.allocator().len(), 1);
}

#[test]
fn ignores_peers_claiming_the_local_id() {
    let mut st = state();
    let changed = st.apply_peer(PeerUpdate::Exports(set(
        "east",
        1,
        vec![exported("east", "x", 1, ServiceType::ClusterSetIP, &[])],
    )));
    assert_eq!(changed, Changed::default());
    assert_eq!(st.withdraw(&cid("east")), Changed::default());
    // an export filed under the wrong cluster is skipped
    st.apply_peer(PeerUpdate::Exports(set(
        "west",
        1,
        vec![exported("south", "x", 1, ServiceType::ClusterSetIP, &[])],
    )));
    assert!(st.services().is_empty());
}

#[test]
fn local_statuses_follow_validity_and_conflicts() {
    let mut st = state();
    let validity = Arc::new(ValidityMap::from([
        (key("a"), Validity::Valid),
        (key("ghost"), Validity::NoService),
    ]));
    assert!(st.set_validity(validity).statuses);
    st.set_exports(set("east", 1, vec![exported("east", "a", 2, ServiceType::ClusterSetIP, &[])]));
    let reasons = |st: &ImportState, k: &str| -> Vec<(String, ConditionStatus, String)> {
        st.statuses()[&key(k)]
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status, c.reason.clone()))
            .collect()
    };
    assert_eq!(
        reasons(&st, "ghost")[0],
        ("Valid".into(), ConditionStatus::False, "NoService".into())
    );
    assert_eq!(reasons(&st, "a")[1], ("Ready".into(), ConditionStatus::True, "Exported".into()));
    assert_eq!(
        reasons(&st, "a")[2],
        ("Conflict".into(), ConditionStatus::False, "NoConflicts".into())
    );
    // an older peer export of another type: the local export gets the conflict too
    let changed = st.apply_peer(PeerUpdate::Exports(set(
        "west",
        1,
        vec![exported("west", "a", 1, ServiceType::Headless, &[])],
    )));
    assert!(changed.statuses);
    assert_eq!(
        reasons(&st, "a")[2],
        ("Conflict".into(), ConditionStatus::True, "TypeConflict".into())
    );
    let msg = &st.statuses()[&key("a")].conditions[2].message;
    assert!(
        msg.contains(
            "Using \"Headless\" from oldest service export in \"west\". 1/2 clusters disagree."
        ),
        "{msg}"
    );
    // the peer goes: the conflict goes
    st.withdraw(&cid("west"));
    assert_eq!(reasons(&st, "a")[2].1, ConditionStatus::False);
    // the export goes from the validity map: its status goes
    assert!(st.set_validity(Arc::new(ValidityMap::from([(key("a"), Validity::Valid)]))).statuses);
    assert!(!st.statuses().contains_key(&key("ghost")));
}

#[test]
fn clusterset_ips_survive_a_restart_and_unused_ones_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ips.json");
    let range: ipnet::IpNet = "242.1.0.0/24".parse().unwrap();
    let peer = set(
        "west",
        1,
        (0..20)
            .map(|i| exported("west", &format!("s{i}"), 1, ServiceType::ClusterSetIP, &[]))
            .collect(),
    );
    let first: BTreeMap<ServiceKey, Vec<IpAddr>> = {
        let mut st =
            ImportState::new(cid("east"), Allocator::open(range, Some(path.clone())).unwrap());
        st.apply_peer(PeerUpdate::Exports(Arc::clone(&peer)));
        st.persist();
        st.services().iter().map(|(k, v)| (k.clone(), v.ips.clone())).collect()
    };
    assert_eq!(first.len(), 20);
    // after a restart, a new service arrives before the old ones come back: it must not
    // take any of their ips
    let mut st = ImportState::new(cid("east"), Allocator::open(range, Some(path.clone())).unwrap());
    st.apply_peer(PeerUpdate::Exports(set(
        "south",
        1,
        vec![exported("south", "new", 1, ServiceType::ClusterSetIP, &[])],
    )));
    let new_ip = st.services()[&key("new")].ips[0];
    assert!(first.values().all(|ips| ips[0] != new_ip));
    st.apply_peer(PeerUpdate::Exports(set(
        "west",
        1,
        (0..10)
            .map(|i| exported("west", &format!("s{i}"), 1, ServiceType::ClusterSetIP, &[]))
            .collect(),
    )));
    for i in 0..10 {
        assert_eq!(st.services()[&key(&format!("s{i}"))].ips, first[&key(&format!("s{i}"))]);
    }
    // s10..s19 never came back: after the grace they are released
    assert_eq!(st.allocator().len(), 21);
    st.release_unused();
    assert_eq!(st.allocator().len(), 11);
}

fn small_range(range: &str) -> ImportState {
    ImportState::new(cid("east"), Allocator::open(range.parse().unwrap(), None).unwrap())
}

fn clusterset_ip_services(
    cluster: &str,
    names: impl IntoIterator<Item = String>,
) -> Vec<Arc<ExportedService>> {
    names
        .into_iter()
        .map(|n| exported(cluster, &n, 1, ServiceType::ClusterSetIP, &["10.1.0.1"]))
        .collect()
}

fn ips_of(st: &ImportState) -> BTreeMap<String, Option<IpAddr>> {
    st.services().iter().map(|(k, v)| (k.name.clone(), v.ips.first().copied())).collect()
}

fn waiting_names(st: &ImportState) -> Vec<String> {
    st.alloc_report().waiting.iter().map(|(k, _)| k.service_key().name.clone()).collect()
}

/// Issue 17, finding 3: a /27 (30 addresses) and 32 services. Two wait and are reported (with
/// a condition on the local export among them); deleting ten serves both in the same update.
#[test]
fn waiting_imports_are_reported_and_served_when_addresses_free() {
    let mut st = small_range("242.1.0.0/27");
    st.set_validity(Arc::new(ValidityMap::from([(key("zz"), Validity::Valid)])));
    let names = |r: std::ops::Range<usize>| r.map(|i| format!("s{i:02}"));
    st.apply_peer(PeerUpdate::Exports(set(
        "west",
        1,
        clusterset_ip_services("west", names(0..31)),
    )));
    st.set_exports(set("east", 1, clusterset_ip_services("east", ["zz".to_owned()])));
    let ips = ips_of(&st);
    assert_eq!(ips.len(), 32);
    assert_eq!(ips.values().filter(|ip| ip.is_none()).count(), 2);
    assert_eq!(ips["s30"], None);
    assert_eq!(ips["zz"], None);
    assert_eq!(waiting_names(&st), ["s30", "zz"]);
    let report = st.alloc_report();
    assert_eq!((report.allocated, report.reserved, report.free), (30, 0, 0));
    assert_eq!(report.waiting_services, 2);
    let json = report.to_json();
    assert_eq!(json.len(), 2);
    assert_eq!(json[0]["object"], "ServiceImport ns/s30");
    assert_eq!(json[0]["position"], 1);
    let reason = json[1]["reason"].as_str().unwrap();
    assert!(reason.contains("242.1.0.0/27 is full") && reason.contains("widen"), "{reason}");
    // the local export says so too, and nothing else changes in its conditions
    let conditions = &st.statuses()[&key("zz")].conditions;
    assert_eq!(conditions.len(), 4);
    assert_eq!(conditions[3].type_, CONDITION_CLUSTERSET_IP);
    assert_eq!(conditions[3].reason, REASON_RANGE_FULL);
    assert!(conditions[3].message.contains("242.1.0.0/27"), "{}", conditions[3].message);

    let changed = st.apply_peer(PeerUpdate::Exports(set(
        "west",
        2,
        clusterset_ip_services("west", names(10..31)),
    )));
    assert!(changed.snapshot && changed.statuses, "{changed:?}");
    let ips = ips_of(&st);
    assert!(ips["s30"].is_some() && ips["zz"].is_some(), "{ips:?}");
    assert!(waiting_names(&st).is_empty());
    assert_eq!(st.statuses()[&key("zz")].conditions.len(), 3);
    assert_eq!(st.alloc_report().free, 8);
}

/// A peer's lease expires: its imports' addresses stay reserved, newcomers take only free
/// ones (then wait), and the peer's return gives every import its old address; what it did
/// not bring back, and reservations whose grace ran out, go to the waiting imports.
#[test]
fn withdrawn_imports_keep_their_addresses_ahead_of_newcomers() {
    let mut st = small_range("242.1.0.0/27");
    let west =
        |r: std::ops::Range<usize>| clusterset_ip_services("west", r.map(|i| format!("w{i:02}")));
    st.apply_peer(PeerUpdate::Exports(set("west", 1, west(0..20))));
    let before = ips_of(&st);
    st.apply_peer(PeerUpdate::Withdrawn(cid("west")));
    assert!(st.services().is_empty());
    let report = st.alloc_report();
    assert_eq!((report.allocated, report.reserved, report.free), (0, 20, 10));

    let newcomers = clusterset_ip_services("south", (0..15).map(|i| format!("n{i:02}")));
    st.apply_peer(PeerUpdate::Exports(set("south", 1, newcomers)));
    let now = ips_of(&st);
    let taken: BTreeSet<IpAddr> = before.values().flatten().copied().collect();
    assert_eq!(now.values().flatten().count(), 10);
    assert!(now.values().flatten().all(|ip| !taken.contains(ip)), "a newcomer took a reserved ip");
    assert_eq!(waiting_names(&st), ["n10", "n11", "n12", "n13", "n14"]);

    // west returns without w19: the others get their addresses back; w19's stays reserved
    // (a returning cluster's first export set may be incomplete) and the newcomers wait
    st.apply_peer(PeerUpdate::Exports(set("west", 2, west(0..19))));
    let back = ips_of(&st);
    for i in 0..19 {
        let name = format!("w{i:02}");
        assert_eq!(back[&name], before[&name], "{name} did not get its address back");
    }
    assert_eq!(st.alloc_report().reserved, 1);
    assert_eq!(waiting_names(&st), ["n10", "n11", "n12", "n13", "n14"]);
    st.apply_peer(PeerUpdate::Exports(set("west", 3, west(0..20))));
    assert_eq!(ips_of(&st)["w19"], before["w19"]);

    // withdrawn again, and the grace runs out: the waiting newcomers get addresses
    st.set_withdrawn_grace(Duration::from_secs(60));
    st.apply_peer(PeerUpdate::Withdrawn(cid("west")));
    assert!(st.next_reservation_expiry().is_some());
    assert!(waiting_names(&st).len() == 5, "reserved addresses are not handed out");
    let changed = st.expire_reservations(Instant::now() + Duration::from_secs(61));
    assert!(changed.snapshot);
    assert!(waiting_names(&st).is_empty());
    assert!(ips_of(&st).values().all(Option::is_some));
    assert_eq!(st.next_reservation_expiry(), None);
    // a service of west whose grace ran out comes back when the range is full: it waits
    // ahead of keys that never had an address
    st.apply_peer(PeerUpdate::Exports(set(
        "south",
        2,
        clusterset_ip_services("south", (0..32).map(|i| format!("n{i:02}"))),
    )));
    st.apply_peer(PeerUpdate::Exports(set("west", 4, west(0..1))));
    assert_eq!(waiting_names(&st), ["w00", "n30", "n31"]);
    let queue = st.alloc_report().waiting;
    assert!(queue[0].1.held_before && !queue[1].1.held_before);
}

/// A remote headless endpoint waiting for a VIP leaves the queue when the endpoint goes.
#[test]
fn waiting_endpoint_vips_leave_with_their_endpoints() {
    let mut st = small_range("242.1.0.0/30");
    let headless = |v: u64, eps: &[&str]| {
        PeerUpdate::Exports(set(
            "west",
            v,
            vec![exported("west", "db", 1, ServiceType::Headless, eps)],
        ))
    };
    st.apply_peer(headless(1, &["10.1.0.1", "10.1.0.2", "10.1.0.3"]));
    assert_eq!(st.snapshot().endpoint_vips.len(), 2);
    assert_eq!(st.alloc_report().waiting_keys, 1);
    let json = st.alloc_report().to_json();
    assert!(
        json[0]["object"].as_str().unwrap().contains("endpoint 10.1.0.3 in cluster west"),
        "{json:?}"
    );
    st.apply_peer(headless(2, &["10.1.0.1", "10.1.0.2"]));
    assert_eq!(st.alloc_report().waiting_keys, 0);
    // and one that stays gets the VIP an endpoint that goes frees
    st.apply_peer(headless(3, &["10.1.0.1", "10.1.0.2", "10.1.0.4"]));
    assert_eq!(st.alloc_report().waiting_keys, 1);
    st.apply_peer(headless(4, &["10.1.0.2", "10.1.0.4"]));
    let vips = st.snapshot().endpoint_vips;
    let targets: BTreeSet<String> = vips.values().map(|v| v.endpoint.to_string()).collect();
    assert_eq!(targets, BTreeSet::from(["10.1.0.2".to_owned(), "10.1.0.4".to_owned()]));
}

/// 10k services from one peer; one endpoint changes: one import is merged again, every
/// other import keeps its Arc, and the update is fast.
#[test]
fn one_endpoint_change_in_ten_thousand_services_is_incremental() {
    const N: usize = 10_000;
    let mut st = state();
    let mut services: Vec<Arc<ExportedService>> = (0..N)
        .map(|i| {
            exported(
                "west",
                &format!("s{i:05}"),
                1,
                ServiceType::ClusterSetIP,
                &["10.1.0.1", "10.1.0.2"],
            )
        })
        .collect();
    let t0 = Instant::now();
    st.apply_peer(PeerUpdate::Exports(set("west", 1, services.clone())));
    let full = st.snapshot();
    let initial = t0.elapsed();
    assert_eq!(full.services.len(), N);

    let mut changed = (*services[4242]).clone();
    changed.endpoints[1].health = Health::Unhealthy;
    services[4242] = Arc::new(changed);
    let next_set = set("west", 2, services);
    let t1 = Instant::now();
    let c = st.apply_peer(PeerUpdate::Exports(next_set));
    let apply = t1.elapsed();
    let snap = st.snapshot();
    let update = t1.elapsed();
    assert!(c.snapshot);
    let rebuilt: Vec<&ServiceKey> = snap
        .services
        .iter()
        .filter(|(k, v)| !Arc::ptr_eq(v, &full.services[*k]))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(rebuilt, vec![&key("s04242")]);
    assert_eq!(snap.services[&key("s04242")].ips, full.services[&key("s04242")].ips);
    eprintln!(
        "import set, {N} services: initial merge {initial:?}; one endpoint change: diff+merge {apply:?}, with snapshot {update:?}"
    );
    assert!(apply < initial / 10, "incremental update {apply:?} vs initial {initial:?}");
}

#[test]
fn publishing_records_metrics() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    ::metrics::with_local_recorder(&recorder, || {
        let (_local_tx, local_rx) = watch::channel(set(
            "east",
            1,
            vec![exported("east", "a", 1, ServiceType::ClusterSetIP, &[])],
        ));
        let (_validity_tx, validity_rx) = watch::channel(Arc::new(ValidityMap::new()));
        let (_peers_tx, peers_rx) = mpsc::channel(1);
        let mut task = east_task(local_rx, validity_rx, peers_rx, "242.1.0.0/16");
        let changed = task.state.apply_peer(PeerUpdate::Exports(set(
            "west",
            1,
            vec![exported("west", "b", 1, ServiceType::ClusterSetIP, &[])],
        )));
        task.publish(changed, 1);
    });
    let values: BTreeMap<String, DebugValue> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(k, _, _, v)| (k.key().name().to_owned(), v))
        .collect();
    assert_eq!(values.get(METRIC_IMPORTED_SERVICES), Some(&DebugValue::Gauge(2.0.into())));
    assert_eq!(values.get(METRIC_IMPORT_UPDATES), Some(&DebugValue::Counter(1)));
}

#[tokio::test]
async fn task_follows_local_and_peer_updates() {
    let (local_tx, local_rx) = watch::channel(set(
        "east",
        1,
        vec![exported("east", "web", 5, ServiceType::ClusterSetIP, &["10.0.0.1"])],
    ));
    let (validity_tx, validity_rx) =
        watch::channel(Arc::new(ValidityMap::from([(key("web"), Validity::Valid)])));
    let (peers_tx, peers_rx) = mpsc::channel(16);
    let task = east_task(local_rx, validity_rx, peers_rx, "242.1.0.0/16")
        .with_restore_grace(Duration::from_millis(10));
    let mut snaps = task.subscribe();
    let mut statuses = task.subscribe_status();
    let first = Arc::clone(&snaps.borrow_and_update());
    assert_eq!(first.services.len(), 1);
    let web_ip = first.services[&key("web")].ips[0];
    assert_eq!(statuses.borrow_and_update()[&key("web")].conditions[1].reason, "Exported");
    let handle = tokio::spawn(task.run(tokio_util::sync::CancellationToken::new()));

    peers_tx
        .send(PeerUpdate::Exports(set(
            "west",
            1,
            vec![
                exported("west", "web", 1, ServiceType::ClusterSetIP, &["10.1.0.1"]),
                exported("west", "cache", 1, ServiceType::Headless, &["10.1.0.7"]),
            ],
        )))
        .await
        .unwrap();
    eventually(&mut snaps, "west imported", |s| s.services.len() == 2).await;
    {
        let s = snaps.borrow_and_update();
        assert_eq!(s.services[&key("web")].clusters.len(), 2);
        assert_eq!(s.services[&key("web")].ips, vec![web_ip]);
        assert_eq!(s.endpoint_vips.len(), 1);
        assert!(s.version > first.version);
    }

    peers_tx
        .send(PeerUpdate::Reachability { cluster: cid("west"), reachable: false, draining: false })
        .await
        .unwrap();
    eventually(&mut snaps, "west unreachable", |s| s.unreachable.contains(&cid("west"))).await;
    assert_eq!(snaps.borrow().services.len(), 2, "unreachable is not withdrawn");

    // local export changes to a conflicting type: the local status says so
    local_tx.send_replace(set(
        "east",
        2,
        vec![exported("east", "web", 5, ServiceType::Headless, &["10.0.0.1"])],
    ));
    eventually(&mut statuses, "local conflict", |m| {
        m.get(&key("web")).is_some_and(|s| s.conditions[2].reason == "TypeConflict")
    })
    .await;

    peers_tx.send(PeerUpdate::Withdrawn(cid("west"))).await.unwrap();
    eventually(&mut snaps, "west withdrawn", |s| {
        s.services.len() == 1 && s.endpoint_vips.is_empty()
    })
    .await;
    // with west gone, the local export is the only one: Headless now, no conflict
    eventually(&mut statuses, "conflict cleared", |m| {
        m.get(&key("web")).is_some_and(|s| s.conditions[2].reason == "NoConflicts")
    })
    .await;
    assert!(snaps.borrow().services[&key("web")].ips.is_empty());

    validity_tx.send_replace(Arc::new(ValidityMap::new()));
    eventually(&mut statuses, "status gone", |m| m.is_empty()).await;

    drop(peers_tx);
    drop(local_tx);
    tokio::time::timeout(Duration::from_secs(5), handle).await.unwrap().unwrap();
}

/// Issue 19: every replica serves the ClusterSetIPs the leader published. A pinned import
/// takes its address (moving an unpinned import that held it aside), an import without a pin
/// is allocated as before, and an address outside the range is ignored in vip mode and
/// served as it is in front kube mode.
#[test]
fn imports_take_the_published_clusterset_ips() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let mut st = small_range("242.1.0.0/28");
    st.apply_peer(PeerUpdate::Exports(set(
        "west",
        1,
        clusterset_ip_services("west", ["a", "b", "c"].map(String::from)),
    )));
    let before = ips_of(&st);
    let a_ip = before["a"].unwrap();
    // the leader gave b a's hash slot (a collision resolved otherwise there) and a another
    let other = (1..15)
        .map(|i| ip(&format!("242.1.0.{i}")))
        .find(|i| !before.values().any(|v| *v == Some(*i)))
        .unwrap();
    let pins = Pins::from([(key("b"), vec![a_ip]), (key("a"), vec![other])]);
    let changed = st.set_pins(&pins);
    assert!(changed.snapshot);
    let after = ips_of(&st);
    assert_eq!(after["b"], Some(a_ip));
    assert_eq!(after["a"], Some(other));
    assert_eq!(after["c"], before["c"], "an import without a pin keeps its address");
    assert_eq!(st.allocator().len(), 3);
    // the same pins again change nothing
    assert!(!st.set_pins(&pins).snapshot);

    // a pin that goes leaves the import where it is; two imports published with one address:
    // the first by name keeps it, the other is allocated
    let pins = Pins::from([(key("a"), vec![other]), (key("c"), vec![other])]);
    st.set_pins(&pins);
    let now = ips_of(&st);
    assert_eq!((now["a"], now["b"]), (Some(other), Some(a_ip)));
    assert!(now["c"].is_some() && now["c"] != Some(other));

    // vip mode: an address outside the range (an older range) is not served
    let outside = Pins::from([(key("a"), vec![ip("10.96.0.10")])]);
    st.set_pins(&outside);
    assert!(st.allocator().contains(ips_of(&st)["a"].unwrap()));
    // front kube mode: the derived Service's ClusterIPs are served as they are
    st.set_pins_outside_range(PinsOutsideRange::Serve);
    let dual = Pins::from([(key("a"), vec![ip("10.96.0.10"), ip("fd00::a")])]);
    st.set_pins(&dual);
    assert_eq!(st.services()[&key("a")].ips, vec![ip("10.96.0.10"), ip("fd00::a")]);
    assert_eq!(st.allocator().len(), 2, "a holds no address of the range");
}

#[tokio::test]
async fn the_task_takes_pins_and_says_when_they_are_in_a_snapshot() {
    let (_local_tx, local_rx) = watch::channel(set(
        "east",
        1,
        vec![exported("east", "web", 5, ServiceType::ClusterSetIP, &["10.0.0.1"])],
    ));
    let (_validity_tx, validity_rx) = watch::channel(Arc::new(ValidityMap::new()));
    let (_peers_tx, peers_rx) = mpsc::channel(16);
    let (pins_tx, pins_rx) = watch::channel(None);
    let task = east_task(local_rx, validity_rx, peers_rx, "242.1.0.0/16")
        .with_pins(pins_rx, PinsOutsideRange::Ignore);
    let mut snaps = task.subscribe();
    let mut applied = task.subscribe_pins_applied();
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(task.run(stop.clone()));
    assert!(!*applied.borrow_and_update(), "not before the ServiceImports were read");
    let pinned: IpAddr = "242.1.7.7".parse().unwrap();
    pins_tx.send_replace(Some(Arc::new(Pins::from([(key("web"), vec![pinned])]))));
    tokio::time::timeout(Duration::from_secs(5), applied.wait_for(|a| *a)).await.unwrap().unwrap();
    assert_eq!(snaps.borrow_and_update().services[&key("web")].ips, vec![pinned]);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), handle).await.unwrap().unwrap();
}

/// `/debug/imports` and `/debug/exports` as the import set renders them: the filters and the
/// summary read the ordered map, the rows keep the shape `fedgate status` reads.
#[test]
fn debug_views_filter_summarise_and_keep_their_shape() {
    let mut st = state();
    st.set_exports(set(
        "east",
        1,
        vec![
            exported("east", "a", 2, ServiceType::ClusterSetIP, &["10.0.0.1"]),
            exported("east", "b", 2, ServiceType::ClusterSetIP, &["10.0.0.2", "10.0.0.3"]),
        ],
    ));
    let snapshot = Arc::new(st.snapshot());
    let query = |pairs: &[(&str, &str)]| -> Query {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    };

    let all = imports_json(&snapshot, &query(&[]));
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
    let one = imports_json(&snapshot, &query(&[("service", "ns/b")]));
    let b = &one[0];
    assert_eq!((b["namespace"].as_str(), b["name"].as_str()), (Some("ns"), Some("b")), "{one}");
    assert_eq!(b["type"], "ClusterSetIP");
    assert_eq!(b["ports"][0]["port"], 80);
    assert_eq!(b["clusters"]["east"]["endpoints"].as_array().map(Vec::len), Some(2), "{one}");
    assert_eq!(b["ips"].as_array().map(Vec::len), Some(1), "{one}");
    assert_eq!(imports_json(&snapshot, &query(&[("service", "ns/none")])), serde_json::json!([]));
    let other_ns = imports_json(&snapshot, &query(&[("namespace", "other")]));
    assert_eq!(other_ns, serde_json::json!([]));
    let summary = imports_json(&snapshot, &query(&[("namespace", "ns"), ("summary", "1")]));
    assert_eq!(
        summary,
        serde_json::json!({"version": snapshot.version, "services": 2, "endpoints": 3})
    );

    st.set_validity(Arc::new(ValidityMap::from([(key("a"), Validity::Valid)])));
    let exports = crate::exports::statuses_json(st.statuses());
    let row = &exports[0];
    assert_eq!((row["namespace"].as_str(), row["name"].as_str()), (Some("ns"), Some("a")));
    assert_eq!(row["cluster"], "east");
    assert!(row["conditions"].as_array().is_some_and(|c| !c.is_empty()), "{exports}");
}

/// Every key's address, for comparing two replicas.
fn allocations(st: &ImportState) -> BTreeMap<AllocKey, IpAddr> {
    let alloc = st.allocator();
    alloc.keys().map(|k| (k.clone(), alloc.get(k).expect("held"))).collect()
}

/// What two peers export, into a /27 (30 addresses) that 24 keys share: twelve ClusterSetIP
/// services each (some slots collide), and a headless service each whose endpoints get VIPs.
fn colliding_peers() -> (PeerUpdate, PeerUpdate) {
    let peer = |cluster: &str, prefix: &str, ep: &str| {
        let mut services = clusterset_ip_services(cluster, (0..10).map(|i| format!("{prefix}{i}")));
        services.push(exported(cluster, &format!("{prefix}-db"), 1, ServiceType::Headless, &[ep]));
        PeerUpdate::Exports(set(cluster, 1, services))
    };
    (peer("west", "w", "10.1.0.1"), peer("south", "s", "10.2.0.1"))
}

/// Issue 19: replicas allocate without talking to each other. Each peer update allocating as
/// it arrives, two replicas that saw the peers in opposite orders disagree on colliding keys;
/// with the start-up batch they agree on every address, whichever order the peers came in and
/// whether the batch closed with the last peer or at the bound.
#[test]
fn replicas_agree_on_colliding_keys_whatever_order_peers_arrive_in() {
    let (west, south) = colliding_peers();
    let local =
        || set("east", 1, clusterset_ip_services("east", ["e0".to_owned(), "e1".to_owned()]));
    let replica = |hold: &[&str], updates: &[&PeerUpdate]| {
        let mut st = small_range("242.1.0.0/27");
        st.set_exports(local());
        st.hold_for_peers(hold.iter().map(|c| cid(c)));
        for update in updates {
            st.apply_peer((*update).clone());
        }
        st
    };
    // Without the start-up batch: the arrival order decides contested slots.
    let one = allocations(&replica(&[], &[&west, &south]));
    let other = allocations(&replica(&[], &[&south, &west]));
    assert_eq!(one.len(), 24);
    assert_ne!(one, other, "the test needs keys whose slots collide");

    // With it: nothing new is allocated until both peers sent exports, then all in key order.
    let mut st = replica(&["west", "south"], &[&west]);
    assert!(st.is_starting());
    let ips = ips_of(&st);
    assert!(ips["e0"].is_some() && ips["e1"].is_some(), "local imports allocated at once");
    assert!(ips["w0"].is_none() && ips["w9"].is_none(), "{ips:?}");
    let snap = st.snapshot();
    assert!(snap.endpoint_vips.is_empty());
    assert!(waiting_names(&st).is_empty(), "not waiting for a full range: not a problem");
    st.apply_peer(south.clone());
    assert!(!st.is_starting());
    let first = allocations(&st);
    assert_eq!(first.len(), 24);
    assert!(ips_of(&st).iter().all(|(name, ip)| name.ends_with("-db") || ip.is_some()));
    assert_eq!(st.snapshot().endpoint_vips.len(), 2);
    assert_eq!(allocations(&replica(&["west", "south"], &[&south, &west])), first);

    // A peer that never comes: the bound closes the batch, with the same result.
    let mut late = replica(&["west", "south", "north"], &[&south, &west]);
    assert!(late.is_starting() && ips_of(&late)["s0"].is_none());
    assert!(late.end_startup().snapshot);
    assert!(!late.is_starting());
    assert_eq!(allocations(&late), first);
}

/// After start-up, a batch of updates from several peers (taken from the channel at once)
/// allocates its new keys in key order too: the order inside the batch does not matter.
#[test]
fn a_batch_of_peer_updates_allocates_its_new_keys_in_key_order() {
    let (west, south) = colliding_peers();
    let batch = |updates: [&PeerUpdate; 2]| {
        let mut st = small_range("242.1.0.0/27");
        let (changed, counted) = st.apply_peers(updates.map(Clone::clone));
        assert!(changed.snapshot);
        assert_eq!(counted, 2);
        allocations(&st)
    };
    let one = batch([&west, &south]);
    assert_eq!(one.len(), 22);
    assert_eq!(batch([&south, &west]), one);
    // the same keys one update at a time, in the two orders, do not agree (they collide)
    let mut a = small_range("242.1.0.0/27");
    a.apply_peer(west.clone());
    a.apply_peer(south.clone());
    let mut b = small_range("242.1.0.0/27");
    b.apply_peer(south.clone());
    b.apply_peer(west.clone());
    assert_ne!(allocations(&a), allocations(&b));
}

/// The same over the task's channels: two import sets held for west and south get the peers in
/// opposite orders and publish the same ClusterSetIPs and VIPs; none before the last peer.
/// A third, whose awaited north never comes, publishes the same at the bound.
#[tokio::test]
async fn replicas_publish_the_same_clusterset_ips_whatever_order_peers_arrive_in() {
    let (west, south) = colliding_peers();
    let start = |peers: &[&str], bound: Duration| {
        let (local_tx, local_rx) = watch::channel(set(
            "east",
            1,
            clusterset_ip_services("east", ["e0".to_owned(), "e1".to_owned()]),
        ));
        let (_validity_tx, validity_rx) = watch::channel(Arc::new(ValidityMap::new()));
        let (peers_tx, peers_rx) = mpsc::channel(16);
        let task = east_task(local_rx, validity_rx, peers_rx, "242.1.0.0/27")
            .with_startup_hold(peers.iter().map(|c| cid(c)), bound);
        let snaps = task.subscribe();
        let stop = tokio_util::sync::CancellationToken::new();
        let handle = tokio::spawn(task.run(stop.clone()));
        (local_tx, peers_tx, snaps, stop, handle)
    };
    let published = |s: &ImportSnapshot| -> (BTreeMap<ServiceKey, Vec<IpAddr>>, Vec<IpAddr>) {
        let ips = s.services.iter().map(|(k, v)| (k.clone(), v.ips.clone())).collect();
        (ips, s.endpoint_vips.keys().copied().collect())
    };
    let all_allocated = |s: &Arc<ImportSnapshot>| {
        s.services.len() == 24
            && s.services
                .values()
                .all(|i| i.service_type == ServiceType::Headless || !i.ips.is_empty())
            && s.endpoint_vips.len() == 2
    };
    let long = Duration::from_secs(60);

    let (_l1, tx1, mut snaps1, stop1, h1) = start(&["west", "south"], long);
    tx1.send(west.clone()).await.unwrap();
    eventually(&mut snaps1, "west merged", |s| s.services.len() == 13).await;
    {
        let s = snaps1.borrow_and_update();
        assert!(s.services[&key("w0")].ips.is_empty(), "no address before the last peer");
        assert!(!s.services[&key("e0")].ips.is_empty(), "local imports keep theirs");
        assert!(s.endpoint_vips.is_empty());
    }
    tx1.send(south.clone()).await.unwrap();
    eventually(&mut snaps1, "all allocated", all_allocated).await;

    let (_l2, tx2, mut snaps2, stop2, h2) = start(&["west", "south"], long);
    tx2.send(south.clone()).await.unwrap();
    tx2.send(west.clone()).await.unwrap();
    eventually(&mut snaps2, "all allocated", all_allocated).await;

    let (_l3, tx3, mut snaps3, stop3, h3) =
        start(&["west", "south", "north"], Duration::from_millis(200));
    tx3.send(west.clone()).await.unwrap();
    tx3.send(south.clone()).await.unwrap();
    eventually(&mut snaps3, "allocated at the bound", all_allocated).await;

    let first = published(&snaps1.borrow());
    assert_eq!(published(&snaps2.borrow()), first);
    assert_eq!(published(&snaps3.borrow()), first);
    for (stop, handle) in [(stop1, h1), (stop2, h2), (stop3, h3)] {
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), handle).await.unwrap().unwrap();
    }
}

/// Completeness (what the DNS server waits for before it answers NXDOMAIN): the local set
/// after the first sync, then each awaited peer's first exports; a snapshot published before
/// is not complete, and the one after the last input is. A peer that never comes stops
/// mattering at the bound.
#[tokio::test]
async fn the_snapshot_is_complete_with_the_synced_local_set_and_every_peers_first_exports() {
    let start = |peers: &[&str], bound: Duration| {
        let (local_tx, local_rx) = watch::channel(set("east", 1, vec![]));
        let (_validity_tx, validity_rx) = watch::channel(Arc::new(ValidityMap::new()));
        let (peers_tx, peers_rx) = mpsc::channel(16);
        let (synced_tx, synced_rx) = watch::channel(false);
        let task = east_task(local_rx, validity_rx, peers_rx, "242.1.0.0/16").with_completion(
            synced_rx,
            peers.iter().map(|c| cid(c)),
            bound,
        );
        let (snaps, complete) = (task.subscribe(), task.subscribe_complete());
        let stop = tokio_util::sync::CancellationToken::new();
        let handle = tokio::spawn(task.run(stop.clone()));
        (local_tx, peers_tx, synced_tx, snaps, complete, stop, handle)
    };
    let wait = Duration::from_secs(5);
    let settle = || tokio::time::sleep(Duration::from_millis(50));
    let west = || {
        PeerUpdate::Exports(set(
            "west",
            1,
            vec![exported("west", "web", 1, ServiceType::ClusterSetIP, &["10.1.0.1"])],
        ))
    };

    let (local_tx, peers_tx, synced_tx, snaps, mut complete, stop, handle) =
        start(&["east", "west"], Duration::from_secs(60));
    assert!(!*complete.borrow_and_update(), "not complete before anything came");
    // The local set of the first sync, then its flag: west still missing.
    local_tx.send_replace(set(
        "east",
        2,
        vec![exported("east", "db", 5, ServiceType::ClusterSetIP, &["10.0.0.1"])],
    ));
    synced_tx.send_replace(true);
    settle().await;
    assert!(!*complete.borrow(), "west's first exports are still missing");
    peers_tx.send(west()).await.unwrap();
    tokio::time::timeout(wait, complete.wait_for(|c| *c)).await.unwrap().unwrap();
    let s = snaps.borrow();
    assert!(s.services.contains_key(&key("db")) && s.services.contains_key(&key("web")), "{s:?}");
    drop(s);
    stop.cancel();
    tokio::time::timeout(wait, handle).await.unwrap().unwrap();

    // West first, the local sync last; then a peer that never comes, past the bound.
    let (_local_tx, peers_tx, synced_tx, _snaps, mut complete, stop, handle) =
        start(&["west"], Duration::from_secs(60));
    peers_tx.send(west()).await.unwrap();
    settle().await;
    assert!(!*complete.borrow(), "the local set is not synced yet");
    synced_tx.send_replace(true);
    tokio::time::timeout(wait, complete.wait_for(|c| *c)).await.unwrap().unwrap();
    stop.cancel();
    tokio::time::timeout(wait, handle).await.unwrap().unwrap();

    let (_local_tx, _peers_tx, synced_tx, _snaps, mut complete, stop, handle) =
        start(&["north"], Duration::from_millis(200));
    synced_tx.send_replace(true);
    settle().await;
    assert!(!*complete.borrow(), "north is awaited until the bound");
    tokio::time::timeout(wait, complete.wait_for(|c| *c)).await.unwrap().unwrap();
    stop.cancel();
    tokio::time::timeout(wait, handle).await.unwrap().unwrap();
}

/// The import task of `east` over the given channels, allocating from `range`.
fn east_task(
    local_rx: watch::Receiver<Arc<ExportSet>>,
    validity_rx: watch::Receiver<Arc<ValidityMap>>,
    peers_rx: mpsc::Receiver<PeerUpdate>,
    range: &str,
) -> ImportSet {
    let alloc = Allocator::open(range.parse().unwrap(), None).unwrap();
    ImportSet::new(cid("east"), local_rx, validity_rx, peers_rx, alloc)
}

/// Flat network mode: a flat cluster's headless endpoints get no VIPs (those they had are
/// released when the mode changes), other clusters' still do, and the snapshot names the flat
/// clusters for DNS and the data plane.
#[test]
fn flat_clusters_get_no_endpoint_vips() {
    let mut st = state();
    let headless = |cluster: &str, eps: &[&str]| {
        PeerUpdate::Exports(set(
            cluster,
            1,
            vec![exported(cluster, "db", 1, ServiceType::Headless, eps)],
        ))
    };
    st.apply_peer(headless("west", &["10.1.0.1", "10.1.0.2"]));
    st.apply_peer(headless("north", &["10.3.0.1"]));
    assert_eq!(st.snapshot().endpoint_vips.len(), 3);
    let changed = st.set_flat(BTreeSet::from([cid("west")]));
    assert!(changed.snapshot);
    let snap = st.snapshot();
    assert_eq!(snap.flat, BTreeSet::from([cid("west")]));
    assert_eq!(snap.endpoint_vips.len(), 1, "only north's endpoint keeps a vip");
    assert!(snap.endpoint_vips.values().all(|v| v.cluster == cid("north")));
    assert_eq!(st.allocator().len(), 1, "west's vips are released");
    // New flat endpoints get none either; the same set again changes nothing.
    st.apply_peer(headless("west", &["10.1.0.1", "10.1.0.2", "10.1.0.3"]));
    assert_eq!(st.snapshot().endpoint_vips.len(), 1);
    assert_eq!(st.set_flat(BTreeSet::from([cid("west")])), Changed::default());
    // Back to gateway mode: VIPs again.
    st.set_flat(BTreeSet::new());
    assert_eq!(st.snapshot().endpoint_vips.len(), 4);
}
