//! Starting, watching and stopping the demo: files, backends, control API, gateways, the
//! bounded wait for a complete federation (a progress line per step), the "what to try"
//! text, and a clean stop on SIGINT/SIGTERM.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedgate_discovery::model::ClusterId;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::DemoError;
use super::backends::Backend;
use super::control::{Client, ControlServer, Demo, STOP_GRACE};
use super::gateways::GatewayProc;
use super::layout::{CLUSTERSET, ClusterPlan, Layout, NAMESPACE};
use crate::certs::{self, CertOptions};

/// How often start-up polls the gateways.
const POLL: Duration = Duration::from_millis(150);

/// `fedgate demo` options.
#[derive(Clone, Debug)]
pub struct StartOptions {
    pub dir: Option<PathBuf>,
    pub base_ip: Ipv4Addr,
    pub dns_port: u16,
    pub backends: bool,
    pub timeout: Duration,
    pub write_only: bool,
}

/// A fresh directory name under `runtime_dir` (else the system temp dir):
/// `fedgate-demo-<pid>-<seconds>`.
pub fn default_state_dir(runtime_dir: Option<PathBuf>) -> PathBuf {
    let base = runtime_dir.filter(|d| d.is_dir()).unwrap_or_else(std::env::temp_dir);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    base.join(format!("fedgate-demo-{}-{secs}", std::process::id()))
}

fn say(out: &mut dyn Write, line: &str) {
    // Output can only fail when stdout is gone; the demo goes on regardless.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs `fedgate demo` until SIGINT/SIGTERM (or only writes the files with `write_only`).
pub fn start(opts: StartOptions, out: &mut dyn Write) -> Result<(), DemoError> {
    let layout = Layout::new(opts.base_ip, opts.dns_port)?;
    let dir = match &opts.dir {
        Some(d) => d.clone(),
        None => default_state_dir(std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)),
    };
    std::fs::create_dir_all(&dir).map_err(|e| DemoError::Io(dir.clone(), e))?;
    let dir = std::path::absolute(&dir).map_err(|e| DemoError::Io(dir.clone(), e))?;
    say(
        out,
        &format!("fedgate demo: three clusters on {}/24, state in {}", opts.base_ip, dir.display()),
    );
    write_pki(&dir, &layout)?;
    say(
        out,
        &format!(
            "  [1/5] certificates: CA \"{CLUSTERSET}\" and east, west, north in {}",
            dir.join("certs").display()
        ),
    );
    for f in layout.files() {
        let path = dir.join(&f.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| DemoError::Io(parent.to_owned(), e))?;
        }
        std::fs::write(&path, &f.text).map_err(|e| DemoError::Io(path.clone(), e))?;
    }
    say(out, &format!("  [2/5] configs and cluster files: {}/{{east,west,north}}/", dir.display()));
    if opts.write_only {
        say(out, "written (--write-only); not starting anything");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("fedgate-demo")
        .build()
        .map_err(DemoError::Runtime)?;
    runtime.block_on(serve(layout, dir, opts, out))
}

/// The dev PKI: a CA for the clusterset and one certificate per gateway (overwritten).
fn write_pki(dir: &Path, layout: &Layout) -> Result<(), DemoError> {
    let certs_dir = dir.join("certs");
    let opts = CertOptions::new(certs::DEFAULT_CERT_VALIDITY);
    let ca = certs::create_ca(CLUSTERSET, &CertOptions::new(certs::DEFAULT_CA_VALIDITY))?;
    certs::write_ca(&certs_dir, &ca, true)?;
    for c in &layout.clusters {
        let id = ClusterId::new(c.id).map_err(certs::CertError::from)?;
        let pair = certs::issue(&ca, None, &id, &opts)?;
        certs::write_issued(&certs_dir, &id, &pair, &ca.cert_pem, true)?;
    }
    Ok(())
}

