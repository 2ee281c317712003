//! A DNS server over a synthetic clusterset, for `bench/dns.sh`: `N` ClusterSetIP services
//! `svc<i>.ns<i % 100>.svc.clusterset.local` (242.x.y.z). Serves until killed.
//!
//! `cargo run --release -p fedgate-dns --example bench_server -- 127.0.0.1:5300 10000 [UPSTREAM]`
//!
//! With `UPSTREAM` (an `ip:port`), names outside the zones are forwarded there; without it,
//! nothing is forwarded.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use fedgate_discovery::exchange::delta::testing::{exported, imported};
use fedgate_discovery::model::{
    ClusterId, ClusterState, ImportPort, ImportSnapshot, ImportedService, ServiceKey, ServicePort,
    ServiceType,
};
use fedgate_dns::{DnsServer, DnsSettings, Upstream};
use tokio::sync::watch;

fn service(i: usize, cluster: &ClusterId) -> ImportedService {
    let key = ServiceKey::new(format!("ns{}", i % 100), format!("svc{i}"));
    let port = ServicePort::tcp(Some("http"), 80);
    let export = Arc::new(exported(
        key.clone(),
        cluster.as_str(),
        ServiceType::ClusterSetIP,
        vec![port.clone()],
        vec![],
    ));
    let ip = format!("242.{}.{}.{}", 1 + i / 64_000, (i / 250) % 256, i % 250 + 1);
    let ports = vec![ImportPort { port, clusters: BTreeSet::from([cluster.clone()]) }];
    let ips = vec![ip.parse().expect("generated ip")];
    imported(key, ServiceType::ClusterSetIP, ports, ips, cluster.clone(), vec![export])
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().unwrap_or_else(|| "127.0.0.1:5300".into()).parse()?;
    let count: usize = args.next().unwrap_or_else(|| "10000".into()).parse()?;
    let upstream: Option<SocketAddr> = args.next().map(|a| a.parse()).transpose()?;
    let cluster = ClusterId::new("east")?;
    let mut snap = ImportSnapshot { local_cluster: Some(cluster.clone()), ..Default::default() };
    for i in 0..count {
        let svc = service(i, &cluster);
        snap.services.insert(svc.key.clone(), Arc::new(svc));
    }
    let (_imports_tx, imports_rx) = watch::channel(Arc::new(snap));
    let (_cluster_tx, cluster_rx) = watch::channel(Arc::new(ClusterState::default()));
    let mut settings = DnsSettings::new(listen);
    settings.upstream = upstream.map(Upstream::Address).into_iter().collect();
    let started = std::time::Instant::now();
    let server = DnsServer::new(settings, imports_rx, cluster_rx)?;
    println!(
        "serving {} names on {} (built in {:?})",
        server.names(),
        server.address(),
        started.elapsed()
    );
    server.run(tokio_util::sync::CancellationToken::new()).await?;
    Ok(())
}
