//! Composition root: builds every part from a validated [`Config`], binds every socket before
//! anything is spawned, and returns a [`Bound`] gateway with its addresses and a shutdown
//! handle. `main` and the in-process tests start the gateway through the same [`build`].
//!
//! Data flow (DESIGN.md): file source → local exports (+ health from the data plane) → peers
//! over QUIC; peers' exports → import set → DNS zones and the data plane's routing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fedgate_discovery::alloc::Allocator;
use fedgate_discovery::exports::LocalExports;
use fedgate_discovery::imports::{self, ImportSet, PinsOutsideRange};
use fedgate_discovery::kube::{self as kube, KubeSource, KubeWriter};
use fedgate_discovery::source::{ClusterSource, file::FileSource};
use fedgate_dns::{DnsServer, DnsSettings};
use fedgate_tunnel::{Identity, PeerConfig, TunnelSettings};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminServer, AdminState, DebugView, Query};
use crate::config::{self, Config, FrontMode, SourceKind, Upstream};
use crate::data_thread::DataThread;
use crate::dataplane::health::HealthSettings;
use crate::dataplane::peers::PeerTunnel;
use crate::dataplane::{DataPlane, DataPlaneSettings, HealthChecker};
use crate::peering::Peering;
use crate::readiness::{self, Ready};

/// Capacity of the channel from peer sessions to the import set.
const PEER_UPDATE_CHANNEL: usize = 1024;
/// Capacity of the channel of incoming data streams from the tunnel to the data plane.
const INCOMING_STREAM_CHANNEL: usize = 1024;
/// The shortest time the kube writer waits for peers after start before deleting objects.
const DELETION_GRACE_MIN: Duration = Duration::from_secs(30);
/// Name of the ClusterSetIP allocation file inside `front.stateDir`.
const ALLOCATION_FILE: &str = "clusterset-ips.json";

/// A gateway whose sockets are all bound; [`Bound::run`] serves until shut down.
pub struct Bound {
    pub admin: SocketAddr,
    pub tunnel: SocketAddr,
    pub dns: SocketAddr,
    /// Cancelling it starts the drain (like SIGTERM).
    pub shutdown: CancellationToken,
    parts: Parts,
}

struct Parts {
    source: ClusterSource,
    /// `discovery.source: kube`: writes conditions, ServiceImports and slices back.
    writer: Option<KubeWriter>,
    /// `discovery.source: kube`: the Lease election of the one writer, and what it wrote,
    /// read back by every replica.
    election: Option<(kube::Election, kube::Observed)>,
    /// `front.mode: kube`: the gateway ports of derived Services.
    front: Option<futures::future::BoxFuture<'static, ()>>,
    /// Marks `discovery` ready in the registry once the cluster source has synced.
    discovery_ready: futures::future::BoxFuture<'static, ()>,
    /// Marks `peers` ready once every peer sent its exports once (at most 5 s).
    peers_ready: futures::future::BoxFuture<'static, ()>,
    /// The readiness registry (`draining` goes pending when the drain starts).
    ready: Ready,
    /// `discovery.source: kube`: reads the ClusterProperties again, reports a change.
    identity: Option<kube::identity::IdentityGuard>,
    local_exports: LocalExports,
    imports: ImportSet,
    /// The tunnel and discovery's peer sessions over it.
    peering: Peering,
    dns: DnsServer,
    dataplane: DataPlane,
    admin: AdminServer,
    /// Runs the tunnel's packet work, the listeners and the proxied connections.
    data: DataThread,
}

