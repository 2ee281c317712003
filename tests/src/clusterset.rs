//! A clusterset of N Kubernetes clusters on one machine, each in a network namespace of its
//! own with its control plane, its pod network and its fedgate gateway, joined by one
//! "underlay" network (docs/testing-kube.md, "A clusterset of network namespaces"). The MCS
//! end-to-end tests and the lab (`fedgate-lab`) build on it.
//!
//! Layout, for cluster `k` (0-based) of a set numbered `n`:
//!
//! - namespace `fg-<pid>-cs<n>-<k>`: etcd and kube-apiserver on its `127.0.0.1`; with
//!   [`Options::pods`], kube-controller-manager, kube-scheduler and a `fedgate-vnode` node
//!   whose pods are processes in network namespaces of their own on the pod bridge
//!   ([`KubeCluster::start_with_pods`], [`PodNetwork::for_cluster`]`(k)`: `10.<100 + k>.0.0/16`,
//!   the bridge holding its first address, the pods' default gateway and resolver); the
//!   gateway (tunnel on the underlay address `:15443`, DNS on the pod bridge's address `:53`,
//!   admin on `127.0.0.1:15000`, ClusterSetIPs from [`VIP_RANGE`], routed to `lo` so that pods
//!   reach them); IP forwarding on;
//! - namespace `fg-<pid>-cs<n>-u`: the underlay, a bridge joining one veth per cluster
//!   (`10.252.<n>.<k + 1>/24` on the cluster's `eth0`).
//!
//! Network modes ([`Network`]): in `Gateway` mode nothing routes one cluster's pod range to
//! another: only the gateways' tunnel ports are reachable between clusters (as between clusters
//! of different networks). In `Flat` mode every cluster routes the others' pod ranges over the
//! underlay, so pods reach each other's addresses directly, and the gateways run with
//! `traffic.network: flat`.
//!
//! Everything is torn down when the [`ClusterSet`] drops: gateways, control planes, then the
//! namespaces with every process left in them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};

use crate::Pki;
use crate::kube::{KubeCluster, use_kube_source};
use crate::kube::{PodNetwork, enable_forwarding, route_pod_range};
use crate::netns::{Netns, NsGateway, ns_spec, reap_stale_namespaces, require_tools};

/// ClusterSetIPs of every cluster's gateway (each cluster's own copy, inside its namespace;
/// outside the Service CIDR 10.96.0.0/16 and every pod range).
pub const VIP_RANGE: &str = "10.99.0.0/24";
/// The tunnel port of every gateway, on its underlay address.
pub const TUNNEL_PORT: u16 = 15443;
/// How long the gateways may take to connect to each other once started.
const PEERS_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// How the clusters' pod networks relate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// Pod ranges are not routed between clusters; traffic crosses through the gateways.
    Gateway,
    /// Pod ranges are routed between clusters over the underlay.
    Flat,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::Gateway => "gateway",
            Network::Flat => "flat",
        }
    }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct Options {
    /// Cluster ids, in order (at most 99).
    pub names: Vec<String>,
    pub clusterset: String,
    pub network: Network,
    /// Extra YAML appended to every gateway's config (in flat mode without a `traffic:`
    /// block: the set adds one).
    pub gateway_extra: String,
    /// Whether each cluster runs pods: kube-controller-manager, kube-scheduler and a node
    /// (`fedgate-vnode`) whose pods are processes in network namespaces on the pod bridge.
    pub pods: bool,
}

/// One cluster of the set. Fields drop in order: gateway, control plane, then the namespace.
pub struct Member {
    pub name: String,
    pub index: usize,
    /// Its address on the underlay (the gateway's tunnel address).
    pub underlay_ip: Ipv4Addr,
    /// Its gateway, in `ns` ([`ClusterSet::start`] starts them all).
    pub gateway: NsGateway,
    pub kube: KubeCluster,
    /// The kubeconfig the gateway uses (its ServiceAccount's RBAC).
    pub gateway_kubeconfig: PathBuf,
    pub ns: Netns,
}

impl Member {
    /// The cluster's pod range, bridge and pods' resolver.
    pub fn pods(&self) -> PodNetwork {
        PodNetwork::for_cluster(self.index as u8)
    }

    pub fn pod_cidr(&self) -> String {
        self.pods().cidr()
    }

    /// The address pods resolve names at: the gateway's DNS.
    pub fn dns(&self) -> SocketAddr {
        SocketAddr::from((self.pods().dns, 53))
    }
}

/// N clusters joined by an underlay; see the module docs.
pub struct ClusterSet {
    pub members: Vec<Member>,
    pub network: Network,
    /// Held for its guard: the underlay namespace goes with the set.
    _underlay: Netns,
    /// Held for its guard: certificates and gateway configs.
    _tmp: tempfile::TempDir,
}

