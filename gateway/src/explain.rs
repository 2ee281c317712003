//! `/debug/explain` and `fedgate explain`: for one service port, which tier and endpoints a new
//! connection from this cluster would get, and why.
//!
//! [`explain`] is a pure function over the same inputs the data plane ranks with. It calls
//! [`select::rank`] and [`select::plan`] / [`select::plan_sticky`] — the data plane's own
//! selection code — and only adds words: per label of `failoverPriority`, what the client and
//! the endpoint have and why a label stopped counting (through [`failover::compare`], the
//! comparison the tier rule itself uses), and for each skipped endpoint the concrete cause
//! (the failed probe, the ejection time left, the peer that is down). Inside the chosen tier
//! the pick is power of two choices on outstanding connections, random per connection: the
//! explanation shows the candidate set with their outstanding counts instead of pretending a
//! single winner. With `sessionAffinity: ClientIP` and a client address, the pick is
//! deterministic and named.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use fedgate_discovery::failover;
use fedgate_discovery::model::{
    ClusterId, Health, ImportedService, PeerStatus, ServiceKey, ServicePort, SessionAffinity,
};
use rand::SeedableRng;
use serde::Serialize;

use crate::dataplane::PriorityLabel;
use crate::dataplane::activity::{skip_text, structural};
use crate::dataplane::health::LastProbe;
use crate::dataplane::select::{self, EndpointState, EndpointView, SelectionInput, SkipReason};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("service {0:?} is not NAMESPACE/NAME")]
    BadServiceName(String),
    #[error("port {0:?} is not a port number")]
    BadPort(String),
    #[error("client {0:?} is not an IP address")]
    BadClient(String),
    #[error("service {0} is not imported by this gateway (see /debug/imports)")]
    UnknownService(ServiceKey),
    #[error("service {service} has no port {port}; its ports: {available:?}")]
    UnknownPort { service: ServiceKey, port: u16, available: Vec<u16> },
    #[error("service {0} has no ports")]
    NoPorts(ServiceKey),
}

impl ExplainError {
    /// Bounded code for the JSON error answer.
    pub fn code(&self) -> &'static str {
        match self {
            ExplainError::BadServiceName(_)
            | ExplainError::BadPort(_)
            | ExplainError::BadClient(_) => "bad_request",
            ExplainError::UnknownService(_)
            | ExplainError::UnknownPort { .. }
            | ExplainError::NoPorts(_) => "not_found",
        }
    }
}

/// Parses `namespace/name`.
pub fn parse_service(s: &str) -> Result<ServiceKey, ExplainError> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ServiceKey::new(ns, name))
        }
        _ => Err(ExplainError::BadServiceName(s.to_owned())),
    }
}

/// The port to explain: `port` if given (it must exist), else the service's first TCP port,
/// else its first port.
pub fn pick_port(
    service: &ImportedService,
    port: Option<u16>,
) -> Result<&ServicePort, ExplainError> {
    let ports = || service.ports.iter().map(|p| &p.port);
    match port {
        Some(n) => ports().find(|p| p.port == n).ok_or_else(|| ExplainError::UnknownPort {
            service: service.key.clone(),
            port: n,
            available: ports().map(|p| p.port).collect(),
        }),
        None => ports()
            .find(|p| p.protocol == fedgate_discovery::model::Protocol::Tcp)
            .or_else(|| ports().next())
            .ok_or_else(|| ExplainError::NoPorts(service.key.clone())),
    }
}

/// The data plane's live endpoint state copied at one instant, so explaining holds no lock.
#[derive(Clone, Debug, Default)]
pub struct FrozenState {
    /// Ejected endpoints with the time they stay ejected.
    pub ejected: BTreeMap<(ClusterId, IpAddr), Duration>,
    pub outstanding: HashMap<(ClusterId, IpAddr), u32>,
}

impl EndpointState for FrozenState {
    fn is_ejected(&self, cluster: &ClusterId, address: IpAddr) -> bool {
        self.ejected.contains_key(&(cluster.clone(), address))
    }
    fn outstanding(&self, cluster: &ClusterId, address: IpAddr) -> u32 {
        self.outstanding.get(&(cluster.clone(), address)).copied().unwrap_or(0)
    }
}

