//! The tunnel and discovery's peer sessions over real loopback UDP: exchange between two and
//! three gateways, leases, data streams, refused handshakes, garbage on control streams,
//! propagation times. (Moved from the tunnel crate when the sessions moved to discovery.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedgate_discovery::exchange::delta::testing::{export_set, service};
use fedgate_discovery::model::{ClusterId, ExportSet, Health, PeerUpdate, ServiceKey};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use fedgate_discovery::peers::{DEFAULT_PEER_LEASE, PeersHandle};
use fedgate_tunnel::endpoint::{KIND_CONTROL, TunnelSettings};
use fedgate_tunnel::identity::{Identity, LeafValidity};
use fedgate_tunnel::metrics::PEER_HANDSHAKE_FAILURES_TOTAL;
use fedgate_tunnel::testing::TestPki;
use fedgate_tunnel::tls::{Credentials, RejectionSink, client_crypto};
use fedgate_tunnel::{IdentityFiles, IncomingStream, PeerConfig, PeerHandle, ReloadStatus};

use super::{Peering, PeeringError};

const WAIT: Duration = Duration::from_secs(10);

fn id(s: &str) -> ClusterId {
    ClusterId::new(s).expect("valid cluster id")
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

struct Gateway {
    id: ClusterId,
    address: SocketAddr,
    handle: PeerHandle,
    sessions: PeersHandle,
    local: watch::Sender<Arc<ExportSet>>,
    updates: mpsc::Receiver<PeerUpdate>,
    incoming: mpsc::Receiver<IncomingStream>,
    reload: watch::Receiver<ReloadStatus>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Gateway {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("tunnel stops in time")
            .expect("task ok");
    }

    /// Waits for an update matching `pred`, skipping others.
    async fn wait_for(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&PeerUpdate) -> bool,
    ) -> PeerUpdate {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.updates.recv()).await {
                Ok(Some(u)) if pred(&u) => return u,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("{}: updates closed while waiting for {what}", self.id),
                Err(_) => panic!("{}: timed out waiting for {what}", self.id),
            }
        }
    }

    async fn wait_exports(&mut self, from: &str, version: u64) -> Arc<ExportSet> {
        let from = id(from);
        match self
            .wait_for(&format!("exports of {from} v{version}"), |u| {
                matches!(u, PeerUpdate::Exports(s) if s.cluster == from && s.version == version)
            })
            .await
        {
            PeerUpdate::Exports(set) => set,
            _ => unreachable!("filtered above"),
        }
    }
}

fn start_with(
    settings: TunnelSettings,
    lease: Duration,
    identity: Identity,
    exports: ExportSet,
) -> Result<Gateway, PeeringError> {
    start_with_capacity(settings, lease, identity, exports, 1024)
}

fn start_with_capacity(
    settings: TunnelSettings,
    lease: Duration,
    identity: Identity,
    exports: ExportSet,
    capacity: usize,
) -> Result<Gateway, PeeringError> {
    let (local, local_rx) = watch::channel(Arc::new(exports));
    let (updates_tx, updates) = mpsc::channel(capacity);
    let (incoming_tx, incoming) = mpsc::channel(16);
    let me = settings.local.clone();
    let ready = watch::channel(true).1;
    let peering =
        Peering::new(settings, lease, identity, local_rx, ready, updates_tx, incoming_tx)?;
    let address = peering.address();
    let handle = peering.handle();
    let sessions = peering.sessions();
    let reload = peering.tunnel().reload_status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(peering.run(shutdown.clone()));
    Ok(Gateway {
        id: me,
        address,
        handle,
        sessions,
        local,
        updates,
        incoming,
        reload,
        shutdown,
        task,
    })
}

/// Starts gateway `me` of `pki` with `services` exports, knowing `peers` (id, address).
fn start(
    pki: &TestPki,
    me: &str,
    listen: SocketAddr,
    peers: &[(&str, SocketAddr)],
    lease: Duration,
    services: usize,
) -> Gateway {
    let settings = TunnelSettings::new(
        listen,
        pki.clusterset(),
        id(me),
        peers.iter().map(|(p, a)| PeerConfig::new(id(p), a.to_string())).collect(),
    );
    start_with(settings, lease, pki.issue(me), export_set(me, 1, services)).expect("tunnel starts")
}

/// Credentials of a correct identity for `me`.
fn credentials(pki: &TestPki, me: &str) -> Arc<Credentials> {
    Credentials::new(&pki.issue(me), pki.clusterset(), &id(me)).expect("credentials")
}

/// An address nobody listens on (the acceptor side never dials, so it never matters).
fn unused() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9))
}

/// Gateways west (accepts: higher id) and east (dials west) of `pki`, with that many exported
/// services each, returned once east has seen west reachable.
async fn connected_pair(
    pki: &TestPki,
    lease: Duration,
    west_services: usize,
    east_services: usize,
) -> (Gateway, Gateway) {
    let west = start(pki, "west", loopback(), &[("east", unused())], lease, west_services);
    let mut east = start(pki, "east", loopback(), &[("west", west.address)], lease, east_services);
    east.wait_for("west reachable", |u| {
        matches!(u, PeerUpdate::Reachability { cluster, reachable: true, .. } if cluster.as_str() == "west")
    })
    .await;
    (west, east)
}

