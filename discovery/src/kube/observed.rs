//! What the leader wrote, read back by every replica (issue 19): every replica serves the
//! ClusterSetIPs and front ports the leader wrote, instead of choosing its own.
//!
//! - **Pins**: the `spec.ips` of each ServiceImport fedgate wrote. The import set takes them
//!   for its imports ([`crate::imports::ImportSet::with_pins`]): in `front.mode: vip` they
//!   are addresses of the allocator's range, in `front.mode: kube` the derived Services'
//!   ClusterIPs. A new leader keeps them, and allocates only for imports that have no
//!   ServiceImport yet.
//! - **Front routes** (`front.mode: kube`): which gateway port serves which import port,
//!   from the `targetPort`s of the derived Services; a follower listens on those.
//!
//! One watch per kind, on objects labelled `app.kubernetes.io/managed-by: fedgate` only. The
//! conversions are the pure [`import_ips`] and [`derived_ports`] (the writer reads its
//! objects back with the same functions when it starts leading).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::writer::{ANNOTATION_DERIVED_FOR, FrontKey};
use super::{LABEL_MANAGED_BY, MANAGED_BY_FEDGATE};
use crate::imports::Pins;
use crate::model::{Protocol, ServiceKey};

/// Gateway port → the import port it serves.
pub type FrontRoutes = BTreeMap<u16, FrontKey>;

/// The ClusterSetIPs of a ServiceImport fedgate wrote: its import and `spec.ips` (none when
/// it has no `ips` yet, or is not fedgate's).
pub fn import_ips(obj: &DynamicObject) -> Option<(ServiceKey, Vec<IpAddr>)> {
    if !managed(obj) {
        return None;
    }
    let key = ServiceKey::new(obj.metadata.namespace.clone()?, obj.metadata.name.clone()?);
    let ips: Vec<IpAddr> = obj.data["spec"]["ips"]
        .as_array()?
        .iter()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect();
    (!ips.is_empty()).then_some((key, ips))
}

/// What a derived Service says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Derived {
    /// Its import (the `fedgate.io/derived-for` annotation).
    pub key: ServiceKey,
    /// The gateway port (`targetPort`) of each of its ports.
    pub ports: Vec<(FrontKey, u16)>,
    /// Its ClusterIPs.
    pub ips: Vec<String>,
}

/// A derived Service's import, gateway ports and ClusterIPs (none when it is not one).
pub fn derived_ports(obj: &DynamicObject) -> Option<Derived> {
    if !managed(obj) {
        return None;
    }
    let (ns, name) =
        obj.metadata.annotations.as_ref()?.get(ANNOTATION_DERIVED_FOR)?.split_once('/')?;
    let key = ServiceKey::new(ns, name);
    let spec = &obj.data["spec"];
    let ports = spec["ports"]
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| {
                    let port = u16::try_from(p["port"].as_u64()?).ok()?;
                    let target = u16::try_from(p["targetPort"].as_u64()?).ok()?;
                    let protocol: Protocol =
                        p["protocol"].as_str().unwrap_or("TCP").parse().ok()?;
                    Some((FrontKey { key: key.clone(), port, protocol }, target))
                })
                .collect()
        })
        .unwrap_or_default();
    let ips = spec["clusterIPs"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    Some(Derived { key, ports, ips })
}

fn managed(obj: &DynamicObject) -> bool {
    obj.metadata.labels.as_ref().and_then(|l| l.get(LABEL_MANAGED_BY)).map(String::as_str)
        == Some(MANAGED_BY_FEDGATE)
}

/// The objects one watch holds (by `namespace/name`), and the ones of a relist in progress.
#[derive(Default)]
struct Held<T> {
    objects: BTreeMap<(String, String), T>,
    relist: Option<BTreeMap<(String, String), T>>,
}

