//! What the dashboard shows about traffic, kept beside the metrics: connection and byte
//! counters per (service, target cluster), refused connections per reason, and a ring of the
//! most recent failovers. Prometheus keeps the long history; this is the small in-memory view
//! an operator reads at `/debug/traffic` and `/debug/failovers` without a Prometheus server.
//!
//! Counters live under one mutex touched twice per connection (open, close) and once per
//! failover; bytes of open connections are read live from the same atomics the copy path
//! updates ([`ByteCounters`]), so a long transfer shows up while it runs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use fedgate_discovery::model::ClusterId;
use serde::Serialize;

use super::Shared;
use super::connect::Connected;
use super::listeners::Route;
use super::metrics::ByteCounters;
use super::select::{EndpointView, SkipReason};

/// How many failover events `/debug/failovers` keeps (identical consecutive events are
/// merged into one with a count, so a burst does not push out the history).
pub const FAILOVER_HISTORY: usize = 64;

/// Connections and bytes of one (service, target cluster) pair.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowStats {
    pub service: String,
    pub target_cluster: String,
    /// Connections established since start (open ones included).
    pub connections: u64,
    /// Connections open right now.
    pub active: u64,
    /// Bytes from clients to endpoints (closed and open connections).
    pub bytes_tx: u64,
    /// Bytes from endpoints to clients.
    pub bytes_rx: u64,
}

/// Client connections that found no endpoint, per service and reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RefusedStats {
    pub service: String,
    /// `no_healthy_endpoint`, `connect_failed`, `unknown_service`.
    pub reason: &'static str,
    pub connections: u64,
}

/// One failover: a connection served by a worse tier than the best one, or after failed
/// attempts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverEvent {
    /// When it first happened (wall clock).
    pub at: jiff::Timestamp,
    /// When it last happened (identical consecutive events are merged).
    pub last: jiff::Timestamp,
    /// How many connections it stands for.
    pub count: u64,
    pub service: String,
    pub port: u16,
    /// The tier traffic goes to when everything is healthy.
    pub from_tier: usize,
    /// The clusters of that tier.
    pub from_clusters: Vec<ClusterId>,
    pub to_cluster: ClusterId,
    pub to_endpoint: IpAddr,
    pub to_tier: usize,
    /// Connect attempts that failed before this one succeeded.
    pub failed_attempts: usize,
    /// Why the better candidates were not used.
    pub reason: String,
}

impl FailoverEvent {
    fn same_as(&self, other: &FailoverEvent) -> bool {
        (
            &self.service,
            self.port,
            self.from_tier,
            &self.to_cluster,
            self.to_endpoint,
            self.to_tier,
            &self.reason,
        ) == (
            &other.service,
            other.port,
            other.from_tier,
            &other.to_cluster,
            other.to_endpoint,
            other.to_tier,
            &other.reason,
        )
    }
}

#[derive(Default)]
struct Flow {
    connections: u64,
    closed_tx: u64,
    closed_rx: u64,
    open: HashMap<u64, Arc<ByteCounters>>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    flows: BTreeMap<(String, String), Flow>,
    refused: BTreeMap<(String, &'static str), u64>,
    failovers: VecDeque<FailoverEvent>,
}

/// The activity recorder: one per data plane.
#[derive(Default)]
pub struct Activity {
    inner: Mutex<Inner>,
}

/// Counts one open connection; moves its bytes into the totals when dropped.
pub struct FlowGuard {
    activity: Arc<Activity>,
    key: (String, String),
    id: u64,
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        let mut inner = self.activity.lock();
        if let Some(flow) = inner.flows.get_mut(&self.key)
            && let Some(bytes) = flow.open.remove(&self.id)
        {
            flow.closed_tx += bytes.tx.load(Ordering::Relaxed);
            flow.closed_rx += bytes.rx.load(Ordering::Relaxed);
        }
    }
}

impl Activity {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Counters stay usable after a panic elsewhere.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts counting a connection of `service` served by `target_cluster`; `bytes` are the
    /// counters the copy path updates.
    pub fn open(
        self: &Arc<Self>,
        service: String,
        target_cluster: String,
        bytes: Arc<ByteCounters>,
    ) -> FlowGuard {
        let key = (service, target_cluster);
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        let flow = inner.flows.entry(key.clone()).or_default();
        flow.connections += 1;
        flow.open.insert(id, bytes);
        FlowGuard { activity: self.clone(), key, id }
    }

