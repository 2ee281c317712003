//! A data lane's send window follows its path: twice the bandwidth-delay product it measures.
//!
//! quinn's send window bounds what a connection holds for its peer, sent and not yet
//! acknowledged as well as written and not yet sent. A fixed window has to be as large as the
//! longest path's bandwidth-delay product (the tunnel's default is 64 MiB), and on a path that
//! is not that long, whenever the gateway's CPU rather than the path is what limits a transfer,
//! the window fills: the proxy reads TCP faster than QUIC can send, and the difference waits in
//! memory. Eight streams through a gateway pair on two cores held 280–390 MB that way
//! (docs/benchmarks.md, session 18), and every byte was copied again once it had left the
//! CPU's caches. The bytes are better left in the client's TCP socket, where they push back on
//! the client. The congestion window is no guide: with no loss to speak of it grows past any
//! path (Cubic reached 44–284 MB on loopback).
//!
//! So, while a lane sends, its window is set every [`BUSY_TICK`] to twice the product of its
//! sending rate and the lowest round-trip time seen in the last [`MIN_RTT_FOR`] (the in-flight
//! target of BBR: what the path holds, and as much again), never below [`MIN_SEND_WINDOW`] and
//! never above the configured window. The rate is measured over a round trip (what was sent
//! since the tick one round trip back), so a window sent in one burst counts as a window per
//! round trip, and is the highest of the last [`RATE_SAMPLES`] such measurements. A lane that
//! its window holds back sends a window per round trip, so the target is twice the window: it
//! doubles per round trip, like slow start, until the path or the CPU stops the rate from
//! rising, and then stays at twice what they carry.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The least send window: a loopback or same-zone path at full speed needs no more, and slow
/// start on any path needs its first round trips to send this much.
pub(crate) const MIN_SEND_WINDOW: u64 = 1 << 20;
/// How often a lane that is sending has its window set again.
const BUSY_TICK: Duration = Duration::from_millis(10);
/// How often an idle lane looks whether it sends again.
const IDLE_TICK: Duration = Duration::from_millis(250);
/// How many of the last rate measurements the window is set from the highest of.
const RATE_SAMPLES: usize = 16;
/// How many busy ticks of the bytes sent are kept, to measure the rate over a round trip: 0.64
/// s at [`BUSY_TICK`] (a longer round trip is measured over that).
const HISTORY: usize = 64;
/// How long the lowest round-trip time seen stays the path's (a route may change).
const MIN_RTT_FOR: Duration = Duration::from_secs(10);

/// The send window for a sending rate (bytes per second) and a round-trip time, under the
/// configured window `max`. Pure.
pub(crate) fn window_for(rate: f64, rtt: Duration, max: u64) -> u64 {
    let bdp = rate * rtt.as_secs_f64();
    // `as` saturates: NaN and negatives to 0, anything too large to u64::MAX.
    ((2.0 * bdp) as u64).clamp(MIN_SEND_WINDOW.min(max), max)
}

/// What a lane's window is set from: its sending rate over a round trip (the highest of the
/// last [`RATE_SAMPLES`] measurements) and the lowest round-trip time of the last
/// [`MIN_RTT_FOR`].
#[derive(Debug)]
pub(crate) struct PathEstimate {
    /// When, and the bytes sent in all by then, at the last [`HISTORY`] busy ticks.
    sent: VecDeque<(Instant, u64)>,
    rates: [f64; RATE_SAMPLES],
    next: usize,
    min_rtt: Option<(Duration, Instant)>,
}

impl PathEstimate {
    pub(crate) fn new() -> Self {
        Self { sent: VecDeque::new(), rates: [0.0; RATE_SAMPLES], next: 0, min_rtt: None }
    }

    /// Takes one tick: `total` bytes sent by `now` since the connection began, its round-trip
    /// time `rtt` then (quinn's smoothed estimate; zero: none yet). Pure.
    pub(crate) fn sample(&mut self, total: u64, rtt: Duration, now: Instant) {
        self.min_rtt = match self.min_rtt {
            Some((min, at)) if min <= rtt && now.duration_since(at) < MIN_RTT_FOR => {
                Some((min, at))
            }
            _ if rtt.is_zero() => self.min_rtt,
            _ => Some((rtt, now)),
        };
        // The rate since the latest tick at least a round trip back; with none that far back,
        // since the oldest once [`HISTORY`] ticks are kept (a longer round trip), else none yet.
        let span = self.min_rtt.map_or(Duration::ZERO, |(rtt, _)| rtt).max(BUSY_TICK);
        let from = self.sent.iter().rev().find(|(at, _)| now.duration_since(*at) >= span);
        let from = from.or(self.sent.front().filter(|_| self.sent.len() == HISTORY));
        if let Some(&(at, bytes)) = from {
            let elapsed = now.duration_since(at);
            if !elapsed.is_zero() {
                self.rates[self.next] = total.saturating_sub(bytes) as f64 / elapsed.as_secs_f64();
                self.next = (self.next + 1) % RATE_SAMPLES;
            }
        }
        if self.sent.len() == HISTORY {
            self.sent.pop_front();
        }
        self.sent.push_back((now, total));
    }

