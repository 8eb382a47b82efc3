"""``labelnext export``: the selection in Label Studio's and Argilla's import formats (checked against JSON
schemas written from their docs) and as JSONL, local or s3://, ids round-tripped exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import boto3
import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labelnext.ops.core.columns import SELECTED_COLUMNS
from labelnext.pipelines.export import ExportError, render, with_texts
from tests.cli_run import QUICK, error_line, labelnext, manifest, run_dir, selected_ids
from tests.s3_fixtures import s3_bucket, s3_endpoint, s3_env  # noqa: F401 (fixtures)

SCHEMAS = Path(__file__).resolve().parent / "schemas"


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def ids_of(fmt: str, data: bytes) -> list[str]:
    if fmt == "jsonl":
        return [json.loads(line)["doc_id"] for line in data.decode().splitlines()]
    records = json.loads(data)
    return [r["data"]["doc_id"] for r in records] if fmt == "label-studio" else [r["id"] for r in records]


def texts_of(fmt: str, data: bytes) -> list[str]:
    if fmt == "jsonl":
        return [json.loads(line)["text"] for line in data.decode().splitlines()]
    records = json.loads(data)
    return [r["data"]["text"] for r in records] if fmt == "label-studio" else [r["fields"]["text"] for r in records]


def check_format(fmt: str, data: bytes) -> None:
    if fmt == "jsonl":
        for line in data.decode().splitlines():
            assert set(SELECTED_COLUMNS) - {"predicted_label", "margin"} <= set(json.loads(line))
        return
    name = "label-studio-tasks" if fmt == "label-studio" else "argilla-records"
    jsonschema.validate(json.loads(data), schema(name))


def corpus_text(corpus: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for row in pq.read_table(corpus).to_pylist():
        out.setdefault(str(row["id"]), row["text"])  # the run keeps the first of duplicate ids
    return out


# -- formats, without a pipeline ----------------------------------------------------------------------------
def _selected(with_labels: bool) -> pa.Table:
    cols = {"doc_id": ["b", "a", "c"], "rank": [0, 1, 2], "cluster_id": [1, 0, 1], "cluster_size": [5, 3, 5],
            "uncertainty": [2.5, float("nan"), 1.0], "nll": [3.0, 2.0, 1.0], "n_tokens": [10, 0, 7],
            "distance_to_centroid": [0.1, 0.2, 0.3], "reason": ["uncertain", "diverse", "uncertain"],
            "rule": ["cold_start"] * 3,
            "text": ["tx \u00e9 \"quoted\"", "<b>markup</b>", "third"]}
    if with_labels:
        cols.update(predicted_label=["sports", None, "food"], margin=[0.1, None, 0.7])
    return pa.table(cols)


@pytest.mark.parametrize("fmt", ["label-studio", "argilla", "jsonl"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_each_format_validates_and_keeps_ids_texts_and_order(fmt, with_labels):
    table = _selected(with_labels)
    data = render(table, fmt, {"run_id": "r", "run_date": "2026-11-25"})
    check_format(fmt, data)
    assert ids_of(fmt, data) == ["b", "a", "c"]
    assert texts_of(fmt, data) == table.column("text").to_pylist()
    first = json.loads(data.decode().splitlines()[0]) if fmt == "jsonl" else json.loads(data)[0]
    fields = {"label-studio": lambda r: r["meta"], "argilla": lambda r: r["metadata"], "jsonl": lambda r: r}[fmt](first)
    assert fields["cluster_id"] == 1 and fields["run_id"] == "r" and fields["uncertainty"] == 2.5
    if with_labels:
        assert fields["predicted_label"] == "sports" and fields["margin"] == 0.1


def test_unknown_format_and_missing_text_are_one_clear_error():
    with pytest.raises(ExportError, match="--format must be one of label-studio, argilla, jsonl"):
        render(_selected(False), "csv", {})
    no_text = _selected(False).drop_columns(["text"])
    with pytest.raises(ExportError, match="output.include_text=true"):
        with_texts(no_text, {"run_id": "r"})


# -- a real run that did not keep texts ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_without_text(sample_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export-run")
    proc = labelnext("run", "--corpus", str(sample_corpus), "--output", str(out), "--budget", "12",
                     "--run-id", "exp", "--run-date", "2026-11-25", "--set", "output.include_text=false", *QUICK)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = run_dir(out, "exp")
    assert "text" not in pq.read_schema(next((run / "selected").glob("*.parquet"))).names
    return run


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["label-studio", "argilla", "jsonl"])
def test_export_reads_texts_from_the_recorded_corpus(run_without_text, sample_corpus, tmp_path, fmt):
    target = tmp_path / f"selection.{fmt}"
    proc = labelnext("export", str(run_without_text), "--format", fmt, "--output", str(target))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 12 documents ({fmt})" in proc.stdout
    data = target.read_bytes()
    check_format(fmt, data)
    ranked = pq.read_table(run_without_text / "selected").sort_by("rank").column("doc_id").to_pylist()
    assert ids_of(fmt, data) == ranked and sorted(ranked) == sorted(selected_ids(run_without_text))
    texts = corpus_text(sample_corpus)
    assert texts_of(fmt, data) == [texts[d] for d in ranked]


@pytest.mark.slow
def test_export_refuses_a_run_without_manifest_or_text(run_without_text, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_without_text, unfinished)
    (unfinished / "manifest.json").unlink()
    proc = labelnext("export", str(unfinished), "--format", "jsonl", "--output", str(tmp_path / "x.jsonl"))
    assert proc.returncode == 1 and not (tmp_path / "x.jsonl").exists()
    assert error_line(proc) == f"error: {unfinished}: no manifest.json; the run is missing or was not committed"
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1

    no_corpus = tmp_path / "no-corpus"
    shutil.copytree(run_without_text, no_corpus)
    record = manifest(no_corpus)
    record["corpus"] = str(tmp_path / "gone.parquet")
    (no_corpus / "manifest.json").write_text(json.dumps(record))
    proc = labelnext("export", str(no_corpus), "--format", "jsonl", "--output", str(tmp_path / "y.jsonl"))
    assert proc.returncode == 1 and "corpus not found" in error_line(proc)


@pytest.mark.slow
def test_export_and_report_open_on_s3(run_without_text, s3_bucket, s3_env, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    prefix = "out/run_date=2026-11-25/run_id=exp"
    for path in run_without_text.rglob("*"):
        if path.is_file():
            client.put_object(Bucket=s3_bucket, Key=f"{prefix}/{path.relative_to(run_without_text)}",
                              Body=path.read_bytes())
    run_uri = f"s3://{s3_bucket}/{prefix}"
    proc = labelnext("export", run_uri, "--format", "label-studio", "--output", f"s3://{s3_bucket}/exports/tasks.json")
    assert proc.returncode == 0, proc.stderr
    data = client.get_object(Bucket=s3_bucket, Key="exports/tasks.json")["Body"].read()
    check_format("label-studio", data)
    assert ids_of("label-studio", data) == pq.read_table(run_without_text / "selected").sort_by("rank") \
        .column("doc_id").to_pylist()

    proc = labelnext("report", run_uri, "--open")
    assert proc.returncode == 0, proc.stderr
    page = Path(proc.stdout.split("report: ", 1)[1].strip())
    try:
        assert page.read_bytes() == (run_without_text / "report.html").read_bytes()
    finally:
        page.unlink()
