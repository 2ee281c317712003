//! DNS names, checked once for every part of fedgate: an RFC 1123 label ([`Label`]: cluster
//! ids, namespaces, port names, hostnames, the names in a tunnel header, the labels DNS
//! serves), the stricter RFC 1035 label Kubernetes wants for Service names
//! ([`Label::check_rfc1035`]), and an RFC 1123 subdomain ([`Subdomain`]: EndpointSlice names,
//! peer host names, label key prefixes). And a gateway's identity, the SPIFFE id
//! `spiffe://<clusterset>/cluster/<cluster id>` ([`SpiffeId`]) that `fedgate certs` writes and
//! the tunnel checks. Re-exported by [`crate::model`].

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::ClusterId;

/// The string conversions every checked name shares: shown as its text, parsed with
/// `FromStr` and deserialized (`TryFrom<String>`) through its checking `new`, serialized as
/// its text.
macro_rules! name_conversions {
    ($name:ident, $error:ty) => {
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = $error;
            fn from_str(s: &str) -> Result<Self, $error> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = $error;
            fn try_from(s: String) -> Result<Self, $error> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0.to_string()
            }
        }
    };
}
pub(crate) use name_conversions;

/// Longest DNS label.
pub const MAX_LABEL_LEN: usize = 63;
/// Longest DNS subdomain (dotted name).
pub const MAX_SUBDOMAIN_LEN: usize = 253;

/// Why a string is not a valid DNS name. The message says what the rule is; callers put the
/// field and the value in front (`invalid namespace "Shop": may contain only …`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameError {
    Empty,
    LabelTooLong,
    Character,
    Edge,
    NotLetterFirst,
    SubdomainTooLong,
}

impl NameError {
    /// The message, also for errors that keep a `&'static str` reason.
    pub fn reason(self) -> &'static str {
        match self {
            NameError::Empty => "must not be empty",
            NameError::LabelTooLong => "must be at most 63 characters (an RFC 1123 label)",
            NameError::Character => {
                "may contain only lowercase letters, digits and '-' (an RFC 1123 label)"
            }
            NameError::Edge => "must start and end with a letter or digit (an RFC 1123 label)",
            NameError::NotLetterFirst => "must start with a lowercase letter (an RFC 1035 label)",
            NameError::SubdomainTooLong => "must be at most 253 characters (an RFC 1123 subdomain)",
        }
    }
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for NameError {}

fn check_label(s: &str, upper_ok: bool) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > MAX_LABEL_LEN {
        return Err(NameError::LabelTooLong);
    }
    let allowed = |b: u8| {
        b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || b == b'-'
            || (upper_ok && b.is_ascii_uppercase())
    };
    if !s.bytes().all(allowed) {
        return Err(NameError::Character);
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(NameError::Edge);
    }
    Ok(())
}

/// An RFC 1123 DNS label: 1–63 of `a-z 0-9 -`, starting and ending with a letter or digit.
/// Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Label(Arc<str>);

impl Label {
    pub fn new(value: impl AsRef<str>) -> Result<Self, NameError> {
        let value = value.as_ref();
        Self::check(value)?;
        Ok(Self(value.into()))
    }

    /// Whether `s` is an RFC 1123 label, and if not, why.
    pub fn check(s: &str) -> Result<(), NameError> {
        check_label(s, false)
    }

    /// As [`check`](Self::check), uppercase letters allowed (DNS compares names ignoring
    /// ASCII case).
    pub fn check_ignoring_case(s: &str) -> Result<(), NameError> {
        check_label(s, true)
    }

