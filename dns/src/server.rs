//! The DNS server: binds UDP and TCP at once, keeps the zones in step with discovery, and
//! serves until shut down. UDP goes through the fast path first; TCP is [`crate::tcp`] (capped
//! connections, idle timeout).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fedgate_discovery::model::{ClusterState, ImportSnapshot};
use hickory_proto::op::ResponseCode;
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::error::DnsError;
use crate::handler::Handler;
use crate::metrics::{self, FastPathMetrics};
use crate::path::{RequestPath, answer_fast};
use crate::settings::{DnsSettings, RESOLV_CONF, resolve_upstreams};
use crate::table::Table;
use crate::wire;
use crate::zone::ZoneWriter;

/// Kernel receive buffer asked for on the UDP socket: absorbs bursts while workers are busy.
const UDP_RECV_BUFFER: usize = 4 << 20;
/// How long `run` waits, after shutdown, for the UDP receive threads to exit.
const UDP_EXIT_WAIT: Duration = Duration::from_millis(400);
/// Attempts to find a port free for both UDP and TCP when asked for port 0.
const BIND_ATTEMPTS: usize = 16;

/// The DNS server. `new` binds, `address` tells where, `run` serves.
pub struct DnsServer {
    settings: DnsSettings,
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    address: SocketAddr,
    table: Arc<Table>,
    writer: ZoneWriter,
    handler: Arc<Handler>,
    imports_rx: watch::Receiver<Arc<ImportSnapshot>>,
    cluster_rx: watch::Receiver<Arc<ClusterState>>,
    /// The import set's completeness ([`DnsServer::with_complete`]).
    complete_rx: Option<watch::Receiver<bool>>,
}

fn bind_pair(listen: SocketAddr) -> Result<(std::net::UdpSocket, std::net::TcpListener), DnsError> {
    let attempts = if listen.port() == 0 { BIND_ATTEMPTS } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let tcp = bind_tcp(listen)?;
        let addr = tcp.local_addr().map_err(|source| DnsError::Bind {
            proto: "tcp",
            addr: listen,
            source,
        })?;
        match bind_udp(addr) {
            Ok(udp) => return Ok((udp, tcp)),
            // Port 0: the port TCP got may be taken for UDP; try another.
            Err(e) if listen.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(DnsError::Settings("no free port for dns".into())))
}

fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener, DnsError> {
    let err = |source| DnsError::Bind { proto: "tcp", addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(SockProtocol::TCP))
        .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(1024).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}

fn bind_udp(addr: SocketAddr) -> Result<std::net::UdpSocket, DnsError> {
    let err = |source| DnsError::Bind { proto: "udp", addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(SockProtocol::UDP))
        .map_err(err)?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(UDP_RECV_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_RECV_BUFFER);
    socket.bind(&addr.into()).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}

impl DnsServer {
    /// Binds UDP and TCP on `settings.listen` (the same port for both; port 0 picks one),
    /// reads the upstreams, and builds the zones from the current snapshots.
    pub fn new(
        settings: DnsSettings,
        mut imports_rx: watch::Receiver<Arc<ImportSnapshot>>,
        mut cluster_rx: watch::Receiver<Arc<ClusterState>>,
    ) -> Result<Self, DnsError> {
        if settings.ttl.as_secs() > u64::from(i32::MAX as u32) {
            return Err(DnsError::Settings(format!("dns.ttl {:?} is too long", settings.ttl)));
        }
        let (udp, tcp) = bind_pair(settings.listen)?;
        let address = tcp.local_addr().map_err(|source| DnsError::Bind {
            proto: "tcp",
            addr: settings.listen,
            source,
        })?;
        let upstreams = resolve_upstreams(
            &settings.upstream,
            || std::fs::read_to_string(RESOLV_CONF),
            address,
        )?;
        if upstreams.is_empty() {
            tracing::warn!(
                "no dns upstream: names outside clusterset.local and cluster.local get SERVFAIL"
            );
        }
        let imports = imports_rx.borrow_and_update().clone();
        let cluster = cluster_rx.borrow_and_update().clone();
        let (table, writer, handler) =
            RequestPath::new(&settings, upstreams, &imports, &cluster).into_parts();
        metrics::zone_update("initial", table.len());
        tracing::info!(%address, names = table.len(), "dns server bound");
        Ok(Self {
            settings,
            udp,
            tcp,
            address,
            table,
            writer,
            handler,
            imports_rx,
            cluster_rx,
            complete_rx: None,
        })
    }

