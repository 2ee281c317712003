//! Issue 17, finding 3, with real gateway processes: a full `front.clusterSetIPRange` is
//! reported (`/debug/problems`, `fedgate_clustersetip_unallocated_services`, one log line per
//! update), waiting imports get an address within seconds of one freeing, and imports withdrawn
//! with a killed peer get their old addresses back when it returns, ahead of newcomers.
//!
//! Needs `dig` (bind9-dnsutils); a missing tool fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fedgate_e2e::*;

const CLUSTERSET: &str = "e2e";
/// A /27: 30 usable addresses.
const PREFIX: &str = "27";

/// A waiting import gets its address within this of one freeing.
const SERVED_WITHIN: Duration = Duration::from_secs(5);

/// Gateways `ids` of a full mesh in one address block, each with a /27 ClusterSetIP range and
/// the peer lease `lease`, prepared (not started).
fn prepare(ids: &[&str], lease: &str) -> Result<(Vec<Gateway>, tempfile::TempDir)> {
    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let pki = Pki::new(tmp.path(), "ca", CLUSTERSET)?;
    let mut gateways = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        // The mesh default is a /27 (`PREFIX`) of the test's own block.
        let mesh = GatewaySpec::mesh(block, CLUSTERSET, ids, i);
        assert!(mesh.vip_range.ends_with(&format!("/{PREFIX}")), "{}", mesh.vip_range);
        let spec = GatewaySpec { lease: lease.to_owned(), ..mesh };
        let tls = pki.issue(id, &tmp.path().join(format!("certs-{id}")))?;
        gateways.push(Gateway::prepare(tmp.path(), spec, tls)?);
    }
    Ok((gateways, tmp))
}

/// ClusterSetIP services `names` in namespace `default`, exported, one endpoint each.
fn services<S: AsRef<str>>(names: &[S]) -> String {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let ip = format!("127.250.{}.{}", 1 + i / 200, 1 + i % 200);
            service_yaml(
                "default",
                n.as_ref(),
                false,
                &[("http", 80, 8080)],
                &[(&ip, true)],
                Some("2026-01-01T00:00:00Z"),
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn names(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i:02}")).collect()
}

/// Every import of `g` by name, with its ClusterSetIP if it has one.
fn import_ips(g: &Gateway) -> Result<BTreeMap<String, Option<String>>> {
    let imports = g.json("/debug/imports")?;
    let list = imports.as_array().context("/debug/imports is not a list")?;
    Ok(list
        .iter()
        .filter_map(|i| {
            let name = i["name"].as_str()?.to_owned();
            Some((name, i["ips"][0].as_str().map(str::to_owned)))
        })
        .collect())
}

/// The services `/debug/problems` names as waiting for a ClusterSetIP, first in line first.
fn waiting(g: &Gateway) -> Result<Vec<String>> {
    let problems = g.json("/debug/problems")?;
    let list = problems.as_array().context("/debug/problems is not a list")?;
    Ok(list
        .iter()
        .filter(|p| p["kind"] == "clusterSetIP")
        .filter_map(|p| p["service"].as_str().map(str::to_owned))
        .collect())
}

/// The value of an unlabelled or labelled gauge on `g`'s `/metrics`.
fn gauge(g: &Gateway, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let (code, text) = http_get(g.spec.admin, "/metrics")?;
    if code != 200 {
        bail!("/metrics: HTTP {code}");
    }
    let samples = metric_samples(&text, name, labels);
    match samples.as_slice() {
        [(_, v)] => Ok(*v),
        _ => bail!("{name}{labels:?}: expected one sample, found {samples:?}"),
    }
}

/// `dig @dns name A`: the status and the addresses answered.
fn dig_a(dns: SocketAddr, name: &str) -> Result<(String, Vec<String>)> {
    require_tool("dig", "bind9-dnsutils");
    let out = Command::new("dig")
        .arg(format!("@{}", dns.ip()))
        .args(["-p", &dns.port().to_string(), "+tries=1", "+time=2", name, "A"])
        .output()
        .context("running dig")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .find_map(|l| l.strip_prefix(";; ->>HEADER<<-"))
        .and_then(|h| h.split(',').find_map(|p| p.trim().strip_prefix("status: ")))
        .with_context(|| format!("dig {name} got no answer:\n{text}"))?
        .to_owned();
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[3] == "A").then(|| f[4].to_owned())
        })
        .collect();
    Ok((status, answers))
}

