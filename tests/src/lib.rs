//! End-to-end test harness for fedgate: starts real gateway processes (the `fedgate` binary),
//! real clients and, where a test needs them, network namespaces. The tests live in
//! `tests/tests/`; `tests/README.md` explains the harness.
//!
//! Every wait is bounded (`eventually`), no test uses a fixed port on a shared address: each
//! test takes its own `127.X.Y.0/24` block ([`AddrBlock`]) and gateways in it may then use the
//! well-known ports.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Path of the `fedgate` binary under test: `$FEDGATE_BIN`, else the one built next to this
/// test executable (`cargo build -p fedgate` runs before the suite; see scripts/test.sh).
pub fn fedgate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FEDGATE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-exe> -> target/<profile>/fedgate; a binary of this crate
    // (target/<profile>/fedgate-lab) has it beside itself.
    let beside = exe.parent().expect("the executable's directory").join("fedgate");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile> directory");
    let bin = if beside.is_file() { beside } else { dir.join("fedgate") };
    assert!(
        bin.exists(),
        "fedgate binary not found at {} — run `cargo build -p fedgate` first or set FEDGATE_BIN",
        bin.display()
    );
    bin
}

/// The longest one [`fedgate`] command may run before the test fails.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// Runs `fedgate` with arguments and returns (exit code, stdout, stderr). A command still
/// running after [`COMMAND_LIMIT`] is killed and fails the call with what it printed so far.
pub fn fedgate(args: &[&str]) -> Result<(i32, String, String)> {
    let mut child = Command::new(fedgate_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running fedgate {args:?}"))?;
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut text);
            }
            let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
        });
        rx
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > COMMAND_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            let grace = Duration::from_secs(2);
            bail!(
                "fedgate {args:?} still running after {COMMAND_LIMIT:?}; killed it. stdout:\n{}\nstderr:\n{}",
                stdout.recv_timeout(grace).unwrap_or_default(),
                stderr.recv_timeout(grace).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // A grandchild that inherited a pipe can keep it open; don't wait for it forever.
    let limit = Duration::from_secs(10);
    Ok((
        status.code().unwrap_or(-1),
        stdout.recv_timeout(limit).unwrap_or_default(),
        stderr.recv_timeout(limit).unwrap_or_default(),
    ))
}

/// The output of a finished command: stdout when it exited 0, else an error naming `what`
/// with everything it printed.
pub fn check_output(what: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `--log-level` of the gateways tests start: fedgate's own crates at debug.
pub const LOG_LEVEL: &str = "info,fedgate=debug,fedgate_discovery=debug,fedgate_tunnel=debug";

/// Spawns `<cmd> --log-level <level> run --config <config>` (`cmd` runs the fedgate binary,
/// directly or through `ip netns exec`), stdin closed, output appended to `log`.
pub fn spawn_fedgate_run(
    mut cmd: Command,
    level: &str,
    config: &Path,
    log: &Path,
) -> Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    cmd.args(["--log-level", level, "run", "--config"])
        .arg(config)
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning fedgate run ({cmd:?})"))
}

/// Waits (at most `timeout`) until `up()` says the gateway process `child` of cluster `id`
/// serves, failing at once when it exits first; the error ends with the gateway's `log`.
pub fn wait_gateway_up(
    child: &mut Child,
    id: &str,
    log: &Path,
    what: &str,
    timeout: Duration,
    mut up: impl FnMut() -> bool,
) -> Result<()> {
    let res = eventually(what, timeout, || {
        if let Some(status) = child.try_wait()? {
            bail!("gateway exited early with {status}");
        }
        Ok(up().then_some(()))
    });
    if let Err(e) = res {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        bail!("{e:#}\n--- {id} log ---\n{text}");
    }
    Ok(())
}

/// A private block of loopback addresses for one test: `127.<a>.<b>.1..=254`.
#[derive(Clone, Copy, Debug)]
pub struct AddrBlock {
    a: u8,
    b: u8,
}

impl AddrBlock {
    /// A block no other test of this process uses, and unlikely to be used by another
    /// process (derived from the pid).
    pub fn unique() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // 127.0.0.0/16 is left alone (127.0.0.1 is busy on most machines).
        let a = 1 + (pid % 200) as u8;
        // Below 200: tests put ClusterSetIP ranges at 127.A.200.0/24 and up (GatewaySpec::mesh,
        // dashboard_api, kube_gateway), and a gateway's own listen address must never fall in
        // its range (the config refuses that).
        let b = ((pid / 200 + n * 7) % 200) as u8;
        Self { a, b }
    }

    pub fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, self.a, self.b, host)
    }

    pub fn addr(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(host).into(), port)
    }
}

