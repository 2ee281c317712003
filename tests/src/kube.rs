//! A real Kubernetes control plane per simulated cluster: `etcd` + `kube-apiserver`, built from
//! the Go module proxy by `scripts/build-kube.sh` (wrapper module `tests/kube`, see
//! docs/testing-kube.md), driven with the real `kubectl`.
//!
//! [`KubeCluster::start`] makes everything a cluster needs in its own temporary directory — a CA
//! and the apiserver's serving certificate, a service-account signing key, a static token file
//! whose only token maps to a `system:masters` user, an etcd data directory — starts etcd and the
//! apiserver on free loopback ports, waits (bounded) for `/readyz` and writes a kubeconfig. The
//! processes are killed and the directory removed when the value drops; both logs are printed
//! when a test panics.
//!
//! [`KubeCluster::start_in`] runs both processes inside a network namespace instead (a cluster
//! of its own network, see tests/tests/kube_netns.rs): they listen on the namespace's
//! `127.0.0.1`, and `kubectl` and the harness's requests reach them through `ip netns exec`.
//!
//! Without pods (`start`, `start_in`) there is no controller-manager or scheduler: Services do
//! not get EndpointSlices by themselves (tests create them, which is what the discovery code
//! reads), namespaces are never finalized after a delete, and Pods are never scheduled.
//! [`KubeCluster::start_with_pods`] adds kube-controller-manager, kube-scheduler and a
//! `fedgate-vnode` node whose pods are host processes in network namespaces (`kube/pods.rs`).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::check_output;
use crate::netns::Netns;

mod pods;
pub use pods::{
    KUBELET_PORT, POD_PROCESSES, PodNetwork, connect_flat, enable_forwarding, pod_ip, pod_ready,
    route_pod_range,
};

/// Environment variable naming the directory holding `kube-apiserver`, `etcd`, `kubectl`, `helm`
/// (default: `~/.cache/fedgate/kube/<version>/bin`, where `scripts/build-kube.sh` builds them).
pub const BIN_DIR_ENV: &str = "FEDGATE_KUBE_BIN_DIR";

/// The Service CIDR every test cluster allocates ClusterIPs from (nothing routes it).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// How long a cluster may take to become ready. A cold start takes a few seconds; the bound is
/// generous because the tests share two cores with builds.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Bound on one readiness probe: a port taken by a stranger may accept and never answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on each read and write of [`KubeCluster::get`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a start is retried when a port picked as free was taken before etcd or the
/// apiserver bound it.
const START_ATTEMPTS: u32 = 3;

/// Ports of etcd (client, peer) and the apiserver inside a namespace of
/// [`KubeCluster::start_in`]: the namespace is the cluster's alone, so the well-known ports are
/// free there.
pub const NETNS_PORTS: [u16; 3] = [2379, 2380, 6443];

/// The name of the user the token authenticates (group `system:masters`).
pub const ADMIN_USER: &str = "fedgate-admin";

/// The wrapper module that pins the versions (`tests/kube/go.mod`).
fn go_mod_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kube").join("go.mod")
}

/// The version of a module `require`d in a go.mod text (`module vX.Y.Z`, inside or outside a
/// `require ( ... )` block).
fn required_version(go_mod: &str, module: &str) -> Option<String> {
    go_mod.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let first = words.next()?;
        let (name, version) = if first == "require" {
            (words.next()?, words.next()?)
        } else {
            (first, words.next()?)
        };
        (name == module && version.starts_with('v')).then(|| version.to_owned())
    })
}

/// The Kubernetes release the harness runs (e.g. `v1.37.2`), from `tests/kube/go.mod`.
pub fn kube_version() -> Result<String> {
    let path = go_mod_path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    required_version(&text, "k8s.io/kubernetes")
        .with_context(|| format!("{} requires no k8s.io/kubernetes version", path.display()))
}

/// Where the binaries are: `$FEDGATE_KUBE_BIN_DIR`, else the build script's cache directory.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(cache.join("fedgate").join("kube").join(kube_version()?).join("bin"))
}

/// The path of one of the built binaries; fails, saying how to build it, when it is missing.
pub fn kube_binary(name: &str) -> Result<PathBuf> {
    binary_in(&bin_dir()?, name)
}

fn binary_in(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: run scripts/build-kube.sh (builds kube-apiserver, etcd, kubectl and helm \
             with Go >= 1.26; or set {BIN_DIR_ENV} to a directory holding them)",
            path.display()
        );
    }
    Ok(path)
}

/// Runs the built `helm` (v3, from `tests/kube/helm`) with `args`; its cache, config and data
/// directories are put under `home` so tests never share or touch `~/.cache/helm`.
pub fn helm(home: &Path, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(kube_binary("helm")?);
    cmd.args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .stdin(Stdio::null());
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// Like [`helm`] but fails with its output when helm exits non-zero; returns stdout.
pub fn helm_ok(home: &Path, args: &[&str]) -> Result<String> {
    check_output(&format!("helm {}", args.join(" ")), helm(home, args)?)
}

/// `N` distinct ports on 127.0.0.1 that were free a moment ago: all are bound to port 0 at the
/// same time (so the kernel cannot hand out one twice), then released. Another process may
/// take one before ours binds it; [`KubeCluster::start`] retries on that.
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0"))
        .collect::<Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, l) in ports.iter_mut().zip(&listeners) {
        *port = l.local_addr()?.port();
    }
    Ok(ports)
}