fn fqdn(name: &str) -> String {
    format!("{name}.default.svc.clusterset.local")
}

/// The reproduction of the issue: 32 services on a /27. Two wait, are reported and answer
/// NXDOMAIN; ten others are deleted and both answer with an address within seconds, without
/// any change of their own. Exhaustion is logged once per update, not once per service.
#[test]
fn a_full_range_reports_waiting_imports_and_serves_them_when_addresses_free() -> Result<()> {
    let (mut gateways, _tmp) = prepare(&["solo"], "15s")?;
    let g = &mut gateways[0];
    g.write_cluster_file("first.yaml", &services(&names("s", 0..10)))?;
    g.write_cluster_file("rest.yaml", &services(&names("s", 10..32)))?;
    g.start()?;

    let ips = eventually("32 imports, 30 with an address", Duration::from_secs(10), || {
        let ips = import_ips(g)?;
        Ok((ips.len() == 32 && ips.values().flatten().count() == 30).then_some(ips))
    })?;
    let unserved: Vec<&String> =
        ips.iter().filter(|(_, ip)| ip.is_none()).map(|(n, _)| n).collect();
    assert_eq!(unserved, ["s30", "s31"], "the last two in merge order wait");
    let distinct: BTreeSet<&String> = ips.values().flatten().collect();
    assert_eq!(distinct.len(), 30, "no address handed out twice: {ips:?}");

    let listed = eventually("the waiting imports in /debug/problems", SERVED_WITHIN, || {
        let w = waiting(g)?;
        Ok((w.len() == 2).then_some(w))
    })?;
    assert_eq!(listed, ["default/s30", "default/s31"]);
    let problems = g.json("/debug/problems")?;
    let reason = problems
        .as_array()
        .and_then(|l| l.iter().find(|p| p["kind"] == "clusterSetIP"))
        .and_then(|p| p["reason"].as_str())
        .context("no clusterSetIP problem")?
        .to_owned();
    assert!(reason.contains(&format!("/{PREFIX} is full")), "{reason}");
    assert_eq!(gauge(g, "fedgate_clustersetip_unallocated_services", &[])?, 2.0);
    assert_eq!(gauge(g, "fedgate_clustersetip_addresses", &[("state", "free")])?, 0.0);
    assert_eq!(gauge(g, "fedgate_clustersetip_addresses", &[("state", "allocated")])?, 30.0);
    let (status, answers) = dig_a(g.spec.dns, &fqdn("s30"))?;
    assert_eq!((status.as_str(), answers.len()), ("NXDOMAIN", 0), "s30 has no address yet");

    g.remove_cluster_file("first.yaml")?;
    let served = eventually("s30 and s31 to get addresses", SERVED_WITHIN, || {
        let ips = import_ips(g)?;
        Ok((ips.len() == 22 && ips.values().all(Option::is_some)).then_some(ips))
    })?;
    for name in ["s30", "s31"] {
        let ip = served[name].clone().context("no ip")?;
        let (status, answers) = eventually(&format!("{name} to resolve"), SERVED_WITHIN, || {
            let (status, answers) = dig_a(g.spec.dns, &fqdn(name))?;
            Ok((status == "NOERROR").then_some((status, answers)))
        })?;
        assert_eq!((status.as_str(), answers), ("NOERROR", vec![ip]), "{name}");
    }
    for (name, ip) in &ips {
        if let Some(ip) = ip.as_ref().filter(|_| served.contains_key(name)) {
            assert_eq!(served[name].as_ref(), Some(ip), "{name} kept its address");
        }
    }
    eventually("the problems to clear", SERVED_WITHIN, || {
        Ok(waiting(g)?.is_empty().then_some(()))
    })?;
    assert_eq!(gauge(g, "fedgate_clustersetip_unallocated_services", &[])?, 0.0);

    let log = g.log_text();
    let full_lines = log.lines().filter(|l| l.contains("clusterset ip range is full")).count();
    assert!((1..=2).contains(&full_lines), "one line per update, found {full_lines}:\n{log}");
    let per_object = log.lines().filter(|l| l.contains("no clusterset ip for")).count();
    assert_eq!(per_object, 0, "no line per service:\n{log}");
    assert!(log.contains("waiting imports got clusterset ips"), "{log}");
    Ok(())
}

