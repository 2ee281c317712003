use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::status::{Entry, merge};
use super::*;

fn id(s: &str) -> ClusterId {
    ClusterId::new(s).expect("valid id")
}

#[test]
fn settings_are_validated() {
    let base = SessionSettings::new(id("east"), vec![id("zeta")]);
    type Change = fn(&mut SessionSettings);
    let cases: Vec<(&str, Change, Option<&str>)> = vec![
        ("defaults", |_| {}, None),
        (
            "lease too short",
            |s| s.peer_lease_duration = Duration::from_millis(10),
            Some("too short"),
        ),
    ];
    for (name, change, want) in cases {
        let mut s = base.clone();
        change(&mut s);
        match (validate(&s), want) {
            (Ok(()), None) => {}
            (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{name}: {e}"),
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
    assert_eq!(base.heartbeat_interval(), Duration::from_secs(5));
}

#[test]
fn the_debug_view_shows_the_transport_as_it_is_now() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let up = Arc::new(AtomicBool::new(true));
    let transport = up.clone();
    let state = status::State::new(
        [id("west")],
        Box::new(move |_: &ClusterId| TransportStatus {
            connected: transport.load(Ordering::SeqCst),
            ..TransportStatus::default()
        }),
    );
    assert_eq!(state.debug_view()[0]["connected"], true);
    // The transport drops the connection without telling the sessions: the view, read
    // before the next periodic publish, says so anyway (a federation test read a stale
    // `connected: true` here).
    up.store(false, Ordering::SeqCst);
    assert_eq!(state.debug_view()[0]["connected"], false);
    assert!(!state.current()[0].connected, "and the published list follows");
}

#[test]
fn status_merges_the_session_and_the_transport() {
    let now = Instant::now();
    let transport = |connected: bool, error: Option<&str>| TransportStatus {
        address: "10.0.0.2:15443".into(),
        connected,
        rtt_ms: connected.then_some(1.5),
        path_mtu: connected.then_some(1452),
        last_error: error.map(str::to_owned),
        ..TransportStatus::default()
    };
    let session = |error: Option<&str>| Entry {
        draining: true,
        exports_version: Some(7),
        exports_withdrawn: false,
        last_seen: Some(now - Duration::from_secs(2)),
        last_error: error.map(str::to_owned),
        ..Entry::default()
    };
    // (case, session error, transport, expected last error)
    let cases = [
        ("nothing wrong", None, transport(true, None), None),
        ("transport error only", None, transport(false, Some("timed out")), Some("timed out")),
        (
            "a session reset wins",
            Some("bad update"),
            transport(true, Some("old")),
            Some("bad update"),
        ),
    ];
    for (name, error, t, want) in cases {
        let connected = t.connected;
        let s = merge(&id("west"), &session(error), t, now);
        assert_eq!(s.cluster, id("west"), "{name}");
        assert_eq!(s.address, "10.0.0.2:15443", "{name}");
        assert_eq!(s.connected, connected, "{name}");
        assert_eq!(s.rtt_ms, connected.then_some(1.5), "{name}");
        assert!(s.draining, "{name}");
        assert_eq!(s.exports_version, Some(7), "{name}");
        assert_eq!(s.last_seen_secs, Some(2.0), "{name}");
        assert_eq!(s.last_error.as_deref(), want, "{name}");
    }
}

/// A transport in memory: a link is a tonic channel to a loopback TCP address where the
/// peer's exchange service runs; the test opens and closes links.
mod fake {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use futures::StreamExt;
    use futures::future::BoxFuture;
    use futures::stream::BoxStream;
    use tokio::sync::watch;
    use tokio_stream::wrappers::WatchStream;
    use tokio_util::sync::CancellationToken;
    use tonic::transport::Channel;

    use super::super::{
        BoxError, ControlConnector, ControlLink, TransportReplica, TransportStatus,
    };
    use crate::model::ClusterId;

    #[derive(Clone)]
    pub struct Link {
        id: u64,
        addr: SocketAddr,
        closed: CancellationToken,
    }

    impl ControlLink for Link {
        fn id(&self) -> usize {
            self.id as usize
        }
        fn remote(&self) -> String {
            format!("replica-{}", self.id)
        }
        fn set_draining(&self, _: bool) {}
        fn set_synced(&self) {}
        fn channel(&self) -> BoxFuture<'static, Result<Channel, BoxError>> {
            let uri = format!("http://{}", self.addr);
            Box::pin(async move { Ok(Channel::from_shared(uri)?.connect().await?) })
        }
        fn closed(&self) -> BoxFuture<'static, ()> {
            Box::pin(self.closed.clone().cancelled_owned())
        }
        fn is_closed(&self) -> bool {
            self.closed.is_cancelled()
        }
    }

    /// One peer's links (one per replica), set by the test.
    #[derive(Clone)]
    pub struct Connector {
        links: watch::Sender<Vec<Link>>,
        next_id: Arc<AtomicU64>,
        error: Arc<Mutex<Option<String>>>,
    }

    impl Connector {
        pub fn new() -> Self {
            Self {
                links: watch::channel(Vec::new()).0,
                next_id: Arc::default(),
                error: Arc::default(),
            }
        }
        /// A new connection to a replica of the peer served at `addr`, beside the others;
        /// returns its id.
        pub fn add(&self, addr: SocketAddr) -> u64 {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            self.links.send_modify(|l| l.push(Link { id, addr, closed: CancellationToken::new() }));
            id
        }
        /// A new connection to the peer served at `addr`, in place of all others.
        pub fn up(&self, addr: SocketAddr) {
            self.down_all();
            self.add(addr);
        }
        /// The connection `id` ends.
        pub fn remove(&self, id: u64) {
            self.links.send_modify(|l| {
                l.retain(|link| {
                    let keep = link.id != id;
                    if !keep {
                        link.closed.cancel();
                    }
                    keep
                })
            });
        }
        fn down_all(&self) {
            for link in self.links.send_replace(Vec::new()) {
                link.closed.cancel();
            }
        }
        /// Every connection ends.
        pub fn down(&self, reason: &str) {
            self.down_all();
            *self.error.lock().expect("lock") = Some(reason.to_owned());
        }
    }

    impl ControlConnector for Connector {
        type Link = Link;
        fn links(&self, _: &ClusterId) -> BoxStream<'static, Vec<Link>> {
            WatchStream::new(self.links.subscribe()).boxed()
        }
        fn transport(&self, _: &ClusterId) -> TransportStatus {
            let links = self.links.borrow();
            let connected = !links.is_empty();
            TransportStatus {
                address: "east:15443".into(),
                connected,
                rtt_ms: connected.then_some(0.1),
                path_mtu: connected.then_some(1452),
                last_error: if connected { None } else { self.error.lock().expect("lock").clone() },
                expected_replicas: 2,
                replicas: links
                    .iter()
                    .map(|l| TransportReplica {
                        address: l.remote(),
                        connected: true,
                        direction: "dial".into(),
                        ..TransportReplica::default()
                    })
                    .collect(),
            }
        }
    }
}

