//! Fault suite, issue 17: peers that crash, hang or come back, under load. Real gateway
//! processes on loopback, real backends (Python asyncio servers), and a client loop that opens
//! a new TCP connection through alpha's ClusterSetIP for every request (one round trip each)
//! for the whole test. Each request is recorded with the time it started, so the tests can
//! count failures per phase: before the fault (must be zero), during it (counted and printed
//! where the design promises nothing: the only exporter is dead; zero where it promises
//! connection-level failover to another exporter: docs/endpoint-selection.md) and after
//! recovery (must be zero).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fedgate_e2e::faults::{self, Backend, Recorder, export_backend, signal_pid};
use fedgate_e2e::*;

const CLUSTERSET: &str = "faults";
const PROPAGATION: Duration = Duration::from_secs(10);
/// Bound on one client request: above the gateway's connect budget (3 s), so a request that
/// the gateway fails over inside its budget is never cut short by the client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two requests of the client loop.
const PACE: Duration = Duration::from_millis(20);
/// Consecutive requests that must all succeed once service is back.
const AFTER_RECOVERY: usize = 50;
/// How long traffic may take to return to a preferred exporter that is back.
const BACK_WITHIN: Duration = Duration::from_secs(20);

/// Continues a stopped gateway when dropped, so a failing assertion never leaves it stopped.
struct ContinueOnDrop(u32);

impl Drop for ContinueOnDrop {
    fn drop(&mut self) {
        let _ = signal_pid(self.0, "CONT");
    }
}

/// One client connection through `vip` ([`faults::round_trip`] with this file's timeout).
fn round_trip(vip: SocketAddr) -> Result<String> {
    faults::round_trip(vip, REQUEST_TIMEOUT)
}

/// One request of the client loop: when it started, how long it took, who answered or why
/// it failed.
#[derive(Clone, Debug)]
struct Sample {
    start: Instant,
    took: Duration,
    result: Result<String, String>,
}

impl Sample {
    /// When the request ended. Phases are told apart by it: a request in flight when a fault
    /// begins belongs to the fault (the loop is sequential: requests never overlap).
    fn end(&self) -> Instant {
        self.start + self.took
    }
}

/// A thread that runs [`round_trip`] against one ClusterSetIP, one new connection per request,
/// until stopped.
struct ClientLoop(Recorder<Sample>);

impl ClientLoop {
    fn start(vip: SocketAddr) -> Self {
        Self(Recorder::start(PACE, move || {
            let start = Instant::now();
            let result = round_trip(vip).map_err(|e| format!("{e:#}"));
            ControlFlow::Continue(Some(Sample { start, took: start.elapsed(), result }))
        }))
    }

    fn snapshot(&self) -> Vec<Sample> {
        self.0.snapshot()
    }

    /// Waits (bounded) for the first successful request started at or after `from`; returns
    /// its end.
    fn first_success_after(&self, from: Instant, timeout: Duration) -> Result<Instant> {
        eventually("a successful request", timeout, || {
            Ok(self
                .snapshot()
                .iter()
                .find(|s| s.start >= from && s.result.is_ok())
                .map(Sample::end))
        })
    }

    /// Waits (bounded) until at least `n` requests started at or after `from` have finished.
    fn wait_requests_after(&self, from: Instant, n: usize, timeout: Duration) -> Result<()> {
        eventually(&format!("{n} requests"), timeout, || {
            Ok((self.snapshot().iter().filter(|s| s.start >= from).count() >= n).then_some(()))
        })
    }

    /// Waits (at most [`BACK_WITHIN`]) for the first request started at or after `from`, the
    /// time of `event`, that `backend` answered; returns its end.
    fn back_on(&self, backend: &str, from: Instant, event: &str) -> Result<Instant> {
        eventually(&format!("traffic back on {backend} after {event}"), BACK_WITHIN, || {
            Ok(self
                .snapshot()
                .iter()
                .find(|s| s.start >= from && s.result.as_deref() == Ok(backend))
                .map(Sample::end))
        })
    }

    /// Stops the loop and returns every sample.
    fn finish(self) -> Vec<Sample> {
        self.0.finish()
    }
}

