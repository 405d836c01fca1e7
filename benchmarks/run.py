"""Run the benchmark suites one after the other, then regenerate the results page.

    pip install ".[bench]"                               # the peers: torch (CPU), ANTsPy, FireANTs, icon_registration
    python benchmarks/run.py                             # every suite, full size (long on 2 cores)
    python benchmarks/run.py --quick                     # every suite, small; results in benchmarks/results/quick
    python benchmarks/run.py --suite kernels --suite compile
    python benchmarks/run.py --quick --suite amortized --out /tmp/bench

Suites, in this order: ``kernels``, ``pairwise``, ``population``, ``compile``, ``amortized``
(``benchmarks/<suite>.py``; ``--suite`` may be repeated, default all). Each suite runs as
its own Python process, so a crash costs that suite only; its tables stream to the
terminal and it writes ``<suite>.json`` and ``<suite>.md`` into ``--out`` (default
``benchmarks/results``, or ``benchmarks/results/quick`` with ``--quick`` so that quick
numbers never replace full ones). Afterwards ``benchmarks/report.py`` regenerates the page
from the JSON files in ``--out``: ``docs/benchmarks.md`` and ``docs/images/benchmarks/``
when ``--out`` is ``benchmarks/results``, else ``<out>/benchmarks.md`` and
``<out>/images/``. Peers that cannot be imported are rows that give the reason.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._paths import HERE, REPO, RESULTS, repo_env  # noqa: E402

SUITES = ("kernels", "pairwise", "population", "compile", "amortized")


def suite_command(name: str, out: str, quick: bool, peer_python: str | None) -> list[str]:
    """The command line of one suite, writing into ``out``."""
    script = os.path.join(HERE, f"{name}.py")
    command = [sys.executable, script] + (["--quick"] if quick else [])
    if name in ("kernels", "population"):  # these take the JSON path
        command += ["--out", os.path.join(out, f"{name}.json")]
    else:
        command += ["--out", out]
    if name == "population" and not quick:
        command += ["--large"]  # the counts: 1, 8, 32 and 128 pairs
    if name == "amortized" and peer_python:
        command += ["--peer-python", peer_python]
    return command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every suite's --quick (small sizes, few steps)")
    parser.add_argument("--suite", action="append", choices=SUITES, help="a suite to run (repeatable; default all)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results; quick: benchmarks/results/quick)")
    parser.add_argument("--peer-python", default=None, help="interpreter for the icon_registration peer (default: this one)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate the results page")
    args = parser.parse_args(argv)
    suites = [s for s in SUITES if s in (args.suite or SUITES)]
    out = os.path.abspath(args.out or (os.path.join(RESULTS, "quick") if args.quick else RESULTS))
    os.makedirs(out, exist_ok=True)
    env = repo_env()

    status = []
    for name in suites:
        command = suite_command(name, out, args.quick, args.peer_python)
        print(f"\n=== {name}: {' '.join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in command)}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(command, cwd=REPO, env=env).returncode
        status.append((name, code, time.perf_counter() - start))
        if code != 0:
            print(f"=== {name} failed (exit code {code}); going on with the next suite", file=sys.stderr, flush=True)

    if not args.no_report:
        if out == os.path.abspath(RESULTS):
            page, images = os.path.join(REPO, "docs", "benchmarks.md"), os.path.join(REPO, "docs", "images", "benchmarks")
        else:
            page, images = os.path.join(out, "benchmarks.md"), os.path.join(out, "images")
        code = subprocess.run([sys.executable, os.path.join(HERE, "report.py"), "--results", out, "--page", page,
                               "--images", images], cwd=REPO, env=env).returncode
        status.append(("report", code, None))

    print("\n=== summary", flush=True)
    for name, code, seconds in status:
        took = "" if seconds is None else f" in {seconds:.0f} s"
        print(f"  {name:12s} {'ok' if code == 0 else f'FAILED (exit code {code})'}{took}", flush=True)
    return 0 if all(code == 0 for _, code, _ in status) else 1


if __name__ == "__main__":
    sys.exit(main())