#[tokio::test]
async fn two_gateways_exchange_exports_streams_and_draining() {
    let pki = TestPki::new("demo");
    // Heartbeats every 500 ms; generous so a loaded CI machine does not miss a lease.
    let lease = Duration::from_millis(1500);
    let (mut west, mut east) = connected_pair(&pki, lease, 3, 2).await;
    let got = east.wait_exports("west", 1).await;
    assert_eq!(*got, export_set("west", 1, 3), "full sync east <- west");
    let at_west = west.wait_exports("east", 1).await;
    assert_eq!(*at_west, export_set("east", 1, 2), "full sync west <- east");

    // Delta: one service changes, one is removed.
    let mut v2 = (**west.local.borrow()).clone();
    v2.version = 2;
    let k0 = ServiceKey::new("ns", "svc-0");
    let mut changed = (*v2.services[&k0]).clone();
    changed.endpoints[0].health = Health::Unhealthy;
    v2.services.insert(k0.clone(), Arc::new(changed));
    v2.services.remove(&ServiceKey::new("ns", "svc-2"));
    west.local.send_replace(Arc::new(v2.clone()));
    let after = east.wait_exports("west", 2).await;
    assert_eq!(*after, v2);
    let k1 = ServiceKey::new("ns", "svc-1");
    assert!(Arc::ptr_eq(&after.services[&k1], &got_service(&got, &k1)), "unchanged kept its Arc");

    // Heartbeats keep the lease: two leases of quiet withdraw nothing.
    let quiet = tokio::time::timeout(lease * 2, async {
        loop {
            if let Some(PeerUpdate::Withdrawn(c)) = east.updates.recv().await {
                return c;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "lease expired despite heartbeats: {quiet:?}");
    let status = east.sessions.status().borrow().clone();
    let w = status.iter().find(|s| s.cluster.as_str() == "west").expect("west in status");
    assert!(w.connected && w.exports_version == Some(2) && !w.exports_withdrawn, "{w:?}");
    assert!(w.last_seen_secs.is_some_and(|s| s < lease.as_secs_f64()), "{w:?}");

    // A data stream each way: kind byte consumed, bytes flow, peer named.
    roundtrip(&east.handle, &east.id, &west.id, &mut west.incoming).await;
    roundtrip(&west.handle, &west.id, &east.id, &mut east.incoming).await;
    assert!(east.handle.is_connected(&id("west")));
    let err = east.handle.open_stream(&id("nowhere")).await.expect_err("no such peer");
    assert_eq!(err.reason(), "not_connected");

    // Draining travels at once.
    west.sessions.set_draining(true);
    east.wait_for("west draining", |u| {
        matches!(u, PeerUpdate::Reachability { reachable: true, draining: true, .. })
    })
    .await;

    east.stop().await;
    west.wait_for("east down", |u| matches!(u, PeerUpdate::Reachability { reachable: false, .. }))
        .await;
    west.stop().await;
}

async fn roundtrip(
    from: &PeerHandle,
    from_id: &ClusterId,
    to: &ClusterId,
    incoming: &mut mpsc::Receiver<IncomingStream>,
) {
    let (mut send, mut recv, _) = from.open_stream(to).await.expect("open stream");
    send.write_all(b"ping").await.expect("write");
    let mut s =
        tokio::time::timeout(WAIT, incoming.recv()).await.expect("in time").expect("stream");
    assert_eq!(&s.peer, from_id);
    let mut buf = [0u8; 4];
    s.recv.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"ping");
    s.send.write_all(b"pong").await.expect("write back");
    s.send.finish().expect("finish");
    let back = recv.read_to_end(1024).await.expect("read back");
    assert_eq!(back, b"pong");
}

fn got_service(
    set: &ExportSet,
    key: &ServiceKey,
) -> Arc<fedgate_discovery::model::ExportedService> {
    set.services[key].clone()
}

#[tokio::test]
async fn three_gateways_full_mesh() {
    let pki = TestPki::new("demo");
    let lease = Duration::from_secs(3);
    // c accepts both, b dials c and accepts a, a dials both.
    let mut c = start(&pki, "c", loopback(), &[("a", unused()), ("b", unused())], lease, 3);
    let mut b = start(&pki, "b", loopback(), &[("a", unused()), ("c", c.address)], lease, 2);
    let mut a = start(&pki, "a", loopback(), &[("b", b.address), ("c", c.address)], lease, 1);
    for (gw, others) in [(&mut a, ["b", "c"]), (&mut b, ["a", "c"]), (&mut c, ["a", "b"])] {
        let mut held = std::collections::BTreeMap::new();
        while held.len() < 2 {
            if let PeerUpdate::Exports(set) =
                gw.wait_for("exports of both others", |u| matches!(u, PeerUpdate::Exports(_))).await
            {
                held.insert(set.cluster.to_string(), set.services.len());
            }
        }
        for other in others {
            let n = match other {
                "a" => 1,
                "b" => 2,
                _ => 3,
            };
            assert_eq!(held.get(other), Some(&n), "{} holds {other}'s exports", gw.id);
        }
    }
    // A change in c reaches a and b.
    let mut v2 = (**c.local.borrow()).clone();
    v2.version = 2;
    let s = service("ns", "fresh", "c", 1);
    v2.services.insert(s.key.clone(), Arc::new(s));
    c.local.send_replace(Arc::new(v2));
    for gw in [&mut a, &mut b] {
        let set = gw.wait_exports("c", 2).await;
        assert_eq!(set.services.len(), 4);
        assert!(set.services.contains_key(&ServiceKey::new("ns", "fresh")));
    }
    for gw in [a, b, c] {
        gw.stop().await;
    }
}

#[tokio::test]
async fn lease_expiry_withdraws_and_reconnect_restores() {
    let pki = TestPki::new("demo");
    let lease = Duration::from_millis(800);
    let mut west = start(&pki, "west", loopback(), &[("east", unused())], lease, 2);
    let west_addr = west.address;
    let mut east = start(&pki, "east", loopback(), &[("west", west_addr)], lease, 1);
    east.wait_exports("west", 1).await;
    west.wait_exports("east", 1).await;

    // The accepting peer goes away: unreachable at once, withdrawn after the lease.
    west.stop().await;
    let stopped = Instant::now();
    east.wait_for("west unreachable", |u| {
        matches!(u, PeerUpdate::Reachability { reachable: false, .. })
    })
    .await;
    east.wait_for(
        "west withdrawn",
        |u| matches!(u, PeerUpdate::Withdrawn(c) if c.as_str() == "west"),
    )
    .await;
    let took = stopped.elapsed();
    assert!(took >= lease / 2 && took < lease * 4, "withdrawn after {took:?} (lease {lease:?})");
    let status = east.sessions.status().borrow().clone();
    assert!(
        status.iter().any(|s| s.cluster.as_str() == "west" && s.exports_withdrawn && !s.connected)
    );

    // It comes back on the same port: the dialer reconnects and the exports return.
    let mut west = start(&pki, "west", west_addr, &[("east", unused())], lease, 2);
    east.wait_exports("west", 1).await;
    west.wait_exports("east", 1).await;

    // The dialing peer goes away: the acceptor withdraws it too, and restores it on return.
    east.stop().await;
    west.wait_for(
        "east withdrawn",
        |u| matches!(u, PeerUpdate::Withdrawn(c) if c.as_str() == "east"),
    )
    .await;
    let east = start(&pki, "east", loopback(), &[("west", west_addr)], lease, 1);
    west.wait_exports("east", 1).await;
    east.stop().await;
    west.stop().await;
}

/// Increments of counter `name{reason}` since the previous snapshot (the debugging
/// recorder's snapshots drain counters).
fn counter(snapshotter: &Snapshotter, name: &str, reason: &str) -> u64 {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| {
            k.key().name() == name
                && k.key().labels().any(|l| l.key() == "reason" && l.value() == reason)
        })
        .map(|(.., v)| match v {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

#[tokio::test]
async fn refused_handshakes() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Current-thread runtime: every task records into this local recorder.
    let _guard = metrics::set_default_local_recorder(&recorder);

    let pki = TestPki::new("demo");
    let foreign = pki.foreign_ca();
    let lease = Duration::from_secs(3);
    // The acceptor knows peers "east" and "north" (both dial it: lower ids).
    let west =
        start(&pki, "west", loopback(), &[("east", unused()), ("north", unused())], lease, 1);

    struct Case {
        name: &'static str,
        me: &'static str,
        identity: Identity,
        /// The id we configure for west's address.
        peer_id: &'static str,
        /// (reason counted by west, reason in the dialer's last error)
        west_counts: Option<&'static str>,
        dialer_error: &'static str,
    }
    let other_clusterset = pki.issue_with_sans("east", &["spiffe://elsewhere/cluster/east"]);
    let mut foreign_trusting_us = foreign.issue("east");
    foreign_trusting_us.ca = vec![pki.ca_cert()];
    let cases = vec![
        Case {
            name: "cert from another CA",
            me: "east",
            identity: foreign_trusting_us,
            peer_id: "west",
            west_counts: Some("unknown_ca"),
            dialer_error: "handshake",
        },
        Case {
            name: "we do not trust their CA",
            me: "east",
            identity: foreign.issue("east"),
            peer_id: "west",
            west_counts: None,
            dialer_error: "unknown_ca",
        },
        Case {
            name: "SAN for another clusterset",
            me: "east",
            identity: other_clusterset,
            peer_id: "west",
            west_counts: Some("wrong_clusterset"),
            dialer_error: "handshake",
        },
        Case {
            name: "peer's SAN names another cluster than configured",
            me: "east",
            identity: pki.issue("east"),
            peer_id: "wrong",
            west_counts: None,
            dialer_error: "wrong_cluster",
        },
        Case {
            name: "not a configured peer of the acceptor",
            me: "south",
            identity: pki.issue("south"),
            peer_id: "west",
            west_counts: Some("unknown_peer"),
            dialer_error: "handshake",
        },
        Case {
            name: "expired certificate",
            me: "north",
            identity: pki.issue_expired("north"),
            peer_id: "west",
            west_counts: Some("expired"),
            dialer_error: "handshake",
        },
    ];
    for case in cases {
        // Drain what earlier cases counted.
        if let Some(r) = case.west_counts {
            counter(&snapshotter, PEER_HANDSHAKE_FAILURES_TOTAL, r);
        }
        let settings = TunnelSettings::new(
            loopback(),
            "demo",
            id(case.me),
            vec![PeerConfig::new(id(case.peer_id), west.address.to_string())],
        );
        let dialer =
            match start_with(settings, lease, case.identity.clone(), export_set(case.me, 1, 1)) {
                Ok(d) => d,
                Err(e) => {
                    // Our own start-up check refuses a certificate that does not name us; dial
                    // with it anyway, bypassing that check, to see the peer refuse it.
                    assert_eq!(e.reason(), "tls", "{}: {e}", case.name);
                    let credentials =
                        Credentials::without_identity_check(&case.identity, "demo", &id(case.me))
                            .expect("credentials");
                    let crypto = client_crypto(
                        &credentials,
                        id(case.peer_id),
                        Arc::new(RejectionSink::new(true)),
                    )
                    .expect("client crypto");
                    let mut client = quinn::Endpoint::client(loopback()).expect("client endpoint");
                    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
                    let outcome = async {
                        let conn = client.connect(west.address, "west")?.await?;
                        Ok::<_, Box<dyn std::error::Error>>(conn.closed().await)
                    };
                    let outcome =
                        tokio::time::timeout(WAIT, outcome).await.expect("refused in time");
                    assert!(
                        !matches!(outcome, Ok(quinn::ConnectionError::LocallyClosed)),
                        "{outcome:?}"
                    );
                    if let Some(reason) = case.west_counts {
                        let counted = counter(&snapshotter, PEER_HANDSHAKE_FAILURES_TOTAL, reason);
                        assert!(
                            counted > 0,
                            "{}: west counted {reason} {counted} times",
                            case.name
                        );
                    }
                    continue;
                }
            };
        let peer = id(case.peer_id);
        let deadline = tokio::time::Instant::now() + WAIT;
        let last_error = loop {
            let status = dialer.sessions.status().borrow().clone();
            let s = status.iter().find(|s| s.cluster == peer).expect("peer in status").clone();
            assert!(!s.connected, "{}: must not connect", case.name);
            if let Some(e) = s.last_error {
                break e;
            }
            assert!(tokio::time::Instant::now() < deadline, "{}: no error reported", case.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            last_error.contains(case.dialer_error),
            "{}: dialer error {last_error:?} should mention {}",
            case.name,
            case.dialer_error
        );
        if let Some(reason) = case.west_counts {
            let counted = counter(&snapshotter, PEER_HANDSHAKE_FAILURES_TOTAL, reason);
            assert!(counted > 0, "{}: west counted {reason} {counted} times", case.name);
        }
        assert!(!west.handle.is_connected(&id(case.me)), "{}", case.name);
        dialer.stop().await;
    }

    // No client certificate at all.
    counter(&snapshotter, PEER_HANDSHAKE_FAILURES_TOTAL, "no_certificate");
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAnything))
    .with_no_client_auth();
    tls.alpn_protocols = vec![fedgate_tunnel::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic config");
    let mut client = quinn::Endpoint::client(loopback()).expect("client endpoint");
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let outcome = async {
        let conn = client.connect(west.address, "west")?.await?;
        // TLS 1.3: the client may finish before the server refuses; the refusal closes it.
        Ok::<_, Box<dyn std::error::Error>>(conn.closed().await)
    };
    let outcome = tokio::time::timeout(WAIT, outcome).await.expect("refused in time");
    assert!(!matches!(outcome, Ok(quinn::ConnectionError::LocallyClosed)), "{outcome:?}");
    let counted = counter(&snapshotter, PEER_HANDSHAKE_FAILURES_TOTAL, "no_certificate");
    assert!(counted > 0, "west counted no_certificate {counted} times");
    west.stop().await;
}

#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `west` (peers `east` and `south`, neither dialed) and `east` (dialing `west`), three second
/// leases, once east has west's exports: "south" is left for a test to play.
async fn west_east_and_south(pki: &TestPki) -> (Gateway, Gateway) {
    let lease = Duration::from_secs(3);
    let west = start(pki, "west", loopback(), &[("east", unused()), ("south", unused())], lease, 2);
    let mut east = start(pki, "east", loopback(), &[("west", west.address)], lease, 1);
    east.wait_exports("west", 1).await;
    (west, east)
}

#[tokio::test]
async fn garbage_on_streams_resets_only_that_stream() {
    let pki = TestPki::new("demo");
    let (mut west, mut east) = west_east_and_south(&pki).await;

    // A rogue but authenticated peer ("south") sends garbage on control and unknown kinds.
    let (_client, conn, _) = dial_as(&credentials(&pki, "south"), "west", west.address).await;
    let payloads: [&[u8]; 4] = [
        &[KIND_CONTROL, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0],
        b"\x01PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        &[0x7f, 1, 2, 3],
        &[],
    ];
    for payload in payloads {
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        send.write_all(payload).await.expect("write");
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(3), recv.read_to_end(1024)).await;
    }
    // West is alive and still serves east.
    let mut v2 = (**west.local.borrow()).clone();
    v2.version = 2;
    v2.services.clear();
    west.local.send_replace(Arc::new(v2));
    let set = east.wait_exports("west", 2).await;
    assert!(set.services.is_empty());
    // South's (rogue) session does not yield exports, but did not disturb anything.
    assert!(west.handle.is_connected(&id("east")));
    let _ = west.updates.try_recv();
    conn.close(0u32.into(), b"bye");
    east.stop().await;
    west.stop().await;
}

/// Propagation time from a local export set change to the peer's ExportSet, for 1, 1 000
/// and 10 000 services (snapshot at connect, then a one-service delta in that set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagation_times() {
    let pki = TestPki::new("demo");
    let lease = Duration::from_secs(15);
    for n in [1usize, 1_000, 10_000] {
        let west = start(&pki, "west", loopback(), &[("east", unused())], lease, 0);
        let mut east = start(&pki, "east", loopback(), &[("west", west.address)], lease, 0);
        east.wait_exports("west", 1).await;

        // Full change: n new services in one update.
        let big = export_set("west", 2, n);
        let t = Instant::now();
        west.local.send_replace(Arc::new(big.clone()));
        east.wait_exports("west", 2).await;
        let full = t.elapsed();

        // One service changes in the big set.
        let mut v3 = big;
        v3.version = 3;
        let k = ServiceKey::new("ns", "svc-0");
        let mut s = (*v3.services[&k]).clone();
        s.endpoints[0].health = Health::Unhealthy;
        v3.services.insert(k, Arc::new(s));
        let t = Instant::now();
        west.local.send_replace(Arc::new(v3));
        let got = east.wait_exports("west", 3).await;
        let delta = t.elapsed();
        assert_eq!(got.services.len(), n);
        eprintln!("propagation n={n}: full {full:?}, one-service delta {delta:?}");
        assert!(full < Duration::from_secs(30) && delta < Duration::from_secs(10));
        east.stop().await;
        west.stop().await;
    }
}

/// A rogue peer whose gRPC server sends one invalid snapshot, then holds the stream.
#[derive(Clone)]
struct BadExchange;

#[tonic::async_trait]
impl fedgate_discovery::exchange::proto::exchange_server::Exchange for BadExchange {
    type WatchStream = std::pin::Pin<
        Box<
            dyn futures::Stream<
                    Item = Result<fedgate_discovery::exchange::proto::ExportUpdate, tonic::Status>,
                > + Send,
        >,
    >;
    async fn watch(
        &self,
        _: tonic::Request<fedgate_discovery::exchange::proto::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        use fedgate_discovery::exchange::proto::{ExportUpdate, export_update::Kind};
        let mut snapshot =
            fedgate_discovery::exchange::convert::snapshot_to_proto(&export_set("south", 1, 2));
        snapshot.services[1].endpoints[0].address = "not-an-ip".into();
        let update =
            ExportUpdate { version: 1, draining: false, kind: Some(Kind::Snapshot(snapshot)) };
        let items = futures::stream::iter([Ok(update)]).chain(futures::stream::pending());
        Ok(tonic::Response::new(Box::pin(items)))
    }
}

use futures::StreamExt;

#[tokio::test]
async fn bad_messages_from_one_peer_reset_only_its_session() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let pki = TestPki::new("demo");
    let (mut west, mut east) = west_east_and_south(&pki).await;
    west.wait_exports("east", 1).await;

    // "south" dials west properly, then serves a bad exchange on west's control streams.
    let (_client, conn, _) = dial_as(&credentials(&pki, "south"), "west", west.address).await;
    let rogue_conn = conn.clone();
    let (io_tx, io_rx) = mpsc::channel::<std::io::Result<fedgate_tunnel::io::QuicIo>>(8);
    let rogue = tokio::spawn(async move {
        while let Ok((send, mut recv)) = rogue_conn.accept_bi().await {
            let mut kind = [0u8; 1];
            if recv.read_exact(&mut kind).await.is_ok() && kind[0] == KIND_CONTROL {
                let _ =
                    io_tx.send(Ok(fedgate_tunnel::io::QuicIo::new(id("west"), send, recv))).await;
            }
        }
    });
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(fedgate_discovery::exchange::proto::exchange_server::ExchangeServer::new(
                BadExchange,
            ))
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(io_rx)),
    );

    // West resets south's session (more than once: it resyncs with backoff), names the field.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut resets = 0;
    loop {
        resets += counter(
            &snapshotter,
            fedgate_discovery::peers::PEER_SESSION_RESETS_TOTAL,
            "invalid_message",
        );
        let status = west.sessions.status().borrow().clone();
        let south = status.iter().find(|s| s.cluster.as_str() == "south").expect("south").clone();
        if resets >= 2 {
            let err = south.last_error.unwrap_or_default();
            assert!(err.contains("snapshot.services[1].endpoints[0].address"), "{err}");
            assert_eq!(south.exports_version, None);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no session reset counted: {south:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing of south reached the import set; east is unaffected and still syncing.
    while let Ok(u) = west.updates.try_recv() {
        assert!(!matches!(&u, PeerUpdate::Exports(s) if s.cluster.as_str() == "south"), "{u:?}");
    }
    let mut v2 = (**west.local.borrow()).clone();
    v2.version = 2;
    west.local.send_replace(Arc::new(v2));
    east.wait_exports("west", 2).await;
    let mut e2 = (**east.local.borrow()).clone();
    e2.version = 2;
    east.local.send_replace(Arc::new(e2));
    west.wait_exports("east", 2).await;

    conn.close(0u32.into(), b"bye");
    rogue.abort();
    server.abort();
    east.stop().await;
    west.stop().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_stalled_reader() {
    let pki = TestPki::new("demo");
    let west = start(&pki, "west", loopback(), &[("east", unused())], Duration::from_secs(3), 1);
    let settings = TunnelSettings::new(
        loopback(),
        "demo",
        id("east"),
        vec![PeerConfig::new(id("west"), west.address.to_string())],
    );
    // East's reader takes nothing: its one-slot channel fills with the first update.
    let east = start_with_capacity(
        settings,
        DEFAULT_PEER_LEASE,
        pki.issue("east"),
        export_set("east", 1, 1),
        1,
    )
    .expect("tunnel starts");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !east.handle.is_connected(&id("west")) {
        assert!(tokio::time::Instant::now() < deadline, "east never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // More updates are due (a delta from west) while the channel is full.
    let mut v2 = (**west.local.borrow()).clone();
    v2.version = 2;
    west.local.send_replace(Arc::new(v2));
    tokio::time::sleep(Duration::from_millis(200)).await;
    east.stop().await;
    west.stop().await;
}

/// Publishes `version` of a Kubernetes-Secret-like directory: the files live in
/// `dir/..<version>/`, `dir/..data` points there and `dir/<file>` → `..data/<file>`. Switching
/// versions replaces `..data` atomically (a new symlink renamed over it), as the kubelet does.
fn publish_secret(dir: &std::path::Path, version: &str) {
    let link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(format!("..{version}"), &link).expect("symlink ..data_tmp");
    std::fs::rename(&link, dir.join("..data")).expect("swap ..data");
    for f in ["west.crt", "west.key", "ca.crt"] {
        let file = dir.join(f);
        if std::fs::symlink_metadata(&file).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), &file).expect("file symlink");
        }
    }
}

/// Makes `root/..<version>` for the files of one version of the Secret.
fn version_dir(root: &std::path::Path, version: &str) -> std::path::PathBuf {
    let d = root.join(format!("..{version}"));
    std::fs::create_dir(&d).expect("version dir");
    d
}

/// `west`'s identity as a Secret in `root` (version v1, published), and the files naming it.
fn west_secret(pki: &TestPki, root: &std::path::Path) -> IdentityFiles {
    pki.write_pem(&version_dir(root, "v1"), "west").expect("v1 files");
    publish_secret(root, "v1");
    IdentityFiles {
        cert: root.join("west.crt"),
        key: root.join("west.key"),
        ca: root.join("ca.crt"),
    }
}

/// Dials `address` as `me` (expecting `peer`), returns the connection and the leaf
/// certificate the peer presented.
async fn dial_as(
    credentials: &Arc<Credentials>,
    peer: &str,
    address: SocketAddr,
) -> (quinn::Endpoint, quinn::Connection, rustls_pki_types::CertificateDer<'static>) {
    let crypto = client_crypto(credentials, id(peer), Arc::new(RejectionSink::new(true)))
        .expect("client crypto");
    let mut client = quinn::Endpoint::client(loopback()).expect("client endpoint");
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = tokio::time::timeout(WAIT, client.connect(address, peer).expect("connect"))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let leaf = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().cloned())
        .expect("the peer presented a certificate");
    (client, conn, leaf)
}

/// Whether the peer refused the connection after the handshake (TLS 1.3 finishes the client
/// before the server has checked its certificate): closed by the peer within a second.
async fn refused_after_handshake(conn: &quinn::Connection) -> bool {
    match tokio::time::timeout(Duration::from_secs(1), conn.closed()).await {
        Ok(reason) => !matches!(reason, quinn::ConnectionError::LocallyClosed),
        Err(_) => false,
    }
}

async fn wait_reload(
    status: &mut watch::Receiver<ReloadStatus>,
    what: &str,
    pred: impl FnMut(&ReloadStatus) -> bool,
) {
    let done = tokio::time::timeout(WAIT, status.wait_for(pred)).await.map(|r| r.is_ok());
    assert!(matches!(done, Ok(true)), "timed out waiting for {what}: {:?}", *status.borrow());
}

#[tokio::test]
async fn identity_files_reload_without_restart() {
    let pki = TestPki::new("demo");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let version = |v: &str| version_dir(root, v);
    let files = west_secret(&pki, root);
    let mut settings = TunnelSettings::new(
        loopback(),
        "demo",
        id("west"),
        vec![
            PeerConfig::new(id("east"), unused().to_string()),
            PeerConfig::new(id("north"), unused().to_string()),
        ],
    );
    settings.identity_files = Some(files.clone());
    let identity = files.load().expect("v1 loads");
    let v1_leaf = identity.cert_chain[0].clone();
    let west = start_with(settings, DEFAULT_PEER_LEASE, identity, export_set("west", 1, 1))
        .expect("starts");
    let mut status = west.reload.clone();

    // A long-lived connection from north, made with the first identity.
    let (_north_client, north, leaf) =
        dial_as(&credentials(&pki, "north"), "west", west.address).await;
    assert_eq!(leaf, v1_leaf);

    // 1. The Secret gets a new certificate from the same CA: new handshakes present it.
    let v2 = version("v2");
    pki.write_pem(&v2, "west").expect("v2 files");
    let v2_leaf =
        Identity::from_pem_files(&v2.join("west.crt"), &v2.join("west.key"), &v2.join("ca.crt"))
            .expect("v2 loads")
            .cert_chain[0]
            .clone();
    assert_ne!(v2_leaf, v1_leaf);
    publish_secret(root, "v2");
    wait_reload(&mut status, "the v2 reload", |s| s.reloads == 1).await;
    let (_c, east, leaf) = dial_as(&credentials(&pki, "east"), "west", west.address).await;
    assert_eq!(leaf, v2_leaf, "a new handshake presents the new certificate");
    assert!(!refused_after_handshake(&east).await, "east still accepted");
    assert!(
        north.close_reason().is_none(),
        "the existing connection stays up: {:?}",
        north.close_reason()
    );

    // 2. A peer with a certificate of a new CA is refused until the bundle trusts that CA.
    let new_ca = pki.foreign_ca();
    let mut rotated = new_ca.issue("east");
    rotated.ca = vec![pki.ca_cert()];
    // (It does not chain to its own bundle, so only an unchecked identity can present it.)
    let rotated =
        Credentials::without_identity_check(&rotated, "demo", &id("east")).expect("credentials");
    let (_c, conn, _) = dial_as(&rotated, "west", west.address).await;
    assert!(refused_after_handshake(&conn).await, "a CA not in the bundle is refused");
    let v3 = version("v3");
    for f in ["west.crt", "west.key"] {
        std::fs::copy(v2.join(f), v3.join(f)).expect("copy");
    }
    std::fs::write(v3.join("ca.crt"), format!("{}{}", pki.ca_pem(), new_ca.ca_pem()))
        .expect("bundle");
    publish_secret(root, "v3");
    wait_reload(&mut status, "the v3 reload", |s| s.reloads == 2).await;
    let (_c, conn, leaf) = dial_as(&rotated, "west", west.address).await;
    assert!(!refused_after_handshake(&conn).await, "the new CA is trusted after the reload");
    assert_eq!(leaf, v2_leaf);

    // 3. A broken certificate file keeps the current identity and names the file.
    let v4 = version("v4");
    for f in ["west.key", "ca.crt"] {
        std::fs::copy(v3.join(f), v4.join(f)).expect("copy");
    }
    std::fs::write(v4.join("west.crt"), "-----BEGIN CERTIFICATE-----\ngarbage\n").expect("garbage");
    publish_secret(root, "v4");
    wait_reload(&mut status, "the failed reload", |s| s.failures >= 1).await;
    let error = status.borrow().last_error.clone().expect("an error");
    assert!(error.contains(&files.cert.display().to_string()), "{error}");
    assert_eq!(status.borrow().reloads, 2);
    let (_c, conn, leaf) = dial_as(&credentials(&pki, "east"), "west", west.address).await;
    assert_eq!(leaf, v2_leaf, "the last good certificate stays");
    assert!(!refused_after_handshake(&conn).await);

    // 4. A certificate that names another cluster is refused too.
    let v5 = version("v5");
    pki.write_pem(&v5, "south").expect("v5 files");
    std::fs::rename(v5.join("south.crt"), v5.join("west.crt")).expect("rename");
    std::fs::rename(v5.join("south.key"), v5.join("west.key")).expect("rename");
    publish_secret(root, "v5");
    wait_reload(&mut status, "the refused reload", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("expected SAN URI spiffe://demo/cluster/west"))
    })
    .await;
    let (_c, _conn, leaf) = dial_as(&credentials(&pki, "east"), "west", west.address).await;
    assert_eq!(leaf, v2_leaf);
    assert!(north.close_reason().is_none(), "north's connection outlived four reloads");
    west.stop().await;
}

