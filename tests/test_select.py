import numpy as np
import pyarrow as pa
import pytest

from labelnext.ops.cluster.kmeans import CLUSTER_ID, DISTANCE, RAND_KEY
from labelnext.ops.select.selector import SELECTED_COLUMNS, Selector, contract, cover_quotas, percentile_within
from labelnext.pipelines.config import SelectConfig


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


RULES = ["typical_uncertain", "baseline", "uncertainty_weighted", "round_robin", "entropy_only", "cluster_only",
         "stratified"]


@pytest.mark.parametrize("rule", RULES)
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
    out = Selector(SelectConfig(rule="baseline", quota="size", dedup_threshold=1.0)).select(c, sizes, 10)
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
    sel = Selector(SelectConfig(rule="baseline", dedup_threshold=0.95))
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


def test_percentile_within_clusters_is_order_free_and_averages_ties():
    values = np.array([3.0, 1.0, 1.0, 5.0, 2.0, -np.inf])
    clusters = np.array([0, 0, 0, 0, 1, 1])
    pct = percentile_within(values, clusters)
    # cluster 0 sorted: 1, 1, 3, 5 -> ranks 0.5, 0.5, 2, 3 over 3; cluster 1: -inf, 2 -> 0, 1
    np.testing.assert_allclose(pct, [2 / 3, 0.5 / 3, 0.5 / 3, 1.0, 1.0, 0.0])
    perm = np.random.default_rng(0).permutation(len(values))
    np.testing.assert_allclose(percentile_within(values[perm], clusters[perm]), pct[perm])
    assert percentile_within(np.array([4.0]), np.array([7])).tolist() == [0.0]


def test_typical_uncertain_trades_uncertainty_against_distance_to_centroid():
    # One cluster, quota 1: a far, very uncertain outlier vs a near, fairly uncertain document.
    c = pa.table({
        "doc_id": ["outlier", "typical", "dull"],
        CLUSTER_ID: np.zeros(3, np.int32),
        DISTANCE: np.array([0.9, 0.1, 0.2], np.float32),
        RAND_KEY: np.array([1, 2, 3]),
        "uncertainty": [3.0, 2.0, 1.0], "max_entropy": [5.0, 4.0, 3.0], "nll": [3.0, 2.0, 1.0],
        "n_tokens": [10, 10, 10],
    })
    pick = lambda **kw: Selector(SelectConfig(**kw)).select(c, np.array([3]), 1).column("doc_id").to_pylist()
    assert pick(rule="baseline") == ["outlier"]
    assert pick(rule="typical_uncertain") == ["typical"]
    assert pick(rule="typical_uncertain", typicality_weight=0.0) == ["outlier"]
    out = Selector(SelectConfig(rule="typical_uncertain")).select(c, np.array([3]), 1)
    assert out.column("reason").to_pylist() == ["cluster_quota_typical_uncertain"]


def test_typical_uncertain_keeps_unscored_documents_last_and_ignores_row_order():
    c = _candidates(n=40, k=3)
    unc = c.column("uncertainty").to_numpy().copy()
    unc[:5] = np.nan
    c = c.set_column(c.schema.get_field_index("uncertainty"), "uncertainty", pa.array(unc))
    sel = Selector(SelectConfig(rule="typical_uncertain"))
    out = sel.select(c, np.array([100, 100, 100]), 15)
    assert out.num_rows == 15 and not {f"d{i}" for i in range(5)} & set(out.column("doc_id").to_pylist())
    shuffled = c.take(pa.array(np.random.default_rng(1).permutation(c.num_rows), pa.int64()))
    assert sel.select(shuffled, np.array([100, 100, 100]), 15).column("doc_id").to_pylist() == \
        out.column("doc_id").to_pylist()


def _per_cluster(out: pa.Table, k: int) -> list[int]:
    return np.bincount(out.column("cluster_id").to_numpy(), minlength=k).tolist()


def test_stratified_takes_smallest_random_keys_within_size_quotas_without_llm_scores():
    c = _candidates().drop_columns(["uncertainty", "max_entropy", "nll", "n_tokens"])
    sizes = np.array([400, 300, 200, 100])
    cfg = SelectConfig(rule="stratified", quota="size", dedup_threshold=1.0)
    assert "uncertainty" not in contract(cfg).needs
    out = Selector(cfg).select(c, sizes, 10)
    assert _per_cluster(out, 4) == [4, 3, 2, 1]
    assert set(out.column("reason").to_pylist()) == {"cluster_quota_random"}
    for cl, q in enumerate([4, 3, 2, 1]):
        pool = c.filter(pa.compute.equal(c.column(CLUSTER_ID), cl))
        smallest = set(pool.sort_by([(RAND_KEY, "ascending")]).column("doc_id").to_pylist()[:q])
        chosen = set(out.filter(pa.compute.equal(out.column("cluster_id"), cl)).column("doc_id").to_pylist())
        assert chosen == smallest


def test_cover_quotas_visit_every_cluster_before_any_gets_a_second():
    capacity = np.array([50, 50, 50, 50])
    assert cover_quotas(np.array([100, 50, 5, 1]), 2, capacity).tolist() == [1, 1, 0, 0]
    assert cover_quotas(np.array([100, 50, 5, 1]), 4, capacity).tolist() == [1, 1, 1, 1]
    assert cover_quotas(np.array([100, 50, 5, 1]), 9, capacity).tolist() == [4, 3, 1, 1]
    # A cluster without candidates (capacity 0) gets nothing; its slot goes to the others.
    assert cover_quotas(np.array([100, 50, 5, 1]), 4, np.array([50, 50, 0, 50])).tolist() == [2, 1, 0, 1]
    assert cover_quotas(np.array([3, 1]), 10, np.array([3, 1])).tolist() == [3, 1]


@pytest.mark.parametrize("rule", ["stratified", "cluster_only", "typical_uncertain"])
def test_cover_quota_reaches_small_clusters_that_size_quotas_skip(rule):
    c = _candidates(n=80, k=4)
    sizes = np.array([1000, 10, 10, 10])
    by_size = Selector(SelectConfig(rule=rule, quota="size", dedup_threshold=1.0)).select(c, sizes, 4)
    cover = Selector(SelectConfig(rule=rule, quota="cover", dedup_threshold=1.0)).select(c, sizes, 4)
    assert _per_cluster(by_size, 4) == [4, 0, 0, 0]
    assert _per_cluster(cover, 4) == [1, 1, 1, 1]
