//! Larger GSO sends than quinn makes: the datagrams of consecutive quinn transmits to one
//! peer, held and sent as one batch.
//!
//! quinn 0.11 hands its socket at most 10 datagrams per transmit (`MAX_TRANSMIT_SEGMENTS` in
//! quinn's `connection.rs`; upstream: quinn-rs/quinn#2189, open), although Linux takes up to
//! 64 in one GSO send. At a 1500-byte path every send and every receive of a bulk transfer
//! then carries 14.5 KB, and the kernel's per-send work (and the receiver's per-GRO-batch work)
//! is paid 69 000 times per GB. [`Pending`] is the pure part of the remedy: which transmits may
//! join a held batch, and when a batch must go. The socket ([`crate::socket`]) holds a batch
//! while it can still grow and sends it when the next transmit does not fit, when it is full,
//! when it ends on a short datagram (the end of a burst), or, at the latest, when its flusher
//! task runs: right after the connection task that filled it yields.
//!
//! What it saves was measured in `bench/` (docs/benchmarks.md, session 19): this is the
//! hand-written part the house rule allows for a gain of at least 10 % on a headline figure.
//! Remove it when quinn sends larger batches itself.

use std::net::{IpAddr, SocketAddr};

use quinn::udp::{EcnCodepoint, Transmit};

use crate::socket::MAX_GSO_BYTES;

/// Datagrams held for one GSO send: all to one destination, with one ECN codepoint and source
/// address, every one `segment` bytes long except perhaps the last.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    buf: Vec<u8>,
    destination: Option<SocketAddr>,
    ecn: Option<EcnCodepoint>,
    src_ip: Option<IpAddr>,
    segment: usize,
}

/// The datagram size of `t` (its segment size, or its length for a single datagram).
fn segment_of(t: &Transmit<'_>) -> usize {
    t.segment_size.unwrap_or(t.contents.len())
}

impl Pending {
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Datagrams held.
    pub(crate) fn datagrams(&self) -> usize {
        self.buf.len().div_ceil(self.segment.max(1))
    }

    /// Whether a held batch would start with `t`: a GSO transmit of whole datagrams that has
    /// room after it for one more within `limit` datagrams and 64 KiB. Anything else (a single
    /// datagram, a short last datagram, a batch already at the limit) is sent as it is.
    pub(crate) fn starts(t: &Transmit<'_>, limit: usize) -> bool {
        let Some(segment) = t.segment_size.filter(|&s| s > 0) else { return false };
        let len = t.contents.len();
        len.is_multiple_of(segment) && len / segment < limit && len + segment <= MAX_GSO_BYTES
    }

    /// Whether `t` can join the held batch: same peer, ECN and source, datagrams of the same
    /// size (a smaller single datagram may end the batch), the batch so far ending on a whole
    /// datagram, and the total within `limit` datagrams and 64 KiB.
    pub(crate) fn fits(&self, t: &Transmit<'_>, limit: usize) -> bool {
        if self.is_empty() {
            return false;
        }
        let same_size = match t.segment_size {
            Some(s) => s == self.segment,
            None => t.contents.len() <= self.segment,
        };
        let total = self.buf.len() + t.contents.len();
        self.destination == Some(t.destination)
            && self.ecn == t.ecn
            && self.src_ip == t.src_ip
            && same_size
            && self.buf.len().is_multiple_of(self.segment)
            && total <= MAX_GSO_BYTES
            && total.div_ceil(self.segment) <= limit
    }

    /// Appends `t` (the caller checked [`Pending::starts`] on an empty batch, or
    /// [`Pending::fits`]).
    pub(crate) fn push(&mut self, t: &Transmit<'_>) {
        if self.is_empty() {
            self.destination = Some(t.destination);
            self.ecn = t.ecn;
            self.src_ip = t.src_ip;
            self.segment = segment_of(t);
            self.buf.reserve(MAX_GSO_BYTES);
        }
        self.buf.extend_from_slice(t.contents);
    }

    /// Whether the batch may wait for more: it ends on a whole datagram and has room for one
    /// more. Otherwise it goes now.
    pub(crate) fn can_grow(&self, limit: usize) -> bool {
        !self.is_empty()
            && self.buf.len().is_multiple_of(self.segment)
            && self.datagrams() < limit
            && self.buf.len() + self.segment <= MAX_GSO_BYTES
    }

