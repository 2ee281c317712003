//! Kubernetes API objects (k8s-openapi types, and ServiceExports read as dynamic objects) into
//! the [`wire`] shapes the file source reads from YAML. From there the conversion into the
//! model is the same for both sources, so they validate, default and convert an object the
//! same way. Pure functions; field moves only, no decisions.

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::DynamicObject;

use super::wire;

/// `metadata` fields the conversion reads.
pub fn meta(m: &ObjectMeta) -> wire::ObjectMeta {
    wire::ObjectMeta {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        labels: m.labels.clone(),
        creation_timestamp: m.creation_timestamp.as_ref().map(|t| t.0.to_string()),
    }
}

/// A `v1` Service.
pub fn service(svc: &core::Service) -> wire::Service {
    let spec = svc.spec.as_ref().map(|s| wire::ServiceSpec {
        type_: s.type_.clone(),
        cluster_ip: s.cluster_ip.clone(),
        cluster_ips: s.cluster_ips.clone(),
        ports: s.ports.as_ref().map(|ports| ports.iter().map(service_port).collect()),
        session_affinity: s.session_affinity.clone(),
        session_affinity_config: s.session_affinity_config.as_ref().map(|c| {
            wire::SessionAffinityConfig {
                client_ip: c.client_ip.as_ref().map(|ip| wire::ClientIpConfig {
                    timeout_seconds: ip.timeout_seconds.map(i64::from),
                }),
            }
        }),
        internal_traffic_policy: s.internal_traffic_policy.clone(),
        traffic_distribution: s.traffic_distribution.clone(),
        ip_families: s.ip_families.clone(),
        external_name: s.external_name.clone(),
    });
    wire::Service { metadata: Some(meta(&svc.metadata)), spec }
}

fn service_port(p: &core::ServicePort) -> wire::ServicePort {
    wire::ServicePort {
        name: p.name.clone(),
        protocol: p.protocol.clone(),
        port: Some(i64::from(p.port)),
        target_port: p.target_port.as_ref().map(|t| match t {
            IntOrString::Int(n) => wire::IntOrString::Int(i64::from(*n)),
            IntOrString::String(s) => wire::IntOrString::String(s.clone()),
        }),
        app_protocol: p.app_protocol.clone(),
    }
}

/// A `discovery.k8s.io/v1` EndpointSlice.
pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> wire::EndpointSlice {
    wire::EndpointSlice {
        metadata: Some(meta(&slice.metadata)),
        address_type: Some(slice.address_type.clone()),
        endpoints: Some(
            slice
                .endpoints
                .iter()
                .flatten()
                .map(|e| wire::Endpoint {
                    addresses: Some(e.addresses.clone()),
                    hostname: e.hostname.clone(),
                    conditions: e
                        .conditions
                        .as_ref()
                        .map(|c| wire::EndpointConditions { ready: c.ready }),
                    zone: e.zone.clone(),
                })
                .collect(),
        ),
        ports: slice.ports.as_ref().map(|ports| {
            ports
                .iter()
                .map(|p| wire::EndpointPort {
                    name: p.name.clone(),
                    protocol: p.protocol.clone(),
                    port: p.port.map(i64::from),
                })
                .collect()
        }),
    }
}

/// A ServiceExport of either MCS version, read as a dynamic object. A `spec` that is not an
/// object of the expected shape is an error naming the problem.
pub fn service_export(obj: &DynamicObject) -> Result<wire::ServiceExport, String> {
    let spec = match obj.data.get("spec") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value::<wire::ServiceExportSpec>(v.clone())
                .map_err(|e| format!("spec: {e}"))?,
        ),
    };
    Ok(wire::ServiceExport { metadata: Some(meta(&obj.metadata)), spec })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{LocalService, Protocol, ServiceKey, SessionAffinity, TargetPort};
    use crate::objects::{ExportSpec, SliceEndpoints};

    fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("test object")
    }

    #[test]
    fn service_converts_like_the_file_source() {
        let svc: core::Service = from_json(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1"},
            "spec": {
                "type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "ports": [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP",
                           "appProtocol": "http"}],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "internalTrafficPolicy": "Cluster", "selector": {"app": "web"}
            }
        }));
        let got = LocalService::try_from(service(&svc)).expect("valid");
        assert_eq!(got.key, ServiceKey::new("shop", "web"));
        assert_eq!(got.cluster_ips, vec!["10.96.0.10".parse::<std::net::IpAddr>().expect("ip")]);
        assert_eq!(got.ports[0].target_port, Some(TargetPort::Name("web".into())));
        assert_eq!(got.ports[0].app_protocol.as_deref(), Some("http"));
        assert_eq!(got.session_affinity, SessionAffinity::ClientIP { timeout_seconds: Some(60) });

        let headless: core::Service = from_json(serde_json::json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 5432}]}
        }));
        assert!(LocalService::try_from(service(&headless)).expect("valid").is_headless());

        // a bad object is rejected with the path of the problem
        let bad: core::Service = from_json(serde_json::json!({
            "metadata": {"name": "x", "namespace": "shop"},
            "spec": {"ports": [{"port": 80, "protocol": "HTTP"}]}
        }));
        let err = LocalService::try_from(service(&bad)).expect_err("bad protocol");
        assert_eq!(err.path.to_string(), "spec.ports[0].protocol");
    }

    #[test]
    fn endpoint_slice_converts() {
        let slice: discovery::EndpointSlice = from_json(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.1.0.1"], "hostname": "web-0", "zone": "a"},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": false}}
            ]
        }));
        let got = SliceEndpoints::try_from(endpoint_slice(&slice)).expect("valid");
        assert_eq!(got.service, ServiceKey::new("shop", "web"));
        assert_eq!(got.endpoints.len(), 2);
        assert_eq!(got.endpoints[0].hostname.as_deref(), Some("web-0"));
        assert_eq!(got.endpoints[0].ports[0].protocol, Protocol::Udp);
        assert!(!got.endpoints[1].ready);
    }

    #[test]
    fn service_export_reads_spec_and_creation_time() {
        let obj: DynamicObject = from_json(serde_json::json!({
            "apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceExport",
            "metadata": {"name": "web", "namespace": "shop",
                         "creationTimestamp": "2026-01-02T03:04:05Z"},
            "spec": {"exportedLabels": {"tier": "gold"}}
        }));
        let spec = ExportSpec::try_from(service_export(&obj).expect("shape")).expect("valid");
        assert_eq!(spec.created, Some("2026-01-02T03:04:05Z".parse().expect("ts")));
        assert_eq!(spec.exported_labels, BTreeMap::from([("tier".to_owned(), "gold".to_owned())]));

        let no_spec: DynamicObject = from_json(serde_json::json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
            "metadata": {"name": "web", "namespace": "shop"}
        }));
        assert!(service_export(&no_spec).expect("shape").spec.is_none());

        let bad: DynamicObject = from_json(serde_json::json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"exportedLabels": "not-a-map"}
        }));
        let err = service_export(&bad).expect_err("bad spec");
        assert!(err.starts_with("spec:"), "{err}");
    }
}
