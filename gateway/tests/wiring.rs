//! The wiring, in-process (issue 18, item 8): two whole gateways built by the composition root
//! (`app::build`, the function `fedgate run` uses) from config files on loopback ports, peered
//! over the QUIC tunnel. West exports a TCP echo service; east must answer for it over DNS,
//! accept a connection on its ClusterSetIP and carry it through the tunnel to west's endpoint,
//! and answer on its admin port (`/healthz`, `/readyz`, `/metrics`, `/debug/*`). No binary is
//! spawned; every wait is bounded.
//!
//! ClusterSetIP ranges are taken in 127.254.0.0/16: all of 127.0.0.0/8 is local on Linux, so
//! the listeners bind there without IP_FREEBIND or root, and the end-to-end harness never uses
//! 127.254 (its blocks are 127.1–200.x).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fedgate::app::{self, Bound};
use fedgate_tunnel::testing::TestPki;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on each wait of the test.
const WAIT: Duration = Duration::from_secs(30);
const CLUSTERSET: &str = "wiring";
/// The service port of the echo service (on its ClusterSetIP).
const SERVICE_PORT: u16 = 7000;

#[test]
fn gateway_wiring_in_process() -> Result<()> {
    // What `main` does: the process installs the recorder, the library never does.
    let metrics = fedgate::metrics::install();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(wiring(metrics))
}

async fn wiring(metrics: Option<PrometheusHandle>) -> Result<()> {
    let root = tempfile::tempdir()?;
    let pki = TestPki::new(CLUSTERSET);
    let echo = echo_server().await?;
    // Each gateway names the other's tunnel address in its config: reserve two UDP ports.
    let (east_tunnel, west_tunnel) = (free_udp_port()?, free_udp_port()?);
    // Distinct per process, so parallel runs of this test do not share ClusterSetIPs.
    let net = (std::process::id() % 250) as u8;
    let east_range = format!("127.254.{net}.0/27");
    let west_range = format!("127.254.{net}.32/27");

    let west_dir = root.path().join("west");
    std::fs::create_dir_all(west_dir.join("cluster"))?;
    std::fs::write(west_dir.join("cluster/echo.yaml"), echo_yaml(echo.port()))?;
    let west =
        build(&pki, &west_dir, "west", west_tunnel, ("east", east_tunnel), &west_range, None)
            .await
            .context("building west")?;
    let east_dir = root.path().join("east");
    std::fs::create_dir_all(east_dir.join("cluster"))?;
    let east =
        build(&pki, &east_dir, "east", east_tunnel, ("west", west_tunnel), &east_range, metrics)
            .await
            .context("building east")?;
    assert_eq!(east.tunnel, east_tunnel, "the tunnel reports the address it bound");
    assert_ne!(east.admin.port(), 0, "the admin port actually bound is reported");
    assert_ne!(east.dns.port(), 0, "the DNS port actually bound is reported");
    // The tunnel's UDP port is taken by the gateway.
    assert!(UdpSocket::bind(east.tunnel).is_err(), "east's tunnel port is not bound");

    let (east_admin, east_dns) = (east.admin, east.dns);
    let (east_stop, west_stop) = (east.shutdown.clone(), west.shutdown.clone());
    let east_run = tokio::spawn(east.run());
    let west_run = tokio::spawn(west.run());

    // Admin: alive at once, ready once discovery synced and the listeners are bound.
    let (code, body) = http_get(east_admin, "/healthz").await?;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    eventually("east /readyz 200", || async {
        Ok(http_get(east_admin, "/readyz").await?.0 == 200)
    })
    .await?;

    // DNS: the import from west answers with a ClusterSetIP of east's range, once the export
    // exchange over the tunnel has brought it.
    let name = "echo.demo.svc.clusterset.local";
    let vip = eventually_some("east's DNS answers the import", || async {
        Ok(dns_a(east_dns, name).await?.first().copied())
    })
    .await?;
    let range: ipnet::Ipv4Net = east_range.parse()?;
    assert!(range.contains(&vip), "{name} answered {vip}, outside east's range {range}");

    // The ClusterSetIP listener accepts, and the tunnel carries the bytes to west's endpoint.
    let reply = eventually_some("an echo through east's ClusterSetIP and the tunnel", || async {
        Ok(echo_through(SocketAddr::from((vip, SERVICE_PORT))).await.ok())
    })
    .await?;
    assert_eq!(reply, b"wired\n");

    // The views each part renders, as the admin server serves them.
    let (code, imports) = http_get(east_admin, "/debug/imports?service=demo/echo").await?;
    assert_eq!(code, 200, "{imports}");
    let imports: serde_json::Value = serde_json::from_str(&imports)?;
    assert_eq!(imports[0]["name"], "echo", "{imports}");
    assert!(imports[0]["clusters"]["west"].is_object(), "{imports}");
    let (code, endpoints) = http_get(east_admin, "/debug/endpoints").await?;
    assert_eq!(code, 200, "{endpoints}");
    let endpoints: serde_json::Value = serde_json::from_str(&endpoints)?;
    assert_eq!(endpoints["cluster"], "east", "{endpoints}");
    let (code, peers) = http_get(east_admin, "/debug/peers").await?;
    assert_eq!(code, 200, "{peers}");
    assert!(peers.contains("west"), "{peers}");
    for view in ["exports", "problems", "certificates", "clusters", "config"] {
        let (code, body) = http_get(east_admin, &format!("/debug/{view}")).await?;
        assert_eq!(code, 200, "/debug/{view}: {body}");
        serde_json::from_str::<serde_json::Value>(&body)
            .with_context(|| format!("/debug/{view} is not JSON: {body}"))?;
    }
    let (code, text) = http_get(east_admin, "/metrics").await?;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("fedgate_"), "no fedgate series in /metrics:\n{text}");

    // Shutdown: cancelling the handle drains and stops each gateway within the bound.
    east_stop.cancel();
    west_stop.cancel();
    for (id, run) in [("east", east_run), ("west", west_run)] {
        tokio::time::timeout(WAIT, run)
            .await
            .with_context(|| format!("{id} did not stop within {WAIT:?}"))?
            .with_context(|| format!("{id}'s task panicked"))?
            .with_context(|| format!("{id} stopped with an error"))?;
    }
    assert!(TcpStream::connect(east_admin).await.is_err(), "admin still answers after stop");
    Ok(())
}

