#!/usr/bin/env python3
"""Export churn of the soak benchmark: writes Kubernetes YAML (Service, EndpointSlice,
ServiceExport) into the file-source directories of the gateways.

  churn.py init  DIRS BACKENDS PORT             # the services the traffic uses, then exit
  churn.py run   DIRS BACKENDS PORT SECONDS EVERY MAX OUT.json

DIRS: `alpha=/dir,bravo=/dir`; BACKENDS: `alpha=ip+ip+ip,bravo=ip+ip+ip` (all of them serve
PORT for the whole run). Every cluster `<c>` (prefix `p` = its first letter) exports:
  <p>-stable  port 7000, endpoints fixed (long-lived and short connections use it)
  <p>-moving  port 7100 -> PORT, its endpoints change (short connections use it; every
              backend stays up, so a change must never fail a connection)
  shared      port 7200 -> PORT, exported by every cluster (the local endpoint wins)
and, in `run`, every EVERY seconds for SECONDS one change in one cluster, picked at random:
  move     <p>-moving gets another non-empty set of endpoints
  add      a service <p>-c<k> (k < MAX) appears: random ports, endpoints, sometimes headless
  remove   one of them disappears (its file is deleted)
  modify   one of them changes: endpoints, ready flags, ports, headless or not, or its
           ServiceExport is withdrawn (the Service stays) or restored
Writes are atomic (a dot-file renamed into place; the file source skips dot-files). At the
end, OUT.json counts the changes by kind.
"""
import json
import os
import random
import sys
import time

NS = "soak"
CREATED = "2026-01-01T00:00:00Z"


def parse_map(arg: str) -> dict:
    return dict(kv.split("=", 1) for kv in arg.split(","))


def service_yaml(name, ports, endpoints, headless=False, cluster_ip=None, export=True):
    """ports: [(name, port, target)], endpoints: [(ip, ready)]."""
    y = [f"apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: {NS} }}\nspec:\n"]
    y.append("  clusterIP: None\n" if headless else f"  clusterIP: {cluster_ip}\n")
    y.append("  ports:\n")
    for pname, port, target in ports:
        y.append(f"  - {{ name: {pname}, port: {port}, targetPort: {target}, protocol: TCP }}\n")
    y.append(f"---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n"
             f"  name: {name}-1\n  namespace: {NS}\n"
             f"  labels: {{ kubernetes.io/service-name: {name} }}\naddressType: IPv4\nports:\n")
    for pname, _, target in ports:
        y.append(f"- {{ name: {pname}, port: {target}, protocol: TCP }}\n")
    y.append("endpoints:\n")
    for ip, ready in endpoints:
        y.append(f"- addresses: [\"{ip}\"]\n  conditions: {{ ready: {str(ready).lower()} }}\n")
    if export:
        y.append(f"---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\n"
                 f"metadata:\n  name: {name}\n  namespace: {NS}\n"
                 f"  creationTimestamp: \"{CREATED}\"\n")
    return "".join(y)


def write(d: str, file: str, text: str) -> None:
    tmp = os.path.join(d, f".{file}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(d, file))


class Cluster:
    def __init__(self, name: str, d: str, backends: list, port: int, index: int, rng):
        self.name, self.d, self.backends, self.port = name, d, backends, port
        self.p, self.index, self.rng = name[0], index, rng
        self.moving = backends[:2]
        self.churn = {}  # k -> spec dict

    def cip(self, host: int) -> str:
        return f"10.96.{self.index}.{host}"

    def init(self) -> None:
        b, port = self.backends, self.port
        write(self.d, "stable.yaml", service_yaml(
            f"{self.p}-stable", [("tcp", 7000, port)], [(b[0], True), (b[1], True)],
            cluster_ip=self.cip(1)))
        self.write_moving()
        write(self.d, "shared.yaml", service_yaml(
            "shared", [("tcp", 7200, port)], [(b[-1], True)], cluster_ip=self.cip(3)))

    def write_moving(self) -> None:
        write(self.d, "moving.yaml", service_yaml(
            f"{self.p}-moving", [("tcp", 7100, self.port)], [(ip, True) for ip in self.moving],
            cluster_ip=self.cip(2)))

    def random_spec(self) -> dict:
        r = self.rng
        n = r.randint(1, 2)
        ports = [(f"p{i}", 7300 + r.randint(0, 3) * 10 + i, self.port) for i in range(n)]
        eps = [(ip, r.random() < 0.85) for ip in r.sample(self.backends, r.randint(1, len(self.backends)))]
        return {"ports": ports, "endpoints": eps, "headless": r.random() < 0.25, "export": True}

    def write_churn(self, k: int) -> None:
        s = self.churn[k]
        write(self.d, f"churn-{k}.yaml", service_yaml(
            f"{self.p}-c{k}", s["ports"], s["endpoints"], s["headless"], self.cip(10 + k),
            s["export"]))

    def move(self) -> str:
        while True:
            new = sorted(self.rng.sample(self.backends, self.rng.randint(1, len(self.backends))))
            if new != sorted(self.moving):
                break
        self.moving = new
        self.write_moving()
        return "move"

    def add(self, k: int) -> str:
        self.churn[k] = self.random_spec()
        self.write_churn(k)
        return "add"

    def remove(self, k: int) -> str:
        del self.churn[k]
        os.remove(os.path.join(self.d, f"churn-{k}.yaml"))
        return "remove"

    def modify(self, k: int) -> str:
        r, s, new = self.rng, self.churn[k], self.random_spec()
        what = r.choice(["endpoints", "endpoints", "ports", "headless", "export"])
        if what == "endpoints":
            s["endpoints"] = new["endpoints"]
        elif what == "ports":
            s["ports"] = new["ports"]
        elif what == "headless":
            s["headless"] = not s["headless"]
        else:
            s["export"] = not s["export"]
        self.write_churn(k)
        return "modify"

    def step(self, maximum: int) -> str:
        r = self.rng
        present = sorted(self.churn)
        absent = [k for k in range(maximum) if k not in self.churn]
        x = r.random()
        if x < 0.3:
            return self.move()
        if x < 0.6 and absent or not present:
            return self.add(r.choice(absent))
        if x < 0.8 and present:
            return self.remove(r.choice(present))
        return self.modify(r.choice(present))


def main() -> None:
    mode, dirs, backends, port = sys.argv[1], parse_map(sys.argv[2]), parse_map(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(17)
    clusters = [Cluster(name, dirs[name], backends[name].split("+"), port, i + 1, rng)
                for i, name in enumerate(sorted(dirs))]
    if mode == "init":
        for c in clusters:
            c.init()
        return
    seconds, every, maximum, out = float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]), sys.argv[8]
    counts = {"move": 0, "add": 0, "remove": 0, "modify": 0}
    start = time.monotonic()
    deadline = start + seconds
    tick = 0
    while True:
        tick += 1
        at = start + tick * every
        if at >= deadline:
            break
        time.sleep(max(0.0, at - time.monotonic()))
        counts[rng.choice(clusters).step(maximum)] += 1
    with open(out, "w") as f:
        json.dump(counts, f)


main()
