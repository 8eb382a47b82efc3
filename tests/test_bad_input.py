"""Bad input through the real CLI: a one-line error naming the file/column/key (exit code non-zero, no
traceback, nothing written), or a committed run whose rejects carry a reason for every bad row.
"""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from labelnext.ops.io import read as rd
from labelnext.pipelines.config import InputConfig
from tests.cli_run import QUICK, error_line, labelnext, manifest, run_dir, selected_ids
from tests.conftest import write_corpus

SENTENCES = [
    "Gradient clipping keeps the update norm bounded during fine-tuning.",
    "The tomato harvest was late this year because of the cold spring.",
    "A Parquet file stores columns in row groups with a footer at the end.",
    "The orchestra rehearsed the second movement twice before the concert.",
    "Tokenizers split rare words into several subword pieces.",
    "The ferry to the island leaves every two hours in summer.",
    "Annotators disagree most on sarcastic or ambiguous sentences.",
    "She repaired the bicycle chain with a spare link and some oil.",
    "Object storage lists keys under a prefix, not real directories.",
    "The museum opened a new wing dedicated to early photography.",
    "Learning rate warmup avoids large updates in the first steps.",
    "Fresh bread tastes best with a little salted butter.",
]


def assert_one_line_error(proc, *names: str) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    line = error_line(proc)
    assert line.startswith("error:"), proc.stderr[-4000:]
    for name in names:
        assert name in line, f"{name!r} not in {line!r}"
    return line


@pytest.fixture
def good_corpus(tmp_path):
    return write_corpus(tmp_path / "good.parquet", [f"d{i}" for i in range(len(SENTENCES))], SENTENCES)


def run_args(corpus, output, *extra, budget="3"):
    return ("run", "--corpus", str(corpus), "--output", str(output), "--budget", budget, *QUICK, *extra)


# -- arguments and config: rejected before Ray starts (fast) -------------------------------------------------

@pytest.mark.parametrize("extra, budget, names", [
    ((), "0", ["--budget", "0"]),
    ((), "-3", ["--budget", "-3"]),
    (("--set", "embed.modle=x"), "3", ["embed.modle", "unknown"]),
    (("--set", "sorce=x"), "3", ["sorce"]),
    (("--set", "cluster.k=abc"), "3", ["cluster.k", "integer"]),
    (("--set", "cluster.k=0"), "3", ["cluster.k", "greater than 0"]),
    (("--set", "candidates.factor=0.5"), "3", ["candidates.factor"]),
    (("--set", "select.dedup_threshold=2"), "3", ["select.dedup_threshold"]),
    (("--set", "input.text_column=id"), "3", ["input.id_column", "input.text_column"]),
    (("--set", "storage.sse=aws:kms"), "3", ["storage.kms_key_id"]),
    (("--set", "cluster.k.x=1"), "3", ["cluster.k"]),
    (("--set", "noequals"), "3", ["noequals"]),
    (("--run-id", "../escape"), "3", ["run id", "../escape"]),
    (("--run-id", "a/b"), "3", ["run id", "a/b"]),
    (("--run-id", ".."), "3", ["run id"]),
    (("--run-id", ""), "3", ["run id"]),
    (("--run-id", ".hidden"), "3", ["run id"]),
    (("--run-id", "x" * 200), "3", ["run id"]),
    (("--run-date", "../2026-01-01"), "3", ["run date"]),
    (("--run-date", "2026-01-01/../../x"), "3", ["run date"]),
    (("--run-date", "2026-13-01"), "3", ["run date"]),
    (("--run-date", ""), "3", ["run date"]),
])
def test_bad_arguments_fail_fast_with_one_line(good_corpus, tmp_path, extra, budget, names):
    out = tmp_path / "out"
    proc = labelnext(*run_args(good_corpus, out, *extra, budget=budget))
    assert_one_line_error(proc, *names)
    assert proc.returncode == 2
    assert not out.exists()


