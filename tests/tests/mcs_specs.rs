//! The MCS conformance specs, with real pods, in both network modes (issue 21).
//!
//! The upstream suite (module `sigs.k8s.io/mcs-api/conformance`) cannot be fetched here: the Go
//! module proxy refuses its zip for every version ("This module version is not available",
//! HTTP 403), and no other source of it is reachable. These are its 22 specs as published at
//! mcs-api v0.5.x, written again in Rust from what each spec states and checks (not from its
//! code): the same objects (a `hello` Deployment of socat listeners on TCP and UDP port 42
//! answering `pod ip <its IP>`, a `hello` Service, a `request` pod in every cluster), the same
//! client commands run with `kubectl exec` in the request pod (`nslookup`, `nc`), the same
//! timeouts (20 s for each wait). See docs/testing-kube.md, "MCS specs".
//!
//! Each network mode gets a clusterset of two harness clusters with pods (`c1` exports, as the
//! suite's first cluster; `c2` imports), fedgate's gateways in kube source and vip front. Every
//! spec runs in namespaces of its own. Specs that presume routable pod IPs (headless DNS
//! answers the pods' own addresses) are expected to pass in flat mode only; the rest pass in
//! both. The results go to `target/mcs-specs/<mode>.yaml` and are printed as a table; the test
//! fails when an expected spec fails.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_e2e::clusterset::{ClusterSet, Member, Network, Options};
use fedgate_e2e::eventually;
use fedgate_e2e::kube::{EXPORTS, IMPORTS};
use serde_json::Value;

/// Every wait of the suite (its `Eventually` and poll bounds).
const WAIT: Duration = Duration::from_secs(20);
/// How long "consistently" checks watch.
const CONSISTENTLY: Duration = Duration::from_secs(5);
const HELLO: &str = "hello";
/// The suite's labels.
const REQUIRED: &str = "Required";
const OPTIONAL: &str = "Optional";

/// One spec: its text (as the suite words it), labels, and where it is expected to pass.
struct Spec {
    text: &'static str,
    labels: &'static [&'static str],
    /// `false`: presumes routable pod IPs, expected in flat mode only.
    gateway_mode: bool,
    run: fn(&Ctx) -> Result<()>,
}

/// What a spec runs against: the clusters and its namespace (created in every cluster).
struct Ctx<'a> {
    set: &'a ClusterSet,
    ns: String,
}

