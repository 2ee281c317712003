//! Network namespaces for end-to-end traffic tests: one namespace per cluster, joined by a
//! veth pair, each running its own `fedgate run` and its own backends (real Python servers).
//!
//! Everything here needs root and `ip`, `curl`, `python3`; [`require_tools`] fails the test
//! with a clear message when one is missing (the tests must fail, never skip, in CI).
//! Addresses live only inside namespaces this process created: `10.250.<n>.1/2` on the veth
//! pair, `127.x` on each namespace's own `lo`. Every namespace is deleted and every process
//! started in it killed when its guard drops, also on panic.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use crate::LOG_LEVEL;
use crate::{
    Gateway, GatewaySpec, Pki, check_output, eventually, fedgate_bin, spawn_fedgate_run,
    wait_gateway_up,
};

/// Asserts that the tests can run here: root, and `ip`, `curl`, `python3` on `PATH`.
/// Panics (fails the test) with a message naming what is missing.
pub fn require_tools() {
    let uid = Command::new("id").arg("-u").output().map(|o| o.stdout).unwrap_or_default();
    assert_eq!(
        String::from_utf8_lossy(&uid).trim(),
        "0",
        "network-namespace tests must run as root (they create namespaces and veth pairs)"
    );
    for (tool, arg) in [("ip", "-V"), ("curl", "--version"), ("python3", "--version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "`{tool}` is required by the network-namespace tests but is not runnable");
    }
}

/// Runs a command to completion; fails with its output when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    check_output(&format!("{cmd:?}"), out)
}

/// The real path of `python3` (pyenv shims would put a shell between our pid and Python).
fn python3() -> Result<String> {
    let p = run(Command::new("python3").args(["-c", "import sys; print(sys.executable)"]))?;
    Ok(p.trim().to_owned())
}

/// A network namespace this process created; deleted (with every process in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name` with `lo` up.
    pub fn create(name: &str) -> Result<Self> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Pids of the processes that live in this namespace.
    fn pids(&self) -> Vec<u32> {
        run(Command::new("ip").args(["netns", "pids", &self.name]))
            .map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Only processes that this test started live in its namespace.
        for pid in self.pids() {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        // A pod's resolv.conf (tests/kube/vnode); absent for other namespaces.
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// Deletes namespaces `fg-<pid>-...` left by an earlier test process that died without
/// running its guards (SIGKILL, timeout), together with the processes it started in them.
pub fn reap_stale_namespaces() {
    let Ok(list) = run(Command::new("ip").args(["netns", "list"])) else { return };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let mut parts = name.split('-');
        let (Some("fg"), Some(pid)) = (parts.next(), parts.next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            drop(Netns { name: name.to_owned() });
        }
    }
}

/// Two namespaces `a` and `b` joined by a veth pair: `a` has `10.250.<n>.1/24`, `b` `.2`.
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
    pub a_ip: Ipv4Addr,
    pub b_ip: Ipv4Addr,
    /// The veth's name inside `a` (e.g. for `tc qdisc … dev`).
    pub a_dev: String,
    python: String,
    tmp: tempfile::TempDir,
}

