//! The UDP receive threads of an idle DNS server sleep until a query or shutdown arrives, and
//! shutdown ends them at once. A test binary of its own: it counts the context switches of
//! this process's `fedgate-dns-udp-*` threads, which other tests' servers would disturb.

use std::sync::Arc;
use std::time::Duration;

use fedgate_discovery::model::Health;
use fedgate_dns::fixture::{cluster_state, snapshot};
use fedgate_dns::{DnsServer, DnsSettings};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// `(thread id, voluntary + involuntary context switches)` of every DNS UDP thread.
fn dns_threads() -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let task = task.expect("task entry").path();
        let Ok(comm) = std::fs::read_to_string(task.join("comm")) else { continue };
        if !comm.starts_with("fedgate-dns-udp") {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(task.join("status")) else { continue };
        let switches = status
            .lines()
            .filter(|l| l.contains("ctxt_switches"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.push((task.file_name().unwrap().to_string_lossy().into_owned(), switches));
    }
    out.sort();
    out
}

async fn query(server: std::net::SocketAddr) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut msg = Message::query();
    msg.metadata.id = 4242;
    msg.add_query(Query::query(
        Name::from_ascii("web.shop.svc.clusterset.local.").expect("name"),
        RecordType::A,
    ));
    sock.send_to(&msg.to_vec().expect("encode"), server).await.expect("send");
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("answer in time")
        .expect("recv");
    Message::from_vec(&buf[..n]).expect("decode")
}

#[tokio::test]
async fn idle_udp_threads_sleep_and_shutdown_ends_them() {
    let (_imports_tx, imports_rx) = watch::channel(Arc::new(snapshot(Health::Healthy)));
    let (_cluster_tx, cluster_rx) = watch::channel(Arc::new(cluster_state()));
    let mut settings = DnsSettings::new("127.0.0.1:0".parse().expect("addr"));
    settings.udp_workers = 2;
    let server = DnsServer::new(settings, imports_rx, cluster_rx).expect("dns server binds");
    let addr = server.address();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server.run(stop.clone()));

    // Serving: both threads exist and answer.
    let resp = query(addr).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert!(!resp.answers.is_empty(), "web.shop has an address: {resp:?}");
    // A thread shows its name once it has started and set it: wait for both, then for both to
    // be blocked (two snapshots 50 ms apart alike).
    let mut before = dns_threads();
    for _ in 0..500 {
        if before.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        before = dns_threads();
    }
    assert_eq!(before.len(), 2, "two UDP receive threads: {before:?}");
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = dns_threads();
        if now == before {
            break;
        }
        before = now;
    }

    // Idle for a second: no thread wakes up (a 100 ms receive timeout woke each ten times).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = dns_threads();
    assert_eq!(after, before, "idle DNS UDP threads must not wake up");

    // A query still wakes one of them, and it answers.
    assert_eq!(query(addr).await.metadata.response_code, ResponseCode::NoError);

    // Shutdown: `run` returns, every receive thread has ended and the UDP port is free again.
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("server stops in time")
        .expect("join")
        .expect("server result");
    let mut left = dns_threads();
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        left = dns_threads();
    }
    assert!(left.is_empty(), "DNS UDP threads still running after shutdown: {left:?}");
    std::net::UdpSocket::bind(addr).expect("the UDP port is released at shutdown");
}
