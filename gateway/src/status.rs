//! `fedgate status` and `fedgate explain`: the dashboard's facts as aligned tables for the
//! shell, read from a running gateway's admin API.
//!
//! Fetching ([`AdminClient`]) is separate from rendering ([`render_status`],
//! [`render_explain`]), which are pure functions from the admin JSON to text.

use std::fmt::Write as _;
use std::time::Duration;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use serde_json::Value;

use crate::cli::{EXIT_INVALID, EXIT_OK};

/// `fedgate status` arguments.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The gateway's admin address (`admin.listen`): http://HOST:PORT or HOST:PORT.
    #[arg(long, default_value = DEFAULT_ADMIN)]
    pub admin: String,
    /// Show only the services of this namespace (clusters are always shown).
    #[arg(long, short)]
    pub namespace: Option<String>,
}

/// `fedgate explain` arguments.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The imported service, NAMESPACE/NAME.
    pub service: String,
    /// The service port to explain (default: its first TCP port).
    #[arg(long)]
    pub port: Option<u16>,
    /// A client address, for services with sessionAffinity ClientIP.
    #[arg(long)]
    pub client: Option<std::net::IpAddr>,
    /// The gateway's admin address (`admin.listen`): http://HOST:PORT or HOST:PORT.
    #[arg(long, default_value = DEFAULT_ADMIN)]
    pub admin: String,
}

/// `fedgate status`: prints the tables; exit 1 when the gateway cannot be read.
pub fn run_status(args: &StatusArgs, out: &mut dyn std::io::Write) -> u8 {
    let data = AdminClient::new(&args.admin)
        .and_then(|c| StatusData::fetch(&c, args.namespace.as_deref()))
        .map(|d| match &args.namespace {
            Some(ns) => d.only_namespace(ns),
            None => d,
        });
    match data {
        Ok(d) => {
            let _ = write!(out, "{}", render_status(&d, jiff::Timestamp::now()));
            EXIT_OK
        }
        Err(e) => {
            eprintln!("fedgate status: {e}");
            EXIT_INVALID
        }
    }
}

/// `fedgate explain`: prints the explanation; exit 1 when the gateway cannot be read or
/// does not import the service.
pub fn run_explain(args: &ExplainArgs, out: &mut dyn std::io::Write) -> u8 {
    let key = match crate::explain::parse_service(&args.service) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("fedgate explain: {e}");
            return EXIT_INVALID;
        }
    };
    let mut path = format!("/debug/explain?service={}/{}", key.namespace, key.name);
    if let Some(p) = args.port {
        let _ = write!(path, "&port={p}");
    }
    if let Some(c) = args.client {
        let _ = write!(path, "&client={c}");
    }
    match AdminClient::new(&args.admin).and_then(|c| c.get(&path)) {
        Ok(v) => {
            let _ = write!(out, "{}", render_explain(&v));
            EXIT_OK
        }
        Err(e) => {
            eprintln!("fedgate explain: {e}");
            EXIT_INVALID
        }
    }
}

/// Default admin address (`admin.listen`'s default).
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:15000";
/// Bound on each request to the admin API.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("admin URL {0:?} is not http://HOST:PORT (https is not served by the admin port)")]
    BadUrl(String),
    #[error(
        "cannot reach the gateway's admin API at {url}: {reason} (is the gateway running, and is --admin its admin.listen?)"
    )]
    Unreachable { url: String, reason: String },
    #[error("GET {url}: HTTP {status}: {message}")]
    Http { url: String, status: u16, message: String },
    #[error("GET {url}: the answer is not JSON: {reason}")]
    BadJson { url: String, reason: String },
}

