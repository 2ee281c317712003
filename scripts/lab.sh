#!/usr/bin/env bash
# The lab: N Kubernetes clusters with fedgate gateways on one machine, each in a network
# namespace of its own (control plane, pods, gateway), until Ctrl-C. Builds what is missing
# (the kube binaries, fedgate, the lab), then runs it as root. Arguments go to the lab:
#   scripts/lab.sh --clusters 3 --network flat
# See docs/testing-kube.md, "The lab".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-kube.sh
cargo build -q -p fedgate
cargo build -q -p fedgate-e2e --bin fedgate-lab
if [ "$(id -u)" -ne 0 ]; then
  # Network namespaces, veths and bridges need root.
  command -v sudo >/dev/null || { echo "lab.sh: run as root (network namespaces need it)" >&2; exit 1; }
  exec sudo --preserve-env=PATH,HOME,XDG_CACHE_HOME,FEDGATE_KUBE_BIN_DIR ./target/debug/fedgate-lab "$@"
fi
exec ./target/debug/fedgate-lab "$@"
