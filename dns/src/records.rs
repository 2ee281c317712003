//! What each service publishes in DNS, as plain record sets. Pure functions of the model: the
//! zone writer calls them for changed services only, encodes their output name by name and
//! diffs the encodings; these record sets do not outlive that.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use fedgate_discovery::model::{
    ClusterId, Health, ImportedService, LABEL_ZONE, LocalService, Locality, Protocol, ServiceKey,
    ServiceType,
};
use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record};

use crate::names::{
    Zone, host_label, is_dns_label, is_port_label, name_in, reverse_name, wire_key,
};
use crate::tier::{PriorityLabel, tier};

/// Version the MCS DNS specification we implement, served at `dns-version.clusterset.local`.
pub const DNS_SPEC_VERSION: &str = "1.0.0";
/// SRV priority and weight of every SRV record (all targets equal).
const SRV_PRIORITY: u16 = 0;
const SRV_WEIGHT: u16 = 100;

/// All records of one owner name, grouped by type (at most one set per type).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameData {
    pub name: Name,
    pub zone: Option<Zone>,
    pub rrsets: BTreeMap<u16, Vec<Record>>,
}

/// The names one service publishes, keyed by lowercase wire name.
pub type NameMap = BTreeMap<Vec<u8>, NameData>;

/// Reverse records one service asks for: address → the name its PTR points at. Several
/// services may name one address (a pod behind two headless services), so the zone writer
/// merges them into one PTR set per address ([`ptr_names`]).
pub type Ptrs = Vec<(IpAddr, Name)>;

/// Everything one service publishes: its own names, and the PTR records it contributes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    pub names: NameMap,
    pub ptrs: Ptrs,
}

/// Everything outside a service that its clusterset records depend on.
#[derive(Clone, Debug)]
pub struct ImportContext<'a> {
    pub ttl: u32,
    pub local_cluster: Option<&'a ClusterId>,
    /// Labels of this gateway (the failover client).
    pub client_labels: &'a BTreeMap<String, String>,
    pub priority: &'a [PriorityLabel],
    pub localities: &'a BTreeMap<ClusterId, Locality>,
    pub unreachable: &'a BTreeSet<ClusterId>,
    /// VIPs of this service's remote endpoints: (cluster, endpoint address) → VIP.
    pub vips: &'a BTreeMap<(ClusterId, IpAddr), IpAddr>,
    /// Clusters in flat network mode: their endpoints are answered at their own addresses.
    pub flat: &'a BTreeSet<ClusterId>,
}

struct Builder {
    zone: Zone,
    ttl: u32,
    out: NameMap,
    ptrs: Ptrs,
}

impl Builder {
    fn new(zone: Zone, ttl: u32) -> Self {
        Self { zone, ttl, out: NameMap::new(), ptrs: Ptrs::new() }
    }

    /// `ip`'s reverse name points at `target` (merged with other services' by the writer).
    fn ptr(&mut self, ip: IpAddr, target: &Name) {
        if !self.ptrs.iter().any(|(i, t)| *i == ip && t == target) {
            self.ptrs.push((ip, target.clone()));
        }
    }

    /// The SRV record of `port` at the service name itself (what CoreDNS answers for
    /// `<svc>.<ns>.svc.cluster.local SRV`), beside the `_<port>._<proto>` names.
    fn service_srv(&mut self, svc_name: &Name, port: u16, target: &Name) {
        self.add(svc_name, RData::SRV(SRV::new(SRV_PRIORITY, SRV_WEIGHT, port, target.clone())));
    }

    fn add(&mut self, name: &Name, rdata: RData) {
        let record = Record::from_rdata(name.clone(), self.ttl, rdata);
        let entry = self.entry(name);
        let set = entry.rrsets.entry(u16::from(record.record_type())).or_default();
        if !set.contains(&record) {
            set.push(record);
        }
    }

