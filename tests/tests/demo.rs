//! `fedgate demo` as a user runs it: the real binary, as an unprivileged process (when the
//! suite runs as root it drops to `nobody` with `setpriv`), on a 127.x block of its own. Real
//! `dig` at the demo's DNS, real `curl` through a ClusterSetIP, `fedgate demo fail|restore`
//! moving traffic with zero failed requests, and SIGINT / SIGKILL leaving no process behind.
//! Needs `dig` (bind9-dnsutils), `curl` and, as root, `setpriv` (util-linux).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_e2e::*;

/// Start-up of three gateways on a busy 2-core machine, with some margin.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const FAILOVER: Duration = Duration::from_secs(20);
const NOBODY: u32 = 65534;

fn euid() -> Result<u32> {
    let out = Command::new("id").arg("-u").output().context("running id -u")?;
    String::from_utf8_lossy(&out.stdout).trim().parse().context("parsing id -u")
}

/// A running `fedgate demo` with its stdout lines arriving on a channel.
struct Demo {
    child: Option<Child>,
    lines: Receiver<String>,
    seen: Vec<String>,
    base: Ipv4Addr,
    dir: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

impl Demo {
    /// Starts the demo on `block` (gateways at .11-.13) as an unprivileged user.
    fn start(block: AddrBlock) -> Result<Self> {
        require_tool("dig", "bind9-dnsutils");
        require_tool("curl", "curl");
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("state");
        std::fs::create_dir(&dir)?;
        let base = block.ip(11);
        let bin = fedgate_bin();
        let args = ["demo", "--base-ip", &base.to_string(), "--timeout", "80s", "--dir"];
        let mut cmd = if euid()? == 0 {
            require_tool("setpriv", "util-linux");
            use std::os::unix::fs::PermissionsExt;
            // nobody must reach the state dir through the (root-owned, 0700) temp dir.
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711))?;
            std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY))?;
            let mut c = Command::new("setpriv");
            c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        cmd.args(args)
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("spawning fedgate demo")?;
        let stdout = child.stdout.take().context("demo stdout")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child: Some(child), lines, seen: Vec::new(), base, dir, _tmp: tmp })
    }

    /// Waits for a stdout line starting with `prefix`.
    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    eprintln!("demo| {line}");
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                }
                Err(e) => bail!(
                    "no line starting with {prefix:?} within {timeout:?} ({e}); output so far:\n{}\n{}",
                    self.seen.join("\n"),
                    self.logs()
                ),
            }
        }
    }

    fn pid(&self) -> Result<u32> {
        Ok(self.child.as_ref().context("demo not running")?.id())
    }

    fn control(&self, args: &[&str]) -> Result<String> {
        let mut all = args.to_vec();
        let base = self.base.to_string();
        all.extend_from_slice(&["--base-ip", &base]);
        let (code, out, err) = fedgate(&all)?;
        if code != 0 {
            bail!("fedgate {all:?} exited {code}: {out}{err}");
        }
        Ok(out.trim().to_owned())
    }

    /// `fedgate demo state`, finding the demo through its state dir (`control.addr`).
    fn state(&self) -> Result<serde_json::Value> {
        let dir = self.dir.to_str().context("utf-8 path")?;
        let (code, text, err) = fedgate(&["demo", "state", "--dir", dir])?;
        if code != 0 {
            bail!("fedgate demo state exited {code}: {text}{err}");
        }
        serde_json::from_str(&text).with_context(|| format!("state is not JSON: {text}"))
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let st =
            Command::new("kill").arg(format!("-{sig}")).arg(self.pid()?.to_string()).status()?;
        if !st.success() {
            bail!("kill -{sig} failed");
        }
        Ok(())
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("demo not running")?;
        let status = eventually("the demo to exit", timeout, || Ok(child.try_wait()?))?;
        self.child = None;
        Ok(status)
    }

    fn logs(&self) -> String {
        ["east", "west", "north"]
            .iter()
            .map(|c| {
                let text = std::fs::read_to_string(self.dir.join(c).join("gateway.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> =
                    text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
                format!("--- {c}/gateway.log (tail) ---\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            eprintln!("{}", self.logs());
        }
    }
}

/// The gateway pids from `fedgate demo state`.
fn gateway_pids(state: &serde_json::Value) -> Result<BTreeMap<String, u32>> {
    let mut out = BTreeMap::new();
    for c in state["clusters"].as_array().context("clusters")? {
        let id = c["id"].as_str().context("id")?.to_owned();
        let pid = c["pid"].as_u64().with_context(|| format!("{id} has no pid: {c}"))?;
        out.insert(id, pid as u32);
    }
    Ok(out)
}

/// True while `pid` is a live (not zombie) `fedgate demo gateway` process.
fn gateway_alive(pid: u32) -> bool {
    let proc = Path::new("/proc").join(pid.to_string());
    let cmdline = std::fs::read(proc.join("cmdline")).unwrap_or_default();
    let state = std::fs::read_to_string(proc.join("stat")).unwrap_or_default();
    let zombie = state.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'));
    String::from_utf8_lossy(&cmdline).contains("gateway") && !zombie
}

fn uid_of(pid: u32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("Uid:")).context("Uid line")?;
    line.split_whitespace().nth(1).context("uid")?.parse().context("uid number")
}

/// The commands of the demo's "Try it" block (between that line and "Dashboards:"), without
/// their comments.
fn printed_commands(seen: &[String]) -> Result<Vec<String>> {
    let start = seen.iter().position(|l| l.starts_with("Try it")).context("no Try it block")?;
    Ok(seen[start + 1..]
        .iter()
        .take_while(|l| !l.starts_with("Dashboards:"))
        .map(|l| l.split("  #").next().unwrap_or_default().trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}

/// Runs `command` with `sh -c` and a PATH holding nothing but `fedgate`; returns its stdout.
fn bare_shell(command: &str) -> Result<String> {
    let bin = tempfile::tempdir()?;
    std::os::unix::fs::symlink(fedgate_bin(), bin.path().join("fedgate"))?;
    let out = Command::new("/bin/sh")
        .args(["-c", command])
        .env_clear()
        .env("PATH", bin.path())
        .output()
        .context("running sh")?;
    check_output(&format!("{command:?}"), out)
}

fn dig(server: Ipv4Addr, args: &[&str]) -> Result<Vec<String>> {
    let out = Command::new("dig")
        .arg(format!("@{server}"))
        .args(["-p", "5353", "+short", "+time=2", "+tries=2"])
        .args(args)
        .output()
        .context("running dig")?;
    if !out.status.success() {
        bail!("dig {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
}

fn curl(url: &str) -> Result<String> {
    let out =
        Command::new("curl").args(["-sS", "-m", "5", url]).output().context("running curl")?;
    if !out.status.success() {
        bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Sends one line to a TCP echo and reads one line back.
fn echo_line(addr: &str, line: &str) -> Result<String> {
    use std::io::Write;
    let addr: std::net::SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(s, "{line}")?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).with_context(|| format!("reading from {addr}"))?;
    Ok(reply.trim_end().to_owned())
}

/// Requests in a loop, 100 ms apart, each answer (or error) recorded in order.
struct Traffic {
    answers: Arc<Mutex<Vec<Result<String, String>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(url: String) -> Self {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (answers.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: at most 10 minutes of requests even if the test forgets to stop it.
            let end = Instant::now() + Duration::from_secs(600);
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                let r = curl(&url).map_err(|e| format!("{e:#}"));
                a.lock().expect("answers").push(r);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self { answers, stop, thread: Some(thread) }
    }

    fn count(&self) -> usize {
        self.answers.lock().expect("answers").len()
    }

    /// Waits until `n` answers in a row (after the first `from`) say `want`.
    fn wait_for(&self, from: usize, want: &str, timeout: Duration) -> Result<()> {
        eventually(&format!("traffic to move to {want:?}"), timeout, || {
            let a = self.answers.lock().expect("answers");
            let tail: Vec<&Result<String, String>> = a.iter().skip(from).rev().take(5).collect();
            Ok((tail.len() == 5 && tail.iter().all(|r| r.as_deref() == Ok(want))).then_some(()))
        })
    }

    fn finish(mut self) -> Vec<Result<String, String>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.answers.lock().expect("answers"))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn demo_serves_dns_and_traffic_fails_over_and_back_and_stops_cleanly() -> Result<()> {
    let block = AddrBlock::unique();
    let mut demo = Demo::start(block)?;
    let started = Instant::now();
    demo.wait_line("ready:", READY_TIMEOUT)?;
    eprintln!("demo ready after {:?}", started.elapsed());
    assert!(
        demo.seen.iter().any(|l| l.contains("[4/5] gateway north")),
        "progress lines: {:?}",
        demo.seen
    );
    if euid()? == 0 {
        assert_eq!(uid_of(demo.pid()?)?, NOBODY, "the demo runs unprivileged");
    }
    let state = demo.state()?;
    let pids = gateway_pids(&state)?;
    assert_eq!(pids.len(), 3, "{state}");
    for (id, pid) in &pids {
        assert!(gateway_alive(*pid), "gateway {id} (pid {pid}) runs");
    }

    // A second demo on the same addresses fails at once, naming the address in use.
    let other = tempfile::tempdir()?;
    let other_dir = other.path().to_str().context("utf-8 path")?;
    let base = demo.base.to_string();
    let (code, _, err) = fedgate(&["demo", "--base-ip", &base, "--dir", other_dir])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already in use"), "{err}");
    assert!(err.contains("is another demo running?"), "{err}");

    // DNS: the ClusterSetIP from east's range, the headless service's endpoints.
    let east = block.ip(11);
    let vip = dig(east, &["echo.demo.svc.clusterset.local"])?;
    assert_eq!(vip.len(), 1, "one ClusterSetIP: {vip:?}");
    let vip: Ipv4Addr = vip[0].parse().context("an IPv4 address")?;
    assert_eq!(vip.octets()[..3], block.ip(0).octets()[..3], "in the demo's block");
    assert!((128..160).contains(&vip.octets()[3]), "{vip} in east's /27 (.128-.159)");
    let db = dig(east, &["db.demo.svc.clusterset.local"])?;
    assert_eq!(db.len(), 2, "headless db: one address per endpoint: {db:?}");
    let db0 = dig(east, &["db-0.north.db.demo.svc.clusterset.local"])?;
    assert_eq!(db0.len(), 1, "{db0:?}");
    let srv = dig(east, &["SRV", "_http._tcp.echo.demo.svc.clusterset.local"])?;
    assert!(srv.iter().any(|l| l.ends_with("echo.demo.svc.clusterset.local.")), "{srv:?}");
    // cluster.local: east's own Service only (its ClusterIP from the file source).
    assert_eq!(dig(east, &["echo.demo.svc.cluster.local"])?, ["10.96.0.10"]);

    // Every command of the demo's "Try it" hints works with nothing but fedgate and a shell:
    // no dig, curl or nc on the PATH (a fresh machine has none of them).
    let hints = printed_commands(&demo.seen)?;
    assert!(hints.len() >= 9, "the hints: {hints:?}");
    for command in &hints {
        let out = bare_shell(command)?;
        assert!(!out.trim().is_empty(), "{command:?} printed nothing");
        if command.starts_with("fedgate demo echo") {
            assert_eq!(out.trim(), "east (east-1): hi", "{command}");
        }
        if command.ends_with("echo.demo.svc.clusterset.local") {
            assert_eq!(out.trim(), vip.to_string(), "{command}");
        }
    }

    // TCP: the echo port of the same VIP, and north's headless db-0 through its own VIP
    // (east has no db endpoint: the connection crosses the tunnel).
    assert_eq!(echo_line(&format!("{vip}:9000"), "hi")?, "east (east-1): hi");
    assert_eq!(echo_line(&format!("{}:5432", db0[0]), "select 1")?, "north (db-0): select 1");

    // Traffic: east's own backend answers first.
    let url = format!("http://{vip}:8080/");
    assert_eq!(curl(&url)?, "hello from east (east-1)");
    let traffic = Traffic::start(url);

    // East's backend fails: north (same region) answers, no request fails.
    let mut phases = vec![("fail east/east-1", traffic.count())];
    let out = demo.control(&["demo", "fail", "east/east-1"])?;
    assert!(out.contains("east/east-1: backend stopped"), "{out}");
    traffic.wait_for(traffic.count(), "hello from north (north-1)", FAILOVER)?;
    // North's whole cluster goes away: west answers.
    let t0 = Instant::now();
    phases.push(("fail north", traffic.count()));
    let out = demo.control(&["demo", "fail", "north"])?;
    assert!(out.contains("north: gateway stopped"), "{out}");
    traffic.wait_for(traffic.count(), "hello from west (west-1)", FAILOVER)?;
    eprintln!("north failed -> west serving within {:?}", t0.elapsed());
    let state = demo.state()?;
    let north = &state["clusters"][2];
    assert_eq!(north["id"], "north");
    assert_eq!(north["up"], false, "{north}");
    assert_eq!(state["clusters"][0]["backends"][0]["up"], false, "{state}");

    // Restores bring the traffic back, step by step.
    phases.push(("restore north", traffic.count()));
    let out = demo.control(&["demo", "restore", "north"])?;
    assert!(out.contains("north: gateway restarted and ready"), "{out}");
    traffic.wait_for(traffic.count(), "hello from north (north-1)", FAILOVER)?;
    // A crash (SIGKILL) instead of a stop: peers notice through attempt timeouts and the
    // QUIC idle timeout; connections wait a little longer but still do not fail.
    phases.push(("fail north --crash", traffic.count()));
    let out = demo.control(&["demo", "fail", "north", "--crash"])?;
    assert!(out.contains("north: gateway killed"), "{out}");
    let t0 = Instant::now();
    traffic.wait_for(traffic.count(), "hello from west (west-1)", FAILOVER)?;
    eprintln!("north crashed -> west serving within {:?}", t0.elapsed());
    phases.push(("restore north again", traffic.count()));
    demo.control(&["demo", "restore", "north"])?;
    traffic.wait_for(traffic.count(), "hello from north (north-1)", FAILOVER)?;
    phases.push(("restore east/east-1", traffic.count()));
    let out = demo.control(&["demo", "restore", "east/east-1"])?;
    assert!(out.contains("serving again"), "{out}");
    traffic.wait_for(traffic.count(), "hello from east (east-1)", FAILOVER)?;
    let answers = traffic.finish();
    let failed: Vec<String> = answers
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("#{i}: {e}")))
        .collect();
    if !failed.is_empty() {
        eprintln!("answers, phases starting at {phases:?}:");
        for (i, a) in answers.iter().enumerate() {
            eprintln!("  #{i} {a:?}");
        }
    }
    eprintln!("{} requests through the VIP, {} failed", answers.len(), failed.len());
    assert!(failed.is_empty(), "failed requests during failover: {failed:?}");
    let new_pids = gateway_pids(&demo.state()?)?;
    assert_ne!(new_pids["north"], pids["north"], "north's gateway is a new process");

    // The control API lets the gateways' dashboards call it (CORS), and nobody else.
    let control = format!("http://{}:15080/demo/fail", demo.base);
    for (origin, allowed) in [
        (format!("http://{}:15000", block.ip(12)), true),
        ("http://evil.example".to_owned(), false),
    ] {
        let out = Command::new("curl")
            .args(["-sS", "-m", "5", "-i", "-X", "OPTIONS", &control, "-H"])
            .arg(format!("Origin: {origin}"))
            .args(["-H", "Access-Control-Request-Method: POST"])
            .output()?;
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        let want = format!("access-control-allow-origin: {origin}");
        assert_eq!(head.contains(&want), allowed, "preflight from {origin}: {head}");
    }

    // A bad target is refused with a clear message.
    let (code, _, err) = fedgate(&["demo", "fail", "mars", "--base-ip", &demo.base.to_string()])?;
    assert_eq!(code, 1);
    assert!(err.contains("no such cluster or backend: mars"), "{err}");

    // SIGINT: everything stops, exit 0, no gateway left.
    demo.signal("INT")?;
    let status = demo.wait_exit(Duration::from_secs(30))?;
    assert!(status.success(), "demo exit status {status}");
    demo.wait_line("stopped", Duration::from_secs(5))?;
    for (id, pid) in &new_pids {
        assert!(!gateway_alive(*pid), "gateway {id} (pid {pid}) outlived the demo");
    }
    let (code, _, err) = fedgate(&["demo", "state", "--base-ip", &demo.base.to_string()])?;
    assert_eq!(code, 1);
    assert!(err.contains("is `fedgate demo` running?"), "{err}");
    Ok(())
}

#[test]
fn gateways_exit_when_the_demo_is_killed() -> Result<()> {
    let block = AddrBlock::unique();
    let mut demo = Demo::start(block)?;
    demo.wait_line("ready:", READY_TIMEOUT)?;
    let pids = gateway_pids(&demo.state()?)?;
    demo.signal("KILL")?;
    demo.wait_exit(Duration::from_secs(10))?;
    eventually("every gateway to exit after the demo was killed", Duration::from_secs(10), || {
        Ok(pids.values().all(|p| !gateway_alive(*p)).then_some(()))
    })?;
    Ok(())
}

#[test]
fn a_start_up_that_times_out_names_what_did_not_come_up_and_leaves_nothing_running() -> Result<()> {
    let block = AddrBlock::unique();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("state");
    let dir_str = dir.to_str().context("utf-8 path")?;
    let base = block.ip(11).to_string();
    let started = Instant::now();
    let (code, out, err) =
        fedgate(&["demo", "--base-ip", &base, "--dir", dir_str, "--timeout", "1ms"])?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("timed out after 1ms waiting for gateway east to be ready"),
        "the error names the gateway: {err}"
    );
    assert!(err.contains("gateway.log"), "and where its log is: {err}");
    assert!(out.contains("stopped;"), "the demo stopped what it started: {out}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    // No gateway of this demo is left (their command lines name the state dir).
    let left: Vec<String> = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            (cmd.contains(dir_str) && gateway_alive(pid)).then_some(cmd)
        })
        .collect();
    assert!(left.is_empty(), "gateways left running: {left:?}");
    Ok(())
}
