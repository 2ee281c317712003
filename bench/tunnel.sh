#!/usr/bin/env bash
# Tunnel benchmark (issue 3 item 9): one TCP stream (iperf3) and 1 KB request/response
# latency, each through four paths on loopback, in one invocation:
#   direct     client -> server
#   fedgate    client -> gateway A (ClusterSetIP) -> QUIC mTLS -> gateway B -> server
#   stunnel    client -> stunnel4 client -> mutual TLS -> stunnel4 server -> server
#   haproxy    client -> haproxy -> TLS (client cert, verify required both ways) -> haproxy -> server
# plus CPU seconds per GB moved (utime+stime of both proxy processes, from /proc/<pid>/stat).
# Targets: fedgate throughput >= 1.2x stunnel; fedgate added p99 <= haproxy added p99.
# Baselines come from Debian packages (iperf3, stunnel4, haproxy; installed when missing).
# All proxies use the same ECDSA P-256 certificates from `fedgate certs`.
#
#   bench/tunnel.sh          # 10 s iperf3 per path; 5 rounds of 10000 round trips, paths interleaved
#   DURATION=5 ROUNDS=5000 REPEAT=3 LAT_REPEAT=7 bench/tunnel.sh
#   PROFILE=1 bench/tunnel.sh                    # + perf profile of both gateways under iperf3
#   PROFILE=1 PROFILE_PATH=fedgate-1452 bench/tunnel.sh    # ... of the pair pinned to 1452
#   PROFILE=1 PERF_CALLGRAPH=dwarf PERF_FREQ=199 PERF_OUT=/tmp/fg.data bench/tunnel.sh  # keep it
#   FEDGATE_BIN=target/release/fedgate bench/tunnel.sh   # skip the cargo build
# fedgate runs twice: with the defaults (path MTU discovery up to tunnel.maxUdpPayloadSize
# 8952; loopback carries it, as a jumbo-frame network does), and pinned to 1452 bytes, what a
# 1500-byte Ethernet path allows, "fedgate-1452". Each pair prints the path MTU it settled on.
# A third pair, "fedgate-busypoll", runs the defaults plus traffic.busyPoll: 200us (off by
# default; it trades CPU for latency, docs/configuration.md).
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-10000}
REPEAT=${REPEAT:-1}
LAT_REPEAT=${LAT_REPEAT:-5}
PROFILE=${PROFILE:-0}
root=$(cd "$(dirname "$0")/.." && pwd)
here=$root/bench/tunnel
# shellcheck source=bench/tunnel/common.sh
. "$here/common.sh"
scratch