    /// Until `complete` turns true (the import set's first complete snapshot), a name missing
    /// from our zones gets SERVFAIL instead of NXDOMAIN: a replica that is starting does not
    /// yet know every service, and a resolver with several servers asks the next one on
    /// SERVFAIL but takes NXDOMAIN as final. Names already known are answered from the start.
    pub fn with_complete(mut self, mut complete: watch::Receiver<bool>) -> Self {
        let now = *complete.borrow_and_update();
        self.handler.set_complete(now);
        if !now {
            tracing::info!("dns: names not yet known get SERVFAIL until the first full sync");
        }
        self.complete_rx = Some(complete);
        self
    }

    /// The address bound (UDP and TCP share the port).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Names currently served (for readiness and tests).
    pub fn names(&self) -> usize {
        self.table.len()
    }

    /// Serves until `shutdown` is cancelled (the gateway's one stop signal, handed to every
    /// long-lived part), then stops taking queries and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DnsError> {
        let address = self.address;
        let socket_err = |proto, source| DnsError::Socket { proto, addr: address, source };
        let tcp = TcpListener::from_std(self.tcp).map_err(|e| socket_err("tcp", e))?;
        let tcp_stop = CancellationToken::new();
        let tcp_server = tokio::spawn(crate::tcp::serve(
            tcp,
            self.handler.clone(),
            self.settings.max_tcp_connections,
            self.settings.tcp_idle_timeout,
            tcp_stop.clone(),
        ));

        // UDP receive loops are OS threads doing blocking I/O: for the fast path that is much
        // cheaper per datagram than async readiness; slow-path work goes to the runtime. They
        // block without a timeout (an idle server never wakes up); shutdown wakes them.
        self.udp.set_nonblocking(false).map_err(|e| socket_err("udp", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (exit_tx, mut exit_rx) = mpsc::unbounded_channel::<io::Result<()>>();
        let worker = UdpWorker {
            socket: Arc::new(self.udp),
            table: self.table.clone(),
            handler: self.handler.clone(),
            permits: Arc::new(Semaphore::new(self.settings.max_inflight.max(1))),
            fast: FastPathMetrics::new(),
            runtime: Handle::current(),
            stop: stop.clone(),
        };
        let workers = self.settings.udp_workers.max(1);
        for i in 0..workers {
            let worker = worker.clone();
            let exit_tx = exit_tx.clone();
            std::thread::Builder::new()
                .name(format!("fedgate-dns-udp-{i}"))
                .spawn(move || {
                    let _ = exit_tx.send(worker.serve());
                })
                .map_err(|e| socket_err("udp", e))?;
        }
        drop(exit_tx);

        let updater = tokio::spawn(update_zones(
            Zones { writer: self.writer, table: self.table.clone(), handler: self.handler.clone() },
            self.imports_rx,
            self.cluster_rx,
            self.complete_rx,
        ));

        let result = tokio::select! {
            () = shutdown.cancelled() => Ok(()),
            Some(exit) = exit_rx.recv() => match exit {
                Ok(()) => Ok(()),
                Err(source) => Err(socket_err("udp", source)),
            },
        };
        stop.store(true, Ordering::Release);
        wake_receivers(&worker.socket);
        drop(worker);
        updater.abort();
        tcp_stop.cancel();
        let _ = tcp_server.await;
        // Every loop has been woken; each sends its exit (and drops its socket) at once.
        let _ =
            tokio::time::timeout(UDP_EXIT_WAIT, async { while exit_rx.recv().await.is_some() {} })
                .await;
        tracing::info!(%address, "dns server stopped");
        result
    }
}

/// What the zone updater writes to.
struct Zones {
    writer: ZoneWriter,
    table: Arc<Table>,
    handler: Arc<Handler>,
}

impl Zones {
    fn apply_imports(&mut self, rx: &mut watch::Receiver<Arc<ImportSnapshot>>) {
        let snap = rx.borrow_and_update().clone();
        let stats = self.writer.apply_imports(&snap);
        metrics::zone_update("imports", self.table.len());
        tracing::debug!(version = snap.version, ?stats, "dns zone clusterset.local updated");
    }

