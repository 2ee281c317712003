//! The data plane's view of `fedgate_tunnel`: [`PeerTunnel`] implements [`Tunnel`] over a
//! `PeerHandle`, and [`forward_incoming`] turns the tunnel's `IncomingStream`s into the
//! acceptor's input.

use std::sync::Arc;

use fedgate_discovery::model::{ClusterId, PeerStatus};
use fedgate_tunnel::{IncomingStream, PeerHandle};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use super::{BoxRecv, BoxSend, Incoming, Tunnel};

/// [`Tunnel`] over the QUIC endpoint's `PeerHandle`.
pub struct PeerTunnel {
    handle: PeerHandle,
    status: watch::Receiver<Arc<Vec<PeerStatus>>>,
}

impl PeerTunnel {
    pub fn new(handle: PeerHandle) -> Arc<Self> {
        let status = handle.status();
        Arc::new(Self { handle, status })
    }
}

impl Tunnel for PeerTunnel {
    fn open(&self, peer: &ClusterId) -> BoxFuture<'static, Result<(BoxSend, BoxRecv), String>> {
        let handle = self.handle.clone();
        let peer = peer.clone();
        Box::pin(async move {
            let (send, recv) = handle.open_stream(&peer).await.map_err(|e| e.to_string())?;
            Ok((Box::new(send) as BoxSend, Box::new(recv) as BoxRecv))
        })
    }

    fn set_draining(&self, draining: bool) {
        self.handle.set_draining(draining);
    }

    /// Connected and not announced draining. A cluster that is no configured peer cannot be
    /// reached.
    fn is_connected(&self, peer: &ClusterId) -> bool {
        self.handle.is_connected(peer)
            && !self.status.borrow().iter().any(|s| s.cluster == *peer && s.draining)
    }
}

/// Forwards the tunnel's incoming data streams to a receiver for `DataPlane::serve_tunnel`.
/// The forwarding task ends when either side is gone.
pub fn forward_incoming(mut streams: mpsc::Receiver<IncomingStream>) -> mpsc::Receiver<Incoming> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        while let Some(IncomingStream { peer, send, recv }) = streams.recv().await {
            let incoming = Incoming { peer, send: Box::new(send), recv: Box::new(recv) };
            if tx.send(incoming).await.is_err() {
                return;
            }
        }
    });
    rx
}
