//! The UDP request path without the socket: zones built from snapshots, the fast path over
//! pre-encoded answers and the hickory slow path behind it. The server's receive loops and the
//! fuzz targets (`fuzz/`) both go through here, so what is fuzzed is what is served.
//!
//! [`check_udp_answer`] states what every answer must satisfy; the fuzz targets and the
//! randomized tests assert it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use fedgate_discovery::model::{ClusterState, ImportSnapshot};
use hickory_proto::op::{Message, MessageType, ResponseCode};

use crate::forward::Forwarder;
use crate::handler::Handler;
use crate::names::Zone;
use crate::settings::DnsSettings;
use crate::table::Table;
use crate::tier::parse_priority;
use crate::wire::{self, EDNS_PAYLOAD, PLAIN_UDP_LIMIT};
use crate::zone::{UpdateStats, ZoneWriter};

/// Source address given to the slow path when the caller has none (fuzzing, tests).
const NO_SOURCE: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 53);

/// Answers `pkt` from the pre-encoded responses if it is a plain query for one of our names,
/// writing the response into `out`. Returns the zone and query type on a hit; `None` sends
/// the query to the slow path (unknown name, meta type, too large for the client, ...).
pub fn answer_fast(
    table: &Table,
    pkt: &[u8],
    key: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Option<(Zone, u16)> {
    let q = wire::parse_query(pkt, key)?;
    table.with(key, |entry| {
        let entry = entry?;
        let template = entry.template(q.qtype)?;
        wire::assemble(template, pkt, &q, out).then_some((entry.zone, q.qtype))
    })
}

/// Zones, name table and slow-path handler: everything that answers a query except sockets.
pub struct RequestPath {
    table: Arc<Table>,
    writer: ZoneWriter,
    handler: Arc<Handler>,
}

impl RequestPath {
    /// Builds the zones from `imports` and `cluster` with the TTL and failover priority of
    /// `settings`, forwarding other names to `upstreams` (none: they get SERVFAIL).
    pub fn new(
        settings: &DnsSettings,
        upstreams: Vec<SocketAddr>,
        imports: &ImportSnapshot,
        cluster: &ClusterState,
    ) -> Self {
        // A fixed serial for the life of the process (see records::soa).
        let serial = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u32::try_from(d.as_secs() % u64::from(u32::MAX)).unwrap_or(1));
        let table = Arc::new(Table::default());
        let mut writer = ZoneWriter::new(
            table.clone(),
            settings.ttl_secs(),
            serial,
            parse_priority(&settings.failover_priority),
            settings.local_labels.clone(),
            Some(settings.listen.ip()).filter(|ip| !ip.is_unspecified()),
        );
        writer.apply_imports(imports);
        writer.apply_cluster(cluster);
        let soas = [Zone::ClusterSet, Zone::Cluster, Zone::ReverseV4, Zone::ReverseV6]
            .map(|zone| writer.soa(zone).clone());
        let forwarder =
            Forwarder::new(upstreams, settings.upstream_timeout, settings.cache_entries);
        let handler =
            Arc::new(Handler::new(table.clone(), forwarder, soas, settings.owned_reverse.clone()));
        Self { table, writer, handler }
    }

    /// The name table both paths read.
    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    /// The slow-path handler (UDP fallback and TCP).
    pub fn handler(&self) -> &Arc<Handler> {
        &self.handler
    }

    /// Applies a new import snapshot (clusterset.local).
    pub fn apply_imports(&mut self, snap: &ImportSnapshot) -> UpdateStats {
        self.writer.apply_imports(snap)
    }

    /// Applies a new local cluster state (cluster.local).
    pub fn apply_cluster(&mut self, state: &ClusterState) -> UpdateStats {
        self.writer.apply_cluster(state)
    }

    /// Splits into the parts the server runs: table, zone writer, handler.
    pub fn into_parts(self) -> (Arc<Table>, ZoneWriter, Arc<Handler>) {
        (self.table, self.writer, self.handler)
    }

    /// The slow path alone for one datagram (what the fast path falls back to).
    pub async fn answer_slow(&self, pkt: &[u8]) -> Option<Vec<u8>> {
        self.handler.handle_udp(pkt.to_vec(), NO_SOURCE, Instant::now()).await
    }

    /// The whole UDP path for one datagram, as the server runs it: fast path, else slow
    /// path. `None`: nothing is sent (not a query).
    pub async fn answer_udp(&self, pkt: &[u8]) -> Option<Vec<u8>> {
        let (mut key, mut out) = (Vec::new(), Vec::new());
        if answer_fast(&self.table, pkt, &mut key, &mut out).is_some() {
            return Some(out);
        }
        self.answer_slow(pkt).await
    }
}

