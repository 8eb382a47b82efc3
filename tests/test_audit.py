"""The audit sample: its size, a uniform draw that is the same for a night whatever the run id, and intervals that
cover the truth about as often as they claim."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import f1_score

from labelnext.ops.select.audit import (AUDIT_KEY, audit_salt, audit_size, block_smallest, estimate, macro_f1,
                                        smallest, wilson)


@pytest.mark.parametrize("budget,share,expected", [(20_000, 0.05, 1000), (50, 0.05, 3), (10, 0.05, 1), (1, 0.05, 0),
                                                    (100, 0.0, 0), (3, 0.45, 1), (2, 0.45, 1)])
def test_audit_size(budget, share, expected):
    assert audit_size(budget, share) == expected


def test_the_draw_is_per_night_and_seed_and_merges_per_block_to_the_global_smallest():
    ids = [f"doc-{i}" for i in range(2000)]
    table = pa.table({"doc_id": ids})
    salt = audit_salt(0, "2026-11-25")
    whole = block_smallest(table, 50, salt)
    blocks = [block_smallest(table.slice(i, 300), 50, salt) for i in range(0, 2000, 300)]
    merged = smallest(pa.concat_tables(blocks), 50)
    assert merged.column("doc_id").to_pylist() == whole.column("doc_id").to_pylist()
    assert whole.column(AUDIT_KEY).to_pylist() == sorted(whole.column(AUDIT_KEY).to_pylist())
    other_night = block_smallest(table, 50, audit_salt(0, "2026-11-26")).column("doc_id").to_pylist()
    other_seed = block_smallest(table, 50, audit_salt(1, "2026-11-25")).column("doc_id").to_pylist()
    assert len(set(other_night) & set(whole.column("doc_id").to_pylist())) < 10
    assert len(set(other_seed) & set(whole.column("doc_id").to_pylist())) < 10


def test_the_draw_is_uniform():
    """Over many nights every document is drawn about equally often (chi-square against uniform)."""
    ids = [f"d{i}" for i in range(200)]
    hits = np.zeros(200)
    for night in range(400):
        drawn = block_smallest(pa.table({"doc_id": ids}), 20, audit_salt(0, f"night-{night}"))
        hits[[int(d[1:]) for d in drawn.column("doc_id").to_pylist()]] += 1
    expected = 400 * 20 / 200
    chi2 = float(((hits - expected) ** 2 / expected).sum())
    assert chi2 < 260  # 199 degrees of freedom: p ~ 0.002 at 260


def test_macro_f1_matches_scikit_learn_over_the_true_classes():
    rng = np.random.default_rng(0)
    for _ in range(30):
        t = rng.integers(0, 6, 40).astype(str)
        p = rng.integers(0, 7, 40).astype(str)
        assert macro_f1(t, p) == pytest.approx(f1_score(t, p, average="macro", labels=np.unique(t), zero_division=0))


def test_wilson_interval_known_value():
    low, high = wilson(8, 10, 0.95)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook Wilson interval for 8/10


def test_estimate_is_deterministic_and_contains_itself():
    t = np.array(list("aabbccabca"))
    p = np.array(list("abbbccabaa"))
    one, two = estimate(t, p, seed=3), estimate(t, p, seed=3)
    assert one == two
    assert one.accuracy == pytest.approx(0.8)
    assert one.accuracy_low <= one.accuracy <= one.accuracy_high
    assert one.macro_f1_low <= one.macro_f1 <= one.macro_f1_high
    assert estimate([], []) is None


def test_intervals_cover_the_population_value_about_as_often_as_claimed():
    """A model with known accuracy and macro-F1 on a population; 300 audits of 40 documents each."""
    rng = np.random.default_rng(1)
    n_pop, classes = 20_000, np.array(list("abcd"))
    truth = classes[rng.choice(4, n_pop, p=[0.4, 0.3, 0.2, 0.1])]
    wrong = rng.random(n_pop) < 0.3
    pred = np.where(wrong, classes[rng.integers(0, 4, n_pop)], truth)
    true_acc = float((truth == pred).mean())
    true_f1 = macro_f1(truth, pred)
    acc_hits = f1_hits = 0
    for i in range(300):
        idx = rng.choice(n_pop, 40, replace=False)
        est = estimate(truth[idx], pred[idx], confidence=0.95, resamples=500, seed=i)
        acc_hits += est.accuracy_low <= true_acc <= est.accuracy_high
        f1_hits += est.macro_f1_low <= true_f1 <= est.macro_f1_high
    assert acc_hits / 300 >= 0.92
    assert f1_hits / 300 >= 0.88
