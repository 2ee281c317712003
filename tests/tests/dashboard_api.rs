//! The dashboard's JSON views and the `fedgate status` / `fedgate explain` tables against two
//! real gateway processes on loopback: a service exported by both clusters with real TCP
//! backends, traffic through alpha's ClusterSetIP, then alpha's backend stopped so the
//! explanation, the failover list and the traffic view change. No root needed: ClusterSetIPs
//! and backends live in the test's own 127.x block.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fedgate_e2e::*;
use serde_json::Value;

const CLUSTERSET: &str = "dash";
const PROPAGATION: Duration = Duration::from_secs(10);
/// Long enough for unhealthyThreshold (2) probes at the 1 s default interval, and slack.
const HEALTH_CHANGE: Duration = Duration::from_secs(10);
const SERVICE_PORT: u16 = 18080;

/// A TCP backend on `ip` (a port the kernel picks) that greets every connection with its
/// cluster name, then echoes. Stopping it closes the listening socket (probes then fail with
/// "connection refused").
fn backend(ip: IpAddr, name: &str) -> Result<TcpServer> {
    let greeting = format!("{name}\n");
    TcpServer::start(SocketAddr::new(ip, 0), move |mut conn| {
        let _ = conn.write_all(greeting.as_bytes());
        let mut buf = [0u8; 4096];
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 || conn.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })
}

/// Connects to `addr`, reads the greeting line, sends `payload` and reads the echo.
fn exchange(addr: SocketAddr, payload: &[u8]) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut greeting = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte)? == 1 && byte[0] != b'\n' {
        greeting.push(byte[0]);
    }
    s.write_all(payload)?;
    let mut echo = vec![0u8; payload.len()];
    s.read_exact(&mut echo)?;
    if echo != payload {
        bail!("echo through {addr} differs");
    }
    Ok(String::from_utf8_lossy(&greeting).into_owned())
}

fn spec(block: AddrBlock, id: &str, host: u8, zone: &str, peer: (&str, u8)) -> GatewaySpec {
    GatewaySpec {
        id: id.to_owned(),
        clusterset: CLUSTERSET.to_owned(),
        region: "region-1".to_owned(),
        zone: zone.to_owned(),
        tunnel: block.addr(host, 15443),
        admin: block.addr(host, 15000),
        dns: block.addr(host, 10053),
        vip_range: format!("127.{}.{}.0/24", block.ip(1).octets()[1], 200 + host),
        peers: vec![(peer.0.to_owned(), block.addr(peer.1, 15443))],
        lease: "15s".to_owned(),
        extra: String::new(),
    }
}

fn endpoint<'a>(explain: &'a Value, cluster: &str) -> Result<&'a Value> {
    explain["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["cluster"] == cluster))
        .with_context(|| format!("{cluster} endpoint in {explain}"))
}

fn flow<'a>(traffic: &'a Value, service: &str, target: &str) -> Option<&'a Value> {
    traffic["flows"]
        .as_array()?
        .iter()
        .find(|f| f["service"] == service && f["targetCluster"] == target)
}