async fn serve(
    layout: Layout,
    dir: PathBuf,
    opts: StartOptions,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    let exe =
        std::env::current_exe().map_err(|e| DemoError::Io("<current executable>".into(), e))?;

    let mut backends = BTreeMap::new();
    for c in &layout.clusters {
        for b in &c.backends {
            let mut backend = Backend::new(c.id, &b.name, b.http(), b.tcp());
            if opts.backends {
                backend.start().await?;
            }
            backends.insert((c.id.to_owned(), b.name.clone()), backend);
        }
    }
    let count: usize = layout.clusters.iter().map(|c| c.backends.len()).sum();
    if opts.backends {
        say(
            out,
            &format!(
                "  [3/5] backends: {count} (HTTP :8080 and TCP echo :9000 each), see `fedgate demo state`"
            ),
        );
    } else {
        say(out, "  [3/5] backends: not started (--no-backends)");
    }
    let origins = layout.clusters.iter().map(|c| format!("http://{}", c.admin())).collect();
    let control = ControlServer::new(layout.control, origins).await?;
    let control_addr = control.address()?;
    let addr_file = dir.join(super::CONTROL_ADDR_FILE);
    std::fs::write(&addr_file, format!("{control_addr}\n"))
        .map_err(|e| DemoError::Io(addr_file.clone(), e))?;

    let mut gateways = BTreeMap::new();
    for c in &layout.clusters {
        let mut g = GatewayProc::new(c.id, c.admin(), &dir.join(c.id), exe.clone());
        g.start()?;
        gateways.insert(c.id.to_owned(), g);
    }
    let http = Client::new(Duration::from_secs(2));
    let demo = Arc::new(Mutex::new(Demo {
        layout: layout.clone(),
        gateways,
        backends,
        http: http.clone(),
    }));
    let control_task = tokio::spawn(control.run(demo.clone(), shutdown.clone()));

    let deadline = Instant::now() + opts.timeout;
    let started = Instant::now();
    let outcome = tokio::select! {
        r = wait_up(&demo, &layout, &http, deadline, opts.timeout, opts.backends, out) => Some(r),
        () = shutdown.cancelled() => None,
    };
    let result = match outcome {
        Some(Ok(vips)) => {
            say(out, &try_this(&layout, &vips, control_addr, &dir));
            say(
                out,
                &format!(
                    "ready: federation of {} clusters up in {:.1}s; Ctrl-C stops it",
                    layout.clusters.len(),
                    started.elapsed().as_secs_f64()
                ),
            );
            shutdown.cancelled().await;
            Ok(())
        }
        Some(Err(e)) => Err(e),
        None => Ok(()),
    };
    say(out, "stopping: gateways (SIGTERM, drain), backends, control API");
    shutdown.cancel();
    stop_all(&demo).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), control_task).await;
    say(out, &format!("stopped; logs and files stay in {}", dir.display()));
    result
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stop the demo with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
    shutdown.cancel();
}

/// Stops every gateway (in parallel, each SIGTERM then SIGKILL after [`STOP_GRACE`]) and
/// every backend.
async fn stop_all(demo: &Arc<Mutex<Demo>>) {
    let mut demo = demo.lock().await;
    let stops = demo.gateways.values_mut().map(|g| g.stop(STOP_GRACE));
    futures::future::join_all(stops).await;
    for b in demo.backends.values_mut() {
        b.stop().await;
    }
}

/// The ClusterSetIPs each gateway gave the sample services: cluster → service → VIP.
type Vips = BTreeMap<String, BTreeMap<String, String>>;

