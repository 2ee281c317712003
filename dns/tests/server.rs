//! The DNS server against real sockets on loopback: a hickory-proto client over UDP and TCP,
//! and real `dig`. Upstreams are tiny authorities started by the tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fedgate_discovery::model::{ClusterState, Health, ImportSnapshot, ServiceKey};
use fedgate_dns::fixture::{cluster_state, snapshot};
use fedgate_dns::{DnsServer, DnsSettings, Upstream};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(5);

// The clusterset the tests serve (web.shop, db.shop, big.shop, cluster.local's api.shop and
// pods.shop) is `fedgate_dns::fixture`, the one the fuzz targets use.

// ---------------------------------------------------------------- a tiny upstream authority

/// Answers `www.example.test A 192.0.2.10` (TTL 60), `big.example.test TXT` (too big for
/// UDP: TC, full over TCP), NXDOMAIN with SOA for the rest. Counts the questions it gets.
struct FakeUpstream {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
}

fn upstream_answer(req: &Message, udp: bool) -> Message {
    let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    let Some(q) = req.queries.first() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return resp;
    };
    resp.add_query(q.clone());
    let name = q.name.to_lowercase().to_ascii();
    let zone = Name::from_ascii("example.test.").expect("name");
    match (name.as_str(), q.query_type()) {
        ("www.example.test.", RecordType::A) => {
            resp.add_answer(Record::from_rdata(
                q.name.clone(),
                60,
                RData::A(A::new(192, 0, 2, 10)),
            ));
        }
        ("big.example.test.", RecordType::TXT) if udp => resp.metadata.truncation = true,
        ("big.example.test.", RecordType::TXT) => {
            for i in 0..40 {
                let txt = TXT::new(vec![format!("{i:02}-{}", "x".repeat(60))]);
                resp.add_answer(Record::from_rdata(q.name.clone(), 60, RData::TXT(txt)));
            }
        }
        _ => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            let soa = SOA::new(zone.clone(), zone.clone(), 1, 60, 60, 60, 30);
            resp.add_authority(Record::from_rdata(zone, 30, RData::SOA(soa)));
        }
    }
    resp
}

async fn start_upstream() -> FakeUpstream {
    // The port UDP gets may be taken for TCP (another test's connection): try another.
    let mut attempts = 0;
    let (udp, tcp, addr) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream udp");
        let addr = udp.local_addr().expect("addr");
        match TcpListener::bind(addr).await {
            Ok(tcp) => break (udp, tcp, addr),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts < 16 => attempts += 1,
            Err(e) => panic!("bind upstream tcp on {addr}: {e}"),
        }
    };
    let queries = Arc::new(AtomicUsize::new(0));
    let count = queries.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, src)) = udp.recv_from(&mut buf).await {
            count.fetch_add(1, Ordering::SeqCst);
            if let Ok(req) = Message::from_vec(&buf[..n]) {
                let resp = upstream_answer(&req, true).to_vec().expect("encode");
                let _ = udp.send_to(&resp, src).await;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                while stream.read_exact(&mut len).await.is_ok() {
                    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if stream.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    let Ok(req) = Message::from_vec(&buf) else { return };
                    let resp = upstream_answer(&req, false).to_vec().expect("encode");
                    let mut out = (resp.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&resp);
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    FakeUpstream { addr, queries }
}

// ---------------------------------------------------------------- the server under test

struct Running {
    addr: SocketAddr,
    imports_tx: watch::Sender<Arc<ImportSnapshot>>,
    _cluster_tx: watch::Sender<Arc<ClusterState>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), fedgate_dns::DnsError>>,
}

impl Running {
    async fn stop(mut self) {
        self.stop.cancel();
        let done = tokio::time::timeout(WAIT, &mut self.task).await.expect("server stops in time");
        done.expect("join").expect("server result");
    }
}

async fn start(upstreams: Vec<SocketAddr>, upstream_timeout: Duration) -> Running {
    start_with(upstreams, upstream_timeout, fedgate_dns::settings::DEFAULT_MAX_INFLIGHT).await
}

async fn start_with(
    upstreams: Vec<SocketAddr>,
    upstream_timeout: Duration,
    max_inflight: usize,
) -> Running {
    let mut settings = DnsSettings::new("127.0.0.1:0".parse().expect("addr"));
    settings.upstream = upstreams.into_iter().map(Upstream::Address).collect();
    settings.upstream_timeout = upstream_timeout;
    settings.max_inflight = max_inflight;
    start_settings(settings).await
}

async fn start_settings(settings: DnsSettings) -> Running {
    let (imports_tx, imports_rx) = watch::channel(Arc::new(snapshot(Health::Healthy)));
    let (cluster_tx, cluster_rx) = watch::channel(Arc::new(cluster_state()));
    let server = DnsServer::new(settings, imports_rx, cluster_rx).expect("dns server binds");
    let addr = server.address();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server.run(stop.clone()));
    Running { addr, imports_tx, _cluster_tx: cluster_tx, stop, task }
}

