//! A small clusterset for fuzzing and tests, seen from cluster `east` (region us):
//!
//! - `web.shop` ClusterSetIP 242.1.0.1 / fd00:242::1, exported by west only;
//! - `db.shop` headless: east 10.0.0.1 (db-0) + 10.0.0.2, west 10.2.0.1 (VIP 242.2.0.1);
//! - `big.shop` headless with 100 local endpoints (larger than a UDP answer);
//! - cluster.local: `api.shop` (ClusterIP 10.96.0.10) and `pods.shop` (headless).
//!
//! Built only with the `test-util` feature (the fuzz crate) or in unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use fedgate_discovery::exchange::delta::testing::{endpoint, exported, imported};
use fedgate_discovery::model::{
    ClusterId, ClusterState, Endpoint, EndpointVip, ExportedService, Health, ImportPort,
    ImportSnapshot, ImportedService, LocalService, Locality, ServiceKey, ServicePort, ServiceType,
    SessionAffinity,
};

pub(crate) fn cid(s: &str) -> ClusterId {
    ClusterId::new(s).expect("cluster id")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn ep(addr: &str, hostname: Option<&str>, health: Health) -> Endpoint {
    Endpoint { hostname: hostname.map(str::to_owned), ..endpoint(ip(addr), 8080, health) }
}

/// An export of `key` from `cluster` with one TCP port 80 named `http` and `endpoints`.
pub(crate) fn export(
    key: &ServiceKey,
    cluster: &str,
    ty: ServiceType,
    endpoints: Vec<Endpoint>,
) -> Arc<ExportedService> {
    Arc::new(exported(
        key.clone(),
        cluster,
        ty,
        vec![ServicePort::tcp(Some("http"), 80)],
        endpoints,
    ))
}

fn import(
    key: &ServiceKey,
    ty: ServiceType,
    ips: &[&str],
    clusters: Vec<Arc<ExportedService>>,
) -> Arc<ImportedService> {
    let all: BTreeSet<ClusterId> = clusters.iter().map(|c| c.cluster.clone()).collect();
    let ports = vec![ImportPort { port: ServicePort::tcp(Some("http"), 80), clusters: all }];
    let ips = ips.iter().map(|s| ip(s)).collect();
    Arc::new(imported(key.clone(), ty, ports, ips, cid("east"), clusters))
}

fn locality(region: &str, zone: &str) -> Locality {
    Locality { region: Some(region.into()), zone: Some(zone.into()), labels: BTreeMap::new() }
}

/// The clusterset of the tests, seen from `east` (region us):
/// - `web.shop` ClusterSetIP 242.1.0.1 / fd00:242::1, exported by west only;
/// - `db.shop` headless: east 10.0.0.1 (db-0) + 10.0.0.2, west 10.2.0.1 (VIP 242.2.0.1);
/// - `big.shop` headless with 100 local endpoints (truncation).
pub fn snapshot(east_db_health: Health) -> ImportSnapshot {
    let web = ServiceKey::new("shop", "web");
    let db = ServiceKey::new("shop", "db");
    let big = ServiceKey::new("shop", "big");
    let mut services = BTreeMap::new();
    services.insert(
        web.clone(),
        import(
            &web,
            ServiceType::ClusterSetIP,
            &["242.1.0.1", "fd00:242::1"],
            vec![export(
                &web,
                "west",
                ServiceType::ClusterSetIP,
                vec![ep("10.2.0.5", None, Health::Healthy)],
            )],
        ),
    );
    services.insert(
        db.clone(),
        import(
            &db,
            ServiceType::Headless,
            &[],
            vec![
                export(
                    &db,
                    "east",
                    ServiceType::Headless,
                    vec![
                        ep("10.0.0.1", Some("db-0"), east_db_health),
                        ep("10.0.0.2", None, east_db_health),
                    ],
                ),
                export(
                    &db,
                    "west",
                    ServiceType::Headless,
                    vec![ep("10.2.0.1", Some("db-0"), Health::Healthy)],
                ),
            ],
        ),
    );
    let many: Vec<Endpoint> =
        (1..=100).map(|i| ep(&format!("10.9.0.{i}"), None, Health::Healthy)).collect();
    services.insert(
        big.clone(),
        import(
            &big,
            ServiceType::Headless,
            &[],
            vec![export(&big, "east", ServiceType::Headless, many)],
        ),
    );
    let mut endpoint_vips = BTreeMap::new();
    endpoint_vips.insert(
        ip("242.2.0.1"),
        EndpointVip { key: db.clone(), cluster: cid("west"), endpoint: ip("10.2.0.1") },
    );
    ImportSnapshot {
        version: 1,
        local_cluster: Some(cid("east")),
        services,
        localities: [(cid("east"), locality("us", "us-a")), (cid("west"), locality("eu", "eu-a"))]
            .into_iter()
            .collect(),
        unreachable: BTreeSet::new(),
        endpoint_vips,
        flat: BTreeSet::new(),
    }
}

/// `east`'s own Services: `api.shop` (ClusterIP 10.96.0.10) and `pods.shop` (headless).
pub fn cluster_state() -> ClusterState {
    let mut state = ClusterState::default();
    let api = ServiceKey::new("shop", "api");
    let pods = ServiceKey::new("shop", "pods");
    let svc = |key: &ServiceKey, ips: Vec<IpAddr>, endpoints| {
        Arc::new(LocalService {
            key: key.clone(),
            kube_type: "ClusterIP".into(),
            headless: ips.is_empty(),
            cluster_ips: ips,
            ports: vec![ServicePort::tcp(Some("http"), 80)],
            session_affinity: SessionAffinity::None,
            internal_traffic_policy: None,
            traffic_distribution: None,
            ip_families: vec![],
            endpoints,
        })
    };
    state.services.insert(api.clone(), svc(&api, vec![ip("10.96.0.10")], vec![]));
    state.services.insert(
        pods.clone(),
        svc(&pods, vec![], vec![ep("10.0.1.1", Some("pod-a"), Health::Unknown)]),
    );
    state
}

// ---------------------------------------------------------------- fuzz cases

/// A request path over [`snapshot`] and [`cluster_state`] with default settings and no
/// upstream (names outside our zones get SERVFAIL without I/O).
pub fn request_path() -> crate::path::RequestPath {
    let settings = crate::DnsSettings::new(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    crate::path::RequestPath::new(&settings, vec![], &snapshot(Health::Healthy), &cluster_state())
}

/// One datagram through the UDP path, checked by [`crate::path::check_udp_answer`]; when the
/// fast path answers it, the slow path must give the same answer (rcode, flags, records).
pub async fn request_path_case(path: &crate::path::RequestPath, pkt: &[u8]) -> Result<(), String> {
    let answer = path.answer_udp(pkt).await;
    crate::path::check_udp_answer(pkt, answer.as_deref())?;
    let (mut key, mut fast) = (Vec::new(), Vec::new());
    if crate::path::answer_fast(path.table(), pkt, &mut key, &mut fast).is_none() {
        return Ok(());
    }
    let slow = path.answer_slow(pkt).await.ok_or("the slow path dropped a fast-path query")?;
    let (fast, slow) = (parse(&fast)?, parse(&slow)?);
    let sorted = |records: &[hickory_proto::rr::Record]| {
        // Owner names compare without case: the fast path points them at the client's
        // question (its 0x20 case), the slow path writes them as stored.
        let mut v: Vec<String> =
            records.iter().map(|r| r.to_string().to_ascii_lowercase()).collect();
        v.sort();
        v
    };
    let same = fast.metadata.response_code == slow.metadata.response_code
        && fast.metadata.authoritative == slow.metadata.authoritative
        && fast.metadata.truncation == slow.metadata.truncation
        && fast.metadata.recursion_desired == slow.metadata.recursion_desired
        && fast.metadata.checking_disabled == slow.metadata.checking_disabled
        && fast.queries == slow.queries
        && sorted(&fast.answers) == sorted(&slow.answers)
        && sorted(&fast.authorities) == sorted(&slow.authorities)
        && fast.edns.as_ref().map(|e| (e.max_payload(), e.flags().dnssec_ok))
            == slow.edns.as_ref().map(|e| (e.max_payload(), e.flags().dnssec_ok));
    if !same {
        return Err(format!("fast and slow paths disagree:\nfast: {fast:?}\nslow: {slow:?}"));
    }
    Ok(())
}

fn parse(bytes: &[u8]) -> Result<hickory_proto::op::Message, String> {
    hickory_proto::op::Message::from_vec(bytes).map_err(|e| format!("answer does not parse: {e}"))
}

/// The question the forwarder asked in [`forward_case`], and the ID it used.
pub const FORWARD_NAME: &str = "www.example.com.";
pub const FORWARD_ID: u16 = 0x1234;

/// One upstream datagram through the forwarder's side: [`crate::forward::accept_answer`] for
/// `www.example.com. A` sent with ID [`FORWARD_ID`], then, when accepted, the cache TTL and
/// the relay to a client (with and without EDNS) checked by
/// [`crate::path::check_udp_answer`], keeping the upstream's rcode and answers unless the
/// answer had to be truncated.
pub fn forward_case(upstream: &[u8]) -> Result<(), String> {
    use hickory_proto::op::{Edns, Message, Query, ResponseCode};
    use hickory_proto::rr::{DNSClass, Name, RecordType};
    use hickory_server::net::xfer::Protocol;
    use hickory_server::server::Request;

    let name = Name::from_ascii(FORWARD_NAME).map_err(|e| e.to_string())?;
    let question = crate::forward::Question {
        name: name.clone(),
        qtype: RecordType::A,
        qclass: DNSClass::IN,
        dnssec_ok: false,
        checking_disabled: false,
    };
    let Ok(msg) = crate::forward::accept_answer(&question, FORWARD_ID, upstream) else {
        return Ok(());
    };
    let [q] = msg.queries.as_slice() else {
        return Err(format!("accepted an answer with {} questions", msg.queries.len()));
    };
    if msg.metadata.id != FORWARD_ID || !q.name.eq_ignore_root(&name) {
        return Err(format!("accepted an answer to another query: {msg:?}"));
    }
    if !crate::forward::relayable(msg.metadata.response_code) {
        // The forwarder tries the next upstream instead (and finally answers SERVFAIL).
        return Ok(());
    }
    if crate::forward::cache_ttl(&msg).is_some_and(|ttl| ttl > 300) {
        return Err("cache ttl over the 300 s cap".into());
    }
    for edns in [None, Some(4096u16)] {
        let mut client = Message::query();
        client.metadata.id = 0xBEEF;
        client.metadata.recursion_desired = true;
        client.add_query(Query::query(
            Name::from_ascii("WWW.example.COM.").map_err(|e| e.to_string())?,
            RecordType::A,
        ));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            client.set_edns(e);
        }
        let pkt = client.to_vec().map_err(|e| e.to_string())?;
        let req = Request::from_bytes(
            pkt.clone(),
            "127.0.0.1:5353".parse().map_err(|_| "addr")?,
            Protocol::Udp,
        )
        .map_err(|e| format!("client query does not parse: {e}"))?;
        let mut reply = crate::handler::Reply::for_request(&req);
        reply.relay(msg.clone());
        let limit = edns.map_or(512, |_| crate::wire::EDNS_PAYLOAD);
        let (bytes, _) = crate::handler::encode(&req, &reply, limit);
        crate::path::check_udp_answer(&pkt, Some(&bytes))?;
        let relayed = parse(&bytes)?;
        if !relayed.metadata.truncation
            && relayed.metadata.response_code != ResponseCode::ServFail
            && (relayed.metadata.response_code != msg.metadata.response_code
                || relayed.answers.len() != msg.answers.len())
        {
            return Err(format!(
                "relay changed the answer:\nupstream: {msg:?}\nrelayed: {relayed:?}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    /// The committed seed corpora (real dig queries, real unbound answers) and every input a
    /// fuzz run ever broke an invariant with (`fuzz/regressions/<target>/`).
    fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut out = Vec::new();
        for dir in [fuzz.join("corpus").join(target), fuzz.join("regressions").join(target)] {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                if let Ok(bytes) = std::fs::read(&path) {
                    out.push((path, bytes));
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn request_path_corpus_and_regressions_hold_the_invariants() {
        let path = request_path();
        let cases = inputs("request_path");
        assert!(cases.len() > 100, "seed corpus fuzz/corpus/request_path is missing");
        for (file, pkt) in cases {
            if let Err(broken) = request_path_case(&path, &pkt).await {
                panic!("{}: {broken}", file.display());
            }
        }
    }

    #[test]
    fn forward_corpus_and_regressions_hold_the_invariants() {
        let cases = inputs("forward_response");
        assert!(cases.len() > 10, "seed corpus fuzz/corpus/forward_response is missing");
        let mut accepted = 0;
        for (file, pkt) in cases {
            if let Err(broken) = forward_case(&pkt) {
                panic!("{}: {broken}", file.display());
            }
            let q = crate::forward::Question {
                name: hickory_proto::rr::Name::from_ascii(FORWARD_NAME).expect("name"),
                qtype: hickory_proto::rr::RecordType::A,
                qclass: hickory_proto::rr::DNSClass::IN,
                dnssec_ok: false,
                checking_disabled: false,
            };
            accepted += usize::from(crate::forward::accept_answer(&q, FORWARD_ID, &pkt).is_ok());
        }
        // The seeds are real answers to the target's question: the fuzzer starts past the
        // ID/question match, not in front of it.
        assert!(accepted > 10, "only {accepted} seeds match the forwarded question");
    }
}
