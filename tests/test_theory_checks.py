"""The theory/ checks (E2, E3, E5) in their small configurations: they hold, and have power."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetune.bounds import sparsity_penalty
from theory.checks import regularisation, sam_optimality, stability


@given(seed=st.integers(min_value=0, max_value=10**6))
def test_sam_reaches_the_brute_force_minimum(seed):
    trial = sam_optimality.trial(seed, "diagonal H")
    assert trial.optimal, trial


@settings(max_examples=60)
@given(seed=st.integers(min_value=0, max_value=10**6))
def test_sam_is_a_real_choice(seed):
    """The brute force has something to find: SAM is never worse, and on coupled Hessians (no
    theorem) its regret is sometimes positive."""
    trial = sam_optimality.trial(seed, "dense H")
    assert trial.sam_value >= trial.best_value - 1e-9 * max(1.0, abs(trial.best_value))


def test_sam_optimality_quick(tmp_path):
    result = sam_optimality.main(["--quick", "--output-dir", str(tmp_path)])
    assert result["holds"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["diagonal H"]["sam_optimal"] == 1.0
    # without the theorem's assumptions SAM does miss: the comparison is not vacuous
    assert rows["dense H"]["sam_optimal"] < 1.0
    assert rows["diagonal H, score g^2"]["sam_optimal"] < 1.0
    assert json.loads((tmp_path / "sam_optimality-quick.json").read_text())["holds"]
    assert (tmp_path / "sam_optimality-quick.png").read_bytes()[:4] == b"\x89PNG"


def test_regularisation_quick(tmp_path):
    result = regularisation.main(["--quick", "--output-dir", str(tmp_path)])
    assert result["holds"]
    assert all(abs(r["z"]) < regularisation.Z_LIMIT for r in result["rows"])
    assert (tmp_path / "regularisation-quick.png").exists()


def test_regularisation_check_rejects_a_wrong_closed_form():
    """Power: the Monte Carlo mean tells lam (1 - p) from lam p, far beyond the sampling error."""
    model, theta0, loss = regularisation.trained_mlp(steps=5)
    row = regularisation.monte_carlo(model, theta0, loss, 0.3, 1.0, 200, seed=0)
    sq = (row["closed_form"] - loss) / 0.7
    wrong = loss + sparsity_penalty(sq, 0.7)  # lam * p * ||d||^2 instead of lam (1 - p)
    assert abs(row["monte_carlo_mean"] - wrong) / row["standard_error"] > 50
    assert abs(row["z"]) < regularisation.Z_LIMIT


def test_stability_quick(tmp_path):
    result = stability.main(["--quick", "--output-dir", str(tmp_path)])
    rows = result["rows"]
    assert [r["p"] for r in rows] == [0.1, 0.5, 1.0]
    # measured stability falls as p falls, significantly from p = 1 to p = 0.1
    assert result["trend"] > result["trend_noise"] > 0
    assert all(r["falls_with_p"] for r in rows)
    # and stays under the masked-reading bound, whose constants were estimated
    assert all(r["measured"] <= r["bound_masked"] for r in rows)
    assert all(np.isfinite(r["bound_masked"]) for r in rows)
    assert result["holds"] == (not result["problems"])
    assert (tmp_path / "stability-quick.json").exists()