/// The value of gauge `name` with label `label` = `value` in the latest snapshot.
fn gauge(snapshotter: &Snapshotter, name: &str, label: (&str, &str)) -> Option<f64> {
    snapshotter.snapshot().into_vec().into_iter().find_map(|(k, _, _, v)| {
        let labelled = k.key().labels().any(|l| l.key() == label.0 && l.value() == label.1);
        match v {
            DebugValue::Gauge(g) if k.key().name() == name && labelled => Some(g.into_inner()),
            _ => None,
        }
    })
}

/// Issue 17: an expired certificate copied over the files is not reloaded (it would be
/// presented and refused by every peer); the old one stays, counted and logged as a refused
/// reload, and a valid rotation afterwards still goes through.
#[tokio::test]
async fn an_expired_certificate_is_not_reloaded() {
    use fedgate_tunnel::metrics::{TLS_CERT_EXPIRY_TIMESTAMP_SECONDS, TLS_RELOADS_TOTAL};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Current-thread runtime: the watcher and the verifiers record into this recorder.
    let _guard = metrics::set_default_local_recorder(&recorder);

    let pki = TestPki::new("demo");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let version = |v: &str| version_dir(root, v);
    let files = west_secret(&pki, root);
    let mut settings = TunnelSettings::new(
        loopback(),
        "demo",
        id("west"),
        vec![PeerConfig::new(id("north"), unused().to_string())],
    );
    settings.identity_files = Some(files.clone());
    let identity = files.load().expect("v1 loads");
    let v1_leaf = identity.cert_chain[0].clone();
    let v1_not_after = LeafValidity::of(&v1_leaf).expect("parses").not_after as f64;
    let west = start_with(settings, DEFAULT_PEER_LEASE, identity, export_set("west", 1, 1))
        .expect("starts");
    let mut status = west.reload.clone();
    assert_eq!(
        gauge(&snapshotter, TLS_CERT_EXPIRY_TIMESTAMP_SECONDS, ("cert", "own")),
        Some(v1_not_after)
    );

    // The expired certificate (same CA, same cluster) is refused, naming the file and why.
    let v2 = version("v2");
    pki.write_expired_pem(&v2, "west").expect("v2 files");
    publish_secret(root, "v2");
    wait_reload(&mut status, "the refused reload", |s| s.failures >= 1).await;
    let error = status.borrow().last_error.clone().expect("an error");
    let expected = format!("certificate {} expired at 2001-01-01T00:00:00Z", files.cert.display());
    assert!(error.contains(&expected), "{error}");
    assert!(error.contains("keeping the current certificate"), "{error}");
    assert_eq!(status.borrow().reloads, 0);
    let refused: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| {
            k.key().name() == TLS_RELOADS_TOTAL
                && k.key().labels().any(|l| l.key() == "result" && l.value() == "refused")
        })
        .map(|(.., v)| match v {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum();
    assert!(refused >= 1, "counted as a refused reload");

    // A new handshake still gets the old certificate, and it is accepted.
    let north = credentials(&pki, "north");
    let (_c, conn, leaf) = dial_as(&north, "west", west.address).await;
    assert_eq!(leaf, v1_leaf, "the old certificate stays");
    assert!(!refused_after_handshake(&conn).await, "north still accepted");
    assert_eq!(
        gauge(&snapshotter, TLS_CERT_EXPIRY_TIMESTAMP_SECONDS, ("peer", "west")),
        Some(v1_not_after),
        "north's gauge of west's leaf"
    );
    assert!(north.expiry_warnings().is_empty(), "{:?}", north.expiry_warnings());

    // A valid rotation afterwards goes through.
    let v3 = version("v3");
    pki.write_pem(&v3, "west").expect("v3 files");
    publish_secret(root, "v3");
    wait_reload(&mut status, "the v3 reload", |s| s.reloads == 1).await;
    assert_eq!(status.borrow().last_error, None);
    let (_c, conn, leaf) = dial_as(&north, "west", west.address).await;
    assert_ne!(leaf, v1_leaf, "the rotated certificate is presented");
    assert!(!refused_after_handshake(&conn).await);
    west.stop().await;
}

/// Counts enters of spans named `peer` (the peer task's span).
struct PeerSpanEnters(Arc<std::sync::atomic::AtomicUsize>);

impl<S> tracing_subscriber::Layer<S> for PeerSpanEnters
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_enter(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if ctx.span(id).is_some_and(|span| span.name() == "peer") {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// quinn enters the span current at `connect_with` at every poll of the connection's driver,
/// so the dial must not run inside the peer task's `info` span: round trips on a data stream
/// of a dialed connection do not enter it (docs/decisions.md, session 6).
#[tokio::test]
async fn dialed_connection_driver_runs_outside_the_peer_span() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tracing_subscriber::layer::SubscriberExt;
    const ROUNDS: usize = 200;

    // A current-thread runtime: every task, quinn's drivers included, runs on this thread,
    // under this thread's default subscriber (every span enabled). While a single dispatcher
    // exists, tracing-core decides a new callsite's interest by asking the default of the
    // thread that first hits it: another test's thread (no subscriber) would cache the `peer`
    // span as disabled for everyone. A second, idle dispatcher makes every callsite ask all
    // live dispatchers.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let enters = Arc::new(AtomicUsize::new(0));
    let _subscriber = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(PeerSpanEnters(enters.clone())),
    );
    let pki = TestPki::new("demo");
    let (mut west, east) = connected_pair(&pki, Duration::from_millis(1500), 1, 1).await;
    assert!(enters.load(Ordering::Relaxed) > 0, "the peer task's span is seen by the counter");

    let (mut send, mut recv, _) = east.handle.open_stream(&west.id).await.expect("open stream");
    send.write_all(b"x").await.expect("first byte");
    let mut s =
        tokio::time::timeout(WAIT, west.incoming.recv()).await.expect("in time").expect("stream");
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let mut first = [0u8; 1];
        s.recv.read_exact(&mut first).await.expect("first byte");
        while let Some(n) = s.recv.read(&mut buf).await.expect("read") {
            s.send.write_all(&buf[..n]).await.expect("echo");
        }
        s.send.finish().expect("finish");
    });

    let request = [7u8; 1024];
    let mut reply = [0u8; 1024];
    let before = enters.load(Ordering::Relaxed);
    for _ in 0..ROUNDS {
        send.write_all(&request).await.expect("request");
        recv.read_exact(&mut reply).await.expect("reply");
        assert_eq!(reply, request);
    }
    let during = enters.load(Ordering::Relaxed) - before;
    // Heartbeats may wake the peer task a few times; a driver inside the span enters it at
    // least once per packet (two or more per round trip).
    assert!(
        during < ROUNDS / 4,
        "the peer span was entered {during} times in {ROUNDS} round trips"
    );

    send.finish().expect("finish");
    tokio::time::timeout(WAIT, echo).await.expect("echo ends").expect("echo task");
    east.stop().await;
    west.stop().await;
}

