//! The tunnel's own ceiling for one stream, without TCP at either end: two real
//! `TunnelEndpoint`s (mutual TLS with a `TestPki`, loopback UDP), each on its own thread with a
//! current-thread runtime as two gateways' data-plane threads would be, one data stream,
//! `BYTES` sent with `write_chunk` on the sender's thread and read with `read_chunks` on the
//! receiver's (as quinn-perf runs its client and server, one thread each). Prints Gb/s and CPU seconds per GB of the whole process (both ends).
//!
//! ```text
//! cargo run --release -p fedgate-tunnel --features test-util --example quic_ceiling -- 1452 4
//! cargo run --release -p fedgate-tunnel --features test-util --example quic_ceiling -- 8952 4
//! ```
//! Arguments: tunnel.maxUdpPayloadSize (default 1452), GB to send (default 4).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use fedgate_discovery::exchange::delta::testing::export_set;
use fedgate_discovery::model::ClusterId;
use fedgate_tunnel::testing::TestPki;
use fedgate_tunnel::{IncomingStream, PeerConfig, PeerHandle, TunnelEndpoint, TunnelSettings};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

const CHUNK: usize = 64 * 1024;

fn id(s: &str) -> anyhow::Result<ClusterId> {
    ClusterId::new(s).map_err(|e| anyhow::anyhow!("{e}"))
}

/// CPU time (user + system) of this process so far.
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let rest = stat.rsplit_once(") ").context("parsing /proc/self/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

struct Started {
    address: SocketAddr,
    handle: PeerHandle,
    incoming: Option<mpsc::Receiver<IncomingStream>>,
    /// The gateway's runtime: the stream's writer (east) and reader (west) run on it, beside
    /// quinn's tasks, as a gateway's proxy tasks run on its data-plane thread.
    runtime: tokio::runtime::Handle,
}

/// Runs gateway `me` on its own thread with a current-thread runtime until `stop` is
/// cancelled: quinn's endpoint and connection tasks run there (`TunnelSettings::runtime`), as
/// on a gateway's data-plane thread.
fn gateway(
    pki: Arc<TestPki>,
    me: &'static str,
    peer: (&'static str, SocketAddr),
    payload: u16,
    stop: CancellationToken,
) -> anyhow::Result<Started> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let handle = runtime.handle().clone();
        runtime.block_on(async move {
            let started = (|| {
                let mut settings = TunnelSettings::new(
                    "127.0.0.1:0".parse()?,
                    pki.clusterset(),
                    id(me)?,
                    vec![PeerConfig::new(id(peer.0)?, peer.1.to_string())],
                );
                settings.max_udp_payload = payload;
                settings.shards = vec![handle.clone()];
                // Experiments: CEILING_WINDOWS=<stream bytes>,<connection bytes>.
                if let Ok(w) = std::env::var("CEILING_WINDOWS") {
                    let (s, c) = w.split_once(',').context("CEILING_WINDOWS=stream,connection")?;
                    settings.stream_receive_window = s.parse()?;
                    settings.connection_receive_window = c.parse()?;
                }
                if let Ok(b) = std::env::var("CEILING_SOCKET_BUFFER") {
                    settings.socket_buffer = b.parse()?;
                }
                let (_exports_tx, _exports) = watch::channel(Arc::new(export_set(me, 1, 1)));
                // No peer sessions here: control streams are taken and dropped.
                let (control_tx, mut control) = mpsc::channel(64);
                tokio::spawn(async move { while control.recv().await.is_some() {} });
                let (incoming_tx, incoming) = mpsc::channel(4);
                let endpoint =
                    TunnelEndpoint::new(settings, pki.issue(me), control_tx, incoming_tx)?;
                let started = Started {
                    address: endpoint.address(),
                    handle: endpoint.handle(),
                    incoming: Some(incoming),
                    runtime: handle,
                };
                tokio::spawn(endpoint.run(stop.clone()));
                Ok::<_, anyhow::Error>((started, _exports_tx))
            })();
            match started {
                Ok((started, _keep)) => {
                    let _ = tx.send(Ok(started));
                    stop.cancelled().await;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
    });
    rx.blocking_recv().context("gateway thread died")?
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let payload: u16 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1452);
    let gigabytes: f64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4.0);
    let total = (gigabytes * 1e9) as u64;
    let pki = Arc::new(TestPki::new("ceiling"));
    let stop = CancellationToken::new();
    // west accepts (its peer address is never dialed), east dials west.
    let mut west =
        gateway(pki.clone(), "west", ("east", "127.0.0.1:9".parse()?), payload, stop.clone())?;
    let east = gateway(pki, "east", ("west", west.address), payload, stop.clone())?;
    let mut incoming = west.incoming.take().context("incoming")?;

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (elapsed, cpu) = runtime.block_on(async move {
        let west_id = id("west")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !east.handle.is_connected(&west_id) {
            anyhow::ensure!(Instant::now() < deadline, "east never connected to west");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (mut send, _recv, _) = east.handle.open_stream(&west_id).await?;
        send.write_chunk(Bytes::from_static(b"go")).await?;
        let mut stream = incoming.recv().await.context("no incoming stream")?;
        let mut hello = [0u8; 2];
        stream.recv.read_exact(&mut hello).await?;
        // The reader on west's thread, the writer on east's: no hand-off between threads but
        // the packets themselves.
        let reader = west.runtime.spawn(async move {
            let mut chunks: Vec<Bytes> = vec![Bytes::new(); 64];
            let mut got = 0u64;
            while let Some(n) = stream.recv.read_chunks(&mut chunks).await? {
                got += chunks[..n].iter().map(|c| c.len() as u64).sum::<u64>();
            }
            Ok::<_, anyhow::Error>(got)
        });
        let cpu0 = cpu_seconds()?;
        let start = Instant::now();
        let writer = east.runtime.spawn(async move {
            let block = Bytes::from(vec![0x5a; CHUNK]);
            let mut sent = 0u64;
            while sent < total {
                send.write_chunk(block.clone()).await?;
                sent += CHUNK as u64;
            }
            send.finish()?;
            Ok::<_, anyhow::Error>(sent)
        });
        let sent = writer.await??;
        let got = reader.await??;
        let elapsed = start.elapsed();
        anyhow::ensure!(got == sent, "sent {sent} bytes, received {got}");
        Ok::<_, anyhow::Error>((elapsed, cpu_seconds()? - cpu0))
    })?;
    stop.cancel();
    let gb = total as f64 / 1e9;
    println!(
        "maxUdpPayloadSize {payload}: {gb:.1} GB in {:.2} s = {:.2} Gb/s, {:.2} CPU s/GB (both ends, one process)",
        elapsed.as_secs_f64(),
        gb * 8.0 / elapsed.as_secs_f64(),
        cpu / gb
    );
    Ok(())
}
