//! Bad configs against the real binary. `fedgate analyze` names each problem as
//! `file:line:col: field: message` and exits 1: a ClusterSetIP range holding the gateway's own
//! listen address, a range error beside a type error of the same section, and `tls.ca: system`.
//! Whatever `fedgate run` refuses because of the config, `analyze` refuses first with the same
//! line: both go through the one validation.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedgate_e2e::*;

const CLUSTERSET: &str = "faults";
/// `fedgate`'s exit code for invalid input.
const EXIT_INVALID: i32 = 1;

/// A gateway config with real certificates and cluster directory, never started: a valid
/// base that each case breaks in one place.
struct Base {
    gateway: Gateway,
    text: String,
    _tmp: tempfile::TempDir,
}

impl Base {
    fn new(edit: impl FnOnce(&mut GatewaySpec, AddrBlock)) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let block = AddrBlock::unique();
        let pki = Pki::new(tmp.path(), "ca", CLUSTERSET)?;
        let tls = pki.issue("east", &tmp.path().join("certs-east"))?;
        let mut spec = GatewaySpec::mesh(block, CLUSTERSET, &["east", "west"], 0);
        edit(&mut spec, block);
        let gateway = Gateway::prepare(tmp.path(), spec, tls)?;
        let text = std::fs::read_to_string(gateway.config_path())?;
        Ok(Self { gateway, text, _tmp: tmp })
    }

    /// Writes the config with `from` replaced by `to` (which must occur) as `<name>.yaml`.
    fn variant(&self, name: &str, from: &str, to: &str) -> Result<(PathBuf, String)> {
        if !self.text.contains(from) {
            bail!("{from:?} is not in the config:\n{}", self.text);
        }
        let text = self.text.replacen(from, to, 1);
        let path = self.gateway.dir.join(format!("{name}.yaml"));
        std::fs::write(&path, &text)?;
        Ok((path, text))
    }
}

/// `line:col` (1-based) of the first `needle` in `text`.
fn position(text: &str, needle: &str) -> Result<String> {
    let at = text.find(needle).with_context(|| format!("{needle:?} not in:\n{text}"))?;
    let line = text[..at].matches('\n').count() + 1;
    let col = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1;
    Ok(format!("{line}:{col}"))
}

/// `file:line:col: ` of the value written after `key: ` (first occurrence) in `text`.
fn value_at(path: &Path, text: &str, key: &str) -> Result<String> {
    let key = format!("{key}: ");
    let pos = position(text, &key)?;
    let (line, col) = pos.split_once(':').context("line:col")?;
    let col: usize = col.parse()?;
    Ok(format!("{}:{line}:{}: ", path.display(), col + key.len()))
}

/// Runs `fedgate analyze` on `path`: it must exit 1 and print exactly `expected` lines.
fn analyze_refuses(path: &Path, expected: &[String]) -> Result<()> {
    let (code, out, err) = fedgate(&["analyze", &path.to_string_lossy()])?;
    assert_eq!(code, EXIT_INVALID, "analyze exit code; stdout:\n{out}\nstderr:\n{err}");
    let got: Vec<&str> = out.lines().collect();
    assert_eq!(got, expected, "analyze output; stderr:\n{err}");
    Ok(())
}

#[test]
fn the_base_config_is_valid() -> Result<()> {
    let base = Base::new(|_, _| {})?;
    let path = base.gateway.config_path();
    let (code, out, err) = fedgate(&["analyze", &path.to_string_lossy()])?;
    assert_eq!((code, out.trim()), (0, format!("{}: ok", path.display()).as_str()), "{err}");
    Ok(())
}

#[test]
fn a_clusterset_ip_range_holding_a_listen_address_is_refused() -> Result<()> {
    // The range is the test's whole block: the tunnel, DNS and admin addresses are all in it.
    let base = Base::new(|spec, block| spec.vip_range = format!("{}/24", block.ip(0)))?;
    let spec = &base.gateway.spec;
    let path = base.gateway.config_path();
    let at = value_at(&path, &base.text, "clusterSetIPRange")?;
    let range = &spec.vip_range;
    let line = |field: &str, addr| {
        format!(
            "{at}front.clusterSetIPRange: range {range} contains {field} {addr}: ClusterSetIPs \
             must not be the gateway's own addresses"
        )
    };
    let expected = [
        line("tunnel.listen", spec.tunnel),
        line("dns.listen", spec.dns),
        line("admin.listen", spec.admin),
    ];
    analyze_refuses(&path, &expected)
}