    fn add_ip(&mut self, name: &Name, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => self.add(name, RData::A(A(v4))),
            IpAddr::V6(v6) => self.add(name, RData::AAAA(AAAA(v6))),
        }
    }

    /// An empty non-terminal: exists (NODATA), holds nothing.
    fn ent(&mut self, name: &Name) {
        self.entry(name);
    }

    /// The built names and PTR targets. They live only until the zone writer has encoded
    /// them (the table keeps wire form only), so their Vecs are not trimmed.
    fn publish(self) -> Published {
        Published { names: self.out, ptrs: self.ptrs }
    }

    fn entry(&mut self, name: &Name) -> &mut NameData {
        let zone = self.zone;
        self.out.entry(wire_key(name)).or_insert_with(|| NameData {
            name: name.clone(),
            zone: Some(zone),
            rrsets: BTreeMap::new(),
        })
    }

    /// `_<port>._<proto>.<base labels>` SRV records, plus the `_<proto>` empty non-terminal.
    fn srv(&mut self, port_name: &str, proto: Protocol, base: &[&str], port: u16, target: &Name) {
        if !is_port_label(port_name) {
            return;
        }
        let port_label = format!("_{}", port_name.to_ascii_lowercase());
        let proto_label = format!("_{}", proto.as_str().to_ascii_lowercase());
        let mut labels = vec![port_label.as_str(), proto_label.as_str()];
        labels.extend_from_slice(base);
        let (Some(name), Some(ent)) =
            (name_in(&labels, self.zone), name_in(&labels[1..], self.zone))
        else {
            return;
        };
        self.ent(&ent);
        self.add(&name, RData::SRV(SRV::new(SRV_PRIORITY, SRV_WEIGHT, port, target.clone())));
    }
}

/// `<svc>.<ns>.svc` labels of a service, when both are valid DNS labels.
fn service_labels(key: &ServiceKey) -> Option<[&str; 3]> {
    (is_dns_label(&key.name) && is_dns_label(&key.namespace)).then_some([
        key.name.as_str(),
        key.namespace.as_str(),
        "svc",
    ])
}

/// One ready endpoint of a headless import as DNS sees it.
#[derive(Debug)]
struct HeadlessEndpoint<'a> {
    cluster: &'a ClusterId,
    host: String,
    /// What we answer: the endpoint itself (local, or remote in flat mode) or its VIP.
    answer: IpAddr,
    healthy: bool,
    tier: usize,
    endpoint: &'a fedgate_discovery::model::Endpoint,
    /// Answered at its own address (local, or flat): SRV records carry its own port.
    own_address: bool,
}

/// The `clusterset.local` names of one imported service (MCS DNS specification 1.0.0).
pub fn import_names(svc: &ImportedService, cx: &ImportContext<'_>) -> NameMap {
    import_records(svc, cx).names
}

/// The `clusterset.local` names of one imported service (MCS DNS specification 1.0.0), and
/// the PTR records of its addresses: each ClusterSetIP points at the service name, each
/// address answered for a headless endpoint at that endpoint's per-host name.
pub fn import_records(svc: &ImportedService, cx: &ImportContext<'_>) -> Published {
    let mut b = Builder::new(Zone::ClusterSet, cx.ttl);
    let Some(base) = service_labels(&svc.key) else {
        return b.publish();
    };
    let Some(svc_name) = name_in(&base, Zone::ClusterSet) else {
        return b.publish();
    };
    match svc.service_type {
        ServiceType::ClusterSetIP => {
            for ip in &svc.ips {
                b.add_ip(&svc_name, *ip);
                b.ptr(*ip, &svc_name);
            }
            if svc.ips.is_empty() {
                // No ClusterSetIP allocated (yet): the name does not resolve.
                return b.publish();
            }
            for port in &svc.ports {
                if let Some(name) = &port.port.name {
                    b.srv(name, port.port.protocol, &base, port.port.port, &svc_name);
                }
                b.service_srv(&svc_name, port.port.port, &svc_name);
            }
        }
        ServiceType::Headless => headless_import(&mut b, svc, cx, &base, &svc_name),
    }
    b.publish()
}