/// Builds the gateway: loads identity and cluster state, binds the tunnel, DNS, admin and
/// front listeners. Nothing runs yet. Must be called inside a tokio runtime.
pub async fn build(cfg: Config, metrics: Option<PrometheusHandle>) -> anyhow::Result<Bound> {
    let kube_client = match cfg.discovery.source {
        SourceKind::Kube => Some(connect_kube(&cfg).await?),
        SourceKind::File => None,
    };
    // `fedgate run` refused `system` already (config rules); this is for configs built in code.
    let ca = cfg.tls.ca.file().map_err(|e| anyhow::anyhow!("tls.ca: {e}"))?.to_owned();
    let identity = Identity::from_pem_files(&cfg.tls.cert, &cfg.tls.key, &ca)
        .context("loading the gateway identity (tls.cert, tls.key, tls.ca)")?;
    let data = DataThread::start(cfg.traffic.data_plane_threads, cfg.traffic.busy_poll)?;
    let id = cfg.cluster.id.clone();
    let locality = cfg.locality();

    // Cluster state and the health of local endpoints.
    let source =
        match &kube_client {
            Some((client, exports)) => {
                ClusterSource::Kube(Box::new(KubeSource::new(client.clone(), exports.clone())))
            }
            None => ClusterSource::File(FileSource::new(&cfg.discovery.file.dir).with_context(
                || format!("discovery.file.dir {}", cfg.discovery.file.dir.display()),
            )?),
        };
    // `/readyz`: each part that is not ready once built registers here.
    let ready = Ready::new();
    let discovery_ready =
        Box::pin(readiness::ready_when(ready.register("discovery"), source.synced()));
    let cluster_rx = source.subscribe();
    let health_settings = HealthSettings {
        interval: cfg.traffic.health_check.interval,
        timeout: cfg.traffic.health_check.timeout,
        unhealthy_threshold: cfg.traffic.health_check.unhealthy_threshold,
        healthy_threshold: cfg.traffic.health_check.healthy_threshold,
    };
    let (checker, health_rx) = HealthChecker::new(health_settings.clone(), cluster_rx.clone());

    // Local exports, then the tunnel that carries them, then the import set it feeds.
    let local_exports =
        LocalExports::new(id.clone(), locality.clone(), cluster_rx.clone(), health_rx)
            .with_synced(source.synced());
    let (peer_tx, peer_rx) = mpsc::channel(PEER_UPDATE_CHANNEL);
    let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_STREAM_CHANNEL);
    let mut tunnel_settings = TunnelSettings::new(
        cfg.tunnel.listen,
        cfg.cluster.clusterset.clone(),
        id.clone(),
        cfg.peers
            .iter()
            .map(|p| PeerConfig {
                id: p.id.clone(),
                addresses: p.all_addresses().iter().map(ToString::to_string).collect(),
            })
            .collect(),
    );
    tunnel_settings.max_udp_payload = cfg.tunnel.max_udp_payload_size;
    tunnel_settings.socket_buffer = cfg.tunnel.socket_buffer_size as usize;
    tunnel_settings.shards = data.handles().to_vec();
    // Watched: a rotated certificate or CA bundle is used by new handshakes without restart.
    tunnel_settings.identity_files = Some(fedgate_tunnel::IdentityFiles {
        cert: cfg.tls.cert.clone(),
        key: cfg.tls.key.clone(),
        ca: ca.clone(),
    });
    let peering = Peering::new(
        tunnel_settings,
        cfg.discovery.peer_lease_duration,
        identity,
        local_exports.subscribe(),
        local_exports.complete(),
        peer_tx,
        incoming_tx,
    )?;
    let peers = peering.sessions();

    let state_file = cfg.front.state_dir.as_ref().map(|d| d.join(ALLOCATION_FILE));
    if let Some(dir) = &cfg.front.state_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating front.stateDir {}", dir.display()))?;
    }
    let alloc = Allocator::open(cfg.front.cluster_set_ip_range, state_file)?;
    let mut imports = ImportSet::new(
        id.clone(),
        local_exports.subscribe(),
        local_exports.subscribe_validity(),
        peer_rx,
        alloc,
    );
    // How long start-up waits for peers' first exports: the `peers` readiness, the file-mode
    // allocation batch and the import set's completeness (DNS) share it.
    let peers_bound = readiness::PEERS_SYNC_BOUND.min(cfg.discovery.peer_lease_duration);
    // Replicas (issue 19): one writer, elected; every replica serves what it wrote.
    let election = kube_client.as_ref().map(|(client, exports)| {
        let le = &cfg.discovery.kube.leader_election;
        let (ns, identity) = (le.namespace.as_deref(), le.identity.as_deref());
        let settings = kube::LeaderSettings::new(&le.lease_name, ns, le.lease_duration, identity);
        let observed = kube::Observed::new(client.clone(), kube::import_resource(exports));
        (kube::Election::new(client.clone(), settings), observed)
    });
    if let Some((_, observed)) = &election {
        let outside = match cfg.front.mode {
            FrontMode::Vip => PinsOutsideRange::Ignore,
            FrontMode::Kube => PinsOutsideRange::Serve,
        };
        imports = imports.with_pins(observed.pins(), outside);
    } else {
        // File mode: no writer; replicas agree by allocating peers' first imports together, in
        // key order, once every peer sent them (at most the `peers` readiness bound).
        imports = imports.with_startup_hold(cfg.peers.iter().map(|p| p.id.clone()), peers_bound);
    }
    // The import set is complete once it holds the local exports after the first sync, every
    // peer's first exports (at most the `peers` readiness bound) and the writer's addresses:
    // until then DNS answers SERVFAIL, not NXDOMAIN, for names it does not know yet.
    // Flat network mode: those peers' endpoints are reached at their own addresses.
    imports = imports.with_flat(cfg.flat_peers());
    imports = imports.with_completion(
        local_exports.complete(),
        cfg.peers.iter().map(|p| p.id.clone()),
        peers_bound,
    );
    let import_rx = imports.subscribe();
    let front_kube = match cfg.front.mode {
        FrontMode::Vip => None,
        FrontMode::Kube => Some(kube::writer::FrontSettings {
            pod_ip: cfg.front.kube.pod_ip.context(
                "front.mode: kube needs the gateway pod's IP: set POD_IP (the Deployment takes it \
                 from the downward API), `fedgate run --pod-ip` or front.kube.podIP",
            )?,
            ports: cfg.front.kube.first_port..=cfg.front.kube.last_port,
            gateway_service: cfg.front.kube.gateway_service.as_ref().zip(election.as_ref()).map(
                |(name, (e, _))| {
                    fedgate_discovery::model::ServiceKey::new(e.namespace(), name.as_str())
                },
            ),
            replicas: Vec::new(),
            priority: fedgate_discovery::failover::PriorityLabel::parse_all(
                &cfg.traffic.failover_priority.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            ),
            labels: cfg.cluster.labels.clone(),
        }),
    };
    let identity = kube_client.as_ref().map(|(client, _)| {
        kube::identity::IdentityGuard::new(
            client.clone(),
            id.clone(),
            cfg.cluster.clusterset.clone(),
        )
    });
    let writer = kube_client.map(|(client, exports)| {
        let settings = kube::WriterSettings {
            cluster: id.clone(),
            front: front_kube.clone(),
            peers: cfg.peers.iter().map(|p| p.id.clone()).collect(),
            // a peer that does not come back within this is withdrawn anyway
            deletion_grace: (cfg.discovery.peer_lease_duration * 2).max(DELETION_GRACE_MIN),
        };
        let writer = KubeWriter::new(
            client,
            settings,
            exports,
            import_rx.clone(),
            imports.subscribe_status(),
        );
        let writer = writer.with_cluster_state(cluster_rx.clone());
        match &election {
            Some((e, o)) => writer.with_election(
                e.subscribe(),
                imports.subscribe_pins_applied(),
                o.front_routes(),
            ),
            None => writer,
        }
    });

    // DNS and the data plane read the import snapshot (DNS as the data plane serves it).
    let priority: Vec<String> =
        cfg.traffic.failover_priority.iter().map(|p| p.to_string()).collect();
    let mut dns_settings = DnsSettings::new(cfg.dns.listen);
    dns_settings.ttl = cfg.dns.ttl;
    dns_settings.max_tcp_connections = cfg.dns.max_tcp_connections;
    dns_settings.failover_priority = priority.clone();
    dns_settings.local_labels = cfg.cluster.labels.clone();
    // The ClusterSetIP range is ours alone in vip mode: its reverse names without a record are
    // NXDOMAIN here. In kube mode ClusterSetIPs are the cluster's ClusterIPs, whose reverse
    // names belong to the cluster's DNS (forwarded unless we hold the record).
    if cfg.front.mode == FrontMode::Vip {
        dns_settings.owned_reverse = vec![cfg.front.cluster_set_ip_range];
    }
    dns_settings.upstream = cfg
        .dns
        .upstream
        .iter()
        .map(|u| match u {
            Upstream::System => fedgate_dns::Upstream::System,
            Upstream::Address(a) => fedgate_dns::Upstream::Address(*a),
        })
        .collect();

    let mut dp_settings = DataPlaneSettings::new(id.clone(), locality);
    dp_settings.failover_priority = priority;
    dp_settings.health = health_settings;
    dp_settings.drain_duration = cfg.traffic.drain_duration;
    let outliers = &cfg.traffic.outlier_detection;
    dp_settings.outliers = crate::dataplane::OutlierSettings {
        consecutive_failures: outliers.consecutive_failures,
        base_ejection: outliers.base_ejection_time,
        max_ejection: outliers.max_ejection_time,
        max_ejection_percent: outliers.max_ejection_percent,
    };
    dp_settings.max_connections = cfg.traffic.connections.max;
    dp_settings.max_connections_per_service = cfg.traffic.connections.max_per_service;
    dp_settings.idle_timeout = cfg.traffic.connections.idle_timeout;
    dp_settings.vip_listeners = cfg.front.mode == FrontMode::Vip;
    dp_settings.activity = data.activity_hook();
    dp_settings.shards = data.handles().to_vec();
    dp_settings.ready = ready.clone();
    // Entered: the listeners of the first snapshot, their accept loops and the stream
    // forwarder belong to the data-plane thread.
    let mut dataplane = {
        let _in = data.handle().enter();
        let mut dataplane = DataPlane::with_health(
            dp_settings,
            import_rx.clone(),
            checker,
            Some(PeerTunnel::new(peering.handle(), peers.clone())),
        )?;
        dataplane.serve_tunnel(incoming_rx);
        dataplane
    };
    // DNS answers from the snapshots as the data plane serves them: a ClusterSetIP once its
    // listener is bound, completeness once the snapshot it refers to is.
    let (served, complete) = dataplane.served_snapshots(imports.subscribe_complete());
    let dns = DnsServer::new(dns_settings, served, cluster_rx.clone())?.with_complete(complete);
    let front = match (&writer, &front_kube) {
        (Some(w), Some(f)) => {
            Some(Box::pin(dataplane.front_listeners(f.pod_ip, w.front_routes())) as _)
        }
        _ => None,
    };

    // Admin: each part renders its own views over its latest snapshots.
    let debug = dataplane.debug_handle();
    let mut views: BTreeMap<&'static str, DebugView> = BTreeMap::new();
    views.insert("imports", Arc::new(imports::imports_view(import_rx.clone())));
    views.insert("exports", Arc::new(imports::exports_view(imports.subscribe_status())));
    views.insert("endpoints", debug.endpoints_view());
    views.insert("peers", Arc::new(peers.view()));
    // Always present so the dashboard and `fedgate status` need no 404 handling: `null` when
    // nothing is elected (any source but kube writes nothing).
    match &election {
        Some((e, _)) => {
            let leader = e.view();
            views.insert("leader", Arc::new(move |_: &Query| leader()));
        }
        None => {
            views.insert("leader", Arc::new(|_: &Query| Value::Null));
        }
    }
    // Cluster-source file problems, a ClusterProperty changed since start-up, imports waiting
    // for a ClusterSetIP, then front listeners waiting for a bind retry.
    let source_problems = source.problems();
    let identity_problems = identity.as_ref().map(|g| g.problems_view());
    let import_problems = imports.subscribe_problems();
    let listeners = debug.clone();
    views.insert(
        "problems",
        admin::problems_view(vec![
            Box::new(move || source_problems.to_json()),
            Box::new(move || identity_problems.as_ref().map_or_else(Vec::new, |view| view())),
            Box::new(move || import_problems.borrow().to_json()),
            Box::new(move || listeners.problems_json()),
        ]),
    );
    crate::dashboard::register_views(
        &mut views,
        &debug,
        id.clone(),
        import_rx.clone(),
        peers.status(),
        cfg.discovery.peer_lease_duration,
    );
    // `/debug/certificates`; certificate expiry and refused reloads join `/debug/problems`.
    crate::dashboard::register_certificate_views(
        &mut views,
        peering.tunnel().credentials(),
        peering.tunnel().reload_status(),
    );
    let summary: Value = serde_json::from_str(&cfg.redacted_summary()).unwrap_or(Value::Null);
    views.insert("config", Arc::new(move |_: &Query| summary.clone()));
    let peers_ready = Box::pin(readiness::ready_when_peers_synced(
        ready.register("peers"),
        peers.status(),
        peers_bound,
    ));
    let admin_state = AdminState {
        ready: ready.clone(),
        metrics,
        views: Arc::new(views),
        dashboard: crate::dashboard::PAGE,
    };
    let admin = AdminServer::new(cfg.admin.listen, admin_state).await?;

    Ok(Bound {
        admin: admin.address(),
        tunnel: peering.address(),
        dns: dns.address(),
        shutdown: CancellationToken::new(),
        parts: Parts {
            source,
            writer,
            election,
            front,
            discovery_ready,
            peers_ready,
            ready,
            identity,
            local_exports,
            imports,
            peering,
            dns,
            dataplane,
            admin,
            data,
        },
    })
}

