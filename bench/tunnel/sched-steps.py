#!/usr/bin/env python3
"""Per-hop timing of a request/response chain from `perf script` of sched_switch,
sched_waking and sched_migrate_task events (rr-compare.sh SCHED mode records them).

usage: perf script -i FILE | sched-steps.py COMM[,COMM...] ROUND_TRIPS

For the processes whose name (or name up to its first '-', so fedgate-data-0 is fedgate) is
listed, prints:
- step: from a process being switched in to it waking the next process (its own work for one
  hop: read, proxy, write, up to the wake-up of the reader);
- wake local/remote: from a wake-up to the woken process running, split by whether it ran on
  the waker's CPU (after any migration the scheduler chose) or on another one (an idle vCPU
  that must be woken: the expensive kind in a VM);
- wake-ups per round trip by waker -> wakee.
"""
import re
import statistics as st
import sys
from collections import Counter

LINE = re.compile(
    r"\s*(\S+)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(sched_switch|sched_waking|sched_migrate_task):(.*)"
)


def kind_of(comm, watch):
    base = comm.split("-")[0]
    return base if base in watch else (comm if comm in watch else None)


def main():
    watch = set(sys.argv[1].split(","))
    rounds = int(sys.argv[2])
    switched_in = {}  # pid -> (time, kind)
    pending = {}  # woken pid -> (time, local?, waker cpu)
    steps, delays, pairs = {}, {"local": [], "remote": []}, Counter()
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        comm, pid, cpu, ts, event, rest = m.groups()
        pid, cpu, t = int(pid), int(cpu), float(ts) * 1e6
        if event == "sched_switch":
            n = re.search(r"next_comm=(\S+) next_pid=(\d+)", rest)
            if not n:
                continue
            k, npid = kind_of(n.group(1), watch), int(n.group(2))
            if k:
                switched_in[npid] = (t, k)
                if npid in pending:
                    t0, where, _ = pending.pop(npid)
                    delays[where].append(t - t0)
        elif event == "sched_migrate_task":
            n = re.search(r"pid=(\d+) .*dest_cpu=(\d+)", rest)
            if n and int(n.group(1)) in pending:
                t0, _, waker_cpu = pending[int(n.group(1))]
                pending[int(n.group(1))] = (t0, "local" if int(n.group(2)) == waker_cpu else "remote", waker_cpu)
        else:
            n = re.search(r"comm=(\S+) pid=(\d+) .*target_cpu=(\d+)", rest)
            if not n or not kind_of(n.group(1), watch) or not kind_of(comm, watch):
                continue
            wpid = int(n.group(2))
            pending[wpid] = (t, "local" if int(n.group(3)) == cpu else "remote", cpu)
            pairs[(kind_of(comm, watch), kind_of(n.group(1), watch))] += 1
            if pid in switched_in:
                t0, k = switched_in.pop(pid)
                steps.setdefault(k, []).append(t - t0)

    def show(label, values, cap):
        v = [x for x in values if x < cap]  # leave out the pauses between runs
        if v:
            print(f"  {label:22s} {len(v) / rounds:5.2f}/rt  median {st.median(v):5.1f} us  mean {st.mean(v):5.1f} us")

    for k in sorted(steps):
        show(f"step {k}", steps[k], 200)
    for where in ("local", "remote"):
        show(f"wake {where}", delays[where], 500)
    for (a, b), n in sorted(pairs.items()):
        print(f"  wakes {a} -> {b}: {n / rounds:.2f}/rt")


if __name__ == "__main__":
    main()
