//! Active-connection tracking and draining (Istio's `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::{Tunnel, metrics};

/// Counts open connections; wakes waiters when the count drops to zero.
#[derive(Clone, Debug, Default)]
pub struct Active(Arc<ActiveInner>);

#[derive(Debug, Default)]
struct ActiveInner {
    count: AtomicUsize,
    zero: Notify,
}

/// One open connection; leaving it (drop) decrements the count.
#[derive(Debug)]
pub struct ActiveGuard(Active);

impl Active {
    pub fn enter(&self) -> ActiveGuard {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.0.count.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub async fn wait_zero(&self) {
        loop {
            let notified = self.0.zero.notified();
            tokio::pin!(notified);
            // Register before checking, so a drop between the check and the await is seen.
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.0.zero.notify_waiters();
        }
    }
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection closed before the deadline.
    Drained { waited: Duration },
    /// The deadline passed with connections still open.
    TimedOut { remaining: usize },
}

/// Stops new connections and waits for open ones. Cloneable; every clone drives the same
/// data plane. Draining is the gateway's one stop signal (a [`CancellationToken`]) at the
/// data plane's level: accept loops select on [`cancelled`](Self::cancelled) like every other
/// long-lived task selects on the token it was handed.
#[derive(Clone)]
pub struct Drain {
    draining: CancellationToken,
    /// Set by the first [`start`](Self::start): it alone logs and tells peers.
    started: Arc<AtomicBool>,
    pub(crate) active: Active,
    tunnel: Option<Arc<dyn Tunnel>>,
}

impl Drain {
    pub(crate) fn new(active: Active, tunnel: Option<Arc<dyn Tunnel>>) -> Self {
        // Exported as 0 from the start, so a dashboard sees the series before any drain.
        metrics::set_draining(false);
        Self { draining: CancellationToken::new(), started: Arc::default(), active, tunnel }
    }

    /// Stops accepting on ClusterSetIP listeners, refuses new tunnel streams and tells peers
    /// this gateway is draining. Existing connections go on. Idempotent.
    pub fn start(&self) {
        if !self.started.swap(true, Ordering::AcqRel) {
            tracing::info!(active = self.active.count(), "data plane draining");
            metrics::set_draining(true);
            if let Some(t) = &self.tunnel {
                t.set_draining(true);
            }
            self.draining.cancel();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// A token cancelled when draining starts, or earlier by its holder (one listener's
    /// accept loop, closed when its import goes).
    pub(crate) fn child_token(&self) -> CancellationToken {
        self.draining.child_token()
    }

    /// Resolves once draining has started.
    pub(crate) fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.draining.cancelled()
    }

    pub fn active(&self) -> usize {
        self.active.count()
    }

    /// Waits until no connection is open or `max` passed, whichever comes first.
    pub async fn wait(&self, max: Duration) -> DrainOutcome {
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(max, self.active.wait_zero()).await {
            Ok(()) => DrainOutcome::Drained { waited: started.elapsed() },
            Err(_) => DrainOutcome::TimedOut { remaining: self.active.count() },
        }
    }

    /// [`start`](Self::start), then [`wait`](Self::wait).
    pub async fn drain(&self, max: Duration) -> DrainOutcome {
        self.start();
        self.wait(max).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_resolves_when_last_guard_drops() {
        let active = Active::default();
        let drain = Drain::new(active.clone(), None);
        // Nothing open: resolves at once.
        assert!(matches!(drain.drain(Duration::from_secs(1)).await, DrainOutcome::Drained { .. }));
        let a = active.enter();
        let b = active.enter();
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.wait(Duration::from_secs(10)).await }
        });
        tokio::task::yield_now().await;
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        let outcome = tokio::time::timeout(Duration::from_secs(2), waiter).await.unwrap().unwrap();
        assert!(
            matches!(outcome, DrainOutcome::Drained { waited } if waited < Duration::from_secs(2))
        );
    }

    #[tokio::test]
    async fn drain_times_out_with_open_connections() {
        let active = Active::default();
        let drain = Drain::new(active.clone(), None);
        let _open = active.enter();
        assert_eq!(
            drain.drain(Duration::from_millis(50)).await,
            DrainOutcome::TimedOut { remaining: 1 }
        );
        assert!(drain.is_draining());
    }
}
