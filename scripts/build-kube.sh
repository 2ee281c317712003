#!/usr/bin/env bash
# Builds the real Kubernetes binaries the e2e tests run -- kube-apiserver, kubectl and etcd --
# from the Go module proxy, through the wrapper module in tests/kube (see docs/testing-kube.md).
#
# Output: $FEDGATE_KUBE_BIN_DIR, default ~/.cache/fedgate/kube/<k8s version>/bin/{kube-apiserver,etcd,kubectl}
# Idempotent: a stamp (hash of go.mod, go.sum, this script and the Go version) next to the binaries
# makes a warm run return at once; after a change the Go build cache makes the rebuild incremental.
# A cold build compiles ~2,400 packages: about 11 minutes on 2 cores. Progress is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
mod_dir="$repo/tests/kube"

log() { printf 'build-kube: %s\n' "$*"; }
die() { printf 'build-kube: error: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "go not found on PATH (install Go >= 1.26 from go.dev or the distribution)"
[ -f "$mod_dir/go.mod" ] || die "missing $mod_dir/go.mod"

# Versions come from the wrapper module, the single source of truth.
kube_version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$mod_dir/go.mod")
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ { print $2; exit }' "$mod_dir/go.mod")
[ -n "$kube_version" ] || die "no k8s.io/kubernetes requirement in $mod_dir/go.mod"
[ -n "$etcd_version" ] || die "no go.etcd.io/etcd/server/v3 requirement in $mod_dir/go.mod"

cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/fedgate/kube
bin_dir=${FEDGATE_KUBE_BIN_DIR:-$cache_root/$kube_version/bin}
binaries=(kube-apiserver kubectl etcd)

# The version ldflags kube's own build (hack/lib/version.sh) sets: without them the binaries
# report v0.0.0-master and kubectl warns about version skew.
minor=${kube_version#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

go_version=$(go env GOVERSION)
stamp=$(cat "$mod_dir/go.mod" "$mod_dir/go.sum" "$0" <(echo "$go_version $ldflags") | sha256sum | cut -d' ' -f1)
stamp_file="$bin_dir/.stamp"

up_to_date() {
  [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] || return 1
  for b in "${binaries[@]}"; do [ -x "$bin_dir/$b" ] || return 1; done
}

if up_to_date; then
  log "up to date: kube-apiserver/kubectl $kube_version, etcd $etcd_version in $bin_dir"
  exit 0
fi

log "building kube-apiserver + kubectl $kube_version and etcd $etcd_version with $go_version into $bin_dir"
log "(a cold build compiles ~2,400 packages, about 11 minutes on 2 cores; re-runs are incremental)"
mkdir -p "$bin_dir"
out=$(mktemp -d "$bin_dir/.build.XXXXXX")
trap 'rm -rf "$out"' EXIT

cd "$mod_dir"
export CGO_ENABLED=0
export GOFLAGS="-mod=readonly -buildvcs=false"

pkgs=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/server/v3)
log "downloading modules (cached in $(go env GOMODCACHE))"
go mod download
total=$(go list -deps "${pkgs[@]}" | wc -l)
log "compiling up to $total packages (only changed ones are recompiled)"

start=$(date +%s)
# `go build -v` names each package as it is compiled; count them as progress. One invocation for
# all three commands shares the package graph and keeps both cores busy.
set +e
nice -n 10 go build -v -trimpath -ldflags "$ldflags" -o "$out/" "${pkgs[@]}" 2>&1 |
  awk -v total="$total" -v start="$start" '
    /^[a-z0-9.-]+(\/[^ ]*)?$/ && !/:/ {
      n++
      if (n % 100 == 0) {
        cmd = "date +%s"; cmd | getline now; close(cmd)
        printf "build-kube: compiled %d/%d packages (%ds)\n", n, total, now - start
        fflush()
      }
      next
    }
    { print; fflush() }'
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || die "go build failed (exit $status); output above"

# The etcd server module root is etcd's main package: go names its binary after the module ("v3"
# suffix dropped), i.e. "server".
mv "$out/server" "$out/etcd"
for b in "${binaries[@]}"; do
  [ -x "$out/$b" ] || die "go build produced no $b"
  mv -f "$out/$b" "$bin_dir/$b"
done
echo "$stamp" > "$stamp_file"
log "done in $(( $(date +%s) - start ))s: $(cd "$bin_dir" && ls -1 "${binaries[@]}" | tr '\n' ' ')"
"$bin_dir/kube-apiserver" --version
"$bin_dir/etcd" --version | head -1