// ---------------------------------------------------------------- clients

fn request(name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut msg = Message::query();
    msg.metadata.id = rand_id();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    if let Some(payload) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        msg.set_edns(e);
    }
    msg
}

fn rand_id() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    (NEXT.fetch_add(7919, Ordering::Relaxed) % 65_536) as u16
}

async fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    socket.send_to(bytes, server).await.expect("send");
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(WAIT, socket.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

async fn udp(server: SocketAddr, msg: &Message) -> Message {
    let bytes = udp_raw(server, &msg.to_vec().expect("encode")).await.expect("udp answer in time");
    let resp = Message::from_vec(&bytes).expect("answer parses");
    assert_eq!(resp.metadata.id, msg.metadata.id, "id echoed");
    resp
}

async fn tcp(server: SocketAddr, msg: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.expect("connect tcp");
    let bytes = msg.to_vec().expect("encode");
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&bytes);
    stream.write_all(&out).await.expect("write");
    let mut len = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut len))
        .await
        .expect("tcp answer in time")
        .expect("read len");
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await.expect("read body");
    Message::from_vec(&buf).expect("answer parses")
}

fn addrs(resp: &Message) -> Vec<String> {
    let mut v: Vec<String> = resp.answers.iter().map(|r| r.data.to_string()).collect();
    v.sort();
    v
}

fn has_soa(resp: &Message) -> bool {
    resp.authorities.iter().any(|r| r.record_type() == RecordType::SOA)
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn clusterset_ip_records_and_negative_answers() {
    let s = start(vec![], Duration::from_millis(200)).await;
    let a = udp(s.addr, &request("web.shop.svc.clusterset.local.", RecordType::A, None)).await;
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.metadata.authoritative);
    assert_eq!(addrs(&a), vec!["242.1.0.1"]);
    assert_eq!(a.answers[0].ttl, 5);
    // Case-insensitive, question echoed as asked.
    let a =
        udp(s.addr, &request("WeB.Shop.SVC.ClusterSet.Local.", RecordType::A, Some(1232))).await;
    assert_eq!(addrs(&a), vec!["242.1.0.1"]);
    assert_eq!(a.queries[0].name.to_ascii(), "WeB.Shop.SVC.ClusterSet.Local.");
    assert!(a.edns.is_some(), "OPT echoed");
    for (name, qtype, want) in [
        ("web.shop.svc.clusterset.local.", RecordType::AAAA, "fd00:242::1"),
        (
            "_http._tcp.web.shop.svc.clusterset.local.",
            RecordType::SRV,
            "0 100 80 web.shop.svc.clusterset.local.",
        ),
        ("dns-version.clusterset.local.", RecordType::TXT, "1.0.0"),
    ] {
        let resp = udp(s.addr, &request(name, qtype, None)).await;
        assert_eq!(addrs(&resp), vec![want], "{name} {qtype}");
    }

    // NODATA: the name exists, the type does not.
    for (name, qtype) in [
        ("web.shop.svc.clusterset.local.", RecordType::TXT),
        ("shop.svc.clusterset.local.", RecordType::A),
        ("_tcp.web.shop.svc.clusterset.local.", RecordType::A),
    ] {
        for resp in [
            udp(s.addr, &request(name, qtype, None)).await,
            tcp(s.addr, &request(name, qtype, None)).await,
        ] {
            assert_eq!(resp.metadata.response_code, ResponseCode::NoError, "{name} {qtype}");
            assert!(
                resp.answers.is_empty() && has_soa(&resp) && resp.metadata.authoritative,
                "{name} {qtype}"
            );
        }
    }
    // NXDOMAIN with SOA: `<clusterid>.<svc>` must not exist, nor unknown names.
    for name in [
        "west.web.shop.svc.clusterset.local.",
        "east.db.shop.svc.clusterset.local.",
        "nope.shop.svc.clusterset.local.",
        "nope.clusterset.local.",
    ] {
        let resp = udp(s.addr, &request(name, RecordType::A, None)).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(has_soa(&resp) && resp.metadata.authoritative, "{name}");
        assert_eq!(resp.authorities[0].ttl, 5);
    }
    s.stop().await;
}

