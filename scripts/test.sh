#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need, then formatting,
# lints, and every test (unit, in-process, end-to-end with real processes and clients).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step() { printf '\n==> %s\n' "$*"; }

step "installing test dependencies"
bash scripts/install-test-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "building the fedgate binary for the end-to-end tests"
cargo build -p fedgate --bins

step "cargo test"
cargo test --workspace --all-features

step "fuzzing the DNS request path (bounded: FUZZ_SECONDS per target)"
bash fuzz/run.sh
