//! Every metric the data plane records, declared in one place (STYLE rule 7).
//!
//! Labels stay low-cardinality: services, clusters, peers, results and tiers — never client
//! addresses or endpoint IPs. Connections record through [`ConnectionGuard`], which fires on
//! `Drop`, so a connection that ends by error, panic or cancellation is still counted once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

pub const CONNECTIONS_TOTAL: &str = "fedgate_connections_total";
pub const BYTES_TOTAL: &str = "fedgate_bytes_total";
pub const TUNNEL_STREAMS_TOTAL: &str = "fedgate_tunnel_streams_total";
pub const DIRECT_CONNECTIONS_TOTAL: &str = "fedgate_direct_connections_total";
pub const ACTIVE_CONNECTIONS: &str = "fedgate_active_connections";
pub const ENDPOINTS_HEALTHY: &str = "fedgate_endpoints_healthy";
pub const ENDPOINTS_TOTAL: &str = "fedgate_endpoints";
pub const ENDPOINT_EJECTIONS_TOTAL: &str = "fedgate_endpoint_ejections_total";
pub const EJECTIONS_CAPPED_TOTAL: &str = "fedgate_endpoint_ejections_capped_total";
pub const EJECTIONS_ENDED_TOTAL: &str = "fedgate_endpoint_ejections_ended_total";
pub const PANIC_CONNECTIONS_TOTAL: &str = "fedgate_panic_connections_total";
pub const PROBES_INCONCLUSIVE_TOTAL: &str = "fedgate_probes_inconclusive_total";
pub const CONNECTION_LIMIT_HITS_TOTAL: &str = "fedgate_connection_limit_hits_total";
pub const ACCEPT_ERRORS_TOTAL: &str = "fedgate_accept_errors_total";
pub const IDLE_TIMEOUTS_TOTAL: &str = "fedgate_idle_timeouts_total";
pub const FAILOVERS_TOTAL: &str = "fedgate_failovers_total";
pub const DRAINING: &str = "fedgate_draining";
pub const PEER_UP: &str = "fedgate_peer_up";
pub const PEER_RTT_SECONDS: &str = "fedgate_peer_rtt_seconds";
pub const PEER_PATH_MTU_BYTES: &str = "fedgate_peer_path_mtu_bytes";
pub const PEER_SEND_WINDOW_BYTES: &str = "fedgate_peer_send_window_bytes";
pub const PEER_REPLICA_UP: &str = "fedgate_peer_replica_up";
pub const PEER_REPLICA_LEASE_AGE_SECONDS: &str = "fedgate_peer_replica_lease_age_seconds";
pub const PEER_REPLICAS_EXPECTED: &str = "fedgate_peer_replicas_expected";
pub const CONNECT_DURATION_SECONDS: &str = "fedgate_connect_duration_seconds";
pub const LISTENERS: &str = "fedgate_listeners";
pub const LISTENER_BIND_ERRORS_TOTAL: &str = "fedgate_listener_bind_errors_total";
pub const LISTENERS_FAILED: &str = "fedgate_listeners_failed";
pub const DATAPLANE_BUSY_RATIO: &str = "fedgate_dataplane_busy_ratio";
pub const DATAPLANE_THREADS: &str = "fedgate_dataplane_threads";
pub const DATAPLANE_BUSY_POLL_RATIO: &str = "fedgate_dataplane_busy_poll_ratio";

