"""Candidates as a distributed per-cluster top-k on local Ray: the exact global answer, candidate-sized tables
on the driver, and the same selection whatever the block layout."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from labelnext.ops.cluster import candidates as cand
from labelnext.ops.cluster.kmeans import rand_keys
from labelnext.ops.core.columns import CLUSTER_ID, DISTANCE, DOC_ID, EMBEDDING, RAND_KEY, SCORE_COLUMNS, TEXT
from labelnext.ops.core.instrument import BUSY_S, NODE_ID
from labelnext.ops.select.selector import Selector
from labelnext.pipelines import dataflow as flow
from labelnext.pipelines.config import CandidatesConfig, RunConfig
from labelnext.pipelines.selection import Clusters, RunRequest, SelectionPipeline
from labelnext.pipelines.telemetry import DriverTelemetry

N, K, DIM = 2000, 7, 16


def assigned_table(seed: int = 0) -> pa.Table:
    """Clustered documents with many exact ties in distance and planted near-duplicate vectors."""
    rng = np.random.default_rng(seed)
    ids = [f"doc-{i:05d}" for i in rng.permutation(N)]
    emb = rng.normal(size=(N // 4, DIM))[rng.integers(0, N // 4, N)] + rng.normal(size=(N, DIM)) * 0.01
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    return pa.table({
        DOC_ID: ids,
        TEXT: [f"text of {d}" for d in ids],
        EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), DIM),
        NODE_ID: ["node"] * N,
        BUSY_S: np.zeros(N),
        CLUSTER_ID: rng.integers(0, K, N).astype(np.int32),
        DISTANCE: rng.choice([0.1, 0.2, 0.3], N).astype(np.float32),
        RAND_KEY: rand_keys(ids, 0),
    })


def in_blocks(ray, table: pa.Table, rows: int):
    return ray.data.from_arrow([table.slice(i, rows) for i in range(0, table.num_rows, rows)]).materialize()


def test_per_cluster_top_k_is_the_exact_global_answer(ray_local):
    table = assigned_table()
    sizes = cand.cluster_sizes(table.column(CLUSTER_ID).to_numpy(), K)
    plan = cand.plan_candidates(sizes, 60, CandidatesConfig(factor=5, diverse_fraction=0.3))
    slim = table.select(list(flow.CANDIDATE_KEYS))
    expected = cand.merge_candidates(slim, plan).to_pylist()  # one table holding every row: the global answer
    assert len(expected) == 300
    for rows in (N, 333, 50):
        got = flow.per_cluster_candidates(in_blocks(ray_local, table, rows), plan, list(flow.CANDIDATE_KEYS))
        assert got.to_pylist() == expected


def with_scores(candidates: pa.Table) -> pa.Table:
    """Stand-in LLM scores from the doc_id, with many ties."""
    ids = candidates.column(DOC_ID).to_pylist()
    score = (rand_keys(ids, 5) % 4).astype(np.float64)
    for name in SCORE_COLUMNS:
        candidates = candidates.append_column(name, pa.array(score.astype(bool) if name == "truncated" else score))
    return candidates


def _pipeline(tmp_path, budget: int) -> SelectionPipeline:
    cfg = RunConfig.model_validate({"select": {"rule": "typical_uncertain", "quota": "size"}})
    return SelectionPipeline(cfg, RunRequest(corpus=str(tmp_path), output=str(tmp_path / "out"), budget=budget,
                                             run_id="r", run_date="2026-01-01"))


def test_same_selection_whatever_the_block_layout(ray_local, tmp_path):
    table = assigned_table(seed=1)
    sizes = cand.cluster_sizes(table.column(CLUSTER_ID).to_numpy(), K)
    selections = []
    for rows in (N, 128, 37):
        pipe = _pipeline(tmp_path, budget=80)
        assigned = in_blocks(ray_local, table.drop_columns([TEXT]), rows)
        with DriverTelemetry() as telemetry:
            candidates = pipe.candidates(Clusters(assigned, np.zeros((K, DIM), np.float32), sizes))
        assert candidates.num_rows == 400 and set(candidates.column_names) >= {EMBEDDING, "candidate_reason"}
        assert NODE_ID not in candidates.column_names and TEXT not in candidates.column_names
        by_id = {r[DOC_ID]: r for r in table.select([DOC_ID, CLUSTER_ID, EMBEDDING]).to_pylist()}
        for row in candidates.select([DOC_ID, CLUSTER_ID, EMBEDDING]).to_pylist():
            assert row == by_id[row[DOC_ID]]
        # The picks stay in the object store: the driver receives the candidates' rows once.
        assert telemetry.rows_collected == candidates.num_rows
        selected = Selector(pipe.cfg.select).select(with_scores(candidates), sizes, 80)
        selections.append(selected.column(DOC_ID).to_pylist())
    assert selections[0] == selections[1] == selections[2]
    assert len(set(selections[0])) == 80
