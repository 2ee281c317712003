//! The copy path: raw bytes both ways, half-close carried as TCP FIN ↔ stream FIN and errors
//! carried as TCP RST ↔ RESET_STREAM / STOP_SENDING.
//!
//! Between TCP and a tunnel stream the bytes are not copied in user space: TCP reads land in
//! a `BytesMut` that is frozen and handed to quinn whole (`write_chunk`, quinn keeps the
//! `Bytes` until acknowledged), and the chunks quinn received are written to TCP with one
//! `writev` (`read_chunks`). A read buffer is only allocated once the socket is readable, so
//! an idle proxied connection holds no copy buffer at all.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use super::metrics::ByteCounters;

/// Size of each TCP read buffer, and of each direction's copy buffer between two TCP
/// connections. 64 KiB is one loopback TCP segment and ~45 QUIC packets.
pub const BUFFER_SIZE: usize = 64 * 1024;
/// A fresh read buffer is taken when less than this is left of the current one.
const MIN_READ: usize = 16 * 1024;
/// The first read after a quiet spell takes only this much: a request, a reply or a banner
/// fits, and a connection that then goes quiet again touched one page, not sixteen. A read
/// that fills it means bulk data: the next ones take [`BUFFER_SIZE`].
const FIRST_READ: usize = 4 * 1024;
/// Received chunks written to TCP per `writev` (each chunk is one QUIC packet's payload).
const CHUNKS_PER_WRITE: usize = 64;

/// QUIC application error code on a stream reset because the TCP side reset or failed.
pub const RESET_CODE_ABORTED: u32 = 1;
/// QUIC application error code on a stream refused with a non-OK status.
pub const RESET_CODE_REFUSED: u32 = 2;

/// What the copy loop calls after every read or write that moved bytes. The data-plane thread
/// hands in its busy poller's mark (`DataThread::activity_hook`), which keeps the thread
/// polling for `traffic.busyPoll` after traffic; the copy loop knows nothing of the poller. A
/// plain function pointer: called per read, it must cost no allocation or lock.
#[derive(Clone, Copy)]
pub struct ActivityHook(fn());

impl ActivityHook {
    /// A hook that does nothing (no busy polling, tests).
    pub const NONE: Self = Self(|| {});

    pub const fn new(mark: fn()) -> Self {
        Self(mark)
    }

    /// Bytes moved.
    #[inline]
    pub fn mark(self) {
        (self.0)()
    }
}

impl Default for ActivityHook {
    fn default() -> Self {
        Self::NONE
    }
}

impl std::fmt::Debug for ActivityHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ActivityHook")
    }
}

/// The sending half of a tunnel stream.
pub trait TunnelSend: AsyncWrite + Send + Unpin {
    /// Abandons the stream (QUIC RESET_STREAM).
    fn reset(&mut self, code: u32);

    /// Writes all of `chunk`. quinn keeps the `Bytes` itself instead of copying them; the
    /// default copies through `AsyncWrite`.
    fn write_chunk(&mut self, chunk: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move { self.write_all(&chunk).await })
    }
}

/// The receiving half of a tunnel stream.
pub trait TunnelRecv: AsyncRead + Send + Unpin {
    /// Asks the peer to stop sending (QUIC STOP_SENDING).
    fn stop(&mut self, code: u32);

    /// Waits for the next data in stream order and fills `bufs` with as many chunks as are
    /// ready (at least one); 0 at the end of the stream. quinn hands out the received
    /// packets' payloads without copying; the default reads into one fresh buffer.
    fn read_chunks<'a>(&'a mut self, bufs: &'a mut [Bytes]) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(async move {
            let Some(first) = bufs.first_mut() else { return Ok(0) };
            let mut buf = BytesMut::with_capacity(BUFFER_SIZE);
            if self.read_buf(&mut buf).await? == 0 {
                return Ok(0);
            }
            *first = buf.freeze();
            Ok(1)
        })
    }
}

impl TunnelSend for quinn::SendStream {
    fn reset(&mut self, code: u32) {
        // Fails only when the stream is already finished or reset: nothing left to do.
        let _ = quinn::SendStream::reset(self, quinn::VarInt::from_u32(code));
    }

    fn write_chunk(&mut self, chunk: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(
            async move { quinn::SendStream::write_chunk(self, chunk).await.map_err(Into::into) },
        )
    }
}

impl TunnelRecv for quinn::RecvStream {
    fn stop(&mut self, code: u32) {
        let _ = quinn::RecvStream::stop(self, quinn::VarInt::from_u32(code));
    }

    fn read_chunks<'a>(&'a mut self, bufs: &'a mut [Bytes]) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(async move {
            match quinn::RecvStream::read_chunks(self, bufs).await {
                Ok(Some(n)) => Ok(n),
                Ok(None) => Ok(0),
                Err(e) => Err(e.into()),
            }
        })
    }
}