/// Normalizes `--admin`: `HOST:PORT` or `http://HOST:PORT[/]`.
pub fn base_url(admin: &str) -> Result<String, StatusError> {
    let trimmed = admin.trim();
    let rest = match trimmed.split_once("://") {
        Some(("http", rest)) => rest,
        Some(_) => return Err(StatusError::BadUrl(admin.to_owned())),
        None => trimmed,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains('/') || rest.contains(char::is_whitespace) {
        return Err(StatusError::BadUrl(admin.to_owned()));
    }
    Ok(format!("http://{rest}"))
}

/// A blocking client of one gateway's admin API.
pub struct AdminClient {
    base: String,
    agent: ureq::Agent,
}

impl AdminClient {
    pub fn new(admin: &str) -> Result<Self, StatusError> {
        let base = base_url(admin)?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        Ok(Self { base, agent })
    }

    /// GETs `path` and parses the JSON; an error answer's `error` field becomes the message.
    pub fn get(&self, path: &str) -> Result<Value, StatusError> {
        let url = format!("{}{path}", self.base);
        let mut response = self.agent.get(&url).call().map_err(|e| StatusError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        })?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| StatusError::Unreachable { url: url.clone(), reason: e.to_string() })?;
        let json: Result<Value, _> = serde_json::from_str(&body);
        if status != 200 {
            let message = json
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| body.trim().to_owned());
            return Err(StatusError::Http { url, status, message });
        }
        json.map_err(|e| StatusError::BadJson { url, reason: e.to_string() })
    }
}

/// Everything `fedgate status` shows, as fetched.
pub struct StatusData {
    pub config: Value,
    pub clusters: Value,
    pub imports: Value,
    pub endpoints: Value,
    pub probes: Value,
    pub traffic: Value,
    pub failovers: Value,
    /// `/debug/certificates`: our leaf, peers' leaves, reloads, expiry warnings.
    pub certificates: Value,
    /// `/debug/leader` (`discovery.source: kube`): this replica's role and the Lease holder;
    /// null without an election.
    pub leader: Value,
}

impl StatusData {
    /// Fetches every view; with `namespace`, the imports of that namespace only.
    pub fn fetch(client: &AdminClient, namespace: Option<&str>) -> Result<Self, StatusError> {
        let imports = match namespace {
            Some(ns) => format!("/debug/imports?namespace={}", query_escape(ns)),
            None => "/debug/imports".to_owned(),
        };
        Ok(Self {
            config: client.get("/debug/config")?,
            clusters: client.get("/debug/clusters")?,
            imports: client.get(&imports)?,
            endpoints: client.get("/debug/endpoints")?,
            probes: client.get("/debug/probes")?,
            traffic: client.get("/debug/traffic")?,
            failovers: client.get("/debug/failovers")?,
            certificates: client.get("/debug/certificates")?,
            // only the kube source elects a writer: elsewhere the view does not exist
            leader: client.get("/debug/leader").unwrap_or(Value::Null),
        })
    }

    /// Keeps only what concerns services of `namespace` (clusters stay). Pure.
    pub fn only_namespace(mut self, namespace: &str) -> Self {
        let prefix = format!("{namespace}/");
        let by_name = |v: &Value| text(v).starts_with(&prefix);
        let retain = |v: &mut Value, keep: &dyn Fn(&Value) -> bool| {
            if let Some(items) = v.as_array_mut() {
                items.retain(|x| keep(x));
            }
        };
        retain(&mut self.imports, &|s| s["namespace"] == namespace);
        retain(&mut self.endpoints["services"], &|p| p["service"]["namespace"] == namespace);
        retain(&mut self.probes["probes"], &|p| p["service"]["namespace"] == namespace);
        retain(&mut self.traffic["flows"], &|f| by_name(&f["service"]));
        retain(&mut self.traffic["refused"], &|f| by_name(&f["service"]));
        retain(&mut self.failovers, &|f| by_name(&f["service"]));
        self
    }
}

/// Percent-encodes a query value (namespaces are DNS labels, but say what we send).
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    t
}

/// A JSON value as table text: strings bare, null empty.
fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn secs(v: &Value) -> String {
    v.as_f64().map(|s| format!("{s:.1}s")).unwrap_or_default()
}

fn bytes(v: &Value) -> String {
    let n = v.as_u64().unwrap_or(0) as f64;
    match n {
        n if n >= 1024.0 * 1024.0 * 1024.0 => format!("{:.1} GiB", n / (1024.0 * 1024.0 * 1024.0)),
        n if n >= 1024.0 * 1024.0 => format!("{:.1} MiB", n / (1024.0 * 1024.0)),
        n if n >= 1024.0 => format!("{:.1} KiB", n / 1024.0),
        n => format!("{n} B"),
    }
}