    /// The batch as one transmit.
    pub(crate) fn transmit(&self) -> Option<Transmit<'_>> {
        Some(Transmit {
            destination: self.destination?,
            ecn: self.ecn,
            contents: &self.buf,
            segment_size: (self.buf.len() > self.segment).then_some(self.segment),
            src_ip: self.src_ip,
        })
    }

    /// Empties the batch, keeping its buffer.
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.destination = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64;

    fn to(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn transmit(bytes: &[u8], segment: Option<usize>, port: u16) -> Transmit<'_> {
        Transmit {
            destination: to(port),
            ecn: None,
            contents: bytes,
            segment_size: segment,
            src_ip: None,
        }
    }

    #[test]
    fn whole_batches_grow_into_one_send_and_a_short_datagram_ends_it() {
        let ten = vec![7u8; 10 * 1452];
        let tail = vec![9u8; 300];
        let t = transmit(&ten, Some(1452), 1);
        assert!(Pending::starts(&t, LIMIT));
        let mut p = Pending::default();
        p.push(&t);
        assert!(p.can_grow(LIMIT), "10 datagrams of 64 may wait for more");
        for _ in 0..3 {
            assert!(p.fits(&t, LIMIT));
            p.push(&t);
        }
        assert_eq!(p.datagrams(), 40);
        assert!(p.can_grow(LIMIT));
        // 40 × 1452 + 10 × 1452 = 72 600 bytes: over 64 KiB, so the fifth waits for the next.
        assert!(!p.fits(&t, LIMIT));
        let short = transmit(&tail, None, 1);
        assert!(p.fits(&short, LIMIT), "a smaller datagram may end the batch");
        p.push(&short);
        assert!(!p.can_grow(LIMIT), "a batch ending short goes now");
        let sent = p.transmit().expect("a batch");
        assert_eq!(sent.contents.len(), 40 * 1452 + 300);
        assert_eq!(sent.segment_size, Some(1452));
        assert_eq!(sent.destination, to(1));
        assert!(sent.contents.len() <= MAX_GSO_BYTES);
        assert_eq!(&sent.contents[..10 * 1452], &ten[..], "the bytes in the order given");
        assert_eq!(&sent.contents[40 * 1452..], &tail[..]);
        p.clear();
        assert!(p.is_empty() && p.transmit().is_none());
    }

    #[test]
    fn only_like_datagrams_to_the_same_peer_share_a_batch() {
        let ten = vec![1u8; 10 * 1452];
        let mut p = Pending::default();
        p.push(&transmit(&ten, Some(1452), 1));
        assert!(!p.fits(&transmit(&ten, Some(1452), 2), LIMIT), "another peer");
        let other = vec![1u8; 10 * 1200];
        assert!(!p.fits(&transmit(&other, Some(1200), 1), LIMIT), "another datagram size");
        let big = vec![1u8; 1500];
        assert!(!p.fits(&transmit(&big, None, 1), LIMIT), "a larger single datagram");
        let mut ecn = transmit(&ten, Some(1452), 1);
        ecn.ecn = Some(EcnCodepoint::Ce);
        assert!(!p.fits(&ecn, LIMIT), "another ECN codepoint");
        let mut from = transmit(&ten, Some(1452), 1);
        from.src_ip = Some(IpAddr::from([127, 0, 0, 2]));
        assert!(!p.fits(&from, LIMIT), "another source address");
        // The socket's own limit (e.g. 1 once GSO failed, or a smaller driver limit).
        assert!(!p.fits(&transmit(&ten, Some(1452), 1), 15));
        assert!(p.fits(&transmit(&ten, Some(1452), 1), 20));
    }

    #[test]
    fn what_cannot_grow_is_never_held() {
        let one = vec![0u8; 1452];
        assert!(!Pending::starts(&transmit(&one, None, 1), LIMIT), "a single datagram");
        let ragged = vec![0u8; 9 * 1452 + 100];
        assert!(
            !Pending::starts(&transmit(&ragged, Some(1452), 1), LIMIT),
            "a short last datagram"
        );
        let ten = vec![0u8; 10 * 1452];
        assert!(!Pending::starts(&transmit(&ten, Some(1452), 1), 10), "already at the limit");
        assert!(!Pending::starts(&transmit(&ten, Some(1452), 1), 1), "no GSO");
        let jumbo = vec![0u8; 7 * 8952];
        assert!(!Pending::starts(&transmit(&jumbo, Some(8952), 1), LIMIT), "no room in 64 KiB");
    }
}
