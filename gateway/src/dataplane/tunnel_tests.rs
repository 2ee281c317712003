//! Two data planes joined by the real `fedgate-tunnel` endpoint (mutual TLS with `TestPki`,
//! QUIC on loopback, port 0) and discovery's peer sessions over it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedgate_discovery::model::{ClusterState, ExportSet, Health, ImportSnapshot, PeerUpdate};
use fedgate_discovery::peers::{DEFAULT_PEER_LEASE, PeersHandle};
use fedgate_tunnel::testing::TestPki;
use fedgate_tunnel::{IncomingStream, PeerConfig, PeerHandle, TunnelSettings};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::peers::PeerTunnel;
use super::tests::{
    assert_reset, cid, cluster_state, echo_server, eventually, free_port, random_loopback, request,
    settings, snapshot, start,
};
use super::*;
use crate::peering::Peering;

struct Gateway {
    handle: PeerHandle,
    sessions: PeersHandle,
    address: SocketAddr,
    incoming: mpsc::Receiver<IncomingStream>,
    _exports: watch::Sender<Arc<ExportSet>>,
    _updates: mpsc::Receiver<PeerUpdate>,
}

fn tunnel(
    pki: &TestPki,
    id: &str,
    peers: Vec<PeerConfig>,
    shutdown: &CancellationToken,
) -> Gateway {
    let local = cid(id);
    let settings =
        TunnelSettings::new("127.0.0.1:0".parse().unwrap(), pki.clusterset(), local.clone(), peers);
    let exports = ExportSet {
        cluster: local,
        locality: Default::default(),
        version: 1,
        services: BTreeMap::new(),
    };
    let (exports_tx, exports_rx) = watch::channel(Arc::new(exports));
    let (updates_tx, updates) = mpsc::channel(64);
    let (incoming_tx, incoming) = mpsc::channel(64);
    let peering = Peering::new(
        settings,
        DEFAULT_PEER_LEASE,
        pki.issue(id),
        exports_rx,
        watch::channel(true).1,
        updates_tx,
        incoming_tx,
    )
    .unwrap();
    let handle = peering.handle();
    let sessions = peering.sessions();
    let address = peering.address();
    tokio::spawn(peering.run(shutdown.clone()));
    Gateway { handle, sessions, address, incoming, _exports: exports_tx, _updates: updates }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_between_two_gateways_over_the_mutual_tls_tunnel() {
    let pki = TestPki::new("demo");
    let stop = CancellationToken::new();
    // west is dialled by east (the lower id dials); its peer entry for east is never dialled.
    let west_gw = tunnel(&pki, "west", vec![PeerConfig::new(cid("east"), "127.0.0.1:9")], &stop);
    let east_gw = tunnel(
        &pki,
        "east",
        vec![PeerConfig::new(cid("west"), west_gw.address.to_string())],
        &stop,
    );
    let east_handle = east_gw.handle.clone();
    eventually("tunnel up", || east_handle.is_connected(&cid("west"))).await;

    let (w, _sw) = echo_server("w").await;
    let vip = random_loopback();
    let p = free_port(vip);
    // west through the public shape the composition root uses.
    let (_west_snap, west_snap_rx) = watch::channel(Arc::new(ImportSnapshot::default()));
    let (_west_cluster, west_cluster_rx) = watch::channel(Arc::new(cluster_state(p, &[w])));
    let (mut west_dp, west_health) = DataPlane::new(
        settings("west", "eu", "eu-a"),
        west_snap_rx,
        west_cluster_rx,
        Some(PeerTunnel::new(west_gw.handle.clone(), west_gw.sessions.clone())),
    )
    .unwrap();
    west_dp.serve_tunnel(west_gw.incoming);
    let west_drain = west_dp.drain_handle();
    let west_stop = CancellationToken::new();
    let west_task = tokio::spawn(west_dp.run(west_stop.clone()));
    eventually("west probes its endpoint", || {
        west_health.borrow().get(&(super::tests::key(), w.ip())) == Some(&Health::Healthy)
    })
    .await;
    let east = start(
        settings("east", "us", "us-a"),
        snapshot(vip, p, &[("west", &[w])], &[]),
        ClusterState::default(),
        Some(PeerTunnel::new(east_gw.handle.clone(), east_gw.sessions.clone())),
        None,
    );
    let target = SocketAddr::new(vip, p);
    assert_eq!(request(target, "hello").await.unwrap(), "w:hello");
    let big = "t".repeat(8 << 20);
    let started = std::time::Instant::now();
    assert_eq!(request(target, &big).await.unwrap().len(), (8 << 20) + 2);
    eprintln!("mTLS tunnel: 2 x 8 MiB echoed in {:?} (debug build)", started.elapsed());
    assert_reset(target).await;

    // west drains: it refuses new streams, and tells east.
    west_drain.start();
    let r = request(target, "late").await;
    assert!(r.map(|s| s.is_empty()).unwrap_or(true), "a draining acceptor must not serve");
    let outcome = west_drain.wait(Duration::from_secs(5)).await;
    assert!(matches!(outcome, DrainOutcome::Drained { .. }), "{outcome:?}");

    east.shutdown.cancel();
    east.task.await.unwrap();
    west_stop.cancel();
    west_task.await.unwrap();
    stop.cancel();
}
