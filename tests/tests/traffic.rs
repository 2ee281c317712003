//! Traffic across network namespaces: one namespace per cluster joined by a veth pair (the
//! tunnel port is reachable only across it), one `fedgate run` in each, backends as real
//! Python servers. Clients run inside cluster `alpha`'s namespace and reach services through
//! alpha's ClusterSetIPs. Needs root, `ip`, `curl` and `python3` (fails otherwise).
//!
//! `FEDGATE_NETNS_BYTES` overrides the size of the bulk transfer (default 1 GiB).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_e2e::netns::*;
use fedgate_e2e::*;

const CLUSTERSET: &str = "netns";
const PROPAGATION: Duration = Duration::from_secs(15);
/// Backends of alpha listen on 127.0.1.1 in alpha's namespace, bravo's on 127.0.2.1 in bravo's.
const A_BACKEND: &str = "127.0.1.1";
const B_BACKEND: &str = "127.0.2.1";

struct Clusters {
    net: Pair,
    a: NsGateway,
    b: NsGateway,
}

/// Two namespaces, a PKI, and gateways `alpha` (in `a`) and `bravo` (in `b`) peered over the
/// veth pair. `extra_a` is appended to alpha's config.
fn clusters(extra_a: &str) -> Result<Clusters> {
    clusters_with(extra_a, "")
}

/// As [`clusters`], with `tunnel_a` (e.g. `socketBufferSize: 65536`) added to alpha's
/// `tunnel` block.
fn clusters_with(extra_a: &str, tunnel_a: &str) -> Result<Clusters> {
    require_tools();
    let net = Pair::new()?;
    let (mut a, mut b) = net.prepare_gateways(CLUSTERSET, ["alpha", "bravo"], extra_a)?;
    if !tunnel_a.is_empty() {
        let listen = format!("listen: \"{}\"", a.gw.spec.tunnel);
        a.gw.edit_config(&listen, &format!("{listen}, {tunnel_a}"))?;
    }
    a.launch()?;
    b.launch()?;
    Ok(Clusters { net, a, b })
}

/// Exports `ns/name` (port 80 -> `target`) from `gw` with one ready endpoint `ip`.
fn export(gw: &NsGateway, ns: &str, name: &str, ip: &str, target: u16) -> Result<()> {
    gw.gw.write_cluster_file(
        &format!("{name}.yaml"),
        &exported_service(ns, name, ("tcp", 80, target), ip),
    )
}

