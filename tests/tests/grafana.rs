//! `deploy/grafana/fedgate.json` is a real Grafana dashboard over series the gateway really
//! exports: the JSON is checked for the structure Grafana imports (datasource variable, panel
//! ids, grid), every PromQL expression is tokenized and its metric names extracted, and three
//! real gateways are driven (traffic through a ClusterSetIP with a failing endpoint, a tunnel
//! hop, DNS queries of every kind, a dead peer, a peer with a foreign certificate) until each
//! of those names is in some gateway's `/metrics`. The failure message lists what is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fedgate_e2e::*;
use serde_json::Value;

/// A small PromQL tokenizer: enough to find every metric name in an expression (and to reject
/// unbalanced brackets, unterminated strings and unknown functions), not a full parser.
mod promql {
    use std::collections::BTreeSet;

    use anyhow::{Result, bail};

    #[derive(Clone, Debug, PartialEq)]
    pub enum Token {
        Ident(String),
        /// A Grafana variable: `$x`, `${x}`, `$__rate_interval`.
        Variable(String),
        Str(String),
        /// Numbers and durations (`0.99`, `5m`, `1e3`).
        Number(String),
        Punct(char),
        /// Operators of more than one character, and the single-character ones other than
        /// brackets and commas.
        Op(String),
    }

