//! The accepting side of tunnel streams: read and check the request header, pick a local
//! endpoint (or exactly the target), answer a status, then copy bytes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use fedgate_discovery::model::{ClusterState, Health, HealthMap, Protocol};
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::codec::{Status, StreamRequest};
use super::connect::{AttemptError, connect_tcp};
use super::metrics::{self, ByteCounters, StreamGuard};
use super::proxy::{self, BoxRecv, BoxSend, RESET_CODE_REFUSED};
use super::{CANDIDATES_PER_TIER, Incoming, Shared, select};

/// The local endpoints a tunnel stream tries, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidates {
    pub addrs: Vec<SocketAddr>,
    /// Panic routing: no endpoint of the service is healthy, so unhealthy and ejected ones
    /// are tried (as the opener's [`select::panic_views`] does).
    pub panic: bool,
}

/// The local endpoints that may serve `request`, in the order to try them, or the status
/// that refuses it. Only exported services are reachable through the tunnel; a target must
/// be an endpoint of the service (the tunnel is not an open proxy). When no endpoint is
/// healthy, the ready ones are tried anyway (panic routing); a target that is unhealthy
/// while others are healthy is refused, so the opener moves on.
pub fn local_candidates(
    state: &ClusterState,
    request: &StreamRequest,
    health: &HealthMap,
    ejected: &dyn Fn(IpAddr) -> bool,
    outstanding: &dyn Fn(IpAddr) -> u32,
    rng: &mut impl Rng,
) -> Result<Candidates, Status> {
    let service = state.services.get(&request.service).ok_or(Status::UnknownService)?;
    if !state.exports.contains_key(&request.service) {
        return Err(Status::Forbidden);
    }
    if request.protocol != Protocol::Tcp {
        return Err(Status::UnknownService);
    }
    let port = service
        .ports
        .iter()
        .find(|p| p.protocol == request.protocol && p.port == request.port)
        .ok_or(Status::UnknownService)?;
    // Ready with a port for the request: what panic routing may still try.
    let servable = |e: &fedgate_discovery::model::Endpoint| -> Option<SocketAddr> {
        e.ready.then(|| e.port_for(port).map(|p| SocketAddr::new(e.address, p))).flatten()
    };
    let healthy = |e: &fedgate_discovery::model::Endpoint| -> bool {
        let h = health.get(&(request.service.clone(), e.address)).copied().unwrap_or(e.health);
        h != Health::Unhealthy && !ejected(e.address)
    };
    let usable: Vec<SocketAddr> =
        service.endpoints.iter().filter(|e| healthy(e)).filter_map(servable).collect();
    let panic = usable.is_empty();
    if let Some(target) = request.target {
        let endpoint =
            service.endpoints.iter().find(|e| e.address == target).ok_or(Status::Forbidden)?;
        let addr = servable(endpoint)
            .filter(|_| panic || healthy(endpoint))
            .ok_or(Status::NoHealthyEndpoint)?;
        return Ok(Candidates { addrs: vec![addr], panic });
    }
    let pool: Vec<SocketAddr> =
        if panic { service.endpoints.iter().filter_map(servable).collect() } else { usable };
    if pool.is_empty() {
        return Err(Status::NoHealthyEndpoint);
    }
    let loads: Vec<u32> = pool.iter().map(|a| outstanding(a.ip())).collect();
    let addrs =
        select::p2c_order(&loads, CANDIDATES_PER_TIER, rng).into_iter().map(|i| pool[i]).collect();
    Ok(Candidates { addrs, panic })
}

/// Answers a non-OK status and closes the stream: the status byte is sent with FIN (so it
/// arrives), and STOP_SENDING tells the opener to stop sending.
async fn refuse(send: &mut BoxSend, recv: &mut BoxRecv, status: Status) {
    recv.stop(RESET_CODE_REFUSED);
    let answered = async {
        send.write_all(&[status as u8]).await?;
        send.shutdown().await
    };
    if tokio::time::timeout(std::time::Duration::from_secs(1), answered).await.is_err() {
        send.reset(RESET_CODE_REFUSED);
    }
}

