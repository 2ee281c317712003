//! DNS through real gateway processes: two `fedgate run` on loopback (alpha, bravo) federate,
//! and real clients ask alpha's DNS server: `dig` (bind9-dnsutils), a hickory resolver and raw
//! UDP datagrams. Upstream forwarding goes to a real `unbound` the test starts on loopback.
//! Backends are TCP listeners of the test (the gateways' health checks probe them).
//!
//! Needs `dig` and `unbound` (scripts/install-test-deps.sh); a missing tool fails the test.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_e2e::*;

const CLUSTERSET: &str = "dnse2e";
const PROPAGATION: Duration = Duration::from_secs(15);
/// Health checks of the test gateways: an endpoint is unhealthy 2 × 300 ms after it dies.
const HEALTH: &str = "traffic:\n  healthCheck: { interval: 300ms, timeout: 200ms, unhealthyThreshold: 2, healthyThreshold: 1 }\n";
/// `dns.ttl` of the gateways (the harness writes 5 s).
const TTL: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- clients

/// What `dig` printed, parsed: status, header flags, sections as whitespace-split lines.
#[derive(Debug, Default)]
struct Dig {
    text: String,
    status: String,
    flags: Vec<String>,
    answer: Vec<Vec<String>>,
    authority: Vec<Vec<String>>,
}

impl Dig {
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// Data of the answer records of `rtype` (everything after the type field).
    fn data(&self, rtype: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .answer
            .iter()
            .filter(|r| r.get(3).is_some_and(|t| t == rtype))
            .map(|r| r[4..].join(" "))
            .collect();
        v.sort();
        v
    }

    fn authority_soa(&self, zone: &str) -> bool {
        self.authority.iter().any(|r| r.first().is_some_and(|n| n == zone) && r[3] == "SOA")
    }

    fn over_tcp(&self) -> bool {
        self.text.lines().any(|l| l.starts_with(";; SERVER:") && l.contains("(TCP)"))
    }
}

/// Runs `dig @server` with one try and a short timeout; returns what it printed.
fn dig_text(server: SocketAddr, args: &[&str]) -> Result<String> {
    require_tool("dig", "bind9-dnsutils");
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+tries=1", "+time=2"])
        .args(args)
        .output()
        .context("running dig")?;
    Ok(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Runs `dig @server` and parses its output.
fn dig(server: SocketAddr, args: &[&str]) -> Result<Dig> {
    let text = dig_text(server, args)?;
    let mut dig = Dig { text: text.clone(), ..Dig::default() };
    let mut section = "";
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(";; ->>HEADER<<-") {
            // After a TC answer dig retries over TCP and prints a second header: keep the last.
            dig.status = rest
                .split(',')
                .find_map(|p| p.trim().strip_prefix("status: "))
                .unwrap_or_default()
                .to_owned();
            dig.answer.clear();
            dig.authority.clear();
        } else if let Some(rest) = line.strip_prefix(";; flags:") {
            let flags = rest.split(';').next().unwrap_or_default();
            dig.flags = flags.split_whitespace().map(str::to_owned).collect();
        } else if line.starts_with(";; ANSWER SECTION:") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION:") {
            section = "authority";
        } else if line.starts_with(";;") && line.ends_with("SECTION:") {
            section = "other";
        } else if line.trim().is_empty() {
            section = "";
        } else if !line.starts_with(';') {
            let fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            match section {
                "answer" => dig.answer.push(fields),
                "authority" => dig.authority.push(fields),
                _ => {}
            }
        }
    }
    if dig.status.is_empty() {
        bail!("dig {args:?} got no answer from {server}:\n{text}");
    }
    Ok(dig)
}

