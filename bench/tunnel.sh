#!/usr/bin/env bash
# Tunnel benchmark (issue 20; issue 3 item 9 before it): in one invocation, on loopback, TCP
# throughput (one stream and 8), proxy CPU per GB, the QUIC-only ceiling against quinn's own
# perf tool, and 1 KB request/response latency, printed as a table of figures per path and a
# table of issue 20's targets with verdicts. Paths:
#   direct            client -> server
#   fedgate-1452      client -> gateway A (ClusterSetIP) -> QUIC mTLS -> gateway B -> server,
#                     pinned to tunnel.maxUdpPayloadSize 1452 (a 1500-byte Ethernet path): the headline
#   fedgate-jumbo     the same with the defaults: path MTU discovery up to 8952, which loopback
#                     carries as a jumbo-frame network does
#   fedgate-busypoll  the defaults plus traffic.busyPoll: 200us (and dataPlaneThreads: 1, which
#                     busy polling needs; off by default, it trades CPU for latency); one stream only
#   fedgate-1452-dp1  the 1452 pair with traffic.dataPlaneThreads: 1 } throughput only: does it
#   fedgate-1452-dp2  the 1452 pair with traffic.dataPlaneThreads: 2 } rise with threads?
#   stunnel           client -> stunnel4 client -> mutual TLS -> stunnel4 server -> server
#   haproxy           client -> haproxy -> TLS (client cert, verify required both ways) -> haproxy -> server
# Every other pair leaves traffic.dataPlaneThreads at its default.
#   throughput  iperf3 -t DURATION, one TCP stream and -P 8 (STREAMS), REPEAT rounds with the
#               paths interleaved in each; CPU s/GB = utime+stime of both proxy processes
#               (/proc/<pid>/stat, all threads) during those runs over GB received
#   ceiling     fedgate's own (tunnel/examples/quic_ceiling.rs 1452 CEIL_GB: two TunnelEndpoints,
#               one stream, no TCP) against quinn-perf (../shared/tools/quinn-perf, built against
#               the quinn release in Cargo.lock; one connection, one stream, encrypted,
#               --max-udp-payload-size 1452), CEIL_REPEAT rounds, the two back to back
#   latency     rr.py (1 KB request, 1 KB echo, one connection), LAT_REPEAT rounds of ROUNDS round
#               trips with every path interleaved in each round, so that a noisy moment on this
#               shared machine hits every path rather than one
# Targets (issue 20): 1452 one stream and 8 >= 1.0x stunnel; jumbo one stream >= 1.2x stunnel;
# 1452 CPU s/GB <= stunnel's; ceiling >= 0.9x quinn-perf; 8 streams faster with 2 data-plane
# threads than with 1; with the defaults p50 and added p99 at or below the better of stunnel and
# haproxy in most latency rounds.
# Baselines come from Debian packages (iperf3, stunnel4, haproxy; installed when missing).
# All proxies use the same ECDSA P-256 certificates from `fedgate certs`.
#
#   bench/tunnel.sh          # 10 s iperf3 runs; 2 ceiling rounds; 5 rounds of 10000 round trips
#   DURATION=3 ROUNDS=2000 LAT_REPEAT=2 CEIL_REPEAT=1 bench/tunnel.sh    # a quick look
#   REPEAT=3 LAT_REPEAT=7 bench/tunnel.sh
#   STREAMS=1 bench/tunnel.sh                    # one stream only (STREAMS="1 8" by default)
#   PROFILE=1 bench/tunnel.sh                    # + perf profile of the fedgate-1452 gateways under iperf3
#   PROFILE=1 PROFILE_PATH=fedgate-jumbo PROFILE_STREAMS=8 bench/tunnel.sh   # ... of another pair
#   PROFILE=1 PERF_CALLGRAPH=dwarf PERF_FREQ=199 PERF_OUT=/tmp/fg.data bench/tunnel.sh  # keep it
#   FEDGATE_BIN=target/release/fedgate bench/tunnel.sh   # skip the fedgate build
#   QUIC_CEILING_BIN=.../examples/quic_ceiling QUINN_PERF_BIN=.../quinn-perf   # skip those builds
#   QUINN_PERF_SRC (../shared/tools/quinn-perf beside the checkout), QUINN_PERF_TARGET (its
#   cargo target dir, $CARGO_TARGET_DIR/quinn-perf or target/quinn-perf)
# The builds use $CARGO_TARGET_DIR when set, like cargo. A ceiling tool that does not build or
# run is reported as NOT MEASURED (with the reason) rather than ending the run.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-10000}
REPEAT=${REPEAT:-1}
LAT_REPEAT=${LAT_REPEAT:-5}
CEIL_REPEAT=${CEIL_REPEAT:-2}
CEIL_GB=${CEIL_GB:-4}
STREAMS=${STREAMS:-1 8}
PROFILE=${PROFILE:-0}
root=$(cd "$(dirname "$0")/.." && pwd)
here=$root/bench/tunnel
# shellcheck source=bench/tunnel/common.sh
. "$here/common.sh"
scratch
started=$(date +%s); load0=$(cut -d' ' -f1 /proc/loadavg)

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