#[test]
fn a_range_error_is_reported_beside_a_type_error_of_its_section() -> Result<()> {
    let base = Base::new(|spec, _| {
        spec.extra = "traffic: { dataPlaneThreads: 0, drainDuration: soon }\n".to_owned();
    })?;
    let tunnel = format!("tunnel: {{ listen: \"{}\" }}", base.gateway.spec.tunnel);
    let bad = format!(
        "tunnel: {{ listen: \"{}\", socketBufferSize: 12, maxUdpPayloadSize: many }}",
        base.gateway.spec.tunnel
    );
    let (path, text) = base.variant("ranges", &tunnel, &bad)?;
    // (field whose value is named, message)
    let expected = [
        (
            "socketBufferSize",
            "tunnel.socketBufferSize: 12 is out of range (65536..=1073741824 bytes)",
        ),
        (
            "maxUdpPayloadSize",
            "tunnel.maxUdpPayloadSize: invalid type: string \"many\", expected u16",
        ),
        ("dataPlaneThreads", "traffic.dataPlaneThreads: 0 is out of range (1..=256)"),
        ("drainDuration", "traffic.drainDuration: invalid duration \"soon\""),
    ]
    .map(|(key, message)| Ok(format!("{}{message}", value_at(&path, &text, key)?)))
    .into_iter()
    .collect::<Result<Vec<String>>>()?;
    analyze_refuses(&path, &expected)
}

/// `fedgate run` on `path` must exit 1 before serving anything, printing `line` (the line
/// `analyze` printed) on stderr.
fn run_refuses(path: &Path, line: &str) -> Result<()> {
    let (code, out, err) = fedgate(&["run", "--config", &path.to_string_lossy()])?;
    assert_eq!(code, EXIT_INVALID, "run exit code; stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.lines().any(|l| l == line),
        "run does not name the problem as analyze does ({line}); stderr:\n{err}"
    );
    Ok(())
}

#[test]
fn tls_ca_system_is_refused_by_analyze_and_by_run() -> Result<()> {
    let base = Base::new(|_, _| {})?;
    let ca_key = "ca: ";
    let start = base.text.find(ca_key).context("tls.ca")? + ca_key.len();
    let ca = &base.text[start..start + base.text[start..].find(' ').context("end")?];
    let (path, text) = base.variant("ca-system", &format!("ca: {ca}"), "ca: system")?;
    let line = format!(
        "{}tls.ca: `system` (the operating system's roots) is not supported: peers' certificates \
         must chain to the clusterset's CA; name its PEM bundle",
        value_at(&path, &text, "ca")?
    );
    analyze_refuses(&path, std::slice::from_ref(&line))?;
    run_refuses(&path, &line)
}

/// What the tunnel, the DNS server and the sockets used to refuse only when `run` built them.
#[test]
fn what_run_refuses_at_start_up_analyze_refuses_first() -> Result<()> {
    let base = Base::new(|_, _| {})?;
    let spec = &base.gateway.spec;
    let dns = format!("dns: {{ listen: \"{}\"", spec.dns);
    let lease = format!("peerLeaseDuration: {}", spec.lease);
    // (case, text replaced, replacement, field whose value is named, message)
    let cases = [
        (
            "lease",
            lease.clone(),
            "peerLeaseDuration: 100ms".to_owned(),
            "peerLeaseDuration",
            "discovery.peerLeaseDuration: 100ms is shorter than 300ms".to_owned(),
        ),
        (
            "dns-on-admin",
            dns.clone(),
            format!("dns: {{ listen: \"{}\"", spec.admin),
            "admin: { listen",
            format!(
                "admin.listen: {} takes the same TCP port as dns.listen {}",
                spec.admin, spec.admin
            ),
        ),
    ];
    for (name, from, to, key, message) in cases {
        let (path, text) = base.variant(name, &from, &to)?;
        let line = format!("{}{message}", value_at(&path, &text, key)?);
        analyze_refuses(&path, std::slice::from_ref(&line)).context(name)?;
        run_refuses(&path, &line).context(name)?;
    }
    Ok(())
}