/// One raw UDP exchange; `None` when nothing came back within a second.
fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Result<Option<Vec<u8>>> {
    let sock = UdpSocket::bind(SocketAddr::new(server.ip(), 0)).context("binding a udp client")?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    sock.send_to(bytes, server)?;
    let mut buf = [0u8; 4096];
    match sock.recv_from(&mut buf) {
        Ok((n, _)) => Ok(Some(buf[..n].to_vec())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// A query in wire format: header (ID, RD), one question of `labels`, type, class.
fn raw_query(id: u16, labels: &[&str], qtype: u16, qclass: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in labels {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&qclass.to_be_bytes());
    q
}

const RCODE_FORMERR: u8 = 1;

// ---------------------------------------------------------------- the clusters

struct Pair {
    a: Gateway,
    b: Gateway,
    _tmp: tempfile::TempDir,
}

/// Gateways alpha and bravo in one address block, peered, each with its own ClusterSetIP
/// range. `upstream_a` replaces alpha's `dns.upstream` (the harness writes `system`).
fn pair(upstream_a: Option<SocketAddr>, block: AddrBlock) -> Result<Pair> {
    let tmp = tempfile::tempdir()?;
    let mut gateways =
        prepare_mesh(tmp.path(), block, CLUSTERSET, &["alpha", "bravo"], |i, spec| {
            spec.dns = block.addr(10 + i as u8, 53);
            spec.extra = HEALTH.to_owned();
        })?;
    if let Some(up) = upstream_a {
        gateways[0].edit_config("upstream: [system]", &format!("upstream: [\"{up}\"]"))?;
    }
    for g in &mut gateways {
        g.start()?;
    }
    let b = gateways.pop().context("bravo")?;
    let a = gateways.pop().context("alpha")?;
    Ok(Pair { a, b, _tmp: tmp })
}

/// Gateway `i`'s ClusterSetIP range: the block's `.<128 + 32 i>/27` (`GatewaySpec::mesh`).
fn in_range(ip: &str, block: AddrBlock, i: usize) -> bool {
    let Ok(ip) = ip.parse::<Ipv4Addr>() else { return false };
    let first = 128 + 32 * i as u8;
    ip.octets()[..3] == block.ip(0).octets()[..3] && (first..first + 32).contains(&ip.octets()[3])
}

/// A backend: a TCP listener on `ip` (port chosen by the kernel); health probes connect to it.
fn backend(ip: Ipv4Addr) -> Result<TcpListener> {
    TcpListener::bind((ip, 0)).with_context(|| format!("binding a backend on {ip}"))
}

fn port_of(l: &TcpListener) -> Result<u16> {
    Ok(l.local_addr()?.port())
}

/// One backend per gateway: alpha's on the block's `.50`, bravo's on `.51`.
struct Backends {
    ea: Ipv4Addr,
    eb: Ipv4Addr,
    la: TcpListener,
    lb: TcpListener,
    pa: u16,
    pb: u16,
}

fn backends(block: AddrBlock) -> Result<Backends> {
    let (ea, eb) = (block.ip(50), block.ip(51));
    let (la, lb) = (backend(ea)?, backend(eb)?);
    let (pa, pb) = (port_of(&la)?, port_of(&lb)?);
    Ok(Backends { ea, eb, la, lb, pa, pb })
}

/// `shop/db`: headless, one endpoint `ep` listening on `port`, exported.
fn db_yaml(ep: Ipv4Addr, port: u16) -> String {
    service_yaml(
        "shop",
        "db",
        true,
        &[("pg", 5432, port)],
        &[(&ep.to_string(), true)],
        Some(EXPORTED_AT),
    )
}

/// Both gateways export `shop/db`, each with its own backend.
fn export_db(p: &Pair, be: &Backends) -> Result<()> {
    p.a.write_cluster_file("db.yaml", &db_yaml(be.ea, be.pa))?;
    p.b.write_cluster_file("db.yaml", &db_yaml(be.eb, be.pb))
}

/// How most tests start: alpha and bravo in a fresh block ([`pair`], `dns.upstream` as the
/// harness writes it), then a backend for each ([`backends`]).
fn pair_with_backends() -> Result<(AddrBlock, Pair, Backends)> {
    let block = AddrBlock::unique();
    let p = pair(None, block)?;
    let be = backends(block)?;
    Ok((block, p, be))
}

/// bravo's per-host name for its db endpoint `eb`, and the VIP alpha answers for it once
/// imported (another cluster's address is never answered directly).
fn wait_bravo_host(dns: SocketAddr, eb: Ipv4Addr) -> Result<(String, String)> {
    let host_b = format!("{}.bravo.db.shop.svc.clusterset.local", host_label(eb));
    let remote = wait_dig("bravo's per-host name", dns, &[&host_b, "A"], PROPAGATION, |d| {
        d.data("A").len() == 1
    })?;
    let vip_b = remote.data("A")[0].clone();
    Ok((host_b, vip_b))
}

/// Service YAML with `clusterIP` set (a ClusterIP Service of this cluster).
fn with_cluster_ip(yaml: &str, ip: Ipv4Addr) -> String {
    yaml.replacen("spec:\n", &format!("spec:\n  clusterIP: {ip}\n"), 1)
}

/// The generated hostname of an endpoint without one (docs/dns.md): dots become dashes.
fn host_label(ip: Ipv4Addr) -> String {
    ip.to_string().replace('.', "-")
}

fn wait_dig(
    what: &str,
    server: SocketAddr,
    args: &[&str],
    timeout: Duration,
    ok: impl Fn(&Dig) -> bool,
) -> Result<Dig> {
    let mut last = String::new();
    eventually(what, timeout, || {
        let d = dig(server, args)?;
        if ok(&d) {
            return Ok(Some(d));
        }
        last = d.text;
        Ok(None)
    })
    .with_context(|| format!("last dig output:\n{last}"))
}

// ---------------------------------------------------------------- tests

#[test]
fn records_negative_answers_and_the_cluster_local_rule() -> Result<()> {
    let (block, p, be) = pair_with_backends()?;
    let (a, b) = (&p.a, &p.b);
    let dns = a.spec.dns;
    let (ea, eb, pa, pb) = (be.ea, be.eb, be.pa, be.pb);

    // web: ClusterSetIP exported by both; alpha's Service has a ClusterIP of its own.
    let web =
        |ep: Ipv4Addr, port| exported_service("shop", "web", ("http", 80, port), &ep.to_string());
    let cluster_ip = block.ip(80);
    a.write_cluster_file("web.yaml", &with_cluster_ip(&web(ea, pa), cluster_ip))?;
    b.write_cluster_file("web.yaml", &web(eb, pb))?;
    // db: headless, exported by both.
    export_db(&p, &be)?;
    // only-b: exported by bravo alone.
    let only_b_yaml = exported_service("shop", "only-b", ("http", 80, pb), &eb.to_string());
    b.write_cluster_file("only-b.yaml", &only_b_yaml)?;

    // ClusterSetIP A: alpha's ClusterSetIP for web, the same one /debug/imports shows.
    let web_a = wait_dig(
        "web A with both clusters",
        dns,
        &["web.shop.svc.clusterset.local", "A"],
        PROPAGATION,
        |d| d.status == "NOERROR" && d.data("A").len() == 1,
    )?;
    let csip = web_a.data("A")[0].clone();
    assert!(in_range(&csip, block, 0), "alpha answers from its own range: {csip}");
    let imports = eventually("web imported from both", PROPAGATION, || {
        let i = a.json("/debug/imports")?;
        Ok(find_import(&i, "shop", "web").filter(|w| import_clusters(w).len() == 2).cloned())
    })?;
    assert_eq!(imports["ips"][0], csip.as_str(), "{imports}");
    assert!(web_a.has_flag("aa"), "authoritative: {}", web_a.text);
    assert_eq!(web_a.answer[0][1], TTL.as_secs().to_string(), "dns.ttl: {}", web_a.text);
    // Case-insensitive names.
    let mixed = dig(dns, &["WEB.Shop.SVC.clusterset.LOCAL", "A"])?;
    assert_eq!(mixed.data("A"), vec![csip.clone()]);
    // SRV per named port, targeting the service name.
    let srv = dig(dns, &["_http._tcp.web.shop.svc.clusterset.local", "SRV"])?;
    assert_eq!(
        srv.data("SRV"),
        vec!["0 100 80 web.shop.svc.clusterset.local.".to_owned()],
        "{}",
        srv.text
    );
    // SRV at the service name itself: one per service port (CoreDNS's answer for cluster.local).
    let srv_svc = dig(dns, &["web.shop.svc.clusterset.local", "SRV"])?;
    assert_eq!(
        srv_svc.data("SRV"),
        vec!["0 100 80 web.shop.svc.clusterset.local.".to_owned()],
        "{}",
        srv_svc.text
    );
    // PTR of the ClusterSetIP: back to the service name (`dig -x`).
    let rev = dig(dns, &["-x", &csip])?;
    assert_eq!(rev.data("PTR"), vec!["web.shop.svc.clusterset.local.".to_owned()], "{}", rev.text);
    assert!(rev.has_flag("aa"), "{}", rev.text);
    // An address of alpha's range without a service: NXDOMAIN of ours (the range is alpha's
    // alone), with the reverse zone's SOA, not forwarded.
    let unused = block.ip(128 + 31).to_string();
    let rev_nx = dig(dns, &["-x", &unused])?;
    assert_eq!(rev_nx.status, "NXDOMAIN", "{}", rev_nx.text);
    assert!(rev_nx.authority_soa("in-addr.arpa.") && rev_nx.has_flag("aa"), "{}", rev_nx.text);
    // <clusterid>.<svc> must not exist.
    let cid = dig(dns, &["alpha.web.shop.svc.clusterset.local", "A"])?;
    assert_eq!(cid.status, "NXDOMAIN", "{}", cid.text);

    // Headless: alpha's own endpoint (best tier), per-host names for both clusters, SRV.
    let db_a = wait_dig("db A", dns, &["db.shop.svc.clusterset.local", "A"], PROPAGATION, |d| {
        d.data("A") == vec![ea.to_string()]
    })?;
    assert!(db_a.has_flag("aa"));
    let host_a = format!("{}.alpha.db.shop.svc.clusterset.local", host_label(ea));
    assert_eq!(dig(dns, &[&host_a, "A"])?.data("A"), vec![ea.to_string()]);
    let (_, vip_b) = wait_bravo_host(dns, eb)?;
    assert!(in_range(&vip_b, block, 0), "bravo's endpoint answered with alpha's VIP: {vip_b}");
    assert_ne!(vip_b, eb.to_string(), "another cluster's address is never answered directly");
    let db_srv = dig(dns, &["_pg._tcp.db.shop.svc.clusterset.local", "SRV"])?;
    assert_eq!(db_srv.data("SRV"), vec![format!("0 100 {pa} {host_a}.")], "{}", db_srv.text);
    let db_srv_svc = dig(dns, &["db.shop.svc.clusterset.local", "SRV"])?;
    assert_eq!(db_srv_svc.data("SRV"), db_srv.data("SRV"), "{}", db_srv_svc.text);
    // PTR: bravo's endpoint VIP → its per-host name; alpha's own endpoint address → its
    // clusterset per-host name and its cluster.local name.
    let host_b = format!("{}.bravo.db.shop.svc.clusterset.local.", host_label(eb));
    let rev_vip = dig(dns, &["-x", &vip_b])?;
    assert_eq!(rev_vip.data("PTR"), vec![host_b], "{}", rev_vip.text);
    let rev_ea = dig(dns, &["-x", &ea.to_string()])?;
    assert_eq!(
        rev_ea.data("PTR"),
        vec![format!("{host_a}."), format!("{}.db.shop.svc.cluster.local.", host_label(ea)),],
        "{}",
        rev_ea.text
    );

    // cluster.local: only alpha's own Services.
    let local_web = dig(dns, &["web.shop.svc.cluster.local", "A"])?;
    assert_eq!(local_web.data("A"), vec![cluster_ip.to_string()], "{}", local_web.text);
    let local_db = dig(dns, &["db.shop.svc.cluster.local", "A"])?;
    assert_eq!(local_db.data("A"), vec![ea.to_string()], "{}", local_db.text);
    let only_b = wait_dig(
        "only-b in clusterset.local",
        dns,
        &["only-b.shop.svc.clusterset.local", "A"],
        PROPAGATION,
        |d| d.data("A").len() == 1,
    )?;
    assert!(in_range(&only_b.data("A")[0], block, 0));
    let not_here = dig(dns, &["only-b.shop.svc.cluster.local", "A"])?;
    assert_eq!(not_here.status, "NXDOMAIN", "exported elsewhere, absent here: {}", not_here.text);
    assert!(not_here.authority_soa("cluster.local."), "{}", not_here.text);

    // NODATA vs NXDOMAIN, SOA in authority.
    let nodata = dig(dns, &["web.shop.svc.clusterset.local", "TXT"])?;
    assert_eq!((nodata.status.as_str(), nodata.answer.len()), ("NOERROR", 0), "{}", nodata.text);
    assert!(nodata.authority_soa("clusterset.local."), "{}", nodata.text);
    let nx = dig(dns, &["nope.shop.svc.clusterset.local", "A"])?;
    assert_eq!(nx.status, "NXDOMAIN");
    assert!(nx.authority_soa("clusterset.local.") && nx.has_flag("aa"), "{}", nx.text);
    let ent = dig(dns, &["shop.svc.clusterset.local", "A"])?;
    assert_eq!(
        (ent.status.as_str(), ent.answer.len()),
        ("NOERROR", 0),
        "empty non-terminal: {}",
        ent.text
    );

    // dns-version, apex SOA and NS.
    let version = dig(dns, &["dns-version.clusterset.local", "TXT"])?;
    assert_eq!(version.data("TXT"), vec!["\"1.0.0\"".to_owned()]);
    for zone in ["clusterset.local.", "cluster.local."] {
        let soa = dig(dns, &[zone, "SOA"])?;
        assert_eq!(soa.data("SOA").len(), 1, "{}", soa.text);
        let ns = dig(dns, &[zone, "NS"])?;
        assert_eq!(ns.data("NS"), vec![format!("ns.dns.{zone}")], "{}", ns.text);
    }

    // A hickory resolver (UDP, TCP fallback) sees the same records.
    let (ips, srv_targets) = hickory_lookup(dns)?;
    assert_eq!(ips, vec![csip.parse::<IpAddr>()?]);
    assert_eq!(srv_targets, vec![(pa, format!("{host_a}."))]);

    drop((be, b));
    Ok(())
}

/// SRV answers as (port, target).
type SrvTargets = Vec<(u16, String)>;

/// Looks up `web` (A) and `db`'s SRV with hickory-resolver pointed at `server`.
fn hickory_lookup(server: SocketAddr) -> Result<(Vec<IpAddr>, SrvTargets)> {
    use hickory_resolver::Resolver;
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::proto::rr::RData;

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut udp = ConnectionConfig::udp();
        udp.port = server.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = server.port();
        let ns = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
        let resolver = Resolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![ns]),
            TokioRuntimeProvider::default(),
        )
        .build()
        .context("building a hickory resolver")?;
        let ips =
            within_5s("lookup_ip", resolver.lookup_ip("web.shop.svc.clusterset.local.")).await?;
        let srv =
            within_5s("srv_lookup", resolver.srv_lookup("_pg._tcp.db.shop.svc.clusterset.local."))
                .await?;
        let mut ips: Vec<IpAddr> = ips.iter().collect();
        ips.sort();
        let targets = srv
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((s.port, s.target.to_ascii())),
                _ => None,
            })
            .collect();
        Ok((ips, targets))
    })
}