/// The error lines (klog `E`/`F`, etcd `"level":"error"`/`"fatal"`) and the last `n` lines of
/// a log file: the whole apiserver log is long, and its fatal line is not always the last one.
fn log_summary(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let errors: Vec<&str> = lines.iter().copied().filter(|l| is_error_line(l)).collect();
    let mut out = String::new();
    if !errors.is_empty() {
        out.push_str("(error lines)\n");
        out.push_str(&errors[errors.len().saturating_sub(n)..].join("\n"));
        out.push_str("\n(last lines)\n");
    }
    out.push_str(&lines[lines.len().saturating_sub(n)..].join("\n"));
    out
}

fn is_error_line(line: &str) -> bool {
    let klog = matches!(line.as_bytes(), [b'E' | b'F', d, ..] if d.is_ascii_digit());
    klog || line.contains(r#""level":"error""#) || line.contains(r#""level":"fatal""#)
}

/// The certificates and keys of one cluster, as PEM.
struct ClusterPki {
    ca_pem: String,
    serving_cert_pem: String,
    serving_key_pem: String,
    service_account_key_pem: String,
    service_account_public_pem: String,
    /// With pods: the vnode's kubelet serving pair (for the node address) and the apiserver's
    /// kubelet client pair, both from the cluster CA.
    kubelet: Option<KubeletPki>,
}

struct KubeletPki {
    serving_cert_pem: String,
    serving_key_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl ClusterPki {
    fn new(name: &str, node_ip: Option<Ipv4Addr>) -> Result<Self> {
        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, format!("fedgate-test {name} CA"));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).context("self-signing the CA")?;

        let key = KeyPair::generate().context("generating the apiserver key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        params.key_usages =
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.subject_alt_names = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            // The first address of SERVICE_CIDR: the `kubernetes` Service's ClusterIP.
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))),
        ];
        for dns in [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ] {
            params.subject_alt_names.push(SanType::DnsName(dns.try_into()?));
        }
        let cert = params.signed_by(&key, &ca).context("signing the apiserver certificate")?;

        let sa_key = KeyPair::generate().context("generating the service-account key")?;
        let kubelet = match node_ip {
            None => None,
            Some(ip) => {
                let serving_key = KeyPair::generate()?;
                let mut params = CertificateParams::default();
                params.distinguished_name.push(DnType::CommonName, "fedgate-vnode");
                params.key_usages =
                    vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                params.subject_alt_names = vec![SanType::IpAddress(IpAddr::V4(ip))];
                let serving = params.signed_by(&serving_key, &ca)?;
                let client_key = KeyPair::generate()?;
                let mut params = CertificateParams::default();
                params.distinguished_name.push(DnType::CommonName, "kube-apiserver-kubelet-client");
                params.distinguished_name.push(DnType::OrganizationName, "system:masters");
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                let client = params.signed_by(&client_key, &ca)?;
                Some(KubeletPki {
                    serving_cert_pem: serving.pem(),
                    serving_key_pem: serving_key.serialize_pem(),
                    client_cert_pem: client.pem(),
                    client_key_pem: client_key.serialize_pem(),
                })
            }
        };
        Ok(Self {
            ca_pem: ca.pem(),
            serving_cert_pem: cert.pem(),
            serving_key_pem: key.serialize_pem(),
            service_account_key_pem: sa_key.serialize_pem(),
            service_account_public_pem: sa_key.public_key_pem(),
            kubelet,
        })
    }
}

/// A running etcd + kube-apiserver pair for one simulated cluster.
pub struct KubeCluster {
    name: String,
    // Declared before `dir` so the processes die before their directory is removed.
    etcd: Option<Child>,
    apiserver: Option<Child>,
    server_url: String,
    api_addr: SocketAddr,
    token: String,
    ca_pem: String,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    started_in: Duration,
    /// The network namespace both processes run in (`None`: the host's).
    netns: Option<String>,
    /// [`start_with_pods`](Self::start_with_pods): the pod network, and kube-controller-manager,
    /// kube-scheduler and fedgate-vnode (in that order; the vnode is stopped first).
    pods: Option<PodNetwork>,
    pod_procs: Vec<(&'static str, Child)>,
    dir: tempfile::TempDir,
}

/// A kube-apiserver stopped by [`KubeCluster::stop_apiserver`]: its command line, to start it
/// again with [`KubeCluster::start_apiserver`].
#[derive(Debug)]
pub struct StoppedApiserver {
    argv: Vec<std::ffi::OsString>,
}

/// The ServiceAccount `deploy/manifests` runs the gateway as.
pub const GATEWAY_SERVICE_ACCOUNT: &str = "system:serviceaccount:fedgate-system:fedgate";

impl KubeCluster {
    /// Starts etcd and kube-apiserver for a cluster called `name` (used in file, user and
    /// context names; any short `[a-z0-9-]` string) and waits until the apiserver is ready.
    pub fn start(name: &str) -> Result<KubeCluster> {
        Self::start_with_ports(name, free_ports::<3>)
    }

