//! Conversion of the YAML objects ([`super::wire`]) into the model, with the validation the
//! Kubernetes API server would apply (so a file cluster accepts what a real cluster accepts)
//! and the defaults it would fill in (so a file cluster and a kube cluster export the same
//! values for the same manifest). Pure functions: errors carry the path of the offending
//! field, and the parser turns that path into a line of the file.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::model::{
    Endpoint, EndpointPort, Health, IpFamily, LocalService, Protocol, ServiceExportObject,
    ServiceKey, ServicePort, SessionAffinity, TargetPort,
};

use super::wire;

/// Namespace of objects that do not name one (as `kubectl apply` does).
pub const DEFAULT_NAMESPACE: &str = "default";
/// Label that ties an EndpointSlice to its Service.
pub const LABEL_SLICE_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when ClientIP affinity names none (the
/// API server's default: 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: i32 = 10_800;
/// Largest ClientIP affinity timeout the API server accepts (1 day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: i64 = 86_400;

/// One step of a path into a YAML document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(Cow<'static, str>),
    Index(usize),
}

/// A path to a field, e.g. `spec.ports[1].protocol`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Seg>);

impl FieldPath {
    fn of(segs: &[Seg]) -> Self {
        Self(segs.to_vec())
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if k.contains(['.', '/']) => write!(f, "[{k:?}]")?,
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

fn fld(k: &'static str) -> Seg {
    Seg::Key(Cow::Borrowed(k))
}

/// Why an object cannot be converted, and where in the document.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConvertError {
    pub path: FieldPath,
    pub reason: String,
}

impl fmt::Display for ConvertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.0.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

impl ConvertError {
    fn at(path: &[Seg], reason: impl Into<String>) -> Self {
        Self { path: FieldPath::of(path), reason: reason.into() }
    }

    /// The same error seen from an enclosing object (`prefix` leads to the converted value).
    fn within(mut self, prefix: &[Seg]) -> Self {
        let mut segs = prefix.to_vec();
        segs.append(&mut self.path.0);
        self.path = FieldPath(segs);
        self
    }
}

type Result<T> = std::result::Result<T, ConvertError>;

// ---------------------------------------------------------------------------------------
// names

#[derive(Clone, Copy)]
enum NameRule {
    /// RFC 1035 label: Service names (they become DNS labels and must start with a letter).
    Rfc1035Label,
    /// RFC 1123 subdomain: EndpointSlice names.
    Rfc1123Subdomain,
}

fn check_label(s: &str, must_start_with_letter: bool) -> std::result::Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > 63 {
        return Err("must be at most 63 characters (a DNS label)");
    }
    if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err("may contain only lowercase letters, digits and '-' (a DNS label)");
    }
    if must_start_with_letter && !s.as_bytes()[0].is_ascii_lowercase() {
        return Err("must start with a lowercase letter (an RFC 1035 label)");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit (a DNS label)");
    }
    Ok(())
}

fn check_subdomain(s: &str) -> std::result::Result<(), &'static str> {
    if s.len() > 253 {
        return Err("must be at most 253 characters (a DNS subdomain)");
    }
    s.split('.').try_for_each(|label| check_label(label, false))
}

fn check_name(rule: NameRule, s: &str) -> std::result::Result<(), &'static str> {
    match rule {
        NameRule::Rfc1035Label => check_label(s, true),
        NameRule::Rfc1123Subdomain => check_subdomain(s),
    }
}

fn object_key(meta: Option<&wire::ObjectMeta>, rule: NameRule) -> Result<ServiceKey> {
    let Some(meta) = meta else {
        return Err(ConvertError::at(&[], "missing metadata"));
    };
    let name = match meta.name.as_deref() {
        None | Some("") => {
            return Err(ConvertError::at(&[fld("metadata")], "missing metadata.name"));
        }
        Some(n) => n,
    };
    check_name(rule, name).map_err(|why| {
        ConvertError::at(&[fld("metadata"), fld("name")], format!("invalid name {name:?}: {why}"))
    })?;
    let namespace = match meta.namespace.as_deref() {
        None | Some("") => DEFAULT_NAMESPACE,
        Some(ns) => ns,
    };
    check_label(namespace, false).map_err(|why| {
        ConvertError::at(
            &[fld("metadata"), fld("namespace")],
            format!("invalid namespace {namespace:?}: {why}"),
        )
    })?;
    Ok(ServiceKey::new(namespace, name))
}

// ---------------------------------------------------------------------------------------
// small fields

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

fn parse_ip(s: &str, path: &[Seg]) -> Result<IpAddr> {
    IpAddr::from_str(s).map_err(|_| ConvertError::at(path, format!("invalid IP address {s:?}")))
}

fn family_of(ip: &IpAddr) -> IpFamily {
    match ip {
        IpAddr::V4(_) => IpFamily::IPv4,
        IpAddr::V6(_) => IpFamily::IPv6,
    }
}

fn parse_port(p: Option<i64>, path: &[Seg]) -> Result<u16> {
    let Some(p) = p else {
        return Err(ConvertError::at(path, "missing port"));
    };
    match u16::try_from(p) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(ConvertError::at(path, format!("port {p} is out of range (1-65535)"))),
    }
}

fn parse_protocol(p: Option<&str>, path: &[Seg]) -> Result<Protocol> {
    match p {
        None | Some("") => Ok(Protocol::Tcp),
        Some(p) => Protocol::from_str(p).map_err(|why| ConvertError::at(path, why)),
    }
}