@pytest.mark.parametrize("text, names", [
    ("embed:\n  modle: x\n", ["embed.modle", "unknown key", "bad.yaml"]),
    ("cluster:\n  k: many\n", ["cluster.k", "bad.yaml"]),
    ("cluster: 3\n", ["cluster", "bad.yaml"]),
    ("score: {max_tokens: 1}\n", ["score.max_tokens", "bad.yaml"]),
    ("embed: [unclosed\n", ["bad.yaml", "YAML"]),
    ("- a\n- b\n", ["bad.yaml", "mapping"]),
])
def test_bad_config_file_names_the_file_and_key(good_corpus, tmp_path, text, names):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    proc = labelnext(*run_args(good_corpus, tmp_path / "out", "--config", str(cfg)))
    assert_one_line_error(proc, *names)
    assert not (tmp_path / "out").exists()


def test_missing_config_file(good_corpus, tmp_path):
    proc = labelnext(*run_args(good_corpus, tmp_path / "out", "--config", str(tmp_path / "nope.yaml")))
    assert_one_line_error(proc, "nope.yaml", "not found")


# -- corpus problems: one line naming the file and column (after Ray starts, before any model runs) ----------

def _missing_text_column(d):
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), d / "part-0.parquet")
    return d / "part-0.parquet", ["part-0.parquet", "missing column 'text'"]


def _mistyped_id_column(d):
    pq.write_table(pa.table({"id": [1.5, 2.5], "text": ["a", "b"]}), d / "floats.parquet")
    return d / "floats.parquet", ["floats.parquet", "'id'", "string or integer"]


def _second_file_lacks_id(d):
    write_corpus(d / "c" / "part-0.parquet", ["a"], ["fine"])
    pq.write_table(pa.table({"doc": ["b"], "text": ["x"]}), d / "c" / "part-1.parquet")
    return d / "c", ["part-1.parquet", "missing column 'id'"]


def _not_found(d):
    return d / "no-such-corpus", ["no-such-corpus", "not found"]


def _empty_corpus(d):
    write_corpus(d / "empty.parquet", [], [])
    return d / "empty.parquet", ["empty.parquet", "empty"]


def _empty_folder(d):
    (d / "c").mkdir()
    (d / "c" / "_SUCCESS").write_text("")
    return d / "c", ["holds no files"]


def _text_file_among_parquet(d):
    write_corpus(d / "c" / "part-0.parquet", ["a"], ["fine"])
    (d / "c" / "notes.txt").write_text("not parquet\n")
    return d / "c", ["notes.txt", "not a readable Parquet file"]


