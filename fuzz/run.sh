#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for a bounded time from the committed seed corpus.
# FUZZ_SECONDS per target (default 25). New inputs go to a temporary directory, so the checkout
# stays clean. A broken invariant fails the script; libFuzzer leaves the input in
# fuzz/artifacts/<target>/ — fix the bug, then add the input to fuzz/regressions/<target>/
# (replayed by `cargo test -p fedgate-dns`).
set -euo pipefail
cd "$(dirname "$0")"
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address, ...); stable rustc accepts them
# with RUSTC_BOOTSTRAP=1.
export RUSTC_BOOTSTRAP=1
secs=${FUZZ_SECONDS:-25}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz not found: run scripts/install-test-deps.sh (cargo install cargo-fuzz --locked)" >&2
  exit 1
fi
# No sanitizer: the code under test is safe Rust (unsafe_code is forbidden in the workspace),
# so AddressSanitizer finds nothing coverage-guided libFuzzer would not, and without it the
# build is faster and every run executes several times more inputs.
flags=(-O -s none)
targets=$(cargo fuzz list)
started=$(date +%s)
cargo fuzz build "${flags[@]}"
echo "fuzz: targets built in $(( $(date +%s) - started ))s"
for t in $targets; do
  work=$(mktemp -d)
  echo "fuzz: $t for ${secs}s (seeds: $(ls "corpus/$t" | wc -l))"
  if ! cargo fuzz run "${flags[@]}" "$t" "$work" "corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$work.log" 2>&1; then
    tail -n 60 "$work.log" >&2
    rm -rf "$work" "$work.log"
    echo "fuzz: $t FAILED (input in fuzz/artifacts/$t/; reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run ${flags[*]} $t fuzz/artifacts/$t/<file>)" >&2
    exit 1
  fi
  grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)|(INITED|DONE) +cov:" "$work.log" | tail -n 4
  echo "fuzz: $t ok: $(ls "$work" | wc -l) new inputs"
  rm -rf "$work" "$work.log"
done
