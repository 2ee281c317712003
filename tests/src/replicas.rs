//! Replicas (issue 19): several `fedgate run` processes of one cluster, each in a network
//! namespace of its own, on one LAN with the other clusters' gateways; client loops that count
//! every failed request and DNS query while replicas are killed and restarted.
//!
//! - [`Lan`]: a hub namespace holding a bridge (`10.251.0.1/24`, where the backends run, the
//!   "pods" of the cluster being tested) and one namespace per node, joined to the bridge by a
//!   veth pair, with `10.251.0.<host>/24`. The addresses exist only in the test's namespaces
//!   (as in [`crate::netns`]), so tests running at once never see each other's.
//! - Gateways are [`NsGateway`]s: tunnel (UDP 15443) and DNS (UDP/TCP 53) on the node's LAN
//!   address, admin on the node's `127.0.0.1:15000`, ClusterSetIPs from `127.2.0.0/24` on the
//!   node's own `lo` (replicas of one cluster bind the same ClusterSetIPs, each on its own node).
//! - [`TOOL`] (Python, run inside a namespace): the backend (names itself, then echoes lines), a
//!   TCP client loop (a new connection per request) and a DNS client loop that asks its
//!   nameservers the way a stub resolver with several `nameserver` lines does.
//! - [`Load`]: such a loop's results as they arrive, each stamped with the test's clock, and
//!   [`Tally`]: what failed and the worst latency.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, NsGateway, reap_stale_namespaces, require_tools, run};
use crate::{GatewaySpec, eventually, find_import, import_clusters, metric_samples};

/// The clusterset of the replica tests.
pub const CLUSTERSET: &str = "replicas";
/// The first three octets of the LAN.
const LAN: [u8; 3] = [10, 251, 0];
/// The tunnel port of every gateway.
pub const TUNNEL_PORT: u16 = 15443;
/// The hub's address on the LAN: backends listen here.
pub const HUB_HOST: u8 = 1;

/// `10.251.0.<host>`.
pub fn lan_ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(LAN[0], LAN[1], LAN[2], host)
}

/// The tunnel address of the gateway on node `host`.
pub fn tunnel_addr(host: u8) -> SocketAddr {
    SocketAddr::new(lan_ip(host).into(), TUNNEL_PORT)
}

/// A LAN of namespaces (see the module docs); every namespace is deleted, with every process
/// in it, when its guard drops.
pub struct Lan {
    pub hub: Netns,
    tag: String,
    tmp: tempfile::TempDir,
}

impl Lan {
    /// The hub namespace with its bridge. Fails (never skips) without root, `ip`, `curl` or
    /// `python3`.
    pub fn new() -> Result<Self> {
        require_tools();
        reap_stale_namespaces();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // `fg-<pid>-`: the prefix crate::netns reaps when this process is gone.
        let tag = format!("fg-{}-r{n}", std::process::id());
        let hub = Netns::create(&format!("{tag}-hub"))?;
        hub.ip(&["link", "add", "br0", "type", "bridge"])?;
        hub.ip(&["addr", "add", &format!("{}/24", lan_ip(HUB_HOST)), "dev", "br0"])?;
        hub.ip(&["link", "set", "br0", "up"])?;
        let tmp = tempfile::tempdir()?;
        std::fs::write(tmp.path().join("replicas_tool.py"), TOOL)?;
        Ok(Self { hub, tag, tmp })
    }

