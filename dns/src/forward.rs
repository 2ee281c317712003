//! Forwarding of names outside our zones to the upstream resolvers, with a bounded cache.
//! Every forwarded query finishes within the configured budget: an upstream that does not
//! answer costs its share of the budget, and when all fail the client gets SERVFAIL.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use hickory_proto::op::Query;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout_at};

use crate::metrics;
use crate::names::wire_key;
use crate::wire::EDNS_PAYLOAD;

/// Upper bound on how long a forwarded answer is cached, whatever its TTL says.
const MAX_CACHE_TTL: u32 = 300;

/// Why a forwarded query failed (the client gets SERVFAIL).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream dns server configured")]
    NoUpstream,
    #[error("upstream {0} did not answer in time")]
    Timeout(SocketAddr),
    #[error("exchange with upstream {0} failed: {1}")]
    Io(SocketAddr, #[source] io::Error),
    #[error("upstream {0} sent an answer that does not parse or match: {1}")]
    BadResponse(SocketAddr, String),
    #[error("upstream {0} answered {1}")]
    Upstream(SocketAddr, ResponseCode),
    #[error("cannot encode the upstream query: {0}")]
    Encode(String),
}

impl ForwardError {
    pub fn reason(&self) -> &'static str {
        match self {
            ForwardError::NoUpstream => "no_upstream",
            ForwardError::Timeout(_) => "timeout",
            ForwardError::Io(..) => "error",
            ForwardError::BadResponse(..) => "bad_response",
            ForwardError::Upstream(..) => "servfail",
            ForwardError::Encode(_) => "error",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    name: Vec<u8>,
    qtype: u16,
    qclass: u16,
    dnssec_ok: bool,
}

struct Cached {
    message: Message,
    stored: Instant,
    ttl: u32,
}

/// Bounded cache: at most `capacity` answers, the oldest insertion evicted first.
struct Cache {
    capacity: usize,
    entries: HashMap<CacheKey, Cached>,
    order: VecDeque<CacheKey>,
}

impl Cache {
    fn get(&mut self, key: &CacheKey, now: Instant) -> Option<Message> {
        let cached = self.entries.get(key)?;
        let age = now.saturating_duration_since(cached.stored).as_secs();
        let age = u32::try_from(age).unwrap_or(u32::MAX);
        if age >= cached.ttl {
            self.entries.remove(key);
            return None;
        }
        let mut message = cached.message.clone();
        for record in message
            .answers
            .iter_mut()
            .chain(message.authorities.iter_mut())
            .chain(message.additionals.iter_mut())
        {
            record.ttl = record.ttl.saturating_sub(age);
        }
        Some(message)
    }

    fn insert(&mut self, key: CacheKey, message: Message, ttl: u32, now: Instant) {
        if self.capacity == 0 || ttl == 0 {
            return;
        }
        while self.entries.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.entries.remove(&old);
                }
                None => break,
            }
        }
        if self.entries.insert(key.clone(), Cached { message, stored: now, ttl }).is_none() {
            self.order.push_back(key);
        }
        // Keys replaced in place stay in `order` once; stale keys of expired entries are
        // dropped when they reach the front.
        if self.order.len() > self.capacity.saturating_mul(2) {
            self.order.retain(|k| self.entries.contains_key(k));
        }
    }
}

/// Whether an upstream's rcode is an answer to pass on to the client: NOERROR and NXDOMAIN.
/// Anything else says the upstream failed (SERVFAIL, REFUSED, NOTIMP), did not understand us
/// (FORMERR) or is about our exchange with it, not the name (extended rcodes from its EDNS such
/// as BADVERS or BADCOOKIE, which a client without EDNS would read as NOERROR): the next
/// upstream is tried, and the client gets SERVFAIL when none answers.
pub fn relayable(rcode: ResponseCode) -> bool {
    matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain)
}

