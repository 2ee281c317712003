//! The `fedgate` command line: `run`, `analyze`, `certs ca`, `certs issue`, `demo`, `version`.
//!
//! Exit codes: 0 success, 1 invalid input (a bad config or certificate, or a gateway that
//! failed), 2 usage errors (unknown flags, missing arguments: clap's own).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use fedgate_discovery::model::ClusterId;

use crate::certs::{self, CertOptions, KeyType};
use crate::config::{self, Config};
use crate::logging::{self, LogFormat};

/// Exit code of a successful command.
pub const EXIT_OK: u8 = 0;
/// Exit code when the input (config, certificates) is invalid or the gateway failed.
pub const EXIT_INVALID: u8 = 1;
/// Exit code of a usage error (bad flags or arguments).
pub const EXIT_USAGE: u8 = 2;

/// fedgate: a multi-cluster federation gateway (MCS API, DNS, QUIC tunnel).
#[derive(Debug, Parser)]
#[command(name = "fedgate", version, about, propagate_version = true)]
pub struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Log filter: a level (`debug`) or directives (`info,fedgate=debug`).
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Run(RunArgs),
    /// Check config files and report every problem (syntax, values, cross-field rules,
    /// certificates).
    Analyze(AnalyzeArgs),
    /// Make a development PKI: a clusterset CA and gateway certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run a three-cluster federation on this machine (no root, no Kubernetes) and fail or
    /// restore its parts: `fedgate demo`, `fedgate demo fail east/east-1`.
    Demo(crate::demo::DemoArgs),
    /// Print the version.
    Version,
    /// Write the CRDs (ServiceExport, ServiceImport, ClusterProperty) generated from the Rust
    /// types into deploy/crds/ (or --out); --check only compares.
    Crdgen(crate::crdgen::CrdgenArgs),
    /// Show a running gateway's clusters, imports, endpoints, conflicts, traffic and
    /// failovers as tables.
    Status(crate::status::StatusArgs),
    /// Explain which tier and endpoints a new connection to NAMESPACE/NAME would get from a
    /// running gateway, and why.
    Explain(crate::status::ExplainArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The config file (YAML).
    #[arg(long, short)]
    pub config: PathBuf,
    /// The gateway pod's IP for `front.mode: kube` (overrides front.kube.podIP).
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<std::net::IpAddr>,
    /// This replica's name in the leader Lease when discovery.kube.leaderElection.identity
    /// is not set (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// The leader Lease's namespace when discovery.kube.leaderElection.namespace is not set
    /// (default: `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
}

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// Config files to check.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a clusterset CA: writes ca.crt and ca.key (mode 0600) into --out.
    Ca(CaArgs),
    /// Issue a gateway certificate: writes <id>.crt, <id>.key (0600) and ca.crt into --out.
    Issue(IssueArgs),
}

#[derive(Debug, Args)]
pub struct CaArgs {
    /// Clusterset name, the SPIFFE trust domain.
    #[arg(long)]
    pub clusterset: String,
    /// Directory to write into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Lifetime, e.g. 365d, 8760h.
    #[arg(long, value_parser = parse_validity, default_value = "365d")]
    pub validity: Duration,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Directory holding ca.crt and ca.key.
    #[arg(long)]
    pub ca: PathBuf,
    /// Cluster id the certificate is for.
    #[arg(long)]
    pub cluster: String,
    /// Clusterset name; default: the one the CA certificate names.
    #[arg(long)]
    pub clusterset: Option<String>,
    /// Directory to write into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Lifetime, e.g. 90d, 2160h (`m` is minutes, `M` months). Starts 5m in the past for
    /// clock skew; a certificate expired as it is issued is refused (see --allow-expired).
    #[arg(long, value_parser = parse_validity, default_value = "90d")]
    pub validity: Duration,
    #[command(flatten)]
    pub key: KeyArgs,
}

// The options `certs ca` and `certs issue` share after `--validity`. (No `///` here: clap
// would take it as the about text of the command it is flattened into.)
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[arg(long, value_enum, default_value_t = KeyType::EcdsaP256)]
    pub key_type: KeyType,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
    /// Make the certificate even if it is expired (or expires within the 5m clock-skew
    /// allowance) as it is issued, e.g. to test how peers refuse it; a warning is printed.
    #[arg(long)]
    pub allow_expired: bool,
}

impl KeyArgs {
    /// The certificate options for a certificate valid for `validity`.
    fn options(&self, validity: Duration) -> CertOptions {
        CertOptions {
            key_type: self.key_type,
            allow_expired: self.allow_expired,
            ..CertOptions::new(validity)
        }
    }
}