/// Serves `svc` on a loopback TCP port (the peer's side of the exchange).
async fn serve_peer(svc: crate::exchange::ExchangeService) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(crate::exchange::exchange_server(svc))
            .serve_with_incoming(incoming),
    );
    addr
}

async fn next_update(updates: &mut mpsc::Receiver<PeerUpdate>, what: &str) -> PeerUpdate {
    tokio::time::timeout(Duration::from_secs(10), updates.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("sessions running")
}

/// Updates until one matches `pred` (heartbeat-driven repeats skipped).
async fn wait_update(
    updates: &mut mpsc::Receiver<PeerUpdate>,
    what: &str,
    mut pred: impl FnMut(&PeerUpdate) -> bool,
) -> PeerUpdate {
    loop {
        let u = next_update(updates, what).await;
        if pred(&u) {
            return u;
        }
    }
}

/// "west"'s sessions with one peer, "east", over a fake transport, running.
struct Running {
    connector: fake::Connector,
    updates: mpsc::Receiver<PeerUpdate>,
    handle: PeersHandle,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn run_west(lease: Duration) -> Running {
    use crate::exchange::delta::testing::export_set;
    let mut settings = SessionSettings::new(id("west"), vec![id("east")]);
    settings.peer_lease_duration = lease;
    let connector = fake::Connector::new();
    let (ours, ours_rx) = watch::channel(Arc::new(export_set("west", 1, 0)));
    let (updates_tx, updates) = mpsc::channel(64);
    let sessions =
        PeerSessions::new(settings, connector.clone(), ours_rx, updates_tx).expect("valid");
    let handle = sessions.handle();
    let (control_tx, control) = mpsc::channel::<tokio::net::TcpStream>(1);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        // Our exports and the control channel stay open while the sessions run.
        let _keep = (ours, control_tx);
        sessions.run(control, stop).await
    });
    Running { connector, updates, handle, shutdown, task }
}