    /// Starts clusters `names` side by side (one thread each); prints how long each took.
    pub fn start_pair(names: [&'static str; 2]) -> Result<(KubeCluster, KubeCluster)> {
        let [a, b] = names.map(|n| std::thread::spawn(move || KubeCluster::start(n)));
        let a = a.join().map_err(|_| anyhow::anyhow!("start panicked"))??;
        let b = b.join().map_err(|_| anyhow::anyhow!("start panicked"))??;
        eprintln!("apiservers ready in {:?} and {:?}", a.started_in(), b.started_in());
        Ok((a, b))
    }

    /// [`start`](Self::start) with the ports chosen by `pick` — `[etcd client, etcd peer,
    /// apiserver]`, called once per attempt. For tests of the port-collision retry itself.
    pub fn start_with_ports(
        name: &str,
        pick: impl FnMut() -> Result<[u16; 3]>,
    ) -> Result<KubeCluster> {
        Self::start_impl(name, None, pick, None)
    }

    /// Starts etcd and kube-apiserver inside the network namespace `ns`, on the namespace's
    /// `127.0.0.1` ([`NETNS_PORTS`]): only processes in `ns` can reach them.
    /// [`kubectl`](Self::kubectl) and [`get`](Self::get) run through `ip netns exec`; the
    /// kubeconfig (server `https://127.0.0.1:6443`) works for any process started in `ns`.
    /// The processes also die with the namespace's guard. Needs root (and `curl` for the
    /// harness's own requests).
    pub fn start_in(ns: &Netns, name: &str) -> Result<KubeCluster> {
        Self::start_impl(name, Some(ns.name.clone()), || Ok(NETNS_PORTS), None)
    }

    /// [`start_in`](Self::start_in) plus what runs pods: the ServiceAccount admission plugin on,
    /// kube-controller-manager (all controllers: Deployments, ReplicaSets, EndpointSlices,
    /// ServiceAccounts, namespaces, garbage collection, ...), kube-scheduler, and one node,
    /// `fedgate-vnode` ([`node_name`](Self::node_name)), whose pods are host processes in
    /// network namespaces of their own with addresses from `pods` (see docs/testing-kube.md,
    /// "Pods"). The pods' bridge, holding [`PodNetwork::gateway`], lives in `ns`: pods reach
    /// `ns`'s addresses and each other, and processes in `ns` reach the pods; nothing routes
    /// the pod range elsewhere unless a test does ([`route_pod_range`]). Returns once the node
    /// is Ready and the `default` namespace has its `default` ServiceAccount.
    pub fn start_with_pods(ns: &Netns, name: &str, pods: PodNetwork) -> Result<KubeCluster> {
        let started = Instant::now();
        let mut c = Self::start_impl(name, Some(ns.name.clone()), || Ok(NETNS_PORTS), Some(pods))?;
        if let Err(e) = c.start_pod_processes() {
            let logs = c.logs(60);
            c.stop();
            bail!("starting the pod processes of kube cluster {name}: {e:#}\n{logs}");
        }
        c.started_in = started.elapsed();
        Ok(c)
    }

    fn start_impl(
        name: &str,
        netns: Option<String>,
        mut pick: impl FnMut() -> Result<[u16; 3]>,
        pods: Option<PodNetwork>,
    ) -> Result<KubeCluster> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            bail!("cluster name {name:?} must be non-empty ASCII letters, digits and '-'");
        }
        let etcd_bin = kube_binary("etcd")?;
        let apiserver_bin = kube_binary("kube-apiserver")?;
        let kubectl = kube_binary("kubectl")?;
        let started = Instant::now();

        let dir = tempfile::Builder::new()
            .prefix(&format!("fedgate-kube-{name}-"))
            .tempdir()
            .context("creating the cluster's temporary directory")?;
        let pki = ClusterPki::new(name, pods.as_ref().map(PodNetwork::gateway))?;
        let files = ClusterFiles::write(dir.path(), &pki)?;
        let token = format!("{:032x}", rand::random::<u128>());
        std::fs::write(
            &files.tokens,
            format!("{token},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n"),
        )?;

        let mut cluster = KubeCluster {
            name: name.to_owned(),
            etcd: None,
            apiserver: None,
            server_url: String::new(),
            api_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            token,
            ca_pem: pki.ca_pem,
            kubeconfig: dir.path().join("kubeconfig"),
            kubectl,
            started_in: Duration::ZERO,
            netns,
            pods,
            pod_procs: Vec::new(),
            dir,
        };
        let mut attempt = 1;
        loop {
            match cluster.launch(&etcd_bin, &apiserver_bin, &files, pick()?) {
                Ok(()) => break,
                Err(e) if attempt < START_ATTEMPTS && cluster.port_collision().is_some() => {
                    eprintln!("kube cluster {name}: a port was taken, retrying: {e:#}");
                    cluster.stop();
                    cluster.set_aside_attempt(attempt)?;
                    attempt += 1;
                }
                Err(e) => {
                    let logs = cluster.logs(80);
                    cluster.stop();
                    bail!("starting kube cluster {name}: {e:#}\n{logs}");
                }
            }
        }
        cluster.write_kubeconfig(&files.ca)?;
        cluster.started_in = started.elapsed();
        Ok(cluster)
    }