/// Requests that ended in `[from, to)`: (total, failed, a few failure messages, slowest).
fn phase(samples: &[Sample], from: Instant, to: Instant) -> (usize, usize, Vec<String>, Duration) {
    let in_phase: Vec<&Sample> =
        samples.iter().filter(|s| s.end() >= from && s.end() < to).collect();
    let failed: Vec<String> = in_phase
        .iter()
        .filter_map(|s| s.result.as_ref().err().map(|e| format!("{e} (after {:?})", s.took)))
        .collect();
    let slowest = in_phase.iter().map(|s| s.took).max().unwrap_or_default();
    (in_phase.len(), failed.len(), failed.into_iter().take(3).collect(), slowest)
}

/// Asserts that no request that ended in `[from, to)` failed; returns how many there were.
fn assert_no_failures(samples: &[Sample], from: Instant, to: Instant, what: &str) -> usize {
    let (total, failed, first, slowest) = phase(samples, from, to);
    eprintln!("{what}: {failed} of {total} requests failed (slowest {slowest:?})");
    assert_eq!(failed, 0, "{what}: {failed} of {total} requests failed, first: {first:?}");
    total
}

/// Splits off the requests in flight at `onset` (started before it, ended after): connections
/// the gateway had already handed to a peer's endpoint when the peer died or froze. Failover
/// happens while a connection is being set up, before the client sees a byte
/// (docs/endpoint-selection.md), so the design promises nothing for these: they are counted
/// and printed, not asserted. Returns the other requests.
fn without_in_flight(samples: &[Sample], onset: Instant, what: &str) -> Vec<Sample> {
    let (in_flight, rest): (Vec<Sample>, Vec<Sample>) =
        samples.iter().cloned().partition(|s| s.start < onset && s.end() > onset);
    let failed: Vec<&String> = in_flight.iter().filter_map(|s| s.result.as_ref().err()).collect();
    eprintln!(
        "{what}: {} request(s) in flight at the onset, {} failed {failed:?}",
        in_flight.len(),
        failed.len()
    );
    rest
}

/// Which backends answered the requests that ended in `[from, to)`, with counts.
fn answered_by(samples: &[Sample], from: Instant, to: Instant) -> Vec<(String, usize)> {
    let mut by: Vec<(String, usize)> = Vec::new();
    for s in samples.iter().filter(|s| s.end() >= from && s.end() < to) {
        let Ok(name) = &s.result else { continue };
        match by.iter_mut().find(|(n, _)| n == name) {
            Some((_, c)) => *c += 1,
            None => by.push((name.clone(), 1)),
        }
    }
    by
}

/// `dig +short` A records of `fault/<name>` at `g`'s DNS server.
fn dns_a(g: &Gateway, name: &str) -> Result<Vec<String>> {
    fedgate_e2e::faults::dig_a(g, "fault", name)
}

/// Starts gateways `ids` (full mesh, lease `lease`) in one block; `edit` adjusts each spec.
fn start_gateways(
    tmp: &std::path::Path,
    block: AddrBlock,
    ids: &[&str],
    lease: &str,
    edit: impl Fn(&mut GatewaySpec),
) -> Result<Vec<Gateway>> {
    start_mesh(tmp, block, CLUSTERSET, ids, |i, spec| {
        let [_, a, b, _] = block.ip(1).octets();
        spec.lease = lease.to_owned();
        // The mesh default (`127.<a>.<200 + i>.0/24`) is shared by every test of this
        // process: gateways of two tests would bind the same ClusterSetIPs. The upper half
        // of the test's own block is unused (gateways are hosts 10.., backends 60..).
        spec.vip_range = format!("127.{a}.{b}.{}/27", 128 + 32 * i);
        edit(spec);
    })
}

/// How long, after a killed exporter's new process answers `/healthz`, requests through alpha
/// may still fail. Alpha learns of the restart from a stateless reset on its next keep-alive
/// (tests/federation.rs) and redials at once; 10 s leaves room for a loaded CI machine.
const RESTART_RECOVERY: Duration = Duration::from_secs(10);

