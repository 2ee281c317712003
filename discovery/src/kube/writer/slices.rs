//! The EndpointSlices the writer owns: per import and source cluster, the cluster's endpoints
//! (one address family and port set per slice, at most [`MAX_ENDPOINTS_PER_SLICE`] endpoints),
//! and in `front.mode: kube` the slice of a derived Service that points at the gateway pod.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Value, json};

use crate::failover;
use crate::kube::source::LABEL_SLICE_MANAGED_BY;
use crate::model::{
    ClusterId, Endpoint, Health, ImportSnapshot, ImportedService, LABEL_SERVICE_NAME,
    LABEL_SOURCE_CLUSTER, LABEL_ZONE, MANAGED_BY, ServiceKey, ServicePort,
};

use super::actions::{DesiredObject, ObjRef, WriteKind};
use super::bodies::{family_of, family_str, managed_labels, service_port_json, slice_name};
use super::{FrontSettings, LABEL_KUBE_SERVICE_NAME, MAX_ENDPOINTS_PER_SLICE};

/// A cluster's endpoints as EndpointSlices: grouped by address family and by the ports they
/// serve the exposed service ports on, cut into slices of at most
/// [`MAX_ENDPOINTS_PER_SLICE`].
pub(super) fn cluster_slices(
    key: &ServiceKey,
    cluster: &str,
    endpoints: &[Endpoint],
    exposed: &[&ServicePort],
) -> Vec<(ObjRef, DesiredObject)> {
    type PortSet = Vec<(Option<String>, &'static str, Option<u16>)>;
    let mut groups: BTreeMap<(&'static str, PortSet), Vec<&Endpoint>> = BTreeMap::new();
    for e in endpoints {
        let ports: PortSet =
            exposed.iter().map(|p| (p.name.clone(), p.protocol.as_str(), e.port_for(p))).collect();
        groups.entry((family_str(family_of(&e.address)), ports)).or_default().push(e);
    }
    let mut out = Vec::new();
    let mut index = 0;
    for ((family, ports), members) in groups {
        for chunk in members.chunks(MAX_ENDPOINTS_PER_SLICE) {
            let name = slice_name(key, cluster, index);
            index += 1;
            let mut labels = managed_labels();
            labels.insert(LABEL_SERVICE_NAME.to_owned(), json!(key.name));
            labels.insert(LABEL_SOURCE_CLUSTER.to_owned(), json!(cluster));
            labels.insert(LABEL_SLICE_MANAGED_BY.to_owned(), json!(MANAGED_BY));
            let ports = ports.iter().map(|(n, proto, port)| {
                let mut p = json!({"protocol": proto});
                if let Some(n) = n {
                    p["name"] = json!(n);
                }
                if let Some(port) = port {
                    p["port"] = json!(port);
                }
                p
            });
            out.push(slice_object(key, name, labels, family, ports.collect(), chunk));
        }
    }
    out
}

/// An EndpointSlice `name` in `key`'s namespace: `labels`, address `family`, `ports` (as
/// JSON) and the endpoints of `chunk`.
fn slice_object(
    key: &ServiceKey,
    name: String,
    labels: serde_json::Map<String, Value>,
    family: &str,
    ports: Vec<Value>,
    chunk: &[&Endpoint],
) -> (ObjRef, DesiredObject) {
    let body = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": key.namespace, "labels": labels},
        "addressType": family,
        "ports": ports,
        "endpoints": chunk.iter().map(|e| endpoint_json(e)).collect::<Vec<_>>(),
    });
    (
        ObjRef { kind: WriteKind::EndpointSlice, namespace: key.namespace.clone(), name },
        DesiredObject { body, status: None },
    )
}

pub(super) fn endpoint_json(e: &Endpoint) -> Value {
    // Ready means traffic may go there: ready in its cluster and not failing its checks.
    let ready = e.ready && e.health != Health::Unhealthy;
    let mut v = json!({
        "addresses": [e.address.to_string()],
        "conditions": {"ready": ready, "serving": e.ready},
    });
    if let Some(h) = &e.hostname {
        v["hostname"] = json!(h);
    }
    if let Some(z) = &e.zone {
        v["zone"] = json!(z);
    }
    v
}

/// The slice of a derived Service: the gateway pods (`pods`, the first one's address family;
/// none of another family) on the gateway ports.
pub(super) fn derived_slice(
    key: &ServiceKey,
    service: &str,
    pods: &[IpAddr],
    served: &[(&ServicePort, u16)],
) -> (ObjRef, DesiredObject) {
    let family = pods.first().map(family_of).map(family_str).unwrap_or("IPv4");
    let mut labels = managed_labels();
    labels.insert(LABEL_KUBE_SERVICE_NAME.to_owned(), json!(service));
    labels.insert(LABEL_SLICE_MANAGED_BY.to_owned(), json!(MANAGED_BY));
    let body = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": service, "namespace": key.namespace, "labels": labels},
        "addressType": family,
        "ports": served.iter().map(|(p, gw)| {
            let svc = service_port_json(p, None);
            json!({"name": svc["name"], "protocol": p.protocol.as_str(), "port": gw})
        }).collect::<Vec<_>>(),
        "endpoints": pods
            .iter()
            .filter(|ip| family_str(family_of(ip)) == family)
            .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
            .collect::<Vec<_>>(),
    });
    (
        ObjRef {
            kind: WriteKind::EndpointSlice,
            namespace: key.namespace.clone(),
            name: service.to_owned(),
        },
        DesiredObject { body, status: None },
    )
}

