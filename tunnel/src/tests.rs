//! The tunnel alone over real loopback UDP: connections, their confirmation and loss, streams
//! routed by kind. (The tests with discovery's peer sessions over it live in the gateway
//! crate, `gateway/src/peering/tests.rs`.)

use std::net::SocketAddr;
use std::time::Duration;

use fedgate_discovery::model::ClusterId;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::identity::Identity;
use crate::io::QuicIo;
use crate::testing::TestPki;
use crate::{
    IncomingStream, PeerConfig, PeerConnection, PeerHandle, TunnelEndpoint, TunnelSettings,
};

const WAIT: Duration = Duration::from_secs(10);

fn id(s: &str) -> ClusterId {
    ClusterId::new(s).expect("valid cluster id")
}

struct Endpoint {
    address: SocketAddr,
    handle: PeerHandle,
    control: mpsc::Receiver<QuicIo>,
    data: mpsc::Receiver<IncomingStream>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Endpoint {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task).await.expect("stops in time").expect("task ok");
    }
}

fn start(pki: &TestPki, me: &str, peers: &[(&str, SocketAddr)]) -> Endpoint {
    let peers: Vec<(&str, Vec<SocketAddr>)> = peers.iter().map(|(p, a)| (*p, vec![*a])).collect();
    start_replica(pki, me, &pki.issue(me), &peers, Vec::new())
}

/// `n` data-plane threads as the gateway starts them: a current-thread runtime each, every
/// thread knowing its number. They stop when `stop` is cancelled.
fn shards(n: usize, stop: &CancellationToken) -> Vec<tokio::runtime::Handle> {
    (0..n)
        .map(|k| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let handle = runtime.handle().clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                crate::runtime::set_current_shard(k);
                runtime.block_on(stop.cancelled());
            });
            handle
        })
        .collect()
}

/// One replica of `me` with `identity` (replicas of a cluster share one), peers with one
/// address per replica.
fn start_replica(
    pki: &TestPki,
    me: &str,
    identity: &Identity,
    peers: &[(&str, Vec<SocketAddr>)],
    shards: Vec<tokio::runtime::Handle>,
) -> Endpoint {
    let mut settings = TunnelSettings::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        pki.clusterset(),
        id(me),
        peers
            .iter()
            .map(|(p, a)| PeerConfig {
                id: id(p),
                addresses: a.iter().map(ToString::to_string).collect(),
            })
            .collect(),
    );
    settings.shards = shards;
    let (control_tx, control) = mpsc::channel(8);
    let (data_tx, data) = mpsc::channel(8);
    let endpoint =
        TunnelEndpoint::new(settings, identity.clone(), control_tx, data_tx).expect("binds");
    let address = endpoint.address();
    let handle = endpoint.handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(endpoint.run(shutdown.clone()));
    Endpoint { address, handle, control, data, shutdown, task }
}

/// Waits until `connections` holds a value matching `pred` and returns it.
async fn wait_until(
    connections: &mut watch::Receiver<Vec<PeerConnection>>,
    what: &str,
    pred: impl FnMut(&Vec<PeerConnection>) -> bool,
) -> Vec<PeerConnection> {
    let got = tokio::time::timeout(WAIT, connections.wait_for(pred))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("the tunnel is running");
    got.clone()
}

/// Opens a stream to `peer` from data-plane thread `shard` of `from`, writes a byte, takes the
/// stream at the peer's `incoming` and returns the data-plane thread the peer accepted it on.
async fn accepting_shard(
    from: &PeerHandle,
    shard: &tokio::runtime::Handle,
    peer: &'static str,
    incoming: &mut mpsc::Receiver<IncomingStream>,
) -> Option<usize> {
    let handle = from.clone();
    let (mut send, _recv, _) = shard
        .spawn(async move { handle.open_stream(&id(peer)).await })
        .await
        .expect("task")
        .expect("stream opens");
    send.write_all(b"x").await.expect("write");
    let mut stream =
        tokio::time::timeout(WAIT, incoming.recv()).await.expect("in time").expect("stream");
    let mut byte = [0u8; 1];
    stream.recv.read_exact(&mut byte).await.expect("read");
    let runtime = stream.runtime.take().expect("the accepting runtime");
    runtime.spawn(async { crate::runtime::current_shard() }).await.expect("task")
}