/// An HTTP backend in `ns` serving `/cluster.txt` = `cluster`.
fn http_backend(net: &Pair, ns: &Netns, cluster: &str, ip: &str, port: u16) -> Result<NsProc> {
    let dir = net.dir().join(format!("www-{cluster}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("cluster.txt"), format!("{cluster}\n"))?;
    net.server(ns, &["http", ip, &port.to_string(), dir.to_str().context("utf-8 path")?])
}

/// Sends `bytes` from alpha's namespace to the sink behind `vip`:80 and checks that the sink
/// got all of them, byte-exact (length and sha256 on both sides). Returns the seconds taken.
fn send_to_sink(net: &Pair, vip: &str, bytes: u64, timeout: Duration) -> Result<f64> {
    let mut p = net.tool(&net.a, &["send", vip, "80", &bytes.to_string()])?;
    let line = p.line(timeout)?;
    let v: serde_json::Value = serde_json::from_str(&line).with_context(|| line.clone())?;
    assert_eq!(v["sent"].as_u64(), Some(bytes));
    let want = format!("{bytes} {}", v["sha256"].as_str().unwrap_or("?"));
    assert_eq!(v["reply"].as_str(), Some(want.as_str()), "byte-exact at the sink: {v}");
    Ok(v["secs"].as_f64().unwrap_or(0.0))
}

/// `curl` inside alpha's namespace; returns the body.
/// An echo server in bravo, exported, and one connection to it held open through alpha's
/// ClusterSetIP (`fgtool hold`: "ping" → "PONG", "close" → "CLOSED <bytes after FIN>").
/// Returns the server (stops when dropped), the held connection and the ClusterSetIP.
fn echo_held_through_alpha(c: &Clusters) -> Result<(NsProc, NsProc, String)> {
    let net = &c.net;
    let echo = net.server(&net.b, &["echo", B_BACKEND, "7000"])?;
    export(&c.b, "demo", "echo", B_BACKEND, 7000)?;
    let vip = wait_vip(&c.a, "demo", "echo", &["bravo"], PROPAGATION)?;
    let hold = eventually("a connection through alpha", PROPAGATION, || {
        let mut p = net.tool(&net.a, &["hold", &vip, "80"])?;
        Ok((p.line(Duration::from_secs(10)).ok().as_deref() == Some("OPEN")).then_some(p))
    })?;
    Ok((echo, hold, vip))
}

fn curl_in(ns: &Netns, url: &str) -> Result<String> {
    Ok(run(ns.command("curl").args(["-sS", "-m", "5", url]))?.trim().to_owned())
}

/// Alpha's own endpoint `ip` of service `name` in a `/debug/endpoints` answer.
fn local_endpoint(debug: &serde_json::Value, name: &str, ip: &str) -> Result<serde_json::Value> {
    let services = debug["services"].as_array().context("services in /debug/endpoints")?;
    services
        .iter()
        .filter(|s| s["service"]["name"] == name)
        .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["cluster"] == "alpha" && e["address"] == ip)
        .cloned()
        .with_context(|| format!("alpha endpoint {ip} of {name} in {debug}"))
}

#[test]
fn curl_through_alpha_reaches_bravo_local_wins_failover_and_back() -> Result<()> {
    let c = clusters("")?;
    let (net, a, b) = (&c.net, &c.a, &c.b);

    // 1. A service only bravo has: curl in alpha's namespace reaches it through the tunnel.
    let _b_only = http_backend(net, &net.b, "bravo-only", B_BACKEND, 8081)?;
    export(b, "demo", "remote", B_BACKEND, 8081)?;
    let vip = wait_vip(a, "demo", "remote", &["bravo"], PROPAGATION)?;
    let url = format!("http://{vip}/cluster.txt");
    let body =
        eventually("curl through alpha to bravo", PROPAGATION, || Ok(curl_in(&net.a, &url).ok()))?;
    assert_eq!(body, "bravo-only");
    // The backend itself is not reachable from alpha's namespace: only the tunnel carries it.
    assert!(
        curl_in(&net.a, &format!("http://{B_BACKEND}:8080/cluster.txt")).is_err(),
        "bravo's backend must not be reachable directly from alpha's namespace"
    );

    // 2. Backends in both clusters: traffic stays in alpha.
    let mut a_web = http_backend(net, &net.a, "alpha", A_BACKEND, 8080)?;
    let _b_web = http_backend(net, &net.b, "bravo", B_BACKEND, 8080)?;
    export(a, "demo", "web", A_BACKEND, 8080)?;
    export(b, "demo", "web", B_BACKEND, 8080)?;
    let vip = wait_vip(a, "demo", "web", &["alpha", "bravo"], PROPAGATION)?;
    let url = format!("http://{vip}/cluster.txt");
    eventually("alpha's web VIP to answer from alpha", PROPAGATION, || {
        Ok(curl_in(&net.a, &url).ok().filter(|b| b == "alpha"))
    })?;

    // 3. 200 sequential connections, 20 ms apart (the 150 after the kill span the health
    // checker's detection, ~2 s); before number 50 alpha's backend is killed (SIGKILL).
    const TOTAL: usize = 200;
    const KILL_AT: usize = 50;
    let args = ["http-loop", &url, &TOTAL.to_string(), &KILL_AT.to_string(), "20"];
    let mut client = net.tool(&net.a, &args)?;
    let mut answers = Vec::with_capacity(TOTAL);
    let started = Instant::now();
    loop {
        let line = client.line(Duration::from_secs(30))?;
        match line.as_str() {
            "DONE" => break,
            "PAUSE" => {
                a_web.kill();
                client.send("go")?;
            }
            _ => answers.push(line),
        }
    }
    let elapsed = started.elapsed();
    let failed: Vec<&String> = answers.iter().filter(|l| !l.starts_with("ok ")).collect();
    assert!(failed.is_empty(), "failed client connections: {failed:?}");
    assert_eq!(answers.len(), TOTAL);
    let cluster_of = |l: &String| l.rsplit(' ').next().unwrap_or_default().to_owned();
    let before: Vec<String> = answers[..KILL_AT].iter().map(cluster_of).collect();
    let after: Vec<String> = answers[KILL_AT..].iter().map(cluster_of).collect();
    assert!(before.iter().all(|c| c == "alpha"), "with both up, alpha serves: {before:?}");
    assert!(after.iter().all(|c| c == "bravo"), "alpha's backend down, bravo serves: {after:?}");
    eprintln!("{TOTAL} connections, 0 failed, failover at #{KILL_AT}, {elapsed:?}");
    // Alpha's own endpoint is now out of the candidates (probe failures or passive ejection).
    let skipped =
        eventually("alpha's dead endpoint to be skipped", Duration::from_secs(10), || {
            let view = local_endpoint(&a.json("/debug/endpoints")?, "web", A_BACKEND)?;
            Ok((view["healthy"] == false).then(|| view["skipped"].clone()))
        })?;
    eprintln!("alpha's killed endpoint skipped for {skipped}");

    // 4. Alpha's backend comes back: traffic returns to alpha (health check + ejection bound).
    let _a_web = http_backend(net, &net.a, "alpha", A_BACKEND, 8080)?;
    let restored = Instant::now();
    eventually("traffic back in alpha", Duration::from_secs(30), || {
        Ok(curl_in(&net.a, &url).ok().filter(|b| b == "alpha"))
    })?;
    eprintln!("traffic back in alpha {:?} after restoring its backend", restored.elapsed());
    // And it stays there.
    for _ in 0..10 {
        assert_eq!(curl_in(&net.a, &url)?, "alpha");
    }
    Ok(())
}

#[test]
fn half_close_gets_reply_and_bulk_transfer_is_byte_exact() -> Result<()> {
    // alpha carries traffic on three data-plane threads, bravo on its default (the CPUs it
    // may use): alpha dials a lane per thread, which bravo spreads over its threads, each
    // reading a socket of its own. Both ends of the tunnel and both local proxy paths are
    // covered.
    let c = clusters("traffic:\n  dataPlaneThreads: 3\n")?;
    let (net, a, b) = (&c.net, &c.a, &c.b);
    let _sink = net.server(&net.b, &["sink", B_BACKEND, "9000"])?;
    export(b, "demo", "sink", B_BACKEND, 9000)?;
    let vip = wait_vip(a, "demo", "sink", &["bravo"], PROPAGATION)?;

    // Half-close: the sink answers only after the client's FIN has crossed the tunnel. The
    // same through a sink in alpha's own namespace (the local proxy path).
    let _local_sink = net.server(&net.a, &["sink", A_BACKEND, "9000"])?;
    export(a, "demo", "local-sink", A_BACKEND, 9000)?;
    let local_vip = wait_vip(a, "demo", "local-sink", &["alpha"], PROPAGATION)?;
    for (what, vip) in [("through the tunnel", &vip), ("to alpha's own backend", &local_vip)] {
        let small = eventually(&format!("half-closed transfer {what}"), PROPAGATION, || {
            let mut p = net.tool(&net.a, &["send", vip, "80", "100000"])?;
            let v: serde_json::Value = serde_json::from_str(&p.line(Duration::from_secs(20))?)?;
            Ok((!v["reply"].as_str().unwrap_or_default().is_empty()).then_some(v))
        })?;
        assert_eq!(
            small["reply"].as_str(),
            Some(format!("100000 {}", small["sha256"].as_str().unwrap_or("?")).as_str()),
            "reply after half-close {what}: {small}"
        );
    }

    // Bulk: 1 GiB from alpha's namespace through the tunnel into bravo's sink.
    let bytes: u64 =
        std::env::var("FEDGATE_NETNS_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(1 << 30);
    let secs = send_to_sink(net, &vip, bytes, Duration::from_secs(600))?;
    eprintln!(
        "{bytes} bytes through the tunnel in {secs:.1} s ({:.0} MiB/s), sha256 equal on both sides",
        bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
    );

    // Path MTU discovery (default upper bound 8952) settled within what the 1500-byte veth
    // carries (1472 bytes of UDP payload over IPv4), and above QUIC's 1200-byte floor: the
    // jumbo probes were lost without losing the transfer.
    let peers = a.json("/debug/peers")?;
    let mtu = peers
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["cluster"] == "bravo"))
        .and_then(|p| p["path_mtu"].as_u64())
        .with_context(|| format!("alpha's /debug/peers has no path_mtu for bravo: {peers}"))?;
    eprintln!("path MTU alpha -> bravo over the 1500-byte veth: {mtu}");
    assert!((1200..=1472).contains(&mtu), "path MTU {mtu} on a 1500-byte veth");
    // alpha (the lower id dials) keeps a data lane to bravo per thread of its own.
    let lanes = peers
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["cluster"] == "bravo"))
        .and_then(|p| p["replicas"].as_array()?.first()?["lanes"].as_u64());
    assert_eq!(lanes, Some(3), "alpha's lanes to bravo: {peers}");
    Ok(())
}

