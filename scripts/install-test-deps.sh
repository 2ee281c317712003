#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine (idempotent, quick when warm).
# Real clients and servers: dig (bind9-dnsutils), curl, iperf3, unbound, ip (iproute2), python3;
# Debian's Chromium (+ chromedriver) for the dashboard's browser test, driven by playwright-core
# from tests/browser (npm ci below; it never downloads a browser of its own); setpriv
# (util-linux) for the demo test, which runs `fedgate demo` as nobody; socat and nc
# (netcat-openbsd), run as the commands of the test clusters' pods (fedgate-vnode ignores images:
# a pod's command is a host program; nslookup comes with bind9-dnsutils).
set -euo pipefail

packages=(bind9-dnsutils curl iperf3 iproute2 unbound python3 procps util-linux chromium chromium-driver socat netcat-openbsd)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-test-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The test suite starts its own unbound on loopback when it needs one; the packaged
  # service must not hold port 53.
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now unbound >/dev/null 2>&1 || true; fi
fi

# The browser test's node modules, pinned by tests/browser/package-lock.json (node >= 20).
browser_dir="$(cd "$(dirname "$0")/.." && pwd)/tests/browser"
if [ ! -f "$browser_dir/node_modules/playwright-core/package.json" ]; then
  command -v npm >/dev/null 2>&1 || { echo "install-test-deps: need node >= 20 and npm (tests/browser)" >&2; exit 1; }
  echo "install-test-deps: npm ci in tests/browser"
  (cd "$browser_dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund >/dev/null)
fi
# kube-apiserver, etcd, kubectl and helm for the Kubernetes e2e and deploy tests
# (docs/testing-kube.md).
bash "$(dirname "$0")/build-kube.sh"
# cargo-fuzz (fuzz/run.sh): pinned; built from crates.io only when absent or another version.
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "cargo-fuzz $CARGO_FUZZ_VERSION"; then
  echo "install-test-deps: installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --quiet
fi
echo "install-test-deps: ok (${packages[*]} cargo-fuzz helm)"
