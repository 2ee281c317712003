//! The data-plane threads: OS threads each running a current-thread tokio runtime, which
//! together carry all of a gateway's traffic: the tunnel's UDP socket, quinn's endpoint and
//! connection tasks, the ClusterSetIP listeners and every proxied connection. The rest of the
//! gateway (discovery, the export exchange, DNS, admin) stays on the multi-thread runtime.
//! `traffic.dataPlaneThreads` sets how many (default: the CPUs the gateway may use).
//!
//! Why threads of their own: a packet passes up to three tasks (quinn's endpoint task, its
//! connection task, the proxy task). On a multi-thread runtime they were spread over the
//! workers, so packets woke another worker through a futex: 3.4 futex calls per proxied 1 KB
//! round trip, 17.6 syscalls in all. With the three on one thread the hand-offs are queue
//! pushes: no futex calls, 13.8 syscalls, and 7–12 % less CPU per GB (docs/benchmarks.md,
//! session 5); a multi-thread pool of two workers used more CPU per GB than one thread.
//!
//! Why several: quinn drives each connection from one task, so one connection is bound to one
//! core. Each thread therefore gets its own connection to every peer replica (a lane,
//! `fedgate_tunnel`'s `lanes`), a proxied connection is handed to one thread and its stream
//! opened on that thread's lane, and the peer serves the stream on the thread its end of the
//! lane runs on. Each thread reads a socket of its own at the tunnel port, and the kernel
//! steers each packet to the socket of its connection's thread (`fedgate_tunnel`'s `steer`).
//! What still crosses threads: the listeners accept on the first thread and hand each
//! connection to one thread (once per connection). docs/decisions.md has the design for many
//! cores.
//!
//! With `traffic.busyPoll` each thread polls for a while after its traffic instead of sleeping
//! at once (`busy_poll_task`): lower latency where idle CPUs halt, for CPU.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long the thread waits for its tasks to finish dropping when the gateway stops.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
/// How often [`DataLoad::run`] samples the busy time into `fedgate_dataplane_busy_ratio`.
pub const LOAD_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

thread_local! {
    /// Reads and writes that moved bytes on this thread ([`mark_activity`]); only its changes
    /// matter.
    static ACTIVITY: Cell<u64> = const { Cell::new(0) };
}

/// Records that the data plane moved bytes on this thread (a proxied connection or tunnel
/// stream); the busy poller keeps polling for `traffic.busyPoll` after the last such mark.
/// One thread-local increment: free when busy polling is off. The copy loops reach it only
/// through the hook [`DataThread::activity_hook`] hands them.
pub fn mark_activity() {
    ACTIVITY.with(|a| a.set(a.get().wrapping_add(1)));
}

fn activity() -> u64 {
    ACTIVITY.with(Cell::get)
}

/// Wakes the sleeping busy poller when the thread comes back from a blocking wait.
#[derive(Default)]
struct Poller {
    asleep: AtomicBool,
    wake: Notify,
    /// Wall time of the busy poll's rounds that moved no bytes, left out of the busy ratio
    /// ([`traffic_busy`]).
    polled_ns: AtomicU64,
}

