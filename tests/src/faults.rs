//! Helpers of the fault suite (`tests/tests/fault_*.rs`): a real backend (a Python asyncio
//! server that names itself, then echoes lines), client round trips and bursts through a
//! ClusterSetIP, and readings of a gateway's metrics and views.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::ControlFlow;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{
    AddrBlock, Gateway, GatewaySpec, Pki, exported_service, http_get, metric_samples, wait_vip,
};

/// How long a test waits for an export to reach a gateway's imports.
pub const PROPAGATION: Duration = Duration::from_secs(10);
/// The clusterset of the fault suite's gateways.
pub const CLUSTERSET: &str = "faults";

/// A Service `fault/<name>` (port 80 → `port`) with one ready endpoint, exported.
pub fn export_yaml(name: &str, endpoint: &str, port: u16) -> String {
    exported_service("fault", name, ("tcp", 80, port), endpoint)
}

/// `g` exports `fault/<name>` (file `<name>.yaml`) with one ready endpoint, `backend`.
pub fn export_backend(g: &Gateway, name: &str, backend: SocketAddr) -> Result<()> {
    let yaml = export_yaml(name, &backend.ip().to_string(), backend.port());
    g.write_cluster_file(&format!("{name}.yaml"), &yaml)
}

/// A gateway without peers exports `fault/<name>` with one endpoint, `backend`, and imports it
/// from itself: returns its ClusterSetIP (port 80) once imported.
pub fn export_own(g: &Gateway, name: &str, backend: SocketAddr) -> Result<SocketAddr> {
    export_backend(g, name, backend)?;
    wait_import_vip(g, "fault", name, &[g.spec.id.as_str()], 80)
}

/// Gateway `alpha` without peers, in an address block of its own, with `extra` YAML at the
/// top level of its config, started.
pub fn lone_gateway(root: &std::path::Path, extra: &str) -> Result<(Gateway, AddrBlock)> {
    let block = AddrBlock::unique();
    let pki = Pki::new(root, "ca", CLUSTERSET)?;
    let spec = GatewaySpec {
        peers: vec![],
        extra: extra.to_owned(),
        ..GatewaySpec::mesh(block, CLUSTERSET, &["alpha"], 0)
    };
    let mut alpha = Gateway::prepare(root, spec, pki.issue("alpha", &root.join("certs-alpha"))?)?;
    alpha.start()?;
    Ok((alpha, block))
}

/// [`lone_gateway`] (with `extra`) exporting `fault/<name>` with one backend, `alpha-1` (listen
/// backlog `backlog`), on `host:port` of its block. Returns the gateway, the backend and the
/// service's ClusterSetIP (port 80) once imported.
pub fn lone_gateway_serving(
    root: &std::path::Path,
    extra: &str,
    name: &str,
    (host, port): (u8, u16),
    backlog: u32,
) -> Result<(Gateway, Backend, SocketAddr)> {
    let (alpha, block) = lone_gateway(root, extra)?;
    let backend_addr = block.addr(host, port);
    let backend = Backend::start(backend_addr, "alpha-1", backlog)?;
    let vip = export_own(&alpha, name, backend_addr)?;
    Ok((alpha, backend, vip))
}

/// A process's resident memory in KiB and its open descriptors.
pub fn rss_kib_and_fds(pid: u32) -> Result<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS in /proc/<pid>/status")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
}

/// An asyncio TCP server: on each connection it writes `<name>\n`, then echoes lines. The
/// reproduction's server has a listen backlog of 4, so a stopped server's queue fills and
/// further connects time out.
const BACKEND: &str = r#"
import asyncio, sys
host, port, name, backlog = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
async def handle(reader, writer):
    try:
        writer.write((name + "\n").encode())
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                break
            writer.write(line)
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(handle, host, port, backlog=backlog, reuse_address=True)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"#;

/// A backend process; killed (after SIGCONT, in case it is stopped) on drop.
pub struct Backend {
    child: Child,
}

impl Backend {
    pub fn start(addr: SocketAddr, name: &str, backlog: u32) -> Result<Self> {
        let (ip, port, backlog) =
            (addr.ip().to_string(), addr.port().to_string(), backlog.to_string());
        let mut child = Command::new("python3")
            .args(["-u", "-c", BACKEND, &ip, &port, name, &backlog])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the python3 backend (install python3)")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("backend stdout")?).read_line(&mut line)?;
        if line.trim() != "READY" {
            bail!("backend {name} on {addr}: expected READY, got {line:?}");
        }
        Ok(Self { child })
    }

