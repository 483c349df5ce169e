"""Where a session's start-up goes: `stemstream demo --timings` run N times, each in a fresh process with a
fresh output directory (its embedded Prefect database new, seeded as below), and the
median of each phase of its timeline (flows/timeline_phases.py, from the session's logs/timeline.json).

Also measured from outside: the command's wall time (its exit included; "after the exit mark" is what
follows the timeline's last mark: interpreter shutdown and the exit hooks that run after it).

A new output directory's Prefect database is copied from a template migrated once per user and Prefect
version (flows/session_prefect.py, in $XDG_CACHE_HOME or ~/.cache): by default the runs use this user's, so
only a machine's very first session migrates; --fresh-cache gives every run an empty cache of its own (a new
user's first session: the migrations run, and the run keeps the template).

With --baseline DIR (a checkout of another commit, e.g. `git worktree add DIR HEAD~1`), every run is a
pair: the baseline's `stemstream demo` (DIR first on PYTHONPATH, its node and aggregator processes too) then
this tree's, one after the other, so that both meet the same load; both medians are printed side by side.

With --reuse every run shares one output directory: the first run creates the embedded Prefect server's
database, the later ones find it (a user's second session); the median is then of runs 2..N.

Usage: python benchmarks/bench_startup.py [--runs 2] [--scans 3] [--scan 64x64] [--no-postprocess]
       [--reuse] [--fresh-cache] [--baseline DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.timeline import load_timeline  # noqa: E402
from flows.timeline_phases import phases  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLI = [sys.executable, "-m", "flows.cli"]
# Targets of issue 22, shown beside the figures they bound.
TARGETS = {
    "total": "demo <= 30 s",
    "start -> ready:": "<= 5 s",
    "node: start -> joined": "<= 2 s",
}


def one_run(work: Path, args: argparse.Namespace, code: Path | None = None) -> dict:
    """One `stemstream demo --timings` in its own process and directory: its phases and wall time; with
    ``code``, that checkout's stemstream instead of this one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEMSTREAM_", "PREFECT_"))}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code.resolve()), *filter(None, [env.get("PYTHONPATH")])])
    env |= {"STEMSTREAM_OUTPUT_DIR": str(work / "out"), "STEMSTREAM_CONFIG": str(work / "none.toml")}
    if args.fresh_cache:
        env["XDG_CACHE_HOME"] = str(work / f"cache-{time.time_ns()}")
    (work / "none.toml").write_text("")
    argv = [*CLI, "demo", "--timings", "--scans", str(args.scans), "--scan", args.scan]
    argv += [] if args.postprocess else ["--no-postprocess"]
    t0 = time.time()
    done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.time() - t0
    if done.returncode != 0:
        raise RuntimeError(f"demo exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    files = [f for f in (work / "out" / "sessions").glob("*/logs/timeline.json") if f.stat().st_mtime >= t0]
    if len(files) != 1:
        raise RuntimeError(f"expected one new timeline.json, found {files}")
    timeline = load_timeline(files[0])
    got = dict(phases(timeline))
    got["after the exit mark"] = t0 + wall - max(m.wall for m in timeline.marks)
    got["wall (outside)"] = wall
    return got


def run_all(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """This tree's runs and, with --baseline, the baseline's, each run just before its pair."""
    runs: list[dict] = []
    base: list[dict] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-startup-") as shared,
        tempfile.TemporaryDirectory(prefix="bench-startup-base-") as shared_base,
    ):
        for i in range(args.runs):
            for code, into, where in ((args.baseline, base, shared_base), (None, runs, shared)):
                if into is base and code is None:
                    continue
                with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
                    into.append(one_run(Path(where if args.reuse else tmp), args, code))
                what = "baseline run" if into is base else "run"
                print(f"{what} {i + 1}/{args.runs}: {into[-1]['wall (outside)']:.1f} s", flush=True)
    if args.reuse and len(runs) > 1:  # the first created the database
        runs, base = runs[1:], base[1:]
    return runs, base


def _medians(runs: list[dict]) -> dict[str, float]:
    names = list(dict.fromkeys(name for run in runs for name in run))
    return {n: statistics.median(r[n] for r in runs if n in r) for n in names}


def main() -> None:
    """Run, take medians, print them next to the targets (and the baseline's), write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--scans", type=int, default=3)
    ap.add_argument("--scan", default="64x64")
    ap.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--reuse", action="store_true", help="one output directory for all runs (see above)")
    ap.add_argument("--fresh-cache", action="store_true", help="an empty cache per run (see above)")
    ap.add_argument("--baseline", type=Path, help="another checkout, run alternately (see above)")
    ap.add_argument("--json", type=Path, default=RESULTS / "startup.json")
    args = ap.parse_args()
    runs, base = run_all(args)
    medians, base_medians = _medians(runs), _medians(base)
    load = os.getloadavg()
    print(f"\nstemstream demo --scans {args.scans} --scan {args.scan}; median of {len(runs)} run(s)"
          f"{' (reused output directory)' if args.reuse else ''}{' (fresh cache)' if args.fresh_cache else ''}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPU(s)")  # fmt: skip
    print(f"{'phase':44} {'median s':>9} {'baseline' if base else '':>9} {'runs':>20}  target")
    for n in list(dict.fromkeys([*base_medians, *medians])):
        each = " ".join(f"{r[n]:.2f}" for r in runs if n in r)
        mine = f"{medians[n]:9.2f}" if n in medians else f"{'-':>9}"
        theirs = f"{base_medians[n]:9.2f}" if n in base_medians else ("" if not base else f"{'-':>9}")
        print(f"{n:44} {mine} {theirs:>9} {each:>20}  {TARGETS.get(n, '')}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": f"stemstream demo --timings --scans {args.scans} --scan {args.scan}"
        + ("" if args.postprocess else " --no-postprocess"),
        "reuse": args.reuse,
        "fresh_cache": args.fresh_cache,
        "runs": runs,
        "median": medians,
        "loadavg": load,
        "cpus": os.cpu_count(),
        "targets": TARGETS,
    }
    if base:
        result |= {"baseline": str(args.baseline), "baseline_runs": base, "baseline_median": base_medians}
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
