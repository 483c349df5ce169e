"""Precision and recall against simulator ground truth across doses, ours next to stempy's production pipeline.

Usage: python benchmarks/bench_accuracy.py [--side 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# stemstream_testing (test support) is not installed: import it from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stemstream_testing.evaluate import evaluate_dose  # noqa: E402

DOSES = [10, 50, 100, 200, 500, 1000, 2000]


def main() -> None:
    """Print the table and write JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=16)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "accuracy.json")
    a = ap.parse_args()
    rows = []
    print(f"{'dose':>6} {'ours P':>8} {'ours R':>8} {'stempy P':>9} {'stempy R':>9}")
    for dose in DOSES:
        r = evaluate_dose(dose, side=a.side)
        rows.append(
            {
                "dose": dose,
                "ours_precision": r.ours.precision,
                "ours_recall": r.ours.recall,
                "stempy_precision": r.stempy.precision,
                "stempy_recall": r.stempy.recall,
                "electrons": r.ours.electrons,
                "ours_background_adu": r.ours_background,
                "stempy_background_adu": r.stempy_background,
            }
        )
        print(
            f"{dose:>6} {r.ours.precision:8.4f} {r.ours.recall:8.4f} {r.stempy.precision:9.4f} {r.stempy.recall:9.4f}"
        )
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"scan_side": a.side, "rows": rows}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
