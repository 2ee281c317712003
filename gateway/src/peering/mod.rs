//! Discovery's peer sessions over the QUIC tunnel. The tunnel is transport only and discovery
//! knows nothing of QUIC (DESIGN.md: the peer session is generic over a control channel that
//! the gateway wires to the tunnel): [`TunnelConnector`] implements discovery's
//! `ControlConnector` over the tunnel's `PeerHandle`, and [`Peering`] builds the two together,
//! the tunnel's incoming control streams feeding the sessions' exchange server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedgate_discovery::model::{ClusterId, ExportSet, PeerUpdate};
use fedgate_discovery::peers::{
    BoxError, ControlConnector, ControlLink, PeerSessions, PeersError, PeersHandle,
    SessionSettings, TransportReplica, TransportStatus,
};
use fedgate_tunnel::{
    Identity, IncomingStream, PeerConnection, PeerHandle, QuicIo, TunnelEndpoint, TunnelError,
    TunnelSettings,
};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;

#[cfg(test)]
mod tests;

/// Capacity of the channel of control streams from the tunnel to the exchange server.
const CONTROL_STREAM_CHANNEL: usize = 64;

/// Discovery's view of the tunnel.
pub struct TunnelConnector(PeerHandle);

/// One working tunnel connection, for discovery's sessions.
#[derive(Clone)]
pub struct TunnelLink(PeerConnection);

impl ControlLink for TunnelLink {
    fn id(&self) -> usize {
        self.0.id()
    }

    fn remote(&self) -> String {
        self.0.remote().to_string()
    }

    fn set_draining(&self, draining: bool) {
        self.0.set_draining(draining);
    }

    fn set_synced(&self) {
        self.0.set_synced();
    }

    fn channel(&self) -> BoxFuture<'static, Result<tonic::transport::Channel, BoxError>> {
        let conn = self.0.clone();
        Box::pin(async move { conn.control_channel().await.map_err(BoxError::from) })
    }

    fn closed(&self) -> BoxFuture<'static, ()> {
        let conn = self.0.clone();
        Box::pin(async move { conn.closed().await })
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

impl ControlConnector for TunnelConnector {
    type Link = TunnelLink;

    fn links(&self, peer: &ClusterId) -> BoxStream<'static, Vec<TunnelLink>> {
        match self.0.connections(peer) {
            Some(rx) => {
                WatchStream::new(rx).map(|c| c.into_iter().map(TunnelLink).collect()).boxed()
            }
            None => futures::stream::empty().boxed(),
        }
    }

    fn transport(&self, peer: &ClusterId) -> TransportStatus {
        self.0
            .link_status(peer)
            .map(|s| TransportStatus {
                address: s.address,
                connected: s.connected,
                rtt_ms: s.rtt_ms,
                path_mtu: s.path_mtu,
                last_error: s.last_error,
                expected_replicas: s.expected_replicas,
                replicas: s
                    .replicas
                    .into_iter()
                    .map(|r| TransportReplica {
                        address: r.address.to_string(),
                        connected: r.connected,
                        direction: r.direction.to_owned(),
                        rtt_ms: r.rtt_ms,
                        path_mtu: r.path_mtu,
                        connected_secs: r.connected_secs,
                        lanes: r.lanes,
                        send_window_bytes: r.send_window_bytes,
                        last_error: r.last_error,
                    })
                    .collect(),
            })
            .unwrap_or_default()
    }
}

/// Errors building the tunnel and the sessions.
#[derive(Debug, thiserror::Error)]
pub enum PeeringError {
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error(transparent)]
    Sessions(#[from] PeersError),
}

impl PeeringError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PeeringError::Tunnel(e) => e.reason(),
            PeeringError::Sessions(_) => "settings",
        }
    }
}

/// The tunnel and the peer sessions over it. `new` binds the tunnel's UDP port; `run` serves
/// both until shutdown.
pub struct Peering {
    tunnel: TunnelEndpoint,
    sessions: PeerSessions<TunnelConnector>,
    control: mpsc::Receiver<QuicIo>,
}

impl Peering {
    /// Binds the tunnel with `settings` and `identity`, with sessions with its peers under
    /// `peer_lease_duration`: `local_exports` is served to peers (once `exports_ready`), their
    /// exports go to
    /// `updates`, the data streams they open to `incoming_data`. Call inside a runtime.
    pub fn new(
        settings: TunnelSettings,
        peer_lease_duration: Duration,
        identity: Identity,
        local_exports: watch::Receiver<Arc<ExportSet>>,
        exports_ready: watch::Receiver<bool>,
        updates: mpsc::Sender<PeerUpdate>,
        incoming_data: mpsc::Sender<IncomingStream>,
    ) -> Result<Self, PeeringError> {
        let mut session_settings = SessionSettings::new(
            settings.local.clone(),
            settings.peers.iter().map(|p| p.id.clone()).collect(),
        );
        session_settings.peer_lease_duration = peer_lease_duration;
        let (control_tx, control) = mpsc::channel(CONTROL_STREAM_CHANNEL);
        let tunnel = TunnelEndpoint::new(settings, identity, control_tx, incoming_data)?;
        let sessions = PeerSessions::new(
            session_settings,
            TunnelConnector(tunnel.handle()),
            local_exports,
            updates,
        )?
        .with_exports_ready(exports_ready);
        Ok(Self { tunnel, sessions, control })
    }

    /// The tunnel's UDP address actually bound.
    pub fn address(&self) -> SocketAddr {
        self.tunnel.address()
    }

    /// The tunnel (its certificates and reloads).
    pub fn tunnel(&self) -> &TunnelEndpoint {
        &self.tunnel
    }

    /// Data streams and the transport's view of each peer.
    pub fn handle(&self) -> PeerHandle {
        self.tunnel.handle()
    }

    /// The sessions' status (transport and session per peer) and the draining announcement.
    pub fn sessions(&self) -> PeersHandle {
        self.sessions.handle()
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let Self { tunnel, sessions, control } = self;
        tokio::join!(tunnel.run(shutdown.clone()), sessions.run(control, shutdown));
    }
}