/// A hickory `lookup`, failing when it takes more than 5 s; errors name `what`.
async fn within_5s<T, E>(what: &str, lookup: impl Future<Output = Result<T, E>>) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::time::timeout(Duration::from_secs(5), lookup)
        .await
        .with_context(|| format!("hickory {what} timed out"))?
        .with_context(|| format!("hickory {what}"))
}

#[test]
fn headless_answers_fail_over_to_the_remote_tier_and_back() -> Result<()> {
    let (_, p, be) = pair_with_backends()?;
    let (a, b) = (&p.a, &p.b);
    let dns = a.spec.dns;
    let (ea, eb, pa) = (be.ea, be.eb, be.pa);
    export_db(&p, &be)?;
    let name = "db.shop.svc.clusterset.local";
    wait_dig("local tier", dns, &[name, "A"], PROPAGATION, |d| {
        d.data("A") == vec![ea.to_string()]
    })?;
    // bravo's endpoint has a VIP on alpha once imported; learn it from its per-host name.
    let (host_b, vip_b) = wait_bravo_host(dns, eb)?;

    // The local backend dies: within one health interval × threshold plus the TTL the answer
    // is the remote tier (bravo's endpoint, through its VIP).
    let died = Instant::now();
    drop(be.la);
    let bound = Duration::from_millis(2 * 300 + 200) + TTL + Duration::from_secs(2);
    let failed_over =
        wait_dig("remote tier", dns, &[name, "A"], bound, |d| d.data("A") == vec![vip_b.clone()])?;
    let took = died.elapsed();
    eprintln!("headless answer switched to the remote tier {took:?} after the backend died");
    assert!(failed_over.has_flag("aa"));
    // The SRV set follows (remote endpoints on the service port, per-host targets).
    let srv = dig(dns, &["_pg._tcp.db.shop.svc.clusterset.local", "SRV"])?;
    assert_eq!(srv.data("SRV"), vec![format!("0 100 5432 {host_b}.")], "{}", srv.text);
    // cluster.local never yields another cluster's endpoint: no healthy local one → NXDOMAIN
    // or only the local address, never bravo's.
    let local = dig(dns, &["db.shop.svc.cluster.local", "A"])?;
    assert!(
        !local.data("A").contains(&vip_b) && !local.data("A").contains(&eb.to_string()),
        "{}",
        local.text
    );

    // The backend comes back on the same address: the local tier returns.
    let _la = TcpListener::bind((ea, pa)).context("re-binding the local backend")?;
    wait_dig("local tier again", dns, &[name, "A"], bound, |d| {
        d.data("A") == vec![ea.to_string()]
    })?;
    drop((be.lb, b));
    Ok(())
}