/// Writes certificates and a config for `id` into `dir` (`metrics`: the handle its `/metrics`
/// renders) and builds the gateway through the
/// same path as `fedgate run`: `config::load`, `resolve_cluster_id`, `app::build`.
async fn build(
    pki: &TestPki,
    dir: &Path,
    id: &str,
    tunnel: SocketAddr,
    peer: (&str, SocketAddr),
    range: &str,
    metrics: Option<PrometheusHandle>,
) -> Result<Bound> {
    let (cert, key, ca) = pki.write_pem(dir, id)?;
    let config = format!(
        "cluster: {{ id: {id}, clusterset: {CLUSTERSET}, locality: {{ region: r-{id}, zone: z-{id} }} }}\n\
         discovery: {{ source: file, file: {{ dir: {cluster} }}, peerLeaseDuration: 15s }}\n\
         peers:\n  - {{ id: {peer}, address: \"{peer_addr}\" }}\n\
         tls: {{ cert: {cert}, key: {key}, ca: {ca} }}\n\
         tunnel: {{ listen: \"{tunnel}\" }}\n\
         dns: {{ listen: \"127.0.0.1:0\", upstream: [\"127.0.0.1:9\"], ttl: 5s }}\n\
         front: {{ mode: vip, clusterSetIPRange: {range}, stateDir: {state} }}\n\
         admin: {{ listen: \"127.0.0.1:0\" }}\n\
         traffic: {{ drainDuration: 1s, healthCheck: {{ interval: 200ms, timeout: 100ms }} }}\n",
        cluster = dir.join("cluster").display(),
        peer = peer.0,
        peer_addr = peer.1,
        cert = cert.display(),
        key = key.display(),
        ca = ca.display(),
        state = dir.join("state").display(),
    );
    let path = dir.join("fedgate.yaml");
    std::fs::write(&path, config)?;
    let loaded = fedgate::config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = app::resolve_cluster_id(loaded)?;
    app::build(cfg, metrics).await
}

