//! ClusterSetIP allocation: one virtual IP per ClusterSetIP import, and one per remote endpoint
//! of a headless import, all from `front.clusterSetIPRange`.
//!
//! An IP must stay the same for the life of its import, across gateway restarts, and must never
//! be handed to another key while in use. So: the preferred slot is a stable hash of the key
//! (the same service tends to get the same IP on every gateway and after a lost state file),
//! collisions probe linearly, and every assignment is persisted to a small JSON file (written
//! atomically: temp file + rename) that is reloaded at start.
//!
//! The allocator is order-dependent (probing gives a contested slot to the key that asks
//! first); the import set asks for new keys in batches, in [`AllocKey`] order, so replicas agree
//! whatever order updates reach them in (`imports/batch.rs`, docs/replicas.md).
//!
//! When the range is full, a key that asks for an address *waits*: it joins a queue, and the
//! moment any address frees (a release, an expired reservation) the first waiting key gets it,
//! without waiting for its own import to change. The queue is ordered: keys that held an
//! address before (a reservation that ran out, an entry of the state file released unused)
//! come first, then every other key, oldest first ([`Allocator::waiting`]).
//!
//! A key can give its address up *reserved* instead of free ([`Allocator::reserve`]): the
//! import set does so when a peer's lease expires, so that a service that only went away with
//! its cluster gets the same address back when the cluster returns. A reserved address is given
//! to nobody else until the reservation is released or expires ([`Allocator::expire`]); other
//! keys take free addresses, or wait. The rules are documented in docs/mcs-semantics.md.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::{ClusterId, ServiceKey};

/// Version of the state file layout.
const STATE_VERSION: u32 = 1;

/// What an IP is allocated for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum AllocKey {
    /// The ClusterSetIP of an import.
    Service { service: ServiceKey },
    /// The VIP of one remote endpoint of a headless import.
    Endpoint { service: ServiceKey, cluster: ClusterId, endpoint: IpAddr },
}

impl AllocKey {
    pub fn service(key: &ServiceKey) -> Self {
        AllocKey::Service { service: key.clone() }
    }

    pub fn endpoint(key: &ServiceKey, cluster: &ClusterId, endpoint: IpAddr) -> Self {
        AllocKey::Endpoint { service: key.clone(), cluster: cluster.clone(), endpoint }
    }

    /// The service the key belongs to.
    pub fn service_key(&self) -> &ServiceKey {
        match self {
            AllocKey::Service { service } | AllocKey::Endpoint { service, .. } => service,
        }
    }

    /// Stable text the preferred slot is hashed from.
    fn hash_input(&self) -> String {
        match self {
            AllocKey::Service { service } => format!("{}/{}", service.namespace, service.name),
            AllocKey::Endpoint { service, cluster, endpoint } => {
                format!("{}/{}/{}/{}", service.namespace, service.name, cluster, endpoint)
            }
        }
    }
}

impl std::fmt::Display for AllocKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllocKey::Service { service } => write!(f, "service {service}"),
            AllocKey::Endpoint { service, cluster, endpoint } => {
                write!(f, "endpoint {endpoint} of service {service} in cluster {cluster}")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error(
        "clusterset ip range {range} is exhausted ({used} addresses in use, {reserved} of them \
         reserved for imports of withdrawn clusters): {key} waits for a free address; widen \
         front.clusterSetIPRange or remove imports"
    )]
    Exhausted { range: IpNet, used: usize, reserved: usize, key: AllocKey },
    #[error("cannot read clusterset ip state file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "clusterset ip state file {path} is not valid: {source}; move it away to start with fresh \
         assignments"
    )]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error(
        "clusterset ip state file {path} has unsupported version {version} (expected {STATE_VERSION})"
    )]
    Version { path: PathBuf, version: u32 },
    #[error("cannot write clusterset ip state file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

impl AllocError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AllocError::Exhausted { .. } => "exhausted",
            AllocError::Read { .. } => "read",
            AllocError::Parse { .. } => "parse",
            AllocError::Version { .. } => "version",
            AllocError::Write { .. } => "write",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    range: String,
    allocations: Vec<StateEntry>,
}

#[derive(Serialize, Deserialize)]
struct StateEntry {
    ip: IpAddr,
    key: AllocKey,
}

/// How many keys that held an address before are remembered (for their place in the waiting
/// queue and their old address); the oldest are forgotten first.
const MAX_REMEMBERED: usize = 4096;

/// Where a waiting key stands in the queue: keys that held an address before go first, then
/// the others, each group oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WaitPlace {
    /// Whether the key held an address before (served first when one frees).
    pub held_before: bool,
    /// When the key started waiting (a counter: smaller is older).
    pub since: u64,
}

impl WaitPlace {
    /// The queue's sort key: held-before first, then oldest first.
    fn order(self) -> (bool, u64) {
        (!self.held_before, self.since)
    }
}

/// An address given up by a key that may come back for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub ip: IpAddr,
    /// After this instant the address is free again.
    pub until: Instant,
}