/// A send buffer that fills. Alpha's UDP socket gets 64 KiB of buffer. A first transfer
/// over the bare veth grows QUIC's congestion window far past that. Then alpha's veth gets a
/// token bucket of 100 Mbit/s with a 16 MB queue, and a datagram counts against the buffer
/// until it leaves that queue. The second transfer starts with the large window, so alpha's
/// sends find the buffer full again and again, and quinn waits for it to drain (the gateway
/// registers write interest for its UDP socket only during those waits). Both transfers
/// must complete byte-exact: a wait that is never woken stalls the second one.
#[test]
fn a_full_udp_send_buffer_is_waited_out_and_nothing_is_lost() -> Result<()> {
    require_tool("tc", "iproute2");
    let c = clusters_with("", "socketBufferSize: 65536")?;
    let (net, a, b) = (&c.net, &c.a, &c.b);
    let _sink = net.server(&net.b, &["sink", B_BACKEND, "9000"])?;
    export(b, "demo", "sink", B_BACKEND, 9000)?;
    let vip = wait_vip(a, "demo", "sink", &["bravo"], PROPAGATION)?;
    let full_count = || -> Result<u64> {
        let metrics = a.get("/metrics")?;
        Ok(metric_samples(&metrics, "fedgate_tunnel_socket_full_total", &[])
            .first()
            .map_or(0, |(_, v)| *v as u64))
    };
    let bytes: u64 = 16 << 20;
    let transfer = || send_to_sink(net, &vip, bytes, Duration::from_secs(120));

    let fast = transfer()?;
    let before = full_count()?;
    let tbf = ["qdisc", "add", "dev", &net.a_dev, "root", "tbf", "rate", "100mbit", "burst"];
    run(net.a.command("tc").args(tbf).args(["64kb", "limit", "16mb"]))?;
    let slow = transfer()?;
    let full = full_count()? - before;
    eprintln!(
        "{bytes} bytes over the bare veth in {fast:.1} s, then at 100 Mbit/s in {slow:.1} s; \
         alpha's send buffer was full {full} times"
    );
    assert!(full > 0, "the send buffer never filled, so the wait was not exercised");
    Ok(())
}

