//! Fault suite, issue 17 finding 4: resources stay bounded under abuse. Real gateway
//! processes on loopback, real backends, real client sockets: idle connections cost a few KB
//! and are closed after the idle timeout, connection caps reset the excess and count it, and
//! running out of descriptors never turns into an endpoint's health.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fedgate_e2e::faults::*;
use fedgate_e2e::*;

/// Opens `n` idle client connections to `vip` (each is through the gateway to the backend,
/// which has sent its name line: the gateway connected the upstream).
fn open_idle(vip: SocketAddr, n: usize) -> Result<Vec<TcpStream>> {
    (0..n)
        .map(|i| {
            open_idle_within(vip, Duration::from_secs(5))
                .with_context(|| format!("idle connection {i} through {vip}"))
        })
        .collect()
}

/// One idle connection, if it reaches the backend within `within`.
fn open_idle_within(vip: SocketAddr, within: Duration) -> Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&vip, within)?;
    s.set_read_timeout(Some(within))?;
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        s.read_exact(&mut byte)?;
    }
    Ok(s)
}

/// True when the gateway closed `s` (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let _ = s.set_read_timeout(Some(within));
    let mut rest = [0u8; 64];
    loop {
        match s.read(&mut rest) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    }
}

/// 1 000 idle connections through a ClusterSetIP to a local endpoint. Before the fix each
/// held two 64 KiB copy buffers from the start (RSS 18 → 312 MB for 5 000). Now an idle
/// connection holds no copy buffer: the gateway's RSS grows by a few KB per connection, and
/// its descriptors come back when the clients close.
#[test]
fn idle_connections_cost_a_few_kilobytes_and_give_everything_back() -> Result<()> {
    const N: usize = 1000;
    let tmp = tempfile::tempdir()?;
    let (alpha, _backend, vip) = lone_gateway_serving(tmp.path(), "", "idle", (70, 7100), 1024)?;
    let pid = alpha.pid().context("alpha's pid")?;
    // Warm up: a few connections with data, so allocator pools and tasks exist before the
    // baseline.
    for _ in 0..20 {
        round_trip(vip, Duration::from_secs(3))?;
    }
    let (rss0, fds0) = rss_kib_and_fds(pid)?;
    let conns = open_idle(vip, N)?;
    let (rss1, fds1) = rss_kib_and_fds(pid)?;
    let per_conn = (rss1.saturating_sub(rss0) * 1024) / N as u64;
    eprintln!(
        "{N} idle connections: RSS {rss0} → {rss1} KiB ({per_conn} bytes each), fds {fds0} → {fds1}"
    );
    // (Give or take a probe's socket open at either reading.)
    assert!(fds1 + 4 >= fds0 + 2 * N, "two descriptors per proxied connection: {fds0} → {fds1}");
    assert!(per_conn < 16 * 1024, "an idle connection costs a few KB, not {per_conn} bytes");
    drop(conns);
    let (rss2, fds2) =
        eventually("descriptors back after the clients close", Duration::from_secs(5), || {
            let (rss, fds) = rss_kib_and_fds(pid)?;
            Ok((fds <= fds0 + 4).then_some((rss, fds)))
        })?;
    eprintln!("after close: RSS {rss2} KiB, fds {fds2}");
    // A second round must not grow further (the finding: 312 MB, then 674 MB).
    let conns = open_idle(vip, N)?;
    drop(conns);
    let (rss3, _) = eventually("descriptors back after round two", Duration::from_secs(5), || {
        let (rss, fds) = rss_kib_and_fds(pid)?;
        Ok((fds <= fds0 + 4).then_some((rss, fds)))
    })?;
    eprintln!("after round two: RSS {rss3} KiB");
    assert!(
        rss3 <= rss1 + 2048,
        "a second round of idle connections reuses memory: {rss1} KiB with the first round open, {rss3} KiB after the second"
    );
    Ok(())
}

