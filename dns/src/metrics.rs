//! Every metric of the DNS server, declared in one place. Names are prefixed `fedgate_dns_`,
//! labels are low-cardinality (zone, query type from a fixed list, response code).

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use metrics::{
    Counter, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};

pub const QUERIES: &str = "fedgate_dns_queries_total";
pub const QUERY_DURATION: &str = "fedgate_dns_query_duration_seconds";
pub const FORWARDED: &str = "fedgate_dns_forwarded_total";
pub const CACHE_HITS: &str = "fedgate_dns_cache_hits_total";
pub const CACHE_MISSES: &str = "fedgate_dns_cache_misses_total";
pub const TRUNCATED: &str = "fedgate_dns_truncated_total";
pub const OVERLOADED: &str = "fedgate_dns_overload_servfail_total";
pub const TCP_CONNECTIONS: &str = "fedgate_dns_tcp_connections";
pub const TCP_REFUSED: &str = "fedgate_dns_tcp_refused_total";
pub const TCP_ACCEPT_ERRORS: &str = "fedgate_dns_tcp_accept_errors_total";
pub const ZONE_UPDATES: &str = "fedgate_dns_zone_updates_total";
pub const ZONE_NAMES: &str = "fedgate_dns_zone_names";

/// Registers help texts with the installed recorder. The composition root calls it once.
pub fn describe() {
    describe_counter!(
        QUERIES,
        "DNS queries answered, by zone (clusterset, cluster, reverse, forward, none), query type and response code"
    );
    describe_histogram!(
        QUERY_DURATION,
        Unit::Seconds,
        "Time from receiving a DNS query to sending its answer, by path (fast = pre-encoded UDP answer, slow = hickory)"
    );
    describe_counter!(FORWARDED, "Queries sent upstream, by result (ok, servfail, timeout, error)");
    describe_counter!(CACHE_HITS, "Forwarded queries answered from the forwarding cache");
    describe_counter!(CACHE_MISSES, "Forwarded queries that had to go upstream");
    describe_counter!(TRUNCATED, "UDP answers sent truncated (TC) because they did not fit");
    describe_counter!(
        OVERLOADED,
        "Queries answered SERVFAIL at once because too many slow-path queries were in flight"
    );
    describe_counter!(
        ZONE_UPDATES,
        "Snapshots applied to the DNS zones, by source (imports, cluster)"
    );
    describe_gauge!(TCP_CONNECTIONS, "DNS-over-TCP client connections open now");
    describe_counter!(
        TCP_REFUSED,
        "DNS-over-TCP connections closed at once because dns.maxTcpConnections were open"
    );
    describe_counter!(
        TCP_ACCEPT_ERRORS,
        "DNS-over-TCP accepts that failed (out of file descriptors and the like)"
    );
    describe_gauge!(ZONE_NAMES, "Owner names served in clusterset.local and cluster.local");
}

/// Query types that get their own label value; everything else is `other`.
const QTYPES: [(RecordType, &str); 9] = [
    (RecordType::A, "A"),
    (RecordType::AAAA, "AAAA"),
    (RecordType::SRV, "SRV"),
    (RecordType::TXT, "TXT"),
    (RecordType::SOA, "SOA"),
    (RecordType::NS, "NS"),
    (RecordType::PTR, "PTR"),
    (RecordType::CNAME, "CNAME"),
    (RecordType::ANY, "ANY"),
];

pub fn qtype_label(qtype: u16) -> &'static str {
    QTYPES.iter().find(|(t, _)| u16::from(*t) == qtype).map_or("other", |(_, l)| l)
}

pub fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}

/// Handles of the fast path, resolved once so a hit costs two atomic updates.
#[derive(Clone)]
pub struct FastPathMetrics {
    /// `[zone][qtype index]`, rcode NOERROR (the fast path answers nothing else).
    queries: Vec<Vec<Counter>>,
    other: Vec<Counter>,
    duration: Histogram,
}

impl FastPathMetrics {
    pub fn new() -> Self {
        // Indexed by `Zone::index`, both reverse zones counted as `reverse`.
        let zones = ["clusterset", "cluster", "reverse"];
        let queries = zones
            .iter()
            .map(|zone| {
                QTYPES
                    .iter()
                    .map(|(_, q)| counter!(QUERIES, "zone" => *zone, "qtype" => *q, "rcode" => "NOERROR"))
                    .collect()
            })
            .collect();
        let other = zones
            .iter()
            .map(
                |zone| counter!(QUERIES, "zone" => *zone, "qtype" => "other", "rcode" => "NOERROR"),
            )
            .collect();
        Self { queries, other, duration: histogram!(QUERY_DURATION, "path" => "fast") }
    }

    pub fn record(&self, zone: usize, qtype: u16, elapsed: Duration) {
        let counter = match QTYPES.iter().position(|(t, _)| u16::from(*t) == qtype) {
            Some(i) => self.queries.get(zone).and_then(|z| z.get(i)),
            None => self.other.get(zone),
        };
        if let Some(c) = counter {
            c.increment(1);
        }
        self.duration.record(elapsed.as_secs_f64());
    }
}

impl Default for FastPathMetrics {
    fn default() -> Self {
        Self::new()
    }
}

pub fn slow_query(zone: &'static str, qtype: u16, rcode: ResponseCode, elapsed: Duration) {
    counter!(QUERIES, "zone" => zone, "qtype" => qtype_label(qtype), "rcode" => rcode_label(rcode))
        .increment(1);
    histogram!(QUERY_DURATION, "path" => "slow").record(elapsed.as_secs_f64());
}

pub fn forwarded(result: &'static str) {
    counter!(FORWARDED, "result" => result).increment(1);
}

pub fn cache_hit() {
    counter!(CACHE_HITS).increment(1);
}

pub fn cache_miss() {
    counter!(CACHE_MISSES).increment(1);
}

pub fn tcp_connections(delta: f64) {
    gauge!(TCP_CONNECTIONS).increment(delta);
}

pub fn tcp_refused() {
    counter!(TCP_REFUSED).increment(1);
}

pub fn tcp_accept_error() {
    counter!(TCP_ACCEPT_ERRORS).increment(1);
}

pub fn truncated() {
    counter!(TRUNCATED).increment(1);
}

pub fn overloaded() {
    counter!(OVERLOADED).increment(1);
}

pub fn zone_update(source: &'static str, names: usize) {
    counter!(ZONE_UPDATES, "source" => source).increment(1);
    gauge!(ZONE_NAMES).set(names as f64);
}
