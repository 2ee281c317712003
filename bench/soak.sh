#!/usr/bin/env bash
# Soak benchmark (issue 17): SOAK_SECONDS (600) of churn through two release gateways, alpha
# and bravo, peered over loopback QUIC, sampling each gateway's RSS (VmRSS) and open
# descriptors every SOAK_INTERVAL (60) seconds. Target: no growth after the first minute.
#   - backends: python asyncio echo servers, three per cluster (bench/soak/echo.py);
#   - new connections: RATE (20) per second through the ClusterSetIPs, alpha -> bravo's
#     services, bravo -> alpha's, and each to the service both export (bench/soak/load.py);
#   - long-lived connections: LONG (32), held the whole run, a line echoed every LONG_EVERY
#     (10) s on each;
#   - export changes: one every CHURN_EVERY (3) s, services appearing, disappearing, changing
#     endpoints, ports, headless or not, export withdrawn and restored (bench/soak/churn.py);
#   - DNS: DNS_RATE (4) dig queries per second against both gateways: clusterset.local names
#     and forwarded names (a local upstream, bench/soak/dnsup.py), every fifth over TCP.
# Prints a table (minute, RSS and fds of both gateways), the least-squares slopes from minute
# SOAK_WARMUP/60 (1) on, the counts of requests and DNS queries ok/failed, and a verdict line:
# PASS when each gateway's RSS grows < 1 MB/min and < 2 %/min, its fds (listening sockets
# left out: they follow the imports) < 1/min, it listens on as many sockets and holds at most
# 2 more fds after the run (load stopped, exports put back) as before it, and nothing failed;
# else FAIL with the figures (exit status 1). Loopback only (127.231.0.0/22), no root.
#
#   bench/soak.sh                                   # 10 minutes, a sample a minute
#   SOAK_SECONDS=120 bench/soak.sh                  # quick
#   SOAK_SECONDS=180 SOAK_INTERVAL=30 bench/soak.sh
#   FEDGATE_BIN=target/release/fedgate bench/soak.sh   # skip the cargo build
#   KEEP=1 bench/soak.sh                            # keep the scratch dir (configs, logs)
set -euo pipefail

SOAK_SECONDS=${SOAK_SECONDS:-600}
SOAK_INTERVAL=${SOAK_INTERVAL:-60}
SOAK_WARMUP=${SOAK_WARMUP:-60}
RATE=${RATE:-20}
LONG=${LONG:-32}
LONG_EVERY=${LONG_EVERY:-10}
CHURN_EVERY=${CHURN_EVERY:-3}
CHURN_MAX=${CHURN_MAX:-6}
DNS_RATE=${DNS_RATE:-4}
root=$(cd "$(dirname "$0")/.." && pwd)
here=$root/bench/soak
# shellcheck source=bench/common.sh
. "$root/bench/common.sh"
scratch
trap 'exit 130' INT TERM

for tool in python3 dig curl; do
  command -v "$tool" >/dev/null || { echo "$tool is required (scripts/install-test-deps.sh)" >&2; exit 1; }
done
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  { echo "python3 >= 3.11 is required (asyncio.timeout)" >&2; exit 1; }
((SOAK_SECONDS >= SOAK_INTERVAL && SOAK_INTERVAL > 0)) ||
  { echo "need SOAK_SECONDS >= SOAK_INTERVAL > 0" >&2; exit 1; }

release_fedgate

# --- addresses: a block of loopback no test uses (tests take 127.1-200.x, benches 127.0-2.x)
NET=127.231
ALPHA=$NET.0.1 BRAVO=$NET.0.2 UPSTREAM=$NET.0.3
declare -A ip_of=([alpha]=$ALPHA [bravo]=$BRAVO) vips_of=([alpha]=$NET.1.0/24 [bravo]=$NET.2.0/24)
declare -A backends_of=([alpha]="$NET.0.11 $NET.0.12 $NET.0.13" [bravo]="$NET.0.21 $NET.0.22 $NET.0.23")
declare -A peer_of=([alpha]=bravo [bravo]=alpha)
BACKEND_PORT=7000 TUNNEL_PORT=15443 DNS_PORT=10053 ADMIN_PORT=15000

