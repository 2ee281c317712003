//! fedgate end to end on two real Kubernetes control planes, each cluster in a network
//! namespace of its own (docs/testing-kube.md, "One network namespace per cluster"):
//!
//! - namespace `a` holds cluster east: its etcd and kube-apiserver (on `a`'s own
//!   `127.0.0.1`), gateway east, and east's backend (a real HTTP server on a "pod" address
//!   `10.244.0.10` that the apiserver accepts in an EndpointSlice);
//! - namespace `b` holds cluster west: its control plane and gateway west, nothing else;
//! - the two are joined by one veth pair; only the gateways' tunnel port listens on it.
//!
//! kubectl creates a Service, EndpointSlice and ServiceExport in east; west gets the
//! ServiceImport and EndpointSlice (the time is printed), west's DNS answers with west's
//! ClusterSetIP and curl in `b` reaches east's backend through the tunnel; conflicting exports
//! in both clusters get `Conflict=True` on both; restarts of gateway west (SIGTERM, SIGKILL)
//! and east (SIGKILL) change no uid in either cluster (the time until the peers are connected
//! again is printed); deleting east's export removes the import and slices from west. Needs root, `ip`, `curl`, `python3`, `dig` and the kube
//! binaries of scripts/build-kube.sh (fails, saying what to install, otherwise).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use fedgate_e2e::kube::{
    EXPORTS, IMPORTS, KubeCluster, NETNS_PORTS, imported_slices, kube_binary, uid, use_kube_source,
};
use fedgate_e2e::netns::*;
use fedgate_e2e::*;
use serde_json::{Value, json};

const CLUSTERSET: &str = "kube-netns";
const EAST: &str = "east";
const WEST: &str = "west";
/// Bound on each propagation wait (the figure is printed; the target is 2 s).
const WAIT: Duration = Duration::from_secs(20);
/// East's backend: a "pod" address on `a`'s loopback device. The apiserver accepts it in an
/// EndpointSlice (it refuses 127/8), and nothing routes it outside namespace `a`.
const POD_EAST: &str = "10.244.0.10";
/// The endpoint of west's conflicting export (on `b`'s loopback; nothing listens there).
const POD_WEST: &str = "10.244.1.10";
const BACKEND_PORT: u16 = 8080;
const SLICE_MANAGER: &str = "gateway.fedgate.io";

/// A control plane in `ns`, prepared for a gateway (deploy/'s CRDs and RBAC), with namespace
/// `shop`; returns it and the kubeconfig that acts as the gateway's ServiceAccount.
fn control_plane(ns: &Netns, name: &str) -> Result<(KubeCluster, PathBuf)> {
    let k = KubeCluster::start_in(ns, name)?;
    let kc = k.prepare_for_gateway()?;
    k.kubectl_ok(&["create", "namespace", "shop"])?;
    Ok((k, kc))
}

