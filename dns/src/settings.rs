//! What the DNS server needs from the configuration. The composition root maps the `dns:` and
//! `traffic:` sections of the config into [`DnsSettings`]; nothing here reads files or the
//! environment except [`Upstream::System`], which reads `/etc/resolv.conf` when the server is
//! built.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fedgate_discovery::model::{LABEL_REGION, LABEL_SOURCE_CLUSTER, LABEL_ZONE};

use crate::error::DnsError;

/// TTL of every record we serve (and of the negative answers' SOA) unless configured.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);
/// How long a forwarded query may take, all upstreams and retries included, before the client
/// gets SERVFAIL.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Entries in the cache of forwarded answers.
pub const DEFAULT_CACHE_ENTRIES: usize = 10_000;
/// Slow-path queries (forwarded or unusual) in flight at once; beyond it clients get SERVFAIL
/// at once rather than silence. Each forwarded query holds one UDP socket, so this also
/// bounds file descriptors.
pub const DEFAULT_MAX_INFLIGHT: usize = 1_024;
/// How long an idle TCP client connection is kept.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP client connections served at once; more are closed at once and counted. Resolvers
/// open few (RFC 7766 lets them keep one open and pipeline), so this only bites on abuse.
pub const DEFAULT_MAX_TCP_CONNECTIONS: usize = 512;
/// Path of the system resolver configuration read for [`Upstream::System`].
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// One entry of the upstream list: where names outside our zones are forwarded. Mirrors
/// `dns.upstream` of the config (`system`, or an address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// The `nameserver` lines of `/etc/resolv.conf`, port 53.
    System,
    /// This server.
    Address(SocketAddr),
}

/// Settings of the DNS server.
#[derive(Clone, Debug)]
pub struct DnsSettings {
    /// UDP and TCP address to serve on (port 0 picks one, the same for both).
    pub listen: SocketAddr,
    /// Where other names go, tried in order (`System` expands in place).
    pub upstream: Vec<Upstream>,
    /// TTL of our records and of negative answers.
    pub ttl: Duration,
    /// `traffic.failoverPriority`: ordered label keys, or `key=value` literals.
    pub failover_priority: Vec<String>,
    /// Extra locality labels of this gateway (the client side of failover priority), on top
    /// of the cluster id, region and zone taken from the import snapshot's localities.
    pub local_labels: BTreeMap<String, String>,
    /// Budget of one forwarded query.
    pub upstream_timeout: Duration,
    /// Size of the forwarding cache, in answers.
    pub cache_entries: usize,
    /// Slow-path queries in flight at once.
    pub max_inflight: usize,
    /// UDP receive loops (each a task on the shared socket).
    pub udp_workers: usize,
    /// Idle timeout of TCP client connections.
    pub tcp_idle_timeout: Duration,
    /// TCP client connections served at once.
    pub max_tcp_connections: usize,
    /// Address ranges whose reverse names (`in-addr.arpa`, `ip6.arpa`) are ours alone: the
    /// ClusterSetIP range. A name in them without a PTR record is NXDOMAIN; reverse names
    /// outside them without one of our records are forwarded.
    pub owned_reverse: Vec<ipnet::IpNet>,
}

impl DnsSettings {
    /// Settings with every default, serving on `listen`, forwarding to the system resolvers.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            upstream: vec![Upstream::System],
            ttl: DEFAULT_TTL,
            failover_priority: default_failover_priority(),
            local_labels: BTreeMap::new(),
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            cache_entries: DEFAULT_CACHE_ENTRIES,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            udp_workers: 2,
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
            max_tcp_connections: DEFAULT_MAX_TCP_CONNECTIONS,
            owned_reverse: Vec::new(),
        }
    }

    /// The TTL in whole seconds as records carry it (at least 0, at most `u32::MAX`).
    pub fn ttl_secs(&self) -> u32 {
        u32::try_from(self.ttl.as_secs()).unwrap_or(u32::MAX)
    }
}

/// The design's default: same region, then own cluster, then zone.
pub fn default_failover_priority() -> Vec<String> {
    vec![LABEL_REGION.to_owned(), LABEL_SOURCE_CLUSTER.to_owned(), LABEL_ZONE.to_owned()]
}

/// The upstream servers to use, `System` expanded from resolv.conf text (read at most once).
/// Duplicates and addresses equal to our own listen address are dropped (forwarding to
/// ourselves would loop).
pub fn resolve_upstreams(
    upstream: &[Upstream],
    resolv_conf: impl FnOnce() -> std::io::Result<String>,
    own: SocketAddr,
) -> Result<Vec<SocketAddr>, DnsError> {
    let mut system = None;
    let mut resolv_conf = Some(resolv_conf);
    let mut out: Vec<SocketAddr> = Vec::new();
    for entry in upstream {
        let servers = match entry {
            Upstream::Address(addr) => vec![*addr],
            Upstream::System => {
                if system.is_none() {
                    let read = resolv_conf.take().map_or_else(|| Ok(String::new()), |f| f());
                    let text = read.map_err(|e| DnsError::ResolvConf(RESOLV_CONF.into(), e))?;
                    system = Some(parse_resolv_conf(&text));
                }
                system.clone().unwrap_or_default()
            }
        };
        for server in servers {
            if server != own && !out.contains(&server) {
                out.push(server);
            }
        }
    }
    Ok(out)
}

/// The `nameserver` addresses of a resolv.conf, port 53. Unparseable lines are skipped (the
/// libc resolver does the same).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            // An IPv6 address may carry a zone (`fe80::1%eth0`); we cannot use it from here.
            let addr: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(addr, 53))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let cases: &[(&str, &[&str])] = &[
            ("nameserver 10.0.0.10\n", &["10.0.0.10:53"]),
            (
                "# c\nsearch a.b\nnameserver 1.1.1.1 ; x\nnameserver ::1\noptions ndots:5\n",
                &["1.1.1.1:53", "[::1]:53"],
            ),
            ("nameserver\nnameserver bogus\nnameserverx 1.2.3.4\n", &[]),
            ("", &[]),
        ];
        for (text, want) in cases {
            let got: Vec<String> = parse_resolv_conf(text).iter().map(|a| a.to_string()).collect();
            assert_eq!(&got, want, "{text:?}");
        }
    }

    #[test]
    fn upstream_lists() {
        let own: SocketAddr = "127.0.0.1:53".parse().expect("addr");
        let conf = || Ok("nameserver 127.0.0.1\nnameserver 127.0.0.2\n".to_owned());
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let got = resolve_upstreams(&[Upstream::System], conf, own).expect("parse");
        assert_eq!(got, vec![a("127.0.0.2:53")], "own address dropped");
        let list = [
            Upstream::Address(a("10.0.0.1:5353")),
            Upstream::System,
            Upstream::Address(a("127.0.0.2:53")),
            Upstream::System,
        ];
        let got = resolve_upstreams(&list, conf, own).expect("parse");
        assert_eq!(got, vec![a("10.0.0.1:5353"), a("127.0.0.2:53")], "in order, no duplicates");
        let got = resolve_upstreams(&[Upstream::Address(a("10.0.0.1:53"))], || unreachable!(), own);
        assert_eq!(got.expect("no read"), vec![a("10.0.0.1:53")]);
        let err = resolve_upstreams(
            &[Upstream::System],
            || Err(std::io::ErrorKind::NotFound.into()),
            own,
        );
        assert!(matches!(err, Err(DnsError::ResolvConf(..))));
    }
}
