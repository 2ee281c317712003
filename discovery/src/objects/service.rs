//! `v1` Service into [`LocalService`].

use std::net::IpAddr;

use crate::model::{IpFamily, LocalService, ServicePort, SessionAffinity, TargetPort};

use super::{
    ConvertError, NameRule, Result, Seg, family_of, fld, non_empty, object_key, parse_ip,
    parse_port, parse_port_name, parse_protocol, wire,
};

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when ClientIP affinity names none (the
/// API server's default: 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: i32 = 10_800;
/// Largest ClientIP affinity timeout the API server accepts (1 day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: i64 = 86_400;

impl TryFrom<wire::Service> for LocalService {
    type Error = ConvertError;

    /// A Service as the API server would store it, endpoints left empty (they come from the
    /// EndpointSlices). A missing `clusterIP` gives no cluster.local address (nothing
    /// allocates one in file mode); `clusterIP: None` makes the service headless.
    fn try_from(svc: wire::Service) -> Result<Self> {
        let key = object_key(svc.metadata.as_ref(), NameRule::Rfc1035Label)?;
        let spec = svc.spec.unwrap_or_default();
        let p_spec = key_path("spec");

        let kube_type = match spec.type_.as_deref() {
            None | Some("") => "ClusterIP",
            Some(t @ ("ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName")) => t,
            Some(other) => {
                return Err(ConvertError::at(
                    &[fld("spec"), fld("type")],
                    format!(
                        "unknown service type {other:?} (expected ClusterIP, NodePort, \
                         LoadBalancer or ExternalName)"
                    ),
                ));
            }
        };
        let external = kube_type == "ExternalName";

        let (cluster_ips, headless) = cluster_ips(&spec)?;
        if external && (headless || !cluster_ips.is_empty()) {
            return Err(ConvertError::at(
                &[fld("spec"), fld("clusterIP")],
                "an ExternalName service must not have a clusterIP",
            ));
        }
        if headless && kube_type != "ClusterIP" {
            return Err(ConvertError::at(
                &[fld("spec"), fld("clusterIP")],
                format!("clusterIP: None is only allowed for type ClusterIP, not {kube_type}"),
            ));
        }
        if external && non_empty(spec.external_name.clone()).is_none() {
            return Err(ConvertError::at(
                &p_spec,
                "spec.externalName is required for type ExternalName",
            ));
        }

        let ports = service_ports(spec.ports.unwrap_or_default())?;
        let session_affinity =
            session_affinity(spec.session_affinity.as_deref(), spec.session_affinity_config)?;

        let internal_traffic_policy = match spec.internal_traffic_policy.as_deref() {
            None | Some("") if external => None,
            None | Some("") => Some("Cluster".to_owned()),
            Some(p @ ("Cluster" | "Local")) => Some(p.to_owned()),
            Some(other) => {
                return Err(ConvertError::at(
                    &[fld("spec"), fld("internalTrafficPolicy")],
                    format!("unknown internalTrafficPolicy {other:?} (expected Cluster or Local)"),
                ));
            }
        };
        let traffic_distribution = non_empty(spec.traffic_distribution);
        let mut ip_families = ip_families(spec.ip_families, &cluster_ips)?;
        if ip_families.is_empty() && !external {
            // As the API server does in a single-stack IPv4 cluster: a headless Service (or a
            // file-mode one without a clusterIP) still has a family, so it does not conflict
            // with the ClusterIP exports of the same service.
            ip_families.push(IpFamily::IPv4);
        }

        Ok(LocalService {
            key,
            kube_type: kube_type.to_owned(),
            cluster_ips,
            headless,
            ports,
            session_affinity,
            internal_traffic_policy,
            traffic_distribution,
            ip_families,
            endpoints: Vec::new(),
        })
    }
}

fn key_path(k: &'static str) -> Vec<Seg> {
    vec![fld(k)]
}

/// `(addresses, headless)` from `clusterIP` / `clusterIPs`.
fn cluster_ips(spec: &wire::ServiceSpec) -> Result<(Vec<IpAddr>, bool)> {
    let p_ip = [fld("spec"), fld("clusterIP")];
    let mut headless = false;
    let primary = match spec.cluster_ip.as_deref() {
        None | Some("") => None,
        Some("None") => {
            headless = true;
            None
        }
        Some(s) => Some(parse_ip(s, &p_ip)?),
    };
    let mut list = Vec::new();
    let given = spec.cluster_ips.as_deref().unwrap_or_default();
    for (i, s) in given.iter().enumerate() {
        let path = [fld("spec"), fld("clusterIPs"), Seg::Index(i)];
        if s == "None" {
            if given.len() != 1 || primary.is_some() {
                return Err(ConvertError::at(
                    &path,
                    "\"None\" must be the only clusterIPs entry and match clusterIP",
                ));
            }
            headless = true;
            continue;
        }
        list.push(parse_ip(s, &path)?);
    }
    if headless && !list.is_empty() {
        return Err(ConvertError::at(
            &[fld("spec"), fld("clusterIPs")],
            "a headless service (clusterIP: None) must not list clusterIPs",
        ));
    }
    if let (Some(p), Some(first)) = (primary, list.first())
        && p != *first
    {
        return Err(ConvertError::at(
            &[fld("spec"), fld("clusterIPs"), Seg::Index(0)],
            format!("clusterIPs[0] {first} must equal clusterIP {p}"),
        ));
    }
    if list.len() > 2 {
        return Err(ConvertError::at(
            &[fld("spec"), fld("clusterIPs")],
            "at most two clusterIPs (one per family) are allowed",
        ));
    }
    if list.len() == 2 && family_of(&list[0]) == family_of(&list[1]) {
        return Err(ConvertError::at(
            &[fld("spec"), fld("clusterIPs"), Seg::Index(1)],
            "the two clusterIPs must be of different IP families",
        ));
    }
    if list.is_empty() {
        list.extend(primary);
    }
    Ok((list, headless))
}

fn service_ports(ports: Vec<wire::ServicePort>) -> Result<Vec<ServicePort>> {
    let count = ports.len();
    let mut out: Vec<ServicePort> = Vec::with_capacity(count);
    for (i, p) in ports.into_iter().enumerate() {
        let at = |field: &'static str| vec![fld("spec"), fld("ports"), Seg::Index(i), fld(field)];
        let name = parse_port_name(p.name, &at("name"))?;
        if count > 1 && name.is_none() {
            return Err(ConvertError::at(
                &[fld("spec"), fld("ports"), Seg::Index(i)],
                "name is required when a service has more than one port",
            ));
        }
        let protocol = parse_protocol(p.protocol.as_deref(), &at("protocol"))?;
        let port = parse_port(p.port, &at("port"))?;
        let target_port = match p.target_port {
            None => Some(TargetPort::Number(port)),
            Some(wire::IntOrString::Int(n)) => Some(TargetPort::Number(
                parse_port(Some(n), &at("targetPort"))
                    .map_err(|e| ConvertError { reason: format!("target{}", e.reason), ..e })?,
            )),
            Some(wire::IntOrString::String(s)) => {
                check_iana_svc_name(&s).map_err(|why| {
                    ConvertError::at(&at("targetPort"), format!("invalid targetPort {s:?}: {why}"))
                })?;
                Some(TargetPort::Name(s))
            }
        };
        if let Some(n) = &name
            && out.iter().any(|o| o.name.as_ref() == Some(n))
        {
            return Err(ConvertError::at(&at("name"), format!("duplicate port name {n:?}")));
        }
        if out.iter().any(|o| o.protocol == protocol && o.port == port) {
            return Err(ConvertError::at(
                &at("port"),
                format!("duplicate port {port}/{}", protocol.as_str()),
            ));
        }
        out.push(ServicePort {
            name,
            protocol,
            port,
            app_protocol: non_empty(p.app_protocol),
            target_port,
        });
    }
    Ok(out)
}

fn session_affinity(
    affinity: Option<&str>,
    config: Option<wire::SessionAffinityConfig>,
) -> Result<SessionAffinity> {
    match affinity {
        None | Some("") | Some("None") => Ok(SessionAffinity::None),
        Some("ClientIP") => {
            let timeout = config.and_then(|c| c.client_ip).and_then(|c| c.timeout_seconds);
            let timeout_seconds = match timeout {
                None => DEFAULT_AFFINITY_TIMEOUT_SECONDS,
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&t) => {
                    i32::try_from(t).unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
                }
                Some(t) => {
                    return Err(ConvertError::at(
                        &[
                            fld("spec"),
                            fld("sessionAffinityConfig"),
                            fld("clientIP"),
                            fld("timeoutSeconds"),
                        ],
                        format!(
                            "timeoutSeconds {t} is out of range (1-{MAX_AFFINITY_TIMEOUT_SECONDS})"
                        ),
                    ));
                }
            };
            Ok(SessionAffinity::ClientIP { timeout_seconds: Some(timeout_seconds) })
        }
        Some(other) => Err(ConvertError::at(
            &[fld("spec"), fld("sessionAffinity")],
            format!("unknown sessionAffinity {other:?} (expected None or ClientIP)"),
        )),
    }
}