impl Bound {
    /// Serves until `shutdown` is cancelled, then drains the data plane (new connections are
    /// refused, peers are told, open connections finish or `drainDuration` passes) and stops
    /// the rest.
    ///
    /// One way to stop (STYLE 11): every long-lived part's `run` takes a `CancellationToken`.
    /// `shutdown` is the data plane's; its drain ends in `rest`, the token of every other part
    /// (they keep serving DNS, discovery and the tunnel while connections drain), and the
    /// parts are then joined for at most 5 s.
    pub async fn run(self) -> anyhow::Result<()> {
        let parts = self.parts;
        let rest = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(parts.source.run(rest.clone()));
        tasks.spawn(parts.discovery_ready);
        tasks.spawn(parts.peers_ready);
        tasks.spawn(readiness::unready_while_draining(
            parts.ready.clone(),
            self.shutdown.clone(),
            rest.clone(),
        ));
        if let Some(writer) = parts.writer {
            tasks.spawn(writer.run(rest.clone()));
        }
        if let Some((election, observed)) = parts.election {
            tasks.spawn(election.run(rest.clone()));
            tasks.spawn(observed.run(rest.clone()));
        }
        if let Some(front) = parts.front {
            tasks.spawn_on(front, parts.data.handle());
        }
        if let Some(identity) = parts.identity {
            tasks.spawn(identity.run(rest.clone()));
        }
        tasks.spawn(parts.local_exports.run(rest.clone()));
        tasks.spawn(parts.imports.run(rest.clone()));
        tasks.spawn(parts.peering.run(rest.clone()));
        let (dns, stop) = (parts.dns, rest.clone());
        tasks.spawn(async move {
            if let Err(e) = dns.run(stop).await {
                tracing::error!(error = %e, "dns server failed");
            }
        });
        tasks.spawn(parts.data.load().run(rest.clone()));
        let (admin, r) = (parts.admin, rest.clone());
        tasks.spawn(async move {
            if let Err(e) = admin.run(r).await {
                tracing::error!(error = %e, "admin server failed");
            }
        });
        tracing::info!(
            admin = %self.admin,
            tunnel = %self.tunnel,
            dns = %self.dns,
            "fedgate gateway running"
        );
        let served = parts.data.handle().spawn(parts.dataplane.run(self.shutdown.clone())).await;
        match &served {
            Ok(outcome) => tracing::info!(?outcome, "data plane drained; stopping"),
            Err(e) => tracing::error!(error = %e, "the data plane failed; stopping"),
        }
        rest.cancel();
        let stop = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), stop).await.is_err() {
            tracing::warn!("some tasks did not stop within 5s; exiting anyway");
        }
        // Joins the thread: its sockets are closed when `run` returns.
        drop(parts.data);
        served.map(drop).context("the data plane task failed")
    }
}

