//! The name table both query paths read: lowercase wire name → [`Entry`] (records for the
//! slow path, pre-encoded responses for the fast path). Sharded copy-on-write maps behind
//! `ArcSwap`: readers never lock, and a change copies only the shards it touches.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::rr::{Record, RecordType};

use crate::names::Zone;
use crate::records::NameData;
use crate::wire::encode_template;

const SHARDS: usize = 64;

/// One owner name of our zones.
#[derive(Debug)]
pub struct Entry {
    pub zone: Zone,
    pub data: NameData,
    /// Pre-encoded positive responses, one per record type present.
    pub answers: Vec<(u16, Box<[u8]>)>,
    /// Pre-encoded NODATA response (SOA in authority) for every other data type.
    pub nodata: Option<Box<[u8]>>,
}

impl Entry {
    /// Encodes the responses of a name. `soa` is the zone's SOA record.
    pub fn build(zone: Zone, data: NameData, soa: &Record) -> Self {
        let answers = data
            .rrsets
            .iter()
            .filter_map(|(rtype, records)| {
                let t = encode_template(&data.name, RecordType::from(*rtype), records, &[])?;
                Some((*rtype, t))
            })
            .collect();
        let nodata = encode_template(&data.name, RecordType::NULL, &[], std::slice::from_ref(soa));
        Self { zone, data, answers, nodata }
    }

    /// The template that answers `qtype`: its records, or NODATA.
    pub fn template(&self, qtype: u16) -> Option<&[u8]> {
        match self.answers.iter().find(|(t, _)| *t == qtype) {
            Some((_, bytes)) => Some(bytes),
            None => self.nodata.as_deref(),
        }
    }
}

type Shard = HashMap<Box<[u8]>, Arc<Entry>>;

/// A change to the table: `Some` inserts or replaces the name, `None` removes it.
pub type Change = (Vec<u8>, Option<Arc<Entry>>);

/// The table. Cheap to share (`Arc<Table>`); one writer applies batches of changes.
pub struct Table {
    shards: Vec<ArcSwap<Shard>>,
}

impl Default for Table {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| ArcSwap::from_pointee(Shard::new())).collect() }
    }
}

fn shard_of(key: &[u8]) -> usize {
    // FNV-1a: cheap and good enough to spread names over shards.
    let mut h: u32 = 0x811c_9dc5;
    for b in key {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h as usize) % SHARDS
}

impl Table {
    /// Runs `f` on the entry of `key` without cloning it (the fast path).
    pub fn with<R>(&self, key: &[u8], f: impl FnOnce(Option<&Entry>) -> R) -> R {
        let shard = self.shards[shard_of(key)].load();
        f(shard.get(key).map(Arc::as_ref))
    }

    pub fn get(&self, key: &[u8]) -> Option<Arc<Entry>> {
        self.shards[shard_of(key)].load().get(key).cloned()
    }

    /// Applies a batch: `Some` inserts or replaces, `None` removes. Each touched shard is
    /// copied once per batch.
    pub fn apply(&self, changes: Vec<Change>) {
        let mut by_shard: HashMap<usize, Vec<Change>> = HashMap::new();
        for change in changes {
            by_shard.entry(shard_of(&change.0)).or_default().push(change);
        }
        for (index, changes) in by_shard {
            let mut map: Shard = (**self.shards[index].load()).clone();
            for (key, entry) in changes {
                match entry {
                    Some(entry) => {
                        map.insert(key.into_boxed_slice(), entry);
                    }
                    None => {
                        map.remove(key.as_slice());
                    }
                }
            }
            self.shards[index].store(Arc::new(map));
        }
    }

    /// Number of names served.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.load().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