/// Waits until `f` returns `Ok(Some(v))`, retrying every 50 ms for at most `timeout`.
/// The last error is reported when time runs out.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last = String::from("condition never held");
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal HTTP/1.0 GET; returns (status, body). Good enough for the admin endpoints.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.get(9..12).and_then(|c| c.parse().ok()).context("malformed HTTP response")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((code, body))
}

/// GET a JSON debug view.
pub fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let (code, body) = http_get(addr, path)?;
    if code != 200 {
        bail!("GET {path} on {addr}: HTTP {code}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
}

/// Fails the test (never skips it) when `tool` is not on `PATH`, naming the Debian package
/// that has it.
pub fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(found, "`{tool}` not found: install Debian's {package} (scripts/install-test-deps.sh)");
}

/// The samples of series `name` in a Prometheus text exposition (a gateway's `/metrics`)
/// whose labels include every `key="value"` of `labels` (a series without labels matches
/// an empty `labels`): each sample's line and value.
pub fn metric_samples<'a>(
    text: &'a str,
    name: &str,
    labels: &[(&str, &str)],
) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(['{', ' '])))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| Some((l, l.rsplit_once(' ')?.1.parse().ok()?)))
        .collect()
}

/// A development PKI made with `fedgate certs`.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// Creates a CA for `clusterset` in `dir/<name>`.
    pub fn new(dir: &Path, name: &str, clusterset: &str) -> Result<Self> {
        let dir = dir.join(name);
        let (code, out, err) =
            fedgate(&["certs", "ca", "--clusterset", clusterset, "--out", path_str(&dir)?])?;
        if code != 0 {
            bail!("fedgate certs ca failed ({code}): {out}{err}");
        }
        Ok(Self { dir })
    }

    /// Issues a gateway certificate for `cluster`; returns (cert, key, ca) paths.
    pub fn issue(&self, cluster: &str, out: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
        self.issue_with(cluster, &[], out)
    }

    /// Like `issue`, with extra `fedgate certs issue` arguments (e.g. `--clusterset`).
    pub fn issue_with(
        &self,
        cluster: &str,
        extra: &[&str],
        out: &Path,
    ) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let mut args = vec!["certs", "issue", "--ca", path_str(&self.dir)?, "--cluster", cluster];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", path_str(out)?]);
        let (code, o, e) = fedgate(&args)?;
        if code != 0 {
            bail!("fedgate certs issue failed ({code}): {o}{e}");
        }
        Ok((
            out.join(format!("{cluster}.crt")),
            out.join(format!("{cluster}.key")),
            out.join("ca.crt"),
        ))
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// What a gateway in a test needs to know about itself.
#[derive(Clone, Debug)]
pub struct GatewaySpec {
    pub id: String,
    pub clusterset: String,
    pub region: String,
    pub zone: String,
    pub tunnel: SocketAddr,
    pub admin: SocketAddr,
    pub dns: SocketAddr,
    pub vip_range: String,
    /// (peer id, peer tunnel address)
    pub peers: Vec<(String, SocketAddr)>,
    pub lease: String,
    /// Extra YAML appended under the top level (e.g. a `traffic:` block).
    pub extra: String,
}

impl GatewaySpec {
    /// Gateway `i` (< 4) of a full mesh of `ids` in `block`: host `10 + i` (tunnel :15443,
    /// admin :15000, DNS :10053), region `region-<id>`, zone `zone-<id>`, ClusterSetIPs from
    /// the block's `.<128 + 32 i>/27` (30 addresses), every other id as a peer, a 15 s lease,
    /// no extra YAML.
    /// Tests override what they need with struct update syntax.
    pub fn mesh(block: AddrBlock, clusterset: &str, ids: &[&str], i: usize) -> Self {
        let host = |i: usize| 10 + i as u8;
        GatewaySpec {
            id: ids[i].to_owned(),
            clusterset: clusterset.to_owned(),
            region: format!("region-{}", ids[i]),
            zone: format!("zone-{}", ids[i]),
            tunnel: block.addr(host(i), 15443),
            admin: block.addr(host(i), 15000),
            dns: block.addr(host(i), 10053),
            // A /27 inside the block: each test's gateways get ranges no other test shares
            // (ranges outside the block would be the same for every test of one process, and
            // parallel tests would bind each other's ClusterSetIPs).
            vip_range: format!("{}/27", block.ip(128 + 32 * i as u8)),
            peers: ids
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, id)| ((*id).to_owned(), block.addr(host(j), 15443)))
                .collect(),
            lease: "15s".to_owned(),
            extra: String::new(),
        }
    }
}