fn section(out: &mut String, title: &str, t: Table, empty: bool) {
    let _ = writeln!(out, "\n{title}");
    if empty {
        let _ = writeln!(out, "  (none)");
    } else {
        let _ = writeln!(out, "{t}");
    }
}

/// How long before `now` the timestamp `at` (RFC 3339 text) was: `2.5s ago`, or `at` itself
/// when it does not parse.
fn ago(at: &Value, now: jiff::Timestamp) -> String {
    let text = text(at);
    match text.parse::<jiff::Timestamp>() {
        Ok(t) => {
            let ms = now.as_millisecond().saturating_sub(t.as_millisecond()).max(0);
            format!("{:.1}s ago", ms as f64 / 1000.0)
        }
        Err(_) => text,
    }
}

/// `fedgate status` output at `now`. Pure.
pub fn render_status(d: &StatusData, now: jiff::Timestamp) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fedgate cluster {} in clusterset {}",
        text(&d.config["cluster"]["id"]),
        text(&d.config["cluster"]["clusterset"])
    );
    if !d.leader.is_null() {
        let l = &d.leader;
        let holder = match l["holder"].as_str() {
            Some(h) if l["role"] == "leader" => format!("this replica, {h}"),
            Some(h) => h.to_owned(),
            None => "nobody".to_owned(),
        };
        let renewed = l["renewedSecondsAgo"]
            .as_f64()
            .map(|s| format!(", renewed {s:.1}s ago"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "replica {} is the {} (Lease {} held by {holder}{renewed})",
            text(&l["identity"]),
            text(&l["role"]),
            text(&l["lease"]),
        );
    }
    // Certificate trouble first: a cluster about to leave the clusterset matters most.
    for w in items(&d.certificates["warnings"]) {
        let _ = writeln!(out, "WARNING: {}", text(&w["message"]));
    }
    if let Some(error) = d.certificates["reload"]["lastError"].as_str() {
        let _ = writeln!(out, "WARNING: the last certificate reload was refused: {error}");
    }

    let mut t = table(&[
        "CLUSTER",
        "STATUS",
        "REGION",
        "ZONE",
        "RTT",
        "MTU",
        "LEASE AGE",
        "LEASE LEFT",
        "SERVICES",
        "ENDPOINTS",
        "LAST ERROR",
    ]);
    for c in items(&d.clusters) {
        t.add_row(vec![
            text(&c["id"]),
            text(&c["status"]),
            text(&c["region"]),
            text(&c["zone"]),
            c["rttMs"].as_f64().map(|r| format!("{r:.2} ms")).unwrap_or_default(),
            text(&c["pathMtu"]),
            secs(&c["leaseAgeSecs"]),
            secs(&c["leaseRemainingSecs"]),
            text(&c["services"]),
            text(&c["endpoints"]),
            text(&c["lastError"]),
        ]);
    }
    section(&mut out, "CLUSTERS", t, items(&d.clusters).is_empty());

    let mut t = table(&[
        "PEER",
        "REPLICA",
        "INSTANCE",
        "STATE",
        "RTT",
        "LEASE AGE",
        "EXPORTS",
        "LAST ERROR",
    ]);
    let mut any_replica = false;
    for c in items(&d.clusters) {
        let replicas = items(&c["replicas"]);
        let expected = c["expectedReplicas"].as_u64().unwrap_or(replicas.len() as u64);
        let connected = replicas.iter().filter(|r| r["connected"] == true).count();
        for (i, r) in replicas.iter().enumerate() {
            any_replica = true;
            let state = match (r["connected"] == true, r["draining"] == true) {
                (true, true) => "draining",
                (true, false) => "up",
                _ => "down",
            };
            let peer = format!("{} ({connected}/{expected})", text(&c["id"]));
            t.add_row(vec![
                if i == 0 { peer } else { String::new() },
                text(&r["address"]),
                text(&r["instance"]),
                state.to_owned(),
                r["rttMs"].as_f64().map(|r| format!("{r:.2} ms")).unwrap_or_default(),
                secs(&r["leaseAgeSecs"]),
                text(&r["exportsVersion"]),
                text(&r["lastError"]),
            ]);
        }
    }
    section(&mut out, "PEER REPLICAS", t, !any_replica);

    let mut t = table(&["SERVICE", "TYPE", "CLUSTERSET IP", "PORTS", "CLUSTER", "ENDPOINTS"]);
    let mut conflicts = table(&["SERVICE", "CONFLICT", "WINNER", "DISAGREEING", "MESSAGE"]);
    let mut any_conflict = false;
    for s in items(&d.imports) {
        let name = format!("{}/{}", text(&s["namespace"]), text(&s["name"]));
        let ports: Vec<String> = items(&s["ports"])
            .iter()
            .map(|p| format!("{}/{}", text(&p["port"]), text(&p["protocol"])))
            .collect();
        let ips: Vec<String> = items(&s["ips"]).iter().map(text).collect();
        let winner = text(&s["winner"]);
        let clusters = s["clusters"].as_object().cloned().unwrap_or_default();
        for (i, (cluster, e)) in clusters.iter().enumerate() {
            let eps = items(&e["endpoints"]);
            let ready =
                eps.iter().filter(|x| x["ready"] == true && x["health"] != "Unhealthy").count();
            let star = if *cluster == winner { " (winner)" } else { "" };
            let first = i == 0;
            t.add_row(vec![
                if first { name.clone() } else { String::new() },
                if first { text(&s["type"]) } else { String::new() },
                if first { ips.join(", ") } else { String::new() },
                if first { ports.join(", ") } else { String::new() },
                format!("{cluster}{star}"),
                format!("{ready}/{} ready", eps.len()),
            ]);
        }
        for c in items(&s["conflicts"]) {
            any_conflict = true;
            let disagreeing: Vec<String> = items(&c["disagreeing"]).iter().map(text).collect();
            conflicts.add_row(vec![
                name.clone(),
                text(&c["reason"]),
                text(&c["winner"]),
                disagreeing.join(", "),
                text(&c["message"]),
            ]);
        }
    }
    section(&mut out, "SERVICES (imports per cluster)", t, items(&d.imports).is_empty());
    section(&mut out, "CONFLICTS", conflicts, !any_conflict);

    let mut t = table(&[
        "SERVICE:PORT",
        "CLUSTER",
        "ENDPOINT",
        "PATH",
        "TIER",
        "HEALTH",
        "ACTIVE",
        "LAST PROBE",
        "SKIPPED",
    ]);
    let mut rows = 0;
    for p in items(&d.endpoints["services"]) {
        let svc = format!(
            "{}/{}:{}",
            text(&p["service"]["namespace"]),
            text(&p["service"]["name"]),
            text(&p["port"])
        );
        for e in items(&p["endpoints"]) {
            rows += 1;
            let probe = items(&d.probes["probes"]).iter().find(|r| {
                r["address"] == e["address"]
                    && r["service"] == p["service"]
                    && e["cluster"] == d.config["cluster"]["id"]
            });
            let probe = probe
                .map(|r| {
                    let lp = &r["lastProbe"];
                    let at = ago(&lp["at"], now);
                    if lp["ok"] == true {
                        format!("ok {at}")
                    } else {
                        format!("failed {at}: {}", text(&lp["error"]))
                    }
                })
                .unwrap_or_default();
            let skipped: Vec<String> = items(&e["skipped"]).iter().map(text).collect();
            t.add_row(vec![
                svc.clone(),
                text(&e["cluster"]),
                format!("{}:{}", text(&e["address"]), text(&e["port"])),
                text(&e["path"]),
                text(&e["tier"]),
                if e["healthy"] == true { "ok".to_owned() } else { text(&e["health"]) },
                text(&e["outstanding"]),
                probe,
                skipped.join(", "),
            ]);
        }
    }
    section(&mut out, "ENDPOINTS (as a new connection from this cluster sees them)", t, rows == 0);

    let mut t =
        table(&["SERVICE", "TARGET CLUSTER", "CONNECTIONS", "ACTIVE", "BYTES TX", "BYTES RX"]);
    for f in items(&d.traffic["flows"]) {
        t.add_row(vec![
            text(&f["service"]),
            text(&f["targetCluster"]),
            text(&f["connections"]),
            text(&f["active"]),
            bytes(&f["bytesTx"]),
            bytes(&f["bytesRx"]),
        ]);
    }
    for r in items(&d.traffic["refused"]) {
        t.add_row(vec![
            text(&r["service"]),
            format!("refused: {}", text(&r["reason"])),
            text(&r["connections"]),
            "0".to_owned(),
            String::new(),
            String::new(),
        ]);
    }
    let empty = items(&d.traffic["flows"]).is_empty() && items(&d.traffic["refused"]).is_empty();
    section(&mut out, "TRAFFIC", t, empty);

    let mut t = table(&["LAST", "SERVICE", "FROM", "TO", "COUNT", "REASON"]);
    for f in items(&d.failovers) {
        let from: Vec<String> = items(&f["fromClusters"]).iter().map(text).collect();
        t.add_row(vec![
            ago(&f["last"], now),
            format!("{}:{}", text(&f["service"]), text(&f["port"])),
            format!("tier {} ({})", text(&f["fromTier"]), from.join(", ")),
            format!(
                "tier {} ({}/{})",
                text(&f["toTier"]),
                text(&f["toCluster"]),
                text(&f["toEndpoint"])
            ),
            text(&f["count"]),
            text(&f["reason"]),
        ]);
    }
    section(&mut out, "RECENT FAILOVERS", t, items(&d.failovers).is_empty());

    let mut t = table(&["CERTIFICATE", "NOT AFTER", "LEFT"]);
    let left = |v: &Value| match v.as_i64() {
        Some(s) if s < 0 => "expired".to_owned(),
        Some(s) => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        None => String::new(),
    };
    let own = &d.certificates["own"];
    if !own.is_null() {
        t.add_row(vec!["own".to_owned(), text(&own["notAfter"]), left(&own["remainingSecs"])]);
    }
    for p in items(&d.certificates["peers"]) {
        t.add_row(vec![
            format!("peer {}", text(&p["cluster"])),
            text(&p["notAfter"]),
            left(&p["remainingSecs"]),
        ]);
    }
    let empty = own.is_null() && items(&d.certificates["peers"]).is_empty();
    section(&mut out, "CERTIFICATES", t, empty);
    out
}