impl<T> Held<T> {
    /// Takes one watch event; true when the held objects changed (a relist counts once, at
    /// its end).
    fn take(
        &mut self,
        ev: Event<DynamicObject>,
        convert: impl Fn(&DynamicObject) -> Option<T>,
    ) -> bool {
        let name = |o: &DynamicObject| {
            (
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default(),
            )
        };
        match ev {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                if let (Some(relist), Some(v)) = (self.relist.as_mut(), convert(&o)) {
                    relist.insert(name(&o), v);
                }
                false
            }
            Event::InitDone => {
                self.objects = self.relist.take().unwrap_or_default();
                true
            }
            Event::Apply(o) => {
                match convert(&o) {
                    Some(v) => self.objects.insert(name(&o), v),
                    None => self.objects.remove(&name(&o)),
                };
                true
            }
            Event::Delete(o) => self.objects.remove(&name(&o)).is_some(),
        }
    }
}

/// The task that reads back what the leader wrote. Build with [`Observed::new`], spawn
/// [`Observed::run`].
pub struct Observed {
    client: Client,
    imports: ApiResource,
    pins: watch::Sender<Option<Arc<Pins>>>,
    routes: watch::Sender<Arc<FrontRoutes>>,
}

impl Observed {
    /// `imports` is the ServiceImport resource the writer writes.
    pub fn new(client: Client, imports: ApiResource) -> Self {
        let (pins, _) = watch::channel(None);
        let (routes, _) = watch::channel(Arc::new(FrontRoutes::new()));
        Self { client, imports, pins, routes }
    }

    /// The ClusterSetIPs of the cluster's ServiceImports; none until they have been listed.
    pub fn pins(&self) -> watch::Receiver<Option<Arc<Pins>>> {
        self.pins.subscribe()
    }

    /// The gateway ports of the derived Services (`front.mode: kube`).
    pub fn front_routes(&self) -> watch::Receiver<Arc<FrontRoutes>> {
        self.routes.subscribe()
    }

