//! Fault suite, issue 17: a cluster's kube-apiserver goes away for 30 s and comes back
//! (SIGKILL, then a new process on the same port and etcd: nothing stored is lost). Two real
//! control planes (etcd + kube-apiserver, tests/src/kube.rs), a gateway per cluster in kube
//! mode (the RBAC of deploy/manifests), a real echo backend in a network namespace (the API
//! server refuses loopback endpoint addresses), real clients: TCP round trips through east's
//! ClusterSetIP and `dig` against east's DNS. Needs root, `ip`, `python3`, `dig` and the kube
//! binaries of scripts/build-kube.sh (fails otherwise).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_e2e::faults::Recorder;
use fedgate_e2e::kube::{EXPORTS, IMPORTS, KubeCluster, imported_slices, uid, use_kube_source};
use fedgate_e2e::netns::EndpointNet;
use fedgate_e2e::*;

const CLUSTERSET: &str = "kube-faults";
const WAIT: Duration = Duration::from_secs(20);
/// How long east's apiserver stays down.
const OUTAGE: Duration = Duration::from_secs(30);
/// A ServiceExport created after the apiserver is back is imported in both clusters within
/// this: the gateway's watches relist "with backoff after errors" (docs/kubernetes.md) and the
/// backoff is capped at 30 s (kube-rs's default, the same as client-go's reflector), so a
/// watch should be back at most ~30 s after the apiserver is; the writer retries failed writes
/// every 10 s.
const RECONCILE_WITHIN: Duration = Duration::from_secs(30);
/// How long the test waits for that reconcile at most, to measure it when it is late.
const OBSERVE: Duration = Duration::from_secs(150);

/// Endpoint addresses the API server accepts: `10.252.<k>.1/29` on the host side, `.2`, `.3`
/// inside the namespace `fg-<pid>-kfault`. 10.252/16: kube_gateway.rs's pairs use 10.251/16.
fn endpoint_net() -> Result<EndpointNet> {
    let pid = std::process::id();
    let host_if = format!("fgf{}h", pid % 1_000_000);
    EndpointNet::create(&format!("fg-{pid}-kfault"), &host_if, [10, 252, (pid % 250) as u8])
}

/// One request of the client loop: when it ended, and its error if it failed.
type Outcome = (Instant, Option<String>);

/// The uids of the ServiceImport `shop/<name>` in `c` and of fedgate's EndpointSlices for it.
fn written_uids(c: &KubeCluster, name: &str) -> Result<Vec<String>> {
    let si = c.get_json(&[IMPORTS, "-n", "shop", name])?.context("the ServiceImport")?;
    let mut uids = vec![format!("ServiceImport shop/{name} {}", uid(&si))];
    for s in imported_slices(c, "shop", name)? {
        let n = s["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        uids.push(format!("EndpointSlice shop/{n} {}", uid(&s)));
    }
    Ok(uids)
}

/// A Service `shop/<name>` (port 7 → 18080) with one ready endpoint, and its ServiceExport.
fn export(c: &KubeCluster, name: &str, endpoint: Ipv4Addr) -> Result<()> {
    let endpoint = endpoint.to_string();
    c.apply_yaml(&service_yaml(
        "shop",
        name,
        false,
        &[("tcp", 7, 18080)],
        &[(&endpoint, true)],
        None,
    ))?;
    c.export("shop", name)?;
    Ok(())
}

/// One echo round trip on a new connection.
fn echo(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"ping through east")?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    if &buf[..n] != b"ping through east" {
        bail!("echo through {addr} answered {:?}", String::from_utf8_lossy(&buf[..n]));
    }
    Ok(())
}

/// `dig +short` A records of `shop/<name>` at `g`'s DNS server.
fn dns_a(g: &Gateway, name: &str) -> Result<Vec<String>> {
    fedgate_e2e::faults::dig_a(g, "shop", name)
}

/// The clusters `g` imports `shop/<name>` from, and its first ClusterSetIP.
fn imported(g: &Gateway, name: &str) -> Result<Option<(Vec<String>, String)>> {
    let imports = g.json("/debug/imports")?;
    Ok(find_import(&imports, "shop", name)
        .map(|i| (import_clusters(i), i["ips"][0].as_str().unwrap_or_default().to_owned())))
}