# --- builds (all before any measurement) ---------------------------------------------------
release_fedgate
target_dir=${CARGO_TARGET_DIR:-target}
[[ $target_dir == /* ]] || target_dir=$root/$target_dir
# quic_ceiling: this checkout's tunnel example, release, same target directory.
ceiling_bin=${QUIC_CEILING_BIN:-}
if [[ -z $ceiling_bin ]]; then
  echo "building quic_ceiling (release, fedgate-tunnel --features test-util)" >&2
  if (cd "$root" && cargo build --release -q -p fedgate-tunnel --features test-util --example quic_ceiling) >"$work/ceiling-build.log" 2>&1; then
    ceiling_bin=$target_dir/release/examples/quic_ceiling
  else
    tail -n 5 "$work/ceiling-build.log" >&2
    echo "quic_ceiling did not build (cargo build -p fedgate-tunnel --features test-util --example quic_ceiling)" >"$work/ceil.fedgate.err"
  fi
fi
# lock_version LOCKFILE CRATE: the version of CRATE that LOCKFILE resolved.
lock_version() { awk -v n="name = \"$2\"" '$0 == n { getline; gsub(/version = |"/, ""); print; exit }' "$1"; }
# quinn-perf, built against the quinn and quinn-proto releases fedgate uses: when its own
# lockfile resolves others, a writable copy of its sources with them pinned (cargo update
# --precise).
qp_src=${QUINN_PERF_SRC:-$root/../shared/tools/quinn-perf}
qp_bin=${QUINN_PERF_BIN:-}
quinn=$(lock_version "$root/Cargo.lock" quinn)
quinn_proto=$(lock_version "$root/Cargo.lock" quinn-proto)
if [[ -z $qp_bin ]]; then
  qp_target=${QUINN_PERF_TARGET:-$target_dir/quinn-perf}
  qp_manifest=$qp_src/Cargo.toml
  if [[ ! -f $qp_manifest ]]; then
    echo "no quinn-perf sources at $qp_src (QUINN_PERF_SRC)" >"$work/ceil.quinn-perf.err"
  else
    if [[ $(lock_version "$qp_src/Cargo.lock" quinn) != "$quinn" || $(lock_version "$qp_src/Cargo.lock" quinn-proto) != "$quinn_proto" ]]; then
      rm -rf "$qp_target/src" && mkdir -p "$qp_target" && cp -r "$qp_src" "$qp_target/src" && chmod -R u+w "$qp_target/src"
      qp_manifest=$qp_target/src/Cargo.toml
      for crate in quinn quinn-proto; do
        v=$([[ $crate == quinn ]] && echo "$quinn" || echo "$quinn_proto")
        cargo update -q --manifest-path "$qp_manifest" -p "$crate" --precise "$v" >>"$work/qp-build.log" 2>&1 || true
      done
    fi
    echo "building quinn-perf (release, $qp_target)" >&2
    if cargo build --release -q --manifest-path "$qp_manifest" --target-dir "$qp_target" >>"$work/qp-build.log" 2>&1; then
      qp_bin=$qp_target/release/quinn-perf
      qp_lock=$(dirname "$qp_manifest")/Cargo.lock
    else
      tail -n 5 "$work/qp-build.log" >&2
      echo "quinn-perf did not build (cargo build --manifest-path $qp_manifest)" >"$work/ceil.quinn-perf.err"
    fi
  fi
fi
# The quinn releases on either side, for the table (fedgate's quinn-proto carries a vendor/ patch).
qp_versions="quinn $(lock_version "${qp_lock:-/dev/null}" quinn), quinn-proto $(lock_version "${qp_lock:-/dev/null}" quinn-proto)"
if [[ $qp_versions == "quinn $quinn, quinn-proto $quinn_proto" ]]; then
  echo "both quinn $quinn, quinn-proto $quinn_proto (fedgate's patched, vendor/)" >"$work/ceil.note"
else
  echo "quinn-perf: ${qp_versions//quinn , quinn-proto /versions unknown (QUINN_PERF_BIN)}; fedgate: quinn $quinn, quinn-proto $quinn_proto (patched, vendor/)" >"$work/ceil.note"
fi

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

# --- servers -------------------------------------------------------------------------------
SRV=127.0.1.22
IPERF_PORT=$(free_tcp); ECHO_PORT=$(free_tcp)
iperf3 -s -B "$SRV" -p "$IPERF_PORT" >"$work/iperf3-server.log" 2>&1 & pids+=($!)
python3 "$here/echo.py" "$SRV" "$ECHO_PORT" & pids+=($!)
wait_tcp "$SRV" "$IPERF_PORT" iperf3
wait_tcp "$SRV" "$ECHO_PORT" echo

# --- PKI (shared by every proxy) -----------------------------------------------------------
"$bin" certs ca --clusterset bench --out "$work/certs" >/dev/null
for c in a b c d e f g h i j; do "$bin" certs issue --ca "$work/certs" --cluster "$c" --out "$work/certs" >/dev/null; done
C=$work/certs
for c in a b; do cat "$C/$c.crt" "$C/$c.key" >"$C/$c.pem"; done

# --- fedgate A -> QUIC -> fedgate B --------------------------------------------------------
# pair PATH NAME-A NAME-B IP-A IP-B VIP-OCTET-A VIP-OCTET-B MAX-UDP-PAYLOAD [DATA-PLANE-THREADS
# [BUSY-POLL]]: two gateways, B exports bench/bench (the servers), A imports it; records the
# path's ClusterSetIP, proxy pids and A's admin address in VIP, PPIDS and ADMIN.
declare -A VIP PPIDS ADMIN
pair() {
  local path=$1 a=$2 b=$3 ipa=$4 ipb=$5 ta tb g vip
  ta=$(free_udp); tb=$(free_udp)
  gateway "$a" "$ipa" "$ta" "$b" "$ipb" "$tb" "$6" "$8" "${9:-}" "${10:-}"
  gateway "$b" "$ipb" "$tb" "$a" "$ipa" "$ta" "$7" "$8" "${9:-}" "${10:-}"
  bench_export "$work/$b"
  PPIDS[$path]=""
  for g in "$a" "$b"; do
    start_gateway "$work/$g"
    PPIDS[$path]="${PPIDS[$path]} ${pids[-1]}"
  done
  ADMIN[$path]=$(awk -F'"' '/^admin:/ {print $2}' "$work/$a/gateway.yaml")
  vip=$(wait_import_ip "${ADMIN[$path]}" bench bench)
  [[ -n $vip ]] || { echo "gateway $a ($path) never imported bench/bench; logs:" >&2; tail -n 20 "$work/$a.log" "$work/$b.log" >&2; exit 1; }
  VIP[$path]=$vip
}
# pair_ready PATH: waits until an echo round trip goes through the pair.
pair_ready() {
  for _ in $(seq 1 100); do
    python3 "$here/rr.py" "${VIP[$1]}" "$ECHO_PORT" 10 0 >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "no echo through $1 (${VIP[$1]})" >&2
  tail -n 20 "$work"/*.log >&2
  exit 1
}
pair fedgate-1452 a b 127.0.0.21 127.0.0.22 21 22 1452
pair fedgate-jumbo c d 127.0.0.23 127.0.0.24 23 24 ""
pair fedgate-busypoll e f 127.0.0.25 127.0.0.26 25 26 "" 1 200us
pair fedgate-1452-dp1 g h 127.0.0.27 127.0.0.28 27 28 1452 1
pair fedgate-1452-dp2 i j 127.0.0.29 127.0.0.30 29 30 1452 2
fedgate_paths=(fedgate-1452 fedgate-jumbo fedgate-busypoll fedgate-1452-dp1 fedgate-1452-dp2)
for p in "${fedgate_paths[@]}"; do pair_ready "$p"; done

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
  [stunnel]="$S1 $SI1 $SE1 $PID_S1 $PID_S2"
  [haproxy]="$H1 $HI1 $HE1 $PID_H1 $PID_H2"
)
for p in "${fedgate_paths[@]}"; do target[$p]="${VIP[$p]} $IPERF_PORT $ECHO_PORT ${PPIDS[$p]}"; done
# Throughput through every path; the busy-polling pair with one stream only (busy polling is
# for latency, not a throughput setting).
tput_paths() { # STREAMS
  echo direct fedgate-1452 fedgate-jumbo fedgate-1452-dp1 fedgate-1452-dp2
  if (($1 == 1)); then echo fedgate-busypoll; fi
  echo stunnel haproxy
}
lat_paths=(direct fedgate-1452 fedgate-jumbo fedgate-busypoll stunnel haproxy)
echo "iperf3 ${DURATION}s with ${STREAMS// /, } stream(s), $REPEAT interleaved round(s); $CEIL_REPEAT ceiling round(s); then $LAT_REPEAT rounds of $ROUNDS x 1 KB round trips through every path"
for r in $(seq 1 "$REPEAT"); do
  for n in $STREAMS; do
    for p in $(tput_paths "$n"); do
      read -r host iport eport ppids <<<"${target[$p]}"
      # shellcheck disable=SC2086
      t0=$([[ -n $ppids ]] && cpu_ticks $ppids || echo 0)
      d0=$(udp_drops)
      # A failed run is reported (and its row NOT MEASURED) rather than ending the benchmark.
      if ! iperf3 -c "$host" -p "$iport" -t "$DURATION" -P "$n" -J >"$work/iperf.$p.$n.$r.json"; then
        why=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("error", "?"))' "$work/iperf.$p.$n.$r.json" 2>/dev/null || echo "?")
        echo "iperf3 -P $n through $p failed in run $r: $why" | tee -a "$work/tput.$p.$n.err" >&2
        tail -n 3 "$work"/*.log 2>/dev/null | grep -iE 'warn|error' | tail -n 4 >&2 || true
        continue
      fi
      # shellcheck disable=SC2086
      t1=$([[ -n $ppids ]] && cpu_ticks $ppids || echo 0)
      drops=$(($(udp_drops) - d0))
      python3 - "$work/iperf.$p.$n.$r.json" "$((t1 - t0))" "$tck" "$r" >>"$work/tput.$p.$n" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
s = j["end"]["sum_received"]
print(s["bits_per_second"] / 1e9, s["bytes"], int(sys.argv[2]) / int(sys.argv[3]), sys.argv[4])
PY
      printf '  %-17s %d stream(s), run %d: %s\n' "$p" "$n" "$r" "$(tail -n1 "$work/tput.$p.$n" | awk '{printf "%.2f Gb/s, %.2f GB, proxy CPU %.2f s", $1, $2/1e9, $3}'), UDP rcvbuf drops $drops"
    done
  done
done

# The QUIC-only ceiling, fedgate's and quinn-perf's back to back (the gateways sit idle).
if [[ -n $qp_bin ]]; then
  qp_port=$(free_udp)
  "$qp_bin" server --listen "127.0.0.1:$qp_port" --max-udp-payload-size 1452 >"$work/quinn-perf-server.log" 2>&1 & pids+=($!); qp_pid=$!
  sleep 0.5
fi
for r in $(seq 1 "$CEIL_REPEAT"); do
  if [[ -n $ceiling_bin && ! -s $work/ceil.fedgate.err ]]; then
    if "$ceiling_bin" 1452 "$CEIL_GB" >"$work/ceiling.$r.log" 2>&1; then
      fig=$(sed -nE 's/.* ([0-9.]+) Gb\/s, ([0-9.]+) CPU s\/GB.*/\1 \2/p' "$work/ceiling.$r.log" | tail -n1)
      [[ -n $fig ]] || echo "quic_ceiling printed no '... N Gb/s, N CPU s/GB' line: $(tail -n1 "$work/ceiling.$r.log")" >"$work/ceil.fedgate.err"
      [[ -z $fig ]] || echo "$fig" >>"$work/ceil.fedgate"
      printf '  %-17s ceiling run %d: %s\n' quic_ceiling "$r" "$(tail -n1 "$work/ceiling.$r.log")"
    else
      tail -n 5 "$work/ceiling.$r.log" >&2
      echo "quic_ceiling failed: $(tail -n1 "$work/ceiling.$r.log")" >"$work/ceil.fedgate.err"
    fi
  fi
  if [[ -n $qp_bin && ! -s $work/ceil.quinn-perf.err ]]; then
    if python3 "$here/quinn_perf.py" "$qp_bin" "$qp_pid" "127.0.0.1:$qp_port" "$DURATION" 1452 "$work/quinn-perf.$r" >>"$work/ceil.quinn-perf" 2>"$work/quinn-perf.$r.err"; then
      printf '  %-17s ceiling run %d: %s\n' quinn-perf "$r" "$(tail -n1 "$work/ceil.quinn-perf" | awk '{printf "%.2f Gb/s, %.2f CPU s/GB (both ends), current_mtu %s", $1, $3/($2/1e9), $4}')"
    else
      cat "$work/quinn-perf.$r.err" >&2
      echo "quinn-perf failed: $(tail -n1 "$work/quinn-perf.$r.err")" >"$work/ceil.quinn-perf.err"
    fi
  fi
done

# Latency: LAT_REPEAT rounds, the paths interleaved inside each round.
for r in $(seq 1 "$LAT_REPEAT"); do
  for p in "${lat_paths[@]}"; do
    read -r host iport eport ppids <<<"${target[$p]}"
    # shellcheck disable=SC2086
    t0=$([[ -n $ppids ]] && cpu_ticks $ppids || echo 0)
    python3 "$here/rr.py" "$host" "$eport" "$ROUNDS" 500 >>"$work/lat.$p" ||
      { echo "latency run through $p failed" >&2; exit 1; }
    # shellcheck disable=SC2086
    t1=$([[ -n $ppids ]] && cpu_ticks $ppids || echo 0)
    # Proxy CPU per round trip (warm-up included in both the ticks and the count).
    python3 -c "print($((t1 - t0)) / $tck / ($ROUNDS + 500) * 1e6)" >>"$work/rrcpu.$p"
    printf '  %-17s latency round %d: p50 %s us, p99 %s us, proxy CPU %.1f us per round trip\n' "$p" "$r" "$(tail -n1 "$work/lat.$p" | awk '{print $1}')" "$(tail -n1 "$work/lat.$p" | awk '{print $2}')" "$(tail -n1 "$work/rrcpu.$p")"
  done
done

# The datagram size each pair's QUIC connection(s) settled on (path MTU discovery).
for p in "${fedgate_paths[@]}"; do
  curl -sf "http://${ADMIN[$p]}/debug/peers" 2>/dev/null | python3 -c '
import json, sys
print(",".join(sorted({str(p.get("path_mtu")) for p in json.load(sys.stdin)})))' >"$work/mtu.$p" 2>/dev/null || echo "?" >"$work/mtu.$p"
done

# shellcheck disable=SC2086
python3 "$here/report.py" "$work" "$DURATION" "$REPEAT" "$ROUNDS" "$LAT_REPEAT" "$CEIL_GB" $STREAMS
# Gb/s depends on how much of the machine the rest of its work leaves; CPU s/GB much less so.
echo "fedgate: $bin; $(($(date +%s) - started)) s including builds; load average $load0 at the start, $(cut -d' ' -f1 /proc/loadavg) at the end ($(nproc) CPUs)"

if [[ $PROFILE == 1 ]]; then
  command -v perf >/dev/null || { echo "perf not found (apt-get install linux-perf)" >&2; exit 0; }
  echo
  prof_path=${PROFILE_PATH:-fedgate-1452}
  [[ $prof_path == fedgate ]] && prof_path=fedgate-jumbo # its name until issue 20
  [[ -n ${VIP[$prof_path]:-} ]] || { echo "PROFILE_PATH: no fedgate pair $prof_path (${fedgate_paths[*]})" >&2; exit 1; }
  prof_pids=$(echo ${PPIDS[$prof_path]} | tr ' ' ',')
  echo "profiling both gateways during one more ${DURATION}s iperf3 run (-P ${PROFILE_STREAMS:-1}) through $prof_path"
  perf record -q -F "${PERF_FREQ:-999}" --call-graph "${PERF_CALLGRAPH:-fp}" -o "$work/perf.data" -p "$prof_pids" -- sleep "$((DURATION + 1))" >/dev/null 2>&1 &
  perf_pid=$!
  sleep 0.5
  iperf3 -c "${VIP[$prof_path]}" -p "$IPERF_PORT" -t "$DURATION" -P "${PROFILE_STREAMS:-1}" >/dev/null
  wait "$perf_pid" || true
  [[ -n ${PERF_OUT:-} ]] && cp "$work/perf.data" "$PERF_OUT"
  perf report -i "$work/perf.data" --no-children --sort comm,dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 15
  echo
  perf report -i "$work/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 40
fi
