//! Endpoint selection as pure functions (docs/endpoint-selection.md).
//!
//! [`rank`] gives every endpoint of one service port its failover tier (Istio
//! `failoverPriority`), its health and why it would be skipped; [`plan`] turns that into the
//! ordered list of candidates a connection tries: best tier first, power-of-two-choices on
//! outstanding connections inside a tier. No I/O and no clocks: callers pass the state in.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use fedgate_discovery::model::{
    ClusterId, Endpoint, ExportedService, Health, HealthMap, ImportedService, LABEL_ZONE, Locality,
    ServicePort,
};
use rand::Rng;
use serde::Serialize;

pub use fedgate_discovery::failover::{PriorityLabel, tier_with_matches};

/// The labels of an endpoint as failover priority sees them: its cluster's locality, with the
/// zone replaced by the endpoint's own when its EndpointSlice names one.
pub fn endpoint_labels(
    locality: Option<&Locality>,
    cluster: &ClusterId,
    endpoint: &Endpoint,
) -> BTreeMap<String, String> {
    let mut labels = match locality {
        Some(l) => l.labels_for(cluster),
        None => Locality::default().labels_for(cluster),
    };
    if let Some(zone) = &endpoint.zone {
        labels.insert(LABEL_ZONE.to_owned(), zone.clone());
    }
    labels
}

/// Why an endpoint cannot take a connection now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// Its cluster does not expose the requested port (a port conflict).
    PortNotExposed,
    /// The endpoint has no port that serves the requested service port.
    NoMatchingPort,
    NotReady,
    /// The exporting gateway's active health check fails.
    Unhealthy,
    /// Its cluster's exports are withdrawn or its tunnel is down.
    ClusterUnreachable,
    /// Passive outlier detection ejected it after connect failures.
    Ejected,
    /// The connection is for one exact endpoint (a headless endpoint VIP) and this is another.
    NotTarget,
}

/// Live per-endpoint state the data plane keeps beside the snapshot.
pub trait EndpointState {
    fn is_ejected(&self, cluster: &ClusterId, address: IpAddr) -> bool;
    fn outstanding(&self, cluster: &ClusterId, address: IpAddr) -> u32;
}

/// Everything [`rank`] looks at. `S` is the live endpoint state: the data plane's table, or
/// the frozen copy [`crate::explain`] reads as well.
pub struct SelectionInput<'a, S: EndpointState + ?Sized = dyn EndpointState + 'a> {
    pub service: &'a ImportedService,
    /// The requested port (as imported).
    pub port: &'a ServicePort,
    pub local_cluster: &'a ClusterId,
    /// The client's labels: this gateway's locality (`Locality::labels_for`).
    pub client_labels: &'a BTreeMap<String, String>,
    pub priority: &'a [PriorityLabel],
    pub localities: &'a BTreeMap<ClusterId, Locality>,
    pub unreachable: &'a BTreeSet<ClusterId>,
    /// Health of local endpoints from this gateway's own probes (fresher than the snapshot).
    pub local_health: &'a HealthMap,
    pub state: &'a S,
    /// Restrict to one endpoint (headless endpoint VIPs).
    pub only: Option<(&'a ClusterId, IpAddr)>,
    /// Clusters in flat network mode: their endpoints are dialled directly.
    pub flat: &'a BTreeSet<ClusterId>,
}

/// How a connection reaches an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// An endpoint of this cluster: a TCP connection from this gateway.
    Local,
    /// Another cluster's endpoint through its gateway: a tunnel stream.
    Tunnel,
    /// Another cluster's endpoint in flat network mode: a TCP connection from this gateway to
    /// the endpoint's own address, no tunnel hop.
    Direct,
}

impl Path {
    /// The path to an endpoint of `cluster`.
    pub fn to(cluster: &ClusterId, local: &ClusterId, flat: &BTreeSet<ClusterId>) -> Path {
        if cluster == local {
            Path::Local
        } else if flat.contains(cluster) {
            Path::Direct
        } else {
            Path::Tunnel
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Path::Local => "local",
            Path::Tunnel => "tunnel",
            Path::Direct => "direct",
        }
    }
}

