//! Kubernetes objects into the model: the one conversion both cluster sources use. The file
//! source deserializes YAML documents into the [`wire`] shapes; the kube source moves the
//! fields of API objects into the same shapes ([`kube`]); from there [`service`],
//! [`endpoint_slice`] and [`service_export`] convert them into [`crate::model`], with the
//! validation the Kubernetes API server would apply (so a file cluster accepts what a real
//! cluster accepts) and the defaults it would fill in (so a file cluster and a kube cluster
//! export the same values for the same manifest). Pure functions: errors carry the path of the
//! offending field, and the file source turns that path into a line of the file.

pub mod endpoint_slice;
pub mod kube;
pub mod service;
pub mod service_export;
pub mod wire;

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::model::{IpFamily, Label, NameError, Protocol, ServiceKey, Subdomain};

pub use endpoint_slice::{LABEL_SLICE_SERVICE_NAME, SliceEndpoints};
pub use service::{DEFAULT_AFFINITY_TIMEOUT_SECONDS, MAX_AFFINITY_TIMEOUT_SECONDS};
pub use service_export::ExportSpec;

/// Namespace of objects that do not name one (as `kubectl apply` does).
pub const DEFAULT_NAMESPACE: &str = "default";

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

fn check_name(rule: NameRule, s: &str) -> std::result::Result<(), NameError> {
    match rule {
        NameRule::Rfc1035Label => Label::check_rfc1035(s),
        NameRule::Rfc1123Subdomain => Subdomain::check(s),
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
    Label::check(namespace).map_err(|why| {
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
    Label::check(&name)
        .map_err(|why| ConvertError::at(path, format!("invalid port name {name:?}: {why}")))?;
    Ok(Some(name))
}

/// A wire object from YAML, read as the file source reads it.
#[cfg(test)]
fn from_yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    let node = crate::yaml::parse(text).expect("test yaml is valid");
    T::deserialize(crate::yaml::NodeDe(&node)).expect("test yaml is valid")
}
