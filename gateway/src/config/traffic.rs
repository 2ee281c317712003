//! The `traffic` section: endpoint choice, health, outlier detection, client connection
//! limits, draining and the data-plane threads. Defaults as named constants;
//! docs/configuration.md documents every field.

use std::time::Duration;

use fedgate_discovery::model::{LABEL_REGION, LABEL_SOURCE_CLUSTER, LABEL_ZONE};
use serde::{Deserialize, Serialize};

use super::types::{PriorityLabel, duration};

/// Failover priority when `traffic.failoverPriority` is not set: same region, then own
/// cluster, then same zone.
pub const DEFAULT_FAILOVER_PRIORITY: [&str; 3] = [LABEL_REGION, LABEL_SOURCE_CLUSTER, LABEL_ZONE];
/// Time between two active health probes of an endpoint: 1 second.
pub const DEFAULT_HEALTH_INTERVAL: Duration = crate::dataplane::health::DEFAULT_INTERVAL;
/// How long one health probe may take: 500 milliseconds.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = crate::dataplane::health::DEFAULT_TIMEOUT;
/// Failed probes in a row that make a healthy endpoint unhealthy.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = crate::dataplane::health::DEFAULT_UNHEALTHY_THRESHOLD;
/// Successful probes in a row that make an unhealthy endpoint healthy.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = crate::dataplane::health::DEFAULT_HEALTHY_THRESHOLD;
/// The longest a draining gateway waits for open connections: 45 seconds.
pub const DEFAULT_DRAIN_DURATION: Duration = crate::dataplane::DEFAULT_DRAIN_DURATION;
/// Threads that carry traffic when `traffic.dataPlaneThreads` is not set: as many as the CPUs
/// the gateway may use (`std::thread::available_parallelism`: the affinity mask and a cgroup
/// CPU quota count), at most [`MAX_DATA_PLANE_THREADS`]; 1 when that cannot be read. Each
/// thread reads a socket of its own at the tunnel port (`fedgate_tunnel`'s steer module), so a
/// stream pays no hand-off between threads: on the 2-core benchmark VM one stream through two
/// threads moved 0.96× what it moved through one, and 8 streams 0.99× (docs/benchmarks.md,
/// session 16; 0.75× for one stream while thread 0 read every packet, session 15).
pub fn default_data_plane_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_DATA_PLANE_THREADS))
}
/// The most `traffic.dataPlaneThreads` may ask for.
pub const MAX_DATA_PLANE_THREADS: usize = 256;
/// The longest `traffic.busyPoll`: 10 ms. Waits longer than that are not what busy polling is
/// for; a thread polling through them only burns a core.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(10);
/// Consecutive connect failures that eject an endpoint (passive outlier detection).
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 =
    crate::dataplane::health::DEFAULT_CONSECUTIVE_FAILURES;
/// An endpoint's first ejection: 5 seconds; each further episode doubles it.
pub const DEFAULT_BASE_EJECTION_TIME: Duration = crate::dataplane::health::DEFAULT_BASE_EJECTION;
/// The longest ejection: 30 seconds (also the quiet time that resets the doubling).
pub const DEFAULT_MAX_EJECTION_TIME: Duration = crate::dataplane::health::DEFAULT_MAX_EJECTION;
/// Share of a service's endpoints that may be ejected at once: 10 % (Istio's default; at
/// least one endpoint always may).
pub const DEFAULT_MAX_EJECTION_PERCENT: u8 = crate::dataplane::health::DEFAULT_MAX_EJECTION_PERCENT;
/// Client connections one gateway serves at once (each holds one or two descriptors): 8192.
pub const DEFAULT_MAX_CONNECTIONS: usize = crate::dataplane::DEFAULT_MAX_CONNECTIONS;
/// Client connections one service may hold at once on one gateway: 4096.
pub const DEFAULT_MAX_CONNECTIONS_PER_SERVICE: usize =
    crate::dataplane::DEFAULT_MAX_CONNECTIONS_PER_SERVICE;
