//! The kube harness itself: two real clusters (etcd + kube-apiserver each) started at once,
//! driven with the real kubectl. What one cluster stores the other never sees, and the
//! apiserver refuses tokens it did not issue.

use anyhow::{Context, Result};
use std::net::TcpListener;

use fedgate_e2e::kube::{KubeCluster, free_ports, helm_ok, kube_version};
use fedgate_e2e::service_yaml;

/// `kubectl get <args> -o json`, parsed.
fn get_json(cluster: &KubeCluster, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let out = cluster.kubectl_ok(&all)?;
    serde_json::from_str(&out).with_context(|| format!("kubectl {all:?}: not JSON: {out}"))
}

#[test]
fn two_clusters_store_separately_and_refuse_foreign_tokens() -> Result<()> {
    let (east, west) = std::thread::scope(|s| {
        let east = s.spawn(|| KubeCluster::start("east"));
        let west = s.spawn(|| KubeCluster::start("west"));
        (east.join().expect("east start thread"), west.join().expect("west start thread"))
    });
    let (east, west) = (east?, west?);
    eprintln!(
        "kube clusters ready: east in {:.2?}, west in {:.2?} (started concurrently)",
        east.started_in(),
        west.started_in()
    );
    assert_ne!(east.server_url(), west.server_url());
    assert_ne!(east.token(), west.token());

    // The binaries are the release the wrapper module pins.
    let version = east.kubectl_ok(&["version", "-o", "json"])?;
    let version: serde_json::Value = serde_json::from_str(&version)?;
    let want = kube_version()?;
    assert_eq!(version["serverVersion"]["gitVersion"], want.as_str(), "{version}");
    assert_eq!(version["clientVersion"]["gitVersion"], want.as_str(), "{version}");

    // Write through kubectl into east, read back. The apiserver refuses loopback endpoint
    // addresses; these are TEST-NET-1 documentation addresses, data only: nothing connects.
    east.kubectl_ok(&["create", "namespace", "shop"])?;
    let applied = east.apply_yaml(&service_yaml(
        "shop",
        "cart",
        false,
        &[("http", 80, 8080)],
        &[("192.0.2.10", true), ("192.0.2.11", false)],
        None,
    ))?;
    assert!(applied.contains("service/cart created"), "{applied}");
    assert!(applied.contains("endpointslice.discovery.k8s.io/cart-1 created"), "{applied}");

    let svc = get_json(&east, &["service", "cart", "-n", "shop"])?;
    assert_eq!(svc["spec"]["ports"][0]["port"], 80, "{svc}");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080, "{svc}");
    let cluster_ip = svc["spec"]["clusterIP"].as_str().context("a ClusterIP is allocated")?;
    assert!(cluster_ip.starts_with("10.96."), "ClusterIP {cluster_ip} from the service CIDR");

    let slices = get_json(
        &east,
        &["endpointslices", "-n", "shop", "-l", "kubernetes.io/service-name=cart"],
    )?;
    let items = slices["items"].as_array().context("items")?;
    assert_eq!(items.len(), 1, "{slices}");
    let endpoints = items[0]["endpoints"].as_array().context("endpoints")?;
    let seen: Vec<(String, bool)> = endpoints
        .iter()
        .map(|e| {
            (
                e["addresses"][0].as_str().unwrap_or_default().to_owned(),
                e["conditions"]["ready"].as_bool().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("192.0.2.10".to_owned(), true), ("192.0.2.11".to_owned(), false)],
        "{slices}"
    );

    // West has none of it.
    let missing = west.kubectl(&["get", "namespace", "shop"])?;
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("NotFound") || stderr.contains("not found"), "{stderr}");
    let services = get_json(&west, &["services", "-A"])?;
    let names: Vec<&str> = services["items"]
        .as_array()
        .context("items")?
        .iter()
        .flat_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["kubernetes"], "west only has its own apiserver Service");
    let west_slices = get_json(&west, &["endpointslices", "-A"])?;
    assert!(
        west_slices["items"]
            .as_array()
            .context("items")?
            .iter()
            .all(|i| i["metadata"]["namespace"] != "shop"),
        "{west_slices}"
    );

    // Tokens: its own works, a wrong one and the other cluster's are 401, none is anonymous
    // (authenticated as system:anonymous, then forbidden by RBAC).
    let (code, _) = east.get("/api/v1/namespaces")?;
    assert_eq!(code, 200);
    for token in ["wrong-token", west.token()] {
        let (code, body) = east.get_with_token("/api/v1/namespaces", token)?;
        assert_eq!(code, 401, "token {token:?}: {body}");
    }
    let (code, body) = east.get_with_token("/api/v1/namespaces", "")?;
    assert_eq!(code, 403, "{body}");
    let refused = east.kubectl(&["--token=wrong-token", "get", "namespaces"])?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("Unauthorized"), "{stderr}");
    Ok(())
}