/// A starting replica (the import set not yet complete) answers the names it knows, and
/// SERVFAIL, not NXDOMAIN, for the others: a resolver with several servers then asks a
/// sibling replica. Once complete, unknown names are NXDOMAIN again, and a name that arrived
/// with the completing snapshot is answered.
#[tokio::test]
async fn names_not_yet_known_get_servfail_until_the_import_set_is_complete() {
    let mut first = snapshot(Health::Healthy);
    let late = ServiceKey::new("shop", "db");
    let later = first.services.remove(&late).expect("the fixture has shop/db");
    let (imports_tx, imports_rx) = watch::channel(Arc::new(first.clone()));
    let (_cluster_tx, cluster_rx) = watch::channel(Arc::new(cluster_state()));
    let (complete_tx, complete_rx) = watch::channel(false);
    let settings = DnsSettings::new("127.0.0.1:0".parse().expect("addr"));
    let server = DnsServer::new(settings, imports_rx, cluster_rx)
        .expect("dns server binds")
        .with_complete(complete_rx);
    let addr = server.address();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server.run(stop.clone()));

    let ask = |name: &'static str| async move {
        let (u, t) = (
            udp(addr, &request(name, RecordType::A, None)).await,
            tcp(addr, &request(name, RecordType::A, None)).await,
        );
        assert_eq!(u.metadata.response_code, t.metadata.response_code, "{name}: udp and tcp");
        u
    };
    let known = ask("web.shop.svc.clusterset.local.").await;
    assert_eq!(addrs(&known), vec!["242.1.0.1"], "a known name is answered while starting");
    for name in ["db.shop.svc.clusterset.local.", "nope.clusterset.local."] {
        let resp = ask(name).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::ServFail, "{name} while starting");
        assert!(!resp.metadata.authoritative && resp.authorities.is_empty(), "{name}");
    }

    // The completing snapshot and the flag together: db resolves, nope is NXDOMAIN.
    let mut full = first;
    full.services.insert(late, later);
    full.version += 1;
    imports_tx.send_replace(Arc::new(full));
    complete_tx.send_replace(true);
    let deadline = Instant::now() + WAIT;
    loop {
        let nope = ask("nope.clusterset.local.").await;
        if nope.metadata.response_code == ResponseCode::NXDomain {
            assert!(has_soa(&nope) && nope.metadata.authoritative);
            break;
        }
        assert_eq!(nope.metadata.response_code, ResponseCode::ServFail);
        assert!(Instant::now() < deadline, "still SERVFAIL {WAIT:?} after completion");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let db = ask("db.shop.svc.clusterset.local.").await;
    assert_eq!(db.metadata.response_code, ResponseCode::NoError);
    assert!(!addrs(&db).is_empty(), "db answered once complete: {db:?}");
    stop.cancel();
    tokio::time::timeout(WAIT, task).await.expect("stops").expect("join").expect("result");
}

