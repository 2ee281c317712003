//! Kubernetes: the kube cluster source (watch Services, EndpointSlices, ServiceExports), the
//! writer (ServiceExport conditions, ServiceImports, per-cluster EndpointSlices and, in
//! `front.mode: kube`, derived Services), the CRD types, and the small API look-ups around them
//! (which MCS version is served, the KEP-2149 cluster id: [`identity`]). See
//! `docs/kubernetes.md`.
//!
//! Kubernetes types stop here: the source converts them into [`crate::model`] through
//! [`crate::objects`], the conversion the file source uses too, and the writer builds them
//! from model snapshots with pure functions ([`writer::desired`], [`writer::plan`]) that the
//! I/O only carries out.

pub mod crd;
pub mod identity;
pub mod leader;
pub mod metrics;
pub mod observed;
pub mod queue;
pub mod source;
pub mod writer;

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use kube::config::{KubeConfigOptions, Kubeconfig};

pub use ::kube::Client;
pub use ::kube::api::ApiResource;
pub use crd::{CLUSTER_ID_PROPERTY, CLUSTERSET_PROPERTY, MCS_GROUP};
pub use identity::{ClusterProperties, IdSource, IdentityError};
pub use leader::{Election, LeaderSettings, LeaderState};
pub use observed::Observed;
pub use source::{KubeProblem, KubeSource};
pub use writer::{FIELD_MANAGER, KubeWriter, WriterSettings};

/// Label key fedgate puts on every object it writes (besides the EndpointSlice `managed-by`).
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`] on fedgate's objects.
pub const MANAGED_BY_FEDGATE: &str = "fedgate";

/// What went wrong talking to Kubernetes.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read the kubeconfig {path}: {source} (discovery.kube.kubeconfig)")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration found: {0} (set discovery.kube.kubeconfig, KUBECONFIG, or \
         run in a pod with a service account)"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error(
        "the API server serves no ServiceExport resource in multicluster.x-k8s.io (v1beta1 or \
         v1alpha1): install the CRDs with `kubectl apply -f deploy/crds/`"
    )]
    NoMcsCrds,
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

impl KubeError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            KubeError::Kubeconfig { .. } => "kubeconfig",
            KubeError::Infer(_) => "no_config",
            KubeError::Client(_) => "client",
            KubeError::NoMcsCrds => "no_mcs_crds",
            KubeError::Api { .. } => "api",
        }
    }
}

/// A client from a kubeconfig file, or (none) the in-cluster / `KUBECONFIG` configuration.
/// Uses rustls with the ring provider, as the rest of fedgate.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|source| KubeError::Kubeconfig { path: path.to_owned(), source })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig { path: path.to_owned(), source })?
        }
        None => kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// The ServiceExport resource to read and write: `v1beta1` when the CRD serves it, else
/// `v1alpha1`.
pub async fn export_resource(client: &Client) -> Result<ApiResource, KubeError> {
    for (version, resource) in [
        (crd::MCS_STORAGE_VERSION, crd::v1beta1::ServiceExport::api_resource()),
        (crd::MCS_LEGACY_VERSION, crd::v1alpha1::ServiceExport::api_resource()),
    ] {
        let gv = format!("{MCS_GROUP}/{version}");
        match client.list_api_group_resources(&gv).await {
            Ok(list) if list.resources.iter().any(|r| r.name == "serviceexports") => {
                return Ok(resource);
            }
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(KubeError::Api { what: format!("discovering {gv}"), source });
            }
        }
    }
    Err(KubeError::NoMcsCrds)
}

/// The ServiceImport resource of the same version as `exports`.
pub fn import_resource(exports: &ApiResource) -> ApiResource {
    if exports.version == crd::MCS_LEGACY_VERSION {
        crd::v1alpha1::ServiceImport::api_resource()
    } else {
        crd::v1beta1::ServiceImport::api_resource()
    }
}
