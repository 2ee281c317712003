//! The cluster's identity from KEP-2149's ClusterProperties (`about.k8s.io`):
//! `cluster.clusterset.k8s.io` holds the cluster id, `clusterset.k8s.io` the clusterset the
//! cluster is a member of.
//!
//! [`resolve`] is the pure decision: the ClusterProperty's id when there is one, else the
//! config's `cluster.id`; both present and different is refused (the gateway certificate names
//! one id, and KEP-2149 makes the id immutable while the cluster is a member), neither present
//! is refused with both ways to fix it. [`read_properties`] is the one API read around it,
//! done at start-up; while the gateway runs, [`IdentityGuard`] reads the properties again
//! every [`RECHECK_INTERVAL`] and reports a changed value ([`drift`]) as a problem and a warning,
//! keeping the running id (nothing restarts: the certificate names the old id).

use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::KubeError;
use super::crd::{CLUSTER_ID_PROPERTY, CLUSTERSET_PROPERTY, ClusterProperty};
use crate::model::{ClusterId, InvalidClusterId};

/// The two ClusterProperties as found in the cluster (`spec.value`, trimmed); `None` when the
/// object (or the CRD) does not exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterProperties {
    /// `cluster.clusterset.k8s.io`.
    pub cluster_id: Option<String>,
    /// `clusterset.k8s.io`.
    pub clusterset: Option<String>,
}

/// Where the resolved cluster id came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdSource {
    /// The ClusterProperty `cluster.clusterset.k8s.io` (the config may name the same id).
    ClusterProperty,
    /// The config's `cluster.id` (no ClusterProperty).
    Config,
}

impl IdSource {
    pub fn as_str(self) -> &'static str {
        match self {
            IdSource::ClusterProperty => "ClusterProperty cluster.clusterset.k8s.io",
            IdSource::Config => "config cluster.id",
        }
    }
}

/// Why the cluster's identity cannot be settled; the gateway does not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("ClusterProperty {CLUSTER_ID_PROPERTY}: {0}: fix its spec.value")]
    InvalidProperty(#[source] InvalidClusterId),
    #[error(
        "the ClusterProperty {CLUSTER_ID_PROPERTY} says this cluster is \"{property}\" but \
         cluster.id is \"{config}\": make them agree, or leave cluster.id out of the config (the \
         gateway certificate must name the id, and KEP-2149 ids do not change while the cluster \
         is a member)"
    )]
    Mismatch { property: ClusterId, config: ClusterId },
    #[error(
        "no cluster id: the config has no cluster.id and the cluster has no ClusterProperty \
         {CLUSTER_ID_PROPERTY}: set cluster.id in the config, or create the ClusterProperty \
         (apiVersion: about.k8s.io/v1alpha1, kind: ClusterProperty, metadata.name: \
         {CLUSTER_ID_PROPERTY}, spec.value: <cluster id>)"
    )]
    Missing,
    #[error(
        "the ClusterProperty {CLUSTERSET_PROPERTY} says this cluster is a member of clusterset \
         \"{property}\" but cluster.clusterset is \"{config}\": make them agree (the clusterset \
         is the trust domain of the gateway certificates)"
    )]
    ClustersetMismatch { property: String, config: String },
}

impl IdentityError {
    /// A bounded label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            IdentityError::InvalidProperty(_) => "invalid_cluster_property",
            IdentityError::Mismatch { .. } => "cluster_id_mismatch",
            IdentityError::Missing => "no_cluster_id",
            IdentityError::ClustersetMismatch { .. } => "clusterset_mismatch",
        }
    }
}

/// The cluster id to run as, from the config's `cluster.id` (if set), its `cluster.clusterset`
/// and the ClusterProperties found.
pub fn resolve(
    configured: Option<&ClusterId>,
    clusterset: &str,
    found: &ClusterProperties,
) -> Result<(ClusterId, IdSource), IdentityError> {
    if let Some(member_of) = &found.clusterset
        && member_of != clusterset
    {
        return Err(IdentityError::ClustersetMismatch {
            property: member_of.clone(),
            config: clusterset.to_owned(),
        });
    }
    let property = found
        .cluster_id
        .as_deref()
        .map(ClusterId::new)
        .transpose()
        .map_err(IdentityError::InvalidProperty)?;
    match (property, configured) {
        (Some(property), Some(config)) if property != *config => {
            Err(IdentityError::Mismatch { property, config: config.clone() })
        }
        (Some(property), _) => Ok((property, IdSource::ClusterProperty)),
        (None, Some(config)) => Ok((config.clone(), IdSource::Config)),
        (None, None) => Err(IdentityError::Missing),
    }
}

