//! The exchange over real loopback TCP: server, watcher, deltas, heartbeats, bad peers.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

use super::delta::testing::{export_set, service};
use super::proto::{self, exchange_server::Exchange, export_update::Kind};
use super::*;
use crate::model::{ClusterId, ExportSet, Health, ServiceKey};

const WAIT: Duration = Duration::from_secs(5);

async fn serve<S: Exchange>(svc: S) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let incoming = futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| s);
        Some((next, l))
    });
    let server = proto::exchange_server::ExchangeServer::new(svc)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    tokio::spawn(Server::builder().add_service(server).serve_with_incoming(incoming));
    addr
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect()
        .await
        .expect("connect")
}

fn settings(heartbeat: Duration) -> WatchSettings {
    WatchSettings {
        local: ClusterId::new("west").expect("valid"),
        peer: ClusterId::new("east").expect("valid"),
        heartbeat_interval: heartbeat,
    }
}

async fn next(events: &mut PeerEventStream) -> Result<PeerEvent, ExchangeError> {
    tokio::time::timeout(WAIT, events.next()).await.expect("event in time").expect("stream open")
}

async fn next_exports(events: &mut PeerEventStream) -> Arc<ExportSet> {
    loop {
        match next(events).await.expect("no error") {
            PeerEvent::Exports { set, .. } => return set,
            PeerEvent::Heartbeat { .. } => continue,
        }
    }
}

#[tokio::test]
async fn snapshot_then_deltas_then_heartbeats() {
    let (local_tx, local_rx) = watch::channel(Arc::new(export_set("east", 1, 3)));
    let (drain_tx, drain_rx) = watch::channel(false);
    let addr = serve(ExchangeService::new(local_rx, drain_rx)).await;
    let mut events = watch_peer(channel(addr).await, settings(Duration::from_millis(100)), None);

    let first = next_exports(&mut events).await;
    assert_eq!(*first, export_set("east", 1, 3));

    // Delta: one service changes, one goes, one comes.
    let mut v2 = (*first).clone();
    v2.version = 2;
    let k1 = ServiceKey::new("ns", "svc-1");
    let mut changed = (*v2.services[&k1]).clone();
    changed.endpoints[0].health = Health::Unhealthy;
    v2.services.insert(k1.clone(), Arc::new(changed));
    v2.services.remove(&ServiceKey::new("ns", "svc-2"));
    let added = service("ns", "new", "east", 1);
    v2.services.insert(added.key.clone(), Arc::new(added));
    local_tx.send_replace(Arc::new(v2.clone()));
    let second = next_exports(&mut events).await;
    assert_eq!(*second, v2);
    let k0 = ServiceKey::new("ns", "svc-0");
    assert!(
        Arc::ptr_eq(&second.services[&k0], &first.services[&k0]),
        "unchanged service keeps its Arc"
    );

    // Quiet: heartbeats at the interval we asked for.
    let started = tokio::time::Instant::now();
    match next(&mut events).await.expect("heartbeat") {
        PeerEvent::Heartbeat { version, draining } => {
            assert_eq!(version, 2);
            assert!(!draining);
        }
        other => panic!("expected a heartbeat, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "heartbeat came after {:?}",
        started.elapsed()
    );

    // Draining is announced at once.
    drain_tx.send_replace(true);
    let ev = next(&mut events).await.expect("draining heartbeat");
    assert!(ev.draining(), "{ev:?}");
}

/// A peer that sends a scripted list of updates, then holds the stream open.
#[derive(Clone)]
struct Scripted(Vec<proto::ExportUpdate>);

#[tonic::async_trait]
impl Exchange for Scripted {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::ExportUpdate, Status>> + Send>>;
    async fn watch(
        &self,
        _: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let items = self.0.clone().into_iter().map(Ok);
        Ok(Response::new(Box::pin(futures::stream::iter(items).chain(futures::stream::pending()))))
    }
}

fn snapshot(set: &ExportSet) -> proto::ExportUpdate {
    proto::ExportUpdate {
        version: set.version,
        draining: false,
        kind: Some(Kind::Snapshot(convert::snapshot_to_proto(set))),
    }
}

#[tokio::test]
async fn bad_peers_end_the_session_with_a_named_error() {
    let good = snapshot(&export_set("east", 1, 2));
    let mut bad_address = good.clone();
    if let Some(Kind::Snapshot(s)) = &mut bad_address.kind {
        s.services[1].endpoints[0].address = "300.1.1.1".into();
    }
    let wrong_cluster = snapshot(&export_set("south", 1, 1));
    let heartbeat_first = proto::ExportUpdate {
        version: 1,
        draining: false,
        kind: Some(Kind::Heartbeat(proto::Heartbeat {})),
    };
    let stale_delta = proto::ExportUpdate {
        version: 3,
        draining: false,
        kind: Some(Kind::Delta(proto::Delta { base_version: 2, ..Default::default() })),
    };
    let no_kind = proto::ExportUpdate { version: 1, draining: false, kind: None };

    let cases: Vec<(&str, Vec<proto::ExportUpdate>, &str)> = vec![
        ("bad endpoint address", vec![bad_address], "snapshot.services[1].endpoints[0].address"),
        ("snapshot of another cluster", vec![wrong_cluster], "south"),
        ("heartbeat before snapshot", vec![heartbeat_first], "delta from version 1"),
        ("delta on the wrong base", vec![good.clone(), stale_delta], "we hold Some(1)"),
        ("no kind", vec![no_kind], "field kind"),
    ];
    for (name, script, expect) in cases {
        let addr = serve(Scripted(script)).await;
        let mut events = watch_peer(channel(addr).await, settings(Duration::from_secs(5)), None);
        let err = loop {
            match next(&mut events).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains(expect), "{name}: {err}");
        assert!(
            tokio::time::timeout(WAIT, events.next()).await.expect("ends").is_none(),
            "{name}: stream ends after the error"
        );
    }
}

#[tokio::test]
async fn nothing_is_served_before_the_local_set_is_complete() {
    // A replica whose cluster source has not synced serves no snapshot (an empty set would
    // replace its sibling replicas' full one at the peers); the watch waits, then gets it.
    let (_local_tx, local_rx) = watch::channel(Arc::new(export_set("east", 1, 2)));
    let (_drain_tx, drain_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);
    let svc = ExchangeService::new(local_rx, drain_rx).with_instance("abc").with_ready(ready_rx);
    let addr = serve(svc).await;
    let mut events = watch_peer(channel(addr).await, settings(Duration::from_millis(50)), None);
    let early = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
    assert!(early.is_err(), "nothing before ready: {early:?}");
    ready_tx.send_replace(true);
    match next(&mut events).await.expect("snapshot") {
        PeerEvent::Exports { set, instance, .. } => {
            assert_eq!(*set, export_set("east", 1, 2));
            assert_eq!(instance.as_deref(), Some("abc"), "the snapshot names the instance");
        }
        other => panic!("expected the snapshot, got {other:?}"),
    }
}
