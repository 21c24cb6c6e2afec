#!/usr/bin/env bash
# The whole test suite, from a fresh machine (Debian/Ubuntu with the Rust toolchain and Go):
# installs what the tests need when it is missing (apt packages, a venv, the Kubernetes
# control plane and VictoriaLogs built once into ~/.cache/homelab-agent/), then runs
# rustfmt, clippy and every test. Idempotent: a second run installs nothing and reuses the
# builds. README.md opens with this command, and CI (.ci/run) runs exactly it.
# Arguments are passed to `cargo test` (e.g. `scripts/test.sh -p homelab-agent --lib`);
# without them it tests the whole workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never

# Real tools the end-to-end tests drive, each started by the tests themselves on free
# loopback ports (system services the packages may start are not used):
# - lighttpd + git-http-backend: a real git smart-HTTP server (tests/src/git_server.rs);
#   ssh-keygen for SSH-signed commits;
# - systemd-nspawn + debootstrap: a real systemd as PID 1 in a throwaway container
#   (tests/src/nspawn.rs debootstraps a Debian tree once into /var/tmp/homelab-agent-nspawn,
#   ~40 s and ~40 MB from apt's mirror, then boots in under a second);
# - caddy, nginx-light, borgmatic, borgbackup, PostgreSQL 15, python3: the tools the
#   reference modules configure (tests/tests/real_tools.rs, tests/tests/validate.rs), and
#   GinFlix's nginx site and Caddyfile run for real (tests/tests/k8s_manifests.rs);
# - prometheus + promtool: scrapes the daemon, checks rules and metrics (tests/src/prometheus.rs).
# apt is skipped when everything is already there (idempotent).
# - openssl: the certificates of the test Kubernetes control plane (tests/src/kube_env.rs);
# - time: /usr/bin/time measures the agent's peak memory on hostile input
#   (homelab_agent_tests::measure_agent);
# - curl: reads VictoriaLogs back inside the nspawn container's network
#   (tests/tests/loki_rollback.rs).
PACKAGES=(lighttpd git openssh-client systemd-container debootstrap
  caddy nginx-light borgmatic borgbackup postgresql-15 python3 prometheus openssl time curl)
have_tools() {
  { command -v lighttpd || [ -x /usr/sbin/lighttpd ]; } >/dev/null 2>&1 &&
    command -v git >/dev/null 2>&1 &&
    [ -x "$(git --exec-path)/git-http-backend" ] &&
    command -v ssh-keygen >/dev/null 2>&1 &&
    command -v systemd-nspawn >/dev/null 2>&1 &&
    { command -v debootstrap || [ -x /usr/sbin/debootstrap ]; } >/dev/null 2>&1 &&
    command -v caddy >/dev/null 2>&1 &&
    { command -v nginx || [ -x /usr/sbin/nginx ]; } >/dev/null 2>&1 &&
    command -v borgmatic >/dev/null 2>&1 &&
    command -v validate-borgmatic-config >/dev/null 2>&1 &&
    command -v borg >/dev/null 2>&1 &&
    [ -x /usr/lib/postgresql/15/bin/initdb ] &&
    command -v runuser >/dev/null 2>&1 &&
    command -v python3 >/dev/null 2>&1 &&
    command -v prometheus >/dev/null 2>&1 &&
    command -v promtool >/dev/null 2>&1 &&
    command -v openssl >/dev/null 2>&1 &&
    [ -x /usr/bin/time ] &&
    command -v curl >/dev/null 2>&1
}
if ! have_tools; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "scripts/test.sh: need root (or sudo) to apt-get install ${PACKAGES[*]}" >&2; exit 1; }
    SUDO="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null
  have_tools || { echo "scripts/test.sh: a test tool is still missing after apt-get install ${PACKAGES[*]}" >&2; exit 1; }
fi

# kubernetes-validate (PyPI) checks every manifest in k8s/ against the Kubernetes
# schemas (tests/tests/k8s_manifests.rs). Installed once into a venv under target/.
KV_VENV=target/kubernetes-validate-venv
if [ ! -x "$KV_VENV/bin/kubernetes-validate" ]; then
  if ! python3 -m venv "$KV_VENV" >/dev/null 2>&1; then
    rm -rf "$KV_VENV"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q --no-install-recommends python3-venv python3-pip >/dev/null
    python3 -m venv "$KV_VENV"
  fi
  "$KV_VENV/bin/pip" install -q --disable-pip-version-check kubernetes-validate==1.37.0
fi

# The real Kubernetes control plane the stack tests run (tests/kube-env/): kube-apiserver,
# kube-controller-manager and kubectl v1.37.2 and etcd, built with Go from the Go module
# proxy once into ~/.cache/homelab-agent/kube-env/<hash of go.sum> (cold: ~16 min on two
# cores, 300 MB; warm: instant).
# Go itself is the one prerequisite not installed here: Debian's golang-go (1.19) is older
# than the go.mod files need (1.26), and a toolchain from go.dev needs a checksum to trust.
command -v go >/dev/null 2>&1 || { echo "scripts/test.sh: Go is not installed: the Kubernetes tests need Go 1.26 or newer to build their control plane (tests/kube-env/build.sh); install it from https://go.dev/dl/ and run this again" >&2; exit 1; }
HOMELAB_KUBE_BIN=$(tests/kube-env/build.sh)
export HOMELAB_KUBE_BIN

# The real log server the Loki tests push to (tests/log-env/): VictoriaLogs v1.52.2
# (Apache-2.0; accepts Loki's push API, queried back with LogsQL), built the same way into
# ~/.cache/homelab-agent/log-env/<hash of go.sum> (cold: ~50 s on two cores with an empty Go build cache, 15 MB; warm:
# instant).
HOMELAB_VLOGS_BIN=$(tests/log-env/build.sh)
export HOMELAB_VLOGS_BIN

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings

# The release artifacts (scripts/release.sh): the portable Linux binary (cargo-zigbuild,
# glibc 2.17), the .deb, completions, man pages and SHA256SUMS, which tests/tests/release.rs
# checks (a missing one fails it). ziglang and cargo-zigbuild (PyPI) and cargo-deb
# (crates.io), pinned, are installed once into ~/.cache/homelab-agent/release-tools/; the
# release build directory is kept in ~/.cache/homelab-agent/release-target, so a later run
# rebuilds only the workspace's crates (timings in README.md, "Releases").
export HOMELAB_DIST="$PWD/target/dist"
HOMELAB_RELEASE_TARGET_DIR="$HOME/.cache/homelab-agent/release-target" bash scripts/release.sh >/dev/null

if [ "$#" -eq 0 ]; then
  cargo test --workspace
else
  cargo test "$@"
fi
