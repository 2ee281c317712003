//! The name table both query paths read: lowercase wire name → [`Entry`]. An entry holds its
//! answers only as pre-encoded responses (the fast path sends them as they are; the slow path
//! decodes the records it needs from them), so each record set is held once, in wire form.
//! Sharded copy-on-write maps behind `ArcSwap`: readers never lock, and a change copies only
//! the shards it touches.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::op::Message;
use hickory_proto::rr::{Record, RecordType};
use hickory_proto::serialize::binary::DecodeError;

use crate::names::{Zone, wire_key};
use crate::records::NameData;
use crate::wire::encode_template;

const SHARDS: usize = 64;

/// The answer to one record type of a name.
#[derive(Debug, PartialEq)]
enum Answer {
    /// A whole response (ID 0, no EDNS) carrying the set in its answer section.
    Encoded(Box<[u8]>),
    /// A set too large for any DNS message (over 64 KiB encoded: a headless service with
    /// about 4 000 endpoints). Kept as records for the slow path, which answers with TC.
    TooLarge(Box<[Record]>),
}

/// One owner name of our zones. Built from a name's records by [`Entry::build`], which keeps
/// them only in wire form (about 200 bytes for a name with one record set, where the hickory
/// records took 1.5 KB).
#[derive(Debug, PartialEq)]
pub struct Entry {
    /// The lowercase wire name: the table's key, shared with it.
    key: Arc<[u8]>,
    pub zone: Zone,
    /// One answer per record type present, in type order (the order of an ANY answer).
    answers: Box<[(u16, Answer)]>,
    /// Pre-encoded NODATA response (SOA in authority) for every other data type, shared with
    /// the other names whose NODATA differs only in the question ([`SharedNodata`]).
    nodata: Option<Arc<[u8]>>,
}

impl Entry {
    /// Encodes the responses of a name. `soa` is the zone's SOA record; `shared` the NODATA
    /// responses of the writer's other names.
    pub fn build(zone: Zone, data: &NameData, soa: &Record, shared: &mut SharedNodata) -> Self {
        let answers = data
            .rrsets
            .iter()
            .map(|(rtype, records)| {
                let answer =
                    match encode_template(&data.name, RecordType::from(*rtype), records, &[]) {
                        Some(bytes) => Answer::Encoded(bytes),
                        None => Answer::TooLarge(records.clone().into_boxed_slice()),
                    };
                (*rtype, answer)
            })
            .collect();
        let nodata = encode_template(&data.name, RecordType::NULL, &[], std::slice::from_ref(soa))
            .map(|t| shared.share(t));
        Self { key: wire_key(&data.name).into(), zone, answers, nodata }
    }

    /// The table key of this entry's name.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The change that takes this entry's name out of the table.
    pub fn removal(&self) -> Change {
        Change::Remove(self.key.clone())
    }

    /// The pre-encoded response to `qtype` for the fast path: its records, or NODATA for other
    /// data types. `None` when the slow path must answer (a set too large to pre-encode, or
    /// a meta type such as ANY).
    pub fn template(&self, qtype: u16) -> Option<&[u8]> {
        match self.answers.iter().find(|(t, _)| *t == qtype) {
            Some((_, Answer::Encoded(bytes))) => Some(bytes),
            Some((_, Answer::TooLarge(_))) => None,
            None if crate::wire::is_data_type(qtype) => self.nodata.as_deref(),
            None => None,
        }
    }

    /// The records answering `qtype` (every set for ANY; empty when there are none), decoded
    /// from the pre-encoded responses. An error means a response we encoded does not decode:
    /// a bug, never the client's doing.
    pub fn records(&self, qtype: RecordType) -> Result<Vec<Record>, DecodeError> {
        let mut out = Vec::new();
        for (rtype, answer) in self.answers.iter() {
            if qtype != RecordType::ANY && u16::from(qtype) != *rtype {
                continue;
            }
            match answer {
                Answer::Encoded(bytes) => out.extend(Message::from_vec(bytes)?.answers),
                Answer::TooLarge(records) => out.extend(records.iter().cloned()),
            }
        }
        Ok(out)
    }
}

/// NODATA responses shared between names. The fast path sends a template with the client's
/// question written over the template's, so two names whose NODATA responses differ only in
/// the question bytes (same zone and name length: the SOA's compression pointers into the
/// question land alike) can send the same template. Every name of a zone has one, so sharing
/// saves a 110-byte allocation per name (5 MB at 10 000 services). The set is bounded without
/// cleanup: one template per zone, question length (at most 255) and compression variant.
#[derive(Debug, Default)]
pub struct SharedNodata(HashMap<Box<[u8]>, Arc<[u8]>>);