/// `traffic.connections.idleTimeout`: a connection that moves no byte is closed after the
/// timeout (counted); one that keeps talking stays open.
#[test]
fn idle_client_connections_are_closed_after_the_idle_timeout() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (alpha, _backend, vip) = lone_gateway_serving(
        tmp.path(),
        "traffic:\n  connections: { idleTimeout: 2s }\n",
        "quiet",
        (71, 7101),
        128,
    )?;
    let mut idle = open_idle(vip, 1)?.remove(0);
    let mut busy = open_idle(vip, 1)?.remove(0);
    let started = Instant::now();
    // The busy one sends a line every 500 ms for 4 s: twice the timeout.
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(busy.try_clone()?);
    while started.elapsed() < Duration::from_secs(4) {
        std::io::Write::write_all(&mut busy, b"tick\n")?;
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line)?;
        assert_eq!(line, "tick\n", "a talking connection stays open past the idle timeout");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(closed_within(&mut idle, Duration::from_millis(100)), "the idle one was closed");
    let timeouts = metric(&alpha, "fedgate_idle_timeouts_total", &[])?;
    assert_eq!(timeouts, 1.0, "one idle timeout counted");
    Ok(())
}

/// `traffic.connections.max` and `maxPerService`: the connection over a cap is reset at once
/// and counted; the other service keeps its places; a freed place is taken again.
#[test]
fn connection_caps_reset_the_excess_and_count_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let caps = "traffic:\n  connections: { max: 8, maxPerService: 5 }\n";
    let (alpha, block) = lone_gateway(tmp.path(), caps)?;
    let a_addr = block.addr(72, 7102);
    let b_addr = block.addr(73, 7102);
    let _a = Backend::start(a_addr, "a-1", 128)?;
    let _b = Backend::start(b_addr, "b-1", 128)?;
    export_backend(&alpha, "a", a_addr)?;
    export_backend(&alpha, "b", b_addr)?;
    let vip_a = wait_import_vip(&alpha, "fault", "a", &["alpha"], 80)?;
    let vip_b = wait_import_vip(&alpha, "fault", "b", &["alpha"], 80)?;
    let mut held_a = open_idle(vip_a, 5)?;
    assert!(round_trip(vip_a, Duration::from_secs(3)).is_err(), "a's sixth is refused");
    let held_b = open_idle(vip_b, 3)?;
    assert!(round_trip(vip_b, Duration::from_secs(3)).is_err(), "the gateway's ninth is refused");
    let service_hits =
        metric(&alpha, "fedgate_connection_limit_hits_total", &[("scope", "service")])?;
    let gateway_hits =
        metric(&alpha, "fedgate_connection_limit_hits_total", &[("scope", "gateway")])?;
    assert_eq!((service_hits, gateway_hits), (1.0, 1.0), "each cap counted once");
    drop(held_a.pop());
    eventually("a freed place is taken again", Duration::from_secs(5), || {
        Ok(round_trip(vip_a, Duration::from_secs(3)).ok())
    })?;
    drop((held_a, held_b));
    Ok(())
}