    /// Watches until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        self.serve(shutdown).instrument(tracing::info_span!("kube_observed")).await
    }

    async fn serve(self, shutdown: CancellationToken) {
        let ours =
            watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY_FEDGATE}"));
        let imports = watcher::watcher(
            Api::<DynamicObject>::all_with(self.client.clone(), &self.imports),
            ours.clone(),
        )
        .backoff(super::source::watch_backoff())
        .map(|e| (true, e));
        let services = watcher::watcher(
            Api::<DynamicObject>::all_with(
                self.client.clone(),
                &ApiResource::erase::<Service>(&()),
            ),
            ours,
        )
        .backoff(super::source::watch_backoff())
        .map(|e| (false, e));
        let mut events = futures::stream::select(imports.boxed(), services.boxed());
        let mut pins: Held<Vec<IpAddr>> = Held::default();
        let mut derived: Held<Vec<(FrontKey, u16)>> = Held::default();
        let mut failing = [false; 2];
        loop {
            let (is_import, ev) = tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = events.next() => match ev { Some(ev) => ev, None => break },
            };
            let kind = if is_import { "ServiceImport" } else { "Service" };
            let ev = match ev {
                Ok(ev) => {
                    if std::mem::take(&mut failing[usize::from(is_import)]) {
                        tracing::info!(kind, "watch of fedgate's objects recovered");
                    }
                    ev
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing[usize::from(is_import)], true) {
                        tracing::warn!(kind, error = %e, "watch of fedgate's objects failed (RBAC: list and watch); retrying with backoff");
                    }
                    continue;
                }
            };
            if is_import {
                if pins.take(ev, |o| import_ips(o).map(|(_, ips)| ips)) {
                    let by_key: Pins = pins
                        .objects
                        .iter()
                        .map(|((ns, name), ips)| {
                            (ServiceKey::new(ns.clone(), name.clone()), ips.clone())
                        })
                        .collect();
                    self.pins.send_if_modified(|p| {
                        let changed = p.as_deref() != Some(&by_key);
                        if changed {
                            *p = Some(Arc::new(by_key));
                        }
                        changed
                    });
                }
            } else if derived.take(ev, |o| derived_ports(o).map(|d| d.ports)) {
                let routes: FrontRoutes = derived
                    .objects
                    .values()
                    .flatten()
                    .map(|(k, port)| (*port, k.clone()))
                    .collect();
                self.routes.send_if_modified(|r| {
                    let changed = **r != routes;
                    if changed {
                        *r = Arc::new(routes);
                    }
                    changed
                });
            }
        }
        tracing::debug!("stopped reading fedgate's objects back");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(value: serde_json::Value) -> DynamicObject {
        serde_json::from_value(value).expect("object")
    }

    fn service_import(name: &str, ips: serde_json::Value, managed: bool) -> DynamicObject {
        let labels =
            if managed { json!({LABEL_MANAGED_BY: MANAGED_BY_FEDGATE}) } else { json!({}) };
        obj(json!({
            "apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "spec": {"type": "ClusterSetIP", "ips": ips, "ports": [{"port": 80, "protocol": "TCP"}]},
        }))
    }

    #[test]
    fn a_service_import_pins_its_ips_only_when_fedgate_wrote_it() {
        let web = ServiceKey::new("shop", "web");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let rows = [
            (
                "one address",
                service_import("web", json!(["242.1.0.7"]), true),
                Some((web.clone(), vec![ip("242.1.0.7")])),
            ),
            (
                "dual stack",
                service_import("web", json!(["10.96.0.10", "fd00::a"]), true),
                Some((web.clone(), vec![ip("10.96.0.10"), ip("fd00::a")])),
            ),
            ("no ips yet", service_import("web", json!([]), true), None),
            ("not an address", service_import("web", json!(["x"]), true), None),
            ("someone else's", service_import("web", json!(["242.1.0.7"]), false), None),
        ];
        for (what, o, want) in rows {
            assert_eq!(import_ips(&o), want, "{what}");
        }
    }

    #[test]
    fn a_derived_service_names_the_gateway_port_of_each_import_port() {
        let svc = obj(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": "fedgate-0a1b2c3d", "namespace": "shop",
                "labels": {LABEL_MANAGED_BY: MANAGED_BY_FEDGATE},
                "annotations": {ANNOTATION_DERIVED_FOR: "shop/web"},
            },
            "spec": {
                "clusterIPs": ["10.96.0.10"],
                "ports": [
                    {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 21000},
                    {"name": "grpc", "port": 9090, "targetPort": 21001},
                    {"name": "named", "port": 81, "protocol": "TCP", "targetPort": "http"},
                ],
            },
        }));
        let Derived { key, ports, ips } = derived_ports(&svc).expect("derived");
        assert_eq!(key, ServiceKey::new("shop", "web"));
        let fk = |port| FrontKey { key: key.clone(), port, protocol: Protocol::Tcp };
        assert_eq!(
            ports,
            vec![(fk(80), 21000), (fk(9090), 21001)],
            "a named targetPort is not ours"
        );
        assert_eq!(ips, vec!["10.96.0.10".to_owned()]);

        let mut plain = svc.clone();
        plain.metadata.annotations = None;
        assert!(derived_ports(&plain).is_none(), "no derived-for annotation");
    }

    #[test]
    fn a_relist_replaces_what_was_held_once_it_is_complete() {
        let mut held: Held<Vec<IpAddr>> = Held::default();
        let convert = |o: &DynamicObject| import_ips(o).map(|(_, ips)| ips);
        assert!(!held.take(Event::Init, convert));
        assert!(
            !held.take(Event::InitApply(service_import("a", json!(["242.1.0.1"]), true)), convert)
        );
        assert!(held.objects.is_empty(), "nothing until the list is complete");
        assert!(held.take(Event::InitDone, convert));
        assert_eq!(held.objects.len(), 1);
        assert!(held.take(Event::Apply(service_import("b", json!(["242.1.0.2"]), true)), convert));
        // an import whose ips were dropped no longer pins
        assert!(held.take(Event::Apply(service_import("a", json!([]), true)), convert));
        assert_eq!(held.objects.keys().map(|(_, n)| n.as_str()).collect::<Vec<_>>(), ["b"]);
        assert!(held.take(Event::Delete(service_import("b", json!([]), true)), convert));
        assert!(!held.take(Event::Delete(service_import("b", json!([]), true)), convert));
        // a relist that no longer has an object drops it
        held.take(Event::Apply(service_import("c", json!(["242.1.0.3"]), true)), convert);
        held.take(Event::Init, convert);
        assert!(held.take(Event::InitDone, convert));
        assert!(held.objects.is_empty());
    }
}