    /// Counts a connection that could not be connected anywhere.
    pub fn refused(&self, service: String, reason: &'static str) {
        *self.lock().refused.entry((service, reason)).or_default() += 1;
    }

    /// Adds a failover to the ring (merged into the newest event when identical).
    pub fn failover(&self, event: FailoverEvent) {
        let mut inner = self.lock();
        if let Some(newest) = inner.failovers.back_mut()
            && newest.same_as(&event)
        {
            newest.count += event.count;
            newest.last = event.last;
            return;
        }
        if inner.failovers.len() == FAILOVER_HISTORY {
            inner.failovers.pop_front();
        }
        inner.failovers.push_back(event);
    }

    /// Every flow with its live byte counts, ordered by service and target cluster.
    pub fn flows(&self) -> Vec<FlowStats> {
        let inner = self.lock();
        inner
            .flows
            .iter()
            .map(|((service, target), flow)| {
                let (mut tx, mut rx) = (flow.closed_tx, flow.closed_rx);
                for b in flow.open.values() {
                    tx += b.tx.load(Ordering::Relaxed);
                    rx += b.rx.load(Ordering::Relaxed);
                }
                FlowStats {
                    service: service.clone(),
                    target_cluster: target.clone(),
                    connections: flow.connections,
                    active: flow.open.len() as u64,
                    bytes_tx: tx,
                    bytes_rx: rx,
                }
            })
            .collect()
    }

    pub fn refused_counts(&self) -> Vec<RefusedStats> {
        self.lock()
            .refused
            .iter()
            .map(|((service, reason), n)| RefusedStats {
                service: service.clone(),
                reason,
                connections: *n,
            })
            .collect()
    }

    /// Recent failovers, newest first.
    pub fn failovers(&self) -> Vec<FailoverEvent> {
        self.lock().failovers.iter().rev().cloned().collect()
    }
}

/// Skip reasons that say an endpoint can never serve this port or route (not that it is
/// down): such endpoints do not define the best tier (as in `connect`).
pub fn structural(reason: &SkipReason) -> bool {
    matches!(
        reason,
        SkipReason::PortNotExposed | SkipReason::NoMatchingPort | SkipReason::NotTarget
    )
}

/// Why a connection that ended in tier `to_tier` after `failed_attempts` failures did not
/// get an endpoint of `best_tier`, from the ranking as it stands after the attempts
/// (ejections included). Returns the clusters of the best tier and the reason. Pure.
pub fn failover_reason(
    views: &[EndpointView],
    best_tier: usize,
    to_tier: usize,
    failed_attempts: usize,
) -> (Vec<ClusterId>, String) {
    let best: Vec<&EndpointView> =
        views.iter().filter(|v| v.tier == best_tier && !v.skipped.iter().any(structural)).collect();
    let mut clusters: Vec<ClusterId> = best.iter().map(|v| v.cluster.clone()).collect();
    clusters.dedup();
    let mut parts = Vec::new();
    if failed_attempts > 0 {
        parts.push(format!(
            "{failed_attempts} connect attempt{} failed",
            if failed_attempts == 1 { "" } else { "s" }
        ));
    }
    if to_tier != best_tier {
        let down: Vec<String> = best
            .iter()
            .filter(|v| !v.healthy)
            .map(|v| {
                let why: Vec<&str> = v.skipped.iter().map(|s| skip_text(*s)).collect();
                format!("{}/{} {}", v.cluster, v.address, why.join(", "))
            })
            .collect();
        if down.is_empty() {
            parts.push(format!("no endpoint of tier {best_tier} accepted the connection"));
        } else {
            parts.push(format!("tier {best_tier} unavailable: {}", down.join("; ")));
        }
    }
    (clusters, parts.join("; "))
}