impl Ctx<'_> {
    fn c(&self, i: usize) -> &Member {
        &self.set.members[i]
    }

    fn kubectl(&self, i: usize, args: &[&str]) -> Result<String> {
        self.c(i).kube.kubectl_ok(args)
    }

    fn apply(&self, i: usize, yaml: &str) -> Result<()> {
        self.c(i).kube.apply_yaml(yaml)?;
        Ok(())
    }

    fn get(&self, i: usize, kind: &str, name: &str) -> Result<Option<Value>> {
        self.c(i).kube.get_json(&[kind, "-n", &self.ns, name])
    }

    /// Runs `sh -c <command>` in cluster `i`'s request pod; its stdout whatever the exit code.
    fn exec(&self, i: usize, command: &str) -> Result<String> {
        let out = self.c(i).kube.kubectl(&[
            "exec",
            "-n",
            &self.ns,
            "request",
            "--request-timeout=20s",
            "--",
            "sh",
            "-c",
            command,
        ])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Polls `exec` in cluster `i` until `check` passes on its output (20 s).
    fn await_exec(
        &self,
        i: usize,
        command: &str,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> Result<String> {
        let what = format!("`{command}` in {}'s request pod", self.c(i).name);
        let result = eventually(&what, WAIT, || {
            let out = self.exec(i, command)?;
            match check(&out) {
                Ok(()) => Ok(Some(out)),
                Err(why) => bail!("{why}; output:\n{out}"),
            }
        });
        // A lookup that failed: what dig sees now, with each try's time and rcode.
        if result.is_err()
            && let Some(name) =
                command.strip_prefix("nslookup ").and_then(|a| a.split(' ').next_back())
        {
            let dig = self
                .exec(
                    i,
                    &format!(
                        "dig +tries=2 +time=2 {name} 2>&1; dig +tries=1 +time=2 +tcp {name} 2>&1"
                    ),
                )
                .unwrap_or_else(|e| format!("{e:#}"));
            eprintln!(
                "    after the failed lookup, dig in {}'s request pod:\n{dig}",
                self.c(i).name
            );
        }
        result
    }

    fn export(&self, i: usize, extra_spec: &str) -> Result<()> {
        self.apply(
            i,
            &format!(
                "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\n\
                 metadata: {{ name: {HELLO}, namespace: {ns} }}\n{extra_spec}",
                ns = self.ns
            ),
        )
    }

    fn unexport(&self, i: usize) -> Result<()> {
        self.kubectl(i, &["delete", EXPORTS, "-n", &self.ns, HELLO, "--wait=false"])?;
        Ok(())
    }

    fn await_import(
        &self,
        i: usize,
        check: impl Fn(&Value) -> Result<(), String>,
    ) -> Result<Value> {
        let what = format!("ServiceImport {}/{HELLO} in {}", self.ns, self.c(i).name);
        eventually(&what, WAIT, || {
            let Some(si) = self.get(i, IMPORTS, HELLO)? else { bail!("not there") };
            match check(&si) {
                Ok(()) => Ok(Some(si)),
                Err(why) => bail!("{why}: {si}"),
            }
        })
    }

    /// [`Self::await_import`] until the ServiceImport has IPs.
    fn await_import_ips(&self, i: usize) -> Result<Value> {
        self.await_import(i, |si| {
            si["spec"]["ips"]
                .as_array()
                .is_some_and(|ips| !ips.is_empty())
                .then_some(())
                .ok_or_else(|| "no IPs".to_owned())
        })
    }

    fn await_no_import(&self, i: usize) -> Result<()> {
        let what = format!("no ServiceImport {}/{HELLO} in {}", self.ns, self.c(i).name);
        eventually(&what, WAIT, || Ok(self.get(i, IMPORTS, HELLO)?.is_none().then_some(())))
    }

    /// The ServiceImport stays for [`CONSISTENTLY`].
    fn ensure_import(&self, i: usize, why: &str) -> Result<()> {
        let until = Instant::now() + CONSISTENTLY;
        while Instant::now() < until {
            if self.get(i, IMPORTS, HELLO)?.is_none() {
                bail!("{why}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// c1's ServiceImport exists, and a second passed: an export made now is the younger
    /// (the conflict resolution policy prefers the oldest).
    fn await_older_import(&self) -> Result<()> {
        self.await_import(0, |_| Ok(()))?;
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    }

    /// Both clusters' ServiceExports have `Conflict=True`.
    fn await_conflict_on_both(&self) -> Result<()> {
        self.await_export_condition(0, "Conflict", "True")?;
        self.await_export_condition(1, "Conflict", "True")?;
        Ok(())
    }

    fn await_export_condition(&self, i: usize, kind: &str, status: &str) -> Result<Value> {
        let what = format!("ServiceExport {kind}={status} in {}", self.c(i).name);
        eventually(&what, WAIT, || {
            let Some(se) = self.get(i, EXPORTS, HELLO)? else { bail!("no ServiceExport") };
            let found = se["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == kind).cloned());
            match found {
                Some(c) if c["status"] == status => Ok(Some(c)),
                other => bail!("condition {kind}: {other:?}"),
            }
        })
    }
}

/// The `hello` Service: TCP and UDP port 42, ClientIP affinity with a 10 s timeout.
fn hello_service(ns: &str, headless: bool, ports: &str) -> String {
    let cluster_ip = if headless { "  clusterIP: None\n" } else { "" };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: {HELLO}, namespace: {ns} }}\nspec:\n\
         {cluster_ip}  selector: {{ app: {HELLO} }}\n  ports:\n{ports}\
         \x20 sessionAffinity: ClientIP\n  sessionAffinityConfig: {{ clientIP: {{ timeoutSeconds: 10 }} }}\n"
    )
}

const HELLO_PORTS: &str =
    "  - { name: tcp, port: 42, protocol: TCP }\n  - { name: udp, port: 42, protocol: UDP }\n";

/// The `hello` Deployment: two socat listeners (TCP and UDP 42) answering `pod ip <IP>`.
fn hello_deployment(ns: &str, replicas: u32) -> String {
    let container = |name: &str, listen: &str| {
        format!(
            "      - name: {name}\n        image: alpine/socat\n        args: [\"-v\", \"-v\", \"{listen}:42,crlf,reuseaddr,fork\", \"SYSTEM:echo pod ip $(MY_POD_IP)\"]\n\
             \x20       env: [{{ name: MY_POD_IP, valueFrom: {{ fieldRef: {{ fieldPath: status.podIP }} }} }}]\n"
        )
    };
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{ name: {HELLO}, namespace: {ns} }}\nspec:\n\
         \x20 replicas: {replicas}\n  selector: {{ matchLabels: {{ app: {HELLO} }} }}\n  template:\n\
         \x20   metadata: {{ labels: {{ app: {HELLO} }} }}\n    spec:\n      containers:\n{}{}",
        container("hello-tcp", "TCP-LISTEN"),
        container("hello-udp", "UDP-LISTEN"),
    )
}

/// The `hello` StatefulSet (headless Service `hello` governs it): pods get hostnames.
fn hello_statefulset(ns: &str, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{ name: {HELLO}, namespace: {ns} }}\nspec:\n\
         \x20 replicas: {replicas}\n  serviceName: {HELLO}\n  selector: {{ matchLabels: {{ app: {HELLO} }} }}\n  template:\n\
         \x20   metadata: {{ labels: {{ app: {HELLO} }} }}\n    spec:\n      containers:\n\
         \x20     - name: hello-tcp\n        image: alpine/socat\n        args: [\"-v\", \"-v\", \"TCP-LISTEN:42,crlf,reuseaddr,fork\", \"SYSTEM:echo pod ip $(MY_POD_IP)\"]\n\
         \x20       env: [{{ name: MY_POD_IP, valueFrom: {{ fieldRef: {{ fieldPath: status.podIP }} }} }}]\n"
    )
}

fn request_pod(ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{ name: request, namespace: {ns}, labels: {{ app: request }} }}\nspec:\n\
         \x20 containers:\n  - name: request\n    image: busybox\n    args: [\"/bin/sh\", \"-ec\", \"while :; do echo '.'; sleep 5 ; done\"]\n"
    )
}