/// A peer is killed (SIGKILL) and its lease expires: east withdraws its imports but keeps their
/// addresses reserved. Newcomers exported on east meanwhile take only free addresses, and the
/// ones that find none wait (reported). The peer restarts: every import gets its old address.
#[test]
fn lease_withdrawn_imports_get_their_addresses_back_ahead_of_newcomers() -> Result<()> {
    let (mut gateways, _tmp) = prepare(&["east", "west"], "2s")?;
    gateways[1].write_cluster_file("bulk.yaml", &services(&names("w", 0..20)))?;
    for g in &mut gateways {
        g.start()?;
    }
    let before =
        eventually("east to import west's 20 with addresses", Duration::from_secs(10), || {
            let ips = import_ips(&gateways[0])?;
            Ok((ips.len() == 20 && ips.values().all(Option::is_some)).then_some(ips))
        })?;
    let reserved: BTreeSet<String> = before.values().flatten().cloned().collect();

    gateways[1].kill();
    let east = &gateways[0];
    eventually("east to withdraw west's imports (2 s lease)", Duration::from_secs(15), || {
        Ok(import_ips(east)?.is_empty().then_some(()))
    })?;
    assert_eq!(gauge(east, "fedgate_clustersetip_addresses", &[("state", "reserved")])?, 20.0);
    assert!(waiting(east)?.is_empty(), "reservations are not problems");

    // 15 newcomers, 10 free addresses: none takes a reserved one, five wait
    east.write_cluster_file("new.yaml", &services(&names("n", 0..15)))?;
    let now = eventually("east's newcomers", Duration::from_secs(10), || {
        let ips = import_ips(east)?;
        Ok((ips.len() == 15 && ips.values().flatten().count() == 10).then_some(ips))
    })?;
    for (name, ip) in &now {
        if let Some(ip) = ip {
            assert!(!reserved.contains(ip), "newcomer {name} took reserved address {ip}");
        }
    }
    let queued = eventually("five newcomers waiting", SERVED_WITHIN, || {
        let w = waiting(east)?;
        Ok((w.len() == 5).then_some(w))
    })?;
    let want: Vec<String> = names("default/n", 10..15);
    assert_eq!(queued, want);
    assert_eq!(gauge(east, "fedgate_clustersetip_unallocated_services", &[])?, 5.0);

    gateways[1].start()?;
    let east = &gateways[0];
    let back = eventually("west's imports back on east", Duration::from_secs(30), || {
        let ips = import_ips(east)?;
        Ok((names("w", 0..20).iter().all(|n| ips.get(n).is_some_and(Option::is_some)))
            .then_some(ips))
    })?;
    for (name, ip) in &before {
        assert_eq!(&back[name], ip, "{name} did not get its address back");
    }
    let (status, answers) = dig_a(east.spec.dns, &fqdn("w07"))?;
    assert_eq!((status.as_str(), answers), ("NOERROR", vec![before["w07"].clone().unwrap()]));
    assert_eq!(waiting(east)?, want, "the newcomers still wait: the range is full");
    assert_eq!(gauge(east, "fedgate_clustersetip_addresses", &[("state", "reserved")])?, 0.0);

    // west drops five of its services: the waiting newcomers get their addresses at once
    gateways[1].write_cluster_file("bulk.yaml", &services(&names("w", 0..15)))?;
    let east = &gateways[0];
    eventually("the newcomers to be served", Duration::from_secs(10), || {
        let ips = import_ips(east)?;
        Ok((ips.len() == 30 && ips.values().all(Option::is_some)).then_some(()))
    })?;
    assert!(waiting(east)?.is_empty());
    Ok(())
}
