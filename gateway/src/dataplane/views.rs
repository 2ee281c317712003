//! The data plane renders its own debug views: `/debug/endpoints` (every imported service
//! port with each endpoint's tier, health and why it would be skipped) and the listener rows of
//! `/debug/problems`. The composition root only hands them to the admin server. The JSON shapes
//! are read by `fedgate status`, `fedgate explain`, the dashboard and the end-to-end tests.

use std::sync::Arc;

use fedgate_discovery::model::ServiceKey;
use serde::Serialize;
use serde_json::{Value, json};

use super::{DebugHandle, EndpointView, listeners};
use crate::admin::{DebugView, Query};

/// One service port in `/debug/endpoints`.
#[derive(Debug, Serialize)]
pub struct DebugPort {
    pub service: ServiceKey,
    pub port: u16,
    pub protocol: &'static str,
    pub name: Option<String>,
    pub endpoints: Vec<EndpointView>,
}

impl DebugHandle {
    /// Listeners bound and waiting for a retry right now.
    pub fn listeners(&self) -> Arc<listeners::ListenerState> {
        self.0.listeners.load_full()
    }

    /// Listeners that could not be bound and wait for a retry, with the reason (for
    /// `/debug/problems`).
    pub fn listener_problems(&self) -> Vec<listeners::ListenerProblem> {
        self.0.listeners.load().problems.clone()
    }

    /// True when every listener the imports ask for is bound (for `/readyz`).
    pub fn listeners_ready(&self) -> bool {
        self.0.listeners.load().failed.is_empty()
    }

    pub fn endpoints(&self) -> Vec<DebugPort> {
        let shared = &self.0;
        let snapshot = shared.snapshot.borrow().clone();
        let unreachable = shared.unreachable(&snapshot, None);
        let mut out = Vec::new();
        for service in snapshot.services.values() {
            for port in &service.ports {
                out.push(DebugPort {
                    service: service.key.clone(),
                    port: port.port.port,
                    protocol: port.port.protocol.as_str(),
                    name: port.port.name.clone(),
                    endpoints: shared.rank(&snapshot, service, &port.port, &unreachable, None),
                });
            }
        }
        out
    }

    /// [`endpoints`](Self::endpoints) as JSON, with the client locality and priority used.
    pub fn debug_endpoints(&self) -> Value {
        json!({
            "cluster": self.0.settings.cluster,
            "clientLabels": self.0.client_labels,
            "failoverPriority": self.0.priority,
            "draining": self.0.drain.is_draining(),
            "activeConnections": self.0.drain.active(),
            "listeners": *self.listeners(),
            "services": self.endpoints(),
        })
    }

    /// `/debug/endpoints`, for the admin server.
    pub fn endpoints_view(&self) -> DebugView {
        let d = self.clone();
        Arc::new(move |_: &Query| d.debug_endpoints())
    }

    /// The `/debug/problems` rows of front listeners waiting for a bind retry.
    pub fn problems_json(&self) -> Vec<Value> {
        self.listener_problems()
            .iter()
            .map(|p| {
                json!({
                    "kind": "listener",
                    "object": format!("listener {} ({})", p.address, p.service),
                    "reason": p.reason,
                    "attempts": p.attempts,
                    "backoffMs": p.backoff_ms,
                })
            })
            .collect()
    }
}