impl Poller {
    /// tokio's `on_thread_unpark` hook: runs on the data thread, in its runtime's context,
    /// after every blocking wait (never after the zero-timeout polls of a busy poll).
    fn unparked(&self) {
        if self.asleep.swap(false, Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }
}

/// Busy polling (`traffic.busyPoll`). A thread that blocks in `epoll_wait` while its CPU has
/// nothing else to run lets the CPU idle; a virtual CPU then halts, and the next packet waits
/// for the hypervisor to wake it: about 20–30 µs per wake on the benchmark VM, twice per proxied
/// round trip (docs/benchmarks.md, session 10). While the data plane moved bytes within the
/// last `window`, this task keeps the thread awake instead: it yields to tokio, which then
/// polls its driver with a zero timeout and runs what that woke, and then calls
/// `sched_yield`, which hands the CPU to any other runnable thread on it (the client or
/// server this gateway proxies for, on a shared machine) and returns at once if there is none.
/// After `window` without bytes it sleeps until the thread next wakes from a blocking wait,
/// and goes back to sleep at once if that wake moved no bytes (a timer). An idle gateway
/// therefore costs one extra task poll per wake-up; a busy one, the polling while it waits.
async fn busy_poll_task(window: Duration, poller: Arc<Poller>) {
    loop {
        let seen = activity();
        poller.asleep.store(true, Ordering::Relaxed);
        poller.wake.notified().await;
        // The tasks the wake-up scheduled ran before this one.
        if activity() == seen {
            continue;
        }
        let (mut seen, mut last) = (activity(), Instant::now());
        let mut prev = last;
        loop {
            tokio::task::yield_now().await;
            let (now, moved) = (Instant::now(), activity());
            if moved != seen {
                (seen, last) = (moved, now);
            } else if now.duration_since(last) >= window {
                break;
            } else {
                // A round that moved no bytes: all of it was polling.
                let ns = u64::try_from((now - prev).as_nanos()).unwrap_or(u64::MAX);
                poller.polled_ns.fetch_add(ns, Ordering::Relaxed);
            }
            prev = now;
            std::thread::yield_now();
        }
    }
}

/// Owns the data-plane threads; dropping it stops their runtimes and joins the threads.
pub struct DataThread {
    handles: Vec<Handle>,
    pollers: Vec<Arc<Poller>>,
    /// Cancelled on drop: the threads' runtimes stop.
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl DataThread {
    /// Starts `threads` data-plane threads (named `fedgate-data-<n>`), each with a
    /// current-thread runtime of its own. Each knows its number
    /// ([`fedgate_tunnel::runtime::set_current_shard`]): the tunnel places a peer connection
    /// (lane) on each, and a proxied connection is served on the thread of the lane that
    /// carries it. A non-zero `busy_poll` makes each thread poll for that long after it last
    /// moved bytes before it sleeps (`busy_poll_task`).
    pub fn start(threads: usize, busy_poll: Duration) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let mut data = Self { handles: Vec::new(), pollers: Vec::new(), stop, threads: Vec::new() };
        for shard in 0..threads.max(1) {
            let mut builder = tokio::runtime::Builder::new_current_thread();
            // Sockets and timers. (With tokio's `signal` and `process` features on,
            // `enable_io` brings their drivers too; signals are still handled on the main
            // runtime.)
            builder.enable_io().enable_time();
            let poller = (!busy_poll.is_zero()).then(|| Arc::new(Poller::default()));
            if let Some(poller) = &poller {
                let poller = poller.clone();
                builder.on_thread_unpark(move || poller.unparked());
            }
            let runtime = builder.build().context("building a data-plane runtime")?;
            let handle = runtime.handle().clone();
            if let Some(poller) = poller {
                handle.spawn(busy_poll_task(busy_poll, poller.clone()));
                data.pollers.push(poller);
            }
            let stopped = data.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("fedgate-data-{shard}"))
                .spawn(move || {
                    fedgate_tunnel::runtime::set_current_shard(shard);
                    // Spawned tasks run while the thread waits here.
                    runtime.block_on(stopped.cancelled());
                    runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
                })
                .context("starting a data-plane thread")?;
            data.handles.push(handle);
            data.threads.push(thread);
        }
        Ok(data)
    }

    /// The first data-plane thread's runtime (the tunnel's UDP socket, the listeners);
    /// [`Handle::enter`] makes sockets created outside a task register with it.
    pub fn handle(&self) -> &Handle {
        &self.handles[0]
    }

    /// Every data-plane thread's runtime, the first first.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// The hook the data plane's copy loops call when they move bytes
    /// ([`DataPlaneSettings::activity`](crate::dataplane::DataPlaneSettings)): marks activity
    /// for the busy poller of the thread it runs on.
    pub fn activity_hook(&self) -> crate::dataplane::ActivityHook {
        crate::dataplane::ActivityHook::new(mark_activity)
    }

    /// The sampler of how busy the data-plane threads are.
    pub fn load(&self) -> DataLoad {
        DataLoad { handles: self.handles.clone(), pollers: self.pollers.clone() }
    }
}

/// Reads the data-plane runtimes' busy time (tokio's time spent polling tasks) and the busy
/// polls' polling time.
#[derive(Clone)]
pub struct DataLoad {
    handles: Vec<Handle>,
    pollers: Vec<Arc<Poller>>,
}

impl DataLoad {
    /// Data-plane threads.
    pub fn threads(&self) -> usize {
        self.handles.len()
    }

    /// Time all the threads have spent running tasks since start, the busy polls' included
    /// (see [`traffic_busy`]).
    pub fn busy(&self) -> Duration {
        self.handles
            .iter()
            .map(|h| {
                let metrics = h.metrics();
                (0..metrics.num_workers())
                    .map(|w| metrics.worker_total_busy_duration(w))
                    .sum::<Duration>()
            })
            .sum()
    }

    /// Time the busy polls have spent polling without moving bytes (`traffic.busyPoll`) since
    /// start.
    pub fn polled(&self) -> Duration {
        self.pollers.iter().map(|p| Duration::from_nanos(p.polled_ns.load(Ordering::Relaxed))).sum()
    }

