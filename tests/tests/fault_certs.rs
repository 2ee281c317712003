//! Fault suite, issue 17, finding 2: certificates replaced under a running gateway. Two real
//! gateway processes on loopback, certificates from `fedgate certs` (the CLI under test), an
//! echo backend in alpha's cluster reached through bravo's ClusterSetIP.
//!
//! - An already-expired certificate (`certs issue --validity 1m --allow-expired`) copied over
//!   alpha's files is refused by the reload (counted, logged, on `/debug/problems` and in
//!   `fedgate status`); alpha keeps presenting the old one: after bravo restarts (a new
//!   handshake) traffic flows again and bravo's expiry gauge of alpha shows the old notAfter.
//! - A valid new certificate copied over alpha's files while requests flow is reloaded
//!   without a failed request, and a new handshake sees its notAfter.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fedgate_e2e::*;

const CLUSTERSET: &str = "certs";
const PROPAGATION: Duration = Duration::from_secs(10);
/// Debounce (200 ms) plus reading and checking the files, with room for a loaded machine.
const RELOAD: Duration = Duration::from_secs(10);
const EXPIRY_GAUGE: &str = "fedgate_tls_cert_expiry_timestamp_seconds";
const RELOADS: &str = "fedgate_tls_reloads_total";

/// A TCP backend in this process: greets each connection with `alpha\n`, then echoes lines.
fn start_backend(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding backend {addr}"))?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut writer = conn.try_clone()?;
                writer.write_all(b"alpha\n")?;
                for line in BufReader::new(conn).lines() {
                    writer.write_all(format!("{}\n", line?).as_bytes())?;
                }
                Ok::<_, std::io::Error>(())
            });
        }
    });
    Ok(())
}

/// One connection through `vip`: the greeting, then one echoed line.
fn round_trip(vip: SocketAddr) -> Result<String> {
    fedgate_e2e::faults::round_trip(vip, Duration::from_secs(5))
}

struct Pair {
    alpha: Gateway,
    bravo: Gateway,
    pki: Pki,
    /// alpha's (cert, key, ca) as its config names them.
    alpha_tls: (PathBuf, PathBuf, PathBuf),
    /// bravo's ClusterSetIP of fault/web, port 80.
    vip: SocketAddr,
    tmp: tempfile::TempDir,
}

/// alpha and bravo meshed (3 s lease), alpha exporting fault/web (the echo backend), bravo
/// importing it and one round trip through bravo's ClusterSetIP answered by alpha's backend.
fn pair() -> Result<Pair> {
    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let pki = Pki::new(tmp.path(), "ca", CLUSTERSET)?;
    let ids = ["alpha", "bravo"];
    let mut gateways = Vec::new();
    let mut alpha_tls = None;
    for (i, id) in ids.iter().enumerate() {
        // ClusterSetIPs inside the block (the mesh default, 127.<A>.<200+i>.0/24, is shared by
        // every block with the same second octet: the other test of this file may hold it).
        let spec = GatewaySpec {
            lease: "3s".to_owned(),
            vip_range: format!("{}/26", block.ip(128 + 64 * i as u8)),
            ..GatewaySpec::mesh(block, CLUSTERSET, &ids, i)
        };
        let tls = pki.issue(id, &tmp.path().join(format!("certs-{id}")))?;
        if *id == "alpha" {
            alpha_tls = Some(tls.clone());
        }
        let mut g = Gateway::prepare(tmp.path(), spec, tls)?;
        g.start()?;
        gateways.push(g);
    }
    let bravo = gateways.pop().context("bravo")?;
    let alpha = gateways.pop().context("alpha")?;
    let backend = block.addr(50, 18080);
    start_backend(backend)?;
    let ip = backend.ip().to_string();
    alpha.write_cluster_file(
        "web.yaml",
        &service_yaml(
            "fault",
            "web",
            false,
            &[("tcp", 80, backend.port())],
            &[(&ip, true)],
            Some("2026-01-01T00:00:00Z"),
        ),
    )?;
    let vip = eventually("bravo to import fault/web from alpha", PROPAGATION, || {
        let imports = bravo.json("/debug/imports")?;
        let Some(import) = find_import(&imports, "fault", "web") else { return Ok(None) };
        Ok(import["ips"][0].as_str().map(|ip| format!("{ip}:80")))
    })?;
    let vip: SocketAddr = vip.parse()?;
    eventually("a round trip through bravo", PROPAGATION, || Ok(round_trip(vip).ok()))?;
    let alpha_tls = alpha_tls.context("alpha's files")?;
    Ok(Pair { alpha, bravo, pki, alpha_tls, vip, tmp })
}