def _truncated_parquet(d):
    write_corpus(d / "c" / "part-0.parquet", ["a"], ["fine"])
    data = (d / "c" / "part-0.parquet").read_bytes()
    (d / "c" / "part-1.parquet").write_bytes(data[: len(data) // 2])
    return d / "c", ["part-1.parquet", "not a readable Parquet file"]


def _unreadable_file(d):
    path = write_corpus(d / "locked.parquet", ["a"], ["fine"])
    path.chmod(0)
    if os.geteuid() == 0:
        # Root reads files whatever their mode; a link to a file that is gone cannot be opened by anyone.
        path.unlink()
        path.symlink_to(d / "gone.parquet")
    return path, ["locked.parquet"]


def _corrupt_data_page(d):
    """A valid footer over a damaged page: only reading the rows (in a Ray task) finds out."""
    path = write_corpus(d / "corrupt.parquet", [f"d{i}" for i in range(200)], [f"text {i} " * 8 for i in range(200)])
    meta = pq.ParquetFile(path).metadata
    start = meta.row_group(0).column(1).data_page_offset + 8
    data = bytearray(path.read_bytes())
    data[start:start + 64] = b"\xab" * 64
    path.write_bytes(bytes(data))
    return path, ["corrupt.parquet", "failed to read"]


def _read_everything(corpus):
    """What the pipeline's read stage does with a local corpus, without Ray."""
    local = pafs.LocalFileSystem()
    files = rd.list_corpus_files(local, str(corpus), str(corpus))
    for info in rd.inspect_files(local, files, InputConfig()):
        for _ in rd.read_file(local, info, InputConfig(), info.path):
            pass


@pytest.mark.parametrize("make", [
    _missing_text_column, _mistyped_id_column, _second_file_lacks_id, _not_found, _empty_folder,
    _text_file_among_parquet, _truncated_parquet, _unreadable_file, _corrupt_data_page,
], ids=lambda f: f.__name__.strip("_"))
def test_reader_names_the_bad_file_and_column(tmp_path, make):
    corpus, names = make(tmp_path)
    with pytest.raises(rd.CorpusError) as err:
        _read_everything(corpus)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message


@pytest.mark.slow
@pytest.mark.parametrize("make", [
    _not_found, _missing_text_column, _text_file_among_parquet, _empty_corpus, _corrupt_data_page,
], ids=lambda f: f.__name__.strip("_"))
def test_bad_corpus_fails_with_one_line_naming_file_and_column(tmp_path, make):
    corpus, names = make(tmp_path)
    out = tmp_path / "out"
    proc = labelnext(*run_args(corpus, out, "--run-id", "bad", "--run-date", "2026-11-25"))
    assert_one_line_error(proc, *names)
    assert proc.returncode == 1
    assert not (run_dir(out, "bad") / "manifest.json").exists()


@pytest.mark.slow
def test_every_row_rejected_fails_with_one_line(tmp_path):
    corpus = write_corpus(tmp_path / "blank.parquet", ["a", "b", "c"], [None, "", " \t\n"])
    proc = labelnext(*run_args(corpus, tmp_path / "out"))
    assert_one_line_error(proc, "no documents left")


# -- bad rows: counted and written to rejects with a reason; the run commits ----------------------------------

def _bytes_column(values):
    """A Parquet *string* column that may hold invalid UTF-8 (as some writers produce)."""
    return pa.array(values, pa.binary()).view(pa.string())


def test_reader_rejects_invalid_utf8_in_a_string_column_row_by_row(tmp_path):
    path = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"id": _bytes_column([b"ok", b"bad-text", b"bad-id-\xff", b"null"]),
                             "text": _bytes_column([b"fine", b"caf\xe9", b"fine", None])}), path)
    info = rd.inspect_files(pafs.LocalFileSystem(), [str(path)], InputConfig())[0]
    table = pa.concat_tables(rd.read_file(pafs.LocalFileSystem(), info, InputConfig()))
    assert table.column("reject_reason").to_pylist() == [None, rd.REJECT_NON_UTF8, rd.REJECT_NON_UTF8_ID,
                                                         rd.REJECT_NULL]
    assert table.column("doc_id").to_pylist() == ["ok", "bad-text", "bad-id-\\xff", "null"]
    assert table.column("text").to_pylist()[0] == "fine"


@pytest.fixture(scope="module")
def messy_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("messy")
    ids = [f"d{i}" for i in range(len(SENTENCES))]
    texts = [s.encode() for s in SENTENCES]
    bad_ids = [b"null-text", b"empty", b"blank", b"latin1", b"d0", None, b"bad-id-\xff", b"huge"]
    bad_texts = [None, b"", b" \t\n ", "caf\u00e9 cr\u00e8me".encode("latin-1"), b"a duplicate of d0",
                 b"text without an id", b"fine text, bad id", ("long document " * 75_000).encode()]
    pq.write_table(pa.table({"id": _bytes_column([i.encode() for i in ids[:6]]),
                             "text": _bytes_column(texts[:6])}), d / "part-0.parquet")
    pq.write_table(pa.table({"id": _bytes_column([i.encode() for i in ids[6:]] + bad_ids),
                             "text": _bytes_column(texts[6:] + bad_texts)}), d / "part-1.parquet")
    return d


@pytest.fixture(scope="module")
def messy_run(messy_corpus, tmp_path_factory):
    # budget above the corpus and k above the number of documents: clamp, do not fail
    out = tmp_path_factory.mktemp("messy-out")
    proc = labelnext(*run_args(messy_corpus, out, "--run-id", "messy", "--run-date", "2026-11-25",
                               "--set", "cluster.k=500", budget="1000"))
    return out, proc