/// Registers help text for every data-plane metric with the installed recorder. Call once
/// after the composition root installed its recorder; recording works without it.
pub fn describe() {
    describe_counter!(
        CONNECTIONS_TOTAL,
        "Client connections to imported services, by service, the cluster that served them \
         (none when no endpoint could be reached) and result (ok, no_healthy_endpoint, \
         connect_failed, reset, error)."
    );
    describe_counter!(
        BYTES_TOTAL,
        Unit::Bytes,
        "Bytes proxied for client connections, by service, target cluster and direction \
         (tx = client to endpoint, rx = endpoint to client)."
    );
    describe_counter!(
        DIRECT_CONNECTIONS_TOTAL,
        "Client connections this gateway connected straight to another cluster's endpoint, \
         without a tunnel stream (traffic.network / peers[].network: flat), by target cluster."
    );
    describe_counter!(
        TUNNEL_STREAMS_TOTAL,
        "Tunnel streams accepted from peer gateways, by peer and result (the status answered: \
         ok, unknown_service, no_healthy_endpoint, forbidden, unsupported_version, malformed, \
         draining)."
    );
    describe_gauge!(
        ACTIVE_CONNECTIONS,
        "Proxied connections open right now (client connections and accepted tunnel streams)."
    );
    describe_gauge!(
        ENDPOINTS_HEALTHY,
        "Local endpoints of an exported service whose active health check passes, by service."
    );
    describe_gauge!(
        ENDPOINTS_TOTAL,
        "Local endpoints of an exported service that are probed, by service."
    );
    describe_counter!(
        ENDPOINT_EJECTIONS_TOTAL,
        "Endpoints ejected by passive outlier detection after consecutive connect failures, by \
         cluster."
    );
    describe_counter!(
        EJECTIONS_CAPPED_TOTAL,
        "Ejections passive outlier detection did not make because the service already had \
         maxEjectionPercent of its endpoints ejected, by cluster."
    );
    describe_counter!(
        EJECTIONS_ENDED_TOTAL,
        "Ejections ended early, by what ended them (probe = a passing active probe, success = a \
         successful connect)."
    );
    describe_counter!(
        PANIC_CONNECTIONS_TOTAL,
        "Connections (client connections and accepted tunnel streams) routed in panic mode: every \
         endpoint of the service was unhealthy or ejected, so they were tried anyway, by service."
    );
    describe_counter!(
        PROBES_INCONCLUSIVE_TOTAL,
        "Active probes that could not run on this gateway (out of file descriptors, buffers or \
         local ports); they leave the endpoint's health unchanged."
    );
    describe_counter!(
        CONNECTION_LIMIT_HITS_TOTAL,
        "Client connections reset at once because a cap of traffic.connections was reached, by \
         service and scope (gateway = traffic.connections.max, service = maxPerService)."
    );
    describe_counter!(
        ACCEPT_ERRORS_TOTAL,
        "Accepts on ClusterSetIP and endpoint VIP listeners that failed (out of file \
         descriptors and the like)."
    );
    describe_counter!(
        IDLE_TIMEOUTS_TOTAL,
        "Client connections closed after traffic.connections.idleTimeout without a byte either way."
    );
    describe_counter!(
        FAILOVERS_TOTAL,
        "Connections served by a worse failover tier than the best-ranked candidate, by service \
         and tiers (from = the first candidate's tier, to = the tier that served)."
    );
    describe_gauge!(
        DRAINING,
        "1 while this gateway drains (after SIGTERM: new connections refused, open ones \
         finishing, peers told), else 0."
    );
    describe_gauge!(
        PEER_UP,
        "1 when the QUIC connection to a peer is up and the peer has not announced draining, \
         else 0, by peer."
    );
    describe_gauge!(
        PEER_REPLICA_UP,
        "1 while the QUIC connection to one replica of a peer is up, else 0, by peer and \
         replica (its address)."
    );
    describe_gauge!(
        PEER_REPLICA_LEASE_AGE_SECONDS,
        Unit::Seconds,
        "Seconds since one replica of a peer was last heard from, by peer and replica; the \
         peer's exports stay imported while any replica's age is under \
         discovery.peerLeaseDuration."
    );
    describe_gauge!(
        PEER_REPLICAS_EXPECTED,
        "Replicas a peer's configured addresses resolve to, by peer (compare with \
         fedgate_peer_replicas_connected)."
    );
    describe_gauge!(
        PEER_RTT_SECONDS,
        Unit::Seconds,
        "Round-trip time of the QUIC connection to a peer (quinn's smoothed estimate), by peer; \
         keeps its last value while the peer is down (read it with fedgate_peer_up)."
    );
    describe_gauge!(
        PEER_PATH_MTU_BYTES,
        Unit::Bytes,
        "Largest UDP payload the QUIC connection to a peer uses now, as found by path MTU \
         discovery (up to tunnel.maxUdpPayloadSize), by peer; keeps its last value while the \
         peer is down."
    );
    describe_gauge!(
        PEER_SEND_WINDOW_BYTES,
        Unit::Bytes,
        "Send windows of the data connections (lanes) to a peer's connected replicas together, \
         by peer: each follows its path (twice the bandwidth-delay product it measures, at \
         least 1 MiB, at most the configured window); keeps its last value while the peer is \
         down."
    );
    describe_histogram!(
        CONNECT_DURATION_SECONDS,
        Unit::Seconds,
        "Time from accepting a client connection to an established upstream (all failover \
         attempts included), by target cluster."
    );
    describe_gauge!(LISTENERS, "ClusterSetIP and endpoint-VIP listeners currently bound.");
    describe_counter!(
        LISTENER_BIND_ERRORS_TOTAL,
        "Failed attempts to bind a ClusterSetIP or endpoint-VIP listener (retried)."
    );
    describe_gauge!(
        LISTENERS_FAILED,
        "ClusterSetIP and endpoint-VIP listeners that could not be bound and wait for a retry \
         with backoff (details on /debug/problems)."
    );
    describe_gauge!(
        DATAPLANE_BUSY_RATIO,
        "Share of the data-plane threads' time spent running tasks over the last second \
         (tunnel packets, listeners, proxied connections): 1 means saturated; raise \
         traffic.dataPlaneThreads or give the gateway more CPU."
    );
    describe_gauge!(DATAPLANE_THREADS, "Threads that carry traffic (traffic.dataPlaneThreads).");
    describe_gauge!(
        DATAPLANE_BUSY_POLL_RATIO,
        "Share of the data-plane thread's time spent busy polling over the last second \
         (traffic.busyPoll; left out of fedgate_dataplane_busy_ratio)."
    );
}

