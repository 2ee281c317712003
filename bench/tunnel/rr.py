#!/usr/bin/env python3
"""1 KB request/response latency over one TCP connection against an echo server.
Usage: rr.py HOST PORT [ROUNDS] [WARMUP] [GAP_US] -> prints "p50_us p99_us mean_us rounds".
GAP_US: idle time between the end of one round trip and the start of the next (default 0)."""
import socket
import sys
import time

SIZE = 1024


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 20000
    warmup = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    gap = int(sys.argv[5]) / 1e6 if len(sys.argv) > 5 else 0.0
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req = bytes(range(256)) * (SIZE // 256)
    buf = bytearray(SIZE)
    view = memoryview(buf)
    samples = []
    clock = time.perf_counter_ns
    for i in range(warmup + rounds):
        t0 = clock()
        s.sendall(req)
        got = 0
        while got < SIZE:
            n = s.recv_into(view[got:], SIZE - got)
            if n == 0:
                sys.exit("echo server closed the connection")
            got += n
        t1 = clock()
        if i >= warmup:
            samples.append(t1 - t0)
        if gap:
            time.sleep(gap)
    if buf != req:
        sys.exit("echo mismatch")
    s.close()
    samples.sort()
    p = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] / 1000.0
    mean = sum(samples) / len(samples) / 1000.0
    print(f"{p(0.50):.1f} {p(0.99):.1f} {mean:.1f} {len(samples)}")


if __name__ == "__main__":
    main()
