//! Metrics of the import set and its ClusterSetIP range (documented in docs/metrics.md).

/// Gauge: services in the import set.
pub const METRIC_IMPORTED_SERVICES: &str = "fedgate_imported_services";
/// Counter: updates (local or from peers) that changed the import snapshot.
pub const METRIC_IMPORT_UPDATES: &str = "fedgate_import_updates_total";
/// Gauge: imports waiting for an address from a full `front.clusterSetIPRange` (a ClusterSetIP,
/// or the VIP of a remote headless endpoint).
pub const METRIC_UNALLOCATED_SERVICES: &str = "fedgate_clustersetip_unallocated_services";
/// Gauge: addresses of `front.clusterSetIPRange` by `state`: `allocated` (held by an import or
/// endpoint), `reserved` (kept for imports of a withdrawn cluster), `free`.
pub const METRIC_ADDRESSES: &str = "fedgate_clustersetip_addresses";

/// Describes these metrics to the installed recorder (the composition root calls it).
pub fn describe_metrics() {
    metrics::describe_gauge!(METRIC_IMPORTED_SERVICES, "Services in the clusterset import set.");
    metrics::describe_counter!(
        METRIC_IMPORT_UPDATES,
        "Export updates (local or from peers) that changed the import snapshot."
    );
    metrics::describe_gauge!(
        METRIC_UNALLOCATED_SERVICES,
        "Imports waiting for an address because front.clusterSetIPRange is full (named in \
         /debug/problems); each gets one as soon as one frees."
    );
    metrics::describe_gauge!(
        METRIC_ADDRESSES,
        "Addresses of front.clusterSetIPRange by state: allocated, reserved (for imports of a \
         withdrawn cluster), free."
    );
}

/// Sets the gauges of the range from `report`.
pub(super) fn record_range(report: &super::problems::AllocReport) {
    metrics::gauge!(METRIC_UNALLOCATED_SERVICES).set(report.waiting_services as f64);
    metrics::gauge!(METRIC_ADDRESSES, "state" => "allocated").set(report.allocated as f64);
    metrics::gauge!(METRIC_ADDRESSES, "state" => "reserved").set(report.reserved as f64);
    metrics::gauge!(METRIC_ADDRESSES, "state" => "free").set(report.free as f64);
}
