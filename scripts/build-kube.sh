#!/usr/bin/env bash
# Builds the real Kubernetes binaries the e2e tests run -- kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl and etcd --
# from the Go module proxy, through the wrapper module in tests/kube (see docs/testing-kube.md).
#
# Output: $FEDGATE_KUBE_BIN_DIR, default ~/.cache/fedgate/kube/<k8s version>/bin/{kube-apiserver,
# kube-controller-manager,kube-scheduler,etcd,kubectl,helm,fedgate-vnode}
# (helm from its own module, tests/kube/helm, for the deploy tests' `helm lint`/`helm template`;
# fedgate-vnode, the test clusters' virtual-kubelet node, from tests/kube/vnode).
# Idempotent: stamps (hash of go.mod, go.sum, this script and the Go version) next to the binaries
# makes a warm run return at once; after a change the Go build cache makes the rebuild incremental.
# A cold build compiles ~2,750 packages for Kubernetes and etcd (about 13 minutes on 2 cores), then
# helm and fedgate-vnode (a few minutes more). Progress is printed.
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$self")/.."
repo=$(pwd)
mod_dir="$repo/tests/kube"

log() { printf 'build-kube: %s\n' "$*"; }
die() { printf 'build-kube: error: %s\n' "$*" >&2; exit 1; }

# The official Go install's usual place, for shells whose PATH lacks it.
command -v go >/dev/null 2>&1 || [ ! -x /usr/local/go/bin/go ] || PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null 2>&1 || die "go not found on PATH (install Go >= 1.26 from go.dev or the distribution)"
[ -f "$mod_dir/go.mod" ] || die "missing $mod_dir/go.mod"

# Versions come from the wrapper module, the single source of truth.
kube_version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$mod_dir/go.mod")
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ { print $2; exit }' "$mod_dir/go.mod")
[ -n "$kube_version" ] || die "no k8s.io/kubernetes requirement in $mod_dir/go.mod"
[ -n "$etcd_version" ] || die "no go.etcd.io/etcd/server/v3 requirement in $mod_dir/go.mod"

cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/fedgate/kube
bin_dir=${FEDGATE_KUBE_BIN_DIR:-$cache_root/$kube_version/bin}
binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd)

