//! Metrics of the kube source and writer (names prefixed `fedgate_kube_`, documented in
//! docs/metrics.md).

/// Counter: writes to the API server, by `kind` (ServiceImport, EndpointSlice, Service,
/// ServiceExport), `op` (`apply`, `delete`, `status`) and `result` (`ok`, `error`).
pub const METRIC_WRITES: &str = "fedgate_kube_writes_total";
/// Gauge: objects the kube source skipped because they could not be converted.
pub const METRIC_SOURCE_PROBLEMS: &str = "fedgate_kube_source_problems";

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
}

pub(crate) fn record_write(kind: &'static str, op: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(METRIC_WRITES, "kind" => kind, "op" => op, "result" => result).increment(1);
}
