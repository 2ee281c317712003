//! One readiness registry per gateway (STYLE 11): every part whose readiness is not settled
//! once it is built registers under a name and holds the [`Guard`]; `/readyz` answers 200 when
//! no registered part is pending, else 503 naming the parts still pending. Today: `discovery`
//! (the cluster source's first full sync) and `listeners` (every ClusterSetIP listener the
//! imports ask for is bound; it goes pending again while one waits for a bind retry).
//!
//! A guard dropped counts as ready, like ztunnel's `BlockReady`: a part that stops does not
//! hold the gateway unready forever; its own failure is reported where it happens.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

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
