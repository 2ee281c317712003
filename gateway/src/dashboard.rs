//! The live dashboard served at the admin `/`: one self-contained page (no external assets)
//! that polls the JSON debug views every second, and the views only it needs
//! (`/debug/clusters`, `/debug/traffic`, `/debug/failovers`, `/debug/probes`,
//! `/debug/explain`, `/debug/certificates`). docs/dashboard.md lists the views, their JSON and the page's element ids.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use fedgate_discovery::model::{ClusterId, ImportSnapshot, PeerStatus};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use fedgate_tunnel::expiry::{CertExpiry, CertRef, EXPIRY_WARNING, expiry_warnings, rfc3339};
use fedgate_tunnel::tls::Credentials;
use fedgate_tunnel::{LeafValidity, ReloadStatus};

use crate::admin::{DebugView, Query};
use crate::dataplane::DebugHandle;
use crate::dataplane::inspect::ExplainQuery;
use crate::explain::{self, ExplainError};

/// The dashboard page, embedded in the binary.
pub const PAGE: &str = include_str!("dashboard.html");

/// One cluster of the clusterset as this gateway sees it (`/debug/clusters`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRow {
    pub id: ClusterId,
    /// This gateway's own cluster.
    pub local: bool,
    /// Configured as a peer.
    pub peer: bool,
    pub region: Option<String>,
    pub zone: Option<String>,
    /// `local`, `up`, `down`, `draining`, `withdrawn` (lease expired), `unknown` (known from
    /// imports but not a configured peer).
    pub status: &'static str,
    pub address: Option<String>,
    pub rtt_ms: Option<f64>,
    /// UDP payload size the QUIC connection uses now (path MTU discovery).
    pub path_mtu: Option<u16>,
    /// Seconds since the peer was last heard from: the lease runs from then.
    pub lease_age_secs: Option<f64>,
    /// Seconds left before its exports are withdrawn if it stays silent.
    pub lease_remaining_secs: Option<f64>,
    pub exports_version: Option<u64>,
    pub last_error: Option<String>,
    /// Imported services this cluster exports endpoints for.
    pub services: usize,
    pub endpoints: usize,
    /// Replicas the peer's configured addresses resolve to.
    pub expected_replicas: Option<usize>,
    /// Each replica of the peer: connected ones, and dialed addresses without a connection.
    pub replicas: Vec<ReplicaRow>,
}

/// One replica of a peer (`/debug/clusters`, the dashboard, `fedgate status`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaRow {
    pub address: String,
    pub instance: Option<String>,
    pub connected: bool,
    pub draining: bool,
    pub rtt_ms: Option<f64>,
    /// Seconds since it was last heard from.
    pub lease_age_secs: Option<f64>,
    pub exports_version: Option<u64>,
    pub last_error: Option<String>,
}