#[tokio::test]
async fn headless_records_and_failover_on_new_snapshot() {
    let s = start(vec![], Duration::from_millis(200)).await;
    let name = "db.shop.svc.clusterset.local.";
    let a = udp(s.addr, &request(name, RecordType::A, None)).await;
    assert_eq!(addrs(&a), vec!["10.0.0.1", "10.0.0.2"], "local tier only");
    for (host, want, why) in [
        ("db-0.east.db.shop.svc.clusterset.local.", "10.0.0.1", "a local hostname"),
        ("10-0-0-2.east.db.shop.svc.clusterset.local.", "10.0.0.2", "a generated name"),
        (
            "db-0.west.db.shop.svc.clusterset.local.",
            "242.2.0.1",
            "remote endpoints answer with their VIP",
        ),
    ] {
        let resp = udp(s.addr, &request(host, RecordType::A, None)).await;
        assert_eq!(addrs(&resp), vec![want], "{host}: {why}");
    }
    let srv =
        udp(s.addr, &request("_http._tcp.db.shop.svc.clusterset.local.", RecordType::SRV, None))
            .await;
    assert_eq!(
        addrs(&srv),
        vec![
            "0 100 8080 10-0-0-2.east.db.shop.svc.clusterset.local.",
            "0 100 8080 db-0.east.db.shop.svc.clusterset.local."
        ]
    );
    // A and AAAA carry the same subset: no IPv6 endpoint, so NODATA.
    let aaaa = udp(s.addr, &request(name, RecordType::AAAA, None)).await;
    assert!(aaaa.answers.is_empty() && has_soa(&aaaa));

    // Local endpoints turn unhealthy: the next tier (west, via its VIP) takes over.
    s.imports_tx.send(Arc::new(snapshot(Health::Unhealthy))).expect("send snapshot");
    let deadline = Instant::now() + WAIT;
    loop {
        let a = udp(s.addr, &request(name, RecordType::A, None)).await;
        if addrs(&a) == vec!["242.2.0.1"] {
            break;
        }
        assert!(Instant::now() < deadline, "failover not seen: {:?}", addrs(&a));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And back.
    s.imports_tx.send(Arc::new(snapshot(Health::Healthy))).expect("send snapshot");
    let deadline = Instant::now() + WAIT;
    while addrs(&udp(s.addr, &request(name, RecordType::A, None)).await)
        != vec!["10.0.0.1", "10.0.0.2"]
    {
        assert!(Instant::now() < deadline, "fail-back not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A service withdrawn from the snapshot disappears.
    let mut snap = snapshot(Health::Healthy);
    snap.services.remove(&ServiceKey::new("shop", "web"));
    s.imports_tx.send(Arc::new(snap)).expect("send snapshot");
    let deadline = Instant::now() + WAIT;
    while udp(s.addr, &request("web.shop.svc.clusterset.local.", RecordType::A, None))
        .await
        .metadata
        .response_code
        != ResponseCode::NXDomain
    {
        assert!(Instant::now() < deadline, "withdrawal not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn cluster_local_answers_only_this_clusters_services() {
    let s = start(vec![], Duration::from_millis(200)).await;
    let a = udp(s.addr, &request("api.shop.svc.cluster.local.", RecordType::A, None)).await;
    assert_eq!(addrs(&a), vec!["10.96.0.10"]);
    assert!(a.metadata.authoritative);
    let pods = udp(s.addr, &request("pods.shop.svc.cluster.local.", RecordType::A, None)).await;
    assert_eq!(addrs(&pods), vec!["10.0.1.1"]);
    let pod =
        udp(s.addr, &request("pod-a.pods.shop.svc.cluster.local.", RecordType::A, None)).await;
    assert_eq!(addrs(&pod), vec!["10.0.1.1"]);
    // `web` is exported by west, not a Service here: NXDOMAIN in cluster.local.
    let web = udp(s.addr, &request("web.shop.svc.cluster.local.", RecordType::A, None)).await;
    assert_eq!(web.metadata.response_code, ResponseCode::NXDomain);
    assert!(has_soa(&web));
    assert_eq!(web.authorities[0].name.to_ascii(), "cluster.local.");
    s.stop().await;
}

fn ptr_request(ip: &str) -> Message {
    let ip: std::net::IpAddr = ip.parse().expect("ip");
    let mut msg = Message::query();
    msg.metadata.id = rand_id();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from(ip), RecordType::PTR));
    msg
}

/// Reverse names: PTR records for ClusterSetIPs, endpoint VIPs and endpoint addresses, both
/// zones' names merged; NXDOMAIN inside the owned ClusterSetIP range, NODATA above records
/// there, everything else forwarded. SRV at the service name itself.
#[tokio::test]
async fn reverse_names_and_service_srv() {
    let up = start_upstream().await;
    let mut settings = DnsSettings::new("127.0.0.1:0".parse().expect("addr"));
    settings.upstream = vec![Upstream::Address(up.addr)];
    settings.owned_reverse =
        vec!["242.0.0.0/8".parse().expect("net"), "fd00:242::/64".parse().expect("net")];
    let s = start_settings(settings).await;
    let ptr = |ip: &'static str| {
        let addr = s.addr;
        async move { udp(addr, &ptr_request(ip)).await }
    };
    let cases = [
        ("242.1.0.1", vec!["web.shop.svc.clusterset.local."]),
        ("fd00:242::1", vec!["web.shop.svc.clusterset.local."]),
        ("242.2.0.1", vec!["db-0.west.db.shop.svc.clusterset.local."]),
        ("10.0.0.1", vec!["db-0.east.db.shop.svc.clusterset.local."]),
        ("10.96.0.10", vec!["api.shop.svc.cluster.local."]),
        ("10.0.1.1", vec!["pod-a.pods.shop.svc.cluster.local."]),
    ];
    for (ip, want) in cases {
        let resp = ptr(ip).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError, "{ip}");
        assert!(resp.metadata.authoritative, "{ip}");
        assert_eq!(addrs(&resp), want, "{ip}");
        // The same over TCP (the slow path decodes the pre-encoded set).
        let over_tcp = tcp(s.addr, &ptr_request(ip)).await;
        assert_eq!(addrs(&over_tcp), want, "{ip} over tcp");
    }
    // A remote pod address (gateway mode: reached through its VIP only) has no record of
    // ours: forwarded, and the fake upstream says NXDOMAIN, not authoritative for us.
    let before = up.queries.load(Ordering::SeqCst);
    let remote = ptr("10.2.0.1").await;
    assert_eq!(remote.metadata.response_code, ResponseCode::NXDomain);
    assert!(!remote.metadata.authoritative);
    assert_eq!(up.queries.load(Ordering::SeqCst), before + 1, "forwarded");
    // Inside the owned range without a record: NXDOMAIN of ours, in-addr.arpa SOA, not
    // forwarded.
    let nx = ptr("242.1.0.99").await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(nx.metadata.authoritative);
    assert_eq!(nx.authorities[0].name.to_ascii(), "in-addr.arpa.");
    let nx6 = ptr("fd00:242::99").await;
    assert_eq!(nx6.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(nx6.authorities[0].name.to_ascii(), "ip6.arpa.");
    assert_eq!(up.queries.load(Ordering::SeqCst), before + 1, "not forwarded");
    // Above records in the range: an empty non-terminal, never NXDOMAIN.
    let ent = udp(s.addr, &request("1.242.in-addr.arpa.", RecordType::PTR, None)).await;
    assert_eq!(ent.metadata.response_code, ResponseCode::NoError);
    assert!(ent.answers.is_empty() && has_soa(&ent) && ent.metadata.authoritative);
    // Another type at a PTR name: NODATA with the reverse zone's SOA.
    let nodata = udp(s.addr, &request("1.0.1.242.in-addr.arpa.", RecordType::A, None)).await;
    assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
    assert!(nodata.answers.is_empty());
    assert_eq!(nodata.authorities[0].name.to_ascii(), "in-addr.arpa.");

    // SRV at the service name: one per port, ClusterSetIP → the service name.
    let srv = udp(s.addr, &request("web.shop.svc.clusterset.local.", RecordType::SRV, None)).await;
    assert!(!srv.answers.is_empty(), "{srv:?}");
    assert!(
        addrs(&srv).iter().all(|r| r.ends_with(" web.shop.svc.clusterset.local.")),
        "{:?}",
        addrs(&srv)
    );
    s.stop().await;
}

#[tokio::test]
async fn forwards_other_names_with_a_cache() {
    let up = start_upstream().await;
    let s = start(vec![up.addr], Duration::from_secs(2)).await;
    let a = udp(s.addr, &request("www.example.test.", RecordType::A, None)).await;
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(!a.metadata.authoritative && a.metadata.recursion_available);
    assert_eq!(addrs(&a), vec!["192.0.2.10"]);
    let again = tcp(s.addr, &request("WWW.example.test.", RecordType::A, None)).await;
    assert_eq!(addrs(&again), vec!["192.0.2.10"]);
    assert_eq!(up.queries.load(Ordering::SeqCst), 1, "second answer came from the cache");
    let nx = udp(s.addr, &request("missing.example.test.", RecordType::A, None)).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(has_soa(&nx));
    // Upstream truncates over UDP: we retry over TCP upstream, then truncate to our client,
    // whose TCP retry gets everything.
    let big = udp(s.addr, &request("big.example.test.", RecordType::TXT, Some(1232))).await;
    assert!(big.metadata.truncation && big.answers.is_empty());
    let big = tcp(s.addr, &request("big.example.test.", RecordType::TXT, None)).await;
    assert_eq!(big.answers.len(), 40);
    s.stop().await;
}

#[tokio::test]
async fn failing_upstream_gives_servfail_in_bounded_time() {
    // Bound but never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let s = start(vec![silent.local_addr().expect("addr")], Duration::from_millis(400)).await;
    let started = Instant::now();
    let queries: Vec<_> = (0..20)
        .map(|i| {
            let addr = s.addr;
            tokio::spawn(async move {
                udp(addr, &request(&format!("n{i}.example.test."), RecordType::A, None)).await
            })
        })
        .collect();
    for q in queries {
        let resp = q.await.expect("join");
        assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
    }
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    drop(silent);
    s.stop().await;
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_come_whole_over_tcp() {
    let s = start(vec![], Duration::from_millis(200)).await;
    let name = "big.shop.svc.clusterset.local.";
    for edns in [None, Some(4096)] {
        let resp = udp(s.addr, &request(name, RecordType::A, edns)).await;
        assert!(resp.metadata.truncation, "TC with edns {edns:?}");
        assert!(resp.answers.is_empty());
        assert_eq!(resp.queries.len(), 1);
    }
    let resp = tcp(s.addr, &request(name, RecordType::A, None)).await;
    assert!(!resp.metadata.truncation);
    assert_eq!(resp.answers.len(), 100);
    s.stop().await;
}

#[tokio::test]
async fn protocol_errors() {
    let s = start(vec![], Duration::from_millis(200)).await;
    // Unsupported opcode.
    let mut status = request("web.shop.svc.clusterset.local.", RecordType::A, None);
    status.metadata.op_code = OpCode::Status;
    assert_eq!(udp(s.addr, &status).await.metadata.response_code, ResponseCode::NotImp);
    // Unsupported class.
    let mut chaos = request("web.shop.svc.clusterset.local.", RecordType::A, None);
    chaos.queries[0].query_class = DNSClass::CH;
    assert_eq!(udp(s.addr, &chaos).await.metadata.response_code, ResponseCode::Refused);
    let mut chaos = request("version.bind.", RecordType::TXT, None);
    chaos.queries[0].query_class = DNSClass::CH;
    assert_eq!(tcp(s.addr, &chaos).await.metadata.response_code, ResponseCode::Refused);
    // Zone transfers are refused.
    let axfr = request("clusterset.local.", RecordType::AXFR, None);
    assert_eq!(tcp(s.addr, &axfr).await.metadata.response_code, ResponseCode::Refused);
    // EDNS version 1: BADVERS.
    let mut v1 = request("web.shop.svc.clusterset.local.", RecordType::A, Some(1232));
    if let Some(e) = v1.edns.as_mut() {
        e.set_version(1);
    }
    let resp = udp(s.addr, &v1).await;
    // BADVERS and BADSIG share the value 16; hickory decodes it as the latter.
    assert_eq!(u16::from(resp.metadata.response_code), 16);
    assert_eq!(resp.edns.as_ref().map(Edns::version), Some(0));
    // Garbage after a valid header: FORMERR.
    let garbage =
        [0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x3f, 0x61];
    let resp = udp_raw(s.addr, &garbage).await.expect("formerr answer");
    let resp = Message::from_vec(&resp).expect("parses");
    assert_eq!(resp.metadata.id, 0x1234);
    assert_eq!(resp.metadata.response_code, ResponseCode::FormErr);
    // A name over 255 octets: FORMERR.
    let mut long = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
    for _ in 0..5 {
        long.push(63);
        long.extend(std::iter::repeat_n(b'a', 63));
    }
    long.extend_from_slice(&[0, 0, 1, 0, 1]);
    let resp = Message::from_vec(&udp_raw(s.addr, &long).await.expect("answer")).expect("parses");
    assert_eq!(resp.metadata.response_code, ResponseCode::FormErr);
    // Two questions: FORMERR.
    let mut two = request("web.shop.svc.clusterset.local.", RecordType::A, None);
    two.add_query(Query::query(
        Name::from_ascii("db.shop.svc.clusterset.local.").expect("name"),
        RecordType::A,
    ));
    assert_eq!(udp(s.addr, &two).await.metadata.response_code, ResponseCode::FormErr);
    // Too short to be DNS, or a response: no answer at all (no reflection).
    assert!(udp_raw(s.addr, &[1, 2, 3]).await.is_none());
    // A question compressed onto the header (found by fuzzing; hickory echoes questions
    // verbatim): FORMERR without the question, over UDP and TCP, and the answer parses.
    let compressed: &[u8] =
        &[0x55, 0x66, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'e', b'b', 0xC0, 2, 0, 1, 0, 1];
    let resp =
        Message::from_vec(&udp_raw(s.addr, compressed).await.expect("answer")).expect("parses");
    assert_eq!((resp.metadata.response_code, resp.queries.len()), (ResponseCode::FormErr, 0));
    let mut stream = TcpStream::connect(s.addr).await.expect("connect tcp");
    let mut framed = (compressed.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(compressed);
    stream.write_all(&framed).await.expect("write");
    let mut len = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut len)).await.expect("in time").expect("len");
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await.expect("read body");
    let resp = Message::from_vec(&buf).expect("tcp answer parses");
    assert_eq!((resp.metadata.response_code, resp.queries.len()), (ResponseCode::FormErr, 0));
    assert_eq!(resp.metadata.id, 0x5566);
    // No upstream at all: names outside our zones are refused at once, over UDP and TCP.
    let outside = request("www.example.org.", RecordType::A, None);
    let started = Instant::now();
    assert_eq!(udp(s.addr, &outside).await.metadata.response_code, ResponseCode::Refused);
    assert_eq!(tcp(s.addr, &outside).await.metadata.response_code, ResponseCode::Refused);
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    s.stop().await;
}

#[tokio::test]
async fn port_in_use_is_a_clear_error() {
    let (_itx, irx) = watch::channel(Arc::new(ImportSnapshot::default()));
    let (_ctx, crx) = watch::channel(Arc::new(ClusterState::default()));
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    // Hold the TCP port too: otherwise an ephemeral TCP socket of a concurrent test that
    // happens to have the same number makes the TCP bind fail first.
    let _tcp = std::net::TcpListener::bind(addr);
    let mut settings = DnsSettings::new(addr);
    settings.upstream = vec![];
    let err = DnsServer::new(settings, irx, crx).err().expect("must fail");
    let text = err.to_string();
    assert!(text.contains("cannot bind dns") && text.contains("127.0.0.1"), "{text}");
}

// ---------------------------------------------------------------- real dig

fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("`dig` must be installed for these tests (Debian: apt-get install bind9-dnsutils)");
    assert!(out.status.success(), "dig {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(server: SocketAddr, args: &[&str]) -> Vec<String> {
    let mut all = vec!["+short"];
    all.extend_from_slice(args);
    let mut v: Vec<String> = dig(server, &all).lines().map(str::to_owned).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_sees_every_record_kind() {
    let up = start_upstream().await;
    let s = start(vec![up.addr], Duration::from_secs(2)).await;
    let addr = s.addr;
    tokio::task::spawn_blocking(move || {
        assert_eq!(short(addr, &["web.shop.svc.clusterset.local", "A"]), vec!["242.1.0.1"]);
        assert_eq!(short(addr, &["web.shop.svc.clusterset.local", "AAAA"]), vec!["fd00:242::1"]);
        assert_eq!(
            short(addr, &["_http._tcp.web.shop.svc.clusterset.local", "SRV"]),
            vec!["0 100 80 web.shop.svc.clusterset.local."]
        );
        assert_eq!(short(addr, &["dns-version.clusterset.local", "TXT"]), vec!["\"1.0.0\""]);
        assert_eq!(short(addr, &["db.shop.svc.clusterset.local"]), vec!["10.0.0.1", "10.0.0.2"]);
        assert_eq!(short(addr, &["db-0.west.db.shop.svc.clusterset.local"]), vec!["242.2.0.1"]);
        assert_eq!(short(addr, &["api.shop.svc.cluster.local"]), vec!["10.96.0.10"]);
        assert_eq!(short(addr, &["www.example.test"]), vec!["192.0.2.10"]);
        // Negative answers: status and SOA.
        let nx = dig(addr, &["west.web.shop.svc.clusterset.local"]);
        assert!(nx.contains("status: NXDOMAIN") && nx.contains("flags: qr aa rd ra"), "{nx}");
        assert!(nx.contains("AUTHORITY: 1") && nx.contains("SOA"), "{nx}");
        let nodata = dig(addr, &["web.shop.svc.clusterset.local", "MX"]);
        assert!(
            nodata.contains("status: NOERROR")
                && nodata.contains("ANSWER: 0")
                && nodata.contains("AUTHORITY: 1"),
            "{nodata}"
        );
        let nxlocal = dig(addr, &["web.shop.svc.cluster.local"]);
        assert!(nxlocal.contains("status: NXDOMAIN"), "{nxlocal}");
        // Over TCP, and truncation with dig's automatic TCP retry.
        assert_eq!(short(addr, &["+tcp", "web.shop.svc.clusterset.local"]), vec!["242.1.0.1"]);
        let big = dig(addr, &["big.shop.svc.clusterset.local"]);
        assert!(
            big.contains("Truncated, retrying in TCP mode") && big.contains("ANSWER: 100"),
            "{big}"
        );
        let ignored = dig(addr, &["+ignore", "+noedns", "big.shop.svc.clusterset.local"]);
        assert!(
            ignored.contains(" tc ")
                || ignored.contains("flags: qr tc")
                || ignored.contains("tc rd"),
            "{ignored}"
        );
        // Mixed case and EDNS with the DO bit.
        assert_eq!(short(addr, &["+dnssec", "WEB.shop.SVC.clusterset.LOCAL"]), vec!["242.1.0.1"]);
    })
    .await
    .expect("dig checks");
    s.stop().await;
}

// ---------------------------------------------------------------- randomized request path

/// Bounded randomized run over the whole UDP request path (fast path, then the hickory slow
/// path) with mutated queries and raw noise: nothing panics, every answer parses and carries
/// the query's ID, responses are never answered.
#[tokio::test]
async fn randomized_requests_never_break_the_request_path() {
    use fedgate_dns::path::{RequestPath, check_udp_answer};
    use rand::{Rng, SeedableRng};

    let settings = DnsSettings::new("127.0.0.1:0".parse().expect("addr"));
    let path = RequestPath::new(&settings, vec![], &snapshot(Health::Healthy), &cluster_state());

    let seed: u64 = rand::random();
    eprintln!("randomized request seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let names = [
        "web.shop.svc.clusterset.local.",
        "db.shop.svc.clusterset.local.",
        "_http._tcp.db.shop.svc.clusterset.local.",
        "big.shop.svc.clusterset.local.",
        "api.shop.svc.cluster.local.",
        "x.example.test.",
    ];
    let qtypes = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::TXT,
        RecordType::ANY,
        RecordType::AXFR,
    ];
    let started = Instant::now();
    let mut runs = 0u32;
    while started.elapsed() < Duration::from_secs(3) && runs < 50_000 {
        runs += 1;
        let mut pkt = if rng.random_bool(0.2) {
            let len = rng.random_range(0..300);
            (0..len).map(|_| rng.random::<u8>()).collect::<Vec<u8>>()
        } else {
            let name = names[rng.random_range(0..names.len())];
            let qtype = qtypes[rng.random_range(0..qtypes.len())];
            let edns = rng.random_bool(0.5).then(|| rng.random_range(0..5000u16));
            request(name, qtype, edns).to_vec().expect("encode")
        };
        for _ in 0..rng.random_range(0..4) {
            match rng.random_range(0..3) {
                0 if !pkt.is_empty() => {
                    let i = rng.random_range(0..pkt.len());
                    pkt[i] = rng.random();
                }
                1 if !pkt.is_empty() => pkt.truncate(rng.random_range(0..pkt.len())),
                _ => pkt.push(rng.random()),
            }
        }
        // The same rules as the request_path fuzz target (fuzz/), on the same path the
        // server's receive loops run.
        let answer = path.answer_udp(&pkt).await;
        if let Err(broken) = check_udp_answer(&pkt, answer.as_deref()) {
            panic!("{broken}: query {pkt:?} answer {answer:?}");
        }
    }
    eprintln!("randomized requests: {runs} in {:?}", started.elapsed());
    assert!(runs > 1_000);
}

// ---------------------------------------------------------------- metrics

#[tokio::test]
async fn metrics_count_queries_by_zone_type_and_rcode() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let up = start_upstream().await;
    let s = start(vec![up.addr], Duration::from_secs(1)).await;
    udp(s.addr, &request("web.shop.svc.clusterset.local.", RecordType::A, None)).await;
    udp(s.addr, &request("web.shop.svc.clusterset.local.", RecordType::A, None)).await;
    udp(s.addr, &request("nope.shop.svc.clusterset.local.", RecordType::A, None)).await;
    tcp(s.addr, &request("api.shop.svc.cluster.local.", RecordType::SRV, None)).await;
    udp(s.addr, &request("www.example.test.", RecordType::A, None)).await;
    udp(s.addr, &request("www.example.test.", RecordType::A, None)).await;
    s.stop().await;

    let mut counters: BTreeMap<String, u64> = BTreeMap::new();
    let mut histograms = 0usize;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let k = key.key();
        let mut labels: Vec<String> =
            k.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        labels.sort();
        let id = format!("{}{{{}}}", k.name(), labels.join(","));
        match value {
            DebugValue::Counter(v) => {
                counters.insert(id, v);
            }
            DebugValue::Histogram(v) => histograms += v.len(),
            DebugValue::Gauge(_) => {}
        }
    }
    let get = |id: &str| counters.get(id).copied().unwrap_or(0);
    assert_eq!(
        get("fedgate_dns_queries_total{qtype=A,rcode=NOERROR,zone=clusterset}"),
        2,
        "{counters:#?}"
    );
    assert_eq!(
        get("fedgate_dns_queries_total{qtype=A,rcode=NXDOMAIN,zone=clusterset}"),
        1,
        "{counters:#?}"
    );
    assert_eq!(
        get("fedgate_dns_queries_total{qtype=SRV,rcode=NOERROR,zone=cluster}"),
        1,
        "{counters:#?}"
    );
    assert_eq!(
        get("fedgate_dns_queries_total{qtype=A,rcode=NOERROR,zone=forward}"),
        2,
        "{counters:#?}"
    );
    assert_eq!(get("fedgate_dns_cache_hits_total{}"), 1, "{counters:#?}");
    assert_eq!(get("fedgate_dns_cache_misses_total{}"), 1, "{counters:#?}");
    assert_eq!(get("fedgate_dns_forwarded_total{result=ok}"), 1, "{counters:#?}");
    assert!(histograms >= 6, "latency samples: {histograms}");
}