/// `traffic.busyPoll` on alpha. Round trips through the tunnel, a few milliseconds apart
/// (inside the 10 ms window, so alpha polls through the gaps), are all answered; alpha shows
/// the polling in `fedgate_dataplane_busy_poll_ratio`; once the connection closes the ratio
/// goes back to 0: the thread sleeps again.
#[test]
fn a_busy_polling_gateway_carries_round_trips_and_stops_polling_when_they_end() -> Result<()> {
    let c = clusters("traffic:\n  busyPoll: 10ms\n")?;
    let (_echo, mut hold, _) = echo_held_through_alpha(&c)?;
    let polling = || -> Result<f64> {
        let metrics = c.a.get("/metrics")?;
        metric_samples(&metrics, "fedgate_dataplane_busy_poll_ratio", &[])
            .first()
            .map(|(_, v)| *v)
            .context("alpha has no fedgate_dataplane_busy_poll_ratio")
    };

    // 3.5 s of round trips: the gauge is sampled every second.
    let start = Instant::now();
    let (mut trips, mut most) = (0, 0.0_f64);
    while start.elapsed() < Duration::from_millis(3500) {
        hold.send("ping")?;
        assert_eq!(hold.line(Duration::from_secs(5))?, "PONG", "round trip {trips}");
        trips += 1;
        if trips % 50 == 0 {
            most = most.max(polling()?);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    most = most.max(polling()?);
    hold.send("close")?;
    let closed = hold.line(Duration::from_secs(5))?;
    assert_eq!(closed, "CLOSED 0", "half-close through a polling gateway");
    eprintln!("{trips} round trips through busy-polling alpha; busy-poll ratio up to {most:.2}");
    assert!(most > 0.0, "alpha never reported busy polling during {trips} round trips");

    // After the window without bytes the thread sleeps: the next samples read 0.
    eventually("alpha stops polling", Duration::from_secs(10), || {
        Ok((polling()? == 0.0).then_some(()))
    })?;
    Ok(())
}

#[test]
fn sigterm_exits_when_the_open_connection_closes_not_at_drain_duration() -> Result<()> {
    let drain = Duration::from_secs(30);
    let mut c = clusters("traffic:\n  drainDuration: 30s\n")?;
    let (_echo, mut hold, vip) = echo_held_through_alpha(&c)?;
    let net = &c.net;
    c.a.signal("TERM")?;
    let termed = Instant::now();
    // While the connection is open the gateway keeps running and keeps carrying it.
    for _ in 0..3 {
        hold.send("ping")?;
        assert_eq!(hold.line(Duration::from_secs(5))?, "PONG", "open connection still served");
        assert!(c.a.try_wait()?.is_none(), "gateway exited while a connection was open");
        std::thread::sleep(Duration::from_millis(500));
    }
    // New connections are refused during the drain.
    let probe = format!("import socket; socket.create_connection(('{vip}', 80), 2)");
    let refused = net.a.command("python3").args(["-c", &probe]).output()?;
    assert!(!refused.status.success(), "the draining gateway must not accept new connections");
    assert!(c.a.try_wait()?.is_none(), "gateway exited while a connection was open");

    hold.send("close")?;
    let closed_line = hold.line(Duration::from_secs(5))?;
    assert!(closed_line.starts_with("CLOSED"), "{closed_line}");
    let closed = Instant::now();
    let status = match c.a.wait_exit(Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => bail!("{e:#}\n--- alpha log ---\n{}", c.a.gw.log_text()),
    };
    let after_close = closed.elapsed();
    eprintln!(
        "exit {status} {after_close:?} after the last connection closed, {:?} after SIGTERM \
         (drainDuration {drain:?})",
        termed.elapsed()
    );
    if !status.success() {
        bail!("gateway exited with {status}:\n{}", c.a.gw.log_text());
    }
    assert!(after_close < Duration::from_secs(5), "exit follows the close: {after_close:?}");
    assert!(termed.elapsed() < drain / 2, "exit long before drainDuration");
    Ok(())
}
