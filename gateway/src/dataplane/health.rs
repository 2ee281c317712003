//! Health that tells the truth: active TCP probes of local endpoints and passive outlier
//! ejection on connect failures.
//!
//! A probe connects straight to the endpoint's own address and port, never through anything
//! the gateway accepts, so a closed port fails it (the Istio 1.12 lesson). The checker
//! publishes a [`HealthMap`] only when some endpoint's health changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fedgate_discovery::model::{
    ClusterId, ClusterState, Health, HealthMap, LocalService, Protocol, ServiceKey,
};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics;

/// Default time between two probes of one endpoint.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Default time a probe's TCP connect may take before it counts as failed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 2;
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 1;

/// Active health check settings (`traffic.healthCheck`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSettings {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failed probes that make a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Consecutive passed probes that make an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            unhealthy_threshold: DEFAULT_UNHEALTHY_THRESHOLD,
            healthy_threshold: DEFAULT_HEALTHY_THRESHOLD,
        }
    }
}

/// Passive outlier detection settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Consecutive connect failures that eject an endpoint.
    pub consecutive_failures: u32,
    /// First ejection time; each further ejection doubles it.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
        }
    }
}

/// The threshold state machine of one endpoint's active checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeCounter {
    pub health: Health,
    ok_streak: u32,
    fail_streak: u32,
}

impl ProbeCounter {
    /// Feeds one probe result and returns the health after it. The first result decides at
    /// once (an endpoint is `Unknown` only until its first probe finished); after that the
    /// thresholds apply.
    pub fn observe(&mut self, ok: bool, settings: &HealthSettings) -> Health {
        if ok {
            self.ok_streak = self.ok_streak.saturating_add(1);
            self.fail_streak = 0;
        } else {
            self.fail_streak = self.fail_streak.saturating_add(1);
            self.ok_streak = 0;
        }
        self.health = match (self.health, ok) {
            (Health::Unknown, true) => Health::Healthy,
            (Health::Unknown, false) => Health::Unhealthy,
            (Health::Healthy, false) if self.fail_streak >= settings.unhealthy_threshold.max(1) => {
                Health::Unhealthy
            }
            (Health::Unhealthy, true) if self.ok_streak >= settings.healthy_threshold.max(1) => {
                Health::Healthy
            }
            (h, _) => h,
        };
        self.health
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct OutlierEntry {
    failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// Passive outlier detection: consecutive connect failures eject an endpoint for
/// `base × 2^k` (k = earlier ejections, capped at `max_ejection`); a success resets the
/// failure count and forgives one earlier ejection.
#[derive(Debug, Default)]
pub struct Outliers {
    settings: OutlierSettings,
    entries: HashMap<(ClusterId, IpAddr), OutlierEntry>,
}

impl Outliers {
    pub fn new(settings: OutlierSettings) -> Self {
        Self { settings, entries: HashMap::new() }
    }

    /// Records a failed connect; returns the ejection time when this failure ejects.
    pub fn record_failure(
        &mut self,
        cluster: &ClusterId,
        address: IpAddr,
        now: Instant,
    ) -> Option<Duration> {
        let entry = self.entries.entry((cluster.clone(), address)).or_default();
        entry.failures = entry.failures.saturating_add(1);
        if entry.failures < self.settings.consecutive_failures.max(1) {
            return None;
        }
        let factor = 2u32.saturating_pow(entry.ejections.min(16));
        let time =
            self.settings.base_ejection.saturating_mul(factor).min(self.settings.max_ejection);
        entry.failures = 0;
        entry.ejections = entry.ejections.saturating_add(1);
        entry.ejected_until = Some(now + time);
        Some(time)
    }

    pub fn record_success(&mut self, cluster: &ClusterId, address: IpAddr) {
        let key = (cluster.clone(), address);
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.failures = 0;
            entry.ejections = entry.ejections.saturating_sub(1);
            if entry.ejections == 0 {
                self.entries.remove(&key);
            }
        }
    }

    pub fn is_ejected(&self, cluster: &ClusterId, address: IpAddr, now: Instant) -> bool {
        self.ejected_for(cluster, address, now).is_some()
    }

    /// How much longer the endpoint stays ejected; `None` when it is not ejected.
    pub fn ejected_for(
        &self,
        cluster: &ClusterId,
        address: IpAddr,
        now: Instant,
    ) -> Option<Duration> {
        self.entries
            .get(&(cluster.clone(), address))
            .and_then(|e| e.ejected_until)
            .filter(|until| now < *until)
            .map(|until| until - now)
    }

    /// Every endpoint ejected at `now`, with the time it stays ejected.
    pub fn ejections(&self, now: Instant) -> Vec<((ClusterId, IpAddr), Duration)> {
        self.entries
            .iter()
            .filter_map(|(k, e)| e.ejected_until.filter(|u| now < *u).map(|u| (k.clone(), u - now)))
            .collect()
    }
}

/// The address a probe of `endpoint` connects to: the endpoint port serving the service's
/// first TCP port. `None` when the service has no TCP port the endpoint serves.
pub fn probe_address(service: &LocalService, address: IpAddr) -> Option<SocketAddr> {
    let endpoint = service.endpoints.iter().find(|e| e.address == address)?;
    service
        .ports
        .iter()
        .filter(|p| p.protocol == Protocol::Tcp)
        .find_map(|p| endpoint.port_for(p))
        .map(|port| SocketAddr::new(address, port))
}

/// Probe targets of the exported local services: (service, endpoint) → socket address.
pub fn probe_targets(state: &ClusterState) -> BTreeMap<(ServiceKey, IpAddr), SocketAddr> {
    let mut out = BTreeMap::new();
    for (key, service) in &state.services {
        if !state.exports.contains_key(key) {
            continue;
        }
        out.extend(service_targets(service));
    }
    out
}

fn service_targets(service: &LocalService) -> Vec<((ServiceKey, IpAddr), SocketAddr)> {
    service
        .endpoints
        .iter()
        .filter_map(|e| {
            probe_address(service, e.address).map(|a| ((service.key.clone(), e.address), a))
        })
        .collect()
}

/// Connects once to `addr`; passes only when the endpoint itself accepted the connection.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> bool {
    probe_detail(addr, timeout).await.is_ok()
}

/// Like [`probe`], with why it failed (`connection refused`, `timed out after 500ms`).
pub async fn probe_detail(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

/// The last probe of one local endpoint (for the dashboard's endpoint table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastProbe {
    /// The address probed (endpoint address and port).
    pub target: SocketAddr,
    /// Wall-clock time the probe finished.
    pub at: jiff::Timestamp,
    pub ok: bool,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// The endpoint's health after this result (thresholds applied).
    pub health: Health,
}

/// The last probe of every probed local endpoint: written by the checker on each result,
/// read by the admin views. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct ProbeLog(Arc<Mutex<HashMap<(ServiceKey, IpAddr), LastProbe>>>);

impl ProbeLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(ServiceKey, IpAddr), LastProbe>> {
        // Entries are whole values; a panic elsewhere cannot leave one half-written.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, key: (ServiceKey, IpAddr), probe: LastProbe) {
        self.lock().insert(key, probe);
    }