fn parse_port_name(name: Option<String>, path: &[Seg]) -> Result<Option<String>> {
    let Some(name) = non_empty(name) else { return Ok(None) };
    check_label(&name, false)
        .map_err(|why| ConvertError::at(path, format!("invalid port name {name:?}: {why}")))?;
    Ok(Some(name))
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

// ---------------------------------------------------------------------------------------
// Service

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

// ---------------------------------------------------------------------------------------
// EndpointSlice

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
        check_label(service_name, true).map_err(|why| {
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

        let mut endpoints = Vec::new();
        for (i, e) in slice.endpoints.unwrap_or_default().into_iter().enumerate() {
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
            check_label(h, false).map_err(|why| {
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

// ---------------------------------------------------------------------------------------
// ServiceExport

/// A ServiceExport before its creation time is settled: a file may leave
/// `metadata.creationTimestamp` out, and the source then stamps the file's mtime at first sight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    pub key: ServiceKey,
    pub created: Option<jiff::Timestamp>,
    pub exported_labels: BTreeMap<String, String>,
    pub exported_annotations: BTreeMap<String, String>,
}

impl ExportSpec {
    /// The model object, with `first_seen` as the creation time when the file names none.
    pub fn into_object(self, first_seen: jiff::Timestamp) -> ServiceExportObject {
        ServiceExportObject {
            key: self.key,
            created: self.created.unwrap_or(first_seen),
            exported_labels: self.exported_labels,
            exported_annotations: self.exported_annotations,
        }
    }
}

impl TryFrom<wire::ServiceExport> for ExportSpec {
    type Error = ConvertError;

    fn try_from(export: wire::ServiceExport) -> Result<Self> {
        let key = object_key(export.metadata.as_ref(), NameRule::Rfc1035Label)?;
        let created = match export.metadata.and_then(|m| non_empty(m.creation_timestamp)) {
            None => None,
            Some(s) => Some(jiff::Timestamp::from_str(&s).map_err(|e| {
                ConvertError::at(
                    &[fld("metadata"), fld("creationTimestamp")],
                    format!(
                        "invalid creationTimestamp {s:?}: {e} (expected RFC 3339, e.g. \
                         2026-01-31T12:00:00Z)"
                    ),
                )
            })?),
        };
        let spec = export.spec.unwrap_or_default();
        let exported_labels = spec.exported_labels.unwrap_or_default();
        let exported_annotations = spec.exported_annotations.unwrap_or_default();
        check_keys(&exported_labels, "exportedLabels")?;
        check_keys(&exported_annotations, "exportedAnnotations")?;
        Ok(ExportSpec { key, created, exported_labels, exported_annotations })
    }
}

/// Label and annotation keys must be non-empty (`[prefix/]name`); values are free-form here.
fn check_keys(map: &BTreeMap<String, String>, field: &'static str) -> Result<()> {
    for k in map.keys() {
        let name = k.rsplit_once('/').map_or(k.as_str(), |(_, n)| n);
        if name.is_empty() {
            return Err(ConvertError::at(
                &[fld("spec"), fld(field)],
                format!("invalid key {k:?}: the name part must not be empty"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Result<LocalService> {
        let wire: wire::Service = serde_norway::from_str(yaml).expect("test yaml is valid");
        LocalService::try_from(wire)
    }

    fn slice(yaml: &str) -> Result<SliceEndpoints> {
        let wire: wire::EndpointSlice = serde_norway::from_str(yaml).expect("test yaml is valid");
        SliceEndpoints::try_from(wire)
    }

    fn export(yaml: &str) -> Result<ExportSpec> {
        let wire: wire::ServiceExport = serde_norway::from_str(yaml).expect("test yaml is valid");
        ExportSpec::try_from(wire)
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

    #[test]
    fn export_fields_and_timestamps() {
        let got = export(
            "metadata: {name: web, namespace: shop, creationTimestamp: '2026-01-02T03:04:05Z'}
spec:
  exportedLabels: {tier: gold}
  exportedAnnotations: {example.com/owner: team-a}
",
        )
        .expect("valid export");
        assert_eq!(got.key, ServiceKey::new("shop", "web"));
        let ts: jiff::Timestamp = "2026-01-02T03:04:05Z".parse().expect("timestamp");
        assert_eq!(got.created, Some(ts));
        let fallback: jiff::Timestamp = "2020-01-01T00:00:00Z".parse().expect("timestamp");
        let obj = got.into_object(fallback);
        assert_eq!(obj.created, ts);
        assert_eq!(obj.exported_labels.get("tier").map(String::as_str), Some("gold"));
        assert_eq!(
            obj.exported_annotations.get("example.com/owner").map(String::as_str),
            Some("team-a")
        );

        let bare = export("metadata: {name: web}").expect("valid export");
        assert_eq!(bare.created, None);
        assert_eq!(bare.into_object(fallback).created, fallback);

        let offset =
            export("metadata: {name: web, creationTimestamp: '2026-01-02T05:04:05+02:00'}")
                .expect("offsets are RFC 3339 too");
        assert_eq!(offset.created, Some(ts));

        for (yaml, path) in [
            (
                "metadata: {name: web, creationTimestamp: '2026-13-01T00:00:00Z'}",
                "metadata.creationTimestamp",
            ),
            (
                "metadata: {name: web, creationTimestamp: 'Jan 1 2026'}",
                "metadata.creationTimestamp",
            ),
            ("metadata: {name: web}\nspec: {exportedLabels: {'x/': y}}", "spec.exportedLabels"),
            ("metadata: {name: Web}", "metadata.name"),
        ] {
            let err = export(yaml).expect_err(yaml);
            assert_eq!(err.path.to_string(), path, "{yaml}: {err}");
        }
    }
}
