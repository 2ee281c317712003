"""Summary of bench/dns.sh: report.py WORK N RATE FWD_N FWD_RATE ROUNDS SERVER...

Reads the dnsperf outputs WORK/max.<server>.<round> (maximum QPS; the median round counts), WORK/lat.<server> and WORK/fwd
(fixed rate, run with -v so every answered query's latency is printed) and prints one markdown
table plus the forwarded-queries line and whether issue 4's targets are met.
"""

import os
import re
import sys


def parse(path: str) -> dict:
    out = {"qps": None, "sent": 0, "lost": 0, "avg": None, "max": None, "lat": [], "rcodes": {}}
    if not os.path.exists(path):
        return out
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("> "):
                parts = line.split()
                try:
                    out["lat"].append(float(parts[-1]))
                except (ValueError, IndexError):
                    pass
                continue
            if m := re.search(r"Queries per second:\s+([\d.]+)", line):
                out["qps"] = float(m.group(1))
            elif m := re.search(r"Queries sent:\s+(\d+)", line):
                out["sent"] = int(m.group(1))
            elif m := re.search(r"Queries lost:\s+(\d+)", line):
                out["lost"] = int(m.group(1))
            elif m := re.search(r"Average Latency \(s\):\s+([\d.]+) \(min [\d.]+, max ([\d.]+)\)", line):
                out["avg"], out["max"] = float(m.group(1)), float(m.group(2))
            elif "Response codes:" in line:
                for code, count in re.findall(r"([A-Z]+) (\d+) \(", line):
                    out["rcodes"][code] = int(count)
    return out


def pct(values: list, p: float):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def ms(v) -> str:
    return "-" if v is None else f"{v * 1000:.3f}"


def main() -> None:
    work, n, rate, fwd_n, fwd_rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    rounds = int(sys.argv[6])
    servers = sys.argv[7:]
    runs = {s: [parse(os.path.join(work, f"max.{s}.{r}")) for r in range(1, rounds + 1)] for s in servers}
    maxes = {}
    for s in servers:
        done = sorted((m for m in runs[s] if m["qps"] is not None), key=lambda m: m["qps"])
        maxes[s] = done[len(done) // 2] if done else parse("")
        maxes[s]["range"] = f"{done[0]['qps'] / 1000:.0f}-{done[-1]['qps'] / 1000:.0f} k" if done else "-"
        maxes[s]["lost"] = sum(m["lost"] for m in runs[s])
        maxes[s]["rcodes"] = {}
        for m in runs[s]:
            for code, c in m["rcodes"].items():
                maxes[s]["rcodes"][code] = maxes[s]["rcodes"].get(code, 0) + c
    lats = {s: parse(os.path.join(work, f"lat.{s}")) for s in servers}
    qps = {s: maxes[s]["qps"] for s in servers}

    def ratio(s: str, base: str) -> str:
        if qps.get(s) and qps.get(base):
            return f"{qps[s] / qps[base]:.2f}x"
        return "-"

    print(
        f"{n} clusterset.local A names; max QPS: median of {rounds} rounds (range); "
        f"latency at {rate} qps, ms: avg / p50 / p99 / max\n"
    )
    print("| server | max QPS (range) | vs unbound | vs NSD | latency at fixed rate (ms) | lost (max runs / fixed) | not NOERROR |")
    print("|---|---|---|---|---|---|---|")
    for s in servers:
        m, l = maxes[s], lats[s]
        q = "-" if m["qps"] is None else f"{m['qps']:,.0f} ({m['range']})"
        lat = f"{ms(l['avg'])} / {ms(pct(l['lat'], 50))} / {ms(pct(l['lat'], 99))} / {ms(l['max'])}"
        bad = sum(c for code, c in m["rcodes"].items() if code != "NOERROR") + sum(
            c for code, c in l["rcodes"].items() if code != "NOERROR"
        )
        print(f"| {s} | {q} | {ratio(s, 'unbound')} | {ratio(s, 'nsd')} | {lat} | {m['lost']} / {l['lost']} | {bad} |")

    f = parse(os.path.join(work, "fwd"))
    servfail = sum(c for code, c in f["rcodes"].items() if code != "NOERROR")
    print(
        f"\nForwarded queries (fedgate -> unbound upstream, {fwd_n} names outside fedgate's zones, TTL 0 so "
        f"uncached, {fwd_rate} qps): sent {f['sent']}, lost {f['lost']}, not NOERROR {servfail}, "
        f"latency avg {ms(f['avg'])} / p50 {ms(pct(f['lat'], 50))} / p99 {ms(pct(f['lat'], 99))} / max {ms(f['max'])} ms"
    )

    checks = []
    if qps.get("fedgate") and qps.get("unbound"):
        checks.append(("fedgate >= 1.0x unbound", qps["fedgate"] >= qps["unbound"]))
    if qps.get("fedgate") and qps.get("nsd"):
        checks.append(("fedgate >= 0.7x NSD", qps["fedgate"] >= 0.7 * qps["nsd"]))
    checks.append(("0 lost forwarded queries", f["sent"] > 0 and f["lost"] == 0 and servfail == 0))
    print("\nTargets: " + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in checks))


if __name__ == "__main__":
    main()
