"""Accuracy against the simulator's ground truth, across doses, never worse than stempy on the same data."""

from __future__ import annotations

import pytest

from stemstream_testing.evaluate import evaluate_dose


@pytest.mark.parametrize("dose", [10, 200, 2000])
def test_accuracy_against_ground_truth_and_stempy(dose):
    r = evaluate_dose(dose)
    print(
        f"dose {dose}: ours precision {r.ours.precision:.4f} recall {r.ours.recall:.4f}; "
        f"stempy precision {r.stempy.precision:.4f} recall {r.stempy.recall:.4f}"
    )
    assert r.ours.electrons > 0.9 * dose * 144
    if dose == 200:  # production-like dose, noise and thresholds
        assert r.ours.precision >= 0.99
        assert r.ours.recall >= 0.98
    assert r.ours.precision >= r.stempy.precision
    assert r.ours.recall >= r.stempy.recall