/// Out of descriptors: the gateway's limit is lowered (prlimit) so that idle connections
/// take every descriptor. Before the fix the health probes failed with EMFILE, every local
/// endpoint was marked Unhealthy and exported so. Now such a probe is inconclusive and the
/// endpoint stays Healthy; accepts that fail are counted and logged once per 10 s; when the
/// connections close, everything works again.
#[test]
fn running_out_of_descriptors_never_marks_an_endpoint_unhealthy() -> Result<()> {
    require_tool("prlimit", "util-linux");
    let tmp = tempfile::tempdir()?;
    let (alpha, _backend, vip) = lone_gateway_serving(tmp.path(), "", "fds", (74, 7103), 1024)?;
    let pid = alpha.pid().context("alpha's pid")?;
    eventually("the endpoint probed healthy", PROPAGATION, || {
        let e = alpha.json("/debug/explain?service=fault/fds")?;
        Ok((e["endpoints"][0]["health"] == "Healthy").then_some(()))
    })?;
    // Lower the soft descriptor limit below every descriptor number in use: each new socket
    // (a probe's, an accept's, an upstream's) now fails with EMFILE, as when idle clients
    // hold them all.
    let set_limit = |soft: &str| -> Result<()> {
        let st = std::process::Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:20000")])
            .status()?;
        anyhow::ensure!(st.success(), "prlimit --pid {pid} --nofile={soft}:20000");
        Ok(())
    };
    set_limit("3")?;
    // A client connection that gets no place: an accept that fails (it waits in the
    // kernel's queue).
    let held = TcpStream::connect_timeout(&vip, Duration::from_secs(1));
    // The admin port cannot accept either now: watch the log, which needs no descriptor.
    eventually("probes that cannot run", Duration::from_secs(10), || {
        Ok((alpha.log_text().matches("probe could not run here").count() >= 2).then_some(()))
    })?;
    set_limit("20000")?;
    drop(held);
    eventually(
        "connections work again once descriptors are back",
        Duration::from_secs(10),
        || Ok(round_trip(vip, Duration::from_secs(2)).ok()),
    )?;
    let log = alpha.log_text();
    assert!(
        !log.contains("health=Unhealthy"),
        "EMFILE is not the endpoint's: it never became Unhealthy"
    );
    let explain = alpha.json("/debug/explain?service=fault/fds")?;
    assert_eq!(explain["endpoints"][0]["health"], "Healthy", "{explain}");
    let inconclusive = metric(&alpha, "fedgate_probes_inconclusive_total", &[])?;
    assert!(inconclusive >= 2.0, "inconclusive probes counted: {inconclusive}");
    let lines = log.matches("accept failed").count();
    assert!(lines <= 2, "accept failures are logged once per 10 s, got {lines} lines");
    eprintln!(
        "inconclusive probes {inconclusive}, accept errors {}",
        metric(&alpha, "fedgate_accept_errors_total", &[])?
    );
    Ok(())
}

/// Junk at the tunnel port: 2 000 datagrams of random bytes are counted, the QUIC traffic of
/// the peer connection beside them is not, and that connection goes on undisturbed. Before,
/// quinn dropped junk silently and nothing showed the flood.
#[test]
fn junk_datagrams_at_the_tunnel_port_are_counted_and_harm_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let gateways = start_mesh(tmp.path(), block, CLUSTERSET, &["alpha", "bravo"], |_, _| {})?;
    let [alpha, bravo] = &gateways[..] else { unreachable!() };
    bravo.write_cluster_file("web.yaml", &export_yaml("web", "127.250.9.9", 7200))?;
    wait_import_vip(alpha, "fault", "web", &["bravo"], 80)?;
    let before = metric(alpha, "fedgate_tunnel_junk_datagrams_total", &[])?;
    assert_eq!(before, 0.0, "the peers' own QUIC traffic is never counted as junk");
    let socket = std::net::UdpSocket::bind(block.addr(90, 0))?;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x9e37_79b9);
    let mut sent = 0u32;
    for _ in 0..2000 {
        let mut datagram = vec![0u8; rand::Rng::random_range(&mut rng, 64..1164)];
        rand::RngCore::fill_bytes(&mut rng, &mut datagram);
        socket.send_to(&datagram, alpha.spec.tunnel)?;
        sent += 1;
    }
    let counted = eventually("junk datagrams counted", Duration::from_secs(5), || {
        let n = metric(alpha, "fedgate_tunnel_junk_datagrams_total", &[])?;
        Ok((n >= f64::from(sent) * 0.99).then_some(n))
    })?;
    eprintln!("{sent} junk datagrams sent, {counted} counted");
    assert!(counted <= f64::from(sent), "only the junk is counted: {counted} of {sent}");
    // Nothing else was lost: the peer connection stayed up and exports still flow.
    let disconnects = metric(alpha, "fedgate_peer_disconnects_total", &[])?;
    assert_eq!(disconnects, 0.0, "the flood cost no peer connection");
    bravo.write_cluster_file("api.yaml", &export_yaml("api", "127.250.9.10", 7201))?;
    wait_import_vip(alpha, "fault", "api", &["bravo"], 80)?;
    Ok(())
}