    fn apply_cluster(&mut self, rx: &mut watch::Receiver<Arc<ClusterState>>) {
        let state = rx.borrow_and_update().clone();
        let stats = self.writer.apply_cluster(&state);
        metrics::zone_update("cluster", self.table.len());
        tracing::debug!(?stats, "dns zone cluster.local updated");
    }
}

/// Applies snapshots as they come; ends when both senders are gone. Turns the handler
/// complete once `complete_rx` does, after applying the snapshots current at that moment.
async fn update_zones(
    mut zones: Zones,
    mut imports_rx: watch::Receiver<Arc<ImportSnapshot>>,
    mut cluster_rx: watch::Receiver<Arc<ClusterState>>,
    mut complete_rx: Option<watch::Receiver<bool>>,
) -> io::Result<()> {
    let (mut imports_open, mut cluster_open) = (true, true);
    while imports_open || cluster_open {
        tokio::select! {
            changed = imports_rx.changed(), if imports_open => {
                if changed.is_err() {
                    imports_open = false;
                    continue;
                }
                zones.apply_imports(&mut imports_rx);
            }
            changed = cluster_rx.changed(), if cluster_open => {
                if changed.is_err() {
                    cluster_open = false;
                    continue;
                }
                zones.apply_cluster(&mut cluster_rx);
            }
            // Complete, or the import set stopped first (then we answer with what we have).
            _ = wait_complete(&mut complete_rx) => {
                complete_rx = None;
                if imports_rx.has_changed().unwrap_or(false) {
                    zones.apply_imports(&mut imports_rx);
                }
                if cluster_rx.has_changed().unwrap_or(false) {
                    zones.apply_cluster(&mut cluster_rx);
                }
                zones.handler.set_complete(true);
                tracing::info!(names = zones.table.len(), "dns zones complete: unknown names get NXDOMAIN");
            }
        }
    }
    // Keep serving the last zones; nothing more will change them.
    std::future::pending::<()>().await;
    Ok(())
}

/// Resolves once `complete` is true or its sender is gone; never without one.
async fn wait_complete(complete: &mut Option<watch::Receiver<bool>>) {
    match complete {
        Some(rx) => {
            let _ = rx.wait_for(|c| *c).await;
        }
        None => std::future::pending().await,
    }
}

/// Wakes every thread blocked receiving on `socket`. `shutdown(SHUT_RD)` marks the socket
/// closed for reading and wakes its waiters even though a UDP socket is not connected (Linux
/// then returns `ENOTCONN`, which is expected here); every receive after it returns at once.
fn wake_receivers(socket: &std::net::UdpSocket) {
    match socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Read) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
        Err(error) => tracing::warn!(%error, "dns udp socket: shutdown for reading failed"),
    }
}

fn is_transient(e: &io::Error) -> bool {
    // ICMP errors of earlier sends surface on recv (ECONNREFUSED etc.): not the socket's fault.
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    ) || e
        .raw_os_error()
        .is_some_and(|c| c == 113 /* EHOSTUNREACH */ || c == 90 /* EMSGSIZE */)
}

/// What a UDP receive thread needs.
#[derive(Clone)]
struct UdpWorker {
    socket: Arc<std::net::UdpSocket>,
    table: Arc<Table>,
    handler: Arc<Handler>,
    permits: Arc<Semaphore>,
    fast: FastPathMetrics,
    runtime: Handle,
    stop: Arc<AtomicBool>,
}

impl UdpWorker {
    /// One UDP receive loop: fast path inline, everything else on a runtime task.
    fn serve(self) -> io::Result<()> {
        let mut buf = vec![0u8; 65_535];
        let mut key = Vec::with_capacity(256);
        let mut out = Vec::with_capacity(usize::from(wire::EDNS_PAYLOAD));
        loop {
            let received = self.socket.recv_from(&mut buf);
            // After shutdown the receive returns at once, with 0 bytes or an error.
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let (n, src) = match received {
                Ok(x) => x,
                Err(e) if is_transient(&e) => continue,
                Err(e) => return Err(e),
            };
            if src.port() == 0 {
                continue;
            }
            let started = Instant::now();
            let pkt = &buf[..n];
            if let Some((zone, qtype)) = answer_fast(&self.table, pkt, &mut key, &mut out) {
                if let Err(error) = self.socket.send_to(&out, src) {
                    tracing::debug!(%src, %error, "dns udp send failed");
                }
                self.fast.record(zone.index().min(2), qtype, started.elapsed());
                continue;
            }
            self.slow(pkt, src, started);
        }
    }

    fn slow(&self, pkt: &[u8], src: SocketAddr, started: Instant) {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let pkt = pkt.to_vec();
                let socket = self.socket.clone();
                let handler = self.handler.clone();
                self.runtime.spawn(async move {
                    if let Some(resp) = handler.handle_udp(pkt, src, started).await
                        && let Err(error) = socket.send_to(&resp, src)
                    {
                        tracing::debug!(%src, %error, "dns udp send failed");
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                // Overloaded: answer at once rather than let the query vanish.
                metrics::overloaded();
                if let Some(resp) = wire::error_response(pkt, ResponseCode::ServFail) {
                    let _ = self.socket.send_to(&resp, src);
                }
            }
        }
    }
}
