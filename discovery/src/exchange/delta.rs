//! Pure diffing and applying of export sets: what the server sends and the watcher applies.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::{ExportSet, ExportedService, Locality, ServiceKey};

/// What changed between two export sets of one cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportDelta {
    /// The new locality, when it changed.
    pub locality: Option<Locality>,
    /// Services that are new or changed, in key order.
    pub upserts: Vec<Arc<ExportedService>>,
    /// Services that are gone.
    pub removed: Vec<ServiceKey>,
}

impl ExportDelta {
    pub fn is_empty(&self) -> bool {
        self.locality.is_none() && self.upserts.is_empty() && self.removed.is_empty()
    }
}

/// The delta from `old` to `new`. A service whose `Arc` is the same is unchanged without
/// looking inside it (the local export set keeps `Arc`s of unchanged services); a service
/// with a new `Arc` but an equal value is unchanged too.
pub fn diff_exports(old: &ExportSet, new: &ExportSet) -> ExportDelta {
    let mut delta = ExportDelta::default();
    if old.locality != new.locality {
        delta.locality = Some(new.locality.clone());
    }
    for (key, svc) in &new.services {
        match old.services.get(key) {
            Some(prev) if Arc::ptr_eq(prev, svc) || prev == svc => {}
            _ => delta.upserts.push(svc.clone()),
        }
    }
    delta.removed =
        old.services.keys().filter(|k| !new.services.contains_key(*k)).cloned().collect();
    delta
}

/// Applies decoded upserts and removals to `base`, giving the set at `version`. Services
/// whose value did not change keep their old `Arc`, so consumers diffing by pointer see only
/// real changes.
pub fn apply_delta(
    base: &ExportSet,
    version: u64,
    locality: Option<Locality>,
    upserts: Vec<ExportedService>,
    removed: Vec<ServiceKey>,
) -> ExportSet {
    let mut services = base.services.clone();
    for key in &removed {
        services.remove(key);
    }
    for svc in upserts {
        upsert(&mut services, svc);
    }
    ExportSet {
        cluster: base.cluster.clone(),
        locality: locality.unwrap_or_else(|| base.locality.clone()),
        version,
        services,
    }
}

/// Replaces `fresh`'s services by the `Arc`s of `previous` where the value is equal, so a
/// resync after a reconnect costs consumers nothing for unchanged services.
pub fn reuse_unchanged(previous: Option<&ExportSet>, mut fresh: ExportSet) -> ExportSet {
    if let Some(prev) = previous {
        for (key, svc) in fresh.services.iter_mut() {
            if let Some(old) = prev.services.get(key)
                && old == svc
            {
                *svc = old.clone();
            }
        }
    }
    fresh
}

fn upsert(services: &mut BTreeMap<ServiceKey, Arc<ExportedService>>, svc: ExportedService) {
    match services.get(&svc.key) {
        Some(old) if **old == svc => {}
        _ => {
            services.insert(svc.key.clone(), Arc::new(svc));
        }
    }
}

/// Builders of model values for tests (here and in other crates, with `test-util`).
#[cfg(any(test, feature = "test-util"))]
pub mod testing {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    use crate::model::{
        ClusterId, Endpoint, EndpointPort, ExportSet, ExportedService, Health, ImportPort,
        ImportedService, IpFamily, LocalService, Locality, Protocol, ServiceExportObject,
        ServiceKey, ServicePort, ServiceType, SessionAffinity,
    };

