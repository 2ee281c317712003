//! deploy/ against a real kube-apiserver: the CRDs and manifests pass a server-side dry run and
//! a real apply; the Deployment has its probes, requests and hardening, and runs two replicas
//! that survive pod, node and rollout disruptions (anti-affinity, PodDisruptionBudget, surge,
//! drain time, the downward API for the Lease); the ServiceAccount's RBAC allows exactly what the
//! gateway does, leader election's Lease included (checked with `kubectl auth can-i` as that
//! ServiceAccount, and a Lease created and renewed as it); the shipped gateway config passes
//! `fedgate analyze`; the Helm chart renders the same objects as the manifests, field for field
//! as the apiserver stores them, and its StatefulSet variant with a Service per replica applies
//! (helm built by scripts/build-kube.sh, or $FEDGATE_HELM).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedgate_e2e::kube::KubeCluster;
use fedgate_e2e::*;
use serde_json::Value;

const NS: &str = "fedgate-system";
const SA: &str = "system:serviceaccount:fedgate-system:fedgate";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifests() -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/manifests"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no manifests in deploy/manifests");
    }
    Ok(files)
}

fn json(c: &KubeCluster, args: &[&str]) -> Result<Value> {
    let mut full = vec!["get"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["-o", "json"]);
    let out = c.kubectl_ok(&full)?;
    serde_json::from_str(&out).with_context(|| format!("kubectl {full:?}: {out}"))
}

fn can_i(c: &KubeCluster, args: &[&str]) -> Result<bool> {
    let mut full = vec!["auth", "can-i"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--as", SA]);
    let out = c.kubectl(&full)?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match answer.as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => bail!("kubectl {full:?}: {answer} {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// The `env` entry `name` of a container.
fn env<'a>(ctr: &'a Value, name: &str) -> Option<&'a Value> {
    ctr["env"].as_array()?.iter().find(|e| e["name"] == name)
}

/// Seconds of a humantime duration written as `<n>s` or `<n>m` (what the shipped configs use).
fn seconds(d: &str) -> Option<i64> {
    if let Some(n) = d.strip_suffix('s') {
        return n.parse().ok();
    }
    d.strip_suffix('m')?.parse::<i64>().ok().map(|m| m * 60)
}

/// Issue 19's deploy part, on the applied manifests: two replicas spread over nodes, a
/// PodDisruptionBudget, a rollout that never goes below two ready pods, time to drain, the
/// Lease's namespace and identity from the downward API, and a headless Service with one DNS
/// record per ready replica for peers.
fn high_availability(c: &KubeCluster, d: &Value) -> Result<()> {
    let spec = &d["spec"];
    let pod = &spec["template"]["spec"];
    let ctr = &pod["containers"][0];
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(spec["replicas"], 2, "two replicas by default");
    assert_eq!(spec["selector"]["matchLabels"], *labels);
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0, "{spec}");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], 1, "{spec}");
    assert!(spec["minReadySeconds"].as_i64().unwrap_or(0) > 0, "{spec}");

    // anti-affinity across nodes, preferred, selecting exactly these pods
    let terms =
        pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            .as_array()
            .context("preferred pod anti-affinity")?;
    let term = &terms.first().context("one anti-affinity term")?["podAffinityTerm"];
    assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(term["labelSelector"]["matchLabels"], *labels);

    // the kubelet waits for the drain: grace > preStop + traffic.drainDuration (the config's,
    // else the default 45 s)
    let cm = json(c, &["-n", NS, "configmap", "fedgate-config"])?;
    let config = cm["data"]["config.yaml"].as_str().context("config.yaml")?;
    let drain = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("drainDuration:"))
        .map(|d| seconds(d.trim()).context("drainDuration in seconds or minutes"))
        .transpose()?
        .unwrap_or(45);
    let pre_stop =
        ctr["lifecycle"]["preStop"]["sleep"]["seconds"].as_i64().context("preStop sleep")?;
    let grace = pod["terminationGracePeriodSeconds"].as_i64().context("grace period")?;
    assert!(grace > pre_stop + drain, "grace {grace} s <= preStop {pre_stop} s + drain {drain} s");
    assert_eq!(ctr["readinessProbe"]["httpGet"]["path"], "/readyz");

    // the Lease's identity and namespace (discovery.kube.leaderElection's defaults)
    for (name, field) in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")] {
        let e = env(ctr, name).with_context(|| format!("env {name}: {ctr}"))?;
        assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], field, "{e}");
    }
    let election =
        config.lines().find(|l| l.contains("leaderElection:")).context("leaderElection")?;
    assert!(
        !election.contains("identity") && !election.contains("namespace"),
        "the shipped config leaves the Lease's namespace and identity to the downward API: {election}"
    );
    assert_eq!(d["metadata"]["namespace"], NS, "the Role for the Lease is in {NS}");

    // the PodDisruptionBudget: one replica at a time, selecting the same pods
    let pdb = json(c, &["-n", NS, "poddisruptionbudget", "fedgate"])?;
    assert_eq!(pdb["spec"]["maxUnavailable"], 1, "{pdb}");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], *labels);

    // the headless Service: a DNS record per ready replica's tunnel port
    let headless = json(c, &["-n", NS, "service", "fedgate-tunnel-replicas"])?;
    let hs = &headless["spec"];
    assert_eq!(hs["clusterIP"], "None", "{headless}");
    assert_ne!(hs["publishNotReadyAddresses"], true, "not-ready replicas get no record");
    assert_eq!(hs["selector"], *labels);
    assert_eq!(hs["ports"][0]["protocol"], "UDP");
    assert_eq!(hs["ports"][0]["port"], 15443);
    assert_eq!(hs["ports"][0]["targetPort"], "tunnel");
    Ok(())
}

