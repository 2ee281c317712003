//! The Prometheus recorder of the `fedgate` process. Only `main` installs it (library code
//! never installs a global recorder); the parts declare their own series in their own
//! `metrics` modules.

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// How often histograms and idle series are maintained.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Bucket bounds (seconds) of every histogram: all of fedgate's are latencies, from a DNS
/// answer off the fast path (tens of microseconds) to a connect that fails over across
/// clusters (seconds). Buckets (not the exporter's default summaries) so Prometheus can
/// aggregate them across gateways and `histogram_quantile` works (deploy/grafana).
const LATENCY_BUCKETS_SECONDS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Installs the global Prometheus recorder and returns the handle `/metrics` renders.
/// Returns `None` (and logs) when a recorder is already installed.
pub fn install() -> Option<PrometheusHandle> {
    let builder = match PrometheusBuilder::new().set_buckets(&LATENCY_BUCKETS_SECONDS) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "histogram buckets refused; /metrics shows summaries");
            PrometheusBuilder::new()
        }
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if let Err(e) = metrics::set_global_recorder(recorder) {
        tracing::warn!(error = %e, "metrics recorder already installed; /metrics is disabled");
        return None;
    }
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        })
        .ok()?;
    Some(handle)
}