impl SharedNodata {
    /// The shared template equal to `template` but for the question name.
    pub fn share(&mut self, template: Box<[u8]>) -> Arc<[u8]> {
        let Some(name_len) = question_name_len(&template) else {
            return template.into();
        };
        let name_end = HEADER_LEN + name_len;
        // Header, the name's length, then everything after the name.
        let mut key = Vec::with_capacity(template.len() - name_len + 1);
        key.extend_from_slice(&template[..HEADER_LEN]);
        key.push(name_len as u8);
        key.extend_from_slice(&template[name_end..]);
        self.0.entry(key.into_boxed_slice()).or_insert_with(|| template.into()).clone()
    }

    /// How many distinct templates there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

const HEADER_LEN: usize = 12;

/// Length of the uncompressed question name of an encoded message, `None` if it is cut or
/// compressed (never so in what we encode: the question is the first name).
fn question_name_len(message: &[u8]) -> Option<usize> {
    let mut at = HEADER_LEN;
    loop {
        let len = usize::from(*message.get(at)?);
        if len & 0xC0 != 0 {
            return None;
        }
        at += 1 + len;
        if len == 0 {
            return (at <= message.len() && at - HEADER_LEN <= 255).then_some(at - HEADER_LEN);
        }
    }
}

type Shard = HashMap<Arc<[u8]>, Arc<Entry>>;

/// A change to the table: `Some` inserts or replaces the name, `None` removes it.
pub enum Change {
    Put(Arc<Entry>),
    Remove(Arc<[u8]>),
}

impl Change {
    fn key(&self) -> &[u8] {
        match self {
            Change::Put(entry) => &entry.key,
            Change::Remove(key) => key,
        }
    }
}

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

