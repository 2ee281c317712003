//! The tunnel's UDP socket: bound with large buffers, then quinn's own socket (quinn-udp's
//! batched, GSO/GRO-aware I/O, registered with tokio by `quinn::TokioRuntime`), wrapped by
//! [`TunnelSocket`] for two things quinn 0.11 does not do:
//! - cut GSO batches over 64 KiB into whole-datagram sends: quinn batches up to 10 datagrams of
//!   the current path MTU, and with MTU discovery up to 8952 bytes (jumbo frames) a batch
//!   fails with EMSGSIZE, dropped without a trace, which MTU discovery then mistakes for a black
//!   hole (upstream: quinn-rs/quinn#2201, open; the PR that would have cut them in quinn-udp,
//!   #2653, was closed unmerged). Drop the cutting when quinn caps or cuts its batches;
//! - count junk datagrams at the tunnel port ([`crate::junk`]) and sends that found the socket
//!   buffer full.
//!
//! Until session 12 this was a hand-written socket with its own reactor registration
//! (read interest only, readiness cleared after a short batch); docs/benchmarks.md has what
//! returning to quinn's socket cost.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};

use crate::endpoint::TunnelError;

/// Largest payload of one UDP send, GSO batch included (65535 − IPv4 and UDP headers): a GSO
/// batch larger than this fails with EMSGSIZE, which quinn-udp drops silently.
pub(crate) const MAX_GSO_BYTES: usize = 65_507;

/// Binds the UDP socket with large buffers so bulk transfers do not drop: a datagram dropped
/// for a full receive buffer is a congestion event that halves the sending rate.
pub(crate) fn bind_udp(
    listen: SocketAddr,
    buffer: usize,
) -> Result<std::net::UdpSocket, TunnelError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind = |e| TunnelError::Bind(listen, e);
    let socket =
        Socket::new(Domain::for_address(listen), Type::DGRAM, Some(Protocol::UDP)).map_err(bind)?;
    grow_buffers(&socket, buffer);
    socket.bind(&listen.into()).map_err(bind)?;
    Ok(socket.into())
}

/// Asks for `want` bytes of receive and send buffer: forced past `net.core.rmem_max` /
/// `wmem_max` when the process has CAP_NET_ADMIN, else as much as those limits allow. Logs
/// what was granted when it is less, with the sysctl to raise.
pub(crate) fn grow_buffers(socket: &socket2::Socket, want: usize) {
    use rustix::net::sockopt;
    if sockopt::set_socket_recv_buffer_size_force(socket, want).is_err()
        && let Err(e) = socket.set_recv_buffer_size(want)
    {
        tracing::debug!(error = %e, "could not raise SO_RCVBUF");
    }
    if sockopt::set_socket_send_buffer_size_force(socket, want).is_err()
        && let Err(e) = socket.set_send_buffer_size(want)
    {
        tracing::debug!(error = %e, "could not raise SO_SNDBUF");
    }
    // Linux reports twice the size asked for (bookkeeping overhead included).
    let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
    if granted < want {
        tracing::info!(
            granted,
            wanted = want,
            "UDP receive buffer is smaller than asked for; bulk transfers may drop datagrams \
             (raise net.core.rmem_max, or run with CAP_NET_ADMIN)"
        );
    }
}

/// Byte ranges of `len` bytes of datagrams of `segment` bytes (the last may be shorter), cut
/// into sends of at most [`MAX_GSO_BYTES`] that keep datagram boundaries: quinn batches up to
/// 10 datagrams of the current MTU in one GSO send, and a batch over 64 KiB fails (EMSGSIZE,
/// dropped without a trace), which MTU discovery then mistakes for a black hole. Pure.
pub(crate) fn gso_chunks(
    len: usize,
    segment: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let step = (MAX_GSO_BYTES / segment.max(1)).max(1) * segment.max(1);
    (0..len).step_by(step).map(move |start| start..(start + step).min(len))
}