/// How a spec's namespace is set up before its body runs (the suite's BeforeEach and
/// JustBeforeEach).
struct Setup {
    headless: bool,
    replicas: u32,
    /// A StatefulSet instead of the Deployment.
    statefulset: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self { headless: false, replicas: 1, statefulset: false }
    }
}

/// Creates the namespace in every cluster, the hello workload and Service in c1, and a
/// running request pod in every cluster.
fn set_up(ctx: &Ctx, setup: &Setup) -> Result<()> {
    for i in 0..ctx.set.members.len() {
        ctx.kubectl(i, &["create", "namespace", &ctx.ns])?;
    }
    let workload = if setup.statefulset {
        hello_statefulset(&ctx.ns, setup.replicas)
    } else {
        hello_deployment(&ctx.ns, setup.replicas)
    };
    ctx.apply(0, &workload)?;
    ctx.apply(0, &hello_service(&ctx.ns, setup.headless, HELLO_PORTS))?;
    for i in 0..ctx.set.members.len() {
        ctx.apply(i, &request_pod(&ctx.ns))?;
    }
    for i in 0..ctx.set.members.len() {
        let what = format!("the request pod in {} to run", ctx.c(i).name);
        eventually(&what, WAIT, || {
            let pod = ctx.get(i, "pod", "request")?.context("no request pod")?;
            Ok((pod["status"]["phase"] == "Running").then_some(()))
        })?;
    }
    Ok(())
}

/// The ready addresses (with hostnames: the hostname field, else the address with `.` → `-`)
/// of the Kubernetes EndpointSlices of `hello` in cluster `i`, once there are `want`.
fn k8s_endpoints(ctx: &Ctx, i: usize, want: usize) -> Result<Vec<(String, String)>> {
    let what = format!("{want} ready endpoints of {HELLO} in {}", ctx.c(i).name);
    eventually(&what, WAIT, || {
        let list = ctx
            .c(i)
            .kube
            .get_json(&[
                "endpointslices",
                "-n",
                &ctx.ns,
                "-l",
                &format!("kubernetes.io/service-name={HELLO}"),
            ])?
            .context("no list")?;
        let mut eps = Vec::new();
        for slice in list["items"].as_array().into_iter().flatten() {
            if slice["addressType"] != "IPv4" {
                continue;
            }
            for ep in slice["endpoints"].as_array().into_iter().flatten() {
                if ep["conditions"]["ready"] == false {
                    bail!("an endpoint is not ready: {ep}");
                }
                for addr in ep["addresses"].as_array().into_iter().flatten() {
                    let addr = addr.as_str().unwrap_or_default().to_owned();
                    let host = ep["hostname"]
                        .as_str()
                        .map_or_else(|| addr.replace('.', "-"), str::to_owned);
                    eps.push((addr, host));
                }
            }
        }
        Ok((eps.len() == want).then_some(eps))
    })
}

/// Addresses of the `Name:`/`Address:` pairs of an `nslookup` answer, sorted.
fn nslookup_addresses(out: &str) -> Vec<String> {
    let mut addrs = Vec::new();
    let mut after_name = false;
    for line in out.lines() {
        let line = line.trim();
        if line.starts_with("Name:") {
            after_name = true;
        } else if let Some(rest) = line.strip_prefix("Address:")
            && after_name
        {
            addrs.push(rest.trim().to_owned());
        }
    }
    addrs.sort();
    addrs
}

/// Runs `nslookup` command `cmd` in cluster `i` until it answers exactly `want` (sorted).
fn await_addresses(ctx: &Ctx, i: usize, cmd: &str, want: &[String]) -> Result<()> {
    ctx.await_exec(i, cmd, |out| {
        let got = nslookup_addresses(out);
        (got == want).then_some(()).ok_or_else(|| format!("addresses {got:?}, want {want:?}"))
    })?;
    Ok(())
}

/// (port, target without the final dot) of the SRV lines of an `nslookup -type=SRV` answer:
/// `<name>\tservice = <priority> <weight> <port> <target>`.
fn srv_records(out: &str) -> Vec<(u16, String)> {
    out.lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("service =")?;
            let words: Vec<&str> = rest.split_whitespace().collect();
            let [_prio, _weight, port, target] = words[..] else { return None };
            Some((port.parse().ok()?, target.trim_end_matches('.').to_owned()))
        })
        .collect()
}

fn names(labels: &Value) -> BTreeMap<String, String> {
    labels
        .as_object()
        .map(|m| {
            m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect()
        })
        .unwrap_or_default()
}

// ---- the specs ----

fn inaccessible_without_export(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    let cmd = format!("echo hi | nc -w 2 {HELLO}.{}.svc.clusterset.local 42", ctx.ns);
    for i in 0..ctx.set.members.len() {
        for _ in 0..20 {
            let out = ctx.exec(i, &cmd)?;
            if out.contains("pod ip") {
                bail!("{} reached the unexported service: {out}", ctx.c(i).name);
            }
        }
    }
    Ok(())
}

fn accessible_through_dns(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    ctx.export(0, "")?;
    let cmd = format!("echo hi | nc -w 2 {HELLO}.{}.svc.clusterset.local 42", ctx.ns);
    for i in 0..ctx.set.members.len() {
        ctx.await_exec(i, &cmd, |out| {
            out.contains("pod ip").then_some(()).ok_or_else(|| "no `pod ip` answer".to_owned())
        })?;
    }
    Ok(())
}