fn parse_validity(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    if d.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(d)
}

/// Parses the process arguments. On a usage error, prints it and returns exit code 2; for
/// `--help` / `--version`, prints them and returns 0.
pub fn parse_args() -> Result<Cli, ExitCode> {
    parse_from(std::env::args_os())
}

/// [`parse_args`] over given arguments (the first is the program name).
pub fn parse_from<I, T>(args: I) -> Result<Cli, ExitCode>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(args).map_err(|e| {
        // Printing can only fail when stdout/stderr are gone; the exit code still tells.
        let _ = e.print();
        ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { EXIT_OK })
    })
}

/// Runs a parsed command line: installs logging, then runs the command. `run_gateway` is
/// what `fedgate run` calls with the loaded config (the composition root).
pub fn main_with(cli: Cli, run_gateway: impl FnOnce(Config) -> anyhow::Result<()>) -> ExitCode {
    if let Err(e) = logging::init(cli.log_format, &cli.log_level) {
        eprintln!("fedgate: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    ExitCode::from(execute(cli.command, run_gateway, &mut std::io::stdout()))
}

/// Runs one command, writing its output to `out`; returns the exit code.
pub fn execute(
    command: Command,
    run_gateway: impl FnOnce(Config) -> anyhow::Result<()>,
    out: &mut dyn Write,
) -> u8 {
    match command {
        Command::Version => {
            let _ = writeln!(out, "fedgate {}", env!("CARGO_PKG_VERSION"));
            EXIT_OK
        }
        Command::Analyze(args) => analyze(&args.files, out),
        Command::Crdgen(args) => crate::crdgen::execute(&args, out),
        Command::Run(args) => run(&args.config, |mut cfg: Config| {
            if let Some(ip) = args.pod_ip {
                cfg.front.kube.pod_ip = Some(ip);
            }
            let le = &mut cfg.discovery.kube.leader_election;
            le.namespace = le.namespace.take().or_else(|| args.pod_namespace.clone());
            le.identity = le.identity.take().or_else(|| args.pod_name.clone()).or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
                Some(format!("{}-{}", host.trim(), std::process::id()))
            });
            run_gateway(cfg)
        }),
        Command::Demo(args) => crate::demo::execute(args, run_gateway, out),
        Command::Certs(CertsCommand::Ca(args)) => report(certs_ca(&args), out),
        Command::Certs(CertsCommand::Issue(args)) => report(certs_issue(&args), out),
        Command::Status(args) => crate::status::run_status(&args, out),
        Command::Explain(args) => crate::status::run_explain(&args, out),
    }
}

/// Prints `FILE: ok` for good files and every problem of the others; 1 if any had one.
fn analyze(files: &[PathBuf], out: &mut dyn Write) -> u8 {
    let mut code = EXIT_OK;
    for file in files {
        match config::load(file) {
            Ok(config::Loaded::Complete(_)) => {
                let _ = writeln!(out, "{}: ok", file.display());
            }
            Ok(config::Loaded::NeedsClusterId(_)) => {
                let _ = writeln!(
                    out,
                    "{}: ok (cluster.id left to the ClusterProperty {}, read by `fedgate run`)",
                    file.display(),
                    fedgate_discovery::kube::CLUSTER_ID_PROPERTY
                );
            }
            Err(errors) => {
                code = EXIT_INVALID;
                for e in errors.iter() {
                    let _ = writeln!(out, "{e}");
                }
            }
        }
    }
    code
}

/// `fedgate run`: loads the config and runs the gateway; returns the exit code.
pub(crate) fn run(path: &Path, run_gateway: impl FnOnce(Config) -> anyhow::Result<()>) -> u8 {
    let loaded = match config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors.iter() {
                eprintln!("{e}");
            }
            tracing::error!(file = %path.display(), problems = errors.len(), "invalid config, not starting");
            return EXIT_INVALID;
        }
    };
    // With the kube source the cluster id may come from the cluster's ClusterProperty.
    let config = match crate::app::resolve_cluster_id(loaded) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fedgate: {e:#}");
            tracing::error!(file = %path.display(), error = format!("{e:#}"), "cannot settle the cluster id, not starting");
            return EXIT_INVALID;
        }
    };
    let max_open_files = raise_open_file_limit();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        cluster = %config.cluster.id,
        max_open_files,
        config = %config.redacted_summary(),
        "starting fedgate"
    );
    match run_gateway(config) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gateway failed");
            EXIT_INVALID
        }
    }
}

