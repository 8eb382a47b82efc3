import numpy as np
import pyarrow as pa

from labelnext.ops.cluster import candidates as cand
from labelnext.ops.cluster.kmeans import CLUSTER_ID, DISTANCE, RAND_KEY
from labelnext.pipelines.config import CandidatesConfig


def test_quotas_are_proportional_capped_and_exact():
    assert cand.proportional_quotas(np.array([10, 5, 1, 0]), 7).tolist() == [4, 2, 1, 0]
    assert cand.proportional_quotas(np.array([1, 1]), 5).tolist() == [1, 1]
    q = cand.proportional_quotas(np.array([100.0, 1.0]), 3, capacity=np.array([1, 5]))
    assert q.tolist() == [1, 2]
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(0, 30, size=rng.integers(1, 12))
        total = int(rng.integers(0, 100))
        q = cand.proportional_quotas(sizes, total)
        assert q.sum() == min(total, sizes.sum()) and (q <= sizes).all()


def _table(n, k, seed=0):
    rng = np.random.default_rng(seed)
    return pa.table({
        "doc_id": [f"d{i}" for i in range(n)],
        CLUSTER_ID: rng.integers(0, k, n).astype(np.int32),
        DISTANCE: rng.random(n).astype(np.float32),
        RAND_KEY: rng.integers(0, 2**40, n),
    })


def test_blockwise_topk_equals_global_answer():
    table = _table(500, 6)
    sizes = cand.cluster_sizes(table.column(CLUSTER_ID).to_numpy(), 6)
    plan = cand.plan_candidates(sizes, budget=20, cfg=CandidatesConfig(factor=5, diverse_fraction=0.3))
    assert plan.total == 100
    whole = cand.merge_candidates(cand.block_candidates(table, plan), plan)
    blocks = [cand.block_candidates(table.slice(i, 70), plan) for i in range(0, 500, 70)]
    merged = cand.merge_candidates(pa.concat_tables(blocks), plan)
    assert sorted(whole.column("doc_id").to_pylist()) == sorted(merged.column("doc_id").to_pylist())
    assert merged.num_rows == 100
    assert len(set(merged.column("doc_id").to_pylist())) == 100
    # The nearest share of each cluster really is the nearest.
    for c in range(6):
        rows = table.filter(pa.compute.equal(table.column(CLUSTER_ID), c))
        best = set(rows.sort_by(DISTANCE).column("doc_id").to_pylist()[: plan.near[c]])
        got = merged.filter(pa.compute.equal(merged.column("candidate_reason"), "near_centroid"))
        got = set(got.filter(pa.compute.equal(got.column(CLUSTER_ID), c)).column("doc_id").to_pylist())
        assert got == best
