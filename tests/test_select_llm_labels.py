"""Selection with the task-aware LLM's columns (``score.task``): the cold-start quotas spread over its predicted
labels (``select.llm_label_quota``), and, with labels, its disagreement with the task model
(``select.llm_disagreement``). Synthetic columns stand for the Scorer's output."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from labelnext.ops.cluster.kmeans import CLUSTER_ID, DISTANCE, RAND_KEY
from labelnext.ops.select.llm_labels import disagreement, fill_spreading_labels
from labelnext.ops.select.selector import Selector, contract, uses_llm
from labelnext.pipelines.config import SelectConfig, load_config


def _table(clusters, distance, llm_label, uncertainty=None, **extra):
    n = len(clusters)
    return pa.table({
        "doc_id": [f"d{i}" for i in range(n)],
        CLUSTER_ID: np.asarray(clusters, np.int32),
        DISTANCE: np.asarray(distance, np.float32),
        RAND_KEY: np.arange(n),
        "uncertainty": np.zeros(n) if uncertainty is None else np.asarray(uncertainty, np.float64),
        "llm_label": llm_label,
        **extra,
    })


def _picked(out: pa.Table) -> list[str]:
    return out.column("doc_id").to_pylist()


def test_label_quota_spreads_one_cluster_per_label_over_the_llms_labels():
    # Two clusters (topics) of four each; in both, the nearest documents are predicted "pos".
    t = _table([0, 0, 0, 0, 1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.1, 0.2, 0.3, 0.4],
               ["pos", "pos", "neg", "neg", "pos", "pos", "neg", "neg"])
    sizes = np.array([4, 4])
    plain = Selector(SelectConfig(rule="cluster_only", quota="size", dedup_threshold=1.0)).select(t, sizes, 4)
    assert sorted(_picked(plain)) == ["d0", "d1", "d4", "d5"]  # nearest first: every pick "pos"
    spread = Selector(SelectConfig(rule="cluster_only", quota="size", dedup_threshold=1.0,
                                   llm_label_quota=True)).select(t, sizes, 4)
    # Quotas stay 2 + 2; each pass over the clusters takes the nearest document of the least-taken label:
    # cluster 0 "pos" d0, cluster 1 "neg" d6, cluster 0 (a tie) its nearest d1, cluster 1 "neg" d7.
    assert np.bincount(spread.column("cluster_id").to_numpy(), minlength=2).tolist() == [2, 2]
    assert _picked(spread) == ["d0", "d6", "d1", "d7"]
    labels = t.column("llm_label").to_pylist()
    assert sorted(labels[int(d[1:])] for d in _picked(spread)) == ["neg", "neg", "pos", "pos"]


def test_label_quota_keeps_the_rank_order_when_every_label_is_equally_taken():
    t = _table([0, 0, 1, 1], [0.3, 0.1, 0.2, 0.4], ["a", "b", "b", "a"])
    cfg = SelectConfig(rule="cluster_only", quota="cover", dedup_threshold=1.0, llm_label_quota=True)
    # Cluster 0 (first pass, labels untaken) takes its nearest ("b"); cluster 1 then prefers "a" over its nearer "b".
    assert _picked(Selector(cfg).select(t, np.array([2, 2]), 2)) == ["d1", "d3"]


def test_fill_spreading_labels_skips_refused_rows_and_stops_at_the_quotas():
    ranked = {0: [0, 1, 2], 1: [3, 4]}
    labels = np.array(["x", "x", "y", "x", "y"], dtype=object)
    taken = []

    def try_take(i):
        if i == 2:  # a near-duplicate
            return False
        taken.append(i)
        return True

    fill_spreading_labels(ranked, np.array([2, 1]), labels, try_take)
    # Cluster 0 (larger quota) first: "x" row 0; cluster 1: "y" row 4; cluster 0 again: "y" row 2 is refused,
    # so its next best, row 1.
    assert taken == [0, 4, 1]


def test_label_quota_turns_the_llm_on_and_needs_its_labels():
    cfg = SelectConfig(rule="cluster_only", llm_label_quota=True)
    assert uses_llm(cfg) and not uses_llm(SelectConfig(rule="cluster_only"))
    assert "llm_label" in contract(cfg).needs and "llm_label" not in contract(cfg, margin=True).needs
    t = _table([0, 1], [0.1, 0.1], ["a", "b"]).drop_columns(["llm_label"])
    with pytest.raises(ValueError, match="score.task.choices"):
        Selector(cfg).select(t, np.array([1, 1]), 2)


def test_disagreement_compares_label_names_loosely():
    t = pa.table({"llm_label": ["book flight", "Sports", None, "World"],
                  "predicted_label": ["book_flight", "Politics", "Sports", "world"]})
    assert disagreement(t).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_with_labels_disagreement_ranks_candidates_as_if_less_certain():
    t = _table([0, 0, 0], [0.0, 0.0, 0.0], ["neg", "pos", "pos"], uncertainty=[1.0, 1.0, 1.0],
               margin=np.array([0.30, 0.20, 0.25]), predicted_label=["pos", "pos", "pos"])
    sizes = np.array([3])
    off = SelectConfig(llm_with_labels=True, margin_distance_weight=0.0, dedup_threshold=1.0)
    assert _picked(Selector(off).select(t, sizes, 1)) == ["d1"]  # lowest margin
    on = off.model_copy(update={"llm_disagreement": 0.2})
    assert _picked(Selector(on).select(t, sizes, 1)) == ["d0"]  # 0.30 - 0.2 < 0.20
    small = off.model_copy(update={"llm_disagreement": 0.05})
    assert _picked(Selector(small).select(t, sizes, 1)) == ["d1"]  # 0.25 is not below 0.20


def test_disagreement_needs_the_llm_with_labels_and_the_error_names_the_key():
    with pytest.raises(ValidationError, match="llm_disagreement") as err:
        SelectConfig(llm_disagreement=0.2)
    assert "llm_with_labels" in str(err.value)
    assert load_config(overrides=["select.llm_with_labels=true", "select.llm_disagreement=0.2"]).select \
        .llm_disagreement == 0.2