/// Gateways `ids`, a full mesh in `block` ([`GatewaySpec::mesh`], then `edit(i, spec)`), with
/// certificates from one CA made in `root`; configs written under `root/<id>`, not started.
pub fn prepare_mesh(
    root: &Path,
    block: AddrBlock,
    clusterset: &str,
    ids: &[&str],
    mut edit: impl FnMut(usize, &mut GatewaySpec),
) -> Result<Vec<Gateway>> {
    let pki = Pki::new(root, "ca", clusterset)?;
    let mut gateways = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut spec = GatewaySpec::mesh(block, clusterset, ids, i);
        edit(i, &mut spec);
        let tls = pki.issue(id, &root.join(format!("certs-{id}")))?;
        gateways.push(Gateway::prepare(root, spec, tls)?);
    }
    Ok(gateways)
}

/// [`prepare_mesh`], then every gateway started in the order of `ids`.
pub fn start_mesh(
    root: &Path,
    block: AddrBlock,
    clusterset: &str,
    ids: &[&str],
    edit: impl FnMut(usize, &mut GatewaySpec),
) -> Result<Vec<Gateway>> {
    let mut gateways = prepare_mesh(root, block, clusterset, ids, edit)?;
    for g in &mut gateways {
        g.start()?;
    }
    Ok(gateways)
}

/// A running `fedgate run` process with its own directory (config, certs, cluster files).
pub struct Gateway {
    pub spec: GatewaySpec,
    pub dir: PathBuf,
    pub cluster_dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Gateway {
    /// Writes the config for `spec` under `root/<id>` with certificates `(cert, key, ca)`.
    pub fn prepare(
        root: &Path,
        spec: GatewaySpec,
        tls: (PathBuf, PathBuf, PathBuf),
    ) -> Result<Self> {
        let dir = root.join(&spec.id);
        let cluster_dir = dir.join("cluster");
        std::fs::create_dir_all(&cluster_dir)?;
        let peers: String = spec
            .peers
            .iter()
            .map(|(id, addr)| format!("  - {{ id: {id}, address: \"{addr}\" }}\n"))
            .collect();
        let config = format!(
            "cluster:\n  id: {id}\n  clusterset: {cs}\n  locality: {{ region: {region}, zone: {zone} }}\n\
             discovery:\n  source: file\n  file: {{ dir: {cdir} }}\n  peerLeaseDuration: {lease}\n\
             peers:\n{peers}\
             tls: {{ cert: {cert}, key: {key}, ca: {ca} }}\n\
             tunnel: {{ listen: \"{tunnel}\" }}\n\
             dns: {{ listen: \"{dns}\", upstream: [system], ttl: 5s }}\n\
             front: {{ mode: vip, clusterSetIPRange: {range}, stateDir: {state} }}\n\
             admin: {{ listen: \"{admin}\" }}\n{extra}",
            id = spec.id,
            cs = spec.clusterset,
            region = spec.region,
            zone = spec.zone,
            cdir = cluster_dir.display(),
            lease = spec.lease,
            cert = tls.0.display(),
            key = tls.1.display(),
            ca = tls.2.display(),
            tunnel = spec.tunnel,
            dns = spec.dns,
            range = spec.vip_range,
            state = dir.join("state").display(),
            admin = spec.admin,
            extra = spec.extra,
        );
        if spec.peers.is_empty() {
            // `peers:` with no items is null in YAML; say it explicitly.
            std::fs::write(dir.join("gateway.yaml"), config.replace("peers:\n", "peers: []\n"))?;
        } else {
            std::fs::write(dir.join("gateway.yaml"), config)?;
        }
        let log = dir.join("gateway.log");
        Ok(Self { spec, dir, cluster_dir, child: None, log })
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("gateway.yaml")
    }

    /// Replaces the first `from` (which must occur) with `to` in the config, before a start.
    pub fn edit_config(&self, from: &str, to: &str) -> Result<()> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path)?;
        if !text.contains(from) {
            bail!(
                "no `{from}` in the config of {} (harness config changed?):\n{text}",
                self.spec.id
            );
        }
        std::fs::write(&path, text.replacen(from, to, 1))?;
        Ok(())
    }

    /// Starts the process and waits until `/healthz` answers.
    pub fn start(&mut self) -> Result<()> {
        let cmd = Command::new(fedgate_bin());
        let child = spawn_fedgate_run(cmd, LOG_LEVEL, &self.config_path(), &self.log)?;
        let child = self.child.insert(child);
        let admin = self.spec.admin;
        wait_gateway_up(
            child,
            &self.spec.id,
            &self.log,
            "gateway /healthz",
            Duration::from_secs(20),
            || http_get(admin, "/healthz").is_ok_and(|(c, _)| c == 200),
        )
    }

    /// Sends SIGKILL (a crash, no drain) and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal by name (`TERM`, `INT`) with `kill(1)`.
    pub fn signal(&self, sig: &str) -> Result<()> {
        let pid = self.child.as_ref().context("gateway not running")?.id();
        let st = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status()?;
        if !st.success() {
            bail!("kill -{sig} {pid} failed");
        }
        Ok(())
    }

    /// Waits for the process to exit by itself, for at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("gateway not running")?;
        let status = eventually("gateway to exit", timeout, || Ok(child.try_wait()?))?;
        self.child = None;
        Ok(status)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes a file into this gateway's cluster directory (atomically: tmp + rename).
    pub fn write_cluster_file(&self, name: &str, yaml: &str) -> Result<()> {
        let tmp = self.cluster_dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.cluster_dir.join(name))?;
        Ok(())
    }

    pub fn remove_cluster_file(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.cluster_dir.join(name))?;
        Ok(())
    }

    pub fn json(&self, path: &str) -> Result<serde_json::Value> {
        get_json(self.spec.admin, path)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- log of gateway {} ---\n{}", self.spec.id, self.log_text());
        }
    }
}