/// A short human text for a skip reason.
pub fn skip_text(reason: SkipReason) -> &'static str {
    match reason {
        SkipReason::PortNotExposed => "port not exposed by its cluster",
        SkipReason::NoMatchingPort => "no endpoint port serves this port",
        SkipReason::NotReady => "not ready",
        SkipReason::Unhealthy => "unhealthy",
        SkipReason::ClusterUnreachable => "cluster unreachable",
        SkipReason::Ejected => "ejected",
        SkipReason::NotTarget => "not the target endpoint",
    }
}

impl Shared {
    /// Counts a connected client connection (and its failover, if it is one) for the
    /// dashboard; the returned guard must live as long as the connection.
    pub(crate) fn record_connected(
        self: &Arc<Self>,
        route: &Route,
        connected: &Connected,
        bytes: Arc<ByteCounters>,
    ) -> FlowGuard {
        let service = route.key().to_string();
        if connected.tier != connected.best_tier || connected.attempt > 0 {
            let snapshot = self.snapshot.borrow().clone();
            let views = match snapshot.services.get(route.key()) {
                Some(s) => {
                    let unreachable = self.unreachable(&snapshot, Some(s));
                    let only = match route {
                        Route::Endpoint { cluster, endpoint, .. } => Some((cluster, *endpoint)),
                        Route::Service { .. } => None,
                    };
                    self.rank(&snapshot, s, route.port(), &unreachable, only)
                }
                None => Vec::new(),
            };
            let (from_clusters, reason) =
                failover_reason(&views, connected.best_tier, connected.tier, connected.attempt);
            let now = jiff::Timestamp::now();
            self.activity.failover(FailoverEvent {
                at: now,
                last: now,
                count: 1,
                service: service.clone(),
                port: route.port().port,
                from_tier: connected.best_tier,
                from_clusters,
                to_cluster: connected.cluster.clone(),
                to_endpoint: connected.address,
                to_tier: connected.tier,
                failed_attempts: connected.attempt,
                reason,
            });
        }
        self.activity.open(service, connected.cluster.to_string(), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedgate_discovery::model::Health;

    fn cid(s: &str) -> ClusterId {
        ClusterId::new(s).unwrap()
    }

    fn view(cluster: &str, addr: &str, tier: usize, skipped: Vec<SkipReason>) -> EndpointView {
        EndpointView {
            cluster: cid(cluster),
            address: addr.parse().unwrap(),
            port: Some(80),
            tier,
            matched_labels: vec![],
            health: Health::Healthy,
            ready: true,
            outstanding: 0,
            healthy: skipped.is_empty(),
            skipped,
            path: crate::dataplane::select::Path::Tunnel,
        }
    }

    /// (what, views, best tier, tier served, failed attempts, from clusters, reason)
    type ReasonCase =
        (&'static str, Vec<EndpointView>, usize, usize, usize, Vec<&'static str>, &'static str);

    #[test]
    fn failover_reason_table() {
        use SkipReason::*;
        let cases: Vec<ReasonCase> = vec![
            (
                "local endpoint unhealthy: next tier",
                vec![view("a", "10.0.0.1", 0, vec![Unhealthy]), view("b", "10.1.0.1", 2, vec![])],
                0,
                2,
                0,
                vec!["a"],
                "tier 0 unavailable: a/10.0.0.1 unhealthy",
            ),
            (
                "failed attempt inside the best tier",
                vec![view("a", "10.0.0.1", 0, vec![]), view("a", "10.0.0.2", 0, vec![])],
                0,
                0,
                1,
                vec!["a"],
                "1 connect attempt failed",
            ),
            (
                "attempts failed and ejected endpoint, then the next tier",
                vec![
                    view("a", "10.0.0.1", 0, vec![Ejected]),
                    view("a", "10.0.0.2", 0, vec![NotReady, Unhealthy]),
                    view("b", "10.1.0.1", 1, vec![]),
                ],
                0,
                1,
                3,
                vec!["a"],
                "3 connect attempts failed; tier 0 unavailable: a/10.0.0.1 ejected; \
                 a/10.0.0.2 not ready, unhealthy",
            ),
            (
                "port not exposed does not define the best tier",
                vec![
                    view("a", "10.0.0.1", 0, vec![PortNotExposed]),
                    view("b", "10.1.0.1", 1, vec![ClusterUnreachable]),
                    view("c", "10.2.0.1", 2, vec![]),
                ],
                1,
                2,
                0,
                vec!["b"],
                "tier 1 unavailable: b/10.1.0.1 cluster unreachable",
            ),
            (
                "best tier looks healthy again by now",
                vec![view("a", "10.0.0.1", 0, vec![]), view("b", "10.1.0.1", 1, vec![])],
                0,
                1,
                0,
                vec!["a"],
                "no endpoint of tier 0 accepted the connection",
            ),
        ];
        for (what, views, best, to, attempts, clusters, reason) in cases {
            let (got_clusters, got_reason) = failover_reason(&views, best, to, attempts);
            let want: Vec<ClusterId> = clusters.iter().map(|c| cid(c)).collect();
            assert_eq!(got_clusters, want, "{what}");
            assert_eq!(got_reason, reason, "{what}");
        }
    }

    fn event(service: &str, reason: &str) -> FailoverEvent {
        let t = jiff::Timestamp::UNIX_EPOCH;
        FailoverEvent {
            at: t,
            last: t,
            count: 1,
            service: service.to_owned(),
            port: 80,
            from_tier: 0,
            from_clusters: vec![cid("a")],
            to_cluster: cid("b"),
            to_endpoint: "10.1.0.1".parse().unwrap(),
            to_tier: 2,
            failed_attempts: 0,
            reason: reason.to_owned(),
        }
    }

    #[test]
    fn failover_ring_merges_repeats_and_keeps_the_newest() {
        let a = Activity::default();
        a.failover(event("ns/x", "r1"));
        let mut later = event("ns/x", "r1");
        later.last = jiff::Timestamp::from_second(5).unwrap();
        a.failover(later);
        a.failover(event("ns/y", "r1"));
        let got = a.failovers();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].service, "ns/y", "newest first");
        assert_eq!(got[1].count, 2);
        assert_eq!(got[1].last.as_second(), 5);
        for i in 0..FAILOVER_HISTORY + 10 {
            a.failover(event(&format!("ns/s{i}"), "r"));
        }
        let got = a.failovers();
        assert_eq!(got.len(), FAILOVER_HISTORY);
        assert_eq!(got[0].service, format!("ns/s{}", FAILOVER_HISTORY + 9));
    }

    #[test]
    fn recording_cost_per_connection() {
        // What every proxied connection pays for the dashboard: one open and one close.
        let a = Arc::new(Activity::default());
        let rounds = 100_000u32;
        let started = std::time::Instant::now();
        for i in 0..rounds {
            let service = format!("ns/s{}", i % 100);
            let g = a.open(service, "east".into(), Arc::new(ByteCounters::default()));
            drop(g);
        }
        let per = started.elapsed() / rounds;
        eprintln!("activity open+close: {per:?} per connection (debug build, 100 services)");
        assert_eq!(a.flows().iter().map(|f| f.connections).sum::<u64>(), u64::from(rounds));
        assert!(per < std::time::Duration::from_micros(100), "{per:?}");
    }

    #[test]
    fn flows_count_live_and_closed_bytes() {
        let a = Arc::new(Activity::default());
        let b1 = Arc::new(ByteCounters::default());
        let g1 = a.open("ns/web".into(), "east".into(), b1.clone());
        let b2 = Arc::new(ByteCounters::default());
        let g2 = a.open("ns/web".into(), "east".into(), b2.clone());
        b1.tx.store(10, Ordering::Relaxed);
        b2.rx.store(7, Ordering::Relaxed);
        let f = &a.flows()[0];
        assert_eq!((f.connections, f.active, f.bytes_tx, f.bytes_rx), (2, 2, 10, 7));
        drop(g1);
        b1.tx.store(999, Ordering::Relaxed); // after close: no longer read
        let f = &a.flows()[0];
        assert_eq!((f.connections, f.active, f.bytes_tx, f.bytes_rx), (2, 1, 10, 7));
        drop(g2);
        let f = &a.flows()[0];
        assert_eq!((f.active, f.bytes_rx), (0, 7));
        a.refused("ns/web".into(), "no_healthy_endpoint");
        a.refused("ns/web".into(), "no_healthy_endpoint");
        assert_eq!(a.refused_counts()[0].connections, 2);
    }
}
