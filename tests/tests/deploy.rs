//! deploy/ against a real kube-apiserver: the CRDs and manifests pass a server-side dry run and
//! a real apply; the Deployment has its probes, requests and hardening; the ServiceAccount's
//! RBAC allows exactly what the gateway does (checked with `kubectl auth can-i` as that
//! ServiceAccount); the shipped gateway config passes `fedgate analyze`; the Helm chart renders
//! the same objects as the manifests (built by scripts/build-kube.sh, or $FEDGATE_HELM).

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
        &["delete", "serviceimports.multicluster.x-k8s.io", "-n", "shop"],
        &["get", "clusterproperties.about.k8s.io/cluster.clusterset.k8s.io"],
        &["get", "clusterproperties.about.k8s.io/clusterset.k8s.io"],
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
    ];
    for a in denied {
        assert!(!can_i(&c, a)?, "the gateway's ServiceAccount must not be allowed: {a:?}");
    }

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
    Ok(())
}
