//! `fedgate demo`: a three-cluster federation on this machine, without root, Kubernetes or
//! any download. It writes a dev PKI, three clusters' file sources and gateway configs into a
//! state dir ([`layout`]), starts the built-in backends ([`backends`]) and one `fedgate`
//! child per cluster ([`gateways`]), waits until the federation is complete, prints what to
//! try, and serves a control API to fail and restore backends or whole clusters
//! ([`control`]). `fedgate demo fail|restore|state` talk to that API. docs/demo.md has the
//! user's view.

pub mod backends;
pub mod control;
pub mod gateways;
pub mod layout;
mod run;
pub mod tools;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use axum::http::Method;
use clap::{Args, Subcommand};

use crate::config::Config;
pub use run::{StartOptions, default_state_dir};

/// `fedgate demo ...`
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DemoArgs {
    #[command(subcommand)]
    pub action: Option<DemoCommand>,
    #[command(flatten)]
    pub start: StartArgs,
}

/// Starting the demo (`fedgate demo` without a subcommand).
#[derive(Debug, Args)]
pub struct StartArgs {
    /// State directory: certificates, configs, cluster files, logs. Default: a fresh
    /// directory under $XDG_RUNTIME_DIR (or /tmp), printed at start.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Address of the first gateway; the others, the backends and the ClusterSetIPs take
    /// fixed places in the same /24 (docs/demo.md). Must be in 127.0.0.0/8.
    #[arg(long, default_value_t = layout::DEFAULT_BASE_IP)]
    pub base_ip: Ipv4Addr,
    /// DNS port of every gateway (above 1024: no root needed; `dig -p PORT`).
    #[arg(long, default_value_t = layout::DEFAULT_DNS_PORT)]
    pub dns_port: u16,
    /// Do not start the built-in backends (bring your own on the addresses in the cluster
    /// files).
    #[arg(long)]
    pub no_backends: bool,
    /// Give up start-up after this long, naming what did not come up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub timeout: Duration,
    /// Only write the files (PKI, configs, cluster files) into --dir and exit.
    #[arg(long, requires = "dir")]
    pub write_only: bool,
}

#[derive(Debug, Subcommand)]
pub enum DemoCommand {
    /// Fail a whole cluster (`east`: its gateway stops; `--crash`: is killed) or one backend
    /// (`east/east-1`: its listeners close).
    Fail(FailArgs),
    /// Undo `fail`: restart the cluster's gateway, or reopen the backend.
    Restore(TargetArgs),
    /// Print the running demo's clusters and backends with their state (JSON).
    State(ControlArgs),
    /// Look a name up at the demo's DNS and print the answers (like `dig +short`).
    Dig(tools::DigArgs),
    /// Fetch an http:// URL and print the body (like `curl -s`).
    Get(tools::GetArgs),
    /// Send a line to a TCP address and print the reply (like `echo TEXT | nc -q1`).
    Echo(tools::EchoArgs),
    /// A demo gateway (started by `fedgate demo`; exits when the demo is gone).
    #[command(hide = true)]
    Gateway(GatewayArgs),
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    /// `CLUSTER` or `CLUSTER/BACKEND` (`fedgate demo state` lists them).
    pub target: String,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Debug, Args)]
pub struct FailArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// For a cluster: SIGKILL its gateway (a crash: peers notice only when the tunnel times
    /// out) instead of stopping it (it drains and tells its peers at once).
    #[arg(long)]
    pub crash: bool,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The demo's control API; default: `<base-ip>:15080`.
    #[arg(long, conflicts_with = "dir")]
    pub control: Option<SocketAddr>,
    /// The demo's state dir: the control API's address is read from its `control.addr`.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The `--base-ip` the demo was started with.
    #[arg(long, default_value_t = layout::DEFAULT_BASE_IP)]
    pub base_ip: Ipv4Addr,
}

/// The file in the state dir that holds the control API's address.
pub const CONTROL_ADDR_FILE: &str = "control.addr";

impl ControlArgs {
    fn address(&self) -> Result<SocketAddr, DemoError> {
        if let Some(addr) = self.control {
            return Ok(addr);
        }
        let Some(dir) = &self.dir else {
            return Ok(SocketAddr::from((self.base_ip, layout::CONTROL_PORT)));
        };
        let path = dir.join(CONTROL_ADDR_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| DemoError::Io(path.clone(), e))?;
        text.trim().parse().map_err(|_| DemoError::ControlFile(path, text.trim().to_owned()))
    }
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The gateway's config file.
    #[arg(long)]
    pub config: PathBuf,
    /// The demo's pid: the gateway exits when it is no longer its parent.
    #[arg(long)]
    pub parent_pid: u32,
}

/// What went wrong in the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error(transparent)]
    Tool(#[from] tools::ToolError),
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("binding {0}: {1} (is another demo running? pick another --base-ip)")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("starting {0}: {1}")]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("certificates: {0}")]
    Certs(#[from] crate::certs::CertError),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("gateway {cluster} exited during start-up ({status}); last lines of {log}:\n{tail}")]
    GatewayExited { cluster: String, status: String, log: String, tail: String },
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error(
        "no demo control API at {0}: is `fedgate demo` running? (else pass --control or --base-ip)"
    )]
    NotRunning(SocketAddr),
    #[error("invalid target {0:?}: use CLUSTER or CLUSTER/BACKEND (e.g. east, east/east-1)")]
    BadTarget(String),
    #[error("no such cluster or backend: {0} (`fedgate demo state` lists them)")]
    UnknownTarget(String),
    #[error("the demo answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("{0}: {1:?} is not an address (the demo writes ip:port there)")]
    ControlFile(PathBuf, String),
    #[error("parent process {0} is gone")]
    ParentGone(u32),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Runs `fedgate demo ...`; returns the exit code. `run_gateway` runs a gateway child's