/// Reads the two ClusterProperties (a GET each; a missing object or CRD is `None`).
pub async fn read_properties(client: &kube::Client) -> Result<ClusterProperties, KubeError> {
    let api: Api<ClusterProperty> = Api::all(client.clone());
    let mut values = [None, None];
    for (slot, name) in values.iter_mut().zip([CLUSTER_ID_PROPERTY, CLUSTERSET_PROPERTY]) {
        *slot = match api.get_opt(name).await {
            Ok(p) => p.map(|p| p.spec.value.trim().to_owned()),
            Err(kube::Error::Api(e)) if e.code == 404 => None,
            Err(source) => {
                return Err(KubeError::Api {
                    what: format!("reading ClusterProperty {name}"),
                    source,
                });
            }
        };
    }
    let [cluster_id, clusterset] = values;
    Ok(ClusterProperties { cluster_id, clusterset })
}

/// `/debug/problems` rows of drift findings. Pure.
pub fn problem_rows(findings: &[String]) -> Vec<serde_json::Value> {
    let row = |r: &String| serde_json::json!({"kind": "clusterProperty", "object": "ClusterProperty", "reason": r});
    findings.iter().map(row).collect()
}

/// How often a running gateway reads the ClusterProperties again: a GET of each per minute.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(60);

/// What is wrong with the ClusterProperties found now for a gateway running as `running` in
/// `clusterset` (KEP-2149 forbids changing them while the cluster is a member); empty when
/// they agree (or are absent: a property removed later changes nothing for the gateway).
pub fn drift(running: &ClusterId, clusterset: &str, found: &ClusterProperties) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(id) = &found.cluster_id
        && id != running.as_str()
    {
        out.push(format!(
            "the ClusterProperty {CLUSTER_ID_PROPERTY} now says \"{id}\" but this gateway runs as \
             \"{running}\" (read at start-up; KEP-2149 forbids changing it while the cluster is a \
             member): restore it, or restart the gateway with a certificate for the new id"
        ));
    }
    if let Some(set) = &found.clusterset
        && set != clusterset
    {
        out.push(format!(
            "the ClusterProperty {CLUSTERSET_PROPERTY} now says clusterset \"{set}\" but this \
             gateway runs in \"{clusterset}\": restore it, or restart the gateway configured for \
             the new clusterset"
        ));
    }
    out
}

/// Reads the ClusterProperties again every [`RECHECK_INTERVAL`] while the gateway runs and
/// publishes what [`drift`] finds (a failed read keeps the last finding).
pub struct IdentityGuard {
    client: kube::Client,
    running: ClusterId,
    clusterset: String,
    problems: watch::Sender<Arc<Vec<String>>>,
}

impl IdentityGuard {
    pub fn new(client: kube::Client, running: ClusterId, clusterset: String) -> Self {
        let (problems, _) = watch::channel(Arc::new(Vec::new()));
        Self { client, running, clusterset, problems }
    }

    /// The current findings (for `/debug/problems`).
    pub fn problems(&self) -> watch::Receiver<Arc<Vec<String>>> {
        self.problems.subscribe()
    }