/// Serves one tunnel stream a peer opened.
pub(crate) async fn serve_stream(shared: Arc<Shared>, incoming: Incoming) {
    let Incoming { peer, mut send, mut recv, .. } = incoming;
    let span = tracing::debug_span!("tunnel_stream", %peer);
    async move {
        let _active = shared.drain.active.enter();
        let mut guard = StreamGuard::new(peer.as_str());
        if shared.drain.is_draining() {
            guard.set_result(Status::Draining.as_str());
            refuse(&mut send, &mut recv, Status::Draining).await;
            return;
        }
        let request = match tokio::time::timeout(
            shared.settings.header_timeout,
            StreamRequest::read_from(&mut recv),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "bad tunnel request");
                match e.status() {
                    Some(status) => {
                        guard.set_result(status.as_str());
                        refuse(&mut send, &mut recv, status).await;
                    }
                    None => {
                        guard.set_result("error");
                        send.reset(RESET_CODE_REFUSED);
                        recv.stop(RESET_CODE_REFUSED);
                    }
                }
                return;
            }
            Err(_) => {
                tracing::debug!("tunnel request header timed out");
                guard.set_result(Status::Malformed.as_str());
                refuse(&mut send, &mut recv, Status::Malformed).await;
                return;
            }
        };
        let state = shared.cluster.borrow().clone();
        let health = shared.health.borrow().clone();
        let local = shared.settings.cluster.clone();
        let candidates = local_candidates(
            &state,
            &request,
            &health,
            &|ip| shared.is_ejected(&local, ip),
            &|ip| shared.outstanding(&local, ip),
            &mut rand::rng(),
        );
        let candidates = match candidates {
            Ok(c) => {
                if c.panic {
                    metrics::record_panic(&request.service.to_string());
                }
                c.addrs
            }
            Err(status) => {
                tracing::debug!(service = %request.service, port = request.port, status = status.as_str(), "tunnel request refused");
                guard.set_result(status.as_str());
                refuse(&mut send, &mut recv, status).await;
                return;
            }
        };
        let deadline = tokio::time::Instant::now() + shared.settings.connect_budget;
        let mut upstream = None;
        for addr in candidates {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let outstanding = shared.track(&local, addr.ip());
            match connect_tcp(addr, (deadline - now).min(shared.settings.attempt_timeout)).await {
                Ok(s) => {
                    shared.record_success(&local, addr.ip());
                    upstream = Some((s, outstanding));
                    break;
                }
                Err(AttemptError::Endpoint(e) | AttemptError::Cluster(e) | AttemptError::Gone(e)) => {
                    tracing::debug!(endpoint = %addr, error = %e, "endpoint connect failed");
                    let pool = state
                        .services
                        .get(&request.service)
                        .into_iter()
                        .flat_map(|s| s.endpoints.iter().map(|e| (&local, e.address)));
                    shared.record_failure(&local, addr.ip(), pool);
                }
            }
        }
        let Some((tcp, _outstanding)) = upstream else {
            guard.set_result(Status::NoHealthyEndpoint.as_str());
            refuse(&mut send, &mut recv, Status::NoHealthyEndpoint).await;
            return;
        };
        if let Err(e) = send.write_all(&[Status::Ok as u8]).await {
            tracing::debug!(error = %e, "opener went away before the status");
            guard.set_result("error");
            return;
        }
        guard.set_result(Status::Ok.as_str());
        let bytes = ByteCounters::default();
        let activity = shared.settings.activity;
        if let Err(e) = proxy::splice_tunnel(tcp, send, recv, &bytes, false, activity).await {
            tracing::debug!(error = %e, "tunnel stream closed by reset or error");
        }
    }
    .instrument(span)
    .await
}