    /// A scratch directory that lives as long as the LAN.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// A new namespace `<tag>-<name>` on the LAN with address `10.251.0.<host>/24` (`eth0`).
    pub fn node(&self, name: &str, host: u8) -> Result<Netns> {
        let ns = Netns::create(&format!("{}-{name}", self.tag))?;
        // Both ends are created inside namespaces (never in the host's): `v<host>` in the hub,
        // `eth0` in the node.
        let outer = format!("v{host}");
        self.hub.ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.hub.ip(&["link", "set", &outer, "master", "br0"])?;
        self.hub.ip(&["link", "set", &outer, "up"])?;
        ns.ip(&["addr", "add", &format!("{}/24", lan_ip(host)), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(ns)
    }

    /// Starts `replicas_tool.py <args>` inside `ns` (see [`TOOL`]).
    pub fn tool(&self, ns: &Netns, args: &[&str]) -> Result<LineProc> {
        let mut cmd = ns.command("python3");
        cmd.arg("-u").arg(self.tmp.path().join("replicas_tool.py")).args(args);
        LineProc::spawn(cmd, &format!("replicas_tool {args:?} in {}", ns.name))
    }

    /// The backend `name` on the hub at `10.251.0.1:<port>`, once it listens.
    pub fn backend(&self, port: u16, name: &str) -> Result<LineProc> {
        let host = lan_ip(HUB_HOST).to_string();
        let mut p = self.tool(&self.hub, &["backend", &host, &port.to_string(), name])?;
        p.wait_line(Duration::from_secs(10), |l| l == "READY")?;
        Ok(p)
    }
}

/// One line a [`LineProc`] printed and when the test read it.
#[derive(Clone, Debug)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

/// A process whose stdout lines are kept, each stamped when it arrived; killed on drop.
pub struct LineProc {
    child: Child,
    lines: Arc<Mutex<Vec<Line>>>,
    pub what: String,
}

impl LineProc {
    pub fn spawn(mut cmd: Command, what: &str) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {what}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = lines.clone();
        std::thread::spawn(move || {
            for text in BufReader::new(stdout).lines() {
                let Ok(text) = text else { break };
                out.lock().expect("lines lock").push(Line { at: Instant::now(), text });
            }
        });
        Ok(Self { child, lines, what: what.to_owned() })
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().expect("lines lock").clone()
    }

    /// Waits (at most `timeout`) for a line for which `want` holds; fails at once when the
    /// process exits first.
    pub fn wait_line(&mut self, timeout: Duration, want: impl Fn(&str) -> bool) -> Result<Line> {
        let (lines, what, child) = (&self.lines, &self.what, &mut self.child);
        eventually(&format!("{what}: a line as expected"), timeout, || {
            let got = lines.lock().expect("lines lock").clone();
            if let Some(l) = got.iter().find(|l| want(&l.text)) {
                return Ok(Some(l.clone()));
            }
            if let Some(status) = child.try_wait()? {
                bail!("{what} exited ({status}); it printed {got:?}");
            }
            Ok(None)
        })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LineProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One request or query of a client loop: when its result arrived, whether it succeeded, how
/// long it took and what it said (the backend's name, the server that answered, or the error).
#[derive(Clone, Debug)]
pub struct Outcome {
    pub end: Instant,
    pub ok: bool,
    pub took: Duration,
    pub detail: String,
}

impl Outcome {
    /// When it started (its end less how long the client measured it took).
    pub fn start(&self) -> Instant {
        self.end.checked_sub(self.took).unwrap_or(self.end)
    }

    /// Whether it was in flight at `t`: started before and ended after (with 20 ms of slack
    /// either side for the pipe between the client and the test).
    pub fn in_flight_at(&self, t: Instant) -> bool {
        let slack = Duration::from_millis(20);
        self.start() <= t + slack && self.end + slack >= t
    }

    /// Parses `ok <ms> <detail>` / `err <ms> <detail>`.
    fn parse(line: &Line) -> Option<Self> {
        let mut words = line.text.splitn(3, ' ');
        let ok = match words.next()? {
            "ok" => true,
            "err" => false,
            _ => return None,
        };
        let ms: f64 = words.next()?.parse().ok()?;
        let detail = words.next().unwrap_or_default().to_owned();
        Some(Self { end: line.at, ok, took: Duration::from_secs_f64(ms / 1000.0), detail })
    }
}

/// A client loop of [`TOOL`] (`tcp-loop`, `dns-loop`) running in a namespace.
pub struct Load {
    proc: LineProc,
}

impl Load {
    /// Starts `replicas_tool.py <args>` in `ns` and waits until it has started.
    pub fn start(lan: &Lan, ns: &Netns, args: &[&str]) -> Result<Self> {
        let mut proc = lan.tool(ns, args)?;
        proc.wait_line(Duration::from_secs(10), |l| l == "READY")?;
        Ok(Self { proc })
    }

    /// Every result so far.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.proc.lines().iter().filter_map(Outcome::parse).collect()
    }

    /// Waits (at most `timeout`) until `n` results that ended after `from` succeeded.
    pub fn wait_ok_after(&self, from: Instant, n: usize, timeout: Duration) -> Result<()> {
        self.wait_ok_where(from, n, timeout, "", |_| true)
    }

    /// Waits (at most `timeout`) until `n` results that ended after `from` succeeded with a
    /// detail for which `want` holds (`what` says which, for the error).
    pub fn wait_ok_where(
        &self,
        from: Instant,
        n: usize,
        timeout: Duration,
        what: &str,
        want: impl Fn(&str) -> bool,
    ) -> Result<()> {
        eventually(&format!("{n} successes {what} of {}", self.proc.what), timeout, || {
            let outcomes = self.outcomes();
            let ok = outcomes.iter().filter(|o| o.ok && o.end > from && want(&o.detail)).count();
            Ok((ok >= n).then_some(()))
        })
    }

    /// Stops the loop; returns every result.
    pub fn finish(mut self) -> Vec<Outcome> {
        self.proc.kill();
        self.outcomes()
    }
}

/// How a set of results went.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub total: usize,
    pub failed: usize,
    /// The first few failures (detail and when, relative to the first result).
    pub failures: Vec<String>,
    pub worst: Duration,
}

impl Tally {
    pub fn of<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> Self {
        let outcomes: Vec<&Outcome> = outcomes.into_iter().collect();
        let first = outcomes.first().map(|o| o.end);
        let mut t = Tally { total: outcomes.len(), ..Tally::default() };
        for o in &outcomes {
            t.worst = t.worst.max(o.took);
            if !o.ok {
                t.failed += 1;
                if t.failures.len() < 5 {
                    let at = first.map(|f| o.end.saturating_duration_since(f)).unwrap_or_default();
                    t.failures.push(format!("at +{at:.1?} after {:.0?}: {}", o.took, o.detail));
                }
            }
        }
        t
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {} failed, worst {:.0?}", self.failed, self.total, self.worst)?;
        if !self.failures.is_empty() {
            write!(f, " (first failures: {:?})", self.failures)?;
        }
        Ok(())
    }
}

/// A gateway of cluster `id` on node `host`: tunnel and DNS (port 53) on its LAN address, admin
/// on `127.0.0.1:15000` and ClusterSetIPs from `127.2.0.0/24` inside its namespace; `peers`
/// (id, first address); a 5 s lease; `extra` YAML at the top level.
pub fn spec(id: &str, host: u8, peers: &[(&str, SocketAddr)], extra: &str) -> GatewaySpec {
    let local = |port| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    GatewaySpec {
        id: id.to_owned(),
        clusterset: CLUSTERSET.to_owned(),
        region: format!("region-{id}"),
        zone: format!("zone-{id}"),
        tunnel: tunnel_addr(host),
        admin: local(15000),
        dns: SocketAddr::new(lan_ip(host).into(), 53),
        vip_range: "127.2.0.0/24".to_owned(),
        peers: peers.iter().map(|(p, a)| ((*p).to_owned(), *a)).collect(),
        lease: "5s".to_owned(),
        extra: extra.to_owned(),
    }
}

/// Writes (does not start) gateway `spec` in `ns`, its directory under `root/<host>-<id>`
/// (replicas of one cluster share an id), with `tls` (cert, key, CA).
pub fn prepare(
    ns: &Netns,
    root: &Path,
    spec: GatewaySpec,
    tls: &(PathBuf, PathBuf, PathBuf),
) -> Result<NsGateway> {
    let host = match spec.tunnel.ip() {
        std::net::IpAddr::V4(ip) => ip.octets()[3],
        std::net::IpAddr::V6(_) => bail!("the LAN is IPv4"),
    };
    let root = root.join(format!("{host}-{}", spec.id));
    NsGateway::prepare(ns, &root, spec, tls.clone())
}

/// Gives `g`'s peer entry whose address is `first` every address of `all` (`addresses: [...]`).
pub fn set_peer_addresses(g: &NsGateway, first: SocketAddr, all: &[SocketAddr]) -> Result<()> {
    let list: Vec<String> = all.iter().map(|a| format!("\"{a}\"")).collect();
    g.gw.edit_config(&format!("address: \"{first}\""), &format!("addresses: [{}]", list.join(", ")))
}

/// Points `g`'s file source at `dir` (the cluster directory of another replica of its cluster).
pub fn share_cluster_dir(g: &NsGateway, dir: &Path) -> Result<()> {
    let own = format!("dir: {}", g.gw.cluster_dir.display());
    g.gw.edit_config(&own, &format!("dir: {}", dir.display()))
}

/// SIGKILL (a crash: no drain, no goodbye to peers), then reaps the process.
pub fn crash(g: &mut NsGateway) -> Result<()> {
    g.signal("KILL")?;
    g.wait_exit(Duration::from_secs(10))?;
    Ok(())
}

/// Waits (at most `timeout`) until `/readyz` answers 200.
pub fn wait_ready(g: &NsGateway, timeout: Duration) -> Result<()> {
    eventually(&format!("{} /readyz", g.gw.spec.id), timeout, || Ok(g.get("/readyz").ok()))?;
    Ok(())
}

/// The sum of the samples of metric `name` with `labels` at `g`.
pub fn metric(g: &NsGateway, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let text = g.get("/metrics")?;
    Ok(metric_samples(&text, name, labels).iter().map(|(_, v)| v).sum())
}

/// `peer`'s entry of `g`'s `/debug/peers`.
pub fn peer_status(g: &NsGateway, peer: &str) -> Result<serde_json::Value> {
    let peers = g.json("/debug/peers")?;
    peers
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["cluster"] == peer))
        .cloned()
        .with_context(|| format!("{peer} in /debug/peers of {}: {peers}", g.gw.spec.id))
}

