"""200,000 documents that carry their vectors, end to end through the CLI: the driver holds candidate-sized
data only, as the cost report's telemetry shows (``python -m bench.scale`` measures the same at 250k-2M)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from bench.scale import write_vector_corpus
from tests.cli_run import QUICK, labelnext, manifest, run_dir

pytestmark = pytest.mark.slow

DOCS = 200_000
BUDGET = 2_000


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory):
    corpus = write_vector_corpus(tmp_path_factory.mktemp("corpus") / "vectors.parquet", DOCS, seed=1)
    out = tmp_path_factory.mktemp("out")
    proc = labelnext("run", "--corpus", str(corpus), "--output", str(out), "--budget", str(BUDGET),
                     "--run-id", "scale", "--run-date", "2026-11-25", *QUICK,
                     "--set", "input.embedding_column=embedding", "--set", "select.rule=cluster_only",
                     "--set", "cluster.k=200", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return corpus, run_dir(out, "scale")


def test_the_driver_holds_candidate_sized_data_only(scale_run):
    _, run = scale_run
    cost = json.loads((run / "cost_report.json").read_text())
    counts = manifest(run)["counts"]
    assert counts["input_docs"] == counts["accepted_docs"] == DOCS
    assert counts["selected"] == BUDGET
    candidates = counts["candidates"]
    assert candidates == 5 * BUDGET  # candidates.factor 5; every cluster holds its quota
    rows = cost["driver"]["rows_collected"]
    assert 0 < rows <= 3 * candidates, f"{rows} rows reached the driver for {candidates} candidates"
    assert cost["driver"]["peak_rss_bytes"] > 0
    assert cost["object_store"]["peak_bytes"] > 0


def test_vectors_skip_the_encoder_and_the_big_file_is_read_in_parallel(scale_run):
    corpus, run = scale_run
    cost = json.loads((run / "cost_report.json").read_text())
    assert pq.ParquetFile(corpus).num_row_groups == 4
    assert cost["stages"]["read"]["read_tasks"] == 2  # 50k-row groups, at most 131,072 rows per task
    assert cost["stages"]["embed"]["docs"] == 0 and cost["stages"]["embed"]["given"] == DOCS
    assert pq.read_table(run / "assignments").num_rows == DOCS