/// config (what `fedgate run` does).
pub fn execute(
    args: DemoArgs,
    run_gateway: impl FnOnce(Config) -> anyhow::Result<()>,
    out: &mut dyn Write,
) -> u8 {
    use crate::cli::{EXIT_INVALID, EXIT_OK};
    let result = match args.action {
        Some(DemoCommand::Gateway(g)) => {
            if let Err(e) = gateways::watch_parent(g.parent_pid) {
                eprintln!("fedgate demo gateway: {e}");
                return EXIT_INVALID;
            }
            return crate::cli::run(&g.config, run_gateway);
        }
        None => {
            let opts = StartOptions {
                dir: args.start.dir,
                base_ip: args.start.base_ip,
                dns_port: args.start.dns_port,
                backends: !args.start.no_backends,
                timeout: args.start.timeout,
                write_only: args.start.write_only,
            };
            run::start(opts, out)
        }
        Some(DemoCommand::Fail(f)) => {
            let body = serde_json::json!({ "target": f.target.target, "crash": f.crash });
            client(out, &f.target.control, Method::POST, "fail", Some(body))
        }
        Some(DemoCommand::Restore(t)) => {
            let body = serde_json::json!({ "target": t.target });
            client(out, &t.control, Method::POST, "restore", Some(body))
        }
        Some(DemoCommand::State(c)) => client(out, &c, Method::GET, "state", None),
        Some(DemoCommand::Dig(a)) => tools::dig(&a, out).map_err(DemoError::from),
        Some(DemoCommand::Get(a)) => tools::get(&a, out).map_err(DemoError::from),
        Some(DemoCommand::Echo(a)) => tools::echo(&a, out).map_err(DemoError::from),
    };
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("fedgate demo: {e}");
            EXIT_INVALID
        }
    }
}

/// `fedgate demo fail|restore|state`: one request to the control API.
fn client(
    out: &mut dyn Write,
    control: &ControlArgs,
    method: Method,
    verb: &str,
    body: Option<serde_json::Value>,
) -> Result<(), DemoError> {
    if let Some(t) = body.as_ref().and_then(|b| b["target"].as_str()) {
        // Refuse bad syntax before talking to anyone.
        control::Target::parse(t)?;
    }
    let addr = control.address()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DemoError::Runtime)?;
    let url = format!("http://{addr}/demo/{verb}");
    // A restore of a cluster waits for the gateway to be ready.
    let http = control::Client::new(control::RESTORE_READY_TIMEOUT + Duration::from_secs(10));
    let (status, text) =
        runtime.block_on(http.request(method, &url, body)).map_err(|e| match e {
            DemoError::Http { ref reason, .. } if reason.contains("onnection refused") => {
                DemoError::NotRunning(addr)
            }
            other => other,
        })?;
    let value: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        let message = value["error"].as_str().map(str::to_owned).unwrap_or(text);
        return Err(DemoError::Refused { status: status.as_u16(), message });
    }
    let _ = match value["message"].as_str() {
        Some(m) => writeln!(out, "{m}"),
        None => writeln!(out, "{}", serde_json::to_string_pretty(&value).unwrap_or(text)),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse_from};

    fn demo(args: &[&str]) -> DemoArgs {
        let argv = ["fedgate", "demo"].iter().chain(args).copied();
        match parse_from(argv).expect("parses").command {
            Command::Demo(d) => d,
            other => panic!("not demo: {other:?}"),
        }
    }

    #[test]
    fn start_and_control_arguments_parse() {
        let d = demo(&[]);
        assert!(d.action.is_none());
        assert_eq!(d.start.base_ip, layout::DEFAULT_BASE_IP);
        assert_eq!(d.start.dns_port, 5353);
        assert_eq!(d.start.timeout, Duration::from_secs(60));
        let d = demo(&["--base-ip", "127.5.6.11", "--dns-port", "5400", "--no-backends"]);
        assert_eq!(d.start.base_ip, Ipv4Addr::new(127, 5, 6, 11));
        assert!(d.start.no_backends);
        match demo(&["fail", "north", "--crash", "--base-ip", "127.5.6.11"]).action {
            Some(DemoCommand::Fail(f)) => {
                assert_eq!(f.target.target, "north");
                assert!(f.crash);
                assert_eq!(
                    f.target.control.address().expect("address"),
                    "127.5.6.11:15080".parse().expect("addr")
                );
            }
            other => panic!("{other:?}"),
        }
        // Usage errors: no target, --write-only without --dir, --control with --dir.
        for bad in [
            &["demo", "fail"][..],
            &["demo", "--write-only"],
            &["demo", "state", "--control", "127.0.0.1:1", "--dir", "x"],
        ] {
            let argv = std::iter::once("fedgate").chain(bad.iter().copied());
            assert!(parse_from(argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_control_address_comes_from_the_state_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let args = |dir: &std::path::Path| ControlArgs {
            control: None,
            dir: Some(dir.to_owned()),
            base_ip: layout::DEFAULT_BASE_IP,
        };
        let err = args(tmp.path()).address().expect_err("no file yet");
        assert!(err.to_string().contains("control.addr"), "{err}");
        std::fs::write(tmp.path().join(CONTROL_ADDR_FILE), "127.9.9.11:15080\n").expect("write");
        assert_eq!(
            args(tmp.path()).address().expect("reads"),
            "127.9.9.11:15080".parse().expect("a")
        );
        std::fs::write(tmp.path().join(CONTROL_ADDR_FILE), "nonsense").expect("write");
        let err = args(tmp.path()).address().expect_err("bad file");
        assert!(err.to_string().contains("\"nonsense\" is not an address"), "{err}");
    }
}
