//! Connection-level failover: a client connection tries the planned candidates in order —
//! same tier first, then the next — within one connect budget, so a client never sees a
//! failed connection while a healthy endpoint exists.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fedgate_discovery::model::{ClusterId, Protocol, SessionAffinity};
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Instrument;

use super::codec::{Status, StreamRequest};
use super::limits::Admitted;
use super::listeners::Route;
use super::metrics::{self, ByteCounters, ConnectionGuard};
use super::proxy::{self, BoxRecv, BoxSend, RESET_CODE_REFUSED};
use super::{CANDIDATES_PER_TIER, Outstanding, Shared, Tunnel, select};

/// Extra time a remote attempt gets over a local one: the stream round trip on top of the
/// acceptor's own connect attempt.
const REMOTE_ALLOWANCE: Duration = Duration::from_millis(500);

/// Why a client connection could not be connected anywhere.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("service {0} is not imported (any more)")]
    UnknownService(String),
    #[error("no healthy endpoint for {0}")]
    NoHealthyEndpoint(String),
    #[error("all {attempts} connect attempts for {service} failed; last: {last}")]
    AllFailed { service: String, attempts: usize, last: String },
    #[error("connect budget for {service} spent after {attempts} attempts")]
    BudgetSpent { service: String, attempts: usize },
}

impl ConnectError {
    /// Bounded label for `fedgate_connections_total{result}`.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::UnknownService(_) => "unknown_service",
            ConnectError::NoHealthyEndpoint(_) => "no_healthy_endpoint",
            ConnectError::AllFailed { .. } | ConnectError::BudgetSpent { .. } => "connect_failed",
        }
    }
}

/// Why one attempt failed, and whom to blame.
#[derive(Debug)]
pub(crate) enum AttemptError {
    /// The endpoint refused or did not answer: counts towards its ejection.
    Endpoint(String),
    /// The cluster cannot serve now (tunnel down, draining, does not know the service):
    /// skip its other endpoints for this connection, do not blame the endpoint.
    Cluster(String),
    /// This endpoint is not there any more (the peer no longer lists it: our copy of its
    /// exports is a moment old): try the next candidate, its cluster's included, and blame
    /// nobody.
    Gone(String),
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Endpoint(e) | AttemptError::Cluster(e) | AttemptError::Gone(e) => {
                f.write_str(e)
            }
        }
    }
}

pub(crate) enum Upstream {
    Tcp(TcpStream),
    Tunnel(BoxSend, BoxRecv),
}

pub(crate) struct Connected {
    pub upstream: Upstream,
    pub cluster: ClusterId,
    pub address: IpAddr,
    pub best_tier: usize,
    pub tier: usize,
    pub attempt: usize,
    pub _outstanding: Outstanding,
}

/// TCP connect with a timeout; refusals and timeouts blame the endpoint.
pub(crate) async fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, AttemptError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        // Out of descriptors, buffers or local ports: this gateway's problem, not the
        // endpoint's. Its cluster is skipped for this connection (a remote one needs no
        // new socket) and nothing is held against the endpoint.
        Ok(Err(e)) if super::health::is_local_resource_error(&e) => {
            Err(AttemptError::Cluster(format!("connect {addr}: {e} (local resources)")))
        }
        Ok(Err(e)) => Err(AttemptError::Endpoint(format!("connect {addr}: {e}"))),
        Err(_) => {
            Err(AttemptError::Endpoint(format!("connect {addr}: timed out after {timeout:?}")))
        }
    }
}

