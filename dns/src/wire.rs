//! Wire-format work of the UDP fast path: a strict parser for plain queries and the assembly of
//! a response from a pre-encoded template. Anything the parser does not recognise goes to the
//! hickory slow path, so being strict here is always safe.

use hickory_proto::op::{Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};

/// The UDP payload size we advertise in EDNS (the DNS Flag Day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;
/// Classic DNS UDP limit without EDNS (RFC 1035 4.2.1).
pub const PLAIN_UDP_LIMIT: usize = 512;
const HEADER_LEN: usize = 12;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

/// A plain query the fast path can answer: one IN question, no records but an optional OPT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastQuery {
    pub qtype: u16,
    /// End of the question section (header + name + type + class).
    pub question_end: usize,
    /// The OPT record of the query, if any: (advertised payload size, DO bit).
    pub edns: Option<(u16, bool)>,
}

impl FastQuery {
    /// The largest response the client accepts over UDP.
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            // Never more than we advertise: larger datagrams fragment (DNS Flag Day 2020).
            Some((payload, _)) => usize::from(payload.clamp(PLAIN_UDP_LIMIT as u16, EDNS_PAYLOAD)),
            None => PLAIN_UDP_LIMIT,
        }
    }
}

fn u16_at(pkt: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*pkt.get(at)?, *pkt.get(at + 1)?]))
}