/// The replica of `peer` at `address` in `g`'s `/debug/peers`, if listed.
pub fn replica_status(
    g: &NsGateway,
    peer: &str,
    address: SocketAddr,
) -> Result<Option<serde_json::Value>> {
    let p = peer_status(g, peer)?;
    let want = address.to_string();
    Ok(p["replicas"].as_array().and_then(|rs| rs.iter().find(|r| r["address"] == want)).cloned())
}

/// Waits (at most `timeout`) until `g` is connected to `peer`'s replica at `address` and has
/// heard its instance id, other than `not` (the id of a process that was killed); returns it.
pub fn wait_replica(
    g: &NsGateway,
    peer: &str,
    address: SocketAddr,
    not: Option<&str>,
    timeout: Duration,
) -> Result<String> {
    let id = &g.gw.spec.id;
    let what = format!("{id} connected to {peer}'s replica {address} (not instance {not:?})");
    eventually(&what, timeout, || {
        let Some(r) = replica_status(g, peer, address)? else { return Ok(None) };
        let instance = r["instance"].as_str().filter(|i| Some(*i) != not);
        Ok(instance.filter(|_| r["connected"] == true).map(str::to_owned))
    })
}

/// The admin server of the gateway in namespace `ns` (at `admin`), for threads that do not own
/// its [`NsGateway`].
#[derive(Clone, Debug)]
pub struct Admin {
    ns: String,
    admin: SocketAddr,
}

