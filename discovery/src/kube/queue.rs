//! The writer's schedule of API requests, as pure data: which queued write may be sent next.
//!
//! A pass of the writer ([`super::writer`]) diffs the desired objects against what it has
//! written and [`push`](WriteQueue::push)es the resulting actions; the I/O loop
//! [`pop`](WriteQueue::pop)s them while fewer than the limit are in flight and reports each
//! answer with [`finish`](WriteQueue::finish). The rules:
//!
//! - at most `limit` requests in flight, and never two for the same object (a second write of
//!   an object waits until the first is answered);
//! - the latest desired state wins: pushing an action for an object that still has one queued
//!   replaces it, so a superseded write is never sent;
//! - writes go first by kind (ServiceExport conditions, derived Services, ServiceImports,
//!   EndpointSlices: a ServiceImport needs its derived Service's ClusterIP), then in the order
//!   of the passes that asked for them, so a burst cannot starve an earlier pass's objects;
//! - a deletion waits until every write of its own and earlier passes is answered (the same
//!   order as one pass done sequentially: a renamed slice is created before the old one goes,
//!   a ServiceImport drops its `ips` before the derived Service is deleted). A write that
//!   replaces a queued write keeps the earlier pass's place, so deletions of that pass still
//!   wait for it.

use std::collections::{BTreeMap, BTreeSet};

use super::writer::{Action, ObjRef, WriteKind};

/// Requests the writer keeps in flight at most. Enough to hide the round trip of one request
/// (a few ms on a local API server, more across a network) without crowding an API server's
/// `--max-requests-inflight` (default 400 non-mutating + 200 mutating): 16 of a gateway's
/// writes leave room for every other client.
pub const MAX_WRITES_IN_FLIGHT: usize = 16;

/// One queued action and the pass it belongs to.
#[derive(Debug)]
struct Queued {
    action: Action,
    pass: u64,
}

/// A request that has been sent and not answered yet.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// Writes (not deletions) hold back the deletions of their pass and later ones.
    write: bool,
    pass: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct WriteQueue {
    limit: usize,
    pass: u64,
    queued: BTreeMap<ObjRef, Queued>,
    /// Queued writes in send order.
    writes: BTreeSet<(WriteKind, u64, ObjRef)>,
    /// Queued deletions in send order.
    deletions: BTreeSet<(u64, ObjRef)>,
    in_flight: BTreeMap<ObjRef, InFlight>,
    /// Writes queued or in flight, per pass.
    open_writes: BTreeMap<u64, usize>,
    superseded: u64,
}

fn is_write(a: &Action) -> bool {
    !matches!(a, Action::Delete(_))
}