/// quinn's tokio socket with GSO batches cut to size and junk counted; see the module doc.
#[derive(Debug)]
pub(crate) struct TunnelSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    /// The last send found the buffer full (counted once per episode).
    full: AtomicBool,
    /// The key of the endpoint's connection-id generator, to count junk datagrams; `None`:
    /// not counted (a socket quinn rebinds).
    cid_key: Option<u64>,
}

impl TunnelSocket {
    /// Takes over a bound socket; registers it with the reactor of the runtime entered by the
    /// caller. With `cid_key` (the endpoint's connection-id key), junk datagrams are counted.
    pub(crate) fn new(socket: std::net::UdpSocket, cid_key: Option<u64>) -> io::Result<Arc<Self>> {
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        Ok(Arc::new(Self { inner, full: AtomicBool::new(false), cid_key }))
    }

    /// Counts the junk among `n` received datagram batches (each may hold several GRO
    /// segments of `stride` bytes).
    fn count_junk(&self, bufs: &[io::IoSliceMut<'_>], meta: &[RecvMeta], n: usize) {
        let Some(key) = self.cid_key else { return };
        let cids = quinn_proto::HashedConnectionIdGenerator::from_key(key);
        for (buf, meta) in bufs.iter().zip(meta).take(n) {
            for datagram in buf[..meta.len].chunks(meta.stride.max(1)) {
                if let Some(reason) = crate::junk::junk_reason(datagram, &cids) {
                    tracing::trace!(from = %meta.addr, reason, "junk datagram at the tunnel port");
                    metrics::counter!(crate::metrics::JUNK_DATAGRAMS_TOTAL, "reason" => reason)
                        .increment(1);
                }
            }
        }
    }

    fn send(&self, transmit: &Transmit) -> io::Result<()> {
        let sent = self.inner.try_send(transmit);
        match &sent {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !self.full.swap(true, Ordering::Relaxed) {
                    metrics::counter!(crate::metrics::SOCKET_FULL_TOTAL).increment(1);
                }
            }
            _ => self.full.store(false, Ordering::Relaxed),
        }
        sent
    }
}

impl AsyncUdpSocket for TunnelSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let segment = match transmit.segment_size {
            Some(segment) if transmit.contents.len() > MAX_GSO_BYTES => segment,
            _ => return self.send(transmit),
        };
        for (i, range) in gso_chunks(transmit.contents.len(), segment).enumerate() {
            let contents = &transmit.contents[range];
            let part = Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents,
                segment_size: (contents.len() > segment).then_some(segment),
                src_ip: transmit.src_ip,
            };
            match self.send(&part) {
                Ok(()) => {}
                // Nothing sent yet: quinn retries the whole batch when the socket is writable.
                Err(e) if i == 0 => return Err(e),
                // Part of the batch is out: the rest counts as lost on the wire (QUIC resends
                // it); reporting WouldBlock would make quinn send the first part twice.
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(self.inner.poll_recv(cx, bufs, meta))?;
        self.count_junk(bufs, meta, n);
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_sends_stay_under_64_kib_and_keep_datagram_boundaries() {
        // (bytes in quinn's batch, segment size, expected send lengths)
        let cases: [(usize, usize, &[usize]); 6] = [
            (10 * 1452, 1452, &[14_520]),
            (10 * 8952, 8952, &[7 * 8952, 3 * 8952]),
            (9 * 8952 + 100, 8952, &[7 * 8952, 2 * 8952 + 100]),
            (10 * 16_384, 16_384, &[3 * 16_384, 3 * 16_384, 3 * 16_384, 16_384]),
            (2 * 65_507, 65_507, &[65_507, 65_507]),
            (0, 1452, &[]),
        ];
        for (len, segment, want) in cases {
            let got: Vec<_> = gso_chunks(len, segment).collect();
            let lens: Vec<usize> = got.iter().map(|r| r.len()).collect();
            assert_eq!(lens, want, "{len} bytes of {segment}-byte datagrams");
            for r in &got {
                assert!(r.len() <= MAX_GSO_BYTES);
                assert_eq!(r.start % segment, 0, "a send starts on a datagram boundary");
            }
            assert_eq!(got.last().map_or(0, |r| r.end), len, "every byte is sent once");
        }
    }
}
