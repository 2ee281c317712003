//! DNS names of our zones: building them from the model and classifying query names.
//! Pure functions only.

use std::net::IpAddr;

use fedgate_discovery::model::Label;
use hickory_proto::rr::Name;
use ipnet::IpNet;

/// One of the zones this server answers from its table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Zone {
    /// `clusterset.local`: the whole clusterset (MCS DNS specification 1.0.0).
    ClusterSet,
    /// `cluster.local`: this cluster's own Services only.
    Cluster,
    /// `in-addr.arpa`: PTR records of the addresses our forward zones answer. Only those
    /// names and the ClusterSetIP range are ours; every other reverse name is forwarded
    /// (docs/dns.md, "Reverse lookups").
    ReverseV4,
    /// `ip6.arpa`: as [`Zone::ReverseV4`], for IPv6.
    ReverseV6,
}

impl Zone {
    /// The forward zones: authoritative for every name under their apex.
    pub const ALL: [Zone; 2] = [Zone::ClusterSet, Zone::Cluster];
    /// The reverse zones: authoritative only for the names we hold and our address range.
    pub const REVERSE: [Zone; 2] = [Zone::ReverseV4, Zone::ReverseV6];
    /// How many zones there are ([`Zone::index`] is below it).
    pub const COUNT: usize = 4;

    /// The zone apex, fully qualified.
    pub fn apex(self) -> &'static str {
        match self {
            Zone::ClusterSet => "clusterset.local.",
            Zone::Cluster => "cluster.local.",
            Zone::ReverseV4 => "in-addr.arpa.",
            Zone::ReverseV6 => "ip6.arpa.",
        }
    }

    /// The `zone` label value of metrics.
    pub fn label(self) -> &'static str {
        match self {
            Zone::ClusterSet => "clusterset",
            Zone::Cluster => "cluster",
            Zone::ReverseV4 | Zone::ReverseV6 => "reverse",
        }
    }

    /// Position of the zone in per-zone arrays (SOA records, metrics).
    pub fn index(self) -> usize {
        match self {
            Zone::ClusterSet => 0,
            Zone::Cluster => 1,
            Zone::ReverseV4 => 2,
            Zone::ReverseV6 => 3,
        }
    }

    /// Lowercase wire form of the apex (labels, then the root's zero byte).
    pub fn apex_key(self) -> &'static [u8] {
        match self {
            Zone::ClusterSet => b"\x0aclusterset\x05local\x00",
            Zone::Cluster => b"\x07cluster\x05local\x00",
            Zone::ReverseV4 => b"\x07in-addr\x04arpa\x00",
            Zone::ReverseV6 => b"\x03ip6\x04arpa\x00",
        }
    }

    /// The reverse zone of an address's family.
    pub fn reverse_of(ip: IpAddr) -> Zone {
        match ip {
            IpAddr::V4(_) => Zone::ReverseV4,
            IpAddr::V6(_) => Zone::ReverseV6,
        }
    }
}

/// The reverse name of an address (`4.3.2.1.in-addr.arpa.`, nibbles under `ip6.arpa.`).
pub fn reverse_name(ip: IpAddr) -> Name {
    let mut name = Name::from(ip);
    name.set_fqdn(true);
    name
}

/// Which reverse zone a lowercase wire name falls in, if any.
pub fn reverse_zone_of_key(key: &[u8]) -> Option<Zone> {
    Zone::REVERSE.into_iter().find(|z| key.ends_with(z.apex_key()) && is_subname_key(key, *z))
}

/// Whether `key` is `zone`'s apex or below it at a label boundary (not `xin-addr.arpa.`).
fn is_subname_key(key: &[u8], zone: Zone) -> bool {
    let mut at = 0usize;
    loop {
        let Some(rest) = key.get(at..) else { return false };
        if rest == zone.apex_key() {
            return true;
        }
        let Some(&len) = rest.first() else { return false };
        if len == 0 {
            return false;
        }
        at += 1 + usize::from(len);
    }
}

/// What a reverse name without records of ours is, given the ranges we own (the ClusterSetIP
/// range): a whole address in a range does not exist (NXDOMAIN); a shorter name inside a
/// range may be an empty non-terminal above our records (NODATA); anything else is not ours
/// (forwarded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReverseMiss {
    NxDomain,
    NoData,
    NotOurs,
}

/// Classifies a reverse `name` we hold no records for ([`ReverseMiss`]).
pub fn reverse_miss(name: &Name, owned: &[IpNet]) -> ReverseMiss {
    let Ok(net) = name.parse_arpa_name() else { return ReverseMiss::NotOurs };
    let full = net.prefix_len() == net.max_prefix_len();
    let inside = owned
        .iter()
        .any(|range| net.prefix_len() >= range.prefix_len() && range.contains(&net.network()));
    match (inside, full) {
        (false, _) => ReverseMiss::NotOurs,
        (true, true) => ReverseMiss::NxDomain,
        (true, false) => ReverseMiss::NoData,
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
    fn reverse_names_and_misses() {
        let v4 = reverse_name("242.1.0.7".parse().expect("ip"));
        assert_eq!(v4.to_ascii(), "7.0.1.242.in-addr.arpa.");
        let v6 = reverse_name("fd00::1".parse().expect("ip"));
        assert!(v6.to_ascii().ends_with(".0.0.d.f.ip6.arpa."), "{v6}");
        assert_eq!(v6.num_labels(), 34);
        assert_eq!(reverse_zone_of_key(&wire_key(&v4)), Some(Zone::ReverseV4));
        assert_eq!(reverse_zone_of_key(&wire_key(&v6)), Some(Zone::ReverseV6));
        assert_eq!(reverse_zone_of_key(&key("xin-addr.arpa.")), None);
        assert_eq!(reverse_zone_of_key(&key("web.clusterset.local.")), None);
        assert_eq!(zone_of_key(&wire_key(&v4)), None, "reverse names are not forward names");

        let owned: Vec<IpNet> =
            vec!["242.1.0.0/16".parse().expect("net"), "fd00:242::/64".parse().expect("net")];
        let cases = [
            ("9.9.1.242.in-addr.arpa.", ReverseMiss::NxDomain),
            ("9.1.242.in-addr.arpa.", ReverseMiss::NoData),
            ("1.242.in-addr.arpa.", ReverseMiss::NoData),
            ("242.in-addr.arpa.", ReverseMiss::NotOurs),
            ("1.0.0.10.in-addr.arpa.", ReverseMiss::NotOurs),
            ("in-addr.arpa.", ReverseMiss::NotOurs),
            ("x.1.242.in-addr.arpa.", ReverseMiss::NotOurs),
            ("1.2.3.4.5.in-addr.arpa.", ReverseMiss::NotOurs),
            ("example.com.", ReverseMiss::NotOurs),
        ];
        for (name, want) in cases {
            let name = Name::from_ascii(name).expect("name");
            assert_eq!(reverse_miss(&name, &owned), want, "{name}");
        }
        let in_v6 = reverse_name("fd00:242::9".parse().expect("ip"));
        assert_eq!(reverse_miss(&in_v6, &owned), ReverseMiss::NxDomain);
        let out_v6 = reverse_name("fd00:243::9".parse().expect("ip"));
        assert_eq!(reverse_miss(&out_v6, &owned), ReverseMiss::NotOurs);
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