# The version ldflags kube's own build (hack/lib/version.sh) sets: without them the binaries
# report v0.0.0-master and kubectl warns about version skew.
minor=${kube_version#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

helm_dir="$mod_dir/helm"
helm_version=$(awk '$1 == "helm.sh/helm/v3" && $2 ~ /^v/ { print $2; exit }' "$helm_dir/go.mod")
[ -n "$helm_version" ] || die "no helm.sh/helm/v3 requirement in $helm_dir/go.mod"
# As helm's Makefile: the Kubernetes version `helm template`/`helm lint` assume by default is
# that of the client-go helm is built with.
helm_k8s_minor=$(awk '$1 == "k8s.io/client-go" { v = $2; sub(/^v0\./, "", v); sub(/\..*/, "", v); print v; exit }' "$helm_dir/go.mod")
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$helm_k8s_minor"
done

go_version=$(go env GOVERSION)
stamp_of() { cat "$1/go.mod" "$1/go.sum" "$self" <(echo "$go_version $2") | sha256sum | cut -d' ' -f1; }
kube_stamp=$(stamp_of "$mod_dir" "$ldflags")
helm_stamp=$(stamp_of "$helm_dir" "$helm_ldflags")
# fedgate-vnode, the test clusters' node (pods as host processes), from its own module
# tests/kube/vnode: the stamp covers its Go sources as well.
vnode_dir="$mod_dir/vnode"
vnode_ldflags="-s -w"
vnode_stamp=$(cat "$vnode_dir"/*.go <(stamp_of "$vnode_dir" "$vnode_ldflags") | sha256sum | cut -d' ' -f1)

# up_to_date <stamp file> <stamp> <binaries...>
up_to_date() {
  local file=$1 want=$2
  shift 2
  [ -f "$bin_dir/$file" ] && [ "$(cat "$bin_dir/$file")" = "$want" ] || return 1
  for b in "$@"; do [ -x "$bin_dir/$b" ] || return 1; done
}

# One build at a time per output directory: a second run waits, then finds it up to date.
mkdir -p "$bin_dir"
exec 9>"$bin_dir/.lock"
flock 9 || die "cannot lock $bin_dir/.lock"

kube_ok=0 helm_ok=0 vnode_ok=0
up_to_date .stamp-kube "$kube_stamp" "${binaries[@]}" && kube_ok=1
up_to_date .stamp-helm "$helm_stamp" helm && helm_ok=1
up_to_date .stamp-vnode "$vnode_stamp" fedgate-vnode && vnode_ok=1
if [ $kube_ok = 1 ] && [ $helm_ok = 1 ] && [ $vnode_ok = 1 ]; then
  log "up to date: kube-apiserver/controller-manager/scheduler/kubectl $kube_version, etcd $etcd_version, helm $helm_version, fedgate-vnode in $bin_dir"
  exit 0
fi

out=$(mktemp -d "$bin_dir/.build.XXXXXX")
trap 'rm -rf "$out"' EXIT
export CGO_ENABLED=0
export GOFLAGS="-mod=readonly -buildvcs=false"

# compile <module dir> <ldflags> <packages...>: one `go build` into $out. `go build -v` names each
# package as it is compiled; they are counted as progress. One invocation per module shares the
# package graph and keeps both cores busy.
compile() {
  local dir=$1 flags=$2
  shift 2
  (
    cd "$dir"
    log "downloading modules of $(basename "$dir") (cached in $(go env GOMODCACHE))"
    go mod download
    local total start status
    total=$(go list -deps "$@" | wc -l)
    start=$(date +%s)
    log "compiling up to $total packages (only changed ones are recompiled)"
    set +e
    nice -n 10 go build -v -trimpath -ldflags "$flags" -o "$out/" "$@" 2>&1 |
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
    [ "$status" -eq 0 ] || die "go build in $dir failed (exit $status); output above"
    log "compiled in $(( $(date +%s) - start ))s"
  )
}

if [ $kube_ok = 0 ]; then
  log "building kube-apiserver, -controller-manager, -scheduler, kubectl $kube_version and etcd $etcd_version with $go_version into $bin_dir"
  log "(a cold build compiles ~2,750 packages, about 13 minutes on 2 cores; re-runs are incremental)"
  compile "$mod_dir" "$ldflags" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/server/v3
  # The etcd server module root is etcd's main package: go names its binary after the module
  # ("v3" suffix dropped), i.e. "server".
  mv "$out/server" "$out/etcd"
  for b in "${binaries[@]}"; do
    [ -x "$out/$b" ] || die "go build produced no $b"
    mv -f "$out/$b" "$bin_dir/$b"
  done
  echo "$kube_stamp" > "$bin_dir/.stamp-kube"
  "$bin_dir/kube-apiserver" --version
  "$bin_dir/etcd" --version | sed -n 1p # reads all: head would SIGPIPE etcd (pipefail)
fi

if [ $helm_ok = 0 ]; then
  log "building helm $helm_version (module tests/kube/helm) into $bin_dir"
  compile "$helm_dir" "$helm_ldflags" helm.sh/helm/v3/cmd/helm
  [ -x "$out/helm" ] || die "go build produced no helm"
  mv -f "$out/helm" "$bin_dir/helm"
  echo "$helm_stamp" > "$bin_dir/.stamp-helm"
  "$bin_dir/helm" version --short
fi
if [ $vnode_ok = 0 ]; then
  log "building fedgate-vnode (module tests/kube/vnode, virtual-kubelet) into $bin_dir"
  compile "$vnode_dir" "$vnode_ldflags" .
  [ -x "$out/vnode" ] || die "go build produced no vnode"
  mv -f "$out/vnode" "$bin_dir/fedgate-vnode"
  echo "$vnode_stamp" > "$bin_dir/.stamp-vnode"
fi
log "done: $(cd "$bin_dir" && ls -1 "${binaries[@]}" helm fedgate-vnode | tr '\n' ' ')"
