#!/usr/bin/env bash
# Builds the real control plane the Kubernetes tests run: kube-apiserver,
# kube-controller-manager and kubectl (k8s.io/kubernetes, see go.mod) and etcd (the
# version in the same module graph), once, into a cache outside the source tree keyed by
# go.mod, go.sum, etcd/main.go and the Go version (tests/go-env.sh). Prints the bin
# directory on stdout (the tests read it from HOMELAB_KUBE_BIN, or run this script).
#
#   tests/kube-env/build.sh            # build if needed, print the bin dir
set -euo pipefail
cd "$(dirname "$0")"
. ../go-env.sh
build_into() {
  # -p 2: the CI machine has two cores; more parallel links only swap memory.
  go build -p 2 -trimpath -ldflags='-s -w' -o "$1/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl >&2
  go build -p 2 -trimpath -ldflags='-s -w' -o "$1/etcd" ./etcd >&2
}
go_env kube-env "go.mod go.sum etcd/main.go" kube-apiserver kube-controller-manager kubectl etcd
