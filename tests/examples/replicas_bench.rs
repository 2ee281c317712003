//! Replica benchmark (issue 19, "Benchmark"): what a client of another cluster sees when a
//! replica of the cluster it talks to is killed, when the leader is killed, and during a
//! rolling restart, with two replicas against the baseline of one, in one invocation.
//!
//! Each run is a fresh [`Clusters`] (tests/src/replicas.rs): alpha with N replicas, each in a
//! network namespace of its own on a bridged LAN, bravo with one gateway whose peer entry
//! lists every alpha replica, alpha's backend on the hub. Under load from bravo's namespace
//! (a TCP loop, a new connection every 20 ms through bravo's ClusterSetIP and the tunnel to
//! alpha; a DNS loop every 50 ms against alpha's replicas, in order, timeout 1 s per server,
//! as a stub resolver with one `nameserver` line per replica) after 2 s of steady load:
//!
//! - **replica kill**: SIGKILL of alpha's replica 1, down `--down` seconds (3), started
//!   again; file source.
//! - **leader kill**: alpha reads a real kube-apiserver (on the hub) and its replicas elect
//!   a writer with a Lease (`--lease` seconds, 4; identities are host name and process id,
//!   so a restarted replica is a new candidate, as a new pod is); SIGKILL of the holder, down
//!   as long, started again. The time to a new leader runs from the kill to the first look
//!   (every 100 ms) at which a running replica says `fedgate_leader 1`.
//! - **rolling restart**: SIGTERM of each replica in turn (`drainDuration: 5s`), down as
//!   long, started again; the next one once the previous is ready, bravo is connected to it
//!   and it carries requests; file source.
//!
//! The window of a fault runs from its onset until every replica taken down is back and
//! carries requests (plus 1 s). Every request and query that ended in it is counted:
//! failed ones, the worst successful latency, and the longest time between two successful
//! requests (the outage a client sees).
//!
//! ```text
//! cargo build --release -p fedgate --bin fedgate
//! FEDGATE_BIN=target/release/fedgate cargo run --release -p fedgate-e2e --example replicas_bench
//! ```
//! `bench/replicas.sh` does both. Needs root, `ip`, `curl`, `python3` and, for the leader kill,
//! the kube binaries of scripts/build-kube.sh.

use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_e2e::faults::Recorder;
use fedgate_e2e::replicas::*;
use fedgate_e2e::*;

/// The faults, in the order the table lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    ReplicaKill,
    LeaderKill,
    RollingRestart,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::ReplicaKill => "replica kill (SIGKILL)",
            Scenario::LeaderKill => "leader kill (SIGKILL, kube)",
            Scenario::RollingRestart => "rolling restart (SIGTERM)",
        }
    }
}

/// What one run measured.
struct Figures {
    requests: Tally,
    queries: Tally,
    worst_ok_request: Duration,
    worst_ok_query: Duration,
    longest_gap: Duration,
    new_leader: Option<Duration>,
    window: Duration,
}

struct Args {
    lease: Duration,
    down: Duration,
    only: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { lease: Duration::from_secs(4), down: Duration::from_secs(3), only: None };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--lease" => {
                let secs: u64 = it.next().context("--lease SECONDS")?.parse()?;
                args.lease = Duration::from_secs(secs);
            }
            "--down" => {
                let secs: u64 = it.next().context("--down SECONDS")?.parse()?;
                args.down = Duration::from_secs(secs);
            }
            "--only" => args.only = Some(it.next().context("--only replica|leader|rolling")?),
            other => {
                bail!(
                    "unknown argument {other:?} (--lease SECONDS, --down SECONDS, --only replica|leader|rolling)"
                )
            }
        }
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let scenarios = [Scenario::ReplicaKill, Scenario::LeaderKill, Scenario::RollingRestart];
    let mut rows = Vec::new();
    for scenario in scenarios {
        if args.only.as_deref().is_some_and(|o| !scenario.name().starts_with(o)) {
            continue;
        }
        for replicas in [2, 1] {
            let started = Instant::now();
            let result = run(scenario, replicas, &args);
            match &result {
                Ok(f) => eprintln!(
                    "{} with {replicas}: requests {}; queries {}; run took {:.0?}",
                    scenario.name(),
                    f.requests,
                    f.queries,
                    started.elapsed()
                ),
                Err(e) => eprintln!("{} with {replicas}: not measured: {e:#}", scenario.name()),
            }
            rows.push((scenario, replicas, result));
        }
    }
    println!("{}", table(&rows, &args));
    Ok(())
}