fn clusterip_dns_resolves_clusterset_ip(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    ctx.export(0, "")?;
    let si = ctx.await_import_ips(0)?;
    // c1's ClusterSetIP, answered in every cluster (fedgate's gateways allocate the same one
    // where their ranges are the same: docs/mcs-semantics.md).
    let ip = si["spec"]["ips"][0].as_str().context("ips[0]")?.to_owned();
    let cmd = format!("nslookup {HELLO}.{}.svc.clusterset.local", ctx.ns);
    for i in 0..ctx.set.members.len() {
        ctx.await_exec(i, &cmd, |out| {
            out.contains(&ip).then_some(()).ok_or_else(|| format!("no {ip}"))
        })?;
    }
    Ok(())
}

fn clusterip_srv(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    ctx.export(0, "")?;
    let name = format!("{HELLO}.{}.svc.clusterset.local", ctx.ns);
    let cmd = format!("nslookup -type=SRV {name}");
    for i in 0..ctx.set.members.len() {
        ctx.await_exec(i, &cmd, |out| {
            let got = srv_records(out);
            if got == [(42, name.clone())] {
                Ok(())
            } else {
                Err(format!("SRV records {got:?}, want [(42, {name})]"))
            }
        })?;
    }
    Ok(())
}

fn cluster_local_only_local(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    ctx.export(0, "")?;
    let svc = ctx.get(0, "service", HELLO)?.context("hello Service")?;
    let ip = svc["spec"]["clusterIP"].as_str().context("clusterIP")?.to_owned();
    let cmd = format!("nslookup {HELLO}.{}.svc.cluster.local", ctx.ns);
    ctx.await_exec(0, &cmd, |out| {
        out.contains(&ip).then_some(()).ok_or_else(|| format!("no {ip}"))
    })?;
    Ok(())
}

fn headless_dns_endpoints(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup { headless: true, replicas: 2, ..Setup::default() })?;
    ctx.export(0, "")?;
    let mut want: Vec<String> = k8s_endpoints(ctx, 0, 2)?.into_iter().map(|(a, _)| a).collect();
    want.sort();
    let cmd = format!("nslookup {HELLO}.{}.svc.clusterset.local", ctx.ns);
    for i in 0..ctx.set.members.len() {
        await_addresses(ctx, i, &cmd, &want)?;
    }
    Ok(())
}

fn headless_statefulset_hostname(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup { headless: true, replicas: 2, statefulset: true })?;
    ctx.export(0, "")?;
    for i in 0..ctx.set.members.len() {
        // The MCS EndpointSlice in this cluster: both endpoints ready, with hostnames.
        let what =
            format!("an MCS EndpointSlice with 2 ready, named endpoints in {}", ctx.c(i).name);
        let slice = eventually(&what, WAIT, || {
            let list = ctx
                .c(i)
                .kube
                .get_json(&[
                    "endpointslices",
                    "-n",
                    &ctx.ns,
                    "-l",
                    &format!("multicluster.kubernetes.io/service-name={HELLO}"),
                ])?
                .context("no list")?;
            let Some(slice) = list["items"].as_array().and_then(|s| s.first()).cloned() else {
                bail!("none yet")
            };
            let eps = slice["endpoints"].as_array().cloned().unwrap_or_default();
            let ok = eps.len() == 2
                && eps.iter().all(|e| {
                    e["conditions"]["ready"] != false
                        && e["hostname"].as_str().is_some_and(|h| !h.is_empty())
                });
            if ok { Ok(Some(slice)) } else { bail!("not yet right: {slice}") }
        })?;
        let cluster = slice["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"]
            .as_str()
            .context("source-cluster label")?
            .to_owned();
        for ep in slice["endpoints"].as_array().into_iter().flatten() {
            let host = ep["hostname"].as_str().unwrap_or_default();
            let mut want: Vec<String> = ep["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
            want.sort();
            let cmd = format!("nslookup {host}.{cluster}.{HELLO}.{}.svc.clusterset.local", ctx.ns);
            await_addresses(ctx, i, &cmd, &want)?;
        }
    }
    Ok(())
}

