//! The kube cluster source: watches Services, EndpointSlices and ServiceExports of a Kubernetes
//! API server and publishes the same [`ClusterState`] the file source does.
//!
//! Each kind has its own `kube::runtime::watcher` (list, then watch, relist with backoff after
//! errors). Objects are converted at the edge by [`crate::objects`], as the file source's are
//! (API objects into its wire shapes, then `TryFrom` into the model): a bad object becomes a
//! [`KubeProblem`] and is skipped, never the batch. The [`Store`] is the pure part: it holds
//! converted objects and rebuilds only the services an event touched, so unchanged services
//! keep their `Arc` (consumers diff by `Arc::ptr_eq`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::model::{ClusterState, LocalService, ServiceExportObject, ServiceKey};
use crate::objects::endpoint_slice::merge_endpoints;
use crate::objects::{self, ExportSpec, SliceEndpoints};

use super::{LABEL_MANAGED_BY, MANAGED_BY_FEDGATE};
use crate::model::MANAGED_BY;

/// Label key the EndpointSlice controller (and fedgate) put on slices to say who manages them.
pub const LABEL_SLICE_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// How long the source keeps taking watch events after the first of a batch before it
/// publishes: one state per 50 ms at most during a burst, 50 ms added to a lone change (the
/// file source debounces 100 ms).
const PUBLISH_COALESCE: std::time::Duration = std::time::Duration::from_millis(50);
/// First retry of a failed watch.
const WATCH_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(500);
/// Longest wait between retries of a failed watch.
const WATCH_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// The retry schedule of the watches: 0.5 s doubling to 5 s, with jitter, reset by the
/// first event that arrives. kube-rs's default (client-go's: 0.8 s doubling to 30 s, jittered
/// up to twice that, reset only after 120 s without errors) left new ServiceExports unseen
/// for 40 to over 70 s after a 30 s apiserver outage (issue 17's fault suite, fault_kube).
/// Three watches retrying every 5 s are no burden on an apiserver that is back.
pub(super) fn watch_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(WATCH_RETRY_MIN)
        .with_max_delay(WATCH_RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// One object the source could not use, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct KubeProblem {
    /// `Kind namespace/name`.
    pub object: String,
    pub reason: String,
}

/// Which kind a watch event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    ServiceExport,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::ServiceExport => "ServiceExport",
        }
    }
}

/// An object id inside one kind: (namespace, name).
type ObjId = (String, String);

