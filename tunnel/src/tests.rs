//! The tunnel alone over real loopback UDP: connections, their confirmation and loss, streams
//! routed by kind. (The tests with discovery's peer sessions over it live in the gateway
//! crate, `gateway/src/peering/tests.rs`.)

use std::net::SocketAddr;
use std::time::Duration;

use fedgate_discovery::model::ClusterId;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
    let settings = TunnelSettings::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        pki.clusterset(),
        id(me),
        peers.iter().map(|(p, a)| PeerConfig::new(id(p), a.to_string())).collect(),
    );
    let (control_tx, control) = mpsc::channel(8);
    let (data_tx, data) = mpsc::channel(8);
    let endpoint =
        TunnelEndpoint::new(settings, pki.issue(me), control_tx, data_tx).expect("binds");
    let address = endpoint.address();
    let handle = endpoint.handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(endpoint.run(shutdown.clone()));
    Endpoint { address, handle, control, data, shutdown, task }
}

/// Waits until `connections` holds a value matching `pred` and returns it.
async fn wait_until(
    connections: &mut watch::Receiver<Option<PeerConnection>>,
    what: &str,
    pred: impl FnMut(&Option<PeerConnection>) -> bool,
) -> Option<PeerConnection> {
    let got = tokio::time::timeout(WAIT, connections.wait_for(pred))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("the tunnel is running");
    got.clone()
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
    let link = wait_until(&mut at_east, "east's connection", Option::is_some).await.expect("up");
    assert_eq!(link.peer(), &id("west"));
    assert!(!link.is_closed());
    wait_until(&mut at_west, "west's connection", Option::is_some).await;
    assert!(east.handle.is_connected(&id("west")) && west.handle.is_connected(&id("east")));
    let status = east.handle.link_status(&id("west")).expect("status");
    assert!(status.connected && status.rtt_ms.is_some() && status.path_mtu.is_some(), "{status:?}");
    assert_eq!((status.address, status.last_error), (west.address.to_string(), None));
    assert_eq!(east.handle.status().len(), 1);

    // A data stream: its kind byte consumed, the peer named.
    let (mut send, _recv) = east.handle.open_stream(&id("west")).await.expect("open");
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
    wait_until(&mut at_west, "the connection withdrawn", Option::is_none).await;
    assert!(!west.handle.is_connected(&id("east")));
    let status = west.handle.link_status(&id("east")).expect("status");
    assert!(!status.connected && status.rtt_ms.is_none(), "{status:?}");
    assert!(status.last_error.is_some(), "the close reason is kept: {status:?}");
    west.stop().await;
}
