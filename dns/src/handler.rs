//! The slow path: every query the UDP fast path does not answer, and every TCP query. Parsing
//! and encoding are hickory's; the decisions (our zones, refusals, forwarding) are here.

use std::iter;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::{Edns, Header, HeaderCounts, Message, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageRequest, MessageResponseBuilder};

use crate::forward::{ForwardError, Forwarder, Question};
use crate::metrics;
use crate::names::{Zone, wire_key, zone_of_key};
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
    soas: [Record; 2],
}

impl Handler {
    pub fn new(table: Arc<Table>, forwarder: Forwarder, soas: [Record; 2]) -> Self {
        Self { table, forwarder, soas }
    }

    fn soa(&self, zone: Zone) -> &Record {
        match zone {
            Zone::ClusterSet => &self.soas[0],
            Zone::Cluster => &self.soas[1],
        }
    }

    /// Decides the answer to a parsed request.
    pub async fn reply(&self, req: &MessageRequest) -> Reply {
        let mut reply = Reply::for_request(req);
        let fail = |mut reply: Reply, code| {
            reply.metadata.response_code = code;
            reply
        };
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
        let zone = zone_of_key(&key);
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
                self.authoritative(zone, &key, q.query_type(), &mut reply);
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

    fn authoritative(&self, zone: Zone, key: &[u8], qtype: RecordType, reply: &mut Reply) {
        reply.metadata.authoritative = true;
        match self.table.get(key) {
            Some(entry) => {
                reply.answers = if qtype == RecordType::ANY {
                    entry.data.rrsets.values().flatten().cloned().collect()
                } else {
                    entry.data.records(qtype).map(<[Record]>::to_vec).unwrap_or_default()
                };
                if reply.answers.is_empty() {
                    reply.authorities.push(self.soa(zone).clone());
                }
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
        let head: [u8; 12] = pkt.get(..12)?.try_into().ok()?;
        let request = match Request::from_bytes(pkt, src, Protocol::Udp) {
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
        let limit = request.edns.as_ref().map_or(PLAIN_UDP_LIMIT as u16, |e| {
            e.max_payload().clamp(PLAIN_UDP_LIMIT as u16, EDNS_PAYLOAD)
        });
        let (bytes, rcode) = encode(&request, &reply, limit);
        metrics::slow_query(reply.zone, reply.qtype, rcode, started.elapsed());
        Some(bytes)
    }
}

/// Encodes a reply for UDP within `limit` bytes. When the records do not fit, the answer is
/// sent empty with TC set (RFC 2181 9: no partial RRsets), so the client retries over TCP.
pub fn encode(req: &MessageRequest, reply: &Reply, limit: u16) -> (Vec<u8>, ResponseCode) {
    let mut buf = Vec::with_capacity(usize::from(limit));
    let full = {
        let response = MessageResponseBuilder::new(&req.queries, reply.edns.as_ref()).build(
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
        MessageResponseBuilder::new(&req.queries, reply.edns.as_ref()).build_no_records(metadata);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_max_size(limit);
    match response.destructive_emit(&mut encoder) {
        Ok(_) => (buf, reply.metadata.response_code),
        Err(_) => {
            let mut servfail = reply.metadata;
            servfail.response_code = ResponseCode::ServFail;
            let header = Header { metadata: servfail, counts: HeaderCounts::default() };
            buf.clear();
            let mut encoder = BinEncoder::new(&mut buf);
            let _ = encoder.emit_all(iter::once(&header));
            (buf, ResponseCode::ServFail)
        }
    }
}

/// The TCP side: hickory's server hands us parsed requests.
pub struct TcpHandler(pub Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for TcpHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let reply = self.0.reply(request).await;
        let response = MessageResponseBuilder::new(&request.queries, reply.edns.as_ref()).build(
            reply.metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            iter::empty(),
            reply.additionals.iter(),
        );
        let info = match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, "sending a dns answer over tcp failed");
                let mut metadata = reply.metadata;
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
            }
        };
        metrics::slow_query(reply.zone, reply.qtype, info.response_code, started.elapsed());
        info
    }
}