    /// One try at starting etcd, then the apiserver, on freshly picked ports.
    fn launch(
        &mut self,
        etcd_bin: &Path,
        apiserver_bin: &Path,
        files: &ClusterFiles,
        [client_port, peer_port, api_port]: [u16; 3],
    ) -> Result<()> {
        let etcd_client = SocketAddr::from((Ipv4Addr::LOCALHOST, client_port));
        let etcd_peer = SocketAddr::from((Ipv4Addr::LOCALHOST, peer_port));
        let api = SocketAddr::from((Ipv4Addr::LOCALHOST, api_port));
        let dir = self.dir.path().to_path_buf();
        let etcd_url = format!("http://{etcd_client}");
        let peer_url = format!("http://{etcd_peer}");

        let etcd = &mut self.command(etcd_bin);
        etcd.arg(format!("--name={}", self.name))
            // etcd makes the directory itself (0700) and refuses one with wider permissions.
            .arg(format!("--data-dir={}", dir.join("etcd-data").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={}={peer_url}", self.name))
            .arg("--initial-cluster-state=new")
            // Test data is thrown away: no fsync makes writes (and start-up) much faster.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let etcd = spawn_logged(etcd, etcd_bin, &dir.join("etcd.log"))?;
        self.etcd = Some(etcd);
        let netns = self.netns.clone();
        self.wait_ready("etcd /health", || {
            let health = match &netns {
                None => http_get(etcd_client, "/health", PROBE_TIMEOUT),
                Some(ns) => curl_in(ns, &format!("{etcd_url}/health"), None, "", PROBE_TIMEOUT),
            };
            health.is_ok_and(|(code, body)| code == 200 && body.contains("true"))
        })?;

        let apiserver = &mut self.command(apiserver_bin);
        apiserver
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg(format!("--secure-port={}", api.port()))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--cert-dir={}", dir.display()))
            .arg(format!("--tls-cert-file={}", files.serving_cert.display()))
            .arg(format!("--tls-private-key-file={}", files.serving_key.display()))
            .arg(format!("--client-ca-file={}", files.ca.display()))
            .arg(format!("--token-auth-file={}", files.tokens.display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            // Verification keys: the apiserver reads public keys (PKIX) from this file.
            .arg(format!("--service-account-key-file={}", files.service_account_public.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                files.service_account_key.display()
            ))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"));
        if self.pods.is_some() {
            // The vnode's kubelet API (logs, exec): reached at the node's InternalIP with a
            // client certificate from the cluster CA, its serving certificate verified.
            apiserver
                .arg(format!(
                    "--kubelet-client-certificate={}",
                    files.kubelet_client_cert.display()
                ))
                .arg(format!("--kubelet-client-key={}", files.kubelet_client_key.display()))
                .arg(format!("--kubelet-certificate-authority={}", files.ca.display()))
                .arg("--kubelet-preferred-address-types=InternalIP");
        } else {
            // No controller-manager creates the `default` ServiceAccount, so the ServiceAccount
            // admission plugin would refuse every Pod.
            apiserver.arg("--disable-admission-plugins=ServiceAccount");
        }
        apiserver
            // Start-up: API priority and fairness bootstraps its own objects and controllers,
            // which one test client does not need.
            .arg("--enable-priority-and-fairness=false")
            .arg("--profiling=false")
            // The endpoint reconciler refuses a loopback advertise address; without it the
            // `kubernetes` Service simply has no endpoints.
            .arg("--endpoint-reconciler-type=none")
            .arg("--v=1");
        let apiserver = spawn_logged(apiserver, apiserver_bin, &dir.join("kube-apiserver.log"))?;
        self.apiserver = Some(apiserver);
        self.api_addr = api;
        self.server_url = format!("https://{api}");
        let target = self.api_target();
        self.wait_ready("kube-apiserver /readyz", || {
            target.get("/readyz", "", PROBE_TIMEOUT).is_ok_and(|(code, _)| code == 200)
        })
    }

    /// `program` as a command: run directly, or through `ip netns exec` (which execs it, so
    /// the child's pid is the program's own and killing the child kills it).
    fn command(&self, program: &Path) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
        }
    }

    /// How the harness reaches the apiserver: directly, or with curl inside the namespace.
    fn api_target(&self) -> ApiTarget {
        ApiTarget {
            addr: self.api_addr,
            ca_pem: self.ca_pem.clone(),
            ca_file: self.dir.path().join("ca.crt"),
            netns: self.netns.clone(),
        }
    }

    /// Polls `ready` every 50 ms for at most [`READY_TIMEOUT`]; fails at once when etcd or the
    /// apiserver exits (the crate's `eventually` would retry that until the timeout).
    fn wait_ready(&mut self, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
        let start = Instant::now();
        loop {
            self.check_alive()?;
            if ready() {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!("timed out after {READY_TIMEOUT:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails when etcd, the apiserver or one of the pod processes has exited.
    fn check_alive(&mut self) -> Result<()> {
        for (what, child) in [("etcd", &mut self.etcd), ("kube-apiserver", &mut self.apiserver)] {
            if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("{what} exited with {status}");
            }
        }
        for (what, child) in &mut self.pod_procs {
            if let Some(status) = child.try_wait().ok().flatten() {
                bail!("{what} exited with {status}");
            }
        }
        Ok(())
    }

    /// After a failed attempt: keeps its logs as `<log>.<attempt>` and drops etcd's data, whose
    /// stored member address names the old peer port.
    fn set_aside_attempt(&self, attempt: u32) -> Result<()> {
        let dir = self.dir.path();
        for f in ["etcd.log", "kube-apiserver.log"] {
            let path = dir.join(f);
            if path.exists() {
                std::fs::rename(&path, dir.join(format!("{f}.{attempt}")))
                    .with_context(|| format!("renaming {}", path.display()))?;
            }
        }
        let data = dir.join("etcd-data");
        if data.exists() {
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("removing {}", data.display()))?;
        }
        Ok(())
    }

    /// Whether a log says a port was taken (the start is then retried on other ports).
    fn port_collision(&self) -> Option<String> {
        ["etcd.log", "kube-apiserver.log"].iter().find_map(|f| {
            let text = std::fs::read_to_string(self.dir.path().join(f)).ok()?;
            let line = text.lines().find(|l| l.contains("address already in use"))?;
            Some(line.chars().take(300).collect())
        })
    }

    fn write_kubeconfig(&self, ca: &Path) -> Result<()> {
        let name = &self.name;
        let yaml = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: {name}\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
             users:\n- name: {ADMIN_USER}\n  user:\n    token: {token}\n\
             contexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {ADMIN_USER}\n\
             current-context: {name}\n",
            server = self.server_url,
            ca = ca.display(),
            token = self.token,
        );
        std::fs::write(&self.kubeconfig, yaml)
            .with_context(|| format!("writing {}", self.kubeconfig.display()))
    }

    /// The cluster's name as given to [`start`](Self::start) (also the kubeconfig context).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kubectl binary the harness runs.
    pub fn kubectl_path(&self) -> &Path {
        &self.kubectl
    }

    /// A kubeconfig (server, CA file, token) for this cluster.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>` (for [`start_in`](Self::start_in): inside the namespace).
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The bearer token of a `system:masters` user.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The CA certificate (PEM) that signed the apiserver's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The cluster's temporary directory (logs, certificates, kubeconfig).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The network namespace the cluster runs in ([`start_in`](Self::start_in)), if any.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// How long [`start`](Self::start) took, from key generation to a ready apiserver.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// Runs the real `kubectl --kubeconfig <this cluster> <args>` and returns its output,
    /// whatever its exit status.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_with_stdin(args, None)
    }

    /// Like [`kubectl`](Self::kubectl) but fails with stderr when kubectl exits non-zero;
    /// returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        check_output(&format!("kubectl {}", args.join(" ")), self.kubectl(args)?)
    }

    /// `kubectl get <args> -o json`: the object (or list), `None` when it does not exist.
    pub fn get_json(&self, args: &[&str]) -> Result<Option<serde_json::Value>> {
        let mut full = vec!["get"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["-o", "json", "--ignore-not-found"]);
        let out = self.kubectl_ok(&full)?;
        if out.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(&out).with_context(|| format!("kubectl {full:?}: {out}"))?))
    }

    /// Prepares the cluster for a gateway as `deploy/` installs one: applies the CRDs (waits
    /// until they are established), the namespace, ServiceAccount and RBAC, and writes a
    /// kubeconfig that acts as that ServiceAccount ([`GATEWAY_SERVICE_ACCOUNT`]), so a gateway
    /// started with it gets exactly the RBAC of `deploy/manifests`. Returns its path.
    pub fn prepare_for_gateway(&self) -> Result<PathBuf> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let crds = repo.join("deploy/crds");
        self.kubectl_ok(&["apply", "--server-side", "-f", &crds.to_string_lossy()])?;
        self.kubectl_ok(&["wait", "--for=condition=Established", "--timeout=30s", "crd", "--all"])?;
        for f in ["00-namespace.yaml", "01-serviceaccount.yaml", "02-rbac.yaml"] {
            let path = repo.join("deploy/manifests").join(f);
            self.kubectl_ok(&["apply", "-f", &path.to_string_lossy()])?;
        }
        let admin = std::fs::read_to_string(self.kubeconfig_path())?;
        let token_line = format!("    token: {}\n", self.token());
        if !admin.contains(&token_line) {
            bail!("unexpected kubeconfig layout:\n{admin}");
        }
        let as_sa =
            admin.replace(&token_line, &format!("{token_line}    as: {GATEWAY_SERVICE_ACCOUNT}\n"));
        let path = self.dir().join("kubeconfig-fedgate-sa");
        std::fs::write(&path, as_sa)?;
        Ok(path)
    }

    /// `kubectl apply -f -` with `yaml` on stdin; returns kubectl's stdout.
    pub fn apply_yaml(&self, yaml: &str) -> Result<String> {
        let out = self.kubectl_with_stdin(&["apply", "-f", "-"], Some(yaml))?;
        check_output("kubectl apply", out)
    }

    /// Applies a v1beta1 ServiceExport of `ns/name`; returns kubectl's stdout.
    pub fn export(&self, ns: &str, name: &str) -> Result<String> {
        self.apply_yaml(&format!(
            "apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceExport\nmetadata: {{ name: {name}, namespace: {ns} }}\n"
        ))
    }

    /// `kubectl create -f -` with `yaml` on stdin (fails if an object exists); returns stdout.
    pub fn create_yaml(&self, yaml: &str) -> Result<String> {
        let out = self.kubectl_with_stdin(&["create", "-f", "-"], Some(yaml))?;
        check_output("kubectl create", out)
    }

    fn kubectl_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut cmd = self.command(&self.kubectl);
        // Own discovery cache: the default (~/.kube/cache, keyed by host:port) would be shared
        // with earlier clusters that had the same port and other CRDs.
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"))
            .arg("--request-timeout=30s")
            .args(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().context("kubectl stdin")?;
            pipe.write_all(text.as_bytes()).context("writing to kubectl's stdin")?;
        }
        child.wait_with_output().with_context(|| format!("waiting for {cmd:?}"))
    }

    /// An HTTPS GET on the apiserver with this cluster's token; returns (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        self.get_with_token(path, &self.token)
    }

    /// An HTTPS GET on the apiserver with any bearer token (empty: none), verifying the
    /// serving certificate against [`ca_pem`](Self::ca_pem); returns (status, body).
    pub fn get_with_token(&self, path: &str, token: &str) -> Result<(u16, String)> {
        self.api_target().get(path, token, REQUEST_TIMEOUT)
    }

    /// The logs of etcd and the apiserver, and with pods of kube-controller-manager,
    /// kube-scheduler and fedgate-vnode (last `lines` lines of each).
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        let mut files = vec!["etcd.log", "kube-apiserver.log"];
        if self.pods.is_some() {
            files.extend(POD_PROCESSES.iter().map(|p| p.1));
        }
        for f in files {
            let path = self.dir.path().join(f);
            out.push_str(&format!(
                "--- {} of cluster {} ({}) ---\n{}\n",
                f,
                self.name,
                path.display(),
                log_summary(&path, lines)
            ));
        }
        out
    }

    /// Kills the kube-apiserver (SIGKILL, as a crash or a node loss would; etcd and every
    /// stored object stay) and returns what [`start_apiserver`](Self::start_apiserver) needs
    /// to start it again: its own command line, read from `/proc` before the kill.
    pub fn stop_apiserver(&mut self) -> Result<StoppedApiserver> {
        let mut child = self.apiserver.take().context("the kube-apiserver is not running")?;
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.id()))
            .context("reading the kube-apiserver's command line");
        let _ = child.kill();
        let _ = child.wait();
        let argv = cmdline?
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| std::ffi::OsString::from_vec(a.to_vec()))
            .collect();
        Ok(StoppedApiserver { argv })
    }

    /// Starts a kube-apiserver stopped by [`stop_apiserver`](Self::stop_apiserver) again, with
    /// the same arguments (port, etcd, certificates: clients reconnect to the same URL), and
    /// waits (bounded) until it is ready. Returns how long that took.
    pub fn start_apiserver(&mut self, stopped: StoppedApiserver) -> Result<Duration> {
        if self.apiserver.is_some() {
            bail!("the kube-apiserver of {} is already running", self.name);
        }
        let started = Instant::now();
        let (program, args) = stopped.argv.split_first().context("an empty command line")?;
        let log = self.dir.path().join("kube-apiserver.log");
        let program = Path::new(program);
        let child = spawn_logged(self.command(program).args(args), program, &log)?;
        self.apiserver = Some(child);
        let target = self.api_target();
        self.wait_ready("kube-apiserver /readyz after a restart", || {
            target.get("/readyz", "", PROBE_TIMEOUT).is_ok_and(|(code, _)| code == 200)
        })?;
        Ok(started.elapsed())
    }

    fn stop(&mut self) {
        self.stop_pod_processes();
        for child in [self.apiserver.take(), self.etcd.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        // etcd and the apiserver do not fork, so killing the two children is killing them; the
        // vnode is stopped with SIGTERM first (it kills its pods and removes their namespaces),
        // and any pod namespace left is deleted with its processes (`stop_pod_processes`).
        // They stay in the test's process group so that a Ctrl-C in a terminal reaches them too.
        self.stop();
        if std::thread::panicking() {
            eprintln!("{}", self.logs(80));
        }
    }
}

