#!/usr/bin/env bash
# Issue 4 DNS benchmark: fedgate-dns against unbound (local-data), NSD and Knot serving the
# same N clusterset.local A records on loopback, all measured in one invocation by dnsperf with
# the same query file:
#   1. maximum QPS (ROUNDS rounds of DURATION s per server, servers interleaved so that load
#      from elsewhere on the machine hits all of them alike; CLIENTS clients, OUTSTANDING
#      queries in flight; the median round counts),
#   2. latency at a fixed rate (RATE qps for LAT_DURATION s; avg/p50/p99/max from dnsperf -v),
#   3. lost forwarded queries: FWD_N names outside fedgate's zones, forwarded by fedgate to an
#      upstream unbound on loopback that answers them from local-data with TTL 0 (so fedgate
#      caches nothing and every query is a real upstream round trip), driven at FWD_RATE qps
#      for LAT_DURATION s; lost and SERVFAIL must both be 0.
# Targets: fedgate >= 1.0x unbound and >= 0.7x NSD on max QPS; 0 lost forwarded queries.
# Prints one markdown table plus the forwarded-queries line. Loopback only, about 2 minutes with the defaults.
# Installs dnsperf, dig (bind9-dnsutils), unbound, nsd and knot from Debian when missing.
#
#   bench/dns.sh                         # N=10000, 3 x 5 s max-QPS rounds, 20 000 qps for 10 s
#   N=1000 ROUNDS=1 DURATION=2 LAT_DURATION=2 bench/dns.sh
set -euo pipefail

N=${N:-10000}
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-2}
OUTSTANDING=${OUTSTANDING:-200}
RATE=${RATE:-20000}
LAT_DURATION=${LAT_DURATION:-10}
FWD_N=${FWD_N:-1000}
FWD_RATE=${FWD_RATE:-5000}