    /// Applies a batch of puts and removals. Each touched shard is copied once per batch.
    pub fn apply(&self, changes: Vec<Change>) {
        let mut by_shard: HashMap<usize, Vec<Change>> = HashMap::new();
        for change in changes {
            by_shard.entry(shard_of(change.key())).or_default().push(change);
        }
        for (index, changes) in by_shard {
            let mut map: Shard = (**self.shards[index].load()).clone();
            for change in changes {
                match change {
                    Change::Put(entry) => {
                        // Removed first: `insert` would keep the old key beside the new
                        // entry's copy of it.
                        map.remove(&*entry.key);
                        map.insert(entry.key.clone(), entry);
                    }
                    Change::Remove(key) => {
                        map.remove(&*key);
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use hickory_proto::rr::rdata::{A, SRV};
    use hickory_proto::rr::{Name, RData};

    use super::*;
    use crate::records::soa;

    fn name_data(name: &Name, sets: Vec<Vec<Record>>) -> NameData {
        let rrsets: BTreeMap<u16, Vec<Record>> =
            sets.into_iter().map(|set| (u16::from(set[0].record_type()), set)).collect();
        NameData { name: name.clone(), zone: Some(Zone::ClusterSet), rrsets }
    }

    fn a_records(name: &Name, n: u32) -> Vec<Record> {
        (0..n)
            .map(|i| {
                Record::from_rdata(name.clone(), 5, RData::A(A(Ipv4Addr::from(0x0a00_0000 + i))))
            })
            .collect()
    }

    #[test]
    fn records_decode_from_the_encoded_answers() {
        let name = Name::from_ascii("web.ns.svc.clusterset.local.").expect("name");
        let a = a_records(&name, 2);
        let target = Name::from_ascii("host.ns.svc.clusterset.local.").expect("name");
        let srv =
            vec![Record::from_rdata(name.clone(), 5, RData::SRV(SRV::new(0, 100, 80, target)))];
        let data = name_data(&name, vec![a.clone(), srv.clone()]);
        let entry = Entry::build(
            Zone::ClusterSet,
            &data,
            &soa(Zone::ClusterSet, 5, 1),
            &mut SharedNodata::default(),
        );
        let decoded = entry.records(RecordType::A).expect("decodes");
        assert_eq!(decoded, a);
        assert!(
            decoded
                .iter()
                .zip(&a)
                .all(|(d, a)| d.ttl == a.ttl && d.name.to_ascii() == a.name.to_ascii())
        );
        assert_eq!(entry.records(RecordType::SRV).expect("decodes"), srv);
        let any: Vec<Record> = a.iter().chain(&srv).cloned().collect();
        assert_eq!(entry.records(RecordType::ANY).expect("decodes"), any);
        assert!(entry.records(RecordType::AAAA).expect("decodes").is_empty());
        assert!(entry.template(u16::from(RecordType::A)).is_some());
        assert_eq!(entry.template(u16::from(RecordType::AAAA)), entry.nodata.as_deref());
        assert_eq!(entry.template(u16::from(RecordType::ANY)), None);
        assert_eq!(entry.key(), wire_key(&name).as_slice());
    }

    /// 5 000 A records take more than a DNS message's 64 KiB: no template (a truncated one
    /// would decode to part of the set), the records stay whole for the slow path.
    #[test]
    fn a_set_too_large_to_encode_is_kept_as_records() {
        let name = Name::from_ascii("big.ns.svc.clusterset.local.").expect("name");
        let a = a_records(&name, 5000);
        let entry = Entry::build(
            Zone::ClusterSet,
            &name_data(&name, vec![a.clone()]),
            &soa(Zone::ClusterSet, 5, 1),
            &mut SharedNodata::default(),
        );
        assert_eq!(entry.template(u16::from(RecordType::A)), None);
        assert_eq!(entry.records(RecordType::A).expect("records"), a);
        assert!(entry.template(u16::from(RecordType::AAAA)).is_some(), "NODATA for other types");
    }

    #[test]
    fn replacing_an_entry_keeps_one_copy_of_its_key() {
        let name = Name::from_ascii("web.ns.svc.clusterset.local.").expect("name");
        let soa = soa(Zone::ClusterSet, 5, 1);
        let table = Table::default();
        let first = Arc::new(Entry::build(
            Zone::ClusterSet,
            &name_data(&name, vec![a_records(&name, 1)]),
            &soa,
            &mut SharedNodata::default(),
        ));
        let second = Arc::new(Entry::build(
            Zone::ClusterSet,
            &name_data(&name, vec![a_records(&name, 2)]),
            &soa,
            &mut SharedNodata::default(),
        ));
        table.apply(vec![Change::Put(first.clone())]);
        table.apply(vec![Change::Put(second.clone())]);
        let key = wire_key(&name);
        assert!(Arc::ptr_eq(&table.get(&key).expect("present"), &second));
        table.with(&key, |_| {
            let shard = table.shards[shard_of(&key)].load();
            let (stored, _) = shard.get_key_value(key.as_slice()).expect("present");
            assert!(Arc::ptr_eq(stored, &second.key), "the map's key is the entry's");
        });
        table.apply(vec![second.removal()]);
        assert!(table.get(&key).is_none());
        assert!(table.is_empty());
    }

    /// Names of one length in one zone share their NODATA template, and the response the
    /// fast path builds from the shared one is the one it built from the name's own.
    #[test]
    fn nodata_is_shared_between_names_of_one_length() {
        use crate::wire::{assemble, parse_query};
        let soa = soa(Zone::ClusterSet, 5, 1);
        let mut shared = SharedNodata::default();
        let build = |name: &str, shared: &mut SharedNodata| {
            let name = Name::from_ascii(name).expect("name");
            Entry::build(
                Zone::ClusterSet,
                &name_data(&name, vec![a_records(&name, 1)]),
                &soa,
                shared,
            )
        };
        let a1 = build("a1.ns.svc.clusterset.local.", &mut shared);
        let a2 = build("a2.ns.svc.clusterset.local.", &mut shared);
        let longer = build("a10.ns.svc.clusterset.local.", &mut shared);
        let (Some(n1), Some(n2), Some(n10)) = (&a1.nodata, &a2.nodata, &longer.nodata) else {
            panic!("every name has a NODATA template");
        };
        assert!(Arc::ptr_eq(n1, n2));
        assert!(!Arc::ptr_eq(n1, n10));
        assert_eq!(shared.len(), 2);

        let own = build("a2.ns.svc.clusterset.local.", &mut SharedNodata::default());
        let mut query = hickory_proto::op::Message::query();
        query.metadata.id = 7;
        query.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("A2.ns.svc.clusterset.local.").expect("name"),
            RecordType::AAAA,
        ));
        let pkt = query.to_vec().expect("query");
        let q = parse_query(&pkt, &mut Vec::new()).expect("fast path query");
        let (mut from_shared, mut from_own) = (Vec::new(), Vec::new());
        assert!(assemble(a2.template(28).expect("nodata"), &pkt, &q, &mut from_shared));
        assert!(assemble(own.template(28).expect("nodata"), &pkt, &q, &mut from_own));
        assert_eq!(from_shared, from_own);
    }
}