/// Raises the soft limit on open files to the hard one, as Go's runtime and most servers do:
/// a gateway holds a descriptor per ClusterSetIP × port listener, per client connection (two
/// to a local endpoint) and per probe in flight, and a default soft limit of 1 024 is gone
/// with a few hundred services. Returns the soft limit in force (`None`: unlimited).
fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(%error, "cannot raise the open-file limit to its hard limit");
            return limit.current;
        }
        return limit.maximum;
    }
    limit.current
}

fn report(result: Result<Vec<PathBuf>, certs::CertError>, out: &mut dyn Write) -> u8 {
    match result {
        Ok(paths) => {
            for p in paths {
                let _ = writeln!(out, "wrote {}", p.display());
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("fedgate: {e}");
            EXIT_INVALID
        }
    }
}

fn certs_ca(args: &CaArgs) -> Result<Vec<PathBuf>, certs::CertError> {
    let ca = certs::create_ca(&args.clusterset, &args.key.options(args.validity))?;
    warn_if_expired("CA certificate", &ca.cert_pem);
    certs::write_ca(&args.out, &ca, args.key.force)
}

fn certs_issue(args: &IssueArgs) -> Result<Vec<PathBuf>, certs::CertError> {
    let cluster = ClusterId::new(&args.cluster)?;
    let ca = certs::read_ca(&args.ca)?;
    let opts = args.key.options(args.validity);
    let pair = certs::issue(&ca, args.clusterset.as_deref(), &cluster, &opts)?;
    warn_if_expired("certificate", &pair.cert_pem);
    certs::write_issued(&args.out, &cluster, &pair, &ca.cert_pem, args.key.force)
}

/// `--allow-expired` made it: say so on stderr.
fn warn_if_expired(what: &str, pem: &str) {
    let now = jiff::Timestamp::now();
    if let Ok(info) = certs::inspect(pem)
        && certs::expires_too_soon(info.not_after, now)
    {
        let state = if info.not_after <= now { "is already expired" } else { "expires within 5m" };
        eprintln!(
            "fedgate: warning: the {what} {state} (notAfter {}): peers will refuse it \
             (--allow-expired)",
            info.not_after
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<Cli, ExitCode>) -> Option<ExitCode> {
        r.err()
    }

    #[test]
    fn usage_errors_are_exit_2_and_help_is_0() {
        assert_eq!(code(parse_from(["fedgate", "bogus"])), Some(ExitCode::from(EXIT_USAGE)));
        assert_eq!(code(parse_from(["fedgate", "run"])), Some(ExitCode::from(EXIT_USAGE)));
        assert_eq!(code(parse_from(["fedgate", "analyze"])), Some(ExitCode::from(EXIT_USAGE)));
        assert_eq!(
            code(parse_from([
                "fedgate",
                "certs",
                "ca",
                "--clusterset",
                "d",
                "--out",
                "x",
                "--validity",
                "0s"
            ])),
            Some(ExitCode::from(EXIT_USAGE))
        );
        assert_eq!(code(parse_from(["fedgate", "--help"])), Some(ExitCode::from(EXIT_OK)));
    }

    #[test]
    fn arguments_parse() {
        let cli = parse_from([
            "fedgate",
            "--log-format",
            "json",
            "certs",
            "issue",
            "--ca",
            "pki",
            "--cluster",
            "east",
            "--out",
            "o",
        ])
        .expect("parses");
        assert_eq!(cli.log_format, LogFormat::Json);
        match cli.command {
            Command::Certs(CertsCommand::Issue(a)) => {
                assert_eq!(a.cluster, "east");
                assert_eq!(a.validity, certs::DEFAULT_CERT_VALIDITY);
                assert_eq!(a.key.key_type, KeyType::EcdsaP256);
                assert_eq!(a.clusterset, None);
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli = parse_from([
            "fedgate",
            "certs",
            "ca",
            "--clusterset",
            "demo",
            "--out",
            "o",
            "--key-type",
            "ed25519",
        ])
        .expect("parses");
        match cli.command {
            Command::Certs(CertsCommand::Ca(a)) => {
                assert_eq!(a.validity, certs::DEFAULT_CA_VALIDITY);
                assert_eq!(a.key.key_type, KeyType::Ed25519);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn version_prints_the_crate_version() {
        let mut out = Vec::new();
        let code = execute(Command::Version, |_| Ok(()), &mut out);
        assert_eq!(code, EXIT_OK);
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("fedgate {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}