/// Records one proxied client connection when dropped: its result, byte counts and the
/// active-connection gauge.
pub struct ConnectionGuard {
    service: String,
    target_cluster: String,
    result: &'static str,
    pub(crate) bytes: Arc<ByteCounters>,
}

/// Byte counters the copy path updates; read by the guard when the connection ends.
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub tx: AtomicU64,
    pub rx: AtomicU64,
}

impl ConnectionGuard {
    /// Starts counting a connection to `service`; the result is `error` until set.
    pub fn new(service: String) -> Self {
        gauge!(ACTIVE_CONNECTIONS).increment(1.0);
        Self {
            service,
            target_cluster: "none".to_owned(),
            result: "error",
            bytes: Arc::new(ByteCounters::default()),
        }
    }

    pub fn set_target(&mut self, cluster: &str) {
        cluster.clone_into(&mut self.target_cluster);
    }

    pub fn set_result(&mut self, result: &'static str) {
        self.result = result;
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        gauge!(ACTIVE_CONNECTIONS).decrement(1.0);
        counter!(
            CONNECTIONS_TOTAL,
            "service" => self.service.clone(),
            "target_cluster" => self.target_cluster.clone(),
            "result" => self.result
        )
        .increment(1);
        for (direction, n) in [
            ("tx", self.bytes.tx.load(Ordering::Relaxed)),
            ("rx", self.bytes.rx.load(Ordering::Relaxed)),
        ] {
            if n > 0 {
                counter!(
                    BYTES_TOTAL,
                    "service" => self.service.clone(),
                    "target_cluster" => self.target_cluster.clone(),
                    "direction" => direction
                )
                .increment(n);
            }
        }
    }
}

/// Records one accepted tunnel stream when dropped, with the status it was answered.
pub struct StreamGuard {
    peer: String,
    result: &'static str,
}

impl StreamGuard {
    pub fn new(peer: &str) -> Self {
        gauge!(ACTIVE_CONNECTIONS).increment(1.0);
        Self { peer: peer.to_owned(), result: "error" }
    }

    pub fn set_result(&mut self, result: &'static str) {
        self.result = result;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        gauge!(ACTIVE_CONNECTIONS).decrement(1.0);
        counter!(TUNNEL_STREAMS_TOTAL, "peer" => self.peer.clone(), "result" => self.result)
            .increment(1);
    }
}

/// One client connection connected straight to a remote endpoint (flat network mode).
pub fn record_direct(target_cluster: &str) {
    counter!(DIRECT_CONNECTIONS_TOTAL, "target_cluster" => target_cluster.to_owned()).increment(1);
}

pub fn record_failover(service: &str, from_tier: usize, to_tier: usize) {
    counter!(
        FAILOVERS_TOTAL,
        "service" => service.to_owned(),
        "from_tier" => from_tier.to_string(),
        "to_tier" => to_tier.to_string()
    )
    .increment(1);
}

pub fn set_draining(draining: bool) {
    gauge!(DRAINING).set(if draining { 1.0 } else { 0.0 });
}

/// Sets the peer gauges from one peer's status: up, and the RTT, path MTU and send window
/// while connected.
pub fn set_peer(
    peer: &str,
    up: bool,
    rtt: Option<Duration>,
    path_mtu: Option<u16>,
    send_window: Option<u64>,
) {
    gauge!(PEER_UP, "peer" => peer.to_owned()).set(if up { 1.0 } else { 0.0 });
    if let Some(rtt) = rtt {
        gauge!(PEER_RTT_SECONDS, "peer" => peer.to_owned()).set(rtt.as_secs_f64());
    }
    if let Some(mtu) = path_mtu {
        gauge!(PEER_PATH_MTU_BYTES, "peer" => peer.to_owned()).set(f64::from(mtu));
    }
    if let Some(window) = send_window {
        gauge!(PEER_SEND_WINDOW_BYTES, "peer" => peer.to_owned()).set(window as f64);
    }
}