fn headless_srv(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup { headless: true, replicas: 2, ..Setup::default() })?;
    ctx.export(0, "")?;
    let endpoints = k8s_endpoints(ctx, 0, 2)?;
    let name = format!("{HELLO}.{}.svc.clusterset.local", ctx.ns);
    let cmd = format!("nslookup -type=SRV {name}");
    for i in 0..ctx.set.members.len() {
        ctx.await_exec(i, &cmd, |out| {
            let got = srv_records(out);
            if got.len() != endpoints.len() {
                return Err(format!(
                    "{} SRV records, want {}: {got:?}",
                    got.len(),
                    endpoints.len()
                ));
            }
            for (_, host) in &endpoints {
                match got.iter().find(|(_, target)| target.starts_with(host.as_str())) {
                    Some((42, _)) => {}
                    Some((port, _)) => return Err(format!("SRV for {host} has port {port}")),
                    None => return Err(format!("no SRV record for host {host}: {got:?}")),
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn import_exists_while_exported(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    ctx.export(0, "")?;
    ctx.await_import(0, |_| Ok(()))?;
    ctx.apply(1, &hello_deployment(&ctx.ns, 1))?;
    ctx.apply(1, &hello_service(&ctx.ns, false, HELLO_PORTS))?;
    ctx.export(1, "")?;
    ctx.ensure_import(0, "the ServiceImport went away after exporting on c2")?;
    ctx.unexport(0)?;
    ctx.ensure_import(0, "the ServiceImport went away while c2 still exports")?;
    ctx.unexport(1)?;
    ctx.await_no_import(0)
}

fn only_exported_labels(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    // Labels and annotations of the Service itself must not reach the ServiceImport.
    ctx.kubectl(0, &["label", "service", "-n", &ctx.ns, HELLO, "service-label=true"])?;
    ctx.kubectl(0, &["annotate", "service", "-n", &ctx.ns, HELLO, "service-annotation=true"])?;
    ctx.export(
        0,
        "spec:\n  exportedLabels: { dummy-label: \"true\" }\n  exportedAnnotations: { dummy-annotation: \"true\" }\n",
    )?;
    ctx.await_import(0, |si| {
        let (labels, annotations) =
            (names(&si["metadata"]["labels"]), names(&si["metadata"]["annotations"]));
        if labels.get("dummy-label").map(String::as_str) != Some("true")
            || annotations.get("dummy-annotation").map(String::as_str) != Some("true")
        {
            return Err("exported label or annotation missing".to_owned());
        }
        if labels.contains_key("service-label") || annotations.contains_key("service-annotation") {
            return Err("the Service's own label or annotation was propagated".to_owned());
        }
        Ok(())
    })?;
    Ok(())
}

/// The suite's two-cluster driver: c2 gets its own `hello` Deployment and Service (with
/// `ports`, `headless`) and exports it with `extra_spec`.
fn second_exporter(ctx: &Ctx, headless: bool, ports: &str, extra_spec: &str) -> Result<()> {
    ctx.apply(1, &hello_deployment(&ctx.ns, 1))?;
    ctx.apply(1, &hello_service(&ctx.ns, headless, ports))?;
    ctx.export(1, extra_spec)
}

fn conflicting_labels(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    ctx.export(
        0,
        "spec:\n  exportedLabels: { dummy-label: \"true\" }\n  exportedAnnotations: { dummy-annotation: \"true\" }\n",
    )?;
    // c1's export is the oldest: its labels win.
    ctx.await_older_import()?;
    second_exporter(
        ctx,
        false,
        HELLO_PORTS,
        "spec:\n  exportedLabels: { dummy-label2: \"true\" }\n  exportedAnnotations: { dummy-annotation2: \"true\" }\n",
    )?;
    ctx.await_conflict_on_both()?;
    ctx.await_import(0, |si| {
        let (labels, annotations) =
            (names(&si["metadata"]["labels"]), names(&si["metadata"]["annotations"]));
        let ok = labels.contains_key("dummy-label")
            && annotations.contains_key("dummy-annotation")
            && !labels.contains_key("dummy-label2")
            && !annotations.contains_key("dummy-annotation2");
        ok.then_some(()).ok_or_else(|| "the conflict was not resolved to c1's".to_owned())
    })?;
    Ok(())
}

fn clusterip_import_created_and_deleted(ctx: &Ctx) -> Result<()> {
    import_created_and_deleted(ctx, &Setup::default(), "ClusterSetIP")
}

/// Exports c1's `hello` (set up as `setup` says): a ServiceImport of type `kind` appears in
/// every cluster; unexported, it goes from every cluster.
fn import_created_and_deleted(ctx: &Ctx, setup: &Setup, kind: &str) -> Result<()> {
    set_up(ctx, setup)?;
    ctx.export(0, "")?;
    for i in 0..ctx.set.members.len() {
        let si = ctx.await_import(i, |_| Ok(()))?;
        if si["spec"]["type"] != kind {
            bail!("ServiceImport in {} has type {}", ctx.c(i).name, si["spec"]["type"]);
        }
    }
    ctx.unexport(0)?;
    for i in 0..ctx.set.members.len() {
        ctx.await_no_import(i)?;
    }
    Ok(())
}

fn session_affinity_matches(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    ctx.export(0, "")?;
    ctx.await_import(0, |si| {
        let spec = &si["spec"];
        if spec["sessionAffinity"] != "ClientIP" {
            return Err(format!("sessionAffinity {}", spec["sessionAffinity"]));
        }
        if spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] != 10 {
            return Err(format!("sessionAffinityConfig {}", spec["sessionAffinityConfig"]));
        }
        Ok(())
    })?;
    Ok(())
}

fn ip_allocated(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    ctx.export(0, "")?;
    let si = ctx.await_import_ips(0)?;
    let ip = si["spec"]["ips"][0].as_str().context("ips[0]")?;
    ip.parse::<std::net::IpAddr>().with_context(|| format!("{ip:?} is not a valid IP"))?;
    Ok(())
}

/// `[(name, protocol, port)]` of ServiceImport ports, sorted by lower-case name.
fn import_ports(si: &Value) -> Vec<(String, String, u64)> {
    let mut ports: Vec<(String, String, u64)> = si["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["protocol"].as_str().unwrap_or("TCP").to_owned(),
                p["port"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    ports.sort_by_key(|(n, _, _)| n.to_lowercase());
    ports
}

/// c1's ServiceImport until its ports are `want`.
fn await_import_ports(ctx: &Ctx, want: &[(String, String, u64)]) -> Result<()> {
    ctx.await_import(0, |si| {
        let got = import_ports(si);
        (got == want).then_some(()).ok_or_else(|| format!("ports {got:?}, want {want:?}"))
    })?;
    Ok(())
}

fn ports_of(list: &[(&str, &str, u64)]) -> Vec<(String, String, u64)> {
    let mut v: Vec<(String, String, u64)> =
        list.iter().map(|(n, p, port)| ((*n).to_owned(), (*p).to_owned(), *port)).collect();
    v.sort_by_key(|(n, _, _)| n.to_lowercase());
    v
}

fn ports_match(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    ctx.export(0, "")?;
    let want = ports_of(&[("tcp", "TCP", 42), ("udp", "UDP", 42)]);
    await_import_ports(ctx, &want)?;
    Ok(())
}

fn union_of_ports(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    ctx.export(0, "")?;
    second_exporter(
        ctx,
        false,
        "  - { name: tcp, port: 42, protocol: TCP }\n  - { name: stcp, port: 142, protocol: SCTP }\n",
        "",
    )?;
    let want = ports_of(&[("tcp", "TCP", 42), ("udp", "UDP", 42), ("stcp", "SCTP", 142)]);
    await_import_ports(ctx, &want)?;
    Ok(())
}

fn conflicting_ports(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    ctx.export(0, "")?;
    ctx.await_older_import()?;
    second_exporter(ctx, false, "  - { name: tcp, port: 43, protocol: TCP }\n", "")?;
    ctx.await_conflict_on_both()?;
    let want = ports_of(&[("tcp", "TCP", 42), ("udp", "UDP", 42)]);
    await_import_ports(ctx, &want)?;
    Ok(())
}

fn headless_import_created_and_deleted(ctx: &Ctx) -> Result<()> {
    import_created_and_deleted(ctx, &Setup { headless: true, ..Setup::default() }, "Headless")
}

fn headless_no_ip(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup { headless: true, ..Setup::default() })?;
    ctx.export(0, "")?;
    ctx.await_import(0, |_| Ok(()))?;
    let until = Instant::now() + CONSISTENTLY;
    while Instant::now() < until {
        let si = ctx.get(0, IMPORTS, HELLO)?.context("the ServiceImport went away")?;
        if si["spec"]["ips"].as_array().is_some_and(|ips| !ips.is_empty()) {
            bail!("a Headless ServiceImport got IPs: {}", si["spec"]["ips"]);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

fn external_name_invalid(ctx: &Ctx) -> Result<()> {
    for i in 0..ctx.set.members.len() {
        ctx.kubectl(i, &["create", "namespace", &ctx.ns])?;
    }
    ctx.apply(
        0,
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: {HELLO}, namespace: {} }}\nspec:\n  type: ExternalName\n  externalName: example.com\n",
            ctx.ns
        ),
    )?;
    ctx.export(0, "")?;
    ctx.await_export_condition(0, "Valid", "False")?;
    let until = Instant::now() + CONSISTENTLY;
    while Instant::now() < until {
        if ctx.get(0, IMPORTS, HELLO)?.is_some() {
            bail!("a ServiceImport exists for an ExternalName service");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn conflicting_headlessness(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    ctx.export(0, "")?;
    ctx.await_older_import()?;
    second_exporter(ctx, true, HELLO_PORTS, "")?;
    ctx.await_conflict_on_both()?;
    for i in 0..ctx.set.members.len() {
        let si = ctx.await_import(i, |_| Ok(()))?;
        if si["spec"]["type"] != "ClusterSetIP" {
            bail!("ServiceImport in {} has type {}", ctx.c(i).name, si["spec"]["type"]);
        }
    }
    Ok(())
}

fn mcs_endpoint_slice(ctx: &Ctx) -> Result<()> {
    set_up(ctx, &Setup::default())?;
    ctx.export(0, "")?;
    let mut names = Vec::new();
    for i in 0..ctx.set.members.len() {
        let what = format!("an MCS EndpointSlice in {}", ctx.c(i).name);
        let slice = eventually(&what, WAIT, || {
            let list =
                ctx.c(i).kube.get_json(&["endpointslices", "-n", &ctx.ns])?.context("list")?;
            Ok(list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| {
                    let l = &s["metadata"]["labels"];
                    l.get("multicluster.kubernetes.io/service-name").is_some()
                        || l.get("multicluster.kubernetes.io/source-cluster").is_some()
                })
                .cloned())
        })?;
        let labels = names_of(&slice);
        if labels.get("multicluster.kubernetes.io/service-name").map(String::as_str) != Some(HELLO)
        {
            bail!("{}: no service-name label {HELLO}: {labels:?}", ctx.c(i).name);
        }
        if !labels.contains_key("multicluster.kubernetes.io/source-cluster") {
            bail!("{}: no source-cluster label: {labels:?}", ctx.c(i).name);
        }
        match labels.get("endpointslice.kubernetes.io/managed-by").map(String::as_str) {
            None => bail!("{}: no managed-by label", ctx.c(i).name),
            Some("endpointslice-controller.k8s.io") => {
                bail!("{}: managed by the Kubernetes controller", ctx.c(i).name)
            }
            Some(_) => {}
        }
        names.push(slice["metadata"]["name"].as_str().unwrap_or_default().to_owned());
    }
    ctx.unexport(0)?;
    for (i, name) in names.iter().enumerate() {
        let what = format!("EndpointSlice {name} deleted in {}", ctx.c(i).name);
        eventually(&what, WAIT, || Ok(ctx.get(i, "endpointslice", name)?.is_none().then_some(())))?;
    }
    Ok(())
}

fn names_of(obj: &Value) -> BTreeMap<String, String> {
    names(&obj["metadata"]["labels"])
}

const SPECS: &[Spec] = &[
    Spec {
        text: "Connectivity to remote services with no exported service should be inaccessible",
        labels: &[REQUIRED],
        gateway_mode: true,
        run: inaccessible_without_export,
    },
    Spec {
        text: "Connectivity to remote services with an exported ClusterIP service should be accessible through DNS (after a potential delay)",
        labels: &[OPTIONAL, "Connectivity", "ClusterIP"],
        gateway_mode: true,
        run: accessible_through_dns,
    },
    Spec {
        text: "A DNS lookup of the <service>.<ns>.svc.clusterset.local domain for a ClusterIP service should resolve to the clusterset IP",
        labels: &[OPTIONAL, "DNS", "ClusterIP"],
        gateway_mode: true,
        run: clusterip_dns_resolves_clusterset_ip,
    },
    Spec {
        text: "A DNS SRV query of the <service>.<ns>.svc.clusterset.local domain for a ClusterIP service should return valid SRV records",
        labels: &[OPTIONAL, "DNS", "ClusterIP"],
        gateway_mode: true,
        run: clusterip_srv,
    },
    Spec {
        text: "DNS lookups of the <service>.<ns>.svc.cluster.local domain for a ClusterIP service should only resolve local services",
        labels: &[OPTIONAL, "DNS", "ClusterIP"],
        gateway_mode: true,
        run: cluster_local_only_local,
    },
    Spec {
        text: "A DNS query of the <service>.<ns>.svc.clusterset.local domain for a headless service should return the ready endpoint addresses of all the backing pods",
        labels: &[OPTIONAL, "DNS", "Headless"],
        gateway_mode: false,
        run: headless_dns_endpoints,
    },
    Spec {
        text: "A DNS query of the <hostname>.<clusterid>.<service>.<ns>.svc.clusterset.local domain for a headless StatefulSet service should return the requested pod's endpoint address",
        labels: &[OPTIONAL, "DNS", "Headless", "EndpointSlice"],
        gateway_mode: false,
        run: headless_statefulset_hostname,
    },
    Spec {
        text: "A DNS SRV query of the <service>.<ns>.svc.clusterset.local domain for a headless service should return valid SRV records",
        labels: &[OPTIONAL, "DNS", "Headless"],
        gateway_mode: false,
        run: headless_srv,
    },
    Spec {
        text: "A ServiceImport should only exist as long as there's at least one exporting cluster",
        labels: &[REQUIRED],
        gateway_mode: true,
        run: import_exists_while_exported,
    },
    Spec {
        text: "Only labels and annotations specified as exported in the ServiceExport should be propagated to the ServiceImport",
        labels: &[OPTIONAL, "ExportedLabels"],
        gateway_mode: true,
        run: only_exported_labels,
    },
    Spec {
        text: "A service exported on two clusters with conflicting annotations and labels should apply the conflict resolution policy and report a Conflict condition on each ServiceExport",
        labels: &[OPTIONAL, "ExportedLabels"],
        gateway_mode: true,
        run: conflicting_labels,
    },
    Spec {
        text: "Exporting a ClusterIP service should create a ServiceImport of type ClusterSetIP in the service's namespace in each cluster. Unexporting should delete the ServiceImport",
        labels: &[REQUIRED, "ClusterIP"],
        gateway_mode: true,
        run: clusterip_import_created_and_deleted,
    },
    Spec {
        text: "The SessionAffinity for a ClusterSetIP ServiceImport should match the exported service's SessionAffinity",
        labels: &[REQUIRED, "ClusterIP"],
        gateway_mode: true,
        run: session_affinity_matches,
    },
    Spec {
        text: "An IP should be allocated for a ClusterSetIP ServiceImport",
        labels: &[REQUIRED, "ClusterIP"],
        gateway_mode: true,
        run: ip_allocated,
    },
    Spec {
        text: "The ports for a ClusterSetIP ServiceImport should match those of the exported service",
        labels: &[REQUIRED, "ClusterIP"],
        gateway_mode: true,
        run: ports_match,
    },
    Spec {
        text: "A ClusterIP service exported on two clusters should expose the union of the constituent service ports",
        labels: &[REQUIRED, "ClusterIP"],
        gateway_mode: true,
        run: union_of_ports,
    },
    Spec {
        text: "A ClusterIP service exported on two clusters with conflicting ports should apply the conflict resolution policy and report a Conflict condition on each ServiceExport",
        labels: &[REQUIRED, "ClusterIP"],
        gateway_mode: true,
        run: conflicting_ports,
    },
    Spec {
        text: "Exporting a headless service should create a ServiceImport of type Headless in the service's namespace in each cluster. Unexporting should delete the ServiceImport",
        labels: &[REQUIRED, "Headless"],
        gateway_mode: true,
        run: headless_import_created_and_deleted,
    },
    Spec {
        text: "No clusterset IP should be allocated for a Headless ServiceImport",
        labels: &[REQUIRED, "Headless"],
        gateway_mode: true,
        run: headless_no_ip,
    },
    Spec {
        text: "Exporting an ExternalName service should set ServiceExport Valid condition to False",
        labels: &[REQUIRED, "ExternalName"],
        gateway_mode: true,
        run: external_name_invalid,
    },
    Spec {
        text: "A service exported on two clusters with conflicting headlessness should apply the conflict resolution policy and report a Conflict condition on the ServiceExport",
        labels: &[REQUIRED],
        gateway_mode: true,
        run: conflicting_headlessness,
    },
    Spec {
        text: "Exporting a service should create an MCS EndpointSlice in the service's namespace in each cluster with the required MCS labels. Unexporting should delete the EndpointSlice.",
        labels: &[OPTIONAL, "EndpointSlice"],
        gateway_mode: true,
        run: mcs_endpoint_slice,
    },
];

/// One spec's outcome.
struct Outcome {
    spec: &'static Spec,
    expected: bool,
    secs: f64,
    error: Option<String>,
}

fn report_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("mcs-specs")
}

/// Lines of each gateway's log printed after a spec expected to pass failed.
const LOG_TAIL: usize = 150;

/// Runs every spec against a fresh clusterset in `network` mode; writes the report; fails
/// when a spec expected in this mode failed.
fn run_all(network: Network) -> Result<()> {
    // One clusterset at a time: two of them (four control planes with their controllers,
    // nodes and gateways) on two cores would turn the suite's 20 s waits into the test.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mode = network.as_str();
    let set = ClusterSet::start(&Options {
        names: vec!["c1".to_owned(), "c2".to_owned()],
        clusterset: "mcs".to_owned(),
        network,
        gateway_extra: String::new(),
        pods: true,
    })?;
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for (n, spec) in SPECS.iter().enumerate() {
        let ctx = Ctx { set: &set, ns: format!("mcs-{mode}-{n}") };
        let t = Instant::now();
        let result = (spec.run)(&ctx);
        let secs = t.elapsed().as_secs_f64();
        let expected = spec.gateway_mode || network == Network::Flat;
        let error = result.err().map(|e| format!("{e:#}"));
        eprintln!(
            "[{mode}] {} ({secs:.1} s) {}",
            if error.is_none() { "PASS" } else { "FAIL" },
            spec.text
        );
        if let Some(e) = &error {
            eprintln!("    {e}");
            if expected {
                for m in &set.members {
                    let log = m.gateway.gw.log_text();
                    let lines: Vec<&str> = log.lines().collect();
                    let tail = lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n");
                    eprintln!(
                        "    --- the last {LOG_TAIL} lines of {}'s gateway log ---\n{tail}",
                        m.name
                    );
                }
            }
        }
        outcomes.push(Outcome { spec, expected, secs, error });
        // Namespaces are not waited for: the next spec uses a new one.
        for i in 0..set.members.len() {
            let _ = ctx.kubectl(i, &["delete", "namespace", &ctx.ns, "--wait=false"]);
        }
    }
    let total = started.elapsed().as_secs_f64();
    write_report(mode, &outcomes, total)?;
    let failed: Vec<&str> =
        outcomes.iter().filter(|o| o.expected && o.error.is_some()).map(|o| o.spec.text).collect();
    if !failed.is_empty() {
        bail!(
            "{} spec(s) expected to pass in {mode} mode failed:\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    Ok(())
}

fn write_report(mode: &str, outcomes: &[Outcome], total: f64) -> Result<()> {
    let passed = outcomes.iter().filter(|o| o.error.is_none()).count();
    let mut table = format!(
        "\nMCS specs, {mode} network: {passed} of {} passed in {total:.0} s\n",
        outcomes.len()
    );
    let mut yaml = format!(
        "mode: {mode}\npassed: {passed}\ntotal: {}\nseconds: {total:.1}\nspecs:\n",
        outcomes.len()
    );
    for o in outcomes {
        let result = match (&o.error, o.expected) {
            (None, _) => "PASS",
            (Some(_), true) => "FAIL",
            (Some(_), false) => "FAIL (not expected in this mode)",
        };
        let _ = writeln!(
            table,
            "  {result:<32} {:>5.1} s  [{}] {}",
            o.secs,
            o.spec.labels.join(", "),
            o.spec.text
        );
        let _ = writeln!(
            yaml,
            "- spec: {}\n  labels: [{}]\n  result: {}\n  expected: {}\n  seconds: {:.1}\n  error: {}",
            serde_json::to_string(o.spec.text)?,
            o.spec.labels.join(", "),
            if o.error.is_none() { "pass" } else { "fail" },
            o.expected,
            o.secs,
            serde_json::to_string(&o.error)?,
        );
    }
    eprintln!("{table}");
    let dir = report_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{mode}.yaml")), yaml)?;
    Ok(())
}

#[test]
fn mcs_specs_in_gateway_mode() -> Result<()> {
    run_all(Network::Gateway)
}

#[test]
fn mcs_specs_in_flat_mode() -> Result<()> {
    run_all(Network::Flat)
}