fn metrics(g: &Gateway) -> Result<String> {
    let (code, body) = http_get(g.spec.admin, "/metrics")?;
    if code != 200 {
        bail!("/metrics on {}: HTTP {code}", g.spec.id);
    }
    Ok(body)
}

/// The sum of the samples of `name` with `labels` on `g` (0 when there is none).
fn metric(g: &Gateway, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(metric_samples(&metrics(g)?, name, labels).iter().map(|(_, v)| v).sum())
}

/// alpha's own notAfter as `/debug/certificates` reports it (unix seconds).
fn own_not_after(g: &Gateway) -> Result<i64> {
    g.json("/debug/certificates")?["own"]["notAfterUnix"]
        .as_i64()
        .context("/debug/certificates has no own.notAfterUnix")
}

/// Replaces `to` with `from` the way a careful operator (or a config tool) does: copy beside
/// it, then rename over it.
fn replace_file(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp)?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

/// `fedgate certs issue` for alpha into `out` with `extra` arguments: (exit code, stderr).
fn issue_alpha(pki: &Pki, out: &Path, extra: &[&str]) -> Result<(i32, String)> {
    let ca = pki.dir.to_str().context("UTF-8 path")?;
    let out = out.to_str().context("UTF-8 path")?;
    let mut args = vec!["certs", "issue", "--ca", ca, "--cluster", "alpha", "--out", out];
    args.extend_from_slice(extra);
    let (code, _, stderr) = fedgate(&args)?;
    Ok((code, stderr))
}

/// Restarts bravo (a crash and a start): its connection to alpha is a new handshake.
fn restart(g: &mut Gateway) -> Result<()> {
    g.kill();
    g.start()
}

#[test]
fn an_expired_certificate_is_refused_on_reload_and_the_old_one_stays() -> Result<()> {
    let mut p = pair()?;
    let old = own_not_after(&p.alpha)?;
    assert_eq!(metric(&p.alpha, EXPIRY_GAUGE, &[("cert", "own")])?, old as f64);
    eventually("bravo's expiry gauge of alpha", PROPAGATION, || {
        Ok((metric(&p.bravo, EXPIRY_GAUGE, &[("peer", "alpha")])? == old as f64).then_some(()))
    })?;

    // The reproduction's command: without --allow-expired it is refused, naming the way out.
    let expired_dir = p.tmp.path().join("expired");
    let (code, stderr) = issue_alpha(&p.pki, &expired_dir, &["--validity", "1m"])?;
    assert_ne!(code, 0, "an already-expired certificate was issued: {stderr}");
    assert!(stderr.contains("--allow-expired"), "{stderr}");
    let (code, stderr) =
        issue_alpha(&p.pki, &expired_dir, &["--validity", "1m", "--allow-expired"])?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("warning: the certificate is already expired"), "{stderr}");

    // Copied over the running alpha's certificate and key.
    let (cert, key, _) = &p.alpha_tls;
    replace_file(&expired_dir.join("alpha.key"), key)?;
    replace_file(&expired_dir.join("alpha.crt"), cert)?;
    let error = eventually("alpha to refuse the expired certificate", RELOAD, || {
        let certs = p.alpha.json("/debug/certificates")?;
        let error = certs["reload"]["lastError"].as_str().unwrap_or_default().to_owned();
        Ok(error.contains("expired at").then_some(error))
    })?;
    assert!(error.contains(&format!("certificate {} expired at", cert.display())), "{error}");
    assert!(error.contains("keeping the current certificate"), "{error}");
    assert!(metric(&p.alpha, RELOADS, &[("result", "refused")])? >= 1.0);
    assert_eq!(metric(&p.alpha, RELOADS, &[("result", "ok")])?, 0.0, "nothing was reloaded");
    assert_eq!(
        metric(&p.alpha, EXPIRY_GAUGE, &[("cert", "own")])?,
        old as f64,
        "the gauge shows the certificate still in use"
    );
    let log = p.alpha.log_text();
    assert!(log.contains("tunnel identity not reloaded"), "{log}");
    assert!(log.contains("reason=\"expired\""), "{log}");
    assert!(!log.contains("tunnel identity reloaded"), "{log}");
    let problems = p.alpha.json("/debug/problems")?;
    assert!(
        problems.as_array().into_iter().flatten().any(|x| x["kind"] == "certificateReload"),
        "{problems}"
    );
    let admin = p.alpha.spec.admin.to_string();
    let (code, status, stderr) = fedgate(&["status", "--admin", &admin])?;
    assert_eq!(code, 0, "{stderr}");
    assert!(status.contains("WARNING: the last certificate reload was refused"), "{status}");

    // A new handshake: bravo restarts and dials alpha again. Had alpha swapped the expired
    // certificate in, bravo would refuse it (reason=expired) and never import fault/web.
    restart(&mut p.bravo)?;
    eventually("a round trip through the restarted bravo", PROPAGATION, || {
        Ok(round_trip(p.vip).ok().filter(|name| name == "alpha"))
    })?;
    assert_eq!(metric(&p.bravo, EXPIRY_GAUGE, &[("peer", "alpha")])?, old as f64);
    assert_eq!(
        metric(&p.bravo, "fedgate_peer_handshake_failures_total", &[("reason", "expired")])?,
        0.0
    );
    Ok(())
}