/// An in-memory tunnel half (tests, and the loopback tunnel of `test-util`).
impl TunnelSend for tokio::io::WriteHalf<tokio::io::DuplexStream> {
    fn reset(&mut self, _code: u32) {}
}

impl TunnelRecv for tokio::io::ReadHalf<tokio::io::DuplexStream> {
    fn stop(&mut self, _code: u32) {}
}

pub type BoxSend = Box<dyn TunnelSend>;
pub type BoxRecv = Box<dyn TunnelRecv>;

/// Copies between two TCP connections until both directions are closed. On an error both
/// are reset (RST), so a reset on one side shows as a reset on the other. Like the tunnel
/// path, each direction takes its buffer only once its socket is readable and gives it back
/// when a read drains the socket, so an idle connection holds no copy buffer (tokio's
/// `copy_bidirectional` holds two for the connection's life: 128 KiB each at our size).
pub async fn splice_tcp(
    mut client: TcpStream,
    mut upstream: TcpStream,
    bytes: &ByteCounters,
    activity: ActivityHook,
) -> io::Result<()> {
    let r = {
        let (mut client_r, mut client_w) = client.split();
        let (mut upstream_r, mut upstream_w) = upstream.split();
        tokio::try_join!(
            tcp_to_tcp(&mut client_r, &mut upstream_w, &bytes.tx, activity),
            tcp_to_tcp(&mut upstream_r, &mut client_w, &bytes.rx, activity),
        )
    };
    if r.is_err() {
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
    r.map(|_| ())
}

/// One direction of [`splice_tcp`] until EOF, which shuts the other side's write half.
async fn tcp_to_tcp(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    count: &AtomicU64,
    activity: ActivityHook,
) -> io::Result<()> {
    let mut buf = ReadBuf::new();
    loop {
        // No floor: room for the whole next read is made whenever less is spare.
        let n = buf.read(from, usize::MAX).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        activity.mark();
        count.fetch_add(n as u64, Ordering::Relaxed);
        to.write_all(&buf.bytes).await?;
        buf.passed_on(buf.drained());
    }
}

/// Copies between a TCP connection and a tunnel stream. `tcp_is_client`: the TCP side is the
/// client (opener gateway) rather than the endpoint (acceptor gateway); it decides which way
/// counts as `tx`. TCP EOF finishes the stream, stream FIN shuts the TCP write side; an error
/// on either side resets the stream and the TCP connection.
pub async fn splice_tunnel(
    mut tcp: TcpStream,
    mut send: BoxSend,
    mut recv: BoxRecv,
    bytes: &ByteCounters,
    tcp_is_client: bool,
    activity: ActivityHook,
) -> io::Result<()> {
    let (from_tcp, to_tcp) =
        if tcp_is_client { (&bytes.tx, &bytes.rx) } else { (&bytes.rx, &bytes.tx) };
    // Borrowed halves (no lock): reads go through `AsyncRead`, whose short read clears the
    // socket's readiness, writes through `&TcpStream` (readiness + try_write_vectored).
    let (mut reader, writer) = tcp.split();
    let r = tokio::try_join!(
        tcp_to_stream(&mut reader, &mut send, from_tcp, activity),
        stream_to_tcp(&mut recv, writer.as_ref(), to_tcp, activity),
    );
    if r.is_err() {
        let _ = tcp.set_zero_linger();
        send.reset(RESET_CODE_ABORTED);
        recv.stop(RESET_CODE_ABORTED);
    }
    r.map(|_| ())
}

/// TCP → stream until TCP EOF, which finishes the stream.
///
/// The buffer is taken only once the socket is readable and let go when a read drains it;
/// the read itself goes through `AsyncRead`, because tokio treats a read that does not fill
/// the buffer as proof the socket is drained and clears its readiness. `readable()` + `try_read` instead waits for the
/// `EAGAIN` of one more `recvfrom`: one syscall per request of a request/response exchange.
async fn tcp_to_stream(
    tcp: &mut ReadHalf<'_>,
    send: &mut BoxSend,
    count: &AtomicU64,
    activity: ActivityHook,
) -> io::Result<()> {
    let mut buf = ReadBuf::new();
    loop {
        // Reserving only below MIN_READ reuses the allocation when quinn has released every
        // chunk cut from it.
        match buf.read(tcp, MIN_READ).await? {
            0 => return send.shutdown().await,
            n => {
                activity.mark();
                count.fetch_add(n as u64, Ordering::Relaxed);
                // An idle connection holds no buffer: quinn frees the chunk once acknowledged.
                let drained = buf.drained();
                send.write_chunk(buf.bytes.split().freeze()).await?;
                buf.passed_on(drained);
            }
        }
    }
}

/// The read buffer of one direction out of a TCP socket: taken once the socket is readable,
/// let go when a read drains it.
struct ReadBuf {
    bytes: BytesMut,
    /// How much room the next read gets: [`FIRST_READ`] after an idle spell, [`BUFFER_SIZE`]
    /// while the socket keeps filling the buffer.
    want: usize,
}

impl ReadBuf {
    fn new() -> Self {
        Self { bytes: BytesMut::new(), want: FIRST_READ }
    }

    /// Waits until `from` is readable, then reads into the buffer, first reserving room for
    /// `want` bytes when fewer than `want.min(floor)` are spare. The bytes read: 0 at EOF.
    async fn read(&mut self, from: &mut ReadHalf<'_>, floor: usize) -> io::Result<usize> {
        from.as_ref().readable().await?;
        if self.bytes.capacity() - self.bytes.len() < self.want.min(floor) {
            self.bytes.reserve(self.want);
        }
        from.read_buf(&mut self.bytes).await
    }

    /// Whether the last read left room: it drained the socket.
    fn drained(&self) -> bool {
        self.bytes.len() < self.bytes.capacity()
    }

    /// The bytes read were passed on. After a read that `drained` the socket the next bytes
    /// may be long in coming, so the buffer is let go; otherwise it is kept, emptied, and the
    /// next read gets a whole [`BUFFER_SIZE`].
    fn passed_on(&mut self, drained: bool) {
        if drained {
            self.bytes = BytesMut::new();
            self.want = FIRST_READ;
        } else {
            self.bytes.clear();
            self.want = BUFFER_SIZE;
        }
    }
}

/// Stream → TCP until the stream's FIN, which shuts the TCP write side.
async fn stream_to_tcp(
    recv: &mut BoxRecv,
    tcp: &TcpStream,
    count: &AtomicU64,
    activity: ActivityHook,
) -> io::Result<()> {
    let mut chunks: [Bytes; CHUNKS_PER_WRITE] = std::array::from_fn(|_| Bytes::new());
    loop {
        let n = recv.read_chunks(&mut chunks).await?;
        if n == 0 {
            return socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write);
        }
        activity.mark();
        let written = write_all_vectored(tcp, &mut chunks[..n]).await?;
        count.fetch_add(written as u64, Ordering::Relaxed);
    }
}