/// `fedgate explain` output from a `/debug/explain` answer. Pure.
pub fn render_explain(e: &Value) -> String {
    let mut out = String::new();
    let d = &e["decision"];
    let _ = writeln!(
        out,
        "service {}/{} port {}/{} from cluster {}",
        text(&e["service"]["namespace"]),
        text(&e["service"]["name"]),
        text(&e["port"]),
        text(&e["protocol"]),
        text(&e["cluster"])
    );
    let client: Vec<String> = e["clientLabels"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", text(v))).collect())
        .unwrap_or_default();
    let _ = writeln!(out, "client labels: {}", client.join(", "));
    let prio: Vec<String> = items(&e["failoverPriority"])
        .iter()
        .map(|p| match p["value"].as_str() {
            Some(v) => format!("{}={v}", text(&p["key"])),
            None => text(&p["key"]),
        })
        .collect();
    let _ = writeln!(out, "failoverPriority: {}", prio.join(" > "));
    let _ = writeln!(
        out,
        "best tier: {}   chosen tier: {}   failover: {}   balancing: {}",
        text(&d["bestTier"]),
        if d["chosenTier"].is_null() { "none".to_owned() } else { text(&d["chosenTier"]) },
        if d["failover"] == true { "yes" } else { "no" },
        text(&d["balancing"])
    );
    let _ = writeln!(out, "=> {}", text(&d["summary"]));

    let mut t = table(&["CANDIDATE CLUSTER", "ENDPOINT", "OUTSTANDING", "PICK"]);
    let chosen = &d["chosen"];
    for c in items(&d["candidates"]) {
        let pick = if chosen.is_null() {
            "p2c"
        } else if chosen["address"] == c["address"] && chosen["cluster"] == c["cluster"] {
            "chosen"
        } else {
            ""
        };
        t.add_row(vec![
            text(&c["cluster"]),
            format!("{}:{}", text(&c["address"]), text(&c["port"])),
            text(&c["outstanding"]),
            pick.to_owned(),
        ]);
    }
    section(&mut out, "CANDIDATES", t, items(&d["candidates"]).is_empty());

    let mut t = table(&["TIER", "HEALTHY", "TRIED", "CLUSTERS"]);
    for p in items(&d["plan"]) {
        let clusters: Vec<String> = items(&p["clusters"]).iter().map(text).collect();
        t.add_row(vec![
            text(&p["tier"]),
            text(&p["healthy"]),
            text(&p["tried"]),
            clusters.join(", "),
        ]);
    }
    section(&mut out, "ATTEMPT ORDER", t, items(&d["plan"]).is_empty());

    let mut t = table(&["CLUSTER", "ENDPOINT", "PATH", "TIER", "LABELS", "HEALTH", "ROLE", "WHY"]);
    for x in items(&e["endpoints"]) {
        let labels: Vec<String> = items(&x["priority"])
            .iter()
            .map(|c| {
                let mark = match c["result"].as_str() {
                    Some("match") => "=",
                    Some("mismatch") => "≠",
                    _ => "·",
                };
                format!("{}{mark}{}", short_key(&text(&c["key"])), text(&c["actual"]))
            })
            .collect();
        let mut why: Vec<String> = items(&x["reasons"]).iter().map(text).collect();
        if why.is_empty()
            && let Some(m) = items(&x["priority"]).iter().find(|c| c["result"] == "mismatch")
        {
            why.push(format!("tier {}: {}", text(&x["tier"]), text(&m["why"])));
        }
        t.add_row(vec![
            text(&x["cluster"]),
            format!("{}:{}", text(&x["address"]), text(&x["port"])),
            text(&x["path"]),
            text(&x["tier"]),
            labels.join(" "),
            text(&x["health"]),
            text(&x["role"]),
            why.join("; "),
        ]);
    }
    section(&mut out, "ENDPOINTS", t, items(&e["endpoints"]).is_empty());
    out
}

/// `topology.kubernetes.io/zone` → `zone`: the table stays readable.
fn short_key(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subcommands_parse() {
        use crate::cli::{Command, parse_from};
        let cli = parse_from(["fedgate", "explain", "shop/web", "--admin", "h:1", "--port", "80"])
            .expect("parses");
        match cli.command {
            Command::Explain(a) => {
                assert_eq!(
                    (a.service.as_str(), a.port, a.admin.as_str()),
                    ("shop/web", Some(80), "h:1")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        match parse_from(["fedgate", "status"]).expect("parses").command {
            Command::Status(a) => {
                assert_eq!((a.admin.as_str(), a.namespace), (DEFAULT_ADMIN, None))
            }
            other => panic!("unexpected {other:?}"),
        }
        match parse_from(["fedgate", "status", "-n", "shop"]).expect("parses").command {
            Command::Status(a) => assert_eq!(a.namespace.as_deref(), Some("shop")),
            other => panic!("unexpected {other:?}"),
        }
        assert!(parse_from(["fedgate", "explain"]).is_err(), "the service is required");
    }

    #[test]
    fn admin_urls() {
        let cases = [
            ("127.0.0.1:15000", Some("http://127.0.0.1:15000")),
            ("http://127.0.0.1:15000/", Some("http://127.0.0.1:15000")),
            (" http://[::1]:15000 ", Some("http://[::1]:15000")),
            ("https://127.0.0.1:15000", None),
            ("http://", None),
            ("http://h:1/debug", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(base_url(input).ok().as_deref(), want, "{input:?}");
        }
    }

    #[test]
    fn unreachable_admin_is_a_clear_error() {
        // A port that was just free: nothing listens there.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let err = AdminClient::new(&addr.to_string()).unwrap().get("/debug/clusters").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cannot reach the gateway's admin API"), "{msg}");
        assert!(msg.contains(&addr.to_string()), "{msg}");
    }

    fn data() -> StatusData {
        StatusData {
            config: json!({"cluster": {"id": "east", "clusterset": "demo"}}),
            clusters: json!([
                {"id": "east", "status": "local", "region": "us", "zone": "a", "services": 1, "endpoints": 1},
                {"id": "west", "status": "up", "rttMs": 0.42, "pathMtu": 8952, "leaseAgeSecs": 1.0,
                 "leaseRemainingSecs": 14.0, "services": 1, "endpoints": 1, "expectedReplicas": 2,
                 "replicas": [
                    {"address": "10.0.0.2:15443", "instance": "5f0c1d2e3a4b", "connected": true,
                     "draining": false, "rttMs": 0.42, "leaseAgeSecs": 1.0, "exportsVersion": 1764122400000u64},
                    {"address": "10.0.0.3:15443", "connected": false,
                     "lastError": "timed out"}]}
            ]),
            imports: json!([{
                "namespace": "shop", "name": "web", "type": "ClusterSetIP", "ips": ["242.1.0.1"],
                "ports": [{"port": 80, "protocol": "TCP"}], "winner": "east",
                "clusters": {
                    "east": {"endpoints": [{"address": "10.0.0.1", "ready": true, "health": "Unhealthy"}]},
                    "west": {"endpoints": [{"address": "10.2.0.1", "ready": true, "health": "Healthy"}]}
                },
                "conflicts": [{"reason": "PortConflict", "winner": "east", "disagreeing": ["west"],
                               "message": "Conflicting ports"}]
            }]),
            endpoints: json!({"services": [{
            "service": {"namespace": "shop", "name": "web"}, "port": 80,
            "endpoints": [
                {"cluster": "east", "address": "10.0.0.1", "port": 8080, "tier": 0,
                 "health": "Unhealthy", "healthy": false, "outstanding": 0, "skipped": ["unhealthy"]},
                {"cluster": "west", "address": "10.2.0.1", "port": 8080, "tier": 3,
                 "health": "Healthy", "healthy": true, "outstanding": 2, "skipped": [],
                 "path": "direct"}
            ]}]}),
            probes: json!({"probes": [{"service": {"namespace": "shop", "name": "web"},
                "address": "10.0.0.1", "lastProbe": {"ok": false, "at": "2026-11-26T02:00:00Z",
                "error": "connection refused"}}], "ejected": []}),
            traffic: json!({"activeConnections": 1, "flows": [
                {"service": "shop/web", "targetCluster": "west", "connections": 3, "active": 1,
                 "bytesTx": 2048, "bytesRx": 5}],
                "refused": [{"service": "shop/web", "reason": "no_healthy_endpoint", "connections": 2}]}),
            failovers: json!([{"last": "2026-11-26T02:00:01Z", "service": "shop/web", "port": 80,
                "fromTier": 0, "fromClusters": ["east"], "toTier": 3, "toCluster": "west",
                "toEndpoint": "10.2.0.1", "count": 4, "reason": "tier 0 unavailable: east/10.0.0.1 unhealthy"}]),
            certificates: json!({
                "own": {"notAfter": "2027-02-24T02:00:00Z", "remainingSecs": 7_776_000},
                "peers": [{"cluster": "west", "notAfter": "2026-11-30T02:00:00Z",
                           "remainingSecs": 345_600}],
                "reload": {"reloads": 0, "failures": 1,
                           "lastError": "certificate /tls/east.crt expired at 2026-11-25T00:00:00Z"},
                "warnings": [{"cert": "peer", "cluster": "west",
                              "message": "peer west's certificate expires at 2026-11-30T02:00:00Z (in 4d 0h)"}]
            }),
            leader: json!({"role": "follower", "identity": "fedgate-1", "holder": "fedgate-0",
                "lease": "fedgate-system/fedgate-leader", "renewedSecondsAgo": 1.25}),
        }
    }

    #[test]
    fn status_tables_carry_every_fact() {
        let now: jiff::Timestamp = "2026-11-26T02:00:03Z".parse().unwrap();
        let out = render_status(&data(), now);
        for want in [
            "fedgate cluster east in clusterset demo",
            "0.42 ms",
            "8952",
            "14.0s",
            "east (winner)",
            "0/1 ready",
            "1/1 ready",
            "PortConflict",
            "failed 3.0s ago: connection refused",
            "2.0 KiB",
            "refused: no_healthy_endpoint",
            "tier 0 (east)",
            "tier 3 (west/10.2.0.1)",
            "tier 0 unavailable: east/10.0.0.1 unhealthy",
            "WARNING: peer west's certificate expires at 2026-11-30T02:00:00Z (in 4d 0h)",
            "WARNING: the last certificate reload was refused: certificate /tls/east.crt expired",
            "2027-02-24T02:00:00Z",
            "90d 0h",
            "peer west",
            "west (1/2)",
            "5f0c1d2e3a4b",
            "1764122400000",
            "10.0.0.3:15443",
            "┆ direct ",
            "replica fedgate-1 is the follower (Lease fedgate-system/fedgate-leader held by fedgate-0, renewed 1.2s ago)",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
        // Aligned: every line of a table has the same width.
        let clusters: Vec<&str> = out
            .lines()
            .skip_while(|l| *l != "CLUSTERS")
            .skip(1)
            .take_while(|l| !l.is_empty())
            .collect();
        let widths: Vec<usize> = clusters.iter().map(|l| l.chars().count()).collect();
        assert!(widths.len() >= 4 && widths.iter().all(|w| *w == widths[0]), "{clusters:#?}");
        let other = render_status(&data().only_namespace("other"), now);
        assert!(other.contains("SERVICES (imports per cluster)\n  (none)"), "{other}");
        assert!(other.contains("TRAFFIC\n  (none)") && other.contains("0.42 ms"), "{other}");
        let shop = render_status(&data().only_namespace("shop"), now);
        assert_eq!(shop, out, "everything is in shop");
        assert_eq!(query_escape("a b/c"), "a%20b%2Fc");
        let empty = StatusData { failovers: json!([]), leader: Value::Null, ..data() };
        let empty = render_status(&empty, now);
        assert!(empty.contains("RECENT FAILOVERS\n  (none)"));
        assert!(!empty.contains("replica "), "no election, no role line:\n{empty}");
        assert!(out.contains("│ 2.0s ago "), "failover age:\n{out}");
    }

    #[test]
    fn explain_table() {
        let e = json!({
            "service": {"namespace": "shop", "name": "web"}, "port": 80, "protocol": "TCP",
            "cluster": "east", "clientLabels": {"topology.kubernetes.io/region": "us"},
            "failoverPriority": [{"key": "topology.kubernetes.io/region", "value": null}],
            "decision": {"bestTier": 0, "chosenTier": 1, "failover": true,
                "balancing": "power_of_two_choices", "chosen": null,
                "candidates": [{"cluster": "west", "address": "10.2.0.1", "port": 8080, "outstanding": 2}],
                "plan": [{"tier": 1, "healthy": 1, "tried": 1, "clusters": ["west"]}],
                "summary": "failover: tier 0 has no healthy endpoint"},
            "endpoints": [
                {"cluster": "east", "address": "10.0.0.1", "port": 8080, "tier": 0,
                 "priority": [{"key": "topology.kubernetes.io/region", "actual": "us", "result": "match"}],
                 "health": "Unhealthy", "role": "skipped",
                 "reasons": ["last probe of 10.0.0.1:8080 failed 1.0s ago: connection refused"]},
                {"cluster": "west", "address": "10.2.0.1", "port": 8080, "tier": 1,
                 "path": "tunnel", "priority": [{"key": "topology.kubernetes.io/region", "actual": "eu",
                               "result": "mismatch", "why": "client has region=us, endpoint has eu"}],
                 "health": "Healthy", "role": "candidate", "reasons": []}
            ]
        });
        let out = render_explain(&e);
        for want in [
            "service shop/web port 80/TCP from cluster east",
            "chosen tier: 1",
            "failover: yes",
            "=> failover: tier 0 has no healthy endpoint",
            "p2c",
            "region=us",
            "region≠eu",
            "connection refused",
            "tier 1: client has region=us, endpoint has eu",
            "candidate",
            "┆ tunnel ",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
    }
}