/// kill -9 and restart under load, with a single exporter. Bravo (the only exporter of
/// fault/web) is SIGKILLed while a client loop runs through alpha, stays dead for 3 s and is
/// started again, all within its 15 s lease. Asserts: no failure before the kill; alpha keeps
/// bravo's import (same ClusterSetIP) at every look during the outage; requests succeed again
/// within [`RESTART_RECOVERY`] of bravo's restart, and every one of the next
/// [`AFTER_RECOVERY`] does. Failures during the outage are counted and printed: with the only
/// exporter dead the design promises none. Alpha has the lower id, so it dials bravo: this is
/// the restart of a replica this side dialed.
#[test]
fn a_killed_exporter_restarted_within_its_lease_keeps_its_import_and_recovers() -> Result<()> {
    killed_exporter_restarted(1)
}

/// The same with the roles swapped: alpha (the only exporter, and the side that dials) is
/// killed and restarted while the client loop runs through bravo, whose connections to alpha
/// were accepted. The restarted alpha dials again from the same address, and its new lanes
/// must replace the dead ones before bravo puts a stream on them.
#[test]
fn a_killed_dialing_exporter_restarted_within_its_lease_recovers_at_the_acceptor() -> Result<()> {
    killed_exporter_restarted(0)
}

/// Gateways alpha and bravo; `exporter` (0 or 1) exports fault/web, the other one takes the
/// client loop; the exporter is killed, stays dead for 3 s and restarts.
fn killed_exporter_restarted(exporter: usize) -> Result<()> {
    let client = 1 - exporter;
    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let mut gateways = start_gateways(tmp.path(), block, &["alpha", "bravo"], "15s", |_| {})?;
    let (ex, cl) = (gateways[exporter].spec.id.clone(), gateways[client].spec.id.clone());
    let backend_addr = block.addr(60, 7100);
    let _backend = Backend::start(backend_addr, &format!("{ex}-1"), 128)?;
    export_backend(&gateways[exporter], "web", backend_addr)?;
    let ip = wait_vip(&gateways[client], "fault", "web", &[ex.as_str()], PROPAGATION)?;
    let vip = SocketAddr::new(ip.parse()?, 80);
    eventually(&format!("a first round trip through {cl}"), PROPAGATION, || {
        Ok(round_trip(vip).ok())
    })?;

    let clients = ClientLoop::start(vip);
    let started = Instant::now();
    clients.wait_requests_after(started, 20, Duration::from_secs(10))?;

    let killed = Instant::now();
    gateways[exporter].kill();
    // Dead for 3 s: the client's gateway must keep the import the whole time (the lease is
    // 15 s).
    let mut looks = 0;
    while killed.elapsed() < Duration::from_secs(3) {
        let now = imported_ip(&gateways[client], "fault", "web", &[ex.as_str()])?;
        assert_eq!(
            now.as_deref(),
            Some(ip.as_str()),
            "{cl} withdrew or renumbered {ex}'s import {:?} after the kill, within the lease",
            killed.elapsed()
        );
        looks += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    gateways[exporter].start()?;
    let restarted = Instant::now();
    let recovered =
        clients.first_success_after(restarted, RESTART_RECOVERY).with_context(|| {
            format!("requests through {cl} still fail {RESTART_RECOVERY:?} after {ex} restarted")
        })?;
    let after = imported_ip(&gateways[client], "fault", "web", &[ex.as_str()])?;
    assert_eq!(after.as_deref(), Some(ip.as_str()), "the import and its ClusterSetIP stayed");
    clients.wait_requests_after(recovered, AFTER_RECOVERY, Duration::from_secs(60))?;
    let samples = clients.finish();

    assert_no_failures(&samples, started, killed, "before the kill");
    let (total, failed, first, slowest) = phase(&samples, killed, recovered);
    eprintln!(
        "{ex} restarted {:?} after the kill; import kept at {looks} looks; during the \
         outage {failed} of {total} requests failed (slowest {slowest:?}, first errors \
         {first:?}); first success {:?} after the restart",
        restarted - killed,
        recovered.saturating_duration_since(restarted),
    );
    let n = assert_no_failures(&samples, recovered, Instant::now(), "after recovery");
    assert!(n >= AFTER_RECOVERY, "only {n} requests after recovery");
    Ok(())
}

/// Withdrawal after SIGSTOP and return after SIGCONT, bounded: a 3 s lease must lapse within
/// this of the stop ...
const WITHDRAW_WITHIN: Duration = Duration::from_secs(8);
/// ... and a continued peer's exports come back within this of SIGCONT (its QUIC connection
/// idled out while it was stopped: a redial, a handshake and a full export exchange).
const RETURN_WITHIN: Duration = Duration::from_secs(15);

/// The preferred ClusterSetIP of `namespace/name` in an IPv4 `range` of /30 or wider
/// (docs/mcs-semantics.md: FNV-1a-64 of the key modulo the usable addresses, network and
/// broadcast skipped).
fn preferred_ip(range: &str, key: &str) -> Result<Ipv4Addr> {
    let (base, prefix) = range.split_once('/').context("a CIDR range")?;
    let (base, prefix): (Ipv4Addr, u32) = (base.parse()?, prefix.parse()?);
    let usable = (1u64 << (32 - prefix)) - 2;
    let hash = key
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    Ok(Ipv4Addr::from(u32::from(base) + 1 + (hash % usable) as u32))
}

/// SIGSTOP of a peer beyond its lease, then SIGCONT. Lease 3 s; bravo (the only exporter of
/// fault/web) is stopped for 8 s under a client loop through alpha. Asserts: alpha withdraws
/// the import (gone from /debug/imports, NXDOMAIN from its DNS) within [`WITHDRAW_WITHIN`]
/// of the stop; a service alpha exports meanwhile whose preferred address is web's does not
/// get it (the address is reserved for the import of the withdrawn cluster); after SIGCONT
/// the import comes back within [`RETURN_WITHIN`] with the same ClusterSetIP, in
/// /debug/imports and DNS; then every one of [`AFTER_RECOVERY`] requests succeeds. Failures
/// while bravo is stopped are counted and printed.
#[test]
fn a_peer_stopped_beyond_its_lease_is_withdrawn_and_returns_with_its_address() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let gateways = start_gateways(tmp.path(), block, &["alpha", "bravo"], "3s", |_| {})?;
    let [alpha, bravo] = &gateways[..] else { unreachable!() };
    let backend_addr = block.addr(61, 7101);
    let _backend = Backend::start(backend_addr, "bravo-1", 128)?;
    export_backend(bravo, "web", backend_addr)?;
    let ip = wait_vip(alpha, "fault", "web", &["bravo"], PROPAGATION)?;
    let vip = SocketAddr::new(ip.parse()?, 80);
    assert_eq!(dns_a(alpha, "web")?, [ip.as_str()], "alpha's DNS answers the ClusterSetIP");

    // A name whose preferred address is web's: exported by alpha while bravo is withdrawn, it
    // must not take web's (reserved) address.
    let range = alpha.spec.vip_range.clone();
    assert_eq!(
        preferred_ip(&range, "fault/web")?.to_string(),
        ip,
        "fault/web did not get its preferred address: this test's model of the allocator \
         (docs/mcs-semantics.md) is out of date"
    );
    let collider = (0..100_000)
        .map(|i| format!("rival-{i}"))
        .find(|n| preferred_ip(&range, &format!("fault/{n}")).is_ok_and(|p| p.to_string() == ip))
        .context("a name with web's preferred address")?;

    eventually("a first round trip through alpha", PROPAGATION, || Ok(round_trip(vip).ok()))?;
    let clients = ClientLoop::start(vip);
    let started = Instant::now();
    clients.wait_requests_after(started, 20, Duration::from_secs(10))?;

    let pid = bravo.pid().context("bravo's pid")?;
    let stopped = Instant::now();
    signal_pid(pid, "STOP")?;
    let cont = ContinueOnDrop(pid);
    eventually("alpha to withdraw bravo's import after the lease", WITHDRAW_WITHIN, || {
        Ok(find_import(&alpha.json("/debug/imports")?, "fault", "web").is_none().then_some(()))
    })?;
    let withdrawn = stopped.elapsed();
    assert!(
        withdrawn >= Duration::from_secs(1),
        "withdrawn {withdrawn:?} after the stop: before the 3 s lease could lapse"
    );
    eventually("alpha's DNS to stop answering for the withdrawn import", PROPAGATION, || {
        Ok(dns_a(alpha, "web")?.is_empty().then_some(()))
    })?;

    let rival_ip = local_addr(block, 62);
    let rival_yaml = faults::export_yaml(&collider, &rival_ip.to_string(), 7102);
    alpha.write_cluster_file("rival.yaml", &rival_yaml)?;
    let rival = wait_vip(alpha, "fault", &collider, &["alpha"], PROPAGATION)?;
    assert_ne!(rival, ip, "{collider} took the address reserved for bravo's fault/web");
    eprintln!("fault/{collider} (preferred address {ip}, reserved) got {rival} instead");

    // Stopped well beyond the lease, then continued.
    let hold = Duration::from_secs(8);
    std::thread::sleep(hold.saturating_sub(stopped.elapsed()));
    signal_pid(pid, "CONT")?;
    let continued = Instant::now();
    drop(cont);
    let back = eventually("bravo's import back on alpha", RETURN_WITHIN, || {
        Ok(find_import(&alpha.json("/debug/imports")?, "fault", "web")
            .filter(|i| import_clusters(i) == ["bravo"])
            .map(|i| i["ips"].clone()))
    })?;
    let returned = continued.elapsed();
    assert_eq!(
        back[0].as_str(),
        Some(ip.as_str()),
        "bravo's fault/web came back with another ClusterSetIP (before: {ip}, now: {back})"
    );
    eventually("alpha's DNS to answer the same ClusterSetIP again", PROPAGATION, || {
        Ok((dns_a(alpha, "web")? == [ip.as_str()]).then_some(()))
    })?;
    assert_eq!(
        wait_vip(alpha, "fault", &collider, &["alpha"], PROPAGATION)?,
        rival,
        "the rival kept its"
    );

    let recovered = clients.first_success_after(continued, PROPAGATION)?;
    clients.wait_requests_after(recovered, AFTER_RECOVERY, Duration::from_secs(60))?;
    let samples = clients.finish();
    assert_no_failures(&samples, started, stopped, "before the stop");
    let (total, failed, first, _) = phase(&samples, stopped, recovered);
    eprintln!(
        "bravo stopped for {:?} (lease 3 s): withdrawn {withdrawn:?} after SIGSTOP, import back \
         {returned:?} after SIGCONT with the same ClusterSetIP {ip}; while stopped {failed} of \
         {total} requests failed (first errors {first:?}); first success {:?} after SIGCONT",
        continued - stopped,
        recovered.saturating_duration_since(continued),
    );
    let n = assert_no_failures(&samples, recovered, Instant::now(), "after recovery");
    assert!(n >= AFTER_RECOVERY, "only {n} requests after recovery");
    Ok(())
}