# Install the baselines and the load generator from Debian when missing (root needed then).
need=()
for pkg_cmd in dnsperf:dnsperf bind9-dnsutils:dig unbound:unbound nsd:nsd knot:knotd; do
  command -v "${pkg_cmd#*:}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pkg_cmd#*:}" ] || need+=("${pkg_cmd%%:*}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (Debian)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
  # The packaged services must not hold port 53; the script runs its own instances.
  if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now unbound nsd knot >/dev/null 2>&1 || true
  fi
fi
THREADS=2 # worker threads of every server
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/common.sh
. "$root/bench/common.sh"
scratch

for tool in dnsperf dig unbound python3; do
  command -v "$tool" >/dev/null || { echo "$tool is required (see the header of $0)" >&2; exit 1; }
done

echo "generating $N names and $FWD_N forwarded names" >&2
python3 "$root/bench/dns/gen.py" "$work" "$N" "$FWD_N"

wait_for() { # port label
  for _ in $(seq 1 150); do
    if dig +time=1 +tries=1 @127.0.0.1 -p "$1" svc0.ns0.svc.clusterset.local A +short 2>/dev/null | grep -q 242; then return 0; fi
    sleep 0.2
  done
  echo "$2 did not come up (log: $(cat "$work/$2.log" 2>/dev/null | tail -3))" >&2
  return 1
}

servers=()
declare -A port_of

# unbound: the clusterset names as local-data, plus the forwarded names (TTL 0) for fedgate.
port=$(free_tcp)
cat >"$work/unbound.conf" <<CONF
server:
  interface: 127.0.0.1
  port: $port
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "$work"
  pidfile: "$work/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  num-threads: $THREADS
  access-control: 127.0.0.0/8 allow
  local-zone: "clusterset.local." static
  local-zone: "fwd.example." static
  include: "$work/unbound.data"
remote-control:
  control-enable: no
CONF
unbound -c "$work/unbound.conf" >"$work/unbound.log" 2>&1 &
pids+=($!)
wait_for "$port" unbound
upstream_port=$port
port_of[unbound]=$port
servers+=(unbound)

# fedgate-dns (release bench_server), forwarding names outside its zones to unbound.
echo "building fedgate-dns bench_server (release)" >&2
(cd "$root" && cargo build --release -q -p fedgate-dns --example bench_server)
port=$(free_tcp)
"$root/target/release/examples/bench_server" "127.0.0.1:$port" "$N" "127.0.0.1:$upstream_port" \
  >"$work/fedgate.log" 2>&1 &
pids+=($!)
wait_for "$port" fedgate
port_of[fedgate]=$port
servers=(fedgate "${servers[@]}")

# NSD
if command -v nsd >/dev/null; then
  port=$(free_tcp)
  cat >"$work/nsd.conf" <<CONF
server:
  ip-address: 127.0.0.1@$port
  server-count: $THREADS
  username: ""
  chroot: ""
  database: ""
  zonesdir: "$work"
  zonelistfile: "$work/zone.list"
  xfrdfile: "$work/xfrd.state"
  xfrdir: "$work"
  pidfile: "$work/nsd.pid"
  logfile: "$work/nsd.log"
  verbosity: 0
remote-control:
  control-enable: no
zone:
  name: clusterset.local
  zonefile: "$work/clusterset.zone"
CONF
  nsd -d -c "$work/nsd.conf" >"$work/nsd.out" 2>&1 &
  pids+=($!)
  wait_for "$port" nsd && { port_of[nsd]=$port; servers+=(nsd); }
else
  echo "nsd not installed: skipped (apt-get install nsd)" >&2
fi

# Knot: foreground, own rundir/storage in the work dir, no journal, no timers database use.
if command -v knotd >/dev/null; then
  port=$(free_tcp)
  mkdir -p "$work/knot"
  cat >"$work/knot.conf" <<CONF
server:
  rundir: "$work/knot"
  listen: 127.0.0.1@$port
  udp-workers: $THREADS
  tcp-workers: 1
  background-workers: 1
database:
  storage: "$work/knot"
log:
  - target: stderr
    any: warning
template:
  - id: default
    storage: "$work"
    semantic-checks: off
    journal-content: none
    zonefile-sync: -1
    zonefile-load: whole
zone:
  - domain: clusterset.local
    file: "$work/clusterset.zone"
CONF
  knotd -c "$work/knot.conf" >"$work/knot.log" 2>&1 &
  pids+=($!)
  wait_for "$port" knot && { port_of[knot]=$port; servers+=(knot); }
else
  echo "knotd not installed: skipped (apt-get install knot)" >&2
fi


# Max QPS: rounds with the servers interleaved; then latency at a fixed rate, per server.
for ((r = 1; r <= ROUNDS; r++)); do
  for s in "${servers[@]}"; do
    echo "$s: max qps, round $r/$ROUNDS ($DURATION s)" >&2
    dnsperf -s 127.0.0.1 -p "${port_of[$s]}" -d "$work/queries" -l "$DURATION" -c "$CLIENTS" \
      -q "$OUTSTANDING" >"$work/max.$s.$r" 2>&1 || true
  done
done
for s in "${servers[@]}"; do
  echo "$s: latency at $RATE qps ($LAT_DURATION s)" >&2
  dnsperf -s 127.0.0.1 -p "${port_of[$s]}" -d "$work/queries" -l "$LAT_DURATION" -c "$CLIENTS" \
    -q "$OUTSTANDING" -Q "$RATE" -v >"$work/lat.$s" 2>&1 || true
done

echo "fedgate: forwarded names at $FWD_RATE qps ($LAT_DURATION s)" >&2
dnsperf -s 127.0.0.1 -p "${port_of[fedgate]}" -d "$work/fwd.queries" -l "$LAT_DURATION" \
  -c "$CLIENTS" -q "$OUTSTANDING" -Q "$FWD_RATE" -v >"$work/fwd" 2>&1 || true

echo >&2
python3 "$root/bench/dns/report.py" "$work" "$N" "$RATE" "$FWD_N" "$FWD_RATE" "$ROUNDS" "${servers[@]}"
