//! The objects of one import: its ServiceImport and, in `front.mode: kube`, its derived
//! Service (the EndpointSlices are [`super::slices`]), with the names they are written under.
//! Pure functions of the import.

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::model::{
    ClusterId, Endpoint, ImportedService, IpFamily, LABEL_SERVICE_NAME, ServiceKey, ServicePort,
    ServiceType, SessionAffinity,
};

use super::actions::{DesiredObject, ObjRef, WriteKind};
use super::front::{FrontKey, FrontPorts};
use super::slices::{cluster_slices, derived_direct_slices, derived_slice};
use super::{ANNOTATION_DERIVED_FOR, FrontSettings};
use crate::kube::{LABEL_MANAGED_BY, MANAGED_BY_FEDGATE};

/// What `front.mode: kube` needs to write an import's derived Service.
pub struct Front<'a> {
    pub settings: &'a FrontSettings,
    /// The gateway ports handed to import ports.
    pub ports: &'a FrontPorts,
    /// Flat network mode: the endpoints the derived Service lists instead of the gateway pods
    /// ([`super::slices::direct_targets`]); empty: the gateway pods.
    pub direct: Vec<(&'a ClusterId, &'a Endpoint)>,
}

/// The objects of one import: its derived Service and slice (front kube), its ServiceImport,
/// and its per-cluster EndpointSlices. `derived_ips` are the ClusterIPs the derived Service
/// got (front kube; empty until known); `import_api_version` is the served ServiceImport
/// version (`multicluster.x-k8s.io/v1beta1`, or `v1alpha1` on older clusters).
pub fn desired(
    import: &ImportedService,
    front: Option<Front<'_>>,
    derived_ips: &[String],
    import_api_version: &str,
) -> Vec<(ObjRef, DesiredObject)> {
    let key = &import.key;
    let mut out = Vec::new();
    let clusterset_ip = import.service_type == ServiceType::ClusterSetIP;

    // front kube: the derived Service and the slice that points at the gateway pod
    let mut ips: Vec<String> = import.ips.iter().map(ToString::to_string).collect();
    if let Some(Front { settings, ports, direct }) = front {
        ips = Vec::new();
        if clusterset_ip {
            let served: Vec<(&ServicePort, u16)> = import
                .ports
                .iter()
                .filter_map(|p| {
                    ports
                        .get(&FrontKey {
                            key: key.clone(),
                            port: p.port.port,
                            protocol: p.port.protocol,
                        })
                        .map(|gw| (&p.port, gw))
                })
                .collect();
            if !served.is_empty() {
                let name = derived_service_name(key);
                out.push(derived_service(import, &name, &served));
                if direct.is_empty() {
                    out.push(derived_slice(key, &name, &settings.pods(), &served));
                } else {
                    out.extend(derived_direct_slices(key, &name, &direct, &served));
                }
                ips = derived_ips.to_vec();
            }
        }
    }

    out.push(service_import(import, &ips, import_api_version));
    for (cluster, export) in &import.clusters {
        let exposed: Vec<&ServicePort> =
            import.ports.iter().filter(|p| p.clusters.contains(cluster)).map(|p| &p.port).collect();
        out.extend(cluster_slices(key, cluster.as_str(), &export.endpoints, &exposed));
    }
    out
}

fn service_import(
    import: &ImportedService,
    ips: &[String],
    api_version: &str,
) -> (ObjRef, DesiredObject) {
    let key = &import.key;
    let mut labels: serde_json::Map<String, Value> =
        import.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    labels.extend(managed_labels());
    let mut spec = json!({
        "type": import.service_type.as_str(),
        "ports": import.ports.iter().map(|p| {
            let mut port = json!({"protocol": p.port.protocol.as_str(), "port": p.port.port});
            if let Some(n) = &p.port.name { port["name"] = json!(n); }
            if let Some(a) = &p.port.app_protocol { port["appProtocol"] = json!(a); }
            port
        }).collect::<Vec<_>>(),
    });
    if import.service_type == ServiceType::ClusterSetIP && !ips.is_empty() {
        spec["ips"] = json!(ips);
    }
    match &import.session_affinity {
        SessionAffinity::None => spec["sessionAffinity"] = json!("None"),
        SessionAffinity::ClientIP { timeout_seconds } => {
            spec["sessionAffinity"] = json!("ClientIP");
            if let Some(t) = timeout_seconds {
                spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
            }
        }
    }
    if !import.ip_families.is_empty() {
        spec["ipFamilies"] =
            json!(import.ip_families.iter().map(|f| family_str(*f)).collect::<Vec<_>>());
    }
    if let Some(p) = &import.internal_traffic_policy {
        spec["internalTrafficPolicy"] = json!(p);
    }
    if let Some(d) = &import.traffic_distribution {
        spec["trafficDistribution"] = json!(d);
    }
    let mut metadata = json!({"name": key.name, "namespace": key.namespace, "labels": labels});
    if !import.annotations.is_empty() {
        metadata["annotations"] = json!(import.annotations);
    }
    let body = json!({
        "apiVersion": api_version,
        "kind": "ServiceImport",
        "metadata": metadata,
        "spec": spec,
    });
    let status = json!({
        "apiVersion": api_version,
        "kind": "ServiceImport",
        "status": {
            "clusters": import.clusters.keys().map(|c| json!({"cluster": c.as_str()})).collect::<Vec<_>>(),
        },
    });
    (
        ObjRef {
            kind: WriteKind::ServiceImport,
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        },
        DesiredObject { body, status: Some(status) },
    )
}

