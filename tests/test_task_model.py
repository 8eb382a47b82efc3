"""The task model (a real logistic regression on separable data) and selection by its margin."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pyarrow import fs as pafs

from labelnext.ops.cluster import candidates as cand
from labelnext.ops.cluster.kmeans import Assigner, rand_keys
from labelnext.ops.core.columns import CLUSTER_ID, DISTANCE, DOC_ID, MARGIN, PREDICTED_LABEL, RAND_KEY
from labelnext.ops.select.selector import SELECTED_COLUMNS, SelectConfig, Selector, contract
from labelnext.ops.select.margin import select_by_margin
from labelnext.ops.select.task_model import TaskModel, TaskModelConfig, class_balance_tilt, cross_validated_accuracy


def _blobs(n_per_class=60, classes=("finance", "sports", "science"), dim=16, spread=0.15, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[: len(classes)]
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, dim)) for c in centers]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.repeat(np.asarray(classes), n_per_class)
    return x, y, centers


def test_fit_separates_classes_and_margin_is_small_only_between_them():
    x, y, centers = _blobs()
    held_x, held_y, _ = _blobs(seed=1)
    model = TaskModel.fit(x, y)
    assert list(model.classes) == ["finance", "science", "sports"]
    assert (model.predict(held_x) == held_y).mean() > 0.97
    p = model.predict_proba(held_x)
    assert p.shape == (len(held_x), 3) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    margin, predicted = model.margin(np.vstack([centers, (centers[0] + centers[1]) / np.sqrt(2)]))
    assert list(predicted[:3]) == ["finance", "sports", "science"]
    assert margin[:3].min() > 0.5  # a class centre: confident
    assert margin[3] < 0.2  # halfway between finance and sports: uncertain
    assert margin[3] < margin[:3].min()


def test_binary_model_matches_scikit_learn_probabilities():
    from sklearn.linear_model import LogisticRegression

    x, y, _ = _blobs(classes=("neg", "pos"), spread=0.6, seed=3)
    model = TaskModel.fit(x, y, c=2.0)
    reference = LogisticRegression(C=2.0, max_iter=2000).fit(x, y).predict_proba(x)
    assert model.coef.shape == (2, x.shape[1])
    np.testing.assert_allclose(model.predict_proba(x), reference, atol=1e-5)


def test_save_load_round_trip_predicts_the_same(tmp_path):
    x, y, _ = _blobs()
    model = TaskModel.fit(x, y)
    path = str(tmp_path / "task_model.parquet")
    model.save(pafs.LocalFileSystem(), path)
    loaded = TaskModel.load(pafs.LocalFileSystem(), path)
    assert list(loaded.classes) == list(model.classes)
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))


def test_one_class_is_not_a_task_model():
    x, _, _ = _blobs()
    with pytest.raises(ValueError, match="two classes"):
        TaskModel.fit(x, np.full(len(x), "only"))


def test_cross_validated_accuracy_is_held_out_and_needs_two_labels_per_class():
    x, y, _ = _blobs(n_per_class=20)
    accuracy, folds = cross_validated_accuracy(x, y, TaskModelConfig())
    assert folds == 5 and accuracy > 0.95
    noisy_y = np.random.default_rng(0).permutation(y)  # labels unrelated to the vectors: chance level held out
    accuracy, _ = cross_validated_accuracy(x, noisy_y, TaskModelConfig())
    assert accuracy < 0.6
    few = np.concatenate([y[:20], y[20:23], y[40:41]])  # 20, 3 and 1 labels
    assert cross_validated_accuracy(np.concatenate([x[:23], x[40:41]]), few, TaskModelConfig()) == (None, 0)
    accuracy, folds = cross_validated_accuracy(x[:23], y[:23], TaskModelConfig())
    assert folds == 3 and accuracy is not None


def test_assigner_adds_margin_and_predicted_label_for_every_document():
    x, y, centers = _blobs(n_per_class=10)
    model = TaskModel.fit(x, y)
    batch = {DOC_ID: np.array([f"d{i}" for i in range(len(x))], dtype=object), "embedding": x}
    out = Assigner(centers.astype(np.float32), task_model=model)(batch)
    margin, predicted = model.margin(x)
    np.testing.assert_array_equal(out[MARGIN], margin)
    assert list(out[PREDICTED_LABEL]) == list(predicted)
    plain = Assigner(centers.astype(np.float32))({DOC_ID: batch[DOC_ID], "embedding": x})
    assert MARGIN not in plain and PREDICTED_LABEL not in plain


def _assigned(n=80, k=4, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"d{i:03d}" for i in range(n)]
    return pa.table({
        DOC_ID: ids,
        CLUSTER_ID: (np.arange(n) % k).astype(np.int32),
        DISTANCE: rng.random(n).astype(np.float32),
        RAND_KEY: rand_keys(ids, 0),
        MARGIN: rng.random(n).astype(np.float32),
        PREDICTED_LABEL: rng.choice(["a", "b", "c"], n),
    })


def test_candidates_take_the_lowest_margin_per_cluster_plus_a_diverse_share():
    table = _assigned()
    sizes = np.bincount(table.column(CLUSTER_ID).to_numpy())
    plan = cand.plan_candidates(sizes, 4, cand.CandidatesConfig(factor=2.0, diverse_fraction=0.5), near_key=MARGIN)
    partial = pa.concat_tables([cand.block_candidates(table.slice(0, 37), plan),
                                cand.block_candidates(table.slice(37), plan)])
    out = cand.merge_candidates(partial, plan)
    clusters, margins = table.column(CLUSTER_ID).to_numpy(), table.column(MARGIN).to_numpy()
    for c in range(4):
        rows = out.filter(pa.compute.equal(out.column(CLUSTER_ID), c))
        near = rows.filter(pa.compute.equal(rows.column("candidate_reason"), "lowest_margin"))
        lowest = np.sort(margins[clusters == c])[: plan.near[c]]
        np.testing.assert_array_equal(np.sort(near.column(MARGIN).to_numpy()), lowest)
        assert rows.num_rows == plan.near[c] + plan.diverse[c]


def test_selector_ranks_by_lowest_margin_within_cluster_quotas_without_llm_scores():
    table = _assigned()
    sizes = np.array([40, 20, 10, 10])
    cfg = SelectConfig(labels_quota="size", margin_distance_weight=0.0)
    contract(cfg, margin=True).check_input(table.column_names + ["embedding"])  # no LLM score columns needed
    out = Selector(cfg).select(table, sizes, 8)
    assert out.column_names == list(SELECTED_COLUMNS)
    assert set(out.column("reason").to_pylist()) == {"cluster_quota_margin"}
    clusters, margins = table.column(CLUSTER_ID).to_numpy(), table.column(MARGIN).to_numpy()
    got = out.column(CLUSTER_ID).to_numpy()
    assert list(np.bincount(got, minlength=4)) == [4, 2, 1, 1]  # size-proportional quotas
    for c in range(4):
        picked = np.sort(out.filter(pa.compute.equal(out.column(CLUSTER_ID), c)).column(MARGIN).to_numpy())
        np.testing.assert_allclose(picked, np.sort(margins[clusters == c])[: len(picked)], rtol=1e-6)
    assert out.column(PREDICTED_LABEL).null_count == 0


def test_margin_distance_weight_ranks_uncertain_documents_of_the_dense_part_first():
    """By default, with labels, candidates and selection rank by margin + 0.5 x distance to the centroid: a
    slightly less uncertain document near the centroid beats an outlier; at weight 0 the margin alone decides."""
    table = _assigned(n=200, k=4, seed=3)
    clusters = table.column(CLUSTER_ID).to_numpy()
    margins = table.column(MARGIN).to_numpy().astype(np.float64)
    key = margins + 0.5 * table.column(DISTANCE).to_numpy().astype(np.float64)
    sizes = np.bincount(clusters)
    weight = SelectConfig().margin_distance_weight
    assert weight == 0.5
    plan = cand.plan_candidates(sizes, 8, cand.CandidatesConfig(factor=2.0, diverse_fraction=0.0), near_key=MARGIN,
                                distance_weight=weight)
    partial = pa.concat_tables([cand.block_candidates(table.slice(i, 23), plan) for i in range(0, 200, 23)])
    out = cand.merge_candidates(partial, plan)
    assert out.num_rows == plan.total == 16
    differs = []
    for c in range(4):
        got = set(out.filter(pa.compute.equal(out.column(CLUSTER_ID), c)).column(DOC_ID).to_pylist())
        rows = np.flatnonzero(clusters == c)
        by_key = {table.column(DOC_ID)[int(i)].as_py() for i in rows[np.argsort(key[rows])[: plan.near[c]]]}
        by_margin = {table.column(DOC_ID)[int(i)].as_py() for i in rows[np.argsort(margins[rows])[: plan.near[c]]]}
        assert got == by_key
        differs.append(by_key != by_margin)
    assert any(differs)  # the weight changes what is picked

    cfg = SelectConfig(labels_quota="size")
    picked = Selector(cfg).select(table, sizes, 8)
    pos = {d: i for i, d in enumerate(table.column(DOC_ID).to_pylist())}
    for c in range(4):
        rows = [pos[d] for d in picked.filter(pa.compute.equal(picked.column(CLUSTER_ID), c)).column(DOC_ID).to_pylist()]
        in_cluster = np.flatnonzero(clusters == c)
        np.testing.assert_array_equal(np.sort(rows), np.sort(in_cluster[np.argsort(key[in_cluster])[: len(rows)]]))
    plain = Selector(cfg.model_copy(update={"margin_distance_weight": 0.0})).select(table, sizes, 8)
    assert set(plain.column(DOC_ID).to_pylist()) != set(picked.column(DOC_ID).to_pylist())
    np.testing.assert_allclose(np.sort(picked.column(MARGIN).to_numpy()),
                               np.sort(margins[[pos[d] for d in picked.column(DOC_ID).to_pylist()]]), rtol=1e-6)


def test_with_labels_quotas_follow_size_times_how_uncertain_each_cluster_is():
    """The default ``labels_quota``: a confident cluster gets few labels, an uncertain one of the same size many;
    the cold start's ``quota`` does not apply once a task model ranks."""
    n = 80
    ids = [f"d{i:03d}" for i in range(n)]
    clusters = np.repeat([0, 1, 2, 3], 20)
    margin = np.concatenate([np.full(20, 0.9), np.full(20, 0.5), np.full(20, 0.1), np.full(20, 0.5)])
    margin = margin + np.tile(np.linspace(0, 0.05, 20), 4)
    table = pa.table({DOC_ID: ids, CLUSTER_ID: clusters.astype(np.int32),
                      DISTANCE: np.zeros(n, np.float32), RAND_KEY: rand_keys(ids, 0), MARGIN: margin})
    sizes = np.array([20, 20, 20, 40])
    got = np.bincount(Selector(SelectConfig(quota="cover")).select(table, sizes, 12).column(CLUSTER_ID).to_numpy(),
                      minlength=4)
    # weights: size x (mean uncertainty - the most certain cluster's + 0.001): 0.02, 8.0, 16.0, 16.0 (x 1/1000)
    assert got[0] == 0 and got[2] == got[3] > got[1] > 0 and got.sum() == 12
    by_size = Selector(SelectConfig(labels_quota="size")).select(table, sizes, 12).column(CLUSTER_ID).to_numpy()
    assert list(np.bincount(by_size, minlength=4)) == [3, 2, 2, 5]  # largest remainders: cluster 3, then 0