#[test]
fn a_valid_rotation_under_load_is_used_by_new_handshakes() -> Result<()> {
    let mut p = pair()?;
    let old = own_not_after(&p.alpha)?;

    // Requests through bravo for the whole rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (stop, ok, failed, vip) = (stop.clone(), ok.clone(), failed.clone(), p.vip);
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match round_trip(vip) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(format!("{e:#}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(20));
            }
            errors
        })
    };
    eventually("requests to flow", PROPAGATION, || {
        Ok((ok.load(Ordering::Relaxed) >= 20).then_some(()))
    })?;

    // A new certificate (30 days, so its notAfter differs from the 90-day one) over the files.
    let new_dir = p.tmp.path().join("rotated");
    let (code, stderr) = issue_alpha(&p.pki, &new_dir, &["--validity", "30d"])?;
    assert_eq!(code, 0, "{stderr}");
    let (cert, key, _) = &p.alpha_tls;
    replace_file(&new_dir.join("alpha.key"), key)?;
    replace_file(&new_dir.join("alpha.crt"), cert)?;
    let new = eventually("alpha to reload the new certificate", RELOAD, || {
        let n = own_not_after(&p.alpha)?;
        Ok((n != old).then_some(n))
    })?;
    assert!(old - new > 59 * 86_400, "30 days instead of 90: {old} -> {new}");
    assert!(metric(&p.alpha, RELOADS, &[("result", "ok")])? >= 1.0);
    assert_eq!(metric(&p.alpha, EXPIRY_GAUGE, &[("cert", "own")])?, new as f64);
    let before = ok.load(Ordering::Relaxed);
    eventually("requests after the reload", PROPAGATION, || {
        Ok((ok.load(Ordering::Relaxed) >= before + 20).then_some(()))
    })?;
    stop.store(true, Ordering::Relaxed);
    let errors = client.join().map_err(|_| anyhow::anyhow!("client thread panicked"))?;
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the rotation: {errors:?}"
    );
    eprintln!("{} requests through the rotation, none failed", ok.load(Ordering::Relaxed));

    // The established connection kept the old certificate; a new handshake sees the new one.
    assert_eq!(metric(&p.bravo, EXPIRY_GAUGE, &[("peer", "alpha")])?, old as f64);
    restart(&mut p.bravo)?;
    eventually("bravo to see alpha's new certificate", PROPAGATION, || {
        Ok((metric(&p.bravo, EXPIRY_GAUGE, &[("peer", "alpha")])? == new as f64).then_some(()))
    })?;
    eventually("a round trip through the restarted bravo", PROPAGATION, || {
        Ok(round_trip(p.vip).ok())
    })?;
    Ok(())
}