impl Pair {
    pub fn new() -> Result<Self> {
        reap_stale_namespaces();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let a = Netns::create(&format!("fg-{pid}-{n}-a"))?;
        let b = Netns::create(&format!("fg-{pid}-{n}-b"))?;
        // Interface names: at most 15 bytes; created straight inside the namespaces.
        let (va, vb) = (format!("fg{pid}x{n}a"), format!("fg{pid}x{n}b"));
        run(Command::new("ip").args([
            "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns",
            &b.name,
        ]))?;
        let subnet = (pid.wrapping_add(n) % 250) as u8;
        let a_ip = Ipv4Addr::new(10, 250, subnet, 1);
        let b_ip = Ipv4Addr::new(10, 250, subnet, 2);
        for (ns, dev, ip) in [(&a, &va, a_ip), (&b, &vb, b_ip)] {
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        let tmp = tempfile::tempdir()?;
        std::fs::write(tmp.path().join("fgtool.py"), FGTOOL)?;
        Ok(Self { a, b, a_ip, b_ip, a_dev: va, python: python3()?, tmp })
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Gateways `ids[0]` in `a` and `ids[1]` in `b` ([`ns_spec`]), peered over the veth, with
    /// certificates from one CA; `extra_a` is appended to the first one's config. Written, not
    /// started: a test may check the specs or edit a config before [`NsGateway::launch`].
    pub fn prepare_gateways(
        &self,
        clusterset: &str,
        [id_a, id_b]: [&str; 2],
        extra_a: &str,
    ) -> Result<(NsGateway, NsGateway)> {
        let root = self.dir();
        let pki = Pki::new(root, "ca", clusterset)?;
        let tls_a = pki.issue(id_a, &root.join(format!("certs-{id_a}")))?;
        let tls_b = pki.issue(id_b, &root.join(format!("certs-{id_b}")))?;
        let spec_a = ns_spec(id_a, clusterset, self.a_ip, &[(id_b, self.b_ip)], extra_a);
        let spec_b = ns_spec(id_b, clusterset, self.b_ip, &[(id_a, self.a_ip)], "");
        let a = NsGateway::prepare(&self.a, root, spec_a, tls_a)?;
        let b = NsGateway::prepare(&self.b, root, spec_b, tls_b)?;
        Ok((a, b))
    }

    /// Starts `fgtool.py <args>` inside `ns`; its stdout is read line by line.
    pub fn tool(&self, ns: &Netns, args: &[&str]) -> Result<NsProc> {
        let mut cmd = ns.command(&self.python);
        cmd.arg("-u").arg(self.tmp.path().join("fgtool.py")).args(args);
        NsProc::spawn(cmd, &format!("fgtool {args:?} in {}", ns.name))
    }

    /// Starts a server (`http`, `echo` or `sink`) in `ns` and waits for its `READY` line.
    pub fn server(&self, ns: &Netns, args: &[&str]) -> Result<NsProc> {
        let mut p = self.tool(ns, args)?;
        let line = p.line(Duration::from_secs(10))?;
        if line != "READY" {
            bail!("{}: expected READY, got {line:?}", p.what);
        }
        Ok(p)
    }
}

/// A process started in a namespace, killed on drop; stdout arrives as lines on a channel.
pub struct NsProc {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub what: String,
}

impl NsProc {
    fn spawn(mut cmd: Command, what: &str) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {what}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child: Some(child), stdin, lines, what: what.to_owned() })
    }

    /// The next stdout line, waiting at most `timeout`.
    pub fn line(&mut self, timeout: Duration) -> Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => bail!("{}: no output within {timeout:?}", self.what),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.as_mut().and_then(|c| c.wait().ok());
                bail!("{}: output ended (exit {status:?})", self.what)
            }
        }
    }

    /// Writes one line to the process's stdin.
    pub fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("process already reaped")?;
        let status =
            eventually(&format!("{} to exit", self.what), timeout, || Ok(child.try_wait()?))?;
        self.child = None;
        Ok(status)
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NsProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gateway whose process runs inside a namespace. The config comes from
/// [`Gateway::prepare`]; admin listens on `127.0.0.1` inside the namespace and is queried with
/// `ip netns exec <ns> curl`.
pub struct NsGateway {
    pub gw: Gateway,
    ns: String,
    child: Option<Child>,
    log_level: String,
}

impl NsGateway {
    /// Writes the config for a gateway in `ns` without starting it: a test may edit
    /// [`Gateway::config_path`] before [`launch`](Self::launch).
    pub fn prepare(
        ns: &Netns,
        root: &Path,
        spec: GatewaySpec,
        tls: (PathBuf, PathBuf, PathBuf),
    ) -> Result<Self> {
        let gw = Gateway::prepare(root, spec, tls)?;
        Ok(Self { gw, ns: ns.name.clone(), child: None, log_level: LOG_LEVEL.to_owned() })
    }

    /// Starts `fedgate run` in the namespace (again, after [`wait_exit`](Self::wait_exit)),
    /// waiting until `/healthz` answers. The log is appended to `gateway.log`.
    pub fn launch(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("gateway {} is already running", self.gw.spec.id);
        }
        let log = self.gw.dir.join("gateway.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(fedgate_bin());
        let child = spawn_fedgate_run(cmd, &self.log_level, &self.gw.config_path(), &log)?;
        let child = self.child.insert(child);
        let (ns, admin) = (&self.ns, self.gw.spec.admin);
        wait_gateway_up(
            child,
            &self.gw.spec.id,
            &log,
            "gateway /healthz",
            Duration::from_secs(20),
            || admin_get(ns, admin, "/healthz").is_ok(),
        )
    }

