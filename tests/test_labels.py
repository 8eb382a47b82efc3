"""Reading the labels returned by annotators: bad files, null labels, duplicates, and matching their vectors."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labelnext.ops.io import labels as lb
from labelnext.ops.io.read import id_hash
from labelnext.ops.io.s3 import StorageConfig


def _write(path, mtime=None, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _read(uri, id_column="doc_id", label_column="label"):
    return lb.read_labels(str(uri), id_column, label_column, StorageConfig())


def test_latest_label_wins_by_file_time_then_row_and_bad_rows_are_counted(tmp_path):
    # "b-night1" sorts after "a-night2" by name but was written first: modification time decides.
    _write(tmp_path / "labels" / "b-night1.parquet", mtime=1_000,
           doc_id=["d1", "d2", "d3", None], label=["sports", "finance", None, "food"])
    _write(tmp_path / "labels" / "a-night2.parquet", mtime=2_000,
           doc_id=["d2", "d4", "d4"], label=["science", "food", "health"])
    _write(tmp_path / "labels" / "_SUCCESS.parquet", mtime=3_000, doc_id=["d1"], label=["hidden"])
    labels = _read(tmp_path / "labels")
    got = dict(zip(labels.doc_ids.to_pylist(), labels.labels.to_pylist()))
    assert got == {"d1": "sports", "d2": "science", "d4": "health"}
    assert (labels.files, labels.rows, labels.null_labels, labels.duplicate_labels) == (2, 7, 2, 2)
    assert labels.counts() == {"health": 1, "science": 1, "sports": 1}
    assert labels.summary()["labelled_docs"] == 3
    assert list(labels.hashes()) == sorted(id_hash(["d1", "d2", "d4"]))


def test_integer_ids_and_boolean_labels_compare_as_strings(tmp_path):
    path = _write(tmp_path / "l.parquet", doc_id=pa.array([7, 8], pa.int64()), label=pa.array([True, False]))
    labels = _read(path)
    assert labels.doc_ids.to_pylist() == ["7", "8"] and labels.labels.to_pylist() == ["true", "false"]


def test_configured_column_names(tmp_path):
    path = _write(tmp_path / "l.parquet", id=["x"], topic=["food"])
    labels = _read(path, id_column="id", label_column="topic")
    assert labels.doc_ids.to_pylist() == ["x"] and labels.labels.to_pylist() == ["food"]


@pytest.mark.parametrize("columns, message", [
    ({"doc_id": ["a"], "class": ["x"]}, "missing column 'label' (has: doc_id, class); set input.label_column"),
    ({"id": ["a"], "label": ["x"]}, "missing column 'doc_id' (has: id, label); set input.label_id_column"),
    ({"doc_id": ["a"], "label": [0.5]}, "column 'label' must be string, integer or boolean, found double"),
    ({"doc_id": [1.5], "label": ["x"]}, "column 'doc_id' must be string or integer, found double"),
])
def test_bad_label_files_fail_with_one_error_naming_file_and_column(tmp_path, columns, message):
    _write(tmp_path / "labels" / "good.parquet", mtime=1_000, doc_id=["z"], label=["y"])
    bad = _write(tmp_path / "labels" / "bad.parquet", mtime=2_000, **columns)
    with pytest.raises(lb.LabelsError) as info:
        _read(tmp_path / "labels")
    assert str(info.value) == f"input.labels {bad}: {message}"


def test_an_unreadable_label_file_is_named(tmp_path):
    path = tmp_path / "labels" / "broken.parquet"
    path.parent.mkdir()
    path.write_bytes(b"not parquet at all")
    with pytest.raises(lb.LabelsError, match=f"input.labels {path}: not a readable Parquet file"):
        _read(tmp_path / "labels")


def test_a_prefix_without_files_yet_is_a_cold_start(tmp_path):
    labels = _read(tmp_path / "nothing-here")
    assert len(labels) == 0 and labels.rows == 0
    assert "cold start" in labels.notes[0]


def test_keep_ids_filters_by_id_hash():
    table = pa.table({"doc_id": ["a", "b", "c"], "x": [1, 2, 3]})
    kept = lb.keep_ids(table, np.unique(id_hash(["c", "a", "zz"])))
    assert kept.column("doc_id").to_pylist() == ["a", "c"]
    assert lb.keep_ids(table, np.empty(0, np.uint64)).num_rows == 0


def test_vectors_come_from_the_same_text_tonight_else_from_the_cache():
    v = {name: np.full(3, i, np.float32) for i, name in enumerate(["t1", "t2-old", "e1-b", "e1-a"])}
    tonight = (["t1", "t2", "t3"], ["h1", "h2-new", "h3"])
    cached = (["t1", "t2", "e1", "e1"], ["h1", "h2-old", "hb", "ha"],
              np.stack([v["t1"], v["t2-old"], v["e1-b"], v["e1-a"]]))
    vectors, todo = lb.match_vectors(tonight, cached)
    assert todo == ["t2", "t3"]  # t2's text changed since it was cached; t3 was never cached
    assert set(vectors) == {"t1", "e1"}
    np.testing.assert_array_equal(vectors["t1"], v["t1"])
    np.testing.assert_array_equal(vectors["e1"], v["e1-a"])  # smallest text hash, whatever the file order


def test_training_set_counts_labels_without_a_vector_and_samples_above_the_cap():
    labels = lb.LabelSet(pa.array(["a", "b", "c", "d"]), pa.array(["x", "y", "x", "y"]))
    vectors = {d: np.full(2, i, np.float32) for i, d in enumerate(["a", "b", "d"])}
    train = lb.training_set(labels, vectors)
    assert train.without_embedding == 1 and list(train.y) == ["x", "y", "y"] and train.x.shape == (3, 2)
    capped = lb.training_set(labels, vectors, max_labels=2)
    assert len(capped.y) == 2 and capped.without_embedding == 1
    assert capped.x.tolist() == lb.training_set(labels, vectors, max_labels=2).x.tolist()  # seeded


def test_collect_columns_stacks_vectors():
    batches = [{"doc_id": np.array(["a"], dtype=object), "embedding": np.ones((1, 2), np.float32)},
               {"doc_id": np.array([], dtype=object), "embedding": np.zeros((0, 2), np.float32)},
               {"doc_id": np.array(["b"], dtype=object),
                "embedding": np.array([np.zeros(2, np.float32)], dtype=object)}]
    got = lb.collect_columns(batches, ("doc_id", "embedding"))
    assert got["doc_id"] == ["a", "b"] and got["embedding"].tolist() == [[1, 1], [0, 0]]
