//! The request header and status byte of a tunnel stream (docs/tunnel-protocol.md).
//!
//! After the tunnel's stream-kind byte (0x02) the opener writes `version u8`, `length u16 BE`
//! and `length` bytes of TLV fields; the acceptor answers one status byte before any data.
//! Decoding is total: every byte string yields a request or a [`CodecError`], never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fedgate_discovery::model::{ClusterId, Label, Protocol, ServiceKey};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The only protocol version this gateway speaks.
pub const VERSION: u8 = 1;
/// Largest header body accepted (bytes after the length field).
pub const MAX_HEADER_LEN: usize = 1024;

const FIELD_NAMESPACE: u8 = 0x01;
const FIELD_NAME: u8 = 0x02;
const FIELD_PORT: u8 = 0x03;
const FIELD_PROTOCOL: u8 = 0x04;
const FIELD_TARGET: u8 = 0x05;
const FIELD_SOURCE_CLUSTER: u8 = 0x06;
const FIELD_TRACE_ID: u8 = 0x07;
/// Field types from this value up are extensions an acceptor may skip when it does not know
/// them; unknown types below it are malformed.
const FIELD_SKIPPABLE: u8 = 0x80;

/// The acceptor's answer, one byte, before any data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0x00,
    UnknownService = 0x01,
    NoHealthyEndpoint = 0x02,
    Forbidden = 0x03,
    UnsupportedVersion = 0x04,
    Malformed = 0x05,
    /// The acceptor is draining and takes no new streams.
    Draining = 0x06,
}

impl Status {
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0x00 => Status::Ok,
            0x01 => Status::UnknownService,
            0x02 => Status::NoHealthyEndpoint,
            0x03 => Status::Forbidden,
            0x04 => Status::UnsupportedVersion,
            0x05 => Status::Malformed,
            0x06 => Status::Draining,
            _ => return None,
        })
    }

    /// Bounded label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::UnknownService => "unknown_service",
            Status::NoHealthyEndpoint => "no_healthy_endpoint",
            Status::Forbidden => "forbidden",
            Status::UnsupportedVersion => "unsupported_version",
            Status::Malformed => "malformed",
            Status::Draining => "draining",
        }
    }
}

