#!/usr/bin/env python3
"""Regenerates the seed corpora of the fuzz targets from real clients and servers.

request_path: the datagrams real `dig` sends for names of the fixture zone
(fedgate_dns::fixture) with many flag/EDNS/opcode/class combinations, captured by a UDP
socket on loopback.
forward_response: real answers of a real `unbound` on loopback (local-data) to the question
the target asks (www.example.com. A, ID 0x1234), one unbound per zone variant.

Usage: python3 fuzz/gen-seeds.py   (needs dig and unbound; writes fuzz/corpus/*)
"""
import hashlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def save(target, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def capture_dig(args):
    """Runs dig against a capturing socket; returns the first datagram dig sent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    port = sock.getsockname()[1]
    proc = subprocess.Popen(
        ["dig", "@127.0.0.1", "-p", str(port), "+tries=1", "+time=1"] + args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        data, _ = sock.recvfrom(65535)
    finally:
        proc.kill()
        proc.wait()
        sock.close()
    return data


NAMES = [
    "web.shop.svc.clusterset.local",
    "WEB.Shop.svc.ClusterSet.local",
    "db.shop.svc.clusterset.local",
    "db-0.east.db.shop.svc.clusterset.local",
    "db-0.west.db.shop.svc.clusterset.local",
    "east.db.shop.svc.clusterset.local",
    "_http._tcp.db.shop.svc.clusterset.local",
    "_http._tcp.web.shop.svc.clusterset.local",
    "big.shop.svc.clusterset.local",
    "nope.shop.svc.clusterset.local",
    "shop.svc.clusterset.local",
    "dns-version.clusterset.local",
    "clusterset.local",
    "api.shop.svc.cluster.local",
    "pods.shop.svc.cluster.local",
    "pod-a.pods.shop.svc.cluster.local",
    "web.shop.svc.cluster.local",
    "cluster.local",
    "www.example.com",
    "1.0.1.242.in-addr.arpa",
]
TYPES = ["A", "AAAA", "SRV", "TXT", "SOA", "NS", "ANY", "PTR", "MX", "CNAME"]
VARIANTS = [
    [],
    ["+noedns"],
    ["+dnssec"],
    ["+cd", "+norec"],
    ["+bufsize=512"],
    ["+bufsize=4096", "+nsid"],
    ["+noedns", "+nocookie"],
    ["+edns=1"],
    ["+ednsopt=65001:abcd"],
]


def request_seeds():
    n = 0
    for i, name in enumerate(NAMES):
        for j, qtype in enumerate(TYPES):
            # Every name with every type, and each name with a few variants (not all
            # combinations: the fuzzer mutates flags itself).
            variants = [VARIANTS[(i + j) % len(VARIANTS)]]
            if j == 0:
                variants = VARIANTS
            for v in variants:
                # dig asks ANY over TCP unless told otherwise; the target is the UDP path.
                tcp = ["+notcp"] if qtype == "ANY" else []
                try:
                    save("request_path", capture_dig([name, qtype] + v + tcp))
                    n += 1
                except TimeoutError:
                    print("dig sent nothing for", name, qtype, v, file=sys.stderr)
    for extra in (
        ["-c", "CH", "version.bind", "TXT"],
        ["-c", "HS", "db.shop.svc.clusterset.local", "A"],
        ["+opcode=notify", "web.shop.svc.clusterset.local", "SOA"],
        ["+opcode=status", "web.shop.svc.clusterset.local", "A"],
        ["+opcode=update", "clusterset.local", "SOA"],
        ["+header-only", "web.shop.svc.clusterset.local"],
        ["clusterset.local", "IXFR=1", "+notcp"],
        ["-t", "TYPE65280", "web.shop.svc.clusterset.local"],
        ["+qid=0", "web.shop.svc.clusterset.local"],
    ):
        try:
            save("request_path", capture_dig(extra))
            n += 1
        except TimeoutError:
            print("dig sent nothing for", extra, file=sys.stderr)
    return n


def raw_query(qid, name, qtype=1, edns=None, flags=0x0100):
    q = struct.pack(">HHHHHH", qid, flags, 1, 0, 0, 1 if edns else 0)
    for label in name.strip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00" + struct.pack(">HH", qtype, 1)
    if edns:
        q += b"\x00" + struct.pack(">HHIH", 41, edns, 0, 0)
    return q


ZONES = {
    "a": 'local-zone: "example.com." static\n'
    'local-data: "www.example.com. 60 IN A 192.0.2.1"\n'
    'local-data: "www.example.com. 60 IN A 192.0.2.2"\n',
    "cname": 'local-zone: "example.com." static\n'
    'local-data: "www.example.com. 30 IN CNAME web.example.com."\n'
    'local-data: "web.example.com. 30 IN A 192.0.2.3"\n',
    "nxdomain": 'local-zone: "example.com." static\n'
    'local-data: "example.com. 300 IN SOA ns.example.com. h.example.com. 1 60 60 600 30"\n',
    "nodata": 'local-zone: "example.com." static\n'
    'local-data: "example.com. 300 IN SOA ns.example.com. h.example.com. 1 60 60 600 30"\n'
    'local-data: "www.example.com. 60 IN TXT \\"v=1\\""\n',
    "many": 'local-zone: "example.com." static\n'
    + "".join(f'local-data: "www.example.com. 60 IN A 192.0.2.{i}"\n' for i in range(1, 61)),
    "refused": 'local-zone: "example.com." refuse\n',
}


def forward_seeds():
    n = 0
    for zone, data in ZONES.items():
        with tempfile.TemporaryDirectory() as tmp:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            conf = os.path.join(tmp, "unbound.conf")
            with open(conf, "w") as f:
                f.write(
                    "server:\n  interface: 127.0.0.1\n"
                    f"  port: {port}\n  do-daemonize: no\n  use-syslog: no\n"
                    # Never recurse: every answer comes from local data (no network).
                    '  local-zone: "." refuse\n'
                    f'  directory: "{tmp}"\n  chroot: ""\n  username: ""\n  pidfile: ""\n'
                    "  access-control: 127.0.0.0/8 allow\n  do-ip6: no\n"
                    + ("  " + data.replace("\n", "\n  ") if data else "")
                    + "\n"
                )
            proc = subprocess.Popen(["unbound", "-d", "-c", conf],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                for attempt in range(100):
                    try:
                        for edns in (None, 1232, 512):
                            for name in ("www.example.com", "WWW.Example.COM"):
                                c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                                c.settimeout(0.2)
                                c.sendto(raw_query(0x1234, name, 1, edns), ("127.0.0.1", port))
                                resp, _ = c.recvfrom(65535)
                                c.close()
                                save("forward_response", resp)
                                n += 1
                        break
                    except (socket.timeout, ConnectionRefusedError):
                        time.sleep(0.1)
                else:
                    print("unbound did not answer for zone", zone, file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait()
    return n


if __name__ == "__main__":
    print("request_path seeds:", request_seeds())
    print("forward_response seeds:", forward_seeds())
