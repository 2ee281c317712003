//! Three real gateway processes on loopback, file sources, generated certificates: exports
//! propagate, conflicts are reported on every exporter, leases withdraw a dead peer's exports,
//! and peers with the wrong certificate are refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fedgate_e2e::*;

const CLUSTERSET: &str = "e2e";
const PROPAGATION: Duration = Duration::from_secs(2);

struct Federation {
    gateways: Vec<Gateway>,
    _tmp: tempfile::TempDir,
}

/// Builds gateways `ids` in one address block, fully meshed, with certificates from one CA.
fn federation(ids: &[&str], lease: &str) -> Result<Federation> {
    let tmp = tempfile::tempdir()?;
    let gateways = start_mesh(tmp.path(), AddrBlock::unique(), CLUSTERSET, ids, |_, spec| {
        spec.lease = lease.to_owned();
    })?;
    Ok(Federation { gateways, _tmp: tmp })
}

fn spec_for(block: AddrBlock, ids: &[&str], i: usize, lease: &str) -> GatewaySpec {
    GatewaySpec { lease: lease.to_owned(), ..GatewaySpec::mesh(block, CLUSTERSET, ids, i) }
}

fn wait_import(g: &Gateway, ns: &str, name: &str, clusters: &[&str]) -> Result<serde_json::Value> {
    fedgate_e2e::wait_import(g, ns, name, clusters, PROPAGATION)
}

fn wait_no_import(g: &Gateway, ns: &str, name: &str, timeout: Duration) -> Result<()> {
    eventually(&format!("{} to drop {ns}/{name}", g.spec.id), timeout, || {
        let imports = g.json("/debug/imports")?;
        Ok(find_import(&imports, ns, name).is_none().then_some(()))
    })
}

#[test]
fn export_propagates_to_every_peer_and_is_withdrawn() -> Result<()> {
    let fed = federation(&["alpha", "bravo", "charlie"], "15s")?;
    let [a, b, c] = &fed.gateways[..] else { unreachable!() };
    let yaml = service_yaml(
        "shop",
        "cart",
        false,
        &[("http", 80, 8080)],
        &[("127.250.0.5", true), ("127.250.0.6", false)],
        Some(EXPORTED_AT),
    );
    let t0 = Instant::now();
    a.write_cluster_file("cart.yaml", &yaml)?;
    for g in [b, c] {
        wait_vip(g, "shop", "cart", &["alpha"], Duration::from_secs(6))?; // start-up batch: ≤ 5 s
        let import = wait_import(g, "shop", "cart", &["alpha"])?;
        assert_eq!(import["type"], "ClusterSetIP");
        assert_eq!(import["ports"][0]["port"], 80);
        assert_eq!(import["ips"].as_array().map(Vec::len), Some(1), "one ClusterSetIP: {import}");
        let eps = import["clusters"]["alpha"]["endpoints"].as_array().context("endpoints")?;
        assert_eq!(eps.len(), 2, "both endpoints travel, with readiness: {import}");
        assert!(eps.iter().any(|e| e["address"] == "127.250.0.6" && e["ready"] == false));
    }
    eprintln!("export visible on both peers after {:?}", t0.elapsed());

    // The exporter's own status says Valid and Exported, without conflict.
    let conds = eventually("alpha's export status", PROPAGATION, || {
        Ok(export_conditions(&a.json("/debug/exports")?, "shop", "cart")
            .filter(|c| c.get("Ready").is_some_and(|r| r["status"] == "True")))
    })?;
    assert_eq!(conds["Valid"]["status"], "True");
    assert_eq!(conds["Conflict"]["status"], "False");
    assert_eq!(conds["Conflict"]["reason"], "NoConflicts");

    // Removing the export (the Service stays) withdraws it everywhere.
    let only_service = yaml.split("---\napiVersion: multicluster").next().unwrap().to_owned();
    a.write_cluster_file("cart.yaml", &only_service)?;
    for g in [a, b, c] {
        wait_no_import(g, "shop", "cart", PROPAGATION)?;
    }
    Ok(())
}

