//! Fault suite, issue 20 follow-up: data that cannot be delivered must not starve the export
//! exchange. Real gateway processes on loopback, a backend that never reads, eight client
//! connections pushing through a ClusterSetIP until every buffer on the way is full. In a file
//! of its own: the transfers load both cores for a while, which the timing-sensitive peer
//! faults of tests/fault_peers.rs must not share.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use fedgate_e2e::faults::{self, Backend, export_backend};
use fedgate_e2e::*;

const CLUSTERSET: &str = "faults";
const PROPAGATION: Duration = Duration::from_secs(10);
/// Bound on connecting a client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts gateways `ids` (full mesh, lease `lease`) in one block, with ClusterSetIP ranges of
/// their own inside it.
fn start_gateways(
    tmp: &std::path::Path,
    block: AddrBlock,
    ids: &[&str],
    lease: &str,
) -> Result<Vec<Gateway>> {
    start_mesh(tmp, block, CLUSTERSET, ids, |i, spec| {
        let [_, a, b, _] = block.ip(1).octets();
        spec.lease = lease.to_owned();
        spec.vip_range = format!("127.{a}.{b}.{}/27", 128 + 32 * i);
    })
}

/// A backend that accepts connections and never reads them: it holds each socket until the
/// test ends.
struct SinkBackend {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SinkBackend {
    fn start(addr: SocketAddr) -> Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for SinkBackend {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects to `vip`, retrying while it is refused: the ClusterSetIP's listener is bound a
/// moment after the import is listed in `/debug/imports` (under a loaded full suite, long
/// enough for a connect to be refused once).
fn connect(vip: SocketAddr) -> Result<std::net::TcpStream> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        match std::net::TcpStream::connect_timeout(&vip, REQUEST_TIMEOUT) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return Ok(r?),
        }
    }
}

/// Data cannot starve the export exchange, in either direction. One gateway exports a backend
/// that accepts connections and never reads; eight clients push through the other's
/// ClusterSetIP until every buffer on the way is full (the streams' flow-control credit, the
/// QUIC connection's, both kernels'), and stay blocked for three leases (3 s each). The
/// writers' gateway's heartbeats must still get through: the sink's gateway never lets its
/// lease lapse and keeps its export. (One QUIC
/// connection carrying both would hold the exchange's messages behind the data: a slow
/// backend in one cluster would withdraw another cluster's services.)
#[test]
fn data_streams_blocked_on_a_slow_backend_do_not_starve_the_peer_exchange() -> Result<()> {
    // Alpha (the lower id) dials: first its streams, then bravo's, which go on the lanes
    // alpha dialed (with several threads from ports of their own).
    starve_test(false)?;
    starve_test(true)
}

/// [`data_streams_blocked_on_a_slow_backend_do_not_starve_the_peer_exchange`] with the data
/// flowing from the dialing gateway (`reverse` false) or from the accepting one.
fn starve_test(reverse: bool) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let gateways = start_gateways(tmp.path(), block, &["alpha", "bravo"], "3s")?;
    let [alpha, bravo] = match &gateways[..] {
        [a, b] if !reverse => [a, b],
        [a, b] => [b, a],
        _ => unreachable!(),
    };
    let sink_addr = block.addr(62, 7102);
    let _sink = SinkBackend::start(sink_addr)?;
    export_backend(bravo, "sink", sink_addr)?;
    // Alpha exports something too: bravo's import of it is what the lease protects.
    let echo_addr = block.addr(63, 7103);
    let _echo = Backend::start(echo_addr, "alpha-1", 128)?;
    export_backend(alpha, "echo", echo_addr)?;
    let ip = wait_vip(alpha, "fault", "sink", &[bravo.spec.id.as_str()], PROPAGATION)?;
    wait_vip(bravo, "fault", "echo", &[alpha.spec.id.as_str()], PROPAGATION)?;
    let vip = SocketAddr::new(ip.parse()?, 80);
    let expiries_before = faults::metric(bravo, "fedgate_peer_lease_expiries_total", &[])?;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<u64> {
                use std::io::Write;
                let mut s = connect(vip)?;
                s.set_write_timeout(Some(Duration::from_millis(500)))?;
                let chunk = vec![0x5a_u8; 256 * 1024];
                let mut pushed = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match s.write(&chunk) {
                        Ok(n) => pushed += n as u64,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(pushed)
            })
        })
        .collect();

    // Three leases with every path full.
    let blocked = Instant::now();
    let mut looks = 0;
    while blocked.elapsed() < Duration::from_secs(10) {
        assert!(
            find_import(&bravo.json("/debug/imports")?, "fault", "echo").is_some(),
            "{} withdrew {}'s export {:?} into the blocked transfer",
            bravo.spec.id,
            alpha.spec.id,
            blocked.elapsed()
        );
        looks += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut pushed = 0;
    for w in writers {
        pushed += w.join().map_err(|_| anyhow::anyhow!("a writer panicked"))??;
    }
    let expiries = faults::metric(bravo, "fedgate_peer_lease_expiries_total", &[])?;
    eprintln!(
        "8 writers pushed {:.1} MB from {} into a backend of {} that never reads; it kept the \
         writers' gateway's export at {looks} looks; lease expiries there {} -> {}",
        pushed as f64 / 1e6,
        alpha.spec.id,
        bravo.spec.id,
        expiries_before.abs(),
        expiries.abs()
    );
    // Everything on the way was full: far more than one connection's window went in.
    assert!(pushed > 64 << 20, "only {pushed} bytes went in: the paths never filled");
    assert_eq!(expiries, expiries_before, "{} let {}'s lease lapse", bravo.spec.id, alpha.spec.id);
    assert!(
        !bravo.log_text().contains("peer silent past its lease"),
        "{} logged a lapsed lease",
        bravo.spec.id
    );
    Ok(())
}
