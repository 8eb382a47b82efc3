"""The simulated nightly loop of the quality bench (bench/loop.py): the whole-pool ceiling and its verdict line,
on a small pool of real-shaped embeddings with the product's task model."""

from __future__ import annotations

import numpy as np
import pytest

from bench import loop
from bench.coldstart import LR_C, Pool
from labelnext.pipelines.config import load_config


def _loop(per_round: int = 10, n: int = 60, kind: type = loop.Loop) -> tuple[loop.Loop, int]:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 16))

    def docs(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        x = centers[y] + 1.5 * rng.standard_normal((n, 16))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.array([f"c{v}" for v in y])

    pool_x, pool_y = docs(n)
    test_x, test_y = docs(90)
    pool = Pool(ids=np.array([f"d{i}" for i in range(n)], dtype=object), emb=pool_x, scores=None)
    return kind(pool, pool_y, test_x, test_y, per_round, load_config(), LR_C), len(pool_x)


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
    from bench import coldstart
    from labelnext.ops.select.selector import Selector

    lp, n = _loop(per_round=4)  # 5 x 4 candidates out of the 40 unlabelled documents
    seen = {}
    real_candidates, real_select = coldstart.candidates, Selector.select

    def candidates(assigned, sizes, budget, cfg, near_key="distance"):
        seen["near_key"] = near_key
        out = real_candidates(assigned, sizes, budget, cfg, near_key=near_key)
        seen["candidates"], seen["pool"] = out.num_rows, assigned.num_rows
        return out

    def select(self, table, sizes, budget):
        seen["columns"], seen["label_counts"] = set(table.column_names), dict(self.label_counts)
        return real_select(self, table, sizes, budget)

    monkeypatch.setattr(coldstart, "candidates", candidates)
    monkeypatch.setattr(Selector, "select", select)
    labelled = np.arange(20)
    model = loop.fit(lp.pool.emb[labelled], lp.pool_y[labelled], LR_C)
    picked = lp.pick("labelnext", labelled, model, seed=0)
    assert len(picked) == 4 and len(set(picked.tolist())) == 4 and not set(picked.tolist()) & set(range(20))
    assert seen["near_key"] == "margin" and seen["candidates"] < seen["pool"] == n - 20
    assert {"margin", "predicted_label"} <= seen["columns"]
    assert sum(seen["label_counts"].values()) == 20


def test_probe_strategy_ranks_by_the_margin_of_the_task_model_and_the_llm_probe_together(monkeypatch):
    """``labelnext+probe`` averages the task model's probabilities with a probe's on the LLM features (trained
    on the same labels) and hands that margin to the same Cluster-Margin selection."""
    lp, n = _loop(per_round=4)
    features = np.random.default_rng(1).standard_normal((n, 24)).astype(np.float32)
    features[:, 0] += 3.0 * (lp.pool_y == "c0")
    lp = loop.Loop(lp.pool, lp.pool_y, lp.test_x, lp.test_y, 4, lp.cfg, LR_C, features)
    labelled = np.arange(20)
    model = loop.fit(lp.pool.emb[labelled], lp.pool_y[labelled], LR_C)
    seen = {}
    real = loop.Loop._cluster_margin

    def cluster_margin(self, rest, margin, predicted, label_counts, budget, seed, with_entropy):
        seen["margin"], seen["predicted"] = margin, predicted
        return real(self, rest, margin, predicted, label_counts, budget, seed, with_entropy)

    monkeypatch.setattr(loop.Loop, "_cluster_margin", cluster_margin)
    picked = lp.pick("labelnext+probe", labelled, model, seed=0)
    assert len(picked) == 4 and not set(picked.tolist()) & set(range(20))
    rest = np.arange(20, n)
    probe_x = loop.standardised(features)
    probe = loop.fit(probe_x[labelled], lp.pool_y[labelled], loop.PROBE_C)
    p = 0.5 * model.predict_proba(lp.pool.emb[rest]) + 0.5 * probe.predict_proba(probe_x[rest])
    np.testing.assert_allclose(seen["margin"], np.sort(p, axis=1)[:, -1] - np.sort(p, axis=1)[:, -2], atol=1e-6)
    assert not np.allclose(seen["margin"], model.margin(lp.pool.emb[rest])[0], atol=1e-3)
    assert (seen["predicted"] == model.classes[np.argmax(p, axis=1)]).all()
    lp.pick("labelnext+probe-only", labelled, model, seed=0)
    p = probe.predict_proba(probe_x[rest])
    np.testing.assert_allclose(seen["margin"], np.sort(p, axis=1)[:, -1] - np.sort(p, axis=1)[:, -2], atol=1e-6)

    without, _ = _loop(per_round=4)
    with pytest.raises(ValueError, match="LLM features"):
        without.pick("labelnext+probe", labelled, model, seed=0)


def test_the_probe_strategy_runs_only_when_asked_for():
    assert not {"labelnext+probe", "labelnext+probe-only"} & set(loop.chosen(None)) and "labelnext" in loop.chosen(None)
    assert loop.chosen(["labelnext+probe"]) == ["random", "labelnext+probe"]
    assert loop.needs_llm_features(loop.chosen(["labelnext+probe"])) and not loop.needs_llm_features(loop.chosen(None))
