//! The slow path: every query the UDP fast path does not answer, and every TCP query. Parsing
//! and encoding are hickory's; the decisions (our zones, refusals, forwarding) are here.

use std::iter;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use hickory_proto::op::{Edns, Header, HeaderCounts, Message, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecoder, BinEncoder};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::{MessageRequest, MessageResponseBuilder, Queries};
use ipnet::IpNet;

use crate::forward::{ForwardError, Forwarder, Question};
use crate::metrics;
use crate::names::{ReverseMiss, Zone, reverse_miss, reverse_zone_of_key, wire_key, zone_of_key};
use crate::table::Table;
use crate::wire::{self, EDNS_PAYLOAD, PLAIN_UDP_LIMIT};

/// A decided answer, before encoding.
#[derive(Debug)]
pub struct Reply {
    pub metadata: Metadata,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
    pub edns: Option<Edns>,
    /// Metrics label: clusterset, cluster, forward or none.
    pub zone: &'static str,
    pub qtype: u16,
    /// Whether the client's question section goes back in the answer. hickory copies it
    /// verbatim, so a question that cannot be copied safely (see [`question_echoable`]) is
    /// left out (FORMERR with no question).
    pub echo_question: bool,
}

impl Reply {
    /// An empty NOERROR answer to `req`: our EDNS (when the client used it) with the
    /// client's DO bit, RA set, RD/CD copied.
    pub fn for_request(req: &MessageRequest) -> Self {
        let mut metadata = Metadata::response_from_request(&req.metadata);
        metadata.recursion_available = true;
        let edns = req.edns.as_ref().map(|e| {
            let mut ours = Edns::new();
            ours.set_max_payload(EDNS_PAYLOAD);
            ours.set_version(0);
            ours.set_dnssec_ok(e.flags().dnssec_ok);
            ours
        });
        Reply {
            metadata,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            edns,
            zone: "none",
            qtype: 0,
            echo_question: true,
        }
    }

    /// Takes an upstream's answer (already matched to the question) as ours: its rcode and
    /// records; our header flags and EDNS stay.
    pub fn relay(&mut self, msg: Message) {
        self.metadata.response_code = msg.metadata.response_code;
        self.answers = msg.answers;
        self.authorities = msg.authorities;
        self.additionals = msg.additionals;
    }
}

/// Shared state of the slow path.
pub struct Handler {
    table: Arc<Table>,
    forwarder: Forwarder,
    soas: [Record; Zone::COUNT],
    /// Address ranges whose reverse names are ours alone (the ClusterSetIP range): a name
    /// there without records is NXDOMAIN, not forwarded.
    owned_reverse: Vec<IpNet>,
    /// False until the zones hold everything the gateway knows at start-up
    /// ([`Handler::set_complete`]): a name missing before then gets SERVFAIL, not NXDOMAIN.
    complete: AtomicBool,
}

impl Handler {
    pub fn new(
        table: Arc<Table>,
        forwarder: Forwarder,
        soas: [Record; Zone::COUNT],
        owned_reverse: Vec<IpNet>,
    ) -> Self {
        Self { table, forwarder, soas, owned_reverse, complete: AtomicBool::new(true) }
    }

    /// Whether a name missing from our zones is known not to exist (NXDOMAIN) or may only be
    /// late (SERVFAIL: resolvers ask the next server, a sibling replica that has it).
    pub fn set_complete(&self, complete: bool) {
        self.complete.store(complete, Ordering::Release);
    }

    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    fn soa(&self, zone: Zone) -> &Record {
        &self.soas[zone.index()]
    }

