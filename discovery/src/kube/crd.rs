//! The custom resources fedgate reads and writes, as Rust types: `ServiceExport` and
//! `ServiceImport` of the MCS API (`multicluster.x-k8s.io`, served as `v1alpha1` and `v1beta1`
//! with the same schema, `v1beta1` stored, as in current kubernetes-sigs/mcs-api) and
//! `ClusterProperty` of KEP-2149 (`about.k8s.io/v1alpha1`, cluster-scoped). The CRD manifests in
//! `deploy/crds/` are generated from these types by `fedgate crdgen` ([`crds`]).

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::core::crd::merge_crds;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the MCS API.
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
/// The version the API server stores (and fedgate prefers when it is served).
pub const MCS_STORAGE_VERSION: &str = "v1beta1";
/// The older version most peers still write; fedgate falls back to it.
pub const MCS_LEGACY_VERSION: &str = "v1alpha1";
/// API group of KEP-2149's ClusterProperty.
pub const ABOUT_GROUP: &str = "about.k8s.io";
/// The approval the API server requires on CRDs of the protected group `about.k8s.io` (the
/// KEP-2149 API review, as in the upstream about-api CRD).
pub const ABOUT_API_APPROVAL: &str = "https://github.com/kubernetes/enhancements/pull/3084";
/// Name of the ClusterProperty that holds the cluster id (KEP-2149).
pub const CLUSTER_ID_PROPERTY: &str = "cluster.clusterset.k8s.io";
/// Name of the ClusterProperty that names the clusterset the cluster is a member of
/// (KEP-2149).
pub const CLUSTERSET_PROPERTY: &str = "clusterset.k8s.io";

/// A `metav1.Condition`, as the MCS API puts on `status.conditions` (same schema and
/// validation as the upstream CRDs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The last time the condition went from one status to another (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
    /// A human readable message about the transition; may be empty.
    #[schemars(length(max = 32768))]
    pub message: String,
    /// The `.metadata.generation` the condition was set from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
    /// A CamelCase identifier of the reason for the last transition.
    #[schemars(
        length(min = 1, max = 1024),
        regex(pattern = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    )]
    pub reason: String,
    /// `True`, `False` or `Unknown`.
    #[schemars(extend("enum" = ["True", "False", "Unknown"]))]
    pub status: String,
    /// The condition type, e.g. `Valid`, `Ready`, `Conflict`.
    #[serde(rename = "type")]
    #[schemars(length(max = 316))]
    pub type_: String,
}

/// `spec.ports[]` of a ServiceImport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImportPort {
    /// The name of this port within the service (a DNS label); optional if there is one port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `TCP`, `UDP` or `SCTP`; default TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The application protocol of this port (a hint, standard label syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// The port that will be exposed by this service.
    pub port: i32,
}

/// `spec.sessionAffinityConfig.clientIP`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpConfig {
    /// Seconds of ClientIP stickiness (1-86400, default 10800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i32>,
}

/// `spec.sessionAffinityConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SessionAffinityConfig {
    /// Settings of ClientIP session affinity.
    #[serde(rename = "clientIP", default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpConfig>,
}

/// `status.clusters[]` of a ServiceImport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterStatus {
    /// The name of an exporting cluster (an RFC 1123 DNS label).
    pub cluster: String,
}

/// `status` of a ServiceExport.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceExportStatus {
    /// `Valid`, `Ready` and `Conflict` conditions, one per type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Option<Vec<Condition>>,
}

/// `status` of a ServiceImport.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportStatus {
    /// Whether imported EndpointSlice objects are present (`Present` or `Absent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Present", "Absent"]))]
    pub endpoint_slice_objects: Option<String>,
    /// The exporting clusters this service was derived from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["cluster"]))]
    pub clusters: Option<Vec<ClusterStatus>>,
    /// Conditions of the import (`Ready`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Option<Vec<Condition>>,
}