fn headless_import(
    b: &mut Builder,
    svc: &ImportedService,
    cx: &ImportContext<'_>,
    base: &[&str; 3],
    svc_name: &Name,
) {
    let mut endpoints = Vec::new();
    for (cluster, export) in &svc.clusters {
        let own_address = cx.local_cluster == Some(cluster) || cx.flat.contains(cluster);
        let cluster_labels =
            cx.localities.get(cluster).cloned().unwrap_or_default().labels_for(cluster);
        for ep in export.endpoints.iter().filter(|e| e.ready) {
            let answer = if own_address {
                ep.address
            } else {
                match cx.vips.get(&(cluster.clone(), ep.address)) {
                    Some(vip) => *vip,
                    // Not routable from here without a VIP: leave it out.
                    None => continue,
                }
            };
            let ep_tier = match &ep.zone {
                Some(zone) => {
                    let mut labels = cluster_labels.clone();
                    labels.insert(LABEL_ZONE.to_owned(), zone.clone());
                    tier(cx.priority, cx.client_labels, &labels)
                }
                None => tier(cx.priority, cx.client_labels, &cluster_labels),
            };
            endpoints.push(HeadlessEndpoint {
                cluster,
                host: host_label(ep.hostname.as_deref(), ep.address),
                answer,
                healthy: ep.health != Health::Unhealthy && !cx.unreachable.contains(cluster),
                tier: ep_tier,
                endpoint: ep,
                own_address,
            });
        }
    }

    // Per-host names for every ready endpoint; `<clusterid>.<svc>...` itself is not added.
    let mut host_names = Vec::with_capacity(endpoints.len());
    for ep in &endpoints {
        let mut labels = vec![ep.host.as_str(), ep.cluster.as_str()];
        labels.extend_from_slice(base);
        let name = name_in(&labels, Zone::ClusterSet);
        if let Some(name) = &name {
            b.add_ip(name, ep.answer);
            b.ptr(ep.answer, name);
        }
        host_names.push(name);
    }

    // The service name and SRV records: only the best tier that has a healthy endpoint.
    let Some(best) = endpoints.iter().filter(|e| e.healthy).map(|e| e.tier).min() else {
        return;
    };
    for (ep, host_name) in endpoints.iter().zip(&host_names) {
        if !ep.healthy || ep.tier != best {
            continue;
        }
        b.add_ip(svc_name, ep.answer);
        let Some(host_name) = host_name else { continue };
        for port in &svc.ports {
            if !port.clusters.is_empty() && !port.clusters.contains(ep.cluster) {
                continue;
            }
            // Endpoints answered at their own address (local, flat) are reached on their own
            // port; a remote endpoint's VIP serves the service port.
            let number = if ep.own_address {
                ep.endpoint.port_for(&port.port).unwrap_or(port.port.port)
            } else {
                port.port.port
            };
            b.service_srv(svc_name, number, host_name);
            if let Some(port_name) = &port.port.name {
                b.srv(port_name, port.port.protocol, base, number, host_name);
            }
        }
    }
}

/// The `cluster.local` names of one Service of this cluster.
pub fn local_names(svc: &LocalService, ttl: u32) -> NameMap {
    local_records(svc, ttl).names
}

/// The `cluster.local` names of one Service of this cluster, and the PTR records of its
/// addresses (ClusterIPs → the service name, ready headless endpoints → their per-host name).
pub fn local_records(svc: &LocalService, ttl: u32) -> Published {
    let mut b = Builder::new(Zone::Cluster, ttl);
    if svc.kube_type == "ExternalName" {
        return b.publish();
    }
    let Some(base) = service_labels(&svc.key) else {
        return b.publish();
    };
    let Some(svc_name) = name_in(&base, Zone::Cluster) else {
        return b.publish();
    };
    if !svc.is_headless() {
        for ip in &svc.cluster_ips {
            b.add_ip(&svc_name, *ip);
            b.ptr(*ip, &svc_name);
        }
        for port in &svc.ports {
            if let Some(name) = &port.name {
                b.srv(name, port.protocol, &base, port.port, &svc_name);
            }
            b.service_srv(&svc_name, port.port, &svc_name);
        }
        return b.publish();
    }
    for ep in svc.endpoints.iter().filter(|e| e.ready) {
        b.add_ip(&svc_name, ep.address);
        let host = host_label(ep.hostname.as_deref(), ep.address);
        let mut labels = vec![host.as_str()];
        labels.extend_from_slice(&base);
        let Some(host_name) = name_in(&labels, Zone::Cluster) else { continue };
        b.add_ip(&host_name, ep.address);
        b.ptr(ep.address, &host_name);
        for port in &svc.ports {
            let number = ep.port_for(port).unwrap_or(port.port);
            b.service_srv(&svc_name, number, &host_name);
            if let Some(name) = &port.name {
                b.srv(name, port.protocol, &base, number, &host_name);
            }
        }
    }
    b.publish()
}