    fn forget(&self, key: &(ServiceKey, IpAddr)) {
        self.lock().remove(key);
    }

    /// The last probe of one endpoint of `service`.
    pub fn get(&self, service: &ServiceKey, address: IpAddr) -> Option<LastProbe> {
        self.lock().get(&(service.clone(), address)).cloned()
    }

    /// Every endpoint's last probe, ordered by service and address.
    pub fn snapshot(&self) -> BTreeMap<(ServiceKey, IpAddr), LastProbe> {
        self.lock().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// One probe's outcome as the probe task reports it: which endpoint, the address probed, and
/// why it failed if it did.
type ProbeResult = ((ServiceKey, IpAddr), SocketAddr, Result<(), String>);

struct Target {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// Probes the local endpoints of exported services and publishes their health.
/// How long probe results are collected before one health publish.
const PUBLISH_BATCH_WINDOW: Duration = Duration::from_millis(50);

pub struct HealthChecker {
    settings: HealthSettings,
    cluster: watch::Receiver<Arc<ClusterState>>,
    tx: watch::Sender<Arc<HealthMap>>,
    probes: ProbeLog,
}

impl HealthChecker {
    pub fn new(
        settings: HealthSettings,
        cluster: watch::Receiver<Arc<ClusterState>>,
    ) -> (Self, watch::Receiver<Arc<HealthMap>>) {
        let (tx, rx) = watch::channel(Arc::new(HealthMap::new()));
        (Self { settings, cluster, tx, probes: ProbeLog::default() }, rx)
    }

    /// The last probe of every endpoint, as it happens.
    pub fn probe_log(&self) -> ProbeLog {
        self.probes.clone()
    }

    /// A receiver of the published health (also what `new` returned).
    pub fn subscribe(&self) -> watch::Receiver<Arc<HealthMap>> {
        self.tx.subscribe()
    }

    /// The cluster-state receiver the checker follows.
    pub fn cluster_receiver(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.cluster.clone()
    }

    /// Probes until `shutdown`; follows the cluster state, service by service.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let (results_tx, mut results) = mpsc::channel::<ProbeResult>(1024);
        let mut targets: BTreeMap<(ServiceKey, IpAddr), Target> = BTreeMap::new();
        let mut counters: HashMap<(ServiceKey, IpAddr), ProbeCounter> = HashMap::new();
        let mut seen: BTreeMap<ServiceKey, Arc<LocalService>> = BTreeMap::new();
        let mut map = HealthMap::new();
        let mut cluster_open = true;
        // The cluster state last reconciled: probe results wake this loop far more often than
        // the cluster changes, and a walk over 10k services per probe result is what made
        // single-service propagation slow at scale.
        let mut reconciled: Option<Arc<ClusterState>> = None;
        // Services whose endpoint health changed since the last publish (for the gauges).
        let mut touched: BTreeSet<ServiceKey> = BTreeSet::new();
        loop {
            let state = self.cluster.borrow_and_update().clone();
            let mut changed = false;
            if reconciled.as_ref().is_some_and(|r| Arc::ptr_eq(r, &state)) {
                // Nothing to reconcile; go straight to waiting.
            } else {
                reconciled = Some(state.clone());
                // Services gone or no longer exported.
                let gone: Vec<ServiceKey> = seen
                    .keys()
                    .filter(|k| !state.services.contains_key(*k) || !state.exports.contains_key(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    seen.remove(&key);
                    changed |= self.forget(&key, None, &mut targets, &mut counters, &mut map);
                    metrics::set_endpoint_health(&key.to_string(), 0, 0);
                }
                for (key, service) in &state.services {
                    if !state.exports.contains_key(key) {
                        continue;
                    }
                    if seen.get(key).is_some_and(|old| Arc::ptr_eq(old, service)) {
                        continue;
                    }
                    seen.insert(key.clone(), service.clone());
                    let wanted: BTreeMap<_, _> = service_targets(service).into_iter().collect();
                    changed |=
                        self.forget(key, Some(&wanted), &mut targets, &mut counters, &mut map);
                    for (tkey, addr) in wanted {
                        if targets.get(&tkey).is_some_and(|t| t.addr == addr) {
                            continue;
                        }
                        let task = tokio::spawn(probe_loop(
                            tkey.clone(),
                            addr,
                            self.settings.clone(),
                            results_tx.clone(),
                        ));
                        if let Some(old) = targets.insert(tkey, Target { addr, task }) {
                            old.task.abort();
                        }
                    }
                    touched.insert(key.clone());
                }
            }
            if changed {
                self.publish(&map, &mut touched);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.cluster.changed(), if cluster_open => {
                    if r.is_err() {
                        cluster_open = false;
                    }
                }
                Some(first) = results.recv() => {
                    let batch_until = tokio::time::Instant::now() + PUBLISH_BATCH_WINDOW;
                    let mut changed = false;
                    let mut next = Some(first);
                    while let Some((tkey, addr, result)) = next {
                        if targets.get(&tkey).is_some_and(|t| t.addr == addr) {
                            let counter = counters.entry(tkey.clone()).or_default();
                            let before = counter.health;
                            let after = counter.observe(result.is_ok(), &self.settings);
                            self.probes.record(tkey.clone(), LastProbe {
                                target: addr,
                                at: jiff::Timestamp::now(),
                                ok: result.is_ok(),
                                error: result.err(),
                                health: after,
                            });
                            if before != after {
                                tracing::info!(service = %tkey.0, endpoint = %addr, health = ?after, "endpoint health changed");
                                touched.insert(tkey.0.clone());
                                map.insert(tkey, after);
                                changed = true;
                            }
                        }
                        // Collect the results of a probe round for a moment before publishing:
                        // thousands of endpoints changing together must become a few export
                        // versions, not hundreds that every peer, zone and listener set re-reads.
                        next = match results.try_recv() {
                            Ok(r) => Some(r),
                            Err(_) => tokio::time::timeout_at(batch_until, results.recv())
                                .await
                                .ok()
                                .flatten(),
                        };
                    }
                    if changed {
                        self.publish(&map, &mut touched);
                    }
                }
            }
        }
        for (_, t) in targets {
            t.task.abort();
        }
    }

    /// Stops probing endpoints of `key` that are not in `keep`; true when the map changed.
    fn forget(
        &self,
        key: &ServiceKey,
        keep: Option<&BTreeMap<(ServiceKey, IpAddr), SocketAddr>>,
        targets: &mut BTreeMap<(ServiceKey, IpAddr), Target>,
        counters: &mut HashMap<(ServiceKey, IpAddr), ProbeCounter>,
        map: &mut HealthMap,
    ) -> bool {
        let stale: Vec<(ServiceKey, IpAddr)> = targets
            .range((key.clone(), IpAddr::from([0, 0, 0, 0]))..)
            .take_while(|((k, _), _)| k == key)
            .filter(|(t, _)| keep.is_none_or(|k| !k.contains_key(*t)))
            .map(|(t, _)| t.clone())
            .collect();
        let mut changed = false;
        for t in stale {
            if let Some(old) = targets.remove(&t) {
                old.task.abort();
            }
            counters.remove(&t);
            self.probes.forget(&t);
            changed |= map.remove(&t).is_some();
        }
        changed
    }

    /// Publishes the map and refreshes the health gauges of the `touched` services only.
    fn publish(&self, map: &HealthMap, touched: &mut BTreeSet<ServiceKey>) {
        for key in std::mem::take(touched) {
            let (mut healthy, mut total) = (0, 0);
            for (_, health) in map
                .range((key.clone(), IpAddr::from([0, 0, 0, 0]))..)
                .take_while(|((k, _), _)| *k == key)
            {
                total += 1;
                healthy += usize::from(*health == Health::Healthy);
            }
            metrics::set_endpoint_health(&key.to_string(), healthy, total);
        }
        self.tx.send_replace(Arc::new(map.clone()));
    }
}

async fn probe_loop(
    key: (ServiceKey, IpAddr),
    addr: SocketAddr,
    settings: HealthSettings,
    results: mpsc::Sender<ProbeResult>,
) {
    let mut tick = tokio::time::interval(settings.interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = probe_detail(addr, settings.timeout).await;
        if results.send((key.clone(), addr, result)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_counter_table() {
        let s =
            HealthSettings { unhealthy_threshold: 2, healthy_threshold: 3, ..Default::default() };
        use Health::*;
        let cases: Vec<(&str, Vec<bool>, Health)> = vec![
            ("nothing yet", vec![], Unknown),
            ("first pass decides", vec![true], Healthy),
            ("first fail decides", vec![false], Unhealthy),
            ("one fail below threshold", vec![true, false], Healthy),
            ("two fails", vec![true, false, false], Unhealthy),
            ("fail streak broken", vec![true, false, true, false], Healthy),
            ("recovery needs three", vec![false, true, true], Unhealthy),
            ("recovered", vec![false, true, true, true], Healthy),
            ("recovery streak broken", vec![false, true, true, false, true, true], Unhealthy),
        ];
        for (what, results, want) in cases {
            let mut c = ProbeCounter::default();
            for ok in results {
                c.observe(ok, &s);
            }
            assert_eq!(c.health, want, "{what}");
        }
        let mut c = ProbeCounter::default();
        let zero = HealthSettings { unhealthy_threshold: 0, healthy_threshold: 0, ..s };
        c.observe(true, &zero);
        assert_eq!(c.observe(false, &zero), Unhealthy, "zero thresholds act as 1");
    }

    #[test]
    fn outlier_ejection_grows_and_forgives() {
        let s = OutlierSettings {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(12),
        };
        let mut o = Outliers::new(s);
        let c = ClusterId::new("east").unwrap();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(o.record_failure(&c, a, t0), None);
        assert!(!o.is_ejected(&c, a, t0));
        assert_eq!(o.record_failure(&c, a, t0), Some(Duration::from_secs(5)));
        assert!(o.is_ejected(&c, a, t0 + Duration::from_secs(4)));
        assert!(!o.is_ejected(&c, a, t0 + Duration::from_secs(5)));
        o.record_failure(&c, a, t0);
        assert_eq!(o.record_failure(&c, a, t0), Some(Duration::from_secs(10)));
        o.record_failure(&c, a, t0);
        assert_eq!(o.record_failure(&c, a, t0), Some(Duration::from_secs(12)), "capped");
        // A success resets the streak and forgives one ejection.
        o.record_success(&c, a);
        o.record_failure(&c, a, t0);
        assert_eq!(o.record_failure(&c, a, t0), Some(Duration::from_secs(12)));
        for _ in 0..3 {
            o.record_success(&c, a);
        }
        assert!(o.entries.is_empty(), "fully forgiven entries are dropped");
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(!o.is_ejected(&c, other, t0));
        assert!(o.ejections(t0).is_empty());
        o.record_failure(&c, other, t0);
        o.record_failure(&c, other, t0);
        o.record_failure(&c, other, t0);
        assert_eq!(
            o.ejected_for(&c, other, t0 + Duration::from_secs(2)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(o.ejections(t0), vec![((c.clone(), other), Duration::from_secs(5))]);
        assert_eq!(o.ejected_for(&c, other, t0 + Duration::from_secs(5)), None);
    }

    #[tokio::test]
    async fn probe_fails_on_closed_port_and_passes_on_open() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        assert!(probe(open, Duration::from_millis(500)).await);
        drop(listener);
        assert!(!probe(open, Duration::from_millis(500)).await);
        let err = probe_detail(open, Duration::from_millis(500)).await.unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }
}
