//! Real pods in a test cluster (issue 21 item 1): etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and a fedgate-vnode node in the cluster's network namespace; a Deployment's
//! pods are host processes (socat) in network namespaces of their own, with addresses from the
//! cluster's pod range, reachable from other pods; the EndpointSlice controller lists them;
//! `kubectl exec` and `kubectl logs` work through the apiserver; a pod whose command cannot
//! start fails with the reason while the others keep running. See docs/testing-kube.md, "Pods".

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fedgate_e2e::eventually;
use fedgate_e2e::kube::{KubeCluster, PodNetwork, connect_flat, pod_ip, pod_ready};
use fedgate_e2e::netns::{Netns, reap_stale_namespaces, require_tools, run};

const ECHO: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: { name: echo, namespace: shop }
spec:
  replicas: 2
  selector: { matchLabels: { app: echo } }
  template:
    metadata: { labels: { app: echo } }
    spec:
      containers:
      - name: tcp
        image: ignored.example/socat:1
        env:
        - { name: POD_NAME, valueFrom: { fieldRef: { fieldPath: metadata.name } } }
        - { name: POD_IP, valueFrom: { fieldRef: { fieldPath: status.podIP } } }
        - { name: GREETING, value: "hi" }
        command: ["sh", "-c"]
        args: ["echo started $POD_NAME $POD_IP; exec socat TCP-LISTEN:42,fork,reuseaddr SYSTEM:'echo $(GREETING)-$POD_NAME'"]
        ports: [{ name: tcp, containerPort: 42 }]
        readinessProbe: { tcpSocket: { port: tcp }, periodSeconds: 1 }
      # The answer reads the request first: an `echo` alone may exit before socat writes the
      # datagram to it, and socat then ends on EPIPE without sending the answer (20 of 100
      # requests on a loaded 2-core VM; none of 100 with the read).
      - name: udp
        image: ignored.example/socat:1
        env: [{ name: POD_NAME, valueFrom: { fieldRef: { fieldPath: metadata.name } } }]
        command: ["socat", "UDP-LISTEN:4242,fork,reuseaddr", "SYSTEM:read request; echo udp-$POD_NAME"]
        ports: [{ name: udp, containerPort: 4242, protocol: UDP }]
---
apiVersion: v1
kind: Service
metadata: { name: echo, namespace: shop }
spec:
  selector: { app: echo }
  ports:
  - { name: tcp, port: 42, targetPort: tcp }
  - { name: udp, port: 4242, targetPort: udp, protocol: UDP }
"#;

/// Two pods whose command cannot start: a missing binary (restartPolicy Never: the pod fails)
/// and no command at all (restartPolicy Always: the container waits, restarting); and one whose
/// command exits 7 at once (restartPolicy Always: restarted with a back-off).
const BROKEN: &str = r#"
apiVersion: v1
kind: Pod
metadata: { name: missing-binary, namespace: shop }
spec:
  restartPolicy: Never
  containers:
  - { name: main, image: ignored, command: ["/nonexistent/fedgate-no-such-binary", "--flag"] }
---
apiVersion: v1
kind: Pod
metadata: { name: no-command, namespace: shop }
spec:
  containers:
  - { name: main, image: docker.io/library/nginx:latest }
---
apiVersion: v1
kind: Pod
metadata: { name: crashing, namespace: shop }
spec:
  containers:
  - { name: main, image: ignored, command: [sh, -c, "echo crash-run; exit 7"] }
"#;

/// A StatefulSet of one `sleep` pod behind a headless Service (MCS headless exports use the
/// slice's per-endpoint hostnames).
const STATEFUL: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: db, namespace: shop }
spec:
  clusterIP: None
  selector: { app: db }
  ports: [{ port: 5432 }]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: { name: db, namespace: shop }
spec:
  serviceName: db
  replicas: 1
  selector: { matchLabels: { app: db } }
  template:
    metadata: { labels: { app: db } }
    spec:
      containers:
      - { name: main, image: ignored, command: [sleep, "3600"] }
"#;

/// A pod whose exec readinessProbe passes while `flag` (a host file) exists, and its Service.
fn gated_yaml(flag: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{ name: gated, namespace: shop, labels: {{ app: gated }} }}
spec:
  containers:
  - name: main
    image: ignored
    command: [sleep, "3600"]
    readinessProbe: {{ exec: {{ command: [test, -e, "{flag}"] }}, periodSeconds: 1 }}
---
apiVersion: v1
kind: Service
metadata: {{ name: gated, namespace: shop }}
spec:
  selector: {{ app: gated }}
  ports: [{{ port: 80 }}]