    /// An export with the given identity, type, ports and endpoints, and every other field at
    /// its default: no session affinity, traffic policy or distribution, IP families, labels
    /// or annotations; created at the Unix epoch. Tests set what matters to them with struct
    /// update syntax (`ExportedService { created, ..exported(..) }`).
    pub fn exported(
        key: ServiceKey,
        cluster: &str,
        service_type: ServiceType,
        ports: Vec<ServicePort>,
        endpoints: Vec<Endpoint>,
    ) -> ExportedService {
        ExportedService {
            key,
            cluster: ClusterId::new(cluster).expect("test cluster id is valid"),
            service_type,
            ports,
            session_affinity: SessionAffinity::None,
            internal_traffic_policy: None,
            traffic_distribution: None,
            ip_families: Vec::new(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            created: jiff::Timestamp::UNIX_EPOCH,
            endpoints,
        }
    }

    /// A ready endpoint at `address` with one TCP port named `http`, no hostname or zone.
    /// Tests set what matters to them with struct update syntax
    /// (`Endpoint { zone, ..endpoint(..) }`).
    pub fn endpoint(address: IpAddr, port: u16, health: Health) -> Endpoint {
        Endpoint {
            address,
            hostname: None,
            ready: true,
            zone: None,
            ports: vec![EndpointPort { name: Some("http".into()), protocol: Protocol::Tcp, port }],
            health,
        }
    }

    /// A ready endpoint at `address` with no ports, hostname or zone (as a Kubernetes
    /// EndpointSlice entry is before ports are attached).
    pub fn bare_endpoint(address: &str, health: Health) -> Endpoint {
        Endpoint {
            address: address.parse().expect("test endpoint address is valid"),
            hostname: None,
            ready: true,
            zone: None,
            ports: Vec::new(),
            health,
        }
    }

    /// A local ClusterIP service `key` at `cluster_ip`, IPv4, with one TCP port 80 named `http`
    /// and ready endpoints at `endpoints` of unknown health.
    pub fn local_service(key: ServiceKey, cluster_ip: &str, endpoints: &[&str]) -> LocalService {
        LocalService {
            key,
            kube_type: "ClusterIP".into(),
            cluster_ips: vec![cluster_ip.parse().expect("test cluster ip is valid")],
            headless: false,
            ports: vec![ServicePort::tcp(Some("http"), 80)],
            session_affinity: SessionAffinity::None,
            internal_traffic_policy: None,
            traffic_distribution: None,
            ip_families: vec![IpFamily::IPv4],
            endpoints: endpoints.iter().map(|ip| bare_endpoint(ip, Health::Unknown)).collect(),
        }
    }

    /// A ServiceExport of `key` created at `created`, exporting `labels` and no annotations.
    pub fn export_object(
        key: ServiceKey,
        created: jiff::Timestamp,
        labels: BTreeMap<String, String>,
    ) -> ServiceExportObject {
        ServiceExportObject {
            key,
            created,
            exported_labels: labels,
            exported_annotations: BTreeMap::new(),
        }
    }

    /// An import of `key` as `winner` and `exports` merged it, with `ports`, ClusterSetIPs
    /// `ips`, and every other field at its default: no session affinity, traffic policy or
    /// distribution, IP families, labels, annotations or conflicts.
    pub fn imported(
        key: ServiceKey,
        service_type: ServiceType,
        ports: Vec<ImportPort>,
        ips: Vec<IpAddr>,
        winner: ClusterId,
        exports: Vec<Arc<ExportedService>>,
    ) -> ImportedService {
        ImportedService {
            key,
            service_type,
            ports,
            session_affinity: SessionAffinity::None,
            internal_traffic_policy: None,
            traffic_distribution: None,
            ip_families: vec![],
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            ips,
            winner,
            clusters: exports.into_iter().map(|e| (e.cluster.clone(), e)).collect(),
            conflicts: vec![],
        }
    }

    /// Waits (at most 5 s) until the value `rx` watches satisfies `f`; panics naming `what`
    /// when it does not, or when the channel closes.
    pub async fn eventually<T>(
        rx: &mut tokio::sync::watch::Receiver<T>,
        what: &str,
        f: impl Fn(&T) -> bool,
    ) {
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.wait_for(|v| f(v)))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap_or_else(|_| panic!("channel closed waiting for {what}"));
    }

