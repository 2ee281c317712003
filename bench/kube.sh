#!/usr/bin/env bash
# Kubernetes reconcile benchmark (issue 5 item 7): SERVICES exported services (Service +
# EndpointSlice with ENDPOINTS documentation addresses + ServiceExport) created at once in
# cluster A with one `kubectl apply --server-side`, measured at cluster B. Two real
# kube-apiservers + etcd (tests/src/kube.rs) and two release `fedgate run` gateways in kube mode
# peered over loopback QUIC; see tests/examples/kube_bench.rs for what is measured and how.
#
#   bench/kube.sh                         # 1000 services x 3 endpoints, twice
#   SERVICES=100 REPEAT=1 bench/kube.sh   # quick
#   FEDGATE_BIN=target/release/fedgate NO_BUILD=1 bench/kube.sh
#
# Needs the binaries of scripts/build-kube.sh (kube-apiserver, etcd, kubectl); loopback only,
# no root. Prints one table per run and the SUMMARY lines of all runs at the end.
set -euo pipefail

SERVICES=${SERVICES:-1000}
ENDPOINTS=${ENDPOINTS:-3}
REPEAT=${REPEAT:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [[ ${NO_BUILD:-0} != 1 ]]; then
  cargo build --release -p fedgate --bin fedgate -p fedgate-e2e --example kube_bench
fi
bench=$root/target/release/examples/kube_bench
export FEDGATE_BIN=${FEDGATE_BIN:-$root/target/release/fedgate}
[[ -x $FEDGATE_BIN ]] || { echo "no fedgate binary at $FEDGATE_BIN" >&2; exit 1; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
summaries=()
for run in $(seq 1 "$REPEAT"); do
  echo "=== run $run/$REPEAT $(date -u +%FT%TZ) ==="
  "$bench" --services "$SERVICES" --endpoints "$ENDPOINTS" | tee "$log"
  summaries+=("run $run: $(grep '^SUMMARY' "$log")")
done
echo
printf '%s\n' "${summaries[@]}"