"#
    )
}

fn secs(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

fn names(pods: &[serde_json::Value]) -> Vec<String> {
    pods.iter().map(|p| p["metadata"]["name"].as_str().unwrap_or_default().to_owned()).collect()
}

/// The namespaces of this cluster's pods (`ip netns list`, by prefix).
fn pod_namespaces(c: &KubeCluster) -> Result<Vec<String>> {
    let prefix = c.pod_netns_prefix().context("no pods")?;
    let list = run(Command::new("ip").args(["netns", "list"]))?;
    Ok(list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect())
}

#[test]
fn pods_are_processes_in_network_namespaces() -> Result<()> {
    require_tools();
    reap_stale_namespaces();
    let t0 = Instant::now();
    let ns = Netns::create(&format!("fg-{}-pods", std::process::id()))?;
    // A DNS address other than the bridge's, to see that the one given is what pods get.
    let net = PodNetwork::for_cluster(1).with_dns(Ipv4Addr::new(10, 101, 0, 53));
    let c = KubeCluster::start_with_pods(&ns, "east", net.clone())?;
    eprintln!("FIGURE cluster with pods ready: {:.1} s", c.started_in().as_secs_f64());
    // A resolver at that address in the cluster's namespace (standing in for fedgate's DNS):
    // unbound with one name under cluster.local.
    ns.ip(&["addr", "add", &format!("{}/32", net.dns), "dev", "lo"])?;
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  interface: {dns}\n  port: 53\n  do-daemonize: no\n  use-syslog: no\n  \
             directory: \"{d}\"\n  chroot: \"\"\n  username: \"\"\n  pidfile: \"\"\n  do-ip6: no\n  \
             access-control: {cidr} allow\n  local-zone: \".\" refuse\n  \
             local-zone: \"cluster.local.\" static\n  \
             local-data: \"probe.shop.svc.cluster.local. 60 IN A 192.0.2.77\"\n",
            dns = net.dns,
            d = dir.path().display(),
            cidr = net.cidr(),
        ),
    )?;
    let mut unbound = ns
        .command("unbound")
        .args(["-d", "-c"])
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting unbound")?;
    let result = scenario(&c, &net);
    let _ = unbound.kill();
    let _ = unbound.wait();
    if let Err(e) = result {
        eprintln!("{}", c.logs(60));
        return Err(e);
    }

    // Dropping the cluster stops the vnode, the controllers and the control plane.
    drop(c);
    eprintln!("FIGURE whole test: {:.1} s", secs(t0));
    Ok(())
}