/// Waits (until `deadline`) for: each gateway's `/readyz`; each gateway importing every
/// sample service from every cluster that exports it; with backends, every `echo` endpoint
/// healthy as each gateway sees it. A progress line per step.
#[allow(clippy::too_many_arguments)]
async fn wait_up(
    demo: &Arc<Mutex<Demo>>,
    layout: &Layout,
    http: &Client,
    deadline: Instant,
    timeout: Duration,
    backends: bool,
    out: &mut dyn Write,
) -> Result<Vips, DemoError> {
    for c in &layout.clusters {
        let url = format!("http://{}/readyz", c.admin());
        let url = url.as_str();
        poll(
            demo,
            c,
            deadline,
            timeout,
            &format!("gateway {} to be ready ({url})", c.id),
            || async move {
                match http.request(axum::http::Method::GET, url, None).await {
                    Ok((s, _)) if s.is_success() => Ok(Some(())),
                    Ok((s, body)) => Err(format!("HTTP {s}: {}", body.trim())),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await?;
        let pid = demo.lock().await.gateways.get(c.id).and_then(GatewayProc::pid);
        say(
            out,
            &format!(
                "  [4/5] gateway {:<5} ready: admin http://{}/  dns {}  (pid {})",
                c.id,
                c.admin(),
                c.dns(),
                pid.map_or("?".into(), |p| p.to_string())
            ),
        );
    }
    // Which clusters export which service, from the plan itself.
    let expected: &[(&str, &[&str])] =
        &[("echo", &["east", "north", "west"]), ("db", &["north"]), ("legacy", &["east", "west"])];
    let mut vips = Vips::new();
    for c in &layout.clusters {
        let url = format!("http://{}/debug/imports?namespace={NAMESPACE}", c.admin());
        let url = url.as_str();
        let what =
            format!("gateway {} to import echo, db and legacy from every exporting cluster", c.id);
        let found = poll(demo, c, deadline, timeout, &what, || async move {
            let imports = http.get_json(url).await.map_err(|e| e.to_string())?;
            let mut found = BTreeMap::new();
            for (name, clusters) in expected {
                let Some(import) = find(&imports, name) else {
                    return Err(format!("{name} not imported yet"));
                };
                let have: Vec<&str> = import["clusters"]
                    .as_object()
                    .map(|m| m.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                if have != *clusters {
                    return Err(format!("{name} imported from {have:?}, waiting for {clusters:?}"));
                }
                if let Some(ip) = import["ips"][0].as_str() {
                    found.insert((*name).to_owned(), ip.to_owned());
                } else if import["type"] == "ClusterSetIP" {
                    return Err(format!("{name} has no ClusterSetIP yet"));
                }
            }
            Ok(Some(found))
        })
        .await?;
        vips.insert(c.id.to_owned(), found);
    }
    say(
        out,
        "  [5/5] federation complete: every gateway imports echo (3 clusters), db (north), legacy (east, west)",
    );
    if backends {
        for c in &layout.clusters {
            let url = format!("http://{}/debug/endpoints", c.admin());
            let url = url.as_str();
            let what = format!("gateway {} to see every echo endpoint healthy", c.id);
            poll(demo, c, deadline, timeout, &what, || async move {
                let view = http.get_json(url).await.map_err(|e| e.to_string())?;
                let eps: Vec<&Value> = view["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| {
                        s["service"]["name"] == "echo"
                            && s["port"] == super::layout::SERVICE_HTTP_PORT
                    })
                    .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
                    .collect();
                let healthy = eps.iter().filter(|e| e["healthy"] == true).count();
                if eps.len() == 3 && healthy == 3 {
                    Ok(Some(()))
                } else {
                    Err(format!("{healthy} of {} echo endpoints healthy", eps.len()))
                }
            })
            .await?;
        }
        say(out, "        every gateway sees all echo endpoints healthy");
    }
    Ok(vips)
}

fn find<'a>(imports: &'a Value, name: &str) -> Option<&'a Value> {
    imports.as_array()?.iter().find(|s| s["namespace"] == NAMESPACE && s["name"] == name)
}

/// Polls `check` every [`POLL`] until it answers `Some`, the deadline passes (an error
/// naming `what` and the last reason), or cluster `c`'s gateway exits (an error with its
/// log's tail).
async fn poll<T, F, Fut>(
    demo: &Arc<Mutex<Demo>>,
    c: &ClusterPlan,
    deadline: Instant,
    timeout: Duration,
    what: &str,
    mut check: F,
) -> Result<T, DemoError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, String>>,
{
    let mut last = String::from("no answer yet");
    loop {
        // The deadline is checked before each attempt, so a start-up limit shorter than the
        // gateways' start fails however fast they come up (and a loaded machine cannot make
        // `--timeout 1ms` succeed).
        if Instant::now() >= deadline {
            let log = demo.lock().await.gateways.get(c.id).map(|g| g.log.display().to_string());
            return Err(DemoError::Timeout {
                what: format!("{what}: {last} (log: {})", log.unwrap_or_default()),
                after: timeout,
            });
        }
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(reason) => last = reason,
        }
        {
            let mut demo = demo.lock().await;
            if let Some(g) = demo.gateways.get_mut(c.id)
                && !g.is_running()
            {
                return Err(DemoError::GatewayExited {
                    cluster: c.id.to_owned(),
                    status: "exited".to_owned(),
                    log: g.log.display().to_string(),
                    tail: g.log_tail(15),
                });
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What to try, with this run's addresses and ClusterSetIPs.
fn try_this(layout: &Layout, vips: &Vips, control: SocketAddr, dir: &Path) -> String {
    use super::layout::{SERVICE_ECHO_PORT as ECHO, SERVICE_HTTP_PORT as HTTP};
    let east = &layout.clusters[0];
    let (ip, port) = (east.ip, east.dns_port);
    let vip = vips.get("east").and_then(|m| m.get("echo")).map_or("<VIP>", String::as_str);
    let base = if layout.control.ip() == std::net::IpAddr::V4(super::layout::DEFAULT_BASE_IP) {
        String::new()
    } else {
        format!(" --base-ip {}", layout.control.ip())
    };
    let dns_flag = if port == super::layout::DEFAULT_DNS_PORT {
        String::new()
    } else {
        format!(" --dns-port {port}")
    };
    // Only fedgate's own clients: a fresh machine has no dig, curl or nc (`demo/tools.rs`).
    let dig = format!("fedgate demo dig{base}{dns_flag}");
    let get = "fedgate demo get";
    let dashboards: Vec<String> =
        layout.clusters.iter().map(|c| format!("http://{}/", c.admin())).collect();
    format!(
        "\nTry it (every gateway answers DNS on port {port}; `fedgate demo dig` asks east's, {ip}):\n\
         \x20 {dig} echo.{NAMESPACE}.svc.clusterset.local            # east's ClusterSetIP: {vip}\n\
         \x20 {dig} _http._tcp.echo.{NAMESPACE}.svc.clusterset.local SRV\n\
         \x20 {dig} db.{NAMESPACE}.svc.clusterset.local              # headless: an address per endpoint\n\
         \x20 {dig} db-0.north.db.{NAMESPACE}.svc.clusterset.local\n\
         \x20 {dig} echo.{NAMESPACE}.svc.cluster.local               # east's own Service only\n\
         \x20 {get} http://$({dig} echo.{NAMESPACE}.svc.clusterset.local):{HTTP}/   # hello from east (east-1)\n\
         \x20 {get} http://{vip}:{HTTP}/                       # the same, by address\n\
         \x20 fedgate demo echo {vip}:{ECHO} hi                 # TCP echo: east (east-1): hi\n\
         \x20 {get} 'http://{admin}/debug/imports?service={NAMESPACE}/legacy'   # TypeConflict, east wins\n\
         Dashboards: {dashboards}\n\
         \n\
         Watch failover (run `while sleep 0.5; do {get} http://{vip}:{HTTP}/; done` in another terminal):\n\
         \x20 fedgate demo fail east/east-1{base}     # east's backend down: north answers (same region)\n\
         \x20 fedgate demo fail north{base}           # north's gateway stops (--crash: killed): west answers\n\
         \x20 fedgate demo restore north{base}        # and restore east/east-1: traffic comes back\n\
         \x20 fedgate demo state{base}                # every cluster and backend, up or down\n\
         Control API: http://{control}/demo/state (docs/demo.md). Logs: {dir}/<cluster>/gateway.log\n",
        admin = east.admin(),
        dashboards = dashboards.join("  "),
        dir = dir.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_state_dir_is_fresh_under_the_runtime_dir_or_tmp() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = default_state_dir(Some(tmp.path().to_owned()));
        assert_eq!(d.parent(), Some(tmp.path()));
        let name = d.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(name.starts_with(&format!("fedgate-demo-{}-", std::process::id())), "{name}");
        // A runtime dir that does not exist falls back to the temp dir.
        let d = default_state_dir(Some(tmp.path().join("missing")));
        assert_eq!(d.parent(), Some(std::env::temp_dir().as_path()));
    }

    #[test]
    fn hints_use_this_runs_addresses_and_vips() {
        let layout = Layout::new(Ipv4Addr::new(127, 7, 8, 21), 5400).expect("layout");
        let mut vips = Vips::new();
        vips.entry("east".into()).or_default().insert("echo".into(), "127.7.8.130".into());
        let text = try_this(&layout, &vips, layout.control, Path::new("/s"));
        assert!(
            text.contains(
                "fedgate demo dig --base-ip 127.7.8.21 --dns-port 5400 echo.demo.svc.clusterset.local"
            ),
            "{text}"
        );
        assert!(text.contains("fedgate demo get http://127.7.8.130:8080/"), "{text}");
        assert!(text.contains("fedgate demo echo 127.7.8.130:9000 hi"), "{text}");
        for tool in ["dig @", "curl", " nc "] {
            assert!(!text.contains(tool), "{tool} is not on a fresh machine: {text}");
        }
        assert!(text.contains("fedgate demo fail north --base-ip 127.7.8.21"), "{text}");
        assert!(text.contains("http://127.7.8.23:15000/"), "{text}");
        let default = Layout::new(super::super::layout::DEFAULT_BASE_IP, 5353).expect("layout");
        let text = try_this(&default, &vips, default.control, Path::new("/s"));
        assert!(text.contains("fedgate demo fail north "), "no --base-ip for the default: {text}");
        assert!(!text.contains("--base-ip"), "{text}");
    }
}