/// The cluster list: this cluster, every configured peer and every cluster the imports name.
/// Pure.
pub fn clusters(
    local: &ClusterId,
    snapshot: &ImportSnapshot,
    peers: &[PeerStatus],
    lease: Duration,
) -> Vec<ClusterRow> {
    let mut ids: BTreeSet<ClusterId> = snapshot.localities.keys().cloned().collect();
    ids.insert(local.clone());
    ids.extend(peers.iter().map(|p| p.cluster.clone()));
    let mut services: BTreeMap<&ClusterId, (usize, usize)> = BTreeMap::new();
    for s in snapshot.services.values() {
        for (c, e) in &s.clusters {
            let entry = services.entry(c).or_default();
            entry.0 += 1;
            entry.1 += e.endpoints.len();
        }
    }
    ids.into_iter()
        .map(|id| {
            let peer = peers.iter().find(|p| p.cluster == id);
            let locality = snapshot.localities.get(&id);
            let status = match peer {
                _ if id == *local => "local",
                Some(p) if p.draining => "draining",
                Some(p) if p.exports_withdrawn => "withdrawn",
                Some(p) if p.connected => "up",
                Some(_) => "down",
                None => "unknown",
            };
            let (svc, eps) = services.get(&id).copied().unwrap_or_default();
            ClusterRow {
                local: id == *local,
                peer: peer.is_some(),
                region: locality.and_then(|l| l.region.clone()),
                zone: locality.and_then(|l| l.zone.clone()),
                status,
                address: peer.map(|p| p.address.clone()),
                rtt_ms: peer.and_then(|p| p.rtt_ms),
                path_mtu: peer.and_then(|p| p.path_mtu),
                lease_age_secs: peer.and_then(|p| p.last_seen_secs),
                lease_remaining_secs: peer
                    .and_then(|p| p.last_seen_secs)
                    .map(|s| (lease.as_secs_f64() - s).max(0.0)),
                exports_version: peer.and_then(|p| p.exports_version),
                last_error: peer.and_then(|p| p.last_error.clone()),
                services: svc,
                endpoints: eps,
                expected_replicas: peer.map(|p| p.expected_replicas),
                replicas: peer
                    .map(|p| {
                        p.replicas
                            .iter()
                            .map(|r| ReplicaRow {
                                address: r.address.clone(),
                                instance: r.instance.clone(),
                                connected: r.connected,
                                draining: r.draining,
                                rtt_ms: r.rtt_ms,
                                lease_age_secs: r.last_seen_secs,
                                exports_version: r.exports_version,
                                last_error: r.last_error.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                id,
            }
        })
        .collect()
}

/// Parses the query of `/debug/explain`: `service=ns/name`, optional `port=N`, `client=IP`.
pub fn explain_query(q: &Query) -> Result<ExplainQuery, ExplainError> {
    let service = explain::parse_service(q.get("service").map(String::as_str).unwrap_or(""))?;
    let port = match q.get("port").filter(|p| !p.is_empty()) {
        Some(p) => Some(p.parse::<u16>().map_err(|_| ExplainError::BadPort(p.clone()))?),
        None => None,
    };
    let client = match q.get("client").filter(|c| !c.is_empty()) {
        Some(c) => Some(c.parse::<IpAddr>().map_err(|_| ExplainError::BadClient(c.clone()))?),
        None => None,
    };
    Ok(ExplainQuery { service, port, client })
}

/// The JSON error answer of a view; the admin server turns `code` into the HTTP status.
pub fn error_json(e: &ExplainError) -> Value {
    json!({ "error": e.to_string(), "code": e.code() })
}

/// Registers the dashboard's views (see the module doc) next to the composition root's.
pub fn register_views(
    views: &mut BTreeMap<&'static str, DebugView>,
    debug: &DebugHandle,
    local: ClusterId,
    imports: watch::Receiver<Arc<ImportSnapshot>>,
    peers: watch::Receiver<Arc<Vec<PeerStatus>>>,
    lease: Duration,
) {
    let p = peers.clone();
    views.insert(
        "clusters",
        Arc::new(move |_: &Query| {
            let snapshot = imports.borrow().clone();
            let peers = p.borrow().clone();
            json!(clusters(&local, &snapshot, &peers, lease))
        }),
    );
    let d = debug.clone();
    views.insert("traffic", Arc::new(move |_: &Query| json!(d.traffic())));
    let d = debug.clone();
    views.insert("failovers", Arc::new(move |_: &Query| json!(d.failovers())));
    let d = debug.clone();
    views.insert("probes", Arc::new(move |_: &Query| json!(d.probes())));
    let d = debug.clone();
    views.insert(
        "explain",
        Arc::new(move |q: &Query| {
            let peers = peers.borrow().clone();
            match explain_query(q).and_then(|query| d.explain(&query, &peers)) {
                Ok(e) => json!(e),
                Err(e) => error_json(&e),
            }
        }),
    );
}

/// `/debug/certificates` at `now` (unix seconds): our leaf's and each peer's last leaf's
/// `notAfter`, the reloads so far, and the warnings of certificates within
/// [`EXPIRY_WARNING`] of expiry. Pure.
pub fn certificates(
    own: Option<LeafValidity>,
    expiries: &[CertExpiry],
    reload: &ReloadStatus,
    now: i64,
) -> Value {
    let row = |e: &CertExpiry| {
        json!({
            "cert": match e.cert { CertRef::Own => "own", CertRef::Peer(_) => "peer" },
            "cluster": match &e.cert { CertRef::Own => None, CertRef::Peer(id) => Some(id.as_str()) },
            "notAfter": rfc3339(e.not_after),
            "notAfterUnix": e.not_after,
            "remainingSecs": e.not_after.saturating_sub(now),
        })
    };
    let warnings: Vec<Value> = expiry_warnings(expiries, now, EXPIRY_WARNING)
        .iter()
        .map(|w| {
            json!({
                "cert": match w.cert { CertRef::Own => "own", CertRef::Peer(_) => "peer" },
                "cluster": match &w.cert { CertRef::Own => None, CertRef::Peer(id) => Some(id.as_str()) },
                "notAfter": rfc3339(w.not_after),
                "remainingSecs": w.remaining_secs,
                "message": w.message(),
            })
        })
        .collect();
    json!({
        "own": own.map(|v| json!({
            "notBefore": rfc3339(v.not_before),
            "notAfter": rfc3339(v.not_after),
            "notAfterUnix": v.not_after,
            "remainingSecs": v.not_after.saturating_sub(now),
        })),
        "peers": expiries.iter().filter(|e| e.cert != CertRef::Own).map(row).collect::<Vec<_>>(),
        "reload": {
            "reloads": reload.reloads,
            "failures": reload.failures,
            "lastError": reload.last_error,
        },
        "warnings": warnings,
    })
}

/// The certificate entries of `/debug/problems`: expiry warnings, and the last reload when it
/// was refused (the old certificate is still in use). Pure.
pub fn certificate_problems(certificates: &Value) -> Vec<Value> {
    let mut out: Vec<Value> = certificates["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let object = match w["cluster"].as_str() {
                Some(peer) => format!("certificate of peer {peer}"),
                None => "certificate of this gateway".to_owned(),
            };
            json!({"kind": "certificateExpiry", "object": object, "reason": w["message"]})
        })
        .collect();
    if let Some(error) = certificates["reload"]["lastError"].as_str() {
        out.push(json!({
            "kind": "certificateReload",
            "object": "tls.cert, tls.key, tls.ca",
            "reason": error,
        }));
    }
    out
}

/// Registers `/debug/certificates` over the tunnel's credentials and reload status, and adds
/// its problems to the `problems` view registered before (kept as is otherwise).
pub fn register_certificate_views(
    views: &mut BTreeMap<&'static str, DebugView>,
    credentials: Arc<Credentials>,
    reload: watch::Receiver<ReloadStatus>,
) {
    let view: DebugView = Arc::new(move |_: &Query| {
        let now = jiff::Timestamp::now().as_second();
        certificates(credentials.validity(), &credentials.expiries(), &reload.borrow(), now)
    });
    let certs = view.clone();
    views.insert("certificates", view);
    if let Some(problems) = views.get("problems").cloned() {
        views.insert(
            "problems",
            Arc::new(move |q: &Query| {
                let mut all = problems(q);
                if let Some(list) = all.as_array_mut() {
                    list.extend(certificate_problems(&certs(q)));
                }
                all
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedgate_discovery::model::{Locality, ServiceKey};

    fn cid(s: &str) -> ClusterId {
        ClusterId::new(s).unwrap()
    }

    fn peer(id: &str, connected: bool, draining: bool, withdrawn: bool) -> PeerStatus {
        PeerStatus {
            cluster: cid(id),
            address: format!("{id}:15443"),
            connected,
            draining,
            rtt_ms: connected.then_some(0.5),
            path_mtu: connected.then_some(1452),
            last_seen_secs: Some(4.0),
            exports_version: Some(3),
            exports_withdrawn: withdrawn,
            last_error: None,
            expected_replicas: 1,
            replicas: Vec::new(),
        }
    }

    #[test]
    fn cluster_list_statuses() {
        let mut snapshot = ImportSnapshot::default();
        let loc =
            Locality { region: Some("r".into()), zone: Some("z".into()), ..Default::default() };
        snapshot.localities.insert(cid("east"), loc.clone());
        snapshot.localities.insert(cid("far"), loc);
        let mut west = peer("west", true, false, false);
        west.expected_replicas = 2;
        west.replicas = vec![
            fedgate_discovery::model::ReplicaStatus {
                address: "10.0.0.2:15443".into(),
                instance: Some("a1b2".into()),
                connected: true,
                last_seen_secs: Some(0.5),
                ..Default::default()
            },
            fedgate_discovery::model::ReplicaStatus {
                address: "10.0.0.3:15443".into(),
                last_error: Some("timed out".into()),
                ..Default::default()
            },
        ];
        let peers = vec![
            west,
            peer("north", false, false, false),
            peer("south", true, true, false),
            peer("gone", false, false, true),
        ];
        let rows = clusters(&cid("east"), &snapshot, &peers, Duration::from_secs(15));
        let status: Vec<(&str, &str)> = rows.iter().map(|r| (r.id.as_str(), r.status)).collect();
        assert_eq!(
            status,
            vec![
                ("east", "local"),
                ("far", "unknown"),
                ("gone", "withdrawn"),
                ("north", "down"),
                ("south", "draining"),
                ("west", "up"),
            ]
        );
        let west = rows.iter().find(|r| r.id.as_str() == "west").unwrap();
        assert_eq!(west.lease_remaining_secs, Some(11.0));
        assert_eq!(west.rtt_ms, Some(0.5));
        assert_eq!(west.path_mtu, Some(1452));
        // Each replica with its instance, state and lease age.
        assert_eq!(west.expected_replicas, Some(2));
        let replicas: Vec<String> = west
            .replicas
            .iter()
            .map(|r| {
                let (instance, error) = (r.instance.as_deref(), r.last_error.as_deref());
                format!(
                    "{} {instance:?} {} {:?} {error:?}",
                    r.address, r.connected, r.lease_age_secs
                )
            })
            .collect();
        assert_eq!(
            replicas,
            [
                "10.0.0.2:15443 Some(\"a1b2\") true Some(0.5) None",
                "10.0.0.3:15443 None false None Some(\"timed out\")",
            ]
        );
        assert_eq!(rows[0].region.as_deref(), Some("r"));
        assert!(rows[0].local && !rows[0].peer);
    }

    #[test]
    fn certificate_view_and_problems() {
        let day = 86_400;
        let now = 1_000 * day;
        let own = LeafValidity { not_before: now - 80 * day, not_after: now + 10 * day };
        let expiries = [
            CertExpiry { cert: CertRef::Own, not_after: own.not_after },
            CertExpiry { cert: CertRef::Peer(cid("beta")), not_after: now + 2 * day },
        ];
        let mut reload = ReloadStatus::default();
        let v = certificates(Some(own), &expiries, &reload, now);
        assert_eq!(v["own"]["remainingSecs"], 10 * day);
        assert_eq!(v["peers"][0]["cluster"], "beta");
        assert_eq!(v["peers"].as_array().map(Vec::len), Some(1));
        assert_eq!(v["warnings"].as_array().map(Vec::len), Some(1), "{v}");
        let problems = certificate_problems(&v);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0]["object"], "certificate of peer beta");
        assert!(
            problems[0]["reason"].as_str().is_some_and(|r| r.contains("expires at")),
            "{problems:?}"
        );

        // Our own certificate within 7 days, and a refused reload.
        reload.failures = 1;
        reload.last_error = Some("certificate /tls/alpha.crt expired at ...".to_owned());
        let v = certificates(Some(own), &expiries, &reload, now + 4 * day);
        let problems = certificate_problems(&v);
        let kinds: Vec<&str> = problems.iter().filter_map(|p| p["kind"].as_str()).collect();
        assert_eq!(kinds, ["certificateExpiry", "certificateExpiry", "certificateReload"]);
        assert_eq!(problems[1]["object"], "certificate of this gateway");
    }

    #[test]
    fn explain_query_table() {
        let q = |pairs: &[(&str, &str)]| -> Query {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        assert_eq!(
            explain_query(&q(&[("service", "shop/web"), ("port", "80")])),
            Ok(ExplainQuery {
                service: ServiceKey::new("shop", "web"),
                port: Some(80),
                client: None
            })
        );
        assert_eq!(
            explain_query(&q(&[("service", "shop/web"), ("client", "10.0.0.1"), ("port", "")]))
                .map(|e| (e.port, e.client)),
            Ok((None, Some("10.0.0.1".parse().unwrap())))
        );
        assert_eq!(explain_query(&q(&[])).unwrap_err().code(), "bad_request");
        assert_eq!(
            explain_query(&q(&[("service", "shop/web"), ("port", "http")])),
            Err(ExplainError::BadPort("http".into()))
        );
        let e = explain_query(&q(&[("service", "shop/web"), ("client", "x")])).unwrap_err();
        assert_eq!(error_json(&e)["code"], "bad_request");
    }
}