/// One endpoint as selection sees it; serialized for `/debug/endpoints`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointView {
    pub cluster: ClusterId,
    pub address: IpAddr,
    /// The port on the endpoint (resolved from the exporting cluster's service port).
    pub port: Option<u16>,
    pub tier: usize,
    /// The failoverPriority labels that matched the client, in order.
    pub matched_labels: Vec<String>,
    pub health: Health,
    pub ready: bool,
    pub outstanding: u32,
    pub healthy: bool,
    /// Why it is not healthy for this port; empty when it is.
    pub skipped: Vec<SkipReason>,
    /// How a connection reaches it.
    pub path: Path,
}

/// The exporting cluster's version of a service port: by name first, then protocol and port.
pub fn exported_port<'a>(export: &'a ExportedService, port: &'a ServicePort) -> &'a ServicePort {
    export
        .ports
        .iter()
        .find(|p| p.name.is_some() && p.name == port.name && p.protocol == port.protocol)
        .or_else(|| {
            export.ports.iter().find(|p| p.protocol == port.protocol && p.port == port.port)
        })
        .unwrap_or(port)
}

/// Every endpoint of the service for the requested port, sorted by tier, then cluster and
/// address, with health and skip reasons.
pub fn rank<S: EndpointState + ?Sized>(input: &SelectionInput<'_, S>) -> Vec<EndpointView> {
    let exposing = input
        .service
        .ports
        .iter()
        .find(|p| p.port.protocol == input.port.protocol && p.port.port == input.port.port)
        .map(|p| &p.clusters);
    let mut out = Vec::new();
    for (cluster, export) in &input.service.clusters {
        let locality = input.localities.get(cluster);
        let service_port = exported_port(export, input.port);
        let exposed = exposing.is_some_and(|c| c.contains(cluster));
        let reachable = !input.unreachable.contains(cluster);
        // Labels and tier are per cluster unless an endpoint names its own zone.
        let cluster_labels = match locality {
            Some(l) => l.labels_for(cluster),
            None => Locality::default().labels_for(cluster),
        };
        let cluster_tier = tier_with_matches(input.priority, input.client_labels, &cluster_labels);
        for endpoint in &export.endpoints {
            let (tier, matched_labels) = match &endpoint.zone {
                Some(z) if cluster_labels.get(LABEL_ZONE) != Some(z) => {
                    let labels = endpoint_labels(locality, cluster, endpoint);
                    tier_with_matches(input.priority, input.client_labels, &labels)
                }
                _ => cluster_tier.clone(),
            };
            let health = if cluster == input.local_cluster {
                input
                    .local_health
                    .get(&(input.service.key.clone(), endpoint.address))
                    .copied()
                    .unwrap_or(endpoint.health)
            } else {
                endpoint.health
            };
            let port = endpoint.port_for(service_port);
            let mut skipped = Vec::new();
            if let Some((c, a)) = input.only
                && (c != cluster || a != endpoint.address)
            {
                skipped.push(SkipReason::NotTarget);
            }
            if !exposed {
                skipped.push(SkipReason::PortNotExposed);
            }
            if port.is_none() {
                skipped.push(SkipReason::NoMatchingPort);
            }
            if !endpoint.ready {
                skipped.push(SkipReason::NotReady);
            }
            if health == Health::Unhealthy {
                skipped.push(SkipReason::Unhealthy);
            }
            if !reachable {
                skipped.push(SkipReason::ClusterUnreachable);
            }
            if input.state.is_ejected(cluster, endpoint.address) {
                skipped.push(SkipReason::Ejected);
            }
            out.push(EndpointView {
                cluster: cluster.clone(),
                address: endpoint.address,
                port,
                tier,
                matched_labels,
                health,
                ready: endpoint.ready,
                outstanding: input.state.outstanding(cluster, endpoint.address),
                healthy: skipped.is_empty(),
                skipped,
                path: Path::to(cluster, input.local_cluster, input.flat),
            });
        }
    }
    out.sort_by(|a, b| (a.tier, &a.cluster, a.address).cmp(&(b.tier, &b.cluster, b.address)));
    out
}

