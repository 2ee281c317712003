//! Two replicas of one cluster against a real kube-apiserver (issue 19, item 3): they elect
//! one writer with a coordination.k8s.io Lease, the follower writes nothing and serves the
//! leader's ClusterSetIPs, and when the leader is killed (SIGKILL, no release) the other
//! takes the Lease within its duration and reconciles in place: the ServiceImport and its
//! slices keep their uids and ips, and an export created afterwards is written by the new
//! leader.
//!
//! Cluster `a` runs replicas `a-1` and `a-2` (same id and certificate, own ports, both on A's
//! apiserver); cluster `b` runs one gateway on its own apiserver and lists both A replicas in
//! `peers[].addresses`. The gateways run as the ServiceAccount of deploy/manifests
//! (kubeconfig impersonation), so its RBAC for the Lease and for reading ServiceImports back
//! is what is tested.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fedgate_e2e::kube::{
    IMPORTS, KubeCluster, imported_slices, lease_holder, lease_identity, uid, use_kube_source,
};
use fedgate_e2e::*;
use serde_json::Value;

const CLUSTERSET: &str = "replicas";
const WAIT: Duration = Duration::from_secs(20);
const LEASE_NS: &str = fedgate_e2e::kube::GATEWAY_NAMESPACE;
const LEASE: &str = "fedgate-leader";
/// The Lease duration the replicas use (the shortest the config allows is 2 s).
const LEASE_DURATION: Duration = Duration::from_secs(3);
/// What a takeover may add to the duration: kube-lease-manager waits 0.1-1 s after clearing
/// an expired Lease before it takes it, then two requests and the Lease watch event.
const TAKEOVER_SLACK: Duration = Duration::from_millis(1500);

/// A kube-source gateway of `spec` (certificates `tls`) under `root`, reading `kubeconfig`,
/// electing as `identity` in [`LEASE_NS`]/[`LEASE`] with a [`LEASE_DURATION`] Lease.
fn replica(
    root: &Path,
    spec: GatewaySpec,
    tls: (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf),
    kubeconfig: &Path,
    identity: &str,
) -> Result<Gateway> {
    let g = Gateway::prepare(root, spec, tls)?;
    use_kube_source(&g, kubeconfig)?;
    g.edit_config(
        &format!("identity: {} }}", lease_identity(&g)),
        &format!("identity: {identity}, leaseDuration: {}s }}", LEASE_DURATION.as_secs()),
    )?;
    Ok(g)
}

fn role(g: &Gateway) -> Result<Value> {
    g.json("/debug/leader")
}

fn metric(g: &Gateway, name: &str) -> Result<f64> {
    let (_, text) = http_get(g.spec.admin, "/metrics")?;
    Ok(metric_samples(&text, name, &[]).iter().map(|(_, v)| v).sum())
}

/// The ips a gateway's import set holds for `ns/name` (`/debug/imports`).
fn served_ips(g: &Gateway, ns: &str, name: &str) -> Result<Value> {
    let imports = g.json("/debug/imports")?;
    Ok(find_import(&imports, ns, name).map(|i| i["ips"].clone()).unwrap_or(Value::Null))
}

