# Shared by the benchmarks (sourced): the scratch directory and its cleanup, free loopback
# ports, the fedgate binary, gateways started in the background and what they import.
# Expects $root (the checkout).

# scratch: a new scratch directory $work and the list $pids of background processes. On exit
# every one of them is killed and reaped and $work removed (KEEP=1 keeps it and says where).
scratch() {
  work=$(mktemp -d)
  pids=()
  trap scratch_cleanup EXIT
}
scratch_cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ ${KEEP:-0} == 1 ]]; then echo "kept $work" >&2; else rm -rf "$work" 2>/dev/null || true; fi
}

free_tcp() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
free_udp() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# release_fedgate: sets $bin to $FEDGATE_BIN, else builds this checkout's release fedgate.
release_fedgate() {
  if [[ -n ${FEDGATE_BIN:-} ]]; then
    bin=$(realpath "$FEDGATE_BIN")
  else
    echo "building fedgate (release; the first build takes several minutes)" >&2
    (cd "$root" && cargo build --release -q -p fedgate)
    # Where cargo put it: $CARGO_TARGET_DIR (relative to the checkout) or target/.
    local dir=${CARGO_TARGET_DIR:-target}
    [[ $dir == /* ]] || dir=$root/$dir
    bin=$dir/release/fedgate
  fi
}

# start_gateway DIR: `$bin run` on DIR/gateway.yaml (relative paths from DIR) in the
# background, RUST_LOG=${FEDGATE_LOG:-warn}, output in DIR.log; its pid is ${pids[-1]}.
start_gateway() {
  (cd "$1" && RUST_LOG=${FEDGATE_LOG:-warn} exec "$bin" run --config gateway.yaml) >"$1.log" 2>&1 &
  pids+=($!)
}

# import_ip ADMIN NAMESPACE NAME: the first ClusterSetIP of that import at the gateway whose
# admin server listens on ADMIN (host:port); empty until it is imported.
import_ip() {
  curl -sf "http://$1/debug/imports" 2>/dev/null | python3 -c '
import json, sys
for s in json.load(sys.stdin):
    if s.get("namespace") == sys.argv[1] and s.get("name") == sys.argv[2] and s.get("ips"):
        print(s["ips"][0]); break' "$2" "$3" 2>/dev/null || true
}

# wait_import_ip ADMIN NAMESPACE NAME [PID]: import_ip, asked every 0.2 s for at most 30 s (or
# until the gateway process PID is gone); empty when the import never came.
wait_import_ip() {
  local ip
  for _ in $(seq 1 150); do
    ip=$(import_ip "$1" "$2" "$3")
    [[ -n $ip ]] && { echo "$ip"; return 0; }
    [[ -z ${4:-} ]] || kill -0 "$4" 2>/dev/null || break
    sleep 0.2
  done
  return 0
}