/// The ServiceImport resource, fully qualified for `kubectl get`.
pub const IMPORTS: &str = "serviceimports.v1beta1.multicluster.x-k8s.io";
/// The ServiceExport resource, fully qualified for `kubectl get`.
pub const EXPORTS: &str = "serviceexports.v1beta1.multicluster.x-k8s.io";
/// The label selector of the EndpointSlices fedgate writes.
pub const SLICE_SELECTOR: &str = "endpointslice.kubernetes.io/managed-by=gateway.fedgate.io";

/// `metadata.uid` of a Kubernetes object ("" when it has none).
pub fn uid(v: &serde_json::Value) -> String {
    v["metadata"]["uid"].as_str().unwrap_or_default().to_owned()
}

/// The EndpointSlices fedgate wrote in `c` for the import of `ns/name` (label-selected).
pub fn imported_slices(c: &KubeCluster, ns: &str, name: &str) -> Result<Vec<serde_json::Value>> {
    let sel = format!("multicluster.kubernetes.io/service-name={name},{SLICE_SELECTOR}");
    let list = c.get_json(&["endpointslices", "-n", ns, "-l", &sel])?.unwrap_or_default();
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

/// `spec.holderIdentity` of the Lease `ns/name` (`None`: no Lease, or nobody holds it).
pub fn lease_holder(c: &KubeCluster, ns: &str, name: &str) -> Result<Option<String>> {
    let lease = c.get_json(&["leases.coordination.k8s.io", "-n", ns, name])?;
    Ok(lease.and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned)))
}

