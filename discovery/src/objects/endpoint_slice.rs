//! `discovery.k8s.io/v1` EndpointSlice into [`SliceEndpoints`], and the endpoints of a
//! Service from all of its slices ([`merge_endpoints`]).

use std::borrow::Cow;
use std::collections::HashSet;

use crate::model::{Endpoint, EndpointPort, Health, IpFamily, Label, ServiceKey};

use super::{
    ConvertError, NameRule, Result, Seg, family_of, fld, non_empty, object_key, parse_ip,
    parse_port, parse_port_name, parse_protocol, wire,
};

/// Label that ties an EndpointSlice to its Service.
pub const LABEL_SLICE_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// The endpoints one EndpointSlice contributes to its Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoints {
    /// The Service named by the `kubernetes.io/service-name` label, in the slice's namespace.
    pub service: ServiceKey,
    pub address_type: IpFamily,
    /// Endpoints with this slice's ports and `Health::Unknown`.
    pub endpoints: Vec<Endpoint>,
}

impl TryFrom<wire::EndpointSlice> for SliceEndpoints {
    type Error = ConvertError;

    fn try_from(slice: wire::EndpointSlice) -> Result<Self> {
        let key = object_key(slice.metadata.as_ref(), NameRule::Rfc1123Subdomain)?;
        let service_name = slice
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .and_then(|l| l.get(LABEL_SLICE_SERVICE_NAME))
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ConvertError::at(
                    &[fld("metadata")],
                    format!("missing label {LABEL_SLICE_SERVICE_NAME} (it ties the slice to its Service)"),
                )
            })?;
        Label::check_rfc1035(service_name).map_err(|why| {
            ConvertError::at(
                &[
                    fld("metadata"),
                    fld("labels"),
                    Seg::Key(Cow::Borrowed(LABEL_SLICE_SERVICE_NAME)),
                ],
                format!("invalid service name {service_name:?}: {why}"),
            )
        })?;
        let address_type = match slice.address_type.as_deref() {
            Some("IPv4") => IpFamily::IPv4,
            Some("IPv6") => IpFamily::IPv6,
            Some("FQDN") => {
                return Err(ConvertError::at(
                    &[fld("addressType")],
                    "FQDN is not supported (fedgate routes to IP endpoints); \
                     the slice is ignored",
                ));
            }
            None | Some("") => {
                return Err(ConvertError::at(&[], "missing addressType (IPv4 or IPv6)"));
            }
            Some(other) => {
                return Err(ConvertError::at(
                    &[fld("addressType")],
                    format!("unknown addressType {other:?} (expected IPv4 or IPv6)"),
                ));
            }
        };

        let mut ports: Vec<EndpointPort> = Vec::new();
        for (i, p) in slice.ports.unwrap_or_default().into_iter().enumerate() {
            let at = |field: &'static str| vec![fld("ports"), Seg::Index(i), fld(field)];
            let name = parse_port_name(p.name, &at("name"))?;
            let protocol = parse_protocol(p.protocol.as_deref(), &at("protocol"))?;
            let port = parse_port(p.port, &at("port")).map_err(|e| {
                if e.reason == "missing port" {
                    ConvertError::at(
                        &[fld("ports"), Seg::Index(i)],
                        "missing port (fedgate needs every EndpointSlice port to name a number)",
                    )
                } else {
                    e
                }
            })?;
            if ports.iter().any(|o| o.name == name) {
                return Err(ConvertError::at(
                    &at("name"),
                    format!("duplicate port name {:?}", name.unwrap_or_default()),
                ));
            }
            ports.push(EndpointPort { name, protocol, port });
        }

        let listed = slice.endpoints.unwrap_or_default();
        // Exactly sized (pushing would leave room for four): the file source keeps every slice.
        let mut endpoints = Vec::with_capacity(listed.len());
        for (i, e) in listed.into_iter().enumerate() {
            let prefix = [fld("endpoints"), Seg::Index(i)];
            let mut endpoint = Endpoint::try_from(e).map_err(|err| err.within(&prefix))?;
            if family_of(&endpoint.address) != address_type {
                return Err(ConvertError::at(
                    &[fld("endpoints"), Seg::Index(i), fld("addresses"), Seg::Index(0)],
                    format!(
                        "address {} does not match addressType {:?}",
                        endpoint.address, address_type
                    ),
                ));
            }
            endpoint.ports = ports.clone();
            endpoints.push(endpoint);
        }

        Ok(SliceEndpoints {
            service: ServiceKey::new(key.namespace, service_name.clone()),
            address_type,
            endpoints,
        })
    }
}

impl TryFrom<wire::Endpoint> for Endpoint {
    type Error = ConvertError;

    /// One EndpointSlice endpoint; `ports` is left empty (they are the slice's).
    fn try_from(e: wire::Endpoint) -> Result<Self> {
        let addresses = e.addresses.unwrap_or_default();
        let Some(first) = addresses.first() else {
            return Err(ConvertError::at(&[], "at least one address is required"));
        };
        let address = parse_ip(first, &[fld("addresses"), Seg::Index(0)])?;
        for (i, a) in addresses.iter().enumerate().skip(1) {
            parse_ip(a, &[fld("addresses"), Seg::Index(i)])?;
        }
        let hostname = non_empty(e.hostname);
        if let Some(h) = &hostname {
            Label::check(h).map_err(|why| {
                ConvertError::at(&[fld("hostname")], format!("invalid hostname {h:?}: {why}"))
            })?;
        }
        Ok(Endpoint {
            address,
            hostname,
            ready: e.conditions.and_then(|c| c.ready).unwrap_or(true),
            zone: non_empty(e.zone),
            ports: Vec::new(),
            health: Health::Unknown,
        })
    }
}

