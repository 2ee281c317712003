//! The kube writer: what the import set decided, written back into the local cluster.
//!
//! - ServiceExport `status.conditions` (`Valid`, `Ready`, `Conflict`) from the status map;
//!   `lastTransitionTime` moves only when a condition's status changes.
//! - One ServiceImport per import (type, ports, ips, session affinity, families, policies,
//!   exported labels/annotations, `status.clusters`).
//! - Per import and source cluster, EndpointSlices labelled
//!   `multicluster.kubernetes.io/service-name`, `multicluster.kubernetes.io/source-cluster` and
//!   `endpointslice.kubernetes.io/managed-by: gateway.fedgate.io` (one address family and port
//!   set per slice, at most [`MAX_ENDPOINTS_PER_SLICE`] endpoints).
//! - In `front.mode: kube`, a derived selector-less Service per ClusterSetIP import whose
//!   EndpointSlice points at the gateway pod on a port the gateway serves that import on;
//!   the ServiceImport's `ips` are that Service's ClusterIPs.
//!
//! Everything is written with server-side apply under one field manager ([`FIELD_MANAGER`]),
//! with names that depend only on the import, so a restarted gateway re-applies the same
//! objects in place (same uid) and deletes only what is no longer wanted. The decisions are
//! pure ([`desired`], [`plan`], [`merge_conditions`], [`FrontPorts`], the schedule in
//! [`super::queue`], [`Settle`]); [`KubeWriter`] carries them out, up to
//! [`MAX_WRITES_IN_FLIGHT`] requests at once.

mod actions;
mod bodies;
mod conditions;
mod election;
mod front;
mod slices;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::imports::StatusMap;
use crate::model::{ClusterId, ClusterState, ImportSnapshot, ImportedService, ServiceKey};

use super::crd;
use super::leader::LeaderState;
use super::observed::FrontRoutes;
use super::queue::{MAX_WRITES_IN_FLIGHT, WriteQueue};
use super::{KubeError, LABEL_MANAGED_BY, MANAGED_BY_FEDGATE};

pub use actions::{Action, DesiredObject, ObjRef, WriteKind, plan};
pub use bodies::{Front, derived_service_name, desired, slice_name};
pub use conditions::{conditions_match, merge_conditions};
pub use election::ready_replicas;
pub use front::{FrontKey, FrontPorts};

use election::{ElectionInputs, Term, changed_routes, changed_state, lost};

/// The server-side apply field manager of everything fedgate writes.
pub const FIELD_MANAGER: &str = "fedgate";
/// The most endpoints one EndpointSlice carries (the API server's limit is 1000).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 1000;
/// Label tying an EndpointSlice to the Service kube-proxy serves it for.
pub const LABEL_KUBE_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Annotation on a derived Service naming the import it stands for (`namespace/name`).
pub const ANNOTATION_DERIVED_FOR: &str = "fedgate.io/derived-for";
/// How long the inputs must stay unchanged before the writer writes.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// The longest the writer waits for its inputs to settle.
pub const MAX_SETTLE: Duration = Duration::from_secs(1);
/// How often objects that failed to write (e.g. namespace missing) are tried again.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(10);
/// The longest a new leader waits for the published ClusterSetIPs to be read back.
pub const PINS_WAIT: Duration = Duration::from_secs(10);

/// Settings of the writer.
#[derive(Clone, Debug)]
pub struct WriterSettings {
    /// This gateway's cluster: its ServiceExports get conditions.
    pub cluster: ClusterId,
    /// `front.mode: kube`: derived Services point at this gateway pod.
    pub front: Option<FrontSettings>,
    /// The configured peers. After a restart nothing is deleted until each of them has sent
    /// its exports (or [`deletion_grace`](Self::deletion_grace) passed): their objects must
    /// not go just because their exports have not arrived yet.
    pub peers: BTreeSet<ClusterId>,
    /// The longest deletions wait for the peers after start.
    pub deletion_grace: Duration,
}

