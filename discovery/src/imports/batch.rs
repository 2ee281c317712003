//! Allocation in batches, so that replicas agree (issue 19, docs/replicas.md "ClusterSetIPs
//! agree across replicas"). Replicas of a cluster allocate without talking to each other, and
//! a key whose hash slot is taken probes to the next free one: who gets a contested slot must
//! not depend on the order updates arrive in. So a key that needs a new address is not
//! allocated when its import is merged, but at the end of the batch of updates that brought it,
//! with every other new key of the batch, in [`AllocKey`] order. A batch is one call
//! ([`ImportState::set_exports`], [`ImportState::set_pins`], ...), the peer updates the task
//! takes from its channel at once ([`ImportState::apply_peers`]), or the start-up batch:
//! everything until each configured peer has sent its first export set
//! ([`ImportState::hold_for_peers`]) or the task's bound passed ([`ImportState::end_startup`]).
//!
//! Keys that hold an address, have one reserved or wait for a full range are not new: they take
//! theirs at once. An import whose key waits for the end of its batch is published without that
//! address, as one waiting for a full range is: its name does not resolve and no listener is
//! bound for it.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::{Changed, ImportState};
use crate::alloc::AllocKey;
use crate::model::{ClusterId, PeerUpdate, ServiceKey};

impl ImportState {
    /// Opens the start-up batch: nothing new is allocated until each of `peers` (the
    /// configured peers; the local cluster is skipped) has sent its first export set, or
    /// [`ImportState::end_startup`]. Then the whole batch is allocated in key order, so two
    /// replicas that start with the same inputs agree on every address.
    pub fn hold_for_peers(&mut self, peers: impl IntoIterator<Item = ClusterId>) {
        let awaited: BTreeSet<ClusterId> = peers.into_iter().filter(|p| *p != self.local).collect();
        self.awaiting = (!awaited.is_empty()).then_some(awaited);
    }

    /// Whether the start-up batch is open: some configured peer has not sent exports yet.
    pub fn is_starting(&self) -> bool {
        self.awaiting.is_some()
    }

    /// Closes the start-up batch without the peers still awaited (the bound passed) and
    /// allocates it.
    pub fn end_startup(&mut self) -> Changed {
        let Some(missing) = self.awaiting.take() else {
            return Changed::default();
        };
        let missing: Vec<String> = missing.iter().map(ToString::to_string).collect();
        tracing::info!(
            missing = %missing.join(", "),
            keys = self.pending_keys(),
            "allocating clusterset ips without these peers' first exports"
        );
        self.settle(Changed::default())
    }

    /// Applies peer updates as one batch: what changed, and how many updates changed the
    /// snapshot.
    pub fn apply_peers(&mut self, updates: impl IntoIterator<Item = PeerUpdate>) -> (Changed, u64) {
        let outer = std::mem::replace(&mut self.in_batch, true);
        let mut changed = Changed::default();
        let mut count = 0;
        for update in updates {
            let one = self.apply_peer(update);
            count += u64::from(one.snapshot);
            changed = changed.or(one);
        }
        self.in_batch = outer;
        (self.settle(changed), count)
    }

    /// `cluster` sent an export set: the start-up batch closes with the last awaited peer's.
    pub(super) fn heard_from(&mut self, cluster: &ClusterId) {
        if let Some(awaiting) = &mut self.awaiting
            && awaiting.remove(cluster)
            && awaiting.is_empty()
        {
            self.awaiting = None;
            tracing::debug!(
                keys = self.pending_keys(),
                "every peer sent its first exports: allocating clusterset ips in key order"
            );
        }
    }

    /// The address of `key` if it is not new (held, reserved for it, or waiting for a full
    /// range, which keeps its place); a new key waits for the end of its batch.
    pub(super) fn address_for(&mut self, key: &AllocKey) -> Option<IpAddr> {
        let known = self.alloc.get(key).is_some()
            || self.alloc.reservation(key).is_some()
            || self.alloc.is_waiting(key);
        if !known {
            self.pending.entry(key.service_key().clone()).or_default().insert(key.clone());
            return None;
        }
        self.alloc.allocate(key).ok()
    }

    /// At the end of a batch (not inside one, not during start-up): allocates the new keys in
    /// key order (a full range queues them in that order), then merges their imports again to
    /// take the addresses.
    pub(super) fn allocate_pending(&mut self) -> Changed {
        if self.in_batch || self.awaiting.is_some() || self.pending.is_empty() {
            return Changed::default();
        }
        let pending = std::mem::take(&mut self.pending);
        let keys: BTreeSet<&AllocKey> = pending.values().flatten().collect();
        for key in keys {
            // Exhausted: the key waits in line (reported by `settle`).
            let _ = self.alloc.allocate(key);
        }
        let services: BTreeSet<ServiceKey> = pending.into_keys().collect();
        self.remerge(&services)
    }

    fn pending_keys(&self) -> usize {
        self.pending.values().map(BTreeSet::len).sum()
    }
}
