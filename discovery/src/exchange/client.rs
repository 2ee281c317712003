//! The watching side of the exchange: follows one peer's export set.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use tonic::transport::Channel;

use crate::exchange::convert::{ConvertError, services_from_proto, snapshot_from_proto};
use crate::exchange::delta::{apply_delta, reuse_unchanged};
use crate::exchange::proto::{self, exchange_client::ExchangeClient, export_update::Kind};
use crate::exchange::server::MAX_MESSAGE_SIZE;
use crate::model::{ClusterId, ExportSet, Locality, ServiceKey};

/// Why watching a peer's exports stopped. The caller resets the session and resyncs.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("watch rpc to peer {peer} failed: {status}")]
    Rpc { peer: ClusterId, status: Box<tonic::Status> },
    #[error("peer {peer} sent a bad update: {source}")]
    Invalid {
        peer: ClusterId,
        #[source]
        source: ConvertError,
    },
    #[error(
        "peer {peer} sent the exports of cluster {claimed:?} (check its cluster.id and certificate)"
    )]
    WrongCluster { peer: ClusterId, claimed: String },
    #[error("peer {peer} sent a delta from version {base} but we hold {held:?}")]
    OutOfOrder { peer: ClusterId, base: u64, held: Option<u64> },
    #[error("peer {peer} ended the watch stream")]
    Ended { peer: ClusterId },
}

impl ExchangeError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ExchangeError::Rpc { .. } => "rpc",
            ExchangeError::Invalid { .. } => "invalid_message",
            ExchangeError::WrongCluster { .. } => "wrong_cluster",
            ExchangeError::OutOfOrder { .. } => "out_of_order",
            ExchangeError::Ended { .. } => "ended",
        }
    }
}

/// What one update from a peer amounted to.
#[derive(Clone, Debug)]
pub enum PeerEvent {
    /// A snapshot or delta was applied: the peer's whole export set as it is now.
    Exports {
        set: Arc<ExportSet>,
        draining: bool,
        /// The serving replica's instance id, with a snapshot (the first update of a watch).
        instance: Option<String>,
    },
    /// Nothing changed; the peer is alive.
    Heartbeat { version: u64, draining: bool },
}

impl PeerEvent {
    pub fn draining(&self) -> bool {
        match self {
            PeerEvent::Exports { draining, .. } | PeerEvent::Heartbeat { draining, .. } => {
                *draining
            }
        }
    }
}

/// One peer's export set as rebuilt from its updates. Pure: no I/O, so it is tested with
/// tables of messages.
#[derive(Clone, Debug)]
pub struct PeerExports {
    peer: ClusterId,
    /// The last set we held, also across sessions (to keep `Arc`s of unchanged services).
    current: Option<Arc<ExportSet>>,
    /// Whether this session received its snapshot (deltas before it are out of order).
    synced: bool,
}

impl PeerExports {
    /// Starts a session with `peer`; `previous` is what an earlier session left.
    pub fn new(peer: ClusterId, previous: Option<Arc<ExportSet>>) -> Self {
        Self { peer, current: previous, synced: false }
    }

    pub fn current(&self) -> Option<&Arc<ExportSet>> {
        self.current.as_ref()
    }