/// `front.mode: kube`.
#[derive(Clone, Debug)]
pub struct FrontSettings {
    /// The gateway pod's IP (the derived Services' endpoint when no replica is known).
    pub pod_ip: IpAddr,
    /// Ports of the gateway pod handed to import ports, first to last.
    pub ports: std::ops::RangeInclusive<u16>,
    /// The gateway's own Service (`front.kube.gatewayService`): its ready endpoints are the
    /// replicas the derived Services' slices list.
    pub gateway_service: Option<ServiceKey>,
    /// The ready replicas' pod IPs as last read (filled by the writer each pass from
    /// `gateway_service`); empty: `pod_ip` alone.
    pub replicas: Vec<IpAddr>,
    /// `traffic.failoverPriority`, for flat network mode: a derived Service lists a flat
    /// peer's endpoints directly only while they are the best tier ([`slices::direct_targets`]).
    pub priority: Vec<crate::failover::PriorityLabel>,
    /// Extra locality labels of this gateway (`cluster.labels`), the client side of the
    /// priority beside its cluster's locality.
    pub labels: std::collections::BTreeMap<String, String>,
}

impl FrontSettings {
    /// The pods the derived Services' slices list: the ready replicas, else this pod.
    pub fn pods(&self) -> Vec<IpAddr> {
        if self.replicas.is_empty() { vec![self.pod_ip] } else { self.replicas.clone() }
    }
}

/// The writer task. Build with [`KubeWriter::new`], spawn [`KubeWriter::run`].
pub struct KubeWriter {
    client: Client,
    settings: WriterSettings,
    exports: ApiResource,
    imports: ApiResource,
    snapshots: watch::Receiver<Arc<ImportSnapshot>>,
    statuses: watch::Receiver<Arc<StatusMap>>,
    front_routes: watch::Sender<Arc<BTreeMap<u16, FrontKey>>>,
    election: ElectionInputs,
    /// The local cluster's state (`front.kube.gatewayService`: the replicas).
    cluster: Option<watch::Receiver<Arc<ClusterState>>>,
}

/// The objects of one import.
type Objects = Vec<(ObjRef, Arc<DesiredObject>)>;

/// What the writer believes the cluster holds once every queued and in-flight write is
/// answered (a write is recorded when it is queued; a failed one is taken back, so the next
/// pass sends it again).
#[derive(Default)]
struct Written {
    /// Owned objects: their last written content, `None` = exists, content unknown.
    applied: BTreeMap<ObjRef, Option<Arc<DesiredObject>>>,
    /// Conditions this writer put on each local ServiceExport.
    conditions: BTreeMap<ServiceKey, Vec<crd::Condition>>,
    /// Conditions found on ServiceExports at start-up (their transition times carry over).
    listed: BTreeMap<ServiceKey, Vec<crd::Condition>>,
    /// Objects of the last pass per import, so unchanged imports (same `Arc`) are not rebuilt.
    per_import: BTreeMap<ServiceKey, (Arc<ImportedService>, Objects)>,
    derived_ips: BTreeMap<ServiceKey, Vec<String>>,
    ports: FrontPorts,
    /// The replicas the derived slices list (front kube).
    replicas: Vec<IpAddr>,
    /// Objects whose last write failed: written again on the next pass, and a pass is run
    /// every [`RETRY_INTERVAL`] while there are any.
    failed: BTreeSet<ObjRef>,
}

/// When the writer's inputs have settled: [`DEBOUNCE`] after the last change, at most
/// [`MAX_SETTLE`] after the first one since the last pass. Pure: the loop feeds it the times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settle {
    first: Option<tokio::time::Instant>,
    last: Option<tokio::time::Instant>,
}