#[test]
fn crds_and_manifests_apply_to_a_real_apiserver() -> Result<()> {
    let c = KubeCluster::start("deploy")?;
    let crds = repo().join("deploy/crds");
    let crds = crds.to_string_lossy();
    c.kubectl_ok(&["apply", "--server-side", "--dry-run=server", "-f", &crds])?;
    c.kubectl_ok(&["apply", "--server-side", "-f", &crds])?;
    c.kubectl_ok(&["wait", "--for=condition=Established", "--timeout=30s", "crd", "--all"])?;
    let served = json(&c, &["crd", "serviceexports.multicluster.x-k8s.io"])?;
    assert_eq!(served["status"]["storedVersions"], serde_json::json!(["v1beta1"]));

    // the namespace for real first: namespaced objects cannot be dry-run into a missing one
    let files = manifests()?;
    let (ns_file, rest) = files.split_first().context("manifests")?;
    let ns_file = ns_file.to_string_lossy();
    c.kubectl_ok(&["apply", "--dry-run=server", "-f", &ns_file])?;
    c.kubectl_ok(&["apply", "-f", &ns_file])?;
    let mut args: Vec<String> = vec!["apply".into(), "--dry-run=server".into()];
    for f in rest {
        args.extend(["-f".into(), f.to_string_lossy().into_owned()]);
    }
    let dry = c.kubectl_ok(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert!(dry.contains("(server dry run)"), "{dry}");
    args.remove(1);
    c.kubectl_ok(&args.iter().map(String::as_str).collect::<Vec<_>>())?;

    // the certificate Secret in the cert-manager layout, from fedgate's own dev PKI
    let tmp = tempfile::tempdir()?;
    let pki = Pki::new(tmp.path(), "ca", "clusterset")?;
    let (crt, key, ca) = pki.issue("cluster-1", &tmp.path().join("certs"))?;
    c.kubectl_ok(&[
        "-n",
        NS,
        "create",
        "secret",
        "generic",
        "fedgate-tls",
        "--type=kubernetes.io/tls",
        &format!("--from-file=tls.crt={}", crt.display()),
        &format!("--from-file=tls.key={}", key.display()),
        &format!("--from-file=ca.crt={}", ca.display()),
    ])?;

    // the Deployment: probes, requests, non-root, read-only root, the Secret as a directory
    let d = json(&c, &["-n", NS, "deployment", "fedgate"])?;
    let pod = &d["spec"]["template"]["spec"];
    let ctr = &pod["containers"][0];
    assert_eq!(ctr["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(ctr["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(ctr["resources"]["requests"]["cpu"].is_string(), "{ctr}");
    assert!(ctr["resources"]["requests"]["memory"].is_string(), "{ctr}");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(ctr["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(ctr["securityContext"]["allowPrivilegeEscalation"], false);
    let tls_mount = ctr["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "tls"))
        .context("tls mount")?;
    assert!(tls_mount.get("subPath").is_none(), "a subPath mount never sees Secret updates");
    assert_eq!(ctr["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    high_availability(&c, &d)?;

    // the Services: UDP tunnel, DNS 53 on both protocols
    let tunnel = json(&c, &["-n", NS, "service", "fedgate-tunnel"])?;
    assert_eq!(tunnel["spec"]["ports"][0]["protocol"], "UDP");
    assert_eq!(tunnel["spec"]["ports"][0]["port"], 15443);
    let dns = json(&c, &["-n", NS, "service", "fedgate-dns"])?;
    let protocols: BTreeSet<&str> = dns["spec"]["ports"]
        .as_array()
        .context("dns ports")?
        .iter()
        .filter(|p| p["port"] == 53)
        .filter_map(|p| p["protocol"].as_str())
        .collect();
    assert_eq!(protocols, BTreeSet::from(["TCP", "UDP"]));

    // RBAC: what the gateway does, and nothing more
    let allowed: &[&[&str]] = &[
        &["list", "services", "-A"],
        &["watch", "endpointslices.discovery.k8s.io", "-A"],
        &["patch", "endpointslices.discovery.k8s.io", "-n", "shop"],
        &["create", "services", "-n", "shop"],
        &["list", "serviceexports.multicluster.x-k8s.io", "-A"],
        &["patch", "serviceexports.multicluster.x-k8s.io", "--subresource=status", "-n", "shop"],
        &["patch", "serviceimports.multicluster.x-k8s.io", "-n", "shop"],
        &["watch", "serviceimports.multicluster.x-k8s.io", "-A"],
        &["delete", "serviceimports.multicluster.x-k8s.io", "-n", "shop"],
        &["get", "clusterproperties.about.k8s.io/cluster.clusterset.k8s.io"],
        &["get", "clusterproperties.about.k8s.io/clusterset.k8s.io"],
        // leader election, in the gateway's own namespace (the Lease's default: POD_NAMESPACE)
        &["get", "leases.coordination.k8s.io/fedgate-leader", "-n", NS],
        &["list", "leases.coordination.k8s.io", "-n", NS],
        &["watch", "leases.coordination.k8s.io", "-n", NS],
        &["create", "leases.coordination.k8s.io", "-n", NS],
        &["update", "leases.coordination.k8s.io/fedgate-leader", "-n", NS],
        &["patch", "leases.coordination.k8s.io/fedgate-leader", "-n", NS],
    ];
    for a in allowed {
        assert!(can_i(&c, a)?, "the gateway's ServiceAccount must be allowed: {a:?}");
    }
    let denied: &[&[&str]] = &[
        &["get", "secrets", "-n", NS],
        &["list", "secrets", "-A"],
        &["delete", "serviceexports.multicluster.x-k8s.io", "-n", "shop"],
        &["patch", "serviceexports.multicluster.x-k8s.io", "-n", "shop"],
        &["create", "pods", "-n", "shop"],
        &["get", "clusterproperties.about.k8s.io/other"],
        &["list", "clusterproperties.about.k8s.io"],
        &["watch", "clusterproperties.about.k8s.io"],
        &["update", "services", "-n", "shop"],
        &["delete", "leases.coordination.k8s.io/fedgate-leader", "-n", NS],
        &["get", "leases.coordination.k8s.io", "-n", "kube-system"],
        &["create", "leases.coordination.k8s.io", "-n", "shop"],
        &["list", "leases.coordination.k8s.io", "-A"],
    ];
    for a in denied {
        assert!(!can_i(&c, a)?, "the gateway's ServiceAccount must not be allowed: {a:?}");
    }
    // what an election client sends, as the ServiceAccount: create the Lease, renew it with a
    // strategic merge patch and with a server-side apply (kube-lease-manager uses both)
    let lease = tmp.path().join("lease.yaml");
    std::fs::write(
        &lease,
        format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {{ name: fedgate-leader, namespace: {NS} }}\nspec: {{ holderIdentity: fedgate-a, leaseDurationSeconds: 15 }}\n"
        ),
    )?;
    let lease = lease.to_string_lossy();
    c.kubectl_ok(&["create", "-f", &lease, "--as", SA])?;
    c.kubectl_ok(&[
        "-n",
        NS,
        "patch",
        "lease",
        "fedgate-leader",
        "-p",
        r#"{"spec":{"holderIdentity":"fedgate-b"}}"#,
        "--as",
        SA,
    ])?;
    c.kubectl_ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager",
        "fedgate",
        "-f",
        &lease,
        "--as",
        SA,
    ])?;
    let held = json(&c, &["-n", NS, "lease", "fedgate-leader"])?;
    assert_eq!(held["spec"]["holderIdentity"], "fedgate-a", "{held}");

    // the shipped gateway config is valid (with the certificate paths pointed at real files)
    let cm = json(&c, &["-n", NS, "configmap", "fedgate-config"])?;
    let config = cm["data"]["config.yaml"].as_str().context("config.yaml")?;
    let config = config
        .replace("/etc/fedgate/tls/tls.crt", &crt.to_string_lossy())
        .replace("/etc/fedgate/tls/tls.key", &key.to_string_lossy())
        .replace("/etc/fedgate/tls/ca.crt", &ca.to_string_lossy());
    let path = tmp.path().join("config.yaml");
    std::fs::write(&path, config)?;
    let (code, out, err) = fedgate(&["analyze", &path.to_string_lossy()])?;
    assert_eq!(code, 0, "fedgate analyze of the shipped config:\n{out}{err}");
    Ok(())
}

/// `helm`: $FEDGATE_HELM, else the one scripts/build-kube.sh builds beside kube-apiserver
/// (from the pinned module `tests/kube/helm`).
fn helm() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FEDGATE_HELM") {
        return Ok(PathBuf::from(p));
    }
    fedgate_e2e::kube::kube_binary("helm")
}

/// (kind, name) of every object in a multi-document YAML text.
fn objects(yaml: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for doc in yaml.split("\n---") {
        let mut kind = None;
        let mut name = None;
        let mut in_meta = false;
        for line in doc.lines() {
            if let Some(k) = line.strip_prefix("kind: ") {
                kind = Some(k.trim().to_owned());
            }
            if line.starts_with("metadata:") {
                in_meta = true;
                continue;
            }
            if in_meta && name.is_none() {
                if let Some(n) = line.strip_prefix("  name: ") {
                    name = Some(n.trim().to_owned());
                } else if !line.starts_with("  ") {
                    in_meta = false;
                }
            }
        }
        if let (Some(k), Some(n)) = (kind, name) {
            out.insert((k, n));
        }
    }
    out
}

#[test]
fn helm_chart_lints_and_renders_the_manifests() -> Result<()> {
    // Fails, naming scripts/build-kube.sh, when helm was not built.
    let helm = helm()?;
    let chart = repo().join("deploy/helm/fedgate");
    let run = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new(&helm).args(args).output()?;
        if !out.status.success() {
            bail!(
                "helm {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    run(&["lint", "--strict", &chart.to_string_lossy()])?;
    let rendered = run(&["template", "fedgate", &chart.to_string_lossy(), "--namespace", NS])?;
    let mut want = BTreeSet::new();
    for f in manifests()? {
        want.extend(objects(&std::fs::read_to_string(&f)?));
    }
    // the chart installs into the release namespace (helm install --create-namespace)
    want.remove(&("Namespace".to_owned(), NS.to_owned()));
    assert_eq!(objects(&rendered), want, "helm template renders the objects of deploy/manifests");
    assert!(rendered.contains("\n      id: cluster-1\n"), "{rendered}");

    // The gateway config the chart renders with `--set <set>`.
    let config_with = |set: &str| -> Result<String> {
        let rendered = run(&[
            "template",
            "fedgate",
            &chart.to_string_lossy(),
            "--namespace",
            NS,
            "--set",
            set,
            "--show-only",
            "templates/configmap.yaml",
        ])?;
        let config = rendered
            .split_once("config.yaml: |\n")
            .map(|(_, c)| c)
            .context("config.yaml in the ConfigMap")?;
        Ok(config.lines().map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l))).collect())
    };

    // an empty clusterId leaves cluster.id out: the ClusterProperty provides it, and the
    // config is still valid
    let config = config_with("clusterId=")?;
    assert!(config.starts_with("cluster:\n  clusterset: clusterset\n"), "{config}");
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("config.yaml");
    std::fs::write(&path, &config)?;
    // the certificate files are not there: those are the only problems
    let (_, out, err) = fedgate(&["analyze", &path.to_string_lossy()])?;
    assert!(!out.is_empty(), "{err}");
    assert!(out.lines().all(|l| l.contains(": tls.")), "only certificate problems:\n{out}{err}");

    // `traffic` values become the config's traffic section, checked like any config: a
    // valid one adds no problem, an invalid one is named
    for (set, problem) in [
        ("traffic.busyPoll=200us,traffic.drainDuration=30s", None),
        ("traffic.busyPoll=1s", Some("traffic.busyPoll: 1s is longer than 10ms")),
    ] {
        let config = config_with(set)?;
        assert!(config.contains("\ntraffic:\n  busyPoll: "), "{set}: {config}");
        std::fs::write(&path, &config)?;
        let (_, out, err) = fedgate(&["analyze", &path.to_string_lossy()])?;
        let others: Vec<&str> = out.lines().filter(|l| !l.contains(": tls.")).collect();
        match problem {
            None => assert!(others.is_empty(), "{set}: only certificate problems:\n{out}{err}"),
            Some(p) => assert!(
                others.len() == 1 && others[0].contains(p),
                "{set}: want {p:?}:\n{out}{err}"
            ),
        }
    }

    // peers with every replica: a list of addresses, or one address (a name with a record per
    // replica); both render into a valid config
    let config = config_with(
        "peers[0].id=cluster-2,peers[0].addresses={203.0.113.7:15443,203.0.113.8:15443},\
         peers[1].id=cluster-3,peers[1].address=198.51.100.9:15443",
    )?;
    assert!(
        config.contains(
            "\n  - { id: cluster-2, addresses: [\"203.0.113.7:15443\",\"203.0.113.8:15443\"] }\n"
        ) && config.contains("\n  - { id: cluster-3, address: \"198.51.100.9:15443\" }\n"),
        "{config}"
    );
    std::fs::write(&path, &config)?;
    let (_, out, err) = fedgate(&["analyze", &path.to_string_lossy()])?;
    assert!(out.lines().all(|l| l.contains(": tls.")), "only certificate problems:\n{out}{err}");

    // values the chart refuses, naming the fix
    let template = |set: &str| {
        run(&["template", "fedgate", &chart.to_string_lossy(), "--namespace", NS, "--set", set])
    };
    for (set, problem) in [
        ("tunnel.perReplicaServices=true", "tunnel.perReplicaServices needs workload=StatefulSet"),
        ("workload=DaemonSet", "workload must be Deployment or StatefulSet"),
        ("antiAffinity=always", "antiAffinity must be preferred or required"),
        // 60 s of grace cannot hold a 5 s preStop and a 90 s drain
        ("traffic.drainDuration=90s", "terminationGracePeriodSeconds (60) must exceed"),
        ("traffic.drainDuration=1m", "preStopSleepSeconds + traffic.drainDuration (65 s)"),
    ] {
        let err = template(set).err().with_context(|| format!("{set} must be refused"))?;
        assert!(err.to_string().contains(problem), "{set}: want {problem:?}: {err:#}");
    }
    template("traffic.drainDuration=90s,terminationGracePeriodSeconds=100")?;
    template("traffic.drainDuration=50s,preStopSleepSeconds=0")?;
    run(&[
        "lint",
        "--strict",
        &chart.to_string_lossy(),
        "--set",
        "workload=StatefulSet,tunnel.perReplicaServices=true,antiAffinity=required",
    ])?;

    // Against a real apiserver: the chart's objects are the manifests' objects field for field
    // (as the apiserver stores them, so YAML style does not matter; the ConfigMap's text is
    // checked by `fedgate analyze` above and in the other test), and the StatefulSet variant
    // with a Service per replica applies.
    let c = KubeCluster::start("helm")?;
    let ns_file = repo().join("deploy/manifests/00-namespace.yaml");
    c.kubectl_ok(&["apply", "-f", &ns_file.to_string_lossy()])?;
    let dry_run = |name: &str, yaml: &str| -> Result<Vec<Value>> {
        let file = tmp.path().join(name);
        std::fs::write(&file, yaml)?;
        let out = c.kubectl_ok(&[
            "apply",
            "--dry-run=server",
            "-o",
            "json",
            "-f",
            &file.to_string_lossy(),
        ])?;
        let mut items = Vec::new();
        for v in serde_json::Deserializer::from_str(&out).into_iter::<Value>() {
            let v = v.with_context(|| format!("kubectl apply -o json: {out}"))?;
            match v["kind"].as_str() {
                Some("List") => items.extend(v["items"].as_array().cloned().unwrap_or_default()),
                _ => items.push(v),
            }
        }
        Ok(items)
    };
    let mut manifest_yaml = String::new();
    for f in manifests()?.iter().skip(1) {
        manifest_yaml.push_str(&std::fs::read_to_string(f)?);
        manifest_yaml.push_str("\n---\n");
    }
    let want = comparable(dry_run("manifests.yaml", &manifest_yaml)?);
    let got = comparable(dry_run("chart.yaml", &rendered)?);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (key, w) in &want {
        if let Some(d) = difference(&got[key], w, "") {
            panic!("{key:?}: the chart's object differs from deploy/manifests' at {d}");
        }
    }

    let variant = template(
        "workload=StatefulSet,tunnel.perReplicaServices=true,replicas=3,antiAffinity=required",
    )?;
    let objects = dry_run("statefulset.yaml", &variant)?;
    let find = |kind: &str, name: &str| {
        objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    };
    assert!(find("Deployment", "fedgate").is_none(), "a StatefulSet instead of the Deployment");
    let sts = find("StatefulSet", "fedgate").context("the StatefulSet")?;
    let spec = &sts["spec"];
    assert_eq!(spec["replicas"], 3);
    assert_eq!(spec["serviceName"], "fedgate-tunnel-replicas", "the headless Service governs it");
    assert_eq!(spec["podManagementPolicy"], "Parallel");
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    let pod = &spec["template"]["spec"];
    let required =
        &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(required[0]["topologyKey"], "kubernetes.io/hostname", "{pod}");
    assert!(env(&pod["containers"][0], "POD_NAME").is_some());
    for i in 0..3 {
        let name = format!("fedgate-tunnel-{i}");
        let svc = find("Service", &name).with_context(|| format!("Service {name}"))?;
        assert_eq!(svc["spec"]["type"], "LoadBalancer");
        assert_eq!(
            svc["spec"]["selector"]["statefulset.kubernetes.io/pod-name"],
            format!("fedgate-{i}"),
            "{svc}"
        );
        assert_eq!(svc["spec"]["selector"]["app.kubernetes.io/name"], "fedgate");
        assert_eq!(svc["spec"]["ports"][0]["protocol"], "UDP");
        assert_eq!(svc["spec"]["ports"][0]["port"], 15443);
    }
    assert!(find("Service", "fedgate-tunnel-3").is_none());
    Ok(())
}

/// The first place where `a` and `b` differ: its path and both values.
fn difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let null = Value::Null;
                difference(
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    &format!("{path}.{k}"),
                )
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (a, b))| difference(a, b, &format!("{path}[{i}]"))),
        _ => (a != b).then(|| format!("{path}: chart {a}, manifests {b}")),
    }
}