#[test]
fn conflicting_exports_are_reported_on_every_exporter() -> Result<()> {
    let fed = federation(&["alpha", "bravo", "charlie"], "15s")?;
    let [a, b, c] = &fed.gateways[..] else { unreachable!() };
    // alpha is oldest: ClusterSetIP with port http/80. bravo agrees. charlie is headless and
    // uses port 80 under another name plus a port of its own.
    // (exporter, headless, ports, created)
    type Ports = &'static [(&'static str, u16, u16)];
    let exports: [(&Gateway, bool, Ports, &str); 3] = [
        (a, false, &[("http", 80, 8080)], "2026-01-01T00:00:00Z"),
        (b, false, &[("http", 80, 8080)], "2026-02-01T00:00:00Z"),
        (c, true, &[("web", 80, 8080), ("admin", 9000, 9000)], "2026-03-01T00:00:00Z"),
    ];
    for (g, headless, ports, created) in exports {
        let endpoints = [("127.250.0.5", true)];
        let yaml = service_yaml("data", "db", headless, ports, &endpoints, Some(created));
        g.write_cluster_file("db.yaml", &yaml)?;
    }
    for g in [a, b, c] {
        let import = wait_import(g, "data", "db", &["alpha", "bravo", "charlie"])?;
        assert_eq!(import["type"], "ClusterSetIP", "oldest export's type wins on {}", g.spec.id);
        assert_eq!(import["winner"], "alpha");
        let conds = eventually("conflict condition", PROPAGATION, || {
            let Some(conds) = export_conditions(&g.json("/debug/exports")?, "data", "db") else {
                return Ok(None);
            };
            Ok(conds.get("Conflict").filter(|c| c["status"] == "True").map(|_| conds.clone()))
        })?;
        let conflict = &conds["Conflict"];
        let reason = conflict["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("TypeConflict"), "{}: {conflict}", g.spec.id);
        assert!(reason.contains("PortConflict"), "{}: {conflict}", g.spec.id);
        let message = conflict["message"].as_str().unwrap_or_default();
        assert!(message.contains("\"alpha\""), "message names the winner: {message}");
        // The admin port exists only in charlie: traffic on it goes only there.
        let admin_port = import["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["port"] == 9000))
            .with_context(|| format!("port 9000 in the union: {import}"))?;
        assert_eq!(admin_port["clusters"], serde_json::json!(["charlie"]));
    }
    Ok(())
}

#[test]
fn dead_peer_is_withdrawn_after_its_lease_and_restored_on_restart() -> Result<()> {
    let mut fed = federation(&["alpha", "bravo", "charlie"], "2s")?;
    let svc = |ip| exported_service("web", "front", ("http", 80, 80), ip);
    fed.gateways[0].write_cluster_file("front.yaml", &svc("127.250.0.9"))?;
    fed.gateways[2].write_cluster_file("front.yaml", &svc("127.250.0.9"))?;
    wait_import(&fed.gateways[1], "web", "front", &["alpha", "charlie"])?;

    let killed = Instant::now();
    fed.gateways[2].kill();
    // Lease 2 s: withdrawn after it, but not long after.
    wait_import(&fed.gateways[1], "web", "front", &["alpha"]).or_else(|_| {
        eventually("withdrawal after the lease", Duration::from_secs(6), || {
            let imports = fed.gateways[1].json("/debug/imports")?;
            Ok(find_import(&imports, "web", "front")
                .filter(|i| import_clusters(i) == ["alpha"])
                .cloned())
        })
    })?;
    eprintln!("charlie's export withdrawn {:?} after kill (lease 2s)", killed.elapsed());

    fed.gateways[2].start()?;
    wait_import(&fed.gateways[1], "web", "front", &["alpha", "charlie"]).or_else(|_| {
        eventually("restore after reconnect", Duration::from_secs(10), || {
            let imports = fed.gateways[1].json("/debug/imports")?;
            Ok(find_import(&imports, "web", "front")
                .filter(|i| import_clusters(i) == ["alpha", "charlie"])
                .cloned())
        })
    })?;
    Ok(())
}

/// `fedgate_peer_disconnects_total{reason="..."}` on `g` (0 when not exported yet).
fn disconnects(g: &Gateway, reason: &str) -> Result<f64> {
    let (_, text) = http_get(g.spec.admin, "/metrics")?;
    Ok(metric_samples(&text, "fedgate_peer_disconnects_total", &[("reason", reason)])
        .iter()
        .map(|(_, v)| v)
        .sum())
}

#[test]
fn a_crashed_and_restarted_peer_is_redialed_through_a_stateless_reset() -> Result<()> {
    // alpha dials bravo (the lower id dials). bravo crashes (SIGKILL: no CONNECTION_CLOSE)
    // and comes back on the same port with the same key: its reset key is derived from that
    // key, so alpha's next keep-alive on the dead connection gets a stateless reset alpha
    // accepts, instead of silence until the 5 s idle timeout.
    let mut fed = federation(&["alpha", "bravo"], "30s")?;
    eventually("alpha connected to bravo", PROPAGATION, || {
        let peers = fed.gateways[0].json("/debug/peers")?;
        Ok(peers[0]["connected"].as_bool().filter(|c| *c).map(|_| ()))
    })?;
    let before = disconnects(&fed.gateways[0], "reset")?;
    fed.gateways[1].kill();
    let killed = Instant::now();
    fed.gateways[1].start()?;
    let restarted = killed.elapsed();
    eventually("alpha to drop the dead connection", Duration::from_secs(15), || {
        let n: f64 = ["reset", "timed_out", "closed", "other"]
            .iter()
            .map(|r| disconnects(&fed.gateways[0], r))
            .sum::<Result<f64>>()?;
        Ok((n > before).then_some(()))
    })?;
    let dropped = killed.elapsed();
    eventually("alpha reconnected to bravo", Duration::from_secs(15), || {
        let peers = fed.gateways[0].json("/debug/peers")?;
        Ok(peers[0]["connected"].as_bool().filter(|c| *c).map(|_| ()))
    })?;
    eprintln!(
        "bravo SIGKILLed and restarted in {restarted:?}; alpha dropped the dead connection \
         after {dropped:?} and was connected again after {:?}",
        killed.elapsed()
    );
    assert_eq!(
        disconnects(&fed.gateways[0], "reset")?,
        before + 1.0,
        "alpha learned of bravo's restart from a stateless reset, not a timeout\n{}",
        fed.gateways[0].log_text()
    );

    // A graceful restart (SIGTERM: bravo drains, closes, exits; 0.5 s later it starts again).
    // alpha sees the close at once and redials; its Initials hit the closed port, and their
    // resends start from the last connection's RTT (3 × at least 10 ms, doubling), not from
    // 333 ms (1 s, 2 s, 4 s).
    let closed_before = disconnects(&fed.gateways[0], "closed")?;
    let stopping = Instant::now();
    fed.gateways[1].signal("TERM")?;
    fed.gateways[1].wait_exit(Duration::from_secs(20))?;
    // Down for a while, as a gateway that reconnects to its API server first would be.
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    fed.gateways[1].start()?;
    eventually("alpha reconnected to bravo after its restart", Duration::from_secs(15), || {
        let peers = fed.gateways[0].json("/debug/peers")?;
        let up = peers[0]["connected"].as_bool() == Some(true);
        Ok((up && disconnects(&fed.gateways[0], "closed")? > closed_before).then_some(()))
    })?;
    eprintln!(
        "bravo stopped (SIGTERM) in {:?}, started again; alpha connected {:?} after the new \
         process was spawned",
        started - stopping,
        started.elapsed()
    );
    Ok(())
}

/// A gateway at bravo's address that calls itself `bad_id` in `bad_clusterset` and presents
/// `tls` is refused by alpha, and its exports never show up there.
struct Impostor<'a> {
    id: &'a str,
    clusterset: &'a str,
    tls: (PathBuf, PathBuf, PathBuf),
}