/// The condition `kind` of a ServiceExport as (status, reason, message).
fn condition(export: &Value, kind: &str) -> Option<(String, String, String)> {
    let c = export["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == kind)?;
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    Some((s("status"), s("reason"), s("message")))
}

/// What is wrong with west's ServiceImport and slices for east's `shop/web`, if anything.
fn import_mismatch(si: &Value, slices: &[Value]) -> Option<String> {
    let spec = &si["spec"];
    let ports = spec["ports"].as_array().cloned().unwrap_or_default();
    let port_ok = ports.len() == 1
        && ports[0]["name"] == "http"
        && ports[0]["port"] == 80
        && ports[0]["protocol"] == "TCP";
    let ips_ok = spec["ips"].as_array().is_some_and(|ips| ips.len() == 1 && ips[0].is_string());
    if spec["type"] != "ClusterSetIP" || !port_ok || !ips_ok {
        return Some(format!("ServiceImport spec not (yet) right: {spec}"));
    }
    if si["status"]["clusters"] != json!([{ "cluster": EAST }]) {
        return Some(format!("ServiceImport status: {}", si["status"]));
    }
    let [slice] = slices else {
        return Some(format!("{} imported slices, want 1", slices.len()));
    };
    let labels = &slice["metadata"]["labels"];
    let labels_ok = labels["multicluster.kubernetes.io/service-name"] == "web"
        && labels["multicluster.kubernetes.io/source-cluster"] == EAST
        && labels["endpointslice.kubernetes.io/managed-by"] == SLICE_MANAGER;
    let endpoints = slice["endpoints"].as_array().cloned().unwrap_or_default();
    let endpoint_ok = slice["addressType"] == "IPv4"
        && endpoints.len() == 1
        && endpoints[0]["addresses"] == json!([POD_EAST])
        && endpoints[0]["conditions"]["ready"] == true;
    let slice_port_ok =
        slice["ports"][0]["port"] == BACKEND_PORT && slice["ports"][0]["name"] == "http";
    if !labels_ok || !endpoint_ok || !slice_port_ok {
        return Some(format!("imported slice not (yet) right: {slice}"));
    }
    None
}

/// Waits (bounded) until `west_k`'s ServiceImport and slices for east's `shop/web` are right
/// ([`import_mismatch`]); returns the ServiceImport.
fn wait_import_right(west_k: &KubeCluster, what: &str) -> Result<Value> {
    let (si, _) = eventually(what, WAIT, || {
        let Some(si) = west_k.get_json(&[IMPORTS, "-n", "shop", "web"])? else {
            bail!("no ServiceImport shop/web in west yet");
        };
        let slices = imported_slices(west_k, "shop", "web")?;
        match import_mismatch(&si, &slices) {
            Some(problem) => bail!(problem),
            None => Ok(Some((si, slices))),
        }
    })?;
    Ok(si)
}

/// `dig +short` in `ns` against the gateway's DNS on the namespace's 127.0.0.1:10053.
fn dig(ns: &Netns, name: &str, qtype: &str) -> Result<String> {
    let out = run(ns.command("dig").args([
        "@127.0.0.1",
        "-p",
        "10053",
        "+short",
        "+time=2",
        "+tries=1",
        name,
        qtype,
    ]))?;
    Ok(out.trim().to_owned())
}

fn curl_in(ns: &Netns, url: &str) -> Result<String> {
    Ok(run(ns.command("curl").args(["-sS", "-m", "5", url]))?.trim().to_owned())
}

/// The listening sockets of namespace `ns` that are reachable over its veth address `veth`
/// (bound to it or to a wildcard), as `proto address process`.
fn exposed_on_veth(ns: &Netns, veth: std::net::Ipv4Addr) -> Result<Vec<String>> {
    let out = run(ns.command("ss").arg("-Htulnp"))?;
    let mut exposed = Vec::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let [proto, _state, _recv, _send, local, _peer, ref rest @ ..] = cols[..] else {
            bail!("unexpected `ss -Htulnp` line in {}: {line:?}", ns.name);
        };
        let (host, _port) = local.rsplit_once(':').context("ss local address")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host == veth.to_string() || matches!(host, "0.0.0.0" | "*" | "::") {
            // users:(("fedgate",pid=..,fd=..)): the process name.
            let process = rest.join(" ");
            let process = process.split('"').nth(1).unwrap_or("?");
            exposed.push(format!("{proto} {local} {process}"));
        }
    }
    exposed.sort();
    Ok(exposed)
}

/// What a gateway with `threads` data-plane threads may expose on the veth at `ip`: its tunnel
/// port (a socket per thread when there are several) and, with several threads, a socket per
/// thread on an ephemeral port that its data lanes dial from (fedgate_tunnel's steer module);
/// nothing else. Returns what is wrong, if anything.
fn exposure_problem(exposed: &[String], ip: std::net::Ipv4Addr, threads: usize) -> Option<String> {
    let tunnel = format!("udp {ip}:15443 fedgate");
    let tunnel_sockets = exposed.iter().filter(|e| **e == tunnel).count();
    let want_tunnel = if threads >= 2 { threads.min(64) } else { 1 };
    if tunnel_sockets != want_tunnel {
        return Some(format!("{tunnel_sockets} tunnel sockets, want {want_tunnel}"));
    }
    let mut dialing = 0;
    for e in exposed.iter().filter(|e| **e != tunnel) {
        let fields: Vec<&str> = e.split(' ').collect();
        let port: u16 = fields[1].rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(0);
        if fields[0] != "udp" || fields[2] != "fedgate" || port < 1024 {
            return Some(format!("{e} is exposed"));
        }
        dialing += 1;
    }
    let want_dialing = if threads >= 2 { threads.min(64) } else { 0 };
    (dialing != want_dialing).then(|| {
        format!("{dialing} dialing sockets, want {want_dialing} (one per data-plane thread)")
    })
}