/// A client connection with no bytes either way for this long is closed: 1 hour (Istio's
/// and Envoy's TCP proxy default).
pub const DEFAULT_IDLE_TIMEOUT: Duration = crate::dataplane::DEFAULT_IDLE_TIMEOUT;

/// `traffic`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TrafficConfig {
    /// Ordered labels (or `label=value` overrides) deciding endpoint priority, Istio style.
    pub failover_priority: Vec<PriorityLabel>,
    /// Active health checks of local endpoints.
    pub health_check: HealthCheckConfig,
    /// On shutdown, the longest time to wait for open connections to finish.
    #[serde(with = "duration")]
    pub drain_duration: Duration,
    /// Threads that carry traffic (the tunnel's packet work, the listeners, the proxied
    /// connections), each with a connection of its own to every peer replica. Default:
    /// [`default_data_plane_threads`].
    pub data_plane_threads: usize,
    /// How long each data-plane thread keeps polling after it last moved bytes, instead of
    /// sleeping in `epoll_wait` (0: never). Trades CPU for latency.
    #[serde(with = "duration")]
    pub busy_poll: Duration,
    /// Passive outlier detection: ejecting endpoints after connect failures.
    pub outlier_detection: OutlierDetectionConfig,
    /// Limits on client connections (ClusterSetIP and endpoint VIP listeners).
    pub connections: ConnectionsConfig,
    /// How remote endpoints are reached, for peers without `peers[].network`.
    pub network: NetworkMode,
}

/// `traffic.network`, `peers[].network`: how another cluster's endpoints are reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Through that cluster's gateway over the tunnel; headless endpoints get VIPs here.
    #[default]
    Gateway,
    /// Pod networks are routed between the clusters: DNS answers the endpoints' own
    /// addresses and connections go to them directly, without a tunnel hop.
    Flat,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        Self {
            failover_priority: DEFAULT_FAILOVER_PRIORITY
                .iter()
                .map(|k| PriorityLabel { key: (*k).to_owned(), value: None })
                .collect(),
            health_check: HealthCheckConfig::default(),
            drain_duration: DEFAULT_DRAIN_DURATION,
            data_plane_threads: default_data_plane_threads(),
            busy_poll: Duration::ZERO,
            outlier_detection: OutlierDetectionConfig::default(),
            connections: ConnectionsConfig::default(),
            network: NetworkMode::Gateway,
        }
    }
}

/// `traffic.healthCheck`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct HealthCheckConfig {
    /// Time between two probes of one endpoint.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Time one probe (a TCP connect) may take; at most `interval`.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Failed probes in a row before an endpoint is unhealthy.
    pub unhealthy_threshold: u32,
    /// Successful probes in a row before an endpoint is healthy again.
    pub healthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            unhealthy_threshold: DEFAULT_UNHEALTHY_THRESHOLD,
            healthy_threshold: DEFAULT_HEALTHY_THRESHOLD,
        }
    }
}

/// `traffic.outlierDetection` (docs/endpoint-selection.md, "Passive ejection").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct OutlierDetectionConfig {
    /// Connect failures in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// First ejection of an endpoint; each further episode doubles it.
    #[serde(with = "duration")]
    pub base_ejection_time: Duration,
    /// The longest ejection, and the quiet time after which the doubling starts over.
    #[serde(with = "duration")]
    pub max_ejection_time: Duration,
    /// At most this percentage of a service's endpoints is ejected at once (at least one).
    pub max_ejection_percent: u8,
}

impl Default for OutlierDetectionConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection_time: DEFAULT_BASE_EJECTION_TIME,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
        }
    }
}

/// `traffic.connections`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ConnectionsConfig {
    /// Client connections this gateway serves at once; more are reset at once.
    pub max: usize,
    /// Client connections one service may hold at once; more are reset at once.
    pub max_per_service: usize,
    /// A connection with no bytes either way for this long is closed.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self {
            max: DEFAULT_MAX_CONNECTIONS,
            max_per_service: DEFAULT_MAX_CONNECTIONS_PER_SERVICE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}