/// Panic routing (Envoy's panic threshold): when no endpoint can take a connection, the ones
/// that are only unhealthy or ejected are tried anyway, rather than refusing every client
/// because health checks or ejections may be wrong (an overloaded gateway, a burst of
/// failures). Returns the views with those marked healthy (their skip reasons kept, for
/// explain), or `None` when some endpoint is healthy or none qualifies. Endpoints that are
/// not ready, cannot serve the port or whose cluster is unreachable never qualify.
pub fn panic_views(views: &[EndpointView]) -> Option<Vec<EndpointView>> {
    if views.iter().any(|v| v.healthy) {
        return None;
    }
    let panic: Vec<EndpointView> = views
        .iter()
        .cloned()
        .map(|mut v| {
            v.healthy =
                v.skipped.iter().all(|s| matches!(s, SkipReason::Unhealthy | SkipReason::Ejected));
            v
        })
        .collect();
    panic.iter().any(|v| v.healthy).then_some(panic)
}

/// Orders up to `limit` of `loads.len()` choices: each next one is the less loaded of two
/// picked at random among those not yet taken (power of two choices). Returns indexes.
pub fn p2c_order(loads: &[u32], limit: usize, rng: &mut impl Rng) -> Vec<usize> {
    let mut left: Vec<usize> = (0..loads.len()).collect();
    let mut out = Vec::with_capacity(limit.min(loads.len()));
    while !left.is_empty() && out.len() < limit {
        let pick = if left.len() == 1 {
            0
        } else {
            let a = rng.random_range(0..left.len());
            let mut b = rng.random_range(0..left.len() - 1);
            if b >= a {
                b += 1;
            }
            if loads[left[b]] < loads[left[a]] { b } else { a }
        };
        out.push(left.swap_remove(pick));
    }
    out
}

/// The order in which a connection tries endpoints: healthy ones only, best tier first; in
/// each tier at most `per_tier` candidates, each picked by power of two random choices on
/// outstanding connections among those not yet picked. Returns indexes into `views`.
pub fn plan(views: &[EndpointView], per_tier: usize, rng: &mut impl Rng) -> Vec<usize> {
    let mut order = Vec::new();
    let mut i = 0;
    while i < views.len() {
        let tier = views[i].tier;
        let mut group: Vec<usize> = Vec::new();
        while i < views.len() && views[i].tier == tier {
            if views[i].healthy {
                group.push(i);
            }
            i += 1;
        }
        let loads: Vec<u32> = group.iter().map(|&g| views[g].outstanding).collect();
        order.extend(p2c_order(&loads, per_tier, rng).into_iter().map(|k| group[k]));
    }
    order
}

