import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from labelnext.ops.io import read as rd
from labelnext.pipelines.config import InputConfig
from tests.conftest import write_corpus

LOCAL = pafs.LocalFileSystem()


def _read_all(path, cfg=InputConfig()):
    files = rd.list_corpus_files(LOCAL, str(path), str(path))
    infos = rd.inspect_files(LOCAL, files, cfg)
    return pa.concat_tables([t for f in infos for t in rd.read_file(LOCAL, f, cfg)])


def test_rows_are_validated_with_reasons(tmp_path):
    p = write_corpus(tmp_path / "c.parquet", ["a", "b", "c", "d", "e"], ["ok text", None, "", "  \n\t", "x" * 50])
    t = _read_all(p, InputConfig(max_chars=10))
    assert t.column("reject_reason").to_pylist() == [None, rd.REJECT_NULL, rd.REJECT_EMPTY, rd.REJECT_EMPTY, None]
    assert t.column("text").to_pylist()[4] == "x" * 10
    assert t.column("text_truncated").to_pylist() == [False, False, False, False, True]


def test_non_utf8_binary_text_is_rejected(tmp_path):
    p = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": pa.array([b"fine", b"\xff\xfe bad"], pa.binary())}), p)
    t = _read_all(p)
    assert t.column("reject_reason").to_pylist() == [None, rd.REJECT_NON_UTF8]


def test_missing_and_mistyped_columns_name_file_and_column(tmp_path):
    p = write_corpus(tmp_path / "m.parquet", ["a"], ["t"])
    with pytest.raises(rd.CorpusError, match=r"m\.parquet.*missing column 'body'"):
        _read_all(p, InputConfig(text_column="body"))
    q = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": [1.5]}), q)
    with pytest.raises(rd.CorpusError, match=r"typed\.parquet.*'text' must be string"):
        _read_all(q)


def test_not_parquet_and_missing_paths(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "junk.parquet").write_text("not parquet")
    with pytest.raises(rd.CorpusError, match=r"junk\.parquet: not a readable Parquet file"):
        _read_all(tmp_path / "d")
    with pytest.raises(rd.CorpusError, match="corpus not found"):
        rd.list_corpus_files(LOCAL, str(tmp_path / "nope"), "nope")


def test_folder_reads_files_in_order_and_integer_ids(tmp_path):
    write_corpus(tmp_path / "f" / "part-1.parquet", ["x"], ["one"])
    pq.write_table(pa.table({"id": [7], "text": ["two"]}), tmp_path / "f" / "part-0.parquet")
    (tmp_path / "f" / "_SUCCESS").write_text("")
    t = _read_all(tmp_path / "f")
    assert t.column("doc_id").to_pylist() == ["7", "x"]


def test_duplicates_keep_the_first_occurrence():
    ids = ["a", "b", "a", "c", "b", "a"]
    orders = np.array([10, 11, 12, 13, 3, 20], dtype=np.int64)
    hashes = rd.id_hash(ids)
    cands = rd.duplicate_orders(hashes, orders)
    rows = pa.table({"doc_id": [i for i, o in zip(ids, orders) if o in cands or True],
                     rd.ORDER: orders})
    dups = rd.exact_duplicates(rows)
    # "b" first seen at order 3, "a" at order 10
    assert dups == {11, 12, 20}
    assert set(cands.tolist()) == {11, 12, 20}


# -- reads split by row group ----------------------------------------------------------------------------------

def _grouped_file(path, n_groups, rows_per_group, bad_rows=()):
    ids = [f"r{i}" for i in range(n_groups * rows_per_group)]
    texts = [None if i in bad_rows else f"text {i}" for i in range(len(ids))]
    pq.write_table(pa.table({"id": ids, "text": texts}), path, row_group_size=rows_per_group)
    return path