    /// The window for this estimate under the configured window `max`.
    pub(crate) fn window(&self, max: u64) -> u64 {
        let rate = self.rates.iter().copied().fold(0.0, f64::max);
        let rtt = self.min_rtt.map_or(Duration::ZERO, |(rtt, _)| rtt);
        window_for(rate, rtt, max)
    }
}

/// Keeps `conn`'s send window at its path's [`PathEstimate`] until the connection closes,
/// showing it in `shown` (the lane's, for [`crate::peer::ReplicaLink::send_window_bytes`]). Cheap
/// when idle: one look at the connection's counters per [`IDLE_TICK`], and the window stays
/// what it was.
pub(crate) async fn follow_path(conn: quinn::Connection, max: u64, shown: Arc<AtomicU64>) {
    let mut estimate = PathEstimate::new();
    let mut window = estimate.window(max);
    conn.set_send_window(window);
    shown.store(window, Ordering::Relaxed);
    let stats = conn.stats();
    let mut sent = stats.udp_tx.bytes;
    estimate.sample(sent, stats.path.rtt, Instant::now());
    let mut busy = false;
    let closed = conn.closed();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            _ = &mut closed => return,
            _ = tokio::time::sleep(if busy { BUSY_TICK } else { IDLE_TICK }) => {}
        }
        let stats = conn.stats();
        busy = stats.udp_tx.bytes != sent;
        sent = stats.udp_tx.bytes;
        if busy {
            estimate.sample(sent, stats.path.rtt, Instant::now());
            let want = estimate.window(max);
            if want != window {
                conn.set_send_window(want);
                shown.store(want, Ordering::Relaxed);
                window = want;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_window_is_twice_the_bandwidth_delay_product_within_its_bounds() {
        let max = 64 << 20;
        assert_eq!(window_for(0.0, Duration::ZERO, max), MIN_SEND_WINDOW);
        // 1 GB/s over 0.2 ms: 200 kB in flight; the floor.
        assert_eq!(window_for(1e9, MS / 5, max), MIN_SEND_WINDOW);
        // 100 MB/s over 20 ms: 2 MB in flight, twice that.
        assert_eq!(window_for(100e6, 20 * MS, max), 4_000_000);
        assert_eq!(window_for(1e12, 100 * MS, max), max);
        assert_eq!(window_for(f64::NAN, 20 * MS, max), MIN_SEND_WINDOW);
        assert_eq!(window_for(f64::INFINITY, 20 * MS, max), max);
        // A configured window below the floor is kept as configured.
        assert_eq!(window_for(0.0, MS, 256 << 10), 256 << 10);
    }

    #[test]
    fn the_estimate_takes_the_rate_over_a_round_trip_and_the_lowest_recent_round_trip() {
        let max = 64 << 20;
        let t0 = Instant::now();
        let at = |ms: u32| t0 + ms * MS;
        let mut e = PathEstimate::new();
        assert_eq!(e.window(max), MIN_SEND_WINDOW);
        // A lane held back by its 1 MiB window on a 20 ms path: it sends the window in one
        // burst at the start of each round trip. Measured over a tick, the burst would look
        // like 100 MB/s (a 4 MB target at 20 ms); over the round trip it is 50 MB/s, and the
        // target twice the window.
        let mib = 1 << 20;
        e.sample(0, 20 * MS, at(0));
        for tick in 1..=4u32 {
            let total = u64::from(tick.div_ceil(2)) * mib;
            e.sample(total, 20 * MS, at(10 * tick));
        }
        assert_eq!(e.window(max), 2 * mib, "twice the window: it doubles per round trip");
        // A queue builds: the round trip grows, the lowest stays the path's.
        e.sample(3 * mib, 80 * MS, at(50));
        assert_eq!(e.window(max), 2 * mib);
        // Slower round trips do not lower the rate while a faster one is among the last
        // measurements...
        let mut total = 3 * mib;
        let mut now = 50;
        for _ in 0..RATE_SAMPLES - 2 {
            now += 10;
            total += mib / 8;
            e.sample(total, 20 * MS, at(now));
            assert!(e.window(max) >= 2 * mib, "at {now} ms");
        }
        // ...once they have fallen out of them, they do: 1/8 MiB per 10 ms is 1/4 MiB per
        // round trip, a 1/2 MiB target, the floor.
        for _ in 0..RATE_SAMPLES + 2 {
            now += 10;
            total += mib / 8;
            e.sample(total, 20 * MS, at(now));
        }
        assert_eq!(e.window(max), MIN_SEND_WINDOW);
        // A path of 100 ms round trips at 100 MB/s (1 MB per tick): 20 MB.
        let mut e = PathEstimate::new();
        for tick in 0..=20u32 {
            e.sample(u64::from(tick) * 1_000_000, 100 * MS, at(10 * tick));
        }
        assert_eq!(e.window(max), 20_000_000);
        // The lowest round trip is forgotten after MIN_RTT_FOR: the path may have changed.
        let later = MIN_RTT_FOR.as_millis() as u32 + 500;
        for tick in 0..=10u32 {
            e.sample(u64::from(tick) * 1_000_000, 200 * MS, at(later + 10 * tick));
        }
        assert_eq!(e.window(max), max.min(40_000_000));
        // quinn reports no round trip before its first sample: that is no sample.
        e.sample(11_000_000, Duration::ZERO, at(later + 110));
        assert_eq!(e.min_rtt.map(|(rtt, _)| rtt), Some(200 * MS));
    }
}