/// One fault with `replicas` replicas of alpha.
fn run(scenario: Scenario, replicas: usize, args: &Args) -> Result<Figures> {
    let (lease, down) = (args.lease, args.down);
    let source = match scenario {
        Scenario::LeaderKill => Source::Kube { lease },
        _ => Source::File,
    };
    let mut c = Clusters::start(replicas, source, "traffic: { drainDuration: 5s }\n")?;
    let (tcp, dns) = c.start_load()?;
    std::thread::sleep(Duration::from_secs(2));
    let (onset, new_leader) = match scenario {
        Scenario::ReplicaKill => (c.down_and_back(0, Fault::Kill, down, &tcp)?.onset, None),
        Scenario::RollingRestart => {
            let mut first = None;
            for i in 0..replicas {
                let cycle = c.down_and_back(i, Fault::Term, down, &tcp)?;
                first.get_or_insert(cycle.onset);
            }
            (first.context("a replica")?, None)
        }
        Scenario::LeaderKill => {
            let leader = eventually("a leader among alpha's replicas", PROPAGATION, || c.leader())?;
            let looks = watch_leaders(&c);
            let cycle = c.down_and_back(leader, Fault::Kill, down, &tcp)?;
            let elected = eventually("a new leader", PROPAGATION + lease * 2, || {
                Ok(looks
                    .snapshot()
                    .into_iter()
                    .find(|(at, leaders)| *at > cycle.onset && !leaders.is_empty()))
            })?;
            let looks = looks.finish();
            eprintln!(
                "leader alpha-{} killed; new leader alpha-{:?} after {:.1?} ({} looks)",
                leader + 1,
                elected.1.iter().map(|i| i + 1).collect::<Vec<_>>(),
                elected.0 - cycle.onset,
                looks.len()
            );
            (cycle.onset, Some(elected.0 - cycle.onset))
        }
    };
    std::thread::sleep(Duration::from_secs(1));
    let tcp = tcp.finish();
    let dns = dns.finish();
    let window = onset.elapsed();
    let in_window = |o: &&Outcome| o.end >= onset;
    let requests: Vec<&Outcome> = tcp.iter().filter(in_window).collect();
    let queries: Vec<&Outcome> = dns.iter().filter(in_window).collect();
    let worst_ok = |os: &[&Outcome]| os.iter().filter(|o| o.ok).map(|o| o.took).max();
    // The longest stretch without a successful request: from the onset (or a success) to the
    // next success.
    let mut longest_gap = Duration::ZERO;
    let mut last = onset;
    for o in requests.iter().filter(|o| o.ok) {
        longest_gap = longest_gap.max(o.end.saturating_duration_since(last));
        last = o.end;
    }
    Ok(Figures {
        requests: Tally::of(requests.iter().copied()),
        queries: Tally::of(queries.iter().copied()),
        worst_ok_request: worst_ok(&requests).unwrap_or_default(),
        worst_ok_query: worst_ok(&queries).unwrap_or_default(),
        longest_gap,
        new_leader,
        window,
    })
}

/// Looks every 100 ms at which of alpha's replicas say `fedgate_leader 1` (a replica that does
/// not answer does not lead); each sample is when the look started and the leaders' indexes.
fn watch_leaders(c: &Clusters) -> Recorder<(Instant, Vec<usize>)> {
    let admins: Vec<Admin> = c.a.iter().zip(&c.a_nodes).map(|(g, ns)| Admin::of(g, ns)).collect();
    Recorder::start(Duration::from_millis(100), move || {
        let at = Instant::now();
        let leaders = admins
            .iter()
            .enumerate()
            .filter(|(_, a)| {
                a.text("/metrics").is_ok_and(|m| {
                    metric_samples(&m, "fedgate_leader", &[]).iter().any(|(_, v)| *v == 1.0)
                })
            })
            .map(|(i, _)| i)
            .collect();
        ControlFlow::Continue(Some((at, leaders)))
    })
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// The table: one row per fault and replica count.
fn table(rows: &[(Scenario, usize, Result<Figures>)], args: &Args) -> String {
    let bin = fedgate_bin();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nfedgate replicas benchmark: binary {} ({} build); a replica taken down stays down \
         {}s; Lease {}s (leader kill)\n",
        bin.display(),
        if bin.to_string_lossy().contains("/release/") { "release" } else { "debug" },
        args.down.as_secs(),
        args.lease.as_secs()
    );
    let _ = writeln!(
        t,
        "| fault | replicas | failed connections | longest time without a successful request ms | worst successful request ms | failed DNS queries | worst successful query ms | new leader after ms | window s |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (scenario, replicas, result) in rows {
        match result {
            Ok(f) => {
                let leader = match (scenario, f.new_leader) {
                    (Scenario::LeaderKill, Some(d)) => ms(d),
                    _ => "–".to_owned(),
                };
                let _ = writeln!(
                    t,
                    "| {} | {replicas} | {} of {} | {} | {} | {} of {} | {} | {leader} | {:.1} |",
                    scenario.name(),
                    f.requests.failed,
                    f.requests.total,
                    ms(f.longest_gap),
                    ms(f.worst_ok_request),
                    f.queries.failed,
                    f.queries.total,
                    ms(f.worst_ok_query),
                    f.window.as_secs_f64()
                );
            }
            Err(e) => {
                let reason = format!("{e:#}").replace('\n', " ").replace('|', "/");
                let reason: String = reason.chars().take(200).collect();
                let _ = writeln!(
                    t,
                    "| {} | {replicas} | not measured: {reason} | | | | | | |",
                    scenario.name()
                );
            }
        }
    }
    t
}
