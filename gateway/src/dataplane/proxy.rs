//! The copy path: raw bytes both ways with large reusable buffers, half-close carried as
//! TCP FIN ↔ stream FIN and errors carried as TCP RST ↔ RESET_STREAM / STOP_SENDING.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::metrics::ByteCounters;

/// Size of each direction's copy buffer, allocated once per connection: 2 × 64 KiB per
/// proxied connection keeps 10 000 connections near 1.3 GiB at worst.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// QUIC application error code on a stream reset because the TCP side reset or failed.
pub const RESET_CODE_ABORTED: u32 = 1;
/// QUIC application error code on a stream refused with a non-OK status.
pub const RESET_CODE_REFUSED: u32 = 2;

/// The sending half of a tunnel stream.
pub trait TunnelSend: AsyncWrite + Send + Unpin {
    /// Abandons the stream (QUIC RESET_STREAM).
    fn reset(&mut self, code: u32);
}

/// The receiving half of a tunnel stream.
pub trait TunnelRecv: AsyncRead + Send + Unpin {
    /// Asks the peer to stop sending (QUIC STOP_SENDING).
    fn stop(&mut self, code: u32);
}

impl TunnelSend for quinn::SendStream {
    fn reset(&mut self, code: u32) {
        // Fails only when the stream is already finished or reset: nothing left to do.
        let _ = quinn::SendStream::reset(self, quinn::VarInt::from_u32(code));
    }
}

impl TunnelRecv for quinn::RecvStream {
    fn stop(&mut self, code: u32) {
        let _ = quinn::RecvStream::stop(self, quinn::VarInt::from_u32(code));
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

/// Counts bytes read from and written to the inner stream.
struct Counted<'a, S> {
    inner: S,
    bytes: &'a ByteCounters,
    /// true: reads count as `tx` (the client side); false: reads count as `rx`.
    reads_are_tx: bool,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            let c = if self.reads_are_tx { &self.bytes.tx } else { &self.bytes.rx };
            c.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            let c = if self.reads_are_tx { &self.bytes.rx } else { &self.bytes.tx };
            c.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies between two TCP connections until both directions are closed. On an error both
/// are reset (RST), so a reset on one side shows as a reset on the other.
pub async fn splice_tcp(
    client: TcpStream,
    mut upstream: TcpStream,
    bytes: &ByteCounters,
) -> io::Result<()> {
    let mut client = Counted { inner: client, bytes, reads_are_tx: true };
    let r = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        BUFFER_SIZE,
        BUFFER_SIZE,
    )
    .await;
    if r.is_err() {
        let _ = client.inner.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
    r.map(|_| ())
}

/// Copies between a TCP connection and a tunnel stream. `tcp_is_client`: the TCP side is the
/// client (opener gateway) rather than the endpoint (acceptor gateway); it decides which way
/// counts as `tx`. TCP EOF finishes the stream, stream FIN shuts the TCP write side; an error
/// on either side resets the stream and the TCP connection.
pub async fn splice_tunnel(
    tcp: TcpStream,
    send: BoxSend,
    recv: BoxRecv,
    bytes: &ByteCounters,
    tcp_is_client: bool,
) -> io::Result<()> {
    let mut tcp = Counted { inner: tcp, bytes, reads_are_tx: tcp_is_client };
    let mut stream = tokio::io::join(recv, send);
    let r =
        tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut stream, BUFFER_SIZE, BUFFER_SIZE)
            .await;
    if r.is_err() {
        let _ = tcp.inner.set_zero_linger();
        let (mut recv, mut send) = stream.into_inner();
        send.reset(RESET_CODE_ABORTED);
        recv.stop(RESET_CODE_ABORTED);
    }
    r.map(|_| ())
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
        let task = tokio::spawn(async move { splice_tcp(proxy_client, proxy_up, &b2).await });
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
            splice_tunnel(proxy_client, Box::new(near_w), Box::new(near_r), &b2, true).await
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