/// The built helm renders a chart that the real apiserver accepts: `helm create`, `helm lint`,
/// `helm template`, then `kubectl apply` of the result.
#[test]
fn helm_renders_a_chart_the_apiserver_accepts() -> Result<()> {
    let cluster = KubeCluster::start("helm")?;
    let work = tempfile::tempdir()?;
    let home = work.path().join("helm-home");
    let chart = work.path().join("demo");
    let chart = chart.to_str().context("UTF-8 temp path")?;

    let version = helm_ok(&home, &["version", "--short"])?;
    assert!(version.starts_with("v3."), "{version}");
    helm_ok(&home, &["create", chart])?;
    let lint = helm_ok(&home, &["lint", chart])?;
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    let rendered = helm_ok(&home, &["template", "demo", chart, "--namespace", "default"])?;
    assert!(rendered.contains("kind: Deployment"), "{rendered}");

    let applied = cluster.apply_yaml(&rendered)?;
    assert!(applied.contains("deployment.apps/demo created"), "{applied}");
    assert!(applied.contains("service/demo created"), "{applied}");
    let deployment = get_json(&cluster, &["deployment", "demo", "-n", "default"])?;
    assert_eq!(deployment["spec"]["replicas"], 1, "{deployment}");
    Ok(())
}

/// A port picked as free but taken before etcd or the apiserver binds it: the start is retried
/// on new ports (up to 3 attempts), and fails with the bind error when every attempt collides.
#[test]
fn a_taken_port_is_retried_on_new_ports() -> Result<()> {
    let busy = TcpListener::bind("127.0.0.1:0")?;
    let busy_port = busy.local_addr()?.port();

    // First attempt: the apiserver's port is taken; the second gets free ports.
    let mut calls = 0;
    let mut pick = || {
        calls += 1;
        let [client, peer, api] = free_ports::<3>()?;
        Ok(if calls == 1 { [client, peer, busy_port] } else { [client, peer, api] })
    };
    let cluster = KubeCluster::start_with_ports("retry", &mut pick)?;
    assert_eq!(calls, 2, "one retry");
    assert_ne!(cluster.server_url(), format!("https://127.0.0.1:{busy_port}"));
    let (code, _) = cluster.get("/readyz")?;
    assert_eq!(code, 200);
    drop(cluster);

    // Every attempt: etcd's client port is taken.
    let mut calls = 0;
    let mut pick = || {
        calls += 1;
        let [_, peer, api] = free_ports::<3>()?;
        Ok([busy_port, peer, api])
    };
    let err = KubeCluster::start_with_ports("collide", &mut pick)
        .err()
        .context("a start whose etcd port is always taken must fail")?;
    assert_eq!(calls, 3, "three attempts");
    let msg = format!("{err:#}");
    assert!(msg.contains("etcd exited"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{busy_port}: bind: address already in use")), "{msg}");
    Ok(())
}