    pub fn tokenize(expr: &str) -> Result<Vec<Token>> {
        let chars: Vec<char> = expr.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c.is_whitespace() {
                i += 1;
            } else if c == '#' {
                // A comment runs to the end of the line.
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            } else if c == '"' || c == '\'' || c == '`' {
                let start = i;
                i += 1;
                let mut s = String::new();
                loop {
                    let Some(&d) = chars.get(i) else {
                        bail!("unterminated string starting at offset {start} in {expr:?}");
                    };
                    i += 1;
                    if d == c {
                        break;
                    }
                    if d == '\\' && c != '`' {
                        if let Some(&e) = chars.get(i) {
                            s.push(e);
                            i += 1;
                        }
                        continue;
                    }
                    s.push(d);
                }
                out.push(Token::Str(s));
            } else if c == '$' {
                let start = i;
                i += 1;
                if chars.get(i) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                    if i == chars.len() {
                        bail!("unterminated variable starting at offset {start} in {expr:?}");
                    }
                    i += 1;
                } else {
                    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
                out.push(Token::Variable(chars[start..i].iter().collect()));
            } else if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
            {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                out.push(Token::Number(chars[start..i].iter().collect()));
            } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                out.push(Token::Ident(chars[start..i].iter().collect()));
            } else if "(){}[],".contains(c) {
                out.push(Token::Punct(c));
                i += 1;
            } else {
                let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
                if ["==", "!=", "<=", ">=", "=~", "!~"].contains(&two.as_str()) {
                    out.push(Token::Op(two));
                    i += 2;
                } else if "+-*/%^<>=@".contains(c) {
                    out.push(Token::Op(c.to_string()));
                    i += 1;
                } else {
                    bail!("unexpected character {c:?} at offset {i} in {expr:?}");
                }
            }
        }
        Ok(out)
    }

    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];

    const FUNCTIONS: &[&str] = &[
        "abs",
        "absent",
        "absent_over_time",
        "acos",
        "acosh",
        "asin",
        "asinh",
        "atan",
        "atanh",
        "avg_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "cos",
        "cosh",
        "count_over_time",
        "day_of_month",
        "day_of_week",
        "day_of_year",
        "days_in_month",
        "deg",
        "delta",
        "deriv",
        "double_exponential_smoothing",
        "exp",
        "floor",
        "histogram_avg",
        "histogram_count",
        "histogram_fraction",
        "histogram_quantile",
        "histogram_stddev",
        "histogram_stdvar",
        "histogram_sum",
        "holt_winters",
        "hour",
        "idelta",
        "increase",
        "irate",
        "label_join",
        "label_replace",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "mad_over_time",
        "max_over_time",
        "min_over_time",
        "minute",
        "month",
        "pi",
        "predict_linear",
        "present_over_time",
        "quantile_over_time",
        "rad",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sin",
        "sinh",
        "sort",
        "sort_by_label",
        "sort_by_label_desc",
        "sort_desc",
        "sqrt",
        "stddev_over_time",
        "stdvar_over_time",
        "sum_over_time",
        "tan",
        "tanh",
        "time",
        "timestamp",
        "vector",
        "year",
    ];

    /// Keywords followed by a parenthesized list of label names.
    const LABEL_LIST_KEYWORDS: &[&str] =
        &["by", "without", "on", "ignoring", "group_left", "group_right"];

    /// Other keywords (binary operators and modifiers).
    const KEYWORDS: &[&str] = &["and", "or", "unless", "atan2", "bool", "offset"];

    #[derive(Clone, Copy, PartialEq)]
    enum Ctx {
        Paren,
        Labels,
        Matchers,
        Range,
    }

    /// The metric names a PromQL expression selects.
    pub fn metric_names(expr: &str) -> Result<BTreeSet<String>> {
        names_in(&tokenize(expr)?, expr)
    }

    /// The metric names of a Grafana variable query: `label_values(SELECTOR, label)`,
    /// `query_result(EXPR)`, or a bare PromQL expression.
    pub fn variable_query_names(query: &str) -> Result<BTreeSet<String>> {
        let tokens = tokenize(query)?;
        let call = |name: &str| {
            matches!(tokens.first(), Some(Token::Ident(f)) if f == name)
                && tokens.get(1) == Some(&Token::Punct('('))
                && tokens.last() == Some(&Token::Punct(')'))
        };
        if call("label_values") {
            let inner = &tokens[2..tokens.len() - 1];
            // The last top-level argument is the label name.
            let mut depth = 0i32;
            let mut last_comma = None;
            for (i, t) in inner.iter().enumerate() {
                match t {
                    Token::Punct('(' | '{' | '[') => depth += 1,
                    Token::Punct(')' | '}' | ']') => depth -= 1,
                    Token::Punct(',') if depth == 0 => last_comma = Some(i),
                    _ => {}
                }
            }
            let selector = last_comma.map_or(&[][..], |i| &inner[..i]);
            return names_in(selector, query);
        }
        if call("query_result") {
            return names_in(&tokens[2..tokens.len() - 1], query);
        }
        names_in(&tokens, query)
    }

    fn names_in(tokens: &[Token], expr: &str) -> Result<BTreeSet<String>> {
        let mut names = BTreeSet::new();
        let mut stack: Vec<Ctx> = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let ctx = stack.last().copied();
            let prev = i.checked_sub(1).and_then(|p| tokens.get(p));
            let next = tokens.get(i + 1);
            match t {
                Token::Punct('(') => {
                    let labels = matches!(prev, Some(Token::Ident(k)) if LABEL_LIST_KEYWORDS.contains(&k.as_str()));
                    stack.push(if labels { Ctx::Labels } else { Ctx::Paren });
                }
                Token::Punct('{') => stack.push(Ctx::Matchers),
                Token::Punct('[') => stack.push(Ctx::Range),
                Token::Punct(c @ (')' | '}' | ']')) => {
                    let want = match c {
                        ')' => [Ctx::Paren, Ctx::Labels].as_slice(),
                        '}' => &[Ctx::Matchers],
                        _ => &[Ctx::Range],
                    };
                    match stack.pop() {
                        Some(open) if want.contains(&open) => {}
                        _ => bail!("unbalanced {c:?} in {expr:?}"),
                    }
                }
                Token::Ident(id) => {
                    if matches!(ctx, Some(Ctx::Labels | Ctx::Matchers | Ctx::Range)) {
                        continue;
                    }
                    let is_call = next == Some(&Token::Punct('('));
                    if AGGREGATIONS.contains(&id.as_str()) || FUNCTIONS.contains(&id.as_str()) {
                        continue;
                    }
                    if LABEL_LIST_KEYWORDS.contains(&id.as_str()) || KEYWORDS.contains(&id.as_str())
                    {
                        continue;
                    }
                    if is_call {
                        bail!("unknown function {id:?} in {expr:?}");
                    }
                    names.insert(id.clone());
                }
                _ => {}
            }
        }
        if let Some(open) = stack.last() {
            let c = match open {
                Ctx::Paren | Ctx::Labels => '(',
                Ctx::Matchers => '{',
                Ctx::Range => '[',
            };
            bail!("unclosed {c:?} in {expr:?}");
        }
        Ok(names)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn metric_names_of_promql_expressions() {
            let cases: &[(&str, &[&str])] = &[
                ("up", &["up"]),
                ("rate(foo_total[5m])", &["foo_total"]),
                (
                    r#"sum by (service, le) (rate(a_bucket{x="y", z=~"$v"}[$__rate_interval]))"#,
                    &["a_bucket"],
                ),
                ("a / on(instance) group_left(peer) b", &["a", "b"]),
                ("histogram_quantile(0.99, sum by (le) (rate(x_bucket[1m])))", &["x_bucket"]),
                ("sum without (instance) (up) > bool 1", &["up"]),
                (r#"foo{job=~"a,b(c"} offset 5m"#, &["foo"]),
                ("max(x) by (peer) - min(y:rate5m)", &["x", "y:rate5m"]),
                ("x and y unless z or w", &["w", "x", "y", "z"]),
                (r#"sum(rate(x[5m:1m])) # a comment naming not_a_metric"#, &["x"]),
                ("1 + 2", &[]),
                ("topk(3, x) atan2 y", &["x", "y"]),
            ];
            for (expr, want) in cases {
                let got = metric_names(expr).unwrap_or_else(|e| panic!("{expr}: {e:#}"));
                let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
                assert_eq!(got, want, "{expr}");
            }
        }

        #[test]
        fn malformed_expressions_are_rejected_with_the_reason() {
            let cases = [
                ("rat(x[5m])", "unknown function \"rat\""),
                ("sum(x", "unclosed '('"),
                ("sum(x))", "unbalanced ')'"),
                ("x{a=\"b}", "unterminated string"),
                ("x{a=\"b\"]", "unbalanced ']'"),
                ("x ? y", "unexpected character '?'"),
                ("x[${oops", "unterminated variable"),
            ];
            for (expr, why) in cases {
                let err = metric_names(expr).expect_err(expr).to_string();
                assert!(err.contains(why), "{expr}: {err}");
            }
        }

        #[test]
        fn metric_names_of_variable_queries() {
            let cases: &[(&str, &[&str])] = &[
                (r#"label_values(fedgate_x{job=~"$job"}, instance)"#, &["fedgate_x"]),
                ("label_values(instance)", &[]),
                ("query_result(topk(5, fedgate_y))", &["fedgate_y"]),
                ("fedgate_z", &["fedgate_z"]),
            ];
            for (q, want) in cases {
                let got = variable_query_names(q).unwrap_or_else(|e| panic!("{q}: {e:#}"));
                let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
                assert_eq!(got, want, "{q}");
            }
        }
    }
}

fn dashboard_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/fedgate.json")
}