impl Settle {
    /// An input changed at `now`.
    pub fn changed(&mut self, now: tokio::time::Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When the next pass is due; `None` when nothing changed since the last one.
    pub fn due(&self) -> Option<tokio::time::Instant> {
        Some((self.last? + DEBOUNCE).min(self.first? + MAX_SETTLE))
    }

    /// A pass starts: later changes count towards the next one.
    pub fn reset(&mut self) {
        *self = Settle::default();
    }
}

/// The answer to one request.
struct Answer {
    action: Action,
    result: Result<Option<DynamicObject>, kube::Error>,
}

impl KubeWriter {
    /// `exports` is the ServiceExport resource the source reads (its version is used for
    /// ServiceImports too).
    pub fn new(
        client: Client,
        settings: WriterSettings,
        exports: ApiResource,
        snapshots: watch::Receiver<Arc<ImportSnapshot>>,
        statuses: watch::Receiver<Arc<StatusMap>>,
    ) -> Self {
        let imports = super::import_resource(&exports);
        let (front_routes, _) = watch::channel(Arc::new(BTreeMap::new()));
        Self {
            client,
            settings,
            exports,
            imports,
            snapshots,
            statuses,
            front_routes,
            election: ElectionInputs::default(),
            cluster: None,
        }
    }

    /// `front.kube.gatewayService`: the derived Services' slices list the ready endpoints of
    /// the gateway's own Service in `cluster` (every replica), not just this pod.
    pub fn with_cluster_state(mut self, cluster: watch::Receiver<Arc<ClusterState>>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// The ready replicas now (empty without `front.kube.gatewayService`).
    fn replicas(&self) -> Vec<IpAddr> {
        let service = self.settings.front.as_ref().and_then(|f| f.gateway_service.as_ref());
        match &self.cluster {
            Some(rx) if service.is_some() => ready_replicas(&rx.borrow(), service),
            _ => Vec::new(),
        }
    }

    /// One of several replicas: writes only while `leader` says this one leads, and each
    /// term starts once `pins_applied` (the import set took the published ClusterSetIPs,
    /// waited for at most [`PINS_WAIT`]); while following, the front routes are
    /// `observed_routes` (the leader's derived Services).
    pub fn with_election(
        mut self,
        leader: watch::Receiver<LeaderState>,
        pins_applied: watch::Receiver<bool>,
        observed_routes: watch::Receiver<Arc<FrontRoutes>>,
    ) -> Self {
        self.election = ElectionInputs {
            leader: Some(leader),
            pins_applied: Some(pins_applied),
            observed_routes: Some(observed_routes),
        };
        self
    }

    /// `front.mode: kube`: which gateway port serves which import port (the data plane
    /// listens on these).
    pub fn front_routes(&self) -> watch::Receiver<Arc<BTreeMap<u16, FrontKey>>> {
        self.front_routes.subscribe()
    }

    /// Reconciles until `shutdown`: first lists what fedgate owns (so a restart updates in
    /// place and deletes only what is gone), then writes on every change.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::info_span!("kube_writer", cluster = %self.settings.cluster);
        self.serve(shutdown).instrument(span).await
    }

    /// Follows while another replica leads, writes while this one does ([`Self::lead`]: one
    /// term), until `shutdown`.
    async fn serve(mut self, shutdown: CancellationToken) {
        while self.wait_leading(&shutdown).await {
            match self.lead(&shutdown).await {
                Term::Stopped => break,
                Term::Lost => tracing::info!("no longer leading: stopped writing"),
            }
        }
        tracing::debug!("kube writer stopped");
    }

    /// Waits until this replica leads (true) or `shutdown` (false). Meanwhile, in
    /// `front.mode: kube`, the gateway ports are the ones the leader's derived Services name.
    async fn wait_leading(&mut self, shutdown: &CancellationToken) -> bool {
        loop {
            if let (Some(rx), Some(_)) = (&mut self.election.observed_routes, &self.settings.front)
            {
                let routes = Arc::clone(&rx.borrow_and_update());
                self.front_routes.send_if_modified(|r| {
                    let changed = **r != *routes;
                    *r = routes;
                    changed
                });
            }
            let Some(leader) = &mut self.election.leader else { return true };
            if leader.borrow_and_update().leading {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                r = leader.changed() => if r.is_err() { return false },
                _ = changed_routes(&mut self.election.observed_routes) => {}
            }
        }
    }

