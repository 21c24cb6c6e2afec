# Sourced by tests/kube-env/build.sh and tests/log-env/build.sh: builds a test
# environment's Go binaries once into a cache outside the source tree, keyed by the
# files that pin them and the Go version, and prints the bin directory on stdout.
#
#   go_env NAME "KEY FILES" BINARY...   # the caller defines build_into DIR
#   HOMELAB_AGENT_CACHE=DIR             # cache root (default: ~/.cache/homelab-agent)
go_env() {
  local name=$1 keyfiles=$2
  shift 2
  local binaries=("$@")
  command -v go >/dev/null 2>&1 || { echo "$name/build.sh: Go is not installed (needed to build the tests' $name servers)" >&2; exit 1; }
  local key
  # shellcheck disable=SC2086 # the key files are a word list
  key=$( { cat $keyfiles; go version; } | sha256sum | cut -c1-16)
  local cache=${HOMELAB_AGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/homelab-agent}
  local out="$cache/$name/$key"
  complete() { local b; for b in "${binaries[@]}"; do [ -x "$1/$b" ] || return 1; done; }
  if complete "$out/bin"; then
    echo "$out/bin"
    return 0
  fi
  mkdir -p "$out"
  GO_ENV_TMP=$(mktemp -d "$out/.build.XXXXXX")
  trap 'rm -rf "$GO_ENV_TMP"' EXIT
  local start
  start=$(date +%s)
  export CGO_ENABLED=0 GOFLAGS=-mod=mod
  build_into "$GO_ENV_TMP"
  complete "$GO_ENV_TMP" || { echo "$name/build.sh: a binary is missing after the build" >&2; exit 1; }
  rm -rf "$out/bin"
  mv "$GO_ENV_TMP" "$out/bin"
  trap - EXIT
  echo "$name/build.sh: built in $(( $(date +%s) - start )) s: $(du -sh "$out/bin" | cut -f1) in $out/bin" >&2
  echo "$out/bin"
}
