//! Kubernetes reconcile benchmark (issue 5 item 7): N exported services created at once in
//! cluster A through the API, measured at cluster B.
//!
//! Two real kube-apiservers (+ etcd, `fedgate_e2e::kube::KubeCluster`) and two release
//! `fedgate run` processes in kube mode, peered over loopback QUIC, each running as the
//! ServiceAccount of deploy/manifests. The bench:
//!
//! 1. floor: `kubectl apply --server-side` of the generated file (N Services, N EndpointSlices
//!    with `--endpoints` documentation addresses each, N ServiceExports) into a namespace of A
//!    *before* any gateway runs, then `kubectl delete` of the same file;
//! 2. starts the gateways, warms them up with one export that must reach B;
//! 3. applies the same file into namespace `bench` of A and watches (`kubectl get -w
//!    --output-watch-events -o json`, one process per kind) B's ServiceImports and fedgate
//!    EndpointSlices and A's ServiceExports until every import, slice (all endpoints) and
//!    `Ready=True` condition is there;
//! 4. deletes the N ServiceExports (`kubectl delete --all`: one DELETE each) and waits until B's imports and
//!    slices are gone.
//!
//! It prints times, per-service latency percentiles (from the export's ADDED event on A to the
//! object's event on B), CPU seconds and peak RSS of both gateways (`/proc/<pid>/stat`,
//! `/proc/<pid>/status`), CPU of each cluster's apiserver + etcd, and API requests per export:
//! the apiservers' `apiserver_request_total` deltas by verb and resource (the bench's own
//! kubectl requests included, see the notes printed) and the gateways'
//! `fedgate_kube_writes_total`.
//!
//! The endpoints are 192.0.2.0/24 and 198.51.100.0/24 addresses (RFC 5737, plain data: the
//! apiserver refuses loopback ones); no traffic is sent and the gateways' health probes of
//! them fail, which is fine for a control-plane benchmark.
//!
//! ```text
//! cargo build --release -p fedgate --bin fedgate
//! cargo run --release -p fedgate-e2e --example kube_bench -- --services 1000
//! ```
//! `bench/kube.sh` does both and repeats (`REPEAT=2`).

use std::collections::{BTreeMap, HashMap};
use std::io::BufReader;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_e2e::kube::{
    EXPORTS, IMPORTS, KubeCluster, SLICE_SELECTOR, kube_binary, use_kube_source,
};
use fedgate_e2e::*;
use serde_json::Value;

const CLUSTERSET: &str = "kube-bench";
const NS: &str = "bench";
const LABEL_SERVICE_NAME: &str = "multicluster.kubernetes.io/service-name";

struct Args {
    services: usize,
    endpoints: usize,
    timeout: Duration,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { services: 1000, endpoints: 3, timeout: Duration::from_secs(600) };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<usize> {
            let v = it.next().with_context(|| format!("{name} needs a value"))?;
            v.parse().with_context(|| format!("{name}: {v:?} is not a whole number"))
        };
        match a.as_str() {
            "--services" => args.services = value("--services")?,
            "--endpoints" => args.endpoints = value("--endpoints")?,
            "--timeout-secs" => args.timeout = Duration::from_secs(value("--timeout-secs")? as u64),
            "-h" | "--help" => {
                println!(
                    "kube_bench [--services N (1000)] [--endpoints E (3, at most 500)] [--timeout-secs S (600)]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if args.services == 0 || args.endpoints == 0 || args.endpoints > 500 {
        bail!("--services must be > 0 and --endpoints in 1..=500");
    }
    Ok(args)
}

/// deploy/'s CRDs, namespace, ServiceAccount and RBAC, a kubeconfig acting as that
/// ServiceAccount, and the bench's namespaces.
fn prepare_cluster(c: &KubeCluster) -> Result<PathBuf> {
    let path = c.prepare_for_gateway()?;
    for ns in [NS, "warm", "floor"] {
        c.kubectl_ok(&["create", "namespace", ns])?;
    }
    Ok(path)
}

/// The multi-document file: per service a Service (one port), its EndpointSlice with
/// `endpoints` documentation addresses, and a ServiceExport.
fn objects_yaml(ns: &str, services: usize, endpoints: usize) -> String {
    let mut y = String::with_capacity(services * (600 + endpoints * 60));
    for i in 0..services {
        let name = format!("svc-{i:05}");
        y.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: {ns} }}\n\
             spec: {{ ports: [ {{ name: http, port: 80, targetPort: 8080, protocol: TCP }} ] }}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {ns}\n  \
             labels: {{ kubernetes.io/service-name: {name} }}\naddressType: IPv4\n\
             ports: [ {{ name: http, port: 8080, protocol: TCP }} ]\nendpoints:\n"
        ));
        for e in 0..endpoints {
            // 2 × 254 documentation addresses per service index, distinct within a slice
            let n = (i * endpoints + e) % 508;
            let net = if n < 254 { "192.0.2" } else { "198.51.100" };
            y.push_str(&format!(
                "- {{ addresses: [\"{net}.{}\"], conditions: {{ ready: true }} }}\n",
                n % 254 + 1
            ));
        }
        y.push_str(&format!(
            "---\napiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceExport\n\
             metadata: {{ name: {name}, namespace: {ns} }}\n---\n"
        ));
    }
    y
}