fn derived_service(
    import: &ImportedService,
    name: &str,
    served: &[(&ServicePort, u16)],
) -> (ObjRef, DesiredObject) {
    let key = &import.key;
    let mut labels = managed_labels();
    labels.insert(LABEL_SERVICE_NAME.to_owned(), json!(key.name));
    let mut spec = json!({
        "type": "ClusterIP",
        "ports": served.iter().map(|(p, gw)| service_port_json(p, Some(*gw))).collect::<Vec<_>>(),
    });
    if let SessionAffinity::ClientIP { timeout_seconds } = &import.session_affinity {
        spec["sessionAffinity"] = json!("ClientIP");
        if let Some(t) = timeout_seconds {
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
        }
    }
    let body = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name, "namespace": key.namespace, "labels": labels,
            "annotations": {ANNOTATION_DERIVED_FOR: key.to_string()},
        },
        "spec": spec,
    });
    (
        ObjRef {
            kind: WriteKind::Service,
            namespace: key.namespace.clone(),
            name: name.to_owned(),
        },
        DesiredObject { body, status: None },
    )
}

pub(super) fn service_port_json(p: &ServicePort, target: Option<u16>) -> Value {
    let mut v = json!({"protocol": p.protocol.as_str(), "port": p.port});
    // A Service with several ports needs names; give unnamed ports a generated one.
    v["name"] = json!(p.name.clone().unwrap_or_else(|| format!(
        "{}-{}",
        p.protocol.as_str().to_lowercase(),
        p.port
    )));
    if let Some(t) = target {
        v["targetPort"] = json!(t);
    }
    if let Some(a) = &p.app_protocol {
        v["appProtocol"] = json!(a);
    }
    v
}

/// 32-bit FNV-1a: a short, stable (across builds and releases) suffix for generated names.
fn fnv(parts: &[&str]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h ^= u32::from(b'/');
            h = h.wrapping_mul(0x0100_0193);
        }
        for b in part.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// Name of the derived Service of an import: `fedgate-<hash>` (a valid Service name whatever
/// the import's name, and never the name of a user's Service by accident).
pub fn derived_service_name(key: &ServiceKey) -> String {
    format!("fedgate-{:08x}", fnv(&[&key.namespace, &key.name]))
}

/// Name of the `index`-th EndpointSlice of `cluster`'s endpoints of import `key`:
/// `<service>-<cluster>-<hash>`, cut to fit 63 characters; the hash makes names of different
/// (service, cluster) pairs distinct even when the dashes line up.
pub fn slice_name(key: &ServiceKey, cluster: &str, index: usize) -> String {
    let hash = fnv(&[&key.name, cluster, &index.to_string()]);
    let mut head = format!("{}-{}", key.name, cluster);
    head.truncate(63 - 9);
    let head = head.trim_end_matches('-');
    format!("{head}-{hash:08x}")
}

pub(super) fn managed_labels() -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert(LABEL_MANAGED_BY.to_owned(), json!(MANAGED_BY_FEDGATE));
    m
}

pub(super) fn family_str(f: IpFamily) -> &'static str {
    match f {
        IpFamily::IPv4 => "IPv4",
        IpFamily::IPv6 => "IPv6",
    }
}

pub(super) fn family_of(ip: &IpAddr) -> IpFamily {
    match ip {
        IpAddr::V4(_) => IpFamily::IPv4,
        IpAddr::V6(_) => IpFamily::IPv6,
    }
}