fn obj_id(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjId {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

/// What the source knows: converted objects of every kind, and the state they add up to.
#[derive(Debug, Default)]
pub struct Store {
    /// By (namespace, name), which is also the service key.
    services: BTreeMap<ObjId, LocalService>,
    /// Slices by the service they name, then by slice name (the merge order).
    slices: BTreeMap<ServiceKey, BTreeMap<String, SliceEndpoints>>,
    /// The service each slice currently names.
    slice_owner: BTreeMap<ObjId, ServiceKey>,
    exports: BTreeMap<ObjId, ServiceExportObject>,
    problems: BTreeMap<(Kind, ObjId), String>,
    /// Objects listed since the last `Init` of each kind (the relist replaces the kind).
    relist: BTreeMap<Kind, BTreeSet<ObjId>>,
    state: Arc<ClusterState>,
}

/// Converts one object; a failure is a problem for that object only.
enum Converted {
    Service(LocalService),
    Slice(SliceEndpoints),
    Export(ServiceExportObject),
}

impl Store {
    pub fn state(&self) -> &Arc<ClusterState> {
        &self.state
    }

    pub fn problems(&self) -> Vec<KubeProblem> {
        self.problems
            .iter()
            .map(|((kind, (ns, name)), reason)| KubeProblem {
                object: format!("{} {ns}/{name}", kind.as_str()),
                reason: reason.clone(),
            })
            .collect()
    }

    /// The service an object of `kind` currently contributes to.
    fn key_of(&self, kind: Kind, id: &ObjId) -> Option<ServiceKey> {
        match kind {
            Kind::Service => self.services.get(id).map(|s| s.key.clone()),
            Kind::EndpointSlice => self.slice_owner.get(id).cloned(),
            Kind::ServiceExport => self.exports.get(id).map(|e| e.key.clone()),
        }
    }

    fn insert(
        &mut self,
        kind: Kind,
        id: ObjId,
        value: Result<Converted, String>,
    ) -> Vec<ServiceKey> {
        let mut affected: Vec<ServiceKey> = self.key_of(kind, &id).into_iter().collect();
        self.remove_only(kind, &id);
        match value {
            Ok(Converted::Service(s)) => {
                affected.push(s.key.clone());
                self.services.insert(id, s);
            }
            Ok(Converted::Slice(s)) => {
                affected.push(s.service.clone());
                self.slice_owner.insert(id.clone(), s.service.clone());
                self.slices.entry(s.service.clone()).or_default().insert(id.1, s);
            }
            Ok(Converted::Export(e)) => {
                affected.push(e.key.clone());
                self.exports.insert(id, e);
            }
            Err(reason) => {
                tracing::warn!(kind = kind.as_str(), namespace = %id.0, name = %id.1, %reason, "object skipped");
                self.problems.insert((kind, id), reason);
            }
        }
        affected
    }

    fn remove_only(&mut self, kind: Kind, id: &ObjId) {
        self.problems.remove(&(kind, id.clone()));
        match kind {
            Kind::Service => {
                self.services.remove(id);
            }
            Kind::EndpointSlice => {
                if let Some(owner) = self.slice_owner.remove(id)
                    && let Some(by_name) = self.slices.get_mut(&owner)
                {
                    by_name.remove(&id.1);
                    if by_name.is_empty() {
                        self.slices.remove(&owner);
                    }
                }
            }
            Kind::ServiceExport => {
                self.exports.remove(id);
            }
        }
    }

    fn remove(&mut self, kind: Kind, id: &ObjId) -> Vec<ServiceKey> {
        let affected = self.key_of(kind, id).into_iter().collect();
        self.remove_only(kind, id);
        affected
    }

    fn ids(&self, kind: Kind) -> Vec<ObjId> {
        let mut ids: Vec<ObjId> = match kind {
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slice_owner.keys().cloned().collect(),
            Kind::ServiceExport => self.exports.keys().cloned().collect(),
        };
        ids.extend(self.problems.keys().filter(|(k, _)| *k == kind).map(|(_, id)| id.clone()));
        ids
    }

    pub fn apply_service(&mut self, svc: &Service) -> Vec<ServiceKey> {
        let value = LocalService::try_from(objects::kube::service(svc)).map(Converted::Service);
        self.apply(Kind::Service, &svc.metadata, value)
    }

    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Vec<ServiceKey> {
        let value =
            SliceEndpoints::try_from(objects::kube::endpoint_slice(slice)).map(Converted::Slice);
        self.apply(Kind::EndpointSlice, &slice.metadata, value)
    }

    /// Records one object of `kind` as seen (for a relist) and stores what it converted to.
    fn apply<E: std::fmt::Display>(
        &mut self,
        kind: Kind,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        value: Result<Converted, E>,
    ) -> Vec<ServiceKey> {
        let id = obj_id(meta);
        self.note_relist(kind, &id);
        self.insert(kind, id, value.map_err(|e| e.to_string()))
    }

    /// `now` stands in for a missing creationTimestamp (the API server always sets one).
    pub fn apply_export(&mut self, obj: &DynamicObject, now: jiff::Timestamp) -> Vec<ServiceKey> {
        let value = objects::kube::service_export(obj)
            .and_then(|w| ExportSpec::try_from(w).map_err(|e| e.to_string()))
            .map(|spec| Converted::Export(spec.into_object(now)));
        self.apply(Kind::ServiceExport, &obj.metadata, value)
    }

    pub fn delete(
        &mut self,
        kind: Kind,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Vec<ServiceKey> {
        self.remove(kind, &obj_id(meta))
    }

    /// A relist of `kind` starts: objects not listed again before [`Store::end_relist`] go.
    pub fn begin_relist(&mut self, kind: Kind) {
        self.relist.insert(kind, BTreeSet::new());
    }

    fn note_relist(&mut self, kind: Kind, id: &ObjId) {
        if let Some(seen) = self.relist.get_mut(&kind) {
            seen.insert(id.clone());
        }
    }

    pub fn end_relist(&mut self, kind: Kind) -> Vec<ServiceKey> {
        let Some(seen) = self.relist.remove(&kind) else { return Vec::new() };
        let mut affected = Vec::new();
        for id in self.ids(kind) {
            if !seen.contains(&id) {
                affected.extend(self.remove(kind, &id));
            }
        }
        affected
    }

    /// Rebuilds the services in `affected` (and only those); returns whether the state
    /// changed. Unchanged services keep their `Arc`.
    pub fn rebuild(&mut self, affected: &[ServiceKey]) -> bool {
        if affected.is_empty() {
            return false;
        }
        let affected: HashSet<&ServiceKey> = affected.iter().collect();
        let old = Arc::clone(&self.state);
        let mut state = (*old).clone();
        for key in affected {
            let id: ObjId = (key.namespace.clone(), key.name.clone());
            match self.services.get(&id) {
                Some(svc) => {
                    let mut svc = svc.clone();
                    if let Some(slices) = self.slices.get(key) {
                        svc.endpoints = merge_endpoints(slices.values());
                    }
                    match old.services.get(key) {
                        Some(prev) if **prev == svc => {}
                        _ => {
                            state.services.insert(key.clone(), Arc::new(svc));
                        }
                    }
                }
                None => {
                    state.services.remove(key);
                }
            }
            match self.exports.get(&id) {
                Some(e) => match old.exports.get(key) {
                    Some(prev) if **prev == *e => {}
                    _ => {
                        state.exports.insert(key.clone(), Arc::new(e.clone()));
                    }
                },
                None => {
                    state.exports.remove(key);
                }
            }
        }
        if state == *old {
            return false;
        }
        self.state = Arc::new(state);
        true
    }
}

/// The kube source. Build with [`KubeSource::new`], subscribe, then spawn [`KubeSource::run`].
pub struct KubeSource {
    client: Client,
    exports: ApiResource,
    store: Store,
    state: watch::Sender<Arc<ClusterState>>,
    problems: watch::Sender<Arc<Vec<KubeProblem>>>,
    synced: watch::Sender<bool>,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource").field("exports", &self.exports.api_version).finish()
    }
}

impl KubeSource {
    /// A source on `client` that reads ServiceExports as `exports` (see
    /// [`super::export_resource`]). Nothing is watched until [`run`](Self::run).
    pub fn new(client: Client, exports: ApiResource) -> Self {
        let store = Store::default();
        let (state, _) = watch::channel(Arc::clone(store.state()));
        let (problems, _) = watch::channel(Arc::new(Vec::new()));
        let (synced, _) = watch::channel(false);
        Self { client, exports, store, state, problems, synced }
    }

    /// The cluster state; a service that did not change keeps its `Arc`.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.subscribe()
    }

    /// Objects that were skipped, and why.
    pub fn problems(&self) -> watch::Receiver<Arc<Vec<KubeProblem>>> {
        self.problems.subscribe()
    }

    /// Becomes true once every kind has been listed completely (for `/readyz`).
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Watches until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::info_span!("kube_source", exports = %self.exports.api_version);
        self.serve(shutdown).instrument(span).await
    }

    async fn serve(self, shutdown: CancellationToken) {
        let KubeSource { client, exports, mut store, state, problems, synced } = self;
        // Objects fedgate writes itself (derived Services and their slices, imported slices)
        // are not local services.
        let not_ours_svc = format!("{LABEL_MANAGED_BY}!={MANAGED_BY_FEDGATE}");
        let not_ours_slice = format!("{LABEL_SLICE_MANAGED_BY}!={MANAGED_BY}");
        let services = watcher::watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(&not_ours_svc),
        )
        .backoff(watch_backoff())
        .map(|e| (Kind::Service, e.map(|e| map_event(e, |o| Obj::Service(Box::new(o))))));
        let slices = watcher::watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&not_ours_slice),
        )
        .backoff(watch_backoff())
        .map(|e| (Kind::EndpointSlice, e.map(|e| map_event(e, |o| Obj::Slice(Box::new(o))))));
        let exports_stream = watcher::watcher(
            Api::<DynamicObject>::all_with(client, &exports),
            watcher::Config::default(),
        )
        .backoff(watch_backoff())
        .map(|e| (Kind::ServiceExport, e.map(|e| map_event(e, |o| Obj::Export(Box::new(o))))));
        let mut events =
            futures::stream::select_all([services.boxed(), slices.boxed(), exports_stream.boxed()]);
        let mut listed: BTreeSet<Kind> = BTreeSet::new();
        let mut failing: BTreeSet<Kind> = BTreeSet::new();
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = events.next() => ev,
            };
            let Some(first) = first else { break };
            let mut affected = Vec::new();
            let mut next = Some(first);
            // Take every event that arrives within PUBLISH_COALESCE of the first before
            // publishing once: objects created one by one (kubectl apply of a big file)
            // would otherwise publish a new state per object, and every consumer's O(n)
            // work per state made a burst O(n²).
            let deadline = tokio::time::Instant::now() + PUBLISH_COALESCE;
            loop {
                while let Some((kind, ev)) = next.take() {
                    match ev {
                        Ok(ev) => {
                            if failing.remove(&kind) {
                                tracing::info!(kind = kind.as_str(), "watch recovered");
                            }
                            if handle(&mut store, kind, ev, &mut affected) {
                                listed.insert(kind);
                            }
                        }
                        Err(e) => {
                            if failing.insert(kind) {
                                tracing::warn!(kind = kind.as_str(), error = %e, "watch failed; retrying with backoff");
                            }
                        }
                    }
                    next = events.next().now_or_never().flatten();
                }
                next = tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => None,
                    _ = shutdown.cancelled() => None,
                    ev = events.next() => ev,
                };
                if next.is_none() {
                    break;
                }
            }
            let changed = store.rebuild(&affected);
            // Nothing is published before every kind has been listed once: a Service seen
            // before its EndpointSlices would be exported (and written back) without
            // endpoints for a moment after every restart.
            if listed.len() == 3 && (changed || !*synced.borrow()) {
                state.send_replace(Arc::clone(store.state()));
            }
            let now = store.problems();
            if **problems.borrow() != now {
                metrics::gauge!(super::metrics::METRIC_SOURCE_PROBLEMS).set(now.len() as f64);
                problems.send_replace(Arc::new(now));
            }
            if listed.len() == 3 && !*synced.borrow() {
                tracing::info!(
                    services = store.state().services.len(),
                    exports = store.state().exports.len(),
                    "kube source synced"
                );
                synced.send_replace(true);
            }
        }
        tracing::debug!("kube source stopped");
    }
}