/// Everything [`explain`] looks at: the data plane's selection inputs plus what only the
/// explanation needs (last probes, peer status, the clock).
pub struct ExplainInput<'a> {
    /// What the data plane's selection looks at, over a frozen copy of its state (which also
    /// says how long an ejection has left); `only` is none for the whole service.
    pub selection: SelectionInput<'a, FrozenState>,
    /// Last probe of each local endpoint of this service, by address.
    pub probes: &'a BTreeMap<IpAddr, LastProbe>,
    pub peers: &'a [PeerStatus],
    /// The client address, for `sessionAffinity: ClientIP` (optional).
    pub client: Option<IpAddr>,
    /// At most this many candidates of one tier are tried (`CANDIDATES_PER_TIER`).
    pub per_tier: usize,
    pub now: jiff::Timestamp,
}

/// One `failoverPriority` label for one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelCheck {
    pub key: String,
    /// The value a `key=value` entry requires (none: compare with the client).
    pub literal: Option<String>,
    /// What the endpoint needs: the client's value or the literal.
    pub wanted: Option<String>,
    /// What the endpoint has.
    pub actual: Option<String>,
    /// `match`, `mismatch` (the first label that differs: the tier is decided here) or
    /// `not_counted` (after the first mismatch, whatever its value).
    pub result: &'static str,
    pub why: String,
}

/// One endpoint of the service.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointExplanation {
    pub cluster: ClusterId,
    pub address: IpAddr,
    pub port: Option<u16>,
    pub hostname: Option<String>,
    pub tier: usize,
    /// The endpoint's labels as failover priority sees them.
    pub labels: BTreeMap<String, String>,
    pub priority: Vec<LabelCheck>,
    pub health: Health,
    pub ready: bool,
    pub outstanding: u32,
    /// Can take a new connection now.
    pub healthy: bool,
    /// How a connection reaches it: `local`, `tunnel` (through its cluster's gateway) or
    /// `direct` (flat network mode: straight to its address, no tunnel hop).
    pub path: crate::dataplane::select::Path,
    pub skipped: Vec<SkipReason>,
    /// The concrete cause of each skip reason, in words.
    pub reasons: Vec<String>,
    /// `chosen` (the one a ClientIP-affine client gets), `candidate` (in the chosen tier),
    /// `fallback` (healthy, worse tier: used if every candidate fails), `panic` (not healthy,
    /// tried anyway because no endpoint is), `skipped`.
    pub role: &'static str,
    pub last_probe: Option<LastProbe>,
    pub ejected_for_secs: Option<f64>,
}

/// One tier a connection would try, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TierPlan {
    pub tier: usize,
    /// Healthy endpoints in the tier.
    pub healthy: usize,
    /// How many of them one connection tries at most.
    pub tried: usize,
    pub clusters: Vec<ClusterId>,
}

/// What a new connection gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// The best tier any endpoint of this port is in (where traffic goes when all is well).
    pub best_tier: Option<usize>,
    /// The tier a new connection goes to; none when no endpoint is healthy.
    pub chosen_tier: Option<usize>,
    /// True when the chosen tier is worse than the best one.
    pub failover: bool,
    /// Panic routing: no endpoint is healthy, so unhealthy and ejected ones are tried
    /// (counted in `fedgate_panic_connections_total`).
    pub panic: bool,
    /// `power_of_two_choices` or `client_ip_affinity`.
    pub balancing: &'static str,
    /// The endpoint a connection gets when that is deterministic (ClientIP affinity with a
    /// client address given); otherwise none and `candidates` is the set.
    pub chosen: Option<Candidate>,
    /// Healthy endpoints of the chosen tier.
    pub candidates: Vec<Candidate>,
    /// The tiers a connection tries, in order.
    pub plan: Vec<TierPlan>,
    /// One sentence for people.
    pub summary: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub cluster: ClusterId,
    pub address: IpAddr,
    pub port: Option<u16>,
    pub outstanding: u32,
}

/// The whole explanation (`/debug/explain`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub service: ServiceKey,
    pub port: u16,
    pub protocol: &'static str,
    pub port_name: Option<String>,
    /// Every port of the service (to pick another).
    pub ports: Vec<u16>,
    /// This gateway's cluster: where the client is.
    pub cluster: ClusterId,
    pub client_labels: BTreeMap<String, String>,
    pub failover_priority: Vec<PriorityLabel>,
    pub decision: Decision,
    /// Every endpoint, best tier first.
    pub endpoints: Vec<EndpointExplanation>,
}