    /// Decides the answer to a parsed request.
    pub async fn reply(&self, req: &MessageRequest) -> Reply {
        let mut reply = Reply::for_request(req);
        let fail = |mut reply: Reply, code| {
            reply.metadata.response_code = code;
            reply
        };
        if !question_echoable(req.queries.as_bytes()) {
            reply.echo_question = false;
            return fail(reply, ResponseCode::FormErr);
        }
        if req.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return fail(reply, ResponseCode::BADVERS);
        }
        if req.metadata.op_code != OpCode::Query {
            return fail(reply, ResponseCode::NotImp);
        }
        let [q] = req.queries.queries() else {
            return fail(reply, ResponseCode::FormErr);
        };
        reply.qtype = u16::from(q.query_type());
        let name: &Name = q.name();
        let key = wire_key(name);
        let zone = zone_of_key(&key).or_else(|| self.reverse_zone(name, &key));
        reply.zone = zone.map_or("forward", Zone::label);
        if matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR) {
            return fail(reply, ResponseCode::Refused);
        }
        let class = q.query_class();
        match zone {
            Some(zone) => {
                if class != DNSClass::IN && class != DNSClass::ANY {
                    return fail(reply, ResponseCode::Refused);
                }
                self.authoritative(zone, name, &key, q.query_type(), &mut reply);
            }
            None => {
                if class != DNSClass::IN {
                    return fail(reply, ResponseCode::Refused);
                }
                let question = Question {
                    name: name.clone(),
                    qtype: q.query_type(),
                    qclass: class,
                    dnssec_ok: req.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
                    checking_disabled: req.metadata.checking_disabled,
                };
                match self.forwarder.forward(&question).await {
                    Ok(msg) => reply.relay(msg),
                    // Nowhere to forward to: as an authority-only server, refuse names
                    // outside our zones (RFC 8906 3.1.4) rather than claim a failure.
                    Err(ForwardError::NoUpstream) => {
                        reply.metadata.response_code = ResponseCode::Refused;
                    }
                    Err(error) => {
                        tracing::debug!(name = %name, %error, "forwarding failed");
                        reply.metadata.response_code = ResponseCode::ServFail;
                    }
                }
            }
        }
        reply
    }

    /// The reverse zone of `name` when we answer it: we hold its PTR records, or it lies in an
    /// owned range. Other reverse names are forwarded like any other name.
    fn reverse_zone(&self, name: &Name, key: &[u8]) -> Option<Zone> {
        let zone = reverse_zone_of_key(key)?;
        if self.table.get(key).is_some() {
            return Some(zone);
        }
        (reverse_miss(name, &self.owned_reverse) != ReverseMiss::NotOurs).then_some(zone)
    }

    fn authoritative(
        &self,
        zone: Zone,
        name: &Name,
        key: &[u8],
        qtype: RecordType,
        reply: &mut Reply,
    ) {
        reply.metadata.authoritative = true;
        match self.table.get(key) {
            Some(entry) => match entry.records(qtype) {
                Ok(records) => {
                    reply.answers = records;
                    if reply.answers.is_empty() {
                        reply.authorities.push(self.soa(zone).clone());
                    }
                }
                Err(error) => {
                    // An answer we encoded ourselves does not decode: a bug, not the client's.
                    tracing::error!(%error, "a pre-encoded dns answer does not decode");
                    reply.metadata.response_code = ResponseCode::ServFail;
                }
            },
            None if !self.is_complete() => {
                // Starting: the name may exist and not be here yet.
                reply.metadata.authoritative = false;
                reply.metadata.response_code = ResponseCode::ServFail;
            }
            // A name above our reverse records (inside the owned range) may have descendants:
            // NODATA, never a NXDOMAIN that would deny them (RFC 8020).
            None if Zone::REVERSE.contains(&zone)
                && reverse_miss(name, &self.owned_reverse) == ReverseMiss::NoData =>
            {
                reply.authorities.push(self.soa(zone).clone());
            }
            None => {
                reply.metadata.response_code = ResponseCode::NXDomain;
                reply.authorities.push(self.soa(zone).clone());
            }
        }
    }

    /// The whole UDP slow path for one datagram. `None`: send nothing (not a query at all).
    pub async fn handle_udp(
        &self,
        pkt: Vec<u8>,
        src: SocketAddr,
        started: Instant,
    ) -> Option<Vec<u8>> {
        self.handle_message(pkt, src, Protocol::Udp, started).await
    }

    /// One message of a DNS-over-TCP stream (without its length prefix): the same answer as
    /// over UDP, without the UDP size limit. `None`: not a query at all.
    pub async fn handle_tcp(
        &self,
        pkt: Vec<u8>,
        src: SocketAddr,
        started: Instant,
    ) -> Option<Vec<u8>> {
        self.handle_message(pkt, src, Protocol::Tcp, started).await
    }

    async fn handle_message(
        &self,
        pkt: Vec<u8>,
        src: SocketAddr,
        protocol: Protocol,
        started: Instant,
    ) -> Option<Vec<u8>> {
        let head: [u8; 12] = pkt.get(..12)?.try_into().ok()?;
        let request = match Request::from_bytes(pkt, src, protocol) {
            Ok(request) => request,
            Err(_) => {
                metrics::slow_query("none", 0, ResponseCode::FormErr, started.elapsed());
                return wire::error_response(&head, ResponseCode::FormErr);
            }
        };
        if request.metadata.message_type == hickory_proto::op::MessageType::Response {
            return None;
        }
        let reply = self.reply(&request).await;
        let limit = match protocol {
            Protocol::Udp => request.edns.as_ref().map_or(PLAIN_UDP_LIMIT as u16, |e| {
                e.max_payload().clamp(PLAIN_UDP_LIMIT as u16, EDNS_PAYLOAD)
            }),
            _ => u16::MAX,
        };
        let (bytes, rcode) = encode(&request, &reply, limit);
        metrics::slow_query(reply.zone, reply.qtype, rcode, started.elapsed());
        Some(bytes)
    }
}