/// Allocator of IPs from one range. Not shared: the import set task owns it.
#[derive(Debug)]
pub struct Allocator {
    range: IpNet,
    /// Offsets (from the network address) that may be handed out: `first..=last`.
    first: u128,
    last: u128,
    /// Keys that hold an address.
    by_key: BTreeMap<AllocKey, IpAddr>,
    /// Every address taken, held or reserved.
    by_ip: BTreeMap<IpAddr, AllocKey>,
    /// Keys whose address is reserved for them (not in `by_key`).
    reserved: BTreeMap<AllocKey, Reservation>,
    /// Keys waiting for an address, in queue order, and the same by key.
    queue: BTreeMap<(bool, u64), AllocKey>,
    waiting: BTreeMap<AllocKey, WaitPlace>,
    /// Waiting keys by service (a service's endpoint keys are cancelled together).
    waiting_by_service: BTreeMap<ServiceKey, BTreeSet<AllocKey>>,
    next_since: u64,
    /// Keys that held an address before and have none now: the address, and when it was
    /// remembered (for forgetting the oldest).
    remembered: BTreeMap<AllocKey, (u64, IpAddr)>,
    remembered_order: BTreeMap<u64, AllocKey>,
    /// Waiting keys that got an address when one freed, for the owner to pick up.
    granted: Vec<AllocKey>,
    /// Keys that started waiting since the owner last asked.
    newly_waiting: Vec<AllocKey>,
    /// Keys whose address another key was pinned to, for the owner to allocate again.
    displaced: Vec<AllocKey>,
    state_file: Option<PathBuf>,
    dirty: bool,
    /// Entries of the state file that were dropped on load (outside the range, duplicated).
    dropped_on_load: usize,
}

impl Allocator {
    /// An allocator over `range`. With a state file, earlier assignments are reloaded from it
    /// (a missing file is a fresh start); entries outside `range` are dropped (the range was
    /// changed), as are duplicate IPs.
    pub fn open(range: IpNet, state_file: Option<PathBuf>) -> Result<Self, AllocError> {
        let range = range.trunc();
        let host_bits = u32::from(range.max_prefix_len() - range.prefix_len());
        let size_minus_one: u128 =
            if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
        // IPv4 ranges with room for it skip the network and the broadcast address.
        let (first, last) = match range {
            IpNet::V4(_) if host_bits >= 2 => (1, size_minus_one - 1),
            _ => (0, size_minus_one),
        };
        let mut alloc = Allocator {
            range,
            first,
            last,
            by_key: BTreeMap::new(),
            by_ip: BTreeMap::new(),
            reserved: BTreeMap::new(),
            queue: BTreeMap::new(),
            waiting: BTreeMap::new(),
            waiting_by_service: BTreeMap::new(),
            next_since: 0,
            remembered: BTreeMap::new(),
            remembered_order: BTreeMap::new(),
            granted: Vec::new(),
            displaced: Vec::new(),
            newly_waiting: Vec::new(),
            state_file,
            dirty: false,
            dropped_on_load: 0,
        };
        if let Some(path) = alloc.state_file.clone() {
            alloc.load(&path)?;
        }
        Ok(alloc)
    }