/// (kind, name) → what must agree between the chart and the manifests: labels and the
/// object's content, without what the apiserver allocates per request (ClusterIPs, node ports)
/// and the chart's config checksum. ConfigMaps are left out (their text differs in comments).
fn comparable(objects: Vec<Value>) -> std::collections::BTreeMap<(String, String), Value> {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for k in ["clusterIP", "clusterIPs", "nodePort", "healthCheckNodePort"] {
                    m.remove(k);
                }
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for mut o in objects {
        let kind = o["kind"].as_str().unwrap_or_default().to_owned();
        if kind == "ConfigMap" {
            continue;
        }
        let name = o["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        if let Some(t) = o.pointer_mut("/spec/template/metadata") {
            t.as_object_mut().map(|t| t.remove("annotations"));
        }
        let mut keep = serde_json::Map::new();
        keep.insert("labels".into(), o["metadata"]["labels"].clone());
        keep.insert("namespace".into(), o["metadata"]["namespace"].clone());
        for field in ["spec", "rules", "roleRef", "subjects", "automountServiceAccountToken"] {
            if let Some(v) = o.get(field) {
                keep.insert(field.into(), v.clone());
            }
        }
        let mut keep = Value::Object(keep);
        strip(&mut keep);
        out.insert((kind, name), keep);
    }
    out
}