fn ip_families(given: Option<Vec<String>>, ips: &[IpAddr]) -> Result<Vec<IpFamily>> {
    let Some(given) = given.filter(|g| !g.is_empty()) else {
        return Ok(ips.iter().map(family_of).collect());
    };
    let mut out = Vec::with_capacity(given.len());
    for (i, f) in given.iter().enumerate() {
        let path = [fld("spec"), fld("ipFamilies"), Seg::Index(i)];
        let family = match f.as_str() {
            "IPv4" => IpFamily::IPv4,
            "IPv6" => IpFamily::IPv6,
            other => {
                return Err(ConvertError::at(
                    &path,
                    format!("unknown IP family {other:?} (expected IPv4 or IPv6)"),
                ));
            }
        };
        if out.contains(&family) {
            return Err(ConvertError::at(&path, format!("duplicate IP family {f}")));
        }
        if let Some(ip) = ips.get(i)
            && family_of(ip) != family
        {
            return Err(ConvertError::at(
                &path,
                format!("{f} does not match the family of clusterIP {ip}"),
            ));
        }
        out.push(family);
    }
    if out.len() > 2 {
        return Err(ConvertError::at(
            &[fld("spec"), fld("ipFamilies")],
            "at most two IP families are allowed",
        ));
    }
    if ips.len() > out.len() {
        return Err(ConvertError::at(
            &[fld("spec"), fld("ipFamilies")],
            "every clusterIP needs an entry in ipFamilies",
        ));
    }
    Ok(out)
}