/// A loopback address of `block` for a backend that need not exist (the rival's endpoint).
fn local_addr(block: AddrBlock, host: u8) -> IpAddr {
    IpAddr::V4(block.ip(host))
}

/// Connection-level failover to a second exporter (docs/endpoint-selection.md). Bravo (alpha's
/// region: the preferred tier) and charlie both export fault/web; a client loop runs through
/// alpha for the whole test. Bravo is SIGKILLed, dead for 6 s and restarted; later it is
/// SIGSTOPped for 6 s (beyond its 3 s lease) and continued. Asserts: ZERO failed requests from
/// start to end, charlie answering while bravo is down, except a request that bravo had
/// already accepted when it was killed or stopped (counted and printed: failover happens
/// before the client sees a byte, not in the middle of a connection); bravo withdrawn while
/// stopped beyond
/// its lease and back afterwards; traffic back on bravo after each fault; the ClusterSetIP
/// never changes.
#[test]
fn with_a_second_exporter_a_killed_or_stopped_peer_costs_no_request() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let mut gateways =
        start_gateways(tmp.path(), block, &["alpha", "bravo", "charlie"], "3s", |spec| {
            if spec.id == "bravo" {
                spec.region = "region-alpha".to_owned();
            }
        })?;
    let b_addr = block.addr(63, 7103);
    let c_addr = block.addr(64, 7103);
    let _b = Backend::start(b_addr, "bravo-1", 128)?;
    let _c = Backend::start(c_addr, "charlie-1", 128)?;
    export_backend(&gateways[1], "web", b_addr)?;
    export_backend(&gateways[2], "web", c_addr)?;
    let ip = wait_vip(&gateways[0], "fault", "web", &["bravo", "charlie"], PROPAGATION)?;
    let vip = SocketAddr::new(ip.parse()?, 80);
    eventually("traffic on bravo, the preferred tier", PROPAGATION, || {
        Ok(round_trip(vip).ok().filter(|n| n == "bravo-1"))
    })?;

    let clients = ClientLoop::start(vip);
    let started = Instant::now();
    clients.wait_requests_after(started, 20, Duration::from_secs(10))?;

    // 1. kill -9, dead for 6 s, restart. Longer than the tunnel's 5 s idle timeout: a request
    // bravo had accepted when it died hangs until then (the loop is sequential), and charlie
    // must be seen answering after it.
    let killed = Instant::now();
    gateways[1].kill();
    std::thread::sleep(Duration::from_secs(6));
    gateways[1].start()?;
    let restarted = Instant::now();
    let on_bravo = clients.back_on("bravo-1", restarted, "its restart")?;
    let killed_phase = answered_by(&clients.snapshot(), killed, restarted);
    eprintln!(
        "kill: bravo dead {:?}; answered while dead: {killed_phase:?}; traffic back on bravo \
         {:?} after the restart",
        restarted - killed,
        on_bravo.saturating_duration_since(restarted)
    );
    assert!(
        killed_phase.iter().any(|(n, _)| n == "charlie-1"),
        "charlie answered while bravo was dead: {killed_phase:?}"
    );

    // 2. SIGSTOP beyond the lease, SIGCONT.
    let pid = gateways[1].pid().context("bravo's pid")?;
    let stopped = Instant::now();
    signal_pid(pid, "STOP")?;
    // `kill -STOP` is a process of its own: bravo runs on for the few milliseconds it takes
    // to start, and may accept a request that starts in that window and then freeze under
    // it. The stop has taken effect once the command has returned; requests in flight then
    // are the onset's.
    let stop_effective = Instant::now();
    let cont = ContinueOnDrop(pid);
    let alpha = &gateways[0];
    let withdrawn_ip = wait_vip(alpha, "fault", "web", &["charlie"], WITHDRAW_WITHIN)?;
    let withdrawn = stopped.elapsed();
    assert_eq!(withdrawn_ip, ip, "the ClusterSetIP stays while charlie exports");
    std::thread::sleep(Duration::from_secs(6).saturating_sub(stopped.elapsed()));
    signal_pid(pid, "CONT")?;
    let continued = Instant::now();
    drop(cont);
    let back_ip = wait_vip(alpha, "fault", "web", &["bravo", "charlie"], RETURN_WITHIN)?;
    let returned = continued.elapsed();
    assert_eq!(back_ip, ip, "the ClusterSetIP stays when bravo returns");
    let on_bravo = clients.back_on("bravo-1", continued, "SIGCONT")?;
    clients.wait_requests_after(on_bravo, AFTER_RECOVERY, Duration::from_secs(60))?;
    let samples = clients.finish();
    let stop_phase = answered_by(&samples, stopped, continued);
    eprintln!(
        "stop: bravo stopped {:?} (lease 3 s), withdrawn {withdrawn:?} after SIGSTOP, back \
         {returned:?} after SIGCONT, traffic on bravo {:?} after SIGCONT; answered while \
         stopped: {stop_phase:?}",
        continued - stopped,
        on_bravo.saturating_duration_since(continued)
    );
    assert!(
        stop_phase.iter().any(|(n, _)| n == "charlie-1"),
        "charlie answered while bravo was stopped: {stop_phase:?}"
    );
    assert_no_failures(&samples, started, killed, "before the kill");
    let not_at_kill = without_in_flight(&samples, killed, "kill");
    assert_no_failures(&not_at_kill, killed, restarted, "while bravo was dead");
    assert_no_failures(&samples, restarted, stopped, "after bravo's restart");
    let not_at_stop = without_in_flight(&samples, stop_effective, "stop");
    assert_no_failures(&not_at_stop, stop_effective, continued, "while bravo was stopped");
    assert_no_failures(&samples, continued, Instant::now(), "after SIGCONT");
    Ok(())
}