#[tokio::test]
async fn with_several_threads_each_has_a_lane_and_streams_stay_on_their_thread() {
    let pki = TestPki::new("demo");
    let stop = CancellationToken::new();
    let west_shards = shards(2, &stop);
    let mut west = start_replica(
        &pki,
        "west",
        &pki.issue("west"),
        &[("east", vec![SocketAddr::from(([127, 0, 0, 1], 9))])],
        west_shards.clone(),
    );
    let east_shards = shards(3, &stop);
    let east = start_replica(
        &pki,
        "east",
        &pki.issue("east"),
        &[("west", vec![west.address])],
        east_shards.clone(),
    );
    // east dials lane 0 (the export exchange) and, once it is up, data lanes 1, 2 and 3 (one
    // per thread of its own); west counts the same three.
    let deadline = tokio::time::Instant::now() + WAIT;
    while east.handle.lanes(&id("west")) < 3 || west.handle.lanes(&id("east")) < 3 {
        assert!(tokio::time::Instant::now() < deadline, "lanes never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(east.handle.replicas(&id("west")), 1, "lanes are not replicas");
    assert_eq!(west.handle.replicas(&id("east")), 1);

    // A stream opened on east's thread k travels on lane k + 1, which west runs on its thread
    // k mod 2: the incoming stream says so, and a task there sees that thread.
    for (k, shard) in east_shards.iter().enumerate() {
        let accepted = accepting_shard(&east.handle, shard, "west", &mut west.data).await;
        assert_eq!(accepted, Some(k % 2), "stream opened on east's thread {k}");
    }

    // The other way: a stream west (the acceptor) opens on its thread 1 travels on the lane
    // west runs there, lane 2, which east runs on its thread 1; not on the first connection
    // (east's thread 0). east dialed its lanes from ports of their own (crate::steer), so
    // west matched them to east's replica by address.
    let mut east = east;
    let shard = accepting_shard(&west.handle, &west_shards[1], "east", &mut east.data).await;
    assert_eq!(shard, Some(1), "west's stream from its thread 1 went on east's thread {shard:?}");

    // The lanes end with the replica's first connection, at both ends.
    east.stop().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while west.handle.lanes(&id("east")) > 0 || west.handle.replicas(&id("east")) > 0 {
        assert!(tokio::time::Instant::now() < deadline, "west kept east's lanes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    west.stop().await;
    stop.cancel();
}

/// Two replicas of east behind one address (as behind a NAT: both come from 127.0.0.1), each
/// with two threads, dial west. West cannot tell their lanes apart by address; it files them by
/// the lane group each replica's first connection named, so a stream west opens on its thread
/// 1 goes on that replica's lane 2 (east's thread 1), never on a replica's first connection
/// (its thread 0, which carries the export exchange).
#[tokio::test]
async fn lanes_of_replicas_behind_one_address_are_filed_under_their_own_replica() {
    let pki = TestPki::new("demo");
    let stop = CancellationToken::new();
    let west_shards = shards(2, &stop);
    let west = start_replica(
        &pki,
        "west",
        &pki.issue("west"),
        &[("east", vec![SocketAddr::from(([127, 0, 0, 1], 9))])],
        west_shards.clone(),
    );
    let identity = pki.issue("east");
    let peers = [("west", vec![west.address])];
    let mut east = [
        start_replica(&pki, "east", &identity, &peers, shards(2, &stop)),
        start_replica(&pki, "east", &identity, &peers, shards(2, &stop)),
    ];
    let deadline = tokio::time::Instant::now() + WAIT;
    while west.handle.replicas(&id("east")) < 2 || west.handle.lanes(&id("east")) < 4 {
        assert!(tokio::time::Instant::now() < deadline, "replicas and lanes never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Filing happens beside serving (within a second of a lane's arrival).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut seen = [0usize; 2];
    for n in 0..4 {
        let handle = west.handle.clone();
        let (mut send, _recv, _) = west_shards[1]
            .spawn(async move { handle.open_stream(&id("east")).await })
            .await
            .expect("task")
            .expect("stream opens");
        send.write_all(b"x").await.expect("write");
        let [a, b] = &mut east;
        let (replica, mut stream) = tokio::time::timeout(WAIT, async {
            tokio::select! {
                s = a.data.recv() => (0, s.expect("stream")),
                s = b.data.recv() => (1, s.expect("stream")),
            }
        })
        .await
        .expect("a replica took the stream in time");
        let mut byte = [0u8; 1];
        stream.recv.read_exact(&mut byte).await.expect("read");
        let runtime = stream.runtime.take().expect("the accepting runtime");
        let shard = runtime.spawn(async { crate::runtime::current_shard() }).await.expect("task");
        assert_eq!(shard, Some(1), "stream {n} went to replica {replica}'s thread {shard:?}");
        seen[replica] += 1;
    }
    assert!(seen.iter().all(|&n| n > 0), "the streams took turns over both replicas: {seen:?}");
    let [a, b] = east;
    a.stop().await;
    b.stop().await;
    west.stop().await;
    stop.cancel();
}

#[tokio::test]
async fn a_connection_is_published_routes_streams_by_kind_and_is_withdrawn_when_lost() {
    let pki = TestPki::new("demo");
    // east dials (the lower id); west only accepts.
    let mut west = start(&pki, "west", &[("east", SocketAddr::from(([127, 0, 0, 1], 9)))]);
    let east = start(&pki, "east", &[("west", west.address)]);
    let mut at_east = east.handle.connections(&id("west")).expect("a configured peer");
    let mut at_west = west.handle.connections(&id("east")).expect("a configured peer");
    assert!(east.handle.connections(&id("nowhere")).is_none());

    // Both sides publish the connection: the acceptor at once, the dialer once the acceptor
    // confirmed the handshake.
    let links = wait_until(&mut at_east, "east's connection", |l| l.len() == 1).await;
    let link = links[0].clone();
    assert_eq!(link.peer(), &id("west"));
    assert!(!link.is_closed());
    wait_until(&mut at_west, "west's connection", |l| l.len() == 1).await;
    assert!(east.handle.is_connected(&id("west")) && west.handle.is_connected(&id("east")));
    let status = east.handle.link_status(&id("west")).expect("status");
    assert!(status.connected && status.rtt_ms.is_some() && status.path_mtu.is_some(), "{status:?}");
    assert_eq!((status.address, status.last_error), (west.address.to_string(), None));
    assert_eq!(east.handle.status().len(), 1);

    // A data stream: its kind byte consumed, the peer named.
    let (mut send, _recv, on) = east.handle.open_stream(&id("west")).await.expect("open");
    assert_eq!(on, link.id());
    send.write_all(b"ping").await.expect("write");
    let mut s = tokio::time::timeout(WAIT, west.data.recv()).await.expect("in time").expect("one");
    assert_eq!(s.peer, id("east"));
    let mut buf = [0u8; 4];
    s.recv.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"ping");

    // A control channel: its streams reach the other side's control receiver.
    let channel = tokio::spawn(async move { link.control_channel().await });
    let io = tokio::time::timeout(WAIT, west.control.recv()).await.expect("in time").expect("io");
    assert_eq!(io.peer(), &id("east"));
    drop(io);
    channel.abort();

    // The dialer goes away: the acceptor withdraws the connection (closed by the peer).
    east.stop().await;
    wait_until(&mut at_west, "the connection withdrawn", Vec::is_empty).await;
    assert!(!west.handle.is_connected(&id("east")));
    let status = west.handle.link_status(&id("east")).expect("status");
    assert!(!status.connected && status.rtt_ms.is_none(), "{status:?}");
    assert!(status.last_error.is_some(), "the close reason is kept: {status:?}");
    west.stop().await;
}

#[tokio::test]
async fn every_replica_of_a_peer_is_kept_and_streams_take_turns_over_them() {
    let pki = TestPki::new("demo");
    let unused = |port| SocketAddr::from(([127, 0, 0, 1], port));
    // west accepts; east has two replicas (one identity) configured at west by two addresses.
    let west = start(&pki, "west", &[("east", unused(9))]);
    let east_identity = pki.issue("east");
    let replica =
        || start_replica(&pki, "east", &east_identity, &[("west", vec![west.address])], Vec::new());
    let (east1, east2) = (replica(), replica());
    let mut at_west = west.handle.connections(&id("east")).expect("configured");
    let links = wait_until(&mut at_west, "both replicas", |l| l.len() == 2).await;
    let remotes: std::collections::BTreeSet<SocketAddr> =
        links.iter().map(|l| l.remote()).collect();
    assert_eq!(remotes, [east1.address, east2.address].into(), "one connection per replica");

    // Data streams take turns over the replicas; one marked suspect is avoided.
    let mut used = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let (_s, _r, on) = west.handle.open_stream(&id("east")).await.expect("open");
        used.insert(on);
    }
    assert_eq!(used.len(), 2, "both replicas carry streams");
    west.handle.suspect(&id("east"), links[0].id());
    for _ in 0..4 {
        let (_s, _r, on) = west.handle.open_stream(&id("east")).await.expect("open");
        assert_eq!(on, links[1].id(), "the suspect replica is passed over");
    }
    // So is one that announced draining.
    west.handle.suspect(&id("east"), usize::MAX);
    links[1].set_draining(true);
    let status = west.handle.link_status(&id("east")).expect("status");
    assert_eq!((status.replicas.len(), status.expected_replicas), (2, 1), "{status:?}");
    assert!(status.replicas.iter().all(|r| r.connected && r.direction == "accept"));

    // One replica goes away: the other keeps serving.
    east1.stop().await;
    let links = wait_until(&mut at_west, "one replica left", |l| l.len() == 1).await;
    assert_eq!(links[0].remote(), east2.address);
    let (_s, _r, on) = west.handle.open_stream(&id("east")).await.expect("the other replica");
    assert_eq!(on, links[0].id());
    assert!(west.handle.is_connected(&id("east")));
    east2.stop().await;
    wait_until(&mut at_west, "no replica left", Vec::is_empty).await;
    west.stop().await;
}

#[tokio::test]
async fn a_dialer_connects_to_every_address_of_a_peer() {
    let pki = TestPki::new("demo");
    let unused = SocketAddr::from(([127, 0, 0, 1], 9));
    let west_identity = pki.issue("west");
    let west1 = start_replica(&pki, "west", &west_identity, &[("east", vec![unused])], Vec::new());
    let west2 = start_replica(&pki, "west", &west_identity, &[("east", vec![unused])], Vec::new());
    // east dials both, listed as `addresses`; one more address has nobody behind it.
    let east = start_replica(
        &pki,
        "east",
        &pki.issue("east"),
        &[("west", vec![west1.address, west2.address, unused])],
        Vec::new(),
    );
    let mut at_east = east.handle.connections(&id("west")).expect("configured");
    let links = wait_until(&mut at_east, "both replicas", |l| l.len() == 2).await;
    let remotes: std::collections::BTreeSet<SocketAddr> =
        links.iter().map(|l| l.remote()).collect();
    assert_eq!(remotes, [west1.address, west2.address].into());
    let status = east.handle.link_status(&id("west")).expect("status");
    assert_eq!(status.expected_replicas, 3, "{status:?}");
    let down: Vec<_> = status.replicas.iter().filter(|r| !r.connected).collect();
    assert_eq!(down.len(), 1, "the address with nobody behind it is shown: {status:?}");
    assert_eq!(down[0].address, unused);

    // A replica stops: the dialer keeps the other and shows why the stopped one is down.
    let west2_address = west2.address;
    west2.stop().await;
    let links = wait_until(&mut at_east, "one replica left", |l| l.len() == 1).await;
    assert_eq!(links[0].remote(), west1.address);
    let status = east.handle.link_status(&id("west")).expect("status");
    assert!(status.connected);
    let gone = status.replicas.iter().find(|r| r.address == west2_address).expect("listed");
    assert!(!gone.connected && gone.last_error.is_some(), "{gone:?}");
    east.stop().await;
    west1.stop().await;
}

#[tokio::test]
async fn the_higher_id_dials_when_no_connection_reaches_it() {
    let pki = TestPki::new("demo");
    let nowhere = SocketAddr::from(([127, 0, 0, 1], 9));
    // east (the lower id) dials an address where west is not (west's replicas behind one
    // address that sends east's dials elsewhere); west knows east's address.
    let east = start(&pki, "east", &[("west", nowhere)]);
    let mut west = start(&pki, "west", &[("east", east.address)]);
    let mut at_west = west.handle.connections(&id("east")).expect("configured");
    let mut at_east = east.handle.connections(&id("west")).expect("configured");
    let started = tokio::time::Instant::now();
    let links = wait_until(&mut at_west, "west's fallback dial", |l| l.len() == 1).await;
    assert!(
        started.elapsed() >= crate::replicas::FALLBACK_AFTER,
        "west dials only after {:?} alone, not {:?}",
        crate::replicas::FALLBACK_AFTER,
        started.elapsed()
    );
    assert_eq!(links[0].remote(), east.address);
    // east accepts it: one connection, usable both ways.
    let links = wait_until(&mut at_east, "east accepts it", |l| l.len() == 1).await;
    let status = west.handle.link_status(&id("east")).expect("status");
    assert_eq!(status.replicas.len(), 1, "{status:?}");
    assert_eq!(status.replicas[0].direction, "dial");
    let (mut send, _r, on) = east.handle.open_stream(&id("west")).await.expect("east opens");
    assert_eq!(on, links[0].id());
    send.write_all(b"ping").await.expect("write");
    let s = tokio::time::timeout(WAIT, west.data.recv()).await;
    assert!(s.is_ok_and(|s| s.is_some_and(|s| s.peer == id("east"))), "west gets the stream");
    east.stop().await;
    west.stop().await;
}

/// Sends 32 MB from east to west on a data stream, east dialing west through `relay` (a
/// long path) or directly; returns the largest send window east's lanes to west showed
/// meanwhile ([`crate::peer::ReplicaLink::send_window_bytes`]).
async fn largest_send_window(delay: Option<Duration>) -> u64 {
    const CHUNK: usize = 64 * 1024;
    const TOTAL: usize = 32 << 20;
    let pki = TestPki::new("demo");
    let stop = CancellationToken::new();
    // west never reaches east (nothing listens at port 9): east dials, through the relay.
    let unreachable = SocketAddr::from(([127, 0, 0, 1], 9));
    let mut west = start_replica(
        &pki,
        "west",
        &pki.issue("west"),
        &[("east", vec![unreachable])],
        shards(1, &stop),
    );
    let relay = delay.map(|d| {
        crate::testing::DelayRelay::start(SocketAddr::from(([127, 0, 0, 1], 0)), west.address, d)
            .expect("relay binds")
    });
    let to_west = relay.as_ref().map_or(west.address, crate::testing::DelayRelay::address);
    let east = start_replica(
        &pki,
        "east",
        &pki.issue("east"),
        &[("west", vec![to_west])],
        shards(1, &stop),
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while east.handle.lanes(&id("west")) < 1 {
        assert!(tokio::time::Instant::now() < deadline, "east's data lane never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut send, _recv, _) = east.handle.open_stream(&id("west")).await.expect("stream opens");
    let sender = tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![0x5a; CHUNK]);
        for _ in 0..TOTAL / CHUNK {
            send.write_chunk(chunk.clone()).await.expect("write");
        }
        send.finish().expect("finish");
        send
    });
    let mut stream =
        tokio::time::timeout(WAIT, west.data.recv()).await.expect("in time").expect("stream");
    let receiver = tokio::spawn(async move {
        let mut got = 0;
        while let Some(chunk) = stream.recv.read_chunk(CHUNK, true).await.expect("read") {
            got += chunk.bytes.len();
        }
        got
    });
    let mut largest = 0;
    while !receiver.is_finished() {
        let status = east.handle.link_status(&id("west")).expect("west is a peer");
        let windows = status.replicas.iter().filter_map(|r| r.send_window_bytes);
        largest = largest.max(windows.sum::<u64>());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(receiver.await.expect("receiver"), TOTAL, "west received everything");
    drop(sender.await.expect("sender"));
    east.stop().await;
    west.stop().await;
    stop.cancel();
    largest
}

/// A data lane's send window follows its path (crate::sendwin): at the 1 MiB floor on
/// loopback, where a larger one would only hold data in memory, and grown past it on a path
/// of 50 ms round trips, where 1 MiB would cap the lane at 20 MB/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lanes_send_window_follows_its_path() {
    let floor = crate::sendwin::MIN_SEND_WINDOW;
    let short = largest_send_window(None).await;
    let long = largest_send_window(Some(Duration::from_millis(25))).await;
    eprintln!("largest send window: loopback {short}, 50 ms round trips {long}");
    assert_eq!(short, floor, "loopback: the window stays at its floor");
    assert!(long >= 2 * floor, "50 ms round trips: the window grew to {long} only");
}