#[test]
fn two_replicas_elect_one_writer_and_the_other_takes_over_in_place() -> Result<()> {
    let (a_k, b_k) = KubeCluster::start_pair(["repl-a", "repl-b"])?;
    let a_kc = a_k.prepare_for_gateway()?;
    let b_kc = b_k.prepare_for_gateway()?;
    for k in [&a_k, &b_k] {
        k.kubectl_ok(&["create", "namespace", "shop"])?;
    }
    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let pki = Pki::new(tmp.path(), "ca", CLUSTERSET)?;
    let tls_a = pki.issue("a", &tmp.path().join("certs-a"))?;
    let tls_b = pki.issue("b", &tmp.path().join("certs-b"))?;
    let ids = ["a", "b"];
    let spec_a1 = GatewaySpec::mesh(block, CLUSTERSET, &ids, 0);
    // a-2: cluster a's second replica, its own addresses (host 12), the same ClusterSetIP range
    let spec_a2 = GatewaySpec {
        tunnel: block.addr(12, 15443),
        admin: block.addr(12, 15000),
        dns: block.addr(12, 10053),
        ..spec_a1.clone()
    };
    let spec_b = GatewaySpec::mesh(block, CLUSTERSET, &ids, 1);
    let (a1_tunnel, a2_tunnel) = (spec_a1.tunnel, spec_a2.tunnel);
    let mut a1 = replica(&tmp.path().join("a-1"), spec_a1, tls_a.clone(), &a_kc, "a-1")?;
    let mut a2 = replica(&tmp.path().join("a-2"), spec_a2, tls_a, &a_kc, "a-2")?;
    let mut b = replica(&tmp.path().join("b"), spec_b, tls_b, &b_kc, "b-1")?;
    b.edit_config(
        &format!("{{ id: a, address: \"{a1_tunnel}\" }}"),
        &format!("{{ id: a, addresses: [\"{a1_tunnel}\", \"{a2_tunnel}\"] }}"),
    )?;

    // a-1 starts alone and leads
    a1.start()?;
    let t0 = Instant::now();
    eventually("a-1 to lead", WAIT, || Ok((role(&a1)?["role"] == "leader").then_some(())))
        .with_context(|| a1.log_text())?;
    eprintln!("a-1 leads {:?} after its start", t0.elapsed());
    assert_eq!(lease_holder(&a_k, LEASE_NS, LEASE)?.as_deref(), Some("a-1"));
    assert_eq!(metric(&a1, "fedgate_leader")?, 1.0);

    // b exports shop/web; a-1 writes its ServiceImport and b's slice into cluster a
    b.start()?;
    b_k.apply_yaml(&service_yaml(
        "shop",
        "web",
        false,
        &[("http", 80, 8080)],
        &[("10.77.0.5", true)],
        None,
    ))?;
    b_k.export("shop", "web")?;
    // Complete: the leader writes the ServiceImport, then its status (the clusters) in a
    // second write; the follower check below compares versions against the complete object.
    let si = eventually("shop/web imported into a", WAIT, || {
        Ok(a_k.get_json(&[IMPORTS, "-n", "shop", "web"])?.filter(|si| {
            si["spec"]["ips"].is_array() && si["status"]["clusters"][0]["cluster"] == "b"
        }))
    })
    .with_context(|| a1.log_text())?;
    let ips = si["spec"]["ips"].clone();
    assert_eq!(served_ips(&a1, "shop", "web")?, ips, "the leader serves what it wrote");

    // a-2 joins: it follows, and serves the ClusterSetIP the leader wrote
    a2.start()?;
    eventually("a-2 to see the holder", WAIT, || {
        let r = role(&a2)?;
        Ok((r["holder"] == "a-1").then_some(r))
    })
    .with_context(|| a2.log_text())?;
    eventually("a-2 to serve a-1's ClusterSetIP", WAIT, || {
        Ok((served_ips(&a2, "shop", "web")? == ips).then_some(()))
    })
    .with_context(|| a2.log_text())?;
    let slices = eventually("b's slice in a", WAIT, || {
        let s = imported_slices(&a_k, "shop", "web")?;
        Ok((s.len() == 1).then_some(s))
    })?;
    // the follower writes nothing: no write counted, nothing changed in the API while it ran
    let version = |v: &Value| v["metadata"]["resourceVersion"].as_str().unwrap_or("").to_owned();
    let (si_version, slice_version) = (version(&si), version(&slices[0]));
    std::thread::sleep(Duration::from_secs(2));
    let r = role(&a2)?;
    assert_eq!(r["role"], "follower", "{r}");
    assert_eq!(lease_holder(&a_k, LEASE_NS, LEASE)?.as_deref(), Some("a-1"));
    assert_eq!(metric(&a2, "fedgate_leader")?, 0.0);
    assert_eq!(metric(&a2, "fedgate_kube_writes_total")?, 0.0, "the follower wrote");
    let si_now = a_k.get_json(&[IMPORTS, "-n", "shop", "web"])?.context("import")?;
    assert_eq!(version(&si_now), si_version, "ServiceImport rewritten: {si_now}");
    assert_eq!(version(&imported_slices(&a_k, "shop", "web")?[0]), slice_version);
    assert_eq!(role(&a1)?["role"], "leader");

    // kill -9 the leader: a-2 takes the Lease within its duration (plus the crate's jitter)
    a1.kill();
    let killed = Instant::now();
    let took = eventually("a-2 to lead", LEASE_DURATION * 4, || {
        Ok((role(&a2)?["role"] == "leader").then(|| killed.elapsed()))
    })
    .with_context(|| a2.log_text())?;
    eprintln!("a-2 leads {took:?} after a-1 was killed (Lease {LEASE_DURATION:?})");
    assert!(
        took <= LEASE_DURATION + TAKEOVER_SLACK,
        "a-2 took {took:?} to lead, more than the Lease's {LEASE_DURATION:?} + {TAKEOVER_SLACK:?}"
    );
    assert_eq!(lease_holder(&a_k, LEASE_NS, LEASE)?.as_deref(), Some("a-2"));
    assert_eq!(metric(&a2, "fedgate_leader")?, 1.0);
    assert_eq!(metric(&a2, "fedgate_leader_transitions_total")?, 1.0);
    let (code, status, err) = fedgate(&["status", "--admin", &a2.spec.admin.to_string()])?;
    assert_eq!(code, 0, "fedgate status: {err}");
    assert!(
        status.contains(&format!(
            "replica a-2 is the leader (Lease {LEASE_NS}/{LEASE} held by this replica, a-2"
        )),
        "{status}"
    );

    // in place: same objects, same uids, same ClusterSetIP
    eventually("a-2's writer to list what it owns", WAIT, || {
        Ok(a2.log_text().contains("listed existing objects; reconciling in place").then_some(()))
    })?;
    let si_after = a_k.get_json(&[IMPORTS, "-n", "shop", "web"])?.context("import after")?;
    assert_eq!(uid(&si_after), uid(&si), "ServiceImport kept its uid");
    assert_eq!(si_after["spec"]["ips"], ips, "ServiceImport kept its ClusterSetIP");
    let slices_after = imported_slices(&a_k, "shop", "web")?;
    assert_eq!(slices_after.len(), 1);
    assert_eq!(uid(&slices_after[0]), uid(&slices[0]), "EndpointSlice kept its uid");
    assert_eq!(served_ips(&a2, "shop", "web")?, ips);

    // an export created in b after the failover reaches a, written by the new leader
    b_k.apply_yaml(&service_yaml(
        "shop",
        "api",
        false,
        &[("http", 81, 8081)],
        &[("10.77.0.6", true)],
        None,
    ))?;
    b_k.export("shop", "api")?;
    // The object, then its status in a second write (as above): wait for both.
    let api = eventually("shop/api imported into a by a-2", WAIT, || {
        Ok(a_k
            .get_json(&[IMPORTS, "-n", "shop", "api"])?
            .filter(|si| si["spec"]["ips"].is_array() && si["status"]["clusters"].is_array()))
    })
    .with_context(|| format!("{}\n--- b ---\n{}", a2.log_text(), b.log_text()))?;
    assert_eq!(api["status"]["clusters"], serde_json::json!([{"cluster": "b"}]), "{api}");
    assert_eq!(served_ips(&a2, "shop", "api")?, api["spec"]["ips"]);
    assert!(metric(&a2, "fedgate_kube_writes_total")? > 0.0, "the new leader wrote");
    Ok(())
}
