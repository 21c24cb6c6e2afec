#!/usr/bin/env python3
"""How fast the release `agent` refuses hostile desired state.

The tests (tests/tests/hostile_parse.rs, hostile_source.rs, invalid_corpus.rs)
check that each hostile input is refused with file:line, changes nothing and
stays within 200 MB of peak memory; a command that never ends fails them. How
fast the refusal comes is a performance target, measured here instead of
asserted there (a wall-clock bound in a test fails when the machine is busy):

  every case below, `agent validate` and `agent plan`: at most 2 s (max over runs)

Cases: the committed hostile fixtures of the invalid corpus (tests/fixtures/
invalid/40-59), and the inputs too big to commit, generated as hostile_parse.rs
does (a 5 MiB host file, 500,000 keys, 1,000,000 levels of nesting).

Python 3.11 standard library only; reuses bench.py's spawn-and-wait4 `run`.
Run from the repository root:

    python3 bench/refusals.py [--runs 3] [--no-build] [--json] [--agent PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (beside this file)

TARGET_MS = 2000.0
TARGET_RSS_MB = 200.0
MODULE = 'description: "one file"\nresources:\n  - file: /srv/app/x.conf\n    content: "x\\n"\n'


def generated(base: Path) -> dict[str, Path]:
    """The hostile_parse.rs inputs too big to commit, as repositories."""

    def repo(name: str, host_extra: str) -> Path:
        r = base / name
        (r / "hosts").mkdir(parents=True)
        (r / "modules/app").mkdir(parents=True)
        (r / "hosts/lab.yaml").write_text(
            "platform: linux\nroots:\n  - /srv/app\nmodules:\n  - name: app\n" + host_extra
        )
        (r / "modules/app/module.yaml").write_text(MODULE)
        return r

    def keys(n: int) -> str:
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"

        def b36(i: int) -> str:
            s = ""
            while True:
                s = digits[i % 36] + s
                i //= 36
                if i == 0:
                    return s

        return "vars: {" + "".join(f"k{b36(i)}, " for i in range(n)) + "}\n"

    return {
        "host file of 5 MiB": repo("big", 'description: "' + "x" * (5 << 20) + '"\n'),
        "host file with 500,000 keys": repo("keys", keys(500_000)),
        "1,000,000 levels of nesting": repo(
            "deep", "vars:\n  deep: \n    " + "- " * 1_000_000 + "x\n"
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--agent", default=str(bench.AGENT), help="the binary (default: the release one)")
    a = ap.parse_args()
    if not a.no_build and a.agent == str(bench.AGENT):
        subprocess.run(
            ["cargo", "build", "--release", "-q", "-p", "homelab-agent", "--bin", "agent"],
            cwd=bench.REPO_ROOT,
            check=True,
        )
    agent = str(Path(a.agent).resolve())
    corpus = bench.REPO_ROOT / "tests/fixtures/invalid"
    results = []
    with tempfile.TemporaryDirectory(prefix="hla-refusals-") as tmp:
        base = Path(tmp)
        root = base / "root"
        root.mkdir()
        logs = base / "logs"
        logs.mkdir()
        cases = {
            p.name: p for p in sorted(corpus.iterdir()) if "40" <= p.name < "60"
        }
        cases.update(generated(base / "gen"))
        for name, repo in cases.items():
            for cmd in ("validate", "plan"):
                args = [agent, cmd, "--repo", str(repo), "--host", "lab"]
                if cmd == "plan":
                    args += ["--root", str(root)]
                times, rss = [], []
                for i in range(a.runs):
                    r = bench.run(args, logs, f"{len(results)}-{i}")
                    if r.code != 1:
                        raise bench.BenchError(
                            f"{name}: agent {cmd} exited {r.code}, not 1 (refused):\n{r.stderr}"
                        )
                    times.append(r.wall_ms)
                    rss.append(r.rss_kib / 1024)
                results.append(
                    {
                        "case": name,
                        "command": cmd,
                        "median_ms": statistics.median(times),
                        "max_ms": max(times),
                        "max_rss_mb": max(rss),
                    }
                )
                bench.log(f"{name:<36} {cmd:<8} {max(times):8.0f} ms {max(rss):7.1f} MB")
    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"| case | command | median ms | max ms (≤ {TARGET_MS:.0f}) | peak RSS MB (≤ {TARGET_RSS_MB:.0f}) |")
    print("|---|---|---|---|---|")
    for r in results:
        ok_t = "✓" if r["max_ms"] <= TARGET_MS else "✗"
        ok_m = "✓" if r["max_rss_mb"] <= TARGET_RSS_MB else "✗"
        print(
            f"| {r['case']} | {r['command']} | {r['median_ms']:.0f} | {r['max_ms']:.0f} {ok_t} | {r['max_rss_mb']:.1f} {ok_m} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