fn assert_refused(tmp: &Path, good: &Pki, bad: Impostor<'_>, why: &str) -> Result<()> {
    let block = AddrBlock::unique();
    let dir = tmp.join(why);
    let alpha_spec = spec_for(block, &["alpha", "bravo"], 0, "15s");
    let mut alpha = Gateway::prepare(&dir, alpha_spec, good.issue("alpha", &dir.join("a-certs"))?)?;
    let mut bad_spec = spec_for(block, &["alpha", bad.id], 1, "15s");
    bad_spec.clusterset = bad.clusterset.to_owned();
    let mut impostor = Gateway::prepare(&dir, bad_spec, bad.tls)?;
    impostor
        .write_cluster_file("x.yaml", &exported_service("ns", "x", ("p", 1, 1), "127.250.9.9"))?;
    alpha.start()?;
    impostor.start()?;
    // alpha keeps bravo disconnected and says why.
    let peer = eventually(
        &format!("alpha to reject the impostor ({why})"),
        Duration::from_secs(10),
        || {
            let peers = alpha.json("/debug/peers")?;
            let p = peers
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["cluster"] == "bravo"))
                .cloned()
                .context("bravo in /debug/peers")?;
            Ok((p["connected"] == false && !p["last_error"].is_null()).then_some(p))
        },
    )?;
    eprintln!("{why}: alpha says {}", peer["last_error"]);
    std::thread::sleep(Duration::from_secs(1));
    let imports = alpha.json("/debug/imports")?;
    assert!(
        find_import(&imports, "ns", "x").is_none(),
        "{why}: refused peer's export leaked: {imports}"
    );
    Ok(())
}

#[test]
fn peers_with_wrong_certificates_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let good = Pki::new(tmp.path(), "ca", CLUSTERSET)?;

    // (case, id, clusterset it claims, its certificate)
    let cases = [
        // 1. The right name, from a CA alpha does not trust (a gateway of another PKI).
        (
            "foreign-ca",
            "bravo",
            CLUSTERSET,
            Pki::new(tmp.path(), "other-ca", CLUSTERSET)?.issue("bravo", &tmp.path().join("b1"))?,
        ),
        // 2. Trusted CA, but the certificate names another clusterset.
        (
            "other-clusterset",
            "bravo",
            "elsewhere",
            good.issue_with("bravo", &["--clusterset", "elsewhere"], &tmp.path().join("b2"))?,
        ),
        // 3. A valid certificate of this clusterset, but for another cluster than alpha
        //    expects at that address.
        ("wrong-cluster-id", "mallory", CLUSTERSET, good.issue("mallory", &tmp.path().join("b3"))?),
    ];
    for (why, id, clusterset, tls) in cases {
        assert_refused(tmp.path(), &good, Impostor { id, clusterset, tls }, why)?;
    }
    Ok(())
}
