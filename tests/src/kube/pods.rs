//! Pods in the test clusters ([`KubeCluster::start_with_pods`]): kube-controller-manager,
//! kube-scheduler and one `fedgate-vnode` node (tests/kube/vnode, a virtual-kubelet provider)
//! whose pods are host processes, each in a network namespace of its own with an address from
//! the cluster's [`PodNetwork`]. See docs/testing-kube.md, "Pods".

use std::net::Ipv4Addr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{KubeCluster, kube_binary, spawn_logged};
use crate::netns::{Netns, run};
use crate::{check_output, eventually};

/// The processes a cluster with pods runs besides etcd and the apiserver, with their log files
/// (in the cluster's directory), in start order.
pub const POD_PROCESSES: [(&str, &str); 3] = [
    ("kube-controller-manager", "kube-controller-manager.log"),
    ("kube-scheduler", "kube-scheduler.log"),
    ("fedgate-vnode", "fedgate-vnode.log"),
];

/// The vnode's kubelet API port, on [`PodNetwork::gateway`].
pub const KUBELET_PORT: u16 = 10250;

/// A cluster's pod range, the bridge that joins its pods, and the nameserver they use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetwork {
    /// The range's network address (e.g. `10.101.0.0`).
    pub network: Ipv4Addr,
    pub prefix_len: u8,
    /// The `nameserver` of every pod's `/etc/resolv.conf` (default: [`gateway`](Self::gateway),
    /// where the cluster's fedgate DNS can listen, reachable from every pod).
    pub dns: Ipv4Addr,
    /// The Linux bridge in the cluster's namespace (at most 15 bytes).
    pub bridge: String,
}

impl PodNetwork {
    /// The range `cidr` (`a.b.c.d/n`, n ≤ 29), bridge `fgpods0`, DNS at the gateway.
    pub fn new(cidr: &str) -> Result<Self> {
        let (ip, len) = cidr.split_once('/').context("a pod CIDR is a.b.c.d/n")?;
        let ip: Ipv4Addr = ip.parse().with_context(|| format!("pod CIDR {cidr}"))?;
        let prefix_len: u8 = len.parse().with_context(|| format!("pod CIDR {cidr}"))?;
        if !(8..=29).contains(&prefix_len) {
            bail!("pod CIDR {cidr}: the prefix must be /8../29");
        }
        let mask = u32::MAX << (32 - prefix_len);
        let network = Ipv4Addr::from(u32::from(ip) & mask);
        let gateway = Ipv4Addr::from(u32::from(network) + 1);
        Ok(Self { network, prefix_len, dns: gateway, bridge: "fgpods0".into() })
    }

    /// `10.<100+k>.0.0/16` for `k` < 100: distinct ranges for clusters 0, 1, 2, ... (clear of
    /// `netns::Pair`'s `10.250.x.y` and the Service range `10.96.0.0/16`).
    pub fn for_cluster(k: u8) -> Self {
        assert!(k < 100, "PodNetwork::for_cluster({k}): k must be < 100");
        Self::new(&format!("10.{}.0.0/16", 100 + u16::from(k))).expect("valid CIDR")
    }

    /// The same range with another nameserver for the pods.
    pub fn with_dns(mut self, dns: Ipv4Addr) -> Self {
        self.dns = dns;
        self
    }

    /// The range's first address: on the bridge, the pods' default gateway, the node's
    /// InternalIP and the kubelet API's address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// `a.b.c.d/n`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.network, self.prefix_len)
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix_len);
        u32::from(ip) & mask == u32::from(self.network)
    }
}

/// `sysctl net.ipv4.ip_forward=1` inside `ns` (flat mode: the cluster namespace routes between
/// its pods' bridge and the link to other clusters).
pub fn enable_forwarding(ns: &Netns) -> Result<()> {
    run(ns.command("sysctl").args(["-q", "-w", "net.ipv4.ip_forward=1"])).map(drop)
}