/// How long an upstream answer may be cached: the smallest TTL in it, for negative answers
/// the SOA's (RFC 2308), never more than [`MAX_CACHE_TTL`]. `None`: do not cache.
pub fn cache_ttl(message: &Message) -> Option<u32> {
    match message.metadata.response_code {
        ResponseCode::NoError | ResponseCode::NXDomain => {}
        _ => return None,
    }
    if message.metadata.truncation {
        return None;
    }
    let negative =
        message.answers.is_empty() || message.metadata.response_code == ResponseCode::NXDomain;
    let ttl = if negative {
        message.authorities.iter().find_map(|r| match &r.data {
            RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
            _ => None,
        })?
    } else {
        message.answers.iter().chain(message.authorities.iter()).map(|r| r.ttl).min()?
    };
    Some(ttl.min(MAX_CACHE_TTL))
}

/// The forwarder: upstream list, budget and cache.
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    budget: Duration,
    cache: Mutex<Cache>,
}

/// One forwarded question.
#[derive(Clone, Debug)]
pub struct Question {
    pub name: Name,
    pub qtype: RecordType,
    pub qclass: DNSClass,
    pub dnssec_ok: bool,
    pub checking_disabled: bool,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, budget: Duration, cache_entries: usize) -> Self {
        Self {
            upstreams,
            budget,
            cache: Mutex::new(Cache {
                capacity: cache_entries,
                entries: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Answers `q` from the cache or upstream, within the budget.
    pub async fn forward(&self, q: &Question) -> Result<Message, ForwardError> {
        let key = CacheKey {
            name: wire_key(&q.name),
            qtype: u16::from(q.qtype),
            qclass: u16::from(q.qclass),
            dnssec_ok: q.dnssec_ok,
        };
        let now = Instant::now();
        if let Some(hit) = self.cache.lock().ok().and_then(|mut c| c.get(&key, now)) {
            metrics::cache_hit();
            return Ok(hit);
        }
        metrics::cache_miss();
        let result = self.ask_upstreams(q).await;
        metrics::forwarded(match &result {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        });
        if let Ok(message) = &result
            && let Some(ttl) = cache_ttl(message)
            && let Ok(mut cache) = self.cache.lock()
        {
            cache.insert(key, message.clone(), ttl, Instant::now());
        }
        result
    }

    async fn ask_upstreams(&self, q: &Question) -> Result<Message, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let deadline = Instant::now() + self.budget;
        let mut last = ForwardError::NoUpstream;
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // Each remaining upstream gets an equal share of what is left of the budget.
            let left = (self.upstreams.len() - i) as u32;
            let share = deadline.saturating_duration_since(now) / left.max(1);
            match exchange(*upstream, q, now + share).await {
                Ok(message) if relayable(message.metadata.response_code) => return Ok(message),
                Ok(message) => {
                    last = ForwardError::Upstream(*upstream, message.metadata.response_code);
                }
                Err(e) => {
                    tracing::debug!(upstream = %upstream, error = %e, "upstream dns query failed");
                    last = e;
                }
            }
        }
        Err(last)
    }
}

fn query_bytes(q: &Question, id: u16) -> Result<Vec<u8>, ForwardError> {
    let mut msg = Message::query();
    msg.metadata.id = id;
    msg.metadata.recursion_desired = true;
    msg.metadata.checking_disabled = q.checking_disabled;
    let mut query = Query::query(q.name.clone(), q.qtype);
    query.query_class = q.qclass;
    msg.add_query(query);
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    edns.set_dnssec_ok(q.dnssec_ok);
    msg.set_edns(edns);
    msg.to_vec().map_err(|e| ForwardError::Encode(e.to_string()))
}

/// Why an upstream datagram was not taken as the answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Not a response to this query (unparseable, other ID or question): a stray or a
    /// spoofing attempt; keep waiting.
    NotOurs,
    /// Our answer, but it would not survive being relayed: re-encoded it does not parse
    /// (e.g. a zero-length record outside an UPDATE). Relaying it would hand the client
    /// garbage; the upstream counts as failed.
    Unrelayable(String),
}

/// Parses an upstream's datagram and keeps it only if it answers `q` sent with `id` (a
/// response, opcode QUERY, our ID and exactly our question: name compared
/// case-insensitively, type, class) and re-encodes to a message that parses again.
pub fn accept_answer(q: &Question, id: u16, bytes: &[u8]) -> Result<Message, Rejected> {
    let msg = Message::from_vec(bytes).map_err(|_| Rejected::NotOurs)?;
    if msg.metadata.message_type != MessageType::Response
        || msg.metadata.op_code != OpCode::Query
        || !matches(q, id, &msg)
    {
        return Err(Rejected::NotOurs);
    }
    let again = msg.to_vec().map_err(|e| Rejected::Unrelayable(e.to_string()))?;
    Message::from_vec(&again).map_err(|e| Rejected::Unrelayable(e.to_string()))?;
    Ok(msg)
}