fn load_dashboard() -> Result<Value> {
    let path = dashboard_path();
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the Grafana dashboard {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// Every panel, rows' nested panels included.
fn all_panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// (where, expression) for every PromQL expression of the dashboard: panel targets and
/// query variables.
fn expressions(dash: &Value) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for p in all_panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                let title = p["title"].as_str().unwrap_or("?");
                let at = format!("panel {title:?} target {}", t["refId"].as_str().unwrap_or("?"));
                out.push((at, e.to_owned(), false));
            }
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().or_else(|| v["query"].as_str());
            if let Some(q) = q {
                let name = v["name"].as_str().unwrap_or("?");
                out.push((format!("variable {name:?}"), q.to_owned(), true));
            }
        }
    }
    out
}

/// Metric names the dashboard reads, with where each is used.
fn dashboard_metrics(dash: &Value) -> Result<BTreeMap<String, Vec<String>>> {
    let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (at, expr, is_variable) in expressions(dash) {
        let found = if is_variable {
            promql::variable_query_names(&expr)
        } else {
            promql::metric_names(&expr)
        }
        .with_context(|| at.clone())?;
        ensure!(!found.is_empty() || is_variable, "{at}: no metric in {expr:?}");
        for n in found {
            names.entry(n).or_default().push(at.clone());
        }
    }
    Ok(names)
}