fn map_event<K>(ev: Event<K>, f: impl Fn(K) -> Obj) -> Event<Obj> {
    match ev {
        Event::Apply(k) => Event::Apply(f(k)),
        Event::Delete(k) => Event::Delete(f(k)),
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(f(k)),
        Event::InitDone => Event::InitDone,
    }
}

enum Obj {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Export(Box<DynamicObject>),
}

/// Applies one watch event; true when it completed a list of its kind.
fn handle(store: &mut Store, kind: Kind, ev: Event<Obj>, affected: &mut Vec<ServiceKey>) -> bool {
    let now = jiff::Timestamp::now();
    let apply = |store: &mut Store, obj: Obj| match obj {
        Obj::Service(s) => store.apply_service(&s),
        Obj::Slice(s) => store.apply_slice(&s),
        Obj::Export(e) => store.apply_export(&e, now),
    };
    match ev {
        Event::Init => {
            store.begin_relist(kind);
            false
        }
        Event::InitApply(obj) | Event::Apply(obj) => {
            affected.extend(apply(store, obj));
            false
        }
        Event::Delete(obj) => {
            let meta = match &obj {
                Obj::Service(s) => s.meta(),
                Obj::Slice(s) => s.meta(),
                Obj::Export(e) => e.meta(),
            };
            affected.extend(store.delete(kind, meta));
            false
        }
        Event::InitDone => {
            affected.extend(store.end_relist(kind));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
        }))
        .expect("service")
    }

    fn slice(ns: &str, name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": ips.iter().map(|ip| serde_json::json!({"addresses": [ip]})).collect::<Vec<_>>()
        }))
        .expect("slice")
    }

    fn export(ns: &str, name: &str) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceExport",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": "2026-01-01T00:00:00Z"}
        }))
        .expect("export")
    }

    fn key(ns: &str, name: &str) -> ServiceKey {
        ServiceKey::new(ns, name)
    }

    fn endpoints(store: &Store, k: &ServiceKey) -> Vec<String> {
        store.state().services[k].endpoints.iter().map(|e| e.address.to_string()).collect()
    }

    #[test]
    fn events_build_the_state_and_keep_untouched_arcs() {
        let mut st = Store::default();
        let now = jiff::Timestamp::UNIX_EPOCH;
        let mut a = st.apply_service(&svc("shop", "web", "10.96.0.1"));
        a.extend(st.apply_service(&svc("shop", "db", "10.96.0.2")));
        a.extend(st.apply_slice(&slice("shop", "web-b", "web", &["10.0.0.2", "10.0.0.3"])));
        a.extend(st.apply_slice(&slice("shop", "web-a", "web", &["10.0.0.1", "10.0.0.2"])));
        a.extend(st.apply_export(&export("shop", "web"), now));
        assert!(st.rebuild(&a));
        // slices in name order, duplicates once
        assert_eq!(endpoints(&st, &key("shop", "web")), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        assert!(st.state().exports.contains_key(&key("shop", "web")));
        let db = Arc::clone(&st.state().services[&key("shop", "db")]);

        // a slice changes: only web is rebuilt
        let a = st.apply_slice(&slice("shop", "web-b", "web", &["10.0.0.9"]));
        assert!(st.rebuild(&a));
        assert_eq!(endpoints(&st, &key("shop", "web")), ["10.0.0.1", "10.0.0.2", "10.0.0.9"]);
        assert!(Arc::ptr_eq(&db, &st.state().services[&key("shop", "db")]));

        // the same object again changes nothing
        let a = st.apply_slice(&slice("shop", "web-b", "web", &["10.0.0.9"]));
        assert!(!st.rebuild(&a));

        // deletions
        let a = st.delete(Kind::ServiceExport, &export("shop", "web").metadata);
        assert!(st.rebuild(&a));
        assert!(st.state().exports.is_empty());
        let a = st.delete(Kind::Service, &svc("shop", "web", "10.96.0.1").metadata);
        assert!(st.rebuild(&a));
        assert!(!st.state().services.contains_key(&key("shop", "web")));
    }

    #[test]
    fn a_slice_moving_to_another_service_updates_both() {
        let mut st = Store::default();
        let mut a = st.apply_service(&svc("shop", "web", "10.96.0.1"));
        a.extend(st.apply_service(&svc("shop", "api", "10.96.0.3")));
        a.extend(st.apply_slice(&slice("shop", "s1", "web", &["10.0.0.1"])));
        st.rebuild(&a);
        let a = st.apply_slice(&slice("shop", "s1", "api", &["10.0.0.1"]));
        assert!(st.rebuild(&a));
        assert!(endpoints(&st, &key("shop", "web")).is_empty());
        assert_eq!(endpoints(&st, &key("shop", "api")), ["10.0.0.1"]);
    }

    #[test]
    fn a_bad_object_is_a_problem_and_the_rest_stays() {
        let mut st = Store::default();
        let mut a = st.apply_service(&svc("shop", "web", "10.96.0.1"));
        let bad: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {"ports": [{"port": 80, "protocol": "HTTP"}]}
        }))
        .expect("service");
        a.extend(st.apply_service(&bad));
        st.rebuild(&a);
        assert_eq!(st.state().services.len(), 1);
        let problems = st.problems();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].object, "Service shop/bad");
        assert!(problems[0].reason.contains("spec.ports[0].protocol"), "{problems:?}");

        // fixed: the problem goes, the service comes
        let a = st.apply_service(&svc("shop", "bad", "10.96.0.9"));
        st.rebuild(&a);
        assert!(st.problems().is_empty());
        assert_eq!(st.state().services.len(), 2);

        // a valid object that turns bad leaves the state (the API server is the truth)
        let a = st.apply_service(&bad);
        st.rebuild(&a);
        assert_eq!(st.state().services.len(), 1);
    }

    #[test]
    fn a_relist_drops_what_is_gone() {
        let mut st = Store::default();
        let mut a = st.apply_service(&svc("shop", "web", "10.96.0.1"));
        a.extend(st.apply_service(&svc("shop", "old", "10.96.0.2")));
        st.rebuild(&a);
        st.begin_relist(Kind::Service);
        let mut a = st.apply_service(&svc("shop", "web", "10.96.0.1"));
        a.extend(st.end_relist(Kind::Service));
        assert!(st.rebuild(&a));
        let keys: Vec<_> = st.state().services.keys().cloned().collect();
        assert_eq!(keys, [key("shop", "web")]);
    }
}
