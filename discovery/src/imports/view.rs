//! `/debug/imports` and `/debug/exports`: the import set renders its own state as JSON, so the
//! gateway's composition root only hands these views to the admin server. The JSON shapes are
//! read by `fedgate status`, `fedgate explain` and the end-to-end tests: change them only
//! together.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::watch;

use super::StatusMap;
use crate::model::{ImportSnapshot, ImportedService, ServiceKey};

/// Query parameters of a debug request (`?service=ns/name`, `?namespace=ns`, `?summary=1`).
pub type Query = BTreeMap<String, String>;

/// A debug view over the latest snapshot: reads it when a request comes in, never blocks the
/// import set's task.
pub fn imports_view(
    rx: watch::Receiver<Arc<ImportSnapshot>>,
) -> impl Fn(&Query) -> Value + Send + Sync + 'static {
    move |q: &Query| imports_json(&rx.borrow(), q)
}

/// `/debug/exports` over the latest conditions of the local ServiceExports.
pub fn exports_view(
    rx: watch::Receiver<Arc<StatusMap>>,
) -> impl Fn(&Query) -> Value + Send + Sync + 'static {
    move |_: &Query| crate::exports::statuses_json(&rx.borrow())
}

/// `/debug/imports`: every import as flat JSON; `?service=ns/name` or `?namespace=ns` narrow
/// it, `?summary=1` answers only counts (cheap to poll).
pub fn imports_json(snapshot: &Arc<ImportSnapshot>, q: &Query) -> Value {
    // Lookups go through the ordered map (namespace, then name) so that polling one service
    // or one namespace costs O(log n + k), not a walk over every import.
    let selected: Box<dyn Iterator<Item = &Arc<ImportedService>>> =
        if let Some((ns, name)) = q.get("service").and_then(|k| k.split_once('/')) {
            Box::new(snapshot.services.get(&ServiceKey::new(ns, name)).into_iter())
        } else if let Some(ns) = q.get("namespace") {
            let ns = ns.clone();
            Box::new(
                snapshot
                    .services
                    .range(ServiceKey::new(ns.clone(), "")..)
                    .take_while(move |(k, _)| k.namespace == ns)
                    .map(|(_, s)| s),
            )
        } else {
            Box::new(snapshot.services.values())
        };
    if q.get("summary").is_some_and(|v| v == "1" || v == "true") {
        let mut count = 0usize;
        let mut endpoints = 0usize;
        for s in selected {
            count += 1;
            endpoints += s.clusters.values().map(|c| c.endpoints.len()).sum::<usize>();
        }
        return json!({ "version": snapshot.version, "services": count, "endpoints": endpoints });
    }
    Value::Array(selected.map(|s| import_json(s)).collect())
}

/// One import of `/debug/imports`.
pub fn import_json(s: &ImportedService) -> Value {
    json!({
        "namespace": s.key.namespace,
        "name": s.key.name,
        "type": s.service_type.as_str(),
        "ips": s.ips,
        "ports": s.ports.iter().map(|p| json!({
            "name": p.port.name,
            "protocol": p.port.protocol.as_str(),
            "port": p.port.port,
            "appProtocol": p.port.app_protocol,
            "clusters": p.clusters,
        })).collect::<Vec<_>>(),
        "sessionAffinity": s.session_affinity,
        "winner": s.winner,
        "conflicts": s.conflicts,
        "clusters": s.clusters.iter().map(|(id, e)| (id.to_string(), json!({
            "created": e.created,
            "type": e.service_type.as_str(),
            "endpoints": e.endpoints.iter().map(|ep| json!({
                "address": ep.address,
                "hostname": ep.hostname,
                "ready": ep.ready,
                "zone": ep.zone,
                "health": ep.health,
            })).collect::<Vec<_>>(),
        }))).collect::<serde_json::Map<String, Value>>(),
    })
}
