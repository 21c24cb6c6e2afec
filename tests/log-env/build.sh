#!/usr/bin/env bash
# Builds the real log server the Loki tests push to: victoria-logs
# (github.com/VictoriaMetrics/VictoriaLogs, see go.mod; Apache-2.0, accepts Loki's push
# API), once, into a cache outside the source tree keyed by go.mod, go.sum and the Go
# version, like tests/kube-env/build.sh. Prints the bin directory on stdout (the tests
# read it from HOMELAB_VLOGS_BIN, or run this script themselves).
#
#   tests/log-env/build.sh             # build if needed, print the bin dir
#   HOMELAB_AGENT_CACHE=DIR ...        # cache root (default: ~/.cache/homelab-agent)
set -euo pipefail
cd "$(dirname "$0")"
command -v go >/dev/null 2>&1 || { echo "log-env/build.sh: Go is not installed (needed to build the test log server)" >&2; exit 1; }
key=$( { cat go.mod go.sum; go version; } | sha256sum | cut -c1-16)
cache=${HOMELAB_AGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/homelab-agent}
out="$cache/log-env/$key"
BINARIES=(victoria-logs)
complete() { for b in "${BINARIES[@]}"; do [ -x "$1/$b" ] || return 1; done; }
if complete "$out/bin"; then
  echo "$out/bin"
  exit 0
fi
mkdir -p "$out"
tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
# CGO_ENABLED=0: VictoriaMetrics' libraries fall back to pure-Go zstd.
export CGO_ENABLED=0 GOFLAGS=-mod=mod
# -p 2: the CI machine has two cores.
go build -p 2 -trimpath -ldflags='-s -w' -o "$tmp/victoria-logs" \
  github.com/VictoriaMetrics/VictoriaLogs/app/victoria-logs >&2
complete "$tmp" || { echo "log-env/build.sh: a binary is missing after the build" >&2; exit 1; }
rm -rf "$out/bin"
mv "$tmp" "$out/bin"
trap - EXIT
echo "log-env/build.sh: built in $(( $(date +%s) - start )) s: $(du -sh "$out/bin" | cut -f1) in $out/bin" >&2
echo "$out/bin"
