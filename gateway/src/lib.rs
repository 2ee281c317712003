//! fedgate, the gateway: composition root, CLI, configuration, admin HTTP and dashboard, and
//! the data plane (front listeners, endpoint selection, health checks, the QUIC tunnel). It
//! wires `fedgate-discovery` and `fedgate-dns` together; neither of them depends on it.
pub mod admin;
pub mod app;
pub mod certs;
pub mod cli;
pub mod config;
pub mod crdgen;
pub mod dashboard;
pub mod data_thread;
pub mod dataplane;
pub mod demo;
pub mod explain;
pub mod logging;
pub mod metrics;
pub mod peering;
pub mod readiness;
pub mod status;
