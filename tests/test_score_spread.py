"""The score stage spreads the candidates over its whole actor pool (plumbing: a stand-in scorer, no model)."""

from __future__ import annotations

import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from labelnext.ops.score import scorer as sc
from labelnext.ops.core.columns import DOC_ID, SCORE_COLUMNS, TEXT
from labelnext.pipelines.config import RunConfig
from labelnext.pipelines.placement import Placement, StagePlacement
from labelnext.pipelines.selection import RunRequest, SelectionPipeline


class StandInScorer:
    """Scores by text length, slowly enough that a pool of two is busy at once."""

    def __init__(self, cfg, device, num_cpus, tensor_parallel_size):
        self.cfg = cfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.2)
        n = len(batch[DOC_ID])
        lengths = np.array([len(str(t)) for t in batch[TEXT]], dtype=np.float32)
        return {**batch, "uncertainty": lengths, "max_entropy": lengths, "nll": lengths,
                "n_tokens": lengths.astype(np.int64), "truncated": np.zeros(n, dtype=bool)}


@pytest.fixture
def stand_in_scorer(monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import tests/
    monkeypatch.setattr(sc, "_ScoreActor", StandInScorer)
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_two_actors_each_score_30_to_70_percent(ray_local, stand_in_scorer, tmp_path):
    cfg = RunConfig.model_validate({"score": {"backend": "transformers", "batch_tokens": 4096, "max_tokens": 512},
                                   "select": {"rule": "typical_uncertain"}})
    assert sc.docs_per_batch(cfg.score) == 32
    pipe = SelectionPipeline(cfg, RunRequest(corpus=str(tmp_path), output=str(tmp_path / "out"), budget=80,
                                             run_id="r", run_date="2026-01-01"))
    n = 400
    # The corpus in one block, the candidates a fifth of it: the stage re-blocks what it reads back.
    corpus = pa.table({DOC_ID: [f"d{i}" for i in range(5 * n)], TEXT: ["x" * (i % 50) for i in range(5 * n)]})
    texts = ray_local.data.from_arrow(corpus)
    candidates = pa.table({DOC_ID: [f"d{i}" for i in range(0, 5 * n, 5)][::-1]})
    cpu = StagePlacement(use_gpu=False, num_gpus=0.0, num_cpus=1.0, concurrency=2)
    scored = pipe.score(candidates, texts, Placement(embed=cpu, score=cpu))
    assert scored.column(DOC_ID).to_pylist() == candidates.column(DOC_ID).to_pylist()
    assert scored.column("n_tokens").to_pylist() == [i % 50 for i in range(0, 5 * n, 5)][::-1]
    assert TEXT not in scored.column_names  # text stays on the cluster
    assert set(SCORE_COLUMNS) <= set(scored.column_names)
    per_actor = pipe.ledger.stages["score"].extra["rows_per_actor"]
    assert len(per_actor) == 2 and sum(per_actor) == n
    assert all(0.3 * n <= rows <= 0.7 * n for rows in per_actor), per_actor
    busy = pipe.ledger.stages["score"].extra["busy_by_actor"]  # each actor's own rate for the cost report
    assert len(busy) == 2 and sum(t for t, _ in busy.values()) == sum(scored.column("n_tokens").to_pylist())
    assert all(b >= 0.2 for _, b in busy.values())  # the stand-in sleeps 0.2 s per batch