/// Builds a runtime, starts the gateway and serves until SIGTERM/SIGINT (drain) or a second
/// signal (exit at once). Called by `main` with the installed Prometheus recorder.
pub fn run_from_config(cfg: Config, metrics: Option<PrometheusHandle>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fedgate")
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(async move {
        describe_metrics();
        let bound = build(cfg, metrics).await?;
        let shutdown = bound.shutdown.clone();
        let mut serve = tokio::spawn(bound.run());
        tokio::select! {
            r = &mut serve => return r.context("gateway task panicked")?,
            () = signal() => {}
        }
        tracing::info!("signal received: draining (a second signal exits at once)");
        shutdown.cancel();
        // The drain finishes on its own (exit as soon as it has); a second signal cuts it short.
        tokio::select! {
            r = &mut serve => r.context("gateway task panicked")?,
            () = signal() => {
                tracing::warn!("second signal: exiting without waiting for the drain");
                std::process::exit(130)
            }
        }
    })
}

/// `discovery.source: kube`: the client and the ServiceExport version the API server serves.
/// (The cluster id was settled before, by [`resolve_cluster_id`].)
async fn connect_kube(cfg: &Config) -> anyhow::Result<(kube::Client, kube::ApiResource)> {
    let client = kube::client(cfg.discovery.kube.kubeconfig.as_deref()).await?;
    let exports = kube::export_resource(&client).await?;
    tracing::info!(exports = %exports.api_version, "connected to the Kubernetes API server");
    Ok((client, exports))
}

