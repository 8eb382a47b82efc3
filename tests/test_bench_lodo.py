"""Leave-one-dataset-out pick criteria of the quality bench (bench/lodo.py) on constructed results."""

from __future__ import annotations

import numpy as np
import pytest

from bench import lodo

SEEDS = range(10)


def _results() -> lodo.F1:
    """`broad`: +0.10 on 'hard', seed noise around 0 on the saturated 'easy'; `timid`: +0.002 everywhere;
    `risky`: +0.20 on 'hard' but clearly below random on 'easy'."""
    rng = np.random.default_rng(0)
    f1: lodo.F1 = {}
    for s in SEEDS:
        noise = rng.normal(0, 0.002, size=3)
        for b in (20, 50):
            f1[("hard", b, "random", s)] = 0.5
            f1[("easy", b, "random", s)] = 0.99
            f1[("hard", b, "broad", s)], f1[("easy", b, "broad", s)] = 0.6, 0.99 + noise[0] - (0.001 if s == 0 else 0)
            f1[("hard", b, "timid", s)], f1[("easy", b, "timid", s)] = 0.502, 0.992
            f1[("hard", b, "risky", s)], f1[("easy", b, "risky", s)] = 0.7, 0.95 + noise[2]
    return f1


def test_robust_ignores_noise_on_a_saturated_dataset_but_not_a_real_loss():
    f1 = _results()
    rules = ["timid", "broad", "risky"]
    assert lodo.choose(f1, rules, ["hard", "easy"], [20, 50], "worst") == "timid"
    assert lodo.choose(f1, rules, ["hard", "easy"], [20, 50], "robust") == "broad"
    assert lodo.choose(f1, ["risky", "timid"], ["hard", "easy"], [20, 50], "robust") == "timid"
    assert lodo.choose(f1, rules, ["hard"], [20, 50], "robust") == "risky"  # nothing tells against it there


def test_lodo_picks_on_the_other_datasets_only():
    picks = lodo.lodo(_results(), ["timid", "broad", "risky"], ["hard", "easy"], [20, 50], "robust")
    assert picks == {"hard": "timid", "easy": "risky"}
    with pytest.raises(ValueError, match="unknown criterion"):
        lodo.choose(_results(), ["timid"], ["hard"], [20], "best")