/// What the opener asks for: a port of an exported service, optionally one exact endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamRequest {
    pub service: ServiceKey,
    pub port: u16,
    pub protocol: Protocol,
    /// Connect exactly this endpoint (it must be an endpoint of the service), else let the
    /// acceptor choose among its healthy local endpoints.
    pub target: Option<IpAddr>,
    /// The opener's cluster, for logs (the authenticated peer id comes from the certificate).
    pub source_cluster: Option<ClusterId>,
    pub trace_id: Option<[u8; 16]>,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unsupported tunnel protocol version {0} (this gateway speaks version {VERSION})")]
    UnsupportedVersion(u8),
    #[error("tunnel header length {0} is out of range 1..={MAX_HEADER_LEN}")]
    BadHeaderLength(usize),
    #[error("tunnel header ends inside field {0:#04x}")]
    Truncated(u8),
    #[error("unknown tunnel header field {0:#04x}")]
    UnknownField(u8),
    #[error("tunnel header field {0:#04x} appears twice")]
    DuplicateField(u8),
    #[error("tunnel header field {field:#04x} has invalid length {len}")]
    BadFieldLength { field: u8, len: usize },
    #[error("tunnel header field {field}: {value:?} is not an RFC 1123 label")]
    InvalidName { field: &'static str, value: String },
    #[error("tunnel header: port must not be 0")]
    ZeroPort,
    #[error("tunnel header: unknown protocol code {0}")]
    InvalidProtocol(u8),
    #[error("tunnel header: invalid source cluster: {0}")]
    InvalidCluster(#[from] fedgate_discovery::model::InvalidClusterId),
    #[error("tunnel header lacks required field {0}")]
    MissingField(&'static str),
    #[error("reading tunnel header: {0}")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// The status to answer, or `None` when the stream itself failed and nobody is listening.
    pub fn status(&self) -> Option<Status> {
        match self {
            CodecError::UnsupportedVersion(_) => Some(Status::UnsupportedVersion),
            CodecError::Io(_) => None,
            _ => Some(Status::Malformed),
        }
    }
}

fn protocol_code(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 1,
        Protocol::Udp => 2,
        Protocol::Sctp => 3,
    }
}

fn push_field(out: &mut Vec<u8>, field: u8, value: &[u8]) -> Result<(), CodecError> {
    let len = u8::try_from(value.len())
        .map_err(|_| CodecError::BadFieldLength { field, len: value.len() })?;
    out.push(field);
    out.push(len);
    out.extend_from_slice(value);
    Ok(())
}

impl StreamRequest {
    pub fn new(service: ServiceKey, port: u16) -> Self {
        Self {
            service,
            port,
            protocol: Protocol::Tcp,
            target: None,
            source_cluster: None,
            trace_id: None,
        }
    }

    /// The whole preamble: version, length and fields (the kind byte is the tunnel's).
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        for (field, value) in [("namespace", &self.service.namespace), ("name", &self.service.name)]
        {
            if Label::check(value).is_err() {
                return Err(CodecError::InvalidName { field, value: value.clone() });
            }
        }
        if self.port == 0 {
            return Err(CodecError::ZeroPort);
        }
        let mut body = Vec::with_capacity(64);
        push_field(&mut body, FIELD_NAMESPACE, self.service.namespace.as_bytes())?;
        push_field(&mut body, FIELD_NAME, self.service.name.as_bytes())?;
        push_field(&mut body, FIELD_PORT, &self.port.to_be_bytes())?;
        push_field(&mut body, FIELD_PROTOCOL, &[protocol_code(self.protocol)])?;
        match self.target {
            Some(IpAddr::V4(ip)) => push_field(&mut body, FIELD_TARGET, &ip.octets())?,
            Some(IpAddr::V6(ip)) => push_field(&mut body, FIELD_TARGET, &ip.octets())?,
            None => {}
        }
        if let Some(c) = &self.source_cluster {
            push_field(&mut body, FIELD_SOURCE_CLUSTER, c.as_str().as_bytes())?;
        }
        if let Some(t) = &self.trace_id {
            push_field(&mut body, FIELD_TRACE_ID, t)?;
        }
        if body.len() > MAX_HEADER_LEN {
            return Err(CodecError::BadHeaderLength(body.len()));
        }
        let mut out = Vec::with_capacity(3 + body.len());
        out.push(VERSION);
        // Bounded by MAX_HEADER_LEN above, so it fits in u16.
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes a header body (the bytes after the length field).
    pub fn decode_body(body: &[u8]) -> Result<Self, CodecError> {
        if body.is_empty() || body.len() > MAX_HEADER_LEN {
            return Err(CodecError::BadHeaderLength(body.len()));
        }
        let mut namespace = None;
        let mut name = None;
        let mut port = None;
        let mut protocol = None;
        let mut target = None;
        let mut source_cluster = None;
        let mut trace_id = None;
        let mut seen = [false; 256];
        let mut rest = body;
        while let [field, tail @ ..] = rest {
            let field = *field;
            let [len, tail @ ..] = tail else { return Err(CodecError::Truncated(field)) };
            let len = usize::from(*len);
            let (value, tail) = tail.split_at_checked(len).ok_or(CodecError::Truncated(field))?;
            rest = tail;
            if std::mem::replace(&mut seen[usize::from(field)], true) {
                return Err(CodecError::DuplicateField(field));
            }
            let bad_len = || CodecError::BadFieldLength { field, len };
            match field {
                FIELD_NAMESPACE => namespace = Some(label(value, "namespace")?),
                FIELD_NAME => name = Some(label(value, "name")?),
                FIELD_PORT => {
                    let bytes: [u8; 2] = value.try_into().map_err(|_| bad_len())?;
                    let p = u16::from_be_bytes(bytes);
                    if p == 0 {
                        return Err(CodecError::ZeroPort);
                    }
                    port = Some(p);
                }
                FIELD_PROTOCOL => {
                    let [code] = value else { return Err(bad_len()) };
                    protocol = Some(match code {
                        1 => Protocol::Tcp,
                        2 => Protocol::Udp,
                        3 => Protocol::Sctp,
                        other => return Err(CodecError::InvalidProtocol(*other)),
                    });
                }
                FIELD_TARGET => {
                    target = Some(match value.len() {
                        4 => {
                            let o: [u8; 4] = value.try_into().map_err(|_| bad_len())?;
                            IpAddr::V4(Ipv4Addr::from(o))
                        }
                        16 => {
                            let o: [u8; 16] = value.try_into().map_err(|_| bad_len())?;
                            IpAddr::V6(Ipv6Addr::from(o))
                        }
                        _ => return Err(bad_len()),
                    });
                }
                FIELD_SOURCE_CLUSTER => {
                    let s = std::str::from_utf8(value).map_err(|_| bad_len())?;
                    source_cluster = Some(ClusterId::new(s)?);
                }
                FIELD_TRACE_ID => {
                    trace_id = Some(<[u8; 16]>::try_from(value).map_err(|_| bad_len())?);
                }
                f if f >= FIELD_SKIPPABLE => {}
                f => return Err(CodecError::UnknownField(f)),
            }
        }
        Ok(StreamRequest {
            service: ServiceKey::new(
                namespace.ok_or(CodecError::MissingField("namespace"))?,
                name.ok_or(CodecError::MissingField("name"))?,
            ),
            port: port.ok_or(CodecError::MissingField("port"))?,
            protocol: protocol.ok_or(CodecError::MissingField("protocol"))?,
            target,
            source_cluster,
            trace_id,
        })
    }

    /// Reads version, length and body from a stream. The caller bounds the time it waits.
    pub async fn read_from<R: AsyncRead + Unpin>(r: &mut R) -> Result<Self, CodecError> {
        let version = r.read_u8().await?;
        if version != VERSION {
            return Err(CodecError::UnsupportedVersion(version));
        }
        let len = usize::from(r.read_u16().await?);
        if len == 0 || len > MAX_HEADER_LEN {
            return Err(CodecError::BadHeaderLength(len));
        }
        let mut body = [0u8; MAX_HEADER_LEN];
        let body = &mut body[..len];
        r.read_exact(body).await?;
        Self::decode_body(body)
    }
}

fn label(value: &[u8], field: &'static str) -> Result<String, CodecError> {
    let s = String::from_utf8_lossy(value);
    if Label::check(&s).is_err() {
        return Err(CodecError::InvalidName { field, value: s.into_owned() });
    }
    Ok(s.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> StreamRequest {
        StreamRequest {
            service: ServiceKey::new("shop", "cart"),
            port: 8080,
            protocol: Protocol::Tcp,
            target: Some("10.1.2.3".parse().unwrap()),
            source_cluster: Some(ClusterId::new("east").unwrap()),
            trace_id: Some([7; 16]),
        }
    }

    #[test]
    fn roundtrip_scenarios() {
        let mut v6 = full();
        v6.target = Some("fd00::1".parse().unwrap());
        for req in [StreamRequest::new(ServiceKey::new("a", "b"), 1), full(), v6] {
            let bytes = req.encode().unwrap();
            assert_eq!(bytes[0], VERSION);
            assert_eq!(usize::from(u16::from_be_bytes([bytes[1], bytes[2]])), bytes.len() - 3);
            assert_eq!(StreamRequest::decode_body(&bytes[3..]).unwrap(), req);
        }
    }

    #[test]
    fn encode_rejects_bad_values() {
        let bad = [
            StreamRequest::new(ServiceKey::new("", "b"), 1),
            StreamRequest::new(ServiceKey::new("a", "B"), 1),
            StreamRequest::new(ServiceKey::new("a", "x".repeat(64)), 1),
            StreamRequest::new(ServiceKey::new("a", "b"), 0),
        ];
        for req in bad {
            assert!(req.encode().is_err(), "{req:?}");
        }
    }

    fn body(fields: &[(u8, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (f, v) in fields {
            out.push(*f);
            out.push(v.len() as u8);
            out.extend_from_slice(v);
        }
        out
    }

    #[test]
    fn garbage_table() {
        let ns: (u8, &[u8]) = (FIELD_NAMESPACE, b"shop");
        let name: (u8, &[u8]) = (FIELD_NAME, b"cart");
        let port: (u8, &[u8]) = (FIELD_PORT, &[0x1f, 0x90]);
        let proto: (u8, &[u8]) = (FIELD_PROTOCOL, &[1]);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "length"),
            ("one byte", vec![FIELD_NAMESPACE], "ends inside"),
            ("length past end", vec![FIELD_NAMESPACE, 9, b'a'], "ends inside"),
            ("missing name", body(&[ns, port, proto]), "required field name"),
            ("missing port", body(&[ns, name, proto]), "required field port"),
            ("missing protocol", body(&[ns, name, port]), "required field protocol"),
            ("duplicate", body(&[ns, ns, name, port, proto]), "twice"),
            ("unknown field", body(&[ns, name, port, proto, (0x42, b"x")]), "unknown"),
            ("port too short", body(&[ns, name, (FIELD_PORT, &[1]), proto]), "invalid length"),
            ("port zero", body(&[ns, name, (FIELD_PORT, &[0, 0]), proto]), "port must not be 0"),
            ("protocol 9", body(&[ns, name, port, (FIELD_PROTOCOL, &[9])]), "protocol code 9"),
            ("target 5 bytes", body(&[ns, name, port, proto, (FIELD_TARGET, &[1; 5])]), "length"),
            ("bad utf8 name", body(&[ns, (FIELD_NAME, &[0xff, 0xfe]), port, proto]), "rfc 1123"),
            ("uppercase ns", body(&[(FIELD_NAMESPACE, b"Shop"), name, port, proto]), "rfc 1123"),
            (
                "bad cluster",
                body(&[ns, name, port, proto, (FIELD_SOURCE_CLUSTER, b"-x")]),
                "source cluster",
            ),
            ("short trace", body(&[ns, name, port, proto, (FIELD_TRACE_ID, &[1; 3])]), "length"),
            ("too long", vec![0; MAX_HEADER_LEN + 1], "length"),
        ];
        for (what, bytes, expect) in cases {
            let err = StreamRequest::decode_body(&bytes).expect_err(what);
            assert!(err.to_string().to_lowercase().contains(expect), "{what}: {err}");
            assert_eq!(err.status(), Some(Status::Malformed), "{what}");
        }
    }

    #[test]
    fn skippable_extension_fields_are_ignored() {
        let mut bytes = full().encode().unwrap().split_off(3);
        bytes.extend_from_slice(&[0x90, 2, 1, 2]);
        assert_eq!(StreamRequest::decode_body(&bytes).unwrap(), full());
    }

    #[test]
    fn pseudo_random_garbage_never_panics() {
        // A small deterministic generator: every decode must return, Ok or Err.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 80) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
            let _ = StreamRequest::decode_body(&bytes);
        }
    }

    #[tokio::test]
    async fn read_from_stream_table() {
        let good = full().encode().unwrap();
        assert_eq!(StreamRequest::read_from(&mut &good[..]).await.unwrap(), full());
        let mut v2 = good.clone();
        v2[0] = 2;
        let err = StreamRequest::read_from(&mut &v2[..]).await.unwrap_err();
        assert_eq!(err.status(), Some(Status::UnsupportedVersion));
        let big = [VERSION, 0xff, 0xff];
        let err = StreamRequest::read_from(&mut &big[..]).await.unwrap_err();
        assert_eq!(err.status(), Some(Status::Malformed));
        let cut = &good[..good.len() - 1];
        let err = StreamRequest::read_from(&mut &cut[..]).await.unwrap_err();
        assert!(matches!(err, CodecError::Io(_)), "{err}");
    }

    #[test]
    fn status_bytes_roundtrip() {
        for b in 0..=255u8 {
            if let Some(s) = Status::from_byte(b) {
                assert_eq!(s as u8, b);
            }
        }
        assert_eq!(Status::from_byte(7), None);
    }
}
