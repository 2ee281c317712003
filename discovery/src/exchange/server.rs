//! The server side of the exchange: streams the local export set to one watcher.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::exchange::convert::snapshot_to_proto;
use crate::exchange::delta::diff_exports;
use crate::exchange::proto::{self, exchange_server::Exchange, export_update::Kind};
use crate::model::ExportSet;

/// Largest message either side sends or accepts. A snapshot of 10 000 services with a few
/// endpoints each is a few MiB; tonic's default (4 MiB) is too small for big clustersets.
pub const MAX_MESSAGE_SIZE: usize = 256 * 1024 * 1024;
/// Heartbeat interval when the watcher does not ask for one.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Bounds on the heartbeat interval a watcher may ask for.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(50);
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(60);

/// Serves the local export set to watchers.
#[derive(Clone)]
pub struct ExchangeService {
    local: watch::Receiver<Arc<ExportSet>>,
    draining: watch::Receiver<bool>,
    instance: Arc<str>,
    /// Watches get their first snapshot once this is true (the local set is complete).
    ready: watch::Receiver<bool>,
}

impl ExchangeService {
    /// `local` is the local export set as the LocalExports task publishes it; `draining`
    /// is true while this gateway drains (sent with every update and heartbeat).
    pub fn new(local: watch::Receiver<Arc<ExportSet>>, draining: watch::Receiver<bool>) -> Self {
        Self { local, draining, instance: Arc::from(""), ready: watch::channel(true).1 }
    }

    /// Holds every watch's first snapshot until `ready` is true (`LocalExports::complete`):
    /// a replica whose cluster source has not synced serves nothing rather than an empty
    /// set, which would replace its sibling replicas' full one at the peers.
    pub fn with_ready(mut self, ready: watch::Receiver<bool>) -> Self {
        self.ready = ready;
        self
    }

    /// Announces `instance` (this replica's instance id) in every snapshot.
    pub fn with_instance(mut self, instance: &str) -> Self {
        self.instance = Arc::from(instance);
        self
    }
}

/// The tonic service of `service`, with message size limits for large export sets.
pub fn exchange_server(
    service: ExchangeService,
) -> proto::exchange_server::ExchangeServer<ExchangeService> {
    proto::exchange_server::ExchangeServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<proto::ExportUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Exchange for ExchangeService {
    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let req = request.into_inner();
        let heartbeat = match req.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(u64::from(ms)).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT),
        };
        tracing::debug!(watcher = %req.cluster, known_version = req.known_version, ?heartbeat, "peer watches our exports");
        let (tx, rx) = mpsc::channel(8);
        let (instance, mut ready) = (self.instance.clone(), self.ready.clone());
        let local = self.local.clone();
        let draining = self.draining.clone();
        tokio::spawn(async move {
            // Nothing before the local set is complete; the watcher's lease on us runs.
            if ready.wait_for(|r| *r).await.is_err() {
                return;
            }
            stream_updates(local, draining, instance, heartbeat, tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Sends a snapshot, then a delta per change of `local` and a heartbeat per quiet
/// `heartbeat`, until the watcher goes away.
async fn stream_updates(
    mut local: watch::Receiver<Arc<ExportSet>>,
    draining: watch::Receiver<bool>,
    instance: Arc<str>,
    heartbeat: Duration,
    tx: mpsc::Sender<Result<proto::ExportUpdate, Status>>,
) {
    let mut draining = Some(draining);
    let mut local_open = true;
    let mut last = local.borrow_and_update().clone();
    let is_draining = |d: &Option<watch::Receiver<bool>>| d.as_ref().is_some_and(|d| *d.borrow());
    let first = proto::ExportUpdate {
        version: last.version,
        draining: is_draining(&draining),
        kind: Some(Kind::Snapshot(proto::Snapshot {
            instance: instance.to_string(),
            ..snapshot_to_proto(&last)
        })),
    };
    if tx.send(Ok(first)).await.is_err() {
        return;
    }
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let update = tokio::select! {
            _ = tx.closed() => return,
            changed = local.changed(), if local_open => {
                if changed.is_err() {
                    // The publisher is gone (shutting down): keep heartbeating what we have.
                    local_open = false;
                    continue;
                }
                let current = local.borrow_and_update().clone();
                if Arc::ptr_eq(&current, &last) {
                    continue;
                }
                let delta = diff_exports(&last, &current);
                if delta.is_empty() && current.version == last.version {
                    continue;
                }
                let update = proto::ExportUpdate {
                    version: current.version,
                    draining: is_draining(&draining),
                    kind: Some(Kind::Delta(proto::Delta {
                        base_version: last.version,
                        locality: delta.locality.as_ref().map(Into::into),
                        upserts: delta.upserts.iter().map(|s| s.as_ref().into()).collect(),
                        removed: delta.removed.iter().map(Into::into).collect(),
                    })),
                };
                last = current;
                update
            }
            changed = crate::flag_changed(&mut draining), if draining.is_some() => {
                if changed.is_err() {
                    draining = None;
                    continue;
                }
                heartbeat_update(&last, is_draining(&draining))
            }
            _ = ticker.tick() => heartbeat_update(&last, is_draining(&draining)),
        };
        ticker.reset();
        if tx.send(Ok(update)).await.is_err() {
            return;
        }
    }
}

fn heartbeat_update(last: &ExportSet, draining: bool) -> proto::ExportUpdate {
    proto::ExportUpdate {
        version: last.version,
        draining,
        kind: Some(Kind::Heartbeat(proto::Heartbeat {})),
    }
}