/// The complete config of `fedgate run`. With `discovery.source: kube` the cluster's
/// ClusterProperties (KEP-2149) are read once: `cluster.clusterset.k8s.io` is the cluster id
/// (else the config's `cluster.id`; both and different, or neither, is an error), and
/// `clusterset.k8s.io`, when present, must be `cluster.clusterset`. Blocking: it runs before
/// the gateway's runtime exists.
pub fn resolve_cluster_id(loaded: config::Loaded) -> anyhow::Result<Config> {
    if loaded.discovery().source != SourceKind::Kube {
        return match loaded {
            config::Loaded::Complete(cfg) => Ok(*cfg),
            // The loader allows a missing id only with the kube source.
            config::Loaded::NeedsClusterId(_) => anyhow::bail!("cluster.id is not set"),
        };
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a runtime to read the ClusterProperties")?;
    let kubeconfig = loaded.discovery().kube.kubeconfig.clone();
    let found = runtime.block_on(async move {
        let client = kube::client(kubeconfig.as_deref()).await?;
        kube::identity::read_properties(&client).await
    })?;
    let (id, from) = kube::identity::resolve(loaded.configured_id(), loaded.clusterset(), &found)?;
    let cfg = loaded.with_cluster_id(&id).map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(cluster = %id, from = from.as_str(), "cluster id");
    Ok(cfg)
}

/// Waits for SIGTERM or SIGINT.
async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        // Without signal handlers the gateway can still be stopped by SIGKILL.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn describe_metrics() {
    crate::dataplane::metrics::describe();
    fedgate_dns::metrics::describe();
    fedgate_tunnel::metrics::describe();
    fedgate_discovery::peers::describe_metrics();
    imports::describe_metrics();
    kube::metrics::describe();
}
