#!/usr/bin/env python3
"""Client load of the soak benchmark, for SECONDS, then a JSON summary in OUT:

  short  RATE new connections per second in all, round-robin over the --short targets
         (LABEL=IP:PORT, a ClusterSetIP): connect, one line, its echo, close; 5 s budget each
  long   LONG connections spread over the --long targets, held the whole run; each sends a
         line and reads its echo every LONG_EVERY s (+-50 %, jittered); a failed exchange is
         counted and the connection is opened again after 1 s
  dns    DNS_RATE `dig` queries per second over the --dns servers (LABEL=IP:PORT), every
         fifth over TCP, names drawn from: the --names services (must answer an A record),
         the --churn-names services (NOERROR or NXDOMAIN: they come and go), a new forwarded
         name each time (q<n>.soak.test, TTL 0 upstream: must answer an A record) and one
         cached forwarded name (cached.soak.test)

Nothing in the load is a fault: every failure is counted as one, with its reason.
"""
import argparse
import asyncio
import collections
import json
import random
import re
import time


class Stats:
    def __init__(self):
        self.c = collections.Counter()
        self.reasons = collections.Counter()
        self.rtt = []

    def fail(self, key: str, reason: str) -> None:
        self.c[key + "_failed"] += 1
        self.reasons[reason[:160]] += 1


# What a failed exchange with an echo server raises.
EXCHANGE_ERRORS = (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError)


async def close(writer) -> None:
    """Closes a connection (if one was opened), ignoring errors of an already broken one."""
    if writer is not None:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def echo_line(reader, writer, msg: bytes) -> None:
    """Sends one line and reads its echo; a different answer raises ValueError."""
    writer.write(msg)
    await writer.drain()
    got = await reader.readline()
    if got != msg:
        raise ValueError(f"echo {got[:40]!r}")


async def paced(rate: float, deadline: float, start_one) -> None:
    """Starts the coroutine start_one(i) for i = 0, 1, ... at `rate` per second until
    `deadline`, each as a task of its own, then waits for every one still running."""
    tasks = set()
    start, i = time.monotonic(), 0
    while True:
        at = start + i / rate
        if at >= deadline:
            break
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        t = asyncio.create_task(start_one(i))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.gather(*tasks)


async def short_one(st: Stats, label: str, host: str, port: int, n: int) -> None:
    t0 = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(host, port)
            await echo_line(reader, writer, f"short {n}\n".encode())
        st.c["short_ok"] += 1
        st.c[f"short_ok {label}"] += 1
        st.rtt.append(time.monotonic() - t0)
    except EXCHANGE_ERRORS as e:
        st.fail("short", f"short {label}: {type(e).__name__}: {e}")
        st.c[f"short_failed {label}"] += 1
    finally:
        await close(writer)


async def short_load(st: Stats, targets, rate: float, deadline: float) -> None:
    def start_one(i: int):
        label, host, port = targets[i % len(targets)]
        return short_one(st, label, host, port, i)

    await paced(rate, deadline, start_one)


async def long_one(st: Stats, idx: int, label: str, host: str, port: int, every: float,
                   deadline: float) -> None:
    rng = random.Random(idx)
    await asyncio.sleep(idx * 0.05)
    n = 0
    while time.monotonic() < deadline:
        writer = None
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection(host, port)
            st.c["long_connects"] += 1
            while True:
                pause = every * rng.uniform(0.5, 1.5)
                if time.monotonic() + pause >= deadline:
                    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                    break
                await asyncio.sleep(pause)
                n += 1
                async with asyncio.timeout(5):
                    await echo_line(reader, writer, f"long {idx} {n}\n".encode())
                st.c["long_ok"] += 1
        except EXCHANGE_ERRORS as e:
            st.fail("long", f"long {label}: {type(e).__name__}: {e}")
            await asyncio.sleep(1)
        finally:
            await close(writer)


STATUS = re.compile(r"status: ([A-Z]+)")


async def dig_one(st: Stats, label: str, host: str, port: str, name: str, kind: str,
                  tcp: bool) -> None:
    args = ["dig", "+time=2", "+tries=1", "+noall", "+comments", "+answer", f"@{host}",
            "-p", port, name, "A"]
    if tcp:
        args.insert(1, "+tcp")
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out = (await proc.communicate())[0].decode(errors="replace")
    m = STATUS.search(out)
    status = m.group(1) if m else f"no answer (dig exit {proc.returncode})"
    has_a = any(f[2:4] == ["IN", "A"] for f in (line.split() for line in out.splitlines())
                if len(f) == 5 and not f[0].startswith(";"))
    if kind == "churn":
        ok = status in ("NOERROR", "NXDOMAIN")
    else:
        ok = status == "NOERROR" and has_a
    if ok:
        st.c["dns_ok"] += 1
        st.c[f"dns_ok {kind}"] += 1
    else:
        st.fail("dns", f"dns {label} {'tcp' if tcp else 'udp'} {name}: {status}"
                       f"{'' if has_a else ', no A record'}")
        st.c[f"dns_failed {kind}"] += 1


async def dns_load(st: Stats, servers, names, churn_names, rate: float, deadline: float) -> None:
    rng = random.Random(4)

    def start_one(i: int):
        label, host, port = servers[i % len(servers)]
        x = rng.random()
        if x < 0.4:
            name, kind = f"{rng.choice(names)}.soak.svc.clusterset.local", "service"
        elif x < 0.6 and churn_names:
            name, kind = f"{rng.choice(churn_names)}.soak.svc.clusterset.local", "churn"
        elif x < 0.85:
            name, kind = f"q{i}.soak.test", "forwarded"
        else:
            name, kind = "cached.soak.test", "forwarded"
        return dig_one(st, label, host, str(port), name, kind, i % 5 == 4)

    await paced(rate, deadline, start_one)


def target(spec: str):
    label, addr = spec.split("=", 1)
    host, port = addr.rsplit(":", 1)
    return label, host, int(port)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("seconds", type=float)
    ap.add_argument("out")
    ap.add_argument("--short", nargs="+", type=target, required=True)
    ap.add_argument("--long", nargs="+", type=target, required=True)
    ap.add_argument("--dns", nargs="+", type=target, required=True)
    ap.add_argument("--names", nargs="+", required=True)
    ap.add_argument("--churn-names", nargs="*", default=[])
    ap.add_argument("--rate", type=float, default=20)
    ap.add_argument("--long-count", type=int, default=32)
    ap.add_argument("--long-every", type=float, default=10)
    ap.add_argument("--dns-rate", type=float, default=4)
    a = ap.parse_args()
    st = Stats()
    deadline = time.monotonic() + a.seconds
    jobs = [short_load(st, a.short, a.rate, deadline),
            dns_load(st, a.dns, a.names, a.churn_names, a.dns_rate, deadline)]
    for i in range(a.long_count):
        label, host, port = a.long[i % len(a.long)]
        jobs.append(long_one(st, i, label, host, port, a.long_every, deadline))
    await asyncio.gather(*jobs)
    rtt = sorted(st.rtt)
    pct = lambda p: round(rtt[min(len(rtt) - 1, int(p * len(rtt)))] * 1000, 2) if rtt else None
    summary = {k: st.c[k] for k in ("short_ok", "short_failed", "long_connects", "long_ok",
                                    "long_failed", "dns_ok", "dns_failed")}
    summary["short_ms"] = {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)}
    summary["detail"] = {k: v for k, v in sorted(st.c.items()) if " " in k}
    summary["reasons"] = st.reasons.most_common(8)
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=1)


asyncio.run(main())