/// Checks what every UDP answer to `query` must satisfy; `Err` says which rule broke.
///
/// - datagrams shorter than a header, or with QR set, get no answer (no reflection); every
///   other datagram gets one (nothing is dropped silently);
/// - the answer parses, echoes the ID and opcode, has QR set and fits the client's UDP limit
///   (512 without EDNS, the advertised size clamped to 512..=1232 with it);
/// - when the query parses with exactly one question, the answer carries that question (same
///   name, case included, type and class) unless it is a FORMERR/NOTIMP header;
/// - an answer for a name in our zones with NOERROR or NXDOMAIN is authoritative, and an empty
///   one (NXDOMAIN or NODATA) carries the zone's SOA in the authority section.
pub fn check_udp_answer(query: &[u8], answer: Option<&[u8]>) -> Result<(), String> {
    let is_query = query.len() >= 12 && query[2] & 0x80 == 0;
    let Some(answer) = answer else {
        return if is_query { Err("a query got no answer".into()) } else { Ok(()) };
    };
    if !is_query {
        return Err("answered a datagram that is not a query".into());
    }
    let resp = Message::from_vec(answer).map_err(|e| format!("answer does not parse: {e}"))?;
    let id = u16::from_be_bytes([query[0], query[1]]);
    if resp.metadata.id != id {
        return Err(format!("answer id {} for query id {id}", resp.metadata.id));
    }
    if resp.metadata.message_type != MessageType::Response {
        return Err("answer without QR".into());
    }
    if answer[2] & 0x78 != query[2] & 0x78 {
        return Err("answer opcode differs from the query's".into());
    }
    let parsed = Message::from_vec(query).ok();
    let limit = match parsed.as_ref().and_then(|m| m.edns.as_ref()) {
        Some(edns) => usize::from(edns.max_payload().clamp(PLAIN_UDP_LIMIT as u16, EDNS_PAYLOAD)),
        None if parsed.is_some() => PLAIN_UDP_LIMIT,
        // Unparseable: we cannot know what the client accepts; never more than we advertise.
        None => usize::from(EDNS_PAYLOAD),
    };
    if answer.len() > limit {
        return Err(format!("answer of {} bytes over the client's limit {limit}", answer.len()));
    }
    let Some(q) = parsed else { return Ok(()) };
    let [question] = q.queries.as_slice() else { return Ok(()) };
    let rcode = resp.metadata.response_code;
    if matches!(rcode, ResponseCode::FormErr | ResponseCode::NotImp) && resp.queries.is_empty() {
        return Ok(());
    }
    let [echoed] = resp.queries.as_slice() else {
        return Err(format!("{} questions in the answer, 1 asked", resp.queries.len()));
    };
    if echoed.name.to_ascii() != question.name.to_ascii()
        || echoed.query_type() != question.query_type()
        || echoed.query_class() != question.query_class()
    {
        return Err(format!("answer question {echoed} for query question {question}"));
    }
    let key = crate::names::wire_key(&question.name);
    if let Some(zone) = crate::names::zone_of_key(&key)
        && q.metadata.op_code == hickory_proto::op::OpCode::Query
        && matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain)
        && !resp.metadata.truncation
    {
        if !resp.metadata.authoritative {
            return Err(format!("{rcode} for {} without AA", question.name));
        }
        let soa_in_authority = resp.authorities.iter().any(|r| {
            r.record_type() == hickory_proto::rr::RecordType::SOA
                && crate::names::wire_key(&r.name) == zone.apex_key()
        });
        if resp.answers.is_empty() && !soa_in_authority {
            return Err(format!("negative answer for {} without the zone SOA", question.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checker_rules() {
        let mut query = Message::query();
        query.metadata.id = 7;
        query.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii("x.example.").expect("name"),
            hickory_proto::rr::RecordType::A,
        ));
        let q = query.to_vec().expect("encode");
        let mut resp = query.clone();
        resp.metadata.message_type = MessageType::Response;
        let good = resp.to_vec().expect("encode");
        let mut wrong_id = resp.clone();
        wrong_id.metadata.id = 8;
        let mut no_question = resp.clone();
        no_question.queries.clear();
        type Case<'a> = (&'a str, &'a [u8], Option<Vec<u8>>, bool);
        let cases: [Case<'_>; 6] = [
            ("good", &q, Some(good.clone()), true),
            ("silence", &q, None, false),
            ("short datagram ignored", &q[..5], None, true),
            ("answer to a short datagram", &q[..5], Some(good), false),
            ("wrong id", &q, Some(wrong_id.to_vec().expect("encode")), false),
            ("question dropped", &q, Some(no_question.to_vec().expect("encode")), false),
        ];
        for (name, query, answer, ok) in cases {
            assert_eq!(check_udp_answer(query, answer.as_deref()).is_ok(), ok, "{name}");
        }
    }
}