fn scenario(c: &KubeCluster, net: &PodNetwork) -> Result<()> {
    // A node, Ready, with the pod range and the bridge address as InternalIP.
    let node = c.get_json(&["node", &c.node_name()])?.context("no node")?;
    assert_eq!(node["spec"]["podCIDR"], net.cidr());
    assert_eq!(node["status"]["addresses"][0]["address"], net.gateway().to_string());

    c.create_namespace("shop")?;
    let t = Instant::now();
    c.apply_yaml(ECHO)?;
    let echo = c.wait_pods_ready("shop", "app=echo", 2, Duration::from_secs(60))?;
    eprintln!("FIGURE Deployment applied -> 2 pods Running+Ready: {:.1} s", secs(t));
    let ips: Vec<Ipv4Addr> =
        echo.iter().map(|p| pod_ip(p).context("no podIP")).collect::<Result<_>>()?;
    let echo_names = names(&echo);
    for (pod, ip) in echo.iter().zip(&ips) {
        assert!(net.contains(*ip) && *ip != net.gateway(), "pod IP {ip} not from {}", net.cidr());
        assert_eq!(pod["spec"]["nodeName"], c.node_name());
        for cs in pod["status"]["containerStatuses"].as_array().context("no container statuses")? {
            assert_eq!(cs["ready"], true, "{cs}");
            assert!(cs["state"]["running"]["startedAt"].is_string(), "{cs}");
        }
    }
    assert_ne!(ips[0], ips[1]);

    // The EndpointSlice controller lists both pods (ready), with both ports.
    let t = Instant::now();
    let slice =
        eventually("EndpointSlice of shop/echo with both pods", Duration::from_secs(30), || {
            let list = c
                .get_json(&[
                    "endpointslices",
                    "-n",
                    "shop",
                    "-l",
                    "kubernetes.io/service-name=echo",
                ])?
                .unwrap_or_default();
            let Some(slice) = list["items"].as_array().and_then(|i| i.first()).cloned() else {
                return Ok(None);
            };
            let mut addrs: Vec<String> = slice["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["conditions"]["ready"] == true)
                .filter_map(|e| e["addresses"][0].as_str().map(str::to_owned))
                .collect();
            addrs.sort();
            let mut want: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
            want.sort();
            Ok((addrs == want).then_some(slice))
        })?;
    eprintln!("FIGURE EndpointSlice with both pods: {:.1} s after they were ready", secs(t));
    let mut ports: Vec<(String, i64)> = slice["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (p["name"].as_str().unwrap_or_default().to_owned(), p["port"].as_i64().unwrap_or(0))
        })
        .collect();
    ports.sort();
    assert_eq!(ports, [("tcp".to_owned(), 42), ("udp".to_owned(), 4242)]);

    // kubectl exec and logs through the apiserver and the vnode's kubelet API.
    let t = Instant::now();
    assert_eq!(c.exec_ok("shop", &echo_names[0], &["sh", "-c", "echo ok"])?, "ok\n");
    eprintln!("FIGURE kubectl exec: {:.2} s", secs(t));
    let out = c.exec_with_stdin("shop", &echo_names[0], &["sh", "-c", "cat; echo done"], "in\n")?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in\ndone\n", "{out:?}");
    let out = c.exec("shop", &echo_names[0], &["sh", "-c", "exit 3"])?;
    assert_eq!(out.status.code(), Some(3), "exit code of exec: {out:?}");
    let addr = c.exec_ok("shop", &echo_names[0], &["ip", "-4", "-o", "addr", "show", "eth0"])?;
    assert!(addr.contains(&format!("{}/{}", ips[0], net.prefix_len)), "{addr}");
    let resolv = c.exec_ok("shop", &echo_names[0], &["cat", "/etc/resolv.conf"])?;
    assert!(resolv.contains(&format!("nameserver {}\n", net.dns)), "{resolv}");
    assert!(
        resolv.contains("search shop.svc.cluster.local svc.cluster.local cluster.local"),
        "{resolv}"
    );
    // The pod's resolver: the search path finds probe.shop.svc.cluster.local at that server.
    let t = Instant::now();
    let found = eventually("nslookup probe in a pod", Duration::from_secs(10), || {
        let out = c.exec("shop", &echo_names[0], &["nslookup", "probe"])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(text.contains("192.0.2.77").then_some(text))
    })?;
    assert!(found.contains("probe.shop.svc.cluster.local"), "{found}");
    eprintln!("FIGURE nslookup through the pod's resolv.conf: {:.2} s", secs(t));
    let logs = c.pod_logs("shop", &echo_names[0])?;
    assert!(logs.contains(&format!("started {} {}", echo_names[0], ips[0])), "logs: {logs}");

    // Readiness drives the EndpointSlice: an exec probe that passes while a file exists.
    let flag = std::env::temp_dir().join(format!("fedgate-ready-{}", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    c.apply_yaml(&gated_yaml(&flag.display().to_string()))?;
    let slice_ready = |want: bool| {
        eventually(&format!("gated's endpoint ready={want}"), Duration::from_secs(20), || {
            let list = c
                .get_json(&[
                    "endpointslices",
                    "-n",
                    "shop",
                    "-l",
                    "kubernetes.io/service-name=gated",
                ])?
                .unwrap_or_default();
            let ready = &list["items"][0]["endpoints"][0]["conditions"]["ready"];
            Ok((ready.as_bool() == Some(want)).then_some(()))
        })
    };
    let gated = c.wait_pod("shop", "gated", Duration::from_secs(30), "running", |p| {
        p["status"]["phase"] == "Running"
    })?;
    assert!(!pod_ready(&gated), "ready without its file: {}", gated["status"]);
    slice_ready(false)?;
    std::fs::write(&flag, "")?;
    let t = Instant::now();
    slice_ready(true)?;
    eprintln!("FIGURE exec readiness probe passes -> endpoint ready: {:.1} s", secs(t));
    std::fs::remove_file(&flag)?;
    slice_ready(false)?;

    // A StatefulSet behind a headless Service: pod db-0, its slice endpoint named db-0.
    c.apply_yaml(STATEFUL)?;
    let db = c.wait_pods_ready("shop", "app=db", 1, Duration::from_secs(30))?;
    assert_eq!(names(&db), ["db-0"]);
    let db_ip = pod_ip(&db[0]).context("db-0 IP")?.to_string();
    eventually("db's slice with hostname db-0", Duration::from_secs(20), || {
        let list = c
            .get_json(&["endpointslices", "-n", "shop", "-l", "kubernetes.io/service-name=db"])?
            .unwrap_or_default();
        let e = &list["items"][0]["endpoints"][0];
        Ok((e["hostname"] == "db-0" && e["addresses"][0] == db_ip.as_str()).then_some(()))
    })?;

    // Pods whose command cannot start: failed / waiting with the reason; the node goes on.
    c.apply_yaml(BROKEN)?;
    let failed = c.wait_pod("shop", "missing-binary", Duration::from_secs(30), "Failed", |p| {
        p["status"]["phase"] == "Failed"
    })?;
    let term = &failed["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(term["reason"], "StartError", "{term}");
    let msg = term["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("/nonexistent/fedgate-no-such-binary") && msg.contains("no such file"),
        "{msg}"
    );
    let waiting =
        c.wait_pod("shop", "no-command", Duration::from_secs(30), "waiting with a reason", |p| {
            p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "RunContainerError"
        })?;
    let msg = waiting["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.contains("has no command"), "{msg}");
    eprintln!("missing binary: {term}\nno command: {msg}");
    let crashing = c.wait_pod("shop", "crashing", Duration::from_secs(30), "restarted", |p| {
        p["status"]["containerStatuses"][0]["restartCount"].as_i64() >= Some(1)
    })?;
    let last = &crashing["status"]["containerStatuses"][0]["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 7, "{last}");
    assert_eq!(last["reason"], "Error", "{last}");
    let previous = c.kubectl_ok(&["logs", "-n", "shop", "crashing", "--previous"])?;
    assert_eq!(previous, "crash-run\n");

    // A request pod reaches each echo pod's IP (TCP and UDP) directly: no kube-proxy, so the
    // Service's ClusterIP is not routed; the endpoint addresses are.
    let client = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{ name: client, namespace: shop }}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: ignored\n    command: [sh, -c, 'nc -w 5 {a} 42 </dev/null; echo x | nc -u -w 2 {b} 4242']\n",
        a = ips[0],
        b = ips[1],
    );
    let t = Instant::now();
    c.apply_yaml(&client)?;
    c.wait_pod("shop", "client", Duration::from_secs(30), "Succeeded", |p| {
        p["status"]["phase"] == "Succeeded"
    })?;
    let got = c.pod_logs("shop", "client")?;
    eprintln!("FIGURE request pod ran and succeeded: {:.1} s; its log: {got:?}", secs(t));
    assert!(got.contains(&format!("hi-{}", echo_names[0])), "client log: {got}");
    assert!(got.contains(&format!("udp-{}", echo_names[1])), "client log: {got}");
    // `logs -f` of a container that has exited ends with the whole log.
    assert_eq!(c.kubectl_ok(&["logs", "-f", "-n", "shop", "client"])?, got);

    // The echo pods kept running through all of that.
    let again = c.wait_pods_ready("shop", "app=echo", 2, Duration::from_secs(5))?;
    assert_eq!(names(&again), echo_names);
    assert!(again.iter().all(pod_ready));

    // Deleting a pod: the ReplicaSet replaces it, its namespace goes away.
    let before = pod_namespaces(c)?;
    assert_eq!(
        before.len(),
        8,
        "namespaces of 2 echo, gated, db-0, client, 3 broken pods: {before:?}"
    );
    let t = Instant::now();
    c.kubectl_ok(&["delete", "pod", "-n", "shop", &echo_names[0], "--wait=true", "--timeout=60s"])?;
    eprintln!("FIGURE kubectl delete pod (until gone): {:.1} s", secs(t));
    let replaced = c.wait_pods_ready("shop", "app=echo", 2, Duration::from_secs(30))?;
    ensure!(!names(&replaced).contains(&echo_names[0]), "not replaced: {:?}", names(&replaced));
    let after = pod_namespaces(c)?;
    assert_eq!(after.len(), 8, "{after:?}");
    assert!(after.iter().filter(|n| before.contains(n)).count() == 7, "{before:?} -> {after:?}");

    // Garbage collection and the namespace controller: deleting the Deployment removes its
    // ReplicaSet's pods; deleting the namespace deletes every pod in it and then finishes.
    c.kubectl_ok(&["delete", "deployment", "-n", "shop", "echo"])?;
    eventually("the Deployment's pods to go", Duration::from_secs(30), || {
        let list = c.get_json(&["pods", "-n", "shop", "-l", "app=echo"])?.unwrap_or_default();
        Ok(list["items"].as_array().is_none_or(|i| i.is_empty()).then_some(()))
    })?;
    let t = Instant::now();
    c.kubectl_ok(&["delete", "namespace", "shop", "--wait=false"])?;
    eventually("the namespace's pods to go", Duration::from_secs(60), || {
        let list = c.get_json(&["pods", "-n", "shop"])?.unwrap_or_default();
        Ok(list["items"].as_array().is_none_or(|i| i.is_empty()).then_some(()))
    })?;
    let pods_gone = secs(t);
    eventually("namespace shop to go", Duration::from_secs(60), || {
        Ok(c.get_json(&["namespace", "shop"])?.is_none().then_some(()))
    })?;
    eprintln!(
        "FIGURE kubectl delete namespace (6 pods in it): pods gone {pods_gone:.1} s, namespace gone {:.1} s",
        secs(t)
    );
    let left = pod_namespaces(c)?;
    assert!(left.is_empty(), "pod namespaces left: {left:?}");
    Ok(())
}

/// One socat pod answering `<cluster> <peer address>` on TCP 42, and a client pod that sleeps.
fn echo_and_client(cluster: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{ name: echo, namespace: shop, labels: {{ app: echo }} }}
spec:
  containers:
  - name: main
    image: ignored
    command: [socat, "TCP-LISTEN:42,fork,reuseaddr", "SYSTEM:echo {cluster} $SOCAT_PEERADDR"]
    readinessProbe: {{ tcpSocket: {{ port: 42 }}, periodSeconds: 1 }}
---
apiVersion: v1
kind: Pod
metadata: {{ name: client, namespace: shop, labels: {{ app: client }} }}
spec:
  containers:
  - {{ name: main, image: ignored, command: [sleep, "3600"] }}
"#
    )
}

/// Two clusters with pods, each in its own namespace, joined by a veth (netns::Pair). Gateway
/// mode (the default): neither pod range is routed to the other cluster. Flat mode
/// (`connect_flat`): a pod reaches the other cluster's pod IP directly, without NAT.
#[test]
fn pod_ranges_are_isolated_until_routed_flat() -> Result<()> {
    require_tools();
    let t0 = Instant::now();
    let pair = fedgate_e2e::netns::Pair::new()?;
    let (east_net, west_net) = (PodNetwork::for_cluster(1), PodNetwork::for_cluster(2));
    let (east, west) = KubeCluster::start_pair_with_pods(
        &pair,
        ["east", "west"],
        [east_net.clone(), west_net.clone()],
    )?;
    eprintln!(
        "FIGURE two clusters with pods ready (in parallel): {:.1} / {:.1} s",
        east.started_in().as_secs_f64(),
        west.started_in().as_secs_f64()
    );
    let result = (|| -> Result<()> {
        for (c, name) in [(&east, "east"), (&west, "west")] {
            c.create_namespace("shop")?;
            c.apply_yaml(&echo_and_client(name))?;
        }
        let mut ips = Vec::new();
        for c in [&east, &west] {
            let echo = c.wait_pods_ready("shop", "app=echo", 1, Duration::from_secs(60))?;
            let client = c.wait_pods_ready("shop", "app=client", 1, Duration::from_secs(60))?;
            ips.push((
                pod_ip(&echo[0]).context("echo IP")?,
                pod_ip(&client[0]).context("client IP")?,
            ));
        }
        let [(east_echo, east_client), (west_echo, west_client)] = ips[..] else { unreachable!() };
        assert!(east_net.contains(east_echo) && west_net.contains(west_echo), "{ips:?}");

        let nc = |c: &KubeCluster, ip: Ipv4Addr| {
            c.exec("shop", "client", &["sh", "-c", &format!("nc -w 2 {ip} 42 </dev/null")])
        };
        // Within a cluster: the pod's reply names the client's own pod address.
        let out = nc(&east, east_echo)?;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("east {east_client}\n"),
            "{out:?}"
        );
        // Gateway mode: the other cluster's pod range is not routed.
        for (c, ip) in [(&east, west_echo), (&west, east_echo)] {
            let out = nc(c, ip)?;
            assert!(!out.status.success() && out.stdout.is_empty(), "reached {ip}: {out:?}");
        }
        // Flat mode.
        connect_flat((&pair.a, &east_net, pair.a_ip), (&pair.b, &west_net, pair.b_ip))?;
        let out = nc(&east, west_echo)?;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("west {east_client}\n"),
            "{out:?}"
        );
        let out = nc(&west, east_echo)?;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("east {west_client}\n"),
            "{out:?}"
        );
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("{}\n{}", east.logs(40), west.logs(40));
        return Err(e);
    }
    eprintln!("FIGURE whole test: {:.1} s", secs(t0));
    Ok(())
}