@pytest.mark.slow
def test_bad_rows_are_rejected_with_reasons_and_the_run_commits(messy_run):
    tmp_path, proc = messy_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    run = run_dir(tmp_path, "messy")
    rejects = {(r["doc_id"], r["reason"]) for r in pq.read_table(run / "rejects").to_pylist()}
    assert rejects == {
        ("null-text", rd.REJECT_NULL), ("empty", rd.REJECT_EMPTY), ("blank", rd.REJECT_EMPTY),
        ("latin1", rd.REJECT_NON_UTF8), ("d0", rd.REJECT_DUPLICATE), (None, rd.REJECT_NULL_ID),
        ("bad-id-\\xff", rd.REJECT_NON_UTF8_ID),
    }
    dup = [r for r in pq.read_table(run / "rejects").to_pylist() if r["reason"] == rd.REJECT_DUPLICATE][0]
    assert dup["source_file"].endswith("part-1.parquet")  # the first d0 (part-0) is kept
    counts = manifest(run)["counts"]
    accepted = len(SENTENCES) + 1  # + the 1 MB document, truncated
    assert counts["input_docs"] == len(SENTENCES) + 8
    assert counts["rejected_docs"] == 7 and counts["accepted_docs"] == accepted
    assert counts["clusters"] <= accepted
    chosen = selected_ids(run)
    assert len(chosen) == len(set(chosen)) == accepted  # min(budget, available)
    assert "huge" in chosen and "d0" in chosen
    cost = json.loads((run / "cost_report.json").read_text())
    assert cost["stages"]["read"]["truncated_chars_docs"] == 1


@pytest.mark.slow
def test_a_rerun_that_fails_on_bad_input_keeps_the_committed_run(messy_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(messy_run[0], out)
    before = manifest(run_dir(out, "messy"))
    proc = labelnext(*run_args(tmp_path / "typo.parquet", out, "--run-id", "messy", "--run-date", "2026-11-25"))
    assert_one_line_error(proc, "typo.parquet", "not found")
    assert manifest(run_dir(out, "messy")) == before
    assert selected_ids(run_dir(out, "messy"))


# -- input.embedding_column: vectors that came with the corpus ---------------------------------------------------

def _vector_corpus(d, vectors, vector_type):
    ids = [f"d{i}" for i in range(len(vectors))]
    texts = [SENTENCES[i % len(SENTENCES)] + f" ({i})" for i in range(len(vectors))]
    pq.write_table(pa.table({"id": ids, "text": texts, "vec": pa.array(vectors, vector_type)}), d / "vectors.parquet",
                   row_group_size=8)
    return d / "vectors.parquet"


@pytest.mark.slow
def test_corpus_vectors_skip_the_encoder_and_bad_ones_are_rejected_with_reasons(tmp_path):
    good = [[float(i % 3 == j) + 0.1 * i for j in range(4)] for i in range(16)]
    bad = {"d16": None, "d17": [1.0, 2.0], "d18": [float("nan"), 1.0, 1.0, 1.0], "d19": [0.0] * 4}
    corpus = _vector_corpus(tmp_path, good + list(bad.values()), pa.list_(pa.float32()))
    out = tmp_path / "out"
    proc = labelnext(*run_args(corpus, out, "--run-id", "vec", "--run-date", "2026-11-25",
                               "--set", "input.embedding_column=vec", "--set", "embed.model=some-org/not-local",
                               "--set", "select.rule=cluster_only", budget="5"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = run_dir(out, "vec")
    rejects = {r["doc_id"]: (r["reason"], r["row"]) for r in pq.read_table(run / "rejects").to_pylist()}
    assert rejects == {"d16": ("null_embedding", 16), "d17": ("wrong_embedding_dimension", 17),
                       "d18": ("non_finite_embedding", 18), "d19": ("zero_embedding", 19)}
    counts = manifest(run)["counts"]
    assert counts["rejected_docs"] == 4 and counts["accepted_docs"] == 16 and counts["selected"] == 5
    cost = json.loads((run / "cost_report.json").read_text())
    assert cost["stages"]["embed"]["docs"] == 0 and cost["stages"]["embed"]["given"] == 16
    selected = pq.read_table(run / "selected")
    assert not set(selected.column("doc_id").to_pylist()) & set(bad)
    assert all(t.startswith(tuple(SENTENCES)) for t in selected.column("text").to_pylist())  # include_text: true


@pytest.mark.slow
def test_an_embedding_column_that_is_not_a_list_fails_before_any_compute(tmp_path):
    corpus = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"], "vec": ["0.1,0.2", "0.3,0.4"]}), corpus)
    proc = labelnext(*run_args(corpus, tmp_path / "out", "--set", "input.embedding_column=vec"))
    assert_one_line_error(proc, "strings.parquet", "'vec'", "input.embedding_column", "list of floats")
    assert proc.returncode == 1
