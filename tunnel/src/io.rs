//! A QUIC bidirectional stream as one byte stream, for HTTP/2 (gRPC) to run on.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use fedgate_discovery::model::ClusterId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The two halves of a QUIC stream joined, tagged with the peer it leads to.
#[derive(Debug)]
pub struct QuicIo {
    peer: ClusterId,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl QuicIo {
    pub fn new(peer: ClusterId, send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Self { peer, send, recv }
    }

    pub fn peer(&self) -> &ClusterId {
        &self.peer
    }

    /// Both halves, e.g. to reset them.
    pub fn streams_mut(&mut self) -> (&mut quinn::SendStream, &mut quinn::RecvStream) {
        (&mut self.send, &mut self.recv)
    }
}

/// What a gRPC handler can learn of the connection it serves: the verified peer.
#[derive(Clone, Debug)]
pub struct ControlPeer(pub ClusterId);

impl tonic::transport::server::Connected for QuicIo {
    type ConnectInfo = ControlPeer;
    fn connect_info(&self) -> ControlPeer {
        ControlPeer(self.peer.clone())
    }
}

impl AsyncRead for QuicIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.get_mut().recv), cx, buf)
    }
}

impl AsyncWrite for QuicIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().send), cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_shutdown(cx)
    }
}
