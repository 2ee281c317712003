//! The tunnel's UDP socket: bound with large buffers, then quinn's own socket (quinn-udp's
//! batched, GSO/GRO-aware I/O, registered with tokio by `quinn::TokioRuntime`), wrapped by
//! [`TunnelSocket`] for two things quinn 0.11 does not do:
//! - cut GSO batches over 64 KiB into whole-datagram sends: quinn batches up to 10 datagrams of
//!   the current path MTU, and with MTU discovery up to 8952 bytes (jumbo frames) a batch
//!   fails with EMSGSIZE, dropped without a trace, which MTU discovery then mistakes for a black
//!   hole (upstream: quinn-rs/quinn#2201, open; the PR that would have cut them in quinn-udp,
//!   #2653, was closed unmerged). Drop the cutting when quinn caps or cuts its batches;
//! - join quinn's batches of at most 10 datagrams into GSO sends of up to 64 KiB
//!   ([`crate::coalesce`]: a third of the sends in a bulk transfer at 1452 bytes, 13 % less CPU
//!   per GB through a gateway pair). A transmit of whole datagrams that leaves room is held;
//!   the next one joins it or, if it cannot, sends it first; a short datagram ends the batch; a
//!   flusher task sends what is still held once quinn's connection task has yielded twice. A lone
//!   datagram (request/response traffic, ACKs on their own) is never held;
//! - count junk datagrams at the tunnel port ([`crate::junk`]), sends that found the socket
//!   buffer full, and sends and datagrams sent.
//!
//! Until session 12 this was a hand-written socket with its own reactor registration
//! (read interest only, readiness cleared after a short batch); docs/benchmarks.md has what
//! returning to quinn's socket cost.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use tokio::sync::Notify;

use crate::coalesce::Pending;

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

/// quinn's tokio socket with GSO batches cut to size, quinn's batches joined into larger ones
/// and junk counted; see the module doc.
#[derive(Debug)]
pub(crate) struct TunnelSocket {
    out: Arc<Out>,
    /// quinn's batches are joined ([`crate::coalesce`]): a flusher task runs.
    coalesce: bool,
    /// The key of the endpoint's connection-id generator, to count junk datagrams; `None`:
    /// not counted (a socket quinn rebinds).
    cid_key: Option<u64>,
}

/// The sending side, shared with the flusher task.
#[derive(Debug)]
struct Out {
    inner: Arc<dyn AsyncUdpSocket>,
    /// The last send found the buffer full (counted once per episode).
    full: AtomicBool,
    /// Datagrams quinn handed over, held for one larger send.
    pending: Mutex<Pending>,
    /// Wakes the flusher: a batch is held, or the socket is gone.
    wake: Notify,
    /// The socket is gone: the flusher ends.
    closed: AtomicBool,
    /// UDP sends made and datagrams in them (GSO batches count each of their datagrams).
    sends: AtomicU64,
    datagrams: AtomicU64,
    /// The same two as metrics, registered once: a lookup by name on every send is work the
    /// send path need not do (the recorder is installed before any socket exists).
    sends_metric: metrics::Counter,
    datagrams_metric: metrics::Counter,
}

impl TunnelSocket {
    /// Takes over a bound socket; registers it with the reactor of the runtime entered by the
    /// caller, where the flusher task of held batches runs too. With `cid_key` (the endpoint's
    /// connection-id key), junk datagrams are counted.
    pub(crate) fn new(socket: std::net::UdpSocket, cid_key: Option<u64>) -> io::Result<Arc<Self>> {
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        let out = Arc::new(Out {
            inner,
            full: AtomicBool::new(false),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            sends: AtomicU64::new(0),
            datagrams: AtomicU64::new(0),
            sends_metric: metrics::counter!(crate::metrics::UDP_SENDS_TOTAL),
            datagrams_metric: metrics::counter!(crate::metrics::UDP_DATAGRAMS_SENT_TOTAL),
        });
        // Without a runtime to run the flusher on, quinn's batches are sent as they come.
        let coalesce = tokio::runtime::Handle::try_current().is_ok();
        if coalesce {
            tokio::spawn(flusher(out.clone()));
        }
        Ok(Arc::new(Self { out, coalesce, cid_key }))
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
}

impl Drop for TunnelSocket {
    fn drop(&mut self) {
        self.out.closed.store(true, Ordering::Release);
        self.out.wake.notify_one();
    }
}

impl Out {
    fn send(&self, transmit: &Transmit) -> io::Result<()> {
        let sent = self.inner.try_send(transmit);
        match &sent {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !self.full.swap(true, Ordering::Relaxed) {
                    metrics::counter!(crate::metrics::SOCKET_FULL_TOTAL).increment(1);
                }
            }
            Err(_) => self.full.store(false, Ordering::Relaxed),
            Ok(()) => {
                self.full.store(false, Ordering::Relaxed);
                let datagrams = match transmit.segment_size {
                    Some(segment) => transmit.contents.len().div_ceil(segment.max(1)),
                    None => 1,
                } as u64;
                self.sends.fetch_add(1, Ordering::Relaxed);
                self.datagrams.fetch_add(datagrams, Ordering::Relaxed);
                self.sends_metric.increment(1);
                self.datagrams_metric.increment(datagrams);
            }
        }
        sent
    }

