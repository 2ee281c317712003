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
//! task runs: once the connection task that filled it has yielded twice. [`Pending::offer`] and
//! [`Pending::flush`] make every decision; the socket only supplies the send.
//!
//! What it saves was measured in `bench/` (docs/benchmarks.md, session 19): this is the
//! hand-written part the house rule allows for a gain of at least 10 % on a headline figure.
//! Remove it when quinn sends larger batches itself.

use std::io;
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

    /// Takes a transmit quinn hands the socket: sends what is held first if `t` cannot join
    /// it, then holds `t` if the batch can still grow, else sends it (alone or with what is
    /// held). `send` makes one UDP send of at most 64 KiB (or cuts a larger one) and fails with
    /// `WouldBlock` when the socket buffer is full.
    ///
    /// `Ok(true)`: a batch is held that nothing else will send — wake the flusher. `Ok(false)`:
    /// `t` was sent or is held behind a batch the flusher already knows of. `WouldBlock`: `t`
    /// was not taken (what was held before it still is); quinn retries it when the socket is
    /// writable. Other errors are passed on.
    pub(crate) fn offer(
        &mut self,
        t: &Transmit<'_>,
        limit: usize,
        send: &mut impl FnMut(&Transmit<'_>) -> io::Result<()>,
    ) -> io::Result<bool> {
        if !self.is_empty() && !self.fits(t, limit) {
            self.flush(send)?;
        }
        if self.is_empty() {
            if !Self::starts(t, limit) {
                send(t)?;
                return Ok(false);
            }
            self.push(t);
            return Ok(true);
        }
        self.push(t);
        if self.can_grow(limit) {
            return Ok(false);
        }
        match self.flush(send) {
            // `t` is held with the rest: the flusher sends it when there is room.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
            sent => sent.map(|()| false),
        }
    }

    /// Sends what is held, if anything. `WouldBlock`: it is still held; any other error: it is
    /// dropped (QUIC resends what was in it, as for a datagram lost on the wire).
    pub(crate) fn flush(
        &mut self,
        send: &mut impl FnMut(&Transmit<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        let sent = match self.transmit() {
            Some(t) => send(&t),
            None => return Ok(()),
        };
        if !matches!(&sent, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.clear();
        }
        sent
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

    /// quinn's side of the exchange in the randomized test: transmits of 1–10 datagrams of
    /// 1452 or 1200 bytes (the last sometimes short) to one of two peers, each datagram
    /// numbered in its first 4 bytes.
    fn random_transmit(rng: &mut impl rand::Rng, next: &mut u32) -> (SocketAddr, usize, Vec<u8>) {
        let segment = if rng.random_bool(0.8) { 1452 } else { 1200 };
        let count = rng.random_range(1..=10);
        let mut bytes = Vec::new();
        for i in 0..count {
            let len = if i + 1 == count && rng.random_bool(0.3) {
                rng.random_range(4..segment)
            } else {
                segment
            };
            let mut d = vec![0u8; len];
            d[..4].copy_from_slice(&next.to_be_bytes());
            *next += 1;
            bytes.extend_from_slice(&d);
        }
        (to(if rng.random_bool(0.9) { 1 } else { 2 }), segment, bytes)
    }

    /// The datagrams of a send, as (peer, number, length).
    fn datagrams_of(t: &Transmit<'_>) -> Vec<(SocketAddr, u32, usize)> {
        let segment = segment_of(t);
        t.contents
            .chunks(segment)
            .map(|d| (t.destination, u32::from_be_bytes(d[..4].try_into().expect("4")), d.len()))
            .collect()
    }

    #[test]
    fn whatever_the_socket_says_every_datagram_taken_leaves_once_and_in_order() {
        use rand::{Rng, SeedableRng};
        for seed in 0..200u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let limit = if seed % 5 == 0 { 20 } else { LIMIT };
            let full = rng.random_range(0.0..0.4); // how often the socket buffer is full
            let mut wire: Vec<(SocketAddr, u32, usize)> = Vec::new();
            let mut taken: Vec<(SocketAddr, u32, usize)> = Vec::new();
            let mut p = Pending::default();
            let mut send_rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xfeed);
            let mut send = |t: &Transmit<'_>| -> io::Result<()> {
                if send_rng.random_bool(full) {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let n = t.contents.len().div_ceil(segment_of(t));
                assert!(t.contents.len() <= MAX_GSO_BYTES, "seed {seed}: a send over 64 KiB");
                assert!(n <= limit.max(10), "seed {seed}: {n} datagrams in one send");
                let ds = datagrams_of(t);
                let segment = segment_of(t);
                assert!(
                    ds[..ds.len() - 1].iter().all(|d| d.2 == segment),
                    "seed {seed}: only the last datagram of a send may be short"
                );
                wire.extend(ds);
                Ok(())
            };
            let mut next = 0u32;
            let mut flusher_woken = false;
            for _ in 0..300 {
                let (dest, segment, bytes) = random_transmit(&mut rng, &mut next);
                let t = Transmit {
                    destination: dest,
                    ecn: None,
                    contents: &bytes,
                    segment_size: (bytes.len() > segment).then_some(segment),
                    src_ip: None,
                };
                // quinn retries a refused transmit once the socket is writable; meanwhile the
                // flusher may run.
                loop {
                    match p.offer(&t, limit, &mut send) {
                        Ok(wake) => {
                            flusher_woken |= wake;
                            taken.extend(datagrams_of(&t));
                            break;
                        }
                        Err(e) => {
                            // Refused as it came (a direct send), or behind a held batch that
                            // could not go first.
                            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "seed {seed}");
                            let _ = p.flush(&mut send);
                        }
                    }
                }
                if !p.is_empty() {
                    assert!(flusher_woken, "seed {seed}: a held batch the flusher was not told of");
                }
                if rng.random_bool(0.3) {
                    // The flusher's turn.
                    if p.flush(&mut send).is_ok() {
                        flusher_woken = false;
                    }
                }
            }
            while p.flush(&mut send).is_err() {}
            // The wire carries exactly what was taken, once each, in order.
            let first_difference = wire.iter().zip(&taken).position(|(w, t)| w != t);
            assert_eq!(first_difference, None, "seed {seed}: first datagram that differs");
            assert_eq!(wire.len(), taken.len(), "seed {seed}: datagrams on the wire and taken");
        }
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
