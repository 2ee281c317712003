//! Streams on a peer connection. Every bidirectional stream starts with one kind byte:
//! [`KIND_CONTROL`] (HTTP/2 follows: the control channel, gRPC) or [`KIND_DATA`] (a data-plane
//! tunnel stream; the data plane defines what follows). Accepted streams are routed by it:
//! control streams to the control server's channel, data streams to the data plane's.

use std::io;
use std::time::Duration;

use fedgate_discovery::model::ClusterId;
use hyper_util::rt::TokioIo;
use quinn::VarInt;
use tokio::sync::mpsc;

use crate::endpoint::TunnelError;
use crate::io::QuicIo;

/// First byte of a control stream (HTTP/2 carrying the control channel's gRPC follows).
pub const KIND_CONTROL: u8 = 0x01;
/// First byte of a data-plane tunnel stream.
pub const KIND_DATA: u8 = 0x02;

/// How long a peer has to send the kind byte of a new stream.
const KIND_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// Stream reset codes.
const STREAM_BAD_KIND: u32 = 1;
const STREAM_NOT_SERVED: u32 = 2;

/// A data stream a peer opened to us; its kind byte is already consumed.
#[derive(Debug)]
pub struct IncomingStream {
    pub peer: ClusterId,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    /// The runtime of the thread that accepted it, where its connection's task runs: serve
    /// it there, and its packets reach it without a hop between threads.
    pub runtime: Option<tokio::runtime::Handle>,
}

/// Where accepted streams go, by kind.
#[derive(Clone)]
pub(crate) struct Routes {
    /// Control streams, for the control channel's server.
    pub control: mpsc::Sender<QuicIo>,
    /// Data streams, for the data plane.
    pub data: mpsc::Sender<IncomingStream>,
}

/// Opens a stream of `kind` to `peer` on `conn` and writes the kind byte.
pub(crate) async fn open(
    conn: &quinn::Connection,
    peer: &ClusterId,
    kind: u8,
) -> Result<(quinn::SendStream, quinn::RecvStream), TunnelError> {
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|source| TunnelError::OpenStream { peer: peer.clone(), source })?;
    send.write_all(&[kind])
        .await
        .map_err(|source| TunnelError::WriteKind { peer: peer.clone(), source })?;
    Ok((send, recv))
}

/// A gRPC channel whose connections are new control streams on `conn`.
pub(crate) async fn control_channel(
    conn: quinn::Connection,
    peer: ClusterId,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let conn = conn.clone();
        let peer = peer.clone();
        async move {
            let (mut send, recv) = conn.open_bi().await.map_err(io::Error::other)?;
            send.write_all(&[KIND_CONTROL]).await.map_err(io::Error::other)?;
            Ok::<_, io::Error>(TokioIo::new(QuicIo::new(peer, send, recv)))
        }
    });
    tonic::transport::Endpoint::from_static("http://peer.fedgate")
        .connect_with_connector(connector)
        .await
}

/// Accepts the streams a peer opens on `conn` and routes them by kind byte.
pub(crate) async fn accept_streams(conn: quinn::Connection, peer: ClusterId, routes: Routes) {
    let runtime = tokio::runtime::Handle::try_current().ok();
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let routes = routes.clone();
        let runtime = runtime.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            let mut kind = [0u8; 1];
            let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code: u32| {
                let _ = send.reset(VarInt::from_u32(code));
                let _ = recv.stop(VarInt::from_u32(code));
            };
            match tokio::time::timeout(KIND_BYTE_TIMEOUT, recv.read_exact(&mut kind)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "stream ended before its kind byte");
                    return refuse(&mut send, &mut recv, STREAM_BAD_KIND);
                }
                Err(_) => {
                    tracing::debug!(%peer, "no kind byte in time");
                    return refuse(&mut send, &mut recv, STREAM_BAD_KIND);
                }
            }
            match kind[0] {
                KIND_CONTROL => {
                    if let Err(mpsc::error::SendError(mut io)) =
                        routes.control.send(QuicIo::new(peer, send, recv)).await
                    {
                        let (s, r) = io.streams_mut();
                        refuse(s, r, STREAM_NOT_SERVED);
                    }
                }
                KIND_DATA => {
                    if let Err(mpsc::error::SendError(mut s)) =
                        routes.data.send(IncomingStream { peer, send, recv, runtime }).await
                    {
                        refuse(&mut s.send, &mut s.recv, STREAM_NOT_SERVED);
                    }
                }
                other => {
                    tracing::debug!(%peer, kind = other, "unknown stream kind; resetting");
                    refuse(&mut send, &mut recv, STREAM_BAD_KIND);
                }
            }
        });
    }
}
