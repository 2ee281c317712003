//! Test helpers (feature `test-util`): an in-memory [`Tunnel`] that hands streams straight to
//! another data plane's acceptor, so the opener/acceptor protocol runs without QUIC.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fedgate_discovery::model::ClusterId;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::{BoxRecv, BoxSend, Incoming, Tunnel};

/// Size of each in-memory stream's buffer.
const PIPE_SIZE: usize = 256 * 1024;

/// An in-memory tunnel from `local` to peers registered with [`LoopTunnel::route`].
pub struct LoopTunnel {
    local: ClusterId,
    peers: Mutex<HashMap<ClusterId, (mpsc::Sender<Incoming>, bool)>>,
    draining: AtomicBool,
}

impl LoopTunnel {
    pub fn new(local: ClusterId) -> Arc<Self> {
        Arc::new(Self {
            local,
            peers: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
        })
    }

    /// Streams opened to `peer` go to `acceptor` (a data plane's `serve_tunnel` input).
    pub fn route(&self, peer: ClusterId, acceptor: mpsc::Sender<Incoming>) {
        self.lock().insert(peer, (acceptor, true));
    }

    /// Marks the connection to `peer` up or down.
    pub fn set_connected(&self, peer: &ClusterId, connected: bool) {
        if let Some(p) = self.lock().get_mut(peer) {
            p.1 = connected;
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ClusterId, (mpsc::Sender<Incoming>, bool)>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Tunnel for LoopTunnel {
    fn open(&self, peer: &ClusterId) -> BoxFuture<'static, Result<(BoxSend, BoxRecv), String>> {
        let target = self.lock().get(peer).filter(|p| p.1).map(|p| p.0.clone());
        let local = self.local.clone();
        let peer = peer.clone();
        Box::pin(async move {
            let tx = target.ok_or_else(|| format!("no connection to {peer}"))?;
            let (near, far) = tokio::io::duplex(PIPE_SIZE);
            let (near_r, near_w) = tokio::io::split(near);
            let (far_r, far_w) = tokio::io::split(far);
            tx.send(Incoming {
                peer: local,
                send: Box::new(far_w),
                recv: Box::new(far_r),
                runtime: None,
            })
            .await
            .map_err(|_| format!("{peer} is not accepting streams"))?;
            Ok((Box::new(near_w) as BoxSend, Box::new(near_r) as BoxRecv))
        })
    }

    fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    fn is_connected(&self, peer: &ClusterId) -> bool {
        self.lock().get(peer).is_some_and(|p| p.1)
    }
}
