#!/usr/bin/env bash
# QPS of fedgate-dns against unbound and NSD on clusterset.local names (issue 4 target:
# >= 1.0x unbound and >= 0.7x NSD). All three serve the same N A records on loopback and are
# measured by dnsperf with the same query file. Needs: dnsperf, unbound, nsd (Debian packages
# of the same names); servers missing are skipped with a note.
#
#   bench/dns.sh                 # N=10000 services, 10 s per server
#   N=1000 DURATION=5 bench/dns.sh
set -euo pipefail

N=${N:-10000}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-2}
OUTSTANDING=${OUTSTANDING:-200}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT

command -v dnsperf >/dev/null || { echo "dnsperf is required (apt-get install dnsperf)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# The same addresses bench_server generates.
ip_of() { echo "242.$((1 + $1 / 64000)).$((($1 / 250) % 256)).$(($1 % 250 + 1))"; }

echo "generating $N names"
: >"$work/queries"; : >"$work/zone.body"; : >"$work/unbound.data"
for ((i = 0; i < N; i++)); do
  name="svc$i.ns$((i % 100)).svc.clusterset.local."
  ip=$(ip_of "$i")
  echo "$name A" >>"$work/queries"
  echo "$name 5 IN A $ip" >>"$work/zone.body"
  echo "local-data: \"$name 5 IN A $ip\"" >>"$work/unbound.data"
done

wait_for() { # port name
  for _ in $(seq 1 100); do
    if dig +time=1 +tries=1 @127.0.0.1 -p "$1" svc0.ns0.svc.clusterset.local A +short 2>/dev/null | grep -q 242; then return 0; fi
    sleep 0.2
  done
  echo "$2 did not come up" >&2
  return 1
}

run_perf() { # port label
  local out qps
  out=$(dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -l "$DURATION" -c "$CLIENTS" -q "$OUTSTANDING" 2>&1)
  qps=$(echo "$out" | awk '/Queries per second/ {print $4}')
  lost=$(echo "$out" | awk '/Queries lost/ {print $3}')
  printf '%-10s %12s qps   lost %s\n' "$2" "$qps" "$lost" | tee -a "$work/results"
  echo "$qps" >"$work/qps.$2"
}

# fedgate-dns
echo "building fedgate-dns bench_server (release)"
(cd "$root" && cargo build --release -q -p fedgate-dns --example bench_server)
port=$(free_port)
"$root/target/release/examples/bench_server" "127.0.0.1:$port" "$N" >"$work/fedgate.log" 2>&1 &
pids+=($!)
wait_for "$port" fedgate
run_perf "$port" fedgate

# unbound
if command -v unbound >/dev/null; then
  port=$(free_port)
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
  num-threads: 2
  access-control: 127.0.0.0/8 allow
  local-zone: "clusterset.local." static
  include: "$work/unbound.data"
remote-control:
  control-enable: no
CONF
  unbound -c "$work/unbound.conf" >"$work/unbound.log" 2>&1 &
  pids+=($!)
  wait_for "$port" unbound && run_perf "$port" unbound
else
  echo "unbound not installed: skipped (apt-get install unbound)"
fi

# NSD
if command -v nsd >/dev/null; then
  port=$(free_port)
  {
    echo '$ORIGIN clusterset.local.'
    echo '@ 5 IN SOA ns.dns.clusterset.local. hostmaster.clusterset.local. 1 5 5 3600 5'
    echo '@ 5 IN NS ns.dns.clusterset.local.'
    echo 'ns.dns 5 IN A 127.0.0.1'
    cat "$work/zone.body"
  } >"$work/clusterset.zone"
  cat >"$work/nsd.conf" <<CONF
server:
  ip-address: 127.0.0.1@$port
  server-count: 2
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
  wait_for "$port" nsd && run_perf "$port" nsd
else
  echo "nsd not installed: skipped (apt-get install nsd)"
fi

echo
ratio() { [ -s "$work/qps.$1" ] && [ -s "$work/qps.$2" ] && python3 -c "print(f'fedgate/$2: {float(open(\"$work/qps.$1\").read())/float(open(\"$work/qps.$2\").read()):.2f}x')"; }
ratio fedgate unbound || true
ratio fedgate nsd || true