/// Writes every chunk to `tcp` with as few `writev` calls as the socket allows; leaves the
/// chunks empty. Returns the bytes written.
async fn write_all_vectored(tcp: &TcpStream, chunks: &mut [Bytes]) -> io::Result<usize> {
    let mut total = 0;
    let mut first = 0;
    while first < chunks.len() {
        tcp.writable().await?;
        let written = {
            let mut iov = [IoSlice::new(&[]); CHUNKS_PER_WRITE];
            let pending = &chunks[first..];
            for (slot, chunk) in iov.iter_mut().zip(pending) {
                *slot = IoSlice::new(chunk);
            }
            tcp.try_write_vectored(&iov[..pending.len().min(CHUNKS_PER_WRITE)])
        };
        match written {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(mut n) => {
                total += n;
                while n > 0 {
                    let len = chunks[first].len();
                    if n >= len {
                        chunks[first] = Bytes::new();
                        first += 1;
                        n -= len;
                    } else {
                        let _ = chunks[first].split_to(n);
                        n = 0;
                    }
                }
                while first < chunks.len() && chunks[first].is_empty() {
                    first += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn tcp_splice_carries_half_close_and_counts() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_up, mut server) = pair().await;
        let bytes = std::sync::Arc::new(ByteCounters::default());
        let b2 = bytes.clone();
        let task = tokio::spawn(async move {
            splice_tcp(proxy_client, proxy_up, &b2, ActivityHook::NONE).await
        });
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The server still writes after the client's half-close.
        server.write_all(b"world!").await.unwrap();
        drop(server);
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"world!");
        task.await.unwrap().unwrap();
        assert_eq!(bytes.tx.load(Ordering::Relaxed), 5);
        assert_eq!(bytes.rx.load(Ordering::Relaxed), 6);
    }

    #[tokio::test]
    async fn tunnel_splice_over_in_memory_stream() {
        let (mut client, proxy_client) = pair().await;
        let (near, far) = tokio::io::duplex(64 * 1024);
        let (near_r, near_w) = tokio::io::split(near);
        let bytes = std::sync::Arc::new(ByteCounters::default());
        let b2 = bytes.clone();
        let task = tokio::spawn(async move {
            splice_tunnel(
                proxy_client,
                Box::new(near_w),
                Box::new(near_r),
                &b2,
                true,
                ActivityHook::NONE,
            )
            .await
        });
        let (mut far_r, mut far_w) = tokio::io::split(far);
        client.write_all(&[7u8; 300_000]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        far_r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 300_000);
        far_w.write_all(b"ok").await.unwrap();
        far_w.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"ok");
        task.await.unwrap().unwrap();
        assert_eq!(bytes.tx.load(Ordering::Relaxed), 300_000);
        assert_eq!(bytes.rx.load(Ordering::Relaxed), 2);
    }
}
