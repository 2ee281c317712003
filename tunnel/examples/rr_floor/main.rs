//! How much of a 1 KB request/response over the tunnel is quinn's async layer, and how much
//! is QUIC itself. Five ways of doing the same round trips between two threads on loopback,
//! in interleaved rounds, in one process:
//!
//! - `tunnel`: two real `TunnelEndpoint`s (quinn over tokio, mutual TLS with a `TestPki`),
//!   each on a current-thread runtime of its own, as the gateway's data-plane thread runs
//!   them. The echo task runs on west's runtime and the client on east's, so no extra
//!   thread is involved; the stream is read with `read_chunks` and written with
//!   `write_chunk`, as the proxy does.
//! - `proto-tokio`: the same TLS configuration and quinn-proto state machine without quinn:
//!   one task per side on a current-thread runtime feeds each datagram from a tokio UDP
//!   socket into the connection, sends its transmits, and keeps one timer at its next
//!   deadline. What a hand-written driver in the gateway would be.
//! - `proto-udp`: `proto-tokio` with its datagrams going through quinn-udp, as quinn's own
//!   socket does (ECN, destination address and GRO control messages, `recvmmsg` /
//!   `sendmsg`). A real driver needs them (ECN for congestion control, GRO and GSO for bulk
//!   transfer).
//! - `proto`: the same driver without tokio: a blocking socket per thread (timers served at
//!   a 2 ms receive timeout). The least a driver around quinn-proto could cost.
//! - `udp`: the datagrams alone: a 1 KB UDP ping-pong between the two threads, no QUIC.
//!
//! `tunnel` − `proto-udp` is what quinn's tasks, channels and locks cost per round trip;
//! `proto-udp` − `proto-tokio` is the control messages; `proto` − `udp` is QUIC itself
//! (packet protection, frames, ACKs).
//!
//! Prints each round, then per mode the medians over the rounds of p50 and p99 latency and of
//! the process's CPU per round trip (all threads, from `/proc/self/task/*/schedstat`), and the
//! median per-round differences between neighbouring modes.
//!
//! ```text
//! cargo run --release -p fedgate-tunnel --features test-util --example rr_floor -- 20 10000
//! ```
//! Arguments: rounds (default 10), round trips per round (default 10 000), and the modes to
//! run, comma-separated (default all; one mode alone is what to profile).

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use fedgate_discovery::exchange::delta::testing::export_set;
use fedgate_discovery::model::{ClusterId, ExportSet};
use fedgate_tunnel::testing::TestPki;
use fedgate_tunnel::tls::{self, Credentials, RejectionSink};
use fedgate_tunnel::{IncomingStream, PeerConfig, TunnelEndpoint, TunnelSettings};
use quinn::udp::{RecvMeta, UdpSocketState};
use quinn_proto::{
    ClientConfig, ConnectionHandle, DatagramEvent, Dir, EcnCodepoint, EndpointConfig, Event,
    ServerConfig, StreamEvent, TransportConfig,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const MSG: usize = 1024;
const WARMUP: usize = 500;

fn id(s: &str) -> anyhow::Result<ClusterId> {
    ClusterId::new(s).map_err(|e| anyhow::anyhow!("{e}"))
}

/// CPU nanoseconds of every thread of this process so far.
fn cpu_ns() -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        total += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(total)
}

/// One round's result: sorted latencies and CPU per round trip.
struct Round {
    lat: Vec<Duration>,
    cpu_ns: u64,
}

impl Round {
    fn pct(&self, p: f64) -> f64 {
        let i = ((self.lat.len() as f64 * p).ceil() as usize).clamp(1, self.lat.len()) - 1;
        self.lat[i].as_secs_f64() * 1e6
    }
}

/// Runs `n` round trips with `one` (which does one and returns when the reply is in) after a
/// warm-up, timing each.
async fn measure(
    n: usize,
    mut one: impl AsyncFnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Round> {
    for _ in 0..WARMUP {
        one().await?;
    }
    let mut lat = Vec::with_capacity(n);
    let cpu0 = cpu_ns()?;
    for _ in 0..n {
        let t = Instant::now();
        one().await?;
        lat.push(t.elapsed());
    }
    let cpu = cpu_ns()? - cpu0;
    lat.sort();
    Ok(Round { lat, cpu_ns: cpu / n as u64 })
}

/// A client whose round trips run on a runtime thread of its own (as the gateway's data-plane
/// thread): asked for a round of `n` round trips, it measures them there and sends the result
/// back.
struct RemoteClient {
    go: std_mpsc::SyncSender<usize>,
    done: std_mpsc::Receiver<anyhow::Result<Round>>,
}

impl RemoteClient {
    fn round(&self, n: usize) -> anyhow::Result<Round> {
        self.go.send(n).context("client thread ended")?;
        self.done.recv().context("client thread ended")?
    }
}

/// Serves `RemoteClient` rounds with `one` until the client is dropped. Waiting for the next
/// round blocks, so it happens on a blocking-pool thread; the round itself runs on this
/// runtime's thread alone.
async fn serve_rounds(
    go: std_mpsc::Receiver<usize>,
    done: std_mpsc::SyncSender<anyhow::Result<Round>>,
    mut one: impl AsyncFnMut() -> anyhow::Result<()>,
) {
    let go = Arc::new(std::sync::Mutex::new(go));
    loop {
        let rx = go.clone();
        let next = tokio::task::spawn_blocking(move || rx.lock().ok()?.recv().ok());
        let Ok(Some(n)) = next.await else { return };
        if done.send(measure(n, &mut one).await).is_err() {
            return;
        }
    }
}

/// Runs `body` on a current-thread runtime on a thread of its own, as the gateway runs its
/// data plane. The runtime is built here, so failing to build it is the caller's error.
fn runtime_thread<F: Future<Output = ()> + 'static>(
    body: impl FnOnce() -> F + Send + 'static,
) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || runtime.block_on(body()));
    Ok(())
}

