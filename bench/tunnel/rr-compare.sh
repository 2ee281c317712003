#!/usr/bin/env bash
# Latency-only comparison of fedgate builds or settings against the haproxy chain, on
# loopback, in one invocation: 1 KB round trips (rr.py) through each path in ITER interleaved
# rounds, printing per path the medians of p50 and p99, the proxies' CPU per round trip
# (schedstat of every thread) and context switches per round trip.
#   PAIRS="name=BINARY,MAX_UDP_PAYLOAD,ENV=VAL:ENV2=VAL,DATA_PLANE_THREADS,BUSY_POLL,SOCKET_BUFFER ..."  one fedgate
#   pair per entry (empty fields: the defaults)
#   PAIRS="old=/tmp/fedgate-old, new=target/release/fedgate," ITER=8 bench/tunnel/rr-compare.sh
#   PAIRS="w1=target/release/fedgate,,TOKIO_WORKER_THREADS=1" bench/tunnel/rr-compare.sh
#   RR_GAP=MICROSECONDS  idle time between round trips (default 0: back to back)
#   DELAY_MS=10      each pair's gateways reach each other through a relay that delays every
#                    datagram by that much each way (a long path; tunnel/examples/udp_delay.rs,
#                    built if DELAY_BIN is not given)
#   HAPROXY_GLOBAL="busy-polling"  one more line for the haproxy configs' global section
#   PRE_IPERF=3  an iperf3 run of that many seconds through each path before its round trips
#   SYSC="name ..."  instead: syscall counts (perf trace -s) of those paths over 10 000 round
#                    trips, written to /tmp/sysc.NAME (SYSC_TRACE="": every call, with times)
#   IPERF="name ..." instead: ITER interleaved iperf3 runs (IPERF_SECS, 5) through those paths,
#                    printing Gb/s, the proxies' CPU seconds per GB and their resident memory
#                    half-way through (IPERF_P streams, 1); IPERF_STAT="perf events": their counts
#                    in both proxies per GB moved; IPERF_PROF=PREFIX: perf record of both proxies
#                    during each run, to PREFIX.NAME.ITERATION
#   STAT="name ..."  instead: perf stat (task clock, context switches, migrations) of those
#                    paths around 10 000 round trips, written to /tmp/stat.NAME (STAT_EVENTS:
#                    other events; STAT_ALL=1: counted system-wide, not in the proxies only)
#   STUNNEL=1        the stunnel4 chain as a third baseline path, named stunnel (its threads
#                    live as long as their connection, so the counts read from /proc, csw/rr,
#                    cpu/rr and IPERF's CPU s per GB, read 0 for it; IPERF_STAT, STAT and SCHED
#                    count it)
#   SCHED="name ..." instead: perf sched latency (wake-up to run delay per task) over 10 000
#                    round trips through those paths, system-wide, data in /tmp/sched.NAME, and
#                    per hop (sched-steps.py): each process's work per hop, wake-up delays on
#                    the waker's CPU and on another, wake-ups per round trip
#   PROF=name        instead: perf record of that path over 30 000 round trips (PERF_OUT)
#   SEQ="name ..."   instead: round trips before and after one iperf3 run, in sequence
#   IDLE=SECONDS     instead: context switches per second of every path's threads (by thread
#                    name, both proxies summed) over that many idle seconds
# Needs haproxy, iperf3 and, for SYSC/PROF, perf (Debian: haproxy iperf3 linux-perf); stunnel4
# for STUNNEL=1.
set -euo pipefail
for tool in haproxy iperf3; do
  command -v $tool >/dev/null || { echo "rr-compare.sh: $tool not found (Debian: apt-get install haproxy iperf3; bench/tunnel.sh installs them)" >&2; exit 1; }
done
ROUNDS=${ROUNDS:-10000}; ITER=${ITER:-5}
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
work=$(mktemp -d /tmp/rr-compare.XXXX); pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# shellcheck source=bench/tunnel/common.sh
. "$here/common.sh"
SRV=127.0.1.22; ECHO_PORT=$(free_tcp)
python3 "$here/echo.py" "$SRV" "$ECHO_PORT" & pids+=($!)
IPERF_PORT=$(free_tcp); iperf3 -s -B "$SRV" -p "$IPERF_PORT" >/dev/null 2>&1 & pids+=($!)
bin0=${FEDGATE_BIN:-$root/target/release/fedgate}
if [[ -n ${DELAY_MS:-} ]]; then
  DELAY_BIN=${DELAY_BIN:-$root/target/release/examples/udp_delay}
  [[ -x $DELAY_BIN ]] || (cd "$root" && cargo build --release -q -p fedgate-tunnel --features test-util --example udp_delay)