    /// The `--log-level` of the next [`launch`](Self::launch) (default [`LOG_LEVEL`]), e.g.
    /// with `quinn_proto=debug` added to see why packets were dropped.
    pub fn set_log_level(&mut self, level: &str) {
        self.log_level = level.to_owned();
    }

    /// GET on the admin server (HTTP errors fail).
    pub fn get(&self, path: &str) -> Result<String> {
        admin_get(&self.ns, self.gw.spec.admin, path)
    }

    pub fn json(&self, path: &str) -> Result<serde_json::Value> {
        let body = self.get(path)?;
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
    }

    /// Sends a signal by name (`ip netns exec` execs the gateway, so the pid is fedgate's).
    pub fn signal(&self, sig: &str) -> Result<()> {
        let pid = self.child.as_ref().context("gateway not running")?.id();
        run(Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()))?;
        Ok(())
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("gateway not running"),
        }
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("gateway not running")?;
        let status = eventually("gateway to exit", timeout, || Ok(child.try_wait()?))?;
        self.child = None;
        Ok(status)
    }
}

impl Drop for NsGateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- log of gateway {} ---\n{}", self.gw.spec.id, self.gw.log_text());
        }
    }
}

/// GET on an admin server at `admin` inside namespace `ns` (HTTP errors fail).
fn admin_get(ns: &str, admin: SocketAddr, path: &str) -> Result<String> {
    let url = format!("http://{admin}{path}");
    run(Command::new("ip").args(["netns", "exec", ns, "curl", "-sSf", "-m", "3", &url]))
}

/// A spec for a gateway in a namespace: tunnel on the veth address, admin and DNS on
/// `127.0.0.1`, ClusterSetIPs from `127.2.0.0/24` on the namespace's own `lo`.
pub fn ns_spec(
    id: &str,
    clusterset: &str,
    tunnel_ip: Ipv4Addr,
    peers: &[(&str, Ipv4Addr)],
    extra: &str,
) -> GatewaySpec {
    let local = |port| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    GatewaySpec {
        id: id.to_owned(),
        clusterset: clusterset.to_owned(),
        region: format!("region-{id}"),
        zone: format!("zone-{id}"),
        tunnel: SocketAddr::new(tunnel_ip.into(), 15443),
        admin: local(15000),
        dns: local(10053),
        vip_range: "127.2.0.0/24".to_owned(),
        peers: peers
            .iter()
            .map(|(p, ip)| ((*p).to_owned(), SocketAddr::new((*ip).into(), 15443)))
            .collect(),
        lease: "5s".to_owned(),
        extra: extra.to_owned(),
    }
}

impl crate::Views for NsGateway {
    fn id(&self) -> &str {
        &self.gw.spec.id
    }

    fn view(&self, path: &str) -> Result<serde_json::Value> {
        self.json(path)
    }
}

/// Endpoint addresses a kube-apiserver accepts (it refuses loopback ones) that lead nowhere
/// but into a namespace of the test: a veth pair with `<net>.1/29` on the host side
/// (`host_if`) and `.2`, `.3` inside the namespace (`eth0`), deleted with the guard, with every
/// process in it.
pub struct EndpointNet {
    pub ns: Netns,
    pub host: Ipv4Addr,
    pub inside: [Ipv4Addr; 2],
}

impl EndpointNet {
    /// Creates namespace `ns_name` and the veth pair; `net` is the first three octets.
    pub fn create(ns_name: &str, host_if: &str, net: [u8; 3]) -> Result<Self> {
        require_tools();
        let ns = Netns::create(ns_name)?;
        let at = |host: u8| Ipv4Addr::new(net[0], net[1], net[2], host);
        let (host, inside) = (at(1), [at(2), at(3)]);
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        ip(&["link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{host}/29"), "dev", host_if])?;
        ip(&["link", "set", host_if, "up"])?;
        for addr in inside {
            ns.ip(&["addr", "add", &format!("{addr}/29"), "dev", "eth0"])?;
        }
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(Self { ns, host, inside })
    }
}