#[test]
fn dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable() -> Result<()> {
    let dash = load_dashboard()?;
    assert_eq!(dash["title"], "fedgate");
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "uid");
    let schema = dash["schemaVersion"].as_u64().context("schemaVersion")?;
    assert!(schema >= 36, "schemaVersion {schema}: export from Grafana 9.x or later");

    let vars = dash["templating"]["list"].as_array().context("templating.list")?;
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .context("a datasource variable (so the dashboard imports into any Grafana)")?;
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().context("datasource variable name")?);

    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    let panels = all_panels(&dash);
    for p in &panels {
        let id = p["id"].as_u64().with_context(|| format!("panel without id: {}", p["title"]))?;
        assert!(ids.insert(id), "duplicate panel id {id}");
        let title = p["title"].as_str().context("panel title")?;
        let grid = &p["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap_or(99), grid["w"].as_u64().unwrap_or(99));
        assert!(x + w <= 24 && grid["h"].as_u64().is_some(), "{title}: gridPos {grid}");
        if p["type"] == "row" {
            continue;
        }
        assert!(titles.insert(title), "two panels titled {title:?}");
        assert!(
            p["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title}: say what the panel shows"
        );
        let targets = p["targets"].as_array().with_context(|| format!("{title}: targets"))?;
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], ds_ref.as_str(), "{title}: datasource of {t}");
            assert_eq!(t["datasource"]["type"], "prometheus", "{title}");
        }
    }
    // Every area the operators asked for has a panel.
    for want in [
        "Peers connected",
        "Peer up",
        "Peer RTT",
        "Peer handshakes refused",
        "Imported services",
        "Healthy local endpoints by service",
        "Connections by service and target cluster",
        "Bytes by service and target cluster",
        "Tunnel streams by result",
        "Failovers",
        "Connect latency p50 / p99 by target cluster",
        "DNS queries by response code",
        "DNS latency p50 / p99",
        "Open connections (what a drain waits for)",
        "Draining",
    ] {
        assert!(titles.contains(want), "no panel {want:?}; panels: {titles:?}");
    }
    let names = dashboard_metrics(&dash)?;
    let foreign: Vec<&String> = names.keys().filter(|n| !n.starts_with("fedgate_")).collect();
    assert!(foreign.is_empty(), "metrics the gateway does not own: {foreign:?}");
    Ok(())
}

/// A TCP backend on `addr` that answers `hello from <name>: <first read>` and closes. Dropping
/// it closes the listener, so connects (and probes) to it fail.
fn backend(addr: SocketAddr, name: &str) -> Result<TcpServer> {
    let name = name.to_owned();
    TcpServer::start(addr, move |mut conn| {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).unwrap_or(0);
        let said = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
        let _ = writeln!(conn, "hello from {name}: {said}");
    })
}

/// An upstream DNS server that answers every query with one A record, 192.0.2.1 (TTL 60 s,
/// so the gateway's forwarding cache keeps it): forwarded queries get a real answer without
/// leaving the machine.
fn fake_upstream(addr: SocketAddr) -> Result<SocketAddr> {
    let sock = UdpSocket::bind(addr).with_context(|| format!("binding fake upstream {addr}"))?;
    let bound = sock.local_addr()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if let Some(answer) = answer_a(&buf[..n]) {
                let _ = sock.send_to(&answer, from);
            }
        }
    });
    Ok(bound)
}

/// The answer to a one-question query: the header and question echoed, one A record.
fn answer_a(query: &[u8]) -> Option<Vec<u8>> {
    // The question: QNAME labels up to the root label, then QTYPE and QCLASS.
    let mut end = 12;
    loop {
        let len = usize::from(*query.get(end)?);
        end += 1 + len;
        if len == 0 {
            break;
        }
    }
    end += 4;
    let mut out = query.get(..end)?.to_vec();
    out[2] |= 0x80; // QR: a response
    out[3] = 0x80; // RA, NOERROR
    out[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]); // one answer, no authority, no additional
    // Name: a pointer to the question's name; A, IN, TTL 60, 4 bytes of address.
    out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
    Some(out)
}

