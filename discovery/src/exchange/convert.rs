//! Conversions between the exchange's protobuf messages and `discovery::model`.
//!
//! Model → proto is infallible. Proto → model validates everything a peer could get wrong
//! and names the offending field (`services[3].endpoints[0].address`) in the error.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::exchange::proto;
use crate::model::{
    ClusterId, Endpoint, EndpointPort, ExportSet, ExportedService, Health, IpFamily, Locality,
    Protocol, ServiceKey, ServicePort, ServiceType, SessionAffinity, TargetPort,
};

/// A message from a peer that does not describe a valid export.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid field {field} in peer message: {reason}")]
pub struct ConvertError {
    /// Path of the field inside the message, e.g. `services[3].endpoints[0].address`.
    pub field: String,
    pub reason: String,
}

impl ConvertError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }

    /// Puts `prefix` in front of the field path (`ports[0]` + `port` → `ports[0].port`).
    pub fn within(mut self, prefix: impl AsRef<str>) -> Self {
        self.field = format!("{}.{}", prefix.as_ref(), self.field);
        self
    }
}

// ---------------------------------------------------------------------------------------
// model -> proto

impl From<&ServiceKey> for proto::ServiceKey {
    fn from(k: &ServiceKey) -> Self {
        Self { namespace: k.namespace.clone(), name: k.name.clone() }
    }
}

impl From<&Locality> for proto::Locality {
    fn from(l: &Locality) -> Self {
        Self {
            region: l.region.clone(),
            zone: l.zone.clone(),
            labels: l.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }
}

fn protocol_to_proto(p: Protocol) -> i32 {
    match p {
        Protocol::Tcp => proto::Protocol::Tcp as i32,
        Protocol::Udp => proto::Protocol::Udp as i32,
        Protocol::Sctp => proto::Protocol::Sctp as i32,
    }
}

impl From<&ServicePort> for proto::ServicePort {
    fn from(p: &ServicePort) -> Self {
        Self {
            name: p.name.clone(),
            protocol: protocol_to_proto(p.protocol),
            port: u32::from(p.port),
            app_protocol: p.app_protocol.clone(),
            target_port: p.target_port.as_ref().map(|t| match t {
                TargetPort::Number(n) => {
                    proto::service_port::TargetPort::TargetPortNumber(u32::from(*n))
                }
                TargetPort::Name(n) => proto::service_port::TargetPort::TargetPortName(n.clone()),
            }),
        }
    }
}

impl From<&Endpoint> for proto::Endpoint {
    fn from(e: &Endpoint) -> Self {
        Self {
            address: e.address.to_string(),
            hostname: e.hostname.clone(),
            ready: e.ready,
            zone: e.zone.clone(),
            ports: e
                .ports
                .iter()
                .map(|p| proto::EndpointPort {
                    name: p.name.clone(),
                    protocol: protocol_to_proto(p.protocol),
                    port: u32::from(p.port),
                })
                .collect(),
            health: match e.health {
                Health::Unknown => proto::Health::Unknown as i32,
                Health::Healthy => proto::Health::Healthy as i32,
                Health::Unhealthy => proto::Health::Unhealthy as i32,
            },
        }
    }
}

impl From<&ExportedService> for proto::ExportedService {
    fn from(s: &ExportedService) -> Self {
        use proto::session_affinity::Kind;
        Self {
            key: Some((&s.key).into()),
            cluster: s.cluster.to_string(),
            service_type: match s.service_type {
                ServiceType::ClusterSetIP => proto::ServiceType::ClusterSetIp as i32,
                ServiceType::Headless => proto::ServiceType::Headless as i32,
            },
            ports: s.ports.iter().map(Into::into).collect(),
            session_affinity: Some(proto::SessionAffinity {
                kind: Some(match &s.session_affinity {
                    SessionAffinity::None => Kind::None(proto::session_affinity::None {}),
                    SessionAffinity::ClientIP { timeout_seconds } => {
                        Kind::ClientIp(proto::session_affinity::ClientIp {
                            timeout_seconds: *timeout_seconds,
                        })
                    }
                }),
            }),
            internal_traffic_policy: s.internal_traffic_policy.clone(),
            traffic_distribution: s.traffic_distribution.clone(),
            ip_families: s
                .ip_families
                .iter()
                .map(|f| match f {
                    IpFamily::IPv4 => proto::IpFamily::Ipv4 as i32,
                    IpFamily::IPv6 => proto::IpFamily::Ipv6 as i32,
                })
                .collect(),
            labels: s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            annotations: s.annotations.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            created: Some(proto::Timestamp {
                seconds: s.created.as_second(),
                nanos: s.created.subsec_nanosecond(),
            }),
            endpoints: s.endpoints.iter().map(Into::into).collect(),
        }
    }
}

/// The full snapshot message of `set`.
pub fn snapshot_to_proto(set: &ExportSet) -> proto::Snapshot {
    proto::Snapshot {
        cluster: set.cluster.to_string(),
        locality: Some((&set.locality).into()),
        services: set.services.values().map(|s| s.as_ref().into()).collect(),
        instance: String::new(),
    }
}

// ---------------------------------------------------------------------------------------
// proto -> model

impl TryFrom<proto::ServiceKey> for ServiceKey {
    type Error = ConvertError;
    fn try_from(k: proto::ServiceKey) -> Result<Self, ConvertError> {
        if k.namespace.is_empty() {
            return Err(ConvertError::new("namespace", "must not be empty"));
        }
        if k.name.is_empty() {
            return Err(ConvertError::new("name", "must not be empty"));
        }
        Ok(ServiceKey { namespace: k.namespace, name: k.name })
    }
}

impl From<proto::Locality> for Locality {
    fn from(l: proto::Locality) -> Self {
        Locality { region: l.region, zone: l.zone, labels: l.labels.into_iter().collect() }
    }
}

fn protocol_from_proto(value: i32, field: &str) -> Result<Protocol, ConvertError> {
    match proto::Protocol::try_from(value) {
        Ok(proto::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(proto::Protocol::Udp) => Ok(Protocol::Udp),
        Ok(proto::Protocol::Sctp) => Ok(Protocol::Sctp),
        Ok(proto::Protocol::Unspecified) => Err(ConvertError::new(field, "must be set")),
        Err(_) => Err(ConvertError::new(field, format!("unknown value {value}"))),
    }
}

fn port_from_proto(value: u32, field: &str) -> Result<u16, ConvertError> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ConvertError::new(field, format!("{value} is not a port (1-65535)"))),
    }
}