/// Like [`plan`] for services with `sessionAffinity: ClientIP`: inside each tier the
/// candidates are ordered by rendezvous hashing of (client IP, endpoint), so a client keeps
/// its endpoint while that endpoint stays healthy, and only the clients of an endpoint that
/// goes away move.
pub fn plan_sticky(views: &[EndpointView], per_tier: usize, client: IpAddr) -> Vec<usize> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let score = |v: &EndpointView| {
        let mut h = DefaultHasher::new();
        (client, &v.cluster, v.address).hash(&mut h);
        h.finish()
    };
    let mut order = Vec::new();
    let mut i = 0;
    while i < views.len() {
        let tier = views[i].tier;
        let mut group: Vec<(u64, usize)> = Vec::new();
        while i < views.len() && views[i].tier == tier {
            if views[i].healthy {
                group.push((score(&views[i]), i));
            }
            i += 1;
        }
        group.sort_unstable_by(|a, b| b.cmp(a));
        order.extend(group.into_iter().take(per_tier).map(|(_, idx)| idx));
    }
    order
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fedgate_discovery::exchange::delta::testing::{exported, imported};
    use fedgate_discovery::model::{
        ImportPort, LABEL_REGION, LABEL_SOURCE_CLUSTER, ServiceKey, ServiceType,
    };
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::collections::HashMap;
    use std::sync::Arc;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    /// (what, priority, endpoint labels, expected tier)
    type TierCase = (&'static str, Vec<PriorityLabel>, BTreeMap<String, String>, usize);

    #[test]
    fn tier_table() {
        let p = PriorityLabel::parse_all(&["region", "cluster", "zone"]);
        let client = labels(&[("region", "us"), ("cluster", "east"), ("zone", "a")]);
        let cases: Vec<TierCase> = vec![
            ("all match", p.clone(), client.clone(), 0),
            (
                "zone differs",
                p.clone(),
                labels(&[("region", "us"), ("cluster", "east"), ("zone", "b")]),
                1,
            ),
            (
                "cluster differs, zone same",
                p.clone(),
                labels(&[("region", "us"), ("cluster", "west"), ("zone", "a")]),
                2,
            ),
            (
                "region differs, rest same",
                p.clone(),
                labels(&[("region", "eu"), ("cluster", "east"), ("zone", "a")]),
                3,
            ),
            ("endpoint lacks labels", p.clone(), labels(&[]), 3),
            ("empty priority", vec![], labels(&[]), 0),
            (
                "literal matches",
                PriorityLabel::parse_all(&["region=eu", "cluster"]),
                labels(&[("region", "eu"), ("cluster", "east")]),
                0,
            ),
            (
                "literal misses even when client equal",
                PriorityLabel::parse_all(&["region=eu", "cluster"]),
                client.clone(),
                2,
            ),
            (
                "client lacks label",
                PriorityLabel::parse_all(&["rack"]),
                labels(&[("rack", "r1")]),
                1,
            ),
        ];
        for (what, priority, endpoint, want) in cases {
            assert_eq!(tier_with_matches(&priority, &client, &endpoint).0, want, "{what}");
        }
        let (_, matched) =
            tier_with_matches(&p, &client, &labels(&[("region", "us"), ("cluster", "east")]));
        assert_eq!(matched, vec!["region", "cluster"]);
    }

    #[test]
    fn parse_priority_entries() {
        assert_eq!(
            PriorityLabel::parse("a=b=c"),
            PriorityLabel { key: "a".into(), value: Some("b=c".into()) }
        );
        assert_eq!(PriorityLabel::parse("zone"), PriorityLabel { key: "zone".into(), value: None });
    }

    #[derive(Default)]
    pub(crate) struct FakeState {
        pub ejected: Vec<(ClusterId, IpAddr)>,
        pub outstanding: HashMap<IpAddr, u32>,
    }

    impl EndpointState for FakeState {
        fn is_ejected(&self, cluster: &ClusterId, address: IpAddr) -> bool {
            self.ejected.iter().any(|(c, a)| c == cluster && *a == address)
        }
        fn outstanding(&self, _: &ClusterId, address: IpAddr) -> u32 {
            self.outstanding.get(&address).copied().unwrap_or(0)
        }
    }

    pub(crate) fn cid(s: &str) -> ClusterId {
        ClusterId::new(s).unwrap()
    }

    pub(crate) fn ep(addr: &str, zone: Option<&str>, health: Health) -> Endpoint {
        Endpoint {
            zone: zone.map(str::to_owned),
            ..fedgate_discovery::exchange::delta::testing::endpoint(
                addr.parse().unwrap(),
                8080,
                health,
            )
        }
    }

    pub(crate) fn http_port() -> ServicePort {
        ServicePort::tcp(Some("http"), 80)
    }

    pub(crate) fn export(cluster: &str, endpoints: Vec<Endpoint>) -> Arc<ExportedService> {
        Arc::new(exported(
            ServiceKey::new("shop", "web"),
            cluster,
            ServiceType::ClusterSetIP,
            vec![http_port()],
            endpoints,
        ))
    }

    pub(crate) fn service(
        exports: Vec<Arc<ExportedService>>,
        exposing: &[&str],
    ) -> ImportedService {
        imported(
            ServiceKey::new("shop", "web"),
            ServiceType::ClusterSetIP,
            vec![ImportPort {
                port: http_port(),
                clusters: exposing.iter().map(|c| cid(c)).collect(),
            }],
            vec!["127.0.0.1".parse().unwrap()],
            exports[0].cluster.clone(),
            exports,
        )
    }

    pub(crate) fn localities() -> BTreeMap<ClusterId, Locality> {
        let loc = |r: &str, z: &str| Locality {
            region: Some(r.into()),
            zone: Some(z.into()),
            labels: BTreeMap::new(),
        };
        [
            (cid("east"), loc("us", "us-a")),
            (cid("east2"), loc("us", "us-b")),
            (cid("west"), loc("eu", "eu-a")),
        ]
        .into_iter()
        .collect()
    }

    fn default_priority() -> Vec<PriorityLabel> {
        PriorityLabel::parse_all(&[LABEL_REGION, LABEL_SOURCE_CLUSTER, LABEL_ZONE])
    }

    /// The client side the selection tests share: gateway `east` (us/us-a) among
    /// [`localities`], with its labels and the default failover priority.
    pub(crate) struct Client {
        pub local: ClusterId,
        pub localities: BTreeMap<ClusterId, Locality>,
        pub labels: BTreeMap<String, String>,
        pub priority: Vec<PriorityLabel>,
        /// Clusters in flat network mode (none unless a test sets some).
        pub flat: BTreeSet<ClusterId>,
    }

    impl Client {
        pub(crate) fn east() -> Self {
            let local = cid("east");
            let localities = localities();
            let labels = localities[&local].labels_for(&local);
            Self { local, localities, labels, priority: default_priority(), flat: BTreeSet::new() }
        }

        /// [`rank`] as this client sees `service`.
        fn rank(
            &self,
            service: &ImportedService,
            port: &ServicePort,
            unreachable: &BTreeSet<ClusterId>,
            local_health: &HealthMap,
            state: &dyn EndpointState,
            only: Option<(&ClusterId, IpAddr)>,
        ) -> Vec<EndpointView> {
            rank(&SelectionInput {
                service,
                port,
                local_cluster: &self.local,
                client_labels: &self.labels,
                priority: &self.priority,
                localities: &self.localities,
                unreachable,
                local_health,
                state,
                only,
                flat: &self.flat,
            })
        }
    }

    struct Scenario {
        what: &'static str,
        service: ImportedService,
        unreachable: Vec<&'static str>,
        local_health: Vec<(&'static str, Health)>,
        ejected: Vec<(&'static str, &'static str)>,
        only: Option<(&'static str, &'static str)>,
        /// The addresses a connection would try, in order (tiers fixed; p2c inside a tier
        /// is tested separately, so each tier here has one healthy endpoint).
        want: Vec<&'static str>,
    }

    #[test]
    fn selection_scenarios() {
        let client = Client::east();
        let h = Health::Healthy;
        let three = || {
            service(
                vec![
                    export("east", vec![ep("10.0.0.1", None, h), ep("10.0.0.2", Some("us-z"), h)]),
                    export("east2", vec![ep("10.1.0.1", None, h)]),
                    export("west", vec![ep("10.2.0.1", None, h)]),
                ],
                &["east", "east2", "west"],
            )
        };
        let scenarios = vec![
            Scenario {
                what: "all healthy: own zone, own cluster other zone, same region, other region",
                service: three(),
                unreachable: vec![],
                local_health: vec![],
                ejected: vec![],
                only: None,
                want: vec!["10.0.0.1", "10.0.0.2", "10.1.0.1", "10.2.0.1"],
            },
            Scenario {
                what: "local probe says unhealthy though the snapshot says healthy",
                service: three(),
                unreachable: vec![],
                local_health: vec![("10.0.0.1", Health::Unhealthy)],
                ejected: vec![],
                only: None,
                want: vec!["10.0.0.2", "10.1.0.1", "10.2.0.1"],
            },
            Scenario {
                what: "unreachable cluster and ejected endpoint are skipped",
                service: three(),
                unreachable: vec!["east2"],
                local_health: vec![],
                ejected: vec![("east", "10.0.0.2")],
                only: None,
                want: vec!["10.0.0.1", "10.2.0.1"],
            },
            Scenario {
                what: "port exposed only by west (port conflict)",
                service: service(three().clusters.into_values().collect(), &["west"]),
                unreachable: vec![],
                local_health: vec![],
                ejected: vec![],
                only: None,
                want: vec!["10.2.0.1"],
            },
            Scenario {
                what: "remote unhealthy and not ready; unknown health counts as healthy",
                service: service(
                    vec![
                        export("east2", vec![ep("10.1.0.1", None, Health::Unhealthy)]),
                        export(
                            "west",
                            vec![
                                Endpoint { ready: false, ..ep("10.2.0.1", None, h) },
                                ep("10.2.0.2", None, Health::Unknown),
                            ],
                        ),
                    ],
                    &["east2", "west"],
                ),
                unreachable: vec![],
                local_health: vec![],
                ejected: vec![],
                only: None,
                want: vec!["10.2.0.2"],
            },
            Scenario {
                what: "endpoint VIP leads to exactly that endpoint",
                service: three(),
                unreachable: vec![],
                local_health: vec![],
                ejected: vec![],
                only: Some(("west", "10.2.0.1")),
                want: vec!["10.2.0.1"],
            },
            Scenario {
                what: "endpoint VIP of an unhealthy endpoint: nothing",
                service: three(),
                unreachable: vec!["west"],
                local_health: vec![],
                ejected: vec![],
                only: Some(("west", "10.2.0.1")),
                want: vec![],
            },
        ];
        for s in scenarios {
            let unreachable: BTreeSet<ClusterId> = s.unreachable.iter().map(|c| cid(c)).collect();
            let local_health: HealthMap = s
                .local_health
                .iter()
                .map(|(a, h)| ((ServiceKey::new("shop", "web"), a.parse().unwrap()), *h))
                .collect();
            let state = FakeState {
                ejected: s.ejected.iter().map(|(c, a)| (cid(c), a.parse().unwrap())).collect(),
                outstanding: HashMap::new(),
            };
            let only_cluster = s.only.map(|(c, _)| cid(c));
            let port = http_port();
            let only = only_cluster.as_ref().zip(s.only.map(|(_, a)| a.parse().unwrap()));
            let views = client.rank(&s.service, &port, &unreachable, &local_health, &state, only);
            let got: Vec<String> = plan(&views, 8, &mut StdRng::seed_from_u64(1))
                .into_iter()
                .map(|i| views[i].address.to_string())
                .collect();
            assert_eq!(got, s.want, "{}", s.what);
        }
    }

    #[test]
    fn explain_says_why() {
        let client = Client::east();
        let svc = service(
            vec![
                export("east", vec![ep("10.0.0.1", None, Health::Healthy)]),
                export(
                    "west",
                    vec![Endpoint {
                        ready: false,
                        ports: vec![],
                        ..ep("10.2.0.1", None, Health::Unhealthy)
                    }],
                ),
            ],
            &["east"],
        );
        let mut port = http_port();
        port.target_port = None;
        let state = FakeState::default();
        let unreachable = [cid("west")].into_iter().collect();
        let views = client.rank(&svc, &port, &unreachable, &HealthMap::new(), &state, None);
        assert_eq!(views[0].tier, 0);
        assert_eq!(views[0].port, Some(8080));
        assert!(views[0].healthy);
        assert_eq!(views[0].matched_labels.len(), 3);
        assert_eq!(views[1].tier, 3);
        assert_eq!(
            views[1].skipped,
            vec![
                SkipReason::PortNotExposed,
                SkipReason::NotReady,
                SkipReason::Unhealthy,
                SkipReason::ClusterUnreachable
            ]
        );
        // An endpoint without ports serves the service port itself.
        assert_eq!(views[1].port, Some(80));
        let json = serde_json::to_value(&views).unwrap();
        assert_eq!(json[1]["skipped"][0], "port_not_exposed");
    }

    fn view(addr: &str, tier: usize, outstanding: u32, healthy: bool) -> EndpointView {
        EndpointView {
            cluster: cid("east"),
            address: addr.parse().unwrap(),
            port: Some(1),
            tier,
            matched_labels: vec![],
            health: Health::Healthy,
            ready: true,
            outstanding,
            healthy,
            skipped: vec![],
            path: Path::Local,
        }
    }

    #[test]
    fn plan_prefers_less_loaded_and_caps_per_tier() {
        let views = vec![
            view("10.0.0.1", 0, 100, true),
            view("10.0.0.2", 0, 0, true),
            view("10.0.0.3", 1, 0, true),
            view("10.0.0.4", 1, 0, false),
        ];
        // With two endpoints in tier 0, p2c always compares both: the idle one goes first.
        for seed in 0..50 {
            let order = plan(&views, 8, &mut StdRng::seed_from_u64(seed));
            assert_eq!(order, vec![1, 0, 2], "seed {seed}");
        }
        assert_eq!(plan(&views, 1, &mut StdRng::seed_from_u64(3)), vec![1, 2]);
        assert!(plan(&[], 8, &mut StdRng::seed_from_u64(3)).is_empty());
    }

    #[test]
    fn sticky_plan_keeps_clients_on_their_endpoint() {
        let mut views: Vec<EndpointView> =
            (1..=5).map(|i| view(&format!("10.0.0.{i}"), 0, i, true)).collect();
        views.push(view("10.0.1.1", 1, 0, true));
        let clients: Vec<IpAddr> = (1..=50).map(|i| IpAddr::from([192, 168, 0, i])).collect();
        let first: Vec<usize> = clients.iter().map(|c| plan_sticky(&views, 8, *c)[0]).collect();
        // Deterministic, and spread over the tier-0 endpoints.
        for (c, f) in clients.iter().zip(&first) {
            assert_eq!(plan_sticky(&views, 8, *c)[0], *f);
            assert!(*f < 5);
        }
        assert!(first.iter().collect::<BTreeSet<_>>().len() >= 3, "{first:?}");
        // Endpoint 0 becomes unhealthy: only its clients move, the tier-1 one stays last.
        views[0].healthy = false;
        for (c, f) in clients.iter().zip(&first) {
            let order = plan_sticky(&views, 8, *c);
            if *f != 0 {
                assert_eq!(order[0], *f);
            }
            assert_eq!(order.last(), Some(&5));
            assert!(!order.contains(&0));
        }
    }

    #[test]
    fn p2c_spreads_load_over_equal_endpoints() {
        let views: Vec<EndpointView> =
            (1..=4).map(|i| view(&format!("10.0.0.{i}"), 0, 0, true)).collect();
        let mut counts = [0usize; 4];
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..4000 {
            counts[plan(&views, 1, &mut rng)[0]] += 1;
        }
        for c in counts {
            assert!((700..1300).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn rank_and_plan_cost_per_connection() {
        // 3 clusters × 100 endpoints: what every new client connection pays.
        let client = Client::east();
        let eps = |prefix: u8| -> Vec<Endpoint> {
            (0..100u8).map(|i| ep(&format!("10.{prefix}.0.{i}"), None, Health::Healthy)).collect()
        };
        let svc = service(
            vec![export("east", eps(0)), export("east2", eps(1)), export("west", eps(2))],
            &["east", "east2", "west"],
        );
        let state = FakeState::default();
        let unreachable = BTreeSet::new();
        let health = HealthMap::new();
        let port = http_port();
        let mut rng = StdRng::seed_from_u64(9);
        let rounds = 200;
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            let views = client.rank(&svc, &port, &unreachable, &health, &state, None);
            let order = plan(&views, 8, &mut rng);
            assert_eq!(order.len(), 24);
            assert_eq!(views[order[0]].tier, 0);
        }
        let per = started.elapsed() / rounds;
        eprintln!("rank+plan over 300 endpoints: {per:?} per connection (debug build)");
        assert!(per < std::time::Duration::from_millis(50), "{per:?}");
    }
}