/// IANA service name, as `targetPort` names are validated: at most 15 characters, lowercase
/// letters, digits and single '-', at least one letter.
fn check_iana_svc_name(s: &str) -> std::result::Result<(), &'static str> {
    if s.is_empty() || s.len() > 15 {
        return Err("must be 1-15 characters (an IANA service name)");
    }
    if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err("may contain only lowercase letters, digits and '-'");
    }
    if !s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain at least one letter");
    }
    if s.starts_with('-') || s.ends_with('-') || s.contains("--") {
        return Err("must not start or end with '-' or contain '--'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServiceKey};

    fn service(yaml: &str) -> Result<LocalService> {
        let wire: wire::Service = crate::objects::from_yaml(yaml);
        LocalService::try_from(wire)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn service_every_field() {
        let got = service(
            "metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.1
  clusterIPs: [10.96.0.1, 'fd00::1']
  ipFamilies: [IPv4, IPv6]
  ports:
  - {name: http, port: 80, targetPort: 8080, appProtocol: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: dns-udp}
  - {name: sctp, port: 99, protocol: SCTP}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  internalTrafficPolicy: Local
  trafficDistribution: PreferClose
  selector: {app: web}
",
        )
        .expect("valid service");
        let want = LocalService {
            key: ServiceKey::new("shop", "web"),
            kube_type: "LoadBalancer".into(),
            cluster_ips: vec![ip("10.96.0.1"), ip("fd00::1")],
            headless: false,
            ports: vec![
                ServicePort {
                    name: Some("http".into()),
                    protocol: Protocol::Tcp,
                    port: 80,
                    app_protocol: Some("http".into()),
                    target_port: Some(TargetPort::Number(8080)),
                },
                ServicePort {
                    name: Some("dns".into()),
                    protocol: Protocol::Udp,
                    port: 53,
                    app_protocol: None,
                    target_port: Some(TargetPort::Name("dns-udp".into())),
                },
                ServicePort {
                    name: Some("sctp".into()),
                    protocol: Protocol::Sctp,
                    port: 99,
                    app_protocol: None,
                    target_port: Some(TargetPort::Number(99)),
                },
            ],
            session_affinity: SessionAffinity::ClientIP { timeout_seconds: Some(60) },
            internal_traffic_policy: Some("Local".into()),
            traffic_distribution: Some("PreferClose".into()),
            ip_families: vec![IpFamily::IPv4, IpFamily::IPv6],
            endpoints: vec![],
        };
        assert_eq!(got, want);
    }

    #[test]
    fn service_defaults() {
        // (name, yaml, check)
        type Check = fn(&LocalService);
        let cases: &[(&str, &str, Check)] = &[
            (
                "minimal",
                "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}",
                |s| {
                    assert_eq!(s.key, ServiceKey::new("default", "a"));
                    assert_eq!(s.kube_type, "ClusterIP");
                    assert_eq!(s.ports[0].protocol, Protocol::Tcp);
                    assert_eq!(s.ports[0].name, None);
                    assert_eq!(s.ports[0].target_port, Some(TargetPort::Number(80)));
                    assert_eq!(s.session_affinity, SessionAffinity::None);
                    assert_eq!(s.internal_traffic_policy.as_deref(), Some("Cluster"));
                    assert_eq!(s.traffic_distribution, None);
                    assert_eq!(s.ip_families, vec![IpFamily::IPv4]);
                    assert!(!s.is_headless());
                },
            ),
            ("headless", "metadata: {name: a}\nspec: {clusterIP: None}", |s| {
                assert!(s.cluster_ips.is_empty());
                assert!(s.is_headless());
                // The API server's default family for a headless Service (single-stack IPv4).
                assert_eq!(s.ip_families, vec![IpFamily::IPv4]);
            }),
            ("headless via clusterIPs", "metadata: {name: a}\nspec: {clusterIPs: [None]}", |s| {
                assert!(s.is_headless());
            }),
            ("no spec, no address", "metadata: {name: a}", |s| {
                assert!(s.cluster_ips.is_empty());
                assert!(s.ports.is_empty());
            }),
            ("ipv6 only", "metadata: {name: a}\nspec: {clusterIP: 'fd00::a'}", |s| {
                assert_eq!(s.ip_families, vec![IpFamily::IPv6]);
            }),
            (
                "client ip default timeout",
                "metadata: {name: a}\nspec: {sessionAffinity: ClientIP}",
                |s| {
                    assert_eq!(
                        s.session_affinity,
                        SessionAffinity::ClientIP { timeout_seconds: Some(10_800) }
                    );
                },
            ),
            (
                "external name",
                "metadata: {name: a}\nspec: {type: ExternalName, externalName: db.example.com}",
                |s| {
                    assert_eq!(s.kube_type, "ExternalName");
                    assert!(!s.is_headless());
                    assert!(s.ip_families.is_empty());
                    assert_eq!(s.internal_traffic_policy, None);
                },
            ),
            (
                "empty strings are absent",
                "metadata: {name: a, namespace: ''}\nspec: {clusterIP: '', type: ''}",
                |s| {
                    assert_eq!(s.key.namespace, "default");
                    assert_eq!(s.kube_type, "ClusterIP");
                    assert!(s.cluster_ips.is_empty());
                },
            ),
        ];
        for (name, yaml, check) in cases {
            match service(yaml) {
                Ok(s) => check(&s),
                Err(e) => panic!("{name}: {e}"),
            }
        }
    }

    #[test]
    fn service_errors() {
        // (yaml after `metadata: {name: a}\n`, path, reason fragment)
        let cases: &[(&str, &str, &str)] = &[
            ("spec: {type: Magic}", "spec.type", "unknown service type"),
            ("spec: {clusterIP: 300.1.1.1}", "spec.clusterIP", "invalid IP address"),
            ("spec: {clusterIPs: [10.0.0.1, x]}", "spec.clusterIPs[1]", "invalid IP address"),
            (
                "spec: {clusterIP: 10.0.0.1, clusterIPs: [10.0.0.2]}",
                "spec.clusterIPs[0]",
                "must equal",
            ),
            (
                "spec: {clusterIPs: [10.0.0.1, 10.0.0.2]}",
                "spec.clusterIPs[1]",
                "different IP families",
            ),
            ("spec: {clusterIPs: [None, 10.0.0.2]}", "spec.clusterIPs[0]", "only clusterIPs entry"),
            (
                "spec: {type: ExternalName, externalName: x, clusterIP: 10.0.0.1}",
                "spec.clusterIP",
                "must not have a clusterIP",
            ),
            ("spec: {type: ExternalName}", "spec", "externalName is required"),
            (
                "spec: {type: NodePort, clusterIP: None}",
                "spec.clusterIP",
                "only allowed for type ClusterIP",
            ),
            ("spec: {ports: [{port: 0}]}", "spec.ports[0].port", "out of range"),
            ("spec: {ports: [{port: 65536}]}", "spec.ports[0].port", "out of range"),
            ("spec: {ports: [{name: x}]}", "spec.ports[0].port", "missing port"),
            (
                "spec: {ports: [{port: 80, protocol: HTTP}]}",
                "spec.ports[0].protocol",
                "unknown protocol",
            ),
            (
                "spec: {ports: [{port: 80, protocol: tcp}]}",
                "spec.ports[0].protocol",
                "unknown protocol",
            ),
            (
                "spec: {ports: [{port: 80, targetPort: 0}]}",
                "spec.ports[0].targetPort",
                "targetport 0 is out of range",
            ),
            (
                "spec: {ports: [{port: 80, targetPort: 'Not_A_Name'}]}",
                "spec.ports[0].targetPort",
                "invalid targetPort",
            ),
            (
                "spec: {ports: [{port: 80, name: a}, {port: 81}]}",
                "spec.ports[1]",
                "name is required",
            ),
            (
                "spec: {ports: [{port: 80, name: a}, {port: 81, name: a}]}",
                "spec.ports[1].name",
                "duplicate port name",
            ),
            (
                "spec: {ports: [{port: 80, name: a}, {port: 80, name: b}]}",
                "spec.ports[1].port",
                "duplicate port 80/TCP",
            ),
            ("spec: {ports: [{port: 80, name: A}]}", "spec.ports[0].name", "invalid port name"),
            ("spec: {sessionAffinity: Sticky}", "spec.sessionAffinity", "unknown sessionAffinity"),
            (
                "spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                "out of range",
            ),
            (
                "spec: {internalTrafficPolicy: Nearby}",
                "spec.internalTrafficPolicy",
                "unknown internalTrafficPolicy",
            ),
            ("spec: {ipFamilies: [IPv5]}", "spec.ipFamilies[0]", "unknown IP family"),
            ("spec: {ipFamilies: [IPv4, IPv4]}", "spec.ipFamilies[1]", "duplicate IP family"),
            (
                "spec: {clusterIP: 10.0.0.1, ipFamilies: [IPv6]}",
                "spec.ipFamilies[0]",
                "does not match",
            ),
        ];
        for (spec, path, fragment) in cases {
            let err = service(&format!("metadata: {{name: a}}\n{spec}"))
                .expect_err(&format!("{spec} must be rejected"));
            assert_eq!(err.path.to_string(), *path, "{spec}: {err}");
            assert!(err.reason.to_lowercase().contains(&fragment.to_lowercase()), "{spec}: {err}");
        }
    }

    #[test]
    fn names_are_checked() {
        let cases: &[(&str, &str)] = &[
            ("{}", "missing metadata.name"),
            ("{name: ''}", "missing metadata.name"),
            ("{name: Web}", "invalid name"),
            ("{name: 1web}", "must start with a lowercase letter"),
            ("{name: web-}", "must start and end"),
            ("{name: web, namespace: Shop}", "invalid namespace"),
        ];
        for (meta, fragment) in cases {
            let err = service(&format!("metadata: {meta}")).expect_err(meta);
            assert!(err.to_string().contains(fragment), "{meta}: {err}");
        }
        let err = service("spec: {}").expect_err("no metadata");
        assert_eq!(err.to_string(), "missing metadata");
        assert!(service(&format!("metadata: {{name: {}}}", "a".repeat(64))).is_err());
        assert!(service(&format!("metadata: {{name: {}}}", "a".repeat(63))).is_ok());
    }
}