/// One replica of `peer` at `replica` (its address): connected or not, heard from
/// `lease_age` ago.
pub fn set_peer_replica(peer: &str, replica: &str, up: bool, lease_age: Option<Duration>) {
    let labels = [("peer", peer.to_owned()), ("replica", replica.to_owned())];
    gauge!(PEER_REPLICA_UP, &labels).set(if up { 1.0 } else { 0.0 });
    if let Some(age) = lease_age {
        gauge!(PEER_REPLICA_LEASE_AGE_SECONDS, &labels).set(age.as_secs_f64());
    }
}

pub fn set_peer_replicas_expected(peer: &str, expected: usize) {
    gauge!(PEER_REPLICAS_EXPECTED, "peer" => peer.to_owned()).set(expected as f64);
}

pub fn record_connect_duration(target_cluster: &str, elapsed: Duration) {
    histogram!(CONNECT_DURATION_SECONDS, "target_cluster" => target_cluster.to_owned())
        .record(elapsed.as_secs_f64());
}

pub fn record_ejection(cluster: &str) {
    counter!(ENDPOINT_EJECTIONS_TOTAL, "cluster" => cluster.to_owned()).increment(1);
}

pub fn record_ejection_capped(cluster: &str) {
    counter!(EJECTIONS_CAPPED_TOTAL, "cluster" => cluster.to_owned()).increment(1);
}

pub fn record_ejection_ended(by: &'static str) {
    counter!(EJECTIONS_ENDED_TOTAL, "by" => by).increment(1);
}

pub fn record_limit_hit(service: &str, scope: &'static str) {
    counter!(CONNECTION_LIMIT_HITS_TOTAL, "service" => service.to_owned(), "scope" => scope)
        .increment(1);
}

pub fn record_accept_error() {
    counter!(ACCEPT_ERRORS_TOTAL).increment(1);
}

pub fn record_idle_timeout() {
    counter!(IDLE_TIMEOUTS_TOTAL).increment(1);
}

pub fn record_panic(service: &str) {
    counter!(PANIC_CONNECTIONS_TOTAL, "service" => service.to_owned()).increment(1);
}

pub fn record_probe_inconclusive() {
    counter!(PROBES_INCONCLUSIVE_TOTAL).increment(1);
}

pub fn set_endpoint_health(service: &str, healthy: usize, total: usize) {
    gauge!(ENDPOINTS_HEALTHY, "service" => service.to_owned()).set(healthy as f64);
    gauge!(ENDPOINTS_TOTAL, "service" => service.to_owned()).set(total as f64);
}

pub fn set_listeners(n: usize) {
    gauge!(LISTENERS).set(n as f64);
}

pub fn set_listeners_failed(n: usize) {
    gauge!(LISTENERS_FAILED).set(n as f64);
}

pub fn record_bind_error() {
    counter!(LISTENER_BIND_ERRORS_TOTAL).increment(1);
}

pub fn set_dataplane_load(busy_ratio: f64, busy_poll_ratio: f64, threads: usize) {
    gauge!(DATAPLANE_BUSY_RATIO).set(busy_ratio);
    gauge!(DATAPLANE_BUSY_POLL_RATIO).set(busy_poll_ratio);
    gauge!(DATAPLANE_THREADS).set(threads as f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[test]
    fn connection_guard_records_result_and_bytes_on_drop() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let mut guard = ConnectionGuard::new("ns/web".to_owned());
            guard.set_target("west");
            guard.set_result("ok");
            guard.bytes.tx.store(10, Ordering::Relaxed);
            guard.bytes.rx.store(20, Ordering::Relaxed);
        });
        let mut seen = Vec::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let labels: Vec<String> =
                key.key().labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
            seen.push((key.key().name().to_owned(), labels.join(","), value));
        }
        assert!(seen.contains(&(
            CONNECTIONS_TOTAL.to_owned(),
            "service=ns/web,target_cluster=west,result=ok".to_owned(),
            DebugValue::Counter(1)
        )));
        assert!(seen.contains(&(
            BYTES_TOTAL.to_owned(),
            "service=ns/web,target_cluster=west,direction=tx".to_owned(),
            DebugValue::Counter(10)
        )));
        assert!(seen.contains(&(
            BYTES_TOTAL.to_owned(),
            "service=ns/web,target_cluster=west,direction=rx".to_owned(),
            DebugValue::Counter(20)
        )));
    }
}
