//! One readiness registry per gateway (STYLE 11): every part whose readiness is not settled
//! once it is built registers under a name and holds the [`Guard`]; `/readyz` answers 200 when
//! no registered part is pending, else 503 naming the parts still pending. Today: `discovery`
//! (the cluster source's first full sync), `listeners` (every ClusterSetIP listener the
//! imports ask for is bound; it goes pending again while one waits for a bind retry), `peers`
//! (every peer sent its exports once, or [`PEERS_SYNC_BOUND`] passed) and `draining` (pending
//! from SIGTERM on: a replica that drains takes no new clients, so load balancers and
//! Kubernetes endpoints move them to the other replicas).
//!
//! A guard dropped counts as ready, like ztunnel's `BlockReady`: a part that stops does not
//! hold the gateway unready forever; its own failure is reported where it happens.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fedgate_discovery::model::PeerStatus;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The longest a gateway stays unready waiting for peers' first exports: a peer that is down
/// must not keep a new replica out of service.
pub const PEERS_SYNC_BOUND: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Inner {
    next: AtomicU64,
    /// Pending parts: registration id → name.
    pending: Mutex<BTreeMap<u64, String>>,
}

/// The registry. Cheap to clone; every clone is the same registry.
#[derive(Clone, Debug, Default)]
pub struct Ready(Arc<Inner>);

impl Ready {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a part, pending until its guard is marked ready or dropped.
    pub fn register(&self, name: impl Into<String>) -> Guard {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, name.into());
        Guard { ready: self.clone(), id, name: None }
    }

    /// Names of the parts still pending, sorted (empty: ready).
    pub fn pending(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().values().cloned().collect();
        names.sort();
        names.dedup();
        names
    }

    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, String>> {
        // A panic while holding the lock leaves a map that is still usable.
        self.0.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A registered part. Pending while it says so; ready once marked or dropped.
#[derive(Debug)]
pub struct Guard {
    ready: Ready,
    id: u64,
    /// Set while the part is ready (its name, to go back to pending).
    name: Option<String>,
}

impl Guard {
    /// Marks the part ready or pending again (a part whose readiness can be lost: listeners
    /// waiting for a bind retry).
    pub fn set_ready(&mut self, ready: bool) {
        let mut pending = self.ready.lock();
        match (ready, self.name.take()) {
            (true, None) => self.name = pending.remove(&self.id),
            (false, Some(name)) => {
                pending.insert(self.id, name);
            }
            (_, name) => self.name = name,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.name.is_some()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.ready.lock().remove(&self.id);
    }
}

/// Marks `guard` ready once `flag` turns true (a part that reports readiness as a watch
/// flag, like the cluster source's `synced`). Ends then, or when the flag's sender is gone.
pub async fn ready_when(mut guard: Guard, mut flag: watch::Receiver<bool>) {
    if flag.wait_for(|v| *v).await.is_ok() {
        guard.set_ready(true);
    }
}

/// Ready until `drain` is cancelled, pending from then on (`draining`); ends with `stop`.
pub async fn unready_while_draining(
    ready: Ready,
    drain: CancellationToken,
    stop: CancellationToken,
) {
    let mut guard = ready.register("draining");
    guard.set_ready(true);
    tokio::select! {
        _ = drain.cancelled() => guard.set_ready(false),
        _ = stop.cancelled() => return,
    }
    // Held pending until the gateway stops.
    stop.cancelled().await;
}

/// Marks `guard` (`peers`) ready once every peer in `status` has sent its exports once (any
/// replica), or after `bound`, whichever comes first. Without peers: at once.
pub async fn ready_when_peers_synced(
    mut guard: Guard,
    mut status: watch::Receiver<Arc<Vec<PeerStatus>>>,
    bound: Duration,
) {
    let synced = status.wait_for(|s| s.iter().all(|p| p.exports_version.is_some()));
    if tokio::time::timeout(bound, synced).await.is_err() {
        let missing: Vec<String> = status
            .borrow()
            .iter()
            .filter(|p| p.exports_version.is_none())
            .map(|p| p.cluster.to_string())
            .collect();
        tracing::info!(missing = %missing.join(", "), ?bound, "ready without these peers' exports");
    }
    guard.set_ready(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_until_every_part_is_ready() {
        let ready = Ready::new();
        assert!(ready.is_ready(), "nothing registered: ready");
        let mut discovery = ready.register("discovery");
        let mut listeners = ready.register("listeners");
        assert_eq!(ready.pending(), ["discovery", "listeners"]);
        discovery.set_ready(true);
        discovery.set_ready(true);
        assert_eq!(ready.pending(), ["listeners"]);
        listeners.set_ready(true);
        assert!(ready.is_ready() && listeners.is_ready());
        // Readiness lost and regained.
        listeners.set_ready(false);
        listeners.set_ready(false);
        assert_eq!(ready.pending(), ["listeners"]);
        assert!(!listeners.is_ready());
        listeners.set_ready(true);
        assert!(ready.is_ready());
        // A dropped guard counts as ready.
        let other = ready.register("other");
        assert!(!ready.is_ready());
        drop(other);
        assert!(ready.is_ready());
    }

    #[tokio::test]
    async fn unready_from_the_drain_on() {
        let ready = Ready::new();
        let (drain, stop) = (CancellationToken::new(), CancellationToken::new());
        let task = tokio::spawn(unready_while_draining(ready.clone(), drain.clone(), stop.clone()));
        tokio::task::yield_now().await;
        assert!(ready.is_ready(), "serving: ready");
        drain.cancel();
        tokio::time::timeout(Duration::from_secs(5), async {
            while ready.is_ready() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("pending once draining");
        assert_eq!(ready.pending(), ["draining"]);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("ends").expect("ok");
    }

    #[tokio::test]
    async fn ready_when_every_peer_sent_exports_or_after_the_bound() {
        use fedgate_discovery::model::ClusterId;
        let peer = |id: &str, version: Option<u64>| PeerStatus {
            cluster: ClusterId::new(id).expect("valid"),
            address: String::new(),
            connected: version.is_some(),
            draining: false,
            rtt_ms: None,
            path_mtu: None,
            last_seen_secs: None,
            exports_version: version,
            exports_withdrawn: false,
            last_error: None,
            expected_replicas: 1,
            replicas: Vec::new(),
        };
        // Both peers deliver: ready then, well before the bound.
        let ready = Ready::new();
        let (tx, rx) = watch::channel(Arc::new(vec![peer("a", Some(1)), peer("b", None)]));
        let task = tokio::spawn(ready_when_peers_synced(
            ready.register("peers"),
            rx,
            Duration::from_secs(60),
        ));
        tokio::task::yield_now().await;
        assert_eq!(ready.pending(), ["peers"]);
        tx.send_replace(Arc::new(vec![peer("a", Some(1)), peer("b", Some(7))]));
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("ends").expect("ok");
        assert!(ready.is_ready());
        // A peer that never delivers holds readiness only for the bound.
        let (_tx, rx) = watch::channel(Arc::new(vec![peer("a", None)]));
        let started = std::time::Instant::now();
        ready_when_peers_synced(ready.register("peers"), rx, Duration::from_millis(200)).await;
        assert!(ready.is_ready() && started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn ready_when_the_flag_turns_true() {
        let ready = Ready::new();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(ready_when(ready.register("discovery"), rx));
        tokio::task::yield_now().await;
        assert_eq!(ready.pending(), ["discovery"]);
        tx.send_replace(true);
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("ready_when ends once the flag is true")
            .expect("no panic");
        assert!(ready.is_ready());
    }
}
