//! The data-plane thread: one OS thread running a current-thread tokio runtime that carries
//! all of a gateway's traffic: the tunnel's UDP socket, quinn's endpoint and connection tasks,
//! the ClusterSetIP listeners and every proxied connection. The rest of the gateway
//! (discovery, the export exchange, DNS, admin) stays on the multi-thread runtime.
//! `traffic.dataPlaneThreads` above 1 makes it a multi-thread runtime of that many workers
//! instead, for many concurrent connections on a machine with cores to spare.
//!
//! Why: a packet passes up to three tasks (quinn's endpoint task, its connection task, the proxy
//! task; since session 9 the vendored quinn skips the connection task while it is idle,
//! vendor/README.md). On the multi-thread runtime they were spread over both workers, so packets
//! woke the other worker through a futex: 3.4 futex calls per proxied 1 KB round trip, 17.6
//! syscalls in all. On this thread the hand-offs are queue pushes: no futex calls, 13.8 syscalls,
//! and iperf3 through the tunnel moves a GB with 7–12 % less CPU (two measurements,
//! docs/benchmarks.md, session 5). quinn drives each peer connection from one task anyway; on two
//! cores a pool of two data-plane workers used more CPU per GB than the old shared runtime, hence
//! one thread by default.

use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How long the thread waits for its tasks to finish dropping when the gateway stops.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
/// How often [`DataLoad::run`] samples the busy time into `fedgate_dataplane_busy_ratio`.
pub const LOAD_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Owns the data-plane thread; dropping it stops the runtime and joins the thread.
pub struct DataThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl DataThread {
    /// Starts the thread (named `fedgate-data`) with its runtime: a current-thread runtime
    /// for `threads == 1`, else a multi-thread runtime of `threads` workers (the thread then
    /// only waits for the stop).
    pub fn start(threads: usize) -> anyhow::Result<Self> {
        let mut builder = if threads > 1 {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(threads).thread_name("fedgate-data");
            b
        } else {
            tokio::runtime::Builder::new_current_thread()
        };
        // Sockets and timers. (With tokio's `signal` and `process` features on, `enable_io`
        // brings their drivers too; signals are still handled on the main runtime.)
        let runtime =
            builder.enable_io().enable_time().build().context("building the data-plane runtime")?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fedgate-data".to_owned())
            .spawn(move || {
                // Spawned tasks run while the thread waits here.
                let _ = runtime.block_on(stopped);
                runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
            })
            .context("starting the data-plane thread")?;
        Ok(Self { handle, stop: Some(stop), thread: Some(thread) })
    }

    /// Spawns onto the data-plane runtime; [`Handle::enter`] makes sockets created outside a
    /// task register with it.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The sampler of how busy the data-plane threads are.
    pub fn load(&self) -> DataLoad {
        DataLoad { handle: self.handle.clone() }
    }
}

/// Reads the data-plane runtime's busy time (tokio's per-worker time spent polling tasks).
#[derive(Clone, Debug)]
pub struct DataLoad {
    handle: Handle,
}

impl DataLoad {
    /// Worker threads of the data-plane runtime.
    pub fn threads(&self) -> usize {
        self.handle.metrics().num_workers()
    }

    /// Time all its workers have spent running tasks since start.
    pub fn busy(&self) -> Duration {
        let metrics = self.handle.metrics();
        (0..metrics.num_workers()).map(|w| metrics.worker_total_busy_duration(w)).sum()
    }

    /// Sets `fedgate_dataplane_busy_ratio` every [`LOAD_SAMPLE_INTERVAL`] until `stop`.
    pub async fn run(self, stop: tokio_util::sync::CancellationToken) {
        let threads = self.threads();
        let mut tick = tokio::time::interval(LOAD_SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = (tokio::time::Instant::now(), self.busy());
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = (tokio::time::Instant::now(), self.busy());
            let ratio = busy_ratio(now.1.saturating_sub(last.1), now.0 - last.0, threads);
            crate::dataplane::metrics::set_dataplane_load(ratio, threads);
            last = now;
        }
    }
}

/// Busy time over `wall` time of `threads` threads, between 0 and 1. Pure.
pub fn busy_ratio(busy: Duration, wall: Duration, threads: usize) -> f64 {
    let capacity = wall.as_secs_f64() * threads.max(1) as f64;
    if capacity <= 0.0 { 0.0 } else { (busy.as_secs_f64() / capacity).clamp(0.0, 1.0) }
}

impl Drop for DataThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the data-plane thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_data_thread_and_drop_stops_it() {
        for threads in [1, 3] {
            runs_tasks_and_stops(threads);
        }
    }

    #[test]
    fn busy_ratio_is_busy_time_over_the_threads_wall_time() {
        let ms = Duration::from_millis;
        for (busy, wall, threads, want) in [
            (ms(0), ms(1000), 1, 0.0),
            (ms(250), ms(1000), 1, 0.25),
            (ms(1000), ms(1000), 2, 0.5),
            (ms(1500), ms(1000), 1, 1.0), // a late sample: never above 1
            (ms(10), ms(0), 1, 0.0),      // no time passed
            (ms(500), ms(1000), 0, 0.5),  // no workers reported: counted as one
        ] {
            assert_eq!(busy_ratio(busy, wall, threads), want, "{busy:?} {wall:?} {threads}");
        }
    }

    #[test]
    fn load_counts_the_time_tasks_run() {
        for threads in [1, 2] {
            let data = DataThread::start(threads).expect("data thread");
            let load = data.load();
            assert_eq!(load.threads(), threads);
            let before = load.busy();
            data.handle().spawn(async {
                let start = std::time::Instant::now();
                while start.elapsed() < Duration::from_millis(30) {
                    std::hint::spin_loop();
                }
            });
            // tokio hands a worker's busy time over when the worker parks.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while load.busy() - before < Duration::from_millis(25) {
                assert!(std::time::Instant::now() < deadline, "busy {:?}", load.busy() - before);
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn runs_tasks_and_stops(threads: usize) {
        let data = DataThread::start(threads).expect("data thread");
        let (tx, rx) = std::sync::mpsc::channel();
        data.handle().spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            tx.send(std::thread::current().name().map(str::to_owned)).expect("send");
        });
        let name = rx.recv_timeout(Duration::from_secs(5)).expect("the task ran");
        assert_eq!(name.as_deref(), Some("fedgate-data"));

        // A task still pending when the thread stops is dropped, not leaked: its channel closes.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        data.handle().spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        drop(data);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
