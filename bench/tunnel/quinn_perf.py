#!/usr/bin/env python3
"""One quinn-perf client run against a running quinn-perf server: one connection, one
bidirectional request whose download outlasts the run (one stream, server -> client).
Usage: quinn_perf.py BIN SERVER_PID HOST:PORT SECONDS MAX_UDP_PAYLOAD OUT_PREFIX
-> prints "gbps bytes cpu_seconds current_mtu"; cpu_seconds = utime+stime of the server (its
/proc/<pid>/stat, across the run) and the client (its rusage). Throughput = bytes the client
received over the reported intervals (its --json output), from OUT_PREFIX.json; the client's
stdout (stats and --conn-stats, whose last `current_mtu` is the path MTU in use) in
OUT_PREFIX.log."""
import json
import os
import re
import subprocess
import sys


def ticks(pid: str) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def main() -> None:
    binary, server_pid, addr, seconds, payload, out = sys.argv[1:7]
    tck = os.sysconf("SC_CLK_TCK")
    t0 = ticks(server_pid)
    with open(f"{out}.log", "w") as log:
        child = subprocess.Popen(
            [binary, "client", "--duration", seconds, "--download-size", "1000G",
             "--upload-size", "0", "--conn-stats", "--max-udp-payload-size", payload,
             "--json", f"{out}.json", addr],
            stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    cpu = (ticks(server_pid) - t0) / tck + usage.ru_utime + usage.ru_stime
    if status != 0:
        sys.exit(f"quinn-perf client exited with status {status} (log {out}.log)")
    with open(f"{out}.json") as f:
        intervals = json.load(f)["intervals"]
    got = sum(i["sum"]["bytes"] for i in intervals)
    secs = sum(i["sum"]["seconds"] for i in intervals)
    if not got or not secs:
        sys.exit(f"quinn-perf moved no data (log {out}.log)")
    with open(f"{out}.log") as f:
        mtus = re.findall(r"current_mtu: (\d+)", f.read())
    print(f"{got * 8 / secs / 1e9:.4f} {got} {cpu:.2f} {mtus[-1] if mtus else '?'}")


if __name__ == "__main__":
    main()
