//! DNS names of our two zones: building them from the model and classifying query names.
//! Pure functions only.

use std::net::IpAddr;

use fedgate_discovery::model::Label;
use hickory_proto::rr::Name;

/// One of the zones this server is authoritative for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Zone {
    /// `clusterset.local`: the whole clusterset (MCS DNS specification 1.0.0).
    ClusterSet,
    /// `cluster.local`: this cluster's own Services only.
    Cluster,
}

impl Zone {
    pub const ALL: [Zone; 2] = [Zone::ClusterSet, Zone::Cluster];

    /// The zone apex, fully qualified.
    pub fn apex(self) -> &'static str {
        match self {
            Zone::ClusterSet => "clusterset.local.",
            Zone::Cluster => "cluster.local.",
        }
    }

    /// The `zone` label value of metrics.
    pub fn label(self) -> &'static str {
        match self {
            Zone::ClusterSet => "clusterset",
            Zone::Cluster => "cluster",
        }
    }

    /// Lowercase wire form of the apex (labels, then the root's zero byte).
    pub fn apex_key(self) -> &'static [u8] {
        match self {
            Zone::ClusterSet => b"\x0aclusterset\x05local\x00",
            Zone::Cluster => b"\x07cluster\x05local\x00",
        }
    }
}

/// The lowercase uncompressed wire form of a name: the key of every table lookup, the same
/// bytes the fast path builds from a raw query.
pub fn wire_key(name: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.iter() {
        out.push(label.len() as u8);
        out.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    out.push(0);
    out
}

/// Which of our zones a lowercase wire name falls in, if any. `None` also for malformed keys.
pub fn zone_of_key(key: &[u8]) -> Option<Zone> {
    let mut at = 0usize;
    loop {
        let rest = key.get(at..)?;
        for zone in Zone::ALL {
            if rest == zone.apex_key() {
                return Some(zone);
            }
        }
        let len = *rest.first()? as usize;
        if len == 0 {
            return None;
        }
        at += 1 + len;
    }
}

/// Labels of a key, in order (leftmost first). Malformed keys yield what parses.
pub fn key_labels(key: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(&len) = key.get(at) {
        if len == 0 {
            break;
        }
        let Some(label) = key.get(at + 1..at + 1 + len as usize) else {
            break;
        };
        out.push(label);
        at += 1 + len as usize;
    }
    out
}

/// True for an RFC 1123 label: 1–63 of `a-z 0-9 -`, not starting or ending with `-`
/// (compared case-insensitively; we serve lowercase).
pub fn is_dns_label(s: &str) -> bool {
    Label::check_ignoring_case(s).is_ok()
}

/// True for a DNS-SD style service label such as a Kubernetes port name (`http`, `grpc-web`):
/// like a DNS label, used after a leading `_`.
pub fn is_port_label(s: &str) -> bool {
    is_dns_label(s) && s.len() < 63
}

/// The per-host label of an endpoint that has no usable hostname: its address with `.` and
/// `:` replaced by `-` (`10-1-2-3`, `fd00--1`), the convention of CoreDNS and kube-dns.
/// Stable as long as the endpoint keeps its address, and unique within a cluster.
pub fn generated_hostname(ip: IpAddr) -> String {
    let text = ip.to_string().replace(['.', ':'], "-");
    // `::1` gives `--1`: keep it a valid label.
    let text = text.trim_matches('-').to_owned();
    if text.is_empty() { "0".to_owned() } else { text }
}

/// The per-host label of an endpoint: its hostname when that is a valid label, else a
/// generated one.
pub fn host_label(hostname: Option<&str>, ip: IpAddr) -> String {
    match hostname {
        Some(h) if is_dns_label(h) => h.to_ascii_lowercase(),
        _ => generated_hostname(ip),
    }
}

/// Builds a fully qualified lowercase name from labels under `zone`. Fails on labels that do
/// not fit DNS limits (the caller skips the name).
pub fn name_in(labels: &[&str], zone: Zone) -> Option<Name> {
    let mut text = String::with_capacity(64);
    for label in labels {
        if label.is_empty() || label.len() > 63 || label.contains('.') {
            return None;
        }
        text.push_str(&label.to_ascii_lowercase());
        text.push('.');
    }
    text.push_str(zone.apex());
    if text.len() > 254 {
        return None;
    }
    Name::from_ascii(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> Vec<u8> {
        wire_key(&Name::from_ascii(text).expect("name"))
    }

    #[test]
    fn zones_of_names() {
        let cases = [
            ("clusterset.local.", Some(Zone::ClusterSet)),
            ("A.B.svc.ClusterSet.LOCAL.", Some(Zone::ClusterSet)),
            ("x.svc.cluster.local.", Some(Zone::Cluster)),
            ("cluster.local.example.", None),
            ("myclusterset.local.", None),
            ("local.", None),
            ("example.com.", None),
            (".", None),
        ];
        for (name, want) in cases {
            assert_eq!(zone_of_key(&key(name)), want, "{name}");
        }
        assert_eq!(zone_of_key(b"\x05ab"), None);
        assert_eq!(zone_of_key(b""), None);
    }

    #[test]
    fn wire_keys_are_lowercase_and_labels_split() {
        assert_eq!(key("Ab.C."), b"\x02ab\x01c\x00".to_vec());
        assert_eq!(key_labels(&key("a.bb.c.")), vec![&b"a"[..], b"bb", b"c"]);
        assert_eq!(key_labels(b"\x09ab"), Vec::<&[u8]>::new());
    }

    #[test]
    fn host_labels() {
        let cases = [
            (Some("web-0"), "10.0.0.1", "web-0"),
            (Some("Web-0"), "10.0.0.1", "web-0"),
            (None, "10.1.2.3", "10-1-2-3"),
            (Some("bad_name"), "10.1.2.3", "10-1-2-3"),
            (Some(""), "fd00::1", "fd00--1"),
            (None, "::1", "1"),
        ];
        for (h, ip, want) in cases {
            assert_eq!(host_label(h, ip.parse().expect("ip")), want, "{h:?} {ip}");
        }
    }

    #[test]
    fn labels_and_names() {
        assert!(is_dns_label("a-1"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(!is_dns_label("a.b"));
        let n = name_in(&["Web", "ns", "svc"], Zone::ClusterSet).expect("name");
        assert_eq!(n.to_ascii(), "web.ns.svc.clusterset.local.");
        assert!(name_in(&["a.b"], Zone::Cluster).is_none());
        let long = "a".repeat(63);
        assert!(name_in(&[&long, &long, &long, &long], Zone::Cluster).is_none());
    }
}