    /// Sends `transmit` as it is, cut into sends of at most 64 KiB.
    fn send_cut(&self, transmit: &Transmit) -> io::Result<()> {
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

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends what is held ([`Pending::flush`]).
    fn flush(&self) -> io::Result<()> {
        self.pending().flush(&mut |t| self.send_cut(t))
    }
}

/// Sends what [`TunnelSocket::try_send`] held, once the connection task that handed it over
/// has yielded twice, and waits for room when the socket buffer is full. Ends when the socket
/// is dropped.
///
/// Why twice: quinn's connection task sends at most 20 datagrams per turn and then yields; the
/// flusher, woken during that turn, runs after it, and by yielding once more lets the next turn
/// add its datagrams too (batches of up to 40 instead of 20 at 1452 bytes: 1.46–1.49 CPU s/GB
/// against 1.60–2.26 in `quic_ceiling`, three runs each, docs/benchmarks.md session 19).
async fn flusher(out: Arc<Out>) {
    let mut poller = out.inner.clone().create_io_poller();
    loop {
        out.wake.notified().await;
        tokio::task::yield_now().await;
        loop {
            if out.closed.load(Ordering::Acquire) {
                return;
            }
            match out.flush() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let writable =
                        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await;
                    if let Err(e) = writable {
                        tracing::debug!(error = %e, "tunnel socket not writable; held datagrams dropped");
                        out.pending().clear();
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "held datagrams not sent; QUIC resends them");
                    break;
                }
                Ok(()) => break,
            }
        }
    }
}

impl AsyncUdpSocket for TunnelSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.out.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if !self.coalesce {
            return self.out.send_cut(transmit);
        }
        let limit = self.out.inner.max_transmit_segments();
        let wake = self.out.pending().offer(transmit, limit, &mut |t| self.out.send_cut(t))?;
        if wake {
            self.out.wake.notify_one();
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(self.out.inner.poll_recv(cx, bufs, meta))?;
        self.count_junk(bufs, meta, n);
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.out.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.out.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.out.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.out.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datagram `i` of a test batch: `len` bytes, each `i`.
    fn datagram(i: u8, len: usize) -> Vec<u8> {
        vec![i; len]
    }

    /// Reads datagrams from `rx` until none comes for 200 ms.
    fn received(rx: &std::net::UdpSocket) -> Vec<Vec<u8>> {
        rx.set_read_timeout(Some(std::time::Duration::from_millis(200))).expect("timeout");
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = rx.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    #[tokio::test]
    async fn quinns_batches_leave_as_one_gso_send_in_order_and_a_held_one_soon() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let other = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let socket = TunnelSocket::new(tx, None).expect("socket");
        assert!(socket.coalesce, "a runtime is entered: batches are joined");
        let limit = socket.max_transmit_segments();
        assert!(limit >= 41, "this kernel takes GSO sends of 64 datagrams (got {limit})");
        let to = rx.local_addr().expect("addr");
        // As quinn does: the socket's readiness is known once the reactor has reported it.
        let mut poller = socket.clone().create_io_poller();
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await.expect("writable");
        let send = |first: u8, count: u8, len: usize, segment: Option<usize>, to: SocketAddr| {
            let bytes: Vec<u8> = (first..first + count).flat_map(|i| datagram(i, len)).collect();
            let t = Transmit {
                destination: to,
                ecn: None,
                contents: &bytes,
                segment_size: segment,
                src_ip: None,
            };
            socket.try_send(&t).expect("send");
        };
        let sends = || socket.out.sends.load(Ordering::Relaxed);

        // Four transmits of 10 full datagrams, as quinn makes them, then a short one: one send.
        for batch in 0..4 {
            send(batch * 10, 10, 1452, Some(1452), to);
        }
        assert_eq!(sends(), 0, "40 datagrams held: room for more");
        send(40, 1, 300, None, to);
        assert_eq!(sends(), 1, "the short datagram ends the batch: one send of 41");
        let got = received(&rx);
        assert_eq!(got.len(), 41);
        for (i, d) in got.iter().enumerate() {
            let len = if i == 40 { 300 } else { 1452 };
            assert_eq!(d, &datagram(i as u8, len), "datagram {i}, in order and intact");
        }

        // Held, then nothing more: the flusher sends them once this task yields.
        send(0, 10, 1452, Some(1452), to);
        send(10, 10, 1452, Some(1452), to);
        assert_eq!(sends(), 1);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(sends(), 2, "the flusher sent the 20 held datagrams as one");
        assert_eq!(received(&rx).len(), 20);

        // A transmit to another peer sends what is held for the first before it.
        let elsewhere = other.local_addr().expect("addr");
        send(0, 10, 1452, Some(1452), to);
        send(50, 10, 1452, Some(1452), elsewhere);
        assert_eq!(sends(), 3, "the first peer's batch went when the second's began");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(sends(), 4);
        assert_eq!(received(&rx).len(), 10);
        let there = received(&other);
        assert_eq!(there.len(), 10);
        assert_eq!(there[0], datagram(50, 1452));

        // A lone datagram (a request/response exchange) is never held.
        send(7, 1, 1100, None, to);
        assert_eq!(sends(), 5);
        assert_eq!(received(&rx), vec![datagram(7, 1100)]);
        assert_eq!(socket.out.datagrams.load(Ordering::Relaxed), 41 + 20 + 20 + 1);
    }

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
