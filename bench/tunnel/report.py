#!/usr/bin/env python3
"""bench/tunnel.sh's tables, from the figures it wrote into its scratch directory:
  tput.PATH.STREAMS   one line per iperf3 run: Gb/s, bytes received, proxy CPU seconds, round
  lat.PATH            one line per latency round: p50 us, p99 us, mean us, round trips (rr.py)
  rrcpu.PATH          one line per latency round: proxy CPU us per round trip
  mtu.PATH            the path MTU the fedgate pair's QUIC connection(s) settled on
  ceil.fedgate        one line per run of quic_ceiling: Gb/s, CPU s/GB (both ends)
  ceil.quinn-perf     one line per quinn-perf run: Gb/s, bytes, CPU s (both ends), current_mtu
  ceil.*.err          why that ceiling was not measured
  ceil.note           the quinn releases on either side
  tput.PATH.STREAMS.err  iperf3 runs that failed
Usage: report.py WORK DURATION REPEAT ROUNDS LAT_REPEAT CEIL_GB STREAMS..."""
import os
import statistics
import sys

work, duration, repeat, rounds, lat_repeat, ceil_gb = sys.argv[1:7]
streams = [int(s) for s in sys.argv[7:]]
PATHS = ["direct", "fedgate-1452", "fedgate-jumbo", "fedgate-busypoll",
         "fedgate-1452-dp1", "fedgate-1452-dp2", "stunnel", "haproxy"]
HEADLINE, DEFAULTS = "fedgate-1452", "fedgate-jumbo"