    /// An RFC 1035 label: an RFC 1123 label that starts with a letter (Kubernetes Service
    /// names, which become DNS labels).
    pub fn check_rfc1035(s: &str) -> Result<(), NameError> {
        match Self::check(s) {
            // a leading '-' breaks both rules: name the stricter one
            Ok(()) | Err(NameError::Edge) if !s.as_bytes()[0].is_ascii_lowercase() => {
                Err(NameError::NotLetterFirst)
            }
            other => other,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Label {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Label {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Label {
    fn borrow(&self) -> &str {
        &self.0
    }
}

name_conversions!(Label, NameError);

impl TryFrom<&str> for Label {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

/// An RFC 1123 DNS subdomain: dot-separated [`Label`]s, at most 253 characters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subdomain(Arc<str>);

impl Subdomain {
    pub fn new(value: impl AsRef<str>) -> Result<Self, NameError> {
        let value = value.as_ref();
        Self::check(value)?;
        Ok(Self(value.into()))
    }

    /// Whether `s` is an RFC 1123 subdomain, and if not, why (an empty label between two dots
    /// is [`NameError::Empty`]).
    pub fn check(s: &str) -> Result<(), NameError> {
        if s.len() > MAX_SUBDOMAIN_LEN {
            return Err(NameError::SubdomainTooLong);
        }
        s.split('.').try_for_each(Label::check)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Subdomain {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

name_conversions!(Subdomain, NameError);

impl TryFrom<&str> for Subdomain {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

/// Longest SPIFFE trust domain.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A gateway's SPIFFE id: `spiffe://<trust domain>/cluster/<cluster id>`, the trust domain
/// being the clusterset's name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub cluster: ClusterId,
}

/// Why a URI is not a gateway's SPIFFE id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("{0} is not a spiffe:// URI")]
    NotSpiffe(String),
    #[error("{uri}: invalid trust domain: {reason}")]
    TrustDomain { uri: String, reason: &'static str },
    #[error("{0} is not of the form spiffe://<clusterset>/cluster/<id>")]
    NotAGateway(String),
}

impl SpiffeId {
    /// The scheme every SPIFFE id starts with.
    pub const SCHEME: &'static str = "spiffe://";

    pub fn new(trust_domain: impl Into<String>, cluster: ClusterId) -> Self {
        Self { trust_domain: trust_domain.into(), cluster }
    }

    /// Parses `spiffe://<trust domain>/cluster/<cluster id>`.
    pub fn parse(uri: &str) -> Result<Self, SpiffeError> {
        let rest =
            uri.strip_prefix(Self::SCHEME).ok_or_else(|| SpiffeError::NotSpiffe(uri.into()))?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        Self::check_trust_domain(trust_domain)
            .map_err(|reason| SpiffeError::TrustDomain { uri: uri.into(), reason })?;
        let cluster = path
            .strip_prefix("cluster/")
            .and_then(|id| ClusterId::new(id).ok())
            .ok_or_else(|| SpiffeError::NotAGateway(uri.into()))?;
        Ok(Self { trust_domain: trust_domain.to_owned(), cluster })
    }

    /// The trust domain a `spiffe://` URI names (a gateway's id or a CA's bare
    /// `spiffe://<clusterset>`); `None` for other URIs or an empty trust domain.
    pub fn trust_domain_of(uri: &str) -> Option<&str> {
        let rest = uri.strip_prefix(Self::SCHEME)?;
        let domain = rest.split('/').next()?;
        (!domain.is_empty()).then_some(domain)
    }

    /// The bare URI of a trust domain, `spiffe://<trust domain>` (a CA's SAN).
    pub fn trust_domain_uri(trust_domain: &str) -> String {
        format!("{}{trust_domain}", Self::SCHEME)
    }

    /// Whether `name` can be a trust domain (a clusterset name): lowercase letters, digits,
    /// `-`, `.` and `_`, at most [`MAX_TRUST_DOMAIN_LEN`] characters.
    pub fn check_trust_domain(name: &str) -> Result<(), &'static str> {
        if name.is_empty() {
            return Err("must not be empty");
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err("must be at most 255 characters (a SPIFFE trust domain)");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(
                "may contain only lowercase letters, digits, '-', '.' and '_' (a SPIFFE trust domain)",
            );
        }
        Ok(())
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}/cluster/{}", Self::SCHEME, self.trust_domain, self.cluster)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, SpiffeError> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        let long = "a".repeat(63);
        let too_long = "a".repeat(64);
        // (name, RFC 1123 label, ignoring case, RFC 1035 label)
        type Check = Result<(), NameError>;
        let cases: &[(&str, Check, Check, Check)] = &[
            ("a", Ok(()), Ok(()), Ok(())),
            ("web-1", Ok(()), Ok(()), Ok(())),
            ("0", Ok(()), Ok(()), Err(NameError::NotLetterFirst)),
            ("1web", Ok(()), Ok(()), Err(NameError::NotLetterFirst)),
            ("a--b", Ok(()), Ok(()), Ok(())),
            (&long, Ok(()), Ok(()), Ok(())),
            ("", Err(NameError::Empty), Err(NameError::Empty), Err(NameError::Empty)),
            (
                &too_long,
                Err(NameError::LabelTooLong),
                Err(NameError::LabelTooLong),
                Err(NameError::LabelTooLong),
            ),
            ("Web", Err(NameError::Character), Ok(()), Err(NameError::Character)),
            (
                "East_1",
                Err(NameError::Character),
                Err(NameError::Character),
                Err(NameError::Character),
            ),
            (
                "a.b",
                Err(NameError::Character),
                Err(NameError::Character),
                Err(NameError::Character),
            ),
            ("ä", Err(NameError::Character), Err(NameError::Character), Err(NameError::Character)),
            ("-a", Err(NameError::Edge), Err(NameError::Edge), Err(NameError::NotLetterFirst)),
            ("a-", Err(NameError::Edge), Err(NameError::Edge), Err(NameError::Edge)),
        ];
        for (name, label, ignoring_case, rfc1035) in cases {
            assert_eq!(Label::check(name), *label, "{name:?}");
            assert_eq!(Label::check_ignoring_case(name), *ignoring_case, "{name:?}");
            assert_eq!(Label::check_rfc1035(name), *rfc1035, "{name:?}");
            assert_eq!(Label::new(name).map(|l| l.to_string()), label.map(|()| name.to_string()));
        }
    }

    #[test]
    fn subdomains() {
        let max = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
        assert_eq!(max.len(), 253);
        let cases: &[(&str, Result<(), NameError>)] = &[
            ("a", Ok(())),
            ("web-abc12", Ok(())),
            ("east.example.com", Ok(())),
            (&max, Ok(())),
            (&format!("{max}e"), Err(NameError::SubdomainTooLong)),
            ("", Err(NameError::Empty)),
            ("s..x", Err(NameError::Empty)),
            ("a.", Err(NameError::Empty)),
            ("Example.com", Err(NameError::Character)),
            ("a.-b", Err(NameError::Edge)),
        ];
        for (name, want) in cases {
            assert_eq!(Subdomain::check(name), *want, "{name:?}");
            assert_eq!(Subdomain::new(name).is_ok(), want.is_ok(), "{name:?}");
        }
    }

    #[test]
    fn serde_round_trip() {
        let l: Label = serde_json::from_str("\"east\"").expect("valid");
        assert_eq!(&*l, "east");
        assert_eq!(serde_json::to_string(&l).expect("json"), "\"east\"");
        let err = serde_json::from_str::<Label>("\"East\"").expect_err("invalid");
        assert!(err.to_string().contains("lowercase letters"), "{err}");
        let s: Subdomain = "a.b".parse().expect("valid");
        assert_eq!(s.as_str(), "a.b");
    }

    #[test]
    fn spiffe_ids() {
        let east = ClusterId::new("east").expect("id");
        let id = SpiffeId::new("demo", east.clone());
        assert_eq!(id.to_string(), "spiffe://demo/cluster/east");
        assert_eq!(SpiffeId::parse("spiffe://demo/cluster/east"), Ok(id.clone()));
        assert_eq!(
            "spiffe://my.set_1/cluster/east".parse::<SpiffeId>().map(|i| i.trust_domain),
            Ok("my.set_1".to_owned())
        );
        for (uri, want) in [
            (
                "https://demo/cluster/east",
                SpiffeError::NotSpiffe("https://demo/cluster/east".into()),
            ),
            ("spiffe://demo/node/east", SpiffeError::NotAGateway("spiffe://demo/node/east".into())),
            (
                "spiffe://demo/cluster/East",
                SpiffeError::NotAGateway("spiffe://demo/cluster/East".into()),
            ),
            (
                "spiffe://demo/cluster/east/x",
                SpiffeError::NotAGateway("spiffe://demo/cluster/east/x".into()),
            ),
            ("spiffe://demo", SpiffeError::NotAGateway("spiffe://demo".into())),
            (
                "spiffe://Demo/cluster/east",
                SpiffeError::TrustDomain {
                    uri: "spiffe://Demo/cluster/east".into(),
                    reason: "may contain only lowercase letters, digits, '-', '.' and '_' (a SPIFFE trust domain)",
                },
            ),
            (
                "spiffe:///cluster/east",
                SpiffeError::TrustDomain {
                    uri: "spiffe:///cluster/east".into(),
                    reason: "must not be empty",
                },
            ),
        ] {
            assert_eq!(SpiffeId::parse(uri), Err(want), "{uri}");
        }
        assert_eq!(SpiffeId::trust_domain_of("spiffe://demo"), Some("demo"));
        assert_eq!(SpiffeId::trust_domain_of("spiffe://demo/cluster/east"), Some("demo"));
        assert_eq!(SpiffeId::trust_domain_of("spiffe://"), None);
        assert_eq!(SpiffeId::trust_domain_of("http://demo"), None);
        assert_eq!(SpiffeId::trust_domain_uri("demo"), "spiffe://demo");
        assert!(SpiffeId::check_trust_domain(&"a".repeat(255)).is_ok());
        assert!(SpiffeId::check_trust_domain(&"a".repeat(256)).is_err());
    }
}
