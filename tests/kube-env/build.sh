#!/usr/bin/env bash
# Builds the real control plane the Kubernetes tests run: kube-apiserver,
# kube-controller-manager and kubectl (k8s.io/kubernetes, see go.mod) and etcd (the
# version in the same module graph), once, into a cache outside the source tree keyed by go.mod, go.sum
# and the Go version. Prints the bin directory on stdout (the tests read it from
# HOMELAB_KUBE_BIN, or run this script themselves).
#
#   tests/kube-env/build.sh            # build if needed, print the bin dir
#   HOMELAB_AGENT_CACHE=DIR ...        # cache root (default: ~/.cache/homelab-agent)
set -euo pipefail
cd "$(dirname "$0")"
command -v go >/dev/null 2>&1 || { echo "kube-env/build.sh: Go is not installed (needed to build the test control plane)" >&2; exit 1; }
key=$( { cat go.mod go.sum etcd/main.go; go version; } | sha256sum | cut -c1-16)
cache=${HOMELAB_AGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/homelab-agent}
out="$cache/kube-env/$key"
BINARIES=(kube-apiserver kube-controller-manager kubectl etcd)
complete() { for b in "${BINARIES[@]}"; do [ -x "$1/$b" ] || return 1; done; }
if complete "$out/bin"; then
  echo "$out/bin"
  exit 0
fi
mkdir -p "$out"
tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
export CGO_ENABLED=0 GOFLAGS=-mod=mod
# -p 2: the CI machine has two cores; more parallel links only swap memory.
go build -p 2 -trimpath -ldflags='-s -w' -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kubectl >&2
go build -p 2 -trimpath -ldflags='-s -w' -o "$tmp/etcd" ./etcd >&2
complete "$tmp" || { echo "kube-env/build.sh: a binary is missing after the build" >&2; exit 1; }
rm -rf "$out/bin"
mv "$tmp" "$out/bin"
trap - EXIT
echo "kube-env/build.sh: built in $(( $(date +%s) - start )) s: $(du -sh "$out/bin" | cut -f1) in $out/bin" >&2
echo "$out/bin"