impl TryFrom<proto::ServicePort> for ServicePort {
    type Error = ConvertError;
    fn try_from(p: proto::ServicePort) -> Result<Self, ConvertError> {
        use proto::service_port::TargetPort as T;
        let target_port = match p.target_port {
            None => None,
            Some(T::TargetPortNumber(n)) => {
                Some(TargetPort::Number(port_from_proto(n, "target_port_number")?))
            }
            Some(T::TargetPortName(n)) if n.is_empty() => {
                return Err(ConvertError::new("target_port_name", "must not be empty"));
            }
            Some(T::TargetPortName(n)) => Some(TargetPort::Name(n)),
        };
        Ok(ServicePort {
            name: p.name,
            protocol: protocol_from_proto(p.protocol, "protocol")?,
            port: port_from_proto(p.port, "port")?,
            app_protocol: p.app_protocol,
            target_port,
        })
    }
}

impl TryFrom<proto::EndpointPort> for EndpointPort {
    type Error = ConvertError;
    fn try_from(p: proto::EndpointPort) -> Result<Self, ConvertError> {
        Ok(EndpointPort {
            name: p.name,
            protocol: protocol_from_proto(p.protocol, "protocol")?,
            port: port_from_proto(p.port, "port")?,
        })
    }
}

impl TryFrom<proto::Endpoint> for Endpoint {
    type Error = ConvertError;
    fn try_from(e: proto::Endpoint) -> Result<Self, ConvertError> {
        let address: IpAddr = e.address.parse().map_err(|_| {
            ConvertError::new("address", format!("{:?} is not an IP address", e.address))
        })?;
        let health = match proto::Health::try_from(e.health) {
            Ok(proto::Health::Unknown) => Health::Unknown,
            Ok(proto::Health::Healthy) => Health::Healthy,
            Ok(proto::Health::Unhealthy) => Health::Unhealthy,
            Err(_) => {
                return Err(ConvertError::new("health", format!("unknown value {}", e.health)));
            }
        };
        let ports = e
            .ports
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                EndpointPort::try_from(p).map_err(|err| err.within(format!("ports[{i}]")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Endpoint { address, hostname: e.hostname, ready: e.ready, zone: e.zone, ports, health })
    }
}

impl TryFrom<proto::ExportedService> for ExportedService {
    type Error = ConvertError;
    fn try_from(s: proto::ExportedService) -> Result<Self, ConvertError> {
        use proto::session_affinity::Kind;
        let key =
            ServiceKey::try_from(s.key.ok_or_else(|| ConvertError::new("key", "must be set"))?)
                .map_err(|e| e.within("key"))?;
        let cluster =
            ClusterId::new(&s.cluster).map_err(|e| ConvertError::new("cluster", e.to_string()))?;
        let service_type = match proto::ServiceType::try_from(s.service_type) {
            Ok(proto::ServiceType::ClusterSetIp) => ServiceType::ClusterSetIP,
            Ok(proto::ServiceType::Headless) => ServiceType::Headless,
            Ok(proto::ServiceType::Unspecified) => {
                return Err(ConvertError::new("service_type", "must be set"));
            }
            Err(_) => {
                return Err(ConvertError::new(
                    "service_type",
                    format!("unknown value {}", s.service_type),
                ));
            }
        };
        let ports = s
            .ports
            .into_iter()
            .enumerate()
            .map(|(i, p)| ServicePort::try_from(p).map_err(|e| e.within(format!("ports[{i}]"))))
            .collect::<Result<_, _>>()?;
        let session_affinity = match s.session_affinity.and_then(|a| a.kind) {
            None | Some(Kind::None(_)) => SessionAffinity::None,
            Some(Kind::ClientIp(c)) => {
                SessionAffinity::ClientIP { timeout_seconds: c.timeout_seconds }
            }
        };
        let ip_families = s
            .ip_families
            .iter()
            .enumerate()
            .map(|(i, f)| match proto::IpFamily::try_from(*f) {
                Ok(proto::IpFamily::Ipv4) => Ok(IpFamily::IPv4),
                Ok(proto::IpFamily::Ipv6) => Ok(IpFamily::IPv6),
                _ => Err(ConvertError::new(
                    format!("ip_families[{i}]"),
                    format!("unknown value {f}"),
                )),
            })
            .collect::<Result<_, _>>()?;
        let created = s.created.ok_or_else(|| ConvertError::new("created", "must be set"))?;
        let created = jiff::Timestamp::new(created.seconds, created.nanos)
            .map_err(|e| ConvertError::new("created", e.to_string()))?;
        let endpoints = s
            .endpoints
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                Endpoint::try_from(e).map_err(|err| err.within(format!("endpoints[{i}]")))
            })
            .collect::<Result<_, _>>()?;
        Ok(ExportedService {
            key,
            cluster,
            service_type,
            ports,
            session_affinity,
            internal_traffic_policy: s.internal_traffic_policy,
            traffic_distribution: s.traffic_distribution,
            ip_families,
            labels: s.labels.into_iter().collect(),
            annotations: s.annotations.into_iter().collect(),
            created,
            endpoints,
        })
    }
}