    /// Applies one update.
    pub fn apply(&mut self, update: proto::ExportUpdate) -> Result<PeerEvent, ExchangeError> {
        let peer = &self.peer;
        let invalid = |source: ConvertError| ExchangeError::Invalid { peer: peer.clone(), source };
        let draining = update.draining;
        match update.kind {
            None => {
                Err(invalid(ConvertError { field: "kind".into(), reason: "must be set".into() }))
            }
            Some(Kind::Heartbeat(_)) => {
                if !self.synced {
                    return Err(ExchangeError::OutOfOrder {
                        peer: peer.clone(),
                        base: update.version,
                        held: None,
                    });
                }
                Ok(PeerEvent::Heartbeat { version: update.version, draining })
            }
            Some(Kind::Snapshot(snapshot)) => {
                if snapshot.cluster != peer.as_str() {
                    return Err(ExchangeError::WrongCluster {
                        peer: peer.clone(),
                        claimed: snapshot.cluster,
                    });
                }
                let instance = Some(snapshot.instance.clone()).filter(|i| !i.is_empty());
                let fresh = snapshot_from_proto(snapshot, update.version).map_err(invalid)?;
                let set = Arc::new(reuse_unchanged(self.current.as_deref(), fresh));
                self.current = Some(set.clone());
                self.synced = true;
                Ok(PeerEvent::Exports { set, draining, instance })
            }
            Some(Kind::Delta(delta)) => {
                let held = self.current.as_ref().map(|c| c.version);
                let base = match &self.current {
                    Some(base) if self.synced && base.version == delta.base_version => base,
                    _ => {
                        return Err(ExchangeError::OutOfOrder {
                            peer: peer.clone(),
                            base: delta.base_version,
                            held: held.filter(|_| self.synced),
                        });
                    }
                };
                let upserts =
                    services_from_proto(delta.upserts, peer, "delta.upserts").map_err(invalid)?;
                let removed = delta
                    .removed
                    .into_iter()
                    .enumerate()
                    .map(|(i, k)| {
                        ServiceKey::try_from(k).map_err(|e| e.within(format!("delta.removed[{i}]")))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(invalid)?;
                let locality = delta.locality.map(Locality::from);
                let set = Arc::new(apply_delta(base, update.version, locality, upserts, removed));
                self.current = Some(set.clone());
                Ok(PeerEvent::Exports { set, draining, instance: None })
            }
        }
    }
}

/// How to watch a peer.
#[derive(Clone, Debug)]
pub struct WatchSettings {
    /// Our own cluster id (sent to the peer).
    pub local: ClusterId,
    /// The peer we expect to be talking to; a snapshot of another cluster is refused.
    pub peer: ClusterId,
    /// How often the peer should send a heartbeat when nothing changes (our lease / 3).
    pub heartbeat_interval: Duration,
}

enum State {
    Start(Channel, WatchSettings, PeerExports),
    Streaming(tonic::Streaming<proto::ExportUpdate>, PeerExports),
    Done,
}

/// Watches the peer behind `channel`: a stream of events, each with the peer's whole export
/// set (or a heartbeat). The first error ends the stream: the caller resets the session and
/// calls again (with the last set as `previous`, so unchanged services keep their `Arc`s).
pub fn watch_peer(
    channel: Channel,
    settings: WatchSettings,
    previous: Option<Arc<ExportSet>>,
) -> BoxStream<'static, Result<PeerEvent, ExchangeError>> {
    let exports = PeerExports::new(settings.peer.clone(), previous);
    Box::pin(futures::stream::unfold(State::Start(channel, settings, exports), step))
}

async fn step(state: State) -> Option<(Result<PeerEvent, ExchangeError>, State)> {
    let (mut stream, mut exports) = match state {
        State::Done => return None,
        State::Streaming(stream, exports) => (stream, exports),
        State::Start(channel, settings, exports) => {
            let mut client = ExchangeClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE);
            let request = proto::WatchRequest {
                cluster: settings.local.to_string(),
                known_version: exports.current().map_or(0, |c| c.version),
                heartbeat_interval_ms: u32::try_from(settings.heartbeat_interval.as_millis())
                    .unwrap_or(u32::MAX),
            };
            match client.watch(request).await {
                Ok(response) => (response.into_inner(), exports),
                Err(status) => {
                    let err = ExchangeError::Rpc { peer: settings.peer, status: Box::new(status) };
                    return Some((Err(err), State::Done));
                }
            }
        }
    };
    let peer = exports.peer.clone();
    match stream.message().await {
        Ok(Some(update)) => match exports.apply(update) {
            Ok(event) => Some((Ok(event), State::Streaming(stream, exports))),
            Err(err) => Some((Err(err), State::Done)),
        },
        Ok(None) => Some((Err(ExchangeError::Ended { peer }), State::Done)),
        Err(status) => {
            Some((Err(ExchangeError::Rpc { peer, status: Box::new(status) }), State::Done))
        }
    }
}

/// The stream `watch_peer` returns.
pub type PeerEventStream = BoxStream<'static, Result<PeerEvent, ExchangeError>>;