/// Flat network mode in `front.mode: kube`: the endpoints a derived Service lists instead of
/// the gateway pods. kube-proxy spreads a Service's connections evenly over its slices, so
/// listing a flat peer's pods beside the gateway pods would ignore failover priority; they are
/// listed only while they alone are the best tier that has a healthy endpoint (every endpoint
/// of that tier is in a flat peer, reachable, and its cluster exposes every port of the
/// import). Otherwise (the best tier has local endpoints or a gateway-mode peer's) the gateway
/// pods are listed, and the gateway itself dials a chosen flat endpoint directly. Empty: the
/// gateway pods.
pub fn direct_targets<'a>(
    import: &'a ImportedService,
    snapshot: &ImportSnapshot,
    settings: &FrontSettings,
) -> Vec<(&'a ClusterId, &'a Endpoint)> {
    let Some(local) = &snapshot.local_cluster else { return Vec::new() };
    if snapshot.flat.is_empty() {
        return Vec::new();
    }
    let mut client = snapshot.localities.get(local).cloned().unwrap_or_default().labels_for(local);
    client.extend(settings.labels.clone());
    let mut candidates = Vec::new();
    for (cluster, export) in &import.clusters {
        if snapshot.unreachable.contains(cluster) {
            continue;
        }
        let cluster_labels =
            snapshot.localities.get(cluster).cloned().unwrap_or_default().labels_for(cluster);
        for ep in export.endpoints.iter().filter(|e| e.ready && e.health != Health::Unhealthy) {
            let mut labels = cluster_labels.clone();
            if let Some(zone) = &ep.zone {
                labels.insert(LABEL_ZONE.to_owned(), zone.clone());
            }
            candidates.push((failover::tier(&settings.priority, &client, &labels), cluster, ep));
        }
    }
    let Some(best) = candidates.iter().map(|(t, ..)| *t).min() else { return Vec::new() };
    let best: Vec<(&ClusterId, &Endpoint)> =
        candidates.into_iter().filter(|(t, ..)| *t == best).map(|(_, c, e)| (c, e)).collect();
    let direct = best.iter().all(|(cluster, _)| {
        *cluster != local
            && snapshot.flat.contains(*cluster)
            && import.ports.iter().all(|p| p.clusters.is_empty() || p.clusters.contains(*cluster))
    });
    if direct { best } else { Vec::new() }
}

/// The slices of a derived Service that lists endpoints directly ([`direct_targets`]): one
/// per source cluster, address family and port set, named after the derived Service, the
/// cluster and an index; each endpoint on its own ports for the served service ports.
pub(super) fn derived_direct_slices(
    key: &ServiceKey,
    service: &str,
    direct: &[(&ClusterId, &Endpoint)],
    served: &[(&ServicePort, u16)],
) -> Vec<(ObjRef, DesiredObject)> {
    type PortSet = Vec<(String, &'static str, u16)>;
    let mut groups: BTreeMap<(&ClusterId, &'static str, PortSet), Vec<&Endpoint>> = BTreeMap::new();
    for (cluster, e) in direct {
        let ports: PortSet = served
            .iter()
            .map(|(p, _)| {
                let name =
                    service_port_json(p, None)["name"].as_str().unwrap_or_default().to_owned();
                (name, p.protocol.as_str(), e.port_for(p).unwrap_or(p.port))
            })
            .collect();
        groups.entry((*cluster, family_str(family_of(&e.address)), ports)).or_default().push(e);
    }
    let mut out = Vec::new();
    let mut index: BTreeMap<&ClusterId, usize> = BTreeMap::new();
    for ((cluster, family, ports), members) in groups {
        for chunk in members.chunks(MAX_ENDPOINTS_PER_SLICE) {
            let i = index.entry(cluster).or_default();
            let name = format!("{service}-{cluster}-{i}");
            *i += 1;
            let mut labels = managed_labels();
            labels.insert(LABEL_KUBE_SERVICE_NAME.to_owned(), json!(service));
            labels.insert(LABEL_SLICE_MANAGED_BY.to_owned(), json!(MANAGED_BY));
            labels.insert(LABEL_SOURCE_CLUSTER.to_owned(), json!(cluster.as_str()));
            let ports = ports
                .iter()
                .map(|(n, proto, port)| json!({"name": n, "protocol": proto, "port": port}));
            out.push(slice_object(key, name, labels, family, ports.collect(), chunk));
        }
    }
    out
}
