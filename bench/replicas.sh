#!/usr/bin/env bash
# Replica benchmark (issue 19, "Benchmark"): in one invocation, three faults of cluster alpha
# under load from cluster bravo, each with two replicas of alpha and with one (the baseline):
#   replica kill     SIGKILL of a replica (file source)
#   leader kill      SIGKILL of the Lease holder (kube source: a real kube-apiserver)
#   rolling restart  SIGTERM of each replica in turn (file source)
# A replica taken down stays down DOWN seconds, then starts again. Printed per fault: failed
# connections (a new TCP connection every 20 ms through bravo's ClusterSetIP and the tunnel),
# the longest time without a successful request, the worst successful request, failed DNS
# queries (every 50 ms against alpha's replicas, in order, 1 s per server, as a stub resolver
# with one nameserver line per replica) and, for the leader kill, the time to a new leader.
# Every gateway runs in a network namespace of its own on a bridged LAN (tests/src/replicas.rs);
# the scenarios are tests/examples/replicas_bench.rs.
#
#   bench/replicas.sh                        # release build, every fault, 2 and 1 replicas
#   PROFILE=debug bench/replicas.sh          # debug build (these figures are timeouts and
#                                            # restarts, not CPU: quicker to build, same shape)
#   DOWN=5 LEASE=4 bench/replicas.sh         # seconds a replica stays down; Lease duration
#   ONLY=leader bench/replicas.sh            # one fault (replica, leader or rolling)
#   FEDGATE_BIN=target/release/fedgate bench/replicas.sh   # skip building fedgate
#
# Builds into $CARGO_TARGET_DIR when set, else target/. Needs root (network namespaces), ip,
# curl, python3; the leader kill also the kube binaries of scripts/build-kube.sh (without
# them its rows say "not measured: <why>").
set -euo pipefail

DOWN=${DOWN:-3}
LEASE=${LEASE:-4}
PROFILE=${PROFILE:-release}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

[[ $(id -u) == 0 ]] || { echo "bench/replicas.sh needs root (network namespaces)" >&2; exit 1; }
for tool in ip curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool is required (scripts/install-test-deps.sh)" >&2; exit 1; }
done
case $PROFILE in
  release) flags=(--release) ;;
  debug) flags=() ;;
  *) echo "PROFILE is release or debug, not $PROFILE" >&2; exit 1 ;;
esac

target=${CARGO_TARGET_DIR:-$root/target}
packages=(-p fedgate-e2e --example replicas_bench)
if [[ -n ${FEDGATE_BIN:-} ]]; then
  FEDGATE_BIN=$(realpath "$FEDGATE_BIN")
else
  packages+=(-p fedgate --bin fedgate)
  FEDGATE_BIN=$target/$PROFILE/fedgate
fi
echo "building ${packages[*]} ($PROFILE; a cold release build takes several minutes)" >&2
cargo build -q "${flags[@]}" "${packages[@]}"
[[ -x $FEDGATE_BIN ]] || { echo "no fedgate binary at $FEDGATE_BIN" >&2; exit 1; }
export FEDGATE_BIN

args=(--down "$DOWN" --lease "$LEASE")
[[ -z ${ONLY:-} ]] || args+=(--only "$ONLY")
echo "=== $(date -u +%FT%TZ) fedgate $("$FEDGATE_BIN" --version 2>/dev/null || echo '?') ===" >&2
# Progress and gateway logs of failed runs go to stderr; the table to stdout.
"$target/$PROFILE/examples/replicas_bench" "${args[@]}"
