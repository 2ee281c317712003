//! DNS over TCP under abuse (issue 17): at most `max_tcp_connections` connections are served,
//! one more is closed at once, idle connections are closed after `tcp_idle_timeout`, and the
//! connections that are served answer pipelined queries in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedgate_discovery::model::Health;
use fedgate_dns::fixture::{cluster_state, snapshot};
use fedgate_dns::{DnsServer, DnsSettings};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(5);

fn framed(id: u16, name: &str) -> Vec<u8> {
    let mut msg = Message::query();
    msg.metadata.id = id;
    msg.add_query(Query::query(Name::from_ascii(name).expect("name"), RecordType::A));
    let bytes = msg.to_vec().expect("encode");
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&bytes);
    out
}

async fn read_answer(stream: &mut TcpStream) -> Message {
    let mut len = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut len)).await.expect("in time").expect("len");
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await.expect("body");
    Message::from_vec(&buf).expect("answer parses")
}

/// True when the server closed `stream` (EOF) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(within, stream.read(&mut byte)).await, Ok(Ok(0)) | Ok(Err(_)))
}

#[tokio::test]
async fn tcp_connections_are_capped_idle_ones_closed_and_pipelined_queries_answered() {
    let (_imports_tx, imports_rx) = watch::channel(Arc::new(snapshot(Health::Healthy)));
    let (_cluster_tx, cluster_rx) = watch::channel(Arc::new(cluster_state()));
    let mut settings = DnsSettings::new("127.0.0.1:0".parse().expect("addr"));
    settings.upstream = vec![];
    settings.max_tcp_connections = 2;
    settings.tcp_idle_timeout = Duration::from_secs(1);
    let server = DnsServer::new(settings, imports_rx, cluster_rx).expect("dns server binds");
    let addr: SocketAddr = server.address();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server.run(stop.clone()));

    // Two connections take the two places; two pipelined queries on the first are answered
    // in order.
    let mut first = TcpStream::connect(addr).await.expect("connect");
    let mut second = TcpStream::connect(addr).await.expect("connect");
    let mut both = framed(11, "web.shop.svc.clusterset.local.");
    both.extend(framed(12, "nothing.shop.svc.clusterset.local."));
    first.write_all(&both).await.expect("write");
    let a = read_answer(&mut first).await;
    let b = read_answer(&mut first).await;
    assert_eq!((a.metadata.id, a.metadata.response_code), (11, ResponseCode::NoError));
    assert_eq!((b.metadata.id, b.metadata.response_code), (12, ResponseCode::NXDomain));
    assert!(!a.answers.is_empty(), "web resolves: {a:?}");

    // A third is closed at once, without an answer.
    let mut third = TcpStream::connect(addr).await.expect("the kernel still accepts");
    let _ = third.write_all(&framed(13, "web.shop.svc.clusterset.local.")).await;
    assert!(closed_within(&mut third, WAIT).await, "over the cap: closed at once");

    // Idle connections are closed after the idle timeout, which frees the places.
    let started = Instant::now();
    assert!(closed_within(&mut second, WAIT).await, "idle connection closed");
    assert!(started.elapsed() < Duration::from_secs(3), "after ~1 s: {:?}", started.elapsed());
    assert!(closed_within(&mut first, WAIT).await, "idle connection closed");
    let mut again = TcpStream::connect(addr).await.expect("connect");
    again.write_all(&framed(14, "web.shop.svc.clusterset.local.")).await.expect("write");
    assert_eq!(read_answer(&mut again).await.metadata.id, 14, "a place is free again");

    // A message cut off mid-way is treated as idle: closed, nothing else harmed.
    let mut cut = TcpStream::connect(addr).await.expect("connect");
    cut.write_all(&[0, 40, 1, 2, 3]).await.expect("write");
    assert!(closed_within(&mut cut, WAIT).await, "a stalled message is closed");

    stop.cancel();
    tokio::time::timeout(WAIT, task).await.expect("stops").expect("joins").expect("runs");
}
