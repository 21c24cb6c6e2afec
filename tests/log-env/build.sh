#!/usr/bin/env bash
# Builds the real log server the Loki tests push to: victoria-logs
# (github.com/VictoriaMetrics/VictoriaLogs, see go.mod; Apache-2.0, accepts Loki's push
# API), once, into a cache outside the source tree keyed by go.mod, go.sum and the Go
# version (tests/go-env.sh). Prints the bin directory on stdout (the tests read it from
# HOMELAB_VLOGS_BIN, or run this script themselves).
#
#   tests/log-env/build.sh             # build if needed, print the bin dir
set -euo pipefail
cd "$(dirname "$0")"
. ../go-env.sh
build_into() {
  # CGO off (go_env): VictoriaMetrics' libraries fall back to pure-Go zstd.
  # -p 2: the CI machine has two cores.
  go build -p 2 -trimpath -ldflags='-s -w' -o "$1/victoria-logs" \
    github.com/VictoriaMetrics/VictoriaLogs/app/victoria-logs >&2
}
go_env log-env "go.mod go.sum" victoria-logs