impl Admin {
    pub fn of(g: &NsGateway, ns: &Netns) -> Self {
        Self { ns: ns.name.clone(), admin: g.gw.spec.admin }
    }

    /// GET `path` (HTTP errors fail).
    pub fn text(&self, path: &str) -> Result<String> {
        let url = format!("http://{}{path}", self.admin);
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(["curl", "-sSf", "-m", "3", &url]))
    }

    pub fn json(&self, path: &str) -> Result<serde_json::Value> {
        let body = self.text(path)?;
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
    }
}

/// One look at whether a gateway imported a service.
#[derive(Clone, Debug)]
pub struct ImportLook {
    pub at: Instant,
    /// `Ok(ClusterSetIP)` while it is imported from exactly the expected clusters, else what
    /// was seen instead.
    pub seen: Result<String, String>,
}

/// Looks at `admin`'s `/debug/imports` every 200 ms, until stopped, for `ns/name` imported
/// from exactly `clusters`.
pub fn watch_import(
    admin: Admin,
    ns: &str,
    name: &str,
    clusters: &[&str],
) -> crate::faults::Recorder<ImportLook> {
    let (ns, name) = (ns.to_owned(), name.to_owned());
    let clusters: Vec<String> = clusters.iter().map(|c| (*c).to_owned()).collect();
    crate::faults::Recorder::start(Duration::from_millis(200), move || {
        let at = Instant::now();
        let seen = match admin.json("/debug/imports") {
            Err(e) => Err(format!("/debug/imports: {e:#}")),
            Ok(imports) => match find_import(&imports, &ns, &name) {
                None => Err(format!("{ns}/{name} not imported")),
                Some(i) if import_clusters(i) != clusters => {
                    Err(format!("{ns}/{name} imported from {:?}", import_clusters(i)))
                }
                Some(i) => Ok(i["ips"][0].as_str().unwrap_or_default().to_owned()),
            },
        };
        std::ops::ControlFlow::Continue(Some(ImportLook { at, seen }))
    })
}