/// A Service `demo/echo` (port [`SERVICE_PORT`]) whose one endpoint is 127.0.0.1:`port`,
/// exported.
fn echo_yaml(port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: echo, namespace: demo }}\n\
         spec:\n  ports:\n  - {{ name: tcp, port: {SERVICE_PORT}, targetPort: {port}, protocol: TCP }}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: echo-1\n  namespace: demo\n  labels: {{ kubernetes.io/service-name: echo }}\n\
         addressType: IPv4\nports:\n- {{ name: tcp, port: {port}, protocol: TCP }}\n\
         endpoints:\n- addresses: [\"127.0.0.1\"]\n  conditions: {{ ready: true }}\n\
         ---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\n\
         metadata:\n  name: echo\n  namespace: demo\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\n"
    )
}

/// A TCP echo server on 127.0.0.1 (the endpoint behind west's export); returns its address.
async fn echo_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Sends a line through `addr`, half-closes and reads the answer to the end.
async fn echo_through(addr: SocketAddr) -> Result<Vec<u8>> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut conn = TcpStream::connect(addr).await?;
        conn.write_all(b"wired\n").await?;
        conn.shutdown().await?;
        let mut reply = Vec::new();
        conn.read_to_end(&mut reply).await?;
        if reply.is_empty() {
            bail!("the connection closed without an answer");
        }
        Ok(reply)
    })
    .await?
}

/// A UDP port free on 127.0.0.1 right now.
fn free_udp_port() -> Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// The A records of `name` from the DNS server at `server` (one raw UDP query, RFC 1035).
async fn dns_a(server: SocketAddr, name: &str) -> Result<Vec<Ipv4Addr>> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(u8::try_from(label.len())?);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    socket.send_to(&query, server).await?;
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await??;
    parse_a_records(&buf[..n])
}

/// The A records in the answer section of a DNS response.
fn parse_a_records(msg: &[u8]) -> Result<Vec<Ipv4Addr>> {
    let u16_at = |i: usize| -> Result<u16> {
        let b = msg.get(i..i + 2).context("truncated DNS message")?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    };
    let skip_name = |mut i: usize| -> Result<usize> {
        loop {
            let len = *msg.get(i).context("truncated name")?;
            if len & 0xC0 == 0xC0 {
                return Ok(i + 2);
            }
            if len == 0 {
                return Ok(i + 1);
            }
            i += 1 + usize::from(len);
        }
    };
    let (questions, answers) = (u16_at(4)?, u16_at(6)?);
    let mut i = 12;
    for _ in 0..questions {
        i = skip_name(i)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..answers {
        i = skip_name(i)?;
        let (rtype, len) = (u16_at(i)?, usize::from(u16_at(i + 8)?));
        let data = msg.get(i + 10..i + 10 + len).context("truncated record")?;
        if rtype == 1 && len == 4 {
            out.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + len;
    }
    Ok(out)
}

/// A minimal HTTP/1.0 GET over a raw socket: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await?;
        let code = buf.get(9..12).context("no HTTP status line")?.parse()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((code, body))
    })
    .await?
}

/// Polls `f` until it is true, at most [`WAIT`]; errors of `f` count as not yet.
async fn eventually<F, Fut>(what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    eventually_some(what, || {
        let fut = f();
        async move { Ok(fut.await?.then_some(())) }
    })
    .await
}

/// Polls `f` until it gives a value, at most [`WAIT`]; errors of `f` count as not yet.
async fn eventually_some<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "not yet".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: not within {WAIT:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
