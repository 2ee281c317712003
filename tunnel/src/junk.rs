//! Datagrams at the tunnel port that cannot be QUIC for this gateway, counted
//! (`fedgate_tunnel_junk_datagrams_total{reason}`): quinn drops them silently, and an operator
//! under a flood of garbage (1.7 M junk datagrams in issue 17's attack) saw nothing.
//!
//! The test is cheap and never wrong about our own traffic: a long header must carry QUIC v1
//! (or a draft quinn speaks, or 0 for version negotiation), a short header must be long enough
//! to hold our connection id and a header-protection sample, and its connection id must be one
//! this gateway's keyed generator signed (every id a peer sends us came from it). Random bytes
//! fail one of these with near certainty. A stateless reset from a restarted peer looks like
//! a short header with random bytes and is counted too; those are rare.

use quinn_proto::{ConnectionId, ConnectionIdGenerator, HashedConnectionIdGenerator};

/// Bytes after the packet number offset that header protection samples (RFC 9001 5.4.2: 4
/// bytes of packet number, then a 16-byte sample).
const SAMPLE_SPAN: usize = 20;

/// Why `datagram` cannot be QUIC for us, or `None` when it may be.
pub(crate) fn junk_reason(
    datagram: &[u8],
    cids: &HashedConnectionIdGenerator,
) -> Option<&'static str> {
    let &first = datagram.first()?;
    if first & 0x80 != 0 {
        let Some(version) = datagram.get(1..5) else { return Some("too_short") };
        let version = u32::from_be_bytes([version[0], version[1], version[2], version[3]]);
        // v1, quinn's drafts (0xff00_001d..), version negotiation (0).
        let known = version == 1 || version == 0 || version >> 8 == 0x00ff_0000;
        return (!known).then_some("unknown_version");
    }
    let len = cids.cid_len();
    if datagram.len() < 1 + len + SAMPLE_SPAN {
        return Some("too_short");
    }
    cids.validate(&ConnectionId::new(&datagram[1..1 + len])).is_err().then_some("connection_id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_told_from_quic_for_us() {
        let mut cids = HashedConnectionIdGenerator::from_key(42);
        let ours = cids.generate_cid();
        let theirs = HashedConnectionIdGenerator::from_key(7).generate_cid();
        let short = |cid: &ConnectionId, len: usize| {
            let mut p = vec![0x40];
            p.extend_from_slice(cid);
            p.resize(len, 0xab);
            p
        };
        let long = |version: u32| {
            let mut p = vec![0xc0];
            p.extend_from_slice(&version.to_be_bytes());
            p.resize(1200, 0);
            p
        };
        // (what, datagram, reason)
        let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
            ("a short header with our id", short(&ours, 60), None),
            ("a v1 Initial", long(1), None),
            ("a draft-29 Initial", long(0xff00_001d), None),
            ("version negotiation", long(0), None),
            ("an id another key signed", short(&theirs, 60), Some("connection_id")),
            ("our id, too short for a sample", short(&ours, 20), Some("too_short")),
            ("an unknown version", long(0x1234_5678), Some("unknown_version")),
            ("a long header cut off", vec![0xc0, 0, 0], Some("too_short")),
            (
                "ASCII",
                b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n".to_vec(),
                Some("connection_id"),
            ),
        ];
        for (what, datagram, want) in cases {
            assert_eq!(junk_reason(&datagram, &cids), want, "{what}");
        }
        assert_eq!(junk_reason(&[], &cids), None, "nothing to judge");
        // Random bytes: nearly all junk (the chance that 4 random bytes are a known version
        // or that a random id carries a valid signature is tiny).
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x2545_f491);
        let mut junk = 0;
        for _ in 0..1000 {
            let mut datagram = [0u8; 64];
            rand::RngCore::fill_bytes(&mut rng, &mut datagram);
            junk += usize::from(junk_reason(&datagram, &cids).is_some());
        }
        assert!(junk >= 995, "random datagrams counted as junk: {junk} of 1000");
    }
}
