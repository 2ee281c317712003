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

/// Default consecutive connect failures that eject an endpoint.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 3;
/// Default length of an endpoint's first ejection; each further episode doubles it.
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(5);
/// Default longest ejection. Also the quiet time after which an endpoint's episode count is
/// forgotten.
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(30);
/// Default share of a service's endpoints that passive ejection may remove (Istio's
/// `maxEjectionPercent` default); at least one endpoint may always be ejected.
pub const DEFAULT_MAX_EJECTION_PERCENT: u8 = 10;

/// Passive outlier detection settings (`traffic.outlierDetection`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Consecutive connect failures that eject an endpoint.
    pub consecutive_failures: u32,
    /// First ejection time; each further episode doubles it.
    pub base_ejection: Duration,
    /// Cap on one ejection, and the quiet time after which the episode count resets.
    pub max_ejection: Duration,
    /// At most this share (percent) of a service's endpoints is ejected at once; always at
    /// least one.
    pub max_ejection_percent: u8,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
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
    /// Consecutive failures since the last success or ejection.
    failures: u32,
    /// Ejection episodes so far (the growth exponent); forgotten after a quiet period.
    episodes: u32,
    /// The running ejection's end; `None` when not ejected.
    ejected_until: Option<Instant>,
    /// When the last ejection ended (ran out, or a passing probe or success ended it).
    last_end: Option<Instant>,
    /// The last failure counted.
    last_failure: Option<Instant>,
}

impl OutlierEntry {
    fn ejected_at(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// Moves an ejection that ran out to `last_end`.
    fn settle(&mut self, now: Instant) {
        if let Some(until) = self.ejected_until.filter(|until| now >= *until) {
            self.ejected_until = None;
            self.last_end = Some(until);
        }
    }

    /// Neither ejected nor counting anything worth keeping: the entry can go.
    fn is_idle(&self, now: Instant, quiet: Duration) -> bool {
        let old = |t: Option<Instant>| t.is_none_or(|t| now.saturating_duration_since(t) >= quiet);
        self.ejected_until.is_none()
            && old(self.last_end)
            && (self.failures == 0 || old(self.last_failure))
    }
}

/// What one failed connect did to its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Counted towards the next ejection.
    Counted,
    /// The endpoint is already ejected: the failure belongs to the running episode.
    AlreadyEjected,
    /// This failure ejected the endpoint for the given time.
    Ejected(Duration),
    /// The failure would eject, but the service already has as many ejected endpoints as
    /// `max_ejection_percent` allows.
    CapReached,
}

/// Passive outlier detection (docs/endpoint-selection.md, "Passive ejection").
///
/// - `consecutive_failures` connect failures eject an endpoint for `base × 2^k`, k = the
///   earlier episodes, capped at `max_ejection`. Failures while it is ejected belong to that
///   episode: they neither extend nor repeat it.
/// - A passing active probe or a successful connect ends an ejection at once.
/// - After `max_ejection` without an ejection the episode count is forgotten.
/// - At most `max_ejection_percent` of a service's endpoints (at least one) are ejected at
///   once; a failure beyond that is counted but does not eject.
///
/// Pure: the clock comes in as `now`.
#[derive(Debug)]
pub struct Outliers {
    settings: OutlierSettings,
    entries: HashMap<(ClusterId, IpAddr), OutlierEntry>,
    /// Entry count at which idle entries are dropped next (doubles with what stays, so
    /// pruning stays amortized O(1) per failure).
    prune_at: usize,
}

/// Entries kept before idle ones are dropped the first time.
const OUTLIER_PRUNE_AT: usize = 1024;

impl Default for Outliers {
    fn default() -> Self {
        Self::new(OutlierSettings::default())
    }
}

impl Outliers {
    pub fn new(settings: OutlierSettings) -> Self {
        Self { settings, entries: HashMap::new(), prune_at: OUTLIER_PRUNE_AT }
    }

    /// How many of `pool` (a service's endpoints, `pool_len` of them) may be ejected at once.
    pub fn allowed_ejections(&self, pool_len: usize) -> usize {
        (pool_len * usize::from(self.settings.max_ejection_percent.min(100)) / 100).max(1)
    }

