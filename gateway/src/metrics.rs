//! The Prometheus recorder of the `fedgate` process. Only `main` installs it (library code
//! never installs a global recorder); the parts declare their own series in their own
//! `metrics` modules.

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// How often histograms and idle series are maintained.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the global Prometheus recorder and returns the handle `/metrics` renders.
/// Returns `None` (and logs) when a recorder is already installed.
pub fn install() -> Option<PrometheusHandle> {
    let recorder = PrometheusBuilder::new().build_recorder();
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