#[test]
fn explain_traffic_failovers_and_cli_tables() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let pki = Pki::new(tmp.path(), "ca", CLUSTERSET)?;
    let mut alpha = Gateway::prepare(
        tmp.path(),
        spec(block, "alpha", 10, "zone-a", ("bravo", 11)),
        pki.issue("alpha", &tmp.path().join("certs-alpha"))?,
    )?;
    let mut bravo = Gateway::prepare(
        tmp.path(),
        spec(block, "bravo", 11, "zone-b", ("alpha", 10)),
        pki.issue("bravo", &tmp.path().join("certs-bravo"))?,
    )?;
    alpha.start()?;
    bravo.start()?;

    let mut backend_a = backend(block.ip(50).into(), "alpha")?;
    let backend_b = backend(block.ip(60).into(), "bravo")?;
    let web = |backend: &TcpServer, created: &str| {
        service_yaml(
            "shop",
            "web",
            false,
            &[("http", SERVICE_PORT, backend.addr.port())],
            &[(&backend.addr.ip().to_string(), true)],
            Some(created),
        )
    };
    alpha.write_cluster_file("web.yaml", &web(&backend_a, "2026-01-01T00:00:00Z"))?;
    bravo.write_cluster_file("web.yaml", &web(&backend_b, "2026-02-01T00:00:00Z"))?;
    // A second service whose exports disagree on the type: a conflict for the tables.
    let cfg_ip = block.ip(70).to_string();
    let cfg = |headless, created| {
        service_yaml(
            "shop",
            "cfg",
            headless,
            &[("tcp", 7000, 7000)],
            &[(&cfg_ip, true)],
            Some(created),
        )
    };
    alpha.write_cluster_file("cfg.yaml", &cfg(false, "2026-01-01T00:00:00Z"))?;
    bravo.write_cluster_file("cfg.yaml", &cfg(true, "2026-03-01T00:00:00Z"))?;

    let import = eventually("alpha to import shop/web from both clusters", PROPAGATION, || {
        let imports = alpha.json("/debug/imports")?;
        Ok(find_import(&imports, "shop", "web")
            .filter(|i| import_clusters(i) == ["alpha", "bravo"])
            .cloned())
    })?;
    let vip: IpAddr = import["ips"][0].as_str().context("ClusterSetIP")?.parse()?;
    let front = SocketAddr::new(vip, SERVICE_PORT);

    // Clusters: bravo is up with an RTT and a running lease.
    let clusters = eventually("bravo up in /debug/clusters", PROPAGATION, || {
        let c = alpha.json("/debug/clusters")?;
        let up = c.as_array().is_some_and(|cs| {
            cs.iter().any(|x| x["id"] == "bravo" && x["status"] == "up" && x["rttMs"].is_number())
        });
        Ok(up.then_some(c))
    })?;
    let me = clusters.as_array().and_then(|cs| cs.iter().find(|x| x["id"] == "alpha"));
    assert_eq!(me.map(|m| &m["status"]), Some(&Value::from("local")), "{clusters}");

    // All healthy: tier 0 is alpha's own endpoint; bravo's is tier 2 (same region, other
    // cluster) and the explanation says which label stopped counting.
    let explain = eventually("alpha's endpoint probed healthy", HEALTH_CHANGE, || {
        let e = alpha.json("/debug/explain?service=shop/web")?;
        Ok((endpoint(&e, "alpha")?["lastProbe"]["ok"] == true).then_some(e))
    })?;
    let d = &explain["decision"];
    assert_eq!(d["chosenTier"], 0, "{explain}");
    assert_eq!(d["failover"], false);
    assert_eq!(d["candidates"][0]["cluster"], "alpha");
    assert_eq!(d["balancing"], "power_of_two_choices");
    let a = endpoint(&explain, "alpha")?;
    assert_eq!(a["role"], "candidate");
    assert!(a["priority"].as_array().is_some_and(|p| p.iter().all(|c| c["result"] == "match")));
    let b = endpoint(&explain, "bravo")?;
    assert_eq!(b["tier"], 2, "{b}");
    assert_eq!(b["role"], "fallback");
    let results: Vec<&Value> = b["priority"].as_array().context("priority")?.iter().collect();
    assert_eq!(results[0]["result"], "match");
    assert_eq!(results[1]["result"], "mismatch");
    assert!(results[1]["why"].as_str().is_some_and(|w| w.contains("endpoint has bravo")), "{b}");
    assert_eq!(results[2]["result"], "not_counted");

    // A connection through the ClusterSetIP lands on alpha's backend and is counted.
    let greeting = eventually("a connection through alpha's ClusterSetIP", PROPAGATION, || {
        Ok(exchange(front, b"hello").ok())
    })?;
    assert_eq!(greeting, "alpha");
    let traffic = eventually("traffic to alpha counted", PROPAGATION, || {
        let t = alpha.json("/debug/traffic")?;
        Ok(flow(&t, "shop/web", "alpha")
            .filter(|f| f["connections"].as_u64() >= Some(1) && f["active"] == 0)
            .cloned())
    })?;
    assert!(traffic["bytesTx"].as_u64() >= Some(5), "{traffic}");
    assert!(traffic["bytesRx"].as_u64() >= Some(11), "greeting + echo: {traffic}");

    // Alpha's backend goes away: its probe fails, the explanation skips it and names the
    // cause, and the next connection fails over to bravo through the tunnel.
    backend_a.stop();
    let explain = eventually("alpha's endpoint skipped as unhealthy", HEALTH_CHANGE, || {
        let e = alpha.json("/debug/explain?service=shop/web")?;
        Ok((endpoint(&e, "alpha")?["role"] == "skipped").then_some(e))
    })?;
    let a = endpoint(&explain, "alpha")?;
    assert_eq!(a["skipped"], serde_json::json!(["unhealthy"]), "{a}");
    let reason = a["reasons"][0].as_str().unwrap_or_default();
    assert!(reason.contains("failed") && reason.contains("refused"), "{reason}");
    let d = &explain["decision"];
    assert_eq!(d["chosenTier"], 2, "{explain}");
    assert_eq!(d["bestTier"], 0);
    assert_eq!(d["failover"], true);
    assert_eq!(d["candidates"][0]["cluster"], "bravo");
    assert!(d["summary"].as_str().is_some_and(|s| s.contains("failover: tier 0")), "{d}");
    let probes = alpha.json("/debug/probes")?;
    let probe = probes["probes"]
        .as_array()
        .and_then(|p| p.iter().find(|x| x["service"]["name"] == "web"))
        .context("a probe of shop/web")?;
    assert_eq!(probe["lastProbe"]["ok"], false, "{probes}");

    assert_eq!(exchange(front, b"again")?, "bravo");
    let failover = eventually("the failover listed", PROPAGATION, || {
        let f = alpha.json("/debug/failovers")?;
        Ok(f.as_array().and_then(|l| l.iter().find(|e| e["service"] == "shop/web")).cloned())
    })?;
    assert_eq!(failover["fromTier"], 0, "{failover}");
    assert_eq!(failover["fromClusters"], serde_json::json!(["alpha"]));
    assert_eq!(failover["toCluster"], "bravo");
    assert_eq!(failover["toTier"], 2);
    assert!(failover["reason"].as_str().is_some_and(|r| r.contains("unhealthy")), "{failover}");
    eventually("traffic to bravo counted", PROPAGATION, || {
        let t = alpha.json("/debug/traffic")?;
        Ok(flow(&t, "shop/web", "bravo").filter(|f| f["connections"] == 1).map(|_| ()))
    })?;

    // Unknown service and bad queries answer with an error status and a message.
    let (code, body) = http_get(alpha.spec.admin, "/debug/explain?service=shop/nope")?;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("not imported"), "{body}");
    assert_eq!(http_get(alpha.spec.admin, "/debug/explain?service=nope")?.0, 400);
    assert_eq!(http_get(alpha.spec.admin, "/debug/explain?service=shop/web&port=1")?.0, 404);

    // The CLI prints the same facts as tables.
    let admin = format!("http://{}", alpha.spec.admin);
    let (code, out, err) = fedgate(&["status", "--admin", &admin])?;
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "fedgate cluster alpha in clusterset dash",
        "CLUSTERS",
        "shop/web",
        "alpha (winner)",
        "0/1 ready",
        "TypeConflict",
        "refused",
        "tier 2 (bravo/",
        "RECENT FAILOVERS",
    ] {
        assert!(out.contains(want), "status lacks {want:?}:\n{out}");
    }
    assert!(
        out.lines().any(|l| l.contains(" bravo ") && l.contains(" up ") && l.contains(" ms ")),
        "bravo up with an RTT:\n{out}"
    );
    eprintln!("{out}");
    let (code, other, err) = fedgate(&["status", "--admin", &admin, "--namespace", "other"])?;
    assert_eq!(code, 0, "{other}{err}");
    assert!(other.contains("SERVICES (imports per cluster)\n  (none)"), "{other}");
    assert!(other.contains("RECENT FAILOVERS\n  (none)") && other.contains("bravo"), "{other}");
    let (code, out, err) = fedgate(&["explain", "shop/web", "--admin", &admin])?;
    assert_eq!(code, 0, "{out}{err}");
    for want in ["chosen tier: 2", "failover: yes", "refused", "candidate", "skipped", "p2c"] {
        assert!(out.contains(want), "explain lacks {want:?}:\n{out}");
    }
    eprintln!("{out}");
    let (code, _, err) = fedgate(&["explain", "shop/nope", "--admin", &admin])?;
    assert_eq!(code, 1);
    assert!(err.contains("not imported"), "{err}");
    let closed = TcpListener::bind((IpAddr::from(block.ip(99)), 0))?.local_addr()?;
    let (code, _, err) = fedgate(&["status", "--admin", &closed.to_string()])?;
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the gateway's admin API"), "{err}");

    // The page is served from the binary with the ids the browser tests use.
    let (code, page) = http_get(alpha.spec.admin, "/")?;
    assert_eq!(code, 200);
    for id in ["id=\"clusters\"", "data-testid=\"failovers\"", "data-testid=\"explain\""] {
        assert!(page.contains(id), "page lacks {id}");
    }
    assert!(!page.contains("http://") && !page.contains("https://"), "no external assets");
    drop(backend_b);
    Ok(())
}