    fn load(&mut self, path: &Path) -> Result<(), AllocError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(AllocError::Read { path: path.to_owned(), source }),
        };
        let state: StateFile = serde_json::from_str(&text)
            .map_err(|source| AllocError::Parse { path: path.to_owned(), source })?;
        if state.version != STATE_VERSION {
            return Err(AllocError::Version { path: path.to_owned(), version: state.version });
        }
        for entry in state.allocations {
            let usable =
                self.offset_of(entry.ip).is_some_and(|o| o >= self.first && o <= self.last);
            if !usable || self.by_ip.contains_key(&entry.ip) || self.by_key.contains_key(&entry.key)
            {
                self.dropped_on_load += 1;
                continue;
            }
            self.by_ip.insert(entry.ip, entry.key.clone());
            self.by_key.insert(entry.key, entry.ip);
        }
        if self.dropped_on_load > 0 {
            tracing::warn!(
                path = %path.display(),
                dropped = self.dropped_on_load,
                range = %self.range,
                "dropped clusterset ip assignments outside the range or duplicated"
            );
            self.dirty = true;
        }
        tracing::debug!(path = %path.display(), restored = self.by_key.len(), "restored clusterset ips");
        Ok(())
    }

    /// Whether assignments are kept in a state file (`front.stateDir`).
    pub fn persists(&self) -> bool {
        self.state_file.is_some()
    }

    pub fn range(&self) -> IpNet {
        self.range
    }

    /// How many keys hold an address (reserved addresses not counted).
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// How many addresses are taken: held or reserved.
    pub fn in_use(&self) -> usize {
        self.by_ip.len()
    }

    /// How many addresses the range can hand out.
    pub fn capacity(&self) -> u128 {
        // Saturates for a whole IPv6 space (::/0), which has one address more than u128 counts.
        (self.last - self.first).saturating_add(1)
    }

    /// The IP held by `key`, if any (a reserved address is not held).
    pub fn get(&self, key: &AllocKey) -> Option<IpAddr> {
        self.by_key.get(key).copied()
    }

    /// Who holds or has reserved `ip`, if anyone.
    pub fn holder(&self, ip: IpAddr) -> Option<&AllocKey> {
        self.by_ip.get(&ip)
    }

    /// Every key that holds an IP.
    pub fn keys(&self) -> impl Iterator<Item = &AllocKey> {
        self.by_key.keys()
    }

    /// The reservation of `key`, if its address is reserved for it.
    pub fn reservation(&self, key: &AllocKey) -> Option<Reservation> {
        self.reserved.get(key).copied()
    }

    /// Every reservation.
    pub fn reservations(&self) -> impl Iterator<Item = (&AllocKey, &Reservation)> {
        self.reserved.iter()
    }

    /// The keys waiting for an address, first in line first.
    pub fn waiting(&self) -> impl Iterator<Item = (&AllocKey, WaitPlace)> {
        self.queue.values().map(|k| (k, self.waiting[k]))
    }

    /// How many keys wait for an address.
    pub fn waiting_len(&self) -> usize {
        self.queue.len()
    }

    /// How many services have a key waiting.
    pub fn waiting_services(&self) -> usize {
        self.waiting_by_service.len()
    }

    /// Whether `key` waits for an address.
    pub fn is_waiting(&self, key: &AllocKey) -> bool {
        self.waiting.contains_key(key)
    }

    /// The waiting keys of one service (its ClusterSetIP, its endpoints' VIPs).
    pub fn waiting_of(&self, service: &ServiceKey) -> impl Iterator<Item = &AllocKey> {
        self.waiting_by_service.get(service).into_iter().flatten()
    }

    /// The IP of `key`: the one it holds or has reserved, else the one it held before if that
    /// is free, else its preferred slot, else the next free one after it. With no free address
    /// the key joins the waiting queue (keeping its place if it was there) and gets an address
    /// as soon as one frees ([`Allocator::take_granted`]).
    pub fn allocate(&mut self, key: &AllocKey) -> Result<IpAddr, AllocError> {
        if let Some(ip) = self.by_key.get(key) {
            return Ok(*ip);
        }
        if let Some(r) = self.reserved.remove(key) {
            self.by_key.insert(key.clone(), r.ip);
            self.dirty = true;
            return Ok(r.ip);
        }
        // The queue is served the moment an address frees, so while keys wait there is no free
        // address: a newcomer cannot jump the queue.
        if !self.has_free() {
            self.enqueue(key);
            return Err(AllocError::Exhausted {
                range: self.range,
                used: self.by_ip.len(),
                reserved: self.reserved.len(),
                key: key.clone(),
            });
        }
        Ok(self.assign(key))
    }

    /// Give `key`'s address back to the range (its own or its reservation), or take it out of
    /// the waiting queue. An address that frees goes at once to the first waiting key. Returns
    /// the IP it held.
    pub fn release(&mut self, key: &AllocKey) -> Option<IpAddr> {
        self.dequeue(key);
        let ip = match self.by_key.remove(key) {
            Some(ip) => ip,
            None => self.reserved.remove(key)?.ip,
        };
        self.by_ip.remove(&ip);
        self.dirty = true;
        self.grant();
        Some(ip)
    }

    /// Keep `key`'s address for it until `until` instead of releasing it: nobody else gets it
    /// meanwhile, and [`Allocator::allocate`] gives it back to `key`. Returns the IP.
    pub fn reserve(&mut self, key: &AllocKey, until: Instant) -> Option<IpAddr> {
        self.dequeue(key);
        let ip = self.by_key.remove(key)?;
        self.reserved.insert(key.clone(), Reservation { ip, until });
        Some(ip)
    }

    /// When the next reservation runs out, if any.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.reserved.values().map(|r| r.until).min()
    }

    /// Frees the addresses of reservations that ran out by `now` (their keys are remembered
    /// as having held one); returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let gone: Vec<AllocKey> =
            self.reserved.iter().filter(|(_, r)| r.until <= now).map(|(k, _)| k.clone()).collect();
        for key in &gone {
            if let Some(r) = self.reserved.remove(key) {
                self.by_ip.remove(&r.ip);
                self.remember(key, r.ip);
                self.dirty = true;
            }
        }
        if !gone.is_empty() {
            self.grant();
        }
        gone.len()
    }

    /// Release every key holding an address for which `keep` says false (they are remembered
    /// as having held one); returns how many were released. Reservations are not touched.
    pub fn retain(&mut self, mut keep: impl FnMut(&AllocKey) -> bool) -> usize {
        let gone: Vec<AllocKey> = self.by_key.keys().filter(|k| !keep(k)).cloned().collect();
        for key in &gone {
            if let Some(ip) = self.by_key.remove(key) {
                self.by_ip.remove(&ip);
                self.remember(key, ip);
                self.dirty = true;
            }
        }
        if !gone.is_empty() {
            self.grant();
        }
        gone.len()
    }

    /// Waiting keys that got an address since the last call, in the order they got it.
    pub fn take_granted(&mut self) -> Vec<AllocKey> {
        std::mem::take(&mut self.granted)
    }

    /// Keys that started waiting since the last call, in the order they did.
    pub fn take_newly_waiting(&mut self) -> Vec<AllocKey> {
        std::mem::take(&mut self.newly_waiting)
    }

    /// Whether `ip` is an address of the range this allocator hands out.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.offset_of(ip).is_some_and(|o| o >= self.first && o <= self.last)
    }

    /// `key` takes `ip`, an address the cluster's writer already published for it (a
    /// ServiceImport's `spec.ips`: every replica serves the address the leader wrote). A key
    /// that held or had reserved `ip` loses it and is listed by [`Allocator::take_displaced`]
    /// (its owner allocates it again); `key`'s previous address is released. False (and
    /// nothing changes) when `ip` is not an address of the range.
    pub fn pin(&mut self, key: &AllocKey, ip: IpAddr) -> bool {
        if !self.contains(ip) {
            return false;
        }
        if self.by_key.get(key) == Some(&ip) {
            return true;
        }
        self.dequeue(key);
        let old = self.by_key.remove(key).or_else(|| self.reserved.remove(key).map(|r| r.ip));
        if let Some(old) = old {
            self.by_ip.remove(&old);
        }
        if let Some(other) = self.by_ip.remove(&ip) {
            self.by_key.remove(&other);
            self.reserved.remove(&other);
            self.displaced.push(other);
        }
        self.insert(key, ip);
        self.grant();
        true
    }

    /// Keys that lost their address to a pinned key since the last call.
    pub fn take_displaced(&mut self) -> Vec<AllocKey> {
        std::mem::take(&mut self.displaced)
    }

    fn has_free(&self) -> bool {
        (self.by_ip.len() as u128) < self.capacity()
    }

    /// Gives free addresses to waiting keys, first in line first.
    fn grant(&mut self) {
        while self.has_free() {
            let Some((_, key)) = self.queue.pop_first() else { break };
            self.forget_waiting(&key);
            self.assign(&key);
            self.granted.push(key);
        }
    }

    /// Takes a free address for `key` (there must be one): its old one if free, else its
    /// preferred slot or the next free one after it.
    fn assign(&mut self, key: &AllocKey) -> IpAddr {
        self.dequeue(key);
        if let Some((seq, old)) = self.remembered.remove(key) {
            self.remembered_order.remove(&seq);
            if !self.by_ip.contains_key(&old) {
                return self.insert(key, old);
            }
        }
        let capacity = self.capacity();
        let mut slot = fnv1a(key.hash_input().as_bytes()) as u128 % capacity;
        // At most in_use()+1 probes: there is a free slot among any in_use()+1 consecutive ones.
        loop {
            let ip = self.ip_at(self.first + slot);
            if !self.by_ip.contains_key(&ip) {
                return self.insert(key, ip);
            }
            slot = if slot + 1 >= capacity { 0 } else { slot + 1 };
        }
    }

    fn insert(&mut self, key: &AllocKey, ip: IpAddr) -> IpAddr {
        self.by_ip.insert(ip, key.clone());
        self.by_key.insert(key.clone(), ip);
        self.dirty = true;
        ip
    }

    fn enqueue(&mut self, key: &AllocKey) {
        if self.waiting.contains_key(key) {
            return;
        }
        let place =
            WaitPlace { held_before: self.remembered.contains_key(key), since: self.next_since };
        self.next_since += 1;
        self.queue.insert(place.order(), key.clone());
        self.waiting.insert(key.clone(), place);
        self.waiting_by_service.entry(key.service_key().clone()).or_default().insert(key.clone());
        self.newly_waiting.push(key.clone());
    }

    fn dequeue(&mut self, key: &AllocKey) {
        if let Some(place) = self.waiting.get(key) {
            self.queue.remove(&place.order());
            self.forget_waiting(key);
        }
    }

    /// Removes `key` from the indexes of waiting keys (not from the queue).
    fn forget_waiting(&mut self, key: &AllocKey) {
        self.waiting.remove(key);
        let service = key.service_key();
        if let Some(set) = self.waiting_by_service.get_mut(service) {
            set.remove(key);
            if set.is_empty() {
                self.waiting_by_service.remove(service);
            }
        }
    }

    fn remember(&mut self, key: &AllocKey, ip: IpAddr) {
        let seq = self.next_since;
        self.next_since += 1;
        if let Some((old, _)) = self.remembered.insert(key.clone(), (seq, ip)) {
            self.remembered_order.remove(&old);
        }
        self.remembered_order.insert(seq, key.clone());
        while self.remembered.len() > MAX_REMEMBERED {
            let Some((_, k)) = self.remembered_order.pop_first() else { break };
            self.remembered.remove(&k);
        }
    }

    /// Whether there are changes not yet written to the state file.
    pub fn is_dirty(&self) -> bool {
        self.dirty && self.state_file.is_some()
    }

    /// Write the assignments to the state file if they changed since the last write. The
    /// file is replaced atomically: a crash leaves either the old or the new content.
    pub fn flush(&mut self) -> Result<(), AllocError> {
        let Some(path) = self.state_file.clone() else {
            self.dirty = false;
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let state = StateFile {
            version: STATE_VERSION,
            range: self.range.to_string(),
            allocations: self
                .by_ip
                .iter()
                .map(|(ip, key)| StateEntry { ip: *ip, key: key.clone() })
                .collect(),
        };
        let write_err = |source| AllocError::Write { path: path.clone(), source };
        let json =
            serde_json::to_vec_pretty(&state).map_err(|e| write_err(std::io::Error::other(e)))?;
        let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        tmp_name.push(format!(".tmp{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(source) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(source));
        }
        self.dirty = false;
        Ok(())
    }

    fn offset_of(&self, ip: IpAddr) -> Option<u128> {
        match (self.range, ip) {
            (IpNet::V4(net), IpAddr::V4(ip)) if net.contains(&ip) => {
                Some(u128::from(u32::from(ip) - u32::from(net.network())))
            }
            (IpNet::V6(net), IpAddr::V6(ip)) if net.contains(&ip) => {
                Some(u128::from(ip) - u128::from(net.network()))
            }
            _ => None,
        }
    }

    fn ip_at(&self, offset: u128) -> IpAddr {
        match self.range {
            // The offset is below the range size, which fits the family: no overflow.
            IpNet::V4(net) => {
                IpAddr::V4(Ipv4Addr::from(u32::from(net.network()).wrapping_add(offset as u32)))
            }
            IpNet::V6(net) => {
                IpAddr::V6(Ipv6Addr::from(u128::from(net.network()).wrapping_add(offset)))
            }
        }
    }
}

/// FNV-1a, 64 bit: a fixed hash, so the preferred slot of a key is the same on every gateway,
/// every build and every run (std's hasher promises none of that).
fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> AllocKey {
        AllocKey::service(&ServiceKey::new("default", name))
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test range")
    }

    #[test]
    fn same_key_same_ip_and_idempotent() {
        let mut a = Allocator::open(net("242.1.0.0/16"), None).unwrap();
        let mut b = Allocator::open(net("242.1.0.0/16"), None).unwrap();
        let ip = a.allocate(&svc("web")).unwrap();
        assert_eq!(a.allocate(&svc("web")).unwrap(), ip);
        // another gateway (another allocator) picks the same preferred slot
        assert_eq!(b.allocate(&svc("web")).unwrap(), ip);
        assert!(net("242.1.0.0/16").contains(&ip));
        assert_eq!(a.len(), 1);
        assert_eq!(a.holder(ip), Some(&svc("web")));
    }

    #[test]
    fn a_pinned_key_takes_the_published_address_and_moves_an_unpinned_holder_aside() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let mut a = Allocator::open(net("10.9.0.0/29"), None).unwrap();
        let web = a.allocate(&svc("web")).unwrap();
        // outside the range (or the network address): not pinned, nothing changes
        assert!(!a.pin(&svc("api"), ip("10.8.0.1")));
        assert!(!a.pin(&svc("api"), ip("10.9.0.0")));
        assert_eq!(a.get(&svc("api")), None);
        // api is pinned to web's address: web is displaced and gets another one
        assert!(a.pin(&svc("api"), web));
        assert_eq!(a.get(&svc("api")), Some(web));
        assert_eq!(a.holder(web), Some(&svc("api")));
        assert_eq!(a.get(&svc("web")), None);
        assert_eq!(a.take_displaced(), vec![svc("web")]);
        assert!(a.take_displaced().is_empty());
        let moved = a.allocate(&svc("web")).unwrap();
        assert_ne!(moved, web);
        // pinning again to the same address is a no-op; to another frees the old one
        assert!(a.pin(&svc("api"), web));
        assert!(a.take_displaced().is_empty());
        let other = ip("10.9.0.6");
        let other = if other == moved { ip("10.9.0.5") } else { other };
        assert!(a.pin(&svc("api"), other));
        assert_eq!(a.holder(web), None, "the old address is free again");
        assert_eq!(a.len(), 2);
        // a reserved address goes to the pinned key too (the reservation is dropped)
        a.reserve(&svc("web"), Instant::now() + std::time::Duration::from_secs(60));
        assert!(a.pin(&svc("db"), moved));
        assert_eq!(a.reservation(&svc("web")), None);
        assert_eq!(a.take_displaced(), vec![svc("web")]);
    }

    #[test]
    fn a_pinned_key_leaves_the_waiting_queue() {
        let mut a = Allocator::open(net("10.9.0.7/32"), None).unwrap();
        let only = a.allocate(&svc("a")).unwrap();
        assert!(a.allocate(&svc("b")).is_err(), "full: b waits");
        // the writer published the one address for b: b gets it, a is displaced
        assert!(a.pin(&svc("b"), only));
        assert_eq!(a.take_displaced(), vec![svc("a")]);
        assert_eq!(a.get(&svc("b")), Some(only));
        assert!(!a.is_waiting(&svc("b")), "a pinned key leaves the queue");
    }

    #[test]
    fn ipv4_skips_network_and_broadcast() {
        // a /30 has 2 usable addresses
        let mut a = Allocator::open(net("10.9.0.0/30"), None).unwrap();
        assert_eq!(a.capacity(), 2);
        let x = a.allocate(&svc("a")).unwrap();
        let y = a.allocate(&svc("b")).unwrap();
        let mut got = [x, y];
        got.sort();
        assert_eq!(got, ["10.9.0.1".parse::<IpAddr>().unwrap(), "10.9.0.2".parse().unwrap()]);
    }

    #[test]
    fn tiny_ranges_use_every_address() {
        let mut a = Allocator::open(net("10.9.0.7/32"), None).unwrap();
        assert_eq!(a.allocate(&svc("a")).unwrap(), "10.9.0.7".parse::<IpAddr>().unwrap());
        let b = Allocator::open(net("10.9.0.6/31"), None).unwrap();
        assert_eq!(b.capacity(), 2);
        let c = Allocator::open(net("fd00::/127"), None).unwrap();
        assert_eq!(c.capacity(), 2);
        let mut whole = Allocator::open(net("::/0"), None).unwrap();
        assert_eq!(whole.capacity(), u128::MAX);
        assert!(whole.allocate(&svc("a")).unwrap().is_ipv6());
        let mut v4 = Allocator::open(net("0.0.0.0/0"), None).unwrap();
        assert_eq!(v4.capacity(), (1u128 << 32) - 2);
        assert!(v4.allocate(&svc("a")).unwrap().is_ipv4());
    }

    #[test]
    fn collisions_probe_to_distinct_ips() {
        // 14 usable addresses, 14 keys: all distinct, all in range, none network/broadcast
        let mut a = Allocator::open(net("10.0.0.0/28"), None).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..14 {
            let ip = a.allocate(&svc(&format!("s{i}"))).unwrap();
            assert!(seen.insert(ip), "ip {ip} handed out twice");
            assert_ne!(ip, "10.0.0.0".parse::<IpAddr>().unwrap());
            assert_ne!(ip, "10.0.0.15".parse::<IpAddr>().unwrap());
        }
        assert_eq!(seen.len(), 14);
    }

    #[test]
    fn exhaustion_is_a_clear_error_and_release_frees() {
        let mut a = Allocator::open(net("10.0.0.0/30"), None).unwrap();
        a.allocate(&svc("a")).unwrap();
        let b_ip = a.allocate(&svc("b")).unwrap();
        let err = a.allocate(&svc("c")).unwrap_err();
        assert_eq!(err.reason(), "exhausted");
        let msg = err.to_string();
        assert!(msg.contains("10.0.0.0/30") && msg.contains("default/c"), "{msg}");
        assert_eq!(a.release(&svc("b")), Some(b_ip));
        assert_eq!(a.release(&svc("b")), None);
        assert_eq!(a.allocate(&svc("c")).unwrap(), b_ip);
    }

    /// Runs a scenario on a /29 (6 usable addresses) and checks every expectation. Steps:
    /// `+a` allocate a (must get an address), `+a=b` (must get the address b had), `+a!` (must
    /// wait), `-a` release a, `~a` reserve a's address (for 60 s), `expire` (120 s later),
    /// `granted a b` (keys given an address since the last check, in order), `queue a b` (the
    /// waiting queue, first in line first), `fresh a b` (keys that started waiting since the
    /// last check).
    fn run_scenario(name: &str, steps: &[&str]) {
        let mut a = Allocator::open(net("10.0.0.0/29"), None).unwrap();
        let t0 = Instant::now();
        let mut ips: BTreeMap<String, IpAddr> = BTreeMap::new();
        let names = |keys: Vec<AllocKey>| -> Vec<String> {
            keys.iter().map(|k| k.service_key().name.clone()).collect()
        };
        for (i, step) in steps.iter().enumerate() {
            let at = format!("scenario {name:?}, step {i} ({step:?})");
            let (op, rest) = step.split_once(' ').unwrap_or((step, ""));
            let list: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
            match op {
                "expire" => {
                    a.expire(t0 + std::time::Duration::from_secs(120));
                }
                "granted" => {
                    let got = a.take_granted();
                    for k in &got {
                        ips.insert(k.service_key().name.clone(), a.get(k).expect("granted ip"));
                    }
                    assert_eq!(names(got), list, "{at}");
                }
                "queue" => {
                    let q: Vec<String> =
                        a.waiting().map(|(k, _)| k.service_key().name.clone()).collect();
                    assert_eq!(q, list, "{at}");
                }
                "fresh" => assert_eq!(names(a.take_newly_waiting()), list, "{at}"),
                _ if op.starts_with('+') && op.ends_with('!') => {
                    let k = &op[1..op.len() - 1];
                    let err = a.allocate(&svc(k)).expect_err(&at);
                    assert_eq!(err.reason(), "exhausted", "{at}");
                    assert!(err.to_string().contains(&format!("default/{k} waits")), "{at}: {err}");
                }
                _ if op.starts_with('+') => {
                    let (k, same_as) = op[1..].split_once('=').unwrap_or((&op[1..], ""));
                    let ip = a.allocate(&svc(k)).unwrap_or_else(|e| panic!("{at}: {e}"));
                    if !same_as.is_empty() {
                        assert_eq!(Some(&ip), ips.get(same_as), "{at}: not {same_as}'s address");
                    }
                    ips.insert(k.to_owned(), ip);
                }
                _ if op.starts_with('-') => {
                    a.release(&svc(&op[1..]));
                }
                _ if op.starts_with('~') => {
                    let k = svc(&op[1..]);
                    let ip = a.reserve(&k, t0 + std::time::Duration::from_secs(60));
                    assert_eq!(ip, ips.get(&op[1..]).copied(), "{at}");
                    assert_eq!(a.get(&k), None, "{at}: a reserved address is not held");
                    assert_eq!(a.holder(ip.expect("reserved")), Some(&k), "{at}");
                }
                _ => panic!("{at}: unknown step"),
            }
            // invariants: no address twice, nobody waits while an address is free
            let held: BTreeSet<IpAddr> = a.by_key.values().copied().collect();
            let reserved: BTreeSet<IpAddr> = a.reserved.values().map(|r| r.ip).collect();
            assert_eq!(held.len(), a.by_key.len(), "{at}: an address held twice");
            assert!(held.is_disjoint(&reserved), "{at}: a reserved address is held");
            assert_eq!(held.len() + reserved.len(), a.in_use(), "{at}");
            assert!(a.waiting_len() == 0 || a.in_use() == 6, "{at}: waits while free");
        }
    }

    #[test]
    fn allocation_scenarios() {
        let fill = ["+s0", "+s1", "+s2", "+s3", "+s4", "+s5"];
        let with_fill = |rest: &[&'static str]| -> Vec<&'static str> {
            fill.iter().copied().chain(rest.iter().copied()).collect()
        };
        let scenarios: Vec<(&str, Vec<&str>)> = vec![
            (
                "exhaustion: the extra keys wait, oldest first, and asking again keeps the place",
                with_fill(&["+s6!", "+s7!", "+s6!", "queue s6 s7", "fresh s6 s7", "+s7!", "fresh"]),
            ),
            (
                "a release goes at once to the first waiting key, with the freed address",
                with_fill(&[
                    "+s6!",
                    "+s7!",
                    "-s2",
                    "granted s6",
                    "+s6=s2",
                    "queue s7",
                    "-s0",
                    "granted s7",
                    "+s7=s0",
                    "queue",
                    "+s8!",
                    "queue s8",
                ]),
            ),
            (
                "a waiting key that is released leaves the queue",
                with_fill(&["+s6!", "+s7!", "-s6", "queue s7", "-s1", "granted s7"]),
            ),
            (
                "a reserved address comes back to its key, even when the range is full",
                with_fill(&["~s3", "+n0!", "+s3=s3", "queue n0", "granted"]),
            ),
            (
                "newcomers take free addresses, never reserved ones, then wait",
                with_fill(&[
                    "~s0", "~s1", "-s2", "-s3", "+n0", "+n1", "+n2!", "+s0=s0", "+s1=s1",
                    "queue n2",
                ]),
            ),
            (
                "an expired reservation frees its address for the first waiting key",
                with_fill(&["~s4", "+n0!", "expire", "granted n0", "+n0=s4"]),
            ),
            (
                "a key whose reservation ran out is served before keys that never had one",
                with_fill(&[
                    "~s4",
                    "+n0!",
                    "expire",
                    "granted n0",
                    "+s4!",
                    "+n1!",
                    "queue s4 n1",
                    "-s5",
                    "granted s4",
                    "queue n1",
                ]),
            ),
            (
                "a key that held an address before gets the same one back when it is free",
                with_fill(&["~s4", "expire", "+s4=s4"]),
            ),
            (
                "releasing a reservation frees the address for the queue",
                with_fill(&["~s1", "+n0!", "-s1", "granted n0", "+n0=s1"]),
            ),
        ];
        for (name, steps) in scenarios {
            run_scenario(name, &steps);
        }
    }

    #[test]
    fn retained_out_keys_are_remembered_as_having_held_an_address() {
        let mut a = Allocator::open(net("10.0.0.0/29"), None).unwrap();
        for i in 0..6 {
            a.allocate(&svc(&format!("s{i}"))).unwrap();
        }
        let s0 = a.get(&svc("s0")).unwrap();
        assert_eq!(a.retain(|k| *k != svc("s0")), 1);
        // the free address went nowhere (nobody waited); a newcomer takes it
        a.allocate(&svc("n0")).unwrap();
        a.allocate(&svc("n1")).unwrap_err();
        a.allocate(&svc("s0")).unwrap_err();
        let queue: Vec<(&AllocKey, WaitPlace)> = a.waiting().collect();
        assert_eq!(queue[0].0, &svc("s0"), "{queue:?}");
        assert!(queue[0].1.held_before && !queue[1].1.held_before);
        a.release(&svc("n0"));
        assert_eq!(a.take_granted(), vec![svc("s0")]);
        assert_eq!(a.get(&svc("s0")), Some(s0));
    }

    #[test]
    fn waiting_keys_are_listed_per_service_and_reservations_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ips.json");
        let mut a = Allocator::open(net("10.0.0.0/30"), Some(path.clone())).unwrap();
        let key = ServiceKey::new("db", "cassandra");
        let c = ClusterId::new("west").unwrap();
        let e1 = AllocKey::endpoint(&key, &c, "10.1.0.1".parse().unwrap());
        let e2 = AllocKey::endpoint(&key, &c, "10.1.0.2".parse().unwrap());
        let s_ip = a.allocate(&svc("a")).unwrap();
        a.allocate(&e1).unwrap();
        a.allocate(&e2).unwrap_err();
        assert_eq!(a.waiting_of(&key).collect::<Vec<_>>(), vec![&e2]);
        assert_eq!(a.waiting_of(&ServiceKey::new("default", "a")).count(), 0);
        a.release(&e2);
        assert_eq!(a.waiting_of(&key).count(), 0);
        // a reservation is written like an allocation: a restart keeps the address taken
        let until = Instant::now() + std::time::Duration::from_secs(60);
        assert_eq!(a.reserve(&svc("a"), until), Some(s_ip));
        assert_eq!(a.next_expiry(), Some(until));
        a.flush().unwrap();
        let b = Allocator::open(net("10.0.0.0/30"), Some(path)).unwrap();
        assert_eq!(b.get(&svc("a")), Some(s_ip));
    }

    #[test]
    fn endpoint_keys_share_the_range() {
        let mut a = Allocator::open(net("fd00:1::/120"), None).unwrap();
        let key = ServiceKey::new("db", "cassandra");
        let c = ClusterId::new("west").unwrap();
        let s = a.allocate(&AllocKey::service(&key)).unwrap();
        let e1 = a.allocate(&AllocKey::endpoint(&key, &c, "10.1.0.1".parse().unwrap())).unwrap();
        let e2 = a.allocate(&AllocKey::endpoint(&key, &c, "10.1.0.2".parse().unwrap())).unwrap();
        assert!(s != e1 && e1 != e2 && s != e2);
        assert!(e1.is_ipv6());
        assert_eq!(a.retain(|k| matches!(k, AllocKey::Service { .. })), 2);
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn survives_restart_via_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ips.json");
        let mut ips = BTreeMap::new();
        {
            let mut a = Allocator::open(net("10.0.0.0/28"), Some(path.clone())).unwrap();
            for i in 0..10 {
                ips.insert(svc(&format!("s{i}")), a.allocate(&svc(&format!("s{i}"))).unwrap());
            }
            a.release(&svc("s3"));
            ips.remove(&svc("s3"));
            assert!(a.is_dirty());
            a.flush().unwrap();
            assert!(!a.is_dirty());
        }
        let mut b = Allocator::open(net("10.0.0.0/28"), Some(path.clone())).unwrap();
        assert_eq!(b.len(), 9);
        for (key, ip) in &ips {
            assert_eq!(b.get(key), Some(*ip));
        }
        // new keys never take a restored ip, even when allocated in another order
        for i in 20..25 {
            let ip = b.allocate(&svc(&format!("s{i}"))).unwrap();
            assert!(!ips.values().any(|v| *v == ip));
        }
        // no temp file left behind
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn reload_drops_entries_outside_a_changed_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ips.json");
        let mut a = Allocator::open(net("10.0.0.0/24"), Some(path.clone())).unwrap();
        a.allocate(&svc("a")).unwrap();
        a.flush().unwrap();
        let b = Allocator::open(net("10.1.0.0/24"), Some(path.clone())).unwrap();
        assert!(b.is_empty());
        assert!(b.is_dirty());
    }

    #[test]
    fn missing_file_is_fresh_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.json");
        assert!(Allocator::open(net("10.0.0.0/24"), Some(path.clone())).unwrap().is_empty());
        std::fs::write(&path, "{ not json").unwrap();
        let err = Allocator::open(net("10.0.0.0/24"), Some(path.clone())).unwrap_err();
        assert_eq!(err.reason(), "parse");
        assert!(err.to_string().contains("none.json"));
        std::fs::write(&path, r#"{"version":9,"range":"10.0.0.0/24","allocations":[]}"#).unwrap();
        assert_eq!(
            Allocator::open(net("10.0.0.0/24"), Some(path)).unwrap_err().reason(),
            "version"
        );
    }

    #[test]
    fn write_failure_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("ips.json");
        let mut a = Allocator::open(net("10.0.0.0/24"), Some(path)).unwrap();
        a.allocate(&svc("a")).unwrap();
        let err = a.flush().unwrap_err();
        assert_eq!(err.reason(), "write");
        assert!(err.to_string().contains("no-such-dir"));
        assert!(a.is_dirty());
    }

    #[test]
    fn fnv_is_fixed() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