    /// Sets `fedgate_dataplane_busy_ratio` every [`LOAD_SAMPLE_INTERVAL`] until `stop`.
    pub async fn run(self, stop: tokio_util::sync::CancellationToken) {
        let threads = self.threads();
        let mut tick = tokio::time::interval(LOAD_SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = (tokio::time::Instant::now(), self.busy(), self.polled());
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = (tokio::time::Instant::now(), self.busy(), self.polled());
            let (busy, polled) = (now.1.saturating_sub(last.1), now.2.saturating_sub(last.2));
            let ratio = busy_ratio(traffic_busy(busy, polled), now.0 - last.0, threads);
            let polling = busy_ratio(polled, now.0 - last.0, threads);
            crate::dataplane::metrics::set_dataplane_load(ratio, polling, threads);
            last = now;
        }
    }
}

/// The part of an interval's busy time spent on traffic: tokio's busy time less the busy
/// poll's rounds that moved no bytes. Those rounds' wall time includes tokio's zero-timeout
/// driver polls, which tokio does not count as busy, so the difference may go below zero: it
/// is clamped per interval, so that a long poll cannot hide the work of later intervals.
/// Pure.
pub fn traffic_busy(busy: Duration, polled: Duration) -> Duration {
    busy.saturating_sub(polled)
}

/// Busy time over `wall` time of `threads` threads, between 0 and 1. Pure.
pub fn busy_ratio(busy: Duration, wall: Duration, threads: usize) -> f64 {
    let capacity = wall.as_secs_f64() * threads.max(1) as f64;
    if capacity <= 0.0 { 0.0 } else { (busy.as_secs_f64() / capacity).clamp(0.0, 1.0) }
}

impl Drop for DataThread {
    fn drop(&mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a data-plane thread panicked");
            }
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
            let data = DataThread::start(threads, Duration::ZERO).expect("data thread");
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

    /// Time the busy poll spends polling during `wall` from now.
    fn polled_during(load: &DataLoad, wall: Duration) -> Duration {
        let before = load.polled();
        std::thread::sleep(wall);
        load.polled() - before
    }

    #[test]
    fn busy_polling_follows_moved_bytes_and_sleeps_after_the_window() {
        use std::io::Write;
        let window = Duration::from_millis(300);
        let data = DataThread::start(1, window).expect("data thread");
        let load = data.load();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        server.set_nonblocking(true).expect("nonblocking");
        let (read_tx, read_rx) = std::sync::mpsc::channel();
        // A reader that marks each read, as the proxy does, and a timer that wakes the thread
        // every 5 ms without moving bytes.
        data.handle().spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut server = tokio::net::TcpStream::from_std(server).expect("register");
            let mut buf = [0u8; 64];
            while server.read(&mut buf).await.expect("read") > 0 {
                mark_activity();
                read_tx.send(()).expect("send");
            }
        });
        data.handle().spawn(async {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let ms = Duration::from_millis;

        // Timer wake-ups alone never start a poll: the thread sleeps between them.
        let idle = polled_during(&load, ms(200));
        assert_eq!(idle, Duration::ZERO, "timer wake-ups only, yet the thread polled");

        // A read starts one: the thread keeps polling although nothing else happens. (How
        // much CPU that takes depends on the machine's load: it yields to every other
        // runnable thread.)
        client.write_all(b"x").expect("write");
        read_rx.recv_timeout(Duration::from_secs(5)).expect("the byte was read");
        let polling = polled_during(&load, ms(150));
        assert!(polling > Duration::ZERO, "no polling within the window after a read");
        // While it polls, its time is not counted as busy (tokio counts part of it).
        let (busy, polled) = (load.busy(), load.polled());
        std::thread::sleep(ms(50));
        let (busy, polled) = (load.busy() - busy, load.polled() - polled);
        assert!(busy > Duration::ZERO, "tokio counted none of the polling as busy");
        assert_eq!(traffic_busy(busy, polled), Duration::ZERO, "{busy:?} busy, {polled:?} polled");

        // After the window without reads it sleeps again, timer wake-ups notwithstanding.
        std::thread::sleep(window);
        let after = polled_during(&load, ms(200));
        assert_eq!(after, Duration::ZERO, "still polling past the window");

        // Stopping the thread while it polls: the poll is a task like any other.
        client.write_all(b"y").expect("write");
        read_rx.recv_timeout(Duration::from_secs(5)).expect("the byte was read");
        assert!(polled_during(&load, ms(20)) > Duration::ZERO, "polling again");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(data);
            done_tx.send(()).expect("send");
        });
        done_rx.recv_timeout(Duration::from_secs(5)).expect("the thread stops while polling");
    }

    fn runs_tasks_and_stops(threads: usize) {
        let data = DataThread::start(threads, Duration::ZERO).expect("data thread");
        let (tx, rx) = std::sync::mpsc::channel();
        data.handle().spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            tx.send(std::thread::current().name().map(str::to_owned)).expect("send");
        });
        let name = rx.recv_timeout(Duration::from_secs(5)).expect("the task ran");
        assert!(name.as_deref().is_some_and(|n| n.starts_with("fedgate-data-")), "{name:?}");

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
