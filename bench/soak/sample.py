#!/usr/bin/env python3
"""One reading of a gateway for the soak benchmark: `rss-kib fds listening` of PID, from READS
readings 0.2 s apart. RSS: their median. fds: the reading with the fewest descriptors other
than listening TCP sockets (so connections that happen to be open at that instant do not
count), with its listening sockets (ClusterSetIP and endpoint-VIP listeners, admin, DNS over
TCP: their number follows the imports, which the churn changes).
Usage: sample.py PID [READS]"""
import os
import statistics
import sys
import time


def reading(pid: str):
    rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status")
               if line.startswith("VmRSS:"))
    sockets = set()
    fds = os.listdir(f"/proc/{pid}/fd")
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            sockets.add(link[8:-1])
    listening = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                x = line.split()
                if x[3] == "0A" and x[9] in sockets:
                    listening += 1
    return rss, len(fds), listening


def main() -> None:
    pid, reads = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
    rs = []
    for i in range(reads):
        rs.append(reading(pid))
        if i + 1 < reads:
            time.sleep(0.2)
    _, fds, listening = min(rs, key=lambda r: r[1] - r[2])
    print(int(statistics.median(r[0] for r in rs)), fds, listening)


main()