/// Opens a tunnel stream to `cluster`, sends the request and waits for the status.
pub(crate) async fn open_remote(
    tunnel: &dyn Tunnel,
    cluster: &ClusterId,
    request: &StreamRequest,
    opened_on: &mut Option<usize>,
) -> Result<(BoxSend, BoxRecv), AttemptError> {
    let header = request
        .encode()
        .map_err(|e| AttemptError::Cluster(format!("encoding tunnel request: {e}")))?;
    let (mut send, mut recv, link) = tunnel
        .open_replica(cluster)
        .await
        .map_err(|e| AttemptError::Cluster(format!("opening tunnel stream to {cluster}: {e}")))?;
    *opened_on = Some(link);
    let exchange = async {
        send.write_all(&header).await?;
        send.flush().await?;
        recv.read_u8().await
    };
    let refuse = |send: &mut BoxSend, recv: &mut BoxRecv| {
        send.reset(RESET_CODE_REFUSED);
        recv.stop(RESET_CODE_REFUSED);
    };
    match exchange.await {
        Ok(b) => match Status::from_byte(b) {
            Some(Status::Ok) => Ok((send, recv)),
            Some(status) => {
                refuse(&mut send, &mut recv);
                let msg = format!("{cluster} answered {}", status.as_str());
                match status {
                    // The one endpoint we asked for failed there: blame it.
                    Status::NoHealthyEndpoint if request.target.is_some() => {
                        Err(AttemptError::Endpoint(msg))
                    }
                    // The endpoint we asked for is no longer one of the service's there (it
                    // moved while its removal was on its way to us): the cluster's other
                    // endpoints may serve (soak: 2 of 3 700 connections were reset).
                    Status::Forbidden if request.target.is_some() => Err(AttemptError::Gone(msg)),
                    _ => Err(AttemptError::Cluster(msg)),
                }
            }
            None => {
                refuse(&mut send, &mut recv);
                Err(AttemptError::Cluster(format!("{cluster} answered unknown status {b:#04x}")))
            }
        },
        Err(e) => {
            refuse(&mut send, &mut recv);
            Err(AttemptError::Cluster(format!("tunnel stream to {cluster}: {e}")))
        }
    }
}

/// One attempt at a remote endpoint through the tunnel, on each connected replica of its
/// cluster in turn until one answers: a replica that does not answer in time or cannot
/// serve (it died and its connection has not timed out yet, it drains) is marked suspect and
/// the next one is tried, within the attempt's `timeout` each and `deadline` in all.
async fn connect_remote(
    tunnel: &dyn Tunnel,
    cluster: &ClusterId,
    request: &StreamRequest,
    timeout: Duration,
    deadline: Instant,
) -> Result<(BoxSend, BoxRecv), AttemptError> {
    let replicas = tunnel.replicas(cluster).max(1);
    let mut tried = 0;
    loop {
        tried += 1;
        let now = Instant::now();
        // The acceptor spends up to one attempt connecting the target; leave it room
        // to answer NO_HEALTHY_ENDPOINT so the failure is blamed on the right endpoint.
        let timeout = deadline.saturating_duration_since(now).min(timeout + REMOTE_ALLOWANCE);
        let mut opened_on = None;
        let result = match tokio::time::timeout(
            timeout,
            open_remote(tunnel, cluster, request, &mut opened_on),
        )
        .await
        {
            Ok(r) => r,
            // A peer that does not answer in time (hung, overloaded, a path that drops)
            // is the peer's or the tunnel's failure, not the endpoint's: its QUIC
            // connection and lease decide about it, so skip the cluster, eject nothing.
            Err(_) => Err(AttemptError::Cluster(format!(
                "tunnel stream to {cluster} timed out after {timeout:?}"
            ))),
        };
        match result {
            Err(AttemptError::Cluster(e)) if tried < replicas && Instant::now() < deadline => {
                if let Some(link) = opened_on {
                    tunnel.suspect(cluster, link);
                }
                tracing::debug!(%cluster, error = %e, "replica cannot serve; trying another replica");
            }
            Err(AttemptError::Cluster(e)) => {
                if let Some(link) = opened_on {
                    tunnel.suspect(cluster, link);
                }
                return Err(AttemptError::Cluster(e));
            }
            other => return other,
        }
    }
}