/// Writes of every size, small ones (one datagram) interleaved with large ones (GSO batches),
/// on concurrent streams both ways, on a two-worker runtime where the endpoint, the drivers
/// and the writers run on either thread: every byte arrives, in order. (Written for the
/// vendored quinn of sessions 9-11, whose writers sent small writes themselves; kept as an
/// integrity check of the stream path.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_write_sizes_arrive_in_order_on_concurrent_streams() {
    const STREAMS: usize = 4;
    const BYTES: usize = 2 << 20;
    // Deterministic write sizes from 1 byte to 40 KB (an xorshift), and the byte at `offset`
    // of stream `stream`.
    fn sizes(stream: usize) -> impl Iterator<Item = usize> {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ stream as u64;
        std::iter::from_fn(move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Three of four writes fit in one datagram.
            Some(if x.is_multiple_of(4) {
                1 + (x >> 8) as usize % 40_000
            } else {
                1 + (x >> 8) as usize % 1200
            })
        })
    }
    fn byte(stream: usize, offset: usize) -> u8 {
        (offset.wrapping_mul(31) ^ stream.wrapping_mul(131) ^ (offset >> 11)) as u8
    }

    let pki = TestPki::new("demo");
    let (mut west, east) = connected_pair(&pki, Duration::from_secs(5), 0, 0).await;
    // West echoes every stream back with writes of its own mixed sizes.
    let echo = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let mut s = west.incoming.recv().await.expect("stream");
            tasks.push(tokio::spawn(async move {
                let mut sizes = sizes(99);
                let mut pending = Vec::new();
                loop {
                    let want = sizes.next().expect("endless");
                    match s.recv.read_chunk(want, true).await.expect("read") {
                        Some(chunk) => pending.extend_from_slice(&chunk.bytes),
                        None => break,
                    }
                    if pending.len() >= want {
                        s.send
                            .write_chunk(bytes::Bytes::from(std::mem::take(&mut pending)))
                            .await
                            .expect("echo");
                    }
                }
                s.send.write_all(&pending).await.expect("echo rest");
                s.send.finish().expect("finish");
            }));
        }
        for t in tasks {
            t.await.expect("echo task");
        }
        west
    });

    let mut clients = Vec::new();
    for stream in 0..STREAMS {
        let (mut send, mut recv, _) =
            east.handle.open_stream(&id("west")).await.expect("open stream");
        clients.push(tokio::spawn(async move {
            let writer = async {
                let mut offset = 0;
                for (n, size) in sizes(stream).enumerate() {
                    let len = size.min(BYTES - offset);
                    let data: Vec<u8> = (offset..offset + len).map(|o| byte(stream, o)).collect();
                    if n % 2 == 0 {
                        send.write_chunk(bytes::Bytes::from(data)).await.expect("write_chunk");
                    } else {
                        send.write_all(&data).await.expect("write_all");
                    }
                    offset += len;
                    if offset == BYTES {
                        break;
                    }
                }
                send.finish().expect("finish");
            };
            let reader = async {
                let mut got = Vec::with_capacity(BYTES);
                while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.expect("read back")
                {
                    got.extend_from_slice(&chunk.bytes);
                }
                got
            };
            let ((), got) = tokio::join!(writer, reader);
            assert_eq!(got.len(), BYTES, "stream {stream}: length");
            if let Some(at) = (0..BYTES).find(|&o| got[o] != byte(stream, o)) {
                panic!("stream {stream}: first wrong byte at offset {at}");
            }
        }));
    }
    for c in clients {
        tokio::time::timeout(Duration::from_secs(60), c).await.expect("in time").expect("client");
    }
    let west = tokio::time::timeout(WAIT, echo).await.expect("echo in time").expect("echo");
    east.stop().await;
    west.stop().await;
}