    /// A ClusterSetIP service `namespace/name` of `cluster` with one TCP port 80 and
    /// `endpoints` ready, healthy endpoints 10.x.y.z:8080.
    pub fn service(
        namespace: &str,
        name: &str,
        cluster: &str,
        endpoints: usize,
    ) -> ExportedService {
        let endpoints = (0..endpoints)
            .map(|i| {
                endpoint(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32)), 8080, Health::Healthy)
            })
            .collect();
        ExportedService {
            created: jiff::Timestamp::from_second(1_700_000_000).expect("valid timestamp"),
            ..exported(
                ServiceKey::new(namespace, name),
                cluster,
                ServiceType::ClusterSetIP,
                vec![ServicePort::tcp(Some("http"), 80)],
                endpoints,
            )
        }
    }

    /// An export set of `cluster` at `version` with services `ns/svc-0 .. ns/svc-(n-1)`.
    pub fn export_set(cluster: &str, version: u64, n: usize) -> ExportSet {
        ExportSet {
            cluster: ClusterId::new(cluster).expect("test cluster id is valid"),
            locality: Locality {
                region: Some("r1".into()),
                zone: Some("z1".into()),
                labels: BTreeMap::new(),
            },
            version,
            services: (0..n)
                .map(|i| {
                    let s = service("ns", &format!("svc-{i}"), cluster, 2);
                    (s.key.clone(), Arc::new(s))
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{export_set, service};
    use super::*;
    use crate::model::Health;

    #[test]
    fn diff_scenarios() {
        let base = export_set("east", 1, 3);
        let key = |i: usize| ServiceKey::new("ns", format!("svc-{i}"));

        // (name, change to make, expected upserted keys, expected removed keys, locality?)
        type Change = fn(&mut ExportSet);
        type Case = (&'static str, Change, Vec<ServiceKey>, Vec<ServiceKey>, bool);
        let cases: Vec<Case> = vec![
            ("nothing", |_| {}, vec![], vec![], false),
            (
                "new arc same value",
                |s| {
                    let k = ServiceKey::new("ns", "svc-0");
                    let v = (*s.services[&k]).clone();
                    s.services.insert(k, Arc::new(v));
                },
                vec![],
                vec![],
                false,
            ),
            (
                "endpoint health changed",
                |s| {
                    let k = ServiceKey::new("ns", "svc-1");
                    let mut v = (*s.services[&k]).clone();
                    v.endpoints[0].health = Health::Unhealthy;
                    s.services.insert(k, Arc::new(v));
                },
                vec![key(1)],
                vec![],
                false,
            ),
            (
                "added",
                |s| {
                    let v = service("ns", "svc-9", "east", 1);
                    s.services.insert(v.key.clone(), Arc::new(v));
                },
                vec![key(9)],
                vec![],
                false,
            ),
            (
                "removed",
                |s| {
                    s.services.remove(&ServiceKey::new("ns", "svc-2"));
                },
                vec![],
                vec![key(2)],
                false,
            ),
            ("locality", |s| s.locality.zone = Some("z9".into()), vec![], vec![], true),
        ];
        for (name, change, upserts, removed, locality) in cases {
            let mut new = base.clone();
            new.version = 2;
            change(&mut new);
            let d = diff_exports(&base, &new);
            let got: Vec<_> = d.upserts.iter().map(|s| s.key.clone()).collect();
            assert_eq!(got, upserts, "{name}");
            assert_eq!(d.removed, removed, "{name}");
            assert_eq!(d.locality.is_some(), locality, "{name}");
            // Applying the delta to the base gives the new set back.
            let applied = apply_delta(
                &base,
                2,
                d.locality.clone(),
                d.upserts.iter().map(|s| (**s).clone()).collect(),
                d.removed.clone(),
            );
            assert_eq!(applied, new, "{name}");
            // Unchanged services keep their Arc.
            for (k, v) in &applied.services {
                if !upserts.contains(k) {
                    assert!(Arc::ptr_eq(v, &base.services[k]), "{name}: {k} kept its Arc");
                }
            }
        }
    }

    #[test]
    fn resync_reuses_equal_services() {
        let old = export_set("east", 4, 3);
        let mut fresh = export_set("east", 5, 3);
        let k = ServiceKey::new("ns", "svc-1");
        let mut changed = (*fresh.services[&k]).clone();
        changed.endpoints.pop();
        fresh.services.insert(k.clone(), Arc::new(changed));
        let out = reuse_unchanged(Some(&old), fresh);
        for (key, svc) in &out.services {
            assert_eq!(Arc::ptr_eq(svc, &old.services[key]), key != &k, "{key}");
        }
    }
}