    /// One term as the leader: lists what fedgate owns (so the term updates in place and
    /// deletes only what is gone), then writes on every change, until the lease is lost
    /// (in-flight requests are dropped at once) or `shutdown`.
    ///
    /// The loop: inputs that settled ([`Settle`]) start a pass, which diffs and queues writes
    /// ([`WriteQueue`]); up to [`MAX_WRITES_IN_FLIGHT`] requests run while the next changes
    /// are already being taken in.
    async fn lead(&mut self, shutdown: &CancellationToken) -> Term {
        let mut written = Written::default();
        // The owned objects that exist now; retried until the API server answers.
        loop {
            match self.list_owned(&mut written).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "listing fedgate's objects failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Term::Stopped,
                        _ = lost(&mut self.election.leader) => return Term::Lost,
                        _ = tokio::time::sleep(RETRY_INTERVAL) => {}
                    }
                }
            }
        }
        // The ClusterSetIPs already published must be in the snapshot before anything is
        // written, or a new leader could publish addresses of its own over them.
        if let Some(rx) = &mut self.election.pins_applied {
            let applied = async { rx.wait_for(|a| *a).await.is_ok() };
            tokio::select! {
                _ = shutdown.cancelled() => return Term::Stopped,
                _ = lost(&mut self.election.leader) => return Term::Lost,
                r = tokio::time::timeout(PINS_WAIT, applied) => if r.is_err() {
                    tracing::warn!(
                        wait_s = PINS_WAIT.as_secs(),
                        "the cluster's ServiceImports were not read back in time (may the gateway \
                         list and watch serviceimports?); writing with this replica's ClusterSetIPs"
                    );
                },
            }
        }
        let grace_end = tokio::time::Instant::now() + self.settings.deletion_grace;
        let mut deletions = false;
        let mut grace_over = false;
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut queue = WriteQueue::new(MAX_WRITES_IN_FLIGHT);
        let mut running: FuturesUnordered<BoxFuture<'static, Answer>> = FuturesUnordered::new();
        let mut settle = Settle::default();
        // the first pass, once the inputs have settled after start
        settle.changed(tokio::time::Instant::now());
        self.snapshots.mark_unchanged();
        self.statuses.mark_unchanged();
        loop {
            while let Some(action) = queue.pop() {
                running.push(self.send(action));
            }
            let due = settle.due();
            tokio::select! {
                _ = shutdown.cancelled() => return Term::Stopped,
                _ = lost(&mut self.election.leader) => return Term::Lost,
                Some(answer) = running.next() => {
                    queue.finish(answer.action.target());
                    if self.complete(answer, &mut written, &queue) {
                        // a derived Service's ClusterIPs: its ServiceImport carries them next
                        settle.changed(tokio::time::Instant::now());
                    }
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    settle.reset();
                    if !deletions {
                        let snapshot = self.snapshots.borrow();
                        let heard =
                            self.settings.peers.iter().all(|p| snapshot.localities.contains_key(p));
                        deletions = heard || tokio::time::Instant::now() >= grace_end;
                        if deletions {
                            tracing::debug!(every_peer_heard = heard, "deleting stale objects from now on");
                        }
                    }
                    self.snapshots.mark_unchanged();
                    self.statuses.mark_unchanged();
                    queue.begin_pass();
                    self.plan_pass(&mut written, &mut queue, deletions);
                    tracing::trace!(queued = queue.queued(), in_flight = queue.in_flight(), superseded = queue.superseded(), "pass planned");
                }
                _ = tokio::time::sleep_until(grace_end), if !deletions && !grace_over => {
                    grace_over = true;
                    settle.changed(tokio::time::Instant::now());
                }
                r = self.snapshots.changed() => {
                    if r.is_err() { return Term::Stopped }
                    settle.changed(tokio::time::Instant::now());
                }
                r = self.statuses.changed() => {
                    if r.is_err() { return Term::Stopped }
                    settle.changed(tokio::time::Instant::now());
                }
                _ = changed_state(&mut self.cluster) => {
                    if self.replicas() != written.replicas {
                        settle.changed(tokio::time::Instant::now());
                    }
                }
                _ = retry.tick() => {
                    if !written.failed.is_empty() {
                        settle.changed(tokio::time::Instant::now());
                    }
                }
            }
        }
    }

    fn api(&self, kind: WriteKind, namespace: &str) -> Api<DynamicObject> {
        let res = match kind {
            WriteKind::ServiceExport => self.exports.clone(),
            WriteKind::Service => ApiResource::erase::<Service>(&()),
            WriteKind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
            WriteKind::ServiceImport => self.imports.clone(),
        };
        Api::namespaced_with(self.client.clone(), namespace, &res)
    }

    async fn list_owned(&self, written: &mut Written) -> Result<(), KubeError> {
        let api_err = |what: &str| {
            let what = what.to_owned();
            move |source| KubeError::Api { what, source }
        };
        let owned =
            ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY_FEDGATE}"));
        let kinds = [
            (WriteKind::Service, ApiResource::erase::<Service>(&())),
            (WriteKind::ServiceImport, self.imports.clone()),
            (WriteKind::EndpointSlice, ApiResource::erase::<EndpointSlice>(&())),
        ];
        for (kind, res) in kinds {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &res);
            let list = api.list(&owned).await.map_err(api_err(&format!("listing {}", res.kind)))?;
            for obj in list.items {
                // a derived Service: its ClusterIPs, and the gateway ports it names stay
                // (a new leader serves every import port where the last one did)
                if kind == WriteKind::Service
                    && let Some(super::observed::Derived { key, ports, ips }) =
                        super::observed::derived_ports(&obj)
                {
                    let range = self.settings.front.as_ref().map(|f| f.ports.clone());
                    for (k, port) in ports {
                        if range.as_ref().is_some_and(|r| r.contains(&port)) {
                            written.ports.keep(k, port);
                        }
                    }
                    if !ips.is_empty() {
                        written.derived_ips.insert(key, ips);
                    }
                }
                let (Some(namespace), Some(name)) = (obj.metadata.namespace, obj.metadata.name)
                else {
                    continue;
                };
                written.applied.insert(ObjRef { kind, namespace, name }, None);
            }
        }
        let exports: Api<DynamicObject> = Api::all_with(self.client.clone(), &self.exports);
        let list = exports
            .list(&ListParams::default())
            .await
            .map_err(api_err("listing ServiceExports"))?;
        for obj in list.items {
            let (Some(namespace), Some(name)) =
                (obj.metadata.namespace.clone(), obj.metadata.name.clone())
            else {
                continue;
            };
            let conditions: Vec<crd::Condition> =
                serde_json::from_value(obj.data["status"]["conditions"].clone())
                    .unwrap_or_default();
            written.listed.insert(ServiceKey::new(namespace, name), conditions);
        }
        tracing::info!(
            owned = written.applied.len(),
            exports = written.listed.len(),
            "listed existing objects; reconciling in place"
        );
        Ok(())
    }

    /// One pass: diffs what the inputs want against [`Written`] and queues the difference,
    /// recording it in `written` as if done (an answer that says otherwise takes it back).
    fn plan_pass(&mut self, written: &mut Written, queue: &mut WriteQueue, deletions: bool) {
        self.plan_statuses(written, queue);
        let snapshot = Arc::clone(&self.snapshots.borrow());
        let mut front = self.settings.front.clone();
        if let Some(f) = &mut front {
            f.replicas = self.replicas();
            if f.replicas != written.replicas {
                tracing::info!(replicas = ?f.replicas, "derived Services point at these gateway pods");
                written.replicas = f.replicas.clone();
                // every derived slice lists them
                written.per_import.clear();
            }
            let exhausted = written.ports.reconcile(&snapshot, &f.ports);
            for k in exhausted {
                tracing::warn!(service = %k.key, port = k.port, "front.kube port range exhausted; import port not served");
            }
            let routes = Arc::new(written.ports.routes());
            if **self.front_routes.borrow() != *routes {
                self.front_routes.send_replace(routes);
                // port changes reach every import's derived Service
                written.per_import.clear();
            }
        }
        // In front kube mode a ServiceImport carries its derived Service's ClusterIPs once
        // the Service's apply has answered with them (a later pass: see `complete`).
        let mut desired_all = BTreeMap::new();
        let mut next = BTreeMap::new();
        for (key, import) in &snapshot.services {
            let ips = written.derived_ips.get(key).cloned().unwrap_or_default();
            let objects = match written.per_import.remove(key) {
                // A derived Service that may list a flat peer's endpoints follows the
                // snapshot's reachability too, not only the import: built again each pass.
                Some((prev, objects))
                    if Arc::ptr_eq(&prev, import)
                        && (front.is_none() || ips_in(&objects, &ips))
                        && !(front.is_some()
                            && import.clusters.keys().any(|c| snapshot.flat.contains(c))) =>
                {
                    objects
                }
                _ => desired(
                    import,
                    front.as_ref().map(|f| Front {
                        settings: f,
                        ports: &written.ports,
                        direct: slices::direct_targets(import, &snapshot, f),
                    }),
                    &ips,
                    &self.imports.api_version,
                )
                .into_iter()
                .map(|(r, d)| (r, Arc::new(d)))
                .collect(),
            };
            desired_all.extend(objects.iter().cloned());
            next.insert(key.clone(), (Arc::clone(import), objects));
        }
        written.per_import = next;
        // a failed object that is neither wanted nor known to exist needs no retry
        written.failed.retain(|r| {
            r.kind == WriteKind::ServiceExport
                || desired_all.contains_key(r)
                || written.applied.contains_key(r)
        });
        for action in plan(&desired_all, &written.applied, deletions) {
            match &action {
                Action::Apply(r, d) => {
                    written.applied.insert(r.clone(), Some(d.clone()));
                }
                Action::Delete(r) => {
                    written.applied.remove(r);
                }
                Action::Conditions(..) => {}
            }
            queue.push(action);
        }
    }

    /// Queues the conditions of this cluster's ServiceExports that differ from those written
    /// (or whose last write failed).
    fn plan_statuses(&self, written: &mut Written, queue: &mut WriteQueue) {
        let statuses = Arc::clone(&self.statuses.borrow());
        let now = jiff::Timestamp::now();
        for (key, status) in statuses.iter() {
            if status.cluster != self.settings.cluster {
                continue;
            }
            if let Some(listed) = written.listed.remove(key) {
                written.conditions.insert(key.clone(), listed);
            }
            let r = ObjRef {
                kind: WriteKind::ServiceExport,
                namespace: key.namespace.clone(),
                name: key.name.clone(),
            };
            let prev = written.conditions.get(key).cloned().unwrap_or_default();
            if conditions_match(&prev, &status.conditions) && !written.failed.contains(&r) {
                continue;
            }
            let conditions = merge_conditions(&prev, &status.conditions, now);
            written.conditions.insert(key.clone(), conditions.clone());
            queue.push(Action::Conditions(r, conditions));
        }
        written.conditions.retain(|k, _| statuses.contains_key(k));
        written.failed.retain(|r| {
            r.kind != WriteKind::ServiceExport
                || statuses.contains_key(&ServiceKey::new(r.namespace.clone(), r.name.clone()))
        });
    }

    /// The request of one action (an apply of a kind with a status is two requests, in order).
    fn send(&self, action: Action) -> BoxFuture<'static, Answer> {
        let r = action.target();
        let api = self.api(r.kind, &r.namespace);
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let export_version = self.exports.api_version.clone();
        Box::pin(async move {
            let result = match &action {
                Action::Apply(r, d) => {
                    async {
                        let obj = api.patch(&r.name, &pp, &Patch::Apply(&d.body)).await?;
                        if let Some(status) = &d.status {
                            api.patch_status(&r.name, &pp, &Patch::Apply(status)).await?;
                        }
                        Ok(Some(obj))
                    }
                    .await
                }
                Action::Delete(r) => {
                    api.delete(&r.name, &DeleteParams::default()).await.map(|_| None)
                }
                Action::Conditions(r, conditions) => {
                    let patch = json!({
                        "apiVersion": export_version,
                        "kind": "ServiceExport",
                        "status": {"conditions": conditions},
                    });
                    api.patch_status(&r.name, &pp, &Patch::Apply(&patch)).await.map(|_| None)
                }
            };
            Answer { action, result }
        })
    }

    /// Records an answer; true when a derived Service's ClusterIPs became known (its
    /// ServiceImport must be written again).
    fn complete(&self, answer: Answer, written: &mut Written, queue: &WriteQueue) -> bool {
        let Answer { action, result } = answer;
        let requeued = queue.is_queued(action.target());
        match action {
            Action::Apply(r, _) => {
                super::metrics::record_write(r.kind.as_str(), "apply", result.is_ok());
                match result {
                    Ok(obj) => {
                        written.failed.remove(&r);
                        tracing::debug!(kind = ?r.kind, namespace = %r.namespace, name = %r.name, "applied");
                        if r.kind == WriteKind::Service
                            && let Some(obj) = obj
                        {
                            let ips: Vec<String> = obj.data["spec"]["clusterIPs"]
                                .as_array()
                                .map(|a| {
                                    a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
                                })
                                .unwrap_or_default();
                            let key = obj
                                .metadata
                                .annotations
                                .as_ref()
                                .and_then(|a| a.get(ANNOTATION_DERIVED_FOR))
                                .and_then(|k| k.split_once('/'))
                                .map(|(ns, n)| ServiceKey::new(ns, n));
                            if let Some(key) = key
                                && written.derived_ips.get(&key) != Some(&ips)
                            {
                                written.derived_ips.insert(key, ips);
                                return true;
                            }
                        }
                    }
                    Err(e) => {
                        if written.failed.insert(r.clone()) {
                            tracing::warn!(kind = ?r.kind, namespace = %r.namespace, name = %r.name, error = %e, "write failed; retrying later");
                        }
                        // Unknown state: written again on the next pass (unless a newer
                        // state is already queued).
                        if !requeued {
                            written.applied.remove(&r);
                        }
                    }
                }
            }
            Action::Delete(r) => {
                let gone = matches!(&result, Err(kube::Error::Api(e)) if e.code == 404);
                super::metrics::record_write(r.kind.as_str(), "delete", result.is_ok() || gone);
                match result {
                    Ok(_) => {
                        written.failed.remove(&r);
                        tracing::debug!(kind = ?r.kind, namespace = %r.namespace, name = %r.name, "deleted");
                    }
                    Err(_) if gone => {
                        written.failed.remove(&r);
                    }
                    Err(e) => {
                        if written.failed.insert(r.clone()) {
                            tracing::warn!(kind = ?r.kind, namespace = %r.namespace, name = %r.name, error = %e, "delete failed; retrying later");
                        }
                        // Still there: deleted again by the next pass.
                        if !requeued {
                            written.applied.insert(r, None);
                        }
                    }
                }
            }
            Action::Conditions(r, _) => {
                super::metrics::record_write("ServiceExport", "status", result.is_ok());
                let key = ServiceKey::new(r.namespace.clone(), r.name.clone());
                match result {
                    Ok(_) => {
                        written.failed.remove(&r);
                        tracing::debug!(service = %key, "ServiceExport conditions written");
                    }
                    // The export was deleted meanwhile: nothing to report on.
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        written.failed.remove(&r);
                        if !requeued {
                            written.conditions.remove(&key);
                        }
                    }
                    Err(e) => {
                        if written.failed.insert(r) {
                            tracing::warn!(service = %key, error = %e, "writing ServiceExport conditions failed; retrying");
                        }
                    }
                }
            }
        }
        false
    }
}

/// Whether a front-kube import's ServiceImport already carries `ips`.
fn ips_in(objects: &[(ObjRef, Arc<DesiredObject>)], ips: &[String]) -> bool {
    objects.iter().filter(|(r, _)| r.kind == WriteKind::ServiceImport).all(|(_, d)| {
        let have = d.body["spec"]["ips"].as_array().cloned().unwrap_or_default();
        have.iter().filter_map(|v| v.as_str()).eq(ips.iter().map(String::as_str))
    })
}