# start NAME CMD...: runs CMD in the background (output in $work/NAME.log), waits for READY.
start_ready() {
  local name=$1; shift
  "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    grep -q READY "$work/$name.log" 2>/dev/null && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || break
    sleep 0.1
  done
  echo "$name did not start:" >&2; cat "$work/$name.log" >&2; exit 1
}

# --- backends and the DNS upstream --------------------------------------------------------
for g in alpha bravo; do
  start_ready "echo-$g" python3 "$here/echo.py" $(printf "%s:$BACKEND_PORT " ${backends_of[$g]})
done
start_ready dnsup python3 "$here/dnsup.py" "$UPSTREAM" "$DNS_PORT"

# --- PKI and the two gateways -------------------------------------------------------------
C=$work/certs
"$bin" certs ca --clusterset soak --out "$C" >/dev/null
for g in alpha bravo; do "$bin" certs issue --ca "$C" --cluster "$g" --out "$C" >/dev/null; done
for g in alpha bravo; do
  p=${peer_of[$g]} ip=${ip_of[$g]}
  mkdir -p "$work/$g/cluster"
  cat >"$work/$g/gateway.yaml" <<YAML
cluster: { id: $g, clusterset: soak, locality: { region: r-$g, zone: z-$g } }
discovery: { source: file, file: { dir: ./cluster }, peerLeaseDuration: 15s }
peers: [ { id: $p, address: "${ip_of[$p]}:$TUNNEL_PORT" } ]
tls: { cert: $C/$g.crt, key: $C/$g.key, ca: $C/ca.crt }
tunnel: { listen: "$ip:$TUNNEL_PORT" }
dns: { listen: "$ip:$DNS_PORT", upstream: [ "$UPSTREAM:$DNS_PORT" ], ttl: 5s }
front: { mode: vip, clusterSetIPRange: ${vips_of[$g]}, stateDir: ./state }
admin: { listen: "$ip:$ADMIN_PORT" }
YAML
done
dirs="alpha=$work/alpha/cluster,bravo=$work/bravo/cluster"
backends="alpha=${backends_of[alpha]// /+},bravo=${backends_of[bravo]// /+}"
python3 "$here/churn.py" init "$dirs" "$backends" "$BACKEND_PORT"

declare -A pid_of
for g in alpha bravo; do
  start_gateway "$work/$g"
  pid_of[$g]=${pids[-1]}
done

declare -A vip_of
for g in alpha bravo; do
  for s in a-stable a-moving b-stable b-moving shared; do
    v=$(wait_import_ip "${ip_of[$g]}:$ADMIN_PORT" soak "$s" "${pid_of[$g]}")
    [[ -n $v ]] || { echo "gateway $g never imported soak/$s; logs:" >&2; tail -n 20 "$work/alpha.log" "$work/bravo.log" >&2; exit 1; }
    vip_of[$g/$s]=$v
  done
done
short=(alpha/b-stable="${vip_of[alpha/b-stable]}:7000" alpha/b-moving="${vip_of[alpha/b-moving]}:7100"
  alpha/shared="${vip_of[alpha/shared]}:7200" bravo/a-stable="${vip_of[bravo/a-stable]}:7000"
  bravo/a-moving="${vip_of[bravo/a-moving]}:7100" bravo/shared="${vip_of[bravo/shared]}:7200")
long=(alpha/b-stable="${vip_of[alpha/b-stable]}:7000" bravo/a-stable="${vip_of[bravo/a-stable]}:7000"
  alpha/shared="${vip_of[alpha/shared]}:7200" bravo/shared="${vip_of[bravo/shared]}:7200")