/// Parses a query the fast path can serve, writing its lowercased wire qname into `key`.
/// `None` means "not for the fast path" (not necessarily invalid).
pub fn parse_query(pkt: &[u8], key: &mut Vec<u8>) -> Option<FastQuery> {
    key.clear();
    let flags = u16_at(pkt, 2)?;
    // QR=0, OPCODE=QUERY, TC=0 and RCODE=0; AA/RD/AD/CD may be anything.
    if flags & 0xFA0F != 0 {
        return None;
    }
    if u16_at(pkt, 4)? != 1 || u16_at(pkt, 6)? != 0 || u16_at(pkt, 8)? != 0 {
        return None;
    }
    let additionals = u16_at(pkt, 10)?;
    if additionals > 1 {
        return None;
    }
    let mut at = HEADER_LEN;
    loop {
        let len = *pkt.get(at)? as usize;
        if len & 0xC0 != 0 {
            return None;
        }
        let label = pkt.get(at..at + 1 + len)?;
        if key.len() + label.len() > 255 {
            return None;
        }
        key.push(len as u8);
        key.extend(label[1..].iter().map(u8::to_ascii_lowercase));
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    let qtype = u16_at(pkt, at)?;
    if u16_at(pkt, at + 2)? != CLASS_IN {
        return None;
    }
    let question_end = at + 4;
    let edns = if additionals == 0 {
        (pkt.len() == question_end).then_some(())?;
        None
    } else {
        let opt = pkt.get(question_end..question_end + 11)?;
        if opt[0] != 0 || u16::from_be_bytes([opt[1], opt[2]]) != TYPE_OPT {
            return None;
        }
        // Extended RCODE 0 and EDNS version 0 only; others get BADVERS from the slow path.
        if opt[5] != 0 || opt[6] != 0 {
            return None;
        }
        let rdlen = usize::from(u16::from_be_bytes([opt[9], opt[10]]));
        if pkt.len() != question_end + 11 + rdlen || !plain_edns_options(&pkt[question_end + 11..])
        {
            return None;
        }
        Some((u16::from_be_bytes([opt[3], opt[4]]), opt[7] & 0x80 != 0))
    };
    Some(FastQuery { qtype, question_end, edns })
}

/// EDNS option code of Client Subnet (RFC 7871), whose contents hickory parses.
const OPTION_CLIENT_SUBNET: u16 = 8;

/// True when the OPT RDATA is a well-formed sequence of options (code, length, data, each
/// exactly inside the RDATA) none of which has contents the slow path would parse (Client
/// Subnet). Anything else goes to the slow path, which answers FORMERR where it must; the
/// fast path must never answer a query the slow path rejects (found by fuzzing: an option
/// longer than the RDATA was answered from the fast path, FORMERR from the slow path).
fn plain_edns_options(mut rdata: &[u8]) -> bool {
    while !rdata.is_empty() {
        let (Some(code), Some(len)) = (u16_at(rdata, 0), u16_at(rdata, 2)) else {
            return false;
        };
        let Some(rest) = rdata.get(4 + usize::from(len)..) else {
            return false;
        };
        if code == OPTION_CLIENT_SUBNET {
            return false;
        }
        rdata = rest;
    }
    true
}

/// True for query types a NODATA answer can be given to from the fast path: ordinary data
/// types, not meta types (OPT, transfers, ANY, ...).
pub fn is_data_type(qtype: u16) -> bool {
    qtype != 0 && qtype != TYPE_OPT && qtype < 128
}

/// Builds the response to `pkt` from `template` into `out`. The template is a whole response
/// whose question is the same name, lowercased; the client's question (with its own case,
/// which 0x20-randomising resolvers check) replaces it. Returns false when the response does
/// not fit the client's UDP limit (the slow path then truncates).
pub fn assemble(template: &[u8], pkt: &[u8], q: &FastQuery, out: &mut Vec<u8>) -> bool {
    if template.len() < q.question_end || pkt.len() < q.question_end {
        return false;
    }
    out.clear();
    out.extend_from_slice(template);
    out[0] = pkt[0];
    out[1] = pkt[1];
    // Copy RD and CD from the query (RFC 6840 5.6); the rest comes from the template.
    out[2] = (template[2] & !0x01) | (pkt[2] & 0x01);
    out[3] = (template[3] & !0x10) | (pkt[3] & 0x10);
    out[HEADER_LEN..q.question_end].copy_from_slice(&pkt[HEADER_LEN..q.question_end]);
    if let Some((_, dnssec_ok)) = q.edns {
        let additionals = u16::from_be_bytes([out[10], out[11]]).saturating_add(1);
        out[10..12].copy_from_slice(&additionals.to_be_bytes());
        let [p0, p1] = EDNS_PAYLOAD.to_be_bytes();
        out.extend_from_slice(&[0, 0, 41, p0, p1, 0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    out.len() <= q.udp_limit()
}

/// A header-only (plus question, when it parses) error response to `pkt`. `None` for
/// datagrams that are too short or are responses themselves (never answer those: reflection).
pub fn error_response(pkt: &[u8], rcode: ResponseCode) -> Option<Vec<u8>> {
    let head = pkt.get(..HEADER_LEN)?;
    if head[2] & 0x80 != 0 {
        return None;
    }
    let mut out = head.to_vec();
    // QR, the query's opcode and RD; RA set; the rcode's low bits.
    out[2] = 0x80 | (head[2] & 0x79);
    out[3] = 0x80 | (rcode.low() & 0x0F);
    out[4..HEADER_LEN].fill(0);
    let mut key = Vec::new();
    if let Some(q) = parse_query(pkt, &mut key) {
        out[5] = 1;
        out.extend_from_slice(&pkt[HEADER_LEN..q.question_end]);
    }
    Some(out)
}

/// Encodes a template: an authoritative NOERROR response to `name`/`qtype` with these
/// sections, ID 0 and no EDNS. `None` when they do not fit one DNS message (64 KiB): hickory
/// would write as many records as fit and set TC, which is no answer to keep.
pub fn encode_template(
    name: &Name,
    qtype: RecordType,
    answers: &[Record],
    authorities: &[Record],
) -> Option<Box<[u8]>> {
    let mut metadata = Metadata::new(0, MessageType::Response, OpCode::Query);
    metadata.authoritative = true;
    metadata.recursion_available = true;
    metadata.response_code = ResponseCode::NoError;
    let mut msg = Message::new(0, MessageType::Response, OpCode::Query);
    msg.metadata = metadata;
    let mut query = Query::query(name.clone(), qtype);
    query.query_class = DNSClass::IN;
    msg.add_query(query);
    msg.add_answers(answers.iter().cloned());
    msg.add_authorities(authorities.iter().cloned());
    let bytes = msg.to_vec().ok()?;
    let truncated = bytes.get(2).is_none_or(|flags| flags & 0x02 != 0);
    (!truncated).then(|| bytes.into_boxed_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Edns;
    use hickory_proto::rr::RData;
    use hickory_proto::rr::rdata::A;

    fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut msg = Message::query();
        msg.metadata.id = 0xBEEF;
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
        if let Some(payload) = edns {
            let mut e = Edns::new();
            e.set_max_payload(payload);
            e.set_dnssec_ok(true);
            msg.set_edns(e);
        }
        msg.to_vec().expect("encode")
    }

    #[test]
    fn parses_plain_and_edns_queries() {
        let mut key = Vec::new();
        let q = parse_query(&query("Web.NS.svc.clusterset.local.", RecordType::A, None), &mut key)
            .expect("fast");
        assert_eq!(key, b"\x03web\x02ns\x03svc\x0aclusterset\x05local\x00".to_vec());
        assert_eq!(q.qtype, 1);
        assert_eq!(q.edns, None);
        assert_eq!(q.udp_limit(), 512);
        let q = parse_query(&query("a.b.", RecordType::SRV, Some(4096)), &mut key).expect("fast");
        assert_eq!(q.edns, Some((4096, true)));
        assert_eq!(q.qtype, 33);
    }

    #[test]
    fn rejects_what_the_slow_path_must_see() {
        let mut key = Vec::new();
        let good = query("a.b.", RecordType::A, None);
        let mut cases: Vec<(&str, Vec<u8>)> =
            vec![("empty", vec![]), ("short", good[..14].to_vec())];
        let mut resp = good.clone();
        resp[2] |= 0x80;
        cases.push(("response", resp));
        let mut notify = good.clone();
        notify[2] |= 4 << 3;
        cases.push(("opcode notify", notify));
        let mut two = good.clone();
        two[5] = 2;
        cases.push(("two questions", two));
        let mut chaos = good.clone();
        let n = chaos.len();
        chaos[n - 1] = 3;
        cases.push(("class CH", chaos));
        let mut trailing = good.clone();
        trailing.push(0);
        cases.push(("trailing bytes", trailing));
        let mut pointer = good.clone();
        pointer[12] = 0xC0;
        cases.push(("compressed qname", pointer));
        let mut v1 = query("a.b.", RecordType::A, Some(1232));
        let n = v1.len();
        v1[n - 5] = 1; // EDNS version
        cases.push(("edns version 1", v1));
        let with_options = |options: &[u8]| {
            let mut pkt = query("a.b.", RecordType::A, Some(1232));
            let n = pkt.len();
            pkt[n - 2..].copy_from_slice(&(options.len() as u16).to_be_bytes());
            pkt.extend_from_slice(options);
            pkt
        };
        // From the request_path fuzz target: option 26 claims 24 bytes, the RDATA has 8 left.
        cases.push(("option overruns the rdata", with_options(&[0, 26, 0, 24, 1, 2, 3, 4])));
        cases.push(("half an option header", with_options(&[0, 10, 0])));
        cases.push(("client subnet", with_options(&[0, 8, 0, 4, 0, 1, 0, 0])));
        for (name, pkt) in cases {
            assert!(parse_query(&pkt, &mut key).is_none(), "{name}");
        }
        let cookie = with_options(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(parse_query(&cookie, &mut key).is_some(), "a client cookie stays on the fast path");
    }

    #[test]
    fn assembles_with_client_id_case_and_opt() {
        let name = Name::from_ascii("x.clusterset.local.").expect("name");
        let rec = Record::from_rdata(name.clone(), 5, RData::A(A::new(10, 0, 0, 1)));
        let template = encode_template(&name, RecordType::A, &[rec], &[]).expect("template");
        let pkt = query("X.ClusterSet.LOCAL.", RecordType::A, Some(1232));
        let mut key = Vec::new();
        let q = parse_query(&pkt, &mut key).expect("fast");
        let mut out = Vec::new();
        assert!(assemble(&template, &pkt, &q, &mut out));
        let msg = Message::from_vec(&out).expect("decode");
        assert_eq!(msg.metadata.id, 0xBEEF);
        assert!(msg.metadata.authoritative && msg.metadata.recursion_desired);
        assert_eq!(msg.queries[0].name.to_ascii(), "X.ClusterSet.LOCAL.");
        assert_eq!(msg.answers.len(), 1);
        let edns = msg.edns.expect("opt echoed");
        assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
        assert!(edns.flags().dnssec_ok);
    }

    #[test]
    fn refuses_to_exceed_the_client_limit() {
        let name = Name::from_ascii("x.local.").expect("name");
        let recs: Vec<Record> = (0..60u8)
            .map(|i| Record::from_rdata(name.clone(), 5, RData::A(A::new(10, 0, 0, i))))
            .collect();
        let template = encode_template(&name, RecordType::A, &recs, &[]).expect("template");
        let pkt = query("x.local.", RecordType::A, None);
        let mut key = Vec::new();
        let q = parse_query(&pkt, &mut key).expect("fast");
        let mut out = Vec::new();
        assert!(!assemble(&template, &pkt, &q, &mut out));
        let pkt = query("x.local.", RecordType::A, Some(4096));
        let q = parse_query(&pkt, &mut key).expect("fast");
        assert_eq!(q.udp_limit(), usize::from(EDNS_PAYLOAD));
        assert!(assemble(&template, &pkt, &q, &mut out));
    }
}
