"""The sector header's validation cost beside msgpack's own decode of the same bytes, one run, same machine.

Every sector crossing the aggregator is decoded and checked (types, ranges, the scan-size limit) by
``streaming.protocol.sector.decode_header``; the whole path has about 100 us per sector. This prints the
cost per header, its ratio to a bare ``msgpack.unpackb`` of the same 9-int array, and its share of the
path's budget (target: <= 5 %). Timing lives here, never in a test.

Usage: python benchmarks/bench_header.py [--n 200000] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import msgpack

from streaming.protocol.sector import decode_header

BUDGET = 100e-6  # seconds per sector on the whole path (README profile)
RAW = msgpack.packb([7, 123, 4096, 64, 64, 10, 20, 3, 2])


def best_per_call(func, n: int, repeats: int) -> float:
    """The best of `repeats` timings of n calls, in seconds per call."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            func(RAW)
        best = min(best, (time.perf_counter() - t) / n)
    return best


def main() -> None:
    """Measure, print next to the target and optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    header = best_per_call(decode_header, args.n, args.repeats)
    bare = best_per_call(msgpack.unpackb, args.n, args.repeats)
    result = {
        "decode_header_us": header * 1e6,
        "unpackb_us": bare * 1e6,
        "ratio_to_unpackb": header / bare,
        "share_of_budget": header / BUDGET,
    }
    print(
        f"decode_header {result['decode_header_us']:.2f} us ({result['ratio_to_unpackb']:.1f}x a bare "
        f"msgpack.unpackb): {100 * result['share_of_budget']:.1f} % of the ~100 us per-sector path "
        "(target <= 5 %)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
