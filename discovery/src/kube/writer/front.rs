//! `front.mode: kube`: which gateway port serves which import port.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{ImportSnapshot, ServiceKey, ServiceType};

/// A port of an import as the front serves it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontKey {
    pub key: ServiceKey,
    pub port: u16,
    pub protocol: crate::model::Protocol,
}

/// Which gateway port serves which import port in `front.mode: kube`. An allocation lasts as
/// long as the import port exists; freed ports are reused lowest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontPorts {
    by_key: BTreeMap<FrontKey, u16>,
    used: BTreeSet<u16>,
}

impl FrontPorts {
    /// Brings the allocation in line with the ClusterSetIP imports' TCP ports of `snapshot`.
    /// Import ports that find no free port are left out (and logged once by the caller).
    pub fn reconcile(
        &mut self,
        snapshot: &ImportSnapshot,
        range: &std::ops::RangeInclusive<u16>,
    ) -> Vec<FrontKey> {
        let wanted: BTreeSet<FrontKey> = snapshot
            .services
            .values()
            .filter(|s| s.service_type == ServiceType::ClusterSetIP)
            .flat_map(|s| {
                s.ports.iter().filter(|p| p.port.protocol == crate::model::Protocol::Tcp).map(|p| {
                    FrontKey { key: s.key.clone(), port: p.port.port, protocol: p.port.protocol }
                })
            })
            .collect();
        let gone: Vec<FrontKey> =
            self.by_key.keys().filter(|k| !wanted.contains(*k)).cloned().collect();
        for k in gone {
            if let Some(p) = self.by_key.remove(&k) {
                self.used.remove(&p);
            }
        }
        let mut exhausted = Vec::new();
        let mut next = *range.start();
        for k in wanted {
            if self.by_key.contains_key(&k) {
                continue;
            }
            while self.used.contains(&next) && next < *range.end() {
                next += 1;
            }
            if self.used.contains(&next) || !range.contains(&next) {
                exhausted.push(k);
                continue;
            }
            self.used.insert(next);
            self.by_key.insert(k, next);
        }
        exhausted
    }

    /// Keeps `port` for `k` (read back from a derived Service the last leader wrote), unless
    /// either already has an allocation; [`Self::reconcile`] drops it if the import port is
    /// gone.
    pub fn keep(&mut self, k: FrontKey, port: u16) {
        if self.by_key.contains_key(&k) || self.used.contains(&port) {
            return;
        }
        self.used.insert(port);
        self.by_key.insert(k, port);
    }

    pub fn get(&self, k: &FrontKey) -> Option<u16> {
        self.by_key.get(k).copied()
    }

    /// Every allocation: gateway port → import port.
    pub fn routes(&self) -> BTreeMap<u16, FrontKey> {
        self.by_key.iter().map(|(k, p)| (*p, k.clone())).collect()
    }
}
