//! Cluster sources: where a gateway learns the state of its own cluster (Services,
//! EndpointSlices, ServiceExports). Each source publishes one immutable
//! [`ClusterState`](crate::model::ClusterState) through a `tokio::sync::watch` channel.

pub mod any;
pub mod file;

pub use any::{ClusterSource, Problems};
