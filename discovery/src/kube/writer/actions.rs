//! What the writer owns and the pure diff that turns desired objects into writes.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::kube::crd;

/// The kinds the writer writes, in the order their writes are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WriteKind {
    /// The `status.conditions` of a local ServiceExport (not owned: only its status is
    /// written, never listed or deleted). First: what a user waits for after exporting.
    ServiceExport,
    /// Derived Services before ServiceImports: ServiceImports need their ClusterIPs.
    Service,
    ServiceImport,
    EndpointSlice,
}

impl WriteKind {
    /// The Kubernetes kind (a bounded metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::ServiceExport => "ServiceExport",
            WriteKind::Service => "Service",
            WriteKind::ServiceImport => "ServiceImport",
            WriteKind::EndpointSlice => "EndpointSlice",
        }
    }
}

/// One object the writer owns.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjRef {
    pub kind: WriteKind,
    pub namespace: String,
    pub name: String,
}

/// What one owned object should look like: the applied body, and for kinds with a status
/// subresource the applied status. Shared (`Arc`) between the writer's passes: an unchanged
/// import keeps its objects, and comparing an object with itself is a pointer comparison
/// (`Arc`'s `PartialEq` for `Eq` types).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredObject {
    pub body: Value,
    pub status: Option<Value>,
}

/// One step of bringing the cluster in line.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Apply(ObjRef, Arc<DesiredObject>),
    Delete(ObjRef),
    /// Apply these conditions to the status of the ServiceExport `ObjRef`
    /// ([`WriteKind::ServiceExport`]).
    Conditions(ObjRef, Vec<crd::Condition>),
}

impl Action {
    /// The object the action writes.
    pub fn target(&self) -> &ObjRef {
        match self {
            Action::Apply(r, _) | Action::Delete(r) | Action::Conditions(r, _) => r,
        }
    }
}

/// The pure diff: apply what is new or different from what was last applied (`None`: exists
/// in the cluster, content unknown, e.g. after a restart), delete what is owned and no longer
/// wanted (only when `deletions` is true: right after a restart, peers' exports have not
/// arrived yet and their objects must not go). Derived Services come first (ServiceImports
/// need their ClusterIPs), deletions last.
pub fn plan(
    desired: &BTreeMap<ObjRef, Arc<DesiredObject>>,
    applied: &BTreeMap<ObjRef, Option<Arc<DesiredObject>>>,
    deletions: bool,
) -> Vec<Action> {
    let mut out: Vec<Action> = desired
        .iter()
        .filter(|(r, d)| applied.get(*r).is_none_or(|a| a.as_ref() != Some(*d)))
        .map(|(r, d)| Action::Apply(r.clone(), d.clone()))
        .collect();
    out.sort_by_key(|a| a.target().kind);
    if deletions {
        out.extend(
            applied.keys().filter(|r| !desired.contains_key(*r)).cloned().map(Action::Delete),
        );
    }
    out
}