#[tokio::test]
async fn a_session_follows_its_links_and_holds_the_exports_under_the_lease() {
    use crate::exchange::ExchangeService;
    use crate::exchange::delta::testing::export_set;

    // The peer "east" serves its exports; we are "west" with a 600 ms lease.
    let (_east_exports, east_rx) = watch::channel(Arc::new(export_set("east", 1, 2)));
    let (east_draining, east_drain_rx) = watch::channel(false);
    let east = serve_peer(ExchangeService::new(east_rx, east_drain_rx)).await;

    let lease = Duration::from_millis(600);
    let Running { connector, mut updates, handle, shutdown, task } = run_west(lease);

    // A link comes up: reachable, then the peer's exports.
    connector.up(east);
    let u = next_update(&mut updates, "reachable").await;
    assert!(
        matches!(u, PeerUpdate::Reachability { reachable: true, draining: false, .. }),
        "{u:?}"
    );
    let u = next_update(&mut updates, "exports").await;
    assert!(matches!(&u, PeerUpdate::Exports(s) if **s == export_set("east", 1, 2)), "{u:?}");
    let status = handle.status().borrow()[0].clone();
    assert!(status.connected && status.exports_version == Some(1), "{status:?}");
    assert_eq!((status.address.as_str(), status.path_mtu), ("east:15443", Some(1452)));

    // The peer drains: told at once, kept in the status.
    east_draining.send_replace(true);
    wait_update(&mut updates, "draining", |u| {
        matches!(u, PeerUpdate::Reachability { reachable: true, draining: true, .. })
    })
    .await;
    assert!(handle.is_draining(&id("east")));

    // The link goes: unreachable at once (draining forgotten), withdrawn after the lease.
    let gone = tokio::time::Instant::now();
    connector.down("timed out");
    let u = wait_update(&mut updates, "unreachable", |u| {
        matches!(u, PeerUpdate::Reachability { reachable: false, .. })
    })
    .await;
    assert!(matches!(u, PeerUpdate::Reachability { draining: false, .. }), "{u:?}");
    let u = next_update(&mut updates, "withdrawn").await;
    assert!(matches!(&u, PeerUpdate::Withdrawn(c) if *c == id("east")), "{u:?}");
    assert!(gone.elapsed() >= lease / 2, "withdrawn after {:?}", gone.elapsed());
    let status = handle.status().borrow()[0].clone();
    assert!(!status.connected && status.exports_withdrawn && !status.draining, "{status:?}");
    assert_eq!(status.last_error.as_deref(), Some("timed out"));

    // A new link: reachable again and the exports restored.
    connector.up(east);
    wait_update(&mut updates, "reachable again", |u| {
        matches!(u, PeerUpdate::Reachability { reachable: true, .. })
    })
    .await;
    wait_update(&mut updates, "exports restored", |u| matches!(u, PeerUpdate::Exports(_))).await;
    let status = handle.status().borrow()[0].clone();
    assert!(status.connected && !status.exports_withdrawn, "{status:?}");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops").expect("task ok");
}