need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || need+=(stunnel4)
command -v haproxy >/dev/null || need+=(haproxy)
if ((${#need[@]})); then
  echo "installing ${need[*]} (Debian packages)"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >"$work/apt.log" 2>&1; then
    apt-get update -q >>"$work/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >>"$work/apt.log" 2>&1 ||
      { cat "$work/apt.log" >&2; echo "could not install ${need[*]}" >&2; exit 1; }
  fi
fi
STUNNEL=$(command -v stunnel4 || command -v stunnel)

release_fedgate
tck=$(getconf CLK_TCK)
# utime+stime (clock ticks) of the given pids, summed over all their threads.
cpu_ticks() {
  local t=0 pid f
  for pid in "$@"; do
    f=$(sed 's/.*) //' "/proc/$pid/stat")
    t=$((t + $(echo "$f" | awk '{print $12 + $13}')))
  done
  echo "$t"
}
# Datagrams the kernel dropped for a full UDP receive buffer (this network namespace).
udp_drops() { awk '/^Udp:/ { if (h) { print $6; exit } h = 1 }' /proc/net/snmp; }
wait_tcp() { # host port what
  for _ in $(seq 1 150); do
    python3 -c "import socket,sys; socket.create_connection(('$1',$2),timeout=0.5).close()" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$3 did not come up on $1:$2" >&2
  exit 1
}

# --- servers -------------------------------------------------------------------------------
SRV=127.0.1.22
IPERF_PORT=$(free_tcp); ECHO_PORT=$(free_tcp)
iperf3 -s -B "$SRV" -p "$IPERF_PORT" >"$work/iperf3-server.log" 2>&1 & pids+=($!)
python3 "$here/echo.py" "$SRV" "$ECHO_PORT" & pids+=($!)
wait_tcp "$SRV" "$IPERF_PORT" iperf3
wait_tcp "$SRV" "$ECHO_PORT" echo

# --- PKI (shared by every proxy) -----------------------------------------------------------
"$bin" certs ca --clusterset bench --out "$work/certs" >/dev/null
for c in a b c d e f; do "$bin" certs issue --ca "$work/certs" --cluster "$c" --out "$work/certs" >/dev/null; done
C=$work/certs
for c in a b; do cat "$C/$c.crt" "$C/$c.key" >"$C/$c.pem"; done

# --- fedgate A -> QUIC -> fedgate B --------------------------------------------------------
# pair NAME-A NAME-B IP-A IP-B VIP-OCTET-A VIP-OCTET-B MAX-UDP-PAYLOAD [BUSY-POLL]: two gateways, B exports
# bench/bench (the servers), A imports it; sets VIP to its ClusterSetIP on A and PIDS_PAIR.
pair() {
  local a=$1 b=$2 ipa=$3 ipb=$4 ta tb g
  ta=$(free_udp); tb=$(free_udp)
  gateway "$a" "$ipa" "$ta" "$b" "$ipb" "$tb" "$5" "$7" "" "${8:-}"
  gateway "$b" "$ipb" "$tb" "$a" "$ipa" "$ta" "$6" "$7" "" "${8:-}"
  bench_export "$work/$b"
  PIDS_PAIR=""
  for g in "$a" "$b"; do
    start_gateway "$work/$g"
    PIDS_PAIR="$PIDS_PAIR ${pids[-1]}"
  done
  local admin_a
  admin_a=$(awk -F'"' '/^admin:/ {print $2}' "$work/$a/gateway.yaml")
  VIP=$(wait_import_ip "$admin_a" bench bench)
  ADMIN_PAIR=$admin_a
  [[ -n $VIP ]] || { echo "gateway $a never imported bench/bench; logs:" >&2; tail -n 20 "$work/$a.log" "$work/$b.log" >&2; exit 1; }
  for _ in $(seq 1 100); do
    python3 "$here/rr.py" "$VIP" "$ECHO_PORT" 10 0 >/dev/null 2>&1 && break
    sleep 0.2
  done
  python3 "$here/rr.py" "$VIP" "$ECHO_PORT" 10 0 >/dev/null || { echo "no echo through fedgate ($VIP)" >&2; tail -n 20 "$work/$a.log" "$work/$b.log" >&2; exit 1; }
}
# Defaults (path MTU discovery up to 8952) ...
pair a b 127.0.0.21 127.0.0.22 21 22 ""
VIP_FG=$VIP; PIDS_FG=$PIDS_PAIR; ADMIN_FG=$ADMIN_PAIR
# ... and pinned to a 1500-byte Ethernet path (tunnel.maxUdpPayloadSize 1452).
pair c d 127.0.0.23 127.0.0.24 23 24 1452
VIP_J=$VIP; PIDS_J=$PIDS_PAIR; ADMIN_J=$ADMIN_PAIR
# ... and the defaults with busy polling.
pair e f 127.0.0.25 127.0.0.26 25 26 "" 200us
VIP_BP=$VIP; PIDS_BP=$PIDS_PAIR; ADMIN_BP=$ADMIN_PAIR

# --- stunnel4 two-hop mutual TLS -----------------------------------------------------------
S1=127.0.0.31; S2=127.0.0.32
SI1=$(free_tcp); SE1=$(free_tcp); SI2=$(free_tcp); SE2=$(free_tcp)
stunnel_configs
"$STUNNEL" "$work/stunnel-server.conf" >"$work/stunnel-server.log" 2>&1 & pids+=($!); PID_S2=$!
"$STUNNEL" "$work/stunnel-client.conf" >"$work/stunnel-client.log" 2>&1 & pids+=($!); PID_S1=$!
wait_tcp "$S1" "$SE1" "stunnel client"
wait_tcp "$S2" "$SE2" "stunnel server"

# --- haproxy two-hop TLS (client certificate, verify required both ways) -------------------
H1=127.0.0.41; H2=127.0.0.42
HI1=$(free_tcp); HE1=$(free_tcp); HI2=$(free_tcp); HE2=$(free_tcp)
haproxy_configs
haproxy -db -f "$work/haproxy-server.cfg" >"$work/haproxy-server.log" 2>&1 & pids+=($!); PID_H2=$!
haproxy -db -f "$work/haproxy-client.cfg" >"$work/haproxy-client.log" 2>&1 & pids+=($!); PID_H1=$!
wait_tcp "$H1" "$HE1" "haproxy client"
wait_tcp "$H2" "$HE2" "haproxy server"

# --- runs ----------------------------------------------------------------------------------
# path -> "host iperf-port echo-port proxy-pids"
declare -A target=(
  [direct]="$SRV $IPERF_PORT $ECHO_PORT"
  [fedgate]="$VIP_FG $IPERF_PORT $ECHO_PORT $PIDS_FG"
  [fedgate-1452]="$VIP_J $IPERF_PORT $ECHO_PORT $PIDS_J"
  [fedgate-busypoll]="$VIP_BP $IPERF_PORT $ECHO_PORT $PIDS_BP"
  [stunnel]="$S1 $SI1 $SE1 $PID_S1 $PID_S2"
  [haproxy]="$H1 $HI1 $HE1 $PID_H1 $PID_H2"
)
paths=(direct fedgate fedgate-1452 fedgate-busypoll stunnel haproxy)
echo "iperf3 ${DURATION}s x $REPEAT per path, then $LAT_REPEAT rounds of $ROUNDS x 1 KB round trips through every path (fedgate VIPs $VIP_FG, $VIP_J, $VIP_BP)"
for p in "${paths[@]}"; do
  read -r host iport eport ppids <<<"${target[$p]}"
  # shellcheck disable=SC2086
  for r in $(seq 1 "$REPEAT"); do
    t0=$([[ -n $ppids ]] && cpu_ticks $ppids || echo 0)
    d0=$(udp_drops)
    iperf3 -c "$host" -p "$iport" -t "$DURATION" -J >"$work/iperf.$p.$r.json" ||
      { echo "iperf3 through $p failed" >&2; cat "$work/iperf.$p.$r.json" >&2; exit 1; }
    t1=$([[ -n $ppids ]] && cpu_ticks $ppids || echo 0)
    drops=$(($(udp_drops) - d0))
    python3 - "$work/iperf.$p.$r.json" "$((t1 - t0))" "$tck" >>"$work/tput.$p" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
s = j["end"]["sum_received"]
print(s["bits_per_second"] / 1e9, s["bytes"], int(sys.argv[2]) / int(sys.argv[3]))
PY
    printf '  %-16s run %d: %s\n' "$p" "$r" "$(tail -n1 "$work/tput.$p" | awk '{printf "%.2f Gb/s, %.2f GB, proxy CPU %.2f s", $1, $2/1e9, $3}'), UDP rcvbuf drops $drops"
  done
done
# Latency: LAT_REPEAT rounds, the paths interleaved inside each round, so that a noisy moment
# on this shared machine hits every path rather than one.
for r in $(seq 1 "$LAT_REPEAT"); do
  for p in "${paths[@]}"; do
    read -r host iport eport ppids <<<"${target[$p]}"
    # shellcheck disable=SC2086
    t0=$([[ -n $ppids ]] && cpu_ticks $ppids || echo 0)
    python3 "$here/rr.py" "$host" "$eport" "$ROUNDS" 500 >>"$work/lat.$p" ||
      { echo "latency run through $p failed" >&2; exit 1; }
    # shellcheck disable=SC2086
    t1=$([[ -n $ppids ]] && cpu_ticks $ppids || echo 0)
    # Proxy CPU per round trip (warm-up included in both the ticks and the count).
    python3 -c "print($((t1 - t0)) / $tck / ($ROUNDS + 500) * 1e6)" >>"$work/rrcpu.$p"
    printf '  %-16s latency round %d: p50 %s us, p99 %s us, proxy CPU %.1f us per round trip\n' "$p" "$r" "$(tail -n1 "$work/lat.$p" | awk '{print $1}')" "$(tail -n1 "$work/lat.$p" | awk '{print $2}')" "$(tail -n1 "$work/rrcpu.$p")"
  done
done

python3 - "$work" "$DURATION" "$ROUNDS" "$REPEAT" "$LAT_REPEAT" <<'PY'
import statistics, sys
work, duration, rounds, repeat, lat_repeat = sys.argv[1:6]
paths = ["direct", "fedgate", "fedgate-1452", "fedgate-busypoll", "stunnel", "haproxy"]
row = {}
for p in paths:
    runs = [tuple(map(float, l.split())) for l in open(f"{work}/tput.{p}")]
    gbps = statistics.median(r[0] for r in runs)
    gb = sum(r[1] for r in runs) / 1e9
    cpu = sum(r[2] for r in runs)
    lat = [tuple(map(float, l.split())) for l in open(f"{work}/lat.{p}")]
    p50 = statistics.median(x[0] for x in lat)
    p99 = statistics.median(x[1] for x in lat)
    rr_cpu = statistics.median(float(l) for l in open(f"{work}/rrcpu.{p}"))
    row[p] = dict(gbps=gbps, cpu_per_gb=(cpu / gb if p != "direct" and gb else None), p50=p50, p99=p99,
                  rr_cpu=(rr_cpu if p != "direct" else None), p99s=[x[1] for x in lat])
# Added p99 per round against the same round's direct p99; the table shows medians.
added = {p: [a - d for a, d in zip(row[p]["p99s"], row["direct"]["p99s"])] for p in paths}
print()
print(f"| path | Gb/s (1 stream, median of {repeat}) | x stunnel | x haproxy | p50 us | p99 us | added p99 us | proxy CPU s/GB | proxy CPU us/round trip |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for p in paths:
    r = row[p]
    cpu = f"{r['cpu_per_gb']:.2f}" if r["cpu_per_gb"] is not None else "-"
    rr_cpu = f"{r['rr_cpu']:.1f}" if r["rr_cpu"] is not None else "-"
    added_s = f"{statistics.median(added[p]):+.1f}" if p != "direct" else "-"
    print(f"| {p} | {r['gbps']:.2f} | {r['gbps'] / row['stunnel']['gbps']:.2f} | {r['gbps'] / row['haproxy']['gbps']:.2f} "
          f"| {r['p50']:.1f} | {r['p99']:.1f} | {added_s} | {cpu} | {rr_cpu} |")
s, h = row["stunnel"], row["haproxy"]
print()
for name in ["fedgate", "fedgate-1452", "fedgate-busypoll"]:
    f = row[name]
    ok_t = f["gbps"] >= 1.2 * s["gbps"]
    fa, ha = statistics.median(added[name]), statistics.median(added["haproxy"])
    wins = sum(a <= b for a, b in zip(added[name], added["haproxy"]))
    print(f"{name}: target throughput >= 1.2x stunnel: {'PASS' if ok_t else 'FAIL'} ({f['gbps'] / s['gbps']:.2f}x); "
          f"target added p99 <= haproxy's: {'PASS' if fa <= ha else 'FAIL'} ({fa:+.1f} us vs {ha:+.1f} us, "
          f"at or below in {wins} of {len(added[name])} rounds)")
print(f"(iperf3 -t {duration}; {lat_repeat} interleaved rounds of {rounds} round trips of 1024 B over one connection, medians; "
      "CPU = utime+stime of both proxy processes during the iperf3 runs, and during the round trips)")
PY

# The datagram size each pair's QUIC connection settled on (path MTU discovery).
path_mtu() { curl -sf "http://$1/debug/peers" | python3 -c 'import json,sys; print(",".join(str(p.get("path_mtu")) for p in json.load(sys.stdin)))'; }
echo "path MTU in use (UDP payload bytes): fedgate $(path_mtu "$ADMIN_FG"), fedgate-1452 $(path_mtu "$ADMIN_J"), fedgate-busypoll $(path_mtu "$ADMIN_BP")"

if [[ $PROFILE == 1 ]]; then
  command -v perf >/dev/null || { echo "perf not found (apt-get install linux-perf)" >&2; exit 0; }
  echo
  if [[ ${PROFILE_PATH:-fedgate} == fedgate-1452 ]]; then prof_vip=$VIP_J; prof_pids=$PIDS_J; else prof_vip=$VIP_FG; prof_pids=$PIDS_FG; fi
  prof_pids=$(echo $prof_pids | tr ' ' ',')
  echo "profiling both gateways during one more ${DURATION}s iperf3 run through ${PROFILE_PATH:-fedgate}"
  perf record -q -F "${PERF_FREQ:-999}" --call-graph "${PERF_CALLGRAPH:-fp}" -o "$work/perf.data" -p "$prof_pids" -- sleep "$((DURATION + 1))" >/dev/null 2>&1 &
  perf_pid=$!
  sleep 0.5
  iperf3 -c "$prof_vip" -p "$IPERF_PORT" -t "$DURATION" >/dev/null
  wait "$perf_pid" || true
  [[ -n ${PERF_OUT:-} ]] && cp "$work/perf.data" "$PERF_OUT"
  perf report -i "$work/perf.data" --no-children --sort comm,dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 15
  echo
  perf report -i "$work/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 40
fi