/// The `creationTimestamp` of the ServiceExports tests write when the age of an export does not
/// matter.
pub const EXPORTED_AT: &str = "2026-01-01T00:00:00Z";

/// [`service_yaml`] for what most tests export: a ClusterSetIP Service `ns/name` with one port
/// `(name, port, targetPort)` and one ready endpoint `ip`, exported at [`EXPORTED_AT`].
pub fn exported_service(ns: &str, name: &str, port: (&str, u16, u16), ip: &str) -> String {
    service_yaml(ns, name, false, &[port], &[(ip, true)], Some(EXPORTED_AT))
}

/// Kubernetes YAML for a Service with ports `(name, port, targetPort)`, its EndpointSlice
/// with `endpoints` (ip, ready) and, if `export`, a ServiceExport created at `created`.
pub fn service_yaml(
    ns: &str,
    name: &str,
    headless: bool,
    ports: &[(&str, u16, u16)],
    endpoints: &[(&str, bool)],
    export_created: Option<&str>,
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: {ns} }}\nspec:\n"
    );
    if headless {
        y.push_str("  clusterIP: None\n");
    }
    y.push_str("  ports:\n");
    for (pname, port, target) in ports {
        y.push_str(&format!(
            "  - {{ name: {pname}, port: {port}, targetPort: {target}, protocol: TCP }}\n"
        ));
    }
    y.push_str(&format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {ns}\n  labels: {{ kubernetes.io/service-name: {name} }}\naddressType: IPv4\nports:\n"
    ));
    for (pname, _, target) in ports {
        y.push_str(&format!("- {{ name: {pname}, port: {target}, protocol: TCP }}\n"));
    }
    y.push_str("endpoints:\n");
    for (ip, ready) in endpoints {
        y.push_str(&format!("- addresses: [\"{ip}\"]\n  conditions: {{ ready: {ready} }}\n"));
    }
    if let Some(created) = export_created {
        y.push_str(&format!(
            "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata:\n  name: {name}\n  namespace: {ns}\n  creationTimestamp: \"{created}\"\n"
        ));
    }
    y
}

/// Finds one service by namespace/name in a `/debug/imports` answer.
pub fn find_import<'a>(
    imports: &'a serde_json::Value,
    ns: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    imports.as_array()?.iter().find(|s| s["namespace"] == ns && s["name"] == name)
}

/// One service by namespace/name in a `/debug/imports` answer, once exactly `clusters`
/// contribute to it.
pub fn import_from<'a>(
    imports: &'a serde_json::Value,
    ns: &str,
    name: &str,
    clusters: &[&str],
) -> Option<&'a serde_json::Value> {
    find_import(imports, ns, name).filter(|i| import_clusters(i) == clusters)
}

/// A gateway whose admin server a test reads: started here ([`Gateway`]) or in a network
/// namespace ([`netns::NsGateway`]).
pub trait Views {
    /// The gateway's cluster id.
    fn id(&self) -> &str;
    /// A JSON view of the admin server (`/debug/...`).
    fn view(&self, path: &str) -> Result<serde_json::Value>;
}