/// Whether `peer` shows as connected in `gw`'s `/debug/peers`.
fn peer_connected(gw: &NsGateway, peer: &str) -> Result<bool> {
    let peers = gw.json("/debug/peers")?;
    Ok(peers
        .as_array()
        .and_then(|list| list.iter().find(|p| p["cluster"] == peer))
        .is_some_and(|p| p["connected"] == true))
}

/// The `fedgate_kube_writes_total` series of `gw` with `op="delete"`.
fn delete_writes(gw: &NsGateway) -> Result<Vec<String>> {
    let metrics = gw.get("/metrics")?;
    Ok(metric_samples(&metrics, "fedgate_kube_writes_total", &[("op", "delete")])
        .into_iter()
        .map(|(line, _)| line.to_owned())
        .collect())
}

/// Lines of a gateway log that tell how its peer sessions went (for the redial figure).
fn peer_log_lines(log: &str, from_line: usize) -> String {
    log.lines()
        .skip(from_line)
        .filter(|l| {
            l.contains("peer connected")
                || l.contains("peer disconnected")
                || l.contains("peer connection failed")
                || l.contains("handshake")
                || l.contains("draining")
                || l.contains("quinn_proto")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a gateway restart must leave as it was.
struct RestartCheck<'a> {
    /// (east, west)
    clusters: [&'a KubeCluster; 2],
    b: &'a Netns,
    /// east's backend through west's ClusterSetIP
    url: &'a str,
    vip: &'a str,
}

/// The uids of the ServiceImport and fedgate's EndpointSlices of `shop/web` in `k`, checking
/// that they say what east exports.
fn import_uids(k: &KubeCluster) -> Result<Vec<String>> {
    let si = k.get_json(&[IMPORTS, "-n", "shop", "web"])?.context("ServiceImport shop/web")?;
    let slices = imported_slices(k, "shop", "web")?;
    if let Some(problem) = import_mismatch(&si, &slices) {
        bail!("{}: {problem}", k.name());
    }
    Ok(std::iter::once(&si).chain(&slices).map(uid).collect())
}

/// Stops gateway `gw` with `signal`, starts it again in its namespace, prints how long until
/// it and its peer `other` see each other connected again (and their session log lines),
/// and checks that both clusters' objects were reconciled in place (same uids, no deletes)
/// and that traffic from `b` flows again.
fn restart(c: &RestartCheck, gw: &mut NsGateway, other: &NsGateway, signal: &str) -> Result<()> {
    let (id, peer) = (gw.gw.spec.id.clone(), other.gw.spec.id.clone());
    let uids_before = c.clusters.map(import_uids);
    let other_deletes = delete_writes(other)?;
    let other_log_mark = other.gw.log_text().lines().count();
    let log_mark = gw.gw.log_text().lines().count();
    let heard = "deleting stale objects from now on";
    let heard_before = gw.gw.log_text().matches(heard).count();
    gw.signal(signal)?;
    let signalled = Instant::now();
    let status = gw.wait_exit(Duration::from_secs(30))?;
    if signal == "TERM" {
        assert!(status.success(), "{id} exited with {status}:\n{}", gw.gw.log_text());
    }
    let exited = signalled.elapsed();
    let launched = Instant::now();
    gw.launch()?;
    let healthy = launched.elapsed();
    eventually(&format!("{id}'s peer {peer} connected again"), Duration::from_secs(60), || {
        Ok(peer_connected(gw, &peer)?.then_some(()))
    })
    .with_context(|| peer_log_lines(&other.gw.log_text(), other_log_mark))?;
    let sees_peer = launched.elapsed();
    eventually(&format!("{peer}'s peer {id} connected again"), Duration::from_secs(60), || {
        Ok(peer_connected(other, &id)?.then_some(()))
    })?;
    let seen_by_peer = launched.elapsed();
    eprintln!(
        "FIGURE {id} restart (SIG{signal}): exit {:.2} s after the signal; /healthz {:.2} s \
         after start; peer {peer} connected at {id} {:.2} s, {id} at {peer} {:.2} s after start \
         ({:.2} s after the signal)",
        exited.as_secs_f64(),
        healthy.as_secs_f64(),
        sees_peer.as_secs_f64(),
        seen_by_peer.as_secs_f64(),
        signalled.elapsed().as_secs_f64()
    );
    eprintln!(
        "{peer}'s peer log since SIG{signal} to {id}:\n{}\n{id}'s:\n{}",
        peer_log_lines(&other.gw.log_text(), other_log_mark),
        peer_log_lines(&gw.gw.log_text(), log_mark)
    );
    // The writer has heard every peer (deletions are on from then) and traffic flows again.
    eventually(&format!("{id}'s writer to have heard every peer"), WAIT, || {
        Ok((gw.gw.log_text().matches(heard).count() > heard_before).then_some(()))
    })?;
    let body = eventually(&format!("curl in b after {id}'s restart"), WAIT, || {
        Ok(curl_in(c.b, c.url).ok())
    })?;
    assert_eq!(body, "east");
    let name = "web.shop.svc.clusterset.local";
    assert_eq!(dig(c.b, name, "A")?, c.vip, "same ClusterSetIP after {id}'s restart");
    for (k, before) in c.clusters.iter().zip(uids_before) {
        let before = before?;
        assert_eq!(import_uids(k)?, before, "{}'s objects kept their uids", k.name());
    }
    assert_eq!(delete_writes(gw)?, Vec::<String>::new(), "the restarted writer deleted nothing");
    assert_eq!(delete_writes(other)?, other_deletes, "{peer}'s writer deleted nothing");
    Ok(())
}

#[test]
fn kube_clusters_in_their_own_namespaces_export_import_conflict_restart_and_unexport() -> Result<()>
{
    require_tools();
    require_tool("dig", "bind9-dnsutils");
    let started = Instant::now();
    let net = Pair::new()?;

    // Both control planes at once, each inside its own namespace.
    let ((east_k, east_kc), (west_k, west_kc)) = std::thread::scope(|s| {
        let a = s.spawn(|| control_plane(&net.a, EAST));
        let b = s.spawn(|| control_plane(&net.b, WEST));
        let a = a.join().map_err(|_| anyhow!("starting east panicked"))?;
        let b = b.join().map_err(|_| anyhow!("starting west panicked"))?;
        Ok::<_, anyhow::Error>((a?, b?))
    })?;
    eprintln!(
        "control planes ready: east in {:?}, west in {:?} (apiserver start only)",
        east_k.started_in(),
        west_k.started_in()
    );

    // Each apiserver is reachable only inside its own namespace: not over the veth, and the
    // same URL in the other namespace is the other cluster (its certificate fails the CA).
    let api_port = NETNS_PORTS[2];
    let kubectl = kube_binary("kubectl")?;
    for (k, other_ns, own_veth_ip) in [(&east_k, &net.b, net.a_ip), (&west_k, &net.a, net.b_ip)] {
        let url = format!("https://{own_veth_ip}:{api_port}/readyz");
        let out = other_ns.command("curl").args(["-sS", "-k", "-m", "3", &url]).output()?;
        assert_eq!(
            out.status.code(),
            Some(7),
            "{} reached {}'s apiserver at {url} over the veth (curl: {})",
            other_ns.name,
            k.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let out = other_ns
            .command(&kubectl)
            .arg("--kubeconfig")
            .arg(k.kubeconfig_path())
            .arg("--cache-dir")
            .arg(net.dir().join(format!("kubectl-cache-{}", other_ns.name)))
            .args(["--request-timeout=5s", "get", "namespaces"])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("certificate"),
            "{}'s kubeconfig used in {} must not reach {} (stdout {}, stderr {err})",
            k.name(),
            other_ns.name,
            k.name(),
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Gateways: east in `a`, west in `b`, tunnel on the veth addresses, kube source against
    // their own apiserver as the ServiceAccount of deploy/manifests.
    let root = net.dir().to_path_buf();
    let (mut east_gw, mut west_gw) = net.prepare_gateways(CLUSTERSET, [EAST, WEST], "")?;
    for (gw, kc) in [(&mut east_gw, &east_kc), (&mut west_gw, &west_kc)] {
        // quinn's debug lines say why a restarted gateway drops or answers a peer's packets
        gw.set_log_level(&format!("{LOG_LEVEL},quinn_proto=debug"));
        use_kube_source(&gw.gw, kc)?;
        gw.launch()?;
    }
    // Ready, and federated: the figure below is propagation, not the first handshake.
    for (gw, peer) in [(&east_gw, WEST), (&west_gw, EAST)] {
        eventually(&format!("{} ready with {peer} connected", gw.gw.spec.id), WAIT, || {
            let ready = gw.get("/readyz").is_ok();
            Ok((ready && peer_connected(gw, peer)?).then_some(()))
        })?;
    }
    eprintln!(
        "gateways ready and connected {:.2} s after the start",
        started.elapsed().as_secs_f64()
    );

    // East's backend, on a "pod" address of namespace `a` that `b` has no route to.
    net.a.ip(&["addr", "add", &format!("{POD_EAST}/32"), "dev", "lo"])?;
    net.b.ip(&["addr", "add", &format!("{POD_WEST}/32"), "dev", "lo"])?;
    let www = root.join("www-east");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("cluster.txt"), "east\n")?;
    let www = www.to_str().context("utf-8 path")?;
    let _backend = net.server(&net.a, &["http", POD_EAST, &BACKEND_PORT.to_string(), www])?;

    // Of everything listening in a cluster's namespace (etcd, apiserver, gateway admin, DNS,
    // ClusterSetIPs, the backend), only the gateway's UDP sockets are on the veth: the tunnel
    // port and its data lanes' dialing sockets. The gateways run the default thread count.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(256));
    for (ns, ip) in [(&net.a, net.a_ip), (&net.b, net.b_ip)] {
        let exposed = exposed_on_veth(ns, ip)?;
        if let Some(problem) = exposure_problem(&exposed, ip, threads) {
            panic!("{}: {problem}; on the veth: {exposed:?}", ns.name);
        }
    }

    // 1. kubectl creates Service + EndpointSlice + ServiceExport in east; west imports it.
    let export_yaml = "---\napiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceExport\n\
                       metadata: { name: web, namespace: shop }\n";
    let web = service_yaml(
        "shop",
        "web",
        false,
        &[("http", 80, BACKEND_PORT)],
        &[(POD_EAST, true)],
        None,
    );
    // kubectl's discovery cache predates the CRDs: refresh it first, so that the figure
    // below is the objects' way through the gateways, not kubectl's discovery (~2 s).
    east_k.kubectl_ok(&["api-resources", "-o", "name"])?;
    let created = Instant::now();
    east_k.create_yaml(&format!("{web}{export_yaml}"))?;
    let kubectl_done = created.elapsed();
    wait_vip(&west_gw, "shop", "web", &[EAST], WAIT)?;
    let in_west_gateway = created.elapsed();
    let si = wait_import_right(&west_k, "west's ServiceImport and EndpointSlice for shop/web")
        .with_context(|| west_gw.gw.log_text())?;
    let propagation = created.elapsed();
    eprintln!(
        "FIGURE kubectl create in east -> ServiceImport + EndpointSlice right in west's \
         apiserver: {:.2} s (kubectl create returned at {:.2} s, west's gateway imported it at \
         {:.2} s)",
        propagation.as_secs_f64(),
        kubectl_done.as_secs_f64(),
        in_west_gateway.as_secs_f64()
    );
    let vip = si["spec"]["ips"][0].as_str().context("ClusterSetIP")?.to_owned();
    let gw_import = find_import(&west_gw.json("/debug/imports")?, "shop", "web").cloned();
    assert_eq!(
        si["spec"]["ips"],
        gw_import.context("west's gateway imports shop/web")?["ips"],
        "the ServiceImport's ips are gateway west's ClusterSetIP"
    );
    eventually("east's export Ready", WAIT, || {
        let e = east_k.get_json(&[EXPORTS, "-n", "shop", "web"])?.context("export")?;
        Ok(condition(&e, "Ready").filter(|c| c.0 == "True" && c.1 == "Exported").map(|_| ()))
    })?;

    // 2. West's DNS answers with west's ClusterSetIP; curl in `b` reaches east's backend
    // through the tunnel, and the backend itself is out of `b`'s reach.
    let name = "web.shop.svc.clusterset.local";
    eventually(
        "west's DNS to answer",
        WAIT,
        || Ok((dig(&net.b, name, "A")? == vip).then_some(())),
    )?;
    let srv = dig(&net.b, &format!("_http._tcp.{name}"), "SRV")?;
    assert!(srv.ends_with(&format!(" 80 {name}.")), "SRV of the named port: {srv:?}");
    let url = format!("http://{vip}/cluster.txt");
    let body = eventually("curl in b through west's ClusterSetIP", WAIT, || {
        Ok(curl_in(&net.b, &url).ok())
    })?;
    assert_eq!(body, "east", "the answer comes from east's backend");
    assert!(
        curl_in(&net.b, &format!("http://{POD_EAST}:{BACKEND_PORT}/cluster.txt")).is_err(),
        "east's backend must not be reachable from b except through the tunnel"
    );

    // 3. West exports the same name with another type (headless) and port: Conflict=True on
    // both ServiceExports; east's (the oldest) wins.
    let clash =
        service_yaml("shop", "web", true, &[("grpc", 9090, 9090)], &[(POD_WEST, true)], None);
    west_k.create_yaml(&format!("{clash}{export_yaml}"))?;
    let conflicted = Instant::now();
    for k in [&east_k, &west_k] {
        let c =
            eventually(&format!("Conflict=True on {}'s ServiceExport", k.name()), WAIT, || {
                let e = k.get_json(&[EXPORTS, "-n", "shop", "web"])?.context("export")?;
                Ok(condition(&e, "Conflict").filter(|c| c.0 == "True"))
            })?;
        // The apiserver gives a selector-less headless Service both IP families
        // (RequireDualStack, checked below), so the families differ from east's [IPv4] too.
        assert_eq!(c.1, "PortConflict,TypeConflict,IPFamilyConflict", "{}: {c:?}", k.name());
        assert!(c.2.contains(EAST), "{}'s message names the winner east: {c:?}", k.name());
    }
    eprintln!(
        "FIGURE Conflict=True on both ServiceExports {:.2} s after west's export",
        conflicted.elapsed().as_secs_f64()
    );
    let west_svc = west_k.get_json(&["services", "-n", "shop", "web"])?.context("service")?;
    assert_eq!(west_svc["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]), "{west_svc}");
    let si = west_k.get_json(&[IMPORTS, "-n", "shop", "web"])?.context("import")?;
    assert_eq!(si["spec"]["type"], "ClusterSetIP", "the oldest export's type wins");
    // West withdraws its export: the conflict clears, the import is east's alone again.
    west_k.kubectl_ok(&["delete", EXPORTS, "-n", "shop", "web"])?;
    for k in [&east_k, &west_k] {
        let cleared = || -> Result<Option<()>> {
            let e = k.get_json(&[EXPORTS, "-n", "shop", "web"])?;
            let Some(e) = e else { return Ok(Some(())) };
            Ok(condition(&e, "Conflict").filter(|c| c.0 == "False").map(|_| ()))
        };
        eventually(&format!("{}'s Conflict to clear", k.name()), WAIT, cleared)?;
    }
    let si = wait_import_right(&west_k, "west's import back to east's alone")?;
    assert_eq!(si["spec"]["ips"][0], vip.as_str(), "the ClusterSetIP lives as long as the import");

    // 4. Restart gateway west in `b`, gracefully (SIGTERM, as Kubernetes stops a pod) and as
    // a crash (SIGKILL), then crash east (the dialing side: lower cluster id): same uids in
    // both clusters, same ClusterSetIP, traffic again.
    let check = RestartCheck { clusters: [&east_k, &west_k], b: &net.b, url: &url, vip: &vip };
    restart(&check, &mut west_gw, &east_gw, "TERM")?;
    restart(&check, &mut west_gw, &east_gw, "KILL")?;
    restart(&check, &mut east_gw, &west_gw, "KILL")?;

    // 5. Deleting east's export removes the import and slices from west (and east).
    let unexported = Instant::now();
    east_k.kubectl_ok(&["delete", EXPORTS, "-n", "shop", "web"])?;
    for k in [&west_k, &east_k] {
        eventually(&format!("{}'s import and slices to go", k.name()), WAIT, || {
            let gone = k.get_json(&[IMPORTS, "-n", "shop", "web"])?.is_none()
                && imported_slices(k, "shop", "web")?.is_empty();
            Ok(gone.then_some(()))
        })?;
        eprintln!(
            "FIGURE east's export deleted -> import and slices gone from {}: {:.2} s",
            k.name(),
            unexported.elapsed().as_secs_f64()
        );
    }
    eventually("west's DNS to forget the name", WAIT, || {
        Ok(dig(&net.b, name, "A")?.is_empty().then_some(()))
    })?;
    eprintln!("whole test: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
