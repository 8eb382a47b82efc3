import numpy as np
import pyarrow as pa
import pytest

from ops.cluster import CLUSTER_ID, DISTANCE, RAND_KEY
from ops.select import SELECTED_COLUMNS, Selector
from pipelines.config import SelectConfig


def _candidates(n=60, k=4, seed=0, dim=8):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return pa.table({
        "doc_id": [f"d{i}" for i in range(n)],
        CLUSTER_ID: (np.arange(n) % k).astype(np.int32),
        DISTANCE: rng.random(n).astype(np.float32),
        RAND_KEY: rng.integers(0, 2**40, n),
        "uncertainty": rng.random(n) * 3,
        "max_entropy": rng.random(n) * 6,
        "nll": rng.random(n) * 4,
        "n_tokens": rng.integers(5, 50, n),
        "embedding": pa.array(emb.tolist(), pa.list_(pa.float32())),
    })


@pytest.mark.parametrize("rule", ["baseline", "uncertainty_weighted", "round_robin", "entropy_only", "cluster_only"])
def test_every_rule_returns_exactly_budget_unique_rows(rule):
    c = _candidates()
    sizes = np.array([400, 300, 200, 100])
    out = Selector(SelectConfig(rule=rule)).select(c, sizes, 17)
    assert out.column_names == list(SELECTED_COLUMNS)
    ids = out.column("doc_id").to_pylist()
    assert len(ids) == 17 == len(set(ids))
    assert out.column("rank").to_pylist() == list(range(1, 18))


def test_baseline_quotas_follow_cluster_size_and_take_most_uncertain():
    c = _candidates()
    sizes = np.array([400, 300, 200, 100])
    out = Selector(SelectConfig(dedup_threshold=1.0)).select(c, sizes, 10)
    per_cluster = np.bincount(out.column("cluster_id").to_numpy(), minlength=4)
    assert per_cluster.tolist() == [4, 3, 2, 1]
    for cl in range(4):
        pool = c.filter(pa.compute.equal(c.column(CLUSTER_ID), cl))
        top = set(pool.sort_by([("uncertainty", "descending")]).column("doc_id").to_pylist()[: per_cluster[cl]])
        chosen = set(out.filter(pa.compute.equal(out.column("cluster_id"), cl)).column("doc_id").to_pylist())
        assert chosen == top


def test_near_duplicates_are_dropped_and_result_is_deterministic():
    c = _candidates(n=20, k=1)
    emb = np.asarray(c.column("embedding").to_pylist(), dtype=np.float32)
    unc = c.column("uncertainty").to_numpy()
    top = int(np.argmax(unc))
    second = int(np.argsort(-unc)[1])
    emb[second] = emb[top]  # the second most uncertain is a copy of the first
    c = c.set_column(c.schema.get_field_index("embedding"), "embedding", pa.array(emb.tolist(), pa.list_(pa.float32())))
    sel = Selector(SelectConfig(dedup_threshold=0.95))
    out = sel.select(c, np.array([20]), 3)
    ids = out.column("doc_id").to_pylist()
    assert f"d{top}" in ids and f"d{second}" not in ids
    assert sel.select(c, np.array([20]), 3).equals(out)


def test_budget_larger_than_candidates_and_nan_scores():
    c = _candidates(n=5, k=2)
    c = c.set_column(c.schema.get_field_index("uncertainty"), "uncertainty", pa.array([np.nan, 1.0, 2.0, np.nan, 0.5]))
    out = Selector(SelectConfig()).select(c, np.array([3, 2]), 50)
    assert out.num_rows == 5
    assert out.column("doc_id").to_pylist()[-1] in {"d0", "d3"}