/// One request through `addr`; the backend's answer.
fn request(addr: SocketAddr, what: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(what.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn dig(server: SocketAddr, name: &str, qtype: &str) -> Result<String> {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), name, qtype, "+time=2", "+tries=1"])
        .output()
        .context("running dig: install bind9-dnsutils (scripts/install-test-deps.sh)")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Metric names with samples in a Prometheus text exposition.
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

fn scrape(g: &Gateway) -> Result<String> {
    let (code, body) = http_get(g.spec.admin, "/metrics")?;
    ensure!(code == 200, "GET /metrics on {}: HTTP {code}", g.spec.id);
    Ok(body)
}

fn vip_of(g: &Gateway, ns: &str, name: &str, clusters: &[&str]) -> Result<Ipv4Addr> {
    let ip = wait_vip(g, ns, name, clusters, Duration::from_secs(10))?;
    ip.parse().with_context(|| format!("ClusterSetIP of {ns}/{name}: {ip}"))
}

#[test]
fn every_dashboard_metric_is_exported_by_a_running_gateway() -> Result<()> {
    let dash = load_dashboard()?;
    let wanted = dashboard_metrics(&dash)?;

    let tmp = tempfile::tempdir()?;
    let block = AddrBlock::unique();
    let upstream = fake_upstream(block.addr(250, 0))?;
    let ids = ["alpha", "bravo", "charlie"];
    let mut gateways = prepare_mesh(tmp.path(), block, "grafana", &ids, |_, spec| {
        spec.lease = "2s".to_owned();
        // Probes rarely, so a backend that goes away is found by passive outlier
        // detection (connect failures) first.
        spec.extra = "traffic:\n  healthCheck: { interval: 60s, timeout: 500ms }\n".to_owned();
    })?;
    for g in &gateways {
        g.edit_config("upstream: [system]", &format!("upstream: [\"{upstream}\"]"))?;
    }

    // Backends: alpha has two endpoints of shop/web (one will go away), bravo one of
    // shop/web and the only one of shop/api. One port for all (an EndpointSlice has one).
    let web_a1 = backend(block.addr(100, 0), "alpha-1")?;
    let port = web_a1.addr.port();
    let web_a2 = backend(block.addr(101, port), "alpha-2")?;
    let _web_b = backend(block.addr(102, port), "bravo")?;
    let (ip100, ip101, ip102) =
        (block.ip(100).to_string(), block.ip(101).to_string(), block.ip(102).to_string());
    let created = Some("2026-01-01T00:00:00Z");
    gateways[0].write_cluster_file(
        "web.yaml",
        &service_yaml(
            "shop",
            "web",
            false,
            &[("tcp", 8080, port)],
            &[(&ip100, true), (&ip101, true)],
            created,
        ),
    )?;
    gateways[1].write_cluster_file(
        "web.yaml",
        &service_yaml("shop", "web", false, &[("tcp", 8080, port)], &[(&ip102, true)], created),
    )?;
    gateways[1].write_cluster_file(
        "api.yaml",
        &service_yaml("shop", "api", false, &[("tcp", 8081, port)], &[(&ip102, true)], created),
    )?;
    for g in &mut gateways {
        g.start()?;
    }
    let [alpha, bravo, charlie] = &mut gateways[..] else { unreachable!() };
    let (alpha, bravo) = (&*alpha, &*bravo);

    // Both of alpha's endpoints probed healthy once; then one goes away unnoticed by probes.
    eventually("alpha to probe both web endpoints healthy", Duration::from_secs(10), || {
        let text = scrape(alpha)?;
        Ok(text
            .lines()
            .any(|l| l.starts_with("fedgate_endpoints_healthy{service=\"shop/web\"} 2"))
            .then_some(()))
    })?;
    let web = SocketAddr::new(vip_of(alpha, "shop", "web", &["alpha", "bravo"])?.into(), 8080);
    let api = SocketAddr::new(vip_of(alpha, "shop", "api", &["bravo"])?.into(), 8081);
    eventually("alpha's ClusterSetIP listeners", Duration::from_secs(10), || {
        Ok(request(web, "first").ok().filter(|r| r.starts_with("hello from")))
    })?;
    drop(web_a2);
    // Connections that try the closed endpoint fail over to the open one, and after a few
    // connect failures in a row it is ejected.
    let mut served = BTreeMap::<String, u32>::new();
    for i in 0..200 {
        let answer = request(web, &format!("web {i}"))?;
        let who = answer.split(':').next().unwrap_or_default().to_owned();
        *served.entry(who).or_default() += 1;
        if i % 10 == 9 && scrape(alpha)?.contains("fedgate_endpoint_ejections_total{") {
            break;
        }
    }
    assert!(served.keys().all(|w| w.starts_with("hello from")), "answers: {served:?}");
    for i in 0..5 {
        let answer = request(api, &format!("api {i}"))?;
        assert!(answer.starts_with("hello from bravo"), "api is served by bravo: {answer:?}");
    }

    // DNS: a clusterset name, an unknown one, a cluster.local one and a forwarded one.
    let dns = alpha.spec.dns;
    let a = dig(dns, "web.shop.svc.clusterset.local", "A")?;
    assert!(a.contains("status: NOERROR"), "dig web: {a}");
    let nx = dig(dns, "nope.shop.svc.clusterset.local", "A")?;
    assert!(nx.contains("status: NXDOMAIN"), "dig nope: {nx}");
    dig(dns, "web.shop.svc.cluster.local", "SRV")?;
    let fwd = dig(dns, "example.test", "A")?;
    assert!(fwd.contains("192.0.2.1"), "forwarded to the fake upstream: {fwd}");
    // Asked again: answered from the forwarding cache.
    let cached = dig(dns, "example.test", "A")?;
    assert!(cached.contains("192.0.2.1"), "from the forwarding cache: {cached}");

    // A dead peer: its lease expires on the others.
    charlie.kill();
    eventually("bravo to expire charlie's lease", Duration::from_secs(10), || {
        Ok(scrape(bravo)?.contains("fedgate_peer_lease_expiries_total").then_some(()))
    })?;
    // A gateway at charlie's address with a certificate from another CA is refused.
    let foreign = Pki::new(tmp.path(), "foreign-ca", "grafana")?;
    let tls = foreign.issue("charlie", &tmp.path().join("foreign-certs"))?;
    let mut spec = charlie.spec.clone();
    spec.id = "charlie".to_owned();
    let mut impostor = Gateway::prepare(&tmp.path().join("impostor"), spec, tls)?;
    impostor.start()?;

    let exported = eventually(
        "every metric of the dashboard in some gateway's /metrics",
        Duration::from_secs(15),
        || {
            let mut have = BTreeSet::new();
            for g in [alpha, bravo, &impostor] {
                have.extend(exported_names(&scrape(g)?));
            }
            let missing: Vec<&String> = wanted.keys().filter(|n| !have.contains(*n)).collect();
            if missing.is_empty() { Ok(Some(have)) } else { bail!("missing {missing:?}") }
        },
    )
    .map_err(|e| {
        let mut have = BTreeSet::new();
        for g in [alpha, bravo, &impostor] {
            have.extend(scrape(g).map(|t| exported_names(&t)).unwrap_or_default());
        }
        let missing: Vec<String> = wanted
            .iter()
            .filter(|(n, _)| !have.contains(*n))
            .map(|(n, at)| format!("{n} (used by {})", at.join("; ")))
            .collect();
        e.context(format!(
            "the dashboard names metrics no gateway exports:\n  {}\nexported: {have:?}",
            missing.join("\n  ")
        ))
    })?;
    eprintln!(
        "{} dashboard metrics all exported ({} fedgate_ series names seen); web answers: {served:?}",
        wanted.len(),
        exported.iter().filter(|n| n.starts_with("fedgate_")).count()
    );
    Ok(())
}