def lines(name):
    path = os.path.join(work, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [l.split() for l in f if l.strip()]


def text(name, default=""):
    path = os.path.join(work, name)
    return open(path).read().strip() if os.path.exists(path) else default


def median(xs):
    return statistics.median(xs) if xs else None


tput, cpu = {}, {}  # (path, streams) -> median Gb/s, CPU s/GB over all runs
by_round = {}  # (path, streams) -> {round: (Gb/s, CPU s/GB)}
for p in PATHS:
    for n in streams:
        runs = [tuple(map(float, r)) for r in lines(f"tput.{p}.{n}")]
        by_round[p, n] = {int(r[3]): (r[0], r[2] / (r[1] / 1e9) if r[1] else None) for r in runs}
        if runs:
            tput[p, n] = median([r[0] for r in runs])
            gb = sum(r[1] for r in runs) / 1e9
            cpu[p, n] = sum(r[2] for r in runs) / gb if p != "direct" and gb else None
lat = {p: [tuple(map(float, r[:2])) for r in lines(f"lat.{p}")] for p in PATHS}
lat = {p: v for p, v in lat.items() if v}
rrcpu = {p: median([float(r[0]) for r in lines(f"rrcpu.{p}")]) for p in lat}
# Added p99 per round against the same round's direct p99.
added = {p: [x[1] - d[1] for x, d in zip(lat[p], lat["direct"])] for p in lat if "direct" in lat}


def f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def ratio(a, b):
    return a / b if a is not None and b else None


# --- figures per path ------------------------------------------------------------------------
print()
head = ["path", "path MTU"]
for n in streams:
    head += [f"Gb/s {n} stream{'s' if n > 1 else ''}", "× stunnel"]
head += [f"CPU s/GB {n}" for n in streams]
head += ["p50 µs", "p99 µs", "added p99 µs", "CPU µs/round trip"]
print("| " + " | ".join(head) + " |")
print("|---|---|" + "---:|" * (len(head) - 2))
for p in PATHS:
    if not any((p, n) in tput for n in streams) and p not in lat:
        continue
    row = [p, text(f"mtu.{p}", "-")]
    for n in streams:
        row += [f(tput.get((p, n))), f(ratio(tput.get((p, n)), tput.get(("stunnel", n))))]
    row += [f(cpu.get((p, n))) for n in streams]
    if p in lat:
        row += [f(median([x[0] for x in lat[p]]), "{:.1f}"), f(median([x[1] for x in lat[p]]), "{:.1f}"),
                f(median(added[p]) if p != "direct" else None, "{:+.1f}"),
                f(rrcpu[p] if p != "direct" else None, "{:.1f}")]
    else:
        row += ["-"] * 4
    print("| " + " | ".join(row) + " |")

# --- targets -----------------------------------------------------------------------------------
print()
print("| target (issue 20) | fedgate | baseline | ratio | verdict | for reference |")
print("|---|---:|---|---:|---|---|")
verdicts = []


def target(what, value, base_name, base, op, goal, ref="", fmt="{:.2f}", per_round=None):
    """per_round: (path, baseline path, streams, 0 for Gb/s or 1 for CPU s/GB): with several
    rounds, also how many of them met the target on their own."""
    r = ratio(value, base)
    if value is None or base is None:
        verdict = "NOT MEASURED"
    elif op is None:
        verdict = "-"
    else:
        ok = r >= goal if op == ">=" else r <= goal if op == "<=" else r > goal
        verdict = "PASS" if ok else "FAIL"
    goal_s = f" (target {dict(zip(['>=', '<=', '>'], ['≥', '≤', '>']))[op]} {goal}×)" if op else ""
    r_s = "-" if r is None else f"{r:.2f}×"
    if per_round and op:
        a, b = by_round.get(per_round[:3:2], {}), by_round.get(per_round[1:3], {})
        both = [(a[k][per_round[3]], b[k][per_round[3]]) for k in a if k in b]
        met = [ratio(x, y) for x, y in both if x is not None and y]
        met = sum(m >= goal if op == ">=" else m <= goal if op == "<=" else m > goal for m in met)
        if len(both) > 1:
            goal_s += f", met in {met} of {len(both)} rounds"
    if op is not None:
        verdicts.append(verdict)
    print(f"| {what} | {f(value, fmt)} | {base_name} {f(base, fmt)} | {r_s}{goal_s} | {verdict} | {ref} |")


def ref_tput(n):
    return ", ".join(f"{p} {f(tput.get((p, n)))}" for p in ["haproxy", "direct"] if (p, n) in tput)


for n in streams:
    s = "s" if n > 1 else ""
    target(f"Gb/s, 1452-byte datagrams, {n} stream{s}", tput.get((HEADLINE, n)), "stunnel",
           tput.get(("stunnel", n)), ">=", 1.0, ref_tput(n), per_round=(HEADLINE, "stunnel", n, 0))
for n in streams:
    s = "s" if n > 1 else ""
    target(f"Gb/s, jumbo (defaults), {n} stream{s}", tput.get((DEFAULTS, n)), "stunnel",
           tput.get(("stunnel", n)), ">=" if n == 1 else None, 1.2, ref_tput(n),
           per_round=(DEFAULTS, "stunnel", n, 0))
for n in streams:
    s = "s" if n > 1 else ""
    target(f"proxy CPU s/GB, 1452, {n} stream{s}", cpu.get((HEADLINE, n)), "stunnel",
           cpu.get(("stunnel", n)), "<=", 1.0,
           ", ".join(f"{p} {f(cpu.get((p, n)))}" for p in ["haproxy", DEFAULTS] if (p, n) in cpu),
           per_round=(HEADLINE, "stunnel", n, 1))
for n in streams:
    if (f"{HEADLINE}-dp1", n) not in tput and (f"{HEADLINE}-dp2", n) not in tput:
        continue
    s = "s" if n > 1 else ""
    d1, d2 = tput.get((f"{HEADLINE}-dp1", n)), tput.get((f"{HEADLINE}-dp2", n))
    target(f"Gb/s, 1452, {n} stream{s}, dataPlaneThreads 1", d1, "stunnel", tput.get(("stunnel", n)),
           None, None, f"CPU {f(cpu.get((f'{HEADLINE}-dp1', n)))} s/GB")
    # Several streams must rise with a second thread; one stream (on one thread either way)
    # is shown against one thread without a target.
    target(f"Gb/s, 1452, {n} stream{s}, dataPlaneThreads 2", d2, "dataPlaneThreads 1", d1,
           ">" if n > 1 else None, 1.0,
           f"{f(ratio(d2, tput.get(('stunnel', n))))}× stunnel, CPU {f(cpu.get((f'{HEADLINE}-dp2', n)))} s/GB",
           per_round=(f"{HEADLINE}-dp2", f"{HEADLINE}-dp1", n, 0))

fc = [tuple(map(float, r[:2])) for r in lines("ceil.fedgate")]
qp = [r for r in lines("ceil.quinn-perf")]
fc_g = median([r[0] for r in fc])
qp_g = median([float(r[0]) for r in qp])
why = "; ".join(x for x in [text("ceil.fedgate.err"), text("ceil.quinn-perf.err")] if x)
ref = (f"CPU s/GB {f(median([r[1] for r in fc]))} vs "
       f"{f(median([float(r[2]) / (float(r[1]) / 1e9) for r in qp]))}; "
       f"quinn-perf current_mtu {','.join(sorted(set(r[3] for r in qp))) or '-'}; runs {len(fc)} and {len(qp)}; "
       f"{text('ceil.note')}" + (f"; {why}" if why else ""))
ceil_rounds = [a[0] / float(b[0]) >= 0.9 for a, b in zip(fc, qp)]  # back to back, round by round
if len(ceil_rounds) > 1:
    ref = f"met in {sum(ceil_rounds)} of {len(ceil_rounds)} rounds; " + ref
target("QUIC-only ceiling Gb/s, 1452, one stream", fc_g, "quinn-perf", qp_g, ">=", 0.9, ref)

if DEFAULTS in lat and "stunnel" in lat and "haproxy" in lat:
    for name, per_round in [("p50", lambda p: [x[0] for x in lat[p]]), ("added p99", lambda p: added[p])]:
        fg, st, ha = per_round(DEFAULTS), per_round("stunnel"), per_round("haproxy")
        best = [min(a, b) for a, b in zip(st, ha)]
        wins = sum(a <= b for a, b in zip(fg, best))
        verdict = "PASS" if wins * 2 > len(best) else "FAIL"
        verdicts.append(verdict)
        others = ", ".join(f"{p} {f(median(per_round(p)), '{:+.1f}' if name != 'p50' else '{:.1f}')}"
                           for p in ["stunnel", "haproxy", HEADLINE, "fedgate-busypoll"] if p in lat)
        fmt = "{:.1f}" if name == "p50" else "{:+.1f}"
        print(f"| latency {name} µs, defaults ({DEFAULTS}), ≤ the better chain in most rounds "
              f"| {f(median(fg), fmt)} | better chain {f(median(best), fmt)} | {wins} of {len(best)} rounds "
              f"| {verdict} | {others} |")

failed = [l for p in PATHS for n in streams if os.path.exists(os.path.join(work, f"tput.{p}.{n}.err"))
          for l in open(os.path.join(work, f"tput.{p}.{n}.err"))]
print()
for l in failed:
    print(l.strip())
unmeasured = f" ({verdicts.count('NOT MEASURED')} not measured)" if "NOT MEASURED" in verdicts else ""
print(f"{verdicts.count('PASS')} of {len(verdicts)} targets met{unmeasured}. "
      f"(iperf3 -t {duration}, median of {repeat} interleaved run(s) per path and stream count; "
      f"CPU = utime+stime of both proxy processes during those runs; ceiling: quic_ceiling 1452 {ceil_gb} "
      f"and quinn-perf client --max-udp-payload-size 1452, medians; latency: {lat_repeat} interleaved rounds "
      f"of {rounds} round trips of 1024 B over one connection, medians, added p99 = p99 - the same round's direct p99)")