fi
"$bin0" certs ca --clusterset bench --out "$work/certs" >/dev/null
for c in a b c d e f g h i j; do "$bin0" certs issue --ca "$work/certs" --cluster "$c" --out "$work/certs" >/dev/null; done
C=$work/certs; for c in a b; do cat "$C/$c.crt" "$C/$c.key" >"$C/$c.pem"; done
declare -A HOST PIDS IP
ids=(a b c d e f g h i j); n=0
for spec in ${PAIRS:-base=$bin0,}; do
  name=${spec%%=*}; rest=${spec#*=}; IFS=, read -r bin payload envs threads busy sockbuf <<<"$rest"; bin=$(realpath "$bin")
  a=${ids[$((2*n))]}; b=${ids[$((2*n+1))]}; ipa=127.0.0.$((50+2*n)); ipb=127.0.0.$((51+2*n))
  ta=$(free_udp); tb=$(free_udp)
  # Each gateway reaches the other directly, or with DELAY_MS through a relay that delays
  # each direction by that much (tunnel/examples/udp_delay.rs).
  pa=$ipa; pta=$ta; pb=$ipb; ptb=$tb
  if [[ -n ${DELAY_MS:-} ]]; then
    pa=127.0.0.$((150+2*n)); pta=$(free_udp); pb=127.0.0.$((151+2*n)); ptb=$(free_udp)
    "$DELAY_BIN" "$pb:$ptb" "$ipb:$tb" "$DELAY_MS" >$work/delay-$a.log 2>&1 & pids+=($!)
    "$DELAY_BIN" "$pa:$pta" "$ipa:$ta" "$DELAY_MS" >$work/delay-$b.log 2>&1 & pids+=($!)
  fi
  gateway $a $ipa $ta $b $pb $ptb $((50+2*n)) "$payload" "$threads" "$busy" "$sockbuf"; gateway $b $ipb $tb $a $pa $pta $((51+2*n)) "$payload" "$threads" "$busy" "$sockbuf"
  bench_export "$work/$b"
  PP=""; for g in $a $b; do (cd $work/$g && exec env RUST_LOG=warn ${envs//:/ } "$bin" run --config gateway.yaml) >$work/$g.log 2>&1 & pids+=($!); PP="$PP $!"; done
  adm=$(awk -F'"' '/^admin:/ {print $2}' $work/$a/gateway.yaml); VIP=""
  for _ in $(seq 150); do VIP=$(curl -sf http://$adm/debug/imports 2>/dev/null | python3 -c 'import json,sys
for s in json.load(sys.stdin):
  if s.get("ips"): print(s["ips"][0]); break' 2>/dev/null || true); [[ -n $VIP ]] && break; sleep 0.2; done
  for _ in $(seq 100); do python3 $here/rr.py $VIP $ECHO_PORT 10 0 >/dev/null 2>&1 && break; sleep 0.2; done
  HOST[$name]="$VIP $ECHO_PORT"; IP[$name]="$VIP $IPERF_PORT"; PIDS[$name]="$PP"; n=$((n+1))
done
H1=127.0.0.41; H2=127.0.0.42; HE1=$(free_tcp); HE2=$(free_tcp); HI1=$(free_tcp); HI2=$(free_tcp)
haproxy_configs
haproxy -db -f $work/haproxy-server.cfg >/dev/null 2>&1 & pids+=($!); PIDS[haproxy]="$!"
haproxy -db -f $work/haproxy-client.cfg >/dev/null 2>&1 & pids+=($!); PIDS[haproxy]="${PIDS[haproxy]} $!"
sleep 1
HOST[direct]="$SRV $ECHO_PORT"; PIDS[direct]="$$"; IP[direct]="$SRV $IPERF_PORT"
HOST[haproxy]="$H1 $HE1"; IP[haproxy]="$H1 $HI1"
# STUNNEL=1: the stunnel4 chain too, as bench/tunnel.sh runs it.
if [[ -n ${STUNNEL:-} ]]; then
  STUNNEL_BIN=$(command -v stunnel4 || command -v stunnel) || { echo "rr-compare.sh: stunnel4 not found (Debian: apt-get install stunnel4)" >&2; exit 1; }
  S1=127.0.0.31; S2=127.0.0.32; SI1=$(free_tcp); SE1=$(free_tcp); SI2=$(free_tcp); SE2=$(free_tcp)
  stunnel_configs
  "$STUNNEL_BIN" "$work/stunnel-server.conf" >/dev/null 2>&1 & pids+=($!); PIDS[stunnel]="$!"
  "$STUNNEL_BIN" "$work/stunnel-client.conf" >/dev/null 2>&1 & pids+=($!); PIDS[stunnel]="${PIDS[stunnel]} $!"
  wait_tcp "$S1" "$SE1" "stunnel client"; wait_tcp "$S2" "$SE2" "stunnel server"
  HOST[stunnel]="$S1 $SE1"; IP[stunnel]="$S1 $SI1"
fi
# Context switches and CPU ns of the given pids, summed over all their threads.
csw() { local t=0 p f; for p in "$@"; do for f in /proc/$p/task/*/status; do t=$((t + $(awk '/ctxt_switches/ {s+=$2} END {print s}' $f))); done; done; echo $t; }
# Resident memory of the given pids in MB, summed (the direct path's "pid" is this script).
rss_mb() { local t=0 p; for p in "$@"; do t=$((t + $(awk '/^VmRSS/ {print $2}' /proc/$p/status))); done; echo $((t / 1024)); }
cpu_ns() { local t=0 p f; for p in "$@"; do for f in /proc/$p/task/*/schedstat; do t=$((t + $(cut -d' ' -f1 $f))); done; done; echo $t; }
# pre_iperf NAME: with PRE_IPERF=SECONDS, an iperf3 run through path NAME first.
pre_iperf() {
  [[ -n ${PRE_IPERF:-} ]] || return 0
  set -- ${IP[$1]}
  iperf3 -c $1 -p $2 -t $PRE_IPERF >/dev/null || echo "iperf3 through $1:$2 failed"
}
names=(direct haproxy ${STUNNEL:+stunnel}); for spec in ${PAIRS:-base=}; do names+=(${spec%%=*}); done
if [[ -n ${IDLE:-} ]]; then
  sleep 3
  snap() { local p f; for p in $(for nm in "${names[@]}"; do [[ $nm == direct ]] || echo ${PIDS[$nm]}; done); do
    for f in /proc/$p/task/*; do echo "$p/${f##*/} $(tr ' ' _ <$f/comm) $(awk '/ctxt_switches/ {s+=$2} END {print s}' $f/status)"; done; done | sort; }
  snap >$work/idle0; sleep $IDLE; snap >$work/idle1
  for nm in "${names[@]}"; do [[ $nm == direct ]] && continue
    for p in ${PIDS[$nm]}; do grep "^$p/" $work/idle0; done | sort >$work/i0
    for p in ${PIDS[$nm]}; do grep "^$p/" $work/idle1; done | sort >$work/i1
    join $work/i0 $work/i1 | awk -v n=$nm -v s=$IDLE '{t[$2]+=($5-$3)/s; all+=($5-$3)/s} END {printf "%-10s %6.1f wake-ups/s:", n, all; for (k in t) printf " %s %.1f", k, t[k]; print ""}'
  done; exit 0
fi
if [[ -n ${SEQ:-} ]]; then
  for nm in $SEQ; do set -- ${IP[$nm]}
    for i in 1 2; do echo "$nm pre $(python3 $here/rr.py ${HOST[$nm]} 10000 500)"; done
    iperf3 -c $1 -p $2 -t 3 >/dev/null
    for i in 1 2 3 4 5 6; do echo "$nm post$i $(python3 $here/rr.py ${HOST[$nm]} 10000 500)"; done
  done; exit 0
fi
if [[ -n ${SYSC:-} ]]; then
  for nm in $SYSC; do pp=$(echo ${PIDS[$nm]} | tr ' ' ',')
  pre_iperf $nm
  perf trace ${SYSC_TRACE--s} -p $pp -o /tmp/sysc.$nm -- sleep 4 >/dev/null 2>&1 & sleep 0.5
  python3 $here/rr.py ${HOST[$nm]} 10000 0; sleep 4; done; exit 0
fi
if [[ -n ${IPERF:-} ]]; then
  for it in $(seq $ITER); do for nm in $IPERF; do set -- ${IP[$nm]}
    c0=$(cpu_ns ${PIDS[$nm]})
    iperf3 -c $1 -p $2 -t ${IPERF_SECS:-5} -P ${IPERF_P:-1} -J >$work/iperf.json & ip=$!
    [[ -z ${IPERF_STAT:-} ]] || perf stat -x, -e "$IPERF_STAT" -p "$(echo ${PIDS[$nm]} | tr ' ' ,)" \
      -o $work/iperf.stat -- sleep $(( ${IPERF_SECS:-5} - 1 )) >/dev/null 2>&1 &
    [[ -z ${IPERF_PROF:-} ]] || perf record -q -F ${PERF_FREQ:-999} ${PERF_G:--g} -p "$(echo ${PIDS[$nm]} | tr ' ' ,)" \
      -o "$IPERF_PROF.$nm.$it" -- sleep $(( ${IPERF_SECS:-5} - 1 )) >/dev/null 2>&1 &
    sleep $(( ${IPERF_SECS:-5} / 2 )); rss=$(rss_mb ${PIDS[$nm]}); wait $ip
    gbps=$(python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9, 2))' <$work/iperf.json)
    c1=$(cpu_ns ${PIDS[$nm]})
    echo "$nm $gbps Gb/s, proxies' CPU s per GB $(python3 -c "print(round(($c1-$c0)/1e9/($gbps*${IPERF_SECS:-5}/8), 2))"), RSS mid-run $rss MB"
    # IPERF_STAT=EVENTS: perf stat of both proxies over all but the last second, per GB moved.
    [[ -z ${IPERF_STAT:-} ]] || awk -F, -v gb="$(python3 -c "print($gbps*(${IPERF_SECS:-5}-1)/8)")" \
      '$1 ~ /^[0-9]/ {printf "    %s %.0f per GB\n", $3, $1/gb}' $work/iperf.stat
  done; done; exit 0
fi
if [[ -n ${STAT:-} ]]; then
  for nm in $STAT; do pp=$(echo ${PIDS[$nm]} | tr ' ' ',')
  pre_iperf $nm
  # STAT_EVENTS: other events; STAT_ALL=1: counted on every CPU (all processes), not the proxies'.
  if [[ -n ${STAT_ALL:-} ]]; then scope=(-a); else scope=(-p "$pp"); fi
  perf stat -e "${STAT_EVENTS:-task-clock,user_time,system_time,context-switches,cpu-migrations}" "${scope[@]}" -o /tmp/stat.$nm -- sleep 5 >/dev/null 2>&1 & sleep 0.3
  python3 $here/rr.py ${HOST[$nm]} 10000 0; wait $!; echo "== $nm"; grep -vE "^#|^$|Performance counter|seconds" /tmp/stat.$nm; done; exit 0
fi
if [[ -n ${SCHED:-} ]]; then
  for nm in $SCHED; do
  perf sched record -q -o /tmp/sched.$nm -- sleep 4 >/dev/null 2>&1 & sleep 0.3
  python3 $here/rr.py ${HOST[$nm]} 10000 0 >/dev/null; wait $!
  echo "== $nm"; perf sched latency -i /tmp/sched.$nm 2>/dev/null | grep -E "Task|fedgate-data|haproxy|stunnel|python3"
  case $nm in direct) procs=python3;; haproxy) procs=python3,haproxy;; stunnel) procs=python3,stunnel4;; *) procs=python3,fedgate;; esac
  perf script -i /tmp/sched.$nm 2>/dev/null | python3 $here/sched-steps.py $procs 10000; done; exit 0