/// The namespace of deploy/manifests, where the ServiceAccount may hold the leader Lease
/// (what `POD_NAMESPACE` says in a pod).
pub const GATEWAY_NAMESPACE: &str = "fedgate-system";

/// The name a test gateway holds the leader Lease under: stable across its restarts (as a
/// pod's `POD_NAME` across container restarts), so a restarted gateway leads again at once
/// instead of waiting for its old claim to expire.
pub fn lease_identity(g: &crate::Gateway) -> String {
    format!("{}-{}", g.spec.id, g.spec.admin.to_string().replace(['.', ':'], "-"))
}

/// Turns the file-source config [`Gateway::prepare`](crate::Gateway::prepare) wrote for `g`
/// into a kube-source one reading the cluster through `kubeconfig`, electing its writer with
/// a Lease in [`GATEWAY_NAMESPACE`] under [`lease_identity`] (the rest of the config is
/// unchanged).
pub fn use_kube_source(g: &crate::Gateway, kubeconfig: &Path) -> Result<()> {
    let path = g.config_path();
    let text = std::fs::read_to_string(&path)?;
    let file = format!("source: file\n  file: {{ dir: {} }}", g.cluster_dir.display());
    if !text.contains(&file) {
        bail!("unexpected gateway config layout in {}:\n{text}", path.display());
    }
    let kube = format!(
        "source: kube\n  kube: {{ kubeconfig: {}, leaderElection: {{ namespace: {GATEWAY_NAMESPACE}, identity: {} }} }}",
        kubeconfig.display(),
        lease_identity(g)
    );
    std::fs::write(&path, text.replace(&file, &kube))
        .with_context(|| format!("writing {}", path.display()))
}