/// Endpoints of all slices of a service, in the order given (slice name order); an address
/// listed by two slices counts once (the first). Exactly sized: the cluster state holds one
/// such Vec per Service, mostly of one or two endpoints.
pub fn merge_endpoints<'a>(slices: impl Iterator<Item = &'a SliceEndpoints>) -> Vec<Endpoint> {
    let mut seen = HashSet::new();
    let mut merged: Vec<Endpoint> = slices
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| seen.insert(e.address))
        .cloned()
        .collect();
    merged.shrink_to_fit();
    merged
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::model::Protocol;

    fn slice(yaml: &str) -> Result<SliceEndpoints> {
        let wire: wire::EndpointSlice = crate::objects::from_yaml(yaml);
        SliceEndpoints::try_from(wire)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    const SLICE: &str = "metadata:
  name: web-abc12
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: dns, port: 53, protocol: UDP}
endpoints:
- addresses: [10.1.0.1, 10.1.0.9]
  hostname: web-0
  zone: zone-a
- addresses: [10.1.0.2]
  conditions: {ready: false, serving: true}
";

    #[test]
    fn slice_every_field() {
        let got = slice(SLICE).expect("valid slice");
        let ports = vec![
            EndpointPort { name: Some("http".into()), protocol: Protocol::Tcp, port: 8080 },
            EndpointPort { name: Some("dns".into()), protocol: Protocol::Udp, port: 53 },
        ];
        let want = SliceEndpoints {
            service: ServiceKey::new("shop", "web"),
            address_type: IpFamily::IPv4,
            endpoints: vec![
                Endpoint {
                    address: ip("10.1.0.1"),
                    hostname: Some("web-0".into()),
                    ready: true,
                    zone: Some("zone-a".into()),
                    ports: ports.clone(),
                    health: Health::Unknown,
                },
                Endpoint {
                    address: ip("10.1.0.2"),
                    hostname: None,
                    ready: false,
                    zone: None,
                    ports,
                    health: Health::Unknown,
                },
            ],
        };
        assert_eq!(got, want);
    }

    #[test]
    fn slice_errors() {
        let cases: &[(&str, &str, &str)] = &[
            ("addressType: FQDN", "addressType", "FQDN is not supported"),
            ("addressType: IPv7", "addressType", "unknown addressType"),
            ("endpoints: []", "", "missing addressType"),
            (
                "addressType: IPv4\nendpoints: [{addresses: []}]",
                "endpoints[0]",
                "at least one address",
            ),
            ("addressType: IPv4\nendpoints: [{}]", "endpoints[0]", "at least one address"),
            (
                "addressType: IPv4\nendpoints: [{addresses: [x]}]",
                "endpoints[0].addresses[0]",
                "invalid IP",
            ),
            (
                "addressType: IPv4\nendpoints: [{addresses: ['::1']}]",
                "endpoints[0].addresses[0]",
                "does not match addressType",
            ),
            (
                "addressType: IPv4\nendpoints: [{addresses: [10.0.0.1], hostname: Web_0}]",
                "endpoints[0].hostname",
                "invalid hostname",
            ),
            ("addressType: IPv4\nports: [{name: a}]", "ports[0]", "missing port"),
            ("addressType: IPv4\nports: [{port: 99999}]", "ports[0].port", "out of range"),
            (
                "addressType: IPv4\nports: [{port: 1, protocol: ICMP}]",
                "ports[0].protocol",
                "unknown protocol",
            ),
            (
                "addressType: IPv4\nports: [{port: 1, name: a}, {port: 2, name: a}]",
                "ports[1].name",
                "duplicate port name",
            ),
        ];
        let meta = "metadata: {name: s, labels: {kubernetes.io/service-name: web}}\n";
        for (body, path, fragment) in cases {
            let err = slice(&format!("{meta}{body}")).expect_err(body);
            assert_eq!(err.path.to_string(), *path, "{body}: {err}");
            assert!(err.reason.contains(fragment), "{body}: {err}");
        }
        let err = slice("metadata: {name: s}\naddressType: IPv4").expect_err("no label");
        assert!(err.reason.contains("missing label kubernetes.io/service-name"), "{err}");
        let err = slice(
            "metadata: {name: s, labels: {kubernetes.io/service-name: Web}}\naddressType: IPv4",
        )
        .expect_err("bad label");
        assert_eq!(err.path.to_string(), "metadata.labels[\"kubernetes.io/service-name\"]");
        let err = slice(
            "metadata: {name: 's..x', labels: {kubernetes.io/service-name: w}}\naddressType: IPv4",
        )
        .expect_err("bad name");
        assert_eq!(err.path.to_string(), "metadata.name");
    }
}