impl WriteQueue {
    /// A queue that keeps at most `limit` (at least 1) requests in flight.
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            pass: 0,
            queued: BTreeMap::new(),
            writes: BTreeSet::new(),
            deletions: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            open_writes: BTreeMap::new(),
            superseded: 0,
        }
    }

    /// Starts a new pass: what is pushed from now on belongs to it.
    pub fn begin_pass(&mut self) {
        self.pass += 1;
    }

    /// Queues `action`, replacing an action still queued for the same object.
    pub fn push(&mut self, action: Action) {
        let r = action.target().clone();
        let mut pass = self.pass;
        if let Some(old) = self.unqueue(&r) {
            self.superseded += 1;
            // A write replacing a write keeps the earlier place (and holds that pass's
            // deletions back); a change of kind of action starts in this pass.
            if is_write(&old.action) == is_write(&action) {
                pass = old.pass;
            }
        }
        if is_write(&action) {
            self.writes.insert((r.kind, pass, r.clone()));
            *self.open_writes.entry(pass).or_default() += 1;
        } else {
            self.deletions.insert((pass, r.clone()));
        }
        self.queued.insert(r, Queued { action, pass });
    }

    /// Removes the queued action for `r` (not one in flight).
    fn unqueue(&mut self, r: &ObjRef) -> Option<Queued> {
        let old = self.queued.remove(r)?;
        if is_write(&old.action) {
            self.writes.remove(&(r.kind, old.pass, r.clone()));
            self.close_write(old.pass);
        } else {
            self.deletions.remove(&(old.pass, r.clone()));
        }
        Some(old)
    }

    fn close_write(&mut self, pass: u64) {
        if let Some(n) = self.open_writes.get_mut(&pass) {
            *n -= 1;
            if *n == 0 {
                self.open_writes.remove(&pass);
            }
        }
    }

    /// The next action to send, if one may be sent now; it counts as in flight until
    /// [`finish`](Self::finish).
    pub fn pop(&mut self) -> Option<Action> {
        if self.in_flight.len() >= self.limit {
            return None;
        }
        // At most `limit` entries are skipped (those whose object is in flight).
        let next_write =
            self.writes.iter().find(|(_, _, r)| !self.in_flight.contains_key(r)).cloned();
        if let Some((kind, pass, r)) = next_write {
            self.writes.remove(&(kind, pass, r.clone()));
            let q = self.queued.remove(&r)?;
            // still an open write of its pass until it is answered
            self.in_flight.insert(r, InFlight { write: true, pass });
            return Some(q.action);
        }
        let oldest_open_write = self.open_writes.keys().next().copied();
        let next_deletion = self
            .deletions
            .iter()
            .take_while(|(pass, _)| oldest_open_write.is_none_or(|w| w > *pass))
            .find(|(_, r)| !self.in_flight.contains_key(r))
            .cloned();
        let (pass, r) = next_deletion?;
        self.deletions.remove(&(pass, r.clone()));
        let q = self.queued.remove(&r)?;
        self.in_flight.insert(r, InFlight { write: false, pass });
        Some(q.action)
    }

    /// The request for `r` was answered (whatever the answer).
    pub fn finish(&mut self, r: &ObjRef) {
        if let Some(f) = self.in_flight.remove(r)
            && f.write
        {
            self.close_write(f.pass);
        }
    }

    /// Whether an action for `r` waits to be sent (a newer one than any in flight).
    pub fn is_queued(&self, r: &ObjRef) -> bool {
        self.queued.contains_key(r)
    }

    /// Requests sent and not answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Actions waiting to be sent.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Nothing queued and nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.queued.is_empty() && self.in_flight.is_empty()
    }

    /// Queued actions replaced by a newer one before they were sent, since the start.
    pub fn superseded(&self) -> u64 {
        self.superseded
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::kube::writer::DesiredObject;

    fn r(kind: WriteKind, name: &str) -> ObjRef {
        ObjRef { kind, namespace: "shop".into(), name: name.into() }
    }

    fn apply(kind: WriteKind, name: &str, v: i32) -> Action {
        let d = DesiredObject { body: json!({ "v": v }), status: None };
        Action::Apply(r(kind, name), std::sync::Arc::new(d))
    }

    fn delete(kind: WriteKind, name: &str) -> Action {
        Action::Delete(r(kind, name))
    }

    /// `kind name[=v]` of an action, for readable assertions.
    fn show(a: &Action) -> String {
        match a {
            Action::Apply(r, d) => format!("apply {}={}", r.name, d.body["v"]),
            Action::Delete(r) => format!("delete {}", r.name),
            Action::Conditions(r, c) => format!("conditions {}/{}", r.name, c.len()),
        }
    }

    /// Pops until nothing may be sent; returns what was sent, in order.
    fn drain(q: &mut WriteQueue) -> Vec<String> {
        std::iter::from_fn(|| q.pop()).map(|a| show(&a)).collect()
    }

    fn finish_all(q: &mut WriteQueue, names: &[(WriteKind, &str)]) {
        for (k, n) in names {
            q.finish(&r(*k, n));
        }
    }

    use WriteKind::{EndpointSlice as Slice, Service, ServiceExport, ServiceImport as Import};

    #[test]
    fn writes_go_by_kind_then_pass_and_at_most_limit_at_once() {
        let mut q = WriteQueue::new(3);
        q.begin_pass();
        q.push(apply(Slice, "s1", 1));
        q.push(apply(Import, "i1", 1));
        q.push(Action::Conditions(r(ServiceExport, "e1"), vec![]));
        q.push(apply(Service, "d1", 1));
        q.begin_pass();
        q.push(apply(Import, "i2", 1));
        assert_eq!(drain(&mut q), ["conditions e1/0", "apply d1=1", "apply i1=1"]);
        assert_eq!((q.in_flight(), q.queued()), (3, 2));
        q.finish(&r(Service, "d1"));
        // ServiceImports of the earlier pass before those of the later one, kinds first
        assert_eq!(drain(&mut q), ["apply i2=1"]);
        finish_all(&mut q, &[(ServiceExport, "e1"), (Import, "i1")]);
        assert_eq!(drain(&mut q), ["apply s1=1"]);
        finish_all(&mut q, &[(Import, "i2"), (Slice, "s1")]);
        assert!(q.is_idle());
    }

    #[test]
    fn the_latest_state_wins_and_an_object_is_never_written_twice_at_once() {
        let mut q = WriteQueue::new(8);
        q.begin_pass();
        q.push(apply(Slice, "s1", 1));
        assert_eq!(drain(&mut q), ["apply s1=1"]);
        // while s1=1 is in flight, two newer states arrive: only the last is sent, and only
        // once the first is answered
        q.begin_pass();
        q.push(apply(Slice, "s1", 2));
        q.push(apply(Slice, "s2", 1));
        q.begin_pass();
        q.push(apply(Slice, "s1", 3));
        assert!(q.is_queued(&r(Slice, "s1")));
        assert_eq!(drain(&mut q), ["apply s2=1"]);
        q.finish(&r(Slice, "s1"));
        assert_eq!(drain(&mut q), ["apply s1=3"]);
        assert_eq!(q.superseded(), 1);
        // a deletion replaces a queued write of the same object (and the reverse)
        q.begin_pass();
        q.push(apply(Slice, "s3", 1));
        q.push(delete(Slice, "s3"));
        q.push(delete(Slice, "s4"));
        q.push(apply(Slice, "s4", 1));
        finish_all(&mut q, &[(Slice, "s1"), (Slice, "s2")]);
        // (the deletion is of this pass: it waits for this pass's write)
        assert_eq!(drain(&mut q), ["apply s4=1"]);
        q.finish(&r(Slice, "s4"));
        assert_eq!(drain(&mut q), ["delete s3"]);
        assert_eq!(q.superseded(), 3);
    }

    #[test]
    fn deletions_wait_for_the_writes_of_their_own_and_earlier_passes_only() {
        let mut q = WriteQueue::new(8);
        q.begin_pass(); // 1: a renamed slice: the new one is written before the old one goes
        q.push(apply(Slice, "new", 1));
        q.push(delete(Slice, "old"));
        assert_eq!(drain(&mut q), ["apply new=1"]);
        q.begin_pass(); // 2: a later write does not hold pass 1's deletion back...
        q.push(apply(Import, "later", 1));
        assert_eq!(drain(&mut q), ["apply later=1"]);
        q.finish(&r(Slice, "new"));
        assert_eq!(drain(&mut q), ["delete old"]);
        // ...but a deletion of pass 2 waits for it
        q.push(delete(Slice, "gone"));
        assert_eq!(drain(&mut q), Vec::<String>::new());
        q.finish(&r(Import, "later"));
        assert_eq!(drain(&mut q), ["delete gone"]);
        finish_all(&mut q, &[(Slice, "old"), (Slice, "gone")]);
        assert!(q.is_idle());
    }

    #[test]
    fn a_superseding_write_keeps_its_pass_so_that_pass_deletions_still_wait() {
        let mut q = WriteQueue::new(1);
        q.begin_pass(); // 1
        q.push(apply(Import, "i", 1));
        q.push(apply(Slice, "new", 1));
        q.push(delete(Slice, "old"));
        assert_eq!(drain(&mut q), ["apply i=1"]);
        q.begin_pass(); // 2: "new" changes again before it was sent
        q.push(apply(Slice, "new", 2));
        q.finish(&r(Import, "i"));
        // "old" still waits for "new" (pass 1's place)
        assert_eq!(drain(&mut q), ["apply new=2"]);
        q.finish(&r(Slice, "new"));
        assert_eq!(drain(&mut q), ["delete old"]);
    }

    #[test]
    fn a_deletion_in_flight_holds_a_new_write_of_the_same_object() {
        let mut q = WriteQueue::new(4);
        q.begin_pass();
        q.push(delete(Import, "x"));
        assert_eq!(drain(&mut q), ["delete x"]);
        q.begin_pass();
        q.push(apply(Import, "x", 1));
        assert_eq!(drain(&mut q), Vec::<String>::new());
        q.finish(&r(Import, "x"));
        assert_eq!(drain(&mut q), ["apply x=1"]);
        // finishing something never sent is harmless
        q.finish(&r(Import, "never"));
        q.finish(&r(Import, "x"));
        assert!(q.is_idle());
    }
}