/// Explains one service port. Pure: same input, same answer.
pub fn explain(input: &ExplainInput<'_>) -> Explanation {
    let views = select::rank(&input.selection);
    // As the data plane's connect does: with no healthy endpoint, panic routing tries the
    // unhealthy and ejected ones.
    let panic = select::panic_views(&views);
    let in_panic = panic.is_some();
    let views = panic.unwrap_or(views);
    let sticky =
        matches!(input.selection.service.session_affinity, SessionAffinity::ClientIP { .. });
    let order = match (sticky, input.client) {
        (true, Some(ip)) => select::plan_sticky(&views, input.per_tier, ip),
        // The seed only orders endpoints inside a tier, which the explanation does not use:
        // tiers and their membership are the same for every seed.
        _ => select::plan(&views, input.per_tier, &mut rand::rngs::StdRng::seed_from_u64(0)),
    };
    let decision = decide(input, &views, &order, sticky, in_panic);
    let endpoints = views.iter().enumerate().map(|(i, v)| endpoint(input, v, i, &decision, &order));
    let endpoints: Vec<EndpointExplanation> = endpoints.collect();
    Explanation {
        service: input.selection.service.key.clone(),
        port: input.selection.port.port,
        protocol: input.selection.port.protocol.as_str(),
        port_name: input.selection.port.name.clone(),
        ports: input.selection.service.ports.iter().map(|p| p.port.port).collect(),
        cluster: input.selection.local_cluster.clone(),
        client_labels: input.selection.client_labels.clone(),
        failover_priority: input.selection.priority.to_vec(),
        decision,
        endpoints,
    }
}

fn candidate(v: &EndpointView) -> Candidate {
    Candidate {
        cluster: v.cluster.clone(),
        address: v.address,
        port: v.port,
        outstanding: v.outstanding,
    }
}

fn decide(
    input: &ExplainInput<'_>,
    views: &[EndpointView],
    order: &[usize],
    sticky: bool,
    panic: bool,
) -> Decision {
    // As in the data plane's connect: the baseline tier ignores endpoints that can never
    // serve this port.
    let best_tier =
        views.iter().filter(|v| !v.skipped.iter().any(structural)).map(|v| v.tier).min();
    let chosen_tier = order.first().map(|&i| views[i].tier);
    let mut plan: Vec<TierPlan> = Vec::new();
    for &i in order {
        let v = &views[i];
        match plan.last_mut() {
            Some(t) if t.tier == v.tier => t.tried += 1,
            _ => plan.push(TierPlan {
                tier: v.tier,
                healthy: views.iter().filter(|w| w.tier == v.tier && w.healthy).count(),
                tried: 1,
                clusters: Vec::new(),
            }),
        }
        if let Some(t) = plan.last_mut()
            && !t.clusters.contains(&v.cluster)
        {
            t.clusters.push(v.cluster.clone());
        }
    }
    let candidates: Vec<Candidate> =
        views.iter().filter(|v| v.healthy && Some(v.tier) == chosen_tier).map(candidate).collect();
    let deterministic = sticky && input.client.is_some();
    let chosen = if deterministic { order.first().map(|&i| candidate(&views[i])) } else { None };
    let balancing = if sticky { "client_ip_affinity" } else { "power_of_two_choices" };
    let failover = matches!((best_tier, chosen_tier), (Some(b), Some(c)) if c != b);
    let mut summary = summarize(input, views, best_tier, chosen_tier, &candidates, &chosen, sticky);
    if panic {
        summary = format!(
            "panic routing: none of the {} endpoint{} is healthy, so the unhealthy and ejected \
             ones are tried anyway; {summary}",
            views.len(),
            plural(views.len())
        );
    }
    Decision {
        best_tier,
        chosen_tier,
        failover,
        panic,
        balancing,
        chosen,
        candidates,
        plan,
        summary,
    }
}

