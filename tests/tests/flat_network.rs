//! Flat network mode (`traffic.network: flat`, issue 21 item 5) across network namespaces:
//! clusters `alpha` and `bravo` each in a namespace, joined by a veth pair, and bravo's "pod
//! network" (`10.251.<n>.0/24` on bravo's `lo`) routed from alpha's namespace through the
//! veth, as routed pod CIDRs are between flat clusters. alpha runs in flat mode: DNS answers
//! bravo's endpoints' own addresses, and a connection to a ClusterSetIP reaches bravo's
//! endpoint straight from alpha's gateway, with no tunnel stream. Real `dig` in alpha's
//! namespace, a real TCP server in bravo's that tells each client its source address.
//!
//! Needs root, `ip`, `curl`, `python3` and `dig` (fails otherwise).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_e2e::netns::*;
use fedgate_e2e::*;

const CLUSTERSET: &str = "flat";
const PROPAGATION: Duration = Duration::from_secs(15);
/// The port bravo's pod listens on.
const POD_PORT: u16 = 8080;

/// `dig +short` inside `ns` against alpha's DNS (`127.0.0.1:10053` there); sorted lines.
fn dig_short(ns: &Netns, args: &[&str]) -> Result<Vec<String>> {
    require_tool("dig", "bind9-dnsutils");
    let out = ns
        .command("dig")
        .args(["@127.0.0.1", "-p", "10053", "+short", "+tries=1", "+time=2"])
        .args(args)
        .output()
        .context("running dig")?;
    if !out.status.success() {
        bail!("dig {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut lines: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    lines.sort();
    Ok(lines)
}

/// Waits until `dig +short args` prints exactly `want`.
fn wait_dig(ns: &Netns, args: &[&str], want: &[String]) -> Result<()> {
    let mut last = Vec::new();
    eventually(&format!("dig {args:?} to answer {want:?}"), PROPAGATION, || {
        last = dig_short(ns, args)?;
        Ok((last == want).then_some(()))
    })
    .with_context(|| format!("last answer: {last:?}"))
}

/// The sum of every sample of `name` (with `labels`) in a gateway's `/metrics`.
fn metric_sum(gw: &NsGateway, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let text = gw.get("/metrics")?;
    Ok(metric_samples(&text, name, labels).iter().map(|(_, v)| v).sum())
}

/// One connection from alpha's namespace to `ip:port`: the source address bravo's pod saw.
fn fetch(net: &Pair, ip: &str, port: u16) -> Result<String> {
    let mut p = net.tool(&net.a, &["fetch", ip, &port.to_string()])?;
    p.line(Duration::from_secs(15))
}

#[test]
fn flat_mode_answers_and_dials_remote_endpoints_directly() -> Result<()> {
    require_tools();
    let started = Instant::now();
    let net = Pair::new()?;
    // bravo's pod network: 10.251.<n>.0/24 on bravo's lo, routed from alpha via the veth.
    let n = net.a_ip.octets()[2];
    let pod = Ipv4Addr::new(10, 251, n, 2);
    net.b.ip(&["addr", "add", &format!("{pod}/32"), "dev", "lo"])?;
    net.a.ip(&["route", "add", &format!("10.251.{n}.0/24"), "via", &net.b_ip.to_string()])?;
    let _pod_server = net.server(&net.b, &["whoami", &pod.to_string(), &POD_PORT.to_string()])?;
    // Routed, not NATed: from alpha's namespace the pod sees alpha's veth address.
    assert_eq!(fetch(&net, &pod.to_string(), POD_PORT)?, net.a_ip.to_string());

    let (mut a, mut b) =
        net.prepare_gateways(CLUSTERSET, ["alpha", "bravo"], "traffic:\n  network: flat\n")?;
    a.launch()?;
    b.launch()?;
    let pod_s = pod.to_string();
    // bravo exports a headless service and a ClusterSetIP one, both backed by its pod.
    b.gw.write_cluster_file(
        "db.yaml",
        &service_yaml(
            "shop",
            "db",
            true,
            &[("pg", 5432, POD_PORT)],
            &[(&pod_s, true)],
            Some(EXPORTED_AT),
        ),
    )?;
    b.gw.write_cluster_file(
        "web.yaml",
        &exported_service("shop", "web", ("http", 80, POD_PORT), &pod_s),
    )?;

    // DNS: the headless service and the per-host name answer the pod's own address; SRV
    // carries the pod's port; PTR of the pod address names its per-host name.
    let host = format!("{}.bravo.db.shop.svc.clusterset.local", pod_s.replace('.', "-"));
    wait_dig(&net.a, &["db.shop.svc.clusterset.local", "A"], std::slice::from_ref(&pod_s))?;
    assert_eq!(dig_short(&net.a, &[&host, "A"])?, vec![pod_s.clone()]);
    assert_eq!(
        dig_short(&net.a, &["_pg._tcp.db.shop.svc.clusterset.local", "SRV"])?,
        vec![format!("0 100 {POD_PORT} {host}.")]
    );
    assert_eq!(
        dig_short(&net.a, &["db.shop.svc.clusterset.local", "SRV"])?,
        vec![format!("0 100 {POD_PORT} {host}.")]
    );
    assert_eq!(dig_short(&net.a, &["-x", &pod_s])?, vec![format!("{host}.")]);
    // No VIP was allocated for bravo's endpoint.
    let imports = a.json("/debug/imports")?;
    let db = find_import(&imports, "shop", "db").context("db imported")?;
    assert!(db["ips"].as_array().is_none_or(|v| v.is_empty()), "{db}");

    // Traffic: the ClusterSetIP reaches the pod straight from alpha's gateway (the pod sees
    // alpha's veth address, not bravo's gateway), and no tunnel stream is opened at bravo.
    let csip = wait_vip(&a, "shop", "web", &["bravo"], PROPAGATION)?;
    assert_eq!(dig_short(&net.a, &["web.shop.svc.clusterset.local", "A"])?, vec![csip.clone()]);
    eventually("bravo's endpoint healthy at alpha", PROPAGATION, || {
        let eps = a.json("/debug/endpoints")?;
        let healthy = eps["services"].as_array().into_iter().flatten().any(|p| {
            p["service"]["name"] == "web"
                && p["endpoints"].as_array().into_iter().flatten().any(|e| {
                    e["address"] == pod_s.as_str() && e["healthy"] == true && e["path"] == "direct"
                })
        });
        Ok(healthy.then_some(()))
    })?;
    let streams_before = metric_sum(&b, "fedgate_tunnel_streams_total", &[])?;
    for _ in 0..3 {
        assert_eq!(fetch(&net, &csip, 80)?, net.a_ip.to_string(), "source seen by the pod");
    }
    let direct =
        metric_sum(&a, "fedgate_direct_connections_total", &[("target_cluster", "bravo")])?;
    assert_eq!(direct, 3.0, "alpha dialled bravo's pod directly three times");
    assert_eq!(
        metric_sum(&b, "fedgate_tunnel_streams_total", &[])?,
        streams_before,
        "no tunnel stream reached bravo"
    );
    let explained = a.json("/debug/explain?service=shop/web")?;
    let eps = explained["endpoints"].as_array().context("explain endpoints")?;
    assert!(
        eps.iter().any(|e| e["address"] == pod_s.as_str() && e["path"] == "direct"),
        "{explained}"
    );

    // The pod's own gateway still probes it: when it stops, alpha stops answering it.
    drop(_pod_server);
    wait_dig(&net.a, &["db.shop.svc.clusterset.local", "A"], &[])?;
    let refused = fetch(&net, &csip, 80)?;
    assert!(refused.starts_with("ERR") || refused == "EMPTY", "{refused}");
    eprintln!("flat mode e2e took {:.1}s", secs(started));
    Ok(())
}