/// Serves every stream from `incoming` until `shutdown` or the sender is gone.
pub(crate) async fn serve_incoming(
    shared: Arc<Shared>,
    mut incoming: mpsc::Receiver<Incoming>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            next = incoming.recv() => match next {
                Some(mut stream) => match stream.runtime.take() {
                    // On the thread its tunnel connection runs on (a lane of its own).
                    Some(runtime) => { runtime.spawn(serve_stream(shared.clone(), stream)); }
                    None => { tokio::spawn(serve_stream(shared.clone(), stream)); }
                },
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::select::tests::{ep, http_port};
    use fedgate_discovery::model::{
        LocalService, ServiceExportObject, ServiceKey, SessionAffinity,
    };
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn state(exported: bool) -> ClusterState {
        let key = ServiceKey::new("shop", "web");
        let svc = LocalService {
            key: key.clone(),
            kube_type: "ClusterIP".into(),
            cluster_ips: vec!["10.96.0.1".parse().unwrap()],
            headless: false,
            ports: vec![http_port()],
            session_affinity: SessionAffinity::None,
            internal_traffic_policy: None,
            traffic_distribution: None,
            ip_families: vec![],
            endpoints: vec![
                ep("10.0.0.1", None, Health::Unknown),
                ep("10.0.0.2", None, Health::Unknown),
                fedgate_discovery::model::Endpoint {
                    ready: false,
                    ..ep("10.0.0.3", None, Health::Unknown)
                },
            ],
        };
        let mut s = ClusterState::default();
        s.services.insert(key.clone(), Arc::new(svc));
        if exported {
            s.exports.insert(
                key.clone(),
                Arc::new(ServiceExportObject {
                    key,
                    created: jiff::Timestamp::UNIX_EPOCH,
                    exported_labels: Default::default(),
                    exported_annotations: Default::default(),
                }),
            );
        }
        s
    }

    /// (what, cluster state, request, health, expected candidates)
    type Case<'a> = (
        &'static str,
        ClusterState,
        StreamRequest,
        &'a HealthMap,
        Result<Vec<&'static str>, Status>,
    );

    #[test]
    fn local_candidates_table() {
        let req = |name: &str, port: u16, target: Option<&str>| {
            let mut r = StreamRequest::new(ServiceKey::new("shop", name), port);
            r.target = target.map(|t| t.parse().unwrap());
            r
        };
        let unhealthy_1: HealthMap =
            [((ServiceKey::new("shop", "web"), "10.0.0.1".parse().unwrap()), Health::Unhealthy)]
                .into_iter()
                .collect();
        let none = HealthMap::new();
        let udp = StreamRequest { protocol: Protocol::Udp, ..req("web", 80, None) };
        let cases: Vec<Case<'_>> = vec![
            (
                "unknown service",
                state(true),
                req("db", 80, None),
                &none,
                Err(Status::UnknownService),
            ),
            ("not exported", state(false), req("web", 80, None), &none, Err(Status::Forbidden)),
            ("unknown port", state(true), req("web", 81, None), &none, Err(Status::UnknownService)),
            ("udp", state(true), udp, &none, Err(Status::UnknownService)),
            (
                "target not an endpoint",
                state(true),
                req("web", 80, Some("8.8.8.8")),
                &none,
                Err(Status::Forbidden),
            ),
            (
                "target not ready",
                state(true),
                req("web", 80, Some("10.0.0.3")),
                &none,
                Err(Status::NoHealthyEndpoint),
            ),
            (
                "target unhealthy",
                state(true),
                req("web", 80, Some("10.0.0.1")),
                &unhealthy_1,
                Err(Status::NoHealthyEndpoint),
            ),
            (
                "target ok",
                state(true),
                req("web", 80, Some("10.0.0.2")),
                &unhealthy_1,
                Ok(vec!["10.0.0.2:8080"]),
            ),
            (
                "pick healthy only",
                state(true),
                req("web", 80, None),
                &unhealthy_1,
                Ok(vec!["10.0.0.2:8080"]),
            ),
        ];
        for (what, st, r, health, want) in cases {
            let got = local_candidates(
                &st,
                &r,
                health,
                &|_| false,
                &|_| 0,
                &mut StdRng::seed_from_u64(1),
            );
            let want = want
                .map(|v| v.iter().map(|a| a.parse::<SocketAddr>().unwrap()).collect::<Vec<_>>());
            assert_eq!(got.map(|c| c.addrs), want, "{what}");
        }
        let candidates = |request: &StreamRequest, health: &HealthMap, ejected: bool| {
            local_candidates(
                &state(true),
                request,
                health,
                &|_| ejected,
                &|_| 0,
                &mut StdRng::seed_from_u64(1),
            )
        };
        let mut both = candidates(&req("web", 80, None), &none, false).unwrap();
        assert!(!both.panic);
        both.addrs.sort();
        assert_eq!(both.addrs.len(), 2);
        // Panic routing: nothing healthy, so the ready endpoints are tried anyway; the one
        // that is not ready never is.
        let mut all_ejected = candidates(&req("web", 80, None), &none, true).unwrap();
        assert!(all_ejected.panic, "every endpoint ejected is panic routing");
        all_ejected.addrs.sort();
        assert_eq!(
            all_ejected.addrs,
            vec!["10.0.0.1:8080".parse::<SocketAddr>().unwrap(), "10.0.0.2:8080".parse().unwrap()]
        );
        let all_unhealthy: HealthMap = ["10.0.0.1", "10.0.0.2"]
            .iter()
            .map(|a| ((ServiceKey::new("shop", "web"), a.parse().unwrap()), Health::Unhealthy))
            .collect();
        let target = candidates(&req("web", 80, Some("10.0.0.1")), &all_unhealthy, false).unwrap();
        assert_eq!(
            target,
            Candidates { addrs: vec!["10.0.0.1:8080".parse().unwrap()], panic: true }
        );
        assert_eq!(
            candidates(&req("web", 80, Some("10.0.0.3")), &all_unhealthy, false),
            Err(Status::NoHealthyEndpoint),
            "a target that is not ready is refused even in panic"
        );
    }
}