/// Decodes the services of a snapshot or the upserts of a delta, checking that each belongs
/// to `cluster`. `list` names the repeated field in errors (`services`, `upserts`).
pub fn services_from_proto(
    services: Vec<proto::ExportedService>,
    cluster: &ClusterId,
    list: &str,
) -> Result<Vec<ExportedService>, ConvertError> {
    services
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let s = ExportedService::try_from(s).map_err(|e| e.within(format!("{list}[{i}]")))?;
            if &s.cluster != cluster {
                return Err(ConvertError::new(
                    format!("{list}[{i}].cluster"),
                    format!(
                        "service {} claims cluster {:?} but the set is {cluster:?}",
                        s.key,
                        s.cluster.as_str()
                    ),
                ));
            }
            Ok(s)
        })
        .collect()
}

/// Decodes a full snapshot into an `ExportSet` at `version`.
pub fn snapshot_from_proto(
    snapshot: proto::Snapshot,
    version: u64,
) -> Result<ExportSet, ConvertError> {
    let cluster = ClusterId::new(&snapshot.cluster)
        .map_err(|e| ConvertError::new("snapshot.cluster", e.to_string()))?;
    let locality = snapshot.locality.map(Locality::from).unwrap_or_default();
    let mut services = BTreeMap::new();
    for s in services_from_proto(snapshot.services, &cluster, "snapshot.services")? {
        let key = s.key.clone();
        if services.insert(key.clone(), Arc::new(s)).is_some() {
            return Err(ConvertError::new(
                "snapshot.services",
                format!("service {key} appears twice"),
            ));
        }
    }
    Ok(ExportSet { cluster, locality, version, services })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::delta::testing::service;

    #[test]
    fn round_trip_keeps_every_field() {
        let mut s = service("ns", "web", "east", 3);
        s.ports.push(ServicePort {
            name: Some("grpc".into()),
            protocol: Protocol::Udp,
            port: 9000,
            app_protocol: Some("h2c".into()),
            target_port: Some(TargetPort::Name("grpc-port".into())),
        });
        s.session_affinity = SessionAffinity::ClientIP { timeout_seconds: Some(30) };
        s.internal_traffic_policy = Some("Local".into());
        s.traffic_distribution = Some("PreferClose".into());
        s.ip_families = vec![IpFamily::IPv4, IpFamily::IPv6];
        s.labels.insert("a".into(), "b".into());
        s.annotations.insert("c".into(), "d".into());
        s.endpoints[1].health = Health::Unhealthy;
        s.endpoints[2].address = "fd00::7".parse().expect("valid ip");
        s.endpoints[2].hostname = Some("pod-2".into());
        s.endpoints[2].zone = Some("z1".into());
        let back = ExportedService::try_from(proto::ExportedService::from(&s)).expect("valid");
        assert_eq!(back, s);
    }

    #[test]
    fn bad_fields_are_named() {
        let good = proto::ExportedService::from(&service("ns", "web", "east", 1));
        type Mutate = fn(&mut proto::ExportedService);
        let cases: Vec<(&str, Mutate, &str)> = vec![
            ("no key", |s| s.key = None, "key"),
            (
                "empty namespace",
                |s| s.key.as_mut().expect("key").namespace.clear(),
                "key.namespace",
            ),
            ("bad cluster", |s| s.cluster = "East!".into(), "cluster"),
            ("unspecified type", |s| s.service_type = 0, "service_type"),
            ("unknown type", |s| s.service_type = 42, "service_type"),
            ("port zero", |s| s.ports[0].port = 0, "ports[0].port"),
            ("port too big", |s| s.ports[0].port = 70_000, "ports[0].port"),
            ("no protocol", |s| s.ports[0].protocol = 0, "ports[0].protocol"),
            ("bad address", |s| s.endpoints[0].address = "nope".into(), "endpoints[0].address"),
            ("bad health", |s| s.endpoints[0].health = 9, "endpoints[0].health"),
            ("bad ep port", |s| s.endpoints[0].ports[0].port = 0, "endpoints[0].ports[0].port"),
            ("bad family", |s| s.ip_families = vec![7], "ip_families[0]"),
            ("no created", |s| s.created = None, "created"),
            (
                "created out of range",
                |s| s.created = Some(proto::Timestamp { seconds: i64::MAX, nanos: 0 }),
                "created",
            ),
        ];
        for (name, mutate, field) in cases {
            let mut m = good.clone();
            mutate(&mut m);
            let err = ExportedService::try_from(m).expect_err(name);
            assert_eq!(err.field, field, "{name}: {err}");
        }
    }

    #[test]
    fn snapshot_rejects_foreign_and_duplicate_services() {
        let east = ClusterId::new("east").expect("valid");
        let mut snap = proto::Snapshot {
            cluster: east.to_string(),
            locality: None,
            services: vec![
                (&service("ns", "a", "east", 1)).into(),
                (&service("ns", "b", "west", 1)).into(),
            ],
            instance: String::new(),
        };
        let err = snapshot_from_proto(snap.clone(), 1).expect_err("foreign service");
        assert_eq!(err.field, "snapshot.services[1].cluster");
        snap.services[1] = (&service("ns", "a", "east", 1)).into();
        let err = snapshot_from_proto(snap, 1).expect_err("duplicate");
        assert_eq!(err.field, "snapshot.services");
    }
}
