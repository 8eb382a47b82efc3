"""The select stage's near-duplicate check against the rule written plainly (every try against every selected
row, float64): same answers, same selections, on small random inputs full of near-duplicates."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labelnext.ops.cluster.kmeans import CLUSTER_ID, DISTANCE, RAND_KEY
from labelnext.ops.select.near_duplicates import (ExhaustiveNearDuplicates, NearDuplicates, bounding_vectors,
                                           embedding_matrix)
from labelnext.ops.select.selector import Selector
from labelnext.pipelines.config import SelectConfig

RULES = ["typical_uncertain", "baseline", "uncertainty_weighted", "round_robin", "entropy_only", "cluster_only",
         "stratified"]
PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class ExhaustiveSelector(Selector):
    near_duplicates = ExhaustiveNearDuplicates


def near_duplicate_heavy(rng: np.random.Generator, n: int, dim: int, unit: bool = True) -> np.ndarray:
    """A few originals, each copied several times with small noise, some copies scaled when not ``unit``."""
    originals = rng.normal(size=(max(1, n // 4), dim))
    noise = rng.normal(size=(n, dim)) * rng.choice([0.0, 0.02, 0.2], n)[:, None]
    emb = originals[rng.integers(0, len(originals), n)] + noise
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-9)
    if not unit:
        emb *= rng.uniform(0.5, 1.5, size=(n, 1))
    return emb.astype(np.float32)


def _fixed_size(emb: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])


@st.composite
def candidate_tables(draw):
    n = draw(st.integers(1, 60))
    k = draw(st.integers(1, 5))
    dim = draw(st.sampled_from([2, 5, 16, 70, 130]))  # above 64 the short vectors drop dimensions
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    clusters = rng.integers(0, k, n).astype(np.int32)
    table = pa.table({
        "doc_id": [f"d{i}" for i in range(n)],
        CLUSTER_ID: clusters,
        DISTANCE: rng.choice([0.1, 0.2, 0.7], size=n).astype(np.float32),
        RAND_KEY: rng.integers(0, 8, n),  # collisions: the doc_id breaks them
        "uncertainty": rng.choice([0.5, 1.0, 2.5], size=n),
        "max_entropy": rng.random(n) * 6,
        "nll": rng.random(n) * 4,
        "n_tokens": rng.integers(0, 60, n),
        "embedding": _fixed_size(near_duplicate_heavy(rng, n, dim, unit=draw(st.booleans()))),
    })
    sizes = np.bincount(clusters, minlength=k) + rng.integers(0, 20, k)
    return table, sizes


@PROPS
@given(data=candidate_tables(), budget=st.integers(1, 70), rule=st.sampled_from(RULES),
       threshold=st.sampled_from([0.3, 0.8, 0.95, 0.999, 1.0]))
def test_selection_equals_the_exhaustive_rule(data, budget, rule, threshold):
    table, sizes = data
    cfg = SelectConfig(rule=rule, dedup_threshold=threshold)
    fast = Selector(cfg).select(table, sizes, budget)
    assert fast.equals(ExhaustiveSelector(cfg).select(table, sizes, budget))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("threshold", [0.8, 0.9])
def test_large_selection_equals_the_exhaustive_rule(rule, threshold):
    """Enough selected rows that queries check whole blocks of expected candidates at once."""
    rng = np.random.default_rng(7)
    n, k = 700, 6
    table = pa.table({
        "doc_id": [f"d{i}" for i in range(n)],
        CLUSTER_ID: rng.integers(0, k, n).astype(np.int32),
        DISTANCE: rng.random(n).astype(np.float32),
        RAND_KEY: rng.integers(0, 2**53, n),
        "uncertainty": rng.random(n),
        "max_entropy": rng.random(n),
        "nll": rng.random(n),
        "n_tokens": rng.integers(1, 60, n),
        "embedding": _fixed_size(near_duplicate_heavy(rng, n, 384)),
    })
    sizes = np.bincount(table.column(CLUSTER_ID).to_numpy(), minlength=k) * 3
    cfg = SelectConfig(rule=rule, dedup_threshold=threshold)
    fast = Selector(cfg).select(table, sizes, 250)
    assert fast.equals(ExhaustiveSelector(cfg).select(table, sizes, 250))
    assert "fill" in fast.column("reason").to_pylist()  # near-duplicates left quotas unfilled


@pytest.mark.parametrize("dim,unit", [(384, True), (384, False), (64, True), (3, True)])
def test_answers_equal_the_exhaustive_check_call_by_call(dim, unit):
    rng = np.random.default_rng(dim)
    emb = near_duplicate_heavy(rng, 400, dim, unit)
    # Pairs just either side of the threshold: the bound must never rule out a pair that is above it.
    emb[1] = emb[0] * 0.95 + emb[2] * 0.05
    threshold = float(emb[0].astype(np.float64) @ emb[1].astype(np.float64)) - 1e-7
    fast, plain = NearDuplicates(emb, threshold, capacity=4), ExhaustiveNearDuplicates(emb, threshold)
    fast.expect(rng.permutation(len(emb))[:300])  # a hint that is partly wrong must not change answers
    fast.add(0)
    plain.add(0)
    assert fast.is_near_duplicate(1) and plain.is_near_duplicate(1)
    rejected = 0
    for i in [*rng.permutation(len(emb)), *rng.permutation(len(emb))]:  # asked twice: the fill pass
        answer = fast.is_near_duplicate(int(i))
        assert answer == plain.is_near_duplicate(int(i))
        rejected += answer
        if not answer and rng.random() < 0.5:
            fast.add(int(i))
            plain.add(int(i))
    assert rejected > 50


def test_short_vectors_bound_every_dot_product_and_rule_out_unrelated_pairs():
    rng = np.random.default_rng(0)
    unrelated = rng.normal(size=(300, 384))
    unrelated /= np.linalg.norm(unrelated, axis=1, keepdims=True)
    emb = np.concatenate([near_duplicate_heavy(rng, 300, 384, unit=False), unrelated]).astype(np.float32)
    short = bounding_vectors(emb).astype(np.float64)
    bound, exact = short @ short.T, emb.astype(np.float64) @ emb.T.astype(np.float64)
    assert (bound >= exact).all()
    # Unrelated unit vectors (cosine about 0 in 384 dimensions) are ruled out at the default threshold.
    assert np.mean(bound[300:, 300:][~np.eye(300, dtype=bool)] > 0.95) < 0.01


def test_embedding_matrix_reads_arrow_layouts_without_copying():
    emb = np.arange(24, dtype=np.float32).reshape(6, 4)
    fixed = _fixed_size(emb)
    out = embedding_matrix(pa.chunked_array([fixed]))
    assert np.array_equal(out, emb) and np.shares_memory(out, fixed.values.to_numpy())
    assert np.array_equal(embedding_matrix(fixed.slice(2, 3)), emb[2:5])
    assert np.array_equal(embedding_matrix(pa.chunked_array([fixed.slice(0, 2), fixed.slice(2)])), emb)
    assert np.array_equal(embedding_matrix(pa.array(emb.tolist(), pa.list_(pa.float32())).slice(1)), emb[1:])

    from ray.data.extensions import ArrowTensorArray

    assert np.array_equal(embedding_matrix(ArrowTensorArray.from_numpy(emb)), emb)
    with pytest.raises(ValueError, match="column embedding: 1 of 2 rows are null"):
        embedding_matrix(pa.array([[1.0, 2.0], None], pa.list_(pa.float32())))
    with pytest.raises(ValueError, match="column embedding: rows have"):
        embedding_matrix(pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32())))