/// Where the apiserver is and how to reach it.
struct ApiTarget {
    addr: SocketAddr,
    ca_pem: String,
    ca_file: PathBuf,
    netns: Option<String>,
}

impl ApiTarget {
    /// An HTTPS GET verified against the cluster CA: in-process from the host, or with
    /// `curl` inside the cluster's namespace.
    fn get(&self, path: &str, token: &str, timeout: Duration) -> Result<(u16, String)> {
        match &self.netns {
            None => https_get(self.addr, &self.ca_pem, path, token, timeout),
            Some(ns) => {
                let url = format!("https://{}{path}", self.addr);
                curl_in(ns, &url, Some(&self.ca_file), token, timeout)
            }
        }
    }
}

/// A GET with `curl` inside namespace `ns` (HTTPS verified against `ca` when given, with a
/// bearer `token` unless empty); returns (status, body). A failed connection is an error.
fn curl_in(
    ns: &str,
    url: &str,
    ca: Option<&Path>,
    token: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "curl", "-sS", "-m"])
        .arg(format!("{:.1}", timeout.as_secs_f64()))
        .args(["-w", "\n%{http_code}"]);
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    if !token.is_empty() {
        cmd.arg("-H").arg(format!("Authorization: Bearer {token}"));
    }
    cmd.arg(url).stdin(Stdio::null());
    let out = check_output(&format!("curl {url} in netns {ns}"), cmd.output()?)?;
    curl_status_and_body(&out).with_context(|| format!("curl {url} in netns {ns}: {out:?}"))
}

/// (status, body) from what `curl -w '\n%{http_code}'` printed: the body, a newline, the code.
fn curl_status_and_body(out: &str) -> Result<(u16, String)> {
    let (body, code) = out.rsplit_once('\n').context("no status line")?;
    let code = code.trim().parse().with_context(|| format!("status line {code:?}"))?;
    Ok((code, body.to_owned()))
}

/// The files one cluster's processes read.
struct ClusterFiles {
    ca: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    service_account_key: PathBuf,
    service_account_public: PathBuf,
    tokens: PathBuf,
    /// Written only for a cluster with pods.
    kubelet_serving_cert: PathBuf,
    kubelet_serving_key: PathBuf,
    kubelet_client_cert: PathBuf,
    kubelet_client_key: PathBuf,
}

impl ClusterFiles {
    fn write(dir: &Path, pki: &ClusterPki) -> Result<Self> {
        let files = Self {
            ca: dir.join("ca.crt"),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            service_account_key: dir.join("service-account.key"),
            service_account_public: dir.join("service-account.pub"),
            tokens: dir.join("tokens.csv"),
            kubelet_serving_cert: dir.join("kubelet.crt"),
            kubelet_serving_key: dir.join("kubelet.key"),
            kubelet_client_cert: dir.join("apiserver-kubelet-client.crt"),
            kubelet_client_key: dir.join("apiserver-kubelet-client.key"),
        };
        for (path, pem) in [
            (&files.ca, &pki.ca_pem),
            (&files.serving_cert, &pki.serving_cert_pem),
            (&files.serving_key, &pki.serving_key_pem),
            (&files.service_account_key, &pki.service_account_key_pem),
            (&files.service_account_public, &pki.service_account_public_pem),
        ] {
            std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(k) = &pki.kubelet {
            for (path, pem) in [
                (&files.kubelet_serving_cert, &k.serving_cert_pem),
                (&files.kubelet_serving_key, &k.serving_key_pem),
                (&files.kubelet_client_cert, &k.client_cert_pem),
                (&files.kubelet_client_key, &k.client_key_pem),
            ] {
                std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Ok(files)
    }
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Spawns `cmd` (running `bin`) with stdin closed and its output appended to `log`.
fn spawn_logged(cmd: &mut Command, bin: &Path, log: &Path) -> Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(log_file(log)?)
        .stderr(log_file(log)?)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))
}

/// A one-shot HTTP/1.1 GET over TLS (rustls, ring) trusting only `ca_pem`.
fn https_get(
    addr: SocketAddr,
    ca_pem: &str,
    path: &str,
    token: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("parsing the CA PEM")?).context("adding the CA")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(config), ServerName::from(addr.ip()))
        .context("TLS client")?;
    let sock = connect(addr, timeout)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let auth =
        if token.is_empty() { String::new() } else { format!("Authorization: Bearer {token}\r\n") };
    write!(tls, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
        .with_context(|| format!("GET {path} on {addr}"))?;
    let mut buf = Vec::new();
    match tls.read_to_end(&mut buf) {
        Ok(_) => {}
        // A peer that closes without close_notify after a complete response is fine here.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
        Err(e) => return Err(e).with_context(|| format!("reading GET {path} from {addr}")),
    }
    parse_response(&String::from_utf8_lossy(&buf))
        .with_context(|| format!("GET {path} on {addr}: malformed HTTP response"))
}

