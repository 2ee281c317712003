#!/usr/bin/env python3
"""Report of the soak benchmark: the table of samples, least-squares slopes from WARMUP
seconds on, the load's counts and the verdict (exit status 1 on FAIL).

Usage: report.py SAMPLES WARMUP LOAD.json CHURN.json QUIET
SAMPLES: one line per sample, `seconds` then `rss-kib fds listening` of alpha and of bravo
(bench/soak/sample.py). The fd slope is of fds other than listening sockets: those follow
the imports, which the churn changes. QUIET: `before|after gateway rss-kib fds listening`,
readings without load before the run and after it (exports put back as they were): the
listening sockets must be the same and fds at most SOAK_FD_SLACK (2) more.
Thresholds (environment): SOAK_MAX_MB_PER_MIN (1), SOAK_MAX_PCT_PER_MIN (2),
SOAK_MAX_FDS_PER_MIN (1).
"""
import json
import os
import sys


def slope(points):
    """Least-squares slope of [(x, y)]; None for fewer than two distinct x."""
    n = len(points)
    if n < 2:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def main() -> int:
    samples_path, warmup, load_path, churn_path, quiet_path = sys.argv[1:6]
    warmup = float(warmup)
    slack = int(os.environ.get("SOAK_FD_SLACK", "2"))
    max_mb = float(os.environ.get("SOAK_MAX_MB_PER_MIN", "1"))
    max_pct = float(os.environ.get("SOAK_MAX_PCT_PER_MIN", "2"))
    max_fds = float(os.environ.get("SOAK_MAX_FDS_PER_MIN", "1"))
    rows = []
    with open(samples_path) as f:
        for line in f:
            t, ar, af, al, br, bf, bl = line.split()
            rows.append((float(t), int(ar) / 1024, int(af), int(al), int(br) / 1024, int(bf),
                         int(bl)))
    quiet = {}
    if os.path.exists(quiet_path):
        for line in open(quiet_path):
            when, g, rss, fds, listening = line.split()
            quiet[(when, g)] = (int(rss) / 1024, int(fds), int(listening))
    load = json.load(open(load_path)) if os.path.exists(load_path) else {}
    churn = json.load(open(churn_path)) if os.path.exists(churn_path) else {}

    print("| minute | alpha RSS MB | alpha fds | (listening) | bravo RSS MB | bravo fds | (listening) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for t, ar, af, al, br, bf, bl in rows:
        print(f"| {t / 60:.1f} | {ar:.1f} | {af} | {al} | {br:.1f} | {bf} | {bl} |")
    print()

    fit = [r for r in rows if r[0] >= warmup]
    problems = []
    if len(fit) < 2:
        problems.append(f"only {len(fit)} sample(s) from minute {warmup / 60:.1f} on: no slope")
    for name, ri, fi in (("alpha", 1, 2), ("bravo", 4, 5)):
        if len(fit) < 2:
            break
        mb = slope([(r[0] / 60, r[ri]) for r in fit])
        fds = slope([(r[0] / 60, r[fi] - r[fi + 1]) for r in fit])
        mean = sum(r[ri] for r in fit) / len(fit)
        pct = 100 * mb / mean
        print(f"{name}: RSS slope {mb:+.3f} MB/min ({pct:+.2f} %/min of {mean:.1f} MB), "
              f"fds slope {fds:+.2f}/min (listening sockets not counted), from minute {fit[0][0] / 60:.1f} to {fit[-1][0] / 60:.1f} "
              f"({len(fit)} samples); RSS {rows[0][ri]:.1f} -> {rows[-1][ri]:.1f} MB, "
              f"fds {rows[0][fi]} -> {rows[-1][fi]} over the run")
        if mb >= max_mb or pct >= max_pct:
            problems.append(f"{name} RSS grows {mb:+.3f} MB/min ({pct:+.2f} %/min; limits "
                            f"{max_mb:g} MB/min, {max_pct:g} %/min)")
        if fds >= max_fds:
            problems.append(f"{name} fds grow {fds:+.2f}/min (limit {max_fds:g}/min)")

    for name in ("alpha", "bravo"):
        b, a = quiet.get(("before", name)), quiet.get(("after", name))
        if not (a and b):
            problems.append(f"no quiet reading of {name} before and after the run")
            continue
        print(f"{name} quiet, before -> after the run: RSS {b[0]:.1f} -> {a[0]:.1f} MB, "
              f"fds {b[1]} -> {a[1]}, listening {b[2]} -> {a[2]}")
        if a[2] != b[2]:
            problems.append(f"{name} listens on {a[2]} sockets after the run, {b[2]} before")
        if a[1] > b[1] + slack:
            problems.append(f"{name} holds {a[1]} fds after the run, {b[1]} before "
                            f"(slack {slack})")
    lat = load.get("short_ms", {})
    print(f"short connections: {load.get('short_ok', 0)} ok, {load.get('short_failed', 0)} failed"
          f" (round trip incl. connect: p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, "
          f"max {lat.get('max')} ms)")
    reconnects = load.get("long_connects", 0)
    print(f"long-lived connections: {reconnects} opened, {load.get('long_ok', 0)} exchanges ok, "
          f"{load.get('long_failed', 0)} failed")
    print(f"DNS queries: {load.get('dns_ok', 0)} ok, {load.get('dns_failed', 0)} failed")
    print("by target/kind: " + ", ".join(f"{k} {v}" for k, v in load.get("detail", {}).items()))
    print("export changes: " + (", ".join(f"{k} {v}" for k, v in churn.items()) or "none recorded"))
    for reason, n in load.get("reasons", []):
        print(f"  failure x{n}: {reason}")
    if not load:
        problems.append("no load summary (the load generator did not finish)")
    for key in ("short_failed", "long_failed", "dns_failed"):
        if load.get(key, 0):
            problems.append(f"{load[key]} {key.replace('_', ' ')}")
    if load and not load.get("short_ok"):
        problems.append("no short connection succeeded")
    print()
    if problems:
        print("FAIL: " + "; ".join(problems))
        return 1
    print(f"PASS: no growth after minute {warmup / 60:.1f} (RSS < {max_mb:g} MB/min and "
          f"< {max_pct:g} %/min, fds < {max_fds:g}/min), fds and listeners back to the "
          f"quiet figures after the run, no failed request")
    return 0


sys.exit(main())