/// The PTR name of `ip`, holding one record per target (sorted: the answer does not depend
/// on which service contributed first).
pub fn ptr_names(ip: IpAddr, targets: &BTreeSet<Name>, ttl: u32) -> NameData {
    let name = reverse_name(ip);
    let records =
        targets.iter().map(|t| Record::from_rdata(name.clone(), ttl, RData::PTR(PTR(t.clone()))));
    let mut rrsets = BTreeMap::new();
    rrsets.insert(u16::from(hickory_proto::rr::RecordType::PTR), records.collect());
    NameData { name, zone: Some(Zone::reverse_of(ip)), rrsets }
}

/// The SOA record of a zone, used at the apex and in the authority section of negative
/// answers. Its `minimum` (the negative-caching TTL) is our TTL. The serial is fixed for the
/// life of the process: nothing transfers these zones, and a changing serial would force every
/// pre-encoded negative answer to be rebuilt on each change.
pub fn soa(zone: Zone, ttl: u32, serial: u32) -> Record {
    let apex = Name::from_ascii(zone.apex()).unwrap_or_else(|_| Name::root());
    // The reverse zones' server and contact are those of clusterset.local.
    let home = match zone {
        Zone::ClusterSet | Zone::Cluster => zone,
        Zone::ReverseV4 | Zone::ReverseV6 => Zone::ClusterSet,
    };
    let mname =
        Name::from_ascii(format!("ns.dns.{}", home.apex())).unwrap_or_else(|_| apex.clone());
    let rname =
        Name::from_ascii(format!("hostmaster.{}", home.apex())).unwrap_or_else(|_| apex.clone());
    let ttl_i32 = i32::try_from(ttl).unwrap_or(i32::MAX);
    Record::from_rdata(
        apex,
        ttl,
        RData::SOA(SOA::new(mname, rname, serial, ttl_i32, ttl_i32, 3600, ttl)),
    )
}

/// The name server of a zone, named by its SOA (`ns.dns.<zone>`) and its apex NS record.
pub fn nameserver(zone: Zone) -> Option<Name> {
    name_in(&["ns", "dns"], zone)
}

/// Names that exist independent of any service: each zone's apex (SOA and NS) and `svc`
/// empty non-terminal, `dns-version.clusterset.local`, and `ns.dns.<zone>` (with the address
/// `ns_address`, when the server listens on a specific one; an empty name otherwise).
pub fn static_names(ttl: u32, serial: u32, ns_address: Option<IpAddr>) -> NameMap {
    let mut out = NameMap::new();
    for zone in Zone::ALL {
        let mut b = Builder::new(zone, ttl);
        let soa = soa(zone, ttl, serial);
        let apex = soa.name.clone();
        b.add(&apex, soa.data);
        if let Some(ns) = nameserver(zone) {
            b.add(&apex, RData::NS(NS(ns.clone())));
            match ns_address {
                Some(ip) => b.add_ip(&ns, ip),
                None => b.ent(&ns),
            }
        }
        if let Some(svc) = name_in(&["svc"], zone) {
            b.ent(&svc);
        }
        if zone == Zone::ClusterSet
            && let Some(version) = name_in(&["dns-version"], zone)
        {
            b.add(&version, RData::TXT(TXT::new(vec![DNS_SPEC_VERSION.to_owned()])));
        }
        out.append(&mut b.out);
    }
    out
}

/// `<ns>.svc.<zone>`: exists (as an empty non-terminal) while a service of the namespace does.
pub fn namespace_ent(namespace: &str, zone: Zone) -> Option<NameData> {
    if !is_dns_label(namespace) {
        return None;
    }
    let name = name_in(&[namespace, "svc"], zone)?;
    Some(NameData { name, zone: Some(zone), rrsets: BTreeMap::new() })
}

#[cfg(test)]
pub(crate) mod tests;