/// Python run inside the namespaces. Servers print `READY` once they listen; client loops print
/// `READY`, then one line per request: `ok <ms> <detail>` or `err <ms> <detail>`.
///
/// - `backend HOST PORT NAME`: on each connection writes `NAME <client address>\n` (the client
///   is the gateway replica that connected), then echoes lines.
/// - `tcp-loop HOST PORT PACE_MS TIMEOUT_S`: one new TCP connection per request: reads the
///   backend's name, sends `ping\n`, expects it back; `PACE_MS` between requests.
/// - `dns-loop NAME IP PACE_MS TIMEOUT_S COUNT SERVER...`: an A query for NAME, asked as a stub
///   resolver with these `nameserver` lines and `options timeout:TIMEOUT_S attempts:1` asks:
///   the first server; on a timeout, an ICMP error, SERVFAIL, REFUSED or NOTIMP, the next one.
///   A query succeeds when the answer is NOERROR with IP among its A records. COUNT queries
///   (0: until killed).
/// - `relay LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT`: copies each TCP connection to
///   the target, both ways (the kube-apiserver on the hub's loopback, for the nodes).
pub const TOOL: &str = r#"
import asyncio, random, socket, struct, sys, time

def ms(t0):
    return (time.monotonic() - t0) * 1000

def backend(host, port, name):
    async def handle(reader, writer):
        try:
            writer.write(("%s %s\n" % (name, writer.get_extra_info("peername")[0])).encode())
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
        server = await asyncio.start_server(handle, host, int(port), backlog=512, reuse_address=True)
        print("READY", flush=True)
        async with server:
            await server.serve_forever()
    asyncio.run(main())

def tcp_loop(host, port, pace_ms, timeout):
    print("READY", flush=True)
    while True:
        t0 = time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=float(timeout)) as s:
                f = s.makefile("rwb")
                name = f.readline()
                if not name.endswith(b"\n"):
                    raise OSError("closed before the backend's name: %r" % name)
                f.write(b"ping\n")
                f.flush()
                echo = f.readline()
                if echo != b"ping\n":
                    raise OSError("echo answered %r" % echo)
            print("ok %.1f %s" % (ms(t0), name.decode().strip()), flush=True)
        except Exception as e:
            print("err %.1f %r" % (ms(t0), e), flush=True)
        time.sleep(int(pace_ms) / 1000)

RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}

