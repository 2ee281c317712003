//! ClusterSetIP allocation: one virtual IP per ClusterSetIP import, and one per remote endpoint
//! of a headless import, all from `front.clusterSetIPRange`.
//!
//! An IP must stay the same for the life of its import, across gateway restarts, and must never
//! be handed to another key while in use. So: the preferred slot is a stable hash of the key
//! (the same service tends to get the same IP on every gateway and after a lost state file),
//! collisions probe linearly, and every assignment is persisted to a small JSON file (written
//! atomically: temp file + rename) that is reloaded at start.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

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
        "clusterset ip range {range} is exhausted ({used} addresses in use), cannot allocate for \
         {key}; widen front.clusterSetIPRange"
    )]
    Exhausted { range: IpNet, used: usize, key: AllocKey },
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

/// Allocator of IPs from one range. Not shared: the import set task owns it.
#[derive(Debug)]
pub struct Allocator {
    range: IpNet,
    /// Offsets (from the network address) that may be handed out: `first..=last`.
    first: u128,
    last: u128,
    by_key: BTreeMap<AllocKey, IpAddr>,
    by_ip: BTreeMap<IpAddr, AllocKey>,
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

    pub fn range(&self) -> IpNet {
        self.range
    }

    /// How many addresses are in use.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// How many addresses the range can hand out.
    pub fn capacity(&self) -> u128 {
        // Saturates for a whole IPv6 space (::/0), which has one address more than u128 counts.
        (self.last - self.first).saturating_add(1)
    }

    /// The IP held by `key`, if any.
    pub fn get(&self, key: &AllocKey) -> Option<IpAddr> {
        self.by_key.get(key).copied()
    }

    /// Who holds `ip`, if anyone.
    pub fn holder(&self, ip: IpAddr) -> Option<&AllocKey> {
        self.by_ip.get(&ip)
    }

    /// Every key that holds an IP.
    pub fn keys(&self) -> impl Iterator<Item = &AllocKey> {
        self.by_key.keys()
    }

    /// The IP of `key`: the one it already holds, else its preferred slot, else the next free
    /// one after it.
    pub fn allocate(&mut self, key: &AllocKey) -> Result<IpAddr, AllocError> {
        if let Some(ip) = self.by_key.get(key) {
            return Ok(*ip);
        }
        let capacity = self.capacity();
        if self.by_key.len() as u128 >= capacity {
            return Err(AllocError::Exhausted {
                range: self.range,
                used: self.by_key.len(),
                key: key.clone(),
            });
        }
        let mut slot = fnv1a(key.hash_input().as_bytes()) as u128 % capacity;
        // At most len()+1 probes: there is a free slot among any len()+1 consecutive ones.
        loop {
            let ip = self.ip_at(self.first + slot);
            if let std::collections::btree_map::Entry::Vacant(slot) = self.by_ip.entry(ip) {
                slot.insert(key.clone());
                self.by_key.insert(key.clone(), ip);
                self.dirty = true;
                return Ok(ip);
            }
            slot = if slot + 1 >= capacity { 0 } else { slot + 1 };
        }
    }

    /// Give `key`'s IP back to the range. Returns the IP it held.
    pub fn release(&mut self, key: &AllocKey) -> Option<IpAddr> {
        let ip = self.by_key.remove(key)?;
        self.by_ip.remove(&ip);
        self.dirty = true;
        Some(ip)
    }

    /// Release every key for which `keep` says false; returns how many were released.
    pub fn retain(&mut self, mut keep: impl FnMut(&AllocKey) -> bool) -> usize {
        let gone: Vec<AllocKey> = self.by_key.keys().filter(|k| !keep(k)).cloned().collect();
        for key in &gone {
            self.release(key);
        }
        gone.len()
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
