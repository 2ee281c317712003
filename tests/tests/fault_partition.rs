//! Fault suite, issue 17: a network partition between two clusters. Each cluster is a network
//! namespace with its own gateway, joined only by a veth pair (tests/src/netns.rs); the
//! partition takes alpha's end of the veth down (`ip link set <dev> down`: nothing crosses
//! until it is up again) for 20 s, longer than the 5 s lease, while a client in alpha's
//! namespace (`fgtool http-loop`: Python's urllib, a new connection per request) fetches a
//! page from bravo's HTTP backend through alpha's ClusterSetIP. Needs root, `ip`, `curl`,
//! `python3` (fails otherwise).

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fedgate_e2e::faults::Recorder;
use fedgate_e2e::netns::*;
use fedgate_e2e::*;

const CLUSTERSET: &str = "partition";
const PROPAGATION: Duration = Duration::from_secs(15);
/// bravo's HTTP backend, on the `lo` of bravo's namespace.
const B_BACKEND: &str = "127.0.2.1";
/// The endpoint of alpha's own export (nothing listens: only its import on bravo matters).
const A_ENDPOINT: &str = "127.0.1.1";
/// `peerLeaseDuration` of both gateways ([`ns_spec`]'s default).
const LEASE: Duration = Duration::from_secs(5);
/// How long the partition lasts.
const PARTITION: Duration = Duration::from_secs(20);
/// A lapsed lease withdraws the other side's exports within this of the cut: the lease runs
/// from the last message heard (heartbeats every lease / 3), plus a few polls of slack.
const WITHDRAW_WITHIN: Duration = Duration::from_secs(10);
/// After the link is up again, the gateways' QUIC connection is redialled (backoff at most
/// 5 s, tunnel/src/endpoint.rs) and the exports exchanged again within this.
const RESTORE_WITHIN: Duration = Duration::from_secs(15);
/// Consecutive requests that must all succeed once service is back.
const AFTER_RECOVERY: usize = 40;

/// One line of `fgtool http-loop` (`ok <i> <body>` or `err <i> <error>`), stamped when it was
/// read: the request's end (the loop is sequential, requests never overlap).
#[derive(Clone, Debug)]
struct Reply {
    end: Instant,
    ok: bool,
    line: String,
}

/// `fgtool http-loop` in a namespace, its lines collected by a thread until stopped.
struct HttpLoop(Recorder<Reply>);

impl HttpLoop {
    /// Fetches `url` from namespace `ns` every 50 ms, a new connection each time (urllib's
    /// timeout: 5 s), until stopped.
    fn start(net: &Pair, ns: &Netns, url: &str) -> Result<Self> {
        // pause_at -1: never pauses.
        let mut proc = net.tool(ns, &["http-loop", url, "1000000", "-1", "50"])?;
        // `proc` drops with the recorder's thread: the loop is killed.
        Ok(Self(Recorder::start(Duration::ZERO, move || {
            let line = match proc.line(Duration::from_millis(500)) {
                Ok(line) => line,
                Err(e) if e.to_string().contains("no output within") => {
                    return ControlFlow::Continue(None);
                }
                Err(_) => return ControlFlow::Break(()),
            };
            ControlFlow::Continue(Some(Reply {
                end: Instant::now(),
                ok: line.starts_with("ok "),
                line,
            }))
        })))
    }

    fn snapshot(&self) -> Vec<Reply> {
        self.0.snapshot()
    }

    /// Waits (bounded) until `n` replies ended at or after `from`.
    fn wait_replies_after(&self, from: Instant, n: usize, timeout: Duration) -> Result<()> {
        eventually(&format!("{n} replies through alpha"), timeout, || {
            Ok((self.snapshot().iter().filter(|r| r.end >= from).count() >= n).then_some(()))
        })
    }

    /// Waits (bounded) for the first successful reply after `from`; returns when it ended.
    fn first_success_after(&self, from: Instant, timeout: Duration) -> Result<Instant> {
        eventually("a successful request through alpha", timeout, || {
            Ok(self.snapshot().iter().find(|r| r.end >= from && r.ok).map(|r| r.end))
        })
    }

    fn finish(self) -> Vec<Reply> {
        self.0.finish()
    }
}

/// Replies that ended in `[from, to)`: (total, failed, the first few failures).
fn phase(replies: &[Reply], from: Instant, to: Instant) -> (usize, usize, Vec<String>) {
    let in_phase: Vec<&Reply> = replies.iter().filter(|r| r.end >= from && r.end < to).collect();
    let failed: Vec<String> =
        in_phase.iter().filter(|r| !r.ok).map(|r| r.line.clone()).take(3).collect();
    (in_phase.len(), in_phase.iter().filter(|r| !r.ok).count(), failed)
}

/// Asserts that no reply in `[from, to)` is a failure (or a wrong body); returns how many
/// there were.
fn assert_no_failures(replies: &[Reply], from: Instant, to: Instant, what: &str) -> usize {
    let (total, failed, first) = phase(replies, from, to);
    eprintln!("{what}: {failed} of {total} requests failed");
    assert_eq!(failed, 0, "{what}: {failed} of {total} requests failed, first: {first:?}");
    let wrong: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.end >= from && r.end < to && !r.line.ends_with(" bravo"))
        .collect();
    assert!(wrong.is_empty(), "{what}: answers not from bravo's backend: {wrong:?}");
    total
}

fn gone(gw: &NsGateway, ns: &str, name: &str) -> Result<bool> {
    Ok(find_import(&gw.json("/debug/imports")?, ns, name).is_none())
}