/// The MCS kinds of one API version; both versions have the same schema.
macro_rules! mcs_version {
    ($module:ident, $version:literal) => {
        #[doc = concat!("`multicluster.x-k8s.io/", $version, "`.")]
        pub mod $module {
            use super::*;

            /// ServiceExport declares that the Service with the same name and namespace as
            /// this export should be consumable from other clusters.
            #[derive(
                kube::CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema,
            )]
            #[kube(
                group = "multicluster.x-k8s.io",
                version = $version,
                kind = "ServiceExport",
                doc = "ServiceExport declares that the Service with the same name and namespace as this export should be consumable from other clusters.",
                namespaced,
                status = "ServiceExportStatus",
                shortname = "svcex",
                shortname = "svcexport",
                category = "multicluster",
                printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
            )]
            #[serde(rename_all = "camelCase")]
            pub struct ServiceExportSpec {
                /// Labels to carry to the ServiceImport (optional for implementations).
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub exported_labels: Option<BTreeMap<String, String>>,
                /// Annotations to carry to the ServiceImport (optional for implementations).
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub exported_annotations: Option<BTreeMap<String, String>>,
            }

            /// ServiceImport describes a service imported from clusters in a ClusterSet.
            #[derive(
                kube::CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema,
            )]
            #[kube(
                group = "multicluster.x-k8s.io",
                version = $version,
                kind = "ServiceImport",
                doc = "ServiceImport describes a service imported from clusters in a ClusterSet.",
                namespaced,
                status = "ServiceImportStatus",
                shortname = "svcim",
                shortname = "svcimport",
                category = "multicluster",
                printcolumn(name = "Type", type_ = "string", description = "The type of this ServiceImport", json_path = ".spec.type"),
                printcolumn(name = "IP", type_ = "string", description = "The VIP for this ServiceImport", json_path = ".spec.ips"),
                printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
            )]
            #[serde(rename_all = "camelCase")]
            pub struct ServiceImportSpec {
                /// The ports of the imported service.
                #[serde(default)]
                #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
                pub ports: Vec<ImportPort>,
                /// The VIPs of the service when the type is ClusterSetIP (one per family).
                #[serde(default, skip_serializing_if = "Option::is_none")]
                #[schemars(length(max = 2))]
                pub ips: Option<Vec<String>>,
                /// `ClusterSetIP` or `Headless`.
                #[serde(rename = "type")]
                #[schemars(extend("enum" = ["ClusterSetIP", "Headless"]))]
                pub type_: String,
                /// `ClientIP` or `None` (default); ignored when the type is Headless.
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub session_affinity: Option<String>,
                /// Session affinity configuration.
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub session_affinity_config: Option<SessionAffinityConfig>,
                /// The IP families of the import (`IPv4`, `IPv6`).
                #[serde(default, skip_serializing_if = "Option::is_none")]
                #[schemars(length(max = 2))]
                pub ip_families: Option<Vec<String>>,
                /// `Cluster` or `Local`, as on a Service.
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub internal_traffic_policy: Option<String>,
                /// A hint for how traffic is distributed (e.g. `PreferClose`).
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub traffic_distribution: Option<String>,
            }
        }
    };
}

mcs_version!(v1alpha1, "v1alpha1");
mcs_version!(v1beta1, "v1beta1");