#[tokio::test]
async fn the_replicas_of_a_peer_are_one_cluster_the_newest_set_wins_and_any_holds_the_lease() {
    use crate::exchange::ExchangeService;
    use crate::exchange::delta::testing::export_set;

    // Two replicas of "east": the same cluster, sets of their own versions.
    let (r1_exports, r1_rx) = watch::channel(Arc::new(export_set("east", 100, 2)));
    let (_r1_draining, r1_drain_rx) = watch::channel(false);
    let r1 = serve_peer(ExchangeService::new(r1_rx, r1_drain_rx).with_instance("aaaa")).await;
    let (r2_exports, r2_rx) = watch::channel(Arc::new(export_set("east", 200, 3)));
    let (r2_draining, r2_drain_rx) = watch::channel(false);
    let r2 = serve_peer(ExchangeService::new(r2_rx, r2_drain_rx).with_instance("bbbb")).await;

    let lease = Duration::from_millis(600);
    let Running { connector, mut updates, handle, shutdown, task } = run_west(lease);
    let version = |u: &PeerUpdate| match u {
        PeerUpdate::Exports(s) => Some(s.version),
        _ => None,
    };

    // Both replicas connect: one reachable peer, and the newer set (r2's) is imported.
    let first = connector.add(r1);
    connector.add(r2);
    wait_update(&mut updates, "r2's set", |u| version(u) == Some(200)).await;
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        let mut rx = handle.status();
        rx.wait_for(|s| s[0].replicas.iter().all(|r| r.instance.is_some()))
            .await
            .map(|s| s[0].clone())
    })
    .await
    .expect("both replicas heard from")
    .expect("sessions running");
    let instances: Vec<_> = status.replicas.iter().filter_map(|r| r.instance.clone()).collect();
    assert_eq!(instances, ["aaaa", "bbbb"], "{status:?}");
    assert_eq!(status.exports_version, Some(200));
    assert_eq!(status.replicas[0].exports_version, Some(100));

    // r1 sees a newer change: imported. r2 then sends an older one than held: not imported.
    r1_exports.send_replace(Arc::new(export_set("east", 300, 4)));
    wait_update(&mut updates, "r1's newer set", |u| version(u) == Some(300)).await;
    r2_exports.send_replace(Arc::new(export_set("east", 250, 5)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = handle.status().borrow()[0].clone();
    assert_eq!(status.exports_version, Some(300), "an older set never replaces a newer one");
    assert_eq!(status.replicas[1].exports_version, Some(250), "{status:?}");

    // The replica whose set is imported goes: the other's set is imported; still reachable,
    // nothing withdrawn (r2 holds the lease).
    connector.remove(first);
    let u = next_update(&mut updates, "the remaining replica's set").await;
    assert_eq!(version(&u), Some(250), "{u:?}");
    tokio::time::sleep(lease * 2).await;
    while let Ok(u) = updates.try_recv() {
        assert!(
            !matches!(
                u,
                PeerUpdate::Withdrawn(_) | PeerUpdate::Reachability { reachable: false, .. }
            ),
            "one replica left holds the peer: {u:?}"
        );
    }
    assert!(handle.status().borrow()[0].connected);

    // Draining is the peer's when every connected replica drains.
    r2_draining.send_replace(true);
    wait_update(&mut updates, "draining", |u| {
        matches!(u, PeerUpdate::Reachability { reachable: true, draining: true, .. })
    })
    .await;
    // The last replica goes: unreachable at once, withdrawn after the lease.
    connector.down("timed out");
    wait_update(&mut updates, "unreachable", |u| {
        matches!(u, PeerUpdate::Reachability { reachable: false, .. })
    })
    .await;
    wait_update(&mut updates, "withdrawn", |u| matches!(u, PeerUpdate::Withdrawn(_))).await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops").expect("task ok");
}
