//! The dashboard in a real browser: `fedgate demo` (the real binary, three gateways and their
//! backends on a private loopback block) runs, and headless Debian Chromium, driven by
//! `tests/browser/dashboard.mjs` (playwright-core), opens east's dashboard, finds the three
//! clusters, keeps requests flowing to `demo/echo`, fails east's echo backend with
//! `fedgate demo fail east/east-1` and waits a few seconds at most for the failover to
//! appear on the page (the failover list, and the explain view's verdict), then restores the
//! backend and waits for the explain view to return to the best tier. Screenshots are kept
//! under `target/test-artifacts/browser/` (or `$FEDGATE_ARTIFACTS`). Chromium, node and npm
//! missing make the test fail, not skip.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fedgate_e2e::*;

/// How long `fedgate demo` may take to say `ready:`.
const DEMO_READY: Duration = Duration::from_secs(90);
/// How long the browser script may run in all (start, clusters, failover, screenshot).
const BROWSER_RUN: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn browser_dir() -> PathBuf {
    repo_root().join("tests/browser")
}

fn artifacts_dir() -> PathBuf {
    std::env::var_os("FEDGATE_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/test-artifacts/browser"))
}

/// The browser: `$CHROMIUM`, else Debian's `/usr/bin/chromium`.
fn chromium() -> Result<PathBuf> {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    ensure!(
        path.exists(),
        "no Chromium at {}: install Debian's `chromium` package (scripts/install-test-deps.sh \
         does) or set CHROMIUM",
        path.display()
    );
    Ok(path)
}

/// Runs `cmd` to completion within `timeout`; (success, stdout + stderr).
fn run_bounded(mut cmd: Command, what: &str, timeout: Duration) -> Result<(bool, String)> {
    let dir = tempfile::tempdir()?;
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path)?;
    let mut child = cmd
        .stdout(out.try_clone()?)
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let status = match eventually(what, timeout, || Ok(child.try_wait()?)) {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let text = std::fs::read_to_string(&out_path).unwrap_or_default();
            bail!("{e:#}\n--- output of {what} ---\n{text}");
        }
    };
    Ok((status.success(), std::fs::read_to_string(&out_path).unwrap_or_default()))
}

/// `npm ci` in tests/browser when playwright-core is not installed yet (quick when warm).
fn ensure_node_modules() -> Result<()> {
    let dir = browser_dir();
    if dir.join("node_modules/playwright-core/package.json").exists() {
        return Ok(());
    }
    let mut cmd = Command::new("npm");
    cmd.args(["ci", "--no-audit", "--no-fund"]).current_dir(&dir);
    // playwright-core never downloads a browser; say so anyway for older versions.
    cmd.env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1");
    let (ok, out) = run_bounded(cmd, "npm ci in tests/browser", Duration::from_secs(300))?;
    ensure!(ok, "npm ci in {} failed:\n{out}", dir.display());
    Ok(())
}

/// A running `fedgate demo`, stopped with SIGINT (then SIGKILL) when dropped.
struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    output: Vec<String>,
}

impl Demo {
    fn start(base_ip: std::net::Ipv4Addr, dir: &Path) -> Result<Self> {
        let mut child = Command::new(fedgate_bin())
            .args(["demo", "--base-ip", &base_ip.to_string(), "--dir"])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .context("starting fedgate demo")?;
        let (tx, lines) = mpsc::channel();
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        Ok(Self { child, lines, output: Vec::new() })
    }

    /// Waits for the line starting with `ready:`.
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => {
                    let ready = line.trim_start().starts_with("ready:");
                    self.output.push(line);
                    if ready {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("fedgate demo exited before it was ready:\n{}", self.output())
                }
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("fedgate demo exited ({status}) before it was ready:\n{}", self.output());
            }
            if Instant::now() >= deadline {
                bail!("fedgate demo not ready after {timeout:?}:\n{}", self.output());
            }
        }
    }

    fn output(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.output.push(line);
        }
        self.output.join("\n")
    }

    /// SIGINT, then waits (bounded) for the demo to stop its gateways and exit.
    fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status().context("kill -INT")?;
        eventually("fedgate demo to exit after SIGINT", Duration::from_secs(30), || {
            Ok(self.child.try_wait()?)
        })
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.stop();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- fedgate demo output ---\n{}", self.output());
        }
    }
}

#[test]
fn dashboard_shows_the_clusters_and_a_failover_in_chromium() -> Result<()> {
    let chromium = chromium()?;
    require_tool("node", "nodejs");
    require_tool("npm", "npm");
    ensure_node_modules()?;

    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let base = block.ip(11);
    let mut demo = Demo::start(base, &tmp.path().join("demo"))?;
    let started = Instant::now();
    demo.wait_ready(DEMO_READY)?;
    eprintln!("fedgate demo ready after {:?}", started.elapsed());

    // east's ClusterSetIP of demo/echo and its HTTP port, from east's admin API.
    let admin = std::net::SocketAddr::from((base, 15000));
    let imports = get_json(admin, "/debug/imports")?;
    let echo = find_import(&imports, "demo", "echo")
        .with_context(|| format!("demo/echo not imported by east: {imports}"))?;
    let vip = echo["ips"][0].as_str().with_context(|| format!("echo's ClusterSetIP: {echo}"))?;
    let port = echo["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "http"))
        .and_then(|p| p["port"].as_u64())
        .with_context(|| format!("echo's http port: {echo}"))?;

    let bin = fedgate_bin();
    let bin = bin.to_str().context("non-UTF-8 binary path")?;
    let demo_cmd = |action: &str| {
        serde_json::json!([bin, "demo", action, "east/east-1", "--base-ip", base.to_string()])
    };
    let artifacts = artifacts_dir();
    let mut node = Command::new("node");
    node.arg(browser_dir().join("dashboard.mjs"))
        .args(["--url", &format!("http://{admin}/")])
        .args(["--clusters", "east,west,north"])
        .args(["--service", "demo/echo"])
        .args(["--traffic", &format!("http://{vip}:{port}/")])
        .args(["--fail", &demo_cmd("fail").to_string()])
        .args(["--restore", &demo_cmd("restore").to_string()])
        .args(["--timeout-ms", "10000"])
        .arg("--chromium")
        .arg(&chromium)
        .arg("--artifacts")
        .arg(&artifacts);
    let (ok, out) = run_bounded(node, "node tests/browser/dashboard.mjs", BROWSER_RUN)?;
    eprintln!("--- dashboard.mjs ---\n{out}");
    if !ok {
        bail!(
            "the browser check failed (screenshot in {}):\n{out}\n--- fedgate demo ---\n{}",
            artifacts.display(),
            demo.output()
        );
    }
    for name in ["dashboard-failover.png", "dashboard-restored.png"] {
        let shot = artifacts.join(name);
        let size = std::fs::metadata(&shot).with_context(|| format!("{}", shot.display()))?.len();
        assert!(size > 10_000, "screenshot {} is only {size} bytes", shot.display());
    }
    assert!(out.contains("failover on the page"), "{out}");
    assert!(out.contains("back on the best tier"), "{out}");

    let status = demo.stop()?;
    assert!(status.success(), "fedgate demo exited with {status}:\n{}", demo.output());
    Ok(())
}