/// Whether a question section as the client sent it (hickory's `Queries::as_bytes`) can be
/// copied into an answer unchanged: every name written out label by label. A compression
/// pointer in the question can only point into the header (nothing else precedes it), and
/// copied into our answer it would point into *our* header, which no client can parse (found
/// by the request_path fuzz target). Such queries get FORMERR without the question.
pub fn question_echoable(raw: &[u8]) -> bool {
    let mut at = 0usize;
    while at < raw.len() {
        loop {
            let Some(&len) = raw.get(at) else { return false };
            if len & 0xC0 != 0 {
                return false;
            }
            at += 1 + usize::from(len);
            if len == 0 {
                break;
            }
        }
        at += 4; // type and class
    }
    at == raw.len()
}

/// An empty question section, for answers that must not echo the client's. (Reading zero
/// questions from nothing does not fail; `None` would mean hickory changed.)
static NO_QUERIES: LazyLock<Option<Queries>> =
    LazyLock::new(|| Queries::read(&mut BinDecoder::new(&[]), 0).ok());

/// The question section an answer carries: the client's, or none when it must not be echoed.
fn echoed_queries<'a>(client: &'a Queries, reply: &Reply) -> Option<&'a Queries> {
    if reply.echo_question { Some(client) } else { NO_QUERIES.as_ref() }
}

/// Encodes a reply for UDP within `limit` bytes. When the records do not fit, the answer is
/// sent empty with TC set (RFC 2181 9: no partial RRsets), so the client retries over TCP.
pub fn encode(req: &MessageRequest, reply: &Reply, limit: u16) -> (Vec<u8>, ResponseCode) {
    let mut buf = Vec::with_capacity(usize::from(limit));
    let Some(queries) = echoed_queries(&req.queries, reply) else {
        return header_only(reply.metadata, buf);
    };
    let full = {
        let response = MessageResponseBuilder::new(queries, reply.edns.as_ref()).build(
            reply.metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            iter::empty(),
            reply.additionals.iter(),
        );
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(limit);
        response.destructive_emit(&mut encoder)
    };
    match full {
        Ok(header) if !header.truncation => return (buf, reply.metadata.response_code),
        Ok(_) => metrics::truncated(),
        Err(error) => tracing::debug!(%error, "encoding a dns answer failed"),
    }
    buf.clear();
    let mut metadata = reply.metadata;
    metadata.truncation = true;
    let response =
        MessageResponseBuilder::new(queries, reply.edns.as_ref()).build_no_records(metadata);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_max_size(limit);
    match response.destructive_emit(&mut encoder) {
        Ok(_) => (buf, reply.metadata.response_code),
        Err(_) => {
            let mut servfail = reply.metadata;
            servfail.response_code = ResponseCode::ServFail;
            header_only(servfail, buf)
        }
    }
}

/// A header-only answer (no sections), e.g. when not even the question could be encoded.
fn header_only(metadata: Metadata, mut buf: Vec<u8>) -> (Vec<u8>, ResponseCode) {
    let header = Header { metadata, counts: HeaderCounts::default() };
    buf.clear();
    let mut encoder = BinEncoder::new(&mut buf);
    let _ = encoder.emit_all(iter::once(&header));
    (buf, metadata.response_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_that_can_be_echoed() {
        let plain: &[u8] = b"\x03web\x05local\x00\x00\x01\x00\x01";
        let cases: [(&str, &[u8], bool); 6] = [
            ("plain", plain, true),
            ("no question", b"", true),
            ("pointer into the header", b"\x03web\xc0\x02\x00\x01\x00\x01", false),
            ("extended label type", b"\x43web\x00\x00\x01\x00\x01", false),
            ("cut in a name", b"\x03we", false),
            ("cut in type/class", b"\x00\x00\x01", false),
        ];
        for (name, raw, want) in cases {
            assert_eq!(question_echoable(raw), want, "{name}");
        }
    }

    /// Found by the request_path fuzz target: hickory copies the question verbatim, so a
    /// qname compressed onto the header came back pointing at our own header (unparseable).
    #[tokio::test]
    async fn compressed_question_gets_formerr_without_question() {
        let path = crate::fixture::request_path();
        let pkt: &[u8] = &[
            121, 233, 1, 32, 0, 1, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 37, 2, 2, 2,
            2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
            2, 192, 2, 2, 2, 2, 0, 0, 0, 0, 0, 145,
        ];
        let answer = path.answer_udp(pkt).await.expect("answered");
        let msg = hickory_proto::op::Message::from_vec(&answer).expect("answer parses");
        assert_eq!(msg.metadata.response_code, ResponseCode::FormErr);
        assert!(msg.queries.is_empty());
        assert_eq!(msg.metadata.id, 0x79e9);
    }
}