fn matches(q: &Question, id: u16, msg: &Message) -> bool {
    msg.metadata.id == id
        && msg.queries.len() == 1
        && msg.queries[0].query_type() == q.qtype
        && msg.queries[0].query_class() == q.qclass
        && msg.queries[0].name.eq_ignore_root(&q.name)
}

/// One exchange with one upstream: UDP, then TCP when the answer was truncated.
async fn exchange(
    upstream: SocketAddr,
    q: &Question,
    deadline: Instant,
) -> Result<Message, ForwardError> {
    let id: u16 = rand::random();
    let bytes = query_bytes(q, id)?;
    let io = |e| ForwardError::Io(upstream, e);
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).await.map_err(io)?;
    socket.connect(upstream).await.map_err(io)?;
    socket.send(&bytes).await.map_err(io)?;
    let mut buf = vec![0u8; 65_535];
    let message = loop {
        let n = match timeout_at(deadline, socket.recv(&mut buf)).await {
            Err(_) => return Err(ForwardError::Timeout(upstream)),
            Ok(Err(e)) => return Err(io(e)),
            Ok(Ok(n)) => n,
        };
        // Ignore strays and spoofing attempts: only our ID and question count.
        match accept_answer(q, id, &buf[..n]) {
            Ok(msg) => break msg,
            Err(Rejected::NotOurs) => continue,
            Err(Rejected::Unrelayable(why)) => {
                return Err(ForwardError::BadResponse(upstream, why));
            }
        }
    };
    if !message.metadata.truncation {
        return Ok(message);
    }
    match timeout_at(deadline, exchange_tcp(upstream, q)).await {
        Err(_) => Err(ForwardError::Timeout(upstream)),
        Ok(result) => result,
    }
}

