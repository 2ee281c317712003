#!/usr/bin/env bash
# Runs the three-cluster example on this machine: certificates, three backends, three
# gateways on 127.0.0.11-13, then prints what to try. Ctrl-C stops everything.
# (Superseded by `fedgate demo` once it exists.)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
ex=examples/three-clusters
run=${FEDGATE_DEMO_DIR:-$root/target/demo}

echo "==> building fedgate (release)"
cargo build --release -q -p fedgate
bin=$root/target/release/fedgate

rm -rf "$run" && mkdir -p "$run" && cp -r "$ex"/. "$run"/
echo "==> making a dev PKI in $run/certs"
"$bin" certs ca --clusterset demo --out "$run/certs" >/dev/null
for c in east west north; do "$bin" certs issue --ca "$run/certs" --cluster "$c" --out "$run/certs" >/dev/null; done

pids=()
cleanup() { echo; echo "==> stopping"; kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

echo "==> starting backends (python3 http.server) on 127.0.1.11-13:8081 and 127.0.1.13:8082"
for i in 11 12 13; do
  d=$run/www-$i; mkdir -p "$d"
  case $i in 11) c=east;; 12) c=west;; 13) c=north;; esac
  echo "hello from $c" > "$d/index.html"
  python3 -m http.server 8081 --bind 127.0.1.$i --directory "$d" >/dev/null 2>&1 & pids+=($!)
done
# The headless "db" service of north (port 8082).
python3 -m http.server 8082 --bind 127.0.1.13 --directory "$run/www-13" >/dev/null 2>&1 & pids+=($!)

echo "==> starting gateways east, west, north"
for c in east west north; do
  (cd "$run/$c" && exec "$bin" run --config gateway.yaml) >"$run/$c.log" 2>&1 & pids+=($!)
done
for h in 11 12 13; do
  for _ in $(seq 50); do curl -sf "http://127.0.0.$h:15000/healthz" >/dev/null && break; sleep 0.2; done
done

cat <<MSG

fedgate demo is running (logs in $run/*.log). Try:
  dig @127.0.0.11 -p 5353 echo.demo.svc.clusterset.local +short
  dig @127.0.0.11 -p 5353 echo.demo.svc.cluster.local +short      # east's own Service only
  dig @127.0.0.11 -p 5353 db.demo.svc.clusterset.local +short     # headless: a VIP per remote endpoint
  curl -s http://\$(dig @127.0.0.11 -p 5353 echo.demo.svc.clusterset.local +short)/
  curl -s http://127.0.0.11:15000/debug/imports | python3 -m json.tool
  dashboard: http://127.0.0.11:15000/
Fail east's backend and watch traffic move:  kill the python http.server on 127.0.1.11
Ctrl-C stops everything.
MSG
wait
