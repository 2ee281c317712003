//! The cluster source a gateway runs, file or kube, behind one face for the composition root.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::kube::{KubeProblem, KubeSource};
use crate::model::ClusterState;

use super::file::{FileSource, Problem};

/// Either cluster source.
#[derive(Debug)]
pub enum ClusterSource {
    File(FileSource),
    Kube(Box<KubeSource>),
}

impl ClusterSource {
    /// The cluster state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        match self {
            ClusterSource::File(s) => s.subscribe(),
            ClusterSource::Kube(s) => s.subscribe(),
        }
    }

    /// Objects the source skipped, as JSON values (file problems name file and line; kube
    /// problems name the object).
    pub fn problems(&self) -> Problems {
        match self {
            ClusterSource::File(s) => Problems::File(s.problems()),
            ClusterSource::Kube(s) => Problems::Kube(s.problems()),
        }
    }

    /// Whether the source has its first complete view (a file source has it from `new`).
    pub fn synced(&self) -> watch::Receiver<bool> {
        match self {
            ClusterSource::File(_) => watch::channel(true).1,
            ClusterSource::Kube(s) => s.synced(),
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        match self {
            ClusterSource::File(s) => s.run(shutdown).await,
            ClusterSource::Kube(s) => (*s).run(shutdown).await,
        }
    }
}

/// The problems receiver of either source.
#[derive(Clone, Debug)]
pub enum Problems {
    File(watch::Receiver<Arc<Vec<Problem>>>),
    Kube(watch::Receiver<Arc<Vec<KubeProblem>>>),
}

impl Problems {
    /// The current problems as JSON values.
    pub fn to_json(&self) -> Vec<serde_json::Value> {
        let values = match self {
            Problems::File(rx) => rx.borrow().iter().map(serde_json::to_value).collect::<Vec<_>>(),
            Problems::Kube(rx) => rx.borrow().iter().map(serde_json::to_value).collect::<Vec<_>>(),
        };
        values.into_iter().filter_map(Result::ok).collect()
    }
}