/// east's kube-apiserver is killed for 30 s while the gateways run, then started again.
/// Asserts, during the outage (checked every second): a client loop of echo round trips
/// through east's ClusterSetIP for west's shop/web loses NO request; east's DNS answers that
/// ClusterSetIP; east's gateway still imports west's shop/web and its own shop/api, and west
/// still has east's shop/api as a ServiceImport (east's last state is kept, nothing
/// withdrawn). After the restart: a ServiceExport created in east is imported in west and in
/// east (with Ready=True on the export) within [`RECONCILE_WITHIN`]: the watch and the writes
/// resume; the ServiceImports and EndpointSlices east's gateway wrote before the outage still
/// exist with the same uids (nothing deleted or recreated); the client loop still loses
/// nothing.
#[test]
fn an_apiserver_down_for_30s_loses_nothing_and_writes_resume() -> Result<()> {
    require_tool("dig", "bind9-dnsutils");
    let net = endpoint_net()?;
    let [web_ep, api_ep] = net.inside;
    let _echo = net
        .ns
        .command("python3")
        .args(["-c", ECHO_SERVER, &web_ep.to_string(), "18080"])
        .spawn()
        .context("starting the echo server in the endpoint namespace")?;
    let (mut east_k, west_k) = KubeCluster::start_pair(["east", "west"])?;
    let east_kc = east_k.prepare_for_gateway()?;
    let west_kc = west_k.prepare_for_gateway()?;
    for c in [&east_k, &west_k] {
        c.kubectl_ok(&["create", "namespace", "shop"])?;
    }

    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let ids = ["east", "west"];
    let mut gws = prepare_mesh(tmp.path(), block, CLUSTERSET, &ids, |i, spec| {
        let [_, a, b, _] = block.ip(1).octets();
        spec.lease = "5s".to_owned();
        // Not the mesh default, which every test of this process shares.
        spec.vip_range = format!("127.{a}.{b}.{}/27", 128 + 32 * i);
    })?;
    for (g, kc) in gws.iter().zip([&east_kc, &west_kc]) {
        use_kube_source(g, kc)?;
    }
    for g in &mut gws {
        g.start()?;
    }
    let east = &gws[0];

    export(&west_k, "web", web_ep)?;
    export(&east_k, "api", api_ep)?;
    // Everything east's gateway writes into east: both ServiceImports and their slices.
    for name in ["web", "api"] {
        eventually(&format!("shop/{name} imported into east with its slice"), WAIT, || {
            let si = east_k.get_json(&[IMPORTS, "-n", "shop", name])?;
            Ok((si.is_some() && imported_slices(&east_k, "shop", name)?.len() == 1).then_some(()))
        })?;
    }
    eventually("east's shop/api imported into west", WAIT, || {
        west_k.get_json(&[IMPORTS, "-n", "shop", "api"])
    })?;
    let (_, vip) = eventually("east to import shop/web from west", WAIT, || {
        Ok(imported(east, "web")?.filter(|(c, ip)| c == &["west"] && !ip.is_empty()))
    })?;
    let vip_addr = SocketAddr::new(vip.parse()?, 7);
    eventually("an echo through east's ClusterSetIP", WAIT, || Ok(echo(vip_addr).ok()))?;
    let mut before = written_uids(&east_k, "web")?;
    before.extend(written_uids(&east_k, "api")?);
    let west_api_uid = uid(&west_k.get_json(&[IMPORTS, "-n", "shop", "api"])?.context("import")?);

    // The client loop: (end, error) per request, one new connection each, 50 ms apart.
    let loop_started = Instant::now();
    let client_loop = Recorder::start(Duration::from_millis(50), move || {
        let r = echo(vip_addr).err().map(|e| format!("{e:#}"));
        ControlFlow::Continue(Some::<Outcome>((Instant::now(), r)))
    });

    eventually("10 echo round trips before the outage", WAIT, || {
        Ok((client_loop.snapshot().len() >= 10).then_some(()))
    })?;
    let down_at = Instant::now();
    let stopped = east_k.stop_apiserver()?;
    let mut looks = 0;
    while down_at.elapsed() < OUTAGE {
        let look = down_at.elapsed();
        assert_eq!(dns_a(east, "web")?, [vip.as_str()], "east's DNS at {look:?} into the outage");
        let web = imported(east, "web")?;
        assert!(
            web.as_ref().is_some_and(|(c, ip)| c == &["west"] && ip == &vip),
            "east's import of west's shop/web at {look:?} into the outage: {web:?}"
        );
        let api = imported(east, "api")?;
        assert!(
            api.as_ref().is_some_and(|(c, _)| c == &["east"]),
            "east withdrew its own shop/api at {look:?} into the outage: {api:?}"
        );
        let in_west = west_k.get_json(&[IMPORTS, "-n", "shop", "api"])?;
        assert_eq!(
            in_west.as_ref().map(uid),
            Some(west_api_uid.clone()),
            "west's ServiceImport of east's shop/api at {look:?} into the outage"
        );
        looks += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    let readyz = http_get(east.spec.admin, "/readyz").map(|(code, _)| code)?;
    let restart_took = east_k.start_apiserver(stopped)?;
    let up_at = Instant::now();
    eprintln!(
        "east's apiserver down {:?} ({looks} looks: DNS, imports on both sides unchanged); \
         east's /readyz at the end of the outage: HTTP {}; apiserver ready again in \
         {restart_took:?}",
        up_at - down_at - restart_took,
        readyz
    );

    // A change after the restart is reconciled: east's watch sees it, west imports it, and
    // east's writer writes its ServiceImport and the export's conditions into east. Waited for
    // up to OBSERVE so that a slow recovery is measured; the bound is asserted at the end,
    // after everything else has been checked.
    export(&east_k, "late", api_ep)?;
    let created = Instant::now();
    eventually("shop/late imported into west", OBSERVE, || {
        west_k.get_json(&[IMPORTS, "-n", "shop", "late"])
    })
    .with_context(|| format!("east's gateway log:\n{}", east.log_text()))?;
    let in_west = created.elapsed();
    eventually("shop/late imported into east, its export Ready", WAIT, || {
        let si = east_k.get_json(&[IMPORTS, "-n", "shop", "late"])?;
        let e = east_k.get_json(&[EXPORTS, "-n", "shop", "late"])?.unwrap_or_default();
        let ready = e["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
        Ok((si.is_some() && ready).then_some(()))
    })
    .with_context(|| format!("east's gateway log:\n{}", east.log_text()))?;
    let in_east = created.elapsed();
    let recovered: Vec<String> = east
        .log_text()
        .lines()
        .filter(|l| l.contains("watch recovered") || l.contains("watch initlist error"))
        .map(|l| l.chars().take(160).collect())
        .collect();
    eprintln!(
        "after the restart, a new ServiceExport in east was imported in west after {in_west:?} \
         and in east (export Ready) after {in_east:?}; east's watches:\n  {}",
        recovered.join("\n  ")
    );

    let mut after = written_uids(&east_k, "web")?;
    after.extend(written_uids(&east_k, "api")?);
    assert_eq!(before, after, "what east's gateway wrote before the outage, with uids");

    let results = client_loop.finish();
    let count = |from: Instant, to: Instant| {
        let phase: Vec<_> = results.iter().filter(|(t, _)| *t >= from && *t < to).collect();
        let failed: Vec<_> = phase.iter().filter_map(|(_, e)| e.clone()).collect();
        (phase.len(), failed)
    };
    for (what, from, to) in [
        ("before the outage", loop_started, down_at),
        ("while the apiserver was down", down_at, up_at),
        ("after the restart", up_at, Instant::now()),
    ] {
        let (total, failed) = count(from, to);
        eprintln!("{what}: {} of {total} echo round trips through east failed", failed.len());
        assert!(failed.is_empty(), "{what}: {} of {total} failed: {failed:?}", failed.len());
        assert!(total > 0, "{what}: no requests made");
    }
    assert!(
        in_west <= RECONCILE_WITHIN && in_east <= RECONCILE_WITHIN,
        "a ServiceExport created after the apiserver's restart took {in_west:?} to be imported \
         in west and {in_east:?} in east, more than {RECONCILE_WITHIN:?}: east's watches resumed \
         late (see the watch lines above)"
    );
    Ok(())
}