/// Elapsed time helper for reports.
pub fn secs(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

/// Python helpers run inside the namespaces: servers (`http`, `echo`, `sink`, `whoami`) print
/// `READY` once listening; clients print one line per result.
const FGTOOL: &str = r#"
import hashlib, http.server, json, os, socket, socketserver, struct, sys, threading, time, urllib.request

def serve(handler_cls, host, port):
    class S(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True
    srv = S((host, int(port)), handler_cls)
    print("READY", flush=True)
    srv.serve_forever()

class Echo(socketserver.BaseRequestHandler):
    # Echoes every chunk at once; closes after the client's EOF.
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            self.request.sendall(data)

class Sink(socketserver.BaseRequestHandler):
    # Reads until the client half-closes, then answers "<bytes> <sha256>" and closes.
    def handle(self):
        h = hashlib.sha256()
        n = 0
        while True:
            data = self.request.recv(1 << 20)
            if not data:
                break
            h.update(data)
            n += len(data)
        self.request.sendall(("%d %s\n" % (n, h.hexdigest())).encode())

class WhoAmI(socketserver.BaseRequestHandler):
    # Answers the address the connection came from ("<ip>\n"), then closes.
    def handle(self):
        self.request.sendall(("%s\n" % self.client_address[0]).encode())

def fetch(host, port):
    # Connects, prints the first line the server sends (or "ERR <error>").
    try:
        s = socket.create_connection((host, int(port)), timeout=10)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        print(data.decode().strip() or "EMPTY", flush=True)
    except Exception as e:
        print("ERR %r" % e, flush=True)

def http_server(host, port, directory):
    class H(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=directory, **kw)
        def log_message(self, *a):
            pass
    class S(http.server.ThreadingHTTPServer):
        allow_reuse_address = True
        daemon_threads = True
    srv = S((host, int(port)), H)
    print("READY", flush=True)
    srv.serve_forever()

def http_loop(url, count, pause_at, interval_ms):
    # One new connection per request, `interval_ms` apart; before request `pause_at` print
    # PAUSE and wait for a line on stdin.
    for i in range(int(count)):
        time.sleep(int(interval_ms) / 1000)
        if i == int(pause_at):
            print("PAUSE", flush=True)
            sys.stdin.readline()
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                print("ok %d %s" % (i, r.read().decode().strip()), flush=True)
        except Exception as e:
            print("err %d %r" % (i, e), flush=True)
    print("DONE", flush=True)

def send(host, port, total):
    # Streams `total` bytes (1 MiB random block, each chunk tagged with its index), half-closes,
    # then reads the sink's answer. Prints JSON.
    total = int(total)
    block = os.urandom(1 << 20)
    h = hashlib.sha256()
    s = socket.create_connection((host, int(port)), timeout=30)
    t0 = time.monotonic()
    sent, i = 0, 0
    while sent < total:
        chunk = struct.pack("<Q", i) + block[8:]
        chunk = chunk[: total - sent]
        s.sendall(chunk)
        h.update(chunk)
        sent += len(chunk)
        i += 1
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        data = s.recv(4096)
        if not data:
            break
        reply += data
    s.close()
    print(json.dumps({"sent": sent, "sha256": h.hexdigest(), "reply": reply.decode().strip(),
                      "secs": time.monotonic() - t0}), flush=True)

def hold(host, port):
    # Opens one connection and keeps it: "ping" on stdin -> round trip, "close" -> close.
    s = socket.create_connection((host, int(port)), timeout=10)
    def roundtrip(msg):
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            data = s.recv(4096)
            if not data:
                return False
            got += data
        return got == msg
    print("OPEN" if roundtrip(b"hello\n") else "FAIL", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "ping":
            print("PONG" if roundtrip(b"ping\n") else "FAIL", flush=True)
        elif cmd == "close":
            s.shutdown(socket.SHUT_WR)
            rest = s.recv(4096)
            s.close()
            print("CLOSED %d" % len(rest), flush=True)
            return

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "echo":
    serve(Echo, *args)
elif cmd == "sink":
    serve(Sink, *args)
elif cmd == "whoami":
    serve(WhoAmI, *args)
elif cmd == "fetch":
    fetch(*args)
elif cmd == "http":
    http_server(*args)
elif cmd == "http-loop":
    http_loop(*args)
elif cmd == "send":
    send(*args)
elif cmd == "hold":
    hold(*args)
else:
    sys.exit("unknown command " + cmd)
"#;