// ---------------------------------------------------------------- load

/// Concurrent bursts of fast-path, slow-path and forwarded queries: every one is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_is_answered_under_concurrent_load() {
    let up = start_upstream().await;
    let s = start(vec![up.addr], Duration::from_secs(2)).await;
    const CLIENTS: usize = 8;
    const ROUNDS: usize = 20;
    const BURST: usize = 25;
    let names = [
        "web.shop.svc.clusterset.local.",
        "nope.shop.svc.clusterset.local.",
        "api.shop.svc.cluster.local.",
        "www.example.test.",
        "db.shop.svc.clusterset.local.",
    ];
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let addr = s.addr;
            tokio::spawn(async move {
                let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
                let mut buf = vec![0u8; 4096];
                let mut answered = 0usize;
                for round in 0..ROUNDS {
                    let mut ids = BTreeSet::new();
                    for i in 0..BURST {
                        let mut msg = request(names[(c + i) % names.len()], RecordType::A, None);
                        msg.metadata.id = (round * BURST + i) as u16;
                        ids.insert(msg.metadata.id);
                        socket.send_to(&msg.to_vec().expect("encode"), addr).await.expect("send");
                    }
                    while !ids.is_empty() {
                        let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
                            .await
                            .unwrap_or_else(|_| {
                                panic!("client {c} round {round}: {} unanswered", ids.len())
                            })
                            .expect("recv");
                        let resp = Message::from_vec(&buf[..n]).expect("parses");
                        assert!(resp.metadata.response_code != ResponseCode::ServFail, "{resp:?}");
                        if ids.remove(&resp.metadata.id) {
                            answered += 1;
                        }
                    }
                }
                answered
            })
        })
        .collect();
    let mut total = 0;
    for c in clients {
        total += c.await.expect("client");
    }
    assert_eq!(total, CLIENTS * ROUNDS * BURST);
    eprintln!("{total} queries answered in {:?}", started.elapsed());
    s.stop().await;
}

/// With the slow path saturated (one slot, held by a query to a silent upstream), further
/// slow-path queries get SERVFAIL at once and fast-path queries are still answered.
#[tokio::test]
async fn overload_answers_servfail_instead_of_dropping() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let s = start_with(vec![silent.local_addr().expect("addr")], Duration::from_secs(3), 1).await;
    let addr = s.addr;
    let hold = tokio::spawn(async move {
        udp(addr, &request("hold.example.test.", RecordType::A, None)).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    for i in 0..5 {
        let resp = udp(s.addr, &request(&format!("n{i}.example.test."), RecordType::A, None)).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(resp.queries.len(), 1, "question echoed");
    }
    assert!(started.elapsed() < Duration::from_secs(1), "immediate: {:?}", started.elapsed());
    let fast = udp(s.addr, &request("web.shop.svc.clusterset.local.", RecordType::A, None)).await;
    assert_eq!(addrs(&fast), vec!["242.1.0.1"]);
    assert_eq!(hold.await.expect("join").metadata.response_code, ResponseCode::ServFail);
    drop(silent);
    s.stop().await;
}