/// Picks and connects an upstream for one client connection on `route`. `client` is the
/// client's address, for `sessionAffinity: ClientIP`.
pub(crate) async fn connect(
    shared: &Arc<Shared>,
    route: &Route,
    client: Option<IpAddr>,
) -> Result<Connected, ConnectError> {
    let service_name = route.key().to_string();
    let snapshot = shared.snapshot.borrow().clone();
    let Some(service) = snapshot.services.get(route.key()) else {
        return Err(ConnectError::UnknownService(service_name));
    };
    let unreachable = shared.unreachable(&snapshot, Some(service));
    let only = match route {
        Route::Endpoint { cluster, endpoint, .. } => Some((cluster, *endpoint)),
        Route::Service { .. } => None,
    };
    let mut views = shared.rank(&snapshot, service, route.port(), &unreachable, only);
    let panic = select::panic_views(&views).map(|p| views = p).is_some();
    let order = match (&service.session_affinity, client) {
        (SessionAffinity::ClientIP { .. }, Some(ip)) => {
            select::plan_sticky(&views, CANDIDATES_PER_TIER, ip)
        }
        _ => select::plan(&views, CANDIDATES_PER_TIER, &mut rand::rng()),
    };
    // The tier traffic would use if everything were healthy: the failover baseline.
    let best_tier = views
        .iter()
        .filter(|v| {
            !v.skipped.iter().any(|s| {
                matches!(
                    s,
                    select::SkipReason::PortNotExposed
                        | select::SkipReason::NoMatchingPort
                        | select::SkipReason::NotTarget
                )
            })
        })
        .map(|v| v.tier)
        .min();
    let Some(best_tier) = best_tier.filter(|_| !order.is_empty()) else {
        return Err(ConnectError::NoHealthyEndpoint(service_name));
    };
    if panic {
        tracing::debug!(service = %service_name, "no healthy endpoint: panic routing tries the unhealthy and ejected ones");
        metrics::record_panic(&service_name);
    }
    let deadline = Instant::now() + shared.settings.connect_budget;
    let mut skip: BTreeSet<ClusterId> = BTreeSet::new();
    let mut attempts = 0;
    let mut last = String::new();
    for idx in order {
        let v = &views[idx];
        if skip.contains(&v.cluster) {
            continue;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ConnectError::BudgetSpent { service: service_name, attempts });
        }
        let timeout = (deadline - now).min(shared.settings.attempt_timeout);
        attempts += 1;
        let outstanding = shared.track(&v.cluster, v.address);
        // Local endpoints, and remote ones in flat network mode (their pod network is routed
        // here), are dialled directly; the others through their cluster's gateway.
        let result = if v.path != select::Path::Tunnel {
            match v.port {
                Some(port) => {
                    let connected = connect_tcp(SocketAddr::new(v.address, port), timeout).await;
                    if connected.is_ok() && v.path == select::Path::Direct {
                        metrics::record_direct(v.cluster.as_str());
                    }
                    connected.map(Upstream::Tcp)
                }
                None => Err(AttemptError::Endpoint("no endpoint port".to_owned())),
            }
        } else if let Some(tunnel) = &shared.tunnel {
            let request = StreamRequest {
                service: route.key().clone(),
                port: route.port().port,
                protocol: Protocol::Tcp,
                target: Some(v.address),
                source_cluster: Some(shared.settings.cluster.clone()),
                trace_id: None,
            };
            connect_remote(tunnel.as_ref(), &v.cluster, &request, timeout, deadline)
                .await
                .map(|(s, r)| Upstream::Tunnel(s, r))
        } else {
            Err(AttemptError::Cluster("no tunnel configured for remote endpoints".to_owned()))
        };
        match result {
            Ok(upstream) => {
                shared.record_success(&v.cluster, v.address);
                return Ok(Connected {
                    upstream,
                    cluster: v.cluster.clone(),
                    address: v.address,
                    best_tier,
                    tier: v.tier,
                    attempt: attempts - 1,
                    _outstanding: outstanding,
                });
            }
            Err(AttemptError::Endpoint(e)) => {
                tracing::debug!(cluster = %v.cluster, endpoint = %v.address, error = %e, "connect attempt failed; trying next candidate");
                let pool = views.iter().map(|w| (&w.cluster, w.address));
                shared.record_failure(&v.cluster, v.address, pool);
                last = e;
            }
            Err(AttemptError::Gone(e)) => {
                tracing::debug!(cluster = %v.cluster, endpoint = %v.address, error = %e, "endpoint gone there; trying next candidate");
                last = e;
            }
            Err(AttemptError::Cluster(e)) => {
                tracing::debug!(cluster = %v.cluster, error = %e, "cluster cannot serve; skipping its endpoints");
                skip.insert(v.cluster.clone());
                last = e;
            }
        }
    }
    Err(ConnectError::AllFailed { service: service_name, attempts, last })
}