/// A connection with `timeout` on connect, each read and each write.
fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let sock = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    Ok(sock)
}

/// A one-shot plain HTTP/1.1 GET (etcd's client URL); returns (status, body).
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut sock = connect(addr, timeout)?;
    write!(sock, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .with_context(|| format!("GET {path} on {addr}"))?;
    let mut buf = Vec::new();
    sock.read_to_end(&mut buf).with_context(|| format!("reading GET {path} from {addr}"))?;
    parse_response(&String::from_utf8_lossy(&buf))
        .with_context(|| format!("GET {path} on {addr}: malformed HTTP response"))
}

/// (status, body) of an HTTP/1.1 response; a chunked body is de-chunked.
fn parse_response(text: &str) -> Option<(u16, String)> {
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    if !chunked {
        return Some((status, body.to_owned()));
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size_line, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some((status, out));
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_version_reads_go_mod_forms() {
        let go_mod = "module x\n\ngo 1.26.0\n\nrequire (\n\tgo.etcd.io/etcd/server/v3 v3.7.3\n\t\
                      k8s.io/kubernetes v1.37.2\n)\n\nrequire k8s.io/api v0.37.2 // indirect\n\
                      replace (\n\tk8s.io/api => k8s.io/api v0.37.2\n)\n";
        let cases = [
            ("k8s.io/kubernetes", Some("v1.37.2")),
            ("go.etcd.io/etcd/server/v3", Some("v3.7.3")),
            ("k8s.io/api", Some("v0.37.2")),
            ("k8s.io/client-go", None),
            ("module", None),
        ];
        for (module, want) in cases {
            assert_eq!(required_version(go_mod, module).as_deref(), want, "{module}");
        }
    }

    #[test]
    fn the_wrapper_module_pins_a_kubernetes_release() {
        let v = kube_version().expect("tests/kube/go.mod names a version");
        assert!(v.starts_with("v1."), "{v}");
    }

    #[test]
    fn error_lines_of_klog_and_etcd() {
        let cases = [
            ("E1126 02:28:27.220758   22039 run.go:72] \"command failed\"", true),
            ("F1126 02:28:27.220758   22039 server.go:1] fatal", true),
            ("I1126 02:28:27.132117   22039 options.go:261] external host", false),
            ("Error: something", false),
            (r#"{"level":"error","msg":"x"}"#, true),
            (r#"{"level":"warn","msg":"x"}"#, false),
            ("", false),
        ];
        for (line, want) in cases {
            assert_eq!(is_error_line(line), want, "{line}");
        }
    }

    #[test]
    fn parse_response_plain_and_chunked() {
        let cases = [
            ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", Some((200, "ok"))),
            ("HTTP/1.1 401 Unauthorized\r\n\r\n{}", Some((401, "{}"))),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
                Some((200, "abcde")),
            ),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", None),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", None),
            ("garbage", None),
            ("HTTP/1.1 abc\r\n\r\n", None),
        ];
        for (text, want) in cases {
            let got = parse_response(text);
            assert_eq!(got.as_ref().map(|(c, b)| (*c, b.as_str())), want, "{text:?}");
        }
    }

    #[test]
    fn curl_output_splits_into_status_and_body() {
        let cases = [
            ("ok\n200", Some((200, "ok"))),
            ("{\"a\":1}\nline two\n401", Some((401, "{\"a\":1}\nline two"))),
            ("\n403", Some((403, ""))),
            ("no status", None),
            ("body\nabc", None),
            ("", None),
        ];
        for (out, want) in cases {
            let got = curl_status_and_body(out).ok();
            assert_eq!(got.as_ref().map(|(c, b)| (*c, b.as_str())), want, "{out:?}");
        }
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = binary_in(dir.path(), "kube-apiserver").expect_err("no binary there");
        let msg = err.to_string();
        assert!(msg.contains("run scripts/build-kube.sh"), "{msg}");
        assert!(msg.contains(BIN_DIR_ENV), "{msg}");
        std::fs::write(dir.path().join("etcd"), "").expect("writing a file");
        assert_eq!(binary_in(dir.path(), "etcd").expect("present"), dir.path().join("etcd"));
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports::<3>().expect("free ports");
        assert!(ports.iter().all(|p| *p != 0), "{ports:?}");
        assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2], "{ports:?}");
    }

    #[test]
    fn start_refuses_bad_names() {
        for name in ["", "a b", "a/b", "ä"] {
            let err = KubeCluster::start(name).err().expect("refused");
            assert!(err.to_string().contains("cluster name"), "{name:?}: {err}");
        }
    }
}
