//! `fedgate-lab`: N Kubernetes clusters with fedgate on one machine, until Ctrl-C
//! (docs/testing-kube.md, "The lab"). Each cluster lives in a network namespace of its own with
//! its control plane, its pods and its gateway ([`fedgate_e2e::clusterset`]). Prints how to
//! reach each one, then waits; Ctrl-C (or SIGTERM) tears everything down.
//!
//! Needs root and the binaries of `scripts/build-kube.sh`; `scripts/lab.sh` builds what is
//! missing and runs this.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use fedgate_e2e::clusterset::{ClusterSet, Network, Options};

#[derive(Parser, Debug)]
#[command(about = "N Kubernetes clusters with fedgate gateways on one machine, until Ctrl-C")]
struct Args {
    /// How many clusters (ids c1, c2, ...), unless --names is given.
    #[arg(long, default_value_t = 2)]
    clusters: usize,
    /// Cluster ids, comma-separated (overrides --clusters).
    #[arg(long, value_delimiter = ',')]
    names: Vec<String>,
    /// `gateway`: pod ranges not routed between clusters (traffic through the gateways);
    /// `flat`: pod ranges routed between clusters.
    #[arg(long, default_value = "gateway")]
    network: String,
    /// The clusterset name (trust domain of the gateways' certificates).
    #[arg(long, default_value = "lab")]
    clusterset: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let network = match args.network.as_str() {
        "gateway" => Network::Gateway,
        "flat" => Network::Flat,
        other => bail!("--network must be `gateway` or `flat`, not {other:?}"),
    };
    let names = if args.names.is_empty() {
        (1..=args.clusters).map(|i| format!("c{i}")).collect()
    } else {
        args.names.clone()
    };
    let opts = Options {
        names,
        clusterset: args.clusterset.clone(),
        network,
        gateway_extra: String::new(),
        pods: true,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Signals first: a Ctrl-C while the clusters start must still tear them down.
    let mut term = rt.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    })?;
    let set = ClusterSet::start(&opts).context("starting the lab")?;
    print_usage(&set)?;
    rt.block_on(async {
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
            _ = term.recv() => Ok(()),
        }
    })?;
    eprintln!("\nstopping the lab ...");
    drop(set);
    std::thread::sleep(Duration::from_millis(100));
    eprintln!("stopped; every namespace and process of the lab is gone");
    Ok(())
}

fn print_usage(set: &ClusterSet) -> Result<()> {
    println!("\nfedgate lab: {} clusters, {} network\n", set.members.len(), set.network.as_str());
    for m in &set.members {
        let kubectl = format!(
            "ip netns exec {} {} --kubeconfig {}",
            m.ns.name,
            m.kube.kubectl_path().display(),
            m.kube.kubeconfig_path().display()
        );
        println!("cluster {}:", m.name);
        println!("  network namespace  {}", m.ns.name);
        println!("  kubeconfig         {}", m.kube.kubeconfig_path().display());
        println!("  kubectl            {kubectl} get pods -A");
        println!("  pod range          {}", m.pod_cidr());
        println!("  DNS (pods' resolver) {}", m.dns());
        println!("  gateway tunnel     {}:{}", m.underlay_ip, fedgate_e2e::clusterset::TUNNEL_PORT);
        println!(
            "  gateway status     ip netns exec {} curl -s http://127.0.0.1:15000/debug/imports",
            m.ns.name
        );
        println!("  gateway log        {}", m.gateway.gw.dir.join("gateway.log").display());
        println!();
    }
    println!("Ctrl-C stops everything.");
    Ok(())
}