# Every path answers before the clock starts (a peer's imports may land before its tunnel).
for t in "${short[@]}"; do
  addr=${t#*=}
  for _ in $(seq 1 100); do
    python3 -c "
import socket, sys
s = socket.create_connection(('${addr%:*}', ${addr##*:}), timeout=2)
s.sendall(b'hi\n'); sys.exit(s.makefile().readline() != 'hi\n')" 2>/dev/null && continue 2
    sleep 0.2
  done
  echo "no echo through ${t%%=*} ($addr); logs:" >&2; tail -n 20 "$work/alpha.log" "$work/bravo.log" >&2; exit 1
done
churn_names=()
for p in a b; do for ((k = 0; k < CHURN_MAX; k++)); do churn_names+=("$p-c$k"); done; done

# --- the run ------------------------------------------------------------------------------
# quiet LABEL: a reading of both gateways with no load (bench/soak/sample.py), into $work/quiet.
quiet() {
  local g
  for g in alpha bravo; do echo "$1 $g $(python3 "$here/sample.py" "${pid_of[$g]}")"; done >>"$work/quiet"
}
quiet before
# The load and the churn go on TAIL s past the last sample, so the last sample sees the
# same load as the others (not the long-lived connections closing).
TAIL=5
echo "soak: ${SOAK_SECONDS}s, sample every ${SOAK_INTERVAL}s; alpha pid ${pid_of[alpha]}, bravo pid ${pid_of[bravo]}; $RATE conn/s, $LONG long-lived, a change every ${CHURN_EVERY}s, $DNS_RATE dig/s" >&2
python3 "$here/load.py" $((SOAK_SECONDS + TAIL)) "$work/load.json" --short "${short[@]}" \
  --long "${long[@]}" --dns alpha="$ALPHA:$DNS_PORT" bravo="$BRAVO:$DNS_PORT" \
  --names a-stable a-moving b-stable b-moving shared --churn-names "${churn_names[@]}" \
  --rate "$RATE" --long-count "$LONG" --long-every "$LONG_EVERY" --dns-rate "$DNS_RATE" \
  >"$work/load.log" 2>&1 &
pids+=($!); load_pid=$!
python3 "$here/churn.py" run "$dirs" "$backends" "$BACKEND_PORT" $((SOAK_SECONDS + TAIL)) \
  "$CHURN_EVERY" "$CHURN_MAX" "$work/churn.json" >"$work/churn.log" 2>&1 &
pids+=($!); churn_pid=$!

t0=$EPOCHREALTIME
times=()
for ((t = 0; t < SOAK_SECONDS; t += SOAK_INTERVAL)); do times+=("$t"); done
times+=("$SOAK_SECONDS")
: >"$work/samples"
for t in "${times[@]}"; do
  sleep "$(python3 -c "import sys; print(max(0, $t0 + $t - float(sys.argv[1])))" "$EPOCHREALTIME")"
  line=$t
  for g in alpha bravo; do
    if ! kill -0 "${pid_of[$g]}" 2>/dev/null; then
      echo "gateway $g exited at ${t}s; its log:" >&2; tail -n 30 "$work/$g.log" >&2; exit 1
    fi
    line="$line $(python3 "$here/sample.py" "${pid_of[$g]}")"
  done
  echo "$line" >>"$work/samples"
  awk '{printf "  %5ss  alpha %6.1f MB %4d fds (%d listening)   bravo %6.1f MB %4d fds (%d listening)\n", $1, $2 / 1024, $3, $4, $5 / 1024, $6, $7}' <<<"$line" >&2
done
wait "$load_pid" || { echo "load generator failed:" >&2; cat "$work/load.log" >&2; }
wait "$churn_pid" || { echo "churn failed:" >&2; cat "$work/churn.log" >&2; }
# Quiet again: the load has stopped and the exports are put back as they were before the run
# (the churned services deleted); after SETTLE s both gateways should hold what they held
# before it (report.py compares).
rm -f "$work"/{alpha,bravo}/cluster/churn-*.yaml
python3 "$here/churn.py" init "$dirs" "$backends" "$BACKEND_PORT"
sleep "${SETTLE:-10}"
quiet after

echo
echo "Soak: ${SOAK_SECONDS} s, $RATE new connections/s, $LONG long-lived, an export change every ${CHURN_EVERY} s, $DNS_RATE DNS queries/s ($(date -u +%FT%TZ), $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo
for g in alpha bravo; do
  n=$(grep -c -E ' (WARN|ERROR) ' "$work/$g.log" || true)
  echo "$g log: $n warning/error lines"
  grep -E ' (WARN|ERROR) ' "$work/$g.log" | cut -c1-220 | head -3 | sed 's/^/  /' || true
done
python3 "$here/report.py" "$work/samples" "$SOAK_WARMUP" "$work/load.json" "$work/churn.json" "$work/quiet"