    pub fn signal(&self, sig: &str) -> Result<()> {
        signal_pid(self.child.id(), sig)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.signal("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal_pid(pid: u32, sig: &str) -> Result<()> {
    let st = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status()?;
    if !st.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// One client connection through `vip`: reads the backend's name, then one echoed line.
/// Returns the name of the backend that answered.
pub fn round_trip(vip: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&vip, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut name = String::new();
    reader.read_line(&mut name)?;
    s.write_all(b"ping\n")?;
    let mut echo = String::new();
    reader.read_line(&mut echo)?;
    if echo != "ping\n" {
        bail!("echo through {vip} answered {echo:?}");
    }
    Ok(name.trim().to_owned())
}

/// Opens `n` client connections through `vip` at once; returns how many round trips failed.
pub fn burst(vip: SocketAddr, n: usize, timeout: Duration) -> usize {
    let threads: Vec<_> =
        (0..n).map(|_| std::thread::spawn(move || round_trip(vip, timeout).is_err())).collect();
    threads.into_iter().map(|t| t.join().unwrap_or(true)).filter(|failed| *failed).count()
}

/// The ClusterSetIP `ns/name` got at `g`, once it is imported from `clusters`.
pub fn wait_import_vip(
    g: &Gateway,
    ns: &str,
    name: &str,
    clusters: &[&str],
    port: u16,
) -> Result<SocketAddr> {
    let ip = wait_vip(g, ns, name, clusters, PROPAGATION)?;
    Ok(SocketAddr::new(ip.parse()?, port))
}

pub fn metric(g: &Gateway, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let (_, text) = http_get(g.spec.admin, "/metrics")?;
    Ok(metric_samples(&text, name, labels).iter().map(|(_, v)| v).sum())
}

/// Endpoints `/debug/probes` lists as ejected.
pub fn ejected(g: &Gateway) -> Result<Vec<serde_json::Value>> {
    Ok(g.json("/debug/probes")?["ejected"].as_array().cloned().unwrap_or_default())
}

/// `dig +short` A records of `<name>.<ns>.svc.clusterset.local` at `g`'s DNS server.
pub fn dig_a(g: &Gateway, ns: &str, name: &str) -> Result<Vec<String>> {
    crate::require_tool("dig", "bind9-dnsutils");
    let out = Command::new("dig")
        .arg(format!("@{}", g.spec.dns.ip()))
        .args(["-p", &g.spec.dns.port().to_string(), "+tries=1", "+time=2", "+short"])
        .arg(format!("{name}.{ns}.svc.clusterset.local"))
        .arg("A")
        .output()
        .context("running dig")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("dig failed ({}): {text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(text.lines().map(str::to_owned).collect())
}

/// A thread that calls `next` until stopped, pausing `pace` after each call, and keeps what it
/// returns: `Continue(Some(sample))` is recorded, `Continue(None)` is not, `Break` ends the
/// thread. Tests look at the samples while the load runs ([`snapshot`](Self::snapshot)) and
/// after it ([`finish`](Self::finish)). Dropping it stops the thread without waiting.
pub struct Recorder<T> {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<T>>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Clone + Send + 'static> Recorder<T> {
    pub fn start(
        pace: Duration,
        mut next: impl FnMut() -> ControlFlow<(), Option<T>> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, out) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match next() {
                    ControlFlow::Continue(Some(sample)) => {
                        out.lock().expect("samples lock").push(sample)
                    }
                    ControlFlow::Continue(None) => {}
                    ControlFlow::Break(()) => break,
                }
                if !pace.is_zero() {
                    std::thread::sleep(pace);
                }
            }
            // `next` drops here, and with it whatever it owns (e.g. a client process).
        });
        Self { stop, samples, thread: Some(thread) }
    }

    /// The samples so far.
    pub fn snapshot(&self) -> Vec<T> {
        self.samples.lock().expect("samples lock").clone()
    }

    /// Stops the thread, waits for it and returns every sample.
    pub fn finish(mut self) -> Vec<T> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.snapshot()
    }
}

impl<T> Drop for Recorder<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