def test_one_big_file_is_read_by_several_tasks_with_exact_row_numbers(tmp_path):
    write_corpus(tmp_path / "c" / "a.parquet", ["first"], ["one"])
    _grouped_file(tmp_path / "c" / "b.parquet", n_groups=10, rows_per_group=100, bad_rows={0, 457, 999})
    cfg = InputConfig()
    infos = rd.inspect_files(LOCAL, rd.list_corpus_files(LOCAL, str(tmp_path / "c"), "c"), cfg)
    assert infos[1].group_rows == (100,) * 10
    tasks = rd.read_tasks(infos, max_rows=250)
    big = [t for t in tasks if t.file_index == 1]
    assert [(t.first_group, t.groups, t.first_row) for t in big] == [(0, 2, 0), (2, 2, 200), (4, 2, 400),
                                                                     (6, 2, 600), (8, 2, 800)]
    parts = pa.concat_tables([table for t in big for table in rd.read_part(LOCAL, t, cfg)])
    assert parts.column("doc_id").to_pylist() == [f"r{i}" for i in range(1000)]
    assert parts.column(rd.ORDER).to_pylist() == [(1 << rd.ROW_BITS) + i for i in range(1000)]
    bad = parts.filter(pa.compute.invert(pa.compute.is_null(parts.column("reject_reason"))))
    assert (bad.column(rd.ORDER).to_numpy() & ((1 << rd.ROW_BITS) - 1)).tolist() == [0, 457, 999]
    whole = pa.concat_tables(rd.read_file(LOCAL, infos[1], cfg))
    assert whole.equals(parts)


def test_a_row_group_larger_than_a_task_is_one_task(tmp_path):
    path = _grouped_file(tmp_path / "g.parquet", n_groups=3, rows_per_group=300)
    infos = rd.inspect_files(LOCAL, [str(path)], InputConfig())
    assert [(t.first_group, t.groups, t.rows) for t in rd.read_tasks(infos, max_rows=100)] == [
        (0, 1, 300), (1, 1, 300), (2, 1, 300)]
    assert sum(t.rows for t in rd.read_tasks(infos, max_rows=10_000)) == 900


# -- the duplicate scan: a hash shuffle of slim keys ------------------------------------------------------------

def test_duplicate_scan_over_hash_partitions_matches_the_exact_check():
    rng = np.random.default_rng(0)
    ids = [f"id{i}" for i in rng.integers(0, 300, size=1000)]
    orders = rng.permutation(1000).astype(np.int64)
    truncated = rng.random(1000) < 0.2
    keys = pa.table({"doc_id": ids, rd.ID_HASH: rd.id_hash(ids), rd.ORDER: orders,
                     "reject_reason": pa.array([None] * 1000, pa.string()), "text_truncated": truncated})
    excluded = np.sort(rd.id_hash(["id1", "id2", "id3", "not-in-corpus"]))
    blocks = [keys.slice(i, 100) for i in range(0, 1000, 100)]
    pieces = [rd.hash_partitions(b, 4) for b in blocks]
    scan = rd.merge_scans([rd.scan_partition([p[i] for p in pieces], excluded) for i in range(4)])
    expected = rd.exact_duplicates(keys)
    assert sorted(scan.dups.tolist()) == sorted(expected)
    kept = ~np.isin(orders, list(expected))
    assert scan.truncated == int((truncated & kept).sum())
    assert scan.excluded == sum(1 for i, k in zip(ids, kept) if k and i in {"id1", "id2", "id3"})


# -- input.embedding_column --------------------------------------------------------------------------------------

def _vector_corpus(path, vectors, vector_type=None, texts=None):
    ids = [f"v{i}" for i in range(len(vectors))]
    texts = texts or [f"text {i}" for i in range(len(vectors))]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "text": texts, "vec": pa.array(vectors, vector_type)}), path)
    return path


def _read_vectors(path, cfg, encoder_dim=None):
    infos = rd.inspect_files(LOCAL, rd.list_corpus_files(LOCAL, str(path), str(path)), cfg)
    dim = rd.vector_dimension(LOCAL, infos, cfg, encoder_dim)
    return pa.concat_tables([t for f in infos for t in rd.read_file(LOCAL, f, cfg, dim=dim)]), dim