/// A `fedgate run` process we spawned ourselves (for its pid), log level info.
struct GatewayProc {
    gw: Gateway,
    child: Child,
}

impl GatewayProc {
    fn start(gw: Gateway) -> Result<Self> {
        let log = gw.dir.join("bench.log");
        std::fs::File::create(&log)?;
        let child =
            spawn_fedgate_run(Command::new(fedgate_bin()), "info", &gw.config_path(), &log)?;
        let mut p = Self { gw, child };
        let admin = p.gw.spec.admin;
        wait_gateway_up(
            &mut p.child,
            &p.gw.spec.id,
            &log,
            "gateway /readyz",
            Duration::from_secs(60),
            || http_get(admin, "/readyz").is_ok_and(|(c, _)| c == 200),
        )?;
        Ok(p)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.gw.dir.join("bench.log")).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `fedgate_kube_writes_total` by `kind/op/result`.
    fn writes(&self) -> Result<BTreeMap<String, f64>> {
        let (code, body) = http_get(self.gw.spec.admin, "/metrics")?;
        if code != 200 {
            bail!("GET /metrics: HTTP {code}");
        }
        let mut out = BTreeMap::new();
        for line in body.lines().filter(|l| l.starts_with("fedgate_kube_writes_total{")) {
            let (labels, value) = split_sample(line)?;
            let key = format!(
                "{}/{}/{}",
                label(labels, "kind"),
                label(labels, "op"),
                label(labels, "result")
            );
            *out.entry(key).or_default() += value;
        }
        Ok(out)
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name{labels} value` → (labels, value).
fn split_sample(line: &str) -> Result<(&str, f64)> {
    let open = line.find('{').context("no labels")?;
    let close = line.rfind('}').context("unclosed labels")?;
    let value = line[close + 1..].trim();
    let value = value.split_whitespace().next().unwrap_or_default();
    let v = value.parse().with_context(|| format!("bad sample value in {line:?}"))?;
    Ok((&line[open + 1..close], v))
}

fn label<'a>(labels: &'a str, name: &str) -> &'a str {
    let pat = format!("{name}=\"");
    labels
        .split(',')
        .find_map(|kv| kv.trim().strip_prefix(&pat))
        .map(|v| v.trim_end_matches('"'))
        .unwrap_or("")
}

/// `apiserver_request_total` summed by `VERB resource[/subresource]`.
fn apiserver_requests(c: &KubeCluster) -> Result<BTreeMap<String, f64>> {
    let (code, body) = c.get("/metrics")?;
    if code != 200 {
        bail!("GET /metrics on cluster {}: HTTP {code}", c.name());
    }
    let mut out = BTreeMap::new();
    for line in body.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let (labels, value) = split_sample(line)?;
        let sub = label(labels, "subresource");
        let res = label(labels, "resource");
        let key = if sub.is_empty() {
            format!("{} {res}", label(labels, "verb"))
        } else {
            format!("{} {res}/{sub}", label(labels, "verb"))
        };
        *out.entry(key).or_default() += value;
    }
    Ok(out)
}

fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

/// utime + stime of a process in seconds.
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // the command name may hold spaces; fields after ") " start with the state (field 3)
    let rest = stat.rsplit_once(") ").context("malformed /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        f.get(i).context("short /proc stat")?.parse::<f64>().context("bad /proc stat field")
    };
    // utime is field 14, stime 15 (1-based); `rest` starts at field 3
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// A `/proc/<pid>/status` size field (`VmHWM`, `VmRSS`) in MiB.
fn status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .context("empty status field")?
        .parse()
        .context("bad status field")?;
    Ok(kb / 1024.0)
}

/// The pids of this cluster's kube-apiserver and etcd (their command lines name its directory).
fn control_plane_pids(c: &KubeCluster) -> Result<Vec<u32>> {
    let dir = c.dir().to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let exe = args.first().map(String::as_str).unwrap_or_default();
        if (exe.ends_with("kube-apiserver") || exe.ends_with("etcd"))
            && args.iter().any(|a| a.contains(&dir))
        {
            pids.push(pid);
        }
    }
    if pids.len() != 2 {
        bail!("expected kube-apiserver and etcd of cluster {}, found pids {pids:?}", c.name());
    }
    Ok(pids)
}

fn cpu_sum(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|p| cpu_secs(*p)).sum()
}

/// One watch event as seen by the bench.
struct Event {
    at: Instant,
    kind: String,
    object: Value,
}

/// `kubectl get <resource> -w --output-watch-events -o json`, events timestamped as they
/// arrive.
struct Watch {
    child: Child,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Watch {
    fn start(c: &KubeCluster, resource: &str, selector: Option<&str>) -> Result<Self> {
        let mut cmd = Command::new(kube_binary("kubectl")?);
        cmd.arg("--kubeconfig")
            .arg(c.kubeconfig_path())
            .arg("--cache-dir")
            .arg(c.dir().join("kubectl-cache-watch"))
            .args(["get", resource, "-n", NS, "-w", "--output-watch-events", "-o", "json"]);
        if let Some(sel) = selector {
            cmd.args(["-l", sel]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .context("spawning kubectl get -w")?;
        let stdout = child.stdout.take().context("kubectl stdout")?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        std::thread::spawn(move || {
            let stream =
                serde_json::Deserializer::from_reader(BufReader::new(stdout)).into_iter::<Value>();
            for ev in stream {
                let Ok(mut ev) = ev else { break };
                let at = Instant::now();
                let kind = ev["type"].as_str().unwrap_or_default().to_owned();
                let object = ev["object"].take();
                if let Ok(mut v) = sink.lock() {
                    v.push(Event { at, kind, object });
                }
            }
        });
        Ok(Self { child, events })
    }

    /// Calls `f` with the events so far.
    fn with<T>(&self, f: impl FnOnce(&[Event]) -> T) -> Result<T> {
        let events = self.events.lock().map_err(|_| anyhow::anyhow!("watch lock poisoned"))?;
        Ok(f(&events))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn name_of(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}

fn ready_true(export: &Value) -> bool {
    export["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// Per service name (`key` of an event, `None`: not counted), the time of its first event.
fn first_times(
    events: &[Event],
    key: impl Fn(&Event) -> Option<String>,
) -> HashMap<String, Instant> {
    let mut out = HashMap::new();
    for e in events {
        if let Some(k) = key(e) {
            out.entry(k).or_insert(e.at);
        }
    }
    out
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// Latencies (s) of `to[name] - from[name]`, sorted.
fn latencies(from: &HashMap<String, Instant>, to: &HashMap<String, Instant>) -> Vec<f64> {
    let mut v: Vec<f64> = to
        .iter()
        .filter_map(|(k, t)| from.get(k).map(|f| t.saturating_duration_since(*f).as_secs_f64()))
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

fn kubectl_timed(c: &KubeCluster, args: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    c.kubectl_ok(args)?;
    Ok(t.elapsed())
}

struct Usage {
    gw_cpu: [f64; 2],
    cp_cpu: [f64; 2],
}

fn usage(gws: &[GatewayProc; 2], cps: &[Vec<u32>; 2]) -> Result<Usage> {
    Ok(Usage {
        gw_cpu: [cpu_secs(gws[0].pid())?, cpu_secs(gws[1].pid())?],
        cp_cpu: [cpu_sum(&cps[0])?, cpu_sum(&cps[1])?],
    })
}

fn print_requests(cluster: &str, d: &BTreeMap<String, f64>, n: usize) {
    println!("  apiserver_request_total delta at {cluster} (all clients; per export = / {n}):");
    for (k, v) in d {
        println!("    {k:<44} {v:>8.0}  {:>7.3}/export", v / n as f64);
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let n = args.services;
    let machine = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "kube_bench: {n} services x {} endpoints; {} cores; loadavg {}",
        args.endpoints,
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0),
        machine.trim()
    );

    let started = Instant::now();
    let (ka, kb) = KubeCluster::start_pair(["a", "b"])?;
    let kc_a = prepare_cluster(&ka)?;
    let kc_b = prepare_cluster(&kb)?;
    println!("apiservers ready and prepared in {:.1} s", started.elapsed().as_secs_f64());

    let tmp = tempfile::tempdir()?;
    let objects = tmp.path().join("objects.yaml");
    std::fs::write(&objects, objects_yaml(NS, n, args.endpoints))?;
    let floor_file = tmp.path().join("floor.yaml");
    std::fs::write(&floor_file, objects_yaml("floor", n, args.endpoints))?;
    let objects = objects.to_string_lossy().into_owned();
    let floor_file = floor_file.to_string_lossy().into_owned();

    // 1. the floor: the same objects through kubectl with no gateway running
    let floor_apply = kubectl_timed(&ka, &["apply", "--server-side", "-f", &floor_file])?;
    let floor_delete = kubectl_timed(&ka, &["delete", "--wait=false", "-f", &floor_file])?;
    println!(
        "floor: kubectl apply --server-side of {} objects {:.2} s, delete {:.2} s",
        3 * n,
        floor_apply.as_secs_f64(),
        floor_delete.as_secs_f64()
    );

    // 2. two gateways in kube mode, peered over loopback QUIC
    let block = AddrBlock::unique();
    let gws = prepare_mesh(tmp.path(), block, CLUSTERSET, &["a", "b"], |i, spec| {
        spec.region = "r1".to_owned();
        spec.zone = format!("z-{}", spec.id);
        spec.vip_range = format!("127.{}.{}.0/20", block.ip(1).octets()[1], 192 + 16 * i as u8);
        // endpoints lead nowhere: probe them rarely (as bench/propagation.py does)
        spec.extra = "traffic: { healthCheck: { interval: 30s, timeout: 1s } }\n".to_owned();
    })?;
    for (g, kc) in gws.iter().zip([&kc_a, &kc_b]) {
        use_kube_source(g, kc)?;
    }
    let mut procs = Vec::new();
    for g in gws {
        procs.push(GatewayProc::start(g)?);
    }
    let gws: [GatewayProc; 2] = procs.try_into().map_err(|_| anyhow::anyhow!("two gateways"))?;
    let cps = [control_plane_pids(&ka)?, control_plane_pids(&kb)?];

    // warm-up: one export must reach B (peering up, every watch live)
    ka.apply_yaml(&objects_yaml("warm", 1, 1))?;
    eventually("the warm-up import at B", Duration::from_secs(60), || {
        let out =
            kb.kubectl_ok(&["get", IMPORTS, "-n", "warm", "--ignore-not-found", "-o", "name"])?;
        Ok((!out.trim().is_empty()).then_some(()))
    })
    .with_context(|| format!("{}\n{}", gws[0].log(), gws[1].log()))?;
    std::thread::sleep(Duration::from_secs(3)); // the writers' settle time, then quiet

    let w_exports = Watch::start(&ka, EXPORTS, None)?;
    let w_imports = Watch::start(&kb, IMPORTS, None)?;
    let w_slices = Watch::start(&kb, "endpointslices", Some(SLICE_SELECTOR))?;
    let w_a_imports = Watch::start(&ka, IMPORTS, None)?;
    std::thread::sleep(Duration::from_secs(2)); // the watches are established

    let req_before = [apiserver_requests(&ka)?, apiserver_requests(&kb)?];
    let writes_before = [gws[0].writes()?, gws[1].writes()?];
    let u0 = usage(&gws, &cps)?;
    let rss_before = [status_mib(gws[0].pid(), "VmRSS")?, status_mib(gws[1].pid(), "VmRSS")?];

    // 3. create everything at once
    let t0 = Instant::now();
    let apply = kubectl_timed(&ka, &["apply", "--server-side", "-f", &objects])?;
    println!("kubectl apply (gateways running) {:.2} s", apply.as_secs_f64());

    let endpoints = args.endpoints;
    let converged = |_: ()| -> Result<Option<(Instant, Instant, Instant)>> {
        let last = |m: &HashMap<String, Instant>| m.values().max().copied();
        let imports = w_imports.with(|e| {
            first_times(e, |e| (e.kind != "DELETED").then(|| name_of(&e.object).to_owned()))
        })?;
        let slices = w_slices.with(|e| {
            first_times(e, |e| {
                let full = e.kind != "DELETED"
                    && e.object["endpoints"].as_array().map(Vec::len) == Some(endpoints);
                full.then(|| e.object["metadata"]["labels"][LABEL_SERVICE_NAME].as_str())
                    .flatten()
                    .map(str::to_owned)
            })
        })?;
        let ready = w_exports.with(|e| {
            first_times(e, |e| {
                (e.kind != "DELETED" && ready_true(&e.object))
                    .then(|| name_of(&e.object).to_owned())
            })
        })?;
        if imports.len() < n || slices.len() < n || ready.len() < n {
            return Ok(None);
        }
        Ok(Some((
            last(&imports).context("imports")?,
            last(&slices).context("slices")?,
            last(&ready).context("ready")?,
        )))
    };
    let progress = || {
        let count = |w: &Watch| w.with(|e| e.len()).unwrap_or(0);
        format!(
            "events so far: B imports {}, B slices {}, A exports {}",
            count(&w_imports),
            count(&w_slices),
            count(&w_exports)
        )
    };
    let (t_imports, t_slices, t_ready) =
        eventually("all imports, slices and Ready conditions", args.timeout, || converged(()))
            .with_context(progress)?;
    let t_converged = t_imports.max(t_slices).max(t_ready);
    let u1 = usage(&gws, &cps)?;
    std::thread::sleep(Duration::from_secs(3)); // late writes (settle ≤ 1 s) are counted too
    let req_after = [apiserver_requests(&ka)?, apiserver_requests(&kb)?];
    let writes_after = [gws[0].writes()?, gws[1].writes()?];
    let a_imports_done = w_a_imports.with(|e| {
        first_times(e, |e| (e.kind != "DELETED").then(|| name_of(&e.object).to_owned()))
    })?;

    // per-service latencies, from the export's ADDED event on A
    let added = w_exports
        .with(|e| first_times(e, |e| (e.kind == "ADDED").then(|| name_of(&e.object).to_owned())))?;
    let imports_at = w_imports.with(|e| {
        first_times(e, |e| (e.kind != "DELETED").then(|| name_of(&e.object).to_owned()))
    })?;
    let slices_at = w_slices.with(|e| {
        first_times(e, |e| {
            (e.kind != "DELETED"
                && e.object["endpoints"].as_array().map(Vec::len) == Some(endpoints))
            .then(|| e.object["metadata"]["labels"][LABEL_SERVICE_NAME].as_str())
            .flatten()
            .map(str::to_owned)
        })
    })?;
    let ready_at = w_exports.with(|e| {
        first_times(e, |e| {
            (e.kind != "DELETED" && ready_true(&e.object)).then(|| name_of(&e.object).to_owned())
        })
    })?;

    // 4. delete the exports; wait until B's imports and slices are gone
    let req_del_before = [apiserver_requests(&ka)?, apiserver_requests(&kb)?];
    let writes_del_before = [gws[0].writes()?, gws[1].writes()?];
    let u2 = usage(&gws, &cps)?;
    let td = Instant::now();
    let delete = kubectl_timed(&ka, &["delete", EXPORTS, "-n", NS, "--all", "--wait=false"])?;
    let gone = |w: &Watch, label: bool| {
        w.with(|e| {
            first_times(e, |e| {
                (e.kind == "DELETED").then(|| {
                    if label {
                        e.object["metadata"]["labels"][LABEL_SERVICE_NAME]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned()
                    } else {
                        name_of(&e.object).to_owned()
                    }
                })
            })
        })
    };
    let (t_imports_gone, t_slices_gone) =
        eventually("B's imports and slices deleted", args.timeout, || {
            let imports = gone(&w_imports, false)?;
            let slices = gone(&w_slices, true)?;
            if imports.len() < n || slices.len() < n {
                return Ok(None);
            }
            Ok(Some((
                imports.values().max().copied().context("imports")?,
                slices.values().max().copied().context("slices")?,
            )))
        })
        .with_context(progress)?;
    let u3 = usage(&gws, &cps)?;
    std::thread::sleep(Duration::from_secs(3));
    let req_del_after = [apiserver_requests(&ka)?, apiserver_requests(&kb)?];
    let writes_del_after = [gws[0].writes()?, gws[1].writes()?];
    let deleted_exports = w_exports.with(|e| {
        first_times(e, |e| (e.kind == "DELETED").then(|| name_of(&e.object).to_owned()))
    })?;
    let imports_gone_at = gone(&w_imports, false)?;
    let hwm = [status_mib(gws[0].pid(), "VmHWM")?, status_mib(gws[1].pid(), "VmHWM")?];

    // report
    let secs = |t: Instant, from: Instant| t.saturating_duration_since(from).as_secs_f64();
    let conv = secs(t_converged, t0);
    let del = secs(t_imports_gone.max(t_slices_gone), td);
    println!();
    println!(
        "== create {n} Services + EndpointSlices ({endpoints} endpoints) + ServiceExports in A =="
    );
    println!("{:<58} {:>9} {:>9}", "", "seconds", "x floor");
    let row = |what: &str, s: f64| {
        println!("{what:<58} {s:>9.2} {:>9.2}", s / floor_apply.as_secs_f64());
    };
    row("floor: kubectl apply, no gateway running", floor_apply.as_secs_f64());
    row("kubectl apply, gateways running", apply.as_secs_f64());
    row("all ServiceImports at B", secs(t_imports, t0));
    row("all EndpointSlices at B (every endpoint)", secs(t_slices, t0));
    row("all ServiceExports Ready=True at A", secs(t_ready, t0));
    if let Some(t) = a_imports_done.values().max() {
        row("all ServiceImports at A (exporters import too)", secs(*t, t0));
    }
    row("converged (all of the above)", conv);
    println!("per service, from the export's ADDED event at A (n, p50, p99, max in s):");
    for (what, to) in [
        ("  ServiceImport at B", &imports_at),
        ("  EndpointSlice at B", &slices_at),
        ("  Ready=True at A", &ready_at),
    ] {
        let l = latencies(&added, to);
        println!(
            "{what:<40} n={:<5} p50 {:>6.2}  p99 {:>6.2}  max {:>6.2}",
            l.len(),
            percentile(&l, 0.5),
            percentile(&l, 0.99),
            l.last().copied().unwrap_or(f64::NAN)
        );
    }
    println!();
    println!("== delete the {n} ServiceExports (kubectl delete --all: one DELETE each) ==");
    println!("{:<58} {:>9.2}", "kubectl delete serviceexports --all", delete.as_secs_f64());
    println!(
        "{:<58} {:>9.2}",
        "floor: kubectl delete -f (3 objects per service)",
        floor_delete.as_secs_f64()
    );
    println!("{:<58} {:>9.2}", "all ServiceImports gone at B", secs(t_imports_gone, td));
    println!("{:<58} {:>9.2}", "all EndpointSlices gone at B", secs(t_slices_gone, td));
    let l = latencies(&deleted_exports, &imports_gone_at);
    println!(
        "per service, export DELETED at A -> import DELETED at B: p50 {:.2} p99 {:.2} s",
        percentile(&l, 0.5),
        percentile(&l, 0.99)
    );
    println!();
    println!("== cost ==");
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>12}",
        "", "CPU s create", "CPU ms/svc", "CPU s delete", "peak RSS MiB"
    );
    for (i, id) in ["gateway a", "gateway b"].iter().enumerate() {
        let c = u1.gw_cpu[i] - u0.gw_cpu[i];
        println!(
            "{id:<34} {c:>12.2} {:>12.2} {:>12.2} {:>12.1}   (RSS before {:.1})",
            1000.0 * c / n as f64,
            u3.gw_cpu[i] - u2.gw_cpu[i],
            hwm[i],
            rss_before[i]
        );
    }
    for (i, id) in ["apiserver+etcd a", "apiserver+etcd b"].iter().enumerate() {
        let c = u1.cp_cpu[i] - u0.cp_cpu[i];
        println!(
            "{id:<34} {c:>12.2} {:>12.2} {:>12.2}",
            1000.0 * c / n as f64,
            u3.cp_cpu[i] - u2.cp_cpu[i]
        );
    }
    println!(
        "(create: from the apply's start to convergence; A's apiserver also served the apply)"
    );
    println!();
    println!("== API requests per export ==");
    for (i, id) in ["a", "b"].iter().enumerate() {
        println!("gateway {id} fedgate_kube_writes_total (kind/op/result): create | delete");
        let wc = delta(&writes_after[i], &writes_before[i]);
        let wd = delta(&writes_del_after[i], &writes_del_before[i]);
        let mut keys: Vec<&String> = wc.keys().chain(wd.keys()).collect();
        keys.sort();
        keys.dedup();
        let (mut tc, mut td_) = (0.0, 0.0);
        for k in keys {
            let c = wc.get(k).copied().unwrap_or(0.0);
            let d = wd.get(k).copied().unwrap_or(0.0);
            tc += c;
            td_ += d;
            println!(
                "    {k:<40} {c:>7.0} ({:>5.2}/export) | {d:>7.0} ({:>5.2}/export)",
                c / n as f64,
                d / n as f64
            );
        }
        println!(
            "    {:<40} {tc:>7.0} ({:>5.2}/export) | {td_:>7.0} ({:>5.2}/export)",
            "total",
            tc / n as f64,
            td_ / n as f64
        );
    }
    println!("create phase:");
    print_requests("A", &delta(&req_after[0], &req_before[0]), n);
    print_requests("B", &delta(&req_after[1], &req_before[1]), n);
    println!("delete phase:");
    print_requests("A", &delta(&req_del_after[0], &req_del_before[0]), n);
    print_requests("B", &delta(&req_del_after[1], &req_del_before[1]), n);
    println!(
        "(A's APPLY services/endpointslices/serviceexports include the bench's own {n} each; \
         /metrics GETs are the bench's; WATCH counts are opened watches)"
    );
    println!(
        "SUMMARY services={n} floor_apply_s={:.2} apply_s={:.2} converge_s={conv:.2} \
         delete_s={del:.2} gw_a_cpu_s={:.2} gw_b_cpu_s={:.2} gw_a_hwm_mib={:.1} gw_b_hwm_mib={:.1}",
        floor_apply.as_secs_f64(),
        apply.as_secs_f64(),
        u1.gw_cpu[0] - u0.gw_cpu[0],
        u1.gw_cpu[1] - u0.gw_cpu[1],
        hwm[0],
        hwm[1]
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_and_labels_parse() {
        let line = r#"apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="services",scope="resource",subresource="",verb="APPLY",version="v1"} 12"#;
        let (labels, v) = split_sample(line).expect("sample");
        assert_eq!(v, 12.0);
        assert_eq!(label(labels, "verb"), "APPLY");
        assert_eq!(label(labels, "resource"), "services");
        assert_eq!(label(labels, "subresource"), "");
        assert!(split_sample("no_labels 1").is_err());
        assert!(split_sample("x{a=\"b\"} notanumber").is_err());
    }

    #[test]
    fn percentiles_of_small_tables() {
        let v = [1.0, 2.0, 3.0, 4.0];
        for (q, want) in [(0.5, 2.0), (0.99, 4.0), (0.0, 1.0), (1.0, 4.0)] {
            assert_eq!(percentile(&v, q), want, "q={q}");
        }
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn generated_objects_have_distinct_endpoints_per_slice() {
        let y = objects_yaml("ns", 3, 4);
        assert_eq!(y.matches("kind: ServiceExport").count(), 3);
        assert_eq!(y.matches("kind: EndpointSlice").count(), 3);
        assert!(y.contains("\"192.0.2.1\"") && y.contains("\"192.0.2.12\""));
        assert!(!y.contains("127."), "no loopback endpoints");
    }
}
