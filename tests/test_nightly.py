"""Nightly runs end to end on real models, through the CLI, against a real S3 endpoint (moto's server).

Night one crashes between the data write and the manifest, is rerun with the same run id (and a second,
concurrent attempt of that run id is refused while the rerun holds the run), then night two runs on the same
documents plus new ones. Every S3 object is written with SSE-KMS. A local crash + rerun covers the local
filesystem path, and downstream readers (pandas, Polars, DuckDB, pyarrow.dataset over s3://) agree.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labelnext.pipelines.commit import FAULT_EXIT_CODE
from labelnext.pipelines.sample_corpus import make_documents
from tests.cli_run import QUICK, REPO, cli_args, cli_env, error_line, labelnext
from tests.s3_fixtures import FAKE_ENV, s3_endpoint  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

N_DOCS, NEW_DOCS, BUDGET = 150, 24, 5
USER_EXCLUDED = ["new-0000", "new-0001", "new-0002"]
KMS = ("--set", "storage.sse=aws:kms", "--set", "storage.kms_key_id=alias/labelnext-test")
NIGHT = ("--budget", str(BUDGET), "--run-id", "nightly", *QUICK, *KMS)


@dataclass(frozen=True)
class S3World:
    endpoint: str
    bucket: str
    client: object

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def json(self, key: str) -> dict:
        return json.loads(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def table(self, key: str) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()))

    def put_table(self, key: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.client.put_object(Bucket=self.bucket, Key=key, Body=sink.getvalue().to_pybytes())


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    """The standard AWS settings point at the local endpoint for this module and the CLIs it starts."""
    patch = pytest.MonkeyPatch()
    for key, value in {**FAKE_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        patch.setenv(key, value)
    patch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="nightly")
    world = S3World(s3_endpoint, "nightly", client)
    night1 = make_documents(N_DOCS, seed=11)  # N docs + one planted null-text row
    new = make_documents(N_DOCS + NEW_DOCS, seed=11).slice(N_DOCS, NEW_DOCS)
    new = new.set_column(0, "id", pa.array([f"new-{i:04d}" for i in range(NEW_DOCS)]))
    world.put_table("corpus/2026-11-24/part-0.parquet", night1)
    world.put_table("corpus/2026-11-25/part-0.parquet", night1)
    world.put_table("corpus/2026-11-25/part-1.parquet", new)
    world.put_table("labelled/ids.parquet", pa.table({"doc_id": USER_EXCLUDED}))
    yield world
    patch.undo()


def _run_key(run_date: str) -> str:
    return f"out/run_date={run_date}/run_id=nightly"


def _claim_holder(s3: S3World, run_date: str) -> dict | None:
    try:
        return s3.json(f"out/_locks/run_date={run_date}/run_id=nightly.json")
    except s3.client.exceptions.NoSuchKey:
        return None


@pytest.fixture(scope="module")
def night_one(s3):
    args = ("run", "--corpus", s3.uri("corpus/2026-11-24/"), "--output", s3.uri("out"),
            "--run-date", "2026-11-24", *NIGHT)
    crash = labelnext(*args, env={"LABELNEXT_FAULT": "before_manifest"})
    after_crash = {"keys": s3.keys("out/"), "holder": _claim_holder(s3, "2026-11-24"),
                   "report": labelnext("report", s3.uri(_run_key("2026-11-24")))}

    rerun = subprocess.Popen(cli_args(*args), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and rerun.poll() is None:
        holder = _claim_holder(s3, "2026-11-24")
        if holder and holder["pid"] == rerun.pid:
            break
        time.sleep(0.2)
    # Freeze the rerun while it holds the claim, so the second attempt meets a live holder every time.
    os.kill(rerun.pid, signal.SIGSTOP)
    try:
        second = labelnext(*args)
    finally:
        os.kill(rerun.pid, signal.SIGCONT)
    out, err = rerun.communicate(timeout=900)
    return {"crash": crash, "after_crash": after_crash, "second": second,
            "rerun": subprocess.CompletedProcess(rerun.args, rerun.returncode, out, err)}


@pytest.fixture(scope="module")
def night_two(s3, night_one):
    assert night_one["rerun"].returncode == 0, night_one["rerun"].stderr[-3000:]
    return labelnext("run", "--corpus", s3.uri("corpus/2026-11-25/"), "--output", s3.uri("out"),
                     "--run-date", "2026-11-25", *NIGHT, "--set", "cluster.warm_start=true",
                     "--set", f"input.exclude_ids={s3.uri('labelled/ids.parquet')}")


def _assert_committed_exactly(s3: S3World, run_key: str) -> dict:
    """The manifest lists every object under the run prefix (nothing orphaned) with true sizes and rows."""
    manifest = s3.json(f"{run_key}/manifest.json")
    listed = {e["path"]: e for e in manifest["files"]}
    present = {k[len(run_key) + 1:] for k in s3.keys(run_key + "/")} - {"manifest.json"}
    assert present == set(listed)
    for rel, entry in listed.items():
        head = s3.client.head_object(Bucket=s3.bucket, Key=f"{run_key}/{rel}")
        assert head["ContentLength"] == entry["bytes"], rel
        if rel.endswith(".parquet"):
            assert s3.table(f"{run_key}/{rel}").num_rows == entry["rows"], rel
    return manifest


def _selected(s3: S3World, run_key: str) -> set[str]:
    return {doc for key in s3.keys(f"{run_key}/selected/") for doc in s3.table(key).column("doc_id").to_pylist()}


def _rows(s3: S3World, run_key: str, folder: str) -> int:
    return sum(s3.table(k).num_rows for k in s3.keys(f"{run_key}/{folder}/"))


def test_a_crash_before_the_manifest_leaves_nothing_a_reader_trusts(night_one, s3):
    crash, after = night_one["crash"], night_one["after_crash"]
    assert crash.returncode == FAULT_EXIT_CODE, crash.stderr[-3000:]
    assert f"{_run_key('2026-11-24')}/selected/" in " ".join(after["keys"])  # data was written...
    assert f"{_run_key('2026-11-24')}/manifest.json" not in after["keys"]  # ...but never committed
    assert after["holder"] is not None  # a killed run cannot release its claim
    assert after["report"].returncode != 0 and "not committed" in after["report"].stderr


def test_a_second_attempt_of_a_running_run_id_is_refused(night_one):
    second = night_one["second"]
    assert second.returncode == 1, second.stderr[-3000:]
    assert "is already being written by attempt" in error_line(second)
    assert "Traceback" not in second.stderr


def test_the_rerun_replaces_the_crashed_attempt_whole(night_one, s3):
    rerun = night_one["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "took over the abandoned claim" in rerun.stderr
    run_key = _run_key("2026-11-24")
    manifest = _assert_committed_exactly(s3, run_key)
    counts = manifest["counts"]
    assert counts["input_docs"] == N_DOCS + 1 and counts["rejected_docs"] == 1 and counts["excluded_docs"] == 0
    assert counts["selected"] == BUDGET == _rows(s3, run_key, "selected")
    assert _rows(s3, run_key, "assignments") == counts["accepted_docs"] == N_DOCS
    assert manifest["ledger"]["rows"] == BUDGET
    assert s3.keys("out/ledger/") == [f"out/{manifest['ledger']['path']}"]
    assert _claim_holder(s3, "2026-11-24") is None  # released after the commit
    # The crashed attempt had embedded everything already: the rerun resumed from the cache.
    embed = s3.json(f"{run_key}/cost_report.json")["stages"]["embed"]
    assert (embed["docs"], embed["reused"]) == (0, N_DOCS)


def test_night_two_excludes_earlier_picks_and_embeds_only_new_documents(night_one, night_two, s3):
    assert night_two.returncode == 0, night_two.stderr[-3000:]
    one, two = _run_key("2026-11-24"), _run_key("2026-11-25")
    manifest = _assert_committed_exactly(s3, two)
    first_pick, second_pick = _selected(s3, one), _selected(s3, two)
    assert len(second_pick) == BUDGET and not second_pick & first_pick
    assert not second_pick & set(USER_EXCLUDED)
    counts = manifest["counts"]
    assert counts["input_docs"] == N_DOCS + 1 + NEW_DOCS and counts["rejected_docs"] == 1
    assert counts["excluded_docs"] == BUDGET + len(USER_EXCLUDED)
    cost = s3.json(f"{two}/cost_report.json")
    assert cost["stages"]["embed"]["docs"] == NEW_DOCS - len(USER_EXCLUDED)
    assert cost["stages"]["embed"]["reused"] == N_DOCS - BUDGET
    assert counts["accepted_docs"] == N_DOCS - BUDGET + NEW_DOCS - len(USER_EXCLUDED)
    assert cost["stages"]["cluster"]["warm_start_from"] == "run_date=2026-11-24/run_id=nightly"
    # Both nights stay committed and consistent; each has its own ledger entry.
    _assert_committed_exactly(s3, one)
    assert len(s3.keys("out/ledger/")) == 2


def test_every_object_written_is_encrypted_and_no_claim_is_left(night_two, s3):
    assert night_two.returncode == 0, night_two.stderr[-3000:]
    keys = s3.keys("out/")
    assert any("/cache/embeddings/" in k for k in keys) and any(k.endswith("report.html") for k in keys)
    for key in keys:
        head = s3.client.head_object(Bucket=s3.bucket, Key=key)
        assert (head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")) == ("aws:kms", "alias/labelnext-test"), key
    assert not [k for k in keys if k.startswith("out/_locks/")]


def test_report_command_and_html_report_from_s3(night_two, s3):
    run_uri = s3.uri(_run_key("2026-11-25"))
    proc = labelnext("report", run_uri)
    assert proc.returncode == 0, proc.stderr
    assert "cost per stage" in proc.stdout and "reused" in proc.stdout
    page = s3.client.get_object(Bucket=s3.bucket, Key=f"{_run_key('2026-11-25')}/report.html")
    assert page["ContentType"].startswith("text/html")
    html = page["Body"].read().decode()
    # The nightly default is a cold start without the LLM: the page says so and prices the 70B-class pass.
    assert "<svg" in html and "cost per stage" in html.lower()
    assert "No document went through the LLM" in html and "x less" in html
    for secret in (FAKE_ENV["AWS_SECRET_ACCESS_KEY"], "AWS_SECRET"):
        manifest = json.dumps(s3.json(f"{_run_key('2026-11-25')}/manifest.json"))
        assert f'"{secret}"' not in manifest and secret not in html


def test_downstream_readers_agree(night_two, s3, tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads
    from pyarrow import fs as pafs

    run_key = _run_key("2026-11-25")
    local = tmp_path / "selected"
    local.mkdir()
    for key in s3.keys(f"{run_key}/selected/"):
        (local / key.rsplit("/", 1)[-1]).write_bytes(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    s3fs = pafs.S3FileSystem(endpoint_override=s3.endpoint, scheme="http", region="us-east-1")
    remote = pads.dataset(f"{s3.bucket}/{run_key}/selected/", filesystem=s3fs, format="parquet").to_table()
    cols = ["doc_id", "rank", "cluster_id", "uncertainty"]
    expected = sorted(tuple(r.values()) for r in remote.select(cols).to_pylist())
    frames = {
        "pandas": pd.read_parquet(local)[cols],
        "polars": pl.read_parquet(f"{local}/*.parquet").select(cols).to_pandas(),
        "duckdb": duckdb.sql(f"select {', '.join(cols)} from read_parquet('{local}/*.parquet')").df(),
    }
    for name, frame in frames.items():
        rows = [tuple(None if isinstance(v, float) and v != v else v for v in row)  # NaN is pandas' null
                for row in frame.itertuples(index=False)]
        assert sorted(rows) == expected, name
    assert len(expected) == BUDGET


@pytest.fixture(scope="module")
def night_one_backfilled(s3, night_one, night_two):
    """Night one run again after night two has committed (a backfill)."""
    assert night_two.returncode == 0, night_two.stderr[-3000:]
    before = _selected(s3, _run_key("2026-11-24"))
    proc = labelnext("run", "--corpus", s3.uri("corpus/2026-11-24/"), "--output", s3.uri("out"),
                     "--run-date", "2026-11-24", *NIGHT)
    return before, proc


def test_rerunning_a_night_after_the_next_one_reproduces_its_selection(night_one_backfilled, s3):
    before, proc = night_one_backfilled
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ledger: 0 ids selected by 0 committed runs before 2026-11-24" in proc.stderr
    run_key = _run_key("2026-11-24")
    assert _selected(s3, run_key) == before and len(before) == BUDGET
    assert _assert_committed_exactly(s3, run_key)["counts"]["excluded_docs"] == 0


def test_local_crash_then_rerun_commits_one_consistent_run(tmp_path):
    from labelnext.pipelines.sample_corpus import write_sample_corpus

    corpus = write_sample_corpus(tmp_path / "corpus.parquet", n_docs=100, seed=2)
    out = tmp_path / "out"
    args = ("run", "--corpus", str(corpus), "--output", str(out), "--budget", "4", "--run-id", "r",
            "--run-date", "2026-11-25", *QUICK)
    crash = labelnext(*args, env={"LABELNEXT_FAULT": "before_manifest"})
    assert crash.returncode == FAULT_EXIT_CODE, crash.stderr[-3000:]
    run = out / "run_date=2026-11-25" / "run_id=r"
    assert (run / "selected").is_dir() and not (run / "manifest.json").exists()
    assert (out / "_locks" / "run_date=2026-11-25" / "run_id=r.json").exists()

    rerun = labelnext(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    listed = {e["path"]: e for e in manifest["files"]}
    present = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()} - {"manifest.json"}
    assert present == set(listed)  # nothing left from the crashed attempt
    for rel, entry in listed.items():
        assert (run / rel).stat().st_size == entry["bytes"]
        if rel.endswith(".parquet"):
            assert pq.read_metadata(run / rel).num_rows == entry["rows"]
    assert pq.read_table(run / "selected").num_rows == manifest["counts"]["selected"] == 4
    assert pq.read_table(run / "assignments").num_rows == manifest["counts"]["accepted_docs"]
    entries = [p.name for p in (out / "ledger" / "run_date=2026-11-25" / "run_id=r").iterdir()]
    assert entries == [f"part-{manifest['attempt']}.parquet"]  # the crashed attempt's entry is gone
    assert not (out / "_locks" / "run_date=2026-11-25" / "run_id=r.json").exists()
    assert (run / "report.html").read_text().count("<html") == 1  # one page, written once
