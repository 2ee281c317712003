//! Metrics of the kube source and writer (names prefixed `fedgate_kube_`) and of the leader
//! election (`fedgate_leader`), documented in docs/metrics.md.

/// Counter: writes to the API server, by `kind` (ServiceImport, EndpointSlice, Service,
/// ServiceExport), `op` (`apply`, `delete`, `status`) and `result` (`ok`, `error`).
pub const METRIC_WRITES: &str = "fedgate_kube_writes_total";
/// Gauge: objects the kube source skipped because they could not be converted.
pub const METRIC_SOURCE_PROBLEMS: &str = "fedgate_kube_source_problems";
/// Gauge: 1 while this replica holds the cluster's leader Lease (and writes), else 0.
pub const METRIC_LEADER: &str = "fedgate_leader";
/// Counter: changes of this replica's role (follower to leader and back).
pub const METRIC_LEADER_TRANSITIONS: &str = "fedgate_leader_transitions_total";

/// Describes these metrics to the installed recorder (the composition root calls it).
pub fn describe() {
    metrics::describe_counter!(
        METRIC_WRITES,
        "Writes of the kube writer to the API server, by kind, op (apply, delete, status) and result."
    );
    metrics::describe_gauge!(
        METRIC_SOURCE_PROBLEMS,
        "Kubernetes objects the kube source skipped (see /debug/problems)."
    );
    metrics::describe_gauge!(
        METRIC_LEADER,
        "1 while this replica holds the cluster's leader Lease and is the one that writes \
         ServiceImports, EndpointSlices, derived Services and ServiceExport status; 0 when it follows."
    );
    metrics::describe_counter!(
        METRIC_LEADER_TRANSITIONS,
        "Changes of this replica's role, follower to leader and leader to follower."
    );
}

pub(crate) fn record_write(kind: &'static str, op: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(METRIC_WRITES, "kind" => kind, "op" => op, "result" => result).increment(1);
}
