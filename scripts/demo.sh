#!/usr/bin/env bash
# Runs `fedgate demo`: three federated gateways on this machine (loopback only, no root), with
# built-in backends; prints what to try; Ctrl-C stops everything. Arguments go to
# `fedgate demo` (e.g. --base-ip 127.0.5.11, --dir DIR); see docs/demo.md.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> building fedgate (release)" >&2
cargo build --release -q -p fedgate
exec target/release/fedgate demo "$@"
