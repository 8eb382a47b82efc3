import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from labelnext.ops import read as rd
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