/// A 20 s partition, longer than the 5 s lease, under load. Asserts: no failure before the
/// cut; within [`WITHDRAW_WITHIN`] of the cut each side withdraws the other's exports (alpha
/// drops bravo's demo/web, bravo drops alpha's demo/api), and not before the lease could
/// lapse; after the link is up again both imports are back within [`RESTORE_WITHIN`], with
/// the ClusterSetIPs they had; then every one of [`AFTER_RECOVERY`] requests succeeds, each
/// answered by bravo's backend. Failures during the partition are counted and printed: bravo
/// is the only exporter, so the design promises none.
#[test]
fn a_partition_longer_than_the_lease_withdraws_and_restores_exports() -> Result<()> {
    require_tools();
    let net = Pair::new()?;
    let root = net.dir().to_path_buf();
    let (mut a, mut b) = net.prepare_gateways(CLUSTERSET, ["alpha", "bravo"], "")?;
    assert_eq!(a.gw.spec.lease, format!("{}s", LEASE.as_secs()), "the lease this test assumes");
    a.launch()?;
    b.launch()?;

    let www = root.join("www-bravo");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("cluster.txt"), "bravo\n")?;
    let _backend =
        net.server(&net.b, &["http", B_BACKEND, "8080", www.to_str().context("utf-8 path")?])?;
    let svc =
        |name: &str, ip: &str, port: u16| exported_service("demo", name, ("http", 80, port), ip);
    b.gw.write_cluster_file("web.yaml", &svc("web", B_BACKEND, 8080))?;
    a.gw.write_cluster_file("api.yaml", &svc("api", A_ENDPOINT, 8081))?;
    let web_ip = wait_vip(&a, "demo", "web", &["bravo"], PROPAGATION)?;
    let api_ip = wait_vip(&b, "demo", "api", &["alpha"], PROPAGATION)?;
    let url = format!("http://{web_ip}/cluster.txt");
    eventually("curl through alpha to bravo", PROPAGATION, || {
        Ok(run(net.a.command("curl").args(["-sSf", "-m", "5", &url]))
            .ok()
            .filter(|body| body.trim() == "bravo"))
    })?;

    let clients = HttpLoop::start(&net, &net.a, &url)?;
    let started = Instant::now();
    clients.wait_replies_after(started, 20, Duration::from_secs(20))?;

    let cut = Instant::now();
    net.a.ip(&["link", "set", &net.a_dev, "down"])?;
    let (mut a_withdrew, mut b_withdrew) = (None, None);
    eventually("both sides to withdraw the other's exports", WITHDRAW_WITHIN, || {
        if a_withdrew.is_none() && gone(&a, "demo", "web")? {
            a_withdrew = Some(cut.elapsed());
        }
        if b_withdrew.is_none() && gone(&b, "demo", "api")? {
            b_withdrew = Some(cut.elapsed());
        }
        Ok(a_withdrew.zip(b_withdrew))
    })
    .with_context(|| format!("alpha withdrew after {a_withdrew:?}, bravo after {b_withdrew:?}"))?;
    let (a_withdrew, b_withdrew) = (a_withdrew.unwrap_or_default(), b_withdrew.unwrap_or_default());
    // The lease runs from the last message heard; heartbeats come every lease / 3.
    let earliest = LEASE - LEASE / 3 - Duration::from_millis(500);
    assert!(
        a_withdrew >= earliest && b_withdrew >= earliest,
        "withdrawn before the lease could lapse: alpha {a_withdrew:?}, bravo {b_withdrew:?}"
    );

    std::thread::sleep(PARTITION.saturating_sub(cut.elapsed()));
    net.a.ip(&["link", "set", &net.a_dev, "up"])?;
    let healed = Instant::now();
    let (mut a_back, mut b_back) = (None, None);
    eventually("both imports back after the partition", RESTORE_WITHIN, || {
        if a_back.is_none() {
            a_back = imported_ip(&a, "demo", "web", &["bravo"])?.map(|ip| (ip, healed.elapsed()));
        }
        if b_back.is_none() {
            b_back = imported_ip(&b, "demo", "api", &["alpha"])?.map(|ip| (ip, healed.elapsed()));
        }
        Ok(a_back.clone().zip(b_back.clone()))
    })
    .with_context(|| format!("alpha's import back: {a_back:?}, bravo's: {b_back:?}"))?;
    let ((a_ip, a_after), (b_ip, b_after)) =
        (a_back.context("alpha's import")?, b_back.context("bravo's import")?);
    assert_eq!(a_ip, web_ip, "demo/web came back to alpha with another ClusterSetIP");
    assert_eq!(b_ip, api_ip, "demo/api came back to bravo with another ClusterSetIP");

    let recovered = clients.first_success_after(healed, RESTORE_WITHIN)?;
    clients.wait_replies_after(recovered, AFTER_RECOVERY, Duration::from_secs(60))?;
    let replies = clients.finish();
    assert_no_failures(&replies, started, cut, "before the partition");
    let (total, failed, first) = phase(&replies, cut, recovered);
    eprintln!(
        "partition of {:?} (lease {LEASE:?}): alpha withdrew bravo's export {a_withdrew:?} and \
         bravo alpha's {b_withdrew:?} after the cut; imports back {a_after:?} (alpha) and \
         {b_after:?} (bravo) after the link came up, same ClusterSetIPs; first success \
         {:?} after; during the partition {failed} of {total} requests failed (first: \
         {first:?})",
        healed - cut,
        recovered.saturating_duration_since(healed),
    );
    let n = assert_no_failures(&replies, recovered, Instant::now(), "after recovery");
    assert!(n >= AFTER_RECOVERY, "only {n} requests after recovery");
    Ok(())
}
