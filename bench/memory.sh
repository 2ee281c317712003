#!/usr/bin/env bash
# Memory benchmark (issue 20, item 4): one gateway (file source, default config, no peers)
# exporting N services with one endpoint each, every endpoint unreachable (a loopback address
# where nothing listens: every probe fails), and the same gateway with no service as the
# baseline, in one invocation. Printed per size: RSS when DNS first answers a service name,
# RSS 30 s and 60 s after the start, the peak (VmHWM), and the log lines written (failing
# probes must not flood the log). Target: under 150 MB after 60 s at 10 000 services.
#
#   bench/memory.sh                          # release build; 0, 1 000 and 10 000 services
#   SIZES="0 10000" HOLD=60 bench/memory.sh  # which sizes; seconds to the last sample
#   FEDGATE_BIN=target/release/fedgate bench/memory.sh   # skip building fedgate
#
# Where the memory goes (heaptrack of a system-allocator build): docs/benchmarks.md,
# "Session 15: memory" (and session 14 before it).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/bench/common.sh"
SIZES=${SIZES:-"0 1000 10000"}
HOLD=${HOLD:-60}
TARGET_MB=150

scratch
release_fedgate
"$bin" certs ca --clusterset mem --out "$work/certs" >/dev/null
"$bin" certs issue --ca "$work/certs" --cluster alpha --clusterset mem --out "$work/certs" >/dev/null

rss_mb() { awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
hwm_mb() { awk '/^VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }

rows=()
for n in $SIZES; do
  dir=$work/g$n
  mkdir -p "$dir/cluster"
  python3 - "$dir/cluster" "$n" <<'EOF'
import sys
out, n = sys.argv[1], int(sys.argv[2])
per_file = 100
for f in range((n + per_file - 1) // per_file):
    docs = []
    for i in range(f * per_file, min(n, (f + 1) * per_file)):
        name = f"svc-{i}"
        ip = f"127.200.{i // 250}.{i % 250 + 1}"  # nothing listens: every probe fails
        docs.append(f"""apiVersion: v1
kind: Service
metadata: {{ name: {name}, namespace: mem }}
spec:
  ports:
  - {{ name: http, port: 80, targetPort: 8080, protocol: TCP }}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: mem
  labels: {{ kubernetes.io/service-name: {name} }}
addressType: IPv4
ports:
- {{ name: http, port: 8080, protocol: TCP }}
endpoints:
- addresses: ["{ip}"]
  conditions: {{ ready: true }}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata:
  name: {name}
  namespace: mem
""")
    with open(f"{out}/s{f:04}.yaml", "w") as fh:
        fh.write("---\n".join(docs))
EOF
  ip=127.0.0.$((60 + ${#rows[@]}))
  cat >"$dir/gateway.yaml" <<EOF
cluster: { id: alpha, clusterset: mem }
discovery: { source: file, file: { dir: ./cluster } }
peers: []
tls: { cert: ../certs/alpha.crt, key: ../certs/alpha.key, ca: ../certs/ca.crt }
tunnel: { listen: "$ip:15443" }
dns: { listen: "$ip:5353", upstream: [ "127.0.0.1:53" ] }
front: { mode: vip, clusterSetIPRange: 127.64.0.0/16 }
admin: { listen: "$ip:15000" }
EOF
  # The default log level, as users run it.
  (cd "$dir" && exec "$bin" run --config gateway.yaml) >"$dir.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  start=$(date +%s.%N)
  # DNS answers the last service (or, without services, the zone's version TXT).
  qname=svc-$((n > 0 ? n - 1 : 0)).mem.svc.clusterset.local
  [[ $n == 0 ]] && qname=dns-version.clusterset.local
  qtype=A; [[ $n == 0 ]] && qtype=TXT
  first="" first_s=""
  for _ in $(seq 1 600); do
    # dig +short prints its errors (";; connection refused") on stdout too: an answer only.
    if dig +short +time=1 +tries=1 -p 5353 "@$ip" "$qname" "$qtype" 2>/dev/null | grep -qE '^([0-9.]+|".*")$'; then
      first=$(rss_mb "$pid")
      first_s=$(echo "$(date +%s.%N) - $start" | bc)
      break
    fi
    kill -0 "$pid" 2>/dev/null || { echo "gateway with $n services exited:" >&2; tail "$dir.log" >&2; exit 1; }
    sleep 0.1
  done
  [[ -n $first ]] || { echo "DNS never answered $qname with $n services" >&2; exit 1; }
  sample() { # seconds after the start
    local wait; wait=$(echo "$1 - ($(date +%s.%N) - $start)" | bc)
    [[ $wait == -* ]] || sleep "$wait"
    rss_mb "$pid"
  }
  at30=$(sample 30)
  atn=$(sample "$HOLD")
  hwm=$(hwm_mb "$pid")
  lines=$(wc -l <"$dir.log")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rows+=("$n $first $(printf %.1f "$first_s") $at30 $atn $hwm $lines")
  echo "$n services: DNS answered after ${first_s}s at $first MB; $at30 MB at 30 s, $atn MB at ${HOLD} s, peak $hwm MB; $lines log lines" >&2
done

base=$(echo "${rows[0]}" | awk '{print $5}')
echo
echo "fedgate memory benchmark: binary $bin; file source, default config, no peers; every endpoint's probe fails"
echo
echo "| services | RSS when DNS first answers MB | DNS first answers after s | RSS at 30 s MB | RSS at ${HOLD} s MB | peak MB | × baseline at ${HOLD} s | log lines | verdict (< ${TARGET_MB} MB at ${HOLD} s) |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---|"
for r in "${rows[@]}"; do
  read -r n first first_s at30 atn hwm lines <<<"$r"
  ratio=$(echo "scale=2; $atn / $base" | bc)
  verdict=ok; [[ $atn -lt $TARGET_MB ]] || verdict="over target"
  echo "| $n | $first | $first_s | $at30 | $atn | $hwm | $ratio | $lines | $verdict |"
done