fn summarize(
    input: &ExplainInput<'_>,
    views: &[EndpointView],
    best_tier: Option<usize>,
    chosen_tier: Option<usize>,
    candidates: &[Candidate],
    chosen: &Option<Candidate>,
    sticky: bool,
) -> String {
    let Some(tier) = chosen_tier else {
        return match views.len() {
            0 => "no endpoints: a new connection is refused".to_owned(),
            n => format!(
                "none of the {n} endpoint{} is healthy: a new connection is refused",
                plural(n)
            ),
        };
    };
    let mut s = String::new();
    if let Some(best) = best_tier.filter(|b| *b != tier) {
        let down: Vec<String> = views
            .iter()
            .filter(|v| v.tier == best && !v.skipped.iter().any(structural))
            .map(|v| {
                let why: Vec<&str> = v.skipped.iter().map(|r| skip_text(*r)).collect();
                format!("{}/{} {}", v.cluster, v.address, why.join(", "))
            })
            .collect();
        s.push_str(&format!(
            "failover: tier {best} has no healthy endpoint ({}); ",
            down.join("; ")
        ));
    }
    let clusters: BTreeSet<&str> = candidates.iter().map(|c| c.cluster.as_str()).collect();
    let clusters: Vec<&str> = clusters.into_iter().collect();
    let n = candidates.len();
    match chosen {
        Some(c) => s.push_str(&format!(
            "a new connection from {} goes to tier {tier}: {}/{} (ClientIP affinity)",
            input.client.map(|c| c.to_string()).unwrap_or_default(),
            c.cluster,
            c.address
        )),
        None if sticky => s.push_str(&format!(
            "a new connection goes to tier {tier}: one of {n} endpoint{} in {}, by ClientIP \
             affinity (give ?client=IP to see which)",
            plural(n),
            clusters.join(", ")
        )),
        None => s.push_str(&format!(
            "a new connection goes to tier {tier}: one of {n} endpoint{} in {}, picked by power \
             of two choices on outstanding connections{}",
            plural(n),
            clusters.join(", "),
            if n > input.per_tier {
                format!(" (at most {} tried per connection)", input.per_tier)
            } else {
                String::new()
            }
        )),
    }
    s
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn endpoint(
    input: &ExplainInput<'_>,
    v: &EndpointView,
    index: usize,
    decision: &Decision,
    order: &[usize],
) -> EndpointExplanation {
    let export = input.selection.service.clusters.get(&v.cluster);
    let ep = export.and_then(|e| e.endpoints.iter().find(|ep| ep.address == v.address));
    let labels = match ep {
        Some(ep) => {
            select::endpoint_labels(input.selection.localities.get(&v.cluster), &v.cluster, ep)
        }
        None => BTreeMap::new(),
    };
    let priority = label_checks(input, &labels, v.tier);
    let local = v.cluster == *input.selection.local_cluster;
    let last_probe = if local { input.probes.get(&v.address).cloned() } else { None };
    let ejected_for = input
        .selection
        .state
        .ejected
        .get(&(v.cluster.clone(), v.address))
        .map(Duration::as_secs_f64);
    let reasons =
        v.skipped.iter().map(|r| reason(input, v, *r, last_probe.as_ref(), ejected_for)).collect();
    let role = if !v.healthy {
        "skipped"
    } else if decision.panic && order.contains(&index) {
        "panic"
    } else if decision
        .chosen
        .as_ref()
        .is_some_and(|c| c.cluster == v.cluster && c.address == v.address)
    {
        "chosen"
    } else if Some(v.tier) == decision.chosen_tier {
        "candidate"
    } else if order.contains(&index) {
        "fallback"
    } else {
        // Healthy but past the per-tier cap of its (worse) tier.
        "standby"
    };
    EndpointExplanation {
        cluster: v.cluster.clone(),
        address: v.address,
        port: v.port,
        hostname: ep.and_then(|e| e.hostname.clone()),
        tier: v.tier,
        labels,
        priority,
        health: v.health,
        ready: v.ready,
        outstanding: v.outstanding,
        healthy: v.healthy,
        path: v.path,
        skipped: v.skipped.clone(),
        reasons,
        role,
        last_probe,
        ejected_for_secs: ejected_for,
    }
}

/// Label by label: the first `priority.len() - tier` labels matched (the tier comes from
/// the data plane's ranking), the next one is where matching stopped, the rest do not count.
fn label_checks(
    input: &ExplainInput<'_>,
    labels: &BTreeMap<String, String>,
    tier: usize,
) -> Vec<LabelCheck> {
    let matched = input.selection.priority.len().saturating_sub(tier);
    let stopped_at = input.selection.priority.get(matched).map(|l| l.key.as_str());
    input
        .selection
        .priority
        .iter()
        .enumerate()
        .map(|(i, label)| {
            let c = failover::compare(label, input.selection.client_labels, labels);
            let wanted = c.wanted.map(str::to_owned);
            let actual = c.actual.map(str::to_owned);
            let key = &label.key;
            let (result, why) = if i < matched {
                let why = match &label.value {
                    Some(v) => format!("endpoint has {key}={v} as the entry requires"),
                    None => {
                        format!("client and endpoint both have {key}={}", c.actual.unwrap_or(""))
                    }
                };
                ("match", why)
            } else if i == matched {
                let why = match (c.wanted, c.actual, &label.value) {
                    (_, None, _) => format!("endpoint has no {key} label"),
                    (None, Some(_), _) => format!("client (this gateway) has no {key} label"),
                    (Some(w), Some(a), Some(_)) => {
                        format!("entry requires {key}={w}, endpoint has {a}")
                    }
                    (Some(w), Some(a), None) => format!("client has {key}={w}, endpoint has {a}"),
                };
                ("mismatch", why)
            } else {
                let would = if c.matched { "would match" } else { "would not match either" };
                (
                    "not_counted",
                    format!(
                        "not counted: {} did not match before it ({would})",
                        stopped_at.unwrap_or("an earlier label")
                    ),
                )
            };
            LabelCheck {
                key: key.clone(),
                literal: label.value.clone(),
                wanted,
                actual,
                result,
                why,
            }
        })
        .collect()
}

fn reason(
    input: &ExplainInput<'_>,
    v: &EndpointView,
    skip: SkipReason,
    probe: Option<&LastProbe>,
    ejected_for: Option<f64>,
) -> String {
    let peer = input.peers.iter().find(|p| p.cluster == v.cluster);
    match skip {
        SkipReason::Unhealthy if v.cluster == *input.selection.local_cluster => match probe {
            Some(p) if !p.ok => format!(
                "last probe of {} failed {} ago: {}",
                p.target,
                age(input.now, p.at),
                p.error.as_deref().unwrap_or("failed")
            ),
            Some(p) => format!(
                "recovering: the last probe of {} passed {} ago, healthyThreshold not reached yet",
                p.target,
                age(input.now, p.at)
            ),
            None => "this gateway's health check reports it unhealthy".to_owned(),
        },
        SkipReason::Unhealthy => {
            format!("{}'s gateway reports it unhealthy (its own probe fails)", v.cluster)
        }
        SkipReason::Ejected => format!(
            "ejected for {:.1}s more after consecutive connect failures",
            ejected_for.unwrap_or(0.0)
        ),
        SkipReason::ClusterUnreachable => match peer {
            Some(p) if p.draining => format!("peer {} is draining", v.cluster),
            Some(p) if !p.connected => format!(
                "tunnel to peer {} is down{}",
                v.cluster,
                p.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
            ),
            Some(p) if p.exports_withdrawn => format!(
                "peer {}'s exports are withdrawn: lease expired (last heard {})",
                v.cluster,
                p.last_seen_secs.map(|s| format!("{s:.1}s ago")).unwrap_or_else(|| "never".into())
            ),
            _ => format!("cluster {} is unreachable", v.cluster),
        },
        SkipReason::NotReady => "its EndpointSlice marks it not ready".to_owned(),
        SkipReason::PortNotExposed => {
            format!(
                "{} does not export port {} (port conflict)",
                v.cluster, input.selection.port.port
            )
        }
        SkipReason::NoMatchingPort => {
            format!("no port of the endpoint serves service port {}", input.selection.port.port)
        }
        SkipReason::NotTarget => "not the endpoint this VIP leads to".to_owned(),
    }
}

fn age(now: jiff::Timestamp, then: jiff::Timestamp) -> String {
    let ms = now.as_millisecond().saturating_sub(then.as_millisecond()).max(0);
    format!("{:.1}s", ms as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::select::tests::{Client, cid, ep, export, http_port, service};
    use fedgate_discovery::model::{
        Endpoint, HealthMap, LABEL_REGION, LABEL_SOURCE_CLUSTER, LABEL_ZONE, ServiceKey,
    };

    fn priority() -> Vec<PriorityLabel> {
        PriorityLabel::parse_all(&[LABEL_REGION, LABEL_SOURCE_CLUSTER, LABEL_ZONE])
    }

    fn peer(cluster: &str, connected: bool, draining: bool, withdrawn: bool) -> PeerStatus {
        PeerStatus {
            cluster: cid(cluster),
            address: "127.0.0.1:15443".into(),
            connected,
            draining,
            rtt_ms: None,
            path_mtu: None,
            last_seen_secs: Some(20.0),
            exports_version: None,
            exports_withdrawn: withdrawn,
            last_error: (!connected).then(|| "timed out".to_owned()),
            expected_replicas: 1,
            replicas: Vec::new(),
        }
    }

    struct World {
        service: ImportedService,
        unreachable: BTreeSet<ClusterId>,
        local_health: HealthMap,
        state: FrozenState,
        probes: BTreeMap<IpAddr, LastProbe>,
        peers: Vec<PeerStatus>,
        client: Option<IpAddr>,
    }

    fn world(service: ImportedService) -> World {
        World {
            service,
            unreachable: BTreeSet::new(),
            local_health: HealthMap::new(),
            state: FrozenState::default(),
            probes: BTreeMap::new(),
            peers: vec![peer("east2", true, false, false), peer("west", true, false, false)],
            client: None,
        }
    }

    fn run(w: &World) -> Explanation {
        run_with(w, &priority(), jiff::Timestamp::from_second(100).unwrap())
    }

    /// [`run`] with another failover priority and clock.
    fn run_with(w: &World, prio: &[PriorityLabel], now: jiff::Timestamp) -> Explanation {
        let client = Client::east();
        let port = http_port();
        explain(&ExplainInput {
            selection: SelectionInput {
                service: &w.service,
                port: &port,
                local_cluster: &client.local,
                client_labels: &client.labels,
                priority: prio,
                localities: &client.localities,
                unreachable: &w.unreachable,
                local_health: &w.local_health,
                state: &w.state,
                only: None,
                flat: &client.flat,
            },
            probes: &w.probes,
            peers: &w.peers,
            client: w.client,
            per_tier: 8,
            now,
        })
    }

    fn three() -> ImportedService {
        let h = Health::Healthy;
        service(
            vec![
                export("east", vec![ep("10.0.0.1", None, h), ep("10.0.0.2", Some("us-z"), h)]),
                export("east2", vec![ep("10.1.0.1", None, h)]),
                export("west", vec![ep("10.2.0.1", None, h)]),
            ],
            &["east", "east2", "west"],
        )
    }

    fn find<'a>(e: &'a Explanation, addr: &str) -> &'a EndpointExplanation {
        e.endpoints.iter().find(|x| x.address.to_string() == addr).expect(addr)
    }

    fn key(s: &str) -> (ClusterId, IpAddr) {
        let (c, a) = s.split_once('/').unwrap();
        (cid(c), a.parse().unwrap())
    }

    /// (what, world changes, chosen tier, candidates, failover, summary fragment,
    ///  (endpoint, role, reason fragment))
    type Case = (
        &'static str,
        Box<dyn Fn(&mut World)>,
        Option<usize>,
        Vec<&'static str>,
        bool,
        &'static str,
        Vec<(&'static str, &'static str, &'static str)>,
    );

    #[test]
    fn explain_scenarios() {
        let cases: Vec<Case> = vec![
            (
                "all healthy: own zone only",
                Box::new(|_| {}),
                Some(0),
                vec!["10.0.0.1"],
                false,
                "goes to tier 0: one of 1 endpoint in east, picked by power of two choices",
                vec![
                    ("10.0.0.1", "candidate", ""),
                    ("10.0.0.2", "fallback", ""),
                    ("10.1.0.1", "fallback", ""),
                    ("10.2.0.1", "fallback", ""),
                ],
            ),
            (
                "local probe fails: other zone of own cluster",
                Box::new(|w| {
                    let addr: IpAddr = "10.0.0.1".parse().unwrap();
                    w.local_health
                        .insert((ServiceKey::new("shop", "web"), addr), Health::Unhealthy);
                    w.probes.insert(
                        addr,
                        LastProbe {
                            target: "10.0.0.1:8080".parse().unwrap(),
                            at: jiff::Timestamp::from_second(98).unwrap(),
                            ok: false,
                            error: Some("connection refused".into()),
                            inconclusive: false,
                            health: Health::Unhealthy,
                        },
                    );
                }),
                Some(1),
                vec!["10.0.0.2"],
                true,
                "failover: tier 0 has no healthy endpoint (east/10.0.0.1 unhealthy)",
                vec![(
                    "10.0.0.1",
                    "skipped",
                    "last probe of 10.0.0.1:8080 failed 2.0s ago: connection refused",
                )],
            ),
            (
                "own cluster ejected and unhealthy, east2 down: other region",
                Box::new(|w| {
                    w.state.ejected.insert(key("east/10.0.0.1"), Duration::from_millis(4200));
                    w.local_health.insert(
                        (ServiceKey::new("shop", "web"), "10.0.0.2".parse().unwrap()),
                        Health::Unhealthy,
                    );
                    w.unreachable.insert(cid("east2"));
                    w.peers[0] = peer("east2", false, false, false);
                }),
                Some(3),
                vec!["10.2.0.1"],
                true,
                "goes to tier 3: one of 1 endpoint in west",
                vec![
                    ("10.0.0.1", "skipped", "ejected for 4.2s more"),
                    ("10.0.0.2", "skipped", "this gateway's health check reports it unhealthy"),
                    ("10.1.0.1", "skipped", "tunnel to peer east2 is down: timed out"),
                ],
            ),
            (
                "draining and withdrawn peers, remote unhealthy",
                Box::new(|w| {
                    w.service = service(
                        vec![
                            export("east2", vec![ep("10.1.0.1", None, Health::Healthy)]),
                            export(
                                "west",
                                vec![
                                    ep("10.2.0.1", None, Health::Unhealthy),
                                    Endpoint {
                                        ready: false,
                                        ..ep("10.2.0.2", None, Health::Healthy)
                                    },
                                ],
                            ),
                        ],
                        &["east2", "west"],
                    );
                    w.unreachable.insert(cid("east2"));
                    w.peers[0] = peer("east2", true, true, false);
                }),
                // Panic routing: nothing is healthy, so the endpoint that is only unhealthy is
                // tried; draining and not-ready ones never are.
                Some(3),
                vec!["10.2.0.1"],
                true,
                "panic routing: none of the 3 endpoints is healthy",
                vec![
                    ("10.1.0.1", "skipped", "peer east2 is draining"),
                    ("10.2.0.1", "panic", "west's gateway reports it unhealthy"),
                    ("10.2.0.2", "skipped", "EndpointSlice marks it not ready"),
                ],
            ),
            (
                "nothing healthy and nothing panic routing may try",
                Box::new(|w| {
                    w.service = service(
                        vec![
                            export("east2", vec![ep("10.1.0.1", None, Health::Unhealthy)]),
                            export(
                                "west",
                                vec![Endpoint {
                                    ready: false,
                                    ..ep("10.2.0.2", None, Health::Healthy)
                                }],
                            ),
                        ],
                        &["east2", "west"],
                    );
                    w.unreachable.insert(cid("east2"));
                    w.peers[0] = peer("east2", true, true, false);
                }),
                None,
                vec![],
                false,
                "none of the 2 endpoints is healthy: a new connection is refused",
                vec![
                    ("10.1.0.1", "skipped", "peer east2 is draining"),
                    ("10.2.0.2", "skipped", "EndpointSlice marks it not ready"),
                ],
            ),
            (
                "lease expired",
                Box::new(|w| {
                    w.unreachable.insert(cid("west"));
                    w.peers[1] = peer("west", true, false, true);
                }),
                Some(0),
                vec!["10.0.0.1"],
                false,
                "tier 0",
                vec![(
                    "10.2.0.1",
                    "skipped",
                    "exports are withdrawn: lease expired (last heard 20.0s ago)",
                )],
            ),
            (
                "port exposed only by west: best tier is west's",
                Box::new(|w| {
                    w.service = service(three().clusters.into_values().collect(), &["west"]);
                }),
                Some(3),
                vec!["10.2.0.1"],
                false,
                "goes to tier 3",
                vec![("10.0.0.1", "skipped", "east does not export port 80 (port conflict)")],
            ),
            (
                "ClientIP affinity with a client address names one endpoint",
                Box::new(|w| {
                    w.service = service(
                        vec![export(
                            "east",
                            vec![
                                ep("10.0.0.1", None, Health::Healthy),
                                ep("10.0.0.3", None, Health::Healthy),
                            ],
                        )],
                        &["east"],
                    );
                    w.service.session_affinity =
                        SessionAffinity::ClientIP { timeout_seconds: None };
                    w.client = Some("192.168.0.7".parse().unwrap());
                }),
                Some(0),
                vec!["10.0.0.1", "10.0.0.3"],
                false,
                "(ClientIP affinity)",
                vec![],
            ),
        ];
        for (what, change, tier, candidates, failover, summary, endpoints) in cases {
            let mut w = world(three());
            change(&mut w);
            let e = run(&w);
            assert_eq!(e.decision.chosen_tier, tier, "{what}");
            let got: Vec<String> =
                e.decision.candidates.iter().map(|c| c.address.to_string()).collect();
            assert_eq!(got, candidates, "{what}");
            assert_eq!(e.decision.failover, failover, "{what}");
            assert!(e.decision.summary.contains(summary), "{what}: {}", e.decision.summary);
            for (addr, role, reason) in endpoints {
                let x = find(&e, addr);
                assert_eq!(x.role, role, "{what}: {addr}");
                assert!(
                    x.reasons.iter().any(|r| r.contains(reason)) || reason.is_empty(),
                    "{what}: {addr}: {:?}",
                    x.reasons
                );
                // Every skip reason gets its words.
                assert_eq!(x.reasons.len(), x.skipped.len(), "{what}: {addr}");
            }
        }
    }

    #[test]
    fn client_ip_affinity_is_deterministic_and_matches_the_data_plane() {
        let mut w = world(service(
            vec![export(
                "east",
                (1..=5).map(|i| ep(&format!("10.0.0.{i}"), None, Health::Healthy)).collect(),
            )],
            &["east"],
        ));
        w.service.session_affinity = SessionAffinity::ClientIP { timeout_seconds: None };
        w.client = Some("192.168.3.4".parse().unwrap());
        let e = run(&w);
        let chosen = e.decision.chosen.clone().expect("deterministic pick");
        assert_eq!(e.decision.balancing, "client_ip_affinity");
        assert_eq!(run(&w).decision.chosen, Some(chosen.clone()));
        assert_eq!(find(&e, &chosen.address.to_string()).role, "chosen");
        // Without a client address the explanation does not pretend to know.
        w.client = None;
        let e = run(&w);
        assert_eq!(e.decision.chosen, None);
        assert!(e.decision.summary.contains("?client=IP"), "{}", e.decision.summary);
    }

    #[test]
    fn labels_say_where_matching_stopped() {
        let e = run(&world(three()));
        let checks = |addr: &str| -> Vec<(&'static str, String)> {
            find(&e, addr).priority.iter().map(|c| (c.result, c.why.clone())).collect()
        };
        // Own zone: everything matches.
        assert!(checks("10.0.0.1").iter().all(|(r, _)| *r == "match"));
        // Same cluster, zone from the EndpointSlice differs.
        let c = checks("10.0.0.2");
        assert_eq!(c[2], ("mismatch", format!("client has {LABEL_ZONE}=us-a, endpoint has us-z")));
        // Other region: the first label decides, the others do not count even where equal.
        let c = checks("10.2.0.1");
        assert_eq!(c[0].0, "mismatch");
        assert_eq!(c[1].0, "not_counted");
        assert!(c[1].1.contains(&format!("{LABEL_REGION} did not match")), "{c:?}");
        assert!(c[2].1.contains("would not match either"), "{c:?}");
        // Tier from the data plane and the label count agree for every endpoint.
        for x in &e.endpoints {
            let matched = x.priority.iter().filter(|c| c.result == "match").count();
            assert_eq!(x.tier, e.failover_priority.len() - matched, "{}", x.address);
        }
        // Literal entries compare with the value, not the client.
        let prio = PriorityLabel::parse_all(&[&format!("{LABEL_REGION}=eu")]);
        let w = world(three());
        assert_eq!(w.client, None);
        let e = run_with(&w, &prio, jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(e.decision.chosen_tier, Some(0));
        assert_eq!(e.decision.candidates[0].cluster, cid("west"));
        assert_eq!(
            find(&e, "10.0.0.1").priority[0].why,
            format!("entry requires {LABEL_REGION}=eu, endpoint has us")
        );
    }

    #[test]
    fn service_names_and_ports() {
        assert_eq!(parse_service("shop/web"), Ok(ServiceKey::new("shop", "web")));
        for bad in ["shop", "/web", "shop/", "a/b/c", ""] {
            assert_eq!(parse_service(bad), Err(ExplainError::BadServiceName(bad.into())), "{bad}");
        }
        let s = three();
        assert_eq!(pick_port(&s, None).unwrap().port, 80);
        assert_eq!(pick_port(&s, Some(80)).unwrap().port, 80);
        let err = pick_port(&s, Some(81)).unwrap_err();
        assert_eq!(err.code(), "not_found");
        assert!(err.to_string().contains("[80]"), "{err}");
        let mut none = three();
        none.ports.clear();
        assert_eq!(pick_port(&none, None), Err(ExplainError::NoPorts(none.key.clone())));
    }

    #[test]
    fn serializes_with_stable_field_names() {
        let json = serde_json::to_value(run(&world(three()))).unwrap();
        assert_eq!(json["decision"]["chosenTier"], 0);
        assert_eq!(json["decision"]["balancing"], "power_of_two_choices");
        assert_eq!(json["endpoints"][0]["priority"][0]["result"], "match");
        assert_eq!(json["endpoints"][0]["role"], "candidate");
        assert_eq!(json["failoverPriority"][0]["key"], LABEL_REGION);
    }
}