/// An `unbound` on loopback answering `www.example.test A 192.0.2.10` from local data and
/// refusing everything else (it never recurses). Killed on drop.
struct Unbound {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Unbound {
    fn start(addr: SocketAddr) -> Result<Self> {
        require_tool("unbound", "unbound");
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("unbound.conf");
        std::fs::write(
            &conf,
            format!(
                "server:\n  interface: {ip}\n  port: {port}\n  do-daemonize: no\n  use-syslog: no\n  \
                 directory: \"{d}\"\n  chroot: \"\"\n  username: \"\"\n  pidfile: \"\"\n  do-ip6: no\n  \
                 access-control: 127.0.0.0/8 allow\n  local-zone: \".\" refuse\n  \
                 local-zone: \"example.test.\" static\n  \
                 local-data: \"www.example.test. 60 IN A 192.0.2.10\"\n  \
                 local-data: \"example.test. 60 IN SOA ns.example.test. h.example.test. 1 60 60 600 30\"\n",
                ip = addr.ip(),
                port = addr.port(),
                d = dir.path().display(),
            ),
        )?;
        let child = Command::new("unbound")
            .args(["-d", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting unbound")?;
        let u = Self { child, addr, _dir: dir };
        eventually("unbound to answer", Duration::from_secs(10), || {
            Ok(dig(addr, &["www.example.test", "A"])
                .ok()
                .filter(|d| d.status == "NOERROR")
                .map(|_| ()))
        })?;
        Ok(u)
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn forwarding_truncation_and_protocol_errors() -> Result<()> {
    let block = AddrBlock::unique();
    let unbound = Unbound::start(block.addr(60, 53))?;
    let p = pair(Some(unbound.addr), block)?;
    let a = &p.a;
    let dns = a.spec.dns;

    // Forwarding: answers of the upstream, NXDOMAIN passed through, RA set, not authoritative.
    let fwd = dig(dns, &["www.example.test", "A"])?;
    assert_eq!(fwd.data("A"), vec!["192.0.2.10".to_owned()], "{}", fwd.text);
    assert!(fwd.has_flag("ra") && !fwd.has_flag("aa"), "{}", fwd.text);
    let fwd_nx = dig(dns, &["nope.example.test", "A"])?;
    assert_eq!(fwd_nx.status, "NXDOMAIN", "{}", fwd_nx.text);
    let refused = dig(dns, &["www.elsewhere.org", "A"])?;
    assert_eq!(refused.status, "SERVFAIL", "the only upstream refuses: {}", refused.text);
    // Forwarded and cache-hit counts appear in the metrics.
    let (_, metrics) = http_get(a.spec.admin, "/metrics")?;
    assert!(metrics.contains("fedgate_dns_forwarded_total{result=\"ok\"}"), "{metrics}");

    // Truncation: 60 healthy local endpoints do not fit 512 bytes; dig retries over TCP.
    // Every endpoint listens on the port the first one got (one port in the slice).
    let first = backend(block.ip(100))?;
    let port = port_of(&first)?;
    let mut listeners = vec![first];
    for host in 101..160u8 {
        let ip = block.ip(host);
        listeners
            .push(TcpListener::bind((ip, port)).with_context(|| format!("binding {ip}:{port}"))?);
    }
    let eps: Vec<String> = (100..160u8).map(|h| block.ip(h).to_string()).collect();
    let endpoints: Vec<(&str, bool)> = eps.iter().map(|ip| (ip.as_str(), true)).collect();
    a.write_cluster_file(
        "big.yaml",
        &service_yaml("shop", "big", true, &[("tcp", 7000, port)], &endpoints, Some(EXPORTED_AT)),
    )?;
    let name = "big.shop.svc.clusterset.local";
    let full = wait_dig("60 addresses over TCP", dns, &[name, "A", "+noedns"], PROPAGATION, |d| {
        d.data("A").len() == 60
    })?;
    assert!(
        full.over_tcp() && full.text.contains("Truncated, retrying in TCP mode"),
        "{}",
        full.text
    );
    let tc = dig(dns, &[name, "A", "+noedns", "+ignore"])?;
    assert!(tc.has_flag("tc") && tc.answer.is_empty(), "TC and no partial RRset: {}", tc.text);
    let tcp = dig(dns, &[name, "A", "+tcp"])?;
    assert_eq!(tcp.data("A").len(), 60);
    drop(listeners);

    // Protocol errors.
    let status = dig(dns, &["+opcode=status", "web.shop.svc.clusterset.local", "A"])?;
    assert_eq!(status.status, "NOTIMP", "{}", status.text);
    let chaos = dig(dns, &["-c", "CH", "dns-version.clusterset.local", "TXT"])?;
    assert_eq!(chaos.status, "REFUSED", "{}", chaos.text);
    let chaos_out = dig(dns, &["-c", "CH", "version.bind", "TXT"])?;
    assert_eq!(chaos_out.status, "REFUSED", "{}", chaos_out.text);
    // Zone transfers are refused (over TCP, as dig asks them).
    let axfr = dig_text(dns, &["clusterset.local", "AXFR"])?;
    assert!(axfr.contains("Transfer failed"), "{axfr}");

    // Garbage after a valid header: FORMERR with the ID echoed.
    let mut garbage = vec![0xAB, 0xCD, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    garbage.extend_from_slice(&[0xFF; 40]);
    let resp = udp_raw(dns, &garbage)?.context("no answer to garbage")?;
    assert_eq!(&resp[..2], &[0xAB, 0xCD]);
    assert!(resp[2] & 0x80 != 0 && resp[3] & 0x0F == RCODE_FORMERR, "FORMERR: {resp:?}");
    // Shorter than a header, or a response: no answer at all (no reflection).
    assert_eq!(udp_raw(dns, &[1, 2, 3])?, None);
    let mut response = raw_query(7, &["web", "shop", "svc", "clusterset", "local"], 1, 1);
    response[2] |= 0x80;
    assert_eq!(udp_raw(dns, &response)?, None);
    // A name over 255 octets (5 labels of 63): FORMERR.
    let long = "a".repeat(63);
    let labels = [long.as_str(); 5];
    let resp = udp_raw(dns, &raw_query(9, &labels, 1, 1))?.context("no answer to a long name")?;
    assert!(resp[..2] == [0, 9] && resp[3] & 0x0F == RCODE_FORMERR, "FORMERR: {resp:?}");
    // The server still answers afterwards.
    assert_eq!(dig(dns, &["dns-version.clusterset.local", "TXT"])?.status, "NOERROR");
    drop(unbound);
    Ok(())
}
