//! What the import set reports about its ClusterSetIP range: the imports waiting for an
//! address (for `/debug/problems`, in line order) and how the range is used (for the metrics).

use ipnet::IpNet;
use serde_json::{Value, json};

use crate::alloc::{AllocKey, Allocator, WaitPlace};

/// The most waiting keys `/debug/problems` names; the rest are counted in one more entry.
pub const MAX_LISTED: usize = 100;

/// The state of the range as the import set last published it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocReport {
    pub range: IpNet,
    pub capacity: u128,
    /// Addresses held by an import or an endpoint.
    pub allocated: usize,
    /// Addresses kept for imports of withdrawn clusters.
    pub reserved: usize,
    pub free: u128,
    /// Services with at least one key waiting.
    pub waiting_services: usize,
    /// Keys waiting (a service's ClusterSetIP, a remote headless endpoint's VIP).
    pub waiting_keys: usize,
    /// The first [`MAX_LISTED`] waiting keys, first in line first.
    pub waiting: Vec<(AllocKey, WaitPlace)>,
}

impl AllocReport {
    pub fn of(alloc: &Allocator) -> Self {
        let capacity = alloc.capacity();
        AllocReport {
            range: alloc.range(),
            capacity,
            allocated: alloc.len(),
            reserved: alloc.in_use() - alloc.len(),
            free: capacity.saturating_sub(alloc.in_use() as u128),
            waiting_services: alloc.waiting_services(),
            waiting_keys: alloc.waiting_len(),
            waiting: alloc.waiting().take(MAX_LISTED).map(|(k, p)| (k.clone(), p)).collect(),
        }
    }

    /// One `/debug/problems` entry per waiting key (at most [`MAX_LISTED`], then one that
    /// counts the rest), first in line first.
    pub fn to_json(&self) -> Vec<Value> {
        let reason = format!(
            "front.clusterSetIPRange {} is full ({} addresses: {} allocated, {} reserved for \
             imports of withdrawn clusters); waiting for the next free address; widen the range \
             or remove imports",
            self.range, self.capacity, self.allocated, self.reserved
        );
        let mut out: Vec<Value> = self
            .waiting
            .iter()
            .enumerate()
            .map(|(i, (key, place))| {
                let service = key.service_key();
                let object = match key {
                    AllocKey::Service { .. } => format!("ServiceImport {service}"),
                    AllocKey::Endpoint { cluster, endpoint, .. } => {
                        format!("ServiceImport {service}, endpoint {endpoint} in cluster {cluster}")
                    }
                };
                json!({
                    "kind": "clusterSetIP",
                    "object": object,
                    "service": service.to_string(),
                    "reason": reason,
                    "position": i + 1,
                    "heldBefore": place.held_before,
                })
            })
            .collect();
        if self.waiting_keys > self.waiting.len() {
            let more = self.waiting_keys - self.waiting.len();
            out.push(json!({
                "kind": "clusterSetIP",
                "object": format!("{more} more waiting imports or endpoints"),
                "reason": reason,
                "position": self.waiting.len() + 1,
            }));
        }
        out
    }
}