/// Runs `splice` until it ends (`Ok(true)`) or no byte moved either way for `idle` (then
/// drops it, which closes both sides: `Ok(false)`). Checked every quarter of `idle`, so an
/// idle connection is closed after `idle` to 1.25 × `idle`.
async fn until_idle(
    splice: impl std::future::Future<Output = std::io::Result<()>>,
    bytes: &ByteCounters,
    idle: Duration,
) -> std::io::Result<bool> {
    let moved = || bytes.tx.load(Ordering::Relaxed) + bytes.rx.load(Ordering::Relaxed);
    let check = (idle / 4).max(Duration::from_millis(10));
    let (mut last, mut quiet) = (moved(), Duration::ZERO);
    tokio::pin!(splice);
    loop {
        tokio::select! {
            r = &mut splice => return r.map(|()| true),
            () = tokio::time::sleep(check) => {
                let now = moved();
                quiet = if now == last { quiet + check } else { Duration::ZERO };
                last = now;
                if quiet >= idle {
                    return Ok(false);
                }
            }
        }
    }
}

/// Serves one accepted client connection to completion.
pub(crate) async fn serve_client(
    shared: Arc<Shared>,
    route: Arc<Route>,
    client: TcpStream,
    peer: SocketAddr,
    _admitted: Admitted,
) {
    let span = tracing::debug_span!("conn", service = %route.key(), port = route.port().port, client = %peer);
    async move {
        let _active = shared.drain.active.enter();
        let mut guard = ConnectionGuard::new(route.key().to_string());
        let started = Instant::now();
        match connect(&shared, &route, Some(peer.ip())).await {
            Ok(c) => {
                guard.set_target(c.cluster.as_str());
                let _flow = shared.record_connected(&route, &c, guard.bytes.clone());
                metrics::record_connect_duration(c.cluster.as_str(), started.elapsed());
                if c.tier != c.best_tier || c.attempt > 0 {
                    metrics::record_failover(&route.key().to_string(), c.best_tier, c.tier);
                }
                tracing::debug!(cluster = %c.cluster, endpoint = %c.address, tier = c.tier, attempt = c.attempt, "connected");
                let bytes = guard.bytes.clone();
                let activity = shared.settings.activity;
                // Boxed: the task then holds only the copy state of its own kind (the tunnel
                // path's is several KiB), which is what an idle connection costs.
                let splice: BoxFuture<'_, std::io::Result<()>> = match c.upstream {
                    Upstream::Tcp(up) => Box::pin(proxy::splice_tcp(client, up, &bytes, activity)),
                    Upstream::Tunnel(send, recv) => {
                        Box::pin(proxy::splice_tunnel(client, send, recv, &bytes, true, activity))
                    }
                };
                let r = until_idle(splice, &bytes, shared.settings.idle_timeout).await;
                match r {
                    Ok(true) => {
                        guard.set_result("ok");
                        tracing::debug!("closed");
                    }
                    Ok(false) => {
                        guard.set_result("idle_timeout");
                        metrics::record_idle_timeout();
                        tracing::debug!("closed after the idle timeout");
                    }
                    Err(e) => {
                        guard.set_result("reset");
                        tracing::debug!(error = %e, "closed by reset or error");
                    }
                }
            }
            Err(e) => {
                guard.set_result(e.reason());
                shared.activity.refused(route.key().to_string(), e.reason());
                // One WARN line per 10 s for all refusals together (a backend down refuses
                // every client, each with its own port); each one at debug.
                static REFUSED: crate::logging::LogGate =
                    crate::logging::LogGate::new(Duration::from_secs(10));
                match REFUSED.pass() {
                    Some(held) => tracing::warn!(error = %e, similar_since_last = held, "client connection refused"),
                    None => tracing::debug!(error = %e, "client connection refused"),
                }
                // A reset tells the client at once instead of an empty stream.
                let _ = client.set_zero_linger();
            }
        }
    }
    .instrument(span)
    .await
}