impl ClusterSet {
    /// Builds the namespaces and networks, starts every control plane (in parallel), prepares
    /// them for a gateway (deploy/'s CRDs and RBAC) and starts every gateway.
    pub fn start(opts: &Options) -> Result<Self> {
        require_tools();
        if opts.names.is_empty() || opts.names.len() > 99 {
            bail!("a clusterset needs 1 to 99 clusters, not {}", opts.names.len());
        }
        reap_stale_namespaces();
        let started = Instant::now();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let number = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let subnet = ((pid.wrapping_add(number)) % 250) as u8;
        let underlay = Netns::create(&format!("fg-{pid}-cs{number}-u"))?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&["link", "set", "br0", "up"])?;

        let mut nets = Vec::new();
        for (k, name) in opts.names.iter().enumerate() {
            let ns = Netns::create(&format!("fg-{pid}-cs{number}-{k}"))?;
            let underlay_ip = Ipv4Addr::new(10, 252, subnet, k as u8 + 1);
            let port = format!("u{k}");
            crate::netns::run(std::process::Command::new("ip").args([
                "link",
                "add",
                &port,
                "netns",
                &underlay.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns.name,
            ]))?;
            underlay.ip(&["link", "set", &port, "master", "br0"])?;
            underlay.ip(&["link", "set", &port, "up"])?;
            ns.ip(&["addr", "add", &format!("{underlay_ip}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["route", "add", "local", VIP_RANGE, "dev", "lo"])?;
            enable_forwarding(&ns)?;
            nets.push((name.clone(), ns, underlay_ip));
        }
        if opts.network == Network::Flat {
            for (k, (_, ns, _)) in nets.iter().enumerate() {
                for (j, (_, _, via)) in nets.iter().enumerate().filter(|(j, _)| *j != k) {
                    route_pod_range(ns, &PodNetwork::for_cluster(j as u8), *via)?;
                }
            }
        }

        // Control planes in parallel: each takes a few seconds, mostly waiting.
        let planes: Vec<Result<(KubeCluster, PathBuf)>> = std::thread::scope(|s| {
            let handles: Vec<_> = nets
                .iter()
                .enumerate()
                .map(|(k, (name, ns, _))| {
                    let pods = opts.pods;
                    s.spawn(move || {
                        let net = PodNetwork::for_cluster(k as u8);
                        let cluster = if pods {
                            KubeCluster::start_with_pods(ns, name, net)?
                        } else {
                            // No node: the bridge only gives the gateway's DNS its address.
                            let cluster = KubeCluster::start_in(ns, name)?;
                            ns.ip(&["link", "add", &net.bridge, "type", "bridge"])?;
                            let gateway = format!("{}/{}", net.gateway(), net.prefix_len);
                            ns.ip(&["addr", "add", &gateway, "dev", &net.bridge])?;
                            ns.ip(&["link", "set", &net.bridge, "up"])?;
                            cluster
                        };
                        let kc = cluster.prepare_for_gateway()?;
                        Ok((cluster, kc))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a control plane panicked"))))
                .collect()
        });

        let tmp = tempfile::tempdir()?;
        let pki = Pki::new(tmp.path(), "ca", &opts.clusterset)?;
        let peers: Vec<(String, Ipv4Addr)> =
            nets.iter().map(|(name, _, ip)| (name.clone(), *ip)).collect();
        let mut members = Vec::new();
        for ((k, (name, ns, underlay_ip)), plane) in nets.into_iter().enumerate().zip(planes) {
            let (kube, gateway_kubeconfig) =
                plane.with_context(|| format!("starting cluster {name}"))?;
            let others: Vec<(&str, Ipv4Addr)> =
                peers.iter().filter(|(p, _)| *p != name).map(|(p, ip)| (p.as_str(), *ip)).collect();
            let mut extra = opts.gateway_extra.clone();
            if opts.network == Network::Flat {
                extra.push_str("traffic:\n  network: flat\n");
            }
            let mut spec = ns_spec(&name, &opts.clusterset, underlay_ip, &others, &extra);
            spec.dns = SocketAddr::from((PodNetwork::for_cluster(k as u8).dns, 53));
            spec.vip_range = VIP_RANGE.to_owned();
            let tls = pki.issue(&name, &tmp.path().join(format!("certs-{name}")))?;
            let gateway = NsGateway::prepare(&ns, tmp.path(), spec, tls)?;
            use_kube_source(&gateway.gw, &gateway_kubeconfig)?;
            members.push(Member {
                name,
                index: k,
                underlay_ip,
                gateway,
                kube,
                gateway_kubeconfig,
                ns,
            });
        }
        let mut set = Self { members, network: opts.network, _underlay: underlay, _tmp: tmp };
        for m in &mut set.members {
            m.gateway.launch()?;
        }
        for m in &set.members {
            let want = set.members.len() - 1;
            crate::eventually(
                &format!("{}'s gateway to reach every peer", m.name),
                PEERS_WITHIN,
                || {
                    let peers = m.gateway.json("/debug/peers")?;
                    let connected = peers
                        .as_array()
                        .map_or(0, |ps| ps.iter().filter(|p| p["connected"] == true).count());
                    Ok((connected == want).then_some(()))
                },
            )?;
        }
        eprintln!(
            "clusterset of {} ({} network) up in {:.1} s",
            set.members.len(),
            set.network.as_str(),
            started.elapsed().as_secs_f64()
        );
        Ok(set)
    }
}
