"""The simulated nightly loop of the quality bench (bench/loop.py): the whole-pool ceiling and its verdict line,
on a small pool of real-shaped embeddings with the product's task model."""

from __future__ import annotations

import numpy as np

from bench import loop
from bench.quality import LR_C, Pool
from labelnext.pipelines.config import load_config


def _loop(per_round: int = 10) -> tuple[loop.Loop, int]:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 16))

    def docs(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        x = centers[y] + 1.5 * rng.standard_normal((n, 16))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.array([f"c{v}" for v in y])

    pool_x, pool_y = docs(60)
    test_x, test_y = docs(90)
    pool = Pool(ids=np.array([f"d{i}" for i in range(60)], dtype=object), emb=pool_x, scores=None)
    return loop.Loop(pool, pool_y, test_x, test_y, per_round, load_config(), LR_C), len(pool_x)


def test_whole_pool_labels_everything_at_once_and_scores_the_task_models_ceiling():
    lp, n = _loop()
    curve = lp.run("whole_pool", 3, seed=0)
    assert [labels for labels, _ in curve] == [n, n, n]
    ceiling = loop.macro_f1(loop.fit(lp.pool.emb, lp.pool_y, LR_C), "", lp.test_x, lp.test_y)
    assert all(f1 == ceiling for _, f1 in curve)
    assert [labels for labels, _ in lp.run("random", 3, seed=0)] == [10, 20, 30]


def test_verdict_says_when_a_target_is_above_what_the_whole_pool_gives():
    f1 = {}
    for s in range(3):
        for r in range(1, 6):
            for st, value in {"random": 0.80, "coldstart": 0.82, "labelnext": 0.83, "typiclust": 0.80,
                              "whole_pool": 0.84}.items():
                f1[("ds", st, r, s)] = value + 0.001 * s
    text = loop.loop_verdict(f1, ["ds"], ["random", "coldstart", "labelnext", "typiclust", "whole_pool"], 5, 200,
                             [0, 1, 2])
    assert ("600 labels: labelnext - random +0.0300 ± 0.0000 (>= +0.050: FAIL), labelnext - repeated cold start "
            "+0.0100 ± 0.0000 (>= +0.020: FAIL)") in text
    assert "round 1: labelnext - TypiClust +0.0300 ± 0.0000 (>= 0: PASS)" in text
    assert "whole pool labelled): +0.040 over random, +0.020 over the repeated cold start; the target is above it" in text


def test_labelnext_rounds_pick_unlabelled_candidates_by_margin(monkeypatch):
    """Rounds with labels go through the product's candidates stage (nearest by margin) and the Selector with
    the predicted labels and the label counts so far; labelled documents are never picked again."""
    from bench import quality
    from labelnext.ops.select import Selector

    lp, n = _loop(per_round=4)  # 5 x 4 candidates out of the 40 unlabelled documents
    seen = {}
    real_candidates, real_select = quality.candidates, Selector.select

    def candidates(assigned, sizes, budget, cfg, near_key="distance"):
        seen["near_key"] = near_key
        out = real_candidates(assigned, sizes, budget, cfg, near_key=near_key)
        seen["candidates"], seen["pool"] = out.num_rows, assigned.num_rows
        return out

    def select(self, table, sizes, budget):
        seen["columns"], seen["label_counts"] = set(table.column_names), dict(self.label_counts)
        return real_select(self, table, sizes, budget)

    monkeypatch.setattr(quality, "candidates", candidates)
    monkeypatch.setattr(Selector, "select", select)
    labelled = np.arange(20)
    model = loop.fit(lp.pool.emb[labelled], lp.pool_y[labelled], LR_C)
    picked = lp.pick("labelnext", labelled, model, seed=0)
    assert len(picked) == 4 and len(set(picked.tolist())) == 4 and not set(picked.tolist()) & set(range(20))
    assert seen["near_key"] == "margin" and seen["candidates"] < seen["pool"] == n - 20
    assert {"margin", "predicted_label"} <= seen["columns"]
    assert sum(seen["label_counts"].values()) == 20
