//! Read-only views of the data plane for the admin server and the dashboard: traffic,
//! failovers, last probes and the explanation of one service's endpoint choice. Each copies
//! what it needs under the data plane's locks and computes outside them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use fedgate_discovery::model::{PeerStatus, ServiceKey};
use serde::Serialize;
use tokio::time::Instant;

use super::activity::{FailoverEvent, FlowStats, RefusedStats};
use super::health::LastProbe;
use super::select::SelectionInput;
use super::{CANDIDATES_PER_TIER, DebugHandle};
use crate::explain::{self, ExplainError, ExplainInput, Explanation, FrozenState};

/// `/debug/traffic`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Traffic {
    /// Proxied connections open right now (client connections and accepted tunnel streams).
    pub active_connections: usize,
    /// Client connections per service and the cluster that served them.
    pub flows: Vec<FlowStats>,
    /// Client connections that could not be connected, per service and reason.
    pub refused: Vec<RefusedStats>,
}

/// One probed local endpoint in `/debug/probes`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeRow {
    pub service: ServiceKey,
    pub address: IpAddr,
    pub last_probe: LastProbe,
}

/// One ejected endpoint in `/debug/probes`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EjectionRow {
    pub cluster: String,
    pub address: IpAddr,
    pub ejected_for_secs: f64,
}

/// `/debug/probes`: the last active probe of every local endpoint and the endpoints
/// passive outlier detection has ejected.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Probes {
    pub probes: Vec<ProbeRow>,
    pub ejected: Vec<EjectionRow>,
}

/// What `/debug/explain` is asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainQuery {
    pub service: ServiceKey,
    pub port: Option<u16>,
    /// The client address, for services with `sessionAffinity: ClientIP`.
    pub client: Option<IpAddr>,
}

impl DebugHandle {
    pub fn traffic(&self) -> Traffic {
        Traffic {
            active_connections: self.0.drain.active(),
            flows: self.0.activity.flows(),
            refused: self.0.activity.refused_counts(),
        }
    }

    /// Recent failovers, newest first.
    pub fn failovers(&self) -> Vec<FailoverEvent> {
        self.0.activity.failovers()
    }

    pub fn probes(&self) -> Probes {
        let probes = self
            .0
            .probes
            .snapshot()
            .into_iter()
            .map(|((service, address), last_probe)| ProbeRow { service, address, last_probe })
            .collect();
        let mut ejected: Vec<EjectionRow> = self
            .0
            .lock_table()
            .outliers
            .ejections(Instant::now())
            .into_iter()
            .map(|((cluster, address), d)| EjectionRow {
                cluster: cluster.to_string(),
                address,
                ejected_for_secs: d.as_secs_f64(),
            })
            .collect();
        ejected.sort_by(|a, b| (&a.cluster, a.address).cmp(&(&b.cluster, b.address)));
        Probes { probes, ejected }
    }

    /// Explains which tier and endpoints a new connection to `query.service` would get, from
    /// the data plane's current state and the peers' status.
    pub fn explain(
        &self,
        query: &ExplainQuery,
        peers: &[PeerStatus],
    ) -> Result<Explanation, ExplainError> {
        let shared = &self.0;
        let snapshot = shared.snapshot.borrow().clone();
        let service = snapshot
            .services
            .get(&query.service)
            .ok_or_else(|| ExplainError::UnknownService(query.service.clone()))?;
        let port = explain::pick_port(service, query.port)?;
        let unreachable = shared.unreachable(&snapshot, Some(service));
        let local_health = shared.health.borrow().clone();
        let state = {
            let table = shared.lock_table();
            FrozenState {
                ejected: table.outliers.ejections(Instant::now()).into_iter().collect(),
                outstanding: table.outstanding.clone(),
            }
        };
        let probes: BTreeMap<IpAddr, LastProbe> = service
            .clusters
            .get(&shared.settings.cluster)
            .into_iter()
            .flat_map(|e| e.endpoints.iter())
            .filter_map(|ep| shared.probes.get(&service.key, ep.address).map(|p| (ep.address, p)))
            .collect();
        Ok(explain::explain(&ExplainInput {
            selection: SelectionInput {
                service,
                port,
                local_cluster: &shared.settings.cluster,
                client_labels: &shared.client_labels,
                priority: &shared.priority,
                localities: &snapshot.localities,
                unreachable: &unreachable,
                local_health: &local_health,
                state: &state,
                only: None,
                flat: &snapshot.flat,
            },
            probes: &probes,
            peers,
            client: query.client,
            per_tier: CANDIDATES_PER_TIER,
            now: jiff::Timestamp::now(),
        }))
    }
}