    /// Records a failed connect to an endpoint of a service whose endpoints are `pool`.
    pub fn record_failure<'a>(
        &mut self,
        cluster: &ClusterId,
        address: IpAddr,
        pool: impl IntoIterator<Item = (&'a ClusterId, IpAddr)>,
        now: Instant,
    ) -> FailureOutcome {
        if self.entries.len() >= self.prune_at {
            let quiet = self.settings.max_ejection;
            self.entries.retain(|_, e| {
                e.settle(now);
                !e.is_idle(now, quiet)
            });
            self.prune_at = (self.entries.len() * 2).max(OUTLIER_PRUNE_AT);
        }
        let key = (cluster.clone(), address);
        let entry = self.entries.entry(key.clone()).or_default();
        entry.settle(now);
        if entry.ejected_at(now) {
            return FailureOutcome::AlreadyEjected;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = Some(now);
        if entry.failures < self.settings.consecutive_failures.max(1) {
            return FailureOutcome::Counted;
        }
        let (mut pool_len, mut ejected) = (0usize, 0usize);
        for (c, a) in pool {
            pool_len += 1;
            if (c, a) != (cluster, address) && self.is_ejected(c, a, now) {
                ejected += 1;
            }
        }
        if ejected >= self.allowed_ejections(pool_len.max(1)) {
            return FailureOutcome::CapReached;
        }
        let quiet = self.settings.max_ejection;
        let Some(entry) = self.entries.get_mut(&key) else { return FailureOutcome::Counted };
        if entry.last_end.is_some_and(|end| now.saturating_duration_since(end) >= quiet) {
            entry.episodes = 0;
        }
        let factor = 2u32.saturating_pow(entry.episodes.min(16));
        let time = self.settings.base_ejection.saturating_mul(factor).min(quiet);
        entry.failures = 0;
        entry.episodes = entry.episodes.saturating_add(1);
        entry.ejected_until = Some(now + time);
        FailureOutcome::Ejected(time)
    }

    /// A successful connect: resets the failure count and ends a running ejection (true when
    /// it ended one).
    pub fn record_success(&mut self, cluster: &ClusterId, address: IpAddr, now: Instant) -> bool {
        self.end(cluster, address, now)
    }

    /// A passing active probe ends a running ejection; true when it ended one.
    pub fn probe_passed(&mut self, cluster: &ClusterId, address: IpAddr, now: Instant) -> bool {
        self.end(cluster, address, now)
    }

    fn end(&mut self, cluster: &ClusterId, address: IpAddr, now: Instant) -> bool {
        let key = (cluster.clone(), address);
        let Some(entry) = self.entries.get_mut(&key) else { return false };
        entry.settle(now);
        entry.failures = 0;
        let ended = entry.ejected_until.take().is_some();
        if ended {
            entry.last_end = Some(now);
        }
        if entry.is_idle(now, self.settings.max_ejection) {
            self.entries.remove(&key);
        }
        ended
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

/// Why a probe did not pass.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The endpoint refused or did not answer.
    #[error("{0}")]
    Failed(String),
    /// The probe could not run on this gateway (no file descriptor, no buffer, no local
    /// port): it says nothing about the endpoint, whose health stays as it was.
    #[error("probe could not run here: {0}")]
    Inconclusive(String),
}

/// True for errors that come from this machine's own resources (file descriptors, memory,
/// socket buffers, local ports), not from the remote side: they must never be held against
/// an endpoint.
pub fn is_local_resource_error(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    if e.kind() == std::io::ErrorKind::OutOfMemory {
        return true;
    }
    e.raw_os_error().is_some_and(|code| {
        [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM, Errno::ADDRNOTAVAIL]
            .iter()
            .any(|errno| errno.raw_os_error() == code)
    })
}

/// Like [`probe`], with why it did not pass (`connection refused`, `timed out after 500ms`,
/// or inconclusive when this gateway could not make the connection at all).
pub async fn probe_detail(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if is_local_resource_error(&e) => Err(ProbeError::Inconclusive(e.to_string())),
        Ok(Err(e)) => Err(ProbeError::Failed(e.to_string())),
        Err(_) => Err(ProbeError::Failed(format!("timed out after {timeout:?}"))),
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
    /// The probe could not run here (EMFILE, ENOBUFS, ...): it did not change the health.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inconclusive: bool,
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
type ProbeResult = ((ServiceKey, IpAddr), SocketAddr, Result<(), ProbeError>);

struct Target {
    addr: SocketAddr,
    /// Stops its probe task. An abort handle, not a child cancellation token: wrapping each
    /// probe loop in `run_until_cancelled` tripled its task (2.5 KB instead of 0.8 KB; 17 MB
    /// more at 10 000 endpoints). A loop also ends once the checker is gone (its results
    /// channel closes).
    task: tokio::task::AbortHandle,
}

/// Probes the local endpoints of exported services and publishes their health.
/// How long probe results are collected before one health publish.
const PUBLISH_BATCH_WINDOW: Duration = Duration::from_millis(50);

pub struct HealthChecker {
    settings: HealthSettings,
    cluster: watch::Receiver<Arc<ClusterState>>,
    tx: watch::Sender<Arc<HealthMap>>,
    probes: ProbeLog,
    /// Called with the address of every endpoint whose probe passed (ends its ejection).
    on_pass: Option<PassHook>,
}

/// What [`HealthChecker::on_probe_pass`] calls.
pub type PassHook = Arc<dyn Fn(IpAddr) + Send + Sync>;

impl HealthChecker {
    pub fn new(
        settings: HealthSettings,
        cluster: watch::Receiver<Arc<ClusterState>>,
    ) -> (Self, watch::Receiver<Arc<HealthMap>>) {
        let (tx, rx) = watch::channel(Arc::new(HealthMap::new()));
        (Self { settings, cluster, tx, probes: ProbeLog::default(), on_pass: None }, rx)
    }

    /// Calls `hook` with the endpoint address after every passing probe.
    pub fn on_probe_pass(&mut self, hook: PassHook) {
        self.on_pass = Some(hook);
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
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_PROBES_IN_FLIGHT));
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
                        let probe = probe_loop(
                            tkey.clone(),
                            addr,
                            self.settings.clone(),
                            results_tx.clone(),
                            permits.clone(),
                        );
                        let task = tokio::spawn(probe).abort_handle();
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
                    let mut health_log = HealthChanges::default();
                    let mut next = Some(first);
                    while let Some((tkey, addr, result)) = next {
                        if targets.get(&tkey).is_some_and(|t| t.addr == addr) {
                            let counter = counters.entry(tkey.clone()).or_default();
                            let before = counter.health;
                            let inconclusive = matches!(result, Err(ProbeError::Inconclusive(_)));
                            let after = if inconclusive {
                                metrics::record_probe_inconclusive();
                                tracing::debug!(service = %tkey.0, endpoint = %addr, "probe could not run here; health unchanged");
                                before
                            } else {
                                counter.observe(result.is_ok(), &self.settings)
                            };
                            if result.is_ok()
                                && let Some(hook) = &self.on_pass
                            {
                                hook(tkey.1);
                            }
                            self.probes.record(tkey.clone(), LastProbe {
                                target: addr,
                                at: jiff::Timestamp::now(),
                                ok: result.is_ok(),
                                error: result.err().map(|e| e.to_string()),
                                inconclusive,
                                health: after,
                            });
                            if before != after {
                                tracing::debug!(service = %tkey.0, endpoint = %addr, health = ?after, "endpoint health changed");
                                health_log.note(&tkey, addr, after);
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
                    health_log.log();
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

/// The health changes of one batch of probe results, logged as one line: thousands of
/// endpoints failing together (a backend network down, 10k unreachable endpoints at start)
/// must not write thousands of lines. Each change is at `debug` too.
#[derive(Default)]
struct HealthChanges {
    healthy: usize,
    unhealthy: usize,
    /// The first few changes, for the log line.
    examples: Vec<String>,
}

impl HealthChanges {
    const EXAMPLES: usize = 3;

    fn note(&mut self, key: &(ServiceKey, IpAddr), addr: SocketAddr, health: Health) {
        match health {
            Health::Healthy => self.healthy += 1,
            _ => self.unhealthy += 1,
        }
        if self.examples.len() < Self::EXAMPLES {
            self.examples.push(format!("{} {addr} {health:?}", key.0));
        }
    }

    fn log(&self) {
        let total = self.healthy + self.unhealthy;
        if total == 0 {
            return;
        }
        let more = total.saturating_sub(self.examples.len());
        tracing::info!(
            healthy = self.healthy,
            unhealthy = self.unhealthy,
            examples = %self.examples.join(", "),
            more,
            "endpoint health changed"
        );
    }
}

/// Probes running at once on one gateway. Each holds a socket for up to the probe timeout,
/// so 20 000 endpoints that do not answer would otherwise hold 10 000 descriptors at a time
/// and starve everything else of them (and of CPU). Over the limit probes wait their turn:
/// the interval stretches rather than the gateway falling over.
pub const MAX_PROBES_IN_FLIGHT: usize = 256;

async fn probe_loop(
    key: (ServiceKey, IpAddr),
    addr: SocketAddr,
    settings: HealthSettings,
    results: mpsc::Sender<ProbeResult>,
    permits: Arc<tokio::sync::Semaphore>,
) {
    let period = settings.interval.max(Duration::from_millis(10));
    // The first probe at once; the next ones at a random phase of the interval, so that
    // thousands of endpoints do not all probe in the same millisecond of every second.
    let phase = period.mul_f64(rand::random::<f64>());
    let mut tick = tokio::time::interval_at(Instant::now() + phase, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tick.tick().await;
        }
        // Boxed: the probe's state (socket, connect and timer futures, ~380 bytes) lives
        // only while it runs, not in each of the 10 000 waiting loops.
        let result = {
            let Ok(_permit) = permits.acquire().await else { return };
            Box::pin(probe_detail(addr, settings.timeout)).await
        };
        // Reserve, then send: a `send` future holds the value while it waits, and would be
        // the largest state of the loop (424 bytes of its 784).
        let Ok(slot) = results.reserve().await else { return };
        slot.send((key.clone(), addr, result));
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

    fn outliers(percent: u8) -> Outliers {
        Outliers::new(OutlierSettings {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(12),
            max_ejection_percent: percent,
        })
    }

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    /// A pool of `n` endpoints 10.0.0.1.. in cluster `c`.
    fn pool(c: &ClusterId, n: u8) -> Vec<(&ClusterId, IpAddr)> {
        (1..=n).map(|i| (c, addr(i))).collect()
    }

    #[test]
    fn one_ejection_per_episode_growing_per_episode_capped() {
        use FailureOutcome::*;
        let mut o = outliers(100);
        let c = ClusterId::new("east").unwrap();
        let a = addr(1);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(o.record_failure(&c, a, pool(&c, 1), t0), Counted);
        assert!(!o.is_ejected(&c, a, t0));
        assert_eq!(o.record_failure(&c, a, pool(&c, 1), t0), Ejected(Duration::from_secs(5)));
        // The finding of issue 17: a burst of failures while ejected (80 clients against a
        // stopped server) ejected again and doubled the time 25 times, up to 300 s. They
        // belong to the running episode.
        for _ in 0..80 {
            assert_eq!(o.record_failure(&c, a, pool(&c, 1), at(1)), AlreadyEjected);
        }
        assert_eq!(o.ejected_for(&c, a, at(1)), Some(Duration::from_secs(4)));
        assert!(!o.is_ejected(&c, a, at(5)), "the first episode lasts base_ejection");
        // The next episode, right after: twice as long; the one after that is capped.
        o.record_failure(&c, a, pool(&c, 1), at(5));
        assert_eq!(o.record_failure(&c, a, pool(&c, 1), at(5)), Ejected(Duration::from_secs(10)));
        o.record_failure(&c, a, pool(&c, 1), at(15));
        assert_eq!(o.record_failure(&c, a, pool(&c, 1), at(15)), Ejected(Duration::from_secs(12)));
        // Quiet for max_ejection after the last episode ended (at 27 s): the count is
        // forgotten and the next ejection is base_ejection again.
        o.record_failure(&c, a, pool(&c, 1), at(39));
        assert_eq!(o.record_failure(&c, a, pool(&c, 1), at(39)), Ejected(Duration::from_secs(5)));
    }

    #[test]
    fn a_passing_probe_or_a_success_ends_an_ejection() {
        let mut o = outliers(100);
        let c = ClusterId::new("east").unwrap();
        let (a, b) = (addr(1), addr(2));
        let t0 = Instant::now();
        for _ in 0..2 {
            o.record_failure(&c, a, pool(&c, 2), t0);
            o.record_failure(&c, b, pool(&c, 2), t0);
        }
        assert!(o.is_ejected(&c, a, t0) && o.is_ejected(&c, b, t0));
        assert!(o.probe_passed(&c, a, t0 + Duration::from_secs(1)));
        assert!(!o.is_ejected(&c, a, t0 + Duration::from_secs(1)), "probe ended it");
        assert!(!o.probe_passed(&c, a, t0 + Duration::from_secs(2)), "nothing left to end");
        assert!(o.record_success(&c, b, t0 + Duration::from_secs(1)));
        assert!(o.ejections(t0 + Duration::from_secs(1)).is_empty());
        // The episode count survives the early end: the next ejection is longer.
        o.record_failure(&c, a, pool(&c, 2), t0 + Duration::from_secs(2));
        assert_eq!(
            o.record_failure(&c, a, pool(&c, 2), t0 + Duration::from_secs(2)),
            FailureOutcome::Ejected(Duration::from_secs(10))
        );
        // A success resets the failure streak.
        let d = addr(3);
        o.record_failure(&c, d, pool(&c, 3), t0);
        o.record_success(&c, d, t0);
        assert_eq!(o.record_failure(&c, d, pool(&c, 3), t0), FailureOutcome::Counted);
    }

    #[test]
    fn max_ejection_percent_caps_the_share_of_a_service() {
        use FailureOutcome::*;
        let c = ClusterId::new("east").unwrap();
        let t0 = Instant::now();
        // (what, percent, pool size, endpoints failing, ejected, capped)
        let cases: Vec<(&str, u8, u8, u8, usize, usize)> = vec![
            ("10% of 3: one may go", 10, 3, 3, 1, 2),
            ("10% of 20: two may go", 10, 20, 5, 2, 3),
            ("50% of 4: two", 50, 4, 4, 2, 2),
            ("100%: all", 100, 4, 4, 4, 0),
            ("0% still allows one", 0, 4, 2, 1, 1),
            ("a single endpoint may always be ejected", 10, 1, 1, 1, 0),
        ];
        for (what, percent, size, failing, want_ejected, want_capped) in cases {
            let mut o = outliers(percent);
            let (mut ejected, mut capped) = (0, 0);
            for i in 1..=failing {
                for _ in 0..2 {
                    match o.record_failure(&c, addr(i), pool(&c, size), t0) {
                        Ejected(_) => ejected += 1,
                        CapReached => capped += 1,
                        Counted | AlreadyEjected => {}
                    }
                }
            }
            assert_eq!((ejected, capped), (want_ejected, want_capped), "{what}");
            assert_eq!(o.ejections(t0).len(), want_ejected, "{what}");
        }
    }

    #[test]
    fn idle_entries_are_dropped() {
        let mut o = outliers(100);
        let c = ClusterId::new("east").unwrap();
        let t0 = Instant::now();
        let ip = |i: u32| IpAddr::from(i.to_be_bytes());
        // Endpoints that failed once and went away (pods replaced) must not pile up.
        for i in 0..1024 {
            o.record_failure(&c, ip(i), [(&c, ip(i))], t0);
        }
        assert_eq!(o.entries.len(), 1024);
        let later = t0 + Duration::from_secs(13);
        o.record_failure(&c, ip(5000), [(&c, ip(5000))], later);
        assert_eq!(o.entries.len(), 1, "stale single failures are pruned");
        // A success drops an entry with nothing left to track at once.
        o.record_success(&c, ip(5000), later);
        assert!(o.entries.is_empty());
    }

    /// One probe loop runs per local endpoint, spawned as it is: its size is most of the
    /// checker's memory per endpoint (issue 20: 10 000 endpoints whose probes fail). This
    /// guards the loop only; the 2.5 KB that `run_until_cancelled_owned` added around it at
    /// the spawn (see `Target::task`) is kept out by the code there, not by this test.
    #[test]
    fn a_probe_loop_is_small() {
        let (tx, _rx) = mpsc::channel(1);
        let key = (ServiceKey::new("ns", "svc"), addr(1));
        let sock = SocketAddr::new(addr(1), 80);
        let permits = Arc::new(tokio::sync::Semaphore::new(1));
        let fut = probe_loop(key, sock, HealthSettings::default(), tx, permits);
        let size = std::mem::size_of_val(&fut);
        // Debug build: 784 bytes before the probe was boxed and the send split, 528 after.
        assert!(size <= 600, "a probe loop holds {size} bytes");
    }

    #[tokio::test]
    async fn probe_fails_on_closed_port_and_passes_on_open() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        assert!(probe(open, Duration::from_millis(500)).await);
        drop(listener);
        assert!(!probe(open, Duration::from_millis(500)).await);
        let err = probe_detail(open, Duration::from_millis(500)).await.unwrap_err();
        assert!(matches!(&err, ProbeError::Failed(e) if e.contains("refused")), "{err}");
    }
}