VECTORS = InputConfig(embedding_column="vec")


def test_corpus_vectors_are_normalised_and_bad_ones_rejected_with_a_reason(tmp_path):
    path = _vector_corpus(tmp_path / "v.parquet", [
        [3.0, 4.0, 0.0], None, [1.0, 2.0], [float("nan"), 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, None, 2.0],
        [0.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]], pa.list_(pa.float64()))
    table, dim = _read_vectors(path, VECTORS)
    assert dim == 3
    assert table.column("reject_reason").to_pylist() == [
        None, "null_embedding", "wrong_embedding_dimension", "non_finite_embedding", "zero_embedding",
        "non_finite_embedding", None, "wrong_embedding_dimension"]
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert vectors.dtype == np.float32 and vectors.shape == (8, 3)
    np.testing.assert_allclose(vectors[0], [0.6, 0.8, 0.0], rtol=1e-6)
    np.testing.assert_allclose(vectors[6], [0.0, 0.0, 1.0])


def test_a_text_problem_wins_over_a_vector_problem(tmp_path):
    path = _vector_corpus(tmp_path / "v.parquet", [[1.0, 0.0], None], texts=["fine", None])
    table, _ = _read_vectors(path, VECTORS)
    assert table.column("reject_reason").to_pylist() == [None, rd.REJECT_NULL]


def test_a_column_that_is_not_a_list_is_a_one_line_error_naming_file_and_column(tmp_path):
    path = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["t"], "vec": ["0.1,0.2"]}), path)
    with pytest.raises(rd.CorpusError, match=r"strings\.parquet: column 'vec' \(input\.embedding_column\) must be "
                                             r"a list of floats, found string"):
        rd.inspect_files(LOCAL, [str(path)], VECTORS)
    lists = _vector_corpus(tmp_path / "words.parquet", [["a", "b"]])
    with pytest.raises(rd.CorpusError, match=r"words\.parquet.*'vec'.*a list of string"):
        rd.inspect_files(LOCAL, [str(lists)], VECTORS)
    with pytest.raises(rd.CorpusError, match=r"strings\.parquet: missing column 'emb'"):
        rd.inspect_files(LOCAL, [str(path)], InputConfig(embedding_column="emb"))


def test_the_expected_dimension_comes_from_the_schema_the_first_vector_or_the_encoder(tmp_path):
    fixed = pa.list_(pa.float32(), 2)
    _vector_corpus(tmp_path / "c" / "a.parquet", [[1.0, 0.0]], fixed)
    _vector_corpus(tmp_path / "c" / "b.parquet", [[1.0, 0.0, 0.0]], pa.list_(pa.float32(), 3))
    with pytest.raises(rd.CorpusError, match=r"b\.parquet: column 'vec' holds 3-d vectors, .*a\.parquet holds 2-d"):
        _read_vectors(tmp_path / "c", VECTORS)
    # variable-length lists: the first non-null vector in file order sets the dimension
    _vector_corpus(tmp_path / "d" / "a.parquet", [None, [1.0, 0.0, 0.0]], pa.list_(pa.float32()))
    _vector_corpus(tmp_path / "d" / "b.parquet", [[1.0, 2.0], [0.0, 1.0, 0.0]], pa.list_(pa.float32()))
    table, dim = _read_vectors(tmp_path / "d", VECTORS)
    assert dim == 3
    assert table.column("reject_reason").to_pylist() == ["null_embedding", None, "wrong_embedding_dimension", None]
    with pytest.raises(rd.CorpusError, match=r"a\.parquet: column 'vec' holds 3-d vectors but embed\.model makes "
                                             r"384-d"):
        _read_vectors(tmp_path / "d", VECTORS, encoder_dim=384)


def test_the_bundled_encoder_dimension_is_read_without_loading_it():
    from labelnext.ops.io.input_vectors import encoder_dimension
    from labelnext.pipelines.config import BUNDLED_ENCODER

    assert encoder_dimension(BUNDLED_ENCODER) == 384
    assert encoder_dimension("some-org/not-downloaded-model") is None
