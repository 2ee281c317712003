"""Input files of bench/dns.sh: gen.py WORK N FWD_N.

WORK/queries        dnsperf input, the N clusterset.local A names
WORK/clusterset.zone zone file for NSD and Knot (SOA, NS, N A records)
WORK/unbound.data   unbound local-data: the N names, plus FWD_N forwarded names with TTL 0
WORK/fwd.queries    dnsperf input, the FWD_N forwarded names (outside fedgate's zones)
"""

import os
import sys


def ip_of(i: int) -> str:
    # The addresses dns/examples/bench_server.rs generates.
    return f"242.{1 + i // 64000}.{(i // 250) % 256}.{i % 250 + 1}"


def main() -> None:
    work, n, fwd_n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    names = [(f"svc{i}.ns{i % 100}.svc.clusterset.local.", ip_of(i)) for i in range(n)]
    fwd = [(f"host{i}.fwd.example.", f"198.51.{(i // 250) % 256}.{i % 250 + 1}") for i in range(fwd_n)]
    with open(os.path.join(work, "queries"), "w") as f:
        f.writelines(f"{name} A\n" for name, _ in names)
    with open(os.path.join(work, "fwd.queries"), "w") as f:
        f.writelines(f"{name} A\n" for name, _ in fwd)
    with open(os.path.join(work, "clusterset.zone"), "w") as f:
        f.write("$ORIGIN clusterset.local.\n")
        f.write("@ 5 IN SOA ns.dns.clusterset.local. hostmaster.clusterset.local. 1 5 5 3600 5\n")
        f.write("@ 5 IN NS ns.dns.clusterset.local.\n")
        f.write("ns.dns 5 IN A 127.0.0.1\n")
        f.writelines(f"{name} 5 IN A {ip}\n" for name, ip in names)
    with open(os.path.join(work, "unbound.data"), "w") as f:
        f.writelines(f'local-data: "{name} 5 IN A {ip}"\n' for name, ip in names)
        f.writelines(f'local-data: "{name} 0 IN A {ip}"\n' for name, ip in fwd)


if __name__ == "__main__":
    main()