fi
if [[ -n ${PROF:-} ]]; then
  pp=$(echo ${PIDS[$PROF]} | tr ' ' ',')
  pre_iperf $PROF
  perf record -q -F ${PERF_FREQ:-2999} ${PERF_G:--g} -o ${PERF_OUT:-/tmp/rr-perf.data} -p $pp -- sleep 6 >/dev/null 2>&1 & sleep 0.3
  python3 $here/rr.py ${HOST[$PROF]} 30000 0; sleep 6; exit 0
fi
for it in $(seq $ITER); do for nm in "${names[@]}"; do
  pre_iperf $nm
  c0=$(cpu_ns ${PIDS[$nm]}); s0=$(csw ${PIDS[$nm]})
  python3 $here/rr.py ${HOST[$nm]} $ROUNDS 500 ${RR_GAP:-0} | awk -v n=$nm '{print n, $1, $2}' >> $work/res
  c1=$(cpu_ns ${PIDS[$nm]}); s1=$(csw ${PIDS[$nm]}); echo "$nm $(( (c1-c0)/ (ROUNDS+500) )) $(( (s1-s0)*100/ (ROUNDS+500) ))" >> $work/cpu
done; done
python3 - $work/res <<'PY'
import sys, statistics, collections
d=collections.defaultdict(list)
for l in open(sys.argv[1]):
    n,a,b=l.split(); d[n].append((float(a),float(b)))
dp=statistics.median(x[1] for x in d["direct"])
for n,v in d.items():
    p50=statistics.median(x[0] for x in v); p99=statistics.median(x[1] for x in v)
    cpu=statistics.median(int(l.split()[1]) for l in open(sys.argv[1].replace("res","cpu")) if l.split()[0]==n)
    cs=statistics.median(int(l.split()[2]) for l in open(sys.argv[1].replace("res","cpu")) if l.split()[0]==n)
    print(f"{n:14s} csw/rr {cs/100:4.2f} cpu/rr {cpu/1000:5.1f}us p50 {p50:7.1f}  p99 {p99:7.1f}  added p99 {p99-dp:+7.1f}   p99s {' '.join(f'{x[1]:.0f}' for x in v)}")
PY