    /// The `/debug/problems` rows of the findings: one per ClusterProperty that changed since
    /// start-up, read when a request comes in.
    pub fn problems_view(&self) -> impl Fn() -> Vec<serde_json::Value> + Send + Sync + 'static {
        let problems = self.problems.subscribe();
        move || problem_rows(&problems.borrow())
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(RECHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is now: start-up just read them
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let found = match read_properties(&self.client).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::debug!(error = %e, "reading the ClusterProperties again failed");
                    continue;
                }
            };
            let now = drift(&self.running, &self.clusterset, &found);
            if **self.problems.borrow() != now {
                for p in &now {
                    tracing::warn!(problem = %p, "ClusterProperty changed while running; keeping the running identity");
                }
                self.problems.send_replace(Arc::new(now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClusterId {
        ClusterId::new(s).expect("id")
    }

    #[test]
    fn findings_become_problem_rows() {
        assert!(problem_rows(&[]).is_empty());
        let rows = problem_rows(&["cluster id changed".to_owned()]);
        assert_eq!(
            rows,
            [serde_json::json!({
                "kind": "clusterProperty", "object": "ClusterProperty", "reason": "cluster id changed"
            })]
        );
    }

    #[test]
    fn a_changed_property_is_reported_and_an_absent_one_is_not() {
        let props = |id: Option<&str>, set: Option<&str>| ClusterProperties {
            cluster_id: id.map(str::to_owned),
            clusterset: set.map(str::to_owned),
        };
        let east = id("east");
        assert!(drift(&east, "prod", &props(Some("east"), Some("prod"))).is_empty());
        assert!(drift(&east, "prod", &props(None, None)).is_empty(), "removed later: no change");
        let got = drift(&east, "prod", &props(Some("west"), Some("staging")));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got[0].starts_with(
                "the ClusterProperty cluster.clusterset.k8s.io now says \"west\" but this gateway runs as \"east\""
            ),
            "{got:?}"
        );
        assert!(
            got[1].starts_with(
                "the ClusterProperty clusterset.k8s.io now says clusterset \"staging\" but this gateway runs in \"prod\""
            ),
            "{got:?}"
        );
    }

    #[test]
    fn the_cluster_property_wins_else_the_config_else_an_error() {
        struct Case {
            name: &'static str,
            config: Option<&'static str>,
            property: Option<&'static str>,
            member_of: Option<&'static str>,
            want: Result<(&'static str, IdSource), &'static str>,
        }
        let cases = [
            Case {
                name: "property only",
                config: None,
                property: Some("west"),
                member_of: None,
                want: Ok(("west", IdSource::ClusterProperty)),
            },
            Case {
                name: "config only",
                config: Some("east"),
                property: None,
                member_of: None,
                want: Ok(("east", IdSource::Config)),
            },
            Case {
                name: "both, same",
                config: Some("east"),
                property: Some("east"),
                member_of: Some("prod"),
                want: Ok(("east", IdSource::ClusterProperty)),
            },
            Case {
                name: "both, different",
                config: Some("east"),
                property: Some("west"),
                member_of: None,
                want: Err(
                    "the ClusterProperty cluster.clusterset.k8s.io says this cluster is \"west\" but cluster.id is \"east\"",
                ),
            },
            Case {
                name: "neither",
                config: None,
                property: None,
                member_of: None,
                want: Err(
                    "no cluster id: the config has no cluster.id and the cluster has no ClusterProperty cluster.clusterset.k8s.io: set cluster.id in the config, or create the ClusterProperty",
                ),
            },
            Case {
                name: "invalid property, even with a config id",
                config: Some("east"),
                property: Some("East_1"),
                member_of: None,
                want: Err(
                    "ClusterProperty cluster.clusterset.k8s.io: invalid cluster id \"East_1\": may contain only lowercase letters, digits and '-' (an RFC 1123 label): fix its spec.value",
                ),
            },
            Case {
                name: "a DNS subdomain is not a label",
                config: None,
                property: Some("east.example.com"),
                member_of: None,
                want: Err(
                    "ClusterProperty cluster.clusterset.k8s.io: invalid cluster id \"east.example.com\"",
                ),
            },
            Case {
                name: "member of another clusterset",
                config: Some("east"),
                property: None,
                member_of: Some("staging"),
                want: Err(
                    "the ClusterProperty clusterset.k8s.io says this cluster is a member of clusterset \"staging\" but cluster.clusterset is \"prod\"",
                ),
            },
        ];
        for c in cases {
            let found = ClusterProperties {
                cluster_id: c.property.map(str::to_owned),
                clusterset: c.member_of.map(str::to_owned),
            };
            let configured = c.config.map(id);
            let got = resolve(configured.as_ref(), "prod", &found);
            match (got, c.want) {
                (Ok((got, source)), Ok((want, want_source))) => {
                    assert_eq!((got.as_str(), source), (want, want_source), "case {:?}", c.name);
                }
                (Err(e), Err(prefix)) => {
                    let msg = e.to_string();
                    assert!(msg.starts_with(prefix), "case {:?}: {msg}", c.name);
                }
                (got, want) => panic!("case {:?}: got {got:?}, want {want:?}", c.name),
            }
        }
    }
}