def skip_name(data, i):
    while True:
        n = data[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += 1 + n

def query(server, qname, timeout):
    qid = random.getrandbits(16)
    labels = b"".join(bytes([len(l)]) + l.encode() for l in qname.rstrip(".").split("."))
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((server, 53))
        s.send(packet)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer within %ss" % timeout)
            s.settimeout(left)
            data = s.recv(4096)
            if len(data) >= 12 and struct.unpack(">H", data[:2])[0] == qid:
                break
    finally:
        s.close()
    flags, qd, an = struct.unpack(">HHH", data[2:8])
    i = 12
    for _ in range(qd):
        i = skip_name(data, i) + 4
    ips = []
    for _ in range(an):
        i = skip_name(data, i)
        rtype, _, _, rdlen = struct.unpack(">HHIH", data[i:i + 10])
        i += 10
        if rtype == 1 and rdlen == 4:
            ips.append(socket.inet_ntoa(data[i:i + 4]))
        i += rdlen
    return flags & 0xF, ips

def dns_loop(qname, expected, pace_ms, timeout, count, *servers):
    print("READY", flush=True)
    n = 0
    while int(count) == 0 or n < int(count):
        n += 1
        t0 = time.monotonic()
        tried = []
        answer = None
        for server in servers:
            try:
                rcode, ips = query(server, qname, float(timeout))
            except Exception as e:
                tried.append("%s: %r" % (server, e))
                continue
            if rcode in (2, 4, 5):
                tried.append("%s: %s" % (server, RCODES[rcode]))
                continue
            answer = (server, rcode, ips)
            break
        if answer is None:
            print("err %.1f no server answered: %s" % (ms(t0), "; ".join(tried)), flush=True)
        elif answer[1] == 0 and expected in answer[2]:
            print("ok %.1f %s %s retried=%d" % (ms(t0), answer[0], ",".join(answer[2]), len(tried)), flush=True)
        else:
            print("err %.1f %s answered %s %s (before: %s)" % (ms(t0), answer[0], RCODES.get(answer[1], answer[1]), answer[2], tried), flush=True)
        time.sleep(int(pace_ms) / 1000)

def relay(listen_host, listen_port, target_host, target_port):
    async def pipe(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()
    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(target_host, int(target_port))
        except Exception:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
    async def main():
        server = await asyncio.start_server(handle, listen_host, int(listen_port), reuse_address=True)
        print("READY", flush=True)
        async with server:
            await server.serve_forever()
    asyncio.run(main())

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "relay":
    relay(*args)
elif cmd == "backend":
    backend(*args)
elif cmd == "tcp-loop":
    tcp_loop(*args)
elif cmd == "dns-loop":
    dns_loop(*args)
else:
    sys.exit("unknown command " + cmd)
"#;

/// The service alpha exports in [`Clusters`]: `rep/web`, port 80, backed by the hub's backend
/// on [`BACKEND_PORT`].
pub const SERVICE_NS: &str = "rep";
pub const SERVICE_NAME: &str = "web";
/// Its `clusterset.local` name.
pub const QNAME: &str = "web.rep.svc.clusterset.local";
pub const BACKEND_PORT: u16 = 8080;
/// Alpha's replica `i` is node `11 + i`; bravo is node 21.
pub const A_FIRST_HOST: u8 = 11;
pub const B_HOST: u8 = 21;
/// Bound on each wait for propagation, readiness and reconnection.
pub const PROPAGATION: Duration = Duration::from_secs(15);
/// How long the tests leave a replica that was taken down before they start it again (as a
/// pod being replaced on another node would be).
pub const DOWN_FOR: Duration = Duration::from_secs(1);
/// Client loops: the pause between two TCP requests and their timeout (seconds; above the
/// data plane's attempt timeout and retry on another replica, 1 s + 0.5 s), the pause between
/// two DNS queries and the timeout per server (`options timeout:1 attempts:1`).
const TCP_PACE_MS: &str = "20";
const TCP_TIMEOUT_S: &str = "5";
const DNS_PACE_MS: &str = "50";
const DNS_TIMEOUT_S: &str = "1";
/// The Lease alpha's replicas elect their writer with (kube mode).
pub const LEADER_LEASE: &str = "fedgate-leader";
pub const LEADER_LEASE_NS: &str = "default";

/// The tunnel address of alpha's replica `i`.
pub fn a_addr(i: usize) -> SocketAddr {
    tunnel_addr(a_host(i))
}

/// The node of alpha's replica `i`.
pub fn a_host(i: usize) -> u8 {
    A_FIRST_HOST + u8::try_from(i).expect("a few replicas")
}

/// The export of rep/web as Kubernetes YAML: one ready endpoint, the backend on the hub.
pub fn web_yaml(export: bool) -> String {
    let hub = lan_ip(HUB_HOST).to_string();
    let port = ("tcp", 80, BACKEND_PORT);
    crate::service_yaml(
        SERVICE_NS,
        SERVICE_NAME,
        false,
        &[port],
        &[(hub.as_str(), true)],
        export.then_some(crate::EXPORTED_AT),
    )
}

/// How alpha's replicas find their cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// One cluster directory, shared by the replicas.
    File,
    /// A real kube-apiserver (on the hub, reached through relays); the replicas elect a leader
    /// with a Lease of this duration.
    Kube { lease: Duration },
}

/// Cluster alpha with `replicas` gateways, bravo with one whose peer entry lists every alpha
/// replica (`addresses`), the backend of rep/web, rep/web exported by alpha and imported by
/// bravo. Fields are declared in the order they stop: gateways first, the namespaces last.
pub struct Clusters {
    pub a: Vec<NsGateway>,
    pub b: NsGateway,
    _procs: Vec<LineProc>,
    pub kube: Option<crate::kube::KubeCluster>,
    pub a_nodes: Vec<Netns>,
    pub b_node: Netns,
    pub lan: Lan,
    /// The ClusterSetIP of rep/web at bravo (clients use it) and at alpha (DNS answers it).
    pub b_vip: String,
    pub a_vip: String,
}

impl Clusters {
    /// Starts everything; `extra_a` is appended to each alpha config.
    pub fn start(replicas: usize, source: Source, extra_a: &str) -> Result<Self> {
        let lan = Lan::new()?;
        let pki = crate::Pki::new(lan.dir(), "ca", CLUSTERSET)?;
        let tls_a = pki.issue("alpha", &lan.dir().join("certs-alpha"))?;
        let tls_b = pki.issue("bravo", &lan.dir().join("certs-bravo"))?;
        let mut procs = vec![lan.backend(BACKEND_PORT, "alpha-backend")?];
        let kube = match source {
            Source::File => None,
            Source::Kube { .. } => Some(kube_on_hub(&lan, &mut procs)?),
        };
        let a_nodes = (0..replicas)
            .map(|i| lan.node(&format!("a{}", i + 1), a_host(i)))
            .collect::<Result<Vec<_>>>()?;
        let b_node = lan.node("b", B_HOST)?;
        let mut a: Vec<NsGateway> = Vec::new();
        for (i, ns) in a_nodes.iter().enumerate() {
            let s = spec("alpha", a_host(i), &[("bravo", tunnel_addr(B_HOST))], extra_a);
            let g = prepare(ns, lan.dir(), s, &tls_a)?;
            match (source, &kube, a.first()) {
                (Source::Kube { lease }, Some(k), _) => {
                    // The apiserver listens on the hub's 127.0.0.1:6443; this relay makes it the
                    // node's 127.0.0.1:6443 too, so the cluster's kubeconfig works as it is.
                    let hub = lan_ip(HUB_HOST).to_string();
                    let mut relay = lan.tool(ns, &["relay", "127.0.0.1", "6443", &hub, "6443"])?;
                    relay.wait_line(Duration::from_secs(10), |l| l == "READY")?;
                    procs.push(relay);
                    // The identity is left to its default (host name and process id): a
                    // restarted replica is a new candidate, as a new pod is. The kubeconfig is
                    // the cluster's admin one (no RBAC in the way of a benchmark).
                    let file =
                        format!("source: file\n  file: {{ dir: {} }}", g.gw.cluster_dir.display());
                    let kube = format!(
                        "source: kube\n  kube: {{ kubeconfig: {}, leaderElection: {{ leaseName: \
                         {LEADER_LEASE}, namespace: {LEADER_LEASE_NS}, leaseDuration: {}s }} }}",
                        k.kubeconfig_path().display(),
                        lease.as_secs(),
                    );
                    g.gw.edit_config(&file, &kube)?;
                }
                (_, _, Some(first)) => share_cluster_dir(&g, &first.gw.cluster_dir)?,
                (_, _, None) => {}
            }
            a.push(g);
        }
        let s = spec("bravo", B_HOST, &[("alpha", a_addr(0))], "");
        let mut b = prepare(&b_node, lan.dir(), s, &tls_b)?;
        let all: Vec<SocketAddr> = (0..replicas).map(a_addr).collect();
        set_peer_addresses(&b, a_addr(0), &all)?;
        match &kube {
            Some(k) => {
                k.kubectl_ok(&["create", "namespace", SERVICE_NS])?;
                k.apply_yaml(&web_yaml(false))?;
                k.export(SERVICE_NS, SERVICE_NAME)?;
            }
            None => a[0].gw.write_cluster_file("web.yaml", &web_yaml(true))?,
        }
        for g in &mut a {
            g.launch()?;
        }
        b.launch()?;

        let b_vip = crate::wait_vip(&b, SERVICE_NS, SERVICE_NAME, &["alpha"], PROPAGATION)?;
        let mut a_vip = None;
        for g in &a {
            let vip = crate::wait_vip(g, SERVICE_NS, SERVICE_NAME, &["alpha"], PROPAGATION)?;
            if a_vip.as_ref().is_some_and(|v| *v != vip) {
                bail!("alpha's replicas disagree on the ClusterSetIP: {a_vip:?}, {vip}");
            }
            a_vip = Some(vip);
        }
        for i in 0..replicas {
            wait_replica(&b, "alpha", a_addr(i), None, PROPAGATION)?;
        }
        let a_vip = a_vip.context("at least one replica")?;
        Ok(Self { a, b, _procs: procs, kube, a_nodes, b_node, lan, b_vip, a_vip })
    }

    /// The TCP loop in bravo's namespace through bravo's ClusterSetIP, and the DNS loop against
    /// alpha's replicas (in order); both have succeeded a few times when this returns.
    pub fn start_load(&self) -> Result<(Load, Load)> {
        let tcp_args = ["tcp-loop", &self.b_vip, "80", TCP_PACE_MS, TCP_TIMEOUT_S];
        let tcp = Load::start(&self.lan, &self.b_node, &tcp_args)?;
        let servers: Vec<String> =
            (0..self.a.len()).map(|i| lan_ip(a_host(i)).to_string()).collect();
        let mut args = vec!["dns-loop", QNAME, &self.a_vip, DNS_PACE_MS, DNS_TIMEOUT_S, "0"];
        args.extend(servers.iter().map(String::as_str));
        let dns = Load::start(&self.lan, &self.b_node, &args)?;
        let now = Instant::now();
        tcp.wait_ok_after(now, 20, PROPAGATION)?;
        dns.wait_ok_after(now, 10, PROPAGATION)?;
        Ok((tcp, dns))
    }

    /// One DNS query to alpha's replica `i` alone, from bravo's namespace: its result line.
    pub fn ask_replica(&self, i: usize) -> Result<String> {
        let server = lan_ip(a_host(i)).to_string();
        let once = ["dns-loop", QNAME, &self.a_vip, "0", DNS_TIMEOUT_S, "1", &server];
        let mut p = self.lan.tool(&self.b_node, &once)?;
        let is_result = |l: &str| l.starts_with("ok ") || l.starts_with("err ");
        Ok(p.wait_line(Duration::from_secs(10), is_result)?.text)
    }

    /// `fedgate_peer_lease_expiries_total` at bravo.
    pub fn lease_expiries(&self) -> Result<f64> {
        metric(&self.b, "fedgate_peer_lease_expiries_total", &[])
    }

    /// Takes alpha's replica `i` down with `fault`, leaves it down for `down_for` (from its
    /// exit), starts it again and waits until it is ready (`/readyz`), bravo is connected to its
    /// new process (a new instance id) and `tcp` has had 20 requests through it. Returns when
    /// it was taken down and when all that was true.
    pub fn down_and_back(
        &mut self,
        i: usize,
        fault: Fault,
        down_for: Duration,
        tcp: &Load,
    ) -> Result<Cycle> {
        let old = wait_replica(&self.b, "alpha", a_addr(i), None, PROPAGATION)?;
        let onset = Instant::now();
        let g = &mut self.a[i];
        match fault {
            Fault::Kill => crash(g)?,
            Fault::Term => {
                g.signal("TERM")?;
                let status = g.wait_exit(Duration::from_secs(15))?;
                if !status.success() {
                    bail!("alpha's replica {} exited after its drain with {status}", i + 1);
                }
            }
        }
        let down = onset.elapsed();
        std::thread::sleep(down_for);
        g.launch()?;
        wait_ready(g, PROPAGATION)?;
        let instance = wait_replica(&self.b, "alpha", a_addr(i), Some(&old), PROPAGATION)?;
        let connected = onset.elapsed();
        let now = Instant::now();
        tcp.wait_ok_where(now, 20, PROPAGATION, &format!("via replica {}", i + 1), via(i))?;
        Ok(Cycle { onset, down, connected, carrying: onset.elapsed(), instance })
    }

    /// Which replica holds the Lease (kube mode), as `fedgate_leader` says on each running
    /// replica: its index, if exactly one says so.
    pub fn leader(&self) -> Result<Option<usize>> {
        let mut leaders = Vec::new();
        for (i, g) in self.a.iter().enumerate() {
            if g.get("/healthz").is_ok() && metric(g, "fedgate_leader", &[])? == 1.0 {
                leaders.push(i);
            }
        }
        Ok(match leaders[..] {
            [one] => Some(one),
            _ => None,
        })
    }
}

/// Starts a kube-apiserver (with etcd) in the hub, the ServiceExport/ServiceImport CRDs in
/// it, and a relay on the hub's LAN address to it (kept in `procs`).
fn kube_on_hub(lan: &Lan, procs: &mut Vec<LineProc>) -> Result<crate::kube::KubeCluster> {
    let k = crate::kube::KubeCluster::start_in(&lan.hub, "alpha")?;
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    k.kubectl_ok(&["apply", "--server-side", "-f", &crds.to_string_lossy()])?;
    k.kubectl_ok(&["wait", "--for=condition=Established", "--timeout=30s", "crd", "--all"])?;
    let hub = lan_ip(HUB_HOST).to_string();
    let mut relay = lan.tool(&lan.hub, &["relay", &hub, "6443", "127.0.0.1", "6443"])?;
    relay.wait_line(Duration::from_secs(10), |l| l == "READY")?;
    procs.push(relay);
    Ok(k)
}

/// How a replica is taken down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL: a crash, no drain, no goodbye to peers.
    Kill,
    /// SIGTERM: it drains and exits by itself.
    Term,
}

/// One replica taken down and back ([`Clusters::down_and_back`]): when, and how long after
/// that it had exited, bravo was connected to its new process and it carried requests again.
#[derive(Clone, Debug)]
pub struct Cycle {
    pub onset: Instant,
    pub down: Duration,
    pub connected: Duration,
    pub carrying: Duration,
    /// The new process's instance id.
    pub instance: String,
}

/// Whether a request's detail (`<backend> <client address>`) says alpha's replica `i` carried
/// it.
pub fn via(i: usize) -> impl Fn(&str) -> bool {
    let suffix = format!(" {}", lan_ip(a_host(i)));
    move |detail: &str| detail.ends_with(&suffix)
}
