#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (not part of CI).
#
#   fuzz/run.sh [SECONDS] [TARGET...]     default: 600 seconds, every target
#
# FUZZ_ARGS adds libFuzzer flags, e.g. FUZZ_ARGS=-len_control=0 to try long
# inputs (up to 64 KiB) from the start.
#
# Targets: yaml (the YAML reader), desired (the desired-state loader on a
# generated repository). Builds with libFuzzer coverage instrumentation on
# stable Rust (the flags cargo-fuzz uses, without a sanitizer: the code under
# test is safe Rust, so a crash is a panic, a timeout or a memory blow-up),
# seeds each corpus from the repository (reference files and the invalid
# corpus), and runs with a 5 s timeout per input and a 512 MB RSS limit.
# Findings land in fuzz/artifacts/<target>/; replay one with
#   fuzz/target/<triple>/release/<target> fuzz/artifacts/<target>/<file>
# `cargo fuzz run <target>` works as well, with cargo-fuzz installed.
set -euo pipefail

seconds=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(yaml desired)

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cd "$here"

# The same dependency versions as the agent itself.
[ -f Cargo.lock ] || cp "$repo/Cargo.lock" Cargo.lock

triple=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps these flags off build scripts and proc macros.
RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares" \
    nice -n 10 cargo build --release --target "$triple" --bins

seed_yaml() {
    mkdir -p corpus/yaml
    find "$repo/hosts" "$repo/modules" "$repo/k8s" "$repo/dashboards" "$repo/tests/fixtures" \
        -name '*.yaml' -size -64k | while read -r f; do
        cp "$f" "corpus/yaml/$(sha1sum < "$f" | cut -c1-16)"
    done
}

# A repository as the desired target reads it: host, module, template,
# stack, manifest, separated by NUL bytes.
seed_desired() {
    mkdir -p corpus/desired
    for dir in "$repo"/tests/fixtures/invalid/*/; do
        out="corpus/desired/$(basename "$dir")"
        # (A fixture without a stack or templates leaves its part empty.)
        {
            cat "$dir/hosts/lab.yaml" 2>/dev/null || true; printf '\0'
            cat "$dir/modules/app/module.yaml" 2>/dev/null || true; printf '\0'
            { cat "$dir"/modules/app/templates/*.j2 2>/dev/null || true; } | head -c 4096; printf '\0'
            cat "$dir"/k8s/*/stack.yaml 2>/dev/null || true; printf '\0'
            { cat "$dir"/k8s/*/[!s]*.yaml 2>/dev/null || true; } | head -c 4096
        } > "$out"
    done
    # Secrets, includes and a stack, for the leak check and the stack path.
    printf '%s\0%s\0%s\0%s\0%s' \
        "$(printf 'platform: linux\nroots: [/srv]\nmodules: [{name: app}]\nstacks: [{name: web}]\nvars: {a: 1}\n')" \
        "$(printf 'resources:\n  - file: /srv/x\n    template: x.conf.j2\n  - file: /srv/y\n    content: "{{ secret(\x27op://v/i/f\x27) }}"\n')" \
        "$(printf '{%% include secret("op://v/i/f") %%}\n{%% macro m(a) %%}{{ a.b }}{%% endmacro %%}{{ m(secret("op://v/i/f")) }}\n')" \
        "$(printf 'namespace: web\n')" \
        "$(printf 'apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData:\n  k: "{{ secret(\x27op://v/i/f\x27) | int }}"\n')" \
        > corpus/desired/secrets
}

status=0
for t in "${targets[@]}"; do
    "seed_$t"
    mkdir -p "artifacts/$t"
    echo "== $t: ${seconds}s"
    nice -n 10 "target/$triple/release/$t" "corpus/$t" \
        -dict="$here/$t.dict" \
        -max_total_time="$seconds" -timeout=5 -rss_limit_mb=512 -max_len=65536 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" ${FUZZ_ARGS:-} || status=$?
done
exit $status