/// Flat mode: in `ns`, routes `remote`'s pod range via `via` (the other cluster namespace's
/// address on a link between them, e.g. [`crate::netns::Pair`]'s veth). Both namespaces need
/// [`enable_forwarding`] and a route each way for pods to talk across clusters.
pub fn route_pod_range(ns: &Netns, remote: &PodNetwork, via: Ipv4Addr) -> Result<()> {
    ns.ip(&["route", "replace", &remote.cidr(), "via", &via.to_string()]).map(drop)
}

/// Flat mode between two cluster namespaces joined by a link (`a_ip` is `a`'s address on it,
/// `b_ip` `b`'s): forwarding on in both, each routes the other's pod range over the link, so
/// pods of either cluster reach the other's pod IPs directly (no NAT: the source is the pod's
/// own address). Without this ("gateway" mode, the default) no pod range is routed between
/// clusters.
pub fn connect_flat(
    (a, a_pods, a_ip): (&Netns, &PodNetwork, Ipv4Addr),
    (b, b_pods, b_ip): (&Netns, &PodNetwork, Ipv4Addr),
) -> Result<()> {
    enable_forwarding(a)?;
    enable_forwarding(b)?;
    route_pod_range(a, b_pods, b_ip)?;
    route_pod_range(b, a_pods, a_ip)
}

impl KubeCluster {
    /// Starts kube-controller-manager, kube-scheduler and the vnode; waits for the node to be
    /// Ready and for the `default` ServiceAccount.
    pub(super) fn start_pod_processes(&mut self) -> Result<()> {
        let pods = self.pods.clone().context("not a cluster with pods")?;
        let ns = self.netns.clone().context("pods need the cluster's network namespace")?;
        let dir = self.dir.path().to_path_buf();
        let kubeconfig = self.kubeconfig.display().to_string();

        let bin = kube_binary("kube-controller-manager")?;
        let kcm = &mut self.command(&bin);
        kcm.arg(format!("--kubeconfig={kubeconfig}"))
            .arg(format!(
                "--service-account-private-key-file={}",
                dir.join("service-account.key").display()
            ))
            .arg(format!("--root-ca-file={}", dir.join("ca.crt").display()))
            .arg("--use-service-account-credentials=false")
            .arg("--controllers=*")
            .arg("--leader-elect=false")
            .arg(format!("--cluster-name={}", self.name))
            // No HTTPS endpoint of its own: nothing scrapes it, and it would need delegated
            // authentication.
            .arg("--secure-port=0")
            .arg("--kube-api-qps=100")
            .arg("--kube-api-burst=200")
            .arg("--v=1");
        let child = spawn_logged(kcm, &bin, &dir.join(POD_PROCESSES[0].1))?;
        self.pod_procs.push((POD_PROCESSES[0].0, child));

        let bin = kube_binary("kube-scheduler")?;
        let sched = &mut self.command(&bin);
        sched
            .arg(format!("--kubeconfig={kubeconfig}"))
            .arg("--leader-elect=false")
            .arg("--secure-port=0")
            .arg("--v=1");
        let child = spawn_logged(sched, &bin, &dir.join(POD_PROCESSES[1].1))?;
        self.pod_procs.push((POD_PROCESSES[1].0, child));

        // nsenter --net: the vnode is in the cluster's network but the host's mount namespace,
        // so the pods' namespaces it adds (`ip netns add`) are visible to the host as well.
        let bin = kube_binary("fedgate-vnode")?;
        let vnode = &mut Command::new("nsenter");
        vnode
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(&bin)
            .arg(format!("--kubeconfig={kubeconfig}"))
            .arg(format!("--node-name={}", self.node_name()))
            .arg(format!("--pod-cidr={}", pods.cidr()))
            .arg(format!("--bridge={}", pods.bridge))
            .arg(format!("--dns={}", pods.dns))
            .arg(format!("--netns-prefix={}", self.pod_netns_prefix().unwrap_or_default()))
            .arg(format!("--state-dir={}", dir.join("pods").display()))
            .arg(format!("--tls-cert={}", dir.join("kubelet.crt").display()))
            .arg(format!("--tls-key={}", dir.join("kubelet.key").display()))
            .arg(format!("--client-ca={}", dir.join("ca.crt").display()))
            .arg(format!("--port={KUBELET_PORT}"));
        let child = spawn_logged(vnode, &bin, &dir.join(POD_PROCESSES[2].1))?;
        self.pod_procs.push((POD_PROCESSES[2].0, child));

        let node = self.node_name();
        let ready = r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#;
        self.wait_until("node Ready", |c| {
            c.kubectl(&["get", "node", &node, "-o", ready])
                .is_ok_and(|o| o.status.success() && o.stdout == b"True")
        })?;
        self.wait_until("ServiceAccount default/default", |c| {
            c.kubectl(&["get", "serviceaccount", "default", "-n", "default"])
                .is_ok_and(|o| o.status.success())
        })
    }