impl Views for Gateway {
    fn id(&self) -> &str {
        &self.spec.id
    }

    fn view(&self, path: &str) -> Result<serde_json::Value> {
        self.json(path)
    }
}

/// Waits (at most `timeout`) until `g` imports `ns/name` from exactly `clusters`; returns the
/// import.
pub fn wait_import(
    g: &impl Views,
    ns: &str,
    name: &str,
    clusters: &[&str],
    timeout: Duration,
) -> Result<serde_json::Value> {
    eventually(&format!("{} to import {ns}/{name} from {clusters:?}", g.id()), timeout, || {
        Ok(import_from(&g.view("/debug/imports")?, ns, name, clusters).cloned())
    })
}

/// The first ClusterSetIP of `ns/name` at `g` if exactly `clusters` contribute to the import.
pub fn imported_ip(
    g: &impl Views,
    ns: &str,
    name: &str,
    clusters: &[&str],
) -> Result<Option<String>> {
    let imports = g.view("/debug/imports")?;
    Ok(import_from(&imports, ns, name, clusters)
        .and_then(|i| i["ips"][0].as_str().map(str::to_owned)))
}

/// Waits (at most `timeout`) until `g` imports `ns/name` from exactly `clusters`; returns its
/// first ClusterSetIP.
pub fn wait_vip(
    g: &impl Views,
    ns: &str,
    name: &str,
    clusters: &[&str],
    timeout: Duration,
) -> Result<String> {
    eventually(&format!("{} to import {ns}/{name} from {clusters:?}", g.id()), timeout, || {
        imported_ip(g, ns, name, clusters)
    })
}

/// A TCP echo server for `python3 -c ECHO_SERVER <ip> <port>` (a thread per connection).
pub const ECHO_SERVER: &str = "import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
def serve(c):
    while True:
        d = c.recv(1024)
        if not d: break
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
";

/// Cluster ids that contribute to an import in a `/debug/imports` answer.
pub fn import_clusters(import: &serde_json::Value) -> Vec<String> {
    import["clusters"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

/// The conditions of a local export in a `/debug/exports` answer, by type.
pub fn export_conditions(
    exports: &serde_json::Value,
    ns: &str,
    name: &str,
) -> Option<BTreeMap<String, serde_json::Value>> {
    let e = exports.as_array()?.iter().find(|s| s["namespace"] == ns && s["name"] == name)?;
    Some(
        e["conditions"]
            .as_array()?
            .iter()
            .filter_map(|c| Some((c["type"].as_str()?.to_owned(), c.clone())))
            .collect(),
    )
}
/// A TCP server on threads of the test: each accepted connection goes to `serve` on a thread
/// of its own. [`stop`](Self::stop) (or a drop) closes the listening socket, so connects and
/// health probes to it fail from then on.
pub struct TcpServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    /// Listens on `addr` (port 0: one the kernel picks).
    pub fn start(
        addr: SocketAddr,
        serve: impl Fn(TcpStream) + Clone + Send + 'static,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let serve = serve.clone();
                std::thread::spawn(move || serve(conn));
            }
            // The listener is dropped here: the port refuses connections from now on.
        });
        Ok(Self { addr, stop, thread: Some(thread) })
    }

    /// Closes the listening socket (a connect of our own wakes the accept loop).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
            let _ = t.join();
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub mod clusterset;
pub mod faults;
pub mod kube;
pub mod netns;
pub mod replicas;

#[cfg(test)]
mod metric_tests {
    use super::metric_samples;

    #[test]
    fn samples_match_name_and_every_label() {
        let text = "# HELP fedgate_x_total x\n\
            fedgate_x_total{reason=\"reset\",peer=\"b\"} 2\n\
            fedgate_x_total{reason=\"closed\",peer=\"b\"} 1\n\
            fedgate_x_total_other{reason=\"reset\"} 9\n\
            fedgate_x_total{reason=\"reset\",peer=\"c\"} 3\n";
        let sum = |labels: &[(&str, &str)]| -> f64 {
            metric_samples(text, "fedgate_x_total", labels).iter().map(|(_, v)| v).sum()
        };
        assert_eq!(sum(&[("reason", "reset")]), 5.0);
        assert_eq!(sum(&[("reason", "reset"), ("peer", "c")]), 3.0);
        assert_eq!(sum(&[]), 6.0);
        assert_eq!(sum(&[("reason", "timed_out")]), 0.0);
        assert_eq!(metric_samples(text, "fedgate_x_total", &[("peer", "b")]).len(), 2);
    }
}