/// ClusterProperty (KEP-2149) is a name/value pair about the cluster; the one named
/// `cluster.clusterset.k8s.io` holds the cluster id.
#[derive(
    kube::CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "about.k8s.io",
    version = "v1alpha1",
    kind = "ClusterProperty",
    doc = "ClusterProperty is a name/value pair of metadata about the cluster (KEP-2149).",
    shortname = "clusterproperty",
    printcolumn(name = "value", type_ = "string", json_path = ".spec.value"),
    printcolumn(name = "age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
pub struct ClusterPropertySpec {
    /// The value of the property (for the cluster id, an RFC 1123 DNS label or subdomain).
    #[schemars(length(min = 1, max = 128000))]
    pub value: String,
}

/// Why the CRDs cannot be generated (a programming error in the types above).
#[derive(Debug, thiserror::Error)]
#[error("cannot merge the {kind} versions into one CRD: {source}")]
pub struct CrdError {
    kind: &'static str,
    #[source]
    source: kube::core::crd::MergeError,
}

/// The three CRDs, in the order `fedgate crdgen` writes them: ServiceExport and ServiceImport
/// with both versions (`v1beta1` stored), then ClusterProperty.
pub fn crds() -> Result<Vec<(&'static str, CustomResourceDefinition)>, CrdError> {
    let export = merge_crds(
        vec![v1alpha1::ServiceExport::crd(), v1beta1::ServiceExport::crd()],
        MCS_STORAGE_VERSION,
    )
    .map_err(|source| CrdError { kind: "ServiceExport", source })?;
    let import = merge_crds(
        vec![v1alpha1::ServiceImport::crd(), v1beta1::ServiceImport::crd()],
        MCS_STORAGE_VERSION,
    )
    .map_err(|source| CrdError { kind: "ServiceImport", source })?;
    let (mut export, mut import) = (export, import);
    // `spec` is optional in the MCS API (a bare ServiceExport is the common case).
    for crd in [&mut export, &mut import] {
        for version in &mut crd.spec.versions {
            if let Some(schema) =
                version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut())
                && let Some(required) = schema.required.as_mut()
            {
                required.retain(|r| r != "spec");
                if required.is_empty() {
                    schema.required = None;
                }
            }
        }
    }
    // about.k8s.io is a protected group: the API server wants the KEP's approval named.
    let mut cluster_property = ClusterProperty::crd();
    cluster_property.metadata.annotations = Some(BTreeMap::from([(
        "api-approved.kubernetes.io".to_owned(),
        ABOUT_API_APPROVAL.to_owned(),
    )]));
    // v1alpha1 first, as in the upstream manifests
    for crd in [&mut export, &mut import] {
        crd.spec.versions.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Ok(vec![
        ("multicluster.x-k8s.io_serviceexports.yaml", export),
        ("multicluster.x-k8s.io_serviceimports.yaml", import),
        ("about.k8s.io_clusterproperties.yaml", cluster_property),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_serve_both_versions_and_store_v1beta1() {
        let crds = crds().expect("crds merge");
        let names: Vec<_> =
            crds.iter().map(|(_, c)| c.metadata.name.clone().unwrap_or_default()).collect();
        assert_eq!(
            names,
            [
                "serviceexports.multicluster.x-k8s.io",
                "serviceimports.multicluster.x-k8s.io",
                "clusterproperties.about.k8s.io"
            ]
        );
        for (_, crd) in &crds[..2] {
            let versions: Vec<_> =
                crd.spec.versions.iter().map(|v| (v.name.as_str(), v.served, v.storage)).collect();
            assert_eq!(versions, [("v1alpha1", true, false), ("v1beta1", true, true)]);
            assert!(
                crd.spec
                    .versions
                    .iter()
                    .all(|v| v.subresources.as_ref().is_some_and(|s| s.status.is_some()))
            );
            assert_eq!(crd.spec.scope, "Namespaced");
        }
        assert_eq!(crds[2].1.spec.scope, "Cluster");
        for (_, crd) in &crds[..2] {
            let json = serde_json::to_value(crd).expect("json");
            let required = &json["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["required"];
            assert!(
                !required.as_array().is_some_and(|r| r.iter().any(|v| v == "spec")),
                "{required}"
            );
        }
    }

    #[test]
    fn conditions_are_a_map_keyed_by_type() {
        let crds = crds().expect("crds merge");
        let json = serde_json::to_value(&crds[0].1).expect("json");
        let conditions = &json["spec"]["versions"][1]["schema"]["openAPIV3Schema"]["properties"]["status"]
            ["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{conditions}");
        assert_eq!(conditions["x-kubernetes-list-map-keys"][0], "type");
        let item = &conditions["items"];
        let mut required: Vec<_> = item["required"]
            .as_array()
            .expect("required")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        required.sort_unstable();
        assert_eq!(required, ["lastTransitionTime", "message", "reason", "status", "type"]);
    }

    #[test]
    fn service_import_round_trips_through_json() {
        let yaml = serde_json::json!({
            "apiVersion": "multicluster.x-k8s.io/v1beta1",
            "kind": "ServiceImport",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "ClusterSetIP", "ips": ["10.0.0.9"], "ports": [{"name": "http", "protocol": "TCP", "port": 80}]},
            "status": {"clusters": [{"cluster": "east"}]}
        });
        let si: v1beta1::ServiceImport = serde_json::from_value(yaml.clone()).expect("parse");
        assert_eq!(si.spec.type_, "ClusterSetIP");
        assert_eq!(serde_json::to_value(&si).expect("json"), yaml);
    }
}