    /// Polls `ready` every 200 ms (each poll is a kubectl run) for at most `READY_TIMEOUT`;
    /// fails at once when a process of the cluster exits.
    fn wait_until(&mut self, what: &str, ready: impl Fn(&KubeCluster) -> bool) -> Result<()> {
        let start = Instant::now();
        loop {
            self.check_alive()?;
            if ready(self) {
                return Ok(());
            }
            if start.elapsed() > super::READY_TIMEOUT {
                bail!("timed out after {:?} waiting for {what}", super::READY_TIMEOUT);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the vnode with SIGTERM (it kills its pods' processes and deletes their namespaces;
    /// SIGKILL after 10 s), then the scheduler and controller-manager; deletes any pod
    /// namespace left, with its processes.
    pub(super) fn stop_pod_processes(&mut self) {
        let procs = std::mem::take(&mut self.pod_procs);
        for (what, mut child) in procs.into_iter().rev() {
            if what == "fedgate-vnode" {
                let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(10) {
                    if child.try_wait().ok().flatten().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(prefix) = self.pod_netns_prefix()
            && let Ok(list) = run(Command::new("ip").args(["netns", "list"]))
        {
            for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
                if name.starts_with(&prefix) {
                    drop(Netns { name: name.to_owned() });
                }
            }
        }
    }

    /// Two clusters with pods side by side (one thread each): `names[0]` with `nets[0]` in
    /// `pair.a`, `names[1]` with `nets[1]` in `pair.b`. Gateway mode: see [`connect_flat`] for
    /// flat.
    pub fn start_pair_with_pods(
        pair: &crate::netns::Pair,
        names: [&str; 2],
        nets: [PodNetwork; 2],
    ) -> Result<(KubeCluster, KubeCluster)> {
        let [na, nb] = nets;
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| KubeCluster::start_with_pods(&pair.a, names[0], na));
            let b = s.spawn(|| KubeCluster::start_with_pods(&pair.b, names[1], nb));
            (a.join(), b.join())
        });
        let a = a.map_err(|_| anyhow::anyhow!("starting {} panicked", names[0]))??;
        let b = b.map_err(|_| anyhow::anyhow!("starting {} panicked", names[1]))??;
        Ok((a, b))
    }

    /// The pod network of a cluster started with [`start_with_pods`](Self::start_with_pods).
    pub fn pod_network(&self) -> Option<&PodNetwork> {
        self.pods.as_ref()
    }

    /// The vnode's Node name: `<cluster>-node`.
    pub fn node_name(&self) -> String {
        format!("{}-node", self.name)
    }

    /// Prefix of the pods' network namespace names: `<cluster namespace>-p` (so a test
    /// process's stale namespaces, `fg-<pid>-...`, are reaped together with its pods').
    pub fn pod_netns_prefix(&self) -> Option<String> {
        self.pods.as_ref()?;
        Some(format!("{}-p", self.netns.as_deref()?))
    }

    /// Creates namespace `ns` and waits (≤ 30 s) for its `default` ServiceAccount, without which
    /// the ServiceAccount admission plugin refuses Pods.
    pub fn create_namespace(&self, ns: &str) -> Result<()> {
        self.kubectl_ok(&["create", "namespace", ns])?;
        eventually(&format!("ServiceAccount {ns}/default"), Duration::from_secs(30), || {
            Ok(self
                .kubectl(&["get", "serviceaccount", "default", "-n", ns])?
                .status
                .success()
                .then_some(()))
        })
    }

    /// Waits (≤ `timeout`) until exactly `n` pods in `ns` match `selector` and all are Running
    /// and Ready; returns them (`kubectl get -o json` items), sorted by name.
    pub fn wait_pods_ready(
        &self,
        ns: &str,
        selector: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<serde_json::Value>> {
        eventually(&format!("{n} ready pods {selector} in {ns}"), timeout, || {
            let list = self.get_json(&["pods", "-n", ns, "-l", selector])?.unwrap_or_default();
            let mut items: Vec<_> = list["items"].as_array().cloned().unwrap_or_default();
            items.retain(|p| p["metadata"]["deletionTimestamp"].is_null());
            if items.len() != n || !items.iter().all(pod_ready) {
                return Ok(None);
            }
            items.sort_by_key(|p| p["metadata"]["name"].as_str().unwrap_or_default().to_owned());
            Ok(Some(items))
        })
    }

    /// Waits (≤ `timeout`) until pod `ns/name` exists and `pred` holds for it; returns it.
    pub fn wait_pod(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let mut last = serde_json::Value::Null;
        eventually(&format!("pod {ns}/{name}: {what}"), timeout, || {
            let pod = self.get_json(&["pod", "-n", ns, name])?;
            Ok(pod.filter(|p| {
                last = p["status"].clone();
                pred(p)
            }))
        })
        .with_context(|| format!("last status: {last}"))
    }

    /// `kubectl exec -n <ns> <pod> -- <cmd>`: runs `cmd` in the pod's network namespace through
    /// the apiserver and the vnode's kubelet API; returns kubectl's output, any exit status.
    pub fn exec(&self, ns: &str, pod: &str, cmd: &[&str]) -> Result<Output> {
        let mut args = vec!["exec", "-n", ns, pod, "--"];
        args.extend_from_slice(cmd);
        self.kubectl(&args)
    }

    /// `kubectl exec -i` with `stdin` fed to the command; returns kubectl's output.
    pub fn exec_with_stdin(
        &self,
        ns: &str,
        pod: &str,
        cmd: &[&str],
        stdin: &str,
    ) -> Result<Output> {
        let mut args = vec!["exec", "-i", "-n", ns, pod, "--"];
        args.extend_from_slice(cmd);
        self.kubectl_with_stdin(&args, Some(stdin))
    }

    /// [`exec`](Self::exec) that fails unless the command exits 0; returns its stdout.
    pub fn exec_ok(&self, ns: &str, pod: &str, cmd: &[&str]) -> Result<String> {
        check_output(
            &format!("kubectl exec {ns}/{pod} -- {}", cmd.join(" ")),
            self.exec(ns, pod, cmd)?,
        )
    }

    /// `kubectl logs -n <ns> <pod>` (the first container's log, through the kubelet API).
    pub fn pod_logs(&self, ns: &str, pod: &str) -> Result<String> {
        self.kubectl_ok(&["logs", "-n", ns, pod])
    }
}

/// Whether a pod (`kubectl get -o json`) is Running with condition Ready=True.
pub fn pod_ready(pod: &serde_json::Value) -> bool {
    pod["status"]["phase"] == "Running"
        && pod["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// A pod's `status.podIP`.
pub fn pod_ip(pod: &serde_json::Value) -> Option<Ipv4Addr> {
    pod["status"]["podIP"].as_str()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_network_ranges() {
        let n = PodNetwork::new("10.101.7.9/16").unwrap();
        assert_eq!(n.network, Ipv4Addr::new(10, 101, 0, 0));
        assert_eq!(n.cidr(), "10.101.0.0/16");
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 101, 0, 1));
        assert_eq!(n.dns, n.gateway());
        assert!(n.contains(Ipv4Addr::new(10, 101, 255, 254)));
        assert!(!n.contains(Ipv4Addr::new(10, 102, 0, 2)));
        assert_eq!(PodNetwork::for_cluster(2).cidr(), "10.102.0.0/16");
        let d = Ipv4Addr::new(10, 102, 0, 53);
        assert_eq!(PodNetwork::for_cluster(2).with_dns(d).dns, d);
        for bad in ["10.0.0.0", "10.0.0.0/30", "10.0.0.0/7", "x/16"] {
            assert!(PodNetwork::new(bad).is_err(), "{bad}");
        }
    }
}