async fn exchange_tcp(upstream: SocketAddr, q: &Question) -> Result<Message, ForwardError> {
    let io = |e| ForwardError::Io(upstream, e);
    let id: u16 = rand::random();
    let bytes = query_bytes(q, id)?;
    let len =
        u16::try_from(bytes.len()).map_err(|_| ForwardError::Encode("query too long".into()))?;
    let mut stream = TcpStream::connect(upstream).await.map_err(io)?;
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes);
    stream.write_all(&out).await.map_err(io)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await.map_err(io)?;
    accept_answer(q, id, &buf).map_err(|rejected| {
        let why = match rejected {
            Rejected::NotOurs => "does not parse, or id or question mismatch".into(),
            Rejected::Unrelayable(why) => why,
        };
        ForwardError::BadResponse(upstream, why)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, SOA};

    fn answer(rcode: ResponseCode, ttls: &[u32], soa: Option<(u32, u32)>) -> Message {
        let name = Name::from_ascii("x.example.").expect("name");
        let mut m = Message::query();
        m.metadata.response_code = rcode;
        for t in ttls {
            m.add_answer(Record::from_rdata(name.clone(), *t, RData::A(A::new(192, 0, 2, 1))));
        }
        if let Some((ttl, minimum)) = soa {
            let soa = SOA::new(name.clone(), name.clone(), 1, 1, 1, 1, minimum);
            m.add_authority(Record::from_rdata(name.clone(), ttl, RData::SOA(soa)));
        }
        m
    }

    #[test]
    fn cache_ttls() {
        let cases = [
            ("positive min", answer(ResponseCode::NoError, &[30, 10], None), Some(10)),
            ("capped", answer(ResponseCode::NoError, &[86_400], None), Some(MAX_CACHE_TTL)),
            ("nxdomain soa", answer(ResponseCode::NXDomain, &[], Some((60, 20))), Some(20)),
            ("nodata soa ttl", answer(ResponseCode::NoError, &[], Some((15, 20))), Some(15)),
            ("negative without soa", answer(ResponseCode::NXDomain, &[], None), None),
            ("servfail", answer(ResponseCode::ServFail, &[30], None), None),
        ];
        for (name, msg, want) in cases {
            assert_eq!(cache_ttl(&msg), want, "{name}");
        }
    }

    fn question() -> Question {
        Question {
            name: Name::from_ascii("www.example.com.").expect("name"),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
            dnssec_ok: false,
            checking_disabled: false,
        }
    }

    #[test]
    fn accepts_only_our_relayable_answer() {
        let mut ours = Message::query();
        ours.metadata.id = 0x1234;
        ours.metadata.message_type = MessageType::Response;
        ours.add_query(Query::query(
            Name::from_ascii("WWW.example.com.").expect("n"),
            RecordType::A,
        ));
        let good = ours.to_vec().expect("encode");
        let mut other_id = ours.clone();
        other_id.metadata.id = 1;
        let mut query = ours.clone();
        query.metadata.message_type = MessageType::Query;
        let mut aaaa = ours.clone();
        aaaa.queries[0].query_type = RecordType::AAAA;
        let mut chaos = ours.clone();
        chaos.queries[0].query_class = DNSClass::CH;
        // Found by the forward_response fuzz target: opcode UPDATE, where a zero-length CNAME
        // of class 256 parses; relayed in our QUERY answer it made the client's answer
        // unparseable. Not an answer to our query.
        let zero_length: &[u8] = &[
            18, 52, 173, 128, 0, 1, 0, 1, 0, 0, 0, 0, 3, 119, 119, 119, 7, 101, 120, 97, 109, 112,
            108, 101, 3, 99, 111, 109, 0, 0, 1, 0, 1, 192, 12, 0, 5, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1,
            0, 0, 0, 30, 0, 6, 3, 119, 59, 98, 192, 16,
        ];
        let cases: [(&str, Vec<u8>, Option<bool>); 7] = [
            ("ours", good.clone(), None),
            ("garbage", vec![0x12, 0x34, 0xFF], Some(true)),
            ("other id", other_id.to_vec().expect("encode"), Some(true)),
            ("a query, not a response", query.to_vec().expect("encode"), Some(true)),
            ("other type", aaaa.to_vec().expect("encode"), Some(true)),
            ("other class", chaos.to_vec().expect("encode"), Some(true)),
            ("opcode update, zero-length record", zero_length.to_vec(), Some(true)),
        ];
        for (name, bytes, rejected) in cases {
            let got = accept_answer(&question(), 0x1234, &bytes);
            match rejected {
                None => assert!(got.is_ok(), "{name}: {got:?}"),
                Some(true) => assert_eq!(got.err(), Some(Rejected::NotOurs), "{name}"),
                Some(false) => {
                    assert!(matches!(got, Err(Rejected::Unrelayable(_))), "{name}: {got:?}")
                }
            }
        }
    }

    #[test]
    fn only_answers_about_the_name_are_relayed() {
        let cases = [
            (ResponseCode::NoError, true),
            (ResponseCode::NXDomain, true),
            (ResponseCode::ServFail, false),
            (ResponseCode::Refused, false),
            (ResponseCode::NotImp, false),
            (ResponseCode::FormErr, false),
            (ResponseCode::BADVERS, false),
            // Found by the forward_response fuzz target: extended rcode 3328 (EDNS high bits
            // 208) was relayed to a client without EDNS as NOERROR.
            (ResponseCode::Unknown(3328), false),
        ];
        for (rcode, want) in cases {
            assert_eq!(relayable(rcode), want, "{rcode:?}");
        }
    }

    #[test]
    fn cache_is_bounded_and_ages_ttls() {
        let mut cache = Cache { capacity: 2, entries: HashMap::new(), order: VecDeque::new() };
        let now = Instant::now();
        let key = |n: u8| CacheKey { name: vec![n], qtype: 1, qclass: 1, dnssec_ok: false };
        for n in 0..5 {
            cache.insert(key(n), answer(ResponseCode::NoError, &[30], None), 30, now);
        }
        assert_eq!(cache.entries.len(), 2);
        assert!(cache.get(&key(0), now).is_none());
        let later = now + Duration::from_secs(10);
        let hit = cache.get(&key(4), later).expect("cached");
        assert_eq!(hit.answers[0].ttl, 20);
        assert!(cache.get(&key(4), now + Duration::from_secs(31)).is_none());
    }
}
