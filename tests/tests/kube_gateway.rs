//! fedgate against real kube-apiservers: the kube source reads Services, EndpointSlices and
//! ServiceExports; the writer puts conditions on ServiceExports and ServiceImports plus
//! per-cluster EndpointSlices into every member cluster, reconciles in place across a restart
//! (same uids), removes what a lapsed lease withdrew, and in `front.mode: kube` derives a
//! Service whose endpoint is the gateway, which carries real connections. The gateways run as
//! the ServiceAccount of deploy/manifests (kubeconfig impersonation), so its RBAC is what is
//! tested.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use fedgate_e2e::kube::{EXPORTS, IMPORTS, KubeCluster, imported_slices, uid, use_kube_source};
use fedgate_e2e::netns::EndpointNet;
use fedgate_e2e::*;
use serde_json::Value;

const CLUSTERSET: &str = "kube-e2e";
const WAIT: Duration = Duration::from_secs(20);
const SA: &str = fedgate_e2e::kube::GATEWAY_SERVICE_ACCOUNT;

/// ServiceImport `ns/name` (of `resource`, e.g. [`IMPORTS`]) once its status is written: the
/// writer creates the object and then writes its status subresource in a second call, so a
/// read in between sees the spec without `status.clusters`.
fn import_with_status(k: &KubeCluster, resource: &str, ns: &str, name: &str) -> Result<Value> {
    eventually(&format!("ServiceImport {ns}/{name} with its status"), WAIT, || {
        Ok(k.get_json(&[resource, "-n", ns, name])?
            .filter(|si| si["status"]["clusters"].is_array()))
    })
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Turns a file-source gateway config into a kube-source one; `config_id: None` leaves
/// `cluster.id` out (the ClusterProperty provides it).
fn use_kube(
    g: &Gateway,
    kubeconfig: &Path,
    config_id: Option<&str>,
    front: Option<&str>,
) -> Result<()> {
    use_kube_source(g, kubeconfig)?;
    let id = format!("  id: {}\n", g.spec.id);
    g.edit_config(&id, &config_id.map(|id| format!("  id: {id}\n")).unwrap_or_default())?;
    if let Some(front) = front {
        g.edit_config("front: { mode: vip,", &format!("front: {{ mode: kube, kube: {front},"))?;
    }
    Ok(())
}

/// Endpoint addresses the API server accepts: `10.251.<k>.1/29` on the host side, `.2`, `.3`
/// inside the namespace `fg-<pid>-kube<tag>`.
fn endpoint_net(tag: u8) -> Result<EndpointNet> {
    let pid = std::process::id();
    let k = ((pid % 120) as u8) * 2 + tag;
    let host_if = format!("fgk{}h{tag}", pid % 100_000);
    EndpointNet::create(&format!("fg-{pid}-kube{tag}"), &host_if, [10, 251, k])
}

fn conditions(export: &Value) -> Vec<(String, String, String)> {
    export["status"]["conditions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
                    (s("type"), s("status"), s("reason"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A lone gateway `id` (region r1, zone z1, ClusterSetIPs from `127.<a>.<third>.0/24`),
/// configured, not started.
fn lone_gateway(root: &Path, block: AddrBlock, id: &str, third: u8) -> Result<Gateway> {
    let pki = Pki::new(root, "ca", CLUSTERSET)?;
    let spec = GatewaySpec {
        region: "r1".to_owned(),
        zone: "z1".to_owned(),
        vip_range: format!("127.{}.{third}.0/24", block.ip(1).octets()[1]),
        ..GatewaySpec::mesh(block, CLUSTERSET, &[id], 0)
    };
    let tls = pki.issue(id, &root.join("certs"))?;
    Gateway::prepare(root, spec, tls)
}

#[test]
fn exports_become_imports_in_every_cluster_and_survive_a_restart_in_place() -> Result<()> {
    let (east_k, west_k) = KubeCluster::start_pair(["east", "west"])?;
    let east_kc = east_k.prepare_for_gateway()?;
    let west_kc = west_k.prepare_for_gateway()?;
    for c in [&east_k, &west_k] {
        c.kubectl_ok(&["create", "namespace", "shop"])?;
    }
    // west's id comes from its ClusterProperty (KEP-2149): its config has no cluster.id.
    west_k.apply_yaml(
        "apiVersion: about.k8s.io/v1alpha1\nkind: ClusterProperty\nmetadata: { name: cluster.clusterset.k8s.io }\nspec: { value: west }\n",
    )?;

    let net = endpoint_net(0)?;
    let [ep_ready, ep_unready] = net.inside.map(|a| a.to_string());
    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let mut gws = prepare_mesh(tmp.path(), block, CLUSTERSET, &["east", "west"], |_, spec| {
        spec.region = "r1".to_owned();
        spec.zone = format!("z-{}", spec.id);
        spec.lease = "3s".to_owned();
    })?;
    use_kube(&gws[0], &east_kc, Some("east"), None)?;
    use_kube(&gws[1], &west_kc, None, None)?;
    assert!(!std::fs::read_to_string(gws[1].config_path())?.contains("  id: "));
    for g in &mut gws {
        g.start()?;
    }

    // east exports shop/web; a second export is broken (an exported label key without a name)
    east_k.apply_yaml(&service_yaml(
        "shop",
        "web",
        false,
        &[("http", 80, 8080)],
        &[(&ep_ready, true), (&ep_unready, false)],
        None,
    ))?;
    east_k.apply_yaml(
        "apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceExport\nmetadata: { name: web, namespace: shop }\n---\n\
         apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: { name: bad, namespace: shop }\nspec: { exportedLabels: { 'x/': v } }\n",
    )?;

    let t0 = std::time::Instant::now();
    let export = eventually("east's ServiceExport conditions", WAIT, || {
        let e = east_k
            .get_json(&[EXPORTS, "-n", "shop", "web", "--show-managed-fields"])?
            .context("export exists")?;
        let c = conditions(&e);
        Ok(c.contains(&("Ready".into(), "True".into(), "Exported".into())).then_some(e))
    })?;
    eprintln!("ServiceExport conditions written after {:?}", t0.elapsed());
    let c = conditions(&export);
    assert!(c.contains(&("Valid".into(), "True".into(), "Valid".into())), "{c:?}");
    assert!(c.contains(&("Conflict".into(), "False".into(), "NoConflicts".into())), "{c:?}");
    let managers: Vec<&str> = export["metadata"]["managedFields"]
        .as_array()
        .map(|m| m.iter().filter_map(|f| f["manager"].as_str()).collect())
        .unwrap_or_default();
    assert!(managers.contains(&"fedgate"), "status written by field manager fedgate: {managers:?}");

    // the writes are counted
    let (_, metrics) = http_get(gws[0].spec.admin, "/metrics")?;
    let (status_writes, _) = *metric_samples(
        &metrics,
        "fedgate_kube_writes_total",
        &[("kind", "ServiceExport"), ("result", "ok")],
    )
    .first()
    .with_context(|| format!("no ServiceExport status writes in /metrics:\n{metrics}"))?;
    assert!(status_writes.contains("op=\"status\""), "{status_writes}");

    // the broken export is a problem of east's source; the good one is not held back
    let problems = east_gw_problems(&gws[0])?;
    assert!(problems.iter().any(|p| p["object"] == "ServiceExport shop/bad"), "{problems:?}");
    let (_, metrics) = http_get(gws[0].spec.admin, "/metrics")?;
    assert!(metrics.contains("fedgate_kube_source_problems 1"), "{metrics}");

    // a ServiceImport and east's EndpointSlice in both clusters (exporters import too)
    for (k, ips_from) in [(&west_k, &gws[1]), (&east_k, &gws[0])] {
        let si = import_with_status(k, IMPORTS, "shop", "web")?;
        assert_eq!(si["spec"]["type"], "ClusterSetIP");
        assert_eq!(si["spec"]["ports"][0]["port"], 80);
        assert_eq!(si["status"]["clusters"], serde_json::json!([{"cluster": "east"}]), "{si}");
        let gw_import = find_import(&ips_from.json("/debug/imports")?, "shop", "web").cloned();
        assert_eq!(
            si["spec"]["ips"],
            gw_import.context("gateway import")?["ips"],
            "the gateway's ClusterSetIP"
        );
        let slices = eventually("east's slice", WAIT, || {
            let s = imported_slices(k, "shop", "web")?;
            Ok((s.len() == 1).then_some(s))
        })?;
        let labels = &slices[0]["metadata"]["labels"];
        assert_eq!(labels["multicluster.kubernetes.io/source-cluster"], "east");
        let addrs: Vec<&str> = slices[0]["endpoints"]
            .as_array()
            .context("endpoints")?
            .iter()
            .filter_map(|e| e["addresses"][0].as_str())
            .collect();
        assert_eq!(addrs, [ep_ready.as_str(), ep_unready.as_str()]);
        assert_eq!(slices[0]["ports"][0]["port"], 8080);
    }

    // west federates under the id its ClusterProperty gave it: its export reaches east
    // labelled `west`
    west_k.apply_yaml(&service_yaml(
        "shop",
        "api",
        false,
        &[("http", 81, 8081)],
        &[(&ep_ready, true)],
        None,
    ))?;
    west_k.export("shop", "api")?;
    let si = import_with_status(&east_k, IMPORTS, "shop", "api")?;
    assert_eq!(si["status"]["clusters"], serde_json::json!([{"cluster": "west"}]), "{si}");
    let slices = eventually("west's slice in east", WAIT, || {
        let s = imported_slices(&east_k, "shop", "api")?;
        Ok((s.len() == 1).then_some(s))
    })?;
    assert_eq!(
        slices[0]["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"],
        "west"
    );
    let west_import = find_import(&gws[0].json("/debug/imports")?, "shop", "api").cloned();
    let clusters = west_import.context("east's import of west's api")?["clusters"].clone();
    assert!(clusters.get("west").is_some(), "{clusters}");

    // east's gateway dies: when its lease (3 s) lapses, west removes east's import and slices
    gws[0].kill();
    let t_kill = std::time::Instant::now();
    eventually("west to drop the import after east's lease", WAIT, || {
        let gone = west_k.get_json(&[IMPORTS, "-n", "shop", "web"])?.is_none()
            && imported_slices(&west_k, "shop", "web")?.is_empty();
        Ok(gone.then_some(()))
    })
    .with_context(|| gws[1].log_text())?;
    eprintln!(
        "east's objects removed from west {:?} after east died (lease 3 s)",
        t_kill.elapsed()
    );

    // east comes back and everything returns
    gws[0].start()?;
    eventually("import back on west", WAIT, || west_k.get_json(&[IMPORTS, "-n", "shop", "web"]))?;

    // a restart reconciles in place: same objects, same uids, conditions not rewritten
    let export_before = east_k.get_json(&[EXPORTS, "-n", "shop", "web"])?.context("export")?;
    let si_before =
        eventually("east's import", WAIT, || east_k.get_json(&[IMPORTS, "-n", "shop", "web"]))?;
    let slice_before = imported_slices(&east_k, "shop", "web")?;
    assert_eq!(slice_before.len(), 1);
    gws[0].kill();
    gws[0].start()?;
    eventually("east ready again", WAIT, || {
        Ok((http_get(gws[0].spec.admin, "/readyz")?.0 == 200).then_some(()))
    })?;
    eventually("east's writer listed its objects", WAIT, || {
        let log = gws[0].log_text();
        Ok((log.matches("listed existing objects; reconciling in place").count() >= 3)
            .then_some(()))
    })?;
    // past the 3 s lease (the earliest deletions may run): nothing was deleted or recreated
    std::thread::sleep(Duration::from_secs(4));
    let si_after = east_k
        .get_json(&[IMPORTS, "-n", "shop", "web"])?
        .with_context(|| format!("import after restart\n{}", gws[0].log_text()))?;
    let slice_after = imported_slices(&east_k, "shop", "web")?;
    let export_after = east_k.get_json(&[EXPORTS, "-n", "shop", "web"])?.context("export")?;
    assert_eq!(uid(&si_before), uid(&si_after), "ServiceImport kept its uid");
    assert_eq!(slice_after.len(), 1);
    assert_eq!(uid(&slice_before[0]), uid(&slice_after[0]), "EndpointSlice kept its uid");
    assert_eq!(
        conditions(&export_before),
        conditions(&export_after),
        "conditions after the restart"
    );

    // deleting the ServiceExport removes the import everywhere
    east_k.kubectl_ok(&["delete", EXPORTS, "-n", "shop", "web"])?;
    for k in [&west_k, &east_k] {
        eventually("import gone after unexport", WAIT, || {
            let gone = k.get_json(&[IMPORTS, "-n", "shop", "web"])?.is_none()
                && imported_slices(k, "shop", "web")?.is_empty();
            Ok(gone.then_some(()))
        })?;
    }
    Ok(())
}

fn east_gw_problems(g: &Gateway) -> Result<Vec<Value>> {
    eventually("a source problem", WAIT, || {
        let p = g.json("/debug/problems")?;
        let list = p.as_array().cloned().unwrap_or_default();
        Ok((!list.is_empty()).then_some(list))
    })
}

#[test]
fn front_kube_derives_a_service_that_reaches_the_endpoint_through_the_gateway() -> Result<()> {
    let net = endpoint_net(1)?;
    let k = KubeCluster::start("front")?;
    let kc = k.prepare_for_gateway()?;
    k.kubectl_ok(&["create", "namespace", "shop"])?;
    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let backend = SocketAddr::new(net.inside[0].into(), 18080);
    // killed with the namespace (the guard kills every process in it)
    let _echo = net
        .ns
        .command("python3")
        .args(["-c", ECHO_SERVER, &backend.ip().to_string(), "18080"])
        .spawn()
        .context("starting the echo server in the endpoint namespace")?;
    let mut g = lone_gateway(tmp.path(), block, "solo", 210)?;
    // the gateway "pod" IP: the host side of the veth (the API server refuses loopback)
    let pod_ip: Ipv4Addr = net.host;
    let front = format!("{{ podIP: {pod_ip}, firstPort: 21000, lastPort: 21009 }}");
    use_kube(&g, &kc, None, Some(&front))?;

    // no cluster.id in the config and no ClusterProperty: refused, naming both ways out
    let err = g.start().expect_err("no cluster id anywhere is refused");
    let err = format!("{err:#}");
    assert!(
        err.contains(
            "no cluster id: the config has no cluster.id and the cluster has no ClusterProperty \
             cluster.clusterset.k8s.io: set cluster.id in the config, or create the ClusterProperty"
        ),
        "{err}"
    );
    g.kill();
    g.edit_config("cluster:\n", "cluster:\n  id: solo\n")?;

    // a ClusterProperty that names another cluster stops the gateway with a clear error
    let prop = "apiVersion: about.k8s.io/v1alpha1\nkind: ClusterProperty\n\
                metadata: { name: cluster.clusterset.k8s.io }\nspec: { value: VALUE }\n";
    k.apply_yaml(&prop.replace("VALUE", "someone-else"))?;
    let err = g.start().expect_err("a mismatching ClusterProperty is refused");
    let err = format!("{err:#}");
    assert!(
        err.contains(
            "the ClusterProperty cluster.clusterset.k8s.io says this cluster is \"someone-else\" \
             but cluster.id is \"solo\""
        ),
        "{err}"
    );
    k.apply_yaml(&prop.replace("VALUE", "solo"))?;
    g.kill();
    g.start()?;

    k.apply_yaml(&service_yaml(
        "shop",
        "echo",
        false,
        &[("tcp", 7, 18080)],
        &[(&backend.ip().to_string(), true)],
        None,
    ))?;
    k.export("shop", "echo")?;

    // the derived Service: selector-less, port 80... here 7 → the gateway port 21000
    let svc = eventually("derived Service", WAIT, || {
        let list = k
            .get_json(&["services", "-n", "shop", "-l", "app.kubernetes.io/managed-by=fedgate"])?
            .unwrap_or_default();
        Ok(list["items"].as_array().and_then(|i| i.first().cloned()))
    })?;
    assert!(svc["spec"].get("selector").is_none(), "selector-less: {svc}");
    assert_eq!(svc["spec"]["ports"][0]["port"], 7);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 21000);
    let cluster_ip = svc["spec"]["clusterIP"].as_str().context("clusterIP")?.to_owned();
    let name = svc["metadata"]["name"].as_str().context("name")?.to_owned();
    let slice = eventually("the derived Service's slice", WAIT, || {
        k.get_json(&["endpointslices", "-n", "shop", &name])
    })?;
    assert_eq!(slice["metadata"]["labels"]["kubernetes.io/service-name"], name.as_str());
    assert_eq!(slice["endpoints"][0]["addresses"][0], pod_ip.to_string());
    assert_eq!(slice["ports"][0]["port"], 21000);

    // the ServiceImport's ClusterSetIP is the derived Service's ClusterIP
    let si = eventually("ServiceImport with the ClusterIP", WAIT, || {
        Ok(k.get_json(&[IMPORTS, "-n", "shop", "echo"])?
            .filter(|si| si["spec"]["ips"] == serde_json::json!([cluster_ip])))
    })?;
    assert_eq!(si["spec"]["type"], "ClusterSetIP");

    // kube-proxy would send ClusterIP:7 to <pod IP>:21000; the gateway carries it to the backend
    let gw_port = SocketAddr::new(pod_ip.into(), 21000);
    let reply = eventually("echo through the gateway port", WAIT, || {
        let Ok(mut s) = TcpStream::connect_timeout(&gw_port, Duration::from_secs(1)) else {
            return Ok(None);
        };
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"ping through fedgate")?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        Ok((n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned()))
    })?;
    assert_eq!(reply, "ping through fedgate");

    // unexport: the derived Service, its slice and the ServiceImport go
    k.kubectl_ok(&["delete", EXPORTS, "-n", "shop", "echo"])?;
    eventually("derived objects removed", WAIT, || {
        let gone = k.get_json(&["services", "-n", "shop", &name])?.is_none()
            && k.get_json(&["endpointslices", "-n", "shop", &name])?.is_none()
            && k.get_json(&[IMPORTS, "-n", "shop", "echo"])?.is_none();
        Ok(gone.then_some(()))
    })?;
    Ok(())
}

/// Flat network mode with the kube front (issue 21, item 5): alpha (kube source, front kube,
/// `traffic.network: flat`) imports `shop/echo` from bravo (file source), whose endpoint is
/// routed from alpha's host. While bravo's endpoint is the best healthy tier, the derived
/// Service's EndpointSlice lists it on its own port instead of the gateway pod; when it fails
/// bravo's probes, the derived Service points at the gateway pod again.
#[test]
fn front_kube_in_flat_mode_lists_the_flat_peers_endpoint_while_it_is_the_best_tier() -> Result<()> {
    let net = endpoint_net(2)?;
    let k = KubeCluster::start("flat")?;
    let kc = k.prepare_for_gateway()?;
    k.kubectl_ok(&["create", "namespace", "shop"])?;
    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let backend = net.inside[0].to_string();
    let mut echo = net
        .ns
        .command("python3")
        .args(["-c", ECHO_SERVER, &backend, "18080"])
        .spawn()
        .context("starting the echo server in the endpoint namespace")?;
    let health = "  healthCheck: { interval: 300ms, timeout: 200ms, unhealthyThreshold: 2 }\n";
    let mut gws = prepare_mesh(tmp.path(), block, CLUSTERSET, &["alpha", "bravo"], |i, spec| {
        spec.lease = "3s".to_owned();
        spec.extra = match i {
            0 => format!("traffic:\n  network: flat\n{health}"),
            _ => format!("traffic:\n{health}"),
        };
    })?;
    let front = format!("{{ podIP: {}, firstPort: 21010, lastPort: 21019 }}", net.host);
    use_kube(&gws[0], &kc, Some("alpha"), Some(&front))?;
    for g in &mut gws {
        g.start()?;
    }
    gws[1].write_cluster_file(
        "echo.yaml",
        &exported_service("shop", "echo", ("tcp", 7, 18080), &backend),
    )?;

    let svc = eventually("derived Service", WAIT, || {
        let list = k
            .get_json(&["services", "-n", "shop", "-l", "app.kubernetes.io/managed-by=fedgate"])?
            .unwrap_or_default();
        Ok(list["items"].as_array().and_then(|i| i.first().cloned()))
    })?;
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 21010);
    let name = svc["metadata"]["name"].as_str().context("name")?.to_owned();
    let direct_name = format!("{name}-bravo-0");
    let direct = eventually("the derived slice listing bravo's endpoint", WAIT, || {
        k.get_json(&["endpointslices", "-n", "shop", &direct_name])
    })?;
    assert_eq!(direct["metadata"]["labels"]["kubernetes.io/service-name"], name.as_str());
    assert_eq!(direct["endpoints"][0]["addresses"][0], backend.as_str(), "{direct}");
    assert_eq!(direct["ports"][0]["port"], 18080, "the endpoint's own port: {direct}");
    assert!(k.get_json(&["endpointslices", "-n", "shop", &name])?.is_none(), "no gateway slice");

    // bravo's endpoint fails its own gateway's probes: no healthy tier is direct any more, so
    // the derived Service leads to the gateway pod again.
    echo.kill()?;
    let _ = echo.wait();
    let pod_slice = eventually("the gateway pod's slice back", WAIT, || {
        k.get_json(&["endpointslices", "-n", "shop", &name])
    })?;
    assert_eq!(pod_slice["endpoints"][0]["addresses"][0], net.host.to_string());
    eventually("the direct slice removed", WAIT, || {
        Ok(k.get_json(&["endpointslices", "-n", "shop", &direct_name])?.is_none().then_some(()))
    })?;
    Ok(())
}

/// The CRDs of deploy/crds with only `v1alpha1` served (and stored): a cluster that has not
/// moved to `v1beta1` yet.
fn v1alpha1_only_crds(c: &KubeCluster) -> Result<()> {
    for file in
        ["multicluster.x-k8s.io_serviceexports.yaml", "multicluster.x-k8s.io_serviceimports.yaml"]
    {
        let path = repo().join("deploy/crds").join(file);
        let json = c.kubectl_ok(&[
            "create",
            "--dry-run=client",
            "-o",
            "json",
            "-f",
            &path.to_string_lossy(),
        ])?;
        let mut crd: Value = serde_json::from_str(&json)?;
        let versions = crd["spec"]["versions"].as_array_mut().context("versions")?;
        versions.retain(|v| v["name"] == "v1alpha1");
        versions[0]["storage"] = Value::Bool(true);
        c.apply_yaml(&crd.to_string())?;
    }
    c.kubectl_ok(&["wait", "--for=condition=Established", "--timeout=30s", "crd", "--all"])?;
    Ok(())
}

#[test]
fn a_cluster_serving_only_v1alpha1_is_read_and_written_in_v1alpha1() -> Result<()> {
    let k = KubeCluster::start("alpha")?;
    v1alpha1_only_crds(&k)?;
    for f in ["00-namespace.yaml", "01-serviceaccount.yaml", "02-rbac.yaml"] {
        k.kubectl_ok(&["apply", "-f", &repo().join("deploy/manifests").join(f).to_string_lossy()])?;
    }
    let kc = {
        let admin = std::fs::read_to_string(k.kubeconfig_path())?;
        let token_line = format!("    token: {}\n", k.token());
        let path = k.dir().join("kubeconfig-fedgate-sa");
        std::fs::write(&path, admin.replace(&token_line, &format!("{token_line}    as: {SA}\n")))?;
        path
    };
    k.kubectl_ok(&["create", "namespace", "shop"])?;
    k.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: { name: api, namespace: shop }\nspec: { ports: [ { name: http, port: 80 } ] }\n---\n\
         apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: { name: api, namespace: shop }\n",
    )?;
    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let mut g = lone_gateway(tmp.path(), block, "alpha", 220)?;
    use_kube(&g, &kc, Some("alpha"), None)?;
    g.start()?;
    assert!(g.log_text().contains("exports=multicluster.x-k8s.io/v1alpha1"), "{}", g.log_text());

    let alpha_exports = "serviceexports.v1alpha1.multicluster.x-k8s.io";
    eventually("v1alpha1 ServiceExport conditions", WAIT, || {
        let e = k.get_json(&[alpha_exports, "-n", "shop", "api"])?.context("export")?;
        Ok(conditions(&e)
            .contains(&("Ready".into(), "True".into(), "Exported".into()))
            .then_some(()))
    })?;
    let si =
        import_with_status(&k, "serviceimports.v1alpha1.multicluster.x-k8s.io", "shop", "api")?;
    assert_eq!(si["apiVersion"], "multicluster.x-k8s.io/v1alpha1");
    assert_eq!(si["status"]["clusters"], serde_json::json!([{"cluster": "alpha"}]));
    Ok(())
}