def test_select_by_margin_on_plain_arrays_skips_near_duplicates():
    rng = np.random.default_rng(0)
    clusters = np.repeat([0, 1], 10)
    margins = np.tile(rng.random(10), 2)  # equally uncertain clusters: two picks each
    emb = rng.normal(size=(20, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    lowest = int(np.argmin(np.where(clusters == 0, margins, np.inf)))
    second = int(np.argsort(np.where(clusters == 0, margins, np.inf))[1])
    emb[second] = emb[lowest]  # the runner-up is a copy of the best: never both
    picked = select_by_margin(clusters, margins, np.array([10, 10]), 4, embeddings=emb)
    assert len(picked) == 4 and lowest in picked and second not in picked
    plain = select_by_margin(clusters, margins, np.array([10, 10]), 4)
    assert second in plain


def test_select_by_margin_on_plain_arrays_weighs_the_distance_to_the_centroid():
    clusters = np.zeros(3, dtype=np.int64)
    margins = np.array([0.10, 0.20, 0.30])
    distances = np.array([0.60, 0.10, 0.10])  # the most uncertain document is the cluster's outlier
    assert select_by_margin(clusters, margins, np.array([3]), 1, distances=distances).tolist() == [1]
    assert select_by_margin(clusters, margins, np.array([3]), 1, distances=distances,
                            margin_distance_weight=0.0).tolist() == [0]
    assert select_by_margin(clusters, margins, np.array([3]), 1).tolist() == [0]


def test_class_balance_tilts_quotas_towards_rare_predicted_labels():
    clusters = np.repeat([0, 1], 10)
    predicted = np.array(["common"] * 10 + ["rare"] * 10)
    counts = {"common": 90, "rare": 10}
    assert np.allclose(class_balance_tilt(clusters, predicted, counts, 2, 0.0), 1.0)
    full = class_balance_tilt(clusters, predicted, counts, 2, 1.0)
    half = class_balance_tilt(clusters, predicted, counts, 2, 0.5)
    assert full[1] / full[0] == pytest.approx((91 / 11), rel=1e-6)
    assert 1 < half[1] / half[0] < full[1] / full[0]
    margins = np.tile(np.linspace(0.1, 0.9, 10), 2)  # both clusters equally uncertain: quotas follow size
    off = select_by_margin(clusters, margins, np.array([10, 10]), 6, predicted=predicted, label_counts=counts)
    on = select_by_margin(clusters, margins, np.array([10, 10]), 6, predicted=predicted, label_counts=counts,
                          class_balance=1.0)
    assert (clusters[off] == 1).sum() == 3 and (clusters[on] == 1).sum() == 5


def test_with_llm_scores_entropy_only_breaks_near_ties_of_the_margin():
    ids = [f"d{i}" for i in range(10)]
    entropy = np.full(10, 1.0)
    entropy[0], entropy[1], entropy[5] = 0.5, 9.0, 8.0  # d1: a near-tie with d0 and more entropy; d5: far off
    table = pa.table({
        DOC_ID: ids, CLUSTER_ID: pa.array(np.zeros(10), pa.int32()), DISTANCE: pa.array(np.full(10, 0.1), pa.float32()),
        RAND_KEY: rand_keys(ids, 0), MARGIN: np.linspace(0.1, 0.9, 10), "uncertainty": entropy,
    })
    sizes = np.array([10])
    margin_only = Selector(SelectConfig()).select(table, sizes, 2).column(DOC_ID).to_pylist()
    with_llm = Selector(SelectConfig(llm_with_labels=True)).select(table, sizes, 2).column(DOC_ID).to_pylist()
    assert margin_only == ["d0", "d1"]
    assert with_llm == ["d1", "d0"]  # d5's entropy cannot make up for its margin rank