// ------------------------------------------------------------------ tunnel: quinn + tokio

/// Gateway `me`'s tunnel endpoint with the one peer `peer` at `peer_address`, on the current
/// runtime. Also returns its incoming streams and the exports sender, which must stay alive.
fn tunnel_endpoint(
    pki: &TestPki,
    me: &str,
    peer: &str,
    peer_address: String,
) -> anyhow::Result<(TunnelEndpoint, mpsc::Receiver<IncomingStream>, watch::Sender<Arc<ExportSet>>)>
{
    let settings = TunnelSettings::new(
        "127.0.0.1:0".parse()?,
        pki.clusterset(),
        id(me)?,
        vec![PeerConfig::new(id(peer)?, peer_address)],
    );
    let (keep, _exports) = watch::channel(Arc::new(export_set(me, 1, 1)));
    // No peer sessions here: control streams are taken and dropped.
    let (control_tx, mut control) = mpsc::channel(64);
    tokio::spawn(async move { while control.recv().await.is_some() {} });
    let (incoming_tx, incoming) = mpsc::channel(4);
    let endpoint = TunnelEndpoint::new(settings, pki.issue(me), control_tx, incoming_tx)?;
    Ok((endpoint, incoming, keep))
}

fn tunnel_pair(pki: &Arc<TestPki>, stop: &CancellationToken) -> anyhow::Result<RemoteClient> {
    // west accepts and echoes on its own thread.
    let (west_tx, west_rx) = std_mpsc::channel::<anyhow::Result<SocketAddr>>();
    let (pki_west, stop_west) = (pki.clone(), stop.clone());
    runtime_thread(move || async move {
        // west's own peer address is never dialed.
        let made = tunnel_endpoint(&pki_west, "west", "east", "127.0.0.1:9".into());
        let (endpoint, mut incoming, _keep) = match made {
            Ok(x) => x,
            Err(e) => return drop(west_tx.send(Err(e))),
        };
        let _ = west_tx.send(Ok(endpoint.address()));
        tokio::spawn(endpoint.run(stop_west));
        // Echo every stream: chunks back as they come.
        while let Some(mut stream) = incoming.recv().await {
            tokio::spawn(async move {
                let mut chunks: Vec<Bytes> = vec![Bytes::new(); 16];
                while let Ok(Some(n)) = stream.recv.read_chunks(&mut chunks).await {
                    for c in chunks[..n].iter_mut() {
                        if stream.send.write_chunk(std::mem::take(c)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    })?;
    let west = west_rx.recv().context("west thread died")??;

    // east dials and runs the rounds on its own thread.
    let (go_tx, go_rx) = std_mpsc::sync_channel::<usize>(1);
    let (done_tx, done_rx) = std_mpsc::sync_channel::<anyhow::Result<Round>>(1);
    let (ready_tx, ready_rx) = std_mpsc::channel::<anyhow::Result<()>>();
    let (pki, stop) = (pki.clone(), stop.clone());
    runtime_thread(move || async move {
        let setup = async {
            let (endpoint, _incoming, keep) =
                tunnel_endpoint(&pki, "east", "west", west.to_string())?;
            let handle = endpoint.handle();
            tokio::spawn(endpoint.run(stop));
            let west_id = id("west")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !handle.is_connected(&west_id) {
                anyhow::ensure!(Instant::now() < deadline, "east never connected");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (send, recv, _) = handle.open_stream(&west_id).await?;
            Ok::<_, anyhow::Error>((send, recv, keep))
        };
        let (mut send, mut recv, _keep) = match setup.await {
            Ok(x) => x,
            Err(e) => return drop(ready_tx.send(Err(e))),
        };
        let _ = ready_tx.send(Ok(()));
        let request = Bytes::from(vec![0x5a; MSG]);
        let mut chunks: Vec<Bytes> = vec![Bytes::new(); 16];
        serve_rounds(go_rx, done_tx, async || {
            send.write_chunk(request.clone()).await?;
            let mut got = 0;
            while got < MSG {
                let k = recv.read_chunks(&mut chunks).await?.context("stream ended")?;
                got += chunks[..k].iter().map(Bytes::len).sum::<usize>();
            }
            Ok(())
        })
        .await;
    })?;
    ready_rx.recv().context("east thread died")??;
    Ok(RemoteClient { go: go_tx, done: done_rx })
}

mod proto;
use proto::*;

fn udp_pair(stop: &CancellationToken) -> anyhow::Result<(UdpSocket, SocketAddr)> {
    let server = UdpSocket::bind("127.0.0.1:0")?;
    server.set_read_timeout(Some(Duration::from_millis(100)))?;
    let addr = server.local_addr()?;
    let stop = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.is_cancelled() {
            if let Ok((n, from)) = server.recv_from(&mut buf) {
                let _ = server.send_to(&buf[..n], from);
            }
        }
    });
    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok((client, addr))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10_000);
    let all = ["udp", "proto", "proto-tokio", "proto-udp", "tunnel"];
    let names: Vec<&str> = match args.next() {
        Some(list) => {
            let picked: Vec<&str> =
                all.iter().copied().filter(|m| list.split(',').any(|p| p == *m)).collect();
            anyhow::ensure!(!picked.is_empty(), "no known mode in {list:?}; modes: {all:?}");
            picked
        }
        None => all.to_vec(),
    };
    let pki = Arc::new(TestPki::new("floor"));
    let stop = CancellationToken::new();

    let tunnel = tunnel_pair(&pki, &stop)?;
    let mut proto = proto_pair(&pki, &stop)?;
    let proto_tokio = proto_tokio_pair(&pki, &stop, false)?;
    let proto_udp = proto_tokio_pair(&pki, &stop, true)?;
    let (udp, udp_server) = udp_pair(&stop)?;
    let request = [0x5au8; MSG];
    let mut reply = [0u8; 2048];
    // Runs the blocking modes' rounds on this thread (their futures never wait).
    let local = tokio::runtime::Builder::new_current_thread().build()?;

    let mut results: Vec<Vec<Round>> = names.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for (i, name) in names.iter().enumerate() {
            let round = match *name {
                "udp" => local.block_on(measure(n, async || {
                    udp.send_to(&request, udp_server)?;
                    let (got, _) = udp.recv_from(&mut reply)?;
                    anyhow::ensure!(got == MSG, "udp echo of {got} bytes");
                    Ok(())
                }))?,
                "proto" => local.block_on(measure(n, async || proto.one()))?,
                "proto-tokio" => proto_tokio.round(n)?,
                "proto-udp" => proto_udp.round(n)?,
                _ => tunnel.round(n)?,
            };
            println!(
                "round {} {name:7} p50 {:6.1} us  p99 {:6.1} us  CPU {:5.1} us per round trip",
                r + 1,
                round.pct(0.50),
                round.pct(0.99),
                round.cpu_ns as f64 / 1e3
            );
            results[i].push(round);
        }
    }
    stop.cancel();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("\n| mode | p50 µs | p99 µs | CPU µs per round trip (whole process) |");
    println!("|---|---:|---:|---:|");
    for (name, rounds) in names.iter().zip(&results) {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            median(rounds.iter().map(|r| r.pct(0.50)).collect()),
            median(rounds.iter().map(|r| r.pct(0.99)).collect()),
            median(rounds.iter().map(|r| r.cpu_ns as f64 / 1e3).collect()),
        );
    }
    println!(
        "({rounds} interleaved rounds of {n} round trips of {MSG} B after {WARMUP} warm-up; medians)"
    );
    // Each pair of neighbours compared round by round (same moment on the machine).
    println!("\n| difference | p50 µs | p99 µs | CPU µs | rounds with more CPU |");
    println!("|---|---:|---:|---:|---:|");
    for w in (0..names.len()).collect::<Vec<_>>().windows(2).rev() {
        let (low, high) = (&results[w[0]], &results[w[1]]);
        let diff = |f: &dyn Fn(&Round) -> f64| {
            median(high.iter().zip(low).map(|(h, l)| f(h) - f(l)).collect())
        };
        let more = high.iter().zip(low).filter(|(h, l)| h.cpu_ns > l.cpu_ns).count();
        println!(
            "| {} − {} | {:+.1} | {:+.1} | {:+.1} | {more} of {rounds} |",
            names[w[1]],
            names[w[0]],
            diff(&|r| r.pct(0.50)),
            diff(&|r| r.pct(0.99)),
            diff(&|r| r.cpu_ns as f64 / 1e3),
        );
    }
    Ok(())
}
